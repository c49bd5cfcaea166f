// slm_attn's checks, task split and final normalisation, shared by attn.cpp (AVX512) and attn_avx2.cpp:
// each file brings its own attn_task<DT> (the scores, softmax numerators and weighted V sums of one task)
// and passes its three dtype instances; everything here is scalar, so both give the same bits.
#pragma once
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#include "bf16.h"

enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2 };

// Queries are taken up to ATTN_QB at a time (consecutive queries of one row that see the same first key),
// so each key and value read serves all of them; each query's operations stay the same, in the same order.
constexpr int ATTN_QB = 4;

// One task: G query heads of nq queries (query r at q + r * qss elements, its output at out + r * ost) of one
// (row, kv head), query r over keys 0 .. n[r] - 1 from k / v; s, acc, qf: its scratch.
typedef void (*attn_task_fn)(const void* q, int64_t qss, const void* k, const void* v, void* out, int64_t ost, int nq,
                             const int64_t* n, int64_t G, int64_t D, int64_t kst, int64_t vst, int64_t qsh, float scale,
                             float* s, float* acc, float* qf);

// out[g, d] = acc[g, d] / sum[g] in the output dtype (acc rows padded to nc * 16).
template <int DT>
static inline void attn_store(const float* acc, const float* sum, void* out, int64_t G, int64_t D, int64_t nc) {
    for (int64_t g = 0; g < G; ++g) {
        const float inv = 1.f / sum[g];
        const float* a = acc + g * nc * 16;
        for (int64_t d = 0; d < D; ++d) {
            const float y = a[d] * inv;
            if (DT == DT_F32) ((float*)out)[g * D + d] = y;
            else if (DT == DT_BF16) ((uint16_t*)out)[g * D + d] = f32_to_bf16(y);
            else ((uint16_t*)out)[g * D + d] = _cvtss_sh(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        }
    }
}

// q: [B, H, S, D] with strides (qsb, qsh, qss, 1); k, v: base pointers, strides (row, kv head,
// position, 1); L: keys in the view (positions 0..L-1); qpos: [B, S] (strides qpb, qps) query
// positions, or NULL for L - S + s in every row. task[dtype] runs one task. Returns 0, or a negative
// code for bad arguments (the Python side checks them first).
static inline int attn_run(const attn_task_fn task[3], int dtype, int64_t B, int64_t S, int64_t H, int64_t Hkv,
                           int64_t D, const void* q, int64_t qsb, int64_t qsh, int64_t qss, const void* k,
                           int64_t ksb, int64_t ksh, int64_t kst, const void* v, int64_t vsb, int64_t vsh,
                           int64_t vst, int64_t L, const int64_t* qpos, int64_t qpb, int64_t qps, int64_t window,
                           float scale, void* out, int nthreads) {
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
    const int64_t nblk = (S + ATTN_QB - 1) / ATTN_QB;
    const int64_t tasks = B * nblk * Hkv;
    if (nthreads < 1) nthreads = 1;
    if (nthreads > tasks) nthreads = (int)tasks;
    const attn_task_fn run = task[dtype];
    int err = 0;
#pragma omp parallel num_threads(nthreads)
    {
        float* buf = (float*)malloc(sizeof(float) * ATTN_QB * (G * nmax + 2 * G * nc * 16 + 16));
        if (!buf) {
#pragma omp atomic write
            err = -2;
        }
        // dynamic: in a prefill chunk later queries see more keys (which thread runs a task never
        // changes its result)
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < tasks; ++t) {
            if (!buf) continue;
            const int64_t b = t / (nblk * Hkv), i0 = t / Hkv % nblk * ATTN_QB, hk = t % Hkv;
            const int64_t i1 = i0 + ATTN_QB < S ? i0 + ATTN_QB : S;
            int64_t st[ATTN_QB], n[ATTN_QB];
            for (int64_t i = i0; i < i1; ++i) {
                const int64_t p = qpos ? qpos[b * qpb + i * qps] : L - S + i;
                st[i - i0] = window > 0 && p - window + 1 > 0 ? p - window + 1 : 0;
                n[i - i0] = p + 1 - st[i - i0];
            }
            for (int64_t i = i0; i < i1;) {  // runs of queries that start at the same key
                int64_t e = i + 1;
                while (e < i1 && st[e - i0] == st[i - i0]) ++e;
                const int64_t s0 = st[i - i0];
                const void* qb = (const char*)q + (b * qsb + i * qss + hk * G * qsh) * es;
                const void* kb = (const char*)k + (b * ksb + hk * ksh + s0 * kst) * es;
                const void* vb = (const char*)v + (b * vsb + hk * vsh + s0 * vst) * es;
                void* ob = (char*)out + (((b * S + i) * H + hk * G) * D) * es;
                float* acc = buf + ATTN_QB * G * nmax;
                run(qb, qss, kb, vb, ob, H * D, (int)(e - i), n + (i - i0), G, D, kst, vst, qsh, scale, buf, acc,
                    acc + ATTN_QB * G * nc * 16);
                i = e;
            }
        }
        free(buf);
    }
    return err;
}

// slm_attn itself, in each file: attn_run over that file's attn_queries instances.
#define SLM_ATTN_ENTRY                                                                                          \
    extern "C" int slm_attn(int dtype, int64_t B, int64_t S, int64_t H, int64_t Hkv, int64_t D, const void* q, \
                            int64_t qsb, int64_t qsh, int64_t qss, const void* k, int64_t ksb, int64_t ksh,     \
                            int64_t kst, const void* v, int64_t vsb, int64_t vsh, int64_t vst, int64_t L,       \
                            const int64_t* qpos, int64_t qpb, int64_t qps, int64_t window, float scale,         \
                            void* out, int nthreads) {                                                          \
        static const attn_task_fn task[3] = {attn_queries<DT_F32>, attn_queries<DT_BF16>, attn_queries<DT_F16>};          \
        return attn_run(task, dtype, B, S, H, Hkv, D, q, qsb, qsh, qss, k, ksb, ksh, kst, v, vsb, vsh, vst, L,  \
                        qpos, qpb, qps, window, scale, out, nthreads);                                          \
    }
