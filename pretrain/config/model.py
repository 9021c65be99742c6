"""The model's shape and options (``--model.*``), mixture-of-experts layers included."""

from __future__ import annotations

from dataclasses import dataclass

from pretrain.config.fields import check, param


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
    rope_fraction: float = param(1.0, "share of each head's dimensions that RoPE rotates, the first ones "
                                 "(partial_rotary_factor; LLaDA2: 0.5)")
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
    moe_expert_bias: bool = param(False, "auxiliary-loss-free balancing (DeepSeek-V3, LLaDA2): a per-expert bias "
                                  "added to the scores to choose experts (not to weight them), moved after every "
                                  "step toward equal load by moe_bias_update_rate; kept in checkpoints")
    moe_bias_in_weights: bool = param(False, "the expert bias also adds to the chosen experts' weights, not only "
                                      "to the choice (LLaDA-MoE's published code does)")
    moe_bias_update_rate: float = param(1e-3, "expert-bias balancing: the bias of an over-loaded expert drops, "
                                        "an under-loaded one's rises, by this much per step")
    moe_aux_loss_coeff: float = param(0.0, "weight of the sequence-wise load-balancing loss added to the outer "
                                      "loss (E/k x sum_e tokens_e/L x mean score_e per sequence; 1 when balanced); "
                                      "0 = off")
    head_chunk_rows: int = param(
        0, "rows of the LM head and its loss computed at once, so no logits block exceeds rows x vocabulary; "
        "0 = automatic (at most 128 MiB of fp32 logits per tensor-parallel rank, 1024 rows at most)")
    family: str = param("memdlm", "the checkpoint family the model came from (memdlm-export-hf's default format); "
                        "set by --model.init_from", ("memdlm", "llama", "qwen2", "qwen3", "llada", "dream", "llada_moe",
                                                              "llada2"))
    norm_eps: float = param(1e-5, "RMSNorm epsilon")
    init_std: float = param(0.02, "std of the normal initialisation of all weight matrices")
    mask_token_id: int = param(-1, "id of the mask token; -1 takes the tokenizer's <|mask|> token")
    init_from: str = param(
        "", "start from a Hugging Face checkpoint directory (Llama architecture: Llama, Mistral without sliding "
        "window, or a memdlm-export-hf export); its config sets the model's shape and its tokenizer the data's"
    )

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "ffn_hidden_size"):
            check(getattr(self, name) > 0, f"model.{name}", f"must be positive, got {getattr(self, name)}")
        check(
            self.head_dim or self.hidden_size % self.num_heads == 0,
            "model.num_heads",
            f"{self.num_heads} heads do not divide hidden_size {self.hidden_size}; pick a divisor",
        )
        check(
            self.head_dim or (self.hidden_size // self.num_heads) % 2 == 0,
            "model.num_heads",
            f"head size {self.hidden_size // self.num_heads} is odd; rotary embeddings need an even head size",
        )
        check(
            self.seq_len >= 2,
            "model.seq_len",
            f"a sequence needs at least 2 tokens, got {self.seq_len}",
        )
        check(
            self.num_kv_heads >= 0 and (self.num_kv_heads == 0 or self.num_heads % self.num_kv_heads == 0),
            "model.num_kv_heads",
            f"{self.num_kv_heads} key/value heads do not divide num_heads {self.num_heads}; pick a divisor (or 0)",
        )
        check(self.init_std > 0, "model.init_std", "must be positive")
        check(self.head_dim >= 0 and self.head_dim % 2 == 0, "model.head_dim",
               f"must be 0 or a positive even number (RoPE), got {self.head_dim}")
        check(0 < self.rope_fraction <= 1 and self.rotary_dim % 2 == 0 and self.rotary_dim > 0,
               "model.rope_fraction", f"{self.rope_fraction} of the head size {self.attention_head_dim} must be a "
               "positive even number of dimensions")
        check(self.head_chunk_rows >= 0, "model.head_chunk_rows", "must be >= 0 (0: automatic)")
        if self.moe_num_experts:
            self._check_moe()
        check(self.rope_scaling_factor >= 1 and self.rope_high_freq_factor > self.rope_low_freq_factor > 0,
               "model.rope_scaling_factor", "llama3 scaling needs factor >= 1 and high_freq_factor > "
               "low_freq_factor > 0")
        check(
            -1 <= self.mask_token_id < self.vocab_size,
            "model.mask_token_id",
            f"{self.mask_token_id} is outside the vocabulary [0, {self.vocab_size}); use -1 for the tokenizer's",
        )

    def _check_moe(self) -> None:
        experts, groups = self.moe_num_experts, self.moe_num_groups
        check(experts > 0, "model.moe_num_experts", "must be >= 0")
        check(1 <= self.moe_top_k <= experts, "model.moe_top_k",
               f"{self.moe_top_k} must lie in [1, {experts}] (the routed experts)")
        check(groups >= 1 and experts % groups == 0, "model.moe_num_groups",
               f"{groups} groups do not split {experts} experts evenly; pick a divisor of {experts}")
        check(1 <= self.moe_topk_groups <= groups, "model.moe_topk_groups",
               f"{self.moe_topk_groups} must lie in [1, {groups}] (moe_num_groups)")
        check(self.moe_top_k <= self.moe_topk_groups * (experts // groups), "model.moe_top_k",
               f"{self.moe_top_k} experts cannot be chosen from {self.moe_topk_groups} group(s) of "
               f"{experts // groups}; raise moe_topk_groups")
        check(self.moe_ffn_hidden_size >= 0 and self.moe_shared_ffn_hidden_size >= 0, "model.moe_ffn_hidden_size",
               "must be >= 0")
        check(0 <= self.moe_first_dense_layers < self.num_layers, "model.moe_first_dense_layers",
               f"must lie in [0, {self.num_layers}) (some layer must be a mixture of experts)")
        check(self.moe_routed_scaling > 0, "model.moe_routed_scaling", "must be positive")
        check(self.moe_bias_update_rate >= 0, "model.moe_bias_update_rate", "must be >= 0")
        check(self.moe_aux_loss_coeff >= 0, "model.moe_aux_loss_coeff", "must be >= 0 (0: off)")

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
    def rotary_dim(self) -> int:
        """The dimensions of each head RoPE rotates (the first ones)."""
        return int(self.attention_head_dim * self.rope_fraction)

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
