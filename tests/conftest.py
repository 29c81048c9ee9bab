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


@pytest.fixture
def one_thread():
    """Single-threaded torch for one test: exact comparisons with subprocess runs (which get
    OMP_NUM_THREADS=1), and no thread oversubscription on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
