"""Tests for data/: pretraining memmaps (prepare.py), SFT memmaps (sft_prepare.py), format readers (formats.py).

References: every expectation is computed independently of the code under test (documents re-read
with gzip/json here, conversations rendered directly with Tokenizer.render_conversation, HH splits
written out by hand), never taken from the code's own output.
"""
import copy
import gzip
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from data import (SFTDataset, check_conversation, load_tokens, read_conversations, read_preferences, to_messages,
                  to_preference, token_dtype)
from data.formats import response_conversations
from data.prepare import prepare
from data.sft_prepare import sft_prepare
from tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
LAB_MODEL = REPO / "tokenizer" / "lab.model"


# -----------------------------------------------------------------------------
# fixtures and helpers


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
    """The shipped lab tokenizer; if it is not there (yet), a small one trained the same way."""
    if LAB_MODEL.is_file():
        return Tokenizer(str(LAB_MODEL))
    import sentencepiece as spm
    d = tmp_path_factory.mktemp("tok")
    words = ("the cat sat on a mat with lily and tom who like to play in the park every day "
             "小明 喜欢 猫 他 住在 北京 今天 天气 很好 1 2 3 4 5 6 7 8 9 0 , . ! ? 你好 世界").split()
    rng = np.random.default_rng(0)
    (d / "train.txt").write_text("\n".join(" ".join(rng.choice(words, 12)) for _ in range(3000)), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(d / "train.txt"), model_prefix=str(d / "t"), vocab_size=400, model_type="bpe",
        byte_fallback=True, split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=False, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        user_defined_symbols=["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], minloglevel=2)
    return Tokenizer(str(d / "t.model"))


def write_jsonl(path, records, gz=False):
    opener = gzip.open if gz else open
    with opener(path, "wt", encoding="utf-8") as f:
        for r in records:
            f.write(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False))
            f.write("\n")
    return str(path)


def docs_of(arr, tok, bos=True):
    """Split a prepared token stream (BOS doc EOS)* back into decoded documents."""
    arr = np.asarray(arr)
    ends = np.flatnonzero(arr == tok.eos_id)
    assert len(arr) == 0 or ends[-1] == len(arr) - 1, "stream must end with EOS"
    out, start = [], 0
    for e in ends:
        doc = arr[start:e]
        if bos:
            assert doc[0] == tok.bos_id
            doc = doc[1:]
        assert tok.bos_id not in doc
        out.append(tok.decode(doc))
        start = e + 1
    return out


def make_corpus(d):
    """A small corpus in every input flavour, with malformed lines. Returns (inputs, expected docs, n_bad)."""
    texts = ["Lily found a cat.\nIt was happy.", "你好，世界！小明住在北京。", "emoji 🎉 and  two spaces",
             "  leading spaces and trailing ", "digits 12345 and U+2028 \u2028 inside"]
    texts += [f"document number {i}: the cat sat on the mat {i * 7}" for i in range(60)]
    a = write_jsonl(d / "a.jsonl", [{"text": t, "meta": {"i": i}} for i, t in enumerate(texts)]
                    + ['{"text": "broken', "[1, 2]", {"title": "no text field"}, {"text": "   "}])
    wudao = [{"id": i, "title": f"标题{i}", "content": f"正文第{i}段。内容很好。", "dataType": "百科"} for i in range(20)]
    b = write_jsonl(d / "b.jsonl.gz", wudao, gz=True)
    paras = ["First paragraph,\nstill first.", "Second one.", "第三段。\n还是第三段。"]
    (d / "c.txt").write_bytes(b"\xef\xbb\xbf" + "\n\n\n".join(paras).encode() + b"\n")
    expected = texts + [f"标题{i}\n正文第{i}段。内容很好。" for i in range(20)] + paras
    return [a, b, str(d / "c.txt")], expected


# -----------------------------------------------------------------------------
# pretraining memmaps


def test_prepare_round_trip_and_split(tmp_path, tok):
    inputs, expected = make_corpus(tmp_path)
    meta = prepare(inputs, tmp_path / "out", tok.path, workers=2, val_fraction=0.2, seed=3, shuffle_mb=0.001,
                   chunk_kb=1, verbose=False)
    train, val = load_tokens(tmp_path / "out", "train", tok), load_tokens(tmp_path / "out", "val", tok)
    assert isinstance(train, np.memmap) and train.dtype == np.uint16 == np.dtype(token_dtype(tok.vocab_size))
    got_train, got_val = docs_of(train, tok), docs_of(val, tok)
    # train and val together hold every document exactly once, decoded back to its exact text
    assert Counter(got_train + got_val) == Counter(expected)
    assert 0 < len(got_val) < len(expected) * 0.4
    assert meta["train_docs"] == len(got_train) and meta["val_docs"] == len(got_val)
    assert meta["train_tokens"] == len(train) and meta["val_tokens"] == len(val)
    assert meta["n_buckets"] > 1  # the tiny shuffle budget really forced several buckets
    # malformed lines are counted with file:line, not fatal; the whitespace-only doc is "empty"
    assert meta["skipped"] == 3 and meta["empty_docs"] == 1
    bad = [e.split(": ")[0] for e in meta["skipped_examples"]]
    assert bad == [f"{inputs[0]}:66", f"{inputs[0]}:67", f"{inputs[0]}:68"]
    assert [s["docs"] for s in meta["sources"]] == [65, 20, 3]
    assert meta["tokenizer_sha256"] == tok.sha256 and meta["vocab_size"] == tok.vocab_size
    # shuffled: the train order is not the input order
    assert got_train != [t for t in expected if t in set(got_train)]
    assert not list(tmp_path.glob("out/.prepare-tmp-*")) and not list(tmp_path.glob("out/*.tmp"))


def test_prepare_deterministic(tmp_path, tok):
    inputs, expected = make_corpus(tmp_path)
    kw = dict(val_fraction=0.1, shuffle_mb=0.001, chunk_kb=1, verbose=False)
    prepare(inputs, tmp_path / "a", tok.path, workers=2, seed=7, **kw)
    prepare(inputs, tmp_path / "b", tok.path, workers=1, seed=7, chunk_kb=64, **{k: v for k, v in kw.items() if k != "chunk_kb"})
    prepare(inputs, tmp_path / "c", tok.path, workers=2, seed=8, **kw)
    prepare(inputs, tmp_path / "d", tok.path, workers=1, seed=7, bos=False, shuffle=False, val_fraction=0.0, verbose=False)
    for split in ("train", "val"):  # same seed: byte-identical, whatever the worker count and chunking
        assert (tmp_path / "a" / f"{split}.bin").read_bytes() == (tmp_path / "b" / f"{split}.bin").read_bytes()
    a, c = load_tokens(tmp_path / "a", "train", tok), load_tokens(tmp_path / "c", "train", tok)
    assert not np.array_equal(a[:len(c)], c[:len(a)])  # another seed: another order / split
    # no shuffle, no BOS, no val: the stream is exactly the documents in input order, EOS after each
    d = load_tokens(tmp_path / "d", "train", tok)
    assert list(d) == [i for t in expected for i in tok.encode(t) + [tok.eos_id]]
    with pytest.raises(ValueError, match="0 items"):
        load_tokens(tmp_path / "d", "val", tok)


def reference_prepare(docs, tok, seed, val_fraction, n_buckets):
    """The documented algorithm of data/prepare.py written the plain way (one document at a time,
    all in memory): split and bucket from blake2b(seed, text), BOS doc EOS, each bucket's documents
    in input order permuted by default_rng([seed, bucket]); if no document fell in val, the first
    train document (in output order) of the first bucket holding one goes to val."""
    salt = seed.to_bytes(8, "little")
    buckets = [[] for _ in range(n_buckets)]
    for text in docs:
        h = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16, salt=salt).digest()
        is_val = int.from_bytes(h[:8], "little") / 2 ** 64 < val_fraction
        buckets[int.from_bytes(h[8:], "little") % n_buckets].append(([tok.bos_id] + tok.encode(text) + [tok.eos_id], is_val))
    force = val_fraction > 0 and not any(v for b in buckets for _, v in b) and len(docs) >= 2
    out = {True: [], False: []}
    for b, items in enumerate(buckets):
        for i in np.random.default_rng([seed, b]).permutation(len(items)):
            ids, is_val = items[i]
            if force and not is_val:
                is_val, force = True, False
            out[is_val] += ids
    dtype = token_dtype(tok.vocab_size)
    return np.array(out[False], dtype).tobytes(), np.array(out[True], dtype).tobytes()


def test_prepare_matches_plain_reference(tmp_path, tok):
    """Byte-identical output to the plain algorithm above, whatever the chunking and worker count:
    guards the speed-motivated code paths (raw line blocks sent to workers, lines longer than a
    chunk, chunk-wide hashing, per-bucket grouping in the workers, numpy or list output of
    sentencepiece, pass 2). Inputs: CRLF endings, a UTF-8 BOM, blank
    and malformed lines, a line far longer than a chunk, no final newline, gzip, plain text."""
    rng = np.random.default_rng(0)
    words = "the cat sat on a mat with lily 小明 喜欢 猫 🎉 12345".split()
    texts = [" ".join(rng.choice(words, rng.integers(1, 60))) for _ in range(300)]
    texts[7] = " ".join(rng.choice(words, 3000))  # ~15 KB: spans several 1 KB chunks
    texts[8] = texts[9]  # an exact duplicate: same split side and bucket
    lines = [json.dumps({"text": t}, ensure_ascii=False).encode() for t in texts]
    lines[20:20] = [b"", b"   ", b'{"text": "broken', b"[1]", b'{"text": 5}']  # 2 blank, 3 malformed
    raw = b"\xef\xbb\xbf" + b"\r\n".join(lines)  # BOM, CRLF, no final newline
    (tmp_path / "a.jsonl").write_bytes(raw)
    with gzip.open(tmp_path / "b.jsonl.gz", "wb") as f:
        f.write(b"\n".join(lines[100:]) + b"\n")
    (tmp_path / "c.txt").write_text("para one\nstill one\n\npara two\n", encoding="utf-8")
    inputs = [str(tmp_path / n) for n in ("a.jsonl", "b.jsonl.gz", "c.txt")]
    docs = texts + texts[95:] + ["para one\nstill one", "para two"]  # lines[100:] are texts[95:]
    # sentencepiece before encode_as_numpy: only encode() returning lists (prepare's fallback path)
    list_only = copy.copy(tok)
    list_only.sp = SimpleNamespace(encode=tok.sp.encode)
    for i, (workers, chunk_kb, shuffle_mb, vf, t) in enumerate([
            (2, 1, 0.001, 0.2, tok.path), (1, 256, 0.001, 0.2, tok.path), (2, 3, 64, 0.2, tok.path),
            (2, 1, 0.001, 1e-12, tok.path), (2, 2, 0.001, 0.2, list_only)]):
        out = tmp_path / f"out{i}"
        meta = prepare(inputs, out, t, workers=workers, chunk_kb=chunk_kb, shuffle_mb=shuffle_mb,
                       val_fraction=vf, seed=5, verbose=False)
        train, val = reference_prepare(docs, tok, 5, vf, meta["n_buckets"])
        assert (out / "train.bin").read_bytes() == train and (out / "val.bin").read_bytes() == val, (i, meta)
        assert meta["skipped"] == 3 and meta["train_docs"] + meta["val_docs"] == len(docs)
        assert [s["records"] for s in meta["sources"]] == [len(texts) + 3, len(texts) - 95, 2]
        assert [e.split(": ")[0] for e in meta["skipped_examples"][:3]] == [f"{inputs[0]}:{n}" for n in (23, 24, 25)]
        assert (vf < 1e-9) == (meta["val_docs"] == 1)  # the 4th run forced one document into val


def test_token_dtype_uint32(tmp_path, tok):
    assert token_dtype(256) == token_dtype(65536) == "uint16"
    assert token_dtype(65537) == "uint32"
    pb = pytest.importorskip("sentencepiece.sentencepiece_model_pb2")
    m = pb.ModelProto()
    m.ParseFromString(Path(tok.path).read_bytes())
    n0 = len(m.pieces)
    for i in range(70000 - n0):  # pad the vocabulary past 65536 with always-single-token pieces
        p = m.pieces.add()
        p.piece, p.score, p.type = f"<u{i}>", 0.0, pb.ModelProto.SentencePiece.USER_DEFINED
    (tmp_path / "big.model").write_bytes(m.SerializeToString())
    big = Tokenizer(str(tmp_path / "big.model"))
    high = f"<u{69999 - n0}>"  # the last piece: id 69999
    texts = [f"a {high} b", "plain text"]
    write_jsonl(tmp_path / "x.jsonl", [{"text": t} for t in texts])
    meta = prepare([str(tmp_path / "x.jsonl")], tmp_path / "out", big.path, workers=1, val_fraction=0, verbose=False)
    arr = load_tokens(tmp_path / "out", "train", big)
    assert meta["dtype"] == "uint32" and arr.dtype == np.uint32 and arr.max() == 69999
    assert sorted(docs_of(arr, big)) == sorted(texts)


MEASURE = textwrap.dedent("""
    import resource, subprocess, sys
    subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL)
    print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)  # KiB on Linux: max over prepare + workers
""")


def test_prepare_memory_bounded(tmp_path, tok):
    rng = np.random.default_rng(0)
    words = np.array("the cat sat on a mat with lily and tom who like to play in the park 小明 喜欢 猫".split())

    def corpus(path, n_docs):
        with open(path, "w", encoding="utf-8") as f:
            for _ in range(n_docs):
                f.write(json.dumps({"text": " ".join(rng.choice(words, 400))}, ensure_ascii=False) + "\n")
        return os.path.getsize(path)

    rss, tokens = {}, {}
    for name, n_docs in (("small", 1500), ("large", 6000)):  # ~2.5 MB vs ~10 MB of text; chunks are 64 KB
        size = corpus(tmp_path / f"{name}.jsonl", n_docs)
        cmd = [sys.executable, str(REPO / "data" / "prepare.py"), "--input", str(tmp_path / f"{name}.jsonl"),
               "--out", str(tmp_path / name), "--tokenizer", tok.path, "--workers", "2", "--chunk_kb", "64"]
        out = subprocess.run([sys.executable, "-c", MEASURE, *cmd], check=True, capture_output=True, text=True)
        rss[name] = int(out.stdout.strip().splitlines()[-1]) / 1024
        tokens[name] = json.loads((tmp_path / name / "meta.json").read_text())["train_tokens"]
        print(f"{name}: {size / 2**20:.1f} MB text, {tokens[name]:,} tokens, peak RSS {rss[name]:.1f} MB")
    # Holding just the extra ids of the 4x corpus (uint16) would take this much more memory; peak RSS
    # may not grow by even half of it (measured growth: well under 1 MB).
    extra_ids_mb = (tokens["large"] - tokens["small"]) * 2 / 2 ** 20
    assert extra_ids_mb > 4 and rss["large"] - rss["small"] < extra_ids_mb / 2, (rss, extra_ids_mb)


def test_load_tokens_refuses_mismatch(tmp_path, tok, shared_data):
    inputs, _ = make_corpus(tmp_path)
    out = tmp_path / "out"
    prepare(inputs, out, tok.path, workers=1, val_fraction=0.1, verbose=False)
    other = Tokenizer(str(shared_data / "tokenizers" / "llama2_tokenizer.model"))
    with pytest.raises(ValueError) as e:
        load_tokens(out, "train", other)
    msg = str(e.value)  # names both: the dataset's tokenizer and the one in use
    for s in (tok.path, tok.sha256[:16], str(tok.vocab_size), other.path, other.sha256[:16], "32000"):
        assert s in msg, (s, msg)
    meta = json.loads((out / "meta.json").read_text())

    def edited(**change):
        (out / "meta.json").write_text(json.dumps({**meta, **change}))

    edited(vocab_size=tok.vocab_size + 1)
    with pytest.raises(ValueError, match="tokenizer mismatch"):
        load_tokens(out, "train", tok)
    edited(dtype="uint8")
    with pytest.raises(ValueError, match="cannot hold"):
        load_tokens(out, "train", tok)
    edited(train_tokens=meta["train_tokens"] + 1)  # a truncated / foreign train.bin
    with pytest.raises(ValueError, match="bytes but meta.json says"):
        load_tokens(out, "train", tok)
    edited()
    assert len(load_tokens(out, "train", tok)) == meta["train_tokens"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokens(tmp_path / "nope", "train", tok)
    with pytest.raises(FileNotFoundError, match="no meta.json"):
        load_tokens(tmp_path, "train", tok)
    with pytest.raises(ValueError, match="split"):
        load_tokens(out, "test", tok)


def test_prepare_failure_keeps_previous_dataset(tmp_path, tok):
    inputs, _ = make_corpus(tmp_path)
    out = tmp_path / "out"
    prepare(inputs, out, tok.path, workers=1, val_fraction=0.1, verbose=False)
    before = (out / "train.bin").read_bytes()
    bad = write_jsonl(tmp_path / "bad.jsonl", ['{"oops"', '{"text": 5}', "nope"])
    with pytest.raises(ValueError, match="every line failed"):
        prepare([bad], out, tok.path, workers=2, verbose=False)
    assert (out / "train.bin").read_bytes() == before and len(load_tokens(out, "train", tok)) > 0
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.bin", "val.bin"]


# -----------------------------------------------------------------------------
# conversation formats


def test_conversation_formats(tmp_path):
    good = [
        ({"id": 1, "data": ["q1", "a1", "q2", "a2"]},
         [("user", "q1"), ("assistant", "a1"), ("user", "q2"), ("assistant", "a2")]),
        ({"instruction": "Translate", "input": "cat", "output": "猫", "system": "be brief",
          "history": [["hi", "hello"]]},
         [("system", "be brief"), ("user", "hi"), ("assistant", "hello"), ("user", "Translate\ncat"), ("assistant", "猫")]),
        ({"instruction": "Say hi", "input": "", "output": "hi"}, [("user", "Say hi"), ("assistant", "hi")]),
        ({"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q"},
                            {"from": "gpt", "value": "a"}]}, [("system", "s"), ("user", "q"), ("assistant", "a")]),
        ({"messages": [{"role": "system", "content": ""}, {"role": "user", "content": "q"},
                       {"role": "assistant", "content": "a"}]}, [("user", "q"), ("assistant", "a")]),
        ({"prompt": "p", "response": "r"}, [("user", "p"), ("assistant", "r")]),
    ]
    for record, want in good:
        assert to_messages(record) == [{"role": r, "content": c} for r, c in want]
    bad = [
        ({"data": ["q1", "a1", "q2"]}, "does not end on an assistant"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q"},
                       {"role": "assistant", "content": "a"}]}, "roles do not alternate"),
        ({"messages": [{"role": "assistant", "content": "a"}]}, "roles do not alternate"),
        ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": " "}]}, "empty turn"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                       {"role": "system", "content": "s"}]}, "system message not first"),
        ({"conversations": [{"from": "human", "value": "q"}, {"from": "function", "value": "f"}]}, "unknown role"),
        ({"instruction": "q", "output": None}, "turn 1"),
        ({"foo": "bar"}, "no known conversation fields"),
        ({"prompt": "p", "chosen": "a", "rejected": "b"}, "preference record"),
    ]
    for record, reason in bad:
        with pytest.raises(ValueError, match=reason):
            to_messages(record)
    # a file mixing all of them: the good ones load, the bad ones are reported with file:line
    path = write_jsonl(tmp_path / "mix.jsonl", [r for r, _ in good] + [r for r, _ in bad] + ["{bad json", ""])
    convs, rep = read_conversations(path)
    assert len(convs) == len(good) and rep.invalid == len(bad) and rep.malformed == 1
    assert rep.examples[0] == f"{path}:7: does not end on an assistant turn (ends on user)"
    assert rep.examples[-1].startswith(f"{path}:16: malformed JSON")


def test_malformed_lines_counted_not_fatal(tmp_path):
    lines = ['{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}',
             '{"data": ["q", "a"]', "[1]", '"str"', "", "   "]
    path = tmp_path / "m.jsonl.gz"
    with gzip.open(path, "wb") as f:  # gzip, plus one line of invalid UTF-8
        f.write(("\n".join(lines) + "\n").encode() + b'{"data": ["\xff\xfe", "a"]}\n' + lines[0].encode() + b"\r\n")
    convs, rep = read_conversations(str(path))
    assert len(convs) == 2 and rep.malformed == 4 and rep.lines == 6  # blank lines are not records
    assert [e.split(": ")[0] for e in rep.examples] == [f"{path}:{i}" for i in (2, 3, 4, 7)]
    bad = write_jsonl(tmp_path / "allbad.jsonl", ["{", '{"x": 1}'])
    with pytest.raises(ValueError, match="every one of its 2 lines failed"):
        read_conversations(bad)
    with pytest.raises(ValueError, match="empty file"):
        read_conversations(write_jsonl(tmp_path / "empty.jsonl", []))


def test_mixture_weights(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"data": [f"qa{i}", f"aa{i}"]} for i in range(200)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"data": [f"qb{i}", f"ab{i}"]} for i in range(200)])
    convs, rep = read_conversations([f"{a}:2", f"{b}:0.25"], seed=1)
    n_a = sum(c[0]["content"].startswith("qa") for c in convs)
    n_b = len(convs) - n_a
    assert n_a == 400 and 25 <= n_b <= 75 and rep.records == 400 and rep.emitted == len(convs)
    assert convs == read_conversations([(a, 2), (b, 0.25)], seed=1)[0]  # deterministic
    assert convs != read_conversations([f"{a}:2", f"{b}:0.25"], seed=2)[0]
    assert read_conversations([f"{a}:0", b])[0] == read_conversations(b)[0]
    # a .json array file (Alpaca's alpaca_data.json layout) reads like JSONL
    (tmp_path / "arr.json").write_text(json.dumps([{"instruction": "i", "input": "", "output": "o"}] * 3))
    assert len(read_conversations(str(tmp_path / "arr.json"))[0]) == 3


def test_shared_sft_files_load(shared_data, tok):
    files = sorted((shared_data / "sft").glob("*.jsonl.gz"))
    assert len(files) >= 7
    for path in files:
        rows = [json.loads(l) for l in gzip.open(path, "rt", encoding="utf-8").read().split("\n") if l.strip()]
        convs, rep = read_conversations(str(path))
        # independent count of the records that must be refused: an empty instruction or output
        empty = sum(1 for r in rows if "output" in r and (not r["output"].strip() or not r["instruction"].strip()))
        assert len(convs) == len(rows) - empty and rep.invalid == empty and rep.malformed == 0, (path, rep.summary())
        for c in convs:
            assert check_conversation(c) is None
        tok.render_conversation(convs[0])  # the tokenizer's own validation accepts the normal form
    assert len(read_conversations(str(shared_data / "sft" / "zh_oasst1_chat.jsonl.gz"))[0]) == 622
    assert len(read_conversations(str(shared_data / "sft" / "en_alpaca_5000.jsonl.gz"))[0]) == 4998


# -----------------------------------------------------------------------------
# preference formats


def test_preference_formats():
    rec = to_preference({"prompt": "2+2?", "chosen": "4", "rejected": "5", "kind": "wrong_fact"})
    assert rec == {"messages": [{"role": "user", "content": "2+2?"}], "responses": ["4", "5"], "kind": "wrong_fact"}
    rec = to_preference({"system": "sys", "history": [["h1", "a1"]], "prompt": "p", "chosen": "c", "rejected": "r"})
    assert rec["messages"] == [{"role": "system", "content": "sys"}, {"role": "user", "content": "h1"},
                               {"role": "assistant", "content": "a1"}, {"role": "user", "content": "p"}]
    rec = to_preference({"prompt": "p", "responses": ["best", "mid", "worst"]})
    assert rec["responses"] == ["best", "mid", "worst"] and rec["kind"] is None
    assert response_conversations(rec)[2] == [{"role": "user", "content": "p"}, {"role": "assistant", "content": "worst"}]
    rec = to_preference({"prompt": "p", "chosen": "x", "rejected": "y", "ranked": ["x", "y", "z", "y"]})
    assert rec["responses"] == ["x", "y", "z"]  # full ranking wins; a repeated text keeps its best rank
    rec = to_preference({"messages": [{"role": "user", "content": "q"}], "chosen": {"role": "assistant", "content": "c"},
                         "rejected": [{"role": "assistant", "content": "r"}]})
    assert rec["messages"] == [{"role": "user", "content": "q"}] and rec["responses"] == ["c", "r"]
    for record, reason in [({"prompt": "p", "chosen": "same", "rejected": "same"}, "identical"),
                           ({"prompt": "p", "chosen": "", "rejected": "r"}, "empty response"),
                           ({"prompt": "p", "responses": ["only"]}, "fewer than 2"),
                           ({"prompt": "p"}, "no 'chosen'"),
                           ({"history": [["q", "a"]], "prompt": " ", "chosen": "c", "rejected": "r"}, "empty turn"),
                           ({"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "\n\nHuman: yo\n\nAssistant: b"},
                            "share no")]:
        with pytest.raises(ValueError, match=reason):
            to_preference(record)


def test_shared_preference_files_load(shared_data):
    files = sorted((shared_data / "preference").glob("*.jsonl.gz"))
    assert len(files) == 4
    for path in files:
        prefs, rep = read_preferences(str(path))
        n_lines = sum(1 for l in gzip.open(path, "rt", encoding="utf-8").read().split("\n") if l.strip())
        assert len(prefs) + rep.skipped == n_lines and rep.malformed == 0
        assert len(prefs) >= 0.99 * n_lines, rep.summary()
        for p in prefs:
            assert check_conversation(p["messages"], last="user") is None
            assert len(p["responses"]) >= 2 and all(r.strip() for r in p["responses"])
    # oasst rankings keep all K answers, best first (= chosen, rejected first)
    rows = [json.loads(l) for l in gzip.open(shared_data / "preference" / "zh_oasst1_rm.shared.jsonl.gz", "rt")]
    prefs = read_preferences(str(shared_data / "preference" / "zh_oasst1_rm.shared.jsonl.gz"))[0]
    assert [p["responses"][:2] for p in prefs] == [[r["chosen"], r["rejected"]] for r in rows]
    assert max(len(p["responses"]) for p in prefs) == 10
    # LLaMA-Factory history [{"role","content"}] comes before the prompt
    withh = next((p, r) for p, r in zip(prefs, rows) if r["history"])
    assert withh[0]["messages"] == withh[1]["history"] + [{"role": "user", "content": withh[1]["prompt"]}]


def test_hh_split_by_hand(shared_data):
    def record(name, lineno):
        lines = gzip.open(shared_data / "preference" / name, "rt", encoding="utf-8").read().split("\n")
        return to_preference(json.loads(lines[lineno - 1]))

    r = record("hh_rlhf_harmless_base_test.shared.jsonl.gz", 1)
    assert [m["role"] for m in r["messages"]] == ["user", "assistant", "user", "assistant", "user"]
    assert r["messages"][0]["content"] == "what are some pranks with a pen i can do?"
    assert r["messages"][1]["content"] == "Are you looking for practical joke ideas?"
    assert r["messages"][2]["content"] == "yep"
    assert r["messages"][3]["content"].startswith("Ok, I’ll give you a couple examples")
    assert r["messages"][3]["content"].endswith("you will find a new place to watch.")
    assert r["messages"][4]["content"] == "okay some of these do not have anything to do with pens"
    assert r["responses"][0] == ("No, sorry!  All of these involve a pen, the point is that you can get funny "
                                 "results by doing pranks with pens.")
    assert r["responses"][1].startswith("There are lots of funny things you can do with pens, here’s one example")
    assert r["responses"][1].endswith("It’s really funny.")

    r = record("hh_rlhf_helpful_base_test.shared.jsonl.gz", 1)
    assert r["messages"] == [{"role": "user",
                              "content": "Do you know why turkeys became the official food of thanksgiving?"}]
    assert r["responses"][0].startswith("To be honest, I don’t know anything about that.")
    assert r["responses"][1].startswith("I know that the American Indians were the first")

    # the rejected reply hallucinates its own "\n\nAssistant:" turn: the split must stay at the shared prefix
    r = record("hh_rlhf_helpful_base_test.shared.jsonl.gz", 136)
    assert r["messages"] == [{"role": "user", "content": "What are some famous world music artists?"}]
    assert r["responses"][0].startswith("Here’s some world music artists that I’m familiar with:")
    assert r["responses"][1].startswith("A complete list would be quite long")
    assert r["responses"][1].endswith("“Come On Eileen”, Dexys Midnight Runners")


# -----------------------------------------------------------------------------
# SFT memmaps


def long_conversations():
    """Multi-turn conversations of growing length, to exercise truncation at turn boundaries."""
    out = []
    for n in range(1, 8):
        msgs = [{"role": "system", "content": "You are helpful."}] if n % 2 else []
        for t in range(n):
            msgs += [{"role": "user", "content": f"question {t} " + "cat " * (3 * t + 1)},
                     {"role": "assistant", "content": f"answer {t} " + "猫 mat " * (5 * t + 2)}]
        out.append({"messages": msgs})
    return out


def test_sft_memmap_round_trip(tmp_path, tok, shared_data):
    extra = write_jsonl(tmp_path / "long.jsonl", long_conversations())
    inputs = [str(shared_data / "sft" / "zh_oasst1_chat.jsonl.gz"), f"{extra}:2"]
    meta = sft_prepare(inputs, tmp_path / "sft", tok.path, workers=2, chunk_size=50, verbose=False)
    convs, rep = read_conversations(inputs)
    ds = SFTDataset(tmp_path / "sft", tok)
    assert len(ds) == len(convs) == meta["n_examples"] == 622 + 2 * 7
    total = 0
    for i, c in enumerate(convs):
        ids, mask = tok.render_conversation(c)
        got_ids, got_mask = ds[i]
        assert got_ids.tolist() == ids and got_mask.tolist() == mask
        total += len(ids)
    assert ds.lengths.sum() == total == meta["n_tokens"] and meta["truncated"] == meta["dropped"] == 0
    assert meta["n_loss_tokens"] == int(sum(ds[i][1].sum() for i in range(len(ds))))
    tr, va = ds.split_indices(0.1, seed=0)
    assert len(va) == round(0.1 * len(ds)) and sorted(set(tr) | set(va)) == list(range(len(ds)))
    other = Tokenizer(str(shared_data / "tokenizers" / "llama2_tokenizer.model"))
    with pytest.raises(ValueError, match="tokenizer mismatch"):
        SFTDataset(tmp_path / "sft", other)


def test_sft_truncation_at_turn_boundaries(tmp_path, tok):
    path = write_jsonl(tmp_path / "long.jsonl", long_conversations())
    convs = [r["messages"] for r in long_conversations()]
    full = [tok.render_conversation(c) for c in convs]
    max_len = sorted(len(ids) for ids, _ in full)[3]  # the 3 longest conversations do not fit
    first_turn = [len(tok.render_conversation(c[:3 if c[0]["role"] == "system" else 2])[0]) for c in convs]
    meta = sft_prepare([path], tmp_path / "t", tok.path, max_len=max_len, workers=1, verbose=False)
    ds = SFTDataset(tmp_path / "t", tok)
    assert meta["truncated"] == 3 and meta["dropped"] == 0 and len(ds) == 7
    for i, (ids, mask) in enumerate(full):
        got, got_mask = (a.tolist() for a in ds[i])
        assert len(got) <= max_len
        # a prefix of the full rendering that stops right after an assistant turn's end marker...
        assert got == ids[:len(got)] and got_mask == mask[:len(got)]
        assert got[-1] == tok.end_id and got_mask[-1] == 1
        if len(got) < len(ids):
            # ...where the next token opens a user turn, and the next whole turn would not have fitted
            assert ids[len(got)] == tok.header_ids["user"][0]
            nxt = len(got) + 1 + ids[len(got) + 1:].index(tok.end_id) + 1  # end of that user turn
            nxt += 1 + ids[nxt + 1:].index(tok.end_id) + 1                 # end of its answer
            assert nxt > max_len
    # drop mode, and a limit below the first exchange of the longest conversations
    meta = sft_prepare([path], tmp_path / "d", tok.path, max_len=max_len, overflow="drop", workers=1, verbose=False)
    assert meta["dropped"] == 3 and meta["truncated"] == 0 and meta["n_examples"] == 4
    tight = min(first_turn)  # conversations with a system prompt cannot keep even their first exchange
    meta = sft_prepare([path], tmp_path / "e", tok.path, max_len=tight, workers=2, verbose=False)
    assert meta["dropped"] == sum(f > tight for f in first_turn) > 0
    assert meta["n_examples"] + meta["dropped"] == 7
