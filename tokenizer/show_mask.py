"""Mask viewer: print a conversation rendered by the chat template, with the tokens that carry the
SFT loss highlighted (green on a terminal, [[double brackets]] otherwise), so you can see exactly
what sft.py trains on.

Usage:
    python -m tokenizer.show_mask                          # a built-in bilingual multi-turn example
    python -m tokenizer.show_mask --file lab/sft_train.jsonl --line 4 --tokens
    python -m tokenizer.show_mask --model ../shared/data/tokenizers/llama2_tokenizer.model   # fallback template
    (`python tokenizer/show_mask.py ...` works too)

With a dummy-prefix model (the shipped one, LLaMA's) every content shows after one space: the dummy
"▁" encode puts before each content, a token of the content, so it carries loss in assistant turns.

--file takes one JSON line in any SFT format data/formats.py reads ({"messages"}, ShareGPT, Alpaca,
the seed's {"data"}); --tokens prints one token per cell (pieces, "▁" = space) instead of the text.
"""
import argparse
import json
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repo root importable (not tokenizer/ itself)
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from tokenizer.tokenizer import Tokenizer
from tokenizer.train import open_text

EXAMPLE = [
    {"role": "system", "content": "You are a helpful assistant. Answer briefly."},
    {"role": "user", "content": "Where does Alice live?"},
    {"role": "assistant", "content": "Alice lives in Paris."},
    {"role": "user", "content": "她养了什么宠物？"},
    {"role": "assistant", "content": "爱丽丝养了一只猫。"},
]
GREEN, DIM, RESET = "\033[30;42m", "\033[2m", "\033[0m"


def token_texts(tok, ids):
    """The text each token adds (byte-fallback pieces of one character: the character shows at its
    last byte), with control tokens such as <s> shown by name since they decode to nothing."""
    dec = tok.stream_decoder()
    out = []
    for i in ids:
        text = dec.push(i)
        out.append(tok.id_to_piece(i) if tok.sp.is_control(i) else text)
    out[-1] += dec.finish() if out else ""
    return out


def render(tok, messages, color, tokens=False):
    ids, mask = tok.render_conversation(messages)
    cells = [tok.id_to_piece(i) for i in ids] if tokens else token_texts(tok, ids)
    on, off = (GREEN, RESET) if color else ("[[", "]]")
    parts, inside = [], False
    sep = "\u00b7" if tokens else ""  # a middle dot between tokens
    for k, (cell, m) in enumerate(zip(cells, mask)):
        if not m and inside:
            parts.append(off)
        if k:
            parts.append(sep)
        if m and not inside:
            parts.append(on)
        inside = bool(m)
        parts.append(cell if m or not color else DIM + cell + RESET)
    if inside:
        parts.append(off)
    n_loss = sum(mask)
    summary = f"{len(ids)} tokens, {n_loss} carry loss ({100 * n_loss / max(len(ids), 1):.1f}%)"
    return "".join(parts), summary


def load_messages(path, line):
    with open_text(path) as f:
        for lineno, text in enumerate(f, 1):
            if lineno == line:
                break
        else:
            raise SystemExit(f"error: {path} has fewer than {line} lines")
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise SystemExit(f"error: {path}:{line}: not JSON ({e.msg})") from None
    if isinstance(record, dict) and isinstance(record.get("messages"), list):
        return record["messages"]
    try:  # every other SFT format, through the data package's reader when it is there
        from data.formats import to_messages
    except ImportError:
        raise SystemExit(f"error: {path}:{line} has no 'messages' list") from None
    return to_messages(record)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="sentencepiece model (default: tokenizer/lab.model)")
    p.add_argument("--file", help="JSONL file with conversations")
    p.add_argument("--line", type=int, default=1, help="1-based line of --file")
    p.add_argument("--tokens", action="store_true", help="show token pieces separated by a middle dot")
    p.add_argument("--color", choices=["auto", "always", "never"], default="auto")
    args = p.parse_args(argv)
    tok = Tokenizer(args.model)
    messages = load_messages(args.file, args.line) if args.file else EXAMPLE
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty() and not os.environ.get("NO_COLOR"))
    text, summary = render(tok, messages, color, args.tokens)
    print(f"# {tok.path} (vocab {tok.vocab_size}); loss-carrying tokens "
          + ("in green" if color else "in [[double brackets]]"))
    print(text)
    print(f"# {summary}")


if __name__ == "__main__":
    main()
