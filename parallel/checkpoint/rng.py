"""Every random generator of a process (Python, NumPy, torch CPU and CUDA) as tensors and plain numbers,
so a checkpoint's RNG file loads with ``torch.load(..., weights_only=True)``: nothing in it is unpickled
into an arbitrary object."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch


def rng_states() -> dict:
    version, python_state, gauss = random.getstate()
    name, keys, position, has_gauss, cached = np.random.get_state()
    states = {
        "python": {"version": version, "state": torch.tensor(python_state, dtype=torch.int64), "gauss": gauss},
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    python = states["python"]
    random.setstate((python["version"], tuple(python["state"].tolist()), python["gauss"]))
    numpy = states["numpy"]
    np.random.set_state((numpy["name"], numpy["keys"].numpy().astype(np.uint32), numpy["position"],
                         numpy["has_gauss"], numpy["cached_gaussian"]))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_rng_states(path: Path) -> None:
    torch.save(rng_states(), path)


def load_rng_states(path: Path) -> None:
    """Restore the generators from ``path`` (tensors and plain values only: ``weights_only=True``)."""
    set_rng_states(torch.load(path, map_location="cpu", weights_only=True))
