"""grpo.py: the advantages (GRPO, Dr. GRPO, RLOO) against closed forms; a group whose answers all
scored the same gives exactly zero gradient; at ratio 1 the clipped objective's gradient is the plain
policy gradient; DDP gradients equal one process's on the whole batch (every --loss_norm); exact
resume; the checker and math rewards on edge cases; prompt files with bad lines and with none usable."""
import json
import math
import os
import shutil
from datetime import timedelta

import pytest
import torch

import common
import grpo
import reward
from data import lab
from model import Llama, LlamaConfig


# -----------------------------------------------------------------------------
# Advantages, by hand


def test_advantages_closed_form():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0,     # one right of four
                      0.5, 0.5, 0.5, 0.5,     # flat: no signal
                      3.0, 1.0, 2.0, 2.0])
    G = 4
    # group 0: mean 1/4, sample std sqrt(((3/4)^2 + 3 (1/4)^2) / 3) = 1/2
    # group 2: mean 2, sample std sqrt((1 + 1 + 0 + 0) / 3) = sqrt(2/3)
    s = math.sqrt(2 / 3)
    want_grpo = [0.75 / 0.5, -0.25 / 0.5, -0.25 / 0.5, -0.25 / 0.5, 0, 0, 0, 0, 1 / s, -1 / s, 0, 0]
    assert grpo.group_advantages(r, G, "grpo", eps=0.0).tolist() == pytest.approx(want_grpo, abs=1e-6)
    # the eps in the denominator: (r - mean) / (std + eps)
    assert grpo.group_advantages(r, G, "grpo", eps=0.5)[0].item() == pytest.approx(0.75 / 1.0, abs=1e-6)
    want_dr = [0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0, 1.0, -1.0, 0, 0]
    assert grpo.group_advantages(r, G, "drgrpo").tolist() == pytest.approx(want_dr, abs=1e-6)
    # RLOO: r_i minus the mean of the OTHER three answers
    want_rloo = [1 - 0, 0 - 1 / 3, 0 - 1 / 3, 0 - 1 / 3, 0, 0, 0, 0, 3 - 5 / 3, 1 - 7 / 3, 2 - 2, 2 - 2]
    assert grpo.group_advantages(r, G, "rloo").tolist() == pytest.approx(want_rloo, abs=1e-6)
    # ... which is G / (G - 1) times Dr. GRPO's
    assert torch.allclose(grpo.group_advantages(r, G, "rloo"), grpo.group_advantages(r, G, "drgrpo") * 4 / 3)
    # every method sums to 0 within a group; G = 2 RLOO: +-(r1 - r2)
    for m in ("grpo", "drgrpo", "rloo"):
        assert grpo.group_advantages(r, G, m).view(-1, G).sum(1).abs().max().item() < 1e-6
    assert grpo.group_advantages(torch.tensor([1.0, 0.25]), 2, "rloo").tolist() == [0.75, -0.75]
    assert grpo.zero_variance_groups(r, G) == 1


def test_flat_group_advantage_is_exactly_zero_even_where_the_mean_rounds():
    # 0.1 * 3 / 3 != 0.1 in floating point: r - mean would give ~1e-17, and std ~1e-17, and
    # (r - mean) / std a number of order 1 -- pure rounding noise trained on
    r = torch.tensor([0.1, 0.1, 0.1], dtype=torch.float64)
    assert (r - r.mean()).abs().max().item() > 0             # the rounding is real (-1.4e-17) ...
    for m in ("grpo", "drgrpo", "rloo"):
        adv = grpo.group_advantages(r, 3, m, eps=0.0)
        assert torch.equal(adv, torch.zeros(3, dtype=torch.float64))   # ... and does not reach the advantages


# -----------------------------------------------------------------------------
# The loss: a zero-variance group, the ratio-1 gradient, the normalisers


def tiny(tok, seed=0, max_seq_len=96):
    torch.manual_seed(seed)
    return Llama(LlamaConfig.from_preset("tiny", vocab_size=tok.vocab_size, max_seq_len=max_seq_len)).eval()


QUESTIONS = ["Who are you?", "你是谁？", "What is 3 + 4?", "Hi"]


def batch(tok, model, G=2, seed=0, n=12):
    """A real rollout of len(QUESTIONS) groups of G answers of different lengths, in the padded layout."""
    prompts = [tok.render_prompt([{"role": "user", "content": q}]) for q in QUESTIONS for _ in range(G)]
    gen = torch.Generator().manual_seed(seed)
    responses = model.generate(prompts, n, temperature=1.0, eos_id=tok.stop_ids, generator=gen)
    cuts = [3, n, 7, 1, 5, 9, 2, 11][:len(responses)]
    responses = [r[:c] + [tok.end_id] if c < len(r) else r for r, c in zip(responses, cuts)]
    idx, attn, mask, P = common.pad_rollout(prompts, responses, tok.pad_id, tok.stop_ids)
    with torch.no_grad():
        logp_old, _ = common.response_logprobs(model, idx, attn, P, 1.0)
    return idx, attn, mask, P, logp_old


def grads(model):
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


def test_zero_variance_groups_give_exactly_zero_gradient(tok):
    model, ref = tiny(tok), tiny(tok, seed=3)
    idx, attn, mask, P, logp_old = batch(tok, model)
    with torch.no_grad():
        logp_ref, _ = common.response_logprobs(ref, idx, attn, P, 1.0)
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.3, 0.3, 0.25, 0.25])   # every group flat
    for method in ("grpo", "drgrpo", "rloo"):
        adv = grpo.group_advantages(rewards, 2, method)
        for norm in ("seq", "token", "constant"):
            model.zero_grad()
            logp, _ = common.response_logprobs(model, idx, attn, P, 1.0)
            lt, _ = grpo.token_loss(logp, logp_old, logp_ref, adv, mask, 0.2, 0.28)
            grpo.aggregate(lt, mask, norm, grpo.step_denominator([mask], norm, 12)).backward()
            assert all((g == 0).all() for g in grads(model)), (method, norm)
    # teeth: the KL term still pulls (k3 in the loss), and one group with signal moves the model
    model.zero_grad()
    logp, _ = common.response_logprobs(model, idx, attn, P, 1.0)
    lt, _ = grpo.token_loss(logp, logp_old, logp_ref, grpo.group_advantages(rewards, 2, "grpo"), mask, 0.2, 0.2, 0.1)
    grpo.aggregate(lt, mask, "seq", 8.0).backward()
    assert any((g != 0).any() for g in grads(model))
    rewards[0] = 0.0
    model.zero_grad()
    logp, _ = common.response_logprobs(model, idx, attn, P, 1.0)
    lt, _ = grpo.token_loss(logp, logp_old, None, grpo.group_advantages(rewards, 2, "grpo"), mask, 0.2, 0.2)
    grpo.aggregate(lt, mask, "seq", 8.0).backward()
    assert any((g != 0).any() for g in grads(model))


def test_training_only_the_rows_with_signal_gives_the_same_gradient(tok):
    """Step 4 passes only rows with a non-zero advantage forward and backward (rows_with_gradient); the
    normaliser still counts every row, so each micro-batch's gradient is the one of all its rows."""
    model = tiny(tok)
    idx, attn, mask, P, logp_old = batch(tok, model, G=4)                 # 4 groups of 4
    rewards = torch.tensor([1.0] * 4 + [0.0, 1.0, 1.0, 0.0] + [0.5] * 4 + [0.2, 0.9, 0.4, 0.4])
    adv = grpo.group_advantages(rewards, 4, "grpo")                       # groups 0 and 2 flat
    order = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    micro = order.split(4)
    assert [int((adv[m] != 0).sum()) for m in micro] == [2, 2, 2, 2]      # mixed micro-batches
    flat_micro = torch.tensor([0, 1, 2, 3])
    assert grpo.rows_with_gradient(flat_micro, adv, False).tolist() == [0]    # never empty
    assert grpo.rows_with_gradient(flat_micro, adv, True).tolist() == [0, 1, 2, 3]  # k3 in the loss: all
    for norm in ("seq", "token", "constant"):
        denom = grpo.step_denominator([mask[m] for m in micro], norm, 12)
        got, want = [], []
        for subset, out in ((True, got), (False, want)):
            model.zero_grad()
            for m in micro:
                rows = grpo.rows_with_gradient(m, adv, False) if subset else m
                assert not subset or len(rows) == 2
                logp, _ = common.response_logprobs(model, idx[rows], attn[rows], P, 1.0)
                lt, _ = grpo.token_loss(logp, logp_old[rows], None, adv[rows], mask[rows], 0.2, 0.2)
                grpo.aggregate(lt, mask[rows], norm, denom).backward()
            out += grads(model)
        assert any((g != 0).any() for g in got)
        err = max((a - b).abs().max().item() for a, b in zip(got, want))
        assert err < 1e-7, (norm, err)   # measured <= 4.7e-10 in every cell of the perturbation matrix


def test_at_ratio_one_the_clipped_gradient_is_the_policy_gradient():
    torch.manual_seed(0)
    B, R = 6, 5
    logp_old = -torch.rand(B, R) * 3
    mask = torch.tensor([[1.0] * n + [0.0] * (R - n) for n in (5, 2, 4, 1, 3, 5)])
    adv = torch.randn(B)
    for norm in ("seq", "token", "constant"):
        denom = grpo.step_denominator([mask], norm, R)
        logp = logp_old.clone().requires_grad_()
        lt, st = grpo.token_loss(logp, logp_old, None, adv, mask, 0.2, 0.28)
        grpo.aggregate(lt, mask, norm, denom).backward()
        assert st["ratio_dev"].item() == 0.0 and st["clipfrac"].item() == 0.0
        # REINFORCE with the same normaliser: d/dlogp of -A * log pi
        plain = logp_old.clone().requires_grad_()
        grpo.aggregate(-adv[:, None] * plain * mask, mask, norm, denom).backward()
        assert torch.allclose(logp.grad, plain.grad, atol=1e-7), norm
        # closed form: seq -> -A / (|o_i| * B); token -> -A / total tokens; constant -> -A / (B * R)
        n = mask.sum(1, keepdim=True)
        want = {"seq": -adv[:, None] / (n * B), "token": -adv[:, None] / mask.sum(),
                "constant": -adv[:, None] / (B * R)}[norm] * mask
        assert torch.allclose(logp.grad, want, atol=1e-7), norm
    # away from ratio 1 the clip bites (the test above has teeth): ratio 1.5 with A > 0 is flat
    logp = (logp_old + math.log(1.5)).requires_grad_()
    lt, st = grpo.token_loss(logp, logp_old, None, adv.abs(), mask, 0.2, 0.2)
    grpo.aggregate(lt, mask, "token", mask.sum()).backward()
    assert st["clipfrac"].item() == 1.0 and (logp.grad == 0).all()


def test_overlong_penalty_and_alarms():
    # DAPO: 0 up to max - buffer, linear to the full penalty at max
    assert grpo.overlong_penalty(30, 48, 16, 1.0) == 0.0
    assert grpo.overlong_penalty(40, 48, 16, 1.0) == pytest.approx(0.5)
    assert grpo.overlong_penalty(48, 48, 16, 2.0) == pytest.approx(2.0)
    assert grpo.overlong_penalty(48, 48, 0, 2.0) == 0.0
    row = lambda e, n: {"entropy": e, "length": n}   # noqa: E731
    assert grpo.collapse_alarms([row(1.0, 10)] * 4, 2) == []
    kinds = lambda h: {k for k, _ in grpo.collapse_alarms(h, 2)}   # noqa: E731
    assert kinds([row(1.0, 10)] * 2 + [row(0.2, 10)] * 2) == {"entropy_collapse"}
    assert kinds([row(1.0, 10)] * 2 + [row(1.0, 4)] * 2) == {"length_collapse"}
    assert kinds([row(1.0, 10)] * 2 + [row(1.0, 20)] * 2) == {"length_growth"}
    assert kinds([row(1.0, 10)] * 3) == set()   # fewer than 2 windows: no verdict


# -----------------------------------------------------------------------------
# Rewards: the lab checker and the GSM8K-style numeric match


def test_math_reward_edge_cases():
    gsm = {"question": "...", "answer": "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs.\n#### 18"}
    assert grpo.math_reference(gsm) == 18.0
    ok = lambda a, end=True: grpo.math_reward(a, gsm, end)   # noqa: E731
    assert ok("She has 16 - 3 - 4 = 9 eggs and makes 9 * 2 = 18 dollars.")     # several numbers: the last
    assert ok("#### 18") and ok("The answer is $18.") and ok("18.0") and ok("答案是１８。")   # full-width digits
    assert ok("所以她每天赚18美元。")
    assert not ok("It is 18 or maybe 20.")                     # the LAST number is the answer
    assert ok("#### 18 (I first thought 20)")                  # after ####: the number right after it
    assert ok("18 ... no wait #### 18")
    assert not ok("eighteen") and not ok("十八") and not ok("")  # no digits: nothing to grade
    assert not ok("9 * 2 = 18", end=False)                     # cut at the length limit: not graded
    big = {"answer": "#### 1,234"}
    assert grpo.math_reward("That makes 1,234 in all.", big) == 1.0 and grpo.math_reward("1234", big) == 1.0
    assert grpo.math_reward("-5", {"answer": "#### -5"}) == 1.0 and grpo.math_reward("5", {"answer": "#### -5"}) == 0
    # the lab's arithmetic truth works as a reference too
    arith = {"truth": {"type": "arith", "answer": "7", "operands": ["3", "4"], "lang": "en"}}
    assert grpo.math_reward("3 + 4 = 7", arith) == 1.0
    assert grpo.math_reference({"prompt": "hi"}) is None


@pytest.fixture(scope="module")
def lab_sets():
    return lab.generate(seed=0, pretrain_docs=10, sft_train=10, sft_val=10, prefs_train=10, prefs_val=8,
                        rank_train=10, rl_prompts=80, rl_eval=10)


def test_checker_reward_edge_cases(lab_sets):
    sets = lab_sets
    fact = next(r for r in sets["rl_prompts"] if r["task"] == "fact" and r["truth"]["lang"] == "en")
    zh = next(r for r in sets["rl_prompts"] if r["task"] == "fact" and r["truth"]["lang"] == "zh")
    arith = next(r for r in sets["rl_prompts"] if r["task"] == "arith" and r["truth"]["lang"] == "en")
    for rec in (fact, zh, arith):
        assert grpo.checker_reward(rec["reference"], rec) == 1.0              # the reference answer is right
        assert grpo.checker_reward(rec["reference"], rec, finished=False) == 0.0  # cut at the limit: not graded
    # a right fact in the wrong language loses the language part (0.25), and the format penalty applies
    assert grpo.checker_reward(zh["truth"]["answer"]["en"] + ".", zh) < 1.0
    assert grpo.checker_reward(fact["truth"]["answer"]["zh"] + "。", fact) < 1.0
    assert not grpo.format_ok(fact["truth"]["answer"]["zh"] + "。", fact, {"checker"})
    assert grpo.format_ok(fact["reference"], fact, {"checker"})
    # several numbers: the arithmetic checker wants the last one to be the answer
    ops, ans = arith["truth"]["operands"], arith["truth"]["answer"]
    wrong = str(int(ans) + 1)
    assert grpo.checker_reward(f"{ops[0]} and {ops[1]} give {ans}.", arith) == 1.0
    assert grpo.checker_reward(f"{ans}, or rather {wrong}.", arith) < 1.0


# -----------------------------------------------------------------------------
# Prompt files: bad lines reported with file:line; nothing usable is an error


def test_prompt_file_errors(tok, tmp_path, capsys):
    good = {"prompt": "What is 3 + 4?", "answer": "3 + 4 = 7\n#### 7"}
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join([json.dumps(good), "{not json", json.dumps({"prompt": "no reference here"}),
                               json.dumps({"messages": [{"role": "assistant", "content": "no user turn"}]}),
                               json.dumps(good)]) + "\n")
    records, ids = common.load_prompts(str(path), tok, 80, check=grpo.usable_record({"math"}))
    assert len(records) == len(ids) == 2
    out = capsys.readouterr().out
    assert f"{path}:2" in out and f"{path}:3" in out and f"{path}:4" in out
    assert "numeric reference" in out
    # the checker needs a truth: none of these lines has one
    with pytest.raises(SystemExit, match="no usable prompts"):
        common.load_prompts(str(path), tok, 80, check=grpo.usable_record({"checker"}))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n{broken\n")
    with pytest.raises(SystemExit, match="no usable prompts"):
        common.load_prompts(str(empty), tok, 80)
    with pytest.raises(SystemExit, match="unknown"):
        grpo.get_args(["--init_from", "x", "--prompts", str(path), "--reward", "vibes"])
    with pytest.raises(SystemExit, match="group_size"):
        grpo.get_args(["--init_from", "x", "--prompts", str(path), "--group_size", "1"])


# -----------------------------------------------------------------------------
# End to end on a tiny model: exact resume; DDP


def write_fixture(d, tok, sets):
    with open(d / "prompts.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in sets["rl_prompts"][:40])
    init = tiny(tok, seed=0, max_seq_len=64)
    common.save_checkpoint(str(d / "init"), "final", init, step=0, config={}, tokenizer=tok)
    # A random policy never says <|end|> in 10 tokens: the verifiers grade every answer 0 (cut off), so
    # every group would be flat. A random reward model (the same tiny backbone) gives every answer a score.
    torch.manual_seed(1)
    rm = reward.RewardModel(LlamaConfig.from_preset("tiny", vocab_size=tok.vocab_size, max_seq_len=64))
    torch.nn.init.normal_(rm.head.weight, std=0.5)
    common.save_checkpoint(str(d / "rm"), "final", rm, step=0, config={}, tokenizer=tok, kind=reward.REWARD_KIND)
    return d


def grpo_argv(d, out, *extra):
    return ["--init_from", str(d / "init"), "--prompts", str(d / "prompts.jsonl"), "--out_dir", str(out),
            "--reward", "checker", "model:0.5", "--reward_model", str(d / "rm"), "--group_size", "4",
            "--prompts_per_step", "2", "--batch_size", "4",
            "--max_new_tokens", "10", "--lr", "1e-3", "--min_lr", "1e-4", "--warmup_steps", "1",
            "--sample_interval", "0", "--log_interval", "1000", "--eval_interval", "0", "--save_interval", "0",
            "--seed", "1", *extra]


def test_exact_resume(tok, tmp_path, one_thread, lab_sets):
    d = write_fixture(tmp_path, tok, lab_sets)
    flags = ("--max_steps", "4", "--save_interval", "2", "--keep_last", "0", "--epochs", "2",
             "--dynamic_sampling", "--kl", "k3_loss")
    ma = grpo.main(grpo_argv(d, tmp_path / "a", *flags))
    inv = ma["invariants"]
    assert inv["iterations"] == 4 and inv["kl_at_start"] == 0.0 and inv["ratio_failures"] == 0
    os.makedirs(tmp_path / "b")
    shutil.copy(tmp_path / "a" / "step_0000002.pt", tmp_path / "b" / "step_0000002.pt")
    mb = grpo.main(grpo_argv(d, tmp_path / "b", *flags, "--resume"))
    a, b = (common.load_model(str(tmp_path / x / "final.pt"))[0].state_dict() for x in ("a", "b"))
    before = common.load_model(str(d / "init"))[0].state_dict()
    assert any(not torch.equal(before[k], a[k]) for k in a)           # the policy was trained ...
    assert all(torch.equal(a[k], b[k]) for k in a)                    # ... and the resumed run is the same
    ra, rb = (common.read_jsonl(str(tmp_path / x / "log.jsonl")) for x in ("a", "b"))
    rows = lambda log: [(r["reward"], r["zero_var_groups"], r["refilled"]) for r in log if "reward" in r]  # noqa: E731
    assert rows(ra)[2:] == rows(rb)
    assert ma["train"] == mb["train"] and ma["zero_var_groups_total"] == mb["zero_var_groups_total"]
    with pytest.raises(SystemExit):    # a finished run is never overwritten
        grpo.main(grpo_argv(d, tmp_path / "a", *flags))


def flatten_first_group(monkeypatch, group_size=4):
    """Scorer whose first group of every call scores the same (a flat group beside one with signal)."""
    real = grpo.Scorer.__call__

    def call(self, records, prompts, responses):
        answers, rewards, scores, oks = real(self, records, prompts, responses)
        rewards[:group_size] = 0.5
        return answers, rewards, scores, oks
    monkeypatch.setattr(grpo.Scorer, "__call__", call)


def test_skipping_flat_answers_trains_the_same_policy(tok, tmp_path, one_thread, lab_sets, monkeypatch):
    d = write_fixture(tmp_path, tok, lab_sets)
    flatten_first_group(monkeypatch)
    flags = ("--max_steps", "3", "--epochs", "2")
    grpo.main(grpo_argv(d, tmp_path / "skip", *flags))
    monkeypatch.setattr(grpo, "rows_with_gradient", lambda rows, advantages, kl_in_loss: rows)
    grpo.main(grpo_argv(d, tmp_path / "all", *flags))
    logs = {x: [r for r in common.read_jsonl(str(tmp_path / x / "log.jsonl")) if "reward" in r] for x in ("skip", "all")}
    assert all(r["zero_var_groups"] == 1 and r["groups"] == 2 for r in logs["skip"])
    assert all(r["trained_frac"] < 0.8 for r in logs["skip"]) and all(r["trained_frac"] == 1 for r in logs["all"])
    a, b = (common.load_model(str(tmp_path / x / "final.pt"))[0].state_dict() for x in ("skip", "all"))
    before = common.load_model(str(d / "init"))[0].state_dict()
    assert any(not torch.equal(before[k], a[k]) for k in a)
    err = max((a[k] - b[k]).abs().max().item() for k in a)
    assert err < 1e-6, err     # the same updates up to summation order: <= 1.2e-7 over the perturbation matrix
    for ra, rb in zip(logs["skip"], logs["all"]):
        for key in ("entropy", "reward", "policy_loss"):
            assert abs(ra[key] - rb[key]) < 1e-6, key


def test_no_gradient_passes_run_one_micro_batch_at_a_time(tok, tmp_path, one_thread, lab_sets):
    """Step 3 (old and reference log-probs, entropy) and the reward model's scores run over --batch_size
    rows at a time, not the whole rollout (8 answers here): the memory the dry run budgets. Whether they
    give the whole-batch numbers is test_model_reward_of_an_implicit_reward_model_sums_the_answer_tokens
    (Scorer) and test_ppo's experience test (the same common.by_row_chunks)."""
    d = write_fixture(tmp_path, tok, lab_sets)
    seen = []

    def record(module, inputs):
        if isinstance(module, (Llama, reward.RewardModel)) and not torch.is_grad_enabled():
            seen.append((type(module).__name__, inputs[0].shape[0]))
    hook = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        grpo.main(grpo_argv(d, tmp_path / "run", "--max_steps", "1", "--batch_size", "2"))
    finally:
        hook.remove()
    assert {name for name, _ in seen} == {"Llama", "RewardModel"}
    assert max(rows for _, rows in seen) == 2


def _dist_worker(rank, world, store, tokpath, argv, argv_flat, queue):
    import traceback
    import torch.distributed as dist
    from tokenizer import Tokenizer
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        tok = Tokenizer(tokpath)
        model = tiny(tok)
        idx, attn, mask, P, logp_old = batch(tok, model, G=4)          # 4 groups of 4 (the same on both ranks)
        adv = grpo.group_advantages(torch.linspace(0, 1, 16) ** 2, 4, "grpo")
        info = common.DistInfo(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"))
        ddp = common.wrap_model(model, info, "ddp")
        half = slice(rank * 8, (rank + 1) * 8)                         # each rank: its own two groups
        out = {}
        for norm in ("seq", "token", "constant"):
            for distributed in (True, False):                         # False: local normaliser (the bug)
                ddp.zero_grad()
                denom = grpo.step_denominator([mask[half]], norm, 12, world, distributed)
                logp, _ = common.response_logprobs(ddp, idx[half], attn[half], P, 1.0)
                lt, _ = grpo.token_loss(logp, logp_old[half], None, adv[half], mask[half], 0.2, 0.2)
                grpo.aggregate(lt, mask[half], norm, denom).backward()
                # numpy copies: torch tensors cross a multiprocessing queue as shared-memory handles, which
                # race with this worker's exit
                out[norm, distributed] = [p.grad.numpy().copy() for p in model.parameters()]
        queue.put((rank, out, None))
        ok = grpo.main(argv)["weights_in_sync"]                        # the real script, rollouts on both ranks
        queue.put((rank, ok, None))
        if rank == 0:   # every group flat on rank 0 only: it trains one zero-gradient row per micro-batch
            real = grpo.Scorer.__call__

            def flat(self, *a):
                answers, rewards, scores, oks = real(self, *a)
                return answers, torch.full_like(rewards, 0.5), scores, oks
            grpo.Scorer.__call__ = flat
        queue.put((rank, grpo.main(argv_flat)["weights_in_sync"], None))   # (a rank skipping its backward hangs)
    except BaseException:   # every rank's traceback: the first error may be the victim's
        queue.put((rank, None, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


def test_ddp_gradients_equal_one_process(tok, tmp_path, one_thread, lab_sets):
    d = write_fixture(tmp_path, tok, lab_sets)
    argv = grpo_argv(d, tmp_path / "ddp", "--max_steps", "2", "--kl", "k3_loss")
    argv_flat = grpo_argv(d, tmp_path / "ddp_flat", "--max_steps", "2")
    ctx = torch.multiprocessing.get_context("fork")
    queue = ctx.SimpleQueue()
    procs = torch.multiprocessing.start_processes(
        _dist_worker, args=(2, str(tmp_path / "store"), tok.path, argv, argv_flat, queue), nprocs=2,
        start_method="fork", join=False)
    results = [queue.get() for _ in range(6)]
    procs.join()
    errors = [err for _, _, err in results if err]
    assert not errors, "\n".join(errors)
    grads_by_rank = {r: v for r, v, _ in results if isinstance(v, dict)}
    # one process, the whole batch
    model = tiny(tok)
    idx, attn, mask, P, logp_old = batch(tok, model, G=4)
    adv = grpo.group_advantages(torch.linspace(0, 1, 16) ** 2, 4, "grpo")
    assert mask[:8].sum() != mask[8:].sum()          # the ranks hold different token counts ("token" has teeth)
    for norm in ("seq", "token", "constant"):
        model.zero_grad()
        logp, _ = common.response_logprobs(model, idx, attn, P, 1.0)
        lt, _ = grpo.token_loss(logp, logp_old, None, adv, mask, 0.2, 0.2)
        grpo.aggregate(lt, mask, norm, grpo.step_denominator([mask], norm, 12)).backward()
        single = [p.grad for p in model.parameters()]
        for rank in (0, 1):
            g = grads_by_rank[rank][norm, True]
            err = max((torch.from_numpy(a) - b).abs().max().item() for a, b in zip(g, single))
            assert err < 1e-6, (norm, rank, err)
        if norm == "token":   # dividing by the local token count instead would be wrong
            g = grads_by_rank[0][norm, False]
            assert max((torch.from_numpy(a) - b).abs().max().item() for a, b in zip(g, single)) > 1e-5
    assert all(v is True for _, v, _ in results if not isinstance(v, dict))
    log = [r for r in common.read_jsonl(str(tmp_path / "ddp" / "log.jsonl")) if "reward" in r]
    assert len(log) == 2 and log[0]["groups"] == 4 and all(r["ratio_dev"] < 1e-4 for r in log)
    log = [r for r in common.read_jsonl(str(tmp_path / "ddp_flat" / "log.jsonl")) if "reward" in r]
    assert len(log) == 2 and all(r["zero_var_groups"] == 2 and r["trained_frac"] == (1 + 4) / 8 for r in log)


# -----------------------------------------------------------------------------
# LoRA: the reference is the policy with its adapters off


def test_lora_reference_is_the_base_only_adapters_train_and_resume_is_exact(tok, tmp_path, one_thread, lab_sets,
                                                                          monkeypatch):
    """grpo.py --lora_rank: one model loaded (the reference is the policy with its adapters off, so the
    KL at iteration 0 is exactly 0 and the first minibatch's ratio 1); only the adapters move, have
    gradients and AdamW state; checkpoints are adapter-only and a resumed run ends on the same adapters."""
    d = write_fixture(tmp_path, tok, lab_sets)
    loads = []
    real_load = common.load_model
    monkeypatch.setattr(common, "load_model", lambda *a, **k: loads.append(a[0]) or real_load(*a, **k))
    flags = ("--max_steps", "4", "--save_interval", "2", "--keep_last", "0", "--kl", "k3_loss", "--kl_coef", "0.1",
             "--lora_rank", "4", "--lora_alpha", "8", "--lr", "3e-2")
    ma = grpo.main(grpo_argv(d, tmp_path / "a", *flags))
    assert loads == [str(d / "init")]                  # the policy only: no reference copy
    inv = ma["invariants"]
    assert inv["kl_at_start"] == 0.0                   # adapters at B = 0 add exact zeros
    assert inv["ratio_failures"] == 0 and inv["ratio_max_dev"] < inv["ratio_tol"]
    step = torch.load(tmp_path / "a" / "step_0000002.pt", weights_only=True)
    assert step["lora"]["base_sha256"] == common.file_sha256(str(d / "init" / "final.pt"))
    names = list(step["model"])
    assert names and all(".lora." in k and k.endswith((".A", ".B")) for k in names)
    # AdamW holds state for exactly the adapters (the optimizer's params are the trainable ones, in order)
    state = step["optimizer"]["state"]
    assert len(state) == len(names) and all(state[i]["exp_avg"].shape == step["model"][k].shape
                                            for i, k in enumerate(names))
    log = [r for r in common.read_jsonl(str(tmp_path / "a" / "log.jsonl")) if "reward" in r]
    assert log[0]["kl"] == 0.0 and log[-1]["kl"] != 0.0      # the first rollout is the reference's own
    # the adapters trained: the merged final model is not the base
    final, _ = common.load_model(str(tmp_path / "a" / "final.pt"))
    base = real_load(str(d / "init"))[0].state_dict()
    assert max((v - base[k]).abs().max().item() for k, v in final.state_dict().items()) > 1e-4
    os.makedirs(tmp_path / "b")
    shutil.copy(tmp_path / "a" / "step_0000002.pt", tmp_path / "b" / "step_0000002.pt")
    grpo.main(grpo_argv(d, tmp_path / "b", *flags, "--resume"))
    a, b = (torch.load(tmp_path / x / "final.pt", weights_only=True)["model"] for x in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_model_reward_of_an_implicit_reward_model_sums_the_answer_tokens(tok):
    """--reward model with an implicit reward model (reward.py --implicit_beta): each answer's reward is
    the normalised beta * sum over its tokens (stop token included, prompt and padding not) of
    log pi_RM - log pi_ref, checked against PPO's answer log-prob code on the same rollout layout."""
    from types import SimpleNamespace
    torch.manual_seed(0)
    config = LlamaConfig.from_preset("tiny", vocab_size=tok.vocab_size, max_seq_len=96)
    rm = reward.RewardModel.from_llama(Llama(config), implicit_beta=0.4)
    with torch.no_grad():
        for p in rm.backbone.parameters():
            p.add_(0.05 * torch.randn_like(p))
    rm.eval().set_stats(-0.5, 2.0)
    prompts = [tok.render_prompt([{"role": "user", "content": q}]) for q in ("Who are you?", "3 + 4 = ?")]
    responses = [tok.encode("I am nanollama.") + [tok.end_id], tok.encode("3 + 4 = 7, and more and more")]   # one cut
    args = SimpleNamespace(rewards=[("model", 1.0)], missing_eos_penalty=0.0, max_new_tokens=64, overlong_buffer=0,
                           overlong_penalty=0.0, format_penalty=0.0, batch_size=1)   # one row per forward
    scorer = grpo.Scorer(args, tok, rm, "cpu", torch.autocast("cpu", enabled=False))
    _, rewards, _, _ = scorer([{}, {}], prompts, responses)
    idx, attn, mask, P = common.pad_rollout(prompts, responses, tok.pad_id, tok.stop_ids)
    with torch.no_grad():
        pol, _ = common.response_logprobs(rm.backbone, idx, attn, P, 1.0)
        base, _ = common.response_logprobs(rm.reference, idx, attn, P, 1.0)
    want = (0.4 * ((pol - base) * mask).sum(1) + 0.5) / 2.0
    assert rewards.tolist() == pytest.approx(want.tolist(), abs=1e-5)
    assert (want - 0.25).abs().min() > 1e-3   # not the zero reward of an unmoved model
