"""Unit tests for common.py, the plumbing shared by every stage script (single process, CPU, fast).

The distributed paths (DDP, FSDP2, sharded checkpoints) are exercised through pretrain.py in
tests/test_pretrain.py; here each helper is checked against a closed form or a direct computation.
"""
import argparse
import json
import math
import os
import pickle
import random

import numpy as np
import pytest
import torch

import common
from model import Llama, LlamaConfig


def tiny(**kw):
    torch.manual_seed(0)
    return Llama(LlamaConfig.from_preset("tiny", **kw))


def parser():
    p = argparse.ArgumentParser()
    common.add_common_args(p)
    p.add_argument("--beta", type=float, default=0.1)   # a stage's own flag
    return p


# -----------------------------------------------------------------------------
# config


def test_config_file_defaults_and_cli_override(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"lr": 1e-3, "max_steps": 50, "parallel": "fsdp", "beta": 0.5, "compile": True}))
    args = common.parse_config(parser(), ["--config", str(cfg), "--max_steps", "7", "--no-compile"])
    assert (args.lr, args.max_steps, args.parallel, args.beta, args.compile) == (1e-3, 7, "fsdp", 0.5, False)
    assert isinstance(args.max_steps, int)
    # the saved effective config is itself a valid --config and reproduces the arguments
    common.save_config(args, str(tmp_path / "run"))
    again = common.parse_config(parser(), ["--config", str(tmp_path / "run" / "config.json")])
    assert vars(again) == {**vars(args), "config": str(tmp_path / "run" / "config.json")}


@pytest.mark.parametrize("content, message", [
    ({"learning_rate": 1}, "unknown keys"),
    ({"max_steps": 2.5}, "must be int"),
    ({"lr": "fast"}, "must be float"),
    ({"parallel": "tp"}, "is not one of"),
    ("[1, 2]", "JSON object"),
    ("{not json", "cannot read config"),
])
def test_config_file_errors(tmp_path, content, message):
    cfg = tmp_path / "c.json"
    cfg.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(SystemExit, match=message):
        common.parse_config(parser(), ["--config", str(cfg)])


# -----------------------------------------------------------------------------
# optimizer, clipping, eval mode, activation checkpointing


@pytest.mark.parametrize("tie", [False, True])
def test_weight_decay_only_on_matrices(tie):
    model = tiny(tie_embeddings=tie)
    opt = common.configure_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = sorted(names[id(p)].split(".")[-2] for p in decay["params"])
    plain = sorted(names[id(p)].split(".")[-2] for p in no_decay["params"])
    n_layers = model.config.n_layers
    expect = ["tok_embeddings"] + ["output"] * (not tie) + ["wqkv", "wo", "w13", "w2"] * n_layers
    assert decayed == sorted(expect)
    assert plain == sorted(["attention_norm", "ffn_norm"] * n_layers + ["norm"])
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    # every parameter exactly once (a tied weight is not optimised twice)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert opt.defaults["betas"] == (0.9, 0.95) and not opt.defaults["fused"]


def test_clip_grad_norm_closed_form():
    model = tiny()
    model(torch.randint(0, 256, (2, 16)), torch.randint(0, 256, (2, 16)))[1].backward()
    grads = [p.grad.clone() for p in model.parameters()]
    norm = math.sqrt(sum(g.double().pow(2).sum().item() for g in grads))
    assert common.clip_grad_norm(model, 0) == pytest.approx(norm, rel=1e-5)   # 0: measure only
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert common.clip_grad_norm(model, norm / 4) == pytest.approx(norm, rel=1e-5)
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, g * (norm / 4) / (norm + 1e-6), rtol=1e-5, atol=1e-9)


def test_eval_mode_restores_training_even_on_error():
    model = tiny(dropout=0.1)
    model.train()
    with common.eval_mode(model):
        assert not model.training and not model.layers[0].feed_forward.dropout.training
    assert model.training and model.layers[0].feed_forward.dropout.training
    with pytest.raises(RuntimeError):
        with common.eval_mode(model):
            raise RuntimeError("eval crashed")
    assert model.training
    model.eval()
    with common.eval_mode(model):
        pass
    assert not model.training   # it restores the previous mode, not always train


def test_activation_checkpointing_same_gradients_same_names():
    x = torch.randint(0, 256, (2, 32))
    ref = tiny()
    ref(x, x)[1].backward()
    info = common.DistInfo()
    ckpt = common.wrap_model(tiny(), info, "none", activation_checkpointing=True)
    assert list(ckpt.state_dict()) == list(ref.state_dict())
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        loss = ckpt(x, x)[1]
    loss.backward()
    for (n, a), b in zip(ref.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7, msg=n)
    saved_plain = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved_plain.append(t.numel()) or t, lambda t: t):
        ref(x, x)
    assert sum(saved) < sum(saved_plain)   # it really keeps less


def test_ddp_or_fsdp_without_torchrun_is_a_clear_error():
    with pytest.raises(SystemExit, match="torchrun"):
        common.wrap_model(tiny(), common.DistInfo(), "ddp")


def test_parallel_default_and_refusal_of_none_under_torchrun():
    one, two = common.DistInfo(world_size=1), common.DistInfo(rank=1, world_size=2)
    assert common.resolve_parallel(None, one) == "none" and common.resolve_parallel(None, two) == "ddp"
    assert common.resolve_parallel("fsdp", two) == "fsdp" and common.resolve_parallel("none", one) == "none"
    with pytest.raises(SystemExit, match="2 processes with --parallel none would train 2 unrelated models; use ddp$"):
        common.resolve_parallel("none", two, use="ddp")


def test_single_process_setup():
    info = common.setup_distributed("cpu")
    assert (info.rank, info.world_size, info.device.type, info.is_main, info.owns_group) == (0, 1, "cpu", True, False)
    common.teardown_distributed(info)


# -----------------------------------------------------------------------------
# RNG, checkpoints, rotation, load_model


def test_rng_state_round_trip_through_weights_only_load(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.random(), np.random.normal(), torch.rand(3)   # advance (and fill numpy's cached gaussian)
    state = common.rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (random.random(), np.random.normal(), np.random.rand(), torch.rand(4))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    common.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (random.random(), np.random.normal(), np.random.rand(), torch.rand(4))
    assert got[:3] == expected[:3] and torch.equal(got[3], expected[3])


def test_checkpoint_file_format_and_restore(tmp_path):
    model = tiny()
    opt = common.configure_optimizer(model, 1e-2, 0.1)
    model(torch.randint(0, 256, (2, 8)), torch.randint(0, 256, (2, 8)))[1].backward()
    opt.step()

    class Tok:
        path, sha256 = "/x/tok.model", "ab" * 32
    path = common.save_checkpoint(str(tmp_path), "step_0000003", model, opt, step=3, config={"lr": 1e-2},
                                  tokenizer=Tok(), metrics={"val_loss": 2.5}, data_state={"step": 3}, extra_key=[1, 2])
    ckpt = torch.load(path, weights_only=True)   # only tensors and plain containers inside
    assert set(ckpt) == {"format", "model", "model_config", "step", "config", "tokenizer", "metrics", "optimizer",
                         "rng", "data_state", "extra_key"}
    assert ckpt["format"] == common.CKPT_FORMAT and ckpt["step"] == 3 and ckpt["extra_key"] == [1, 2]
    assert ckpt["tokenizer"] == {"path": "/x/tok.model", "sha256": "ab" * 32}
    assert ckpt["model_config"] == model.config.to_dict() and len(ckpt["rng"]) == 1
    # restore into a fresh model + optimizer: identical weights and optimizer moments
    fresh = Llama(LlamaConfig.from_preset("tiny"))
    fresh_opt = common.configure_optimizer(fresh, 1e-2, 0.1)
    meta = common.restore_checkpoint(path, fresh, fresh_opt)
    assert meta["step"] == 3 and meta["data_state"] == {"step": 3}
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    # a model-only checkpoint cannot resume an optimizer
    best = common.save_checkpoint(str(tmp_path), "best", model, step=3, config={})
    with pytest.raises(SystemExit, match="no optimizer state"):
        common.restore_checkpoint(best, fresh, fresh_opt)


def test_rotation_and_latest(tmp_path):
    model = tiny()
    for step in (1, 2, 10, 3):
        common.save_checkpoint(str(tmp_path), f"step_{step:07d}", model, step=step, config={})
    os.makedirs(tmp_path / "step_0000099")              # an incomplete sharded directory: no meta.pt
    (tmp_path / "step_0000050.pt.tmp").write_bytes(b"half")
    assert common.latest_checkpoint(str(tmp_path)).endswith("step_0000010.pt")
    common.rotate_checkpoints(str(tmp_path), keep_last=2)
    left = sorted(os.listdir(tmp_path))
    assert left == ["step_0000003.pt", "step_0000010.pt", "step_0000099"]


def test_load_model_file_run_dir_and_hf_dir(tmp_path):
    model = tiny(tie_embeddings=True)
    x = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        ref = model(x)[0]
    run = tmp_path / "run"
    os.makedirs(run)
    with open(run / "config.json", "w") as f:   # a run dir's config.json must not look like HF
        json.dump({"lr": 1}, f)
    common.save_checkpoint(str(run), "step_0000005", model, step=5, config={})
    assert common.load_model(str(run))[1]["path"].endswith("step_0000005.pt")   # newest step ...
    common.save_checkpoint(str(run), "final", model, step=6, config={})
    assert common.load_model(str(run))[1]["path"].endswith("final.pt")          # ... final beats steps ...
    common.save_checkpoint(str(run), "best", model, step=4, config={}, metrics={"val_loss": 1.0})
    loaded, meta = common.load_model(str(run))                                    # ... and best beats final
    assert meta["path"].endswith("best.pt") and meta["step"] == 4 and meta["metrics"] == {"val_loss": 1.0}
    assert "optimizer" not in meta and "model" not in meta
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], ref)
    model.save_hf(str(tmp_path / "hf"))
    hf_model, hf_meta = common.load_model(str(tmp_path / "hf"))
    assert hf_meta["format"] == "hf" and hf_model.config.tie_embeddings
    with torch.no_grad():
        torch.testing.assert_close(hf_model(x)[0], ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(SystemExit, match="does not exist"):
        common.load_model(str(tmp_path / "nope"))
    os.makedirs(tmp_path / "empty_run")
    with pytest.raises(SystemExit, match="holds no checkpoint"):
        common.load_model(str(tmp_path / "empty_run"))
    # weights_only loading refuses a pickle that would run code (one line naming the file, no traceback)
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"model": os.system}, f, protocol=2)
    with pytest.raises(SystemExit, match="evil.pt is not a readable checkpoint.*UnpicklingError: Weights only load"):
        common.load_model(str(tmp_path / "evil.pt"))


def test_load_model_refuses_a_reward_checkpoint_by_name(tmp_path):
    # reward.py's checkpoints hold a backbone + scalar head (kind="reward_model"): loading them as a
    # Llama used to end in a key/shape mismatch; now the message names the kind and the right loader
    import reward
    rm = reward.RewardModel.from_llama(tiny())
    path = common.save_checkpoint(str(tmp_path), "final", rm, step=1, config={}, kind=reward.REWARD_KIND)
    for where in (path, str(tmp_path)):   # the file, and its run directory
        with pytest.raises(SystemExit, match=r"'reward_model' checkpoint, not a language model: "
                                             r"load it with reward\.load_reward_model"):
            common.load_model(where)
    loaded, meta = reward.load_reward_model(path)   # ... which does load it
    assert meta["kind"] == reward.REWARD_KIND
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), rm.state_dict().values()))


def test_checkpoint_tokenizer_is_the_recorded_one_or_refused(tmp_path, tok, other_tok_path, capsys):
    """The tokenizer a checkpoint records comes back; another file (--tokenizer) or a vocabulary larger
    than the model's is refused with a message naming both; a recorded file that is gone falls back to
    the shipped default with a warning, and is still checked by sha256."""
    from tokenizer import Tokenizer
    meta = {"path": "run/final.pt", "model_config": {"vocab_size": tok.vocab_size},
            "tokenizer": {"path": tok.path, "sha256": tok.sha256}}
    assert common.checkpoint_tokenizer(meta).sha256 == tok.sha256
    other = Tokenizer(other_tok_path)
    with pytest.raises(ValueError) as e:
        common.checkpoint_tokenizer(meta, other_tok_path)
    assert all(s in str(e.value) for s in ("run/final.pt", tok.path, tok.sha256[:12], other.path, other.sha256[:12]))
    with pytest.raises(ValueError, match="run/final.pt was trained with tokenizer"):
        common.check_tokenizer(meta, other)            # an already-loaded tokenizer: the same check
    small = {**meta, "model_config": {"vocab_size": 100}}
    with pytest.raises(ValueError, match=f"{tok.vocab_size} tokens, but the vocabulary of run/final.pt is 100"):
        common.checkpoint_tokenizer(small)
    gone = {**meta, "tokenizer": {"path": str(tmp_path / "moved.model"), "sha256": tok.sha256}}
    assert common.checkpoint_tokenizer(gone).sha256 == tok.sha256   # the shipped default is that same file
    assert "moved.model is gone" in capsys.readouterr().err
    gone_other = {**meta, "tokenizer": {"path": str(tmp_path / "moved.model"), "sha256": other.sha256}}
    with pytest.raises(ValueError, match="was trained with tokenizer"):
        common.checkpoint_tokenizer(gone_other)        # the default is not the file it was trained with
    # no record (a HuggingFace dir without tokenizer.model): the given file or the default, unchecked
    assert common.checkpoint_tokenizer({"model_config": {"vocab_size": 64}}, other_tok_path).sha256 == other.sha256


def test_jsonl_logger(tmp_path):
    log = common.JsonlLogger(str(tmp_path / "log.jsonl"))
    log.log(step=1, loss=torch.tensor(2.5), lr=1e-3)
    log.log(step=2, loss=float("nan"), grad_norm=float("inf"))
    rows = common.read_jsonl(str(tmp_path / "log.jsonl"))
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 2.5), (2, None)] and rows[1]["grad_norm"] is None
    assert all("time" in r for r in rows)
