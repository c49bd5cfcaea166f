// slm_attn (attn.cpp) for CPUs with AVX2 + FMA + F16C: the same float32 operations per lane in the
// same order, and the same pairing of lanes in every horizontal sum, so the same bits as the AVX512
// kernel; each query's result independent of B, S, L, strides and threads as there.
#include <omp.h>
#include <stdlib.h>
#include <math.h>

#include "avx2.h"
#include "attn_driver.h"


// 16 values p[i..i+n) as float32, lanes past n zero (n <= 16).
template <int DT>
static inline V16 ld16(const void* p, int64_t i, int n) {
    const size_t es = DT == DT_F32 ? 4 : 2;
    alignas(32) uint8_t tmp[64];
    const uint8_t* src = (const uint8_t*)p + i * es;
    if (n < 16) {
        memset(tmp, 0, sizeof tmp);
        memcpy(tmp, src, n * es);
        src = tmp;
    }
    if (DT == DT_F32) return v_load((const float*)src);
    const __m128i h0 = _mm_loadu_si128((const __m128i*)src), h1 = _mm_loadu_si128((const __m128i*)(src + 16));
    if (DT == DT_F16) return {_mm256_cvtph_ps(h0), _mm256_cvtph_ps(h1)};
    return {bf16x8(h0), bf16x8(h1)};
}

// attn.cpp's exp512, 8 lanes: 2^n as exponent bits (n >= -126 for x >= -87.3, a normal float),
// so p * 2^n rounds once, as vscalefps does.
static inline __m256 exp8(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.3f);
    const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_max_ps(x, lo);
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500E-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507E-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073E-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894E-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459E-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201E-1f));
    __m256 r2 = _mm256_mul_ps(r, r);
    p = _mm256_fmadd_ps(p, r2, _mm256_add_ps(r, _mm256_set1_ps(1.f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

// attn.cpp's hsum16 for one key: per 128-bit quarter (l0 + l2) + (l1 + l3), then (q0 + q1) + (q2 + q3).
static inline float qsum(__m128 x) {
    const __m128 s = _mm_add_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
}

static inline float key_sum(V16 v) {
    const float q0 = qsum(_mm256_castps256_ps128(v.a)), q1 = qsum(_mm256_extractf128_ps(v.a, 1));
    const float q2 = qsum(_mm256_castps256_ps128(v.b)), q3 = qsum(_mm256_extractf128_ps(v.b, 1));
    return (q0 + q1) + (q2 + q3);
}

// acc_r[c] = sum_j p_r[j] v_j[c0 + c] over query r's keys j < nn[r], in order (attn.cpp pv_chunks), for
// CN chunks; QB x CN x 2 accumulators, a V chunk and QB weights within 16 registers.
template <int DT, int QB, int CN>
static void pv_chunks(const float* p, int64_t pst, const void* v, int64_t vst, int64_t c0, int64_t nc, int tail,
                      int64_t n, int64_t nmin, const int64_t* nn, float* acc, int64_t ast) {
    const size_t es = DT == DT_F32 ? 4 : 2;
    V16 ra[QB][CN];
#pragma GCC unroll 8
    for (int r = 0; r < QB; ++r)
#pragma GCC unroll 8
        for (int c = 0; c < CN; ++c) ra[r][c] = v_zero();
    for (int64_t j = 0; j < nmin; ++j) {
        const char* vj = (const char*)v + j * vst * es;
#pragma GCC unroll 8
        for (int c = 0; c < CN; ++c) {
            const V16 vc = ld16<DT>(vj, (c0 + c) * 16, c0 + c == nc - 1 ? tail : 16);
#pragma GCC unroll 8
            for (int r = 0; r < QB; ++r) ra[r][c] = v_fma(v_set1(p[r * pst + j]), vc, ra[r][c]);
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < QB; ++r)
#pragma GCC unroll 8
        for (int c = 0; c < CN; ++c) v_store(acc + r * ast + c * 16, ra[r][c]);
    for (int64_t j = nmin; j < n; ++j) {  // from memory: ra is not indexed at run time (it stays in registers)
        const char* vj = (const char*)v + j * vst * es;
        for (int r = 0; r < QB; ++r) {
            if (j >= nn[r]) continue;
            for (int c = 0; c < CN; ++c) {
                float* a = acc + r * ast + c * 16;
                v_store(a, v_fma(v_set1(p[r * pst + j]), ld16<DT>(vj, (c0 + c) * 16, c0 + c == nc - 1 ? tail : 16),
                                 v_load(a)));
            }
        }
    }
}

// attn.cpp's attn_block, 8 lanes at a time: query r's operations are the one-query ones, in the same order.
template <int DT, int QB>
static void attn_block(const void* q, int64_t qss, const void* k, const void* v, void* out, int64_t ost,
                       const int64_t* nn, int64_t G, int64_t D, int64_t kst, int64_t vst, int64_t qsh, float scale,
                       float* s, float* acc, float* qf) {
    const size_t es = DT == DT_F32 ? 4 : 2;
    const int64_t nc = (D + 15) / 16;
    const int tail = D % 16 ? (int)(D % 16) : 16;
    int64_t n = 0, nmin = nn[0];
    for (int r = 0; r < QB; ++r) {
        n = nn[r] > n ? nn[r] : n;
        nmin = nn[r] < nmin ? nn[r] : nmin;
    }
    for (int r = 0; r < QB; ++r)
        for (int64_t g = 0; g < G; ++g)
            for (int64_t c = 0; c < nc; ++c)
                v_store(qf + ((r * G + g) * nc + c) * 16,
                        ld16<DT>((const char*)q + (r * qss + g * qsh) * es, c * 16, c == nc - 1 ? tail : 16));
    for (int64_t g = 0; g < G; ++g)
        for (int64_t j = 0; j < n; ++j) {
            const char* kj = (const char*)k + j * kst * es;
            V16 a[QB];
#pragma GCC unroll 4
            for (int r = 0; r < QB; ++r) a[r] = v_zero();
            for (int64_t c = 0; c < nc; ++c) {
                const V16 kc = ld16<DT>(kj, c * 16, c == nc - 1 ? tail : 16);
#pragma GCC unroll 4
                for (int r = 0; r < QB; ++r) a[r] = v_fma(v_load(qf + ((r * G + g) * nc + c) * 16), kc, a[r]);
            }
#pragma GCC unroll 4
            for (int r = 0; r < QB; ++r) s[(r * G + g) * n + j] = key_sum(a[r]) * scale;
        }
    float sum[ATTN_QB * 64];
    for (int r = 0; r < QB; ++r)
        for (int64_t g = 0; g < G; ++g) {
            float* sg = s + (r * G + g) * n;
            const int64_t nr = nn[r];
            float m = -INFINITY;
            for (int64_t j = 0; j < nr; ++j) m = sg[j] > m ? sg[j] : m;  // a max: any order gives it
            const __m256 vm = _mm256_set1_ps(m);
            V16 tot = v_zero();
            for (int64_t j = 0; j < nr; j += 16) {
                const int cnt = nr - j >= 16 ? 16 : (int)(nr - j);
                alignas(32) float e[16];
                const V16 x = ld16<DT_F32>(sg, j, cnt);
                v_store(e, V16{exp8(_mm256_sub_ps(x.a, vm)), exp8(_mm256_sub_ps(x.b, vm))});
                for (int i = cnt; i < 16; ++i) e[i] = 0.f;
                tot = v_add(tot, v_load(e));
                memcpy(sg + j, e, sizeof(float) * cnt);
            }
            sum[r * G + g] = v_sum(tot);
        }
    constexpr int CN = QB == 1 ? 4 : 1;
    for (int64_t g = 0; g < G; ++g)
        for (int64_t c0 = 0; c0 < nc; c0 += CN) {
            const int64_t cn = nc - c0 < CN ? nc - c0 : CN;
            float* a = acc + (g * nc + c0) * 16;
            if (cn == CN) pv_chunks<DT, QB, CN>(s + g * n, G * n, v, vst, c0, nc, tail, n, nmin, nn, a, G * nc * 16);
            else  // the last chunks of D one at a time
                for (int64_t c = 0; c < cn; ++c)
                    pv_chunks<DT, QB, 1>(s + g * n, G * n, v, vst, c0 + c, nc, tail, n, nmin, nn, a + c * 16,
                                         G * nc * 16);
        }
    for (int r = 0; r < QB; ++r)
        attn_store<DT>(acc + r * G * nc * 16, sum + r * G, (char*)out + r * ost * es, G, D, nc);
}

// Up to ATTN_QB queries that start at the same key (attn_driver.h): all at once, or a short run one by one.
template <int DT>
static void attn_queries(const void* q, int64_t qss, const void* k, const void* v, void* out, int64_t ost, int nq,
                         const int64_t* n, int64_t G, int64_t D, int64_t kst, int64_t vst, int64_t qsh, float scale,
                         float* s, float* acc, float* qf) {
    if (nq == ATTN_QB) return attn_block<DT, ATTN_QB>(q, qss, k, v, out, ost, n, G, D, kst, vst, qsh, scale, s, acc, qf);
    const size_t es = DT == DT_F32 ? 4 : 2;
    for (int r = 0; r < nq; ++r)
        attn_block<DT, 1>((const char*)q + r * qss * es, qss, k, v, (char*)out + r * ost * es, ost, n + r, G, D, kst,
                          vst, qsh, scale, s, acc, qf);
}

SLM_ATTN_ENTRY
