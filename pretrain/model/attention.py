"""Bidirectional attention: which kernel runs, and how a document mask is given to it.

- No mask, or key padding (``[b, 1, 1, l]``): ``scaled_dot_product_attention``. On CUDA an unmasked
  call reaches the flash kernel (bf16) or the memory-efficient one; a key-padding mask the
  memory-efficient one. Neither materialises an ``[l, l]`` score matrix.
- Attention within documents: on CUDA a FlexAttention ``BlockMask`` built from the segment ids (only
  the blocks that cross no document boundary are computed; nothing ``[b, 1, l, l]`` is built), run by
  a compiled ``flex_attention``. On the CPU the dense boolean ``[b, 1, l, l]`` mask and SDPA, as before.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def document_block_mask(segment_ids: torch.Tensor):
    """A FlexAttention block mask: position q sees position k iff they are in the same document
    (padding, segment -1, sees padding)."""
    from torch.nn.attention.flex_attention import create_block_mask

    segments = segment_ids.to(torch.int32)

    def same_document(batch, head, query, key):
        return segments[batch, query] == segments[batch, key]

    b, l = segments.shape
    return create_block_mask(same_document, B=b, H=None, Q_LEN=l, KV_LEN=l, device=segments.device)


@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, grouped: bool) -> torch.Tensor:
    """``[b, heads, l, d]`` queries against ``[b, kv heads, l, d]`` keys and values, no causal mask.
    ``mask``: None, a boolean SDPA mask (true = may attend), or a FlexAttention ``BlockMask``."""
    if mask is not None and not isinstance(mask, torch.Tensor):
        return _compiled_flex_attention()(q, k, v, block_mask=mask, enable_gqa=grouped)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=False, enable_gqa=grouped)
