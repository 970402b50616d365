"""Triton paged attention for the triton backend (`triton_backend.py`): one launch serves a step's
decodes and prefill chunks alike.

A program owns one tile of one sequence for one KV head: BLOCK_Q query tokens times the G query
heads that share that KV head (rows `token * G_PAD + head`), so each key tile is loaded once for
the whole group and keys are never repeated. It walks the sequence's keys TILE_N at a time up to
the tile's last query position, finding each key's block through the block table (any block size:
a key tile may span several blocks, or part of one), dequantizes int8 or fp8 keys and values as it
loads them, and keeps the softmax online in float32 (scores in base 2). The causal mask compares
each key's position with each row's query position; no padding to the longest sequence is ever
computed.

KV layout read in place (one layer, `PagedKVCache`): K and V `[KVH, NB, BS, D]`, and with a
quantized cache one float32 scale per token and KV head `[KVH, NB, BS]` for each.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Globals a kernel reads must be constexpr (compiled Triton refuses plain globals).
NEG_LARGE = tl.constexpr(-1.0e30)  # masked scores: exp2 of it minus any real max is exactly 0, and never NaN
LOG2E = 1.4426950408889634

# KV_KIND: how the cache stores keys and values.
KV_PLAIN, KV_INT8, KV_FP8 = 0, 1, 2


@triton.jit
def _dot(a, b, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b accumulated in float32. UPCAST (set under the interpreter only): Triton 3.9's
    interpreter multiplies bfloat16 operands as their raw uint16 storage, so they are widened to
    float32 first; bfloat16 products are exact in float32, so the result is the same dot."""
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif IEEE:
        out = tl.dot(a, b, input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out


@triton.jit
def paged_attention_kernel(
    q_ptr, q_stride_t, q_stride_h,  # q [T, H, D], elements contiguous
    k_ptr, v_ptr, k_scale_ptr, v_scale_ptr,  # one layer's K, V [KVH, NB, BS, D]; scales [KVH, NB, BS]
    out_ptr,  # [T, H, D] contiguous
    block_tables_ptr, bt_stride,  # [S, MB] int32
    seq_lens_ptr, query_start_ptr,  # [S], [S + 1] int32
    tile_seq_ptr, tile_q0_ptr,  # [num_tiles] int32: each tile's sequence and first query (within it)
    kv_head_stride, scale_head_stride,  # NB * BS * D and NB * BS elements
    qk_scale,  # softmax scale times log2(e)
    H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
    BLOCK_Q: tl.constexpr, G_PAD: tl.constexpr, BLOCK_M: tl.constexpr, D_PAD: tl.constexpr, TILE_N: tl.constexpr,
    KV_KIND: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
):
    tile = tl.program_id(0)
    kvh = tl.program_id(1)
    seq = tl.load(tile_seq_ptr + tile)
    q0 = tl.load(tile_q0_ptr + tile)
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    kv_len = tl.load(seq_lens_ptr + seq)

    rows = tl.arange(0, BLOCK_M)
    tok = q0 + rows // G_PAD  # query index within the sequence
    head = kvh * G + rows % G_PAD
    row_ok = (tok < q_len) & (rows % G_PAD < G)
    pos = kv_len - q_len + tok  # each row's query position: it sees keys 0..pos
    d = tl.arange(0, D_PAD)
    d_ok = d < D

    token = (q_start + tok).to(tl.int64)
    q = tl.load(q_ptr + token[:, None] * q_stride_t + head[:, None] * q_stride_h + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, D_PAD]

    m = tl.full([BLOCK_M], NEG_LARGE, dtype=tl.float32)
    l = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)

    last_pos = kv_len - q_len + tl.minimum(q0 + BLOCK_Q, q_len) - 1
    offs_n = tl.arange(0, TILE_N)
    table = block_tables_ptr + seq.to(tl.int64) * bt_stride
    head_base = kvh.to(tl.int64) * kv_head_stride
    scale_base = kvh.to(tl.int64) * scale_head_stride
    for start in range(0, last_pos + 1, TILE_N):
        key = start + offs_n  # [TILE_N] key positions
        key_ok = key <= last_pos
        block = tl.load(table + key // BS, mask=key_ok, other=0).to(tl.int64)
        slot = block * BS + key % BS  # [TILE_N]
        kv_off = head_base + slot[:, None] * D + d[None, :]  # [TILE_N, D_PAD]
        kv_mask = key_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + kv_off, mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + kv_off, mask=kv_mask, other=0.0)
        if KV_KIND != 0:
            # Through float32: exact for int8 and fp8 values, and the interpreter's direct int8 to
            # bfloat16 conversion is wrong.
            k = k.to(tl.float32).to(q.dtype)
            v = v.to(tl.float32).to(q.dtype)
        s = _dot(q, tl.trans(k), IEEE, UPCAST)  # [BLOCK_M, TILE_N] float32
        if KV_KIND != 0:
            k_scale = tl.load(k_scale_ptr + scale_base + slot, mask=key_ok, other=0.0)
            s = s * k_scale[None, :]
        visible = (key[None, :] <= pos[:, None]) & key_ok[None, :]
        s = tl.where(visible, s * qk_scale, NEG_LARGE)
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.where(visible, tl.exp2(s - m_new[:, None]), 0.0)  # a row with nothing visible yet adds 0
        l = l * alpha + tl.sum(p, 1)
        if KV_KIND != 0:
            v_scale = tl.load(v_scale_ptr + scale_base + slot, mask=key_ok, other=0.0)
            p = p * v_scale[None, :]
        acc = acc * alpha[:, None] + _dot(p.to(q.dtype), v, IEEE, UPCAST)
        m = m_new

    out = acc / tl.where(row_ok, l, 1.0)[:, None]  # a real row always sees key 0, so its l > 0
    tl.store(out_ptr + token[:, None] * (H * D) + head[:, None] * D + d[None, :], out.to(q.dtype),
             mask=row_ok[:, None] & d_ok[None, :])
