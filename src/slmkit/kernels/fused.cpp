// Gemma 3's and Phi-3's small per-token ops, and their whole decode steps, in one call each.
//
// A decode step of the built-in model (Gemma 3 270M, 18 layers) spends most of its time on fixed
// per-op costs (a Python call, a torch dispatch, a temporary) around ~140 tiny quantized matmuls
// and ~110 norms, not on arithmetic. slm_gemma3_decode runs every layer of one token in one call:
// the norms, RoPE, the KV-cache write and the GeGLU here, the matmuls through slm_qgemm and the
// attention through slm_attn (the same entry points, so the same bits, as the per-op path).
//
// The per-op path (models/gemma3.py) runs its norms and GeGLU through slm_rms_norm / slm_geglu,
// which call the very functions the step calls (rms_rows, geglu_rows: one copy of each, never
// inlined), and its RoPE and residual adds are single float32 operations rounded to the activation
// dtype, as here. So a token gets the same bits through either path, alone or batched, in a decode
// step or a prefill chunk: greedy decoding stays batch-invariant.
//
// Portable C++ (no intrinsics): built into both libraries, AVX512 and AVX2, with their flags.
// Activations are float32 (dtype 0) or bfloat16 (1); norm weights float32 or bfloat16.
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

// qgemm.cpp / qgemm_avx2.cpp and attn.cpp / attn_avx2.cpp: the argument lists must stay the same
extern "C" int slm_qgemm(const void* x, int x_bf16, int64_t M, int64_t K, int64_t ldx, const uint8_t* qw,
                         const void* scales, const void* mins, int scale_kind, const void* super_scales,
                         const void* super_mins, int64_t sbg, int bits, int64_t tiles, int64_t KP, int64_t G,
                         int zero, int64_t N, void* out, int out_bf16, int64_t ldo, int nthreads);
extern "C" int slm_attn(int dtype, int64_t B, int64_t S, int64_t H, int64_t Hkv, int64_t D, const void* q,
                        int64_t qsb, int64_t qsh, int64_t qss, const void* k, int64_t ksb, int64_t ksh, int64_t kst,
                        const void* v, int64_t vsb, int64_t vsh, int64_t vst, int64_t L, const int64_t* qpos,
                        int64_t qpb, int64_t qps, int64_t window, float scale, void* out, int nthreads);

static const int64_t SMALL_WORK = 1 << 18;  // kernels/qgemm.py threads_for: one thread below this

static inline float ld(const void* p, int dt, int64_t i) {
    return dt ? bf16_to_f32(((const uint16_t*)p)[i]) : ((const float*)p)[i];
}

static inline void st(void* p, int dt, int64_t i, float v) {
    if (dt) ((uint16_t*)p)[i] = f32_to_bf16(v);
    else ((float*)p)[i] = v;
}

static inline float bits_to_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline float rnd(int dt, float v) { return dt ? bf16_to_f32(f32_to_bf16(v)) : v; }

// One row x [n] -> out, h = x * (1 / sqrt(sum(x^2) / n + eps)); y = h * (offset + w) (float32,
// rounded once to dt), then with a residual r: y = r + y (rounded to dt again), as `r + norm(x)` does
// in the model. The sum of squares runs in 16 fixed lanes, combined pairwise: the same order for
// every row. The dtypes are template arguments so the compiler vectorizes the lanes (the same
// operations per lane, so the same bits as one lane at a time).
// LLAMA (Llama / Phi: transformers' LlamaRMSNorm): h rounded to dt first, then y = w * h (rounded
// to dt); offset and a residual are Gemma's only.
template <int DT, int WDT, int LLAMA>
static inline void rms_row(const void* x, int64_t n, const void* w, float offset, float eps, const void* res,
                           void* out) {
    float acc[16] = {0};
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int l = 0; l < 16; ++l) {
            const float v = ld(x, DT, i + l);
            acc[l] += v * v;
        }
    for (int l = 0; i + l < n; ++l) {
        const float v = ld(x, DT, i + l);
        acc[l] += v * v;
    }
    for (int width = 8; width >= 1; width /= 2)
        for (int l = 0; l < width; ++l) acc[l] += acc[l + width];
    const float inv = 1.0f / sqrtf(acc[0] / (float)n + eps);
    if (LLAMA)
        for (int64_t j = 0; j < n; ++j) st(out, DT, j, ld(w, WDT, j) * rnd(DT, ld(x, DT, j) * inv));
    else if (res)
        for (int64_t j = 0; j < n; ++j)
            st(out, DT, j, rnd(DT, ld(x, DT, j) * inv * (offset + ld(w, WDT, j))) + ld(res, DT, j));
    else
        for (int64_t j = 0; j < n; ++j) st(out, DT, j, ld(x, DT, j) * inv * (offset + ld(w, WDT, j)));
}

// rows x [rows, n] (row stride ldx) -> out (row stride ldo): rms_row on each.
__attribute__((noinline)) static void rms_rows(const void* x, int64_t ldx, int64_t rows, int64_t n, int dt,
                                               const void* w, int wdt, float offset, float eps,
                                               const void* res, int64_t ldr, void* out, int64_t ldo,
                                               int llama = 0) {
    const size_t es = dt ? 2 : 4;
    for (int64_t r = 0; r < rows; ++r) {
        const void* xr = (const char*)x + es * r * ldx;
        const void* rr = res ? (const char*)res + es * r * ldr : nullptr;
        void* o = (char*)out + es * r * ldo;
        if (llama) {
            if (dt && wdt) rms_row<1, 1, 1>(xr, n, w, 0, eps, nullptr, o);
            else if (dt) rms_row<1, 0, 1>(xr, n, w, 0, eps, nullptr, o);
            else if (wdt) rms_row<0, 1, 1>(xr, n, w, 0, eps, nullptr, o);
            else rms_row<0, 0, 1>(xr, n, w, 0, eps, nullptr, o);
        } else if (dt && wdt) rms_row<1, 1, 0>(xr, n, w, offset, eps, rr, o);
        else if (dt) rms_row<1, 0, 0>(xr, n, w, offset, eps, rr, o);
        else if (wdt) rms_row<0, 1, 0>(xr, n, w, offset, eps, rr, o);
        else rms_row<0, 0, 0>(xr, n, w, offset, eps, rr, o);
    }
}

// tanh(y) = 1 - 2 / (exp(2y) + 1), exp (exp_approx) from a degree-6 polynomial on [-ln2/2, ln2/2] scaled by 2^k
// (Cephes' expf coefficients): branch-free, so the GeGLU loop vectorizes (libm's tanhf made it
// ~14 us per layer). Absolute error ~1e-7, which is what 1 + tanh in the GELU needs.
static inline float exp_approx(float x) {  // x in [-87, 87]
    const float k = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest (1.5 * 2^23)
    const float r = (x - k * 0.693359375f) - k * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    return (p * (r * r) + r + 1.0f) * bits_to_f32((uint32_t)((int32_t)k + 127) << 23);
}

static inline float tanh_approx(float y) {
    y = y < -10.0f ? -10.0f : (y > 10.0f ? 10.0f : y);  // tanh is +-1 in float32 beyond 9.01
    return 1.0f - 2.0f / (exp_approx(2.0f * y) + 1.0f);
}

// out = gelu_tanh(gate) * up, each rounded to dt as the model's `act(gate) * up` rounds them.
template <int DT>
static inline void geglu_row(const void* gate, const void* up, int64_t n, void* out) {
    const float beta = 0.7978845608028654f, kappa = 0.044715f;  // sqrt(2 / pi), as torch's tanh gelu
    for (int64_t i = 0; i < n; ++i) {
        const float g = ld(gate, DT, i);
        const float inner = beta * (g + kappa * (g * g * g));
        const float a = rnd(DT, 0.5f * g * (1.0f + tanh_approx(inner)));
        st(out, DT, i, a * ld(up, DT, i));
    }
}

__attribute__((noinline)) static void geglu_rows(const void* gate, const void* up, int64_t n, int dt, void* out) {
    if (dt) geglu_row<1>(gate, up, n, out);
    else geglu_row<0>(gate, up, n, out);
}

// out = silu(gate) * up, each rounded to dt as the model's `up * act(gate)` rounds them (silu(g) =
// g / (1 + exp(-g)), exp_approx's relative error ~1e-7, as torch's own float32 silu).
template <int DT>
static inline void silu_row(const void* gate, const void* up, int64_t n, void* out) {
    for (int64_t i = 0; i < n; ++i) {
        const float g = ld(gate, DT, i), e = -g < -87.0f ? -87.0f : (-g > 87.0f ? 87.0f : -g);
        st(out, DT, i, rnd(DT, g / (1.0f + exp_approx(e))) * ld(up, DT, i));
    }
}

// rows of gate and up (row stride ld elements) -> out [rows, n] contiguous
__attribute__((noinline)) static void silu_rows(const void* gate, const void* up, int64_t ld_, int64_t rows,
                                                int64_t n, int dt, void* out) {
    const size_t es = dt ? 2 : 4;
    for (int64_t r = 0; r < rows; ++r) {
        if (dt) silu_row<1>((const char*)gate + es * r * ld_, (const char*)up + es * r * ld_, n, (char*)out + es * r * n);
        else silu_row<0>((const char*)gate + es * r * ld_, (const char*)up + es * r * ld_, n, (char*)out + es * r * n);
    }
}

// One head x [D] in place: its first rd dims as x * cos + rotate_half(x) * sin, each product and the sum
// rounded to DT (as torch's ops on that dtype); the dtype a template argument so the loop vectorizes.
template <int DT>
static void rope_head(void* __restrict x, const void* __restrict cs, const void* __restrict sn, int64_t half) {
    for (int64_t i = 0; i < half; ++i) {
        const float x1 = ld(x, DT, i), x2 = ld(x, DT, i + half);
        st(x, DT, i, rnd(DT, x1 * ld(cs, DT, i)) + rnd(DT, -x2 * ld(sn, DT, i)));
        st(x, DT, i + half, rnd(DT, x2 * ld(cs, DT, i + half)) + rnd(DT, x1 * ld(sn, DT, i + half)));
    }
}

// x [heads, D] in place: x * cos + rotate_half(x) * sin on its first rd dims (cos, sin [rd]; the
// rest as it is: partial rotary), each product and the sum rounded to dt.
static void rope_heads(void* x, int64_t heads, int64_t D, int dt, const void* cs, const void* sn, int64_t rd) {
    const size_t es = dt ? 2 : 4;
    for (int64_t h = 0; h < heads; ++h) {
        if (dt) rope_head<1>((char*)x + es * h * D, cs, sn, rd / 2);
        else rope_head<0>((char*)x + es * h * D, cs, sn, rd / 2);
    }
}

// The per-op entry points (a prefill's many rows: split over torch's threads in whole rows or
// 4096-element chunks; which thread computes an element never changes its bits).
static const int64_t SPLIT = 1 << 16;  // elements below which one thread does it all

extern "C" int slm_rms_norm(int dt, int64_t rows, int64_t n, const void* x, int64_t ldx, const void* w, int wdt,
                            float offset, float eps, const void* res, int64_t ldr, void* out, int64_t ldo,
                            int llama) {
    if (dt < 0 || dt > 1 || wdt < 0 || wdt > 1 || n < 1 || rows < 0 || (llama && res)) return -1;
    if (rows < 2 || rows * n < SPLIT) {
        rms_rows(x, ldx, rows, n, dt, w, wdt, offset, eps, res, ldr, out, ldo, llama);
        return 0;
    }
    const size_t es = dt ? 2 : 4;
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; ++r)
        rms_rows((const char*)x + es * r * ldx, ldx, 1, n, dt, w, wdt, offset, eps,
                 res ? (const char*)res + es * r * ldr : nullptr, ldr, (char*)out + es * r * ldo, ldo, llama);
    return 0;
}

extern "C" int slm_silu_mul(int dt, int64_t rows, int64_t n, const void* gate, const void* up, int64_t ld_,
                            void* out) {
    if (dt < 0 || dt > 1 || n < 0 || rows < 0 || ld_ < n) return -1;
    if (rows < 2 || rows * n < SPLIT) {
        silu_rows(gate, up, ld_, rows, n, dt, out);
        return 0;
    }
    const size_t es = dt ? 2 : 4;
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; ++r)
        silu_rows((const char*)gate + es * r * ld_, (const char*)up + es * r * ld_, ld_, 1, n, dt,
                  (char*)out + es * r * n);
    return 0;
}

extern "C" int slm_geglu(int dt, int64_t n, const void* gate, const void* up, void* out) {
    if (dt < 0 || dt > 1 || n < 0) return -1;
    if (n < SPLIT) {
        geglu_rows(gate, up, n, dt, out);
        return 0;
    }
    const size_t es = dt ? 2 : 4;
    const int64_t chunk = 4096, chunks = (n + chunk - 1) / chunk;
#pragma omp parallel for schedule(static)
    for (int64_t c = 0; c < chunks; ++c) {
        const int64_t i = c * chunk, m = n - i < chunk ? n - i : chunk;
        geglu_rows((const char*)gate + es * i, (const char*)up + es * i, m, dt, (char*)out + es * i);
    }
    return 0;
}

// models/rope.py apply_rope through the kernel (the per-op path; the same rope_heads as the fused steps,
// so the same bits as torch's ops on x's dtype): x [B, H, S, D] of any strides (last dim contiguous) ->
// out [B, H, S, D] contiguous, its first rd dims rotated by cos, sin [S, rd], shared by the rows (csb 0)
// or csb elements apart from one row to the next.
extern "C" int slm_rope(int dt, int64_t B, int64_t H, int64_t S, int64_t D, int64_t rd, const void* x, int64_t xsb,
                        int64_t xsh, int64_t xss, const void* cs, const void* sn, int64_t csb, void* out) {
    if (dt < 0 || dt > 1 || rd % 2 || rd < 2 || rd > D || B < 0 || H < 0 || S < 0) return -1;
    const size_t es = dt ? 2 : 4;
    const int64_t rows = B * H * S;
#pragma omp parallel for schedule(static) if (rows * D >= SPLIT)
    for (int64_t i = 0; i < rows; ++i) {
        const int64_t b = i / (H * S), h = i / S % H, s = i % S;
        char* o = (char*)out + es * i * D;
        memcpy(o, (const char*)x + es * (b * xsb + h * xsh + s * xss), es * D);
        const int64_t c = b * csb + s * rd;
        rope_heads(o, 1, D, dt, (const char*)cs + es * c, (const char*)sn + es * c, rd);
    }
    return 0;
}

// One layer's quantized linear: slm_qgemm's 15 weight arguments (kernels/qgemm.py qgemm_weight_args:
// K, ldx, qweight, scales, mins, scale_kind, super_scales, super_mins, per_super, bits, tiles, KP,
// group, zero, N) as int64, pointers included.
static int qmm(const int64_t* a, const void* x, int dt, void* out, int nthreads, int64_t M = 1) {
    const int64_t K = a[0], N = a[14];
    return slm_qgemm(x, dt, M, K, a[1], (const uint8_t*)a[2], (const void*)a[3], (const void*)a[4], (int)a[5],
                     (const void*)a[6], (const void*)a[7], a[8], (int)a[9], a[10], a[11], a[12], (int)a[13], N,
                     out, dt, N, M * K * N < SMALL_WORK ? 1 : nthreads);
}

// Two linears of the same input at once, one thread each (nested slm_qgemm calls run on their
// caller's thread): where each alone would leave the second core idle (k and v, below SMALL_WORK)
// or wait at its own fork / join. Which thread computes an output never changes its bits.
static int qmm_pair(const int64_t* a, void* oa, const int64_t* b, void* ob, const void* x, int dt, int nthreads,
                    int64_t M = 1) {
    if (nthreads < 2) {
        const int rc = qmm(a, x, dt, oa, 1, M);
        return rc ? rc : qmm(b, x, dt, ob, 1, M);
    }
    int rc[2] = {0, 0};
#pragma omp parallel num_threads(2)
    {
        const int t = omp_get_thread_num();
        rc[t] = t ? qmm(b, x, dt, ob, 1, M) : qmm(a, x, dt, oa, 1, M);
    }
    return rc[0] ? rc[0] : rc[1];
}

enum { Q, K_, V, O, GATE, UP, DOWN, NLIN };
enum { N_IN, N_Q, N_K, N_POST_ATTN, N_PRE_FF, N_POST_FF, NNORM };
static const int64_t LAYER_WORDS = NLIN * 15 + NNORM + 2;  // + window, uses the local rope

// S new tokens of one row through every layer of a Gemma 3 decoder: h [S, hidden] (dt) in place (a
// decode step: S = 1; a speculative verification: the pending token and its drafts). layers: n_layers
// rows of LAYER_WORDS int64 (7 x 15 linear arguments in the order q, k, v, o, gate, up, down; 6 norm
// weight pointers: input, q, k, post-attention, pre-feedforward, post-feedforward; the sliding
// window, 0 for none; 1 where the layer uses the local rotary table). kv: per layer its key and value
// cache, [n_kv, cap, D] each (one row), written at positions pos..pos + S - 1; token s attends to
// positions 0..pos + s. rope: cos, sin of the global table, then of the local one, [S, D] each (the
// rows of positions pos..). Then the final norm (weight final_w) of h into normed [S, hidden]. Every
// token gets the bits it gets alone (each op is row by row, the matmuls and attention batch-invariant).
// Returns 0, or the first failing call's code.
extern "C" int slm_gemma3_decode(int dt, int64_t n_layers, int64_t hidden, int64_t heads, int64_t kv_heads,
                                 int64_t D, int64_t inter, const int64_t* layers, const int64_t* kv, int64_t cap,
                                 int64_t pos, int64_t S, const void* const* rope, int wdt,
                                 float offset, float eps, float scale, void* h, const void* final_w, void* normed,
                                 int nthreads) {
    if (dt < 0 || dt > 1 || wdt < 0 || wdt > 1 || D % 2 || pos < 0 || S < 1 || pos + S > cap || heads % kv_heads)
        return -1;
    const size_t es = dt ? 2 : 4;
    const int64_t qn = heads * D, kn = kv_heads * D;
    char* buf = (char*)malloc(es * (size_t)(S * (hidden * 2 + qn * 2 + kn * 2 + inter * 3)));
    if (!buf) return -2;
    char* x = buf;                      // [S, hidden] a norm's output
    char* o = x + es * S * hidden;      // [S, hidden] a block's output
    char* q = o + es * S * hidden;      // [S, heads * D]
    char* att = q + es * S * qn;        // [S, heads * D] attention output
    char* k = att + es * S * qn;        // [S, kv_heads * D]
    char* v = k + es * S * kn;
    char* g = v + es * S * kn;          // [S, inter] gate, up, then gelu(gate) * up
    char* u = g + es * S * inter;
    char* a = u + es * S * inter;
    int rc = 0;
    for (int64_t l = 0; l < n_layers && !rc; ++l) {
        const int64_t* p = layers + l * LAYER_WORDS;
        const int64_t* lin = p;
        const void* const* nw = (const void* const*)(p + NLIN * 15);
        const int64_t window = p[NLIN * 15 + NNORM];
        const char* cs = (const char*)rope[p[NLIN * 15 + NNORM + 1] ? 2 : 0];
        const char* sn = (const char*)rope[p[NLIN * 15 + NNORM + 1] ? 3 : 1];
        rms_rows(h, hidden, S, hidden, dt, nw[N_IN], wdt, offset, eps, nullptr, 0, x, hidden);
        if ((rc = qmm(lin + Q * 15, x, dt, q, nthreads, S)) ||
            (rc = qmm_pair(lin + K_ * 15, k, lin + V * 15, v, x, dt, nthreads, S)))
            break;
        rms_rows(q, D, S * heads, D, dt, nw[N_Q], wdt, offset, eps, nullptr, 0, q, D);
        rms_rows(k, D, S * kv_heads, D, dt, nw[N_K], wdt, offset, eps, nullptr, 0, k, D);
        char* kc = (char*)kv[2 * l];
        char* vc = (char*)kv[2 * l + 1];
        for (int64_t s = 0; s < S; ++s) {
            rope_heads(q + es * s * qn, heads, D, dt, cs + es * s * D, sn + es * s * D, D);
            rope_heads(k + es * s * kn, kv_heads, D, dt, cs + es * s * D, sn + es * s * D, D);
            for (int64_t j = 0; j < kv_heads; ++j) {  // cache [n_kv, cap, D]: head j at position pos + s
                memcpy(kc + es * ((j * cap + pos + s) * D), k + es * (s * kn + j * D), es * D);
                memcpy(vc + es * ((j * cap + pos + s) * D), v + es * (s * kn + j * D), es * D);
            }
        }
        const int64_t L = pos + S;  // query s sits at L - S + s
        rc = slm_attn(dt, 1, S, heads, kv_heads, D, q, S * qn, D, qn, kc, kv_heads * cap * D, cap * D, D, vc,
                      kv_heads * cap * D, cap * D, D, L, nullptr, 0, 0, window, scale, att,
                      S * heads * L * D < SMALL_WORK ? 1 : nthreads);
        if (rc || (rc = qmm(lin + O * 15, att, dt, o, nthreads, S))) break;
        rms_rows(o, hidden, S, hidden, dt, nw[N_POST_ATTN], wdt, offset, eps, h, hidden, h, hidden);
        rms_rows(h, hidden, S, hidden, dt, nw[N_PRE_FF], wdt, offset, eps, nullptr, 0, x, hidden);
        if ((rc = qmm_pair(lin + GATE * 15, g, lin + UP * 15, u, x, dt, nthreads, S))) break;
        geglu_rows(g, u, S * inter, dt, a);
        if ((rc = qmm(lin + DOWN * 15, a, dt, o, nthreads, S))) break;
        rms_rows(o, hidden, S, hidden, dt, nw[N_POST_FF], wdt, offset, eps, h, hidden, h, hidden);
    }
    if (!rc) rms_rows(h, hidden, S, hidden, dt, final_w, wdt, offset, eps, nullptr, 0, normed, hidden);
    free(buf);
    return rc;
}

enum { P_QKV, P_O, P_GATE_UP, P_DOWN, P_NLIN };
static const int64_t PHI3_LAYER_WORDS = P_NLIN * 15 + 2;  // + the input and post-attention norm weights

// S new tokens of one row through every layer of a Phi-3 decoder (transformers' Phi3DecoderLayer:
// pre-norm, fused qkv and gate_up), as slm_gemma3_decode does for Gemma 3: h [S, hidden] (dt) in
// place; layers: n_layers rows of PHI3_LAYER_WORDS int64 (4 x 15 linear arguments: qkv, o, gate_up,
// down; the 2 norm weight pointers); kv: per layer its key and value cache [n_kv, cap, D], written at
// pos..pos + S - 1; cos, sin [S, rd] (rd <= D rotary dims: partial rotary leaves the rest); window:
// the sliding window, 0 for none. Then the final norm (final_w) of h into normed [S, hidden].
extern "C" int slm_phi3_decode(int dt, int64_t n_layers, int64_t hidden, int64_t heads, int64_t kv_heads,
                               int64_t D, int64_t rd, int64_t inter, const int64_t* layers, const int64_t* kv,
                               int64_t cap, int64_t pos, int64_t S, const void* cs, const void* sn, int wdt,
                               float eps, float scale, int64_t window, void* h, const void* final_w, void* normed,
                               int nthreads) {
    if (dt < 0 || dt > 1 || wdt < 0 || wdt > 1 || rd % 2 || rd > D || rd < 2 || pos < 0 || S < 1 || pos + S > cap
        || heads % kv_heads || window < 0)
        return -1;
    const size_t es = dt ? 2 : 4;
    const int64_t qn = heads * D, kn = kv_heads * D, W = qn + 2 * kn;
    char* buf = (char*)malloc(es * (size_t)(S * (hidden * 2 + W + qn + inter * 3)));
    if (!buf) return -2;
    char* x = buf;                     // [S, hidden] a norm's output
    char* o = x + es * S * hidden;     // [S, hidden] a block's output
    char* qkv = o + es * S * hidden;   // [S, W]: q | k | v per token
    char* att = qkv + es * S * W;      // [S, heads * D]
    char* gu = att + es * S * qn;      // [S, 2 * inter]: gate | up per token
    char* a = gu + es * S * 2 * inter; // [S, inter] silu(gate) * up
    int rc = 0;
    for (int64_t l = 0; l < n_layers && !rc; ++l) {
        const int64_t* lin = layers + l * PHI3_LAYER_WORDS;
        const void* const* nw = (const void* const*)(lin + P_NLIN * 15);
        rms_rows(h, hidden, S, hidden, dt, nw[0], wdt, 0, eps, nullptr, 0, x, hidden, 1);
        if ((rc = qmm(lin + P_QKV * 15, x, dt, qkv, nthreads, S))) break;
        char* kc = (char*)kv[2 * l];
        char* vc = (char*)kv[2 * l + 1];
        for (int64_t s = 0; s < S; ++s) {
            char* q = qkv + es * s * W;
            rope_heads(q, heads, D, dt, (const char*)cs + es * s * rd, (const char*)sn + es * s * rd, rd);
            rope_heads(q + es * qn, kv_heads, D, dt, (const char*)cs + es * s * rd, (const char*)sn + es * s * rd,
                       rd);
            for (int64_t j = 0; j < kv_heads; ++j) {  // cache [n_kv, cap, D]: head j at position pos + s
                memcpy(kc + es * ((j * cap + pos + s) * D), q + es * (qn + j * D), es * D);
                memcpy(vc + es * ((j * cap + pos + s) * D), q + es * (qn + kn + j * D), es * D);
            }
        }
        const int64_t L = pos + S;  // query s sits at L - S + s
        rc = slm_attn(dt, 1, S, heads, kv_heads, D, qkv, S * W, D, W, kc, kv_heads * cap * D, cap * D, D, vc,
                      kv_heads * cap * D, cap * D, D, L, nullptr, 0, 0, window, scale, att,
                      S * heads * L * D < SMALL_WORK ? 1 : nthreads);
        if (rc || (rc = qmm(lin + P_O * 15, att, dt, o, nthreads, S))) break;
        for (int64_t i = 0; i < S * hidden; ++i) st(h, dt, i, ld(h, dt, i) + ld(o, dt, i));
        rms_rows(h, hidden, S, hidden, dt, nw[1], wdt, 0, eps, nullptr, 0, x, hidden, 1);
        if ((rc = qmm(lin + P_GATE_UP * 15, x, dt, gu, nthreads, S))) break;
        silu_rows(gu, gu + es * inter, 2 * inter, S, inter, dt, a);
        if ((rc = qmm(lin + P_DOWN * 15, a, dt, o, nthreads, S))) break;
        for (int64_t i = 0; i < S * hidden; ++i) st(h, dt, i, ld(h, dt, i) + ld(o, dt, i));
    }
    if (!rc) rms_rows(h, hidden, S, hidden, dt, final_w, wdt, 0, eps, nullptr, 0, normed, hidden, 1);
    free(buf);
    return rc;
}

// The index of the first largest of x[0..n) (float32), as torch.argmax gives it: a greedy step's
// choice over a 262144-token vocabulary in one thread, no fork / join. -1 where the row has a NaN
// or its largest is not finite (+inf, or every entry -inf): sampling.finite_choice's cases.
typedef float f8v __attribute__((vector_size(32)));  // GCC / Clang vectors: ymm in both builds
typedef int32_t i8v __attribute__((vector_size(32)));

extern "C" int64_t slm_argmax(const float* x, int64_t n) {
    if (n < 1) return -1;
    f8v m = -INFINITY - (f8v){};
    i8v bad = {};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        f8v v;
        memcpy(&v, x + i, sizeof v);
        m = v > m ? v : m;
        bad |= v != v;
    }
    float best = -INFINITY;
    int nan = 0;
    for (int l = 0; l < 8; ++l) best = m[l] > best ? m[l] : best, nan |= bad[l];
    for (; i < n; ++i) best = x[i] > best ? x[i] : best, nan |= x[i] != x[i];
    if (nan || !isfinite(best)) return -1;
    for (i = 0; i + 8 <= n; i += 8) {  // the first block holding it, then the first in that block
        f8v v;
        memcpy(&v, x + i, sizeof v);
        const i8v hit = v == best;
        int any = 0;
        for (int l = 0; l < 8; ++l) any |= hit[l];
        if (any) break;
    }
    for (; i < n; ++i)
        if (x[i] == best) return i;
    return -1;
}
