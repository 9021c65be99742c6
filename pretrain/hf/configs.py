"""The ``config.json`` of each Hugging Face family, both ways: what an export writes (the fields that family's own
code reads) and the ``ModelConfig`` fields an import takes from it, refusing what the other side cannot express.

Families: ``llama`` (also ``mistral`` without a sliding window), ``qwen2``, ``qwen3`` (transformers classes),
``llada`` and ``dream`` (remote code published with those models; an export names their classes in
``auto_map``, and the user copies the modeling files from the original model, see ``remote_code_note``), the
mixtures of experts ``llada_moe`` (LLaDA-MoE, ``model_type`` llada with ``num_experts``) and ``llada2``
(LLaDA2.x, ``llada2_moe``), also published remote code, and ``memdlm`` (our own remote code,
``pretrain/hf/remote``, which honours every option of a dense model).
"""

from __future__ import annotations

import dataclasses

from common.errors import UsageError
from pretrain.config import ModelConfig

FAMILIES = next(f for f in dataclasses.fields(ModelConfig) if f.name == "family").metadata["choices"]
MODEL_TYPES = {"memdlm": "memdlm", "llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
               "llada": "llada", "dream": "dream", "llada2_moe": "llada2"}  # config model_type (lower case) -> family
MOE_FAMILIES = ("llada_moe", "llada2")  # the formats that hold a mixture of experts
REMOTE_CODE_FILES = ("configuration_memdlm.py", "modeling_memdlm.py")
PUBLISHED_CODE = {  # family -> (auto_map, architectures, the files its auto_map names)
    "llada": ({"AutoConfig": "configuration_llada.LLaDAConfig", "AutoModel": "modeling_llada.LLaDAModelLM",
               "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"}, ["LLaDAModelLM"],
              ("configuration_llada.py", "modeling_llada.py")),
    "dream": ({"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"},
              ["DreamModel"], ("configuration_dream.py", "modeling_dream.py", "generation_utils.py")),
    "llada_moe": ({"AutoConfig": "configuration_lladamoe.LLaDAConfig", "AutoModel": "modeling_lladamoe.LLaDAMoEModelLM",
                   "AutoModelForCausalLM": "modeling_lladamoe.LLaDAMoEModelLM"}, ["LLaDAMoEModelLM"],
                  ("configuration_lladamoe.py", "modeling_lladamoe.py")),
    "llada2": ({"AutoConfig": "configuration_llada2_moe.LLaDA2MoeConfig",
                "AutoModel": "modeling_llada2_moe.LLaDA2MoeModel",
                "AutoModelForCausalLM": "modeling_llada2_moe.LLaDA2MoeModelLM"}, ["LLaDA2MoeModelLM"],
               ("configuration_llada2_moe.py", "modeling_llada2_moe.py")),
    "memdlm": ({"AutoConfig": "configuration_memdlm.MemDLMConfig",
                "AutoModelForMaskedLM": "modeling_memdlm.MemDLMForMaskedLM"}, ["MemDLMForMaskedLM"],
               REMOTE_CODE_FILES),
}
VOCAB_MULTIPLE = 64  # an imported vocabulary that grows (a mask token) is padded to a multiple of this


class HuggingFaceFormatError(UsageError):
    """A Hugging Face checkpoint this project cannot take, or a format that cannot express a model."""


def family_of(config: dict, where: str) -> str:
    kind = str(config.get("model_type", "")).lower()
    if kind not in MODEL_TYPES:
        raise HuggingFaceFormatError(
            f"{where} is a {config.get('model_type')!r} model ({', '.join(config.get('architectures') or [])}); "
            f"supported: {', '.join(sorted(MODEL_TYPES))}")
    if kind == "llada" and config.get("num_experts"):  # LLaDA-MoE shares LLaDA's model_type
        return "llada_moe"
    return MODEL_TYPES[kind]


# -- export ---------------------------------------------------------------------------------------------
def _refuse(cfg: ModelConfig, family: str) -> None:
    """An export format that cannot hold the model exactly is refused with the formats that can."""
    problems = []
    if cfg.qkv_bias and family in ("llama", "qwen3", "llada"):
        problems.append("q/k/v biases (qwen2, dream and memdlm hold them)")
    if cfg.qk_norm and family not in ("qwen3", "memdlm", *MOE_FAMILIES):
        problems.append("query/key norms (qwen3 and memdlm hold them)")
    if cfg.shifted_prediction != (family == "dream") and family != "memdlm":
        problems.append("shifted prediction (dream and memdlm hold it)" if cfg.shifted_prediction
                        else "unshifted prediction (dream's code reads position i's logits as token i+1's)")
    if cfg.rope_scaling != "none" and family in ("llada",):
        problems.append(f"{cfg.rope_scaling} RoPE scaling")
    if family == "qwen2" and cfg.head_dim and cfg.head_dim * cfg.num_heads != cfg.hidden_size:
        problems.append(f"head_dim {cfg.head_dim} apart from hidden_size / num_heads")
    if cfg.rope_fraction != 1.0 and family != "llada2":
        problems.append(f"partial rotary embeddings ({cfg.rope_fraction} of each head; llada2 holds them)")
    if bool(cfg.moe_num_experts) != (family in MOE_FAMILIES):
        raise HuggingFaceFormatError(
            f"--format {family} cannot express this model: " + (
                f"it is a mixture of experts; choose --format {' or '.join(MOE_FAMILIES)} (the checkpoint itself is "
                "read by memdlm-generate, memdlm-eval and --train.resume)" if cfg.moe_num_experts else
                f"{family} holds mixtures of experts only; choose another --format (memdlm holds every option)"))
    if cfg.moe_num_experts:
        problems += moe_export_problems(cfg, family)
    if problems:
        raise HuggingFaceFormatError(f"--format {family} cannot express this model: {'; '.join(problems)}; choose "
                                     "another --format (memdlm holds every option)")


def moe_export_problems(cfg: ModelConfig, family: str) -> list[str]:
    """What an MoE family's published code cannot do as our model does."""
    problems = []
    if cfg.moe_shared_expert_gate:
        problems.append("a gated shared expert (qwen2-moe's)")
    if cfg.qkv_bias and family == "llada_moe":
        problems.append("q/k/v biases")
    if cfg.rope_scaling != "none":
        problems.append(f"{cfg.rope_scaling} RoPE scaling")
    if family == "llada_moe":
        if cfg.moe_score != "softmax" or cfg.moe_norm_topk or cfg.moe_routed_scaling != 1.0 or cfg.moe_num_groups > 1:
            problems.append("routing other than softmax top-k without renormalisation, scaling or groups")
        if cfg.head_dim and cfg.head_dim * cfg.num_heads != cfg.hidden_size:
            problems.append(f"head_dim {cfg.head_dim} apart from hidden_size / num_heads")
        if cfg.moe_expert_bias and not cfg.moe_bias_in_weights:
            problems.append("expert biases that only choose (llada-moe's code adds them to the weights too)")
        if not cfg.qk_norm:
            problems.append("attention without query/key norms")
    else:
        if cfg.moe_score != "sigmoid" or cfg.moe_norm_topk != (cfg.moe_top_k > 1) or cfg.moe_bias_in_weights:
            problems.append("routing other than sigmoid scores renormalised over the chosen experts, biases choosing "
                            "only")
        shared = cfg.moe_shared_ffn_hidden_size
        if shared % cfg.expert_ffn_hidden_size:
            problems.append(f"a shared expert of width {shared}, not a multiple of the experts' "
                            f"{cfg.expert_ffn_hidden_size}")
        if not cfg.qk_norm:
            problems.append("attention without query/key norms (llada2's code always norms them)")
    return problems


def _rope_scaling(cfg: ModelConfig) -> dict | None:
    if cfg.rope_scaling == "none":
        return None
    return {"rope_type": "llama3", "factor": cfg.rope_scaling_factor, "low_freq_factor": cfg.rope_low_freq_factor,
            "high_freq_factor": cfg.rope_high_freq_factor,
            "original_max_position_embeddings": cfg.rope_original_max_positions}


def export_config(cfg: ModelConfig, family: str, tokens: dict, memory: dict, dtype: str = "float32") -> dict:
    """``config.json`` of an export in ``family``'s form."""
    _refuse(cfg, family)
    mask = tokens.get("mask_token_id", cfg.mask_token_id)
    eos, pad = tokens.get("eot_token_id"), tokens.get("pad_token_id")
    if family in MOE_FAMILIES:
        return _moe_export_config(cfg, family, mask, eos, pad, dtype)
    if family == "llada":
        return {
            "architectures": PUBLISHED_CODE["llada"][1], "auto_map": dict(PUBLISHED_CODE["llada"][0]),
            "model_type": "llada", "d_model": cfg.hidden_size, "n_heads": cfg.num_heads,
            "n_kv_heads": cfg.key_value_heads, "n_layers": cfg.num_layers, "mlp_hidden_size": cfg.ffn_hidden_size,
            "mlp_ratio": max(1, cfg.ffn_hidden_size // cfg.hidden_size), "vocab_size": cfg.vocab_size,
            "embedding_size": cfg.vocab_size, "max_sequence_length": cfg.seq_len, "rope": True,
            "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.norm_eps, "layer_norm_type": "rms",
            "block_type": "llama", "activation_type": "silu", "alibi": False, "flash_attention": False,
            "attention_layer_norm": False, "include_bias": False, "include_qkv_bias": False,
            "layer_norm_with_affine": True, "bias_for_layer_norm": False, "input_emb_norm": False,
            "rope_full_precision": True, "embedding_dropout": 0.0, "attention_dropout": 0.0, "residual_dropout": 0.0,
            "block_group_size": 1, "multi_query_attention": None,
            "weight_tying": cfg.tie_embeddings, "scale_logits": False, "init_std": cfg.init_std,
            "mask_token_id": mask, "eos_token_id": eos, "pad_token_id": pad, "use_cache": False,
            "torch_dtype": dtype,
        }
    config = {
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.key_value_heads, "head_dim": cfg.attention_head_dim,
        "max_position_embeddings": cfg.seq_len, "rope_theta": cfg.rope_theta, "rope_scaling": _rope_scaling(cfg),
        "rms_norm_eps": cfg.norm_eps, "hidden_act": "silu", "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std, "use_cache": False, "torch_dtype": dtype,
        "mask_token_id": mask, "eos_token_id": eos, "pad_token_id": pad,
    }
    if family in ("llama", "qwen3"):
        config |= {"attention_bias": False, "mlp_bias": False}
    if family in ("qwen2", "qwen3", "dream"):
        config |= {"use_sliding_window": False, "sliding_window": None, "max_window_layers": cfg.num_layers}
    if family in ("llama", "qwen2", "qwen3"):
        name = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[family]
        return config | {"architectures": [name], "model_type": family}
    if family == "dream":
        auto_map, architectures, _ = PUBLISHED_CODE["dream"]
        return config | {"architectures": architectures, "auto_map": dict(auto_map), "model_type": "Dream"}
    auto_map, architectures, _ = PUBLISHED_CODE["memdlm"]
    return config | {
        "architectures": architectures, "auto_map": dict(auto_map), "model_type": "memdlm",
        "attention_bias": False, "mlp_bias": False, "qkv_bias": cfg.qkv_bias, "qk_norm": cfg.qk_norm,
        "shifted_prediction": cfg.shifted_prediction, "bidirectional_attention": True, "memdlm_memory": memory,
        "memdlm_family": cfg.family,
    }


def _moe_export_config(cfg: ModelConfig, family: str, mask, eos, pad, dtype: str) -> dict:
    auto_map, architectures, _ = PUBLISHED_CODE[family]
    common = {
        "architectures": architectures, "auto_map": dict(auto_map), "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.key_value_heads, "max_position_embeddings": cfg.seq_len,
        "rope_theta": cfg.rope_theta, "rope_scaling": None, "rms_norm_eps": cfg.norm_eps, "hidden_act": "silu",
        "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.init_std, "use_cache": False,
        "partial_rotary_factor": cfg.rope_fraction, "num_experts": cfg.moe_num_experts,
        "num_experts_per_tok": cfg.moe_top_k, "torch_dtype": dtype, "mask_token_id": mask, "eos_token_id": eos,
        "pad_token_id": pad,
    }
    dense = cfg.moe_first_dense_layers
    if family == "llada_moe":
        return common | {
            "model_type": "llada", "dense_intermediate_size": cfg.ffn_hidden_size,
            "expert_intermediate_size": cfg.expert_ffn_hidden_size,
            "shared_expert_intermediate_size": cfg.moe_shared_ffn_hidden_size or None,
            "moe_layer_freq": [0] * dense + [1] * (cfg.num_layers - dense),
            "moe_router_enable_expert_bias": cfg.moe_bias_in_weights, "moe_router_score_function": "softmax",
            "norm_topk_prob": False, "routed_scaling_factor": 1, "qk_layernorm": True, "clip_qkv": None,
            "attention_bias": False, "router_aux_loss_coef": cfg.moe_aux_loss_coeff,
        }
    return common | {
        "model_type": "llada2_moe", "head_dim": cfg.attention_head_dim, "intermediate_size": cfg.ffn_hidden_size,
        "moe_intermediate_size": cfg.expert_ffn_hidden_size,
        "num_shared_experts": cfg.moe_shared_ffn_hidden_size // cfg.expert_ffn_hidden_size or None,
        "n_group": cfg.moe_num_groups, "topk_group": cfg.moe_topk_groups,
        "routed_scaling_factor": cfg.moe_routed_scaling, "first_k_dense_replace": dense, "norm_topk_prob": True,
        "score_function": "sigmoid", "router_dtype": "fp32", "moe_router_enable_expert_bias": True,
        "use_qk_norm": True, "use_qkv_bias": cfg.qkv_bias, "use_bias": False,
        "rotary_dim": cfg.rotary_dim, "max_window_layers": cfg.num_layers, "use_sliding_window": False,
    }


def remote_code_note(family: str) -> str | None:
    """What a user does so that the export loads with the family's own code (None: nothing)."""
    if family not in ("llada", "dream", *MOE_FAMILIES):
        return None
    files = " ".join(PUBLISHED_CODE[family][2])
    return (f"the {family} format loads with that family's published modeling code: copy {files} from the original "
            f"model's folder into the export (or pass --code-from THAT_FOLDER)")


# -- import ---------------------------------------------------------------------------------------------
def _common_problems(config: dict) -> list[str]:
    problems = []
    if config.get("sliding_window") is not None and config.get("use_sliding_window", True):
        problems.append(f"sliding-window attention ({config['sliding_window']} tokens) is not supported")
    if config.get("hidden_act", config.get("activation_type", "silu")) not in ("silu", "swiglu"):
        problems.append(f"activation {config.get('hidden_act', config.get('activation_type'))!r} is not SwiGLU's "
                        "silu")
    if config.get("mlp_bias") or config.get("include_bias"):
        problems.append("MLP/output projection biases are not supported")
    scaling = config.get("rope_scaling")
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) not in ("default", "llama3"):
        problems.append(f"rope scaling {scaling!r} is not supported (plain RoPE and llama3 only)")
    return problems


def _rope_fields(config: dict) -> dict:
    scaling = config.get("rope_scaling") or {}
    if scaling.get("rope_type", scaling.get("type", "default")) != "llama3":
        return {}
    return {"rope_scaling": "llama3", "rope_scaling_factor": float(scaling["factor"]),
            "rope_low_freq_factor": float(scaling["low_freq_factor"]),
            "rope_high_freq_factor": float(scaling["high_freq_factor"]),
            "rope_original_max_positions": int(scaling["original_max_position_embeddings"])}


def _llada_fields(config: dict, where: str) -> dict:
    problems = _common_problems(config)
    for key, wanted in (("block_type", "llama"), ("layer_norm_type", "rms"), ("alibi", False), ("rope", True),
                        ("attention_layer_norm", False), ("include_qkv_bias", False), ("scale_logits", False),
                        ("input_emb_norm", False), ("layer_norm_with_affine", True), ("bias_for_layer_norm", False),
                        ("multi_query_attention", None)):
        if key in config and config[key] != wanted:
            problems.append(f"{key} {config[key]!r} (only {wanted!r} is supported)")
    if config.get("embedding_size") not in (None, config["vocab_size"]):
        problems.append(f"embedding_size {config['embedding_size']} differs from vocab_size {config['vocab_size']}")
    if problems:
        raise HuggingFaceFormatError(f"{where} cannot be imported: " + "; ".join(problems))
    hidden, heads = config["d_model"], config["n_heads"]
    kv = config.get("n_kv_heads") or heads
    return {
        "vocab_size": config["vocab_size"], "hidden_size": hidden, "num_layers": config["n_layers"],
        "num_heads": heads, "num_kv_heads": 0 if kv == heads else kv,
        "ffn_hidden_size": config.get("mlp_hidden_size") or config.get("mlp_ratio", 4) * hidden,
        "rope_theta": float(config.get("rope_theta", 10000.0)), "norm_eps": float(config.get("rms_norm_eps", 1e-5)),
        "init_std": float(config.get("init_std", 0.02)), "tie_embeddings": bool(config.get("weight_tying", False)),
        "seq_len": int(config.get("max_sequence_length", 2048)), "family": "llada",
    }


def _moe_fields(config: dict, family: str, where: str) -> dict:
    """LLaDA-MoE's and LLaDA2's fields, as their published code reads them (``tests/fixtures/moe_families``)."""
    problems = _common_problems(config)
    hidden, heads, layers = config["hidden_size"], config["num_attention_heads"], config["num_hidden_layers"]
    kv = config.get("num_key_value_heads") or heads
    experts, top_k = config["num_experts"], config["num_experts_per_tok"]
    fraction = config.get("partial_rotary_factor", 1.0 if family == "llada2" else -1)
    if fraction is None or not 0 < float(fraction) <= 1:
        problems.append(f"partial_rotary_factor {fraction} (the published code then rotates nothing; set it, e.g. "
                        "1.0)")
    if config.get("rope_scaling"):
        problems.append("RoPE scaling")
    fields = {"vocab_size": config["vocab_size"], "hidden_size": hidden, "num_layers": layers, "num_heads": heads,
              "num_kv_heads": 0 if kv == heads else kv, "rope_theta": float(config.get("rope_theta", 10000.0)),
              "norm_eps": float(config.get("rms_norm_eps", 1e-6)),
              "init_std": float(config.get("initializer_range", 0.02)),
              "tie_embeddings": bool(config.get("tie_word_embeddings", False)),
              "seq_len": int(config.get("max_position_embeddings", 2048)), "family": family,
              "rope_fraction": float(fraction) if fraction and float(fraction) > 0 else 1.0,
              "moe_num_experts": experts, "moe_top_k": top_k}
    if family == "llada_moe":
        pattern = list(config.get("moe_layer_freq") or [1] * layers)
        dense = pattern.index(1) if 1 in pattern else layers
        if pattern != [0] * dense + [1] * (layers - dense) or dense == layers:
            problems.append(f"moe_layer_freq {pattern} (dense layers first, then MoE layers, is supported)")
        if config.get("clip_qkv") is not None:
            problems.append(f"clip_qkv {config['clip_qkv']}")
        if config.get("attention_bias"):
            problems.append("attention biases")
        if problems:
            raise HuggingFaceFormatError(f"{where} cannot be imported: " + "; ".join(problems))
        # The published code: softmax scores, never renormalised or scaled, the bias (if any) added before the top-k.
        return fields | {
            "ffn_hidden_size": config["dense_intermediate_size"], "moe_ffn_hidden_size": config[
                "expert_intermediate_size"], "moe_shared_ffn_hidden_size": config.get(
                "shared_expert_intermediate_size") or 0, "moe_first_dense_layers": dense, "moe_score": "softmax",
            "moe_bias_in_weights": bool(config.get("moe_router_enable_expert_bias", False)),
            "qk_norm": bool(config.get("qk_layernorm", False))}
    if config.get("use_bias", True):
        problems.append("a bias on the attention output projection (use_bias)")
    if problems:
        raise HuggingFaceFormatError(f"{where} cannot be imported: " + "; ".join(problems))
    head_dim = config.get("head_dim") or hidden // heads
    width = config["moe_intermediate_size"]
    # The published code: sigmoid scores, the bias choosing only, groups scored by their two best, weights
    # renormalised (whenever more than one expert is chosen) and scaled.
    return fields | {
        "head_dim": 0 if head_dim * heads == hidden else head_dim, "ffn_hidden_size": config["intermediate_size"],
        "moe_ffn_hidden_size": width, "moe_shared_ffn_hidden_size": width * (config.get("num_shared_experts") or 0),
        "moe_first_dense_layers": int(config.get("first_k_dense_replace") or 0), "moe_score": "sigmoid",
        "moe_num_groups": int(config.get("n_group") or 1), "moe_topk_groups": int(config.get("topk_group") or 1),
        "moe_norm_topk": top_k > 1, "moe_routed_scaling": float(config.get("routed_scaling_factor", 1.0)),
        "qk_norm": bool(config.get("use_qk_norm", True)), "qkv_bias": bool(config.get("use_qkv_bias", False))}


def model_fields(config: dict, where: str) -> dict:
    """Our ``ModelConfig`` fields from a Hugging Face ``config.json``; refuses what we cannot run, saying why."""
    family = family_of(config, where)
    if family == "llada":
        return _llada_fields(config, where)
    if family in MOE_FAMILIES:
        return _moe_fields(config, family, where)
    problems = _common_problems(config)
    if family in ("llama", "qwen3") and config.get("attention_bias"):
        problems.append("attention biases on the output projection are not supported")
    heads, hidden = config["num_attention_heads"], config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // heads
    if head_dim * heads != hidden and family not in ("qwen3", "memdlm", "llama"):
        problems.append(f"head_dim {head_dim} x {heads} heads != hidden_size {hidden}")
    if problems:
        raise HuggingFaceFormatError(f"{where} cannot be imported: " + "; ".join(problems))
    kv = config.get("num_key_value_heads") or heads
    return {
        "vocab_size": config["vocab_size"], "hidden_size": hidden, "num_layers": config["num_hidden_layers"],
        "num_heads": heads, "num_kv_heads": 0 if kv == heads else kv,
        "head_dim": 0 if head_dim * heads == hidden else head_dim,
        "ffn_hidden_size": config["intermediate_size"], "rope_theta": float(config.get("rope_theta", 10000.0)),
        "norm_eps": float(config.get("rms_norm_eps", 1e-6)), "init_std": float(config.get("initializer_range", 0.02)),
        "qkv_bias": family in ("qwen2", "dream") or bool(config.get("qkv_bias", False)),
        "qk_norm": family == "qwen3" or bool(config.get("qk_norm", False)),
        "shifted_prediction": family == "dream" or bool(config.get("shifted_prediction", False)),
        "tie_embeddings": bool(config.get("tie_word_embeddings", False)),
        "seq_len": int(config.get("max_position_embeddings", 2048)),
        "family": config.get("memdlm_family", "memdlm") if family == "memdlm" else family, **_rope_fields(config),
    }


def padded_vocab(size: int) -> int:
    return -(-size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
