"""
reward.py -- the reward model (RLHF step 2, as in InstructGPT and DeepSpeed-Chat): a LLaMA backbone
started from the SFT checkpoint, with a scalar head, trained on human (or lab) preferences.

    # train (one process; on a GPU the same command runs in bf16)
    python reward.py --init_from runs/sft --train_data lab_run/data/prefs_train.jsonl \
        --val_data lab_run/data/prefs_val.jsonl --out_dir runs/rm
    # rankings ({prompt, responses: [best, ..., worst]}) mix in like any other file
    python reward.py --init_from runs/sft --train_data prefs.jsonl rank_train.jsonl:0.5 ...
    # several GPUs / nodes (DDP, or --fsdp for a model that does not fit on one device)
    torchrun --standalone --nproc_per_node=8 reward.py --init_from runs/sft ...
    # diagnostics only (accuracy per kind, length bias, calibration) of a trained reward model
    python reward.py --eval_only --init_from runs/rm --val_data lab_run/data/prefs_val.jsonl
    # score prompt/response pairs (any conversation or preference format data/formats.py reads)
    python reward.py --score IN.jsonl --out OUT.jsonl --init_from runs/rm

In code (rlhf_ppo.py, dpo.py):
    from reward import RewardModel, load_reward_model
    rm = load_reward_model("runs/rm")            # our checkpoint file or run dir; eval mode
    r = rm(idx, attention_mask)                  # (B,) raw rewards, read at each row's last real token
    z = rm.normalize(r)                          # (r - mean) / std with the stats saved at training time
    v = rm.values(idx, attention_mask)           # (B, T) the head applied at every position (critic init)

Simplifications on purpose: one scalar head, no bias (Bradley-Terry is blind to a constant
offset, so a bias would never get a gradient); no per-pair preference strength from the data
(only a constant --margin, Llama 2's eq. 2 with one m for every pair).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import Llama, LlamaConfig, load_state_dict_checked

# -----------------------------------------------------------------------------
# Losses: pure functions of the rewards


def bradley_terry_loss(r_chosen, r_rejected, margin=0.0):
    """Pairwise Bradley-Terry loss (InstructGPT eq. 1; Llama 2 eq. 2 with a margin):

        P(chosen > rejected) = sigma(r_c - r_r)
        loss = mean_pairs  -log sigma(r_c - r_r - m)

    r_chosen, r_rejected: (P,) rewards; margin m: a float or a (P,) tensor (Llama 2 makes it
    larger for pairs the annotators called clearly better; it asks for a gap, not just an order).
    Returns (loss, diff) with diff = r_c - r_r (P,), the raw margins, for metrics."""
    diff = r_chosen - r_rejected
    # -log sigma(x) = softplus(-x), written with logsigmoid, which is stable for large |x|.
    loss = -F.logsigmoid(diff - margin).mean()
    return loss, diff


def ranked_pairs(k: int):
    """All K(K-1)/2 pairs (i, j), i < j, of a ranking listed best first: i is preferred to j."""
    return [(i, j) for i in range(k) for j in range(i + 1, k)]


def ranking_loss(rewards, group_sizes, margin=0.0):
    """Bradley-Terry over rankings, InstructGPT's way (Ouyang et al. 2022, eq. 1):

        loss = mean_prompts [ 1 / C(K,2) * sum_{i < j} -log sigma(r_i - r_j - m) ]

    rewards: (N,) the rewards of all responses of a batch, prompt groups back to back, each
    group best first; group_sizes: [K_1, K_2, ...] with sum = N. A chosen/rejected pair is the
    case K = 2, where this is exactly bradley_terry_loss.

    Why groups: the K responses of a prompt get their rewards from ONE forward pass, and all
    K(K-1)/2 comparisons are built from those K numbers. Feeding the pairs as separate examples
    would cost K(K-1) forwards and, as InstructGPT found, makes each response appear K-1 times
    per epoch, which overfits. Averaging within a group first gives every prompt the same weight.

    Returns (loss, diff, pair_group): diff (P,) = r_i - r_j over every pair of every group,
    pair_group (P,) the index of the group each pair came from."""
    if sum(group_sizes) != rewards.numel():
        raise ValueError(f"group sizes sum to {sum(group_sizes)} but there are {rewards.numel()} rewards")
    first, second, pair_group, pair_weight = [], [], [], []
    offset = 0
    for g, k in enumerate(group_sizes):
        if k < 2:
            raise ValueError(f"group {g} has {k} response(s); a comparison needs at least 2")
        pairs = ranked_pairs(k)
        first += [offset + i for i, _ in pairs]
        second += [offset + j for _, j in pairs]
        pair_group += [g] * len(pairs)
        pair_weight += [1.0 / len(pairs)] * len(pairs)
        offset += k
    dev = rewards.device
    first, second = torch.tensor(first, device=dev), torch.tensor(second, device=dev)
    weight = torch.tensor(pair_weight, device=dev, dtype=rewards.dtype)
    diff = rewards[first] - rewards[second]
    loss = (-F.logsigmoid(diff - margin) * weight).sum() / len(group_sizes)
    return loss, diff, torch.tensor(pair_group, device=dev)


# -----------------------------------------------------------------------------
# The model


def last_real_index(attention_mask, T: int, device=None):
    """(B,) index of each row's last real token. attention_mask (B, T): 1 = real, 0 = padding,
    anywhere (left padding, right padding, or both). None means no padding: T - 1."""
    if attention_mask is None:
        return None
    real = attention_mask.bool()
    if not bool(real.any(-1).all()):
        raise ValueError("a row of attention_mask has no real token")
    positions = torch.arange(1, T + 1, device=attention_mask.device)
    return (real * positions).max(-1).values - 1


class RewardModel(nn.Module):
    """LLaMA backbone + scalar head: r(prompt, response) = w . h_last.

    h_last is the final (normed) hidden state at the LAST REAL token of prompt+response -- the
    end-of-turn marker of the response. Why there: attention is causal, so only the last token
    has seen the whole prompt and the whole response; any earlier position scores a prefix.
    Why not simply position T-1: in a right-padded batch that is a pad token, whose state is
    meaningless (it attends to whatever the mask allows) and changes with how much padding the
    batch happened to need, i.e. with its batch companions. Reading at the last real token makes
    the reward a function of the text alone (tests/test_reward.py checks this to 1e-5).

    The LM head of the backbone is dropped (set to None): the reward model never predicts tokens,
    and an unused vocab x dim matrix would waste memory and upset DDP (a parameter that never
    gets a gradient). With tied embeddings the matrix lives on as the input embedding."""

    def __init__(self, config: LlamaConfig, backbone: Optional[Llama] = None):
        super().__init__()
        self.config = config
        self.backbone = backbone if backbone is not None else Llama(config)
        self.backbone.output = None
        self.head = nn.Linear(config.dim, 1, bias=False)
        # Zero init: every reward starts at exactly 0, so the first loss is exactly ln 2 and the
        # first margins are 0 -- an invariant the training script prints. The head still learns
        # at step 0 (its gradient is sigma'(.) * (h_c - h_r), not 0) and the backbone from step 1.
        nn.init.zeros_(self.head.weight)
        # Normalisation statistics of the rewards over a reference set (set by evaluation,
        # saved in the state dict so they always travel with the weights they describe).
        self.register_buffer("reward_mean", torch.zeros(()))
        self.register_buffer("reward_std", torch.ones(()))

    @classmethod
    def from_llama(cls, llama: Llama) -> "RewardModel":
        """Wrap a (SFT) language model: its weights become the backbone; the head starts at zero."""
        return cls(llama.config, backbone=llama)

    def _score(self, h):
        # The head in float32, outside autocast: rewards are differences of nearby numbers, and
        # bf16 keeps only ~3 significant digits.
        with torch.autocast(device_type=h.device.type, enabled=False):
            return F.linear(h.float(), self.head.weight.float()).squeeze(-1)

    def forward(self, idx, attention_mask=None, per_token: bool = False):
        """idx: (B, T) ids; attention_mask: (B, T) 1 = real token, 0 = padding (either side).
        Returns the rewards (B,) read at each row's last real token, or with per_token=True the
        head applied at every position (B, T) (values for a PPO critic; pads carry garbage).
        Under DDP call the wrapped module (critic(idx, mask, per_token=True)), not .module."""
        h = self.backbone.hidden_states(idx, attention_mask)    # (B, T, dim)
        if per_token:
            return self._score(h)                                # (B, T)
        last = last_real_index(attention_mask, idx.size(1))
        h_last = h[:, -1] if last is None else h[torch.arange(idx.size(0), device=idx.device), last]
        return self._score(h_last)                               # (B,)

    def values(self, idx, attention_mask=None):
        """Per-token scalar values (B, T): what a critic initialised from this model predicts."""
        return self(idx, attention_mask, per_token=True)

    def normalize(self, rewards):
        """(r - mean) / std with the reference-set statistics saved at training time."""
        return (rewards - self.reward_mean) / self.reward_std

    def set_stats(self, mean: float, std: float):
        self.reward_mean.fill_(float(mean))
        self.reward_std.fill_(max(float(std), 1e-8))


# -----------------------------------------------------------------------------
# Data: preference records -> token groups


def encode_group(tok, record, max_len: int):
    """Render one normalised preference record ({"messages", "responses": [best..worst], "kind"})
    with the SFT chat template: each response becomes the assistant turn after the prompt, i.e.
    <s>...<|user|>Q<|end|><|assistant|>RESPONSE<|end|> -- so the reward is read on the <|end|>
    that closes the response, the same token at which the SFT model learned to stop.

    Too long: the oldest user/assistant exchanges of the prompt are dropped (whole turns, the
    tokenizer's render_prompt rule), the same for all responses of the group so that they are
    compared on the same prompt; a response is never cut (its end is where the reward is read).
    Returns {"ids": [K id lists], "resp_len": [K response token counts], "kind"} or None when
    even the last user turn plus the longest response does not fit."""
    messages = record["messages"]
    prompt = tok.render_prompt(messages)
    seqs = []
    for response in record["responses"]:
        ids, _ = tok.render_conversation(messages + [{"role": "assistant", "content": response}])
        if ids[:len(prompt)] != prompt:   # the contract every stage relies on; fail loudly if broken
            raise RuntimeError("render_conversation(prompt + answer) does not start with render_prompt(prompt)")
        seqs.append(ids[len(prompt):])   # the response tokens (content + end marker)
    longest = max(len(s) for s in seqs)
    if len(prompt) + longest > max_len:
        try:
            prompt = tok.render_prompt(messages, max_len=max_len - longest)
        except ValueError:
            return None
    return {"ids": [prompt + s for s in seqs], "resp_len": [len(s) for s in seqs], "kind": record.get("kind")}


def load_groups(paths, tok, max_len: int, seed: int = 0, name: str = "data"):
    """Read preference files (any format data/formats.py knows; "path:weight" mixes) and encode
    them. Skipped records (malformed/invalid lines, too long) are counted and reported."""
    from data.formats import read_preferences
    records, report = read_preferences(paths, seed=seed)
    groups = [g for g in (encode_group(tok, r, max_len) for r in records) if g is not None]
    too_long = len(records) - len(groups)
    print0(f"{name}: {report.summary()}")
    if too_long:
        print0(f"{name}: {too_long} record(s) dropped: last user turn + longest response > {max_len} tokens")
    if not groups:
        raise ValueError(f"{name}: no usable preference records in {paths}")
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


# -----------------------------------------------------------------------------
# Evaluation: accuracy, reward statistics, and the diagnostics that say whether PPO can lean on it


def preference_metrics(rewards, groups, n_bins: int = 5):
    """All metrics from per-response rewards. rewards: a list of K-lists (one per group, best
    first, floats); groups: the matching encoded groups (for "kind" and response lengths).

    accuracy      fraction of pairs (i better than j) with r_i > r_j; a tie counts 1/2 (a zero-init
                  head ties everything, and that must read 0.5, not 0 or 1)
    chosen/rejected  mean and std of the best response's reward / of all the others'
    margin_*      the distribution of r_i - r_j over pairs (mean, std, quantiles)
    stats         mean and std over ALL responses: the reference set for PPO's normalisation
    per_kind      accuracy and mean margin per record kind (lab world: the rejected kind)
    length        Pearson correlation of reward with response length in tokens, and how often the
                  longer response of a pair wins under the model vs. in the labels (length bias)
    calibration   bins of the model's confidence max(p, 1-p), p = sigma(r_i - r_j), with the
                  observed accuracy in each bin (a calibrated model: accuracy ~ confidence), + ECE"""
    diffs, kinds, longer_wins_model, longer_wins_label = [], [], [], []
    for rs, g in zip(rewards, groups):
        for i, j in ranked_pairs(len(rs)):
            diffs.append(rs[i] - rs[j])
            kinds.append(g.get("kind"))
            li, lj = g["resp_len"][i], g["resp_len"][j]
            if li != lj:
                longer_wins_label.append(li > lj)                            # i is the better one
                longer_wins_model.append((rs[i] > rs[j]) == (li > lj))
    d = torch.tensor(diffs, dtype=torch.float64)
    correct = (d > 0).double() + 0.5 * (d == 0).double()
    best = torch.tensor([rs[0] for rs in rewards], dtype=torch.float64)
    rest = torch.tensor([r for rs in rewards for r in rs[1:]], dtype=torch.float64)
    every = torch.cat([best, rest])
    q = torch.quantile(d, torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64)).tolist()
    m = {
        "pairs": len(diffs), "groups": len(rewards),
        "accuracy": correct.mean().item(),
        "loss": F.softplus(-d).mean().item(),
        "chosen_mean": best.mean().item(), "chosen_std": _std(best),
        "rejected_mean": rest.mean().item(), "rejected_std": _std(rest),
        "margin_mean": d.mean().item(), "margin_std": _std(d),
        "margin_q05": q[0], "margin_q25": q[1], "margin_q50": q[2], "margin_q75": q[3], "margin_q95": q[4],
        "stats": {"mean": every.mean().item(), "std": _std(every), "n": every.numel()},
    }
    per_kind = {}
    for k in sorted({k for k in kinds if k is not None}):
        sel = torch.tensor([kk == k for kk in kinds])
        per_kind[k] = {"n": int(sel.sum()), "accuracy": correct[sel].mean().item(), "margin_mean": d[sel].mean().item()}
    m["per_kind"] = per_kind
    lengths = torch.tensor([n for g in groups for n in g["resp_len"]], dtype=torch.float64)
    flat = torch.tensor([r for rs in rewards for r in rs], dtype=torch.float64)
    m["length"] = {
        "corr": _pearson(flat, lengths),
        "longer_wins_model": sum(longer_wins_model) / max(len(longer_wins_model), 1),
        "longer_wins_label": sum(longer_wins_label) / max(len(longer_wins_label), 1),
        "pairs_with_length_difference": len(longer_wins_label),
    }
    m["calibration"] = calibration_table(d, n_bins)
    m["ece"] = sum(b["n"] * abs(b["accuracy"] - b["confidence"]) for b in m["calibration"]) / max(len(diffs), 1)
    return m


def calibration_table(diff, n_bins: int = 5):
    """Reliability table. Each pair gives p = sigma(r_better - r_worse); the model's prediction is
    whichever response it rates higher, with confidence c = max(p, 1 - p) in [0.5, 1], and it is
    right when p > 0.5. (Folding p at 0.5 is the same as scoring both orders of every pair: the
    labels alone are always "the first one wins", which would make any reliability table trivial.)
    Bins split [0.5, 1] evenly; empty bins are left out."""
    p = torch.sigmoid(diff.double())
    conf = torch.maximum(p, 1 - p)
    right = (p > 0.5).double() + 0.5 * (p == 0.5).double()
    edges = torch.linspace(0.5, 1.0, n_bins + 1, dtype=torch.float64)
    table = []
    for b in range(n_bins):
        lo, hi = edges[b].item(), edges[b + 1].item()
        sel = (conf >= lo) & ((conf < hi) if b < n_bins - 1 else (conf <= hi))
        if sel.any():
            table.append({"lo": lo, "hi": hi, "n": int(sel.sum()), "confidence": conf[sel].mean().item(),
                          "accuracy": right[sel].mean().item()})
    return table


def _std(x):
    return x.std(unbiased=False).item() if x.numel() > 1 else 0.0


def _pearson(x, y):
    x, y = x - x.mean(), y - y.mean()
    denom = (x.pow(2).sum() * y.pow(2).sum()).sqrt()
    return (x * y).sum().item() / denom.item() if denom > 0 else 0.0


def format_report(m) -> str:
    """The metrics as a short human-readable block (printed at eval and by --eval_only)."""
    lines = [f"pairwise accuracy {m['accuracy']:.4f} over {m['pairs']} pairs ({m['groups']} prompts), loss {m['loss']:.4f}",
             f"reward chosen {m['chosen_mean']:+.3f} +- {m['chosen_std']:.3f}   rejected {m['rejected_mean']:+.3f} "
             f"+- {m['rejected_std']:.3f}   (all: mean {m['stats']['mean']:+.3f} std {m['stats']['std']:.3f})",
             f"margin r_better - r_worse: mean {m['margin_mean']:+.3f} std {m['margin_std']:.3f}  quantiles "
             f"5% {m['margin_q05']:+.2f} 25% {m['margin_q25']:+.2f} 50% {m['margin_q50']:+.2f} "
             f"75% {m['margin_q75']:+.2f} 95% {m['margin_q95']:+.2f}"]
    for k, v in m["per_kind"].items():
        lines.append(f"  kind {k:<16s} accuracy {v['accuracy']:.4f}  mean margin {v['margin_mean']:+.3f}  (n={v['n']})")
    L = m["length"]
    lines.append(f"length bias: corr(reward, length) {L['corr']:+.3f}; longer response wins {L['longer_wins_model']:.3f} "
                 f"under the model vs {L['longer_wins_label']:.3f} in the labels")
    lines.append(f"calibration (ECE {m['ece']:.4f}): confidence bin -> observed accuracy")
    for b in m["calibration"]:
        lines.append(f"  [{b['lo']:.1f}, {b['hi']:.1f}]  n={b['n']:<6d} confidence {b['confidence']:.3f}  accuracy {b['accuracy']:.3f}")
    return "\n".join(lines)
