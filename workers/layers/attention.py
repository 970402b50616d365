"""Attention over the paged KV cache: write the step's K/V into their slots, gather each sequence's
blocks, and attend under an additive bias that encodes both causality and each sequence's length.

When every sequence of a group starts with the same blocks (a shared system prompt or few-shot
header) and all its queries lie past them, those blocks are gathered and attended once for the
whole group as one large matmul ("cascade" attention, as in FlashInfer) instead of once per
sequence; one softmax over shared and own keys keeps the result exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from workers.kv_cache import PagedKVCache


@dataclass(slots=True)
class AttentionGroup:
    """Sequences attended together, padded to the same query count Q and key count L.

    Decodes (Q = 1) and prefill chunks of similar length form separate groups so that nobody
    pays for another sequence's padding."""

    gather_index: torch.Tensor  # rows of the cache holding each sequence's own blocks (PagedKVCache.gather_index)
    query_index: torch.Tensor  # [B, Q] rows of the step's flattened tokens; padding points at row 0
    bias: torch.Tensor  # [B, 1, Q, L] 0 where a query may attend an own key, -inf elsewhere
    valid_rows: torch.Tensor | None  # rows of the [B * Q] output that are real queries; None: all are
    token_index: torch.Tensor  # [N] where those rows go in the flattened output
    shared_index: torch.Tensor | None = None  # cache rows of the blocks every sequence starts with


@dataclass(slots=True)
class AttentionContext:
    slot_mapping: torch.Tensor  # [T] cache slot of each new token
    groups: list[AttentionGroup]


class PagedAttention(torch.nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, layer_idx: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.layer_idx = layer_idx
        self.scale = head_dim**-0.5

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext, cache: PagedKVCache
    ) -> torch.Tensor:
        # q [T, H, D]; k, v [T, KVH, D] -> [T, H * D]
        cache.write(self.layer_idx, k, v, ctx.slot_mapping)
        out = q.new_empty(q.shape[0], self.num_heads * self.head_dim)
        for group in ctx.groups:
            b, nq = group.query_index.shape
            queries = q[group.query_index.reshape(-1)].view(b, nq, self.num_heads, self.head_dim)
            keys, values = cache.gather(self.layer_idx, group.gather_index, b)  # [KVH, B, L, D]
            if group.shared_index is not None:
                shared_k, shared_v = cache.gather(self.layer_idx, group.shared_index, 1)
                o = matmul_attention(queries, keys, values, group.bias, self.scale, shared_k[:, 0], shared_v[:, 0])
            elif nq == 1:
                o = matmul_attention(queries, keys, values, group.bias, self.scale)
            else:
                # Long prefill chunks: SDPA's fused kernel never materializes the [Q, L] scores.
                o = F.scaled_dot_product_attention(
                    queries.transpose(1, 2), keys.transpose(0, 1), values.transpose(0, 1),
                    attn_mask=group.bias, scale=self.scale, enable_gqa=self.num_kv_heads != self.num_heads,
                ).transpose(1, 2)  # [B, Q, H, D]
            o = o.reshape(b * nq, self.num_heads * self.head_dim)
            if group.valid_rows is not None:
                o = o[group.valid_rows]
            out[group.token_index] = o
        return out


def matmul_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float,
    shared_k: torch.Tensor | None = None, shared_v: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [B, Q, H, D]; k, v [KVH, B, L, D] each sequence's own keys under the additive `bias`
    [B, 1, Q, L]; optional shared_k/v [KVH, S, D] seen by every query -> [B, Q, H, D].

    Grouped-query heads stay grouped (head j*G + i reads KV head j) so keys are never repeated.
    With a shared part the softmax runs in two pieces under one running max, so no [.., S + L]
    score tensor is concatenated or sliced (those copies cost more than the matmuls on the CPU)."""
    b, nq, h, d = q.shape
    kvh, _, l_len, _ = k.shape
    g = h // kvh
    qg = (q * scale).view(b, nq, kvh, g, d).permute(2, 0, 1, 3, 4).reshape(kvh, b, nq * g, d)
    # Scores and softmax in float32 whatever the model's dtype (no-ops on the float32 CPU path).
    s_own = torch.matmul(qg, k.transpose(-1, -2)).float().view(kvh, b, nq, g, l_len)  # [KVH, B, Q, G, L]
    s_own.add_(bias.view(1, b, nq, 1, l_len))
    if shared_k is None:
        probs = torch.softmax(s_own, dim=-1).view(kvh, b, nq * g, l_len)
        o = torch.matmul(probs.to(v.dtype), v).float()  # [KVH, B, Q*G, D]
    else:
        s_len = shared_k.shape[1]
        s_shared = torch.matmul(qg.reshape(kvh, b * nq * g, d), shared_k.transpose(-1, -2)).float()  # [KVH, B*Q*G, S]
        m = torch.maximum(s_own.amax(-1), s_shared.view(kvh, b, nq, g, s_len).amax(-1))  # [KVH, B, Q, G]
        s_own.sub_(m.unsqueeze(-1)).exp_()
        s_shared.sub_(m.view(kvh, b * nq * g, 1)).exp_()
        denom = s_own.sum(-1) + s_shared.sum(-1).view(kvh, b, nq, g)
        o = torch.matmul(s_own.view(kvh, b, nq * g, l_len).to(v.dtype), v).float()
        o = o + torch.matmul(s_shared.to(v.dtype), shared_v).float().view(kvh, b, nq * g, d)
        o = o / denom.view(kvh, b, nq * g, 1)
    return o.to(q.dtype).view(kvh, b, nq, g, d).permute(1, 2, 0, 3, 4).reshape(b, nq, h, d)
