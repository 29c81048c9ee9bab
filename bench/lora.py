"""
bench/lora.py -- what LoRA saves and what it costs (a benchmark, not a test).

    python bench/lora.py counts                          # lab preset + llama2-7b (meta device), r = 16
    python bench/lora.py dpo-memory                      # peak memory of dpo.py: full vs LoRA (subprocesses)
    python bench/lora.py sft --run_dir LAB_RUN           # full vs LoRA SFT from LAB_RUN/pretrain/final.pt
    python bench/lora.py sft --run_dir LAB_RUN --runs lab,lora   # LoRA vs the lab's own SFT (not retrained)

counts      trainable parameters and AdamW state (bytes), full fine-tuning vs LoRA on all seven
            targets. The lab model's AdamW state is measured after a real step; the 7B one is the
            same count on the meta device (2 float32 moments per trainable parameter), plus DPO's
            model states for a bf16 run of it, by pretrain.py --estimate's arithmetic.
            Target: both <= 2% of full at r = 16.
dpo-memory  dpo.py itself, 3 steps, in a fresh process each: full DPO (policy + a frozen reference
            copy + gradients + AdamW) against --lora_rank (one model; the reference is the policy
            with its adapters off). Peak resident memory (ru_maxrss) of each, and the same minus
            the resident memory of a process that only imported torch and the scripts (the
            interpreter and libraries, which no training choice changes). The model is random
            (memory does not depend on what the weights are), built wide enough that its states
            dominate: --dim 768 --n_layers 8 by default (~57M parameters), 2 prompt groups per step.
            Target: <= 0.6x.
sft         sft.py twice from the same pretrained lab model with the lab's SFT settings and seed (run_lab.py,
            read from LAB_RUN/run.json), equal steps: full, then --lora_rank 16 at --lora_lr; or, with
            --runs lab,lora, LAB_RUN/sft (run_lab.py's own full SFT) graded instead of retrained. Then
            greedy answers to LAB_RUN/data/eval_qa.jsonl graded by the lab checker (run_lab.py's
            evaluation). Reported: held-out accuracy (95% Wilson interval; LoRA - full with the paired
            bootstrap over questions), wall and CPU time, trainable parameters, AdamW bytes.

Every run here is one process with OMP_NUM_THREADS=1 (--threads); on a shared machine the wall
times move with the load, the counts and accuracies do not.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import torch  # noqa: E402

import common  # noqa: E402
from lora import apply_lora  # noqa: E402
from model import Llama, LlamaConfig  # noqa: E402

MB = 2**20


def trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def counts(rank):
    rows = []
    for name in ("lab", "llama2-7b"):
        meta = name != "lab"
        with torch.device("meta" if meta else "cpu"):
            model = Llama(LlamaConfig.from_preset(name))
        full = trainable(model)
        apply_lora(model, rank, 2.0 * rank)
        lora = trainable(model)
        if meta:
            adam_full, adam_lora = 8 * full, 8 * lora
        else:   # one real step: the optimizer's own state tensors, counted
            def adam_bytes(m):
                opt = common.configure_optimizer(m, 1e-3, 0.0)
                m(torch.randint(0, 2048, (1, 16)), torch.randint(0, 2048, (1, 16)))[1].backward()
                opt.step()
                return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if t.dim())
            adam_lora = adam_bytes(model)
            adam_full = adam_bytes(Llama(LlamaConfig.from_preset(name)))
        rows.append({"model": name, "params": model.num_params() - lora, "trainable_full": full, "trainable_lora": lora,
                     "adamw_full_bytes": adam_full, "adamw_lora_bytes": adam_lora})
        print(f"{name:>10}: {full / 1e6:9.2f}M parameters; LoRA r={rank}: {lora / 1e6:7.3f}M trainable "
              f"({lora / full:.2%}); AdamW {adam_full / MB:9.1f} MB -> {adam_lora / MB:7.2f} MB "
              f"({adam_lora / adam_full:.2%})")
        if meta:   # DPO's model states in a bf16 GPU run, by the same arithmetic as pretrain.py --estimate
            dpo_full = 4 * full + 2 * full + 4 * full + 8 * full   # fp32 policy, bf16 reference, grads, AdamW
            dpo_lora = 2 * full + 16 * lora                        # bf16 base (= the reference), adapters' states
            rows[-1].update(dpo_states_full=dpo_full, dpo_states_lora=dpo_lora)
            print(f"{'':>10}  DPO model states (bf16 run, activations aside): full {dpo_full / 1e9:.1f} GB "
                  f"(policy, reference, gradients, AdamW) -> LoRA {dpo_lora / 1e9:.1f} GB ({dpo_lora / dpo_full:.2f}x)")
    return rows


def peak_rss_of(cmd, env):
    """Run cmd; return (its peak resident set size in bytes, wall seconds). ru_maxrss of the
    children is the maximum over all children so far, so every measurement runs in its own shell."""
    probe = ("import resource, subprocess, sys, json, time; t = time.time(); "
             "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
             "print(json.dumps([resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, time.time() - t]))")
    out = subprocess.run([sys.executable, "-c", probe, *cmd], env=env, cwd=REPO, check=True, capture_output=True,
                         text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def dpo_memory(args, env):
    from tokenizer import Tokenizer
    tmp = tempfile.mkdtemp(prefix="lora_dpo_mem_")
    tok = Tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tok.vocab_size, dim=args.dim, n_layers=args.n_layers, n_heads=args.dim // 64,
                         n_kv_heads=args.dim // 128, max_seq_len=256)
    model = Llama(config)
    common.save_checkpoint(os.path.join(tmp, "init"), "final", model, step=0, config={}, tokenizer=tok)
    prefs = args.prefs or os.path.join(tmp, "prefs.jsonl")
    if not args.prefs:
        from data import lab
        recs = lab.generate(seed=0, pretrain_docs=1, sft_train=1, sft_val=1, prefs_train=64, prefs_val=1,
                            rank_train=1, rl_prompts=1, rl_eval=1)["prefs_train"]
        with open(prefs, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in recs)
    base = [sys.executable, "dpo.py", "--init_from", os.path.join(tmp, "init", "final.pt"), "--data", prefs,
            "--val_frac", "0", "--max_steps", "3", "--batch_size", str(args.batch_size), "--eval_interval", "0",
            "--save_interval", "0", "--log_interval", "1", "--lr", "1e-4", "--warmup_steps", "1"]
    idle, _ = peak_rss_of([sys.executable, "-c", "import torch, common, dpo, model, reward"], env)
    res = {"params": model.num_params(), "idle_rss": idle}
    for name, extra in (("full", []), ("lora", ["--lora_rank", str(args.rank), "--lora_alpha", str(2 * args.rank)])):
        rss, wall = peak_rss_of(base + ["--out_dir", os.path.join(tmp, name)] + extra, env)
        res[name] = {"peak_rss": rss, "wall_s": round(wall, 1)}
        print(f"{name:>5} DPO: peak RSS {rss / MB:8.1f} MB ({(rss - idle) / MB:8.1f} MB above an idle process of "
              f"{idle / MB:.0f} MB), {wall:.1f} s for 3 steps", flush=True)
    res["ratio"] = res["lora"]["peak_rss"] / res["full"]["peak_rss"]
    res["ratio_above_idle"] = (res["lora"]["peak_rss"] - idle) / (res["full"]["peak_rss"] - idle)
    print(f"LoRA / full peak memory: {res['ratio']:.2f} ({res['ratio_above_idle']:.2f} above the idle process); "
          f"model {res['params'] / 1e6:.1f}M parameters")
    return res


def sft_compare(args, env):
    import chat
    import run_lab
    from data import lab
    run = args.run_dir
    with open(os.path.join(run, "run.json"), encoding="utf-8") as f:
        rj = json.load(f)
    s = rj["sizes"]["sft"]
    out = args.out_dir or tempfile.mkdtemp(prefix="lora_sft_")
    # run_lab.py's SFT command for this run (its seed too), without the periodic evals
    flags = ["--init_from", os.path.join(run, "pretrain", "final.pt"), "--data", os.path.join(run, "data", "sft_train.jsonl"),
             "--val_data", os.path.join(run, "data", "sft_val.jsonl"), "--save_interval", "0", "--device", "cpu",
             "--seed", str(rj.get("seed", 0)), "--eval_interval", "0", "--pretrain_data", os.path.join(run, "tokens")]
    for k in ("max_steps", "batch_size", "min_lr", "warmup_steps", "log_interval", "pretrain_ratio"):
        flags += [f"--{k}", str(s[k])]
    qa = [json.loads(line) for line in open(os.path.join(run, "data", "eval_qa.jsonl"), encoding="utf-8")]
    res = {"steps": s["max_steps"], "n_eval_qa": len(qa), "seed": rj.get("seed", 0), "lora_lr": args.lora_lr,
           "rank": args.rank}
    runs = [("full", ["--lr", str(s["lr"])]),
            ("lora", ["--lr", str(args.lora_lr), "--lora_rank", str(args.rank), "--lora_alpha", str(2 * args.rank)])]
    # "lab": the full SFT run_lab.py already trained in RUN_DIR/sft (the same command), graded, not rerun
    todo = [("lab", None)] * ("lab" in args.runs.split(",")) + [r for r in runs if r[0] in args.runs.split(",")]
    for name, extra in todo:
        d = os.path.join(run, "sft") if extra is None else os.path.join(out, name)
        if extra is not None:
            t0, cpu0 = time.time(), resource.getrusage(resource.RUSAGE_CHILDREN)
            subprocess.run([sys.executable, "sft.py", *flags, *extra, "--out_dir", d], env=env, cwd=REPO, check=True,
                           stdout=subprocess.DEVNULL)
            cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            wall, cpu = time.time() - t0, cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime
        log = common.read_jsonl(os.path.join(d, "log.jsonl"))
        start = next(r for r in log if r.get("event") == "start")
        model, tok = chat.load_chat_model(os.path.join(d, "final.pt"))
        answers = chat.generate_answers(model, tok, [r["messages"] for r in qa], max_new_tokens=48)
        oks = [int(lab.check(a, r["truth"])) for a, r in zip(answers, qa)]
        ck = torch.load(os.path.join(d, "final.pt"), map_location="cpu", weights_only=True)
        n_train = sum(v.numel() for v in ck["model"].values()) if "lora" in ck else start["params"]
        res[name] = {"accuracy": sum(oks) / len(oks), "ci95": run_lab.wilson(sum(oks), len(oks)), "oks": oks,
                     "trainable": n_train, "adamw_bytes": 8 * n_train,
                     "final_ckpt_bytes": os.path.getsize(os.path.join(d, "final.pt"))}
        if extra is not None:
            res[name].update(wall_s=round(wall, 1), cpu_s=round(cpu, 1))
        r = res[name]
        print(f"{name:>5} SFT: held-out accuracy {r['accuracy']:.1%} (95% CI {r['ci95'][0]:.1%}-{r['ci95'][1]:.1%}, "
              f"n={len(qa)}), " + (f"{wall:.0f} s wall / {cpu:.0f} s CPU for {s['max_steps']} steps, "
                                    if extra is not None else "") +
              f"{n_train / 1e6:.3f}M trainable, AdamW {8 * n_train / MB:.2f} MB, "
              f"final.pt {r['final_ckpt_bytes'] / MB:.2f} MB", flush=True)
    full = "full" if "full" in res else "lab" if "lab" in res else None
    if full and "lora" in res:
        res["lora_minus_full"] = run_lab.paired_bootstrap(res["lora"]["oks"], res[full]["oks"])
        g = res["lora_minus_full"]
        print(f"LoRA - full: {100 * g[0]:+.1f} points (95% CI {100 * g[1]:+.1f} to {100 * g[2]:+.1f}, paired bootstrap)")
    return res


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["counts", "dpo-memory", "sft"])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dim", type=int, default=768, help="dpo-memory: model width")
    parser.add_argument("--n_layers", type=int, default=8, help="dpo-memory: blocks")
    parser.add_argument("--batch_size", type=int, default=2, help="dpo-memory: prompt groups per step")
    parser.add_argument("--prefs", default=None, help="dpo-memory: preference file (default: 64 lab pairs)")
    parser.add_argument("--run_dir", default=None, help="sft: a run_lab.py directory with pretrain/final.pt")
    parser.add_argument("--lora_lr", type=float, default=3e-3,
                        help="sft: LoRA's learning rate (lab size, seed 0: 3e-3 kept 2.8 points more than 1e-2)")
    parser.add_argument("--out_dir", default=None, help="sft: where the two runs go (default: a temp dir)")
    parser.add_argument("--runs", default="full,lora",
                        help="sft: which runs, of full,lora and lab (RUN_DIR/sft graded as it is)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # MALLOC_MMAP_THRESHOLD_: glibc serves every allocation above 128 kB with its own mmap and gives it
    # back on free, so the resident size follows the live tensors (by default the threshold grows after
    # the first large free and freed memory stays resident: RSS then remembers the checkpoint loading).
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MALLOC_MMAP_THRESHOLD_": "131072"}
    if args.what == "counts":
        res = counts(args.rank)
    elif args.what == "dpo-memory":
        res = dpo_memory(args, env)
    else:
        if not args.run_dir:
            parser.error("sft needs --run_dir (a run_lab.py directory)")
        res = sft_compare(args, env)
    if args.json:
        common.atomic_write_json(args.json, res)


if __name__ == "__main__":
    main()
