// slmkit quantized matmul for x86 CPUs with AVX512-VNNI: y[M, N] = x[M, K] @ W[N, K]^T.
//
// W is in slmkit's tiled layout (src/slmkit/quant/format.py): 16 rows x 4 codes per 64 bytes,
// int4 packing two such chunks per 64 bytes as low / high nibbles, 6 and 5 bits as such nibbles plus
// a vector of the codes' top bits per 16 / 32 k; per (tile, group) 16 scales
// (float16 or float32) and optional 16 mins.  x is quantized per group to int8 (scale = absmax /
// 127, round half to even) exactly as qmatmul_reference does, and every group's dot product is an
// exact int32 sum from vpdpbusd (unsigned codes x signed activations), then
//     y += (isum - zero * xsum) * (scale * dx);  y += min * (dx * xsum)     (group by group, in order)
// Two-level scales (the K-quants': a small integer per group times a float per super-block of <= 256
// inputs) stay in integers as long as they can, as llama.cpp's K-quant dot products do: x is
// quantized per super-block, and per super-block
//     I = sum_g sub_scale_g * (isum_g - zero * xsum_g);  Imin = sum_g sub_min_g * xsum_g   (exact int32)
//     y += I * (super_scale * dx);  y += Imin * (super_min * dx)
// One loop serves decode (M = 1: several row tiles at once for independent accumulator chains)
// and prefill (M blocks of 4 that reuse each unpacked weight chunk, M chunks sized for L2).
// Threads: OpenMP (torch's own libgomp when loaded from torch), split over row tiles.
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>

#include "bf16.h"
#include "layout.h"

extern "C" int slm_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl");
}


// One activation row -> int8 codes (kp, zero padded), a scale per AG inputs (absmax / 127) and a code
// sum per G inputs (AG a multiple of G: the weight's group, or its super-block for two-level scales).
// With E > 0 (two-level scales) a group may take a finer scale: the block's over 2^e, e <= E the
// largest with the group's absmax x 2^e <= the block's. Its codes are then round(x * (2^e / scale)),
// its code sum is stored times 2^(E - e), sh[group] = E - e, and d is the block's scale / 2^E: a
// group's integer sums shifted left by sh all share d (exact), and small groups keep their precision.
static void quant_row(const void* x, int x_bf16, int64_t K, int64_t KP, int64_t AG, int64_t G, int E, int8_t* q,
                      float* d, int32_t* s, int32_t* sh) {
    float buf[256], gmax[16];
    for (int64_t g0 = 0; g0 < KP; g0 += AG) {
        int64_t n = K - g0 < AG ? (K - g0 > 0 ? K - g0 : 0) : AG;
        for (int64_t i = 0; i < AG; ++i) {
            float v = 0.f;
            if (i < n) v = x_bf16 ? bf16_to_f32(((const uint16_t*)x)[g0 + i]) : ((const float*)x)[g0 + i];
            buf[i] = v;
        }
        float am = 0.f;
        for (int64_t j = 0; j < AG / G; ++j) {
            __m512 amax = _mm512_setzero_ps();
            for (int64_t i = j * G; i < (j + 1) * G; i += 16)
                amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_loadu_ps(buf + i)));
            gmax[j] = _mm512_reduce_max_ps(amax);
            am = gmax[j] > am ? gmax[j] : am;
        }
        const float dd = am / 127.f;
        const float id = dd > 0.f ? 1.f / dd : 0.f;
        d[g0 / AG] = dd * (1.f / (float)(1 << E));
        for (int64_t j = 0; j < AG / G; ++j) {
            const int e = group_exp(gmax[j], am, E);
            const __m512 vid = _mm512_set1_ps(id * (float)(1 << e));
            __m512i sum = _mm512_setzero_si512();
            for (int64_t i = j * G; i < (j + 1) * G; i += 16) {
                __m512 r = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_loadu_ps(buf + i), vid),
                                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                __m512i qi = _mm512_cvtps_epi32(r);
                sum = _mm512_add_epi32(sum, qi);
                _mm_storeu_si128((__m128i*)(q + g0 + i), _mm512_cvtsepi32_epi8(qi));
            }
            s[g0 / G + j] = _mm512_reduce_add_epi32(sum) * (1 << (E - e));
            if (sh) sh[g0 / G + j] = E - e;
        }
    }
}

static inline __m512i bcast4(const int8_t* p) {
    int32_t a;
    memcpy(&a, p, 4);
    return _mm512_set1_epi32(a);
}

// Scale kinds: 0 float32, 1 float16, 2 uint8 x super-scale, 3 int8 x super-scale (the K-quants' two
// levels: a float32 or float16 (layout.h SUPER_F16) per super-block of <= 256 inputs times a small
// integer per group; see super_end). A group's 16 float scales (kinds 0, 1):
template <int SK>
static inline __m512 load16(const void* p, int64_t i) {
    if (SK == 1) return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)((const uint16_t*)p + i)));
    return _mm512_loadu_ps((const float*)p + i);
}


// The top bits of set i (at bit (BITS - 4) * i of each byte) moved to bit 4 (16-bit shifts: what
// crosses a byte border lands outside the mask applied next).
template <int BITS>
static inline __m512i shift_to4(__m512i t, int i) {
    const int sh = 4 - (BITS - 4) * i;
    return sh >= 0 ? _mm512_slli_epi16(t, (unsigned)sh) : _mm512_srli_epi16(t, (unsigned)-sh);
}

struct QW {
    const uint8_t* qw;
    const void* sc;
    const void* mn;
    const void* ssc;  // super-scales / super-mins [tiles, groups / sbg, 16] for kinds 2, 3
    const void* smn;
    bool ssh;  // ... in float16 (SUPER_F16), else float32
    int64_t ng, G, KP, sbg;
    int zero;
    int64_t qt0;  // the row tile qw starts at (0, or a block's first tile in an unpacked copy)
};

// Two-level scales keep their float sums in the output block (updated once per super-block) where
// registers would not hold them beside the int32 ones: with more than 8 (tile, row) pairs.
template <int T, int MB>
constexpr bool mem_acc() { return T * MB > 8; }

// 16 super-scales (or super-mins) from element i, float16 or float32: load16's two float kinds.
static inline __m512 super16(const void* p, int64_t i, bool f16) { return f16 ? load16<1>(p, i) : load16<0>(p, i); }

// A group's integer sub-scales of 16 rows (kind 2 uint8, 3 int8) as int32.
template <int SK>
static inline __m512i sub16(const void* p, int64_t i) {
    const __m128i b = _mm_loadu_si128((const __m128i*)((const uint8_t*)p + i));
    return (SK & 3) == 3 ? _mm512_cvtepi8_epi32(b) : _mm512_cvtepu8_epi32(b);
}


// The end of a super-block (groups g0 .. g0 + sbg - 1) under two-level scales, per tile and row:
//     y += (float)ib * (super_scale * dx);  y += (float)(sum_g min_g * xsum_g) * (super_min * dx)
// with dx the activations' scale over the super-block; ib is zeroed.
// With xp (pair_sums: every code sum fits int16) the mins go two groups a vpdpwssd.
template <int SK, bool MINS, int T, int MB>
static inline void super_end(const QW& w, int64_t t0, int64_t g0, int64_t b, const float* dx, const int32_t* xs,
                             const int32_t* xp, __m512i (&ib)[T][MB], __m512 (&acc)[T][MB], float* out, int64_t ldo) {
    constexpr bool MEM_ACC = mem_acc<T, MB>();
    constexpr int RS = record_stride(SK);
    const int64_t ng = w.ng, nsb = ng / w.sbg, g1 = g0 + w.sbg;
    for (int t = 0; t < T; ++t) {
        const int64_t ssi = ((t0 + t) * nsb + b) * RS;
        const __m512 ss = super16(w.ssc, ssi, w.ssh);
        __m512i mi[MB];
        if (MINS) {
            for (int m = 0; m < MB; ++m) mi[m] = _mm512_setzero_si512();
            const uint8_t* mp = (const uint8_t*)w.mn + (t0 + t) * ng * RS;
            for (int64_t g = g0; xp && g < g1; g += 2) {  // int16 lanes 2r, 2r + 1: row r's mins of g, g + 1
                const __m128i a = _mm_loadu_si128((const __m128i*)(mp + g * RS));
                const __m128i c = g + 1 < g1 ? _mm_loadu_si128((const __m128i*)(mp + (g + 1) * RS)) : _mm_setzero_si128();
                const __m512i mn = _mm512_cvtepu8_epi16(_mm256_set_m128i(_mm_unpackhi_epi8(a, c), _mm_unpacklo_epi8(a, c)));
                for (int m = 0; m < MB; ++m) mi[m] = _mm512_dpwssd_epi32(mi[m], mn, _mm512_set1_epi32(xp[m * ng + g]));
            }
            for (int64_t g = g0; !xp && g < g1; ++g) {
                const __m512i mn = sub16<2>(mp, g * RS);
                for (int m = 0; m < MB; ++m)
                    mi[m] = _mm512_add_epi32(mi[m], _mm512_mullo_epi32(mn, _mm512_set1_epi32(xs[m * ng + g])));
            }
        }
        for (int m = 0; m < MB; ++m) {
            const __m512 d = _mm512_set1_ps(dx[m * ng + b]);  // dx rows keep ng entries
            __m512 a = MEM_ACC ? _mm512_loadu_ps(out + m * ldo + t * 16) : acc[t][m];
            a = _mm512_add_ps(a, _mm512_mul_ps(_mm512_cvtepi32_ps(ib[t][m]), _mm512_mul_ps(ss, d)));
            if (MINS)
                a = _mm512_add_ps(a, _mm512_mul_ps(_mm512_cvtepi32_ps(mi[m]),
                                                   _mm512_mul_ps(super16(w.smn, ssi, w.ssh), d)));
            if (MEM_ACC) _mm512_storeu_ps(out + m * ldo + t * 16, a);
            else acc[t][m] = a;
            ib[t][m] = _mm512_setzero_si512();
        }
    }
}

constexpr int DECODE_PREFETCH = 4096;

// T row tiles x MB activation rows, all groups of K.
template <int BITS, int SK, bool MINS, int T, int MB>
static void micro(const QW& w, int64_t t0, const int8_t* xq, const float* dx, const int32_t* xs,
                  const int32_t* xsh, const int32_t* xp, const int32_t* xz, float* out, int64_t ldo) {
    const uint8_t* qw = w.qw;
    const int64_t ng = w.ng, G = w.G, KP = w.KP;
    constexpr int step = run_k(BITS), vpr = run_vectors(BITS);
    constexpr bool MEM_ACC = mem_acc<T, MB>();
    const int64_t tile_bytes = tile_code_bytes(BITS, KP);
    const __m512i low = _mm512_set1_epi8(0x0F);
    const __m512i top_mask = _mm512_set1_epi8(BITS == 6 ? 0x30 : 0x10);  // the top bits' place in a code
    constexpr bool SUPER = (SK & 3) >= 2;
    __m512 acc[T][MB];
    __m512i ib[T][MB];  // two-level scales: the super-block's sum of sub-scale x group sum, exact in int32
    for (int t = 0; t < T; ++t)
        for (int m = 0; m < MB; ++m) {
            acc[t][m] = _mm512_setzero_ps();
            ib[t][m] = _mm512_setzero_si512();
            if (SUPER && MEM_ACC) _mm512_storeu_ps(out + m * ldo + t * 16, acc[t][m]);
        }
    int64_t gs = 0, sb = 0;  // two-level scales: groups into the super-block, its index
    for (int64_t g = 0; g < ng; ++g) {
        __m512i is[T][MB], is2[T][MB];  // two-level scales with a zero point: from -zero x the codes' sum (xz)
        for (int t = 0; t < T; ++t)
            for (int m = 0; m < MB; ++m) {
                is[t][m] = SUPER && xz ? _mm512_set1_epi32(xz[m * ng + g]) : _mm512_setzero_si512();
                is2[t][m] = _mm512_setzero_si512();
            }
        const int64_t c0 = g * G / step, c1 = (g + 1) * G / step;
        for (int64_t c = c0; c < c1; ++c) {
            const int64_t k0 = c * step;
            for (int t = 0; t < T; ++t) {
                const uint8_t* p = qw + (t0 + t - w.qt0) * tile_bytes + c * vpr * 64;
                if constexpr (T == 1 && MB == 1)  // decode: see slm_qgemm
                    for (int j = 0; j < vpr; ++j) _mm_prefetch((const char*)p + j * 64 + DECODE_PREFETCH, _MM_HINT_T0);
                __m512i v = _mm512_loadu_si512((const void*)p);
                if (BITS == 5 || BITS == 6) {  // nibble vectors, then the top bits of all their sets
                    const __m512i top = _mm512_loadu_si512((const void*)(p + (vpr - 1) * 64));
#pragma GCC unroll 4
                    for (int u = 0; u < vpr - 1; ++u) {
                        const __m512i x = u ? _mm512_loadu_si512((const void*)(p + u * 64)) : v;
                        // code = nibble | (top bits of set i, moved to bit 4): (A | (B & C)) = ternlog 0xF8
                        const __m512i a = _mm512_ternarylogic_epi32(_mm512_and_si512(x, low),
                                                                    shift_to4<BITS>(top, 2 * u), top_mask, 0xF8);
                        const __m512i b = _mm512_ternarylogic_epi32(
                            _mm512_and_si512(_mm512_srli_epi16(x, 4), low), shift_to4<BITS>(top, 2 * u + 1), top_mask,
                            0xF8);
                        for (int m = 0; m < MB; ++m) {  // one accumulator per row, as int4: no spills
                            is[t][m] = _mm512_dpbusd_epi32(is[t][m], a, bcast4(xq + m * KP + k0 + 8 * u));
                            is[t][m] = _mm512_dpbusd_epi32(is[t][m], b, bcast4(xq + m * KP + k0 + 8 * u + 4));
                        }
                    }
                } else if (BITS == 4) {
                    __m512i lo = _mm512_and_si512(v, low);
                    __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
                    for (int m = 0; m < MB; ++m) {  // one accumulator per row: fewer registers, no spills
                        is[t][m] = _mm512_dpbusd_epi32(is[t][m], lo, bcast4(xq + m * KP + k0));
                        is[t][m] = _mm512_dpbusd_epi32(is[t][m], hi, bcast4(xq + m * KP + k0 + 4));
                    }
                } else {
                    for (int m = 0; m < MB; ++m) {
                        if (MB == 1 && (c & 1)) is2[t][m] = _mm512_dpbusd_epi32(is2[t][m], v, bcast4(xq + m * KP + k0));
                        else is[t][m] = _mm512_dpbusd_epi32(is[t][m], v, bcast4(xq + m * KP + k0));
                    }
                }
            }
        }
        if constexpr (SUPER) {  // the group's integer sums times its integer sub-scales, summed per super-block
            for (int t = 0; t < T; ++t) {
                const __m512i sc = sub16<SK>(w.sc, ((t0 + t) * ng + g) * record_stride(SK));
                for (int m = 0; m < MB; ++m) {
                    const __m512i i = _mm512_sllv_epi32(_mm512_add_epi32(is[t][m], is2[t][m]),
                                                        _mm512_set1_epi32(xsh[m * ng + g]));  // see quant_row
                    ib[t][m] = _mm512_add_epi32(ib[t][m], _mm512_mullo_epi32(i, sc));
                }
            }
            if (++gs == w.sbg) {  // a counter: no division per group
                super_end<SK, MINS, T, MB>(w, t0, g + 1 - w.sbg, sb++, dx, xs, xp, ib, acc, out, ldo);
                gs = 0;
            }
        } else {
          for (int t = 0; t < T; ++t) {
            const int64_t si = ((t0 + t) * ng + g) * 16;
            __m512 s = load16<SK>(w.sc, si);
            __m512 mv = MINS ? load16<SK>(w.mn, si) : _mm512_setzero_ps();
            for (int m = 0; m < MB; ++m) {
                __m512i i = _mm512_add_epi32(is[t][m], is2[t][m]);
                const float d = dx[m * ng + g];
                const int32_t qs = xs[m * ng + g];
                if (w.zero) i = _mm512_sub_epi32(i, _mm512_set1_epi32(w.zero * qs));
                // separate multiply and add (no FMA, -ffp-contract=off): the PyTorch fallback
                // performs exactly these roundings in this order, so the two agree bit for bit
                acc[t][m] = _mm512_add_ps(acc[t][m],
                                          _mm512_mul_ps(_mm512_cvtepi32_ps(i), _mm512_mul_ps(s, _mm512_set1_ps(d))));
                if (MINS) acc[t][m] = _mm512_add_ps(acc[t][m], _mm512_mul_ps(mv, _mm512_set1_ps(d * (float)qs)));
            }
          }
        }
    }
    if (SUPER && MEM_ACC) return;
    for (int t = 0; t < T; ++t)
        for (int m = 0; m < MB; ++m) _mm512_storeu_ps(out + m * ldo + t * 16, acc[t][m]);
}

typedef void (*micro_fn)(const QW&, int64_t, const int8_t*, const float*, const int32_t*, const int32_t*,
                         const int32_t*, const int32_t*, float*, int64_t);

// From this many activation rows 6 / 5-bit codes are unpacked per block of tiles (measured on Phi-3
// shapes, Zen 4, one thread: at 8 rows Q5_K 193 vs 154 GOP/s in registers, at 128 rows 228 vs 153,
// Q6_K 227 vs 190; at 3-4 rows in registers wins).
constexpr int UNPACK_ROWS = 8;

// 6 / 5-bit codes of nt row tiles -> the 8-bit layout (each code vector in order: set i of run c is
// 8-bit vector c * sets + i), for prefill: unpacked once per block of tiles instead of once per 4
// activation rows, then run by the 8-bit loop, which forms the same integer sums (the same bits).
template <int BITS>
static void unpack_tiles(const uint8_t* src, int64_t nt, int64_t KP, uint8_t* dst) {
    constexpr int step = run_k(BITS), vpr = run_vectors(BITS);
    const __m512i low = _mm512_set1_epi8(0x0F);
    const __m512i top_mask = _mm512_set1_epi8(BITS == 6 ? 0x30 : 0x10);
    const int64_t runs = nt * (KP / step);
    for (int64_t r = 0; r < runs; ++r) {
        const uint8_t* p = src + r * vpr * 64;
        uint8_t* o = dst + r * (step / 4) * 64;
        const __m512i top = _mm512_loadu_si512((const void*)(p + (vpr - 1) * 64));
#pragma GCC unroll 4
        for (int u = 0; u < vpr - 1; ++u) {
            const __m512i x = _mm512_loadu_si512((const void*)(p + u * 64));
            _mm512_storeu_si512((void*)(o + 128 * u), _mm512_ternarylogic_epi32(_mm512_and_si512(x, low),
                                                                             shift_to4<BITS>(top, 2 * u), top_mask, 0xF8));
            _mm512_storeu_si512((void*)(o + 128 * u + 64),
                                _mm512_ternarylogic_epi32(_mm512_and_si512(_mm512_srli_epi16(x, 4), low),
                                                          shift_to4<BITS>(top, 2 * u + 1), top_mask, 0xF8));
        }
    }
}

template <int BITS, int SK, bool MINS>
static micro_fn pick(int T, int MB) {
    if (T == 4) return MB == 1 ? micro<BITS, SK, MINS, 4, 1> : micro<BITS, SK, MINS, 4, 2>;
    if (T == 3) {
        switch (MB) {
            case 1: return micro<BITS, SK, MINS, 3, 1>;
            case 2: return micro<BITS, SK, MINS, 3, 2>;
            case 3: return micro<BITS, SK, MINS, 3, 3>;
            default: return micro<BITS, SK, MINS, 3, 4>;
        }
    }
    switch (MB) {  // the last tiles of N, one at a time
        case 1: return micro<BITS, SK, MINS, 1, 1>;
        case 2: return micro<BITS, SK, MINS, 1, 2>;
        case 3: return micro<BITS, SK, MINS, 1, 3>;
        default: return micro<BITS, SK, MINS, 1, 4>;
    }
}

template <int BITS, int SK>
static micro_fn pick_mins(int mins, int T, int MB) {
    return mins ? pick<BITS, SK, true>(T, MB) : pick<BITS, SK, false>(T, MB);
}

template <int BITS>
static micro_fn pick_kind(int kind, int mins, int T, int MB) {
    switch (kind) {
        case 0: return pick_mins<BITS, 0>(mins, T, MB);
        case 1: return pick_mins<BITS, 1>(mins, T, MB);
        case 2: return pick_mins<BITS, 2>(mins, T, MB);
        case 3: return pick_mins<BITS, 3>(mins, T, MB);
        case 6: return pick<BITS, 6, true>(T, MB);  // paired: always with mins
        default: return pick<BITS, 7, true>(T, MB);
    }
}

static micro_fn pick_all(int bits, int kind, int mins, int T, int MB) {
    switch (bits) {
        case 4: return pick_kind<4>(kind, mins, T, MB);
        case 5: return pick_kind<5>(kind, mins, T, MB);
        case 6: return pick_kind<6>(kind, mins, T, MB);
        default: return pick_kind<8>(kind, mins, T, MB);
    }
}

// x: [M, K] (row stride ldx elements) float32 or bf16.  out: [M, N] (row stride ldo) float32 or bf16.
// Returns 0, or a negative code for bad arguments (the Python side checks them first).
extern "C" int slm_qgemm(const void* x, int x_bf16, int64_t M, int64_t K, int64_t ldx, const uint8_t* qw,
                         const void* scales, const void* mins, int scale_kind, const void* super_scales,
                         const void* super_mins, int64_t sbg, int bits, int64_t tiles, int64_t KP, int64_t G,
                         int zero, int64_t N, void* out, int out_bf16, int64_t ldo, int nthreads) {
    if (G <= 0 || G > 256 || G % 16 || KP % G || K > KP || N > tiles * 16) return -1;
    if ((bits != 4 && bits != 5 && bits != 6 && bits != 8) || (bits == 5 && G % 32)) return -1;
    if (check_scales(scale_kind, scales, mins, super_scales, super_mins, sbg, KP, G)) return -1;
    const bool ssh = scale_kind & SUPER_F16;
    scale_kind &= ~SUPER_F16;
    const int64_t ng = KP / G;
    const int64_t AG = scale_kind >= 2 ? G * sbg : G;  // inputs per activation scale
    const QW w = {qw, scales, mins, super_scales, super_mins, ssh, ng, G, KP, sbg, zero, 0};
    int8_t* xq = (int8_t*)aligned_alloc(64, (size_t)((M * KP + 63) / 64 * 64));
    float* dx = (float*)malloc(sizeof(float) * M * ng);
    int32_t* xs = (int32_t*)malloc(sizeof(int32_t) * M * ng);
    const int E = scale_kind >= 2 ? act_shift_max(bits) : 0;
    const bool pairs = scale_kind >= 2 && mins && sums_fit_int16(G, E);  // mins two groups a vpdpwssd (super_end)
    int32_t* xsh = (int32_t*)malloc(sizeof(int32_t) * M * ng);
    int32_t* xp = pairs ? (int32_t*)malloc(sizeof(int32_t) * M * ng) : nullptr;
    const bool zinit = zero && scale_kind >= 2;  // two-level scales: the zero point where each group's sum starts
    int32_t* xz = zinit ? (int32_t*)malloc(sizeof(int32_t) * M * ng) : nullptr;
    if (!xq || !dx || !xs || !xsh || (pairs && !xp) || (zinit && !xz)) {
        free(xq); free(dx); free(xs); free(xsh); free(xp); free(xz);
        return -2;
    }
    const size_t xe = x_bf16 ? 2 : 4;
    // a row of x quantized (quant_row), its code sums paired (pair_sums) and, for two-level scales with a
    // zero point (Q6_K), -zero x each group's unshifted code sum: where the group's integer sum starts
    // (micro), so (sum << shift) is the sum minus zero x xs, as the reference subtracts it (Phi-3 shapes,
    // one thread: Q6_K 131 -> 146 GMAC/s at 128 rows; a subtraction per group and row before)
    auto prep_row = [&](int64_t m) {
        quant_row((const char*)x + m * ldx * xe, x_bf16, K, KP, AG, G, E, xq + m * KP, dx + m * ng, xs + m * ng,
                  xsh + m * ng);
        if (xp) pair_sums(xs + m * ng, ng, sbg, xp + m * ng);
        for (int64_t i = m * ng; xz && i < (m + 1) * ng; ++i) xz[i] = -zero * (xs[i] >> xsh[i]);
    };
    // a few rows here, more by the threads below (layout.h PAR_PREP_ROWS)
    const bool par_prep = M >= PAR_PREP_ROWS && nthreads > 1;
    for (int64_t m = 0; !par_prep && m < M; ++m) prep_row(m);

    // M chunks whose int8 activations stay in L2 while every row tile streams past them.
    int64_t mc = (256 << 10) / KP;
    // decode: one row tile at a time, its codes prefetched DECODE_PREFETCH bytes ahead (Phi-3-mini's
    // Q4_K_M layers from memory, Zen 4: 5-7% more tok/s than 4 tiles at once, whose more streams a
    // thread walks the prefetch only slowed; 8-bit codes excepted: one tile's two vpdpbusd chains
    // lost 8%); 2 rows: 4 tiles x 2; more: 3 tiles x 4 rows (3x4 beat 1x8 by 20-30% from 8 to 64
    // rows, 2x4 by 7-10%; 24 accumulators, no spills)
    const int T = M == 1 && bits != 8 ? 1 : M <= 2 ? 4 : 3;
    const int MBX = M <= 2 ? 2 : 4;
    mc = mc < MBX ? MBX : mc / MBX * MBX;
    const int64_t blocks = (tiles + T - 1) / T;
    // 6 / 5-bit codes with many rows: unpack each block of tiles to bytes once (see unpack_tiles)
    const int unpack = (bits == 5 || bits == 6) && M >= UNPACK_ROWS;
    const int run_bits = unpack ? 8 : bits;
    const int64_t src_tile_bytes = tile_code_bytes(bits, KP);
    if (nthreads < 1) nthreads = 1;
    int err = 0;
    BlockQueue queue(M);  // prefill's blocks shared between threads (see SHARED_BLOCK_ROWS)
#pragma omp parallel num_threads(nthreads)
    {
        float tmp[8 * 64];
        uint8_t* buf = unpack ? (uint8_t*)aligned_alloc(64, (size_t)(T * 16 * KP)) : nullptr;
        if (unpack && !buf) {
#pragma omp atomic write
            err = -2;
        }
        if (par_prep) {
#pragma omp for schedule(static)
            for (int64_t m = 0; m < M; ++m) prep_row(m);
        }
        for (BlockCursor c(queue, blocks); c.more(); c.next()) {
            const int64_t t0 = c.b * T;
            const int tt = (int)(tiles - t0 < T ? tiles - t0 : T);
            QW wb = w;
            if (unpack) {
                if (!buf) continue;
                if (bits == 6) unpack_tiles<6>(qw + t0 * src_tile_bytes, tt, KP, buf);
                else unpack_tiles<5>(qw + t0 * src_tile_bytes, tt, KP, buf);
                wb.qw = buf;
                wb.qt0 = t0;
            }
            for (int64_t m0c = 0; m0c < M; m0c += mc) {
                const int64_t m1c = m0c + mc < M ? m0c + mc : M;
                for (int64_t m0 = m0c; m0 < m1c; m0 += MBX) {
                    const int mb = (int)(m1c - m0 < MBX ? m1c - m0 : MBX);
                    for (int64_t ts = 0; ts < tt;) {
                        // a short block at the end of N goes one tile at a time
                        const int tcur = (tt == T) ? T : 1;
                        micro_fn f = pick_all(run_bits, scale_kind, mins != nullptr, tcur, mb);
                        f(wb, t0 + ts, xq + m0 * KP, dx + m0 * ng, xs + m0 * ng, xsh + m0 * ng,
                          xp ? xp + m0 * ng : nullptr, xz ? xz + m0 * ng : nullptr, tmp, 64);
                        for (int m = 0; m < mb; ++m) {
                            const int64_t r0 = (t0 + ts) * 16;
                            int64_t nr = N - r0 < tcur * 16 ? N - r0 : tcur * 16;
                            if (nr <= 0) continue;
                            if (out_bf16) {
                                uint16_t* o = (uint16_t*)out + (m0 + m) * ldo + r0;
                                for (int64_t r = 0; r < nr; ++r) o[r] = f32_to_bf16(tmp[m * 64 + r]);
                            } else {
                                memcpy((float*)out + (m0 + m) * ldo + r0, tmp + m * 64, sizeof(float) * nr);
                            }
                        }
                        ts += tcur;
                    }
                }
            }
        }
        free(buf);
    }
    free(xq);
    free(dx);
    free(xs);
    free(xsh);
    free(xp);
    free(xz);
    return err;
}
