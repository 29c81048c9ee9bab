"""run_lab.py, the lab pipeline: the tiny size runs end to end (every stage is the real script, as a
subprocess) and each stage moves its numbers the right way; a second run skips everything; deleting
one stage's output re-runs exactly that stage and those that read it, and reproduces the same numbers;
the run lands within tolerance of the golden values in tests/golden_lab_tiny.json. Plus the pieces
without a pipeline: the up-to-date rule on hand-made stages, and the SVG plot.

The pipeline runs once for the module (~2-3 minutes of one CPU core at the tiny size)."""
import contextlib
import json
import math
import re
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import run_lab  # noqa: E402

GOLDEN = REPO / "tests" / "golden_lab_tiny.json"
ARTEFACTS = {"data": "data/world.json", "prepare": "tokens/meta.json", "pretrain": "pretrain/final.pt",
             "sft": "sft/final.pt", "reward": "reward/final.pt", "dpo": "dpo/metrics.json", "ppo": "ppo/metrics.json",
             "grpo": "grpo/metrics.json", "eval": "eval/eval.json"}


def pipeline(out, *extra):
    """python run_lab.py --size tiny --out_dir OUT ...; returns the completed process (output kept)."""
    r = subprocess.run([sys.executable, str(REPO / "run_lab.py"), "--size", "tiny", "--out_dir", str(out), *extra],
                       cwd=REPO, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"run_lab.py failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r


def statuses(stdout):
    """{stage: "run" | "skip"} from the pipeline's "[run] NAME: ..." / "[skip] NAME: ..." lines."""
    out = {}
    for line in stdout.splitlines():
        for tag in ("run", "skip"):
            if line.startswith(f"[{tag}] "):
                out[line.split()[1].rstrip(":")] = tag
    return out


def mtimes(out):
    return {k: os.stat(out / p).st_mtime_ns for k, p in ARTEFACTS.items()}


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    out = tmp_path_factory.mktemp("lab") / "run"
    r = pipeline(out)
    report = json.loads((out / "report.json").read_text())
    return {"out": out, "stdout": r.stdout, "report": report, "mtimes": mtimes(out)}


# -----------------------------------------------------------------------------
# One run, end to end


def test_every_stage_ran_and_printed_its_command(lab):
    stdout = lab["stdout"]
    assert statuses(stdout) == {s: "run" for s in ARTEFACTS} | {"tokenizer": "skip"}
    for script in ("data/lab.py", "data/prepare.py", "pretrain.py", "sft.py", "reward.py", "dpo.py", "rlhf_ppo.py",
                   "grpo.py", "run_lab.py --evaluate"):
        assert f"python {script}" in stdout   # the copy-pastable line, printed before the stage ran
    # the stages that always run alone get the cores the others share (--jobs defaults to min(2, cores))
    alone = min(2, os.cpu_count() or 1)
    for stage in lab["report"]["stages"]:
        if stage["stage"] != "tokenizer":
            threads = alone if stage["stage"] in run_lab.RUN_ALONE else 1
            assert stage["wall_s"] > 0 and stage["cpu_s"] > 0
            assert stage["command"].startswith(f"OMP_NUM_THREADS={threads} python"), stage["command"]


def test_each_stage_does_its_job(lab):
    """The directions the lab exists to show, on held-out data (numbers of the reference run in
    tests/golden_lab_tiny.json)."""
    c = lab["report"]["card"]
    # pretraining learned the corpus: far below the uniform-guess loss ln(2048) = 7.6
    assert c["pretrain.val_loss"] < 2.5
    # SFT: the chat model answers held-out questions the base model (same questions, chat template) cannot
    assert c["sft.accuracy"] > c["base.accuracy"] + 0.02
    # the reward model ranks held-out pairs well above chance; every kind that shows in the words
    # (rude, rambling, wrong language) clearly. A wrong fact about an unseen person can only be told
    # from knowledge, which a model this small barely has: chance level (0.5 in the reference run),
    # tracked by the golden values rather than asserted here.
    assert c["reward.accuracy"] > 0.7
    # (> 0.65: over the perturbation matrix the lowest were rude 0.94, rambling 0.98, wrong language 0.86)
    assert all(c[f"reward.accuracy.{k}"] > 0.65 for k in ("rambling", "rude", "wrong_language"))
    # DPO, PPO and GRPO each moved away from SFT; DPO and PPO are not significantly worse than SFT on
    # ground truth (the upper end of the 95% paired-bootstrap interval of the gain is above 0). What this
    # tiny size does NOT show is that they help: over the perturbation matrix (tests/perturb.py golden, 6
    # cells) SFT answered 52 of 230 right, DPO 57 (+2.2, CI -0.9..+5.2), PPO 53-59 (+0.4..+3.0, CI upper
    # end 3.5..7.0). GRPO's 10 iterations lost 7-10 answers (-3.0..-4.3, significantly in all 6 cells),
    # so the golden values bound it, with their measured spread, instead of a sign asserted here.
    for name in ("dpo", "ppo", "grpo"):
        gain, lo, hi = lab["report"][name]["gain_vs_sft"]
        assert name == "grpo" or hi > 0, (name, gain, lo, hi)
        assert c[f"{name}.kl_to_sft"] > 0, name


def test_report_is_readable_and_consistent(lab):
    out, rep = lab["out"], lab["report"]
    md = (out / "report.md").read_text()
    images = [line[line.index("](") + 2:-1] for line in md.splitlines() if line.startswith("![")]
    assert len(images) >= 5 and "plots/pretrain.svg" in images
    for rel in images:   # relative paths that exist, each a well-formed SVG with at least one line drawn
        root = ET.parse(out / rel).getroot()
        assert root.tag.endswith("svg") and root.findall(".//{http://www.w3.org/2000/svg}polyline")
    for title in ("Report card", "side by side", "Reward model", "Stages: time and commands"):
        assert title in md
    # the card's numbers are the evaluation stage's and the stages' own outputs, not recomputed guesses
    ev = json.loads((out / "eval" / "eval.json").read_text())
    assert rep["card"]["sft.accuracy"] == round(ev["models"]["sft"]["accuracy"], 4)
    assert rep["card"]["ppo.kl_to_sft"] == round(json.loads((out / "ppo" / "metrics.json").read_text())["kl_to_sft"], 4)
    reward_eval = [r for r in run_lab.load_log(str(out / "reward" / "log.jsonl")) if r.get("event") == "eval"][-1]
    assert rep["card"]["reward.accuracy"] == round(reward_eval["accuracy"], 4)
    # the held-out pairs ranked three ways: DPO's implicit reward and SFT's log-probs come from DPO's own log
    dpo_log = run_lab.load_log(str(out / "dpo" / "log.jsonl"))
    dpo_eval, dpo_end = [r for r in dpo_log if r.get("event") == "eval"][-1], json.loads((out / "dpo" / "metrics.json").read_text())
    implicit = rep["reward"]["dpo_implicit"]
    assert implicit["accuracy"] == dpo_eval["accuracy"] and implicit["per_kind"] == dpo_eval["accuracy_by_kind"]
    assert set(implicit["per_kind"]) == set(rep["reward"]["per_kind"]) == set(implicit["sft_logp_per_kind"])
    assert implicit["sft_logp_accuracy"] == dpo_end["pref_logp_accuracy_init"]
    assert "| DPO's implicit reward | " in md and "| reward model (scalar head) | " in md
    assert len(rep["showcase"]) == 8 and set(rep["showcase"][0]["answers"]) == {"base", "sft", "dpo", "ppo", "grpo"}
    # the reward model's win rate and the verdicts behind it (identical answers tie): (wins + ties / 2) / n
    decided = 0
    for name in ("dpo", "ppo", "grpo"):
        wins, losses, ties = rep[name]["reward_wins_losses_ties"]
        assert wins + losses + ties == len(ev["models"][name]["oks"])
        assert (wins + ties / 2) / (wins + losses + ties) == pytest.approx(rep[name]["win_rate_reward"])
        # its 95% interval: the mean of per-question scores 1 / 0.5 / 0 +- 1.96 standard errors
        scores = np.array([1.0] * wins + [0.5] * ties + [0.0] * losses)
        half = 1.96 * scores.std() / np.sqrt(scores.size)
        assert (f"(95% CI {scores.mean() - half:.3f}–{scores.mean() + half:.3f}, n={scores.size}: "
                f"{wins} better, {losses} worse, {ties} tied") in md
        if wins + losses:   # and the verdicts where the answers differ, with their Wilson interval
            decided += 1
            lo, hi = run_lab.wilson(wins, wins + losses)
            assert (f"{ties} tied; where they differ, better in {wins / (wins + losses):.3f} (95% CI {lo:.3f}–{hi:.3f}, "
                    f"n={wins + losses})") in md
    assert decided > 0   # the check above ran at least once: some stage changed some answer
    # the reward model's pairwise accuracy, overall and per rejected kind, with its n and Wilson interval
    rv = rep["reward"]
    assert sum(rv["per_kind_n"].values()) == rv["pairs"] == reward_eval["pairs"]
    lo, hi = run_lab.wilson(round(rv["accuracy"] * rv["pairs"]), rv["pairs"])
    assert f"{100 * rv['accuracy']:.1f}% (95% CI {100 * lo:.1f}–{100 * hi:.1f}%, n={rv['pairs']})" in md
    for k, n in rv["per_kind_n"].items():
        assert f"{k} {100 * rv['per_kind'][k]:.1f}% (95% CI " in md and n > 0
    # the empty-answer check: how often the reward model pays more for "" than for the reference answer,
    # recomputed here with reward.py's own scorer
    import torch
    import common
    from reward import load_reward_model, reward_scorer
    rm, rm_meta = load_reward_model(str(out / "reward" / "final.pt"))
    score = reward_scorer(rm, common.checkpoint_tokenizer(rm_meta), torch.device("cpu"), contextlib.nullcontext())
    qa = [json.loads(line) for line in (out / "data" / "eval_qa.jsonl").read_text(encoding="utf-8").splitlines()]
    convs = [r["messages"] for r in qa]
    beats = sum(e > r for e, r in zip(score(convs, [""] * len(qa)), score(convs, [r["reference"] for r in qa])))
    assert ev["empty_answer"]["n"] == len(qa) and ev["empty_answer"]["beats_reference"] == beats
    assert rv["empty_answer"] == ev["empty_answer"]
    assert f"an empty answer outscores the reference answer on {beats} of {len(qa)} held-out questions" in md
    # ... and for the right answer to another held-out question: same language, another kind, the same
    # pick for every run (run_lab.other_questions)
    other = run_lab.other_questions(qa, list(range(len(qa))))
    assert all(qa[j]["truth"]["lang"] == r["truth"]["lang"] and qa[j]["kind"] != r["kind"] for r, j in zip(qa, other))
    assert len(set(other)) > len(qa) // 4                     # many different answers, not one per kind
    wrong = score(convs, [qa[j]["reference"] for j in other])
    beats = sum(o > r for o, r in zip(wrong, score(convs, [r["reference"] for r in qa])))
    assert ev["other_answer"]["n"] == len(qa) and ev["other_answer"]["beats_reference"] == beats
    assert rv["other_answer"] == ev["other_answer"]
    assert f"another question's right answer (same language) outscores it on {beats} of {len(qa)}" in md
    # he / she against the person asked about (not graded): each model's own answers, the world's genders
    from data import lab
    world = json.loads((out / "data" / "world.json").read_text(encoding="utf-8"))
    rows = [json.loads(line) for line in (out / "eval" / "answers.jsonl").read_text(encoding="utf-8").splitlines()]
    cells, strict_cells = [], []
    for name in ("base", "sft", "dpo", "ppo", "grpo"):
        said = [lab.pronoun_agrees(row[name], r["truth"], world) for row, r in zip(rows, qa)]
        right_too = sum(lab.check(row[name], r["truth"]) and v is not False for row, r, v in zip(rows, qa, said))
        said = [v for v in said if v is not None]
        assert ev["models"][name]["pronoun"] == rep[name]["pronoun"] == {"agree": sum(said), "n": len(said),
                                                                         "right_too": right_too}
        cells.append(run_lab.pronoun_cell(rep[name]["pronoun"]))
        strict_cells.append(run_lab.pronoun_cell({"agree": right_too, "n": len(qa)}))
    assert sum(rep[name]["pronoun"]["n"] for name in ("sft", "dpo", "ppo", "grpo")) > 0
    assert "| he / she right (not graded; 95% CI) | " + " | ".join(cells) + " |" in md
    assert "| right, and he / she right too (not graded; 95% CI) | " + " | ".join(strict_cells) + " |" in md


def test_golden_values(lab):
    """The 'golden loss curve' check a student runs after changing the code:
    python run_lab.py --size tiny --golden tests/golden_lab_tiny.json"""
    golden = json.loads(GOLDEN.read_text())
    rows = run_lab.golden_check(lab["report"], str(lab["out"]), golden)
    assert len(rows) > 20
    misses = [r for r in rows if not r[4]]
    assert not misses, "outside the golden tolerance: " + "; ".join(
        f"{k}: golden {g} got {got} (tolerance {tol})" for k, g, got, tol, _ in misses)


# The golden check has teeth: DPO trained toward the rejected answers (every pair read with chosen and
# rejected swapped, so the preference loss and the RPO term both pull toward the rejected answer) must
# land outside the golden tolerances, while the unmodified run above lands inside them. Run in a copy of
# the run directory (the tests below re-use the original).
BROKEN_DPO = """
import sys
sys.path.insert(0, {repo!r})
import dpo
right = dpo.load_groups
dpo.load_groups = lambda *a, **k: [dict(g, ids=g["ids"][::-1], resp_len=g["resp_len"][::-1])   # best last
                                   for g in right(*a, **k)]
dpo.main(sys.argv[1:])   # (returns the metrics dict: not an exit status)
"""


def test_golden_check_fails_a_broken_stage(lab, tmp_path):
    import shutil
    broken = tmp_path / "run"
    shutil.copytree(lab["out"], broken)
    args = run_lab.get_args(["--size", "tiny", "--out_dir", str(broken)])
    stages = {st.name: st for st in run_lab.build_stages(args)}
    shutil.rmtree(broken / "dpo")
    env = {**os.environ, **stages["dpo"].env}
    # Ten times the stage's steps at five times its lr: at its own settings a reversed DPO stays inside the
    # tolerances another CPU's float order needs. Measured once (2-core AVX-512) against golden dpo.accuracy
    # 0.248 +- 0.06 (SFT 0.226): reversed at 3x, 5x and 10x the steps, same lr, inside (10x: 0.200; only
    # its KL missed); at 10x the steps and 5x the lr it lands at 0.087-0.096 in all six perturbation cells
    # (aten default/avx2/avx512 0.091/0.091/0.087, MKL AVX2 0.087, 2 threads 0.096, avx2+2 threads 0.087),
    # missing dpo.accuracy, dpo.kl_to_sft and dpo.reward_gain and nothing else. (With the persona set before
    # this one: golden 0.300, reversed at 3x 0.230.)
    tiny = run_lab.SIZES["tiny"]["dpo"]
    steps = ["--max_steps", str(10 * tiny["max_steps"]), "--lr", str(5 * tiny["lr"]), "--min_lr", str(5 * tiny["min_lr"])]
    for name, code in (("dpo", BROKEN_DPO.format(repo=str(REPO))), ("eval", None)):
        cmd = stages[name].cmd
        argv = [sys.executable, "-c", code, *cmd[1:], *steps] if code else [sys.executable, *cmd]
        r = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"{name} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    run_lab.write_report(str(broken))
    rep = json.loads((broken / "report.json").read_text())
    rows = run_lab.golden_check(rep, str(broken), json.loads(GOLDEN.read_text()))
    misses = {k for k, g, got, tol, ok in rows if not ok}
    assert "dpo.accuracy" in misses and all(k.startswith("dpo.") for k in misses), (misses, rep["card"]["dpo.accuracy"])
    # the stages upstream of DPO are the unmodified ones, and still pass
    assert not any(k.startswith(("pretrain", "sft", "reward")) for k in misses)


# -----------------------------------------------------------------------------
# Idempotence (these two run after the tests above: they re-run stages in the same directory)


def test_rerun_skips_every_stage(lab):
    r = pipeline(lab["out"])
    assert set(statuses(r.stdout).values()) == {"skip"}
    assert mtimes(lab["out"]) == lab["mtimes"]
    assert json.loads((lab["out"] / "report.json").read_text())["card"] == lab["report"]["card"]


def test_deleting_a_stage_reruns_it_and_what_reads_it(lab):
    import shutil
    out = lab["out"]
    shutil.rmtree(out / "dpo")   # PPO does not read DPO's output: only DPO and the evaluation re-run
    r = pipeline(out)
    st = statuses(r.stdout)
    assert {k for k, v in st.items() if v == "run"} == {"dpo", "eval"}
    assert {k for k, v in st.items() if v == "skip"} == {"data", "tokenizer", "prepare", "pretrain", "sft", "reward", "ppo",
                                                            "grpo"}
    now = mtimes(out)
    for k in ("data", "prepare", "pretrain", "sft", "reward", "ppo", "grpo"):
        assert now[k] == lab["mtimes"][k], k
    for k in ("dpo", "eval"):
        assert now[k] != lab["mtimes"][k], k
    # one thread, same seeds, same inputs: the re-run stages reproduce their numbers exactly
    assert json.loads((out / "report.json").read_text())["card"] == lab["report"]["card"]


# -----------------------------------------------------------------------------
# Pieces, without a pipeline


def test_up_to_date_rule(tmp_path, monkeypatch):
    """A stage is skipped only with its artefact, its state file, the same command, unchanged upstream
    artefacts and unchanged source; anything else says why it runs."""
    src = tmp_path / "src.py"
    src.write_text("x = 1\n")
    monkeypatch.setattr(run_lab, "REPO", str(tmp_path))
    up = run_lab.Stage("up", "", ["a.py"], str(tmp_path / "up"), str(tmp_path / "up" / "out.txt"), [], [])
    down = run_lab.Stage("down", "", ["b.py", "--x", "1"], str(tmp_path / "down"), str(tmp_path / "down" / "out.txt"),
                         ["up"], ["src.py"])
    by = {"up": up, "down": down}
    for st in (up, down):   # what run_stage leaves behind after a success
        os.makedirs(st.out)
        Path(st.artefact).write_text(st.name)
        state = {**run_lab.expected_state(st, by), "artefact": run_lab.fingerprint(st)}
        Path(st.out, run_lab.STATE_FILE).write_text(json.dumps(state))
    assert run_lab.up_to_date(down, by)[0] and run_lab.up_to_date(up, by)[0]
    down.cmd = ["b.py", "--x", "2"]
    assert run_lab.up_to_date(down, by) == (False, "its command changed")
    down.cmd = ["b.py", "--x", "1"]
    src.write_text("x = 2\n")
    assert run_lab.up_to_date(down, by) == (False, "source changed: src.py")
    src.write_text("x = 1\n")
    assert run_lab.up_to_date(down, by)[0]
    os.utime(up.artefact, ns=(1, 1))   # upstream re-made: up's own state no longer matches, down must re-run
    assert not run_lab.up_to_date(up, by)[0]
    assert run_lab.up_to_date(down, by) == (False, "upstream output changed: up")
    os.remove(down.artefact)
    assert run_lab.up_to_date(down, by) == (False, f"{down.artefact} does not exist")


def test_svg_plot_and_ticks(tmp_path):
    assert run_lab.nice_ticks(0.13, 0.92) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert run_lab.nice_ticks(0, 250) == [0, 50, 100, 150, 200, 250]
    path = run_lab.svg_plot(str(tmp_path / "p.svg"), "loss <train>", [("a", [0, 10, 20], [3.0, 2.0, 1.5]),
                                                                       ("b", [20], [1.7]), ("empty", [], [])])
    root = ET.parse(path).getroot()   # well-formed XML, the title escaped
    ns = "{http://www.w3.org/2000/svg}"
    # by hand: plot area x 60..490, y 30..275 (640x320 minus margins); x ticks 0..20, y ticks 1.5..3.0,
    # so (0, 3.0) -> (60, 30), (10, 2.0) -> (275, 275 - 245 / 3), (20, 1.5) -> (490, 275)
    assert [p.get("points") for p in root.iter(ns + "polyline")] == ["60.0,30.0 275.0,193.3 490.0,275.0"]
    assert len(list(root.iter(ns + "circle"))) == 4   # few points: each marked
    assert "loss <train>" in [t.text for t in root.iter(ns + "text")]
    assert run_lab.svg_plot(str(tmp_path / "q.svg"), "t", [("empty", [], [])]) is None
    # a long legend label widens the picture instead of running off its right edge
    root = ET.parse(run_lab.svg_plot(str(tmp_path / "w.svg"), "t", [("held-out reward (greedy) " * 2, [0, 1], [1, 2])]))
    width = float(root.getroot().get("width"))
    label = [t for t in root.getroot().iter(ns + "text") if t.text.startswith("held-out")][0]
    assert float(label.get("x")) + 6.5 * len(label.text) <= width
    # log y-axis: 1-2-5 ticks, and equal ratios at equal heights
    assert run_lab.log_ticks(0.7, 7.6) == [0.5, 1, 2, 5, 10]
    root = ET.parse(run_lab.svg_plot(str(tmp_path / "l.svg"), "t", [("a", [0, 1, 2], [10.0, 1.0, 0.1])], logy=True))
    pts = [tuple(map(float, p.split(","))) for p in next(root.getroot().iter(ns + "polyline")).get("points").split()]
    assert pts[0][1] - pts[1][1] == pytest.approx(pts[1][1] - pts[2][1])


def test_confidence_intervals():
    # Wilson score intervals, known values (e.g. Newcombe 1998, table I: 0/10 -> 0 to 0.2775; 5/10 -> 0.2366 to 0.7634)
    assert run_lab.wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert run_lab.wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    lo, hi = run_lab.wilson(400, 500)   # large n: close to the normal interval 0.8 +- 1.96 sqrt(0.16 / 500)
    assert (lo, hi) == pytest.approx((0.8 - 0.0351, 0.8 + 0.0351), abs=0.003)
    # paired bootstrap: the same grades -> no gain and no spread; 30 of 100 questions gained, none lost ->
    # gain 0.3 with the binomial interval 0.3 +- 1.96 sqrt(0.21 / 100) = +-0.090 (to bootstrap accuracy)
    a = [1] * 40 + [0] * 60
    assert run_lab.paired_bootstrap(a, a) == (0.0, 0.0, 0.0)
    b = [1] * 10 + [0] * 30 + [0] * 60
    g, lo, hi = run_lab.paired_bootstrap(a, b)
    assert g == pytest.approx(0.3) and lo == pytest.approx(0.3 - 0.090, abs=0.02) and hi == pytest.approx(0.39, abs=0.02)
    # correlated errors: a paired interval is tighter than one from two independent accuracies
    assert hi - lo < 2 * 1.96 * math.sqrt(0.4 * 0.6 / 100 + 0.1 * 0.9 / 100)


def test_scheduler_runs_independent_stages_side_by_side(tmp_path, monkeypatch):
    """--jobs 2: a stage starts once its inputs are done and two run at once; --jobs 1: one after the
    other. Per-stage CPU time comes from that stage's own process (os.wait4), even side by side."""
    events = tmp_path / "events.txt"

    def stage(name, needs, burn):
        out = tmp_path / "run" / name
        body = (f"import os, time\nopen({str(events)!r}, 'a').write('start {name} %f\\n' % time.time())\n"
                f"t = time.process_time()\nwhile time.process_time() - t < {burn}: pass\ntime.sleep(0.4)\n"
                f"os.makedirs({str(out)!r}, exist_ok=True)\nopen({str(out / 'done')!r}, 'w').write('x')\n"
                f"open({str(events)!r}, 'a').write('end {name} %f\\n' % time.time())\n")
        return run_lab.Stage(name, "", ["-c", body], str(out), str(out / "done"), needs, [])

    def run(jobs):
        events.write_text("")
        fake = [stage("a", [], 0.0), stage("b", ["a"], 0.3), stage("c", ["a"], 0.0), stage("d", ["b", "c"], 0.0)]
        monkeypatch.setattr(run_lab, "build_stages", lambda args: fake)
        got = {}
        monkeypatch.setattr(run_lab, "write_report", lambda out, ran, this_run, announce: got.update(ran=ran, run=this_run))
        args = run_lab.get_args(["--out_dir", str(tmp_path / "run"), "--jobs", str(jobs), "--force"])
        run_lab.run_pipeline(args)
        t = {}
        for line in events.read_text().split("\n"):
            if line:
                what, name, when = line.split()
                t[(what, name)] = float(when)
        cpu = {n: json.loads(Path(st.out, run_lab.STATE_FILE).read_text())["cpu_s"] for n, st in zip("abcd", fake)}
        return t, cpu, got

    t, cpu, got = run(2)
    assert got["ran"] == {n: "ran" for n in "abcd"} and got["run"]["jobs"] == 2
    assert t[("start", "b")] >= t[("end", "a")] and t[("start", "c")] >= t[("end", "a")]
    assert t[("start", "c")] < t[("end", "b")] and t[("start", "b")] < t[("end", "c")]   # side by side
    assert t[("start", "d")] >= max(t[("end", "b")], t[("end", "c")])
    assert cpu["b"] >= 0.25 and cpu["c"] < 0.2   # each stage's own CPU, not its neighbour's
    t, cpu, got = run(1)
    order = sorted(t, key=t.get)
    assert [n for what, n in order if what == "start"] == list("abcd")
    assert all(order[2 * i][1] == order[2 * i + 1][1] for i in range(4))   # each ends before the next starts


def test_stop_after_runs_that_stage_and_its_inputs_only(tmp_path, monkeypatch, capsys):
    """--stop_after follows the inputs, not the list order: PPO is listed before DPO (so that with --jobs 2
    the longest stage starts first), and --stop_after dpo must still not run PPO."""
    names = [s.name for s in run_lab.build_stages(run_lab.get_args(["--out_dir", str(tmp_path / "real")]))]
    assert names.index("ppo") < names.index("dpo")
    run_lab.run_pipeline(run_lab.get_args(["--out_dir", str(tmp_path / "real"), "--stop_after", "dpo", "--dry_run"]))
    planned = re.findall(r"\[would run\] (\w+)", capsys.readouterr().out)
    assert planned == ["data", "prepare", "pretrain", "sft", "reward", "dpo"]
    out = tmp_path / "run"
    fake = [run_lab.Stage(n, "", ["-c", f"import os; os.makedirs({str(out / n)!r}); open({str(out / n / 'x')!r}, 'w')"],
                          str(out / n), str(out / n / "x"), needs, [])
            for n, needs in (("a", []), ("b", ["a"]), ("c", ["a"]), ("d", ["b", "c"]))]
    monkeypatch.setattr(run_lab, "build_stages", lambda args: fake)
    run_lab.run_pipeline(run_lab.get_args(["--out_dir", str(out), "--stop_after", "c", "--jobs", "1"]))
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["a", "c"]


def test_scheduler_failure_shows_the_log(tmp_path, monkeypatch):
    out = tmp_path / "run"
    bad = run_lab.Stage("bad", "", ["-c", "print('the reason it broke'); raise SystemExit(3)"], str(out / "bad"),
                        str(out / "bad" / "x"), [], [])
    monkeypatch.setattr(run_lab, "build_stages", lambda args: [bad])
    with pytest.raises(SystemExit) as e:
        run_lab.run_pipeline(run_lab.get_args(["--out_dir", str(out), "--jobs", "2"]))
    assert "the reason it broke" in str(e.value) and "stage bad failed (exit 3)" in str(e.value)


def test_spread_summary_and_pooled_gains(tmp_path, capsys):
    """tests/perturb.py spread --summarize: mean and spread of every card value over the runs, each
    stage's gain over SFT with its ratio to its spread, and each gain per question kind pooled over the
    runs' questions (the gain is the mean grade difference; its interval comes from one paired bootstrap)."""
    sys.path.insert(0, str(REPO / "tests"))
    import perturb
    rng = np.random.default_rng(0)
    kinds = ["fact"] * 30 + ["arith"] * 20
    runs = {}
    for r, (sft_acc, grpo_acc, ppo_acc) in enumerate([(0.60, 0.80, 0.70), (0.70, 0.85, 0.80), (0.65, 0.90, 0.70)]):
        oks = {m: (rng.random(len(kinds)) < p).astype(int).tolist()
               for m, p in (("sft", sft_acc), ("grpo", grpo_acc), ("ppo", ppo_acc), ("dpo", ppo_acc))}
        run = tmp_path / f"run{r}"
        (run / "eval").mkdir(parents=True)
        (run / "eval" / "eval.json").write_text(json.dumps({"kinds": kinds, "models": {m: {"oks": o} for m, o in oks.items()}}))
        card = {f"{m}.accuracy": sum(o) / len(o) for m, o in oks.items()}
        (run / "report.json").write_text(json.dumps({"card": card}))
        runs[f"run{r}"] = oks
    assert perturb.summarize_spread(str(tmp_path)) == 0
    summary = json.loads((tmp_path / "spread.json").read_text())
    gains = [sum(o["grpo"]) / 50 - sum(o["sft"]) / 50 for o in runs.values()]
    g = summary["values"]["grpo.gain_over_sft"]
    assert g["mean"] == pytest.approx(sum(gains) / 3, abs=1e-4) and g["spread"] == pytest.approx(max(gains) - min(gains), abs=1e-4)
    pooled = {(r["a"], r["b"], r["kind"]): r for r in summary["pooled"]}
    for kind, pick in (("arith", lambda k: k == "arith"), ("all", lambda k: True)):
        a = [x for o in runs.values() for x, k in zip(o["grpo"], kinds) if pick(k)]
        b = [x for o in runs.values() for x, k in zip(o["ppo"], kinds) if pick(k)]
        row = pooled[("grpo", "ppo", kind)]
        assert row["n"] == len(a) and row["gain"] == pytest.approx((sum(a) - sum(b)) / len(a), abs=1e-4)
        gain, lo, hi = run_lab.paired_bootstrap(a, b)
        assert row["ci"] == pytest.approx([lo, hi], abs=1e-4) and lo < row["gain"] < hi
    assert "| grpo − ppo | arith | 60 |" in capsys.readouterr().out


def test_lab_knob_flags_reach_the_data_stage(tmp_path):
    """--cut_off / --sft_habit / --knowledge / --sum_answer / --question_drill / --off_topic override the size's data knobs on
    data/lab.py's command line; without them the size's own values go there (lab: no cut-off pairs, half the
    drill asked as questions; tiny: 0.125 cut-off pairs, so CI runs them, and no question drill; sums restated
    at every size)."""
    def data_cmd(*flags):
        args = run_lab.get_args(["--out_dir", str(tmp_path / "run"), *flags])
        return next(st.cmd for st in run_lab.build_stages(args) if st.name == "data")

    def knob(cmd, name):
        return cmd[cmd.index(name) + 1] if name in cmd else None
    assert knob(data_cmd(), "--cut-off") is None and knob(data_cmd(), "--sft-habit") == "0.9"
    assert knob(data_cmd(), "--sum-answer") is None and knob(data_cmd("--size", "tiny"), "--sum-answer") is None
    assert knob(data_cmd("--size", "tiny"), "--cut-off") == "0.125"
    assert knob(data_cmd(), "--question-drill") == "0.5" and knob(data_cmd("--size", "tiny"), "--question-drill") is None
    assert knob(data_cmd(), "--bio-pronouns") is None and knob(data_cmd(), "--answer-subject") is None
    cmd = data_cmd("--cut_off", "0.25", "--sft_habit", "0", "--knowledge", "single", "--sum_answer", "result",
                   "--question_drill", "0", "--off_topic", "0.5", "--bio_pronouns", "0.5", "--answer_subject", "name")
    assert (knob(cmd, "--cut-off"), knob(cmd, "--sft-habit"), knob(cmd, "--knowledge"), knob(cmd, "--sum-answer"),
            knob(cmd, "--question-drill"), knob(cmd, "--off-topic"), knob(cmd, "--bio-pronouns"),
            knob(cmd, "--answer-subject")) == ("0.25", "0.0", "single", "result", "0.0", "0.5", "0.5", "name")
    # and data/lab.py takes them: the same knobs as lab.generate's (a typo would fail here, not in a lab run)
    from data import lab
    assert {"cut_off", "sft_habit", "knowledge", "sum_answer", "question_drill", "off_topic",
            "bio_pronouns", "answer_subject"} <= set(lab.DEFAULTS)
