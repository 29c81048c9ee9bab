"""
bench/knowledge.py -- "Physics of Language Models 3.1 on a laptop" (a measurement, not a test).

    python bench/knowledge.py --out /tmp/knowledge                  # lab size, seed 0, 2 runs at a time
    python bench/knowledge.py --out /tmp/knowledge --seeds 0 1 2 --knowledge single mixed
    python bench/knowledge.py --out /tmp/knowledge --table           # only re-print from finished runs

Allen-Zhu & Li (2023, "Physics of Language Models: Part 3.1, Knowledge Storage and Extraction")
pretrain on biographies of N people, fine-tune on question/answer pairs about half of them, and ask
about the other half. Whether the answers come out depends on how pretraining stated the facts:
one fixed biography per person ("bioS single"): 9.7% of held-out questions; five phrasings with
permuted sentence order ("multi5 + permute"): 96.6%; "mixed training" (Q/A pairs of the training
half inside pretraining): 86.6%. The lab world has the same shape (people in three groups, SFT
asks only about the sft group, the eval group is only in pretraining), and data/lab.py's
--knowledge knob picks how pretraining states the facts:

    single         each person's one biography, the same text every time (all facts, fixed order)
    multi          every fact in a random one of its phrasings, fixed order
    multi_permute  random phrasings and orders, subsets, stories, two-friend documents, parallel text
    mixed          multi_permute + plain-text Q/A about the sft and rl groups (the lab's default)

For each knob this runs the lab up to SFT (`run_lab.py --knowledge K --stop_after sft`, the real
stages, one thread each) and grades the SFT model's greedy answers to the held-out questions about
the eval group (eval_qa.jsonl: facts asked directly, and follow-ups whose person is a pronoun),
with 95% Wilson intervals. Wall time per run at the lab size: ~10 min on one core.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

KNOBS = ["single", "multi", "multi_permute", "mixed"]
PAPER = {"single": "9.7%", "multi": "", "multi_permute": "96.6% (multi5 + permute)", "mixed": "86.6% (mixed training)"}


def run_one(out, size, knowledge, seed, threads):
    run_dir = os.path.join(out, f"{knowledge}_s{seed}")
    cmd = [sys.executable, os.path.join(REPO, "run_lab.py"), "--size", size, "--knowledge", knowledge, "--seed",
           str(seed), "--threads", str(threads), "--out_dir", run_dir, "--stop_after", "sft"]
    t0 = time.time()
    with open(run_dir + ".log", "w") as log:
        rc = subprocess.call(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    if rc != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {rc}); see {run_dir}.log")
    return run_dir, time.time() - t0


def grade(run_dir):
    """SFT's held-out accuracy on the eval group's facts and follow-ups, and the base model's probes
    about the eval group (plain-text Q/A, as pretraining would have said it)."""
    import chat
    import run_lab
    from data import lab
    qa = [r for r in run_lab.read_jsonl(os.path.join(run_dir, "data", "eval_qa.jsonl"))
          if r["kind"] in ("fact", "followup")]
    model, tok = chat.load_chat_model(os.path.join(run_dir, "sft", "final.pt"), "cpu")
    answers = chat.generate_answers(model, tok, [r["messages"] for r in qa], max_new_tokens=48, batch_size=64)
    oks = {k: [lab.check(a, r["truth"]) for a, r in zip(answers, qa) if r["kind"] == k] for k in ("fact", "followup")}
    probes = [p for p in run_lab.read_jsonl(os.path.join(run_dir, "data", "eval_pretrain.jsonl"))
              if p["group"] == "eval" and p["truth"]["type"] == "fact"]
    base, _ = chat.load_chat_model(os.path.join(run_dir, "pretrain", "final.pt"), "cpu", tok)
    texts = run_lab.complete(base, tok, [p["prompt"] for p in probes], 24, 64)
    oks["probe"] = [lab.check(t, p["truth"]) for t, p in zip(texts, probes)]
    return {k: (sum(v), len(v)) for k, v in oks.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="directory for the runs (one run directory per knob and seed)")
    ap.add_argument("--size", default="lab", help="run_lab.py size")
    ap.add_argument("--knowledge", nargs="+", default=KNOBS, choices=KNOBS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (each uses --threads threads)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--table", action="store_true", help="only grade and print the runs already in --out")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    todo = [(k, s) for k in args.knowledge for s in args.seeds]
    walls = {}
    if not args.table:
        with ThreadPoolExecutor(args.jobs) as pool:   # threads only wait on subprocesses
            for (k, s), (run_dir, wall) in zip(todo, pool.map(lambda ks: run_one(args.out, args.size, *ks, args.threads), todo)):
                walls[(k, s)] = wall
    import run_lab
    print(f"\nHeld-out questions about the eval group after SFT (lab size {args.size}; n per cell; 95% Wilson interval)\n")
    print("| knowledge | seed | base probes (eval group) | SFT: facts | SFT: follow-ups | paper (QA accuracy, held-out half) | wall |")
    print("|---|---|---|---|---|---|---|")
    for k, s in todo:
        run_dir = os.path.join(args.out, f"{k}_s{s}")
        if not os.path.exists(os.path.join(run_dir, "sft", "final.pt")):
            print(f"| {k} | {s} | (no finished run in {run_dir}) | | | | |")
            continue
        g = grade(run_dir)
        cells = []
        for key in ("probe", "fact", "followup"):
            hit, n = g[key]
            lo, hi = run_lab.wilson(hit, n)
            cells.append(f"{hit / n:.1%} [{lo:.0%}, {hi:.0%}] n={n}")
        wall = f"{walls[(k, s)] / 60:.1f} min" if (k, s) in walls else ""
        print(f"| {k} | {s} | " + " | ".join(cells) + f" | {PAPER[k]} | {wall} |")
        with open(os.path.join(run_dir, "knowledge.json"), "w") as f:
            json.dump({"knowledge": k, "seed": s, **{key: list(v) for key, v in g.items()}}, f)


if __name__ == "__main__":
    main()
