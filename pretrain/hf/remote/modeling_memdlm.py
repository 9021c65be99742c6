"""A MemDLM masked diffusion LM for Hugging Face transformers: Llama's layers with full
(bidirectional) attention and a masked-LM head.

The weights use Llama's names and layout, so the same files also load into ``LlamaForCausalLM``,
which gives the same logits when it is given a 4-D all-zeros additive attention mask.
"""

import torch
from torch import nn
from transformers import LlamaModel, LlamaPreTrainedModel
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


class MemDLMForMaskedLM(LlamaPreTrainedModel):
    config_class = MemDLMConfig

    def __init__(self, config):
        super().__init__(config)
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                **kwargs):
        reference = input_ids if input_ids is not None else inputs_embeds
        batch, length = reference.shape[:2]
        dtype = self.model.embed_tokens.weight.dtype
        mask = bidirectional_mask(attention_mask, batch, length, dtype, reference.device)
        outputs = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                             inputs_embeds=inputs_embeds, use_cache=False, **kwargs)
        logits = self.lm_head(outputs.last_hidden_state)
        loss = None
        if labels is not None:  # -100 marks positions without a target, as in other masked LMs
            loss = nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                               ignore_index=-100)
        return MaskedLMOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                              attentions=outputs.attentions)
