"""The chunked head + vocab-parallel cross entropy against megatron's CE on full logits."""

import pytest
import torch

from parallel.megatron import ModelParallelConfig, vocab_parallel_cross_entropy
from pretrain.model.fused_head import VocabParallelHead

pytestmark = pytest.mark.fast  # in-process: part of the edit loop's tier (-m fast)


def make_head(dtype):
    torch.manual_seed(0)
    config = ModelParallelConfig(params_dtype=dtype, use_cpu_initialization=True)
    return VocabParallelHead(16, 50, config=config, init_method=lambda w: torch.nn.init.normal_(w, std=0.5),
                             bias=False, gather_output=False)


@pytest.mark.parametrize("chunk_rows", [1, 3, 7, 1024])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_loss_and_gradients_match_full_logits(topology, chunk_rows, dtype):
    head = make_head(dtype)
    head.chunk_rows = chunk_rows
    x = torch.randn(11, 16, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, 50, (11,))
    scale = torch.rand(11, dtype=torch.float64)

    fused = head(x, targets, scale)
    fused.backward()
    fused_x, fused_w = x.grad.clone(), head.weight.grad.clone()
    x.grad = None
    head.weight.grad = None

    logits = head(x)
    if dtype == torch.float64:  # unchunked and in float64 throughout (megatron's cross entropy works in fp32)
        per_row = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    else:
        per_row = vocab_parallel_cross_entropy(logits.clone(), targets)
    reference = (per_row.double() * scale).sum()
    reference.backward()
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fused.double(), reference.detach(), **tol)
    torch.testing.assert_close(fused_x, x.grad, **tol)
    torch.testing.assert_close(fused_w, head.weight.grad, **tol)


def test_frozen_head_gives_input_gradient_only(topology):
    head = make_head(torch.float32)
    x = torch.randn(5, 16, requires_grad=True)
    loss = head(x, torch.randint(0, 50, (5,)), torch.ones(5), frozen=True)
    (grad_x,) = torch.autograd.grad(loss, [x])
    assert head.weight.grad is None and grad_x.abs().sum() > 0
    with torch.no_grad():
        assert not head(x, torch.randint(0, 50, (5,)), torch.ones(5)).requires_grad


def test_no_rows_gives_zero_loss_and_zero_gradients(topology):
    head = make_head(torch.float32)
    x = torch.zeros(0, 16, requires_grad=True)
    loss = head(x, torch.zeros(0, dtype=torch.long), torch.zeros(0))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(head.weight.grad, torch.zeros_like(head.weight))


def test_bf16_autocast_matches_fp32(topology):
    head = make_head(torch.float32)
    x = torch.randn(9, 16, requires_grad=True)
    targets = torch.randint(0, 50, (9,))
    scale = torch.rand(9)
    reference = head(x, targets, scale)
    reference_x, = torch.autograd.grad(reference, [x])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = head(x, targets, scale)
    low_x, = torch.autograd.grad(low, [x])
    assert low.dtype == torch.float32 and low_x.dtype == torch.float32
    torch.testing.assert_close(low, reference, rtol=3e-2, atol=0)
    torch.testing.assert_close(low_x, reference_x, rtol=5e-2, atol=5e-3)


@pytest.mark.fast
def test_the_automatic_chunk_bounds_the_logits_block():
    """--model.head_chunk_rows 0: the largest power of two (16 to 1024) of rows whose fp32 logits over this rank's
    vocabulary share fit 128 MiB: LLaDA's 126,464 entries get 256 rows (124 MiB), the default model 1024 (the
    chunk it always had, so its step is unchanged)."""
    from pretrain.config import ModelConfig
    from pretrain.model.transformer import LOGITS_BLOCK_BYTES, head_chunk_rows

    llada = ModelConfig(vocab_size=126464, hidden_size=64, num_heads=4, num_layers=2, ffn_hidden_size=96)
    assert head_chunk_rows(llada) == 256 and 4 * 256 * 126464 <= LOGITS_BLOCK_BYTES < 4 * 512 * 126464
    assert head_chunk_rows(llada, tensor_parallel_size=2) == 512
    assert head_chunk_rows(ModelConfig()) == 1024
    assert head_chunk_rows(ModelConfig(head_chunk_rows=100)) == 100
