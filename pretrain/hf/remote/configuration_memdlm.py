"""Configuration of a MemDLM masked diffusion LM exported for Hugging Face transformers.

A Llama configuration plus what a diffusion LM needs: the mask token, bidirectional attention, and
the MemDLM memory settings that inference-time adaptation uses (``memdlm_memory``).
"""

from transformers import LlamaConfig


class MemDLMConfig(LlamaConfig):
    model_type = "memdlm"

    def __init__(self, mask_token_id=None, memdlm_memory=None, bidirectional_attention=True, **kwargs):
        self.mask_token_id = mask_token_id
        self.memdlm_memory = memdlm_memory or {}
        self.bidirectional_attention = bidirectional_attention
        super().__init__(**kwargs)
