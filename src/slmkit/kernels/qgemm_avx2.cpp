// slmkit quantized matmul and attention for x86 CPUs with AVX2 + FMA + F16C (no AVX512): the same
// arithmetic as qgemm.cpp, lane for lane, so both give the same bits (see avx2.h).
//
// Every group's dot product is an exact int32 sum, as with vpdpbusd in qgemm.cpp: with AVX-VNNI its
// 256-bit form (this file compiled a second time with -mavxvnni -DSLM_VNNI, used where the CPU has
// avx_vnni); without it vpmaddubsw (4-, 5- and 6-bit codes as they are, their int16 pair sums added
// a few at a time; int8 codes as |u - 128| times the activation with u - 128's sign: nothing
// saturates), widened by vpmaddwd. Then the same float32 steps in the same order as qgemm.cpp:
//     y += (isum - zero * xsum) * (scale * dx);  y += min * (dx * xsum)
// and, for two-level scales, qgemm.cpp's integer sums per super-block (without VNNI, the sub-scale
// enters in the vpmaddwd that widens the pair sums: scale_pairs).
//
// Blocking (measured on Zen 4 forced to this path, benchmarks/avx2.py): decode walks one 16-row tile at
// a time, its codes prefetched ahead; prefill unpacks each tile once (one byte a code,
// qgemm_avx2_codes.h unpack_tile) and runs it against 3 activation rows at a time (4 with VNNI: UMB).
// Never executes an AVX512 instruction (compiled without -mavx512*).
#include <omp.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <math.h>

#include "avx2.h"
#include "layout.h"
#include "qgemm_avx2_codes.h"
#include "qgemm_avx2_scales.h"

#ifdef SLM_VNNI
#define QGEMM_NAME slm_avx2_qgemm_vnni
#else
#define QGEMM_NAME slm_avx2_qgemm_plain
#endif

// One activation row -> int8 codes (kp, zero padded), a scale per AG inputs, a code sum per G inputs,
// and with E > 0 a finer scale for small groups (as qgemm.cpp's quant_row, which says how).
static void quant_row(const void* x, int x_bf16, int64_t K, int64_t KP, int64_t AG, int64_t G, int E, int8_t* q,
                      float* d, int32_t* s, int32_t* sh) {
    float buf[256], gmax[16];
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    for (int64_t g0 = 0; g0 < KP; g0 += AG) {
        int64_t n = K - g0 < AG ? (K - g0 > 0 ? K - g0 : 0) : AG;
        for (int64_t i = 0; i < AG; ++i) {
            float v = 0.f;
            if (i < n) v = x_bf16 ? bf16_to_f32(((const uint16_t*)x)[g0 + i]) : ((const float*)x)[g0 + i];
            buf[i] = v;
        }
        float am = 0.f;
        for (int64_t j = 0; j < AG / G; ++j) {
            V16 amax = v_zero();
            for (int64_t i = j * G; i < (j + 1) * G; i += 16) {
                const V16 b = v_load(buf + i);
                amax = v_max(amax, V16{_mm256_and_ps(b.a, absmask), _mm256_and_ps(b.b, absmask)});
            }
            gmax[j] = v_hmax(amax);
            am = gmax[j] > am ? gmax[j] : am;
        }
        const float dd = am / 127.f;
        const float id = dd > 0.f ? 1.f / dd : 0.f;
        d[g0 / AG] = dd * (1.f / (float)(1 << E));
        for (int64_t j = 0; j < AG / G; ++j) {
            const int e = group_exp(gmax[j], am, E);
            const __m256 vid = _mm256_set1_ps(id * (float)(1 << e));
            __m256i sum = _mm256_setzero_si256();
            for (int64_t i = j * G; i < (j + 1) * G; i += 8) {
                __m256 r = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(buf + i), vid),
                                           _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                __m256i qi = _mm256_cvtps_epi32(r);
                sum = _mm256_add_epi32(sum, qi);
                __m128i w16 = _mm_packs_epi32(_mm256_castsi256_si128(qi), _mm256_extracti128_si256(qi, 1));
                _mm_storel_epi64((__m128i*)(q + g0 + i), _mm_packs_epi16(w16, w16));  // signed saturation
            }
            __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
            s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
            s[g0 / G + j] = (_mm_cvtsi128_si32(s4) + _mm_extract_epi32(s4, 1)) * (1 << (E - e));
            if (sh) sh[g0 / G + j] = E - e;
        }
    }
}

struct QW {
    const uint8_t* qw;
    const void* sc;
    const void* mn;
    const void* ssc;
    const void* smn;
    bool ssh;  // super-scales / super-mins in float16 (layout.h SUPER_F16), else float32
    int64_t ng, G, KP, sbg;
    int zero;
};

// 8 super-scales (or super-mins) from element i, float16 or float32: load8's two float kinds.
static inline __m256 super8(const void* p, int64_t i, bool f16) { return f16 ? load8<1>(p, i) : load8<0>(p, i); }

// Two-level scales at a super-block's end (qgemm.cpp super_end): out += ib x (super-scale x dx), and
// with mins out += (sum over its groups of min x code sum) x (super-min x dx); ib is zeroed.
template <int SK, bool MINS, int H, int MB>
__attribute__((always_inline)) static inline void super_end(const QW& w, const uint8_t* const* mnp, const uint8_t* const* mtp,
                             const void* const* sscp,
                             const void* const* smnp, int64_t g0, int64_t g1, int64_t b, const float* dx,
                             const int32_t* xs, const int32_t* xp, __m256i (&ib)[H][MB], float* out, int64_t ldo) {
    constexpr int RS = record_stride(SK);
    const int64_t ng = w.ng;
    for (int h = 0; h < H; ++h) {
        __m256i mi[MB];
        if (MINS) {
            for (int m = 0; m < MB; ++m) mi[m] = _mm256_setzero_si256();
            if (xp) {  // two groups a vpmaddwd (xp: their code sums packed, pair_sums)
                for (int64_t g = g0; g < g1; g += 2) {
                    const __m256i mn = mtp[h] ? _mm256_load_si256((const __m256i*)(mtp[h] + g * 64))
                                              : min_pairs(mnp[h] + g * RS, g + 1 < g1 ? mnp[h] + (g + 1) * RS : nullptr);
                    for (int m = 0; m < MB; ++m)
                        mi[m] = _mm256_add_epi32(mi[m], _mm256_madd_epi16(mn, _mm256_set1_epi32(xp[m * ng + g])));
                }
            } else {
                for (int64_t g = g0; g < g1; ++g) {
                    const __m256i mn = sub8<2>(mnp[h], g * RS);
                    for (int m = 0; m < MB; ++m)
                        mi[m] = _mm256_add_epi32(mi[m], _mm256_mullo_epi32(mn, _mm256_set1_epi32(xs[m * ng + g])));
                }
            }
        }
        for (int m = 0; m < MB; ++m) {
            const __m256 d = _mm256_set1_ps(dx[m * ng + b]);
            __m256 a = _mm256_loadu_ps(out + m * ldo + h * 8);
            a = _mm256_add_ps(a, _mm256_mul_ps(_mm256_cvtepi32_ps(ib[h][m]), _mm256_mul_ps(super8(sscp[h], b * RS, w.ssh), d)));
            if (MINS)
                a = _mm256_add_ps(a, _mm256_mul_ps(_mm256_cvtepi32_ps(mi[m]), _mm256_mul_ps(super8(smnp[h], b * RS, w.ssh), d)));
            _mm256_storeu_ps(out + m * ldo + h * 8, a);
            ib[h][m] = _mm256_setzero_si256();
        }
    }
}

// A group's end: its integer sums scaled. Two-level scales: added to the super-block's integer sum ib
// (FUSE: the sub-scales are in already, the zero's part is added unless zfold folded it into the pair
// sums); otherwise the float32 steps, into acc.
template <int BITS, int SK, bool MINS, int H, int MB, bool FUSE>
__attribute__((always_inline)) static inline void group_end(const QW& w, int64_t h0, int64_t g, const uint8_t* const* scp,
                                                            const float* dx, const int32_t* xs, const int32_t* xsh,
                                                            bool zfold, const __m256i (&is)[H][MB],
                                                            __m256i (&ib)[H][MB], __m256 (&acc)[H][MB]) {
    constexpr bool SUPER = (SK & 3) >= 2;
    constexpr int RS = record_stride(SK);
    const int64_t ng = w.ng;
    if constexpr (FUSE) {
        if (w.zero && !zfold)  // zfold: in the pair sums already (pair_start)
            for (int h = 0; h < H; ++h) {
                const __m256i sc = sub8<SK>(scp[h], g * RS);
                for (int m = 0; m < MB; ++m)
                    ib[h][m] = _mm256_add_epi32(ib[h][m], _mm256_mullo_epi32(sc, _mm256_set1_epi32(-w.zero * xs[m * ng + g])));
            }
    } else if constexpr (SUPER) {
        for (int h = 0; h < H; ++h) {
            const __m256i sc = sub8<SK>(scp[h], g * RS);
            for (int m = 0; m < MB; ++m) {
                const int32_t qs = xs[m * ng + g];
#ifdef SLM_VNNI
                __m256i i = is[h][m];
#else  // 8-bit codes: the 128 * (unshifted) code sum the sign trick left out
                __m256i i = BITS == 8 ? _mm256_add_epi32(is[h][m], _mm256_set1_epi32(128 * (qs >> xsh[m * ng + g])))
                                      : is[h][m];
#endif
                i = _mm256_sllv_epi32(i, _mm256_set1_epi32(xsh[m * ng + g]));  // see quant_row
                if (w.zero) i = _mm256_sub_epi32(i, _mm256_set1_epi32(w.zero * qs));
                ib[h][m] = _mm256_add_epi32(ib[h][m], _mm256_mullo_epi32(i, sc));
            }
        }
    } else {
        for (int h = 0; h < H; ++h) {
            const int64_t ht = h0 + h, t = ht / 2, off = (ht % 2) * 8;
            const int64_t si = (t * ng + g) * 16 + off;
            __m256 s = load8<SK>(w.sc, si);
            __m256 mv = MINS ? load8<SK>(w.mn, si) : _mm256_setzero_ps();
            for (int m = 0; m < MB; ++m) {
                const float d = dx[m * ng + g];
                const int32_t qs = xs[m * ng + g];
#ifdef SLM_VNNI
                __m256i i = is[h][m];
#else
                __m256i i = BITS == 8 ? _mm256_add_epi32(is[h][m], _mm256_set1_epi32(128 * qs)) : is[h][m];
#endif
                if (w.zero) i = _mm256_sub_epi32(i, _mm256_set1_epi32(w.zero * qs));
                acc[h][m] = _mm256_add_ps(acc[h][m],
                                          _mm256_mul_ps(_mm256_cvtepi32_ps(i), _mm256_mul_ps(s, _mm256_set1_ps(d))));
                if (MINS) acc[h][m] = _mm256_add_ps(acc[h][m], _mm256_mul_ps(mv, _mm256_set1_ps(d * (float)qs)));
            }
        }
    }
}

// H half tiles (8 rows each, h0 the first) x MB activation rows, all groups of K; U: from ub, h0's tile
// unpacked by unpack_tile. ZF: the zero point folded into the pair sums (pair_start; xz: the rows'
// zero_pairs).
template <int BITS, int SK, bool MINS, int H, int MB, bool U, bool ZF>
static void micro(const QW& w, int64_t h0, const int8_t* xq, const float* dx, const int32_t* xs,
                  const int32_t* xsh, const int32_t* xp, const int32_t* xz, float* out, int64_t ldo,
                  const uint8_t* ub) {
    const int64_t ng = w.ng, G = w.G, KP = w.KP;
    constexpr int step = run_k(BITS);
    const int64_t tile_bytes = tile_code_bytes(BITS, KP);
    constexpr bool SUPER = (SK & 3) >= 2;
#ifdef SLM_VNNI
    constexpr bool FUSE = false;
#else  // two-level scales: sub-scales applied in vpmaddwd (scale_pairs), 8-bit codes excepted (sign trick)
    constexpr bool FUSE = SUPER && BITS != 8;
#endif
    constexpr int RS = record_stride(SK);
    __m256 acc[H][MB];
    __m256i ib[H][MB];  // two-level scales: the super-block's integer sum (floats kept in out: registers are few)
    for (int h = 0; h < H; ++h)
        for (int m = 0; m < MB; ++m) {
            acc[h][m] = _mm256_setzero_ps();
            ib[h][m] = _mm256_setzero_si256();
            if (SUPER) _mm256_storeu_ps(out + m * ldo + h * 8, acc[h][m]);
        }
    // half tile h's codes; two-level scales: its sub-scales and mins (bytes, record g at g * RS) and
    // super-scales and super-mins (record b at b * RS)
    const uint8_t *base[H], *scp[H] = {}, *mnp[H] = {}, *stp[H] = {}, *mtp[H] = {};
    const void *sscp[H] = {}, *smnp[H] = {};
    for (int h = 0; h < H; ++h) {
        const int64_t ht = h0 + h, t = ht / 2, off = (ht % 2) * 8;
        base[h] = U ? ub + (ht % 2) * KP * 8 : w.qw + t * tile_bytes + off * 4;
        if (!SUPER) continue;
        if (U) {  // tables (tile_tables)
            stp[h] = scale_table(ub, KP, ht % 2);
            if (MINS && xp) mtp[h] = min_table(ub, KP, ng, ht % 2);
        }
        const int64_t nsb = ng / w.sbg;
        scp[h] = (const uint8_t*)w.sc + t * ng * RS + off;
        sscp[h] = super_at(w.ssc, t * nsb * RS + off, w.ssh);
        if (MINS) {
            mnp[h] = (const uint8_t*)w.mn + t * ng * RS + off;
            smnp[h] = super_at(w.smn, t * nsb * RS + off, w.ssh);
        }
    }
    const __m256i ones = _mm256_set1_epi16(1);
    int64_t gs = 0, sb = 0;  // groups into the super-block, its index
    for (int64_t g = 0; g < ng; ++g) {
        __m256i is[H][MB], mul[H][MB];
        for (int h = 0; h < H; ++h) {
            const __m256i bytes = !FUSE ? ones
                                  : U   ? _mm256_load_si256((const __m256i*)(stp[h] + g * 64))
                                        : scale_bytes(scp[h] + g * RS);
            for (int m = 0; m < MB; ++m) {
                is[h][m] = _mm256_setzero_si256();
                mul[h][m] = FUSE ? scale_pairs<SK>(bytes, xsh[m * ng + g]) : ones;
            }
        }
        __m256i(&sums)[H][MB] = FUSE ? ib : is;
        if constexpr (U) group_codes_u<BITS, H, MB, ZF>(base, g * G / 4, (g + 1) * G / 4, xq, KP, sums, mul, xz);
        else group_codes<BITS, H, MB, ZF>(base, g * G / step, (g + 1) * G / step, xq, KP, sums, mul, xz);
        group_end<BITS, SK, MINS, H, MB, FUSE>(w, h0, g, scp, dx, xs, xsh, ZF, is, ib, acc);
        if (SUPER && ++gs == w.sbg) {  // a super-block's end (a counter: no division per group)
            super_end<SK, MINS, H, MB>(w, mnp, mtp, sscp, smnp, g + 1 - w.sbg, g + 1, sb++, dx, xs, xp, ib, out, ldo);
            gs = 0;
        }
    }
    if (SUPER) return;
    for (int h = 0; h < H; ++h)
        for (int m = 0; m < MB; ++m) _mm256_storeu_ps(out + m * ldo + h * 8, acc[h][m]);
}

// Prefill's activation rows per unpacked tile: with VNNI 4 (the integer sums stay in registers where
// vpdpbusd needs no pair sums; 4 measured ~5% faster than 3 on an AVX-VNNI Xeon), without 3.
#ifdef SLM_VNNI
constexpr int UMB = 4;
#else
constexpr int UMB = 3;
#endif

typedef void (*micro_fn)(const QW&, int64_t, const int8_t*, const float*, const int32_t*, const int32_t*,
                         const int32_t*, const int32_t*, float*, int64_t, const uint8_t*);

// A tile (2 half tiles) x 1 row (decode: one tile a thread keeps its streams few, which measured ~15%
// faster than two) or x 2 rows, on the tile's codes; prefill: x UMB rows on the tile unpacked (U; without
// VNNI the best of 1 x 4, 1 x 6, 2 x 2, 2 x 3 and 2 x 4 measured on Zen 4). The compiler keeps what does
// not fit in 16 registers (the sub-scales of scale_pairs, read once a group; with VNNI some of the
// super-block sums) in memory.
template <int BITS, int SK, bool MINS, bool ZF>
static micro_fn pick_zf(int MB, bool U) {
    if constexpr (BITS != 8)
        if (U) return micro<BITS, SK, MINS, 2, UMB, true, ZF>;
    return MB == 1 ? micro<BITS, SK, MINS, 2, 1, false, ZF> : micro<BITS, SK, MINS, 2, 2, false, ZF>;
}

// zf: the driver folds the zero point in (6-bit codes, two-level scales, no VNNI: zero_folds)
template <int BITS, int SK, bool MINS>
static micro_fn pick(int MB, bool U, bool zf) {
#ifndef SLM_VNNI
    if constexpr (BITS == 6 && (SK & 3) >= 2)
        if (zf) return pick_zf<BITS, SK, MINS, true>(MB, U);
#endif
    (void)zf;
    return pick_zf<BITS, SK, MINS, false>(MB, U);
}

template <int BITS>
static micro_fn pick_kind(int kind, int mins, int MB, bool U, bool zf) {
    if (kind >= 6) return kind == 6 ? pick<BITS, 6, true>(MB, U, zf) : pick<BITS, 7, true>(MB, U, zf);  // paired
    switch (kind * 2 + (mins ? 1 : 0)) {
        case 0: return pick<BITS, 0, false>(MB, U, zf);
        case 1: return pick<BITS, 0, true>(MB, U, zf);
        case 2: return pick<BITS, 1, false>(MB, U, zf);
        case 3: return pick<BITS, 1, true>(MB, U, zf);
        case 4: return pick<BITS, 2, false>(MB, U, zf);
        case 5: return pick<BITS, 2, true>(MB, U, zf);
        case 6: return pick<BITS, 3, false>(MB, U, zf);
        default: return pick<BITS, 3, true>(MB, U, zf);
    }
}

static micro_fn pick_fn(int bits, int kind, int mins, int MB, bool U, bool zf) {
    return bits == 4   ? pick_kind<4>(kind, mins, MB, U, zf)
           : bits == 5 ? pick_kind<5>(kind, mins, MB, U, zf)
           : bits == 6 ? pick_kind<6>(kind, mins, MB, U, zf)
                       : pick_kind<8>(kind, mins, MB, U, zf);
}

static void unpack_fn(int bits, const uint8_t* codes, int64_t KP, uint8_t* ub) {
    if (bits == 4) unpack_tile<4>(codes, KP, ub);
    else if (bits == 5) unpack_tile<5>(codes, KP, ub);
    else unpack_tile<6>(codes, KP, ub);
}

// Rows m0.. (mb of them) of a tile's 16 outputs, from tmp (16 floats a row), to out.
static void store_rows(const float* tmp, int mb, int64_t m0, int64_t r0, int64_t N, void* out, int out_bf16,
                       int64_t ldo) {
    const int64_t nr = N - r0 < 16 ? N - r0 : 16;
    for (int m = 0; m < mb && nr > 0; ++m) {
        if (out_bf16) {
            uint16_t* o = (uint16_t*)out + (m0 + m) * ldo + r0;
            for (int64_t r = 0; r < nr; ++r) o[r] = f32_to_bf16(tmp[m * 16 + r]);
        } else {
            memcpy((float*)out + (m0 + m) * ldo + r0, tmp + m * 16, sizeof(float) * nr);
        }
    }
}

// slm_qgemm's arguments and checks (qgemm.cpp); blocking differs, results do not (each output is
// one lane's fixed sequence of operations).
extern "C" __attribute__((visibility("hidden"))) int QGEMM_NAME(
        const void* x, int x_bf16, int64_t M, int64_t K, int64_t ldx, const uint8_t* qw, const void* scales,
        const void* mins, int scale_kind, const void* super_scales, const void* super_mins, int64_t sbg, int bits,
        int64_t tiles, int64_t KP, int64_t G, int zero, int64_t N, void* out, int out_bf16, int64_t ldo,
        int nthreads) {
    if (G <= 0 || G > 256 || G % 16 || KP % G || K > KP || N > tiles * 16) return -1;
    if ((bits != 4 && bits != 5 && bits != 6 && bits != 8) || (bits == 5 && G % 32)) return -1;
    if (check_scales(scale_kind, scales, mins, super_scales, super_mins, sbg, KP, G)) return -1;
    const bool ssh = scale_kind & SUPER_F16;
    scale_kind &= ~SUPER_F16;
    const int64_t ng = KP / G;
    const int64_t AG = scale_kind >= 2 ? G * sbg : G;  // inputs per activation scale
    const int E = scale_kind >= 2 ? act_shift_max(bits) : 0;
    const QW w = {qw, scales, mins, super_scales, super_mins, ssh, ng, G, KP, sbg, zero};
    const bool pairs = scale_kind >= 2 && mins && sums_fit_int16(G, E);  // mins two groups a vpmaddwd (super_end)
#ifdef SLM_VNNI
    constexpr bool vnni = true;  // the unpacked tile's tables: only the paired mins (micro: FUSE is off)
    const bool zfold = false;
#else  // Q6_K's zero point in the int16 pair sums (pair_start), not a vpmulld per group
    constexpr bool vnni = false;
    const bool zfold = scale_kind >= 2 && zero_folds(bits, zero);
#endif
    int8_t* xq = (int8_t*)aligned_alloc(64, (size_t)((M * KP + 63) / 64 * 64));
    float* dx = (float*)malloc(sizeof(float) * M * ng);
    int32_t* xs = (int32_t*)malloc(sizeof(int32_t) * M * ng);
    int32_t* xsh = (int32_t*)malloc(sizeof(int32_t) * M * ng);
    int32_t* xp = pairs ? (int32_t*)malloc(sizeof(int32_t) * M * ng) : nullptr;
    int32_t* xz = zfold ? (int32_t*)malloc(sizeof(int32_t) * M * (KP / 16)) : nullptr;
    if (!xq || !dx || !xs || !xsh || (pairs && !xp) || (zfold && !xz)) {
        free(xq); free(dx); free(xs); free(xsh); free(xp); free(xz);
        return -2;
    }
    const size_t xe = x_bf16 ? 2 : 4;
    auto prep_row = [&](int64_t m) {  // a row of x quantized, its code sums paired
        quant_row((const char*)x + m * ldx * xe, x_bf16, K, KP, AG, G, E, xq + m * KP, dx + m * ng, xs + m * ng,
                  xsh + m * ng);
        if (xp) pair_sums(xs + m * ng, ng, sbg, xp + m * ng);
        if (xz) zero_pairs(xq + m * KP, KP, zero, xz + m * (KP / 16));
    };
    const bool par_prep = M >= PAR_PREP_ROWS && nthreads > 1;  // a few rows here, more by the threads below
    for (int64_t m = 0; !par_prep && m < M; ++m) prep_row(m);
    const bool unpack = M >= 8 && bits != 8;  // prefill: each tile unpacked once for all rows (4-, 5-, 6-bit codes)
    const int MBX = unpack ? UMB : M == 1 ? 1 : 2;
    int64_t mc = (256 << 10) / KP;
    mc = mc < MBX ? MBX : mc / MBX * MBX;
    const int64_t tile_bytes = tile_code_bytes(bits, KP);
    if (nthreads < 1) nthreads = 1;
    BlockQueue queue(M);  // prefill's blocks shared between threads (see SHARED_BLOCK_ROWS)
#pragma omp parallel num_threads(nthreads)
    {
        float tmp[UMB * 16];
        uint8_t* ub = unpack ? (uint8_t*)aligned_alloc(64, tile_buffer_bytes(KP, ng)) : nullptr;
        if (par_prep) {
#pragma omp for schedule(static)
            for (int64_t m = 0; m < M; ++m) prep_row(m);
        }
        for (BlockCursor c(queue, tiles); c.more(); c.next()) {
            const int64_t t = c.b;
            if (ub) unpack_fn(bits, qw + t * tile_bytes, KP, ub);
            if (ub && scale_kind >= 2 && (!vnni || xp)) {
                const int RS = record_stride(scale_kind);
                tile_tables((const uint8_t*)scales + t * ng * RS, mins ? (const uint8_t*)mins + t * ng * RS : nullptr,
                            ng, sbg, RS, !vnni, xp != nullptr, KP, ub);
            }
            for (int64_t m0c = 0; m0c < M; m0c += mc) {
                const int64_t m1c = m0c + mc < M ? m0c + mc : M;
                for (int64_t m0 = m0c; m0 < m1c; m0 += MBX) {
                    const int mb = (int)(m1c - m0 < MBX ? m1c - m0 : MBX);
                    const int64_t xo = m0 * KP, so = m0 * ng;
                    const int32_t* xps = xp ? xp + so : nullptr;
                    const int32_t* xzs = xz ? xz + m0 * (KP / 16) : nullptr;
                    if (ub && mb == UMB) {
                        pick_fn(bits, scale_kind, mins != nullptr, UMB, true, zfold)(w, 2 * t, xq + xo, dx + so, xs + so,
                                                                            xsh + so, xps, xzs, tmp, 16, ub);
                    } else {  // decode, 8-bit codes, the rows left over, or no memory for ub
                        for (int m = 0; m < mb; m += 2) {
                            const int n2 = mb - m < 2 ? mb - m : 2;
                            micro_fn f = pick_fn(bits, scale_kind, mins != nullptr, n2, false, zfold);
                            f(w, 2 * t, xq + xo + m * KP, dx + so + m * ng, xs + so + m * ng, xsh + so + m * ng,
                              xps ? xps + m * ng : nullptr, xzs ? xzs + m * (KP / 16) : nullptr, tmp + m * 16, 16,
                              nullptr);
                        }
                    }
                    store_rows(tmp, mb, m0, t * 16, N, out, out_bf16, ldo);
                }
            }
        }
        free(ub);
    }
    free(xq);
    free(dx);
    free(xs);
    free(xsh);
    free(xp);
    free(xz);
    return 0;
}

#ifndef SLM_VNNI
// weak: absent where the compiler had no -mavxvnni (qgemm.py then links without that unit)
extern "C" __attribute__((weak)) int slm_avx2_qgemm_vnni(const void*, int, int64_t, int64_t, int64_t, const uint8_t*, const void*,
                                   const void*, int, const void*, const void*, int64_t, int, int64_t, int64_t,
                                   int64_t, int, int64_t, void*, int, int64_t, int);

extern "C" int slm_supported(void) { return avx2_supported(); }

// Whether an environment value is an off word: 0, off, false or no, in any case, spaces around it
// ignored (the words of slmkit/envflags.py, which every other SLMKIT_* switch reads).
static bool env_off(const char* e) {
    if (!e) return false;
    while (*e == ' ' || *e == '\t') ++e;
    size_t n = strlen(e);
    while (n && (e[n - 1] == ' ' || e[n - 1] == '\t' || e[n - 1] == '\n')) --n;
    static const char* const words[] = {"0", "off", "false", "no"};
    for (const char* w : words)
        if (strlen(w) == n && !strncasecmp(e, w, n)) return true;
    return false;
}

// 1 where the CPU has AVX-VNNI (the 256-bit vpdpbusd) and SLMKIT_AVX_VNNI is not an off word (both paths
// give the same bits; the switch lets a test run the other one).
extern "C" int slm_avx_vnni(void) {
    const bool off = env_off(getenv("SLMKIT_AVX_VNNI"));
#ifdef SLM_VNNI_EVEX  // tests only: the VNNI unit runs AVX512-VL's vpdpbusd (see dot4), the test checked the CPU
    return !off;
#else
    __builtin_cpu_init();
    return __builtin_cpu_supports("avxvnni") && !off;
#endif
}

extern "C" int slm_qgemm(const void* x, int x_bf16, int64_t M, int64_t K, int64_t ldx, const uint8_t* qw,
                         const void* scales, const void* mins, int scale_kind, const void* super_scales,
                         const void* super_mins, int64_t sbg, int bits, int64_t tiles, int64_t KP, int64_t G,
                         int zero, int64_t N, void* out, int out_bf16, int64_t ldo, int nthreads) {
    const int vnni = slm_avx_vnni() && slm_avx2_qgemm_vnni != nullptr;  // read each call: tests switch it
    return (vnni ? slm_avx2_qgemm_vnni : slm_avx2_qgemm_plain)(x, x_bf16, M, K, ldx, qw, scales, mins, scale_kind,
                                                               super_scales, super_mins, sbg, bits, tiles, KP, G,
                                                               zero, N, out, out_bf16, ldo, nthreads);
}
#endif
