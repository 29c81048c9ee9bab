"""
Benchmark for clean.py: documents/s and MB/s per core on a fixed mixed Chinese/English corpus built from
../shared/data (pretrain + noisy sets), and, when `datatrove` is importable (benchmark only, never a
dependency), the rules both implement (Gopher quality, Gopher repetition, FineWeb quality) side by side.

    python bench/clean.py                    # full pipeline per core (+ datatrove if installed)
    python bench/clean.py --workers 2        # also the wall-clock throughput of 2 worker processes

Per-core numbers are CPU seconds of one process (time.process_time), so other load on the machine does
not inflate them; wall seconds are printed too.
"""
import argparse
import gzip
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import clean  # noqa: E402


def corpus(data):
    """The fixed corpus: every document of these files, in this order (text fields as each file lays them out)."""
    files = [("pretrain/en_c4_300.jsonl.gz", ["text"]), ("pretrain/en_tinystories_2k.jsonl.gz", ["text"]),
             ("pretrain/zh_wiki_cmrc2018_wudao_format.jsonl.gz", ["title", "content"]), ("pretrain/zh_classical_poetry.jsonl.gz", ["text"]),
             ("noisy/en_multi_commoncrawl_2019_30_697.jsonl.gz", ["text"]), ("noisy/zh_commoncrawl_2021_43_100.jsonl.gz", ["title", "raw_content"]),
             ("noisy/zh_quality_clean_10.jsonl.gz", ["text"]), ("noisy/zh_quality_dirty_10.jsonl.gz", ["text"])]
    docs = []
    for name, fields in files:
        with gzip.open(data / name, "rt", encoding="utf-8") as f:
            docs += [{"id": f"{name}:{i}", "text": "\n".join(r[k] for k in fields if r.get(k))} for i, r in enumerate(map(json.loads, f))]
    return docs


def ours_shared_rules(docs, a):
    """Our implementation of the rules datatrove also has, all run on every document (as clean.py does)."""
    rules = [clean.gopher_word_count, clean.gopher_mean_word_length, clean.gopher_symbol_ratio, clean.gopher_bullet_lines,
             clean.gopher_ellipsis_lines, clean.gopher_alpha_words, clean.gopher_stop_words, clean.dup_lines, clean.dup_paragraphs,
             clean.top_ngram, clean.dup_ngram, clean.fineweb_line_punct, clean.fineweb_short_lines]
    keep = []
    for i in range(0, len(docs), a.chunk_docs):   # per shard, as in the pipeline
        texts = [d["text"] for d in docs[i: i + a.chunk_docs]]
        ids, lens, doc, _ = clean.shard_tokens(texts)
        rep = clean.repetition_batch(ids, lens, doc, len(texts))
        for k, t in enumerate(texts):
            d = clean.Doc(t, "en", None, rep[k])
            keep.append(not any(r(d, a) for r in rules))
    return keep


def datatrove_shared_rules(docs):
    from datatrove.data import Document
    from datatrove.pipeline.filters import FineWebQualityFilter, GopherQualityFilter, GopherRepetitionFilter
    filters = [GopherQualityFilter(), GopherRepetitionFilter(), FineWebQualityFilter(char_duplicates_ratio=1.0)]
    keep = []
    for d in docs:   # every filter on every document, like ours (a pipeline would stop at the first rejection)
        doc = Document(text=d["text"], id=d["id"])
        keep.append(all(f.filter(doc) is True for f in filters))
    return keep


def timed(fn, *args):
    c, w = time.process_time(), time.perf_counter()
    out = fn(*args)
    return out, time.process_time() - c, time.perf_counter() - w


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--workers", type=int, default=1, help="also time the pipeline with this many worker processes")
    p.add_argument("--chunk-docs", type=int, default=2000)
    b = p.parse_args()
    docs = corpus(Path(b.data))
    mb = sum(len(d["text"].encode()) for d in docs) / 1e6
    a = clean.get_args(["--input", "x", "--out", "y", "--chunk-docs", str(b.chunk_docs)])
    langs = Counter(clean.route_lang(d["text"], a) for d in docs)
    print(f"corpus: {len(docs)} documents, {mb:.2f} MB UTF-8, routed {dict(langs)}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "corpus.jsonl"
        src.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
        rep, cpu, wall = timed(clean.main, ["--input", str(src), "--out", f"{tmp}/o1", "--workers", "1", "--chunk-docs", str(b.chunk_docs)])
        rows.append(("clean.py full pipeline, 1 process", len(docs), mb, cpu, wall))
        steps = rep["time_per_step"]
        if b.workers > 1:
            _, _, wall2 = timed(clean.main, ["--input", str(src), "--out", f"{tmp}/o2", "--workers", str(b.workers), "--chunk-docs", str(b.chunk_docs)])
            rows.append((f"clean.py full pipeline, {b.workers} workers (wall only)", len(docs), mb, None, wall2))
    clean.setup(a)
    ours, cpu, wall = timed(ours_shared_rules, docs, a)
    rows.append(("clean.py shared rules (Gopher quality+repetition, FineWeb)", len(docs), mb, cpu, wall))
    try:
        import datatrove  # noqa: F401
        have_dt = True
    except ImportError:
        have_dt = False
    if have_dt:
        theirs, cpu, wall = timed(datatrove_shared_rules, docs)
        from importlib.metadata import version
        rows.append((f"datatrove {version('datatrove')}, same rules", len(docs), mb, cpu, wall))
    print(f"\n| run | docs | MB | cpu s | wall s | docs/s per core | MB/s per core |\n|---|---:|---:|---:|---:|---:|---:|")
    for name, n, m, c, w in rows:
        if c:
            print(f"| {name} | {n} | {m:.2f} | {c:.2f} | {w:.2f} | {n / c:,.0f} | {m / c:.2f} |")
        else:
            print(f"| {name} | {n} | {m:.2f} | - | {w:.2f} | {n / w:,.0f} (all cores, wall) | {m / w:.2f} (all cores, wall) |")
    print("\nclean.py steps (cpu s, docs/s per core):", ", ".join(f"{k} {v['cpu_seconds']:.2f}s {v['docs_per_s']:,.0f}/s" for k, v in steps.items()))
    if have_dt:
        agree = sum(x == y for x, y in zip(ours, theirs)) / len(docs)
        print(f"speed-up over datatrove on the shared rules: {rows[-1][3] / rows[-2][3]:.1f}x; same keep/reject decision on {agree:.1%} of documents "
              f"(kept: ours {sum(ours)}, datatrove {sum(theirs)})")
    else:
        print("datatrove is not installed: no side-by-side (pip install datatrove spacy, in a separate environment)")


if __name__ == "__main__":
    main()
