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
// Dtype codes: 0 float32, 1 bfloat16, 2 int8.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#include <omp.h>

#include "../bfloat16.h"

namespace {

constexpr float kNegLarge = -1e30f;  // instead of -inf: exp(kNegLarge - m) underflows to 0 exactly
constexpr int kRowsPerTile = 64;     // query rows (tokens x grouped heads) one work item carries

using bf16::from_f32;
using bf16::to_f32;

inline float load(const void* p, int64_t i, int dtype) {
    if (dtype == 0) return static_cast<const float*>(p)[i];
    if (dtype == 1) return to_f32(static_cast<const uint16_t*>(p)[i]);
    return static_cast<float>(static_cast<const int8_t*>(p)[i]);
}

// n values from p (dtype) into dst as float32.
inline void to_float(const void* p, int64_t offset, int64_t n, int dtype, float* __restrict dst) {
    if (dtype == 1) {
        const uint16_t* src = static_cast<const uint16_t*>(p) + offset;
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) {
            uint32_t x = static_cast<uint32_t>(src[i]) << 16;
            float f;
            std::memcpy(&f, &x, 4);
            dst[i] = f;
        }
    } else {
        const int8_t* src = static_cast<const int8_t*>(p) + offset;
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
    }
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

// Online-softmax state of `rows` query rows: running max, running sum, unnormalised output.
struct RowState {
    std::vector<float> q, m, l, acc, kbuf, vbuf, s;
    void reserve(int rows, int D, int BS) {
        q.resize(rows * D); m.resize(rows); l.resize(rows); acc.resize(rows * D);
        kbuf.resize(D * BS); vbuf.resize(BS * D); s.resize(rows * BS);
    }
};

// s[r * BS, (r + 1) * BS) = query row r's scores against a block's keys (K transposed: [D, BS]),
// for `rows` rows (q: rows x D). With the block size known, four rows go together: each key load
// serves four rows, and their 4 x BS scores stay in registers as independent FMA chains.
template <int kBS>
inline void score_rows(const float* __restrict q, const float* __restrict K, int D, int bs, int rows,
                       float* __restrict s) {
    int r = 0;
    if constexpr (kBS != 0) {
        for (; r + 4 <= rows; r += 4) {
            float acc[4][kBS] = {};
            const float* __restrict q0 = q + static_cast<int64_t>(r) * D;
            for (int d = 0; d < D; ++d) {
                const float* __restrict kd = K + static_cast<int64_t>(d) * kBS;
#pragma GCC unroll 4
                for (int j = 0; j < 4; ++j) {
                    const float qd = q0[j * D + d];
#pragma omp simd
                    for (int k = 0; k < kBS; ++k) acc[j][k] += qd * kd[k];
                }
            }
            for (int j = 0; j < 4; ++j)
                for (int k = 0; k < kBS; ++k) s[(r + j) * kBS + k] = acc[j][k];
        }
    }
    const int BS = kBS != 0 ? kBS : bs;
    for (; r < rows; ++r) {
        float* __restrict sr = s + static_cast<int64_t>(r) * BS;
        const float* __restrict qr = q + static_cast<int64_t>(r) * D;
#pragma omp simd
        for (int k = 0; k < BS; ++k) sr[k] = 0.f;
        for (int d = 0; d < D; ++d) {
            const float qd = qr[d];
            const float* __restrict kd = K + static_cast<int64_t>(d) * BS;
#pragma omp simd
            for (int k = 0; k < BS; ++k) sr[k] += qd * kd[k];
        }
    }
}

// acc[0, D) = acc * corr + sum over the first `visible` keys of w[k] * V[k].
template <int kD>
inline void accumulate_values(float* __restrict acc_out, float corr, const float* __restrict w,
                              const float* __restrict V, int visible, int d) {
    const int D = kD != 0 ? kD : d;
    if constexpr (kD != 0) {
        float acc[kD];  // registers: the row's output, built over the block's keys
#pragma omp simd
        for (int i = 0; i < kD; ++i) acc[i] = acc_out[i] * corr;
        for (int k = 0; k < visible; ++k) {
            const float wk = w[k];
            const float* __restrict vk = V + static_cast<int64_t>(k) * kD;
#pragma omp simd
            for (int i = 0; i < kD; ++i) acc[i] += wk * vk[i];
        }
#pragma omp simd
        for (int i = 0; i < kD; ++i) acc_out[i] = acc[i];
    } else {
#pragma omp simd
        for (int i = 0; i < D; ++i) acc_out[i] *= corr;
        for (int k = 0; k < visible; ++k) {
            const float wk = w[k];
            const float* __restrict vk = V + static_cast<int64_t>(k) * D;
#pragma omp simd
            for (int i = 0; i < D; ++i) acc_out[i] += wk * vk[i];
        }
    }
}

// Attends `rows` query rows (row r: token tokens[r], head heads[r], position pos[r]) to key
// blocks [b0, b1) of sequence `seq` under its block table, updating st. kBS and kD fix the block
// size and head dim at compile time (0: read them from p): with them known, a block's 16 or 32
// scores stay in registers across the head dim, and a row's output in registers across the keys.
template <int kBS, int kD>
void attend_blocks(const Problem& p, int kvh, int seq, int b0, int b1, int rows, const int* pos,
                   int kv_len, RowState& st) {
    const int D = kD != 0 ? kD : p.D, BS = kBS != 0 ? kBS : p.BS;
    const int64_t block_elems = static_cast<int64_t>(D) * BS;
    const int32_t* table = p.block_tables + static_cast<int64_t>(seq) * p.bt_stride;
    const int elem_bytes = p.kv_dtype == 0 ? 4 : p.kv_dtype == 1 ? 2 : 1;
    const int64_t block_bytes = block_elems * elem_bytes;
    for (int b = b0; b < b1; ++b) {
        const int64_t block = table[b];
        const int64_t base = (static_cast<int64_t>(kvh) * p.NB + block) * block_elems;
        if (b + 1 < b1) {
            // The next block lies anywhere in the pool, where the hardware prefetcher cannot guess
            // it: ask for it now, so that its lines arrive while this block is computed.
            const int64_t next = (static_cast<int64_t>(kvh) * p.NB + table[b + 1]) * block_elems * elem_bytes;
            const char* nk = static_cast<const char*>(p.k_cache) + next;
            const char* nv = static_cast<const char*>(p.v_cache) + next;
            for (int64_t line = 0; line < block_bytes; line += 64) {
                __builtin_prefetch(nk + line);
                __builtin_prefetch(nv + line);
            }
        }
        const float* __restrict K;
        const float* __restrict V;
        if (p.kv_dtype == 0) {
            K = static_cast<const float*>(p.k_cache) + base;
            V = static_cast<const float*>(p.v_cache) + base;
        } else {
            to_float(p.k_cache, base, block_elems, p.kv_dtype, st.kbuf.data());
            to_float(p.v_cache, base, block_elems, p.kv_dtype, st.vbuf.data());
            K = st.kbuf.data();
            V = st.vbuf.data();
        }
        const float* ks = nullptr;
        const float* vs = nullptr;
        if (p.kv_dtype == 2) {
            const int64_t sbase = (static_cast<int64_t>(kvh) * p.NB + block) * BS;
            ks = p.k_scale + sbase;
            vs = p.v_scale + sbase;
        }
        const int key0 = b * BS;
        const int in_block = std::min(BS, kv_len - key0);
        score_rows<kBS>(st.q.data(), K, D, BS, rows, st.s.data());
        for (int r = 0; r < rows; ++r) {
            const int visible = std::min(in_block, pos[r] - key0 + 1);
            if (visible <= 0) continue;
            float* __restrict s = st.s.data() + static_cast<int64_t>(r) * BS;
            if (ks != nullptr) {
#pragma omp simd
                for (int k = 0; k < BS; ++k) s[k] *= ks[k];
            }
            // Keys past `visible` (beyond the sequence, or after this row under the causal mask)
            // get a score whose exp is 0, so the max, exp and sum run over whole blocks.
            for (int k = visible; k < BS; ++k) s[k] = kNegLarge;
            float mx = st.m[r];
#pragma omp simd reduction(max : mx)
            for (int k = 0; k < BS; ++k) mx = std::max(mx, s[k]);
            // Past the first blocks the running max seldom moves: no rescale then (exp(0) is 1).
            const float corr = mx > st.m[r] ? std::exp(st.m[r] - mx) : 1.f;
            float sum = 0.f;
#pragma omp simd reduction(+ : sum)
            for (int k = 0; k < BS; ++k) {
                s[k] = std::exp(s[k] - mx);
                sum += s[k];
            }
            st.l[r] = st.l[r] * corr + sum;
            st.m[r] = mx;
            if (vs != nullptr) {  // int8 values: each key's weight takes its value scale
#pragma omp simd
                for (int k = 0; k < BS; ++k) s[k] *= vs[k];
            }
            float* __restrict acc = st.acc.data() + static_cast<int64_t>(r) * D;
            accumulate_values<kD>(acc, corr, s, V, visible, D);
        }
    }
}

using AttendFn = void (*)(const Problem&, int, int, int, int, int, const int*, int, RowState&);

// The specialised loop for the usual block sizes and head dims, else the general one.
AttendFn pick_attend(int BS, int D) {
    if (BS == 16 && D == 64) return attend_blocks<16, 64>;
    if (BS == 16 && D == 128) return attend_blocks<16, 128>;
    if (BS == 32 && D == 64) return attend_blocks<32, 64>;
    if (BS == 32 && D == 128) return attend_blocks<32, 128>;
    return attend_blocks<0, 0>;
}

void load_queries(const Problem& p, int rows, const int64_t* tokens, const int* heads, RowState& st) {
    for (int r = 0; r < rows; ++r) {
        const int64_t off = tokens[r] * p.q_stride + static_cast<int64_t>(heads[r]) * p.D;
        float* dst = st.q.data() + static_cast<int64_t>(r) * p.D;
        for (int d = 0; d < p.D; ++d) dst[d] = load(p.q, off + d, p.dtype) * p.scale;
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
// to int8 (absmax over D per token and KV head, round half to even, as torch) when kv_dtype is 2.
void write_kv(const void* k, int64_t k_stride, const void* v, int64_t v_stride, int src_dtype, int64_t T,
              const int64_t* slots, void* k_cache, void* v_cache, float* k_scale, float* v_scale,
              int KVH, int64_t NB, int BS, int D, int kv_dtype) {
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
                     int num_groups, float* scratch, void* out, int dtype, int kv_dtype) {
    const Problem p{q, q_stride, k_cache, v_cache, k_scale, v_scale, block_tables, bt_stride, seq_lens,
                    query_start, H, KVH, D, BS, NB, scale, dtype, kv_dtype, out};
    const int G = H / KVH;
    const AttendFn attend = pick_attend(BS, D);
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
