"""Checkpoints: the model (safetensors), the run config, the tokenizer and the trainer state.

Layout of ``OUT_DIR/checkpoints/step_NNNNNN/``:
- ``model.safetensors``: base weights only (fast weights are transient and never saved;
  their config is in ``config.json`` so inference-time adaptation is reproducible);
- ``config.json``: the full run config, the resolved model config and token ids;
- ``tokenizer.json``;
- ``trainer_state.pt``: optimizer state, step, RNG states (what resuming needs).

A checkpoint is written to a temporary directory and renamed into place, and ``latest``
names the newest complete one, so a crash while saving never leaves a broken "latest".
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

LATEST = "latest"


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def save_checkpoint(
    out_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    config: dict,
    tokenizer_file: Path,
    trainer_state: dict,
    keep: int = 2,
) -> Path:
    root = Path(out_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    staging = root / f".staging_step_{step:06d}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    save_file(model_tensors(model), str(staging / "model.safetensors"), metadata={"format": "pt"})
    (staging / "config.json").write_text(json.dumps(config, indent=2))
    shutil.copyfile(tokenizer_file, staging / "tokenizer.json")
    torch.save({"optimizer": optimizer.state_dict(), **trainer_state}, staging / "trainer_state.pt")
    shutil.rmtree(final, ignore_errors=True)
    staging.rename(final)
    pointer = root / (LATEST + ".tmp")
    pointer.write_text(final.name + "\n")
    os.replace(pointer, root / LATEST)
    _prune(root, keep)
    return final


def _prune(root: Path, keep: int) -> None:
    steps = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in steps[: max(0, len(steps) - keep)]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(out_dir: Path) -> Path | None:
    pointer = Path(out_dir) / "checkpoints" / LATEST
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if (path / "trainer_state.pt").is_file() else None


def load_model_weights(model: torch.nn.Module, checkpoint: Path) -> None:
    tensors = load_file(str(Path(checkpoint) / "model.safetensors"))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {checkpoint} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}; "
            "was it saved with a different model config?"
        )


def load_trainer_state(checkpoint: Path) -> dict:
    return torch.load(Path(checkpoint) / "trainer_state.pt", map_location="cpu", weights_only=False)
