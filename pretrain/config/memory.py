"""The diffusion objective (``--diffusion.*``) and MemDLM's memory: where fast weights go and how the inner
loop writes them (``--memory.*``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from data_pipeline.trajectory import STRATEGY_ALIASES, TrajectorySpec
from pretrain.config.fields import check, check_choices, param


@dataclass
class DiffusionConfig:
    """The MDLM objective (the outer loss)."""

    eps: float = param(1e-3, "t ~ U[eps, 1]; the lower end keeps the 1/t weight finite")
    loss_weight: str = param("inverse_t", "per-token weight: 1/t (MDLM linear schedule) or 1", ("inverse_t", "uniform"))
    normalization: str = param(
        "token",
        "outer loss divisor: maskable tokens of the global batch (token), per sequence then "
        "sequences (sequence), or sequences (batch)",
        ("token", "sequence", "batch"),
    )

    def __post_init__(self):
        check_choices(self, "diffusion")
        check(0.0 < self.eps < 1.0, "diffusion.eps", f"must lie in (0, 1), got {self.eps}")


@dataclass
class MemoryConfig:
    """MemDLM's parametric memory: transient fast weights written by an inner loop."""

    enabled: bool = param(True, "run the bi-level step; false gives plain MDLM through the same code path")
    num_inner_steps: int = param(
        1, "inner SGD steps K (pmc: K-1 pre-anchor states, noisiest first, then the anchor state; the paper's "
        "recipe is K = 2; pre_only and no_progressive take K = 1)"
    )
    pre_anchor_scale: float = param(1.5, "the pre-anchor state masks min(n, floor(scale * k)) tokens")
    inner_lr: float = param(0.1, "inner SGD learning rate eta")
    inner_grad_clip: float = param(1.0, "per-tensor inner gradient norm clip (0 turns clipping off)")
    layer_fraction: float = param(0.1, "fast weights go on layers [floor(L * (1 - f)), L), at least the last one")
    target_modules: str = param("gate,up,down", "comma list of projections with fast weights: qkv, out, gate, up, down")
    moe_targets: str = param(
        "routed,shared", "on mixture-of-experts layers, where the MLP modules of target_modules get fast weights: "
        "every routed expert and the shared expert (the MemDLM reference's placement), routed, or shared",
        ("routed,shared", "routed", "shared"))
    adapter: str = param("lora", "fast-weight form: low-rank (lora) or a dense delta (full)", ("lora", "full"))
    lora_rank: int = param(32, "LoRA rank r")
    lora_alpha: float = param(64.0, "LoRA alpha; the update is scaled by alpha / r")
    inner_loss_weight: str = param(
        "inverse_ratio",
        "inner loss weight: 1 / masked ratio of the state (as the paper) or 1",
        ("inverse_ratio", "uniform"),
    )
    dtype: str = param(
        "fp32", "dtype of the fast weights and their inner SGD (clipping norms included): fp32 even when "
        "--train.precision bf16, or bf16", ("fp32", "bf16"))
    prompt_mask_ratio: float = param(
        0.2, "inference-time adaptation (memdlm-generate, memdlm-eval, --eval.*): the share of the prompt's "
        "tokens masked in the anchor state")
    share_anchor_prefix: bool = param(
        True, "compute the anchor state's prefix once for the last inner step and the outer loss"
    )
    masking_strategy: str = param(
        "pre_only", "the inner loop's states (the reference's variants): pmc = pre-anchor states then the anchor "
        "(the paper's: --memory.masking_strategy pmc --memory.num_inner_steps 2; it leaks the outer loss's "
        "targets and its base model degrades, see benchmarks/RESULTS.md); pre_only (the default, the study's "
        "best at equal compute) = one step on the pre-anchor state; no_progressive = one step on the anchor; "
        "progressive_memory = K states independent of the anchor, 80% masked down to prompt_mask_ratio",
        ("pmc", "progressive_memory_consistent", "pre_only", "no_progressive", "progressive_memory"))
    inner_loss: str = param(
        "ce", "inner loss: cross entropy with the clean tokens (ce), KL(teacher||student) (distill), "
        "KL(student||teacher) (distill_reverse) or a hidden-state distance (distill_hidden); the teacher is the "
        "model with the current fast weights on the next state (the clean sequence after the last)",
        ("ce", "distill", "distill_reverse", "distill_hidden"))
    distill_temperature: float = param(1.0, "temperature of the distill losses' softmaxes (no T^2 factor)")
    distill_hidden_type: str = param("mse", "distill_hidden's distance: mse or cosine", ("mse", "cosine"))
    inner_loss_mask: str = param(
        "student_masked", "which positions an inner loss scores: every masked one (student_masked) or those the "
        "next state reveals (newly_revealed; a step without a next state scores all)",
        ("student_masked", "newly_revealed"))
    inner_epochs: int = param(1, "replay the inner trajectory this many times, the fast weights carried over")
    inner_dropout: float = param(
        0.0, "dropout on the fast weights' input in training passes, its masks drawn from (seed, step, pass, "
        "site, sample) so every layout drops the same elements")
    pad_unmask: str = param(
        "both", "padding: never masked nor attended (both); a token like any other (none, the reference's "
        "default); a token to the outer loss but left out of the inner loop's states and losses (inner)",
        ("both", "inner", "none"))
    leak_free: bool = param(
        False, "leave the positions the outer loss scores out of every inner loss (an inner step with nothing "
        "left to score, pmc's anchor step, is dropped): the outer loss never scores a target the inner loop "
        "trained on")
    probability: float = param(
        1.0, "the share of optimizer steps that use memory; the others are plain MDLM steps (decided per step "
        "from the seed, the same on every rank)")
    base_weight: float = param(
        0.0, "add this times the MDLM loss of the anchor without fast weights to the outer loss (the base model "
        "keeps learning to predict on its own)")
    reference_compat: bool = param(
        False, "reproduce the reference code's behaviour where it is a bug (distill_hidden compares the "
        "student's pre-norm with the teacher's post-norm states; inner weights 1/(float32 t + 1e-6))")

    def __post_init__(self):
        check_choices(self, "memory")
        check(
            self.num_inner_steps >= 1,
            "memory.num_inner_steps",
            f"needs at least 1 inner step, got {self.num_inner_steps}; use --memory.enabled false for plain MDLM",
        )
        check(self.pre_anchor_scale >= 1.0, "memory.pre_anchor_scale",
               "must be >= 1 (the pre-anchor state is noisier)")
        check(self.inner_lr >= 0, "memory.inner_lr", "must be >= 0")
        check(self.inner_grad_clip >= 0, "memory.inner_grad_clip", "must be >= 0 (0 turns clipping off)")
        check(0 < self.layer_fraction <= 1, "memory.layer_fraction", f"must lie in (0, 1], got {self.layer_fraction}")
        check(self.lora_rank > 0, "memory.lora_rank", "must be positive")
        check(0 < self.prompt_mask_ratio <= 1, "memory.prompt_mask_ratio", "must lie in (0, 1]")
        strategy = STRATEGY_ALIASES.get(self.masking_strategy, self.masking_strategy)
        check(strategy not in ("pre_only", "no_progressive") or self.num_inner_steps == 1,
               "memory.num_inner_steps",
               f"--memory.masking_strategy {strategy} takes exactly one inner step, got {self.num_inner_steps}; "
               "pass --memory.num_inner_steps 1, or --memory.masking_strategy pmc (or progressive_memory) for more")
        check(self.inner_epochs >= 1, "memory.inner_epochs", "must be >= 1")
        check(0 <= self.inner_dropout < 1, "memory.inner_dropout", "must lie in [0, 1)")
        check(self.distill_temperature > 0, "memory.distill_temperature", "must be positive")
        check(0 < self.probability <= 1, "memory.probability", f"must lie in (0, 1], got {self.probability}")
        check(self.base_weight >= 0, "memory.base_weight", "must be >= 0")
        check(not (self.leak_free and strategy == "no_progressive"), "memory.leak_free",
               "no_progressive's one inner step scores exactly the outer loss's positions, so leak-free it would "
               "have no inner step; use pmc or pre_only with --memory.leak_free true")

        known = {"qkv", "out", "gate", "up", "down"}
        modules = self.target_module_list
        unknown = [m for m in modules if m not in known]
        check(
            bool(modules) and not unknown,
            "memory.target_modules",
            f"unknown module(s) {unknown or modules}; choose from {', '.join(sorted(known))}",
        )

    @property
    def trajectory(self) -> TrajectorySpec:
        """The inner loop's states and loss masks (``data_pipeline.trajectory``)."""
        return TrajectorySpec(strategy=STRATEGY_ALIASES.get(self.masking_strategy, self.masking_strategy),
                              num_inner_steps=self.num_inner_steps, pre_anchor_scale=self.pre_anchor_scale,
                              prompt_mask_ratio=self.prompt_mask_ratio, loss_mask=self.inner_loss_mask,
                              leak_free=self.leak_free, pad_mode=self.pad_unmask)

    @property
    def inner_steps_per_step(self) -> int:
        """Inner SGD steps one optimizer step takes (the statistics it reports), epochs unrolled."""
        return len(self.trajectory.steps()) * self.inner_epochs

    @property
    def moe_target_set(self) -> frozenset[str]:
        return frozenset(self.moe_targets.split(","))

    @property
    def target_module_list(self) -> tuple[str, ...]:
        return tuple(m.strip() for m in self.target_modules.split(",") if m.strip())




def adapted_layers(num_layers: int, layer_fraction: float) -> range:
    """The layers that carry fast weights: ``[floor(L * (1 - f)), L)``, at least the last one."""
    start = min(int(math.floor(num_layers * (1.0 - layer_fraction) + 1e-9)), num_layers - 1)
    return range(start, num_layers)
