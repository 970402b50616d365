// Paged attention for the CPU backend: reads K/V where they lie in the block pool (no gathered
// copy, no padding), keeps grouped-query heads grouped (the G query heads of a KV head share each
// key load), serves decodes and chunked prefills in one call under the causal mask, attends blocks
// shared by a group of decodes once for the whole group (cascade), and dequantizes int8 blocks in
// the loop. Plain C++ with OpenMP and no PyTorch headers: it builds in seconds and is called
// through ctypes with raw pointers (the ctypes call releases the GIL).
//
// Layout of one layer (the backend owns it):
//   K: [KVH, NB, D, BS]  a block's keys transposed, so one FMA over BS keys scores them all
//   V: [KVH, NB, BS, D]
//   scales (int8 only): [KVH, NB, BS] one float32 per token and KV head, for K and V each
// except for bfloat16 blocks on the matrix unit (`pairs`, see matrix_tiles_used), whose elements
// go in pairs, as its tile multiply reads its right operand:
//   K: [KVH, NB, D/2, BS, 2]  per pair of dims, each key's two
//   V: [KVH, NB, BS/2, D, 2]  per pair of keys, each dim's two
// Dtype codes: 0 float32, 1 bfloat16, 2 int8.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>
#include <omp.h>

#if defined(__AVX2__)
#include <immintrin.h>
#endif
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <sys/syscall.h>
#include <unistd.h>
#define HAVE_AMX 1
#else
#define HAVE_AMX 0
#endif
// bfloat16 pairs on the vector unit: where the CPU has AVX512-BF16 but no AMX (see attend_blocks_pairs).
#if defined(__AVX512BF16__) && defined(__AVX512F__) && !HAVE_AMX
#define HAVE_VECTOR_PAIRS 1
#else
#define HAVE_VECTOR_PAIRS 0
#endif

#include "../bfloat16.h"

namespace {

constexpr float kNegLarge = -1e30f;  // instead of -inf: exp(kNegLarge - m) underflows to 0 exactly
constexpr int kRowsPerTile = 128;    // query rows (tokens x grouped heads) one work item carries

using bf16::from_f32;
using bf16::to_f32;

inline float load(const void* p, int64_t i, int dtype) {
    if (dtype == 0) return static_cast<const float*>(p)[i];
    if (dtype == 1) return to_f32(static_cast<const uint16_t*>(p)[i]);
    return static_cast<float>(static_cast<const int8_t*>(p)[i]);
}

// n bfloat16 or int8 (dtype 1 or 2) values from p into dst as float32 (int8 scales are applied to
// scores and weights).
inline void to_float(const void* p, int64_t offset, int64_t n, int dtype, float* __restrict dst) {
    if (dtype == 1) {
        const uint16_t* src = static_cast<const uint16_t*>(p) + offset;
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) dst[i] = bf16::to_f32(src[i]);
    } else {
        const int8_t* src = static_cast<const int8_t*>(p) + offset;
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
    }
}

// max(init, s[0..n)). gcc leaves `omp simd reduction(max)` over std::max scalar, one dependent
// compare per key, which was the hottest loop of the kernel: this one takes 16 keys a step.
inline float max_of(const float* __restrict s, int n, float init) {
    int k = 0;
#if defined(__AVX512F__)
    __m512 m = _mm512_set1_ps(init);
    for (; k + 16 <= n; k += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(s + k));
    init = _mm512_reduce_max_ps(m);
#elif defined(__AVX2__)
    __m256 m = _mm256_set1_ps(init);
    for (; k + 8 <= n; k += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(s + k));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    init = _mm_cvtss_f32(h);
#endif
    for (; k < n; ++k) init = s[k] > init ? s[k] : init;
    return init;
}

struct Problem {
    const void* q; int64_t q_stride;  // q [T, H, D]: elements between tokens
    const void* k_cache; const void* v_cache; const float* k_scale; const float* v_scale;
    const int32_t* block_tables; int64_t bt_stride;
    const int32_t* seq_lens; const int32_t* query_start;
    int H, KVH, D, BS; int64_t NB;
    float scale; int dtype, kv_dtype;
    void* out;  // [T, H, D] contiguous
};

constexpr int kMaxBlocksPerStep = 4;  // blocks whose keys go through one online-softmax update

// The micro-kernels keep a group of rows' sums in vector registers while keys or values stream
// past, so that each load serves every row of the group. AVX-512 has 32 registers of 16 floats,
// AVX2 16 of 8: past about half of AVX-512's, or 12 of AVX2's, the sums spill to memory and every
// FMA waits on a load and a store (AVX2 ran 3x under its FMA rate with the AVX-512 tiling). So
// groups are 4 rows on AVX-512 and 6 on AVX2 (12 FMAs per 8 loads), and each kernel takes as
// many blocks (scores) or dims (values) at a time as fill kSumRegisters.
#if defined(__AVX512F__)
constexpr int kVecFloats = 16, kSumRegisters = 16, kGroupRows = 4;
#else
constexpr int kVecFloats = 8, kSumRegisters = 12, kGroupRows = 6;
#endif
constexpr int floor_pow2(int n) { return n < 2 ? 1 : 2 * floor_pow2(n / 2); }

// A K/V element as float32. The micro-kernels read float32 blocks where they lie, and bfloat16
// blocks too when few rows read each key (a decode's grouped heads: widening at each load is two
// vector instructions, cheaper than a converted copy); when many rows share the keys (prefill
// chunks, cascade groups), a block is converted once into a float32 copy that they all read, as
// int8 blocks always are (their scales apply to scores and weights).
constexpr int kMaxRowsReadingInPlace = 8;
inline float f32(float x) { return x; }
inline float f32(uint16_t x) { return to_f32(x); }

// kN elements at p as float32: float32 ones where they are, bfloat16 ones widened into buf.
template <int kN>
inline const float* widened(const float* p, float*) { return p; }
template <int kN>
inline const float* widened(const uint16_t* __restrict p, float* __restrict buf) {
#pragma omp simd
    for (int i = 0; i < kN; ++i) buf[i] = to_f32(p[i]);
    return buf;
}

// Online-softmax state of `rows` query rows: running max, running sum, unnormalised output; and
// the scratch of one step over up to kMaxBlocksPerStep blocks (scores, dequantized int8 blocks).
struct RowState {
    std::vector<float> q, m, l, acc, kbuf, vbuf, s, corr, tile_out;
    std::vector<int> visible;
    // The matrix-tile path's left operands, bfloat16: the queries as given, the softmax weights.
    std::vector<uint16_t> qb, pb;
    void reserve(int rows, int D, int BS) {
        q.resize(rows * D); m.resize(rows); l.resize(rows); acc.resize(rows * D);
        kbuf.resize(kMaxBlocksPerStep * D * BS); vbuf.resize(kMaxBlocksPerStep * BS * D);
        s.resize(rows * kMaxBlocksPerStep * BS); corr.resize(rows); visible.resize(rows);
    }
    void reserve_tiles(int rows, int D, int BS) {
        qb.assign(static_cast<size_t>(rows) * D, 0); pb.assign(static_cast<size_t>(rows) * 2 * kMaxBlocksPerStep * BS, 0);
        s.resize(static_cast<size_t>(rows) * 2 * kMaxBlocksPerStep * BS);
        tile_out.resize(16 * D);
    }
};

// s[r * S + i * BS + k] = query row r's score against key k of block i (K[i]: that block's keys
// transposed, [D, BS]), for kR rows (q: kR x D) and kNB blocks: each key load serves kR rows, whose
// kR x kNB x BS scores stay in registers as independent FMA chains.
template <int kR, int kBS, int kNB, typename T>
inline void score_rows(const float* __restrict q, const T* const* K, int D, float* __restrict s, int S) {
    float acc[kR][kNB][kBS] = {};
    float wide[kBS];
    for (int d = 0; d < D; ++d) {
#pragma GCC unroll 4
        for (int i = 0; i < kNB; ++i) {
            const float* __restrict kf = widened<kBS>(K[i] + static_cast<int64_t>(d) * kBS, wide);
#pragma GCC unroll 6
            for (int j = 0; j < kR; ++j) {
                const float qd = q[j * D + d];
#pragma omp simd
                for (int k = 0; k < kBS; ++k) acc[j][i][k] += qd * kf[k];
            }
        }
    }
    for (int j = 0; j < kR; ++j)
        for (int i = 0; i < kNB; ++i)
            for (int k = 0; k < kBS; ++k) s[j * S + i * kBS + k] = acc[j][i][k];
}

// score_rows over `rows` rows: groups of kGroupRows, then of 4 (a decode's grouped heads), then one by one.
template <int kBS, int kNB, typename T>
inline void score_tile(const float* __restrict q, const T* const* K, int D, int rows, float* __restrict s, int S) {
    int r = 0;
    for (; r + kGroupRows <= rows; r += kGroupRows)
        score_rows<kGroupRows, kBS, kNB, T>(q + static_cast<int64_t>(r) * D, K, D, s + static_cast<int64_t>(r) * S, S);
    if constexpr (kGroupRows > 4)
        for (; r + 4 <= rows; r += 4)
            score_rows<4, kBS, kNB, T>(q + static_cast<int64_t>(r) * D, K, D, s + static_cast<int64_t>(r) * S, S);
    for (; r < rows; ++r)
        score_rows<1, kBS, kNB, T>(q + static_cast<int64_t>(r) * D, K, D, s + static_cast<int64_t>(r) * S, S);
}

// The same for any block size, one row and block at a time.
template <typename T>
inline void score_tile_any(const float* __restrict q, const T* const* K, int D, int BS, int nb, int rows,
                           float* __restrict s, int S) {
    for (int r = 0; r < rows; ++r)
        for (int i = 0; i < nb; ++i) {
            float* __restrict sr = s + static_cast<int64_t>(r) * S + i * BS;
            const float* __restrict qr = q + static_cast<int64_t>(r) * D;
#pragma omp simd
            for (int k = 0; k < BS; ++k) sr[k] = 0.f;
            for (int d = 0; d < D; ++d) {
                const float qd = qr[d];
                const T* __restrict kd = K[i] + static_cast<int64_t>(d) * BS;
#pragma omp simd
                for (int k = 0; k < BS; ++k) sr[k] += qd * f32(kd[k]);
            }
        }
}

// acc[r] = acc[r] * corr[r] + sum over keys k < visible[r] of w[r * S + k] * V(k), where key k is
// row k % BS of block V[k / BS] ([BS, D]), for kR rows over the most keys any of them sees (the
// others' weights there are 0): each value load serves kR rows. Dims go kDims at a time, whose
// kR x kDims sums stay in registers; the values of a step's blocks stay in the L1 cache across the
// passes over the dims.
template <int kR, int kBS, int kD, typename T>
inline void accumulate_rows(float* __restrict acc, const float* __restrict corr, const float* __restrict w, int S,
                            const T* const* V, const int* visible) {
    constexpr int kDims = std::min(kD, floor_pow2(kSumRegisters * kVecFloats / kR));  // divides kD
    int n = 0;
    for (int j = 0; j < kR; ++j) n = std::max(n, visible[j]);
    for (int d0 = 0; d0 < kD; d0 += kDims) {
        float a[kR][kDims];
        float wide[kDims];
        for (int j = 0; j < kR; ++j)
#pragma omp simd
            for (int i = 0; i < kDims; ++i) a[j][i] = acc[j * kD + d0 + i] * corr[j];
        for (int k = 0; k < n; ++k) {
            const float* __restrict vf = widened<kDims>(V[k / kBS] + (k % kBS) * kD + d0, wide);
#pragma GCC unroll 6
            for (int j = 0; j < kR; ++j) {
                const float wk = w[j * S + k];
#pragma omp simd
                for (int i = 0; i < kDims; ++i) a[j][i] += wk * vf[i];
            }
        }
        for (int j = 0; j < kR; ++j)
#pragma omp simd
            for (int i = 0; i < kDims; ++i) acc[j * kD + d0 + i] = a[j][i];
    }
}

// accumulate_rows over `rows` rows: groups of kGroupRows, then of 4, then one by one.
template <int kBS, int kD, typename T>
inline void accumulate_tile(float* __restrict acc, const float* __restrict corr, const float* __restrict w, int S,
                            const T* const* V, const int* visible, int rows) {
    int r = 0;
    for (; r + kGroupRows <= rows; r += kGroupRows)
        accumulate_rows<kGroupRows, kBS, kD, T>(acc + r * kD, corr + r, w + r * S, S, V, visible + r);
    if constexpr (kGroupRows > 4)
        for (; r + 4 <= rows; r += 4) accumulate_rows<4, kBS, kD, T>(acc + r * kD, corr + r, w + r * S, S, V, visible + r);
    for (; r < rows; ++r) accumulate_rows<1, kBS, kD, T>(acc + r * kD, corr + r, w + r * S, S, V, visible + r);
}

// The same for any block size and head dim, one row at a time.
template <typename T>
inline void accumulate_tile_any(float* __restrict acc, const float* __restrict corr, const float* __restrict w,
                                int S, const T* const* V, const int* visible, int rows, int BS, int D) {
    for (int r = 0; r < rows; ++r) {
        float* __restrict ar = acc + static_cast<int64_t>(r) * D;
#pragma omp simd
        for (int i = 0; i < D; ++i) ar[i] *= corr[r];
        for (int k = 0; k < visible[r]; ++k) {
            const float wk = w[r * S + k];
            const T* __restrict vk = V[k / BS] + static_cast<int64_t>(k % BS) * D;
#pragma omp simd
            for (int i = 0; i < D; ++i) ar[i] += wk * f32(vk[i]);
        }
    }
}

template <int kBS, typename T>
void score_blocks(const float* q, const T* const* K, int D, int BS, int nb, int rows, float* s, int S) {
    if constexpr (kBS != 0) {
        // Blocks whose group of rows' sums fill the sum registers: 4 of 16 keys on AVX-512, 1 on AVX2.
        constexpr int kGroup = std::max(1, kSumRegisters * kVecFloats / (kGroupRows * kBS));
        for (int i = 0; i < nb;) {
            const int n = std::min(kGroup, nb - i);
            switch (n) {
                case 1: score_tile<kBS, 1, T>(q, K + i, D, rows, s + i * kBS, S); break;
                case 2: score_tile<kBS, 2, T>(q, K + i, D, rows, s + i * kBS, S); break;
                case 3: score_tile<kBS, 3, T>(q, K + i, D, rows, s + i * kBS, S); break;
                default: score_tile<kBS, 4, T>(q, K + i, D, rows, s + i * kBS, S); break;
            }
            i += n;
        }
    } else {
        score_tile_any(q, K, D, BS, nb, rows, s, S);
    }
}

// Attends `rows` query rows (row r: token tokens[r], head heads[r], position pos[r]) to key
// blocks [b0, b1) of sequence `seq` under its block table, updating st, up to kMaxBlocksPerStep
// blocks per online-softmax update (one max, exp and rescale per row for up to 64 keys, not 16).
// kBS and kD fix the block size and head dim at compile time (0: read them from p).
// T is the element type the micro-kernels read: the pool's own (float32: float, bfloat16 in place:
// uint16_t), or float for bfloat16 and int8 blocks converted into st's buffers first.
template <int kBS, int kD, typename T>
void attend_blocks(const Problem& p, int kvh, int seq, int b0, int b1, int rows, const int* pos,
                   int kv_len, RowState& st) {
    const int D = kD != 0 ? kD : p.D, BS = kBS != 0 ? kBS : p.BS;
    const int S = kMaxBlocksPerStep * BS;  // a row's stride in st.s
    const int64_t block_elems = static_cast<int64_t>(D) * BS;
    const int32_t* table = p.block_tables + static_cast<int64_t>(seq) * p.bt_stride;
    const int elem_bytes = p.kv_dtype == 0 ? 4 : p.kv_dtype == 1 ? 2 : 1;
    const int64_t block_bytes = block_elems * elem_bytes;
    const T* K[kMaxBlocksPerStep];
    const T* V[kMaxBlocksPerStep];
    const float* ks[kMaxBlocksPerStep] = {};
    const float* vs[kMaxBlocksPerStep] = {};
    for (int b = b0; b < b1; b += kMaxBlocksPerStep) {
        const int nb = std::min(kMaxBlocksPerStep, b1 - b);
        // The next blocks lie anywhere in the pool, where the hardware prefetcher cannot guess
        // them: ask for them now, so that their lines arrive while these are computed.
        for (int nxt = b + nb; nxt < std::min(b1, b + 2 * nb); ++nxt) {
            const int64_t at = (static_cast<int64_t>(kvh) * p.NB + table[nxt]) * block_bytes;
            const char* nk = static_cast<const char*>(p.k_cache) + at;
            const char* nv = static_cast<const char*>(p.v_cache) + at;
            for (int64_t line = 0; line < block_bytes; line += 64) {
                __builtin_prefetch(nk + line);
                __builtin_prefetch(nv + line);
            }
        }
        for (int i = 0; i < nb; ++i) {
            const int64_t block = table[b + i];
            const int64_t base = (static_cast<int64_t>(kvh) * p.NB + block) * block_elems;
            if (p.kv_dtype == 2) {
                const int64_t sbase = (static_cast<int64_t>(kvh) * p.NB + block) * BS;
                ks[i] = p.k_scale + sbase;
                vs[i] = p.v_scale + sbase;
            }
            const bool converted = std::is_same_v<T, float> && p.kv_dtype != 0;
            if (converted) {
                float* kb = st.kbuf.data() + i * block_elems;
                float* vb = st.vbuf.data() + i * block_elems;
                to_float(p.k_cache, base, block_elems, p.kv_dtype, kb);
                to_float(p.v_cache, base, block_elems, p.kv_dtype, vb);
                K[i] = reinterpret_cast<const T*>(kb);
                V[i] = reinterpret_cast<const T*>(vb);
            } else {
                K[i] = static_cast<const T*>(p.k_cache) + base;
                V[i] = static_cast<const T*>(p.v_cache) + base;
            }
        }
        const int key0 = b * BS;
        const int keys = nb * BS;
        const int in_range = std::min(keys, kv_len - key0);
        score_blocks<kBS, T>(st.q.data(), K, D, BS, nb, rows, st.s.data(), S);
        for (int r = 0; r < rows; ++r) {
            float* __restrict s = st.s.data() + static_cast<int64_t>(r) * S;
            const int visible = std::min(in_range, pos[r] - key0 + 1);
            st.visible[r] = std::max(visible, 0);
            if (visible <= 0) {  // these keys all follow this row (causal): it keeps its state
                st.corr[r] = 1.f;
#pragma omp simd
                for (int k = 0; k < keys; ++k) s[k] = 0.f;
                continue;
            }
            if (p.kv_dtype == 2)
                for (int i = 0; i < nb; ++i)
#pragma omp simd
                    for (int k = 0; k < BS; ++k) s[i * BS + k] *= ks[i][k];
            // Keys past `visible` (beyond the sequence, or after this row under the causal mask)
            // get weight 0. The exp runs over the visible keys alone: the vector exp hands every
            // lane that underflows to the scalar one, which had made masked keys cost as much as
            // the rest of the softmax.
            const float mx = max_of(s, visible, st.m[r]);
            // Past the first blocks the running max seldom moves: no rescale then (exp(0) is 1).
            // A row's first keys rescale nothing (its sums are 0), so they skip the exp too.
            const float corr = mx > st.m[r] ? (st.m[r] == kNegLarge ? 0.f : std::exp(st.m[r] - mx)) : 1.f;
            float sum = 0.f;
#pragma omp simd reduction(+ : sum)
            for (int k = 0; k < visible; ++k) {
                s[k] = std::exp(s[k] - mx);
                sum += s[k];
            }
            for (int k = visible; k < keys; ++k) s[k] = 0.f;
            st.l[r] = st.l[r] * corr + sum;
            st.m[r] = mx;
            st.corr[r] = corr;
            if (p.kv_dtype == 2)  // int8 values: each key's weight takes its value scale
                for (int i = 0; i < nb; ++i)
#pragma omp simd
                    for (int k = 0; k < BS; ++k) s[i * BS + k] *= vs[i][k];
        }
        if constexpr (kBS != 0 && kD != 0)
            accumulate_tile<kBS, kD, T>(st.acc.data(), st.corr.data(), st.s.data(), S, V, st.visible.data(), rows);
        else
            accumulate_tile_any(st.acc.data(), st.corr.data(), st.s.data(), S, V, st.visible.data(), rows, BS, D);
    }
}

using AttendFn = void (*)(const Problem&, int, int, int, int, int, const int*, int, RowState&);

// The specialised loop for the usual block sizes and head dims, else the general one.
template <typename T>
AttendFn pick_attend(int BS, int D) {
    if (BS == 16 && D == 64) return attend_blocks<16, 64, T>;
    if (BS == 16 && D == 128) return attend_blocks<16, 128, T>;
    if (BS == 32 && D == 64) return attend_blocks<32, 64, T>;
    if (BS == 32 && D == 128) return attend_blocks<32, 128, T>;
    return attend_blocks<0, 0, T>;
}

// K[i], V[i] <- blocks b .. b + nb of the sequence's table in a bfloat16 pool stored in pairs, for
// the paths that read them there (matrix tiles, vector pairs); the next blocks up to b1 are asked
// for meanwhile, as in attend_blocks.
[[maybe_unused]] inline void paired_blocks(const Problem& p, int kvh, const int32_t* table, int b, int nb, int b1,
                                           int64_t block_elems, const uint16_t** K, const uint16_t** V) {
    const uint16_t* k_cache = static_cast<const uint16_t*>(p.k_cache);
    const uint16_t* v_cache = static_cast<const uint16_t*>(p.v_cache);
    for (int nxt = b + nb; nxt < std::min(b1, b + 2 * nb); ++nxt) {
        const int64_t at = (static_cast<int64_t>(kvh) * p.NB + table[nxt]) * block_elems;
        for (int64_t line = 0; line < block_elems; line += 32) {
            __builtin_prefetch(k_cache + at + line);
            __builtin_prefetch(v_cache + at + line);
        }
    }
    for (int i = 0; i < nb; ++i) {
        const int64_t base = (static_cast<int64_t>(kvh) * p.NB + table[b + i]) * block_elems;
        K[i] = k_cache + base;
        V[i] = v_cache + base;
    }
}

#if HAVE_AMX
// -- Matrix tiles (AMX) -----------------------------------------------------------------------------
// Where the CPU has AMX, bfloat16 blocks are stored in pairs (see the layout above) and every tile
// of rows attends them on the matrix unit: scores Q K^T, then the weighted values P V, each
// instruction 16 rows x 16 columns of float32 sums of bfloat16 products, reading the blocks where
// they lie. The online softmax between the two stays in float32 as above; its weights are rounded
// to bfloat16 for P V (as GPU attention kernels do), and each row's sum adds the rounded weights,
// so the weights the values get still sum to one. The queries go in as given (bfloat16); the
// scale goes onto the scores.
constexpr int kTileRows = 16;
// Blocks per online-softmax update on the matrix unit: twice the vector path's, as its scores
// need no registers (RowState's buffers are sized for it).
constexpr int kTileBlocksPerStep = 2 * kMaxBlocksPerStep;

struct TileConfig {
    uint8_t palette_id = 1;
    uint8_t start_row = 0;
    uint8_t reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
};

// Tiles 0, 5, 6, 7: four sums, 16 rows x 16 float32 each, filled side by side (a tile multiply
// takes several times longer to finish than to start, so one chain of sums would wait on each).
// Q K^T: tile 1, 16 query rows x 32 dims; tile 2, 16 pairs of dims x 16 keys. P V, one block at a
// time: tile 3, 16 rows x 16 keys' weights; tile 4, 8 pairs of keys x 16 dims. Set at each call:
// another library on this thread (oneDNN) configures the tiles its own way in between. `m`: the
// rows of the sums and left operands (fewer than 16 for a decode's grouped heads: a tile multiply
// takes time in proportion to its rows).
inline void configure_tiles(int m) {
    TileConfig config;
    const int colsb[8] = {64, 64, 64, 32, 64, 64, 64, 64}, rows[8] = {m, m, 16, m, 8, m, m, m};
    for (int t = 0; t < 8; ++t) {
        config.colsb[t] = static_cast<uint16_t>(colsb[t]);
        config.rows[t] = static_cast<uint8_t>(rows[t]);
    }
    _tile_loadconfig(&config);
}

// The tile instructions name their tiles as literal numbers (the intrinsics paste them into the
// register name, so not even a template parameter will do): sum j (0-3) is tile 0, 5, 6 or 7.
inline void zero_sum(int j) {
    switch (j) {
        case 0: _tile_zero(0); break;
        case 1: _tile_zero(5); break;
        case 2: _tile_zero(6); break;
        default: _tile_zero(7); break;
    }
}
inline void store_sum(int j, void* dst, int stride) {
    switch (j) {
        case 0: _tile_stored(0, dst, stride); break;
        case 1: _tile_stored(5, dst, stride); break;
        case 2: _tile_stored(6, dst, stride); break;
        default: _tile_stored(7, dst, stride); break;
    }
}
inline void add_scores(int j) {  // sum j += tile 1 x tile 2
    switch (j) {
        case 0: _tile_dpbf16ps(0, 1, 2); break;
        case 1: _tile_dpbf16ps(5, 1, 2); break;
        case 2: _tile_dpbf16ps(6, 1, 2); break;
        default: _tile_dpbf16ps(7, 1, 2); break;
    }
}
inline void add_values(int j) {  // sum j += tile 3 x tile 4
    switch (j) {
        case 0: _tile_dpbf16ps(0, 3, 4); break;
        case 1: _tile_dpbf16ps(5, 3, 4); break;
        case 2: _tile_dpbf16ps(6, 3, 4); break;
        default: _tile_dpbf16ps(7, 3, 4); break;
    }
}

// Linux gives a process the tile registers' state only once it asks (it then saves and restores
// them with the thread); a refusal leaves the vector path.
bool tiles_permitted() {
    static const bool permitted = [] {
        constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
        return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
    }();
    return permitted;
}

// attend_blocks for blocks of 16 bfloat16 keys stored in pairs, on the matrix unit. st.qb holds
// the rows' queries (bfloat16), zero-padded to whole tiles of 16 rows.
template <int kD>
void attend_blocks_tiles(const Problem& p, int kvh, int seq, int b0, int b1, int rows, const int* pos,
                         int kv_len, RowState& st) {
    constexpr int BS = 16, S = kTileBlocksPerStep * BS;
    constexpr int64_t block_elems = static_cast<int64_t>(kD) * BS;
    const int32_t* table = p.block_tables + static_cast<int64_t>(seq) * p.bt_stride;
    const int groups = (rows + kTileRows - 1) / kTileRows;
    const uint16_t* K[kTileBlocksPerStep];
    const uint16_t* V[kTileBlocksPerStep];
    configure_tiles(std::min(rows, kTileRows));
    for (int b = b0; b < b1; b += kTileBlocksPerStep) {
        const int nb = std::min(kTileBlocksPerStep, b1 - b);
        paired_blocks(p, kvh, table, b, nb, b1, block_elems, K, V);
        for (int g = 0; g < groups; ++g) {
            const uint16_t* qg = st.qb.data() + static_cast<int64_t>(g) * kTileRows * kD;
            float* sg = st.s.data() + static_cast<int64_t>(g) * kTileRows * S;
            for (int i0 = 0; i0 < nb; i0 += 4) {  // four blocks' scores side by side
                const int n4 = std::min(4, nb - i0);
                for (int j = 0; j < n4; ++j) zero_sum(j);
                for (int c = 0; c < kD / 32; ++c) {
                    _tile_loadd(1, qg + c * 32, kD * 2);
                    for (int j = 0; j < n4; ++j) {
                        _tile_loadd(2, K[i0 + j] + c * 16 * BS * 2, 64);
                        add_scores(j);
                    }
                }
                for (int j = 0; j < n4; ++j) store_sum(j, sg + (i0 + j) * BS, S * 4);
            }
        }

        const int key0 = b * BS;
        const int keys = nb * BS;
        const int in_range = std::min(keys, kv_len - key0);
        for (int r = 0; r < rows; ++r) {
            float* __restrict s = st.s.data() + static_cast<int64_t>(r) * S;
            uint16_t* __restrict w = st.pb.data() + static_cast<int64_t>(r) * S;
            const int visible = std::min(in_range, pos[r] - key0 + 1);
            if (visible <= 0) {  // these keys all follow this row (causal): it keeps its state
                st.corr[r] = 1.f;
                std::memset(w, 0, keys * sizeof(uint16_t));
                continue;
            }
#pragma omp simd
            for (int k = 0; k < keys; ++k) s[k] *= p.scale;
            for (int k = visible; k < keys; ++k) s[k] = kNegLarge;
            const float mx = max_of(s, keys, st.m[r]);
            const float corr = mx > st.m[r] ? std::exp(st.m[r] - mx) : 1.f;
            float sum = 0.f;
#pragma omp simd reduction(+ : sum)
            for (int k = 0; k < keys; ++k) {
                const uint16_t weight = from_f32(std::exp(s[k] - mx));
                w[k] = weight;
                sum += to_f32(weight);
            }
            st.l[r] = st.l[r] * corr + sum;
            st.m[r] = mx;
            st.corr[r] = corr;
        }

        for (int g = 0; g < groups; ++g) {
            for (int n0 = 0; n0 < kD / 16; n0 += 4) {  // four chunks of 16 dims side by side
                const int n4 = std::min(4, kD / 16 - n0);
                for (int j = 0; j < n4; ++j) zero_sum(j);
                for (int i = 0; i < nb; ++i) {
                    _tile_loadd(3, st.pb.data() + static_cast<int64_t>(g) * kTileRows * S + i * BS, S * 2);
                    for (int j = 0; j < n4; ++j) {
                        _tile_loadd(4, V[i] + (n0 + j) * 16 * 2, kD * 2 * 2);
                        add_values(j);
                    }
                }
                for (int j = 0; j < n4; ++j) store_sum(j, st.tile_out.data() + (n0 + j) * 16, kD * 4);
            }
            const int r_end = std::min(rows, (g + 1) * kTileRows);
            for (int r = g * kTileRows; r < r_end; ++r) {
                float* __restrict a = st.acc.data() + static_cast<int64_t>(r) * kD;
                const float* __restrict t = st.tile_out.data() + static_cast<int64_t>(r - g * kTileRows) * kD;
                const float corr = st.corr[r];
#pragma omp simd
                for (int d = 0; d < kD; ++d) a[d] = a[d] * corr + t[d];
            }
        }
    }
    _tile_release();
}
#endif  // HAVE_AMX

#if HAVE_VECTOR_PAIRS
// -- bfloat16 pairs on the vector unit (AVX512-BF16 without AMX) -------------------------------------
// bfloat16 blocks stored in pairs as for the matrix unit (see the layout above), attended with the
// vector unit's bfloat16 dot product (vdpbf16ps: 16 float32 sums, each += two bfloat16 products,
// exact in float32): half the multiply-adds of widening each element to float32, and no widening
// or converted copy. The arithmetic is the matrix-tile path's: the queries go in as given
// (bfloat16) and the scale onto the scores; the softmax runs in float32 over the visible keys, its
// weights rounded to bfloat16 for the weighted values, and each row's sum adds the rounded weights.

// s[r * S + i * 16 + k] = row r's score against key k of block i (keys in pairs of dims), unscaled,
// for kR rows (qb: bfloat16, kR x kD) and kNB blocks: kR x kNB vectors of 16 sums in registers.
template <int kR, int kNB, int kD>
inline void score_pairs_rows(const uint16_t* __restrict qb, const uint16_t* const* K, float* __restrict s, int S) {
    __m512 acc[kR][kNB];
    for (int j = 0; j < kR; ++j)
        for (int i = 0; i < kNB; ++i) acc[j][i] = _mm512_setzero_ps();
    for (int d2 = 0; d2 < kD / 2; ++d2) {
        __m512bh keys[kNB];
        for (int i = 0; i < kNB; ++i) keys[i] = (__m512bh)_mm512_loadu_si512(K[i] + d2 * 32);
        for (int j = 0; j < kR; ++j) {
            const __m512bh q = bf16::broadcast_pair(qb + j * kD + 2 * d2);
            for (int i = 0; i < kNB; ++i) acc[j][i] = _mm512_dpbf16_ps(acc[j][i], q, keys[i]);
        }
    }
    for (int j = 0; j < kR; ++j)
        for (int i = 0; i < kNB; ++i) _mm512_storeu_ps(s + j * S + i * 16, acc[j][i]);
}

template <int kR, int kD>
inline void score_pairs_blocks(const uint16_t* qb, const uint16_t* const* K, int nb, float* s, int S) {
    switch (nb) {
        case 1: score_pairs_rows<kR, 1, kD>(qb, K, s, S); break;
        case 2: score_pairs_rows<kR, 2, kD>(qb, K, s, S); break;
        case 3: score_pairs_rows<kR, 3, kD>(qb, K, s, S); break;
        default: score_pairs_rows<kR, 4, kD>(qb, K, s, S); break;
    }
}

// acc[r] = acc[r] * corr[r] + sum over keys k < visible[r] of w[r * S + k] * V(k) for kR rows, the
// weights bfloat16 (0 past each row's visible keys), keys in pairs: each pair of V's lines (16 dims
// x 2 keys) serves kR rows. Dims go 64 at a time (kR x 4 vectors of sums).
template <int kR, int kD>
inline void accumulate_pairs_rows(float* __restrict acc, const float* __restrict corr, const uint16_t* __restrict w,
                                  int S, const uint16_t* const* V, const int* visible) {
    constexpr int kDims = std::min(kD, 64), kVecs = kDims / 16;
    int n = 0;
    for (int j = 0; j < kR; ++j) n = std::max(n, visible[j]);
    const int pairs = (n + 1) / 2;  // a row's weight past its visible keys is 0, pairs round up
    for (int d0 = 0; d0 < kD; d0 += kDims) {
        __m512 a[kR][kVecs];
        for (int j = 0; j < kR; ++j)
            for (int c = 0; c < kVecs; ++c)
                a[j][c] = _mm512_mul_ps(_mm512_loadu_ps(acc + j * kD + d0 + 16 * c), _mm512_set1_ps(corr[j]));
        for (int kp = 0; kp < pairs; ++kp) {
            const uint16_t* line = V[kp / 8] + (kp % 8) * kD * 2 + d0 * 2;  // 8 pairs of keys a block
            __m512bh vals[kVecs];
            for (int c = 0; c < kVecs; ++c) vals[c] = (__m512bh)_mm512_loadu_si512(line + 32 * c);
            for (int j = 0; j < kR; ++j) {
                const __m512bh wv = bf16::broadcast_pair(w + j * S + 2 * kp);
                for (int c = 0; c < kVecs; ++c) a[j][c] = _mm512_dpbf16_ps(a[j][c], wv, vals[c]);
            }
        }
        for (int j = 0; j < kR; ++j)
            for (int c = 0; c < kVecs; ++c) _mm512_storeu_ps(acc + j * kD + d0 + 16 * c, a[j][c]);
    }
}

// attend_blocks for blocks of 16 bfloat16 keys stored in pairs, on the vector unit. st.qb holds the
// rows' queries (bfloat16).
template <int kD>
void attend_blocks_pairs(const Problem& p, int kvh, int seq, int b0, int b1, int rows, const int* pos,
                         int kv_len, RowState& st) {
    constexpr int BS = 16, S = kMaxBlocksPerStep * BS;
    constexpr int64_t block_elems = static_cast<int64_t>(kD) * BS;
    const int32_t* table = p.block_tables + static_cast<int64_t>(seq) * p.bt_stride;
    const uint16_t* K[kMaxBlocksPerStep];
    const uint16_t* V[kMaxBlocksPerStep];
    for (int b = b0; b < b1; b += kMaxBlocksPerStep) {
        const int nb = std::min(kMaxBlocksPerStep, b1 - b);
        paired_blocks(p, kvh, table, b, nb, b1, block_elems, K, V);
        int r = 0;
        for (; r + kGroupRows <= rows; r += kGroupRows)
            score_pairs_blocks<kGroupRows, kD>(st.qb.data() + r * kD, K, nb, st.s.data() + r * S, S);
        for (; r < rows; ++r) score_pairs_blocks<1, kD>(st.qb.data() + r * kD, K, nb, st.s.data() + r * S, S);

        const int key0 = b * BS;
        const int keys = nb * BS;
        const int in_range = std::min(keys, kv_len - key0);
        for (r = 0; r < rows; ++r) {
            float* __restrict s = st.s.data() + static_cast<int64_t>(r) * S;
            uint16_t* __restrict w = st.pb.data() + static_cast<int64_t>(r) * S;
            const int visible = std::max(0, std::min(in_range, pos[r] - key0 + 1));
            st.visible[r] = visible;
            if (visible == 0) {  // these keys all follow this row (causal): it keeps its state
                st.corr[r] = 1.f;
                std::memset(w, 0, keys * sizeof(uint16_t));
                continue;
            }
#pragma omp simd
            for (int k = 0; k < visible; ++k) s[k] *= p.scale;
            // As in attend_blocks: exp over the visible keys alone, no rescale on a row's first keys.
            const float mx = max_of(s, visible, st.m[r]);
            const float corr = mx > st.m[r] ? (st.m[r] == kNegLarge ? 0.f : std::exp(st.m[r] - mx)) : 1.f;
            float sum = 0.f;
#pragma omp simd reduction(+ : sum)
            for (int k = 0; k < visible; ++k) {
                const uint16_t weight = from_f32(std::exp(s[k] - mx));
                w[k] = weight;
                sum += to_f32(weight);
            }
            for (int k = visible; k < keys; ++k) w[k] = 0;
            st.l[r] = st.l[r] * corr + sum;
            st.m[r] = mx;
            st.corr[r] = corr;
        }

        for (r = 0; r + kGroupRows <= rows; r += kGroupRows)
            accumulate_pairs_rows<kGroupRows, kD>(st.acc.data() + r * kD, st.corr.data() + r, st.pb.data() + r * S, S,
                                                  V, st.visible.data() + r);
        for (; r < rows; ++r)
            accumulate_pairs_rows<1, kD>(st.acc.data() + r * kD, st.corr.data() + r, st.pb.data() + r * S, S, V,
                                         st.visible.data() + r);
    }
}
#endif  // HAVE_VECTOR_PAIRS

// Whether bfloat16 blocks of this size and head dim are stored in pairs and attended on the
// matrix unit (AMX).
bool use_tiles(int BS, int D) {
#if HAVE_AMX
    return BS == 16 && (D == 32 || D == 64 || D == 128 || D == 256) && tiles_permitted();
#else
    (void)BS;
    (void)D;
    return false;
#endif
}

// The paired paths' instance of `f` for head dim D (32, 64, 128 or 256).
#define BY_HEAD_DIM(f, D) ((D) == 32 ? f<32> : (D) == 64 ? f<64> : (D) == 128 ? f<128> : f<256>)

AttendFn pick_attend_tiles(int D) {
#if HAVE_AMX
    return BY_HEAD_DIM(attend_blocks_tiles, D);
#else
    (void)D;
    return nullptr;
#endif
}

// Whether bfloat16 blocks of this size and head dim are stored in pairs and attended with the
// vector unit's bfloat16 dot product (AVX512-BF16 without AMX).
bool use_vector_pairs(int BS, int D) {
    return HAVE_VECTOR_PAIRS && BS == 16 && (D == 32 || D == 64 || D == 128 || D == 256);
}

AttendFn pick_attend_pairs(int D) {
#if HAVE_VECTOR_PAIRS
    return BY_HEAD_DIM(attend_blocks_pairs, D);
#else
    (void)D;
    return nullptr;
#endif
}

// The rows' queries, scaled, as float32 into st.q; and, for the paired paths (st.qb sized), the
// bfloat16 queries as they are into st.qb (their products take the scale afterwards).
void load_queries(const Problem& p, int rows, const int64_t* tokens, const int* heads, RowState& st) {
    for (int r = 0; r < rows; ++r) {
        const int64_t off = tokens[r] * p.q_stride + static_cast<int64_t>(heads[r]) * p.D;
        float* dst = st.q.data() + static_cast<int64_t>(r) * p.D;
        for (int d = 0; d < p.D; ++d) dst[d] = load(p.q, off + d, p.dtype) * p.scale;
        if (st.qb.empty()) continue;
        uint16_t* qb = st.qb.data() + static_cast<int64_t>(r) * p.D;
        if (p.dtype == 1) std::memcpy(qb, static_cast<const uint16_t*>(p.q) + off, sizeof(uint16_t) * p.D);
        else for (int d = 0; d < p.D; ++d) qb[d] = from_f32(load(p.q, off + d, p.dtype));
    }
}

void store_rows(const Problem& p, int rows, const int64_t* tokens, const int* heads, const RowState& st) {
    for (int r = 0; r < rows; ++r) {
        const int64_t off = (tokens[r] * p.H + heads[r]) * p.D;
        const float inv = st.l[r] > 0.f ? 1.f / st.l[r] : 0.f;
        const float* acc = st.acc.data() + static_cast<int64_t>(r) * p.D;
        if (p.dtype == 0) {
            float* o = static_cast<float*>(p.out) + off;
            for (int d = 0; d < p.D; ++d) o[d] = acc[d] * inv;
        } else {
            uint16_t* o = static_cast<uint16_t*>(p.out) + off;
            for (int d = 0; d < p.D; ++d) o[d] = from_f32(acc[d] * inv);
        }
    }
}

struct WorkItem { int seq, kvh, t0, t1; };

}  // namespace

extern "C" {

// Writes the step's new keys and values into their slots (slot = block * BS + offset), quantizing
// to int8 (absmax over D per token and KV head, round half to even, as torch) when kv_dtype is 2,
// in pairs when `pairs` (bfloat16 on the matrix unit).
void write_kv(const void* k, int64_t k_stride, const void* v, int64_t v_stride, int src_dtype, int64_t T,
              const int64_t* slots, void* k_cache, void* v_cache, float* k_scale, float* v_scale,
              int KVH, int64_t NB, int BS, int D, int kv_dtype, int pairs) {
    const int64_t block_elems = static_cast<int64_t>(D) * BS;
#pragma omp parallel for collapse(2) if (T * KVH > 64)
    for (int64_t t = 0; t < T; ++t) {
        for (int h = 0; h < KVH; ++h) {
            const int64_t slot = slots[t];
            const int64_t block = slot / BS, o = slot % BS;
            const int64_t base = (static_cast<int64_t>(h) * NB + block) * block_elems;
            for (int which = 0; which < 2; ++which) {
                const void* src = which == 0 ? k : v;
                const int64_t off = t * (which == 0 ? k_stride : v_stride) + static_cast<int64_t>(h) * D;
                void* cache = which == 0 ? k_cache : v_cache;
                // K is transposed within its block ([D, BS]); V is not ([BS, D]).
                const int64_t step = which == 0 ? BS : 1;
                const int64_t first = which == 0 ? base + o : base + o * D;
                if (kv_dtype == 2) {
                    float amax = 0.f;
                    for (int d = 0; d < D; ++d) amax = std::max(amax, std::fabs(load(src, off + d, src_dtype)));
                    const float sc = std::max(amax, 1e-8f) / 127.f;
                    int8_t* dst = static_cast<int8_t*>(cache);
                    for (int d = 0; d < D; ++d) {
                        float x = std::nearbyint(load(src, off + d, src_dtype) / sc);
                        dst[first + d * step] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, x)));
                    }
                    float* scales = which == 0 ? k_scale : v_scale;
                    scales[(static_cast<int64_t>(h) * NB + block) * BS + o] = sc;
                } else if (kv_dtype == 1 && pairs) {
                    // K: dim d of key o at [d / 2, o, d % 2]; V: [o / 2, d, o % 2] (see the layout above).
                    uint16_t* dst = static_cast<uint16_t*>(cache);
                    const int64_t at = which == 0 ? base + o * 2 : base + (o / 2) * D * 2 + o % 2;
                    for (int d = 0; d < D; ++d) {
                        const int64_t i = which == 0 ? at + (d / 2) * BS * 2 + d % 2 : at + d * 2;
                        dst[i] = src_dtype == 1 ? static_cast<const uint16_t*>(src)[off + d]
                                                : from_f32(load(src, off + d, src_dtype));
                    }
                } else if (kv_dtype == 1) {
                    uint16_t* dst = static_cast<uint16_t*>(cache);
                    for (int d = 0; d < D; ++d) {
                        dst[first + d * step] = src_dtype == 1 ? static_cast<const uint16_t*>(src)[off + d]
                                                               : from_f32(load(src, off + d, src_dtype));
                    }
                } else {
                    float* dst = static_cast<float*>(cache);
                    for (int d = 0; d < D; ++d) dst[first + d * step] = load(src, off + d, src_dtype);
                }
            }
        }
    }
}

// 1 when bfloat16 blocks of this block size and head dim are stored in pairs (write_kv's and
// paged_attention's `pairs`) and attended on the matrix unit (AMX) here; else 0.
int matrix_tiles_used(int BS, int D) { return use_tiles(BS, D) ? 1 : 0; }

// 1 when bfloat16 blocks of this block size and head dim are stored in pairs here (write_kv's and
// paged_attention's `pairs`): on the matrix unit (AMX) or the vector unit's bfloat16 dot product
// (AVX512-BF16); else 0.
int pairs_layout_used(int BS, int D) { return use_tiles(BS, D) || use_vector_pairs(BS, D) ? 1 : 0; }

// out [T, H, D] = softmax(q k^T * scale) v per sequence, causally: sequence s has query tokens
// [query_start[s], query_start[s+1]) at the last positions of its seq_lens[s] keys.
// Cascade groups: decodes c in [cascade_start[g], cascade_start[g+1]) (one query each, at a
// position past the shared part) share their first cascade_blocks[g] blocks (those of the group's
// first sequence); those blocks are attended once per group into `scratch` (floats, at least
// num_cascade_seqs * H * (D + 2)), and each member goes on from there with its own blocks.
void paged_attention(const void* q, int64_t q_stride, const void* k_cache, const void* v_cache,
                     const float* k_scale, const float* v_scale, const int32_t* block_tables, int64_t bt_stride,
                     const int32_t* seq_lens, const int32_t* query_start, int num_seqs, int H, int KVH, int D,
                     int BS, int64_t NB, float scale, const int32_t* cascade_start, const int32_t* cascade_blocks,
                     int num_groups, float* scratch, void* out, int dtype, int kv_dtype, int pairs) {
    const Problem p{q, q_stride, k_cache, v_cache, k_scale, v_scale, block_tables, bt_stride, seq_lens,
                    query_start, H, KVH, D, BS, NB, scale, dtype, kv_dtype, out};
    const int G = H / KVH;
    // Blocks stored in pairs: every tile on the matrix unit. Otherwise few rows read bfloat16
    // blocks in place, many read them converted to float32 (float32 pools are read in place).
    const bool tiles = pairs != 0 && kv_dtype == 1 && use_tiles(BS, D);
    const bool vector_pairs = pairs != 0 && kv_dtype == 1 && !tiles && use_vector_pairs(BS, D);
    const bool paired = tiles || vector_pairs;
    const AttendFn attend_in_place = kv_dtype == 1 ? pick_attend<uint16_t>(BS, D) : pick_attend<float>(BS, D);
    const AttendFn attend_many = pick_attend<float>(BS, D);
    const AttendFn attend_paired = tiles ? pick_attend_tiles(D) : vector_pairs ? pick_attend_pairs(D) : nullptr;
    auto attend = [&](const Problem& pr, int kvh, int seq, int b0, int b1, int rows, const int* pos, int kv_len,
                      RowState& st) {
        (paired ? attend_paired : rows <= kMaxRowsReadingInPlace ? attend_in_place : attend_many)(
            pr, kvh, seq, b0, b1, rows, pos, kv_len, st);
    };
    const int tokens_per_tile = std::max(1, kRowsPerTile / G);
    const int num_cascade_seqs = num_groups > 0 ? cascade_start[num_groups] : 0;
    float* sc_m = scratch;
    float* sc_l = scratch + static_cast<int64_t>(num_cascade_seqs) * H;
    float* sc_acc = scratch + 2 * static_cast<int64_t>(num_cascade_seqs) * H;

    // Phase 1: shared blocks, once per cascade group, for all its members' rows together.
    std::vector<WorkItem> shared_items;
    for (int g = 0; g < num_groups; ++g)
        for (int h = 0; h < KVH; ++h)
            for (int c = cascade_start[g]; c < cascade_start[g + 1]; c += tokens_per_tile)
                shared_items.push_back({g, h, c, std::min(c + tokens_per_tile, cascade_start[g + 1])});
    // Phase 2: every sequence's own blocks (a cascade member's start after the shared ones).
    std::vector<WorkItem> items;
    for (int s = 0; s < num_seqs; ++s) {
        const int nq = query_start[s + 1] - query_start[s];
        for (int h = 0; h < KVH; ++h)
            for (int t0 = 0; t0 < nq; t0 += tokens_per_tile)
                items.push_back({s, h, t0, std::min(t0 + tokens_per_tile, nq)});
    }
    std::vector<int> member_group(num_cascade_seqs);
    for (int g = 0; g < num_groups; ++g)
        for (int c = cascade_start[g]; c < cascade_start[g + 1]; ++c) member_group[c] = g;

#pragma omp parallel
    {
        RowState st;
        st.reserve(kRowsPerTile, D, BS);
        if (paired) st.reserve_tiles(kRowsPerTile, D, BS);
        std::vector<int64_t> tokens(kRowsPerTile);
        std::vector<int> heads(kRowsPerTile), pos(kRowsPerTile);
#pragma omp for schedule(dynamic, 1) nowait
        for (size_t i = 0; i < shared_items.size(); ++i) {
            const WorkItem w = shared_items[i];
            int rows = 0;
            for (int c = w.t0; c < w.t1; ++c)
                for (int j = 0; j < G; ++j, ++rows) {
                    tokens[rows] = query_start[c];
                    heads[rows] = w.kvh * G + j;
                    pos[rows] = seq_lens[c] - 1;
                }
            load_queries(p, rows, tokens.data(), heads.data(), st);
            std::fill(st.m.begin(), st.m.begin() + rows, kNegLarge);
            std::fill(st.l.begin(), st.l.begin() + rows, 0.f);
            std::fill(st.acc.begin(), st.acc.begin() + static_cast<int64_t>(rows) * D, 0.f);
            const int first = cascade_start[w.seq];
            attend(p, w.kvh, first, 0, cascade_blocks[w.seq], rows, pos.data(), seq_lens[first], st);
            for (int r = 0; r < rows; ++r) {
                const int64_t at = static_cast<int64_t>(w.t0 + r / G) * H + heads[r];
                sc_m[at] = st.m[r];
                sc_l[at] = st.l[r];
                std::memcpy(sc_acc + at * D, st.acc.data() + static_cast<int64_t>(r) * D, sizeof(float) * D);
            }
        }
#pragma omp barrier
#pragma omp for schedule(dynamic, 1)
        for (size_t i = 0; i < items.size(); ++i) {
            const WorkItem w = items[i];
            const int nq = query_start[w.seq + 1] - query_start[w.seq];
            const int kv_len = seq_lens[w.seq];
            int rows = 0;
            for (int t = w.t0; t < w.t1; ++t)
                for (int j = 0; j < G; ++j, ++rows) {
                    tokens[rows] = query_start[w.seq] + t;
                    heads[rows] = w.kvh * G + j;
                    pos[rows] = kv_len - nq + t;
                }
            load_queries(p, rows, tokens.data(), heads.data(), st);
            int b0 = 0;
            if (w.seq < num_cascade_seqs) {
                b0 = cascade_blocks[member_group[w.seq]];
                for (int r = 0; r < rows; ++r) {
                    const int64_t at = static_cast<int64_t>(w.seq) * H + heads[r];
                    st.m[r] = sc_m[at];
                    st.l[r] = sc_l[at];
                    std::memcpy(st.acc.data() + static_cast<int64_t>(r) * D, sc_acc + at * D, sizeof(float) * D);
                }
            } else {
                std::fill(st.m.begin(), st.m.begin() + rows, kNegLarge);
                std::fill(st.l.begin(), st.l.begin() + rows, 0.f);
                std::fill(st.acc.begin(), st.acc.begin() + static_cast<int64_t>(rows) * D, 0.f);
            }
            const int last_pos = kv_len - nq + w.t1 - 1;
            attend(p, w.kvh, w.seq, b0, last_pos / BS + 1, rows, pos.data(), kv_len, st);
            store_rows(p, rows, tokens.data(), heads.data(), st);
        }
    }
}

}  // extern "C"
