"""What needs CUDA (marked ``gpu``; skipped with the reason elsewhere, run by benchmarks/gpu_check.sh):

- the CUDA step equals the CPU step in fp32 (relative 1e-5) on a tiny model, over two optimizer steps;
- the bf16 step's loss is within 2e-2 of fp32's;
- the unmasked step reaches the flash SDPA kernel and a padded one the memory-efficient kernel (only
  those are allowed while they run), and within-document attention goes through FlexAttention and
  equals the dense mask;
- no host synchronisation in the step (``torch.cuda.set_sync_debug_mode("error")``);
- a checkpoint saved on CUDA resumes on the CPU and the reverse, continuing the same losses;
- the fused kernels (inductor's, through ``--train.compile``) equal the plain bf16 step: losses within 1e-2 and the
  weights' changes over two steps within 5e-2 relative (bf16 rounding of differently fused elementwise chains,
  through AdamW's normalisation);
- fp8 on the tensor cores equals its emulation (same casts, matmul in high precision) within 1e-2 relative, and
  fp8 training's losses stay within 1e-2 of bf16's, eager and compiled.
"""

import numpy as np
import pytest
import torch

from data_pipeline.masking import build_masked_batch
from pretrain.config import DataConfig, GuardConfig, MemoryConfig, ModelConfig, OptimizerConfig, RunConfig, TrainConfig

pytestmark = pytest.mark.gpu

TINY = ModelConfig(vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, ffn_hidden_size=96, seq_len=64)


def _config(device: str, precision: str = "fp32", documents: bool = False, memory: bool = True,
            compile: bool = False) -> RunConfig:
    return RunConfig(model=TINY, memory=MemoryConfig(enabled=memory, layer_fraction=0.5),
                     optim=OptimizerConfig(warmup_steps=0, eps=1e-6),
                     train=TrainConfig(global_batch_size=8, micro_batch_size=4, device=device, precision=precision,
                                       compile=compile),
                     data=DataConfig(document_attention=documents),
                     guard=GuardConfig(skip_bad_steps=False))  # its verdict is the one read (README, Clusters)


def _batches(padded: bool = False, documents: bool = False):
    rng = np.random.default_rng(0)
    out = []
    for index in range(2):
        ids = rng.integers(0, 127, size=(4, 64))
        padding = None
        if padded:
            padding = np.ones((4, 64), dtype=bool)
            padding[1, 40:] = False
        batch = build_masked_batch(ids, np.arange(4) + 4 * index, seed=1, epoch=0, num_inner_steps=2,
                                   pre_anchor_scale=1.5, key_padding_mask=padding)
        if documents:
            batch.segment_ids = torch.from_numpy(np.repeat([[0] * 20 + [1] * 30 + [2] * 14], 4, axis=0)).int()
        out.append(batch)
    return out


def _topology(device: str):
    from parallel.topology import initialize_topology, shutdown_topology

    shutdown_topology()  # each test picks its backend: nccl for CUDA, gloo for the CPU
    return initialize_topology(device)


def _train(device: str, steps: int = 2, precision: str = "fp32", padded=False, documents=False, memory=True,
           compile=False):
    from pretrain.train.factory import build_training

    topology = _topology(device)
    parts = build_training(_config(device, precision, documents, memory, compile), topology, 127)
    batches = [b.to(topology.device) for b in _batches(padded, documents)]
    losses = [parts.engine.train_step(batches, step, 1e-3).host().loss for step in range(steps)]
    weights = {n: p.detach().float().cpu() for n, p in parts.model.named_parameters()}
    return losses, weights, parts, batches


def _relative(a, b):
    return float((a - b).norm() / b.norm())


def test_cuda_step_equals_cpu_step_in_fp32():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cpu_losses, cpu_weights, *_ = _train("cpu")
    cuda_losses, cuda_weights, *_ = _train("cuda")
    for ours, theirs in zip(cuda_losses, cpu_losses):
        assert abs(ours - theirs) / abs(theirs) < 1e-5, (cuda_losses, cpu_losses)
    for name in cpu_weights:
        assert _relative(cuda_weights[name], cpu_weights[name]) < 1e-5, name


def test_bf16_loss_tracks_fp32():
    fp32, *_ = _train("cuda", steps=1)
    bf16, *_ = _train("cuda", steps=1, precision="bf16")
    assert abs(bf16[0] - fp32[0]) / fp32[0] < 2e-2, (bf16, fp32)


def test_fused_kernels_equal_the_plain_bf16_step():
    _, initial, *_ = _train("cuda", steps=0, precision="bf16")
    plain_losses, plain_weights, *_ = _train("cuda", precision="bf16")
    fused_losses, fused_weights, *_ = _train("cuda", precision="bf16", compile=True)
    for ours, theirs in zip(fused_losses, plain_losses):
        assert abs(ours - theirs) / abs(theirs) < 1e-2, (fused_losses, plain_losses)
    for name in plain_weights:  # what the two steps changed, not the weights (the initial ones would dominate)
        moved = plain_weights[name] - initial[name]
        assert _relative(fused_weights[name] - initial[name], moved) < 5e-2, name


def test_fp8_matmul_equals_its_emulation():
    from pretrain.model.float8 import Float8Matmul

    torch.manual_seed(0)
    x = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(384, 512, device="cuda") * 0.05).requires_grad_()
    results = []
    for emulate in (False, True):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = Float8Matmul(emulate=emulate)(x, weight)
        grad = torch.randn(out.shape, device="cuda", dtype=out.dtype, generator=torch.Generator("cuda").manual_seed(1))
        results.append((out, *torch.autograd.grad(out, (x, weight), grad)))
    for real, emulated in zip(*results):
        assert _relative(real.float(), emulated.float()) < 1e-2


@pytest.mark.parametrize("compile", [False, True])
def test_fp8_loss_tracks_bf16(compile):
    bf16, *_ = _train("cuda", precision="bf16")
    fp8, _, parts, _ = _train("cuda", precision="fp8", compile=compile)
    assert any(getattr(m, "float8", None) is not None for m in parts.model.modules())
    for ours, theirs in zip(fp8, bf16):
        assert abs(ours - theirs) / theirs < 1e-2, (fp8, bf16)


def test_attention_reaches_the_fast_kernels():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # only flash may run: anything else raises
        losses, *_ = _train("cuda", steps=1, precision="bf16")
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):  # key padding: the memory-efficient kernel
        padded, *_ = _train("cuda", steps=1, precision="bf16", padded=True)
    assert np.isfinite(losses[0]) and np.isfinite(padded[0])


def test_document_attention_uses_flex_attention_and_equals_the_dense_mask(monkeypatch):
    from pretrain.model import attention

    calls = []
    original = attention._compiled_flex_attention

    def counting():
        calls.append(1)
        return original()

    monkeypatch.setattr(attention, "_compiled_flex_attention", counting)
    flex, *_ = _train("cuda", steps=1, documents=True)
    assert calls, "within-document attention must go through FlexAttention on CUDA"
    from pretrain.memdlm import bilevel

    monkeypatch.setattr(bilevel.BilevelStep, "attention", lambda self, batch: batch.attention_mask(True))
    dense, *_ = _train("cuda", steps=1, documents=True)
    assert abs(flex[0] - dense[0]) / dense[0] < 1e-4, (flex, dense)


@pytest.mark.parametrize("padded, memory", [(False, True), (True, True), (False, False)],
                         ids=["memdlm", "memdlm-padded", "mdlm"])
def test_no_host_synchronisation_in_the_step(padded, memory):
    _, _, parts, batches = _train("cuda", steps=1, precision="bf16", padded=padded, memory=memory)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        stats = parts.engine.train_step(batches, 1, 1e-3)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert np.isfinite(stats.host().loss)


def _run(device: str, out, steps: int, cache):
    from launch.config_cli import build_config
    from parallel.topology import shutdown_topology
    from pretrain.train.trainer import train

    shutdown_topology()
    args = ["--model.vocab_size", "512", "--model.hidden_size", "64", "--model.num_layers", "2", "--model.num_heads",
            "4", "--model.ffn_hidden_size", "96", "--model.seq_len", "32", "--train.global_batch_size", "4",
            "--train.micro_batch_size", "4", "--data.num_workers", "0", "--logging.wandb", "false",
            "--logging.progress_bar", "false", "--memory.layer_fraction", "0.5", "--optim.eps", "1e-6",
            "--train.steps", "4", "--train.device", device, "--train.out_dir", str(out),
            "--data.cache_dir", str(cache)]
    stop_after = [steps]

    def stop():
        stop_after[0] -= 1
        return stop_after[0] <= 0

    return train(build_config(args), stop).losses


def test_checkpoints_move_between_cuda_and_cpu(tmp_path):
    torch.backends.cuda.matmul.allow_tf32 = False
    cache = tmp_path / "cache"
    straight = _run("cpu", tmp_path / "straight", 4, cache)
    for first, second in (("cuda", "cpu"), ("cpu", "cuda")):
        out = tmp_path / f"{first}-{second}"
        losses = _run(first, out, 2, cache) + _run(second, out, 4, cache)
        for ours, theirs in zip(losses, straight):
            assert abs(ours - theirs) / theirs < 1e-5, (first, second, losses, straight)
