"""
pretrain.py -- pretrain a LLaMA on token memmaps, from one laptop CPU to several nodes of GPUs.

    python data/prepare.py --input /work/shared/data/pretrain --out out/pretrain    # once: tokenize
    python pretrain.py --data out/pretrain --model lab --out_dir out/lab           # one process (CPU or 1 GPU)
    torchrun --standalone --nproc_per_node=8 pretrain.py --data out/pretrain --model 1b --parallel fsdp
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 --rdzv_id=run1 \\
        pretrain.py --data /shared/fs/pretrain --model llama1-7b --parallel fsdp --out_dir /shared/fs/run1
    python pretrain.py ... --resume            # continue from the newest step_* checkpoint in --out_dir
    python pretrain.py --model llama1-7b --estimate --world_size 8 --batch_size 4 --seq_len 2048
    python pretrain.py --model llama1-7b --estimate --dry_run --world_size 16 --batch_size 1 --seq_len 2048 \
        --grad_accum 16 --activation_checkpointing     # + the real FSDP step on fake tensors (no GPU needed)

Reads top to bottom: config -> distributed setup -> data -> model -> optimizer -> loop -> save.
The plumbing every stage shares (process groups, DDP/FSDP wrapping, checkpoints, logging) is in
common.py; the training loop itself is all here.

Simplifications, on purpose:
  * Training windows are drawn uniformly at random from the flat token stream (nanoGPT style), not
    iterated epoch by epoch: no index file to build, and the data position is just the step number.
  * Windows cross document boundaries (EOS/BOS mark them); no attention mask between documents.
  * No tensor or pipeline parallelism: DDP or FSDP only, which carries LLaMA-65B-sized models.
"""
import argparse
import math
import os
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from common import (JsonlLogger, add_common_args, add_dry_run_args, all_reduce_mean, autocast, barrier,
                    checkpoint_path, clip_grad_norm, configure_optimizer, dry_run_label, eval_mode, fail, fsdp_dry_run,
                    grad_sync, latest_checkpoint, load_model, load_model_sharded, lr_at, parse_config, print0,
                    print_dry_run, read_checkpoint_meta, resolve_dtype, resolve_parallel, restore_checkpoint,
                    rotate_checkpoints, save_checkpoint, save_config, seed_everything, set_lr, setup_distributed,
                    shorten_timeout, teardown_distributed, warn_if_low_disk, wrap_model)
from lora import LORA_TARGETS, apply_lora
from model import PEAK_FLOPS, PRESETS, Llama, LlamaConfig, peak_flops

TRAIN_STREAM, VAL_STREAM = 0, 1  # separate random streams for training and validation windows

# -----------------------------------------------------------------------------
# Config


def get_parser():
    parser = argparse.ArgumentParser(description="Pretrain a LLaMA on token memmaps (see the docstring).",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_args(parser)
    parser.set_defaults(out_dir="out/pretrain")
    g = parser.add_argument_group("pretraining")
    g.add_argument("--data", default=None,
                   help="directory written by data/prepare.py (train.bin, val.bin, meta.json)")
    g.add_argument("--model", default="lab", choices=sorted(PRESETS), help="model preset when starting from scratch")
    g.add_argument("--seq_len", type=int, default=None,
                   help="training context length (default: the preset's max_seq_len)")
    g.add_argument("--dim", type=int, default=None, help="override the preset's width")
    g.add_argument("--n_layers", type=int, default=None, help="override the preset's depth")
    g.add_argument("--n_heads", type=int, default=None, help="override the preset's attention heads")
    g.add_argument("--n_kv_heads", type=int, default=None, help="override the preset's key/value heads (GQA)")
    g.add_argument("--vocab_size", type=int, default=None,
                   help="model vocabulary (default: the tokenizer's); pad it up, e.g. to a multiple of 64, for speed")
    g.add_argument("--dropout", type=float, default=None, help="override the preset's dropout")
    g.add_argument("--attn", default=None, choices=["sdpa", "manual"], help="attention implementation")
    g.add_argument("--max_skips", type=int, default=5,
                   help="stop after this many consecutive steps with a non-finite loss or gradient")
    e = parser.add_argument_group("--estimate: memory and time before launching anything")
    e.add_argument("--estimate", action="store_true", help="print parameters, memory per GPU and step time, then exit")
    add_dry_run_args(e)
    e.add_argument("--gpu", default="A100", choices=sorted(PEAK_FLOPS), help="GPU kind for the step time")
    e.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation for the step time")
    return parser


def model_config_from_args(args, vocab_size: int) -> LlamaConfig:
    overrides = {k: getattr(args, k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "dropout", "attn")
                 if getattr(args, k) is not None}
    if args.n_heads is not None and args.n_kv_heads is None:
        overrides["n_kv_heads"] = args.n_heads  # a preset's GQA ratio does not carry over to other head counts
    overrides["vocab_size"] = args.vocab_size or vocab_size
    if args.seq_len:
        overrides["max_seq_len"] = args.seq_len
    return LlamaConfig.from_preset(args.model, **overrides)


# -----------------------------------------------------------------------------
# --estimate: memory per GPU and time per step, by arithmetic only (nothing is allocated)

GB = 1e9


def estimate(config: LlamaConfig, batch_size: int, seq_len: int, grad_accum: int, world_size: int,
             dtype: torch.dtype = torch.bfloat16, gpu: str = "A100", mfu: float = 0.4, gpu_mem_gb: float = 80.0,
             lora_rank: int = 0, lora_targets=LORA_TARGETS, lora_embeddings: bool = False,
             skip_accum_sync: bool = False, ac_every: int = 1, shard_size: int = 0):
    """Bytes per GPU for DDP and for FSDP, FLOPs per step and the time per step at `mfu`.

    Parameters are counted on the meta device (no memory). The bytes, with N parameters, W GPUs,
    p = bytes per compute-dtype element (2 for bf16, 4 for fp32):
      DDP   weights 4N (fp32 masters) + grads 4N + AdamW 8N (exp_avg, exp_avg_sq)
            + autocast's bf16 weight copies 2N (kept from forward to backward; 0 in fp32)
      FSDP  (4N + 4N + 8N) / W sharded, plus the units common.wrap_model gathers (U = the largest
            unit: a block, or the embedding / [norm, head] units of an untied model):
            + gathered params 2 * p * U: the running unit and the prefetched next one
            + unsharded gradients before their reduce-scatter: 4 * U (fp32, reduce_dtype)
            tied embeddings stay in the root unit, gathered for the whole step: p * root instead
            --fsdp_skip_accum_sync with grad_accum > 1: every rank holds the whole model's
            unsharded fp32 gradients between micro-steps, 4N, whatever W is
            grad_accum 1: the sharded gradients grow as the activations shrink during backward,
            so the total counts the larger of the two, not their sum
      HSDP (shard_size S < W, --fsdp_shard_size): every "/ W" above is "/ S" (a model is sharded
      over its group of S ranks only).
      These FSDP terms are fitted to the dry run (common.fsdp_dry_run, --dry_run): within a few % at
      7B-70B (README).
    Activations per micro-batch of B*T tokens (measured by counting the tensors autograd saves,
    tests/test_pretrain.py; fused SDPA attention, so no T x T score matrix):
      per block and token: 26*dim + 8*hidden_dim bytes in bf16 autocast (40*dim + 16*hidden in fp32),
      exact for multi-head attention, a little high for GQA (smaller k and v)
      outside the blocks: 4*vocab bytes per token (the fp32 logits the loss keeps for the backward; the
      dry run shows the peak holding them but never their gradient as well)
      with activation checkpointing a block keeps only its fp32 input (4*dim per token) and one
      block's activations exist at a time, during its recomputation; ac_every K (selective: every
      K-th block) checkpoints ceil(n_layers / K) blocks, the others keep all their activations.
    LoRA (lora_rank > 0, the fine-tuning stages' --lora_*; A adapter parameters): the frozen N are
    stored in the compute dtype and never get gradients or AdamW states (common.setup_lora):
      DDP   weights pN + 4A (+ 2A bf16 copies), grads 4A, AdamW 8A
      FSDP  weights (pN + 4A) / W + the same gathered units, grads 4A / W + (p + 4) * (A of a block),
            AdamW 8A / W
    Activations and FLOPs are left as for full training (the adapters keep their inputs anyway; the
    backward skips the frozen weights' gradients, ~1/3 of the FLOPs, which is not subtracted).
    Not counted: the CUDA context, NCCL buffers and allocator slack (budget ~2 GB), temporary buffers of
    kernels."""
    with torch.device("meta"):
        m = Llama(config)
    n = m.num_params()
    block = sum(p.numel() for p in m.layers[0].parameters())
    root = n - config.n_layers * block
    W, tokens = world_size, batch_size * seq_len
    S = shard_size or W   # the ranks one model is sharded over (HSDP: its group)
    p = 2 if dtype == torch.bfloat16 else 4
    if p == 2:
        per_block_token = 26 * config.dim + 8 * config.hidden_dim
    else:
        per_block_token = 40 * config.dim + 16 * config.hidden_dim
    act_full = tokens * (config.n_layers * per_block_token + 4 * config.vocab_size)
    n_ckpt = -(-config.n_layers // ac_every)
    act_ckpt = tokens * (n_ckpt * 4 * config.dim + (config.n_layers - n_ckpt + 1) * per_block_token
                         + 4 * config.vocab_size)
    ddp = {"weights": 4 * n + (2 * n if p == 2 else 0), "grads": 4 * n, "adamw": 8 * n}
    if config.tie_embeddings:
        gathered, unsharded_grads = p * (root + 2 * block), (p + 4) * max(root, block)
    else:
        unit = max(block, config.vocab_size * config.dim + config.dim)   # a block, or [norm, head]
        gathered, unsharded_grads = 2 * p * unit, 4 * unit
    grads = 4 * n / S + unsharded_grads
    if skip_accum_sync and grad_accum > 1:
        grads = 4 * n   # (the sharded ones only appear as the last micro-step frees these)
    fsdp = {"weights": 4 * n / S + gathered, "grads": grads, "adamw": 8 * n / S}
    flops_per_token = m.flops_per_token(seq_len)
    if lora_rank > 0:
        apply_lora(m, lora_rank, 2.0 * lora_rank, targets=lora_targets, embeddings=lora_embeddings)   # on meta
        a = sum(q.numel() for q in m.parameters() if q.requires_grad)
        a_block = sum(q.numel() for q in m.layers[0].parameters() if q.requires_grad)
        ddp = {"weights": p * n + 4 * a + (2 * a if p == 2 else 0), "grads": 4 * a, "adamw": 8 * a}
        fsdp = {"weights": (p * n + 4 * a) / S + gathered, "grads": 4 * a / S + (p + 4) * a_block,
                "adamw": 8 * a / S}
    flops_per_step = flops_per_token * tokens * grad_accum * W
    peak = PEAK_FLOPS[gpu]
    out = {"params": n, "block_params": block, "root_params": root, "flops_per_token": flops_per_token,
           "flops_per_step": flops_per_step, "step_time_s": flops_per_step / (W * peak * mfu),
           "tokens_per_step": tokens * grad_accum * W, "activations": act_full, "activations_ckpt": act_ckpt,
           "lora_params": a if lora_rank > 0 else 0}
    for name, states in (("ddp", ddp), ("fsdp", fsdp)):
        for suffix, act in (("", act_full), ("_ckpt", act_ckpt)):
            total = sum(states.values()) + act
            if name == "fsdp" and grad_accum == 1:
                # One micro-step: the backward frees activations block by block while the sharded
                # gradients appear (set_to_none left none from the last step), so the peak holds
                # the larger of the two, not both. (DDP's gradient buckets exist all along.)
                total -= min(act, 4 * n / S)
            out.setdefault(name, dict(states))["total" + suffix] = total
            out[name]["fits" + suffix] = total + 2 * GB <= gpu_mem_gb * GB
    return out


def print_estimate(e, args, config):
    print(f"model {args.model}: {e['params'] / 1e9:.3f}B parameters (block {e['block_params'] / 1e6:.1f}M x "
          f"{config.n_layers}, embedding/head {e['root_params'] / 1e6:.1f}M), dim {config.dim}, "
          f"vocab {config.vocab_size}")
    print(f"micro-batch {args.batch_size} x {args.seq_len} tokens, grad_accum {args.grad_accum}, {args.world_size} x "
          f"{args.gpu} ({args.gpu_mem_gb:.0f} GB), {args.dtype_name}")
    if e["lora_params"]:
        print(f"LoRA rank {args.lora_rank}: {e['lora_params'] / 1e6:.2f}M trainable parameters "
              f"({e['lora_params'] / e['params']:.2%}); frozen weights in {args.dtype_name}, no gradients or AdamW for them")
    print(f"{'GB per GPU':<28}{'DDP':>8}{'FSDP':>13}")
    rows = [("weights", "weights"), ("gradients", "grads"), ("AdamW states", "adamw")]
    for label, key in rows:
        print(f"{label:<28}{e['ddp'][key] / GB:>8.2f}{e['fsdp'][key] / GB:>13.2f}")
    print(f"{'activations':<28}{e['activations'] / GB:>8.2f}{e['activations'] / GB:>13.2f}")
    print(f"{'  with act. checkpointing':<28}{e['activations_ckpt'] / GB:>8.2f}{e['activations_ckpt'] / GB:>13.2f}")
    for suffix, label in (("", "total"), ("_ckpt", "total, act. checkpointing")):
        cells = [f"{e[k]['total' + suffix] / GB:.1f} {'fits' if e[k]['fits' + suffix] else 'OOM'}"
                 for k in ("ddp", "fsdp")]
        print(f"{label:<28}{cells[0]:>8}{cells[1]:>13}")
    print(f"(fits = total + ~2 GB for the CUDA context and allocator slack <= {args.gpu_mem_gb:.0f} GB)")
    print(f"FLOPs per step {e['flops_per_step']:.3e} ({e['tokens_per_step']:,} tokens, 6N + attention per token); "
          f"at {args.mfu:.0%} MFU on {args.world_size} x {args.gpu}: {e['step_time_s']:.2f} s/step, "
          f"{e['tokens_per_step'] / e['step_time_s'] / args.world_size:,.0f} tokens/s per GPU")


def dry_run(config: LlamaConfig, args, dtype):
    """--estimate --dry_run: this script's FSDP wrapping and training step (next-token loss on a
    B x T micro-batch, grad_accum micro-steps, AdamW) on fake tensors; common.fsdp_dry_run says how."""
    def micro_step(model):
        x = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len))
        return model(x, x)[1]
    return fsdp_dry_run(lambda: Llama(config), micro_step, args.world_size, dtype, args.grad_accum,
                        args.activation_checkpointing, args.fsdp_skip_accum_sync, shard_size=args.fsdp_shard_size,
                        lora=args)


def closed_form_by_category(e: dict, activation_checkpointing: int) -> dict:
    """--estimate's FSDP column in the dry run's categories (temporaries are in its activations)."""
    f, ac = e["fsdp"], activation_checkpointing
    return {"params": f["weights"], "grads": f["grads"], "optimizer": f["adamw"],
            "activations": e["activations_ckpt" if ac else "activations"], "temporaries": None,
            "total": f["total_ckpt" if ac else "total"]}


# -----------------------------------------------------------------------------
# Data: random windows of a flat token memmap, a pure function of (seed, stream, index)


def window_offsets(n_tokens: int, seq_len: int, seed: int, stream: int, index: int, count: int) -> np.ndarray:
    """`count` start offsets of (seq_len + 1)-token windows, uniform over the memmap.

    Training step s draws the windows of the WHOLE global batch from the generator seeded with
    (seed, TRAIN_STREAM, s), and each rank takes its own slice of them. So the data stream is
    reproducible and needs no state beyond the step number (an exact resume restores the step),
    no two ranks ever share a window, and the global batch of a step does not depend on how it
    is split over processes and micro-steps: 2 GPUs x batch 4 and 1 GPU x batch 8 see the same data."""
    rng = np.random.default_rng([seed, stream, index])
    return rng.integers(0, n_tokens - seq_len, size=count)


def read_windows(tokens: np.ndarray, offsets, seq_len: int, device: torch.device):
    """(inputs, targets) of shape (len(offsets), seq_len): targets are the inputs shifted by one."""
    buf = torch.from_numpy(np.stack([tokens[o:o + seq_len + 1] for o in offsets]).astype(np.int64))
    if device.type == "cuda":
        buf = buf.pin_memory().to(device, non_blocking=True)  # async copy, overlaps with the GPU
    else:
        buf = buf.to(device)
    return buf[:, :-1], buf[:, 1:]


def open_split(data_dir, split, tokenizer):
    """The token memmap of a split (data.load_tokens). Bad input (a missing or truncated file, an
    empty split, data made with another tokenizer) stops the run here with the reader's message,
    before anything in --out_dir is touched."""
    from data import load_tokens
    try:
        return load_tokens(data_dir, split, tokenizer)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))


# -----------------------------------------------------------------------------


def main(argv=None):
    args = parse_config(get_parser(), argv)
    if args.estimate or args.dry_run:
        dtype = torch.float32 if args.dtype == "float32" else torch.bfloat16  # GPU training: bf16 unless asked
        config = model_config_from_args(args, PRESETS[args.model]["vocab_size"])
        args.seq_len = args.seq_len or config.max_seq_len
        args.dtype_name = str(dtype).replace("torch.", "")
        targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
        e = estimate(config, args.batch_size, args.seq_len, args.grad_accum, args.world_size, dtype, args.gpu,
                     args.mfu, args.gpu_mem_gb, args.lora_rank, targets, args.lora_embeddings,
                     args.fsdp_skip_accum_sync, args.activation_checkpointing or 1,
                     args.fsdp_shard_size)
        print_estimate(e, args, config)
        if args.dry_run:
            measured = dry_run(config, args, dtype)
            print_dry_run(measured, args.world_size, args.gpu_mem_gb,
                          dry_run_label("pretrain", args, dtype, f"{args.batch_size} x {args.seq_len}"),
                          closed_form_by_category(e, args.activation_checkpointing))
            return measured
        return
    if args.lora_rank:
        fail("--lora_rank adapts a pretrained model: use it with sft.py, reward.py, dpo.py (or --estimate here)")
    if args.data is None:
        fail("--data is required: a directory written by data/prepare.py")

    # --- distributed setup ---------------------------------------------------
    info = setup_distributed(args.device)
    try:
        train(args, info)
    finally:
        teardown_distributed(info)


def train(args, info):
    device, world, rank = info.device, info.world_size, info.rank
    args.parallel = resolve_parallel(args.parallel, info)
    dtype = resolve_dtype(args.dtype, device)
    seed_everything(args.seed)  # the same on every rank: every rank must build identical initial weights

    # --- tokenizer and data: refuse bad input before anything is written -------------
    from tokenizer import Tokenizer
    try:
        tok = Tokenizer(args.tokenizer)
    except (FileNotFoundError, ValueError) as e:
        fail(f"tokenizer: {e}")
    train_tokens = open_split(args.data, "train", tok)
    val_tokens = open_split(args.data, "val", tok)

    # --- the run directory: resume, or refuse to overwrite an earlier run -------------
    resume_path = latest_checkpoint(args.out_dir) if args.resume else None
    if not resume_path and (latest_checkpoint(args.out_dir) or checkpoint_path(args.out_dir, "best")
                            or checkpoint_path(args.out_dir, "final")):
        fail(f"{args.out_dir} already holds checkpoints of a run"
             + (" but no step_* checkpoint to resume from" if args.resume else "; pass --resume to continue it")
             + ". Choose another --out_dir (nothing was changed).")
    if args.resume and not resume_path:
        print0(f"--resume: no checkpoint in {args.out_dir}, starting fresh")

    # --- model ----------------------------------------------------------------
    def wrap(m):
        return wrap_model(m, info, args.parallel, dtype, args.compile, args.activation_checkpointing,
                          args.fsdp_skip_accum_sync, shard_size=args.fsdp_shard_size)

    if resume_path:  # the checkpoint knows the shape; its weights are loaded after wrapping
        resume_meta = read_checkpoint_meta(resume_path)
        config = LlamaConfig.from_dict(resume_meta["model_config"])
        model, src = None, f"resume {resume_path}"
    elif args.init_from:
        if args.parallel == "fsdp":   # built on meta, sharded, each rank reads only its shards
            model, init_meta = load_model_sharded(args.init_from, info, wrap)
        else:
            model, init_meta = load_model(args.init_from)
        config, src = model.config, f"init_from {init_meta['path']}"
        their = (init_meta.get("tokenizer") or {}).get("sha256")
        if their and their != tok.sha256:
            fail(f"{init_meta['path']} was trained with tokenizer {init_meta['tokenizer']['path']} (sha256 "
                 f"{their[:16]}...), but --tokenizer is {tok.path} (sha256 {tok.sha256[:16]}...)")
    else:
        config, src = model_config_from_args(args, tok.vocab_size), f"scratch ({args.model} preset)"
        model = None
    if config.vocab_size < tok.vocab_size:
        fail(f"the model's vocabulary ({config.vocab_size}) is smaller than the tokenizer's ({tok.vocab_size})")
    args.seq_len = args.seq_len or config.max_seq_len
    if args.seq_len > config.max_seq_len:
        fail(f"--seq_len {args.seq_len} exceeds the model's max_seq_len {config.max_seq_len}")
    for split, tokens in (("train", train_tokens), ("val", val_tokens)):
        if len(tokens) < args.seq_len + 1:
            fail(f"{args.data}: split {split!r} has {len(tokens)} tokens, fewer than one window of seq_len+1 = "
                 f"{args.seq_len + 1}; prepare more data or lower --seq_len")

    meta_init = model is None and args.parallel == "fsdp" and device.type == "cuda"
    already_wrapped = model is not None and args.parallel == "fsdp"   # load_model_sharded wrapped it
    if model is None:
        # FSDP on GPUs: build on the meta device (no memory), shard, then materialise and initialise
        # only this rank's shard, so a 65B model never exists whole on one host. (On CPU the DTensor
        # random init would give every rank the same shard values, so CPU builds the whole model.)
        with torch.device("meta" if meta_init else "cpu"):
            model = Llama(config)
    raw = model if meta_init or already_wrapped else model.to(device)
    model = model if already_wrapped else wrap(raw)
    if meta_init:
        model.to_empty(device=device)
        with torch.no_grad():
            raw.init_weights()
    optimizer = configure_optimizer(model, args.lr, args.weight_decay, (args.beta1, args.beta2), device)

    # --- resume ----------------------------------------------------------------
    start_step, best_val, tokens_seen, skipped = 0, float("inf"), 0, 0
    seed_everything(args.seed + rank)  # from here on each rank draws its own dropout masks
    if resume_path:
        meta = restore_checkpoint(resume_path, model, optimizer, device)
        start_step = meta["step"]
        best_val = meta["metrics"].get("best_val_loss", float("inf"))
        tokens_seen = meta["data_state"].get("tokens_seen", 0)
        skipped = meta["metrics"].get("skipped_steps", 0)
        changed = {k: (v, getattr(args, k, None)) for k, v in meta["config"].items()
                   if k not in ("resume", "parallel") and getattr(args, k, None) != v}
        if changed:
            print0("warning: resuming with changed settings: " +
                   ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items()))
        if meta["data_state"].get("seed", args.seed) != args.seed:
            print0("warning: --seed differs from the checkpoint's: the data stream will not continue the same")

    save_config(args, args.out_dir)
    logger = JsonlLogger(os.path.join(args.out_dir, "log.jsonl"))
    tokens_per_step = args.batch_size * args.seq_len * args.grad_accum * world
    flops_per_token = raw.flops_per_token(args.seq_len)
    peak = peak_flops(torch.cuda.get_device_name(device)) \
        if device.type == "cuda" else None
    n_params = raw.num_params()
    # resume checkpoints: fp32 weights + 2 AdamW moments = 12 bytes/parameter; best and final: 4 bytes
    kept = args.keep_last if args.keep_last > 0 else args.max_steps // max(args.save_interval, 1)
    warn_if_low_disk(args.out_dir, 12 * n_params * (kept + 1) * bool(args.save_interval) + 2 * 4 * n_params)
    print0(f"model: {n_params / 1e6:.2f}M parameters, {src}; {args.parallel} x {world} on {device}, {dtype}")
    print0(f"data: {len(train_tokens):,} train / {len(val_tokens):,} val tokens; {tokens_per_step:,} tokens per step "
           f"({args.batch_size} x {args.seq_len} x {args.grad_accum} accum x {world} ranks)")
    logger.log(event="start", step=start_step, params=n_params, world_size=world, parallel=args.parallel,
               dtype=str(dtype), tokens_per_step=tokens_per_step, source=src)

    def get_batch(tokens, stream, index, micro):
        """This rank's micro-batch `micro` of global batch `index` of a stream. A global batch is
        world * grad_accum * batch_size windows; rank r's micro-step m takes slice m * world + r."""
        offsets = window_offsets(len(tokens), args.seq_len, args.seed, stream, index,
                                 world * args.grad_accum * args.batch_size)
        first = (micro * world + rank) * args.batch_size
        return read_windows(tokens, offsets[first:first + args.batch_size], args.seq_len, device)

    @torch.no_grad()
    def evaluate():
        """Mean val loss over eval_steps global batches. The same windows every time (stream
        VAL_STREAM, batches 0..eval_steps-1), so evaluations are comparable and best.pt is not picked
        by luck; and, like training, the same windows however the batch is split over ranks."""
        with eval_mode(model):  # restores train mode afterwards, even on an exception
            total = torch.zeros((), device=device)
            for i in range(args.eval_steps):
                for micro in range(args.grad_accum):
                    x, y = get_batch(val_tokens, VAL_STREAM, i, micro)
                    with autocast(device, dtype):
                        total += model(x, y)[1].float()
        return all_reduce_mean(total / (args.eval_steps * args.grad_accum)).item()

    def checkpoint(name, with_optimizer, metrics):
        return save_checkpoint(args.out_dir, name, model, optimizer if with_optimizer else None, step=step,
                               config=vars(args), tokenizer=tok, metrics=metrics,
                               data_state={"step": step, "seed": args.seed, "tokens_seen": tokens_seen},
                               background=True)   # FSDP resume checkpoints: written while training goes on

    # --- training loop -----------------------------------------------------------
    step = start_step
    consecutive_skips, train_time, data_time, interval_losses = 0, 0.0, 0.0, []
    val_loss, last_loss, last_log, t_start = None, float("nan"), (start_step, 0.0), time.time()
    model.train()
    pbar = tqdm(total=args.max_steps, initial=start_step, disable=not info.is_main, desc="pretrain",
                dynamic_ncols=True, file=sys.stderr)
    td = time.perf_counter()
    batch = get_batch(train_tokens, TRAIN_STREAM, step, 0)
    data_time += time.perf_counter() - td
    while step < args.max_steps:
        t0 = time.perf_counter()
        lr = lr_at(step, args.lr, args.min_lr, args.warmup_steps, args.max_steps)
        set_lr(optimizer, lr)
        loss_sum = torch.zeros((), device=device)
        for micro in range(args.grad_accum):
            x, y = batch
            # DDP: no all-reduce on all but the last micro-step; FSDP: reduce-scatter every micro-step
            # (common.grad_sync says why)
            with grad_sync(model, micro == args.grad_accum - 1):
                with autocast(device, dtype):
                    loss = model(x, y)[1]  # [1]: let the (B, T, vocab) logits go now, not after backward
                # Read the next micro-batch while the GPU runs this one's queued kernels (the host
                # to device copy is asynchronous). The batch of a step depends only on (step, micro),
                # so reading ahead changes nothing in the data stream.
                td = time.perf_counter()
                nxt = (step, micro + 1) if micro + 1 < args.grad_accum else (step + 1, 0)
                batch = get_batch(train_tokens, TRAIN_STREAM, *nxt) if nxt[0] < args.max_steps else None
                data_time += time.perf_counter() - td
                (loss / args.grad_accum).backward()
            loss_sum += loss.detach()
        # The mean over ranks: every rank sees the same value, so all take the same skip decision.
        loss = all_reduce_mean(loss_sum / args.grad_accum).item()
        grad_norm = clip_grad_norm(model, args.grad_clip)
        if math.isfinite(loss) and math.isfinite(grad_norm):
            optimizer.step()
            consecutive_skips = 0
            interval_losses.append(loss)
        else:
            # A non-finite loss (a bad batch, an fp overflow, divergence): skip the update instead of
            # writing NaN into every weight; stop if it keeps happening.
            skipped += 1
            consecutive_skips += 1
            print0(f"warning: step {step + 1}: non-finite loss {loss} / grad norm {grad_norm}; update skipped "
                   f"({skipped} so far)")
            logger.log(event="skip", step=step + 1, loss=loss, grad_norm=grad_norm)
            if consecutive_skips >= args.max_skips:
                last_good = latest_checkpoint(args.out_dir)
                fail(f"{consecutive_skips} consecutive steps had a non-finite loss or gradient (up to step "
                     f"{step + 1}); training diverged. Lower --lr, raise --warmup_steps or check the data. Last good "
                     f"checkpoint: {last_good or 'none'}")
        optimizer.zero_grad(set_to_none=True)
        shorten_timeout(info, args)   # (after the first step: --step_timeout)
        step += 1
        tokens_seen += tokens_per_step
        train_time += time.perf_counter() - t0
        last_loss = loss
        pbar.update(1)

        if step % args.log_interval == 0 or step == args.max_steps:
            steps_done, time_done = step - last_log[0], train_time - last_log[1]
            tok_s = steps_done * tokens_per_step / max(time_done, 1e-9)
            tgs = tok_s / world  # tokens per GPU (process) per second
            mfu = flops_per_token * tgs / peak if peak else None
            mean_loss = sum(interval_losses) / len(interval_losses) if interval_losses else float("nan")
            record = dict(step=step, loss=mean_loss, lr=lr, grad_norm=grad_norm, tok_per_s=round(tok_s, 1),
                          tgs=round(tgs, 1), mfu=mfu, elapsed_s=round(time.time() - t_start, 2),
                          tokens=tokens_seen, skipped=skipped, data_ms=round(1000 * data_time / steps_done, 3))
            logger.log(**record)
            pbar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}")
            if info.is_main:
                tqdm.write(f"step {step:>6}/{args.max_steps} | loss {mean_loss:.4f} | lr {lr:.2e} | gnorm "
                           f"{grad_norm:.3f} | {tok_s:,.0f} tok/s | TGS {tgs:,.0f}"
                           + (f" | MFU {mfu:.1%}" if mfu is not None else "")
                           + f" | {_hms(time.time() - t_start)} | {tokens_seen / 1e6:.2f}M tok", file=sys.stderr)
            last_log, interval_losses, data_time = (step, train_time), [], 0.0

        if (args.eval_interval and step % args.eval_interval == 0) or step == args.max_steps:
            val_loss = evaluate()
            improved = val_loss < best_val
            best_val = min(best_val, val_loss)
            metrics = {"train_loss": last_loss, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50)),
                       "best_val_loss": best_val, "skipped_steps": skipped}
            logger.log(event="eval", step=step, val_loss=val_loss, val_ppl=metrics["val_ppl"], best_val_loss=best_val)
            if info.is_main:
                tqdm.write(f"eval step {step}: val loss {val_loss:.4f}, perplexity {metrics['val_ppl']:.2f}"
                           + (" (best)" if improved else ""), file=sys.stderr)
            if improved:
                checkpoint("best", False, metrics)

        if args.save_interval and step % args.save_interval == 0:
            metrics = {"train_loss": last_loss, "val_loss": val_loss, "best_val_loss": best_val,
                       "skipped_steps": skipped}
            checkpoint(f"step_{step:07d}", True, metrics)
            rotate_checkpoints(args.out_dir, args.keep_last)
    pbar.close()

    # --- final checkpoint and summary ----------------------------------------------
    metrics = {"train_loss": last_loss, "val_loss": val_loss, "best_val_loss": best_val, "skipped_steps": skipped}
    final = checkpoint("final", False, metrics)
    barrier()
    elapsed = time.time() - t_start
    done = step - start_step
    logger.log(event="end", step=step, tokens=tokens_seen, elapsed_s=round(elapsed, 2), skipped=skipped,
               best_val_loss=best_val)
    mean_tok_s = done * tokens_per_step / max(train_time, 1e-9)
    best_str = f"{best_val:.4f} (perplexity {math.exp(min(best_val, 50)):.2f})" if math.isfinite(best_val) else "n/a"
    print0("\n".join([
        "-" * 72,
        f"pretraining done: {done} steps this run (step {start_step} -> {step}) in {_hms(elapsed)}",
        f"  tokens seen      {tokens_seen:,} ({tokens_per_step:,} per step)",
        f"  throughput       {mean_tok_s:,.0f} tok/s, {mean_tok_s / world:,.0f} tokens/GPU/s"
        + (f", MFU {flops_per_token * mean_tok_s / world / peak:.1%}" if peak else ""),
        f"  last train loss  {last_loss:.4f}",
        f"  best val loss    {best_str}",
        f"  skipped steps    {skipped} (non-finite loss)",
        f"  checkpoints      {final}" + (f", {checkpoint_path(args.out_dir, 'best')}"
                                         if checkpoint_path(args.out_dir, "best") else ""),
        f"  log              {os.path.join(args.out_dir, 'log.jsonl')}",
        "-" * 72]))
    return {"step": step, "best_val_loss": best_val, "final": final}


def _hms(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


if __name__ == "__main__":
    main()
