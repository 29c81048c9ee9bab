"""
bench/grpo.py -- what skipping GRPO's flat answers saves (a benchmark, not a test).

    python bench/grpo.py --run_dir lab_run                 # 30 iterations of the lab's GRPO, twice
    python bench/grpo.py --run_dir lab_run --iters 100     # the lab's full 100

grpo.py's update passes only the answers with a non-zero advantage forward and backward
(grpo.rows_with_gradient): a group whose answers all scored the same adds exactly nothing to the
gradient. This runs grpo.py twice in this process, from LAB_RUN/sft/final.pt with the lab size's GRPO
settings (run_lab.SIZES["lab"]["grpo"], seed from LAB_RUN/run.json, no evaluation), on one thread:

  skip   grpo.py as shipped;
  all    the reference: rows_with_gradient replaced by one that keeps every row (the update as it was).

Same seed, so the rollouts are the same as long as the two policies stay equal up to float order.
Reported per run: generation and update seconds (the log's time_gen and time_train, which includes the
no-gradient pass for the old and reference log-probs), the share of answers trained on, flat groups;
then update(skip) / update(all), how many iterations' rewards were identical, and the largest weight
difference between the two final policies. Target: update time <= 0.75x, weights within 1e-5.
"""
import argparse
import os
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import torch  # noqa: E402

import common  # noqa: E402
import grpo  # noqa: E402
from run_lab import SIZES, flags, load_json  # noqa: E402


def run(run_dir, out, iters, seed):
    data = os.path.join(run_dir, "data")
    settings = {**SIZES["lab"]["grpo"], "max_steps": iters, "eval_interval": 0, "sample_interval": 0,
                "log_interval": 10 ** 6}
    argv = (["--init_from", os.path.join(run_dir, "sft", "final.pt"), "--reward", "checker",
             "--prompts", os.path.join(data, "rl_prompts.jsonl"), "--out_dir", out, "--save_interval", "0",
             "--device", "cpu", "--seed", str(seed)] + flags(settings))
    grpo.main(argv)
    log = [r for r in common.read_jsonl(os.path.join(out, "log.jsonl")) if "time_train" in r]
    return log, common.load_model(os.path.join(out, "final.pt"))[0].state_dict()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run_dir", required=True, help="a finished run_lab.py run at the lab size")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    run_info = load_json(os.path.join(args.run_dir, "run.json"))
    if run_info is None:
        sys.exit(f"{args.run_dir}: no readable run.json; give a finished run_lab.py run at the lab size")
    seed = run_info["seed"]
    keep_all = lambda rows, advantages, kl_in_loss: rows  # noqa: E731
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("skip", "all"):
            shipped = grpo.rows_with_gradient
            if name == "all":
                grpo.rows_with_gradient = keep_all
            try:
                results[name] = run(args.run_dir, os.path.join(tmp, name), args.iters, seed)
            finally:
                grpo.rows_with_gradient = shipped
    print(f"\nGRPO, lab settings, {args.iters} iterations, {args.threads} thread(s), from {args.run_dir}/sft")
    print("| run | generation s | update s | answers trained | flat groups |\n|---|---|---|---|---|")
    for name, (log, _) in results.items():
        trained = sum(r["trained_frac"] for r in log) / len(log)
        print(f"| {name} | {sum(r['time_gen'] for r in log):.1f} | {sum(r['time_train'] for r in log):.1f} | "
              f"{trained:.0%} | {sum(r['zero_var_groups'] for r in log)} of {sum(r['groups'] for r in log)} |")
    (a_log, a), (b_log, b) = results["skip"], results["all"]
    ratio = sum(r["time_train"] for r in a_log) / sum(r["time_train"] for r in b_log)
    same = sum(x["reward"] == y["reward"] for x, y in zip(a_log, b_log))
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    print(f"\nupdate time skip / all: {ratio:.2f}x (target <= 0.75x)  "
          f"identical rewards: {same} of {len(a_log)} iterations  max |weight difference|: {diff:.1e} (target <= 1e-5)")


if __name__ == "__main__":
    main()
