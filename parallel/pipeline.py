"""Pipeline parallelism for the bi-level step on ``torch.distributed.pipelining``.

Per optimizer step, with M micro-batches per data-parallel rank (DESIGN.md section 5):

1. Pre-anchor sweep (forward only): for each micro-batch and each pre-anchor state, stage 0
   embeds the noisier ids, every stage runs its layers under ``no_grad`` and sends the
   activations on; the last stage, which holds every fast-weight layer, runs its prefix blocks
   and takes the inner SGD step(s) locally. The result is kept in one fast-weight slot per
   micro-batch.
2. Anchor pass: a 1F1B (or GPipe) schedule over the anchor states. The last stage's forward
   runs its prefix blocks with grad, the last inner step on a detached copy (its
   ``torch.autograd.grad`` stays inside that forward), then the outer tail with ``phi_K``
   detached, and returns the micro-batch's share of the global MDLM loss.
3. Gradients: summed over micro-batches (the schedule's own averaging is off), all-reduced
   over the data-parallel group when there is one (ZeRO 0), clipped on the global norm
   (tensor shards and stages counted once each), then AdamW.

Every stage reads what it needs of a micro-batch (ids, masks) from the batch that was
broadcast to the whole model replica, never from pipeline messages, so only activations and
their gradients travel between stages.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from parallel.collectives import gather_full_state, grad_norm_and_clip, sum_over
from parallel.engine import LocalEngine, StepStats, begin_step
from pretrain.objective import inner_sequence_scale, outer_sequence_scale, row_targets


class StageModule(nn.Module):
    """One pipeline stage of the bi-level step; ``forward`` is what the schedule calls."""

    def __init__(self, engine: "PipelineEngine"):
        super().__init__()
        self.engine = engine
        self.model = engine.model
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        engine, model = self.engine, self.model
        index = self.calls
        self.calls += 1
        batch = engine.current[index]
        attention = batch.attention_mask(engine.step_fn.within_documents)
        h = model.embedding(x) if model.has_embedding else x
        if not model.has_head:
            return model.run_blocks(h, engine.first_block, engine.last_block, attention)
        return engine.last_stage_loss(h, index, attention)


class PipelineEngine(LocalEngine):
    """``LocalEngine``'s optimizer and its saving, with the pipelined step."""

    def __init__(self, model, step_fn, cfg, topology, autocast):
        super().__init__(model, step_fn, cfg, topology, autocast)
        layers = model.layer_range
        self.first_block, self.last_block = 2 * layers.start, 2 * layers.stop
        plan = step_fn.plan
        self.boundary = plan.boundary_block if plan is not None else model.num_blocks
        self.group = topology.pipeline_parallel_group
        self.stage_index = topology.pipeline_parallel_rank
        self.num_stages = topology.pipeline_parallel_size
        ranks = dist.get_process_group_ranks(self.group)
        self.previous = ranks[self.stage_index - 1] if self.stage_index > 0 else None
        self.next = ranks[self.stage_index + 1] if self.stage_index < self.num_stages - 1 else None
        self.stage_module = StageModule(self)
        self.current = []
        self._built = None  # (micro-batch count, schedule)

    # -- the last stage's part of the bi-level step ---------------------------------------------
    def last_stage_loss(self, h, index: int, attention) -> torch.Tensor:
        step_fn, model, batch = self.step_fn, self.model, self.current[index]
        ids, anchor = batch.input_ids, batch.anchor_mask
        with self.autocast():
            h = model.run_blocks(h, self.first_block, self.boundary, attention)
            outer_scale = outer_sequence_scale(batch.t, batch.maskable, self.cfg.diffusion, self.normalizer)
            targets, row_scale = row_targets(ids, anchor, outer_scale)
            if step_fn.plan is None:
                loss = model.tail_loss(h, self.boundary, anchor, targets, row_scale, attention)
            else:
                entry = model.block_entry(h, self.boundary)
                last = self.cfg.memory.num_inner_steps - 1
                fast = self._inner_update(self.slots[index], h.detach(), anchor, batch, attention, last,
                                          entry.detach())
                loss = model.tail_loss(h, self.boundary, anchor, targets, row_scale, attention, fast.detach(),
                                       entry=entry)
        self.stats[0] += loss.detach().double()
        return loss.reshape(1)

    def _inner_update(self, fast, h, state, batch, attention, inner_index: int, entry=None):
        """One inner SGD step of a micro-batch's fast weights on the last stage (``inner_index``: which)."""
        step_fn = self.step_fn
        scale = inner_sequence_scale(state, batch.maskable, step_fn.memory.inner_loss_weight)
        targets, row_scale = row_targets(batch.input_ids, state, scale)
        with torch.enable_grad():
            loss = self.model.tail_loss(h, self.boundary, state, targets, row_scale, attention, fast,
                                        frozen=True, entry=entry)
            grads = torch.autograd.grad(loss, fast.leaves(), materialize_grads=True)
        self.stats[1 + inner_index] += loss.detach().double()
        return step_fn.plan.sgd_step(fast, list(grads))

    # -- pre-anchor sweep ---------------------------------------------------------------------
    def _activation_shape(self):
        return (self.cfg.train.micro_batch_size, self.cfg.model.seq_len, self.cfg.model.hidden_size)

    @torch.no_grad()
    def _pre_anchor_sweep(self, step: int) -> None:
        """Forward-only passes of the pre-anchor states; the last stage keeps phi_{K-1} per micro-batch."""
        step_fn, model = self.step_fn, self.model
        mask_id = step_fn.mask_token_id
        self.slots = []
        dtype = next(model.parameters()).dtype
        for batch in self.current:
            attention = batch.attention_mask(step_fn.within_documents)
            fast = None
            if model.has_head:
                fast = step_fn.plan.initial(batch.num_sequences, self.cfg.train.seed, step, self.topology.device,
                                            dtype)
            for inner_index, state in enumerate(batch.pre_anchor_masks):
                if self.previous is None:
                    h = model.embedding(torch.where(state, mask_id, batch.input_ids))
                else:
                    h = torch.empty(self._activation_shape(), dtype=dtype, device=self.topology.device)
                    dist.recv(h, src=self.previous, group=self.group)
                with self.autocast():
                    end = self.boundary if model.has_head else self.last_block
                    h = model.run_blocks(h, self.first_block, end, attention)
                if self.next is not None:
                    dist.send(h.contiguous().to(dtype), dst=self.next, group=self.group)
                else:
                    with self.autocast():
                        fast = self._inner_update(fast, h, state, batch, attention, inner_index)
            self.slots.append(fast)

    # -- one optimizer step --------------------------------------------------------------------
    def train_step(self, micro_batches, step: int, lr: float) -> StepStats:
        topology, cfg = self.topology, self.cfg
        self.normalizer, self.stats = begin_step(micro_batches, self.optimizer, lr, cfg, topology)
        self.current = micro_batches
        if self.step_fn.plan is not None:
            self._pre_anchor_sweep(step)
        self._run_schedule(micro_batches)
        self._reduce_gradients()
        params = [p for p in self.model.parameters() if p.grad is not None]
        grad_norm = grad_norm_and_clip(params, cfg.optim.grad_clip, topology.tensor_parallel_group, self.group)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        # The losses live on the last stage: share them with the whole replica, then the data ranks.
        sum_over(self.stats, self.group)
        sum_over(self.stats, topology.data_parallel_group)
        return StepStats.from_sums(self.stats, self.normalizer, cfg.memory.enabled, grad_norm)

    def _schedule(self, num_micro_batches: int):
        """The stage and its schedule, built on first use (shapes and counts are fixed for a run)."""
        if self._built is not None and self._built[0] == num_micro_batches:
            return self._built[1]
        device = self.topology.device
        dtype = next(self.model.parameters()).dtype
        b, l, hidden = self._activation_shape()
        if self.previous is None:
            example_in = torch.zeros(b, l, dtype=torch.long, device=device)
        else:
            # requires_grad marks the activations whose gradient this stage sends back.
            example_in = torch.zeros(b, l, hidden, dtype=dtype, device=device, requires_grad=True)
        example_out = (torch.zeros(1, dtype=torch.float32, device=device, requires_grad=True) if self.next is None
                       else torch.zeros(b, l, hidden, dtype=dtype, device=device, requires_grad=True))
        stage = PipelineStage(self.stage_module, self.stage_index, self.num_stages, device,
                              input_args=(example_in,), output_args=(example_out,), group=self.group)
        schedule_cls = Schedule1F1B if self.cfg.parallel.pipeline_schedule == "1f1b" else ScheduleGPipe
        schedule = schedule_cls(stage, num_micro_batches, loss_fn=_identity_loss, scale_grads=False)
        self._built = (num_micro_batches, schedule)
        return schedule

    def _run_schedule(self, micro_batches) -> None:
        schedule = self._schedule(len(micro_batches))
        self.stage_module.calls = 0
        mask_id = self.step_fn.mask_token_id
        if self.previous is None:
            inputs = [(torch.where(mb.anchor_mask, mask_id, mb.input_ids),) for mb in micro_batches]
            schedule.step(arg_mbs=inputs)
        elif self.next is None:
            schedule.step(target_mbs=[None] * len(micro_batches))
        else:
            schedule.step()

    def _reduce_gradients(self) -> None:
        group = self.topology.data_parallel_group
        if dist.get_world_size(group) == 1:
            return
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=group)  # losses are global-batch shares: the sum is the gradient
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    # -- checkpoints ----------------------------------------------------------------------------
    def full_state(self):
        return gather_full_state(self.model, self.topology.tensor_parallel_group, self.group)


def _identity_loss(output, target):
    return output.sum()

