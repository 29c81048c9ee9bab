"""
Benchmark and measurements for data/sft_select.py on the real Chinese and English SFT sets of ../shared/data/sft.

    python bench/sft_select.py --model RUN/sft --reward_model RUN/reward            # everything below
    python bench/sft_select.py --model RUN/sft --only recall --sets en_alpaca_5000  # one measurement

What it measures (each printed as one line, and written to OUT/bench.json):
  recall   semantic-dedup recall on planted paraphrase duplicates: --plant examples of each set get a
           copy whose answer is re-templated ("Answer: ...", "答：..."), or whose whitespace or
           punctuation is changed (full-width <-> ASCII, doubled spaces, a trailing newline...), inserted
           at a random place; the full data/sft_select.py run (scores, clusters, dedup, selection, map) then
           runs on the planted file, timed per phase. Recall = share of planted pairs of which one
           member was removed as a duplicate; "strict" also asks that it was removed in favour of its partner.
  memory   peak RSS of the scoring pass (a fresh process each) at N and 4N examples: flat in N apart from
           the per-example scores (the embedding matrix is on disk, memory-mapped).
  kmeans   clustering throughput on a synthetic memory-mapped matrix of --kmeans_n rows (1M by default),
           and the anonymous memory it needs (the matrix's own pages are file-backed).
Run with OMP_NUM_THREADS=1 for per-core numbers.
"""
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from data import sft_select as select  # noqa: E402
from data.formats import read_conversations  # noqa: E402

SFT = Path(REPO).parent / "shared" / "data" / "sft"

# Paraphrase-level edits that leave the meaning alone: what a scraped or merged SFT set repeats.
TEMPLATES = ["Answer: {}", "The answer is: {}", "Sure! {}", "{}\n\nHope this helps.", "答：{}", "回答：{}"]
FULL_TO_ASCII = str.maketrans({"，": ",", "。": ".", "：": ":", "；": ";", "！": "!", "？": "?", "（": "(", "）": ")"})
ASCII_TO_FULL = str.maketrans({",": "，", ".": "。", ":": "：", ";": "；", "!": "！", "?": "？"})


def variant(messages, rng):
    """A near-copy of a conversation: one of re-templated answer / whitespace / punctuation edits."""
    out = [dict(m) for m in messages]
    kind = rng.choice(["template", "whitespace", "punctuation"])
    ans = out[-1]["content"]
    if kind == "template":
        out[-1]["content"] = rng.choice(TEMPLATES).format(ans)
    elif kind == "whitespace":
        out[-1]["content"] = re.sub(r" ", "  ", ans) + "\n"
        out[0]["content"] = " " + out[0]["content"].strip() + " "
    else:
        table = FULL_TO_ASCII if re.search("[，。：；！？]", ans + out[0]["content"]) else ASCII_TO_FULL
        out[-1]["content"] = ans.translate(table).rstrip("。.!！")
        out[0]["content"] = out[0]["content"].translate(table)
    return out, kind


def plant(name, n_plant, out_dir, seed, limit=0):
    """Write OUT/planted_NAME.jsonl: the set (first `limit` records, 0 = all) plus n_plant near-copies at
    random places -> (path, [(original position, copy position, kind)], n)."""
    convs, _ = read_conversations(str(SFT / f"{name}.jsonl.gz"))
    convs = convs[:limit] if limit else convs
    rng = random.Random(seed)
    picks = rng.sample(range(len(convs)), n_plant)
    items = [(c, ("orig", i)) for i, c in enumerate(convs)]
    for i in picks:
        copy, kind = variant(convs[i], rng)
        items.insert(rng.randrange(len(items) + 1), (copy, ("copy", i, kind)))
    pos_orig, pairs = {}, []
    for p, (_, tag) in enumerate(items):
        if tag[0] == "orig":
            pos_orig[tag[1]] = p
    for p, (_, tag) in enumerate(items):
        if tag[0] == "copy":
            pairs.append((pos_orig[tag[1]], p, tag[2]))
    path = os.path.join(out_dir, f"planted_{name}.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"messages": c}, ensure_ascii=False) + "\n" for c, _ in items)
    return path, pairs, len(items)


def model_flags(a):
    flags = ["--model", a.model] + (["--tokenizer", a.tokenizer] if a.tokenizer else [])
    return flags + (["--reward_model", a.reward_model] if a.reward_model else [])


def bench_recall(a, name):
    path, pairs, n = plant(name, a.plant, a.out, a.seed, a.limit)
    out = os.path.join(a.out, f"select_{name}")
    t = time.time()
    summary = select.main(["--data", path, "--out_dir", out, "--seed", str(a.seed), "--layer", str(a.layer),
                           "--dedup_threshold", str(a.threshold), "--embed_text", a.embed_text] + model_flags(a))
    wall = time.time() - t
    dup_of = {}
    with open(os.path.join(out, "scores.jsonl"), encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if "dup_of" in r:
                dup_of[r["i"]] = r["dup_of"]
    found = [o in dup_of or c in dup_of for o, c, _ in pairs]
    strict = [dup_of.get(o) == c or dup_of.get(c) == o for o, c, _ in pairs]
    planted = {x for o, c, _ in pairs for x in (o, c)}
    by_kind = {}
    for (_, _, kind), ok in zip(pairs, found):
        by_kind.setdefault(kind, []).append(ok)
    res = {"set": name, "embed_text": a.embed_text, "threshold": a.threshold, "layer": a.layer, "examples": n,
           "planted": len(pairs), "recall": float(np.mean(found)),
           "recall_strict": float(np.mean(strict)), "by_kind": {k: float(np.mean(v)) for k, v in by_kind.items()},
           "removed_not_planted": sum(1 for i in dup_of if i not in planted), "wall_s": wall,
           "timing": summary["timing"], "k": summary["k"], "map": summary["map"]}
    print(f"[recall] {name} (--embed_text {a.embed_text}, threshold {a.threshold}): {n} examples, "
          f"{len(pairs)} planted copies: recall {res['recall']:.3f} "
          f"(strict {res['recall_strict']:.3f}; by kind {res['by_kind']}), {res['removed_not_planted']} other "
          f"removals; total {wall:.1f} s: " + ", ".join(f"{p} {s:.1f} s ({n / max(s, 1e-9):.0f} ex/s)"
                                                     for p, (s, _) in summary["timing"].items()))
    return res


def bench_memory(a, name, sizes):
    """Scoring-pass peak RSS at several N, each in a fresh process (ru_maxrss only grows)."""
    res = []
    for n in sizes:
        out = os.path.join(a.out, f"mem_{n}")
        cmd = [sys.executable, "-m", "data.sft_select", "--data", str(SFT / f"{name}.jsonl.gz"), "--out_dir", out,
               "--limit", str(n), "--map", "none"] + model_flags(a)
        subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
        with open(os.path.join(out, "report.json"), encoding="utf-8") as f:
            s = json.load(f)
        res.append({"n": s["n"], "score_s": s["timing"]["score"][0], "score_rss_mb": s["timing"]["score"][1],
                    "embedding_mb": s["embedding_bytes"] / 2**20})
        print(f"[memory] {name} N={s['n']}: scoring {s['n'] / s['timing']['score'][0]:.0f} ex/s, peak RSS "
              f"{s['timing']['score'][1]:.0f} MiB, embedding file {s['embedding_bytes'] / 2**20:.1f} MiB")
    return res


def rss_parts():
    """(anonymous, file-backed) resident MiB now: a memory-mapped matrix's pages are file-backed (the
    kernel may drop them at will), what the algorithm itself holds is anonymous."""
    parts = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssFile:")):
                parts[line.split(":")[0]] = int(line.split()[1]) / 1024
    return parts.get("RssAnon", float("nan")), parts.get("RssFile", float("nan"))


def bench_kmeans(a):
    """Run first, in a fresh process, so the RSS numbers are k-means' own."""
    import torch
    path = os.path.join(a.out, "kmeans_synthetic.f32")
    rng = np.random.default_rng(a.seed)
    centres = rng.normal(size=(64, a.kmeans_dim))
    X = np.memmap(path, dtype=np.float32, mode="w+", shape=(a.kmeans_n, a.kmeans_dim))
    for s in range(0, a.kmeans_n, 65536):   # 64 true centres + noise, written in blocks (flat memory)
        e = min(a.kmeans_n, s + 65536)
        X[s:e] = centres[rng.integers(0, 64, e - s)] + 0.5 * rng.normal(size=(e - s, a.kmeans_dim))
    X.flush()
    del X
    X = np.memmap(path, dtype=np.float32, mode="r", shape=(a.kmeans_n, a.kmeans_dim))
    anon0, _ = rss_parts()
    t = time.time()
    _, _, hist = select.kmeans(X, a.k, iters=a.kmeans_iters, seed=a.seed, chunk=8192)
    sec = time.time() - t
    anon, file_mb = rss_parts()
    res = {"n": a.kmeans_n, "dim": a.kmeans_dim, "k": a.k, "iters": len(hist), "seconds": sec,
           "rows_per_s_per_iter": a.kmeans_n * len(hist) / sec, "anon_before_mb": anon0, "anon_after_mb": anon,
           "file_backed_mb": file_mb, "matrix_mb": a.kmeans_n * a.kmeans_dim * 4 / 2**20,
           "threads": torch.get_num_threads()}
    print(f"[kmeans] {a.kmeans_n} x {a.kmeans_dim} (memmap, {res['matrix_mb']:.0f} MiB), k={a.k}: {len(hist)} "
          f"iterations in {sec:.1f} s = {res['rows_per_s_per_iter']:.0f} rows/s per iteration; anonymous RSS "
          f"{anon0:.0f} -> {anon:.0f} MiB (file-backed, the mapped matrix: {file_mb:.0f} MiB)")
    del X
    os.remove(path)
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--reward_model", default=None)
    p.add_argument("--sets", nargs="+", default=["zh_alpaca_part00", "en_alpaca_5000"])
    p.add_argument("--only", nargs="+", default=["recall", "memory", "kmeans"])
    p.add_argument("--plant", type=int, default=300, help="near-copies planted per set")
    p.add_argument("--limit", type=int, default=0, help="records per set before planting (0 = all)")
    p.add_argument("--layer", type=int, default=-1)
    p.add_argument("--threshold", type=float, default=0.98)
    p.add_argument("--embed_text", default="canonical", choices=["canonical", "raw"])
    p.add_argument("--mem_sizes", type=int, nargs="+", default=[1000, 4000])
    p.add_argument("--kmeans_n", type=int, default=1000000)
    p.add_argument("--kmeans_dim", type=int, default=64)
    p.add_argument("--kmeans_iters", type=int, default=10)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="/tmp/bench_select")
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    results = {"args": vars(a)}
    if "kmeans" in a.only:
        results["kmeans"] = bench_kmeans(a)
    if "recall" in a.only:
        results["recall"] = [bench_recall(a, name) for name in a.sets]
    if "memory" in a.only:
        results["memory"] = bench_memory(a, a.sets[0], a.mem_sizes)
    with open(os.path.join(a.out, "bench.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2, ensure_ascii=False)
    return results


if __name__ == "__main__":
    main()
