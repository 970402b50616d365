// bfloat16 <-> float32 for the CPU kernels (attention/cpu_kernels.cpp, layers/cpu_dense_kernels.cpp,
// layers/cpu_linear_kernels.cpp).
#pragma once

#include <cstdint>
#include <cstring>
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

namespace bf16 {

inline float to_f32(uint16_t h) {
    uint32_t x = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &x, 4);
    return f;
}

inline uint16_t from_f32(float f) {  // round to nearest even, as torch's .to(bfloat16)
    uint32_t x;
    std::memcpy(&x, &f, 4);
    if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);  // NaN stays NaN
    x += 0x7fffu + ((x >> 16) & 1u);
    return static_cast<uint16_t>(x >> 16);
}

#if defined(__AVX512BF16__)
// The two bfloat16 values at p in every 32-bit lane: vdpbf16ps's broadcast operand.
inline __m512bh broadcast_pair(const uint16_t* p) {
    int32_t pair;
    std::memcpy(&pair, p, sizeof(pair));
    return (__m512bh)_mm512_set1_epi32(pair);
}
#endif

}  // namespace bf16
