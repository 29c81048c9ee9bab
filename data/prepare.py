"""
Tokenize a text corpus into flat token memmaps for pretraining (train.bin / val.bin / meta.json).

Usage (a CPU job: no torchrun; --workers processes tokenize in parallel):
    python data/prepare.py --input /work/shared/data/pretrain --out out/pretrain --workers 2
    python data/prepare.py --input 'wudao/*.jsonl.gz' --fields title,content --out out/wudao \\
        --tokenizer tokenizer/lab.model --workers 8 --val_fraction 0.005
Training scripts read the result with
    from data import load_tokens
    train = load_tokens("out/pretrain", "train", tokenizer)   # np.memmap of token ids

Inputs: files, globs or directories (searched recursively for .jsonl/.json/.txt, optionally .gz;
gzip is detected by its magic bytes). JSONL records give one document each: --fields auto takes
"text" (Pile, C4, TinyStories...), else WuDao's "title" + "\\n" + "content", else "content";
--fields title,content (any comma list) joins the listed string fields with "\\n". Plain text
files are cut into documents by --text_unit: "paragraph" (blank-line separated, the default),
"line", or "file" (whole file = one document; the file is then held in memory).

Output format (DIR/):
    train.bin, val.bin   flat arrays of token ids, dtype uint16 if every id fits (vocab_size <=
                         65536) else uint32, little-endian, no header: np.memmap(path, dtype).
                         Each document is laid out as  BOS doc_tokens EOS  (see below), documents
                         back to back in shuffled order.
    meta.json            written LAST: tokenizer_path, tokenizer_sha256, vocab_size, dtype,
                         bos_id, eos_id, bos_per_doc, {train,val}_{tokens,docs}, sources (per-file
                         lines/docs/skipped), skipped count with file:line examples, seed,
                         val_fraction, ... A directory without meta.json is not a dataset.

Why BOS at each document start as well as EOS at its end: chat.py, sft.py and the HF export all
start a sequence with BOS, so pretraining on BOS-led documents means the model has seen that
token in the position it will meet at inference (and it gives attention a fixed "sink" at each
document start). EOS teaches where documents end. Cost: 2 tokens per document. --no_bos drops BOS.

Split and shuffle without holding the corpus in memory (the choice, explained):
  * Split: a document goes to val iff  blake2b(seed, text) / 2^64 < val_fraction. A stable hash
    of the CONTENT (not the index) means the split does not depend on input order or worker
    count, and exact duplicates always land on the same side (no train/val leakage through
    copies). The val fraction is then binomial, not exact; if it comes out 0 with val_fraction > 0,
    one document is moved to val so that val.bin is never empty.
  * Shuffle: a two-pass external shuffle. Pass 1 scatters each tokenized document into one of
    K buckets on disk (bucket = another slice of the same hash): each worker appends the ids to
    its own file for that bucket, and the main process writes the bucket's index (length, val
    flag, which file, offset) in input order, so the result does not depend on which worker did
    what. Pass 2 takes one bucket at a time, permutes its documents with a seeded RNG and appends
    them to train.bin / val.bin. Random bucket assignment + a uniform shuffle inside each bucket
    is a uniform shuffle of the whole corpus. Pass 2 reads the documents back with os.pread from
    the just-written bucket files (served by the page cache, which is not process memory), so RAM
    holds only the bucket's index (~30 bytes a document); K is chosen from the input size so a
    bucket is ~--shuffle_mb on disk (at most 256 buckets), which keeps those reads inside the page
    cache. A bounded "shuffle
    buffer" would be simpler but only shuffles locally: a corpus given as zh files then en files
    would still train on all Chinese first.
Memory: pass 1 keeps only a bounded number of chunks in flight (see _imap_bounded: a plain
Pool.imap reads its whole input ahead and would grow with the corpus); ids are written to disk as
they are made. So peak RSS depends on --chunk_kb and --workers, not on corpus size (apart from the
~30-byte-per-document index of one bucket: ~2 MB for a 64 MB bucket of 1 KB documents).
Speed: the work is sentencepiece's encode; everything else is kept off the per-token and
per-line Python paths (see encode_chunk, iter_line_blocks): bench/prepare.py compares it with a
plain one-process encode loop.
Atomic: everything is written to *.tmp names and a scratch directory first; only at the end is
an existing meta.json removed, the .bin files renamed into place (os.replace) and meta.json
written (tmp + rename). A crash at any point leaves either the previous complete dataset or a
directory without meta.json, which load_tokens refuses.
"""
import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from collections import deque
from multiprocessing import Pool

import numpy as np

if __package__ in (None, ""):  # run as a script (python data/prepare.py): make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data.formats import expand_inputs, iter_lines, open_binary  # noqa: E402

FORMAT = "nanollama.pretrain.v1"
# per-document record in a bucket's index file: length in tokens, val flag, and where its ids are:
# the pid of the worker that wrote them (file b<bucket>.<pid>.ids) and the token offset in that file
DOC = np.dtype([("len", "<i8"), ("val", "u1"), ("pid", "<i4"), ("off", "<i8")])
MAX_BUCKETS = 256


def token_dtype(vocab_size):
    """uint16 when every id (0..vocab_size-1) fits in 16 bits, else uint32."""
    return "uint16" if vocab_size <= 2 ** 16 else "uint32"


def load_tokenizer(tokenizer):
    """A Tokenizer object passes through; a path (or None = the shipped default) is loaded."""
    if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
        from tokenizer import Tokenizer
        return Tokenizer(None if tokenizer is None else str(tokenizer))
    return tokenizer


# -----------------------------------------------------------------------------
# Reading and checking a prepared directory (used by every training script)


def read_meta(data_dir, expect_format=FORMAT):
    """meta.json of a prepared directory, with clear errors for the usual mistakes."""
    data_dir = str(data_dir)
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"dataset directory {data_dir!r} does not exist (prepare it with data/prepare.py "
                                f"or data/sft_prepare.py)")
    meta_path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"{data_dir!r} has no meta.json: not a prepared dataset, or its preparation did not "
                                f"finish (meta.json is written last); re-run the prepare script")
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    if meta.get("format") != expect_format:
        raise ValueError(f"{data_dir!r} holds a {meta.get('format')!r} dataset, expected {expect_format!r}")
    return meta


def check_tokenizer(meta, tokenizer, data_dir):
    """Refuse a dataset tokenized with another tokenizer: ids would silently mean different pieces."""
    if tokenizer is None:  # explicit opt-out, for inspection tools only
        return
    tok = load_tokenizer(tokenizer)
    mine = f"{tok.path} (sha256 {tok.sha256[:16]}..., vocab_size {tok.vocab_size})"
    theirs = (f"{meta.get('tokenizer_path')} (sha256 {str(meta.get('tokenizer_sha256'))[:16]}..., "
              f"vocab_size {meta.get('vocab_size')})")
    if meta.get("tokenizer_sha256") != tok.sha256 or meta.get("vocab_size") != tok.vocab_size:
        raise ValueError(f"tokenizer mismatch: dataset {data_dir!r} was tokenized with {theirs}, but the tokenizer "
                         f"in use is {mine}. Re-prepare the data with this tokenizer, or use that one.")
    dtype = meta.get("dtype")
    if dtype not in ("uint16", "uint32") or np.iinfo(dtype).max < tok.vocab_size - 1:
        raise ValueError(f"dataset {data_dir!r} stores ids as {dtype!r}, which cannot hold the ids of the tokenizer "
                         f"in use {mine} (needs {token_dtype(tok.vocab_size)}); dataset tokenizer: {theirs}")


def open_array(path, dtype, count, what):
    """np.memmap of a flat file after checking its size against the count in meta.json."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing ({what})")
    size, itemsize = os.path.getsize(path), np.dtype(dtype).itemsize
    if size != count * itemsize:
        raise ValueError(f"{path} has {size} bytes but meta.json says {count} x {dtype} = {count * itemsize}: "
                         f"truncated or from another run; re-run the prepare script")
    if count == 0:
        raise ValueError(f"{path} is empty ({what} has 0 items)")
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))


def load_tokens(data_dir, split, tokenizer):
    """The token ids of `split` ("train" or "val") of a prepared directory, as a read-only np.memmap.

    `tokenizer` is the Tokenizer in use (or a model path); a dataset made with another tokenizer
    (sha256 or vocab size differ) or with a dtype that cannot hold its ids is refused, naming both."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    meta = read_meta(data_dir)
    check_tokenizer(meta, tokenizer, data_dir)
    path = os.path.join(str(data_dir), f"{split}.bin")
    return open_array(path, meta["dtype"], meta[f"{split}_tokens"], f"split {split!r} of {data_dir}")


# -----------------------------------------------------------------------------
# Workers: parse + tokenize one chunk of documents

_W = {}  # per-process worker state, set once per process, not per chunk


def _init_worker(tokenizer, cfg):
    # The Tokenizer object itself is passed: a forked worker inherits the parent's copy (no reload),
    # a spawned one (macOS, Windows) receives it pickled (sentencepiece models pickle as their proto).
    _W["tok"] = load_tokenizer(tokenizer)
    _W.update(cfg)
    _W["files"] = {}  # bucket -> (this process's bucket file, tokens written to it so far)


def doc_text(obj, fields):
    """The document text of one JSON record, or raise ValueError(reason)."""
    if not isinstance(obj, dict):
        raise ValueError(f"not a JSON object (got {type(obj).__name__})")
    if fields == "auto":
        if "text" in obj:
            fields = ["text"]
        elif "content" in obj:
            fields = ["title", "content"]  # WuDao: {"title", "content", ...}
        else:
            raise ValueError(f"no 'text' or 'content' field (keys: {sorted(obj)[:8]}); use --fields")
    parts = []
    for name in fields:
        value = obj.get(name)
        if value is None:
            continue
        if not isinstance(value, str):
            raise ValueError(f"field {name!r} is not a string (got {type(value).__name__})")
        if value.strip():
            parts.append(value)
    if not parts and not any(name in obj for name in fields):
        raise ValueError(f"none of the fields {fields} present (keys: {sorted(obj)[:8]})")
    return "\n".join(parts)


def doc_digests(texts, seed):
    """blake2b(text, salt=seed), 16 bytes per document, concatenated. The first 8 bytes (little-endian
    uint64) / 2^64 < val_fraction puts a document in val; the last 8, mod the bucket count, pick its
    shuffle bucket (see the module docstring)."""
    base = hashlib.blake2b(digest_size=16, salt=seed.to_bytes(8, "little"))
    out = []
    for text in texts:
        h = base.copy()  # cheaper than a new salted hasher per document
        h.update(text.encode("utf-8", "surrogatepass"))
        out.append(h.digest())
    return b"".join(out)


def block_lines(block, first_lineno):
    """(lineno, line) for each non-blank line of a block of whole lines (line ends removed)."""
    return [(n, line.rstrip(b"\r")) for n, line in enumerate(block.split(b"\n"), first_lineno) if line.strip()]


def encode_chunk(chunk):
    """Tokenize one chunk: (file_index, kind, first_lineno, data) where data is either a block of
    whole lines (bytes: JSONL, or text with --text_unit line; split into lines here, so that the
    main process never loops over lines) or a list of (lineno, document bytes).

    Appends each document's ids, laid out BOS doc EOS, to this process's file for its bucket and
    returns per bucket the documents' index records (see DOC), plus counts and the skipped lines
    with their reasons. Per-document work is kept to a few C-level calls: whatever Python does
    here is paid on top of sentencepiece's own encode time (the benchmark's baseline)."""
    file_index, kind, first_lineno, data = chunk
    items = block_lines(data, first_lineno) if isinstance(data, bytes) else data
    tok, fields = _W["tok"], _W["fields"]
    texts, skipped, empty = [], [], 0
    for lineno, payload in items:
        try:
            if kind == "jsonl":
                text = doc_text(json.loads(payload), fields)
            else:
                text = payload.decode("utf-8")
        except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            skipped.append((lineno, f"{type(e).__name__}: {str(e)[:100]}"))
            continue
        if not text.strip():
            empty += 1
            continue
        texts.append(text)
    # sentencepiece adds BOS/EOS itself. num_threads=1: the pool already keeps every core busy (the
    # default, -1, starts a thread per core in each worker, which would only contend).
    sp, bos = tok.sp, _W["bos"]
    if not texts:
        arrays = []
    elif hasattr(sp, "encode_as_numpy"):  # recent sentencepiece: int32 arrays straight from C++
        arrays = sp.encode_as_numpy(texts, add_bos=bos, add_eos=True, num_threads=1)
    else:  # older versions return lists of Python ints, converted here
        arrays = [np.array(ids, dtype=np.int32) for ids in sp.encode(texts, add_bos=bos, add_eos=True, num_threads=1)]
    # Why arrays: a list of Python ints costs ~10-15 ns a token to create and as much again to
    # convert to a flat array, more than everything else here put together; numpy output skips both.
    # Split and bucket for the whole chunk at once: the digests read as uint64 pairs by numpy
    # (uint64 -> float64 is correctly rounded and / 2**64 exact: the same split as Python's int / 2**64).
    keys = np.frombuffer(doc_digests(texts, _W["seed"]), dtype="<u8").reshape(-1, 2)
    bucket = keys[:, 1] % _W["n_buckets"]
    recs = np.empty(len(texts), dtype=DOC)
    recs["len"] = [len(a) for a in arrays]
    recs["val"] = keys[:, 0] / 2 ** 64 < _W["val_fraction"]
    recs["pid"] = os.getpid()
    # The worker writes the ids itself and returns only the index records: the main process never
    # handles token ids (sending them back through the pool's pipe took about a third of its CPU).
    groups = []  # (bucket, index records of its documents in input order)
    for b in np.unique(bucket).tolist():
        members = np.flatnonzero(bucket == b)
        if b not in _W["files"]:  # unbuffered: a pool worker ends with os._exit, which flushes nothing
            _W["files"][b] = [open(os.path.join(_W["scratch"], f"b{b:03d}.{os.getpid()}.ids"), "wb", buffering=0), 0]
        f = _W["files"][b]
        ids = np.concatenate([arrays[i] for i in members]).astype(_W["dtype"])
        f[0].write(ids)
        recs["off"][members] = f[1] + np.cumsum(recs["len"][members]) - recs["len"][members]
        f[1] += len(ids)
        groups.append((b, recs[members]))
    return {"file_index": file_index, "records": len(items), "groups": groups, "docs": len(texts),
            "val_docs": int(recs["val"].sum()), "tokens": int(recs["len"].sum()), "skipped": skipped, "empty": empty}


# -----------------------------------------------------------------------------
# Main process: read files into chunks, run the pool with bounded read-ahead


def file_kind(path, fmt):
    if fmt != "auto":
        return fmt
    name = path[:-3] if path.endswith(".gz") else path
    return "jsonl" if name.endswith((".jsonl", ".json")) else "text"


def iter_documents(path, text_unit):
    """Yield (lineno, payload bytes) of a text file cut into paragraphs or one whole-file document."""
    para, start = [], 0
    for lineno, line in iter_lines(path):
        if lineno == 1:
            line = line.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 BOM is not text (Botchan starts with one)
        if line.strip() or text_unit == "file":
            para.append(line)
            start = start or lineno
        elif para:
            yield start, b"\n".join(para)
            para, start = [], 0
    if para:
        yield start, b"\n".join(para).rstrip(b"\n") if text_unit == "file" else b"\n".join(para)


def iter_line_blocks(path, chunk_bytes):
    """Yield (first_lineno, block): the file in blocks of ~chunk_bytes that end at a line end (b"\\n"),
    so that the main process does a few calls per block, not per line; the worker splits it."""
    lineno, pending = 1, []
    with open_binary(path) as f:
        while data := f.read(chunk_bytes):
            cut = data.rfind(b"\n") + 1
            if cut == 0:  # still inside a line longer than a chunk
                pending.append(data)
                continue
            block = b"".join(pending + [data[:cut]])
            pending = [data[cut:]]
            yield lineno, block
            lineno += block.count(b"\n")
    tail = b"".join(pending)
    if tail:  # last line without a final newline
        yield lineno, tail


def iter_chunks(files, fmt, text_unit, chunk_bytes):
    """Yield the pool's tasks: (file_index, kind, first_lineno, block of lines) for line-per-document
    inputs, (file_index, kind, None, [(lineno, document), ...]) for paragraph/file text units."""
    for file_index, path in enumerate(files):
        kind = file_kind(path, fmt)
        if kind == "jsonl" or text_unit == "line":
            for lineno, block in iter_line_blocks(path, chunk_bytes):
                if lineno == 1:
                    block = block.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 BOM is not text
                    if kind == "jsonl" and block.split(b"\n", 1)[0].lstrip().startswith(b"["):
                        raise ValueError(f"{path} is a JSON array, not JSON Lines: convert it (one object per line)")
                yield file_index, kind, lineno, block
            continue
        items, size = [], 0
        for lineno, payload in iter_documents(path, text_unit):
            items.append((lineno, payload))
            size += len(payload)
            if size >= chunk_bytes:
                yield file_index, kind, None, items
                items, size = [], 0
        if items:
            yield file_index, kind, None, items


def _imap_bounded(pool, fn, iterable, max_in_flight):
    """Ordered map over a pool with at most max_in_flight tasks submitted but not yet consumed.

    Why not pool.imap: its feeder thread consumes the whole input iterator as fast as it can, so
    on a corpus that reads faster than it tokenizes, every chunk ends up queued in RAM."""
    if pool is None:  # --workers 0/1: same code path, in this process
        for item in iterable:
            yield fn(item)
        return
    pending = deque()
    for item in iterable:
        pending.append(pool.apply_async(fn, (item,)))
        if len(pending) >= max_in_flight:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def _n_buckets(files, itemsize, shuffle_mb):
    """Buckets so one holds ~shuffle_mb of ids, estimated from input bytes (gz counted x4,
    ~2 bytes of text per token: an overestimate for most text, which only makes buckets smaller)."""
    raw = sum(os.path.getsize(p) * (4 if p.endswith(".gz") else 1) for p in files)
    est = raw / 2 * itemsize
    return int(min(MAX_BUCKETS, max(1, -(-est // (shuffle_mb * 2 ** 20)))))


def commit_outputs(out_dir, names, meta):
    """The end of a prepare script: move each finished out_dir/NAME.tmp to NAME, then write meta.json
    (tmp + rename). The old meta.json goes first and the new one last, so a directory with meta.json
    is always complete: a crash in between leaves one without it, which the readers refuse."""
    meta_path = os.path.join(out_dir, "meta.json")
    if os.path.exists(meta_path):
        os.remove(meta_path)
    for name in names:
        os.replace(os.path.join(out_dir, name + ".tmp"), os.path.join(out_dir, name))
    with open(meta_path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1, ensure_ascii=False)
    os.replace(meta_path + ".tmp", meta_path)


def prepare(inputs, out_dir, tokenizer=None, *, fields="auto", fmt="auto", text_unit="paragraph", workers=2,
            val_fraction=0.01, seed=1337, shuffle=True, bos=True, shuffle_mb=64.0, chunk_kb=256, verbose=True):
    """Tokenize `inputs` into out_dir/{train.bin,val.bin,meta.json}. Returns the meta dict."""
    t0 = time.time()
    files = expand_inputs(inputs)
    tok = load_tokenizer(tokenizer)
    dtype = token_dtype(tok.vocab_size)
    if isinstance(fields, str) and fields != "auto":
        fields = [f.strip() for f in fields.split(",") if f.strip()]
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_buckets = _n_buckets(files, np.dtype(dtype).itemsize, shuffle_mb) if shuffle else 1
    os.makedirs(out_dir, exist_ok=True)
    scratch = os.path.join(out_dir, f".prepare-tmp-{os.getpid()}")
    os.makedirs(scratch, exist_ok=True)
    cfg = {"fields": fields, "seed": seed, "val_fraction": val_fraction, "n_buckets": n_buckets,
           "dtype": dtype, "bos": bos, "scratch": scratch}
    stats = [{"path": p, "records": 0, "docs": 0, "skipped": 0, "empty": 0} for p in files]
    skipped_examples, n_val_docs = [], 0
    log = print if verbose else (lambda *a, **k: None)
    pool = None
    try:
        # ---- pass 1: tokenize (in parallel) and scatter documents into bucket files
        if workers > 1:  # start the workers before opening any output file (forked children inherit them)
            pool = Pool(workers, initializer=_init_worker, initargs=(tok, cfg))  # forked: no reload
        else:
            _init_worker(tok, cfg)
        idx_files = [open(os.path.join(scratch, f"b{b:03d}.idx"), "wb") for b in range(n_buckets)]
        chunks = iter_chunks(files, fmt, text_unit, chunk_kb * 1024)
        n_tok, last = 0, time.time()
        for res in _imap_bounded(pool, encode_chunk, chunks, max_in_flight=4 * max(workers, 1)):
            st = stats[res["file_index"]]
            for lineno, reason in res["skipped"]:
                if len(skipped_examples) < 20:
                    skipped_examples.append(f"{st['path']}:{lineno}: {reason}")
            st["records"] += res["records"]
            st["docs"] += res["docs"]
            st["empty"] += res["empty"]
            st["skipped"] += len(res["skipped"])
            n_val_docs += res["val_docs"]
            for b, recs in res["groups"]:  # the index is written here, in input order
                idx_files[b].write(recs)
            n_tok += res["tokens"]
            if verbose and time.time() - last > 10:
                last = time.time()
                log(f"  {sum(s['docs'] for s in stats):,} docs, {n_tok:,} tokens, "
                    f"{n_tok / (last - t0):,.0f} tok/s", file=sys.stderr)
        if pool is not None:
            pool.close()
            pool.join()
            pool = None
        for f in idx_files:
            f.close()
        for f, _ in _W.pop("files", {}).values():  # bucket files of an in-process run (--workers <= 1)
            f.close()
        for st in stats:
            if st["records"] and not st["docs"] and st["skipped"]:
                first = [e for e in skipped_examples if e.startswith(st["path"] + ":")][:3]
                raise ValueError(f"{st['path']}: every line failed ({st['skipped']} skipped), wrong --fields or "
                                 f"format? first reasons: {first}")
        n_docs = sum(st["docs"] for st in stats)
        if n_docs == 0:
            raise ValueError(f"no documents found in {files}")
        force_val = val_fraction > 0 and n_val_docs == 0 and n_docs >= 2

        # ---- pass 2: shuffle each bucket in memory and append it to train.bin / val.bin
        counts = {"train_tokens": 0, "val_tokens": 0, "train_docs": 0, "val_docs": 0}
        outs = {s: open(os.path.join(out_dir, f"{s}.bin.tmp"), "wb", buffering=1 << 20) for s in ("train", "val")}
        itemsize = np.dtype(dtype).itemsize
        for b in range(n_buckets):
            recs = np.fromfile(os.path.join(scratch, f"b{b:03d}.idx"), dtype=DOC)
            order = np.random.default_rng([seed, b]).permutation(len(recs)) if shuffle else np.arange(len(recs))
            is_val = recs["val"].astype(bool)
            if force_val and (~is_val).any():
                is_val[order[~is_val[order]][0]] = True  # the first train doc of this bucket goes to val
                force_val = False
            for split, sel in (("train", ~is_val), ("val", is_val)):
                counts[f"{split}_tokens"] += int(recs["len"][sel].sum())
                counts[f"{split}_docs"] += int(sel.sum())
            # Documents are read back one by one with pread rather than loading the bucket: the bucket
            # file was just written, so it sits in the page cache (which is not our RSS), and RAM then
            # holds only this bucket's index (~30 bytes a document as numpy arrays), whatever its size.
            write = (outs["train"].write, outs["val"].write)  # indexed by is_val
            paths = {pid: os.path.join(scratch, f"b{b:03d}.{pid}.ids") for pid in np.unique(recs["pid"]).tolist()}
            fds = {pid: os.open(path, os.O_RDONLY) for pid, path in paths.items()}
            try:
                for j in range(0, len(order), 1 << 13):  # Python ints for one small slice at a time
                    sl = order[j:j + (1 << 13)]
                    r = recs[sl]
                    for pid, n, offset, v in zip(r["pid"].tolist(), (r["len"] * itemsize).tolist(),
                                                 (r["off"] * itemsize).tolist(), is_val[sl].tolist()):
                        write[v](os.pread(fds[pid], n, offset))
            finally:
                for fd in fds.values():
                    os.close(fd)
            for path in paths.values():
                os.remove(path)  # free the disk as we go
        for f in outs.values():
            f.close()

        meta = {
            "format": FORMAT,
            "tokenizer_path": tok.path, "tokenizer_sha256": tok.sha256, "vocab_size": tok.vocab_size,
            "dtype": dtype, "bos_id": tok.bos_id, "eos_id": tok.eos_id, "bos_per_doc": bos,
            **counts,
            "empty_docs": sum(st["empty"] for st in stats),
            "skipped": sum(st["skipped"] for st in stats), "skipped_examples": skipped_examples,
            "sources": stats,
            "fields": fields, "text_unit": text_unit, "seed": seed, "val_fraction": val_fraction,
            "shuffle": shuffle, "n_buckets": n_buckets,
            "seconds": round(time.time() - t0, 2),
        }
        commit_outputs(out_dir, ("train.bin", "val.bin"), meta)
    finally:
        if pool is not None:
            pool.terminate()
        for f, _ in _W.pop("files", {}).values():  # an in-process run that failed
            f.close()
        shutil.rmtree(scratch, ignore_errors=True)
        for name in ("train.bin.tmp", "val.bin.tmp", "meta.json.tmp"):  # left only by a failure
            if os.path.exists(os.path.join(out_dir, name)):
                os.remove(os.path.join(out_dir, name))
    log(f"{out_dir}: train {counts['train_tokens']:,} tokens / {counts['train_docs']:,} docs, "
        f"val {counts['val_tokens']:,} tokens / {counts['val_docs']:,} docs, {dtype}, "
        f"{meta['skipped']} lines skipped, {meta['empty_docs']} empty docs, {meta['seconds']:.1f}s "
        f"({(counts['train_tokens'] + counts['val_tokens']) / max(meta['seconds'], 1e-9):,.0f} tok/s)")
    for ex in skipped_examples[:5]:
        log(f"  skipped {ex}")
    return meta


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="files, globs or directories (.jsonl/.json/.txt[.gz])")
    p.add_argument("--out", required=True, help="output directory (train.bin, val.bin, meta.json)")
    p.add_argument("--tokenizer", default=None, help="sentencepiece .model (default: the shipped tokenizer/lab.model)")
    p.add_argument("--fields", default="auto", help="JSON fields joined by newline, e.g. 'title,content'; "
                   "auto = text, else title+content")
    p.add_argument("--format", default="auto", choices=["auto", "jsonl", "text"], help="input format (auto: by suffix)")
    p.add_argument("--text_unit", default="paragraph", choices=["paragraph", "line", "file"],
                   help="document unit of plain-text files")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="tokenizer processes (<=1: in-process)")
    p.add_argument("--val_fraction", type=float, default=0.01, help="fraction of documents held out (by content hash)")
    p.add_argument("--seed", type=int, default=1337, help="seed of the split and the shuffle")
    p.add_argument("--no_shuffle", action="store_true", help="keep the input document order")
    p.add_argument("--no_bos", action="store_true", help="do not put BOS before each document (EOS is always put after)")
    p.add_argument("--shuffle_mb", type=float, default=64.0,
                   help="~size of one shuffle bucket on disk (read back from the page cache in pass 2)")
    p.add_argument("--chunk_kb", type=int, default=256, help="text per task sent to a worker")
    args = p.parse_args(argv)
    prepare(args.input, args.out, args.tokenizer, fields=args.fields, fmt=args.format, text_unit=args.text_unit,
            workers=args.workers, val_fraction=args.val_fraction, seed=args.seed, shuffle=not args.no_shuffle,
            bos=not args.no_bos, shuffle_mb=args.shuffle_mb, chunk_kb=args.chunk_kb)


if __name__ == "__main__":
    main()
