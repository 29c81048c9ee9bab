"""Tests for pretrain.py (and the common.py paths it drives), on CPU.

References: a single-process run of the same script is the reference for DDP, FSDP and gradient
accumulation; an uninterrupted run is the reference for resume; closed forms for the LR schedule;
hand arithmetic on the layer shapes for --estimate; a count of the tensors autograd saves for the
activation-memory formula.

Distributed runs follow ../shared/CPU_TESTING.md: one fork-started group of 2 processes (gloo,
FileStore in tmp_path, 60 s timeout, one thread each) runs several trainings through
pretrain.main(); one real `torchrun --nproc_per_node=2` smoke run covers the launcher path.
"""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch

import common
import pretrain
from common import load_model, lr_at, read_jsonl
from model import Llama, LlamaConfig

REPO = Path(__file__).resolve().parents[1]


# -----------------------------------------------------------------------------
# fixtures and helpers


@pytest.fixture(scope="module")
def tok_path(other_tok_path):
    """A tiny sentencepiece model (vocab ~60, tests/conftest.py): the tests only need its vocab size and sha256."""
    return other_tok_path


def make_dataset(d, tok_path, train, val, **meta_overrides):
    """A memmap directory in data/prepare.py's format (train.bin, val.bin, meta.json)."""
    from tokenizer import Tokenizer
    tok = Tokenizer(tok_path)
    os.makedirs(d, exist_ok=True)
    np.asarray(train, dtype=np.uint16).tofile(os.path.join(d, "train.bin"))
    np.asarray(val, dtype=np.uint16).tofile(os.path.join(d, "val.bin"))
    meta = {"format": "nanollama.pretrain.v1", "tokenizer_path": tok.path, "tokenizer_sha256": tok.sha256,
            "vocab_size": tok.vocab_size, "dtype": "uint16", "train_tokens": len(train), "val_tokens": len(val),
            "bos_id": tok.bos_id, "eos_id": tok.eos_id}
    meta.update(meta_overrides)
    with open(os.path.join(d, "meta.json"), "w") as f:
        json.dump(meta, f)
    return str(d)


@pytest.fixture(scope="module")
def random_data(tmp_path_factory, tok_path):
    rng = np.random.default_rng(0)
    return make_dataset(tmp_path_factory.mktemp("random"), tok_path, rng.integers(3, 59, 20000),
                        rng.integers(3, 59, 2000))


@pytest.fixture(scope="module")
def repeated_data(tmp_path_factory, tok_path):
    """A 50-token pattern repeated: a model that learns it predicts every token after the first few."""
    pattern = np.random.default_rng(1).integers(3, 59, 50)
    return make_dataset(tmp_path_factory.mktemp("repeated"), tok_path, np.tile(pattern, 200), np.tile(pattern, 20))


def tiny_args(data, tok_path, out_dir, *extra):
    return ["--data", data, "--tokenizer", tok_path, "--out_dir", str(out_dir), "--model", "tiny", "--seq_len", "32",
            "--lr", "3e-3", "--min_lr", "3e-4", "--warmup_steps", "2", "--log_interval", "1", "--eval_steps", "2",
            "--keep_last", "0", *map(str, extra)]


def losses(out_dir):
    """step -> train loss from log.jsonl (the last record wins if a resumed run logged a step twice)."""
    records = read_jsonl(os.path.join(out_dir, "log.jsonl"))
    return {r["step"]: r["loss"] for r in records if "loss" in r and "event" not in r}


def weights(path):
    return load_model(str(path))[0].state_dict()


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def subprocess_env(tmp_path):
    # one thread per process (as torchrun gives), and torchelastic/inductor scratch files in tmp_path
    return {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path), "PYTHONPATH": str(REPO)}


# -----------------------------------------------------------------------------
# Pure functions: LR schedule, --estimate arithmetic


def test_lr_schedule_closed_form():
    lr, min_lr, warm, total = 1e-3, 1e-4, 10, 110
    for s in range(warm):  # linear warmup reaching lr at the last warmup step
        assert lr_at(s, lr, min_lr, warm, total) == pytest.approx(lr * (s + 1) / warm, rel=1e-12)
    assert lr_at(warm, lr, min_lr, warm, total) == pytest.approx(lr, rel=1e-12)
    assert lr_at(60, lr, min_lr, warm, total) == pytest.approx((lr + min_lr) / 2, rel=1e-12)   # half way: cos = 0
    assert lr_at(35, lr, min_lr, warm, total) == pytest.approx(min_lr + (lr - min_lr) * (1 + math.cos(math.pi / 4)) / 2)
    assert lr_at(total, lr, min_lr, warm, total) == min_lr
    assert lr_at(total + 50, lr, min_lr, warm, total) == min_lr
    decay = [lr_at(s, lr, min_lr, warm, total) for s in range(warm, total + 1)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))


def test_estimate_equals_hand_arithmetic(capsys):
    c = LlamaConfig.from_preset("tiny")  # dim 64, 2 layers, 4 heads, 2 kv heads, vocab 256, hidden 192
    assert (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size, c.hidden_dim) == (64, 2, 4, 2, 256, 192)
    hd = 64 // 4
    block = 2 * 64 + 64 * (4 + 2 * 2) * hd + 64 * 64 + 64 * 2 * 192 + 192 * 64   # norms, wqkv, wo, w13, w2
    assert block == 128 + 8192 + 4096 + 24576 + 12288 == 49280
    root = 256 * 64 + 64 + 256 * 64                                               # embedding, final norm, head
    n = 2 * block + root
    B, T, accum, W = 4, 64, 2, 2
    e = pretrain.estimate(c, B, T, accum, W, torch.bfloat16, gpu="A100", mfu=0.5, gpu_mem_gb=80)
    assert (e["params"], e["block_params"], e["root_params"]) == (n, block, root)
    assert e["ddp"]["weights"] == 4 * n + 2 * n and e["ddp"]["grads"] == 4 * n and e["ddp"]["adamw"] == 8 * n
    # untied: the largest FSDP unit is a block (the [norm, head] unit has 256 * 64 + 64); two gathered
    # in bf16, one's unsharded fp32 gradients
    unit = max(block, 256 * 64 + 64)
    assert e["fsdp"]["weights"] == 4 * n / W + 2 * 2 * unit
    assert e["fsdp"]["grads"] == 4 * n / W + 4 * unit
    assert e["fsdp"]["adamw"] == 8 * n / W
    per_block = 26 * 64 + 8 * 192
    assert e["activations"] == B * T * (2 * per_block + 4 * 256)
    assert e["activations_ckpt"] == B * T * (2 * 4 * 64 + per_block + 4 * 256)
    assert e["fsdp"]["total"] == sum(e["fsdp"][k] for k in ("weights", "grads", "adamw")) + e["activations"]
    # one micro-step: sharded gradients and activations peak at different times, the larger counts
    one = pretrain.estimate(c, B, T, 1, W, torch.bfloat16)
    assert one["fsdp"]["total"] == e["fsdp"]["total"] - min(e["activations"], 4 * n / W)
    # --fsdp_skip_accum_sync: the whole model's unsharded fp32 gradients on every rank
    skip = pretrain.estimate(c, B, T, accum, W, torch.bfloat16, skip_accum_sync=True)
    assert skip["fsdp"]["grads"] == 4 * n
    n_matmul = n - 256 * 64 - (2 * 2 * 64 + 64)                      # no embedding lookup, no norm gains
    flops_token = 6 * n_matmul + 12 * 2 * 4 * hd * T                   # PaLM: 6N (matmul weights) + attention
    assert e["flops_per_step"] == flops_token * B * T * accum * W
    assert e["step_time_s"] == pytest.approx(e["flops_per_step"] / (W * 312e12 * 0.5), rel=1e-12)
    assert e["ddp"]["total"] == 16 * n + 2 * n + e["activations"] and e["ddp"]["fits"]
    # a 13B model with DDP cannot fit in 80 GB (16 bytes/parameter of states alone), with FSDP on 8 it does
    big = pretrain.estimate(LlamaConfig.from_preset("llama1-13b"), 1, 2048, 1, 8)
    assert not big["ddp"]["fits"] and big["fsdp"]["fits_ckpt"]
    pretrain.main(["--estimate", "--model", "tiny", "--batch_size", "4", "--seq_len", "64", "--grad_accum", "2",
                   "--world_size", "2", "--mfu", "0.5"])
    out = capsys.readouterr().out
    assert f"{n / 1e9:.3f}B parameters" in out and f"{e['flops_per_step']:.3e}" in out and "fits" in out


def _saved_activation_bytes(config, dtype, batch, seq):
    """Bytes of the tensors autograd saves for backward (deduplicated by storage), minus weights."""
    torch.manual_seed(0)
    m = Llama(config)
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    x = torch.randint(0, config.vocab_size, (batch, seq))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with common.autocast(torch.device("cpu"), dtype):
            m(x, x)
    return sum(seen.values())


def test_activation_formula_matches_saved_tensors(one_thread):
    """The per-block activation bytes in --estimate against what autograd really keeps, measured as
    the growth in saved-tensor bytes from 1 to 3 layers and from batch 2 to 4 (which cancels the
    weights and anything that does not scale with tokens)."""
    # bf16 (what GPUs train in) to 2%; fp32 (CPU) to 5%: it moves with model.py's rotary code
    for dtype, per_dim, per_hidden, tol in ((torch.bfloat16, 26, 8, 0.02), (torch.float32, 40, 16, 0.05)):
        cfg = dict(dim=128, n_heads=4, vocab_size=300, hidden_dim=384, max_seq_len=64)
        T = 32
        per_token = []
        for layers in (1, 3):
            c = LlamaConfig(n_layers=layers, **cfg)
            growth = _saved_activation_bytes(c, dtype, 4, T) - _saved_activation_bytes(c, dtype, 2, T)
            per_token.append(growth / (2 * T))
        measured_block = (per_token[1] - per_token[0]) / 2
        formula_block = per_dim * 128 + per_hidden * 384
        assert abs(measured_block - formula_block) / formula_block < tol, (dtype, measured_block, formula_block)
        outside = per_token[0] - measured_block            # embedding, final norm, head, loss
        assert 4 * 300 <= outside <= 8 * 300 + 16 * 128      # the formula's 8*vocab is an upper-side budget


# -----------------------------------------------------------------------------
# Distributed parity: DDP and FSDP with 2 processes against one process


def _parity_worker(rank, tmp, data, tok_path, runs, consolidate_dir):
    torch.set_num_threads(1)
    import torch.distributed as dist
    store = dist.FileStore(os.path.join(tmp, "filestore"), 2)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2, timeout=timedelta(seconds=60))
    try:
        for out_dir, extra in runs:
            pretrain.main(tiny_args(data, tok_path, out_dir, *extra))
        # FSDP resume from a sharded (DCP) checkpoint, model + optimizer + RNG: copy step 2 of the
        # FSDP run into a fresh run directory and finish steps 3-4 there.
        fsdp_dir, fsdp_extra = runs[-1]
        resumed = os.path.join(tmp, "fsdp_resumed")
        if rank == 0:
            shutil.copytree(os.path.join(fsdp_dir, "step_0000002"), os.path.join(resumed, "step_0000002"))
        dist.barrier()
        pretrain.main(tiny_args(data, tok_path, resumed, *fsdp_extra, "--resume"))
        # The sharded checkpoint against the unsharded weights of the same live model.
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        torch.manual_seed(0)
        info = common.setup_distributed("cpu")
        model = common.wrap_model(Llama(LlamaConfig.from_preset("tiny", tie_embeddings=True)), info, "fsdp")
        opt = common.configure_optimizer(model, 1e-2, 0.1)
        x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(rank))
        model(x, x)[1].backward()
        opt.step()
        common.save_checkpoint(consolidate_dir, "step_0000001", model, opt, step=1, config={})
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            torch.save(full, os.path.join(consolidate_dir, "unsharded.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ddp_fsdp_accumulation_match_single_process(tmp_path, random_data, tok_path, one_thread):
    common_flags = ["--max_steps", 4, "--grad_clip", 0.5, "--eval_interval", 4, "--save_interval", 2]
    # reference: one process, global batch 4 in one micro-batch; and the same as 2 micro-batches of 2
    ref, accum = tmp_path / "ref", tmp_path / "accum"
    pretrain.main(tiny_args(random_data, tok_path, ref, *common_flags, "--batch_size", 4))
    pretrain.main(tiny_args(random_data, tok_path, accum, *common_flags, "--batch_size", 2, "--grad_accum", 2))
    # --init_from under FSDP (common.load_model_sharded: meta build, each rank reads its rows of the
    # mmap'd file) against one process starting from the same file
    init_flags = ["--init_from", str(ref / "final.pt"), "--max_steps", 2, "--eval_interval", 2, "--save_interval", 0]
    pretrain.main(tiny_args(random_data, tok_path, tmp_path / "init_ref", *init_flags, "--batch_size", 4))
    runs = [(str(tmp_path / "fsdp_init"), [*init_flags, "--parallel", "fsdp", "--batch_size", 2]),
            (str(tmp_path / "ddp"), [*common_flags, "--parallel", "ddp", "--batch_size", 2]),
            (str(tmp_path / "ddp_accum"), [*common_flags, "--parallel", "ddp", "--batch_size", 1, "--grad_accum", 2]),
            (str(tmp_path / "fsdp"), [*common_flags, "--parallel", "fsdp", "--batch_size", 1, "--grad_accum", 2])]
    consolidate_dir = tmp_path / "consolidate"
    torch.multiprocessing.start_processes(
        _parity_worker, args=(str(tmp_path), random_data, tok_path, runs, str(consolidate_dir)),
        nprocs=2, start_method="fork")

    ref_losses, ref_w = losses(ref), weights(ref / "final.pt")
    assert sorted(ref_losses) == [1, 2, 3, 4]
    assert ref_losses[4] < ref_losses[1]  # it trained
    for name in ("accum", "ddp", "ddp_accum", "fsdp"):
        got = losses(tmp_path / name)
        assert got.keys() == ref_losses.keys(), name
        assert max(abs(got[s] - ref_losses[s]) for s in got) < 1e-5, (name, got, ref_losses)
        final = tmp_path / name / ("final" if name == "fsdp" else "final.pt")
        assert max_diff(weights(final), ref_w) < 1e-5, name
    init_ref, init_fsdp = losses(tmp_path / "init_ref"), losses(tmp_path / "fsdp_init")
    assert init_ref.keys() == init_fsdp.keys() == {1, 2}
    assert max(abs(init_fsdp[s] - init_ref[s]) for s in init_ref) < 1e-5, (init_fsdp, init_ref)
    # the val loss is the same evaluation whatever the split over ranks
    evals = {n: [r for r in read_jsonl(tmp_path / n / "log.jsonl") if r.get("event") == "eval"][-1]["val_loss"]
             for n in ("ddp", "fsdp")}
    ref_eval = [r for r in read_jsonl(ref / "log.jsonl") if r.get("event") == "eval"][-1]["val_loss"]
    assert all(abs(v - ref_eval) < 1e-5 for v in evals.values()), (evals, ref_eval)
    # FSDP writes sharded DCP directories; resuming from one reproduces the straight run exactly
    assert os.path.isfile(tmp_path / "fsdp" / "step_0000002" / ".metadata")
    resumed = losses(tmp_path / "fsdp_resumed")
    fsdp = losses(tmp_path / "fsdp")
    assert sorted(resumed) == [3, 4] and all(resumed[s] == fsdp[s] for s in (3, 4))
    assert max_diff(weights(tmp_path / "fsdp_resumed" / "final"), weights(tmp_path / "fsdp" / "final")) == 0
    # consolidation: sharded checkpoint -> one file equal to the gathered unsharded weights, bit for bit
    merged = common.consolidate(str(consolidate_dir / "step_0000001"), str(tmp_path / "merged.pt"))
    unsharded = torch.load(consolidate_dir / "unsharded.pt", weights_only=True)
    merged_sd = torch.load(merged, weights_only=True)["model"]
    assert merged_sd.keys() == unsharded.keys()
    assert all(torch.equal(merged_sd[k], unsharded[k]) for k in unsharded)


# -----------------------------------------------------------------------------
# Exact resume after SIGKILL, and a crash in the middle of a checkpoint write


# Runs pretrain.py as __main__ with common.save_checkpoint / torch.save patched to SIGKILL the
# process at a chosen point: a real kill -9, at a deterministic place.
KILL_HARNESS = textwrap.dedent("""
    import os, runpy, signal, sys
    import torch
    import common
    mode, target, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
    if mode == "after_save":       # die right after checkpoint `target` is complete
        orig = common.save_checkpoint
        def save_then_die(out_dir, name, *a, **k):
            path = orig(out_dir, name, *a, **k)
            if name == target:
                os.kill(os.getpid(), signal.SIGKILL)
            return path
        common.save_checkpoint = save_then_die
    else:                          # die half-way through writing checkpoint `target`
        orig_save = torch.save
        def save_half_then_die(obj, f, *a, **k):
            if target in str(getattr(f, "name", f)):
                f.write(b"PK\\x03\\x04 half a checkpoint")
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            return orig_save(obj, f, *a, **k)
        torch.save = save_half_then_die
    sys.argv = ["pretrain.py"] + argv
    runpy.run_path("pretrain.py", run_name="__main__")
""")


def test_exact_resume_after_sigkill(tmp_path, random_data, tok_path, one_thread):
    """8 steps straight == 4 steps, kill -9, resume, 4 more: same losses and bit-identical final
    weights (dropout on, so the RNG state must come back too). A second kill, in the middle of
    writing step 6's checkpoint, must leave step 4 loadable and the resume must ignore the debris.
    The killed runs are real processes; the straight and the final resumed run run in this process
    (single-threaded like the subprocesses, so the arithmetic is the same, and two fewer starts)."""
    env = subprocess_env(tmp_path)
    flags = ["--max_steps", 8, "--save_interval", 2, "--eval_interval", 4, "--batch_size", 4, "--dropout", 0.1]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run = lambda *argv: subprocess.run([sys.executable, *map(str, argv)], cwd=REPO, env=env,  # noqa: E731
                                       capture_output=True, text=True, timeout=300)
    pretrain.main(tiny_args(random_data, tok_path, straight, *flags))

    r = run("-c", KILL_HARNESS, "after_save", "step_0000004", *tiny_args(random_data, tok_path, killed, *flags))
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    assert common.latest_checkpoint(str(killed)).endswith("step_0000004.pt") and not (killed / "final.pt").exists()

    r = run("-c", KILL_HARNESS, "mid_write", "step_0000006",
            *tiny_args(random_data, tok_path, killed, *flags, "--resume"))
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    assert (killed / "step_0000006.pt.tmp").exists() and not (killed / "step_0000006.pt").exists()
    assert common.latest_checkpoint(str(killed)).endswith("step_0000004.pt")
    _, meta = load_model(str(killed / "step_0000004.pt"))   # the previous checkpoint is intact
    assert meta["step"] == 4

    pretrain.main(tiny_args(random_data, tok_path, killed, *flags, "--resume"))
    assert not (killed / "step_0000006.pt.tmp").exists()    # debris cleaned by the rotation
    a, b = losses(straight), losses(killed)
    assert sorted(a) == list(range(1, 9)) and a == b
    wa, wb = weights(straight / "final.pt"), weights(killed / "final.pt")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ra = torch.load(straight / "step_0000008.pt", weights_only=True)
    rb = torch.load(killed / "step_0000008.pt", weights_only=True)
    assert torch.equal(ra["rng"][0]["torch"], rb["rng"][0]["torch"])   # same dropout stream
    assert ra["optimizer"]["state"][0]["exp_avg_sq"].equal(rb["optimizer"]["state"][0]["exp_avg_sq"])


def test_checkpoint_write_failure_keeps_previous(tmp_path, monkeypatch):
    """A failure while writing (full disk, a crash in torch.save) leaves the previous checkpoint
    with the same name loadable and no temporary file behind."""
    torch.manual_seed(0)
    model = Llama(LlamaConfig.from_preset("tiny"))
    common.save_checkpoint(str(tmp_path), "best", model, step=1, config={"a": 1})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)

    def failing_save(obj, f, *a, **k):
        f.write(b"partial bytes")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError):
        common.save_checkpoint(str(tmp_path), "best", model, step=2, config={"a": 1})
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["best.pt"]
    restored, meta = load_model(str(tmp_path / "best.pt"))
    assert meta["step"] == 1 and max_diff(restored.state_dict(), before) == 0


# -----------------------------------------------------------------------------
# It learns; the non-finite guard; bad input


def test_tiny_model_learns_repeated_data(tmp_path, repeated_data, tok_path, one_thread):
    """A 50-token pattern repeated: the loss starts near ln(vocab) ~ 4.1 and must fall below 0.5
    (perplexity < 1.65) on val within 60 steps of batch 4 x 32."""
    out = tmp_path / "learn"
    pretrain.main(tiny_args(repeated_data, tok_path, out, "--max_steps", 60, "--batch_size", 4, "--eval_interval", 30,
                            "--save_interval", 0, "--warmup_steps", 5))
    log = read_jsonl(out / "log.jsonl")
    first = [r["loss"] for r in log if r.get("step") == 1 and "loss" in r][0]
    val = [r["val_loss"] for r in log if r.get("event") == "eval"]
    assert first > 3.5 and val[-1] < 0.5, (first, val)
    best, meta = load_model(str(out))      # a run directory resolves to best.pt
    assert meta["path"].endswith("best.pt") and meta["metrics"]["best_val_loss"] == min(val)


def test_non_finite_loss_is_skipped_then_stops(tmp_path, random_data, tok_path, one_thread, monkeypatch):
    """NaN losses on steps 2-3: those updates are skipped (weights unchanged), counted, training
    goes on; NaN forever: a clear stop after --max_skips."""
    orig_forward, calls = Llama.forward, {"n": 0}

    def nan_forward(self, idx, targets=None, attention_mask=None):
        logits, loss = orig_forward(self, idx, targets, attention_mask)
        if self.training:
            calls["n"] += 1
            if calls["n"] in nan_steps:
                loss = loss * float("nan")
        return logits, loss
    monkeypatch.setattr(Llama, "forward", nan_forward)
    nan_steps = {2, 3}
    out = tmp_path / "nan"
    pretrain.main(tiny_args(random_data, tok_path, out, "--max_steps", 4, "--batch_size", 2, "--eval_interval", 0,
                            "--save_interval", 1))
    log = read_jsonl(out / "log.jsonl")
    assert [r["step"] for r in log if r.get("event") == "skip"] == [2, 3]
    assert [r for r in log if r.get("event") == "end"][0]["skipped"] == 2
    w1, w3 = weights(out / "step_0000001.pt"), weights(out / "step_0000003.pt")
    assert max_diff(w1, w3) == 0                     # the skipped updates changed nothing
    nan_steps = set(range(1, 100))
    with pytest.raises(SystemExit, match="3 consecutive steps had a non-finite loss"):
        pretrain.main(tiny_args(random_data, tok_path, tmp_path / "nan2", "--max_steps", 10, "--batch_size", 2,
                                "--max_skips", 3, "--save_interval", 0))


def _snapshot(d):
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in Path(d).iterdir()}


def test_bad_data_clear_error_nothing_overwritten(tmp_path, tok_path, random_data, one_thread):
    rng = np.random.default_rng(0)
    good = (rng.integers(3, 59, 5000), rng.integers(3, 59, 500))
    bad = {
        "tokenizer": (make_dataset(tmp_path / "other_tok", tok_path, *good, tokenizer_sha256="0" * 64),
                      "tokenizer mismatch"),
        "missing": (make_dataset(tmp_path / "missing", tok_path, *good), "is missing"),
        "empty": (make_dataset(tmp_path / "empty", tok_path, [], good[1]), "is empty"),
        "short": (make_dataset(tmp_path / "short", tok_path, good[0][:20], good[1]), "fewer than one window"),
    }
    os.remove(tmp_path / "missing" / "val.bin")
    # a finished earlier run in --out_dir must survive every failed start untouched
    run_dir = tmp_path / "run"
    pretrain.main(tiny_args(random_data, tok_path, run_dir, "--max_steps", 1, "--batch_size", 1, "--eval_steps", 1,
                            "--save_interval", 1))
    before = _snapshot(run_dir)
    for name, (data, message) in bad.items():
        with pytest.raises(SystemExit, match=message):
            pretrain.main(tiny_args(data, tok_path, run_dir, "--max_steps", 1, "--resume"))
        assert _snapshot(run_dir) == before, name
    # starting a NEW run over an existing one is refused too (--resume is the way to continue)
    with pytest.raises(SystemExit, match="already holds checkpoints"):
        pretrain.main(tiny_args(random_data, tok_path, run_dir, "--max_steps", 1))
    assert _snapshot(run_dir) == before
    # and as a real process: non-zero exit status, the message on stderr
    r = subprocess.run([sys.executable, "pretrain.py", *tiny_args(bad["tokenizer"][0], tok_path, run_dir, "--resume")],
                       cwd=REPO, env=subprocess_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "tokenizer mismatch" in r.stderr and tok_path in r.stderr
    assert _snapshot(run_dir) == before


# -----------------------------------------------------------------------------
# The real launcher: torchrun, 2 processes, FSDP; then the consolidation CLI and HF export


def test_torchrun_fsdp_smoke_and_consolidate_cli(tmp_path, random_data, tok_path):
    env = subprocess_env(tmp_path)
    out = tmp_path / "tr"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "pretrain.py",
           *tiny_args(random_data, tok_path, out, "--parallel", "fsdp", "--activation_checkpointing", "--max_steps", 2,
                      "--batch_size", 2, "--eval_interval", 2, "--save_interval", 2)]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "fsdp x 2" in r.stdout and "pretraining done" in r.stdout
    assert os.path.isfile(out / "final" / ".metadata") and os.path.isfile(out / "step_0000002" / "meta.pt")
    merged, hf = tmp_path / "merged.pt", tmp_path / "hf"
    common.main(["consolidate", str(out / "final"), str(merged), "--hf", str(hf)])   # the CLI, in-process
    sharded, meta = load_model(str(out / "final"))
    single, meta1 = load_model(str(merged))
    from_hf, _ = load_model(str(hf))
    assert meta1["step"] == 2 and meta1["tokenizer"]["sha256"] == meta["tokenizer"]["sha256"]
    assert max_diff(single.state_dict(), sharded.state_dict()) == 0
    x = torch.randint(0, 59, (2, 16))
    with torch.no_grad():
        assert torch.allclose(from_hf(x)[0], single(x)[0], atol=1e-5)
    assert os.path.isfile(hf / "tokenizer.model")
