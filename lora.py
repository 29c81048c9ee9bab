"""
lora.py -- LoRA (Hu et al. 2021): fine-tune a frozen model through low-rank updates.

    from lora import apply_lora, merge_lora, lora_disabled
    apply_lora(model, rank=16, alpha=32)      # freezes the model, adds adapters (common.setup_lora does this from flags)
    with lora_disabled(model): ...            # the base model again: the DPO/PPO reference, no second copy

model.py's Attention, FeedForward and Llama call lora_add when adapters are present; everything
else about adapters lives here. Checkpoints, the PEFT export and the flags are in common.py.
"""
import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# LoRA (Hu et al. 2021): fine-tune a frozen model through low-rank updates
#
# A weight W (out x in) stays frozen; what trains is a pair A (r x in), B (out x r) with r << in, out,
# and the layer computes  W x + (alpha / r) * B A dropout(x).  Only r * (in + out) numbers per matrix
# train, so gradients and AdamW's two moments exist for ~1% of the model (bench/lora.py measures it).
#   - B starts at zero, A random: the update B A is zero, so training starts exactly from the base
#     model; A must not be zero too, or B's gradient (which is proportional to A x) would be zero.
#   - alpha / r: the update's scale does not change when r does, so a tuned lr carries over.
#   - merge_lora folds (alpha / r) B A into W: inference costs nothing extra; unmerge_lora takes it out.
#   - lora_disabled(model) switches every adapter off: the base model again, without a second copy
#     (the reference model of dpo.py and rlhf_ppo.py).
# Our fused matrices hold several targets as row blocks: wqkv = [q; k; v] and w13 = [gate; up], so
# an adapter knows the rows it updates (which is also how the PEFT export splits them again).

LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


class LoRALinear(nn.Module):
    """The adapter of one target: rows [start, start + rows) of the owner's linear `weight_name`."""

    def __init__(self, weight_name: str, start: int, rows: int, in_features: int, rank: int, alpha: float,
                 dropout: float, generator: torch.Generator, device=None, dtype=None):
        super().__init__()
        self.weight_name, self.start, self.rows = weight_name, start, rows
        self.scale = alpha / rank
        # Kaiming-uniform as nn.Linear initialises a weight (kaiming_uniform_ with a=sqrt(5) is
        # U(-1/sqrt(in), 1/sqrt(in))), and as PEFT initialises A. Drawn on the CPU from apply_lora's
        # own generator: the same adapters on every rank and device, whatever ran before.
        bound = 1 / math.sqrt(in_features)
        A = torch.empty(rank, in_features).uniform_(-bound, bound, generator=generator)
        self.A = nn.Parameter(A.to(device=device, dtype=dtype))
        self.B = nn.Parameter(torch.zeros(rows, rank, device=device, dtype=dtype))
        self.dropout = nn.Dropout(dropout)
        self.enabled, self.merged = True, False

    @property
    def active(self) -> bool:   # adds its update in forward (a merged adapter is already inside W)
        return self.enabled and not self.merged

    def forward(self, x):   # (..., in) -> (..., rows)
        return F.linear(F.linear(self.dropout(x), self.A), self.B) * self.scale

    def delta_weight(self):   # the update as a block of W's rows: (rows, in)
        return (self.B @ self.A) * self.scale


class LoRAEmbedding(nn.Module):
    """The adapter of the token embedding E (vocab x dim): E[id] + (alpha / r) * B A[:, id]. Shapes
    as PEFT's (A: r x vocab, B: dim x r), so the export is a rename. A lookup has no fan-in to scale
    by, so A is N(0, 1); B is zero as above. No dropout on ids (PEFT has none either)."""

    def __init__(self, vocab: int, dim: int, rank: int, alpha: float, generator: torch.Generator, device=None,
                 dtype=None):
        super().__init__()
        self.weight_name, self.start, self.rows = "tok_embeddings", 0, vocab
        self.scale = alpha / rank
        self.A = nn.Parameter(torch.randn(rank, vocab, generator=generator).to(device=device, dtype=dtype))
        self.B = nn.Parameter(torch.zeros(dim, rank, device=device, dtype=dtype))
        self.enabled, self.merged = True, False

    active = LoRALinear.active

    def forward(self, idx):   # (B, T) ids -> (B, T, dim)
        return F.linear(F.embedding(idx, self.A.t()), self.B) * self.scale

    def head(self, h):   # a tied output head reads the same updated matrix: h (E + dE)^T
        return F.linear(F.linear(h, self.B.t()), self.A.t()) * self.scale

    def delta_weight(self):   # (vocab, dim)
        return (self.B @ self.A).t() * self.scale


def lora_add(y, x, adapters: nn.ModuleDict, *names: str, first_row: int = 0):
    """y = x W^T for rows first_row.. of a (fused) weight: add the update of each named, active
    adapter to its own columns of y. In place: the matmul that made y does not keep y for its
    backward, so autograd allows it (and it spares a copy of y per target)."""
    for name in names:
        if name in adapters and adapters[name].active:
            a = adapters[name]
            delta = a(x)
            y.narrow(-1, a.start - first_row, delta.size(-1)).add_(delta)
    return y


def apply_lora(model: nn.Module, rank: int, alpha: float, dropout: float = 0.0, targets=LORA_TARGETS,
               embeddings: bool = False, seed: int = 0) -> nn.Module:
    """Freeze every parameter of `model` and add adapters on `targets` (of LORA_TARGETS) in every
    block, plus the token embedding with embeddings=True. In place; returns the model. Adapters
    are created on the weights' device and dtype (the meta device included); A is drawn from
    `seed` alone."""
    unknown = set(targets) - set(LORA_TARGETS)
    if unknown or not targets:
        raise ValueError(f"LoRA targets must be a non-empty subset of {','.join(LORA_TARGETS)}; got {list(targets)}")
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    model.requires_grad_(False)
    c = model.config
    q, kv, h = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.hidden_dim
    w = model.tok_embeddings.weight
    g = torch.Generator().manual_seed(seed)
    kw = dict(rank=rank, alpha=alpha, dropout=dropout, generator=g, device=w.device, dtype=w.dtype)
    for block in model.layers:
        att, ffn = block.attention, block.feed_forward
        # target -> (owner, linear, first row, rows); in_features is the linear's input width
        where = {"q": (att, "wqkv", 0, q), "k": (att, "wqkv", q, kv), "v": (att, "wqkv", q + kv, kv),
                 "o": (att, "wo", 0, c.dim), "gate": (ffn, "w13", 0, h), "up": (ffn, "w13", h, h),
                 "down": (ffn, "w2", 0, c.dim)}
        for owner in (att, ffn):
            mine = {t: LoRALinear(name, start, rows, getattr(owner, name).in_features, **kw)
                    for t, (o, name, start, rows) in where.items() if o is owner and t in targets}
            if mine:
                owner.lora = nn.ModuleDict(mine)
    if embeddings:
        model.lora = nn.ModuleDict({"embed": LoRAEmbedding(c.vocab_size, c.dim, rank, alpha, g, w.device, w.dtype)})
    return model


def lora_adapters(model: nn.Module):
    """(owner, adapter name, adapter) for every adapter in the model."""
    for owner in model.modules():
        if isinstance(getattr(owner, "lora", None), nn.ModuleDict):
            for name, a in owner.lora.items():
                yield owner, name, a


@torch.no_grad()
def merge_lora(model: nn.Module, sign: float = 1.0):
    """Fold every adapter into its frozen weight (W += (alpha/r) B A); sign=-1 takes it out again
    (unmerge_lora). Merged, a forward costs what the base model's does. Merge then unmerge gives
    W back up to float rounding (~1e-7 relative), not bit for bit."""
    for owner, _, a in lora_adapters(model):
        if a.merged == (sign > 0):
            continue
        w = getattr(owner, a.weight_name).weight
        w.narrow(0, a.start, a.rows).add_(a.delta_weight().to(w.dtype), alpha=sign)
        a.merged = sign > 0


def unmerge_lora(model: nn.Module):
    merge_lora(model, sign=-1.0)


def strip_lora(model: nn.Module) -> nn.Module:
    """Merge, then drop the adapters: a plain Llama (e.g. to save a whole checkpoint)."""
    merge_lora(model)
    for owner in model.modules():
        if isinstance(getattr(owner, "lora", None), nn.ModuleDict):
            owner.lora = None
    return model


class BaseView:
    """A LoRA model called with its adapters off: the frozen base, as a reference model that holds no
    weights of its own (rlhf_ppo.py's pi_ref). Callable like the model; nothing to move or freeze."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, *args, **kwargs):
        with lora_disabled(self.model):
            return self.model(*args, **kwargs)

    def parameters(self):
        return iter(())

    def to(self, *args, **kwargs):
        return self

    cpu = to


@contextlib.contextmanager
def lora_disabled(model: nn.Module):
    """Switch every adapter off inside the block: the model computes its base weights' outputs,
    exactly (the update is skipped, not subtracted). The reference model of DPO/PPO/GRPO for free."""
    adapters = [a for _, _, a in lora_adapters(model)]
    if any(a.merged for a in adapters):
        raise RuntimeError("merged LoRA adapters cannot be switched off; unmerge_lora(model) first")
    states = [a.enabled for a in adapters]
    for a in adapters:
        a.enabled = False
    try:
        yield model
    finally:
        for a, s in zip(adapters, states):
            a.enabled = s
