"""
Benchmark data/prepare.py: tokens/s with a process pool vs a plain single-process sentencepiece
encode loop over the same file, and peak RSS for a corpus and one 4x larger.

Usage:
    python bench/prepare.py                         # 16 MB corpus from ../shared/data/pretrain, lab tokenizer
    python bench/prepare.py --mb 32 --tokenizer path/to.model --workers 2

Each measured run is its own fresh subprocess (so peak RSS figures are not polluted by earlier runs):
  * the baseline reads the JSONL, json-parses each line and calls sp.encode(text), one by one; all
    ratios are against it. A second loop row calls sp.encode_as_numpy instead (int32 arrays, no
    Python int per token): prepare's workers use that output when sentencepiece has it, so this row
    shows how much of prepare's lead comes from it rather than from the second process;
  * prepare runs the whole job (read, parse, tokenize in the pool, two-pass shuffle, write train/val).
Each 1x row is the minimum over --repeat runs (per metric). Columns: wall-clock tokens/s and its ratio to the baseline; CPU seconds of the main process and of
the workers (getrusage SELF / CHILDREN); peak RSS of the largest process (main or one worker).
On a shared machine the wall-clock columns mostly measure the other jobs (see the load average
printed), so the table also gives the wall time the same CPU work would take on `--cores` idle
cores: max(main CPU, workers' CPU / workers, total CPU / cores), and the speed-up that implies.
"""
import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import textwrap

import sentencepiece as spm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), "shared", "data", "pretrain")

BASELINE = textwrap.dedent("""
    import json, resource, sys, time, sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=sys.argv[1])
    encode = sp.encode if sys.argv[3] == "list" else sp.encode_as_numpy  # list of ints / int32 array
    cpu0, t0, n = time.process_time(), time.time(), 0
    with open(sys.argv[2], "rb") as f:
        for line in f:
            n += len(encode(json.loads(line)["text"])) + 2  # + BOS/EOS, counted like prepare
    print(json.dumps({"tokens": n, "seconds": time.time() - t0, "main_cpu": time.process_time() - cpu0,
                      "workers_cpu": 0.0, "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
""")

PREPARE = textwrap.dedent("""
    import json, resource, sys, time
    sys.path.insert(0, sys.argv[1])
    from data.prepare import prepare
    cpu0 = time.process_time()
    meta = prepare([sys.argv[2]], sys.argv[3], sys.argv[4], workers=int(sys.argv[5]), verbose=False)
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    print(json.dumps({"tokens": meta["train_tokens"] + meta["val_tokens"], "seconds": meta["seconds"],
                      "main_cpu": time.process_time() - cpu0, "workers_cpu": kids.ru_utime + kids.ru_stime,
                      "rss": max(me.ru_maxrss, kids.ru_maxrss) / 1024}))
""")


def run(code, *args, repeat=1):
    """Run a measurement `repeat` times in fresh processes; keep each metric's minimum (the least
    disturbed run: noise from other jobs only ever adds time)."""
    results = []
    for _ in range(repeat):
        out = subprocess.run([sys.executable, "-c", code, *map(str, args)], check=True, capture_output=True, text=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {k: min(r[k] for r in results) for k in results[0]}


def build_corpus(path, mb):
    """JSONL of real documents (TinyStories, C4, Chinese wiki, poetry), repeated with a copy number
    prefixed so that no two documents are identical, until `mb` MB."""
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
    p.add_argument("--cores", type=int, default=2, help="cores assumed by the idle-machine estimate")
    p.add_argument("--repeat", type=int, default=3, help="runs per row (the minimum of each metric is kept)")
    args = p.parse_args()
    tok = os.path.abspath(args.tokenizer)
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as d:
        c1, c4 = os.path.join(d, "x1.jsonl"), os.path.join(d, "x4.jsonl")
        s1, s4 = build_corpus(c1, args.mb), build_corpus(c4, 4 * args.mb)
        print(f"corpus: {s1 / 2**20:.1f} MB and {s4 / 2**20:.1f} MB of JSONL; tokenizer {tok}; "
              f"{os.cpu_count()} cpus, load average {load0:.1f} at start")
        rows = [("sentencepiece encode loop, 1 process", "1x", run(BASELINE, tok, c1, "list", repeat=args.repeat))]
        if hasattr(spm.SentencePieceProcessor, "encode_as_numpy"):  # what prepare's workers call, if present
            rows.append(("same loop, sp.encode_as_numpy", "1x", run(BASELINE, tok, c1, "numpy", repeat=args.repeat)))
        for workers, corpus, tag in ((1, c1, "1x"), (args.workers, c1, "1x"), (args.workers, c4, "4x")):
            res = run(PREPARE, REPO, corpus, os.path.join(d, f"out_{workers}_{tag}"), tok, workers,
                      repeat=args.repeat if tag == "1x" else 1)
            rows.append((f"data/prepare.py --workers {workers}", tag, res))
    base = rows[0][2]
    base_cpu_per_tok = base["main_cpu"] / base["tokens"]
    print(f"\n| run | corpus | tokens | wall s | tokens/s | vs loop | main CPU s | workers CPU s "
          f"| idle {args.cores}-core est. s | est. vs loop | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for label, tag, r in rows:
        n, main_cpu, w_cpu = r["tokens"], r["main_cpu"], r["workers_cpu"]
        workers = int(label.rsplit(" ", 1)[-1]) if "workers" in label else 1
        idle = max(main_cpu, w_cpu / max(workers, 1), (main_cpu + w_cpu) / args.cores)
        if workers <= 1:  # in-process: one process does everything
            idle = main_cpu + w_cpu
        print(f"| {label} | {tag} | {n:,} | {r['seconds']:.2f} | {n / r['seconds']:,.0f} | "
              f"{n / r['seconds'] / (base['tokens'] / base['seconds']):.2f}x | {main_cpu:.2f} | {w_cpu:.2f} | "
              f"{idle:.2f} | {n * base_cpu_per_tok / idle:.2f}x | {r['rss']:.0f} |")
    print(f"\nload average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at end "
          f"(on {os.cpu_count()} cpus: above {os.cpu_count()} the wall-clock columns are contended)")


if __name__ == "__main__":
    main()
