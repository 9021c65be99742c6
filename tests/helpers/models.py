"""A tiny float64 model and the inference-time adaptation step on it (generation and evaluation tests)."""

from __future__ import annotations

import dataclasses

import torch

from pretrain.config import DiffusionConfig, MemoryConfig, ModelConfig
from pretrain.eval.inference import adaptation_step
from pretrain.model.transformer import DiffusionTransformer

MASK, PAD, VOCAB = 30, 31, 32
TINY_MODEL = ModelConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=2, ffn_hidden_size=40,
                         seq_len=48)


def tiny_model(seed: int = 0, **options) -> DiffusionTransformer:
    """The tiny model (``options``: ModelConfig fields to change, e.g. the family options)."""
    torch.manual_seed(seed)
    model = DiffusionTransformer(dataclasses.replace(TINY_MODEL, **options), dtype=torch.float64, seed=seed)
    with torch.no_grad():  # a spread of logits, so that greedy choices are clear-cut
        model.lm_head.weight.mul_(20)
    return model


def tiny_adaptation(model: DiffusionTransformer, **memory):
    """The adaptation step (``BilevelStep.for_adaptation``, the one way it is built) with ``memory`` settings."""
    return adaptation_step(model, model.cfg, MemoryConfig(layer_fraction=0.5, **memory), DiffusionConfig(), MASK,
                           seed=0)
