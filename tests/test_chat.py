"""chat.py: one-shot and batch answers equal model.generate's greedy output, the interactive chat
driven through a pseudo-terminal (a turn, a follow-up that needs the history, /reset, /exit, a
streamed Chinese answer with byte-fallback characters), history truncation by whole turns, the lab
evaluation and win rates against closed forms."""
import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import chat
import common
import sft
from data import lab
from model import Llama, LlamaConfig
from tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]

# A tiny model fine-tuned (by sft.py) to overfit three conversations, so the chat has something
# checkable to say: the answer to "What number?" depends on whether the history holds the number.
REMEMBER = "Remember the number 7."
ASK = "What number?"
PET = "她养了什么宠物？"
CONVS = [
    [{"role": "user", "content": REMEMBER}, {"role": "assistant", "content": "OK."},
     {"role": "user", "content": ASK}, {"role": "assistant", "content": "The number is 7."}],
    [{"role": "user", "content": ASK}, {"role": "assistant", "content": "You gave me no number."}],
    [{"role": "user", "content": PET}, {"role": "assistant", "content": "她养了一只鹦鹉龘。"}],  # 龘: 3 byte tokens
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("chat")
    tok = Tokenizer()
    torch.manual_seed(0)
    model = Llama(LlamaConfig.from_preset("tiny", vocab_size=tok.vocab_size, max_seq_len=96))
    os.makedirs(d / "init")
    common.save_checkpoint(str(d / "init"), "final", model, step=0, config={}, tokenizer=tok)
    with open(d / "convs.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"messages": c}, ensure_ascii=False) + "\n" for c in CONVS)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sft.main(["--init_from", str(d / "init"), "--data", f"{d / 'convs.jsonl'}:8", "--val_frac", "0",
                  "--out_dir", str(d / "sft"), "--batch_size", "3", "--max_steps", "120", "--lr", "1e-2",
                  "--min_lr", "1e-3", "--warmup_steps", "5", "--log_interval", "1000", "--save_interval", "0"])
    finally:
        torch.set_num_threads(threads)
    return d / "sft"


@pytest.fixture(scope="module")
def loaded(run_dir):
    return chat.load_chat_model(str(run_dir), "cpu")


def run_chat(*args, timeout=60):
    return subprocess.run([sys.executable, "chat.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


def greedy(model, tok, messages, max_new_tokens=24):
    """The reference: render the prompt, model.generate greedily, cut at the stop token, decode."""
    ids = model.generate([tok.render_prompt(messages)], max_new_tokens, temperature=0, eos_id=tok.stop_ids)[0]
    return tok.decode(ids[:-1] if ids and ids[-1] in tok.stop_ids else ids)


def test_fine_tuned_model_learned_the_conversations(loaded):
    model, tok = loaded
    u = lambda s: {"role": "user", "content": s}  # noqa: E731
    a = lambda s: {"role": "assistant", "content": s}  # noqa: E731
    assert greedy(model, tok, [u(REMEMBER)]) == "OK."
    assert greedy(model, tok, [u(REMEMBER), a("OK."), u(ASK)]) == "The number is 7."
    assert greedy(model, tok, [u(ASK)]) == "You gave me no number."
    assert greedy(model, tok, [u(PET)]) == "她养了一只鹦鹉龘。"


def test_one_shot_and_prompts_file_equal_generate(run_dir, loaded, tmp_path):
    model, tok = loaded
    out = run_chat("--model", str(run_dir), "--prompt", REMEMBER, "--max_new_tokens", "24")
    assert out.returncode == 0, out.stderr
    assert out.stdout == greedy(model, tok, [{"role": "user", "content": REMEMBER}]) + "\n"
    # batch answering (prompts of different lengths share a left-padded batch) == one by one
    prompts = [REMEMBER, ASK, PET, "Who are you?"]
    (tmp_path / "p.txt").write_text("\n".join(prompts[:2]) + "\n\n" + "\n".join(prompts[2:]) + "\n", encoding="utf-8")
    out = run_chat("--model", str(run_dir), "--prompts_file", str(tmp_path / "p.txt"), "--max_new_tokens", "24")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == prompts
    assert [r["answer"] for r in rows] == [greedy(model, tok, [{"role": "user", "content": p}]) for p in prompts]
    assert chat.generate_answers(model, tok, prompts, max_new_tokens=24, batch_size=3) == [r["answer"] for r in rows]


def read_until(fd, marker, timeout=60):
    buf, end = b"", time.time() + timeout
    while marker not in buf:
        left = end - time.time()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise AssertionError(f"timed out waiting for {marker!r}; got {buf.decode(errors='replace')!r}")
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the child closed the terminal
            chunk = b""
        if not chunk:
            raise AssertionError(f"chat ended before {marker!r}; got {buf.decode(errors='replace')!r}")
        buf += chunk
    return buf.decode("utf-8").replace("\r\n", "\n")


def test_interactive_chat_through_a_pty(run_dir, loaded):
    model, tok = loaded
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "chat.py", "--model", str(run_dir), "--max_new_tokens", "24"], cwd=REPO,
                            stdin=slave, stdout=slave, stderr=slave, close_fds=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    os.close(slave)
    history = []

    def say(line):
        os.write(master, line.encode() + b"\n")
        text = read_until(master, b">>> ")
        answer = text.split(line + "\n", 1)[1].rsplit(">>> ", 1)[0]  # after the echo, before the next prompt
        if not line.startswith("/"):  # the reference: greedy generation on the same history
            history.append({"role": "user", "content": line})
            expected = greedy(model, tok, history)
            history.append({"role": "assistant", "content": expected})
            assert answer == expected + "\n"
        return answer

    try:
        read_until(master, b">>> ")
        assert say(PET) == "她养了一只鹦鹉龘。\n"  # streamed token by token (龘 is 3 byte tokens), printed whole
        assert say("/reset") == "(conversation reset)\n"
        history.clear()
        assert say(REMEMBER) == "OK.\n"
        assert say(ASK) == "The number is 7.\n"  # the follow-up sees the history
        assert say("/reset") == "(conversation reset)\n"
        history.clear()
        assert say(ASK) == "You gave me no number.\n"  # ... and after /reset it is gone
        os.write(master, b"/exit\n")
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)


def test_history_is_truncated_by_whole_turns(loaded):
    _, tok = loaded
    sys_msg = {"role": "system", "content": "Be brief."}
    turns = []
    for i in range(6):
        turns += [{"role": "user", "content": f"question number {i}"}, {"role": "assistant", "content": f"answer {i}"}]
    history = [sys_msg] + turns + [{"role": "user", "content": "last question"}]
    keep_two = tok.render_prompt([sys_msg] + turns[-4:] + [history[-1]])
    ids, dropped = chat.fit_history(tok, list(history), len(keep_two))
    assert (ids, dropped) == (keep_two, 4)  # the 4 oldest exchanges go, the system prompt stays
    ids, dropped = chat.fit_history(tok, list(history), 10_000)
    assert dropped == 0 and ids == tok.render_prompt(history)
    with pytest.raises(ValueError):
        chat.fit_history(tok, [sys_msg, history[-1]], 5)


def test_eval_mode_and_lab_scores(run_dir, loaded, tmp_path):
    model, tok = loaded
    records = [r for r in lab.generate(seed=0, pretrain_docs=10, sft_train=10, sft_val=10, prefs_train=10,
                                       prefs_val=8, rank_train=4, rl_prompts=10, rl_eval=10)["eval_qa"]]
    records = [r for r in records if r["kind"] in ("fact", "identity")][:6] + \
        [r for r in records if r["kind"] == "identity"][:2]
    # the checker on known answers: references are right, another record's reference is wrong
    res = chat.evaluate_lab(None, tok, records, answers=[r["reference"] for r in records])
    assert res["accuracy"] == 1.0 and res["n"] == 8
    res = chat.evaluate_lab(None, tok, records, answers=["I don't know."] * 8)
    assert res["accuracy"] == 0.0 and set(res["by_kind"]) == {"fact", "identity"}
    # --eval prints what evaluate_lab computes on the model
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records) + "not json\n", encoding="utf-8")
    out = run_chat("--model", str(run_dir), "--eval", str(path), "--max_new_tokens", "24",
                   "--eval_out", str(tmp_path / "graded.jsonl"))
    assert out.returncode == 0, out.stderr
    assert "not JSON" in out.stderr or "malformed" in out.stderr  # the bad line is reported, not fatal
    ref = chat.evaluate_lab(model, tok, records, max_new_tokens=24)
    assert f"lab accuracy: {ref['accuracy']:.1%} of 8" in out.stdout
    graded = [json.loads(line) for line in (tmp_path / "graded.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [g["answer"] for g in graded] == [r["answer"] for r in ref["records"]]


def test_win_rate_and_head_to_head():
    assert chat.win_rate([1, 0, 0.5, 2], [0, 0, 0.5, 3]) == {"win_rate": (1 + 0.5 + 0.5) / 4, "wins": 1, "ties": 2,
                                                             "losses": 1, "n": 4}
    truth = {"type": "arith", "lang": "en", "op": "+", "operands": ["3", "4"], "answer": "7", "max_chars": 150}
    recs = [{"messages": [{"role": "user", "content": "What is 3 + 4?"}], "truth": truth}] * 3
    a, b = ["3 + 4 = 7.", "3 + 4 = 7.", "3 + 4 = 8."], ["3 + 4 = 7.", "3 + 4 = 9.", "3 + 4 = 7."]
    length = lambda convs, answers: [-len(x) for x in answers]  # noqa: E731  (a reward that prefers short)
    res = chat.head_to_head(a, b, recs, reward_fn=length)
    assert res["checker"]["win_rate"] == pytest.approx((0.5 + 1 + 0) / 3)
    assert res["checker"]["accuracy_a"] == pytest.approx(2 / 3) and res["checker"]["accuracy_b"] == pytest.approx(2 / 3)
    assert res["reward"]["win_rate"] == 0.5 and res["reward"]["ties"] == 3
    # the same answer ties even when its two scores differ in the last digits (scored in other batches,
    # other float order); different answers are still compared exactly, however close their scores
    calls = []

    def noisy(convs, answers, ended=None):   # the second call's scores are off by 1e-6
        calls.append(ended)
        return [-len(x) + 1e-6 * (len(calls) - 1) for x in answers]
    a, b = ["3 + 4 = 7.", "3 + 4 = 7.", "3 + 4 = 7"], ["3 + 4 = 7.", "3 + 4 = 7.", "3 + 4 = 7."]
    res = chat.head_to_head(a, b, recs, reward_fn=noisy)["reward"]
    assert (res["wins"], res["ties"], res["losses"]) == (1, 2, 0)
    # ... unless one of the two was cut at the length limit (it was then scored with the missing-end penalty)
    res = chat.head_to_head(a, b, recs, reward_fn=noisy, ended_a=[True, False, True], ended_b=[True] * 3)["reward"]
    assert (res["wins"], res["ties"], res["losses"]) == (1, 1, 1) and calls[-2:] == [[True, False, True], [True] * 3]


def test_huggingface_dir_answers_the_same(loaded, tmp_path):
    """An HF directory written by model.save_hf + Tokenizer.save_hf chats exactly like our checkpoint."""
    model, tok = loaded
    model.save_hf(str(tmp_path / "hf"), bos_id=tok.bos_id, eos_id=tok.eos_id)
    tok.save_hf(str(tmp_path / "hf"))
    hf_model, hf_tok = chat.load_chat_model(str(tmp_path / "hf"), "cpu")
    assert hf_tok.sha256 == tok.sha256
    prompts = [REMEMBER, ASK, PET]
    assert chat.generate_answers(hf_model, hf_tok, prompts, 24) == chat.generate_answers(model, tok, prompts, 24)
