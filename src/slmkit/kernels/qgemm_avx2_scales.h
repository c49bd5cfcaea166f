// qgemm_avx2.cpp's scale vectors: float scales, integer sub-scales as int32 or as the int16 pairs that
// widen pair sums (vpmaddwd), paired mins, and the per-tile tables prefill builds from them. Included by
// qgemm_avx2.cpp only, in both of its builds.
#pragma once
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "layout.h"

// Scale kinds as in qgemm.cpp: 0 float32, 1 float16, 2 uint8 / 3 int8 x super-scale, +4 paired (+ layout.h
// SUPER_F16). A group's 8 float scales (kinds 0, 1):
template <int SK>
static inline __m256 load8(const void* p, int64_t i) {
    if (SK == 1) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)((const uint16_t*)p + i)));
    return _mm256_loadu_ps((const float*)p + i);
}

// A group's integer sub-scales of 8 rows (kind 2 uint8, 3 int8) as int32.
template <int SK>
static inline __m256i sub8(const void* p, int64_t i) {
    const __m128i b = _mm_loadl_epi64((const __m128i*)((const uint8_t*)p + i));
    return (SK & 3) == 3 ? _mm256_cvtepi8_epi32(b) : _mm256_cvtepu8_epi32(b);
}


static inline __m256i bcast8(const uint8_t* p) {
    int64_t a;
    memcpy(&a, p, 8);
    return _mm256_set1_epi64x(a);
}

// A half tile's 8 integer sub-scales of one group as int16 pairs times 2^sh: both int16 halves of
// 32-bit lane r hold scale r << sh, so vpmaddwd of a row's int16 pair sums with it is scale x 2^sh x
// their sum, exact (|pair sums| < 2^15, |scale| x 2^sh <= 255 x 8). scale_bytes puts byte r in the
// high byte of both halves (scale x 256), once for all rows; scale_pairs' shift right by 8 - sh
// (arithmetic for int8 scales), a row's, ends it.
static inline __m256i scale_bytes(const uint8_t* p) {
    return _mm256_shuffle_epi8(bcast8(p), _mm256_setr_epi8(-1, 0, -1, 0, -1, 1, -1, 1, -1, 2, -1, 2, -1, 3, -1, 3,
                                                           -1, 4, -1, 4, -1, 5, -1, 5, -1, 6, -1, 6, -1, 7, -1, 7));
}

template <int SK>
static inline __m256i scale_pairs(__m256i bytes, int sh) {
    const __m128i right = _mm_cvtsi32_si128(8 - sh);
    return (SK & 3) == 3 ? _mm256_sra_epi16(bytes, right) : _mm256_srl_epi16(bytes, right);
}

// Two groups' 8 uint8 mins (a, b) as int16 pairs: lane r = (a_r, b_r), for vpmaddwd with a row's two
// code sums packed the same way (layout.h pair_sums).
static inline __m256i min_pairs(const uint8_t* a, const uint8_t* b) {
    const __m128i b8 = b ? _mm_loadl_epi64((const __m128i*)b) : _mm_setzero_si128();
    return _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(_mm_loadl_epi64((const __m128i*)a), b8));  // a0 b0 a1 b1 ...
}

// Prefill's buffer for one tile: its codes unpacked (unpack_tile, 16 x KP bytes), then with two-level
// scales what every row block would otherwise build again from the scales (tile_tables): each group's
// scale_bytes, then the min_pairs of its super-block's group pairs. Entry (g, half tile hh) of either
// table at (2g + hh) x 32; the min pairs at the pair's first group (even in its super-block).
static inline size_t tile_buffer_bytes(int64_t KP, int64_t ng) { return (size_t)(16 * KP + ng * 128); }
static inline const uint8_t* scale_table(const uint8_t* ub, int64_t KP, int hh) { return ub + 16 * KP + hh * 32; }
static inline const uint8_t* min_table(const uint8_t* ub, int64_t KP, int64_t ng, int hh) {
    return scale_table(ub, KP, hh) + ng * 64;
}

// scales: the scale_bytes table too (the vpmaddwd path's; with VNNI sub-scales enter at each group's end).
static void tile_tables(const uint8_t* sc, const uint8_t* mn, int64_t ng, int64_t sbg, int RS, bool scales, bool pairs,
                        int64_t KP, uint8_t* ub) {
    for (int64_t g = 0; g < ng; ++g)
        for (int hh = 0; hh < 2; ++hh) {
            if (scales)
                _mm256_store_si256((__m256i*)(scale_table(ub, KP, hh) + g * 64), scale_bytes(sc + g * RS + hh * 8));
            if (pairs && (g % sbg) % 2 == 0)
                _mm256_store_si256((__m256i*)(min_table(ub, KP, ng, hh) + g * 64),
                                   min_pairs(mn + g * RS + hh * 8, (g % sbg) + 1 < sbg ? mn + (g + 1) * RS + hh * 8 : nullptr));
        }
}
