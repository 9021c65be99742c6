"""The MDLM loss and the inner losses, as per-sequence weights on a masked cross entropy.

Every loss here is ``sum over masked rows of scale[sequence] * CE(logits, x0)`` (the model's
fused head computes it on the rows ``pretrain.model.rows.select_rows`` gathers); only the per-sequence scale differs:
- outer (MDLM): ``w(t_i) / Z`` with ``Z`` from the *global* batch (token, sequence or batch
  normalisation), so cutting the global batch into micro-batches or ranks changes nothing;
- inner: ``w(r_i) / N_i`` where ``N_i`` is the number of masked tokens of sequence ``i`` in that
  state and ``r_i = N_i / n_i`` its masked ratio; each sequence's loss only involves itself.
"""

from __future__ import annotations

import torch

from parallel.collectives import LossNormalizer
from pretrain.config import DiffusionConfig


def outer_sequence_scale(
    t: torch.Tensor, maskable: torch.Tensor, cfg: DiffusionConfig, normalizer: LossNormalizer
) -> torch.Tensor:
    """``[b]`` scale of each sequence's masked-token cross entropies in the MDLM loss."""
    weight = 1.0 / t if cfg.loss_weight == "inverse_t" else torch.ones_like(t)
    if cfg.normalization == "token":
        return weight / normalizer.num_maskable.clamp_min(1)
    if cfg.normalization == "batch":
        return weight / normalizer.num_sequences
    per_sequence = maskable.sum(dim=1).to(weight.dtype)
    return torch.where(per_sequence > 0, weight / per_sequence.clamp_min(1), 0.0) / normalizer.num_sequences


def inner_sequence_weight(memory, trajectory, step, state_mask: torch.Tensor, pool: torch.Tensor,
                          t: torch.Tensor) -> torch.Tensor:
    """``[b]`` weight ``w(t_i)`` of an inner step's loss per sequence (the caller divides by the positions it
    scores). ``t_i``: the state's masked ratio (pmc, pre_only), the sampled anchor ``t`` (no_progressive)
    or the scheduled ratio (progressive_memory); ``w = 1 / t``, or 1 with uniform weights. With
    ``reference_compat`` ``w = 1 / (float32 t + 1e-6)``, as the reference code computes it."""
    num_masked = state_mask.sum(dim=1).to(torch.float64)
    if memory.inner_loss_weight == "uniform":
        return torch.ones_like(num_masked)
    num_pool = pool.sum(dim=1).to(torch.float64)
    if trajectory.strategy == "no_progressive":
        ratio = t.to(torch.float64)
    elif trajectory.strategy == "progressive_memory":
        ratio = torch.full_like(num_masked, step.ratio)
    else:
        if not memory.reference_compat:
            return num_pool / num_masked.clamp_min(1)  # 1 / r_i, exactly
        ratio = num_masked.float() / num_pool.clamp_min(1).float()
    if memory.reference_compat:
        return (1.0 / (ratio.float() + 1e-6)).to(torch.float64)
    return 1.0 / ratio


def distill_row_loss(memory, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``[n]`` distillation loss per scored row: KL(teacher || student) (``distill``), KL(student || teacher)
    (``distill_reverse``) over the vocabulary at ``distill_temperature`` (no T^2 factor), or the mean
    squared / cosine distance of hidden states (``distill_hidden``)."""
    student = student.to(torch.promote_types(student.dtype, torch.float32))
    teacher = teacher.to(student.dtype)
    if memory.inner_loss == "distill_hidden":
        if memory.distill_hidden_type == "cosine":
            return 1.0 - torch.nn.functional.cosine_similarity(student, teacher, dim=-1)
        return (student - teacher).pow(2).mean(dim=-1)
    temperature = memory.distill_temperature
    log_student = (student / temperature).log_softmax(dim=-1)
    log_teacher = (teacher / temperature).log_softmax(dim=-1)
    if memory.inner_loss == "distill":
        return (log_teacher.exp() * (log_teacher - log_student)).sum(dim=-1)
    return (log_student.exp() * (log_student - log_teacher)).sum(dim=-1)
