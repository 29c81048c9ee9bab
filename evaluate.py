"""
evaluate.py -- the numbers the field reports (MMLU, CMMLU, C-Eval, ARC, HellaSwag, GSM8K, perplexity /
bits-per-byte), computed the way EleutherAI's lm-evaluation-harness (lm-eval 0.4.x) computes them, so
they can be put next to anyone else's.

Usage (--model: a run dir, one of our .pt checkpoints, or a HuggingFace LLaMA dir):
    python evaluate.py --model runs/pretrain --tasks mmlu,cmmlu,ceval,arc_challenge,hellaswag,gsm8k
    python evaluate.py --model hf_dir --tasks mmlu --shots 5 --limit 100 --batch_size 32 --out eval_out
    python evaluate.py --model runs/sft --tasks ceval --apply_chat_template   # prompts wrapped in the chat template
    python evaluate.py --model runs/pretrain --tasks ppl --ppl_data corpus.jsonl   # perplexity, bits per byte
    torchrun --standalone --nproc_per_node=8 evaluate.py --model ... --tasks ...  # items split across ranks
Writes OUT/results.json (per task: n, every metric and its stderr), OUT/results.md (a table), and with
--log_samples FILE every graded item as one JSON line.

Data: --data_dir holds <file>.jsonl or <file>.jsonl.gz in each benchmark's own field names (default:
../shared/data/eval, samples of each; its README lists the fields and licences):
    mmlu        mmlu_test + mmlu_dev          question, A, B, C, D, answer (letter), subject
    cmmlu       cmmlu_test + cmmlu_dev        Question, A, B, C, D, Answer (letter), subject
    ceval       ceval_val + ceval_dev         question, A, B, C, D, answer (letter), subject
    arc_challenge arc_challenge_test (+ _train)  question.stem, question.choices[{text, label}], answerKey
    hellaswag   hellaswag_val (+ _train)      activity_label, ctx_a, ctx_b, endings, label
    gsm8k       gsm8k_test (+ gsm8k_train)    question, answer ("... #### 42")

What is lm-eval's convention here (read from its task YAMLs and its HF backend):
  * multiple choice by log-likelihood: each option is a continuation " " + choice of the prompt; the
    pair is tokenized as lm-eval does (trailing spaces of the context move into the continuation; the
    continuation is the tail of encode(context + continuation) after encode(context); BOS first, as
    a HF LLaMA tokenizer adds it). acc = argmax of the summed log-probs; acc_norm = argmax of the
    sum divided by the choice's length in CHARACTERS (lm-eval's code: len(str)); acc_bytes = divided
    by its UTF-8 byte length (lm-eval's acc_bytes). They differ only where a choice has non-ASCII text.
  * MMLU: "The following are multiple choice questions (with answers) about <subject>.\n\n", then
    k solved dev examples of the same subject (the first k, in file order) separated by "\n\n", then
    "<question>\nA. ..\nB. ..\nC. ..\nD. ..\nAnswer:" and the continuations " A" .. " D". CMMLU and C-Eval
    are the same with lm-eval's Chinese headers and "答案：". The task score is the size-weighted mean over
    subjects, with lm-eval's pooled stderr.
  * ARC: "Question: <stem>\nAnswer:" + " <choice text>". HellaSwag: lm-eval's preprocessing (below) of
    "<activity_label>: <ctx_a> <Ctx_b>" + " <ending>". Both 0-shot by default.
  * GSM8K: k-shot "Question: <q>\nAnswer: <worked solution>" blocks, greedy decoding up to 256 tokens
    cut at "Question:", then two extractions: strict ("#### N") and flexible (the last number), exact
    match after removing ",", "$", everything up to "#### " and a trailing ".".
  * few-shot examples come from the task's dev/train file; a task without one (our samples of ARC,
    HellaSwag and GSM8K) takes the first k items of the evaluated file other than the item itself,
    which is what lm-eval's first_n sampler does when the few-shot split is the test split.
  * stderr: sample standard deviation / sqrt(n) (lm-eval's mean_stderr).
  * perplexity: lm-eval's rolling windows of max_seq_len tokens (the first one after a BOS prefix);
    word_perplexity, byte_perplexity and bits_per_byte = -sum(log p) / (bytes * ln 2), so models with
    different tokenizers compare. Scored: log p(document | BOS). (lm-eval 0.4.13 with a tokenizer that
    adds BOS also scores log p(BOS | BOS) into every document; its add_bos_token=False matches us.)
    No stderr for these (lm-eval bootstraps one).

Simplifications on purpose: one sequential pass per task (no request cache between tasks); shared
prompt prefixes are computed once only where two requests feed the model exactly the same tokens (the
four one-token letter answers of MMLU-style tasks: one forward per question, as lm-eval's logits cache);
a GSM8K batch decodes until every row has written a stop string (or max_gen_toks tokens).
"""
import argparse
import json
import math
import os
import re
import sys
import time

import torch
import torch.distributed as dist

import common
from data.formats import FormatError, Report, _iter_records, open_binary

DEFAULT_DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "data", "eval")
LETTERS = ["A", "B", "C", "D"]


def _table(text):
    """'key=value key=value ...' -> dict (the subject tables below, one line per few entries)."""
    return dict(pair.split("=", 1) for pair in text.split())


# lm-eval's per-subject headers name each subject in Chinese (cmmlu_<subject>.yaml, ceval-valid_<subject>.yaml).
CMMLU_SUBJECTS = _table("""
agronomy=农学 anatomy=解剖学 ancient_chinese=古汉语 arts=艺术学 astronomy=天文学 business_ethics=商业伦理
chinese_civil_service_exam=中国公务员考试 chinese_driving_rule=中国驾驶规则 chinese_food_culture=中国饮食文化
chinese_foreign_policy=中国外交政策 chinese_history=中国历史 chinese_literature=中国文学
chinese_teacher_qualification=中国教师资格 clinical_knowledge=临床知识 college_actuarial_science=大学精算学
college_education=大学教育学 college_engineering_hydrology=大学工程水文学 college_law=大学法律
college_mathematics=大学数学 college_medical_statistics=大学医学统计 college_medicine=大学医学
computer_science=计算机科学 computer_security=计算机安全 conceptual_physics=概念物理学
construction_project_management=建设工程管理 economics=经济学 education=教育学 electrical_engineering=电气工程
elementary_chinese=小学语文 elementary_commonsense=小学常识 elementary_information_and_technology=小学信息技术
elementary_mathematics=初等数学 ethnology=民族学 food_science=食品科学 genetics=遗传学 global_facts=全球事实
high_school_biology=高中生物 high_school_chemistry=高中化学 high_school_geography=高中地理
high_school_mathematics=高中数学 high_school_physics=高中物理学 high_school_politics=高中政治
human_sexuality=人类性行为 international_law=国际法学 journalism=新闻学 jurisprudence=法理学
legal_and_moral_basis=法律与道德基础 logical=逻辑学 machine_learning=机器学习 management=管理学 marketing=市场营销
marxist_theory=马克思主义理论 modern_chinese=现代汉语 nutrition=营养学 philosophy=哲学 professional_accounting=专业会计
professional_law=专业法学 professional_medicine=专业医学 professional_psychology=专业心理学 public_relations=公共关系
security_study=安全研究 sociology=社会学 sports_science=体育学 traditional_chinese_medicine=中医中药 virology=病毒学
world_history=世界历史 world_religions=世界宗教
""")
CEVAL_SUBJECTS = _table("""
accountant=注册会计师 advanced_mathematics=高等数学 art_studies=艺术学 basic_medicine=基础医学
business_administration=工商管理 chinese_language_and_literature=中国语言文学 civil_servant=公务员
clinical_medicine=临床医学 college_chemistry=大学化学 college_economics=大学经济学 college_physics=大学物理
college_programming=大学编程 computer_architecture=计算机组成 computer_network=计算机网络
discrete_mathematics=离散数学 education_science=教育学 electrical_engineer=注册电气工程师
environmental_impact_assessment_engineer=环境影响评价工程师 fire_engineer=注册消防工程师 high_school_biology=高中生物
high_school_chemistry=高中化学 high_school_chinese=高中语文 high_school_geography=高中地理
high_school_history=高中历史 high_school_mathematics=高中数学 high_school_physics=高中物理
high_school_politics=高中政治 ideological_and_moral_cultivation=思想道德修养与法律基础 law=法学
legal_professional=法律职业资格 logic=逻辑学 mao_zedong_thought=毛泽东思想和中国特色社会主义理论体系概论 marxism=马克思主义基本原理
metrology_engineer=注册计量师 middle_school_biology=初中生物 middle_school_chemistry=初中化学
middle_school_geography=初中地理 middle_school_history=初中历史 middle_school_mathematics=初中数学
middle_school_physics=初中物理 middle_school_politics=初中政治 modern_chinese_history=近代史纲要
operating_system=操作系统 physician=医师资格 plant_protection=植物保护 probability_and_statistics=概率统计
professional_tour_guide=导游资格 sports_science=体育学 tax_accountant=税务师 teacher_qualification=教师资格
urban_and_rural_planner=注册城乡规划师 veterinary_medicine=兽医学
""")


# -----------------------------------------------------------------------------
# Items: a benchmark record -> {"query", "choices", "gold", "description", "subject"} (multiple choice)
# or {"query", "target", "gold"} (GSM8K). A record that cannot be graded raises BadItem (file:line, skipped).


class BadItem(FormatError):
    """A record that cannot be graded (the message says why); skipped and reported with file:line."""


def _field(rec, key):
    if key not in rec:
        raise BadItem(f"missing field {key!r}")
    return rec[key]


def _str_field(rec, key):
    v = _field(rec, key)
    if not isinstance(v, str):
        raise BadItem(f"field {key!r} is {type(v).__name__}, not a string")
    return v


def _letter_item(rec, q_key, ans_key, description, answer_word):
    """MMLU / CMMLU / C-Eval: four lettered options, the answer a letter."""
    question = _str_field(rec, q_key)
    options = [_str_field(rec, k) for k in LETTERS]
    answer = _str_field(rec, ans_key).strip()
    if answer not in LETTERS:
        raise BadItem(f"unknown answer letter {answer!r} (expected A-D)")
    query = question.strip() + "".join(f"\n{k}. {v}" for k, v in zip(LETTERS, options)) + "\n" + answer_word
    return {"query": query, "choices": list(LETTERS), "gold": LETTERS.index(answer), "description": description,
            "subject": rec.get("subject")}


def mmlu_item(rec):
    subject = _str_field(rec, "subject")
    desc = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    return _letter_item(rec, "question", "answer", desc, "Answer:")


def _chinese_subject(table, subject, task):
    if subject not in table:   # a subject lm-eval does not know: its English name (said once, at the end)
        _unknown_subjects.add(f"{task}:{subject}")
    return table.get(subject, subject.replace("_", " "))


_unknown_subjects = set()


def cmmlu_item(rec):
    zh = _chinese_subject(CMMLU_SUBJECTS, _str_field(rec, "subject"), "cmmlu")
    return _letter_item(rec, "Question", "Answer", f"以下是关于{zh}的单项选择题，请直接给出正确答案的选项。\n\n", "答案：")


def ceval_item(rec):
    zh = _chinese_subject(CEVAL_SUBJECTS, _str_field(rec, "subject"), "ceval")
    return _letter_item(rec, "question", "answer", f"以下是中国关于{zh}的单项选择题，请选出其中的正确答案。\n\n", "答案：")


def _check_choices(choices):
    """Choices must be non-empty strings (acc_norm divides by their length)."""
    if not isinstance(choices, list) or not all(isinstance(c, str) and c for c in choices):
        raise BadItem(f"choices must be non-empty strings, got {choices!r:.80}")
    return choices


def arc_item(rec):
    """The original ARC JSONL ({"question": {"stem", "choices": [{"text", "label"}]}, "answerKey"}) or the
    HF dataset's flat form ({"question": str, "choices": {"text": [...], "label": [...]}})."""
    q = _field(rec, "question")
    if isinstance(q, dict):
        stem, choices = _str_field(q, "stem"), _field(q, "choices")
        if not isinstance(choices, list) or not all(isinstance(c, dict) and "text" in c and "label" in c
                                                    for c in choices):
            raise BadItem("question.choices is not a list of {text, label}")
        texts, labels = [c["text"] for c in choices], [c["label"] for c in choices]
    else:
        stem, choices = _str_field(rec, "question"), _field(rec, "choices")
        if not isinstance(choices, dict) or not isinstance(choices.get("label"), list):
            raise BadItem("choices is not {text: [...], label: [...]}")
        texts, labels = choices.get("text"), choices["label"]
    key = _field(rec, "answerKey")
    if key not in labels:
        raise BadItem(f"answerKey {key!r} is not one of the choice labels {labels}")
    _check_choices(texts)
    return {"query": f"Question: {stem}\nAnswer:", "choices": texts, "gold": labels.index(key), "description": "",
            "subject": None}


def hellaswag_preprocess(text):
    """lm-eval's HellaSwag cleanup: WikiHow's " [title]" becomes ". ", other [markers] go, double spaces too."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_item(rec):
    ctx = _str_field(rec, "ctx_a") + " " + _str_field(rec, "ctx_b").capitalize()
    endings = _check_choices(_field(rec, "endings"))
    label = _field(rec, "label")
    try:
        gold = int(label)
    except (TypeError, ValueError):
        raise BadItem(f"label {label!r} is not an integer") from None
    if not 0 <= gold < len(endings):
        raise BadItem(f"label {gold} does not index the endings")
    return {"query": hellaswag_preprocess(_str_field(rec, "activity_label") + ": " + ctx),
            "choices": _check_choices([hellaswag_preprocess(e) for e in endings]), "gold": gold, "description": "",
            "subject": None}


def gsm8k_item(rec):
    question, answer = _str_field(rec, "question"), _str_field(rec, "answer")
    if "#### " not in answer:
        raise BadItem("answer has no '#### <number>' line")
    return {"query": f"Question: {question}\nAnswer:", "target": answer, "gold": normalize_gsm8k(answer),
            "description": "", "subject": None}


# name -> (item function, evaluated file, few-shot file, default shots). Files are looked up as
# <data_dir>/<name>.jsonl(.gz); the few-shot file is optional (see the module docstring).
TASKS = {
    "mmlu": (mmlu_item, "mmlu_test", "mmlu_dev", 5),
    "cmmlu": (cmmlu_item, "cmmlu_test", "cmmlu_dev", 5),
    "ceval": (ceval_item, "ceval_val", "ceval_dev", 5),
    "arc_challenge": (arc_item, "arc_challenge_test", "arc_challenge_train", 0),
    "hellaswag": (hellaswag_item, "hellaswag_val", "hellaswag_train", 0),
    "gsm8k": (gsm8k_item, "gsm8k_test", "gsm8k_train", 5),
}


# -----------------------------------------------------------------------------
# GSM8K answer extraction (lm-eval's gsm8k.yaml filters and exact_match settings)

STRICT_RE = re.compile(r"#### (\-?[0-9\.\,]+)")               # the "#### N" line the few-shot answers teach
FLEXIBLE_RE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")     # any number; the LAST one is taken
GSM8K_IGNORE = [",", r"\$", r"(?s).*#### ", r"\.$"]           # removed from answer and reference, in this order
GSM8K_STOP = ["Question:", "</s>", "<|im_end|>"]


def regex_extract(text, pattern, group_select=0, fallback="[invalid]"):
    """lm-eval's regex filter: findall, pick one match (0 = first, -1 = last), the first non-empty group."""
    found = pattern.findall(text)
    if not found:
        return fallback
    match = found[group_select]
    if isinstance(match, tuple):
        match = next((g for g in match if g), fallback)
    return match.strip()


def normalize_gsm8k(s):
    for pattern in GSM8K_IGNORE:
        s = re.sub(pattern, "", s)
    return s.lower()


def extract_gsm8k(generation):
    """-> (strict, flexible) normalised answers of one generation."""
    strict = regex_extract(generation, STRICT_RE, 0)
    flexible = regex_extract(generation, FLEXIBLE_RE, -1)
    return normalize_gsm8k(strict), normalize_gsm8k(flexible)


# -----------------------------------------------------------------------------
# Reading a task's files


def find_file(data_dir, stem, required=True):
    for ext in (".jsonl", ".jsonl.gz"):
        path = os.path.join(data_dir, stem + ext)
        if os.path.isfile(path):
            return path
    if required:
        common.fail(f"no {stem}.jsonl or {stem}.jsonl.gz in {data_dir} (--data_dir)")
    return None


def read_records(path, convert):
    """-> list of (file:line, convert(record)); lines that are not JSON objects, or that convert refuses
    (BadItem), are skipped and reported on stderr with file:line (data.formats' reader and report)."""
    report = Report()
    try:
        out = list(_iter_records([path], convert, report, seed=0, with_where=True))
    except ValueError as e:   # an empty file, or every line refused
        common.fail(str(e))
    if report.skipped and common.is_main():
        print(f"{path}: {report.skipped} record(s) skipped\n  " + "\n  ".join(report.examples), file=sys.stderr)
    return out


def read_items(path, item_fn):
    """-> list of items, each with its source record ("record") and "where" (file:line)."""
    return [{**item, "where": where} for where, item in read_records(path, lambda rec: {**item_fn(rec), "record": rec})]


def load_task(name, data_dir, limit=None):
    """-> (items to grade, few-shot pool {subject: [items]}, whether the pool is the graded file itself)."""
    if name not in TASKS:
        common.fail(f"unknown task {name!r}; choose from {', '.join(list(TASKS) + ['ppl'])}")
    item_fn, eval_stem, shot_stem, _ = TASKS[name]
    path = find_file(data_dir, eval_stem)
    all_items = read_items(path, item_fn)
    items = all_items
    if limit:   # as lm-eval's --limit: per task, and each MMLU-style subject is a task of its own
        items = [it for it, n in zip(all_items, _running_counts(all_items)) if n <= limit]
    if not items:
        common.fail(f"task {name}: no usable items in {path}")
    shot_path = find_file(data_dir, shot_stem, required=False)
    pool = {}
    # without a dev/train file the examples come from the whole graded file (--limit or not)
    for it in read_items(shot_path, item_fn) if shot_path else all_items:
        pool.setdefault(it["subject"], []).append(it)
    return items, pool, shot_path is None


def _running_counts(items):
    """1, 2, 3, ... within each subject, in file order."""
    seen, out = {}, []
    for it in items:
        seen[it["subject"]] = seen.get(it["subject"], 0) + 1
        out.append(seen[it["subject"]])
    return out


def fewshot_examples(item, k, pool, exclude_self):
    """The first k examples of the item's subject in the pool; exclude_self (the pool is the graded file)
    leaves out the item itself and any identical record, as lm-eval's first_n sampler does."""
    if k == 0:
        return []
    candidates = pool.get(item["subject"], [])
    if exclude_self:
        candidates = [x for x in candidates if x["record"] != item["record"]]
    if len(candidates) < k:
        common.fail(f"{item['where']}: {k}-shot needs {k} examples of subject {item['subject']!r}, "
                    f"only {len(candidates)} available")
    return candidates[:k]


def shot_text(example):
    """A solved example: the query, " ", the answer (the right choice, or GSM8K's worked solution)."""
    answer = example["target"] if "target" in example else example["choices"][example["gold"]]
    return example["query"] + " " + answer


def build_context(item, shots):
    """The prompt as lm-eval builds it without a chat template: description + solved examples, each
    followed by "\\n\\n", + the query (no trailing space: the continuation carries it)."""
    return item["description"] + "".join(shot_text(s) + "\n\n" for s in shots) + item["query"]


def chat_messages(item, shots):
    """--apply_chat_template, as lm-eval without fewshot_as_multiturn: the description becomes the system
    message, the examples and the query one user message."""
    user = "".join(shot_text(s) + "\n\n" for s in shots) + item["query"]
    return ([{"role": "system", "content": item["description"]}] if item["description"] else []) + \
        [{"role": "user", "content": user}]


# -----------------------------------------------------------------------------
# Tokenizing requests the way lm-eval's HF backend does


def encode_pair(tok, context, continuation):
    """(context ids, continuation ids). Trailing spaces of the context move to the continuation, and the
    continuation is what encode(context + continuation) adds after encode(context) -- so a token that
    spans the boundary is scored as the model would see it. BOS first."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tok.encode(context + continuation, bos=True)
    ctx = tok.encode(context, bos=True)
    return ctx, whole[len(ctx):]


def mc_requests(tok, item, shots, chat):
    """One (context ids, continuation ids) request per choice."""
    if chat:
        ctx = tok.render_prompt(chat_messages(item, shots))
        # lm-eval drops the " " before the choice when the prompt ends in the chat template
        return [(ctx, tok.encode(c)) for c in item["choices"]]
    context = build_context(item, shots)
    return [encode_pair(tok, context, " " + c) for c in item["choices"]]


# -----------------------------------------------------------------------------
# Scoring


@torch.no_grad()
def loglikelihoods(model, requests, batch_size=16):
    """Sum of log p(continuation | context) and whether every continuation token is the argmax, for
    each (context ids, continuation ids) request -> list of (float, bool) in request order.

    As lm-eval: the model reads (context + continuation)[:-1], left-truncated to max_seq_len. Requests
    that feed the model exactly the same tokens share one row (MMLU's four one-token answers: one
    forward per question). Rows are sorted longest first and right-padded: causal attention never
    lets a real token see the padding after it, so no mask is needed."""
    max_len = model.config.max_seq_len
    rows, row_of = {}, []
    for ctx, cont in requests:
        if not cont:
            raise ValueError("empty continuation")
        inp = tuple((ctx + cont)[-(max_len + 1):][:-1])
        row_of.append(rows.setdefault(inp, len(rows)))
    inputs = list(rows)
    want = [[] for _ in inputs]        # per row: (request index, continuation ids)
    for i, (r, (_, cont)) in enumerate(zip(row_of, requests)):
        want[r].append((i, cont))
    order = sorted(range(len(inputs)), key=lambda r: -len(inputs[r]))
    device = next(model.parameters()).device
    out = [None] * len(requests)
    with common.eval_mode(model):
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            T = len(inputs[chunk[0]])
            idx = torch.zeros(len(chunk), T, dtype=torch.long)
            for b, r in enumerate(chunk):
                idx[b, :len(inputs[r])] = torch.tensor(inputs[r])
            h = model.hidden_states(idx.to(device))                              # (B, T, dim)
            for b, r in enumerate(chunk):
                L = len(inputs[r])
                first = L - max(len(c) for _, c in want[r])                       # earliest position scored
                logp = model.output(h[b, first:L]).float().log_softmax(-1)      # (L - first, vocab)
                for i, cont in want[r]:
                    lp = logp[L - len(cont) - first:]                            # (len(cont), vocab)
                    target = torch.tensor(cont, device=device)
                    score = lp.gather(-1, target[:, None]).sum().item()
                    greedy = bool((lp.argmax(-1) == target).all())
                    out[i] = (score, greedy)
    return out


def mc_metrics(lls, choices, gold):
    """acc / acc_norm / acc_bytes of one item, as lm-eval's process_results (np.argmax: first max wins)."""
    def argmax(xs):
        return max(range(len(xs)), key=lambda i: (xs[i], -i))
    chars = [ll / len(c) for ll, c in zip(lls, choices)]
    nbytes = [ll / len(c.encode("utf-8")) for ll, c in zip(lls, choices)]
    return {"acc": float(argmax(lls) == gold), "acc_norm": float(argmax(chars) == gold),
            "acc_bytes": float(argmax(nbytes) == gold)}


class _AllStopped(Exception):
    """Raised from model.generate's per-token callback once every row of the batch has written a stop
    string or a stop token: generate returns early, as lm-eval's HF backend stops a batch; the callback
    already holds the tokens."""


@torch.no_grad()
def generate_until(model, tok, prompts, max_gen_toks=256, stop=GSM8K_STOP, batch_size=16):
    """Greedy completions of prompt id lists, cut at the first stop string (lm-eval's generate_until:
    the context is left-truncated to max_seq_len - max_gen_toks; decoding stops at the tokenizer's stop
    ids, and a batch stops once every row holds a stop string). -> list of strings."""
    max_len = model.config.max_seq_len
    if max_gen_toks >= max_len:
        common.fail(f"max_gen_toks={max_gen_toks} leaves no room for a prompt in the model's context of "
                    f"{max_len} tokens (pass a smaller --max_gen_toks)")
    prompts = [p[-(max_len - max_gen_toks):] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out = [None] * len(prompts)
    with common.eval_mode(model):
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            tokens = [[] for _ in chunk]
            decoders = [tok.stream_decoder() for _ in chunk]
            texts = [""] * len(chunk)
            done = [False] * len(chunk)

            def on_token(b, t):
                tokens[b].append(t)
                texts[b] += decoders[b].push(t)
                done[b] = t in tok.stop_ids or any(s in texts[b] for s in stop)
                if all(done):
                    raise _AllStopped

            try:
                model.generate([prompts[i] for i in chunk], max_gen_toks, temperature=0.0, eos_id=tok.stop_ids,
                               callback=on_token)
            except _AllStopped:
                pass
            for i, ids in zip(chunk, tokens):
                text = tok.decode([t for t in ids if t not in tok.stop_ids])
                for s in stop:
                    text = text.split(s)[0]
                out[i] = text
    return out


def rolling_windows(ids, prefix, max_len):
    """lm-eval's rolling log-likelihood windows (context_len 1): the first window predicts the first
    max_len tokens after `prefix`; each later one predicts the next max_len tokens (fewer at the end)
    reading the max_len tokens before them. -> (context, continuation) requests whose scores sum to
    log p(document)."""
    seq = [prefix] + ids
    out, done = [], 0
    while done < len(ids):
        end = min(done + max_len, len(ids))
        window = seq[max(0, end - max_len):end + 1]          # inputs seq[..end), targets up to ids[end-1]
        n = end - done
        out.append((window[:-n], window[-n:]))
        done = end
    return out


# -----------------------------------------------------------------------------
# Aggregation: lm-eval's formulas


def mean_stderr(values):
    """Sample standard deviation / sqrt(n) (lm-eval's mean_stderr); None below 2 items."""
    n = len(values)
    if n < 2:
        return None
    mu = sum(values) / n
    return math.sqrt(sum((x - mu) ** 2 for x in values) / (n - 1)) / math.sqrt(n)


def pooled_stderr(stderrs, sizes):
    """lm-eval's stderr of a size-weighted group mean (pooled variance of the subtasks)."""
    if any(s is None for s in stderrs) or sum(sizes) <= len(sizes):
        return None
    var = sum((n - 1) * se ** 2 * n for se, n in zip(stderrs, sizes)) / (sum(sizes) - len(sizes))
    return math.sqrt(var / sum(sizes))


def aggregate(samples, metric_names):
    """Per-item samples -> {"n", "metrics": {name: {"value", "stderr"}}, "subjects": {...}}. With subjects
    (MMLU-style) the task value is the size-weighted mean over subjects and its stderr the pooled one,
    as lm-eval reports a group."""
    by_subject = {}
    for s in samples:
        by_subject.setdefault(s.get("subject"), []).append(s)
    per = {}
    for subject, group in by_subject.items():
        per[subject] = {"n": len(group), "metrics": {
            m: {"value": sum(s[m] for s in group) / len(group), "stderr": mean_stderr([s[m] for s in group])}
            for m in metric_names}}
    if list(per) == [None]:
        return {"n": len(samples), "metrics": per[None]["metrics"]}
    sizes = [p["n"] for p in per.values()]
    metrics = {m: {"value": sum(p["metrics"][m]["value"] * p["n"] for p in per.values()) / sum(sizes),
                   "stderr": pooled_stderr([p["metrics"][m]["stderr"] for p in per.values()], sizes)}
               for m in metric_names}
    return {"n": len(samples), "metrics": metrics, "subjects": per}


# -----------------------------------------------------------------------------
# Running tasks (items split across ranks, per-item results gathered)


def _shard(n, rank, world):
    return list(range(rank, n, world))


def _gather(local):
    """Every rank's list of (index, sample) -> all samples in index order (on every rank)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, local)
        local = [x for p in parts for x in p]
    return [s for _, s in sorted(local, key=lambda x: x[0])]


def _rank_world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def run_multiple_choice(model, tok, name, items, pool, exclude_self, shots, batch_size, chat):
    rank, world = _rank_world()
    mine = _shard(len(items), rank, world)
    requests, spans = [], []
    for i in mine:
        reqs = mc_requests(tok, items[i], fewshot_examples(items[i], shots, pool, exclude_self), chat)
        spans.append((len(requests), len(requests) + len(reqs)))
        requests += reqs
    scores = loglikelihoods(model, requests, batch_size)
    local = []
    for i, (a, b) in zip(mine, spans):
        it = items[i]
        lls = [s for s, _ in scores[a:b]]
        sample = {"task": name, "index": i, "where": it["where"], "subject": it["subject"], "gold": it["gold"],
                  "loglikelihoods": lls, "is_greedy": [g for _, g in scores[a:b]]}
        sample.update(mc_metrics(lls, it["choices"], it["gold"]))
        local.append((i, sample))
    return _gather(local)


def run_gsm8k(model, tok, items, pool, exclude_self, shots, batch_size, chat, max_gen_toks):
    rank, world = _rank_world()
    mine = _shard(len(items), rank, world)
    prompts = []
    for i in mine:
        shots_i = fewshot_examples(items[i], shots, pool, exclude_self)
        if chat:
            prompts.append(tok.render_prompt(chat_messages(items[i], shots_i)))
        else:
            prompts.append(tok.encode(build_context(items[i], shots_i), bos=True))
    texts = generate_until(model, tok, prompts, max_gen_toks, batch_size=batch_size)
    local = []
    for i, text in zip(mine, texts):
        strict, flexible = extract_gsm8k(text)
        gold = items[i]["gold"]
        local.append((i, {"task": "gsm8k", "index": i, "where": items[i]["where"], "gold": gold,
                          "generation": text, "strict": strict, "flexible": flexible,
                          "exact_match_strict": float(strict == gold),
                          "exact_match_flexible": float(flexible == gold)}))
    return _gather(local)


def read_corpus(paths, field="text"):
    """Documents for perplexity: a .txt file is one document; JSONL records give their `field`."""
    def text_of(rec):
        if not isinstance(rec.get(field), str) or not rec[field]:
            raise BadItem(f"no non-empty string field {field!r}")
        return rec[field]
    docs = []
    for path in paths:
        if not os.path.isfile(path):
            common.fail(f"--ppl_data {path} does not exist")
        if path.endswith((".txt", ".txt.gz")):
            with open_binary(path) as f:
                docs.append((path, f.read().decode("utf-8")))
        else:
            docs += read_records(path, text_of)
    if not docs:
        common.fail(f"--ppl_data {', '.join(paths)}: no documents")
    return docs


def run_perplexity(model, tok, docs, batch_size):
    rank, world = _rank_world()
    mine = _shard(len(docs), rank, world)
    requests, spans = [], []
    for i in mine:
        wins = rolling_windows(tok.encode(docs[i][1]), tok.bos_id, model.config.max_seq_len)
        spans.append((len(requests), len(requests) + len(wins)))
        requests += wins
    scores = loglikelihoods(model, requests, batch_size)
    local = []
    for i, (a, b) in zip(mine, spans):
        text = docs[i][1]
        local.append((i, {"task": "ppl", "index": i, "where": docs[i][0],
                          "loglikelihood": sum(s for s, _ in scores[a:b]),
                          "tokens": sum(len(c) for _, c in requests[a:b]),
                          "bytes": len(text.encode("utf-8")), "words": len(re.split(r"\s+", text))}))
    return _gather(local)


def perplexity_metrics(samples):
    """lm-eval's corpus-level weighted perplexities (sum of log-likelihoods over the sum of units)."""
    ll = sum(s["loglikelihood"] for s in samples)
    units = {k: sum(s[k] for s in samples) for k in ("tokens", "bytes", "words")}
    metric = {"token_perplexity": math.exp(-ll / units["tokens"]), "word_perplexity": math.exp(-ll / units["words"]),
              "byte_perplexity": math.exp(-ll / units["bytes"]), "bits_per_byte": -ll / units["bytes"] / math.log(2)}
    return {"n": len(samples), **units, "metrics": {k: {"value": v, "stderr": None} for k, v in metric.items()}}


def evaluate(model, tok, tasks, data_dir=DEFAULT_DATA_DIR, shots=None, limit=None, batch_size=16,
             apply_chat_template=False, ppl_data=None, ppl_field="text", max_gen_toks=256):
    """-> (results {task: {"n", "shots", "metrics", ...}}, samples [per-item dicts]). Under a process group
    every rank grades its share of the items and every rank gets the whole result."""
    results, samples = {}, []
    for name in tasks:
        t0 = time.time()
        if name == "ppl":
            if not ppl_data:
                common.fail("task ppl needs --ppl_data FILE[,FILE...]")
            task_samples = run_perplexity(model, tok, read_corpus(ppl_data, ppl_field), batch_size)
            results[name] = perplexity_metrics(task_samples)
        else:
            items, pool, exclude_self = load_task(name, data_dir, limit)
            k = TASKS[name][3] if shots is None else shots
            if name == "gsm8k":
                task_samples = run_gsm8k(model, tok, items, pool, exclude_self, k, batch_size, apply_chat_template, max_gen_toks)
                results[name] = aggregate(task_samples, ["exact_match_strict", "exact_match_flexible"])
            else:
                task_samples = run_multiple_choice(model, tok, name, items, pool, exclude_self, k, batch_size, apply_chat_template)
                results[name] = aggregate(task_samples, ["acc", "acc_norm", "acc_bytes"])
            results[name]["shots"] = k
        results[name]["seconds"] = round(time.time() - t0, 2)
        results[name]["items_per_s"] = round(len(task_samples) / max(time.time() - t0, 1e-9), 2)
        samples += task_samples
        common.print0(f"{name}: " + ", ".join(f"{m} {v['value']:.4f}" for m, v in results[name]["metrics"].items())
                      + f" (n={results[name]['n']}, {results[name]['seconds']} s)")
    if _unknown_subjects:
        common.print0(f"warning: subjects lm-eval has no Chinese name for (English name used): "
                      f"{', '.join(sorted(_unknown_subjects))}")
    return results, samples


def markdown_table(results):
    lines = ["| task | shots | n | metric | value | stderr |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        for m, v in r["metrics"].items():
            se = "" if v["stderr"] is None else f"± {v['stderr']:.4f}"
            lines.append(f"| {name} | {r.get('shots', '')} | {r['n']} | {m} | {v['value']:.4f} | {se} |")
    return "\n".join(lines) + "\n"


def write_outputs(results, samples, out_dir, log_samples=None):
    """results.json + results.md under out_dir (atomic), and the per-item JSONL if asked (rank 0 only)."""
    if not common.is_main():
        return
    os.makedirs(out_dir, exist_ok=True)
    common.atomic_write_json(os.path.join(out_dir, "results.json"), results)
    md = os.path.join(out_dir, "results.md")
    with open(md + ".tmp", "w", encoding="utf-8") as f:
        f.write(markdown_table(results))
    os.replace(md + ".tmp", md)
    if log_samples:
        os.makedirs(os.path.dirname(os.path.abspath(log_samples)), exist_ok=True)
        with open(log_samples + ".tmp", "w", encoding="utf-8") as f:
            for s in samples:
                f.write(json.dumps(s, ensure_ascii=False) + "\n")
        os.replace(log_samples + ".tmp", log_samples)


# -----------------------------------------------------------------------------
# CLI


def get_args(argv=None):
    p = argparse.ArgumentParser(description="standard benchmarks, lm-evaluation-harness conventions")
    p.add_argument("--model", required=True, help="run dir, checkpoint file, or HuggingFace LLaMA dir")
    p.add_argument("--tokenizer", default=None, help="sentencepiece .model (default: the one the checkpoint names)")
    p.add_argument("--tasks", default="mmlu,cmmlu,ceval,arc_challenge,hellaswag,gsm8k",
                   help=f"comma-separated: {', '.join(TASKS)}, ppl")
    p.add_argument("--data_dir", default=DEFAULT_DATA_DIR, help="directory of <task files>.jsonl(.gz)")
    p.add_argument("--shots", type=int, default=None,
                   help="few-shot examples (default per task: MMLU/CMMLU/C-Eval/GSM8K 5, ARC/HellaSwag 0)")
    p.add_argument("--limit", type=int, default=None, help="only the first N items of each task (of each subject for MMLU/CMMLU/C-Eval, as lm-eval)")
    p.add_argument("--batch_size", type=int, default=16, help="sequences per forward")
    p.add_argument("--apply_chat_template", action="store_true", help="wrap each prompt in the chat template")
    p.add_argument("--max_gen_toks", type=int, default=256, help="GSM8K: tokens generated per answer (lm-eval: 256)")
    p.add_argument("--ppl_data", default=None, help="ppl task: comma-separated .txt / .jsonl(.gz) files")
    p.add_argument("--ppl_field", default="text", help="ppl task: the JSONL field holding the text")
    p.add_argument("--log_samples", default=None, help="write every graded item to this JSONL file")
    p.add_argument("--out", default="eval_out", help="directory for results.json and results.md")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--dtype", default="auto", help="auto (bf16 autocast on cuda, fp32 on cpu) | float32 | bfloat16")
    args = p.parse_args(argv)
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    args.ppl_data = [x for x in args.ppl_data.split(",") if x] if args.ppl_data else None
    if not args.tasks:
        p.error("--tasks is empty")
    return args


def main(argv=None):
    args = get_args(argv)
    info = common.setup_distributed(args.device)
    from chat import load_chat_model
    model, tok = load_chat_model(args.model, info.device, args.tokenizer)
    with common.autocast(info.device, common.resolve_dtype(args.dtype, info.device)):
        results, samples = evaluate(model, tok, args.tasks, args.data_dir, args.shots, args.limit, args.batch_size,
                                    args.apply_chat_template, args.ppl_data, args.ppl_field, args.max_gen_toks)
    write_outputs(results, samples, args.out, args.log_samples)
    common.print0("\n" + markdown_table(results))
    common.print0(f"wrote {os.path.join(args.out, 'results.json')}")
    common.teardown_distributed(info)
    return results


if __name__ == "__main__":
    main()
