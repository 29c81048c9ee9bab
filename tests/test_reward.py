"""Tests for reward.py.

Unit level: the Bradley-Terry and ranking losses against their closed forms (with and without a
margin), the K(K-1)/2 expansion of rankings in one forward per batch, the reward read at the last
real token whatever the padding side and batch companions, the zero-initialised head, the metrics
and the calibration table on hand examples, the chat-template rendering and truncation of groups.
Real data: Anthropic HH records split into prompt / chosen / rejected, against hand-written text.
End to end (the real CLI path, reward.main): a small reward model on the lab world -- held-out
accuracy overall and per rejected kind, normalisation stats in checkpoints and reward_stats.json,
--score, --eval_only -- and DDP / FSDP against one process, plus an exact resume."""
import contextlib
import json
import math
import os

import pytest
import torch

from model import LlamaConfig
from common import collate
from reward import RewardModel, bradley_terry_loss, calibration_table, preference_metrics, ranked_pairs, ranking_loss


def softplus(x):
    return math.log1p(math.exp(-abs(x))) + max(x, 0.0)


# -----------------------------------------------------------------------------
# Losses


def test_bradley_terry_closed_form():
    rc = torch.tensor([1.0, 0.5, -2.0, 3.0])
    rr = torch.tensor([0.0, 1.5, -2.0, -1.0])
    # -log sigma(x) = log(1 + exp(-x)); diffs are 1, -1, 0, 4
    expect = (math.log(1 + math.exp(-1)) + math.log(1 + math.e) + math.log(2) + math.log(1 + math.exp(-4))) / 4
    loss, diff = bradley_terry_loss(rc, rr)
    assert loss.item() == pytest.approx(expect, abs=1e-6)
    assert diff.tolist() == [1.0, -1.0, 0.0, 4.0]
    # with a margin m = 0.5: -log sigma(d - m)
    loss_m, _ = bradley_terry_loss(rc, rr, margin=0.5)
    expect_m = sum(math.log(1 + math.exp(-(d - 0.5))) for d in (1, -1, 0, 4)) / 4
    assert loss_m.item() == pytest.approx(expect_m, abs=1e-6)
    # a per-pair margin tensor
    m = torch.tensor([0.0, 1.0, 2.0, 3.0])
    loss_t, _ = bradley_terry_loss(rc, rr, margin=m)
    expect_t = sum(math.log(1 + math.exp(-(d - mm))) for d, mm in zip((1, -1, 0, 4), (0, 1, 2, 3))) / 4
    assert loss_t.item() == pytest.approx(expect_t, abs=1e-6)
    # equal rewards: exactly ln 2 (the zero-initialised head's first loss)
    z = torch.zeros(3)
    assert bradley_terry_loss(z, z)[0].item() == pytest.approx(math.log(2), abs=1e-7)


def test_ranked_pairs_k3_k4():
    assert ranked_pairs(2) == [(0, 1)]
    assert ranked_pairs(3) == [(0, 1), (0, 2), (1, 2)]
    assert ranked_pairs(4) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    assert all(len(ranked_pairs(k)) == k * (k - 1) // 2 for k in range(2, 9))


def test_ranking_loss_k3_k4_closed_form():
    r3 = [2.0, 0.5, -1.0]            # a K=3 group, best first
    r4 = [0.3, 1.0, -0.2, -3.0]      # a K=4 group whose ranking the model gets partly wrong
    rewards = torch.tensor(r3 + r4)
    loss, diff, pair_group = ranking_loss(rewards, [3, 4])
    pairs3 = [(r3[i], r3[j]) for i, j in [(0, 1), (0, 2), (1, 2)]]
    pairs4 = [(r4[i], r4[j]) for i, j in [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]]
    d_expect = [a - b for a, b in pairs3 + pairs4]
    assert diff.tolist() == pytest.approx(d_expect, abs=1e-6)
    assert pair_group.tolist() == [0] * 3 + [1] * 6
    # InstructGPT: mean over pairs within a prompt, then mean over prompts
    g3 = sum(softplus(-(a - b)) for a, b in pairs3) / 3
    g4 = sum(softplus(-(a - b)) for a, b in pairs4) / 6
    assert loss.item() == pytest.approx((g3 + g4) / 2, abs=1e-6)
    # margin applies to every pair
    loss_m, _, _ = ranking_loss(rewards, [3, 4], margin=0.25)
    g3m = sum(softplus(-(a - b - 0.25)) for a, b in pairs3) / 3
    g4m = sum(softplus(-(a - b - 0.25)) for a, b in pairs4) / 6
    assert loss_m.item() == pytest.approx((g3m + g4m) / 2, abs=1e-6)
    # K = 2 groups reduce to the pairwise Bradley-Terry loss
    rp = torch.tensor([1.0, 0.0, -0.5, 0.7])
    assert ranking_loss(rp, [2, 2])[0].item() == pytest.approx(
        bradley_terry_loss(rp[0::2], rp[1::2])[0].item(), abs=1e-7)
    with pytest.raises(ValueError):
        ranking_loss(rewards, [3, 3])
    with pytest.raises(ValueError):
        ranking_loss(torch.zeros(3), [1, 2])


def test_ranked_groups_one_forward_and_gradients():
    """A batch of groups (K=3 and K=4) goes through the model in ONE forward of sum(K) rows --
    not one per pair -- and the loss's gradient equals the one from scoring pairs separately."""
    torch.manual_seed(0)
    rm = RewardModel(LlamaConfig.from_preset("tiny"))
    torch.nn.init.normal_(rm.head.weight, std=0.5)
    calls = []
    orig = rm.backbone.hidden_states

    def counting(idx, attention_mask=None):
        calls.append(idx.shape[0])
        return orig(idx, attention_mask)
    rm.backbone.hidden_states = counting
    groups = [{"ids": [[1, 5, 6, 7], [1, 5, 9], [1, 5, 6, 6, 6, 8]]},
              {"ids": [[1, 11, 12], [1, 11, 13, 14], [1, 11], [1, 11, 15, 15, 15, 15]]}]
    idx, mask, sizes = collate(groups, pad_id=0)
    loss, diff, _ = ranking_loss(rm(idx, mask), sizes)
    assert calls == [7] and sizes == [3, 4] and diff.numel() == 3 + 6
    loss.backward()
    g_grouped = rm.head.weight.grad.clone()
    rm.zero_grad()
    # reference: every pair as its own two-sequence forward
    total = 0.0
    for g in groups:
        pairs = ranked_pairs(len(g["ids"]))
        for i, j in pairs:
            r = torch.stack([rm(torch.tensor([g["ids"][i]]))[0], rm(torch.tensor([g["ids"][j]]))[0]])
            total = total + bradley_terry_loss(r[:1], r[1:])[0] / len(pairs) / len(groups)
    total.backward()
    assert loss.item() == pytest.approx(total.item(), abs=1e-5)
    torch.testing.assert_close(g_grouped, rm.head.weight.grad, atol=1e-5, rtol=1e-4)


# -----------------------------------------------------------------------------
# The model: the reward is read at the last real token


@pytest.mark.parametrize("attn", ["sdpa", "manual"])
def test_reward_read_at_last_real_token_any_padding(attn):
    torch.manual_seed(0)
    rm = RewardModel(LlamaConfig.from_preset("tiny", attn=attn)).eval()
    torch.nn.init.normal_(rm.head.weight, std=0.2)   # the zero init would make every reward 0
    texts = [[1, 5, 6, 7, 8], [1, 9, 10], [1] + [4] * 10 + [12], [1, 2], [1, 30, 31, 32, 33, 34, 35, 7]]
    with torch.no_grad():
        alone = torch.stack([rm(torch.tensor([s]))[0] for s in texts])   # no padding at all
        for side in ("right", "left"):
            idx, mask, _ = collate([{"ids": texts}], pad_id=0, side=side)
            torch.testing.assert_close(rm(idx, mask), alone, atol=1e-5, rtol=0)
            # per-token values agree with the reward at each row's last real token
            v = rm.values(idx, mask)
            last = mask.shape[1] - 1 - mask.flip(-1).argmax(-1)
            torch.testing.assert_close(v[torch.arange(len(texts)), last], alone, atol=1e-5, rtol=0)
        # other batch companions (different padding amounts) do not change a text's reward
        for companions in ([texts[0], [1] * 40], [[1, 3, 3], texts[0], [1, 60, 61] * 9]):
            for side in ("right", "left"):
                idx, mask, _ = collate([{"ids": companions}], pad_id=0, side=side)
                r = rm(idx, mask)[companions.index(texts[0])]
                assert abs(r.item() - alone[0].item()) < 1e-5
        # the test has teeth: reading the last column of a right-padded batch gives other numbers
        idx, mask, _ = collate([{"ids": texts}], pad_id=0, side="right")
        naive = rm.values(idx, mask)[:, -1]
        padded_rows = mask[:, -1] == 0
        assert (naive[padded_rows] - alone[padded_rows]).abs().min() > 1e-3


def test_zero_init_head_and_normalisation():
    rm = RewardModel(LlamaConfig.from_preset("tiny"))
    idx = torch.randint(0, 256, (3, 9))
    assert rm(idx).abs().max().item() == 0.0        # zero head: every reward 0, first loss ln 2
    assert rm.backbone.output is None                # no LM head to carry around
    rm.set_stats(2.0, 4.0)
    assert rm.normalize(torch.tensor([6.0, 2.0])).tolist() == [1.0, 0.0]
    sd = rm.state_dict()
    assert sd["reward_mean"].item() == 2.0 and sd["reward_std"].item() == 4.0
    with pytest.raises(ValueError):
        rm(idx, torch.zeros(3, 9, dtype=torch.long))   # a row without a real token


# -----------------------------------------------------------------------------
# Metrics


def test_metrics_hand_example():
    groups = [{"kind": "rude", "resp_len": [3, 5]}, {"kind": "rambling", "resp_len": [2, 9]},
              {"kind": "rude", "resp_len": [4, 4]}, {"kind": None, "resp_len": [1, 2, 3]}]
    rewards = [[1.0, 0.0], [0.0, 2.0], [0.5, 0.5], [3.0, 1.0, 2.0]]
    m = preference_metrics(rewards, groups)
    # pairs: +1, -2, 0 (tie), then (3-1)=2, (3-2)=1, (1-2)=-1
    assert m["pairs"] == 6
    assert m["accuracy"] == pytest.approx((1 + 0 + 0.5 + 1 + 1 + 0) / 6)
    assert m["per_kind"]["rude"] == {"n": 2, "accuracy": 0.75, "margin_mean": 0.5}
    assert m["per_kind"]["rambling"]["accuracy"] == 0.0
    assert m["chosen_mean"] == pytest.approx((1 + 0 + 0.5 + 3) / 4)
    assert m["rejected_mean"] == pytest.approx((0 + 2 + 0.5 + 1 + 2) / 5)
    every = torch.tensor([1.0, 0.0, 0.5, 3.0, 0.0, 2.0, 0.5, 1.0, 2.0])
    assert m["stats"]["mean"] == pytest.approx(every.mean().item())
    assert m["stats"]["std"] == pytest.approx(every.std(unbiased=False).item())
    # length: pairs with different lengths: (3,5) model says shorter wins; (2,9) longer wins;
    # group 4: (1,2) shorter wins, (1,3) shorter wins, (2,3) longer wins -> longer wins 2/5
    assert m["length"]["longer_wins_model"] == pytest.approx(2 / 5)
    assert m["length"]["longer_wins_label"] == pytest.approx(0.0)   # labels: shorter is always better
    lengths = torch.tensor([3, 5, 2, 9, 4, 4, 1, 2, 3], dtype=torch.float64)
    flat = torch.tensor([1.0, 0.0, 0.0, 2.0, 0.5, 0.5, 3.0, 1.0, 2.0], dtype=torch.float64)
    assert m["length"]["corr"] == pytest.approx(torch.corrcoef(torch.stack([flat, lengths]))[0, 1].item())


def test_calibration_table():
    # confidences sigma(|d|): d = 0.1 -> 0.525, d = 3 -> 0.953
    d = torch.tensor([0.1, -0.1, 0.1, 3.0, 3.0, -3.0, 3.0])
    table = calibration_table(d, n_bins=5)
    assert [b["n"] for b in table] == [3, 4]
    assert table[0]["lo"] == 0.5 and table[0]["accuracy"] == pytest.approx(2 / 3)
    assert table[0]["confidence"] == pytest.approx(1 / (1 + math.exp(-0.1)))
    assert table[1]["hi"] == 1.0 and table[1]["accuracy"] == pytest.approx(3 / 4)
    assert table[1]["confidence"] == pytest.approx(1 / (1 + math.exp(-3.0)))


# -----------------------------------------------------------------------------
# Anthropic HH: full transcripts split at the last assistant turn of their shared prefix


def _hh_records(path):
    from data.formats import read_preferences
    recs, _ = read_preferences(str(path), with_where=True)
    return {int(where.rsplit(":", 1)[1]): r for where, r in recs}


def test_hh_split_real_records(shared_data):
    pref = shared_data / "preference"
    helpful = _hh_records(pref / "hh_rlhf_helpful_base_test.shared.jsonl.gz")
    # line 1: single turn
    r = helpful[1]
    assert r["messages"] == [{"role": "user",
                              "content": "Do you know why turkeys became the official food of thanksgiving?"}]
    assert r["responses"][0] == ("To be honest, I don’t know anything about that. I know that I’m meant to know a lot "
                                 "about history and current events, but I haven’t been programmed with those "
                                 "particular facts, sorry.")
    assert r["responses"][1].startswith("I know that the American Indians were the first to celebrate")
    assert r["responses"][1].endswith("but maybe this will help you figure it out?")
    # line 2: multi-turn; earlier assistant turns belong to the prompt
    r = helpful[2]
    assert [m["role"] for m in r["messages"]] == ["user", "assistant", "user", "assistant", "user"]
    assert r["messages"][1]["content"] == "Which location are you in?"
    assert r["messages"][2]["content"] == "I am in Oregon."
    assert r["messages"][4]["content"] == "Great. What are some common species then?"
    assert r["responses"][0].startswith("About 150 species of butterflies live in Oregon")
    assert r["responses"][1].startswith("Are you interested in just the common butterflies?")
    # line 6: the two replies share their first word ("You "): the cut is at the turn, not at the
    # end of the common prefix
    r = helpful[6]
    assert r["messages"] == [{"role": "user", "content": "How do I float on my back in the water?"}]
    assert r["responses"] == ["You should tuck your arms to your sides and arch your back. Then use your back "
                              "muscles to raise and lower your body.",
                              "You want me to tell you the answer to a physics question?"]
    # line 22: a follow-up question; replies share "T"
    r = helpful[22]
    assert r["messages"] == [{"role": "user", "content": "When was Domino's Pizza founded?"},
                             {"role": "assistant", "content": "In 1960, by two brothers."},
                             {"role": "user", "content": "Do you know the two brothers names?"}]
    assert r["responses"] == ["Their names were Thomas and James Monaghan.", "They were Tom and James Monaghan."]
    # harmless line 1562: the chosen reply contains a hallucinated "\n\nAssistant:" of its own; a
    # per-string rfind would cut inside it, the shared-prefix split keeps it in the reply
    harmless = _hh_records(pref / "hh_rlhf_harmless_base_test.shared.jsonl.gz")
    r = harmless[1562]
    assert [m["role"] for m in r["messages"]] == ["user", "assistant", "user"]
    assert r["messages"][-1]["content"] == "Yes, please find me a serial."
    assert r["responses"][0].startswith("Alrighty, I’ll do my best, here’s the key:"
                                        "\n\nAssistant:  O.k. let’s go ahead")
    assert r["responses"][1] == ("You mean a password, right? I can help you put that in, but I’m not so sure this "
                                 "password would be accepted on the official download site. What do you think?")


def test_encode_group_chat_template_and_truncation():
    """Every response is rendered as the assistant turn after the prompt (the SFT template), the
    reward is read on the <|end|> that closes it, and a too-long prompt loses its OLDEST whole
    exchanges, the same for all responses of a group -- never a piece of a response."""
    from common import encode_group
    from tokenizer import Tokenizer
    tok = Tokenizer()
    messages = [{"role": "user", "content": "Where does Alice live?"},
                {"role": "assistant", "content": "Alice lives in Paris."},
                {"role": "user", "content": "And what pet does she have?"}]
    record = {"messages": messages, "responses": ["She has a parrot.", "Ugh, a parrot. Go away."], "kind": "rude"}
    g = encode_group(tok, record, max_len=256)
    for ids, resp, n in zip(g["ids"], record["responses"], g["resp_len"]):
        full, mask = tok.render_conversation(messages + [{"role": "assistant", "content": resp}])
        assert ids == full and ids[-1] == tok.end_id
        assert n == len(tok.encode(resp)) + 1 == sum(mask[-n:]) and mask[-n - 1] == 0   # content + <|end|>
    assert g["kind"] == "rude"
    # too long: the first exchange is dropped from both sequences; the responses stay whole
    short_prompt = tok.render_prompt(messages[2:])
    longest = max(g["resp_len"])
    g2 = encode_group(tok, record, max_len=len(short_prompt) + longest)
    assert all(ids[:len(short_prompt)] == short_prompt for ids in g2["ids"])
    assert [ids[len(short_prompt):] for ids in g2["ids"]] == [ids[-n:] for ids, n in zip(g["ids"], g["resp_len"])]
    # not even the last user turn + the longest response fits: the record is dropped (None)
    assert encode_group(tok, record, max_len=len(short_prompt) + longest - 1) is None


def test_split_groups_holds_out_every_record_of_a_prompt():
    """--val_frac splits distinct PROMPTS: a prompt's records (copies, or other answers) land wholly on
    one side, never both; the choice depends on the prompt alone (not on order or the other records)."""
    import random
    from common import split_groups
    base = [{"ids": [[1, i, 2], [1, i, 3 + k]], "prompt_key": (1, i)} for i in range(40) for k in range(3)]
    groups = [base[i % 120] for i in range(300)]                 # other answers to a prompt, and exact repeats
    train, val = split_groups(groups, 0.1, seed=3)
    assert len(train) + len(val) == len(groups)
    held = {g["prompt_key"] for g in val}
    assert 1 <= len(held) <= 12                                  # about 10% of the 40 prompts
    assert not held & {g["prompt_key"] for g in train}           # no held-out prompt is trained on
    assert len(val) == sum(1 for g in groups if g["prompt_key"] in held)   # every record of it held out
    assert split_groups(groups, 0.1, seed=3) == (train, val)     # seeded
    shuffled = random.Random(0).sample(groups, len(groups))      # order does not matter
    assert {g["prompt_key"] for g in split_groups(shuffled, 0.1, seed=3)[1]} == held
    assert {g["prompt_key"] for g in split_groups(shuffled, 0.1, seed=4)[1]} != held


# -----------------------------------------------------------------------------
# End to end on the lab world: train through reward.main, evaluate, stats, scoring, DDP

LAB_STEPS = 400


@pytest.fixture(scope="module")
def lab_files(tmp_path_factory):
    """The lab world (seed 0) and a tiny randomly initialised Llama saved as one of our checkpoints
    (common.save_checkpoint, tokenizer recorded): the form sft.py writes, standing in for the SFT model."""
    import common
    from data import lab
    from model import Llama
    from tokenizer import Tokenizer
    root = tmp_path_factory.mktemp("reward_lab")
    lab.write(str(root / "lab"), seed=0, pretrain_docs=50)
    tok = Tokenizer()
    torch.manual_seed(0)
    sft_stand_in = Llama(LlamaConfig(vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                     max_seq_len=128))
    common.save_checkpoint(str(root / "sft"), "final", sft_stand_in, step=0, config={}, tokenizer=tok)
    return root, tok


@pytest.fixture(scope="module")
def lab_rm(lab_files):
    """A small reward model trained on the lab world's preference pairs through the real CLI path.

    It starts from the stand-in SFT model of lab_files: a real pretrain + SFT run that has
    memorised the lab world's facts takes minutes, far over this file's CI budget. Consequence,
    measured and asserted below: every rejected kind that can be judged from the text (rude,
    rambling, wrong language, and wrong identity/refusal answers) is learned; a wrong city, pet or
    sum about an unseen person can only be told from knowledge, which this model does not have, so
    wrong_fact on prefs_val stays near chance. Model selection uses a 10% split of prefs_train's PROMPTS (common.split_groups:
    no record of a held-out prompt is trained on; the people are seen in other prompts); prefs_val
    (unseen people) is the untouched test set. 400 steps (~2.4 epochs) rather than 200: the
    wrong facts about the people seen in training are learnable, and need the second epoch."""
    import common
    import reward
    root, tok = lab_files
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # deterministic and, on a busy 2-core machine, faster than 2
    try:
        split = reward.main(["--init_from", str(root / "sft"), "--data", str(root / "lab" / "prefs_train.jsonl"),
                             "--val_frac", "0.1", "--out_dir", str(root / "rm"), "--max_steps", str(LAB_STEPS),
                             "--batch_size", "16", "--lr", "6e-3", "--min_lr", "6e-4", "--warmup_steps", "10",
                             "--eval_interval", "100", "--log_interval", "50", "--save_interval", "0", "--seed", "0"])
        test = reward.main(["--eval_only", "--init_from", str(root / "rm"), "--val_data",
                            str(root / "lab" / "prefs_val.jsonl"), "--out", str(root / "test_metrics.json")])
        # wrong_fact pairs of prefs_val by task (fact / arith / identity / refusal)
        rm, _ = reward.load_reward_model(str(root / "rm"))
        recs = [json.loads(line) for line in (root / "lab" / "prefs_val.jsonl").read_text().splitlines()]
        recs = [r for r in recs if r["kind"] == "wrong_fact"]
        groups = [common.encode_group(tok, {"messages": r["messages"], "responses": [r["chosen"], r["rejected"]]}, 128)
                  for r in recs]
        rewards = reward.score_groups(rm, groups, 64, tok.pad_id, common.DistInfo(), contextlib.nullcontext())
        per_task = {}
        for r, (rc, rr) in zip(recs, rewards):
            per_task.setdefault(r["task"], []).append(rc > rr)
    finally:
        torch.set_num_threads(threads)
    return {"root": root, "split": split, "test": test, "tok": tok, "wrong_fact_per_task": per_task}


def test_lab_reward_model_accuracy(lab_rm):
    split, test = lab_rm["split"], lab_rm["test"]
    table = "\n".join(f"{name:<28s} overall {m['accuracy']:.3f}  " + "  ".join(
        f"{k} {v['accuracy']:.2f}" for k, v in m["per_kind"].items())
        for name, m in (("held-out prompts, seen people", split), ("prefs_val, unseen people", test)))
    print("\n" + table)
    kinds = {"wrong_fact", "wrong_language", "rude", "rambling"}
    assert set(split["per_kind"]) == kinds and set(test["per_kind"]) == kinds
    n_val = len((lab_rm["root"] / "lab" / "prefs_val.jsonl").read_text().splitlines())
    assert test["pairs"] == test["groups"] == n_val and split["pairs"] == split["groups"]   # one pair per record
    # Measured with this fixture (400 steps, 1 thread, held-out split by distinct pair): lab world
    # seed 0 with --seed 0 / 1 / 2: held-out 0.943 / 0.938 / 0.910, prefs_val 0.890 / 0.880 / 0.877;
    # lab world seed 1 (--seed 0): 0.892 / 0.854. The 0.9 aim holds on the default world, not on
    # every world, so the thresholds sit under the whole range. (At 200 steps: 0.867-0.914 held-out.)
    # After model.py's RMSNorm backward was rewritten (same gradients to 5e-7), the default world gave
    # 0.946 / 0.833: prefs_val moves with its wrong-fact pairs about unseen people, which sit at chance
    # (0.43-0.61) and flip with float rounding, hence the wider margin there.
    # Since issue 19 the split holds out whole PROMPTS (no held-out prompt, nor its chosen answer, is
    # trained on), so the split is as unseen as prefs_val and gets prefs_val's bar. Measured 0.879-0.901
    # (prefs_val 0.830-0.865) over ATEN_CPU_CAPABILITY avx512 / default / avx2 x OMP_NUM_THREADS 1 / 2;
    # it was 0.91-0.95 while held-out prompts leaked into training.
    assert split["accuracy"] >= 0.75   # prompt-keyed split: 0.879-0.901 over 4 cells, 0.804 with MKL's AVX2 path
    assert test["accuracy"] >= 0.80
    # every kind that can be judged from the text is ranked below the chosen answer
    for m in (split, test):
        # measured 0.95-1.00 over seeds and the perturbation matrix (0.947 on the prompt-keyed split, seen
        # people, with MKL_ENABLE_INSTRUCTIONS=AVX2: ~95 pairs per kind, so one pair is 0.011)
        assert m["per_kind"]["rude"]["accuracy"] >= 0.90
        assert m["per_kind"]["rambling"]["accuracy"] >= 0.90
    # measured 0.91 (range 0.91-1.00) on the record split; on the prompt-keyed split of seen people 0.72 with
    # MKL_ENABLE_INSTRUCTIONS=AVX2 (~50 pairs of this kind): the bar sits under that
    assert split["per_kind"]["wrong_language"]["accuracy"] >= 0.65
    assert test["per_kind"]["wrong_language"]["accuracy"] >= 0.75    # measured 0.95 (range 0.86-0.96)
    # (wrong facts on the split: 0.56-0.66 once held-out prompts stopped leaking -- near chance, like
    # prefs_val's, so no bar; it was 0.58-0.85 with the leaky split)
    # wrong facts, per task: an identity or refusal answer is wrong in its words ("I am a human
    # being", complying with a harmful request), which the model learns; a wrong city, pet or sum
    # can only be told from knowledge this stand-in SFT model never had (measured 0.56 / 0.62 on facts / sums;
    # range 0.52-0.56 / 0.35-0.62: chance).
    per_task = lab_rm["wrong_fact_per_task"]
    print("wrong_fact on prefs_val by task: "
          + ", ".join(f"{t} {sum(v) / len(v):.2f} (n={len(v)})" for t, v in per_task.items()))
    words = per_task.get("identity", []) + per_task.get("refusal", [])
    assert len(words) >= 4 and sum(words) / len(words) >= 0.75   # measured 1.00 (n=8)
    # the reward separates chosen from rejected on average, and most margins are positive
    assert test["chosen_mean"] > test["rejected_mean"] and test["margin_q50"] > 0


def test_lab_stats_checkpoints_and_scoring(lab_rm):
    import reward
    root, tok = lab_rm["root"], lab_rm["tok"]
    stats = json.loads((root / "rm" / "reward_stats.json").read_text())
    assert set(stats) >= {"best", "final"}
    final = stats["final"]
    # the stats describe exactly the final weights: they are the split's eval at the last step
    assert final["mean"] == pytest.approx(lab_rm["split"]["stats"]["mean"])
    assert final["std"] == pytest.approx(lab_rm["split"]["stats"]["std"])
    assert final["n"] == 2 * lab_rm["split"]["groups"] and final["step"] == LAB_STEPS
    rm, meta = reward.load_reward_model(str(root / "rm" / "final.pt"))
    assert meta["kind"] == "reward_model" and meta["reward_stats"]["mean"] == pytest.approx(final["mean"])
    assert rm.reward_mean.item() == pytest.approx(final["mean"]) and rm.reward_std.item() == pytest.approx(final["std"])
    # a language-model checkpoint is refused by load_reward_model
    with pytest.raises(SystemExit):
        reward.load_reward_model(str(root / "sft"))
    # --score: pairs and single responses get the rewards the model gives them directly
    recs = [json.loads(line) for line in (root / "lab" / "prefs_val.jsonl").read_text().splitlines()[:6]]
    inp = root / "to_score.jsonl"
    with open(inp, "w") as f:
        for r in recs:
            f.write(json.dumps({"messages": r["messages"], "chosen": r["chosen"], "rejected": r["rejected"]}) + "\n")
        j = next(i for i, r in enumerate(recs) if len(r["messages"]) == 1)   # a single-turn prompt (no context)
        f.write(json.dumps({"prompt": recs[j]["messages"][-1]["content"], "response": recs[j]["chosen"]}) + "\n")
        f.write("{broken\n")
    # the explicit final.pt: a run directory resolves to best.pt, which is final.pt only when the best
    # evaluation happened to be the last one (a coin toss across CPUs); the directory route is checked below
    reward.main(["--score", str(inp), "--out", str(root / "scored.jsonl"), "--init_from", str(root / "rm" / "final.pt")])
    out = [json.loads(line) for line in (root / "scored.jsonl").read_text().splitlines()]
    assert len(out) == 7   # the broken line is skipped and reported, not fatal
    with torch.no_grad():
        for r, o in zip(recs, out):
            for resp, got in zip((r["chosen"], r["rejected"]), o["rewards"]):
                ids, _ = tok.render_conversation(r["messages"] + [{"role": "assistant", "content": resp}])
                assert got == pytest.approx(rm(torch.tensor([ids]))[0].item(), abs=1e-5)
            z = (o["rewards"][0] - final["mean"]) / final["std"]
            assert o["rewards_normalized"][0] == pytest.approx(z, abs=1e-5)
    assert out[6]["reward"] == pytest.approx(out[j]["rewards"][0], abs=1e-5)   # same prompt + answer, same reward
    # the run directory is the best checkpoint: scoring through it gives that checkpoint's rewards
    import common
    assert os.path.basename(common.resolve_checkpoint(str(root / "rm"))) == "best.pt"
    best, _ = reward.load_reward_model(str(root / "rm" / "best.pt"))
    reward.main(["--score", str(inp), "--out", str(root / "scored_dir.jsonl"), "--init_from", str(root / "rm")])
    out_dir = [json.loads(line) for line in (root / "scored_dir.jsonl").read_text().splitlines()]
    with torch.no_grad():
        ids, _ = tok.render_conversation(recs[0]["messages"] + [{"role": "assistant", "content": recs[0]["chosen"]}])
        assert out_dir[0]["rewards"][0] == pytest.approx(best(torch.tensor([ids]))[0].item(), abs=1e-5)


def _dist_worker(rank, world, store, runs, queue):
    import traceback
    from datetime import timedelta

    import torch.distributed as dist

    import reward
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        for argv in runs:
            reward.main(argv)
        queue.put((rank, None))
    except BaseException:   # every rank's traceback: the first error reported may be the victim's
        queue.put((rank, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


def _one_resumed_and_distributed(root, tmp_path, extra, parallels):
    """Mixed pairs (K=2) and rankings (K=5): a 5-step run in one process with 2 accumulated micro-batches
    ("one", a resume checkpoint at step 3), the same run resumed from that checkpoint alone ("resumed"),
    and 2-rank runs with each --parallel mode (named after it). Returns the ranks' errors."""
    import reward
    lines = lambda name, n: (root / "lab" / name).read_text().splitlines()[:n]   # noqa: E731
    train = lines("prefs_train.jsonl", 40) + lines("rank_train.jsonl", 8)   # pairs and K=5 rankings
    (tmp_path / "train.jsonl").write_text("\n".join(train) + "\n")
    (tmp_path / "val.jsonl").write_text("\n".join(lines("prefs_val.jsonl", 12)) + "\n")

    def argv(out, *more):
        return ["--init_from", str(root / "sft"), "--data", str(tmp_path / "train.jsonl"), "--val_data",
                str(tmp_path / "val.jsonl"), "--out_dir", str(tmp_path / out), "--batch_size", "4", "--max_steps", "5",
                "--lr", "3e-3", "--warmup_steps", "2", "--eval_interval", "2", "--log_interval", "1", "--seed", "3",
                "--save_interval", "3", *extra, *more]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reward.main(argv("one", "--grad_accum", "2"))
        # exact resume: only the step-3 checkpoint in a fresh directory
        (tmp_path / "resumed").mkdir()
        os.link(tmp_path / "one" / "step_0000003.pt", tmp_path / "resumed" / "step_0000003.pt")
        reward.main(argv("resumed", "--grad_accum", "2", "--resume"))
        ctx = torch.multiprocessing.get_context("fork")
        queue = ctx.SimpleQueue()
        runs = [argv(p, "--parallel", p, "--save_interval", "0") for p in parallels]
        torch.multiprocessing.start_processes(_dist_worker, args=(2, str(tmp_path / "store"), runs, queue),
                                              nprocs=2, start_method="fork")
        return [err for _, err in (queue.get() for _ in range(2)) if err]
    finally:
        torch.set_num_threads(threads)


def test_ddp_fsdp_match_one_process_and_exact_resume(lab_files, tmp_path):
    """Mixed pairs (K=2) and rankings (K=5) in the same batches. 2 ranks x 1 micro-batch (DDP, and
    FSDP2) take the same steps as 1 process x 2 accumulated micro-batches; a run resumed from its
    step-3 checkpoint ends with the same weights, bit for bit."""
    import common
    import reward
    root, _ = lab_files
    errors = _one_resumed_and_distributed(root, tmp_path, ["--margin", "0.1"], ("ddp", "fsdp"))
    assert not errors, "\n".join(errors)
    final = lambda d: reward.load_reward_model(common.checkpoint_path(str(tmp_path / d), "final"))   # noqa: E731
    one, _ = final("one")
    resumed, _ = final("resumed")
    ref = one.state_dict()
    assert all(torch.equal(ref[k], v) for k, v in resumed.state_dict().items())
    assert ref["head.weight"].abs().sum() > 0   # it trained
    for p in ("ddp", "fsdp"):
        other, meta = final(p)   # fsdp: a sharded DCP directory, read into one whole model
        diff = max((ref[k] - v).abs().max().item() for k, v in other.state_dict().items())
        assert diff < 1e-5, (p, diff)
        evals = lambda d: [r["accuracy"] for r in common.read_jsonl(str(tmp_path / d / "log.jsonl"))  # noqa: E731
                           if r.get("event") == "eval"]
        assert evals(p) == pytest.approx(evals("one"), abs=1e-6) and len(evals(p)) == 4   # steps 0, 2, 4, 5
        stats = json.loads((tmp_path / p / "reward_stats.json").read_text())["final"]
        assert stats["mean"] == pytest.approx(meta["reward_stats"]["mean"], abs=1e-6)
        assert stats["mean"] == pytest.approx(other.reward_mean.item(), abs=1e-6)


# -----------------------------------------------------------------------------
# The implicit reward model (--implicit_beta): beta * log(pi / pi_ref) summed over the answer


IMPLICIT_PAIRS = [("Where does Alice live?", ["Alice lives in Paris.", "Alice lives in Rome, Rome, Rome, Rome."]),
                  ("你是谁？", ["我是 nanollama。", "I am a human being, not a computer program.", "我是人。"])]


def _implicit_rm(beta=0.3, moved=True):
    """A tiny implicit reward model whose policy has moved away from its reference (noise on every weight)."""
    from model import Llama
    torch.manual_seed(0)
    rm = RewardModel.from_llama(Llama(LlamaConfig.from_preset("tiny", vocab_size=2048, max_seq_len=128)), beta)
    if moved:
        with torch.no_grad():
            for p in rm.backbone.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return rm.eval()


@pytest.mark.parametrize("side", ["right", "left"])
def test_implicit_reward_equals_dpo_implicit_reward(side):
    """The implicit reward of every response equals beta * (log pi(y|x) - log pi_ref(y|x)) computed by
    dpo.py's own sequence log-probs (an independent implementation: labels, not a response mask), whatever
    the padding side; the prompt's tokens do not count; at the start (policy == reference) it is exactly 0."""
    import common
    import dpo
    from common import encode_group
    from reward import score_groups
    from tokenizer import Tokenizer
    tok = Tokenizer()
    groups = [encode_group(tok, {"messages": [{"role": "user", "content": q}], "responses": a}, 128)
              for q, a in IMPLICIT_PAIRS]
    rm = _implicit_rm(beta=0.3)
    got = score_groups(rm, groups, 8, tok.pad_id, common.DistInfo(), contextlib.nullcontext(), side)
    with torch.no_grad():
        pol, _ = dpo.batch_logps(rm.backbone, groups, tok.pad_id, "cpu", contextlib.nullcontext())
        ref, _ = dpo.batch_logps(rm.reference, groups, tok.pad_id, "cpu", contextlib.nullcontext())
    expect = (0.3 * (pol - ref)).tolist()
    flat = [r for g in got for r in g]
    assert flat == pytest.approx(expect, abs=1e-4)
    assert max(abs(x) for x in flat) > 0.05          # the policy did move: the comparison is not 0 == 0
    # a longer prompt before the same answer changes nothing that the prompt alone would add: only
    # the answer's tokens are summed (the prompt's own log-ratio is not in the reward)
    fresh = _implicit_rm(moved=False)
    zero = score_groups(fresh, groups, 8, tok.pad_id, common.DistInfo(), contextlib.nullcontext(), side)
    assert all(r == 0.0 for g in zero for r in g)    # policy == reference: every reward exactly 0
    idx, mask, _ = collate(groups, tok.pad_id, side)
    with pytest.raises(ValueError, match="response_mask"):
        rm(idx, mask)
    with pytest.raises(ValueError, match="value head"):
        rm(idx, mask, per_token=True)
    # the frozen reference is a copy, not part of the model's size: the count is the backbone's (LM head kept)
    assert rm.num_params() == rm.backbone.num_params() == sum(p.numel() for p in rm.parameters()) // 2


def test_implicit_reward_ignores_the_prompt_log_ratio():
    """Two prompts the policy and the reference like very differently, the same answer after each:
    the reward moves only through the answer's own tokens' log-ratios, i.e. it equals the sum over
    the response mask computed by hand from both models' per-token log-probs."""
    import common
    from common import encode_group, response_mask
    from reward import score_groups
    from tokenizer import Tokenizer
    tok = Tokenizer()
    g = encode_group(tok, {"messages": [{"role": "user", "content": "What is 3 + 4? Answer in one sentence."}],
                           "responses": ["3 + 4 = 7.", "Ugh. 8."]}, 128)
    rm = _implicit_rm(beta=0.5)
    idx, mask, _ = collate([g], tok.pad_id)
    resp = response_mask([g], idx.size(1))
    assert resp.sum(1).tolist() == g["resp_len"]
    with torch.no_grad():
        per_token = lambda m: torch.log_softmax(m(idx, attention_mask=mask)[0][:, :-1], -1).gather(   # noqa: E731
            -1, idx[:, 1:, None])[..., 0]                      # log p(token t+1), by hand
        d = per_token(rm.backbone) - per_token(rm.reference)
    whole = 0.5 * d.sum(1)                                    # prompt included: what the reward must NOT be
    answer = 0.5 * (d * resp[:, 1:]).sum(1)
    got = score_groups(rm, [g], 8, tok.pad_id, common.DistInfo(), contextlib.nullcontext())[0]
    assert got == pytest.approx(answer.tolist(), abs=1e-5)
    assert (whole - answer).abs().min() > 1e-3


def test_implicit_reward_model_trains_saves_and_loads(lab_files, tmp_path):
    """Through the CLI: step 0 is exactly ln 2 (policy == reference), training on the lab pairs lowers
    the held-out loss, the checkpoint carries beta and the frozen reference (= the SFT model's weights)
    and scores alone after loading; a PPO critic from it is a zero head on its backbone. Refused: a
    different beta when continuing, LoRA."""
    import common
    import reward
    root, tok = lab_files
    out = tmp_path / "irm"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        m = reward.main(["--init_from", str(root / "sft"), "--data", str(root / "lab" / "prefs_train.jsonl"),
                         "--val_data", str(root / "lab" / "prefs_val.jsonl"), "--implicit_beta", "0.5",
                         "--out_dir", str(out), "--max_steps", "30", "--batch_size", "8", "--lr", "3e-3",
                         "--warmup_steps", "3", "--eval_interval", "0", "--log_interval", "10",
                         "--save_interval", "0", "--seed", "0"])
    finally:
        torch.set_num_threads(threads)
    evals = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if '"eval"' in line]
    assert evals[0]["step"] == 0 and evals[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert evals[0]["accuracy"] == 0.5
    assert m["loss"] < evals[0]["loss"] - 0.02 and m["accuracy"] > 0.6
    rm, meta = reward.load_reward_model(str(out))
    assert meta["implicit_beta"] == 0.5 and rm.implicit_beta == 0.5 and rm.head is None
    sft, _ = common.load_model(str(root / "sft"))
    assert torch.equal(rm.reference.layers[0].feed_forward.w2.weight, sft.layers[0].feed_forward.w2.weight)
    assert not torch.equal(rm.backbone.layers[0].feed_forward.w2.weight, sft.layers[0].feed_forward.w2.weight)
    # the saved stats describe these weights: --eval_only on the same pairs gives the same accuracy
    again = reward.main(["--eval_only", "--init_from", str(out), "--val_data", str(root / "lab" / "prefs_val.jsonl")])
    assert again["accuracy"] == pytest.approx(m["accuracy"], abs=1e-9)
    critic = rm.as_critic()
    assert critic.head is not None and torch.count_nonzero(critic.head.weight) == 0
    assert critic.backbone is rm.backbone and critic.backbone.output is None
    with pytest.raises(SystemExit, match="implicit_beta 0.5, this run asks for 0.2"):
        reward.main(["--init_from", str(out / "final.pt"), "--data", str(root / "lab" / "prefs_train.jsonl"),
                     "--out_dir", str(tmp_path / "other"), "--max_steps", "1", "--implicit_beta", "0.2"])
    with pytest.raises(SystemExit, match="lora_rank"):
        reward.main(["--init_from", str(root / "sft"), "--data", str(root / "lab" / "prefs_train.jsonl"),
                     "--out_dir", str(tmp_path / "lora"), "--max_steps", "1", "--implicit_beta", "0.2",
                     "--lora_rank", "4"])


def test_implicit_reward_in_bf16_autocast():
    """The GPU path on the CPU: under bf16 autocast the two language models compute the same function
    at the start (every reward exactly 0) and, once the policy moved, rewards close to float32's."""
    import common
    from common import encode_group
    from reward import score_groups
    from tokenizer import Tokenizer
    tok = Tokenizer()
    groups = [encode_group(tok, {"messages": [{"role": "user", "content": q}], "responses": a}, 128)
              for q, a in IMPLICIT_PAIRS]
    bf16 = common.autocast(torch.device("cpu"), torch.bfloat16)
    local = common.DistInfo()
    zero = score_groups(_implicit_rm(moved=False), groups, 8, tok.pad_id, local, bf16)
    assert all(r == 0.0 for g in zero for r in g)
    rm = _implicit_rm(beta=0.3)
    low = [r for g in score_groups(rm, groups, 8, tok.pad_id, local, bf16) for r in g]
    full = [r for g in score_groups(rm, groups, 8, tok.pad_id, local, contextlib.nullcontext()) for r in g]
    assert low != full                                              # bf16 really ran
    scale = max(abs(x) for x in full)
    assert max(abs(a - b) for a, b in zip(low, full)) < 0.1 * scale


def test_implicit_ddp_matches_one_process_and_resume_is_exact(lab_files, tmp_path):
    """--implicit_beta under DDP: 2 ranks x 1 micro-batch take the same steps as 1 process x 2
    accumulated micro-batches (the frozen reference gets no gradient and no all-reduce); a run resumed
    from its step-3 checkpoint (policy, reference and optimizer) ends with the same weights, bit for bit;
    --parallel fsdp is refused with a message."""
    import common
    import reward
    root, _ = lab_files
    errors = _one_resumed_and_distributed(root, tmp_path, ["--implicit_beta", "0.5"], ("ddp",))
    assert not errors, "\n".join(errors)
    with pytest.raises(SystemExit, match="implicit_beta.*fsdp"):
        reward.main(["--init_from", str(root / "sft"), "--data", str(tmp_path / "train.jsonl"), "--out_dir",
                     str(tmp_path / "fsdp"), "--max_steps", "1", "--implicit_beta", "0.5", "--parallel", "fsdp"])
    final = lambda d: reward.load_reward_model(common.checkpoint_path(str(tmp_path / d), "final"))[0]   # noqa: E731
    one, resumed, ddp = final("one").state_dict(), final("resumed").state_dict(), final("ddp").state_dict()
    assert all(torch.equal(one[k], v) for k, v in resumed.items())
    sft, _ = common.load_model(str(root / "sft"))
    moved = max((one["backbone." + k] - v).abs().max().item() for k, v in sft.state_dict().items())
    assert moved > 1e-3                                                    # it trained ...
    assert all(torch.equal(one["reference." + k], v) for k, v in sft.state_dict().items())   # ... not the reference
    assert max((one[k] - v).abs().max().item() for k, v in ddp.items()) < 1e-5
