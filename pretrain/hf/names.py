"""Tensor names and layouts of each Hugging Face family, both ways.

Our names -> a family's (``N`` a layer; Llama-style = llama, qwen2, qwen3, dream and our own memdlm export):

| ours | Llama-style | LLaDA |
| --- | --- | --- |
| ``embedding.weight`` | ``model.embed_tokens.weight`` | ``model.transformer.wte.weight`` |
| ``layers.N.attention_norm.weight`` | ``model.layers.N.input_layernorm.weight`` | ``...blocks.N.attn_norm.weight`` |
| ``layers.N.attention.qkv.{weight,bias}`` | ``...self_attn.{q,k,v}_proj.*`` | ``...blocks.N.{q,k,v}_proj.*`` |
| ``layers.N.attention.{q,k}_norm.weight`` | ``...self_attn.{q,k}_norm.weight`` (Qwen3) | (none) |
| ``layers.N.attention.out.weight`` | ``...self_attn.o_proj.weight`` | ``...blocks.N.attn_out.weight`` |
| ``layers.N.mlp_norm.weight`` | ``...post_attention_layernorm.weight`` | ``...blocks.N.ff_norm.weight`` |
| ``layers.N.mlp.{gate,up,down}.weight`` | ``...mlp.{gate,up,down}_proj.weight`` | ``...{ff_proj,up_proj,ff_out}.*`` |
| ``final_norm.weight`` | ``model.norm.weight`` | ``model.transformer.ln_f.weight`` |
| ``lm_head.weight`` | ``lm_head.weight`` | ``model.transformer.ff_out.weight`` |

LLaDA-MoE keeps Llama-style names (its shared expert at ``model.layers.N.shared_expert.*``); LLaDA2's are
``model.word_embeddings``, ``attention.query_key_value`` (fused), ``attention.{query,key}_layernorm``,
``attention.dense`` and ``mlp.shared_experts.*``; both name the router ``mlp.gate.weight`` and each routed expert
``mlp.experts.E.{gate,up,down}_proj.weight`` (see ``Naming``).

With tied embeddings there is no head tensor (the embedding is the head). The fused projection's rows are
``[kv head, (its query heads, key, value), head_dim]``; the families keep ``q_proj`` rows by query head and
``k_proj``/``v_proj`` rows by key/value head, query head ``i`` served by key/value head ``i // group``. All
use RoPE in the rotate-half convention, so no rows are permuted within a head.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import torch

from pretrain.config import ModelConfig


@dataclass(frozen=True)
class Naming:
    """One family's tensor names: the three outside the layers, and each layer's (``{n}`` its index).

    Mixture-of-experts families also name an MoE layer's router (ours ``mlp.router.weight``), its expert bias
    (ours ``mlp.expert_bias``: a row of the model's routing table, not a parameter), each routed expert's
    projections (``experts``, with ``{e}`` the expert and ``{p}`` gate/up/down; ours are stacked
    ``mlp.experts.{gate,up,down}``) and the shared expert's (``shared`` + ``{p}_proj.weight``). ``fused_qkv``: the
    family keeps q, k and v as one tensor, all query heads, then all key heads, then all value heads (LLaDA2)."""

    embedding: str
    final_norm: str
    head: str
    layer: str
    parts: dict
    qkv: tuple
    router: str = ""
    expert_bias: str = ""
    experts: str = ""
    shared: str = ""
    fused_qkv: bool = False

    def names(self, ours: str, num_experts: int = 0) -> list[str]:
        """The family's name(s) of one of our tensors (three for the fused q/k/v projection and its bias, unless
        the family fuses them too; one per expert for a stacked expert tensor)."""
        simple = {"embedding.weight": self.embedding, "final_norm.weight": self.final_norm,
                  "lm_head.weight": self.head}
        if ours in simple:
            return [simple[ours]]
        match = re.fullmatch(r"layers\.(\d+)\.(.+)", ours)
        if match is None:
            raise KeyError(f"no Hugging Face name for {ours}")
        layer, rest = match.groups()
        prefix = self.layer.format(n=layer)
        if rest in ("attention.qkv.weight", "attention.qkv.bias"):
            kind = rest.rsplit(".", 1)[1]
            return [f"{prefix}{p}.{kind}" for p in self.qkv]
        expert = re.fullmatch(r"mlp\.experts\.(gate|up|down)", rest)
        if expert and self.experts:
            return [prefix + self.experts.format(e=e, p=expert.group(1)) for e in range(num_experts)]
        shared = re.fullmatch(r"mlp\.shared_expert\.(gate|up|down)\.weight", rest)
        if shared and self.shared:
            return [f"{prefix}{self.shared}{shared.group(1)}_proj.weight"]
        moe = {"mlp.router.weight": self.router, "mlp.expert_bias": self.expert_bias}
        if moe.get(rest):
            return [prefix + moe[rest]]
        if rest not in self.parts:
            raise KeyError(f"no Hugging Face name for {ours} in this family")
        return [prefix + self.parts[rest]]


LLAMA_STYLE = Naming(
    embedding="model.embed_tokens.weight", final_norm="model.norm.weight", head="lm_head.weight",
    layer="model.layers.{n}.",
    parts={"attention_norm.weight": "input_layernorm.weight", "attention.out.weight": "self_attn.o_proj.weight",
           "mlp_norm.weight": "post_attention_layernorm.weight", "mlp.gate.weight": "mlp.gate_proj.weight",
           "mlp.up.weight": "mlp.up_proj.weight", "mlp.down.weight": "mlp.down_proj.weight",
           "attention.q_norm.weight": "self_attn.q_norm.weight", "attention.k_norm.weight": "self_attn.k_norm.weight"},
    qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
)
LLADA = Naming(
    embedding="model.transformer.wte.weight", final_norm="model.transformer.ln_f.weight",
    head="model.transformer.ff_out.weight", layer="model.transformer.blocks.{n}.",
    parts={"attention_norm.weight": "attn_norm.weight", "attention.out.weight": "attn_out.weight",
           "mlp_norm.weight": "ff_norm.weight", "mlp.gate.weight": "ff_proj.weight", "mlp.up.weight": "up_proj.weight",
           "mlp.down.weight": "ff_out.weight"},
    qkv=("q_proj", "k_proj", "v_proj"),
)
LLADA_MOE = dataclasses.replace(
    LLAMA_STYLE, router="mlp.gate.weight", expert_bias="mlp.expert_bias", experts="mlp.experts.{e}.{p}_proj.weight",
    shared="shared_expert.")  # the shared expert sits on the layer, beside the MoE block
LLADA2 = Naming(
    embedding="model.word_embeddings.weight", final_norm="model.norm.weight", head="lm_head.weight",
    layer="model.layers.{n}.",
    parts={"attention_norm.weight": "input_layernorm.weight", "attention.out.weight": "attention.dense.weight",
           "mlp_norm.weight": "post_attention_layernorm.weight", "mlp.gate.weight": "mlp.gate_proj.weight",
           "mlp.up.weight": "mlp.up_proj.weight", "mlp.down.weight": "mlp.down_proj.weight",
           "attention.q_norm.weight": "attention.query_layernorm.weight",
           "attention.k_norm.weight": "attention.key_layernorm.weight"},
    qkv=("attention.query_key_value",), router="mlp.gate.weight", expert_bias="mlp.gate.expert_bias",
    experts="mlp.experts.{e}.{p}_proj.weight", shared="mlp.shared_experts.", fused_qkv=True,
)
NAMINGS = {"memdlm": LLAMA_STYLE, "llama": LLAMA_STYLE, "qwen2": LLAMA_STYLE, "qwen3": LLAMA_STYLE,
           "dream": LLAMA_STYLE, "llada": LLADA, "llada_moe": LLADA_MOE, "llada2": LLADA2}


def _grouped(tensor: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    kv, group, d = cfg.key_value_heads, cfg.num_heads // cfg.key_value_heads, cfg.attention_head_dim
    return tensor.reshape(kv, group + 2, d, -1)


def split_qkv(fused: torch.Tensor, cfg: ModelConfig) -> list[torch.Tensor]:
    """Our fused ``[qkv rows, hidden]`` weight (or ``[qkv rows]`` bias) -> the family's q, k, v."""
    blocks = _grouped(fused, cfg)
    group, tail = cfg.num_heads // cfg.key_value_heads, fused.shape[1:]
    return [blocks[:, :group].reshape(-1, *tail).contiguous(), blocks[:, group].reshape(-1, *tail).contiguous(),
            blocks[:, group + 1].reshape(-1, *tail).contiguous()]


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """The family's q, k, v (weights or biases) -> our fused projection."""
    kv, group, d = cfg.key_value_heads, cfg.num_heads // cfg.key_value_heads, cfg.attention_head_dim
    tail = q.shape[1:]
    return torch.cat([q.reshape(kv, group, d, *tail), k.reshape(kv, 1, d, *tail), v.reshape(kv, 1, d, *tail)],
                     dim=1).reshape(-1, *tail)


def to_family(name: str, tensor: torch.Tensor, cfg: ModelConfig, naming: Naming) -> list[tuple[str, torch.Tensor]]:
    names = naming.names(name, cfg.moe_num_experts)
    if name.endswith(("attention.qkv.weight", "attention.qkv.bias")):
        parts = split_qkv(tensor, cfg)
        return list(zip(names, parts)) if len(names) == 3 else [(names[0], torch.cat(parts))]
    if ".mlp.experts." in name:
        return [(n, expert.contiguous()) for n, expert in zip(names, tensor.unbind(0))]
    return [(names[0], tensor)]


def from_family(name: str, values: list[torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    """One of our tensors from the family's tensor(s) named by ``Naming.names``: q, k, v merged into our fused
    layout (split first when the family fuses them its own way), experts stacked."""
    if name.endswith(("attention.qkv.weight", "attention.qkv.bias")):
        if len(values) == 1:
            d = cfg.attention_head_dim
            sizes = [cfg.num_heads * d, cfg.key_value_heads * d, cfg.key_value_heads * d]
            values = list(values[0].split(sizes))
        return merge_qkv(*values, cfg)
    if ".mlp.experts." in name:
        return torch.stack(values)
    (value,) = values
    return value
