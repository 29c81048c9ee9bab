"""
Benchmark data/prepare.py: tokens/s with a process pool vs a plain single-process sentencepiece
encode loop over the same file, and peak RSS for a corpus and one 4x larger.

Usage:
    python bench/prepare.py                         # ~16 MB corpus from ../shared/data/pretrain, lab tokenizer
    python bench/prepare.py --mb 32 --tokenizer path/to.model --workers 2

Every measured run is its own subprocess, started from a fresh wrapper process that reports
getrusage(RUSAGE_CHILDREN).ru_maxrss: the peak RSS of the largest process of that run (the
prepare main process or one of its workers), unpolluted by earlier runs.
The prepare rows time the whole job (read, parse, tokenize, two-pass shuffle, write); the baseline
only reads, parses and encodes, writing nothing. Other jobs on a shared machine add noise: run twice.
"""
import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), "shared", "data", "pretrain")

BASELINE = textwrap.dedent("""
    import json, sys, time, sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=sys.argv[1])
    batch = sys.argv[3] == "batch"
    t0, n, docs = time.time(), 0, []
    with open(sys.argv[2], "rb") as f:
        for line in f:
            text = json.loads(line)["text"]
            if batch:
                docs.append(text)
                if len(docs) == 256:
                    n += sum(map(len, sp.encode(docs, num_threads=1)))
                    docs = []
            else:
                n += len(sp.encode(text)) + 2  # + BOS/EOS, to count like prepare does
        if docs:
            n += sum(map(len, sp.encode(docs, num_threads=1)))
    print(json.dumps({"tokens": n, "seconds": time.time() - t0}))
""")

MEASURE = textwrap.dedent("""
    import resource, subprocess, sys, time
    t0 = time.time()
    out = subprocess.run(sys.argv[1:], check=True, capture_output=True, text=True).stdout
    print(out.strip().splitlines()[-1] if out.strip() else "{}")
    print(time.time() - t0)
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(r.ru_utime + r.ru_stime)
    print(r.ru_maxrss)
""")


def measure(cmd):
    """Run cmd under a fresh wrapper: (last stdout line, wall s, CPU s of all its processes, peak RSS MB)."""
    out = subprocess.run([sys.executable, "-c", MEASURE, *cmd], check=True, capture_output=True, text=True).stdout
    last, wall, cpu, rss = out.strip().splitlines()[-4:]
    return last, float(wall), float(cpu), int(rss) / 1024


def build_corpus(path, mb):
    """JSONL of real documents (TinyStories, C4, Chinese wiki, poetry), repeated with a copy number
    prefixed so that no two documents are identical, until `mb` MB of text."""
    docs = []
    for name in ("en_tinystories_2k.jsonl.gz", "en_c4_300.jsonl.gz", "zh_wiki_cmrc2018_wudao_format.jsonl.gz",
                 "zh_classical_poetry.jsonl.gz"):
        with gzip.open(os.path.join(SHARED, name), "rt", encoding="utf-8") as f:
            for line in f:
                r = json.loads(line)
                docs.append(r.get("text") or r["title"] + "\n" + r["content"])
    size, copy = 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while size < mb * 2 ** 20:
            for d in docs:
                line = json.dumps({"text": f"[{copy}] {d}"}, ensure_ascii=False) + "\n"
                f.write(line)
                size += len(line.encode())
                if size >= mb * 2 ** 20:
                    break
            copy += 1
    return size


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=float, default=16, help="size of the 1x corpus in MB of JSONL")
    p.add_argument("--tokenizer", default=os.path.join(REPO, "tokenizer", "lab.model"))
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    tok = os.path.abspath(args.tokenizer)
    with tempfile.TemporaryDirectory() as d:
        c1, c4 = os.path.join(d, "x1.jsonl"), os.path.join(d, "x4.jsonl")
        s1, s4 = build_corpus(c1, args.mb), build_corpus(c4, 4 * args.mb)
        print(f"corpus: {s1 / 2**20:.1f} MB and {s4 / 2**20:.1f} MB of JSONL; tokenizer {tok}; {os.cpu_count()} cpus")
        rows = []
        for label, kind in (("sentencepiece encode loop, 1 process", "loop"),
                            ("sentencepiece batch encode, 1 process", "batch")):
            last, wall, cpu, rss = measure([sys.executable, "-c", BASELINE, tok, c1, kind])
            res = json.loads(last)
            rows.append((label, "1x", res["tokens"], res["seconds"], cpu, rss))
        base = rows[0][2] / rows[0][3]
        for workers, corpus, tag in ((1, c1, "1x"), (args.workers, c1, "1x"), (args.workers, c4, "4x")):
            out = os.path.join(d, f"out_{workers}_{tag}")
            cmd = [sys.executable, os.path.join(REPO, "data", "prepare.py"), "--input", corpus, "--out", out,
                   "--tokenizer", tok, "--workers", str(workers)]
            _, wall, cpu, rss = measure(cmd)
            with open(os.path.join(out, "meta.json")) as f:
                meta = json.load(f)
            rows.append((f"data/prepare.py --workers {workers}", tag, meta["train_tokens"] + meta["val_tokens"],
                         meta["seconds"], cpu, rss))
        print(f"\n| run | corpus | tokens | seconds | tokens/s | vs loop | CPU s (all procs) | peak RSS MB |")
        print(f"|---|---|---|---|---|---|---|---|")
        for label, tag, n, sec, cpu, rss in rows:
            print(f"| {label} | {tag} | {n:,} | {sec:.2f} | {n / sec:,.0f} | {n / sec / base:.2f}x | {cpu:.1f} | {rss:.0f} |")
        print("\nCPU s counts every process of a run, including interpreter start-up and the corpus-independent"
              "\nsetup; on an idle machine the pool's speed-up is about min(workers, cores) x loop CPU / prepare CPU.")


if __name__ == "__main__":
    main()
