"""Shared pytest setup: make the repo root importable, locate ../shared/data, and the fixtures
several test files use (the shipped tokenizer, single-threaded torch)."""
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared test data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tok():
    """The shipped tokenizer/lab.model (read-only, so one instance serves every test)."""
    from tokenizer import Tokenizer
    return Tokenizer()


@pytest.fixture(scope="session")
def other_tok_path(tmp_path_factory):
    """A tiny sentencepiece model that is not the shipped one (another sha256, vocabulary ~60): what a
    stage must refuse for a checkpoint trained with the shipped tokenizer."""
    import sentencepiece as spm
    d = tmp_path_factory.mktemp("other_tok")
    text = [f"the quick brown fox jumps over the lazy dog {i}" for i in range(200)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_prefix=str(d / "t"), vocab_size=64,
                                   hard_vocab_limit=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    return str(d / "t.model")


@pytest.fixture
def one_thread():
    """Single-threaded torch for one test: exact comparisons with subprocess runs (which get
    OMP_NUM_THREADS=1), and no thread oversubscription on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# Tests whose assertions rest on a training trajectory (accuracy, KL or reward after training, golden
# values): another CPU's float summation order moves them, so each asserts a direction or a threshold
# measured over the perturbation matrix (tests/perturb.py). `python tests/perturb.py suite -m trajectory`
# runs just these in every cell; every other test compares numbers with a reference to float precision.
TRAJECTORY_FILES = {"test_lab_pipeline.py"}
TRAJECTORY_TESTS = {
    "test_lab_ppo_beats_sft", "test_without_kl_penalty_the_actor_hacks_the_reward_model_and_the_alarm_fires",
    "test_lab_dpo_beats_sft", "test_rounds_sample_rank_and_train", "test_sft_beats_its_pretrained_start_on_lab_questions",
    "test_tiny_model_learns_repeated_data", "test_lab_reward_model_accuracy", "test_lab_stats_checkpoints_and_scoring",
    "test_fine_tuned_model_learned_the_conversations",
    "test_lora_ppo_holds_one_backbone_starts_at_kl_zero_and_raises_the_reward",
}


def pytest_configure(config):
    config.addinivalue_line("markers", "trajectory: asserts on a training trajectory (see tests/perturb.py)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in TRAJECTORY_FILES or item.originalname in TRAJECTORY_TESTS:
            item.add_marker(pytest.mark.trajectory)
