"""serve.py: the official openai client against a server started here gets exactly model.generate's
tokens (chat and raw completions, streamed or not, greedy and seeded sampling, stop strings); bad
requests get 400/401/404 in OpenAI's error shape and the server keeps answering; a full queue gets
429 with Retry-After, a timeout 503, and a client that hangs up frees its slot; a real headless
Chromium types questions into the web chat and sees the streamed answers; chat.py --raw continues text."""
import http.client
import json
import socket
import threading
import time

import pytest
import torch

import chat
import common
import serve
from model import Llama, LlamaConfig

openai = pytest.importorskip("openai")

KEY = "test-key"
CHINESE = [{"role": "system", "content": "You are nanollama."}, {"role": "user", "content": "你好，你是谁？"},
           {"role": "assistant", "content": "我是一个小模型。"}, {"role": "user", "content": "Where does Alice live?"}]


@pytest.fixture(scope="module")
def model_and_tok(tmp_path_factory):
    """A tiny random model saved as a checkpoint with the shipped tokenizer and loaded back the way
    serve.py loads it (chat.load_chat_model)."""
    from tokenizer import Tokenizer
    d = tmp_path_factory.mktemp("serve")
    tok = Tokenizer()
    torch.manual_seed(0)
    model = Llama(LlamaConfig.from_preset("tiny", vocab_size=tok.vocab_size, max_seq_len=192))
    common.save_checkpoint(str(d), "final", model, step=0, config={}, tokenizer=tok)
    model, tok = chat.load_chat_model(str(d), "cpu")
    return model, tok, d


@pytest.fixture(scope="module")
def start(model_and_tok):
    """start(**server options) -> a running Server on a free port; all are shut down at the end."""
    model, tok, _ = model_and_tok
    servers = []

    def _start(**kw):
        srv = serve.make_server(model, tok, port=0, quiet=True, **kw)
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(srv)
        return srv

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the worker thread shares the 2 cores with chromium and the client
    yield _start
    torch.set_num_threads(threads)
    for srv in servers:
        srv.shutdown()
        srv.server_close()


@pytest.fixture(scope="module")
def keyed(start):
    return start(api_key=KEY, max_tokens=100)


def client(srv, key=KEY):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{srv.server_address[1]}/v1", api_key=key, max_retries=0,
                         timeout=30)


def expected(model, tok, prompt, max_tokens, temperature=0.0, seed=None, raw=False):
    """What model.generate says for the same prompt: (text, number of tokens, finish_reason).
    raw: prompt is [BOS] + a text's tokens, and the text is its continuation (leading space kept)."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    with torch.no_grad():
        ids = model.generate([prompt], max_tokens, temperature=temperature, eos_id=tok.stop_ids, generator=gen)[0]
    finish = "stop" if ids and ids[-1] in tok.stop_ids else "length"
    text = tok.decode(chat.strip_stop(ids, tok.stop_ids), continuation=raw)
    if raw:  # the prompt's text + the continuation is the decode of all the ids
        assert tok.decode(prompt[1:]) + text == tok.decode(prompt[1:] + chat.strip_stop(ids, tok.stop_ids))
    return text, len(ids), finish


def post(srv, path, body, headers=None):
    """Raw HTTP (the openai client cannot send malformed JSON): -> (status, headers, parsed body)."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=30)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request("POST", path, data, {"Content-Type": "application/json", **(headers or {})})
    r = conn.getresponse()
    out = r.status, dict(r.getheaders()), json.loads(r.read() or b"null")
    conn.close()
    return out


def assert_error_shape(body):
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str) and err["message"]


# -----------------------------------------------------------------------------
# The API equals model.generate


@pytest.mark.parametrize("stream", [False, True])
def test_chat_completions_equal_generate(model_and_tok, keyed, stream):
    model, tok, _ = model_and_tok
    text, n, finish = expected(model, tok, tok.render_prompt(CHINESE), 40)
    c = client(keyed)
    kw = dict(model="nanollama", messages=CHINESE, temperature=0, max_tokens=40)
    if stream:
        chunks = list(c.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
        content = [ch.choices[0].delta.content for ch in chunks if ch.choices and ch.choices[0].delta.content]
        assert len(content) > 1, "the answer came in one piece: not streamed"
        got = "".join(content)
        assert chunks[0].choices[0].delta.role == "assistant"
        got_finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
        assert got_finish == [finish]
        assert chunks[-1].choices == []  # include_usage: the usage chunk comes last, with no choices
        usage = chunks[-1].usage
    else:
        r = c.chat.completions.create(**kw)
        got, usage = r.choices[0].message.content, r.usage
        assert r.choices[0].finish_reason == finish and r.choices[0].message.role == "assistant"
    assert got == text and text
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(tok.render_prompt(CHINESE)), n)


@pytest.mark.parametrize("stream", [False, True])
def test_completions_equal_generate(model_and_tok, keyed, stream):
    model, tok, _ = model_and_tok
    prompt = "Once upon a time, 小明"
    text, n, finish = expected(model, tok, [tok.bos_id] + tok.encode(prompt), 30, raw=True)
    kw = dict(model="nanollama", prompt=prompt, temperature=0, max_tokens=30)
    if stream:
        chunks = list(client(keyed).completions.create(stream=True, **kw))
        assert len([ch for ch in chunks if ch.choices[0].text]) > 1
        got = "".join(ch.choices[0].text for ch in chunks)
        assert chunks[-1].choices[0].finish_reason == finish
        assert chunks[-1].usage.completion_tokens == n  # usage rides on the last chunk
    else:
        r = client(keyed).completions.create(**kw)
        got = r.choices[0].text
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(tok.encode(prompt)) + 1, n)
    assert got == text and text


def test_seeded_sampling_equals_generate(model_and_tok, keyed):
    model, tok, _ = model_and_tok
    text, _, _ = expected(model, tok, tok.render_prompt(CHINESE), 30, temperature=0.9, seed=1234)
    greedy, _, _ = expected(model, tok, tok.render_prompt(CHINESE), 30)
    c = client(keyed)
    kw = dict(model="m", messages=CHINESE, temperature=0.9, max_tokens=30, seed=1234)
    assert c.chat.completions.create(**kw).choices[0].message.content == text != greedy
    other = c.chat.completions.create(**{**kw, "seed": 99}).choices[0].message.content
    assert other != text  # the seed is used, not a fixed generator


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_cut_the_answer(model_and_tok, keyed, stream):
    model, tok, _ = model_and_tok
    full, _, _ = expected(model, tok, tok.render_prompt(CHINESE), 40)
    stop = [full[12:15], "never-appears"]
    kw = dict(model="m", messages=CHINESE, temperature=0, max_tokens=40, stop=stop)
    if stream:
        chunks = list(client(keyed).chat.completions.create(stream=True, **kw))
        got = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        finish = chunks[-1].choices[0].finish_reason
    else:
        r = client(keyed).chat.completions.create(**kw)
        got, finish = r.choices[0].message.content, r.choices[0].finish_reason
    assert got == full[:full.find(stop[0])] and finish == "stop"


def test_text_stream_holds_back_a_possible_stop_string(tok):
    ids = tok.encode("abcXYdef")
    s = serve.TextStream(tok, ["XYZ"])
    pieces = [s.push(i) for i in ids] + [s.finish()]
    assert "".join(pieces) == "abcXYdef" and s.finish_reason is None
    s = serve.TextStream(tok, ["Yd"])
    out = "".join(s.push(i) for i in ids)
    assert out == "abcX" and s.finish_reason == "stop"  # "X" was sent, "Y" held until "Yd" matched
    # an answer drops the dummy prefix's space; a raw continuation (/v1/completions) keeps its space
    ids = tok.encode("The fox jumps")[len(tok.encode("The fox")):]
    for continuation, want in ((False, "jumps"), (True, " jumps")):
        s = serve.TextStream(tok, [], continuation=continuation)
        assert "".join(s.push(i) for i in ids) + s.finish() == want


# -----------------------------------------------------------------------------
# Bad requests, keys, routes: OpenAI's error shape, and the server keeps serving


def test_bad_requests_get_400_and_the_server_keeps_serving(model_and_tok, keyed):
    auth = {"Authorization": f"Bearer {KEY}"}
    user = [{"role": "user", "content": "hi"}]
    bad = [
        b"{not json",
        b"[1, 2]",
        {"messages": []},
        {"messages": "hi"},
        {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]},  # wrong order
        {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},  # ends on assistant
        {"messages": [{"role": "wizard", "content": "a"}]},
        {"messages": [{"role": "user", "content": 5}]},
        {"messages": user, "temperature": "hot"},
        {"messages": user, "temperature": 3},
        {"messages": user, "max_tokens": True},
        {"messages": user, "max_tokens": 0},
        {"messages": user, "top_p": 0},
        {"messages": user, "n": 2},
        {"messages": user, "stream": "yes"},
        {"messages": user, "stop": ["a", "b", "c", "d", "e"]},
        {"messages": user, "seed": 1.5},
        {"messages": [{"role": "user", "content": "word " * 400}]},  # longer than the context (192)
    ]
    for body in bad:
        status, headers, out = post(keyed, "/v1/chat/completions", body, auth)
        assert status == 400, (body, status, out)
        assert_error_shape(out)
        assert headers["Content-Type"].startswith("application/json")
    # the prompt check counts prompt + max_tokens against the context of 192: one token over is refused
    tok = model_and_tok[1]
    msgs = [{"role": "user", "content": "word " * 60}]
    room = 192 - len(tok.render_prompt(msgs))
    assert room < 100  # under the server's cap, so the cap does not hide the check
    status, _, out = post(keyed, "/v1/chat/completions", {"messages": msgs, "max_tokens": room + 1}, auth)
    assert status == 400 and out["error"]["code"] == "context_length_exceeded"
    assert post(keyed, "/v1/chat/completions", {"messages": msgs, "max_tokens": room}, auth)[0] == 200
    assert post(keyed, "/v1/completions", {"prompt": 7}, auth)[0] == 400
    assert post(keyed, "/v1/completions", {"prompt": "a", "echo": True}, auth)[0] == 400
    status, _, out = post(keyed, "/v1/nowhere", {"messages": user}, auth)
    assert status == 404
    assert_error_shape(out)
    # the openai client raises its 400 error type, with the message
    with pytest.raises(openai.BadRequestError, match="must come from the user"):
        client(keyed).chat.completions.create(model="m", messages=[{"role": "assistant", "content": "x"}])
    # max_tokens over the cap is capped, unknown fields are ignored, and the server still answers
    status, _, out = post(keyed, "/v1/chat/completions", {"messages": user, "max_tokens": 10 ** 6, "temperature": 0,
                                                         "frequency_penalty": 0, "user": "me"}, auth)
    model, tok = model_and_tok[:2]
    assert status == 200 and out["usage"]["completion_tokens"] == expected(model, tok, tok.render_prompt(user), 100)[1]


def test_api_key(keyed):
    with pytest.raises(openai.AuthenticationError) as e:
        client(keyed, "wrong").chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 401
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):  # none, wrong, not "Bearer"
        status, _, out = post(keyed, "/v1/completions", {"prompt": "a"}, headers)
        assert status == 401 and out["error"]["code"] == "invalid_api_key"
    assert [m.id for m in client(keyed).models.list()] == ["nanollama"]


# -----------------------------------------------------------------------------
# Load: a bounded queue, 429 when full, timeouts, a disconnect frees the slot at once


def test_full_queue_timeout_and_disconnect(model_and_tok, start):
    srv = start(max_queue=1, timeout=30)
    port = srv.server_address[1]
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 5}).encode()
    with srv.engine.model_lock:  # freeze the worker: admitted requests wait
        # A: admitted, waiting for the model; its client will hang up
        a = socket.create_connection(("127.0.0.1", port))
        a.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body) + body)
        deadline = time.monotonic() + 10
        while srv.engine.admit._value != 0:  # noqa: SLF001 (the semaphore's count: 0 = queue full)
            assert time.monotonic() < deadline, "request A was never admitted"
            time.sleep(0.01)
        # B: the queue is full -> 429 with Retry-After, in the error shape
        status, headers, out = post(srv, "/v1/chat/completions", json.loads(body))
        assert status == 429 and int(headers["Retry-After"]) >= 1
        assert_error_shape(out)
        with pytest.raises(openai.RateLimitError):
            client(srv).chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        # A hangs up: its slot is free at once (the handler polls every 0.1 s), not after generating
        a.close()
        deadline = time.monotonic() + 5
        while srv.engine.admit._value != 1:  # noqa: SLF001
            assert time.monotonic() < deadline, "the slot of a client that left was not freed"
            time.sleep(0.01)
        # C: admitted, but the model stays busy past the request's timeout -> 503 with Retry-After
        srv.timeout = 0.5
        status, headers, out = post(srv, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
        assert status == 503 and out["error"]["code"] == "timeout" and "Retry-After" in headers
        srv.timeout = 30
    # the worker is free again: the server still answers
    r = client(srv).chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=5)
    assert r.usage.completion_tokens >= 1
    deadline = time.monotonic() + 5  # (the slot is released just after the response is written)
    while srv.engine.admit._value != 1:  # noqa: SLF001: nothing leaked
        assert time.monotonic() < deadline, "a slot leaked"
        time.sleep(0.01)


class Slow:
    """The model, generating at 10 ms a token and counting the tokens it makes (what the server's
    worker calls: parameters() and generate())."""

    def __init__(self, model):
        self.model, self.count = model, 0

    def parameters(self):
        return self.model.parameters()

    def generate(self, *a, callback, **kw):
        def slow(b, t):
            self.count += 1
            time.sleep(0.01)
            callback(b, t)
        return self.model.generate(*a, callback=slow, **kw)


def test_disconnect_mid_stream_stops_generating(model_and_tok, start):
    """A client that hangs up mid-answer stops generate at the next token (not after max_tokens)."""
    model, tok, _ = model_and_tok
    msgs = [{"role": "user", "content": "hi"}]
    assert expected(model, tok, tok.render_prompt(msgs), 100)[1] == 100  # the full answer would be 100 tokens

    srv = start()
    srv.engine.model = slow = Slow(model)
    body = json.dumps({"messages": msgs, "stream": True, "max_tokens": 100, "temperature": 0}).encode()
    s = socket.create_connection(("127.0.0.1", srv.server_address[1]))
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    got = b""
    while got.count(b"data: ") < 3:  # the role chunk and two pieces of text
        got += s.recv(4096)
    s.close()
    time.sleep(0.3)  # the worker finishes the token in hand and stops
    with srv.engine.model_lock:  # ... and is idle again
        assert 3 <= slow.count < 30, slow.count


def test_timeout_while_generating(model_and_tok, start):
    """Past --timeout mid-answer: 503 (nothing sent yet), or an error event and [DONE] in a stream;
    the worker stops and the slot is free."""
    model, _, _ = model_and_tok
    srv = start(timeout=0.3)
    srv.engine.model = slow = Slow(model)  # 100 tokens would take 1 s
    kw = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100, "temperature": 0}
    status, headers, out = post(srv, "/v1/chat/completions", kw)
    assert status == 503 and out["error"]["code"] == "timeout" and "Retry-After" in headers
    assert slow.count < 60
    conn = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=30)
    conn.request("POST", "/v1/chat/completions", json.dumps({**kw, "stream": True}).encode())
    r = conn.getresponse()
    events = [line[6:].strip() for line in r.read().split(b"\n") if line.startswith(b"data: ")]
    assert r.status == 200 and events[-1] == b"[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "timeout" and len(events) > 3  # text came, then the error
    assert srv.engine.admit._value == srv.max_queue  # noqa: SLF001: every slot free


# -----------------------------------------------------------------------------
# A real browser


def test_browser_chat_and_continue_text(model_and_tok, start):
    import cdp
    if cdp.find_chromium() is None:
        pytest.skip("no chromium binary (Debian: apt-get install chromium; .ci/run installs it)")
    model, tok, _ = model_and_tok
    srv = start()
    CTX = model.config.max_seq_len
    MT = min(128, CTX // 2)  # the page's default answer length: half the context (chat.py's rule), at most 128
    q1, q2 = "你好！Who are you?", "And where do you live?"
    a1, _, _ = expected(model, tok, tok.render_prompt([{"role": "user", "content": q1}]), MT)
    conv = [{"role": "user", "content": q1}, {"role": "assistant", "content": a1}, {"role": "user", "content": q2}]
    assert len(tok.render_prompt(conv)) + MT > CTX  # the history does not fit: the page must drop exchange 1
    a2, _, _ = expected(model, tok, tok.render_prompt(conv, max_len=CTX - MT), MT)
    q3 = "再见"
    conv3 = [{"role": "user", "content": q2}, {"role": "assistant", "content": a2}, {"role": "user", "content": q3}]
    a3, _, _ = expected(model, tok, tok.render_prompt(conv3, max_len=CTX - MT), MT)
    with cdp.Browser(f"http://127.0.0.1:{srv.server_address[1]}/") as b:
        b.wait(f"document.getElementById('max_tokens').value === '{MT}'")  # read from /v1/models
        assert cdp.ask(b, q1) == a1  # typed, sent, streamed into the page: exactly the greedy answer
        assert b.eval("window.chunks") > 1, "the answer did not arrive in pieces"
        assert b.eval("window.forgotten || 0") == 0
        assert cdp.ask(b, q2) == a2  # too long with the history: the oldest exchange was dropped, then asked
        assert b.eval("window.forgotten") == 1
        assert cdp.ask(b, q3) == a3  # the page sent the (remaining) history along
        assert b.eval("[...document.querySelectorAll('.user')].map(e => e.textContent)") == [q1, q2, q3]
        # Chinese labels, then "continue text" mode (/v1/completions) on a Chinese prompt
        b.eval("const l = document.getElementById('lang'); l.value = 'zh'; l.dispatchEvent(new Event('change'));"
               "const m = document.getElementById('mode'); m.value = 'raw'; m.dispatchEvent(new Event('change'));")
        assert b.eval("document.getElementById('send').textContent") == "续写"
        start_text = "从前有一座山，"
        cont, _, _ = expected(model, tok, [tok.bos_id] + tok.encode(start_text), MT, raw=True)
        b.eval(f"document.getElementById('raw').value = {json.dumps(start_text)}; document.getElementById('send').click()")
        b.wait("!document.getElementById('send').disabled && document.getElementById('raw').value.length > "
               f"{len(start_text)}")
        assert b.eval("document.getElementById('raw').value") == start_text + cont
        # the Stop button: abort mid-answer; the page keeps what came, the server stops generating
        srv.engine.model = slow = Slow(model)
        b.eval(f"document.getElementById('raw').value = {json.dumps(start_text)}; document.getElementById('send').click()")
        b.wait(f"document.getElementById('raw').value.length > {len(start_text) + 2}")
        b.eval("document.getElementById('stop').click()")
        b.wait("!document.getElementById('send').disabled")
        assert cont.startswith(b.eval("document.getElementById('raw').value")[len(start_text):])  # kept what came
        time.sleep(0.2)
        with srv.engine.model_lock:
            assert slow.count < MT // 2, slow.count


# -----------------------------------------------------------------------------
# chat.py --raw


def test_chat_raw_continues_text(model_and_tok, capsys):
    model, tok, d = model_and_tok
    prompt = "The quick brown fox"
    cont, _, _ = expected(model, tok, [tok.bos_id] + tok.encode(prompt), 20, raw=True)
    # the command line (in this process: a subprocess would pay torch's import again)
    chat.main(["--model", str(d), "--raw", "--prompt", prompt, "--max_new_tokens", "20", "--device", "cpu"])
    assert capsys.readouterr().out == cont + "\n"
    # the batch path (--prompts_file) and the interactive loop: each line is continued on its own
    assert chat.generate_answers(model, tok, [prompt, "你好"], max_new_tokens=20, raw=True) == \
        [cont, expected(model, tok, [tok.bos_id] + tok.encode("你好"), 20, raw=True)[0]]
    import argparse
    import io
    lines = iter([prompt, prompt, "/exit"])
    out = io.StringIO()
    args = argparse.Namespace(model=str(d), system=None, seed=0, max_new_tokens=20, temperature=0.0, top_k=None,
                              top_p=None, raw=True)
    chat.chat_loop(model, tok, args, inp=lambda _: next(lines), out=out)
    assert out.getvalue().split("\n")[1:3] == [prompt + cont] * 2  # the same both times: no history
