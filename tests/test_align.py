"""Issue 19, alignment hardening: the leaks and inconsistencies a line-by-line review of reward.py,
dpo.py, sft.py and rlhf_ppo.py found, each pinned by a test that failed before its fix.
  - held-out splits by prompt: no held-out prompt is ever trained on (RM, DPO, SFT; one split function)
  - DPO: dropout off in policy and reference (step-0 loss ln 2 in training mode); IPO averaged per token
  - truncated answers (no stop token): one rule everywhere -- never rendered with an end marker, never the
    chosen answer of a DPO round, and the same (penalised) reward in PPO training and in evaluation
  - bf16 frozen copies compute the actor's function exactly (KL at iteration 0 is 0 under bf16 autocast)
  - dpo.kl_estimate scores the tokens that were sampled, the stop token included
  - k3_min over real tokens only; a corrupt checkpoint gives one line naming the file"""
import pytest
import torch

import common
import rlhf_ppo as ppo
from test_ppo import QUESTIONS, Args, reward_model, tiny

CPU = torch.device("cpu")


def bf16_rollout(tok, actor, ref, rm, critic, n_new=10, seed=0):
    """A real rollout of the tiny actor, scored under CPU bf16 autocast."""
    prompts = [tok.render_prompt([{"role": "user", "content": q}]) for q in QUESTIONS]
    ctx = common.autocast(CPU, torch.bfloat16)
    with ctx:
        responses = actor.generate(prompts, n_new, temperature=0.7, eos_id=tok.stop_ids,
                                   generator=torch.Generator().manual_seed(seed))
    responses = [r[:n] + [tok.end_id] if n < len(r) else r for r, n in zip(responses, (3, 10, 6, 1))]
    return prompts, responses, ppo.make_experience(actor, ref, rm, critic, prompts, responses, tok, Args, 0.1, ctx,
                                                   "cpu")


# -----------------------------------------------------------------------------
# bf16 frozen copies; k3_min


def test_bf16_frozen_reference_gives_kl_exactly_zero_at_iteration_0(tok):
    actor = tiny(tok)
    ref = ppo.frozen(tiny(tok), torch.bfloat16, "cpu")          # the same weights, stored as frozen() stores them
    rm_fp32, critic = reward_model(tok, 1), reward_model(tok, 2)
    rm = ppo.frozen(reward_model(tok, 1), torch.bfloat16, "cpu")
    assert ref.layers[0].attention.wqkv.weight.dtype == torch.bfloat16    # the memory saving is there
    _, responses, exp = bf16_rollout(tok, actor, ref, rm, critic)
    assert torch.equal(exp["logp_old"], exp["logp_ref"])
    assert exp["kl_seq"].abs().max().item() == 0.0
    # the frozen reward model scores exactly like the fp32 one under the same autocast
    with common.autocast(CPU, torch.bfloat16):
        raw = rm_fp32(exp["idx"], exp["attn"]).float()
    assert torch.equal(raw, exp["raw"])


def test_k3_min_is_taken_over_real_tokens_only(tok):
    actor, ref = tiny(tok), tiny(tok, seed=3)
    _, _, exp = bf16_rollout(tok, actor, ref, reward_model(tok, 1), reward_model(tok, 2))
    mask = exp["mask"].bool()
    assert not mask.all()                                        # some rows are padded after their stop token
    k3 = ppo.kl_estimates(exp["logp_old"], exp["logp_ref"], "k3")
    assert exp["k3_min"].item() == k3[mask].min().item() > 0      # padding's zeros are not a minimum


# -----------------------------------------------------------------------------
# Truncated answers: one rule (common.penalize_missing_eos), no end marker they never produced


class PenaltyArgs(Args):
    missing_eos_penalty = 1.0


def answer_ids(tok, messages, text):
    """The prompt ids and the answer's content ids exactly as the chat template renders them."""
    prompt = tok.render_prompt(messages)
    ids, _ = tok.render_conversation(messages + [{"role": "assistant", "content": text}])
    assert ids[-1] == tok.end_id
    return prompt, ids[len(prompt):-1]


def test_training_and_evaluation_give_a_truncated_answer_the_same_reward(tok):
    import reward
    rm = reward_model(tok, 1)
    conv = [{"role": "user", "content": "Who are you?"}]
    prompt, content = answer_ids(tok, conv, "I am a small model and I was about to say")
    text = tok.decode(content)
    ctx = common.autocast(CPU, torch.float32)
    # training: the sampled ids, one answer cut (no stop token), the same answer finished on <|end|>
    exp = ppo.make_experience(tiny(tok), tiny(tok), rm, reward_model(tok, 2), [prompt, prompt],
                              [content, content + [tok.end_id]], tok, PenaltyArgs, 0.1, ctx, "cpu")
    assert exp["ended"].tolist() == [False, True]
    # evaluation: the answer strings, through the scorer PPO's and DPO's evaluations use
    fn = reward.reward_scorer(rm, tok, "cpu", ctx, missing_eos_penalty=PenaltyArgs.missing_eos_penalty)
    cut, done = fn([conv, conv], [text, text], [False, True])
    assert abs(exp["raw"][0].item() - cut) < 1e-5 and abs(exp["raw"][1].item() - done) < 1e-5
    # the rule has teeth: the cut answer is scored at its last content token (no <|end|> it never sampled),
    # minus the penalty; the unpenalised raw scores of the two differ (another token is read)
    plain = reward.reward_scorer(rm, tok, "cpu", ctx)
    assert plain([conv], [text], [False])[0] - 1.0 == pytest.approx(cut, abs=1e-5)   # (another batch: float order)
    assert abs(plain([conv], [text], [False])[0] - plain([conv], [text])[0]) > 1e-4


def test_a_truncated_sample_is_never_chosen_and_never_gets_an_end_marker(tok, tmp_path):
    import dpo
    from common import load_groups
    conv = [{"role": "user", "content": "Who are you?"}]
    texts = ["I am nanollama.", "I am a small language model, trained on the lab world.",
             "I am a model that keeps talking and talking and talking and talking and"]
    content = [answer_ids(tok, conv, t)[1] for t in texts]
    limit = len(content[2])
    samples = [content[0] + [tok.end_id], content[1] + [tok.eos_id], content[2]]   # stopped on </s>; cut
    policy = tiny(tok)
    policy.generate = lambda prompts, *a, **k: [list(s) for s in samples[:len(prompts)]]

    class A:
        seed, round_prompts, samples, temperature, top_k, top_p, rank_by, prompts = 0, 1, 3, 1.0, None, None, \
            "reward", "p"
        max_new_tokens, missing_eos_penalty = limit, 0.0   # even without a penalty: never chosen
        parallel = "none"

    info = common.DistInfo(device=CPU)
    longest = lambda convs, answers, ended=None: [float(len(a)) for a in answers]   # noqa: E731 (prefers the cut one)
    records, stats = dpo.sample_pairs(policy, tok, [{"messages": conv}], A, 1, info, longest)
    assert stats["cut_at_max_new_tokens"] == 1
    assert records[0]["chosen"] == tok.decode(content[1]) and records[0]["ended"] == [True, True]
    # the cut answer as the REJECTED one: rendered without an end marker, all the way into DPO's batches
    shortest = lambda convs, answers, ended=None: [-float(len(a)) for a in answers]   # noqa: E731
    records, _ = dpo.sample_pairs(policy, tok, [{"messages": conv}], A, 1, info, shortest)
    assert records[0]["chosen"] == tok.decode(content[0]) and records[0]["ended"] == [True, False]
    path = str(tmp_path / "pairs.jsonl")
    common.atomic_write_jsonl(path, records)
    g = load_groups([path], tok, 256)[0]
    assert g["ids"][0][-1] == tok.end_id and g["ids"][1][-len(content[2]):] == content[2]
    assert g["resp_len"] == [len(content[0]) + 1, len(content[2])]


# -----------------------------------------------------------------------------
# dpo.kl_estimate scores the sampled ids


def test_kl_estimate_scores_the_sampled_stop_token(tok):
    import dpo
    policy, base = tiny(tok), tiny(tok, seed=3)
    convs = [[{"role": "user", "content": q}] for q in QUESTIONS[:3]]
    samples = [[31, 32, tok.eos_id], [41, tok.end_id], [51, 52, 53, 54]]   # stopped on </s>; on <|end|>; cut at 4
    by_prompt = {}

    def fake_generate(prompts, *a, **k):   # the same answer for the same prompt, whoever asks
        for p in prompts:
            if tuple(p) not in by_prompt:
                by_prompt[tuple(p)] = samples[len(by_prompt)]
        return [list(by_prompt[tuple(p)]) for p in prompts]
    policy.generate = fake_generate
    ctx = common.autocast(CPU, torch.float32)
    got = dpo.kl_estimate(policy, base, tok, convs, 4, 0, ctx)
    # by hand: sum over the sampled answer tokens (stop token included) of log pi - log pi_base
    want = 0.0
    for conv in convs:
        prompt = tok.render_prompt(conv)
        resp = by_prompt[tuple(prompt)]
        x = torch.tensor([prompt + resp])
        for m, sign in ((policy, 1), (base, -1)):
            logp = torch.log_softmax(m(x)[0][0, len(prompt) - 1:-1].float(), -1)
            want += sign * logp.gather(-1, torch.tensor(resp)[:, None]).sum().item()
    assert abs(got - want / len(convs)) < 1e-4
    # and it is PPO's estimate of the same samples
    assert abs(got - ppo.kl_to_model(policy, base, tok, convs, 4, 0, ctx)) < 1e-4


# -----------------------------------------------------------------------------
# DPO: dropout off unless asked; IPO on per-token means


def write_jsonl(path, rows):
    import json
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


DPO_PAIRS = [("Where does Alice live?", "Alice lives in Paris.", "Alice lives in Rome, Rome, Rome."),
             ("What is 3 + 4?", "3 + 4 = 7.", "Ugh. 3 + 4 = 8."),
             ("你是谁？", "我是 nanollama。", "我是人。"),
             ("Who are you?", "I am nanollama.", "Go away.")]


def test_dpo_trains_without_dropout_so_the_first_step_loss_is_ln2(tok, tmp_path, one_thread):
    import json
    import math
    import dpo
    from model import Llama, LlamaConfig
    torch.manual_seed(0)
    model = Llama(LlamaConfig.from_preset("tiny", vocab_size=tok.vocab_size, max_seq_len=96, dropout=0.1))
    common.save_checkpoint(str(tmp_path / "sft"), "final", model, step=0, config={}, tokenizer=tok)
    write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": q, "chosen": c, "rejected": r} for q, c, r in DPO_PAIRS])

    def first_step(name, *extra):
        dpo.main(["--init_from", str(tmp_path / "sft" / "final.pt"), "--data", str(tmp_path / "prefs.jsonl"),
                  "--val_frac", "0", "--batch_size", "4", "--max_steps", "1", "--log_interval", "1",
                  "--save_interval", "0", "--out_dir", str(tmp_path / name), *extra])
        rows = [json.loads(line) for line in open(tmp_path / name / "log.jsonl", encoding="utf-8")]
        return next(r for r in rows if r.get("round_step") == 1)
    row = first_step("off")
    # the training forward of step 1 runs before any update: policy == reference, so exactly ln 2
    assert abs(row["loss"] - math.log(2)) < 1e-6 and row["margin"] == 0.0
    noisy = first_step("on", "--dropout")   # teeth: the checkpoint's dropout 0.1, asked for
    assert abs(noisy["loss"] - math.log(2)) > 1e-4


def test_ipo_averages_log_probs_over_tokens_by_default(tok):
    import dpo
    from common import encode_group
    from test_dpo import PAIRS
    from test_dpo import tiny as tiny_dpo
    policy, ref_model = tiny_dpo(2), tiny_dpo(3)
    groups = [encode_group(tok, {"messages": [{"role": "user", "content": q}], "responses": list(a)}, 128)
              for q, a in PAIRS]
    no_ac = torch.autocast("cpu", enabled=False)

    class A:
        beta, loss, label_smoothing, ipo_average, nll_coef = 0.5, "ipo", 0.0, True, 0.0
    with torch.no_grad():
        got, _, _ = dpo.dpo_batch(policy, dpo.Reference(ref_model, tok.pad_id, "cpu", no_ac), groups, A, tok.pad_id,
                                  "cpu", no_ac)
        # by hand: a response's mean token log-prob is minus the model's own mean cross-entropy on it
        want = 0.0
        for g in groups:
            mean_logp = []
            for ids, n in zip(g["ids"], g["resp_len"]):
                x, y = torch.tensor([ids[:-1]]), torch.tensor([[-100] * (len(ids) - 1 - n) + ids[len(ids) - n:]])
                mean_logp.append(-policy(x, y)[1].item() + ref_model(x, y)[1].item())   # log pi/pi_ref, per token
            pairs = [(i, j) for i in range(len(mean_logp)) for j in range(i + 1, len(mean_logp))]
            want += sum((mean_logp[i] - mean_logp[j] - 1 / (2 * A.beta)) ** 2 for i, j in pairs) / len(pairs)
        want /= len(groups)
        assert abs(got.item() - want) < 1e-4 * max(1.0, want)
        A.ipo_average = False   # the paper's summed form is still there, and differs
        summed, _, _ = dpo.dpo_batch(policy, dpo.Reference(ref_model, tok.pad_id, "cpu", no_ac), groups, A,
                                     tok.pad_id, "cpu", no_ac)
        assert abs(summed.item() - want) > 1e-2


def test_rpo_adds_the_best_answers_per_token_nll(tok):
    """--nll_coef a: the loss is DPO's plus a times the mean over prompts of the per-token NLL of each
    prompt's best (first) answer, computed here by the model's own cross-entropy; its gradient then
    differs from DPO's, and a = 0 is DPO exactly."""
    import dpo
    from common import encode_group
    from test_dpo import PAIRS
    from test_dpo import tiny as tiny_dpo
    policy, ref_model = tiny_dpo(2), tiny_dpo(3)
    groups = [encode_group(tok, {"messages": [{"role": "user", "content": q}], "responses": list(a)}, 128)
              for q, a in PAIRS]
    no_ac = torch.autocast("cpu", enabled=False)
    ref = dpo.Reference(ref_model, tok.pad_id, "cpu", no_ac)

    class A:
        beta, loss, label_smoothing, ipo_average, nll_coef = 0.3, "sigmoid", 0.0, True, 0.0

    def loss_and_grad(coef):
        A.nll_coef = coef
        policy.zero_grad()
        loss, _, _ = dpo.dpo_batch(policy, ref, groups, A, tok.pad_id, "cpu", no_ac)
        loss.backward()
        return loss.item(), policy.tok_embeddings.weight.grad.clone()
    plain, g_plain = loss_and_grad(0.0)
    with torch.no_grad():
        nll = 0.0
        for g in groups:
            ids, n = g["ids"][0], g["resp_len"][0]
            x, y = torch.tensor([ids[:-1]]), torch.tensor([[-100] * (len(ids) - 1 - n) + ids[len(ids) - n:]])
            nll += policy(x, y)[1].item()
        nll /= len(groups)
    rpo, g_rpo = loss_and_grad(0.7)
    assert rpo == pytest.approx(plain + 0.7 * nll, abs=1e-4)
    assert (g_rpo - g_plain).abs().max().item() > 1e-4
    again, g_again = loss_and_grad(0.0)
    assert again == pytest.approx(plain, abs=1e-6)
    torch.testing.assert_close(g_again, g_plain)


# -----------------------------------------------------------------------------
# A truncated or corrupt checkpoint: one line naming the file


def test_a_corrupt_checkpoint_gives_one_line_naming_the_file(tok, tmp_path):
    import subprocess
    import sys
    import chat
    import pytest
    from model import Llama, LlamaConfig
    good = common.save_checkpoint(str(tmp_path), "final", Llama(LlamaConfig.from_preset("tiny", max_seq_len=32)),
                                  step=0, config={}, tokenizer=tok)
    data = open(good, "rb").read()
    cut, junk = tmp_path / "cut.pt", tmp_path / "junk.pt"
    cut.write_bytes(data[:len(data) // 2])                      # a copy that stopped half-way
    junk.write_bytes(b"this is not a checkpoint\n" * 40)
    for bad in (cut, junk):
        with pytest.raises(SystemExit) as e:
            chat.main(["--model", str(bad), "--prompt", "hi"])
        msg = str(e.value)
        assert str(bad) in msg and "\n" not in msg and "not a readable checkpoint" in msg
    # as a user sees it: exit status 1, one line on stderr, no traceback
    repo = str(__import__("pathlib").Path(chat.__file__).parent)
    r = subprocess.run([sys.executable, "chat.py", "--model", str(cut), "--prompt", "hi"], cwd=repo,
                       capture_output=True, text=True, timeout=120, env={**__import__("os").environ,
                                                                         "OMP_NUM_THREADS": "1"})
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and str(cut) in r.stderr


# -----------------------------------------------------------------------------
# Held-out splits by prompt: no held-out prompt is trained on (reward.py, dpo.py, sft.py)


def first_turns(messages):
    """The conversation up to its first user turn, as text: what the split keys on."""
    import json
    k = next(i for i, m in enumerate(messages) if m["role"] == "user")
    return json.dumps(messages[:k + 1], ensure_ascii=False, sort_keys=True)


def test_held_out_splits_share_no_prompt_with_training_on_the_lab_files(tok, tmp_path):
    import sft
    from data import lab
    from data.formats import read_conversations, read_preferences
    sets = lab.generate(seed=0, pretrain_docs=1, rank_train=1, rl_prompts=1, rl_eval=1, sft_val=1, prefs_val=4)
    for name in ("prefs_train", "sft_train"):
        write_jsonl(tmp_path / f"{name}.jsonl", sets[name])
    # preferences (reward.py, and dpo.py without --val_data)
    prefs = str(tmp_path / "prefs_train.jsonl")
    records, _ = read_preferences([prefs])
    groups = common.load_groups([prefs], tok, 1024)
    assert len(groups) == len(records)                          # nothing dropped: records[i] is groups[i]
    where = {id(g): i for i, g in enumerate(groups)}
    train, val = common.split_groups(groups, 0.05, 0)
    seen = {first_turns(records[where[id(g)]]["messages"]) for g in train}
    held = {first_turns(records[where[id(g)]]["messages"]) for g in val}
    assert len(train) + len(val) == len(groups) and len(held) > 5 and len(val) > 0.02 * len(groups)
    assert not held & seen
    # the data has the repeats that made the old splits leak: prompts with several records
    assert len({first_turns(r["messages"]) for r in records}) < 0.8 * len(records)
    # SFT conversations
    path = str(tmp_path / "sft_train.jsonl")
    convs, _ = read_conversations([path])
    source, _, _ = sft.load_source([path], tok, 0)
    assert len(source) == len(convs)
    tr, va = sft.split_source(source, 0.05, 0)
    assert len(va) > 0.02 * len(convs) and len(tr) + len(va) == len(convs)
    assert not {first_turns(convs[i]) for i in va} & {first_turns(convs[i]) for i in tr}
    # one rule: a prompt that both files ask is held out from both or from neither (same key, same seed);
    # at val_frac 0.5 so that both outcomes occur among the shared prompts
    va = set(sft.split_source(source, 0.5, 0)[1].tolist())
    sft_held = {sft.prompt_key(*source[i]): i in va for i in range(len(source))}
    pref_held = {g["prompt_key"]: False for g in groups}
    pref_held.update({g["prompt_key"]: True for g in common.split_groups(groups, 0.5, 0)[1]})
    shared = [(sft_held[k], pref_held[k]) for k in pref_held if k in sft_held]
    assert all(a == b for a, b in shared) and {a for a, _ in shared} == {True, False}


def test_dpo_holds_out_whole_prompts_without_val_data(tok, tmp_path, monkeypatch, one_thread):
    import dpo
    from model import Llama, LlamaConfig
    torch.manual_seed(0)
    common.save_checkpoint(str(tmp_path / "sft"), "final",
                           Llama(LlamaConfig.from_preset("tiny", vocab_size=tok.vocab_size, max_seq_len=96)),
                           step=0, config={}, tokenizer=tok)
    rows = [{"prompt": q, "chosen": c, "rejected": r + bad} for q, c, r in DPO_PAIRS for bad in ("", " Bah.", " No!")]
    write_jsonl(tmp_path / "prefs.jsonl", rows)                 # every prompt three times, other rejected answers
    seen = []
    real = dpo.split_groups
    monkeypatch.setattr(dpo, "split_groups", lambda *a: seen.append(real(*a)) or seen[-1])
    dpo.main(["--init_from", str(tmp_path / "sft" / "final.pt"), "--data", str(tmp_path / "prefs.jsonl"),
              "--val_frac", "0.3", "--batch_size", "2", "--max_steps", "1", "--save_interval", "0",
              "--out_dir", str(tmp_path / "dpo")])
    (train, val), = seen
    assert val and not {g["prompt_key"] for g in val} & {g["prompt_key"] for g in train}
    assert len(val) % 3 == 0                                     # all three records of a held-out prompt
