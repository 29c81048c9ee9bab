"""
bench/eval_vs_lmeval.py -- evaluate.py against EleutherAI's lm-evaluation-harness (the HF backend) on the
same model and the same items: per-item log-likelihoods, acc / acc_norm, GSM8K generations and exact
match, the prompts themselves, and items per second of each, run one after the other on this machine.

lm-eval is a benchmark-only dependency, installed in a side virtualenv (never in requirements*.txt):
    python3 -m venv --system-site-packages /tmp/lmeval-venv
    /tmp/lmeval-venv/bin/pip install torch==2.13.0            # the CPU build from local disk first
    /tmp/lmeval-venv/bin/pip install torch==2.13.0 lm-eval     # (a bare torch pulls a CUDA build)
    python bench/eval_vs_lmeval.py --model RUN_OR_CKPT --lmeval_python /tmp/lmeval-venv/bin/python

What it does, in --out (default /tmp/eval_vs_lmeval):
  hf/       the model as a HuggingFace LLaMA dir (model.save_hf + Tokenizer.save_hf), with max_seq_len
            raised to --ctx so 5-shot prompts fit (RoPE needs no new weights; the scores are just
            numbers to compare, the model need not be good at that length)
  data/     our copy of the items: the first --per_subject items of every MMLU/CMMLU/C-Eval subject and
            the first --limit items of ARC, HellaSwag and GSM8K, in each benchmark's own fields
  tasks/    one lm-eval task per file and subject, each YAML including lm-eval's own task YAML (its
            prompt, description, preprocessing, filters and metrics) and replacing only where the data
            comes from (local JSONL) -- and for MMLU the field names (cais/mmlu has a "choices" list
            where the original CSV has A-D columns); few-shot examples as in evaluate.py (dev split,
            first_n; GSM8K/ARC/HellaSwag without a train file: first_n from the test file)
Both tools run the same tasks as separate processes, one task at a time, alternating, --repeats times
(the fastest run of each is kept), timed end to end (start-up, data, model load and scoring) and for
the evaluation alone (our evaluate(); lm-eval's simple_evaluate() after its task index is built).
"""
import argparse
import gzip
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SUBJECT_TASKS = {"mmlu": ("mmlu_test", "mmlu_dev"), "cmmlu": ("cmmlu_test", "cmmlu_dev"),
                 "ceval": ("ceval_val", "ceval_dev")}
FLAT_TASKS = {"arc_challenge": "arc_challenge_test", "hellaswag": "hellaswag_val", "gsm8k": "gsm8k_test"}


def read_jsonl(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f.read().split("\n") if line.strip()]


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def export_hf(model_path, hf_dir, ctx):
    import torch
    import common
    from model import Llama, LlamaConfig
    from tokenizer import Tokenizer
    model, meta = common.load_model(model_path)
    config = LlamaConfig.from_dict({**meta["model_config"], "max_seq_len": ctx})
    longer = Llama(config)
    with torch.no_grad():
        longer.load_state_dict(model.state_dict())
    tok = Tokenizer((meta.get("tokenizer") or {}).get("path"))
    longer.save_hf(hf_dir, bos_id=tok.bos_id, eos_id=tok.eos_id)
    tok.save_hf(hf_dir)


def lmeval_task_dir():
    out = subprocess.run([ARGS.lmeval_python, "-c", "import lm_eval.tasks, os; print(os.path.dirname(lm_eval.tasks.__file__))"],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


def write_data_and_tasks(src_dir, data_dir, task_dir, tasks, per_subject, limit, lm_tasks):
    """Our data files (one per benchmark file) and lm-eval's per-subject files + YAMLs. Returns
    {our task: [(lm-eval task name, our index of its doc 0, n docs)]}."""
    os.makedirs(data_dir, exist_ok=True)
    os.makedirs(task_dir, exist_ok=True)
    plan = {}

    def yaml(name, include, files, **override):
        # YAML is a superset of JSON: no yaml library needed on our side.
        cfg = {"include": include, "task": name, "dataset_path": "json", "dataset_name": None,
               "dataset_kwargs": {"data_files": files}, **override}
        with open(os.path.join(task_dir, name + ".yaml"), "w", encoding="utf-8") as f:
            json.dump(cfg, f, ensure_ascii=False, indent=1)

    for task in tasks:
        if task in SUBJECT_TASKS:
            test_stem, dev_stem = SUBJECT_TASKS[task]
            test = read_jsonl(os.path.join(src_dir, test_stem + ".jsonl.gz"))
            dev = read_jsonl(os.path.join(src_dir, dev_stem + ".jsonl.gz"))
            subjects = list(dict.fromkeys(r["subject"] for r in test))
            ours_test, plan[task] = [], []
            for s in subjects:
                rows = [r for r in test if r["subject"] == s][:per_subject]
                # C-Eval's dev rows carry an "explanation" column the val rows lack; HF datasets wants one
                # schema per data_files dict, and the prompt never reads it.
                drows = [{k: v for k, v in r.items() if k != "explanation"} for r in dev if r["subject"] == s]
                tp, dp = os.path.join(task_dir, f"{task}_{s}_test.jsonl"), os.path.join(task_dir, f"{task}_{s}_dev.jsonl")
                write_jsonl(tp, rows)
                write_jsonl(dp, drows)
                split = "validation" if task == "ceval" else "test"
                stock = {"mmlu": f"mmlu/default/mmlu_{s}.yaml", "cmmlu": f"cmmlu/cmmlu_{s}.yaml",
                         "ceval": f"ceval/ceval-valid_{s}.yaml"}[task]
                extra = {}
                if task == "mmlu":
                    extra = {"doc_to_text": "{{question.strip()}}\nA. {{A}}\nB. {{B}}\nC. {{C}}\nD. {{D}}\nAnswer:",
                             "doc_to_target": "{{['A', 'B', 'C', 'D'].index(answer)}}",
                             # lm-eval's MMLU lists acc only; acc_norm is the same per-item rule as for CMMLU
                             "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                                             for m in ("acc", "acc_norm")]}
                name = f"nl_{task}_{s}"
                yaml(name, os.path.join(lm_tasks, stock), {split: tp, "dev": dp}, num_fewshot=5,
                     fewshot_split="dev", **{"test_split" if split == "test" else "validation_split": split}, **extra)
                plan[task].append((name, len(ours_test), len(rows)))
                ours_test += rows
            write_jsonl(os.path.join(data_dir, test_stem + ".jsonl"), ours_test)
            write_jsonl(os.path.join(data_dir, dev_stem + ".jsonl"), dev)
        elif task == "ppl":
            # a corpus of two long documents (several windows each at --ctx) and short ones, English and Chinese
            gsm = read_jsonl(os.path.join(src_dir, "gsm8k_test.jsonl.gz"))
            cm = read_jsonl(os.path.join(src_dir, "cmmlu_test.jsonl.gz"))
            docs = ["\n\n".join(r["answer"] for r in gsm[:limit * 3]), "\n".join(r["Question"] for r in cm[:limit * 2])]
            docs += [r["question"] for r in gsm[-limit // 2:]] + [r["Question"] for r in cm[-limit // 2:]]
            path = os.path.join(data_dir, "ppl.jsonl")
            write_jsonl(path, [{"text": d} for d in docs])
            cfg = {"task": "nl_ppl", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": path}},
                   "test_split": "test", "output_type": "loglikelihood_rolling", "doc_to_text": "",
                   "doc_to_target": "{{text}}", "metric_list": [{"metric": m} for m in
                                                                ("word_perplexity", "byte_perplexity", "bits_per_byte")]}
            with open(os.path.join(task_dir, "nl_ppl.yaml"), "w", encoding="utf-8") as f:
                json.dump(cfg, f, ensure_ascii=False, indent=1)
            plan[task] = [("nl_ppl", 0, len(docs))]
        else:
            stem = FLAT_TASKS[task]
            rows = read_jsonl(os.path.join(src_dir, stem + ".jsonl.gz"))[:limit]
            if task == "arc_challenge":   # lm-eval's YAML reads the HF dataset's flat form (evaluate.py reads both)
                rows = [{"id": r["id"], "question": r["question"]["stem"], "answerKey": r["answerKey"],
                         "choices": {"text": [c["text"] for c in r["question"]["choices"]],
                                     "label": [c["label"] for c in r["question"]["choices"]]}} for r in rows]
            path = os.path.join(data_dir, stem + ".jsonl")
            write_jsonl(path, rows)
            split = "validation" if task == "hellaswag" else "test"
            stock = {"arc_challenge": "arc/arc_challenge.yaml", "hellaswag": "hellaswag/hellaswag.yaml",
                     "gsm8k": "gsm8k/gsm8k.yaml"}[task]
            shots = 5 if task == "gsm8k" else 0
            name = f"nl_{task}"
            yaml(name, os.path.join(lm_tasks, stock), {split: path}, num_fewshot=shots, training_split=None,
                 fewshot_split=split, fewshot_config={"sampler": "first_n"},
                 **{"test_split" if split == "test" else "validation_split": split},
                 **({"test_split": None} if split == "validation" else {"validation_split": None}))
            plan[task] = [(name, 0, len(rows))]
    return plan


def run_timed(cmd, env):
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        raise SystemExit(f"command failed: {' '.join(cmd[:4])} ...")
    return wall


def lmeval_worker(args):
    """Runs inside the lm-eval virtualenv: simple_evaluate with log_samples, per-item records to JSON."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    manager = TaskManager(include_path=args.task_dir)   # indexes every lm-eval task: start-up, not timed below
    t0 = time.time()
    res = simple_evaluate(model="hf", model_args=f"pretrained={args.hf},dtype=float32{args.model_args}", tasks=args.worker_tasks.split(","),
                          task_manager=manager, batch_size=args.batch_size, device="cpu", log_samples=True)
    out = {"_seconds": time.time() - t0, "_results": res["results"]}
    for task, samples in res["samples"].items():
        out[task] = [{"doc_id": s["doc_id"], "filter": s["filter"], "arguments": [list(map(str, a[:2])) for a in s["arguments"]],
                      "resps": [[str(x) for x in r] for r in s["resps"]],
                      "filtered_resps": [[str(x) for x in (r if isinstance(r, (list, tuple)) else [r])] for r in s["filtered_resps"]],
                      **{m: s[m] for m in ("acc", "acc_norm", "exact_match") if m in s}} for s in samples]
    with open(args.worker_out, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, default=str)


def compare(task, plan, ours, theirs, data_dir):
    """One table row: agreement of per-item numbers and prompts."""
    import evaluate as ev
    if task == "ppl":   # per document: the summed log-likelihood of its rolling windows
        (name, _, _), = plan
        lls = [(float(s["filtered_resps"][0][0]), ours[("ppl", s["doc_id"])]["loglikelihood"]) for s in theirs[name]]
        # documents of thousands of tokens: float32 sums agree to a relative 1e-6, not an absolute 1e-4
        return {"task": task, "n": len(lls), "max_abs_dll": max(abs(a - b) for a, b in lls),
                "max_rel_dll": max(abs(a - b) / abs(a) for a, b in lls), "bpb_lm": float(theirs["_results"][name]["bits_per_byte,none"]),
                "acc_diff": 0, "acc_norm_diff": 0, "prompt_diff": 0, "gen_diff": 0, "extract_diff": 0,
                "em_strict_diff": 0, "em_flex_diff": 0}
    items, pool, exclude_self = ev.load_task(task, data_dir)
    k = ev.TASKS[task][3]
    row = {"task": task, "n": 0, "max_abs_dll": 0.0, "acc_diff": 0, "acc_norm_diff": 0, "prompt_diff": 0,
           "gen_diff": 0, "extract_diff": 0, "em_strict_diff": 0, "em_flex_diff": 0}
    sums = {"ours_acc": 0.0, "lm_acc": 0.0, "ours_acc_norm": 0.0, "lm_acc_norm": 0.0,
            "ours_em_strict": 0.0, "lm_em_strict": 0.0, "ours_em_flex": 0.0, "lm_em_flex": 0.0}
    for name, offset, n in plan:
        for s in theirs[name]:
            i = offset + s["doc_id"]
            mine = ours[(task, i)]
            item = items[i]
            shots = ev.fewshot_examples(item, k, pool, exclude_self)
            context = ev.build_context(item, shots)
            if s["arguments"][0][0] != context:
                row["prompt_diff"] += 1
            if task == "gsm8k":
                # the extracted answer itself (lm-eval normalises it inside exact_match)
                which = "strict" if s["filter"] == "strict-match" else "flexible"
                row["extract_diff"] += ev.normalize_gsm8k(s["filtered_resps"][0][0]) != mine[which]
                if s["filter"] == "strict-match":
                    row["n"] += 1
                    row["gen_diff"] += s["resps"][0][0] != mine["generation"]
                    row["em_strict_diff"] += float(s["exact_match"]) != mine["exact_match_strict"]
                    sums["ours_em_strict"] += mine["exact_match_strict"]
                    sums["lm_em_strict"] += float(s["exact_match"])
                else:
                    row["em_flex_diff"] += float(s["exact_match"]) != mine["exact_match_flexible"]
                    sums["ours_em_flex"] += mine["exact_match_flexible"]
                    sums["lm_em_flex"] += float(s["exact_match"])
                continue
            row["n"] += 1
            conts = [a[1] for a in s["arguments"]]
            if conts != [" " + c for c in item["choices"]]:
                row["prompt_diff"] += 1
            lls = [float(r[0]) for r in s["filtered_resps"]]
            row["max_abs_dll"] = max(row["max_abs_dll"], max(abs(a - b) for a, b in zip(lls, mine["loglikelihoods"])))
            for m in ("acc", "acc_norm"):
                row[m + "_diff"] += float(s[m]) != mine[m]
                sums["ours_" + m] += mine[m]
                sums["lm_" + m] += float(s[m])
    row.update({key: v / max(row["n"], 1) for key, v in sums.items()})
    return row


def main():
    global ARGS
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--model", help="our checkpoint / run dir (exported to a HF dir)")
    p.add_argument("--lmeval_python", default="/tmp/lmeval-venv/bin/python")
    p.add_argument("--tasks", default="mmlu,cmmlu,ceval,arc_challenge,hellaswag,gsm8k")
    p.add_argument("--src", default=os.path.join(REPO, "..", "shared", "data", "eval"))
    p.add_argument("--per_subject", type=int, default=10, help="items per MMLU/CMMLU/C-Eval subject")
    p.add_argument("--limit", type=int, default=40, help="items of ARC, HellaSwag, GSM8K")
    p.add_argument("--ctx", type=int, default=2048, help="max_seq_len of the exported model")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS for both tools")
    p.add_argument("--lmeval_model_args", default="", help="appended to lm-eval's model_args, e.g. ,add_bos_token=False")
    p.add_argument("--repeats", type=int, default=1, help="timed runs of each tool per task (the fastest is kept)")
    p.add_argument("--out", default="/tmp/eval_vs_lmeval")
    # internal: the lm-eval side, run with the virtualenv's python
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker_tasks", help=argparse.SUPPRESS)
    p.add_argument("--worker_out", help=argparse.SUPPRESS)
    p.add_argument("--hf", help=argparse.SUPPRESS)
    p.add_argument("--task_dir", help=argparse.SUPPRESS)
    p.add_argument("--model_args", default="", help=argparse.SUPPRESS)
    ARGS = args = p.parse_args()
    if args.worker:
        return lmeval_worker(args)
    # (not in the worker: lm-eval imports HF's `evaluate` package, which our evaluate.py would shadow)
    sys.path.insert(0, REPO)
    tasks = [t for t in args.tasks.split(",") if t]
    hf, data_dir, task_dir = (os.path.join(args.out, d) for d in ("hf", "data", "tasks"))
    os.makedirs(args.out, exist_ok=True)
    export_hf(args.model, hf, args.ctx)
    plan = write_data_and_tasks(args.src, data_dir, task_dir, tasks, args.per_subject, args.limit, lmeval_task_dir())
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_CACHE": os.path.join(args.out, "hf_cache")}
    rows = []
    for task in tasks:
        log = os.path.join(args.out, f"ours_{task}.jsonl")
        lm_out = os.path.join(args.out, f"lmeval_{task}.json")
        ours_cmd = [sys.executable, os.path.join(REPO, "evaluate.py"), "--model", hf, "--tasks", task, "--data_dir",
                    data_dir, "--batch_size", str(args.batch_size), "--log_samples", log,
                    "--out", os.path.join(args.out, "ours_" + task), "--device", "cpu"]
        if task == "ppl":
            ours_cmd += ["--ppl_data", os.path.join(data_dir, "ppl.jsonl")]
        lm_cmd = [args.lmeval_python, os.path.abspath(__file__), "--worker", "--hf", hf, "--task_dir", task_dir,
                  "--worker_tasks", ",".join(name for name, _, _ in plan[task]), "--worker_out", lm_out,
                  "--batch_size", str(args.batch_size), "--model_args", args.lmeval_model_args]
        if task == "ppl":
            # lm-eval 0.4.13 encodes a rolling document with the tokenizer's defaults, so a LLaMA tokenizer
            # adds its BOS, and the windows start after another BOS: it scores log p(BOS | BOS) as part of
            # the document (measured here: bits per byte 8.7533 vs 8.7555 on the 12 test documents).
            # add_bos_token=False gives log p(document | BOS), which is what evaluate.py reports.
            lm_cmd[-1] += ",add_bos_token=False"
        # alternate the two tools and keep each one's fastest run: on a shared machine other jobs only
        # ever slow a run down
        t_ours = t_lm = e_ours = e_lm = float("inf")
        for _ in range(args.repeats):
            t_ours = min(t_ours, run_timed(ours_cmd, env))
            with open(os.path.join(args.out, "ours_" + task, "results.json"), encoding="utf-8") as f:
                e_ours = min(e_ours, json.load(f)[task]["seconds"])  # evaluate(): items read, prompts built, scored
            t_lm = min(t_lm, run_timed(lm_cmd, env))
            with open(lm_out, encoding="utf-8") as f:
                e_lm = min(e_lm, json.load(f)["_seconds"])           # simple_evaluate(): model + data loaded, scored
        ours = {(s["task"], s["index"]): s for s in map(json.loads, open(log, encoding="utf-8"))}
        with open(lm_out, encoding="utf-8") as f:
            theirs = json.load(f)
        row = compare(task, plan[task], ours, theirs, data_dir)
        if task == "ppl":
            with open(os.path.join(args.out, "ours_ppl", "results.json"), encoding="utf-8") as f:
                row["bpb_ours"] = json.load(f)["ppl"]["metrics"]["bits_per_byte"]["value"]
        row.update(ours_s=round(t_ours, 1), lm_s=round(t_lm, 1), speed_ratio=round(t_lm / t_ours, 2),
                   ours_eval_s=round(e_ours, 2), lm_eval_s=round(e_lm, 2), eval_speed_ratio=round(e_lm / e_ours, 2))
        rows.append(row)
        print(json.dumps(row), flush=True)
    table = ["| task | n | max abs(Δ loglik) | acc ours / lm-eval | acc_norm ours / lm-eval | items differing (acc, acc_norm, prompt) | wall s ours / lm-eval | items/s ratio (end to end; evaluation only) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["task"] == "ppl":
            table.append(f"| ppl | {r['n']} docs | {r['max_abs_dll']:.2e} (relative {r['max_rel_dll']:.1e}) | bits per byte {r['bpb_ours']:.5f} / "
                         f"{r['bpb_lm']:.5f} | | | {r['ours_s']} / {r['lm_s']} | {r['speed_ratio']}x; "
                         f"{r['eval_speed_ratio']}x |")
        elif r["task"] == "gsm8k":
            table.append(f"| gsm8k | {r['n']} | generations / extracted answers differing: {r['gen_diff']} / "
                         f"{r['extract_diff']} | strict EM {r['ours_em_strict']:.4f} / "
                         f"{r['lm_em_strict']:.4f} | flexible EM {r['ours_em_flex']:.4f} / {r['lm_em_flex']:.4f} | "
                         f"{r['em_strict_diff']}, {r['em_flex_diff']}, {r['prompt_diff']} | {r['ours_s']} / {r['lm_s']} | "
                         f"{r['speed_ratio']}x; {r['eval_speed_ratio']}x |")
        else:
            table.append(f"| {r['task']} | {r['n']} | {r['max_abs_dll']:.2e} | {r['ours_acc']:.4f} / {r['lm_acc']:.4f} | "
                         f"{r['ours_acc_norm']:.4f} / {r['lm_acc_norm']:.4f} | {r['acc_diff']}, {r['acc_norm_diff']}, "
                         f"{r['prompt_diff']} | {r['ours_s']} / {r['lm_s']} | {r['speed_ratio']}x; {r['eval_speed_ratio']}x |")
    text = "\n".join(table) + "\n"
    print("\n" + text)
    with open(os.path.join(args.out, "comparison.md"), "w", encoding="utf-8") as f:
        f.write(text)
    with open(os.path.join(args.out, "comparison.json"), "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=1)
    bad = [r["task"] for r in rows if not (r["max_rel_dll"] <= 1e-6 if r["task"] == "ppl" else r["max_abs_dll"] <= 1e-4) or r["acc_diff"] or r["acc_norm_diff"] or r["prompt_diff"]
           or r["gen_diff"] or r["extract_diff"] or r["em_strict_diff"] or r["em_flex_diff"]]
    if bad:
        print(f"DISAGREEMENT on: {', '.join(bad)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
