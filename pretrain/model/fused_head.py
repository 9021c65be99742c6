"""LM head and vocab-parallel cross entropy fused and chunked over rows.

Every loss of the step is ``sum_rows scale_row * CE(x_row W^T, target_row)``. Computing the
logits of all rows at once writes an ``[n, vocab]`` tensor that the cross entropy then reads
and rewrites several times; on a CPU that traffic, not the matmul, dominates the head. Here
the rows go through in chunks small enough to stay in cache: each chunk's logits, its loss
and (when a gradient is wanted) its input and weight gradients are finished before the next
chunk starts, so nothing vocab-sized outlives a chunk. Because the output is a scalar, the
gradients can be formed in the forward and only scaled by ``grad_output`` in the backward.

The cross entropy itself is megatron-core's ``VocabParallelCrossEntropy`` (its softmax and gradient
steps; its predicted-logit step is restated here without a boolean-mask assignment, which would
synchronise with a GPU), with the same all-reduces over the tensor-parallel group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from parallel.megatron import (
    ColumnParallelLinear,
    VocabParallelCrossEntropy,
    copy_to_tensor_model_parallel_region,
    parallel_state,
)

DEFAULT_CHUNK_ROWS = 1024


def _predicted_logits(logits, target, logits_max, vocab_start: int, vocab_end: int):
    """megatron's ``VocabParallelCrossEntropy.calculate_predicted_logits`` (same steps, same values) with
    ``masked_fill`` where it assigns through a boolean mask, which would synchronise with a GPU."""
    logits -= logits_max.unsqueeze(dim=-1)  # in place, as megatron
    target_mask = (target < vocab_start) | (target >= vocab_end)
    masked_target = (target - vocab_start).masked_fill(target_mask, 0)
    arange_1d = torch.arange(logits.shape[0], device=logits.device)
    predicted = logits[arange_1d, masked_target].masked_fill(target_mask, 0.0)
    exp_logits = torch.exp(logits, out=logits)
    return target_mask, masked_target, predicted, exp_logits.sum(dim=-1), exp_logits


class _ChunkedHeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, targets, row_scale, chunk_rows, tensor_parallel_group, grad_enabled,
                row_group=None, group_sums=None):
        # x [n, hidden] (normed, replicated over TP); weight [vocab/tp, hidden]; targets [n]; row_scale [n].
        # row_group [n] / group_sums [G]: each row's scaled loss is also added into its group's sum (for logging).
        # needs_input_grad does not see no_grad mode, hence the caller's grad_enabled.
        need_x = grad_enabled and ctx.needs_input_grad[0]
        need_w = grad_enabled and ctx.needs_input_grad[1]
        vocab_local = weight.shape[0]
        tensor_parallel_size = dist.get_world_size(tensor_parallel_group)
        vocab_start = dist.get_rank(tensor_parallel_group) * vocab_local
        loss_dtype = torch.promote_types(x.dtype, torch.float32)
        # Matmuls in the autocast dtype when autocast is on (bf16 on GPU), else in x's dtype;
        # softmax, loss and the weight-gradient accumulator in at least fp32.
        device_type = x.device.type
        autocast = torch.is_autocast_enabled(device_type)
        compute_dtype = torch.get_autocast_dtype(device_type) if autocast else x.dtype
        w = weight.to(compute_dtype)
        total = torch.zeros((), dtype=loss_dtype, device=x.device)
        grad_x = torch.empty_like(x) if need_x else None
        grad_w = torch.zeros(weight.shape, dtype=loss_dtype, device=x.device) if need_w else None
        for start in range(0, x.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            x_chunk, scale = x[rows], row_scale[rows]
            # megatron's calculate_logits_max would also cast float64 to float32; keep >= fp32 instead.
            logits = (x_chunk.to(compute_dtype) @ w.t()).to(loss_dtype)
            logits_max = logits.max(dim=-1)[0]
            if tensor_parallel_size > 1:
                dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=tensor_parallel_group)
            target_mask, target_1d, predicted, sum_exp, exp_logits = _predicted_logits(
                logits, targets[rows], logits_max, vocab_start, vocab_start + vocab_local
            )
            if tensor_parallel_size > 1:
                dist.all_reduce(predicted, group=tensor_parallel_group)
                dist.all_reduce(sum_exp, group=tensor_parallel_group)
            softmax, loss = VocabParallelCrossEntropy.calculate_cross_entropy_loss(exp_logits, predicted, sum_exp)
            scaled = loss.to(loss_dtype) * scale.to(loss_dtype)
            total += scaled.sum()
            if group_sums is not None:
                group_sums.index_add_(0, row_group[rows], scaled.detach().to(group_sums.dtype))
            if need_x or need_w:
                prepare = VocabParallelCrossEntropy.prepare_gradient_calculation_operands
                grad_2d, arange_1d, update, grad_input = prepare(
                    softmax, target_mask
                )
                # scale_row * (softmax - onehot): the gradient of this chunk's share of the loss.
                grad_logits = VocabParallelCrossEntropy.calculate_gradients(
                    grad_2d, arange_1d, target_1d, update, grad_input, scale.to(grad_input.dtype)
                ).to(compute_dtype)
                if need_x:
                    grad_x[rows] = grad_logits @ w
                if need_w and compute_dtype == loss_dtype:
                    torch.addmm(grad_w, grad_logits.t(), x_chunk.to(loss_dtype), out=grad_w)
                elif need_w:
                    grad_w += (grad_logits.t() @ x_chunk.to(compute_dtype)).to(loss_dtype)
        ctx.save_for_backward(grad_x, grad_w)
        ctx.weight_dtype = weight.dtype
        ctx.has_x, ctx.has_w = need_x, need_w
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_x, grad_w = ctx.saved_tensors
        dx = grad_x * grad_output.to(grad_x.dtype) if ctx.has_x else None
        dw = (grad_w * grad_output.to(grad_w.dtype)).to(ctx.weight_dtype) if ctx.has_w else None
        return dx, dw, None, None, None, None, None, None, None


class VocabParallelHead(ColumnParallelLinear):
    """megatron's column-parallel LM head, plus a fused loss mode.

    ``forward(x)`` gives vocab-parallel logits like ``ColumnParallelLinear``; ``forward(x,
    targets, row_scale)`` gives ``sum scale * CE`` without materialising the logits. The loss
    runs inside this module's forward so that engines which gather parameters around a
    module's forward (DeepSpeed ZeRO-3) see the weight used.
    """

    chunk_rows: int = DEFAULT_CHUNK_ROWS

    def forward(self, x, targets=None, row_scale=None, frozen: bool = False, row_group=None, group_sums=None):
        weight = self.weight.detach() if frozen else self.weight
        if targets is None:
            return super().forward(x, weight=weight)[0]
        group = parallel_state.get_tensor_model_parallel_group()
        # Every rank's input gradient is a partial sum over its vocabulary shard.
        x = copy_to_tensor_model_parallel_region(x, group=group)
        return _ChunkedHeadCrossEntropy.apply(
            x, weight, targets, row_scale, self.chunk_rows, group, torch.is_grad_enabled(), row_group, group_sums
        )
