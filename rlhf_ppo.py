"""
rlhf_ppo.py -- RLHF step 3 (InstructGPT, DeepSpeed-Chat): improve the SFT model against a frozen reward
model with PPO, held near the SFT model by a per-token KL penalty.

Usage (single process; CPU or one GPU):
    python rlhf_ppo.py --init_from runs/sft --reward_model runs/rm --prompts lab_data/rl_prompts.jsonl \\
        --eval_data lab_data/rl_eval.jsonl --out_dir runs/ppo --max_steps 100 --rollout_batch 32
    python rlhf_ppo.py ... --kl_estimator k3 --adaptive_kl --kl_target 3   # Ziegler et al.'s KL controller
    python rlhf_ppo.py ... --ptx_coef 0.5 --ptx_data lab_data/sft_train.jsonl  # PPO-ptx (InstructGPT)
    python rlhf_ppo.py ... --lora_rank 16 --lr 1e-3   # LoRA actor; reference = actor, adapters off; critic =
                                                      # a value head on the actor (--separate_critic: its own model)
Distributed (DDP; every process samples its own rollouts, gradients are averaged):
    torchrun --standalone --nproc_per_node=2 rlhf_ppo.py --init_from runs/sft --reward_model runs/rm ...
    torchrun ... rlhf_ppo.py ... --parallel fsdp   # all four models sharded, loaded shard by shard (common.generate)
    python rlhf_ppo.py --dry_run --init_from llama1-7b --world_size 8 ...   # memory per GPU of the FSDP step
Resume an interrupted run (same flags + --resume): actor, critic, both optimizers, KL coefficient,
iteration. Prompts, sampling and minibatch order are pure functions of (seed, iteration, rank).

Four models (DeepSpeed-Chat's names):
  actor      the policy pi, trained; starts as the SFT model (--init_from)
  reference  pi_ref, the SFT model, frozen (--ref_model; default --init_from)
  reward     r(x, y), reward.py's model, frozen; scores the whole response at its last token
  critic     V(s_t), trained; a reward model's backbone + head read at EVERY token, in normalised
             reward units (--critic_from, default --reward_model: it already knows a good answer)
With --lora_rank the reference is the actor with its adapters off and the critic a value head on the
actor's backbone (ValueHead; --separate_critic for the model above): one backbone in memory, plus the
reward model.
Memory: the frozen two run under no_grad in eval mode, with bf16 block weights when the run computes in
bf16 (cuda; see frozen()); --offload parks them on the CPU outside the scoring phase (not under FSDP, where
they are sharded, in bf16 shards when the run is bf16). Actor, critic, reference and
reward model are loaded separately, and the script checks that they share no storage.

One iteration (= one "step": --max_steps, --log_interval, --eval_interval, --save_interval count them):
  1. sample --rollout_batch prompts; the actor answers them (model.generate, KV cache, stops at <|end|>)
  2. experience, no gradients: log-probs of the response tokens under the actor ("old") and the
     reference, the reward model's score (an answer cut at --max_new_tokens: read at its last token,
     minus --missing_eos_penalty, common.penalize_missing_eos -- the rule evaluation applies too;
     then normalised with reward.py's mean/std, clipped), the critic's values. Per-token reward
     r_t = -beta * KL_t, plus the score on the last token.
  3. advantages by GAE(gamma, lambda) from rewards and values, whitened over the batch
  4. --ppo_epochs passes over the rollout in minibatches: clipped surrogate loss for the actor
     (+ entropy bonus, + PPO-ptx language-modelling loss), clipped value loss for the critic
Checked at run time: on the first minibatch of every iteration the actor has not changed yet, so the
ratio pi/pi_old must be 1 and the approximate KL 0 (to float tolerance); a mismatch means rollout and
training compute log-probs differently (padding, positions, KV cache, dropout) -- a silent bug that
turns PPO into noise. k3 KL estimates are >= 0. Alarms for reward hacking: reward up while the lab
checker's accuracy goes down, answers getting longer, answers repeating themselves.

Log-probs: all of them (old, new, reference) are log softmax(logits / temperature), the distribution
the tokens were sampled from. With --top_k/--top_p the samples come from a truncated distribution
that these log-probs do not describe: the ratio check still holds, the KL estimate does not.

Run directory: config.json, log.jsonl (one row per iteration: step, reward_raw(_std), reward_norm(_std),
accuracy (checker, on the rollout), kl (k1 per answer), kl_k3, kl_coef, length, eos_frac, repeat_frac,
entropy, clipfrac, approx_kl, ratio_dev, policy_loss, value_loss, vf_clipfrac, explained_var, ptx_loss,
time_gen / time_score / time_train; and "eval" / "alarm" / "samples" / "end" events), step_XXXXXXX.pt
(resume: actor + critic + optimizers), final.pt (the actor only: a normal LM checkpoint for chat.py,
save_hf, dpo.py), metrics.json (what the lab report reads; keys as dpo.py's):
  accuracy, accuracy_sft               lab-checker accuracy of greedy PPO / SFT answers on --eval_data
  accuracy_by_kind, accuracy_by_kind_sft   the same per record kind (task)
  mean_score, mean_score_sft           mean graded lab score (data.lab.score, 0..1)
  win_rate_checker, win_rate_reward    PPO vs SFT per prompt under the checker / the reward model (tie 1/2)
  mean_reward, mean_reward_sft         mean raw reward-model score of the greedy answers
  mean_reward_normalized, mean_reward_normalized_sft   the same after reward.py's normalisation
  checker, reward                      chat.head_to_head's full dicts
  kl_to_sft                            KL(pi || pi_sft) per answer in nats (k1 on temperature-1 samples;
                                       max(1, --eval_samples) per prompt)
  accuracy_sampled, accuracy_sampled_sft, mean_reward_sampled, mean_reward_sampled_sft   with
                                       --eval_samples K: K answers per prompt at --temperature
  examples                             the first 6 prompts: {question, sft, ppo, ok_sft, ok_ppo}
  n_eval, eval_data, policy (final.pt), sft_model, reward_model, stage ("ppo"), steps (iterations)
  kl_coef, kl_coef_init, kl_estimator  the KL coefficient at the end / start
  invariants                           {ratio_max_dev, approx_kl_max, ratio_tol, ratio_failures,
                                        k3_min, kl_at_start, iterations}
  alarms                               every reward-hacking alarm raised ({iteration, kind, message})
  train                                rollout reward (raw, normalised), accuracy, length, repeat_frac,
                                       KL: {"first", "last"} = means over the first / last --alarm_window
  weights_in_sync                      all processes ended with identical actor and critic weights

Simplifications on purpose: the critic is a separate model
(no shared trunk with a value head: nothing shared by accident, at twice the memory) -- except with
--lora_rank, where it is a value head on the actor's backbone (ValueHead: why); advantages are
whitened per process; "best" is not kept (no held-out loss to pick it by; final.pt is the result).
"""
import argparse
import math
import os
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import chat
import common
import sft
from common import (check_kl_at_start, check_ratio, frozen, kl_estimates, kl_to_model, load_prompts,  # RL helpers
                    masked_mean, pad_rollout, print0, response_logprobs, weights_in_sync)
from data import lab
from lora import BaseView
from model import Llama
from reward import REWARD_KIND, RewardModel, load_frozen_reward_model, load_reward_model, reward_scorer, tokenizer_for

# -----------------------------------------------------------------------------
# Config


def get_args(argv=None):
    parser = argparse.ArgumentParser(description="PPO RLHF (see the docstring).",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common.add_common_args(parser)
    m = parser.add_argument_group("ppo: models")
    m.add_argument("--reward_model", default=None, help="reward.py run dir or checkpoint (frozen)")
    m.add_argument("--ref_model", default=None, help="reference model (default: --init_from, the SFT model)")
    m.add_argument("--critic_from", default=None,
                   help="reward checkpoint the critic starts from (default: --reward_model)")
    m.add_argument("--critic_lr", type=float, default=None, help="critic learning rate (default: --lr)")
    m.add_argument("--separate_critic", action=argparse.BooleanOptionalAction, default=False,
                   help="with --lora_rank: the critic as its own model (--critic_from + adapters + head) instead of "
                        "a value head on the actor's backbone (without --lora_rank it is always its own model)")
    m.add_argument("--offload", action=argparse.BooleanOptionalAction, default=False,
                   help="keep the frozen reference and reward model on the CPU except while scoring (saves GPU memory)")
    r = parser.add_argument_group("ppo: rollouts")
    r.add_argument("--prompts", default=None,
                   help="JSONL prompts ({messages or prompt, truth?}), e.g. lab rl_prompts.jsonl")
    r.add_argument("--rollout_batch", type=int, default=32, help="prompts answered per process per iteration")
    r.add_argument("--max_new_tokens", type=int, default=48, help="answer length limit")
    r.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (> 0); log-probs use it too")
    r.add_argument("--top_k", type=int, default=None, help="(makes the KL estimate meaningless, see the docstring)")
    r.add_argument("--top_p", type=float, default=None, help="(makes the KL estimate meaningless, see the docstring)")
    r.add_argument("--missing_eos_penalty", type=float, default=common.MISSING_EOS_PENALTY,
                   help=common.MISSING_EOS_HELP)
    o = parser.add_argument_group("ppo: objective")
    o.add_argument("--kl_coef", type=float, default=0.05,
                   help="beta of the per-token KL penalty (the initial value if adaptive)")
    o.add_argument("--kl_estimator", default="k1", choices=["k1", "k2", "k3"],
                   help="per-token KL estimate in the reward")
    o.add_argument("--adaptive_kl", action=argparse.BooleanOptionalAction, default=False,
                   help="adapt beta toward --kl_target (Ziegler et al. 2019)")
    o.add_argument("--kl_target", type=float, default=6.0, help="adaptive KL: target KL per answer, in nats")
    o.add_argument("--kl_horizon", type=float, default=10000, help="adaptive KL: horizon K (samples)")
    o.add_argument("--reward_clip", type=float, default=5.0, help="clip the normalised score to +-this (0 = off)")
    o.add_argument("--gamma", type=float, default=1.0, help="discount")
    o.add_argument("--lam", type=float, default=0.95, help="GAE lambda")
    o.add_argument("--whiten_advantages", action=argparse.BooleanOptionalAction, default=True)
    o.add_argument("--ppo_epochs", type=int, default=2, help="passes over each rollout")
    o.add_argument("--clip_range", type=float, default=0.2, help="epsilon of the clipped surrogate")
    o.add_argument("--clip_range_value", type=float, default=0.2, help="clip of the value update")
    o.add_argument("--entropy_coef", type=float, default=0.0, help="entropy bonus")
    o.add_argument("--ptx_coef", type=float, default=0.0, help="PPO-ptx: weight of a language-modelling loss")
    o.add_argument("--ptx_data", nargs="+", default=None,
                   help="PPO-ptx data: conversation files / an sft_prepare dir (assistant-only loss), "
                        "or a data/prepare.py dir (plain text)")
    o.add_argument("--ptx_batch_size", type=int, default=None,
                   help="PPO-ptx: rows per language-modelling micro-batch (default: --batch_size). Each row is a "
                        "full context window, so at the lab size the ptx batch costs more than the answers it "
                        "rides with; its own size keeps that cost fixed when --batch_size grows")
    w = parser.add_argument_group("ppo: watching")
    w.add_argument("--sample_interval", type=int, default=10,
                   help="print prompt/response pairs every N iterations (0 = off)")
    w.add_argument("--alarm_window", type=int, default=5,
                   help="reward-hacking alarms compare the last N iterations to the first N")
    e = parser.add_argument_group("evaluation (the same as dpo.py's at the end)")
    e.add_argument("--eval_data", default=None, help="lab prompts with truths (rl_eval.jsonl or eval_qa.jsonl)")
    e.add_argument("--sft_model", default=None, help="the baseline to beat (default: --init_from)")
    e.add_argument("--eval_max_new_tokens", type=int, default=64)
    e.add_argument("--eval_limit", type=int, default=0, help="end evaluation: only the first N prompts (0 = all)")
    e.add_argument("--eval_sample", type=int, default=64, help="prompts answered by the evaluations during training")
    e.add_argument("--eval_samples", type=int, default=0,
                   help="end evaluation: also K sampled answers per prompt at --temperature (0 = greedy only)")
    # PPO defaults: small, slowly decaying learning rates; no weight decay (the KL term anchors the
    # actor); steps are iterations, so warmup and the cosine count iterations too.
    parser.set_defaults(lr=1e-5, min_lr=1e-6, warmup_steps=2, max_steps=100, weight_decay=0.0, eval_interval=20,
                        log_interval=1, save_interval=50, out_dir="out/ppo", batch_size=16)
    common.add_dry_run_args(parser.add_argument_group("--dry_run: memory per GPU before launching anything"))
    args = common.parse_config(parser, argv)
    if not (args.init_from and (args.dry_run or args.reward_model and args.prompts)):
        common.fail("--init_from (SFT model), --reward_model and --prompts are required")
    if args.temperature <= 0:
        common.fail("--temperature must be > 0: PPO needs sampled answers and their probabilities")
    if args.rollout_batch % (args.batch_size * args.grad_accum):
        common.fail(f"--rollout_batch {args.rollout_batch} must be a multiple of --batch_size x --grad_accum "
                    f"({args.batch_size} x {args.grad_accum})")
    if args.ptx_coef > 0 and not args.ptx_data:
        common.fail("--ptx_coef > 0 needs --ptx_data")
    if args.ptx_batch_size is not None and args.ptx_batch_size < 1:
        common.fail(f"--ptx_batch_size {args.ptx_batch_size}: must be >= 1")
    args.ptx_batch_size = args.ptx_batch_size or args.batch_size
    if args.parallel == "fsdp" and args.offload:
        # FSDP2's CPUOffloadPolicy could keep the frozen shards on the CPU, at one host-to-GPU copy per
        # block per forward; with 1/W of each frozen model per GPU that is rarely worth it (never measured)
        common.fail("--parallel fsdp shards the frozen reference and reward model (1/W of each per GPU) instead "
                    "of moving them whole to the CPU: drop --offload")
    return args


# -----------------------------------------------------------------------------
# Pure functions: the equations of PPO-RLHF. Tensors (B, R): one row per answer, one column per
# response token; mask (B, R) is 1 on the answer's tokens (its stop token included: stopping is an
# action), 0 after it. Masked positions may hold anything, even inf: they never reach a result.


def masked_whiten(x, mask, eps=1e-8):
    """(x - mean) / std over the masked entries (PPO's advantage normalisation); 0 elsewhere.
    std is the POPULATION standard deviation (divide by n), on purpose: the whitened entries then have
    mean square exactly 1. TRL divides by n - 1 (Bessel); over a rollout's hundreds of tokens the two
    differ by under 0.2% -- not a behavioural difference, just not bit-identical to TRL."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return torch.where(mask.bool(), (x - mean) * torch.rsqrt(var + eps), 0.0)


def token_rewards(score, kl, mask, kl_coef):
    """InstructGPT's reward as a per-token signal: r_t = -beta * KL_t on every response token, plus
    the reward model's score of the whole answer on its last token. score (B,), kl (B, R) -> (B, R)."""
    rewards = torch.where(mask.bool(), -kl_coef * kl, 0.0)
    last = (mask.sum(1).long() - 1).clamp(min=0)
    rewards[torch.arange(rewards.size(0), device=rewards.device), last] += score
    return rewards


def gae(rewards, values, mask, gamma, lam):
    """Generalised advantage estimation (Schulman et al. 2016), backwards over the tokens:
        delta_t = r_t + gamma * V_{t+1} - V_t        (V after the last token = 0: the answer is over)
        A_t     = delta_t + gamma * lam * A_{t+1}
        returns_t = A_t + V_t                        (the critic's regression target)
    mask must be a prefix (1...1 0...0) per row; rewards and values there are zeroed, so padding
    contributes 0 to every sum. Returns (advantages, returns), both 0 on masked positions."""
    m = mask.bool()
    rewards, values = torch.where(m, rewards, 0.0), torch.where(m, values, 0.0)
    adv = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.size(1))):
        next_value = values[:, t + 1] if t + 1 < rewards.size(1) else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        adv[:, t] = running
    adv = torch.where(m, adv, 0.0)
    return adv, torch.where(m, adv + values, 0.0)


def policy_loss(logp, logp_old, advantages, mask, clip_range):
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), as a loss (mean over response tokens):
        rho_t = exp(log pi(y_t) - log pi_old(y_t))
        L = mean_t max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps))
    Returns (loss, stats): clipfrac (share of tokens on the clipped branch), approx_kl (k3 estimate of
    KL(pi_old || pi), 0 when nothing moved) and ratio_dev = max |rho - 1| (the ratio==1 check)."""
    log_ratio = torch.where(mask.bool(), logp - logp_old, 0.0)
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((clipped > unclipped).float(), mask),
                 "approx_kl": masked_mean(torch.expm1(log_ratio.double()) - log_ratio.double(), mask),
                 "ratio_dev": (ratio - 1).abs().max()}
    return loss, stats


def value_loss(values, values_old, returns, mask, clip_range_value):
    """Clipped value loss (PPO2 / DeepSpeed-Chat): the new value may move at most c from the value
    the rollout saw, or pay the larger of the two errors:
        V_clip = V_old + clip(V - V_old, -c, c)
        L = 1/2 mean_t max((V_t - R_t)^2, (V_clip_t - R_t)^2)
    Returns (loss, stats) with vf_clipfrac, the share of tokens where the clipped error is larger."""
    v_clip = values_old + (values - values_old).clamp(-clip_range_value, clip_range_value)
    err, err_clip = (values - returns) ** 2, (v_clip - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clip), mask)
    return loss, {"vf_clipfrac": masked_mean((err_clip > err).float(), mask).detach()}


def explained_variance(values, returns, mask):
    """1 - Var(returns - values) / Var(returns): 1 = the critic predicts the returns, 0 = no better
    than their mean, < 0 = worse."""
    var = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    diff = returns - values
    var_diff = masked_mean((diff - masked_mean(diff, mask)) ** 2, mask)
    return (1 - var_diff / var).item() if var > 0 else float("nan")


class KLController:
    """beta, fixed or adaptive (Ziegler et al. 2019, "Fine-Tuning Language Models from Human
    Preferences", section 2.2): a proportional controller on the measured KL per answer,
        e = clip(KL / KL_target - 1, -0.2, 0.2),   beta <- beta * (1 + e * n / horizon)
    with n the answers of the batch: beta grows when the policy drifts too far, shrinks when it stays close."""

    def __init__(self, value, target=None, horizon=10000):
        self.value, self.target, self.horizon = float(value), target, horizon

    def update(self, kl, n):
        if self.target is not None:
            error = min(max(kl / self.target - 1, -0.2), 0.2)
            self.value *= 1 + error * n / self.horizon
        return self.value


def mean_of(rows, key):
    """Mean of rows[i][key] over the rows that have it (None if none do)."""
    vals = [r[key] for r in rows if r.get(key) is not None]
    return sum(vals) / len(vals) if vals else None


def hacking_alarms(history, window):
    """Reward-hacking alarms from per-iteration rollout statistics (dicts with reward_norm, accuracy,
    length, repeat_frac): the mean of the last `window` iterations against the first `window`.
      reward_vs_accuracy  the normalised reward rose by > 0.2 while checker accuracy fell by > 0.05
      length              answers grew by > 50% and by > 8 tokens
      repetition          the share of answers repeating a 4-gram rose by > 0.15
    (DeepSpeed-Chat's reported failure: the actor learned to spam tokens the reward model liked.)
    Returns [(kind, message)]."""
    if window < 1 or len(history) < 2 * window:
        return []
    avg = mean_of
    base, now = history[:window], history[-window:]
    out = []
    r0, r1, a0, a1 = avg(base, "reward_norm"), avg(now, "reward_norm"), avg(base, "accuracy"), avg(now, "accuracy")
    if a0 is not None and r1 - r0 > 0.2 and a1 < a0 - 0.05:
        out.append(("reward_vs_accuracy", f"reward {r0:+.3f} -> {r1:+.3f} while checker accuracy {a0:.3f} -> {a1:.3f}"))
    l0, l1 = avg(base, "length"), avg(now, "length")
    if l1 > 1.5 * l0 and l1 - l0 > 8:
        out.append(("length", f"mean answer length {l0:.1f} -> {l1:.1f} tokens"))
    p0, p1 = avg(base, "repeat_frac"), avg(now, "repeat_frac")
    if p1 > p0 + 0.15:
        out.append(("repetition", f"answers repeating a 4-gram {p0:.2f} -> {p1:.2f}"))
    return out


def train_summary(history, window):
    """Rollout statistics averaged over the first and the last `window` iterations (single iterations are noisy)."""
    w = max(1, min(window, len(history)))
    return {k: {"first": mean_of(history[:w], k), "last": mean_of(history[-w:], k)}
            for k in ("reward_raw", "reward_norm", "accuracy", "length", "repeat_frac", "kl")} if history else {}


def repeats(ids, n=4):
    """Does the token list contain some n-gram twice (an answer on a loop)?"""
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    return len(grams) != len(set(grams))


# -----------------------------------------------------------------------------
# Experience: critic values, frozen models, one batch's rollout statistics (the padded rollout layout and
# its log-probs, shared with grpo.py, are common.py's RL helpers)


class ValueHead(nn.Module):
    """The critic of a LoRA run (unless --separate_critic): V(s_t) = w . h_t, a linear head on the
    actor's own final hidden states, adapters on -- no second backbone in memory, as the reference
    (the actor with its adapters off) is no second copy either.

    The value loss does not reach the adapters: the backbone runs under no_grad here, and only w
    learns. TRL's classic PPO (a value head on the shared, LoRA-adapted policy) lets it, with one
    loss pg + vf_coef * vf: the actor's features then serve two objectives, the balance is one more
    knob, and early value errors (the head starts knowing nothing) push the policy. OpenRLHF keeps
    the critic a separate model. Detached, the actor's update is PPO's alone, the critic keeps its
    own learning rate and clip, and the cost is one forward without a backward. The price: a linear
    critic on features it cannot shape -- --separate_critic gives the full one back.

    The head starts at zero with statistics (0, 1): its first guess is V = 0, the mean of the
    normalised scores, for every state (a separate critic starts from the reward model instead)."""

    def __init__(self, actor: nn.Module):
        super().__init__()
        self.config = actor.config
        self._actor = [actor]   # in a list: not a submodule, so the critic's parameters are the head alone
        self.head = nn.Linear(actor.config.dim, 1, bias=False)
        nn.init.zeros_(self.head.weight)
        self.register_buffer("reward_mean", torch.zeros(()))   # critic_values' affine map: the identity
        self.register_buffer("reward_std", torch.ones(()))

    def forward(self, idx, attention_mask=None, per_token=True):   # (B, T) values, as RewardModel(per_token)
        with torch.no_grad():
            h = self._actor[0].hidden_states(idx, attention_mask)
        with torch.autocast(device_type=h.device.type, enabled=False):   # fp32, as reward.py's head
            return F.linear(h.float(), self.head.weight.float()).squeeze(-1)


def critic_values(critic, idx, attn, P):
    """V(s_t) for the state before each answer token (B, R): the critic's head at column P + j - 1, in
    NORMALISED reward units, like the scores it must predict. The head of a critic started from the
    reward model outputs raw rewards; mapping them through the same (r - mean) / std (the critic's own
    copy of reward.py's statistics, a fixed affine map) makes its first guess at the last token exactly
    the normalised score, instead of a value loss of order std^2 on the first iterations."""
    plain = common.unwrap(critic)
    return (critic(idx, attn, per_token=True)[:, P - 1:-1].float() - plain.reward_mean) / plain.reward_std


@torch.no_grad()
def make_experience(actor, ref, rm, critic, prompts, responses, tok, args, kl_coef, ctx, device):
    """Step 2 of the loop: everything PPO needs about a batch of answers, computed once, no gradients.
    actor / critic are the plain (unwrapped) modules here."""
    idx, attn, mask, P = pad_rollout(prompts, responses, tok.pad_id, tok.stop_ids)
    idx, attn, mask = idx.to(device), attn.to(device), mask.to(device)
    resp = torch.cat([torch.zeros_like(attn[:, :P]), mask.long()], 1)   # the answer's columns, full width

    def by_micro_batch(fn):   # one micro-batch of logits in memory at a time (common.by_row_chunks)
        return common.by_row_chunks(fn, args.batch_size, idx, attn, resp)

    with ctx:
        logp_old = by_micro_batch(lambda i, a, r: response_logprobs(actor, i, a, P, args.temperature)[0])
        logp_ref = by_micro_batch(lambda i, a, r: response_logprobs(ref, i, a, P, args.temperature)[0])
        values = by_micro_batch(lambda i, a, r: critic_values(critic, i, a, P))
        # read at each row's last real token (an implicit reward model sums over the answer's tokens)
        raw = by_micro_batch(lambda i, a, r: rm(i, a, response_mask=r)).float()
    # an answer cut at --max_new_tokens: scored without an end marker, minus the penalty -- the one rule
    # evaluation applies too (reward.reward_scorer), so both give the same reward to the same answer
    ended = torch.tensor([common.ended(r, tok.stop_ids) for r in responses], device=device)
    raw = common.penalize_missing_eos(raw, ended, args.missing_eos_penalty)
    norm = rm.normalize(raw)                                      # reward.py's statistics
    score = norm.clamp(-args.reward_clip, args.reward_clip) if args.reward_clip > 0 else norm
    kl = kl_estimates(logp_old, logp_ref, args.kl_estimator)
    rewards = token_rewards(score, kl, mask, kl_coef)
    advantages, returns = gae(rewards, values, mask, args.gamma, args.lam)
    if args.whiten_advantages:
        advantages = masked_whiten(advantages, mask)
    k1, k3 = kl_estimates(logp_old, logp_ref, "k1"), kl_estimates(logp_old, logp_ref, "k3")
    return {"idx": idx, "attn": attn, "mask": mask, "P": P, "logp_old": logp_old, "logp_ref": logp_ref,
            "values": values, "advantages": advantages, "returns": returns, "rewards": rewards,
            "raw": raw, "norm": norm, "score": score, "ended": ended,
            "kl_seq": torch.where(mask.bool(), k1, 0.0).sum(1), "k3_seq": torch.where(mask.bool(), k3, 0.0).sum(1),
            "k3_min": torch.where(mask.bool(), k3, float("inf")).min()}   # over real tokens only


# -----------------------------------------------------------------------------
# Data: prompts, the PPO-ptx batches, scoring answer strings


class PtxData:
    """PPO-ptx (InstructGPT eq. 2, gamma * E_pretrain[log pi]): language-modelling batches mixed into
    the actor's loss. Conversations (any format sft.py reads) get sft.py's assistant-only loss; a
    data/prepare.py directory gives plain windows with a loss on every token. Batches are pure
    functions of (seed, iteration, rank, k): resumable."""

    def __init__(self, specs, tok, seq_len, seed):
        self.tok, self.seq_len, self.seed = tok, seq_len, seed
        self.tokens = self.split = None
        if len(specs) == 1 and os.path.isfile(os.path.join(specs[0], "train.bin")):
            from data.prepare import load_tokens
            self.tokens = load_tokens(specs[0], "train", tok)
        else:
            source, desc, _ = sft.load_source(specs, tok, seed)
            self.split = sft.Split(source, np.arange(len(source)), seq_len + 1)
            print0(f"ptx data: {desc}, {len(self.split)} examples")

    def batch(self, batch_size, *key):
        rng = np.random.default_rng([self.seed, 99, *key])
        if self.tokens is not None:
            return sft.pretrain_batch(self.tokens, batch_size, self.seq_len, rng)
        pick = rng.choice(len(self.split), size=batch_size, replace=len(self.split) < batch_size)
        return sft.collate([self.split.example(int(k)) for k in pick], self.tok.pad_id)




# -----------------------------------------------------------------------------
# Main


def dry_run(args):
    """--dry_run: this script's FSDP training step on fake tensors (common.fsdp_dry_run) for the model of
    --init_from (a preset name will do; reward model and critic take its shape): micro-batches of
    batch_size answers of --max_new_tokens after prompts that fill the rest of the context; the actor's
    clipped surrogate and the critic's value loss, both trained (two AdamW states), the reference and the
    reward model sharded beside them, frozen. The rollout is a separate phase, as in grpo.py --dry_run."""
    config = common.dry_run_config(args.init_from)
    T, R, B = config.max_seq_len, args.max_new_tokens, args.batch_size
    dtype = torch.float32 if args.dtype == "float32" else torch.bfloat16   # GPU training: bf16 unless asked

    def micro_step(actor, critic, ref, rm):   # autocast is on already (fsdp_dry_run)
        idx = torch.randint(0, config.vocab_size, (B, T))
        attn, mask = torch.ones_like(idx), torch.ones(B, R)
        with torch.no_grad():   # the experience phase's frozen forwards (full-length answers: no mask values)
            response_logprobs(ref, idx, attn, T - R, args.temperature)
            rm(idx)
        logp, _ = response_logprobs(actor, idx, attn, T - R, args.temperature)
        policy_loss(logp, logp.detach(), torch.ones(B, R), mask, args.clip_range)[0].backward()
        values = critic_values(critic, idx, attn, T - R)
        return value_loss(values, values.detach(), torch.zeros_like(values), mask, args.clip_range_value)[0]
    measured = common.fsdp_dry_run(lambda: Llama(config), micro_step, args.world_size, dtype, args.grad_accum,
                                   args.activation_checkpointing, args.fsdp_skip_accum_sync,
                                   frozen=[lambda: Llama(config), lambda: RewardModel(config)],
                                   shard_size=args.fsdp_shard_size, trained=[lambda: RewardModel(config)])
    common.print_dry_run(measured, args.world_size, args.gpu_mem_gb, common.dry_run_label(
        "ppo", args, dtype, f"{B} answers x {T} ({R} answer tokens), actor + critic trained, "
                            f"reference + reward model sharded, frozen"))
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
    common.seed_everything(args.seed + rank)   # (every random draw below also has its own explicit seed)
    dtype = common.resolve_dtype(args.dtype, device)
    ctx = common.autocast(device, dtype)
    ratio_tol = 1e-4 if dtype == torch.float32 else 2e-2   # bf16 autocast rounds logits differently per batch shape

    # --- the run directory: resume, or refuse to overwrite an earlier run (as sft.py) -------------
    resume_path = common.latest_checkpoint(args.out_dir) if args.resume else None
    if not args.resume and (common.latest_checkpoint(args.out_dir) or common.checkpoint_path(args.out_dir, "final")):
        common.fail(f"{args.out_dir} already holds checkpoints of a run; pass --resume to continue it, or choose "
                    f"another --out_dir (nothing was changed)")

    # --- the four models ---------------------------------------------------------------------------
    def wrap(m):
        return common.wrap_model(m, info, args.parallel, dtype, args.compile, args.activation_checkpointing,
                                 args.fsdp_skip_accum_sync, shard_size=args.fsdp_shard_size)

    # FSDP (without LoRA): all four built on the meta device and sharded, each rank reading only its
    # shards of each checkpoint (common.load_start_model / load_model_sharded): no whole model on any rank
    sharded = args.parallel == "fsdp" and not args.lora_rank
    actor, meta, _ = common.load_start_model(args, info, dtype, wrap)   # --lora_rank: adapters, not yet wrapped
    tok = tokenizer_for(meta, args)
    if args.lora_rank > 0 and not args.ref_model:
        ref = BaseView(actor)   # LoRA: the reference is the actor with its adapters off, no second copy
    elif sharded:
        ref = common.load_frozen_sharded(args.ref_model or args.init_from, info, dtype, args.fsdp_shard_size)[0]
    else:
        ref = frozen(common.load_model(args.ref_model or args.init_from)[0], dtype, device, info, args.parallel)
    critic_path = common.resolve_checkpoint(args.critic_from or args.reward_model)
    rm, rm_meta = load_frozen_reward_model(args.reward_model, args, info, dtype)
    if args.lora_rank > 0 and not args.separate_critic:
        critic = ValueHead(actor)   # LoRA: a value head on the actor's backbone, no second backbone
    elif sharded and not common.read_checkpoint_meta(critic_path).get("lora"):   # (LoRA: its base read whole)
        critic = common.load_model_sharded(critic_path, info, wrap, RewardModel, kind=REWARD_KIND)[0]
    else:
        critic = load_reward_model(critic_path)[0].as_critic()   # (an implicit reward model: a zero head on it)
        # LoRA: the critic (its own model, started from the reward model) trains adapters and its head
        critic = common.setup_lora(critic, args, critic_path, dtype)
    try:   # another tokenizer would read the actor's token ids as other strings
        common.check_tokenizer(rm_meta, tok)
    except ValueError as e:
        common.fail(f"reward model: {e}")
    if actor.config.dropout > 0 or critic.config.dropout > 0:
        print0("note: dropout is switched off for PPO (actor and critic stay in eval mode): with dropout the "
               "rollout and the training forward would see different networks and the ratio would not start at 1")
    actor.eval()    # eval mode = no dropout; gradients still flow (train() vs eval() changes nothing else here)
    critic.eval()
    # Nothing shared by accident: four separate sets of storage (a critic built as a view of the actor
    # would silently train the actor with the value loss).
    storages = [{getattr(p, "_local_tensor", p).untyped_storage().data_ptr() for p in m.parameters()}
                for m in (actor, critic, ref, rm)]   # (_local_tensor: the shard of a frozen FSDP model)
    if any(storages[i] & storages[j] for i in range(4) for j in range(i + 1, 4)):
        common.fail("actor, critic, reference and reward model share parameter storage")
    stats_ok = not (rm.reward_mean.item() == 0.0 and rm.reward_std.item() == 1.0)
    print0(f"reward normalisation (reward.py): mean {rm.reward_mean.item():+.4f} std {rm.reward_std.item():.4f}"
           + ("" if stats_ok else "  -- warning: default stats (0, 1); was the reward model evaluated?"))
    if args.top_k or args.top_p:
        print0("warning: --top_k/--top_p sample from a truncated distribution; the log-probs (and so the KL "
               "estimate and the KL penalty) describe the full one at this temperature: the KL numbers are "
               "meaningless (the ratio check is unaffected)")
    ctx_len = actor.config.max_seq_len
    records, prompt_ids = load_prompts(args.prompts, tok, ctx_len - args.max_new_tokens)
    eval_records = chat.read_records(args.eval_data) if args.eval_data else None
    if eval_records and any("messages" not in r or "truth" not in r for r in eval_records):
        common.fail(f"{args.eval_data}: every evaluation record needs 'messages' and 'truth' (lab rl_eval / eval_qa)")
    ptx = PtxData(args.ptx_data, tok, ctx_len, args.seed) if args.ptx_coef > 0 else None

    raw_actor, raw_critic = common.unwrap(actor), common.unwrap(critic)
    if not common.is_fsdp(actor):   # (sharded ones came wrapped)
        actor = wrap(actor.to(device))
    if not common.is_fsdp(critic):
        critic = wrap(critic.to(device))
    critic_lr = args.critic_lr or args.lr
    betas = (args.beta1, args.beta2)
    opt_actor = common.configure_optimizer(actor, args.lr, args.weight_decay, betas, device)
    opt_critic = common.configure_optimizer(critic, critic_lr, args.weight_decay, betas, device)
    kl_ctl = KLController(args.kl_coef, args.kl_target if args.adaptive_kl else None, args.kl_horizon)
    if args.offload and device.type == "cuda":
        ref.cpu(), rm.cpu()

    it, history, alarms, last_alarm = 0, [], [], {}
    inv = {"ratio_max_dev": 0.0, "approx_kl_max": 0.0, "ratio_tol": ratio_tol, "ratio_failures": 0,
           "k3_min": float("inf"), "kl_at_start": None, "iterations": 0}
    if resume_path:   # (the critic and its AdamW: sharded like the actor's under FSDP)
        st = common.restore_checkpoint(resume_path, actor, opt_actor, device, also={"critic": (critic, opt_critic)})
        it, ps = st["step"], st["ppo_state"]
        kl_ctl.value, history, alarms, inv = ps["kl_coef"], ps["history"], ps["alarms"], ps["invariants"]
        if st["data_state"] != {"rollout_batch": args.rollout_batch, "seed": args.seed, "world_size": world}:
            common.fail(f"{resume_path} was written with {st['data_state']}; this run differs: resume is not exact")
        print0(f"resumed from {resume_path} at iteration {it}")
    common.save_config(args, args.out_dir)
    logger = common.JsonlLogger(os.path.join(args.out_dir, "log.jsonl"))
    critic_desc = "a value head on the actor's backbone" if isinstance(raw_critic, ValueHead) else \
        f"from {args.critic_from or args.reward_model}"
    print0(f"actor {meta['path']} ({raw_actor.num_params() / 1e6:.2f}M), reward model {rm_meta['path']}, critic "
           f"{critic_desc}; {args.parallel} x {world} on {device}, {dtype}; "
           f"{len(records)} prompts, {args.rollout_batch} answers per process per iteration, "
           f"{args.max_steps} iterations")
    reward_fn = reward_scorer(rm, tok, device, ctx, args.missing_eos_penalty)

    def checkpoint(name, with_optimizer):
        state = {"kl_coef": kl_ctl.value, "history": history, "alarms": alarms, "invariants": inv}
        return common.save_checkpoint(
            args.out_dir, name, actor, opt_actor if with_optimizer else None, step=it, config=vars(args), tokenizer=tok,
            metrics={"kl_coef": kl_ctl.value, **(history[-1] if history else {})}, ppo_state=state,
            data_state={"rollout_batch": args.rollout_batch, "seed": args.seed, "world_size": world},
            also={"critic": (critic, opt_critic)} if with_optimizer else None,
            background=with_optimizer)   # FSDP resume checkpoints: written while training goes on

    def run_eval():
        """Greedy answers to the first --eval_sample held-out prompts: checker accuracy and reward (rank 0)."""
        out = [None]
        if info.is_main or args.parallel == "fsdp":   # fsdp: every rank takes part in every forward
            recs = eval_records[:args.eval_sample]
            with common.gathered(raw_actor, args.fsdp_gather_rollout):
                answers, ids = chat.generate_answers(raw_actor, tok, [r["messages"] for r in recs],
                                                     args.eval_max_new_tokens, return_ids=True)
            rewards = reward_fn([r["messages"] for r in recs], answers, [common.ended(a, tok.stop_ids) for a in ids])
            out[0] = {"accuracy": sum(lab.check(a, r["truth"]) for a, r in zip(answers, recs)) / len(recs),
                      "reward": sum(rewards) / len(rewards), "n": len(recs)}
        if info.distributed:
            dist.broadcast_object_list(out, src=0)
        print0(f"eval iteration {it}: greedy accuracy {out[0]['accuracy']:.3f}, mean reward {out[0]['reward']:+.3f} "
               f"on {out[0]['n']} held-out prompts")
        logger.log(event="eval", step=it, **out[0])

    def clock():   # the time split generation / scoring / training needs finished GPU work
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    if it == 0 and eval_records and args.eval_interval > 0:
        run_eval()

    # --- the loop ------------------------------------------------------------------------------------
    while it < args.max_steps:
        t0 = time.perf_counter()
        frac = common.lr_at(it, args.lr, args.min_lr, args.warmup_steps, args.max_steps) / args.lr
        common.set_lr(opt_actor, args.lr * frac)
        common.set_lr(opt_critic, critic_lr * frac)

        # 1. sample prompts and answer them with the actor (plain module, KV cache, no gradients)
        pick = np.random.default_rng([args.seed, it, rank]).choice(
            len(records), size=args.rollout_batch, replace=len(records) < args.rollout_batch)
        prompts = [prompt_ids[i] for i in pick]
        gen = torch.Generator(device=device).manual_seed(args.seed * 1_000_003 + it * 1009 + rank)
        with ctx, common.gathered(actor, args.fsdp_gather_rollout):   # fsdp: whole for the rollout
            responses = common.generate(actor, prompts, args.max_new_tokens, temperature=args.temperature,
                                        top_k=args.top_k, top_p=args.top_p, eos_id=tok.stop_ids, generator=gen)
        t1 = clock()

        # 2. experience: old/reference log-probs, reward, values, KL-penalised rewards, GAE
        if args.offload and device.type == "cuda":
            ref.to(device), rm.to(device)
        exp = make_experience(raw_actor, ref, rm, raw_critic, prompts, responses, tok, args, kl_ctl.value, ctx, device)
        if args.offload and device.type == "cuda":
            ref.cpu(), rm.cpu()
            torch.cuda.empty_cache()
        if it == 0 and inv["kl_at_start"] is None:   # actor == reference: every KL term must be 0
            inv["kl_at_start"] = check_kl_at_start(exp["logp_old"], exp["logp_ref"], exp["mask"],
                                                   (args.ref_model or args.init_from) == args.init_from)
        inv["k3_min"] = min(inv["k3_min"], exp["k3_min"].item())
        t2 = clock()

        # 3. PPO epochs over minibatches: actor (clipped surrogate, entropy, ptx), critic (clipped value loss).
        # One optimizer step per batch_size * grad_accum answers; every epoch is a fresh shuffle of the rollout.
        mask, B, mbs = exp["mask"], args.rollout_batch, args.batch_size
        per_row = {key: v for key, v in exp.items() if torch.is_tensor(v) and v.dim() > 0 and v.size(0) == B}
        plan = [order[s:s + mbs * args.grad_accum]
                for epoch in range(args.ppo_epochs)
                for order in [torch.from_numpy(np.random.default_rng([args.seed, it, rank, epoch]).permutation(B))]
                for s in range(0, B, mbs * args.grad_accum)]
        sums, n_micro = {}, 0
        for k, step_rows in enumerate(plan):
            for micro, rows in enumerate(step_rows.split(mbs)):
                mb = {key: v[rows.to(device)] for key, v in per_row.items()}
                last = micro == args.grad_accum - 1
                with common.grad_sync(actor, last and ptx is None):
                    with ctx:   # the DDP-wrapped actor: gradients are averaged across processes
                        logp, ent = response_logprobs(actor, mb["idx"], mb["attn"], exp["P"], args.temperature, True)
                    pl, st = policy_loss(logp, mb["logp_old"], mb["advantages"], mb["mask"], args.clip_range)
                    entropy = masked_mean(ent if args.entropy_coef > 0 else ent.detach(), mb["mask"])
                    ((pl - args.entropy_coef * entropy) / args.grad_accum).backward()
                if k == 0 and micro == 0:   # nothing has been updated since the rollout: the ratio must be 1
                    sums["ratio_dev"] = check_ratio(inv, st, it)
                if ptx is not None:   # PPO-ptx: a language-modelling batch through the same (wrapped) actor
                    x, y = ptx.batch(args.ptx_batch_size, it, rank, k, micro)
                    with common.grad_sync(actor, last):
                        with ctx:
                            _, lm_loss = actor(x.to(device), y.to(device))
                        (args.ptx_coef * lm_loss / args.grad_accum).backward()
                    sums["ptx_loss"] = sums.get("ptx_loss", 0.0) + lm_loss.item()
                with common.grad_sync(critic, last):
                    with ctx:
                        values = critic_values(critic, mb["idx"], mb["attn"], exp["P"])
                    vl, vst = value_loss(values, mb["values"], mb["returns"], mb["mask"], args.clip_range_value)
                    (vl / args.grad_accum).backward()
                for key, v in (("policy_loss", pl), ("value_loss", vl), ("entropy", entropy),
                               ("clipfrac", st["clipfrac"]), ("approx_kl", st["approx_kl"]),
                               ("vf_clipfrac", vst["vf_clipfrac"])):
                    sums[key] = sums.get(key, 0.0) + v.item()
                n_micro += 1
            gn_a, gn_c = common.clip_grad_norm(actor, args.grad_clip), common.clip_grad_norm(critic, args.grad_clip)
            if math.isfinite(gn_a) and math.isfinite(gn_c):
                opt_actor.step()
                opt_critic.step()
            else:
                print0(f"warning: iteration {it}: non-finite gradient norm (actor {gn_a}, critic {gn_c}); "
                       f"update skipped")
            opt_actor.zero_grad(set_to_none=True)
            opt_critic.zero_grad(set_to_none=True)
            common.shorten_timeout(info, args)   # (after the first step: --step_timeout)
        t3 = clock()

        # 4. statistics of this iteration, summed over all processes; the KL controller; alarms; logs
        answers = [tok.decode(chat.strip_stop(r, tok.stop_ids)) for r in responses]
        checks = [float(lab.check(a, records[i]["truth"])) for a, i in zip(answers, pick) if "truth" in records[i]]
        losses = ("policy_loss", "value_loss", "entropy", "clipfrac", "approx_kl", "vf_clipfrac", "ptx_loss")
        local = {"raw": exp["raw"].sum(), "raw_sq": exp["raw"].double().pow(2).sum(), "norm": exp["norm"].sum(),
                 "norm_sq": exp["norm"].double().pow(2).sum(), "kl": exp["kl_seq"].sum(), "kl_k3": exp["k3_seq"].sum(),
                 "length": mask.sum(), "eos": exp["ended"].sum(), "checked": len(checks), "correct": sum(checks),
                 "repeats": sum(repeats(chat.strip_stop(r, tok.stop_ids)) for r in responses),
                 "explained_var": explained_variance(exp["values"], exp["returns"], mask),
                 "ratio_dev": sums["ratio_dev"], **{k: sums.get(k, 0.0) / n_micro for k in losses}}
        totals = torch.tensor([float(v) for v in local.values()], dtype=torch.float64)
        if info.distributed:
            totals = totals.to(device)
            dist.all_reduce(totals)
        tot, n = dict(zip(local, totals.tolist())), B * world
        std = lambda key: math.sqrt(max(tot[key + "_sq"] / n - (tot[key] / n) ** 2, 0.0))  # noqa: E731
        row = {"reward_raw": tot["raw"] / n, "reward_raw_std": std("raw"), "reward_norm": tot["norm"] / n,
               "reward_norm_std": std("norm"), "accuracy": tot["correct"] / tot["checked"] if tot["checked"] else None,
               "kl": tot["kl"] / n, "kl_k3": tot["kl_k3"] / n, "kl_coef": kl_ctl.value, "length": tot["length"] / n,
               "eos_frac": tot["eos"] / n, "repeat_frac": tot["repeats"] / n,
               **{k: tot[k] / world for k in ("explained_var", "ratio_dev") + losses},   # means over processes
               "time_gen": t1 - t0, "time_score": t2 - t1, "time_train": t3 - t2}
        if ptx is None:
            row.pop("ptx_loss")
        kl_ctl.update(row["kl"], n)
        history.append(row)
        inv["iterations"] += 1
        it += 1
        if it % args.log_interval == 0 or it == args.max_steps:
            acc = f" acc {row['accuracy']:.3f} |" if row["accuracy"] is not None else ""
            print0(f"iter {it:>4}/{args.max_steps} | reward {row['reward_raw']:+.3f} (norm {row['reward_norm']:+.3f}) |"
                   f"{acc} KL {row['kl']:.3f} beta {row['kl_coef']:.3f} | len {row['length']:.1f} | "
                   f"ent {row['entropy']:.3f} | clip {row['clipfrac']:.3f} | akl {row['approx_kl']:.1e} | "
                   f"vloss {row['value_loss']:.4f} | ev {row['explained_var']:.2f} | ratio0 {row['ratio_dev']:.1e} | "
                   f"gen {row['time_gen']:.1f}s score {row['time_score']:.1f}s train {row['time_train']:.1f}s")
        logger.log(step=it, **row)

        # rank 0's rollout: examples for the alarms and the sample printout
        rollout = [{"prompt": records[i]["messages"][-1]["content"], "answer": a, "reward": r,
                    "ok": lab.check(a, records[i]["truth"]) if "truth" in records[i] else None, "length": len(resp),
                    "repeats": repeats(chat.strip_stop(resp, tok.stop_ids))}
                   for i, a, r, resp in zip(pick, answers, exp["raw"].tolist(), responses)]
        for kind, message in hacking_alarms(history, args.alarm_window):
            if it - last_alarm.get(kind, -10 ** 9) >= args.alarm_window:
                last_alarm[kind] = it
                key = {"reward_vs_accuracy": lambda e: (e["ok"] is False, e["reward"]),
                       "length": lambda e: e["length"], "repetition": lambda e: (e["repeats"], e["reward"])}[kind]
                examples = sorted(rollout, key=key, reverse=True)[:2]
                alarms.append({"iteration": it, "kind": kind, "message": message})
                print0(f"ALARM (possible reward hacking) at iteration {it}: {message}. Examples:")
                for e in examples:
                    print0(f"    [{e['reward']:+.2f} ok={e['ok']}] {e['prompt']!r} -> {e['answer']!r}")
                logger.log(event="alarm", step=it, kind=kind, message=message, examples=examples)
        if args.sample_interval and (it % args.sample_interval == 0 or it == 1):
            print0(f"samples at iteration {it}:")
            for e in rollout[:3]:
                print0(f"    [{e['reward']:+.2f} ok={e['ok']}] {e['prompt']!r} -> {e['answer']!r}")
            logger.log(event="samples", step=it, samples=rollout[:3])
        if eval_records and args.eval_interval > 0 and (it % args.eval_interval == 0 or it == args.max_steps):
            run_eval()
        if args.save_interval and it % args.save_interval == 0 and it < args.max_steps:
            checkpoint(f"step_{it:07d}", True)
            common.rotate_checkpoints(args.out_dir, args.keep_last)

    # --- the processes must hold the same actor (DDP averaged every gradient) ----------------------------
    in_sync = weights_in_sync([raw_actor, raw_critic], info)

    # --- save, then the end-of-run evaluation on rank 0 --------------------------------------------------
    final = checkpoint("final", False)
    fails = inv["ratio_failures"]
    print0(f"invariants over {inv['iterations']} iterations: max |ratio - 1| on first minibatches "
           f"{inv['ratio_max_dev']:.2e} (tolerance {ratio_tol:g}, {fails} failure(s)), max approx KL "
           f"{inv['approx_kl_max']:.2e}, min k3 {inv['k3_min']:.2e}")
    out = {"stage": "ppo", "policy": final, "steps": it, "kl_coef": kl_ctl.value, "kl_coef_init": args.kl_coef,
           "kl_estimator": args.kl_estimator, "invariants": inv, "alarms": alarms, "weights_in_sync": in_sync,
           "train": train_summary(history, args.alarm_window)}
    if info.is_main:
        if eval_records:
            t0 = time.time()
            if args.parallel == "fsdp":   # rank 0 alone: the saved actor and reward model, whole
                raw_actor = common.load_model(final, device)[0].eval()
                rm = load_reward_model(args.reward_model, device)[0]
                reward_fn = reward_scorer(rm, tok, device, ctx, args.missing_eos_penalty)
            out.update(final_evaluation(args, raw_actor, rm, reward_fn, tok, eval_records, device, ctx))
            print0(f"end evaluation on {out['n_eval']} prompts ({time.time() - t0:.0f}s): lab accuracy "
                   f"{out['accuracy']:.1%} (SFT {out['accuracy_sft']:.1%}); mean reward {out['mean_reward']:+.3f} "
                   f"(SFT {out['mean_reward_sft']:+.3f}); win rate vs SFT: checker {out['win_rate_checker']:.3f}, "
                   f"reward model {out['win_rate_reward']:.3f}; "
                   f"KL to SFT {out['kl_to_sft']:.3f} nats")
            if out["mean_reward"] > out["mean_reward_sft"] and out["accuracy"] < out["accuracy_sft"]:
                msg = "the reward model prefers PPO's answers but the checker grades them worse than SFT's"
                out["alarms"].append({"iteration": it, "kind": "end_reward_vs_accuracy", "message": msg})
                print0(f"ALARM (possible reward hacking): {msg}")
        common.atomic_write_json(os.path.join(args.out_dir, "metrics.json"), out)
        logger.log(event="end", step=it, **{k: v for k, v in out.items() if not isinstance(v, (dict, list))})
    common.barrier()
    print0(f"ppo done: {final}; metrics in {os.path.join(args.out_dir, 'metrics.json')}")
    return out


def final_evaluation(args, actor, rm, reward_fn, tok, records, device, ctx):
    """PPO actor vs the SFT model on held-out lab prompts: greedy answers graded by the checker and the
    reward model (dpo.py reports the same keys), the KL to SFT, optionally sampled answers too."""
    records = records[:args.eval_limit] if args.eval_limit > 0 else records
    convs = [r["messages"] for r in records]
    sft_path = args.sft_model or args.init_from
    models = {"ppo": actor, "sft": common.load_model(sft_path, device)[0].eval()}
    answers, done = {}, {}
    for k, m in models.items():
        answers[k], ids = chat.generate_answers(m, tok, convs, max_new_tokens=args.eval_max_new_tokens, return_ids=True)
        done[k] = [common.ended(a, tok.stop_ids) for a in ids]
    graded = {k: chat.evaluate_lab(None, tok, records, answers=a) for k, a in answers.items()}
    h2h = chat.head_to_head(answers["ppo"], answers["sft"], records, reward_fn=reward_fn,
                            ended_a=done["ppo"], ended_b=done["sft"])
    score = {k: sum(lab.score(a, r["truth"]) for a, r in zip(answers[k], records)) / len(records) for k in answers}
    norm = lambda x: ((x - rm.reward_mean) / rm.reward_std).item()  # noqa: E731
    kl_convs = [c for c in convs for _ in range(max(1, args.eval_samples))]
    out = {"sft_model": sft_path, "reward_model": args.reward_model,
           "eval_data": args.eval_data, "n_eval": len(records),
           "accuracy": graded["ppo"]["accuracy"], "accuracy_sft": graded["sft"]["accuracy"],
           "accuracy_by_kind": graded["ppo"]["by_kind"], "accuracy_by_kind_sft": graded["sft"]["by_kind"],
           "mean_score": score["ppo"], "mean_score_sft": score["sft"],
           "win_rate_checker": h2h["checker"]["win_rate"], "win_rate_reward": h2h["reward"]["win_rate"],
           "mean_reward": h2h["reward"]["mean_a"], "mean_reward_sft": h2h["reward"]["mean_b"],
           "mean_reward_normalized": norm(h2h["reward"]["mean_a"]),
           "mean_reward_normalized_sft": norm(h2h["reward"]["mean_b"]),
           "checker": h2h["checker"], "reward": h2h["reward"],
           # k1 is unbiased but noisy (one answer's sum can be negative): --eval_samples K answers per prompt
           "kl_to_sft": kl_to_model(actor, models["sft"], tok, kl_convs, args.eval_max_new_tokens, args.seed, ctx),
           "examples": [{"question": r["messages"][-1]["content"], "sft": s, "ppo": p,
                         "ok_sft": lab.check(s, r["truth"]), "ok_ppo": lab.check(p, r["truth"])}
                        for r, s, p in list(zip(records, answers["sft"], answers["ppo"]))[:6]]}
    if args.eval_samples > 0:   # the sampling policy PPO optimised, not only its greedy mode
        many = [c for c in convs for _ in range(args.eval_samples)]
        truths = [r["truth"] for r in records for _ in range(args.eval_samples)]
        for k, m in models.items():
            a, ids = chat.generate_answers(m, tok, many, max_new_tokens=args.eval_max_new_tokens,
                                           temperature=args.temperature, seed=args.seed + 1, return_ids=True)
            sfx = "" if k == "ppo" else "_sft"
            out["accuracy_sampled" + sfx] = sum(lab.check(x, t) for x, t in zip(a, truths)) / len(a)
            rewards = reward_fn(many, a, [common.ended(i, tok.stop_ids) for i in ids])
            out["mean_reward_sampled" + sfx] = sum(rewards) / len(a)
        out["eval_samples"] = args.eval_samples
    return out


if __name__ == "__main__":
    main()
