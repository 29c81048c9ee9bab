"""PPO, GRPO and DPO's sampling rounds under FSDP (issue #18, item 3), on 2 gloo processes.

One fork-started group of 2 ranks (FileStore, one thread each; ../shared/CPU_TESTING.md) runs:
  * common.generate on an FSDP-sharded model against the same model whole in one process: the same
    tokens, greedy and sampled, with the rollout gathered once (common.gathered) and block by block
    in lock-step; the ranks hold different numbers of prompts of different lengths, one rank's
    answer ends after one token while the other's runs to the limit, and a rank may have no prompt;
    chat.generate_answers with different numbers of batches per rank; training after generation;
  * the RL stages' sharded start (reference, reward model, critic) against whole loads;
  * rlhf_ppo.py and grpo.py, two iterations each, under --parallel ddp and --parallel fsdp (every
    model started sharded): the same rollouts, losses and final weights; both resumed exactly from
    their sharded checkpoints (PPO's critic in it too);
  * dpo.py with a sampling round under --parallel fsdp and ddp: the same pairs.
"""
import copy
import json
import os
import shutil
import subprocess
import sys
import traceback
from pathlib import Path
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

import chat
import common
import dpo
import grpo
import reward
import rlhf_ppo
from data import lab
from model import Llama, LlamaConfig

REPO = Path(__file__).resolve().parents[1]


def tiny(vocab, seed=0, **kw):
    torch.manual_seed(seed)
    return Llama(LlamaConfig.from_preset("tiny", vocab_size=vocab, max_seq_len=64, **kw))


# -----------------------------------------------------------------------------
# Generation


def check_generation(rank, info, tok):
    plain = tiny(tok.vocab_size).eval()            # tied embedding/head: the root unit's, gathered by generate
    model = common.wrap_model(copy.deepcopy(plain), info, "fsdp").eval()
    # different counts and lengths per rank (left padding differs too)
    prompts = [[1, 5, 6], [1, 9, 8, 7, 6, 5, 4]] if rank == 0 else [[1, 2, 3, 4, 5]]
    out = {}
    for gather in (True, False):
        for temp in (0.0, 1.0):
            gen = lambda: torch.Generator().manual_seed(7 + rank)   # noqa: E731 (per-rank seeds, as the scripts)
            # rank 1 stops after its first token (its stop id is the token it draws first); rank 0 never stops
            stop = [tok.vocab_size + 1] if rank == 0 else [plain.generate(prompts, 1, temperature=temp,
                                                                          generator=gen())[0][0]]
            want = plain.generate(prompts, 12, temperature=temp, eos_id=stop, generator=gen())
            with common.gathered(model, gather):
                got = common.generate(model, prompts, 12, temperature=temp, eos_id=stop, generator=gen())
            out[gather, temp] = {"got": got, "want": want}
    # a rank with no prompts (a GRPO refill round) steps along and gets nothing
    mine = prompts if rank == 0 else []
    out["empty"] = {"got": common.generate(model, mine, 12, temperature=0.0),
                    "want": plain.generate(mine, 12, temperature=0.0) if mine else []}
    # chat.generate_answers, one batch per prompt: 3 batches on rank 0, 1 on rank 1
    convs = ["Who are you?", "Hi", "What is the capital of the moon, in one word?"][:3 if rank == 0 else 1]
    kw = dict(max_new_tokens=10, temperature=1.0, batch_size=1, seed=3 + rank, return_ids=True)
    out["answers"] = {"got": chat.generate_answers(model, tok, convs, **kw)[1],
                      "want": chat.generate_answers(plain, tok, convs, **kw)[1]}
    # training after generation (FSDP's gathered-weight buffers must not be inference tensors): the
    # same loss and gradients as the whole model with DDP-style averaged gradients
    x = torch.randint(0, tok.vocab_size, (2, 16), generator=torch.Generator().manual_seed(rank))
    loss = model.train()(x, x)[1]
    loss.backward()
    plain.train()(x, x)[1].backward()
    diff = 0.0
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        dist.all_reduce(q.grad)
        diff = max(diff, (p.grad.full_tensor() - q.grad / 2).abs().max().item())
    out["train_grad_diff"] = diff
    return out


def check_frozen(rank, info, tok):
    """common.frozen under FSDP: the reward model sharded (half the rows of every tensor per rank, also
    after a forward: FSDP would keep a root's weights gathered for a backward that never comes), no
    gradients, eval mode, the whole model's scores; in bf16 the frozen reference computes exactly the
    log-probs of the FSDP actor (both gather bf16 copies of the same fp32 weights)."""
    torch.manual_seed(1)
    plain = reward.RewardModel(LlamaConfig.from_preset("tiny", vocab_size=tok.vocab_size, max_seq_len=64)).eval()
    rm = common.frozen(copy.deepcopy(plain), torch.float32, info.device, info, "fsdp")
    idx = torch.randint(0, tok.vocab_size, (3, 12), generator=torch.Generator().manual_seed(rank))
    attn = torch.ones_like(idx)
    attn[0, :4] = 0   # left padding on one row
    with torch.no_grad():
        diff = (rm(idx, attn) - plain(idx, attn)).abs().max().item()
    actor = common.wrap_model(tiny(tok.vocab_size), info, "fsdp", torch.bfloat16).eval()
    ref = common.frozen(tiny(tok.vocab_size), torch.bfloat16, info.device, info, "fsdp")
    with torch.no_grad(), common.autocast(info.device, torch.bfloat16):
        same = torch.equal(actor(idx, attention_mask=attn)[0], ref(idx, attention_mask=attn)[0])
    rows = lambda n: min(-(-n // 2), max(0, n - rank * -(-n // 2)))   # noqa: E731 (torch.chunk's split of dim 0)
    return {"sharded": all(p.to_local().size(0) == rows(p.size(0)) for p in rm.parameters()),
            "frozen": not rm.training and not any(p.requires_grad for p in rm.parameters()),
            "score_diff": diff, "bf16_identical": same,
            # bf16 shards (half of fp32's memory), buffers (the rotary table) left in fp32
            "bf16_shards": all(p.dtype == torch.bfloat16 for p in ref.parameters())
            and all(p.dtype == torch.float32 for p in actor.parameters())
            and all(b.dtype == torch.float32 for b in ref.buffers() if b.is_floating_point())}


def check_sharded_start(rank, info, d):
    """The RL stages' sharded start (no whole model on any rank): the frozen reference and reward model
    through common.load_frozen_sharded, the critic through load_model_sharded, against whole loads:
    the same tensors (gathered), each rank having read exactly its own shards' bytes, frozen ones
    without gradients and in eval mode, and the same scores."""
    out = {}
    wrap = lambda m: common.wrap_model(m, info, "fsdp")   # noqa: E731
    for name, (sharded, whole) in {
            "ref": (common.load_frozen_sharded(str(d / "init"), info, torch.float32),
                    common.load_model(str(d / "init"))),
            "rm": (common.load_frozen_sharded(str(d / "rm"), info, torch.float32, 0, reward.RewardModel,
                                              reward.REWARD_KIND), reward.load_reward_model(str(d / "rm"))),
            "critic": (common.load_model_sharded(str(d / "rm"), info, wrap, reward.RewardModel,
                                                 kind=reward.REWARD_KIND), reward.load_reward_model(str(d / "rm")))
    }.items():
        (model, meta), plain = sharded, whole[0]
        state, want = model.state_dict(keep_vars=True), plain.state_dict(keep_vars=True)
        local = {id(v): v for v in state.values()}   # (a tied weight once)
        with torch.no_grad():
            diff = max((v.full_tensor() if hasattr(v, "full_tensor") else v).sub(want[k]).abs().max().item()
                       for k, v in state.items())
        out[name] = {
            "diff": diff,
            "keys": sorted(state) == sorted(want),
            "bytes_read": meta["bytes_read"],
            "own_bytes": sum((v.to_local() if hasattr(v, "to_local") else v).nbytes for v in local.values()),
            "whole_bytes": sum(v.nbytes for v in {id(v): v for v in want.values()}.values()),
            "frozen": not model.training and not any(p.requires_grad for p in model.parameters()),
            "trainable": all(p.requires_grad for p in model.parameters())}
        if name != "ref":
            idx = torch.randint(0, plain.backbone.config.vocab_size, (2, 9),
                                generator=torch.Generator().manual_seed(rank))
            with torch.no_grad():
                out[name]["score_diff"] = (model(idx) - plain(idx)).abs().max().item()
    return out


# -----------------------------------------------------------------------------
# The scripts: ddp vs fsdp


def write_fixture(d, tok):
    sets = lab.generate(seed=0, pretrain_docs=10, sft_train=10, sft_val=10, prefs_train=10, prefs_val=8,
                        rank_train=10, rl_prompts=40, rl_eval=4)
    for name, recs in (("prompts", sets["rl_prompts"]), ("eval", sets["rl_eval"])):
        with open(d / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in recs)
    # A random model never says <|end|>: point the head's <|end|> row along the mean hidden state, so
    # answers end after 1 to 8 tokens (measured) -- lengths differ across ranks, and DPO finds pairs
    init = tiny(tok.vocab_size)
    with torch.no_grad():
        h = init.hidden_states(torch.randint(0, tok.vocab_size, (16, 20), generator=torch.Generator().manual_seed(0)))
        mean = h.reshape(-1, h.size(-1)).mean(0)
        init.output.weight[tok.end_id] = 5 * mean / mean.norm()
    common.save_checkpoint(str(d / "init"), "final", init, step=0, config={}, tokenizer=tok)
    # a random reward model (the same tiny backbone) gives every answer a different score
    torch.manual_seed(1)
    rm = reward.RewardModel(LlamaConfig.from_preset("tiny", vocab_size=tok.vocab_size, max_seq_len=64))
    torch.nn.init.normal_(rm.head.weight, std=0.5)
    rm.set_stats(0.3, 2.0)
    common.save_checkpoint(str(d / "rm"), "final", rm, step=0, config={}, tokenizer=tok, kind=reward.REWARD_KIND)


def ppo_argv(d, out, parallel, *extra):
    return ["--init_from", str(d / "init"), "--reward_model", str(d / "rm"), "--prompts", str(d / "prompts.jsonl"),
            "--out_dir", str(out), "--parallel", parallel, "--max_steps", "2", "--rollout_batch", "4",
            "--batch_size", "2", "--max_new_tokens", "10", "--lr", "1e-3", "--critic_lr", "1e-3", "--warmup_steps",
            "1", "--eval_data", str(d / "eval.jsonl"), "--eval_interval", "1", "--eval_sample", "2",
            "--eval_limit", "2", "--eval_max_new_tokens", "8", "--sample_interval", "0", "--save_interval", "0",
            "--log_interval", "1000", "--seed", "1", *extra]


def grpo_argv(d, out, parallel, *extra):
    return ["--init_from", str(d / "init"), "--prompts", str(d / "prompts.jsonl"), "--out_dir", str(out),
            "--parallel", parallel, "--reward", "checker", "model:0.5", "--reward_model", str(d / "rm"),
            "--group_size", "4", "--prompts_per_step", "2", "--batch_size", "4", "--max_new_tokens", "10",
            "--lr", "1e-3", "--warmup_steps", "1", "--max_steps", "2", "--kl", "k3_loss", "--dynamic_sampling",
            "--sample_interval", "0", "--log_interval", "1000", "--eval_interval", "0", "--save_interval", "0",
            "--seed", "1", *extra]


def dpo_argv(d, out, parallel):
    return ["--init_from", str(d / "init"), "--prompts", str(d / "prompts.jsonl"), "--out_dir", str(out),
            "--parallel", parallel, "--rounds", "2", "--round_prompts", "5", "--samples", "12", "--rank_by", "reward",
            "--reward_model", str(d / "rm"), "--max_new_tokens", "8", "--max_steps", "1", "--batch_size", "1",
            "--eval_data", str(d / "eval.jsonl"), "--eval_limit", "3", "--eval_max_new_tokens", "8",
            "--val_frac", "0", "--eval_interval", "0", "--log_interval", "1000", "--save_interval", "0", "--seed", "1"]


def run_scripts(rank, d):
    out = {}
    for parallel in ("ddp", "fsdp"):
        # (resume checkpoints after iteration 1: sharded under fsdp, written in the background)
        out["ppo", parallel] = rlhf_ppo.main(ppo_argv(d, d / f"ppo_{parallel}", parallel, "--save_interval", "1"))
        out["grpo", parallel] = grpo.main(grpo_argv(d, d / f"grpo_{parallel}", parallel, "--save_interval", "1"))
        dpo.main(dpo_argv(d, d / f"dpo_{parallel}", parallel))
    # PPO and GRPO under FSDP resumed from their sharded checkpoints of iteration 1
    if rank == 0:
        for stage in ("ppo", "grpo"):
            shutil.copytree(d / f"{stage}_fsdp" / "step_0000001", d / f"{stage}_fsdp_resume" / "step_0000001")
    dist.barrier()
    out["ppo", "fsdp_resume"] = rlhf_ppo.main(ppo_argv(d, d / "ppo_fsdp_resume", "fsdp", "--save_interval", "1",
                                                       "--resume"))
    out["grpo", "fsdp_resume"] = grpo.main(grpo_argv(d, d / "grpo_fsdp_resume", "fsdp", "--save_interval", "1",
                                                     "--resume"))
    # bf16 autocast: the sharded reference gathers the policy's bf16 weights (KL exactly 0 at the start)
    out["grpo", "fsdp_bf16"] = grpo.main(grpo_argv(d, d / "grpo_fsdp_bf16", "fsdp", "--dtype", "bfloat16",
                                                   "--max_steps", "1"))
    # block-by-block generation in lock-step, in a whole run
    out["grpo", "fsdp_block"] = grpo.main(grpo_argv(d, d / "grpo_fsdp_block", "fsdp", "--no-fsdp_gather_rollout"))
    return {k: {"weights_in_sync": v["weights_in_sync"], "invariants": v["invariants"]} for k, v in out.items()}


def _worker(rank, store, d, queue):
    from tokenizer import Tokenizer
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, 2), rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    try:
        info = common.DistInfo(rank, rank, 2, torch.device("cpu"))
        tok = Tokenizer()
        queue.put((rank, {"gen": check_generation(rank, info, tok), "frozen": check_frozen(rank, info, tok),
                          "start": check_sharded_start(rank, info, d), "scripts": run_scripts(rank, d)}, None))
    except BaseException:   # every rank's traceback: the first error may be the victim's
        queue.put((rank, None, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, tok):
    d = tmp_path_factory.mktemp("fsdp_rl")
    write_fixture(d, tok)
    ctx = torch.multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = torch.multiprocessing.start_processes(_worker, args=(str(d / "store"), d, queue), nprocs=2,
                                                  start_method="fork", join=False)
    # (a timeout: a rank that aborts in a mismatched collective never reports, and would hang the suite)
    results = dict((r, (out, err)) for r, out, err in (queue.get(timeout=300) for _ in range(2)))
    procs.join()
    errors = [err for _, err in results.values() if err]
    assert not errors, "\n".join(errors)
    return d, {r: out for r, (out, _) in results.items()}


def test_fsdp_generation_gives_the_tokens_of_one_process(two_ranks):
    _, results = two_ranks
    for rank, out in results.items():
        g = out["gen"]
        for key in ((True, 0.0), (True, 1.0), (False, 0.0), (False, 1.0), "empty", "answers"):
            assert g[key]["got"] == g[key]["want"], (rank, key, g[key])
        for gather, temp in ((True, 0.0), (True, 1.0), (False, 0.0), (False, 1.0)):
            lengths = [len(a) for a in g[gather, temp]["got"]]
            # rank 1 ended after one token, rank 0 ran to the limit: lock-step did not hang or cut either
            assert lengths == ([12, 12] if rank == 0 else [1]), (rank, gather, temp, lengths)
        assert g["empty"]["got"] == ([] if rank == 1 else g["empty"]["want"])
        assert len(g["answers"]["got"]) == 3 - 2 * rank
        # fp32: FSDP's reduce-scatter averages in another order than all_reduce + / 2 (~1e-9 measured)
        assert g["train_grad_diff"] < 1e-6, g["train_grad_diff"]


def final_weights(run_dir):
    return common.load_model(str(run_dir))[0].state_dict()   # final.pt (ddp) or the final/ DCP directory (fsdp)


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def rows(run_dir, key):
    return [r for r in common.read_jsonl(str(run_dir / "log.jsonl")) if key in r]


def test_frozen_models_are_sharded_without_gradients(two_ranks):
    _, results = two_ranks
    for rank, out in results.items():
        f = out["frozen"]
        assert f["sharded"] and f["frozen"] and f["bf16_identical"] and f["bf16_shards"], f
        assert f["score_diff"] < 1e-5, f   # fp32, the same weights; only the gathered layout differs


def test_ppo_and_grpo_under_fsdp_match_ddp(two_ranks):
    """Two iterations of each script, DDP (whole models) vs FSDP (actor, critic, reference and reward
    model sharded), same seeds: the same rollouts, the same losses and weights up to the order of
    float sums (fp32; DDP all-reduces, FSDP reduce-scatters). Measured with ATEN_CPU_CAPABILITY
    default and avx2 (OMP_NUM_THREADS 1 and 2) and avx512 (1; the workers run one thread each): weights after
    2 AdamW steps at lr 1e-3 within 1.03e-6 (PPO) and 2.1e-7 (GRPO); losses and statistics within
    7.2e-7, or 3.5e-7 relative (GRPO's policy loss of ~1e3 differs by 3.7e-4 in the avx2 cell);
    rollouts identical in every cell."""
    d, results = two_ranks
    for stage, key in (("ppo", "reward_raw"), ("grpo", "reward")):
        a, b = rows(d / f"{stage}_ddp", key), rows(d / f"{stage}_fsdp", key)
        assert len(a) == len(b) == 2
        for x, y in zip(a, b):
            # the same answers (lengths, stops, rewards of a frozen reward model) ...
            assert (x["length"], x["eos_frac"]) == (y["length"], y["eos_frac"]) and abs(x[key] - y[key]) < 1e-6, (x, y)
            # ... and the same losses and statistics
            for k in ("kl", "kl_k3", "policy_loss", "entropy", "approx_kl", "value_loss"):
                if k not in x:   # (GRPO has no critic)
                    continue
                assert abs(x[k] - y[k]) < 1e-5 * max(1.0, abs(x[k])), (stage, k, x[k], y[k])
        assert max_diff(final_weights(d / f"{stage}_ddp"), final_weights(d / f"{stage}_fsdp")) < 1e-5, stage
        for rank in (0, 1):
            inv = results[rank]["scripts"][stage, "fsdp"]["invariants"]
            # the sharded reference computes the actor's function bit for bit; the ratio starts at 1
            assert inv["kl_at_start"] == 0.0 and inv["ratio_failures"] == 0, inv
    # PPO's evaluations ran on both ranks under FSDP (rank 0's numbers), and the end evaluation on the saved model
    ma, mb = (json.load(open(d / f"ppo_{p}" / "metrics.json")) for p in ("ddp", "fsdp"))
    assert ma["accuracy"] == mb["accuracy"] and abs(ma["mean_reward"] - mb["mean_reward"]) < 1e-4
    assert [r["accuracy"] for r in rows(d / "ppo_ddp", "accuracy") if r.get("event") == "eval"] == \
        [r["accuracy"] for r in rows(d / "ppo_fsdp", "accuracy") if r.get("event") == "eval"]


def test_grpo_under_fsdp_in_bf16_starts_at_kl_zero(two_ranks):
    _, results = two_ranks
    for rank in (0, 1):
        inv = results[rank]["scripts"]["grpo", "fsdp_bf16"]["invariants"]
        assert inv["kl_at_start"] == 0.0 and inv["ratio_failures"] == 0 and inv["iterations"] == 1, inv


def test_grpo_block_by_block_generation_matches_the_gathered_rollout(two_ranks):
    """--no-fsdp_gather_rollout (every block gathered at every token, ranks in lock-step, the 70B
    setting) gives the run of the default (the whole model gathered once per rollout)."""
    d, _ = two_ranks
    assert [r["reward"] for r in rows(d / "grpo_fsdp_block", "reward")] == \
        [r["reward"] for r in rows(d / "grpo_fsdp", "reward")]
    assert max_diff(final_weights(d / "grpo_fsdp_block"), final_weights(d / "grpo_fsdp")) < 1e-6


@pytest.mark.parametrize("stage,keys", [("grpo", ("reward", "policy_loss", "kl")),
                                        ("ppo", ("reward_raw", "policy_loss", "kl", "value_loss", "explained_var",
                                                 "vf_clipfrac", "kl_coef"))])
def test_ppo_and_grpo_under_fsdp_resume_exactly(two_ranks, stage, keys):
    """Iteration 2 again from the sharded resume checkpoint of iteration 1, written in the background
    (weights, AdamW, RNG; PPO's critic and its AdamW sharded beside the actor's): the same rollout,
    losses (PPO's value loss: the critic was restored) and final weights, bit for bit."""
    d, _ = two_ranks
    assert (d / f"{stage}_fsdp" / "step_0000001").is_dir()   # a DCP directory
    a, b = final_weights(d / f"{stage}_fsdp"), final_weights(d / f"{stage}_fsdp_resume")
    assert all(torch.equal(a[k], b[k]) for k in a)
    pick = lambda r: [r[k] for k in keys]   # noqa: E731
    want, got = rows(d / f"{stage}_fsdp", keys[0])[1:], rows(d / f"{stage}_fsdp_resume", keys[0])
    assert len(got) == 1 and [pick(r) for r in want] == [pick(r) for r in got]


def test_rl_models_start_sharded_as_a_whole_load(two_ranks):
    """rlhf_ppo.py / grpo.py's start under FSDP: reference, reward model and critic equal a whole load,
    each rank read only its own shards (half the model's bytes, give or take the unsharded buffers)."""
    _, results = two_ranks
    for rank, out in results.items():
        for name, r in out["start"].items():
            assert r["keys"] and r["diff"] == 0.0, (rank, name, r)
            assert r["bytes_read"] == r["own_bytes"] < 0.6 * r["whole_bytes"], (rank, name, r)
            assert r["frozen"] if name != "critic" else r["trainable"], (rank, name, r)
            assert r.get("score_diff", 0.0) < 1e-5, (rank, name, r)


def test_dpo_sampling_rounds_under_fsdp_match_ddp(two_ranks):
    """Two rounds: the same sampled pairs in both (the second sampled by the policy the first trained),
    the same weights, and the between-rounds lab evaluation (every rank generates under FSDP). Under
    FSDP the reward model is sharded: rank 0 scores 3 x 12 answers (2 batches of 32), rank 1 2 x 12
    (1 batch) and pads its scoring to rank 0's count (without it, rank 0 would wait in an all-gather)."""
    d, _ = two_ranks
    for rnd in (1, 2):
        pairs = [common.read_jsonl(str(d / f"dpo_{p}" / f"round_{rnd:02d}_pairs.jsonl")) for p in ("ddp", "fsdp")]
        scores = [[(r.pop("chosen_score"), r.pop("rejected_score")) for r in p] for p in pairs]
        assert pairs[0] == pairs[1] and len(pairs[0]) >= 2, rnd   # the same answers made the same pairs
        # (scores: the same weights, batched with other companions and padding: float order, ~5e-7 measured;
        # pairs identical and scores within 1e-5 in all 6 cells of tests/perturb.py)
        assert max(abs(x - y) for a, b in zip(*scores) for x, y in zip(a, b)) < 1e-5, scores
    assert max_diff(final_weights(d / "dpo_ddp"), final_weights(d / "dpo_fsdp")) < 1e-6
    summary = [json.load(open(d / f"dpo_{p}" / "rounds.json")) for p in ("ddp", "fsdp")]
    accuracy = [[r.get("eval_accuracy") for r in s["rounds"]] for s in summary]
    assert accuracy[0] == accuracy[1] and accuracy[0][0] is not None, accuracy


def test_grpo_dry_run(capsys):
    """grpo.py --dry_run on the tiny preset (no checkpoint needed): the policy's FSDP step with the
    reference sharded beside it; the reference has no optimizer state (AdamW's is SFT's at the same
    model) and its bf16 shards are counted; the rollout's closed-form line is printed."""
    import sft
    flags = ["--world_size", "4", "--batch_size", "2", "--dtype", "bfloat16"]
    g = grpo.main(["--dry_run", "--init_from", "tiny", "--max_new_tokens", "16", *flags])
    s = sft.main(["--dry_run", "--init_from", "tiny", "--seq_len", "64", *flags])
    n = Llama(LlamaConfig.from_preset("tiny")).num_params()
    assert g["optimizer"] == s["optimizer"] and g["params"] >= 4 * n / 4
    out = capsys.readouterr().out
    assert "dry run: grpo, FSDP x 4" in out and "reference sharded, frozen" in out
    # the rollout's KV cache is what model.generate allocates for 8 x 8 answers of a whole context, in bf16
    from model import KVCache
    cache = KVCache(LlamaConfig.from_preset("tiny"), 64, 64, "cpu", torch.bfloat16)
    assert g["rollout_kv_cache"] == sum(t.nbytes for t in cache.k + cache.v) and g["rollout_gathered"] == 2 * n
    assert "rollout phase" in out


_PPO_DRY_RUNS = """
import contextlib, io, json, sys
sys.path.insert(0, sys.argv[1])
import reward, rlhf_ppo, sft
flags = ["--world_size", "4", "--batch_size", "2", "--dtype", "bfloat16"]
ppo = ["--dry_run", "--init_from", "tiny", "--max_new_tokens", "16"]
out = io.StringIO()
with contextlib.redirect_stdout(out):
    res = {"p": rlhf_ppo.main([*ppo, *flags]),
           "s": sft.main(["--dry_run", "--init_from", "tiny", "--seq_len", "64", *flags]),
           "r": reward.main(["--dry_run", "--init_from", "tiny", *flags[:2], "--batch_size", "1", *flags[4:]]),
           "hsdp": rlhf_ppo.main([*ppo, *flags, "--fsdp_shard_size", "2"]),
           "fsdp2": rlhf_ppo.main([*ppo, *flags[2:], "--world_size", "2"])}
print(json.dumps({**res, "out": out.getvalue()}))
"""


def test_ppo_dry_run():
    """rlhf_ppo.py --dry_run on the tiny preset: actor and critic trained side by side (common.fsdp_dry_run's
    trained=), reference and reward model sharded and frozen. AdamW's states are exactly SFT's at the
    actor's shape plus reward.py's at the critic's (about twice one model's: the critic has no LM head);
    all four models' shards are in "params" (the frozen two in bf16).
    In a process of its own: after PPO's dry run (two trained models under one FSDP root, fake process
    group) this process's later forked FSDP runs wrote DCP checkpoints whose global plan held one rank's
    chunks ("invalid fill"); a user runs --dry_run as a process of its own anyway."""
    done = subprocess.run([sys.executable, "-c", _PPO_DRY_RUNS, str(REPO)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    res = json.loads(done.stdout.strip().splitlines()[-1])
    p, s, r, hsdp, fsdp2, out = (res[k] for k in ("p", "s", "r", "hsdp", "fsdp2", "out"))
    assert p["optimizer"] == s["optimizer"] + r["optimizer"] and 1.7 * s["optimizer"] < p["optimizer"]
    config = LlamaConfig.from_preset("tiny")
    n_lm, n_rm = Llama(config).num_params(), reward.RewardModel(config).num_params()
    assert p["params"] >= (4 + 2) * (n_lm + n_rm) / 4, (p["params"], n_lm, n_rm)   # fp32 trained, bf16 frozen
    assert "dry run: ppo, FSDP x 4" in out and "actor + critic trained" in out
    # --fsdp_shard_size reaches all four models: 4 ranks as 2 x 2 cost what FSDP over 2 does
    assert hsdp == fsdp2 and hsdp["params"] > p["params"]


def test_ppo_refuses_offload_under_fsdp(tmp_path):
    """--offload moves whole frozen models; under FSDP they are sharded instead: a one-line refusal."""
    with pytest.raises(SystemExit, match="drop --offload"):
        rlhf_ppo.get_args(["--init_from", "x", "--reward_model", "y", "--prompts", "z", "--parallel", "fsdp",
                           "--offload", "--out_dir", str(tmp_path)])
