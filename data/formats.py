"""
Readers for SFT conversations and preference data, normalised to one form.

Every SFT stage of nanollama trains on the same thing: a conversation, i.e. a list of
{"role": "system"|"user"|"assistant", "content": str}, with an optional system message
first, then user/assistant turns alternating, ending on an assistant turn. Every preference
stage (reward.py, dpo.py) trains on
    {"messages": [...prompt conversation, ends on a user turn...],
     "responses": [best, ..., worst],      # 2 for a chosen/rejected pair, K for a ranking
                                          # (distinct: a text ranked twice keeps its best rank)
     "kind": None or whatever the record's "kind" field held (e.g. the lab world's rejected kind)}

Formats read (detected per record, first match wins):
  conversations
    {"messages": [{"role", "content"}, ...]}                       (OpenAI / our own form)
    {"conversations": [{"from": "human"|"gpt"|"system", "value"}]} (ShareGPT; optional "system")
    {"id": ..., "data": ["q1", "a1", "q2", "a2", ...]}             (the seed project's form)
    {"instruction", "input", "output", "system"?, "history"?}      (Alpaca / LLaMA-Factory;
        user turn = instruction + "\n" + input when input is non-empty, as LLaMA-Factory does;
        history = [[q, a], ...] pairs or a list of {"role", "content"} messages)
    {"prompt", "response"}                                         (single turn)
  preferences
    {"prompt", "chosen", "rejected", "system"?, "history"?, "messages"?, "kind"?}
        (also LLaMA-Factory's {system, history, prompt, chosen, rejected}; "messages" may replace
        system/history/prompt as the prompt conversation)
    {"prompt", "responses": [best, ..., worst]} and the oasst-style {"ranked": [best, ...]}
        (when a record has both "ranked"/"responses" and chosen/rejected, the full ranking wins:
        it carries more pairs, and chosen/rejected are its first two anyway)
    Anthropic HH {"chosen": "\n\nHuman: ...\n\nAssistant: ...", "rejected": "..."}: both are
        full transcripts sharing a prefix; we split at the LAST assistant turn of that shared
        prefix (not simply the last "\n\nAssistant:" of each string: a few HH responses contain
        a hallucinated "\n\nAssistant:" of their own, and rfind would then cut inside them).

Validation. A record that parses but is not a valid conversation (roles don't alternate, an
empty turn, ends on the wrong role, unknown role, missing fields, identical chosen/rejected...)
is skipped and reported with file:line and the reason; nothing invalid is silently trained on.
A line that is not JSON is skipped and reported the same way. Neither is fatal, unless every
line of a file fails (then the file is almost surely in a format we don't read, or the wrong
file) -- that raises ValueError with the first reasons.

Files: JSON Lines (one object per line), optionally gzip-compressed (detected by magic bytes,
so the ".gz" suffix is not required), or a ".json" file holding one JSON array of records
(Alpaca's alpaca_data.json; that one is loaded whole, so keep huge sets in JSONL).
Lines are split on b"\n" only: some texts contain U+2028, which str.splitlines() would cut.

Mixing several files: pass a list of paths, each optionally suffixed with ":weight"
("a.jsonl:2", "b.jsonl.gz:0.5"). A weight is a number of copies per epoch: the integer part
repeats every record, the fractional part keeps each record once more with that probability,
decided by a stable hash of (seed, file, line) -- deterministic, streaming, and the same
records are chosen on every run. Weight 0 skips a file.

Usage:
    from data.formats import read_conversations, read_preferences
    convs, report = read_conversations(["sft_a.jsonl:2", "sft_b.jsonl.gz"])
    print(report.summary())
    prefs, report = read_preferences("hh_rlhf.jsonl.gz")
    python data/formats.py FILE...        # print per-file counts and skip reasons (a quick lint)
"""
import glob
import gzip
import hashlib
import json
import os
import re
import sys
from collections import Counter

ROLES = ("system", "user", "assistant")
# Role names seen in the wild, mapped to ours (ShareGPT uses human/gpt; some dumps use others).
ROLE_ALIASES = {
    "system": "system",
    "user": "user", "human": "user", "prompter": "user",
    "assistant": "assistant", "gpt": "assistant", "chatgpt": "assistant", "bot": "assistant",
    "model": "assistant", "bard": "assistant", "bing": "assistant",
}
MAX_EXAMPLES = 20  # skip examples kept per report (the counts are always complete)


class FormatError(ValueError):
    """A record that parsed as JSON but is not a valid conversation/preference (the message is the reason)."""


# -----------------------------------------------------------------------------
# Skip reports


class Report:
    """Counts of what was read and skipped, with file:line examples. One per read_* call."""

    def __init__(self):
        self.lines = 0          # non-blank lines (or array elements) seen
        self.records = 0        # records accepted (before weighting)
        self.emitted = 0        # records emitted (after weighting)
        self.malformed = 0      # not JSON / not UTF-8 / not an object
        self.invalid = 0        # JSON, but not a valid record (reasons counted below)
        self.reasons = Counter()
        self.examples = []      # "path:line: reason", at most MAX_EXAMPLES
        self.files = {}         # path -> {"lines", "records", "skipped", "weight"}

    @property
    def skipped(self):
        return self.malformed + self.invalid

    def skip(self, path, lineno, reason, malformed=False):
        if malformed:
            self.malformed += 1
        else:
            self.invalid += 1
        self.files.setdefault(path, {"lines": 0, "records": 0, "skipped": 0})["skipped"] += 1
        # Reasons are counted without the per-record detail (e.g. "roles do not alternate").
        self.reasons[reason.split(" (")[0]] += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(f"{path}:{lineno}: {reason}")

    def to_dict(self):
        return {"lines": self.lines, "records": self.records, "emitted": self.emitted,
                "malformed": self.malformed, "invalid": self.invalid,
                "reasons": dict(self.reasons), "examples": list(self.examples), "files": self.files}

    def summary(self):
        s = (f"{self.records} records from {len(self.files)} file(s) ({self.emitted} after weights), "
             f"{self.skipped} skipped ({self.malformed} malformed, {self.invalid} invalid)")
        for reason, n in self.reasons.most_common():
            s += f"\n  {n:7d} x {reason}"
        for ex in self.examples[:5]:
            s += f"\n  e.g. {ex}"
        return s

    def __repr__(self):
        return f"Report({self.summary()!r})"


# -----------------------------------------------------------------------------
# Files: inputs, gzip, JSON Lines


def open_binary(path):
    """Open a file for binary reading, transparently gunzipping (detected by magic bytes)."""
    f = open(path, "rb")
    magic = f.read(2)
    f.seek(0)
    if magic == b"\x1f\x8b":
        f.close()
        return gzip.open(path, "rb")
    return f


def iter_lines(path):
    """Yield (lineno, line_bytes) with line endings removed. Splits on b"\\n" only (U+2028-safe)."""
    with open_binary(path) as f:
        for lineno, line in enumerate(f, 1):
            yield lineno, line.rstrip(b"\r\n")


def expand_inputs(inputs, suffixes=(".jsonl", ".jsonl.gz", ".json", ".json.gz", ".txt", ".txt.gz")):
    """Files, globs or directories (searched recursively for the given suffixes) -> sorted file list.

    The order is deterministic (sorted within each glob/directory, inputs in the order given),
    because downstream shuffles and splits are seeded and must see the same document order."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    files = []
    for item in inputs:
        item = str(item)
        if os.path.isdir(item):
            found = sorted(os.path.join(root, name) for root, _, names in os.walk(item)
                           for name in names if name.endswith(tuple(suffixes)))
            if not found:
                raise FileNotFoundError(f"no {'/'.join(suffixes)} files under directory {item}")
            files += found
        elif os.path.isfile(item):
            files.append(item)
        else:
            found = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
            if not found:
                raise FileNotFoundError(f"input {item!r} matches no file or directory")
            files += found
    return files


def iter_json(path, report):
    """Yield (lineno, dict) for every JSON object in a JSONL(.gz) file or a .json array file.

    Malformed lines are counted in `report` with path:line and skipped. Blank lines are ignored."""
    report.files.setdefault(path, {"lines": 0, "records": 0, "skipped": 0})
    with open_binary(path) as f:
        head = f.read(4096).lstrip()
    if path.endswith((".json", ".json.gz")) and head.startswith(b"["):
        # A JSON array file: no way to stream it with the stdlib, so it is loaded whole.
        with open_binary(path) as f:
            try:
                items = json.load(f)
            except ValueError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from e
        for i, obj in enumerate(items, 1):
            report.lines += 1
            report.files[path]["lines"] += 1
            if isinstance(obj, dict):
                yield i, obj
            else:
                report.skip(path, i, f"not a JSON object (array element is {type(obj).__name__})", malformed=True)
        return
    for lineno, line in iter_lines(path):
        if not line.strip():
            continue
        report.lines += 1
        report.files[path]["lines"] += 1
        try:
            obj = json.loads(line)  # bytes in: json decodes UTF-8 itself (bad bytes -> ValueError)
        except (ValueError, RecursionError) as e:
            report.skip(path, lineno, f"malformed JSON ({type(e).__name__}: {str(e)[:80]})", malformed=True)
            continue
        if not isinstance(obj, dict):
            report.skip(path, lineno, f"not a JSON object (got {type(obj).__name__})", malformed=True)
            continue
        yield lineno, obj


def parse_weighted(spec):
    """'path:2.5' -> ('path', 2.5); 'path' -> ('path', 1.0); (path, w) tuples pass through."""
    if isinstance(spec, (tuple, list)):
        path, weight = spec
        return str(path), float(weight)
    spec = str(spec)
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            return head, float(tail)
        except ValueError:
            pass  # a colon that is part of the path
    return spec, 1.0


def _specs(paths):
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if isinstance(paths, dict):
        paths = list(paths.items())
    out = []
    for spec in paths:
        pattern, weight = parse_weighted(spec)
        if weight < 0:
            raise ValueError(f"negative weight in {spec!r}")
        out += [(path, weight) for path in expand_inputs(pattern, suffixes=(".jsonl", ".jsonl.gz", ".json", ".json.gz"))]
    return out


def _copies(weight, seed, path, lineno):
    """How many times a record is emitted for a weight (see the module docstring)."""
    n = int(weight)
    frac = weight - n
    if frac > 0:
        h = hashlib.blake2b(f"{seed}\0{os.path.basename(path)}\0{lineno}".encode(), digest_size=8).digest()
        n += int.from_bytes(h, "little") / 2 ** 64 < frac
    return n


def _iter_records(paths, convert, report, seed, with_where):
    report = report if report is not None else Report()
    for path, weight in _specs(paths):
        ok_before, lines_before = report.records, report.lines
        for lineno, obj in iter_json(path, report):
            try:
                rec = convert(obj)
            except FormatError as e:
                report.skip(path, lineno, str(e))
                continue
            report.records += 1
            report.files[path]["records"] += 1
            for _ in range(_copies(weight, seed, path, lineno)):
                report.emitted += 1
                yield (f"{path}:{lineno}", rec) if with_where else rec
        report.files[path]["weight"] = weight
        if report.lines == lines_before:
            raise ValueError(f"{path}: no records (empty file)")
        if report.records == ok_before:
            first = [e for e in report.examples if e.startswith(path + ":")][:3]
            raise ValueError(f"{path}: every one of its {report.lines - lines_before} lines failed; "
                             f"wrong file or unsupported format? first reasons: {first}")


# -----------------------------------------------------------------------------
# Conversations


def check_conversation(messages, last="assistant"):
    """Return None if `messages` is a valid conversation ending on role `last`, else the reason.

    Valid: a non-empty list of {"role", "content"} dicts with string contents, an optional
    system message first (only there), then user/assistant alternating starting with user,
    no empty (whitespace-only) turn, and the last turn's role == `last`."""
    if not isinstance(messages, list) or not messages:
        return "no turns"
    expect = "user"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
            return f"turn {i} is not a {{role, content}} message with a known role (got {str(m)[:60]!r})"
        role = m["role"]
        if not m["content"].strip():
            return f"empty turn ({role} turn {i})"
        if role == "system":
            if i != 0:
                return f"system message not first (turn {i})"
            continue
        if role != expect:
            return f"roles do not alternate ({role} at turn {i}, expected {expect})"
        expect = "assistant" if role == "user" else "user"
    if messages[-1]["role"] != last:
        return f"does not end on a{'n' if last[0] == 'a' else ''} {last} turn (ends on {messages[-1]['role']})"
    return None


def _role(name):
    role = ROLE_ALIASES.get(str(name).strip().lower())
    if role is None:
        raise FormatError(f"unknown role {name!r}")
    return role


def _system(record):
    system = record.get("system")
    if system is None or system == "":
        return []  # LLaMA-Factory writes system "" for "no system prompt": that is not an empty turn
    if not isinstance(system, str):
        raise FormatError(f"'system' is not a string (got {type(system).__name__})")
    return [{"role": "system", "content": system}]


def _history(history):
    """LLaMA-Factory/Alpaca history: [[q, a], ...] pairs, or a list of {role, content} messages."""
    if history is None:
        return []
    if not isinstance(history, list):
        raise FormatError("'history' is not a list")
    out = []
    for h in history:
        if isinstance(h, (list, tuple)) and len(h) == 2:
            out += [{"role": "user", "content": h[0]}, {"role": "assistant", "content": h[1]}]
        elif isinstance(h, dict) and "role" in h:
            out.append({"role": _role(h["role"]), "content": h.get("content")})
        else:
            raise FormatError(f"'history' entry is neither a [q, a] pair nor a message ({str(h)[:60]!r})")
    return out


def _message_list(items, role_key="role", content_key="content"):
    if not isinstance(items, list):
        raise FormatError("messages field is not a list")
    out = []
    for m in items:
        if not isinstance(m, dict):
            raise FormatError(f"message is not an object ({str(m)[:60]!r})")
        # ShareGPT dumps mix {from, value} and {role, content}: accept both spellings.
        role = m.get(role_key, m.get("role", m.get("from")))
        content = m.get(content_key, m.get("content", m.get("value")))
        out.append({"role": _role(role), "content": content})
    return out


def _drop_empty_system(messages):
    # An empty system message is "no system prompt" (common in exports), not an empty turn.
    if messages and messages[0]["role"] == "system" and messages[0]["content"] == "":
        return messages[1:]
    return messages


def to_messages(record):
    """Normalise one SFT record (any supported format) to a validated conversation.

    Returns a new list of {"role", "content"} dicts; raises FormatError(reason) if the record
    is in no known format or is not a valid conversation (see check_conversation)."""
    if not isinstance(record, dict):
        raise FormatError(f"not a JSON object (got {type(record).__name__})")
    if "messages" in record:
        messages = _system(record) + _message_list(record["messages"])
    elif "conversations" in record:
        messages = _system(record) + _message_list(record["conversations"], "from", "value")
    elif isinstance(record.get("data"), list):
        # The seed project's form: alternating user, assistant strings.
        messages = [{"role": ("user", "assistant")[i % 2], "content": c} for i, c in enumerate(record["data"])]
    elif "instruction" in record and "output" in record:
        instruction, inp = record["instruction"], record.get("input") or ""
        if not isinstance(instruction, str) or not isinstance(inp, str):
            raise FormatError("'instruction'/'input' is not a string")
        user = instruction + "\n" + inp if inp.strip() else instruction
        messages = _system(record) + _history(record.get("history")) + [
            {"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
    elif "prompt" in record and "response" in record:
        messages = _system(record) + _history(record.get("history")) + [
            {"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]
    elif "chosen" in record:
        raise FormatError("a preference record (has 'chosen'), not a conversation: use read_preferences")
    else:
        raise FormatError(f"no known conversation fields (keys: {sorted(record)[:8]})")
    messages = _drop_empty_system(messages)
    reason = check_conversation(messages, last="assistant")
    if reason:
        raise FormatError(reason)
    return messages


def iter_conversations(paths, report=None, seed=0, with_where=False):
    """Stream validated conversations from one or more files ("path[:weight]", a list, or a dict).

    Yields message lists (or ("path:line", messages) with with_where=True), weights applied.
    Skips are counted in `report` (pass a Report to read it afterwards)."""
    return _iter_records(paths, to_messages, report, seed, with_where)


def read_conversations(paths, seed=0, with_where=False):
    """All validated conversations of `paths` as a list, plus the Report. See iter_conversations."""
    report = Report()
    return list(iter_conversations(paths, report, seed, with_where)), report


# -----------------------------------------------------------------------------
# Preferences

HH_HUMAN, HH_ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def split_hh(chosen, rejected):
    """Split an Anthropic HH pair into (prompt messages, chosen reply, rejected reply).

    The prompt is the longest shared prefix of the two transcripts cut back to its last
    "\\n\\nAssistant:" marker; the replies are what follows that marker in each transcript
    (stripped). The prompt transcript is parsed into alternating user/assistant turns."""
    if not isinstance(chosen, str) or not isinstance(rejected, str):
        raise FormatError("HH 'chosen'/'rejected' are not strings")
    n = len(os.path.commonprefix([chosen, rejected]))
    cut = chosen.rfind(HH_ASSISTANT, 0, n)
    if cut < 0:
        raise FormatError("HH transcripts share no '\\n\\nAssistant:' turn")
    start = cut + len(HH_ASSISTANT)
    parts = _HH_TURN.split(chosen[:cut])  # ['', 'Human', text, 'Assistant', text, ...]
    if parts[0].strip():
        raise FormatError("HH transcript does not start with '\\n\\nHuman:'")
    messages = [{"role": "user" if who == "Human" else "assistant", "content": text.strip()}
                for who, text in zip(parts[1::2], parts[2::2])]
    return messages, chosen[start:].strip(), rejected[start:].strip()


def _response(r):
    """A response may be a string, an assistant message, or a list of messages ending on one."""
    if isinstance(r, list) and r:
        r = r[-1]
    if isinstance(r, dict):
        if _role(r.get("role", "assistant")) != "assistant":
            raise FormatError("response message is not an assistant turn")
        r = r.get("content")
    if not isinstance(r, str):
        raise FormatError(f"response is not a string (got {type(r).__name__})")
    return r


def to_preference(record):
    """Normalise one preference record to {"messages", "responses", "kind"} (validated).

    "messages" is the prompt conversation (ends on a user turn), "responses" the replies
    best first (>= 2, non-empty, distinct), "kind" the record's "kind" or None; an optional "ended"
    (one bool per response: False = a sampled answer cut at the length limit) is kept, aligned."""
    if not isinstance(record, dict):
        raise FormatError(f"not a JSON object (got {type(record).__name__})")
    is_hh = (isinstance(record.get("chosen"), str) and record["chosen"].startswith(HH_HUMAN)
             and not any(k in record for k in ("prompt", "messages", "history")))
    if is_hh:
        messages, chosen, rejected = split_hh(record["chosen"], record.get("rejected"))
        responses = [chosen, rejected]
    else:
        if "messages" in record:
            messages = _system(record) + _message_list(record["messages"])
        else:
            prompt = record.get("prompt", record.get("question", record.get("instruction")))
            if isinstance(prompt, list):  # conversational prompt (list of messages)
                turns = _message_list(prompt)
            elif isinstance(prompt, str):
                if isinstance(record.get("input"), str) and record["input"].strip():
                    prompt = prompt + "\n" + record["input"]  # Alpaca-style preference sets
                turns = [{"role": "user", "content": prompt}]
            else:
                raise FormatError(f"no prompt (keys: {sorted(record)[:8]})")
            messages = _system(record) + _history(record.get("history")) + turns
        ranking = record.get("responses", record.get("ranked"))
        if ranking is not None:
            if not isinstance(ranking, list):
                raise FormatError("'responses'/'ranked' is not a list")
            responses = [_response(r) for r in ranking]
        elif "chosen" in record and "rejected" in record:
            responses = [_response(record["chosen"]), _response(record["rejected"])]
        else:
            raise FormatError("no 'chosen'/'rejected' or 'responses'/'ranked'")
    messages = _drop_empty_system(messages)
    reason = check_conversation(messages, last="user")
    if reason:
        raise FormatError("prompt: " + reason)
    if len(responses) < 2:
        raise FormatError(f"fewer than 2 responses ({len(responses)})")
    for i, r in enumerate(responses):
        if not r.strip():
            raise FormatError(f"empty response (rank {i})")
    # A ranking may list the same text twice (oasst ties); keep its best rank. Two identical
    # responses of a pair, though, carry no preference signal: that record is skipped.
    ended = record.get("ended")   # sampled answers cut at the length limit (dpo.py rounds; common.encode_group)
    if ended is not None and not (isinstance(ended, list) and len(ended) == len(responses)
                                  and all(isinstance(e, bool) for e in ended)):
        raise FormatError("'ended' must be a list of booleans, one per response")
    first = {}
    for i, r in enumerate(responses):
        first.setdefault(r, i)
    responses = list(first)
    if len(responses) < 2:
        raise FormatError("identical responses (chosen == rejected gives no preference signal)")
    out = {"messages": messages, "responses": responses, "kind": record.get("kind")}
    if ended is not None:
        out["ended"] = [ended[first[r]] for r in responses]
    return out


def response_conversations(record):
    """A normalised preference record -> one full conversation per response (best first), each the
    prompt messages + {"role": "assistant", "content": response}: what reward.py / dpo.py render."""
    return [record["messages"] + [{"role": "assistant", "content": r}] for r in record["responses"]]


def iter_preferences(paths, report=None, seed=0, with_where=False):
    """Stream normalised preference records ({"messages", "responses", "kind"}); see iter_conversations."""
    return _iter_records(paths, to_preference, report, seed, with_where)


def read_preferences(paths, seed=0, with_where=False):
    """All normalised preference records of `paths` as a list, plus the Report."""
    report = Report()
    return list(iter_preferences(paths, report, seed, with_where)), report


if __name__ == "__main__":
    # Lint files: python data/formats.py FILE... [--preferences]
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    if not args:
        sys.exit(__doc__)
    read = read_preferences if "--preferences" in sys.argv else read_conversations
    for path in args:
        try:
            _, rep = read(path)
            print(f"{path}: {rep.summary()}")
        except (ValueError, OSError) as e:
            print(f"{path}: ERROR {e}")
