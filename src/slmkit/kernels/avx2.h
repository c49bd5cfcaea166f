// Shared helpers of the AVX2 kernels (qgemm_avx2.cpp, fgemm_avx2.cpp): a 16-lane float32 vector as two
// 256-bit halves, so every lane sees the same operations, in the same order, as the AVX512 kernels'
// lanes do; and the exact reduction trees of GCC's _mm512_reduce_{add,max}_ps, so a horizontal sum
// pairs the lanes as the AVX512 kernels' does. Compiled with -mavx2 -mfma -mf16c only (no AVX512).
#pragma once
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"

struct V16 {
    __m256 a, b;  // lanes 0..7, 8..15
};

static inline V16 v_zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
static inline V16 v_set1(float x) { return {_mm256_set1_ps(x), _mm256_set1_ps(x)}; }
static inline V16 v_load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
static inline void v_store(float* p, V16 v) {
    _mm256_storeu_ps(p, v.a);
    _mm256_storeu_ps(p + 8, v.b);
}
static inline V16 v_add(V16 x, V16 y) { return {_mm256_add_ps(x.a, y.a), _mm256_add_ps(x.b, y.b)}; }
static inline V16 v_sub(V16 x, V16 y) { return {_mm256_sub_ps(x.a, y.a), _mm256_sub_ps(x.b, y.b)}; }
static inline V16 v_mul(V16 x, V16 y) { return {_mm256_mul_ps(x.a, y.a), _mm256_mul_ps(x.b, y.b)}; }
static inline V16 v_max(V16 x, V16 y) { return {_mm256_max_ps(x.a, y.a), _mm256_max_ps(x.b, y.b)}; }
// x * y + z with one rounding, as _mm512_fmadd_ps
static inline V16 v_fma(V16 x, V16 y, V16 z) { return {_mm256_fmadd_ps(x.a, y.a, z.a), _mm256_fmadd_ps(x.b, y.b, z.b)}; }

// _mm512_reduce_add_ps's tree: halves, then 128-bit quarters, then lanes (0+2, 1+3), then 0+1.
static inline float v_sum(V16 v) {
    const __m256 t3 = _mm256_add_ps(v.b, v.a);
    const __m128 t6 = _mm_add_ps(_mm256_extractf128_ps(t3, 1), _mm256_castps256_ps128(t3));
    const __m128 t8 = _mm_add_ps(t6, _mm_movehl_ps(t6, t6));
    return _mm_cvtss_f32(_mm_add_ss(t8, _mm_shuffle_ps(t8, t8, 1)));
}

static inline float v_hmax(V16 v) {
    const __m256 t3 = _mm256_max_ps(v.b, v.a);
    const __m128 t6 = _mm_max_ps(_mm256_extractf128_ps(t3, 1), _mm256_castps256_ps128(t3));
    const __m128 t8 = _mm_max_ps(t6, _mm_movehl_ps(t6, t6));
    return _mm_cvtss_f32(_mm_max_ss(t8, _mm_shuffle_ps(t8, t8, 1)));
}

// 8 bfloat16 / float16 -> float32
static inline __m256 bf16x8(__m128i h) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)); }


static inline int avx2_supported() {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
