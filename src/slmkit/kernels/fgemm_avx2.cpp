// slmkit float matmul (fgemm.cpp) for CPUs with AVX2 + FMA + F16C: y[M, N] = x[M, K] @ W[N, K]^T (+ b),
// every output the same float32 sequence whatever M is (batch-invariant). The same arithmetic as
// fgemm.cpp's FMA variant, lane for lane and with the same final lane sum (avx2.h), so the same bits
// for float32 and float16; bfloat16 takes the FMA variant too (fgemm.cpp's pairs need AVX512-BF16),
// as fgemm.cpp does on AVX512 CPUs without BF16. Never executes an AVX512 instruction.
#include <omp.h>
#include <stdlib.h>

#include "avx2.h"
#include "layout.h"

enum { F_F32 = 0, F_BF16 = 1, F_F16 = 2 };

static inline float from_dt(const void* p, int64_t i, int dt) {
    if (dt == F_F32) return ((const float*)p)[i];
    const uint16_t h = ((const uint16_t*)p)[i];
    return dt == F_F16 ? _cvtsh_ss(h) : bf16_to_f32(h);
}

static inline uint16_t to_dt16(float y, int dt) {
    return dt == F_BF16 ? f32_to_bf16(y) : _cvtss_sh(y, _MM_FROUND_TO_NEAREST_INT);
}

// out[o] = y rounded to dt (+ bias[n], added after the rounding and rounded again): fgemm.cpp's put.
static inline void put(void* out, int64_t o, float y, const void* bias, int64_t n, int dt) {
    if (dt == F_F32) {
        ((float*)out)[o] = bias ? y + ((const float*)bias)[n] : y;
        return;
    }
    uint16_t h = to_dt16(y, dt);
    if (bias) h = to_dt16(from_dt(&h, 0, dt) + from_dt(bias, n, dt), dt);
    ((uint16_t*)out)[o] = h;
}

// No pair variant here.
extern "C" int slm_fgemm_pairs(int dt) {
    (void)dt;
    return 0;
}

// 16 values at p (16-bit or 32-bit elements) as float32.
template <int DT>
static inline V16 wload(const void* p) {
    if (DT == F_F32) return v_load((const float*)p);
    const __m128i h0 = _mm_loadu_si128((const __m128i*)p), h1 = _mm_loadu_si128((const __m128i*)p + 1);
    if (DT == F_F16) return {_mm256_cvtph_ps(h0), _mm256_cvtph_ps(h1)};
    return {bf16x8(h0), bf16x8(h1)};
}

// T tiles x MB rows over all of K (fgemm.cpp's t_micro): x float32 [MB, K]; out [MB, 16 T] (stride ldo).
template <int DT, int T, int MB>
static void t_micro(const uint8_t* w, int64_t tile_bytes, int64_t K, const float* x, float* out, int64_t ldo) {
    const int64_t es = DT == F_F32 ? 64 : 32;
    V16 acc[T][MB];
    for (int t = 0; t < T; ++t)
        for (int m = 0; m < MB; ++m) acc[t][m] = v_zero();
    for (int64_t k = 0; k < K; ++k) {
        V16 xv[MB];
        for (int m = 0; m < MB; ++m) xv[m] = v_set1(x[m * K + k]);
        for (int t = 0; t < T; ++t) {
            const V16 wv = wload<DT>(w + t * tile_bytes + k * es);
            for (int m = 0; m < MB; ++m) acc[t][m] = v_fma(wv, xv[m], acc[t][m]);
        }
    }
    for (int t = 0; t < T; ++t)
        for (int m = 0; m < MB; ++m) v_store(out + m * ldo + t * 16, acc[t][m]);
}

typedef void (*t_fn)(const uint8_t*, int64_t, int64_t, const float*, float*, int64_t);

template <int T, int MB>
static t_fn t_pick_tm(int dt) {
    return dt == F_F32 ? t_micro<F_F32, T, MB> : dt == F_BF16 ? t_micro<F_BF16, T, MB> : t_micro<F_F16, T, MB>;
}

// 2 tiles x 1-2 rows (8 accumulator registers), 1 tile at the end of N
static t_fn t_pick(int dt, int T, int MB) {
    if (T == 2) return MB == 1 ? t_pick_tm<2, 1>(dt) : t_pick_tm<2, 2>(dt);
    return MB == 1 ? t_pick_tm<1, 1>(dt) : t_pick_tm<1, 2>(dt);
}

extern "C" int slm_fgemm_packed(const void* x, int64_t M, int64_t K, int64_t ldx, const uint8_t* w, int dt,
                                int64_t tiles, int64_t N, const void* bias, void* out, int64_t ldo, int nthreads) {
    if (M < 1 || K < 1 || dt < 0 || dt > 2 || N > tiles * 16 || N < 1 || ldx < K || ldo < N) return -1;
    float* xc = (float*)malloc(sizeof(float) * M * K);
    if (!xc) return -2;
    for (int64_t m = 0; m < M; ++m)
        for (int64_t k = 0; k < K; ++k) xc[m * K + k] = from_dt(x, m * ldx + k, dt);
    const int64_t tile_bytes = K * (dt == F_F32 ? 64 : 32);
    const int T = 2, MBX = 2;
    const int64_t blocks = (tiles + T - 1) / T;
    if (nthreads < 1) nthreads = 1;
    BlockQueue queue(M);  // prefill's blocks shared between threads (see SHARED_BLOCK_ROWS)
#pragma omp parallel num_threads(nthreads)
    {
        float tmp[2 * 32];
        for (BlockCursor c(queue, blocks); c.more(); c.next()) {
            const int64_t t0 = c.b * T;
            const int tt = (int)(tiles - t0 < T ? tiles - t0 : T);
            for (int64_t m0 = 0; m0 < M; m0 += MBX) {
                const int mb = (int)(M - m0 < MBX ? M - m0 : MBX);
                for (int ts = 0; ts < tt;) {
                    const int tcur = tt == T ? T : 1;
                    t_pick(dt, tcur, mb)(w + (t0 + ts) * tile_bytes, tile_bytes, K, xc + m0 * K, tmp, 32);
                    const int64_t r0 = (t0 + ts) * 16;
                    const int64_t nr = N - r0 < tcur * 16 ? N - r0 : tcur * 16;
                    for (int m = 0; m < mb; ++m)
                        for (int64_t r = 0; r < nr; ++r) put(out, (m0 + m) * ldo + r0 + r, tmp[m * 32 + r], bias, r0 + r, dt);
                    ts += tcur;
                }
            }
        }
    }
    free(xc);
    return 0;
}

// 16 values p[k..k+n) as float32, lanes past n zero (fgemm.cpp's masked ld16f).
template <int DT>
static inline V16 ld16f(const void* p, int64_t k, int n) {
    const size_t es = DT == F_F32 ? 4 : 2;
    const uint8_t* src = (const uint8_t*)p + k * es;
    if (n == 16) return wload<DT>(src);
    alignas(32) uint8_t tmp[64] = {0};
    memcpy(tmp, src, n * es);
    return wload<DT>(tmp);
}

// T outputs x MB rows, all of K: per output 16 lanes (lane j takes k = j, 16 + j, ...), then
// fgemm.cpp's lane sum (_mm512_reduce_add_ps's tree, v_sum).
template <int DT, int T, int MB>
static void r_micro(const void* w, int64_t ldw, const void* x, int64_t ldx, int64_t K, float* sums) {
    const size_t es = DT == F_F32 ? 4 : 2;
    V16 acc[T][MB];
    for (int t = 0; t < T; ++t)
        for (int m = 0; m < MB; ++m) acc[t][m] = v_zero();
    for (int64_t k = 0; k < K; k += 16) {
        const int n = K - k >= 16 ? 16 : (int)(K - k);
        V16 xv[MB];
        for (int m = 0; m < MB; ++m) xv[m] = ld16f<DT>((const char*)x + m * ldx * es, k, n);
        for (int t = 0; t < T; ++t) {
            const V16 wv = ld16f<DT>((const char*)w + t * ldw * es, k, n);
            for (int m = 0; m < MB; ++m) acc[t][m] = v_fma(wv, xv[m], acc[t][m]);
        }
    }
    for (int m = 0; m < MB; ++m)
        for (int t = 0; t < T; ++t) sums[m * T + t] = v_sum(acc[t][m]);
}

typedef void (*r_fn)(const void*, int64_t, const void*, int64_t, int64_t, float*);

template <int T, int MB>
static r_fn r_pick_tm(int dt) {
    return dt == F_F32 ? r_micro<F_F32, T, MB> : dt == F_BF16 ? r_micro<F_BF16, T, MB> : r_micro<F_F16, T, MB>;
}

extern "C" int slm_fgemm_rows(const void* x, int64_t M, int64_t K, int64_t ldx, const void* w, int64_t ldw, int dt,
                              int64_t N, const void* bias, void* out, int64_t ldo, int nthreads) {
    if (M < 1 || K < 1 || N < 1 || dt < 0 || dt > 2 || ldx < K || ldw < K || ldo < N) return -1;
    const size_t es = dt == F_F32 ? 4 : 2;
    const int T = M == 1 ? 4 : 2, MBX = M == 1 ? 1 : 2;  // 8 accumulator registers
    const int64_t blocks = (N + T - 1) / T;
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
                float sums[8];
                for (int ts = 0; ts < tt;) {
                    const int tcur = tt == T && mb == MBX ? T : 1;
                    r_fn f = tcur == 4 ? r_pick_tm<4, 1>(dt) : tcur == 2 ? r_pick_tm<2, 2>(dt)
                             : mb == 1 ? r_pick_tm<1, 1>(dt) : r_pick_tm<1, 2>(dt);
                    f((const char*)w + (n0 + ts) * ldw * es, ldw, (const char*)x + m0 * ldx * es, ldx, K, sums);
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
