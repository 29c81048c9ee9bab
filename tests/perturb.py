"""The float-order perturbation matrix: what another CPU would do to our numbers, on this one.

Another processor (Intel or AMD, AVX2 or AVX-512, another MKL code path, another thread count) sums
floats in another order. Exact checks (logits against a reference, gradients against a closed form)
do not notice; training trajectories do: a last-bit difference flips a greedy answer, and from there
an RL run goes elsewhere. These switches reproduce that on one machine:

    ATEN_CPU_CAPABILITY=default|avx2|avx512   ATen's vectorised kernels (torch.backends.cpu.get_cpu_capability())
    MKL_ENABLE_INSTRUCTIONS=AVX2              MKL's matrix-multiply code path
    OMP_NUM_THREADS=1|2                       how reductions are split between threads

Uses:

    python tests/perturb.py suite [PYTEST ARGS]   # the test suite in every cell (~6 x 7 min on 2 cores)
    python tests/perturb.py suite -m trajectory   # only the float-sensitive tests (~6 x 4 min)
    python tests/perturb.py golden                # regenerate tests/golden_lab_tiny.json (~6 tiny labs, 2 at a time)
    python tests/perturb.py golden --min_tol OLD  # ... keeping the tolerances another machine measured in OLD
    python tests/perturb.py spread --out DIR      # the lab size over seeds 0-2 and 3 more cells: mean +- spread

`suite` prints one row per cell (passed / failed / minutes) and exits 1 if any cell failed. Run it
before regenerating golden values or changing a threshold, and put its table in the commit message.

`golden` runs the tiny lab (seed 0) once per cell and writes, for every number of the report card
and every point of the pretraining loss curve: the median over the runs, the spread (max - min) and a
tolerance of max(floor, 2 x spread), the floor being run_lab.GOLDEN_TOL's per-kind minimum. So an
unmodified checkout on another machine lands inside, while a broken stage (tests/test_lab_pipeline.py
checks one) still falls outside.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import run_lab  # noqa: E402


def machine():
    """The CPU the numbers came from, in words."""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        model = ""
    return f"{model or platform.processor() or platform.machine()}, {os.cpu_count()} CPUs" + \
        (", AVX-512" if has_avx512() else "")


def has_avx512():
    try:
        with open("/proc/cpuinfo") as f:
            return "avx512f" in f.read()
    except OSError:
        return False


def suite_cells():
    """(name, environment overrides) for the test suite."""
    cells = [("aten=default", {"ATEN_CPU_CAPABILITY": "default"}), ("aten=avx2", {"ATEN_CPU_CAPABILITY": "avx2"})]
    if has_avx512():
        cells.append(("aten=avx512", {"ATEN_CPU_CAPABILITY": "avx512"}))
    cells += [("mkl=AVX2", {"MKL_ENABLE_INSTRUCTIONS": "AVX2"}), ("omp=1", {"OMP_NUM_THREADS": "1"}),
              ("omp=2", {"OMP_NUM_THREADS": "2"})]
    return cells


def golden_cells():
    """(name, environment overrides, run_lab threads) for the golden runs. The lab pins each stage's
    OMP_NUM_THREADS itself (--threads), so the thread cells go through that flag."""
    cells = [("aten=default", {"ATEN_CPU_CAPABILITY": "default"}, 1), ("aten=avx2", {"ATEN_CPU_CAPABILITY": "avx2"}, 1)]
    if has_avx512():
        cells.append(("aten=avx512", {"ATEN_CPU_CAPABILITY": "avx512"}, 1))
    cells += [("mkl=AVX2", {"MKL_ENABLE_INSTRUCTIONS": "AVX2"}, 1), ("threads=2", {}, 2),
              ("aten=avx2,threads=2", {"ATEN_CPU_CAPABILITY": "avx2"}, 2)]
    return cells


def run_suite(pytest_args, jobs):
    def one(cell):
        name, env = cell
        t0 = time.time()
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *pytest_args],
                           cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True)
        tail = [line for line in r.stdout.splitlines() if line.strip()][-1:] or ["(no output)"]
        failed = [line for line in r.stdout.splitlines() if line.startswith("FAILED")]
        return name, r.returncode, tail[0], failed, (time.time() - t0) / 60

    with ThreadPoolExecutor(jobs) as pool:
        rows = list(pool.map(one, suite_cells()))
    print(f"\n{'cell':<16} {'rc':>3} {'min':>5}  result")
    for name, rc, tail, failed, minutes in rows:
        print(f"{name:<16} {rc:>3} {minutes:5.1f}  {tail}")
        for line in failed:
            print(f"{'':<27}{line}")
    return 0 if all(rc == 0 for _, rc, *_ in rows) else 1


def run_golden(out, keep, jobs, size, min_tol=None):
    work = keep or tempfile.mkdtemp(prefix="golden_")
    # min_tol: an earlier golden file, measured on another machine. Its pretraining and SFT numbers must
    # match ours (those stages do not change between the files' data), and each tolerance stays at least
    # its own: another CPU's matrix can spread a stage wider than this one's does.
    prior = json.load(open(min_tol)) if min_tol else None

    def one(cell):
        name, env, threads = cell
        run_dir = os.path.join(work, name.replace("=", "_").replace(",", "+"))
        if os.path.exists(os.path.join(run_dir, "report.json")):   # a kept run of this cell: reused
            print(f"  {name}: reused {run_dir}", flush=True)
            with open(os.path.join(run_dir, "report.json")) as f:
                return name, run_lab.golden_from(json.load(f), run_dir)
        t0 = time.time()
        r = subprocess.run([sys.executable, "run_lab.py", "--size", size, "--seed", "0", "--threads", str(threads), "--jobs", "1",
                            "--out_dir", run_dir], cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"{name}: run_lab.py failed\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        print(f"  {name}: {(time.time() - t0) / 60:.1f} min", flush=True)
        with open(os.path.join(run_dir, "report.json")) as f:
            return name, run_lab.golden_from(json.load(f), run_dir)

    print(f"{len(golden_cells())} tiny lab runs in {work}, {jobs} at a time")
    with ThreadPoolExecutor(jobs) as pool:
        runs = list(pool.map(one, golden_cells()))
    names = [n for n, _ in runs]

    def summarize(values, floor, earlier=0.0):
        med, spread = statistics.median(values), max(values) - min(values)
        return {"value": round(med, 4), "tol": round(max(floor, 2 * spread, earlier), 4), "spread": round(spread, 4),
                "runs": [round(v, 4) for v in values]}

    values = {}
    for key in runs[0][1]["values"]:
        got = [g["values"][key]["value"] for _, g in runs if key in g["values"]]
        if len(got) == len(runs):
            earlier = ((prior or {}).get("values", {}).get(key) or {}).get("tol", 0.0)
            values[key] = summarize(got, run_lab.golden_tolerance(key), earlier)
    steps = runs[0][1]["curves"]["pretrain.loss"]["step"]
    curve = {"step": steps, "loss": [], "tol": [], "spread": []}
    prior_curve = (prior or {}).get("curves", {}).get("pretrain.loss")
    for i in range(len(steps)):
        earlier = prior_curve["tol"][i] if prior_curve and prior_curve["step"] == steps else 0.0
        s = summarize([g["curves"]["pretrain.loss"]["loss"][i] for _, g in runs], run_lab.golden_tolerance("loss"), earlier)
        curve["loss"].append(s["value"])
        curve["tol"].append(s["tol"])
        curve["spread"].append(s["spread"])
    method = "median over the cells; spread = max - min; tol = max(floor per kind, 2 x spread)"
    if prior:
        moved = [k for k in ("pretrain.val_loss", "sft.accuracy") if k in values and k in prior["values"]
                 and abs(values[k]["value"] - prior["values"][k]["value"]) > prior["values"][k]["tol"]]
        if moved:
            print(f"note: {moved} moved beyond {min_tol}'s tolerance: is it the same recipe?")
        method += f", and at least the tolerance of an earlier golden file from another machine " \
                  f"({prior.get('machine') or 'not recorded'}; cells {', '.join(prior.get('cells', []))})"
    golden = {"size": size, "seed": 0, "cells": names, "machine": machine(),
              "method": method,
              "values": values, "curves": {"pretrain.loss": curve}}
    run_lab.atomic_write(out, json.dumps(golden, indent=1) + "\n")
    print(f"\n{'key':<32} {'median':>9} {'spread':>8} {'tol':>8}  runs ({', '.join(names)})")
    for k, v in values.items():
        print(f"{k:<32} {v['value']:9.4f} {v['spread']:8.4f} {v['tol']:8.4f}  {v['runs']}")
    print(f"\nwritten to {out}")
    return 0


GAINS = [("dpo", "sft"), ("ppo", "sft"), ("grpo", "sft")]   # (stage, baseline): accuracy gains the lab claims


def run_spread(out, seeds, cell_names, jobs, size):
    """The lab at `size` for every seed in the default cell, and for seed 0 in every other cell: the
    numbers the README states as mean +- spread. Each run's report.json stays in out/."""
    cells = {"native": ({}, 1), **{name: (env, threads) for name, env, threads in golden_cells()}}
    unknown = [c for c in cell_names if c not in cells]
    if unknown:
        raise SystemExit(f"unknown cell(s) {unknown}; known: {list(cells)}")
    todo = [(seed, cell_names[0]) for seed in seeds] + [(seeds[0], c) for c in cell_names[1:]]

    def one(job):
        seed, name = job
        env, threads = cells[name]
        run_dir = os.path.join(out, f"s{seed}_" + name.replace("=", "_").replace(",", "+"))
        t0 = time.time()
        r = subprocess.run([sys.executable, "run_lab.py", "--size", size, "--seed", str(seed), "--threads", str(threads), "--jobs", "1",
                            "--out_dir", run_dir], cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"seed {seed} {name}: run_lab.py failed\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        print(f"  seed {seed} {name}: {(time.time() - t0) / 60:.1f} min", flush=True)
        return run_dir

    os.makedirs(out, exist_ok=True)
    print(f"{len(todo)} {size} lab runs in {out}, {jobs} at a time")
    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(one, todo))
    return summarize_spread(out)


def summarize_spread(out):
    """Mean, spread (max - min) and min..max of every card value over the runs in out/, and of each
    stage's accuracy gain over SFT with its ratio to its own spread (the lab calls a gain real at >= 3)."""
    cards = {}
    for name in sorted(os.listdir(out)):
        path = os.path.join(out, name, "report.json")
        if os.path.exists(path):
            with open(path) as f:
                cards[name] = json.load(f)["card"]
    if not cards:
        raise SystemExit(f"no finished runs (report.json) in {out}")
    keys = [k for k in next(iter(cards.values())) if all(isinstance(c.get(k), (int, float)) for c in cards.values())]
    rows = {k: [c[k] for c in cards.values()] for k in keys}
    for stage, base in GAINS:
        if f"{stage}.accuracy" in rows and f"{base}.accuracy" in rows:
            rows[f"{stage}.gain_over_{base}"] = [a - b for a, b in zip(rows[f"{stage}.accuracy"], rows[f"{base}.accuracy"])]
    summary = {}
    print(f"\n{len(cards)} runs: {', '.join(cards)}\n")
    print("| value | mean | spread (max - min) | min .. max | gain / spread |\n|---|---|---|---|---|")
    for k, v in rows.items():
        mean, spread = statistics.fmean(v), max(v) - min(v)
        ratio = (mean / spread if spread > 0 else float("inf")) if ".gain_over_" in k else None
        summary[k] = {"mean": round(mean, 4), "spread": round(spread, 4), "min": round(min(v), 4),
                      "max": round(max(v), 4), "runs": [round(x, 4) for x in v], **({"ratio": ratio} if ratio else {})}
        print(f"| `{k}` | {mean:.4f} | {spread:.4f} | {min(v):.4f} .. {max(v):.4f} | "
              + (f"{ratio:.1f}" if ratio is not None else "") + " |")
    pooled = pooled_gains(out, list(cards))
    run_lab.atomic_write(os.path.join(out, "spread.json"),
                         json.dumps({"runs": list(cards), "values": summary, "pooled": pooled}, indent=1) + "\n")
    print(f"\nwritten to {os.path.join(out, 'spread.json')}")
    return 0


def pooled_gains(out, names, pairs=(("grpo", "ppo"), ("grpo", "sft"), ("ppo", "sft"), ("dpo", "sft"))):
    """Per question kind, each gain pooled over the runs: every run's held-out questions in one paired
    bootstrap (eval/eval.json's per-question grades). One run's 86 sums give an interval of +-10 points;
    a difference that holds on average over training noise (seeds, float orders) shows up here. Runs with
    identical answers (a cell that did not change the float order) count twice: leave one out."""
    grades = {}   # (a, b, kind) -> ([a's grades], [b's grades]) over every run
    for name in names:
        path = os.path.join(out, name, "eval", "eval.json")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            ev = json.load(f)
        for a, b in pairs:
            if a not in ev["models"] or b not in ev["models"]:
                continue
            for i, kind in enumerate(ev["kinds"]):
                for key in (kind, "all"):
                    ga, gb = grades.setdefault((a, b, key), ([], []))
                    ga.append(ev["models"][a]["oks"][i])
                    gb.append(ev["models"][b]["oks"][i])
    rows = []
    for (a, b, kind), (ga, gb) in sorted(grades.items()):
        gain, lo, hi = run_lab.paired_bootstrap(ga, gb)
        rows.append({"a": a, "b": b, "kind": kind, "n": len(ga), "gain": round(gain, 4), "ci": [round(lo, 4), round(hi, 4)]})
    if rows:
        print(f"\nGains per kind, pooled over {len(names)} runs (paired bootstrap over every run's questions):\n")
        print("| gain | kind | n | points | 95% CI |\n|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['a']} − {r['b']} | {r['kind']} | {r['n']} | {100 * r['gain']:+.1f} | "
                  f"{100 * r['ci'][0]:+.1f} .. {100 * r['ci'][1]:+.1f} |")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("suite", help="run pytest in every cell")
    s.add_argument("--jobs", type=int, default=1, help="cells at a time (the suite itself uses 2 processes at places)")
    g = sub.add_parser("golden", help="regenerate the golden values of the tiny lab")
    g.add_argument("--out", default=os.path.join(REPO, "tests", "golden_lab_tiny.json"))
    g.add_argument("--keep", default=None, metavar="DIR", help="run directories here (default: a temporary one)")
    g.add_argument("--jobs", type=int, default=2, help="lab runs at a time")
    g.add_argument("--size", default="tiny")
    g.add_argument("--min_tol", default=None, metavar="JSON",
                   help="an earlier golden file from another machine: keep each tolerance at least its own")
    sp = sub.add_parser("spread", help="the lab over seeds and cells: mean +- spread of every number")
    sp.add_argument("--out", required=True, help="run directories go here (kept)")
    sp.add_argument("--size", default="lab")
    sp.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="each in the first cell")
    sp.add_argument("--cells", nargs="+", default=["native", "aten=default", "aten=avx2", "mkl=AVX2", "threads=2"],
                    help="the first runs every seed; the others run the first seed")
    sp.add_argument("--jobs", type=int, default=2)
    sp.add_argument("--summarize", action="store_true", help="only summarise the finished runs in --out")
    args, rest = p.parse_known_args(argv)
    if args.cmd == "spread":
        if rest:
            p.error(f"unknown arguments: {rest}")
        return summarize_spread(args.out) if args.summarize else run_spread(args.out, args.seeds, args.cells,
                                                                              args.jobs, args.size)
    if args.cmd == "suite":
        return run_suite(rest or ["tests"], args.jobs)
    if rest:
        p.error(f"unknown arguments: {rest}")
    return run_golden(args.out, args.keep, args.jobs, args.size, args.min_tol)


if __name__ == "__main__":
    sys.exit(main())
