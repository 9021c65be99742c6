"""How a run trains, guards, saves, evaluates and logs (``--optim.*``, ``--train.*``, ``--guard.*``,
``--checkpoint.*``, ``--eval.*``, ``--logging.*``)."""

from __future__ import annotations

from dataclasses import dataclass

from pretrain.config.fields import check, check_choices, param

SPIKE_MIN_HISTORY = 20  # accepted steps the spike test needs before it judges (--guard.spike_window >= this)


@dataclass
class OptimizerConfig:
    """AdamW with linear warm-up and cosine decay."""

    lr: float = param(2e-3, "peak learning rate")
    min_lr_ratio: float = param(0.1, "final learning rate as a fraction of the peak")
    warmup_steps: int = param(30, "linear warm-up steps")
    weight_decay: float = param(0.1, "decoupled weight decay on matrices (not on norms)")
    beta1: float = param(0.9, "AdamW beta1")
    beta2: float = param(0.95, "AdamW beta2")
    eps: float = param(1e-8, "AdamW epsilon")
    grad_clip: float = param(1.0, "global gradient-norm clip of the outer gradient (0 turns it off)")

    def __post_init__(self):
        check(self.lr > 0, "optim.lr", "must be positive")
        check(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", "must lie in [0, 1]")
        check(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        check(self.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 turns clipping off)")


def computes_in_bf16(precision: str) -> bool:
    """Whether ``--train.precision`` computes under bf16 autocast (bf16, and fp8 for all but its fp8 matmuls)."""
    return precision in ("bf16", "fp8")


@dataclass
class TrainConfig:
    """The training loop."""

    steps: int = param(250, "optimizer steps")
    seed: int = param(1234, "seed of initialisation, data order, masks and fast-weight resets")
    out_dir: str = param("runs/default", "where metrics.jsonl, checkpoints and the wandb run go")
    global_batch_size: int = param(16, "sequences per optimizer step")
    micro_batch_size: int = param(16, "sequences per forward; gradient accumulation makes up the rest")
    precision: str = param(
        "fp32", "fp32; bf16: bf16 compute and activations with fp32 master weights, optimizer state and "
        "gradient reduction; fp8: bf16 with the projections of the layers without fast weights in fp8 (torchao, "
        "dynamic tensorwise scales; H100/H200) (see README, Precision)", ("fp32", "bf16", "fp8"))
    recompute: str = param(
        "none", "activation recomputation of the prefix layers (the part of the step that keeps the outer "
        "graph): none, full (every sub-block), selective (attention sub-blocks only)", ("none", "full", "selective"))
    compile: bool = param(
        False, "torch.compile each transformer sub-block (regional: one compiled graph per variant, shared by all "
        "layers), at every layout; on CPU it needs a C++ compiler; the first steps pay the compilation")
    device: str = param("auto", "cpu, cuda, or auto (cuda when available)", ("auto", "cpu", "cuda"))
    num_threads: int = param(0, "torch CPU threads (0 keeps torch's default)")
    resume: bool = param(True, "continue from the newest intact checkpoint in out_dir when there is one; false "
                         "starts a new run, refused on a directory that holds one unless --train.overwrite")
    overwrite: bool = param(
        False, "with --train.resume false on a directory that holds a run: move that run (checkpoints, metrics, "
        "wandb) aside into OUT_DIR.replaced-<time> and start fresh; nothing is deleted")

    def __post_init__(self):
        check_choices(self, "train")
        check(self.steps > 0, "train.steps", f"must be positive, got {self.steps}")
        check(self.global_batch_size > 0, "train.global_batch_size", "must be positive")
        check(self.micro_batch_size > 0, "train.micro_batch_size", "must be positive")
        check(
            self.global_batch_size % self.micro_batch_size == 0,
            "train.micro_batch_size",
            f"{self.micro_batch_size} does not divide --train.global_batch_size {self.global_batch_size}; "
            "pick a divisor",
        )
        check(self.out_dir != "", "train.out_dir", "must name a directory")
        check(self.num_threads >= 0, "train.num_threads", "must be >= 0")


@dataclass
class GuardConfig:
    """Bad steps and hangs: what keeps a long run from being corrupted or stuck (see README, Clusters)."""

    skip_bad_steps: bool = param(
        True, "skip the update of a step whose loss or gradient is non-finite on any rank (or that spikes, see "
        "--guard.spike_zscore): weights, optimizer state and the learning-rate schedule stay as they were, the "
        "batch is consumed (one small all-reduce and one device read per step)")
    spike_zscore: float = param(
        0.0, "also skip a step whose loss exceeds the mean of the recent accepted losses by this many standard "
        "deviations (0: off; the 1/t-weighted MDLM loss is heavy-tailed, so keep it generous, e.g. 8)")
    spike_window: int = param(
        100, f"accepted steps the spike statistics are taken over (at least {SPIKE_MIN_HISTORY}; the test starts "
        f"once {SPIKE_MIN_HISTORY} are seen)")
    max_bad_steps_in_row: int = param(
        5, "this many skipped steps in a row reload the newest good checkpoint and go on with the next data")
    max_bad_steps: int = param(50, "stop the run with an error after this many skipped steps in all")
    step_timeout_s: float = param(
        0.0, "hang watchdog: if no step (evaluation, checkpoint) finishes within this many seconds, dump every "
        "thread's stack to stderr and exit non-zero so the scheduler restarts the job (0: off)")

    def __post_init__(self):
        check(self.spike_zscore >= 0, "guard.spike_zscore", "must be >= 0 (0: off)")
        check(self.spike_window >= SPIKE_MIN_HISTORY, "guard.spike_window", f"must be at least {SPIKE_MIN_HISTORY}")
        check(self.max_bad_steps_in_row >= 1, "guard.max_bad_steps_in_row", "must be positive")
        check(self.max_bad_steps >= 1, "guard.max_bad_steps", "must be positive")
        check(self.step_timeout_s >= 0, "guard.step_timeout_s", "must be >= 0 (0: off)")


@dataclass
class CheckpointConfig:
    """Sharded checkpoints (torch.distributed.checkpoint): saving, keeping, verifying."""

    every: int = param(0, "save a resumable checkpoint every N steps (0: only at the end or on a stop signal)")
    keep: int = param(2, "how many of the newest checkpoints to keep")
    asynchronous: bool = param(
        False, "write checkpoints in a background thread while training goes on (dcp.async_save); the loop "
        "stops only to copy the state"
    )
    verify_hashes: bool = param(
        True, "on resume, check every checkpoint file's sha256 against the manifest (false: sizes only, for huge "
        "checkpoints)"
    )

    def __post_init__(self):
        check(self.every >= 0, "checkpoint.every", "must be >= 0")
        check(self.keep >= 1, "checkpoint.keep", "must be >= 1 (the newest checkpoint is always kept)")


@dataclass
class EvalConfig:
    """Held-out evaluation during training (the validation split of the data)."""

    every: int = param(50, "evaluate every N steps and at the end (0: never)")
    num_samples: int = param(64, "validation samples evaluated (the first N of the split)")
    micro_batch_size: int = param(16, "validation samples per forward on each data-parallel rank")
    seed: int = param(0, "seed of the evaluation's masks (fixed: two runs are compared point by point)")
    adaptation: bool = param(
        True, "also report the loss with inference-time adaptation on each sample (its own memory, written "
        "by the inner loop on the sample's context masked at --memory.prompt_mask_ratio)")
    context_fraction: float = param(
        0.5, "split each validation sample: its first share of tokens is a context (visible, never scored), the "
        "rest is masked and scored; adaptation runs on the context alone, so it never trains on a scored target "
        "(0: score and adapt on the whole sample, where adaptation sees some of the targets it is scored on)")

    def __post_init__(self):
        check(self.every >= 0, "eval.every", "must be >= 0")
        check(0 <= self.context_fraction < 1, "eval.context_fraction", "must lie in [0, 1)")
        check(self.num_samples >= 1, "eval.num_samples", "must be positive")
        check(self.micro_batch_size >= 1, "eval.micro_batch_size", "must be positive")



@dataclass
class LoggingConfig:
    """Progress bar, metrics file and wandb."""

    wandb: bool = param(True, "log to a wandb run (offline unless wandb_mode or WANDB_MODE says otherwise)")
    wandb_project: str = param("memdlm", "wandb project name")
    wandb_mode: str = param("", "online, offline or disabled; empty uses $WANDB_MODE, else offline")
    run_name: str = param("", "run name shown in wandb (default: the out_dir's name)")
    progress_bar: bool = param(True, "show a progress bar with loss and tokens/s")
    peak_tflops: float = param(
        0.0, "peak TFLOP/s per rank that mfu_total and mfu_model are measured against; 0: the data-sheet bf16 "
        "figure of a known GPU, else a matmul measured at start"
    )
    every: int = param(
        1, "read the step statistics from the device every N steps (one host synchronisation per N steps on "
        "GPUs); metrics.jsonl still gets a line per step, with the interval's mean step time"
    )

    def __post_init__(self):
        check(
            self.wandb_mode in ("", "online", "offline", "disabled"),
            "logging.wandb_mode",
            f"got {self.wandb_mode!r}; choose online, offline or disabled",
        )
        check(self.every >= 1, "logging.every", f"must be >= 1, got {self.every}")
