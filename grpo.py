"""
grpo.py -- RL with verifiable rewards: critic-free policy optimisation of the SFT model (GRPO, Dr. GRPO,
RLOO), against the lab's checker, a GSM8K-style numeric match, or a reward.py model.

Usage (single process; CPU or one GPU):
    python grpo.py --init_from runs/sft --prompts lab_data/rl_prompts.jsonl --eval_data lab_data/rl_eval.jsonl \\
        --out_dir runs/grpo --reward checker --group_size 8 --prompts_per_step 8 --max_steps 30
    python grpo.py ... --advantage drgrpo            # Dr. GRPO: no std division, constant loss normaliser
    python grpo.py ... --advantage rloo              # RLOO: leave-one-out baseline
    python grpo.py ... --reward checker model:0.5 --reward_model runs/rm   # a weighted sum of rewards
    python grpo.py ... --reward math --prompts gsm8k_train.jsonl          # real data: "#### N" references
    python grpo.py ... --kl k3_loss --kl_coef 0.04   # DeepSeekMath's KL term in the loss (default: none)
    python grpo.py ... --dynamic_sampling            # DAPO: refill groups whose answers all scored the same
    python grpo.py ... --lora_rank 16 --lr 2e-3      # LoRA: the reference is the policy with its adapters off
Distributed (DDP; every process samples its own prompts and groups, gradients are averaged):
    torchrun --standalone --nproc_per_node=2 grpo.py --init_from runs/sft --prompts ... --reward checker
    torchrun ... grpo.py ... --parallel fsdp   # policy, reference and reward model sharded (common.generate)
Resume an interrupted run (same flags + --resume): policy, optimizer, iteration, history. Prompts,
sampling and minibatch order are pure functions of (seed, iteration, rank, refill round).

Two models, no critic: the policy pi (trained, starts as --init_from) and the reference pi_ref (frozen,
--ref_model, default --init_from; used by the KL term and the KL == 0 check). With --lora_rank the
reference is the policy itself with its adapters switched off: no second copy (common.reference_model).
A reward model is loaded only when --reward names "model".

One iteration (= one "step": --max_steps, --log_interval, --eval_interval, --save_interval count them):
  1. --prompts_per_step prompts; the policy answers each of them --group_size times (temperature, top-p)
  2. every answer gets a scalar reward: the weighted sum of the --reward terms, minus the optional
     penalties (format, missing end-of-turn, DAPO's overlong shaping); with --kl k1_reward minus
     beta * sum_t k1_t as well. Groups whose rewards are all equal are counted (they carry no signal);
     --dynamic_sampling replaces them with fresh prompts (DAPO), up to --max_refill rounds.
  3. advantages from each group alone, no value network (--advantage):
       grpo    A_i = (r_i - mean(r)) / (std(r) + eps)             (Shao et al. 2024, DeepSeekMath)
       drgrpo  A_i =  r_i - mean(r)                               (Liu et al. 2025, "Understanding R1-Zero-
                                                                   Like Training": the std and the length
                                                                   normalisation bias the optimisation)
       rloo    A_i =  r_i - mean_{j != i} r_j                     (Ahmadian et al. 2024, "Back to Basics")
     every token of an answer gets its answer's advantage.
  4. --epochs passes over the batch in minibatches: PPO's clipped ratio against the rollout policy
     (optionally DAPO's clip-higher, --clip_range_high), + beta * k3 with --kl k3_loss, normalised per
     --loss_norm: "seq" (mean over each answer's tokens, then over answers: GRPO), "token" (over all
     tokens of the step: DAPO) or "constant" (sum over tokens / (answers * --max_new_tokens): Dr. GRPO).
     The normaliser is the whole optimizer step's (all micro-batches, all processes), so the gradient
     does not depend on --grad_accum or the number of processes.
Why a group with equal rewards gives exactly zero gradient: its advantages are 0 (set exactly, not
computed as r - mean, which rounds), and every term of the loss is A times something. Other trainers'
"my loss is 0" reports are this: every group all right or all wrong. The log says how many per step.
So step 4 spends no forward or backward pass on those answers (unless the k3 KL term is in the loss):
at the lab size ~70% of the groups are flat, and skipping them cuts the update's time by a third
for the same gradient (the normaliser still counts every answer; rows_with_gradient; bench/grpo.py).

Checked at run time (as rlhf_ppo.py): ratio pi/pi_old == 1 on the first minibatch of every iteration,
and KL(pi || pi_ref) == 0 on the first rollout. Tracked with alarms: the policy's entropy collapsing
(sampling stops exploring: every group becomes zero-variance) and the answer length collapsing or growing.

Run directory: config.json, log.jsonl (per iteration: reward (mean, std), score (task reward, before
penalties and KL), accuracy (checker or math, on the rollout), zero_var_groups, refilled, trained_frac
(the share of answers step 4 passed forward and backward), kl (k1 per answer), kl_k3, length, eos_frac,
entropy (the rollout policy's, over every answer), clipfrac and approx_kl (over the answers trained on),
ratio_dev, policy_loss, time_gen / time_train; and "eval" / "alarm" / "samples" / "end" events),
step_XXXXXXX.pt (resume), final.pt (the policy: a normal LM checkpoint), metrics.json (the keys
rlhf_ppo.py and dpo.py report where they apply: accuracy, accuracy_sft, accuracy_by_kind(_sft),
mean_score(_sft), win_rate_checker, checker, kl_to_sft, examples, n_eval, stage "grpo", steps, invariants,
alarms, train, weights_in_sync).

Simplifications on purpose: no critic, so no GAE: an answer's advantage is one number for all its tokens; the
policy is the rollout policy at the start of every iteration (pi_old is recomputed, not kept from
generate, so padding and positions are the training forward's).
"""
import argparse
import math
import os
import re
import time
import unicodedata

import numpy as np
import torch
import torch.distributed as dist

import chat
import common
from common import (check_kl_at_start, check_ratio, ended, kl_estimates, kl_to_model,  # RL helpers
                    load_prompts, masked_mean, pad_rollout, print0, response_logprobs, weights_in_sync)
from data import lab
from data.formats import parse_weighted
from model import Llama

REWARDS = ("checker", "math", "model")

# -----------------------------------------------------------------------------
# Config


def get_args(argv=None):
    parser = argparse.ArgumentParser(description="GRPO / Dr. GRPO / RLOO with verifiable rewards (see the docstring).",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common.add_common_args(parser)
    r = parser.add_argument_group("grpo: rollouts")
    r.add_argument("--prompts", default=None,
                   help="JSONL prompts ({messages or prompt} + truth for the checker, a '#### N' answer for math)")
    r.add_argument("--ref_model", default=None, help="reference model (default: --init_from, the SFT model)")
    r.add_argument("--prompts_per_step", type=int, default=8, help="prompts per process per iteration")
    r.add_argument("--group_size", type=int, default=8, help="G: answers sampled per prompt (>= 2)")
    r.add_argument("--max_new_tokens", type=int, default=48, help="answer length limit")
    r.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (> 0); log-probs use it too")
    r.add_argument("--top_p", type=float, default=None, help="nucleus sampling (makes the KL estimate meaningless)")
    r.add_argument("--top_k", type=int, default=None, help="(makes the KL estimate meaningless)")
    r.add_argument("--dynamic_sampling", action=argparse.BooleanOptionalAction, default=False,
                   help="DAPO: replace groups whose rewards are all equal with fresh prompts")
    r.add_argument("--max_refill", type=int, default=2, help="dynamic sampling: refill rounds per iteration")
    w = parser.add_argument_group("grpo: rewards")
    w.add_argument("--reward", nargs="+", default=["checker"], metavar="NAME[:WEIGHT]",
                   help="weighted sum of: checker (data.lab.score, 0..1), math (1 if the final number matches "
                        "the '#### N' reference), model (reward.py's model, normalised)")
    w.add_argument("--reward_model", default=None, help="reward.py run dir or checkpoint (for --reward model)")
    w.add_argument("--format_penalty", type=float, default=0.0,
                   help="subtracted when no gradable answer is found (math: no number; checker: wrong language)")
    w.add_argument("--missing_eos_penalty", type=float, default=0.0,   # 0: the verifiers already grade them 0
                   help=common.MISSING_EOS_HELP + "; checker and math also grade such an answer 0")
    w.add_argument("--overlong_buffer", type=int, default=0,
                   help="DAPO overlong shaping: the last N tokens before --max_new_tokens cost up to "
                        "--overlong_penalty")
    w.add_argument("--overlong_penalty", type=float, default=1.0, help="DAPO overlong shaping: the largest penalty")
    o = parser.add_argument_group("grpo: objective")
    o.add_argument("--advantage", default="grpo", choices=["grpo", "drgrpo", "rloo"], help="see the docstring")
    o.add_argument("--loss_norm", default=None, choices=["seq", "token", "constant"],
                   help="default: constant for drgrpo, seq otherwise")
    o.add_argument("--epochs", type=int, default=1, help="passes over each batch")
    o.add_argument("--clip_range", type=float, default=0.2, help="epsilon of the clipped ratio")
    o.add_argument("--clip_range_high", type=float, default=None,
                   help="DAPO clip-higher: upper epsilon (default: --clip_range)")
    o.add_argument("--kl", default="none", choices=["none", "k3_loss", "k1_reward"],
                   help="KL to the reference: none, k3 in the loss (DeepSeekMath), or k1 in the reward")
    o.add_argument("--kl_coef", type=float, default=0.04, help="beta")
    o.add_argument("--adv_eps", type=float, default=1e-4, help="grpo: added to the group std")
    v = parser.add_argument_group("grpo: watching")
    v.add_argument("--sample_interval", type=int, default=10, help="print answers every N iterations (0 = off)")
    v.add_argument("--alarm_window", type=int, default=5, help="alarms compare the last N iterations to the first N")
    e = parser.add_argument_group("evaluation")
    e.add_argument("--eval_data", default=None, help="lab prompts with truths (rl_eval.jsonl or eval_qa.jsonl)")
    e.add_argument("--sft_model", default=None, help="the baseline to beat (default: --init_from)")
    e.add_argument("--eval_max_new_tokens", type=int, default=64)
    e.add_argument("--eval_limit", type=int, default=0, help="end evaluation: only the first N prompts (0 = all)")
    e.add_argument("--eval_sample", type=int, default=64, help="prompts answered by the evaluations during training")
    parser.set_defaults(lr=1e-5, min_lr=1e-6, warmup_steps=2, max_steps=100, weight_decay=0.0, eval_interval=20,
                        log_interval=1, save_interval=50, out_dir="out/grpo", batch_size=16)
    common.add_dry_run_args(parser.add_argument_group("--dry_run: memory per GPU before launching anything"))
    args = common.parse_config(parser, argv)
    if not (args.init_from and (args.prompts or args.dry_run)):
        common.fail("--init_from (SFT model) and --prompts are required")
    args.rewards = [parse_weighted(s) for s in args.reward]
    unknown = [n for n, _ in args.rewards if n not in REWARDS]
    if unknown:
        common.fail(f"--reward {unknown[0]!r}: unknown; choose from {', '.join(REWARDS)} (NAME or NAME:WEIGHT)")
    if any(n == "model" for n, _ in args.rewards) and not args.reward_model:
        common.fail("--reward model needs --reward_model (a reward.py run)")
    if args.temperature <= 0:
        common.fail("--temperature must be > 0: GRPO needs sampled answers and their probabilities")
    if args.group_size < 2:
        common.fail("--group_size must be >= 2: the baseline of an answer is the other answers to its prompt")
    B = args.prompts_per_step * args.group_size
    if B % (args.batch_size * args.grad_accum):
        common.fail(f"--prompts_per_step x --group_size ({B}) must be a multiple of --batch_size x --grad_accum "
                    f"({args.batch_size} x {args.grad_accum})")
    if args.overlong_buffer >= args.max_new_tokens:
        common.fail("--overlong_buffer must be smaller than --max_new_tokens")
    args.loss_norm = args.loss_norm or ("constant" if args.advantage == "drgrpo" else "seq")
    args.clip_range_high = args.clip_range if args.clip_range_high is None else args.clip_range_high
    return args


# -----------------------------------------------------------------------------
# Rewards: functions of one answer string and its prompt record. An answer cut at the length limit
# (no end-of-turn token) is graded 0 by the verifiers: its last number may be a half-written step.

_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")


def parse_number(text):
    """'1,234' -> 1234.0, '-3.50' -> -3.5; None if not a number. Full-width digits (Chinese text:
    '１８') are mapped to ASCII first (NFKC). Chinese numerals ('十八') are not parsed."""
    m = _NUMBER.fullmatch(unicodedata.normalize("NFKC", str(text)).strip().replace("$", "").rstrip("."))
    return float(m.group().replace(",", "")) if m else None


def final_number(text):
    """The answer's final number, GSM8K style: the first number after the last '####' if there is
    one, else the last number in the text ('16 - 3 - 4 = 9, 9 * 2 = 18' -> 18). None if none."""
    text = unicodedata.normalize("NFKC", text)
    if "####" in text:
        nums = _NUMBER.findall(text.rsplit("####", 1)[1])
        return float(nums[0].replace(",", "")) if nums else None
    nums = _NUMBER.findall(text)
    return float(nums[-1].replace(",", "")) if nums else None


def math_reference(record):
    """The reference number of a prompt record: GSM8K's 'answer' ('... #### 18'), or a 'reference'
    string / the lab's arithmetic truth. None if the record has none."""
    for key in ("answer", "reference"):
        v = record.get(key)
        if isinstance(v, str) and "####" in v:
            return parse_number(v.rsplit("####", 1)[1])
    truth = record.get("truth")
    if isinstance(truth, dict) and truth.get("type") == "arith":
        return parse_number(truth["answer"])
    return None


def math_reward(answer, record, finished=True):
    """1.0 when the answer's final number equals the reference (to 1e-6), else 0.0."""
    ref, got = math_reference(record), final_number(answer)
    return float(finished and ref is not None and got is not None and abs(got - ref) < 1e-6)


def checker_reward(answer, record, finished=True):
    """The lab checker's graded score (data.lab.score: fact .4, language .25, polite .2, concise .15;
    1.0 exactly when data.lab.check says right)."""
    return lab.score(answer, record["truth"]) if finished else 0.0


def format_ok(answer, record, names):
    """Is there something to grade? math: a number; checker: the question's language (the checker's
    own rule). Only the verifiers in `names` are asked."""
    ok = True
    if "math" in names:
        ok &= final_number(answer) is not None
    if "checker" in names:
        ok &= lab.judge(answer, record["truth"])["language"]
    return ok


def overlong_penalty(length, max_new_tokens, buffer, penalty):
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13): 0 up to max - buffer tokens, then
    linear down to -penalty at the limit. Returns the (non-negative) amount to subtract."""
    if buffer <= 0:
        return 0.0
    return penalty * min(max(length - (max_new_tokens - buffer), 0) / buffer, 1.0)


def usable_record(names):
    """The check load_prompts applies to each prompt line: None, or why a verifier cannot grade it."""
    def why_not(r):
        if "checker" in names and not isinstance(r.get("truth"), dict):
            return "no 'truth' for the checker"
        if "math" in names and math_reference(r) is None:
            return "no numeric reference ('#### N') for --reward math"
        return None
    return why_not


# -----------------------------------------------------------------------------
# Pure functions: advantages and the loss. Rows come in groups: row g * G + i is answer i to prompt g.


def group_advantages(rewards, group_size, method, eps=1e-4):
    """rewards (N * G,) -> advantages (N * G,), one per answer, from its own group only:
        grpo    (r_i - mean) / (std + eps)      Shao et al. 2024 (DeepSeekMath), eq. for outcome supervision;
                                                std with Bessel's correction, as in their code and TRL
        drgrpo   r_i - mean                     Liu et al. 2025 (Dr. GRPO): dividing by std up-weights groups
                                                that are nearly all right or all wrong (a difficulty bias)
        rloo     r_i - mean_{j != i} r_j        Ahmadian et al. 2024 (RLOO): the other answers' mean is an
                 = G / (G - 1) * (r_i - mean)   unbiased baseline (it does not include r_i itself)
    A group whose rewards are all equal gets advantages of exactly 0 (r - mean can round to 1e-17)."""
    r = rewards.double().view(-1, group_size)
    mean = r.mean(1, keepdim=True)
    if method == "grpo":
        adv = (r - mean) / (r.std(1, keepdim=True) + eps)
    elif method == "drgrpo":
        adv = r - mean
    elif method == "rloo":
        adv = r - (r.sum(1, keepdim=True) - r) / (group_size - 1)
    else:
        raise ValueError(f"unknown advantage {method!r}")
    flat = (r == r[:, :1]).all(1, keepdim=True)
    return torch.where(flat, 0.0, adv).view(-1).to(rewards.dtype)


def zero_variance_groups(rewards, group_size):
    """How many groups have all rewards equal (no learning signal)."""
    r = rewards.view(-1, group_size)
    return int((r == r[:, :1]).all(1).sum())


def rows_with_gradient(rows, advantages, kl_in_loss):
    """The rows of a micro-batch worth a forward and backward pass: those with a non-zero advantage (a row
    with A == 0 adds exactly nothing to the gradient), or all of them when the k3 KL term is in the loss.
    Never empty (the forward and the statistics need a row): a micro-batch of flat rows keeps its first
    row, whose zero gradient lets every process join DDP's / FSDP's collectives in step and the
    optimizer step as it would have with all of them."""
    if kl_in_loss:
        return rows
    keep = rows[(advantages[rows.to(advantages.device)] != 0).cpu()]
    return keep if len(keep) else rows[:1]


def token_loss(logp, logp_old, logp_ref, advantages, mask, clip_low, clip_high, kl_coef=0.0):
    """Per-token GRPO loss (B, R), 0 on masked positions. With rho_t = pi(y_t) / pi_old(y_t):
        l_t = max(-A rho_t, -A clip(rho_t, 1 - eps_low, 1 + eps_high))     PPO's clipped surrogate
              + beta * k3_t,  k3_t = pi_ref/pi - log(pi_ref/pi) - 1        DeepSeekMath's KL term (>= 0)
    advantages (B,) broadcast over each row's tokens; logp_ref may be None when kl_coef is 0.
    Returns (loss per token, stats) with clipfrac, approx_kl (k3 of pi_old vs pi), ratio_dev and kl (k3 to ref)."""
    m = mask.bool()
    log_ratio = torch.where(m, logp - logp_old, 0.0)
    ratio = log_ratio.exp()
    A = advantages[:, None]
    unclipped, clipped = -A * ratio, -A * ratio.clamp(1 - clip_low, 1 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    stats = {}
    if kl_coef:
        x = torch.where(m, logp_ref - logp, 0.0)
        k3 = torch.expm1(x) - x
        loss = loss + kl_coef * k3
        stats["kl"] = masked_mean(k3.detach(), mask)
    with torch.no_grad():
        stats.update(clipfrac=masked_mean((clipped > unclipped).float(), mask),
                     approx_kl=masked_mean(torch.expm1(log_ratio.double()) - log_ratio.double(), mask),
                     ratio_dev=torch.where(m, (ratio - 1).abs(), 0.0).max())
    return torch.where(m, loss, 0.0), stats


def aggregate(loss_t, mask, mode, denom):
    """Sum of a minibatch's share of the step's loss: seq -> sum over answers of (mean over the answer's
    tokens); token and constant -> sum over all tokens. Divided by `denom`, the WHOLE step's count
    (answers for seq, tokens for token, answers * max_new_tokens for constant; see step_denominator)."""
    if mode == "seq":
        return (loss_t.sum(1) / mask.sum(1).clamp(min=1)).sum() / denom
    return loss_t.sum() / denom


def step_denominator(masks, mode, max_new_tokens, world=1, distributed=False):
    """The loss normaliser of one optimizer step from the masks of its micro-batches on this process.
    DDP averages gradients over the processes, so each process divides by (global count / world):
    the step's gradient is then the gradient of the global mean, however the rows were split."""
    rows = sum(m.size(0) for m in masks)
    if mode == "seq":
        return float(rows)
    if mode == "constant":
        return float(rows * max_new_tokens)
    tokens = torch.stack([m.sum() for m in masks]).sum().double().reshape(1)
    if distributed:
        dist.all_reduce(tokens)
        tokens = tokens / world
    return max(tokens.item(), 1.0)


def collapse_alarms(history, window):
    """Alarms from per-iteration statistics (entropy, length): the last `window` iterations against the first.
      entropy_collapse   mean token entropy fell below 1/3 of its start (groups stop disagreeing)
      length_collapse    answers shrank below half their start length
      length_growth      answers grew by > 50% and by > 8 tokens (a verifier does not pay for length)
    Returns [(kind, message)]."""
    if window < 1 or len(history) < 2 * window:
        return []
    avg = lambda rows, k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
    base, now = history[:window], history[-window:]
    out = []
    e0, e1 = avg(base, "entropy"), avg(now, "entropy")
    if e1 < e0 / 3:
        out.append(("entropy_collapse", f"token entropy {e0:.3f} -> {e1:.3f} nats"))
    l0, l1 = avg(base, "length"), avg(now, "length")
    if l1 < 0.5 * l0:
        out.append(("length_collapse", f"mean answer length {l0:.1f} -> {l1:.1f} tokens"))
    if l1 > 1.5 * l0 and l1 - l0 > 8:
        out.append(("length_growth", f"mean answer length {l0:.1f} -> {l1:.1f} tokens"))
    return out


# -----------------------------------------------------------------------------
# Rollouts and rewards of one iteration


class Scorer:
    """Rewards of a batch of answers: the weighted sum of the --reward terms and the penalties.
    Returns per answer: reward (what the advantages see, before KL), score (the task terms only) and
    ok (the verifier's right/wrong, for the accuracy log; None without a verifier)."""

    def __init__(self, args, tok, rm, device, ctx):
        self.args, self.tok, self.rm, self.device, self.ctx = args, tok, rm, device, ctx
        self.names = {n for n, _ in args.rewards}

    @torch.no_grad()
    def __call__(self, records, prompts, responses):
        a, stop = self.args, self.tok.stop_ids
        answers = [self.tok.decode(chat.strip_stop(r, stop)) for r in responses]
        done = [ended(r, stop) for r in responses]   # common.ended: the one truncation rule of every stage
        model_scores = None
        if "model" in self.names:   # the rollout layout: the reward model reads the answer's last real token
            idx, attn, resp, P = pad_rollout(prompts, responses, self.tok.pad_id, stop)
            resp = torch.cat([torch.zeros_like(attn[:, :P]), resp.long()], 1)   # (an implicit reward model's sum)
            with self.ctx:   # a micro-batch at a time, as step 3
                raw = common.by_row_chunks(lambda i, m, r: self.rm(i, m, response_mask=r), self.args.batch_size,
                                           idx.to(self.device), attn.to(self.device), resp.to(self.device))
                model_scores = self.rm.normalize(raw.float()).tolist()
        score, reward, ok = [], [], []
        for k, (ans, rec, end, resp) in enumerate(zip(answers, records, done, responses)):
            terms = {"checker": lambda: checker_reward(ans, rec, end), "math": lambda: math_reward(ans, rec, end),
                     "model": lambda: model_scores[k]}
            s = sum(w * terms[n]() for n, w in a.rewards)
            pen = a.missing_eos_penalty * (not end)   # = common.penalize_missing_eos, with the other penalties
            pen += overlong_penalty(len(resp), a.max_new_tokens, a.overlong_buffer, a.overlong_penalty)
            if a.format_penalty and (self.names & {"checker", "math"}) and not format_ok(ans, rec, self.names):
                pen += a.format_penalty
            score.append(s)
            reward.append(s - pen)
            if "checker" in self.names:
                ok.append(end and lab.check(ans, rec["truth"]))
            elif "math" in self.names:
                ok.append(bool(math_reward(ans, rec, end)))
            else:
                ok.append(None)
        return answers, torch.tensor(reward, dtype=torch.float64), torch.tensor(score, dtype=torch.float64), ok


def sample_groups(actor, records, prompt_ids, args, it, rank, rnd, n_prompts, ctx, device, tok):
    """n_prompts prompts (a pure function of seed, iteration, rank, round), each answered G times."""
    pick = np.random.default_rng([args.seed, it, rank, rnd]).choice(
        len(records), size=n_prompts, replace=len(records) < n_prompts)
    prompts = [prompt_ids[i] for i in pick for _ in range(args.group_size)]
    gen = torch.Generator(device=device).manual_seed(args.seed * 1_000_003 + it * 1009 + rank * 97 + rnd)
    with ctx, common.gathered(actor, args.fsdp_gather_rollout):   # fsdp: whole for the rollout
        responses = common.generate(actor, prompts, args.max_new_tokens, temperature=args.temperature,
                                    top_k=args.top_k, top_p=args.top_p, eos_id=tok.stop_ids, generator=gen)
    return [int(i) for i in pick for _ in range(args.group_size)], prompts, responses


# -----------------------------------------------------------------------------
# Main


def dry_run(args):
    """--dry_run: this script's FSDP training step on fake tensors (common.fsdp_dry_run) for the model of
    --init_from (a preset name will do): micro-batches of batch_size answers of --max_new_tokens after
    prompts that fill the rest of the context, and the reference as a second FSDP model without
    gradients or optimizer. The rollout is a separate phase, not in the dry run: with
    --fsdp_gather_rollout it adds the whole model in bf16 and the KV cache (printed, closed form)."""
    config = common.dry_run_config(args.init_from)
    T, R, B = config.max_seq_len, args.max_new_tokens, args.batch_size
    dtype = torch.float32 if args.dtype == "float32" else torch.bfloat16   # GPU training: bf16 unless asked

    def micro_step(model, ref):   # autocast is on already (fsdp_dry_run)
        idx = torch.randint(0, config.vocab_size, (B, T))
        attn, mask = torch.ones_like(idx), torch.ones(B, R)
        logp, _ = response_logprobs(model, idx, attn, T - R, args.temperature)
        with torch.no_grad():
            logp_ref, _ = response_logprobs(ref, idx, attn, T - R, args.temperature)
        lt, _ = token_loss(logp, logp.detach(), logp_ref, torch.ones(B), mask, args.clip_range, args.clip_range_high,
                           args.kl_coef)
        return aggregate(lt, mask, args.loss_norm, float(B))
    measured = common.fsdp_dry_run(lambda: Llama(config), micro_step, args.world_size, dtype, args.grad_accum,
                                   args.activation_checkpointing, args.fsdp_skip_accum_sync,
                                   frozen=lambda: Llama(config), shard_size=args.fsdp_shard_size)
    common.print_dry_run(measured, args.world_size, args.gpu_mem_gb, common.dry_run_label(
        "grpo", args, dtype, f"{B} answers x {T} ({R} answer tokens), reference sharded, frozen"))
    n = args.prompts_per_step * args.group_size
    kv = 2 * config.n_layers * n * T * config.n_kv_heads * config.head_dim * 2
    with torch.device("meta"):   # (shapes only)
        whole = 2 * Llama(config).num_params() if args.fsdp_gather_rollout else 0
    print(f"rollout phase (closed form, not in the dry run): KV cache of {n} answers x {T} tokens in bf16 "
          f"{kv / 1e9:.2f} GB" + (f" + the whole model gathered in bf16 {whole / 1e9:.2f} GB" if whole else "")
          + " per rank, next to the sharded weights and AdamW states")
    return {**measured, "rollout_kv_cache": kv, "rollout_gathered": whole}


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
    common.seed_everything(args.seed + rank)
    dtype = common.resolve_dtype(args.dtype, device)
    ctx = common.autocast(device, dtype)
    ratio_tol = 1e-4 if dtype == torch.float32 else 2e-2   # bf16 autocast rounds logits differently per batch shape
    G, B, mbs = args.group_size, args.prompts_per_step * args.group_size, args.batch_size

    # --- the run directory: resume, or refuse to overwrite an earlier run --------------------------
    resume_path = common.latest_checkpoint(args.out_dir) if args.resume else None
    if not args.resume and (common.latest_checkpoint(args.out_dir) or common.checkpoint_path(args.out_dir, "final")):
        common.fail(f"{args.out_dir} already holds checkpoints of a run; pass --resume to continue it, or choose "
                    f"another --out_dir (nothing was changed)")

    # --- models: policy, reference, the reward model if asked for -----------------------------------
    from reward import load_frozen_reward_model, tokenizer_for

    def wrap(m):
        return common.wrap_model(m, info, args.parallel, dtype, args.compile, args.activation_checkpointing,
                                 args.fsdp_skip_accum_sync, shard_size=args.fsdp_shard_size)

    # FSDP: every model built on the meta device and sharded, each rank reading only its own shards
    sharded = args.parallel == "fsdp" and not args.lora_rank
    actor, meta, _ = common.load_start_model(args, info, dtype, wrap)   # --lora_rank: adapters on a frozen base
    tok = tokenizer_for(meta, args)
    if sharded:
        ref = common.load_frozen_sharded(args.ref_model or args.init_from, info, dtype, args.fsdp_shard_size)[0]
    else:   # LoRA: the policy with its adapters off, no second copy
        ref = common.reference_model(actor, args, dtype, device, info, args.parallel)
    rm = None
    if args.reward_model and any(n == "model" for n, _ in args.rewards):
        rm, rm_meta = load_frozen_reward_model(args.reward_model, args, info, dtype)
        try:   # another tokenizer would read the policy's token ids as other strings
            common.check_tokenizer(rm_meta, tok)
        except ValueError as e:
            common.fail(f"reward model: {e}")
    if actor.config.dropout > 0:
        print0("note: dropout is off for GRPO (eval mode): rollout and training must see the same network")
    actor.eval()
    if args.top_k or args.top_p:
        print0("warning: --top_k/--top_p sample from a truncated distribution; the log-probs describe the full one: "
               "the KL numbers are not KL (the ratio check is unaffected)")
    names = {n for n, _ in args.rewards}
    records, prompt_ids = load_prompts(args.prompts, tok, actor.config.max_seq_len - args.max_new_tokens,
                                       check=usable_record(names))
    eval_records = chat.read_records(args.eval_data) if args.eval_data else None
    if eval_records and any("messages" not in r or "truth" not in r for r in eval_records):
        common.fail(f"{args.eval_data}: every evaluation record needs 'messages' and 'truth' (lab rl_eval / eval_qa)")

    raw_actor = common.unwrap(actor)
    if not common.is_fsdp(actor):   # (a sharded start came wrapped)
        actor = wrap(actor.to(device))
    opt = common.configure_optimizer(actor, args.lr, args.weight_decay, (args.beta1, args.beta2), device)
    score_fn = Scorer(args, tok, rm, device, ctx)

    it, history, alarms, last_alarm = 0, [], [], {}
    inv = {"ratio_max_dev": 0.0, "approx_kl_max": 0.0, "ratio_tol": ratio_tol, "ratio_failures": 0,
           "kl_at_start": None, "iterations": 0}
    data_state = {"prompts_per_step": args.prompts_per_step, "group_size": G, "seed": args.seed, "world_size": world}
    if resume_path:
        st = common.restore_checkpoint(resume_path, actor, opt, device)
        it, gs = st["step"], st["grpo_state"]
        history, alarms, inv = gs["history"], gs["alarms"], gs["invariants"]
        if st["data_state"] != data_state:
            common.fail(f"{resume_path} was written with {st['data_state']}; this run differs: resume is not exact")
        print0(f"resumed from {resume_path} at iteration {it}")
    common.save_config(args, args.out_dir)
    logger = common.JsonlLogger(os.path.join(args.out_dir, "log.jsonl"))
    print0(f"policy {meta['path']} ({raw_actor.num_params() / 1e6:.2f}M); reward {' + '.join(args.reward)}; "
           f"advantage {args.advantage}, loss_norm {args.loss_norm}, kl {args.kl}; {args.parallel} x {world} on "
           f"{device}, {dtype}; {len(records)} prompts, {args.prompts_per_step} x {G} answers per process per "
           f"iteration, {args.max_steps} iterations")

    def checkpoint(name, with_optimizer):
        return common.save_checkpoint(
            args.out_dir, name, actor, opt if with_optimizer else None, step=it, config=vars(args), tokenizer=tok,
            metrics=history[-1] if history else {}, data_state=data_state,
            grpo_state={"history": history, "alarms": alarms, "invariants": inv},
            background=with_optimizer)   # FSDP resume checkpoints: written while training goes on

    def run_eval():
        """Greedy answers to the first --eval_sample held-out prompts, graded by the checker (rank 0)."""
        out = [None]
        if info.is_main or args.parallel == "fsdp":   # fsdp: every rank takes part in every forward
            recs = eval_records[:args.eval_sample]
            with common.gathered(raw_actor, args.fsdp_gather_rollout):
                answers = chat.generate_answers(raw_actor, tok, [r["messages"] for r in recs], args.eval_max_new_tokens)
            out[0] = {"accuracy": sum(lab.check(a, r["truth"]) for a, r in zip(answers, recs)) / len(recs),
                      "n": len(recs)}
        if info.distributed:
            dist.broadcast_object_list(out, src=0)
        print0(f"eval iteration {it}: greedy accuracy {out[0]['accuracy']:.3f} on {out[0]['n']} held-out prompts")
        logger.log(event="eval", step=it, **out[0])

    def clock():
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    if it == 0 and eval_records and args.eval_interval > 0:
        run_eval()

    # --- the loop ------------------------------------------------------------------------------------
    while it < args.max_steps:
        t0 = time.perf_counter()
        common.set_lr(opt, common.lr_at(it, args.lr, args.min_lr, args.warmup_steps, args.max_steps))

        # 1-2. groups of answers and their rewards; DAPO's dynamic sampling swaps flat groups for new ones
        pick, prompts, responses = sample_groups(raw_actor, records, prompt_ids, args, it, rank, 0,
                                                 args.prompts_per_step, ctx, device, tok)
        answers, rewards, scores, oks = score_fn([records[i] for i in pick], prompts, responses)
        zero_var, refilled = zero_variance_groups(rewards, G), 0
        for rnd in range(1, args.max_refill + 1 if args.dynamic_sampling else 1):
            flat = [g for g in range(args.prompts_per_step) if zero_variance_groups(rewards[g * G:(g + 1) * G], G)]
            n_flat = torch.tensor([len(flat)], device=device)
            if args.parallel == "fsdp":   # generating and scoring are collectives: all ranks refill, or none
                dist.all_reduce(n_flat, op=dist.ReduceOp.MAX)
            if not n_flat.item():
                break
            # (a rank without flat groups samples one group along and drops it)
            p2, pr2, re2 = sample_groups(raw_actor, records, prompt_ids, args, it, rank, rnd, max(len(flat), 1), ctx,
                                         device, tok)
            a2, r2, s2, o2 = score_fn([records[i] for i in p2], pr2, re2)
            for k, g in enumerate(flat):   # a new group takes the flat one's place only if it has signal
                new = slice(k * G, (k + 1) * G)
                if zero_variance_groups(r2[new], G):
                    continue
                rows = range(g * G, (g + 1) * G)
                for j, src in zip(rows, range(k * G, (k + 1) * G)):
                    pick[j], prompts[j], responses[j] = p2[src], pr2[src], re2[src]
                    answers[j], oks[j] = a2[src], o2[src]
                rewards[g * G:(g + 1) * G], scores[g * G:(g + 1) * G] = r2[new], s2[new]
                refilled += 1
        t1 = clock()

        # 3. experience, no gradients: old and reference log-probs, KL, advantages
        idx, attn, mask, P = (t.to(device) if torch.is_tensor(t) else t
                              for t in pad_rollout(prompts, responses, tok.pad_id, tok.stop_ids))
        # one micro-batch of logits at a time (common.by_row_chunks); the entropy is the sampling policy's,
        # over every answer (step 4 skips some)
        with torch.no_grad(), ctx:
            logp_old, entropy = common.by_row_chunks(
                lambda i, a: response_logprobs(raw_actor, i, a, P, args.temperature, True), mbs, idx, attn)
            logp_ref = common.by_row_chunks(
                lambda i, a: response_logprobs(ref, i, a, P, args.temperature)[0], mbs, idx, attn)
        k1 = torch.where(mask.bool(), kl_estimates(logp_old, logp_ref, "k1"), 0.0).sum(1).double().cpu()
        k3 = torch.where(mask.bool(), kl_estimates(logp_old, logp_ref, "k3"), 0.0).sum(1).double().cpu()
        if it == 0 and inv["kl_at_start"] is None:   # policy == reference: every KL term must be exactly 0
            inv["kl_at_start"] = check_kl_at_start(logp_old, logp_ref, mask,
                                                   (args.ref_model or args.init_from) == args.init_from)
        total = rewards - args.kl_coef * k1 if args.kl == "k1_reward" else rewards
        advantages = group_advantages(total, G, args.advantage, args.adv_eps).float().to(device)
        exp = {"idx": idx, "attn": attn, "mask": mask, "logp_old": logp_old, "logp_ref": logp_ref,
               "advantages": advantages}
        kl_coef = args.kl_coef if args.kl == "k3_loss" else 0.0

        # 4. epochs over minibatches; one optimizer step per batch_size * grad_accum answers
        plan = [order[s:s + mbs * args.grad_accum]
                for epoch in range(args.epochs)
                for order in [torch.from_numpy(np.random.default_rng([args.seed, it, rank, 7, epoch]).permutation(B))]
                for s in range(0, B, mbs * args.grad_accum)]
        sums, n_micro, trained = {}, 0, 0
        for k, step_rows in enumerate(plan):
            micro_rows = step_rows.split(mbs)
            denom = step_denominator([mask[r.to(device)] for r in micro_rows], args.loss_norm, args.max_new_tokens,
                                     world, info.distributed)
            for micro, rows in enumerate(micro_rows):
                rows = rows_with_gradient(rows, advantages, kl_coef > 0)   # (the denominator counted them all)
                trained += len(rows)
                mb = {key: v[rows.to(device)] for key, v in exp.items()}
                with common.grad_sync(actor, micro == len(micro_rows) - 1):
                    with ctx:   # the DDP-wrapped policy: gradients are averaged across processes
                        logp, _ = response_logprobs(actor, mb["idx"], mb["attn"], P, args.temperature)
                    lt, st = token_loss(logp, mb["logp_old"], mb["logp_ref"], mb["advantages"], mb["mask"],
                                        args.clip_range, args.clip_range_high, kl_coef)
                    loss = aggregate(lt, mb["mask"], args.loss_norm, denom)
                    loss.backward()
                if k == 0 and micro == 0:   # nothing has been updated since the rollout: the ratio must be 1
                    sums["ratio_dev"] = check_ratio(inv, st, it)
                for key, v in (("policy_loss", loss), ("clipfrac", st["clipfrac"]), ("approx_kl", st["approx_kl"])):
                    sums[key] = sums.get(key, 0.0) + v.item()
                n_micro += 1
            gn = common.clip_grad_norm(actor, args.grad_clip)
            if math.isfinite(gn):
                opt.step()
            else:
                print0(f"warning: iteration {it}: non-finite gradient norm {gn}; update skipped")
            opt.zero_grad(set_to_none=True)
            common.shorten_timeout(info, args)   # (after the first step: --step_timeout)
        t2 = clock()

        # 5. statistics over all processes; alarms; logs
        checked = [o for o in oks if o is not None]
        local = {"reward": rewards.sum(), "reward_sq": rewards.pow(2).sum(), "score": scores.sum(),
                 "kl": k1.sum(), "kl_k3": k3.sum(), "length": mask.sum(),
                 "eos": sum(ended(r, tok.stop_ids) for r in responses),
                 "checked": len(checked), "correct": sum(checked), "zero_var": zero_var,
                 "zero_var_after": zero_variance_groups(rewards, G), "refilled": refilled,
                 "ratio_dev": sums["ratio_dev"], "entropy": masked_mean(entropy, mask), "trained": trained,
                 **{k: sums[k] / n_micro for k in ("policy_loss", "clipfrac", "approx_kl")}}
        totals = torch.tensor([float(v) for v in local.values()], dtype=torch.float64)
        if info.distributed:
            totals = totals.to(device)
            dist.all_reduce(totals)
        tot, n = dict(zip(local, totals.tolist())), B * world
        row = {"reward": tot["reward"] / n,
               "reward_std": math.sqrt(max(tot["reward_sq"] / n - (tot["reward"] / n) ** 2, 0)),
               "score": tot["score"] / n, "accuracy": tot["correct"] / tot["checked"] if tot["checked"] else None,
               "zero_var_groups": int(tot["zero_var"]), "zero_var_after_refill": int(tot["zero_var_after"]),
               "refilled": int(tot["refilled"]), "groups": args.prompts_per_step * world,
               "flat_frac": tot["zero_var"] / (args.prompts_per_step * world),
               "trained_frac": tot["trained"] / (n * args.epochs),   # answers given a forward + backward pass
               "kl": tot["kl"] / n, "kl_k3": tot["kl_k3"] / n, "length": tot["length"] / n, "eos_frac": tot["eos"] / n,
               **{k: tot[k] / world for k in ("ratio_dev", "policy_loss", "entropy", "clipfrac", "approx_kl")},
               "time_gen": t1 - t0, "time_train": t2 - t1}
        history.append(row)
        inv["iterations"] += 1
        it += 1
        if it % args.log_interval == 0 or it == args.max_steps:
            acc = f" acc {row['accuracy']:.3f} |" if row["accuracy"] is not None else ""
            print0(f"iter {it:>4}/{args.max_steps} | reward {row['reward']:+.3f} (std {row['reward_std']:.3f}) |{acc} "
                   f"flat groups {row['zero_var_groups']}/{row['groups']}"
                   + (f" (refilled {row['refilled']})" if args.dynamic_sampling else "")
                   + f" | KL {row['kl']:.3f} | len {row['length']:.1f} | ent {row['entropy']:.3f} | "
                   f"clip {row['clipfrac']:.3f} | ratio0 {row['ratio_dev']:.1e} | "
                   f"gen {row['time_gen']:.1f}s train {row['time_train']:.1f}s on {row['trained_frac']:.0%}")
        logger.log(step=it, **row)
        rollout = [{"prompt": records[i]["messages"][-1]["content"], "answer": a, "reward": r, "ok": o}
                   for i, a, r, o in zip(pick, answers, rewards.tolist(), oks)]
        for kind, message in collapse_alarms(history, args.alarm_window):
            if it - last_alarm.get(kind, -10 ** 9) >= args.alarm_window:
                last_alarm[kind] = it
                alarms.append({"iteration": it, "kind": kind, "message": message})
                print0(f"ALARM at iteration {it}: {message}. Examples:")
                for e in rollout[:2]:
                    print0(f"    [{e['reward']:+.2f} ok={e['ok']}] {e['prompt']!r} -> {e['answer']!r}")
                logger.log(event="alarm", step=it, kind=kind, message=message, examples=rollout[:2])
        if args.sample_interval and (it % args.sample_interval == 0 or it == 1):
            print0(f"samples at iteration {it} (one group):")
            for e in rollout[:min(G, 4)]:
                print0(f"    [{e['reward']:+.2f} ok={e['ok']}] {e['prompt']!r} -> {e['answer']!r}")
            logger.log(event="samples", step=it, samples=rollout[:G])
        if eval_records and args.eval_interval > 0 and (it % args.eval_interval == 0 or it == args.max_steps):
            run_eval()
        if args.save_interval and it % args.save_interval == 0 and it < args.max_steps:
            checkpoint(f"step_{it:07d}", True)
            common.rotate_checkpoints(args.out_dir, args.keep_last)

    # --- the processes must hold the same policy (DDP averaged every gradient) ---------------------------
    in_sync = weights_in_sync([raw_actor], info)

    final = checkpoint("final", False)
    print0(f"invariants over {inv['iterations']} iterations: max |ratio - 1| on first minibatches "
           f"{inv['ratio_max_dev']:.2e} (tolerance {ratio_tol:g}, {inv['ratio_failures']} failure(s)), "
           f"max approx KL {inv['approx_kl_max']:.2e}")
    w = max(1, min(args.alarm_window, len(history)))
    keys = ("reward", "score", "accuracy", "length", "entropy", "kl", "zero_var_groups")
    mean = lambda rows, k: (sum(r[k] for r in rows if r.get(k) is not None) / len(rows)) if rows else None  # noqa: E731
    out = {"stage": "grpo", "policy": final, "steps": it, "advantage": args.advantage, "loss_norm": args.loss_norm,
           "reward_spec": args.reward, "kl": args.kl, "kl_coef": args.kl_coef, "invariants": inv, "alarms": alarms,
           "weights_in_sync": in_sync,
           "train": {k: {"first": mean(history[:w], k), "last": mean(history[-w:], k)} for k in keys},
           "zero_var_groups_total": sum(r["zero_var_groups"] for r in history),
           "groups_total": sum(r["groups"] for r in history)}
    if info.is_main:
        if eval_records:
            t0 = time.time()
            policy = common.load_model(final, device)[0].eval() if args.parallel == "fsdp" else raw_actor  # whole
            out.update(final_evaluation(args, policy, tok, eval_records, device, ctx))
            print0(f"end evaluation on {out['n_eval']} prompts ({time.time() - t0:.0f}s): lab accuracy "
                   f"{out['accuracy']:.1%} (SFT {out['accuracy_sft']:.1%}); win rate vs SFT (checker) "
                   f"{out['win_rate_checker']:.3f}; KL to SFT {out['kl_to_sft']:.3f} nats")
        common.atomic_write_json(os.path.join(args.out_dir, "metrics.json"), out)
        logger.log(event="end", step=it, **{k: v for k, v in out.items() if not isinstance(v, (dict, list))})
    common.barrier()
    print0(f"grpo done: {final}; metrics in {os.path.join(args.out_dir, 'metrics.json')}")
    return out


def final_evaluation(args, policy, tok, records, device, ctx):
    """The GRPO policy vs the SFT model on held-out lab prompts, greedy, graded by the checker (the keys
    rlhf_ppo.py and dpo.py report), and the KL to SFT per answer."""
    records = records[:args.eval_limit] if args.eval_limit > 0 else records
    convs = [r["messages"] for r in records]
    sft_path = args.sft_model or args.init_from
    models = {"grpo": policy, "sft": common.load_model(sft_path, device)[0].eval()}
    answers = {k: chat.generate_answers(m, tok, convs, max_new_tokens=args.eval_max_new_tokens)
               for k, m in models.items()}
    graded = {k: chat.evaluate_lab(None, tok, records, answers=a) for k, a in answers.items()}
    h2h = chat.head_to_head(answers["grpo"], answers["sft"], records)
    score = {k: sum(lab.score(a, r["truth"]) for a, r in zip(answers[k], records)) / len(records) for k in answers}
    return {"sft_model": sft_path, "eval_data": args.eval_data, "n_eval": len(records),
            "accuracy": graded["grpo"]["accuracy"], "accuracy_sft": graded["sft"]["accuracy"],
            "accuracy_by_kind": graded["grpo"]["by_kind"], "accuracy_by_kind_sft": graded["sft"]["by_kind"],
            "mean_score": score["grpo"], "mean_score_sft": score["sft"],
            "win_rate_checker": h2h["checker"]["win_rate"], "checker": h2h["checker"],
            "kl_to_sft": kl_to_model(policy, models["sft"], tok, convs, args.eval_max_new_tokens, args.seed, ctx),
            "examples": [{"question": r["messages"][-1]["content"], "sft": s, "grpo": p,
                          "ok_sft": lab.check(s, r["truth"]), "ok_grpo": lab.check(p, r["truth"])}
                         for r, s, p in list(zip(records, answers["sft"], answers["grpo"]))[:6]]}


if __name__ == "__main__":
    main()
