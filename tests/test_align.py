"""Issue 19, alignment hardening: the leaks and inconsistencies a line-by-line review of reward.py,
dpo.py, sft.py and rlhf_ppo.py found, each pinned by a test that failed before its fix.
  - held-out splits by prompt: no held-out prompt is ever trained on (RM, DPO, SFT; one split function)
  - DPO: dropout off in policy and reference (step-0 loss ln 2 in training mode); IPO averaged per token
  - truncated answers (no stop token): one rule everywhere -- never rendered with an end marker, never the
    chosen answer of a DPO round, and the same (penalised) reward in PPO training and in evaluation
  - bf16 frozen copies compute the actor's function exactly (KL at iteration 0 is 0 under bf16 autocast)
  - dpo.kl_estimate scores the tokens that were sampled, the stop token included
  - k3_min over real tokens only; a corrupt checkpoint gives one line naming the file"""
import torch

import common
import rlhf_ppo as ppo
from test_ppo import QUESTIONS, Args, reward_model, tiny

CPU = torch.device("cpu")


def bf16_rollout(tok, actor, ref, rm, critic, n_new=10, seed=0):
    """A real rollout of the tiny actor, scored under CPU bf16 autocast."""
    prompts = [tok.render_prompt([{"role": "user", "content": q}]) for q in QUESTIONS]
    ctx = common.autocast(CPU, torch.bfloat16)
    with ctx:
        responses = actor.generate(prompts, n_new, temperature=0.7, eos_id=tok.stop_ids,
                                   generator=torch.Generator().manual_seed(seed))
    responses = [r[:n] + [tok.end_id] if n < len(r) else r for r, n in zip(responses, (3, 10, 6, 1))]
    return prompts, responses, ppo.make_experience(actor, ref, rm, critic, prompts, responses, tok, Args, 0.1, ctx,
                                                   "cpu")


# -----------------------------------------------------------------------------
# bf16 frozen copies; k3_min


def test_bf16_frozen_reference_gives_kl_exactly_zero_at_iteration_0(tok):
    actor = tiny(tok)
    ref = ppo.frozen(tiny(tok), torch.bfloat16, "cpu")          # the same weights, stored as frozen() stores them
    rm_fp32, critic = reward_model(tok, 1), reward_model(tok, 2)
    rm = ppo.frozen(reward_model(tok, 1), torch.bfloat16, "cpu")
    assert ref.layers[0].attention.wqkv.weight.dtype == torch.bfloat16    # the memory saving is there
    _, responses, exp = bf16_rollout(tok, actor, ref, rm, critic)
    assert torch.equal(exp["logp_old"], exp["logp_ref"])
    assert exp["kl_seq"].abs().max().item() == 0.0
    # the frozen reward model scores exactly like the fp32 one under the same autocast
    with common.autocast(CPU, torch.bfloat16):
        raw = rm_fp32(exp["idx"], exp["attn"]).float()
    assert torch.equal(raw, exp["raw"])


def test_k3_min_is_taken_over_real_tokens_only(tok):
    actor, ref = tiny(tok), tiny(tok, seed=3)
    _, _, exp = bf16_rollout(tok, actor, ref, reward_model(tok, 1), reward_model(tok, 2))
    mask = exp["mask"].bool()
    assert not mask.all()                                        # some rows are padded after their stop token
    k3 = ppo.kl_estimates(exp["logp_old"], exp["logp_ref"], "k3")
    assert exp["k3_min"].item() == k3[mask].min().item() > 0      # padding's zeros are not a minimum
