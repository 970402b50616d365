// Linear layers (out = x W^T + b) on our own kernels where oneDNN left the most of the CPU's rate
// unused at decode sizes (16-64 rows); elsewhere oneDNN stays (`linear_kernel_used` and
// `pair_linear_used` say which).
//
// The weight is packed once into panels of 16 output columns: panel p holds, for each k, the 16
// weights W[16p .. 16p + 15][k] side by side (one 64-byte line of float32), zero past N.
//
// AVX2 and FMA without AVX-512 (oneDNN: 95-140 GFLOP/s at 16-64 rows of the 185 the 2-core AVX2
// machine we benchmark on can do): a micro-kernel keeps 6 rows x 16 columns of sums in 12 of the 16
// vector registers and, for each k, loads the panel's two vectors once for all 6 rows and
// broadcasts each row's x[k]: 12 FMAs per 8 loads, the shape BLAS libraries use on AVX2. Sums run
// over k in order, in float32, with one rounding per FMA. bfloat16 weights (a bfloat16 model on
// such a CPU, which has no bfloat16 arithmetic) keep their panels in bfloat16, half the bytes to
// read, and are widened exactly as they are loaded. Threads split the panels, so each weight is
// read from memory once per chunk of rows.
//
// AVX-512 without AMX: see "AVX-512" below.

#include <algorithm>
#include <cstdint>
#include <cstring>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "../bfloat16.h"
#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
#define HAVE_PANEL_LINEAR 1
#else
#define HAVE_PANEL_LINEAR 0
#endif

namespace {

constexpr int kPanel = 16;         // output columns per panel: two 8-float vectors
constexpr int kRows = 6;           // rows per micro-kernel call: 12 sums + 2 weights + 1 broadcast
// Rows whose x (rows x K floats, up to 384 KiB) stays in the 512 KiB L2 beside a panel while
// every panel passes over them: 96 rows at K = 512, 66 at K = 1408.
constexpr int64_t kChunkFloats = 96 * 1024;
inline int64_t num_panels(int64_t N) { return (N + kPanel - 1) / kPanel; }
inline int64_t rows_per_chunk(int64_t K) {
    return std::max<int64_t>(kRows, std::min<int64_t>(96, kChunkFloats / K / kRows * kRows));
}

#if HAVE_PANEL_LINEAR
// A panel row's 16 weights as two float32 vectors: float32 as they are; bfloat16 (the high half of
// a float32) widened exactly by a shift.
inline void load_weights(const float* p, __m256& w0, __m256& w1) {
    w0 = _mm256_load_ps(p);
    w1 = _mm256_load_ps(p + 8);
}
inline void load_weights(const uint16_t* p, __m256& w0, __m256& w1) {
    const __m256i raw = _mm256_load_si256(reinterpret_cast<const __m256i*>(p));
    w0 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(raw)), 16));
    w1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(raw, 1)), 16));
}

// Row r's two sums += x[r][k] * the panel row's weights, for the rows a call has (r < R).
template <int r, int R>
inline void fma_row(const float* xk, int64_t x_stride, __m256 w0, __m256 w1, __m256& a, __m256& b) {
    if constexpr (r < R) {
        const __m256 xv = _mm256_broadcast_ss(xk + r * x_stride);
        a = _mm256_fmadd_ps(xv, w0, a);
        b = _mm256_fmadd_ps(xv, w1, b);
    }
}

// out[r][0..cols) = bias + sum over k of x[r][k] * panel[k][0..cols), for R rows.
template <int R, typename W>
inline void panel_rows(const float* __restrict x, int64_t x_stride, const W* __restrict panel, int64_t K,
                       const float* __restrict bias, float* __restrict out, int64_t out_stride, int cols) {
    // Sums as separate variables: gcc kept an array of them in memory, storing every sum at every k.
    __m256 a0 = _mm256_setzero_ps(), b0 = a0, a1 = a0, b1 = a0, a2 = a0, b2 = a0, a3 = a0, b3 = a0, a4 = a0,
           b4 = a0, a5 = a0, b5 = a0;
    for (int64_t k = 0; k < K; ++k) {
        __m256 w0, w1;
        load_weights(panel + k * kPanel, w0, w1);
        const float* xk = x + k;
        fma_row<0, R>(xk, x_stride, w0, w1, a0, b0);
        fma_row<1, R>(xk, x_stride, w0, w1, a1, b1);
        fma_row<2, R>(xk, x_stride, w0, w1, a2, b2);
        fma_row<3, R>(xk, x_stride, w0, w1, a3, b3);
        fma_row<4, R>(xk, x_stride, w0, w1, a4, b4);
        fma_row<5, R>(xk, x_stride, w0, w1, a5, b5);
    }
    const __m256 sums[kRows][2] = {{a0, b0}, {a1, b1}, {a2, b2}, {a3, b3}, {a4, b4}, {a5, b5}};
    for (int r = 0; r < R; ++r) {
        alignas(32) float row[kPanel];
        _mm256_store_ps(row, sums[r][0]);
        _mm256_store_ps(row + 8, sums[r][1]);
        float* o = out + r * out_stride;
        if (bias != nullptr)
            for (int j = 0; j < cols; ++j) o[j] = row[j] + bias[j];
        else
            std::memcpy(o, row, sizeof(float) * cols);
    }
}
#endif

// packed <- w [N, K] row-major, in panels (see the top), zero past N; with kK = 2, in pairs of k
// (K even): W[16p + j][k] at (p * K + k - k % 2) * 16 + 2j + k % 2.
template <int kK, typename W>
void pack_panels(const W* w, int64_t N, int64_t K, W* packed) {
    const int64_t panels = num_panels(N);
#pragma omp parallel for
    for (int64_t p = 0; p < panels; ++p)
        for (int64_t k = 0; k < K; ++k)
            for (int j = 0; j < kPanel; ++j) {
                const int64_t n = p * kPanel + j;
                packed[(p * K + k - k % kK) * kPanel + kK * j + k % kK] = n < N ? w[n * K + k] : W(0);
            }
}

template <typename W>
void linear_panels(const float* x, int64_t x_stride, int64_t M, const W* packed, int64_t N, int64_t K,
                   const float* bias, float* out) {
#if HAVE_PANEL_LINEAR
    const int64_t panels = num_panels(N);
    const int64_t chunk = rows_per_chunk(K);
    for (int64_t m0 = 0; m0 < M; m0 += chunk) {
        const int64_t m1 = std::min(M, m0 + chunk);
#pragma omp parallel for schedule(static) if (panels > 1)
        for (int64_t p = 0; p < panels; ++p) {
            const W* panel = packed + p * K * kPanel;
            const int cols = static_cast<int>(std::min<int64_t>(kPanel, N - p * kPanel));
            const float* b = bias != nullptr ? bias + p * kPanel : nullptr;
            for (int64_t m = m0; m < m1; m += kRows) {
                const float* xm = x + m * x_stride;
                float* om = out + m * N + p * kPanel;
                switch (std::min<int64_t>(kRows, m1 - m)) {
                    case 1: panel_rows<1>(xm, x_stride, panel, K, b, om, N, cols); break;
                    case 2: panel_rows<2>(xm, x_stride, panel, K, b, om, N, cols); break;
                    case 3: panel_rows<3>(xm, x_stride, panel, K, b, om, N, cols); break;
                    case 4: panel_rows<4>(xm, x_stride, panel, K, b, om, N, cols); break;
                    case 5: panel_rows<5>(xm, x_stride, panel, K, b, om, N, cols); break;
                    default: panel_rows<6>(xm, x_stride, panel, K, b, om, N, cols); break;
                }
            }
        }
    }
#else
    (void)x; (void)x_stride; (void)M; (void)packed; (void)N; (void)K; (void)bias; (void)out;
#endif
}

// -- AVX-512 ------------------------------------------------------------------------------------
// On AVX-512 CPUs without AMX the linear layers run here too, in panels of the same 16 output
// columns: float32 weights as above (with bfloat16 ones widened as they are read), and bfloat16
// layers, where the CPU has AVX512-BF16, with their weights in pairs of k as its bfloat16
// dot-product instruction (vdpbf16ps: 16 float32 sums, each += two bfloat16 products, exact in
// float32) reads its right operand: for each pair of k, the 16 columns' two weights side by side.
// A micro-kernel keeps 6 rows x 4 panels (64 columns) of float32 sums in 24 of the 32 vector
// registers and, per k (per pair of k), loads the 4 panel lines once for all 6 rows and broadcasts
// each row's x: 24 multiply-adds per 10 loads. bfloat16 outputs are rounded once, at the end (as
// oneDNN's are). On the 2-core AVX512-BF16 EPYC, oneDNN reached 70-85% of vdpbf16ps's rate at 64
// rows and 30-65% at 16; this kernel 1.1-1.5x and 1.2-2.1x oneDNN there (two sittings). Not where the CPU has
// AMX: oneDNN multiplies on the matrix unit there, which this kernel was not measured against.
#if defined(__AVX512F__) && !defined(__AMX_BF16__)
#define HAVE_WIDE_LINEAR 1
#else
#define HAVE_WIDE_LINEAR 0
#endif
#if HAVE_WIDE_LINEAR && defined(__AVX512BF16__)
#define HAVE_PAIR_LINEAR 1
#else
#define HAVE_PAIR_LINEAR 0
#endif

constexpr int kWideRows = 6;    // rows per micro-kernel call
constexpr int kWidePanels = 4;  // panels per micro-kernel call: 64 output columns
// Rows whose x stays in L2 while every panel passes over it: 96 float32 rows at K = 512.
constexpr int64_t kWideChunkBytes = 192 * 1024;
inline int64_t wide_rows_per_chunk(int64_t K, int64_t x_bytes) {
    return std::max<int64_t>(kWideRows, std::min<int64_t>(192, kWideChunkBytes / (x_bytes * K) / kWideRows * kWideRows));
}

#if HAVE_WIDE_LINEAR
// What one k step of the micro-kernel loads and computes, by weight layout.
struct Float32Panels {  // float32 x and weights; one k a step
    using X = float; using W = float; using Out = float; using Xv = __m512; using Wv = __m512;
    static constexpr int kK = 1;
    static Wv weights(const W* p) { return _mm512_load_ps(p); }
    static Xv broadcast(const X* x) { return _mm512_set1_ps(*x); }
    static __m512 madd(__m512 acc, Xv x, Wv w) { return _mm512_fmadd_ps(x, w, acc); }
    static void store(Out* o, __m512 sums, __mmask16 mask) { _mm512_mask_storeu_ps(o, mask, sums); }
};
struct Bfloat16Panels : Float32Panels {  // bfloat16 weights widened exactly (a layer computed in float32)
    using W = uint16_t;
    static Wv weights(const W* p) {
        const __m256i raw = _mm256_load_si256(reinterpret_cast<const __m256i*>(p));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
    }
};
#if HAVE_PAIR_LINEAR
struct Bfloat16Pairs {  // bfloat16 x and weights in pairs of k; two k a step
    using X = uint16_t; using W = uint16_t; using Out = uint16_t; using Xv = __m512bh; using Wv = __m512bh;
    static constexpr int kK = 2;
    static Wv weights(const W* p) { return (__m512bh)_mm512_load_si512(p); }
    static Xv broadcast(const X* x) { return bf16::broadcast_pair(x); }
    static __m512 madd(__m512 acc, Xv x, Wv w) { return _mm512_dpbf16_ps(acc, x, w); }
    static void store(Out* o, __m512 sums, __mmask16 mask) {
        _mm256_mask_storeu_epi16(o, mask, (__m256i)_mm512_cvtneps_pbh(sums));
    }
};
#endif

// out[r][16p .. 16p + cols) = bias + sum over k of x[r][k] * W[16p + j][k] for R rows and P panels
// (the last of which has `last_cols` columns). With `next`, the lines at the same places of the
// next group of panels are fetched into L2 meanwhile: a weight larger than the L3 cache (the output
// layer's) otherwise waits on memory at every group's first rows (353 against 407 GFLOP/s).
template <typename Op, int R, int P, bool kPrefetch>
inline void wide_panel_rows(const typename Op::X* __restrict x, int64_t x_stride, const typename Op::W* __restrict panel,
                            int64_t panel_stride, int64_t K, const float* __restrict bias,
                            typename Op::Out* __restrict out, int64_t out_stride, int last_cols,
                            const typename Op::W* next) {
    __m512 acc[R][P];
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
        for (int q = 0; q < P; ++q) acc[r][q] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += Op::kK) {
        typename Op::Wv w[P];
#pragma GCC unroll 4
        for (int q = 0; q < P; ++q) {
            w[q] = Op::weights(panel + q * panel_stride + k * kPanel);
            if constexpr (kPrefetch)
                _mm_prefetch(reinterpret_cast<const char*>(next + q * panel_stride + k * kPanel), _MM_HINT_T1);
        }
#pragma GCC unroll 6
        for (int r = 0; r < R; ++r) {
            const typename Op::Xv xv = Op::broadcast(x + r * x_stride + k);
#pragma GCC unroll 4
            for (int q = 0; q < P; ++q) acc[r][q] = Op::madd(acc[r][q], xv, w[q]);
        }
    }
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
        for (int q = 0; q < P; ++q) {
            const int cols = q == P - 1 ? last_cols : kPanel;
            const __mmask16 mask = static_cast<__mmask16>((1u << cols) - 1u);
            __m512 sums = acc[r][q];
            if (bias != nullptr) sums = _mm512_add_ps(sums, _mm512_maskz_loadu_ps(mask, bias + q * kPanel));
            Op::store(out + r * out_stride + q * kPanel, sums, mask);
        }
}

// The rows against one group of P panels, kWideRows at a time; the first rows also fetch the next
// group (`next`, or null for none) into L2.
template <typename Op, int P>
inline void wide_panel_group(const typename Op::X* x, int64_t x_stride, int64_t rows, const typename Op::W* panel,
                             int64_t panel_stride, int64_t K, const float* bias, typename Op::Out* out,
                             int64_t out_stride, int last_cols, const typename Op::W* next) {
    for (int64_t m = 0; m < rows; m += kWideRows) {
        const auto* xm = x + m * x_stride;
        auto* om = out + m * out_stride;
#define WIDE_ROWS(R, PF) wide_panel_rows<Op, R, P, PF>(xm, x_stride, panel, panel_stride, K, bias, om, out_stride, \
                                                       last_cols, next)
        const bool fetch = m == 0 && next != nullptr;
        switch (std::min<int64_t>(kWideRows, rows - m)) {
            case 1: fetch ? WIDE_ROWS(1, true) : WIDE_ROWS(1, false); break;
            case 2: fetch ? WIDE_ROWS(2, true) : WIDE_ROWS(2, false); break;
            case 3: fetch ? WIDE_ROWS(3, true) : WIDE_ROWS(3, false); break;
            case 4: fetch ? WIDE_ROWS(4, true) : WIDE_ROWS(4, false); break;
            case 5: fetch ? WIDE_ROWS(5, true) : WIDE_ROWS(5, false); break;
            default: fetch ? WIDE_ROWS(6, true) : WIDE_ROWS(6, false); break;
        }
#undef WIDE_ROWS
    }
}

// out [M, N] = x [M, K] (rows x_stride apart) W^T + bias, W in panels of Op's layout. Threads
// split the groups of 4 panels; rows go in chunks that stay in L2.
template <typename Op>
void linear_wide(const typename Op::X* x, int64_t x_stride, int64_t M, const typename Op::W* packed, int64_t N,
                 int64_t K, const float* bias, typename Op::Out* out) {
    const int64_t panels = num_panels(N);
    const int64_t groups = (panels + kWidePanels - 1) / kWidePanels;
    const int64_t chunk = wide_rows_per_chunk(K, sizeof(typename Op::X));
    const int64_t panel_stride = K * kPanel;
    for (int64_t m0 = 0; m0 < M; m0 += chunk) {
        const int64_t rows = std::min(M, m0 + chunk) - m0;
#pragma omp parallel for schedule(static) if (groups > 1)
        for (int64_t g = 0; g < groups; ++g) {
            const int64_t p0 = g * kWidePanels;
            const int np = static_cast<int>(std::min<int64_t>(kWidePanels, panels - p0));
            const int last_cols = static_cast<int>(std::min<int64_t>(kPanel, N - (p0 + np - 1) * kPanel));
            const auto* xm = x + m0 * x_stride;
            const auto* panel = packed + p0 * panel_stride;
            const float* b = bias != nullptr ? bias + p0 * kPanel : nullptr;
            auto* om = out + m0 * N + p0 * kPanel;
            // The next group is whole (only the last may have fewer panels): fetch all 4 of its panels.
            const auto* next = g + 2 < groups ? panel + kWidePanels * panel_stride : nullptr;
            switch (np) {
                case 1: wide_panel_group<Op, 1>(xm, x_stride, rows, panel, panel_stride, K, b, om, N, last_cols, next); break;
                case 2: wide_panel_group<Op, 2>(xm, x_stride, rows, panel, panel_stride, K, b, om, N, last_cols, next); break;
                case 3: wide_panel_group<Op, 3>(xm, x_stride, rows, panel, panel_stride, K, b, om, N, last_cols, next); break;
                default: wide_panel_group<Op, 4>(xm, x_stride, rows, panel, panel_stride, K, b, om, N, last_cols, next); break;
            }
        }
    }
}
#endif

}  // namespace

extern "C" {

// 1 where linear_bf16 runs here (AVX512-BF16 without AMX), else 0.
int pair_linear_used() { return HAVE_PAIR_LINEAR; }

// packed (packed_linear_size elements, 64-byte aligned) <- w [N, K] bfloat16 row-major, K even, in
// pairs of k.
void pack_pair_linear(const uint16_t* w, int64_t N, int64_t K, uint16_t* packed) { pack_panels<2>(w, N, K, packed); }

// out [M, N] bfloat16 contiguous = x [M, K] bfloat16 (rows x_stride apart) W^T + bias (N float32,
// or null), with W pair-packed; K even.
void linear_bf16(const uint16_t* x, int64_t x_stride, int64_t M, const uint16_t* packed, int64_t N, int64_t K,
                 const float* bias, uint16_t* out) {
#if HAVE_PAIR_LINEAR
    linear_wide<Bfloat16Pairs>(x, x_stride, M, packed, N, K, bias, out);
#else
    (void)x; (void)x_stride; (void)M; (void)packed; (void)N; (void)K; (void)bias; (void)out;
#endif
}

// 1 where linear_f32 and linear_bf16_weights run here (AVX2 and FMA, or AVX-512 without AMX), else 0.
int linear_kernel_used() { return HAVE_PANEL_LINEAR || HAVE_WIDE_LINEAR; }

// Elements the packed weight of an N x K layer takes (N rounded up to whole panels).
int64_t packed_linear_size(int64_t N, int64_t K) { return num_panels(N) * kPanel * K; }

// packed (packed_linear_size elements, 64-byte aligned) <- w [N, K] row-major, float32 or bfloat16.
void pack_linear(const float* w, int64_t N, int64_t K, float* packed) { pack_panels<1>(w, N, K, packed); }
void pack_linear_bf16(const uint16_t* w, int64_t N, int64_t K, uint16_t* packed) { pack_panels<1>(w, N, K, packed); }

// out [M, N] float32 contiguous = x [M, K] float32 (rows x_stride apart) W^T + bias (N floats, or
// null), with W's panels float32 or bfloat16 (each widened exactly, so both give the same sums
// over the same numbers).
void linear_f32(const float* x, int64_t x_stride, int64_t M, const float* packed, int64_t N, int64_t K,
                const float* bias, float* out) {
#if HAVE_WIDE_LINEAR
    linear_wide<Float32Panels>(x, x_stride, M, packed, N, K, bias, out);
#else
    linear_panels(x, x_stride, M, packed, N, K, bias, out);
#endif
}
void linear_bf16_weights(const float* x, int64_t x_stride, int64_t M, const uint16_t* packed, int64_t N, int64_t K,
                         const float* bias, float* out) {
#if HAVE_WIDE_LINEAR
    linear_wide<Bfloat16Panels>(x, x_stride, M, packed, N, K, bias, out);
#else
    linear_panels(x, x_stride, M, packed, N, K, bias, out);
#endif
}

}  // extern "C"
