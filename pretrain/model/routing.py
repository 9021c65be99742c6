"""What the mixture-of-experts layers of a model share about routing: the expert biases of auxiliary-loss-free
balancing, the tokens each expert received in a training step, and the sequence-wise balancing loss.

One ``Routing`` per model (every pipeline stage holds the whole table; a stage's layers use their rows):

- ``bias [MoE layers, E]`` (fp32): added to the router's scores to *choose* experts, never to weight them
  (DeepSeek-V3's and LLaDA2's ``expert_bias``). With ``--model.moe_expert_bias`` it is nudged after every
  applied step by ``moe_bias_update_rate`` toward equal load: ``b_e += rate * sign(mean load - load_e)``, from
  the tokens each expert received in the whole global batch (every micro-batch, data, sequence and pipeline
  rank), so every rank makes the same update. It is carried in checkpoints (``state_dict``).
- ``counts [MoE layers, E]`` (float64): tokens routed to each expert in this step's training passes.
- the sequence-wise balancing loss (``--model.moe_aux_loss_coeff``), per MoE layer and sequence ``s`` of
  ``L_s`` real tokens: ``E / (k L_s) * sum_e c_{s,e} * P_{s,e}``, with ``c_{s,e}`` the tokens of ``s`` routed to
  ``e`` and ``P_{s,e}`` the mean over ``s``'s tokens of ``e``'s normalised score; 1 when balanced. The loss
  of a step is the coefficient times its sum over layers, averaged over the global batch's sequences.
  Being a sum over sequences, it is the same whatever the micro-batches, ranks or sequence chunks.

What is recorded: the passes that train the base model (with grad, not ``frozen``: the anchor pass, and the
tail without fast weights that ``--memory.base_weight`` adds), never an inner-loop, teacher or evaluation
pass, and never a recomputation inside the backward. Padding (``valid``) is never counted.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from parallel.megatron import parallel_state

ROUTING_PART = "routing"  # the name a checkpoint carries the expert biases under


class Routing:
    def __init__(self, cfg, device=None):
        self.cfg = cfg
        self.first = cfg.moe_first_dense_layers
        layers = cfg.num_layers - self.first if cfg.moe_num_experts else 0
        experts = cfg.moe_num_experts
        self.bias = torch.zeros(layers, experts, dtype=torch.float32, device=device)
        self.counts = torch.zeros(layers, experts, dtype=torch.float64, device=device)
        self.aux_value = torch.zeros((), dtype=torch.float64, device=device)
        self.aux_terms: list[torch.Tensor] = []
        self.valid: torch.Tensor | None = None  # [tokens] of the pass being recorded: true on real tokens
        self.num_sequences: torch.Tensor | None = None  # the global batch's sequences (the loss's divisor)
        self.sequence_group = None

    def to(self, device) -> "Routing":
        self.bias, self.counts, self.aux_value = (t.to(device) for t in (self.bias, self.counts, self.aux_value))
        return self

    def slot(self, layer: int) -> int:
        return layer - self.first

    # -- a training pass -----------------------------------------------------------------------------
    def begin_pass(self, valid: torch.Tensor | None, num_sequences: torch.Tensor | None) -> None:
        """``valid [b, l]``: this rank's tokens of the pass (``None``: all real)."""
        self.valid = valid.reshape(-1) if valid is not None else None
        self.num_sequences = num_sequences

    def end_pass(self) -> torch.Tensor | None:
        """The pass's balancing loss (attached; ``None`` when off), and forget the pass."""
        self.valid, self.num_sequences = None, None
        terms, self.aux_terms = self.aux_terms, []
        return torch.stack(terms).sum() if terms else None

    @staticmethod
    def records(frozen: bool) -> bool:
        """Whether a layer called now is in a pass that trains the base model (see the module docstring)."""
        return torch.is_grad_enabled() and not frozen and torch._C._current_graph_task_id() == -1

    def record(self, layer: int, scores: torch.Tensor, chosen: torch.Tensor, batch: int) -> None:
        """One MoE layer's routing of ``[T = batch * l, E]`` scores to ``chosen [T, k]`` experts."""
        experts = scores.shape[1]
        valid = self.valid if self.valid is not None and self.valid.numel() == chosen.shape[0] else None
        counted = chosen if valid is None else chosen[valid]
        self.counts[self.slot(layer)] += torch.bincount(counted.reshape(-1), minlength=experts).to(self.counts)
        coeff = self.cfg.moe_aux_loss_coeff
        if coeff <= 0 or self.num_sequences is None:
            return
        hits = torch.zeros_like(scores, dtype=torch.float64).scatter_(1, chosen, 1.0)  # [T, E]
        if valid is not None:
            hits = hits * valid[:, None]
        per_sequence = hits.view(batch, -1, experts).sum(dim=1)  # c [b, E]
        real = (valid.view(batch, -1).sum(dim=1) if valid is not None
                else torch.full((batch,), float(hits.shape[0] // batch), device=hits.device)).double()
        if self.sequence_group is not None:  # counts of the whole sequences
            both = torch.cat([per_sequence, real[:, None]], dim=1)
            dist.all_reduce(both, group=self.sequence_group)
            per_sequence, real = both[:, :experts], both[:, experts]
        probs = scores / scores.sum(dim=-1, keepdim=True) if self.cfg.moe_score == "sigmoid" else scores
        if valid is not None:
            probs = probs * valid[:, None]
        prob_sums = probs.view(batch, -1, experts).sum(dim=1)  # this rank's share of sum_t p [b, E]
        k = self.cfg.moe_top_k
        per_seq = (per_sequence.to(prob_sums.dtype) * prob_sums).sum(dim=1) * experts / (
            k * real.clamp_min(1).to(prob_sums.dtype) ** 2)
        term = coeff * per_seq.sum() / self.num_sequences.to(per_seq.dtype)
        self.aux_value += term.detach().double().to(self.aux_value.device)
        # Tensor-parallel ranks compute the same term, and its gradient to the router (and the input) passes a
        # copy whose backward sums over them: each rank back-propagates its 1/tp share.
        self.aux_terms.append(term / parallel_state.get_tensor_model_parallel_world_size())

    # -- the end of a training step ------------------------------------------------------------------
    def finish_step(self, groups, applied: bool) -> torch.Tensor | None:
        """Sum the step's counts (and balancing loss) over ``groups`` (data, sequence and pipeline ranks), update
        the biases when the step was applied, reset. Returns ``[MoE layers, 4]`` (load min / mean, load max /
        mean, entropy of the load / log E, mean |bias|) and the step's balancing loss in a last row, on the
        device; ``None`` without MoE layers."""
        if self.counts.numel() == 0:
            return None
        summed = torch.cat([self.counts.reshape(-1), self.aux_value.reshape(1)])
        for group in groups:
            if group is not None and dist.get_world_size(group) > 1:
                dist.all_reduce(summed, group=group)
        counts = summed[:-1].view_as(self.counts)
        if applied and self.cfg.moe_expert_bias:
            mean = counts.mean(dim=1, keepdim=True)
            self.bias += (self.cfg.moe_bias_update_rate * torch.sign(mean - counts)).to(self.bias.dtype)
        share = counts / counts.sum(dim=1, keepdim=True).clamp_min(1)
        entropy = -(share * share.clamp_min(1e-30).log()).sum(dim=1) / math.log(max(2, counts.shape[1]))
        mean = counts.mean(dim=1).clamp_min(1e-30)
        table = torch.stack([counts.min(dim=1).values / mean, counts.max(dim=1).values / mean, entropy,
                             self.bias.double().abs().mean(dim=1)], dim=1)
        self.counts.zero_()
        aux = summed[-1:].expand(1, 4)
        self.aux_value.zero_()
        return torch.cat([table, aux])

    def describe(self, table: torch.Tensor) -> dict:
        """``finish_step``'s table as the metrics record's ``moe`` entry (a host read)."""
        rows = table.tolist()
        record = {f"layer_{self.first + i}": {"load_min": r[0], "load_max": r[1], "load_entropy": r[2],
                                              "bias_abs_mean": r[3]} for i, r in enumerate(rows[:-1])}
        if self.cfg.moe_aux_loss_coeff > 0:
            record["aux_loss"] = rows[-1][0]
        return record

    # -- checkpoints (a registered part: JSON values, the same on every rank) ---------------------------
    def state_dict(self) -> dict:
        return {"expert_bias": self.bias.cpu().tolist()}

    def load_state_dict(self, state: dict) -> None:
        bias = torch.tensor(state.get("expert_bias", []), dtype=torch.float32)
        if bias.numel() and bias.shape != self.bias.shape:
            raise ValueError(f"the checkpoint's expert biases are {tuple(bias.shape)} but this model has "
                             f"{tuple(self.bias.shape)} (MoE layers x experts); resume with the same MoE shape")
        if bias.numel():
            self.bias.copy_(bias.to(self.bias.device))
