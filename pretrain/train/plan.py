"""The memory and time plan of a run, before launch (``memdlm-pretrain ... --plan``, ``memdlm-launch slurm``).

No process group, no model: the figures follow from the config and the layout. Per pipeline stage (every rank
of a stage holds the same):

- parameters: this rank's count (its layers; matrices split over tensor-parallel ranks, norms replicated);
- bytes of fp32 parameters, gradients and optimizer state. ZeRO 0 (torch AdamW): 4 + 4 + 8 bytes per
  parameter. ZeRO 1-3 (DeepSpeed, fp32): the optimizer holds exp_avg, exp_avg_sq and its fp32 copy of this
  rank's partition (12 bytes per partition element); stage 2 also partitions the gradients, stage 3 the
  parameters. DeepSpeed's partitions are modelled with its padding: ZeRO 1/2 flatten each parameter group
  (matrices; vectors) and pad it to a multiple of 2 x data ranks; ZeRO 3 pads each parameter to a multiple of
  the data ranks;
- fast weights per micro-batch (fp32 unless ``memory.dtype``), the activations kept for the backward (an
  estimate: the residual stream and the layer inputs, or only the layer inputs under full recomputation), and
  the largest logits block (the head's chunk rows x this rank's vocabulary, fp32);
- FLOPs per optimizer step (the model-FLOP count of ``pretrain/train/flops.py``) and the step time at an
  assumed model-FLOP utilisation of a stated peak.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from parallel.layout import stage_layers
from parallel.sequence import padded_length
from pretrain.config import RunConfig, computes_in_bf16
from pretrain.model.fast_weights import build_fast_weight_plan
from pretrain.model.transformer import head_chunk_rows
from pretrain.train.flops import model_flops_per_token

GIB = 1 << 30


@dataclass
class StagePlan:
    stage: int
    layers: range
    matrices: int  # this rank's elements of parameters with two or more dimensions
    vectors: int  # of one-dimensional ones (norms, biases)
    params_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    fast_weight_bytes: int
    activation_bytes: int
    logits_bytes: int

    @property
    def parameters(self) -> int:
        return self.matrices + self.vectors

    @property
    def total_bytes(self) -> int:
        return (self.params_bytes + self.grads_bytes + self.optimizer_bytes + self.fast_weight_bytes
                + self.activation_bytes + self.logits_bytes)


def local_parameter_shapes(cfg: RunConfig, stage: int) -> list[tuple[int, ...]]:
    """The shapes of the parameters one rank of pipeline stage ``stage`` holds."""
    model, tensor = cfg.model, cfg.parallel.tensor_parallel_size
    h, f, vocab = model.hidden_size, model.ffn_hidden_size, model.vocab_size
    layers = stage_layers(model.num_layers, cfg.parallel.pipeline_parallel_size, stage)
    shapes: list[tuple[int, ...]] = []
    if layers.start == 0:
        shapes.append((vocab // tensor, h))
    for layer in layers:
        shapes += [(h,), (model.qkv_size // tensor, h)]
        shapes += [(model.qkv_size // tensor,)] if model.qkv_bias else []
        shapes += [(model.attention_head_dim,)] * 2 if model.qk_norm else []
        shapes += [(h, model.attention_size // tensor), (h,)]
        if not model.is_moe_layer(layer):
            shapes += [(f // tensor, h), (f // tensor, h), (h, f // tensor)]
            continue
        experts, width, shared = model.moe_num_experts, model.expert_ffn_hidden_size // tensor, \
            model.moe_shared_ffn_hidden_size // tensor
        held = experts // cfg.parallel.expert_parallel_size  # expert parallelism splits the routed experts
        shapes += [(experts, h), (held, width, h), (held, width, h), (held, h, width)]
        if shared:
            shapes += [(shared, h), (shared, h), (h, shared)] + ([(1, h)] if model.moe_shared_expert_gate else [])
    if layers.stop == model.num_layers:
        shapes.append((h,))
        if not model.tie_embeddings:
            shapes.append((vocab // tensor, h))
    return shapes


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def partition_elements(shapes: list[tuple[int, ...]], zero_stage: int, data: int, expert_parallel_size: int = 1
                       ) -> int:
    """Elements of this rank's optimizer partition (all of them at ZeRO 0). Under expert parallelism the routed
    experts (the three-dimensional shapes) are a group of their own, partitioned over the ranks that hold the
    same experts (``data / expert_parallel_size``)."""
    if expert_parallel_size > 1:
        experts = [s for s in shapes if len(s) == 3]
        dense = [s for s in shapes if len(s) != 3]
        return (partition_elements(dense, zero_stage, data)
                + partition_elements(experts, zero_stage, data // expert_parallel_size))
    matrices = [math.prod(s) for s in shapes if len(s) >= 2]
    vectors = [math.prod(s) for s in shapes if len(s) < 2]
    if zero_stage == 0:
        return sum(matrices) + sum(vectors)
    if zero_stage in (1, 2):
        return sum(_round_up(sum(group), 2 * data) // data for group in (matrices, vectors) if group)
    return sum(_round_up(n, data) // data for n in matrices + vectors)


def stage_plan(cfg: RunConfig, world_size: int, stage: int) -> StagePlan:
    model, parallel, train, memory = cfg.model, cfg.parallel, cfg.train, cfg.memory
    tensor, pipeline, sequence = (parallel.tensor_parallel_size, parallel.pipeline_parallel_size,
                                  parallel.sequence_parallel_size)
    data = world_size // (tensor * pipeline * sequence)
    shapes = local_parameter_shapes(cfg, stage)
    matrices = sum(math.prod(s) for s in shapes if len(s) >= 2)
    vectors = sum(math.prod(s) for s in shapes if len(s) < 2)
    count, zero = matrices + vectors, parallel.zero_stage
    partition = partition_elements(shapes, zero, data * sequence,  # ZeRO shards over data x sequence ranks
                                   parallel.expert_parallel_size)
    params_bytes = 4 * (partition if zero == 3 else count)
    grads_bytes = 4 * (partition if zero >= 2 else count)
    optimizer_bytes = 8 * count if zero == 0 else 12 * partition
    layers = stage_layers(model.num_layers, pipeline, stage)
    micro, seq, h = train.micro_batch_size, model.seq_len, model.hidden_size
    fast = 0
    if memory.enabled and layers.stop == model.num_layers:
        plan = build_fast_weight_plan(model, memory, tensor)

        def per_sequence(site) -> int:  # a routed site: all E experts (under expert parallelism a rank holds
            a, b = plan.local_shape(site)  # E / EP of them for EP x its sequences: the same count)
            one = memory.lora_rank * (a + b) if memory.adapter == "lora" else a * b
            return one * site.num_experts if site.routed else one

        elements = sum(per_sequence(site) for site in plan.sites)
        width = 2 if memory.dtype == "bf16" else 4
        # phi_0 .. phi_K are kept for the outer backward only through the last (detached): two copies live.
        fast = 2 * width * micro * elements
    activation_width = 2 if computes_in_bf16(train.precision) else 4
    # A sequence-parallel rank holds 1/S of the (padded) tokens; its attention holds every token for 1/S of the heads.
    tokens = micro * padded_length(seq, sequence) // sequence
    if train.recompute == "full":
        per_layer_bytes = tokens * h * activation_width  # each layer's input
    else:  # residual stream, norms, q/k/v, attention output, the MLP's three wide tensors (a common estimate)
        per_layer_bytes = tokens * activation_width * (4 * h + (model.qkv_size + model.attention_size) // tensor
                                                       + 3 * model.ffn_hidden_size // tensor)
        if train.recompute == "selective":
            per_layer_bytes -= tokens * activation_width * (model.qkv_size // tensor)
    in_flight = pipeline if pipeline > 1 else 1  # 1F1B keeps up to (stages) micro-batches on the first stage
    activation = per_layer_bytes * len(layers) * (in_flight - stage if pipeline > 1 else 1)
    logits = 0
    if layers.stop == model.num_layers:
        logits = 4 * head_chunk_rows(model, tensor) * (model.vocab_size // tensor)
    return StagePlan(stage, layers, matrices, vectors, params_bytes, grads_bytes, optimizer_bytes, fast, activation,
                     logits)


def step_flops(cfg: RunConfig) -> float:
    """Model FLOPs of one optimizer step (forward and backward of every token of the global batch)."""
    return model_flops_per_token(cfg.model) * cfg.train.global_batch_size * cfg.model.seq_len


def format_plan(cfg: RunConfig, world_size: int, mfu: float = 0.4, peak_tflops: float = 989.4,
                gpu_memory_gb: float = 0.0) -> str:
    """The plan as text, one line per pipeline stage."""
    tensor, pipeline = cfg.parallel.tensor_parallel_size, cfg.parallel.pipeline_parallel_size
    sequence = cfg.parallel.sequence_parallel_size
    data = world_size // (tensor * pipeline * sequence)
    with_sequence = f" x sequence {sequence}" if sequence > 1 else ""
    lines = [f"plan: {world_size} ranks = tensor {tensor}{with_sequence} x pipeline {pipeline} x data {data} (ZeRO "
             f"{cfg.parallel.zero_stage}), micro-batch {cfg.train.micro_batch_size} x {cfg.model.seq_len} tokens, "
             f"{cfg.train.precision}, recompute {cfg.train.recompute}; GiB per rank:",
             f"  {'stage':>5} {'layers':>9} {'params':>10} {'weights':>8} {'grads':>8} {'optim':>8} {'fast':>8} "
             f"{'activ.':>8} {'logits':>8} {'total':>8}"]
    for stage in range(pipeline):
        p = stage_plan(cfg, world_size, stage)
        lines.append(f"  {stage:>5} {f'{p.layers.start}-{p.layers.stop - 1}':>9} {p.parameters / 1e6:>9.1f}M "
                     + " ".join(f"{b / GIB:>8.2f}" for b in (p.params_bytes, p.grads_bytes, p.optimizer_bytes,
                                                            p.fast_weight_bytes, p.activation_bytes, p.logits_bytes,
                                                            p.total_bytes)))
    flops = step_flops(cfg)
    seconds = flops / (world_size * peak_tflops * 1e12 * mfu)
    lines.append(f"  model FLOPs per step {flops:.3e} (without the memory's inner passes); at {mfu:.0%} MFU of "
                 f"{peak_tflops:g} TFLOP/s per rank: {seconds:.2f} s per step")
    lines.append("  weights/grads/optim are exact (DeepSpeed's partition padding included); activations are an "
                 "estimate (allocator overhead and temporary buffers come on top)")
    if gpu_memory_gb:
        lines.append(f"  GPU memory stated: {gpu_memory_gb:g} GB per rank")
    return "\n".join(lines)


def largest_rank_bytes(cfg: RunConfig, world_size: int) -> int:
    return max(stage_plan(cfg, world_size, s).total_bytes for s in range(cfg.parallel.pipeline_parallel_size))


def launch_plan(cfg: RunConfig, world_size: int, mfu: float = 0.4, peak_tflops: float = 989.4) -> tuple[str, int]:
    """The plan of the run as it will start (the model of ``--model.init_from``, the layout checked): its text
    and the bytes of its fullest rank. What ``--plan`` and ``memdlm-launch slurm --gpu-memory-gb`` show."""
    from pretrain.hf.importer import resolve_init_from
    from pretrain.train.factory import check_run_layout

    cfg = resolve_init_from(cfg)
    check_run_layout(cfg, world_size)
    return format_plan(cfg, world_size, mfu, peak_tflops), largest_rank_bytes(cfg, world_size)
