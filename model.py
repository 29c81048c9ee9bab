"""
model.py -- the LLaMA architecture in one file, the first file a student should open.

    from model import Llama, LlamaConfig
    model = Llama(LlamaConfig.from_preset("lab"))
    logits, loss = model(idx, targets)            # idx, targets: (B, T) token ids
    new_ids = model.generate([[1, 42, 7]], max_new_tokens=32, temperature=0)

What is in here, top to bottom:
  LlamaConfig      hyper-parameters + named presets (LLaMA-1/2 shapes, lab sizes)
  RMSNorm          LLaMA's normalisation (no mean subtraction, no bias)
  rotary helpers   RoPE in Meta's interleaved-pair layout (see the HF section for the trap)
  Attention        grouped-query attention, a fused (SDPA) and a manual teaching path
  FeedForward      SwiGLU MLP
  KVCache          preallocated keys/values for generation
  Block            pre-norm residual block
  CrossEntropy     the loss, with its gradient (softmax - onehot) written out
  Llama            embedding, blocks, head, init, forward, KV-cache generation (greedy/top-k/top-p)
  FLOPs / MFU      the PaLM-appendix estimate used by pretrain.py's logs
  (LoRA            the adapters live in lora.py; the blocks below call lora_add when present)
  HuggingFace      save_hf / from_hf (safetensors written and read by hand: no extra dependency)

Papers: LLaMA (Touvron et al. 2023a), Llama 2 (Touvron et al. 2023b), RoFormer (Su et al. 2021),
GLU variants (Shazeer 2020), RMSNorm (Zhang & Sennrich 2019), GQA (Ainslie et al. 2023).
"""
from __future__ import annotations

import json
import math
import mmap
import os
import re
from dataclasses import asdict, dataclass, fields
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from lora import lora_add   # LoRA adapters, when a fine-tuning stage adds them (lora.py)

# -----------------------------------------------------------------------------
# Configuration


@dataclass
class LlamaConfig:
    dim: int = 256                      # model width (d_model)
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: Optional[int] = None    # < n_heads: grouped-query attention; 1: multi-query; None: = n_heads
    vocab_size: int = 4096
    hidden_dim: Optional[int] = None    # SwiGLU width; None derives it the LLaMA way (see __post_init__)
    multiple_of: int = 32               # hidden_dim is rounded up to a multiple of this (hardware friendly)
    ffn_dim_multiplier: Optional[float] = None  # Llama-2 70B uses 1.3
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 256
    tie_embeddings: bool = False        # share the input embedding with the output head
    dropout: float = 0.0
    attn: str = "sdpa"                  # "sdpa" (fused kernels) or "manual" (written out for teaching)

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.hidden_dim is None:
            # LLaMA: start from the classic 4*dim MLP, keep 2/3 of it because SwiGLU has three
            # matrices instead of two (same parameter count), then round up to multiple_of.
            hidden = int(2 * (4 * self.dim) / 3)
            if self.ffn_dim_multiplier is not None:
                hidden = int(self.ffn_dim_multiplier * hidden)
            self.hidden_dim = self.multiple_of * math.ceil(hidden / self.multiple_of)
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        if (self.dim // self.n_heads) % 2:
            raise ValueError("head_dim must be even for rotary embeddings")
        if self.attn not in ("sdpa", "manual"):
            raise ValueError(f"attn must be 'sdpa' or 'manual', got {self.attn!r}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LlamaConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown LlamaConfig fields: {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "LlamaConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


# Published shapes. LLaMA-1: Touvron et al. 2023a, Table 2; Llama 2: the released params.json files.
# Parameter counts (tests/test_model.py checks these on the meta device): 7B ~ 6.74e9, 13B ~ 13.0e9,
# 33B ~ 32.5e9, 65B ~ 65.2e9, Llama-2-70B ~ 69.0e9.
_L1 = dict(vocab_size=32000, multiple_of=256, norm_eps=1e-6, max_seq_len=2048)
_L2 = dict(vocab_size=32000, multiple_of=256, norm_eps=1e-5, max_seq_len=4096)
PRESETS = {
    "llama1-7b": dict(_L1, dim=4096, n_layers=32, n_heads=32),
    "llama1-13b": dict(_L1, dim=5120, n_layers=40, n_heads=40),
    "llama1-33b": dict(_L1, dim=6656, n_layers=60, n_heads=52),
    "llama1-65b": dict(_L1, dim=8192, n_layers=80, n_heads=64),
    "llama2-7b": dict(_L2, dim=4096, n_layers=32, n_heads=32),
    "llama2-13b": dict(_L2, dim=5120, n_layers=40, n_heads=40),
    "llama2-70b": dict(_L2, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8,
                       ffn_dim_multiplier=1.3, multiple_of=4096),
    # MiniLLM-like sizes for one GPU: ~0.22B and ~0.95B parameters with a 32k vocabulary.
    "0.2b": dict(vocab_size=32000, dim=1024, n_layers=12, n_heads=16, multiple_of=256, max_seq_len=1024),
    "1b": dict(vocab_size=32000, dim=2048, n_layers=16, n_heads=16, multiple_of=256, max_seq_len=2048),
    # The CPU lab model (~2.0M parameters; vocab = the shipped tokenizer/lab.model's 2048) and a
    # toy for unit tests.
    "lab": dict(vocab_size=2048, dim=192, n_layers=4, n_heads=6, n_kv_heads=2, max_seq_len=256,
                tie_embeddings=True),
    "tiny": dict(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64),
}

# Dense bf16 peak FLOP/s per device, for MFU (spec sheets; sparsity figures excluded).
PEAK_FLOPS = {"A100": 312e12, "H100": 989e12, "H200": 989e12, "A10G": 125e12, "L4": 121e12, "L40S": 362e12,
              "4090": 165e12}


def peak_flops(device_name: str) -> Optional[float]:
    """PEAK_FLOPS of a device name as CUDA reports it ("NVIDIA A100-SXM4-80GB", "NVIDIA L40S"), or
    None. Whole words only: a substring test finds "L4" inside "L40S" (3x too low a peak, MFU 3x
    too high)."""
    words = set(re.split(r"[\s_-]+", device_name))
    return next((f for k, f in PEAK_FLOPS.items() if k in words), None)

# -----------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    """x / rms(x) * weight, with rms(x) = sqrt(mean(x^2) + eps) over the last dimension. Computed
    in float32 even under bf16 autocast: the mean of squares of large activations loses too much
    precision in bf16.

    Training goes through RMSNormFunction below, with the backward written out: autograd's
    backward of the plain formula is ~14 elementwise ops and keeps two full-size tensors per
    norm; the hand-written one is 6 ops and keeps one. Measured on CPU at dim 384:
    forward+backward of a norm ~2x faster, ~3% of a whole training step. With no gradient to
    compute (generation, evaluation) the same forward formula runs on its own (rms_scale), in
    place where it can, so training and inference normalise with the same arithmetic. (F.rms_norm
    is the same maths in one call, but on CPU it is ~10 internal ops with two copies; this way
    batch-1 decoding measured ~15% faster per token, see Llama.generate for why such calls count.)"""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        # eps as a 0-dim tensor: a Python float operand is wrapped into a new tensor by the
        # dispatcher on every call. A buffer follows .to(device); not saved (persistent=False).
        self.register_buffer("eps_tensor", torch.tensor(eps), persistent=False)

    def forward(self, x):
        xf, w = cast(x, torch.float32), cast(self.weight, torch.float32)
        if torch.is_grad_enabled() and (xf.requires_grad or w.requires_grad):
            return cast(RMSNormFunction.apply(xf, w, self.eps_tensor), x.dtype)
        return cast((xf * rms_scale(xf, self.eps_tensor)).mul_(w), x.dtype)


def cast(t, dtype):
    """t.to(dtype), skipping the call when t already has that dtype (float32 everywhere outside
    bf16): a Python check is cheaper than a dispatcher call, and at batch-1 decoding the per-token
    cost is mostly such calls (see Llama.generate)."""
    return t if t.dtype == dtype else t.to(dtype)


def rms_scale(x, eps):
    """1 / sqrt(mean(x^2) + eps) per row (last dimension kept, size 1); eps a 0-dim tensor.
    mean(x^2) = ||x||^2 / dim: vector_norm is one pass, with no x^2 temporary, and addcmul makes
    eps + norm * norm / dim in one call (value= is a scalar argument, which costs nothing, unlike a
    Python number as an operand, which is wrapped into a new tensor). At batch-1 decoding these 3
    calls take about half the time of .square_().div_(dim).add_(eps).rsqrt_()'s 5."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return torch.addcmul(eps, norm, norm, value=1 / x.size(-1)).rsqrt_()


class RMSNormFunction(torch.autograd.Function):
    """y = xhat * w, xhat = x * r, r = 1 / sqrt(mean(x^2) + eps) (one r per row). Backward, with
    g = dL/dy:
        dL/dw = sum over rows of g * xhat
        dL/dx = r * (g*w - xhat * mean(g*w * xhat))
    The subtracted term is the component of g*w along xhat: moving x in that direction only
    rescales it, which the normalisation undoes, so it gets no gradient."""

    @staticmethod
    def forward(ctx, x, w, eps):
        r = rms_scale(x, eps)
        xhat = x * r
        ctx.save_for_backward(xhat, r, w)
        return xhat * w

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        xhat, r, w = ctx.saved_tensors
        gx = g * xhat
        dw = gx.reshape(-1, xhat.size(-1)).sum(0)
        # mean(g*w * xhat) per row = (g * xhat) @ w / dim: a matrix-vector product, no temporary
        dot = (gx @ w).unsqueeze_(-1).div_(xhat.size(-1))
        dx = torch.addcmul(g * w, xhat, dot, value=-1).mul_(r)   # r * (g*w - xhat * dot)
        return dx, dw, None


def rope_tables(head_dim: int, max_len: int, theta: float):
    """cos/sin tables of shape (max_len, head_dim // 2). Pair i of each head rotates with
    frequency theta^(-2i/head_dim): low pairs spin fast (local order), high pairs slowly."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x, rope):
    """Rotate x: (B, T, n_heads, head_dim) by position. rope: (T, head_dim/2, 2) or
    (B, T, head_dim/2, 2), the (cos, sin) of each position and pair (Llama.rope rows).

    Meta's layout: adjacent pairs (x0, x1), (x2, x3), ... are the 2-D planes that rotate.
    HuggingFace's layout instead pairs element i with element i + head_dim/2 ("rotate_half").
    Both are the same maths on a permuted q/k projection -- see _permute_for_hf below."""
    pairs = cast(x, torch.float32).unflatten(-1, (-1, 2))   # (B, T, H, hd/2, 2): the (x0, x1) planes
    if rope.is_complex():   # decoding: cos + i*sin prepared once per step for every layer (_decode_step)
        return cast(torch.view_as_real(torch.view_as_complex(pairs) * rope).flatten(-2), x.dtype)
    cos_sin = rope.float().unsqueeze(-3)          # (.., T, 1, hd/2, 2): the same for every head
    if torch.compiler.is_compiling():
        # torch.compile's inductor cannot generate code for complex numbers (it would fall back
        # to slow eager kernels): spell the rotation out in real arithmetic, which it fuses.
        x0, x1 = pairs.unbind(-1)
        cos, sin = cos_sin.unbind(-1)
        out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    else:
        # Eager: as in Meta's code, view each pair as x0 + i*x1 and multiply by cos + i*sin. One
        # complex multiply is exactly the 2x2 rotation, in a single kernel forward and backward:
        # measured ~2.5x faster on CPU than the four multiplies, stack and copies above.
        out = torch.view_as_real(torch.view_as_complex(pairs) * torch.view_as_complex(cos_sin))
    return cast(out.flatten(-2), x.dtype)                             # (B, T, H, hd)


# SDPA learnt grouped-query attention (enable_gqa) in torch 2.5; on older torch we repeat the
# key/value heads ourselves.
_SDPA_GQA = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


class KVCache:
    """Preallocated keys/values for incremental decoding: one (B, n_kv_heads, max_len, head_dim)
    buffer per layer, filled left to right. `key_valid` marks real (non-padding) slots, `filled`
    how many slots are in use (the same for every row, because prompts are left-padded)."""

    def __init__(self, config: LlamaConfig, batch: int, max_len: int, device, dtype):
        shape = (batch, config.n_kv_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.key_valid = torch.ones(batch, max_len, dtype=torch.bool, device=device)
        self.has_padding = False
        self.max_len = max_len
        self.filled = 0   # advanced by Llama._decode_step once every layer has written its chunk

    def update(self, layer: int, k, v):
        """Write a chunk's keys/values (B, n_kv_heads, T, head_dim) into the next free slots of
        `layer`; return the keys/values of all slots so far (views, no copies)."""
        start, T = self.filled, k.size(2)
        self.k[layer].narrow(2, start, T).copy_(k)   # narrow: one op, where [:, :, a:b] takes three
        self.v[layer].narrow(2, start, T).copy_(v)
        return self.k[layer].narrow(2, 0, start + T), self.v[layer].narrow(2, 0, start + T)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.attn = config.attn
        self.dropout = config.dropout
        # q, k and v come out of one fused matmul (one kernel instead of three); they are split
        # again when exporting to HuggingFace, which keeps three separate projections.
        # The linear layers inside a block are applied as F.linear(x, layer.weight): at batch-1
        # decoding a token costs ~40 small ops per block, and nn.Module.__call__'s bookkeeping
        # was a measurable part of that (the modules stay, for init, names and FSDP).
        self.wqkv = nn.Linear(config.dim, (config.n_heads + 2 * config.n_kv_heads) * self.head_dim, bias=False)
        self.wo = nn.Linear(config.n_heads * self.head_dim, config.dim, bias=False)
        self.lora: Optional[nn.ModuleDict] = None   # LoRA adapters q, k, v, o (apply_lora, below)

    def forward(self, x, rope, mask=None, cache: Optional[KVCache] = None, layer: int = 0):
        """x: (B, T, dim). rope: see apply_rope. mask: None means plain causal attention;
        otherwise a bool (B, 1, T, S) tensor, True where a query may attend to a key."""
        B, T, _ = x.shape
        H, Hkv = self.n_heads, self.n_kv_heads
        qkv = F.linear(x, self.wqkv.weight)
        if self.lora is not None:
            qkv = lora_add(qkv, x, self.lora, "q", "k", "v")
        qkv = qkv.view(B, T, H + 2 * Hkv, self.head_dim)
        qk, v = qkv.split_with_sizes([H + Hkv, Hkv], dim=2)
        q, k = apply_rope(qk, rope).split_with_sizes([H, Hkv], dim=2)   # rotate q and k in one go
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)
        if cache is not None:   # append this chunk, then attend over everything cached so far
            k, v = cache.update(layer, k, v)
        dropout = self.dropout if self.training else 0.0
        if self.attn == "sdpa":
            y = self._sdpa(q, k, v, mask, dropout)
        else:
            y = self._manual(q, k, v, mask, dropout)
        y = y.transpose(1, 2).reshape(B, T, H * self.head_dim)  # (B, T, dim)
        out = F.linear(y, self.wo.weight)
        return out if self.lora is None else lora_add(out, y, self.lora, "o")

    def _repeat_kv(self, t):
        """GQA: each key/value head serves n_heads / n_kv_heads query heads."""
        n_rep = self.n_heads // self.n_kv_heads
        return t if n_rep == 1 else t.repeat_interleave(n_rep, dim=1)

    def _sdpa(self, q, k, v, mask, dropout):
        # Fused kernels: FlashAttention / memory-efficient on GPU, a fused flash kernel on CPU.
        # Pitfall: is_causal=True aligns the triangle top-left, which is wrong when the query
        # chunk is shorter than the keys (decoding with a cache), so callers pass a mask then.
        gqa = {}
        if self.n_kv_heads != self.n_heads:
            # enable_gqa: the kernel indexes the shared head, no copies. But on CUDA only the flash
            # kernel takes it, and flash takes no mask: a mask (padding, cached chunks) with
            # enable_gqa falls back to the O(T^2)-memory math kernel (pytorch#139586). Repeating
            # k and v there keeps the memory-efficient kernel. (CPU's flash kernel takes both.)
            if _SDPA_GQA and (mask is None or q.device.type != "cuda"):
                gqa = {"enable_gqa": True}
            else:
                k, v = self._repeat_kv(k), self._repeat_kv(v)
        T, S = q.size(-2), k.size(-2)
        if mask is None and T > 1 and T != S:   # a chunk after cached keys: bottom-right causal mask
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
        # A single new query may see every cached key: no mask, not causal.
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                              is_causal=mask is None and T > 1, **gqa)

    def _manual(self, q, k, v, mask, dropout):
        # The same computation written out, step by step (Vaswani et al. 2017, eq. 1).
        k, v = self._repeat_kv(k), self._repeat_kv(v)
        T, S = q.size(-2), k.size(-2)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)      # (B, H, T, S)
        if mask is None:   # causal: query t sees keys 0..t
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
        scores = scores.masked_fill(~mask, float("-inf"))
        probs = F.softmax(scores.float(), dim=-1).type_as(q)              # rows sum to 1
        probs = F.dropout(probs, p=dropout, training=dropout > 0)
        return probs @ v                                                   # (B, H, T, hd)


class FeedForward(nn.Module):
    """SwiGLU (Shazeer 2020): down(silu(gate(x)) * up(x)). Gate and up are stored as one matrix
    w13 = [w1; w3] (one parameter; split again for HuggingFace)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.hidden_dim = config.hidden_dim
        self.w13 = nn.Linear(config.dim, 2 * config.hidden_dim, bias=False)  # [gate (w1); up (w3)]
        self.w2 = nn.Linear(config.hidden_dim, config.dim, bias=False)       # down
        self.dropout = nn.Dropout(config.dropout)
        self.lora: Optional[nn.ModuleDict] = None   # LoRA adapters gate, up, down (apply_lora, below)

    def forward(self, x):
        # Multiplied as two halves (row slices of w13 are views, nothing is copied): measured on CPU,
        # one (T, 2*hidden) product chunked into strided halves made silu and the backward slower,
        # ~4% of a whole training step.
        w1, w3 = self.w13.weight.split_with_sizes([self.hidden_dim, self.hidden_dim])
        if self.lora is None:
            y = F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), self.w2.weight)
        else:   # the same products, each plus its adapter's update when it has one
            gate = lora_add(F.linear(x, w1), x, self.lora, "gate")
            up = lora_add(F.linear(x, w3), x, self.lora, "up", first_row=self.hidden_dim)   # w13's 2nd half
            h = F.silu(gate) * up
            y = lora_add(F.linear(h, self.w2.weight), h, self.lora, "down")
        return self.dropout(y) if self.training else y   # (eval: skip the no-op call, see Block)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = FeedForward(config)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, rope, mask=None, cache=None, layer=0):
        y = self.attention(self.attention_norm(x), rope, mask, cache, layer)
        # Dropout is the identity in eval mode; skipping the call there saves ~1% of a decoding step.
        x = x + (self.resid_dropout(y) if self.training else y)
        return x + self.feed_forward(self.ffn_norm(x))


class CrossEntropy(torch.autograd.Function):
    """Mean next-token cross-entropy over the targets that are not -100 (0, not NaN, if none).
    Same value and gradient as F.cross_entropy(ignore_index=-100), cheaper in memory and time.

    loss_i = logsumexp(z_i) - z_i[y_i], and its gradient is softmax(z_i) - onehot(y_i) (times
    1/n_valid). F.cross_entropy keeps the whole (N, vocab) log-softmax alive for the backward
    and then builds two more (N, vocab) tensors; here the forward keeps one number per row (the
    logsumexp) and the backward writes the gradient in one pass over the logits, which the caller
    holds anyway. At vocab 32k that is ~130 MB less per 1k tokens, and ~1.5% of a CPU step."""

    @staticmethod
    def forward(ctx, logits, targets):          # logits (N, vocab) float32, targets (N,)
        valid = targets != -100
        safe = targets.masked_fill(~valid, 0)   # any real index; these rows get weight 0
        if logits.device.type == "cpu":
            # logsumexp builds an (N, vocab) temporary (logits - rowmax). On CPU one that big
            # (64 MB at 2k tokens x 8k vocab) is fresh from the OS every step and costs more in
            # page faults than in arithmetic; ~2 MB row chunks are recycled and stay in cache
            # (measured: 3x faster). GPU allocators keep their blocks: one call there.
            rows = max(1, 2**19 // logits.size(1))
            lse = torch.cat([torch.logsumexp(chunk, dim=-1) for chunk in logits.split(rows)])
        else:
            lse = torch.logsumexp(logits, dim=-1)                          # (N,)
        picked = logits.gather(1, safe[:, None]).squeeze(1)                # z_i[y_i]
        n_valid = valid.sum().clamp(min=1)
        ctx.save_for_backward(logits, lse, safe, valid, n_valid)
        return ((lse - picked) * valid).sum() / n_valid

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        logits, lse, safe, valid, n_valid = ctx.saved_tensors
        w = valid * (grad / n_valid)            # d loss / d loss_i: 0 on ignored rows
        # w * softmax(z) = exp(z - lse + log w) in one allocation; log(0) = -inf gives exact zeros
        g = (logits - (lse - w.log())[:, None]).exp_()
        g.scatter_add_(1, safe[:, None], -w[:, None])                      # minus w * onehot
        return g, None


# -----------------------------------------------------------------------------
# The model


class Llama(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.lora: Optional[nn.ModuleDict] = None   # the optional embedding adapter (apply_lora, below)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # (max_seq_len, head_dim/2, 2): cos and sin of every position and rotary pair. Not
        # persistent: derived from the config, so it stays out of checkpoints.
        self.register_buffer("rope", torch.stack(rope_tables(config.head_dim, config.max_seq_len,
                                                             config.rope_theta), dim=-1), persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """GPT-2/LLaMA-style init: N(0, 0.02) for every matrix; the two projections that write into
        the residual stream (attention out, MLP down) get 0.02/sqrt(2*n_layers) so the residual's
        variance does not grow with depth (GPT-2 paper, section 2.3). Chosen by reference, not by
        parameter name."""
        std = 0.02
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
                module.eps_tensor.fill_(module.eps)   # (a buffer: garbage after meta-device to_empty)
        for block in self.layers:
            for residual_proj in (block.attention.wo, block.feed_forward.w2):
                nn.init.normal_(residual_proj.weight, mean=0.0, std=std / math.sqrt(2 * self.config.n_layers))
        self.rope.copy_(torch.stack(rope_tables(self.config.head_dim, self.config.max_seq_len,
                                                self.config.rope_theta), dim=-1))

    # --- forward -------------------------------------------------------------

    def _embed(self, idx):
        h = self.tok_embeddings(idx)
        return h if self.lora is None else lora_add(h, idx, self.lora, "embed")

    def _head(self, h):
        logits = self.output(h)   # the module call: under FSDP its unit gathers the weight in a pre-forward hook
        if self.lora is not None and self.config.tie_embeddings and self.lora["embed"].active:
            # A tied embedding adapter changes the shared matrix, so the head gets it too (as merging does).
            logits = logits + self.lora["embed"].head(h)
        return logits

    def _rope_and_mask(self, T, attention_mask, device):
        """Positions and the attention mask for a full (non-cached) forward.
        Without attention_mask: positions 0..T-1 and the fast causal path.
        With attention_mask (B, T), 1 = real token, 0 = padding (left or right): positions count
        real tokens only, so a left-padded sequence gets the same positions -- and the same
        outputs -- as the unpadded one."""
        if T > self.config.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len {self.config.max_seq_len}")
        if attention_mask is None:
            return self.rope[:T], None
        real = attention_mask.bool()
        pos = (real.long().cumsum(-1) - 1).clamp(min=0)                           # (B, T)
        rope = self.rope[pos]                                                     # (B, T, hd/2, 2)
        causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
        mask = causal & real[:, None, None, :]
        # A padding query would see no key at all (softmax of all -inf = NaN): let it see itself.
        mask = mask | torch.eye(T, dtype=torch.bool, device=device)
        return rope, mask

    def hidden_states(self, idx, attention_mask=None):
        """Final normalised hidden states (B, T, dim): what the LM head, and the reward and
        value heads of reward.py / rlhf_ppo.py, read."""
        rope, mask = self._rope_and_mask(idx.size(1), attention_mask, idx.device)
        h = self.dropout(self._embed(idx))
        for block in self.layers:
            h = block(h, rope, mask)
        return self.norm(h)

    def forward(self, idx, targets=None, attention_mask=None):
        """idx: (B, T) ids. targets: (B, T) next-token ids, -100 = ignore (prompt/padding in SFT).
        Returns (logits (B, T, vocab) in float32, loss or None)."""
        h = self.hidden_states(idx, attention_mask)
        # float32 logits even under bf16 autocast: the softmax over a 32k vocabulary and the
        # log-probs used by DPO/PPO need the precision.
        logits = self._head(h).float()
        loss = None
        if targets is not None:
            loss = CrossEntropy.apply(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    # --- generation with a KV cache -------------------------------------------

    def _decode_step(self, idx, cache: KVCache, positions):
        """Run new tokens idx (B, T) through the model using and extending the cache; returns the
        last position's logits (B, vocab). positions: (B, T) rotary positions of the new tokens."""
        B, T = idx.shape
        start = cache.filled
        S = start + T
        # index_select, not self.rope[positions]: advanced indexing is ~5x slower to dispatch. The rows
        # are turned into complex cos + i*sin here, once, instead of in every layer's apply_rope.
        rope = self.rope.index_select(0, positions.flatten()).view(B, T, 1, -1, 2).float()
        rope = torch.view_as_complex(rope)                                      # (B, T, 1, hd/2)
        mask = None   # no padding anywhere: the attention layer handles causality by itself
        if cache.has_padding:
            # Query t (absolute slot start+t) sees valid keys up to itself; pads see themselves.
            q_slot = torch.arange(start, S, device=idx.device)[:, None]
            k_slot = torch.arange(S, device=idx.device)[None, :]
            mask = ((k_slot <= q_slot)[None] & cache.key_valid[:, None, :S]) | (k_slot == q_slot)[None]
            mask = mask[:, None]                                                  # (B, 1, T, S)
        h = self._embed(idx)
        for i, block in enumerate(self.layers):
            h = block(h, rope, mask, cache, i)
        cache.filled = S
        return self._head(self.norm(h[:, -1])).float()

    def _prefill(self, prompts: list[list[int]], max_len: int):
        """Left-pad the prompts into one (B, L) batch, allocate a cache of max_len slots and run the
        prompts through it. Left padding puts every sequence's next token in the same column, so
        one decode step serves the whole batch; the cache records which slots are padding, and
        positions count real tokens only (a padded prompt decodes exactly like an unpadded one).
        Returns (logits of each prompt's last token (B, vocab), cache, next positions (B, 1))."""
        B, L = len(prompts), max(len(p) for p in prompts)
        device = self.tok_embeddings.weight.device
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) \
            else self.tok_embeddings.weight.dtype
        cache = KVCache(self.config, B, max_len, device, dtype)
        idx = torch.zeros(B, L, dtype=torch.long)
        for b, p in enumerate(prompts):
            idx[b, L - len(p):] = torch.tensor(p, dtype=torch.long)
            cache.key_valid[b, :L - len(p)] = False
        cache.has_padding = any(len(p) < L for p in prompts)
        positions = (cache.key_valid[:, :L].long().cumsum(-1) - 1).clamp(min=0)  # (B, L)
        logits = self._decode_step(idx.to(device), cache, positions)
        return logits, cache, positions[:, -1:] + 1

    @torch.inference_mode()
    def generate(self, prompts, max_new_tokens: int, temperature: float = 1.0, top_k: Optional[int] = None,
                 top_p: Optional[float] = None, eos_id=None, callback: Optional[Callable[[int, int], None]] = None,
                 generator: Optional[torch.Generator] = None,
                 all_done: Optional[Callable[[bool], bool]] = None) -> list[list[int]]:
        """Sample continuations for a batch of prompts of different lengths.

        prompts: a list of id lists, or a (B, T) / (T,) tensor. temperature=0 is greedy.
        eos_id: an id or a list of ids that end a sequence (kept as its last token).
        callback(i, token): called for every new token of sequence i (streaming).
        generator: a torch.Generator for reproducible sampling.
        all_done(stopping_here) -> stop: whether every process stops now (common.generate under FSDP,
        where each forward all-gathers weights with the other processes and none may stop alone). A
        process whose answers all ended keeps stepping without sampling (its generator stays where a
        lone run's would).
        Returns the new tokens of each sequence (prompt excluded).

        Batch-1 decoding is bound by memory and per-token overhead, not FLOPs: every weight is read
        once per token (matrix-vector products), and each of the ~45 small ops per block pays its
        dispatch cost -- on CPU 3-5x its warm cost, because the weights just streamed through the
        caches evicted the interpreter's and the dispatcher's working set. So: the cache is
        allocated once, a step is one forward of one token per sequence, no op is spent that can be
        skipped, and the only host sync per step is the sampled token ids (needed anyway for EOS
        and streaming)."""
        if torch.is_tensor(prompts):
            prompts = prompts.tolist() if prompts.dim() == 2 else [prompts.tolist()]
        if len(prompts) == 0 or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token (e.g. BOS)")
        stop = set([eos_id] if isinstance(eos_id, int) else (eos_id or []))
        B, L = len(prompts), max(len(p) for p in prompts)
        total = L + max_new_tokens
        if total > self.config.max_seq_len:
            raise ValueError(f"prompt ({L}) + max_new_tokens ({max_new_tokens}) exceeds max_seq_len "
                             f"{self.config.max_seq_len}; shorten the prompt or generate fewer tokens")
        logits, cache, next_pos = self._prefill(prompts, total)
        out = [[] for _ in range(B)]
        done = [False] * B
        for step in range(max_new_tokens):
            if not all(done):
                token = sample_next(logits, temperature, top_k, top_p, generator)   # (B,)
                for b, t in enumerate(token.tolist()):
                    if not done[b]:
                        out[b].append(t)
                        if callback is not None:
                            callback(b, t)
                        done[b] = t in stop
            stopping = all(done) or step == max_new_tokens - 1
            if stopping if all_done is None else all_done(stopping):
                break   # (no forward for a token nobody will sample from)
            # Finished rows keep decoding (their tokens are ignored): the batch stays rectangular.
            logits = self._decode_step(token[:, None], cache, next_pos)
            next_pos = next_pos + 1
        return out

    # --- accounting ------------------------------------------------------------

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (tied weights counted once). non_embedding drops the input embedding."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and not self.config.tie_embeddings:
            n -= self.tok_embeddings.weight.numel()
        return n

    def flops_per_token(self, seq_len: Optional[int] = None) -> float:
        """Training FLOPs per token, PaLM appendix B: 6N + 12 * L * H * Q * T. N counts the weights
        that take part in a matmul: every matrix except the input embedding, which is a table
        lookup (tied, it is also the output head, a matmul, and counts once); norm gains are not
        matmuls. 6 = 2 FLOPs per multiply-add x (forward + 2x in backward). The second term is
        attention's QK^T and AV over a context of T (H heads of size Q), which 6N does not see."""
        c = self.config
        T = seq_len or c.max_seq_len
        n_matmul = sum(p.numel() for p in self.parameters() if p.dim() == 2)   # a tied weight once
        if not c.tie_embeddings:
            n_matmul -= self.tok_embeddings.weight.numel()
        return 6 * n_matmul + 12 * c.n_layers * c.n_heads * c.head_dim * T

    def estimate_mfu(self, tokens_per_sec: float, peak_flops: float, seq_len: Optional[int] = None) -> float:
        """Model FLOPs utilisation: achieved model FLOP/s over the device's peak."""
        return self.flops_per_token(seq_len) * tokens_per_sec / peak_flops

    # --- HuggingFace interop -----------------------------------------------------

    def save_hf(self, out_dir: str, dtype: Optional[torch.dtype] = None, bos_id: int = 1, eos_id: int = 2):
        """Write config.json + model.safetensors that transformers.LlamaForCausalLM loads."""
        os.makedirs(out_dir, exist_ok=True)
        c = self.config
        hf_config = {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": c.dim, "intermediate_size": c.hidden_dim, "num_hidden_layers": c.n_layers,
            "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads, "head_dim": c.head_dim,
            "vocab_size": c.vocab_size, "max_position_embeddings": c.max_seq_len, "rms_norm_eps": c.norm_eps,
            "rope_theta": c.rope_theta, "tie_word_embeddings": c.tie_embeddings, "hidden_act": "silu",
            "attention_bias": False, "mlp_bias": False, "bos_token_id": bos_id, "eos_token_id": eos_id,
            "torch_dtype": str(dtype or self.tok_embeddings.weight.dtype).replace("torch.", ""),
        }
        state = to_hf_state_dict(self.state_dict(), c)
        if dtype is not None:
            state = {k: v.to(dtype) for k, v in state.items()}
        _atomic_write_json(os.path.join(out_dir, "config.json"), hf_config)
        write_safetensors(os.path.join(out_dir, "model.safetensors"), state)

    @classmethod
    def from_hf(cls, hf_dir: str, **overrides) -> "Llama":
        """Load a HuggingFace LLaMA directory (ours, or a real LLaMA-architecture checkpoint)."""
        config = hf_config(hf_dir, **overrides)
        model = cls(config)
        load_state_dict_checked(model, from_hf_state_dict(read_hf_weights(hf_dir), config))
        return model


def hf_config(hf_dir: str, **overrides) -> LlamaConfig:
    """The LlamaConfig of a HuggingFace LLaMA directory, from its config.json alone (no weights read)."""
    with open(os.path.join(hf_dir, "config.json")) as f:
        hf = json.load(f)
    if hf.get("model_type", "llama") != "llama":
        raise ValueError(f"{hf_dir}: model_type {hf.get('model_type')!r} is not 'llama'")
    # transformers >= 5 nests rope_theta in "rope_parameters" (with a rope_type); older files
    # have a top-level rope_theta and an optional rope_scaling. Only plain RoPE is supported.
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    if scaling:
        raise ValueError(f"{hf_dir}: RoPE scaling {scaling} is not supported")
    for key, want in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if hf.get(key, want) != want:
            raise ValueError(f"{hf_dir}: {key}={hf[key]!r} is not LLaMA's ({want!r}); not supported")
    n_heads = hf["num_attention_heads"]
    fields_ = dict(
        dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads, vocab_size=hf["vocab_size"],
        hidden_dim=hf["intermediate_size"], norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
        max_seq_len=hf.get("max_position_embeddings", 2048),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)))
    if (hf.get("head_dim") or hf["hidden_size"] // n_heads) != hf["hidden_size"] // n_heads:
        raise ValueError(f"{hf_dir}: head_dim {hf['head_dim']} != hidden_size / num_attention_heads "
                         "is not supported")
    return LlamaConfig(**{**fields_, **overrides})   # overrides win (e.g. max_seq_len, dropout, attn)


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """One token per row of logits (B, vocab). temperature 0 = argmax. top_k keeps the k most
    likely tokens; top_p keeps the smallest set whose probability reaches p (nucleus, Holtzman
    et al. 2019)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p    # mass before this token already >= p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# -----------------------------------------------------------------------------
# Checkpoint helpers: shape-checked loading, HuggingFace names, safetensors by hand


def load_state_dict_checked(model: nn.Module, state: dict):
    """load_state_dict that names the offending tensor and both shapes when a config does not
    fit the weights (the default error drowns this in a list)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise ValueError(f"checkpoint does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise ValueError(f"checkpoint tensor {k!r} has shape {tuple(v.shape)} but the model's config "
                             f"expects {tuple(own[k].shape)}")
    model.load_state_dict(state, strict=True)


def _permute_for_hf(w, n_heads, head_dim):
    """The rotary trap. Our q/k rows come in Meta's interleaved pairs (x0,x1),(x2,x3)...; HF rotates
    element i with i + head_dim/2. Reordering each head's rows [0,2,4,..,1,3,5,..] turns one layout
    into the other, so the same weights give the same logits. Forget it and the model loads
    without error but speaks nonsense."""
    return w.view(n_heads, head_dim // 2, 2, -1).transpose(1, 2).reshape(n_heads * head_dim, -1)


def _permute_from_hf(w, n_heads, head_dim):
    return w.view(n_heads, 2, head_dim // 2, -1).transpose(1, 2).reshape(n_heads * head_dim, -1)


def to_hf_state_dict(state: dict, c: LlamaConfig) -> dict:
    hd, q_rows, kv_rows = c.head_dim, c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    out = {"model.embed_tokens.weight": state["tok_embeddings.weight"], "model.norm.weight": state["norm.weight"]}
    if not c.tie_embeddings:
        out["lm_head.weight"] = state["output.weight"]
    for i in range(c.n_layers):
        p, h = f"layers.{i}.", f"model.layers.{i}."
        q, k, v = state[p + "attention.wqkv.weight"].split([q_rows, kv_rows, kv_rows])
        gate, up = state[p + "feed_forward.w13.weight"].chunk(2)
        out.update({
            h + "self_attn.q_proj.weight": _permute_for_hf(q, c.n_heads, hd),
            h + "self_attn.k_proj.weight": _permute_for_hf(k, c.n_kv_heads, hd),
            h + "self_attn.v_proj.weight": v,
            h + "self_attn.o_proj.weight": state[p + "attention.wo.weight"],
            h + "mlp.gate_proj.weight": gate, h + "mlp.up_proj.weight": up,
            h + "mlp.down_proj.weight": state[p + "feed_forward.w2.weight"],
            h + "input_layernorm.weight": state[p + "attention_norm.weight"],
            h + "post_attention_layernorm.weight": state[p + "ffn_norm.weight"],
        })
    return {k: v.contiguous() for k, v in out.items()}


def from_hf_state_dict(hf: dict, c: LlamaConfig) -> dict:
    def get(name):
        if name not in hf:
            raise ValueError(f"HuggingFace weights lack {name!r}")
        return hf[name]
    out = {"tok_embeddings.weight": get("model.embed_tokens.weight"), "norm.weight": get("model.norm.weight")}
    out["output.weight"] = out["tok_embeddings.weight"] if c.tie_embeddings else get("lm_head.weight")
    for i in range(c.n_layers):
        p, h = f"layers.{i}.", f"model.layers.{i}."
        q = _permute_from_hf(get(h + "self_attn.q_proj.weight"), c.n_heads, c.head_dim)
        k = _permute_from_hf(get(h + "self_attn.k_proj.weight"), c.n_kv_heads, c.head_dim)
        out[p + "attention.wqkv.weight"] = torch.cat([q, k, get(h + "self_attn.v_proj.weight")])
        out[p + "attention.wo.weight"] = get(h + "self_attn.o_proj.weight")
        out[p + "feed_forward.w13.weight"] = torch.cat([get(h + "mlp.gate_proj.weight"), get(h + "mlp.up_proj.weight")])
        out[p + "feed_forward.w2.weight"] = get(h + "mlp.down_proj.weight")
        out[p + "attention_norm.weight"] = get(h + "input_layernorm.weight")
        out[p + "ffn_norm.weight"] = get(h + "post_attention_layernorm.weight")
    return out


# safetensors: an 8-byte little-endian header length, a JSON header {name: {dtype, shape,
# data_offsets}}, then the raw tensor bytes. Simple enough to write by hand, which keeps the
# `safetensors` package out of the runtime dependencies.
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
              torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL", torch.float64: "F64"}
_ST_DTYPES_INV = {v: k for k, v in _ST_DTYPES.items()}


def write_safetensors(path: str, tensors: dict):
    header, offset = {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)   # the format asks for an 8-byte aligned data section
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for t in tensors.values():
            f.write(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    os.replace(tmp, path)


def read_safetensors(path: str) -> dict:
    """name -> tensor of a .safetensors file, memory-mapped (copy-on-write), not read: a tensor's
    bytes come from disk when first touched, so copying some rows of a tensor reads only those
    rows (how common.load_model_sharded gives each FSDP rank just its shard). The tensors keep
    the mapping alive; writing to one never changes the file."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        dtype = _ST_DTYPES_INV[info["dtype"]]
        count = (end - start) // torch.empty((), dtype=dtype).element_size()
        flat = torch.frombuffer(data, dtype=dtype, count=count, offset=8 + n + start) if count \
            else torch.empty(0, dtype=dtype)
        out[name] = flat.reshape(info["shape"])
    return out


def read_hf_weights(hf_dir: str) -> dict:
    """All tensors of a HF checkpoint: model.safetensors, sharded safetensors (with an index), or
    pytorch_model*.bin (loaded with weights_only=True: a pickle must never run code). Safetensors
    are mapped, not read (see read_safetensors); .bin files, the older format, are read whole."""
    files = sorted(os.listdir(hf_dir))
    st = [f for f in files if f.endswith(".safetensors")]
    bins = [f for f in files if f.startswith("pytorch_model") and f.endswith(".bin")]
    state = {}
    if st:
        for f in st:
            state.update(read_safetensors(os.path.join(hf_dir, f)))
    elif bins:
        for f in bins:
            state.update(torch.load(os.path.join(hf_dir, f), map_location="cpu", weights_only=True))
    else:
        raise FileNotFoundError(f"{hf_dir}: no *.safetensors or pytorch_model*.bin weights found")
    return state


def _atomic_write_json(path: str, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)
