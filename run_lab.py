"""
run_lab.py -- the lab: one command from nothing to an aligned chat model, with a report card.

    python run_lab.py                           # CPU, the lab size (~10 min on one core) -> lab_run/report.md
    python run_lab.py --size tiny --out_dir /tmp/lab_tiny      # the CI size: ~2 CPU-minutes in all
    python run_lab.py --device cuda             # a larger model on one GPU (size "gpu")
    python run_lab.py --force_from sft          # re-run SFT (and, because its output changes, all after it)
    python run_lab.py --train_tokenizer         # train a tokenizer on the lab data instead of the shipped one
    python run_lab.py --knowledge single --stop_after sft --out_dir lab_single   # Physics of LMs 3.1 exercise
    python run_lab.py --dry_run                 # print every stage's command, run nothing
    python run_lab.py --size tiny --golden tests/golden_lab_tiny.json   # does my modified code still behave?
Two stages of the pipeline live in this file and run alone too (the pipeline runs exactly these lines):
    python run_lab.py --evaluate lab_run        # the evaluation stage: lab_run/eval/eval.json
    python run_lab.py --report lab_run          # rewrite lab_run/report.md + report.json from what is there

The stages, each the real script run as a subprocess; its command is printed before it runs, so any
stage can be re-run alone by copying that line (run from the repository root):
    data       data/lab.py        the seeded bilingual lab world: corpus, conversations, preferences, evals
    tokenizer  tokenizer/train.py (only with --train_tokenizer; otherwise the shipped tokenizer/lab.model)
    prepare    data/prepare.py    the corpus -> flat token memmaps (train.bin, val.bin, meta.json)
    pretrain   pretrain.py        a LLaMA from scratch on the memmaps
    sft        sft.py             chat-template fine-tuning, assistant-only loss, pretraining batches mixed in
    reward     reward.py          the reward model, from SFT (size lab: implicit, beta * log(pi_RM / pi_SFT), on the
                                  pairs; tiny and gpu: a scalar head, Bradley-Terry on pairs and rankings)
    dpo        dpo.py             DPO from SFT on the preference pairs (size tiny: + one round on its own samples)
    ppo        rlhf_ppo.py        PPO against the reward model, from SFT, KL-penalised to SFT
    eval       run_lab.py --evaluate   every model on the held-out questions, side by side
    report     run_lab.py --report     report.md (GitHub-readable, SVG curves) + report.json

Idempotent, like make: a stage is skipped when its final artefact (written atomically by the stage:
world.json, meta.json, final.pt, metrics.json, eval.json) exists AND its small state file
(<stage dir>/lab_stage.json, written by this script after the stage succeeded) says it was made by
the same command, from the same upstream artefacts (size + mtime) and the same source code (sha256 of
the stage's script and the modules it leans on). Anything else re-runs the stage, after deleting its
directory (the stage scripts refuse to overwrite a run). So a crashed pipeline resumes at the stage
that failed; `rm -r lab_run/sft` (or editing sft.py -- the class exercises) re-runs SFT and every stage
downstream of it, and nothing upstream. Downstream means "reads its output": PPO does not read DPO's,
so deleting dpo/ re-runs dpo and eval only.

Timing: wall-clock and CPU time per stage (os.wait4's rusage: the stage and the workers it waited
for, exact even while stages run side by side) are recorded in its state file and reported; on a
shared machine the CPU time is the honest one. --jobs 2 (the default on a machine with 2 or more
cores) runs a stage as soon as its inputs are done, two at a time: after SFT, the reward model and
GRPO together, then DPO and PPO; every stage keeps one thread, so the numbers do not change.

Simplifications on purpose: a stage that fails is re-run from its start (the stages support --resume,
but at lab sizes a stage takes a minute or two, and a half-written run directory is easier to delete
than to reason about); the sizes below are plain dicts, not flags -- edit them, or copy a printed
command and change its flags.
"""
import argparse
import hashlib
import html
import json
import math
import os
import platform
import random
import shlex
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.abspath(__file__))

# -----------------------------------------------------------------------------
# Sizes: every stage's flags. "lab" is tuned for a 2-core CPU (the whole pipeline well under 15 min),
# "tiny" for CI (the same recipe on a 16-person world, ~2 CPU-minutes), "gpu" for one GPU. Keys are
# the stages' own flag names (data/lab.py spells its knobs with dashes; translated below).
# What the tuning found (lab size, seed 0, held-out eval_qa accuracy; details in the README):
#   - SFT alone learns the chat format but not to reach what pretraining stored: 4% after 250 steps,
#     and longer or hotter SFT overfits the SFT people (val loss up). Mixing plain pretraining
#     batches into SFT (--pretrain_ratio 0.5, the seed's "mixed training") gave 24%.
#   - DPO on the offline pairs alone moved answers away from SFT without making them better (the
#     rejected answers are things SFT no longer says); one extra round on the policy's own samples,
#     ranked by the reward model (dpo.py --rounds 1), fixes real mistakes. At the lab size beta 0.3
#     (closer to SFT) gave the best held-out accuracy (+2.4 points; beta 0.1: +1.2, lr 3e-5: -0.6);
#     the reward model prefers DPO's answers head to head (win rate 0.54-0.66) while its mean score
#     stays at SFT's (a few answers, refusals among them, get much worse scores).
#   - PPO raised the reward while held-out accuracy fell (-2 to -6 points, mostly follow-ups and sums,
#     which its single-turn prompts never ask; and the reward model cannot tell a wrong fact from a
#     right one: see its per-kind accuracy). PPO-ptx on the pretraining text (InstructGPT's fix) with
#     a KL coefficient of 0.1 kept accuracy at SFT's (+-2 answers) with the reward still up; ptx on
#     the SFT conversations held it less well.
#   - Re-measured on the current lab (dummy-prefix tokenizer, pronoun answers, SFT at 85-89% over seeds
#     0-2): DPO with its online round ranked by the reward model lost 3.2-5.0 points (the reward model
#     is at chance on wrong facts and sums; ranked by the checker the round lost 7.3, seed 0), offline
#     pairs alone kept SFT's accuracy (seed 0), hence rounds=0 here; GRPO at lr 2e-4 lost 1.2-6.7 points,
#     at 5e-5 it kept SFT's (seed 0), hence 5e-5. The notes below are from the earlier, 20% SFT model.
#   - GRPO with the checker (8 prompts x 8 answers per iteration, no KL): lr 1e-4 for 30 iterations gained
#     +6.5 points on eval_qa (95% CI +2.4..+10.6), 60 iterations +13.1 (+7.7..+18.5); lr 2e-4 for 40 iterations
#     +22.6 (+16.3..+29.0; seed 1: +23.2), facts and follow-ups both up, in 56 s wall (PPO: 159 s). The same
#     run against the reward model (--reward model) lost 3.0 points (facts 26% -> 20%).

SIZES = {
    "tiny": dict(
        data=dict(people=16, rl_people=4, eval_people=4, eval_followups=40, pretrain_docs=8000, sft_train=1500, sft_val=100,
                  prefs_train=1000, prefs_val=200, rank_train=100, rl_prompts=300, rl_eval=100, sft_habit=0.9,
                  cut_off=0.125),   # cut_off on here only so that CI runs the knob end to end (see "lab")
        model=dict(model="tiny", dim=128, n_layers=2, n_heads=4, n_kv_heads=2, seq_len=128),
        pretrain=dict(max_steps=200, batch_size=16, lr=3e-3, min_lr=3e-4, warmup_steps=20, eval_interval=50,
                      eval_steps=5, log_interval=10),
        sft=dict(max_steps=200, batch_size=16, lr=1e-3, min_lr=1e-4, warmup_steps=20, eval_interval=100,
                 log_interval=10, pretrain_ratio=0.5),
        reward=dict(max_steps=60, batch_size=8, lr=1e-3, min_lr=1e-4, warmup_steps=6, eval_interval=30, log_interval=5),
        dpo=dict(max_steps=40, batch_size=8, lr=1e-4, min_lr=1e-5, warmup_steps=4, beta=0.3, nll_coef=1.0, rounds=0,
                 round_prompts=128, samples=4, eval_interval=20, log_interval=5, eval_limit=32),
        ppo=dict(max_steps=30, rollout_batch=32, batch_size=16, lr=1e-4, min_lr=1e-5, critic_lr=1e-3, kl_coef=0.1,
                 ptx_coef=1.0, eval_interval=10, eval_sample=16, eval_limit=32, sample_interval=0, log_interval=1),
        # GRPO lr 2e-4: at 1e-4 its 10 iterations left the policy so close to SFT that the sampled KL
        # estimate came out below 0 in 2 of the 6 perturbation cells (now 0.5-0.9 nats)
        grpo=dict(max_steps=10, prompts_per_step=4, group_size=4, batch_size=16, lr=2e-4, min_lr=2e-5,
                  max_new_tokens=32, eval_interval=0, eval_limit=32, sample_interval=0, log_interval=1),
        eval=dict(max_new_tokens=32),
    ),
    "lab": dict(
        # sft_habit: the SFT demonstrations say 90% of the age answers twice (data/lab.py), a habit SFT copies
        # and the preference stages are there to remove (see the README's reference numbers). At 0.8 one seed
        # in three copied it in English only and left DPO little to remove; at 0.9 plain DPO kept it in one
        # seed in three (it pushed down the second copy, not the stop), which the RPO term (nll_coef) fixes.
        # cut_off (data/lab.py) stays 0 here. Measured over 9 trajectories: 375 extra pairs rejecting the right
        # answer cut off before its fact shrink the reward model's empty-answer hole (an empty answer beating
        # the reference: 7-249 of 506 held-out questions -> 6-92), but widen its other hole (another question's
        # right answer beating the reference) in 8 of 9, and PPO gained 1.1 points less (README, The previous version).
        # off_topic (data/lab.py) stays 0 too. With question_drill 0.5, 750 pairs rejecting another question's
        # answer plus the 375 cut-off pairs closed both holes in 9 of 9 (empty 7-138, other 19-36 of 506) and
        # helped nothing: DPO -0.0 +- 0.6, PPO -0.7 +- 0.8 points, the reward model's wrong facts -2.3 +- 0.7
        # (README, The question-drill version).
        # sum_answer (data/lab.py) stays "restate" here ("8 + 3 = 11."). Held-out sums fail by changing the second
        # operand ("Compute 9 + 0." -> "9 + 1 = 10.") already in the base model, and SFT's held-out sums land anywhere
        # from 7% to 83% by trajectory. Measured, not adopted (README, The question-drill version): 4 000 pretraining Q/A sums with
        # operands up to 99 as copy practice (base model 8 -> 2 and 1 -> 1 of 86 held-out sums, seeds 0 and 2), and
        # answering with the result alone, "The answer is 11." (nine trajectories: SFT's held-out sums +3.2 +- 11.5
        # points, from 15 -> 76 of 86 to 71 -> 37: the same lottery, redrawn).
        # question_drill 0.5 is what fixed it: half the drill documents ask the sft and rl sums in plain-text Q/A
        # form (held-out sums stay plain drill). The base models then answer the held-out sums asked that way (82
        # and 81 of 86, seeds 0 and 2; without: 8 and 1), and over nine trajectories SFT's held-out sums went from
        # 6-71 of 86 to 62-84, SFT from 62.6-83.0% to 73.5-82.4% (README, The question-drill version).
        # answer_subject stays "pronoun" ("He is a writer."). Answers that name the person (nine trajectories) read
        # right far more often, but PPO's gain fell 2.7 +- 0.8 points (under 10 in 4 of 9) and one SFT answered 18%
        # of the held-out people with an SFT person's name (README, Answers that name the person).
        data=dict(drill=0.3, sft_habit=0.9, question_drill=0.5),
        model=dict(model="lab", seq_len=256),
        pretrain=dict(max_steps=500, batch_size=16, lr=3e-3, min_lr=3e-4, warmup_steps=25, eval_interval=100,
                      eval_steps=10, log_interval=10),
        sft=dict(max_steps=400, batch_size=16, lr=1e-3, min_lr=1e-4, warmup_steps=30, eval_interval=100,
                 log_interval=10, pretrain_ratio=0.5),
        # The reward model is implicit, r = 0.3 * log(pi_RM / pi_SFT) summed over the answer (reward.py
        # --implicit_beta), trained on the pairs only: the scalar head ranked 86% of the held-out pairs and wrong
        # facts at chance (51-59%, seeds 0-2) where the implicit one ranks 97.5% / 90-91% (seeds 0 and 1 on the
        # AMD machine); with the ranked lists mixed in it fell back on rambling (77-79%) by step 100-150.
        reward=dict(max_steps=150, batch_size=8, lr=5e-5, min_lr=5e-6, warmup_steps=15, eval_interval=50,
                    log_interval=10, implicit_beta=0.3, rankings=False),
        dpo=dict(max_steps=100, batch_size=8, lr=5e-5, min_lr=5e-6, warmup_steps=10, beta=0.3, nll_coef=1.0, rounds=0,
                 round_prompts=256, samples=4, eval_interval=50, log_interval=10, eval_limit=64),
        # PPO kl_coef 0.05 against the implicit reward model. Its rewards are normalised by their std over the held-out
        # answers (9.2 at seed 0: rambling answers score -20 and below), so a normal answer's reward moves by tenths;
        # KL-regularised RL's optimum is pi_SFT * (pi_RM / pi_SFT)^(beta / (std * kl_coef)): at 0.3 that exponent is 0.1
        # and PPO gained +10.3 / +3.8 points (seeds 0, 1); at 0.05 (exponent ~0.65) +15.6 at seed 0 (README). With the
        # scalar head 0.3 was needed: at 0.1 PPO hacked it in 2 runs of 4 (ages moved to 33 or 63, "上海" cut to "上").
        # ptx_batch_size 8: a PPO-ptx row is a whole 256-token window, so 16 of them were ~70% of PPO's training time.
        # 8 rows (nine trajectories): PPO +1.2 points, its gain over SFT steadier (spread 4.7 -> 3.3 points), the
        # Chinese age habit PPO kept in one trajectory of nine gone, PPO ~70 s faster (README, This version).
        ppo=dict(max_steps=40, rollout_batch=32, batch_size=16, ptx_batch_size=8, lr=1e-4, min_lr=1e-5, critic_lr=1e-3,
                 kl_coef=0.05, ptx_coef=1.0, eval_interval=10, eval_sample=32, eval_limit=64, sample_interval=10,
                 log_interval=1),
        grpo=dict(max_steps=100, prompts_per_step=8, group_size=8, batch_size=16, lr=5e-5, min_lr=5e-6,
                  eval_interval=20, eval_sample=32, eval_limit=64, sample_interval=20, log_interval=1),
        eval=dict(max_new_tokens=48),
    ),
    "gpu": dict(   # NOT yet measured on a GPU: the lab recipe, scaled up (a bigger model, more data and steps)
        data=dict(pretrain_docs=100000, sft_train=20000, prefs_train=12000, rank_train=2000, rl_prompts=4000,
                  drill=0.3, sft_habit=0.9, question_drill=0.5),
        model=dict(model="lab", dim=512, n_layers=8, n_heads=8, n_kv_heads=4, seq_len=256),
        pretrain=dict(max_steps=3000, batch_size=64, lr=1e-3, min_lr=1e-4, warmup_steps=200, eval_interval=500,
                      eval_steps=20, log_interval=50),
        sft=dict(max_steps=1500, batch_size=64, lr=3e-4, min_lr=3e-5, warmup_steps=100, eval_interval=500,
                 log_interval=50, pretrain_ratio=0.5),
        reward=dict(max_steps=600, batch_size=32, lr=1e-4, min_lr=1e-5, warmup_steps=50, eval_interval=200,
                    log_interval=20),
        dpo=dict(max_steps=400, batch_size=32, lr=2e-5, min_lr=2e-6, warmup_steps=40, beta=0.3, nll_coef=1.0, rounds=1,
                 round_prompts=1024, samples=4, eval_interval=200, log_interval=20, eval_limit=200),
        ppo=dict(max_steps=100, rollout_batch=64, batch_size=32, lr=5e-5, min_lr=5e-6, critic_lr=5e-4, kl_coef=0.3,
                 ptx_coef=1.0, eval_interval=20, eval_sample=64, eval_limit=200, sample_interval=20, log_interval=5),
        grpo=dict(max_steps=100, prompts_per_step=16, group_size=8, batch_size=32, lr=5e-5, min_lr=5e-6,
                  eval_interval=20, eval_sample=64, eval_limit=200, sample_interval=20, log_interval=5),
        eval=dict(max_new_tokens=48),
    ),
}

# The source files each stage's result depends on (besides its own script): editing one re-runs the
# stage. model.py and common.py are everywhere; the tokenizer and the checker where they are used.
CORE = ["model.py", "lora.py", "common.py", "tokenizer/tokenizer.py"]
CODE = {
    "data": ["data/lab.py"],
    "tokenizer": ["tokenizer/train.py"],
    "prepare": ["data/prepare.py", "tokenizer/tokenizer.py"],
    "pretrain": ["pretrain.py", "data/prepare.py"] + CORE,
    "sft": ["sft.py", "data/formats.py", "data/prepare.py"] + CORE,
    "reward": ["reward.py", "data/formats.py"] + CORE,
    "dpo": ["dpo.py", "reward.py", "chat.py", "data/formats.py", "data/lab.py"] + CORE,
    "ppo": ["rlhf_ppo.py", "reward.py", "chat.py", "data/lab.py"] + CORE,
    "grpo": ["grpo.py", "rlhf_ppo.py", "reward.py", "chat.py", "data/lab.py", "data/formats.py"] + CORE,
    "eval": ["run_lab.py", "chat.py", "reward.py", "data/lab.py"] + CORE,
}


def get_args(argv=None):
    p = argparse.ArgumentParser(description="The nanollama lab: data -> tokenizer -> pretrain -> SFT -> reward "
                                            "model -> DPO -> PPO -> evaluation -> report (see the docstring).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out_dir", default="lab_run", help="run directory: one sub-directory per stage, report.md")
    p.add_argument("--size", default="auto", choices=["auto"] + list(SIZES),
                   help="hyper-parameter set; auto = gpu with --device cuda, else lab")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"], help="passed to every stage")
    p.add_argument("--seed", type=int, default=0, help="one seed for the world, the data split and every stage")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="stages at a time once their inputs are done (reward with GRPO, then DPO with PPO); "
                        "each stage's output then goes to OUT_DIR/logs/STAGE.log")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads per stage that runs beside another (OMP_NUM_THREADS; 0 = torch's default); "
                        "pretrain, SFT and eval, which always run alone, get this times min(--jobs, cores). 1 is "
                        "deterministic and, for models this small, as fast as 2 on a busy machine (idle OpenMP "
                        "threads spin)")
    p.add_argument("--knowledge", default=None, choices=["single", "multi", "multi_permute", "mixed", "mixed_all"],
                   help="how pretraining states the facts (data/lab.py; default: the size's, mixed): the "
                        "'Physics of LMs 3.1 on a laptop' exercise in the README")
    p.add_argument("--sft_habit", type=float, default=None, metavar="P",
                   help="share of SFT answers about an age said twice (data/lab.py; default: the size's, 0.9; "
                        "0 = clean demonstrations)")
    p.add_argument("--cut_off", type=float, default=None, metavar="P",
                   help="extra preference pairs (share of prefs_train) rejecting the right answer cut off before its "
                        "fact (data/lab.py; default: the size's: lab and gpu 0, tiny 0.125; README exercise 11)")
    p.add_argument("--off_topic", type=float, default=None, metavar="P",
                   help="extra preference pairs (share of prefs_train) rejecting the right answer to another question "
                        "(data/lab.py; default 0 at every size: measured, not adopted; README exercise 11)")
    p.add_argument("--sum_answer", default=None, choices=["restate", "result"],
                   help="how the lab's sums are answered (data/lab.py; default restate, '8 + 3 = 11.'; result: "
                        "'The answer is 11.', measured and not adopted; README exercise 12)")
    p.add_argument("--question_drill", type=float, default=None, metavar="P",
                   help="share of the pretraining arithmetic drill asked as plain-text Q/A sums, sft and rl problems "
                        "only (data/lab.py; default: the size's: lab and gpu 0.5, tiny 0; README exercise 12)")
    p.add_argument("--bio_pronouns", type=float, default=None, metavar="P",
                   help="share of a pretraining biography's later sentences that open with he / she (他 / 她) instead "
                        "of the name, both languages (data/lab.py; default: the original text, 0.2 in English and "
                        "none in Chinese; README, This version)")
    p.add_argument("--answer_subject", default=None, choices=["pronoun", "name"],
                   help="how the lab's fact answers name their person (data/lab.py; default pronoun, 'He lives in "
                        "Paris.'; name: 'Bob lives in Paris.', as the biographies say it)")
    p.add_argument("--train_tokenizer", action="store_true",
                   help="train a sentencepiece tokenizer on the lab data (default: reuse tokenizer/lab.model)")
    p.add_argument("--force", action="store_true", help="re-run every stage")
    p.add_argument("--force_from", default=None, metavar="STAGE",
                   help="re-run this stage; every stage that reads its output re-runs with it")
    p.add_argument("--stop_after", default=None, metavar="STAGE", help="stop after this stage (no report)")
    p.add_argument("--dry_run", action="store_true", help="print the stage commands and whether each would run")
    p.add_argument("--golden", default=None, metavar="JSON",
                   help="after the run, compare report.json with these golden values; exit 1 on a miss")
    p.add_argument("--write_golden", default=None, metavar="JSON",
                   help="after the run, write this run's golden values (with default tolerances) to JSON")
    m = p.add_argument_group("the two in-file stages, alone")
    m.add_argument("--evaluate", default=None, metavar="RUN_DIR", help="run only the evaluation stage of RUN_DIR")
    m.add_argument("--report", default=None, metavar="RUN_DIR", help="only (re)write RUN_DIR's report")
    m.add_argument("--max_new_tokens", type=int, default=48, help="--evaluate: answer length limit (greedy)")
    m.add_argument("--batch_size", type=int, default=32, help="--evaluate: prompts per generate call")
    args = p.parse_args(argv)
    if args.device == "auto":
        import torch   # only here: the pipeline itself never needs torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.size == "auto":
        args.size = "gpu" if args.device == "cuda" else "lab"
    return args


# -----------------------------------------------------------------------------
# The stages: commands, directories, artefacts, dependencies


class Stage:
    """One pipeline stage. cmd: argv after "python" (None: nothing to run, e.g. the shipped
    tokenizer); out: its directory (deleted before a re-run); artefact: the file whose presence
    means "done" (the stage writes it atomically, last); needs: upstream stages whose artefacts
    it reads."""

    def __init__(self, name, what, cmd, out, artefact, needs, code, env=None):
        self.name, self.what, self.cmd, self.out, self.artefact = name, what, cmd, out, artefact
        self.needs, self.code, self.env = needs, code, env or {}


RUN_ALONE = ("pretrain", "sft", "eval")   # stages no other stage can run beside (build_stages: their threads)


def flags(d):
    """{"lr": 1e-3, "batch_size": 16} -> ["--lr", "0.001", "--batch_size", "16"]."""
    out = []
    for k, v in d.items():
        out += [f"--{k}", str(v)]
    return out


def build_stages(args):
    """The pipeline for these arguments, in order."""
    S, R = SIZES[args.size], args.out_dir
    j = lambda *parts: os.path.join(R, *parts)   # noqa: E731  (a path inside the run directory)
    data, common_flags = j("data"), ["--device", args.device, "--seed", str(args.seed)]
    lab_knobs = []
    knobs = {"knowledge": args.knowledge, "sft_habit": args.sft_habit, "cut_off": args.cut_off, "sum_answer": args.sum_answer,
             "question_drill": args.question_drill, "off_topic": args.off_topic, "bio_pronouns": args.bio_pronouns,
             "answer_subject": args.answer_subject}
    for k, v in {**S["data"], **{k: v for k, v in knobs.items() if v is not None}}.items():
        lab_knobs += [f"--{k.replace('_', '-')}", str(v)]
    stages = [Stage("data", "the lab world (bilingual synthetic facts, conversations, preferences, evals)",
                    ["data/lab.py", "--out", data, "--seed", str(args.seed)] + lab_knobs,
                    data, j("data", "world.json"), [], CODE["data"])]
    if args.train_tokenizer:
        tok = j("tokenizer", "lab.model")
        stages.append(Stage("tokenizer", "sentencepiece BPE trained on the lab data (2048 pieces, split Han)",
                            ["tokenizer/train.py", "--out", tok, "--vocab_size", "2048", "--split_han",
                             "--character_coverage", "1.0", "--fields", "text,messages,chosen,rejected,responses",
                             "--seed", str(args.seed)]
                            + [os.path.join(data, f) for f in ("pretrain.jsonl", "sft_train.jsonl", "prefs_train.jsonl",
                                                               "rank_train.jsonl", "rl_prompts.jsonl")],
                            j("tokenizer"), tok, ["data"], CODE["tokenizer"]))
    else:
        tok = "tokenizer/lab.model"
        stages.append(Stage("tokenizer", "the shipped tokenizer/lab.model (reproduce: tokenizer/train.py's docstring)",
                            None, None, tok, [], []))
    tok_flags = ["--tokenizer", tok]
    stages.append(Stage("prepare", "tokenize the corpus into token memmaps",
                        ["data/prepare.py", "--input", os.path.join(data, "pretrain.jsonl"), "--out", j("tokens"),
                         "--workers", "2", "--seed", str(args.seed)] + tok_flags,
                        j("tokens"), j("tokens", "meta.json"), ["data", "tokenizer"], CODE["prepare"]))
    stages.append(Stage("pretrain", "a LLaMA from scratch on the lab corpus",
                        ["pretrain.py", "--data", j("tokens"), "--out_dir", j("pretrain"), "--save_interval", "0"]
                        + flags(S["model"]) + flags(S["pretrain"]) + common_flags + tok_flags,
                        j("pretrain"), j("pretrain", "final.pt"), ["prepare", "tokenizer"], CODE["pretrain"]))
    stages.append(Stage("sft", "supervised fine-tuning on lab conversations (assistant-only loss), pretraining mixed in",
                        ["sft.py", "--init_from", j("pretrain", "final.pt"), "--data", os.path.join(data, "sft_train.jsonl"),
                         "--val_data", os.path.join(data, "sft_val.jsonl"), "--out_dir", j("sft"), "--save_interval", "0",
                         "--pretrain_data", j("tokens")]
                        + flags(S["sft"]) + common_flags,
                        j("sft"), j("sft", "final.pt"), ["pretrain", "prepare", "data"], CODE["sft"]))
    rm_flags = {k: v for k, v in S["reward"].items() if k != "rankings"}
    rankings = [os.path.join(data, "rank_train.jsonl")] if S["reward"].get("rankings", True) else []
    stages.append(Stage("reward", "the reward model, from SFT, on preference pairs (and ranked lists)",
                        ["reward.py", "--init_from", j("sft", "final.pt"),
                         "--data", os.path.join(data, "prefs_train.jsonl")] + rankings +
                        ["--val_data", os.path.join(data, "prefs_val.jsonl"), "--out_dir", j("reward"),
                         "--save_interval", "0"] + flags(rm_flags) + common_flags,
                        j("reward"), j("reward", "final.pt"), ["sft", "data"], CODE["reward"]))
    # PPO before DPO: with --jobs 2 the longest stage (PPO) starts as soon as the reward model is done, and
    # DPO waits for GRPO's slot (list order is the start order among stages that are ready)
    stages.append(Stage("ppo", "PPO RLHF: actor from SFT, reward model, KL penalty to SFT",
                        ["rlhf_ppo.py", "--init_from", j("sft", "final.pt"), "--reward_model", j("reward", "final.pt"),
                         "--prompts", os.path.join(data, "rl_prompts.jsonl"), "--eval_data",
                         os.path.join(data, "rl_eval.jsonl"), "--ptx_data", j("tokens"),
                         "--out_dir", j("ppo"), "--save_interval", "0"]
                        + flags(S["ppo"]) + common_flags,
                        j("ppo"), j("ppo", "metrics.json"), ["sft", "reward", "prepare", "data"], CODE["ppo"]))
    stages.append(Stage("dpo", "Direct Preference Optimization from SFT (reference = SFT)",
                        ["dpo.py", "--init_from", j("sft", "final.pt"), "--data", os.path.join(data, "prefs_train.jsonl"),
                         "--val_data", os.path.join(data, "prefs_val.jsonl"), "--out_dir", j("dpo"),
                         "--eval_data", os.path.join(data, "rl_eval.jsonl"), "--reward_model", j("reward", "final.pt"),
                         "--prompts", os.path.join(data, "rl_prompts.jsonl"), "--save_interval", "0"]
                        + flags(S["dpo"]) + common_flags,
                        j("dpo"), j("dpo", "metrics.json"), ["sft", "reward", "data"], CODE["dpo"]))
    stages.append(Stage("grpo", "GRPO with the lab checker as the reward: from SFT, no critic, no reward model",
                        ["grpo.py", "--init_from", j("sft", "final.pt"), "--reward", "checker",
                         "--prompts", os.path.join(data, "rl_prompts.jsonl"), "--eval_data",
                         os.path.join(data, "rl_eval.jsonl"), "--out_dir", j("grpo"), "--save_interval", "0"]
                        + flags(S["grpo"]) + common_flags,
                        j("grpo"), j("grpo", "metrics.json"), ["sft", "data"], CODE["grpo"]))
    stages.append(Stage("eval", "every model on the held-out lab questions; the reward model on its answers",
                        ["run_lab.py", "--evaluate", R, "--device", args.device] + flags(S["eval"]),
                        j("eval"), j("eval", "eval.json"), ["pretrain", "sft", "reward", "dpo", "ppo", "grpo", "data"],
                        CODE["eval"]))
    if args.threads > 0 and args.device == "cpu":
        # Pretraining, SFT and the evaluation always run alone (everything after SFT waits for SFT, and
        # the evaluation for everything): they get the cores the side-by-side stages share. On the
        # 2-core AMD machine 2 threads ran pretraining 1.8x faster than 1 (the lab: 18.3 -> 12.5 min wall)
        # and gave the same numbers; on the earlier machine a 2-thread run was another float-order cell.
        alone = max(1, min(args.jobs, os.cpu_count() or 1))
        for st in stages:
            n = args.threads * (alone if st.name in RUN_ALONE else 1)
            st.env = {"OMP_NUM_THREADS": str(n)}
    return stages


# -----------------------------------------------------------------------------
# State: is a stage's output up to date?

STATE_FILE = "lab_stage.json"
STAGE_DIRS = {"data": "data", "tokenizer": "tokenizer", "prepare": "tokens", "pretrain": "pretrain", "sft": "sft",
              "reward": "reward", "dpo": "dpo", "ppo": "ppo", "grpo": "grpo", "eval": "eval"}   # stage -> its directory in the run


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fingerprint(stage):
    """What identifies a stage's artefact: size and modification time (like make; hashing
    checkpoints would cost more than it saves). The shipped tokenizer is hashed instead: a git
    checkout changes its mtime, not its content."""
    if not os.path.exists(stage.artefact):
        return None
    if stage.cmd is None:
        return "sha256:" + sha256_file(stage.artefact)
    st = os.stat(stage.artefact)
    return f"{st.st_size}:{st.st_mtime_ns}"


def expected_state(stage, by_name):
    """What the state file of an up-to-date stage must say about its inputs."""
    return {"cmd": stage.cmd, "env": stage.env,
            "upstream": {n: fingerprint(by_name[n]) for n in stage.needs},
            "code": {f: sha256_file(os.path.join(REPO, f)) for f in stage.code if os.path.exists(os.path.join(REPO, f))}}


def read_state(stage):
    path = os.path.join(stage.out, STATE_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def up_to_date(stage, by_name):
    """(True, why) when the stage can be skipped, else (False, why it must run)."""
    if stage.cmd is None:
        return True, "nothing to run"
    if not os.path.exists(stage.artefact):
        return False, f"{stage.artefact} does not exist"
    state = read_state(stage)
    if state is None:
        return False, f"{stage.artefact} exists but no {STATE_FILE} says how it was made"
    if state.get("artefact") != fingerprint(stage):
        return False, f"{stage.artefact} changed after the stage finished"
    want = expected_state(stage, by_name)
    if state.get("cmd") != want["cmd"] or state.get("env", {}) != want["env"]:
        return False, "its command changed"
    changed = [n for n, fp in want["upstream"].items() if state.get("upstream", {}).get(n) != fp]
    if changed:
        return False, "upstream output changed: " + ", ".join(changed)
    changed = [f for f, h in want["code"].items() if state.get("code", {}).get(f) != h]
    if changed:
        return False, "source changed: " + ", ".join(changed)
    return True, f"up to date ({stage.artefact})"


def atomic_write(path, text):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def show(cmd, env=None):
    """The command as a user would type it, from the repository root."""
    return "".join(f"{k}={v} " for k, v in (env or {}).items()) + "python " + shlex.join(cmd)


def start_stage(stage, by_name, log_path=None):
    """Start one stage as a subprocess (its output to the terminal, or to log_path when stages run
    side by side). Returns what finish_stage needs."""
    if os.path.isdir(stage.out):   # a stale or half-written run: the stage scripts refuse to overwrite one
        shutil.rmtree(stage.out)
    want = expected_state(stage, by_name)   # before the run: the inputs it was started with
    log = open(log_path, "w") if log_path else None
    proc = subprocess.Popen([sys.executable] + stage.cmd, cwd=REPO, env={**os.environ, **stage.env},
                            stdout=log, stderr=subprocess.STDOUT if log else None)
    return {"stage": stage, "proc": proc, "want": want, "t0": time.time(), "log": log, "log_path": log_path}


def finish_stage(job, status, usage):
    """A stage's process ended (os.wait4's status and rusage: the CPU time of this stage and the
    workers it waited for, even while other stages run). On success write its state file."""
    stage, wall = job["stage"], time.time() - job["t0"]
    cpu = usage.ru_utime + usage.ru_stime
    if job["log"]:
        job["log"].close()
    rc = os.waitstatus_to_exitcode(status)
    if rc != 0:
        tail = ""
        if job["log_path"]:
            with open(job["log_path"], errors="replace") as f:
                tail = "".join(f.readlines()[-25:])
            tail = f"\n--- the last lines of {job['log_path']} ---\n{tail}"
        raise SystemExit(f"{tail}\nstage {stage.name} failed (exit {rc}) after {wall:.0f}s. Fix it and run the same "
                         f"run_lab.py command again: finished stages are skipped. The stage alone:\n  {show(stage.cmd, stage.env)}")
    if not os.path.exists(stage.artefact):
        raise SystemExit(f"stage {stage.name} exited 0 but did not write {stage.artefact}")
    state = {"stage": stage.name, **job["want"], "artefact": fingerprint(stage), "wall_s": round(wall, 2),
             "cpu_s": round(cpu, 2), "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    atomic_write(os.path.join(stage.out, STATE_FILE), json.dumps(state, indent=1) + "\n")
    return wall, cpu


def run_pipeline(args):
    """Run the stages in order; with --jobs N > 1, up to N at a time once their inputs are done (after
    SFT: reward and GRPO side by side, then PPO beside GRPO, then DPO). Each stage keeps its one thread, so the
    numbers are those of a sequential run; only the wall time shrinks (on a 2-core machine, ~1/3)."""
    stages = build_stages(args)
    by_name = {s.name: s for s in stages}
    for opt in ("force_from", "stop_after"):
        if getattr(args, opt) and getattr(args, opt) not in by_name:
            raise SystemExit(f"--{opt} {getattr(args, opt)}: no such stage; stages: {', '.join(by_name)}")
    if args.force_from and by_name[args.force_from].cmd is None:
        raise SystemExit(f"--force_from {args.force_from}: that stage has nothing to run")
    if args.stop_after:   # that stage and what it needs, nothing else
        keep, todo = set(), [args.stop_after]
        while todo:
            name = todo.pop()
            if name not in keep:
                keep.add(name)
                todo += by_name[name].needs
        stages = [s for s in stages if s.name in keep]
    os.makedirs(args.out_dir, exist_ok=True)
    jobs = 1 if args.dry_run else max(1, args.jobs)
    print(f"nanollama lab: size {args.size}, device {args.device}, seed {args.seed}, run dir {args.out_dir}, "
          f"{jobs} stage(s) at a time")
    if os.path.abspath(os.getcwd()) != REPO:
        print(f"(stage commands below run from the repository root {REPO})")
    t_start, ran, pending, running = time.time(), {}, list(stages), {}
    cpu_total = 0.0
    while pending or running:
        for stage in list(pending):   # start every stage whose inputs are done, in order, while there is room
            if len(running) >= jobs:
                break
            if any(n not in ran for n in stage.needs):
                continue
            pending.remove(stage)
            ok, why = up_to_date(stage, by_name)
            forced = stage.cmd is not None and (args.force or args.force_from == stage.name)
            if ok and not forced:
                print(f"\n[skip] {stage.name}: {why}")
                ran[stage.name] = "skipped"
            elif args.dry_run:
                print(f"\n[would run] {stage.name}: {'forced' if forced else why}\n  {show(stage.cmd, stage.env)}")
                ran[stage.name] = "would run"
            else:
                log = os.path.join(args.out_dir, "logs", f"{stage.name}.log") if jobs > 1 else None
                if log:
                    os.makedirs(os.path.dirname(log), exist_ok=True)
                print(f"\n[run] {stage.name}: {'forced' if forced else why}\n$ {show(stage.cmd, stage.env)}"
                      + (f"\n  (output: {log})" if log else ""), flush=True)
                job = start_stage(stage, by_name, log)
                running[job["proc"].pid] = job
            if stage.name in ran:
                break   # a skipped stage may unblock an earlier-listed one: rescan from the top
        if not running:
            if pending and not any(all(n in ran for n in st.needs) for st in pending):
                raise SystemExit(f"stages {[st.name for st in pending]} wait for inputs that never come")
            continue
        pid = 0
        while not pid:   # wait for one of OUR stages (never wait4(-1): it could reap another child of this process)
            for pid in running:
                pid, status, usage = os.wait4(pid, os.WNOHANG)
                if pid:
                    break
            else:
                time.sleep(0.2)
        job = running.pop(pid)
        job["proc"].returncode = os.waitstatus_to_exitcode(status)   # reaped here, not by Popen
        wall, cpu = finish_stage(job, status, usage)
        cpu_total += cpu
        print(f"[done] {job['stage'].name}: {wall:.1f}s wall, {cpu:.1f}s CPU", flush=True)
        ran[job["stage"].name] = "ran"
    if args.stop_after:
        print(f"\n--stop_after {args.stop_after}: stopping here")
        return None
    if args.dry_run:
        return None
    this_run = {"wall_s": round(time.time() - t_start, 2), "cpu_s": round(cpu_total, 2), "jobs": jobs}
    print(f"\n$ python run_lab.py --report {args.out_dir}")
    return write_report(args.out_dir, ran, this_run, announce=True)


# -----------------------------------------------------------------------------
# The evaluation stage (python run_lab.py --evaluate RUN_DIR)


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def base_qa_prompt(messages):
    """A chat turn list -> the plain-text Q/A format of the pretraining corpus ("Q: ...\\nA: ..."
    / "问：...\\n答：..."), ending after the last "A:", so a base model can answer in the format it
    was pretrained on (the chat template means nothing to it yet)."""
    from data.lab import QA_MARKS
    text = ""
    for m in messages:
        if m["role"] == "system":
            continue
        zh = any("\u4e00" <= c <= "\u9fff" for c in m["content"])
        q, a = QA_MARKS["zh" if zh else "en"]
        text += f"{q}{m['content']}\n" if m["role"] == "user" else f"{a}{m['content']}\n"
    zh = any("\u4e00" <= c <= "\u9fff" for c in messages[-1]["content"])
    return text + QA_MARKS["zh" if zh else "en"][1].rstrip()


def complete(model, tok, texts, max_new_tokens, batch_size):
    """Greedy plain-text continuations (BOS + text, as the corpus was laid out), up to EOS."""
    import torch
    import chat
    out = []
    with torch.no_grad(), chat._autocast(model):
        for i in range(0, len(texts), batch_size):
            ids = [tok.encode(t, bos=True) for t in texts[i:i + batch_size]]
            new = model.generate(ids, max_new_tokens, temperature=0.0, eos_id=[tok.eos_id])
            out += [tok.decode(chat.strip_stop(n, [tok.eos_id]), continuation=True) for n in new]
    return out


def by_group(oks, keys):
    """Booleans grouped by key -> {key: accuracy}."""
    hits, n = {}, {}
    for ok, k in zip(oks, keys):
        hits[k], n[k] = hits.get(k, 0) + bool(ok), n.get(k, 0) + 1
    return {k: hits[k] / n[k] for k in sorted(n)}


def pronoun_cell(p):
    """'74.2% (70.0–78.0, n 410)': the share of fact answers whose opening he / she matches the person."""
    if not p["n"]:
        return "n/a"
    lo, hi = wilson(p["agree"], p["n"])
    return f"{100 * p['agree'] / p['n']:.1f}% ({100 * lo:.1f}–{100 * hi:.1f}, n {p['n']})"


def wilson(k, n, z=1.96):
    """95% confidence interval of a proportion k/n (Wilson score interval: unlike p +- 1.96 sqrt(p(1-p)/n)
    it stays inside [0, 1] and is honest at p near 0 or 1, where small lab models live)."""
    if n == 0:
        return (float("nan"), float("nan"))
    p, z2 = k / n, z * z
    mid, half = (p + z2 / (2 * n)) / (1 + z2 / n), z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return (max(0.0, mid - half), min(1.0, mid + half))


def paired_bootstrap(oks_a, oks_b, n_boot=2000, seed=0):
    """Accuracy gain of a over b on the same questions, with a 95% interval from the paired bootstrap
    (resample questions, keep each question's pair of grades together: the two models' errors are
    correlated, so this interval is much tighter than one from two independent accuracies).
    Returns (gain, lo, hi); (None, None, None) without questions."""
    import numpy as np
    diff = np.asarray(oks_a, dtype=np.float64) - np.asarray(oks_b, dtype=np.float64)
    if diff.size == 0:
        return None, None, None
    picks = np.random.default_rng(seed).integers(0, diff.size, size=(n_boot, diff.size))
    boots = np.sort(diff[picks].mean(axis=1))
    return float(diff.mean()), float(boots[int(0.025 * n_boot)]), float(boots[int(0.975 * n_boot) - 1])


def other_questions(qa, picks):
    """For each question index in picks, another question of picks in the same language and of another
    kind (seeded by the index, so every run and the tests pick the same ones)."""
    out = []
    for i in picks:
        pool = [j for j in picks if qa[j]["truth"]["lang"] == qa[i]["truth"]["lang"] and qa[j]["kind"] != qa[i]["kind"]]
        out.append(random.Random(i).choice(pool) if pool else i)
    return out


def evaluate(run_dir, device="cpu", max_new_tokens=48, batch_size=32):
    """Everything the report card needs that no stage reports by itself, computed the same way for
    every model: greedy answers to eval_qa.jsonl graded by data.lab.check (per kind and language),
    their reward-model scores, win rates of DPO and PPO against SFT (chat.head_to_head), the base
    model's plain-text completions of eval_pretrain.jsonl, and the showcase side by side."""
    import torch
    import chat
    import common
    from data import lab
    from reward import load_reward_model, reward_scorer

    d = lambda *p: os.path.join(run_dir, *p)   # noqa: E731
    device, t0 = torch.device(device), time.time()
    qa, probes = read_jsonl(d("data", "eval_qa.jsonl")), read_jsonl(d("data", "eval_pretrain.jsonl"))
    convs = [r["messages"] for r in qa]
    paths = {"base": d("pretrain", "final.pt"), "sft": d("sft", "final.pt"), "dpo": d("dpo", "final.pt"),
             "ppo": d("ppo", "final.pt"), "grpo": d("grpo", "final.pt")}
    paths = {k: p for k, p in paths.items() if os.path.exists(p)}   # a stage that did not run: its column is n/a
    _, tok = chat.load_chat_model(paths["base"], device)   # every stage records (and checks) this same tokenizer

    # the reward model scores every policy's answers (raw scores, as reward.py --score writes them), with
    # the stages' one rule for answers cut at the length limit: no end marker rendered, and the same
    # missing-EOS penalty DPO and PPO train and evaluate with (common.penalize_missing_eos)
    rm, _ = load_reward_model(d("reward", "final.pt"), device)
    rm_ctx = common.autocast(device, common.resolve_dtype("auto", device))
    reward_fn = reward_scorer(rm, tok, device, rm_ctx, common.MISSING_EOS_PENALTY, batch_size)

    with open(d("data", "world.json"), encoding="utf-8") as f:   # the people's genders, for the pronouns
        world = json.load(f)
    out = {"n_eval_qa": len(qa), "n_probes": len(probes), "max_new_tokens": max_new_tokens, "models": {},
           "kinds": [r["kind"] for r in qa]}
    # A hole a policy could find: does the reward model pay more for saying nothing than for the right
    # answer? (An implicit reward model trained to reject rambling learns that ending early pays.)
    with_reference = [i for i, r in enumerate(qa) if r.get("reference")]
    if with_reference:
        conv_ref = [convs[i] for i in with_reference]
        r_ref = reward_fn(conv_ref, [qa[i]["reference"] for i in with_reference])
        r_empty = reward_fn(conv_ref, [""] * len(conv_ref))
        out["empty_answer"] = {"n": len(conv_ref), "beats_reference": sum(e > r for e, r in zip(r_empty, r_ref)),
                               "mean_reward": sum(r_empty) / len(r_empty), "mean_reward_reference": sum(r_ref) / len(r_ref)}
        # ... and for answering another question: a fluent, right answer to a different held-out question (the
        # preference pairs never reject one, so nothing taught the reward model to read the question)
        other = other_questions(qa, with_reference)
        r_other = reward_fn(conv_ref, [qa[j]["reference"] for j in other])
        beats = [o > r for o, r in zip(r_other, r_ref)]
        out["other_answer"] = {"n": len(conv_ref), "beats_reference": sum(beats),
                               "by_kind": by_group(beats, [qa[i]["kind"] for i in with_reference])}
    answers, ended, base_show, show = {}, {}, {}, [i for i, r in enumerate(qa) if r.get("showcase")]
    for name, path in paths.items():
        model, _ = chat.load_chat_model(path, device, tok)
        answers[name], ids = chat.generate_answers(model, tok, convs, max_new_tokens=max_new_tokens,
                                                   batch_size=batch_size, return_ids=True)
        ended[name] = [common.ended(i, tok.stop_ids) for i in ids]
        graded = chat.evaluate_lab(None, tok, qa, answers=answers[name])
        rewards = reward_fn(convs, answers[name], ended[name])
        m = {"accuracy": graded["accuracy"], "by_kind": graded["by_kind"],
             "oks": [int(row["ok"]) for row in graded["records"]],   # per question: CIs and paired gains
             "by_lang": by_group([row["ok"] for row in graded["records"]], [r["truth"]["lang"] for r in qa]),
             "mean_reward": sum(rewards) / len(rewards),
             "mean_score": sum(lab.score(a, r["truth"]) for a, r in zip(answers[name], qa)) / len(qa),
             "mean_answer_chars": sum(len(a) for a in answers[name]) / len(qa),
             "n_by_kind": graded["n_by_kind"]}
        # not graded by the checker: does "He" / "She" (他 / 她) match the person asked about? right_too: the
        # answers a reader calls right, the checker's right ones whose he / she (if any) is the person's too
        said = [lab.pronoun_agrees(a, r["truth"], world) for a, r in zip(answers[name], qa)]
        agrees = [v for v in said if v is not None]
        m["pronoun"] = {"agree": sum(agrees), "n": len(agrees),
                        "right_too": sum(bool(ok) and v is not False for ok, v in zip(m["oks"], said))}
        if name == "base":   # what pretraining stored: plain-text completions of eval_pretrain.jsonl
            texts = complete(model, tok, [p["prompt"] for p in probes], 24, batch_size)
            oks = [lab.check(t, p["truth"]) for t, p in zip(texts, probes)]
            m.update(probe_accuracy=sum(oks) / len(oks), probe_oks=[int(ok) for ok in oks], probe_by_kind=by_group(oks, [p["kind"] for p in probes]),
                     probe_by_group=by_group(oks, [p["group"] for p in probes]),
                     probe_by_lang=by_group(oks, [p["truth"]["lang"] for p in probes]))
            out["probe_examples"] = [{"prompt": p["prompt"], "completion": t, "ok": ok}
                                     for p, t, ok in list(zip(probes, texts, oks))[::max(1, len(probes) // 6)]]
            # for the showcase, the base model answers in the Q/A format of its corpus, first line only
            texts = complete(model, tok, [base_qa_prompt(qa[i]["messages"]) for i in show], 32, batch_size)
            base_show = {i: t.split("\n")[0].strip() for i, t in zip(show, texts)}
        out["models"][name] = m
        print(f"{name:>5}: lab accuracy {m['accuracy']:.1%}, mean reward {m['mean_reward']:+.3f}"
              + (f"; plain-text probes {m['probe_accuracy']:.1%}" if "probe_accuracy" in m else ""), flush=True)

    for name in ("dpo", "ppo", "grpo"):   # head to head against SFT: win rates under the checker and the reward model
        if name in answers and "sft" in answers:
            h = chat.head_to_head(answers[name], answers["sft"], qa, reward_fn=reward_fn, ended_a=ended[name],
                                  ended_b=ended["sft"])
            out["models"][name]["vs_sft"] = {"win_rate_checker": h["checker"]["win_rate"],
                                             "win_rate_reward": h["reward"]["win_rate"], **h}
    out["showcase"] = [{"id": qa[i]["id"], "kind": qa[i]["kind"], "question": qa[i]["messages"][-1]["content"],
                        "context": [m["content"] for m in qa[i]["messages"][:-1]], "reference": qa[i].get("reference"),
                        "answers": {n: {"text": t, "ok": bool(lab.check(t, qa[i]["truth"]))} for n, t in
                                    ((n, base_show[i] if n == "base" else a[i]) for n, a in answers.items())}}
                       for i in show]
    out["seconds"] = round(time.time() - t0, 2)
    os.makedirs(d("eval"), exist_ok=True)
    rows = [{"id": r["id"], "kind": r["kind"], "question": r["messages"][-1]["content"], "reference": r.get("reference"),
             **{n: a[i] for n, a in answers.items()}} for i, r in enumerate(qa)]
    atomic_write(d("eval", "answers.jsonl"), "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in rows))
    atomic_write(d("eval", "eval.json"), json.dumps(out, ensure_ascii=False, indent=1) + "\n")   # last: the artefact
    print(f"evaluation done in {out['seconds']:.0f}s: {d('eval', 'eval.json')}")
    return out


# -----------------------------------------------------------------------------
# Pictures: a small hand-written SVG line plot (the runtime dependencies stay torch, numpy,
# sentencepiece and tqdm; an SVG is a text file GitHub and every browser display)

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"]


def nice_ticks(lo, hi, n=5):
    """About n round tick values (steps of 1, 2 or 5 x 10^k) from below lo to above hi."""
    if not hi > lo:
        lo, hi = lo - 0.5, hi + 0.5
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    ticks, t = [], math.floor(lo / step) * step
    while t < hi + step * 0.999:
        ticks.append(round(t, 12))
        t += step
    return ticks


def log_ticks(lo, hi):
    """Ticks for a log axis: 1, 2, 5 x 10^k from the one at or below lo to the one at or above hi."""
    cands = [m * 10 ** k for k in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 2)
             for m in (1, 2, 5)]
    below = max(c for c in cands if c <= lo * (1 + 1e-9))
    above = min(c for c in cands if c >= hi * (1 - 1e-9))
    return [round(c, 12) for c in cands if below <= c <= above]


def svg_plot(path, title, series, xlabel="step", ylabel="", logy=False):
    """series: [(label, xs, ys), ...] -> a standalone SVG line plot with axes, grid and a legend.
    A series with a single point is drawn as a dot. logy: a log y-axis (loss curves: the first steps
    fall from ln(vocab) and would flatten everything after them on a linear axis). The picture
    widens with the longest legend label, so no label is cut at the right edge. Returns the path,
    or None if nothing to draw."""
    series = [(lab_, xs, ys) for lab_, xs, ys in series if xs and all(y is not None for y in ys)]
    logy = logy and all(y > 0 for _, _, ys in series for y in ys)
    if not series:
        return None
    right = max(150, 45 + round(6.5 * max(len(s[0]) for s in series)))   # ~6.5 px per character at font-size 11
    W, H, left, top, bottom = 490 + right, 320, 60, 30, 45
    xt = nice_ticks(min(min(s[1]) for s in series), max(max(s[1]) for s in series))
    lo, hi = min(min(s[2]) for s in series), max(max(s[2]) for s in series)
    yt = log_ticks(lo, hi) if logy else nice_ticks(lo, hi)
    f = math.log10 if logy else (lambda y: y)
    px = lambda x: left + (x - xt[0]) / (xt[-1] - xt[0]) * (W - left - right)   # noqa: E731
    py = lambda y: H - bottom - (f(y) - f(yt[0])) / (f(yt[-1]) - f(yt[0])) * (H - top - bottom)   # noqa: E731
    e = html.escape
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
           f'font-family="sans-serif" font-size="11">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{left}" y="18" font-size="13" font-weight="bold">{e(title)}</text>']
    for x in xt:   # vertical grid + x labels
        out.append(f'<line x1="{px(x):.1f}" y1="{top}" x2="{px(x):.1f}" y2="{H - bottom}" stroke="#e5e5e5"/>')
        out.append(f'<text x="{px(x):.1f}" y="{H - bottom + 15}" text-anchor="middle">{x:g}</text>')
    for y in yt:   # horizontal grid + y labels
        out.append(f'<line x1="{left}" y1="{py(y):.1f}" x2="{W - right}" y2="{py(y):.1f}" stroke="#e5e5e5"/>')
        out.append(f'<text x="{left - 5}" y="{py(y) + 4:.1f}" text-anchor="end">{y:g}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{W - left - right}" height="{H - top - bottom}" fill="none" '
               f'stroke="#444"/>')
    out.append(f'<text x="{(left + W - right) / 2}" y="{H - 8}" text-anchor="middle">{e(xlabel)}</text>')
    if ylabel:
        out.append(f'<text x="14" y="{(top + H - bottom) / 2}" text-anchor="middle" '
                   f'transform="rotate(-90 14 {(top + H - bottom) / 2})">{e(ylabel)}</text>')
    for i, (label, xs, ys) in enumerate(series):
        color = PALETTE[i % len(PALETTE)]
        pts = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(xs, ys))
        if len(xs) > 1:
            out.append(f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="1.8"/>')
        for x, y in zip(xs, ys) if len(xs) <= 12 else []:   # few points (evals): mark each
            out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{color}"/>')
        ly = top + 12 + 18 * i
        out.append(f'<line x1="{W - right + 10}" y1="{ly}" x2="{W - right + 30}" y2="{ly}" stroke="{color}" '
                   f'stroke-width="2"/>')
        out.append(f'<text x="{W - right + 35}" y="{ly + 4}">{e(label)}</text>')
    out.append("</svg>")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write(path, "\n".join(out) + "\n")
    return path


def svg_scatter(path, title, panels, size=320):
    """panels: [(subtitle, xs, ys, groups), ...] -> one SVG with the panels side by side, each point a
    dot coloured by its integer group (data/sft_select.py: clusters, "before | after"). All panels share
    one scale (the union of their points), so the same example sits at the same place in each."""
    xs_all = [x for _, xs, _, _ in panels for x in xs]
    ys_all = [y for _, _, ys, _ in panels for y in ys]
    if not xs_all:
        return None
    x0, x1, y0, y1 = min(xs_all), max(xs_all), min(ys_all), max(ys_all)
    pad, top = 10, 40
    W, H = len(panels) * (size + pad) + pad, size + top + pad
    sx = (size - 2 * pad) / ((x1 - x0) or 1)
    sy = (size - 2 * pad) / ((y1 - y0) or 1)
    # Beyond the 6-colour palette, hues step by the golden angle so neighbouring ids stay distinct.
    color = lambda g: PALETTE[g] if g < len(PALETTE) else f"hsl({g * 137.508 % 360:.0f},65%,45%)"   # noqa: E731
    e = html.escape
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
           f'font-family="sans-serif" font-size="11">', f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{pad}" y="16" font-size="13" font-weight="bold">{e(title)}</text>']
    for p, (sub, xs, ys, groups) in enumerate(panels):
        ox = pad + p * (size + pad)
        out.append(f'<rect x="{ox}" y="{top}" width="{size}" height="{size}" fill="none" stroke="#444"/>')
        out.append(f'<text x="{ox + 4}" y="{top - 6}">{e(sub)} ({len(xs)} points)</text>')
        for x, y, g in zip(xs, ys, groups):
            out.append(f'<circle cx="{ox + pad + (x - x0) * sx:.1f}" cy="{top + size - pad - (y - y0) * sy:.1f}" '
                       f'r="2" fill="{color(int(g))}" fill-opacity="0.75"/>')
    out.append("</svg>")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write(path, "\n".join(out) + "\n")
    return path


# -----------------------------------------------------------------------------
# The report (python run_lab.py --report RUN_DIR)


def load_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def load_log(path):
    """A stage's log.jsonl -> list of records (empty if missing; unreadable lines skipped)."""
    out = []
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
    return out


def curve(log, ykey, event=None, xkey="step"):
    """(xs, ys) of the records with this event (None: the per-step training records) and both keys."""
    rows = [r for r in log if r.get("event") == event and r.get(ykey) is not None and r.get(xkey) is not None]
    return [r[xkey] for r in rows], [r[ykey] for r in rows]


def last(log, event=None, key=None):
    rows = [r for r in log if r.get("event") == event and (key is None or r.get(key) is not None)]
    return rows[-1] if rows else {}


def accuracy_stats(oks):
    """{"n", "ci": [lo, hi]} of per-question grades (empty when the evaluation predates them)."""
    return {"n": len(oks), "ci": list(wilson(sum(oks), len(oks)))} if oks else {}


def collect(run_dir, statuses=None):
    """Everything the report shows, as one dict (it becomes report.json)."""
    d = lambda *p: os.path.join(run_dir, *p)   # noqa: E731
    rep = {"run_dir": run_dir, "run": load_json(d("run.json")) or {}}
    stages = []
    for name, sub in STAGE_DIRS.items():
        st = load_json(d(sub, STATE_FILE)) or {}
        stages.append({"stage": name, "status": (statuses or {}).get(name, "done" if st else "n/a"),
                       "wall_s": st.get("wall_s"), "cpu_s": st.get("cpu_s"),
                       "command": show(st["cmd"], st.get("env")) if st.get("cmd") else None})
    rep["stages"] = stages
    rep["total_wall_s"] = round(sum(s["wall_s"] or 0 for s in stages), 1)
    rep["total_cpu_s"] = round(sum(s["cpu_s"] or 0 for s in stages), 1)

    world = load_json(d("data", "world.json")) or {}
    rep["data"] = {"counts": world.get("counts"), "people": len(world.get("people", []))}
    meta = load_json(d("tokens", "meta.json")) or {}
    rep["tokenizer"] = {k: meta.get(k) for k in ("tokenizer_path", "tokenizer_sha256", "vocab_size")}
    rep["tokens"] = {k: meta.get(k) for k in ("train_tokens", "val_tokens", "train_docs", "val_docs")}

    ev = load_json(d("eval", "eval.json")) or {"models": {}}
    M = ev["models"]
    logs = {n: load_log(d(n, "log.jsonl")) for n in ("pretrain", "sft", "reward", "dpo", "ppo", "grpo")}

    pl = logs["pretrain"]
    end, start = last(pl, "end"), last(pl, "start")
    train_rows = [r for r in pl if r.get("event") is None and r.get("loss") is not None]
    val = last(pl, "eval")
    rep["pretrain"] = {"params": start.get("params"), "steps": end.get("step"), "tokens": end.get("tokens"),
                       "train_loss": train_rows[-1]["loss"] if train_rows else None,
                       "val_loss": val.get("val_loss"), "val_ppl": val.get("val_ppl"),
                       "tokens_per_s": (sum(r["tok_per_s"] for r in train_rows) / len(train_rows)) if train_rows else None,
                       "elapsed_s": end.get("elapsed_s")}
    base = M.get("base", {})
    rep["base"] = {k: base.get(k) for k in ("probe_accuracy", "probe_by_kind", "probe_by_group", "probe_by_lang",
                                            "accuracy", "by_kind", "by_lang", "mean_reward", "pronoun")}
    rep["base"].update(accuracy_stats(base.get("oks")))
    rep["base"].update({f"probe_{k}": v for k, v in accuracy_stats(base.get("probe_oks")).items()})
    sl = logs["sft"]
    rep["sft"] = {"val_loss": last(sl, "eval").get("val_loss"), "steps": last(sl, "end").get("step"),
                  **{k: M.get("sft", {}).get(k) for k in ("accuracy", "by_kind", "by_lang", "mean_reward", "mean_score",
                                                          "pronoun")},
                  "accuracy_before": base.get("accuracy"), **accuracy_stats(M.get("sft", {}).get("oks"))}
    rv = last(logs["reward"], "eval")
    rep["reward"] = {"accuracy": rv.get("accuracy"), "pairs": rv.get("pairs"), "loss": rv.get("loss"),
                     "per_kind": {k: v["accuracy"] for k, v in (rv.get("per_kind") or {}).items()},
                     "per_kind_n": {k: v.get("n") for k, v in (rv.get("per_kind") or {}).items()},
                     "length_corr": (rv.get("length") or {}).get("corr"),
                     "longer_wins_model": (rv.get("length") or {}).get("longer_wins_model"),
                     "longer_wins_label": (rv.get("length") or {}).get("longer_wins_label"),
                     "ece": rv.get("ece"), "chosen_mean": rv.get("chosen_mean"), "rejected_mean": rv.get("rejected_mean"),
                     "calibration": rv.get("calibration"), "steps": last(logs["reward"], None, "loss").get("step"),
                     "implicit_beta": (load_json(d("reward", "config.json")) or {}).get("implicit_beta") or 0.0,
                     "empty_answer": ev.get("empty_answer"), "other_answer": ev.get("other_answer")}
    # The same held-out pairs ranked by DPO's implicit reward beta * log(pi_DPO / pi_SFT) (Rafailov et al. 2023,
    # "Your language model is secretly a reward model"), and by the SFT model's own log-probs: where the scalar
    # head is blind (wrong facts), the log-probs are not -- the knowledge is in the model, the head cannot read it.
    dv, de = last(logs["dpo"], "eval", "accuracy_by_kind"), load_json(d("dpo", "metrics.json")) or {}
    rep["reward"]["dpo_implicit"] = {"accuracy": dv.get("accuracy"), "per_kind": dv.get("accuracy_by_kind") or {},
                                     "pairs": dv.get("pairs"), "sft_logp_accuracy": de.get("pref_logp_accuracy_init"),
                                     "sft_logp_per_kind": de.get("pref_logp_accuracy_by_kind_init") or {}}
    for name in ("dpo", "ppo", "grpo"):
        mm, sm = M.get(name), load_json(d(name, "metrics.json")) or {}
        if not mm:
            rep[name] = None
            continue
        vs = mm.get("vs_sft", {})
        sft_oks = M.get("sft", {}).get("oks")
        gain = paired_bootstrap(mm["oks"], sft_oks) if mm.get("oks") and sft_oks else None
        rep[name] = {"accuracy": mm["accuracy"], "accuracy_sft": M.get("sft", {}).get("accuracy"),
                     **accuracy_stats(mm.get("oks")), "gain_vs_sft": gain,
                     "by_kind": mm["by_kind"], "by_lang": mm.get("by_lang"), "pronoun": mm.get("pronoun"),
                     "mean_reward": mm["mean_reward"],
                     "mean_reward_sft": M.get("sft", {}).get("mean_reward"),
                     "win_rate_reward": vs.get("win_rate_reward"), "win_rate_checker": vs.get("win_rate_checker"),
                     # identical answers tie (count 1/2): with most answers unchanged the win rate stays near 0.5
                     "reward_wins_losses_ties": [(vs.get("reward") or {}).get(k) for k in ("wins", "losses", "ties")],
                     "kl_to_sft": sm.get("kl_to_sft"), "stage_metrics": {k: v for k, v in sm.items()
                                                                          if isinstance(v, (int, float, str)) or v is None}}
    rep["ppo_vs_grpo"] = paired_table(M, ev.get("kinds"), "ppo", "grpo")
    rep["showcase"] = ev.get("showcase", [])
    rep["probe_examples"] = ev.get("probe_examples", [])
    rep["card"] = card(rep)
    return rep


def card(rep):
    """The key numbers, flat: what the README quotes and what the golden test compares."""
    c = {}

    def put(key, v):
        if isinstance(v, (int, float)) and v is not None and not (isinstance(v, float) and math.isnan(v)):
            c[key] = round(float(v), 4)
    p = rep["pretrain"]
    for k in ("train_loss", "val_loss", "val_ppl"):
        put(f"pretrain.{k}", p.get(k))
    put("base.probe_accuracy", rep["base"].get("probe_accuracy"))
    put("base.accuracy", rep["base"].get("accuracy"))
    put("sft.accuracy", rep["sft"].get("accuracy"))
    put("sft.val_loss", rep["sft"].get("val_loss"))
    put("sft.mean_reward", rep["sft"].get("mean_reward"))
    put("reward.accuracy", rep["reward"].get("accuracy"))
    put("reward.length_corr", rep["reward"].get("length_corr"))
    for k, v in (rep["reward"].get("per_kind") or {}).items():
        put(f"reward.accuracy.{k}", v)
    for name in ("dpo", "ppo", "grpo"):
        m = rep.get(name) or {}
        for k in ("accuracy", "mean_reward", "win_rate_reward", "win_rate_checker", "kl_to_sft"):
            put(f"{name}.{k}", m.get(k))
        if m.get("mean_reward") is not None and m.get("mean_reward_sft") is not None:
            put(f"{name}.reward_gain", m["mean_reward"] - m["mean_reward_sft"])   # over SFT, same reward model
    return c


def paired_table(M, kinds, a, b):
    """Per question kind: accuracies of models a and b (Wilson CIs), b - a and b - SFT (paired CIs).
    None unless eval.json has the per-question grades of a, b and SFT."""
    if not kinds or not all((M.get(m) or {}).get("oks") for m in (a, b, "sft")):
        return None
    rows = []
    for k in sorted(set(kinds)) + ["all"]:
        pick = [i for i, x in enumerate(kinds) if k in ("all", x)]
        get = lambda m: [M[m]["oks"][i] for i in pick]   # noqa: E731
        acc = {m: (sum(get(m)) / len(pick), *wilson(sum(get(m)), len(pick))) for m in (a, b, "sft")}
        rows.append({"kind": k, "n": len(pick), **acc, f"{b}-{a}": paired_bootstrap(get(b), get(a)),
                     f"{b}-sft": paired_bootstrap(get(b), get("sft"))})
    return {"a": a, "b": b, "rows": rows}


def rm_name(rv):
    """How the report names the reward model: implicit (reward.py --implicit_beta) or scalar head."""
    b = rv.get("implicit_beta") or 0.0
    return f"implicit, β·log(π_RM/π_SFT), β {b:g}" if b > 0 else "scalar head"


def ppo_vs_grpo_lines(t, rv):
    """Markdown: PPO against the reward model next to GRPO against the checker, per kind, with CIs."""
    if not t:
        return []
    wf = (rv.get("per_kind") or {}).get("wrong_fact")
    a, b = t["a"], t["b"]
    ci = lambda v: f"{100 * v[0]:.1f}% [{100 * v[1]:.0f}, {100 * v[2]:.0f}]"   # noqa: E731
    dci = lambda v: "n/a" if v[0] is None else f"{100 * v[0]:+.1f} [{100 * v[1]:+.1f}, {100 * v[2]:+.1f}]"   # noqa: E731
    md = ["", "## PPO with the reward model vs GRPO with the checker", "",
          f"The same held-out questions. PPO optimises the reward model ({rm_name(rv)}; it ranks "
          f"{fmt(wf, '%')} of the held-out wrong-fact pairs right and was shown no sums); GRPO optimises "
          "`data.lab.score`, which knows every right answer. Accuracy with a "
          "95% Wilson interval; differences in points with a 95% interval from the paired bootstrap over questions.",
          "", "| kind | n | SFT | PPO (reward model) | GRPO (checker) | GRPO − PPO | GRPO − SFT |",
          "|---|---|---|---|---|---|---|"]
    for r in t["rows"]:
        md.append(f"| {'**all**' if r['kind'] == 'all' else r['kind']} | {r['n']} | {ci(r['sft'])} | {ci(r[a])} | "
                  f"{ci(r[b])} | {dci(r[f'{b}-{a}'])} | {dci(r[f'{b}-sft'])} |")
    return md


def fmt(v, kind="f3"):
    if v is None:
        return "n/a"
    if kind == "%":
        return f"{100 * v:.1f}%"
    if kind == "+":
        return f"{v:+.3f}"
    return f"{v:.3f}"


def cell(text):
    """Text for a markdown table cell: one line, pipes and HTML brackets escaped."""
    return html.escape(str(text), quote=False).replace("|", "\\|").replace("\n", " ⏎ ") or " "


def code(text):
    """Text as an inline code span (shown verbatim by GitHub: no entities inside)."""
    return "`` " + str(text).replace("\n", " ⏎ ") + " ``"


def plots(run_dir):
    """The loss / reward curves of every stage -> [(caption, relative path)]."""
    d = lambda *p: os.path.join(run_dir, *p)   # noqa: E731
    L = {n: load_log(d(n, "log.jsonl")) for n in ("pretrain", "sft", "reward", "dpo", "ppo", "grpo")}
    specs = [
        ("pretrain", "Pretraining: loss (log scale)", "loss (nats/token)",
         [("train", curve(L["pretrain"], "loss")), ("val", curve(L["pretrain"], "val_loss", "eval"))]),
        ("sft", "SFT: loss on assistant tokens (log scale)", "loss",
         [("train", curve(L["sft"], "loss")), ("val", curve(L["sft"], "val_loss", "eval"))]),
        ("reward", "Reward model: Bradley-Terry loss and pairwise accuracy", "",
         [("train loss", curve(L["reward"], "loss")), ("train accuracy", curve(L["reward"], "accuracy")),
          ("val accuracy", curve(L["reward"], "accuracy", "eval"))]),
        ("dpo", "DPO: loss and preference accuracy", "",
         [("train loss", curve(L["dpo"], "loss")), ("train accuracy", curve(L["dpo"], "accuracy")),
          ("val loss", curve(L["dpo"], "loss", "eval")), ("val accuracy", curve(L["dpo"], "accuracy", "eval"))]),
        ("dpo_logp", "DPO: summed log-probs of the answers (train)", "log p",
         [("chosen", curve(L["dpo"], "logp_chosen")), ("rejected", curve(L["dpo"], "logp_rejected"))]),
        ("ppo", "PPO: rollout reward (raw reward-model score) and KL to SFT", "",
         [("reward", curve(L["ppo"], "reward_raw")), ("KL (nats/answer)", curve(L["ppo"], "kl")),
          ("held-out reward (greedy)", curve(L["ppo"], "reward", "eval"))]),
        ("grpo", "GRPO: rollout checker score and accuracy, share of flat groups", "",
         [("score", curve(L["grpo"], "score")), ("rollout accuracy", curve(L["grpo"], "accuracy")),
          ("flat groups", curve(L["grpo"], "flat_frac")), ("held-out accuracy (greedy)", curve(L["grpo"], "accuracy", "eval"))]),
    ]
    out = []
    for name, title, ylabel, series in specs:
        path = svg_plot(d("plots", f"{name}.svg"), title, [(lab_, xs, ys) for lab_, (xs, ys) in series], "step", ylabel,
                        logy=name in ("pretrain", "sft"))
        if path:
            out.append((title, os.path.join("plots", f"{name}.svg")))
    return out


def write_report(run_dir, statuses=None, this_run=None, announce=False):
    """report.md + report.json in run_dir, and the short version printed. Returns the report dict."""
    rep = collect(run_dir, statuses)
    rep["this_invocation"] = this_run
    figures = plots(run_dir)
    R, run = rep, rep["run"]
    md = ["# nanollama lab report", ""]
    md.append(f"Run directory `{run_dir}` · size **{run.get('size', '?')}** · device {run.get('device', '?')} · seed "
              f"{run.get('seed', '?')} · {run.get('machine', '')} · {run.get('started', '')}")
    md.append("")
    # The stages' wall times add up to more than the run took when stages ran side by side (--jobs 2).
    md.append((f"This invocation: **{this_run['wall_s'] / 60:.1f} min wall-clock** ({this_run['jobs']} stage(s) at a "
               f"time). " if this_run else "")
              + f"Stages summed: {R['total_wall_s'] / 60:.1f} min wall, **{R['total_cpu_s'] / 60:.1f} min CPU** "
              f"(CPU = user + system time of the stage processes; on a shared machine the honest number).")
    md += ["", "## Report card", "", "| stage | key numbers |", "|---|---|"]
    for line in card_lines(rep):
        md.append(f"| {line[0]} | {line[1]} |")
    kinds = sorted({k for m in ("base", "sft", "dpo", "ppo", "grpo") for k in ((rep.get(m) or {}).get("by_kind") or {})})
    names = [m for m in ("base", "sft", "dpo", "ppo", "grpo") if (rep.get(m) or {}).get("by_kind")]
    if kinds:
        md += ["", "## Held-out lab questions: accuracy by kind", "",
               "`eval_qa.jsonl` (people, arithmetic and phrasings never seen in SFT), greedy answers, graded by "
               "`data.lab.check` (right fact, right language, polite, not rambling). The base model gets the chat "
               "template it has never seen, so its number is the floor SFT starts from.", "",
               "| kind | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for k in kinds + ["all"]:
            row = [fmt((rep[m]["by_kind"] or {}).get(k) if k != "all" else rep[m]["accuracy"], "%") for m in names]
            md.append(f"| {'**all**' if k == 'all' else k} | " + " | ".join(row) + " |")
        langs = sorted({k for m in names for k in (rep[m].get("by_lang") or {})})
        for lang in langs:
            md.append(f"| language {lang} | " + " | ".join(fmt((rep[m].get("by_lang") or {}).get(lang), "%")
                                                        for m in names) + " |")
        if all(rep[m].get("ci") for m in names):
            md.append("| 95% CI (Wilson) | " + " | ".join(f"{100 * rep[m]['ci'][0]:.1f}–{100 * rep[m]['ci'][1]:.1f}%"
                                                         for m in names) + " |")
            md.append("| n questions | " + " | ".join(str(rep[m]["n"]) for m in names) + " |")
        if all(rep[m].get("pronoun") for m in names):   # (a run reported before this row existed has none)
            md.append("| he / she right (not graded; 95% CI) | " + " | ".join(
                pronoun_cell(rep[m]["pronoun"]) for m in names) + " |")
            if all("right_too" in rep[m]["pronoun"] and rep[m].get("n") for m in names):
                md.append("| right, and he / she right too (not graded; 95% CI) | " + " | ".join(
                    pronoun_cell({"agree": rep[m]["pronoun"]["right_too"], "n": rep[m]["n"]}) for m in names) + " |")
        gains = [(m, rep[m]["gain_vs_sft"]) for m in names if rep[m].get("gain_vs_sft")]
        if gains:
            md += ["", "Gain over SFT on the same questions, with a 95% interval from the paired bootstrap "
                       "(2000 resamples of the questions): " + "; ".join(
                           f"{m} {100 * g[0]:+.1f} points ({100 * g[1]:+.1f} to {100 * g[2]:+.1f})" for m, g in gains)
                   + ". A stage helps only where the whole interval is above 0."]
    md += ppo_vs_grpo_lines(rep.get("ppo_vs_grpo"), rep["reward"])
    b = rep["base"]
    if b.get("probe_by_group"):
        md += ["", "## What pretraining stored (base model, plain-text probes)", "",
               "`eval_pretrain.jsonl`: the corpus's own Q/A format cut after \"A:\", greedy completion, first sentence "
               "graded. Groups: `sft` people are asked about in SFT, `rl` in preferences/RL, `eval` only in the "
               "held-out set; all of them appear in the pretraining corpus.", "",
               "| slice | accuracy |", "|---|---|"]
        for k, v in list(b["probe_by_kind"].items()) + [(f"group {g}", v) for g, v in b["probe_by_group"].items()] \
                + [(f"language {g}", v) for g, v in b["probe_by_lang"].items()]:
            md.append(f"| {k} | {fmt(v, '%')} |")
        md.append(f"| **all** | {fmt(b['probe_accuracy'], '%')} |")
        if rep["probe_examples"]:
            md += ["", "Examples (prompt → completion):", ""]
            for e in rep["probe_examples"]:
                md.append(f"- {code(e['prompt'])} → {code(e['completion'])} {'✓' if e['ok'] else '✗'}")
    if rep["showcase"]:
        names = list(rep["showcase"][0]["answers"])
        md += ["", "## The same questions, side by side", "",
               "The fixed showcase questions of the lab world (✓ = the checker accepts the answer). The base model "
               "answers the plain `Q: … A:` prompt of its corpus instead of the chat template.", "",
               "| question | reference | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
        for s in rep["showcase"]:
            q = (" / ".join(s["context"]) + " / " if s["context"] else "") + s["question"]
            md.append(f"| {cell(q)} | {cell(s['reference'])} | " + " | ".join(
                f"{cell(s['answers'][n]['text'])} {'✓' if s['answers'][n]['ok'] else '✗'}" for n in names) + " |")
    rv = rep["reward"]
    if rv.get("calibration"):
        md += ["", "## Reward model: can it be trusted?", "",
               f"Held-out pairs: {rv['pairs']}, pairwise accuracy {fmt(rv['accuracy'], '%')} (chance 50%); mean reward "
               f"chosen {fmt(rv['chosen_mean'], '+')}, rejected {fmt(rv['rejected_mean'], '+')}. Length bias: "
               f"corr(reward, length) {fmt(rv['length_corr'], '+')}; the longer answer wins "
               f"{fmt(rv['longer_wins_model'], '%')} of pairs under the model vs {fmt(rv['longer_wins_label'], '%')} in "
               f"the labels. Calibration (ECE {fmt(rv['ece'])}):", "",
               "| confidence bin | pairs | mean confidence | observed accuracy |", "|---|---|---|---|"]
        for bn in rv["calibration"]:
            md.append(f"| {bn['lo']:.1f}–{bn['hi']:.1f} | {bn['n']} | {bn['confidence']:.3f} | {bn['accuracy']:.3f} |")
        im = rv.get("dpo_implicit") or {}
        if im.get("accuracy") is not None:
            kinds = sorted(set(rv["per_kind"]) | set(im["per_kind"]))
            md += ["", "The same held-out pairs, three ways. A scalar-head reward model reads one number at the last "
                   f"token (this run's: {rm_name(rv)}); DPO's "
                   "implicit reward β·log(π_DPO/π_SFT) (Rafailov et al. 2023), trained on the same pairs, reads the "
                   "log-probability of every answer token; SFT's own log-probs are the untrained baseline. A wrong "
                   "fact the model's log-probs rank right but the scalar head does not is knowledge the model has and "
                   "the head cannot compare in one forward pass (Allen-Zhu & Li, Physics of Language Models 3.2: "
                   "knowledge classification and comparison fail without writing the fact out first).", "",
                   "| ranked by | all | " + " | ".join(kinds) + " |", "|---" * (len(kinds) + 2) + "|",
                   f"| reward model ({rm_name(rv)}) | {fmt(rv['accuracy'], '%')} | "
                   + " | ".join(fmt(rv["per_kind"].get(k), "%") for k in kinds) + " |",
                   f"| DPO's implicit reward | {fmt(im['accuracy'], '%')} | "
                   + " | ".join(fmt(im["per_kind"].get(k), "%") for k in kinds) + " |"]
            if im.get("sft_logp_accuracy") is not None:
                md.append(f"| SFT log-prob, chosen > rejected | {fmt(im['sft_logp_accuracy'], '%')} | "
                          + " | ".join(fmt(im["sft_logp_per_kind"].get(k), "%") if im["sft_logp_per_kind"] else ""
                                       for k in kinds) + " |")
    if figures:
        md += ["", "## Curves", ""]
        for title, rel in figures:
            md += [f"![{title}]({rel})", ""]
    md += ["## Stages: time and commands", "",
           "Wall-clock and CPU time of the run that made each stage's output (a skipped stage shows the numbers "
           "of the run that made it). Copy a command to re-run one stage alone, from the repository root "
           "(delete its directory first: the training scripts refuse to overwrite a run).", "",
           "| stage | this invocation | wall | CPU |", "|---|---|---|---|"]
    for s in rep["stages"]:
        md.append(f"| {s['stage']} | {s['status']} | {fmt_s(s['wall_s'])} | {fmt_s(s['cpu_s'])} |")
    md += ["", "```bash"] + [s["command"] for s in rep["stages"] if s["command"]] + ["```", ""]
    atomic_write(os.path.join(run_dir, "report.md"), "\n".join(md))
    atomic_write(os.path.join(run_dir, "report.json"), json.dumps(rep, ensure_ascii=False, indent=1) + "\n")
    if announce:
        print("\n" + "=" * 100 + "\nREPORT CARD  (full report: " + os.path.join(run_dir, "report.md") + ")")
        for a, b_ in card_lines(rep, plain=True):
            print(f"  {a:<13} {b_}")
        print("  time          " + ", ".join(f"{s['stage']} {fmt_s(s['wall_s'])}" for s in rep["stages"]
                                            if s["wall_s"] is not None)
              + f"; stages summed {R['total_wall_s'] / 60:.1f} min wall, {R['total_cpu_s'] / 60:.1f} min CPU"
              + (f"; this invocation {this_run['wall_s'] / 60:.1f} min wall" if this_run else ""))
        print("=" * 100)
    return rep


def fmt_s(s):
    return "–" if s is None else (f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min")


def acc_ci(m, key="accuracy", prefix=""):
    """ "22.0% (95% CI 16.4–28.8%, n=168)" for a model's accuracy, or plain "22.0%" without grades."""
    ci, n = m.get(f"{prefix}ci"), m.get(f"{prefix}n")
    text = fmt(m.get(key), "%")
    return f"{text} (95% CI {100 * ci[0]:.1f}–{100 * ci[1]:.1f}%, n={n})" if ci and n else text


def pairs_ci(acc, n):
    """ "94.2% (95% CI 91.5–96.1%, n=400)" for an accuracy over n pairs (Wilson), plain "94.2%" without n."""
    if acc is None or not n:
        return fmt(acc, "%")
    lo, hi = wilson(round(acc * n), n)
    return f"{100 * acc:.1f}% (95% CI {100 * lo:.1f}–{100 * hi:.1f}%, n={n})"


def gain_ci(m):
    """ "+4.2 points (95% CI +1.2 to +7.1, paired bootstrap)" over SFT."""
    g = m.get("gain_vs_sft")
    return (f"{100 * g[0]:+.1f} points over SFT (95% CI {100 * g[1]:+.1f} to {100 * g[2]:+.1f}, paired bootstrap)"
            if g else "n/a")


def card_lines(rep, plain=False):
    """[(stage, key numbers)] for the card (markdown, or plain text for the terminal)."""
    B = (lambda s: s) if plain else (lambda s: f"**{s}**")
    p, b, s, r = rep["pretrain"], rep["base"], rep["sft"], rep["reward"]
    counts = rep["data"].get("counts") or {}
    lines = [("data", f"{rep['data']['people']} people; " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))]
    t = rep["tokenizer"]
    lines.append(("tokenizer", f"{t.get('tokenizer_path')} ({t.get('vocab_size')} pieces, sha256 "
                               f"{(t.get('tokenizer_sha256') or '')[:12]}…); corpus {rep['tokens'].get('train_tokens') or 0:,} "
                               f"train / {rep['tokens'].get('val_tokens') or 0:,} val tokens"))
    if p.get("params"):
        lines.append(("pretrain", f"{p['params'] / 1e6:.2f}M params, {p['steps']} steps, {p['tokens'] or 0:,} tokens, "
                                  f"{p['tokens_per_s'] or 0:,.0f} tok/s; train loss {fmt(p['train_loss'])}, "
                                  f"val loss {B(fmt(p['val_loss']))} (perplexity {fmt(p['val_ppl'])}); "
                                  f"plain-text probes {B(acc_ci(b, 'probe_accuracy', 'probe_'))}"
                                  + (" (" + ", ".join(f"{k} {fmt(v, '%')}" for k, v in b["probe_by_lang"].items()) + ")"
                                     if b.get("probe_by_lang") else "")))
    if s.get("accuracy") is not None:
        lines.append(("SFT", f"lab accuracy {fmt(s['accuracy_before'], '%')} (base) → {B(acc_ci(s))}; "
                             f"val loss {fmt(s['val_loss'])}; mean RM reward {fmt(s['mean_reward'], '+')}"))
    if r.get("accuracy") is not None:
        lines.append(("reward model", f"{rm_name(r)}: pairwise accuracy {B(pairs_ci(r['accuracy'], r.get('pairs')))} "
                      "(chance 50%); by rejected kind: "
                      + ", ".join(f"{k} {pairs_ci(v, r.get('per_kind_n', {}).get(k))}" for k, v in r["per_kind"].items())
                      + f"; corr(reward, length) {fmt(r['length_corr'], '+')}"
                      + (f"; an empty answer outscores the reference answer on {r['empty_answer']['beats_reference']} "
                         f"of {r['empty_answer']['n']} held-out questions" if r.get("empty_answer") else "")
                      + (f"; another question's right answer (same language) outscores it on "
                         f"{r['other_answer']['beats_reference']} of {r['other_answer']['n']}" if r.get("other_answer") else "")))
    im = r.get("dpo_implicit") or {}
    if im.get("accuracy") is not None:
        same = im.get("pairs") == r.get("pairs")   # the same held-out pairs: the same n per kind
        lines.append(("DPO as RM", f"the same pairs ranked by DPO's implicit reward β·log(π_DPO/π_SFT): "
                      f"{B(pairs_ci(im['accuracy'], im.get('pairs')))}; by rejected kind: "
                      + ", ".join(f"{k} {pairs_ci(v, r.get('per_kind_n', {}).get(k) if same else None)}"
                                  for k, v in im["per_kind"].items())
                      + (f"; SFT's own log-probs put the chosen answer first in {fmt(im['sft_logp_accuracy'], '%')}"
                         if im.get("sft_logp_accuracy") is not None else "")))
    def wlt(m):   # the reward model's verdicts behind a win rate: answers better / worse / the same
        w, l, t = m.get("reward_wins_losses_ties") or (None,) * 3
        if w is None:
            return ""
        # a 95% interval of the mean of per-question scores 1 / 0.5 / 0 (normal approximation, n ~ 500)
        n = w + l + t
        wr = (w + 0.5 * t) / n
        half = 1.96 * math.sqrt(max((w + 0.25 * t) / n - wr * wr, 0.0) / n)
        text = f" (95% CI {wr - half:.3f}–{wr + half:.3f}, n={n}: {w} better, {l} worse, {t} tied"
        # Identical answers tie, so the rate above cannot pass 0.5 + changed / 2: with SFT right on 80% and the
        # right answers kept, about 0.6. Where the answers differ, the verdicts alone (Wilson interval):
        if w + l:
            lo, hi = wilson(w, w + l)
            text += f"; where they differ, better in {w / (w + l):.3f} (95% CI {lo:.3f}–{hi:.3f}, n={w + l})"
        return text + ")"

    for name, label in (("dpo", "DPO"), ("ppo", "PPO"), ("grpo", "GRPO")):
        m = rep.get(name)
        if m and name == "grpo":   # no reward model in its loop: the checker's numbers first
            lines.append((label, f"lab accuracy {B(acc_ci(m))}, {gain_ci(m)}; "
                                 f"win rate vs SFT: checker {fmt(m['win_rate_checker'])}, reward model "
                                 f"{fmt(m['win_rate_reward'])}{wlt(m)}; mean reward {fmt(m['mean_reward'], '+')}; "
                                 f"KL to SFT {fmt(m['kl_to_sft'])} nats"))
        elif m:
            lines.append((label, f"lab accuracy {B(acc_ci(m))}, {gain_ci(m)}; "
                                 f"mean reward {B(fmt(m['mean_reward'], '+'))} (SFT {fmt(m['mean_reward_sft'], '+')}); "
                                 f"win rate vs SFT: reward model {fmt(m['win_rate_reward'])}{wlt(m)}, checker "
                                 f"{fmt(m['win_rate_checker'])}; KL to SFT {fmt(m['kl_to_sft'])} nats"))
        else:
            lines.append((label, "n/a (stage did not run)"))
    return lines


# -----------------------------------------------------------------------------
# Golden values: does a (modified) pipeline still land where the reference run did?

# Tolerance floors, absolute, per key prefix. tests/perturb.py golden writes each golden value as the median
# over runs in the float-perturbation matrix, with tolerance max(floor, 2 x the spread it measured): another
# CPU sums in another order, which flips a few greedy answers and, through RL, moves KL and rewards far more
# than pretraining losses. Absolute mean rewards are not compared (the reward model's scale moves), only
# gains over SFT under the same reward model.
GOLDEN_TOL = [("loss", 0.05), ("reward.accuracy.", 0.1), ("accuracy", 0.06), ("win_rate", 0.1),
              ("reward_gain", 0.2), ("length_corr", 0.15), ("kl_to_sft", 0.5)]   # first match wins


def golden_tolerance(key):
    """Absolute tolerance for a card key (None: not compared)."""
    return next((tol for part, tol in GOLDEN_TOL if part in key), None)


def golden_from(rep, run_dir):
    """This run's golden values: the card with tolerances, and the pretraining loss curve."""
    values = {k: {"value": v, "tol": golden_tolerance(k)} for k, v in rep["card"].items()
              if golden_tolerance(k) is not None}
    xs, ys = curve(load_log(os.path.join(run_dir, "pretrain", "log.jsonl")), "loss")
    return {"size": rep["run"].get("size"), "seed": rep["run"].get("seed"), "threads": rep["run"].get("threads"),
            "values": values, "curves": {"pretrain.loss": {"step": xs, "loss": [round(y, 4) for y in ys], "tol": 0.05}}}


def golden_check(rep, run_dir, golden):
    """[(key, golden, got, tol, ok)] for every golden value and curve point."""
    rows = []
    for k, g in golden["values"].items():
        got = rep["card"].get(k)
        rows.append((k, g["value"], got, g["tol"], got is not None and abs(got - g["value"]) <= g["tol"]))
    for name, g in golden.get("curves", {}).items():
        xs, ys = curve(load_log(os.path.join(run_dir, "pretrain", "log.jsonl")), "loss")
        have = dict(zip(xs, ys))
        tols = g["tol"] if isinstance(g["tol"], list) else [g["tol"]] * len(g["step"])   # per point, or one for all
        for x, y, tol in zip(g["step"], g["loss"], tols):
            got = have.get(x)
            rows.append((f"{name}@{x}", y, got, tol, got is not None and abs(got - y) <= tol))
    return rows


# -----------------------------------------------------------------------------


def main(argv=None):
    args = get_args(argv)
    if args.evaluate:
        evaluate(args.evaluate, args.device, args.max_new_tokens, args.batch_size)
        return 0
    if args.report:
        write_report(args.report, announce=True)
        return 0
    if not args.dry_run:
        os.makedirs(args.out_dir, exist_ok=True)
        import torch   # versions for the record (the stages import it anyway)
        atomic_write(os.path.join(args.out_dir, "run.json"), json.dumps({
            "size": args.size, "device": args.device, "seed": args.seed, "train_tokenizer": args.train_tokenizer,
            "threads": args.threads, "sizes": SIZES[args.size], "python": platform.python_version(), "torch": torch.__version__,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"
                       + (f", {torch.cuda.get_device_name()}" if args.device == "cuda" else ""),
            "started": time.strftime("%Y-%m-%d %H:%M")}, indent=1) + "\n")
    rep = run_pipeline(args)
    if rep is None:
        return 0
    if args.write_golden:
        atomic_write(args.write_golden, json.dumps(golden_from(rep, args.out_dir), indent=1) + "\n")
        print(f"golden values written to {args.write_golden}")
    if args.golden:
        rows = golden_check(rep, args.out_dir, load_json(args.golden))
        bad = [r for r in rows if not r[4]]
        print(f"\ngolden check against {args.golden}: {len(rows) - len(bad)}/{len(rows)} within tolerance")
        for k, g, got, tol, ok in rows:
            if not ok or not k.startswith("pretrain.loss@"):
                print(f"  {'ok  ' if ok else 'MISS'} {k:<36} golden {g:>9.4f}  got {'n/a' if got is None else f'{got:9.4f}'}"
                      f"  (tolerance ±{tol})")
        return 1 if bad else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
