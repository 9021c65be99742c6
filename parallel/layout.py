"""Which tensor x sequence x pipeline x data layouts can run a model and a batch, and which layers a stage holds.

Everything here takes plain sizes, so it can be checked before any rank starts (the
``--nproc-per-node`` launcher does) as well as inside a run.
"""

from __future__ import annotations

from typing import Callable

from common.errors import UsageError


class LayoutError(UsageError):
    """A parallel layout that cannot run this model or batch; the message names sizes that would."""


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_world(world_size: int, tensor: int, pipeline: int, num_layers: int,
                fits: Callable[[int, int], bool] | None = None, sequence: int = 1) -> None:
    """The ranks must split into tensor x sequence x pipeline x data, and the layers into equal stages.
    ``fits(tensor, pipeline)``: whether a split suits the model and batch too (only those are suggested)."""
    if world_size % (tensor * sequence * pipeline):
        splits = [(t, p) for t in divisors(world_size // sequence) for p in divisors(world_size // (sequence * t))
                  if world_size % sequence == 0 and (fits is None or fits(t, p))]
        options = (f"possible tensor x pipeline sizes: {', '.join(f'{t}x{p}' for t, p in splits)}" if splits else
                   "no tensor x pipeline split of that many ranks suits this model and batch; use another number of "
                   "ranks")
        with_sequence = f" x --parallel.sequence_parallel_size {sequence}" if sequence > 1 else ""
        raise LayoutError(
            f"--parallel.tensor_parallel_size {tensor}{with_sequence} x --parallel.pipeline_parallel_size {pipeline} "
            f"= {tensor * sequence * pipeline} does not divide the world size {world_size}; {options}"
        )
    if num_layers % pipeline:
        raise LayoutError(
            f"--parallel.pipeline_parallel_size {pipeline}: {num_layers} layers do not split into {pipeline} equal "
            f"stages; possible pipeline sizes for {num_layers} layers: {', '.join(map(str, divisors(num_layers)))}"
        )


def check_tensor_split(tensor: int, sizes: dict[str, int]) -> None:
    """Tensor parallelism splits each named size (``{"model.num_heads": 4, ...}``) into equal parts."""
    for option, size in sizes.items():
        if size % tensor:
            common = [d for d in divisors(min(sizes.values())) if all(s % d == 0 for s in sizes.values())]
            raise LayoutError(
                f"--parallel.tensor_parallel_size {tensor} does not divide --{option} {size}; tensor-parallel sizes "
                f"this model allows: {', '.join(map(str, common))}"
            )


def check_batch_split(global_batch: int, micro_batch: int, data: int, pipeline: int) -> None:
    """The global batch is cut into data ranks x micro-batches, never resized; a pipeline needs enough
    micro-batches to fill its stages."""
    if global_batch % (micro_batch * data):
        raise LayoutError(
            f"--train.global_batch_size {global_batch} is not a multiple of --train.micro_batch_size {micro_batch} "
            f"x {data} data-parallel ranks; the global batch is split across ranks and micro-batches, never resized"
        )
    accumulation = global_batch // (micro_batch * data)
    if pipeline > 1 and accumulation < pipeline:
        raise LayoutError(
            f"{pipeline} pipeline stages need at least {pipeline} micro-batches per rank and step, this layout has "
            f"{accumulation}; lower --train.micro_batch_size or raise --train.global_batch_size"
        )


def stage_layers(num_layers: int, pipeline_size: int, pipeline_rank: int) -> range:
    """The layers of a pipeline stage (equal contiguous blocks)."""
    per_stage = num_layers // pipeline_size
    start = pipeline_rank * per_stage
    return range(start, start + per_stage)


def check_sequence_split(sequence: int, tensor: int, num_kv_heads: int, num_heads: int) -> None:
    """Ulysses sequence parallelism trades a rank's tokens for its heads: the sequence-parallel size must divide
    the key/value heads of a tensor-parallel rank (each carries its group of query heads along)."""
    local = num_kv_heads // tensor
    if sequence > 1 and local % sequence:
        sizes = [d for d in divisors(local)]
        raise LayoutError(
            f"sequence-parallel size {sequence} does not divide the {local} key/value heads of a "
            f"tensor-parallel rank ({num_kv_heads} heads / tensor-parallel size {tensor}; {num_heads} query heads): "
            f"the all-to-all gives each sequence-parallel rank whole heads; sizes that work: "
            f"{', '.join(map(str, sizes))}")
