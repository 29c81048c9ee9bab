"""
serve.py -- a model behind an OpenAI-compatible HTTP API and a one-page web chat, on the standard library.

Usage (any checkpoint chat.py takes: a run dir, a .pt checkpoint of ours, or a HuggingFace LLaMA dir):
    python serve.py --model lab_run/sft                    # open http://127.0.0.1:8000/ in a browser
    python serve.py --model lab_run/pretrain --port 8001   # a base model: the page's "continue text" mode
    python serve.py --model lab_run/sft --host 0.0.0.0 --api_key "$KEY"   # reachable from other machines
From any OpenAI client (the model name is not checked: one process serves one model):
    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.chat.completions.create(model="nanollama", messages=[{"role": "user", "content": "Hi"}])
or curl -N http://127.0.0.1:8000/v1/chat/completions -d '{"messages": [...], "stream": true}'

Endpoints (OpenAI's wire format for requests, responses, errors and server-sent-event streams):
    GET  /                      the web chat (HTML + JavaScript in this file: no build step, no CDN)
    GET  /v1/models             the one model
    POST /v1/chat/completions   messages -> an answer (chat template of tokenizer.render_prompt)
    POST /v1/completions        raw continuation of a prompt, for base models ([BOS] + the prompt's tokens)

How a request flows. ThreadingHTTPServer gives every connection a thread; that thread checks the
request, renders the prompt, and admits it if fewer than --queue requests are in the server (else 429
with Retry-After). One worker thread owns the model and runs admitted requests one at a time through
model.generate -- the same call chat.py and the tests use, so temperature 0 gives exactly its tokens.
generate's per-token callback, on the worker thread, turns tokens into whole UTF-8 characters (the
tokenizer's StreamDecoder), cuts at `stop` strings and, when streaming, writes the text to the
client's socket itself: no thread switch per token (on a busy 2-core machine each switch can wait
milliseconds for a core). The callback raises to stop generate at that token when the answer has
ended, the client is gone (a failed write, or the request's thread sees the socket closed) or the
per-request --timeout has passed: the slot is free at once.

Simplifications on purpose: one generation at a time (a CPU has no spare compute to batch with at
batch 1, and a batch waits for its longest answer -- bench/serve.py measures what queueing costs);
n=1 only; no logprobs, tools or penalties; `usage.completion_tokens` counts every token the model
generated, including the closing stop token (model.generate's length), but not tokens after a
stop string; a too-long prompt is refused (400), never silently shortened.
"""
import argparse
import hmac
import json
import math
import os
import queue
import select
import socket
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

import chat

MAX_BODY = 1 << 20  # bytes; a request body larger than this is refused (413)

# -----------------------------------------------------------------------------
# Request checking: OpenAI's field names; unknown fields are ignored, known ones must have the right type


class BadRequest(Exception):
    """Answered as {"error": {"message", "type", "param", "code"}} with the given HTTP status."""

    def __init__(self, message, param=None, status=400, code=None, etype="invalid_request_error", headers=None):
        super().__init__(message)
        self.status, self.param, self.code, self.etype = status, param, code, etype
        self.headers = headers or {}


def _number(body, name, default, lo, hi, integer=False):
    v = body.get(name)
    if v is None:
        return default
    # bool is an int subclass in Python: true must not pass as 1
    if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)):
        raise BadRequest(f"'{name}' must be {'an integer' if integer else 'a number'}, got {json.dumps(v)[:40]}", name)
    if not lo <= v <= hi:
        raise BadRequest(f"'{name}' must be between {lo} and {hi}, got {v}", name)
    return v


def _content_text(content, i):
    """A message content: a string, or OpenAI's list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise BadRequest(f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content")


def parse_sampling(body, ctx_left, max_tokens_cap):
    """The sampling fields both endpoints share -> a dict of checked values."""
    if not isinstance(body.get("model", ""), str):
        raise BadRequest("'model' must be a string", "model")
    if _number(body, "n", 1, 1, 1 << 30, integer=True) != 1:
        raise BadRequest("only n=1 is supported", "n")
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise BadRequest("'stream' must be a boolean", "stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict) or not isinstance(opts.get("include_usage", False), bool):
        raise BadRequest("'stream_options' must be an object like {\"include_usage\": true}", "stream_options")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else (stop or [])
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise BadRequest("'stop' must be a non-empty string or a list of at most 4 of them", "stop")
    for name in ("logprobs", "echo", "tools", "suffix"):
        if body.get(name) not in (None, False):
            raise BadRequest(f"'{name}' is not supported by this server", name)
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, name, None, 1, 1 << 30, integer=True)
    if ctx_left < 1:
        raise BadRequest(f"the prompt fills the model's whole context ({ctx_left} tokens left)", "messages",
                         code="context_length_exceeded")
    if max_tokens is None:
        max_tokens = min(max_tokens_cap, ctx_left)
    max_tokens = min(max_tokens, max_tokens_cap)  # the server's cap wins silently, as a length limit
    if max_tokens > ctx_left:
        raise BadRequest(f"the prompt leaves room for {ctx_left} new tokens in the context; max_tokens={max_tokens} "
                         "does not fit (shorten the prompt or ask for fewer tokens)", name, code="context_length_exceeded")
    top_p = float(_number(body, "top_p", 1.0, 0.0, 1.0))
    if top_p <= 0:  # an empty nucleus: nothing could be sampled
        raise BadRequest("'top_p' must be greater than 0", "top_p")
    seed = _number(body, "seed", None, -(1 << 63), (1 << 64) - 1, integer=True)
    return {"temperature": float(_number(body, "temperature", 1.0, 0.0, 2.0)),
            "top_p": top_p, "max_tokens": max_tokens, "stop": stop,
            "seed": seed % (1 << 63) if seed is not None else int.from_bytes(os.urandom(7), "little"),
            "stream": bool(stream), "include_usage": opts.get("include_usage", False)}


def chat_prompt(tok, body):
    """/v1/chat/completions body -> prompt ids (tok.render_prompt: the template the model was tuned on)."""
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise BadRequest("'messages' must be a non-empty list of {role, content} objects", "messages")
    clean = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise BadRequest(f"messages[{i}] must be an object with 'role' and 'content'", f"messages[{i}]")
        role = "system" if m["role"] == "developer" else m["role"]  # newer clients say "developer"
        clean.append({"role": role, "content": _content_text(m["content"], i)})
    if clean[-1]["role"] != "user":
        raise BadRequest("the last message must come from the user", "messages")
    try:
        return tok.render_prompt(clean)
    except ValueError as e:  # check_messages: roles out of order, system not first, unknown role
        raise BadRequest(str(e), "messages") from None


def completion_prompt(tok, body):
    """/v1/completions body -> [BOS] + the prompt's tokens: continuation, as in pretraining."""
    prompt = body.get("prompt", "")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise BadRequest("'prompt' must be a string (one prompt per request)", "prompt")
    return chat.raw_prompt(tok, prompt)


# -----------------------------------------------------------------------------
# Tokens -> text pieces


class TextStream:
    """Token ids in, text pieces out: whole UTF-8 characters only (StreamDecoder), nothing after a stop
    token or a `stop` string, and a tail that could still grow into a stop string is held back, so a
    streamed answer never shows text a non-streamed one would cut. continuation: a raw prompt's
    continuation (/v1/completions), whose first space is real text, not the dummy prefix."""

    def __init__(self, tok, stop_strings, continuation=False):
        self.tok, self.stops = tok, stop_strings
        self.decoder = tok.stream_decoder(continuation)
        self.text, self.sent = "", 0
        self.finish_reason = None  # "stop" once a stop token or stop string ended the answer

    def push(self, token):
        if self.finish_reason:  # already ended
            return ""
        if token in self.tok.stop_ids:
            out = self.finish()
            self.finish_reason = "stop"
            return out
        self.text += self.decoder.push(token)
        return self._emit(final=False)

    def finish(self):
        """The rest: held-back text, an incomplete character (as U+FFFD). Nothing after a stop."""
        if self.finish_reason:
            return ""
        self.text += self.decoder.finish()
        return self._emit(final=True)

    def _emit(self, final):
        hits = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.finish_reason, end = "stop", min(hits)
            self.text = self.text[:end]
        elif final:
            end = len(self.text)
        else:  # hold back the longest tail that is the start of some stop string
            hold = max([k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])], default=0)
            end = len(self.text) - hold
        out, self.sent = self.text[self.sent:max(end, self.sent)], max(end, self.sent)
        return out


# -----------------------------------------------------------------------------
# The engine: a bounded admission count, one worker thread that owns the model


class Cancelled(Exception):
    """Raised inside model.generate's callback to stop generating: a stop token or string ended the
    answer, the client is gone, or the request ran out of time."""


class Job:
    """One request on its way through the worker. sink(token) runs on the worker thread for every new
    token (it turns tokens into text and, when streaming, writes it to the client's socket itself: no
    thread switch per token); it raises Cancelled when no more tokens are wanted. finish(job) writes
    the end of the response, also on the worker thread. `lock` makes "check cancel, then write"
    atomic against the request's thread cancelling (and then answering a timeout itself)."""

    def __init__(self, prompt, params, deadline, sink, finish):
        self.prompt, self.params, self.deadline, self.sink, self.finish = prompt, params, deadline, sink, finish
        self.lock = threading.Lock()
        self.cancel = threading.Event()  # set by the request's thread: client gone, timed out while waiting
        self.done = threading.Event()    # set by the worker when generation has ended, for whatever reason
        self.started = False
        self.tokens = 0                  # tokens handed to sink (usage.completion_tokens)
        self.timed_out = self.client_gone = False
        self.error = None


class Engine:
    """Runs jobs through model.generate one at a time on its own thread. `admit` bounds how many
    requests are in the server (running + waiting); `model_lock` is held while generating (the tests
    hold it to freeze the worker and fill the queue deterministically)."""

    def __init__(self, model, tok, max_queue):
        self.model, self.tok = model, tok
        self.admit = threading.BoundedSemaphore(max_queue)
        self.model_lock = threading.Lock()
        self.jobs = queue.Queue()
        self.seconds_per_job = 1.0  # running mean, for Retry-After
        self.thread = threading.Thread(target=self._work, name="generate", daemon=True)
        self.thread.start()

    def _work(self):
        while True:
            job = self.jobs.get()
            if job is None:
                return
            with job.lock:
                if job.cancel.is_set():  # its client left, or it timed out, while it waited
                    job.done.set()
                    continue
                job.started = True
            with self.model_lock:
                t0 = time.monotonic()
                self._run(job)
                self.seconds_per_job = 0.8 * self.seconds_per_job + 0.2 * (time.monotonic() - t0)

    def _run(self, job):
        p = job.params

        def on_token(_, token):
            with job.lock:
                if job.cancel.is_set():
                    raise Cancelled
                if time.monotonic() > job.deadline:
                    job.timed_out = True
                    raise Cancelled
                job.tokens += 1
                job.sink(token)

        model = self.model
        generator = torch.Generator(device=next(model.parameters()).device).manual_seed(p["seed"])
        try:
            with chat._autocast(model):
                model.generate([job.prompt], p["max_tokens"], temperature=p["temperature"],
                               top_p=p["top_p"] if p["top_p"] < 1 else None, eos_id=self.tok.stop_ids,
                               callback=on_token, generator=generator)
        except Cancelled:
            pass
        except Exception as e:  # a failure in one request must not kill the worker
            print(f"serve: generation failed: {e!r}", file=sys.stderr)
            job.error = f"generation failed: {type(e).__name__}: {e}"
        try:
            with job.lock:
                if not job.cancel.is_set():  # (cancelled: the client is gone, nobody to answer)
                    job.finish(job)
        finally:
            job.done.set()

    def retry_after(self):
        waiting = self.jobs.qsize() + 1
        return str(max(1, math.ceil(waiting * self.seconds_per_job)))

    def close(self):
        self.jobs.put(None)


# -----------------------------------------------------------------------------
# HTTP


def error_body(message, etype="invalid_request_error", param=None, code=None):
    return {"error": {"message": message, "type": etype, "param": param, "code": code}}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive for plain responses; streams end by closing the connection
    server_version = "nanollama"
    # Socket timeout, seconds: an idle keep-alive connection is closed, and a client that stops
    # reading a stream (its socket buffer full) is dropped instead of stalling the worker for good.
    timeout = 15

    # -- plumbing
    def setup(self):
        super().setup()
        # Nagle's algorithm would hold each small SSE chunk until the client ACKs the previous one,
        # and clients delay ACKs by up to 40 ms: without this, streaming crawls at ~25 chunks/s.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, fmt, *args):
        if not self.server.quiet:
            super().log_message(fmt, *args)

    def send_json(self, status, obj, headers=None):
        data = json.dumps(obj, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def send_error_json(self, e: BadRequest):
        self.send_json(e.status, error_body(str(e), e.etype, e.param, e.code), e.headers)

    def client_gone(self):
        """True once the client closed its end (a readable socket with nothing to read)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def check_key(self):
        key = self.server.api_key
        if key is None:
            return
        auth = self.headers.get("Authorization", "")
        given = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(given.encode(), key.encode()):  # constant time: no timing oracle
            raise BadRequest("invalid API key (send it as 'Authorization: Bearer KEY')", status=401,
                             etype="invalid_request_error", code="invalid_api_key")

    def read_json(self):
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise BadRequest("the request needs a Content-Length header and a JSON body", status=411)
        if int(length) > MAX_BODY:
            raise BadRequest(f"request body of {length} bytes is over the limit of {MAX_BODY}", status=413)
        raw = self.rfile.read(int(length))
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BadRequest(f"the body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        return body

    # -- routes
    def do_GET(self):
        path = self.path.split("?")[0]
        try:
            if path in ("/", "/index.html"):
                data = page_html(self.server).encode("utf-8")
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            elif path == "/v1/models":
                self.check_key()
                self.send_json(200, {"object": "list", "data": [self.server.model_card]})
            else:
                raise BadRequest(f"no route GET {path}", status=404, code="unknown_url")
        except BadRequest as e:
            self.send_error_json(e)

    def do_POST(self):
        path = self.path.split("?")[0]
        try:
            if path not in ("/v1/chat/completions", "/v1/completions"):
                raise BadRequest(f"no route POST {path}", status=404, code="unknown_url")
            self.check_key()
            body = self.read_json()
            self.complete(body, chat=path == "/v1/chat/completions")
        except BadRequest as e:
            # the body may be unread (a wrong key, a wrong route): the connection cannot be reused
            e.headers["Connection"] = "close"
            self.send_error_json(e)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as e:  # never a traceback to the client; the server keeps serving
            print(f"serve: {self.command} {self.path} failed: {e!r}", file=sys.stderr)
            self.close_connection = True
            self.send_json(500, error_body(f"internal error: {type(e).__name__}", "server_error"))

    def complete(self, body, chat):
        srv = self.server
        prompt = chat_prompt(srv.tok, body) if chat else completion_prompt(srv.tok, body)
        params = parse_sampling(body, srv.ctx - len(prompt), srv.max_tokens)
        if not srv.engine.admit.acquire(blocking=False):
            raise BadRequest(f"the server is busy ({srv.max_queue} requests in flight); retry later", status=429,
                             etype="rate_limit_error", code="queue_full",
                             headers={"Retry-After": srv.engine.retry_after()})
        out = Answer(self, chat, params)
        job = Job(prompt, params, time.monotonic() + srv.timeout, out.sink, out.finish)
        try:
            srv.engine.jobs.put(job)
            self.wait(job)
            if job.timed_out and not job.started:  # the worker never saw it: answer here
                out.finish(job)
            if job.client_gone or out.gone or out.headers_sent:
                self.close_connection = True
        finally:
            with job.lock:
                job.cancel.set()          # whatever happened, stop generating for this request
            srv.engine.admit.release()    # ... and free the slot now, not when the worker notices

    def wait(self, job):
        """Until the worker is done with the job (it has answered); meanwhile, every 0.1 s: has the
        client left (then cancel: the worker stops at the next token), has a request still waiting
        for the model timed out (then cancel; the caller answers 503)?"""
        while not job.done.wait(0.1):
            if self.client_gone():
                with job.lock:
                    job.cancel.set()
                    job.client_gone = True
                return
            with job.lock:
                if not job.started and time.monotonic() > job.deadline:
                    job.cancel.set()
                    job.timed_out = True
                    return

    def envelope(self, chat, obj):
        return {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24], "object": obj,
                "created": int(time.time()), "model": self.server.model_name}

    def usage(self, job):
        p, n = len(job.prompt), job.tokens
        return {"prompt_tokens": p, "completion_tokens": n, "total_tokens": p + n}

    def job_error(self, job):
        """The job's failure as a BadRequest (503 timeout, 500 generation error), or None."""
        if job.timed_out:
            return BadRequest(f"the request took longer than the server's timeout of {self.server.timeout:g} s",
                              status=503, etype="server_error", code="timeout", headers={"Retry-After": "1"})
        if job.error:
            return BadRequest(job.error, status=500, etype="server_error")
        return None


class Answer:
    """Turns a job's tokens into the response: sink() runs on the worker thread for every token;
    finish() runs on the request's thread once the worker is done. Streamed, the worker writes each
    piece of text to the socket as it comes (the first token sends the headers, so an error before
    it -- a timeout in the queue -- is still a plain HTTP error); otherwise the text is collected."""

    def __init__(self, handler, chat, params):
        self.h, self.chat, self.params = handler, chat, params
        self.text = TextStream(handler.server.tok, params["stop"], continuation=not chat)
        self.pieces = []
        self.env = handler.envelope(chat, ("chat.completion" if chat else "text_completion")
                                    + (".chunk" if chat and params["stream"] else ""))
        self.headers_sent = self.gone = False

    # -- streaming: server-sent events
    def send(self, obj):
        h = self.h
        if not self.headers_sent:
            h.send_response(200)
            h.send_header("Content-Type", "text/event-stream; charset=utf-8")
            h.send_header("Cache-Control", "no-cache")
            h.send_header("Connection", "close")  # no Content-Length: the body ends when we close
            h.end_headers()
            self.headers_sent = True
            if self.chat:  # OpenAI's first chunk announces the role
                self.send({**self.env, "choices": [self.choice(first=True)]})
        data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
        try:
            h.wfile.write(f"data: {data}\n\n".encode("utf-8"))
        except OSError:  # broken pipe, reset, or a client too slow to take the bytes (socket timeout)
            self.gone = True
            raise Cancelled from None

    def choice(self, text=None, finish=None, first=False):
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}

    def sink(self, token):  # on the worker thread
        piece = self.text.push(token)
        if not self.params["stream"]:
            self.pieces.append(piece)
        elif piece:
            self.send({**self.env, "choices": [self.choice(piece)]})
        if self.text.finish_reason:
            raise Cancelled  # a stop token or string: no more tokens wanted

    def finish(self, job):
        """Write the end of the response: the JSON answer, or the stream's last chunks and [DONE], or
        the job's error. Runs on the worker thread right after generate (one thread switch less per
        request), or on the request's thread for a request that timed out before the model saw it."""
        h = self.h
        err = h.job_error(job)
        tail = self.text.finish()
        finish, usage = self.text.finish_reason or "length", h.usage(job)
        if err and not self.headers_sent:  # nothing sent yet: a plain HTTP error
            err.headers["Connection"] = "close"
            try:
                h.send_error_json(err)
            except OSError:
                pass
            return
        if not self.params["stream"]:
            text = "".join(self.pieces) + tail
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                       "finish_reason": finish} if self.chat else
                      {"index": 0, "text": text, "logprobs": None, "finish_reason": finish})
            try:
                h.send_json(200, {**self.env, "choices": [choice], "usage": usage})
            except OSError:
                self.gone = True
            return
        try:
            if err:  # mid-stream: the error travels as an event
                self.send(error_body(str(err), err.etype, err.param, err.code))
            else:
                if tail:
                    self.send({**self.env, "choices": [self.choice(tail)]})
                # usage rides on the last chunk always (a client that does not know it ignores it), and
                # on its own choice-less chunk when the client asked with stream_options.include_usage
                self.send({**self.env, "choices": [self.choice(finish=finish)], "usage": usage})
                if self.params["include_usage"]:
                    self.send({**self.env, "choices": [], "usage": usage})
            self.send("[DONE]")
        except Cancelled:
            pass


class Server(ThreadingHTTPServer):
    daemon_threads = True  # a hung client never keeps the process alive
    allow_reuse_address = True
    request_queue_size = 128  # the listen backlog (default 5): a burst of clients must reach the 429, not a reset

    def __init__(self, address, model, tok, name, max_queue=16, max_tokens=512, timeout=300.0, api_key=None,
                 quiet=False):
        super().__init__(address, Handler)
        self.model, self.tok, self.model_name = model, tok, name
        self.ctx = model.config.max_seq_len
        self.max_queue, self.max_tokens, self.timeout = max_queue, max_tokens, timeout
        self.api_key, self.quiet = api_key, quiet
        self.model_card = {"id": name, "object": "model", "created": int(time.time()), "owned_by": "nanollama",
                           "context_length": self.ctx}
        self.engine = Engine(model, tok, max_queue)

    def server_close(self):
        self.engine.close()
        super().server_close()


def make_server(model, tok, host="127.0.0.1", port=8000, name="nanollama", **kw):
    """A ready Server (call .serve_forever(), e.g. on a thread; port 0 picks a free one: .server_address)."""
    model.eval()
    return Server((host, port), model, tok, name, **kw)


# -----------------------------------------------------------------------------
# Command line


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Serve a nanollama model: OpenAI-compatible API + a web chat.")
    p.add_argument("--model", required=True, help="run dir, checkpoint .pt file, or HuggingFace LLaMA dir")
    p.add_argument("--tokenizer", default=None, help="sentencepiece .model (default: the one the checkpoint names)")
    p.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda | cuda:N")
    p.add_argument("--host", default="127.0.0.1", help="%(default)s: this machine only; 0.0.0.0 exposes it")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api_key", default=None, help="require 'Authorization: Bearer KEY' (default: no key)")
    p.add_argument("--name", default=None, help="model id reported by /v1/models (default: the --model path)")
    p.add_argument("--queue", type=int, default=16, help="requests in the server at once, running + waiting; "
                   "more get 429 (%(default)s)")
    p.add_argument("--max_tokens", type=int, default=512, help="cap on max_tokens per request (%(default)s)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request, waiting included (%(default)s)")
    p.add_argument("--quiet", action="store_true", help="no access log")
    args = p.parse_args(argv)
    if args.queue < 1 or args.max_tokens < 1 or args.timeout <= 0:
        p.error("need --queue >= 1, --max_tokens >= 1, --timeout > 0")
    return args


def main(argv=None):
    args = get_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok = chat.load_chat_model(args.model, torch.device(args.device), args.tokenizer)
    server = make_server(model, tok, args.host, args.port, args.name or args.model.rstrip("/"),
                         max_queue=args.queue, max_tokens=args.max_tokens, timeout=args.timeout,
                         api_key=args.api_key, quiet=args.quiet)
    host, port = server.server_address[:2]
    print(f"serving {args.model} ({model.num_params() / 1e6:.1f}M parameters, context {server.ctx}) on "
          f"http://{host}:{port}/  (API: http://{host}:{port}/v1; Ctrl-C stops)", flush=True)
    if args.host not in ("127.0.0.1", "localhost", "::1") and args.api_key is None:
        print("warning: reachable from other machines and no --api_key: anyone there can use it", file=sys.stderr)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


# -----------------------------------------------------------------------------
# The web chat: one page, plain JavaScript, talking to the API above (fetch + a stream reader)


def page_html(server):
    return PAGE.replace("__NEED_KEY__", "true" if server.api_key else "false").replace(
        "__MODEL__", json.dumps(server.model_name)[1:-1].replace("<", "\\u003c"))


PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>nanollama</title>
<style>
 body { font-family: system-ui, "Noto Sans", "Noto Sans CJK SC", "PingFang SC", "Microsoft YaHei", sans-serif;
        margin: 0; background: #f4f4f6; color: #222; }
 header { display: flex; gap: .8em; align-items: center; flex-wrap: wrap; padding: .6em 1em; background: #1f2937; color: #eee;
          position: sticky; top: 0; z-index: 1; }
 header b { font-size: 1.1em; margin-right: auto; }
 header label { font-size: .9em; }
 header input, header select { font: inherit; }
 #system { width: 100%; box-sizing: border-box; font: inherit; padding: .4em; border: 1px solid #ccc; border-radius: 6px; }
 main { max-width: 52em; margin: 0 auto; padding: 1em; }
 #log { display: flex; flex-direction: column; gap: .6em; margin: 1em 0; }
 .msg { padding: .6em .9em; border-radius: 10px; white-space: pre-wrap; word-wrap: break-word; max-width: 85%; }
 .user { align-self: flex-end; background: #2563eb; color: #fff; }
 .assistant { align-self: flex-start; background: #fff; border: 1px solid #ddd; }
 .error { align-self: center; background: #fee2e2; color: #991b1b; }
 #raw { width: 100%; box-sizing: border-box; min-height: 14em; font: inherit; padding: .6em; white-space: pre-wrap; }
 form { display: flex; gap: .5em; }
 #input { flex: 1; font: inherit; padding: .6em; border-radius: 8px; border: 1px solid #bbb; resize: vertical; }
 button { font: inherit; padding: .5em 1.1em; border-radius: 8px; border: 0; background: #2563eb; color: #fff; cursor: pointer; }
 button:disabled { background: #9ca3af; cursor: default; }
 #stop { background: #dc2626; }
 .hidden { display: none !important; }
 small { color: #666; }
</style></head>
<body>
<header>
 <b>nanollama</b> <small style="color:#bbb">__MODEL__</small>
 <label><span data-t="mode">Mode</span> <select id="mode"><option value="chat" data-t="chat">chat</option>
   <option value="raw" data-t="raw">continue text</option></select></label>
 <label><span data-t="temperature">Temperature</span> <input id="temperature" type="number" min="0" max="2" step="0.1" value="0" style="width:4em"></label>
 <label><span data-t="max_tokens">Max tokens</span> <input id="max_tokens" type="number" min="1" step="1" value="128" style="width:5em"></label>
 <label id="keybox" class="hidden">API key <input id="key" type="password" style="width:8em"></label>
 <select id="lang"><option value="en">English</option><option value="zh">中文</option></select>
</header>
<main>
 <div id="chatbox">
  <input id="system" data-tp="system" placeholder="System prompt (optional)">
  <div id="log"></div>
 </div>
 <textarea id="raw" class="hidden" data-tp="rawph" placeholder="Type the beginning of a text; the model continues it."></textarea>
 <form id="form">
  <textarea id="input" rows="2" data-tp="ask" placeholder="Ask something... (Enter sends, Shift+Enter: new line)"></textarea>
  <button id="send" type="submit" data-t="send">Send</button>
  <button id="stop" type="button" class="hidden" data-t="stop">Stop</button>
  <button id="reset" type="button" data-t="reset">New chat</button>
 </form>
</main>
<script>
"use strict";
const NEED_KEY = __NEED_KEY__;
const T = {
  en: {mode: "Mode", chat: "chat", raw: "continue text", temperature: "Temperature", max_tokens: "Max tokens",
       send: "Send", stop: "Stop", reset: "New chat", system: "System prompt (optional)",
       ask: "Ask something... (Enter sends, Shift+Enter: new line)", rawph: "Type the beginning of a text; the model continues it.",
       cont: "Continue"},
  zh: {mode: "模式", chat: "对话", raw: "续写", temperature: "温度", max_tokens: "最多 token",
       send: "发送", stop: "停止", reset: "新对话", system: "系统提示（可选）",
       ask: "输入问题……（回车发送，Shift+回车换行）", rawph: "输入一段开头，模型接着往下写。", cont: "续写"},
};
const $ = (id) => document.getElementById(id);
let history = [];          // the conversation so far: [{role, content}], sent whole with every question
let controller = null;     // AbortController of the answer being streamed (the Stop button aborts it)
window.chunks = 0;         // streamed pieces received (the browser test checks the answer really streamed)

function setLang(lang) {
  document.documentElement.lang = lang;
  document.querySelectorAll("[data-t]").forEach((e) => { e.textContent = T[lang][e.dataset.t]; });
  document.querySelectorAll("[data-tp]").forEach((e) => { e.placeholder = T[lang][e.dataset.tp]; });
  if ($("mode").value === "raw") $("send").textContent = T[lang].cont;
  localStorage.setItem("lang", lang);
}
function bubble(cls, text) {
  const d = document.createElement("div");
  d.className = "msg " + cls;
  d.textContent = text;
  $("log").appendChild(d);
  d.scrollIntoView({block: "end"});
  return d;
}
function busy(on) {
  $("send").disabled = on;
  $("stop").classList.toggle("hidden", !on);
}

// POST a streaming request; call onText(piece) for every piece; resolves when the stream ends.
async function streamRequest(path, body, onText) {
  controller = new AbortController();
  const headers = {"Content-Type": "application/json"};
  if (NEED_KEY) headers["Authorization"] = "Bearer " + $("key").value;
  const resp = await fetch(path, {method: "POST", headers, body: JSON.stringify({...body, stream: true}),
                                  signal: controller.signal});
  if (!resp.ok) {
    let err = {message: resp.status + " " + resp.statusText};
    try { err = (await resp.json()).error; } catch (e) {}
    throw Object.assign(new Error(err.message), {code: err.code});
  }
  const reader = resp.body.getReader();
  const utf8 = new TextDecoder("utf-8");   // stream mode: a character split across reads is kept whole
  let buf = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buf += utf8.decode(value, {stream: true});
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {      // one server-sent event per blank-line-ended block
      const line = buf.slice(0, cut).trim();
      buf = buf.slice(cut + 2);
      if (!line.startsWith("data: ")) continue;
      const data = line.slice(6);
      if (data === "[DONE]") return;
      const obj = JSON.parse(data);
      if (obj.error) throw new Error(obj.error.message);
      const c = obj.choices && obj.choices[0];
      const piece = c ? (c.delta ? c.delta.content : c.text) : "";
      if (piece) { window.chunks++; onText(piece); }
    }
  }
}

async function send() {
  const lang = $("lang").value;
  const params = {model: "__MODEL__", temperature: parseFloat($("temperature").value) || 0,
                  max_tokens: parseInt($("max_tokens").value) || 128};
  busy(true);
  try {
    if ($("mode").value === "raw") {
      const box = $("raw");
      await streamRequest("/v1/completions", {...params, prompt: box.value}, (t) => { box.value += t; });
    } else {
      const q = $("input").value;
      if (!q.trim()) return;
      $("input").value = "";
      bubble("user", q);
      const out = bubble("assistant", "");
      let answer = "", keep = false;
      try {
        for (;;) {
          const msgs = [];
          if ($("system").value.trim()) msgs.push({role: "system", content: $("system").value});
          msgs.push(...history, {role: "user", content: q});
          try {
            await streamRequest("/v1/chat/completions", {...params, messages: msgs}, (t) => {
              answer += t; out.textContent = answer; out.scrollIntoView({block: "end"});
            });
            keep = true;
            break;
          } catch (e) {
            keep = e.name === "AbortError";   // a stopped answer stays in the history as far as it got
            // too long for the context: forget the oldest exchange (as chat.py does) and retry
            if (e.code !== "context_length_exceeded" || history.length === 0) throw e;
            history.splice(0, 2);
            window.forgotten = (window.forgotten || 0) + 1;
          }
        }
      } finally {
        if (keep) history.push({role: "user", content: q}, {role: "assistant", content: answer});
        else out.remove();
        out.dataset.done = "1";
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") bubble("error", e.message);
  } finally {
    controller = null;
    busy(false);
  }
}

$("form").addEventListener("submit", (e) => { e.preventDefault(); send(); });
$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }   // not mid-IME
});
$("stop").addEventListener("click", () => { if (controller) controller.abort(); });   // the server frees the slot
$("reset").addEventListener("click", () => { history = []; $("log").textContent = ""; });
$("mode").addEventListener("change", () => {
  const raw = $("mode").value === "raw";
  $("chatbox").classList.toggle("hidden", raw);
  $("raw").classList.toggle("hidden", !raw);
  $("input").classList.toggle("hidden", raw);
  $("reset").classList.toggle("hidden", raw);
  setLang($("lang").value);
  if (!raw) $("send").textContent = T[$("lang").value].send;
});
$("lang").addEventListener("change", () => setLang($("lang").value));
if (NEED_KEY) { $("keybox").classList.remove("hidden"); $("key").value = localStorage.getItem("key") || "";
                $("key").addEventListener("change", () => localStorage.setItem("key", $("key").value)); }
$("lang").value = localStorage.getItem("lang") || (navigator.language.startsWith("zh") ? "zh" : "en");
setLang($("lang").value);
// answers of up to 128 tokens, or half the context of a smaller model (chat.py's rule), so that
// there is room left for the conversation
fetch("/v1/models", {headers: NEED_KEY ? {"Authorization": "Bearer " + $("key").value} : {}})
  .then((r) => r.json()).then((m) => {
    const ctx = m.data[0].context_length;
    if (ctx) $("max_tokens").value = Math.min(128, Math.floor(ctx / 2));
  }).catch(() => {});
</script>
</body></html>
"""


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as e:  # bad paths or files: one clear line, no traceback
        sys.exit(f"error: {e}")
