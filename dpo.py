"""
dpo.py -- Direct Preference Optimization: align the SFT model to preferences with a classification
loss, no reward model and no RL (Rafailov et al. 2023), optionally repeated in on-policy rounds.

Usage (single process; CPU or one GPU):
    python dpo.py --init_from runs/sft --data lab_data/prefs_train.jsonl --val_data lab_data/prefs_val.jsonl \\
        --out_dir runs/dpo --beta 0.1 --eval_data lab_data/eval_qa.jsonl --reward_model runs/rm
    python dpo.py ... --label_smoothing 0.1      # conservative DPO: assume 10% of the labels are flipped
    python dpo.py ... --loss ipo --beta 0.5       # IPO: a squared loss that does not push margins to infinity
                                                  # (per-token mean log-probs: beta as in TRL; --no-ipo_average: sums)
    python dpo.py ... --nll_coef 1.0              # RPO: + the best answer's per-token NLL (keeps it likely)
    python dpo.py ... --precompute_ref            # reference log-probs once, then no reference model in memory
    python dpo.py ... --lora_rank 16 --lr 5e-4    # LoRA: the reference is the policy with its adapters off
    python dpo.py ... --rounds 2 --prompts lab_data/rl_prompts.jsonl --samples 4   # + 2 rounds on own samples
    torchrun --standalone --nproc_per_node=2 dpo.py ... [--parallel fsdp]   # DDP by default; --resume: exact

The idea. RLHF maximises E[r(x, y)] - beta * KL(pi || pi_ref). Its optimal policy is
pi*(y|x) = pi_ref(y|x) exp(r(x, y) / beta) / Z(x), so any policy defines an IMPLICIT reward
r(x, y) = beta * log(pi(y|x) / pi_ref(y|x)) + beta * log Z(x). Put that into the Bradley-Terry
preference model and Z cancels: the reward-model loss becomes a loss on the policy itself,
    loss = -log sigmoid(beta * [(log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))]).
log pi(y|x) is the SUM of the response tokens' log-probs (IPO: their per-token MEAN by default, see
ipo_loss); prompt tokens and padding never count. beta: the KL strength (small: the policy moves far).

What it prints: the implicit rewards beta * (log pi - log pi_ref) of chosen and rejected answers,
their margin and accuracy (a tie counts 1/2), and the summed log-probs of both answers. DPO only
needs the GAP to grow: watch for logp_chosen FALLING (both answers made less likely, the rejected one
faster), a known failure mode that ends in odd text; an alarm fires when the held-out chosen log-prob
falls by more than 10% (or 1 nat). The step-0 check: policy == reference, so every margin is 0 and
the loss is exactly ln 2 (sigmoid; (1/(2 beta))^2 for IPO), printed PASS / FAIL (with
--precompute_ref the margins are rounding noise, ~1e-6: the reference ran on other batch shapes).

Rounds (--rounds N): after the first DPO pass (on --data, if given) each round samples --samples
answers per prompt from the current policy (temperature > 0), ranks them with the reward model or
the lab checker (data.lab.score), pairs the best with the worst, and runs DPO again on those pairs,
with the policy at the start of the round as the new reference (--round_ref previous, the
"iterative DPO" of Xu et al. 2023 / Yuan et al. 2024) or the first reference throughout (init).
Each round is one schedule: fresh AdamW, warmup + cosine over the round's steps.

Run directory: config.json, log.jsonl, step_XXXXXXX.pt (resume), best.pt (lowest held-out DPO loss
within the latest round), final.pt, round_XX.pt (the next round's reference), round_XX_pairs.jsonl
(a round's scored pairs), ref_logps_XX.json (--precompute_ref), and metrics.json for the lab report:
DPO's and SFT's lab-checker accuracy (greedy, on --eval_data, also by kind), win rates against SFT
(checker, reward model), mean rewards, kl_to_sft (k1 at temperature 1, nats per answer), examples,
the last held-out preference eval (pref_*; pref_logp_accuracy[_init]: how often the policy / the
starting model prefers the chosen answer), step0_check, one dict per round, the run's settings.

Simplifications on purpose: rankings of K answers are expanded into all K(K-1)/2 pairs (averaged per
prompt, as reward.py does); the end-of-run evaluation runs on rank 0 from the saved final checkpoint.
"""
import argparse
import contextlib
import json
import math
import os
import re
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import chat
import common
from common import epoch_batches, load_groups, print0, sequence_logps, split_groups   # noqa: F401  (dpo.sequence_logps: the summed response log-probs)
from lora import lora_disabled
from data import lab
from model import Llama
from reward import REWARD_KIND, RewardModel, load_reward_model, ranked_pairs, reward_scorer, tokenizer_for

# -----------------------------------------------------------------------------
# Config

def get_args(argv=None):
    parser = argparse.ArgumentParser(description="Direct Preference Optimization (see the docstring).",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common.add_common_args(parser)
    g = parser.add_argument_group("dpo")
    g.add_argument("--data", nargs="+", default=None,
                   help="training preferences: files 'path[:weight]' in any format data/formats.py reads "
                        "({prompt, chosen, rejected}, Anthropic HH, {prompt, responses: [best..worst]}, ...)")
    g.add_argument("--val_data", nargs="+", default=None, help="held-out preferences (same forms as --data)")
    g.add_argument("--val_frac", type=float, default=0.05,
                   help="without --val_data: about this fraction of --data's distinct prompts held out (reward.py's split)")
    g.add_argument("--epochs", type=float, default=1, help="passes over each round's pairs when --max_steps is 0")
    g.add_argument("--max_seq_len", type=int, default=0, help="longest prompt + response in tokens (0 = model context)")
    g.add_argument("--beta", type=float, default=0.1, help="KL strength: implicit reward = beta * log(pi / pi_ref)")
    g.add_argument("--loss", default="sigmoid", choices=["sigmoid", "ipo"], help="DPO (sigmoid) or IPO (squared)")
    g.add_argument("--ipo_average", action=argparse.BooleanOptionalAction, default=True,
                   help="IPO on per-token MEAN log-probs (TRL, torchtune; the same beta as TRL's IPO); "
                        "--no-ipo_average: summed log-probs as written in the paper, where the target gap "
                        "1/(2 beta) is in whole-answer nats, so a beta means less the longer the answers")
    g.add_argument("--dropout", action=argparse.BooleanOptionalAction, default=False,
                   help="train the policy with the checkpoint's dropout (default off, as TRL: dropout makes the "
                        "implicit reward noisy; the reference never uses it)")
    g.add_argument("--label_smoothing", type=float, default=0.0,
                   help="conservative DPO: the probability that a label is flipped (sigmoid loss only)")
    g.add_argument("--nll_coef", type=float, default=0.0,
                   help="RPO: add this times the per-token NLL of each prompt's best answer (0 = plain DPO)")
    g.add_argument("--ref_model", default=None, help="reference model (default: --init_from, the SFT model)")
    g.add_argument("--precompute_ref", action=argparse.BooleanOptionalAction, default=False,
                   help="compute reference log-probs once per round, then free the reference model")
    r = parser.add_argument_group("iterative rounds: new pairs sampled from the policy")
    r.add_argument("--rounds", type=int, default=0, help="sampling rounds after the DPO pass on --data")
    r.add_argument("--prompts", default=None, help="JSONL prompts for rounds ({messages or prompt, truth?}), "
                                                    "e.g. lab rl_prompts.jsonl")
    r.add_argument("--round_prompts", type=int, default=256, help="prompts sampled per round")
    r.add_argument("--samples", type=int, default=4, help="answers sampled per prompt")
    r.add_argument("--temperature", type=float, default=1.0, help="sampling temperature for rounds (> 0)")
    r.add_argument("--top_k", type=int, default=None)
    r.add_argument("--top_p", type=float, default=None)
    r.add_argument("--max_new_tokens", type=int, default=64, help="answer length limit when sampling")
    r.add_argument("--missing_eos_penalty", type=float, default=common.MISSING_EOS_PENALTY,
                   help=common.MISSING_EOS_HELP + "; such an answer is never the chosen one")
    r.add_argument("--rank_by", default="auto", choices=["auto", "reward", "checker"],
                   help="rank samples by the reward model or the lab checker (auto: reward model if given)")
    r.add_argument("--round_ref", default="previous", choices=["previous", "init"],
                   help="reference of a sampling round: the policy at its start, or the first reference")
    e = parser.add_argument_group("end-of-run evaluation (the same as rlhf_ppo.py's)")
    e.add_argument("--eval_data", default=None, help="lab prompts with truths (eval_qa.jsonl or rl_eval.jsonl)")
    e.add_argument("--sft_model", default=None, help="the baseline to beat (default: --init_from)")
    e.add_argument("--reward_model", default=None, help="reward.py run dir or checkpoint: rounds ranking, win rate")
    e.add_argument("--eval_max_new_tokens", type=int, default=64)
    e.add_argument("--eval_limit", type=int, default=0, help="evaluate only the first N prompts (0 = all)")
    # DPO defaults: a small learning rate (the paper uses 5e-7 on 7B models with batch 64; small
    # models tolerate more), no weight decay (the reference already anchors the policy), 1 epoch.
    parser.set_defaults(lr=5e-6, min_lr=5e-7, warmup_steps=10, max_steps=0, weight_decay=0.0, eval_interval=100,
                        eval_steps=0, save_interval=200, out_dir="out/dpo", batch_size=8)
    common.add_dry_run_args(parser.add_argument_group("--dry_run: memory per GPU before launching anything"))
    args = common.parse_config(parser, argv)
    if not args.init_from:
        common.fail("--init_from is required: the SFT checkpoint / run dir / HF directory DPO starts from")
    if not args.data and args.rounds < 1 and not args.dry_run:
        common.fail("nothing to train on: give --data (preference files), or --rounds N with --prompts")
    if args.rounds > 0 and not args.prompts:
        common.fail("--rounds needs --prompts (the prompts to sample answers for)")
    if args.rounds > 0 and args.temperature <= 0:
        common.fail("--rounds samples several answers per prompt: --temperature must be > 0")
    if args.beta <= 0:
        common.fail(f"--beta must be > 0, got {args.beta}")
    if not 0 <= args.label_smoothing < 0.5:
        common.fail(f"--label_smoothing must be in [0, 0.5), got {args.label_smoothing}")
    if args.loss == "ipo" and args.label_smoothing:
        common.fail("--label_smoothing belongs to the sigmoid (DPO) loss, not IPO")
    if args.rank_by == "auto":
        args.rank_by = "reward" if args.reward_model else "checker"
    if args.rank_by == "reward" and not args.reward_model:
        common.fail("--rank_by reward needs --reward_model")
    return args


# -----------------------------------------------------------------------------
# Losses: pure functions of summed log-probabilities


def dpo_sigmoid_loss(h, beta, label_smoothing=0.0):
    """DPO (Rafailov et al. 2023, eq. 7) and conservative DPO (Mitchell 2023, "A note on DPO with
    noisy preferences"; cDPO). h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l)):

        loss = -(1 - eps) * log sigma(beta * h) - eps * log sigma(-beta * h)

    eps = 0 is DPO. eps > 0 treats each label as flipped with probability eps: the loss is then
    minimal at a finite margin (beta * h = log((1 - eps) / eps)) instead of pushing it to infinity.
    h: (P,) per pair. Returns (P,) losses. At h = 0 the loss is ln 2 for every eps."""
    return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)


def ipo_loss(h, beta):
    """IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
    Preferences", section 5: the sampled IPO loss), with h as in dpo_sigmoid_loss and beta in the
    role of their regularisation strength tau:

        loss = (h - 1 / (2 * beta))^2

    A regression of the log-ratio gap onto a fixed target: unlike DPO, whose loss keeps falling as
    the margin grows (and can drive log pi(y_l) to -infinity on deterministic preferences), IPO stops
    at h = 1/(2 beta). The paper writes h with summed log-probs; TRL and torchtune (after asking the
    authors) average them over each answer's tokens, so that the target gap does not depend on answer
    length: dpo_batch passes per-token means by default (--ipo_average). Returns (P,) losses."""
    return (h - 1 / (2 * beta)) ** 2


def preference_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, loss_type="sigmoid",
                    label_smoothing=0.0):
    """The DPO-family loss on summed log-probs, all (P,) tensors, one entry per (chosen, rejected)
    pair. Returns (losses (P,), chosen_rewards (P,), rejected_rewards (P,)); the implicit rewards
    beta * (log pi - log pi_ref) are detached: they are metrics, not part of the graph."""
    chosen_ratio = policy_chosen - ref_chosen        # log pi(y_w)/pi_ref(y_w)
    rejected_ratio = policy_rejected - ref_rejected  # log pi(y_l)/pi_ref(y_l)
    h = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = dpo_sigmoid_loss(h, beta, label_smoothing)
    elif loss_type == "ipo":
        losses = ipo_loss(h, beta)
    else:
        raise ValueError(f"unknown loss {loss_type!r}")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def step0_loss(loss_type, beta):
    """The loss when policy == reference (h = 0): ln 2 for DPO/cDPO, (1/(2 beta))^2 for IPO."""
    return math.log(2) if loss_type == "sigmoid" else (1 / (2 * beta)) ** 2


# -----------------------------------------------------------------------------
# Sequence log-probabilities: response tokens only, all responses of a batch in one forward


def collate(groups, pad_id):
    """Prompt groups (common.encode_group: "ids" = K prompt+response id lists, "resp_len") -> one
    right-padded batch holding every response of every group, so chosen and rejected go through ONE
    forward (the reference DPO implementation's "concatenated forward": half the kernel launches,
    and under FSDP half the weight gathers).

    Returns x (N, T) inputs = ids[:-1], labels (N, T) = ids[1:] on the response tokens (content and
    the closing <|end|>) and -100 everywhere else (prompt and padding), and the group sizes [K, ...].
    No attention mask: right padding comes after every real token, which causal attention never sees."""
    seqs = [(ids, n) for g in groups for ids, n in zip(g["ids"], g["resp_len"])]
    T = max(len(ids) for ids, _ in seqs) - 1
    x = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), T), -100, dtype=torch.long)
    for i, (ids, n) in enumerate(seqs):
        ids = torch.tensor(ids, dtype=torch.long)
        x[i, :len(ids) - 1] = ids[:-1]
        # position t predicts ids[t+1]; the response is the last n ids, predicted at positions L-1-n .. L-2
        labels[i, len(ids) - 1 - n:len(ids) - 1] = ids[len(ids) - n:]
    return x, labels, [len(g["ids"]) for g in groups]


def pair_index(sizes, device=None):
    """All ranked pairs of the concatenated batch: (chosen idx (P,), rejected idx (P,), weight (P,),
    group of each pair). The weight 1/C(K,2) averages the pairs of a prompt, so every prompt counts
    the same whether it came as a pair or as a ranking (InstructGPT's rule, as in reward.py)."""
    first, second, weight, group = [], [], [], []
    offset = 0
    for g, k in enumerate(sizes):
        pairs = ranked_pairs(k)
        first += [offset + i for i, _ in pairs]
        second += [offset + j for _, j in pairs]
        weight += [1.0 / len(pairs)] * len(pairs)
        group += [g] * len(pairs)
        offset += k
    as_long = dict(dtype=torch.long, device=device)
    return (torch.tensor(first, **as_long), torch.tensor(second, **as_long),
            torch.tensor(weight, dtype=torch.float32, device=device), group)


def batch_logps(model, groups, pad_id, device, ctx):
    """Summed response log-probs of every sequence of the batch (N,), one forward. Runs the model
    it is given as it is (call it under no_grad for the reference)."""
    x, labels, sizes = collate(groups, pad_id)
    with ctx:
        logits, _ = model(x.to(device))
    return sequence_logps(logits, labels.to(device)), sizes


@torch.no_grad()
def reference_logps(model, groups, batch_size, pad_id, info, ctx):
    """Summed log-probs of every response of every group under `model` (the reference), computed
    once: a list of K-lists of floats, the same on every rank. Batches are sorted by length and
    dealt out to the ranks; every rank runs the same number of forwards (FSDP gathers collectively)."""
    order = sorted(range(len(groups)), key=lambda i: max(len(s) for s in groups[i]["ids"]))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    mine = {}
    with common.eval_mode(model):
        for j in range(math.ceil(len(batches) / info.world_size)):
            k = j * info.world_size + info.rank
            batch = batches[k if k < len(batches) else 0]
            logps, sizes = batch_logps(model, [groups[i] for i in batch], pad_id, info.device, ctx)
            if k < len(batches):
                flat, o = logps.tolist(), 0
                for i, n in zip(batch, sizes):
                    mine[i], o = flat[o:o + n], o + n
    if info.distributed:
        parts = [None] * info.world_size
        dist.all_gather_object(parts, mine)
        mine = {i: v for part in parts for i, v in part.items()}
    return [mine[i] for i in range(len(groups))]


class Reference:
    """The frozen reference pi_ref: a live model (requires_grad False, eval mode, no_grad), or the
    log-probs precomputed with it (then the model is gone from memory), or -- LoRA, lora_off=True --
    the policy itself with its adapters switched off: the frozen base IS the reference, so no
    second copy of the model is held (lora.lora_disabled)."""

    def __init__(self, model=None, pad_id=0, device="cpu", ctx=None, lora_off=False):
        self.model, self.pad_id, self.device, self.ctx, self.lora_off = model, pad_id, device, ctx, lora_off
        if model is not None and not lora_off:
            model.requires_grad_(False)
            model.eval()

    @torch.no_grad()
    def logps(self, groups):
        """(N,) reference log-probs of the batch's sequences, in collate order."""
        if self.model is None:
            return torch.tensor([v for g in groups for v in g["ref_logps"]], device=self.device)
        if self.lora_off:
            with common.eval_mode(self.model), lora_disabled(common.unwrap(self.model)):
                return batch_logps(self.model, groups, self.pad_id, self.device, self.ctx)[0].detach()
        return batch_logps(self.model, groups, self.pad_id, self.device, self.ctx)[0].detach()


def dpo_batch(model, ref, groups, args, pad_id, device, ctx):
    """The loss of one micro-batch, and its per-pair statistics (detached, float64 on cpu):
    a (P, 6) tensor of [loss, reward_chosen, reward_rejected, logp_chosen, logp_rejected, weight]
    plus each pair's group index. (With averaged IPO, log-probs and rewards are per-token means.)"""
    logps, sizes = batch_logps(model, groups, pad_id, device, ctx)
    ref_logps = ref.logps(groups)
    n = torch.tensor([k for g in groups for k in g["resp_len"]], dtype=logps.dtype, device=logps.device)
    # RPO (Pang et al. 2024): DPO can win its margin by pushing the rejected answer's late tokens down while
    # the chosen one gets no likelier (the lab's said-twice habit survives so); the chosen's NLL pulls it up.
    best = torch.tensor([sum(sizes[:i]) for i in range(len(sizes))], device=logps.device)
    nll = -(logps[best] / n[best]).mean()
    if args.loss == "ipo" and args.ipo_average:   # per-token means (see ipo_loss); resp_len = the labelled tokens
        logps, ref_logps = logps / n, ref_logps / n
    c, r, w, group = pair_index(sizes, device)
    losses, rew_c, rew_r = preference_loss(logps[c], logps[r], ref_logps[c], ref_logps[r], args.beta, args.loss,
                                           args.label_smoothing)
    loss = (losses * w).sum() / len(groups) + args.nll_coef * nll   # mean over prompts
    stats = torch.stack([losses.detach(), rew_c, rew_r, logps[c].detach(), logps[r].detach(), w], 1)
    return loss, stats.double().cpu(), group


def summarize(stats, kinds=None):
    """Metrics from stacked per-pair stats (see dpo_batch): means over pairs; the loss as the mean
    over prompts; accuracy = P(margin > 0) with ties 1/2 (at step 0 every margin is exactly 0)."""
    if stats.numel() == 0:
        return {}
    margin = stats[:, 1] - stats[:, 2]
    correct = (margin > 0).double() + 0.5 * (margin == 0).double()
    logp_gap = stats[:, 3] - stats[:, 4]
    logp_correct = (logp_gap > 0).double() + 0.5 * (logp_gap == 0).double()
    out = {"loss": ((stats[:, 0] * stats[:, 5]).sum() / stats[:, 5].sum()).item(),
           "accuracy": correct.mean().item(), "margin": margin.mean().item(),
           "reward_chosen": stats[:, 1].mean().item(), "reward_rejected": stats[:, 2].mean().item(),
           "logp_chosen": stats[:, 3].mean().item(), "logp_rejected": stats[:, 4].mean().item(),
           "logp_accuracy": logp_correct.mean().item(),
           "pairs": int(stats.size(0))}
    if kinds is not None and any(k is not None for k in kinds):
        by, by_logp = {}, {}
        for k, ok, lp_ok in zip(kinds, correct.tolist(), logp_correct.tolist()):
            by.setdefault(str(k), []).append(ok)
            by_logp.setdefault(str(k), []).append(lp_ok)
        out["accuracy_by_kind"] = {k: sum(v) / len(v) for k, v in sorted(by.items())}
        out["logp_accuracy_by_kind"] = {k: sum(v) / len(v) for k, v in sorted(by_logp.items())}
    return out


def format_metrics(m):
    """One log line's worth of the metrics summarize() returns."""
    return (f"loss {m['loss']:.4f} | acc {m['accuracy']:.3f} | margin {m['margin']:+.3f} (chosen "
            f"{m['reward_chosen']:+.3f}, rejected {m['reward_rejected']:+.3f}) | logp chosen {m['logp_chosen']:.2f} "
            f"rejected {m['logp_rejected']:.2f}")


@torch.no_grad()
def evaluate(model, ref, groups, args, pad_id, info, ctx):
    """Held-out DPO metrics over `groups` (all their pairs; --eval_steps already chose the subset),
    the same on every rank."""
    order = sorted(range(len(groups)), key=lambda i: max(len(s) for s in groups[i]["ids"]))
    batches = [order[i:i + args.batch_size] for i in range(0, len(order), args.batch_size)]
    rows, kinds = [], []
    with common.eval_mode(model):
        for j in range(math.ceil(len(batches) / info.world_size)):
            k = j * info.world_size + info.rank
            batch = [groups[i] for i in batches[k if k < len(batches) else 0]]
            _, stats, group = dpo_batch(model, ref, batch, args, pad_id, info.device, ctx)
            if k < len(batches):
                rows.append(stats)
                kinds += [batch[g].get("kind") for g in group]
    if info.distributed:
        parts = [None] * info.world_size
        dist.all_gather_object(parts, (rows, kinds))
        rows, kinds = [r for p in parts for r in p[0]], [k for p in parts for k in p[1]]
    return summarize(torch.cat(rows) if rows else torch.zeros(0, 6), kinds)


# -----------------------------------------------------------------------------
# Sampling rounds: new pairs from the policy's own answers


def reward_model(path, tok, device, sharded=None):
    """reward.py's model (eval mode), refused if it was trained with another tokenizer than the policy:
    it would read the policy's token ids as other strings. sharded (FSDP): (info, dtype, shard_size)."""
    rm, meta = common.load_frozen_sharded(path, *sharded, RewardModel, REWARD_KIND, load_reward_model) if sharded \
        else load_reward_model(path, device)
    try:   # another tokenizer would read the policy's token ids as other strings
        common.check_tokenizer(meta, tok)
    except ValueError as e:
        common.fail(f"reward model: {e}")
    return rm


def sample_pairs(policy, tok, prompts, args, rnd, info, reward_fn):
    """One round's data: --samples answers for each of --round_prompts prompts (this rank's share), scored
    by the reward model or the lab checker's graded score, minus --missing_eos_penalty for an answer cut at
    --max_new_tokens. The best FINISHED answer and the worst one of a prompt become a (chosen, rejected) pair
    when their scores differ: a cut answer is never chosen (it would teach stopping mid-sentence); rejected,
    it is rendered without the end marker it never produced. Returns (all ranks' records, in prompt order;
    the round's sampling statistics)."""
    pick = np.random.default_rng([args.seed, 1000 + rnd]).permutation(len(prompts))[:args.round_prompts]
    mine = sorted(pick.tolist())[info.rank::info.world_size]
    convs = [prompts[i]["messages"] for i in mine for _ in range(args.samples)]
    answers, ids = chat.generate_answers(policy, tok, convs, max_new_tokens=args.max_new_tokens,
                                         temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                         seed=args.seed * 7919 + rnd * 101 + info.rank, return_ids=True)
    done = [common.ended(a, tok.stop_ids) for a in ids]
    truths = [prompts[i].get("truth") for i in mine for _ in range(args.samples)]
    if args.rank_by == "checker" and any(t is None for t in truths):
        common.fail(f"{args.prompts}: --rank_by checker needs a 'truth' in every prompt record")
    pad = common.max_across_ranks(len(convs), info.device) - len(convs) if args.parallel == "fsdp" else 0
    # (fsdp: the sharded reward model's forwards are collectives: every rank scores as many, padded)
    rewards = reward_fn(convs + [[{"role": "user", "content": "?"}]] * pad, answers + ["?"] * pad,
                        done + [True] * pad)[:len(convs)] if reward_fn is not None else None   # (penalised already)
    checks = [float(lab.check(a, t)) for a, t in zip(answers, truths) if t is not None]
    scores = rewards if args.rank_by == "reward" else common.penalize_missing_eos(
        [lab.score(a, t) for a, t in zip(answers, truths)], done, args.missing_eos_penalty)
    records, no_signal = [], 0
    for j, i in enumerate(mine):
        span = slice(j * args.samples, (j + 1) * args.samples)
        cand = list(zip(scores[span], answers[span], done[span]))
        worst = min(cand, key=lambda c: c[0])
        best = max((c for c in cand if c[2]), key=lambda c: c[0], default=None)   # finished answers only
        if best is not None and best[0] > worst[0] and best[1] != worst[1]:
            records.append({"index": i, "messages": prompts[i]["messages"], "chosen": best[1], "rejected": worst[1],
                            "ended": [True, worst[2]], "chosen_score": best[0], "rejected_score": worst[0],
                            "kind": f"round{rnd}"})
        else:
            no_signal += 1
    sums = [len(answers), sum(checks), len(checks), sum(rewards or []), len(rewards or []),
            sum(len(a) for a in answers), no_signal, len(done) - sum(done)]
    if info.distributed:
        parts = [None] * info.world_size
        dist.all_gather_object(parts, (records, sums))
        records = sorted((r for p in parts for r in p[0]), key=lambda r: r["index"])
        sums = [sum(p[1][k] for p in parts) for k in range(len(sums))]
    n, hit, n_check, rsum, n_r, chars, no_signal, cut = sums
    stats = {"round": rnd, "prompts": len(pick), "samples": n, "pairs": len(records), "no_signal_prompts": no_signal,
             "cut_at_max_new_tokens": cut, "sample_accuracy": hit / n_check if n_check else None,
             "sample_reward": rsum / n_r if n_r else None, "sample_chars": chars / max(n, 1)}
    return records, stats


ROUND_RE = re.compile(r"^round_(\d{2,})(\.pt)?$")


def finished_rounds(out_dir):
    """Rounds whose end-of-round checkpoint (round_XX.pt, or a round_XX/ DCP directory) is complete."""
    found = set()
    for entry in os.listdir(out_dir) if os.path.isdir(out_dir) else []:
        m = ROUND_RE.match(entry)
        if m and common.checkpoint_path(out_dir, f"round_{m.group(1)}"):
            found.add(int(m.group(1)))
    return sorted(found)


# -----------------------------------------------------------------------------
# End-of-run evaluation: the same numbers rlhf_ppo.py reports for its actor


@torch.no_grad()
def kl_estimate(policy, base, tok, convs, max_new_tokens, seed, ctx, batch_size=32):
    """Monte-Carlo KL(pi || pi_base) per answer: sample y ~ pi (temperature 1, no top-k/p, so the
    samples follow pi exactly), average log pi(y|x) - log pi_base(y|x) over the samples (k1).
    y is exactly the sampled ids: the stop token counts as part of y (the policy chose to stop) --
    whichever it sampled, <|end|> or </s> -- and an answer cut at max_new_tokens has none. The same
    tokens rlhf_ppo.kl_to_model scores, so DPO's and PPO's kl_to_sft are one quantity."""
    answers, ids = chat.generate_answers(policy, tok, convs, max_new_tokens=max_new_tokens, temperature=1.0,
                                         seed=seed, return_ids=True)
    device = next(policy.parameters()).device
    total = 0.0
    for s in range(0, len(convs), batch_size):
        groups = []
        for conv, a in zip(convs[s:s + batch_size], ids[s:s + batch_size]):
            prompt = tok.render_prompt(conv, max_len=policy.config.max_seq_len - max_new_tokens)
            groups.append({"ids": [prompt + a], "resp_len": [len(a)]})
        total += (batch_logps(policy, groups, tok.pad_id, device, ctx)[0]
                  - batch_logps(base, groups, tok.pad_id, device, ctx)[0]).sum().item()
    return total / len(convs)


def final_evaluation(args, policy_path, tok, device, extra):
    """Answer --eval_data with the final policy and the SFT model (greedy), grade both with the lab
    checker and the reward model, and return the metrics.json dict (see the docstring for keys)."""
    records = chat.read_records(args.eval_data)
    records = records[:args.eval_limit] if args.eval_limit > 0 else records
    if any("messages" not in r or "truth" not in r for r in records):
        common.fail(f"{args.eval_data}: every evaluation record needs 'messages' and 'truth' (lab eval_qa / rl_eval)")
    convs = [r["messages"] for r in records]
    sft_path = args.sft_model or args.init_from
    ctx = common.autocast(torch.device(device), common.resolve_dtype(args.dtype, torch.device(device)))
    models = {"dpo": common.load_model(policy_path, device)[0].eval(),
              "sft": common.load_model(sft_path, device)[0].eval()}
    answers, done = {}, {}
    for k, m in models.items():
        answers[k], ids = chat.generate_answers(m, tok, convs, max_new_tokens=args.eval_max_new_tokens, return_ids=True)
        done[k] = [common.ended(a, tok.stop_ids) for a in ids]
    reward_fn, stats = None, None
    if args.reward_model:
        rm = reward_model(args.reward_model, tok, device)
        reward_fn = reward_scorer(rm, tok, device, ctx, args.missing_eos_penalty)
        stats = (rm.reward_mean.item(), rm.reward_std.item())   # reward.py's normalisation statistics
    graded = {k: chat.evaluate_lab(None, tok, records, answers=a) for k, a in answers.items()}
    h2h = chat.head_to_head(answers["dpo"], answers["sft"], records, reward_fn=reward_fn,
                            ended_a=done["dpo"], ended_b=done["sft"])
    kl = kl_estimate(models["dpo"], models["sft"], tok, convs, args.eval_max_new_tokens, args.seed, ctx)
    score = {k: sum(lab.score(a, r["truth"]) for a, r in zip(answers[k], records)) / len(records) for k in answers}
    examples = [{"question": r["messages"][-1]["content"], "sft": s, "dpo": d,
                 "ok_sft": lab.check(s, r["truth"]), "ok_dpo": lab.check(d, r["truth"])}
                for r, s, d in list(zip(records, answers["sft"], answers["dpo"]))[:6]]
    return {"stage": "dpo", "policy": policy_path, "sft_model": sft_path, "reward_model": args.reward_model,
            "eval_data": args.eval_data, "n_eval": len(records),
            "accuracy": graded["dpo"]["accuracy"], "accuracy_sft": graded["sft"]["accuracy"],
            "accuracy_by_kind": graded["dpo"]["by_kind"], "accuracy_by_kind_sft": graded["sft"]["by_kind"],
            "mean_score": score["dpo"], "mean_score_sft": score["sft"],
            "win_rate_checker": h2h["checker"]["win_rate"],
            "win_rate_reward": h2h["reward"]["win_rate"] if h2h["reward"] else None,
            "mean_reward": h2h["reward"]["mean_a"] if h2h["reward"] else None,
            "mean_reward_sft": h2h["reward"]["mean_b"] if h2h["reward"] else None,
            "mean_reward_normalized": (h2h["reward"]["mean_a"] - stats[0]) / stats[1] if stats else None,
            "mean_reward_normalized_sft": (h2h["reward"]["mean_b"] - stats[0]) / stats[1] if stats else None,
            "checker": h2h["checker"], "reward": h2h["reward"], "kl_to_sft": kl, "examples": examples, **extra}


# -----------------------------------------------------------------------------
# Main


def dry_run(args):
    """--dry_run: this script's FSDP step on fake tensors (common.fsdp_dry_run) for --init_from's model (a
    preset name will do): batch_size pairs of max_seq_len tokens, the loss on the second half, through
    dpo_batch; the reference is a frozen second FSDP model, the base under LoRA, or none (--precompute_ref)."""
    config = common.dry_run_config(args.init_from)
    T = args.max_seq_len or config.max_seq_len
    dtype = torch.float32 if args.dtype == "float32" else torch.bfloat16   # GPU training: bf16 unless asked
    groups = [{"ids": [[1] * (T + 1)] * 2, "resp_len": [T // 2] * 2, "ref_logps": [0.0, 0.0]}
              for _ in range(args.batch_size)]

    lora = args.lora_rank > 0 and not args.precompute_ref   # LoRA: the reference is the base under the adapters

    def micro_step(model, ref_model=None):   # autocast is on already (fsdp_dry_run)
        ctx = contextlib.nullcontext()
        ref = Reference(model, 0, "cpu", ctx, lora_off=True) if lora else Reference(ref_model, 0, "cpu", ctx)
        return dpo_batch(model, ref, groups, args, 0, "cpu", ctx)[0]
    measured = common.fsdp_dry_run(lambda: Llama(config), micro_step, args.world_size, dtype, args.grad_accum,
                                   args.activation_checkpointing, args.fsdp_skip_accum_sync,
                                   frozen=None if args.precompute_ref or lora else (lambda: Llama(config)),
                                   shard_size=args.fsdp_shard_size, lora=args)
    common.print_dry_run(measured, args.world_size, args.gpu_mem_gb, common.dry_run_label(
        "dpo", args, dtype, f"{args.batch_size} pairs x {T}, reference "
        + ("precomputed" if args.precompute_ref else "the base, adapters off" if lora else "sharded, frozen")))
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
    # step-0 check tolerances: a precomputed reference ran with other batch shapes; bf16 keeps ~3 digits
    loss_tol, rel_tol = (1e-4, 1e-5) if dtype == torch.float32 else (2e-2, 1e-2)

    # --- the run directory: resume, or refuse to overwrite an earlier run (as sft.py) -------------
    resume_path = common.latest_checkpoint(args.out_dir) if args.resume else None
    done_rounds = finished_rounds(args.out_dir)
    stale_pairs = os.path.isdir(args.out_dir) and any(f.endswith("_pairs.jsonl") for f in os.listdir(args.out_dir))
    if not args.resume and (common.latest_checkpoint(args.out_dir) or done_rounds or stale_pairs
                            or any(common.checkpoint_path(args.out_dir, n) for n in ("best", "final"))):
        common.fail(f"{args.out_dir} already holds checkpoints of a run; pass --resume to continue it, or choose "
                    f"another --out_dir (nothing was changed)")

    # --- policy, tokenizer, prompts and held-out pairs ------------------------------------------
    def wrap(m):
        return common.wrap_model(m, info, args.parallel, dtype, args.compile, args.activation_checkpointing,
                                 args.fsdp_skip_accum_sync, shard_size=args.fsdp_shard_size)

    def load_reference(path):
        """A frozen model: under FSDP sharded like the policy (no gradients, no optimizer; bf16 shards in bf16)."""
        if args.parallel == "fsdp":
            return common.load_frozen_sharded(path, info, dtype, args.fsdp_shard_size)[0]
        return common.load_model(path)[0].to(device).requires_grad_(False)

    # FSDP (without LoRA): built on the meta device, sharded, each rank reading only its own shards
    model, meta, sharded = common.load_start_model(args, info, dtype, wrap)
    tok = tokenizer_for(meta, args)
    seq_len = min(args.max_seq_len or model.config.max_seq_len, model.config.max_seq_len)
    for name in ("max_new_tokens", "eval_max_new_tokens"):   # answers must leave room for the prompt
        if getattr(args, name) > seq_len // 2:
            print0(f"--{name} {getattr(args, name)} leaves too little room for a prompt in a context of {seq_len}; "
                   f"using {seq_len // 2}")
            setattr(args, name, seq_len // 2)
    offline = load_groups(args.data, tok, seq_len, args.seed, "train") if args.data else None
    val_groups = load_groups(args.val_data, tok, seq_len, args.seed, "val") if args.val_data else []
    if not args.val_data and offline and args.val_frac > 0:   # hold out whole PROMPTS (reward.py's split)
        offline, val_groups = split_groups(offline, args.val_frac, args.seed)
    if args.eval_steps > 0 and len(val_groups) > args.eval_steps * args.batch_size * world:
        # a fixed, seeded subset (not the shortest pairs: they would all be of one kind)
        n_keep = args.eval_steps * args.batch_size * world
        keep = np.random.default_rng([args.seed, 8]).permutation(len(val_groups))[:n_keep]
        val_groups = [val_groups[i] for i in sorted(keep)]
        print0(f"val: evaluating a fixed random subset of {len(val_groups)} groups (--eval_steps {args.eval_steps})")
    # round prompts ("messages" ending on a user turn, or a "prompt"); unusable lines skipped with path:line
    prompts = common.load_prompts(args.prompts, tok, seq_len - args.max_new_tokens)[0] if args.rounds > 0 else None
    rounds = ([0] if offline else []) + list(range(1, args.rounds + 1))

    raw = common.unwrap(model) if sharded else model.to(device)
    model = model if sharded else wrap(raw)
    rm_fn = None
    if args.rounds > 0 and args.reward_model:
        rm_fn = reward_scorer(reward_model(args.reward_model, tok, device, (info, dtype, args.fsdp_shard_size)
                                           if args.parallel == "fsdp" else None), tok, device, ctx, args.missing_eos_penalty)
    os.makedirs(args.out_dir, exist_ok=True)
    common.save_config(args, args.out_dir)
    logger = common.JsonlLogger(os.path.join(args.out_dir, "log.jsonl"))
    print0(f"policy: {meta['path']} ({raw.num_params() / 1e6:.2f}M parameters); {args.parallel} x {world} on "
           f"{device}, {dtype}; loss {args.loss}, beta {args.beta}" +
           (f", label smoothing {args.label_smoothing}" if args.label_smoothing else "") +
           (f", RPO nll_coef {args.nll_coef}" if args.nll_coef else "") +
           f"; rounds: {rounds}; tokenizer {tok.path}")

    # --- where to start: a fresh run, inside a round (step checkpoint), or after a finished round --
    start_round, state = rounds[0], None
    step_meta = common.read_checkpoint_meta(resume_path) if resume_path else None
    if done_rounds and (not step_meta or step_meta["data_state"]["round"] <= done_rounds[-1]):
        last = done_rounds[-1]
        common.restore_checkpoint(common.checkpoint_path(args.out_dir, f"round_{last:02d}"), model)
        start_round = next((r for r in rounds if r > last), None)
        global_step = common.read_checkpoint_meta(common.checkpoint_path(args.out_dir, f"round_{last:02d}"))["step"]
        print0(f"resume: round {last} finished; continuing with round {start_round}")
    elif step_meta:
        start_round, state = step_meta["data_state"]["round"], resume_path
        global_step = step_meta["step"]
    else:
        global_step = 0
        if args.resume:
            print0(f"--resume: no checkpoint in {args.out_dir}, starting fresh")
    summary = {"rounds": [], "step0_check": None}
    if os.path.isfile(os.path.join(args.out_dir, "rounds.json")) and args.resume:
        with open(os.path.join(args.out_dir, "rounds.json"), encoding="utf-8") as f:
            summary = json.load(f)

    def ref_path(rnd):
        if rnd == rounds[0] or args.round_ref == "init":
            return args.ref_model or args.init_from
        return common.checkpoint_path(args.out_dir, f"round_{rounds[rounds.index(rnd) - 1]:02d}")

    val_metrics = None
    for rnd in [r for r in rounds if start_round is not None and r >= start_round]:
        resuming = state is not None and rnd == start_round
        # --- this round's pairs: the offline data, or sampled from the policy (saved: resumable) --
        if rnd == 0:
            groups = offline
        else:
            pairs_file = os.path.join(args.out_dir, f"round_{rnd:02d}_pairs.jsonl")
            if not os.path.isfile(pairs_file):
                t0 = time.time()
                with common.gathered(raw, args.fsdp_gather_rollout):   # fsdp: whole while sampling
                    records, stats = sample_pairs(raw, tok, prompts, args, rnd, info, rm_fn)
                if info.is_main:
                    common.atomic_write_jsonl(pairs_file, records)
                common.barrier()
                stats["sample_seconds"] = round(time.time() - t0, 1)
                print0(f"round {rnd}: sampled {stats['samples']} answers for {stats['prompts']} prompts in "
                       f"{stats['sample_seconds']}s: {stats['pairs']} pairs, {stats['no_signal_prompts']} prompts "
                       f"without a preference; accuracy {stats['sample_accuracy']}, reward {stats['sample_reward']}")
                logger.log(event="round_samples", step=global_step, **stats)
                summary["rounds"].append(stats)
                if not records:
                    common.fail(f"round {rnd}: every prompt's samples scored the same: no pairs to learn from")
            groups = load_groups([pairs_file], tok, seq_len, args.seed, f"round {rnd}")

        # --- schedule and optimizer of this round. The optimizer comes before any forward: FSDP2 keeps
        # the root's parameters unsharded after a forward, and AdamW must hold the sharded ones.
        per_step = world * args.grad_accum
        steps_per_epoch = len(epoch_batches(len(groups), args.batch_size, args.seed, 0)) // per_step
        if steps_per_epoch == 0:
            common.fail(f"round {rnd}: {len(groups)} prompt groups make less than one step of {per_step} x "
                        f"{args.batch_size}")
        max_steps = args.max_steps if args.max_steps > 0 else max(1, round(args.epochs * steps_per_epoch))
        optimizer = common.configure_optimizer(model, args.lr, args.weight_decay, (args.beta1, args.beta2), device)
        common.seed_everything(args.seed + rank + 7 * rnd)
        step, best_val = 0, float("inf")
        if resuming:
            st = common.restore_checkpoint(state, model, optimizer, device)
            step, best_val = st["data_state"]["round_step"], st["metrics"].get("best_val_loss", best_val)
            if st["data_state"].get("steps_per_epoch") != steps_per_epoch:
                common.fail(f"{state} was written with {st['data_state'].get('steps_per_epoch')} steps per epoch; this "
                            f"run has {steps_per_epoch}: the data or batch flags changed, resume is not exact")
            print0(f"resumed round {rnd} at step {step} from {state}")
        # --- the reference: frozen live model, or log-probs computed once -----------------------
        same_as_start = not resuming and (args.ref_model is None or rnd != rounds[0]) and \
            (rnd == rounds[0] or args.round_ref == "previous")
        cache = os.path.join(args.out_dir, f"ref_logps_{rnd:02d}.json")
        if args.precompute_ref:
            if resuming and os.path.isfile(cache):
                with open(cache, encoding="utf-8") as f:
                    cached = json.load(f)
                train_ref, val_ref = cached["train"], cached["val"]
            else:
                # The policy before its first update IS the reference: no second model needed.
                src = model if same_as_start else load_reference(ref_path(rnd))
                t0 = time.time()
                train_ref = reference_logps(src, groups, args.batch_size, tok.pad_id, info, ctx)
                val_ref = reference_logps(src, val_groups, args.batch_size, tok.pad_id, info, ctx)
                del src
                if info.is_main:
                    common.atomic_write_json(cache, {"ref": ref_path(rnd), "train": train_ref, "val": val_ref})
                print0(f"round {rnd}: reference log-probs of {len(groups)} + {len(val_groups)} groups precomputed "
                       f"in {time.time() - t0:.1f}s; no reference model in memory from here on")
            for g, v in zip(groups, train_ref):
                g["ref_logps"] = v
            for g, v in zip(val_groups, val_ref):
                g["ref_logps"] = v
            ref = Reference(None, device=device)
        elif args.lora_rank > 0 and args.ref_model is None and (rnd == rounds[0] or args.round_ref == "init"):
            ref = Reference(model, tok.pad_id, device, ctx, lora_off=True)   # the base under the adapters
        else:
            ref = Reference(load_reference(ref_path(rnd)), tok.pad_id, device, ctx)

        round_start = global_step - step
        print0(f"round {rnd}: {len(groups)} prompt groups, {steps_per_epoch} steps per epoch, {max_steps} steps")
        logger.log(event="round_start", round=rnd, step=global_step, groups=len(groups), max_steps=max_steps)

        def checkpoint(name, with_optimizer, metrics=None):
            return common.save_checkpoint(
                args.out_dir, name, model, optimizer if with_optimizer else None, step=round_start + step,
                config=vars(args), tokenizer=tok, metrics={"best_val_loss": best_val, **(metrics or {})},
                data_state={"round": rnd, "round_step": step, "steps_per_epoch": steps_per_epoch, "seed": args.seed},
                background=True)   # FSDP resume checkpoints: written while training goes on

        def run_eval():
            nonlocal best_val, val_metrics
            val_metrics = evaluate(model, ref, val_groups, args, tok.pad_id, info, ctx)
            improved = val_metrics["loss"] < best_val
            best_val = min(best_val, val_metrics["loss"])
            logger.log(event="eval", round=rnd, step=round_start + step, **val_metrics)
            print0(f"eval round {rnd} step {step}: {format_metrics(val_metrics)} | logp acc "
                   f"{val_metrics['logp_accuracy']:.3f}" + (" (best)" if improved else ""))
            if "accuracy_by_kind" in val_metrics:
                print0("  accuracy by kind: " + ", ".join(f"{k} {v:.3f}"
                                                          for k, v in val_metrics["accuracy_by_kind"].items()))
            start = summary.get("pref_logp_chosen_init")
            if start is not None and step > 0 and val_metrics["logp_chosen"] < start - max(1.0, 0.1 * abs(start)):
                msg = (f"the held-out CHOSEN answers' log-prob fell from {start:.2f} to "
                       f"{val_metrics['logp_chosen']:.2f}: DPO is pushing both answers down (the rejected faster); "
                       f"expect odd text -- lower --lr or raise --beta")
                print0("warning: " + msg)
                logger.log(event="alarm", round=rnd, step=round_start + step, message=msg)
            if improved and step > 0:
                checkpoint("best", False, val_metrics)
            return val_metrics

        # --- step 0: policy == reference, so every margin is 0 and the loss is exactly ln 2 ----------
        if step == 0:
            first = [groups[i] for i in epoch_batches(len(groups), args.batch_size, args.seed, 0)[rank]]
            if same_as_start:
                with torch.no_grad(), common.eval_mode(model):
                    _, stats, _ = dpo_batch(model, ref, first, args, tok.pad_id, device, ctx)
                m = summarize(stats)
                expected = step0_loss(args.loss, args.beta)
                max_margin = (stats[:, 1] - stats[:, 2]).abs().max().item()
                # margins are differences of sums of many log-probs: allow rounding relative to their size
                margin_tol = rel_tol * args.beta * stats[:, 3:5].abs().max().item() + 1e-6
                ok = abs(m["loss"] - expected) < loss_tol and max_margin < margin_tol
                check = {"round": rnd, "loss": m["loss"], "expected": expected, "max_abs_margin": max_margin,
                         "margin_tol": margin_tol, "pass": ok}
                print0(f"step-0 check (policy == reference): loss {m['loss']:.6f} vs {expected:.6f} "
                       f"({'ln 2' if args.loss == 'sigmoid' else '(1/(2 beta))^2'}), max |margin| {max_margin:.2e} "
                       f"(tolerance {margin_tol:.1e}): "
                       + ("PASS" if ok else "FAIL (policy and reference log-probs differ: padding, dropout, dtype?)"))
                logger.log(event="step0_check", step=global_step, **check)
                if summary["step0_check"] is None:
                    summary["step0_check"] = check
            else:
                print0("step-0 check skipped: the reference is not the starting policy (--ref_model)")
            if val_groups:
                start_metrics = run_eval()
                for k in ("logp_accuracy", "logp_chosen", "logp_rejected", "logp_accuracy_by_kind"):
                    if k in start_metrics:
                        summary.setdefault(f"pref_{k}_init", start_metrics[k])

        # --- the loop ----------------------------------------------------------------------------
        plan_epoch, plan, t_log, tokens = None, None, time.time(), 0
        sums = []
        # eval mode = no dropout (the default, as TRL and this project's PPO): with dropout the policy is a
        # noisy copy of the reference, margins are not 0 at step 0 and the implicit reward carries the noise.
        # Gradients flow the same; train() vs eval() changes nothing else in these models.
        model.train(args.dropout)
        while step < max_steps:
            epoch, pos = divmod(step, steps_per_epoch)
            if epoch != plan_epoch:   # this rank's micro-batches of the epoch: every world-th one
                plan, plan_epoch = epoch_batches(len(groups), args.batch_size, args.seed, epoch)[rank::world], epoch
            lr = common.lr_at(step, args.lr, args.min_lr, args.warmup_steps, max_steps)
            common.set_lr(optimizer, lr)
            for micro in range(args.grad_accum):
                batch = [groups[i] for i in plan[pos * args.grad_accum + micro]]
                with common.grad_sync(model, micro == args.grad_accum - 1):
                    loss, stats, _ = dpo_batch(model, ref, batch, args, tok.pad_id, device, ctx)
                    (loss / args.grad_accum).backward()
                sums.append(stats)
                tokens += sum(len(s) for g in batch for s in g["ids"])
            grad_norm = common.clip_grad_norm(model, args.grad_clip)
            if math.isfinite(grad_norm):
                optimizer.step()
            else:
                print0(f"warning: round {rnd} step {step + 1}: non-finite gradient norm; update skipped")
            optimizer.zero_grad(set_to_none=True)
            common.shorten_timeout(info, args)   # (after the first step: --step_timeout)
            step += 1
            global_step = round_start + step

            if step % args.log_interval == 0 or step == max_steps:
                stats = torch.cat(sums)
                if info.distributed:
                    parts = [None] * world
                    dist.all_gather_object(parts, stats)
                    stats = torch.cat(parts)
                m = summarize(stats)
                dt = time.time() - t_log
                print0(f"round {rnd} step {step:>5}/{max_steps} | {format_metrics(m)} | lr {lr:.2e} | "
                       f"gnorm {grad_norm:.3f} | {tokens * world / dt:,.0f} tok/s")
                logger.log(round=rnd, step=global_step, round_step=step, lr=lr, grad_norm=grad_norm,
                           tok_per_s=round(tokens * world / dt, 1), **m)
                sums, t_log, tokens = [], time.time(), 0
            if val_groups and args.eval_interval > 0 and (step % args.eval_interval == 0 or step == max_steps):
                run_eval()
            if args.save_interval and step % args.save_interval == 0 and step < max_steps:
                checkpoint(f"step_{global_step:07d}", True)
                common.rotate_checkpoints(args.out_dir, args.keep_last)
        if val_groups and args.eval_interval <= 0:
            run_eval()
        ref = None   # frees a live reference model before the next round loads its own
        # --- the round is done: its policy is the next round's reference ----------------------------
        checkpoint(f"round_{rnd:02d}", False, val_metrics)
        row = next((s for s in summary["rounds"] if s["round"] == rnd), None)
        if row is None:
            row = {"round": rnd, "pairs": len(groups)}
            summary["rounds"].append(row)
        row.update({"steps": max_steps, "end_step": global_step,
                    **({f"val_{k}": v for k, v in val_metrics.items()} if val_metrics else {})})
        if args.eval_data and rnd != rounds[-1] and (info.is_main or args.parallel == "fsdp"):   # fsdp: all ranks
            res = chat.evaluate_lab(raw, tok, args.eval_data, max_new_tokens=args.eval_max_new_tokens,
                                    limit=args.eval_limit or None)
            row["eval_accuracy"] = res["accuracy"]
            print0(f"round {rnd}: lab accuracy {res['accuracy']:.1%} on {res['n']} held-out prompts")
        if info.distributed:   # rank 0's per-round lab accuracy goes to everyone's summary
            obj = [row.get("eval_accuracy")]
            dist.broadcast_object_list(obj, src=0)
            row["eval_accuracy"] = obj[0]
        logger.log(event="round_end", step=global_step, **{k: v for k, v in row.items() if not isinstance(v, dict)})
        if info.is_main:
            common.atomic_write_json(os.path.join(args.out_dir, "rounds.json"), summary)
        common.barrier()
        state = None

    # --- save, then the end-of-run evaluation on rank 0 ---------------------------------------------
    final = common.save_checkpoint(args.out_dir, "final", model, step=global_step, config=vars(args), tokenizer=tok,
                                   metrics=val_metrics or {})
    extra = {"steps": global_step, "beta": args.beta, "loss_type": args.loss, "label_smoothing": args.label_smoothing,
             "ipo_average": args.loss == "ipo" and args.ipo_average, "nll_coef": args.nll_coef,
             **summary, **{f"pref_{k}": v for k, v in (val_metrics or {}).items()}}
    out = None
    if info.is_main:
        if args.eval_data:
            t0 = time.time()
            out = final_evaluation(args, final, tok, device, extra)
            print0(f"end evaluation on {out['n_eval']} prompts ({time.time() - t0:.0f}s): lab accuracy "
                   f"{out['accuracy']:.1%} (SFT {out['accuracy_sft']:.1%}); win rate vs SFT: checker "
                   f"{out['win_rate_checker']:.3f}" + (f", reward model {out['win_rate_reward']:.3f}, mean reward "
                                                      f"{out['mean_reward']:+.3f} (SFT {out['mean_reward_sft']:+.3f})"
                                                      if out["win_rate_reward"] is not None else "")
                   + f"; KL to SFT {out['kl_to_sft']:.3f} nats")
        else:
            out = {"stage": "dpo", "policy": final, **extra}
        common.atomic_write_json(os.path.join(args.out_dir, "metrics.json"), out)
        logger.log(event="end", step=global_step, **{k: v for k, v in out.items() if not isinstance(v, (dict, list))})
    common.barrier()
    print0(f"dpo done: {final}; metrics in {os.path.join(args.out_dir, 'metrics.json')}")
    return out


if __name__ == "__main__":
    main()
