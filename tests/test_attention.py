"""The attention paths: a FlexAttention document block mask means the same as the dense mask."""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention

from pretrain.model.attention import attend, document_block_mask

pytestmark = pytest.mark.fast  # in-process: part of the edit loop's tier (-m fast)


def test_document_block_mask_equals_the_dense_mask():
    torch.manual_seed(0)
    b, heads, l, d = 2, 4, 256, 16
    segments = torch.zeros(b, l, dtype=torch.int32)
    segments[0, 100:] = 1
    segments[0, 180:] = 2
    segments[1, 200:] = -1  # padding sees padding, as the dense mask does
    q, k, v = (torch.randn(b, heads, l, d) for _ in range(3))
    dense = (segments[:, :, None] == segments[:, None, :])[:, None]
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    got = flex_attention(q, k, v, block_mask=document_block_mask(segments))  # eager: the CPU reference
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_grouped_query_attention_repeats_each_key_value_head_for_its_group():
    torch.manual_seed(0)
    q = torch.randn(1, 4, 8, 16)
    k, v = torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
    expected = F.scaled_dot_product_attention(q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1))
    torch.testing.assert_close(attend(q, k, v, None, grouped=True), expected)
