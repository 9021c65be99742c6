"""Checkpoints: the model (safetensors), the run config, the tokenizer and the trainer state.

Layout of ``OUT_DIR/checkpoints/step_NNNNNN/``:
- ``model.safetensors``: base weights at full size, whatever the parallel layout (fast
  weights are transient and never saved; their config is in ``config.json`` so inference-time
  adaptation is reproducible);
- ``config.json``: the full run config, the resolved model config and token ids;
- ``tokenizer.json``;
- ``trainer_state.pt``: step, RNG state, each data-parallel rank's data loader state;
- ``optimizer/``: the optimizer state, one file per rank (or DeepSpeed's own files).

Every rank takes part (weights are gathered, each rank saves its optimizer shard); rank 0
writes into a staging directory that is renamed into place, and ``latest`` names the newest
complete checkpoint, so a crash while saving never leaves a broken "latest".
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

LATEST = "latest"


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def save_checkpoint(out_dir: Path, step: int, engine, topology, config: dict, tokenizer_file: Path,
                    trainer_state: dict, keep: int = 2) -> Path:
    root = Path(out_dir) / "checkpoints"
    final = root / f"step_{step:06d}"
    staging = root / f".staging_step_{step:06d}"
    full_state = engine.full_state()  # collective: every rank gathers
    if topology.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        (staging / "optimizer").mkdir(parents=True)
    _barrier()
    engine.save_optimizer(staging / "optimizer")
    if topology.is_main:
        save_file({k: v.contiguous() for k, v in full_state.items()}, str(staging / "model.safetensors"),
                  metadata={"format": "pt"})
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        shutil.copyfile(tokenizer_file, staging / "tokenizer.json")
        torch.save(trainer_state, staging / "trainer_state.pt")
    _barrier()
    if topology.is_main:
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        pointer = root / (LATEST + ".tmp")
        pointer.write_text(final.name + "\n")
        os.replace(pointer, root / LATEST)
        _prune(root, keep)
    _barrier()
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


@torch.no_grad()
def load_model_weights(model: torch.nn.Module, checkpoint: Path, tensor_parallel_size: int = 1,
                       tensor_parallel_rank: int = 0) -> None:
    """Full-size weights from ``checkpoint`` into this rank's part of the model (its layers, its
    tensor-parallel shard of each)."""
    tensors = load_file(str(Path(checkpoint) / "model.safetensors"))
    missing = []
    for name, param in model.named_parameters():
        if name not in tensors:
            missing.append(name)
            continue
        value = tensors[name]
        if getattr(param, "tensor_model_parallel", False) and tensor_parallel_size > 1:
            value = value.chunk(tensor_parallel_size, dim=param.partition_dim)[tensor_parallel_rank]
        if value.shape != param.shape:
            raise ValueError(
                f"checkpoint {checkpoint}: {name} has shape {tuple(value.shape)}, the model expects "
                f"{tuple(param.shape)}; was it saved with a different model config?"
            )
        param.copy_(value.to(param.dtype))
    if missing:
        raise ValueError(f"checkpoint {checkpoint} lacks {missing[:5]}; was it saved with a different model config?")


def load_trainer_state(checkpoint: Path) -> dict:
    return torch.load(Path(checkpoint) / "trainer_state.pt", map_location="cpu", weights_only=False)
