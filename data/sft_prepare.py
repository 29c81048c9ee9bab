"""
Pre-tokenise SFT conversations into memmaps (ids + loss mask + offsets), for sets too large for RAM.

Usage (a CPU job: no torchrun; --workers processes render conversations in parallel):
    python data/sft_prepare.py --input /work/shared/data/sft/zh_oasst1_chat.jsonl.gz \\
        'lab/sft_train.jsonl:2' --out out/sft --tokenizer tokenizer/lab.model --max_len 512 --workers 2
Training scripts read it with
    from data import SFTDataset
    ds = SFTDataset("out/sft", tokenizer)     # refuses a dataset made with another tokenizer
    ids, mask = ds[i]                          # np.int64 ids, np.uint8 mask of conversation i
    ds.lengths                                 # tokens per conversation (for length-grouped batches)

Inputs: any conversation format data/formats.py reads (messages, ShareGPT, the seed's "data",
Alpaca, prompt/response), JSONL or .json arrays, gzip accepted, "path:weight" for mixing (weight =
copies per epoch, see data/formats.py). Invalid or malformed records are skipped and reported
(file:line + reason in meta.json), never trained on. Conversations are kept in input order, with
weighted copies next to each other: sft.py shuffles (and groups by length) at sampling time.

Output format (DIR/):
    ids.bin      all conversations' token ids back to back, Tokenizer.render_conversation(messages)
                 ids; dtype uint16 if vocab_size <= 65536 else uint32 (meta "dtype")
    mask.bin     uint8, same length: 1 where the token is a training target (assistant content and
                 its end marker), the render_conversation mask
    offsets.npy  int64, n+1 entries: conversation i is [offsets[i], offsets[i+1]); offsets[0] = 0,
                 offsets[n] = total tokens (np.load(..., mmap_mode="r"))
    meta.json    written LAST: format "nanollama.sft.v1", tokenizer_path, tokenizer_sha256,
                 vocab_size, dtype, bos_id, eos_id, n_examples, n_tokens, n_loss_tokens, max_len,
                 truncated, dropped (+ examples), skipped (malformed/invalid, + file:line examples),
                 sources (per-file records/skipped/weight)

Long conversations (--max_len N, counted in rendered tokens): --overflow truncate (default) keeps
the longest run of LEADING whole turns that fits and ends on an assistant turn (rendered again as
that shorter conversation, so it is exactly render_conversation(messages[:k])); a conversation
whose first exchange alone does not fit is dropped. --overflow drop drops every conversation that
does not fit. Both are counted in meta.json; a turn is never cut in the middle.

Memory: conversations stream from the readers into a pool with bounded read-ahead; ids, mask and
per-conversation lengths are appended to files as results arrive; offsets.npy is built from the
lengths file at the end in fixed-size blocks. Atomic like data/prepare.py: *.tmp files first,
meta.json last, so a directory with meta.json is complete.
"""
import argparse
import os
import sys
import time
from multiprocessing import Pool

import numpy as np

if __package__ in (None, ""):  # run as a script (python data/sft_prepare.py): make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data.formats import Report, iter_conversations  # noqa: E402
from data.prepare import (_imap_bounded, check_tokenizer, commit_outputs, load_tokenizer, open_array,  # noqa: E402
                          read_meta, token_dtype)

FORMAT = "nanollama.sft.v1"


# -----------------------------------------------------------------------------
# Reader


class SFTDataset:
    """Random access to a pre-tokenised SFT directory without loading it: ds[i] -> (ids, mask)."""

    def __init__(self, data_dir, tokenizer):
        self.dir = str(data_dir)
        self.meta = read_meta(self.dir, FORMAT)
        check_tokenizer(self.meta, tokenizer, self.dir)
        n, total = self.meta["n_examples"], self.meta["n_tokens"]
        self.ids = open_array(os.path.join(self.dir, "ids.bin"), self.meta["dtype"], total, "SFT ids")
        self.mask = open_array(os.path.join(self.dir, "mask.bin"), "uint8", total, "SFT loss mask")
        path = os.path.join(self.dir, "offsets.npy")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing")
        self.offsets = np.load(path, mmap_mode="r")
        if self.offsets.shape != (n + 1,) or self.offsets[0] != 0 or self.offsets[-1] != total:
            raise ValueError(f"{path} does not match meta.json (shape {self.offsets.shape}, expected ({n + 1},) "
                             f"from 0 to {total}): re-run data/sft_prepare.py")

    def __len__(self):
        return len(self.offsets) - 1

    def __getitem__(self, i):
        if not -len(self) <= i < len(self):
            raise IndexError(f"example {i} out of range [0, {len(self)})")
        i = i % len(self)
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        return np.array(self.ids[start:end], dtype=np.int64), np.array(self.mask[start:end], dtype=np.uint8)

    @property
    def lengths(self):
        """Tokens per conversation (np.int64 array), e.g. for length-grouped sampling."""
        return np.diff(self.offsets)

    def split_indices(self, val_fraction, seed=0):
        """(train_idx, val_idx): a seeded random hold-out of whole conversations."""
        order = np.random.default_rng(seed).permutation(len(self))
        n_val = int(round(len(self) * val_fraction))
        return np.sort(order[n_val:]), np.sort(order[:n_val])


# -----------------------------------------------------------------------------
# Rendering with turn-boundary truncation (runs in the workers)

_W = {}


def _init_worker(tokenizer_path, cfg):
    _W["tok"] = load_tokenizer(tokenizer_path)
    _W.update(cfg)


def render_fitting(tok, messages, max_len, overflow="truncate"):
    """(ids, mask, status) with status "ok", "truncated" or "dropped" (ids/mask None when dropped).

    Truncation keeps whole leading turns: the longest prefix messages[:k] that ends on an assistant
    turn and renders to at most max_len tokens. Each candidate prefix is rendered on its own (never a
    slice of the full rendering), so the result is exactly what render_conversation gives for it."""
    ids, mask = tok.render_conversation(messages)
    if max_len is None or len(ids) <= max_len:
        return ids, mask, "ok"
    if overflow == "truncate":
        ends = [k for k in range(len(messages) - 1, 0, -1) if messages[k - 1]["role"] == "assistant"]
        for k in ends:  # longest first
            ids, mask = tok.render_conversation(messages[:k])
            if len(ids) <= max_len:
                return ids, mask, "truncated"
    return None, None, "dropped"


def render_chunk(chunk):
    tok = _W["tok"]
    ids, mask, lens, dropped, truncated = [], [], [], [], 0
    for where, messages in chunk:
        i, m, status = render_fitting(tok, messages, _W["max_len"], _W["overflow"])
        if status == "dropped":
            dropped.append(where)
            continue
        truncated += status == "truncated"
        ids += i
        mask += m
        lens.append(len(i))
    return {"ids": np.array(ids, dtype=_W["dtype"]), "mask": np.array(mask, dtype=np.uint8),
            "lens": np.array(lens, dtype=np.int64), "dropped": dropped, "truncated": truncated}


def _chunks(conversations, size):
    chunk = []
    for item in conversations:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# -----------------------------------------------------------------------------
# Writer


def sft_prepare(inputs, out_dir, tokenizer=None, *, max_len=None, overflow="truncate", workers=2, seed=0,
                chunk_size=256, verbose=True):
    """Render the conversations of `inputs` into out_dir/{ids.bin,mask.bin,offsets.npy,meta.json}. Returns meta."""
    t0 = time.time()
    tok = load_tokenizer(tokenizer)
    dtype = token_dtype(tok.vocab_size)
    if overflow not in ("truncate", "drop"):
        raise ValueError(f"overflow must be 'truncate' or 'drop', got {overflow!r}")
    os.makedirs(out_dir, exist_ok=True)
    tmp = {name: os.path.join(out_dir, name + ".tmp") for name in ("ids.bin", "mask.bin", "lens", "offsets.npy")}
    cfg = {"max_len": max_len, "overflow": overflow, "dtype": dtype}
    report = Report()
    conversations = iter_conversations(inputs, report, seed=seed, with_where=True)
    pool = Pool(workers, initializer=_init_worker, initargs=(tok.path, cfg)) if workers > 1 else None
    if pool is None:
        _init_worker(tok.path, cfg)
    n, n_tokens, n_loss, truncated, dropped, dropped_examples = 0, 0, 0, 0, 0, []
    try:
        with open(tmp["ids.bin"], "wb") as f_ids, open(tmp["mask.bin"], "wb") as f_mask, open(tmp["lens"], "wb") as f_len:
            for res in _imap_bounded(pool, render_chunk, _chunks(conversations, chunk_size), 2 * max(workers, 1)):
                f_ids.write(res["ids"].data)
                f_mask.write(res["mask"].data)
                f_len.write(res["lens"].data)
                n += len(res["lens"])
                n_tokens += len(res["ids"])
                n_loss += int(res["mask"].sum(dtype=np.int64))
                truncated += res["truncated"]
                dropped += len(res["dropped"])
                dropped_examples += res["dropped"][:max(0, 20 - len(dropped_examples))]
        if pool is not None:
            pool.close()
            pool.join()
            pool = None
        if n == 0:
            raise ValueError(f"no conversation left ({report.records} read, {dropped} dropped as longer than "
                             f"max_len={max_len}): raise --max_len")
        # offsets = [0, cumsum(lengths)], built block by block so memory stays bounded
        offsets = np.lib.format.open_memmap(tmp["offsets.npy"], mode="w+", dtype=np.int64, shape=(n + 1,))
        offsets[0], pos, total = 0, 1, 0
        lens = np.memmap(tmp["lens"], dtype=np.int64, mode="r")
        for start in range(0, n, 1 << 20):
            block = np.cumsum(lens[start:start + (1 << 20)]) + total
            offsets[pos:pos + len(block)] = block
            pos, total = pos + len(block), int(block[-1])
        offsets.flush()
        del offsets, lens
        assert total == n_tokens
        meta = {
            "format": FORMAT,
            "tokenizer_path": tok.path, "tokenizer_sha256": tok.sha256, "vocab_size": tok.vocab_size,
            "dtype": dtype, "bos_id": tok.bos_id, "eos_id": tok.eos_id,
            "n_examples": n, "n_tokens": n_tokens, "n_loss_tokens": n_loss,
            "max_len": max_len, "overflow": overflow, "truncated": truncated, "dropped": dropped,
            "dropped_examples": dropped_examples,
            "records": report.records, "emitted": report.emitted,
            "skipped": report.skipped, "malformed": report.malformed, "invalid": report.invalid,
            "skip_reasons": dict(report.reasons), "skipped_examples": report.examples,
            "sources": [{"path": p, **s} for p, s in report.files.items()],
            "seed": seed, "seconds": round(time.time() - t0, 2),
        }
        commit_outputs(out_dir, ("ids.bin", "mask.bin", "offsets.npy"), meta)   # tmp[name] == out_dir/name.tmp
    finally:
        if pool is not None:
            pool.terminate()
        for path in tmp.values():
            if os.path.exists(path):
                os.remove(path)
    if verbose:
        print(f"{out_dir}: {n:,} conversations, {n_tokens:,} tokens ({n_loss:,} trained on), "
              f"{truncated} truncated, {dropped} dropped (max_len={max_len}), "
              f"{report.skipped} records skipped, {meta['seconds']:.1f}s")
        print("  " + report.summary().replace("\n", "\n  "))
    return meta


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="conversation files/globs/dirs, each optionally ':weight'")
    p.add_argument("--out", required=True, help="output directory (ids.bin, mask.bin, offsets.npy, meta.json)")
    p.add_argument("--tokenizer", default=None, help="sentencepiece .model (default: the shipped tokenizer/lab.model)")
    p.add_argument("--max_len", type=int, default=None, help="max rendered tokens per conversation (default: no limit)")
    p.add_argument("--overflow", default="truncate", choices=["truncate", "drop"],
                   help="longer conversations: keep leading whole turns that fit, or drop them")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="render processes (<=1: in-process)")
    p.add_argument("--seed", type=int, default=0, help="seed of fractional weights")
    args = p.parse_args(argv)
    sft_prepare(args.input, args.out, args.tokenizer, max_len=args.max_len, overflow=args.overflow,
                workers=args.workers, seed=args.seed)


if __name__ == "__main__":
    main()
