"""The learning-rate schedule and the optimizer's parameter groups."""

import math

import pytest
import torch

from pretrain.config import OptimizerConfig
from pretrain.train.optim import build_optimizer, learning_rate

pytestmark = pytest.mark.fast  # in-process: part of the edit loop's tier (-m fast)


def test_warmup_is_linear_from_the_first_step():
    cfg = OptimizerConfig(lr=1e-3, warmup_steps=4, min_lr_ratio=0.1)
    assert [learning_rate(s, 100, cfg) for s in range(4)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3], rel=1e-12)


def test_cosine_decay_from_peak_to_the_floor():
    cfg = OptimizerConfig(lr=2e-3, warmup_steps=10, min_lr_ratio=0.1)
    total = 110
    assert learning_rate(10, total, cfg) == pytest.approx(2e-3, rel=1e-12)  # peak right after warm-up
    middle = learning_rate(60, total, cfg)  # half-way through the decay: (peak + floor) / 2
    assert middle == pytest.approx(2e-3 * (0.1 + 0.9 * 0.5), rel=1e-12)
    assert learning_rate(total, total, cfg) == pytest.approx(2e-4, rel=1e-12)
    assert learning_rate(10 * total, total, cfg) == pytest.approx(2e-4, rel=1e-12), "never below the floor"
    values = [learning_rate(s, total, cfg) for s in range(10, total)]
    assert all(a >= b for a, b in zip(values, values[1:])), "monotone decay"
    s = 37
    expected = 2e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - 10) / 100)))
    assert learning_rate(s, total, cfg) == pytest.approx(expected, rel=1e-12)


def test_no_warmup_starts_at_the_peak():
    cfg = OptimizerConfig(lr=1e-3, warmup_steps=0, min_lr_ratio=0.0)
    assert learning_rate(0, 10, cfg) == pytest.approx(1e-3)
    assert learning_rate(10, 10, cfg) == pytest.approx(0.0, abs=1e-18)


def test_weight_decay_on_matrices_only():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4, bias=True), torch.nn.LayerNorm(4))
    optimizer = build_optimizer(model, OptimizerConfig(weight_decay=0.1))
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert [p.dim() for p in decay["params"]] == [2]
    assert all(p.dim() == 1 for p in no_decay["params"]) and len(no_decay["params"]) == 3
