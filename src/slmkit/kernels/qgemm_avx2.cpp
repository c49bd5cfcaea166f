// slmkit quantized matmul and attention for x86 CPUs with AVX2 + FMA + F16C (no AVX512): the same
// arithmetic as qgemm.cpp, lane for lane, so both give the same bits (see avx2.h).
//
// Every group's dot product is an exact int32 sum, as with vpdpbusd in qgemm.cpp: with AVX-VNNI its
// 256-bit form (this file compiled a second time with -mavxvnni -DSLM_VNNI, used where the CPU has
// avx_vnni); without it vpmaddubsw (4-, 5- and 6-bit codes as they are, their int16 pair sums added
// a few at a time; int8 codes as |u - 128| times the activation with u - 128's sign: nothing
// saturates), widened by vpmaddwd. Then the same float32 steps in the same order as qgemm.cpp:
//     y += (isum - zero * xsum) * (scale * dx);  y += min * (dx * xsum)
// and, for two-level scales, qgemm.cpp's integer sums per super-block.
// Never executes an AVX512 instruction (compiled without -mavx512*).
#include <omp.h>
#include <stdlib.h>
#include <math.h>

#include "avx2.h"
#include "layout.h"

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

static inline __m256i bcast4(const int8_t* p) {
    int32_t a;
    memcpy(&a, p, 4);
    return _mm256_set1_epi32(a);
}

// acc + the 4-code dot products of u (unsigned) and s (signed) per 32-bit lane, exact.
static inline __m256i dot4(__m256i acc, __m256i u, __m256i s) {
#ifdef SLM_VNNI
    return _mm256_dpbusd_avx_epi32(acc, u, s);
#else  // the callers keep |pair sums| below 2^15 (no int16 saturation)
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}

// is += the int16 pair sums in p (widened: pairs of them added as int32, exact), p = 0.
static inline void flush16(__m256i& is, __m256i& p) {
    is = _mm256_add_epi32(is, _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
    p = _mm256_setzero_si256();
}

// Scale kinds as in qgemm.cpp: 0 float32, 1 float16, 2 uint8 / 3 int8 x float32 super-scale, +4
// paired. A group's 8 float scales (kinds 0, 1):
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


// The top bits of set i (at bit (BITS - 4) * i of each byte) moved to bit 4 (16-bit shifts: what
// crosses a byte border lands outside the mask applied next).
template <int BITS>
static inline __m256i shift_to4(__m256i t, int i) {
    const int sh = 4 - (BITS - 4) * i;
    return sh >= 0 ? _mm256_slli_epi16(t, sh) : _mm256_srli_epi16(t, -sh);
}

struct QW {
    const uint8_t* qw;
    const void* sc;
    const void* mn;
    const float* ssc;
    const float* smn;
    int64_t ng, G, KP, sbg;
    int zero;
};

// H half tiles (8 rows each, h0 the first) x MB activation rows, all groups of K.
template <int BITS, int SK, bool MINS, int H, int MB>
static void micro(const QW& w, int64_t h0, const int8_t* xq, const float* dx, const int32_t* xs,
                  const int32_t* xsh, float* out, int64_t ldo) {
    const int64_t ng = w.ng, G = w.G, KP = w.KP;
    constexpr int step = run_k(BITS), vpr = run_vectors(BITS);
    const int64_t tile_bytes = tile_code_bytes(BITS, KP);
    const __m256i low = _mm256_set1_epi8(0x0F);
    const __m256i top_mask = _mm256_set1_epi8(BITS == 6 ? 0x30 : 0x10);  // the top bits' place in a code
    constexpr bool SUPER = (SK & 3) >= 2;
    constexpr int RS = record_stride(SK);
    __m256 acc[H][MB];
    __m256i ib[H][MB];  // two-level scales: the super-block's integer sum (floats kept in out: registers are few)
    for (int h = 0; h < H; ++h)
        for (int m = 0; m < MB; ++m) {
            acc[h][m] = _mm256_setzero_ps();
            ib[h][m] = _mm256_setzero_si256();
            if (SUPER) _mm256_storeu_ps(out + m * ldo + h * 8, acc[h][m]);
        }
    const uint8_t* base[H];  // half tile h's codes
    for (int h = 0; h < H; ++h) base[h] = w.qw + ((h0 + h) / 2) * tile_bytes + ((h0 + h) % 2) * 32;
    for (int64_t g = 0; g < ng; ++g) {
        __m256i is[H][MB];
        __m256i p16[H][MB];  // without VNNI: int16 pair sums not yet widened into is
        for (int h = 0; h < H; ++h)
            for (int m = 0; m < MB; ++m) is[h][m] = p16[h][m] = _mm256_setzero_si256();
        const int64_t c0 = g * G / step, c1 = (g + 1) * G / step;
#ifndef SLM_VNNI
        if constexpr (BITS == 4) {  // int16 pair sums of up to 4 chunks (|each| <= 2 * 15 * 127), then widened
            for (int64_t cb = c0; cb < c1; cb += 4) {
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
                    for (int m = 0; m < MB; ++m) flush16(is[h][m], p[h][m]);
            }
        } else
#endif
        for (int64_t c = c0; c < c1; ++c) {
            const int64_t k0 = c * step;
            for (int h = 0; h < H; ++h) {
                const uint8_t* p = base[h] + c * vpr * 64;
                __m256i v = _mm256_loadu_si256((const __m256i*)p);
                if (BITS == 5 || BITS == 6) {  // nibble vectors, then the top bits of all their sets;
                    // codes < 64: vpmaddubsw's pair sums stay below int16's limit (2 * 63 * 127)
                    const __m256i top = _mm256_loadu_si256((const __m256i*)(p + (vpr - 1) * 64));
#pragma GCC unroll 4
                    for (int u = 0; u < vpr - 1; ++u) {
                        const __m256i x = u ? _mm256_loadu_si256((const __m256i*)(p + u * 64)) : v;
                        const __m256i a = _mm256_or_si256(_mm256_and_si256(x, low),
                                                          _mm256_and_si256(shift_to4<BITS>(top, 2 * u), top_mask));
                        const __m256i b = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(x, 4), low),
                                                          _mm256_and_si256(shift_to4<BITS>(top, 2 * u + 1), top_mask));
                        for (int m = 0; m < MB; ++m) {
#ifdef SLM_VNNI
                            is[h][m] = dot4(is[h][m], a, bcast4(xq + m * KP + k0 + 8 * u));
                            is[h][m] = dot4(is[h][m], b, bcast4(xq + m * KP + k0 + 8 * u + 4));
#else  // int16 pair sums: |each| <= 2 * 63 * 127 (6 bits) or 2 * 31 * 127 (5 bits): 2 or 4 fit
                            p16[h][m] = _mm256_add_epi16(p16[h][m],
                                                         _mm256_maddubs_epi16(a, bcast4(xq + m * KP + k0 + 8 * u)));
                            p16[h][m] = _mm256_add_epi16(
                                p16[h][m], _mm256_maddubs_epi16(b, bcast4(xq + m * KP + k0 + 8 * u + 4)));
                            if (BITS == 6 || (u & 1)) flush16(is[h][m], p16[h][m]);
#endif
                        }
                    }
                    continue;
                }
                __m256i lo = _mm256_and_si256(v, low);
                __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
                for (int m = 0; m < MB; ++m) {
                    const __m256i xa = bcast4(xq + m * KP + k0);
                    if (BITS == 4) {  // with VNNI (without: the block above)
                        is[h][m] = dot4(is[h][m], lo, xa);
                        is[h][m] = dot4(is[h][m], hi, bcast4(xq + m * KP + k0 + 4));
                    } else {
#ifdef SLM_VNNI
                        is[h][m] = dot4(is[h][m], v, xa);
#else  // signed codes w = u - 128: |w| x sign(x, w) pair sums <= 2 * 128 * 127 (|x| <= 127), exact;
       // the 128 * sum(x) this leaves out is added back in the epilogue
                        const __m256i ws = _mm256_xor_si256(v, _mm256_set1_epi8((char)0x80));
                        is[h][m] = dot4(is[h][m], _mm256_abs_epi8(ws), _mm256_sign_epi8(xa, ws));
#endif
                    }
                }
            }
        }
        if constexpr (SUPER) {
            for (int h = 0; h < H; ++h) {
                const int64_t ht = h0 + h, t = ht / 2, off = (ht % 2) * 8;
                const __m256i sc = sub8<SK>(w.sc, (t * ng + g) * RS + off);
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
            if ((g + 1) % w.sbg == 0) {  // super-block end (qgemm.cpp super_end)
                const int64_t g0 = g + 1 - w.sbg, nsb = ng / w.sbg, b = g0 / w.sbg;
                for (int h = 0; h < H; ++h) {
                    const int64_t ht = h0 + h, t = ht / 2, off = (ht % 2) * 8;
                    const int64_t ssi = (t * nsb + b) * RS + off;
                    __m256i mi[MB];
                    if (MINS) {
                        for (int m = 0; m < MB; ++m) mi[m] = _mm256_setzero_si256();
                        for (int64_t gg = g0; gg <= g; ++gg) {
                            const __m256i mn = sub8<2>(w.mn, (t * ng + gg) * RS + off);
                            for (int m = 0; m < MB; ++m)
                                mi[m] = _mm256_add_epi32(mi[m], _mm256_mullo_epi32(mn, _mm256_set1_epi32(xs[m * ng + gg])));
                        }
                    }
                    for (int m = 0; m < MB; ++m) {
                        const __m256 d = _mm256_set1_ps(dx[m * ng + b]);
                        __m256 a = _mm256_loadu_ps(out + m * ldo + h * 8);
                        a = _mm256_add_ps(a, _mm256_mul_ps(_mm256_cvtepi32_ps(ib[h][m]),
                                                           _mm256_mul_ps(_mm256_loadu_ps(w.ssc + ssi), d)));
                        if (MINS)
                            a = _mm256_add_ps(a, _mm256_mul_ps(_mm256_cvtepi32_ps(mi[m]),
                                                               _mm256_mul_ps(_mm256_loadu_ps(w.smn + ssi), d)));
                        _mm256_storeu_ps(out + m * ldo + h * 8, a);
                        ib[h][m] = _mm256_setzero_si256();
                    }
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
    if (SUPER) return;
    for (int h = 0; h < H; ++h)
        for (int m = 0; m < MB; ++m) _mm256_storeu_ps(out + m * ldo + h * 8, acc[h][m]);
}

typedef void (*micro_fn)(const QW&, int64_t, const int8_t*, const float*, const int32_t*, const int32_t*, float*,
                         int64_t);

// 4 half tiles x 1 row (decode), 2 x 2 otherwise: 8 float and 8 int accumulators in 16 registers
template <int BITS, int SK, bool MINS>
static micro_fn pick(int H, int MB) {
    if (H == 4) return micro<BITS, SK, MINS, 4, 1>;
    return MB == 1 ? micro<BITS, SK, MINS, 2, 1> : micro<BITS, SK, MINS, 2, 2>;
}

template <int BITS>
static micro_fn pick_kind(int kind, int mins, int H, int MB) {
    if (kind >= 6) return kind == 6 ? pick<BITS, 6, true>(H, MB) : pick<BITS, 7, true>(H, MB);  // paired
    switch (kind * 2 + (mins ? 1 : 0)) {
        case 0: return pick<BITS, 0, false>(H, MB);
        case 1: return pick<BITS, 0, true>(H, MB);
        case 2: return pick<BITS, 1, false>(H, MB);
        case 3: return pick<BITS, 1, true>(H, MB);
        case 4: return pick<BITS, 2, false>(H, MB);
        case 5: return pick<BITS, 2, true>(H, MB);
        case 6: return pick<BITS, 3, false>(H, MB);
        default: return pick<BITS, 3, true>(H, MB);
    }
}

// slm_qgemm's arguments and checks (qgemm.cpp); blocking differs, results do not (each output is
// one lane's fixed sequence of operations).
extern "C" __attribute__((visibility("hidden"))) int QGEMM_NAME(
        const void* x, int x_bf16, int64_t M, int64_t K, int64_t ldx, const uint8_t* qw, const void* scales,
        const void* mins, int scale_kind, const float* super_scales, const float* super_mins, int64_t sbg, int bits,
        int64_t tiles, int64_t KP, int64_t G, int zero, int64_t N, void* out, int out_bf16, int64_t ldo,
        int nthreads) {
    if (G <= 0 || G > 256 || G % 16 || KP % G || K > KP || N > tiles * 16) return -1;
    if ((bits != 4 && bits != 5 && bits != 6 && bits != 8) || (bits == 5 && G % 32)) return -1;
    if (scale_kind < 0 || scale_kind > 7 || scale_kind == 4 || scale_kind == 5) return -1;
    if (scale_kind >= 6 && (!mins || mins != (const uint8_t*)scales + 16 || super_mins != super_scales + 16)) return -1;
    if (scale_kind >= 2 && (sbg <= 0 || (KP / G) % sbg || !super_scales || (mins && !super_mins))) return -1;
    if (scale_kind >= 2 && G * sbg > 256) return -1;
    const int64_t ng = KP / G;
    const int64_t AG = scale_kind >= 2 ? G * sbg : G;  // inputs per activation scale
    const QW w = {qw, scales, mins, super_scales, super_mins, ng, G, KP, sbg, zero};
    int8_t* xq = (int8_t*)aligned_alloc(64, (size_t)((M * KP + 63) / 64 * 64));
    float* dx = (float*)malloc(sizeof(float) * M * ng);
    int32_t* xs = (int32_t*)malloc(sizeof(int32_t) * M * ng);
    int32_t* xsh = (int32_t*)malloc(sizeof(int32_t) * M * ng);
    if (!xq || !dx || !xs || !xsh) {
        free(xq); free(dx); free(xs); free(xsh);
        return -2;
    }
    const size_t xe = x_bf16 ? 2 : 4;
    const int E = scale_kind >= 2 ? act_shift_max(bits) : 0;
    for (int64_t m = 0; m < M; ++m)
        quant_row((const char*)x + m * ldx * xe, x_bf16, K, KP, AG, G, E, xq + m * KP, dx + m * ng, xs + m * ng,
                  xsh + m * ng);
    const int64_t halves = tiles * 2;
    const int H = M == 1 ? 4 : 2, MBX = M == 1 ? 1 : 2;
    int64_t mc = (256 << 10) / KP;
    mc = mc < MBX ? MBX : mc / MBX * MBX;
    const int64_t blocks = (halves + H - 1) / H;
    if (nthreads < 1) nthreads = 1;
#pragma omp parallel num_threads(nthreads)
    {
        float tmp[2 * 32];
#pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks; ++b) {
            const int64_t hb = b * H;
            const int hh = (int)(halves - hb < H ? halves - hb : H);  // halves come in pairs: 2 or 4
            for (int64_t m0c = 0; m0c < M; m0c += mc) {
                const int64_t m1c = m0c + mc < M ? m0c + mc : M;
                for (int64_t m0 = m0c; m0 < m1c; m0 += MBX) {
                    const int mb = (int)(m1c - m0 < MBX ? m1c - m0 : MBX);
                    for (int64_t hs = 0; hs < hh; hs += (hh == H ? H : 2)) {
                        const int hcur = hh == H ? H : 2;
                        micro_fn f = bits == 4   ? pick_kind<4>(scale_kind, mins != nullptr, hcur, mb)
                                     : bits == 5 ? pick_kind<5>(scale_kind, mins != nullptr, hcur, mb)
                                     : bits == 6 ? pick_kind<6>(scale_kind, mins != nullptr, hcur, mb)
                                                 : pick_kind<8>(scale_kind, mins != nullptr, hcur, mb);
                        f(w, hb + hs, xq + m0 * KP, dx + m0 * ng, xs + m0 * ng, xsh + m0 * ng, tmp, 32);
                        for (int m = 0; m < mb; ++m) {
                            const int64_t r0 = (hb + hs) * 8;
                            const int64_t nr = N - r0 < hcur * 8 ? N - r0 : hcur * 8;
                            if (nr <= 0) continue;
                            if (out_bf16) {
                                uint16_t* o = (uint16_t*)out + (m0 + m) * ldo + r0;
                                for (int64_t r = 0; r < nr; ++r) o[r] = f32_to_bf16(tmp[m * 32 + r]);
                            } else {
                                memcpy((float*)out + (m0 + m) * ldo + r0, tmp + m * 32, sizeof(float) * nr);
                            }
                        }
                    }
                }
            }
        }
    }
    free(xq);
    free(dx);
    free(xs);
    free(xsh);
    return 0;
}

#ifndef SLM_VNNI
// weak: absent where the compiler had no -mavxvnni (qgemm.py then links without that unit)
extern "C" __attribute__((weak)) int slm_avx2_qgemm_vnni(const void*, int, int64_t, int64_t, int64_t, const uint8_t*, const void*,
                                   const void*, int, const float*, const float*, int64_t, int, int64_t, int64_t,
                                   int64_t, int, int64_t, void*, int, int64_t, int);

extern "C" int slm_supported(void) { return avx2_supported(); }

// 1 where the CPU has AVX-VNNI (the 256-bit vpdpbusd) and SLMKIT_AVX_VNNI is not 0 (both paths give
// the same bits; the switch lets a test run the other one).
extern "C" int slm_avx_vnni(void) {
    const char* e = getenv("SLMKIT_AVX_VNNI");
    __builtin_cpu_init();
    return __builtin_cpu_supports("avxvnni") && !(e && e[0] == '0');
}

extern "C" int slm_qgemm(const void* x, int x_bf16, int64_t M, int64_t K, int64_t ldx, const uint8_t* qw,
                         const void* scales, const void* mins, int scale_kind, const float* super_scales,
                         const float* super_mins, int64_t sbg, int bits, int64_t tiles, int64_t KP, int64_t G,
                         int zero, int64_t N, void* out, int out_bf16, int64_t ldo, int nthreads) {
    const int vnni = slm_avx_vnni() && slm_avx2_qgemm_vnni != nullptr;  // read each call: tests switch it
    return (vnni ? slm_avx2_qgemm_vnni : slm_avx2_qgemm_plain)(x, x_bf16, M, K, ldx, qw, scales, mins, scale_kind,
                                                               super_scales, super_mins, sbg, bits, tiles, KP, G,
                                                               zero, N, out, out_bf16, ldo, nthreads);
}
#endif
