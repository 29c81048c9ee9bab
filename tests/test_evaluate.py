"""evaluate.py: log-likelihood scoring against a brute-force per-token sum, acc_norm vs byte lengths,
the exact few-shot prompts of every task, GSM8K answer extraction, rolling perplexity windows, bad
input, 2-process sharding == one process, and a model built to always answer "A"."""
import gzip
import json
import math
import os
import subprocess
import sys
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

import evaluate as ev
from model import Llama, LlamaConfig

from conftest import REPO


def tiny_model(tok, max_seq_len=256, seed=0):
    torch.manual_seed(seed)
    model = Llama(LlamaConfig(vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                              max_seq_len=max_seq_len))
    return model.eval()


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")


# -----------------------------------------------------------------------------
# Scoring


def brute_force(model, ctx, cont):
    """log p(cont | ctx) one token at a time, each from its own forward of the prefix (lm-eval's window:
    the last max_seq_len + 1 tokens)."""
    window = (ctx + cont)[-(model.config.max_seq_len + 1):]
    total, greedy = 0.0, True
    with torch.no_grad():
        for j, t in enumerate(cont):
            prefix = window[:len(window) - len(cont) + j]
            logp = model(torch.tensor([prefix]))[0][0, -1].log_softmax(-1)
            total += logp[t].item()
            greedy &= int(logp.argmax()) == t
    return total, greedy


def test_loglikelihood_equals_brute_force_sum(tok, one_thread):
    model = tiny_model(tok, max_seq_len=32)
    ctx = tok.encode("The following are questions.\nAnswer:", bos=True)
    with torch.no_grad():
        best = int(model(torch.tensor([ctx]))[0][0, -1].argmax())
    requests = [(ctx, [tok.encode(" A")[-1]]), (ctx, [tok.encode(" B")[-1]]),    # share one forward row
                (ctx, tok.encode(" a longer continuation")), (ctx, [best]),          # [best]: greedy
                (tok.encode("x" * 80, bos=True), tok.encode(" truncated on the left")),  # > max_seq_len
                ([tok.bos_id], tok.encode("hello"))]
    expected = [brute_force(model, c, t) for c, t in requests]
    for batch_size in (1, 3, 16):
        got = ev.loglikelihoods(model, requests, batch_size=batch_size)
        for (lp, greedy), (want_lp, want_greedy) in zip(got, expected):
            assert lp == pytest.approx(want_lp, abs=1e-4)
            assert greedy == want_greedy
    assert got[3][1] is True


def test_encode_pair_moves_trailing_space_into_the_continuation(tok):
    ctx, cont = ev.encode_pair(tok, "Question: why?\nAnswer: ", "because")
    assert ctx == tok.encode("Question: why?\nAnswer:", bos=True)
    assert ctx + cont == tok.encode("Question: why?\nAnswer: because", bos=True)


def test_acc_norm_divides_by_characters_and_acc_bytes_by_utf8_bytes():
    # "甲乙" is 2 characters but 6 bytes: per character -1.0 < -0.75, per byte -0.33 > -0.75.
    m = ev.mc_metrics([-2.0, -3.0], ["甲乙", "abcd"], gold=0)
    assert m == {"acc": 1.0, "acc_norm": 0.0, "acc_bytes": 1.0}
    m = ev.mc_metrics([-2.0, -3.0], ["甲乙", "abcd"], gold=1)
    assert m == {"acc": 0.0, "acc_norm": 1.0, "acc_bytes": 0.0}
    # ties go to the first choice (numpy argmax)
    assert ev.mc_metrics([-1.0, -1.0], ["x", "y"], gold=0)["acc"] == 1.0


def test_stderr_formulas():
    xs = [1.0, 0.0, 1.0, 1.0]
    mu = 0.75
    assert ev.mean_stderr(xs) == pytest.approx(math.sqrt(sum((x - mu) ** 2 for x in xs) / 3) / 2)
    assert ev.mean_stderr([1.0]) is None
    # the pooled stderr of two groups equals the plain stderr of their concatenation when the group
    # means are equal (lm-eval's formula is exact in that case)
    a, b = [1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0, 1.0, 0.0]
    pooled = ev.pooled_stderr([ev.mean_stderr(a), ev.mean_stderr(b)], [4, 6])
    assert pooled == pytest.approx(math.sqrt(((3 * ev.mean_stderr(a) ** 2 * 4) + (5 * ev.mean_stderr(b) ** 2 * 6))
                                             / 8 / 10))


# -----------------------------------------------------------------------------
# Prompts


def prompt_of(data_dir, task, index, shots):
    items, pool, exclude_self = ev.load_task(task, str(data_dir))
    item = items[index]
    return ev.build_context(item, ev.fewshot_examples(item, shots, pool, exclude_self)), item


def test_fewshot_prompts_are_byte_identical_to_lm_eval_format(tmp_path):
    d = tmp_path
    write_jsonl(d / "mmlu_test.jsonl", [
        {"question": " Which gas is inert? ", "A": "O2", "B": "N2", "C": "CO2", "D": "He", "answer": "D",
         "subject": "high_school_chemistry"}])
    write_jsonl(d / "mmlu_dev.jsonl", [
        {"question": "Other subject", "A": "1", "B": "2", "C": "3", "D": "4", "answer": "A", "subject": "virology"},
        {"question": "2+2=?", "A": "3", "B": "4", "C": "5", "D": "6", "answer": "B", "subject": "high_school_chemistry"},
        {"question": "1+1=?", "A": "2", "B": "3", "C": "4", "D": "5", "answer": "A", "subject": "high_school_chemistry"}])
    prompt, item = prompt_of(d, "mmlu", 0, shots=2)
    assert prompt == ("The following are multiple choice questions (with answers) about high school chemistry.\n\n"
                      "2+2=?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer: B\n\n"
                      "1+1=?\nA. 2\nB. 3\nC. 4\nD. 5\nAnswer: A\n\n"
                      "Which gas is inert?\nA. O2\nB. N2\nC. CO2\nD. He\nAnswer:")
    assert item["choices"] == ["A", "B", "C", "D"] and item["gold"] == 3

    write_jsonl(d / "cmmlu_test.jsonl", [{"": "0", "Question": "哪个朝代最早？", "A": "唐", "B": "商", "C": "宋",
                                          "D": "明", "Answer": "B", "subject": "chinese_history"}])
    write_jsonl(d / "cmmlu_dev.jsonl", [{"": "0", "Question": "秦始皇统一了？", "A": "中国", "B": "欧洲", "C": "美洲",
                                         "D": "非洲", "Answer": "A", "subject": "chinese_history"}])
    prompt, _ = prompt_of(d, "cmmlu", 0, shots=1)
    assert prompt == ("以下是关于中国历史的单项选择题，请直接给出正确答案的选项。\n\n"
                      "秦始皇统一了？\nA. 中国\nB. 欧洲\nC. 美洲\nD. 非洲\n答案： A\n\n"
                      "哪个朝代最早？\nA. 唐\nB. 商\nC. 宋\nD. 明\n答案：")

    write_jsonl(d / "ceval_val.jsonl", [{"id": "0", "question": "税法的原则是____。", "A": "甲", "B": "乙", "C": "丙",
                                         "D": "丁", "answer": "C", "subject": "law"}])
    write_jsonl(d / "ceval_dev.jsonl", [{"id": "0", "question": "法律是？", "A": "规则", "B": "建议", "C": "习惯",
                                         "D": "道德", "answer": "A", "explanation": "1. 因为……", "subject": "law"}])
    prompt, _ = prompt_of(d, "ceval", 0, shots=1)
    assert prompt == ("以下是中国关于法学的单项选择题，请选出其中的正确答案。\n\n"
                      "法律是？\nA. 规则\nB. 建议\nC. 习惯\nD. 道德\n答案： A\n\n"
                      "税法的原则是____。\nA. 甲\nB. 乙\nC. 丙\nD. 丁\n答案：")

    arc = [{"id": f"q{i}", "question": {"stem": f"Stem {i}?", "choices": [
        {"text": f"yes {i}", "label": "A"}, {"text": f"no {i}", "label": "B"}]}, "answerKey": "B"} for i in range(3)]
    write_jsonl(d / "arc_challenge_test.jsonl", arc)
    prompt, item = prompt_of(d, "arc_challenge", 1, shots=2)   # no train file: the others, first in file order
    assert prompt == "Question: Stem 0?\nAnswer: no 0\n\nQuestion: Stem 2?\nAnswer: no 2\n\nQuestion: Stem 1?\nAnswer:"
    assert item["choices"] == ["yes 1", "no 1"] and item["gold"] == 1

    write_jsonl(d / "hellaswag_val.jsonl", [
        {"ind": 1, "activity_label": "Travel", "ctx_a": "[header] How to pack [title] Fold the shirts. [step] "
         "Lay  them flat.", "ctx_b": "", "endings": ["Roll them [substeps] tight.", "Stack them.", "x", "y"],
         "label": 0, "split": "val"},
        {"ind": 2, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
         "endings": ["a", "b", "c", "d"], "label": "3"}])
    prompt, item = prompt_of(d, "hellaswag", 0, shots=0)
    assert prompt == "Travel: How to pack. Fold the shirts. Lay them flat."
    assert item["choices"] == ["Roll them tight.", "Stack them.", "x", "y"]
    prompt, item = prompt_of(d, "hellaswag", 1, shots=0)
    assert prompt == "Roof shingle removal: A man is sitting on a roof. He" and item["gold"] == 3

    write_jsonl(d / "gsm8k_test.jsonl", [
        {"question": "How many legs do 2 cats have?", "answer": "Each has 4.\n2*4=<<2*4=8>>8\n#### 8"},
        {"question": "What is 1,000 + 1?", "answer": "1,000 + 1 = 1,001\n#### 1,001"}])
    prompt, item = prompt_of(d, "gsm8k", 0, shots=1)
    assert prompt == ("Question: What is 1,000 + 1?\nAnswer: 1,000 + 1 = 1,001\n#### 1,001\n\n"
                      "Question: How many legs do 2 cats have?\nAnswer:")
    assert item["gold"] == "8"


# -----------------------------------------------------------------------------
# GSM8K extraction


@pytest.mark.parametrize("generation, strict, flexible", [
    (" She makes 9 * 2 = $18.\n#### 18", "18", "18"),
    (" The total is 1,450,000 dollars.\n#### 1,450,000", "1450000", "1450000"),
    (" It drops to -5 degrees.\n#### -5", "-5", "-5"),
    (" 3 apples and 4 pears make 7 fruits.", "[invalid]", "7"),           # several numbers: the last
    (" The answer is $1,200.", "[invalid]", "1200"),                      # "$", comma and trailing "."
    (" I do not know.", "[invalid]", "[invalid]"),                         # no number at all
    (" #### 12 but later 13", "12", "13"),
    (" Costs 5.50 each", "[invalid]", "5.50"),
])
def test_gsm8k_extraction(generation, strict, flexible):
    assert ev.extract_gsm8k(generation) == (strict, flexible)


def test_gsm8k_reference_normalisation():
    assert ev.normalize_gsm8k("Work.\n2 * 3 = 6\n#### 1,450,000") == "1450000"
    assert ev.normalize_gsm8k("x\n#### -3") == "-3"


# -----------------------------------------------------------------------------
# Perplexity


def test_rolling_windows_cover_every_token_once(tok, one_thread):
    ids = list(range(3, 3 + 21))
    windows = ev.rolling_windows(ids, prefix=1, max_len=8)
    assert [t for _, cont in windows for t in cont] == ids
    assert windows[0][0] == [1]                                         # the first token is predicted after BOS
    for ctx, cont in windows:
        assert len(ctx) + len(cont) - 1 <= 8                           # the model reads at most max_len tokens
    # a document that fits one window: bits per byte is -log2 p(document) / bytes, by brute force
    model = tiny_model(tok, max_seq_len=64)
    text = "The cat sat on the mat. 猫坐在垫子上。"
    doc = tok.encode(text)
    (ctx, cont), = ev.rolling_windows(doc, tok.bos_id, 64)
    (lp, _), = ev.loglikelihoods(model, [(ctx, cont)])
    want = brute_force(model, [tok.bos_id], doc)[0]
    assert lp == pytest.approx(want, abs=1e-4)
    m = ev.perplexity_metrics([{"loglikelihood": lp, "tokens": len(doc), "bytes": len(text.encode()), "words": 9}])
    assert m["metrics"]["bits_per_byte"]["value"] == pytest.approx(-lp / len(text.encode()) / math.log(2))


# -----------------------------------------------------------------------------
# Bad input


def test_bad_records_are_skipped_with_file_and_line(tmp_path, tok, capsys, one_thread):
    good = {"question": "q?", "A": "a", "B": "b", "C": "c", "D": "d", "answer": "A", "subject": "virology"}
    write_jsonl(tmp_path / "mmlu_test.jsonl", [good, {k: v for k, v in good.items() if k != "C"},
                                               {**good, "answer": "E"}, "{not json", good])
    results, samples = ev.evaluate(tiny_model(tok), tok, ["mmlu"], data_dir=str(tmp_path), shots=0)
    err = capsys.readouterr().err
    path = str(tmp_path / "mmlu_test.jsonl")
    assert f"{path}:2: missing field 'C'" in err
    assert f"{path}:3: unknown answer letter 'E'" in err
    assert f"{path}:4: malformed JSON" in err
    assert results["mmlu"]["n"] == 2 and [s["where"] for s in samples] == [f"{path}:1", f"{path}:5"]

    write_jsonl(tmp_path / "mmlu_test.jsonl", [{**good, "answer": "Z"}])
    with pytest.raises(SystemExit, match="mmlu"):
        ev.evaluate(tiny_model(tok), tok, ["mmlu"], data_dir=str(tmp_path), shots=0)
    with pytest.raises(SystemExit, match="no gsm8k_test.jsonl"):
        ev.evaluate(tiny_model(tok), tok, ["gsm8k"], data_dir=str(tmp_path))
    with pytest.raises(SystemExit, match="unknown task"):
        ev.evaluate(tiny_model(tok), tok, ["mmlu_pro"], data_dir=str(tmp_path))


# -----------------------------------------------------------------------------
# A model that always answers "A"


def always_a_model(tok):
    """Every layer writes nothing into the residual stream, every token embeds to the same vector, and
    the output head gives the tokens that spell " A" (and only those) a large logit: whatever the
    prompt, " A" is the most likely letter."""
    model = tiny_model(tok, max_seq_len=2048)
    with torch.no_grad():
        for block in model.layers:
            block.attention.wo.weight.zero_()
            block.feed_forward.w2.weight.zero_()
        model.tok_embeddings.weight.zero_()
        model.tok_embeddings.weight[:, 0] = 1.0
        model.output.weight.zero_()
        for context in ("Answer:", "答案："):
            conts = {c: ev.encode_pair(tok, context, " " + c)[1] for c in "ABCD"}
            only_a = set(conts["A"]) - set(conts["B"]) - set(conts["C"]) - set(conts["D"])
            assert only_a
            for t in only_a:
                model.output.weight[t, 0] = 1.0
    return model


def test_model_that_always_answers_a_scores_the_share_of_a(tok, shared_data, one_thread):
    model = always_a_model(tok)
    results, _ = ev.evaluate(model, tok, ["mmlu", "cmmlu", "ceval"], data_dir=str(shared_data / "eval"), shots=0,
                             batch_size=32)
    for task, stem, key in (("mmlu", "mmlu_test", "answer"), ("cmmlu", "cmmlu_test", "Answer"),
                            ("ceval", "ceval_val", "answer")):
        with gzip.open(shared_data / "eval" / f"{stem}.jsonl.gz", "rt", encoding="utf-8") as f:
            rows = [json.loads(line) for line in f.read().split("\n") if line.strip()]
        share = sum(r[key] == "A" for r in rows) / len(rows)
        assert 0 < share < 1
        assert results[task]["n"] == len(rows)
        assert results[task]["metrics"]["acc"]["value"] == pytest.approx(share, abs=1e-12)
        assert results[task]["metrics"]["acc_norm"]["value"] == pytest.approx(share, abs=1e-12)


# -----------------------------------------------------------------------------
# Two processes == one


def _shard_worker(rank, store_path, queue, model, tok, kwargs):
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2,
                                timeout=timedelta(seconds=60))
        queue.put((rank, ev.evaluate(model, tok, **kwargs), None))
    except BaseException:
        queue.put((rank, None, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _strip_timing(results):
    return {t: {k: v for k, v in r.items() if k not in ("seconds", "items_per_s")} for t, r in results.items()}


def test_two_gloo_processes_give_the_single_process_results(tmp_path, tok, shared_data, one_thread):
    corpus = tmp_path / "corpus.jsonl"
    write_jsonl(corpus, [{"text": "A short document."}, {"text": "猫坐在垫子上。" * 30},
                         {"text": "Another one, longer than a window: " + "words " * 120}])
    model = tiny_model(tok, max_seq_len=128)
    kwargs = dict(tasks=["mmlu", "hellaswag", "gsm8k", "ppl"], data_dir=str(shared_data / "eval"), shots=1,
                  limit=7, batch_size=1, ppl_data=[str(corpus)], max_gen_toks=5)
    single = ev.evaluate(model, tok, **kwargs)
    ctx = torch.multiprocessing.get_context("fork")
    queue = ctx.SimpleQueue()
    procs = torch.multiprocessing.start_processes(_shard_worker, args=(str(tmp_path / "store"), queue, model, tok,
                                                                       kwargs), nprocs=2, start_method="fork",
                                                  join=False)
    outs = [queue.get() for _ in range(2)]
    procs.join()
    errors = [e for _, _, e in outs if e]
    assert not errors, "\n".join(errors)
    for _, (results, samples), _ in outs:
        assert _strip_timing(results) == _strip_timing(single[0])
        assert samples == single[1]
    assert single[0]["gsm8k"]["n"] == 7 and single[0]["ppl"]["n"] == 3


# -----------------------------------------------------------------------------
# The command line


def test_cli_writes_results_table_and_samples(tmp_path, tok):
    hf = tmp_path / "hf"
    tiny_model(tok).save_hf(str(hf), bos_id=tok.bos_id, eos_id=tok.eos_id)
    tok.save_hf(str(hf))
    out, log = tmp_path / "out", tmp_path / "samples.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "evaluate.py"), "--model", str(hf), "--tasks",
                           "arc_challenge,mmlu", "--limit", "3", "--shots", "1", "--out", str(out),
                           "--log_samples", str(log), "--device", "cpu"],
                          capture_output=True, text=True, env=env, timeout=120, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    # --limit counts per subject, as lm-eval's: the 4 MMLU subjects give 3 items each
    assert results["arc_challenge"]["n"] == 3 and results["mmlu"]["n"] == 12
    assert set(results["mmlu"]["subjects"]) == {"clinical_knowledge", "high_school_macroeconomics",
                                                "high_school_mathematics", "philosophy"}
    assert set(results["mmlu"]["metrics"]) == {"acc", "acc_norm", "acc_bytes"}
    assert "| arc_challenge | 1 | 3 | acc |" in (out / "results.md").read_text(encoding="utf-8")
    lines = [json.loads(x) for x in log.read_text(encoding="utf-8").splitlines()]
    assert len(lines) == 15 and all(len(s["loglikelihoods"]) == len(s["is_greedy"]) for s in lines)
    acc = sum(s["acc"] for s in lines if s["task"] == "arc_challenge") / 3
    assert results["arc_challenge"]["metrics"]["acc"]["value"] == pytest.approx(acc)


def test_chat_template_wraps_description_and_prompt(tmp_path, tok):
    write_jsonl(tmp_path / "mmlu_test.jsonl", [{"question": "Q?", "A": "a", "B": "b", "C": "c", "D": "d",
                                                "answer": "A", "subject": "virology"}])
    write_jsonl(tmp_path / "mmlu_dev.jsonl", [{"question": "R?", "A": "e", "B": "f", "C": "g", "D": "h",
                                               "answer": "B", "subject": "virology"}])
    items, pool, exclude_self = ev.load_task("mmlu", str(tmp_path))
    shots = ev.fewshot_examples(items[0], 1, pool, exclude_self)
    requests = ev.mc_requests(tok, items[0], shots, chat=True)
    # as lm-eval without fewshot_as_multiturn: description -> system, examples + question -> one user
    # turn, the generation prompt, then the bare letter (no " " before it)
    want_ctx = tok.render_prompt([
        {"role": "system", "content": "The following are multiple choice questions (with answers) about virology.\n\n"},
        {"role": "user", "content": "R?\nA. e\nB. f\nC. g\nD. h\nAnswer: B\n\nQ?\nA. a\nB. b\nC. c\nD. d\nAnswer:"}])
    assert [r[0] for r in requests] == [want_ctx] * 4
    assert [r[1] for r in requests] == [tok.encode(c) for c in "ABCD"]


def test_generation_stops_early_and_cuts_at_the_stop_string(tok, one_thread):
    model = tiny_model(tok, max_seq_len=128)
    prompts = [tok.encode(p, bos=True) for p in ("Question: 1+1?\nAnswer:", "Question: what is 2 x 3?\nAnswer:")]
    full = ev.generate_until(model, tok, prompts, max_gen_toks=40, stop=[])
    # a stop string each row writes early on: its first two generated characters
    stops = [text[:2] for text in full]
    assert all(len(s) == 2 for s in stops)
    steps = []
    original = model._decode_step
    model._decode_step = lambda *a, **k: (steps.append(1), original(*a, **k))[1]
    cut = ev.generate_until(model, tok, prompts, max_gen_toks=40, stop=stops)
    del model._decode_step
    for text, got in zip(full, cut):
        want = text
        for s in stops:
            want = want.split(s)[0]
        assert got == want
    assert len(steps) < 40 - 1   # the batch stopped once both rows held a stop string


def test_limit_keeps_the_whole_file_as_fewshot_pool(tmp_path):
    # lm-eval's --limit cuts the graded items, not the examples drawn from the same split
    write_jsonl(tmp_path / "gsm8k_test.jsonl", [{"question": f"q{i}", "answer": f"s{i}\n#### {i}"} for i in range(4)])
    items, pool, exclude_self = ev.load_task("gsm8k", str(tmp_path), limit=1)
    assert len(items) == 1 and exclude_self
    assert [x["query"] for x in ev.fewshot_examples(items[0], 3, pool, exclude_self)] == \
        ["Question: q1\nAnswer:", "Question: q2\nAnswer:", "Question: q3\nAnswer:"]


def test_empty_or_missing_choices_are_bad_items(tmp_path, capsys):
    good = {"ind": 1, "activity_label": "A", "ctx_a": "b", "ctx_b": "c", "endings": ["x", "y"], "label": 0}
    write_jsonl(tmp_path / "hellaswag_val.jsonl", [good, {**good, "endings": ["x", "[substeps]"]},
                                                    {**good, "endings": ["x", 3]}, {**good, "label": ""}])
    items, _, _ = ev.load_task("hellaswag", str(tmp_path))
    err = capsys.readouterr().err
    assert len(items) == 1
    for line in (2, 3):
        assert f"hellaswag_val.jsonl:{line}: choices must be non-empty strings" in err
    assert "hellaswag_val.jsonl:4: label '' is not an integer" in err
