"""Expert parallelism: each of the ``EP`` ranks of an expert-parallel group (megatron-core's, carved out of the
data x sequence ranks) holds ``E / EP`` consecutive routed experts; a token's rows travel to the ranks holding
its chosen experts and their outputs travel back, by two all-to-alls (and one of the row counts) per MoE layer
and pass.

The exchange is differentiable (``torch.distributed.nn.functional.all_to_all_single``): the backward sends each
row's gradient back to the rank it came from, so an expert's weight gradient on its rank covers the tokens of
every rank of the group, and a token's input gradient reaches its own rank. The inner loop's passes dispatch
like any forward pass: they move the rows of the tail's MoE layers within the expert group, and nothing else.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch.distributed.nn.functional import all_to_all_single


def mark_expert_parallel(param: torch.nn.Parameter, size: int, rank: int) -> None:
    """Mark a tensor split over the expert-parallel group along dim 0: for the initialisation and checkpoints
    (``expert_parallel_size``/``expert_parallel_rank``) and for DeepSpeed, which reduces a parameter with
    ``allreduce`` false over the expert-data-parallel group named by ``group_name``."""
    param.expert_parallel_size, param.expert_parallel_rank = size, rank
    param.allreduce, param.group_name = False, expert_group_name(size)


def split_over_experts(param: torch.nn.Parameter) -> bool:
    """Whether expert parallelism splits the tensor along dim 0 (``mark_expert_parallel``)."""
    return getattr(param, "expert_parallel_size", 1) > 1


def expert_group_name(size: int) -> str:
    """DeepSpeed's name for the expert and expert-data groups of expert-parallel size ``size``."""
    return f"ep_size_{size}"


class ExpertDispatch:
    """Runs ``experts(rows, counts)`` on this rank's experts for rows routed from every rank of ``group``."""

    def __init__(self, group, size: int, rank: int, num_experts: int):
        self.group, self.size, self.rank = group, size, rank
        self.num_local = num_experts // size
        self.first = rank * self.num_local  # this rank's experts: [first, first + num_local)

    def run(self, rows: torch.Tensor, counts: torch.Tensor, experts: Callable[..., torch.Tensor],
            labels: torch.Tensor | None = None) -> torch.Tensor:
        """``rows [N, H]`` grouped by (global) expert, ``counts [E]`` rows per expert -> each row's output from the
        rank that holds its expert, in the same order. ``experts(rows, counts per local expert, labels)`` runs
        there; ``labels [N]`` (int64, e.g. each row's sequence) travel with the rows."""
        per_expert = counts.to(torch.int64).view(self.size, self.num_local)
        received = torch.empty_like(per_expert)
        dist.all_to_all_single(received, per_expert.contiguous(), group=self.group)  # [source, local expert]
        send = per_expert.sum(dim=1).tolist()  # a device sync on GPUs, as the experts' own counts are
        receive = received.sum(dim=1).tolist()
        arrived = all_to_all_single(rows.new_empty(sum(receive), rows.shape[1]), rows.contiguous(),
                                    output_split_sizes=receive, input_split_sizes=send, group=self.group)
        # Arrived rows are ordered by source rank, then expert: regroup them by expert (sources in order).
        expert_of = torch.arange(self.num_local, device=rows.device).repeat(self.size).repeat_interleave(
            received.reshape(-1).to(rows.device))
        order = torch.argsort(expert_of, stable=True)
        arrived_labels = None
        if labels is not None:
            arrived_labels = labels.new_empty(sum(receive))
            dist.all_to_all_single(arrived_labels, labels.contiguous(), output_split_sizes=receive,
                                   input_split_sizes=send, group=self.group)
            arrived_labels = arrived_labels.index_select(0, order)
        outputs = experts(arrived.index_select(0, order), received.sum(dim=0).tolist(), arrived_labels)
        back = torch.empty_like(outputs).index_copy(0, order, outputs)
        return all_to_all_single(rows.new_empty(rows.shape[0], outputs.shape[1]), back, output_split_sizes=send,
                                 input_split_sizes=receive, group=self.group)
