"""
The lab test of data/sft_select.py: does SFT on the selected half beat SFT on all of it, and on a random half,
when the SFT data carries planted duplicates and low-quality answers?

    python run_lab.py --size tiny --out_dir /tmp/lab_tiny --stop_after reward   # data, pretrain, sft, reward
    python bench/sft_select_lab.py --lab_dir /tmp/lab_tiny --out /tmp/select_lab        # seeds 0-9, ~20 CPU-minutes

Steps (all on the lab run in --lab_dir, nothing there is modified):
  1. plant  into the lab's sft_train.jsonl: --n_dup near-copies of its examples (bench/sft_select.py's
            variant(): re-templated answers, whitespace and punctuation edits) and --n_bad low-quality
            answers: the lab's own rejected answers of kind "rambling" and "wrong_language"
            (prefs_train.jsonl), turned into SFT examples of their prompts. The planted file is
            OUT/sft_planted.jsonl; which lines were planted is in OUT/planted.json (never shown to the selector).
  2. select python -m data.sft_select on it once per --configs (its flags), scored with the lab's SFT model (IFD,
            embeddings) and reward model (quality); selected half j is OUT/select_j/selected.jsonl. Printed:
            the share of planted copies, planted pairs and low-quality answers it left out (a random half
            leaves out 50% of the copies and low-quality answers, and breaks 75% of the pairs).
  3. train  sft.py from the lab's pretrained model, with the lab's SFT flags (equal steps), on all, a
            random half (a new one per seed), and each selected half, once per --seeds.
  4. eval   held-out lab accuracy (chat.evaluate_lab on eval_qa.jsonl) and the SFT validation loss.
A table per condition (mean, standard deviation and every seed) goes to stdout and OUT/lab_table.json.
"""
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from bench.select import variant  # noqa: E402
from data import sft_select as select  # noqa: E402


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def plant(lab_dir, out, n_dup, n_bad, seed):
    """OUT/sft_planted.jsonl and OUT/planted.json ({"dup": [line indices], "bad": [...], "kinds": {...}})."""
    rng = random.Random(seed)
    clean = [{"messages": r["messages"]} for r in read_jsonl(os.path.join(lab_dir, "data", "sft_train.jsonl"))]
    prefs = [r for r in read_jsonl(os.path.join(lab_dir, "data", "prefs_train.jsonl"))
             if r.get("kind") in ("rambling", "wrong_language")]
    items = [(r, "clean") for r in clean]
    for i in rng.sample(range(len(clean)), n_dup):
        items.append(({"messages": variant(clean[i]["messages"], rng)[0]}, ("dup", i)))
    for r in rng.sample(prefs, n_bad):
        items.append(({"messages": r["messages"] + [{"role": "assistant", "content": r["rejected"]}]}, r["kind"]))
    order = list(range(len(items)))
    rng.shuffle(order)
    items = [items[j] for j in order]
    write_jsonl(os.path.join(out, "sft_planted.jsonl"), [r for r, _ in items])
    tags = [t[0] if isinstance(t, tuple) else t for _, t in items]
    line_of_clean = {j: p for p, j in enumerate(order) if j < len(clean)}   # clean record j -> its line
    planted = {"dup": [i for i, t in enumerate(tags) if t == "dup"],
               "dup_original": [line_of_clean[t[1]] for _, t in items if isinstance(t, tuple)],
               "bad": [i for i, t in enumerate(tags) if t in ("rambling", "wrong_language")],
               "kinds": {k: tags.count(k) for k in set(tags)}}
    with open(os.path.join(out, "planted.json"), "w") as f:
        json.dump(planted, f)
    return os.path.join(out, "sft_planted.jsonl"), planted, len(items)


def sft_flags(lab_dir):
    """The lab's SFT command (lab_stage.json), with its paths pointed at --lab_dir."""
    with open(os.path.join(lab_dir, "sft", "lab_stage.json"), encoding="utf-8") as f:
        cmd = json.load(f)["cmd"][1:]
    flags = dict(zip(cmd[0::2], cmd[1::2]))   # every flag of that command takes a value
    flags.update({"--init_from": os.path.join(lab_dir, "pretrain", "final.pt"),
                  "--val_data": os.path.join(lab_dir, "data", "sft_val.jsonl"),
                  "--pretrain_data": os.path.join(lab_dir, "tokens")})
    return [x for k, v in flags.items() if k not in ("--data", "--out_dir", "--seed") for x in (k, v)]


def train_and_eval(a, data, name, seed, flags):
    from chat import evaluate_lab, load_chat_model
    run = os.path.join(a.out, f"sft_{name}_s{seed}")
    if not os.path.isfile(os.path.join(run, "final.pt")):
        t = time.time()
        subprocess.run([sys.executable, "sft.py", "--data", data, "--out_dir", run, "--seed", str(seed),
                        "--tokenizer", a.tokenizer] + flags, cwd=REPO, check=True, capture_output=True)
        print(f"  sft {name} seed {seed}: {time.time() - t:.0f} s", file=sys.stderr)
    log = read_jsonl(os.path.join(run, "log.jsonl"))
    val = [r["val_loss"] for r in log if r.get("event") == "eval"][-1]
    model, tok = load_chat_model(os.path.join(run, "final.pt"), "cpu", a.tokenizer)
    ev = evaluate_lab(model, tok, os.path.join(a.lab_dir, "data", "eval_qa.jsonl"), max_new_tokens=48)
    return {"condition": name, "seed": seed, "accuracy": ev["accuracy"], "by_kind": ev["by_kind"], "val_loss": val}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lab_dir", required=True,
                   help="a run_lab.py run directory with data/, tokens/, pretrain/, sft/, reward/")
    p.add_argument("--out", default="/tmp/select_lab")
    p.add_argument("--tokenizer", default=os.path.join(REPO, "tokenizer", "lab.model"))
    p.add_argument("--n_dup", type=int, default=150)
    p.add_argument("--n_bad", type=int, default=150)
    p.add_argument("--seeds", type=int, nargs="+", default=list(range(10)), help="a single run is not a result")
    p.add_argument("--configs", nargs="+", default=["--weights ifd=1,quality=1",
                                                     "--dedup_threshold 0.99 --weights ifd=1,quality=1",
                                                     "--dedup_threshold 0.99 --weights ifd=-1,quality=1"],
                   help="data.sft_select flags, one selected condition each")
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    data, planted, n = plant(a.lab_dir, a.out, a.n_dup, a.n_bad, seed=0)
    selections, removal = [], {}
    for j, config in enumerate(a.configs):
        out = os.path.join(a.out, f"select_{j}")
        summary = select.main(["--data", data, "--out_dir", out, "--model", os.path.join(a.lab_dir, "sft"),
                               "--reward_model", os.path.join(a.lab_dir, "reward"), "--tokenizer", a.tokenizer,
                               "--select_frac", "0.5"] + config.split())
        status = [json.loads(line)["status"] for line in open(os.path.join(out, "scores.jsonl"), encoding="utf-8")]
        sel = [s == "selected" for s in status]
        r = {"copies_left_out": float(np.mean([not sel[i] for i in planted["dup"]])),
             "pairs_not_both_kept": float(np.mean([not (sel[i] and sel[o]) for i, o in
                                                   zip(planted["dup"], planted["dup_original"])])),
             "bad_left_out": float(np.mean([not sel[i] for i in planted["bad"]])),
             "why_bad": {s: sum(status[i] == s for i in planted["bad"]) for s in sorted(set(status))},
             "selected": summary["selected"], "duplicates": summary["duplicates"],
             "ifd_filtered": summary["ifd_filtered"]}
        removal[config] = r
        selections.append((f"selected[{config}]", os.path.join(out, "selected.jsonl")))
        print(f"[select {config}] {n} examples ({planted['kinds']}): {r['selected']} selected, "
              f"{r['duplicates']} semantic duplicates, {r['ifd_filtered']} IFD >= 1. Left out: planted copies "
              f"{r['copies_left_out']:.3f} (a random half: 0.5), planted pairs not both kept "
              f"{r['pairs_not_both_kept']:.3f} "
              f"(random: 0.75), planted low-quality answers {r['bad_left_out']:.3f} (random: 0.5; why: {r['why_bad']})")
    rows = read_jsonl(data)
    flags = sft_flags(a.lab_dir)
    results = []
    for seed in a.seeds:
        rnd = random.Random(1000 + seed).sample(range(len(rows)), summary["selected"])
        write_jsonl(os.path.join(a.out, f"random_s{seed}.jsonl"), [rows[i] for i in sorted(rnd)])
        for name, path in [("all", data), ("random", os.path.join(a.out, f"random_s{seed}.jsonl"))] + selections:
            results.append(train_and_eval(a, path, name, seed, flags))
            r = results[-1]
            print(f"  {name:8s} seed {seed}: accuracy {r['accuracy']:.3f}, val loss {r['val_loss']:.4f}",
                  file=sys.stderr)
    table = {}
    for name in ["all", "random"] + [name for name, _ in selections]:
        rs = [r for r in results if r["condition"] == name]
        acc = [r["accuracy"] for r in rs]
        val = [r["val_loss"] for r in rs]
        table[name] = {"accuracy_mean": float(np.mean(acc)),
                       "accuracy_std": float(np.std(acc, ddof=1)) if len(acc) > 1 else None,
                       "accuracies": acc, "val_loss_mean": float(np.mean(val)), "val_losses": val}
        print(f"[lab] {name}: accuracy {np.mean(acc):.3f} (per seed {', '.join(f'{x:.3f}' for x in acc)}), "
              f"val loss {np.mean(val):.4f} (per seed {', '.join(f'{x:.4f}' for x in val)})")
    with open(os.path.join(a.out, "lab_table.json"), "w", encoding="utf-8") as f:
        json.dump({"planted": planted["kinds"], "selection": removal, "table": table, "runs": results}, f, indent=2)


if __name__ == "__main__":
    main()
