"""
chat.py -- talk to a model, and the answer/evaluation functions every later stage reuses.

Usage (any checkpoint: a run dir, a .pt checkpoint of ours, or a HuggingFace LLaMA dir):
    python chat.py --model runs/sft                                  # interactive, streamed
    python chat.py --model runs/sft --system "You are nanollama." --temperature 0.7 --top_p 0.9
    python chat.py --model runs/sft --prompt "Where does Alice live?"  # one answer, then exit
    python chat.py --model runs/sft --prompts_file questions.txt     # one prompt per line -> JSONL answers
    python chat.py --model runs/sft --eval lab_data/eval_qa.jsonl    # lab accuracy (overall, per kind)
    python chat.py --model runs/pretrain --raw                       # base model: it continues what you type
Interactive commands: /reset forgets the conversation (the system prompt stays), /exit or Ctrl-D quits,
Ctrl-C interrupts an answer. There is no torchrun form: chatting is one sequential process, and the
batch modes put many prompts through one batched, KV-cached model.generate instead.

From Python (dpo.py, rlhf_ppo.py and the lab pipeline call these; signatures in the README):
    from chat import load_chat_model, generate_answers, evaluate_lab, win_rate, head_to_head
    model, tok = load_chat_model("runs/sft", "cpu")
    answers = generate_answers(model, tok, [[{"role": "user", "content": "Who are you?"}]])
    report = evaluate_lab(model, tok, "lab_data/eval_qa.jsonl")    # {"accuracy", "by_kind", ...}

Simplifications on purpose: greedy decoding (temperature 0) is the default everywhere, because the
lab's numbers must be reproducible; history that no longer fits the context window is dropped by
whole user/assistant exchanges from the oldest one (never cut inside a turn); the system prompt is
always kept.
"""
import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

import common
from data import lab
from data.formats import iter_json, Report
from tokenizer import Tokenizer

# -----------------------------------------------------------------------------
# Loading


def load_chat_model(path, device="cpu", tokenizer=None):
    """(model, tokenizer) ready for generation, in eval mode on `device`.

    path: a run dir (its best checkpoint, else final, else the newest step_*), a checkpoint file, or
    a HuggingFace dir (weights + tokenizer.model, as model.save_hf + Tokenizer.save_hf write them).
    tokenizer: a Tokenizer or a .model path; None uses the one the checkpoint names (our runs
    record it), else the HF dir's tokenizer.model, else the shipped default."""
    model, meta = common.load_model(path, device=device)
    # the tokenizer it was trained with (recorded by the stage): another sha256 or vocabulary is refused
    if isinstance(tokenizer, Tokenizer):
        tok = common.check_tokenizer(meta, tokenizer)
    else:
        tok = common.checkpoint_tokenizer(meta, tokenizer)
    model.eval()
    return model, tok


def _autocast(model):
    device = next(model.parameters()).device
    # bf16 on GPU (faster, half the KV cache); fp32 on CPU, where the lab's numbers are made.
    return common.autocast(device, common.resolve_dtype("auto", device))


# -----------------------------------------------------------------------------
# Answering


def _as_messages(conv, system=None):
    """A user string or a message list ending on a user turn -> a message list (system prepended)."""
    msgs = [{"role": "user", "content": conv}] if isinstance(conv, str) else list(conv)
    if system and not (msgs and msgs[0]["role"] == "system"):
        msgs = [{"role": "system", "content": system}] + msgs
    return msgs


def strip_stop(ids, stop_ids):
    """The generated ids without the stop token that ended them (generate keeps it)."""
    return ids[:-1] if ids and ids[-1] in stop_ids else ids


def raw_prompt(tok, text, max_len=None):
    """Continuation mode (base models, --raw, serve.py's /v1/completions): [BOS] + the text's tokens,
    no chat template -- the model sees what it saw in pretraining. max_len keeps the last tokens."""
    ids = tok.encode(text)
    if max_len is not None:
        ids = ids[max(0, len(ids) - (max_len - 1)):]
    return [tok.bos_id] + ids


def generate_answers(model, tok, conversations, max_new_tokens=64, temperature=0.0, top_k=None, top_p=None,
                     batch_size=32, system=None, seed=None, return_ids=False, raw=False):
    """Answer each conversation (a user string, or messages ending on a user turn); returns a list
    of answer strings in input order (and, if return_ids, the ids as sampled: the stop token that ended
    an answer is kept -- <|end|> or </s>, whichever it was -- and an answer without one was cut at
    max_new_tokens; common.ended tells them apart).
    raw: the conversations are plain texts to continue (raw_prompt), not chats; an answer is then the
    continuation with its leading space (text + answer is the whole text).

    Prompts are rendered with tok.render_prompt, dropping the oldest whole exchanges when a prompt
    plus max_new_tokens would not fit the context; batches are grouped by prompt length (less
    padding) and left-padded by model.generate; each answer stops at any of tok.stop_ids.
    seed makes sampling (temperature > 0) reproducible; greedy ignores it. model: the plain Llama, a
    DDP-wrapped one, or an FSDP-sharded one (then every rank calls this, see common.generate), in any
    mode: it runs in eval mode and is put back."""
    ctx = model.config.max_seq_len
    if max_new_tokens >= ctx:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the context of {ctx}")
    if raw:
        prompts = [raw_prompt(tok, c, max_len=ctx - max_new_tokens) for c in conversations]
    else:
        prompts = [tok.render_prompt(_as_messages(c, system), max_len=ctx - max_new_tokens) for c in conversations]
    device = next(model.parameters()).device
    generator = None
    if seed is not None and temperature > 0:
        generator = torch.Generator(device=device).manual_seed(seed)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out_ids = [None] * len(prompts)
    starts = list(range(0, len(order), batch_size))
    if common.is_fsdp(common.unwrap(model)):   # every rank generates as many batches (common.generate)
        n = torch.tensor([len(starts)], device=device)   # (NCCL reduces GPU tensors only)
        dist.all_reduce(n, op=dist.ReduceOp.MAX)
        starts += [len(order)] * (int(n) - len(starts))   # empty batches: a dummy prompt, no answers
    with common.eval_mode(model), _autocast(model):  # eval: no dropout while answering
        for start in starts:
            chunk = order[start:start + batch_size]
            new = common.generate(model, [prompts[i] for i in chunk], max_new_tokens, temperature=temperature,
                                  top_k=top_k, top_p=top_p, eos_id=tok.stop_ids, generator=generator)
            for i, ids in zip(chunk, new):
                out_ids[i] = ids
    # a continuation's first space is real text ("fox" + " jumps"), an answer's is the dummy prefix
    answers = [tok.decode(strip_stop(ids, tok.stop_ids), continuation=raw) for ids in out_ids]
    return (answers, out_ids) if return_ids else answers


# -----------------------------------------------------------------------------
# Evaluation: the lab checker, and head-to-head win rates


def read_records(path_or_records):
    """A JSONL path (malformed lines skipped and reported) or an already loaded list of records."""
    if not isinstance(path_or_records, (str, os.PathLike)):
        return list(path_or_records)
    report = Report()
    records = [obj for _, obj in iter_json(str(path_or_records), report)]
    if report.skipped:
        print(f"{path_or_records}: {report.summary()}", file=sys.stderr)
    if not records:
        raise ValueError(f"{path_or_records}: no records")
    return records


def evaluate_lab(model, tok, eval_path_or_records, max_new_tokens=64, batch_size=32, system=None, limit=None,
                 answers=None):
    """Answer the lab world's held-out questions greedily and grade them with data.lab.check.

    eval_path_or_records: eval_qa.jsonl (or rl_eval.jsonl), or its records: each has "messages"
    (ending on a user turn) and "truth", optionally "kind" (else "task") and "id".
    answers: precomputed answers (then the model is not run; model may be None).
    Returns {"accuracy", "n", "by_kind": {kind: accuracy}, "n_by_kind": {kind: n}, "records": [
    {"id", "kind", "question", "answer", "reference", "ok"}]}."""
    records = read_records(eval_path_or_records)[:limit]
    for i, r in enumerate(records):
        if "messages" not in r or "truth" not in r:
            raise ValueError(f"eval record {i} needs 'messages' and 'truth' (keys: {sorted(r)})")
    if answers is None:
        answers = generate_answers(model, tok, [r["messages"] for r in records], max_new_tokens=max_new_tokens,
                                   batch_size=batch_size, system=system)
    rows, hits, counts = [], {}, {}
    for r, a in zip(records, answers):
        kind = r.get("kind") or r.get("task") or "all"
        ok = bool(lab.check(a, r["truth"]))
        hits[kind] = hits.get(kind, 0) + ok
        counts[kind] = counts.get(kind, 0) + 1
        rows.append({"id": r.get("id"), "kind": kind, "question": r["messages"][-1]["content"], "answer": a,
                     "reference": r.get("reference"), "ok": ok})
    n = len(rows)
    return {"accuracy": sum(hits.values()) / max(n, 1), "n": n,
            "by_kind": {k: hits[k] / counts[k] for k in sorted(counts)}, "n_by_kind": dict(sorted(counts.items())),
            "records": rows}


def win_rate(scores_a, scores_b, tol=0.0):
    """Win rate of A over B from per-prompt scores (higher is better): a win counts 1, a tie (within
    tol) 0.5, a loss 0. Returns {"win_rate", "wins", "ties", "losses", "n"}."""
    if len(scores_a) != len(scores_b) or not scores_a:
        raise ValueError(f"need two equally long, non-empty score lists (got {len(scores_a)} and {len(scores_b)})")
    wins = ties = 0
    for a, b in zip(scores_a, scores_b):
        if abs(a - b) <= tol:
            ties += 1
        elif a > b:
            wins += 1
    n = len(scores_a)
    return {"win_rate": (wins + 0.5 * ties) / n, "wins": wins, "ties": ties, "losses": n - wins - ties, "n": n}


def head_to_head(answers_a, answers_b, records, reward_fn=None, check_fn=None, ended_a=None, ended_b=None):
    """Compare two policies' answers to the same prompts (records with "messages" and "truth").

    Under the lab checker (check_fn(answer, truth) -> bool/float, default data.lab.check) and, if
    given, under a reward function reward_fn(conversations, answers) -> list of floats (e.g. the
    reward model, reward.reward_scorer). ended_a / ended_b: which answers stopped by themselves (one
    bool each; False = cut at the length limit), passed on as reward_fn(..., ended=...). Returns {"checker": win_rate dict + "accuracy_a"/"accuracy_b",
    "reward": win_rate dict + "mean_a"/"mean_b" (or None)}."""
    records = read_records(records)
    if not (len(answers_a) == len(answers_b) == len(records)):
        raise ValueError(f"{len(answers_a)} and {len(answers_b)} answers for {len(records)} records")
    check_fn = check_fn or lab.check
    ca = [float(check_fn(a, r["truth"])) for a, r in zip(answers_a, records)]
    cb = [float(check_fn(b, r["truth"])) for b, r in zip(answers_b, records)]
    out = {"checker": {**win_rate(ca, cb), "accuracy_a": sum(ca) / len(ca), "accuracy_b": sum(cb) / len(cb)},
           "reward": None}
    if reward_fn is not None:
        convs = [r["messages"] for r in records]
        ra, rb = ([float(x) for x in reward_fn(convs, ans, **({} if e is None else {"ended": e}))]
                  for ans, e in ((answers_a, ended_a), (answers_b, ended_b)))
        # The same answer is a tie by definition. Scored in other batches (other padding, other float
        # order) its two scores can differ in the last digits, and an exact comparison would then
        # hand out wins and losses at random (13-27 of ~380 identical answers per model in the lab).
        same = [x == y and (ended_a is None or ended_b is None or ended_a[i] == ended_b[i])
                for i, (x, y) in enumerate(zip(answers_a, answers_b))]
        rb = [x if s else y for x, y, s in zip(ra, rb, same)]
        out["reward"] = {**win_rate(ra, rb), "mean_a": sum(ra) / len(ra), "mean_b": sum(rb) / len(rb)}
    return out


# -----------------------------------------------------------------------------
# Interactive chat


def fit_history(tok, messages, max_len):
    """Drop the oldest user/assistant exchanges (never the system prompt, never part of a turn)
    until the prompt fits max_len tokens. Returns (prompt ids, number of exchanges dropped);
    ValueError if the last user message alone does not fit. Mutates `messages`."""
    dropped = 0
    first = 1 if messages and messages[0]["role"] == "system" else 0
    while True:
        ids = tok.render_prompt(messages)
        if len(ids) <= max_len:
            return ids, dropped
        if len(messages) - first <= 1:
            raise ValueError(f"this message needs {len(ids)} tokens; the context leaves room for {max_len}")
        del messages[first:first + 2]
        dropped += 1


def chat_loop(model, tok, args, inp=input, out=sys.stdout):
    """The terminal chat: read a line, stream the answer token by token, keep the history.
    With args.raw, each line is a text the model continues on its own (no template, no history)."""
    system = [{"role": "system", "content": args.system}] if args.system else []
    history = list(system)
    ctx = model.config.max_seq_len
    generator = torch.Generator(device=next(model.parameters()).device)
    generator.manual_seed(args.seed)
    print(f"{'continuing texts' if args.raw else 'chatting'} with {args.model} ({model.num_params() / 1e6:.1f}M "
          f"parameters, context {ctx}). /reset to start over, /exit to quit.", file=out, flush=True)
    while True:
        try:
            line = inp(">>> ")
        except (EOFError, KeyboardInterrupt):
            print(file=out)
            return
        cmd = line.strip()
        if cmd in ("/exit", "/quit"):
            return
        if cmd == "/reset":
            history = list(system)
            print("(conversation reset)", file=out, flush=True)
            continue
        if not cmd:
            continue
        if args.raw:
            prompt = raw_prompt(tok, line, ctx - args.max_new_tokens)
            print(line, end="", file=out, flush=True)  # the continuation follows the text on the same line
        else:
            history.append({"role": "user", "content": line})
            try:
                prompt, dropped = fit_history(tok, history, ctx - args.max_new_tokens)
            except ValueError as e:
                history.pop()
                print(f"(too long: {e})", file=out, flush=True)
                continue
            if dropped:
                print(f"(context full: forgot the oldest {dropped} exchange(s))", file=out, flush=True)
        # Stream: the callback sees every new token; StreamDecoder holds back the bytes of a
        # half-finished UTF-8 character (a Chinese character is 3 byte tokens in byte fallback).
        decoder = tok.stream_decoder(continuation=args.raw)

        def show(_, token):
            if token not in tok.stop_ids:
                print(decoder.push(token), end="", file=out, flush=True)

        try:
            with _autocast(model):
                new = model.generate([prompt], args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                     top_p=args.top_p, eos_id=tok.stop_ids, callback=show, generator=generator)[0]
        except KeyboardInterrupt:
            if not args.raw:
                history.pop()
            print("\n(interrupted)", file=out, flush=True)
            continue
        print(decoder.finish(), file=out, flush=True)
        if not args.raw:
            history.append({"role": "assistant", "content": tok.decode(strip_stop(new, tok.stop_ids))})


# -----------------------------------------------------------------------------
# Command line


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Chat with a nanollama model, answer prompts, or run the lab evaluation.")
    p.add_argument("--model", required=True, help="run dir, checkpoint .pt file, or HuggingFace LLaMA dir")
    p.add_argument("--tokenizer", default=None, help="sentencepiece .model (default: the one the checkpoint names)")
    p.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda | cuda:N")
    p.add_argument("--system", default=None, help="system prompt (kept through /reset and history truncation)")
    p.add_argument("--temperature", type=float, default=0.0, help="%(default)s; 0 = greedy (deterministic)")
    p.add_argument("--top_k", type=int, default=None, help="sample only among the k most likely tokens")
    p.add_argument("--top_p", type=float, default=None, help="nucleus sampling: the smallest set with mass >= p")
    p.add_argument("--max_new_tokens", type=int, default=128, help="answer length limit, in tokens (%(default)s)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (temperature > 0; default: random)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--prompt", default=None, help="one-shot: answer this user message and exit")
    mode.add_argument("--prompts_file", default=None, help="answer every non-empty line; prints JSONL {prompt, answer}")
    mode.add_argument("--eval", default=None, metavar="EVAL_JSONL",
                      help="lab evaluation: eval_qa.jsonl of the lab world; prints accuracy overall and per kind")
    p.add_argument("--raw", action="store_true", help="continuation mode for base models: no chat template, "
                   "the model continues each text (interactive, --prompt, --prompts_file)")
    p.add_argument("--batch_size", type=int, default=32, help="prompts per generate call in the batch modes (%(default)s)")
    p.add_argument("--eval_out", default=None, help="--eval: also write every graded answer here (JSONL)")
    args = p.parse_args(argv)
    if args.temperature < 0 or (args.top_p is not None and not 0 < args.top_p <= 1) or \
            (args.top_k is not None and args.top_k < 1) or args.max_new_tokens < 1:
        p.error("need temperature >= 0, 0 < top_p <= 1, top_k >= 1, max_new_tokens >= 1")
    return args


def main(argv=None):
    args = get_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.seed is None:  # torch's default generator starts from the same seed in every process
        args.seed = int.from_bytes(os.urandom(4), "little")
    device = torch.device(args.device)
    model, tok = load_chat_model(args.model, device, args.tokenizer)
    ctx = model.config.max_seq_len
    if args.max_new_tokens >= ctx:
        args.max_new_tokens = ctx // 2
        print(f"--max_new_tokens is at least the context ({ctx}); using {args.max_new_tokens}", file=sys.stderr)
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, system=args.system, seed=args.seed, batch_size=args.batch_size, raw=args.raw)
    if args.prompt is not None:
        print(generate_answers(model, tok, [args.prompt], **sampling)[0], flush=True)
    elif args.prompts_file is not None:
        with open(args.prompts_file, encoding="utf-8") as f:
            prompts = [line.rstrip("\r\n") for line in f.read().split("\n") if line.strip()]
        for q, a in zip(prompts, generate_answers(model, tok, prompts, **sampling)):
            print(json.dumps({"prompt": q, "answer": a}, ensure_ascii=False), flush=True)
    elif args.eval is not None:
        if args.raw:
            sys.exit("error: --eval grades chat answers; it does not take --raw")
        res = evaluate_lab(model, tok, args.eval, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                           system=args.system)
        for k, acc in res["by_kind"].items():
            print(f"  {k:<10} {acc:6.1%}  (n={res['n_by_kind'][k]})")
        print(f"lab accuracy: {res['accuracy']:.1%} of {res['n']} held-out questions ({args.model})")
        if args.eval_out:
            with open(args.eval_out + ".tmp", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in res["records"])
            os.replace(args.eval_out + ".tmp", args.eval_out)  # atomic: never half a file
    else:
        chat_loop(model, tok, args)


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as e:  # bad paths or files: one clear line, no traceback
        sys.exit(f"error: {e}")
