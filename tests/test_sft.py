"""sft.py: the assistant-only label mask, dynamic padding, length-grouped batches, the pretraining
mix, every shared SFT file through one loading path, DDP/FSDP against one process, exact resume,
and the lab world: SFT answers held-out questions better than the pretrained model it started from."""
import gzip
import json
import os
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common
import sft
from model import Llama, LlamaConfig
from tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]

CONV = [  # system + two exchanges, English then Chinese (byte-fallback characters included)
    {"role": "system", "content": "You are nanollama. Answer briefly."},
    {"role": "user", "content": "Where does Alice live?"},
    {"role": "assistant", "content": "Alice lives in Paris."},
    {"role": "user", "content": "她养了什么宠物？"},
    {"role": "assistant", "content": "她养了一只鹦鹉。"},
]


def tiny_model(tok, seed=0, **kw):
    torch.manual_seed(seed)
    return Llama(LlamaConfig.from_preset("tiny", vocab_size=tok.vocab_size, **kw))


# -----------------------------------------------------------------------------
# The label mask


def test_labels_are_exactly_the_assistant_tokens(tok):
    # The expected sequence and targets, built here from the template's definition (BOS, then
    # <|role|> content <|end|> per turn), not from render_conversation.
    marker = {r: tok.sp.piece_to_id(f"<|{r}|>") for r in ("system", "user", "assistant")}
    end = tok.sp.piece_to_id("<|end|>")
    ids, targets = [tok.bos_id], []  # targets: positions in ids that must be predicted
    for m in CONV:
        ids.append(marker[m["role"]])
        body = tok.encode(m["content"]) + [end]
        if m["role"] == "assistant":
            targets += range(len(ids), len(ids) + len(body))
        ids += body
    split = sft.Split(sft.tokenize([CONV], tok), [0], max_len=10_000)
    x, y = sft.collate([split.example(0)], tok.pad_id)
    assert x[0].tolist() == ids[:-1]
    want = [ids[t + 1] if t + 1 in targets else -100 for t in range(len(ids) - 1)]
    assert y[0].tolist() == want  # token by token: the shift, both turns, both <|end|>s, nothing else
    # read back: exactly the two answers with their end markers, and no system/user text
    trained = [ids[t + 1] for t in range(len(ids) - 1) if want[t] != -100]
    answers = [tok.encode(m["content"]) + [end] for m in CONV if m["role"] == "assistant"]
    assert trained == answers[0] + answers[1]
    assert (y[0] != -100).sum().item() == sum(len(a) for a in answers)


def test_turn_cut_keeps_whole_turns(tok):
    """Too long: keep the longest run of leading whole turns ending on an assistant turn, which
    must equal rendering that shorter conversation; nothing fits: 0 (dropped)."""
    ids, mask = tok.render_conversation(CONV)
    first, _ = tok.render_conversation(CONV[:3])
    for max_len in (len(first), len(first) + 3, len(ids) - 1):
        n = sft.turn_cut(mask, max_len)
        assert n == len(first) and ids[:n] == first
    assert sft.turn_cut(mask, len(ids)) == len(ids)
    assert sft.turn_cut(mask, len(first) - 1) == 0
    split = sft.Split(sft.tokenize([CONV, CONV[:3]], tok), [0, 1], max_len=len(first) - 1)
    assert (len(split), split.dropped, split.truncated) == (0, 2, 0)
    split = sft.Split(sft.tokenize([CONV, CONV[:3]], tok), [0, 1], max_len=len(first) + 1)
    assert (len(split), split.dropped, split.truncated) == (2, 0, 1)
    assert split.example(0)[0].tolist() == first


# -----------------------------------------------------------------------------
# Dynamic padding and batching


def summed_token_loss(model, x, y):
    logits, _ = model(x)
    return F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum")


@pytest.mark.parametrize("attn", ["sdpa", "manual"])
def test_dynamic_padding_equals_each_example_alone(tok, one_thread, attn):
    convs = [CONV, CONV[:3], [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]]
    data = sft.tokenize(convs, tok)
    model = tiny_model(tok, attn=attn).eval()
    x, y = sft.collate([data[i] for i in range(3)], tok.pad_id)
    assert x.shape[1] == max(data.lengths) - 1  # padded to the batch's longest, not the context
    with torch.no_grad():
        batched = summed_token_loss(model, x, y)
        alone = sum(summed_token_loss(model, *sft.collate([data[i]], tok.pad_id)) for i in range(3))
        _, mean_loss = model(x, y)  # the model's own loss: the mean over the same targets
    assert torch.allclose(batched, alone, rtol=1e-5, atol=1e-5), (batched, alone)
    assert torch.allclose(mean_loss * (y != -100).sum(), alone, rtol=1e-5)


def test_length_grouped_batches(tok):
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 300, size=1000)
    a = sft.length_grouped_batches(lengths, 16, seed=3, epoch=0, group_batches=32)
    assert a == sft.length_grouped_batches(lengths, 16, seed=3, epoch=0, group_batches=32)  # deterministic
    assert a != sft.length_grouped_batches(lengths, 16, seed=3, epoch=1, group_batches=32)  # reshuffled per epoch
    assert sorted(i for b in a for i in b) == list(range(1000))  # every example once per epoch
    assert sorted(len(b) for b in a) == [1000 % 16] + [16] * (1000 // 16)

    def padding(batches):
        return sum(len(b) * max(lengths[b]) - lengths[b].sum() for b in batches)
    plain = sft.length_grouped_batches(lengths, 16, seed=3, epoch=0, group_batches=0)
    assert sorted(i for b in plain for i in b) == list(range(1000))
    assert padding(a) < 0.2 * padding(plain)  # grouping removes most padding
    # ... yet batches still mix the whole length range over an epoch (no short-first curriculum)
    first_half = [max(lengths[b]) for b in a[:len(a) // 2]]
    assert min(first_half) < 60 and max(first_half) > 250


def test_pretrain_mix_ratio_and_batches(tok):
    class Args:
        batch_size, seed, group_batches, pretrain_ratio = 4, 0, 4, 0.25
    lengths = np.full(120, 10)
    split = type("S", (), {"lengths": lengths})()
    plan = sft.epoch_plan(split, Args, epoch=0)
    kinds = [k for k, _ in plan]
    assert kinds.count("sft") == 30 and kinds.count("pretrain") == 10  # 10 / 40 = the ratio
    assert plan == sft.epoch_plan(split, Args, epoch=0)
    tokens = np.arange(10_000) % 2000
    x, y = sft.materialize(("pretrain", 3), None, 0, tokens, Args, 0, seq_len=32)
    assert x.shape == y.shape == (4, 32) and torch.equal(x[:, 1:], y[:, :-1])  # loss on every token
    x2, _ = sft.materialize(("pretrain", 3), None, 0, tokens, Args, 0, seq_len=32)
    assert torch.equal(x, x2)  # a pure function of the position: resumable


# -----------------------------------------------------------------------------
# Every SFT file of the shared data through the same path


def count_lines(path):
    with gzip.open(path, "rb") as f:
        return sum(1 for line in f.read().split(b"\n") if line.strip())


def test_every_shared_sft_file_loads(shared_data, tok, tmp_path):
    files = sorted((shared_data / "sft").glob("*.jsonl*"))
    assert len(files) >= 7
    for path in files:
        data, _, report = sft.load_source([str(path)], tok, seed=0)
        n_lines = count_lines(path)  # counted here, independently of the reader
        assert len(data) + report.skipped == n_lines and len(data) > 0.9 * n_lines, (path, report.summary())
        split = sft.Split(data, np.arange(len(data)), max_len=257)
        assert len(split) + split.dropped == len(data)
        for k in range(0, len(split), max(1, len(split) // 50)):
            ids, mask = split.example(k)
            assert ids[0] == tok.bos_id and len(ids) <= 257 and mask.sum() > 0 and mask[-1] == 1
            assert ids[-1] == tok.end_id  # every example ends right after a whole assistant turn
    # the pre-tokenised path gives the same examples (oasst1: multi-turn, some truncated)
    from data.sft_prepare import sft_prepare
    path = str(shared_data / "sft" / "zh_oasst1_chat.jsonl.gz")
    sft_prepare([path], str(tmp_path / "mm"), tok.path, workers=1, verbose=False)
    mm, _, _ = sft.load_source([str(tmp_path / "mm")], tok, seed=0)
    mem, _, _ = sft.load_source([path], tok, seed=0)
    a, b = sft.Split(mm, np.arange(len(mm)), 257), sft.Split(mem, np.arange(len(mem)), 257)
    assert (len(a), a.truncated, a.dropped) == (len(b), b.truncated, b.dropped) and a.truncated > 0
    for k in range(len(a)):
        assert np.array_equal(a.example(k)[0], b.example(k)[0]) and np.array_equal(a.example(k)[1], b.example(k)[1])


# -----------------------------------------------------------------------------
# The training loop: DDP and FSDP against one process, exact resume


def lab_conversations(path, n=96):
    from data import lab
    from data.prepare import prepare
    recs = lab.generate(seed=1, pretrain_docs=40, sft_train=n, sft_val=16, prefs_train=4, prefs_val=4,
                        rank_train=4, rl_prompts=4, rl_eval=4)
    for name in ("sft_train", "sft_val", "pretrain"):
        with open(path / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in recs[name])
    prepare([str(path / "pretrain.jsonl")], str(path / "pt"), workers=1, val_fraction=0.1, verbose=False)


def sft_argv(tmp_path, init, out, *extra):
    return ["--init_from", str(init), "--data", str(tmp_path / "sft_train.jsonl"), "--val_data",
            str(tmp_path / "sft_val.jsonl"), "--out_dir", str(out), "--batch_size", "4", "--max_steps", "6",
            "--lr", "3e-3", "--warmup_steps", "2", "--eval_interval", "3", "--log_interval", "1",
            "--save_interval", "0", "--seed", "5", *extra]


@pytest.fixture
def tiny_init(tmp_path, tok):
    lab_conversations(tmp_path)
    common.save_checkpoint(str(tmp_path / "init"), "final", tiny_model(tok, max_seq_len=128), step=0, config={},
                           tokenizer=tok)
    return tmp_path / "init"


def _dist_worker(rank, world, store, runs, queue):
    import traceback
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        for argv in runs:
            sft.main(argv)
        queue.put((rank, None))
    except BaseException:  # report every rank's traceback: the first error may be the victim's
        queue.put((rank, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


def final_weights(out):
    model, _ = common.load_model(str(common.checkpoint_path(str(out), "final")))
    return model.state_dict()


def test_ddp_and_fsdp_match_one_process(tmp_path, tiny_init, one_thread):
    """2 ranks x 1 micro-batch (DDP, and FSDP) take the same steps as 1 process x 2 accumulated
    micro-batches: the epoch plan is split by rank, not re-drawn."""
    sft.main(sft_argv(tmp_path, tiny_init, tmp_path / "one", "--grad_accum", "2"))
    runs = [sft_argv(tmp_path, tiny_init, tmp_path / p, "--parallel", p) for p in ("ddp", "fsdp")]
    ctx = torch.multiprocessing.get_context("fork")
    queue = ctx.SimpleQueue()
    torch.multiprocessing.start_processes(_dist_worker, args=(2, str(tmp_path / "store"), runs, queue), nprocs=2,
                                          start_method="fork")
    errors = [err for _, err in (queue.get() for _ in range(2)) if err]
    assert not errors, "\n".join(errors)
    one = final_weights(tmp_path / "one")
    for p in ("ddp", "fsdp"):
        other = final_weights(tmp_path / p)
        diff = max((one[k] - other[k]).abs().max().item() for k in one)
        # another summation order (all-reduce of 2 ranks vs accumulating 2 micro-batches) moves a weight by
        # ~1e-5 after a few AdamW steps (1.4e-5 measured with the dummy-prefix tokenizer's data: Adam divides
        # tiny gradients by their tiny RMS; passes in ATen default/avx2/avx512, MKL AVX2, 1 and 2 threads);
        # a batch drawn differently moves weights by ~lr = 1e-3
        assert diff < 5e-5, (p, diff)
        logs = common.read_jsonl(str(tmp_path / p / "log.jsonl"))
        ref = common.read_jsonl(str(tmp_path / "one" / "log.jsonl"))
        assert [r["val_loss"] for r in logs if r.get("event") == "eval"] == pytest.approx(
            [r["val_loss"] for r in ref if r.get("event") == "eval"], abs=1e-5)


def test_huggingface_init_and_pretokenised_data(tmp_path, tiny_init, tok, one_thread):
    """--init_from a HuggingFace directory, and --data a data/sft_prepare.py directory, train exactly
    like our checkpoint and the JSONL file they were made from."""
    from data.sft_prepare import sft_prepare
    model, _ = common.load_model(str(tiny_init))
    model.save_hf(str(tmp_path / "hf"), bos_id=tok.bos_id, eos_id=tok.eos_id)
    tok.save_hf(str(tmp_path / "hf"))
    sft_prepare([str(tmp_path / "sft_train.jsonl")], str(tmp_path / "mm"), tok.path, workers=1, verbose=False)
    flags = ("--max_steps", "3", "--eval_interval", "0")
    sft.main(sft_argv(tmp_path, tiny_init, tmp_path / "ours", *flags))
    sft.main(sft_argv(tmp_path, tmp_path / "hf", tmp_path / "from_hf", *flags))
    argv = sft_argv(tmp_path, tiny_init, tmp_path / "from_mm", *flags)
    argv[argv.index("--data") + 1] = str(tmp_path / "mm")
    sft.main(argv)
    a = final_weights(tmp_path / "ours")
    for other in ("from_hf", "from_mm"):
        b = final_weights(tmp_path / other)
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6, other


def test_exact_resume_and_epoch_token_counts(tmp_path, tiny_init, one_thread):
    """With a pretraining mix: resume is bit-exact, and each epoch logs exactly the assistant tokens
    it trained on and the tokens it saw."""
    flags = ("--max_steps", "0", "--epochs", "2", "--save_interval", "5", "--keep_last", "0", "--eval_interval", "20",
             "--log_interval", "100", "--pretrain_data", str(tmp_path / "pt"), "--pretrain_ratio", "0.2")
    sft.main(sft_argv(tmp_path, tiny_init, tmp_path / "a", *flags))
    spe = json.load(open(tmp_path / "a" / "config.json"))["steps_per_epoch"]
    # resume from the step-10 checkpoint into a fresh directory: the same final weights, bit for bit
    os.makedirs(tmp_path / "b")
    os.link(tmp_path / "a" / "step_0000010.pt", tmp_path / "b" / "step_0000010.pt")
    sft.main(sft_argv(tmp_path, tiny_init, tmp_path / "b", *flags, "--resume"))
    a, b = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # per-epoch accounting: every assistant target of the train set, once per epoch (the last
    # partial batch of an epoch is dropped, so count what the plan actually contains)
    tok = Tokenizer()
    train = sft.Split(sft.load_source([str(tmp_path / "sft_train.jsonl")], tok, 5)[0], np.arange(96), 129)

    class Args:
        batch_size, seed, group_batches, pretrain_ratio = 4, 5, 32, 0.2
    for log_dir in ("a", "b"):
        epochs = [r for r in common.read_jsonl(str(tmp_path / log_dir / "log.jsonl")) if r.get("event") == "epoch"]
        assert [r["epoch"] for r in epochs] == [1, 2]  # b resumed inside epoch 1: its counts came back too
        for r in epochs:
            plan = sft.epoch_plan(train, Args, r["epoch"] - 1)[:spe]
            examples = [k for kind, b in plan if kind == "sft" for k in b]
            n_pt = sum(kind == "pretrain" for kind, _ in plan)
            assert n_pt == round(spe * 0.2) or abs(n_pt - spe * 0.2) <= 3
            assert r["assistant_tokens"] == sum(int(train.example(k)[1][1:].sum()) for k in examples)
            assert r["sft_tokens"] == sum(int(train.lengths[k]) - 1 for k in examples)
            assert r["pretrain_tokens"] == n_pt * 4 * 128
            assert r["tokens_seen"] == r["sft_tokens"] + r["pretrain_tokens"]


# -----------------------------------------------------------------------------
# The lab world: SFT answers held-out questions better than the model it started from


def test_sft_beats_its_pretrained_start_on_lab_questions(tmp_path, one_thread):
    """A small lab world (20 people; eval questions are about 3 people SFT never mentions, plus
    held-out arithmetic, identity and refusal phrasings), a 1.0M-parameter model pretrained for
    300 steps by pretrain.py, then ~4 epochs of sft.py. Graded by data.lab.check on eval_qa.jsonl +
    rl_eval.jsonl (318 held-out prompts). Reference run (seed 0, one CPU thread, torch 2.13): base 0.9%,
    SFT 10.4% (identity 0% -> 75%, refusal 0% -> 25%, facts about unseen people 3% -> 15%, follow-ups
    0% -> 10%, arithmetic 0% -> 4%), held-out answer loss 4.32 -> 1.07 nats (two threads: SFT 9.1%).
    Asserted with room for platform noise (a shorter pretraining, 220 steps, measured SFT 3.4%:
    identity 75%, but no fact yet): base <= 4%, SFT >= base + 3 points, SFT answers at least 2 of
    the 8 held-out identity questions (base: 0), and the held-out answer loss falls by >= 1 nat."""
    import chat
    import pretrain
    from data import lab
    from data.prepare import prepare
    lab.write(str(tmp_path / "lab"), seed=0, people=20, rl_people=3, eval_people=3, eval_followups=40, pretrain_docs=4000,
              qa_frac=0.25, sft_train=1500, sft_val=100)
    prepare([str(tmp_path / "lab" / "pretrain.jsonl")], str(tmp_path / "pt"), workers=1, verbose=False)
    pretrain.main(["--data", str(tmp_path / "pt"), "--model", "lab", "--dim", "128", "--n_heads", "4",
                   "--n_kv_heads", "2", "--seq_len", "64", "--batch_size", "32", "--max_steps", "300", "--lr", "3e-3",
                   "--min_lr", "3e-4", "--warmup_steps", "20", "--eval_interval", "0", "--eval_steps", "2",
                   "--log_interval", "100", "--save_interval", "0", "--out_dir", str(tmp_path / "base")])
    sft.main(["--init_from", str(tmp_path / "base"), "--data", str(tmp_path / "lab" / "sft_train.jsonl"),
              "--val_data", str(tmp_path / "lab" / "sft_val.jsonl"), "--out_dir", str(tmp_path / "sft"),
              "--epochs", "4", "--batch_size", "32", "--lr", "1e-3", "--min_lr", "1e-4", "--warmup_steps", "10",
              "--eval_interval", "1000", "--log_interval", "50", "--save_interval", "0"])
    records = chat.read_records(str(tmp_path / "lab" / "eval_qa.jsonl")) + \
        chat.read_records(str(tmp_path / "lab" / "rl_eval.jsonl"))
    acc, by_kind = {}, {}
    for name in ("base", "sft"):
        model, tok = chat.load_chat_model(str(tmp_path / name), "cpu")
        res = chat.evaluate_lab(model, tok, records, max_new_tokens=32, batch_size=64)
        acc[name], by_kind[name] = res["accuracy"], res["by_kind"]
        print(f"{name}: lab accuracy {res['accuracy']:.1%} of {res['n']}; by kind "
              + ", ".join(f"{k} {v:.0%}" for k, v in res["by_kind"].items()))
    evals = [r["val_loss"] for r in common.read_jsonl(str(tmp_path / "sft" / "log.jsonl")) if r.get("event") == "eval"]
    print(f"held-out answer loss {evals[0]:.3f} -> {evals[-1]:.3f}")
    assert acc["base"] <= 0.04
    assert acc["sft"] >= acc["base"] + 0.03
    assert by_kind["sft"]["identity"] >= 0.25 > by_kind["base"]["identity"]
    assert evals[-1] <= evals[0] - 1.0


def test_bad_input_clear_errors_nothing_written(tmp_path, tiny_init, capsys, one_thread, other_tok_path):
    # malformed and invalid records are skipped and reported with file:line; training goes on
    lines = (tmp_path / "sft_train.jsonl").read_text(encoding="utf-8").splitlines()
    bad = lines[:40] + ["{not json", json.dumps({"messages": [{"role": "assistant", "content": "no user turn"}]})]
    (tmp_path / "bad.jsonl").write_text("\n".join(bad) + "\n", encoding="utf-8")
    argv = sft_argv(tmp_path, tiny_init, tmp_path / "ok", "--max_steps", "1", "--eval_interval", "0")
    argv[argv.index("--data") + 1] = str(tmp_path / "bad.jsonl")
    sft.main(argv)
    out = capsys.readouterr().out
    assert "bad.jsonl:41" in out and "bad.jsonl:42" in out and "40 examples" in out
    # a missing file: one clear message, and the run dir is not even created
    argv = sft_argv(tmp_path, tiny_init, tmp_path / "run", "--max_steps", "1")
    argv[argv.index("--data") + 1] = str(tmp_path / "missing.jsonl")
    with pytest.raises(SystemExit, match="missing.jsonl"):
        sft.main(argv)
    assert not (tmp_path / "run").exists()
    # another tokenizer than the checkpoint's: refused, naming both files, before anything is written
    argv = sft_argv(tmp_path, tiny_init, tmp_path / "run", "--max_steps", "1", "--tokenizer", other_tok_path)
    with pytest.raises(SystemExit, match=r"tokenizer: .*init.*was trained with tokenizer .*lab\.model.* but .*t\.model"):
        sft.main(argv)
    assert not (tmp_path / "run").exists()
    # an earlier run is never overwritten without --resume
    with pytest.raises(SystemExit, match="--resume"):
        sft.main(sft_argv(tmp_path, tiny_init, tmp_path / "ok", "--max_steps", "1"))
