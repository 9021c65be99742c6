"""A MemDLM masked diffusion LM for Hugging Face transformers: a Llama-family decoder stack with full
(bidirectional) attention and a masked-LM head.

The weights use Llama's names and layout. The stack is transformers' own: ``LlamaModel``, or ``Qwen2Model`` when
the q/k/v projections have biases, or ``Qwen3Model`` when queries and keys are normed per head (its output
projection then has no bias, as ours). With ``shifted_prediction`` (Dream-style models) position i's logits come
from position i - 1 (position 0 keeps its own), so ``logits[:, i]`` always scores token i.
"""

import torch
from torch import nn
from transformers import LlamaConfig, LlamaModel, PreTrainedModel, Qwen2Config, Qwen2Model, Qwen3Config, Qwen3Model
from transformers.modeling_outputs import MaskedLMOutput

try:
    from .configuration_memdlm import MemDLMConfig
except ImportError:  # loaded as a top-level module
    from configuration_memdlm import MemDLMConfig


def bidirectional_mask(attention_mask, batch: int, length: int, dtype, device):
    """A ``[b, 1, l, l]`` additive mask: every position sees every real (non-padding) token."""
    mask = torch.zeros(batch, 1, length, length, dtype=dtype, device=device)
    if attention_mask is not None:
        padding = ~attention_mask.to(torch.bool)[:, None, None, :]
        mask = mask.masked_fill(padding, torch.finfo(dtype).min)
    return mask


def decoder_stack(config):
    """transformers' decoder stack that holds the config's options."""
    settings = config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "transformers_version"):
        settings.pop(key, None)
    if getattr(config, "qk_norm", False):
        stack = Qwen3Model(Qwen3Config(**settings | {"attention_bias": bool(getattr(config, "qkv_bias", False)),
                                                     "use_sliding_window": False}))
        for layer in stack.layers:  # ours has no output-projection bias
            out = layer.self_attn.o_proj
            layer.self_attn.o_proj = nn.Linear(out.in_features, out.out_features, bias=False)
        return stack
    if getattr(config, "qkv_bias", False):
        return Qwen2Model(Qwen2Config(**settings | {"use_sliding_window": False}))
    return LlamaModel(LlamaConfig(**settings))


class MemDLMForMaskedLM(PreTrainedModel):
    config_class = MemDLMConfig
    base_model_prefix = "model"
    _tied_weights_keys = ["lm_head.weight"]

    def __init__(self, config):
        super().__init__(config)
        self.model = decoder_stack(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                **kwargs):
        reference = input_ids if input_ids is not None else inputs_embeds
        batch, length = reference.shape[:2]
        dtype = self.model.embed_tokens.weight.dtype
        mask = bidirectional_mask(attention_mask, batch, length, dtype, reference.device)
        outputs = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                             inputs_embeds=inputs_embeds, use_cache=False, **kwargs)
        logits = self.lm_head(outputs.last_hidden_state)
        if getattr(self.config, "shifted_prediction", False):
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        loss = None
        if labels is not None:  # -100 marks positions without a target, as in other masked LMs
            loss = nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                               ignore_index=-100)
        return MaskedLMOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                              attentions=outputs.attentions)
