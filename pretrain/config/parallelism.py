"""How the ranks split the model and the batch (``--parallel.*``)."""

from __future__ import annotations

from dataclasses import dataclass

from pretrain.config.fields import check, check_choices, param


@dataclass
class ParallelConfig:
    """Tensor x sequence x pipeline x data parallelism; data-parallel size = world size / (tensor x sequence x
    pipeline)."""

    tensor_parallel_size: int = param(1, "ranks that split each layer's matrices (megatron-core tensor parallelism)")
    sequence_parallel_size: int = param(
        1, "ranks that split each sequence's tokens (DeepSpeed-Ulysses style: attention exchanges heads for tokens "
        "by all-to-all); must divide the key/value heads of a tensor-parallel rank")
    pipeline_parallel_size: int = param(1, "pipeline stages (torch.distributed.pipelining); must divide num_layers")
    expert_parallel_size: int = param(
        1, "ranks that split each mixture-of-experts layer's routed experts, out of the data x sequence ranks "
        "(tokens reach their experts by all-to-all); must divide model.moe_num_experts and data x sequence")
    zero_stage: int = param(0, "DeepSpeed ZeRO stage over the data-parallel group: 0, 1, 2 or 3", (0, 1, 2, 3))
    pipeline_schedule: str = param("1f1b", "pipeline schedule of the anchor pass", ("1f1b", "gpipe"))

    def __post_init__(self):
        check_choices(self, "parallel")
        check(self.tensor_parallel_size >= 1, "parallel.tensor_parallel_size", "must be >= 1")
        check(self.pipeline_parallel_size >= 1, "parallel.pipeline_parallel_size", "must be >= 1")
        check(self.sequence_parallel_size >= 1, "parallel.sequence_parallel_size", "must be >= 1")
        check(self.expert_parallel_size >= 1, "parallel.expert_parallel_size", "must be >= 1")
        check(not (self.expert_parallel_size > 1 and self.zero_stage == 3), "parallel.zero_stage",
              "DeepSpeed's ZeRO 3 does not partition expert-parallel experts (it refuses its own MoE there too); use "
              "--parallel.zero_stage 0, 1 or 2 with --parallel.expert_parallel_size")
        check(
            not (self.zero_stage > 0 and self.pipeline_parallel_size > 1),
            "parallel.zero_stage",
            f"ZeRO stage {self.zero_stage} cannot be combined with {self.pipeline_parallel_size} pipeline stages: "
            "torch.distributed.pipelining drives the backward, and DeepSpeed's ZeRO needs its own engine to; use "
            "--parallel.zero_stage 0 (plain data parallelism) with pipeline stages",
        )
