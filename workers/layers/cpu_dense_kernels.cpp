// Fused element-wise parts of a Llama layer for the CPU: RMSNorm (with the residual add before it),
// rotary embedding in place, and SiLU-and-multiply. Each replaces five to sixteen PyTorch operators
// (and as many dispatches and temporaries) by one pass over the rows, split over PyTorch's OpenMP
// threads. The arithmetic follows the PyTorch code in norm.py, rotary.py and llama.py step by step,
// rounding to bfloat16 where that code does, so the two paths differ only in summation order.
// Dtype codes: 0 float32, 1 bfloat16.

#include <cmath>
#include <cstdint>
#include <cstring>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "../bfloat16.h"

namespace {

using bf16::from_f32;
using bf16::to_f32;

inline float round_bf16(float f) { return to_f32(from_f32(f)); }

// Element access for a dtype fixed at compile time, so that the loops vectorize.
template <int DT> inline float get(const void* p, int64_t i) {
    if constexpr (DT == 0) return static_cast<const float*>(p)[i];
    else return to_f32(static_cast<const uint16_t*>(p)[i]);
}

template <int DT> inline void put(void* p, int64_t i, float v) {
    if constexpr (DT == 0) static_cast<float*>(p)[i] = v;
    else static_cast<uint16_t*>(p)[i] = from_f32(v);
}

template <int DT> inline float in_dtype(float v) {  // v as the model's dtype holds it
    if constexpr (DT == 0) return v;
    else return round_bf16(v);
}

constexpr int64_t kParallelRows = 8;  // fewer rows than this: one thread (the team's wake-up costs more)

template <int DT>
void rms_norm_rows(const void* x, int64_t x_stride, void* residual, const void* weight, float eps, int64_t T,
                   int64_t H, void* out) {
#pragma omp parallel for if (T >= kParallelRows)
    for (int64_t t = 0; t < T; ++t) {
        // Two loops without a branch inside (residual or not), each a vector loop.
        float ss = 0.f;
        if (residual != nullptr) {
#pragma omp simd reduction(+ : ss)
            for (int64_t i = 0; i < H; ++i) {
                const float v = in_dtype<DT>(get<DT>(x, t * x_stride + i) + get<DT>(residual, t * H + i));
                put<DT>(residual, t * H + i, v);
                ss += v * v;
            }
        } else {
#pragma omp simd reduction(+ : ss)
            for (int64_t i = 0; i < H; ++i) {
                const float v = get<DT>(x, t * x_stride + i);
                ss += v * v;
            }
        }
        const float inv = 1.f / std::sqrt(ss / static_cast<float>(H) + eps);
        const void* src = residual != nullptr ? residual : x;
        const int64_t stride = residual != nullptr ? H : x_stride;
#pragma omp simd
        for (int64_t i = 0; i < H; ++i)
            put<DT>(out, t * H + i, get<DT>(weight, i) * in_dtype<DT>(get<DT>(src, t * stride + i) * inv));
    }
}

template <int DT>
void rotary_rows(void* x, int64_t x_stride, int64_t T, int num_heads, int D, const int64_t* positions,
                 const float* cos, const float* sin) {
    const int half = D / 2;
#pragma omp parallel for if (T >= kParallelRows)
    for (int64_t t = 0; t < T; ++t) {
        const float* __restrict c = cos + positions[t] * half;
        const float* __restrict s = sin + positions[t] * half;
        for (int h = 0; h < num_heads; ++h) {
            const int64_t base = t * x_stride + static_cast<int64_t>(h) * D;
#pragma omp simd
            for (int i = 0; i < half; ++i) {
                const float x1 = get<DT>(x, base + i), x2 = get<DT>(x, base + half + i);
                put<DT>(x, base + i, x1 * c[i] - x2 * s[i]);
                put<DT>(x, base + half + i, x2 * c[i] + x1 * s[i]);
            }
        }
    }
}

template <int DT>
void silu_and_mul_rows(const void* gate_up, int64_t T, int64_t I, void* out) {
#pragma omp parallel for if (T >= kParallelRows)
    for (int64_t t = 0; t < T; ++t) {
        const int64_t g0 = t * 2 * I, u0 = g0 + I;
#pragma omp simd
        for (int64_t i = 0; i < I; ++i) {
            const float g = get<DT>(gate_up, g0 + i);
            put<DT>(out, t * I + i, in_dtype<DT>(g / (1.f + std::exp(-g))) * get<DT>(gate_up, u0 + i));
        }
    }
}

// A float32 whose exponent bits are all ones is inf or NaN. Tested on the bits: -ffast-math lets
// the compiler assume std::isfinite is always true.
inline bool finite_bits(uint32_t bits) { return (bits & 0x7f800000u) != 0x7f800000u; }

template <int DT> inline uint32_t bits_at(const void* p, int64_t i) {
    if constexpr (DT == 0) return static_cast<const uint32_t*>(p)[i];
    else return static_cast<uint32_t>(static_cast<const uint16_t*>(p)[i]) << 16;
}

// Row t's first index of its largest value into out[t], and whether the row holds inf or NaN into
// bad[t]: greedy sampling over logits as the model computed them (bfloat16 ones need no float32
// copy, and widening is exact, so the choice is the same).
template <int DT>
void first_max_rows_t(const void* logits, int64_t T, int64_t V, int64_t* out, int32_t* bad) {
#pragma omp parallel for if (T >= kParallelRows)
    for (int64_t t = 0; t < T; ++t) {
        const int64_t row = t * V;
        float best = -3.4028235e38f;  // the lowest float32
        int64_t at = 0;
        bool finite = true;
        int64_t i = 0;
#if defined(__AVX512F__)
        if (V >= 16) {
            __m512 vbest = _mm512_set1_ps(-3.4028235e38f);
            __m512i vat = _mm512_setzero_si512();
            const __m512i lanes = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
            const __m512i exponent = _mm512_set1_epi32(0x7f800000);
            __mmask16 nonfinite = 0;
            for (; i + 16 <= V; i += 16) {
                __m512i bits;
                if constexpr (DT == 0) {
                    bits = _mm512_loadu_si512(static_cast<const float*>(logits) + row + i);
                } else {
                    const __m256i half = _mm256_loadu_si256(
                        reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(logits) + row + i));
                    bits = _mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16);
                }
                nonfinite |= _mm512_cmpeq_epi32_mask(_mm512_and_si512(bits, exponent), exponent);
                const __m512 x = _mm512_castsi512_ps(bits);
                const __mmask16 greater = _mm512_cmp_ps_mask(x, vbest, _CMP_GT_OQ);  // strictly: a lane keeps its first
                vbest = _mm512_mask_blend_ps(greater, vbest, x);
                vat = _mm512_mask_blend_epi32(greater, vat, _mm512_add_epi32(lanes, _mm512_set1_epi32(static_cast<int>(i))));
            }
            finite = nonfinite == 0;
            best = _mm512_reduce_max_ps(vbest);
            // Of the lanes holding the maximum, the one that saw it first.
            at = _mm512_mask_reduce_min_epi32(_mm512_cmp_ps_mask(vbest, _mm512_set1_ps(best), _CMP_EQ_OQ), vat);
        }
#elif defined(__AVX2__)
        // The same, 8 lanes at a time (gcc leaves the scalar loop below scalar).
        if (V >= 8) {
            __m256 vbest = _mm256_set1_ps(-3.4028235e38f);
            __m256i vat = _mm256_setzero_si256();
            const __m256i lanes = _mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0);
            const __m256i exponent = _mm256_set1_epi32(0x7f800000);
            __m256i nonfinite = _mm256_setzero_si256();
            for (; i + 8 <= V; i += 8) {
                __m256i bits;
                if constexpr (DT == 0) {
                    bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const float*>(logits) + row + i));
                } else {
                    const __m128i half = _mm_loadu_si128(
                        reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(logits) + row + i));
                    bits = _mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16);
                }
                nonfinite = _mm256_or_si256(nonfinite, _mm256_cmpeq_epi32(_mm256_and_si256(bits, exponent), exponent));
                const __m256 x = _mm256_castsi256_ps(bits);
                const __m256 greater = _mm256_cmp_ps(x, vbest, _CMP_GT_OQ);  // strictly: a lane keeps its first
                vbest = _mm256_blendv_ps(vbest, x, greater);
                vat = _mm256_castps_si256(_mm256_blendv_ps(
                    _mm256_castsi256_ps(vat),
                    _mm256_castsi256_ps(_mm256_add_epi32(lanes, _mm256_set1_epi32(static_cast<int>(i)))), greater));
            }
            finite = _mm256_testz_si256(nonfinite, nonfinite);
            alignas(32) float lane_best[8];
            alignas(32) int32_t lane_at[8];
            _mm256_store_ps(lane_best, vbest);
            _mm256_store_si256(reinterpret_cast<__m256i*>(lane_at), vat);
            // Of the lanes holding the maximum, the one that saw it first.
            best = lane_best[0];
            at = lane_at[0];
            for (int j = 1; j < 8; ++j)
                if (lane_best[j] > best || (lane_best[j] == best && lane_at[j] < at)) {
                    best = lane_best[j];
                    at = lane_at[j];
                }
        }
#endif
        for (; i < V; ++i) {
            const uint32_t b = bits_at<DT>(logits, row + i);
            finite = finite && finite_bits(b);
            float x;
            std::memcpy(&x, &b, sizeof x);
            if (x > best) {
                best = x;
                at = i;
            }
        }
        out[t] = at;
        bad[t] = finite ? 0 : 1;
    }
}

}  // namespace

extern "C" {

// out[t] = the first index of the largest of row t's V values, bad[t] = 1 where row t holds inf
// or NaN (its out[t] then means nothing); logits [T, V] contiguous.
void first_max_rows(const void* logits, int64_t T, int64_t V, int64_t* out, int32_t* bad, int dtype) {
    if (dtype == 0) first_max_rows_t<0>(logits, T, V, out, bad);
    else first_max_rows_t<1>(logits, T, V, out, bad);
}


// out[t] = weight * norm(x[t]) over H columns, where x is first replaced by x + residual (in the
// model's dtype) and that sum written back to `residual` when `residual` is not null. norm(x) is
// x / sqrt(mean(x^2) + eps) in float32, rounded to the model's dtype before the weight multiplies.
// x rows are `x_stride` elements apart; residual, out and weight are contiguous.
void rms_norm(const void* x, int64_t x_stride, void* residual, const void* weight, float eps, int64_t T, int64_t H,
              void* out, int dtype) {
    if (dtype == 0) rms_norm_rows<0>(x, x_stride, residual, weight, eps, T, H, out);
    else rms_norm_rows<1>(x, x_stride, residual, weight, eps, T, H, out);
}

// Rotate-half rotary embedding, in place, of the first `num_heads` heads (of D elements) of each
// row of `x` (rows `x_stride` apart): q and k heads lie side by side in the fused qkv output.
// cos, sin: float32 [P, D/2]; positions [T].
void rotary(void* x, int64_t x_stride, int64_t T, int num_heads, int D, const int64_t* positions, const float* cos,
            const float* sin, int dtype) {
    if (dtype == 0) rotary_rows<0>(x, x_stride, T, num_heads, D, positions, cos, sin);
    else rotary_rows<1>(x, x_stride, T, num_heads, D, positions, cos, sin);
}

// out[t, i] = silu(gate_up[t, i]) * gate_up[t, I + i], silu rounded to the model's dtype first as
// F.silu(gate) * up does.
void silu_and_mul(const void* gate_up, int64_t T, int64_t I, void* out, int dtype) {
    if (dtype == 0) silu_and_mul_rows<0>(gate_up, T, I, out);
    else silu_and_mul_rows<1>(gate_up, T, I, out);
}

}  // extern "C"
