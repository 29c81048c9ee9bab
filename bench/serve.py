"""
bench/serve.py -- serve.py under load: time to first token, tokens/s, and what the server costs over
model.generate (a benchmark, not a test).

    python bench/serve.py --model lab_run/sft --questions lab_run/data/eval_qa.jsonl
    python bench/serve.py --model lab_run/sft --rounds 5 --threads 1

Everything runs in this one process: the server on a thread (serve.make_server, exactly what
serve.py runs), its clients on threads speaking raw HTTP with streaming (http.client, parsing the
server-sent events by hand, so the first token's arrival time is exact), and model.generate called
directly for the baseline. Greedy decoding, so the server and generate produce the same tokens for
the same question (the tests check that) and every comparison is the same work.

  generate vs server   batch 1: the same questions, one at a time, alternating generate and the server
                       (one client) so load from other jobs on the machine hits both alike. Two rates:
                       decode tokens/s = (tokens - 1) / (last token - first token), the steady
                       decoding speed (for generate: timestamps in its callback; through the server:
                       the first text chunk and the final chunk, as the client receives them), and
                       end-to-end tokens/s = tokens / request wall time (prefill, HTTP and prompt
                       rendering included: a fixed cost per request, large next to a 10-token
                       answer). Each is summed per round; the ratios are per round (median, min-max).
  1 client             TTFT (request sent -> first text chunk received) and the rates above.
  8 clients            8 threads, each sending --per_client streaming requests back to back: TTFT
                       p50/p99 (queueing included: the server runs one generation at a time),
                       per-request and aggregate tokens/s, and every request accounted for: a
                       complete answer (finish_reason + [DONE]) or an error, none lost or hung.
  overload             16 clients against --queue 4: the excess gets 429 + Retry-After at once.
"""
import argparse
import http.client
import json
import os
import statistics
import sys
import threading
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import chat  # noqa: E402
import serve  # noqa: E402

FALLBACK_QUESTIONS = ["Where does Alice live?", "What is 3 plus 4?", "Who are you?", "你好，你叫什么名字？",
                      "What does Bob like?", "How old is Carol?", "Tell me about Dave.", "What is 12 plus 9?"]

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", required=True, help="run dir or checkpoint (the lab SFT model)")
parser.add_argument("--questions", default=None, help="eval_qa.jsonl of the lab world (default: 8 fixed questions)")
parser.add_argument("--max_tokens", type=int, default=48, help="answer length limit (the lab evaluation's)")
parser.add_argument("--rounds", type=int, default=3, help="rounds of the batch-1 comparison")
parser.add_argument("--n_questions", type=int, default=8, help="questions per round / per client")
parser.add_argument("--clients", type=int, default=8)
parser.add_argument("--per_client", type=int, default=4, help="requests each concurrent client sends")
parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
args = parser.parse_args()
if args.threads:
    torch.set_num_threads(args.threads)

model, tok = chat.load_chat_model(args.model, "cpu")
if args.questions and os.path.isfile(args.questions):
    questions = [r["messages"] for r in chat.read_records(args.questions)][:args.n_questions]
else:
    questions = [[{"role": "user", "content": q}] for q in FALLBACK_QUESTIONS][:args.n_questions]


def start_server(**kw):
    srv = serve.make_server(model, tok, port=0, quiet=True, **kw)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return srv


def stream_request(port, messages):
    """One streaming chat request -> {"ttft", "seconds", "tokens", "ok", "error"}."""
    body = json.dumps({"messages": messages, "temperature": 0, "max_tokens": args.max_tokens, "stream": True}).encode()
    t0 = time.perf_counter()
    out = {"ttft": None, "tokens": 0, "ok": False, "error": None, "decode_s": None}
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        r = conn.getresponse()
        if r.status != 200:
            out["error"] = f"{r.status} {json.loads(r.read())['error']['code']}"
        else:
            finished = False
            for line in r:
                line = line.strip()
                if not line.startswith(b"data: "):
                    continue
                data = line[6:]
                if data == b"[DONE]":
                    out["ok"] = finished
                    break
                obj = json.loads(data)
                if "error" in obj:
                    out["error"] = obj["error"]["message"]
                    break
                choice = obj["choices"][0]
                if choice["delta"].get("content") and out["ttft"] is None:
                    out["ttft"] = time.perf_counter() - t0
                if choice["finish_reason"]:
                    finished, out["tokens"] = True, obj["usage"]["completion_tokens"]
                    if out["ttft"] is not None:
                        out["decode_s"] = time.perf_counter() - t0 - out["ttft"]
        conn.close()
    except (OSError, http.client.HTTPException) as e:
        out["error"] = f"{type(e).__name__}: {e}"
    out["seconds"] = time.perf_counter() - t0
    return out


def direct(messages):
    prompt = tok.render_prompt(messages)
    stamps = []
    t0 = time.perf_counter()
    with chat._autocast(model):
        ids = model.generate([prompt], args.max_tokens, temperature=0.0, eos_id=tok.stop_ids,
                             callback=lambda b, t: stamps.append(time.perf_counter()))[0]
    return {"seconds": time.perf_counter() - t0, "tokens": len(ids), "ttft": stamps[0] - t0,
            "decode_s": stamps[-1] - stamps[0]}


def rates(rows):
    """(decode tokens/s, end-to-end tokens/s) over rows, summed."""
    dec = [r for r in rows if r.get("decode_s")]
    return (sum(r["tokens"] - 1 for r in dec) / sum(r["decode_s"] for r in dec),
            sum(r["tokens"] for r in rows) / sum(r["seconds"] for r in rows))


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))] if xs else float("nan")


def concurrent(port, clients, per_client):
    results, lock = [], threading.Lock()

    def client(i):
        for j in range(per_client):
            r = stream_request(port, questions[(i + j) % len(questions)])
            with lock:
                results.append(r)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - t0


srv = start_server(max_tokens=args.max_tokens)
port = srv.server_address[1]
for q in questions[:2]:  # warm-up: first calls allocate and fill caches
    direct(q), stream_request(port, q)

# --- batch 1: generate vs the server, interleaved
dec_ratios, e2e_ratios, gen_rows, one_rows = [], [], [], []
for _ in range(args.rounds):
    g_round, s_round = [], []
    for q in questions:
        g_round.append(direct(q))
        s_round.append(stream_request(port, q))
        assert s_round[-1]["ok"] and s_round[-1]["tokens"] == g_round[-1]["tokens"], (s_round[-1], g_round[-1])
    (gd, ge), (sd, se) = rates(g_round), rates(s_round)  # greedy: the same answers, the same work
    dec_ratios.append(sd / gd)
    e2e_ratios.append(se / ge)
    gen_rows += g_round
    one_rows += s_round

many, many_wall = concurrent(port, args.clients, args.per_client)
srv.shutdown()
srv.server_close()
small = start_server(max_tokens=args.max_tokens, max_queue=4)
over, over_wall = concurrent(small.server_address[1], 16, 1)
small.shutdown()
small.server_close()


def row(name, rows, wall=None):
    ok = [r for r in rows if r.get("ok", True)]
    errs = [r for r in rows if r.get("error")]
    lost = len(rows) - len(ok) - len(errs)   # neither an answer nor an error: must stay 0
    tt = [r["ttft"] * 1000 for r in ok]
    dec, e2e = rates(ok)
    agg = sum(r["tokens"] for r in ok) / wall if wall else e2e
    print(f"| {name} | {len(rows)} | {len(ok)} | {len(errs)} | {lost} | {pct(tt, 50):.1f} | {pct(tt, 99):.1f} | "
          f"{dec:.0f} | {e2e:.0f} | {agg:.0f} |")
    return errs


print(f"\nmodel {args.model}: {model.num_params() / 1e6:.2f}M parameters, torch threads {torch.get_num_threads()}, "
      f"max_tokens {args.max_tokens}, {len(questions)} questions, greedy, "
      f"mean answer {statistics.mean(r['tokens'] for r in gen_rows):.1f} tokens\n")
print("| | requests | answered | errors | lost | TTFT p50 ms | TTFT p99 ms | decode tok/s | end-to-end tok/s "
      "| aggregate tok/s |")
print("|---|---|---|---|---|---|---|---|---|---|")
row("model.generate, batch 1", gen_rows)
row("server, 1 client", one_rows)
row(f"server, {args.clients} concurrent clients", many, many_wall)
errs = row("server, 16 clients, --queue 4", over, over_wall)
codes = sorted({e["error"] for e in errs})


def spread(xs):
    return f"median {statistics.median(xs):.3f} (min {min(xs):.3f}, max {max(xs):.3f}, {len(xs)} rounds)"


print(f"\nserver / model.generate at batch 1: decode tokens/s {spread(dec_ratios)}; "
      f"end-to-end tokens/s {spread(e2e_ratios)}; target: decode >= 0.90")
print(f"overload errors: {codes}: every request got a complete answer or that error")
