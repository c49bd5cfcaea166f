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
// weighted V sum, divided by the sum at the end. One task per (row, up to ATTN_QB queries, kv head)
// handles their G query heads (K and V blocks are re-read per head from cache).
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

// Chunks of 16 values of D whose weighted V sums stay in registers: QB x chunks accumulators, a V chunk
// and QB weights within 32 registers.
template <int QB>
constexpr int PV_CHUNKS = QB == 1 ? 8 : 24 / QB;

// acc_r[c] = sum_j p_r[j] v_j[c0 + c] over query r's keys j < nn[r], in order, for CN chunks (c < CN);
// p_r at p + r * pst. Keys every query sees first, then each query's last ones alone.
template <int DT, int QB, int CN>
static void pv_chunks(const float* p, int64_t pst, const void* v, int64_t vst, int64_t c0, int64_t nc, __mmask16 tail,
                      int64_t n, int64_t nmin, const int64_t* nn, float* acc, int64_t ast) {
    const size_t es = DT == DT_F32 ? 4 : 2;
    __m512 ra[QB][CN];
#pragma GCC unroll 8
    for (int r = 0; r < QB; ++r)
#pragma GCC unroll 8
        for (int c = 0; c < CN; ++c) ra[r][c] = _mm512_setzero_ps();
    for (int64_t j = 0; j < nmin; ++j) {
        const char* vj = (const char*)v + j * vst * es;
        __m512 w[QB];
#pragma GCC unroll 8
        for (int r = 0; r < QB; ++r) w[r] = _mm512_set1_ps(p[r * pst + j]);
#pragma GCC unroll 8
        for (int c = 0; c < CN; ++c) {
            const __m512 vc = ld16<DT>(vj, (c0 + c) * 16, c0 + c == nc - 1 ? tail : 0xffff);
#pragma GCC unroll 8
            for (int r = 0; r < QB; ++r) ra[r][c] = _mm512_fmadd_ps(w[r], vc, ra[r][c]);
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < QB; ++r)
#pragma GCC unroll 8
        for (int c = 0; c < CN; ++c) _mm512_storeu_ps(acc + r * ast + c * 16, ra[r][c]);
    for (int64_t j = nmin; j < n; ++j) {  // from memory: ra is not indexed at run time (it stays in registers)
        const char* vj = (const char*)v + j * vst * es;
        for (int r = 0; r < QB; ++r) {
            if (j >= nn[r]) continue;
            const __m512 w = _mm512_set1_ps(p[r * pst + j]);
            for (int c = 0; c < CN; ++c) {
                float* a = acc + r * ast + c * 16;
                _mm512_storeu_ps(a, _mm512_fmadd_ps(w, ld16<DT>(vj, (c0 + c) * 16, c0 + c == nc - 1 ? tail : 0xffff),
                                                    _mm512_loadu_ps(a)));
            }
        }
    }
}

typedef void (*pv_t)(const float*, int64_t, const void*, int64_t, int64_t, int64_t, __mmask16, int64_t, int64_t,
                     const int64_t*, float*, int64_t);

template <int DT, int QB, int CN = PV_CHUNKS<QB>>
static pv_t pv_fn(int64_t cn) {
    if constexpr (CN == 1) return pv_chunks<DT, QB, 1>;
    else return cn == CN ? pv_chunks<DT, QB, CN> : pv_fn<DT, QB, CN - 1>(cn);
}

// Keys whose scores are formed together: QB x SCORE_KEYS independent FMA chains, each query chunk loaded once
// for all of them (4 queries one key at a time left the chains' latency exposed; a lone query, as in decode,
// reading K from memory, measured 8-11% slower with 4 keys than with one).
template <int QB>
constexpr int SCORE_KEYS = QB == 1 ? 1 : 4;

// a[r][t0 + u] = query r (at qf + r * qst) times key j + u, u < KN, lane by lane: each an FMA chain over the
// chunks of D in order, as for one query and one key.
template <int DT, int QB, int KN>
static inline void scores(const float* qf, int64_t qst, const void* k, int64_t j, int64_t kst, int64_t nc,
                          __mmask16 tail, __m512 (*a)[16], int64_t t0) {
    const size_t es = DT == DT_F32 ? 4 : 2;
    __m512 sum[KN][QB];
#pragma GCC unroll 4
    for (int u = 0; u < KN; ++u)
#pragma GCC unroll 4
        for (int r = 0; r < QB; ++r) sum[u][r] = _mm512_setzero_ps();
    for (int64_t c = 0; c < nc; ++c) {
        const __mmask16 mk = c == nc - 1 ? tail : 0xffff;
        __m512 kc[KN];
#pragma GCC unroll 4
        for (int u = 0; u < KN; ++u) kc[u] = ld16<DT>((const char*)k + (j + u) * kst * es, c * 16, mk);
#pragma GCC unroll 4
        for (int r = 0; r < QB; ++r) {
            const __m512 qc = _mm512_loadu_ps(qf + r * qst + c * 16);
#pragma GCC unroll 4
            for (int u = 0; u < KN; ++u) sum[u][r] = _mm512_fmadd_ps(qc, kc[u], sum[u][r]);
        }
    }
#pragma GCC unroll 4
    for (int u = 0; u < KN; ++u)
#pragma GCC unroll 4
        for (int r = 0; r < QB; ++r) a[r][t0 + u] = sum[u][r];
}

// QB queries (see attn_driver.h), query r over n[r] keys: each key's K and V vectors are read once for all
// of them. Query r's scores, softmax and weighted sums are exactly the one-query operations in the same
// order (its FMA chains, the same hsum16 tree, keys past its n[r] never added), so its bits do not depend
// on QB or on the other queries.
template <int DT, int QB>
static void attn_block(const void* q, int64_t qss, const void* k, const void* v, void* out, int64_t ost,
                       const int64_t* nn, int64_t G, int64_t D, int64_t kst, int64_t vst, int64_t qsh, float scale,
                       float* s, float* acc, float* qf) {
    const size_t es = DT == DT_F32 ? 4 : 2;
    const int64_t nc = (D + 15) / 16;
    const __mmask16 tail = (D % 16) ? (__mmask16)((1u << (D % 16)) - 1) : (__mmask16)0xffff;
    int64_t n = 0, nmin = nn[0];  // n: the longest query's keys (the score rows' stride)
    for (int r = 0; r < QB; ++r) {
        n = nn[r] > n ? nn[r] : n;
        nmin = nn[r] < nmin ? nn[r] : nmin;
    }
    // queries in float32, zero padded to nc * 16: query r's head g at qf + (r * G + g) * nc * 16
    for (int r = 0; r < QB; ++r)
        for (int64_t g = 0; g < G; ++g)
            for (int64_t c = 0; c < nc; ++c)
                _mm512_storeu_ps(qf + ((r * G + g) * nc + c) * 16,
                                 ld16<DT>((const char*)q + (r * qss + g * qsh) * es, c * 16, c == nc - 1 ? tail : 0xffff));
    // scores s[(r * G + g) * n + j] = scale * q . k_j, sixteen keys at a time: each key's 16 lane sums
    // are reduced by one transposing tree (hsum16), the same tree for every key, so a score depends on
    // q and k_j only (a partial last block is padded with zero vectors)
    for (int64_t g = 0; g < G; ++g) {
        for (int64_t j0 = 0; j0 < n; j0 += 16) {
            const int64_t m = n - j0 < 16 ? n - j0 : 16;
            __m512 a[QB][16];
            for (int r = 0; r < QB; ++r)  // the keys past the last: zero vectors
                for (int64_t t = m; t < 16; ++t) a[r][t] = _mm512_setzero_ps();
            int64_t t = 0;
            const float* qg = qf + g * nc * 16;  // query r's head g at qg + r * G * nc * 16
            for (; t + SCORE_KEYS<QB> <= m; t += SCORE_KEYS<QB>)
                scores<DT, QB, SCORE_KEYS<QB>>(qg, G * nc * 16, k, j0 + t, kst, nc, tail, a, t);
            for (; t < m; ++t) scores<DT, QB, 1>(qg, G * nc * 16, k, j0 + t, kst, nc, tail, a, t);
            const __mmask16 mk = m == 16 ? (__mmask16)0xffff : (__mmask16)((1u << m) - 1);
            for (int r = 0; r < QB; ++r)
                _mm512_mask_storeu_ps(s + (r * G + g) * n + j0, mk, _mm512_mul_ps(hsum16(a[r]), _mm512_set1_ps(scale)));
        }
    }
    // softmax numerators over each query's own keys, and their sums
    float sum[QB * 64];
    for (int r = 0; r < QB; ++r)
        for (int64_t g = 0; g < G; ++g) {
            float* sg = s + (r * G + g) * n;
            const int64_t nr = nn[r];
            __m512 mx = _mm512_set1_ps(-INFINITY);
            int64_t j = 0;
            for (; j + 16 <= nr; j += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(sg + j));
            float mv = _mm512_reduce_max_ps(mx);
            for (; j < nr; ++j) mv = sg[j] > mv ? sg[j] : mv;
            const __m512 vm = _mm512_set1_ps(mv);
            __m512 tot = _mm512_setzero_ps();
            for (j = 0; j < nr; j += 16) {
                __mmask16 mk = nr - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (nr - j)) - 1);
                __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, sg + j), vm));
                e = _mm512_maskz_mov_ps(mk, e);
                tot = _mm512_add_ps(tot, e);
                _mm512_mask_storeu_ps(sg + j, mk, e);
            }
            sum[r * G + g] = _mm512_reduce_add_ps(tot);
        }
    // acc = sum_j p_j v_j per query, in registers per block of chunks of D; each value is summed over j in
    // order, whatever the chunking
    for (int64_t g = 0; g < G; ++g)
        for (int64_t c0 = 0; c0 < nc; c0 += PV_CHUNKS<QB>) {
            const int64_t cn = nc - c0 < PV_CHUNKS<QB> ? nc - c0 : PV_CHUNKS<QB>;
            pv_fn<DT, QB>(cn)(s + g * n, G * n, v, vst, c0, nc, tail, n, nmin, nn, acc + (g * nc + c0) * 16, G * nc * 16);
        }
    for (int r = 0; r < QB; ++r)
        attn_store<DT>(acc + r * G * nc * 16, sum + r * G, (char*)out + r * ost * es, G, D, nc);
}

template <int DT>
static void attn_queries(const void* q, int64_t qss, const void* k, const void* v, void* out, int64_t ost, int nq,
                         const int64_t* n, int64_t G, int64_t D, int64_t kst, int64_t vst, int64_t qsh, float scale,
                         float* s, float* acc, float* qf) {
    if (nq == ATTN_QB) return attn_block<DT, ATTN_QB>(q, qss, k, v, out, ost, n, G, D, kst, vst, qsh, scale, s, acc, qf);
    const size_t es = DT == DT_F32 ? 4 : 2;
    for (int r = 0; r < nq; ++r)  // a short run: one query at a time
        attn_block<DT, 1>((const char*)q + r * qss * es, qss, k, v, (char*)out + r * ost * es, ost, n + r, G, D, kst,
                          vst, qsh, scale, s, acc, qf);
}

SLM_ATTN_ENTRY
