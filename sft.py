"""
sft.py -- supervised fine-tuning: teach a pretrained model to answer in the chat template.

Usage (single process; CPU or one GPU):
    python sft.py --init_from runs/pretrain --data lab_data/sft_train.jsonl --val_data lab_data/sft_val.jsonl \\
        --out_dir runs/sft --epochs 3 --batch_size 16 --lr 1e-4
    # several files with weights (copies per epoch), any format data/formats.py reads, a plain
    # pretraining mix at 1 batch in 10, and a HuggingFace LLaMA directory as the start:
    python sft.py --init_from hf/llama --data a.jsonl:2 b.jsonl.gz c_sharegpt.json:0.5 \\
        --pretrain_data out/pretrain_data --pretrain_ratio 0.1 --out_dir runs/sft
    # a pre-tokenised set (data/sft_prepare.py output directory) works in place of files:
    python sft.py --init_from runs/pretrain --data out/sft_memmap --val_frac 0.02 --out_dir runs/sft
Distributed (same flags; DDP by default, --parallel fsdp to shard the model):
    torchrun --standalone --nproc_per_node=2 sft.py --init_from runs/pretrain --data ... --out_dir runs/sft
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 sft.py ... --parallel fsdp
Resume an interrupted run exactly (same flags + --resume): model, optimizer, RNG and data position.
LoRA (adapters on the frozen model; checkpoints hold only the adapters and the base's sha256):
    python sft.py --init_from runs/pretrain --data ... --out_dir runs/sft_lora --lora_rank 16 --lr 1e-3

What SFT changes, compared with pretrain.py (the loop is otherwise the same, through common.py):
  - The data are conversations rendered by the chat template (tokenizer/tokenizer.py). The loss is
    taken ONLY on assistant tokens (every assistant turn, and the <|end|> that closes it, so the
    model learns to stop): system and user tokens are context, not targets. The first lesson of the
    project this repo grew from was that a loss on prompt tokens makes the model worse.
  - The shift: the tokenizer's mask marks tokens to PREDICT. Inputs are ids[:-1]; the target at
    position t is ids[t+1] when mask[t+1] == 1, else -100 (ignored by the cross-entropy).
  - Dynamic padding: each batch is padded to its own longest example, not to the context length,
    and batches are built from examples of similar length (length-grouped sampling), so very little
    compute goes into padding. Right padding needs no attention mask: a causal model never lets a
    real token look at the padding that comes after it.
  - Too-long conversations are cut at a turn boundary (the longest run of leading whole turns that
    fits and ends on an assistant turn) or, when not even the first exchange fits, dropped; both are
    counted and printed. A turn is never cut in the middle.
  - Optional plain pretraining batches mixed in (--pretrain_ratio): a fraction of the micro-batches
    are random windows of the pretraining corpus with a loss on every token, which protects what
    pretraining taught (the seed's "mixed training"; InstructGPT's PPO-ptx is the same idea for RL).
  - Epochs instead of a token budget (--epochs; --max_steps > 0 overrides), an eval loss on a
    held-out split (--val_data, or --val_frac of --data's prompts), best.pt by eval loss and final.pt.

Loss weighting, on purpose: each micro-batch's loss is the mean over ITS target tokens, and the
micro-batches of a step are averaged (as pretrain.py does). So the pretraining share of the gradient
is exactly --pretrain_ratio; the price is that a batch of short answers weighs as much as a batch of
long ones (the alternative, dividing by the step's total number of assistant tokens, weighs every
token the same). The held-out loss is always the exact mean over all assistant tokens.
"""
import argparse
import math
import os
import time

import numpy as np
import torch
import torch.distributed as dist

import common
from common import print0
from data.formats import read_conversations
from data.prepare import load_tokens
from data.sft_prepare import FORMAT as SFT_MEMMAP_FORMAT, SFTDataset
from model import Llama

# -----------------------------------------------------------------------------
# Config


def get_args(argv=None):
    parser = argparse.ArgumentParser(description="Supervised fine-tuning with an assistant-only loss.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common.add_common_args(parser)
    g = parser.add_argument_group("sft")
    g.add_argument("--data", nargs="+", default=None,
                   help="training conversations: files 'path[:weight]' in any format data/formats.py reads "
                        "(weight = copies per epoch), or one data/sft_prepare.py directory")
    g.add_argument("--val_data", nargs="+", default=None, help="held-out conversations (same forms as --data)")
    g.add_argument("--val_frac", type=float, default=0.05,
                   help="without --val_data: about this fraction of --data's distinct prompts (first user turns) "
                        "held out, with every conversation that starts with one (seeded)")
    g.add_argument("--epochs", type=float, default=3, help="passes over the data (used when --max_steps is 0)")
    g.add_argument("--seq_len", type=int, default=None,
                   help="longest training sequence in tokens (default: the model's max_seq_len); longer "
                        "conversations are cut at a turn boundary or dropped")
    g.add_argument("--group_batches", type=int, default=32,
                   help="length-grouped sampling: sort windows of this many batches by length (0 = random batches)")
    g.add_argument("--pretrain_data", default=None, help="data/prepare.py directory for plain pretraining batches")
    g.add_argument("--pretrain_ratio", type=float, default=0.0,
                   help="fraction of micro-batches that are plain pretraining batches (needs --pretrain_data)")
    g.add_argument("--max_skips", type=int, default=5,
                   help="stop after this many consecutive steps with a non-finite loss or gradient")
    # SFT defaults: a pretrained model needs a gentler learning rate and a short warmup; no weight
    # decay (a few epochs on a small set; decay would only pull the pretrained weights toward 0);
    # max_steps 0 means "from --epochs"; eval_steps 0 evaluates on the whole held-out split.
    parser.set_defaults(lr=1e-4, min_lr=1e-5, warmup_steps=20, max_steps=0, weight_decay=0.0, eval_interval=100,
                        eval_steps=0, save_interval=200, out_dir="out/sft", batch_size=16)
    common.add_dry_run_args(parser.add_argument_group("--dry_run: memory per GPU before launching anything"))
    args = common.parse_config(parser, argv)
    if not args.init_from:
        common.fail("--init_from is required: SFT starts from a pretrained checkpoint, run dir or HF directory")
    if not args.data and not args.dry_run:
        common.fail("--data is required (conversation files, or a data/sft_prepare.py directory)")
    if not 0 <= args.pretrain_ratio < 1:
        common.fail(f"--pretrain_ratio must be in [0, 1), got {args.pretrain_ratio}")
    if args.pretrain_ratio > 0 and not args.pretrain_data:
        common.fail("--pretrain_ratio > 0 needs --pretrain_data (a data/prepare.py directory)")
    return args


# -----------------------------------------------------------------------------
# Data: conversations -> (ids, mask) -> length-grouped, dynamically padded batches


class Conversations:
    """Tokenised conversations in memory, with the same interface as data.SFTDataset (the memmap
    reader): ds[i] -> (ids, mask) numpy arrays, len(ds), ds.lengths. One code path for both."""

    def __init__(self, examples):
        self.examples = examples
        self.lengths = np.array([len(ids) for ids, _ in examples], dtype=np.int64)

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        return self.examples[i]


def turn_cut(mask, max_len):
    """Length of the longest prefix with at most max_len tokens that ends right after a whole
    assistant turn (0 if none). The template renders segment by segment, so this prefix is exactly
    render_conversation(messages[:k]) for the last assistant turn k that fits: a turn ends where the
    mask falls from 1 (its <|end|>) to 0 (the next user header) or at the end of the conversation."""
    mask = np.asarray(mask)
    if len(mask) <= max_len:
        return len(mask)
    ends = np.flatnonzero((mask[:max_len] == 1) & (mask[1:max_len + 1] == 0)) + 1
    return int(ends[-1]) if len(ends) else 0


def tokenize(conversations, tok):
    """Render each conversation with the chat template: a Conversations dataset."""
    examples = []
    for messages in conversations:
        ids, mask = tok.render_conversation(messages)
        examples.append((np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.uint8)))
    return Conversations(examples)


def load_source(specs, tok, seed):
    """--data / --val_data -> (dataset, description, Report or None): a data/sft_prepare.py
    directory (its skip report is in its meta.json), or conversation files with weights."""
    if len(specs) == 1 and os.path.isfile(os.path.join(specs[0], "meta.json")):
        try:
            return SFTDataset(specs[0], tok), f"{specs[0]} (pre-tokenised, {SFT_MEMMAP_FORMAT})", None
        except (FileNotFoundError, ValueError) as e:
            common.fail(str(e))
    try:
        convs, report = read_conversations(specs, seed=seed)
    except (OSError, ValueError) as e:
        common.fail(str(e))
    if report.skipped:  # a record that is not a valid conversation is never trained on
        print0(f"skipped records: {report.summary()}")
    if not convs:
        common.fail(f"no valid conversations in {specs}")
    return tokenize(convs, tok), f"{len(convs)} conversations from {len(report.files)} file(s)", report


class Split:
    """A set of examples of a source (indices), each cut to fit max_len tokens at a turn boundary."""

    def __init__(self, source, indices, max_len):
        self.source = source
        self.truncated = self.dropped = 0
        kept, lengths = [], []
        all_lengths = np.asarray(source.lengths)  # once: SFTDataset computes it from the offsets
        for i in indices:
            n = int(all_lengths[i])
            if n > max_len:
                n = turn_cut(source[i][1], max_len)
                if n == 0:
                    self.dropped += 1
                    continue
                self.truncated += 1
            kept.append(int(i))
            lengths.append(n)
        self.indices, self.lengths = np.array(kept, dtype=np.int64), np.array(lengths, dtype=np.int64)

    def __len__(self):
        return len(self.indices)

    def example(self, k):
        ids, mask = self.source[self.indices[k]]
        n = self.lengths[k]
        return ids[:n], mask[:n]


def prompt_key(ids, mask):
    """The tokens before the first assistant target: BOS, system prompt, first user turn and the
    assistant header, exactly render_prompt(messages up to the first user turn) -- the key reward.py and
    dpo.py split preference prompts by, so the three stages hold out the same prompts."""
    mask = np.asarray(mask)
    first = int(np.argmax(mask)) if mask.any() else len(mask)
    return tuple(np.asarray(ids[:first]).tolist())


def split_source(source, val_frac, seed):
    """(train indices, val indices) of a source, split by prompt (common.split_by_prompt)."""
    train, val = common.split_by_prompt([prompt_key(*source[i]) for i in range(len(source))], val_frac, seed)
    return np.array(train, dtype=np.int64), np.array(val, dtype=np.int64)


def length_grouped_batches(lengths, batch_size, seed, epoch, group_batches=32):
    """The batches of one epoch, as lists of example positions; deterministic in (seed, epoch).

    Shuffle everything, then sort by length inside windows of group_batches * batch_size examples
    and cut each window into batches, then shuffle the batches. Examples of similar length share a
    batch (little padding), yet which examples meet, and the order of batches, is random every
    epoch; sorting the whole set instead would feed all short conversations first, a curriculum
    nobody asked for. group_batches=0: plain random batches."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    if group_batches > 0:
        window = group_batches * batch_size
        order = np.concatenate([w[np.argsort(-lengths[w], kind="stable")]
                                for w in np.array_split(order, max(1, math.ceil(len(order) / window)))])
    batches = [order[i:i + batch_size].tolist() for i in range(0, len(order), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def collate(examples, pad_id):
    """Pad a batch to its longest example (dynamic padding), on the right.

    examples: list of (ids, mask). Returns x, y: (B, T) long tensors with T = longest - 1.
    x = ids[:-1] then pad_id; y[t] = ids[t+1] where mask[t+1] == 1, else -100 (also on padding).
    No attention mask is needed: right padding comes after every real token, and causal attention
    never looks forward, so a real position computes exactly what it computes alone."""
    T = max(len(ids) for ids, _ in examples) - 1
    x = torch.full((len(examples), T), pad_id, dtype=torch.long)
    y = torch.full((len(examples), T), -100, dtype=torch.long)
    for b, (ids, mask) in enumerate(examples):
        ids, mask = torch.as_tensor(np.asarray(ids, dtype=np.int64)), torch.as_tensor(np.asarray(mask, dtype=np.int64))
        n = len(ids) - 1
        x[b, :n] = ids[:-1]
        y[b, :n] = torch.where(mask[1:] == 1, ids[1:], torch.full_like(ids[1:], -100))
    return x, y


def pretrain_batch(tokens, batch_size, seq_len, rng):
    """Plain language-modelling batch: random windows of the pretraining stream, loss on every token."""
    starts = rng.integers(0, len(tokens) - seq_len - 1, size=batch_size)
    chunk = np.stack([np.asarray(tokens[s:s + seq_len + 1], dtype=np.int64) for s in starts])
    chunk = torch.from_numpy(chunk)
    return chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()


def epoch_plan(split, args, epoch):
    """Every micro-batch of one epoch, in order: ("sft", positions) or ("pretrain", index).
    Pretraining batches are sprinkled in so that they make up --pretrain_ratio of the micro-batches."""
    plan = [("sft", b) for b in length_grouped_batches(split.lengths, args.batch_size, args.seed, epoch,
                                                        args.group_batches)]
    n_pt = round(len(plan) * args.pretrain_ratio / (1 - args.pretrain_ratio))
    if n_pt:
        plan += [("pretrain", j) for j in range(n_pt)]
        rng = np.random.default_rng([args.seed, epoch, 1])
        plan = [plan[i] for i in rng.permutation(len(plan))]
    return plan


def materialize(item, split, pad_id, pt_tokens, args, epoch, seq_len):
    """An epoch_plan item -> (x, y) tensors on the CPU."""
    kind, what = item
    if kind == "sft":
        return collate([split.example(k) for k in what], pad_id)
    rng = np.random.default_rng([args.seed, epoch, 2, what])  # a pure function of the position: resumable
    return pretrain_batch(pt_tokens, args.batch_size, seq_len, rng)


# -----------------------------------------------------------------------------
# Evaluation: exact mean loss over every assistant token of the held-out split


@torch.no_grad()
def evaluate(model, split, pad_id, args, info, ctx):
    """Summed loss over all assistant targets / their number, over the whole split (or the first
    --eval_steps batches per rank). Batches are the split sorted by length: fixed from one
    evaluation to the next (so best.pt is not chosen by luck) and with almost no padding."""
    order = np.argsort(split.lengths, kind="stable")
    batches = [order[i:i + args.batch_size] for i in range(0, len(order), args.batch_size)]
    if args.eval_steps > 0:
        batches = batches[:args.eval_steps * info.world_size]
    # every rank runs the same number of forwards (FSDP gathers weights collectively): a rank with
    # nothing left runs batch 0 again and ignores the result
    per_rank = math.ceil(len(batches) / info.world_size)
    totals = torch.zeros(2, dtype=torch.float64, device=info.device)  # summed loss, number of targets
    with common.eval_mode(model):
        for j in range(per_rank):
            k = j * info.world_size + info.rank
            x, y = collate([split.example(i) for i in batches[k if k < len(batches) else 0]], pad_id)
            x, y = x.to(info.device), y.to(info.device)
            with ctx:
                _, loss = model(x, y)
            n = (y != -100).sum()
            if k < len(batches):
                totals += torch.stack([loss.double() * n, n.double()])
    if info.distributed:
        dist.all_reduce(totals)
    return (totals[0] / totals[1].clamp(min=1)).item()


# -----------------------------------------------------------------------------
# Main


def dry_run(args):
    """--dry_run: this script's FSDP step on fake tensors (common.fsdp_dry_run) for the model of
    --init_from (a preset name will do: no checkpoint needed), micro-batches of batch_size x
    seq_len with the loss on the second half of each sequence (masked targets cost what full ones do)."""
    config = common.dry_run_config(args.init_from)
    T = args.seq_len or config.max_seq_len
    dtype = torch.float32 if args.dtype == "float32" else torch.bfloat16   # GPU training: bf16 unless asked

    def micro_step(model):
        x = torch.randint(0, config.vocab_size, (args.batch_size, T))
        return model(x, x.masked_fill(torch.arange(T) < T // 2, -100))[1]
    measured = common.fsdp_dry_run(lambda: Llama(config), micro_step, args.world_size, dtype, args.grad_accum,
                                   args.activation_checkpointing, args.fsdp_skip_accum_sync,
                                   shard_size=args.fsdp_shard_size, lora=args)
    common.print_dry_run(measured, args.world_size, args.gpu_mem_gb,
                         common.dry_run_label("sft", args, dtype, f"{args.batch_size} x {T}"))
    return measured


def main(argv=None):
    args = get_args(argv)
    if args.dry_run:
        return dry_run(args)
    info = common.setup_distributed(args.device)
    try:
        return train(args, info)
    finally:
        common.teardown_distributed(info)


def train(args, info):
    device, world, rank = info.device, info.world_size, info.rank
    args.parallel = common.resolve_parallel(args.parallel, info)
    dtype = common.resolve_dtype(args.dtype, device)
    ctx = common.autocast(device, dtype)

    # --- the run directory: resume, or refuse to overwrite an earlier run (as pretrain.py) ------
    resume_path = common.latest_checkpoint(args.out_dir) if args.resume else None
    if not args.resume and (common.latest_checkpoint(args.out_dir)
                            or any(common.checkpoint_path(args.out_dir, n) for n in ("best", "final"))):
        common.fail(f"{args.out_dir} already holds checkpoints of a run; pass --resume to continue it, or choose "
                    f"another --out_dir (nothing was changed)")
    if args.resume and not resume_path:
        print0(f"--resume: no checkpoint in {args.out_dir}, starting fresh")

    # --- model (ours or HuggingFace) and the tokenizer it was trained with ----------------------
    # FSDP: built on the meta device, sharded, and each rank reads only its own shards of the
    # checkpoint, ours or HuggingFace's (common.load_start_model). Otherwise, and with LoRA (its
    # adapters go on before sharding), every rank loads the whole model.
    def wrap(m):
        return common.wrap_model(m, info, args.parallel, dtype, args.compile, args.activation_checkpointing,
                                 args.fsdp_skip_accum_sync, shard_size=args.fsdp_shard_size)
    model, meta, sharded = common.load_start_model(args, info, dtype, wrap)
    try:   # the one it was trained with (--tokenizer overrides; another sha256 is refused)
        tok = common.checkpoint_tokenizer(meta, args.tokenizer)
    except (OSError, ValueError) as e:
        common.fail(f"tokenizer: {e}")
    seq_len = args.seq_len or model.config.max_seq_len
    if seq_len > model.config.max_seq_len:
        common.fail(f"--seq_len {seq_len} exceeds the model's max_seq_len {model.config.max_seq_len}")

    # --- data: every rank builds the same splits and plans (deterministic), then takes its share --
    source, desc, _ = load_source(args.data, tok, args.seed)
    if args.val_data:
        val_source, val_desc, _ = load_source(args.val_data, tok, args.seed)
        train_idx, val_idx = np.arange(len(source)), np.arange(len(val_source))
    else:  # hold out whole PROMPTS: no held-out first user turn (or copy of a held-out record) is trained on
        val_source, val_desc = source, f"{args.val_frac:.0%} of --data's prompts"
        train_idx, val_idx = split_source(source, args.val_frac, args.seed)
    # seq_len + 1 ids per example: the inputs ids[:-1] and the targets ids[1:] are seq_len long
    train_set, val_set = Split(source, train_idx, seq_len + 1), Split(val_source, val_idx, seq_len + 1)
    for name, s, d in (("train", train_set, desc), ("val", val_set, val_desc)):
        n_tok = int(s.lengths.sum())
        n_loss = sum(int(s.example(k)[1].sum()) for k in range(len(s))) if n_tok < 50_000_000 else None
        print0(f"{name}: {d}: {len(s):,} examples, {n_tok:,} tokens"
               + (f" ({n_loss / max(1, n_tok):.0%} assistant targets)" if n_loss is not None else "")
               + f"; cut at a turn boundary {s.truncated}, dropped (first exchange > {seq_len + 1} tokens) {s.dropped}")
    if len(train_set) == 0:
        common.fail("no training examples left")
    pt_tokens = None
    if args.pretrain_ratio > 0:
        try:
            pt_tokens = load_tokens(args.pretrain_data, "train", tok)
        except (FileNotFoundError, ValueError) as e:
            common.fail(str(e))
        if len(pt_tokens) <= seq_len + 1:
            common.fail(f"{args.pretrain_data}: the train split has only {len(pt_tokens)} tokens")

    micro_per_step = world * args.grad_accum  # micro-batches per optimizer step, all ranks together
    steps_per_epoch = len(epoch_plan(train_set, args, 0)) // micro_per_step
    if steps_per_epoch == 0:
        common.fail(f"{len(train_set)} examples make less than one step of {micro_per_step} micro-batches")
    max_steps = args.max_steps if args.max_steps > 0 else max(1, round(args.epochs * steps_per_epoch))

    # --- wrap, optimizer, resume -------------------------------------------------------------
    raw = model if sharded else model.to(device)   # (sharded FSDP: wrapped in place already)
    model = model if sharded else wrap(raw)
    optimizer = common.configure_optimizer(model, args.lr, args.weight_decay, (args.beta1, args.beta2), device)
    common.seed_everything(args.seed + rank)  # each rank draws its own dropout masks; the data order is shared
    step, best_val, val_loss, skipped = 0, float("inf"), None, 0
    counts = {"assistant_tokens": 0, "sft_tokens": 0, "pretrain_tokens": 0, "pad_tokens": 0}  # this epoch
    if resume_path:
        state = common.restore_checkpoint(resume_path, model, optimizer, device)
        step, data_state = state["step"], state.get("data_state", {})
        best_val = state["metrics"].get("best_val_loss", best_val)
        val_loss, skipped = state["metrics"].get("val_loss"), state["metrics"].get("skipped_steps", 0)
        if data_state.get("steps_per_epoch") != steps_per_epoch or data_state.get("seed") != args.seed:
            common.fail(f"{resume_path} was written with {data_state.get('steps_per_epoch')} steps per epoch and seed "
                        f"{data_state.get('seed')}; this run has {steps_per_epoch} and {args.seed}: the data, batch "
                        f"or seed flags changed, so the run cannot continue exactly")
        counts.update(data_state.get("counts", {}))
    common.save_config(args, args.out_dir, {"steps_per_epoch": steps_per_epoch, "resolved_max_steps": max_steps})
    logger = common.JsonlLogger(os.path.join(args.out_dir, "log.jsonl"))
    src = f"resume {resume_path}" if resume_path else f"init_from {meta['path']}"
    n_train = sum(p.numel() for p in raw.parameters() if p.requires_grad)
    print0(f"model: {raw.num_params() / 1e6:.2f}M parameters ({n_train / 1e6:.3f}M trainable), {src}; {args.parallel} x {world} on {device}, {dtype}; "
           f"tokenizer {tok.path}")
    print0(f"{steps_per_epoch} steps per epoch ({micro_per_step} micro-batches of {args.batch_size}, "
           f"{args.pretrain_ratio:.0%} of them pretraining), {max_steps} steps = "
           f"{max_steps / steps_per_epoch:.2f} epochs")
    logger.log(event="start", step=step, params=raw.num_params(), world_size=world, parallel=args.parallel,
               steps_per_epoch=steps_per_epoch, max_steps=max_steps, train_examples=len(train_set),
               truncated=train_set.truncated, dropped=train_set.dropped, source=src)

    def checkpoint(name, with_optimizer):
        metrics = {"val_loss": val_loss, "best_val_loss": best_val, "skipped_steps": skipped}
        return common.save_checkpoint(args.out_dir, name, model, optimizer if with_optimizer else None, step=step,
                                      config=vars(args), tokenizer=tok, metrics=metrics,
                                      data_state={"step": step, "seed": args.seed, "steps_per_epoch": steps_per_epoch,
                                                  "counts": dict(counts)},
                                      background=True)   # FSDP resume checkpoints: written while training goes on

    def run_eval():
        nonlocal val_loss, best_val
        val_loss = evaluate(model, val_set, tok.pad_id, args, info, ctx)
        improved = step > 0 and val_loss < best_val  # best.pt: the best TRAINED model, never the start
        if improved:
            best_val = val_loss
        logger.log(event="eval", step=step, val_loss=val_loss, best_val_loss=best_val)
        note = " (the starting model)" if step == 0 else (" (best so far: saved best)" if improved else "")
        print0(f"eval step {step}: val loss {val_loss:.4f} on the held-out assistant tokens{note}")
        if improved:
            checkpoint("best", False)

    # --- the loop ----------------------------------------------------------------------------
    if step == 0 and len(val_set) and args.eval_interval > 0:
        run_eval()  # the starting point: how well the pretrained model already predicts the answers
    plan_epoch, plan, consecutive_skips = None, None, 0
    t_log, tokens_log = time.perf_counter(), 0
    model.train()
    while step < max_steps:
        epoch, pos = divmod(step, steps_per_epoch)
        if epoch != plan_epoch:  # this rank's micro-batches of the epoch: every world-th one
            plan, plan_epoch = epoch_plan(train_set, args, epoch)[rank::world], epoch
        lr = common.lr_at(step, args.lr, args.min_lr, args.warmup_steps, max_steps)
        common.set_lr(optimizer, lr)
        loss_sum = torch.zeros((), device=device)
        step_counts = torch.zeros(4, dtype=torch.float64)  # assistant targets, sft tokens, pretrain tokens, padding
        for micro in range(args.grad_accum):
            item = plan[pos * args.grad_accum + micro]
            x, y = materialize(item, train_set, tok.pad_id, pt_tokens, args, epoch, seq_len)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with common.grad_sync(model, micro == args.grad_accum - 1):
                with ctx:
                    loss = model(x, y)[1]
                (loss / args.grad_accum).backward()
            loss_sum += loss.detach()
            if item[0] == "sft":
                real = sum(int(train_set.lengths[k]) - 1 for k in item[1])
                step_counts += torch.tensor([(y != -100).sum().item(), real, 0, x.numel() - real], dtype=torch.float64)
            else:
                step_counts[2] += x.numel()
        loss = common.all_reduce_mean(loss_sum / args.grad_accum).item()  # the same on every rank
        grad_norm = common.clip_grad_norm(model, args.grad_clip)
        if math.isfinite(loss) and math.isfinite(grad_norm):
            optimizer.step()
            consecutive_skips = 0
        else:  # as pretrain.py: never write NaN into the weights; stop if it keeps happening
            skipped += 1
            consecutive_skips += 1
            print0(f"warning: step {step + 1}: non-finite loss {loss} / grad norm {grad_norm}; update skipped")
            logger.log(event="skip", step=step + 1, loss=loss, grad_norm=grad_norm)
            if consecutive_skips >= args.max_skips:
                common.fail(f"{consecutive_skips} consecutive non-finite steps: training diverged; lower --lr")
        optimizer.zero_grad(set_to_none=True)
        common.shorten_timeout(info, args)   # (after the first step: --step_timeout)
        step += 1
        if info.distributed:
            step_counts = step_counts.to(device)
            dist.all_reduce(step_counts)
        for key, v in zip(counts, step_counts.tolist()):
            counts[key] += int(v)
        tokens_log += int(step_counts[1:].sum())

        if step % args.log_interval == 0 or step == max_steps:
            dt = time.perf_counter() - t_log
            print0(f"step {step:>6}/{max_steps} | epoch {step / steps_per_epoch:.2f} | loss {loss:.4f} | lr {lr:.2e} | "
                   f"gnorm {grad_norm:.3f} | {tokens_log / dt:,.0f} tok/s (with padding)")
            logger.log(step=step, epoch=round(step / steps_per_epoch, 4), loss=loss, lr=lr, grad_norm=grad_norm,
                       tok_per_s=round(tokens_log / dt, 1))
            t_log, tokens_log = time.perf_counter(), 0
        if step % steps_per_epoch == 0:  # end of an epoch: tokens trained on versus tokens seen
            seen = counts["sft_tokens"] + counts["pretrain_tokens"]
            pad = counts["pad_tokens"]
            print0(f"epoch {epoch + 1}: trained on {counts['assistant_tokens']:,} assistant tokens + "
                   f"{counts['pretrain_tokens']:,} pretraining tokens; seen {seen:,} tokens; padding "
                   f"{pad:,} ({pad / max(1, seen + pad):.1%} of the compute)")
            logger.log(event="epoch", step=step, epoch=epoch + 1, tokens_seen=seen, **counts)
            counts = dict.fromkeys(counts, 0)
        if len(val_set) and args.eval_interval > 0 and (step % args.eval_interval == 0 or step == max_steps):
            run_eval()
        if args.save_interval and step % args.save_interval == 0 and step < max_steps:
            checkpoint(f"step_{step:07d}", True)
            common.rotate_checkpoints(args.out_dir, args.keep_last)
    final = checkpoint("final", False)
    common.barrier()
    print0(f"sft done: {final}" + (f"; best val loss {best_val:.4f} ({common.checkpoint_path(args.out_dir, 'best')})"
                                   if math.isfinite(best_val) else ""))
    logger.log(event="end", step=step, best_val_loss=best_val, skipped=skipped)
    return {"step": step, "best_val_loss": best_val, "val_loss": val_loss, "final": final}


if __name__ == "__main__":
    main()
