// slmkit quantized matmul for x86 CPUs with AVX512-VNNI: y[M, N] = x[M, K] @ W[N, K]^T.
//
// W is in slmkit's tiled layout (src/slmkit/quant/format.py): 16 rows x 4 codes per 64 bytes,
// int4 packing two such chunks per 64 bytes as low / high nibbles; per (tile, group) 16 scales
// (float16 or float32) and optional 16 mins.  x is quantized per group to int8 (scale = absmax /
// 127, round half to even) exactly as qmatmul_reference does, and every group's dot product is an
// exact int32 sum from vpdpbusd (unsigned codes x signed activations), then
//     y += (isum - zero * xsum) * (scale * dx);  y += min * (dx * xsum)     (group by group, in order)
// One loop serves decode (M = 1: several row tiles at once for independent accumulator chains)
// and prefill (M blocks of 4 that reuse each unpacked weight chunk, M chunks sized for L2).
// Threads: OpenMP (torch's own libgomp when loaded from torch), split over row tiles.
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

extern "C" int slm_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl");
}

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {  // round to nearest even, as torch does
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

// One activation row -> int8 codes (kp, zero padded), per-group scale and code sum.
static void quant_row(const void* x, int x_bf16, int64_t K, int64_t KP, int64_t G, int8_t* q, float* d,
                      int32_t* s) {
    float buf[256];
    for (int64_t g0 = 0; g0 < KP; g0 += G) {
        int64_t n = K - g0 < G ? (K - g0 > 0 ? K - g0 : 0) : G;
        for (int64_t i = 0; i < G; ++i) {
            float v = 0.f;
            if (i < n) v = x_bf16 ? bf16_to_f32(((const uint16_t*)x)[g0 + i]) : ((const float*)x)[g0 + i];
            buf[i] = v;
        }
        __m512 amax = _mm512_setzero_ps();
        for (int64_t i = 0; i < G; i += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_loadu_ps(buf + i)));
        float am = _mm512_reduce_max_ps(amax);
        float dd = am / 127.f;
        float id = dd > 0.f ? 1.f / dd : 0.f;
        __m512 vid = _mm512_set1_ps(id);
        __m512i sum = _mm512_setzero_si512();
        for (int64_t i = 0; i < G; i += 16) {
            __m512 r = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_loadu_ps(buf + i), vid),
                                            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            __m512i qi = _mm512_cvtps_epi32(r);
            sum = _mm512_add_epi32(sum, qi);
            _mm_storeu_si128((__m128i*)(q + g0 + i), _mm512_cvtsepi32_epi8(qi));
        }
        d[g0 / G] = dd;
        s[g0 / G] = _mm512_reduce_add_epi32(sum);
    }
}

static inline __m512i bcast4(const int8_t* p) {
    int32_t a;
    memcpy(&a, p, 4);
    return _mm512_set1_epi32(a);
}

template <bool F16>
static inline __m512 load16(const void* p, int64_t i) {
    if (F16) return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)((const uint16_t*)p + i)));
    return _mm512_loadu_ps((const float*)p + i);
}

// T row tiles x MB activation rows, all groups of K.
template <int BITS, bool F16, bool MINS, int T, int MB>
static void micro(const uint8_t* qw, const void* sc, const void* mn, int64_t t0, int64_t ng, int64_t G,
                  const int8_t* xq, int64_t KP, const float* dx, const int32_t* xs, int zero, float* out,
                  int64_t ldo) {
    const int64_t tile_bytes = BITS == 4 ? KP * 8 : KP * 16;
    const int64_t step = BITS == 4 ? 8 : 4;  // k per 64-byte load
    const __m512i low = _mm512_set1_epi8(0x0F);
    __m512 acc[T][MB];
    for (int t = 0; t < T; ++t)
        for (int m = 0; m < MB; ++m) acc[t][m] = _mm512_setzero_ps();
    for (int64_t g = 0; g < ng; ++g) {
        __m512i is[T][MB], is2[T][MB];
        for (int t = 0; t < T; ++t)
            for (int m = 0; m < MB; ++m) is[t][m] = is2[t][m] = _mm512_setzero_si512();
        const int64_t c0 = g * G / step, c1 = (g + 1) * G / step;
        for (int64_t c = c0; c < c1; ++c) {
            const int64_t k0 = c * step;
            for (int t = 0; t < T; ++t) {
                const uint8_t* p = qw + (t0 + t) * tile_bytes + c * 64;
                __m512i v = _mm512_loadu_si512((const void*)p);
                if (BITS == 4) {
                    __m512i lo = _mm512_and_si512(v, low);
                    __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
                    for (int m = 0; m < MB; ++m) {  // activation broadcasts fold into the dpbusd operand
                        is[t][m] = _mm512_dpbusd_epi32(is[t][m], lo, bcast4(xq + m * KP + k0));
                        is2[t][m] = _mm512_dpbusd_epi32(is2[t][m], hi, bcast4(xq + m * KP + k0 + 4));
                    }
                } else {
                    for (int m = 0; m < MB; ++m) {
                        if (c & 1) is2[t][m] = _mm512_dpbusd_epi32(is2[t][m], v, bcast4(xq + m * KP + k0));
                        else is[t][m] = _mm512_dpbusd_epi32(is[t][m], v, bcast4(xq + m * KP + k0));
                    }
                }
            }
        }
        for (int t = 0; t < T; ++t) {
            const int64_t si = ((t0 + t) * ng + g) * 16;
            __m512 s = load16<F16>(sc, si);
            __m512 mv = MINS ? load16<F16>(mn, si) : _mm512_setzero_ps();
            for (int m = 0; m < MB; ++m) {
                __m512i i = _mm512_add_epi32(is[t][m], is2[t][m]);
                const float d = dx[m * ng + g];
                const int32_t qs = xs[m * ng + g];
                if (zero) i = _mm512_sub_epi32(i, _mm512_set1_epi32(zero * qs));
                // separate multiply and add (no FMA, -ffp-contract=off): the PyTorch fallback
                // performs exactly these roundings in this order, so the two agree bit for bit
                acc[t][m] = _mm512_add_ps(acc[t][m],
                                          _mm512_mul_ps(_mm512_cvtepi32_ps(i), _mm512_mul_ps(s, _mm512_set1_ps(d))));
                if (MINS) acc[t][m] = _mm512_add_ps(acc[t][m], _mm512_mul_ps(mv, _mm512_set1_ps(d * (float)qs)));
            }
        }
    }
    for (int t = 0; t < T; ++t)
        for (int m = 0; m < MB; ++m) _mm512_storeu_ps(out + m * ldo + t * 16, acc[t][m]);
}

typedef void (*micro_fn)(const uint8_t*, const void*, const void*, int64_t, int64_t, int64_t, const int8_t*,
                         int64_t, const float*, const int32_t*, int, float*, int64_t);

template <int BITS, bool F16, bool MINS>
static micro_fn pick(int T, int MB) {
    if (T == 4) return micro<BITS, F16, MINS, 4, 1>;
    if (T == 2) {
        switch (MB) {
            case 1: return micro<BITS, F16, MINS, 2, 1>;
            case 2: return micro<BITS, F16, MINS, 2, 2>;
            case 3: return micro<BITS, F16, MINS, 2, 3>;
            default: return micro<BITS, F16, MINS, 2, 4>;
        }
    }
    switch (MB) {
        case 1: return micro<BITS, F16, MINS, 1, 1>;
        case 2: return micro<BITS, F16, MINS, 1, 2>;
        case 3: return micro<BITS, F16, MINS, 1, 3>;
        case 4: return micro<BITS, F16, MINS, 1, 4>;
        case 5: return micro<BITS, F16, MINS, 1, 5>;
        case 6: return micro<BITS, F16, MINS, 1, 6>;
        case 7: return micro<BITS, F16, MINS, 1, 7>;
        default: return micro<BITS, F16, MINS, 1, 8>;
    }
}

static micro_fn pick_all(int bits, int f16, int mins, int T, int MB) {
    if (bits == 4) {
        if (f16) return mins ? pick<4, true, true>(T, MB) : pick<4, true, false>(T, MB);
        return mins ? pick<4, false, true>(T, MB) : pick<4, false, false>(T, MB);
    }
    if (f16) return mins ? pick<8, true, true>(T, MB) : pick<8, true, false>(T, MB);
    return mins ? pick<8, false, true>(T, MB) : pick<8, false, false>(T, MB);
}

// x: [M, K] (row stride ldx elements) float32 or bf16.  out: [M, N] (row stride ldo) float32 or bf16.
// Returns 0, or a negative code for bad arguments (the Python side checks them first).
extern "C" int slm_qgemm(const void* x, int x_bf16, int64_t M, int64_t K, int64_t ldx, const uint8_t* qw,
                         const void* scales, const void* mins, int scale_f16, int bits, int64_t tiles, int64_t KP,
                         int64_t G, int zero, int64_t N, void* out, int out_bf16, int64_t ldo, int nthreads) {
    if (G <= 0 || G > 256 || G % 16 || KP % G || K > KP || N > tiles * 16 || (bits != 4 && bits != 8)) return -1;
    const int64_t ng = KP / G;
    int8_t* xq = (int8_t*)aligned_alloc(64, (size_t)((M * KP + 63) / 64 * 64));
    float* dx = (float*)malloc(sizeof(float) * M * ng);
    int32_t* xs = (int32_t*)malloc(sizeof(int32_t) * M * ng);
    if (!xq || !dx || !xs) {
        free(xq); free(dx); free(xs);
        return -2;
    }
    const size_t xe = x_bf16 ? 2 : 4;
    for (int64_t m = 0; m < M; ++m)
        quant_row((const char*)x + m * ldx * xe, x_bf16, K, KP, G, xq + m * KP, dx + m * ng, xs + m * ng);

    // M chunks whose int8 activations stay in L2 while every row tile streams past them.
    int64_t mc = (256 << 10) / KP;
    // decode: 4 row tiles at once (independent chains); a few rows: 2 tiles x 4; prefill: 1 tile x 8
    const int T = M == 1 ? 4 : (M < 8 ? 2 : 1);
    const int MBX = T == 1 ? 8 : 4;
    mc = mc < MBX ? MBX : mc / MBX * MBX;
    const int64_t blocks = (tiles + T - 1) / T;
    if (nthreads < 1) nthreads = 1;
#pragma omp parallel num_threads(nthreads)
    {
        float tmp[8 * 64];
#pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks; ++b) {
            const int64_t t0 = b * T;
            const int tt = (int)(tiles - t0 < T ? tiles - t0 : T);
            for (int64_t m0c = 0; m0c < M; m0c += mc) {
                const int64_t m1c = m0c + mc < M ? m0c + mc : M;
                for (int64_t m0 = m0c; m0 < m1c; m0 += MBX) {
                    const int mb = (int)(m1c - m0 < MBX ? m1c - m0 : MBX);
                    for (int64_t ts = 0; ts < tt;) {
                        // a short block at the end of N goes one tile at a time
                        const int tcur = (tt == T) ? T : 1;
                        micro_fn f = pick_all(bits, scale_f16, mins != nullptr, tcur, mb);
                        f(qw, scales, mins, t0 + ts, ng, G, xq + m0 * KP, KP, dx + m0 * ng, xs + m0 * ng, zero,
                          tmp, 64);
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
    }
    free(xq);
    free(dx);
    free(xs);
    return 0;
}
