"""LoRA (lora.py, common.py's checkpoints and export, the stage scripts' --lora_*):
B = 0 is the base model, merged == unmerged, switched off == the base exactly, only adapters (and
the reward head) train, adapter-only checkpoints that refuse another base, exact resume, PEFT
loads our adapters, DDP agrees with one process, DPO's reference for free (step-0 loss ln 2)."""
import copy
import math
import os

import pytest
import torch

import common
import sft
from lora import apply_lora, lora_adapters, lora_disabled, merge_lora, strip_lora, unmerge_lora
from model import Llama, LlamaConfig
from test_sft import _dist_worker, sft_argv, tiny_init  # noqa: F401  (tiny_init: a fixture)


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    return Llama(LlamaConfig.from_preset("tiny", **kw))


def lora_tiny(seed=0, rank=4, dropout=0.0, embeddings=True, **kw):
    model = tiny(seed, **kw)
    base = copy.deepcopy(model)
    apply_lora(model, rank, 2.0 * rank, dropout, embeddings=embeddings)
    return model, base


def train_a_little(model, idx, steps=4, lr=3e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        model(idx, idx)[1].backward()
        opt.step()
        opt.zero_grad()


IDX = torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(1))


# -----------------------------------------------------------------------------
# model.py


@pytest.mark.parametrize("tie", [True, False])
def test_zero_B_is_the_base_model(tie, one_thread):
    model, base = lora_tiny(tie_embeddings=tie)
    assert all(torch.count_nonzero(a.B) == 0 and torch.count_nonzero(a.A) > 0 for _, _, a in lora_adapters(model))
    assert torch.equal(model(IDX)[0], base(IDX)[0])
    assert model.generate([[1, 5, 9], [7]], 6, temperature=0) == base.generate([[1, 5, 9], [7]], 6, temperature=0)


@pytest.mark.parametrize("tie", [True, False])
def test_trained_merged_equals_unmerged_and_switched_off_is_the_base(tie, one_thread):
    model, base = lora_tiny(dropout=0.1, tie_embeddings=tie)
    train_a_little(model, IDX)
    model.eval()
    with torch.no_grad():
        ref = base(IDX)[0]
        unmerged = model(IDX)[0]
        assert (unmerged - ref).abs().max() > 1e-2            # training moved it (or the tests below prove nothing)
        with lora_disabled(model):
            assert torch.equal(model(IDX)[0], ref)              # exactly: the update is skipped, not subtracted
        assert torch.equal(model(IDX)[0], unmerged)             # ... and back on after the block
        merge_lora(model)
        assert (model(IDX)[0] - unmerged).abs().max() < 1e-5
        with pytest.raises(RuntimeError, match="unmerge"):
            with lora_disabled(model):
                pass
        unmerge_lora(model)
        assert (model(IDX)[0] - unmerged).abs().max() < 1e-5
        # the KV-cache decoding path sees the adapters too (tied: the head as well)
        assert model.generate([[1, 5, 9]], 5, temperature=0) == strip_lora(copy.deepcopy(model)).generate(
            [[1, 5, 9]], 5, temperature=0)


def test_only_adapters_get_gradients_and_optimizer_state():
    from reward import RewardModel
    model, _ = lora_tiny(embeddings=False)
    opt = common.configure_optimizer(model, 1e-3, 0.0)
    model(IDX, IDX)[1].backward()
    opt.step()
    lora_names = {n for n, _ in model.named_parameters() if ".lora." in n}
    assert lora_names and all(n.endswith((".A", ".B")) for n in lora_names)
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (n in lora_names), n
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert held == {id(p) for n, p in model.named_parameters() if n in lora_names} == {id(p) for p in opt.state}
    # the reward model: the scalar head trains in full, next to the backbone's adapters
    rm = RewardModel.from_llama(tiny())
    apply_lora(rm.backbone, 4, 8.0, targets=("q", "v"))
    rm(IDX).sum().backward()
    trains = {n for n, p in rm.named_parameters() if p.requires_grad}
    assert "head.weight" in trains and all(n == "head.weight" or ".lora." in n for n in trains)
    assert {n for n, p in rm.named_parameters() if p.grad is not None} == trains
    with pytest.raises(ValueError, match="subset"):
        apply_lora(tiny(), 4, 8.0, targets=("q", "query"))


def test_parameter_count_closed_form():
    """r * (in + out) per target matrix: the count --estimate and bench/lora.py rely on."""
    c = LlamaConfig.from_preset("tiny")
    model, _ = lora_tiny(rank=4, embeddings=True)
    q, kv, d, h = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.dim, c.hidden_dim
    per_layer = 4 * ((d + q) + 2 * (d + kv) + (q + d) + 2 * (d + h) + (h + d))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == c.n_layers * per_layer + 4 * (c.vocab_size + d)


def test_estimate_counts_lora_states_only_for_adapters():
    """pretrain.py --estimate with --lora_rank: frozen weights in bf16, gradients and AdamW states for
    the adapters alone -- the same count the real model and optimizer have."""
    import pretrain
    c = LlamaConfig.from_preset("tiny")
    full = pretrain.estimate(c, 4, 64, 1, 2, torch.bfloat16)
    e = pretrain.estimate(c, 4, 64, 1, 2, torch.bfloat16, lora_rank=4)
    n, W = full["params"], 2
    model, _ = lora_tiny(rank=4, embeddings=False)
    opt = common.configure_optimizer(model, 1e-3, 0.0)
    model(IDX, IDX)[1].backward()
    opt.step()
    a = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert e["lora_params"] == a and sum(t.numel() for s in opt.state.values() for t in s.values() if t.dim()) == 2 * a
    a_block = a // c.n_layers
    assert e["ddp"]["weights"] == 2 * n + 4 * a + 2 * a and e["ddp"]["grads"] == 4 * a and e["ddp"]["adamw"] == 8 * a
    # the frozen bf16 shards plus the fp32 adapters, and the same gathered units as full training
    # (bf16 either way): full training's FSDP weights are its fp32 shards 4N / W plus those units
    assert e["fsdp"]["weights"] == (2 * n + 4 * a) / W + (full["fsdp"]["weights"] - 4 * n / W)
    assert e["fsdp"]["grads"] == 4 * a / W + 6 * a_block and e["fsdp"]["adamw"] == 8 * a / W
    assert e["activations"] == full["activations"]
    with pytest.raises(SystemExit, match="pretrained"):
        pretrain.main(["--model", "tiny", "--lora_rank", "4"])


# -----------------------------------------------------------------------------
# Checkpoints, resume, export


LORA = ("--lora_rank", "4", "--lora_alpha", "8", "--lora_dropout", "0.1")


def test_sft_lora_run_adapter_checkpoints_exact_resume_and_wrong_base(tmp_path, tiny_init, one_thread, capsys):
    flags = (*LORA, "--save_interval", "3", "--keep_last", "0", "--lr", "3e-2")   # LoRA takes a larger lr
    sft.main(sft_argv(tmp_path, tiny_init, tmp_path / "a", *flags))
    final = tmp_path / "a" / "final.pt"
    ckpt = torch.load(final, weights_only=True)
    base_file = common.resolve_checkpoint(str(tiny_init))
    assert ckpt["lora"]["base_sha256"] == common.file_sha256(base_file)
    assert all(".lora." in k for k in ckpt["model"])                        # adapters only ...
    assert os.path.getsize(final) < 0.5 * os.path.getsize(base_file)     # ... so much smaller than the base
    # load_model: the base plus merged adapters == the unmerged model of the run
    merged, meta = common.load_model(str(final))
    base, _ = common.load_model(base_file)
    live = setup_like_run(common.load_model(base_file)[0], base_file)
    common.load_trainable_state(live, ckpt["model"], ckpt["lora"], str(final))
    live.eval(), merged.eval(), base.eval()
    x = IDX % 200
    with torch.no_grad():
        assert (merged(x)[0] - live(x)[0]).abs().max() < 1e-5
        assert (merged(x)[0] - base(x)[0]).abs().max() > 1e-3
    # exact resume from step 3 into a fresh directory
    os.makedirs(tmp_path / "b")
    os.link(tmp_path / "a" / "step_0000003.pt", tmp_path / "b" / "step_0000003.pt")
    sft.main(sft_argv(tmp_path, tiny_init, tmp_path / "b", *flags, "--resume"))
    b = torch.load(tmp_path / "b" / "final.pt", weights_only=True)["model"]
    assert all(torch.equal(ckpt["model"][k], b[k]) for k in b)
    # another base: a changed file at the recorded path is refused, naming both hashes
    other = tiny(seed=9, vocab_size=base.config.vocab_size, max_seq_len=128)
    common.save_checkpoint(str(tiny_init), "final", other, step=0, config={})
    new_sha = common.file_sha256(base_file)
    for load in (lambda: common.load_model(str(final)),
                 lambda: sft.main(sft_argv(tmp_path, tiny_init, tmp_path / "b", *flags, "--resume"))):
        with pytest.raises(SystemExit, match=f"{ckpt['lora']['base_sha256']}.*{new_sha}"):
            load()


def setup_like_run(model, base_path, dtype=torch.float32):
    import argparse
    args = argparse.Namespace(lora_rank=4, lora_alpha=8.0, lora_dropout=0.1, lora_targets="q,k,v,o,gate,up,down",
                              lora_embeddings=False, seed=0)
    return common.setup_lora(model, args, base_path, dtype)


def test_bf16_run_keeps_frozen_weights_in_bf16_and_adapters_in_fp32(tmp_path):
    """--dtype bfloat16: the frozen base is stored in bf16 (half its memory), the adapters stay fp32
    master weights; a step under bf16 autocast trains them, and the base is left alone."""
    model = tiny(seed=1)
    common.save_checkpoint(str(tmp_path / "base"), "final", model, step=0, config={})
    setup_like_run(model, str(tmp_path / "base" / "final.pt"), dtype=torch.bfloat16)
    assert {(p.requires_grad, p.dtype) for p in model.parameters()} == {(False, torch.bfloat16), (True, torch.float32)}
    before = {n: p.clone() for n, p in model.named_parameters()}
    opt = common.configure_optimizer(model, 1e-2, 0.0)
    with common.autocast(torch.device("cpu"), torch.bfloat16):
        loss = model(IDX, IDX)[1]
    loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, before[n]), n
        elif n.endswith(".B"):   # (A's first gradient is 0: it is multiplied by B = 0)
            assert not torch.equal(p, before[n]), n


def test_peft_loads_our_adapters_with_the_same_logits(tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    model = tiny(seed=3, tie_embeddings=False)                   # GQA (q and k rows permuted for HF)
    common.save_checkpoint(str(tmp_path / "base"), "final", model, step=0, config={})
    base_file = str(tmp_path / "base" / "final.pt")
    model.save_hf(str(tmp_path / "hf"))
    import argparse
    args = argparse.Namespace(lora_rank=4, lora_alpha=12.0, lora_dropout=0.0, lora_targets="q,k,v,o,gate,up,down",
                              lora_embeddings=True, seed=0)
    common.setup_lora(model, args, base_file)
    train_a_little(model, IDX, steps=3)
    common.save_checkpoint(str(tmp_path / "run"), "final", model, step=3, config={})
    common.main(["consolidate", str(tmp_path / "run" / "final.pt"), str(tmp_path / "merged.pt"),
                 "--hf", str(tmp_path / "merged_hf"), "--peft", str(tmp_path / "peft")])
    hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf"), torch_dtype=torch.float32).eval()
    pm = peft.PeftModel.from_pretrained(hf, str(tmp_path / "peft")).eval()
    model.eval()
    with torch.no_grad():
        ours = model(IDX)[0]
        assert (pm(IDX).logits - ours).abs().max() < 1e-4
        merged_hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "merged_hf")).eval()
        assert (merged_hf(IDX).logits - ours).abs().max() < 1e-4
        assert (ours - common.load_model(base_file)[0].eval()(IDX)[0]).abs().max() > 1e-3   # the adapters matter
    # the base moved: refused with the way out, then found with --base (its sha256 still checked)
    os.replace(base_file, tmp_path / "moved.pt")
    with pytest.raises(SystemExit, match="not there"):
        common.load_model(str(tmp_path / "run" / "final.pt"))
    common.main(["consolidate", str(tmp_path / "run" / "final.pt"), str(tmp_path / "again.pt"), "--base",
                 str(tmp_path / "moved.pt")])
    a, b = (torch.load(tmp_path / f, weights_only=True)["model"] for f in ("merged.pt", "again.pt"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # PEFT's embedding adapter would not reach a tied head: refused with the way out, not exported wrong
    tied = tiny(seed=3, tie_embeddings=True)
    common.save_checkpoint(str(tmp_path / "tied"), "final", tied, step=0, config={})
    common.setup_lora(tied, args, str(tmp_path / "tied" / "final.pt"))
    common.save_checkpoint(str(tmp_path / "tied_run"), "final", tied, step=0, config={})
    with pytest.raises(SystemExit, match="tied.*consolidate"):
        common.export_peft(str(tmp_path / "tied_run" / "final.pt"), str(tmp_path / "peft_tied"))


# -----------------------------------------------------------------------------
# Data parallel: 2 gloo ranks (fork, FileStore) against one process


def test_ddp_and_fsdp_with_lora_match_one_process(tmp_path, tiny_init, one_thread):
    """2 ranks x 1 micro-batch take the same LoRA steps as 1 process x 2 accumulated micro-batches:
    the gradients of the adapters are averaged across ranks, and the frozen base gets none. FSDP2
    shards the frozen base with the adapters; its resume checkpoint continues exactly."""
    flags = (*LORA, "--lora_dropout", "0", "--lr", "3e-2")
    sft.main(sft_argv(tmp_path, tiny_init, tmp_path / "one", *flags, "--grad_accum", "2"))
    runs = [sft_argv(tmp_path, tiny_init, tmp_path / p, *flags, "--parallel", p) for p in ("ddp", "fsdp")]
    # FSDP again from its own step-3 (sharded) checkpoint: --resume redoes steps 4-6, and must land on
    # the same weights as the run that was never interrupted
    runs[1] += ["--save_interval", "3", "--keep_last", "0"]
    runs.append(runs[1] + ["--resume"])
    queue = torch.multiprocessing.get_context("fork").SimpleQueue()   # test_sft's worker: runs sft.main(argv)
    torch.multiprocessing.start_processes(_dist_worker, (2, str(tmp_path / "store"), runs, queue), 2, start_method="fork")
    errors = [err for _, err in (queue.get() for _ in range(2)) if err]
    assert not errors, "\n".join(errors)
    final = lambda d: common.load_model(common.checkpoint_path(str(tmp_path / d), "final"))[0].state_dict()  # noqa
    one, base = final("one"), common.load_model(str(tiny_init))[0].state_dict()
    assert max((one[k] - base[k]).abs().max().item() for k in one) > 1e-4      # the adapters trained
    for p in ("ddp", "fsdp"):
        other = final(p)
        # < 1e-5 in 5 cells of the perturbation matrix; 1.4e-5 with MKL_ENABLE_INSTRUCTIONS=AVX2 (DDP)
        assert max((one[k] - other[k]).abs().max().item() for k in one) < 3e-5, p
    starts = [r for r in common.read_jsonl(str(tmp_path / "fsdp" / "log.jsonl")) if r.get("event") == "start"]
    assert starts[-1]["source"].startswith("resume") and starts[-1]["step"] == 3


# -----------------------------------------------------------------------------
# Reward model and DPO with LoRA


@pytest.fixture
def prefs(tmp_path, tiny_init):
    import json
    from data import lab
    recs = lab.generate(seed=2, pretrain_docs=1, sft_train=1, sft_val=1, prefs_train=48, prefs_val=12, rank_train=1,
                        rl_prompts=1, rl_eval=1)
    for name in ("prefs_train", "prefs_val"):
        with open(tmp_path / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in recs[name])
    return tmp_path


def test_dpo_with_lora_holds_no_reference_copy_and_step0_is_ln2(prefs, tiny_init, one_thread, monkeypatch):
    import dpo
    loads = []
    real_load = common.load_model
    monkeypatch.setattr(common, "load_model", lambda *a, **k: loads.append(a[0]) or real_load(*a, **k))
    m = dpo.main(["--init_from", str(tiny_init), "--data", str(prefs / "prefs_train.jsonl"), "--val_frac", "0",
                  "--out_dir", str(prefs / "dpo"), "--batch_size", "4", "--max_steps", "3", "--lr", "3e-2",
                  "--warmup_steps", "1", "--eval_interval", "0", "--save_interval", "0", "--log_interval", "1", *LORA])
    assert loads == [str(tiny_init)]                       # the policy only: the reference is its base
    check = m["step0_check"]
    assert check["pass"] and check["max_abs_margin"] == 0.0   # adapters at B = 0 add exact zeros
    assert check["loss"] == pytest.approx(math.log(2), abs=1e-7)
    losses = [r["loss"] for r in common.read_jsonl(str(prefs / "dpo" / "log.jsonl")) if "round_step" in r]
    assert len(losses) == 3 and losses[0] == pytest.approx(math.log(2), abs=1e-6) and losses[-1] != losses[0]
    ckpt = torch.load(prefs / "dpo" / "final.pt", weights_only=True)
    assert set(ckpt["lora"]) >= {"base_sha256", "rank"} and all(".lora." in k for k in ckpt["model"])


def test_reward_model_with_lora_trains_head_and_adapters_and_reloads(prefs, tiny_init, one_thread):
    import reward
    reward.main(["--init_from", str(tiny_init), "--data", str(prefs / "prefs_train.jsonl"), "--val_data",
                 str(prefs / "prefs_val.jsonl"), "--out_dir", str(prefs / "rm"), "--batch_size", "4", "--max_steps",
                 "4", "--lr", "3e-2", "--warmup_steps", "1", "--eval_interval", "0", "--save_interval", "0",
                 "--log_interval", "1", *LORA])
    path = prefs / "rm" / "final.pt"
    ckpt = torch.load(path, weights_only=True)
    assert "head.weight" in ckpt["model"] and ckpt["model"]["head.weight"].abs().sum() > 0
    assert all(".lora." in k or k in ("head.weight", "reward_mean", "reward_std") for k in ckpt["model"])
    # the merged reload scores exactly like the run's own model (base + unmerged adapters + head)
    merged, _ = reward.load_reward_model(str(path))
    live = reward.RewardModel.from_llama(common.load_model(str(tiny_init))[0])
    setup_like_run(live, str(tiny_init))
    common.load_trainable_state(live, ckpt["model"], ckpt["lora"], str(path))
    live.eval()
    x, mask = IDX % 200, torch.ones_like(IDX)
    mask[0, :5] = 0
    with torch.no_grad():
        assert (merged(x, mask) - live(x, mask)).abs().max() < 1e-5
        with lora_disabled(live):
            assert (merged(x, mask) - live(x, mask)).abs().max() > 1e-4   # the adapters matter, not the head alone


def test_ppo_with_lora_and_separate_critic_reference_is_the_base_kl_starts_at_zero(prefs, tiny_init, one_thread, monkeypatch):
    import json
    import reward
    import rlhf_ppo
    from data import lab
    reward.main(["--init_from", str(tiny_init), "--data", str(prefs / "prefs_train.jsonl"), "--val_frac", "0.2",
                 "--out_dir", str(prefs / "rm"), "--batch_size", "4", "--max_steps", "2", "--eval_interval", "0",
                 "--save_interval", "0", "--log_interval", "1"])
    recs = lab.generate(seed=2, pretrain_docs=1, sft_train=1, sft_val=1, prefs_train=1, prefs_val=1, rank_train=1,
                        rl_prompts=16, rl_eval=1)["rl_prompts"]
    with open(prefs / "prompts.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in recs)
    loads = []
    real_load = common.load_model
    monkeypatch.setattr(common, "load_model", lambda *a, **k: loads.append(a[0]) or real_load(*a, **k))
    rlhf_ppo.main(["--init_from", str(tiny_init), "--reward_model", str(prefs / "rm"), "--prompts",
                   str(prefs / "prompts.jsonl"), "--out_dir", str(prefs / "ppo"), "--max_steps", "2",
                   "--rollout_batch", "4", "--batch_size", "4", "--max_new_tokens", "8", "--eval_interval", "0",
                   "--save_interval", "0", "--lr", "3e-2", "--separate_critic", *LORA])
    assert loads == [str(tiny_init)]           # the actor only: no reference copy (the critic: the RM + adapters;
    # the default LoRA critic, a value head on the actor, is test_ppo's test_lora_ppo_holds_one_backbone...)
    m = json.load(open(prefs / "ppo" / "metrics.json"))
    assert m["invariants"]["kl_at_start"] == 0.0
    ckpt = torch.load(prefs / "ppo" / "final.pt", weights_only=True)
    assert "lora" in ckpt and all(".lora." in k for k in ckpt["model"])
    assert any(v.abs().sum() > 0 for k, v in ckpt["model"].items() if k.endswith(".B"))   # the actor trained


# -----------------------------------------------------------------------------
# The base's hash: once per file, and on rank 0 only


def test_base_is_hashed_once_and_on_rank_0_only(tmp_path, monkeypatch):
    """A 7B base is 13 GB: loading an adapter checkpoint hashes it once (not once to check it and again
    to set the adapters up), a second load not at all, a changed file again; in a distributed setup only
    rank 0 reads it (the others get the hash by broadcast)."""
    model = tiny(seed=1)
    common.save_checkpoint(str(tmp_path / "base"), "final", model, step=0, config={})
    base = str(tmp_path / "base" / "final.pt")
    setup_like_run(model, base)
    common.save_checkpoint(str(tmp_path / "run"), "final", model, step=0, config={})
    calls = []
    real = common.file_sha256
    monkeypatch.setattr(common, "file_sha256", lambda p: calls.append(p) or real(p))
    common._SHA256_SEEN.clear()
    common.load_model(str(tmp_path / "run" / "final.pt"))
    common.load_model(str(tmp_path / "run" / "final.pt"))
    assert calls == [base]
    common.save_checkpoint(str(tmp_path / "base"), "final", tiny(seed=2), step=0, config={})   # another file
    with pytest.raises(SystemExit, match="refusing another base"):
        common.load_model(str(tmp_path / "run" / "final.pt"))
    assert calls == [base, base]
    # rank 1 of 2: takes rank 0's hash from the broadcast and reads nothing
    common._SHA256_SEEN.clear()
    sent = []
    monkeypatch.setattr(common.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(common.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(common.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(common.dist, "broadcast_object_list",   # what rank 0 sends: "h0"
                        lambda box, src: sent.append(src) or common.dist.get_rank() == src or box.__setitem__(0, "h0"))
    assert common.base_sha256(base) == "h0" and sent == [0] and calls == [base, base]
    monkeypatch.setattr(common.dist, "get_rank", lambda: 0)                    # rank 0 hashes and sends
    assert common.base_sha256(base) == real(base) and sent == [0, 0] and calls == [base, base, base]


# -----------------------------------------------------------------------------
# The FSDP dry run with LoRA (fake tensors: the numbers are exact functions of the shapes)


def test_fsdp_dry_run_with_lora_holds_states_for_the_adapters_only(capsys):
    """pretrain.py --estimate --dry_run --lora_rank 16 at tests/test_fsdp.py's CI shape (llama1-7b
    width, 2 layers, 8 ranks, bf16): AdamW holds exactly two fp32 moments of the adapters' shards (and
    a step counter per adapter tensor), a small fraction of full training's 8N / W; the frozen base is
    stored in bf16, so the parameters are below full training's fp32 shards; --estimate's LoRA closed
    form is within +-15% of it. sft.py / dpo.py --dry_run add the adapters too; LoRA-DPO's reference
    is the base under them, so it holds no second model."""
    import dpo
    import pretrain
    from test_fsdp import DRY
    measured = pretrain.main([*DRY, "--lora_rank", "16"])
    out = capsys.readouterr().out
    assert "LoRA rank 16 (frozen base)" in out
    c = LlamaConfig.from_preset("llama1-7b", n_layers=2, max_seq_len=2048)
    e = pretrain.estimate(c, 1, 2048, 2, 8, torch.bfloat16, lora_rank=16)
    full = pretrain.estimate(c, 1, 2048, 2, 8, torch.bfloat16)
    n, a, W = e["params"], e["lora_params"], 8
    with torch.device("meta"):
        n_adapter_tensors = sum(p.requires_grad for p in apply_lora(Llama(c), 16, 32.0).parameters())
    assert measured["optimizer"] == 8 * a / W + 4 * n_adapter_tensors
    assert measured["optimizer"] < 0.02 * full["fsdp"]["adamw"]
    assert measured["params"] < full["fsdp"]["weights"] - 1.5 * n / W                 # 2 bytes per frozen weight
    assert abs(e["fsdp"]["total_ckpt"] / measured["total"] - 1) < 0.15, (e["fsdp"], measured)
    flags = ["--world_size", "4", "--batch_size", "2", "--dtype", "bfloat16", "--lora_rank", "4"]
    s = sft.main(["--dry_run", "--init_from", "tiny", "--seq_len", "64", *flags])
    d = dpo.main(["--dry_run", "--init_from", "tiny", "--max_seq_len", "64", *flags])
    a_tiny = sum(p.numel() for p in lora_tiny(rank=4, embeddings=False)[0].parameters() if p.requires_grad)
    assert s["optimizer"] == d["optimizer"] == 8 * a_tiny / 4 + 4 * 2 * 7 * LlamaConfig.from_preset("tiny").n_layers
    assert d["params"] == s["params"]                # no frozen reference copy next to the policy
    assert "reference the base, adapters off" in capsys.readouterr().out
