// slm_attn (attn.cpp) for CPUs with AVX2 + FMA + F16C: the same float32 operations per lane in the
// same order, and the same pairing of lanes in every horizontal sum, so the same bits as the AVX512
// kernel; each query's result independent of B, S, L, strides and threads as there.
#include <omp.h>
#include <stdlib.h>
#include <math.h>

#include "avx2.h"

enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2 };

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

template <int DT>
static void attn_task(const void* q, const void* k, const void* v, void* out, int64_t G, int64_t D, int64_t n,
                      int64_t kst, int64_t vst, int64_t qsh, float scale, float* s, float* acc, float* qf) {
    const size_t es = DT == DT_F32 ? 4 : 2;
    const int64_t nc = (D + 15) / 16;
    const int tail = D % 16 ? (int)(D % 16) : 16;
    for (int64_t g = 0; g < G; ++g)
        for (int64_t c = 0; c < nc; ++c)
            v_store(qf + g * nc * 16 + c * 16, ld16<DT>((const char*)q + g * qsh * es, c * 16, c == nc - 1 ? tail : 16));
    for (int64_t g = 0; g < G; ++g) {
        const float* qg = qf + g * nc * 16;
        for (int64_t j = 0; j < n; ++j) {
            const char* kj = (const char*)k + j * kst * es;
            V16 a = v_zero();
            for (int64_t c = 0; c < nc; ++c) a = v_fma(v_load(qg + c * 16), ld16<DT>(kj, c * 16, c == nc - 1 ? tail : 16), a);
            s[g * n + j] = key_sum(a) * scale;
        }
    }
    float sum[64];
    for (int64_t g = 0; g < G; ++g) {
        float* sg = s + g * n;
        float m = -INFINITY;
        for (int64_t j = 0; j < n; ++j) m = sg[j] > m ? sg[j] : m;  // a max: any order gives it
        const __m256 vm = _mm256_set1_ps(m);
        V16 tot = v_zero();
        for (int64_t j = 0; j < n; j += 16) {
            const int cnt = n - j >= 16 ? 16 : (int)(n - j);
            alignas(32) float e[16];
            const V16 x = ld16<DT_F32>(sg, j, cnt);
            v_store(e, V16{exp8(_mm256_sub_ps(x.a, vm)), exp8(_mm256_sub_ps(x.b, vm))});
            for (int i = cnt; i < 16; ++i) e[i] = 0.f;
            tot = v_add(tot, v_load(e));
            memcpy(sg + j, e, sizeof(float) * cnt);
        }
        sum[g] = v_sum(tot);
    }
    // acc_g = sum_j p_gj v_j over j in order, 4 chunks of 16 at a time
    for (int64_t g = 0; g < G; ++g) {
        const float* sg = s + g * n;
        for (int64_t c0 = 0; c0 < nc; c0 += 4) {
            const int64_t cn = nc - c0 < 4 ? nc - c0 : 4;
            V16 r[4];
            for (int c = 0; c < 4; ++c) r[c] = v_zero();
            for (int64_t j = 0; j < n; ++j) {
                const char* vj = (const char*)v + j * vst * es;
                const V16 p = v_set1(sg[j]);
                for (int c = 0; c < 4; ++c)
                    if (c < cn) r[c] = v_fma(p, ld16<DT>(vj, (c0 + c) * 16, c0 + c == nc - 1 ? tail : 16), r[c]);
            }
            for (int c = 0; c < cn; ++c) v_store(acc + (g * nc + c0 + c) * 16, r[c]);
        }
    }
    for (int64_t g = 0; g < G; ++g) {
        const float inv = 1.f / sum[g];
        float* a = acc + g * nc * 16;
        for (int64_t d = 0; d < D; ++d) {
            const float y = a[d] * inv;
            if (DT == DT_F32) ((float*)out)[g * D + d] = y;
            else if (DT == DT_BF16) ((uint16_t*)out)[g * D + d] = f32_to_bf16(y);
            else ((uint16_t*)out)[g * D + d] = _cvtss_sh(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        }
    }
}

// slm_attn of attn.cpp: the same arguments, checks and task split.
extern "C" int slm_attn(int dtype, int64_t B, int64_t S, int64_t H, int64_t Hkv, int64_t D, const void* q,
                        int64_t qsb, int64_t qsh, int64_t qss, const void* k, int64_t ksb, int64_t ksh, int64_t kst,
                        const void* v, int64_t vsb, int64_t vsh, int64_t vst, int64_t L, const int64_t* qpos,
                        int64_t qpb, int64_t qps, int64_t window, float scale, void* out, int nthreads) {
    if (B < 1 || S < 1 || Hkv < 1 || H % Hkv || D < 1 || L < 1 || S > L || dtype < 0 || dtype > 2) return -1;
    const int64_t G = H / Hkv;
    if (G > 64) return -1;
    int64_t nmax = 0;
    for (int64_t b = 0; b < B; ++b)
        for (int64_t i = 0; i < S; ++i) {
            const int64_t p = qpos ? qpos[b * qpb + i * qps] : L - S + i;
            if (p < 0 || p >= L) return -1;
            const int64_t st = window > 0 && p - window + 1 > 0 ? p - window + 1 : 0;
            if (p + 1 - st > nmax) nmax = p + 1 - st;
        }
    const int64_t nc = (D + 15) / 16;
    const size_t es = dtype == DT_F32 ? 4 : 2;
    const int64_t tasks = B * S * Hkv;
    if (nthreads < 1) nthreads = 1;
    if (nthreads > tasks) nthreads = (int)tasks;
    int err = 0;
#pragma omp parallel num_threads(nthreads)
    {
        float* buf = (float*)malloc(sizeof(float) * (G * nmax + 2 * G * nc * 16 + 16));
        if (!buf) {
#pragma omp atomic write
            err = -2;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < tasks; ++t) {
            if (!buf) continue;
            const int64_t b = t / (S * Hkv), i = t / Hkv % S, hk = t % Hkv;
            const int64_t p = qpos ? qpos[b * qpb + i * qps] : L - S + i;
            const int64_t st = window > 0 && p - window + 1 > 0 ? p - window + 1 : 0;
            const void* qb = (const char*)q + (b * qsb + i * qss + hk * G * qsh) * es;
            const void* kb = (const char*)k + (b * ksb + hk * ksh + st * kst) * es;
            const void* vb = (const char*)v + (b * vsb + hk * vsh + st * vst) * es;
            void* ob = (char*)out + (((b * S + i) * H + hk * G) * D) * es;
            float* s = buf;
            float* acc = buf + G * nmax;
            float* qf = acc + G * nc * 16;
            const int64_t n = p + 1 - st;
            if (dtype == DT_F32) attn_task<DT_F32>(qb, kb, vb, ob, G, D, n, kst, vst, qsh, scale, s, acc, qf);
            else if (dtype == DT_BF16) attn_task<DT_BF16>(qb, kb, vb, ob, G, D, n, kst, vst, qsh, scale, s, acc, qf);
            else attn_task<DT_F16>(qb, kb, vb, ob, G, D, n, kst, vst, qsh, scale, s, acc, qf);
        }
        free(buf);
    }
    return err;
}
