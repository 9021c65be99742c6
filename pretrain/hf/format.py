"""The Hugging Face (Llama) form of our model: tensor names and layouts, and the config both ways.

Our names -> Llama's:

| ours | Llama |
| --- | --- |
| ``embedding.weight`` | ``model.embed_tokens.weight`` |
| ``layers.N.attention_norm.weight`` | ``model.layers.N.input_layernorm.weight`` |
| ``layers.N.attention.qkv.weight`` | ``model.layers.N.self_attn.{q,k,v}_proj.weight`` (split, see below) |
| ``layers.N.attention.out.weight`` | ``model.layers.N.self_attn.o_proj.weight`` |
| ``layers.N.mlp_norm.weight`` | ``model.layers.N.post_attention_layernorm.weight`` |
| ``layers.N.mlp.{gate,up,down}.weight`` | ``model.layers.N.mlp.{gate,up,down}_proj.weight`` |
| ``final_norm.weight`` | ``model.norm.weight`` |
| ``lm_head.weight`` | ``lm_head.weight`` |

The fused projection's rows are ``[kv head, (its query heads, key, value), head_dim]``; Llama keeps
``q_proj`` rows by query head and ``k_proj``/``v_proj`` rows by key/value head, with query head ``i``
served by key/value head ``i // group``. Both use RoPE in the rotate-half convention, so no rows are
permuted within a head.
"""

from __future__ import annotations

import re

import torch

from common.errors import UsageError
from pretrain.config import ModelConfig

REMOTE_CODE_FILES = ("configuration_memdlm.py", "modeling_memdlm.py")
AUTO_MAP = {"AutoConfig": "configuration_memdlm.MemDLMConfig",
            "AutoModelForMaskedLM": "modeling_memdlm.MemDLMForMaskedLM"}
VOCAB_MULTIPLE = 64  # an imported vocabulary that grows (a mask token) is padded to a multiple of this

_SIMPLE = {
    "embedding.weight": "model.embed_tokens.weight",
    "final_norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
_LAYER = {
    "attention_norm.weight": "input_layernorm.weight",
    "attention.out.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.gate.weight": "mlp.gate_proj.weight",
    "mlp.up.weight": "mlp.up_proj.weight",
    "mlp.down.weight": "mlp.down_proj.weight",
}
_QKV = "attention.qkv.weight"


class HuggingFaceFormatError(UsageError):
    """A Hugging Face checkpoint this project cannot take; the message says why."""


def hf_names(name: str) -> list[str]:
    """The Llama tensor name(s) of one of ours (three for the fused q/k/v projection)."""
    if name in _SIMPLE:
        return [_SIMPLE[name]]
    match = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if match is None:
        raise KeyError(f"no Hugging Face name for {name}")
    layer, rest = match.groups()
    prefix = f"model.layers.{layer}."
    if rest == _QKV:
        return [prefix + f"self_attn.{p}_proj.weight" for p in ("q", "k", "v")]
    return [prefix + _LAYER[rest]]


def split_qkv(weight: torch.Tensor, cfg: ModelConfig) -> list[torch.Tensor]:
    """Our fused ``[qkv rows, hidden]`` -> Llama's q, k, v."""
    kv, group, d = cfg.key_value_heads, cfg.num_heads // cfg.key_value_heads, cfg.head_dim
    blocks = weight.reshape(kv, group + 2, d, weight.shape[-1])
    return [blocks[:, :group].reshape(kv * group * d, -1).contiguous(),
            blocks[:, group].reshape(kv * d, -1).contiguous(),
            blocks[:, group + 1].reshape(kv * d, -1).contiguous()]


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Llama's q, k, v -> our fused projection."""
    kv, group, d = cfg.key_value_heads, cfg.num_heads // cfg.key_value_heads, cfg.head_dim
    hidden = q.shape[-1]
    return torch.cat([q.reshape(kv, group, d, hidden), k.reshape(kv, 1, d, hidden), v.reshape(kv, 1, d, hidden)],
                     dim=1).reshape(-1, hidden)


def to_hf(name: str, tensor: torch.Tensor, cfg: ModelConfig) -> list[tuple[str, torch.Tensor]]:
    names = hf_names(name)
    if name.endswith(_QKV):
        return list(zip(names, split_qkv(tensor, cfg)))
    return [(names[0], tensor)]


def hf_config(cfg: ModelConfig, tokens: dict, memory: dict, dtype: str = "float32") -> dict:
    """``config.json`` of an export: a Llama config, bidirectional, with the mask token and memory settings."""
    return {
        "architectures": ["MemDLMForMaskedLM"], "model_type": "memdlm", "auto_map": dict(AUTO_MAP),
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.key_value_heads, "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.seq_len, "rope_theta": cfg.rope_theta, "rope_scaling": None,
        "rms_norm_eps": cfg.norm_eps, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "tie_word_embeddings": False, "initializer_range": cfg.init_std, "use_cache": False,
        "torch_dtype": dtype, "mask_token_id": tokens.get("mask_token_id", cfg.mask_token_id),
        "eos_token_id": tokens.get("eot_token_id"), "pad_token_id": tokens.get("pad_token_id"),
        "bidirectional_attention": True, "memdlm_memory": memory,
    }


def model_fields_from_hf(config: dict, where: str) -> dict:
    """Our ``ModelConfig`` fields from a Hugging Face ``config.json``; refuses what we cannot run, saying why."""
    kind = config.get("model_type")
    if kind == "qwen2":
        raise HuggingFaceFormatError(f"{where} is a Qwen2 model: its q/k/v projections have biases, which this "
                                     "project's layers do not have")
    if kind not in ("llama", "mistral", "memdlm"):
        raise HuggingFaceFormatError(f"{where} is a {kind!r} model; only the Llama architecture (llama, mistral "
                                     "without sliding window, memdlm exports) can be imported")
    problems = []
    if kind == "mistral" and config.get("sliding_window") is not None:
        problems.append(f"sliding-window attention ({config['sliding_window']} tokens) is not supported")
    if config.get("hidden_act", "silu") != "silu":
        problems.append(f"activation {config['hidden_act']!r} is not SwiGLU's silu")
    if config.get("attention_bias") or config.get("mlp_bias"):
        problems.append("projection biases are not supported")
    scaling = config.get("rope_scaling")
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) != "default":
        problems.append(f"rope scaling {scaling!r} is not supported (plain RoPE only)")
    heads, hidden = config["num_attention_heads"], config["hidden_size"]
    if config.get("head_dim", hidden // heads) * heads != hidden:
        problems.append(f"head_dim {config.get('head_dim')} x {heads} heads != hidden_size {hidden}")
    if problems:
        raise HuggingFaceFormatError(f"{where} cannot be imported: " + "; ".join(problems))
    kv = config.get("num_key_value_heads") or heads
    return {
        "vocab_size": config["vocab_size"], "hidden_size": hidden, "num_layers": config["num_hidden_layers"],
        "num_heads": heads, "num_kv_heads": 0 if kv == heads else kv,
        "ffn_hidden_size": config["intermediate_size"], "rope_theta": float(config.get("rope_theta", 10000.0)),
        "norm_eps": float(config.get("rms_norm_eps", 1e-6)),
        "init_std": float(config.get("initializer_range", 0.02)),
    }


def padded_vocab(size: int) -> int:
    return -(-size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
