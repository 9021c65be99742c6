"""Process groups: torch.distributed plus megatron-core ``parallel_state`` (TP x SP x DP x PP).

A single process still gets a (world size 1) process group, so the megatron-core layers and
every collective run the same code at one rank as at many. Under torchrun the environment
variables (RANK, WORLD_SIZE, MASTER_ADDR, ...) are used; alone, a file store in a temporary
directory avoids picking a TCP port. Rank order is megatron's default (tensor parallel
fastest, then sequence parallel, then data parallel, then pipeline). The sequence-parallel
dimension is megatron's context-parallel one (its groups; the attention that uses it is
Ulysses' all-to-all, ``parallel.sequence``): its ranks hold the same weights and each a part of
every sequence, so their gradients are reduced with the data-parallel ones.
"""

from __future__ import annotations

import functools
import os
import tempfile
from dataclasses import dataclass

import torch
import torch.distributed as dist

from parallel.layout import LayoutError, check_world
from parallel.megatron import parallel_state


@dataclass
class Topology:
    rank: int
    world_size: int
    local_rank: int
    tensor_parallel_size: int
    pipeline_parallel_size: int
    data_parallel_size: int
    device: torch.device
    sequence_parallel_size: int = 1
    expert_parallel_size: int = 1  # ranks that split the routed experts, out of the data x sequence ranks

    @property
    def expert_parallel_group(self):
        return parallel_state.get_expert_model_parallel_group()

    @property
    def expert_data_parallel_group(self):
        """The ranks that hold the same experts (data x sequence / expert): expert gradients are summed there."""
        return parallel_state.get_expert_data_parallel_group()

    @property
    def tensor_parallel_group(self):
        return parallel_state.get_tensor_model_parallel_group()

    @property
    def tensor_parallel_rank(self) -> int:
        return parallel_state.get_tensor_model_parallel_rank()

    @property
    def pipeline_parallel_group(self):
        return parallel_state.get_pipeline_model_parallel_group()

    @property
    def pipeline_parallel_rank(self) -> int:
        return parallel_state.get_pipeline_model_parallel_rank()

    @property
    def sequence_parallel_group(self):
        return parallel_state.get_context_parallel_group()

    @property
    def sequence_parallel_rank(self) -> int:
        return parallel_state.get_context_parallel_rank()

    @property
    def data_parallel_group(self):
        """The replicas that read different samples (sequence-parallel ranks share their samples)."""
        return parallel_state.get_data_parallel_group()

    @property
    def gradient_group(self):
        """The ranks whose gradients are reduced together: data x sequence parallel (every rank that holds the
        same weights and computed a part of the global batch's loss)."""
        return parallel_state.get_data_parallel_group(with_context_parallel=True)

    @property
    def gradient_group_size(self) -> int:
        return self.data_parallel_size * self.sequence_parallel_size

    @property
    def data_parallel_rank(self) -> int:
        return parallel_state.get_data_parallel_rank()

    @property
    def model_parallel_group(self):
        """The ranks that hold one replica of the model (TP x PP)."""
        return parallel_state.get_model_parallel_group()

    @property
    def reads_data(self) -> bool:
        """Only the first tensor- and sequence-parallel rank of the first stage reads; it broadcasts to the rest
        of its replica."""
        return self.tensor_parallel_rank == 0 and self.pipeline_parallel_rank == 0 and self.sequence_parallel_rank == 0

    @property
    def replica_size(self) -> int:
        """Ranks that share one data stream: tensor x sequence x pipeline."""
        return self.tensor_parallel_size * self.sequence_parallel_size * self.pipeline_parallel_size

    @property
    def data_source_rank(self) -> int:
        """Global rank that reads this replica's data (tensor and sequence rank 0 of stage 0, same data rank)."""
        return self.data_parallel_rank * self.tensor_parallel_size * self.sequence_parallel_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def layout(self) -> dict:
        return {"world_size": self.world_size, "tensor": self.tensor_parallel_size,
                "pipeline": self.pipeline_parallel_size, "data": self.data_parallel_size,
                "sequence": self.sequence_parallel_size, "expert": self.expert_parallel_size}

    @functools.cached_property
    def control_group(self):
        """A gloo group over every rank for small control messages (stop flags, checkpoint
        bookkeeping): on GPUs they then never wait on the device (collective to create)."""
        if self.world_size == 1:
            return None
        if self.device.type == "cpu":
            return dist.group.WORLD
        return dist.new_group(backend="gloo")

    @functools.cached_property
    def model_parallel_cpu_group(self):
        """This replica's ranks (tensor x sequence x pipeline) on gloo: micro-batches are shared on the host,
        before they go to the GPU (collective to create: every rank builds every replica's group)."""
        if self.replica_size == 1:
            return None
        if self.device.type == "cpu" and self.sequence_parallel_size == 1:
            return self.model_parallel_group
        tensor, sequence, data = self.tensor_parallel_size, self.sequence_parallel_size, self.data_parallel_size
        mine = None
        for data_rank in range(data):
            ranks = [((stage * data + data_rank) * sequence + s) * tensor + t
                     for stage in range(self.pipeline_parallel_size) for s in range(sequence) for t in range(tensor)]
            group = dist.new_group(ranks, backend="gloo")
            if self.rank in ranks:
                mine = group
        return mine

    def stage_mesh(self):
        """A ``DeviceMesh`` over this pipeline stage's ranks with dims (data, tensor), the same groups as
        megatron's; "data" is every rank that holds the same weights (data x sequence parallel, which are
        adjacent in the rank order). Collective: every rank calls it."""
        from torch.distributed.device_mesh import init_device_mesh

        shape = (self.pipeline_parallel_size, self.data_parallel_size * self.sequence_parallel_size,
                 self.tensor_parallel_size)
        mesh = init_device_mesh(self.device.type, shape, mesh_dim_names=("pipeline", "data", "tensor"))
        return mesh["data", "tensor"]

    def expert_mesh(self):
        """A ``DeviceMesh`` over this pipeline stage's ranks with dims (expert data, expert, tensor): the data x
        sequence ranks split as megatron splits them for experts (the expert rank varies fastest). Collective."""
        from torch.distributed.device_mesh import init_device_mesh

        experts = self.expert_parallel_size
        shape = (self.pipeline_parallel_size, self.data_parallel_size * self.sequence_parallel_size // experts,
                 experts, self.tensor_parallel_size)
        mesh = init_device_mesh(self.device.type, shape,
                                mesh_dim_names=("pipeline", "expert_data", "expert", "tensor"))
        return mesh["expert_data", "expert", "tensor"]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise LayoutError("--train.device cuda: no CUDA device is visible; use --train.device cpu")
    return torch.device(name)


def launched_world_size() -> int:
    """The world size this process belongs to: the process group's if it exists, else the launcher's
    (``WORLD_SIZE`` from torchrun or ``launch.slurm``), else 1. Known before any group is made, so a
    layout can be checked first."""
    if dist.is_initialized():
        return dist.get_world_size()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # as ``initialize_topology`` decides
        return int(os.environ["WORLD_SIZE"])
    return 1


def initialize_topology(device: str = "auto", tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1,
                        num_layers: int | None = None, sequence_parallel_size: int = 1,
                        expert_parallel_size: int = 1) -> Topology:
    resolved = resolve_device(device)
    backend = "nccl" if resolved.type == "cuda" else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if resolved.type == "cuda":
        torch.cuda.set_device(local_rank)
        resolved = torch.device("cuda", local_rank)
    if not dist.is_initialized():
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend=backend)
        else:
            store_dir = tempfile.mkdtemp(prefix="memdlm-store-")
            dist.init_process_group(
                backend=backend, init_method=f"file://{store_dir}/store", rank=0, world_size=1
            )
    world_size = dist.get_world_size()
    check_world(world_size, tensor_parallel_size, pipeline_parallel_size, num_layers or pipeline_parallel_size,
                sequence=sequence_parallel_size)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tensor_parallel_size,
            pipeline_model_parallel_size=pipeline_parallel_size,
            context_parallel_size=sequence_parallel_size,
            expert_model_parallel_size=expert_parallel_size,
        )
    topology = Topology(
        rank=dist.get_rank(),
        world_size=world_size,
        local_rank=local_rank,
        tensor_parallel_size=tensor_parallel_size,
        pipeline_parallel_size=pipeline_parallel_size,
        data_parallel_size=world_size // (tensor_parallel_size * pipeline_parallel_size * sequence_parallel_size),
        device=resolved,
        sequence_parallel_size=sequence_parallel_size,
        expert_parallel_size=expert_parallel_size,
    )
    topology.model_parallel_cpu_group  # noqa: B018 - a collective to create: every rank now, at the same point
    return topology


def shutdown_topology() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
