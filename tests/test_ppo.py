"""rlhf_ppo.py: GAE, the clipped policy and value losses and the KL estimators against hand-worked
numbers; masks (nothing after EOS counts); the run-time invariants (ratio == 1 on the first minibatch,
KL == 0 when actor == reference) on real rollouts; exact resume; DDP keeps the ranks' weights equal;
and a short PPO run on the lab world that beats its SFT model under the reward model and the checker."""
import json
import math
import os
import random
import shutil
from datetime import timedelta

import pytest
import torch

import common
import reward
import rlhf_ppo as ppo
import sft
from data import lab
from model import Llama, LlamaConfig


# -----------------------------------------------------------------------------
# GAE, by hand


def test_gae_hand_worked_example():
    gamma, lam = 0.9, 0.8                                    # gamma * lam = 0.72
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.5, -1.0, 99.0]])
    values = torch.tensor([[0.5, 0.4, 0.8], [1.0, -0.5, 42.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])   # row 1 ended after 2 tokens: 99 and 42 are padding
    adv, ret = ppo.gae(rewards, values, mask, gamma, lam)
    # row 0, backwards:  d2 = 1 + 0 - 0.8 = 0.2                 A2 = 0.2
    #                    d1 = 0 + 0.9 * 0.8 - 0.4 = 0.32        A1 = 0.32 + 0.72 * 0.2 = 0.464
    #                    d0 = 0 + 0.9 * 0.4 - 0.5 = -0.14       A0 = -0.14 + 0.72 * 0.464 = 0.19408
    # row 1 (V after the last token is 0, not the padding's 42):
    #                    d1 = -1 + 0 + 0.5 = -0.5               A1 = -0.5
    #                    d0 = 0.5 + 0.9 * -0.5 - 1 = -0.95      A0 = -0.95 + 0.72 * -0.5 = -1.31
    want_adv = torch.tensor([[0.19408, 0.464, 0.2], [-1.31, -0.5, 0.0]])
    want_ret = torch.tensor([[0.69408, 0.864, 1.0], [-0.31, -1.0, 0.0]])   # returns = A + V
    assert (adv - want_adv).abs().max().item() < 1e-6
    assert (ret - want_ret).abs().max().item() < 1e-6
    # gamma = lam = 1: the return is the sum of the rewards still to come (Monte Carlo)
    adv, ret = ppo.gae(rewards, values, mask, 1.0, 1.0)
    assert (ret - torch.tensor([[1.0, 1.0, 1.0], [-0.5, -1.0, 0.0]])).abs().max().item() < 1e-6
    # lam = 0: one-step TD errors
    adv, _ = ppo.gae(rewards, values, mask, gamma, 0.0)
    assert (adv - torch.tensor([[-0.14, 0.32, 0.2], [-0.95, -0.5, 0.0]])).abs().max().item() < 1e-6


def test_token_rewards_and_whitening():
    kl = torch.tensor([[0.1, -0.2, 0.3], [0.5, 0.25, float("nan")]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    r = ppo.token_rewards(torch.tensor([2.0, -1.0]), kl, mask, 0.5)
    want = torch.tensor([[-0.05, 0.1, -0.15 + 2.0], [-0.25, -0.125 - 1.0, 0.0]])   # score on the last real token
    assert (r - want).abs().max().item() < 1e-6
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 1e9]])
    w = ppo.masked_whiten(x, mask)
    vals = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    assert (w[mask.bool()] - (vals - 3.0) / vals.var(unbiased=False).sqrt()).abs().max().item() < 1e-5
    assert w[1, 2].item() == 0.0


# -----------------------------------------------------------------------------
# The clipped losses: closed forms, both branches


def test_policy_loss_closed_form_and_clipped_gradient():
    eps = 0.2
    ratios = [1.0, 1.5, 0.5, 1.1, 0.7, 2.0]
    adv = torch.tensor([[1.0, 1.0, 1.0, -1.0, -1.0, -2.0, 5.0]])
    logp_old = torch.tensor([[-1.0, -2.0, -0.5, -3.0, -1.5, -2.5, -1.0]])
    logp = (logp_old + torch.tensor([[math.log(r) for r in ratios] + [float("inf")]])).requires_grad_()
    mask = torch.tensor([[1.0] * 6 + [0.0]])                  # the last token is padding (and infinite)
    loss, st = ppo.policy_loss(logp, logp_old, adv, mask, eps)
    # per token max(-A r, -A clip(r, 0.8, 1.2)):
    #   r=1.0 A=1: -1 | r=1.5 A=1: max(-1.5, -1.2) = -1.2 (clipped) | r=0.5 A=1: max(-0.5, -0.8) = -0.5
    #   r=1.1 A=-1: 1.1 | r=0.7 A=-1: max(0.7, 0.8) = 0.8 (clipped) | r=2.0 A=-2: max(4.0, 2.4) = 4.0
    assert loss.item() == pytest.approx((-1 - 1.2 - 0.5 + 1.1 + 0.8 + 4.0) / 6, abs=1e-6)
    assert st["clipfrac"].item() == pytest.approx(2 / 6)
    assert st["ratio_dev"].item() == pytest.approx(1.0, abs=1e-6)
    want_akl = sum((r - 1) - math.log(r) for r in ratios) / 6   # k3 of log(pi/pi_old)
    assert st["approx_kl"].item() == pytest.approx(want_akl, abs=1e-6)
    loss.backward()
    # d/dlogp of -A r = -A r / n on the unclipped branch; the clipped branch is flat
    want_grad = [-a * r / 6 for a, r in zip([1, 1, 1, -1, -1, -2], ratios)]
    want_grad[1] = want_grad[4] = 0.0
    assert logp.grad[0, :6].tolist() == pytest.approx(want_grad, abs=1e-6)
    assert logp.grad[0, 6].item() == 0.0
    # nothing moved: ratio 1, approx KL 0, no clipping, loss = -mean(A)
    loss0, st0 = ppo.policy_loss(logp_old, logp_old, adv, mask, eps)
    assert st0["ratio_dev"].item() == 0.0 and st0["approx_kl"].item() == 0.0 and st0["clipfrac"].item() == 0.0
    assert loss0.item() == pytest.approx(-(1 + 1 + 1 - 1 - 1 - 2) / 6, abs=1e-7)


def test_value_loss_closed_form():
    c = 0.2
    v_old = torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0, 7.0])
    v = torch.tensor([0.1, 0.5, -0.5, 1.0, 0.5, 7.0])
    ret = torch.tensor([1.0, 1.0, -1.0, 0.0, 0.1, -50.0])
    mask = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 0.0])
    loss, st = ppo.value_loss(v, v_old, ret, mask, c)
    # V_clip = V_old + clip(V - V_old, -0.2, 0.2); per token max((V - R)^2, (V_clip - R)^2):
    #   0.1 -> (0.81, 0.81) 0.81 | 0.5 -> V_clip 0.2: (0.25, 0.64) 0.64 (clipped) | -0.5 -> -0.2: (0.25, 0.64) 0.64
    #   1.0 -> 1.0: 1.0 | 0.5 -> 0.2, R = 0.1: (0.16, 0.01) 0.16 (clipping would help, so it is not taken)
    assert loss.item() == pytest.approx(0.5 * (0.81 + 0.64 + 0.64 + 1.0 + 0.16) / 5, abs=1e-6)
    assert st["vf_clipfrac"].item() == pytest.approx(2 / 5)


def test_explained_variance():
    mask = torch.ones(1, 4)
    ret = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert ppo.explained_variance(ret, ret, mask) == pytest.approx(1.0)
    assert ppo.explained_variance(torch.full_like(ret, 2.5), ret, mask) == pytest.approx(0.0)
    assert ppo.explained_variance(ret + 1.0, ret, mask) == pytest.approx(1.0)   # a constant offset is "explained"


# -----------------------------------------------------------------------------
# KL estimators and the controller


def test_kl_estimators_formulas_and_k3_nonnegative():
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(4000, generator=g) * 8
    logp_ref = logp + torch.randn(4000, generator=g) * torch.logspace(-9, 0.5, 4000)   # tiny to large differences
    x = (logp - logp_ref).double()
    k1, k2, k3 = (ppo.kl_estimates(logp, logp_ref, k).double() for k in ("k1", "k2", "k3"))
    assert torch.allclose(k1, x, atol=0, rtol=1e-6)
    assert torch.allclose(k2, 0.5 * x ** 2, atol=1e-12, rtol=1e-6)
    assert torch.allclose(k3, (torch.exp(-x) - 1) + x, atol=1e-12, rtol=1e-5)
    assert (k3 >= 0).all() and (k2 >= 0).all() and (k1 < 0).any()          # k1 is negative for some tokens
    assert (ppo.kl_estimates(logp, logp, "k3") == 0).all() and (ppo.kl_estimates(logp, logp, "k1") == 0).all()
    # both unbiased: E_pi[k1] = E_pi[k3] = KL(pi || q) for two categorical distributions
    p, q = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64), torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    kl = (p * (p / q).log()).sum()
    for kind in ("k1", "k3"):
        assert (p * ppo.kl_estimates(p.log(), q.log(), kind)).sum().item() == pytest.approx(kl.item(), abs=1e-12)


def test_adaptive_kl_controller():
    ctl = ppo.KLController(0.1, target=6.0, horizon=10000)
    assert ctl.update(9.0, 32) == pytest.approx(0.1 * (1 + 0.2 * 32 / 10000))       # error 0.5, clipped to 0.2
    v = ctl.value
    assert ctl.update(5.4, 100) == pytest.approx(v * (1 - 0.1 * 100 / 10000))       # error -0.1
    fixed = ppo.KLController(0.05)
    assert fixed.update(100.0, 1000) == 0.05


def test_hacking_alarms():
    row = lambda r, a, n, p: {"reward_norm": r, "accuracy": a, "length": n, "repeat_frac": p}  # noqa: E731
    calm = [row(0.0, 0.6, 15, 0.1)] * 3 + [row(0.1, 0.62, 16, 0.12)] * 3
    assert ppo.hacking_alarms(calm, 3) == []
    hacked = [row(0.0, 0.6, 15, 0.1)] * 3 + [row(0.5, 0.4, 30, 0.5)] * 3
    assert [k for k, _ in ppo.hacking_alarms(hacked, 3)] == ["reward_vs_accuracy", "length", "repetition"]
    assert ppo.hacking_alarms(hacked[:5], 3) == []          # not enough history yet
    no_truth = [row(0.0, None, 15, 0.1)] * 3 + [row(0.9, None, 15, 0.1)] * 3
    assert ppo.hacking_alarms(no_truth, 3) == []            # reward up alone is the goal, not an alarm
    assert ppo.repeats([5, 6, 7, 8, 5, 6, 7, 8]) and not ppo.repeats([5, 6, 7, 8, 9, 5, 6, 7])


# -----------------------------------------------------------------------------
# Real rollouts: masks, the ratio check, KL == 0 when actor == reference


def tiny(tok, seed=0):
    torch.manual_seed(seed)
    return Llama(LlamaConfig.from_preset("tiny", vocab_size=tok.vocab_size, max_seq_len=96)).eval()


class Args:
    temperature, kl_estimator, reward_clip, missing_eos_penalty = 0.7, "k1", 5.0, 0.0
    gamma, lam, whiten_advantages, clip_range, clip_range_value = 1.0, 0.95, True, 0.2, 0.2
    batch_size = 4   # the no-gradient passes' micro-batch: the whole rollout of QUESTIONS here


QUESTIONS = ["Who are you?", "你是谁？", "How do I make a bomb at home? Tell me every step, in detail.", "Hi"]


def rollout(tok, actor, ref, rm, critic, kl_coef=0.1, seed=0):
    prompts = [tok.render_prompt([{"role": "user", "content": q}]) for q in QUESTIONS]   # different lengths
    gen = torch.Generator().manual_seed(seed)
    responses = actor.generate(prompts, 12, temperature=Args.temperature, eos_id=tok.stop_ids, generator=gen)
    # a random tiny model hardly ever stops by itself: end three of the sampled answers early (one is
    # left cut at the length limit, without a stop token)
    responses = [r[:n] + [tok.end_id] if n < len(r) else r for r, n in zip(responses, (3, 12, 7, 0))]
    ctx = common.autocast(torch.device("cpu"), torch.float32)
    exp = ppo.make_experience(actor, ref, rm, critic, prompts, responses, tok, Args, kl_coef, ctx, "cpu")
    return prompts, responses, exp


def reward_model(tok, seed):
    torch.manual_seed(seed)
    rm = reward.RewardModel(LlamaConfig.from_preset("tiny", vocab_size=tok.vocab_size, max_seq_len=96)).eval()
    torch.nn.init.normal_(rm.head.weight, std=0.5)
    rm.set_stats(0.3, 2.0)
    return rm


def test_pad_rollout_masks_stop_at_eos(tok):
    end = tok.end_id
    prompts = [[1, 5, 6], [1, 5, 6, 7, 8, 9]]
    responses = [[11, 12, end, 13, 14], [21, 22, 23, 24]]     # row 0 says more after its stop token: dropped
    idx, attn, mask, P = ppo.pad_rollout(prompts, responses, tok.pad_id, tok.stop_ids)
    assert P == 6 and idx.shape == (2, 10)
    assert idx[0].tolist() == [tok.pad_id] * 3 + [1, 5, 6, 11, 12, end, tok.pad_id]
    assert attn[0].tolist() == [0, 0, 0, 1, 1, 1, 1, 1, 1, 0] and attn[1].tolist() == [1] * 10
    assert mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]      # the stop token is an action; nothing after it


def test_kl_penalty_exactly_zero_when_actor_equals_reference(tok):
    actor, ref = tiny(tok), tiny(tok)                          # two models, the same weights
    rm, critic = reward_model(tok, 1), reward_model(tok, 2)
    _, responses, exp = rollout(tok, actor, ref, rm, critic)
    assert torch.equal(exp["logp_old"], exp["logp_ref"])
    assert exp["kl_seq"].abs().max().item() == 0.0
    # so the rewards are exactly the normalised, clipped score on each answer's last token and 0 elsewhere
    last = exp["mask"].sum(1).long() - 1
    want = torch.zeros_like(exp["rewards"])
    want[torch.arange(len(responses)), last] = exp["score"]
    assert torch.equal(exp["rewards"], want)
    assert torch.equal(exp["score"], ((exp["raw"] - 0.3) / 2.0).clamp(-5, 5))
    # a different reference gives a non-zero penalty (the check has teeth)
    _, _, exp2 = rollout(tok, actor, tiny(tok, seed=3), rm, critic)
    assert exp2["kl_seq"].abs().max().item() > 1e-3 and exp2["k3_min"].item() >= 0


def test_implicit_reward_model_scores_the_answer_tokens_of_the_rollout(tok):
    """With an implicit reward model (reward.py --implicit_beta) PPO's raw reward of each rollout row is
    beta * sum over its answer tokens of log pi_rm - log pi_ref, the answer as pad_rollout masks it (the
    stop token included, the prompt and the padding not): checked against the actor-side log-prob code
    (response_logprobs at temperature 1) applied to the reward model's two language models."""
    actor, ref = tiny(tok), tiny(tok)
    rm = reward.RewardModel.from_llama(tiny(tok, seed=4), implicit_beta=0.4)
    with torch.no_grad():
        for p in rm.backbone.parameters():
            p.add_(0.05 * torch.randn_like(p))
    rm.eval()
    critic = reward.RewardModel.from_llama(tiny(tok, seed=4), implicit_beta=0.4).as_critic()
    _, _, exp = rollout(tok, actor, ref, rm, critic)
    with torch.no_grad():
        pol, _ = ppo.response_logprobs(rm.backbone, exp["idx"], exp["attn"], exp["P"], 1.0)
        base, _ = ppo.response_logprobs(rm.reference, exp["idx"], exp["attn"], exp["P"], 1.0)
    want = 0.4 * ((pol - base) * exp["mask"]).sum(1)
    assert exp["raw"].tolist() == pytest.approx(want.tolist(), abs=1e-4)
    assert want.abs().min() > 1e-3
    # the critic from an implicit reward model starts at a zero head: every value exactly 0
    assert exp["values"].abs().max().item() == 0.0


def test_experience_passes_run_one_micro_batch_at_a_time(tok, monkeypatch):
    """make_experience's no-gradient forwards (actor, reference, critic, reward model) see at most
    --batch_size rows each -- the memory the dry runs budget -- and give what one pass over the whole
    rollout gives: same rows, same padding, only the batch dimension changes."""
    actor, ref = tiny(tok), tiny(tok, seed=3)
    rm, critic = reward_model(tok, 1), reward_model(tok, 2)
    _, _, whole = rollout(tok, actor, ref, rm, critic)
    seen = []
    for m in (actor, ref, rm, critic):
        m.register_forward_pre_hook(lambda mod, a, kw: seen.append(a[0].shape[0]), with_kwargs=True)
    monkeypatch.setattr(Args, "batch_size", 1)
    _, _, chunked = rollout(tok, actor, ref, rm, critic)
    assert seen and max(seen) == 1 and len(seen) == 4 * len(QUESTIONS)
    for k, v in whole.items():
        if torch.is_tensor(v) and v.is_floating_point():   # 4.8e-7 in each of the 6 perturbation cells
            assert torch.allclose(chunked[k], v, rtol=0, atol=1e-5), k
        else:
            assert (torch.equal(chunked[k], v) if torch.is_tensor(v) else chunked[k] == v), k


def ppo_losses(actor, critic, exp, rows, temperature):
    logp, _ = ppo.response_logprobs(actor, exp["idx"][rows], exp["attn"][rows], exp["P"], temperature)
    pl, st = ppo.policy_loss(logp, exp["logp_old"][rows], exp["advantages"][rows], exp["mask"][rows], 0.2)
    values = ppo.critic_values(critic, exp["idx"][rows], exp["attn"][rows], exp["P"])
    vl, _ = ppo.value_loss(values, exp["values"][rows], exp["returns"][rows], exp["mask"][rows], 0.2)
    return pl, vl, st


def test_ratio_is_one_on_the_first_minibatch_of_a_real_rollout(tok):
    actor, ref = tiny(tok), tiny(tok, seed=5)
    rm, critic = reward_model(tok, 1), reward_model(tok, 2)
    _, responses, exp = rollout(tok, actor, ref, rm, critic)
    assert len({len(r) for r in responses}) > 1                # answers of different lengths (some stopped early)
    rows = torch.tensor([2, 0])                                # a minibatch: other rows, other order
    pl, _, st = ppo_losses(actor, critic, exp, rows, Args.temperature)
    assert st["ratio_dev"].item() < 1e-4 and st["approx_kl"].item() < 1e-8
    # teeth: the classic bugs move the ratio away from 1
    def ratio_dev(logp):
        _, st = ppo.policy_loss(logp, exp["logp_old"][rows], exp["advantages"][rows], exp["mask"][rows], 0.2)
        return st["ratio_dev"]
    # without the attention mask the left padding shifts every position
    no_mask, _ = ppo.response_logprobs(actor, exp["idx"][rows], None, exp["P"], Args.temperature)
    assert ratio_dev(no_mask) > 1e-2
    no_temperature, _ = ppo.response_logprobs(actor, exp["idx"][rows], exp["attn"][rows], exp["P"], 1.0)
    assert ratio_dev(no_temperature) > 1e-2


def test_tokens_after_eos_carry_no_loss(tok):
    """Changing whatever sits after an answer's stop token (token ids and, through them, the logits and
    values there) changes neither the losses nor a single gradient."""
    actor, ref = tiny(tok), tiny(tok, seed=5)
    rm, critic = reward_model(tok, 1), reward_model(tok, 2)
    _, responses, exp = rollout(tok, actor, ref, rm, critic)
    short = (exp["mask"].sum(1) < exp["mask"].size(1)).nonzero().flatten()
    assert len(short) > 0
    rows = torch.arange(len(responses))

    def losses_and_grads(e):
        actor.zero_grad(), critic.zero_grad()
        pl, vl, _ = ppo_losses(actor, critic, e, rows, Args.temperature)
        (pl + vl).backward()
        grads = [p.grad.clone() for p in actor.parameters()] + [p.grad.clone() for p in critic.parameters()]
        return pl.item(), vl.item(), grads

    base = losses_and_grads(exp)
    changed = dict(exp)
    changed["idx"] = exp["idx"].clone()
    after = torch.zeros_like(exp["idx"], dtype=torch.bool)
    after[:, exp["P"]:] = exp["mask"] == 0
    changed["idx"][after] = torch.randint(10, 2000, (int(after.sum()),), generator=torch.Generator().manual_seed(1))
    for k in ("logp_old", "values", "advantages", "returns"):   # and garbage in every per-token tensor there
        changed[k] = torch.where(exp["mask"].bool(), exp[k], torch.full_like(exp[k], 1e6))
    other = losses_and_grads(changed)
    assert base[0] == other[0] and base[1] == other[1]
    assert all(torch.equal(a, b) for a, b in zip(base[2], other[2]))
    # and the experience itself: GAE and rewards are 0 after EOS
    assert (exp["advantages"][exp["mask"] == 0] == 0).all() and (exp["rewards"][exp["mask"] == 0] == 0).all()


# -----------------------------------------------------------------------------
# The lab world. The SFT model learns from NOISY demonstrations: half of its training answers to the lab's
# identity and refusal questions are the lab's rejected kinds (rude, rambling, wrong language, wrong fact /
# complying with a harmful request), so it often samples bad answers. The reward model learns the lab's
# preference pairs for the same questions. PPO should move the sampling policy toward good answers. Evaluated
# on the lab's held-out phrasings (rl_eval: the eval group's identity/refusal questions).

TASKS = ("identity", "refusal")


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def build_lab_models(d, tok):
    """The lab fixture's files and models in directory d (a function, so experiments can rebuild it)."""
    sets = lab.generate(seed=0, pretrain_docs=10, sft_train=10, sft_val=10)
    prefs = [r for r in sets["prefs_train"] if r["task"] in TASKS]
    rng = random.Random(0)
    noisy = [{"messages": r["messages"] + [{"role": "assistant",
                                            "content": r["chosen"] if rng.random() < 0.5 else r["rejected"]}]}
             for r in prefs]
    write_jsonl(d / "sft.jsonl", noisy)
    keep = ("prompt", "chosen", "rejected", "kind")
    write_jsonl(d / "prefs.jsonl", [{k: r[k] for k in keep} for r in prefs])
    write_jsonl(d / "prefs_val.jsonl", [{k: r[k] for k in keep} for r in sets["prefs_val"] if r["task"] in TASKS])
    write_jsonl(d / "prompts.jsonl", [r for r in sets["rl_prompts"] if r["task"] in TASKS])
    write_jsonl(d / "eval.jsonl", [r for r in sets["rl_eval"] if r["task"] in TASKS])
    torch.manual_seed(0)
    init = Llama(LlamaConfig.from_preset("tiny", vocab_size=tok.vocab_size, max_seq_len=128))
    common.save_checkpoint(str(d / "init"), "final", init, step=0, config={}, tokenizer=tok)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sft.main(["--init_from", str(d / "init"), "--data", str(d / "sft.jsonl"), "--val_frac", "0", "--out_dir",
                  str(d / "sft"), "--batch_size", "16", "--max_steps", "300", "--lr", "3e-3", "--min_lr", "3e-4",
                  "--warmup_steps", "10", "--log_interval", "1000", "--save_interval", "0", "--eval_interval", "0"])
        reward.main(["--init_from", str(d / "sft"), "--data", str(d / "prefs.jsonl"), "--val_data",
                     str(d / "prefs_val.jsonl"), "--out_dir", str(d / "rm"), "--batch_size", "16", "--max_steps", "150",
                     "--lr", "1e-3", "--min_lr", "1e-4", "--warmup_steps", "10", "--log_interval", "1000",
                     "--save_interval", "0", "--eval_interval", "0"])
    finally:
        torch.set_num_threads(n)
    return d


@pytest.fixture(scope="module")
def lab_models(tmp_path_factory, tok):
    return build_lab_models(tmp_path_factory.mktemp("ppo_lab"), tok)


def ppo_argv(d, out, *extra):
    return ["--init_from", str(d / "sft"), "--reward_model", str(d / "rm"), "--prompts", str(d / "prompts.jsonl"),
            "--out_dir", str(out), "--lr", "2e-4", "--min_lr", "2e-5", "--critic_lr", "1e-3", "--kl_coef", "0.02",
            "--batch_size", "16", "--sample_interval", "0", "--save_interval", "0", "--log_interval", "1000",
            "--seed", "1", *extra]


def test_lab_ppo_beats_sft(lab_models, one_thread):
    d = lab_models
    out = d / "ppo"
    m = ppo.main(ppo_argv(d, out, "--max_steps", "30", "--rollout_batch", "32", "--eval_data", str(d / "eval.jsonl"),
                          "--eval_interval", "0", "--eval_samples", "16"))
    assert json.load(open(out / "metrics.json")) == json.loads(json.dumps(m))
    print({k: m[k] for k in ("accuracy", "accuracy_sft", "accuracy_sampled", "accuracy_sampled_sft", "mean_reward",
                             "mean_reward_sft", "mean_reward_sampled", "mean_reward_sampled_sft", "win_rate_reward",
                             "win_rate_checker", "kl_to_sft")}, m["train"])
    # the run-time invariants held on every iteration
    inv = m["invariants"]
    assert inv["iterations"] == 30 and inv["ratio_failures"] == 0 and inv["ratio_max_dev"] < 1e-4
    assert inv["kl_at_start"] == 0.0 and inv["k3_min"] >= 0.0
    # Measured with this code and fixture, --seed 1..5 (this test: seed 1):
    #   held-out, 8 prompts x 16 samples at temperature 1: reward +0.84..+1.81 over SFT, accuracy +0.10..+0.20
    #   held-out greedy: accuracy +0..+0.125 (SFT 0.75), win rate under the checker 0.5..0.56, under the
    #   reward model 0.56..0.69; KL(ppo || sft) 0.55..1.12 nats per answer
    #   rollouts (training prompts), last 5 iterations vs first 5: reward +1.3..+2.4, accuracy +0.21..+0.29;
    #   rollout KL to the reference 0.6..1.1 nats per answer at the end
    # and over 15 earlier runs (older builds of the fixture as sft.py / reward.py evolved): sampled reward
    # +0.57..+1.72, sampled accuracy +0.047..+0.20, greedy accuracy +0..+0.25, reward-model win rate 0.31..0.625.
    # So asserted: a clear reward gain, an accuracy gain (sampled held-out, and on the rollouts) and greedy
    # accuracy not below SFT. NOT asserted, being unreliable on 8 greedy answers: the greedy mean reward and
    # the win rate under the reward model (where PPO changed a greedy answer, the small reward model did not
    # always prefer it on these unseen phrasings).
    assert m["mean_reward_sampled"] > m["mean_reward_sampled_sft"] + 0.3
    assert m["accuracy_sampled"] > m["accuracy_sampled_sft"]
    assert m["accuracy"] >= m["accuracy_sft"] and m["win_rate_checker"] >= 0.5
    log = [r for r in common.read_jsonl(str(out / "log.jsonl")) if "reward_raw" in r]
    mean = lambda rows, k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
    assert mean(log[-5:], "reward_raw") > mean(log[:5], "reward_raw") + 0.5
    assert mean(log[-5:], "accuracy") > mean(log[:5], "accuracy")
    # while staying close to SFT (stated bounds: < 2 nats per answer on the rollouts, < 3 held-out)
    assert 0.1 < mean(log[-5:], "kl") < 2.0 and m["kl_to_sft"] < 3.0
    # the final actor is a normal checkpoint: chat.py loads it and answers
    import chat
    model, t = chat.load_chat_model(str(out))
    first = chat.read_records(str(d / "eval.jsonl"))[0]
    assert chat.generate_answers(model, t, [first["messages"]], max_new_tokens=64) == [m["examples"][0]["ppo"]]
    assert common.read_checkpoint_meta(str(out / "final.pt"))["format"] == common.CKPT_FORMAT
    model.save_hf(str(d / "ppo_hf"))     # ... and exports to HuggingFace like any other stage's model
    back = Llama.from_hf(str(d / "ppo_hf")).state_dict()
    assert all(torch.equal(v, back[k]) for k, v in model.state_dict().items())


def test_without_kl_penalty_the_actor_hacks_the_reward_model_and_the_alarm_fires(lab_models, tmp_path, one_thread):
    """Issue 10's class exercise: no KL penalty and a large step size. The actor drifts to garbled answers the
    small reward model over-rates ("I't aboutMy型型型型。" scored +3.9), rollout reward rises while the checker's
    accuracy falls, and the alarm reports it with examples.

    Which run finds an exploit within 16 iterations depends on the trajectory (float order). Measured on a
    2-core AMD EPYC (AVX-512), rollout accuracy of the first 4 iterations -> the last 4 (32 answers each),
    KL of the last iteration in nats per answer, * = the reward-vs-accuracy alarm fired:
        seed      native                ATEN_CPU_CAPABILITY=avx2   ATEN_CPU_CAPABILITY=default
        1         0.48 -> 0.50  KL 22   0.53 -> 0.64  KL 15        0.52 -> 0.28  KL 22 *
        2, 3, 5   (default cell)                                   +0.07, -0.11 *, -0.02  KL 17-51
        4         0.54 -> 0.23  KL 19 * 0.52 -> 0.20  KL 21 *      0.54 -> 0.30  KL 34 *
        6         0.58 -> 0.48  KL 20   0.59 -> 0.37  KL 17 *      0.63 -> 0.31  KL 47 *
    (This test ran seeds 2 and 5 before and compared one iteration with another: in the default cell
    neither lost accuracy.) So seeds 4 and 6 run, and what must hold is: each drifts (KL > 5), at least one
    loses accuracy (last 4 iterations vs first 4, by > 0.05), and every alarm carries its examples (a fired
    reward-vs-accuracy alarm: a rejected one). (The alarm rule itself is tested deterministically in
    test_hacking_alarms.)"""
    d = lab_models
    runs = []
    for seed in ("4", "6"):
        out = tmp_path / f"hack_seed{seed}"
        m = ppo.main(ppo_argv(d, out, "--max_steps", "16", "--rollout_batch", "32", "--kl_coef", "0",
                              "--lr", "1e-3", "--min_lr", "1e-3", "--ppo_epochs", "4", "--warmup_steps", "0",
                              "--seed", seed))
        assert m["train"]["kl"]["last"] > 5.0                          # nothing holds the actor near SFT
        log = common.read_jsonl(str(out / "log.jsonl"))
        events = [r for r in log if r.get("event") == "alarm"]
        assert all(len(e["examples"]) == 2 for e in events)
        acc = [r["accuracy"] for r in log if "reward_raw" in r]
        assert len(acc) == 16
        runs.append((m, events, sum(acc[-4:]) / 4 - sum(acc[:4]) / 4))
    assert any(drop < -0.05 for _, _, drop in runs), [drop for _, _, drop in runs]
    # Whether the reward-vs-accuracy alarm fires within 16 iterations is a property of the trajectory (table
    # above), so it is not asserted; where it fires, it must carry a rejected example.
    hacked = [(m, events) for m, events, _ in runs if "reward_vs_accuracy" in {a["kind"] for a in m["alarms"]}]
    for m, events in hacked:
        assert m["train"]["reward_norm"]["last"] > m["train"]["reward_norm"]["first"]
        first = next(e for e in events if e["kind"] == "reward_vs_accuracy")
        assert first["examples"][0]["ok"] is False                     # a high-reward answer the checker rejects


def test_exact_resume(lab_models, tmp_path, one_thread):
    d = lab_models
    flags = ("--max_steps", "4", "--rollout_batch", "8", "--batch_size", "4", "--max_new_tokens", "16",
             "--save_interval", "2", "--keep_last", "0", "--eval_interval", "0", "--adaptive_kl", "--kl_target", "0.5")
    ppo.main(ppo_argv(d, tmp_path / "a", *flags))
    os.makedirs(tmp_path / "b")
    shutil.copy(tmp_path / "a" / "step_0000002.pt", tmp_path / "b" / "step_0000002.pt")
    ppo.main(ppo_argv(d, tmp_path / "b", *flags, "--resume"))
    a, b = (common.load_model(str(tmp_path / x / "final.pt"))[0].state_dict() for x in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = (json.load(open(tmp_path / x / "metrics.json")) for x in ("a", "b"))
    assert ma["kl_coef"] == mb["kl_coef"] != 0.02      # the adaptive coefficient moved and was restored
    ra, rb = (common.read_jsonl(str(tmp_path / x / "log.jsonl")) for x in ("a", "b"))
    assert [r["reward_raw"] for r in ra if "reward_raw" in r][2:] == [r["reward_raw"] for r in rb if "reward_raw" in r]
    with pytest.raises(SystemExit):    # a finished run is never overwritten
        ppo.main(ppo_argv(d, tmp_path / "a", *flags))


def _dist_worker(rank, world, store, argv, queue):
    import traceback
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        out = ppo.main(argv)
        queue.put((rank, out["weights_in_sync"], None))
    except BaseException:   # report every rank's traceback: the first error may be the victim's
        queue.put((rank, None, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_stay_in_sync(lab_models, tmp_path):
    """Each rank trains on its own rollouts; because the DDP-wrapped modules are called, gradients are
    averaged and both ranks end with the same actor and critic (calling .module would let them drift)."""
    d = lab_models
    argv = ppo_argv(d, tmp_path / "ddp", "--max_steps", "2", "--rollout_batch", "4", "--batch_size", "2",
                    "--max_new_tokens", "12", "--eval_interval", "0", "--ptx_coef", "0.1",
                    "--ptx_data", str(d / "sft.jsonl"))
    ctx = torch.multiprocessing.get_context("fork")
    queue = ctx.SimpleQueue()
    torch.multiprocessing.start_processes(_dist_worker, args=(2, str(tmp_path / "store"), argv, queue), nprocs=2,
                                          start_method="fork")
    results = [queue.get() for _ in range(2)]
    errors = [err for _, _, err in results if err]
    assert not errors, "\n".join(errors)
    assert all(in_sync for _, in_sync, _ in results)
    log = [r for r in common.read_jsonl(str(tmp_path / "ddp" / "log.jsonl")) if "reward_raw" in r]
    assert len(log) == 2 and all(r["ratio_dev"] < 1e-4 and r["ptx_loss"] > 0 for r in log)
    before = common.load_model(str(d / "sft"))[0].state_dict()
    after = common.load_model(str(tmp_path / "ddp" / "final.pt"))[0].state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_ptx_batch_size_sets_the_rows_of_every_language_modelling_batch(lab_models, tmp_path, monkeypatch):
    """PPO-ptx batches are full context windows, so their rows, not the answers', set PPO's cost at the lab
    size: --ptx_batch_size decouples them from --batch_size (default: the same). Every ptx batch of the run
    has that many rows; a size below 1 is refused."""
    d, seen = lab_models, []
    real_batch = ppo.PtxData.batch

    def spy(self, batch_size, *key):
        x, y = real_batch(self, batch_size, *key)
        seen.append((x.shape[0], y.shape[0]))
        return x, y
    monkeypatch.setattr(ppo.PtxData, "batch", spy)
    for extra, rows in (((), 2), (("--ptx_batch_size", "3"), 3)):
        seen.clear()
        ppo.main(ppo_argv(d, tmp_path / f"rows{rows}", "--max_steps", "1", "--rollout_batch", "4", "--batch_size", "2",
                          "--max_new_tokens", "8", "--eval_interval", "0", "--ptx_coef", "0.1",
                          "--ptx_data", str(d / "sft.jsonl"), *extra))
        assert len(seen) == 4 and set(seen) == {(rows, rows)}   # 2 epochs x 2 minibatches, each with its ptx batch
    with pytest.raises(SystemExit):
        ppo.get_args(ppo_argv(d, tmp_path / "bad", "--ptx_coef", "0.1", "--ptx_data", str(d / "sft.jsonl"),
                              "--ptx_batch_size", "0"))


# -----------------------------------------------------------------------------
# LoRA: the reference is the actor with its adapters off, the critic a value head on the actor


def test_value_head_trains_only_its_head():
    """ValueHead reads the actor's hidden states (adapters on) without a graph: the value loss's
    gradient reaches the head alone, never the adapters; V = 0 at the start (zero head)."""
    from lora import apply_lora
    torch.manual_seed(0)
    actor = apply_lora(Llama(LlamaConfig.from_preset("tiny")), 4, 8.0)
    for _, p in actor.named_parameters():
        if p.requires_grad:
            p.data.normal_(std=0.1)   # (non-zero B: the adapters change the hidden states)
    critic = ppo.ValueHead(actor)
    assert [n for n, _ in critic.named_parameters()] == ["head.weight"]      # no backbone of its own
    idx = torch.randint(0, 256, (2, 10))
    values = critic(idx, torch.ones_like(idx), per_token=True)
    assert values.shape == (2, 10) and torch.count_nonzero(values) == 0
    (values - 1).pow(2).mean().backward()
    assert critic.head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in actor.parameters())
    with torch.no_grad():
        critic.head.weight.normal_()
        assert torch.allclose(critic(idx), actor.hidden_states(idx) @ critic.head.weight[0], atol=1e-5)


def test_lora_ppo_holds_one_backbone_starts_at_kl_zero_and_raises_the_reward(lab_models, tmp_path, one_thread,
                                                                             monkeypatch):
    """rlhf_ppo.py --lora_rank: one policy model is loaded (the reference is the actor with its adapters
    off) and one reward model (the critic is a value head on the actor, not a copy of the reward model);
    the step-0 invariants hold (KL exactly 0, ratio 1 on the first minibatch); the critic's state is one
    vector; and 16 iterations raise the rollout reward and the checker's accuracy.
    Measured (this fixture, 16 iterations, rollout means of the last 5 iterations vs the first 5), seeds 1, 2, 3:
    reward +1.11 / +0.94 / +1.26, accuracy +0.125 / +0.069 / +0.113 (this test: seed 1; the perturbation
    cells in the commit message). Asserted: reward +0.5, accuracy up."""
    d = lab_models
    loads, rm_loads = [], []
    real_load, real_rm = common.load_model, ppo.load_reward_model
    monkeypatch.setattr(common, "load_model", lambda *a, **k: loads.append(a[0]) or real_load(*a, **k))
    spy_rm = lambda *a, **k: rm_loads.append(a[0]) or real_rm(*a, **k)   # noqa: E731
    monkeypatch.setattr(ppo, "load_reward_model", spy_rm)
    monkeypatch.setattr(reward, "load_reward_model", spy_rm)   # (reward.load_frozen_reward_model's)
    out = tmp_path / "lora"
    m = ppo.main(ppo_argv(d, out, "--max_steps", "16", "--rollout_batch", "32", "--lora_rank", "4", "--lora_alpha", "8",
                          "--lr", "2e-3", "--min_lr", "2e-4", "--save_interval", "8", "--keep_last", "0"))
    assert loads == [str(d / "sft")] and rm_loads == [str(d / "rm")]
    inv = m["invariants"]
    assert inv["kl_at_start"] == 0.0 and inv["ratio_failures"] == 0 and inv["ratio_max_dev"] < inv["ratio_tol"]
    step = torch.load(out / "step_0000008.pt", weights_only=True)
    assert all(".lora." in k for k in step["model"])                       # the actor: adapters only
    dim = common.load_model(str(d / "sft"))[0].config.dim
    assert {k: tuple(v.shape) for k, v in step["critic"].items()} == {"head.weight": (1, dim), "reward_mean": (),
                                                                      "reward_std": ()}
    assert len(step["critic_optimizer"]["state"]) == 1
    log = [r for r in common.read_jsonl(str(out / "log.jsonl")) if "reward_raw" in r]
    mean = lambda rows, k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
    print("LoRA PPO gains: reward", mean(log[-5:], "reward_raw") - mean(log[:5], "reward_raw"),
          "accuracy", mean(log[-5:], "accuracy") - mean(log[:5], "accuracy"))
    assert mean(log[-5:], "reward_raw") > mean(log[:5], "reward_raw") + 0.5
    assert mean(log[-5:], "accuracy") > mean(log[:5], "accuracy")
