"""
bench/pretrain.py -- what pretrain.py's training loop costs on top of the model itself (a benchmark, not a test).

    python bench/pretrain.py                                   # CPU: lab preset, 8 x 256 tokens, 1 thread
    python bench/pretrain.py --threads 2 --steps 60 --rounds 5
    python bench/pretrain.py --device cuda --model 0.2b --seq_len 1024 --batch_size 16 --compile   # GPU + MFU
    python bench/pretrain.py --device cuda --model 1b --seq_len 2048 --batch_size 8 --compile

Two ways of training the same model on the same batches, interleaved round by round (so that load
from other jobs on the machine hits both alike), median over the rounds:

  bare   model forward + backward + AdamW step + zero_grad on precomputed batches, nothing else
  full   pretrain.main() itself, in this process: memmap windows read every step, LR schedule,
         autocast, gradient clipping, the all-reduce of the loss and the non-finite guard (a host
         sync), tqdm, log lines and log.jsonl -- everything except evaluation and checkpoint
         writing, which pretrain.py keeps out of its own tokens/s figure as well

Each run's speed is the median duration of its 10-step intervals after the warm-up (robust to
load spikes from other jobs; the full loop is timed between the stamps of its own log records,
written every 10 steps as by default); the figure reported is the median over the rounds. The
fastest interval of all rounds is shown too: on a loaded machine it is the least disturbed
measurement of each. Reported: tokens/s of each, the loop
overhead (1 - full/bare; target < 5%), and the data-loading time per step (reading the windows
from the memmap into tensors) as a share of the step time (target < 2%). On cuda also MFU
against the device's bf16 peak (model.PEAK_FLOPS). The first --warmup steps of every run are
not timed (allocator warm-up, AdamW state creation, compilation).
"""
import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import pretrain  # noqa: E402
from common import autocast, configure_optimizer, resolve_dtype  # noqa: E402
from model import Llama, peak_flops  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="lab", help="preset")
parser.add_argument("--seq_len", type=int, default=256)
parser.add_argument("--batch_size", type=int, default=8)
parser.add_argument("--steps", type=int, default=60, help="steps per run, warm-up included (a multiple of 10)")
parser.add_argument("--warmup", type=int, default=10, help="untimed steps at the start of every run (a multiple of 10)")
parser.add_argument("--rounds", type=int, default=3, help="bare/full pairs (median reported)")
parser.add_argument("--device", default="cpu")
parser.add_argument("--dtype", default="auto")
parser.add_argument("--compile", action="store_true")
parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
args = parser.parse_args()
if args.device == "cpu":
    torch.set_num_threads(args.threads)
device = torch.device(args.device)
dtype = resolve_dtype(args.dtype, device)
LOG = 10   # pretrain.py's default --log_interval: the full loop is timed between its log records
assert args.steps > args.warmup >= LOG and args.steps % LOG == 0 and args.warmup % LOG == 0

# A synthetic dataset in data/prepare.py's format, tokenized "with" the shipped tokenizer.
tok = Tokenizer()
work = tempfile.mkdtemp(prefix="bench_pretrain_")
data_dir = os.path.join(work, "data")
os.makedirs(data_dir)
rng = np.random.default_rng(0)
n_train = max(2_000_000, 4 * args.steps * args.batch_size * (args.seq_len + 1))
dt = "uint16" if tok.vocab_size <= 2 ** 16 else "uint32"
rng.integers(3, tok.vocab_size, n_train).astype(dt).tofile(os.path.join(data_dir, "train.bin"))
rng.integers(3, tok.vocab_size, 100_000).astype(dt).tofile(os.path.join(data_dir, "val.bin"))
with open(os.path.join(data_dir, "meta.json"), "w") as f:
    json.dump({"format": "nanollama.pretrain.v1", "tokenizer_path": tok.path, "tokenizer_sha256": tok.sha256,
               "vocab_size": tok.vocab_size, "dtype": dt, "train_tokens": n_train, "val_tokens": 100_000}, f)
train_tokens = np.memmap(os.path.join(data_dir, "train.bin"), dtype=dt, mode="r")
SEED = 1337
tokens_per_step = args.batch_size * args.seq_len


def batch(step):
    """The same windows pretrain.py reads at this step (one process, no accumulation)."""
    offsets = pretrain.window_offsets(len(train_tokens), args.seq_len, SEED, pretrain.TRAIN_STREAM, step,
                                      args.batch_size)
    return pretrain.read_windows(train_tokens, offsets, args.seq_len, device)


def sync():
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_bare():
    """Seconds per LOG-step interval of the bare loop after the warm-up, and FLOPs per token."""
    torch.manual_seed(SEED)
    config = pretrain.model_config_from_args(pretrain.get_parser().parse_args(
        ["--model", args.model, "--seq_len", str(args.seq_len)]), tok.vocab_size)
    model = Llama(config).to(device)
    if args.compile:
        model.compile()
    model.train()
    opt = configure_optimizer(model, 3e-4, 0.1, (0.9, 0.95), device)
    batches = [batch(s) for s in range(args.steps)]   # read beforehand: data loading is not in "bare"
    stamps = []
    for step, (x, y) in enumerate(batches, start=1):
        with autocast(device, dtype):
            loss = model(x, y)[1]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % LOG == 0:
            sync()
            stamps.append(time.perf_counter())
    return intervals(stamps), model.flops_per_token(args.seq_len)


def run_full(i):
    """Seconds per LOG-step interval of pretrain.main() after the warm-up, and its data-loading ms/step."""
    out = os.path.join(work, f"full{i}")
    argv = ["--data", data_dir, "--out_dir", out, "--model", args.model, "--seq_len", str(args.seq_len),
            "--batch_size", str(args.batch_size), "--max_steps", str(args.steps), "--warmup_steps", "10",
            "--log_interval", str(LOG), "--eval_interval", "0", "--eval_steps", "1", "--save_interval", "0",
            "--device", args.device, "--dtype", args.dtype, "--seed", str(SEED)]
    argv += ["--compile"] if args.compile else []
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
        pretrain.main(argv)   # (its progress bar, log lines and summary go to /dev/null)
    with open(os.path.join(out, "log.jsonl")) as f:
        logged = [json.loads(line) for line in f]
    logged = [r for r in logged if "tok_per_s" in r]
    # The wall-clock stamps of the log records (written every LOG steps, the default interval):
    # everything the loop does between them, the log lines and the progress bar included.
    data_ms = statistics.mean(r["data_ms"] for r in logged if r["step"] > args.warmup)
    return intervals([r["time"] for r in logged]), data_ms


def intervals(stamps):
    """Durations of the LOG-step intervals that start after the warm-up."""
    first = args.warmup // LOG - 1     # stamps[k] is taken after step (k + 1) * LOG
    return [b - a for a, b in zip(stamps[first:], stamps[first + 1:])]


def time_data_loading(n=200):
    t0 = time.perf_counter()
    for s in range(n):
        batch(s)
    sync()
    return 1000 * (time.perf_counter() - t0) / n


def time_loop_parts(n=50):
    """ms per step of the pieces the full loop adds, each timed alone: gradient clipping (a norm
    over all gradients + a scale), the loss all-reduce + host sync, and the log record + progress
    bar line amortised over LOG steps. An accounting of the overhead that load noise cannot blur."""
    from tqdm import tqdm
    from common import JsonlLogger, all_reduce_mean, clip_grad_norm
    config = pretrain.model_config_from_args(pretrain.get_parser().parse_args(
        ["--model", args.model, "--seq_len", str(args.seq_len)]), tok.vocab_size)
    model = Llama(config).to(device)
    x, y = batch(0)
    with autocast(device, dtype):
        loss = model(x, y)[1]
    loss.backward()

    def per_call(fn, reps):
        fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        sync()
        return 1000 * (time.perf_counter() - t0) / reps
    logger = JsonlLogger(os.path.join(work, "parts.jsonl"))
    with open(os.devnull, "w") as null:
        pbar = tqdm(total=10 ** 9, file=null)

        def log_and_bar():
            pbar.update(1)
            logger.log(step=1, loss=1.0, lr=1e-3, grad_norm=1.0, tok_per_s=1.0)
            pbar.set_postfix(loss="1.0")
            tqdm.write("step 1 | loss 1.0", file=null)
        return {"clip": per_call(lambda: clip_grad_norm(model, 1.0), n),
                "sync": per_call(lambda: all_reduce_mean(loss.detach()).item(), n),
                "log": per_call(log_and_bar, n) / LOG + per_call(lambda: pbar.update(1), 10 * n)}


bare, full, bare_best, full_best, data_in_loop = [], [], [], [], []
for i in range(args.rounds):
    # alternate which one goes first, so that a drift in machine load favours neither
    for which in (("bare", "full") if i % 2 == 0 else ("full", "bare")):
        if which == "bare":
            times, flops_per_token = run_bare()
            bare.append(LOG * tokens_per_step / statistics.median(times))
            bare_best.append(LOG * tokens_per_step / min(times))
        else:
            times, d = run_full(i)
            full.append(LOG * tokens_per_step / statistics.median(times))
            full_best.append(LOG * tokens_per_step / min(times))
            data_in_loop.append(d)
    print(f"round {i + 1}: bare {bare[-1]:,.0f} tok/s, full {full[-1]:,.0f} tok/s, "
          f"overhead {1 - full[-1] / bare[-1]:+.1%}, data {data_in_loop[-1]:.2f} ms/step", flush=True)
data_alone = time_data_loading()
parts = time_loop_parts()

b, f, d = statistics.median(bare), statistics.median(full), statistics.median(data_in_loop)
b_best, f_best = max(bare_best), max(full_best)
step_ms = 1000 * tokens_per_step / f
peak = peak_flops(torch.cuda.get_device_name(device)) \
    if device.type == "cuda" else None
print()
print(f"{args.model} preset, batch {args.batch_size} x {args.seq_len} = {tokens_per_step:,} tokens/step, {device}, "
      f"{dtype}, compile={args.compile}" + (f", {torch.get_num_threads()} thread(s)" if device.type == "cpu" else "")
      + f"; {args.steps - args.warmup} timed steps per run, median of {args.rounds} rounds")
print(f"| {'measure':<44} | {'value':>14} | {'target':<17} |")
print(f"|{'-' * 46}|{'-' * 16}|{'-' * 19}|")
rows = [("bare model fwd+bwd+step (tokens/s)", f"{b:,.0f}", ""),
        ("full pretrain.py loop (tokens/s)", f"{f:,.0f}", ""),
        ("loop overhead (1 - full / bare)", f"{1 - f / b:.1%}", "< 5%"),
        ("fastest step: bare / full (tokens/s)", f"{b_best:,.0f} / {f_best:,.0f}", ""),
        ("loop overhead, fastest steps", f"{1 - f_best / b_best:.1%}", "< 5%"),
        ("step time, full loop (ms)", f"{step_ms:.1f}", ""),
        ("data loading per step, in the loop (ms)", f"{d:.3f}", ""),
        ("data loading share of the step", f"{d / step_ms:.2%}", "< 2%"),
        ("data loading per step, alone (ms)", f"{data_alone:.3f}", ""),
        ("timed alone: gradient clipping per step (ms)", f"{parts['clip']:.3f}", ""),
        ("timed alone: loss all-reduce + sync (ms)", f"{parts['sync']:.3f}", ""),
        ("timed alone: log record + progress bar (ms)", f"{parts['log']:.3f}", ""),
        ("accounted overhead (parts + data) / step", f"{(sum(parts.values()) + data_alone) / step_ms:.2%}", "< 5%")]
if peak:
    rows += [("MFU bare", f"{flops_per_token * b / peak:.1%}", ""),
             ("MFU full loop", f"{flops_per_token * f / peak:.1%}", ">= 45% (1b preset)")]
else:
    rows += [("MFU", "n/a on CPU", "run --device cuda")]
for name, value, target in rows:
    print(f"| {name:<44} | {value:>14} | {target:<17} |")
