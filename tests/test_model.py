"""Tests for model.py: shapes and parameter counts of the published presets, the two attention
paths against each other, the loss, KV-cache decoding against full recomputation, sampling, FLOPs,
and HuggingFace interop against transformers.LlamaForCausalLM as the reference implementation.

Everything runs on CPU in float32 at toy sizes (the whole file takes a few seconds)."""
import json
import math
import os
import pickle

import pytest
import torch
import torch.nn.functional as F

import model as model_py
from model import Llama, LlamaConfig, load_state_dict_checked, sample_next, to_hf_state_dict


def tiny(**overrides) -> Llama:
    """The "tiny" preset (vocab 256, dim 64, 2 layers, 4 heads, 2 kv heads), seeded."""
    torch.manual_seed(overrides.pop("seed", 0))
    return Llama(LlamaConfig.from_preset("tiny", **overrides))


@pytest.fixture(autouse=True)
def _one_thread():
    # Toy shapes: threads only add scheduling noise (and other jobs share the 2 cores).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# -----------------------------------------------------------------------------
# Configuration and presets


@pytest.mark.parametrize("name, published", [
    ("llama1-7b", 6.74e9), ("llama1-13b", 13.0e9), ("llama1-33b", 32.5e9), ("llama1-65b", 65.2e9),
    ("llama2-7b", 6.74e9), ("llama2-13b", 13.0e9), ("llama2-70b", 69.0e9),
])
def test_preset_parameter_counts_match_published(name, published):
    with torch.device("meta"):   # shapes only: nothing is allocated
        m = Llama(LlamaConfig.from_preset(name))
    assert m.num_params() == pytest.approx(published, rel=0.01)


@pytest.mark.parametrize("name, hidden", [
    ("llama1-7b", 11008), ("llama1-13b", 13824), ("llama1-33b", 17920), ("llama1-65b", 22016),
    ("llama2-70b", 28672),
])
def test_hidden_dim_derivation(name, hidden):
    # 2/3 * 4 * dim (times ffn_dim_multiplier for 70B), rounded up to multiple_of: the released params.json shapes
    assert LlamaConfig.from_preset(name).hidden_dim == hidden


def test_config_rejects_bad_shapes():
    with pytest.raises(ValueError, match="n_kv_heads"):
        LlamaConfig(dim=64, n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="attn"):
        LlamaConfig(attn="flash")
    with pytest.raises(ValueError, match="unknown preset"):
        LlamaConfig.from_preset("llama9-1t")


# -----------------------------------------------------------------------------
# Attention paths, loss, autocast


def _left_pad_mask(B, T, pads):
    mask = torch.ones(B, T, dtype=torch.long)
    for b, p in enumerate(pads):
        mask[b, :p] = 0
    return mask


@pytest.mark.parametrize("n_kv_heads", [2, 1])     # GQA (2 query heads per kv head) and MQA
@pytest.mark.parametrize("padded", [False, True])
def test_sdpa_and_manual_attention_agree(n_kv_heads, padded):
    sdpa = tiny(n_kv_heads=n_kv_heads, attn="sdpa")
    manual = tiny(n_kv_heads=n_kv_heads, attn="manual")
    manual.load_state_dict(sdpa.state_dict())
    idx = torch.randint(0, 256, (3, 24))
    targets = torch.randint(0, 256, (3, 24))
    mask = _left_pad_mask(3, 24, [0, 5, 11]) if padded else None
    if padded:
        targets[mask == 0] = -100
    out = {}
    for name, m in (("sdpa", sdpa), ("manual", manual)):
        logits, loss = m(idx, targets, attention_mask=mask)
        loss.backward()
        out[name] = logits, {n: p.grad for n, p in m.named_parameters()}
    assert (out["sdpa"][0] - out["manual"][0]).abs().max() <= 1e-5
    for n, g in out["sdpa"][1].items():
        assert (g - out["manual"][1][n]).abs().max() <= 1e-5, n


def test_gqa_fallback_for_old_torch_matches(monkeypatch):
    # torch < 2.5 has no enable_gqa: the kv heads are repeated instead. Same numbers either way.
    m = tiny(n_kv_heads=1)
    idx = torch.randint(0, 256, (2, 16))
    ref = m(idx)[0]
    monkeypatch.setattr(model_py, "_SDPA_GQA", False)
    assert (m(idx)[0] - ref).abs().max() <= 1e-6


def test_rope_real_path_for_torch_compile_matches_complex(monkeypatch):
    """apply_rope multiplies complex numbers in eager mode and spells out the real 2x2 rotation
    under torch.compile (inductor has no complex codegen): same values and gradients."""
    x = torch.randn(2, 5, 3, 8, requires_grad=True)
    rope = Llama(LlamaConfig(dim=32, n_heads=4, n_layers=1, vocab_size=16)).rope[torch.tensor([[0, 1, 2, 3, 4],
                                                                                             [3, 4, 5, 9, 11]])]
    out = {}
    for compiling in (False, True):
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
        y = model_py.apply_rope(x, rope)
        (grad,) = torch.autograd.grad((y * torch.arange(8.0)).sum(), x)
        out[compiling] = y, grad
    assert (out[True][0] - out[False][0]).abs().max() <= 1e-6
    assert (out[True][1] - out[False][1]).abs().max() <= 1e-6
    # and it is a rotation of each (x0, x1) pair by position * theta^(-2i/hd)
    pos, i = 9, 1
    angle = pos * 10000.0 ** (-2 * i / 8)
    x0, x1 = x[1, 3, 0, 2 * i].item(), x[1, 3, 0, 2 * i + 1].item()
    y0, y1 = out[False][0][1, 3, 0, 2 * i].item(), out[False][0][1, 3, 0, 2 * i + 1].item()
    assert y0 == pytest.approx(x0 * math.cos(angle) - x1 * math.sin(angle), abs=1e-5)
    assert y1 == pytest.approx(x0 * math.sin(angle) + x1 * math.cos(angle), abs=1e-5)


def test_left_padding_does_not_change_outputs():
    m = tiny()
    seq = torch.randint(0, 256, (1, 10))
    ref = m(seq)[0]
    padded = torch.cat([torch.zeros(1, 6, dtype=torch.long), seq], dim=1)
    logits = m(padded, attention_mask=_left_pad_mask(1, 16, [6]))[0]
    assert (logits[:, 6:] - ref).abs().max() <= 1e-5


def test_ignored_targets_loss_is_masked_mean():
    m = tiny()
    idx = torch.randint(0, 256, (2, 12))
    targets = torch.randint(0, 256, (2, 12))
    targets[0, :5] = -100
    targets[1, 9:] = -100
    logits, loss = m(idx, targets)
    logp = torch.log_softmax(logits.double(), dim=-1)
    keep = targets != -100
    nll = -logp[keep].gather(1, targets[keep][:, None]).squeeze(1)
    assert loss.item() == pytest.approx(nll.mean().item(), rel=1e-6)
    # nothing to learn from: loss 0 (not NaN), and gradients stay finite (zero)
    _, loss = m(idx, torch.full_like(targets, -100))
    loss.backward()
    assert loss.item() == 0.0 and all(torch.isfinite(p.grad).all() for p in m.parameters())


@pytest.mark.parametrize("vocab", [50, 2**16])     # 2**16: the CPU forward takes logsumexp in 3 row chunks
@pytest.mark.parametrize("ignored", [0, 7, 24])   # none, some, all of the 24 targets ignored
def test_cross_entropy_matches_torch_value_and_gradient(ignored, vocab):
    logits = (3 * torch.randn(24, vocab, dtype=torch.float64)).requires_grad_()
    targets = torch.randint(0, vocab, (24,))
    targets[torch.randperm(24)[:ignored]] = -100
    loss = model_py.CrossEntropy.apply(logits, targets)
    (grad,) = torch.autograd.grad(2.5 * loss, logits)       # an upstream gradient != 1
    if ignored < 24:
        ref = F.cross_entropy(logits, targets, ignore_index=-100)
        (ref_grad,) = torch.autograd.grad(2.5 * ref, logits)
    else:   # F.cross_entropy gives NaN here; ours: nothing to learn, loss 0, gradient 0
        ref, ref_grad = torch.zeros(()), torch.zeros_like(logits)
    assert abs(loss.item() - ref.item()) <= 1e-12
    assert (grad - ref_grad).abs().max() <= 1e-12


@pytest.mark.parametrize("eps", [1e-5, 0.5])
def test_rmsnorm_backward_written_out_matches_autograd(eps):
    """RMSNorm's training route (RMSNormFunction, hand-written backward) against autograd of the
    plain formula in float64, and its no-grad route (the same forward without autograd) against
    the same values. (The norm computes in float32 whatever it is given, hence float32-sized
    tolerances; eps 0.5 makes a wrong eps visible, 1e-5 is LLaMA's.)"""
    norm = model_py.RMSNorm(48, eps=eps)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.5 * torch.randn(48))
    x = (2 * torch.randn(3, 7, 48)).requires_grad_()
    upstream = torch.randn(3, 7, 48)
    x64, w64 = x.detach().double().requires_grad_(), norm.weight.detach().double().requires_grad_()
    ref = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps) * w64
    ref_grads = torch.autograd.grad(ref, (x64, w64), upstream.double())
    y = norm(x)
    grads = torch.autograd.grad(y, (x, norm.weight), upstream)
    assert (y - ref).abs().max() <= 1e-5
    assert all((g - r).abs().max() <= 1e-5 * r.abs().max() for g, r in zip(grads, ref_grads))
    with torch.no_grad():
        assert (norm(x) - ref).abs().max() <= 1e-5


def test_meta_device_build_then_init_weights_equals_a_normal_build():
    """pretrain.py's FSDP-on-GPU path builds on the meta device, materialises with to_empty (memory
    left uninitialised) and calls init_weights: every buffer (rotary table, RMSNorm's eps) must
    come back, or the model silently computes with garbage. Same seed before init_weights, same
    draws: the parameters are identical too, and so are the logits."""
    ref = tiny()
    torch.manual_seed(3)
    ref.init_weights()
    with torch.device("meta"):
        m = Llama(ref.config)
    m.to_empty(device="cpu")
    for b in m.buffers():
        b.fill_(float("nan"))   # what to_empty may leave (it does not promise zeros)
    torch.manual_seed(3)
    m.init_weights()
    for (name, b), (_, b_ref) in zip(m.named_buffers(), ref.named_buffers()):
        assert torch.equal(b, b_ref), name
    for (name, p), (_, p_ref) in zip(m.named_parameters(), ref.named_parameters()):
        assert torch.equal(p, p_ref), name
    idx = torch.randint(0, 256, (2, 12))
    assert torch.equal(m(idx)[0], ref(idx)[0])


def test_logits_are_float32_under_bf16_autocast():
    m = tiny()
    idx, targets = torch.randint(0, 256, (2, 16)), torch.randint(0, 256, (2, 16))
    ref_loss = m(idx, targets)[1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = m(idx, targets)
        hidden = m.hidden_states(idx)
    assert logits.dtype == torch.float32 and loss.dtype == torch.float32
    assert hidden.shape == (2, 16, 64)
    assert abs(loss.item() - ref_loss.item()) < 5e-2   # bf16 matmuls, same model


def test_hidden_states_feed_the_head():
    m = tiny()
    idx = torch.randint(0, 256, (2, 9))
    mask = _left_pad_mask(2, 9, [0, 3])
    h = m.hidden_states(idx, attention_mask=mask)
    assert torch.allclose(m.output(h), m(idx, attention_mask=mask)[0], atol=1e-6)


# -----------------------------------------------------------------------------
# KV cache and generation


def _last_logits(m, seq):
    return m(torch.tensor([seq]))[0][0, -1]


@torch.no_grad()
def test_incremental_decoding_matches_full_forward():
    """Prefill a left-padded batch of different-length prompts, then decode one token at a time
    and finally a chunk of three: each step's logits equal a full forward of the unpadded text."""
    m = tiny().eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (3, 9, 6)]
    logits, cache, pos = m._prefill(prompts, 40)
    seqs = [list(p) for p in prompts]
    for b in range(3):
        assert (logits[b] - _last_logits(m, seqs[b])).abs().max() <= 1e-4
    for _ in range(5):   # one new token per sequence
        tok = torch.randint(0, 256, (3,), generator=g)
        for b in range(3):
            seqs[b].append(int(tok[b]))
        logits = m._decode_step(tok[:, None], cache, pos)
        pos = pos + 1
        for b in range(3):
            assert (logits[b] - _last_logits(m, seqs[b])).abs().max() <= 1e-4
    chunk = torch.randint(0, 256, (3, 3), generator=g)   # several new tokens at once (causal inside)
    logits = m._decode_step(chunk, cache, pos + torch.arange(3))
    for b in range(3):
        assert (logits[b] - _last_logits(m, seqs[b] + chunk[b].tolist())).abs().max() <= 1e-4


@torch.no_grad()
def test_incremental_chunk_without_padding_uses_bottom_right_causal_mask():
    # One sequence, no padding: a chunk after cached keys must not use is_causal's top-left mask.
    m = tiny().eval()
    seq = torch.randint(0, 256, (12,)).tolist()
    _, cache, pos = m._prefill([seq[:5]], 20)
    logits = m._decode_step(torch.tensor([seq[5:]]), cache, pos + torch.arange(7))
    assert (logits[0] - _last_logits(m, seq)).abs().max() <= 1e-4


def greedy_recompute(m, prompt, n, stop=()):
    """Reference greedy decoding: a full forward over the whole text for every new token."""
    seq, new = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            t = int(_last_logits(m, seq).argmax())
            new.append(t)
            seq.append(t)
            if t in stop:
                break
    return new


def test_greedy_with_cache_equals_recompute():
    m = tiny().eval()
    prompts = [[1, 17, 42], [5, 9, 200, 13, 77, 3, 8], [250]]
    out = m.generate(prompts, 12, temperature=0)
    assert out == [greedy_recompute(m, p, 12) for p in prompts]
    # a (B, T) tensor and a single (T,) tensor are accepted too
    assert m.generate(torch.tensor([prompts[1]]), 12, temperature=0) == [out[1]]
    assert m.generate(torch.tensor(prompts[1]), 12, temperature=0) == [out[1]]


def test_eos_stops_each_sequence_and_callback_streams_the_same_tokens():
    m = tiny().eval()
    prompts = [[1, 17, 42], [5, 9, 200, 13, 77], [250, 3]]
    free = m.generate(prompts, 10, temperature=0)
    eos = free[0][3]   # sequence 0 meets this id by its 4th token at the latest
    streamed = []
    out = m.generate(prompts, 10, temperature=0, eos_id=eos, callback=lambda i, t: streamed.append((i, t)))
    for b in range(3):   # each sequence stops at its own first eos (kept), the others go on
        cut = free[b].index(eos) + 1 if eos in free[b] else len(free[b])
        assert out[b] == free[b][:cut]
    assert len(out[0]) <= 4
    assert [[t for i, t in streamed if i == b] for b in range(3)] == out
    # a list of stop ids: whichever comes first
    out2 = m.generate(prompts, 10, temperature=0, eos_id=[free[1][1], eos])
    assert out2[1] == free[1][:free[1].index(free[1][1]) + 1]


def test_generate_rejects_too_long_and_empty():
    m = tiny()
    with pytest.raises(ValueError, match="max_seq_len"):
        m.generate([[1] * 60], 10)
    with pytest.raises(ValueError, match="at least one token"):
        m.generate([[1], []], 4)


def test_sampling_is_reproducible_with_a_generator():
    m = tiny().eval()
    a = m.generate([[1, 2, 3]] * 2, 8, temperature=1.0, generator=torch.Generator().manual_seed(7))
    b = m.generate([[1, 2, 3]] * 2, 8, temperature=1.0, generator=torch.Generator().manual_seed(7))
    assert a == b


# -----------------------------------------------------------------------------
# sample_next: closed-form distributions


PROBS = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05])
N_DRAWS = 40_000


def _frequencies(**kw):
    logits = PROBS.log().expand(N_DRAWS, -1)   # one row per draw: a single multinomial call
    ids = sample_next(logits, generator=torch.Generator().manual_seed(0), **kw)
    return torch.bincount(ids, minlength=5).double() / N_DRAWS


@pytest.mark.parametrize("kw, expected", [
    (dict(temperature=1.0), [0.4, 0.3, 0.15, 0.1, 0.05]),
    (dict(temperature=1.0, top_k=2), [4 / 7, 3 / 7, 0, 0, 0]),
    (dict(temperature=1.0, top_p=0.65), [4 / 7, 3 / 7, 0, 0, 0]),            # 0.4 < 0.65 <= 0.7
    (dict(temperature=1.0, top_p=0.75), [0.4 / 0.85, 0.3 / 0.85, 0.15 / 0.85, 0, 0]),
    (dict(temperature=1.0, top_k=3, top_p=0.5), [4 / 7, 3 / 7, 0, 0, 0]),
    (dict(temperature=0.5), [p * p / 0.285 for p in [0.4, 0.3, 0.15, 0.1, 0.05]]),  # p^(1/T), renormalised
])
def test_sampling_distribution_closed_form(kw, expected):
    freq = _frequencies(**kw)
    expected = torch.tensor(expected, dtype=torch.float64)
    assert torch.all(freq[expected == 0] == 0)              # the support is restricted exactly
    assert (freq - expected).abs().max() < 0.01             # ~4 sigma at 40k draws


def test_temperature_zero_is_argmax():
    logits = torch.randn(6, 50)
    assert torch.equal(sample_next(logits, temperature=0), logits.argmax(-1))


# -----------------------------------------------------------------------------
# FLOPs / MFU


@pytest.mark.parametrize("tie", [False, True])
def test_flops_per_token_closed_form(tie):
    m = tiny(tie_embeddings=tie)
    c = m.config
    L, d, V, H, Hkv, hd, f = c.n_layers, c.dim, c.vocab_size, c.n_heads, c.n_kv_heads, c.head_dim, c.hidden_dim
    per_layer = d * (H + 2 * Hkv) * hd + H * hd * d + 3 * d * f       # wqkv, wo, w1+w3, w2
    n = L * per_layer + V * d                                           # + the output head
    for T in (None, 32):
        ctx = T or c.max_seq_len
        assert m.flops_per_token(T) == 6 * n + 12 * L * H * hd * ctx
    assert m.estimate_mfu(1000.0, 1e12, 32) == pytest.approx(m.flops_per_token(32) * 1000.0 / 1e12)


# -----------------------------------------------------------------------------
# HuggingFace interop (transformers is the reference implementation)


transformers = pytest.importorskip("transformers")


def hf_model(path):
    m = transformers.LlamaForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    assert next(m.parameters()).dtype == torch.float32
    return m


@pytest.mark.parametrize("tie", [False, True])
def test_hf_round_trip_is_exact_and_logits_match_transformers(tmp_path, tie):
    m = tiny(tie_embeddings=tie, n_kv_heads=2).eval()
    m.save_hf(str(tmp_path))
    back = Llama.from_hf(str(tmp_path))
    assert back.config == m.config
    a, b = m.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    ref = hf_model(tmp_path)
    idx = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        assert (m(idx)[0] - ref(idx).logits).abs().max() <= 1e-4
        # left padding: HF is told the same positions the attention mask implies
        mask = _left_pad_mask(2, 20, [0, 7])
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        theirs = ref(idx, attention_mask=mask, position_ids=pos).logits
        ours = m(idx, attention_mask=mask)[0]
        assert (ours - theirs)[mask.bool()].abs().max() <= 1e-4


def test_loads_a_checkpoint_written_by_transformers(tmp_path):
    """The other direction: a LlamaForCausalLM built and saved by transformers itself (its own
    config.json layout, e.g. rope_theta nested in rope_parameters; tied head left out)."""
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=1, vocab_size=300,
                                   max_position_embeddings=128, rope_theta=500000.0, rms_norm_eps=1e-5,
                                   tie_word_embeddings=True)
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():   # sharper attention than at init, so that positions matter
        for layer in ref.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
    ref.save_pretrained(str(tmp_path))
    m = Llama.from_hf(str(tmp_path)).eval()
    assert (m.config.rope_theta, m.config.n_kv_heads, m.config.hidden_dim) == (500000.0, 1, 160)
    idx = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        assert (m(idx)[0] - ref(idx).logits).abs().max() <= 1e-4
    # what we cannot run is refused, not silently mis-loaded
    c = json.loads((tmp_path / "config.json").read_text())
    for key, value in (("rope_parameters", {"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5}),
                       ("attention_bias", True)):
        (tmp_path / "config.json").write_text(json.dumps({**c, key: value}))
        with pytest.raises(ValueError, match="not supported"):
            Llama.from_hf(str(tmp_path))


def test_hf_greedy_generate_matches(tmp_path):
    m = tiny().eval()
    m.save_hf(str(tmp_path), eos_id=2)
    ref = hf_model(tmp_path)
    prompts = [[1, 17, 42, 99, 5], [1, 8]]
    ours = m.generate(prompts, 16, temperature=0, eos_id=2)
    ids = torch.zeros(2, 5, dtype=torch.long)
    mask = torch.zeros(2, 5, dtype=torch.long)
    for b, p in enumerate(prompts):    # left padding, as HF expects for generation
        ids[b, 5 - len(p):], mask[b, 5 - len(p):] = torch.tensor(p), 1
    with torch.no_grad():
        out = ref.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0)
    for b in range(2):
        theirs = out[b, 5:].tolist()
        if 2 in theirs:                # HF pads a finished row; we stop it
            theirs = theirs[:theirs.index(2) + 1]
        assert ours[b] == theirs


def test_rotary_permutation_is_needed(tmp_path, monkeypatch):
    """Load HF weights without un-permuting q/k: no error, but the model computes something else.
    The classic LLaMA conversion bug, caught by comparing logits."""
    m = tiny().eval()
    with torch.no_grad():   # sharper attention than at init, so that positions matter visibly
        for block in m.layers:
            block.attention.wqkv.weight.mul_(8)
    m.save_hf(str(tmp_path))
    idx = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        ref = hf_model(tmp_path)(idx).logits
        right = Llama.from_hf(str(tmp_path)).eval()(idx)[0]
        monkeypatch.setattr(model_py, "_permute_from_hf", lambda w, n_heads, head_dim: w)
        wrong = Llama.from_hf(str(tmp_path)).eval()(idx)[0]
    assert (right - ref).abs().max() <= 1e-4
    assert (wrong - ref).abs().max() > 1e-1


def test_loading_refuses_a_mismatched_config(tmp_path):
    m = tiny()
    m.save_hf(str(tmp_path))
    cfg_path = tmp_path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["intermediate_size"] = m.config.hidden_dim + 32
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as err:
        Llama.from_hf(str(tmp_path))
    msg = str(err.value)
    h, d = m.config.hidden_dim, m.config.dim
    assert "layers.0.feed_forward.w13.weight" in msg and str((2 * h, d)) in msg and str((2 * h + 64, d)) in msg
    # our own checkpoints go through the same check
    other = tiny(vocab_size=512)
    with pytest.raises(ValueError, match=r"tok_embeddings.weight.*\(256, 64\).*\(512, 64\)"):
        load_state_dict_checked(other, m.state_dict())
    with pytest.raises(ValueError, match="missing"):
        load_state_dict_checked(tiny(n_layers=3), m.state_dict())


class _RunsCodeWhenUnpickled:
    """A pickle payload: with weights_only=False, loading it would call _mark_unpickled."""
    def __reduce__(self):
        return (_mark_unpickled, ())


_UNPICKLED = []


def _mark_unpickled():
    _UNPICKLED.append(True)
    return torch.zeros(1)


def test_pytorch_model_bin_loads_with_weights_only(tmp_path):
    m = tiny(n_kv_heads=1).eval()
    torch.save(to_hf_state_dict(m.state_dict(), m.config), tmp_path / "pytorch_model.bin")
    m.save_hf(str(tmp_path / "ref"))
    os.replace(tmp_path / "ref" / "config.json", tmp_path / "config.json")
    back = Llama.from_hf(str(tmp_path))    # the .bin path: no safetensors in this directory
    a, b = m.state_dict(), back.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a pickle that would run code is refused, and the code does not run
    state = to_hf_state_dict(m.state_dict(), m.config)
    state["model.norm.weight"] = _RunsCodeWhenUnpickled()
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(pickle.UnpicklingError):
        Llama.from_hf(str(tmp_path))
    assert _UNPICKLED == []


def test_sharded_safetensors_and_bf16_export(tmp_path):
    m = tiny()
    m.save_hf(str(tmp_path), dtype=torch.bfloat16)
    state = model_py.read_safetensors(str(tmp_path / "model.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in state.values())
    # split into two shards, as large checkpoints come
    names = sorted(state)
    os.remove(tmp_path / "model.safetensors")
    model_py.write_safetensors(str(tmp_path / "model-00001-of-00002.safetensors"), {k: state[k] for k in names[:5]})
    model_py.write_safetensors(str(tmp_path / "model-00002-of-00002.safetensors"), {k: state[k] for k in names[5:]})
    back = Llama.from_hf(str(tmp_path))
    for k, v in m.state_dict().items():
        assert torch.equal(back.state_dict()[k], v.to(torch.bfloat16).float()), k
    assert math.isfinite(back(torch.randint(0, 256, (1, 8)))[0].sum().item())
