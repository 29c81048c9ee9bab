"""
common.py -- the small plumbing module every stage script shares (pretrain, sft, reward, dpo, ppo).

Each stage keeps its own training loop inline, in its own file, so a reader sees the whole loop of
a stage in one place. What lives here is only what would otherwise be copied five times:

  distributed   setup_distributed / teardown_distributed (torchrun env; nccl on cuda, gloo on cpu),
                shorten_timeout (after the first step), print0, all_reduce_mean, barrier
  precision     resolve_dtype (--dtype), autocast (bf16 autocast on cuda, fp32 on cpu), seed_everything
  config        add_common_args(parser) + parse_config(parser) (flags with the same names in every
                stage, optional --config JSON of plain values), save_config -> RUN/config.json
  model         wrap_model (DDP, or FSDP2 fully_shard per block + root, HSDP on a 2-D mesh; full or
                selective activation checkpointing; torch.compile), unwrap, grad_sync (no_sync for accumulation), eval_mode,
                configure_optimizer (AdamW, decay on matrices only), lr_at (warmup + cosine),
                clip_grad_norm (plain tensors and DTensors alike)
  checkpoints   save_checkpoint (atomic; sharded DCP directory under FSDP, resume checkpoints
                written in the background: wait_for_checkpoint), restore_checkpoint (resume),
                latest_checkpoint, rotate_checkpoints (keep last k), load_model (any of our
                checkpoints, a run directory, or a HuggingFace directory), load_model_sharded /
                load_start_model (the same under FSDP, each rank reading only its shards),
                load_frozen_sharded (a frozen reference / reward model so), consolidate; also= saves
                and restores more trained models in a resume checkpoint (PPO's critic)
  lora          setup_lora (--lora_* flags -> adapters on a frozen base), adapter-only checkpoints
                (trainable_state, load_lora_checkpoint: the base's sha256 checked), export_peft
  logging       JsonlLogger -> RUN/log.jsonl
  dry run       fsdp_dry_run (a stage's real FSDP step on fake tensors over a fake process group:
                per-rank peak memory by category at 7B-70B, on a CPU; several trained and frozen
                models: PPO), add_dry_run_args, print_dry_run

Run directory layout:
    RUN/config.json          the effective configuration (every flag, also usable as --config)
    RUN/log.jsonl            one JSON object per log line / eval / event
    RUN/step_0001000.pt      resume checkpoints (model + optimizer + RNG + data position), rotated
    RUN/best.pt, final.pt    model-only checkpoints: best by the stage's eval metric, and the last
  Under --parallel fsdp the same names are DIRECTORIES (RUN/step_0001000/, RUN/best/, RUN/final/)
  in torch.distributed.checkpoint (DCP) format: every rank writes its own shard, nobody gathers
  the whole model. Each holds DCP's files plus meta.pt (everything below except model/optimizer).

Checkpoint format (a dict written by torch.save, read back with torch.load(weights_only=True), so
it holds only tensors and plain containers of str/int/float/bool/None):
    "format":       "nanollama.ckpt.v1"
    "model":        state_dict of the plain Llama (unwrapped: no "module." / "_orig_mod." prefixes)
    "model_config": LlamaConfig.to_dict()
    "step":         optimizer steps completed (a resumed run starts at this step)
    "config":       the run's arguments (dict of plain values)
    "tokenizer":    {"path": str, "sha256": str} or None
    "metrics":      {"val_loss": ..., "best_val_loss": ..., ...} (stage specific)
  resume checkpoints (step_*) also have
    "optimizer":    optimizer.state_dict()
    "rng":          one entry per rank: {"torch": ByteTensor, "cuda": ByteTensor|None,
                    "numpy": {"keys": int64 tensor, "pos", "has_gauss", "gauss"}, "python": [...]}
    "data_state":   stage specific position in the data stream (pretrain: {"step": n})
  plus any extra keys a stage passes to save_checkpoint (e.g. reward normalisation statistics).
  A LoRA run (--lora_rank > 0) writes adapter-only checkpoints: "model" holds only the trainable
  tensors (adapters, a reward head) and buffers, and
    "lora":         {"base_path", "base_sha256", "rank", "alpha", "dropout", "targets", "embeddings"}

CLI (offline tools; no process group needed):
    python common.py consolidate RUN/step_0001000 merged.pt        # DCP shards -> one file
    python common.py consolidate RUN/final merged.pt --hf hf_out/  # ... and a HuggingFace directory
    python common.py consolidate LORA_RUN/final.pt merged.pt --hf hf/ --peft peft/  # LoRA: merged + adapters
    python common.py info RUN/best.pt                               # print a checkpoint's metadata
"""
import argparse
import contextlib
import hashlib
import json
import math
import os
import random
import re
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from lora import LORA_TARGETS, BaseView, apply_lora, lora_adapters, strip_lora
from model import Llama, LlamaConfig, load_state_dict_checked

CKPT_FORMAT = "nanollama.ckpt.v1"
STEP_RE = re.compile(r"^step_(\d{7,})(\.pt)?$")


def fail(msg: str):
    """Stop with a clear message and exit status 1 (the stage scripts' way to refuse bad input)."""
    raise SystemExit(f"error: {msg}")


# -----------------------------------------------------------------------------
# Distributed


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # True if setup_distributed created the process group (so it destroys it)
    step_timeout_set: bool = False   # shorten_timeout has run

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: str = "auto") -> DistInfo:
    """Read torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE) and join the process group.

    Not under torchrun: a single process, no process group. NCCL on cuda (one GPU per local rank),
    gloo on cpu. If a process group already exists (a test that built one itself), it is reused
    and left for its owner to destroy."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    _refuse_bare_srun()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_initialized():
        world_size, rank = dist.get_world_size(), dist.get_rank()
    if device == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)  # before init_process_group: NCCL binds each rank to its own GPU
    else:
        dev = torch.device(device)
    info = DistInfo(rank, local_rank, world_size, dev)
    if world_size > 1 and dev.type == "cpu":
        # torchrun sets OMP_NUM_THREADS=1 per worker; on a CPU-only run that leaves cores idle, and
        # more threads than cores per rank makes every rank crawl (measured: 3-4x slower). Split the
        # cores evenly between this node's ranks.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        torch.set_num_threads(max(1, cores // local_world))
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {}
        if backend == "nccl":
            _warn_small_shm()
            # As torchtitan: a hung collective raises on every rank instead of blocking forever
            # (3 = tear down the process group and the process), and the flight recorder keeps the
            # last collectives of each rank and dumps them on a timeout, to see which rank hung
            # where. 300 s allows the first step's slow starts (NCCL setup, compilation). Unset
            # variables only: an operator's own settings win. Never run on a GPU here (no GPU).
            for key, value in (("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3"), ("TORCH_NCCL_TRACE_BUFFER_SIZE", "20000"),
                               ("TORCH_NCCL_DUMP_ON_TIMEOUT", "1")):
                os.environ.setdefault(key, value)
            kwargs["timeout"] = timedelta(seconds=300)
        dist.init_process_group(backend, device_id=dev if dev.type == "cuda" else None, **kwargs)
        info.owns_group = True
    return info


def shorten_timeout(info: DistInfo, args):
    """Call after every optimizer step; after the first it lowers the process group's timeout to
    --step_timeout seconds, once (torchtitan does the same). The 300 s of setup_distributed cover
    the first step's slow starts (communicators, compilation); after that a collective waiting
    longer means a rank hung or died, and every rank should dump its flight record and exit sooner
    (TORCH_NCCL_ASYNC_ERROR_HANDLING=3). FSDP only: every FSDP checkpoint and evaluation is
    collective, while under DDP rank 0 writes whole checkpoints as the others wait (minutes at
    billions of parameters). torch sets a group's timeout at init only, publicly; this uses the
    private distributed_c10d._set_pg_timeout (torch 2.13: NCCL and gloo), and warns where it is gone.
    Only a group setup_distributed made (300 s on NCCL): one a caller made keeps its own timeout."""
    if info.step_timeout_set or not info.owns_group or args.parallel != "fsdp" or args.step_timeout <= 0:
        return
    info.step_timeout_set = True
    set_timeout = getattr(dist.distributed_c10d, "_set_pg_timeout", None)
    if set_timeout is None:
        print0("warning: this torch cannot change a process group's timeout; keeping the one set at init")
        return
    set_timeout(timedelta(seconds=args.step_timeout))


def _refuse_bare_srun():
    """`srun python pretrain.py` (no torchrun) starts SLURM_NTASKS copies that each see no
    WORLD_SIZE: N unrelated single-process runs, all on cuda:0, all writing one --out_dir. Refuse."""
    tasks = int(os.environ.get("SLURM_NTASKS", "1") or 1)
    if tasks > 1 and "WORLD_SIZE" not in os.environ and not dist.is_initialized():
        fail(f"started by srun as {tasks} tasks without torchrun: each would train alone on cuda:0 and write the "
             f"same --out_dir. Launch one torchrun per node: srun --ntasks-per-node=1 torchrun --nnodes=$SLURM_NNODES "
             f"--nproc_per_node=GPUS --rdzv_backend=c10d --rdzv_endpoint=$HEAD_NODE:29500 ...")


def _warn_small_shm(min_bytes=1 << 30):
    """NCCL moves data between GPUs of one node through /dev/shm. Docker gives containers 64 MB by
    default, and NCCL then dies with "unhandled system error" or a bus error mid-run (the seed hit
    this). Warn before it happens."""
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return
    if st.f_frsize * st.f_blocks < min_bytes and os.environ.get("LOCAL_RANK", "0") == "0":
        print(f"warning: /dev/shm is only {st.f_frsize * st.f_blocks / 2**20:.0f} MB; NCCL may crash. Run docker "
              f"with --shm-size=16g (or --ipc=host), or set NCCL_SHM_DISABLE=1 (slower).", flush=True)


def teardown_distributed(info: DistInfo):
    global _pending_save
    if _pending_save is not None:   # a run that ended without its final save (an error): let the
        _pending_save[0].result()  # background write end; the checkpoint stays incomplete (.tmp)
        _pending_save = None
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def print0(*args, **kwargs):
    """print on rank 0 only (every rank printing the same line makes logs unreadable)."""
    if is_main():
        print(*args, **kwargs, flush=True)


def barrier():
    if dist.is_initialized():
        dist.barrier()


def max_across_ranks(n: int, device) -> int:
    """The largest n over all ranks (n itself in one process): e.g. how many forwards every rank must
    run when each is a collective (a sharded FSDP model)."""
    t = torch.tensor([n], device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over all ranks (a copy; the input is left alone)."""
    x = x.detach().clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x /= dist.get_world_size()
    return x


# -----------------------------------------------------------------------------
# Seeds and precision


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every cuda device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """--dtype: "auto" is bfloat16 on cuda (if supported) and float32 elsewhere. float16 is left
    out on purpose: it needs a loss scaler, and every GPU this stack targets has bfloat16."""
    if name == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision for the forward pass: matmuls in bf16, master weights, reductions and the
    loss in fp32 (model.py keeps RMSNorm and the logits in float32). A no-op for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# -----------------------------------------------------------------------------
# Configuration: flags with the same names in every stage, an optional JSON config file


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags every stage script shares. A stage adds its own flags and changes defaults with
    parser.set_defaults(lr=..., ...) before calling parse_config."""
    g = parser.add_argument_group("common (the same in every stage)")
    g.add_argument("--config", default=None,
                   help="JSON file of plain values {flag_name: value}; flags on the command line win. "
                        "A run's saved config.json works here.")
    g.add_argument("--out_dir", default="out/run", help="run directory: config.json, log.jsonl, checkpoints")
    g.add_argument("--init_from", default=None,
                   help="start from weights: one of our checkpoint files, a run directory (best, final, newest "
                        "step) or a HuggingFace LLaMA directory")
    g.add_argument("--tokenizer", default=None, help="sentencepiece model (default: the shipped tokenizer/lab.model)")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="auto = cuda if available")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="compute dtype; auto = bfloat16 autocast on cuda, float32 on cpu")
    g.add_argument("--parallel", default=None, choices=["none", "ddp", "fsdp"],
                   help="data parallelism under torchrun (default: ddp with >1 process, none otherwise)")
    g.add_argument("--batch_size", type=int, default=8, help="sequences per micro-batch per process")
    g.add_argument("--grad_accum", type=int, default=1,
                   help="micro-batches per optimizer step; global batch = batch_size * grad_accum * world_size")
    g.add_argument("--lr", type=float, default=3e-4, help="peak learning rate")
    g.add_argument("--min_lr", type=float, default=3e-5, help="learning rate at the end of the cosine decay")
    g.add_argument("--warmup_steps", type=int, default=100, help="linear warmup steps")
    g.add_argument("--max_steps", type=int, default=1000, help="optimizer steps in total (end of the cosine)")
    g.add_argument("--weight_decay", type=float, default=0.1, help="AdamW decay, applied to matrices only")
    g.add_argument("--beta1", type=float, default=0.9)
    g.add_argument("--beta2", type=float, default=0.95)
    g.add_argument("--grad_clip", type=float, default=1.0, help="clip the global gradient norm (0 = off)")
    g.add_argument("--eval_interval", type=int, default=200, help="evaluate every N steps (0 = only at the end)")
    g.add_argument("--eval_steps", type=int, default=20,
                   help="batches per evaluation (global batches, split over ranks like training)")
    g.add_argument("--log_interval", type=int, default=10, help="log every N steps")
    g.add_argument("--save_interval", type=int, default=500, help="write a resume checkpoint every N steps (0 = off)")
    g.add_argument("--keep_last", type=int, default=2, help="resume checkpoints to keep (0 = all)")
    g.add_argument("--seed", type=int, default=1337)
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False, help="torch.compile the model")
    g.add_argument("--activation_checkpointing", type=int, nargs="?", const=1, default=0, metavar="K",
                   help="recompute blocks' activations in the backward pass (less memory, ~1/3 more compute): "
                        "every block, or with K every K-th one (selective: blocks 0, K, 2K, ...; 0 = off)")
    g.add_argument("--fsdp_shard_size", type=int, default=0,
                   help="FSDP: shard each model over this many GPUs and replicate across the groups (HSDP, a 2-D "
                        "mesh; set it to the GPUs per node so the per-block all-gathers stay on NVLink and only the "
                        "gradient all-reduce crosses nodes). 0 = shard over all GPUs")
    g.add_argument("--step_timeout", type=float, default=180,
                   help="FSDP: seconds a collective may wait after the first optimizer step before every rank "
                        "aborts (the first step gets 300); 0 = keep 300")
    g.add_argument("--fsdp_skip_accum_sync", action=argparse.BooleanOptionalAction, default=False,
                   help="FSDP with --grad_accum > 1: reduce-scatter once per step instead of every micro-step; "
                        "less communication, but every rank holds unsharded fp32 gradients (4 bytes/parameter)")
    g.add_argument("--fsdp_gather_rollout", action=argparse.BooleanOptionalAction, default=True,
                   help="FSDP generation (rlhf_ppo.py, grpo.py, dpo.py rounds): gather the whole model once per "
                        "rollout (one bf16 copy per GPU) instead of every block at every token (common.gathered)")
    g.add_argument("--resume", action=argparse.BooleanOptionalAction, default=False,
                   help="continue from the newest step_* checkpoint in --out_dir (starts fresh if there is none)")
    lo = parser.add_argument_group("LoRA (the same in every stage; see lora.py)")
    lo.add_argument("--lora_rank", type=int, default=0,
                    help="train rank-r adapters on a frozen base instead of every weight (0 = full fine-tuning)")
    lo.add_argument("--lora_alpha", type=float, default=16.0, help="the update is scaled by alpha / rank")
    lo.add_argument("--lora_dropout", type=float, default=0.0, help="dropout on the adapters' input")
    lo.add_argument("--lora_targets", default=",".join(LORA_TARGETS),
                    help="comma-separated matrices that get adapters, of " + ",".join(LORA_TARGETS))
    lo.add_argument("--lora_embeddings", action=argparse.BooleanOptionalAction, default=False,
                    help="an adapter on the token embedding too (tied: the output head shares it)")
    return parser


def parse_config(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse flags; values from --config FILE become defaults, so explicit flags override them.
    The file is JSON, never executed (nanoGPT's configurator executes Python files)."""
    pre, _ = parser.parse_known_args(argv)
    if getattr(pre, "config", None):
        try:
            with open(pre.config, encoding="utf-8") as f:
                values = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            fail(f"cannot read config file {pre.config}: {e}")
        if not isinstance(values, dict):
            fail(f"config file {pre.config} must hold a JSON object of flag values")
        actions = {a.dest: a for a in parser._actions}
        unknown = sorted(set(values) - set(actions) - {"config"})
        if unknown:
            fail(f"config file {pre.config}: unknown keys {unknown}")
        values.pop("config", None)
        for key, value in values.items():
            a = actions[key]
            if value is not None and a.type in (int, float) and not isinstance(value, bool):
                if not isinstance(value, (int, float)) or (a.type is int and float(value) != int(value)):
                    fail(f"config file {pre.config}: {key} must be {a.type.__name__}, got {value!r}")
                values[key] = a.type(value)
            if a.choices is not None and values[key] not in a.choices:
                fail(f"config file {pre.config}: {key}={value!r} is not one of {list(a.choices)}")
        parser.set_defaults(**values)
    return parser.parse_args(argv)


def save_config(args: argparse.Namespace, out_dir: str, extra: dict = None):
    """Write the effective configuration next to the checkpoints (rank 0, atomically). The keys are
    exactly the flags, so the file can be passed back as --config to repeat a run."""
    if is_main():
        os.makedirs(out_dir, exist_ok=True)
        atomic_write_json(os.path.join(out_dir, "config.json"), {**vars(args), **(extra or {})})


def atomic_write_json(path: str, obj):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
    os.replace(tmp, path)


def atomic_write_jsonl(path: str, records):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# Model wrapping: DDP / FSDP2, activation checkpointing, compile


def resolve_parallel(parallel, info: DistInfo, use: str = "ddp or fsdp") -> str:
    """--parallel's default (ddp under torchrun, none in one process), and a refusal of none under
    torchrun: every rank would train its own unrelated copy of the model and save over the others.
    `use` names the modes the stage accepts, for the message."""
    parallel = parallel or ("ddp" if info.distributed else "none")
    if info.distributed and parallel == "none":
        fail(f"{info.world_size} processes with --parallel none would train {info.world_size} unrelated models; "
             f"use {use}")
    return parallel


def wrap_model(model: nn.Module, info: DistInfo, parallel: str = "none", dtype: torch.dtype = torch.float32,
               compile: bool = False, activation_checkpointing: int = 0,
               skip_accum_sync: bool = False, shard_size: int = 0) -> nn.Module:
    """Prepare a Llama (or anything with .layers) for training; returns the module to call.

    The plain model stays reachable with unwrap(); its parameter names never change (no "module."
    or "_orig_mod." prefixes reach a checkpoint):
      - activation checkpointing and compile replace each block's / the model's forward in place;
      - DDP keeps the model as .module;
      - FSDP2's fully_shard changes the model's class in place (parameters become DTensors).
    The model must already be on info.device (or on the meta device for FSDP, see pretrain.py).
    FSDP2: create the optimizer before any forward (a forward leaves the root's parameters unsharded,
    and AdamW must hold the sharded ones; dpo.py found this), and generate through common.generate
    (on every rank), not model.generate.
    activation_checkpointing (--activation_checkpointing [K]): 0 / False off, 1 / True every block,
    K every K-th block (blocks 0, K, 2K, ...; torchtitan's per-layer "selective" AC): memory between
    none and full, recomputing only those blocks in the backward pass.
    skip_accum_sync (FSDP only, --fsdp_skip_accum_sync): see grad_sync.
    shard_size (FSDP only, --fsdp_shard_size S < world size): HSDP, a (world / S, S) mesh: each model
    is sharded over the S ranks of its group and replicated across the world / S groups. Per-block
    all-gathers and gradient reduce-scatters stay inside a group (a node's NVLink); across groups
    only the sharded gradients are all-reduced, once per micro-step. Memory per rank is that of
    FSDP over S ranks."""
    if parallel in ("ddp", "fsdp") and not info.distributed:
        fail(f"--parallel {parallel} needs several processes: launch with torchrun --nproc_per_node=N")
    llama = getattr(model, "backbone", model)  # reward.py's RewardModel holds its Llama as .backbone
    blocks = list(getattr(llama, "layers", []))
    if activation_checkpointing:
        for i, block in enumerate(blocks):
            if i % int(activation_checkpointing) == 0:   # (True counts as 1: every block)
                _checkpoint_forward(block)
    if parallel == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        shards = shard_size or info.world_size
        if shard_size < 0 or info.world_size % shards:
            fail(f"--fsdp_shard_size {shard_size} must divide the {info.world_size} processes")
        if shards == info.world_size:
            mesh = init_device_mesh(info.device.type, (info.world_size,))
        else:   # fully_shard on a 2-D mesh replicates over dim 0 and shards over dim 1
            mesh = init_device_mesh(info.device.type, (info.world_size // shards, shards),
                                    mesh_dim_names=("replicate", "shard"))
        # bf16, one precision scheme for one process, DDP and FSDP: autocast decides which ops run
        # in bf16 (common.autocast). FSDP's policy only sets the dtype parameters are gathered in
        # (bf16: half the all-gather and the gathered copies) and gradients are reduced in (fp32);
        # the sharded master weights and AdamW states stay fp32. cast_forward_inputs=False: FSDP
        # otherwise casts every floating input of a unit to bf16 -- the rotary table (positions up
        # to 4k need fp32) and the fp32 residual stream passed from block to block.
        bf16 = dtype == torch.bfloat16
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False) \
            if bf16 else MixedPrecisionPolicy()
        for block in blocks:
            if compile:
                # Compile the block's forward, not its __call__: FSDP's all-gather hooks run around
                # the compiled graph instead of being traced into it.
                block.forward = torch.compile(block.forward)
            # One FSDP unit per block: its parameters are gathered just before it runs and freed
            # right after, so only ~2 blocks (current + prefetched) are ever whole on a GPU.
            fully_shard(block, mesh=mesh, mp_policy=mp)
        tied = getattr(getattr(llama, "config", None), "tie_embeddings", True)
        if blocks and not tied:
            # The embedding and [final norm, head] as units of their own: gathered only while they
            # run, instead of for the whole step as the root's parameters are (2 x 131M parameters
            # at 7B). (Tied weights must stay in one unit: they are left to the root.) The lookup's
            # output goes back to fp32, as autocast leaves it in one process (an fp32 residual).
            fully_shard(llama.tok_embeddings, mesh=mesh, mp_policy=MixedPrecisionPolicy(
                param_dtype=mp.param_dtype, reduce_dtype=mp.reduce_dtype, output_dtype=torch.float32,
                cast_forward_inputs=False) if bf16 else mp)
            # (reward.py's backbone has no head: output is None there)
            fully_shard([m for m in (llama.norm, llama.output) if m is not None], mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)  # the root unit: whatever is left (tied weights, heads)
        model.skip_accum_sync = skip_accum_sync  # read by grad_sync
        return model
    if compile:
        model.compile()  # in place: compiles __call__, keeps parameter names
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        ids = [info.device.index] if info.device.type == "cuda" else None
        # gradient_as_bucket_view: gradients live inside DDP's all-reduce buckets instead of
        # being copied there, which saves one model-sized buffer of memory.
        return DDP(model, device_ids=ids, gradient_as_bucket_view=True)
    return model


def _checkpoint_forward(block: nn.Module):
    """Activation checkpointing (Chen et al. 2016): keep only the block's input in the forward pass
    and recompute its insides during backward. Done by replacing the instance's forward, so the
    parameter names stay the same (checkpoint_wrapper would add a prefix to every name)."""
    from torch.utils.checkpoint import checkpoint
    inner = block.forward

    def forward(*args, **kwargs):
        return checkpoint(inner, *args, use_reentrant=False, **kwargs)
    block.forward = forward


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside a DDP wrapper (FSDP2 and our compile/checkpointing work in place)."""
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def grad_sync(model: nn.Module, enabled: bool):
    """Gradient accumulation: `enabled` is True on the last micro-step of an optimizer step. Wrap
    each micro-step's forward AND backward:  with grad_sync(model, micro == grad_accum - 1): ...
    DDP: no_sync() skips the all-reduce on the other micro-steps (gradients accumulate locally, in
    the gradient buffers DDP holds anyway).
    FSDP2: reduce-scatter on EVERY micro-step by default (as torchtitan does), so gradients always
    accumulate into the sharded ones. Skipping the sync (set_requires_gradient_sync(False)) would
    make each rank keep the unsharded gradients of the whole model in reduce_dtype (fp32) between
    micro-steps: 4 bytes per parameter on every rank, whatever the world size -- 27 GB per GPU at
    7B, more than the sharded weights, gradients and AdamW states together on 16 GPUs. It saves
    communication only (one reduce-scatter per step instead of one per micro-step), so it is an
    opt-in: wrap_model(..., skip_accum_sync=True), --fsdp_skip_accum_sync; --estimate counts it."""
    if is_fsdp(model):
        model.set_requires_gradient_sync(enabled or not getattr(model, "skip_accum_sync", False))
        yield
    elif not enabled and hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    else:
        yield


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """model.eval() for the block, then back to the mode it was in. The seed's lesson: an eval
    function that calls model.eval() and forgets model.train() silently turns dropout off for the
    rest of training."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


# -----------------------------------------------------------------------------
# Generation under FSDP (rollouts of rlhf_ppo.py / grpo.py, dpo.py's rounds, evaluations).
# model.generate runs the model's pieces (embedding, blocks, head), never the root's forward, and
# under FSDP each piece's forward is a collective: its unit all-gathers its weights from every rank.


def _fsdp_units(raw):
    return [m for m in raw.modules() if is_fsdp(m)]


def _ready_for_generation(raw):
    """Under FSDP: the root is identified (FSDP does it lazily in the first root forward; a block
    running first would make itself a root) and every unit has gathered once OUTSIDE inference mode.
    FSDP allocates its gathered-weight buffers on the first all-gather; inside generate's
    torch.inference_mode they would be inference tensors, and the next training forward fails
    ("Inplace update to inference tensor outside InferenceMode"). Once per model: one extra gather."""
    raw._get_fsdp_state()._lazy_init()
    if not getattr(raw, "_generation_ready", False):
        with torch.no_grad():
            for m in _fsdp_units(raw):
                m.unshard()
            for m in _fsdp_units(raw):
                m.reshard()
        raw._generation_ready = True


def generate(model, prompts, max_new_tokens: int, **kwargs) -> list:
    """model.generate (KV cache, left padding; same arguments) for a plain, DDP-wrapped or
    FSDP-sharded Llama. Under FSDP EVERY rank must call it, each with its own prompts:
      - the root unit's weights (a tied embedding/head, the norm) are gathered for the call;
      - each forward gathers its block, so a rank whose answers all ended keeps stepping (padded,
        without sampling) until every rank's have: one all-reduce of a flag per token. A rank that
        stopped alone would leave the others waiting in an all-gather forever;
      - a rank with no prompts steps along with a one-token dummy prompt and returns [];
      - inside `with gathered(model)` every unit is whole already: no collective per step, and no
        lock-step either.
    The tokens are a lone run's: the same prompts, generator and weights give the same answers."""
    raw = unwrap(model)
    if not is_fsdp(raw):
        return raw.generate(prompts, max_new_tokens, **kwargs)
    _ready_for_generation(raw)
    held = getattr(raw, "_held_whole", False)
    device = next(raw.parameters()).device

    def all_done(stopping: bool) -> bool:
        flag = torch.tensor([int(not stopping)], device=device)
        dist.all_reduce(flag)   # the number of ranks still going
        return flag.item() == 0

    if not held:
        raw.unshard()
    try:
        out = raw.generate(prompts if len(prompts) else [[0]], max_new_tokens,
                           all_done=None if held else all_done, **kwargs)
    finally:
        if not held:
            raw.reshard()
    return out if len(prompts) else []


@contextlib.contextmanager
def gathered(model, enabled: bool = True):
    """Hold every FSDP unit of `model` whole (in the parameter dtype) for the block, e.g. a rollout:
    one all-gather per unit for the whole block instead of one per unit per decoding step.
    Chosen for the rollouts (--fsdp_gather_rollout, on by default): a decoding step reads every
    weight once to produce one token per sequence, so gathering the weights at every step would
    move the whole model over the network per token (at 7B ~14 GB in bf16, ~10x the step's own
    time even on NVLink). The price is one whole bf16 copy per GPU during the rollout (14 GB at 7B;
    at 70B, 140 GB does not fit an 80 GB GPU: --no-fsdp_gather_rollout gathers block by block,
    ~2 blocks at a time, in lock-step). No-op for plain and DDP models, and if not enabled."""
    raw = unwrap(model)
    if not enabled or not is_fsdp(raw) or getattr(raw, "_held_whole", False):
        yield model
        return
    _ready_for_generation(raw)
    raw.set_reshard_after_forward(False)   # forwards inside the block keep their unit whole
    for m in _fsdp_units(raw):
        m.unshard()
    raw._held_whole = True
    try:
        yield model
    finally:
        raw._held_whole = False
        raw.set_reshard_after_forward(True)
        raw.set_reshard_after_forward(False, recurse=False)   # FSDP's default for the root, set at lazy init
        for m in _fsdp_units(raw):
            m.reshard()


# -----------------------------------------------------------------------------
# Dry run: the real FSDP training step on fake tensors (--estimate --dry_run)

DRY_RUN_CATEGORIES = ("params", "grads", "optimizer", "activations", "temporaries")


def add_dry_run_args(group):
    """The dry run's flags, the same in every stage that has one (pretrain, sft, reward, dpo)."""
    group.add_argument("--dry_run", action="store_true",
                       help="run this stage's FSDP wrapping and training step on fake tensors over a fake process "
                            "group of --world_size ranks (no memory, no GPU; seconds to minutes on a CPU) and print "
                            "the per-rank peak memory by category, then exit")
    group.add_argument("--world_size", type=int, default=8, help="GPUs to estimate / dry-run for")
    group.add_argument("--gpu_mem_gb", type=float, default=80.0, help="memory per GPU, GB (1e9 bytes)")


def dry_run_config(init_from: str, kind: str = None) -> LlamaConfig:
    """The shape of the model a stage would start from, without reading any weights: a preset name
    (e.g. llama1-7b: no checkpoint needed to plan a run) or one of our checkpoints / run dirs
    (language models, or also checkpoints of `kind`: reward.py's own)."""
    from model import PRESETS
    if init_from in PRESETS:
        return LlamaConfig.from_preset(init_from)
    path = resolve_checkpoint(init_from)
    if is_hf_dir(path):
        fail(f"--dry_run reads no HuggingFace config: pass the preset of the same shape as --init_from "
             f"(one of {sorted(PRESETS)})")
    meta = read_checkpoint_meta(path)
    if kind is None or meta.get("kind") != kind:
        _refuse_other_kind(meta, path)
    return LlamaConfig.from_dict(meta["model_config"])


def dry_run_label(stage: str, args, dtype: torch.dtype, batch: str) -> str:
    """One line naming what a dry run ran: stage, ranks, dtype, micro-batch, accumulation, flags."""
    return (f"{stage}, FSDP x {args.world_size}, {str(dtype).replace('torch.', '')}, micro-batch {batch}, "
            f"grad_accum {args.grad_accum}" + (", act. checkpointing" if args.activation_checkpointing else "")
            + (f" (1 block in {args.activation_checkpointing})" if args.activation_checkpointing > 1 else "")
            + (f", HSDP {args.world_size // args.fsdp_shard_size} x {args.fsdp_shard_size}"
               if 0 < args.fsdp_shard_size < args.world_size else "")
            + (", --fsdp_skip_accum_sync" if args.fsdp_skip_accum_sync else "")
            + (f", LoRA rank {args.lora_rank} (frozen base)" if getattr(args, "lora_rank", 0) > 0 else ""))


def print_dry_run(measured: dict, world_size: int, gpu_mem_gb: float, what: str, closed: dict = None):
    """The dry run's per-rank peak by category, next to a closed form's numbers if given."""
    print(f"dry run: {what} (fake tensors, fake process group of {world_size})")
    print(f"{'peak GB per rank':<28}{'dry run':>10}" + (f"{'closed form':>18}" if closed else ""))
    for key in (*DRY_RUN_CATEGORIES, "total"):
        cf = "" if not closed else "(in activations)" if closed.get(key) is None else f"{closed[key] / 1e9:.2f}"
        print(f"{key:<28}{measured[key] / 1e9:>10.2f}" + (f"{cf:>18}" if closed else ""))
    if closed:
        print(f"closed form vs dry run: {closed['total'] / measured['total'] - 1:+.1%}")
    print(f"headroom on {gpu_mem_gb:.0f} GB after ~2 GB for the CUDA context and NCCL: "
          f"{1 - (measured['total'] + 2e9) / (gpu_mem_gb * 1e9):.0%}")


class _Holder(nn.Module):
    """Several FSDP models under one root for FSDPMemTracker (fsdp_dry_run); never called itself."""

    def __init__(self, models):
        super().__init__()
        self.models = nn.ModuleList(models)

    def forward(self):
        raise RuntimeError("_Holder only groups models for the memory tracker")


def fsdp_dry_run(build, micro_step, world_size: int, dtype: torch.dtype = torch.bfloat16, grad_accum: int = 1,
                 activation_checkpointing: int = 0, skip_accum_sync: bool = False, frozen=None,
                 shard_size: int = 0, lora=None, trained=()) -> dict:
    """Per-rank peak memory of a stage's real FSDP training step at any size, on a laptop.

    The model is built on the meta device (build() -> nn.Module, called under torch.device("meta")),
    wrapped by wrap_model exactly as training wraps it, then materialised with FakeTensorMode:
    tensors with shapes, dtypes and devices but no storage, so 70B costs nothing. The process
    group is PyTorch's "fake" backend (world_size ranks, this process is rank 0; collectives
    return at once). Two optimizer steps run through grad_sync, autocast, gradient clipping and
    AdamW; the second one's forward and backward passes are tracked by FSDPMemTracker, which
    attributes every live tensor to a category. micro_step(model) -> loss runs one micro-batch's
    forward (it makes its own inputs, e.g. torch.randint). frozen: a second builder, for a frozen
    model sharded the same way with no gradients and no optimizer (DPO's reference); then
    micro_step(model, frozen_model). Its sharded weights are added to "params" (the tracker follows
    the trained model only; the frozen one's gathered weights show up as temporaries). shard_size:
    HSDP (wrap_model), e.g. 16 ranks as 2 x 8. lora: the
    stage's args when --lora_rank > 0: the built model gets its adapters as training adds them
    (add_adapters: the base frozen, in bf16 for a bf16 run), so only they have gradients and AdamW.
    frozen may also be a list of builders (PPO: reference
    and reward model). trained: builders of more trained models, wrapped the same way, each with its
    own AdamW (PPO's critic beside the actor); micro_step(model, *trained models, *frozen models)
    then runs all their forwards and may call backward() itself on all but the last loss it returns.
    All trained models are tracked together: "optimizer" and "grads" hold every one's.

    grad_accum > 2 runs as 2 micro-steps: the third and later ones repeat the second's memory.
    Returns bytes per rank at the peak: DRY_RUN_CATEGORIES plus "total". Not counted (budget
    2-4 GB per GPU): CUDA context, NCCL buffers, allocator fragmentation. The optimizer step's own
    temporaries are not tracked either: in fake mode DTensor's sharding propagation materialises
    global-size temporaries that a real GPU never holds (measured: it inflates the optimizer
    states); the states themselves are counted, at their local shard size."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.testing._internal.distributed.fake_pg import FakeStore
    if dist.is_initialized():
        fail("--dry_run runs in one process with a fake process group: launch it with python, not torchrun")
    if world_size < 2:
        fail("--dry_run measures FSDP: --world_size must be at least 2")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        info = DistInfo(0, 0, world_size, torch.device("cpu"))
        def wrapped(make, train=True, adapters=False):
            with torch.device("meta"):  # outside FakeTensorMode: building inside it fails
                m = make()
                if adapters and lora is not None and lora.lora_rank > 0:
                    add_adapters(m, lora, dtype)
            if train:
                return wrap_model(m, info, "fsdp", dtype, activation_checkpointing=activation_checkpointing,
                                  skip_accum_sync=skip_accum_sync, shard_size=shard_size)
            # common.frozen, as the stages build them (the argument `frozen` hides its name here)
            return globals()["frozen"](m, dtype, info.device, info, "fsdp", shard_size)
        models = [wrapped(build, adapters=True)] + [wrapped(make) for make in trained]
        frozen = [] if frozen is None else frozen if isinstance(frozen, (list, tuple)) else [frozen]
        extra = tuple(models[1:]) + tuple(wrapped(make, False) for make in frozen)
        model = models[0]
        if trained:   # one FSDP root over all trained models, for the tracker (it follows one module)
            from torch.distributed.fsdp import fully_shard
            model = fully_shard(_Holder(models), mesh=next(models[0].parameters()).device_mesh)
        with FakeTensorMode(allow_non_fake_inputs=True):
            model.to_empty(device="cpu")  # the values do not matter: fake tensors have none
            for m in extra[len(trained):]:
                m.to_empty(device="cpu")
            frozen_bytes = sum(p.to_local().nbytes for m in extra[len(trained):] for p in m.parameters())
            optimizers = [configure_optimizer(m, 1e-4, 0.1) for m in models]

            def step(micro_steps, tracker=None):
                for micro in range(micro_steps):
                    if tracker is not None and micro > 0:
                        tracker.reset_mod_stats()  # the tracker refuses a second forward otherwise
                    with contextlib.ExitStack() as stack:
                        for m in models:
                            stack.enter_context(grad_sync(m, micro == micro_steps - 1))
                        with autocast(info.device, dtype):
                            loss = micro_step(models[0], *extra)
                        (loss / micro_steps).backward()

            step(1)  # step 1 only creates the AdamW states
            for m, opt in zip(models, optimizers):
                params = [p for p in m.parameters() if p.grad is not None]
                torch.nn.utils.clip_grad_norm_(params, 1.0)  # (clip_grad_norm's .item() has no value to read)
                opt.step()
                opt.zero_grad(set_to_none=True)
            optimizer = optimizers[0]
            if trained:   # the tracker counts one optimizer's states: one holding every model's
                optimizer = torch.optim.AdamW([p for opt in optimizers for g in opt.param_groups for p in g["params"]])
                for opt in optimizers:
                    optimizer.state.update(opt.state)
            with FSDPMemTracker(model, optimizer) as tracker:
                # Two micro-steps show what grad_accum of any size holds: from the second on, each
                # repeats the one before (gradients accumulate into the same tensors).
                step(min(grad_accum, 2), tracker)
            snap = next(iter(tracker.get_tracker_snapshot("peak").values()))
    finally:
        dist.destroy_process_group()
    by_name = {str(getattr(k, "name", k)): v for k, v in snap.items()}
    groups = {"params": ("SHARDED_PARAM", "UNSHARDED_PARAM", "BUFFER", "ALL_GATHER"),
              "grads": ("SHARDED_GRAD", "UNSHARDED_GRAD", "REDUCE_SCATTER"),
              "optimizer": ("OPT",), "activations": ("ACT", "INP"), "temporaries": ("TEMP",)}
    out = {cat: sum(by_name.get(k, 0) for k in keys) for cat, keys in groups.items()}
    out["params"] += frozen_bytes
    out["total"] = by_name["Total"] + frozen_bytes
    return out


# -----------------------------------------------------------------------------
# Optimizer, learning-rate schedule, gradient clipping


def configure_optimizer(model: nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.95),
                        device: torch.device = torch.device("cpu")) -> torch.optim.AdamW:
    """AdamW with two parameter groups: weight decay on every tensor with >= 2 dimensions
    (the matmul weights and the embedding), none on vectors (RMSNorm gains, biases): decaying a
    norm gain toward 0 only fights the normalisation. Fused kernel on cuda (one launch per step)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():  # named_parameters() yields tied weights once
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device.type == "cuda")


def lr_at(step: int, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup from lr/warmup_steps to lr
    over warmup_steps steps, then a half cosine from lr down to min_lr at max_steps, min_lr after.
    A pure function of the step: resuming restores the schedule by restoring the step."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def set_lr(optimizer: torch.optim.Optimizer, lr: float):
    for group in optimizer.param_groups:
        group["lr"] = lr


def clip_grad_norm(model: nn.Module, max_norm: float) -> float:
    """Clip the global gradient norm to max_norm (max_norm <= 0: measure only) and return the norm
    before clipping. Under FSDP the gradients are DTensor shards: clip_grad_norm_ reduces their norms
    across ranks and returns a DTensor; full_tensor() gives the global value every rank agrees on."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return norm.item()


# -----------------------------------------------------------------------------
# RNG state (stored as tensors and lists so torch.load(weights_only=True) can read it)


def rng_state() -> dict:
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _gather_rng() -> list:
    """Every rank's RNG state, in rank order (each rank draws its own dropout masks)."""
    mine = rng_state()
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [mine]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, mine)
    return states


# -----------------------------------------------------------------------------
# Checkpoints


def checkpoint_path(out_dir: str, name: str):
    """The checkpoint called `name` in a run directory: NAME.pt (a file) or NAME/ (a DCP directory),
    or None if neither exists."""
    for p in (os.path.join(out_dir, name + ".pt"), os.path.join(out_dir, name)):
        if os.path.isfile(p) or os.path.isfile(os.path.join(p, "meta.pt")):
            return p
    return None


def save_checkpoint(out_dir: str, name: str, model: nn.Module, optimizer=None, *, step: int, config: dict,
                    tokenizer=None, metrics: dict = None, data_state: dict = None, model_config: dict = None,
                    background: bool = False, also: dict = None, **extra) -> str:
    """Write checkpoint `name` (e.g. "step_0001000", "best", "final") into out_dir; call it on EVERY
    rank (it may gather). With an optimizer it is a resume checkpoint (optimizer, RNG of every rank,
    data position); without, model weights + metadata only. Returns the path written.

    Atomic: the checkpoint is written under a .tmp name and renamed into place (os.replace) only
    when complete, so a crash or a full disk mid-write leaves the previous checkpoint intact.
    Plain/DDP models: rank 0 writes one file NAME.pt. FSDP: a DCP directory NAME/ where every rank
    writes its shard (no rank ever holds the whole model); with background=True a resume checkpoint
    is written in the background and completed by the next save_checkpoint or wait_for_checkpoint
    (_save_sharded). Any save first completes the one in flight.
    also: more trained models of a resume checkpoint, {key: (model, optimizer)} (PPO's critic),
    stored as key / key + "_optimizer": tensors in the .pt file, or sharded like the model in the DCP
    directory (restore_checkpoint(also=) reads them back)."""
    wait_for_checkpoint()   # one write at a time, completed in order; the final save waits for it
    raw = unwrap(model)
    meta = {
        "format": CKPT_FORMAT,
        "model_config": model_config if model_config is not None else raw.config.to_dict(),
        "step": int(step),
        "config": dict(config),
        "tokenizer": {"path": tokenizer.path, "sha256": tokenizer.sha256} if tokenizer is not None else None,
        "metrics": dict(metrics or {}),
        **extra,
    }
    if optimizer is not None:
        meta["rng"] = _gather_rng()
        meta["data_state"] = dict(data_state or {})
    if is_main():
        os.makedirs(out_dir, exist_ok=True)
    if is_fsdp(model) and has_lora(raw) and optimizer is None:
        return _save_lora_gathered(out_dir, name, raw, meta)
    if is_fsdp(model):
        if has_lora(raw):   # a resume checkpoint: sharded as usual, base included (see load_model)
            meta["lora"] = lora_info(raw)
        return _save_sharded(out_dir, name, model, optimizer, meta, background, also)
    path = os.path.join(out_dir, name + ".pt")
    if is_main():
        ckpt = {"model": raw.state_dict(), **meta}
        for key, (m, opt) in (also or {}).items():
            ckpt.update({key: unwrap(m).state_dict(), key + "_optimizer": opt.state_dict()})
        if has_lora(raw):
            ckpt.update(model=trainable_state(raw), lora=lora_info(raw))   # adapter-only: see "LoRA" below
        if optimizer is not None:
            ckpt["optimizer"] = optimizer.state_dict()
        _atomic_torch_save(ckpt, path)
    barrier()
    return path


def _save_lora_gathered(out_dir, name, raw, meta):
    """FSDP + LoRA, model-only: the adapters are small, so gather them whole (every rank takes part
    in each DTensor's all-gather, in state-dict order) and rank 0 writes one adapter-only NAME.pt."""
    state = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in trainable_state(raw).items()}
    path = os.path.join(out_dir, name + ".pt")
    if is_main():
        _atomic_torch_save({"model": {k: v.cpu() for k, v in state.items()}, **meta, "lora": lora_info(raw)}, path)
    barrier()
    return path


def _atomic_torch_save(obj, path: str):
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the rename makes them "the" checkpoint
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# The resume checkpoint being written in the background (FSDP): (future, tmp dir, final path, meta)
_pending_save = None
_save_group = (None, None)   # (the default group, a gloo group of its own for the background writes)


def _save_sharded(out_dir, name, model, optimizer, meta, background=False, also=None):
    """DCP directory NAME/ written as NAME.tmp/ and renamed when complete. A resume checkpoint (with
    an optimizer) with background=True (the stages' periodic ones) is written in the background
    (dcp.async_save): the state is first copied to CPU memory (the step's only stall), then a thread
    writes it while training goes on; it is completed (meta.pt, rename) by wait_for_checkpoint, at
    the next save at the latest, so at most one write is in flight and the final save waits for it.
    81 GB at 7B, 828 GB at 70B would otherwise stall every rank for the whole write. Model-only
    checkpoints (best, final), and any without background=True, are written before this returns."""
    global _pending_save, _save_group
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    path = os.path.join(out_dir, name)
    tmp = path + ".tmp"
    if is_main() and os.path.exists(tmp):
        shutil.rmtree(tmp)  # left over from a crash
    barrier()
    state = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    for key, (m, opt) in (also or {}).items():
        state.update({key: get_model_state_dict(m), key + "_optimizer": get_optimizer_state_dict(m, opt)})
    if optimizer is not None and background:
        if _save_group[0] is not dist.group.WORLD:   # (every rank saves at once, so creates it at once)
            _save_group = (dist.group.WORLD, dist.new_group(backend="gloo"))
        # A group of its own: the writer thread's collectives never interleave with training's.
        _pending_save = (dcp.async_save(state, checkpoint_id=tmp, process_group=_save_group[1]), tmp, path, meta)
        return path
    dcp.save(state, checkpoint_id=tmp)  # every rank writes its own shard file
    _complete_sharded(tmp, path, meta)
    return path


def wait_for_checkpoint():
    """Block until the background resume checkpoint (if any) is written by every rank, then make it
    a checkpoint: meta.pt written last, .tmp renamed (atomic, as a synchronous save). Every rank."""
    global _pending_save
    if _pending_save is None:
        return
    future, tmp, path, meta = _pending_save
    _pending_save = None
    future.result()   # this rank's shards are written (and raises if writing failed)
    barrier()         # ... and every other rank's
    _complete_sharded(tmp, path, meta)


def _complete_sharded(tmp, path, meta):
    if is_main():
        _atomic_torch_save(meta, os.path.join(tmp, "meta.pt"))  # meta.pt last: its presence marks "complete"
        if os.path.exists(path):  # best/ and final/ are replaced: move the old one aside, then delete it
            os.replace(path, path + ".old")
        os.replace(tmp, path)
        shutil.rmtree(path + ".old", ignore_errors=True)
    barrier()


def latest_checkpoint(out_dir: str):
    """Path of the newest complete step_* checkpoint in out_dir (file or DCP directory), or None."""
    steps = _step_checkpoints(out_dir)
    return steps[-1][1] if steps else None


def _step_checkpoints(out_dir):
    found = []
    if os.path.isdir(out_dir):
        for entry in os.listdir(out_dir):
            m = STEP_RE.match(entry)
            p = os.path.join(out_dir, entry)
            if m and (os.path.isfile(p) or os.path.isfile(os.path.join(p, "meta.pt"))):
                found.append((int(m.group(1)), p))
    return sorted(found)


def rotate_checkpoints(out_dir: str, keep_last: int):
    """Delete all but the newest keep_last step_* checkpoints (rank 0), and any *.tmp leftovers of
    crashed writes. Unbounded checkpointing filled the seed's disk quota more than once."""
    if not is_main():
        return
    writing = os.path.basename(_pending_save[1]) if _pending_save else None   # in flight: not a leftover
    for entry in os.listdir(out_dir):
        if (entry.endswith(".tmp") or entry.endswith(".old")) and entry != writing:
            p = os.path.join(out_dir, entry)
            shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
    if keep_last > 0:
        for _, p in _step_checkpoints(out_dir)[:-keep_last]:
            shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)


def warn_if_low_disk(out_dir: str, bytes_needed: float):
    """Warn (rank 0) when the disk holding out_dir has less free space than the run's checkpoints
    will take: better at step 0 than as a failed write at step 90,000 (the seed's quota incidents)."""
    if is_main() and os.path.isdir(out_dir):
        free = shutil.disk_usage(out_dir).free
        if free < bytes_needed:
            print0(f"warning: {out_dir} has {free / 1e9:.1f} GB free, the checkpoints of this run need about "
                   f"{bytes_needed / 1e9:.1f} GB (lower --keep_last, or choose another --out_dir)")


def load_file(path: str, map_location="cpu", **kwargs):
    """torch.load(weights_only=True) of one checkpoint file; a truncated copy, a write cut short by a full
    disk, or a file that is not a checkpoint at all ends in one line naming the file and what is wrong,
    not a traceback from deep inside torch's zip reader or unpickler."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True, **kwargs)
    except Exception as e:   # RuntimeError (zip), UnpicklingError, EOFError, ...: all mean "unreadable"
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        fail(f"{path} is not a readable checkpoint (truncated or corrupt?): {type(e).__name__}: {reason}")


def read_checkpoint_meta(path: str) -> dict:
    """Everything in a checkpoint except the weights and optimizer state."""
    if os.path.isdir(path):
        return load_file(os.path.join(path, "meta.pt"))
    ckpt = load_file(path, mmap=True)
    return {k: v for k, v in ckpt.items() if k not in ("model", "optimizer")}


def restore_checkpoint(path: str, model: nn.Module, optimizer=None, device="cpu", also: dict = None) -> dict:
    """Resume: load weights (and optimizer state) into the training model, restore this rank's RNG
    state, and return the checkpoint's metadata (step, data_state, metrics, config, ...).
    Call on every rank after wrap_model and configure_optimizer. also: save_checkpoint's."""
    pairs = [(model, optimizer, "model", "optimizer")] + [(m, opt, key, key + "_optimizer")
                                                          for key, (m, opt) in (also or {}).items()]
    sharded = os.path.isdir(path)
    if sharded != is_fsdp(model):
        fail(f"{path} is a {'sharded (FSDP)' if sharded else 'single-file'} checkpoint but this run uses "
             f"--parallel {'fsdp' if is_fsdp(model) else 'none/ddp'}; resume with the same kind, or convert it "
             f"with `python common.py consolidate` and start a new run with --init_from")
    if sharded:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                             set_model_state_dict, set_optimizer_state_dict)
        state = {}
        for m, opt, mk, ok in pairs:
            state[mk] = get_model_state_dict(m)
            if opt is not None:
                state[ok] = get_optimizer_state_dict(m, opt)
        dcp.load(state, checkpoint_id=path)  # each rank reads the pieces of its own shards
        for m, opt, mk, ok in pairs:
            set_model_state_dict(m, state[mk])
            if opt is not None:
                set_optimizer_state_dict(m, opt, state[ok])
        meta = read_checkpoint_meta(path)
    else:
        meta = load_file(path, map_location=device)
        if "lora" in meta:
            load_trainable_state(unwrap(model), meta.pop("model"), meta["lora"], path)
        else:
            load_state_dict_checked(unwrap(model), meta.pop("model"))
        if optimizer is not None:
            if "optimizer" not in meta:
                fail(f"{path} has no optimizer state (a model-only checkpoint); use --init_from to start from it")
            optimizer.load_state_dict(meta.pop("optimizer"))
        for m, opt, mk, ok in pairs[1:]:
            load_state_dict_checked(unwrap(m), meta.pop(mk))
            opt.load_state_dict(meta.pop(ok))
    rng = meta.get("rng") or []
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if len(rng) == world:
        set_rng_state(rng[rank])
    elif rng:
        print0(f"warning: {path} was written by {len(rng)} processes, this run has {world}: RNG states not restored")
    return meta


def is_hf_dir(path: str) -> bool:
    """A HuggingFace model directory: config.json naming the architecture, plus weight files (our run
    directories also have a config.json, holding flags instead)."""
    cfg = os.path.join(path, "config.json")
    if not os.path.isfile(cfg):
        return False
    with open(cfg, encoding="utf-8") as f:
        hf = json.load(f)
    return isinstance(hf, dict) and ("model_type" in hf or "architectures" in hf)


def resolve_checkpoint(path: str) -> str:
    """A checkpoint file, DCP directory or HF directory passes through; a run directory becomes its
    best checkpoint, else final, else the newest step_*."""
    if not os.path.exists(path):
        fail(f"checkpoint {path} does not exist")
    if os.path.isfile(path) or os.path.isfile(os.path.join(path, "meta.pt")) or is_hf_dir(path):
        return path
    for name in ("best", "final"):
        p = checkpoint_path(path, name)
        if p:
            return p
    p = latest_checkpoint(path)
    if p:
        return p
    fail(f"{path} holds no checkpoint (no best, final or step_* checkpoint, and it is not a HuggingFace directory)")


def load_model(path: str, device="cpu"):
    """-> (Llama, meta). `path`: one of our checkpoint files, a DCP checkpoint directory, a run
    directory (best, else final, else the newest step), or a HuggingFace LLaMA directory
    (config.json + safetensors/bin -> Llama.from_hf). The model is float32, in train mode, on
    `device`; meta has "path", "model_config", "tokenizer" ({"path", "sha256"} or None), "step",
    "config", "metrics" (the last three empty for HF directories)."""
    path = resolve_checkpoint(path)
    if os.path.isdir(path) and is_hf_dir(path):
        model = Llama.from_hf(path)
        meta = _hf_meta(path, model.config)
    elif os.path.isdir(path):  # sharded DCP checkpoint: read the shards straight into a whole model
        import torch.distributed.checkpoint as dcp
        meta = read_checkpoint_meta(path)
        _refuse_other_kind(meta, path)
        if "lora" in meta:
            fail(f"{path} is a sharded resume checkpoint of a LoRA run: resume it with the same flags (--resume), or "
                 f"use the run's best.pt / final.pt (adapters only)")
        model = Llama(LlamaConfig.from_dict(meta["model_config"]))
        state = model.state_dict()
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load({"model": state}, checkpoint_id=path, no_dist=True)
        load_state_dict_checked(model, state)
    else:
        ckpt = load_file(path)
        if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
            fail(f"{path} is not a nanollama checkpoint (no 'model' / 'model_config' keys)")
        _refuse_other_kind(ckpt, path)
        if "lora" in ckpt:   # adapters only: their base, verified, with the adapters merged in
            model = load_lora_checkpoint(ckpt, path)
            ckpt.pop("model")
        else:
            model = Llama(LlamaConfig.from_dict(ckpt["model_config"]))
            load_state_dict_checked(model, ckpt.pop("model"))
        ckpt.pop("optimizer", None)
        meta = ckpt
    meta["path"] = path
    return model.to(device), meta


def load_start_model(args, info: DistInfo, dtype: torch.dtype, wrap):
    """The model a fine-tuning stage starts from (--init_from) -> (model, meta, wrapped). FSDP without
    LoRA: built on the meta device, sharded by wrap, each rank reading only its shards
    (load_model_sharded); wrapped is True. Otherwise (LoRA's adapters go on before sharding) the
    whole model on every rank with the --lora_* adapters added (setup_lora), not yet wrapped."""
    if args.parallel == "fsdp" and not args.lora_rank:
        return (*load_model_sharded(args.init_from, info, wrap), True)
    model, meta = load_model(args.init_from)
    return setup_lora(model, args, meta["path"], dtype), meta, False


def checkpoint_tokenizer(meta: dict, path: str = None):
    """The tokenizer a checkpoint was trained with (meta["tokenizer"], which every stage records).
    `path` (--tokenizer) overrides the recorded file; a recorded file that is gone falls back to the
    shipped default with a warning. Either way a file whose sha256 differs from the recorded one is
    refused (the ids would mean other strings), as is a vocabulary larger than the model's: ValueError
    naming both."""
    from tokenizer import Tokenizer
    recorded = meta.get("tokenizer") or {}
    if path is None and recorded.get("path"):
        if os.path.isfile(recorded["path"]):
            path = recorded["path"]
        else:
            print(f"warning: the checkpoint's tokenizer {recorded['path']} is gone; trying the shipped default "
                  "(pass --tokenizer)", file=sys.stderr)
    return check_tokenizer(meta, Tokenizer(path))


def check_tokenizer(meta: dict, tok):
    """tok, if it is the tokenizer the checkpoint `meta` records (same sha256) and fits the model's
    vocabulary; else ValueError naming both."""
    recorded = meta.get("tokenizer") or {}
    if recorded.get("sha256") and recorded["sha256"] != tok.sha256:
        raise ValueError(f"{meta.get('path', 'the checkpoint')} was trained with tokenizer {recorded.get('path')} "
                         f"(sha256 {recorded['sha256'][:12]}), but {tok.path} has sha256 {tok.sha256[:12]}")
    vocab = meta["model_config"]["vocab_size"]
    if tok.vocab_size > vocab:
        raise ValueError(f"tokenizer {tok.path} has {tok.vocab_size} tokens, but the vocabulary of "
                         f"{meta.get('path', 'the model')} is {vocab}: they do not belong together")
    return tok


def _hf_meta(path: str, config: LlamaConfig) -> dict:
    tok = os.path.join(path, "tokenizer.model")
    return {"format": "hf", "model_config": config.to_dict(), "step": 0, "config": {}, "metrics": {},
            "tokenizer": {"path": tok, "sha256": None} if os.path.isfile(tok) else None}


def load_model_sharded(path: str, info: DistInfo, wrap, make=Llama, prefix: str = "", kind: str = None):
    """--init_from under FSDP with no whole model on any rank -> (wrapped model, meta) as load_model.
    make(config) is built on the meta device (no memory), wrap(model) shards it (wrap_model with the
    run's flags), to_empty materialises this rank's shards only, init_weights() sets the buffers,
    and each rank fills its shards from the checkpoint:
      our DCP directory   dcp.load reads just the pieces of this rank's shards;
      our .pt file        load_file(..., mmap=True): the file is mapped, not read; copying this rank's
                          rows of each tensor pages in only those rows (plus the OS's read-ahead);
      a HuggingFace dir   its safetensors mapped the same way (model.read_safetensors); our fused
                          wqkv / w13 rows and the rotary row order come from rows of HF's q/k/v and
                          gate/up tensors (_hf_rows), so a rank reads only the HF rows it needs
                          (pytorch_model*.bin, the older format, is read whole on every rank).
    meta["bytes_read"]: bytes this rank copied out of a .pt / HF file (its shard, in the file's dtype).
    make, prefix: the checkpoint's tensors fill prefix + name of make(config), e.g. reward.py's
    RewardModel with prefix "backbone." (what the checkpoint lacks keeps init_weights' values; an
    LM head the model has no place for is dropped, as RewardModel.from_llama does). kind: the
    checkpoint "kind" accepted (None: language models only). load_model instead builds the whole
    fp32 model on every rank (27 GB at 7B, per rank). LoRA adapter-only checkpoints (their base
    must be merged in whole) go through load_model."""
    path = resolve_checkpoint(path)
    hf = is_hf_dir(path)
    if hf:
        from model import hf_config
        meta = _hf_meta(path, hf_config(path))
    else:
        meta = read_checkpoint_meta(path)
        if meta.get("kind") != kind:
            _refuse_other_kind(meta, path)
            fail(f"{path} is not a {kind!r} checkpoint")
        if "lora" in meta and kind is None:
            model, meta = load_model(path)
            return wrap(model.to(info.device)), meta
    with torch.device("meta"):
        raw = make(LlamaConfig.from_dict(meta["model_config"]))
    model = wrap(raw)
    model.to_empty(device=info.device)
    with torch.no_grad():
        raw.init_weights()   # the buffers (rotary table, eps), and what the checkpoint does not hold
    if os.path.isdir(path) and not hf:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
        state = get_model_state_dict(model)
        mine = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}   # the same tensors
        dcp.load({"model": mine}, checkpoint_id=path)
        set_model_state_dict(model, state)
    else:
        own = {k[len(prefix):]: v for k, v in raw.state_dict(keep_vars=True).items() if k.startswith(prefix)}
        rows = _hf_rows(path, raw.config) if hf else _pt_rows(path)
        missing, unexpected = sorted(set(own) - set(rows)), sorted(set(rows) - set(own))
        if missing or (unexpected and not prefix):
            fail(f"{path}: its weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        meta["bytes_read"] = _copy_shards(own, rows, path)
    meta["path"] = path
    return model, meta


def _shard_start(t: torch.Tensor) -> int:
    """First global row of this rank's part of `t`: FSDP2 splits dim 0 as torch.chunk does, ceil(rows /
    shards) rows per rank in rank order, over the mesh dimension that shards (HSDP's second); 0 for a
    tensor FSDP does not shard (a buffer)."""
    for mesh_dim, placement in enumerate(getattr(t, "placements", ())):
        if placement.is_shard(0):
            return t.device_mesh.get_local_rank(mesh_dim) * -(-t.size(0) // t.device_mesh.size(mesh_dim))
    return 0


def _copy_shards(own: dict, rows: dict, path: str) -> int:
    """Fill each tensor of `own` (name -> parameter or buffer; DTensor shards under FSDP) with its rows
    from `rows` (name -> (global shape, read(start, stop) -> those rows)). Returns the bytes read."""
    total, seen = 0, set()
    with torch.no_grad():
        for name, t in own.items():
            if id(t) in seen:
                continue   # a tied weight (embedding = head): read once
            seen.add(id(t))
            shape, read = rows[name]
            if tuple(shape) != tuple(t.shape):
                fail(f"{path}: tensor {name!r} has shape {tuple(shape)} but the model's config expects "
                     f"{tuple(t.shape)}")
            local = t.to_local() if hasattr(t, "to_local") else t
            if local.dim() and not local.size(0):
                continue   # more ranks than rows: this rank holds none of this tensor
            start = _shard_start(t)
            part = read(start, start + local.size(0)) if local.dim() else read(None, None)
            total += part.numel() * part.element_size()
            local.copy_(part)
    return total


def _pt_rows(path: str) -> dict:
    """Our .pt file, mapped: name -> (shape, read) where read slices rows of the mapped tensor (a view:
    only the rows copied out are ever paged in)."""
    full = load_file(path, mmap=True)["model"]   # (a corrupt file: one line naming it)
    return {k: (v.shape, lambda s, e, v=v: v[s:e] if v.dim() else v) for k, v in full.items()}


def _hf_rows(path: str, config: LlamaConfig) -> dict:
    """A HuggingFace directory, mapped: name (ours) -> (shape, read(start, stop)). Our wqkv is
    cat(q, k, v) with q/k rows reordered for our rotary layout, w13 is cat(gate, up): a row of ours
    is one row of one HF tensor. Which one comes from model.from_hf_state_dict itself, run on row
    labels instead of weights (tensor number << 32 | row, one column), so the sharded load can never
    disagree with the whole load; a read then gathers the labelled rows from the mapped HF tensors."""
    from model import from_hf_state_dict, read_hf_weights
    hf = read_hf_weights(path)
    names = list(hf)
    labels = {}
    for i, (n, t) in enumerate(hf.items()):
        label = (i << 32) + torch.arange(t.size(0))
        labels[n] = label.view(-1, 1) if t.dim() > 1 else label   # a column: rows move, as the weights' would
    try:
        ours = from_hf_state_dict(labels, config)
    except ValueError as e:
        fail(f"{path}: {e}")

    def reader(label):
        def read(start, stop):
            which, row = label[start:stop] >> 32, label[start:stop] & 0xFFFFFFFF
            runs, counts = torch.unique_consecutive(which, return_counts=True)   # rows of one HF tensor each
            parts = [hf[names[i]].index_select(0, r) for i, r in zip(runs.tolist(), row.split(counts.tolist()))]
            return parts[0] if len(parts) == 1 else torch.cat(parts)   # (cat would copy a lone part again)
        return read
    out = {}
    for k, label in ours.items():
        label = label.reshape(-1)
        out[k] = ((label.size(0), *hf[names[label[0].item() >> 32]].shape[1:]), reader(label))
    return out


def _refuse_other_kind(meta: dict, path: str):
    """Language-model checkpoints carry no "kind"; a stage that saves another model (reward.py's
    RewardModel: a backbone plus a scalar head) marks its checkpoints with one. Say so, instead of
    the shape / key mismatch that loading its weights into a Llama would end in."""
    kind = meta.get("kind")
    if kind is None:
        return
    where = "reward.load_reward_model" if kind == "reward_model" else "the loader of the stage that wrote it"
    fail(f"{path} is a {kind!r} checkpoint, not a language model: load it with {where}")


def consolidate(src: str, out_path: str, hf_dir: str = None, base: str = None) -> str:
    """Merge any checkpoint load_model accepts (typically a sharded FSDP directory) into one
    model-only checkpoint file, and optionally a HuggingFace directory (model.save_hf, plus the
    tokenizer files when the recorded tokenizer is found). Runs in one process, no GPU needed.
    base: for a LoRA checkpoint whose base moved, the base's new location (sha256 still checked)."""
    if base:
        meta = load_file(resolve_checkpoint(src))
        if "lora" not in meta:
            fail(f"{src} is not a LoRA checkpoint: --base is only for those")
        model = load_lora_checkpoint(meta, src, base=base)
        meta.pop("model")
        meta.pop("optimizer", None)
    else:
        model, meta = load_model(src)
    ckpt = {"model": model.state_dict(),
            **{k: v for k, v in meta.items() if k not in ("rng", "data_state", "path", "lora")}}   # LoRA: merged
    ckpt["format"] = CKPT_FORMAT
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    _atomic_torch_save(ckpt, out_path)
    if hf_dir:
        tok_info = meta.get("tokenizer") or {}
        tok = None
        if tok_info.get("path") and os.path.isfile(tok_info["path"]):
            from tokenizer import Tokenizer
            tok = Tokenizer(tok_info["path"])
        model.save_hf(hf_dir, bos_id=tok.bos_id if tok else 1, eos_id=tok.eos_id if tok else 2)
        if tok is not None:
            tok.save_hf(hf_dir)
    return out_path


# -----------------------------------------------------------------------------
# LoRA: flags -> adapters on a frozen base, adapter-only checkpoints, PEFT export
# (the adapters themselves, merge and the switch-off are in lora.py)
#
# A LoRA run's checkpoints hold only what trains (the adapters; reward.py's head too) plus the
# sha256 of the base checkpoint they were trained on: megabytes for a 7B model, not 14 GB. The
# base is read again from its recorded path, and refused if its bytes are not the same ones: the
# same adapters on another base load without any error and mean nothing.


def file_sha256(path: str) -> str:
    """sha256 of a file, or of a directory's files (names and bytes, in name order: DCP or HF)."""
    import hashlib
    h = hashlib.sha256()
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if not f.endswith((".tmp", ".old")))
    for f in files:
        if f != path:
            h.update(os.path.relpath(f, path).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()


def has_lora(model: nn.Module) -> bool:
    return any(True for _ in lora_adapters(model))


_SHA256_SEEN = {}   # (path, inode, size, mtime) -> sha256: a base is hashed once per process, not per load


def base_sha256(path: str, collective: bool = True) -> str:
    """file_sha256 of a LoRA base, read once: remembered in this process (for as long as the file
    is the same one), and with collective=True in a distributed run (every rank calls it: a stage's
    setup) computed by rank 0 alone and broadcast -- every rank hashing a 13 GB 7B base would read
    it W times over at the start of each run."""
    def local():
        if os.path.isdir(path):   # (a directory's mtime does not follow its files: not remembered)
            return file_sha256(path)
        st = os.stat(path)
        key = (os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns)
        if key not in _SHA256_SEEN:
            _SHA256_SEEN[key] = file_sha256(path)
        return _SHA256_SEEN[key]
    if not (collective and dist.is_initialized() and dist.get_world_size() > 1):
        return local()
    box = [local() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def add_adapters(model: nn.Module, args, dtype: torch.dtype = torch.float32) -> list:
    """The adapters of --lora_* on a model (a Llama, or a RewardModel's backbone: the reward head
    stays trainable), everything else frozen, and the frozen weights in bf16 for a bf16 run.
    Needs no weights: the dry run calls it on the meta device. Returns the targets."""
    targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
    try:
        apply_lora(getattr(model, "backbone", model), args.lora_rank, args.lora_alpha, args.lora_dropout, targets,
                   args.lora_embeddings, seed=args.seed)
    except ValueError as e:
        fail(f"--lora_rank/--lora_targets: {e}")
    if dtype == torch.bfloat16:
        # Frozen weights are only read: keep them in bf16 (half the memory); the adapters stay
        # float32, the master weights AdamW updates. Autocast multiplies in bf16 either way.
        for p in model.parameters():
            if not p.requires_grad:
                p.data = p.data.to(dtype)
    return targets


def setup_lora(model: nn.Module, args, base_path: str, dtype: torch.dtype = torch.float32,
               sha256: str = None) -> nn.Module:
    """--lora_rank > 0: add adapters to the model (add_adapters), and remember the base checkpoint
    for the adapter-only checkpoints. Call right after load_model, before wrap_model, on every rank
    (the base's hash is broadcast from rank 0) -- or pass the hash as sha256 (then nothing is
    collective). configure_optimizer then builds AdamW over the trainable parameters only (it skips
    requires_grad=False). --lora_rank 0: no-op."""
    if args.lora_rank <= 0:
        return model
    targets = add_adapters(model, args, dtype)
    base_path = resolve_checkpoint(base_path)
    model.lora_base = {"base_path": os.path.abspath(base_path), "base_sha256": sha256 or base_sha256(base_path),
                       "rank": args.lora_rank, "alpha": args.lora_alpha, "dropout": args.lora_dropout,
                       "targets": targets, "embeddings": bool(args.lora_embeddings)}
    return model


def trainable_state(model: nn.Module) -> dict:
    """What an adapter-only checkpoint holds: every parameter that trains, and the buffers (e.g.
    reward.py's normalisation statistics); never a frozen parameter."""
    return {k: v.detach() for k, v in model.state_dict(keep_vars=True).items()
            if not (isinstance(v, nn.Parameter) and not v.requires_grad)}


def lora_info(model: nn.Module) -> dict:
    info = getattr(model, "lora_base", None)
    if info is None:
        raise ValueError("a model with LoRA adapters but no lora_base: add them with common.setup_lora")
    return dict(info)


def _check_base(info: dict, sha: str, path: str, base: str):
    if sha != info["base_sha256"]:
        fail(f"{path} holds LoRA adapters trained on a base with sha256 {info['base_sha256']}, but the base here "
             f"({base}) has sha256 {sha}: refusing another base")


def load_trainable_state(model: nn.Module, state: dict, info: dict, path: str):
    """Load an adapter-only state into a model set up with the same LoRA flags on the same base."""
    own = getattr(model, "lora_base", None)
    if own is None:
        fail(f"{path} is a LoRA checkpoint (adapters only): run with the same --lora_* flags as the run that wrote it")
    _check_base(info, own["base_sha256"], path, own["base_path"])
    want = trainable_state(model)
    if set(want) != set(state):
        fail(f"{path}: its adapters do not fit this run's --lora_* flags (missing "
             f"{sorted(set(want) - set(state))[:4]}, unexpected {sorted(set(state) - set(want))[:4]})")
    load_state_dict_checked(model, {**model.state_dict(), **state})


def load_lora_checkpoint(ckpt: dict, path: str, make_model=None, base: str = None) -> nn.Module:
    """An adapter-only checkpoint -> its base model with the adapters merged in (a plain model).
    base: where the base checkpoint is (default: the path recorded at training time); it must have
    the recorded sha256. make_model(llama) builds the trained model around the base Llama (reward.py:
    RewardModel.from_llama); default the Llama itself."""
    info = ckpt["lora"]
    base = base or info["base_path"]
    if not os.path.exists(base):
        fail(f"{path} holds LoRA adapters for the base {base} (sha256 {info['base_sha256'][:16]}...), which is not "
             f"there; pass its new location (consolidate --base)")
    base = resolve_checkpoint(base)
    sha = base_sha256(base, collective=False)   # (maybe on one rank only: evaluation)
    _check_base(info, sha, path, base)
    llama, _ = load_model(base)
    model = make_model(llama) if make_model else llama
    args = argparse.Namespace(lora_rank=info["rank"], lora_alpha=info["alpha"], lora_dropout=info["dropout"],
                              lora_targets=",".join(info["targets"]), lora_embeddings=info["embeddings"], seed=0)
    setup_lora(model, args, base, sha256=sha)
    load_trainable_state(model, ckpt["model"], info, path)
    strip_lora(getattr(model, "backbone", model))
    model.requires_grad_(True)
    del model.lora_base
    return model


# PEFT names our targets after HF's modules; q and k rows also need HF's rotary order (model.py's
# _permute_for_hf): an adapter's B holds the rows it adds to, A does not depend on them.
_PEFT_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
                 "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


def export_peft(src: str, out_dir: str):
    """A LoRA run's adapter-only checkpoint -> an HF PEFT adapter directory (adapter_config.json +
    adapter_model.safetensors) that peft.PeftModel.from_pretrained loads on top of our HF export of
    the base (python common.py consolidate BASE base.pt --hf HF_DIR)."""
    from model import _permute_for_hf, write_safetensors
    src = resolve_checkpoint(src)
    ckpt = load_file(src) if os.path.isfile(src) else {}
    if "lora" not in ckpt:
        fail(f"{src} is not an adapter-only (LoRA) checkpoint file")
    info, state, c = ckpt["lora"], ckpt["model"], LlamaConfig.from_dict(ckpt["model_config"])
    if ckpt.get("kind"):
        fail(f"{src} is a {ckpt['kind']!r} checkpoint; PEFT export covers language models")
    if info["embeddings"] and c.tie_embeddings:
        fail("PEFT's embedding adapter does not reach a tied output head; export the merged model instead "
             "(python common.py consolidate ... --hf)")
    out, prefix = {}, "base_model.model.model."
    for i in range(c.n_layers):
        for t in info["targets"]:
            owner = "attention" if t in ("q", "k", "v", "o") else "feed_forward"
            A, B = state[f"layers.{i}.{owner}.lora.{t}.A"], state[f"layers.{i}.{owner}.lora.{t}.B"]
            if t in ("q", "k"):
                B = _permute_for_hf(B, c.n_heads if t == "q" else c.n_kv_heads, c.head_dim)
            name = f"{prefix}layers.{i}.{_PEFT_MODULES[t]}"
            out[f"{name}.lora_A.weight"], out[f"{name}.lora_B.weight"] = A.contiguous(), B.contiguous()
    if info["embeddings"]:
        out[prefix + "embed_tokens.lora_embedding_A"] = state["lora.embed.A"].contiguous()
        out[prefix + "embed_tokens.lora_embedding_B"] = state["lora.embed.B"].contiguous()
    os.makedirs(out_dir, exist_ok=True)
    modules = [_PEFT_MODULES[t].split(".")[1] for t in info["targets"]] + (["embed_tokens"] if info["embeddings"] else [])
    atomic_write_json(os.path.join(out_dir, "adapter_config.json"), {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": info["rank"], "lora_alpha": info["alpha"],
        "lora_dropout": info["dropout"], "target_modules": modules, "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "inference_mode": True, "base_model_name_or_path": None})
    write_safetensors(os.path.join(out_dir, "adapter_model.safetensors"), out)
    return out_dir


# -----------------------------------------------------------------------------
# Logging


class JsonlLogger:
    """Appends one JSON object per call to a .jsonl file (rank 0 only; a no-op elsewhere). Opened
    per write so that a crash loses nothing already logged and a resumed run appends."""

    def __init__(self, path: str, enabled: bool = True):
        self.path = path
        self.enabled = enabled and is_main()

    def log(self, **fields):
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3)}
        for k, v in fields.items():
            if isinstance(v, torch.Tensor):
                v = v.item()
            if isinstance(v, float) and not math.isfinite(v):
                v = None  # NaN/inf are not JSON
            record[k] = v
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def read_jsonl(path: str) -> list:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# -----------------------------------------------------------------------------
# Held-out splits BY PROMPT (sft.py, reward.py and dpo.py without --val_data)


def split_by_prompt(keys, val_frac: float, seed: int):
    """-> (train indices, val indices) of examples whose prompt keys are `keys` (one per example: the
    token ids of the conversation up to its FIRST user turn, as the chat template renders them -- BOS,
    system prompt, that turn and the assistant header). Every example of a prompt lands on the same
    side: InstructGPT splits by prompt, because preference sets repeat a prompt with other answers
    (and repeat whole records), and a split by record leaves held-out prompts in training, so the
    "held-out" numbers partly measure memory. A prompt is held out iff blake2b(seed, key) < val_frac
    (data/prepare.py's rule): the decision depends on the prompt alone, so the same prompt is held out
    by every stage and from every file, whatever its position. At least one prompt is held out when
    val_frac > 0, and one kept for training, when there are two or more."""
    if val_frac <= 0:
        return list(range(len(keys))), []
    salt = str(seed).encode()
    u = {k: int.from_bytes(hashlib.blake2b(np.asarray(k, dtype=np.int64).tobytes(), digest_size=8,
                                           key=salt).digest(), "little") / 2 ** 64
         for k in dict.fromkeys(keys)}
    held = {k for k, v in u.items() if v < val_frac}
    if len(u) >= 2 and not held:
        held = {min(u, key=u.get)}
    if len(u) >= 2 and len(held) == len(u):
        held.discard(max(u, key=u.get))
    train = [i for i, k in enumerate(keys) if k not in held]
    val = [i for i, k in enumerate(keys) if k in held]
    return train, val


# -----------------------------------------------------------------------------
# Preference data (reward.py, dpo.py): records -> token groups -> padded batches, epochs, splits


def encode_group(tok, record, max_len: int):
    """Render one normalised preference record ({"messages", "responses": [best..worst], "kind"})
    with the SFT chat template: each response becomes the assistant turn after the prompt, i.e.
    <s>...<|user|>Q<|end|><|assistant|>RESPONSE<|end|> -- so the reward is read on the <|end|>
    that closes the response, the same token at which the SFT model learned to stop.

    Too long: the oldest user/assistant exchanges of the prompt are dropped (whole turns, the
    tokenizer's render_prompt rule), the same for all responses of the group so that they are
    compared on the same prompt; a response is never cut (its end is where the reward is read).
    A record may say which responses were sampled answers cut at the length limit ("ended": [K
    bools], False = cut): those get no end marker, which the model never produced (the rule of
    common.penalize_missing_eos); the reward is then read on their last real token.
    Returns {"ids": [K id lists], "resp_len": [K response token counts], "kind", "prompt_key" (the
    rendered conversation up to its first user turn: split_by_prompt)} or None when even the
    last user turn plus the longest response does not fit."""
    messages = record["messages"]
    prompt = tok.render_prompt(messages)
    seqs = []
    for response, done in zip(record["responses"], record.get("ended") or [True] * len(record["responses"])):
        ids, _ = tok.render_conversation(messages + [{"role": "assistant", "content": response}])
        if ids[:len(prompt)] != prompt:   # the contract every stage relies on; fail loudly if broken
            raise RuntimeError("render_conversation(prompt + answer) does not start with render_prompt(prompt)")
        seqs.append(ids[len(prompt):] if done else ids[len(prompt):-1])   # content (+ end marker if it ended)
    longest = max(len(s) for s in seqs)
    if len(prompt) + longest > max_len:
        try:
            prompt = tok.render_prompt(messages, max_len=max_len - longest)
        except ValueError:
            return None
    kind = record.get("kind")
    first_user = next(i for i, m in enumerate(messages) if m["role"] == "user")
    return {"ids": [prompt + s for s in seqs], "resp_len": [len(s) for s in seqs],
            "kind": None if kind is None else str(kind),
            "prompt_key": tuple(tok.render_prompt(messages[:first_user + 1]))}   # split_by_prompt


def load_groups(paths, tok, max_len: int, seed: int = 0, name: str = "data"):
    """Read preference files (any format data/formats.py knows; "path:weight" mixes) and encode
    them. Skipped records (malformed/invalid lines, too long) are counted and reported."""
    from data.formats import read_preferences
    try:
        records, report = read_preferences(paths, seed=seed)
    except (OSError, ValueError) as e:
        fail(f"{name}: {e}")
    groups = [g for g in (encode_group(tok, r, max_len) for r in records) if g is not None]
    too_long = len(records) - len(groups)
    print0(f"{name}: {report.summary()}")
    if too_long:
        print0(f"{name}: {too_long} record(s) dropped: last user turn + longest response > {max_len} tokens")
    if not groups:
        fail(f"{name}: no usable preference records in {paths}")
    return groups


def collate(groups, pad_id: int, side: str = "right"):
    """Flatten prompt groups into one padded batch, so ONE forward scores every response of every
    group. Returns idx (N, T), attention_mask (N, T) (1 = real), group_sizes [K, ...].
    Both padding sides give the same rewards (the reward is read at the last real token and the
    model computes rotary positions from real tokens only); right padding is the default."""
    seqs = [ids for g in groups for ids in g["ids"]]
    T = max(len(s) for s in seqs)
    idx = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        cols = slice(0, len(s)) if side == "right" else slice(T - len(s), T)
        idx[i, cols] = torch.tensor(s, dtype=torch.long)
        mask[i, cols] = 1
    return idx, mask, [len(g["ids"]) for g in groups]


def response_mask(groups, T: int, side: str = "right"):
    """(N, T) 1 on each response's tokens (the last resp_len real tokens of its row: the answer and its
    end marker), laid out as collate lays out the same groups: what an implicit reward model sums over."""
    lens = [(len(ids), n) for g in groups for ids, n in zip(g["ids"], g["resp_len"])]
    out = torch.zeros((len(lens), T), dtype=torch.long)
    for i, (n_all, n_resp) in enumerate(lens):
        end = n_all if side == "right" else T
        out[i, end - n_resp:end] = 1
    return out


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int):
    """The batches (lists of group indices) of one epoch: a fresh permutation per (seed, epoch), so
    the order is reproducible and a resumed run continues with exactly the same batches."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return [order[i:i + batch_size].tolist() for i in range(0, n - batch_size + 1, batch_size)]


def split_groups(groups, val_frac: float, seed: int):
    """Hold out a seeded fraction of the PROMPTS (common.split_by_prompt, keyed on the first user turn):
    the lab world's preference pairs repeat a prompt with another rejected answer, and repeat whole
    records, so a split by record (or by whole group) left held-out prompts -- and their chosen answers
    -- in training. Every record of a held-out prompt goes to val (copies keep the data's own weights).
    reward.py and dpo.py (without --val_data) both split with this."""
    train_idx, val_idx = split_by_prompt([g["prompt_key"] for g in groups], val_frac, seed)
    train, val = [groups[i] for i in train_idx], [groups[i] for i in val_idx]
    n_val = len({g["prompt_key"] for g in val})
    print0(f"held out {n_val} of {len({g['prompt_key'] for g in groups})} distinct prompts ({len(val)} records)")
    return train, val


# -----------------------------------------------------------------------------
# Answers cut at the length limit: ONE rule for DPO rounds, PPO, GRPO and evaluation.
# A sampled answer that produced no stop token within max_new_tokens is unfinished. It is never
# rendered with an end marker it did not produce (the reward model reads it at its last real token,
# and would otherwise score it as a finished answer), it is never the chosen answer of a DPO round
# (that would teach the model to stop mid-sentence), and its reward-model score pays a fixed penalty
# (TRL's missing_eos_penalty; "The N+ implementation details of RLHF with PPO", Huang et al. 2024),
# in training and in evaluation alike, so both give the same reward to the same answer.

MISSING_EOS_PENALTY = 1.0   # the default of DPO rounds, PPO and the lab evaluation alike
MISSING_EOS_HELP = ("subtracted from the raw reward-model score (or the checker's score) of an answer cut at "
                    "--max_new_tokens without a stop token, in training and evaluation alike (0 = off)")


def ended(ids, stop_ids) -> bool:
    """Did a sampled answer (model.generate's ids) stop by itself, i.e. contain a stop token?"""
    return any(t in stop_ids for t in ids)


def penalize_missing_eos(scores, ended_flags, penalty: float):
    """scores minus `penalty` where the answer did not end (see the section comment). scores: a
    tensor (B,) with ended_flags a bool tensor, or lists of floats / bools (-> list)."""
    if torch.is_tensor(scores):
        return scores - penalty * (~ended_flags.bool()).to(scores.dtype)
    return [s - (0.0 if e else penalty) for s, e in zip(scores, ended_flags)]


# RL helpers (rlhf_ppo.py, grpo.py): rollouts in one padded layout, their log-probs, KL estimates.
# Tensors (B, R): one row per answer, one column per response token; mask (B, R) is 1 on the answer's
# tokens (its stop token included: stopping is an action), 0 after it.


def frozen(model, dtype, device, info: DistInfo = None, parallel: str = "none", shard_size: int = 0):
    """A frozen model: no gradients, eval mode (no dropout), on `device`; when the run computes in
    bf16, the weights of the blocks' linear layers are stored in bf16 (most of the memory). Only those:
    autocast rounds exactly these weights to bf16 for the actor anyway, so the frozen copy computes the
    same function bit for bit (KL at iteration 0 is exactly 0). Embeddings, norms and the LM head stay
    fp32: a bf16 embedding would make the residual stream start (and accumulate) in bf16 while the
    actor's is fp32 -- a different function, max |log-prob difference| ~4e-2 on the lab model.
    parallel "fsdp": sharded like the trained model (wrap_model: 1/W of its weights per rank, no
    gradients, no optimizer), and gathered in the same parameter dtype as the actor's, so again the
    same function bit for bit. In bf16 its shards are stored in bf16 (every parameter: the actor's
    gathered copies round all of them to bf16 too), half the memory of fp32 shards.
    Its forwards are collectives: every rank must run the same number.
    shard_size: HSDP, as wrap_model. A model on the meta device stays there (load_frozen_sharded)."""
    model.requires_grad_(False)
    model.eval()
    if parallel == "fsdp":
        if dtype == torch.bfloat16:   # (parameters only: buffers such as the rotary table stay fp32)
            for p in model.parameters():
                p.data = p.data.to(torch.bfloat16)
        on_meta = any(p.is_meta for p in model.parameters())
        model = wrap_model(model if on_meta else model.to(device), info, "fsdp", dtype, shard_size=shard_size)
        # FSDP keeps the root unit's weights gathered after a forward, for the backward that follows in
        # training; a frozen model has none, and would hold them until its next forward
        model.set_reshard_after_forward(True)
        return model
    if dtype == torch.bfloat16:
        for block in model.layers:
            for m in block.modules():
                if isinstance(m, torch.nn.Linear):
                    m.weight.data = m.weight.data.to(torch.bfloat16)
    return model.to(device)


def reference_model(policy, args, dtype, device, info: DistInfo = None, parallel: str = "none"):
    """pi_ref of PPO and GRPO. A LoRA policy (and no --ref_model): the policy itself with its adapters
    switched off (lora.BaseView) -- the frozen base IS the starting policy, so no second copy is
    loaded, and the KL at iteration 0 is exactly 0 (the adapters start at B = 0). Otherwise a frozen
    copy of --ref_model (default --init_from)."""
    if has_lora(policy) and not args.ref_model:
        return BaseView(policy)
    return frozen(load_model(args.ref_model or args.init_from)[0], dtype, device, info, parallel)


def load_frozen_sharded(path, info: DistInfo, dtype, shard_size: int = 0, make=Llama, kind: str = None,
                        whole=None):
    """A frozen model under FSDP straight from its checkpoint -> (model, meta): built on the meta device,
    sharded by frozen(..., "fsdp"), each rank reading only its shards (load_model_sharded): no whole
    model on any rank, even while loading (the RL stages' and DPO's reference and reward model).
    A LoRA adapter-only checkpoint (its base merged in whole) is read by whole(path) -> (model, meta),
    default load_model (reward models: reward.load_reward_model), then sharded."""
    path = resolve_checkpoint(path)
    if not is_hf_dir(path) and "lora" in read_checkpoint_meta(path):
        model, meta = (whole or load_model)(path)
        return frozen(model, dtype, info.device, info, "fsdp", shard_size), meta
    return load_model_sharded(path, info, lambda m: frozen(m, dtype, info.device, info, "fsdp", shard_size),
                              make, kind=kind)


def check_ratio(inv, stats, it):
    """The run-time invariant of PPO-style updates: on the first minibatch of an iteration nothing has
    been updated since the rollout, so pi == pi_old, |ratio - 1| < inv["ratio_tol"] and approx KL ~ 0.
    A failure means rollout and training compute log-probs differently (padding, positions, dropout):
    a silent bug that turns the update into noise. Updates inv's maxima and failure count; -> max |ratio - 1|."""
    dev, akl = stats["ratio_dev"].item(), stats["approx_kl"].item()
    inv["ratio_max_dev"], inv["approx_kl_max"] = max(inv["ratio_max_dev"], dev), max(inv["approx_kl_max"], akl)
    if not dev < inv["ratio_tol"]:
        inv["ratio_failures"] += 1
        print0(f"warning: iteration {it}: ratio check FAILED: max |ratio - 1| = {dev:.2e} >= {inv['ratio_tol']:g} on "
               f"the first minibatch (rollout and training compute log-probs differently: padding, positions?)")
    return dev


def check_kl_at_start(logp, logp_ref, mask, same_model):
    """The other invariant: on the first rollout the policy IS the reference, so every per-token log-prob
    difference must be exactly 0 (frozen() keeps a bf16 reference bit-identical too). Prints the
    verdict; -> max |log pi - log pi_ref| over the answers' tokens."""
    value = (logp - logp_ref).abs().mul(mask).max().item()
    verdict = "not expected to be 0: --ref_model differs" if not same_model else (
        "ok" if value == 0 else "MISMATCH: policy and reference compute log-probs differently")
    print0(f"check at iteration 0 (policy == reference): max |log pi - log pi_ref| {value:.2e} ({verdict})")
    return value


def weights_in_sync(models, info):
    """After a data-parallel run every process must hold the same weights (DDP averaged every gradient;
    calling .module instead of the wrapper would let them drift). Compares checksums; prints; -> bool.
    FSDP holds one sharded copy: nothing to compare (True)."""
    if not info.distributed or any(is_fsdp(unwrap(m)) for m in models):
        return True
    checksum = torch.tensor([sum(p.double().sum().item() for p in m.parameters()) for m in models], dtype=torch.float64)
    every = [torch.zeros_like(checksum) for _ in range(info.world_size)]
    dist.all_gather(every, checksum)
    ok = all(torch.equal(e, every[0]) for e in every)
    print0(f"weights identical on all {info.world_size} processes: {'yes' if ok else 'NO (was .module called?)'}")
    return ok


def masked_mean(x, mask):
    """Mean of x over the entries where mask is 1 (masked entries may hold anything, even inf)."""
    return torch.where(mask.bool(), x, 0.0).sum() / mask.sum().clamp(min=1)


def kl_estimates(logp, logp_ref, kind):
    """Per-token estimates of KL(pi || pi_ref) from tokens sampled from pi (Schulman, "Approximating
    KL divergence", 2020). With x = log pi(y_t) - log pi_ref(y_t):
        k1 = x                      unbiased, noisy, negative for some tokens
        k2 = x^2 / 2                biased, low variance, >= 0
        k3 = (e^-x - 1) + x         unbiased, low variance, >= 0 (since e^z >= 1 + z)
    Computed in float64 (expm1): in float32 the two terms of k3 cancel for tiny x."""
    x = (logp - logp_ref).double()
    if kind == "k1":
        out = x
    elif kind == "k2":
        out = 0.5 * x ** 2
    elif kind == "k3":
        out = torch.expm1(-x) + x
    else:
        raise ValueError(f"unknown KL estimator {kind!r}")
    return out.to(logp.dtype)


def sequence_logps(logits, labels):
    """log pi(y|x) for every row (DPO's and the implicit reward model's): the sum over positions with labels != -100 of log softmax(logits)
    at the label. logits (N, T, V), labels (N, T) -> (N,). cross_entropy with ignore_index gives
    exactly 0 at ignored positions, so prompt logits and padding (whatever they hold) never count,
    and no (N, T, V) log-softmax tensor is kept around."""
    nll = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none")
    return -nll.view(labels.shape).sum(-1)


def pad_rollout(prompts, responses, pad_id, stop_ids):
    """Prompts LEFT-padded to a common length P (so every answer starts in column P, as in
    model.generate), answers RIGHT-padded after their stop token. Returns idx (B, P + R),
    attention_mask (B, P + R) (1 = real token), response_mask (B, R) float (1 up to and including the
    first stop token, 0 after: nothing after EOS carries loss), and P. Answer token j sits in column
    P + j and is predicted by the logits in column P + j - 1."""
    stop = set(stop_ids)
    cut = []
    for r in responses:   # everything after the first stop token is dropped here, whoever made r
        n = next((i + 1 for i, t in enumerate(r) if t in stop), len(r))
        cut.append(list(r[:n]))
    B, P, R = len(prompts), max(len(p) for p in prompts), max(1, max(len(r) for r in cut))
    idx = torch.full((B, P + R), pad_id, dtype=torch.long)
    attn = torch.zeros((B, P + R), dtype=torch.long)
    resp_mask = torch.zeros((B, R))
    for b, (p, r) in enumerate(zip(prompts, cut)):
        idx[b, P - len(p):P] = torch.tensor(p)
        attn[b, P - len(p):P + len(r)] = 1
        if r:
            idx[b, P:P + len(r)] = torch.tensor(r)
            resp_mask[b, :len(r)] = 1
    return idx, attn, resp_mask, P


def response_logprobs(model, idx, attn, P, temperature, with_entropy=False):
    """log pi(y_t | x, y_<t) of every answer token (B, R) under softmax(logits / temperature) (the
    distribution generate sampled from), and optionally the entropy of that distribution (B, R).
    `model` is called as given: the DDP-wrapped actor in training (so gradients are averaged), the
    plain one in the rollout. Same idx, same attention mask, same positions in both: the ratio check."""
    logits, _ = model(idx, attention_mask=attn)
    logits = logits[:, P - 1:-1].float() / temperature          # column t predicts token t + 1
    logp_all = F.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, idx[:, P:, None]).squeeze(-1)
    entropy = None
    if with_entropy:
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def by_row_chunks(fn, chunk, *tensors):
    """fn(*row slices) over at most `chunk` rows at a time, outputs concatenated along the rows (a tuple
    output is concatenated item by item; None stays None). The no-gradient passes of the RL stages run
    this way: over a whole rollout batch at once, the (rows, answer length, vocab) float logits alone are
    rows x 512 x 32 000 x 4 bytes -- 8 GB for 128 answers at the gpu size -- and the dry runs budget one
    micro-batch. The rows do not see each other (each has its own attention mask), so only the batch
    dimension changes. Every rank calls fn the same number of times (same batch on every rank), which FSDP's
    per-forward all-gathers need."""
    outs = [fn(*(t[s:s + chunk] for t in tensors)) for s in range(0, tensors[0].shape[0], chunk)]
    if isinstance(outs[0], tuple):
        return tuple(None if parts[0] is None else torch.cat(parts) for parts in zip(*outs))
    return torch.cat(outs)


def load_prompts(path, tok, max_len, check=None):
    """Records with "messages" (ending on a user turn) or a "prompt" string; "truth" optional (then
    the lab checker grades rollouts). check(record) -> None, or why the record is unusable (grpo.py:
    a verifier needs a truth or a numeric reference). Malformed and unusable lines are skipped and
    reported with path:line; no usable line at all is an error. -> (records, prompt ids)."""
    from data.formats import Report, iter_json
    records, ids, report = [], [], Report()
    try:
        for lineno, r in iter_json(path, report):   # malformed lines are counted with path:line and skipped
            if "messages" not in r and isinstance(r.get("prompt"), str):
                r = {**r, "messages": [{"role": "user", "content": r["prompt"]}]}
            try:
                p = tok.render_prompt(r["messages"], max_len=max_len)
            except (KeyError, TypeError, AttributeError, ValueError) as e:
                report.skip(path, lineno, f"not a usable prompt ({type(e).__name__}: {str(e)[:80]})")
                continue
            why = check(r) if check else None
            if why:
                report.skip(path, lineno, f"not a usable prompt ({why})")
                continue
            ids.append(p)
            records.append(r)
    except (OSError, ValueError) as e:
        fail(f"{path}: {e}")
    report.records = report.emitted = len(records)
    if report.skipped:
        print0(f"{path}: {report.summary()}")
    if not records:
        fail(f"{path}: no usable prompts (records need 'messages' ending on a user turn, or 'prompt')")
    return records, ids


@torch.no_grad()
def kl_to_model(policy, base, tok, convs, max_new_tokens, seed, ctx, batch_size=32):
    """Monte-Carlo KL(pi || pi_base) per answer, in nats: answers sampled from pi at temperature 1 (no
    top-k/p: the samples follow pi exactly), mean over answers of sum_t log pi(y_t) - log pi_base(y_t)."""
    device = next(policy.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    total = 0.0
    for s in range(0, len(convs), batch_size):
        room = policy.config.max_seq_len - max_new_tokens
        prompts = [tok.render_prompt(c, max_len=room) for c in convs[s:s + batch_size]]
        with ctx:
            answers = policy.generate(prompts, max_new_tokens, temperature=1.0, eos_id=tok.stop_ids, generator=gen)
        idx, attn, mask, P = (t.to(device) if torch.is_tensor(t) else t
                              for t in pad_rollout(prompts, answers, tok.pad_id, tok.stop_ids))
        with ctx:
            lp, lb = response_logprobs(policy, idx, attn, P, 1.0)[0], response_logprobs(base, idx, attn, P, 1.0)[0]
        total += torch.where(mask.bool(), lp - lb, 0.0).sum().item()
    return total / len(convs)


# -----------------------------------------------------------------------------
# CLI: offline checkpoint tools


def main(argv=None):
    parser = argparse.ArgumentParser(description="nanollama checkpoint tools")
    sub = parser.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("consolidate", help="merge a (sharded) checkpoint into one file, optionally a HF dir")
    c.add_argument("src", help="checkpoint file, DCP directory, run directory or HF directory")
    c.add_argument("out", help="output .pt file")
    c.add_argument("--hf", default=None, help="also write a HuggingFace directory here")
    c.add_argument("--peft", default=None, help="a LoRA checkpoint: also write its adapters as a PEFT directory here")
    c.add_argument("--base", default=None, help="a LoRA checkpoint: where its base checkpoint is now (if it moved)")
    i = sub.add_parser("info", help="print a checkpoint's metadata")
    i.add_argument("path")
    args = parser.parse_args(argv)
    if args.cmd == "consolidate":
        consolidate(args.src, args.out, args.hf, args.base)
        if args.peft:
            export_peft(args.src, args.peft)
        print(f"wrote {args.out}" + (f" and {args.hf}/" if args.hf else "") + (f" and {args.peft}/" if args.peft else ""))
    else:
        meta = read_checkpoint_meta(resolve_checkpoint(args.path))
        meta.pop("rng", None)
        print(json.dumps(meta, indent=2, default=str))


if __name__ == "__main__":
    sys.exit(main())
