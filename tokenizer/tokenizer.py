"""The tokenizer every stage uses: a thin wrapper around a sentencepiece model plus the chat template.

    from tokenizer import Tokenizer
    tok = Tokenizer()                        # the shipped tokenizer/lab.model
    tok = Tokenizer("path/to/tokenizer.model")   # any sentencepiece model, e.g. Meta's LLaMA 2 one
    ids = tok.encode("你好, world")          # no BOS/EOS unless asked: encode(text, bos=True, eos=True)
    tok.decode(ids) == "你好, world"          # exact round trip for any UTF-8 text (byte fallback)
    ids, mask = tok.render_conversation(messages)   # chat template + SFT loss mask, built together
    prompt = tok.render_prompt(messages)            # ... ending with the assistant header, for generation

THE CHAT TEMPLATE (the project's contract: sft, reward, dpo, ppo and chat all use it)
---------------------------------------------------------------------------------------
With a model that has the chat markers as single tokens (ours: tokenizer/train.py adds them):

    <s><|system|>▁SYSTEM<|end|><|user|>▁USER 1<|end|><|assistant|>▁ANSWER 1<|end|><|user|>▁USER 2<|end|>...
    mask  0  0  0 ... 0   0      0   0 ... 0   0        0        1 .... 1   1      0 ...

- One BOS `<s>` starts the conversation. A turn is `<|role|>` + content + `<|end|>`, and each content
  string is encoded on its own, so tokens never merge across a segment boundary.
- The dummy prefix. Our model, like Meta's LLaMA, has sentencepiece's add_dummy_prefix: encode(text)
  encodes "▁" + text, so every non-empty content starts with that dummy "▁" (its own piece, or
  merged into the first word: "Bob" opening an answer is the same token "▁Bob" as inside a question).
  An empty content is no tokens at all. Hence decode of a whole rendered conversation shows exactly
  one space after each header whose content is non-empty, and nothing else added:
      "<|system|> SYSTEM<|end|><|user|> USER 1<|end|><|assistant|> ANSWER 1<|end|>..."
  while decode of one content's ids alone gives the content back exactly (sentencepiece drops the
  dummy space of the first piece). With a model trained with --no-dummy_prefix the same code adds
  no spaces at all and decode(ids) is exactly the template text.
- The system turn is optional and may only come first; then user and assistant alternate, starting
  with the user.
- mask[i] == 1 exactly for the tokens of assistant contents (their dummy "▁" included) and the
  `<|end|>` closing each assistant turn (the model must learn to stop). BOS, role headers, system and
  user turns are 0. mask[i] says "ids[i] is a training target": for next-token prediction use inputs
  ids[:-1] and targets = ids[1:] where mask[1:] == 1, else -100.
- render_prompt(messages) is the same rendering of a conversation that ends on a user turn, followed
  by `<|assistant|>`; generation stops on any of `stop_ids` (`<|end|>` and `</s>`). The generated
  ids decode (tok.decode, or a StreamDecoder) to the answer without the dummy space.
- ids and mask are built segment by segment, never by searching for token patterns afterwards (an
  off-by-one mask bug in other codebases came from exactly that). Marker strings typed inside a
  content (a user writing "<|end|>") are encoded as ordinary characters, so nobody can forge a turn.

Fallback for models without the markers (e.g. Meta's LLaMA 2 tokenizer.model, which also has no
<pad>): the headers are the plain texts "System:", "User:", "Assistant:" and every turn ends with
EOS `</s>` instead of `<|end|>` (stop_ids == [eos_id]); pad_id falls back to unk_id (0 for LLaMA),
a token byte-fallback text never produces, so padding never looks like real text. Meta's model has
the dummy prefix too, so each segment decodes with a leading space ("User: Where...</s>").

Raw continuation (a base model continuing a text): the first generated piece's "▁" is a real space
("Alice lives in" + "▁Paris"), so decode such ids with decode(ids, continuation=True) or
stream_decoder(continuation=True); plain decode would drop it as if it were the dummy prefix.

Special ids of the shipped lab.model: <unk>=0 <s>=1 </s>=2 <pad>=3 <|system|>=4 <|user|>=5
<|assistant|>=6 <|end|>=7, then 256 byte pieces <0x00>..<0xFF> (ids 8..263).
"""
import codecs
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

import sentencepiece as spm

DEFAULT_MODEL = Path(__file__).resolve().parent / "lab.model"
ROLES = ("system", "user", "assistant")
CHAT_MARKERS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>", "end": "<|end|>"}
FALLBACK_HEADERS = {"system": "System:", "user": "User:", "assistant": "Assistant:"}


def _replace_per_byte(err):
    # sentencepiece's decoder writes one U+FFFD per undecodable byte; Python's "replace" writes one
    # per maximal bad run. This handler makes our incremental decoder agree with sp.decode exactly.
    return "\ufffd" * (err.end - err.start), err.end


codecs.register_error("nanollama_per_byte", _replace_per_byte)


def _atomic_write(path, data: bytes):
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp_")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


class Tokenizer:
    """A sentencepiece model + the chat template. Attributes: vocab_size, bos_id, eos_id, pad_id,
    unk_id, path, sha256 (of the model file: datasets record it so a mismatch is caught),
    has_chat_markers, end_id (what closes a turn), stop_ids."""

    def __init__(self, model_path=None):
        path = Path(model_path) if model_path is not None else DEFAULT_MODEL
        if path.is_dir():  # a HuggingFace directory written by save_hf (or a LLaMA download)
            path = path / "tokenizer.model"
        if not path.is_file():
            raise FileNotFoundError(f"sentencepiece model not found: {path}")
        data = path.read_bytes()
        self.path = str(path.resolve())
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(data)
        except RuntimeError as e:
            raise ValueError(f"{path} is not a sentencepiece model: {e}") from None
        sp = self.sp
        self.vocab_size = sp.vocab_size()
        self.unk_id, self.bos_id, self.eos_id = sp.unk_id(), sp.bos_id(), sp.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(f"{path}: the stack needs BOS and EOS pieces (bos_id={self.bos_id}, eos_id={self.eos_id})")
        # no <pad> (LLaMA): use <unk>, which byte-fallback text never produces; else EOS
        self.pad_id = sp.pad_id() if sp.pad_id() >= 0 else (self.unk_id if self.unk_id >= 0 else self.eos_id)

        marker_ids = {k: sp.piece_to_id(v) for k, v in CHAT_MARKERS.items()}
        # piece_to_id returns unk for a missing piece; also insist the piece is the marker itself
        self.has_chat_markers = all(i != self.unk_id and sp.id_to_piece(i) == CHAT_MARKERS[k]
                                    for k, i in marker_ids.items())
        if self.has_chat_markers:
            self.header_ids = {r: [marker_ids[r]] for r in ROLES}
            self.end_id = marker_ids["end"]
            # any marker text inside a content must not become a marker token (see _encode_content)
            self._marker_re = re.compile("|".join(re.escape(m) for m in CHAT_MARKERS.values()))
        else:
            self.header_ids = {r: sp.encode(FALLBACK_HEADERS[r]) for r in ROLES}
            self.end_id = self.eos_id
            self._marker_re = None
        self.stop_ids = sorted({self.end_id, self.eos_id})

        # byte string of every id, for StreamDecoder (decode piece by piece without O(n^2) re-decoding)
        self._id_bytes = []
        for i in range(self.vocab_size):
            if sp.is_control(i) or sp.is_unused(i):
                b = b""
            elif sp.is_unknown(i):
                b = " \u2047 ".encode()  # sentencepiece's unk surface " ⁇ "
            elif sp.is_byte(i):
                b = bytes([int(sp.id_to_piece(i)[3:5], 16)])  # "<0xE4>" -> b"\xe4"
            else:
                b = sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8")
            self._id_bytes.append(b)
        # models with add_dummy_prefix (LLaMA) drop the leading space of the first decoded piece;
        # detect it from behaviour (no protobuf needed): decode a piece that starts with "▁" alone.
        self.add_dummy_prefix = "".join(sp.encode_as_pieces("x")).startswith("\u2581")
        ws_piece = next((i for i in range(self.vocab_size) if self._id_bytes[i].startswith(b" ")
                         and not (sp.is_unknown(i) or sp.is_byte(i))), None)
        self._strip_first_space = (ws_piece is not None
                                   and len(sp.decode([ws_piece])) < len(self._id_bytes[ws_piece].decode()))
        # decode(continuation=True) puts this piece (text without a leading space) before the ids so
        # that their first space is not taken for the dummy prefix, then cuts its text off again
        self._anchor_id = next(i for i in range(self.vocab_size) if self._id_bytes[i]
                               and not self._id_bytes[i].startswith(b" ")
                               and not (sp.is_byte(i) or sp.is_unknown(i)))
        self._anchor_text = sp.decode([self._anchor_id])

        # _encode_content encodes the text after a split marker with a copy of the model whose
        # normalizer_spec.add_dummy_prefix is false (transformers' sentencepiece-backed LlamaTokenizer
        # with legacy=False did the same). No protobuf needed: a parser merges a message field that
        # occurs twice, so appending ModelProto field 3 (normalizer_spec) = {field 3
        # (add_dummy_prefix): 0} changes only that flag.
        self._sp_no_prefix = sp
        if self.add_dummy_prefix and self.has_chat_markers:
            self._sp_no_prefix = spm.SentencePieceProcessor()
            self._sp_no_prefix.LoadFromSerializedProto(data + b"\x1a\x02\x18\x00")
            if "".join(self._sp_no_prefix.encode_as_pieces("x")).startswith("\u2581"):
                raise ValueError(f"{path}: could not turn off the dummy prefix")

    def __repr__(self):
        return (f"Tokenizer({self.path!r}, vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id}, "
                f"pad={self.pad_id}, chat_markers={self.has_chat_markers})")

    # ---------------------------------------------------------------- encode / decode
    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list:
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__} (use encode_batch for lists)")
        ids = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_batch(self, texts, bos: bool = False, eos: bool = False, num_threads: int = 1) -> list:
        """Encode a list of strings in one C++ call. Keep num_threads=1 inside worker pools."""
        texts = list(texts)
        bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
        if bad is not None:
            raise TypeError(f"encode_batch: item {bad} is {type(texts[bad]).__name__}, not str")
        out = self.sp.encode(texts, num_threads=num_threads)
        if bos or eos:
            out = [([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else []) for ids in out]
        return out

    def decode(self, ids, continuation: bool = False) -> str:
        """ids -> text. Dummy-prefix models drop the leading space of the first piece (the dummy "▁"
        encode added). continuation=True: the ids continue a text (a raw prompt's continuation), so
        that space is real and kept: decode(p + c) == decode(p) + decode(c, continuation=True)."""
        ids = [int(i) for i in ids]  # accepts lists, numpy arrays, tensors
        bad = next((i for i in ids if not 0 <= i < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        if continuation and self._strip_first_space:
            return self.sp.decode([self._anchor_id] + ids)[len(self._anchor_text):]
        return self.sp.decode(ids)

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    def stream_decoder(self, continuation: bool = False) -> "StreamDecoder":
        """continuation: as in decode (True for a raw prompt's continuation, False for an answer)."""
        return StreamDecoder(self, continuation)

    # ---------------------------------------------------------------- chat template
    def _encode_content(self, text: str) -> list:
        """Encode one message content. With native markers, a marker string inside the text is split
        after its first character ("<" + "|end|>") so sentencepiece cannot match it as the special
        piece. Only the first part gets the dummy prefix (the others are encoded without it), so the
        ids decode back to exactly the content; without markers in the text this is encode(text)."""
        if not isinstance(text, str):
            raise TypeError(f"message content must be a str, got {type(text).__name__}")
        if self._marker_re is None:
            return self.sp.encode(text)
        ids, start = [], 0
        for m in self._marker_re.finditer(text):
            ids += (self._sp_no_prefix if start else self.sp).encode(text[start:m.start() + 1])
            start = m.start() + 1
        return ids + (self._sp_no_prefix if start else self.sp).encode(text[start:])

    @staticmethod
    def check_messages(messages, allow_last_user: bool = True):
        """Raise ValueError unless: optional system first, then user/assistant alternating from user."""
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
        expect = "user"
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"message {i} is not a {{'role', 'content'}} dict: {m!r:.80}")
            if not isinstance(m["content"], str):
                raise ValueError(f"message {i}: content is {type(m['content']).__name__}, not str")
            role = m["role"]
            if role == "system" and i == 0:
                continue
            if role != expect:
                raise ValueError(f"message {i}: role {role!r} where {expect!r} was expected "
                                 "(optional system first, then user/assistant alternating)")
            expect = "assistant" if role == "user" else "user"
        if not allow_last_user and messages[-1]["role"] != "assistant":
            raise ValueError("the conversation must end with an assistant turn")

    def _render(self, messages):
        """ids, mask and the lengths at which each assistant turn ends (whole-turn cut points)."""
        ids, mask, cuts = [self.bos_id], [0], []
        for m in messages:
            head = self.header_ids[m["role"]]
            body = self._encode_content(m["content"]) + [self.end_id]
            train = 1 if m["role"] == "assistant" else 0
            ids += head + body
            mask += [0] * len(head) + [train] * len(body)
            if train:
                cuts.append(len(ids))
        return ids, mask, cuts

    def render_conversation(self, messages, max_len=None):
        """messages -> (ids, mask), two lists of equal length (template in the module docstring).
        max_len: keep the longest prefix that ends after a whole assistant turn and has at most
        max_len tokens; returns ([], []) when not even the first exchange fits (callers drop and
        count such conversations: a turn is never cut in the middle)."""
        self.check_messages(messages)
        ids, mask, cuts = self._render(messages)
        if max_len is not None and len(ids) > max_len:
            fitting = [c for c in cuts if c <= max_len]
            if not fitting:
                return [], []
            ids, mask = ids[:fitting[-1]], mask[:fitting[-1]]
        return ids, mask

    def render_prompt(self, messages, max_len=None) -> list:
        """A conversation ending on a user turn -> ids ending with the assistant header, ready for
        generation. max_len: drop the oldest user/assistant exchanges (the system prompt is kept)
        until the prompt has at most max_len tokens; ValueError if even the last user turn does not fit."""
        self.check_messages(messages)
        if messages[-1]["role"] != "user":
            raise ValueError("render_prompt needs a conversation that ends with a user turn")
        messages = list(messages)
        while True:
            ids = self._render(messages)[0] + self.header_ids["assistant"]
            if max_len is None or len(ids) <= max_len:
                return ids
            first = 1 if messages[0]["role"] == "system" else 0
            if len(messages) - first <= 1:
                raise ValueError(f"the last user turn alone needs {len(ids)} tokens > max_len={max_len}")
            del messages[first:first + 2]  # one user + assistant exchange

    def chat_template_jinja(self):
        """The same template as a HuggingFace chat_template (only for models with native markers):
        apply_chat_template gives render_conversation's ids, as long as no content holds a marker
        string (HF's template is plain text, so there a typed "<|end|>" does become the marker)."""
        if not self.has_chat_markers:
            return None
        # HF's LLaMA tokenizer (legacy=False) adds the prefix space only at the very start of the
        # text, never after a special token: the template writes our dummy space itself. An empty
        # content gets none (encode("") is no tokens, not a dummy "▁").
        content = "message['content']"
        if self.add_dummy_prefix:
            content = "(' ' + message['content'] if message['content'] else '')"
        return ("{{ bos_token }}{% for message in messages %}"
                "{{ '<|' + message['role'] + '|>' + " + content + " + '<|end|>' }}"
                "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")

    # ---------------------------------------------------------------- HuggingFace export
    def save_hf(self, out_dir):
        """Write tokenizer.model, tokenizer_config.json, special_tokens_map.json and
        generation_config.json into out_dir (next to model.save_hf's config.json + weights) so that
        transformers.AutoTokenizer / LlamaTokenizer load the same tokenizer.
        transformers converts the sentencepiece model into its own BPE (tokenizers library) at load
        time; add_prefix_space mirrors the model's add_dummy_prefix, legacy=False. add_bos_token=True is
        the HF LLaMA convention (tok(text) = [bos] + our encode(text)). See the README for where the
        conversion differs (runs of spaces with whitespace-only pieces, leading spaces, literal <s>)."""
        os.makedirs(out_dir, exist_ok=True)
        _atomic_write(os.path.join(out_dir, "tokenizer.model"), Path(self.path).read_bytes())
        piece = self.sp.id_to_piece
        special = {"bos_token": piece(self.bos_id), "eos_token": piece(self.eos_id),
                   "unk_token": piece(self.unk_id), "pad_token": piece(self.pad_id)}
        # LlamaTokenizer rebuilds a BPE from the pieces, right for BPE models only; for a unigram model
        # the generic backend converts the proto itself. BPE scores are -rank (integers), unigram's
        # are log-probabilities: that tells the two apart without needing protobuf at runtime.
        sp = self.sp
        unigram = any(sp.get_score(i) != int(sp.get_score(i)) for i in range(self.vocab_size)
                      if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i)))
        cls = "TokenizersBackend" if unigram else "LlamaTokenizer"
        config = dict(special, tokenizer_class=cls, add_bos_token=True, add_eos_token=False,
                      add_prefix_space=self.add_dummy_prefix, legacy=False,
                      clean_up_tokenization_spaces=False, model_max_length=1_000_000_000)
        if self.has_chat_markers:
            config["chat_template"] = self.chat_template_jinja()
        gen = {"bos_token_id": self.bos_id, "eos_token_id": self.stop_ids, "pad_token_id": self.pad_id}
        for name, obj in (("tokenizer_config.json", config), ("special_tokens_map.json", special),
                          ("generation_config.json", gen)):
            _atomic_write(os.path.join(out_dir, name), (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode())


class StreamDecoder:
    """Incremental decoding for streamed generation: push(id) returns the new text, never half a
    UTF-8 character. Byte-fallback pieces (<0xE4><0xBD><0xA0> = "你") are held until the character
    is complete. "".join(pushes) + finish() == tok.decode(all ids, continuation), checked by the
    tests, including the leading-space rule of dummy-prefix models and one U+FFFD per undecodable byte."""

    def __init__(self, tok: Tokenizer, continuation: bool = False):
        self.tok = tok
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="nanollama_per_byte")
        # sentencepiece strips the dummy space of the first non-control piece; a continuation keeps it
        self._at_start = not continuation

    def push(self, token_id: int) -> str:
        i = int(token_id)
        if not 0 <= i < self.tok.vocab_size:
            raise ValueError(f"token id {i} is outside the vocabulary [0, {self.tok.vocab_size})")
        b = self.tok._id_bytes[i]
        if not b:  # control piece (<s>, </s>, <pad>): sentencepiece ends a byte run here
            out = self._utf8.decode(b"", final=True)
            self._utf8.reset()
            return out
        if self._at_start:
            self._at_start = False
            if self.tok._strip_first_space and b.startswith(b" ") and not (
                    self.tok.sp.is_byte(i) or self.tok.sp.is_unknown(i)):
                b = b[1:]
        return self._utf8.decode(b)

    def finish(self) -> str:
        """Flush: an incomplete character at the very end becomes U+FFFD (as sp.decode does)."""
        return self._utf8.decode(b"", final=True)
