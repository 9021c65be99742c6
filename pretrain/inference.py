"""A trained checkpoint in one process, ready for generation and evaluation.

Any checkpoint (whatever layout saved it: its DCP files are read at full size) loads into a model of
tensor-parallel size 1 on the CPU or a GPU. Inference-time adaptation (DESIGN.md section 2) runs the
step's own inner update on the prompt: the prompt masked at ``memory.prompt_mask_ratio`` is the anchor,
the pre-anchor states follow the training trajectory (scale ``memory.pre_anchor_scale``), the K inner
SGD steps use uniform loss weights, clipping as in training; each sequence gets its own memory, reset
for every prompt.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from data_pipeline.errors import UsageError
from data_pipeline.masking import MaskedBatch, build_masked_batch
from pretrain.bilevel import BilevelStep
from pretrain.checkpoint import LATEST, check_checkpoint, read_weights
from pretrain.config import DiffusionConfig, MemoryConfig, ModelConfig
from pretrain.fast_weights import FastWeights, build_fast_weight_plan
from pretrain.model import DiffusionTransformer


@dataclass
class InferenceModel:
    model: DiffusionTransformer  # tensor-parallel size 1, eval mode
    adapter: BilevelStep  # the step with uniform inner weights: what inference-time adaptation runs
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
        batch = prompt_adaptation_batch(self.adapter, prompts, indices, self.pad_id, self.seed)
        return self.adapter.adapt(batch.to(self.device))


def prompt_adaptation_batch(adapter: BilevelStep, prompts: list[list[int]], indices: list[int] | None,
                            pad_id: int, seed: int = 0) -> MaskedBatch:
    """The prompts, right-padded, as a batch whose anchor masks ``memory.prompt_mask_ratio`` of each
    prompt and whose pre-anchor states follow the training trajectory. Masks come from ``(seed, prompt
    index)``, so a prompt's memory does not depend on the batch it is in."""
    memory = adapter.memory
    length = max(len(p) for p in prompts)
    ids = np.full((len(prompts), length), pad_id, dtype=np.int64)
    real = np.zeros((len(prompts), length), dtype=bool)
    for row, prompt in enumerate(prompts):
        ids[row, :len(prompt)] = prompt
        real[row, :len(prompt)] = True
    indices = list(range(len(prompts))) if indices is None else indices
    return build_masked_batch(ids, np.asarray(indices), seed=seed, epoch=0, num_inner_steps=memory.num_inner_steps,
                              pre_anchor_scale=memory.pre_anchor_scale, key_padding_mask=None if real.all() else real,
                              mask_ratio=memory.prompt_mask_ratio)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run directory's newest complete checkpoint."""
    path = Path(path)
    if (path / "checkpoints" / LATEST).is_file():
        path = path / "checkpoints" / (path / "checkpoints" / LATEST).read_text().strip()
    if not path.is_dir():
        raise UsageError(f"{path} is neither a checkpoint folder nor a run directory with checkpoints/latest")
    problem = check_checkpoint(path, verify_hashes=False)
    if problem is not None:
        raise UsageError(f"{path} is not a usable checkpoint: {problem}")
    return path


def inference_adapter(model: DiffusionTransformer, model_cfg: ModelConfig, memory: MemoryConfig,
                      diffusion: DiffusionConfig, mask_id: int, seed: int = 0) -> BilevelStep:
    """The step that inference-time adaptation runs in one process: the trained memory settings (a model
    trained without memory gets them too: adaptation applies to any model), uniform inner weights."""
    memory = dataclasses.replace(memory, enabled=True, inner_loss_weight="uniform")
    return BilevelStep(model, build_fast_weight_plan(model_cfg, memory), memory, diffusion, mask_id, seed=seed)


def load_for_inference(path: str | Path, device: str = "auto", seed: int = 0) -> InferenceModel:
    """One process, tensor-parallel size 1 (a world-size-1 process group is created if there is none)."""
    from parallel.topology import initialize_topology

    folder = resolve_checkpoint(path)
    record = json.loads((folder / "config.json").read_text())
    model_cfg = ModelConfig(**record["model"])
    topology = initialize_topology(device)
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
    adapter = inference_adapter(model, model_cfg, MemoryConfig(**record["memory"]), DiffusionConfig(**record["diffusion"]),
                            mask_id, seed)
    pad = tokens.get("pad_token_id")
    return InferenceModel(model, adapter, tokenizer, mask_id, tokens.get("eot_token_id"),
                          pad if pad is not None else mask_id, min(vocab, model_cfg.vocab_size), seed)
