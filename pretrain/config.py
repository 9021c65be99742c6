"""Typed configuration: one dataclass per component, a help string per field.

Every field can be overridden on the command line as ``--section.field value``
(see ``launch/config_cli.py``); the help strings below are what ``--help`` prints.
Checks live in ``__post_init__`` and raise ``ConfigError`` naming the field and the fix.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from common.errors import UsageError
from data_pipeline.trajectory import STRATEGY_ALIASES, TrajectorySpec

SPIKE_MIN_HISTORY = 20  # accepted steps the spike test needs before it judges (--guard.spike_window >= this)


class ConfigError(UsageError):
    """A configuration value that cannot work; the message names the field and the fix."""


def param(default: Any, help: str, choices: tuple | None = None):
    """A dataclass field carrying its ``--help`` text (and allowed values, if any)."""
    metadata = {"help": help}
    if choices is not None:
        metadata["choices"] = choices
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def _check(condition: bool, option: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"--{option}: {message}")


def _check_choices(config: Any, section: str) -> None:
    for f in dataclasses.fields(config):
        choices = f.metadata.get("choices")
        value = getattr(config, f.name)
        if choices is not None and value not in choices:
            raise ConfigError(
                f"--{section}.{f.name}: got {value!r}; choose one of {', '.join(map(str, choices))}"
            )


@dataclass
class ModelConfig:
    """A bidirectional LLaDA/Llama-style transformer."""

    vocab_size: int = param(4096, "rows of the embedding and LM head (tokenizer vocabulary incl. special tokens)")
    hidden_size: int = param(256, "model width")
    num_layers: int = param(6, "number of transformer layers")
    num_heads: int = param(4, "attention heads (must divide hidden_size; head size must be even for RoPE)")
    num_kv_heads: int = param(
        0, "key/value heads for grouped-query attention (must divide num_heads); 0 = num_heads (multi-head)"
    )
    ffn_hidden_size: int = param(704, "SwiGLU inner width (gate/up output, down input)")
    seq_len: int = param(128, "training sequence length and the longest sequence the model takes")
    rope_theta: float = param(10000.0, "rotary embedding base")
    head_dim: int = param(0, "size of each attention head; 0 = hidden_size / num_heads (Qwen3 sets it apart)")
    qkv_bias: bool = param(False, "biases on the query/key/value projections (Qwen2, Dream)")
    qk_norm: bool = param(False, "RMSNorm of each query and key head before RoPE (Qwen3)")
    rope_scaling: str = param("none", "RoPE frequency scaling: none, or llama3 (Llama-3.1's; the rope_* fields)",
                              ("none", "llama3"))
    rope_scaling_factor: float = param(8.0, "llama3 RoPE scaling: factor")
    rope_low_freq_factor: float = param(1.0, "llama3 RoPE scaling: low_freq_factor")
    rope_high_freq_factor: float = param(4.0, "llama3 RoPE scaling: high_freq_factor")
    rope_original_max_positions: int = param(8192, "llama3 RoPE scaling: original_max_position_embeddings")
    tie_embeddings: bool = param(False, "the LM head is the input embedding (one matrix; not with pipeline "
                                 "parallelism)")
    shifted_prediction: bool = param(
        False, "position i predicts token i+1 (Dream, initialised from an autoregressive model): every loss, the "
        "sampler and inference-time adaptation read the logits one position to the left (position 0 its own)")
    moe_num_experts: int = param(0, "routed experts of each mixture-of-experts MLP; 0 = dense MLPs everywhere")
    moe_top_k: int = param(2, "experts each token is routed to")
    moe_ffn_hidden_size: int = param(0, "each routed expert's SwiGLU inner width (0 = ffn_hidden_size)")
    moe_score: str = param("softmax", "router scores: softmax over the experts (Qwen-MoE, OLMoE, LLaDA-MoE) or "
                           "sigmoid (DeepSeek-V3, LLaDA2)", ("softmax", "sigmoid"))
    moe_num_groups: int = param(1, "group-limited routing: experts split into this many groups, each scored by "
                                "the sum of its two best scores (1 = off)")
    moe_topk_groups: int = param(1, "group-limited routing: only the experts of this many best groups are chosen")
    moe_norm_topk: bool = param(False, "renormalise the chosen experts' weights to sum to 1 (norm_topk_prob; "
                                "LLaDA2 and DeepSeek-V3 set it)")
    moe_routed_scaling: float = param(1.0, "the routed experts' weights are multiplied by this")
    moe_shared_ffn_hidden_size: int = param(0, "inner width of a shared expert every token goes through "
                                            "(0 = none); fast weights on an MoE layer's MLP sit on it")
    moe_shared_expert_gate: bool = param(False, "scale the shared expert by sigmoid(x . g) (Qwen2-MoE)")
    moe_first_dense_layers: int = param(0, "the first layers keep a dense MLP of ffn_hidden_size "
                                        "(DeepSeek's first_k_dense_replace)")
    head_chunk_rows: int = param(
        0, "rows of the LM head and its loss computed at once, so no logits block exceeds rows x vocabulary; "
        "0 = automatic (at most 128 MiB of fp32 logits per tensor-parallel rank, 1024 rows at most)")
    family: str = param("memdlm", "the checkpoint family the model came from (memdlm-export-hf's default format); "
                        "set by --model.init_from", ("memdlm", "llama", "qwen2", "qwen3", "llada", "dream"))
    norm_eps: float = param(1e-5, "RMSNorm epsilon")
    init_std: float = param(0.02, "std of the normal initialisation of all weight matrices")
    mask_token_id: int = param(-1, "id of the mask token; -1 takes the tokenizer's <|mask|> token")
    init_from: str = param(
        "", "start from a Hugging Face checkpoint directory (Llama architecture: Llama, Mistral without sliding "
        "window, or a memdlm-export-hf export); its config sets the model's shape and its tokenizer the data's"
    )

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "ffn_hidden_size"):
            _check(getattr(self, name) > 0, f"model.{name}", f"must be positive, got {getattr(self, name)}")
        _check(
            self.head_dim or self.hidden_size % self.num_heads == 0,
            "model.num_heads",
            f"{self.num_heads} heads do not divide hidden_size {self.hidden_size}; pick a divisor",
        )
        _check(
            self.head_dim or (self.hidden_size // self.num_heads) % 2 == 0,
            "model.num_heads",
            f"head size {self.hidden_size // self.num_heads} is odd; rotary embeddings need an even head size",
        )
        _check(
            self.seq_len >= 2,
            "model.seq_len",
            f"a sequence needs at least 2 tokens, got {self.seq_len}",
        )
        _check(
            self.num_kv_heads >= 0 and (self.num_kv_heads == 0 or self.num_heads % self.num_kv_heads == 0),
            "model.num_kv_heads",
            f"{self.num_kv_heads} key/value heads do not divide num_heads {self.num_heads}; pick a divisor (or 0)",
        )
        _check(self.init_std > 0, "model.init_std", "must be positive")
        _check(self.head_dim >= 0 and self.head_dim % 2 == 0, "model.head_dim",
               f"must be 0 or a positive even number (RoPE), got {self.head_dim}")
        _check(self.head_chunk_rows >= 0, "model.head_chunk_rows", "must be >= 0 (0: automatic)")
        if self.moe_num_experts:
            self._check_moe()
        _check(self.rope_scaling_factor >= 1 and self.rope_high_freq_factor > self.rope_low_freq_factor > 0,
               "model.rope_scaling_factor", "llama3 scaling needs factor >= 1 and high_freq_factor > "
               "low_freq_factor > 0")
        _check(
            -1 <= self.mask_token_id < self.vocab_size,
            "model.mask_token_id",
            f"{self.mask_token_id} is outside the vocabulary [0, {self.vocab_size}); use -1 for the tokenizer's",
        )

    def _check_moe(self) -> None:
        experts, groups = self.moe_num_experts, self.moe_num_groups
        _check(experts > 0, "model.moe_num_experts", "must be >= 0")
        _check(1 <= self.moe_top_k <= experts, "model.moe_top_k",
               f"{self.moe_top_k} must lie in [1, {experts}] (the routed experts)")
        _check(groups >= 1 and experts % groups == 0, "model.moe_num_groups",
               f"{groups} groups do not split {experts} experts evenly; pick a divisor of {experts}")
        _check(1 <= self.moe_topk_groups <= groups, "model.moe_topk_groups",
               f"{self.moe_topk_groups} must lie in [1, {groups}] (moe_num_groups)")
        _check(self.moe_top_k <= self.moe_topk_groups * (experts // groups), "model.moe_top_k",
               f"{self.moe_top_k} experts cannot be chosen from {self.moe_topk_groups} group(s) of "
               f"{experts // groups}; raise moe_topk_groups")
        _check(self.moe_ffn_hidden_size >= 0 and self.moe_shared_ffn_hidden_size >= 0, "model.moe_ffn_hidden_size",
               "must be >= 0")
        _check(0 <= self.moe_first_dense_layers < self.num_layers, "model.moe_first_dense_layers",
               f"must lie in [0, {self.num_layers}) (some layer must be a mixture of experts)")
        _check(self.moe_routed_scaling > 0, "model.moe_routed_scaling", "must be positive")

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe_num_experts > 0 and layer >= self.moe_first_dense_layers

    @property
    def expert_ffn_hidden_size(self) -> int:
        return self.moe_ffn_hidden_size or self.ffn_hidden_size

    def mlp_width(self, layer: int) -> int:
        """The inner width of layer ``layer``'s dense MLP, or of its shared expert (0: none) if it is an MoE layer
        (where fast weights on MLP projections sit)."""
        return self.moe_shared_ffn_hidden_size if self.is_moe_layer(layer) else self.ffn_hidden_size

    @property
    def attention_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def key_value_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def qkv_size(self) -> int:
        """Rows of the fused query/key/value projection."""
        return (self.num_heads + 2 * self.key_value_heads) * self.attention_head_dim

    @property
    def attention_size(self) -> int:
        """Width of the attention's output before its out projection (all heads)."""
        return self.num_heads * self.attention_head_dim


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
        _check_choices(self, "diffusion")
        _check(0.0 < self.eps < 1.0, "diffusion.eps", f"must lie in (0, 1), got {self.eps}")


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
        _check_choices(self, "memory")
        _check(
            self.num_inner_steps >= 1,
            "memory.num_inner_steps",
            f"needs at least 1 inner step, got {self.num_inner_steps}; use --memory.enabled false for plain MDLM",
        )
        _check(self.pre_anchor_scale >= 1.0, "memory.pre_anchor_scale",
               "must be >= 1 (the pre-anchor state is noisier)")
        _check(self.inner_lr >= 0, "memory.inner_lr", "must be >= 0")
        _check(self.inner_grad_clip >= 0, "memory.inner_grad_clip", "must be >= 0 (0 turns clipping off)")
        _check(0 < self.layer_fraction <= 1, "memory.layer_fraction", f"must lie in (0, 1], got {self.layer_fraction}")
        _check(self.lora_rank > 0, "memory.lora_rank", "must be positive")
        _check(0 < self.prompt_mask_ratio <= 1, "memory.prompt_mask_ratio", "must lie in (0, 1]")
        strategy = STRATEGY_ALIASES.get(self.masking_strategy, self.masking_strategy)
        _check(strategy not in ("pre_only", "no_progressive") or self.num_inner_steps == 1,
               "memory.num_inner_steps",
               f"--memory.masking_strategy {strategy} takes exactly one inner step, got {self.num_inner_steps}; "
               "pass --memory.num_inner_steps 1, or --memory.masking_strategy pmc (or progressive_memory) for more")
        _check(self.inner_epochs >= 1, "memory.inner_epochs", "must be >= 1")
        _check(0 <= self.inner_dropout < 1, "memory.inner_dropout", "must lie in [0, 1)")
        _check(self.distill_temperature > 0, "memory.distill_temperature", "must be positive")
        _check(0 < self.probability <= 1, "memory.probability", f"must lie in (0, 1], got {self.probability}")
        _check(self.base_weight >= 0, "memory.base_weight", "must be >= 0")
        _check(not (self.leak_free and strategy == "no_progressive"), "memory.leak_free",
               "no_progressive's one inner step scores exactly the outer loss's positions, so leak-free it would "
               "have no inner step; use pmc or pre_only with --memory.leak_free true")

        known = {"qkv", "out", "gate", "up", "down"}
        modules = self.target_module_list
        unknown = [m for m in modules if m not in known]
        _check(
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
    def target_module_list(self) -> tuple[str, ...]:
        return tuple(m.strip() for m in self.target_modules.split(",") if m.strip())


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
        _check(self.lr > 0, "optim.lr", "must be positive")
        _check(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", "must lie in [0, 1]")
        _check(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        _check(self.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 turns clipping off)")


@dataclass
class TrainConfig:
    """The training loop."""

    steps: int = param(250, "optimizer steps")
    seed: int = param(1234, "seed of initialisation, data order, masks and fast-weight resets")
    out_dir: str = param("runs/default", "where metrics.jsonl, checkpoints and the wandb run go")
    global_batch_size: int = param(16, "sequences per optimizer step")
    micro_batch_size: int = param(16, "sequences per forward; gradient accumulation makes up the rest")
    precision: str = param(
        "fp32", "fp32, or bf16: bf16 compute and activations with fp32 master weights, optimizer state and "
        "gradient reduction (see README, Precision)", ("fp32", "bf16"))
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
        _check_choices(self, "train")
        _check(self.steps > 0, "train.steps", f"must be positive, got {self.steps}")
        _check(self.global_batch_size > 0, "train.global_batch_size", "must be positive")
        _check(self.micro_batch_size > 0, "train.micro_batch_size", "must be positive")
        _check(
            self.global_batch_size % self.micro_batch_size == 0,
            "train.micro_batch_size",
            f"{self.micro_batch_size} does not divide --train.global_batch_size {self.global_batch_size}; "
            "pick a divisor",
        )
        _check(self.out_dir != "", "train.out_dir", "must name a directory")
        _check(self.num_threads >= 0, "train.num_threads", "must be >= 0")


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
        _check(self.spike_zscore >= 0, "guard.spike_zscore", "must be >= 0 (0: off)")
        _check(self.spike_window >= SPIKE_MIN_HISTORY, "guard.spike_window", f"must be at least {SPIKE_MIN_HISTORY}")
        _check(self.max_bad_steps_in_row >= 1, "guard.max_bad_steps_in_row", "must be positive")
        _check(self.max_bad_steps >= 1, "guard.max_bad_steps", "must be positive")
        _check(self.step_timeout_s >= 0, "guard.step_timeout_s", "must be >= 0 (0: off)")


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
        _check(self.every >= 0, "checkpoint.every", "must be >= 0")
        _check(self.keep >= 1, "checkpoint.keep", "must be >= 1 (the newest checkpoint is always kept)")


@dataclass
class DataConfig:
    """Training data: a prepared shard dataset, or raw text prepared on first use."""

    path: str = param(
        "", "a prepared dataset directory (memdlm-prepare-data), a text/JSONL file or directory of them "
        "(prepared into the cache on first use), or empty for the bundled TinyShakespeare corpus"
    )
    sources: str = param(
        "", "a weighted mixture of prepared datasets instead of --data.path: NAME=PATH[:WEIGHT],... (weights "
        "default to the sources' sizes; the same tokenizer and sequence length; MDS only); the loss, tokens and "
        "held-out loss of each source are logged (loss_by_source, tokens_by_source, eval_loss_by_source)")
    format: str = param("mds", "shard format to read: mds (mosaicml-streaming) or webdataset", ("mds", "webdataset"))
    tokenizer: str = param(
        "", "for raw input: a tokenizer.json or Hugging Face tokenizer directory; empty trains a byte-level BPE"
    )
    cache_dir: str = param("", "where raw input is prepared (default $MEMDLM_CACHE_DIR or ~/.cache/memdlm)")
    num_workers: int = param(1, "DataLoader worker processes that read shards and build masked batches")
    shuffle: bool = param(True, "shuffle samples (MDS) or shards (webdataset) each epoch, from --train.seed")
    num_canonical_nodes: int = param(
        1, "MDS: the canonical node count that fixes the global sample order; keep it when the rank count changes"
    )
    shuffle_block_size: int = param(0, "MDS: shuffle block size in samples (0: mosaicml-streaming's default)")
    verify_hashes: bool = param(True, "check every shard's sha256 against the manifest before training")
    document_attention: bool = param(False, "keep attention within each packed document")
    max_skipped_samples: int = param(
        0, "webdataset: damaged samples that may be skipped (counted and logged) before failing; 0 fails at once"
    )
    prepare_workers: int = param(1, "tokenization processes when raw input is prepared on first use")
    eot_target: bool = param(
        True, "the end-of-text token that ends every document is a prediction target (masked and scored like any "
        "token, so the model learns where documents end, as LLaDA's pretraining); false: always visible, never "
        "scored. Padding is never scored either way")
    random_length_fraction: float = param(
        0.0, "the share of training samples cut to a random length (uniform in 1..their length; the rest becomes "
        "padding), drawn from the seed and the sample index, so the model meets short inputs (LLaDA: 0.01)")
    val_fraction: float = param(
        0.02, "raw input prepared on first use: the share of its documents held out as the validation split "
        "(--eval.*); prepared datasets carry their own (memdlm-prepare-data --val-fraction)")

    @property
    def num_sources(self) -> int:
        """The sources of a mixture (1 for one dataset)."""
        return max(1, len([item for item in self.sources.split(",") if item.strip()]))

    def __post_init__(self):
        _check_choices(self, "data")
        _check(self.num_workers >= 0, "data.num_workers", "must be >= 0")
        _check(self.num_canonical_nodes >= 1, "data.num_canonical_nodes", "must be >= 1")
        _check(self.shuffle_block_size >= 0, "data.shuffle_block_size", "must be >= 0")
        _check(self.max_skipped_samples >= 0, "data.max_skipped_samples", "must be >= 0")
        _check(self.prepare_workers >= 0, "data.prepare_workers", "must be >= 0")
        _check(0 <= self.val_fraction < 1, "data.val_fraction", "must lie in [0, 1)")
        _check(0 <= self.random_length_fraction <= 1, "data.random_length_fraction", "must lie in [0, 1]")
        _check(not (self.sources and self.path), "data.sources",
               "replaces --data.path (a mixture of prepared datasets); give one of them")
        _check(not (self.sources and self.format != "mds"), "data.sources",
               "reads MDS shards only (webdataset mixtures are not supported); use --data.format mds")


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
        _check(self.every >= 0, "eval.every", "must be >= 0")
        _check(0 <= self.context_fraction < 1, "eval.context_fraction", "must lie in [0, 1)")
        _check(self.num_samples >= 1, "eval.num_samples", "must be positive")
        _check(self.micro_batch_size >= 1, "eval.micro_batch_size", "must be positive")


def adapted_layers(num_layers: int, layer_fraction: float) -> range:
    """The layers that carry fast weights: ``[floor(L * (1 - f)), L)``, at least the last one."""
    start = min(int(math.floor(num_layers * (1.0 - layer_fraction) + 1e-9)), num_layers - 1)
    return range(start, num_layers)


@dataclass
class ParallelConfig:
    """Tensor x sequence x pipeline x data parallelism; data-parallel size = world size / (tensor x sequence x
    pipeline)."""

    tensor_parallel_size: int = param(1, "ranks that split each layer's matrices (megatron-core tensor parallelism)")
    sequence_parallel_size: int = param(
        1, "ranks that split each sequence's tokens (DeepSpeed-Ulysses style: attention exchanges heads for tokens "
        "by all-to-all); must divide the key/value heads of a tensor-parallel rank")
    pipeline_parallel_size: int = param(1, "pipeline stages (torch.distributed.pipelining); must divide num_layers")
    zero_stage: int = param(0, "DeepSpeed ZeRO stage over the data-parallel group: 0, 1, 2 or 3", (0, 1, 2, 3))
    pipeline_schedule: str = param("1f1b", "pipeline schedule of the anchor pass", ("1f1b", "gpipe"))

    def __post_init__(self):
        _check_choices(self, "parallel")
        _check(self.tensor_parallel_size >= 1, "parallel.tensor_parallel_size", "must be >= 1")
        _check(self.pipeline_parallel_size >= 1, "parallel.pipeline_parallel_size", "must be >= 1")
        _check(self.sequence_parallel_size >= 1, "parallel.sequence_parallel_size", "must be >= 1")
        _check(
            not (self.zero_stage > 0 and self.pipeline_parallel_size > 1),
            "parallel.zero_stage",
            f"ZeRO stage {self.zero_stage} cannot be combined with {self.pipeline_parallel_size} pipeline stages: "
            "torch.distributed.pipelining drives the backward, and DeepSpeed's ZeRO needs its own engine to; use "
            "--parallel.zero_stage 0 (plain data parallelism) with pipeline stages",
        )


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
        _check(
            self.wandb_mode in ("", "online", "offline", "disabled"),
            "logging.wandb_mode",
            f"got {self.wandb_mode!r}; choose online, offline or disabled",
        )
        _check(self.every >= 1, "logging.every", f"must be >= 1, got {self.every}")


@dataclass
class RunConfig:
    """Everything one training run needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self):
        model, memory = self.model, self.memory
        _check(not (model.moe_num_experts and self.train.compile), "train.compile",
               "a mixture-of-experts model's routed experts see different token counts every step, which a compiled "
               "block would recompile for; use --train.compile false with --model.moe_num_experts")
        mlp_sites = [m for m in memory.target_module_list if m in ("gate", "up", "down")]
        if model.moe_num_experts and memory.enabled and mlp_sites and not model.moe_shared_ffn_hidden_size:
            layers = adapted_layers(model.num_layers, memory.layer_fraction)
            moe = [layer for layer in layers if model.is_moe_layer(layer)]
            _check(not moe, "memory.target_modules",
                   f"fast weights on {','.join(mlp_sites)} of layers {moe}, mixture-of-experts layers without a shared "
                   "expert, have nowhere to sit (routed experts carry none yet): give the model a shared expert "
                   "(--model.moe_shared_ffn_hidden_size), or --memory.target_modules qkv,out, or keep those layers "
                   "dense (--model.moe_first_dense_layers)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "RunConfig":
        unknown_sections = set(values) - set(SECTIONS)
        if unknown_sections:
            raise ConfigError(f"unknown config section(s) {sorted(unknown_sections)}; known: {', '.join(SECTIONS)}")
        sections = {}
        for name, section_cls in SECTIONS.items():
            section_values = dict(values.get(name, {}))
            known = {f.name for f in dataclasses.fields(section_cls)}
            unknown = sorted(set(section_values) - known)
            if unknown:
                raise ConfigError(f"unknown field(s) {', '.join(name + '.' + u for u in unknown)}")
            sections[name] = section_cls(**section_values)
        return cls(**sections)


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(RunConfig)}
