"""The fused CPU kernels for the element-wise parts of a layer against PyTorch's operators
(`TorchDenseOps`, the reference): same results up to summation order in float32, and to one
bfloat16 rounding step where an intermediate lands on the other side of a rounding boundary."""

from __future__ import annotations

import pytest
import torch

from workers.dtype_choice import cpu_flags
from workers.layers.dense_ops import CpuDenseOps, TorchDenseOps
from workers.layers.rotary import RotaryEmbedding
from workers.models.config import RopeConfig
from workers.native_kernels import load_cpu_kernels

REFERENCE = TorchDenseOps()
DTYPES = [torch.float32, torch.bfloat16]
TOLERANCE = {torch.float32: 2e-6, torch.bfloat16: 1e-2}


@pytest.fixture(scope="module")
def fused() -> CpuDenseOps:
    library = load_cpu_kernels()
    assert library is not None, "the CPU kernels must build here (g++ is part of the test machine)"
    return CpuDenseOps(library)


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    tol = TOLERANCE[want.dtype]
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", [1, 5, 67])  # below and above the rows that start threads
def test_rms_norm_with_and_without_the_residual_add(fused, dtype, num_tokens) -> None:
    g = torch.Generator().manual_seed(num_tokens)
    x = torch.randn(num_tokens, 512, generator=g).to(dtype)
    residual = torch.randn(num_tokens, 512, generator=g).to(dtype)
    weight = (1 + 0.1 * torch.randn(512, generator=g)).to(dtype)

    want, want_sum = REFERENCE.add_rms_norm(x, residual.clone(), weight, 1e-5)
    mine = residual.clone()
    got, got_sum = fused.add_rms_norm(x, mine, weight, 1e-5)
    _close(got, want)
    assert torch.equal(got_sum, want_sum)  # one rounding of an add: bit for bit
    assert got_sum.data_ptr() == mine.data_ptr()  # the sum went into the residual buffer

    want, _ = REFERENCE.add_rms_norm(x, None, weight, 1e-5)
    got, same = fused.add_rms_norm(x, None, weight, 1e-5)
    _close(got, want)
    assert same is x


def test_rms_norm_reads_strided_rows(fused) -> None:
    """The norm's input may be a column slice of a wider tensor (rows further apart than its width)."""
    wide = torch.randn(9, 700)
    x = wide[:, :512]
    weight = torch.rand(512) + 0.5
    _close(fused.add_rms_norm(x, None, weight, 1e-6)[0], REFERENCE.add_rms_norm(x, None, weight, 1e-6)[0])


def _rotary_tables(positions: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    rotary = RotaryEmbedding(RopeConfig(), head_dim, positions)
    return rotary.cos, rotary.sin


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_in_place_on_the_fused_qkv_rows(fused, dtype) -> None:
    heads, kv_heads, d, t = 8, 2, 64, 13
    cos, sin = _rotary_tables(300, d)
    positions = torch.randint(0, 300, (t,), generator=torch.Generator().manual_seed(1))
    qkv = torch.randn(t, (heads + 2 * kv_heads) * d).to(dtype)
    q, k, v = qkv.split((heads * d, kv_heads * d, kv_heads * d), dim=-1)
    q, k, v = q.view(t, heads, d), k.view(t, kv_heads, d), v.view(t, kv_heads, d)
    v_before = v.clone()
    want_q, want_k = REFERENCE.rotary(q, k, positions, cos, sin)

    got_q, got_k = fused.rotary(q, k, positions, cos, sin)
    assert got_q.data_ptr() == qkv.data_ptr()  # in place
    _close(got_q, want_q)
    _close(got_k, want_k)
    assert torch.equal(v, v_before)  # the values beside them are left alone


def test_rotary_on_separate_tensors(fused) -> None:
    """After a per-head norm (Qwen3), q and k are tensors of their own, not side by side."""
    cos, sin = _rotary_tables(64, 32)
    positions = torch.arange(5) * 7
    q, k = torch.randn(5, 4, 32), torch.randn(5, 2, 32)
    want_q, want_k = REFERENCE.rotary(q, k, positions, cos, sin)
    got_q, got_k = fused.rotary(q.clone(), k.clone(), positions, cos, sin)
    _close(got_q, want_q)
    _close(got_k, want_k)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", [2, 40])
def test_silu_and_mul(fused, dtype, num_tokens) -> None:
    gate_up = (3 * torch.randn(num_tokens, 2 * 1408, generator=torch.Generator().manual_seed(2))).to(dtype)
    _close(fused.silu_and_mul(gate_up), REFERENCE.silu_and_mul(gate_up))


def test_other_dtypes_take_pytorchs_operators(fused) -> None:
    x = torch.randn(3, 16, dtype=torch.float64)
    weight = torch.ones(16, dtype=torch.float64)
    got, _ = fused.add_rms_norm(x, None, weight, 1e-5)
    torch.testing.assert_close(got, REFERENCE.add_rms_norm(x, None, weight, 1e-5)[0], rtol=0, atol=0)
    gate_up = torch.randn(3, 8, dtype=torch.float16)
    assert torch.equal(fused.silu_and_mul(gate_up), REFERENCE.silu_and_mul(gate_up))


class _Tied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(100, 32)
        self.proj = torch.nn.Linear(32, 48, bias=True)
        self.head = torch.nn.Linear(32, 100, bias=False)
        self.head.weight = self.embed.weight


def test_packed_linear_layers_match_pytorchs_and_free_the_plain_weights(fused) -> None:
    model = _Tied()
    x = torch.randn(7, 32)
    want_proj, want_head = model.proj(x), model.head(x)
    fused = CpuDenseOps(fused.library)  # a fresh one: packing belongs to one model
    fused.prepare(model)
    _close(fused.linear(model.proj, x), want_proj)
    _close(fused.linear(model.head, x), want_head)
    _close(fused.linear(model.proj, x[:1]), want_proj[:1])  # any batch size runs on the packed layout
    assert model.proj.weight.numel() == 0  # the packed copy took its place
    assert model.embed.weight.shape == (100, 32)  # shared with the head: kept for the embedding


def test_bfloat16_layers_computed_in_float32_where_the_cpu_has_no_bfloat16(fused) -> None:
    # What a CPU without native bfloat16 runs (forced here, so that it runs on every CPU): the
    # bfloat16 weights packed as float32, the products and sums in float32, the output rounded
    # to bfloat16: PyTorch's float32 linear over the same bfloat16 numbers (up to summation
    # order), rounded once.
    model = _Tied().to(torch.bfloat16)
    x = torch.randn(9, 32).to(torch.bfloat16)
    weight, bias = model.proj.weight.detach().clone(), model.proj.bias.detach().clone()
    head = model.head.weight.detach().clone()
    in_float32 = CpuDenseOps(fused.library, bf16_in_float32=True)
    in_float32.prepare(model)
    got = in_float32.linear(model.proj, x)
    assert got.dtype == torch.bfloat16 and model.proj.weight.numel() == 0
    # our kernel reads the bfloat16 panels as they are; oneDNN needs float32 copies
    assert in_float32._layers[model.proj].weight.dtype == (torch.bfloat16 if _our_kernel_expected() else torch.float32)
    _one_rounding(got, torch.nn.functional.linear(x.float(), weight.float(), bias.float()))
    _one_rounding(in_float32.linear(model.head, x), x.float() @ head.float().t())
    # and within one bfloat16 rounding of PyTorch's own bfloat16 linear (the reference)
    _close(got, torch.nn.functional.linear(x, weight, bias))


def _our_kernel_expected() -> bool:
    flags = cpu_flags()
    avx2_only = {"avx2", "fma"} <= flags and "avx512f" not in flags
    return avx2_only or ("avx512f" in flags and "amx_bf16" not in flags)


def _pairs_kernel_expected() -> bool:
    flags = cpu_flags()
    return "avx512_bf16" in flags and "amx_bf16" not in flags


def _one_rounding(got: torch.Tensor, want_float32: torch.Tensor) -> None:
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want_float32, rtol=2**-8, atol=1e-5)


@pytest.mark.parametrize("num_rows", [1, 5, 6, 64, 97, 300])  # micro-kernel tails, row chunks of 96 and 192
@pytest.mark.parametrize("out_features", [16, 50, 100, 768])  # whole panels, a panel's tail, groups of 1-4 panels
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("mode", ["float32", "bfloat16 in float32", "bfloat16"])
def test_linear_layers_on_this_cpus_path(fused, num_rows, out_features, with_bias, mode) -> None:
    # float32 layers and bfloat16 ones computed in float32 (forced here) run on our panel kernel
    # where the CPU has AVX2 and FMA, or AVX-512 without AMX, on oneDNN elsewhere; bfloat16 layers left to
    # the CPU run on our pairs kernel where it has AVX512-BF16 and no AMX, else on oneDNN or in
    # float32. Each must give PyTorch's float32 linear up to summation order, rows read with any
    # stride; bfloat16 ones rounded once to bfloat16.
    dtype = torch.float32 if mode == "float32" else torch.bfloat16
    assert bool(fused.library.linear_kernel_used()) == _our_kernel_expected()
    assert bool(fused.library.pair_linear_used()) == _pairs_kernel_expected()
    layer = torch.nn.Linear(72, out_features, bias=with_bias).to(dtype)
    holder = torch.nn.Sequential(layer)
    wide = torch.randn(num_rows, 80).to(dtype)
    x = wide[:, 3:75]  # rows 80 floats apart
    bias = None if layer.bias is None else layer.bias.detach().float()
    want = torch.nn.functional.linear(x.float(), layer.weight.detach().float(), bias)
    ops = CpuDenseOps(fused.library, bf16_in_float32=True if mode == "bfloat16 in float32" else None)
    ops.prepare(holder)
    if mode == "bfloat16":
        expected = "pairs" if _pairs_kernel_expected() else "panels" if _our_kernel_expected() else "onednn"
    else:
        expected = "panels" if _our_kernel_expected() else "onednn"
    assert ops._layers[layer].kernel == expected
    got = ops.linear(layer, x)
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        _one_rounding(got, want)


def test_a_bfloat16_layer_with_an_odd_input_size_is_left_to_onednn(fused) -> None:
    # The pairs kernel reads x two at a time; an odd K would read one element past each row.
    layer = torch.nn.Linear(71, 40).to(torch.bfloat16)
    weight, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    ops = CpuDenseOps(fused.library)
    ops.prepare(torch.nn.Sequential(layer))
    assert ops._layers[layer].kernel == ("panels" if ops.bf16_in_float32 and _our_kernel_expected() else "onednn")
    x = torch.randn(9, 71).to(torch.bfloat16)
    _close(ops.linear(layer, x), torch.nn.functional.linear(x, weight, bias))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [7, 16, 32000, 32003])  # no full vector, one, many, a tail
@pytest.mark.parametrize("num_rows", [1, 5, 67])
def test_first_max_picks_numpy_s_token_and_finds_the_non_finite_rows(fused, dtype, vocab, num_rows) -> None:
    g = torch.Generator().manual_seed(vocab + num_rows)
    logits = torch.randn(num_rows, vocab, generator=g).to(dtype)
    # Ties, which bfloat16's coarse values make common: the first of the equal maxima wins.
    logits[0, vocab // 2] = logits[0, vocab - 1] = 50.0
    if num_rows > 1:
        logits[1, :] = -3.0  # a flat row: its first index
    if num_rows > 2:
        logits[2, vocab - 1] = 60.0  # the maximum in the last element (the tail, where there is one)
    tokens, bad = fused.first_max(logits)
    assert tokens == logits.float().numpy().argmax(axis=-1).tolist() and bad == []
    assert (tokens, bad) == REFERENCE.first_max(logits)
    if num_rows > 3:
        logits[3, 1], logits[4, vocab - 1] = float("nan"), float("-inf")
        assert fused.first_max(logits)[1] == REFERENCE.first_max(logits)[1] == [3, 4]
