"""dpo.py: the losses against their closed forms, response-only log-probs, the precomputed reference,
the step-0 invariant, and a short DPO run on the lab world that must beat its SFT model."""
import math

import pytest
import torch

import dpo
from model import Llama, LlamaConfig
from common import encode_group
from tokenizer import Tokenizer


def sig(x):
    return 1 / (1 + math.exp(-x))


# -----------------------------------------------------------------------------
# Losses: hand-given log-probs, closed forms written out with math (not torch)

CASES = [  # policy chosen, policy rejected, ref chosen, ref rejected
    (-10.0, -12.0, -11.0, -11.5),
    (-3.0, -2.0, -4.0, -1.0),
    (-25.5, -40.25, -25.5, -40.25),   # policy == reference
    (-1.0, -30.0, -8.0, -9.0),
]


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_sigmoid_and_conservative_dpo_closed_form(beta, eps):
    pc, pr, rc, rr = (torch.tensor(v, dtype=torch.float64) for v in zip(*CASES))
    losses, rew_c, rew_r = dpo.preference_loss(pc, pr, rc, rr, beta, "sigmoid", eps)
    for k, (a, b, c, d) in enumerate(CASES):
        h = (a - c) - (b - d)
        want = -(1 - eps) * math.log(sig(beta * h)) - eps * math.log(sig(-beta * h))
        assert losses[k].item() == pytest.approx(want, abs=1e-12)
        assert rew_c[k].item() == pytest.approx(beta * (a - c), abs=1e-12)
        assert rew_r[k].item() == pytest.approx(beta * (b - d), abs=1e-12)
    # policy == reference: ln 2 for every eps and beta
    assert losses[2].item() == pytest.approx(math.log(2), abs=1e-15)


def test_dpo_hand_numbers():
    # one case worked by hand: h = (-10 + 11) - (-12 + 11.5) = 1.5; beta h = 0.15
    losses, _, _ = dpo.preference_loss(torch.tensor([-10.0]), torch.tensor([-12.0]), torch.tensor([-11.0]),
                                       torch.tensor([-11.5]), 0.1)
    assert losses.item() == pytest.approx(0.6209571, abs=1e-6)   # log(1 + e^-0.15) = log(1.8607080)
    # cDPO with eps = 0.25 at beta h = 2: 0.75 * log(1 + e^-2) + 0.25 * log(1 + e^2) = 0.63011...
    losses, _, _ = dpo.preference_loss(torch.tensor([0.0]), torch.tensor([-2.0]), torch.tensor([0.0]),
                                       torch.tensor([0.0]), 1.0, "sigmoid", 0.25)
    assert losses.item() == pytest.approx(0.75 * math.log1p(math.exp(-2)) + 0.25 * math.log1p(math.exp(2)), abs=1e-6)
    assert losses.item() == pytest.approx(0.626928, abs=1e-5)


@pytest.mark.parametrize("beta", [0.1, 0.5, 1.0])
def test_ipo_closed_form(beta):
    pc, pr, rc, rr = (torch.tensor(v, dtype=torch.float64) for v in zip(*CASES))
    losses, _, _ = dpo.preference_loss(pc, pr, rc, rr, beta, "ipo")
    for k, (a, b, c, d) in enumerate(CASES):
        h = (a - c) - (b - d)
        assert losses[k].item() == pytest.approx((h - 1 / (2 * beta)) ** 2, abs=1e-9)
    assert losses[2].item() == pytest.approx(dpo.step0_loss("ipo", beta))
    # the minimum sits at h = 1/(2 beta), where the loss is exactly 0
    h = torch.tensor([1 / (2 * beta)], dtype=torch.float64)
    assert dpo.ipo_loss(h, beta).item() == pytest.approx(0.0, abs=1e-12)


def test_conservative_dpo_has_a_finite_optimum():
    """cDPO's loss is minimal at beta h = log((1 - eps) / eps); plain DPO keeps decreasing."""
    eps, beta = 0.1, 0.5
    h = torch.linspace(-5, 30, 7001, dtype=torch.float64)
    best = h[dpo.dpo_sigmoid_loss(h, beta, eps).argmin()].item()
    assert beta * best == pytest.approx(math.log((1 - eps) / eps), abs=0.01)
    plain = dpo.dpo_sigmoid_loss(h, beta)
    assert bool((plain[1:] < plain[:-1]).all())


# -----------------------------------------------------------------------------
# Log-probs of the response tokens only

def test_sequence_logps_hand_computation_and_prompt_logits_ignored():
    g = torch.Generator().manual_seed(0)
    N, T, V = 3, 9, 11
    logits = torch.randn(N, T, V, generator=g)
    labels = torch.full((N, T), -100)
    spans = [(2, 6), (0, 9), (5, 7)]             # response target positions of each row
    for i, (a, b) in enumerate(spans):
        labels[i, a:b] = torch.randint(0, V, (b - a,), generator=g)
    got = dpo.sequence_logps(logits, labels)
    for i, (a, b) in enumerate(spans):
        want = sum(math.log(torch.softmax(logits[i, t].double(), -1)[labels[i, t]].item()) for t in range(a, b))
        assert got[i].item() == pytest.approx(want, abs=1e-5)
    # arbitrary changes (even inf / nan) to the logits of non-response positions change nothing
    changed = logits.clone()
    changed[labels == -100] = torch.randn(int((labels == -100).sum()), V, generator=g) * 100
    changed[0, 0, 0], changed[2, 8, :] = float("inf"), float("nan")
    assert torch.equal(dpo.sequence_logps(changed, labels), got)


def test_collate_labels_are_exactly_the_response(tok):
    rec = {"messages": [{"role": "user", "content": "Where does Alice live?"}],
           "responses": ["Alice lives in Paris.", "Ugh, what a stupid question. Alice lives in Paris. Go away."]}
    g = encode_group(tok, rec, 256)
    x, labels, sizes = dpo.collate([g], tok.pad_id)
    assert sizes == [2] and x.shape[0] == 2
    prompt = tok.render_prompt(rec["messages"])
    for i, resp in enumerate(rec["responses"]):
        full, mask = tok.render_conversation(rec["messages"] + [{"role": "assistant", "content": resp}])
        targets = [t for t, m in zip(full, mask) if m]          # the tokenizer's own loss mask
        assert labels[i][labels[i] != -100].tolist() == targets
        assert len(targets) == len(full) - len(prompt)
        assert x[i, :len(full) - 1].tolist() == full[:-1]
        # label t is the token at t+1 (next-token targets)
        pos = (labels[i] != -100).nonzero().flatten()
        assert all(labels[i, p].item() == full[p + 1] for p in pos.tolist())


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    return Llama(LlamaConfig.from_preset("tiny", vocab_size=2048, max_seq_len=128, **kw)).eval()


def groups_for(tok, prompts_and_answers):
    return [encode_group(tok, {"messages": [{"role": "user", "content": q}], "responses": list(a)}, 128)
            for q, a in prompts_and_answers]


PAIRS = [("Where does Alice live?", ["Alice lives in Paris.", "Alice lives in Rome, Rome, Rome, Rome, Rome."]),
         ("What is 3 + 4?", ["3 + 4 = 7.", "Ugh. 3 + 4 = 8."]),
         ("你是谁？", ["我是 nanollama。", "I am a human being, not a computer program.", "我是人。"])]


def test_padding_never_contributes(tok):
    """A sequence's log-prob is the same alone, in a batch with longer companions (more padding), and
    whatever token the padding holds."""
    model = tiny()
    groups = groups_for(tok, PAIRS)
    with torch.no_grad():
        together, _ = dpo.batch_logps(model, groups, tok.pad_id, "cpu", torch.autocast("cpu", enabled=False))
        other_pad, _ = dpo.batch_logps(model, groups, 1234, "cpu", torch.autocast("cpu", enabled=False))
        alone = torch.cat([dpo.batch_logps(model, [g], tok.pad_id, "cpu", torch.autocast("cpu", enabled=False))[0]
                           for g in groups])
    assert together.shape == (7,)
    torch.testing.assert_close(together, alone, atol=2e-5, rtol=0)
    torch.testing.assert_close(together, other_pad, atol=2e-5, rtol=0)


def test_response_logps_match_the_model_loss(tok):
    """Summed response log-prob == -(model's own mean cross-entropy on the response) * n tokens:
    an independent path through Llama.forward(targets=...)."""
    model = tiny(1)
    g = groups_for(tok, PAIRS[:1])[0]
    with torch.no_grad():
        got, _ = dpo.batch_logps(model, [g], tok.pad_id, "cpu", torch.autocast("cpu", enabled=False))
        for k, ids in enumerate(g["ids"]):
            n = g["resp_len"][k]
            x = torch.tensor([ids[:-1]])
            y = torch.tensor([[-100] * (len(ids) - 1 - n) + ids[len(ids) - n:]])
            _, loss = model(x, y)
            assert got[k].item() == pytest.approx(-loss.item() * n, abs=1e-4)


# -----------------------------------------------------------------------------
# Reference: precomputed == live; the step-0 invariant

class Args:
    beta, loss, label_smoothing, batch_size, eval_steps, nll_coef = 0.2, "sigmoid", 0.0, 2, 0, 0.0


def test_precomputed_reference_equals_live_and_step0_is_ln2(tok):
    from common import DistInfo
    policy, ref_model = tiny(2), tiny(2)
    groups = groups_for(tok, PAIRS)
    no_ac = torch.autocast("cpu", enabled=False)
    live = dpo.Reference(ref_model, tok.pad_id, "cpu", no_ac)
    assert not any(p.requires_grad for p in ref_model.parameters()) and not ref_model.training
    # step 0: policy == reference -> loss ln 2 exactly (to float tolerance) and margins 0
    with torch.no_grad():
        loss0, stats0, _ = dpo.dpo_batch(policy, live, groups, Args, tok.pad_id, "cpu", no_ac)
    assert loss0.item() == pytest.approx(math.log(2), abs=1e-6)
    assert (stats0[:, 1] - stats0[:, 2]).abs().max().item() < 1e-6
    # move the policy away from the reference, then compare live vs precomputed reference
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    # batch size 1: other batch shapes and padding than in the live forward below
    precomputed = dpo.reference_logps(ref_model, groups, 1, tok.pad_id, DistInfo(), no_ac)
    cached = [dict(g, ref_logps=v) for g, v in zip(groups, precomputed)]
    loss_live, stats_live, _ = dpo.dpo_batch(policy, live, groups, Args, tok.pad_id, "cpu", no_ac)
    loss_pre, stats_pre, _ = dpo.dpo_batch(policy, dpo.Reference(None), cached, Args, tok.pad_id, "cpu", no_ac)
    assert abs(loss_live.item() - math.log(2)) > 1e-3            # the policy really moved
    assert loss_pre.item() == pytest.approx(loss_live.item(), abs=1e-5)
    torch.testing.assert_close(stats_pre, stats_live, atol=1e-5, rtol=0)
    # and the gradient reaches the policy only (the reference stays frozen)
    loss_pre.backward()
    assert all(p.grad is not None for p in policy.parameters())
    assert all(p.grad is None for p in ref_model.parameters())


def test_ranking_pairs_weighted_per_prompt():
    c, r, w, group = dpo.pair_index([2, 3])
    assert c.tolist() == [0, 2, 2, 3] and r.tolist() == [1, 3, 4, 4]
    assert w.tolist() == pytest.approx([1.0, 1 / 3, 1 / 3, 1 / 3]) and group == [0, 1, 1, 1]


def test_summarize_counts_ties_as_half():
    stats = torch.tensor([[0.5, 0.2, 0.1, -3.0, -4.0, 1.0], [0.7, 0.0, 0.0, -5.0, -5.0, 1.0],
                          [0.9, -0.1, 0.3, -2.0, -1.0, 1.0]], dtype=torch.float64)
    m = dpo.summarize(stats, ["a", "b", "a"])
    assert m["accuracy"] == pytest.approx(0.5) and m["logp_accuracy"] == pytest.approx(0.5)
    assert m["margin"] == pytest.approx((0.1 + 0 - 0.4) / 3) and m["loss"] == pytest.approx(0.7)
    assert m["accuracy_by_kind"] == {"a": 0.5, "b": 0.5} and m["logp_accuracy_by_kind"] == {"a": 0.5, "b": 0.5}
    # a pair the implicit reward ranks right while the policy's plain log-probs rank it wrong
    m = dpo.summarize(torch.tensor([[0.3, 1.0, 0.0, -5.0, -1.0, 1.0]], dtype=torch.float64), ["a"])
    assert m["accuracy_by_kind"] == {"a": 1.0} and m["logp_accuracy_by_kind"] == {"a": 0.0}


# -----------------------------------------------------------------------------
# The lab world: a short DPO run must beat its SFT model
#
# The SFT model is built in-process in a few seconds: a 0.36M-parameter LLaMA trained on lab
# conversations whose demonstrator was sloppy -- 70% of its answers end with a rude remark ("...
# Go away.", "...别烦我。"), so greedy SFT answers are often rude. That is the situation DPO is for:
# the demonstrations taught the facts AND the bad habit; the lab preference pairs (chosen vs
# rude / rambling / wrong-language / wrong-fact answers) must remove the habit. Everything is
# split by prompt text: SFT and DPO see 80% of the rl-group prompts; the ground-truth accuracy is
# measured on the other 20% (facts, identity, refusal: arithmetic is left out because a model this
# small does not learn it in seconds, with or without DPO), and the preference accuracy on the lab's
# held-out prefs_val (the eval group: people DPO never saw).

def _write(path, rows):
    import json
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


@pytest.fixture(scope="module")
def module_one_thread():
    """conftest's one_thread, held for the whole module (the flawed SFT model below is module-scoped)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)   # a tiny model: one thread is as fast, and robust to a busy machine
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def flawed_sft(tmp_path_factory, module_one_thread):
    import random
    import numpy as np
    import common
    from data import lab
    d = tmp_path_factory.mktemp("dpo_lab")
    pref_tasks, lab.PREF_TASKS = lab.PREF_TASKS, lab.ALIGN_TASKS   # the pair mix this fixture was measured with
    try:
        sets = lab.generate(seed=0, pretrain_docs=1, sft_train=1, sft_val=1, rank_train=1, rl_prompts=1, rl_eval=1)
    finally:
        lab.PREF_TASKS = pref_tasks
    tok = Tokenizer()
    # single-turn prompts (the flaw below is planted in one answer per conversation) about the 8 people
    # of the rl group, so that held-out phrasings ask facts the fixture's SFT has seen in other ones
    rl = {p["name"]["en"] for p in sets["world"]["people"] if p["group"] == "rl"}
    sets["prefs_train"] = [r for r in sets["prefs_train"] if r["task"] in ("identity", "refusal") or
                           (r["task"] == "fact" and r["truth"]["subject"]["en"] in rl)]
    prompts = sorted({r["prompt"] for r in sets["prefs_train"]})
    random.Random(0).shuffle(prompts)
    held = set(prompts[:len(prompts) // 5])
    train = [r for r in sets["prefs_train"] if r["prompt"] not in held]
    rng = random.Random(1)
    convs = []
    for r in train:
        answer = r["chosen"] + (rng.choice(lab.RUDE[r["truth"]["lang"]][1]) if rng.random() < 0.7 else "")
        convs.append(r["messages"] + [{"role": "assistant", "content": answer}])
    # SFT = maximum likelihood of the answer tokens given the prompt: dpo.collate gives exactly those
    # labels (answer + <|end|>, the tokenizer's assistant mask), so the fixture needs no sft.py
    examples = [encode_group(tok, {"messages": c[:-1], "responses": [c[-1]["content"]]}, 160) for c in convs]
    torch.manual_seed(0)
    model = Llama(LlamaConfig.from_preset("tiny", vocab_size=tok.vocab_size, max_seq_len=160))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0, betas=(0.9, 0.95))
    g, steps = np.random.default_rng(0), 250
    for s in range(steps):
        x, y, _ = dpo.collate([examples[i] for i in g.choice(len(examples), 32)], tok.pad_id)
        for group in opt.param_groups:
            group["lr"] = 3e-3 * min(1, (s + 1) / 20) * (0.1 + 0.45 * (1 + math.cos(math.pi * s / steps)))
        model(x, y)[1].backward()
        opt.step()
        opt.zero_grad()
    common.save_checkpoint(str(d / "sft"), "final", model, step=steps, config={}, tokenizer=tok)
    seen, qa = set(), []
    for r in sets["prefs_train"]:
        if r["prompt"] in held and r["prompt"] not in seen and r["task"] != "arith":
            seen.add(r["prompt"])
            qa.append({"messages": r["messages"], "truth": r["truth"], "kind": r["task"]})
    _write(d / "heldout_qa.jsonl", qa)
    _write(d / "prefs_train.jsonl", train)
    _write(d / "prefs_val.jsonl", sets["prefs_val"])
    _write(d / "prompts.jsonl", [{"messages": r["messages"], "truth": r["truth"]} for r in train[:300]])
    return d


DPO_FLAGS = ["--batch_size", "16", "--max_steps", "60", "--lr", "1e-4", "--min_lr", "1e-5", "--warmup_steps", "5",
             "--beta", "0.3", "--eval_interval", "30", "--log_interval", "10", "--save_interval", "0"]


def test_lab_dpo_beats_sft(flawed_sft):
    import json
    import common
    d = flawed_sft
    out = d / "dpo"
    m = dpo.main(["--init_from", str(d / "sft" / "final.pt"), "--data", str(d / "prefs_train.jsonl"),
                  "--val_data", str(d / "prefs_val.jsonl"), "--eval_data", str(d / "heldout_qa.jsonl"),
                  "--out_dir", str(out), "--precompute_ref", *DPO_FLAGS])
    print({k: v for k, v in m.items() if not isinstance(v, (dict, list))})
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(m))
    # the invariant at step 0, from the script's own check (reference log-probs precomputed)
    assert m["step0_check"]["pass"] and m["step0_check"]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    # held-out preferences (people never seen): implicit-reward accuracy 0.5 at SFT by definition;
    # measured 0.815-0.843 after DPO. The policy's own log-prob ranking also improves: 0.7975 -> 0.8225
    # (400 pairs; the same in the native cell, ATen default/avx2, MKL AVX2 and 2 threads; with the earlier
    # persona set 0.74 -> 0.81); asserted: at least 6 more pairs.
    assert m["pref_accuracy"] >= 0.75
    assert m["pref_logp_accuracy"] >= m["pref_logp_accuracy_init"] + 0.015
    assert m["pref_accuracy_by_kind"]["rude"] >= 0.9
    # ground truth on held-out prompts: measured SFT 0.289 -> DPO 0.533 (45 prompts, the same in the five
    # cells above; before the persona change SFT 0.081 -> DPO 0.243 on 37 prompts, identical with ATen
    # default/avx2/avx512 and MKL AVX2, one thread; earlier lab worlds: 0.447 -> 0.632, 0.227 -> 0.659);
    # asserted: at least +0.10
    assert m["accuracy"] >= m["accuracy_sft"] + 0.10
    assert m["win_rate_checker"] > 0.55 and m["mean_score"] > m["mean_score_sft"]
    assert 0 < m["kl_to_sft"] < 2.0 and m["win_rate_reward"] is None
    # every log line carries the metrics; best/final checkpoints and the round checkpoint exist
    log = common.read_jsonl(out / "log.jsonl")
    steps = [r for r in log if "round_step" in r]
    assert [r["round_step"] for r in steps] == [10, 20, 30, 40, 50, 60]
    for key in ("loss", "accuracy", "margin", "reward_chosen", "reward_rejected", "logp_chosen", "logp_rejected"):
        assert all(key in r for r in steps)
    assert all((out / f).exists() for f in ("best.pt", "final.pt", "round_00.pt", "ref_logps_00.json"))
    # a healthy run: the chosen answers' log-prob did not collapse (no alarm: it stayed within 10% of
    # its start; measured -29.7 -> -30.7 nats)
    assert "alarm" not in [r.get("event") for r in log]
    assert m["pref_logp_chosen"] > 1.1 * m["pref_logp_chosen_init"]


def test_rounds_sample_rank_and_train(flawed_sft):
    """--rounds: answers sampled from the policy, ranked by a reward model (a frozen random head on
    the SFT backbone: any scorer will do to check the plumbing), best vs worst become pairs, DPO runs
    on them against the policy at the round's start, and every number reaches metrics.json."""
    import json
    import common
    from reward import REWARD_KIND, RewardModel
    d = flawed_sft
    rm = RewardModel.from_llama(common.load_model(str(d / "sft" / "final.pt"))[0])
    torch.manual_seed(0)
    torch.nn.init.normal_(rm.head.weight, std=0.5)
    common.save_checkpoint(str(d / "rm"), "final", rm, step=0, config={}, tokenizer=Tokenizer(), kind=REWARD_KIND)
    out = d / "rounds"
    m = dpo.main(["--init_from", str(d / "sft" / "final.pt"), "--rounds", "1", "--prompts", str(d / "prompts.jsonl"),
                  "--round_prompts", "24", "--samples", "3", "--max_new_tokens", "32", "--reward_model", str(d / "rm"),
                  "--val_data", str(d / "prefs_val.jsonl"), "--eval_steps", "2",
                  "--eval_data", str(d / "heldout_qa.jsonl"),
                  "--eval_limit", "12", "--out_dir", str(out), "--batch_size", "4", "--max_steps", "3", "--lr", "1e-4",
                  "--warmup_steps", "1", "--eval_interval", "0", "--log_interval", "1", "--save_interval", "0"])
    pairs = [json.loads(line) for line in open(out / "round_01_pairs.jsonl", encoding="utf-8")]
    assert 0 < len(pairs) <= 24 and m["rounds"][0]["pairs"] == len(pairs) and m["rounds"][0]["samples"] == 72
    assert all(p["chosen_score"] > p["rejected_score"] and p["chosen"] != p["rejected"] for p in pairs)
    # the scores are the reward model's: recompute two of them
    fn = dpo.reward_scorer(rm.eval(), Tokenizer(), "cpu", torch.autocast("cpu", enabled=False))
    got = fn([p["messages"] for p in pairs[:2]] * 2,
             [p["chosen"] for p in pairs[:2]] + [p["rejected"] for p in pairs[:2]])
    assert got == pytest.approx([p["chosen_score"] for p in pairs[:2]] + [p["rejected_score"] for p in pairs[:2]],
                                abs=1e-4)
    assert m["step0_check"]["pass"] and m["n_eval"] == 12
    assert m["win_rate_reward"] is not None and m["mean_reward"] is not None and m["rounds"][0]["steps"] == 3
    events = [r.get("event") for r in common.read_jsonl(out / "log.jsonl")]
    assert {"round_samples", "round_start", "step0_check", "round_end", "end"} <= set(events)


def test_ddp_two_processes_equal_one_process(flawed_sft):
    """torchrun with 2 DDP ranks x batch 4 == one process x batch 4 x grad_accum 2: same batches, same
    loss, same weights (gloo on CPU). Catches a reference or a loss that is not averaged right. The
    same under FSDP: policy and frozen reference built on the meta device and loaded shard by shard
    (common.load_model_sharded), weights saved as a DCP directory."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    d = flawed_sft
    repo = Path(dpo.__file__).resolve().parent
    flags = ["--init_from", str(d / "sft" / "final.pt"), "--data", str(d / "prefs_train.jsonl"), "--val_frac", "0",
             "--max_steps", "2", "--lr", "1e-3", "--warmup_steps", "1", "--eval_interval", "0", "--save_interval", "0",
             "--log_interval", "1", "--batch_size", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(d)}
    dpo.main(flags + ["--grad_accum", "2", "--out_dir", str(d / "one")])
    import common
    one = torch.load(d / "one" / "final.pt", weights_only=True)["model"]
    l1 = [r["loss"] for r in common.read_jsonl(d / "one" / "log.jsonl") if "round_step" in r]
    for parallel in ("ddp", "fsdp"):
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               str(repo / "dpo.py"), *flags, "--out_dir", str(d / parallel), "--parallel", parallel],
                              cwd=repo, env=env, timeout=300, capture_output=True, text=True)
        # every rank's output on failure: the first error torchrun reports may be the victim's, not the cause
        assert done.returncode == 0, f"{parallel}: exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
        two = common.load_model(common.checkpoint_path(str(d / parallel), "final"))[0].state_dict()   # fsdp: a DCP dir
        assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-5, parallel
        l2 = [r["loss"] for r in common.read_jsonl(d / parallel / "log.jsonl") if "round_step" in r]
        assert len(l1) == 2 and l1 == pytest.approx(l2, abs=1e-6), parallel


def test_resume_is_exact(flawed_sft):
    """Stop after step 2 of 4 (only step_0000002.pt and the cached reference log-probs survive), then
    --resume: the final weights equal an uninterrupted run's, bit for bit."""
    import shutil
    d = flawed_sft
    flags = ["--init_from", str(d / "sft" / "final.pt"), "--data", str(d / "prefs_train.jsonl"), "--val_frac", "0",
             "--max_steps", "4", "--lr", "1e-3", "--warmup_steps", "1", "--eval_interval", "0", "--save_interval", "2",
             "--log_interval", "1", "--batch_size", "4", "--precompute_ref", "--keep_last", "0"]
    dpo.main(flags + ["--out_dir", str(d / "full")])
    (d / "cut").mkdir()
    for name in ("step_0000002.pt", "ref_logps_00.json"):
        shutil.copy(d / "full" / name, d / "cut" / name)
    with pytest.raises(SystemExit):   # an existing run is never overwritten without --resume
        dpo.main(flags + ["--out_dir", str(d / "cut")])
    dpo.main(flags + ["--out_dir", str(d / "cut"), "--resume"])
    a = torch.load(d / "full" / "final.pt", weights_only=True)
    b = torch.load(d / "cut" / "final.pt", weights_only=True)
    assert a["step"] == b["step"] == 4
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
