"""Train nanollama's sentencepiece tokenizer (BPE by default, unigram as an option).

Usage (single process; tokenizer training does not use torchrun, sentencepiece has its own threads):
    python -m tokenizer.train --out out/tok.model --vocab_size 4096 corpus.jsonl more.txt.gz
    python -m tokenizer.train --fields title,content --max_sentences 2000000 --vocab_size 32000 \
        --out out/wudao.model wudao/*.jsonl.gz          # WuDao: title + content
    (`python tokenizer/train.py ...` works too)

Reproduce the shipped tokenizer/lab.model byte for byte (sha256 60ae042641c8f4aa...), from the
training sets of the lab world with all 40 names of data/lab.py's pool (any seed's people are a subset),
as data/lab.py wrote them at commit 334a556 (the preference sets changed since; no new characters):
    git show 334a556:data/lab.py > /tmp/lab_334a556.py
    python /tmp/lab_334a556.py --out /tmp/lab_tok --seed 0 --people 40
    python -m tokenizer.train --out tokenizer/lab.model --vocab_size 2048 --split_han \
        --character_coverage 1.0 --fields text,messages,chosen,rejected,responses \
        /tmp/lab_tok/pretrain.jsonl /tmp/lab_tok/sft_train.jsonl /tmp/lab_tok/prefs_train.jsonl \
        /tmp/lab_tok/rank_train.jsonl /tmp/lab_tok/rl_prompts.jsonl
Why 2048 and --split_han: the lab world has only 378 distinct Chinese characters and a few hundred
English words (2,461 pieces at most once Chinese pieces are single characters). Without the split,
BPE spends a 4096 vocabulary on template sentences ("大家都说格蕾丝是莫斯科最好的作家" became ONE
token: a name, a city and a job fused), so a fact would live in an opaque token and could not be
recombined when SFT asks about it. With it, every character is a token and names are sequences.

Inputs: JSON lines (.jsonl/.json; --fields picks the text fields; a list field such as "messages"
[{role, content}], ShareGPT "conversations" [{from, value}] or the seed's "data" [q, a, ...] is
flattened to its strings) or plain text (any other suffix, one document per line); .gz accepted.
Malformed JSON lines are skipped and counted with file:line.

Memory: documents are streamed and cut into chunks of at most --max_chars characters (at line
breaks, so pieces can learn "\\n"), and a seeded reservoir sample keeps at most --max_sentences
chunks, so a 100 GB corpus never loads; sentencepiece then trains on the sample (it holds it in
memory, so the cap is what bounds RAM: ~ max_sentences * max_chars * 4 bytes in the worst case).

Choices, and why:
- byte_fallback: characters outside the vocabulary become their UTF-8 bytes (<0xE4>...), so no
  input ever maps to <unk> and every text round-trips exactly.
- normalization "identity", no whitespace collapsing: NFKC would turn "，" into "," and two spaces
  into one, and decode(encode(x)) == x is a requirement.
- add_dummy_prefix on (--dummy_prefix, the default; LLaMA's choice): encode(text) encodes
  " " + text, so a word is the same token at the start of a segment as inside a text ("▁Bob").
  That matters for copying: a name in a question ("Where does Bob live?") and the same name opening
  the answer ("Bob lives in ...") are one token, where without the prefix they were two unrelated
  ones ("▁Bob" and "Bob") and the lab's small model never learned to copy English names into
  answers. The cost: every encoded segment carries its dummy "▁", so a concatenated rendering
  such as the chat template decodes with a space after each header (tokenizer/tokenizer.py),
  a raw continuation needs decode(ids, continuation=True) to keep its first space, and HuggingFace
  encodes a text that already starts with a space without the dummy (its decode then loses that
  space; Meta's model shows the same). --no-dummy_prefix: segments concatenate with no added space.
- whitespace-only pieces ("▁▁▁▁") allowed, as in LLaMA: runs of spaces (indentation) compress.
  Unlike Meta's model, whose 16 space-run pieces carry score -1e9 at low ids (transformers ranks
  merges by id, sentencepiece by score, hence the known mismatch on runs of spaces), our trainer
  gives every piece a score in id order, so the HuggingFace conversion stays exact.
- split_digits: every digit is its own token (arithmetic in the lab world is learnable).
- character_coverage 0.9995: rare CJK characters fall back to bytes instead of taking vocab slots
  (use 1.0 for a closed synthetic world like the lab, where every character matters).
- --split_han (off by default): every Chinese character is a piece of its own, never merged with
  another character nor with anything else (so the dummy "▁" before Chinese text is its own token,
  and "王" is one token wherever it stands). Right for small templated corpora (see above); for a
  real Chinese corpus with a 32k vocabulary, multi-character words are worth having, so leave it
  off there.
- special pieces: <unk>=0 <s>=1 </s>=2 <pad>=3, then the chat markers <|system|> <|user|>
  <|assistant|> <|end|> (4..7) as user-defined symbols: always single tokens.
- deterministic: the sample depends only on --seed and the input order; BPE training is exact.
"""
import argparse
import gzip
import io
import json
import os
import random
import re
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repo root importable (not tokenizer/ itself)
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import sentencepiece as spm

from tokenizer.tokenizer import CHAT_MARKERS, Tokenizer


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", help="JSONL / text files (.gz accepted)")
    p.add_argument("--out", default="out/tokenizer.model", help="output model path (.model; a .vocab is written beside it)")
    p.add_argument("--vocab_size", type=int, default=4096, help="total pieces incl. specials and 256 bytes")
    p.add_argument("--model_type", choices=["bpe", "unigram"], default="bpe")
    p.add_argument("--fields", default="text", help="comma-separated JSON fields joined with a newline, e.g. title,content")
    p.add_argument("--max_sentences", type=int, default=1_000_000, help="cap on training chunks (reservoir sample)")
    p.add_argument("--max_chars", type=int, default=2000, help="longest training chunk in characters")
    p.add_argument("--character_coverage", type=float, default=0.9995)
    p.add_argument("--user_symbols", default="", help="extra comma-separated always-single-token strings")
    p.add_argument("--allow_whitespace_only_pieces", action=argparse.BooleanOptionalAction, default=True,
                   help="learn pieces made of spaces only, like '▁▁▁▁' (indentation)")
    p.add_argument("--split_han", action="store_true",
                   help="no piece may hold two Chinese characters (each is its own token); see 'Choices' above")
    p.add_argument("--dummy_prefix", action=argparse.BooleanOptionalAction, default=True,
                   help="encode adds a space before each text, as LLaMA's tokenizer does; see 'Choices' above")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_threads", type=int, default=2)
    return p.parse_args(argv)


# a CJK ideograph (basic block, extension A, compatibility ideographs)
HAN = re.compile(r"([\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff])")
DELIMITER = "\x1f"  # ASCII unit separator, absent from normal text


# -----------------------------------------------------------------------------
# reading (shared with tokenizer/report.py)

def text_of(value):
    """A JSON value -> its text: strings as they are, lists flattened (messages, ShareGPT turns,
    the seed's ["q1", "a1", ...]), dicts by their content/value/text field."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = [text_of(v) for v in value]
        return "\n".join(p for p in parts if p)
    if isinstance(value, dict):
        for key in ("content", "value", "text"):
            if isinstance(value.get(key), str):
                return value[key]
    return ""


class ReadStats:
    """Counts of what was read; malformed lines are reported with file:line (first few printed)."""

    def __init__(self, max_warnings=5):
        self.docs, self.bad, self.empty, self.max_warnings = 0, 0, 0, max_warnings

    def warn_bad(self, where, err):
        self.bad += 1
        if self.bad <= self.max_warnings:
            print(f"warning: {where}: skipped malformed JSON line ({err})", file=sys.stderr)


def open_text(path):
    # newline="" splits on line ends without translating "\r\n"; U+2028 inside a line stays inside
    raw = gzip.open(path, "rb") if str(path).endswith(".gz") else open(path, "rb")
    return io.TextIOWrapper(raw, encoding="utf-8", errors="replace", newline="")


def iter_documents(path, fields=("text",), stats=None):
    """Stream the documents of one file: JSONL records (the given fields joined by "\\n") or the
    lines of a text file (with their "\\n")."""
    stats = stats or ReadStats()
    name = str(path)
    is_json = name.removesuffix(".gz").endswith((".jsonl", ".json", ".ndjson"))
    lines = 0
    with open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            lines += 1
            if not is_json:
                stats.docs += 1
                yield line
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                stats.warn_bad(f"{name}:{lineno}", e.msg)
                continue
            parts = [text_of(record.get(k)) for k in fields] if isinstance(record, dict) else []
            text = "\n".join(p for p in parts if p)
            if not text:
                stats.empty += 1
                continue
            stats.docs += 1
            yield text
    if is_json and lines and stats.docs == 0 and stats.bad >= lines:
        raise ValueError(f"{name}: every line failed to parse as JSON")


def chunk_document(text, max_chars):
    """Cut a document into chunks of at most max_chars, at line breaks when possible (lines keep
    their "\\n" so newline pieces are learned); a longer line is cut hard."""
    buf = ""
    for line in text.split("\n"):  # "\n" only: str.splitlines would also break at U+2028
        line += "\n"
        while len(line) > max_chars:
            if buf:
                yield buf
                buf = ""
            yield line[:max_chars]
            line = line[max_chars:]
        if len(buf) + len(line) > max_chars:
            yield buf
            buf = ""
        buf += line
    buf = buf[:-1]  # the last line had no "\n" in the document
    if buf:
        yield buf


def reservoir_sample(items, k, seed):
    """Uniform sample of k items from a stream of unknown length (Vitter's algorithm R), in O(k)
    memory. Returns (sample, number of items seen). Deterministic for a seed and input order."""
    rng = random.Random(seed)
    sample, n = [], 0
    for item in items:
        n += 1
        if len(sample) < k:
            sample.append(item)
        else:
            j = rng.randrange(n)
            if j < k:
                sample[j] = item
    return sample, n


# -----------------------------------------------------------------------------

def train(args):
    fields = [f for f in args.fields.split(",") if f]
    stats = ReadStats()

    def chunks():
        for path in args.inputs:
            for doc in iter_documents(path, fields, stats):
                if args.split_han:  # a delimiter sentencepiece never merges across, dropped before counting
                    doc = HAN.sub(DELIMITER + "\\1" + DELIMITER, doc)
                yield from chunk_document(doc, args.max_chars)

    t0 = time.time()
    sample, seen = reservoir_sample(chunks(), args.max_sentences, args.seed)
    if not sample:
        raise SystemExit("error: no text found in the inputs (check --fields)")
    n_chars = sum(len(s) for s in sample)
    print(f"read {stats.docs:,} documents -> {seen:,} chunks, sampled {len(sample):,} ({n_chars:,} chars) "
          f"in {time.time() - t0:.1f}s; {stats.bad} malformed lines, {stats.empty} records without text")

    def feed():  # hand the sample to sentencepiece one by one, freeing our copy as it goes
        for i in range(len(sample)):
            s, sample[i] = sample[i], None
            yield s

    specials = list(CHAT_MARKERS.values()) + [s for s in args.user_symbols.split(",") if s]
    model = io.BytesIO()
    spm.set_random_generator_seed(args.seed)
    t0 = time.time()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=feed(), model_writer=model, model_type=args.model_type,
            vocab_size=args.vocab_size, character_coverage=args.character_coverage,
            pretokenization_delimiter=DELIMITER if args.split_han else "",
            byte_fallback=True, split_digits=True, normalization_rule_name="identity",
            remove_extra_whitespaces=False, add_dummy_prefix=args.dummy_prefix,
            allow_whitespace_only_pieces=args.allow_whitespace_only_pieces,
            unk_id=0, bos_id=1, eos_id=2, pad_id=3, user_defined_symbols=specials,
            input_sentence_size=0, shuffle_input_sentence=False,  # we sampled already
            max_sentence_length=max(4192, 4 * args.max_chars + 4),  # bytes; longer ones would be dropped
            num_threads=args.num_threads, minloglevel=2)
    except RuntimeError as e:  # e.g. more required characters than --vocab_size
        raise SystemExit(f"error: sentencepiece training failed: {e}") from None
    print(f"trained {args.model_type} vocab {args.vocab_size} in {time.time() - t0:.1f}s")

    # save atomically: model, then a human-readable .vocab (piece \t score), as spm_train would
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for path, data in ((out, model.getvalue()), (out.with_suffix(".vocab"), None)):
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=".tmp_")
        with os.fdopen(fd, "wb") as f:
            if data is None:
                sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
                esc = str.maketrans({"\n": "\\n", "\t": "\\t", "\r": "\\r"})  # keep one piece per line
                data = "".join(f"{sp.id_to_piece(i).translate(esc)}\t{sp.get_score(i):g}\n"
                               for i in range(sp.vocab_size())).encode()
            f.write(data)
        os.replace(tmp, path)

    # self-check: the contract the rest of the stack relies on
    tok = Tokenizer(out)
    assert tok.has_chat_markers and tok.bos_id == 1 and tok.eos_id == 2 and tok.pad_id == 3
    probe = "Alice  lives in 北京.\n\t12345 😀 <|user|>"
    assert tok.decode(tok.encode(probe)) == probe, "round trip failed"
    print(f"wrote {out} (sha256 {tok.sha256[:16]}...) and {out.with_suffix('.vocab')}")
    return tok


if __name__ == "__main__":
    train(get_args())
