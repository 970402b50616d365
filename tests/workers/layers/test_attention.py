"""matmul_attention (plain and cascade) against SDPA over the concatenated keys."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from workers.attention.reference import matmul_attention

B, H, KVH, D, S, L = 5, 8, 2, 16, 48, 40


def _case(q_len: int, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(q_len)
    q = torch.randn(B, q_len, H, D, generator=gen).to(dtype)
    k, v = (torch.randn(KVH, B, L, D, generator=gen).to(dtype) for _ in range(2))
    sk, sv = (torch.randn(KVH, S, D, generator=gen).to(dtype) for _ in range(2))
    # Each sequence sees a different number of its own keys, causally for its queries.
    lengths = torch.tensor([40, 1, 17, 33, 25])
    pos = (lengths - q_len).clamp(min=0).view(B, 1) + torch.arange(q_len).view(1, q_len)  # [B, Q]
    visible = torch.arange(L).view(1, 1, L) <= pos.unsqueeze(-1)
    bias = torch.zeros(B, 1, q_len, L, dtype=dtype).masked_fill_(~visible.unsqueeze(1), float("-inf"))
    return q, k, v, sk, sv, bias, visible


def _reference(q, k, v, visible, sk=None, sv=None):
    keys, values, mask = k.transpose(0, 1), v.transpose(0, 1), visible.unsqueeze(1)  # [B, KVH, L, D]
    if sk is not None:
        keys = torch.cat([sk.unsqueeze(0).expand(B, -1, -1, -1), keys], dim=2)
        values = torch.cat([sv.unsqueeze(0).expand(B, -1, -1, -1), values], dim=2)
        mask = torch.cat([torch.ones(B, 1, q.shape[1], S, dtype=torch.bool), mask], dim=-1)
    out = F.scaled_dot_product_attention(
        q.float().transpose(1, 2), keys.float(), values.float(), attn_mask=mask, enable_gqa=True, scale=D**-0.5
    )
    return out.transpose(1, 2)


@pytest.mark.parametrize("q_len", [1, 7])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_matches_sdpa(q_len, shared, dtype, tol):
    q, k, v, sk, sv, bias, visible = _case(q_len, dtype)
    if shared:
        got = matmul_attention(q, k, v, bias, D**-0.5, sk, sv)
        ref = _reference(q, k, v, visible, sk, sv)
    else:
        got = matmul_attention(q, k, v, bias, D**-0.5)
        ref = _reference(q, k, v, visible)
    assert got.dtype == dtype and got.shape == (B, q_len, H, D)
    torch.testing.assert_close(got.float(), ref, atol=tol, rtol=tol)
