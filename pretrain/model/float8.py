"""fp8 matmuls for the large linear layers (``--train.precision fp8``), by torchao's float8 training recipe.

Each matmul of a trained projection (``x W^T`` in the forward, and both matmuls of its backward) casts its
operands to float8 with one dynamic scale per tensor (e4m3 for activations and weights, e5m2 for the output
gradient) and runs on the fp8 tensor cores (``torch._scaled_mm``); the output is bf16, as under bf16 autocast.
Weights stay fp32 masters, and everything else of the step is the bf16 recipe.

Left in bf16 on purpose:
- the layers that carry fast weights: the whole inner loop (its frozen passes, the fast weights' gradients
  and their SGD update) and the outer loss's tail run on them, so fp8 never touches the inner update;
- every frozen pass (detached weights: the inner loop's input-gradient-only backward);
- the embedding, the LM head and its cross entropy, norms, and routed experts (their own per-expert matmuls).

Under tensor parallelism each rank scales its own slice of a weight (a valid per-slice recipe, not bit-equal
to one process). On a CPU the same casts run with the matmul emulated in high precision (torchao's
``emulate``): for tests only, as no CPU has fp8 matmuls.
"""

from __future__ import annotations

import logging

import torch

# fp8 matmuls (torch._scaled_mm) need Ada or Hopper tensor cores or newer.
MIN_COMPUTE_CAPABILITY = (8, 9)


def fp8_unsupported_reason(device: torch.device) -> str | None:
    """Why ``--train.precision fp8`` cannot run on ``device`` (None when it can)."""
    if device.type != "cuda":
        return (f"--train.precision fp8 needs a GPU with fp8 matmuls (compute capability "
                f"{'.'.join(map(str, MIN_COMPUTE_CAPABILITY))}+, e.g. H100/H200); this run is on {device.type}")
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_COMPUTE_CAPABILITY:
        return (f"--train.precision fp8 needs compute capability {'.'.join(map(str, MIN_COMPUTE_CAPABILITY))}+ "
                f"(H100/H200, L40, RTX 4090); {torch.cuda.get_device_name(device)} has "
                f"{capability[0]}.{capability[1]}: use --train.precision bf16")
    return None


def fp8_shape_problem(model_cfg, tensor_parallel_size: int, sequence_parallel_size: int) -> str | None:
    """fp8 matmuls (``torch._scaled_mm``) need every dimension a multiple of 16: each projection's input and output
    sizes on a tensor-parallel rank, and the tokens of a micro-batch (the inner size of the weight gradient), which
    are a multiple of 16 for any micro-batch when a rank's share of the sequence is. None when all are."""
    sizes = {"model.hidden_size": model_cfg.hidden_size,
             "the q/k/v projection per tensor-parallel rank": model_cfg.qkv_size // tensor_parallel_size,
             "the attention output per tensor-parallel rank": model_cfg.attention_size // tensor_parallel_size,
             "model.ffn_hidden_size per tensor-parallel rank": model_cfg.ffn_hidden_size // tensor_parallel_size,
             "model.seq_len per sequence-parallel rank": model_cfg.seq_len // sequence_parallel_size}
    if model_cfg.moe_shared_ffn_hidden_size:
        sizes["model.moe_shared_ffn_hidden_size per tensor-parallel rank"] = (
            model_cfg.moe_shared_ffn_hidden_size // tensor_parallel_size)
    bad = [f"{name} = {size}" for name, size in sizes.items() if size % 16]
    if bad:
        return ("--train.precision fp8 needs multiples of 16 (fp8 matmuls): " + ", ".join(bad)
                + "; choose sizes that are, or use --train.precision bf16")
    return None


class Float8Matmul:
    """``x @ weight.T`` with torchao's dynamically scaled float8 casts (tensorwise scales), differentiable.

    ``emulate``: the casts are real but the matmul runs in high precision (CPU tests)."""

    def __init__(self, emulate: bool = False):
        pytree_log = logging.getLogger("torch.utils._pytree")
        level = pytree_log.level
        pytree_log.setLevel(logging.ERROR)  # torchao 0.18 registers an enum the way torch 2.14 deprecates (noise)
        try:
            from torchao.float8 import Float8LinearConfig
            from torchao.float8.float8_linear import matmul_with_hp_or_float8_args
            from torchao.float8.float8_training_tensor import LinearMMConfig, ScaledMMConfig
        finally:
            pytree_log.setLevel(level)

        self.emulate = emulate
        self.config = Float8LinearConfig(emulate=emulate)
        gemms = (self.config.gemm_config_output, self.config.gemm_config_grad_input,
                 self.config.gemm_config_grad_weight)
        self.mm_config = LinearMMConfig(*(ScaledMMConfig(emulate, gemm.use_fast_accum, False,
                                                         self.config.pad_inner_dim) for gemm in gemms))
        self._matmul = matmul_with_hp_or_float8_args

    def __call__(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):  # the bf16 recipe's activations: cast as autocast would
            x = x.to(torch.get_autocast_dtype(device_type))
        return self._matmul.apply(x, weight.t(), self.mm_config, self.config)
