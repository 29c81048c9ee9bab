"""
clean.py: pretraining and SFT data cleaning, Chinese-aware, with a report that shows every decision.

    python clean.py --input raw/ --out cleaned/ --workers 8                     # JSONL {"text"}, .txt, .gz
    python clean.py --input wudao/ --text-fields title,content --out cleaned/   # WuDao: title + content
    python clean.py --input pile/ --source-field meta.pile_set_name --keep-meta --out cleaned/   # The Pile
    python clean.py --input raw/ --out cleaned/ --blacklist words.txt --eval-files ceval.jsonl --line-dedup 10
    python clean.py --mode sft --input sft/ --out sft_clean/                    # conversations, any common layout
    python clean.py --contam-only --input cleaned/kept --eval-files eval.jsonl --out contam/

No torchrun: cleaning is CPU-only and --workers N processes share the shards. Re-running the same command resumes
(a shard with a stats file is not redone); outputs go to a temp file, then os.replace(): a crash leaves no half file.

Pipeline (each step is timed and counted in OUT/report.json and OUT/report.md):
  read -> normalise (edit rules) -> route language -> mask PII -> [CCNet line dedup] -> filters -> keys + MinHash
                                  (worker processes; one shard = --chunk-docs documents bounds their memory)
  -> exact + near-duplicate dedup (main process; the one index that grows with the corpus)
  -> OUT/kept/*.jsonl (and OUT/rejected/*.jsonl with the rules) -> contamination check -> report
Output records: pretrain {"id","source","lang","text"[,"meta"]}; sft {"id","source","lang","messages"}.
Simplifications on purpose: language id by script ratios (no model download); a duplicate cluster keeps its
earliest document; a `--text-unit file` document and a .json array file are read whole.
"""
import argparse
import gzip
import hashlib
import html
import json
import multiprocessing
import os
import re
import sys
import time
import unicodedata
from collections import Counter, defaultdict, deque
from contextlib import nullcontext
from functools import cached_property
from itertools import chain, count, groupby, islice
from pathlib import Path

import numpy as np

# ----------------------------------------------------------------------------- config
def floats(s):
    return [float(x) for x in s.split(",")]

def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("input / output")
    g.add_argument("--input", nargs="+", required=True, help="files and/or directories of .jsonl/.json/.txt, optionally .gz")
    g.add_argument("--out", required=True, help="output dir: kept/, rejected/, work/, report.json, report.md")
    g.add_argument("--mode", choices=["pretrain", "sft"], default="pretrain")
    g.add_argument("--text-fields", default="text", help="JSON fields joined by newlines into the text, e.g. title,content (dotted paths ok)")
    g.add_argument("--id-field", default="id", help="record id; missing -> file:line")
    g.add_argument("--source-field", default="", help="field naming the funnel's source, e.g. meta.pile_set_name (default: file name)")
    g.add_argument("--keep-meta", action="store_true", help="copy the record's other fields into the output's 'meta'")
    g.add_argument("--text-unit", choices=["para", "line", "file"], default="para", help="one document of a .txt file")
    g.add_argument("--chunk-docs", type=int, default=2000, help="documents per shard")
    g.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1) - 1))
    g.add_argument("--rejected", action=argparse.BooleanOptionalAction, default=True, help="write rejected documents with their rules")
    g.add_argument("--restart", action="store_true", help="forget finished shards (needed after a config change)")
    g.add_argument("--tokenizer", default="", help="sentencepiece .model: adds token counts to the funnel")
    g.add_argument("--langs", default="zh,en", help="languages kept; the others are rejected by lang_not_allowed")
    g = p.add_argument_group("normalisation and routing")
    g.add_argument("--html", action=argparse.BooleanOptionalAction, default=None, help="strip HTML tags/entities (default: on, off in sft where answers hold code)")
    g.add_argument("--pii", action=argparse.BooleanOptionalAction, default=True, help="mask emails, phones, IDs, cards, IPs, URLs")
    g.add_argument("--line-dedup", type=int, default=0, metavar="N", help="CCNet-style: drop lines of >= N chars found in >= 2 documents of a shard (0: off)")
    g.add_argument("--c4-terminal-lines", action="store_true", help="C4's strict rule: drop every en line without terminal punctuation")
    g.add_argument("--zh-min-han", type=float, default=0.3, help="Han share of letters that makes a document zh")
    g.add_argument("--en-min-stop", type=float, default=0.05, help="English stop-word share of words that makes a Latin document en")
    g = p.add_argument_group("English filters (Gopher / C4 / FineWeb) and filters for every language")
    g.add_argument("--words", type=floats, default=[50, 100_000], help="allowed word count: min,max")
    g.add_argument("--mean-word", type=floats, default=[3.0, 10.0], help="allowed mean word length: min,max")
    g.add_argument("--max-symbol-ratio", type=float, default=0.1, help="max ('#' + ellipses) per word")
    g.add_argument("--max-bullet-lines", type=float, default=0.9)
    g.add_argument("--max-ellipsis-lines", type=float, default=0.3)
    g.add_argument("--min-alpha-words", type=float, default=0.8, help="min share of words with a letter")
    g.add_argument("--min-stop-words", type=int, default=2)
    g.add_argument("--top-ngram", type=floats, default=[0.20, 0.18, 0.16], help="max char share of the top 2,3,4-gram")
    g.add_argument("--dup-ngram", type=floats, default=[0.15, 0.14, 0.13, 0.12, 0.11, 0.10], help="max char share of repeated 5..10-grams")
    g.add_argument("--min-line-punct", type=float, default=0.12, help="min share of lines ending in terminal punctuation")
    g.add_argument("--max-short-lines", type=float, default=0.67, help="max share of lines shorter than 30 chars")
    g.add_argument("--max-dup-lines", type=floats, default=[0.30, 0.20], help="max repeated-line share: of lines, of chars")
    g.add_argument("--max-dup-paras", type=floats, default=[0.30, 0.20], help="max repeated-paragraph share: of paragraphs, of chars")
    g.add_argument("--blacklist", default="", help="word file: 'word' or 'category<TAB>word' per line, '#' comments")
    g.add_argument("--blacklist-threshold", type=int, default=3, help="reject at this many blacklist hits")
    g = p.add_argument_group("Chinese filters (character based)")
    g.add_argument("--zh-chars", type=floats, default=[80, 200_000], help="allowed non-space characters: min,max")
    g.add_argument("--zh-min-han-share", type=float, default=0.4, help="min Han share of non-space chars")
    g.add_argument("--zh-short-lines", type=floats, default=[10, 0.5], help="a line under N chars is short; max share of short lines")
    g.add_argument("--zh-min-sentence-lines", type=float, default=0.15, help="min share of lines holding a sentence end")
    g.add_argument("--zh-top-ngram", type=floats, default=[0.20, 0.18, 0.16], help="max char share of the top 2,3,4-char gram")
    g.add_argument("--zh-dup-ngram", type=floats, default=[0.60, 0.55, 0.50, 0.45, 0.40, 0.35], help="max char share of repeated 5..10-char grams")
    g.add_argument("--zh-max-chapters", type=floats, default=[10, 0.25], help="max chapter headings: count, char share")
    g.add_argument("--zh-max-table-lines", type=float, default=0.5, help="max share of table-like lines")
    g = p.add_argument_group("SFT, dedup, contamination")
    g.add_argument("--sft-max-chars", type=int, default=16_000)
    g.add_argument("--sft-prompt-dedup", action=argparse.BooleanOptionalAction, default=True, help="also drop repeated prompts")
    g.add_argument("--dedup", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--shingle", type=int, default=5, help="tokens per shingle (a CJK char or a Latin word is one token)")
    # 16 bands x 8 rows: P(candidate) = 1-(1-J^8)^16 = 0.95 at J=0.8, 0.994 at 0.85, 0.06 at 0.5. The S-curve sits
    # below the 0.8 threshold on purpose (recall); the true-Jaccard check then drops candidates under --jaccard.
    g.add_argument("--bands", type=int, default=16)
    g.add_argument("--rows", type=int, default=8)
    g.add_argument("--jaccard", type=float, default=0.8, help="a candidate pair merges only if its true Jaccard is >= this")
    g.add_argument("--eval-files", nargs="*", default=[], help="eval JSONL/txt whose items are checked against the kept corpus")
    g.add_argument("--eval-fields", default="", help="eval text fields (default: every string field)")
    g.add_argument("--contam-n", type=int, default=13, help="n-gram length in tokens (GPT-3, Brown et al. 2020, used 13)")
    g.add_argument("--contam-only", action="store_true", help="--input is an already cleaned corpus: only run the check")
    a = p.parse_args(argv)
    a.html = a.mode == "pretrain" if a.html is None else a.html
    a.langs = a.langs.split(",")
    if len(a.top_ngram) != 3 or len(a.dup_ngram) != 6 or len(a.zh_top_ngram) != 3 or len(a.zh_dup_ngram) != 6:
        p.error("--*top-ngram takes 3 values (n=2,3,4), --*dup-ngram 6 values (n=5..10)")
    return a

# flags that do not change which documents are kept: a resumed run may change these, not the others
NOT_RESULT_FLAGS = {"input", "out", "workers", "restart", "eval_files", "eval_fields", "contam_n", "contam_only"}

# ----------------------------------------------------------------------------- reading
INPUT_NAME = re.compile(r"\.(jsonl?|ndjson|txt)(\.gz)?$")
JSON_NAME = re.compile(r"\.(jsonl?|ndjson)(\.gz)?$")

def list_inputs(paths):
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and INPUT_NAME.search(f.name))
        elif p.is_file():
            files.append(p)
        else:
            sys.exit(f"clean.py: input {p} does not exist")
    if not files:
        sys.exit(f"clean.py: no .jsonl/.json/.txt(.gz) files in {paths}")
    return files

def open_text(path):
    # newline="\n": split lines on "\n" only; corpora hold U+2028 inside documents, which splitlines() would cut
    opener = gzip.open if str(path).endswith(".gz") else open
    return opener(path, "rt", encoding="utf-8-sig", errors="replace", newline="\n")   # -sig: drop a leading BOM

def read_units(path, text_unit):
    """Yield (line_number, kind, raw) for each document of a file; kind 'json' is parsed later, in a worker."""
    with open_text(path) as f:
        if JSON_NAME.search(path.name):
            whole = f.read(1) == "["   # a .json holding one array: read whole
            f.seek(0)
            recs = enumerate(json.load(f), 1) if whole else ((i, line) for i, line in enumerate(f, 1) if line.strip())
            yield from ((i, "obj" if whole else "json", rec) for i, rec in recs)
        elif text_unit == "file":
            yield 1, "text", f.read()
        else:   # "para": blank-line separated blocks; "line": every non-empty line
            buf = []   # (line number, line) of the document being read
            for i, line in enumerate(chain(f, [""]), 1):   # the final "" ends the last paragraph
                if line.strip():
                    buf.append((i, line))
                if buf and (text_unit == "line" or not line.strip()):
                    yield buf[0][0], "text", "".join(l for _, l in buf)
                    buf = []

def iter_shards(files, a):
    """Cut every file into shards of --chunk-docs documents; ids are stable, so a rerun finds its finished shards."""
    for fi, path in enumerate(files):
        stem, docs = re.sub(r"[^\w-]", "_", INPUT_NAME.sub("", path.name))[:60], read_units(path, a.text_unit)
        for k in count():   # k == 0 always yields: an empty file still makes one (empty) shard
            units = list(islice(docs, a.chunk_docs))
            if k and not units:
                break
            yield f"{fi:04d}-{stem}-{k:05d}", str(path), units

def get_field(rec, path):
    for k in path.split("."):
        rec = rec.get(k) if isinstance(rec, dict) else None
    return rec

def to_messages(rec):
    """An SFT record in any common layout -> [{"role", "content"}], or None when no layout fits."""
    conv = rec.get("messages") or rec.get("conversations")
    if isinstance(conv, list):   # OpenAI-style messages, or ShareGPT {"from": "human"|"gpt", "value"}
        role = {"human": "user", "gpt": "assistant", "bot": "assistant"}
        return [{"role": role.get(m.get("role", m.get("from")), m.get("role", m.get("from"))), "content": m.get("content", m.get("value"))}
                for m in conv if isinstance(m, dict)]
    if "instruction" in rec and "output" in rec:   # Alpaca
        q = f"{rec['instruction']}\n\n{rec['input']}" if rec.get("input") else rec["instruction"]
        return [{"role": "system", "content": rec.get("system")}] * bool(rec.get("system")) + \
            [{"role": "user", "content": q}, {"role": "assistant", "content": rec["output"]}]
    for ans in ("response", "output", "chosen", "answer"):
        if "prompt" in rec and ans in rec:
            return [{"role": "user", "content": rec["prompt"]}, {"role": "assistant", "content": rec[ans]}]
    if isinstance(rec.get("data"), list):   # the seed's {"data": [question, answer, question, answer...]}
        return [{"role": ("user", "assistant")[i % 2], "content": c} for i, c in enumerate(rec["data"])]
    return None

# ----------------------------------------------------------------------------- normalisation (edit rules)
HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
CJK = HAN + "\u3040-\u30ff\uac00-\ud7af"                        # + kana and hangul: one character = one token
HAN_RE, KANA_RE, HANGUL_RE = re.compile(f"[{HAN}]+"), re.compile("[\u3040-\u30ff]+"), re.compile("[\uac00-\ud7af]+")
LATIN_RE = re.compile("[A-Za-z\u00c0-\u024f\uff21-\uff3a\uff41-\uff5a]+")   # runs: count = sum(map(len, findall))
EN_STOP_RE = re.compile(r"\b(?:the|be|to|of|and|that|have|with|a|in|is|it|for|on|as|was|are|this|by|you|at|from|or|not)\b")
CONTROL_RE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff\u00ad]")
HTML_BLOCK_RE = re.compile(r"<(script|style)\b[^>]*>.*?</\1\s*>|<!--.*?-->", re.S | re.I)
HTML_TAG_RE = re.compile(r"</?[a-zA-Z][a-zA-Z0-9]*(?:\s[^<>]{0,500})?/?>")   # tag-shaped only: "a < b > c" stays
HTML_ENTITY_RE = re.compile(r"&(?:#\d{1,7}|#x[0-9a-fA-F]{1,6}|[a-zA-Z]{2,8});")
# full width -> half width: letters, digits and symbols always; Chinese punctuation ，：；！？（） only outside zh
ZH_PUNCT = "，：；！？（）…"
WIDTH_ALL = {c: c - 0xFEE0 for c in range(0xFF01, 0xFF5F)} | {0x3000: 0x20}
WIDTH_ZH = {k: v for k, v in WIDTH_ALL.items() if chr(k) not in ZH_PUNCT}
FW_RE, FW_ZH_RE = (re.compile("[" + "".join(map(chr, w)) + "]") for w in (WIDTH_ALL, WIDTH_ZH))   # the chars each maps
PROTECT = [(c, chr(0xE000 + i)) for i, c in enumerate(ZH_PUNCT)]   # NFKC would turn ， into "," and … into "...": hide them
PUNCT_RUN_RE = re.compile(r"([!?！？。，,;；、.\-=*_~…·/#])\1{3,}")   # 4+ of one mark -> 1, or 3 for . - = * … / #
SPACES_RE, NEWLINES_RE = re.compile(r"[ \t]{2,}"), re.compile(r"\n{3,}")
CJK_SPACE_RE = re.compile(f"(?<=[{HAN}，。！？、：；“”（）]) +(?=[{HAN}，。！？、：；“”（）])")   # the seed's deleteSpaceBetweenChinese
C4_BOILER_RE = re.compile(r"javascript|terms of use|privacy policy|cookie policy|uses cookies|use of cookies|use cookies", re.I)
EN_END = ".!?\"'”’)"
ZH_END = EN_END + "。！？…；;」』）》"

def swap(t, pairs):   # one str.replace per pair: much faster than str.translate with a dict
    for x, y in pairs:
        t = t.replace(x, y)
    return t

def normalise(t, a, ch, sft=False):
    """Edit rules in order, each gated by a cheap test so clean text pays almost nothing. ch[rule] += characters
    the rule changed (net length change, or characters replaced). Returns (text, lang)."""
    def step(name, new, n=None):
        ch[name] += abs(len(t) - len(new)) if n is None else n
        return new
    t = t.replace("\r\n", "\n").replace("\r", "\n").replace("\u2028", "\n").replace("\u2029", "\n\n")
    t = step("control_chars", CONTROL_RE.sub("", t))
    if a.html and ("<" in t or "&" in t):
        t = step("html", HTML_ENTITY_RE.sub(lambda m: html.unescape(m.group()), HTML_TAG_RE.sub("", HTML_BLOCK_RE.sub("", t))))
    lang = route_lang(t, a)
    zh = lang == "zh"
    fw = (FW_ZH_RE if zh else FW_RE).findall(t)
    if fw:
        t = step("full_width", t.translate(WIDTH_ZH if zh else WIDTH_ALL), len(fw))
    p = swap(t, PROTECT) if zh else t
    if not unicodedata.is_normalized("NFKC", p):
        s = unicodedata.normalize("NFKC", p)
        s = swap(s, [(y, x) for x, y in PROTECT]) if zh else s
        t = step("nfkc", s, None if len(s) != len(t) else sum(map(str.__ne__, s, t)))
    t = step("repeated_punct", PUNCT_RUN_RE.sub(lambda m: m.group(1) * (3 if m.group(1) in ".-=*_~…·/#" else 1), t))
    s = "\n".join(l.rstrip() for l in t.split("\n"))
    if not sft:   # inner runs of spaces -> one space; leading indentation (code) stays
        s = SPACES_RE.sub(lambda m: m.group() if m.start() == 0 or s[m.start() - 1] == "\n" else " ", s)
        s = CJK_SPACE_RE.sub("", s) if zh else s
    t = step("whitespace", NEWLINES_RE.sub("\n\n", s).strip())
    if lang == "en" and not sft and (a.c4_terminal_lines or C4_BOILER_RE.search(t)):
        # C4 (Raffel et al. 2020): drop lines naming javascript or cookie/policy boilerplate (and optionally
        # every line without terminal punctuation, which FineWeb found removes too much)
        t = step("c4_lines", "\n".join(l for l in t.split("\n") if not C4_BOILER_RE.search(l)
                                       and not (a.c4_terminal_lines and l and not l.endswith(tuple(EN_END)))))
    return t, lang

def route_lang(t, a):
    """Script ratios, no model: Han share of letters -> zh; Latin with English stop words -> en; kana -> ja; hangul -> ko."""
    s = t[:5000]
    han, kana, hangul, latin = (sum(map(len, r.findall(s))) for r in (HAN_RE, KANA_RE, HANGUL_RE, LATIN_RE))
    letters = han + kana + hangul + latin
    if letters == 0:
        return "other"
    if kana > 10 and kana > 0.1 * (han + kana):
        return "ja"
    if hangul > 0.5 * letters:
        return "ko"
    if han >= a.zh_min_han * letters:
        return "zh"
    if latin >= 0.5 * letters:
        return "en" if len(EN_STOP_RE.findall(s.lower())) >= a.en_min_stop * len(s.split()) else "latin"
    return "other"

# ----------------------------------------------------------------------------- PII masking
def luhn_ok(digits):
    return sum(int(c) if i % 2 == 0 else sum(divmod(2 * int(c), 10)) for i, c in enumerate(reversed(digits))) % 10 == 0

def cn_id_ok(d):
    """GB 11643 checksum of the 18-character resident ID: a random 18-digit number fails it 10 times in 11."""
    w = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2]
    return "10X98765432"[sum(int(c) * k for c, k in zip(d, w)) % 11] == d[17].upper()

EMAIL_RE = re.compile(r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
URL_RE = re.compile(rf"(?:https?://|www\.)[^\s<>\"'{CJK}\u3000-\u303f\uff01-\uff5e]+", re.I)
NUM_SPAN_RE = re.compile(r"[+(0-9][0-9 .\-()]{5,}")   # cheap first pass: only runs of digits and separators are examined
NUM_PII_RE = re.compile(r"(?<![0-9A-Za-z.,_\-])(?:"  # never the tail of a longer number ...
                        r"(?P<ID_CN>[1-9]\d{5}(?:18|19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\d{3}[\dXx])"
                        r"|(?P<CARD>[3-6]\d{3}(?P<sep>[ -]?)\d{4}(?P=sep)\d{4}(?P=sep)\d{1,4}(?:(?P=sep)\d{1,3})?)"
                        r"|(?P<IP>(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d))"
                        r"|(?P<PHONE>(?:\+?86[ -]?)?1[3-9]\d(?P<ps>[ -]?)\d{4}(?P=ps)\d{4}|0\d{2,3}-\d{7,8}"
                        r"|\+\d{1,3}[ -]\(?\d{1,4}\)?[ -]\d{3,4}[ -]\d{3,4}|\(\d{3}\) ?\d{3}-\d{4}|[2-9]\d\d-[2-9]\d\d-\d{4})"
                        r")(?![0-9A-Za-z_]|[.,\-]\d)")  # ... nor its head
CARD_CONTEXT_RE = re.compile(r"卡号|银行卡|信用卡|储蓄卡|账号|帐号|card|account", re.I)

def mask_pii(t, counts):
    """Replace PII by <EMAIL> <URL> <ID_CN> <CARD> <IP> <PHONE>. Mask, not delete: the sentence stays grammatical
    and the model learns the slot, not the value. A number must not touch other digits, an ID must pass its
    checksum, a card must pass Luhn *and* follow a word like 卡号/card: tables of ordinary numbers stay intact."""
    def span(m):
        s0, sp = m.start(), m.group().rstrip(" .-(")
        if s0 and (t[s0 - 1].isascii() and t[s0 - 1].isalnum() or t[s0 - 1] in ".,_-"):
            return m.group()   # the span continues a word or a number

        def one(p):
            kind = next(k for k in ("ID_CN", "CARD", "IP", "PHONE") if p.group(k))
            v, before = p.group(kind), t[max(0, s0 + p.start() - 12): s0 + p.start()]
            if kind == "ID_CN" and not cn_id_ok(v) or kind == "CARD" and not (luhn_ok(re.sub(r"\D", "", v)) and CARD_CONTEXT_RE.search(before)):
                return p.group()
            counts[kind] += 1
            return f"<{kind}>"
        return NUM_PII_RE.sub(one, sp) + m.group()[len(sp):]
    if "@" in t:
        t = EMAIL_RE.sub(lambda m: counts.update(["EMAIL"]) or "<EMAIL>", t)
    if "http" in t or "www." in t or "HTTP" in t:
        t = URL_RE.sub(lambda m: counts.update(["URL"]) or "<URL>", t)
    return NUM_SPAN_RE.sub(span, t)

# ----------------------------------------------------------------------------- blacklist
def trie_regex(words):
    """One regex for many literal words with shared prefixes factored out (a trie): the scan is one left-to-right
    pass that branches on a single character per step, instead of trying every word at every position."""
    words = sorted(set(words))   # one trie level: group by first character, recurse on the rest ("" = a word ends)
    alts = [re.escape(c) + trie_regex([w[1:] for w in g]) for c, g in groupby(filter(None, words), lambda w: w[0])]
    body = "" if not alts else alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"
    return f"(?:{body})?" if "" in words and alts else body

def load_blacklist(path):
    """'word' or 'category<TAB>word' per line -> (one compiled regex, {word: category})."""
    cat = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            c, _, w = line.strip().rpartition("\t")
            cat[unicodedata.normalize("NFKC", w.strip()).lower()] = c.strip() or "default"
    cjk = [w for w in cat if re.search(f"[{CJK}]", w)]
    latin = set(cat) - set(cjk)   # Latin words match whole words only: "ass" is not in "class"
    parts = [trie_regex(cjk)] * bool(cjk) + [rf"(?<![a-z0-9])(?:{trie_regex(latin)})(?![a-z0-9])"] * bool(latin)
    return re.compile("|".join(parts)), cat

# ----------------------------------------------------------------------------- tokens and repetition features
TOKEN_RE = re.compile(f"[{CJK}]|[^\\W_{CJK}]+")   # a CJK character, or a run of other letters/digits
TOKH = type("TokenHash", (dict,), {"__missing__": lambda self, t: self.setdefault(   # a cache; blake2b is stable, hash() is salted
    t, int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest(), "little"))})()
P64 = np.uint64(0x100000001B3)   # multiplier of the rolling n-gram hash (uint64 arithmetic wraps, fine for hashing)

def shard_tokens(texts):
    """Tokens of many documents, concatenated: (ids, char lengths, document of each token, document offsets)."""
    if len(TOKH) > 2_000_000:
        TOKH.clear()
    toks = [TOKEN_RE.findall(t.lower()) for t in texts]
    cnt = np.fromiter(map(len, toks), np.int64, len(toks))
    flat = list(chain.from_iterable(toks))
    ids, lens = np.fromiter(map(TOKH.__getitem__, flat), np.uint64, len(flat)), np.fromiter(map(len, flat), np.int64, len(flat))
    return ids, lens, np.repeat(np.arange(len(texts)), cnt), np.concatenate(([0], np.cumsum(cnt)))

def ngram_hashes(ids, n):
    """h[i] = hash of ids[i:i+n]."""
    h = ids[: len(ids) - n + 1].copy()
    with np.errstate(over="ignore"):
        for k in range(1, n):
            h = h * P64 + ids[k: len(ids) - n + 1 + k]
    return h

def repetition_batch(ids, lens, doc, ndocs):
    """Gopher's repetition features of a whole shard in a few large numpy calls (per-document calls cost more in
    overhead than in work): out[d, n] = char share of the top n-gram (n=2..4), of all repeated n-grams (n=5..10)."""
    out, pos = np.zeros((ndocs, 11)), np.arange(len(ids))
    total = np.maximum(np.bincount(doc, weights=lens, minlength=ndocs), 1)
    L, h = np.concatenate(([0], np.cumsum(lens))), ids.copy()
    with np.errstate(over="ignore"):
        for n in range(2, 11):
            h = h[:-1] * P64 + ids[n - 1:]                                   # h[i] = hash of tokens i..i+n-1
            idx = np.flatnonzero(doc[: len(h)] == doc[n - 1:])               # n-grams inside one document
            if len(idx) < 2:
                break
            key = h[idx] ^ (doc[idx].astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15))   # equal only within a document
            order = np.argsort(key)
            same = key[order][1:] == key[order][:-1]                         # neighbours after sorting: repeats
            if n <= 4:   # the longest run of equal keys is the most frequent n-gram (ties: the one with most chars)
                edges = np.flatnonzero(np.concatenate(([True], ~same, [True])))
                run, first = np.diff(edges), idx[order[edges[:-1]]]
                top, best = np.zeros(ndocs, np.int64), np.zeros(ndocs)
                np.maximum.at(top, doc[first], run)
                m = (run == top[doc[first]]) & (run > 1)
                np.maximum.at(best, doc[first][m], (run * (L[first + n] - L[first]))[m])
                out[:, n] = best / total
            else:        # a token is covered when a repeated n-gram starts at most n-1 tokens before it
                start = np.zeros(len(ids), bool)
                start[idx[order[1:][same]]] = start[idx[order[:-1][same]]] = True
                c = np.concatenate(([0], np.cumsum(start)))
                out[:, n] = np.bincount(doc, weights=lens * (c[pos + 1] > c[np.maximum(pos + 1 - n, 0)]), minlength=ndocs) / total
    return out

class Doc:
    """One document and the features its rules share, each computed once, on first use."""

    def __init__(self, text, lang, msgs=None, repetition=None):
        self.text, self.lang, self.msgs, self.repetition = text, lang, msgs, repetition

    @cached_property
    def lines(self):
        return [l.strip() for l in self.text.split("\n") if l.strip()]

    @cached_property
    def words(self):
        return self.text.split()

    @cached_property
    def n_chars(self):   # non-space characters
        return sum(map(len, self.words))

    def share(self, pred, items=None):
        items = self.lines if items is None else items
        return sum(map(bool, map(pred, items))) / max(1, len(items))

# ----------------------------------------------------------------------------- filters
# A rule is (doc, args) -> None to keep, or a short reason to reject; its threshold is a flag. Every rule runs
# on every document, so the report can tell which rule rejected first and what each would reject alone.

ALPHA_RE = re.compile(r"[^\W\d_]")
GOPHER_STOP_RE = re.compile(r"\b(?:the|be|to|of|and|that|have|with)\b", re.I)
ZH_SENT_RE = re.compile("[。！？；…]")
CHAPTER_RE = re.compile("第[0-9一二三四五六七八九十百千万零〇两壹贰叁肆伍陆柒捌玖拾佰仟]+[章节回卷集篇]|[（(][0-9一二三四五六七八九十]+[）)]")
TABLE_LINE_RE = re.compile(r"^(?:[^\t|]*[\t|]){2,}|^[\d\s.,:;%+\-/¥$€()（）|]+$")

def above(what, r, limit):   # a measure with a maximum: the reason to reject, or None to keep
    return f"{what} {r:.2f}" if r > limit else None
def below(what, r, limit):   # a measure with a minimum
    return f"{what} {r:.2f}" if r < limit else None

def repeated(what, parts, limits):
    """Reject when the parts equal to an earlier part are over limits[0] of the parts or limits[1] of the characters."""
    counts = Counter(parts)   # a part seen k times has k - 1 repeats
    n = (len(parts) - len(counts)) / max(1, len(parts))
    c = sum(len(p) * (k - 1) for p, k in counts.items()) / max(1, sum(map(len, parts)))
    return f"repeated {what} {n:.2f}, chars {c:.2f}" if n > limits[0] or c > limits[1] else None

def lang_not_allowed(d, a):  # routing by script ratios (route_lang): only --langs are kept
    return None if d.lang in a.langs else f"lang={d.lang}"
def blacklist(d, a):  # the seed's spam check: reject at >= 3 hits of a word list; categories are reported
    if BL is None:
        return None
    hits = Counter(BL[1].get(m.group(), "default") for m in BL[0].finditer(d.text.lower()))
    return f"{sum(hits.values())} hits {dict(hits)}" if sum(hits.values()) >= a.blacklist_threshold else None
def dup_lines(d, a):  # Gopher (Rae et al. 2021) Table A1: repeated lines <= 30% of lines and <= 20% of chars
    return repeated("lines", d.lines, a.max_dup_lines)
def dup_paragraphs(d, a):  # Gopher Table A1: repeated paragraphs <= 30% of paragraphs and <= 20% of chars
    return repeated("paragraphs", [p.strip() for p in d.text.split("\n\n") if p.strip()], a.max_dup_paras)

def gopher_word_count(d, a):  # Gopher (Rae et al. 2021) App. A: 50 to 100,000 words
    return None if a.words[0] <= len(d.words) <= a.words[1] else f"{len(d.words)} words"
def gopher_mean_word_length(d, a):  # Gopher App. A: mean word length 3 to 10 characters
    m = d.n_chars / max(1, len(d.words))
    return None if a.mean_word[0] <= m <= a.mean_word[1] else f"mean word length {m:.1f}"
def gopher_symbol_ratio(d, a):  # Gopher App. A: '#' and ellipses <= 0.1 per word
    r = (d.text.count("#") + d.text.count("...") + d.text.count("…")) / max(1, len(d.words))
    return above("symbols/word", r, a.max_symbol_ratio)
def gopher_bullet_lines(d, a):  # Gopher App. A: <= 90% of lines start with a bullet
    r = d.share(lambda l: l.startswith(("•", "-", "*", "·", "●", "▪", "◦", "‣")))
    return above("bullet lines", r, a.max_bullet_lines)
def gopher_ellipsis_lines(d, a):  # Gopher App. A: <= 30% of lines end with an ellipsis
    return above("ellipsis lines", d.share(lambda l: l.endswith(("...", "…"))), a.max_ellipsis_lines)
def gopher_alpha_words(d, a):  # Gopher App. A: >= 80% of words contain an alphabetic character
    return below("words with a letter", d.share(ALPHA_RE.search, d.words), a.min_alpha_words)
def gopher_stop_words(d, a):  # Gopher App. A: >= 2 of: the, be, to, of, and, that, have, with
    n = sum(1 for _ in zip(range(a.min_stop_words), GOPHER_STOP_RE.finditer(d.text)))   # stops at the threshold
    return f"{n} stop words" if n < a.min_stop_words else None

def top_ngram(d, a):  # Gopher Table A1: top 2/3/4-gram <= 20/18/16% of chars; zh: the same on characters
    lim = a.zh_top_ngram if d.lang == "zh" else a.top_ngram
    return ", ".join(f"top {n}-gram {d.repetition[n]:.2f}" for n, t in zip((2, 3, 4), lim) if d.repetition[n] > t) or None
def dup_ngram(d, a):  # Gopher Table A1: repeated 5..10-grams <= 15..10% of chars; zh chars: set so >= 99% of zh wiki passes
    lim = a.zh_dup_ngram if d.lang == "zh" else a.dup_ngram
    return next((f"repeated {n}-grams {d.repetition[n]:.2f}" for n, t in zip(range(5, 11), lim) if d.repetition[n] > t), None)

def c4_lorem_ipsum(d, a):  # C4 (Raffel et al. 2020): pages with "lorem ipsum" are removed
    return "lorem ipsum" if "lorem ipsum" in d.text.lower() else None
def fineweb_line_punct(d, a):  # FineWeb (Penedo et al. 2024): >= 12% of lines end in terminal punctuation
    return below("lines ending in punctuation", d.share(lambda l: l.endswith(tuple(ZH_END))), a.min_line_punct)
def fineweb_short_lines(d, a):  # FineWeb 2024: <= 67% of lines shorter than 30 characters
    return above("short lines", d.share(lambda l: len(l) < 30), a.max_short_lines)

def zh_length(d, a):  # ~ Gopher's 50-word minimum at ~1.6 characters per Chinese word (the seed used 512)
    return None if a.zh_chars[0] <= d.n_chars <= a.zh_chars[1] else f"{d.n_chars} chars"
def zh_han_share(d, a):  # ours, set on ../shared/data: zh wiki is >= 49% Han in 99% of passages; code/number pages far less
    return below("han", sum(map(len, HAN_RE.findall(d.text))) / max(1, d.n_chars), a.zh_min_han_share)
def zh_short_lines(d, a):  # FineWeb's short-line rule in characters (10 Chinese chars ~ 30 Latin chars)
    return above("short lines", d.share(lambda l: len(l) < a.zh_short_lines[0]), a.zh_short_lines[1])
def zh_sentence_lines(d, a):  # FineWeb's punctuation rule where 。！？ end sentences, anywhere in a line (menus have none)
    r = d.share(lambda l: l.endswith(tuple(ZH_END)) or ZH_SENT_RE.search(l) is not None)
    return below("lines with a sentence end", r, a.zh_min_sentence_lines)
def zh_chapter_list(d, a):  # the seed's IsChatperText: > 10 chapter headings, or > 25% of the characters in them
    m = CHAPTER_RE.findall(d.text)
    share = sum(map(len, m)) / max(1, len(d.text))
    return f"{len(m)} chapter headings, {share:.2f} of chars" if len(m) > a.zh_max_chapters[0] or share > a.zh_max_chapters[1] else None
def zh_table_page(d, a):  # after the seed's table-page check: most lines (of >= 5) are cells or bare numbers
    return above("table lines", d.share(TABLE_LINE_RE.search), a.zh_max_table_lines) if len(d.lines) >= 5 else None

def sft_format(d, a):  # [system] user assistant user ... assistant, every content a string
    roles = [m.get("role") for m in d.msgs or []]
    if not roles or any(not isinstance(m.get("content"), str) for m in d.msgs):
        return "no conversation"
    body = roles[1:] if roles[0] == "system" else roles
    ok = body and body[-1] == "assistant" and all(r == ("user", "assistant")[i % 2] for i, r in enumerate(body))
    return None if ok else "roles " + ",".join(map(str, roles))
def sft_empty_answer(d, a):  # an empty reply teaches the model to stop at once
    return "empty answer" if any(m.get("role") == "assistant" and not str(m.get("content") or "").strip() for m in d.msgs or []) else None
def sft_truncated(d, a):  # the last reply ends inside a code block or mid-sentence (comma, colon, open bracket)
    last = str(d.msgs[-1].get("content") or "").rstrip() if d.msgs else ""
    return "truncated answer" if last and (last.count("```") % 2 or last.endswith(tuple(",，、:：;；(（[{“-"))) else None
def sft_length(d, a):  # the conversation must fit a training context
    return f"{len(d.text)} chars" if len(d.text) > a.sft_max_chars else None

COMMON_RULES = [lang_not_allowed, blacklist, dup_lines, dup_paragraphs]
EN_RULES = [gopher_word_count, gopher_mean_word_length, gopher_symbol_ratio, gopher_bullet_lines, gopher_ellipsis_lines,
            gopher_alpha_words, gopher_stop_words, c4_lorem_ipsum, fineweb_line_punct, fineweb_short_lines, top_ngram, dup_ngram]
ZH_RULES = [zh_length, zh_han_share, zh_short_lines, zh_sentence_lines, zh_chapter_list, zh_table_page, top_ngram, dup_ngram]
SFT_RULES = [sft_format, sft_empty_answer, sft_truncated, sft_length, blacklist]

# ----------------------------------------------------------------------------- MinHash
def minhash_params(a):
    rng = np.random.default_rng(1234)   # fixed seed: signatures stay comparable across runs and resumes
    n = a.bands * a.rows
    return rng.integers(1, 2**63, n, dtype=np.uint64) | np.uint64(1), rng.integers(0, 2**63, n, dtype=np.uint64)

def shingles(ids, k):
    """The set of k-token shingle hashes (a document shorter than k tokens is one shingle)."""
    return np.unique(ngram_hashes(ids, min(k, len(ids)))) if len(ids) else np.zeros(1, np.uint64)

def minhash_batch(ids, offs, which, k, A, B):
    """MinHash signatures of documents `which`: per permutation, the minimum over a document's shingles x (folded to
    32 bits) of ((a*x + b) mod 2^64) >> 32: multiply-add-shift, a universal family exact in numpy uint64. Many
    documents share one matrix; np.minimum.reduceat takes each document's minimum."""
    sh = [ngram_hashes(ids[offs[d]: offs[d + 1]], max(1, min(k, int(offs[d + 1] - offs[d])))) for d in which]
    sh = [s if len(s) else np.zeros(1, np.uint64) for s in sh]   # no np.unique here: repeats cannot change a minimum
    starts = np.concatenate(([0], np.cumsum([len(s) for s in sh]))).astype(np.int64)
    x = np.concatenate(sh) if sh else np.zeros(0, np.uint64)
    x = (x >> np.uint64(32)) ^ (x & np.uint64(0xFFFFFFFF))
    sig, b0 = np.empty((len(which), len(A)), np.uint64), 0
    while b0 < len(which):   # blocks of whole documents with ~8k shingles bound the temporaries
        b1 = min(len(which), max(b0 + 1, int(np.searchsorted(starts, starts[b0] + 8192, "right")) - 1))
        v = A[:, None] * x[None, starts[b0]: starts[b1]]
        v += B[:, None]
        v >>= np.uint64(32)
        sig[b0:b1] = np.minimum.reduceat(v, starts[b0:b1] - starts[b0], axis=1).T
        b0 = b1
    return sig.astype(np.uint32)

def exact_key(text):
    return hashlib.blake2b(re.sub(r"\s+", "", text.lower()).encode(), digest_size=16).digest()

# ----------------------------------------------------------------------------- one shard (in a worker process)
BL = SPM = MINHASH = None   # blacklist (regex, {word: category}), sentencepiece, MinHash (A, B); set by setup()

def setup(a):
    global BL, SPM, MINHASH
    BL = load_blacklist(a.blacklist) if a.blacklist else None
    SPM = __import__("sentencepiece").SentencePieceProcessor(model_file=a.tokenizer) if a.tokenizer else None
    MINHASH = minhash_params(a)

def ntok(t):
    return len(SPM.encode(t)) if SPM is not None and t else 0

def write_atomic(path, data):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        data(f) if callable(data) else f.write(data)
    os.replace(tmp, path)

def jsonl_bytes(rows):
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()

def new_stats():
    return {"funnel": defaultdict(lambda: [0] * 9), "rules": defaultdict(lambda: [0, 0, 0]), "examples": defaultdict(list),
            "edits": Counter(), "pii": Counter(), "time": Counter(), "malformed": 0, "malformed_at": [], "docs": 0}

def lap(st, step, t0):   # CPU seconds (process_time: robust to other load on the machine) since t0 -> st["time"][step]
    t = time.process_time()
    st["time"][step] += t - t0
    return t

def prepare(kind, raw, where, path, a, st):
    """Parse, normalise and mask one record -> [id, source, lang, text, messages, meta], or None if malformed."""
    t = time.process_time()
    try:
        rec = json.loads(raw) if kind == "json" else raw if kind == "obj" else {"text": raw}
        if not isinstance(rec, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:   # json.JSONDecodeError is a ValueError: skip and count with file:line, never fatal
        st["malformed"] += 1
        st["malformed_at"] += [f"{where}: {str(e)[:80]}"][: 20 - len(st["malformed_at"])]
        return None
    fields = a.text_fields.split(",")
    rid = where if kind == "text" else str(get_field(rec, a.id_field) or where)
    src = str(get_field(rec, a.source_field) or Path(path).name) if a.source_field else Path(path).name
    msgs = (to_messages(rec) or []) if a.mode == "sft" else None
    raw_text = ("\n\n".join(str(m.get("content") or "") for m in msgs) if msgs is not None else raw if kind == "text" else
                "\n".join(str(v) for v in (get_field(rec, f) for f in fields) if isinstance(v, (str, int, float)) and str(v).strip()))
    t = lap(st, "parse", t)
    if msgs is None:
        text, lang = normalise(raw_text, a, st["edits"])
        t = lap(st, "normalise", t)
        text = mask_pii(text, st["pii"]) if a.pii else text
    else:   # sft: every message on its own, with the code-unsafe edits off
        parts = [m for m in msgs if isinstance(m.get("content"), str)]
        for m in parts:
            m["content"] = normalise(m["content"], a, st["edits"], sft=True)[0]
        lang = route_lang(raw_text, a)
        t = lap(st, "normalise", t)
        for m in parts if a.pii else []:
            m["content"] = mask_pii(m["content"], st["pii"])
        text = "\n\n".join(m["content"] for m in parts)
    lap(st, "pii", t)
    st["docs"] += 1
    f = st["funnel"][f"{src}\t{lang}"]
    f[0], f[1], f[2] = f[0] + 1, f[1] + len(raw_text), f[2] + ntok(raw_text)
    return [rid, src, lang, text, msgs, {k: v for k, v in rec.items() if k not in fields} if a.keep_meta else None]

def process_shard(sid, path, units, a, out):
    """Clean one shard -> work/ID.jsonl (documents that passed), work/ID.npz (exact keys, MinHash signatures),
    rejected/ID.jsonl, and last work/ID.stats.json: a shard is finished exactly when its stats file exists."""
    st = new_stats()
    docs = [d for d in (prepare(kind, raw, f"{path}:{i}", path, a, st) for i, kind, raw in units) if d]
    t = time.process_time()
    if a.line_dedup and a.mode == "pretrain":   # CCNet (Wenzek et al. 2019): a line shared by documents is boilerplate
        long = lambda l: len(l.strip()) >= a.line_dedup
        seen = Counter(chain.from_iterable({l.strip() for l in d[3].split("\n") if long(l)} for d in docs))
        for d in docs:
            new = "\n".join(l for l in d[3].split("\n") if not long(l) or seen[l.strip()] < 2)
            st["edits"]["line_dedup"], d[3] = st["edits"]["line_dedup"] + len(d[3]) - len(new), new
        t = lap(st, "line_dedup", t)
    ids, lens, doc, offs = shard_tokens([d[3] for d in docs])   # tokens and repetition of the whole shard at once
    t = lap(st, "tokenize", t)
    rep = repetition_batch(ids, lens, doc, len(docs)) if a.mode == "pretrain" else [None] * len(docs)
    t = lap(st, "repetition", t)
    kept, keys, which, rejected = [], [], [], []
    for k, (rid, src, lang, text, msgs, meta) in enumerate(docs):
        d = Doc(text, lang, msgs, rep[k])
        rules = SFT_RULES if a.mode == "sft" else COMMON_RULES + {"en": EN_RULES, "zh": ZH_RULES}.get(lang, [])
        fired = [(r.__name__, why) for r in rules for why in [r(d, a)] if why]
        for name, why in fired:   # counts: [rejected first, would reject alone, the only rule that fired]
            c = st["rules"][name]
            c[0], c[1], c[2] = c[0] + (name == fired[0][0]), c[1] + 1, c[2] + (len(fired) == 1)
        if fired:
            st["examples"][fired[0][0]] += [{"id": rid, "why": fired[0][1], "text": text[:300]}][: 5 - len(st["examples"][fired[0][0]])]
            rejected += [{"id": rid, "source": src, "lang": lang, "rule": fired[0][0], "rules": dict(fired), "text": text}] * a.rejected
            continue
        prompt = "\n\n".join(m["content"] for m in msgs if m["role"] != "assistant") if msgs else ""
        keys.append(exact_key(text) + exact_key(prompt))
        which.append(k)
        n_tok, f = ntok(text), st["funnel"][f"{src}\t{lang}"]
        f[3], f[4], f[5] = f[3] + 1, f[4] + len(text), f[5] + n_tok
        body = {"messages": msgs} if msgs is not None else {"text": text}
        kept.append({"id": rid, "source": src, "lang": lang, **body, **({"meta": meta} if meta else {}), "_chars": len(text), "_tok": n_tok})
    t = lap(st, "filters", t)
    sigs = minhash_batch(ids, offs, which, a.shingle, *MINHASH)
    t = lap(st, "minhash", t)
    write_atomic(out / "work" / f"{sid}.jsonl", jsonl_bytes(kept))
    write_atomic(out / "work" / f"{sid}.npz", lambda fh: np.savez(fh, key=np.frombuffer(b"".join(keys), np.uint8).reshape(-1, 32), sig=sigs))
    if a.rejected:
        write_atomic(out / "rejected" / f"{sid}.jsonl", jsonl_bytes(rejected))
    lap(st, "write", t)
    write_atomic(out / "work" / f"{sid}.stats.json", json.dumps(st).encode())   # last: marks the shard finished

# ----------------------------------------------------------------------------- dedup (main process)
def first_of(keys):
    """For each row of a (n, bytes) uint8 array: the index of the first row with the same bytes."""
    v = np.ascontiguousarray(keys).view(f"V{keys.shape[1]}").ravel()
    _, first, inv = np.unique(v, return_index=True, return_inverse=True)   # return_index: the first occurrence
    return first[inv.ravel()]

def read_rows(path):
    with open_text(path) as f:
        yield from (json.loads(line) for line in f)

def doc_text(r):
    return r["text"] if "text" in r else "\n\n".join(m["content"] for m in r["messages"])

def dedup(a, out, sids):
    """Exact dedup on hashes of the normalised text (sft: also of the prompt), then MinHash-LSH: documents equal on
    a whole band are candidates, verified by their true Jaccard, merged by union-find. -> (dup_of, reason, report)"""
    zs = [np.load(out / "work" / f"{sid}.npz") for sid in sids]
    keys = np.concatenate([z["key"] for z in zs] + [np.zeros((0, 32), np.uint8)])
    sigs = np.concatenate([z["sig"] for z in zs] + [np.zeros((0, a.bands * a.rows), np.uint32)])
    N, offs = len(keys), np.cumsum([0] + [len(z["key"]) for z in zs])
    dup, reason = np.full(N, -1, np.int64), np.zeros(N, np.int8)   # reason: 1 exact, 2 same prompt, 3 near
    if not a.dedup or N == 0:
        return dup, reason, {"docs": N}
    firsts = [first_of(keys[:, :16])]   # key bytes 0..15: the text, 16..31: the prompt
    if a.mode == "sft" and a.sft_prompt_dedup:
        firsts.append(first_of(keys[:, 16:]))
    for r, f in enumerate(firsts, 1):
        m = (f != np.arange(N)) & (dup < 0)
        dup[m], reason[m] = f[m], r
    alive, pairs = np.flatnonzero(dup < 0), set()
    for b in range(a.bands):   # LSH: equal band -> candidate; each bucket member is paired with the bucket's first
        f = first_of(sigs[alive, b * a.rows: (b + 1) * a.rows].view(np.uint8).reshape(len(alive), -1))
        m = np.flatnonzero(f != np.arange(len(alive)))
        pairs.update(zip(alive[f[m]].tolist(), alive[m].tolist()))
    need, sh, snip = {i for p in pairs for i in p}, {}, {}
    for si in sorted(set((np.searchsorted(offs, sorted(need), "right") - 1).tolist())):   # read only shards with candidates
        for k, r in enumerate(read_rows(out / "work" / f"{sids[si]}.jsonl")):
            if offs[si] + k in need:
                t = doc_text(r)
                sh[offs[si] + k], snip[offs[si] + k] = shingles(shard_tokens([t])[0], a.shingle), (r["id"], t[:200])
    parent = {}

    def find(x):
        while parent.get(x, x) != x:
            parent[x] = parent.get(parent[x], parent[x])   # path halving
            x = parent[x]
        return x
    merged, refused = [], []
    for i, j in sorted(pairs):
        inter = len(np.intersect1d(sh[i], sh[j], assume_unique=True))
        jac = inter / (len(sh[i]) + len(sh[j]) - inter)
        (merged if jac >= a.jaccard else refused).append((i, j, jac))
        if jac >= a.jaccard:
            ri, rj = find(i), find(j)
            parent[max(ri, rj)] = min(ri, rj)   # the root is the earliest document: the one kept
    for i in need:
        if find(i) != i:
            dup[i], reason[i] = find(i), 3
    ex = lambda ps: [{"a": snip[i][0], "b": snip[j][0], "jaccard": round(jc, 3), "a_text": snip[i][1], "b_text": snip[j][1]} for i, j, jc in ps[:5]]
    p = lambda s: round(1 - (1 - s ** a.rows) ** a.bands, 3)
    sizes = lambda roots: dict(sorted(Counter(c for c in Counter(roots).values() if c > 1).items()))   # size: clusters
    return dup, reason, {
        "docs": N, "exact_removed": int((reason == 1).sum()), "prompt_removed": int((reason == 2).sum()), "near_removed": int((reason == 3).sum()),
        "exact_cluster_sizes": sizes(firsts[0].tolist()), "near_cluster_sizes": sizes(map(find, need)),
        "lsh_candidate_pairs": len(pairs), "merged_pairs": len(merged), "refused_by_true_jaccard": len(refused),
        "candidate_probability_at_jaccard": {s: p(s) for s in (0.5, 0.7, 0.8, 0.85, 0.9)},
        "merged_examples": ex(merged), "refused_examples": ex(sorted(refused, key=lambda x: -x[2]))}

def write_kept(a, out, sids, dup, reason, funnel):
    """Final outputs: kept/ID.jsonl without duplicates; the duplicates go to rejected/ID.dedup.jsonl."""
    names, ids = {1: "exact_dup", 2: "prompt_dup", 3: "near_dup"}, []
    for sid in sids:
        kept, rej = [], []
        for g, r in enumerate(read_rows(out / "work" / f"{sid}.jsonl"), len(ids)):   # g: index in the whole corpus
            c, t = r.pop("_chars"), r.pop("_tok")
            ids.append(r["id"])
            if dup[g] >= 0:
                rej.append({**r, "rule": names[int(reason[g])], "dup_of": ids[dup[g]]})
            else:
                kept.append(r)
                f = funnel[f"{r['source']}\t{r['lang']}"]
                f[6], f[7], f[8] = f[6] + 1, f[7] + c, f[8] + t
        write_atomic(out / "kept" / f"{sid}.jsonl", jsonl_bytes(kept))
        if a.rejected:
            write_atomic(out / "rejected" / f"{sid}.dedup.jsonl", jsonl_bytes(rej))
    for f in chain((out / "kept").glob("*.jsonl"), (out / "rejected").glob("*.jsonl")):   # leftovers of other inputs
        if f.name.removesuffix(".jsonl").removesuffix(".dedup") not in set(sids):
            f.unlink()

# ----------------------------------------------------------------------------- contamination
def contamination(a, eval_files, corpus_files):
    """Train <-> eval overlap: an eval item is contaminated when one of its --contam-n token n-grams occurs in a
    kept document (the GPT-3 paper's test). Reports, per such item, the share of its n-grams found and where."""
    items, hs = [], []
    for path in list_inputs(eval_files):
        for lineno, kind, raw in read_units(path, "line"):
            try:
                rec = json.loads(raw) if kind == "json" else raw if kind == "obj" else {"text": raw}
            except ValueError:
                continue
            vals = [get_field(rec, k) for k in a.eval_fields.split(",")] if a.eval_fields else list(rec.values()) if isinstance(rec, dict) else []
            ids = shard_tokens(["\n".join(v for v in vals if isinstance(v, str))])[0]
            items.append({"item": f"{path.name}:{lineno}", "ngrams": max(0, len(ids) - a.contam_n + 1)})
            hs.append(np.unique(ngram_hashes(ids, a.contam_n)) if len(ids) >= a.contam_n else np.zeros(0, np.uint64))
    uniq = np.unique(np.concatenate(hs + [np.zeros(0, np.uint64)]))
    where = {}   # n-gram hash -> first corpus document holding it
    for path in corpus_files:
        for r in read_rows(path):
            ids = shard_tokens([doc_text(r)])[0]
            if len(ids) >= a.contam_n:
                h = ngram_hashes(ids, a.contam_n)
                for x in h[np.isin(h, uniq)].tolist():
                    where.setdefault(x, r.get("id"))
    bad = []
    for it, h in zip(items, hs):
        found = [x for x in h.tolist() if x in where]
        if found:
            bad.append({**it, "overlap": round(len(found) / len(h), 3), "example_doc": where[found[0]]})
    return {"n": a.contam_n, "eval_items": len(items), "too_short": sum(len(h) == 0 for h in hs),
            "contaminated": len(bad), "items": sorted(bad, key=lambda x: -x["overlap"])}

# ----------------------------------------------------------------------------- report
def merge_stats(out, sids):
    tot = new_stats()
    for sid in sids:
        st = json.loads((out / "work" / f"{sid}.stats.json").read_text(encoding="utf-8"))
        for part in ("funnel", "rules"):   # lists of counts, added element-wise
            for k, v in st[part].items():
                tot[part][k] = [x + y for x, y in zip(tot[part][k], v)]
        for k, v in st["examples"].items():
            tot["examples"][k] = (tot["examples"][k] + v)[:5]
        for k in ("edits", "pii", "time"):
            tot[k].update(st[k])
        tot["malformed"], tot["docs"] = tot["malformed"] + st["malformed"], tot["docs"] + st["docs"]
        tot["malformed_at"] = (tot["malformed_at"] + st["malformed_at"])[:50]
    return tot

FUNNEL = ["docs_in", "chars_in", "tokens_in", "docs_after_filters", "chars_after_filters", "tokens_after_filters", "docs_kept", "chars_kept", "tokens_kept"]

def write_report(a, out, st, dd, wall, contam, extra):
    funnel = {k: dict(zip(FUNNEL, v)) for k, v in sorted(st["funnel"].items())}
    total = {f: sum(v[f] for v in funnel.values()) for f in FUNNEL}
    steps = {k: {"cpu_seconds": round(v, 3), "docs_per_s": round((total["docs_after_filters"] if k == "minhash" else st["docs"]) / v, 1) if v else None}
             for k, v in st["time"].items()}
    scope = lambda k: ", ".join(n for n, rs in (("all", COMMON_RULES), ("en", EN_RULES), ("zh", ZH_RULES), ("sft", SFT_RULES)) if k in {r.__name__ for r in rs})
    rules = {k: {"scope": scope(k), "rejected_first": v[0], "would_reject_alone": v[1], "only_rule": v[2], "examples": st["examples"][k]}
             for k, v in sorted(st["rules"].items(), key=lambda kv: -kv[1][0])}
    rep = {"total": total, "funnel": funnel, "malformed": {"count": st["malformed"], "first": st["malformed_at"]}, "rules": rules,
           "edits_chars_changed": dict(st["edits"].most_common()), "pii_masked": dict(st["pii"].most_common()), "dedup": dd,
           "time_per_step": steps, "wall_seconds": {k: round(v, 3) for k, v in wall.items()}, "contamination": contam, **extra, "config": vars(a)}
    write_atomic(out / "report.json", json.dumps(rep, ensure_ascii=False, indent=1).encode())
    one = lambda s, n=160: str(s).replace("\n", " ⏎ ").replace("|", "\\|")[:n]
    md = [f"# Cleaning report: {out}", "", f"{total['docs_in']} documents in -> {total['docs_after_filters']} after filters -> **{total['docs_kept']} kept** "
          f"({total['chars_kept']} of {total['chars_in']} characters). Malformed lines skipped: {st['malformed']} {', '.join(st['malformed_at'][:5])}",
          "", "## Funnel per source and language", "", "| source | lang | " + " | ".join(FUNNEL) + " |", "|---|---|" + "---:|" * len(FUNNEL)]
    md += [f"| {k.replace(chr(9), ' | ')} | " + " | ".join(str(v[f]) for f in FUNNEL) + " |" for k, v in funnel.items()]
    md += ["", "## Filters (every rule runs on every document)", "", "| rule | scope | rejected first | would reject alone | only this rule |", "|---|---|---:|---:|---:|"]
    md += [f"| {k} | {v['scope']} | {v['rejected_first']} | {v['would_reject_alone']} | {v['only_rule']} |" for k, v in rules.items()]
    md += ["", "## Edit rules", "", "| rule | characters changed | share of input |", "|---|---:|---:|"]
    md += [f"| {k} | {v} | {v / max(1, total['chars_in']):.4f} |" for k, v in rep["edits_chars_changed"].items()]
    md += ["", "PII masked: " + (", ".join(f"{k} {v}" for k, v in rep["pii_masked"].items()) or "none"), "", "## Deduplication", ""]
    md += [f"- {k}: {v}" for k, v in dd.items() if not k.endswith("examples")]
    for k in ("merged_examples", "refused_examples"):
        md += ["", f"{k.replace('_', ' ')} (true Jaccard):", ""] + [f"- {p['jaccard']}: `{p['a']}` ~ `{p['b']}`: {one(p['a_text'], 80)} ‖ {one(p['b_text'], 80)}" for p in dd.get(k, [])]
    md += ["", "## Time", "", "| step | cpu seconds (all workers) | docs/s per core |", "|---|---:|---:|"] + [f"| {k} | {v['cpu_seconds']} | {v['docs_per_s']} |" for k, v in steps.items()]
    md += [f"| {k} (wall) | {v:.2f} | |" for k, v in wall.items()]
    if contam:
        md += ["", f"## Contamination ({contam['n']}-grams)", "", f"{contam['contaminated']} of {contam['eval_items']} eval items overlap the kept corpus "
               f"({contam['too_short']} too short to check).", ""] + [f"- {x['item']}: {x['overlap']:.0%} of its n-grams, e.g. in `{x['example_doc']}`" for x in contam["items"][:50]]
    md += ["", "## Examples: the first 5 documents each rule rejected first"]
    for k, v in rules.items():
        md += ["", f"### {k}", ""] + [f"- `{e['id']}` ({one(e['why'], 80)}): {one(e['text'])}" for e in v["examples"]]
    md += ["", "## Effective configuration", "", "```json", json.dumps(vars(a), ensure_ascii=False, indent=1), "```", ""]
    write_atomic(out / "report.md", "\n".join(md).encode())
    return rep

# ----------------------------------------------------------------------------- main
def main(argv=None):
    a = get_args(argv)
    out = Path(a.out)
    for d in ("work", "kept", "rejected"):
        (out / d).mkdir(parents=True, exist_ok=True)
    for tmp in out.glob("*/*.tmp*"):   # left by a killed run; finished files are never touched
        tmp.unlink()
    files = list_inputs(a.input)
    setup(a)
    if a.contam_only:
        c = contamination(a, a.eval_files, files)
        write_atomic(out / "report.json", json.dumps({"contamination": c, "config": vars(a)}, ensure_ascii=False, indent=1).encode())
        print(f"clean.py: {c['contaminated']} of {c['eval_items']} eval items overlap the corpus; see {out / 'report.json'}", file=sys.stderr)
        return c
    cfg = {k: v for k, v in vars(a).items() if k not in NOT_RESULT_FLAGS}
    if a.restart:
        for f in (out / "work").iterdir():
            f.unlink()
    if (out / "config.json").exists() and any((out / "work").glob("*.stats.json")):
        old = json.loads((out / "config.json").read_text())
        diff = sorted(k for k in set(cfg) | set(old) if old.get(k) != cfg.get(k))
        if diff:
            sys.exit(f"clean.py: {out}/work holds shards made with other settings ({', '.join(diff)}); pass --restart or use a new --out")
    write_atomic(out / "config.json", json.dumps(cfg, ensure_ascii=False, indent=1).encode())
    t0, sids, resumed, pending, wall = time.perf_counter(), [], 0, deque(), {}
    pool = multiprocessing.get_context("fork").Pool(a.workers, setup, (a,)) if a.workers > 1 else None
    with pool or nullcontext():   # leaving a Pool's block terminates its workers, also on an error
        for sid, path, units in iter_shards(files, a):
            sids.append(sid)
            if (out / "work" / f"{sid}.stats.json").exists():
                resumed += 1
            elif pool is None:
                process_shard(sid, path, units, a, out)
            else:   # at most 2 shards per worker in flight: memory stays bounded by the shard size
                pending.append(pool.apply_async(process_shard, (sid, path, units, a, out)))
                while len(pending) >= 2 * a.workers:
                    pending.popleft().get()
        while pending:
            pending.popleft().get()
    wall["filter_shards"] = time.perf_counter() - t0
    print(f"clean.py: {len(sids)} shards ({resumed} finished before) in {wall['filter_shards']:.1f}s", file=sys.stderr)
    st = merge_stats(out, sids)
    t0 = time.perf_counter()
    dup, reason, dd = dedup(a, out, sids)
    t1 = time.perf_counter()
    write_kept(a, out, sids, dup, reason, st["funnel"])
    wall["dedup"], wall["write_kept"] = t1 - t0, time.perf_counter() - t1
    contam = None
    if a.eval_files:
        t0 = time.perf_counter()
        contam = contamination(a, a.eval_files, [out / "kept" / f"{s}.jsonl" for s in sids])
        wall["contamination"] = time.perf_counter() - t0
    rep = write_report(a, out, st, dd, wall, contam, {"shards": len(sids), "shards_resumed": resumed})
    t = rep["total"]
    print(f"clean.py: {t['docs_in']} docs -> {t['docs_after_filters']} after filters -> {t['docs_kept']} kept; {out / 'report.md'}", file=sys.stderr)
    return rep


if __name__ == "__main__":
    main()
