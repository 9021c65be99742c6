"""Configuration of a MemDLM masked diffusion LM exported for Hugging Face transformers.

A Llama configuration plus what a diffusion LM needs: the mask token, bidirectional attention, the architecture
options of the model (``qkv_bias``, ``qk_norm``, ``shifted_prediction``; ``head_dim``, ``rope_scaling`` and
``tie_word_embeddings`` as Llama has them), the family it came from (``memdlm_family``), and the MemDLM memory
settings that inference-time adaptation uses (``memdlm_memory``).
"""

from transformers import LlamaConfig


class MemDLMConfig(LlamaConfig):
    model_type = "memdlm"

    def __init__(self, mask_token_id=None, memdlm_memory=None, bidirectional_attention=True, qkv_bias=False,
                 qk_norm=False, shifted_prediction=False, memdlm_family="memdlm", **kwargs):
        self.mask_token_id = mask_token_id
        self.memdlm_memory = memdlm_memory or {}
        self.bidirectional_attention = bidirectional_attention
        self.qkv_bias = qkv_bias
        self.qk_norm = qk_norm
        self.shifted_prediction = shifted_prediction
        self.memdlm_family = memdlm_family
        super().__init__(**kwargs)
