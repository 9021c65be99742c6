"""The training state as torch.distributed.checkpoint (DCP) sees it: one entry per parameter under its
logical name, whatever the engine or the layout.

Per parameter (names carry global layer indices, so they do not depend on the pipeline stage):

- ``model.<name>``: the weight (the fp32 master when the engine keeps one apart from the module);
- ``optimizer.<name>.exp_avg``, ``...exp_avg_sq``: AdamW's moments, shaped like the weight;
- ``optimizer.<name>.step``: AdamW's step count (a 0-d tensor).

(DCP flattens the nested dict with dots: ``{"model": {name: t}}`` is stored as ``model.<name>``.)

A tensor split over tensor-parallel ranks is a ``DTensor`` over the stage's (data, tensor) mesh with
``[Replicate(), Shard(partition dim)]`` and its logical (unsplit) shape; a replicated one has
``[Replicate(), Replicate()]``; routed experts split over expert-parallel ranks are over the (expert data,
expert, tensor) mesh with ``[Replicate(), Shard(0), Shard(partition dim)]``. DCP writes every piece once
(replicas are deduplicated) and, on load, hands each rank the slice its layout needs, which is what makes a
checkpoint resume at any tensor, pipeline, data, expert or ZeRO layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard


@dataclass
class ParameterState:
    """One parameter's part on this rank (its tensor-parallel shard, whole over data-parallel ranks)."""

    weight: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    step: torch.Tensor  # 0-d float32


def partition_dim(param: torch.nn.Parameter) -> int | None:
    """The dimension tensor parallelism splits (megatron's attribute), or None for a replicated tensor."""
    return param.partition_dim if getattr(param, "tensor_model_parallel", False) else None


def to_distributed(local: torch.Tensor, dim: int | None, mesh) -> DTensor:
    """This rank's shard as a DTensor over ``mesh`` = (data, tensor), or for a tensor split over experts
    along dim 0, ``mesh`` = (expert data, expert, tensor)."""
    tensor_size = mesh.size(mesh.ndim - 1)
    placements = [Replicate(), Shard(dim) if dim is not None and tensor_size > 1 else Replicate()]
    shape = list(local.shape)
    if dim is not None:
        shape[dim] *= tensor_size
    if mesh.ndim == 3:
        placements.insert(1, Shard(0))
        shape[0] *= mesh.size(1)
    logical = torch.Size(shape)
    return DTensor.from_local(local, mesh, placements, run_check=False, shape=logical,
                              stride=torch.empty(logical, device="meta").stride())


def checkpoint_dict(states: dict[str, ParameterState], dims: dict[str, int | None], mesh,
                    expert_mesh=None, experts: frozenset = frozenset()) -> dict:
    """The DCP state dict of ``states`` (tensors are shared, not copied: a load fills them in place); the
    tensors named in ``experts`` are split over ``expert_mesh``'s expert dimension too."""
    model, optimizer = {}, {}
    for name, state in states.items():
        dim, where = dims[name], expert_mesh if name in experts else mesh
        model[name] = to_distributed(state.weight, dim, where)
        optimizer[name] = {"exp_avg": to_distributed(state.exp_avg, dim, where),
                           "exp_avg_sq": to_distributed(state.exp_avg_sq, dim, where),
                           "step": state.step}
    return {"model": model, "optimizer": optimizer}


def all_finite(states: dict[str, ParameterState]) -> bool:
    """Whether every weight and moment on this rank is finite (nothing non-finite is ever saved)."""
    return all(bool(torch.isfinite(t).all()) for s in states.values() for t in (s.weight, s.exp_avg, s.exp_avg_sq))
