"""A trained checkpoint in one process, ready for generation and evaluation.

Any checkpoint (whatever layout saved it: its DCP files are read at full size) loads into a model of
tensor-parallel size 1 on the CPU or a GPU, in one process or, for long prompts, over S sequence-parallel
ranks (under torchrun; every rank holds the weights and a chunk of each sequence, and every rank gets the
same logits, samples and results). Inference-time adaptation (docs/DESIGN.md section 2) runs the
step's own inner update on the prompt: the prompt masked at ``memory.prompt_mask_ratio`` is the anchor,
the pre-anchor states follow the training trajectory (scale ``memory.pre_anchor_scale``), the K inner
SGD steps use uniform loss weights, clipping as in training; each sequence gets its own memory, reset
for every prompt.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from common.errors import UsageError
from data_pipeline.masking import MaskedBatch, build_masked_batch
from parallel.checkpoint.manifest import resolve_checkpoint
from parallel.checkpoint.reading import read_weights
from pretrain.config import DiffusionConfig, MemoryConfig, ModelConfig
from pretrain.memdlm.bilevel import BilevelStep
from pretrain.model.fast_weights import FastWeights, build_fast_weight_plan
from pretrain.model.transformer import DiffusionTransformer


@dataclass
class InferenceModel:
    model: DiffusionTransformer  # tensor-parallel size 1, eval mode
    adaptation: BilevelStep  # the step inference-time adaptation runs (``BilevelStep.for_adaptation``)
    tokenizer: Tokenizer | None
    mask_id: int
    eot_id: int | None
    pad_id: int
    vocab_limit: int  # ids at or above it (vocabulary padding) are never generated
    seed: int = 0

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def adapt(self, prompts: list[list[int]], indices: list[int] | None = None) -> FastWeights | None:
        """phi_K for each prompt, each its own memory (reset for every call)."""
        batch = prompt_adaptation_batch(self.adaptation, prompts, indices, self.pad_id, self.seed)
        return self.adaptation.adapt(batch.to(self.device))


def prompt_adaptation_batch(adaptation: BilevelStep, prompts: list[list[int]], indices: list[int] | None,
                            pad_id: int, seed: int = 0) -> MaskedBatch:
    """The prompts, right-padded, as a batch whose anchor masks ``memory.prompt_mask_ratio`` of each
    prompt and whose pre-anchor states follow the training trajectory. Masks come from ``(seed, prompt
    index)``, so a prompt's memory does not depend on the batch it is in."""
    memory = adaptation.memory
    length = max(len(p) for p in prompts)
    ids = np.full((len(prompts), length), pad_id, dtype=np.int64)
    real = np.zeros((len(prompts), length), dtype=bool)
    for row, prompt in enumerate(prompts):
        ids[row, :len(prompt)] = prompt
        real[row, :len(prompt)] = True
    indices = list(range(len(prompts))) if indices is None else indices
    return build_masked_batch(ids, np.asarray(indices), seed=seed, epoch=0, trajectory=memory.trajectory,
                              key_padding_mask=None if real.all() else real, mask_ratio=memory.prompt_mask_ratio)


def adaptation_step(model: DiffusionTransformer, model_cfg: ModelConfig, memory: MemoryConfig,
                    diffusion: DiffusionConfig, mask_id: int, seed: int = 0) -> BilevelStep:
    """The step inference-time adaptation runs in one process (``BilevelStep.for_adaptation``): the trained
    memory settings; a model trained without memory gets them too (adaptation applies to any model)."""
    bilevel = BilevelStep(model, build_fast_weight_plan(model_cfg, memory), memory, diffusion, mask_id)
    return bilevel.for_adaptation(seed)


def load_for_inference(path: str | Path, device: str = "auto", seed: int = 0, verify: bool = True,
                       sequence_parallel_size: int = 1) -> InferenceModel:
    """Tensor-parallel size 1, in one process (a world-size-1 process group is created if there is none) or
    over ``sequence_parallel_size`` ranks (the whole world, under torchrun). The checkpoint's files are checked
    against its manifest first (sha256 too unless ``verify`` is false)."""
    from parallel.layout import check_sequence_split
    from parallel.topology import initialize_topology

    folder = resolve_checkpoint(path, verify_hashes=verify)
    record = json.loads((folder / "config.json").read_text())
    model_cfg = ModelConfig(**record["model"])
    check_sequence_split(sequence_parallel_size, 1, model_cfg.key_value_heads, model_cfg.num_heads)
    topology = initialize_topology(device, sequence_parallel_size=sequence_parallel_size)
    if topology.world_size != sequence_parallel_size:
        raise UsageError(f"inference runs on {sequence_parallel_size} sequence-parallel rank(s) but the world has "
                         f"{topology.world_size}; start as many ranks as --sequence-parallel-size")
    model = DiffusionTransformer(model_cfg).to(topology.device)
    weights = read_weights(folder)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(weights[name])
    model.eval()
    tokens = record.get("tokens", {})
    mask_id = tokens.get("mask_token_id", model_cfg.mask_token_id)
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json")) if (folder / "tokenizer.json").is_file() else None
    vocab = tokenizer.get_vocab_size(with_added_tokens=True) if tokenizer is not None else model_cfg.vocab_size
    adaptation = adaptation_step(model, model_cfg, MemoryConfig(**record["memory"]),
                                 DiffusionConfig(**record["diffusion"]), mask_id, seed)
    pad = tokens.get("pad_token_id")
    return InferenceModel(model, adaptation, tokenizer, mask_id, tokens.get("eot_token_id"),
                          pad if pad is not None else mask_id, min(vocab, model_cfg.vocab_size), seed)
