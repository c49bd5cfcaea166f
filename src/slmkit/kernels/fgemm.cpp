// slmkit float matmul for x86 CPUs with AVX512: y[M, N] = x[M, K] @ W[N, K]^T (+ b) for float32,
// bfloat16 and float16, with every output computed the same way whatever M is.
//
// Why: BLAS / oneDNN pick their blocking (and, for one row, a different GEMV kernel) from the
// shape, so a row's result depends on how many rows share the call. Greedy decoding then gives
// different tokens for a request alone, batched with others, or prefilled in chunks. Here each
// output is a fixed sequence of float32 operations on its own row of x and of W, rounded once to
// the output dtype at the end: the same instructions on the same values for any M, any tiling of
// rows and outputs, any thread count.
//
// Two weight layouts, each with its own (fixed) order; a linear always uses the same one:
//  - packed (slm_fgemm_packed): tiles of 16 outputs, packed[t][k][r] = W[16 t + r, k], one
//    accumulator per output taking y = fma(w[n, k], x[m, k], y) for k = 0, 1, ... in order, x[m, k]
//    broadcast. bfloat16 on CPUs with AVX512-BF16 takes k in pairs instead, y = dpbf16(y, w[n, k:k+2],
//    x[m, k:k+2]) with packed[t][k / 2][r][2] (both products exact in float32): twice the rate of
//    float32 FMAs, about oneDNN's speed. For a linear's own weight (the copy replaces it) and bf16.
//  - rows (slm_fgemm_rows): W read in place, row-major; per output 16 float32 lanes over K in steps
//    of 16 inputs (lane j takes k = j, 16 + j, ...; 32 and pairs with AVX512-BF16), summed across
//    lanes in a fixed order at the end. No copy: for a float32 / float16 weight another module
//    shares (a tied embedding); slower than packed (about 1.5x for Gemma's head), faster than BLAS.
// Which variant (FMA or pairs) a machine runs is fixed by its CPU (slm_fgemm_pairs), never by M.
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include "layout.h"

enum { F_F32 = 0, F_BF16 = 1, F_F16 = 2 };

#define BF16_TARGET __attribute__((target("avx512bf16,avx512bw,avx512f")))


static inline float from_dt(const void* p, int64_t i, int dt) {
    if (dt == F_F32) return ((const float*)p)[i];
    uint16_t h = ((const uint16_t*)p)[i];
    if (dt == F_F16) return _cvtsh_ss(h);
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t to_dt16(float y, int dt) {
    return dt == F_BF16 ? f32_to_bf16(y) : _cvtss_sh(y, _MM_FROUND_TO_NEAREST_INT);
}

// out[o] = y rounded to dt (+ bias[n], added after the rounding and rounded again in a 16-bit
// dtype: torch's F.linear result plus bias in that dtype).
static inline void put(void* out, int64_t o, float y, const void* bias, int64_t n, int dt) {
    if (dt == F_F32) {
        ((float*)out)[o] = bias ? y + ((const float*)bias)[n] : y;
        return;
    }
    uint16_t h = to_dt16(y, dt);
    if (bias) h = to_dt16(from_dt(&h, 0, dt) + from_dt(bias, n, dt), dt);
    ((uint16_t*)out)[o] = h;
}

// 16 float32 -> bfloat16, round to nearest even (NaN stays NaN), as f32_to_bf16 does one at a time.
static inline __m256i to_bf16x16(__m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff),
                                                           _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    const __m512i h = _mm512_mask_or_epi32(_mm512_srli_epi32(r, 16), nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
    return _mm512_cvtepi32_epi16(h);
}

template <int DT>
static inline __m512 from16x16(__m256i h) {
    return DT == F_F16 ? _mm512_cvtph_ps(h) : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

template <int DT>
static inline __m256i to16x16(__m512 v) {
    return DT == F_F16 ? _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC) : to_bf16x16(v);
}

// out[o + r] = put(y[r], bias[n + r]) for r < nr, 16 at a time (the same roundings as put).
template <int DT>
static void put_run_dt(void* out, int64_t o, const float* y, int64_t nr, const void* bias, int64_t n) {
    int64_t r = 0;
    for (; r + 16 <= nr; r += 16) {
        __m512 v = _mm512_loadu_ps(y + r);
        if (DT == F_F32) {
            if (bias) v = _mm512_add_ps(v, _mm512_loadu_ps((const float*)bias + n + r));
            _mm512_storeu_ps((float*)out + o + r, v);
            continue;
        }
        __m256i h = to16x16<DT>(v);
        if (bias) {
            const __m256i b = _mm256_loadu_si256((const __m256i*)((const uint16_t*)bias + n + r));
            h = to16x16<DT>(_mm512_add_ps(from16x16<DT>(h), from16x16<DT>(b)));
        }
        _mm256_storeu_si256((__m256i*)((uint16_t*)out + o + r), h);
    }
    for (; r < nr; ++r) put(out, o + r, y[r], bias, n + r, DT);
}

static void put_run(void* out, int64_t o, const float* y, int64_t nr, const void* bias, int64_t n, int dt) {
    if (dt == F_F32) put_run_dt<F_F32>(out, o, y, nr, bias, n);
    else if (dt == F_BF16) put_run_dt<F_BF16>(out, o, y, nr, bias, n);
    else put_run_dt<F_F16>(out, o, y, nr, bias, n);
}

// 1 where bfloat16 takes the pair variant (the CPU has AVX512-BF16), else 0.
extern "C" int slm_fgemm_pairs(int dt) {
    __builtin_cpu_init();
    return dt == F_BF16 && __builtin_cpu_supports("avx512bf16");
}

// ------------------------------------------------------------------------------- packed layout
template <int DT>
static inline __m512 wload(const uint8_t* p) {
    if (DT == F_F32) return _mm512_loadu_ps(p);
    __m256i h = _mm256_loadu_si256((const __m256i*)p);
    if (DT == F_F16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// T tiles x MB rows over all of K; x is float32 [MB, K] (row stride K); out: [MB, 16 T] (stride ldo).
template <int DT, int T, int MB>
static void t_micro(const uint8_t* w, int64_t tile_bytes, int64_t K, const void* xv_, float* out, int64_t ldo) {
    const float* x = (const float*)xv_;
    const int64_t es = DT == F_F32 ? 64 : 32;  // bytes of one k's 16 weights
    __m512 acc[T][MB];
    for (int t = 0; t < T; ++t)
        for (int m = 0; m < MB; ++m) acc[t][m] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; ++k) {
        __m512 xv[MB];
        for (int m = 0; m < MB; ++m) xv[m] = _mm512_set1_ps(x[m * K + k]);
        for (int t = 0; t < T; ++t) {
            const __m512 wv = wload<DT>(w + t * tile_bytes + k * es);
            for (int m = 0; m < MB; ++m) acc[t][m] = _mm512_fmadd_ps(wv, xv[m], acc[t][m]);
        }
    }
    for (int t = 0; t < T; ++t)
        for (int m = 0; m < MB; ++m) _mm512_storeu_ps(out + m * ldo + t * 16, acc[t][m]);
}

// The pair variant: w as packed[t][k / 2][r][2], x as bfloat16 pairs [MB, KH] (stride KH); K = KH.
template <int T, int MB>
BF16_TARGET static void t_micro_pairs(const uint8_t* w, int64_t tile_bytes, int64_t KH, const void* xv_, float* out,
                                      int64_t ldo) {
    const uint32_t* x = (const uint32_t*)xv_;
    __m512 acc[T][MB];
    for (int t = 0; t < T; ++t)
        for (int m = 0; m < MB; ++m) acc[t][m] = _mm512_setzero_ps();
    for (int64_t kk = 0; kk < KH; ++kk) {
        __m512bh xv[MB];
        for (int m = 0; m < MB; ++m) xv[m] = (__m512bh)_mm512_set1_epi32((int)x[m * KH + kk]);
        for (int t = 0; t < T; ++t) {
            const __m512bh wv = (__m512bh)_mm512_loadu_si512((const void*)(w + t * tile_bytes + kk * 64));
            for (int m = 0; m < MB; ++m) acc[t][m] = _mm512_dpbf16_ps(acc[t][m], wv, xv[m]);
        }
    }
    for (int t = 0; t < T; ++t)
        for (int m = 0; m < MB; ++m) _mm512_storeu_ps(out + m * ldo + t * 16, acc[t][m]);
}

typedef void (*t_fn)(const uint8_t*, int64_t, int64_t, const void*, float*, int64_t);

template <int T, int MB>
static t_fn t_pick_tm(int dt, int pairs) {
    if (pairs) return t_micro_pairs<T, MB>;
    return dt == F_F32 ? t_micro<F_F32, T, MB> : dt == F_BF16 ? t_micro<F_BF16, T, MB> : t_micro<F_F16, T, MB>;
}

// T x MB: 4 x 1-2 (few rows: independent chains), 3 x 1-4 (24 accumulators at most), 1 x 1-4 (the
// tiles left at the end of N).
static t_fn t_pick(int dt, int pairs, int T, int MB) {
    if (T == 4) return MB == 1 ? t_pick_tm<4, 1>(dt, pairs) : t_pick_tm<4, 2>(dt, pairs);
    switch (MB + (T == 3 ? 0 : 4)) {
        case 1: return t_pick_tm<3, 1>(dt, pairs);
        case 2: return t_pick_tm<3, 2>(dt, pairs);
        case 3: return t_pick_tm<3, 3>(dt, pairs);
        case 4: return t_pick_tm<3, 4>(dt, pairs);
        case 5: return t_pick_tm<1, 1>(dt, pairs);
        case 6: return t_pick_tm<1, 2>(dt, pairs);
        case 7: return t_pick_tm<1, 3>(dt, pairs);
        default: return t_pick_tm<1, 4>(dt, pairs);
    }
}

// x: [M, K] (row stride ldx) and out: [M, N] (row stride ldo) in the weights' dtype dt; w: the
// packed tiles (`tiles` of them); bias: [N] in dt, or NULL. Returns 0, -1 for bad arguments (the
// Python side checks them first), -2 when out of memory.
extern "C" int slm_fgemm_packed(const void* x, int64_t M, int64_t K, int64_t ldx, const uint8_t* w, int dt,
                                int64_t tiles, int64_t N, const void* bias, void* out, int64_t ldo, int nthreads) {
    if (M < 1 || K < 1 || dt < 0 || dt > 2 || N > tiles * 16 || N < 1 || ldx < K || ldo < N) return -1;
    const int pairs = slm_fgemm_pairs(dt);
    const int64_t KH = (K + 1) / 2, KX = pairs ? KH : K;  // the micro kernels' steps
    // float32 activations for the FMA variant; bfloat16 pairs (an odd K zero padded) for pairs
    void* xc = malloc(pairs ? sizeof(uint32_t) * M * KH : sizeof(float) * M * K);
    if (!xc) return -2;
    for (int64_t m = 0; m < M; ++m) {
        if (pairs) {
            uint32_t* xp = (uint32_t*)xc + m * KH;
            xp[KH - 1] = 0;
            memcpy(xp, (const uint16_t*)x + m * ldx, 2 * K);
        } else {
            for (int64_t k = 0; k < K; ++k) ((float*)xc)[m * K + k] = from_dt(x, m * ldx + k, dt);
        }
    }
    const size_t xrow = pairs ? sizeof(uint32_t) * KH : sizeof(float) * K;
    const int64_t tile_bytes = pairs ? KH * 64 : K * (dt == F_F32 ? 64 : 32);
    const int T = M <= 2 ? 4 : 3;
    const int MBX = M <= 2 ? 2 : 4;
    const int64_t blocks = (tiles + T - 1) / T;
    if (nthreads < 1) nthreads = 1;
    BlockQueue queue(M);  // prefill's blocks shared between threads (see SHARED_BLOCK_ROWS)
#pragma omp parallel num_threads(nthreads)
    {
        float tmp[4 * 64];
        for (BlockCursor c(queue, blocks); c.more(); c.next()) {
            const int64_t t0 = c.b * T;
            const int tt = (int)(tiles - t0 < T ? tiles - t0 : T);
            for (int64_t m0 = 0; m0 < M; m0 += MBX) {
                const int mb = (int)(M - m0 < MBX ? M - m0 : MBX);
                for (int ts = 0; ts < tt;) {
                    const int tcur = tt == T ? T : 1;  // a short block at the end of N: one tile at a time
                    t_pick(dt, pairs, tcur, mb)(w + (t0 + ts) * tile_bytes, tile_bytes, KX,
                                                (const char*)xc + m0 * xrow, tmp, 64);
                    const int64_t r0 = (t0 + ts) * 16;
                    const int64_t nr = N - r0 < tcur * 16 ? N - r0 : tcur * 16;
                    for (int m = 0; m < mb; ++m) put_run(out, (m0 + m) * ldo + r0, tmp + m * 64, nr, bias, r0, dt);
                    ts += tcur;
                }
            }
        }
    }
    free(xc);
    return 0;
}

// ------------------------------------------------------------------------------- rows layout
// 16 values from p[k..k+15] as float32 (MASK: lanes past mk are 0).
template <int DT, bool MASK>
static inline __m512 ld16f(const void* p, int64_t k, __mmask16 mk) {
    if (DT == F_F32) return MASK ? _mm512_maskz_loadu_ps(mk, (const float*)p + k) : _mm512_loadu_ps((const float*)p + k);
    __m256i h = MASK ? _mm256_maskz_loadu_epi16(mk, (const uint16_t*)p + k)
                     : _mm256_loadu_si256((const __m256i*)((const uint16_t*)p + k));
    if (DT == F_F16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// One step of 16 inputs for T weight rows x MB activation rows. The masked tail is a separate
// instantiation: with the mask inside the main loop GCC keeps the accumulators on the stack.
template <int DT, int T, int MB, bool MASK>
static inline __attribute__((always_inline)) void r_step(__m512 (&acc)[T][MB], const char* const (&wp)[T],
                                                         const char* const (&xp)[MB], int64_t k, __mmask16 mk) {
    __m512 xv[MB];
    for (int m = 0; m < MB; ++m) xv[m] = ld16f<DT, MASK>(xp[m], k, mk);
    for (int t = 0; t < T; ++t) {
        const __m512 wv = ld16f<DT, MASK>(wp[t], k, mk);
        for (int m = 0; m < MB; ++m) acc[t][m] = _mm512_fmadd_ps(wv, xv[m], acc[t][m]);
    }
}

// T outputs (weight rows w + t * ldw) x MB activation rows (x + m * ldx), all of K: sums[m * T + t].
template <int DT, int T, int MB>
static void r_micro(const void* w, int64_t ldw, const void* x, int64_t ldx, int64_t K, float* sums) {
    const size_t es = DT == F_F32 ? 4 : 2;
    __m512 acc[T][MB];
    const char* wp[T];
    const char* xp[MB];
    for (int t = 0; t < T; ++t) {
        wp[t] = (const char*)w + t * ldw * es;
        for (int m = 0; m < MB; ++m) acc[t][m] = _mm512_setzero_ps();
    }
    for (int m = 0; m < MB; ++m) xp[m] = (const char*)x + m * ldx * es;
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) r_step<DT, T, MB, false>(acc, wp, xp, k, 0);
    if (k < K) r_step<DT, T, MB, true>(acc, wp, xp, k, (__mmask16)((1u << (K - k)) - 1));
    for (int m = 0; m < MB; ++m)
        for (int t = 0; t < T; ++t) sums[m * T + t] = _mm512_reduce_add_ps(acc[t][m]);
}

template <int T, int MB, bool MASK>
BF16_TARGET static inline __attribute__((always_inline)) void r_step_pairs(__m512 (&acc)[T][MB],
                                                                           const uint16_t* const (&wp)[T],
                                                                           const uint16_t* const (&xp)[MB],
                                                                           int64_t k, __mmask32 mk) {
    __m512bh xv[MB];
    for (int m = 0; m < MB; ++m)
        xv[m] = (__m512bh)(MASK ? _mm512_maskz_loadu_epi16(mk, xp[m] + k) : _mm512_loadu_si512(xp[m] + k));
    for (int t = 0; t < T; ++t) {
        const __m512bh wv = (__m512bh)(MASK ? _mm512_maskz_loadu_epi16(mk, wp[t] + k) : _mm512_loadu_si512(wp[t] + k));
        for (int m = 0; m < MB; ++m) acc[t][m] = _mm512_dpbf16_ps(acc[t][m], wv, xv[m]);
    }
}

// The pair variant (AVX512-BF16): steps of 32 inputs.
template <int T, int MB>
BF16_TARGET static void r_micro_pairs(const void* w, int64_t ldw, const void* x, int64_t ldx, int64_t K,
                                      float* sums) {
    __m512 acc[T][MB];
    const uint16_t* wp[T];
    const uint16_t* xp[MB];
    for (int t = 0; t < T; ++t) {
        wp[t] = (const uint16_t*)w + t * ldw;
        for (int m = 0; m < MB; ++m) acc[t][m] = _mm512_setzero_ps();
    }
    for (int m = 0; m < MB; ++m) xp[m] = (const uint16_t*)x + m * ldx;
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) r_step_pairs<T, MB, false>(acc, wp, xp, k, 0);
    if (k < K) r_step_pairs<T, MB, true>(acc, wp, xp, k, (__mmask32)((1u << (K - k)) - 1));
    for (int m = 0; m < MB; ++m)
        for (int t = 0; t < T; ++t) sums[m * T + t] = _mm512_reduce_add_ps(acc[t][m]);
}

typedef void (*r_fn)(const void*, int64_t, const void*, int64_t, int64_t, float*);

template <int T, int MB>
static r_fn r_pick_tm(int dt, int pairs) {
    if (pairs) return r_micro_pairs<T, MB>;
    return dt == F_F32 ? r_micro<F_F32, T, MB> : dt == F_BF16 ? r_micro<F_BF16, T, MB> : r_micro<F_F16, T, MB>;
}

// T x MB: 8 x 1 (one row: eight independent chains), 4 x 2, 6 x 4 (24 accumulators), and 1 x 1-4
// for what is left at the ends of N and M.
static r_fn r_pick(int dt, int pairs, int T, int MB) {
    if (T == 8) return r_pick_tm<8, 1>(dt, pairs);
    if (T == 4) return r_pick_tm<4, 2>(dt, pairs);
    if (T == 6) return r_pick_tm<6, 4>(dt, pairs);
    switch (MB) {
        case 1: return r_pick_tm<1, 1>(dt, pairs);
        case 2: return r_pick_tm<1, 2>(dt, pairs);
        case 3: return r_pick_tm<1, 3>(dt, pairs);
        default: return r_pick_tm<1, 4>(dt, pairs);
    }
}

// As slm_fgemm_packed, with w: [N, K] row-major (row stride ldw, read in place).
extern "C" int slm_fgemm_rows(const void* x, int64_t M, int64_t K, int64_t ldx, const void* w, int64_t ldw, int dt,
                              int64_t N, const void* bias, void* out, int64_t ldo, int nthreads) {
    if (M < 1 || K < 1 || N < 1 || dt < 0 || dt > 2 || ldx < K || ldw < K || ldo < N) return -1;
    const int pairs = slm_fgemm_pairs(dt);
    const size_t es = dt == F_F32 ? 4 : 2;
    const int T = M == 1 ? 8 : M == 2 ? 4 : 6;
    const int MBX = M == 1 ? 1 : M == 2 ? 2 : 4;
    const int64_t blocks = (N + T - 1) / T;
    // rows a chunk at a time, sized so their activations stay in L2 while every weight row passes
    int64_t mc = (int64_t)((256 << 10) / (K * es));
    mc = mc < MBX ? MBX : mc / MBX * MBX;
    if (nthreads < 1) nthreads = 1;
#pragma omp parallel num_threads(nthreads)
    for (int64_t m0c = 0; m0c < M; m0c += mc) {
        const int64_t m1c = m0c + mc < M ? m0c + mc : M;
#pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks; ++b) {
            const int64_t n0 = b * T;
            const int tt = (int)(N - n0 < T ? N - n0 : T);
            for (int64_t m0 = m0c; m0 < m1c; m0 += MBX) {
                const int mb = (int)(m1c - m0 < MBX ? m1c - m0 : MBX);
                float sums[32];
                for (int ts = 0; ts < tt;) {
                    const int tcur = tt == T && mb == MBX ? T : 1;  // the ends of N and M: one output at a time
                    r_pick(dt, pairs, tcur, mb)((const char*)w + (n0 + ts) * ldw * es, ldw,
                                                (const char*)x + m0 * ldx * es, ldx, K, sums);
                    for (int m = 0; m < mb; ++m)
                        for (int t = 0; t < tcur; ++t) {
                            const int64_t n = n0 + ts + t;
                            put(out, (m0 + m) * ldo + n, sums[m * tcur + t], bias, n, dt);
                        }
                    ts += tcur;
                }
            }
        }
    }
    return 0;
}
