"""Fixtures shared by every test module: a one-process topology and the small prepared corpus (one per test
session and shape). Helpers shared by test modules live in ``tests/helpers`` (no test imports another)."""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import torch  # noqa: E402

from tests.helpers import tiny_options  # noqa: E402


@pytest.fixture
def topology():
    """A world-size-1 process group with megatron-core parallel state (made once, re-made if a test
    that runs a whole CLI in-process has shut it down)."""
    from parallel.topology import initialize_topology

    return initialize_topology("cpu")


@pytest.fixture(scope="session")
def prepared_corpus(tmp_path_factory):
    """``prepared_corpus(seq_len=32, vocab_size=512)``: the small prepared dataset of that shape (see
    ``tests.helpers.data.prepare_small_corpus``), made once per test session."""
    from tests.helpers.data import prepare_small_corpus

    made = {}

    def get(seq_len: int = 32, vocab_size: int = 512) -> Path:
        key = (seq_len, vocab_size)
        if key not in made:
            made[key] = prepare_small_corpus(tmp_path_factory.mktemp(f"corpus_{seq_len}_{vocab_size}") / "data",
                                             seq_len, vocab_size)
        return made[key]

    return get


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The small raw test corpus (``tests.helpers.data.write_corpus``), written once per module."""
    from tests.helpers.data import write_corpus

    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture
def tiny(prepared_corpus):
    """``tiny(changes)``: the tiny run's options on the small prepared corpus (``tests.helpers.TINY``)."""
    def options(changes: dict | None = None) -> list[str]:
        return [*tiny_options(changes), "--data.path", str(prepared_corpus())]

    return options


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (benchmarks/gpu_check.sh runs these on a GPU)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
