"""
bench/serve.py -- serve.py under load: time to first token, tokens/s, and what the server costs over
model.generate (a benchmark, not a test).

    python bench/serve.py --model lab_run/sft --questions lab_run/data/eval_qa.jsonl
    python bench/serve.py --model lab_run/sft --rounds 5 --threads 1

The server runs on a thread of this process (serve.make_server, exactly what serve.py runs), next
to model.generate called directly for the baseline: the same model, the same threads. The clients
run in a child process (this file with --client), so that their Python does not compete with the
worker for this process's GIL; they speak raw HTTP with streaming (http.client, parsing the
server-sent events by hand, so the arrival time of each piece is exact). Greedy decoding, so the
server and generate produce the same tokens for the same question (the tests check that) and every
comparison is the same work.

  generate vs server   batch 1: the same questions, one at a time, rounds alternating generate and the
                       server (one client) so load from other jobs on the machine hits both alike. Two rates:
                       decode tokens/s = (tokens - 1) / (last token - first token), the steady
                       decoding speed (for generate: timestamps in its callback; through the server:
                       the first text chunk and the final chunk, as the client receives them), and
                       end-to-end tokens/s = tokens / request wall time (prefill, HTTP and prompt
                       rendering included: a fixed cost per request, large next to a 10-token
                       answer). Each is summed per round; the ratios are per round (median, min-max).
                       And tokens per CPU-second of this process (time.process_time over the round:
                       the server's threads, not the clients): what serving costs in work, which
                       load from other jobs on a shared machine disturbs far less than wall time.
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
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FALLBACK_QUESTIONS = ["Where does Alice live?", "What is 3 plus 4?", "Who are you?", "你好，你叫什么名字？",
                      "What does Bob like?", "How old is Carol?", "Tell me about Dave.", "What is 12 plus 9?"]

# -----------------------------------------------------------------------------
# The client side (the child process): standard library only


def stream_request(port, messages, max_tokens):
    """One streaming chat request -> {"ttft", "decode_s", "seconds", "tokens", "ok", "error"}."""
    body = json.dumps({"messages": messages, "temperature": 0, "max_tokens": max_tokens, "stream": True}).encode()
    t0 = time.perf_counter()
    out = {"ttft": None, "decode_s": None, "tokens": 0, "ok": False, "error": None}
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        r = conn.getresponse()
        if r.status != 200:
            out["error"] = f"{r.status} {json.loads(r.read())['error']['code']}"
        else:
            finished = False
            for line in r:
                if not line.startswith(b"data: "):
                    continue
                data = line[6:].strip()
                if data == b"[DONE]":
                    out["ok"] = finished  # complete: a finish_reason, then [DONE]
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


def client_main():
    """--client: stdin {"port", "max_tokens", "lists": [[messages, ...] per concurrent client]} ->
    stdout {"results": [...], "wall": seconds}."""
    job = json.load(sys.stdin)
    results, lock = [], threading.Lock()

    def client(convs):
        for messages in convs:
            r = stream_request(job["port"], messages, job["max_tokens"])
            with lock:
                results.append(r)

    threads = [threading.Thread(target=client, args=(convs,)) for convs in job["lists"]]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    json.dump({"results": results, "wall": time.perf_counter() - t0}, sys.stdout)


def run_clients(port, lists, max_tokens):
    """Run the clients in a child process; lists: one list of conversations per concurrent client."""
    p = subprocess.run([sys.executable, os.path.abspath(__file__), "--client"], capture_output=True, text=True,
                       input=json.dumps({"port": port, "max_tokens": max_tokens, "lists": lists}), timeout=1800)
    if p.returncode != 0:
        raise RuntimeError(f"client process failed: {p.stderr[-2000:]}")
    out = json.loads(p.stdout)
    return out["results"], out["wall"]


# -----------------------------------------------------------------------------
# The server side (this process)


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))] if xs else float("nan")


def rates(rows):
    """(decode tokens/s, end-to-end tokens/s) over rows, summed."""
    dec = [r for r in rows if r.get("decode_s")]
    return (sum(r["tokens"] - 1 for r in dec) / sum(r["decode_s"] for r in dec),
            sum(r["tokens"] for r in rows) / sum(r["seconds"] for r in rows))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="run dir or checkpoint (the lab SFT model)")
    parser.add_argument("--questions", default=None, help="eval_qa.jsonl of the lab world (default: 8 fixed questions)")
    parser.add_argument("--max_tokens", type=int, default=48, help="answer length limit (the lab evaluation's)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of the batch-1 comparison")
    parser.add_argument("--n_questions", type=int, default=16, help="questions per round")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--per_client", type=int, default=4, help="requests each concurrent client sends")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (%(default)s, as the lab runs)")
    args = parser.parse_args()

    import torch
    sys.path.insert(0, REPO)
    import chat
    import serve
    torch.set_num_threads(args.threads)
    model, tok = chat.load_chat_model(args.model, "cpu")
    if args.questions and os.path.isfile(args.questions):
        questions = [r["messages"] for r in chat.read_records(args.questions)][:args.n_questions]
    else:
        questions = [[{"role": "user", "content": q}] for q in FALLBACK_QUESTIONS][:args.n_questions]

    def direct(messages):
        prompt = tok.render_prompt(messages)
        stamps = []
        t0 = time.perf_counter()
        with chat._autocast(model):
            ids = model.generate([prompt], args.max_tokens, temperature=0.0, eos_id=tok.stop_ids,
                                 callback=lambda b, t: stamps.append(time.perf_counter()))[0]
        return {"seconds": time.perf_counter() - t0, "tokens": len(ids), "ttft": stamps[0] - t0,
                "decode_s": stamps[-1] - stamps[0]}

    def start_server(**kw):
        srv = serve.make_server(model, tok, port=0, quiet=True, max_tokens=args.max_tokens, **kw)
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return srv, srv.server_address[1]

    srv, port = start_server()
    for q in questions[:2]:  # warm-up: the first calls allocate and fill caches
        direct(q)
    run_clients(port, [questions[:2]], args.max_tokens)

    # --- batch 1: generate vs the server (one client), rounds alternating
    dec_ratios, e2e_ratios, cpu_ratios, gen_rows, one_rows = [], [], [], [], []
    for _ in range(args.rounds):
        c0 = time.process_time()
        g_round = [direct(q) for q in questions]
        c1 = time.process_time()
        s_round, _ = run_clients(port, [questions], args.max_tokens)
        c2 = time.process_time()  # this process only: the server's threads, not the clients
        for g, s in zip(g_round, s_round):  # greedy: the same answers, the same work
            assert s["ok"] and s["tokens"] == g["tokens"], (s, g)
        (gd, ge), (sd, se) = rates(g_round), rates(s_round)
        dec_ratios.append(sd / gd)
        e2e_ratios.append(se / ge)
        cpu_ratios.append((c1 - c0) / (c2 - c1))  # the same tokens: tokens per CPU-second, server / generate
        gen_rows += g_round
        one_rows += s_round

    # --- concurrent clients, then an overload against a short queue
    lists = [[questions[(i + j) % len(questions)] for j in range(args.per_client)] for i in range(args.clients)]
    many, many_wall = run_clients(port, lists, args.max_tokens)
    srv.shutdown()
    srv.server_close()
    small, small_port = start_server(max_queue=4)
    over, over_wall = run_clients(small_port, [[q] for q in (questions * 16)[:16]], args.max_tokens)
    small.shutdown()
    small.server_close()

    def row(name, rows, wall=None):
        ok = [r for r in rows if r.get("ok", True)]
        errs = [r for r in rows if r.get("error")]
        lost = len(rows) - len(ok) - len(errs)  # neither an answer nor an error: must stay 0
        tt = [r["ttft"] * 1000 for r in ok]
        dec, e2e = rates(ok)
        agg = sum(r["tokens"] for r in ok) / wall if wall else e2e
        print(f"| {name} | {len(rows)} | {len(ok)} | {len(errs)} | {lost} | {pct(tt, 50):.1f} | {pct(tt, 99):.1f} | "
              f"{dec:.0f} | {e2e:.0f} | {agg:.0f} |")
        return errs

    def spread(xs):
        return f"median {statistics.median(xs):.3f} (min {min(xs):.3f}, max {max(xs):.3f}, {len(xs)} rounds)"

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
    print(f"\nserver / model.generate at batch 1 (target: >= 0.90):\n  decode tokens/s      {spread(dec_ratios)}\n"
          f"  end-to-end tokens/s  {spread(e2e_ratios)}\n  tokens per CPU-second {spread(cpu_ratios)}")
    print(f"overload errors: {sorted({e['error'] for e in errs})}: every request got a complete answer or that error")


if __name__ == "__main__":
    if sys.argv[1:] == ["--client"]:
        client_main()
    else:
        main()
