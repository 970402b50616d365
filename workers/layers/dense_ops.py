"""The dense parts of a decoder layer, behind one seam: the linear layers, RMSNorm with the
residual add before it, rotary embedding of q and k, and SiLU-and-multiply; and the greedy pick
over the logits (each row's first largest, with the check for inf and NaN).

- `TorchDenseOps`: PyTorch operators; runs anywhere and is the reference.
- `CpuDenseOps`: linear layers with weights packed once into the layout their matmul reads fastest
  (as vLLM's CPU path does; PyTorch's own linear re-reads the plain layout every call and was
  1.3-3x slower here at decode sizes, most of all for the output layer): on oneDNN, or on our own
  kernels (`cpu_linear_kernels.cpp`) on AVX2 and AVX-512 CPUs without AMX, where they are the
  faster; and one fused C++ pass
  (`cpu_dense_kernels.cpp`) for each element-wise part where PyTorch runs five to sixteen operators
  with as many temporaries; same arithmetic, rounding where PyTorch rounds.

Why C++ and not `torch.compile` for the element-wise parts: measured on a 2-core AVX2 machine
(one layer's norm, rotary and SwiGLU, float32), eager PyTorch took 0.80 / 5.2 / 40 ms at 64 / 512 /
2048 tokens, Inductor with dynamic shapes 0.28 / 1.4 / 7.0 ms after a first call of 32 s (and 8 s
more to recompile for bfloat16), the fused kernels 0.17 / 1.3 / 5.6 ms after a build of seconds
that is cached across processes.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Union

import torch
import torch.nn.functional as F
from torch import nn

from workers.layers.norm import rms_norm
from workers.layers.rotary import rotate_half
from workers.layers.sampler import first_max_rows

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}
# The batch size oneDNN picks the packed layout for; any batch size runs on it. Decode steps are
# tens of rows, prefill chunks hundreds to thousands: 32 is what vLLM's CPU path packs for.
PACK_BATCH_SIZE = 32


class TorchDenseOps:
    name = "torch"

    def prepare(self, model: nn.Module) -> None:
        """Nothing to do: PyTorch's operators take the weights as they are."""

    def linear(self, module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        return module(x)

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (norm(x + residual) * weight, x + residual); residual None: (norm(x) * weight, x)."""
        if residual is not None:
            x = x + residual
        return rms_norm(x, weight, eps), x

    def rotary(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # q [T, H, D]; k [T, KVH, D]; cos, sin float32 [P, D/2]
        cos, sin = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)  # [T, 1, D/2]
        return rotate_half(q, cos, sin), rotate_half(k, cos, sin)

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def first_max(self, logits: torch.Tensor) -> tuple[list[int], list[int]]:
        """Each row's first index of its largest logit, and the rows holding inf or NaN."""
        return first_max_rows(logits)


class CpuDenseOps:
    """The fused kernels; tensors must be on the CPU in float32 or bfloat16 (others go to `TorchDenseOps`)."""

    name = "cpu"

    def __init__(self, library: ctypes.CDLL, bf16_in_float32: bool | None = None) -> None:
        """bf16_in_float32: compute bfloat16 layers in float32 (see prepare); None: where oneDNN
        cannot pack bfloat16 weights as they are."""
        self.library = library
        self.torch = TorchDenseOps()
        self.bf16_in_float32 = bf16_in_float32
        self._layers: dict[nn.Linear, _PackedLinear] = {}

    def prepare(self, model: nn.Module) -> None:
        """Packs every linear layer's weight once and lets the plain copy go (the packed one takes
        its place, so the model's memory stays the same), except a weight that another module
        shares: a tied output layer's weight is the embedding table.

        float32 weights go into the panels of our own kernel (`cpu_linear_kernels.cpp`) where it
        runs (AVX2 with FMA: 1.0-1.6x oneDNN at 16-2048 rows on the 2-core AVX2 EPYC; AVX-512
        without AMX), else into oneDNN's layout.

        bfloat16 layers on a CPU without native bfloat16 (no AVX512-BF16, AMX or AVX-512), where
        oneDNN cannot pack them and PyTorch's bfloat16 linear ran at a tenth of the float32 rate,
        compute in float32: each product of two bfloat16 numbers is exact in float32 and the sums
        stay in float32, which is what the native bfloat16 instructions compute too, and the output
        is rounded to bfloat16 as theirs is. Our kernel reads their bfloat16 panels as they are
        (widening each weight exactly), so the weights keep bfloat16's memory; oneDNN, where ours
        does not run, gets float32 copies.

        bfloat16 layers on a CPU with AVX512-BF16 and no AMX go to our pairs kernel (its bfloat16
        dot-product instruction, 1.1-1.5x oneDNN at 64 rows and 1.2-2.1x at 16 on the 2-core
        AVX512-BF16 EPYC; see cpu_linear_kernels.cpp)."""
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        linear_weights = {id(m.weight) for m in linears}
        shared = {id(p) for m in model.modules() for p in m.parameters(recurse=False)
                  if id(p) in linear_weights and not isinstance(m, nn.Linear)}
        with torch.no_grad():
            for module in linears:
                packed = self._pack(module)
                if packed is None:
                    continue
                self._layers[module] = packed
                if id(module.weight) not in shared:
                    module.weight.data = torch.empty(0, dtype=module.weight.dtype)

    def _pack(self, module: nn.Linear) -> _PackedLinear | None:
        weight, bias = module.weight.detach(), None if module.bias is None else module.bias.detach()
        in_float32 = weight.dtype == torch.bfloat16 and self._bf16_in_float32()
        if in_float32:
            bias = None if bias is None else bias.float()
        n, k = weight.shape
        if weight.dtype == torch.bfloat16 and not in_float32 and k % 2 == 0 and self.library.pair_linear_used():
            pairs = _aligned(self.library.packed_linear_size(n, k), weight.dtype)
            self.library.pack_pair_linear(weight.contiguous().data_ptr(), n, k, pairs.data_ptr())
            return _PackedLinear(pairs, None if bias is None else bias.float(), n, False, "pairs")
        if (weight.dtype == torch.float32 or in_float32) and self.library.linear_kernel_used():
            # Our kernel reads bfloat16 panels as they are, widening each weight exactly.
            panels = _aligned(self.library.packed_linear_size(n, k), weight.dtype)
            pack = self.library.pack_linear if weight.dtype == torch.float32 else self.library.pack_linear_bf16
            pack(weight.contiguous().data_ptr(), n, k, panels.data_ptr())
            return _PackedLinear(panels, bias, n, in_float32, "panels")
        if in_float32:
            weight = weight.float()
        if not torch.backends.mkldnn.is_available():
            return None
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_BATCH_SIZE)
        except (RuntimeError, AttributeError):  # a dtype oneDNN cannot pack here, or no such operator
            return None
        return _PackedLinear(packed, bias, n, in_float32, "onednn")

    def _bf16_in_float32(self) -> bool:
        if self.bf16_in_float32 is None:
            try:
                torch.ops.mkldnn._reorder_linear_weight(torch.zeros(16, 16, dtype=torch.bfloat16), PACK_BATCH_SIZE)
                self.bf16_in_float32 = False
            except (RuntimeError, AttributeError):
                self.bf16_in_float32 = True
        return self.bf16_in_float32

    def linear(self, module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        layer = self._layers.get(module)
        if layer is None:
            return module(x)
        rows = x.float() if layer.in_float32 else x
        if layer.kernel != "onednn":
            rows = rows if rows.dim() == 2 and rows.stride(-1) == 1 else rows.reshape(-1, x.shape[-1]).contiguous()
            if layer.kernel == "pairs":
                out = torch.empty(rows.shape[0], layer.out_features, dtype=torch.bfloat16)
                run = self.library.linear_bf16
            else:
                out = torch.empty(rows.shape[0], layer.out_features, dtype=torch.float32)
                run = self.library.linear_f32 if layer.weight.dtype == torch.float32 else self.library.linear_bf16_weights
            run(rows.data_ptr(), rows.stride(0), rows.shape[0], layer.weight.data_ptr(), layer.out_features,
                rows.shape[1], None if layer.bias is None else layer.bias.data_ptr(), out.data_ptr())
            out = out.view(*x.shape[:-1], layer.out_features)
        else:
            out = torch.ops.mkldnn._linear_pointwise(rows, layer.weight, layer.bias, "none", [], "")
        return out.to(x.dtype) if layer.in_float32 else out

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        code = DTYPE_CODES.get(x.dtype)
        if code is None or x.stride(-1) != 1 or weight.dtype != x.dtype or x.dim() != 2:
            return self.torch.add_rms_norm(x, residual, weight, eps)
        t, h = x.shape
        out = torch.empty((t, h), dtype=x.dtype)
        if residual is not None:
            # The sum lands in `residual` (a buffer of this step's own: the previous layer's sum or
            # the embeddings), which is what the caller goes on with.
            assert residual.is_contiguous() and residual.dtype == x.dtype
        self.library.rms_norm(x.data_ptr(), x.stride(0), None if residual is None else residual.data_ptr(),
                              weight.data_ptr(), eps, t, h, out.data_ptr(), code)
        return out, (x if residual is None else residual)

    def rotary(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """In place, where q and k are views of one fused qkv row ([T, H + KVH heads, ...] side by
        side) or contiguous tensors of their own."""
        code = DTYPE_CODES.get(q.dtype)
        if code is None or positions.dtype != torch.int64 or not positions.is_contiguous():
            return self.torch.rotary(q, k, positions, cos, sin)
        t, _, d = q.shape
        lib = self.library
        for x in _side_by_side(q, k) or (q, k):
            assert x.stride(2) == 1 and x.stride(1) == d
            lib.rotary(x.data_ptr(), x.stride(0), t, x.shape[1], d, positions.data_ptr(), cos.data_ptr(),
                       sin.data_ptr(), code)
        return q, k

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        code = DTYPE_CODES.get(gate_up.dtype)
        if code is None or not gate_up.is_contiguous() or gate_up.dim() != 2:
            return self.torch.silu_and_mul(gate_up)
        t, two_i = gate_up.shape
        out = torch.empty((t, two_i // 2), dtype=gate_up.dtype)
        self.library.silu_and_mul(gate_up.data_ptr(), t, two_i // 2, out.data_ptr(), code)
        return out

    def first_max(self, logits: torch.Tensor) -> tuple[list[int], list[int]]:
        """As TorchDenseOps.first_max, in one pass over the logits in the model's dtype (no float32
        copy of a bfloat16 batch, no separate finiteness reduction)."""
        code = DTYPE_CODES.get(logits.dtype)
        if code is None or logits.dim() != 2 or not logits.is_contiguous() or logits.device.type != "cpu":
            return self.torch.first_max(logits)
        rows = logits.shape[0]
        out = torch.empty(rows, dtype=torch.int64)
        bad = torch.empty(rows, dtype=torch.int32)
        self.library.first_max_rows(logits.data_ptr(), rows, logits.shape[1], out.data_ptr(), bad.data_ptr(), code)
        return out.tolist(), bad.nonzero().flatten().tolist()


@dataclass(frozen=True, slots=True)
class _PackedLinear:
    weight: torch.Tensor  # packed in the layout of `kernel`
    bias: torch.Tensor | None  # float32 where the layer computes in float32 or on the pairs kernel
    out_features: int
    in_float32: bool  # bfloat16 layer computed in float32
    # "panels": our float32 kernel (float32 weights, or bfloat16 ones widened as read); "pairs": our
    # AVX512-BF16 kernel (bfloat16 weights in pairs of k); "onednn": oneDNN's packed layout.
    kernel: str


def _aligned(n: int, dtype: torch.dtype) -> torch.Tensor:
    """n elements of dtype starting on a 64-byte boundary (the panels' vector loads are aligned)."""
    size = torch.empty(0, dtype=dtype).element_size()
    buffer = torch.empty(n + 64 // size, dtype=dtype)
    offset = (-buffer.data_ptr() // size) % (64 // size)
    return buffer[offset : offset + n]


def _side_by_side(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor] | None:
    """q and k as one [T, H + KVH, D] view when k's heads follow q's in the same rows."""
    h, d = q.shape[1], q.shape[2]
    if q.stride() != k.stride() or k.data_ptr() != q.data_ptr() + h * d * q.element_size():
        return None
    return (q.as_strided((q.shape[0], h + k.shape[1], d), q.stride()),)


DenseOps = Union[TorchDenseOps, "CpuDenseOps"]


def make_dense_ops(library: ctypes.CDLL | None) -> TorchDenseOps | CpuDenseOps:
    """The fused kernels where the CPU kernel library was built, else PyTorch."""
    return TorchDenseOps() if library is None else CpuDenseOps(library)
