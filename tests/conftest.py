import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import torch  # noqa: E402


@pytest.fixture
def topology():
    """A world-size-1 process group with megatron-core parallel state (made once, re-made if a test
    that runs a whole CLI in-process has shut it down)."""
    from parallel.topology import initialize_topology

    return initialize_topology("cpu")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (benchmarks/gpu_check.sh runs these on a GPU)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
