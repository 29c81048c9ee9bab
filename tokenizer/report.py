"""Tokenizer compression report: characters and UTF-8 bytes per token, per file and per script,
for one or more sentencepiece models side by side.

Usage:
    python -m tokenizer.report ../shared/data/pretrain/en_tinystories_2k.jsonl.gz \
        ../shared/data/pretrain/zh_wiki_cmrc2018_wudao_format.jsonl.gz \
        --models tokenizer/lab.model,../shared/data/tokenizers/llama2_tokenizer.model
    (`python tokenizer/report.py ...` works too; default --models is the shipped tokenizer/lab.model)

Use held-out text (not what the tokenizer was trained on), or the numbers flatter the tokenizer.
More characters per token = shorter sequences = more text per context window and per FLOP.
"byte%" is the share of tokens that are byte-fallback pieces (<0xE4>...): a character missing from
the vocabulary costs 1-4 tokens, so a high byte% means the vocabulary does not cover that script.
Each document is also classed by its dominant script (Han if >= 50% of its letters are CJK
ideographs, Latin likewise, else mixed/other; "no letters" for digits, punctuation or blank lines)
for the per-script rows. Tokens are counted as encode gives them, so a dummy-prefix model's dummy "▁"
(one per document; its own token before Chinese text with the lab model) counts too.
"""
import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repo root importable (not tokenizer/ itself)
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from tokenizer.tokenizer import DEFAULT_MODEL, Tokenizer
from tokenizer.train import ReadStats, iter_documents

DEFAULT_FIELDS = "text,title,content,messages,conversations,instruction,input,output,prompt,chosen,rejected"


@dataclass
class Counts:
    docs: int = 0
    chars: int = 0
    bytes: int = 0
    tokens: int = 0
    byte_tokens: int = 0

    def add(self, other):
        for k in ("docs", "chars", "bytes", "tokens", "byte_tokens"):
            setattr(self, k, getattr(self, k) + getattr(other, k))

    @property
    def chars_per_token(self):
        return self.chars / max(self.tokens, 1)

    @property
    def bytes_per_token(self):
        return self.bytes / max(self.tokens, 1)

    @property
    def byte_share(self):
        return self.byte_tokens / max(self.tokens, 1)


def measure(tok: Tokenizer, texts) -> Counts:
    """Counts for a list of texts: characters (code points), UTF-8 bytes, tokens, byte-fallback tokens."""
    c = Counts()
    is_byte = tok.sp.is_byte
    for text, ids in zip(texts, tok.encode_batch(texts)):
        c.docs += 1
        c.chars += len(text)
        c.bytes += len(text.encode("utf-8"))
        c.tokens += len(ids)
        c.byte_tokens += sum(1 for i in ids if is_byte(i))
    return c


def script_of(text: str) -> str:
    han = latin = other = 0
    for ch in text:
        o = ord(ch)
        if 0x4E00 <= o <= 0x9FFF or 0x3400 <= o <= 0x4DBF or 0xF900 <= o <= 0xFAFF or 0x20000 <= o <= 0x2FFFF:
            han += 1
        elif ch.isalpha():
            if o < 0x250:  # ASCII, Latin-1 and Latin Extended-A/B letters
                latin += 1
            else:
                other += 1
    letters = han + latin + other
    if not letters:
        return "no letters"
    return "Han" if han / letters >= 0.5 else "Latin" if latin / letters >= 0.5 else "mixed/other"


def compression_table(models, files, fields, max_docs):
    """rows: [(label, {model_name: Counts})] for every file, every dominant script, and the total."""
    toks = {name: Tokenizer(path) for name, path in models.items()}
    rows, by_script, total = [], {}, {name: Counts() for name in toks}
    for path in files:
        stats = ReadStats()
        docs = []
        for doc in iter_documents(path, fields, stats):
            docs.append(doc)
            if len(docs) >= max_docs:
                break
        if stats.bad:
            print(f"note: {path}: {stats.bad} malformed lines skipped", file=sys.stderr)
        per_file = {}
        groups = {}
        for d in docs:
            groups.setdefault(script_of(d), []).append(d)
        for name, tok in toks.items():
            per_file[name] = Counts()
            for script, texts in groups.items():
                c = measure(tok, texts)
                per_file[name].add(c)
                by_script.setdefault(script, {n: Counts() for n in toks})[name].add(c)
            total[name].add(per_file[name])
        rows.append((Path(path).name, per_file))
    rows += [(f"[{s}]", by_script[s]) for s in sorted(by_script)]
    rows.append(("[all]", total))
    return rows


def format_table(rows, model_names):
    head = f"{'text':<44} {'docs':>6} {'chars':>10}"
    for n in model_names:
        head += f" | {n[:24]:>24}"
    sub = f"{'':<44} {'':>6} {'':>10}" + "".join(f" | {'chr/tok':>7} {'byt/tok':>7} {'byte%':>6}" for _ in model_names)
    lines = [head, sub, "-" * len(sub)]
    for label, per_model in rows:
        first = per_model[model_names[0]]
        line = f"{label[:44]:<44} {first.docs:>6} {first.chars:>10}"
        for n in model_names:
            c = per_model[n]
            line += f" | {c.chars_per_token:>7.2f} {c.bytes_per_token:>7.2f} {100 * c.byte_share:>5.1f}%"
        lines.append(line)
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("files", nargs="+", help="held-out JSONL / text files (.gz accepted)")
    p.add_argument("--models", default=str(DEFAULT_MODEL), help="comma-separated sentencepiece .model files")
    p.add_argument("--fields", default=DEFAULT_FIELDS, help="JSON fields to read (those present are joined)")
    p.add_argument("--max_docs", type=int, default=2000, help="first N documents of each file")
    args = p.parse_args(argv)
    models = {}
    for path in args.models.split(","):
        name = Path(path).stem
        while name in models:
            name += "'"
        models[name] = path
    rows = compression_table(models, args.files, [f for f in args.fields.split(",") if f], args.max_docs)
    for name, path in models.items():
        tok = Tokenizer(path)
        print(f"{name}: {path} (vocab {tok.vocab_size}, sha256 {tok.sha256[:12]})")
    print(format_table(rows, list(models)))
    return rows


if __name__ == "__main__":
    main()
