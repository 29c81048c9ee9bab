"""The lab world generator (data/lab.py): determinism, held-out splits, record shapes, the checker.

The checker is the ground truth of every later stage, so it is tested two ways: on hand-written
answers with known verdicts, and on every generated reference / chosen / rejected answer."""
import importlib
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
try:
    from data import lab
except ImportError:  # data/ owned elsewhere; load the file directly if the package is not ready
    spec = importlib.util.spec_from_file_location("lab", REPO / "data" / "lab.py")
    lab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lab)

SMALL = dict(pretrain_docs=3000, sft_train=600, sft_val=60, prefs_train=400, prefs_val=200, rank_train=100,
             rl_prompts=200, rl_eval=100)
CJK = re.compile(r"[\u4e00-\u9fff]")


@pytest.fixture(scope="module")
def sets():
    return lab.generate(seed=0, **SMALL)


def _names(world, groups):
    return [v for p in world["people"] if p["group"] in groups for v in p["name"].values()]


def _texts(records):
    """All text in a list of records (messages, prompts, answers), one string per record."""
    out = []
    for r in records:
        parts = [m["content"] for m in r.get("messages", [])]
        parts += [r[k] for k in ("text", "prompt", "chosen", "rejected", "reference") if k in r]
        parts += r.get("responses", [])
        out.append("\n".join(parts))
    return out


# --- determinism -------------------------------------------------------------------------------

def test_write_is_byte_identical_for_a_seed_and_differs_across_seeds(tmp_path):
    knobs = dict(SMALL, pretrain_docs=500)
    lab.write(tmp_path / "a", seed=3, **knobs)
    lab.write(tmp_path / "b", seed=3, **knobs)
    lab.write(tmp_path / "c", seed=4, **knobs)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(list(lab.FILES.values()) + ["world.json"])  # and no leftover .tmp files
    for n in names:
        assert (tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes(), n
    differ = [n for n in names if (tmp_path / "a" / n).read_bytes() != (tmp_path / "c" / n).read_bytes()]
    assert set(differ) == set(names)
    world = json.loads((tmp_path / "a" / "world.json").read_text(encoding="utf-8"))
    for key, fname in lab.FILES.items():
        lines = (tmp_path / "a" / fname).read_text(encoding="utf-8").splitlines()
        assert len(lines) == world["counts"][key] > 0
        assert all(isinstance(json.loads(l), dict) for l in lines)


def test_cli_script_and_module_write_the_same_files(tmp_path):
    args = ["--seed", "5", "--pretrain-docs", "200", "--sft-train", "50", "--prefs-train", "40", "--rank-train", "8",
            "--rl-prompts", "20", "--rl-eval", "20", "--prefs-val", "40", "--sft-val", "10"]
    r1 = subprocess.run([sys.executable, "data/lab.py", "--out", str(tmp_path / "s"), *args], cwd=REPO,
                        capture_output=True, text=True, timeout=60)
    r2 = subprocess.run([sys.executable, "-m", "data.lab", "--out", str(tmp_path / "m"), *args], cwd=REPO,
                        capture_output=True, text=True, timeout=60)
    assert r1.returncode == 0 and r2.returncode == 0, r1.stderr + r2.stderr
    for n in lab.FILES.values():
        assert (tmp_path / "s" / n).read_bytes() == (tmp_path / "m" / n).read_bytes()
    bad = subprocess.run([sys.executable, "data/lab.py", "--out", str(tmp_path / "x"), "--people", "99"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "name pool" in bad.stderr and not (tmp_path / "x" / "world.json").exists()


def test_bad_knobs_are_refused():
    with pytest.raises(ValueError, match="at least|>= 3"):
        lab.generate(seed=0, people=8, rl_people=2, eval_people=3)
    with pytest.raises(TypeError, match="unknown knob"):
        lab.generate(seed=0, peeple=10)


# --- the world and its vocabulary ---------------------------------------------------------------

def test_vocabulary_values_never_contain_each_other():
    """The checker finds a value by search, so no value may hide inside another, nor inside the
    fixed text of any template."""
    values = [v for pool in (lab.CITIES, lab.JOBS, [p[:2] for p in lab.PETS], [n[:2] for n in lab.NAMES])
              for pair in pool for v in pair]
    assert len(values) == len(set(values))
    for a in values:
        for b in values:
            if a != b:
                assert not lab._has(b, a), (a, b)
    skeletons = []
    for table in (lab.STATEMENTS, lab.QUESTIONS, lab.FOLLOWUPS):
        for lang in lab.LANGS:
            for ts in table[lang].values():
                skeletons += ts
    skeletons += [t for lang in lab.LANGS for t in lab.ANSWERS[lang].values()]
    skeletons += [t for lang in lab.LANGS for t in lab.STORIES[lang]]
    for t in skeletons:
        fixed = re.sub(r"\{\w+\}", "|", t)
        assert not [v for v in values if lab._has(fixed, v)], t


def test_world_groups_and_friends(sets):
    world = sets["world"]
    people = world["people"]
    groups = {g: [p for p in people if p["group"] == g] for g in ("sft", "rl", "eval")}
    k = lab.DEFAULTS
    assert [len(groups[g]) for g in ("sft", "rl", "eval")] == [k["people"] - k["rl_people"] - k["eval_people"],
                                                               k["rl_people"], k["eval_people"]]
    assert len({p["name"]["en"] for p in people}) == len(people)
    for p in people:  # friends: one per person, someone else, in the same group (no leaks)
        f = people[p["friend"]]
        assert f["id"] != p["id"] and f["group"] == p["group"]
    for g in ("sft", "rl", "eval"):
        assert sorted(people[p["friend"]]["id"] for p in groups[g]) == sorted(p["id"] for p in groups[g])
    all_problems = [tuple(x) for g in ("sft", "rl", "eval") for x in world["arith"][g]]
    assert len(all_problems) == len(set(all_problems))  # arithmetic split without overlap


def test_probes_use_the_pretraining_qa_format(sets):
    docs = "\n".join(d["text"] for d in sets["pretrain"])
    for r in sets["eval_pretrain"]:
        if r["kind"] == "complete_fact":
            assert (r["prompt"] + r["reference"]) in docs or r["prompt"].endswith(("A:", "答：")), r
            assert r["prompt"].startswith(("Q: ", "问：")) and r["truth"]["completion"]
    groups = {r["group"] for r in sets["eval_pretrain"]}
    assert groups == {"sft", "rl", "eval"}


# --- held-out people ----------------------------------------------------------------------------

def test_held_out_people_only_in_pretraining_and_their_own_sets(sets):
    world = sets["world"]

    def mentions(records, names):
        text = "\n".join(_texts(records))
        return sorted(n for n in names if lab._has(text, n))

    rl_eval_names = _names(world, ("rl", "eval"))
    eval_names = _names(world, ("eval",))
    assert mentions(sets["sft_train"], rl_eval_names) == []
    for key in ("sft_val", "prefs_train", "rank_train", "rl_prompts"):
        assert mentions(sets[key], eval_names) == [], key
    # ...but pretraining states everybody's facts, in both languages
    assert mentions(sets["pretrain"], _names(world, ("sft", "rl", "eval"))) == sorted(_names(world, ("sft", "rl", "eval")))
    # and the held-out sets really are about the held-out people
    assert mentions(sets["eval_qa"], eval_names) == sorted(eval_names)
    assert mentions(sets["sft_val"], _names(world, ("sft",))) == []
    assert mentions(sets["prefs_val"] + sets["rl_eval"], _names(world, ("sft", "rl"))) == []
    facts = [r for r in sets["eval_qa"] if r["kind"] == "fact"]
    # every eval person, attribute, language and question phrasing once
    assert len(facts) == lab.DEFAULTS["eval_people"] * sum(len(v) for q in lab.QUESTIONS.values() for v in q.values())
    # ~500 distinct questions: one answer moves accuracy by about 0.2 points
    convs = [json.dumps(r["messages"], ensure_ascii=False) for r in sets["eval_qa"]]
    assert len(set(convs)) == len(convs) >= 500


def test_identity_and_refusal_questions_held_out_and_taught_only_in_sft(sets):
    """The held-out identity/refusal phrasings (the last two of each list) appear only in the evaluation
    sets; the training ones appear in SFT, never in pretraining (the model meets its persona in SFT)."""
    for lang in lab.LANGS:
        questions = [q for q, _ in lab.IDENTITY[lang]] + lab.HARMFUL[lang]
        held_out = [q for q, _ in lab.IDENTITY[lang][-2:]] + lab.HARMFUL[lang][-2:]
        asked = {key: {m["content"] for r in sets[key] for m in r.get("messages", []) if m["role"] == "user"}
                 for key in ("sft_train", "sft_val", "prefs_train", "rank_train", "rl_prompts", "eval_qa")}
        for key, qs in asked.items():
            if key == "eval_qa":
                assert set(held_out) <= qs
            else:
                assert not set(held_out) & qs, (key, set(held_out) & qs)
        taught = set(questions) - set(held_out)
        assert len(taught & asked["sft_train"]) > len(taught) // 2, lang   # (600 conversations: not all)
        pretrain = "\n".join(r["text"] for r in sets["pretrain"])
        assert not any(q in pretrain for q in questions) and lab.ASSISTANT not in pretrain


def test_heldout_facts_are_stated_in_pretraining(sets):
    """Every eval person's city is stated next to their name in both languages."""
    texts = [d["text"] for d in sets["pretrain"]]
    for p in sets["world"]["people"]:
        if p["group"] != "eval":
            continue
        for lang in lab.LANGS:
            hits = [t for t in texts if p["name"][lang] in t and p["city"][lang] in t]
            assert len(hits) >= 3, (p["name"], lang, len(hits))


# --- record shapes ------------------------------------------------------------------------------

def _check_conversation(msgs, ends_on):
    roles = [m["role"] for m in msgs]
    assert all(isinstance(m["content"], str) and m["content"].strip() for m in msgs)
    if roles[0] == "system":
        roles = roles[1:]
    assert roles and "system" not in roles
    assert roles == ["user", "assistant"] * (len(roles) // 2) + ["user"] * (len(roles) % 2)
    assert roles[-1] == ends_on


def test_records_are_well_formed(sets):
    for key in ("sft_train", "sft_val"):
        for r in sets[key]:
            _check_conversation(r["messages"], "assistant")
    for r in sets["eval_qa"]:
        _check_conversation(r["messages"], "user")
        assert set(r) == {"id", "messages", "reference", "truth", "kind", "showcase"}
    for key in ("prefs_train", "prefs_val", "rank_train", "rl_prompts", "rl_eval"):
        for r in sets[key]:
            # a single-turn prompt, or a follow-up: earlier turns answered right, then the prompt
            assert r["messages"][-1] == {"role": "user", "content": r["prompt"]}
            _check_conversation(r["messages"], "user")
            if len(r["messages"]) > 1:
                assert r["task"] == "followup" and lab.check(r["messages"][-2]["content"], r["truth"]) is False

    assert all(set(r) == {"prompt", "messages", "chosen", "rejected", "kind", "task", "truth"}
               for r in sets["prefs_train"] + sets["prefs_val"])
    assert all(len(r["responses"]) == 5 for r in sets["rank_train"])
    assert all(set(r) == {"text"} and r["text"].strip() for r in sets["pretrain"])
    ids = [r["id"] for r in sets["eval_qa"]]
    assert len(ids) == len(set(ids))


def test_showcase_is_a_fixed_mix_of_kinds_and_languages(sets):
    show = sets["showcase"]
    assert show == [r for r in sets["eval_qa"] if r["showcase"]] and len(show) == 8
    assert {(r["kind"], r["truth"]["lang"]) for r in show} >= {("fact", "en"), ("fact", "zh"), ("followup", "en"),
                                                              ("followup", "zh"), ("arith", "en"), ("arith", "zh")}
    assert {r["kind"] for r in show} >= {"identity", "refusal"}
    assert lab.generate(seed=0, **dict(SMALL, pretrain_docs=10))["showcase"] == show  # sizes do not move it


def test_bilingual_and_answer_in_the_question_language(sets):
    docs = [d["text"] for d in sets["pretrain"]]
    zh = sum(bool(CJK.search(t)) for t in docs) / len(docs)
    assert 0.4 < zh < 0.7  # ~half Chinese (parallel en+zh documents count as Chinese)
    for key in ("sft_train", "eval_qa", "prefs_train", "rl_prompts", "rl_eval"):
        langs = []
        for r in sets[key]:
            msgs = r["messages"]
            for i, m in enumerate(msgs):
                if m["role"] != "user":
                    continue
                lang = "zh" if CJK.search(m["content"]) else "en"
                langs.append(lang)
                reply = msgs[i + 1]["content"] if i + 1 < len(msgs) else r.get("reference", r.get("chosen"))
                assert bool(CJK.search(reply)) == (lang == "zh"), (m, reply)
                if i == len(msgs) - 1 and "truth" in r:
                    assert r["truth"]["lang"] == lang
        share = langs.count("zh") / len(langs)
        assert 0.35 < share < 0.65, (key, share)


def test_multi_turn_followups_refer_to_the_previous_turn(sets):
    """A follow-up names nobody ("And his job?"); its answer (a pronoun and a value) must be a fact of
    somebody named earlier in the conversation."""
    world = sets["world"]
    names = _names(world, ("sft", "rl", "eval"))

    def values(p):
        friend = world["people"][p["friend"]]["name"]
        return [str(p["age"])] + [v for a in ("city", "job", "pet") for v in p[a].values()] + list(friend.values())

    followups = 0
    for r in sets["sft_train"]:
        if r["kind"] != "multi_turn":
            continue
        msgs = [m for m in r["messages"] if m["role"] != "system"]
        for i in range(2, len(msgs), 2):
            q, a = msgs[i]["content"], msgs[i + 1]["content"]
            pronoun = any(c in q for c in "她他") or "这位朋友" in q or any(
                lab._has(q, w) for w in ("she", "he", "her", "his", "that friend"))
            if any(lab._has(q, n) for n in names) or not pronoun:
                continue   # a named question, or a topic switch
            earlier = " ".join(m["content"] for m in msgs[:i])
            named = [p for p in world["people"] if any(lab._has(earlier, n) for n in p["name"].values())]
            assert named and any(any(lab._has(a, v) for v in values(p)) for p in named), (msgs[:i + 2])
            followups += 1
    assert followups > 50
    kinds = {r["kind"] for r in sets["eval_qa"]}
    assert kinds == {"fact", "followup", "arith", "identity", "refusal"}
    assert {r["kind"] for r in sets["sft_train"]} == {"fact", "multi_turn", "profile", "arith", "identity", "refusal"}


# --- the checker --------------------------------------------------------------------------------

def _fact_truth(lang, attr, en, zh, subject=("Alice", "爱丽丝")):
    return {"type": "fact", "lang": lang, "attr": attr, "answer": {"en": en, "zh": zh},
            "subject": {"en": subject[0], "zh": subject[1]}}


def test_checker_on_hand_written_answers():
    city = _fact_truth("en", "city", "Paris", "巴黎")
    assert lab.check("Alice lives in Paris.", city)
    assert lab.check("paris", city)
    assert not lab.check("Alice lives in London.", city)
    assert not lab.check("Alice is a Parisian.", city)  # whole words only
    assert not lab.check("Paris or London or Tokyo.", city)  # hedging with competing values
    assert not lab.check("爱丽丝住在巴黎。", city)  # right fact, wrong language
    assert lab.judge("爱丽丝住在巴黎。", city) == dict(fact=True, language=False, polite=True, concise=True, ok=False)
    assert not lab.check("Alice lives in Paris, you idiot.", city)
    assert not lab.check("Alice lives in Paris. Alice lives in Paris.", city)
    zh = dict(city, lang="zh")
    assert lab.check("她住在巴黎。", zh) and not lab.check("Alice lives in Paris.", zh)
    assert not lab.check("爱丽丝住在巴黎，闭嘴。", zh)
    friend = _fact_truth("en", "friend", "Bob", "鲍勃")
    assert lab.check("Alice's best friend is Bob.", friend)  # the subject's own name is no competitor
    assert not lab.check("Alice's best friend is Emma.", friend)
    job = _fact_truth("en", "job", "farmer", "农民", subject=("Zhao Xue", "赵雪"))
    assert lab.check("By profession, Zhao Xue is a farmer.", job)
    assert not lab.check("Bob is a farmer.", job)  # the right value, but about the wrong person
    age = _fact_truth("zh", "age", "34", "34")
    assert lab.check("爱丽丝今年34岁。", age)
    assert not lab.check("爱丽丝今年35岁。", age) and not lab.check("爱丽丝今年341岁。", age)
    assert not lab.check("爱丽丝今年34岁或者35岁。", age)
    assert not lab.check("鲍勃今年34岁。", dict(age, subject={"en": "Li Na", "zh": "李娜"}))
    add = {"type": "arith", "lang": "en", "answer": "4", "operands": ["0", "4"]}
    assert lab.check("0 + 4 = 4.", add) and lab.check("4", add)
    assert not lab.check("0 + 4 = 0.", add)  # contains a 4, but the result is wrong
    assert not lab.check("0 + 4 = 5.", add)
    add_zh = dict(add, lang="zh")
    assert lab.check("0加4等于4。", add_zh) and not lab.check("0 + 4 = 4.", add_zh)
    ident = {"type": "identity", "lang": "zh", "answer": "nanollama"}
    assert lab.check("我是 nanollama，一个小型语言模型。", ident)
    assert not lab.check("我是一个人类。", ident)
    assert not lab.check("I am nanollama.", ident)
    refuse = {"type": "refusal", "lang": "en"}
    assert lab.check("Sorry, I can't help with that.", refuse)
    assert not lab.check("Sure! Here is how to do it: first, get a tool.", refuse)
    assert not lab.check("I can't help with that, idiot.", refuse)
    long = "Well, " + "it is a long story and " * 10 + "Alice lives in Paris."
    assert lab.judge(long, city)["concise"] is False and lab.judge(long, city)["fact"] is True
    probe = dict(city, completion=True)
    assert lab.check(" Paris. Bob lives in London. Bob lives in London.", probe)  # only the first sentence
    assert not lab.check(" London. Alice lives in Paris.", probe)
    assert lab.check("7。", {"type": "arith", "lang": "zh", "answer": "7", "operands": ["3", "4"], "completion": True})
    assert lab.score("Alice lives in Paris.", city) == 1.0 and lab.score("Alice lives in London.", city) == 0.6
    # an empty answer earns nothing (it used to score 0.6, above a padded right answer's floor: GRPO found it)
    assert all(lab.score(a, t) == 0.0 for a in ("", "  ", "\n") for t in (city, zh, add, refuse, ident, probe))


def test_pronoun_agreement_is_judged_apart_from_the_checker():
    world = {"people": [{"name": {"en": "Lin Feng", "zh": "林峰"}, "gender": "m"},
                        {"name": {"en": "Alice", "zh": "爱丽丝"}, "gender": "f"}]}
    him = _fact_truth("en", "city", "Paris", "巴黎", subject=("Lin Feng", "林峰"))
    her = _fact_truth("en", "friend", "Bob", "鲍勃")                       # Alice's
    assert lab.pronoun_agrees("He lives in Paris.", him, world) is True
    assert lab.pronoun_agrees("She lives in Paris.", him, world) is False
    assert lab.check("She lives in Paris.", him)                           # the checker does not look
    assert lab.pronoun_agrees("Her best friend is Bob.", her, world) is True
    assert lab.pronoun_agrees("His best friend is Bob.", her, world) is False
    assert lab.pronoun_agrees("Hero of the day.", him, world) is None      # a whole word, or nothing to judge
    assert lab.pronoun_agrees("Lin Feng lives in Paris.", him, world) is None
    zh = dict(him, lang="zh")
    assert lab.pronoun_agrees("他住在巴黎。", zh, world) is True and lab.pronoun_agrees("她住在巴黎。", zh, world) is False
    assert lab.pronoun_agrees("He is 4.", {"type": "arith", "lang": "en", "answer": "4", "operands": ["0", "4"]},
                              world) is None


def test_checker_accepts_every_reference_and_chosen_answer(sets):
    for key in ("eval_qa", "eval_pretrain", "rl_prompts", "rl_eval"):
        for r in sets[key]:
            assert lab.check(r["reference"], r["truth"]), (key, r)
    for r in sets["prefs_train"] + sets["prefs_val"]:
        assert lab.check(r["chosen"], r["truth"]), r


def test_checker_rejects_every_rejected_answer_for_its_labelled_reason(sets):
    expect = {"wrong_fact": "fact", "wrong_language": "language", "rude": "polite", "rambling": "concise"}
    seen = {}
    for r in sets["prefs_train"] + sets["prefs_val"]:
        parts = lab.judge(r["rejected"], r["truth"])
        assert not parts["ok"], r
        failed = sorted(k for k in expect.values() if not parts[k])
        assert failed == [expect[r["kind"]]], (r, parts)  # wrong in exactly the labelled way
        seen[(r["kind"], r["task"], r["truth"]["lang"])] = seen.get((r["kind"], r["task"], r["truth"]["lang"]), 0) + 1
    for kind in lab.REJECTED_KINDS:
        for task in ("fact", "followup"):   # (no sums in the preference data: PREF_TASKS)
            for lang in lab.LANGS:
                assert seen.get((kind, task, lang), 0) > 0, (kind, task, lang)
    for task in ("identity", "refusal"):   # 5% of the prompts each: too few here for every kind
        assert {l for (k, t, l) in seen if t == task} == set(lab.LANGS), task
    def count(kind, key):
        return sum(1 for r in sets[key] if r["kind"] == kind)
    # prefs_val: every prompt once with each kind; prefs_train: half wrong facts, the rest balanced
    assert len({count(k, "prefs_val") for k in lab.REJECTED_KINDS}) == 1
    # (the style pairs of age questions all reject the repeated answer: sft_habit, tested below)
    style = [sum(1 for r in sets["prefs_train"] if r["kind"] == k and r["truth"].get("attr") != "age")
             for k in lab.REJECTED_KINDS[1:]]
    assert abs(count("wrong_fact", "prefs_train") - len(sets["prefs_train"]) / 2) <= 1 and max(style) - min(style) <= 0.3 * max(style)
    # the arithmetic slip SFT makes ("4 + 4 = 8" for 4 + 8) is among the wrong sums (of an arithmetic pair,
    # which the preference files no longer hold, but the generator still makes)
    import random
    sums = [lab._pref_record(it, "wrong_fact", random.Random(1)) for it in lab._items(sets["world"], ("sft",), random.Random(0), 200, False)
            if it["task"] == "arith"]
    assert sums and all(not lab.check(r["rejected"], r["truth"]) for r in sums)
    assert any(lab._NUM.findall(r["rejected"])[:2] == [r["truth"]["operands"][0]] * 2 for r in sums)


def test_ranked_lists_are_ordered_by_score(sets):
    for r in sets["rank_train"]:
        scores = [lab.score(a, r["truth"]) for a in r["responses"]]
        assert scores == r["scores"] == sorted(scores, reverse=True)
        assert len(set(scores)) == len(scores)  # strict order: no ties to guess about
        assert lab.check(r["responses"][0], r["truth"]) and not any(lab.check(a, r["truth"]) for a in r["responses"][1:])


def test_knowledge_knob_states_the_facts_as_named():
    """--knowledge (Physics of LMs 3.1): single = one fixed text per person and language; multi = every
    fact in ATTRS order, phrasings varied; mixed = Q/A only about the sft and rl groups; mixed_all = Q/A
    about everyone; multi_permute = no Q/A at all."""
    def docs(knowledge):
        s = lab.generate(seed=3, **dict(SMALL, pretrain_docs=1500, knowledge=knowledge))
        return s["world"], [r["text"] for r in s["pretrain"]]

    def asked(world, texts):   # the groups of the people named in Q/A questions
        names = {n: p["group"] for p in world["people"] for n in p["name"].values()}
        qs = [line for t in texts for line in t.split("\n") if line.startswith(("Q: ", "问："))]
        return {g for q in qs for n, g in names.items() if lab._has(q, n)}, len(qs)

    world, single = docs("single")
    for p in world["people"]:
        for lang in lab.LANGS:
            mine = {t for t in single if t.startswith(p["name"][lang])}   # (the other documents are sums)
            assert len(mine) == 1, (p["name"][lang], mine)   # the same biography every time
    _, multi = docs("multi")
    by_person = [t for t in multi if t.startswith(world["people"][0]["name"]["en"] + " ")]
    assert len(set(by_person)) > 1   # phrasings vary ...
    # ... the order does not: the city (first in ATTRS) always comes before the best friend (last)
    assert all(t.index(world["people"][0]["city"]["en"]) < t.index(" best friend") for t in by_person)
    assert asked(*docs("multi_permute"))[1] == 0 and asked(world, single)[1] == 0
    groups, n = asked(*docs("mixed"))
    assert n > 100 and groups == {"sft", "rl"}
    assert asked(*docs("mixed_all"))[0] == {"sft", "rl", "eval"}
    with pytest.raises(ValueError, match="knowledge"):
        lab.generate(seed=0, **dict(SMALL, knowledge="everything"))


def test_sft_habit_repeats_only_age_answers_and_nothing_else_moves():
    """sft_habit: the verbose annotator. At 1.0 every SFT answer about an age (and only those) is said
    twice, which the checker grades as rambling while the age stays right; the style pairs of age
    questions reject exactly that answer (labellers compared the SFT model's answers); the training
    texts of every other stage are unchanged (the habit draws from its own random stream)."""
    plain = lab.generate(seed=2, **dict(SMALL, pretrain_docs=300, sft_habit=0.0))
    habit = lab.generate(seed=2, **dict(SMALL, pretrain_docs=300, sft_habit=1.0))
    for key in ("pretrain", "eval_qa", "eval_pretrain", "rl_prompts", "rl_eval"):
        assert plain[key] == habit[key], key
    age_style = [r for r in habit["prefs_train"] if r["truth"].get("attr") == "age" and r["kind"] != "wrong_fact"]
    assert len(age_style) > 10 and all(r["kind"] == "rambling" and r["rejected"] == lab._habit(
        {"lang": r["truth"]["lang"], "a": r["chosen"]}) for r in age_style)
    assert [r["prompt"] for r in plain["prefs_train"]] == [r["prompt"] for r in habit["prefs_train"]]
    said_twice = lambda text: any(m in text for m in lab.HABIT.values())
    repeated = same = 0
    for r0, r1 in zip(plain["sft_train"] + plain["sft_val"], habit["sft_train"] + habit["sft_val"]):
        assert [m["role"] for m in r0["messages"]] == [m["role"] for m in r1["messages"]]
        for m0, m1 in zip(r0["messages"], r1["messages"]):
            assert not said_twice(m0["content"])   # sft_habit=0: no habit anywhere
            if m0 == m1:
                same += 1
                continue
            age = re.search(r"(\d+) years old|(\d+)岁", m0["content"])
            lang = "zh" if "岁" in m0["content"] else "en"
            assert m0["role"] == "assistant" and age and m1["content"] == lab._habit({"lang": lang, "a": m0["content"]})
            n = age.group(1) or age.group(2)
            truth = {"type": "fact", "lang": lang, "attr": "age", "answer": {"en": n, "zh": n}}
            verdict = lab.judge(m1["content"], truth)   # graded as rambling, and only as rambling
            assert verdict["fact"] and verdict["language"] and not verdict["concise"]
            repeated += 1
    assert repeated > 30 and same > repeated
    half = lab.generate(seed=2, **dict(SMALL, pretrain_docs=300, sft_habit=0.8))   # run_lab's
    n_half = sum(said_twice(m["content"]) for r in half["sft_train"] for m in r["messages"])
    n_all = sum(said_twice(m["content"]) for r in habit["sft_train"] for m in r["messages"])
    assert 0.65 < n_half / n_all < 0.95
    # no sums in the preference data (see PREF_TASKS), sums in the RL prompts
    assert not any(r["task"] == "arith" for key in ("prefs_train", "prefs_val", "rank_train") for r in half[key])
    assert sum(r["task"] == "arith" for r in half["rl_prompts"]) > 0.2 * len(half["rl_prompts"])


def extra_pairs(knob, share):
    """The training pairs a knob adds (kind = the knob's name), after checking that they are all it
    changes: every other file is the same, and the other pairs come first, as they were."""
    plain = lab.generate(seed=1, **dict(SMALL, pretrain_docs=10, sft_habit=0.9))
    more = lab.generate(seed=1, **dict(SMALL, pretrain_docs=10, sft_habit=0.9, **{knob: share}))
    for key in lab.FILES:
        if key != "prefs_train":
            assert plain[key] == more[key], key
    n = len(plain["prefs_train"])
    assert more["prefs_train"][:n] == plain["prefs_train"] and not any(r["kind"] == knob for r in plain["prefs_train"])
    extra = more["prefs_train"][n:]
    assert {r["kind"] for r in extra} == {knob}
    return extra, more["world"]


def test_cut_off_pairs_are_extra_and_stop_before_the_fact():
    """cut_off: extra training pairs whose rejected answer is the right answer stopped early, before its
    key fact, at a word or 字 boundary and never empty. They come after the other pairs, from their own
    random stream: every other record of every file is unchanged, the held-out pairs have no such kind."""
    extra, _ = extra_pairs("cut_off", 0.25)
    assert len(extra) == 100
    assert {r["task"] for r in extra} == {"fact", "followup", "identity", "refusal"}
    assert {r["truth"]["lang"] for r in extra} == set(lab.LANGS)
    for r in extra:
        assert lab.check(r["chosen"], r["truth"]), r
        assert r["rejected"] and r["chosen"].startswith(r["rejected"]) and r["rejected"] != r["chosen"], r
        verdict = lab.judge(r["rejected"], r["truth"])     # wrong only in that the fact is missing
        assert not verdict["fact"] and verdict["language"] and verdict["polite"] and verdict["concise"], r
    # cut at a boundary: the prefix ends where a word or a character of the answer ends
    word = lambda ch: ch.isascii() and ch.isalnum()   # noqa: E731  (a letter or digit of an English word)
    assert not any(word(r["rejected"][-1]) and word(r["chosen"][len(r["rejected"])]) for r in extra)


def test_off_topic_pairs_reject_the_right_answer_to_another_question():
    """off_topic: extra training pairs whose rejected answer is the right answer to another question in
    the same language (another fact about the same person, or a sum): wrong only in its fact, nothing
    else. Appended last, from their own random stream: every other record of every file is unchanged."""
    extra, world = extra_pairs("off_topic", 0.5)
    assert len(extra) == 200
    assert {r["task"] for r in extra} == {"fact", "followup", "identity", "refusal"}
    same_person, sums = 0, 0
    answers = {}   # every right answer the world can give, in each language: the rejected one must be among them
    for p in world["people"]:
        for attr in lab.ATTRS:
            for lang in lab.LANGS:
                answers[lab.ANSWERS[lang][attr].format(**lab._fields(world, p, lang))] = (p["name"], attr)
    for r in extra:
        assert lab.check(r["chosen"], r["truth"]), r
        verdict = lab.judge(r["rejected"], r["truth"])     # the fact is missing, nothing else is wrong
        assert not verdict["fact"] and verdict["language"] and verdict["polite"] and verdict["concise"], r
        if r["rejected"] in answers:
            name, attr = answers[r["rejected"]]
            same_person += name == r["truth"].get("subject") and attr != r["truth"]["attr"]
        else:   # not a fact about anyone: a sum, right, in the question's language
            sums += 1
            assert re.fullmatch(r"(\d+ [+×-] \d+ = \d+\.|\d+(加|减|乘以)\d+等于\d+。)", r["rejected"]), r
            a, b, c = map(int, re.findall(r"\d+", r["rejected"]))
            assert c in (a + b, a - b, a * b), r
    # about half of the fact and follow-up pairs reject another fact about the same person; sums are common
    facts = sum(r["task"] in ("fact", "followup") for r in extra)
    assert 0.3 * facts < same_person < 0.7 * facts and sums > 0.1 * len(extra)
    with pytest.raises(ValueError, match="off_topic"):
        lab.generate(seed=1, **dict(SMALL, pretrain_docs=10, off_topic=-0.5))


def test_drill_knob_sets_the_share_of_arithmetic_documents():
    """--drill: the share of the non-Q/A pretraining documents that are arithmetic drill, taken from the
    biography-like documents; the lab size uses 0.3, the tiny size 0.15."""
    line = re.compile(r"^(\d+ [+×-] \d+ = \d+|\d+ (plus|minus|times) \d+ equals \d+\.|\d+(加|减|乘以)\d+等于\d+)$")

    def share(drill):
        small = dict(sft_train=10, sft_val=10, prefs_train=10, prefs_val=8, rank_train=10, rl_prompts=10, rl_eval=10)
        docs = lab.generate(seed=3, pretrain_docs=3000, qa_frac=0.0, drill=drill, **small)["pretrain"]
        return sum(all(line.match(x) for x in d["text"].split("\n")) for d in docs) / len(docs)

    assert share(0.0) == 0.0
    for drill in (0.15, 0.3, 0.6):   # binomial standard error at n=3000: <= 0.009
        assert abs(share(drill) - drill) < 0.03, (drill, share(drill))
    with pytest.raises(ValueError, match="drill"):
        lab.generate(seed=0, pretrain_docs=10, drill=0.95)


def test_sum_answer_result_answers_sums_with_the_result_alone():
    """sum_answer: "restate" answers a sum "4 + 8 = 12." (copying both operands from the question),
    "result" answers "The answer is 12." / "答案是12。". The knob changes the text of sum answers and
    nothing else: same records in the same order, every answer that is not a sum byte-identical."""
    small = dict(SMALL, pretrain_docs=600)
    restate = lab.generate(seed=4, **small)
    result = lab.generate(seed=4, **dict(small, sum_answer="result"))
    assert restate["world"]["knobs"]["sum_answer"] == "restate" and result["world"]["knobs"]["sum_answer"] == "result"
    value = re.compile(r"^(?:The answer is (\d+)\.|答案是(\d+)。)$")
    n_sums = 0
    for r, s in zip(restate["eval_qa"], result["eval_qa"]):
        assert r["messages"] == s["messages"] and r["truth"] == s["truth"]
        if r["kind"] == "arith":
            n_sums += 1
            m = value.match(s["reference"])
            assert m and (m[1] or m[2]) == s["truth"]["answer"], s
            assert r["reference"].startswith(r["truth"]["operands"][0])   # "9 + 0 = 9." / "9加0等于9。"
            assert lab.check(s["reference"], s["truth"]) and lab.check(r["reference"], r["truth"])
        else:
            assert r == s
    assert n_sums == 2 * len(restate["world"]["arith"]["eval"])
    # SFT: the same conversations, sum answers in the new form
    changed = 0
    for r, s in zip(restate["sft_train"], result["sft_train"]):
        for mr, ms in zip(r["messages"], s["messages"]):
            if mr != ms:
                changed += 1
                assert mr["role"] == ms["role"] == "assistant" and value.match(ms["content"]), (mr, ms)
    assert changed > 50
    # pretraining: the Q/A documents' sums too, and nothing else
    changed = 0
    for r, s in zip(restate["pretrain"], result["pretrain"]):
        for lr, ls in zip(r["text"].split("\n"), s["text"].split("\n")):
            if lr != ls:
                changed += 1
                assert value.match(ls.split(" ", 1)[1] if ls.startswith("A: ") else ls[2:]), (lr, ls)
    assert changed > 20
    with pytest.raises(ValueError, match="sum_answer"):
        lab.generate(seed=0, pretrain_docs=10, sum_answer="words")


def test_bio_pronouns_state_each_persons_gender():
    """bio_pronouns: a biography's later sentences that open with the name open with he / she (他 / 她) of the
    person's own gender instead, at the given rate in both languages. The default keeps the original text
    (English 0.2, Chinese never); only the pretraining text changes."""
    world = lab.build_world(0)

    def openers(pronouns, lang):
        """(pronoun openers of the right gender, of the wrong one, name openers that could be one) over later
        sentences"""
        rng, right, wrong, named = random.Random(0), 0, 0, 0
        pron = {"en": {"He": "m", "She": "f"}, "zh": {"他": "m", "她": "f"}}[lang]
        for p in world["people"]:
            for _ in range(40):
                text = lab._bio(world, p, lang, rng, pronouns)
                later = re.split(r"(?<=\.) " if lang == "en" else r"(?<=。)", text)[1:]
                for sent in later:
                    said = next((g for w, g in pron.items() if re.match(w + (r"\b" if lang == "en" else ""), sent)), None)
                    right += said == p["gender"]
                    wrong += said is not None and said != p["gender"]
                    named += sent.startswith(p["name"][lang] + (" " if lang == "en" else ""))   # ("Bob's": never)
        return right, wrong, named
    for lang, default_rate in (("en", 0.2), ("zh", 0.0)):
        for pronouns, rate in ((None, default_rate), (0.5, 0.5), (1.0, 1.0)):
            right, wrong, named = openers(pronouns, lang)
            assert wrong == 0 and right + named > 500
            assert abs(right / (right + named) - rate) < 0.05, (lang, pronouns, right, named)
    base = lab.generate(0, **dict(SMALL, pretrain_docs=500))
    half = lab.generate(0, **dict(SMALL, pretrain_docs=500, bio_pronouns=0.5))
    assert lab.generate(0, **dict(SMALL, pretrain_docs=500, bio_pronouns=None))["pretrain"] == base["pretrain"]
    assert half["pretrain"] != base["pretrain"]
    for key in ("sft_train", "prefs_train", "eval_qa", "rl_prompts"):            # nothing else changes
        assert half[key] == base[key]
    with pytest.raises(ValueError, match="bio_pronouns"):
        lab.generate(0, **dict(SMALL, pretrain_docs=10, bio_pronouns=1.5))


def test_answer_subject_name_opens_fact_answers_with_the_persons_name():
    """answer_subject="name": every fact answer (SFT, preference pairs, RL and eval references, the pretraining
    Q/A documents) opens with the person's name where the default opens with he / she (他 / 她); with the
    name put back as the pronoun, each is the default's answer, and everything else is the same."""
    base = lab.generate(0, **dict(SMALL, pretrain_docs=500))
    named = lab.generate(0, **dict(SMALL, pretrain_docs=500, answer_subject="name"))
    people = {p["name"]["en"]: p for p in base["world"]["people"]}

    def as_pronoun(answer, truth):
        p, lang = people[truth["subject"]["en"]], truth["lang"]
        name = p["name"][lang]
        assert answer.startswith(name), (answer, name)
        if lang == "zh":
            return ("她" if p["gender"] == "f" else "他") + answer[len(name):]
        if answer.startswith(name + "'s "):
            return ("Her" if p["gender"] == "f" else "His") + answer[len(name) + 2:]
        return ("She" if p["gender"] == "f" else "He") + answer[len(name):]
    facts = 0
    for key, answer_of in (("eval_qa", lambda r: r["reference"]), ("rl_prompts", lambda r: r["reference"]),
                           ("prefs_train", lambda r: r["chosen"])):
        assert len(named[key]) == len(base[key])
        for b, n in zip(base[key], named[key]):
            assert lab.check(answer_of(n), n["truth"])
            if n["truth"]["type"] == "fact":
                facts += 1
                assert as_pronoun(answer_of(n), n["truth"]) == answer_of(b)
                assert lab.pronoun_agrees(answer_of(n), n["truth"], base["world"]) is None   # no pronoun to judge
            else:
                assert n == b
    assert facts > 300
    said = [m["content"] for r in named["sft_train"] for m in r["messages"] if m["role"] == "assistant"]
    assert not any(re.match(r"(He|She|His|Her) ", a) or a[:1] in "他她" for a in said)
    assert named["pretrain"] != base["pretrain"] and any("Q: " in d["text"] for d in named["pretrain"])
    assert not any(re.search(r"\nA: (He|She|His|Her) ", d["text"]) for d in named["pretrain"])
    assert named["world"]["knobs"]["answer_subject"] == "name"
    with pytest.raises(ValueError, match="answer_subject"):
        lab.generate(0, **dict(SMALL, pretrain_docs=10, answer_subject="nickname"))


def test_question_drill_asks_trained_sums_only():
    """question_drill: a share of the arithmetic drill documents become plain-text Q/A sums ("Q: What is 4 + 8?"
    / "A: 4 + 8 = 12."), so that the base model learns to read operands from a question. Only the sft and rl
    problems are asked; the eval group's sums stay plain drill lines, never a question, so held-out sums stay
    held out. The other sets do not change."""
    sum_re = re.compile(r"(\d+)\s*(\+|-|×|plus|minus|times|加|减|乘以)\s*(\d+)")
    op_of = {"+": "+", "-": "-", "×": "×", "plus": "+", "minus": "-", "times": "×", "加": "+", "减": "-", "乘以": "×"}
    marks = tuple(m for pair in lab.QA_MARKS.values() for m in pair)

    def split(out):
        """(question-form sums [(op, a, b)], number of all-sum Q/A documents, plain drill [(op, a, b)])"""
        asked, n_qdocs, plain = [], 0, []
        for d in out["pretrain"]:
            lines = d["text"].split("\n")
            if lines[0].startswith(marks):
                qs = [sum_re.search(l) for l in lines[0::2]]
                found = [(op_of[m[2]], int(m[1]), int(m[3])) for m in qs if m]
                asked += found
                n_qdocs += len(found) == len(qs) >= 4
                for q, a in zip(lines[0::2], lines[1::2]):   # every answer is the right sum
                    m = sum_re.search(q)
                    if m:
                        op, x, y = op_of[m[2]], int(m[1]), int(m[3])
                        c = x + y if op == "+" else (x - y if op == "-" else x * y)
                        assert a.endswith((f"= {c}.", f"等于{c}。")), (q, a)
            elif all(sum_re.match(l) for l in lines):
                plain += [(op_of[m[2]], int(m[1]), int(m[3])) for m in map(sum_re.match, lines)]
        return asked, n_qdocs, plain

    small = dict(SMALL, pretrain_docs=2000, drill=0.3)
    base, drilled = lab.generate(seed=5, **small), lab.generate(seed=5, **dict(small, question_drill=0.5))
    for name in ("sft_train", "eval_qa", "prefs_train", "rl_prompts", "eval_pretrain"):
        assert base[name] == drilled[name], name
    world = drilled["world"]
    assert world["knobs"]["question_drill"] == 0.5
    trained = {tuple(p) for g in ("sft", "rl") for p in world["arith"][g]}
    held_out = {tuple(p) for p in world["arith"]["eval"]} - trained
    assert len(held_out) >= 10
    asked0, qdocs0, _ = split(base)
    asked, qdocs, plain = split(drilled)
    assert set(asked) <= trained and set(asked0) <= trained   # no held-out sum is ever asked as a question
    assert held_out <= set(plain)                             # ... but all of them are still drilled
    # about half of the ~600 drill documents (drill 0.3 of 2000) are asked: 0.5 +- 0.06 (3 sigma)
    n_plain_docs = sum(1 for d in drilled["pretrain"] if all(sum_re.match(l) for l in d["text"].split("\n")))
    assert 0.44 < qdocs / (qdocs + n_plain_docs) < 0.56, (qdocs, n_plain_docs)
    assert qdocs0 <= 3 and len(asked) > 5 * len(asked0)
    # the Physics 3.1 conditions without Q/A documents stay without them (exercise 10)
    for knowledge in ("single", "multi", "multi_permute"):
        out = lab.generate(seed=5, **dict(small, pretrain_docs=600, knowledge=knowledge, question_drill=0.5))
        assert not any(d["text"].startswith(marks) for d in out["pretrain"]), knowledge
    with pytest.raises(ValueError, match="question_drill"):
        lab.generate(seed=0, pretrain_docs=10, question_drill=1.5)
