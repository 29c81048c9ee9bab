"""
reward.py -- the reward model (RLHF step 2, as in InstructGPT and DeepSpeed-Chat): a LLaMA backbone
started from the SFT checkpoint, with a scalar head, trained on preference pairs and rankings.

    # train (one process; on a GPU bf16 autocast); rankings {prompt, responses: [best..worst]} mix in
    python reward.py --init_from runs/sft --data prefs_train.jsonl rank_train.jsonl:0.5 \
        --val_data lab_run/data/prefs_val.jsonl --out_dir runs/rm
    torchrun --standalone --nproc_per_node=8 reward.py ... [--parallel fsdp]   # DDP by default
    python reward.py ... --resume        # continue exactly from the newest step_* checkpoint
    python reward.py ... --lora_rank 16  # LoRA on the backbone, the head in full; checkpoints: adapters + head
    python reward.py ... --implicit_beta 0.3 --lr 5e-5   # an implicit reward model (no head; see below)
    python reward.py --eval_only --init_from runs/rm --val_data prefs_val.jsonl  # per kind, length bias
    python reward.py --score IN.jsonl --out OUT.jsonl --init_from runs/rm        # any conversation file

In code (the RL stages' frozen reward: load_frozen_reward_model; PPO's critic starts from it):
    rm, meta = reward.load_reward_model("runs/rm")   # file or run dir -> eval mode; meta["reward_stats"]
    r = rm(idx, attention_mask)                # (B,) float32 rewards read at each row's LAST REAL token
    z = rm.normalize(r)                        # (r - mean) / std, the stats saved with these weights
    v = rm.values(idx, attention_mask)         # (B, T) the head at every position (a critic's values)
  idx (B, T) token ids rendered with the chat template; attention_mask (B, T) 1 = real, 0 = padding,
  left or right. Under DDP call the wrapped module: critic(idx, mask, per_token=True) == values().

--implicit_beta B (> 0) trains an IMPLICIT reward model instead of the head: no new parameters,
    r(x, y) = B * sum over the answer's tokens of [log pi(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t)]
with pi_ref the frozen starting (SFT) model (Rafailov et al. 2023, "Your language model is secretly a
reward model"; Yuan et al. 2024, "Free process rewards without process labels"). The same Bradley-Terry
loss then is DPO's loss. Why offer it: a scalar head must judge "is this fact wrong?" from one hidden
state, and on the lab's wrong-fact pairs it stays near chance, while the LM's own log-probs already know
the fact (see the README). Callers pass response_mask (which tokens are the answer); a PPO critic starts
from its backbone under a zero head (as_critic). One process or DDP; not with FSDP or LoRA.

Simplifications on purpose: one scalar head without bias (Bradley-Terry sees only differences); one
constant margin for every pair (Llama 2 scales it by the annotators' strength; our formats lack it).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import common
from common import collate, encode_group, epoch_batches, load_groups, print0, response_mask, split_groups
from model import Llama, LlamaConfig, load_state_dict_checked

# -----------------------------------------------------------------------------
# Config


def get_args(argv=None):
    parser = argparse.ArgumentParser(description="Train / evaluate / apply a reward model (see the docstring).",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common.add_common_args(parser)
    g = parser.add_argument_group("reward model")
    g.add_argument("--data", nargs="+", default=None,
                   help="training preferences: files 'path[:weight]' in any format data/formats.py reads "
                        "({prompt, chosen, rejected}, Anthropic HH, {prompt, responses: [best..worst]}, LLaMA-Factory)")
    g.add_argument("--val_data", nargs="+", default=None, help="held-out preferences (same forms as --data)")
    g.add_argument("--val_frac", type=float, default=0.05,
                   help="without --val_data: about this fraction of --data's distinct prompts held out, with all "
                        "their records (seeded; by first user turn, the same prompts in sft.py and dpo.py)")
    g.add_argument("--epochs", type=float, default=1,
                   help="passes over the data when --max_steps is 0 (InstructGPT: one; the RM overfits after)")
    g.add_argument("--max_seq_len", type=int, default=0, help="longest prompt + response in tokens (0 = model context)")
    g.add_argument("--margin", type=float, default=0.0,
                   help="Bradley-Terry margin m in -log sigma(r_better - r_worse - m), the same for every pair")
    g.add_argument("--padding_side", default="right", choices=["right", "left"],
                   help="how batches are padded (the reward is the same either way; a knob for checking that)")
    g.add_argument("--implicit_beta", type=float, default=0.0,
                   help="> 0: an implicit reward model, r = beta * sum_answer log(pi / pi_ref) with pi_ref the frozen "
                        "--init_from model, instead of a scalar head (see the docstring); 0 = the scalar head")
    g.add_argument("--calibration_bins", type=int, default=5, help="bins of the calibration table over [0.5, 1]")
    m = parser.add_argument_group("modes (instead of training)")
    m.add_argument("--eval_only", action="store_true",
                   help="evaluate --init_from (a reward model) on --val_data: accuracy, per kind, length bias, "
                        "calibration")
    m.add_argument("--score", default=None, metavar="IN.jsonl",
                   help="write rewards for the records of IN (conversations: the last assistant turn is scored; "
                        "preference records: every response) to --out, using the reward model --init_from")
    m.add_argument("--out", default=None, help="--score: output JSONL; --eval_only: optional metrics JSON")
    common.add_dry_run_args(parser.add_argument_group("--dry_run: memory per GPU before launching anything"))
    # Reward-model defaults. --batch_size counts PROMPT GROUPS here (each brings its K responses).
    parser.set_defaults(lr=5e-5, min_lr=5e-6, warmup_steps=20, max_steps=0, weight_decay=0.0, eval_interval=100,
                        eval_steps=0, save_interval=200, out_dir="out/reward", batch_size=8)
    args = common.parse_config(parser, argv)
    if not args.init_from:
        common.fail("--init_from is required: an SFT checkpoint / run dir / HF directory (training) "
                    "or a reward model (--score, --eval_only)")
    if args.score and not args.out:
        common.fail("--score needs --out (the output JSONL)")
    if args.eval_only and not args.val_data:
        common.fail("--eval_only needs --val_data")
    if not (args.score or args.eval_only or args.dry_run) and not args.data:
        common.fail("--data is required for training (preference files)")
    return args


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


def last_real_index(attention_mask, T: int):
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

    def __init__(self, config: LlamaConfig, backbone: Optional[Llama] = None, implicit_beta: float = 0.0):
        super().__init__()
        self.config = config
        self.implicit_beta = float(implicit_beta)
        self.backbone = backbone if backbone is not None else Llama(config)
        if self.implicit_beta > 0:
            # Implicit: the backbone keeps its LM head and a frozen copy of the starting weights is the
            # reference (saved with the weights, so the checkpoint scores alone). At step 0 the two are
            # equal: every reward is exactly 0, as with the zero head below.
            self.reference = copy.deepcopy(self.backbone).requires_grad_(False).eval()
            self.head = None
        else:
            self.reference = None
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

    @torch.no_grad()
    def init_weights(self):
        """__init__'s values again, for a model built on the meta device and materialised shard by shard
        (common.load_model_sharded): the backbone's init, a zero head, statistics mean 0 / std 1."""
        self.backbone.init_weights()
        nn.init.zeros_(self.head.weight)
        self.set_stats(0.0, 1.0)

    @classmethod
    def from_llama(cls, llama: Llama, implicit_beta: float = 0.0) -> "RewardModel":
        """Wrap a (SFT) language model: its weights become the backbone; the head starts at zero
        (implicit_beta > 0: no head, and a frozen copy of these weights is the reference)."""
        return cls(llama.config, backbone=llama, implicit_beta=implicit_beta)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.reference is not None:
            self.reference.eval()   # the reference never drops out: it must stay the starting model
        return self

    def as_critic(self) -> "RewardModel":
        """A PPO critic from this model: a scalar-head model on its backbone. The head is this model's
        own (a trained one) or, for an implicit reward model, a new zero head (values start at 0)."""
        if self.head is not None:
            return self
        critic = RewardModel(self.config, backbone=self.backbone)
        return critic.to(self.backbone.tok_embeddings.weight.device)

    def _score(self, h):
        # The head in float32, outside autocast: rewards are differences of nearby numbers, and
        # bf16 keeps only ~3 significant digits.
        with torch.autocast(device_type=h.device.type, enabled=False):
            return F.linear(h.float(), self.head.weight.float()).squeeze(-1)

    def forward(self, idx, attention_mask=None, per_token: bool = False, response_mask=None):
        """idx: (B, T) ids; attention_mask: (B, T) 1 = real token, 0 = padding (either side).
        Returns the rewards (B,) read at each row's last real token, or with per_token=True the
        head applied at every position (B, T) (values for a PPO critic; pads carry garbage).
        response_mask (B, T), 1 on the answer's tokens: what an implicit reward model sums over
        (the scalar head does not need it). Under DDP call the wrapped module
        (critic(idx, mask, per_token=True)), not .module."""
        if self.head is None:
            return self._implicit(idx, attention_mask, response_mask, per_token)
        h = self.backbone.hidden_states(idx, attention_mask)    # (B, T, dim)
        if per_token:
            return self._score(h)                                # (B, T)
        last = last_real_index(attention_mask, idx.size(1))
        h_last = h[:, -1] if last is None else h[torch.arange(idx.size(0), device=idx.device), last]
        return self._score(h_last)                               # (B,)

    def _implicit(self, idx, attention_mask, response_mask, per_token):
        """beta * sum over answer tokens of log pi(y_t) - log pi_ref(y_t). Only the answer counts: the
        prompt's log-ratio would cancel between two answers to the same prompt but shift every absolute
        score (PPO's rewards, the mean rewards of the report) by something no answer chose."""
        if per_token:
            raise ValueError("an implicit reward model has no value head: start a critic with as_critic()")
        if response_mask is None:
            raise ValueError("an implicit reward model needs response_mask (1 on the answer's tokens)")
        # labels: token t + 1 where it is an answer token, else -100 (common.sequence_logps skips those)
        labels = torch.where(response_mask[:, 1:].bool(), idx[:, 1:], torch.full_like(idx[:, 1:], -100))
        logits = self.backbone(idx, attention_mask=attention_mask)[0][:, :-1]
        with torch.no_grad():
            logits_ref = self.reference(idx, attention_mask=attention_mask)[0][:, :-1]
        return self.implicit_beta * (common.sequence_logps(logits, labels) - common.sequence_logps(logits_ref, labels))

    def values(self, idx, attention_mask=None):
        """Per-token scalar values (B, T): what a critic initialised from this model predicts."""
        return self(idx, attention_mask, per_token=True)

    def normalize(self, rewards):
        """(r - mean) / std with the reference-set statistics saved at training time."""
        return (rewards - self.reward_mean) / self.reward_std

    @torch.no_grad()
    def set_stats(self, mean: float, std: float):
        self.reward_mean.fill_(float(mean))
        self.reward_std.fill_(max(float(std), 1e-8))

    @property
    def layers(self):
        """The backbone's blocks: common.wrap_model shards (FSDP) or checkpoints them one by one.
        A property, not a second registered name, so parameter names stay backbone.layers.*"""
        return self.backbone.layers

    def num_params(self) -> int:
        """Parameters of the scoring model itself; an implicit model's frozen reference copy is not counted."""
        return sum(p.numel() for n, p in self.named_parameters() if not n.startswith("reference."))


REWARD_KIND = "reward_model"   # the "kind" key our reward checkpoints carry (LM checkpoints have none)


def load_reward_model(path: str, device="cpu"):
    """-> (RewardModel in eval mode on `device`, meta). `path`: a reward checkpoint written by this
    script (best.pt, final.pt, step_*.pt, or the same names as DCP directories from --parallel fsdp),
    or its run directory (best, else final, else the newest step). The normalisation statistics come
    with the weights (model.reward_mean / reward_std, model.normalize); meta is common.load_model's
    (path, model_config, tokenizer, step, config, metrics) plus "reward_stats" {mean, std, n, ...}.
    A language-model checkpoint is refused: start a reward model from it by training (--init_from)."""
    path = common.resolve_checkpoint(path)
    meta = {} if common.is_hf_dir(path) else common.read_checkpoint_meta(path)
    if meta.get("kind") != REWARD_KIND:
        common.fail(f"{path} is not a reward-model checkpoint (no kind={REWARD_KIND!r}); a language model becomes "
                    f"a reward model by training one: python reward.py --init_from {path} --data ...")
    if meta.get("lora"):   # adapter-only (a LoRA run): its base under the saved head, adapters merged
        ckpt = common.load_file(path)
        model = common.load_lora_checkpoint(ckpt, path, RewardModel.from_llama)
        meta["path"] = path
        return model.to(device).eval(), meta
    model = RewardModel(LlamaConfig.from_dict(meta["model_config"]), implicit_beta=meta.get("implicit_beta", 0.0))
    if os.path.isdir(path):   # an FSDP run's sharded checkpoint: read every shard into the whole model
        import torch.distributed.checkpoint as dcp
        state = model.state_dict()
        dcp.load({"model": state}, checkpoint_id=path, no_dist=True)
    else:
        state = common.load_file(path)["model"]
    load_state_dict_checked(model, state)
    meta["path"] = path
    return model.to(device).eval(), meta


def load_frozen_reward_model(path, args, info, dtype):
    """The RL stages' frozen reward model -> (model, meta): sharded straight from the file under FSDP."""
    if args.parallel == "fsdp" and not args.lora_rank:
        if common.read_checkpoint_meta(common.resolve_checkpoint(path)).get("implicit_beta"):
            common.fail(f"{path} is an implicit reward model (reward.py --implicit_beta): not supported with "
                        f"--parallel fsdp yet; use DDP, or a scalar-head reward model")
        return common.load_frozen_sharded(path, info, dtype, args.fsdp_shard_size, RewardModel, REWARD_KIND,
                                          load_reward_model)
    rm, meta = load_reward_model(path)
    return common.frozen(rm, dtype, info.device, info, args.parallel, args.fsdp_shard_size), meta   # (fsdp + LoRA)


def init_reward_model(path: str, info=None, wrap=None, implicit_beta: float = 0.0):
    """The starting point of training -> (RewardModel, meta, was_reward_model). A reward checkpoint
    continues as it is; a language model (our SFT checkpoint or run dir, or a HuggingFace LLaMA
    directory, via common.load_model) becomes the backbone under a fresh zero head -- InstructGPT and
    DeepSpeed-Chat start the reward model from the SFT model, which already reads the chat format.
    wrap (FSDP: common.wrap_model with the run's flags): the model comes back wrapped, built on the
    meta device and sharded, each rank reading only its shards (common.load_model_sharded); LoRA
    adapter-only checkpoints are read whole (their base must be merged in) and then wrapped."""
    resolved = common.resolve_checkpoint(path)
    meta = {} if common.is_hf_dir(resolved) else common.read_checkpoint_meta(resolved)
    was_rm = meta.get("kind") == REWARD_KIND
    if was_rm and float(meta.get("implicit_beta", 0.0)) != float(implicit_beta):
        common.fail(f"{path} is a reward model with implicit_beta {meta.get('implicit_beta', 0.0)}, this run asks for "
                    f"{implicit_beta}: continue it with the same --implicit_beta")
    if wrap is not None and not meta.get("lora"):
        model, meta = common.load_model_sharded(resolved, info, wrap, RewardModel, "" if was_rm else "backbone.",
                                                REWARD_KIND if was_rm else None)
        return model, meta, was_rm
    if was_rm:
        model, meta = load_reward_model(resolved)
        model.train()
    else:
        llama, meta = common.load_model(resolved)
        model = RewardModel.from_llama(llama, implicit_beta)
    return (model if wrap is None else wrap(model.to(info.device))), meta, was_rm


# -----------------------------------------------------------------------------
# Data: preference records -> token groups (common.encode_group, load_groups, collate, response_mask)


def reward_of(model, idx, mask, groups, side: str = "right"):
    """model(idx, mask) with the response mask an implicit reward model needs (the head ignores it)."""
    implicit = common.unwrap(model).head is None
    resp = response_mask(groups, idx.size(1), side).to(idx.device) if implicit else None
    return model(idx, mask, response_mask=resp)


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
                win_i = 1.0 if rs[i] > rs[j] else (0.5 if rs[i] == rs[j] else 0.0)   # a tie counts 1/2
                longer_wins_model.append(win_i if li > lj else 1.0 - win_i)
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
    lines = [f"pairwise accuracy {m['accuracy']:.4f} over {m['pairs']} pairs ({m['groups']} prompts), "
             f"loss {m['loss']:.4f}",
             f"reward chosen {m['chosen_mean']:+.3f} +- {m['chosen_std']:.3f}   rejected {m['rejected_mean']:+.3f} "
             f"+- {m['rejected_std']:.3f}   (all: mean {m['stats']['mean']:+.3f} std {m['stats']['std']:.3f})",
             f"margin r_better - r_worse: mean {m['margin_mean']:+.3f} std {m['margin_std']:.3f}  quantiles "
             f"5% {m['margin_q05']:+.2f} 25% {m['margin_q25']:+.2f} 50% {m['margin_q50']:+.2f} "
             f"75% {m['margin_q75']:+.2f} 95% {m['margin_q95']:+.2f}"]
    for k, v in m["per_kind"].items():
        lines.append(f"  kind {k:<16s} accuracy {v['accuracy']:.4f}  mean margin {v['margin_mean']:+.3f}  (n={v['n']})")
    L = m["length"]
    lines.append(f"length bias: corr(reward, length) {L['corr']:+.3f}; "
                 f"longer response wins {L['longer_wins_model']:.3f} "
                 f"under the model vs {L['longer_wins_label']:.3f} in the labels")
    lines.append(f"calibration (ECE {m['ece']:.4f}): confidence bin -> observed accuracy")
    for b in m["calibration"]:
        lines.append(f"  [{b['lo']:.1f}, {b['hi']:.1f}]  n={b['n']:<6d} confidence {b['confidence']:.3f}  "
                     f"accuracy {b['accuracy']:.3f}")
    return "\n".join(lines)


@torch.no_grad()
def score_groups(model, groups, batch_size: int, pad_id: int, info, ctx, side: str = "right"):
    """Rewards of every response of every group -> a list of K-lists (floats), the same on every rank.

    Groups are batched by length (less padding; the reward does not depend on batch companions) and
    dealt out to the ranks; every rank runs the same number of forwards, because under FSDP the
    weights are gathered collectively (a rank with nothing left re-runs batch 0 and drops it)."""
    order = sorted(range(len(groups)), key=lambda i: max(len(s) for s in groups[i]["ids"]))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    mine = {}
    with common.eval_mode(model):
        for j in range(math.ceil(len(batches) / info.world_size)):
            k = j * info.world_size + info.rank
            batch = batches[k if k < len(batches) else 0]
            idx, mask, sizes = collate([groups[i] for i in batch], pad_id, side)
            with ctx:
                rewards = reward_of(model, idx.to(info.device), mask.to(info.device), [groups[i] for i in batch], side)
            if k < len(batches):
                flat, o = rewards.float().cpu().tolist(), 0
                for i, n in zip(batch, sizes):
                    mine[i], o = flat[o:o + n], o + n
    if info.distributed:   # a few floats per group: all_gather_object is plenty
        parts = [None] * info.world_size
        dist.all_gather_object(parts, mine)
        mine = {i: r for part in parts for i, r in part.items()}
    return [mine[i] for i in range(len(groups))]


def reward_scorer(rm, tok, device, ctx, missing_eos_penalty=0.0, batch_size=32):
    """reward_fn(conversations, answers, ended=None) -> raw reward-model scores of answer strings,
    rendered like this script's data (encode_group), the form chat.head_to_head takes. ended: one
    bool per answer (False = cut at the length limit: no end marker, and missing_eos_penalty is
    subtracted, common.penalize_missing_eos); None = all finished. Scored locally (no collectives),
    whatever the rank: what dpo.py's rounds and PPO's and DPO's evaluations use."""
    local = common.DistInfo(device=torch.device(device))
    max_len = rm.config.max_seq_len

    def reward_fn(conversations, answers, ended=None):
        ended = [True] * len(answers) if ended is None else list(ended)
        groups = [encode_group(tok, {"messages": c, "responses": [a], "ended": [e]}, max_len)
                  for c, a, e in zip(conversations, answers, ended)]
        if any(g is None for g in groups):
            raise ValueError(f"a prompt + answer does not fit the reward model's context ({max_len})")
        scores = [r[0] for r in score_groups(rm, groups, batch_size, tok.pad_id, local, ctx)]
        return common.penalize_missing_eos(scores, ended, missing_eos_penalty)
    return reward_fn


def evaluate(model, groups, args, pad_id, info, ctx):
    """score_groups + preference_metrics; --eval_steps > 0 caps it at that many batches per rank."""
    if args.eval_steps > 0:
        groups = groups[:args.eval_steps * args.batch_size * info.world_size]
    rewards = score_groups(model, groups, args.batch_size, pad_id, info, ctx, args.padding_side)
    return preference_metrics(rewards, groups, args.calibration_bins)


# -----------------------------------------------------------------------------
# Modes: scoring a file, evaluating a trained reward model


def tokenizer_for(meta, args):
    """common.checkpoint_tokenizer (--tokenizer overrides; another sha256 or a too-large vocabulary is
    refused) as a one-line error."""
    try:
        return common.checkpoint_tokenizer(meta, args.tokenizer)
    except (OSError, ValueError) as e:
        common.fail(f"tokenizer: {e}")


def score_file(args, info, ctx):
    """--score IN --out OUT: every record of IN comes back with its rewards added.
    A conversation (any SFT format) -> "reward", "reward_normalized": its LAST assistant turn scored
    given the turns before it. A preference record (any preference format) -> "rewards",
    "rewards_normalized": one per response in best-first order ([chosen, rejected] for a pair; a
    ranking in its order, exact duplicate texts scored once). Bad lines are skipped and reported."""
    from data.formats import FormatError, Report, iter_json, to_messages, to_preference
    model, meta = load_reward_model(args.init_from, info.device)
    tok = tokenizer_for(meta, args)
    max_len = min(args.max_seq_len or model.config.max_seq_len, model.config.max_seq_len)
    report, records, groups = Report(), [], []
    try:
        for lineno, obj in iter_json(args.score, report):
            is_pref = any(k in obj for k in ("chosen", "rejected", "responses", "ranked"))
            try:
                if is_pref:
                    rec = to_preference(obj)
                    messages, responses = rec["messages"], rec["responses"]
                else:
                    conv = to_messages(obj)
                    messages, responses = conv[:-1], [conv[-1]["content"]]
            except FormatError as e:
                report.skip(args.score, lineno, str(e))
                continue
            group = encode_group(tok, {"messages": messages, "responses": responses}, max_len)
            if group is None:
                report.skip(args.score, lineno, f"too long (last user turn + response > {max_len} tokens)")
                continue
            records.append((obj, is_pref))
            groups.append(group)
    except OSError as e:
        common.fail(f"{args.score}: {e}")
    report.records = report.emitted = len(records)
    print0(f"{args.score}: {report.summary()}")
    if not records:
        common.fail(f"{args.score}: nothing to score")
    rewards = score_groups(model, groups, args.batch_size, tok.pad_id, info, ctx, args.padding_side)
    tmp = args.out + ".tmp"
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(tmp, "w", encoding="utf-8") as f:
        for (obj, is_pref), rs in zip(records, rewards):
            z = model.normalize(torch.tensor(rs)).tolist()
            added = {"rewards": rs, "rewards_normalized": z} if is_pref else \
                {"reward": rs[0], "reward_normalized": z[0]}
            f.write(json.dumps({**obj, **added}, ensure_ascii=False) + "\n")
    os.replace(tmp, args.out)
    flat = torch.tensor([r for rs in rewards for r in rs])
    print0(f"wrote {args.out}: {len(records)} records, {flat.numel()} responses, reward mean {flat.mean():+.4f} "
           f"std {flat.std(unbiased=False):.4f} (normalisation stats of the model: mean "
           f"{model.reward_mean.item():+.4f} std {model.reward_std.item():.4f})")


def eval_file(args, info, ctx):
    """--eval_only: the full diagnostics of a trained reward model on --val_data."""
    model, meta = load_reward_model(args.init_from, info.device)
    tok = tokenizer_for(meta, args)
    max_len = min(args.max_seq_len or model.config.max_seq_len, model.config.max_seq_len)
    groups = load_groups(args.val_data, tok, max_len, args.seed, "val")
    metrics = evaluate(model, groups, args, tok.pad_id, info, ctx)
    print0(format_report(metrics))
    if args.out and info.is_main:
        common.atomic_write_json(args.out, metrics)
    return metrics


# -----------------------------------------------------------------------------
# Training


def stats_record(metrics, step, name):
    """The normalisation statistics as saved in a checkpoint ("reward_stats") and reward_stats.json."""
    s = metrics["stats"]
    return {"mean": s["mean"], "std": s["std"], "n": s["n"], "step": step, "checkpoint": name,
            "reference": metrics.get("reference", "every response (chosen and rejected) of the held-out set"),
            "accuracy": metrics["accuracy"]}


def dry_run(args):
    """--dry_run: this script's FSDP step on fake tensors (common.fsdp_dry_run) for the model of
    --init_from (a preset name will do): batch_size prompt groups of a chosen and a rejected answer,
    both max_seq_len tokens long, scored in one forward (collate) under the Bradley-Terry loss."""
    if args.implicit_beta > 0:   # FSDP is refused for it anyway (train)
        common.fail("--dry_run models the scalar-head reward model under FSDP; --implicit_beta (a second, frozen "
                    "copy of the model, one process or DDP) is not modelled")
    config = common.dry_run_config(args.init_from, kind=REWARD_KIND)
    T = args.max_seq_len or config.max_seq_len
    dtype = torch.float32 if args.dtype == "float32" else torch.bfloat16   # GPU training: bf16 unless asked
    sizes = [2] * args.batch_size

    def micro_step(model):   # autocast is on already (fsdp_dry_run)
        # Every answer full length, so no padding mask: finding each row's last real token reads the
        # mask's values, which fake tensors do not have (the mask's own memory is left out: B x T).
        idx = torch.randint(0, config.vocab_size, (2 * args.batch_size, T))
        return ranking_loss(model(idx), sizes, args.margin)[0]
    measured = common.fsdp_dry_run(lambda: RewardModel(config), micro_step, args.world_size, dtype, args.grad_accum,
                                   args.activation_checkpointing, args.fsdp_skip_accum_sync,
                                   shard_size=args.fsdp_shard_size)
    common.print_dry_run(measured, args.world_size, args.gpu_mem_gb,
                         common.dry_run_label("reward", args, dtype, f"{args.batch_size} pairs x {T}"))
    return measured


def main(argv=None):
    args = get_args(argv)
    if args.dry_run:
        return dry_run(args)
    info = common.setup_distributed(args.device)
    try:
        dtype = common.resolve_dtype(args.dtype, info.device)
        ctx = common.autocast(info.device, dtype)
        if args.score:
            if info.distributed:
                common.fail("--score runs in one process (no torchrun)")
            return score_file(args, info, ctx)
        if args.eval_only:
            return eval_file(args, info, ctx)
        return train(args, info, dtype, ctx)
    finally:
        common.teardown_distributed(info)


def train(args, info, dtype, ctx):
    parallel = common.resolve_parallel(args.parallel, info)
    common.seed_everything(args.seed + info.rank)   # dropout differs per rank; the data order does not

    # --- the run directory: resume, or refuse to overwrite an earlier run
    resume_path = common.latest_checkpoint(args.out_dir) if args.resume else None
    earlier = common.latest_checkpoint(args.out_dir) or any(common.checkpoint_path(args.out_dir, n)
                                                            for n in ("best", "final"))
    if earlier and not resume_path:
        common.fail(f"{args.out_dir} already holds checkpoints of a run"
                    + ("" if args.resume else "; pass --resume to continue it")
                    + ". Choose another --out_dir (nothing was changed).")

    # --- model: the SFT model under a zero head (or a reward model to continue); its tokenizer
    def wrap(m):
        return common.wrap_model(m, info, parallel, dtype, args.compile, args.activation_checkpointing,
                                 args.fsdp_skip_accum_sync, shard_size=args.fsdp_shard_size)
    # FSDP (without LoRA, whose adapters go on before sharding): built on the meta device, sharded,
    # and each rank reads only its own shards. Otherwise every rank loads the whole model.
    sharded = parallel == "fsdp" and not args.lora_rank
    if args.implicit_beta > 0 and (parallel == "fsdp" or args.lora_rank):
        common.fail("--implicit_beta: not supported with --parallel fsdp or --lora_rank yet (one process or DDP)")
    model, meta, was_rm = init_reward_model(args.init_from, info, wrap if sharded else None, args.implicit_beta)
    # --lora_rank > 0: adapters on the frozen backbone; the scalar head stays fully trainable
    model = common.setup_lora(model, args, meta["path"], dtype)
    tok = tokenizer_for(meta, args)
    seq_len = min(args.max_seq_len or model.config.max_seq_len, model.config.max_seq_len)
    start = "language model + new zero head" if not args.implicit_beta else \
        f"language model, implicit reward beta * log(pi / pi_ref), beta {args.implicit_beta:g}, reference frozen"
    print0(f"model: {meta['path']} ({'a reward model' if was_rm else start}, "
           f"{model.num_params() / 1e6:.2f}M parameters, context {model.config.max_seq_len}); tokenizer {tok.path}")

    # --- data: every rank reads and encodes the same groups (deterministic), then takes its batches
    groups = load_groups(args.data, tok, seq_len, args.seed, "train")
    if args.val_data:
        train_groups, val_groups = groups, load_groups(args.val_data, tok, seq_len, args.seed, "val")
    else:
        train_groups, val_groups = split_groups(groups, args.val_frac, args.seed)
    n_pairs = sum(len(g["ids"]) * (len(g["ids"]) - 1) // 2 for g in train_groups)
    print0(f"train: {len(train_groups)} prompt groups, {n_pairs} pairs; val: {len(val_groups)} groups")
    per_step = info.world_size * args.grad_accum   # micro-batches per optimizer step, all ranks together
    steps_per_epoch = len(epoch_batches(len(train_groups), args.batch_size, args.seed, 0)) // per_step
    if steps_per_epoch == 0:
        common.fail(f"{len(train_groups)} prompt groups make less than one step of {per_step} x {args.batch_size}")
    max_steps = args.max_steps if args.max_steps > 0 else max(1, round(args.epochs * steps_per_epoch))
    print0(f"{steps_per_epoch} steps per epoch ({per_step} micro-batches of {args.batch_size} prompt groups), "
           f"{max_steps} steps")

    # --- wrap, optimizer, resume
    if not sharded:
        model = wrap(model.to(info.device))
    raw = common.unwrap(model)
    optimizer = common.configure_optimizer(model, args.lr, args.weight_decay, (args.beta1, args.beta2), info.device)
    os.makedirs(args.out_dir, exist_ok=True)
    common.save_config(args, args.out_dir, {"steps_per_epoch": steps_per_epoch, "resolved_max_steps": max_steps})
    logger = common.JsonlLogger(os.path.join(args.out_dir, "log.jsonl"))
    step, best = 0, (-1.0, float("inf"))   # best by (val accuracy, then lower val loss)
    if resume_path:
        state = common.restore_checkpoint(resume_path, model, optimizer, info.device)
        step = state["step"]
        best = tuple(state.get("metrics", {}).get("best", best))
        if state.get("data_state", {}).get("steps_per_epoch") != steps_per_epoch:
            common.fail(f"{resume_path} was written with {state.get('data_state', {}).get('steps_per_epoch')} steps "
                        f"per epoch, this run has {steps_per_epoch}: data or batch flags changed, resume is not exact")
        print0(f"resumed from {resume_path} at step {step}")
    stats_json = os.path.join(args.out_dir, "reward_stats.json")

    def save(name, with_optimizer, metrics):
        """A checkpoint carrying the normalisation stats of exactly these weights (set by the eval
        that came just before), in the state dict and readable without building the model."""
        stats = stats_record(metrics, step, name) if metrics else None
        path = common.save_checkpoint(
            args.out_dir, name, model, optimizer if with_optimizer else None, step=step, config=vars(args),
            tokenizer=tok, metrics={"best": list(best), **({"val_accuracy": metrics["accuracy"],
                                                            "val_loss": metrics["loss"]} if metrics else {})},
            data_state={"steps_per_epoch": steps_per_epoch}, kind=REWARD_KIND, reward_stats=stats,
            **({"implicit_beta": args.implicit_beta} if args.implicit_beta > 0 else {}),
            background=True)   # FSDP resume checkpoints: written while training goes on
        if stats and not with_optimizer and info.is_main:   # reward_stats.json: {"best": ..., "final": ...}
            saved = {}
            if os.path.exists(stats_json):
                with open(stats_json, encoding="utf-8") as f:
                    saved = json.load(f)
            common.atomic_write_json(stats_json, {**saved, name: {**stats, "path": path}})
        return path

    def run_eval():
        nonlocal best
        metrics = evaluate(model, val_groups, args, tok.pad_id, info, ctx)
        raw.set_stats(metrics["stats"]["mean"], metrics["stats"]["std"])
        print0(f"step {step}: val " + format_report(metrics))
        logger.log(event="eval", step=step, **{k: v for k, v in metrics.items()})
        improved = (metrics["accuracy"], -metrics["loss"]) > (best[0], -best[1])
        if improved:
            best = (metrics["accuracy"], metrics["loss"])
        return metrics, improved

    # --- step 0: the invariant of a zero head (implicit: policy == reference) -- every reward 0, loss
    # exactly ln 2, accuracy 1/2
    metrics = None
    if step == 0 and val_groups:
        metrics, _ = run_eval()
        if not was_rm:
            ok = abs(metrics["loss"] - math.log(2)) < 1e-6 and metrics["accuracy"] == 0.5
            print0(f"check at step 0 (zero head): loss {metrics['loss']:.6f} vs ln 2 = {math.log(2):.6f}, accuracy "
                   f"{metrics['accuracy']:.3f} vs 0.5: {'ok' if ok else 'MISMATCH (is the head really zero?)'}")

    # --- the loop
    plan_epoch, plan, t_last, seqs_since, tokens_since, skipped = None, None, time.time(), 0, 0, 0
    model.train()
    while step < max_steps:
        epoch, pos = divmod(step, steps_per_epoch)
        if epoch != plan_epoch:   # this rank's micro-batches of the epoch: every world_size-th one
            plan = epoch_batches(len(train_groups), args.batch_size, args.seed, epoch)[info.rank::info.world_size]
            plan_epoch = epoch
        lr = common.lr_at(step, args.lr, args.min_lr, args.warmup_steps, max_steps)
        common.set_lr(optimizer, lr)
        sums = torch.zeros(4, dtype=torch.float64)   # loss, correct pairs, pairs, summed margin
        for micro in range(args.grad_accum):
            batch = [train_groups[i] for i in plan[pos * args.grad_accum + micro]]
            idx, mask, sizes = collate(batch, tok.pad_id, args.padding_side)
            idx, mask = idx.to(info.device), mask.to(info.device)
            with common.grad_sync(model, micro == args.grad_accum - 1):
                with ctx:   # ONE forward for all K responses of every group
                    rewards = reward_of(model, idx, mask, batch, args.padding_side)
                loss, diff, _ = ranking_loss(rewards, sizes, args.margin)
                (loss / args.grad_accum).backward()
            d = diff.detach().double().cpu()
            sums += torch.stack([loss.detach().double().cpu(), ((d > 0).double() + 0.5 * (d == 0).double()).sum(),
                                 torch.tensor(float(d.numel()), dtype=torch.float64), d.sum()])
            seqs_since += idx.size(0)
            tokens_since += int(mask.sum())
        grad_norm = common.clip_grad_norm(model, args.grad_clip)   # the same on every rank (after the all-reduce)
        if math.isfinite(grad_norm):
            optimizer.step()
        else:   # a non-finite gradient would write NaN into every weight: skip this update, say so
            skipped += 1
            print0(f"warning: step {step + 1}: non-finite gradient norm; update skipped ({skipped} so far)")
            logger.log(event="skip", step=step + 1)
            if skipped >= 5:
                common.fail("5 updates skipped for non-finite gradients: lower --lr or check the data")
        optimizer.zero_grad(set_to_none=True)
        common.shorten_timeout(info, args)   # (after the first step: --step_timeout)
        step += 1

        if step % args.log_interval == 0 or step == max_steps:
            if info.distributed:
                sums = sums.to(info.device)
                dist.all_reduce(sums)
                sums = sums.cpu()
            loss_avg = (sums[0] / (args.grad_accum * info.world_size)).item()
            dt = time.time() - t_last
            print0(f"step {step}/{max_steps} ep {step / steps_per_epoch:.2f} | loss {loss_avg:.4f} | acc "
                   f"{sums[1] / sums[2]:.3f} | margin {sums[3] / sums[2]:+.3f} | lr {lr:.2e} | grad {grad_norm:.2f} | "
                   f"{seqs_since * info.world_size / dt:.1f} seq/s, {tokens_since * info.world_size / dt:,.0f} tok/s")
            logger.log(step=step, epoch=step / steps_per_epoch, loss=loss_avg, accuracy=(sums[1] / sums[2]).item(),
                       margin=(sums[3] / sums[2]).item(), lr=lr, grad_norm=grad_norm,
                       tokens_per_s=tokens_since * info.world_size / dt)
            t_last, seqs_since, tokens_since = time.time(), 0, 0
        if val_groups and args.eval_interval > 0 and (step % args.eval_interval == 0 or step == max_steps):
            metrics, improved = run_eval()
            if improved:
                save("best", False, metrics)
                print0(f"step {step}: best so far (val accuracy {best[0]:.4f}, loss {best[1]:.4f}): saved best")
        if args.save_interval > 0 and step % args.save_interval == 0 and step < max_steps:
            save(f"step_{step:07d}", True, None)
            common.rotate_checkpoints(args.out_dir, args.keep_last)
    if val_groups and (metrics is None or args.eval_interval <= 0):
        metrics, improved = run_eval()   # final.pt's stats must describe final.pt's weights
        if improved:
            save("best", False, metrics)
    if not val_groups:   # no held-out set: the normalisation stats come from (up to) 1000 training groups
        print0("no held-out preferences (--val_frac 0, no --val_data): reward stats from training groups")
        metrics = evaluate(model, train_groups[:1000], args, tok.pad_id, info, ctx)
        raw.set_stats(metrics["stats"]["mean"], metrics["stats"]["std"])
        metrics["reference"] = f"every response of the first {min(1000, len(train_groups))} training groups"
    path = save("final", False, metrics)
    print0(f"done: {path}" + (f"; best val accuracy {best[0]:.4f}" if best[0] >= 0 else "")
           + f"; normalisation stats (mean {raw.reward_mean.item():+.4f}, std {raw.reward_std.item():.4f}) in "
           f"the checkpoints and {stats_json}")
    return metrics


if __name__ == "__main__":
    main()
