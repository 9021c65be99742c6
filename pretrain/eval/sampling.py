"""MDLM / LLaDA-style generation: start from the prompt plus ``length`` mask tokens and unmask them over
``steps`` denoising steps.

At each step the model predicts every masked position (full bidirectional attention); a token is drawn
for each (greedy at temperature 0, else sampled after temperature, top-k and top-p), and of the masked
positions of the current block the ``n`` with the highest confidence (the drawn token's probability;
or uniformly random ones with ``remasking="random"``) keep their token while the rest stay masked.
``n`` follows LLaDA's schedule: the block's masked count spread evenly over its steps, the remainder on
the first steps. Semi-autoregressive blocks (``block_length``) are filled left to right; attention
stays bidirectional over the whole sequence throughout.

Batches of prompts of different lengths are padded right (the default; every sequence keeps positions
``0..l-1``) or left (RoPE positions then count from each sequence's first real token); padding is never
attended. All randomness comes from one generator per sequence seeded from ``(seed, prompt index)``, so
a prompt generates the same text alone or in a batch.
"""

from __future__ import annotations

import hashlib

import torch

from pretrain.eval.generation_config import GenerationConfig
from pretrain.model.fast_weights import FastWeights


def transfer_schedule(masked: int, steps: int) -> list[int]:
    """How many of ``masked`` positions to unmask at each of ``steps`` steps (LLaDA's schedule)."""
    base, remainder = divmod(masked, steps)
    return [base + (1 if step < remainder else 0) for step in range(steps)]


def _generator(seed: int, index: int, device) -> torch.Generator:
    value = int.from_bytes(hashlib.sha256(f"generate:{seed}:{index}".encode()).digest()[:8], "little") >> 1
    return torch.Generator(device=device).manual_seed(value)


def _filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Top-k and nucleus filtering of ``[n, V]`` logits (the rest set to -inf)."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) > top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


@torch.no_grad()
def generate(model, prompts: list[list[int]], cfg: GenerationConfig, mask_id: int, pad_id: int,
             eot_id: int | None = None, vocab_limit: int | None = None, fast: FastWeights | None = None,
             indices: list[int] | None = None) -> list[list[int]]:
    """The generated tokens of each prompt (without the prompt). ``fast``: per-sequence fast weights
    (inference-time adaptation); ``indices``: each prompt's index for its random stream."""
    cfg.check()
    device = next(model.parameters()).device
    b = len(prompts)
    indices = list(range(b)) if indices is None else indices
    lengths = [len(p) for p in prompts]
    total = max(lengths) + cfg.length
    x = torch.full((b, total), pad_id, dtype=torch.long, device=device)
    real = torch.zeros(b, total, dtype=torch.bool, device=device)
    starts = []  # where each sequence's answer starts
    for row, prompt in enumerate(prompts):
        offset = total - lengths[row] - cfg.length if cfg.padding_side == "left" else 0
        x[row, offset:offset + lengths[row]] = torch.tensor(prompt, dtype=torch.long, device=device)
        x[row, offset + lengths[row]:offset + lengths[row] + cfg.length] = mask_id
        real[row, offset:offset + lengths[row] + cfg.length] = True
        starts.append(offset + lengths[row])
    positions = (real.long().cumsum(dim=1) - 1).clamp_min(0) if cfg.padding_side == "left" else None
    attention = None if bool(real.all()) else real
    generators = [_generator(cfg.seed, index, device) for index in indices]
    block = cfg.block_length or cfg.length
    steps_per_block = cfg.steps // (cfg.length // block)
    limit = vocab_limit or None
    for block_start in range(0, cfg.length, block):
        in_block = torch.zeros(b, total, dtype=torch.bool, device=device)
        for row, start in enumerate(starts):
            in_block[row, start + block_start:start + block_start + block] = True
        schedule = [transfer_schedule(block, steps_per_block) for _ in range(b)]
        for step in range(steps_per_block):
            masked = (x == mask_id) & in_block
            logits = model(x, attention_mask=attention, fast=fast, positions=positions).float()  # [b, l, V]
            logits[..., mask_id] = float("-inf")  # never predict the mask itself, nor vocabulary padding
            if limit is not None and limit < logits.shape[-1]:
                logits[..., limit:] = float("-inf")
            for row in range(b):
                rows = masked[row].nonzero().squeeze(1)
                count = min(schedule[row][step], rows.numel())
                if count == 0:
                    continue
                row_logits = logits[row, rows]
                if cfg.temperature > 0:
                    filtered = _filter(row_logits / cfg.temperature, cfg.top_k, cfg.top_p)
                    probabilities = filtered.softmax(-1)
                    tokens = torch.multinomial(probabilities, 1, generator=generators[row]).squeeze(1)
                else:
                    probabilities = row_logits.softmax(-1)
                    tokens = row_logits.argmax(-1)
                if cfg.remasking == "low_confidence":
                    confidence = probabilities.gather(1, tokens[:, None]).squeeze(1)
                else:
                    confidence = torch.rand(rows.numel(), generator=generators[row], device=device)
                keep = torch.topk(confidence, count).indices
                x[row, rows[keep]] = tokens[keep]
    out = []
    for row, start in enumerate(starts):
        answer = x[row, start:start + cfg.length].tolist()
        if cfg.stop_at_eot and eot_id is not None and eot_id in answer:
            answer = answer[:answer.index(eot_id)]
        out.append(answer)
    return out
