// slmkit attention for x86 CPUs with AVX512 (the AVX2 version: attn_avx2.cpp, the same arithmetic).
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>

#include "bf16.h"
#include "attn_driver.h"

// Attention of S new queries per row: y[b, s, h] = softmax(scale * q[b, h, s] . K[b, h/G, j]) V over
// the keys j in [start, p] with p the query's position and start = max(0, p - window + 1) (window 0:
// none). q [B, H, S, D] (row / head / query strides given, last dim contiguous), K and V of any
// strides (elements; last dim contiguous), all of one dtype (0 float32, 1 bfloat16, 2 float16); out
// [B, S, H, D] contiguous in that dtype. Everything in float32: scores, max-subtracted softmax, the
// weighted V sum, divided by the sum at the end. One task per (row, query, kv head) handles its G
// query heads (K and V blocks are re-read per head from cache).
//
// Each query's result is computed by the same instructions in the same order whatever B, S, L, the
// strides or the thread count: a query gives the same bits alone in a decode step, batched with
// other rows, or as one of a prefill chunk of any size. Greedy decoding relies on that to be batch-
// and chunk-invariant (a prompt prefilled in one piece, in chunks, or reused from a kept slot).


template <int DT>
static inline __m512 ld16(const void* p, int64_t i, __mmask16 m) {
    if (DT == DT_F32) return _mm512_maskz_loadu_ps(m, (const float*)p + i);
    __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t*)p + i);
    if (DT == DT_F16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// exp(x) for x <= 0 (max-subtracted scores): 2^n * p(r), r = x - n ln2 in [-ln2/2, ln2/2],
// degree-6 minimax-ish polynomial (Cephes expf), about 1 ulp; below -87 -> 0.
static inline __m512 exp512(__m512 x) {
    const __m512 lo = _mm512_set1_ps(-87.3f);
    __mmask16 under = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
    x = _mm512_max_ps(x, lo);
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500E-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507E-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
    __m512 r2 = _mm512_mul_ps(r, r);
    p = _mm512_fmadd_ps(p, r2, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
    return _mm512_maskz_mov_ps((__mmask16)~under, _mm512_scalef_ps(p, n));
}

// r[t] = the sum of a[t]'s 16 lanes, for t = 0..15: lanes (i, i+2) within each 128-bit quarter,
// then (i, i+1), then the quarters (0+1, 2+3), then the halves. One fixed tree for every t.
static inline __m512 hsum16(const __m512* a) {
    __m512 u[8], w[4];
    for (int i = 0; i < 8; ++i)
        u[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
    for (int i = 0; i < 4; ++i) {
        const __m512d x = _mm512_castps_pd(u[2 * i]), y = _mm512_castps_pd(u[2 * i + 1]);
        w[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    const __m512 y01 = _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], 0x88), _mm512_shuffle_f32x4(w[0], w[1], 0xdd));
    const __m512 y23 = _mm512_add_ps(_mm512_shuffle_f32x4(w[2], w[3], 0x88), _mm512_shuffle_f32x4(w[2], w[3], 0xdd));
    return _mm512_add_ps(_mm512_shuffle_f32x4(y01, y23, 0x88), _mm512_shuffle_f32x4(y01, y23, 0xdd));
}

template <int DT>
static void attn_task(const void* q, const void* k, const void* v, void* out, int64_t G, int64_t D, int64_t n,
                      int64_t kst, int64_t vst, int64_t qsh, float scale, float* s, float* acc, float* qf) {
    const size_t es = DT == DT_F32 ? 4 : 2;
    const int64_t nc = (D + 15) / 16;
    const __mmask16 tail = (D % 16) ? (__mmask16)((1u << (D % 16)) - 1) : (__mmask16)0xffff;
    // queries in float32, zero padded to nc * 16
    for (int64_t g = 0; g < G; ++g)
        for (int64_t c = 0; c < nc; ++c)
            _mm512_storeu_ps(qf + g * nc * 16 + c * 16,
                             ld16<DT>((const char*)q + g * qsh * es, c * 16, c == nc - 1 ? tail : 0xffff));
    // scores s[g * n + j] = scale * q_g . k_j, sixteen keys at a time: each key's 16 lane sums
    // are reduced by one transposing tree (hsum16), the same tree for every key, so a score
    // depends on q_g and k_j only (a partial last block is padded with zero vectors)
    for (int64_t g = 0; g < G; ++g) {
        const float* qg = qf + g * nc * 16;
        for (int64_t j0 = 0; j0 < n; j0 += 16) {
            const int64_t m = n - j0 < 16 ? n - j0 : 16;
            __m512 a[16];
            for (int t = 0; t < 16; ++t) a[t] = _mm512_setzero_ps();
            for (int64_t t = 0; t < m; ++t) {
                const char* kj = (const char*)k + (j0 + t) * kst * es;
                __m512 acc = _mm512_setzero_ps();
                for (int64_t c = 0; c < nc; ++c)
                    acc = _mm512_fmadd_ps(_mm512_loadu_ps(qg + c * 16), ld16<DT>(kj, c * 16, c == nc - 1 ? tail : 0xffff),
                                          acc);
                a[t] = acc;
            }
            const __m512 sc = _mm512_mul_ps(hsum16(a), _mm512_set1_ps(scale));
            _mm512_mask_storeu_ps(s + g * n + j0, m == 16 ? (__mmask16)0xffff : (__mmask16)((1u << m) - 1), sc);
        }
    }
    // softmax numerators, and their sums
    float sum[64];
    for (int64_t g = 0; g < G; ++g) {
        float* sg = s + g * n;
        __m512 mx = _mm512_set1_ps(-INFINITY);
        int64_t j = 0;
        for (; j + 16 <= n; j += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(sg + j));
        float m = _mm512_reduce_max_ps(mx);
        for (; j < n; ++j) m = sg[j] > m ? sg[j] : m;
        const __m512 vm = _mm512_set1_ps(m);
        __m512 tot = _mm512_setzero_ps();
        for (j = 0; j < n; j += 16) {
            __mmask16 mk = n - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - j)) - 1);
            __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, sg + j), vm));
            e = _mm512_maskz_mov_ps(mk, e);
            tot = _mm512_add_ps(tot, e);
            _mm512_mask_storeu_ps(sg + j, mk, e);
        }
        sum[g] = _mm512_reduce_add_ps(tot);
    }
    // acc_g = sum_j p_gj v_j, in registers per block of up to 8 chunks (128 values) of D; each
    // value is summed over j in order, whatever the chunking
    for (int64_t g = 0; g < G; ++g) {
        const float* sg = s + g * n;
        for (int64_t c0 = 0; c0 < nc; c0 += 8) {
            const int64_t cn = nc - c0 < 8 ? nc - c0 : 8;
            __m512 r[8];
            for (int c = 0; c < 8; ++c) r[c] = _mm512_setzero_ps();
            for (int64_t j = 0; j < n; ++j) {
                const char* vj = (const char*)v + j * vst * es;
                const __m512 p = _mm512_set1_ps(sg[j]);
#pragma GCC unroll 8
                for (int c = 0; c < 8; ++c)
                    if (c < cn)
                        r[c] = _mm512_fmadd_ps(p, ld16<DT>(vj, (c0 + c) * 16, c0 + c == nc - 1 ? tail : 0xffff), r[c]);
            }
            for (int c = 0; c < cn; ++c) _mm512_storeu_ps(acc + (g * nc + c0 + c) * 16, r[c]);
        }
    }
    attn_store<DT>(acc, sum, out, G, D, nc);
}

SLM_ATTN_ENTRY
