// qgemm_avx2.cpp's inner loops: a group's exact integer dot products from a tile's codes, and the
// unpacking of a tile for prefill. Included by qgemm_avx2.cpp only, in both of its builds (SLM_VNNI:
// vpdpbusd; otherwise vpmaddubsw's int16 pair sums, widened by vpmaddwd).
#pragma once
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "layout.h"

static inline __m256i bcast4(const int8_t* p) {
    int32_t a;
    memcpy(&a, p, 4);
    return _mm256_set1_epi32(a);
}

// acc + the 4-code dot products of u (unsigned) and s (signed) per 32-bit lane, exact.
static inline __m256i dot4(__m256i acc, __m256i u, __m256i s) {
#if defined(SLM_VNNI) && defined(SLM_VNNI_EVEX)  // tests only: the same instruction in AVX512-VL's encoding,
    return _mm256_dpbusd_epi32(acc, u, s);         // so a CPU with AVX512-VNNI but not AVX-VNNI runs this path
#elif defined(SLM_VNNI)
    return _mm256_dpbusd_avx_epi32(acc, u, s);
#else  // the callers keep |pair sums| below 2^15 (no int16 saturation)
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}

// The top bits of set i (at bit (BITS - 4) * i of each byte) moved to bit 4 (16-bit shifts: what
// crosses a byte border lands outside the mask applied next).
template <int BITS>
static inline __m256i shift_to4(__m256i t, int i) {
    const int sh = 4 - (BITS - 4) * i;
    return sh >= 0 ? _mm256_slli_epi16(t, sh) : _mm256_srli_epi16(t, -sh);
}

// Codes are prefetched this many bytes ahead of their use (a tile's codes are one contiguous run): on
// the AVX2 path, busier per byte than AVX512's, the hardware prefetcher alone left decode ~10% below
// the memory's rate (benchmarks/avx2.py).
constexpr int PF_DIST = 2048;

// ZF (6-bit codes with a zero point of 31 or 32, Q6_K's): the zero point folded into the int16 pair sums,
// which then start at -zero x the activations' pair sums (zero_pairs) and sum (code - zero) x activation,
// so the epilogue has no zero term. |code - zero| <= 32 lets them run over 16 inputs before widening
// (|8 x 32 x 127| < 2^15), as 5-bit codes' do, where plain 6-bit ones widen every 8. Where 16 inputs' sums
// start: 0, or row m's zero_pairs at k (a multiple of 16).
template <bool ZF>
static inline __m256i pair_start(const int32_t* xz, int m, int64_t KP, int64_t k) {
    if (ZF) return _mm256_set1_epi32(xz[(m * KP + k) >> 4]);
    return _mm256_setzero_si256();
}

static inline bool zero_folds(int bits, int zero) { return bits == 6 && (zero == 31 || zero == 32); }

// A row's -zero x activation pair sums per 16 inputs, as the int16 pairs that vpmaddubsw leaves over two
// 6-bit set pairs: inputs 0+1, 4+5, 8+9, 12+13 in the low half, 2+3, 6+7, 10+11, 14+15 in the high.
static inline void zero_pairs(const int8_t* q, int64_t KP, int zero, int32_t* xz) {
    for (int64_t b = 0; b < KP / 16; ++b) {
        int lo = 0, hi = 0;
        for (int j = 0; j < 16; j += 4) {
            lo += q[16 * b + j] + q[16 * b + j + 1];
            hi += q[16 * b + j + 2] + q[16 * b + j + 3];
        }
        xz[b] = (int32_t)((uint32_t)(uint16_t)(-zero * lo) | (uint32_t)(uint16_t)(-zero * hi) << 16);
    }
}

// One group's codes (chunks c0..c1) of H half tiles x MB activation rows: the exact int32 dot
// products added to acc. Without VNNI, int16 pair sums reach acc through vpmaddwd by mul (ones, or
// the sub-scales of scale_pairs: acc then gathers scale x sum).
template <int BITS, int H, int MB, bool ZF>
__attribute__((always_inline)) static inline void group_codes(const uint8_t* const* base, int64_t c0, int64_t c1,
                                                              const int8_t* xq, int64_t KP, __m256i (&acc)[H][MB],
                                                              const __m256i (&mul)[H][MB], const int32_t* xz) {
    constexpr int step = run_k(BITS), vpr = run_vectors(BITS);
    const __m256i low = _mm256_set1_epi8(0x0F);
    const __m256i top_mask = _mm256_set1_epi8(BITS == 6 ? 0x30 : 0x10);  // the top bits' place in a code
#ifdef SLM_VNNI
    (void)mul;  // vpdpbusd sums in int32 directly
    (void)xz;
#else
    if constexpr (BITS == 4) {  // int16 pair sums of up to 4 chunks (|each| <= 2 * 15 * 127), then widened
        for (int64_t cb = c0; cb < c1; cb += 4) {
            for (int h = 0; h < H; h += 2)
                for (int j = 0; j < 4; ++j) _mm_prefetch((const char*)base[h] + (cb + j) * 64 + PF_DIST, _MM_HINT_T0);
            __m256i p[H][MB];
            for (int h = 0; h < H; ++h)
                for (int m = 0; m < MB; ++m) p[h][m] = _mm256_setzero_si256();
#pragma GCC unroll 4
            for (int cc = 0; cc < 4; ++cc) {
                if (cb + cc >= c1) break;  // groups of 16: 2 chunks
                const int64_t k0 = (cb + cc) * step;
                for (int h = 0; h < H; ++h) {
                    const __m256i v = _mm256_loadu_si256((const __m256i*)(base[h] + (cb + cc) * 64));
                    const __m256i lo = _mm256_and_si256(v, low);
                    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
                    for (int m = 0; m < MB; ++m) {
                        p[h][m] = _mm256_add_epi16(p[h][m], _mm256_maddubs_epi16(lo, bcast4(xq + m * KP + k0)));
                        p[h][m] = _mm256_add_epi16(p[h][m], _mm256_maddubs_epi16(hi, bcast4(xq + m * KP + k0 + 4)));
                    }
                }
            }
            for (int h = 0; h < H; ++h)
                for (int m = 0; m < MB; ++m) acc[h][m] = _mm256_add_epi32(acc[h][m], _mm256_madd_epi16(p[h][m], mul[h][m]));
        }
        return;
    }
#endif
    for (int64_t c = c0; c < c1; ++c) {
        const int64_t k0 = c * step;
        for (int h = 0; h < H; h += 2)
            for (int j = 0; j < vpr; ++j) _mm_prefetch((const char*)base[h] + (c * vpr + j) * 64 + PF_DIST, _MM_HINT_T0);
        for (int h = 0; h < H; ++h) {
            const uint8_t* p = base[h] + c * vpr * 64;
            __m256i v = _mm256_loadu_si256((const __m256i*)p);
            if (BITS == 5 || BITS == 6) {  // nibble vectors, then the top bits of all their sets;
                // codes < 64: vpmaddubsw's pair sums stay below int16's limit (2 * 63 * 127)
                const __m256i top = _mm256_loadu_si256((const __m256i*)(p + (vpr - 1) * 64));
#ifndef SLM_VNNI
                __m256i p16[MB];  // int16 pair sums not yet widened into acc
#endif
#pragma GCC unroll 4
                for (int u = 0; u < vpr - 1; ++u) {
#ifndef SLM_VNNI
                    constexpr bool pairs16 = BITS == 5 || ZF;  // pair sums over 16 inputs, not 8
                    if (!pairs16 || !(u & 1))
                        for (int m = 0; m < MB; ++m) p16[m] = pair_start<ZF>(xz, m, KP, k0 + 8 * u);
#endif
                    const __m256i x = u ? _mm256_loadu_si256((const __m256i*)(p + u * 64)) : v;
                    const __m256i a = _mm256_or_si256(_mm256_and_si256(x, low),
                                                      _mm256_and_si256(shift_to4<BITS>(top, 2 * u), top_mask));
                    const __m256i b = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(x, 4), low),
                                                      _mm256_and_si256(shift_to4<BITS>(top, 2 * u + 1), top_mask));
                    for (int m = 0; m < MB; ++m) {
#ifdef SLM_VNNI
                        acc[h][m] = dot4(acc[h][m], a, bcast4(xq + m * KP + k0 + 8 * u));
                        acc[h][m] = dot4(acc[h][m], b, bcast4(xq + m * KP + k0 + 8 * u + 4));
#else  // int16 pair sums: |each| <= 2 * 63 * 127 (6 bits) or 2 * 31 * 127 (5 bits): 2 or 4 fit (ZF: 4)
                        p16[m] = _mm256_add_epi16(p16[m], _mm256_maddubs_epi16(a, bcast4(xq + m * KP + k0 + 8 * u)));
                        p16[m] = _mm256_add_epi16(p16[m], _mm256_maddubs_epi16(b, bcast4(xq + m * KP + k0 + 8 * u + 4)));
                        if (!pairs16 || (u & 1))
                            acc[h][m] = _mm256_add_epi32(acc[h][m], _mm256_madd_epi16(p16[m], mul[h][m]));
#endif
                    }
                }
                continue;
            }
            const __m256i lo = _mm256_and_si256(v, low);
            const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
            for (int m = 0; m < MB; ++m) {
                const __m256i xa = bcast4(xq + m * KP + k0);
                if (BITS == 4) {  // with VNNI (without: the block above)
                    acc[h][m] = dot4(acc[h][m], lo, xa);
                    acc[h][m] = dot4(acc[h][m], hi, bcast4(xq + m * KP + k0 + 4));
                } else {
#ifdef SLM_VNNI
                    acc[h][m] = dot4(acc[h][m], v, xa);
#else  // signed codes w = u - 128: |w| x sign(x, w) pair sums <= 2 * 128 * 127 (|x| <= 127), exact;
       // the 128 * sum(x) this leaves out is added back in the epilogue
                    const __m256i ws = _mm256_xor_si256(v, _mm256_set1_epi8((char)0x80));
                    acc[h][m] = dot4(acc[h][m], _mm256_abs_epi8(ws), _mm256_sign_epi8(xa, ws));
#endif
                }
            }
        }
    }
}

// A tile's codes (16 rows x KP inputs) one byte a code, as group_codes unpacks them in registers: for
// each half tile (8 rows) KP / 4 sets of 32 bytes, set s holding inputs 4s..4s+3 of each row. Prefill
// unpacks a tile once for all its activation rows: unpacking 5- and 6-bit codes costs more than their
// dot products (with this, Q6_K's 3-row rate rose ~30%, Q5_K's ~65%).
template <int BITS>
static void unpack_tile(const uint8_t* codes, int64_t KP, uint8_t* ub) {
    constexpr int step = run_k(BITS), vpr = run_vectors(BITS);
    const __m256i low = _mm256_set1_epi8(0x0F);
    const __m256i top_mask = _mm256_set1_epi8(BITS == 6 ? 0x30 : 0x10);
    for (int64_t c = 0; c < KP / step; ++c)
        for (int hh = 0; hh < 2; ++hh) {
            const uint8_t* p = codes + c * vpr * 64 + hh * 32;
            uint8_t* o = ub + hh * KP * 8 + c * (step / 4) * 32;
            if (BITS == 4) {
                const __m256i v = _mm256_loadu_si256((const __m256i*)p);
                _mm256_store_si256((__m256i*)o, _mm256_and_si256(v, low));
                _mm256_store_si256((__m256i*)(o + 32), _mm256_and_si256(_mm256_srli_epi16(v, 4), low));
                continue;
            }
            const __m256i top = _mm256_loadu_si256((const __m256i*)(p + (vpr - 1) * 64));
            for (int u = 0; u < vpr - 1; ++u) {
                const __m256i x = _mm256_loadu_si256((const __m256i*)(p + u * 64));
                _mm256_store_si256((__m256i*)(o + 64 * u),
                                   _mm256_or_si256(_mm256_and_si256(x, low),
                                                   _mm256_and_si256(shift_to4<BITS>(top, 2 * u), top_mask)));
                _mm256_store_si256((__m256i*)(o + 64 * u + 32),
                                   _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(x, 4), low),
                                                   _mm256_and_si256(shift_to4<BITS>(top, 2 * u + 1), top_mask)));
            }
        }
}

// group_codes on codes unpack_tile unpacked (base[h]: a half tile's sets), sets s0..s1 of one group:
// int16 pair sums of up to F sets (F x 2 x largest code x 127 < 2^15; ZF: F x 2 x 32 x 127), then vpmaddwd by mul.
template <int BITS, int H, int MB, bool ZF>
__attribute__((always_inline)) static inline void group_codes_u(const uint8_t* const* base, int64_t s0, int64_t s1,
                                                                const int8_t* xq, int64_t KP, __m256i (&acc)[H][MB],
                                                                const __m256i (&mul)[H][MB], const int32_t* xz) {
#ifdef SLM_VNNI  // vpdpbusd sums in int32 directly
    (void)mul;
    (void)xz;
#pragma GCC unroll 4
    for (int64_t s = s0; s < s1; ++s)
        for (int h = 0; h < H; ++h) {
            const __m256i v = _mm256_load_si256((const __m256i*)(base[h] + s * 32));
            for (int m = 0; m < MB; ++m) acc[h][m] = dot4(acc[h][m], v, bcast4(xq + m * KP + 4 * s));
        }
    return;
#endif
    constexpr int F = BITS == 4 ? 8 : BITS == 5 || ZF ? 4 : 2;
    for (int64_t sb = s0; sb < s1; sb += F) {
        __m256i p[H][MB];
        for (int h = 0; h < H; ++h)
            for (int m = 0; m < MB; ++m) p[h][m] = pair_start<ZF>(xz, m, KP, 4 * sb);
#pragma GCC unroll 8
        for (int j = 0; j < F; ++j) {
            if (sb + j >= s1) break;
            for (int h = 0; h < H; ++h) {
                const __m256i v = _mm256_load_si256((const __m256i*)(base[h] + (sb + j) * 32));
                for (int m = 0; m < MB; ++m)
                    p[h][m] = _mm256_add_epi16(p[h][m], _mm256_maddubs_epi16(v, bcast4(xq + m * KP + 4 * (sb + j))));
            }
        }
        for (int h = 0; h < H; ++h)
            for (int m = 0; m < MB; ++m) acc[h][m] = _mm256_add_epi32(acc[h][m], _mm256_madd_epi16(p[h][m], mul[h][m]));
    }
}
