"""One model replica on this rank (optionally split by tensor parallelism), no data parallelism:
each micro-batch's loss is back-propagated in turn, then one clipped AdamW step."""

from __future__ import annotations

from parallel.engines.base import EngineBase, add_output
from parallel.engines.contract import EngineOptions, EvalFunction, StepFunction
from parallel.engines.outer_optimizer import OuterOptimizer
from parallel.engines.step_guard import StepGuard


class LocalEngine(EngineBase):
    def __init__(self, model, step_fn: StepFunction, optimizer: OuterOptimizer, options: EngineOptions, topology,
                 evaluator: EvalFunction | None = None, guard: StepGuard | None = None):
        super().__init__(model, options, topology, step_fn.num_inner_steps, evaluator, guard)
        self.step_fn = step_fn
        self.optimizer = optimizer

    def forward_backward(self, micro_batches, normalizer, step, sums) -> None:
        for micro_batch in micro_batches:
            output = self.step_fn(micro_batch, normalizer, step)
            output.loss.backward()
            add_output(sums, output, self.options)
