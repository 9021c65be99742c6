"""A tiny float64 model and the inference-time adaptation step on it (generation and evaluation tests)."""

from __future__ import annotations

import torch

from pretrain.config import DiffusionConfig, MemoryConfig, ModelConfig
from pretrain.eval.inference import adaptation_step
from pretrain.model.transformer import DiffusionTransformer

MASK, PAD, VOCAB = 30, 31, 32
TINY_MODEL = ModelConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=2, ffn_hidden_size=40,
                         seq_len=48)


def tiny_model(seed: int = 0) -> DiffusionTransformer:
    torch.manual_seed(seed)
    model = DiffusionTransformer(TINY_MODEL, dtype=torch.float64, seed=seed)
    with torch.no_grad():  # a spread of logits, so that greedy choices are clear-cut
        model.lm_head.weight.mul_(20)
    return model


def tiny_adaptation(model: DiffusionTransformer, **memory):
    """The adaptation step (``BilevelStep.for_adaptation``, the one way it is built) with ``memory`` settings."""
    return adaptation_step(model, TINY_MODEL, MemoryConfig(layer_fraction=0.5, **memory), DiffusionConfig(), MASK,
                           seed=0)
