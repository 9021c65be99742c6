"""The inner loop's trajectory: which masked states its steps run on, in which order, and which positions
each inner loss scores (the masking strategies and loss masks of the MemDLM reference code).

The loader builds the states (``masking.build_masked_batch``: ``MaskedBatch.inner_masks``) and counts each
step's scored positions on the host; the step (``pretrain.memdlm.bilevel``) walks the same trajectory. Per
strategy, with K = ``num_inner_steps``:

- ``pmc`` (the paper's "anchor-consistent trajectory", the default): K-1 pre-anchor states, noisiest first
  (each a superset of the anchor), then the anchor itself; the last inner step runs on exactly the input and
  positions the outer loss then scores. With K = 1, as in the reference, one step on the pre-anchor state.
- ``pre_only``: one step on the pre-anchor state (K must be 1); its "next" state is the anchor.
- ``no_progressive``: one step on the anchor (K must be 1), weighted by the sampled ``t``.
- ``progressive_memory``: K states independent of the anchor: a Bernoulli(0.8) mask (``prompt_mask_ratio``
  when K = 1), then reveals down to ``int(n * ratio(s))`` masked, ``ratio(s) = 0.8 + (p - 0.8) s / (K - 1)``;
  each step weighted by ``ratio(s)``.

Loss masks: ``student_masked`` scores every position masked in the step's input; ``newly_revealed`` only
those revealed in the next state (a step without a next state falls back to all). ``leak_free`` (not in the
reference) removes the positions the outer loss scores from every inner loss, so the outer loss never scores a
target the inner loop trained on; an inner step left with nothing to score (pmc's anchor step) is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

STRATEGIES = ("pmc", "progressive_memory", "pre_only", "no_progressive")
STRATEGY_ALIASES = {"progressive_memory_consistent": "pmc"}
LOSS_MASKS = ("student_masked", "newly_revealed")
PAD_MODES = ("both", "inner", "none")
ANCHOR = -1  # an inner step on (or whose next state is) the anchor state
NO_NEXT = -2  # a step without a next state: a distillation teacher sees the clean sequence


@dataclass(frozen=True)
class InnerStep:
    state: int  # index into ``MaskedBatch.inner_masks``, or ``ANCHOR``
    next: int  # the next state: an index, ``ANCHOR`` or ``NO_NEXT``
    ratio: float | None = None  # progressive_memory: the step's scheduled masked ratio (its loss weight's t)


@dataclass(frozen=True)
class TrajectorySpec:
    strategy: str = "pre_only"  # the defaults of MemoryConfig
    num_inner_steps: int = 1
    pre_anchor_scale: float = 1.5
    prompt_mask_ratio: float = 0.2
    loss_mask: str = "student_masked"
    leak_free: bool = False
    pad_mode: str = "both"

    @property
    def num_states(self) -> int:
        """Inner masks a batch carries (``MaskedBatch.inner_masks``)."""
        return {"pmc": max(self.num_inner_steps - 1, 1), "pre_only": 1, "no_progressive": 0,
                "progressive_memory": self.num_inner_steps}[self.strategy]

    def schedule_ratio(self, step: int) -> float:
        """progressive_memory's masked ratio at step ``step``, in the reference's double arithmetic."""
        k, p = self.num_inner_steps, self.prompt_mask_ratio
        return 0.8 + (p - 0.8) * step / (k - 1) if k > 1 else p

    def steps(self) -> list[InnerStep]:
        """One epoch of inner steps, in order."""
        k, strategy = self.num_inner_steps, self.strategy
        if strategy == "pmc" and k == 1:  # the reference's one step on the pre-anchor state, with no next state
            steps = [InnerStep(0, NO_NEXT)]
        elif strategy == "pmc":
            steps = [InnerStep(j, j + 1 if j < k - 2 else ANCHOR) for j in range(k - 1)]
            steps.append(InnerStep(ANCHOR, NO_NEXT))
        elif strategy == "pre_only":
            steps = [InnerStep(0, ANCHOR)]
        elif strategy == "no_progressive":
            steps = [InnerStep(ANCHOR, NO_NEXT)]
        else:
            steps = [InnerStep(j, j + 1 if j < k - 1 else NO_NEXT, self.schedule_ratio(j)) for j in range(k)]
        if self.leak_free:  # an anchor step would score nothing but the outer loss's own positions
            steps = [s for s in steps if s.state != ANCHOR]
        return steps

    def mask_of(self, state: int, inner_masks, inner_anchor):
        return inner_anchor if state == ANCHOR else inner_masks[state]

    def loss_mask_of(self, step: InnerStep, inner_masks, inner_anchor, outer_anchor):
        """The positions the inner loss of ``step`` scores (NumPy arrays or torch tensors alike)."""
        scored = self.mask_of(step.state, inner_masks, inner_anchor)
        if self.loss_mask == "newly_revealed" and step.next != NO_NEXT:
            scored = scored & ~self.mask_of(step.next, inner_masks, inner_anchor)
        if self.leak_free:
            scored = scored & ~outer_anchor
        return scored
