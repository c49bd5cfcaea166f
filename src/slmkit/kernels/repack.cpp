// GGUF quantized blocks -> slmkit's tiled QuantWeight layout (src/slmkit/quant/format.py), the same
// bytes as the Python repack (src/slmkit/quant/gguf_repack.py, the tested fallback) writes.
//
// Plain C++ and SSE4.1 (each type's codes a vector's worth at a time): built into both kernel
// libraries, the AVX512 one and the AVX2 one.
// It reads the file's blocks where they lie (the memory map) and writes each row's codes, scales and
// mins straight into the caller's preallocated tensors: no float or intermediate copy. OpenMP splits
// the work over 16-row tiles, so every thread writes its own tiles only, 4 at a time to whichever thread
// is free: a first load builds the tokenizer beside the repack, and with fixed halves the thread it slowed
// held up the other (16-layer Q4_K_M first load, 2 cores, 6 x 5 loads: median 0.80 vs 0.89 s).
//
// Per row r of tile t = r / 16 (j = r % 16) and code u[c] of the row (ggml's element order):
//   8-bit codes: qweight[t][c / 4][j * 4 + c % 4] = u[c]
//   4-bit codes: qweight[t][c / 8][j * 4 + c % 4] = u[c] | u[c + 4] << 4      (c % 8 < 4)
//   6 / 5-bit codes, in runs of S = 16 / 32 codes (format.py): the low 4 bits as 4-bit codes in
//   S / 8 vectors, then one vector with the rest of each code (set i = c % S / 4 at bit (b - 4) * i)
//   scales / mins: [t][group][j]; two-level supers (K-quants): [t][block][j] in float16 (the file's d
//   and -dmin, bits as stored but for the sign); two-level types with mins pair them (format.py
//   two_level_parts): a (t, group) record of 16 scales then 16
//   mins (mins = scales + 16), a (t, block) record of 16 super-scales then 16 super-mins
// Rows past n (padding to the tile) get code 0, scale 0 and min 0, as the Python repack pads.
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include "layout.h"

namespace {

struct Spec {
    int type, block, size, bits, group, scale_bytes, has_min, two_level;
};

// ggml type id, elements / bytes per block, code bits as stored, group, scale bytes (2: the file's
// float16, 1: the K-quants' small integers), mins, float16 super-scale per block
constexpr Spec SPECS[] = {
    {2, 32, 18, 4, 32, 2, 0, 0},     // Q4_0
    {3, 32, 20, 4, 32, 2, 1, 0},     // Q4_1
    {6, 32, 22, 5, 32, 2, 0, 0},     // Q5_0
    {7, 32, 24, 5, 32, 2, 1, 0},     // Q5_1
    {8, 32, 34, 8, 32, 2, 0, 0},     // Q8_0
    {12, 256, 144, 4, 32, 1, 1, 1},  // Q4_K
    {13, 256, 176, 5, 32, 1, 1, 1},  // Q5_K
    {14, 256, 210, 6, 16, 1, 0, 1},  // Q6_K
};

const Spec* find_spec(int type) {
    for (const Spec& s : SPECS)
        if (s.type == type) return &s;
    return nullptr;
}

// A float16's bits at p.
inline uint16_t half_bits(const uint8_t* p) { return (uint16_t)(p[0] | p[1] << 8); }

// One block's group scales (and mins) into sc / mn (per group, scale_bytes each), and its float16
// super-scale and super-min (K-quants): ggml's d and -dmin (the sign bit flipped: exact), as the
// Python repack forms them.
inline void block_scales(int type, const uint8_t* p, uint8_t* sc, uint8_t* mn, uint16_t* ssup, uint16_t* msup) {
    switch (type) {
        case 2:
        case 6:
        case 8:
            memcpy(sc, p, 2);
            break;
        case 3:
        case 7:
            memcpy(sc, p, 2);
            memcpy(mn, p + 2, 2);
            break;
        case 12:
        case 13: {  // 6-bit sub-scales and sub-mins packed in 12 bytes
            const uint8_t* d = p + 4;
            const uint8_t* m = p + 8;
            const uint8_t* md = p + 12;
            for (int i = 0; i < 4; ++i) {
                sc[i] = d[i] & 0x3F;
                sc[4 + i] = (uint8_t)((md[i] & 0x0F) | ((d[i] >> 2) & 0x30));
                mn[i] = m[i] & 0x3F;
                mn[4 + i] = (uint8_t)((md[i] >> 4) | ((m[i] >> 2) & 0x30));
            }
            *ssup = half_bits(p);
            *msup = (uint16_t)(half_bits(p + 2) ^ 0x8000u);
            break;
        }
        case 14:
            memcpy(sc, p + 192, 16);  // int8 sub-scales
            *ssup = half_bits(p + 208);
            break;
    }
}

// Q4_0 / Q4_1 / Q5_0 / Q5_1 rows, 16 bytes of nibbles a block at a time (SSE4.1: both builds have
// it): file byte i holds codes i (low) and i + 16 (high); our 4-bit vectors for codes 8v..8v+7 hold
// codes 8v..8v+3 low and 8v+4..8v+7 high, so vectors 0, 1 come from the low nibbles, 2, 3 from the
// high ones. Q5: a fifth vector, bit i of byte l = the fifth bit of code 4i + l (qh bit 4i + l).
// scales / mins: this row's slot of the block's group (stride 16 float16 values).
// 16 bytes of nibbles (byte i: code i low, code i + 16 high) -> our 4-bit vectors' 4 bytes for codes
// 0..7 and 8..15 (from the low nibbles) at lo, lo + 64, and 16..23, 24..31 (the high ones) at hi, hi + 64.
__attribute__((always_inline)) inline void nibble_chunks(const uint8_t* src, uint8_t* lo, uint8_t* hi) {
    const __m128i m = _mm_set1_epi8(0x0F);
    const __m128i Q = _mm_loadu_si128((const __m128i*)src);
    const __m128i L = _mm_and_si128(Q, m), H = _mm_and_si128(_mm_srli_epi16(Q, 4), m);
    // bytes 0..3 and 8..11: nibbles of codes 0..3 | 4..7 << 4, and 8..11 | 12..15 << 4
    const __m128i A = _mm_or_si128(L, _mm_slli_epi16(_mm_srli_si128(L, 4), 4));
    const __m128i B = _mm_or_si128(H, _mm_slli_epi16(_mm_srli_si128(H, 4), 4));
    const int32_t v[4] = {_mm_cvtsi128_si32(A), _mm_extract_epi32(A, 2), _mm_cvtsi128_si32(B),
                          _mm_extract_epi32(B, 2)};
    memcpy(lo, &v[0], 4);
    memcpy(lo + 64, &v[1], 4);
    memcpy(hi, &v[2], 4);
    memcpy(hi + 64, &v[3], 4);
}

// One Q6_K block's 256 codes as 16 runs of our 6-bit layout at o (3 vectors of 64 bytes a run; this
// row's 4 bytes in each). Code 128h + 32s + i (half h, quarter s, i < 32): low 4 bits from ql byte
// 64h + 32(s % 2) + i (its low nibble for s < 2, high for s >= 2), top 2 bits from qh byte 32h + i
// at bit 2s. A run of 16 codes has its nibbles in 16 consecutive ql bytes and its top bits in 16 qh bytes.
inline void q6k_runs(const uint8_t* p, uint8_t* o) {
    const __m128i m4 = _mm_set1_epi8(0x0F), m2 = _mm_set1_epi8(0x03);
    for (int r = 0; r < 16; ++r) {  // codes 16r..16r+15: h = r / 8, s = r / 2 % 4, e = r % 2
        const int h = r / 8, sq = r / 2 % 4, e = r % 2;
        const __m128i L = _mm_loadu_si128((const __m128i*)(p + 64 * h + 32 * (sq % 2) + 16 * e));
        const __m128i N = sq < 2 ? _mm_and_si128(L, m4) : _mm_and_si128(_mm_srli_epi16(L, 4), m4);
        const __m128i A = _mm_or_si128(N, _mm_slli_epi16(_mm_srli_si128(N, 4), 4));  // bytes 0..3, 8..11
        const __m128i Hq = _mm_loadu_si128((const __m128i*)(p + 128 + 32 * h + 16 * e));
        const __m128i T = _mm_and_si128(_mm_srl_epi16(Hq, _mm_cvtsi32_si128(2 * sq)), m2);
        __m128i top = _mm_or_si128(T, _mm_slli_epi16(_mm_srli_si128(T, 4), 2));
        top = _mm_or_si128(top, _mm_slli_epi16(_mm_srli_si128(T, 8), 4));
        top = _mm_or_si128(top, _mm_slli_epi16(_mm_srli_si128(T, 12), 6));
        const int32_t v[3] = {_mm_cvtsi128_si32(A), _mm_extract_epi32(A, 2), _mm_cvtsi128_si32(top)};
        for (int i = 0; i < 3; ++i) memcpy(o + (3 * r + i) * 64, &v[i], 4);
    }
}

// One Q5_K block's 256 codes as 8 runs of our 5-bit layout at o (5 vectors a run; this row's 4 bytes
// in each). Run s (codes 32s..32s+31): low 4 bits from qs bytes 32(s / 2)..+31 (low nibbles for even
// s, high for odd), the fifth bit of code 32s + j from bit s of qh byte j.
inline void q5k_runs(const uint8_t* p, uint8_t* o) {
    const __m128i m4 = _mm_set1_epi8(0x0F), m1 = _mm_set1_epi8(0x01);
    const uint8_t* qh = p + 16;
    const uint8_t* qs = p + 48;
    for (int s = 0; s < 8; ++s) {
        uint8_t* out = o + s * 5 * 64;
        for (int half = 0; half < 2; ++half) {  // codes 16 * half .. + 15 of the run: vectors 2 half, 2 half + 1
            const __m128i L = _mm_loadu_si128((const __m128i*)(qs + 32 * (s / 2) + 16 * half));
            const __m128i N = s % 2 ? _mm_and_si128(_mm_srli_epi16(L, 4), m4) : _mm_and_si128(L, m4);
            const __m128i A = _mm_or_si128(N, _mm_slli_epi16(_mm_srli_si128(N, 4), 4));
            const int32_t v[2] = {_mm_cvtsi128_si32(A), _mm_extract_epi32(A, 2)};
            memcpy(out + (2 * half) * 64, &v[0], 4);
            memcpy(out + (2 * half + 1) * 64, &v[1], 4);
        }
        const __m128i sh = _mm_cvtsi32_si128(s);
        const __m128i T0 = _mm_and_si128(_mm_srl_epi16(_mm_loadu_si128((const __m128i*)qh), sh), m1);
        const __m128i T1 = _mm_and_si128(_mm_srl_epi16(_mm_loadu_si128((const __m128i*)(qh + 16)), sh), m1);
        // bit i of byte l: code 4i + l's fifth bit (from T0 for i < 4, T1 for i >= 4)
        __m128i top = _mm_or_si128(T0, _mm_slli_epi16(_mm_srli_si128(T0, 4), 1));
        top = _mm_or_si128(top, _mm_slli_epi16(_mm_srli_si128(T0, 8), 2));
        top = _mm_or_si128(top, _mm_slli_epi16(_mm_srli_si128(T0, 12), 3));
        top = _mm_or_si128(top, _mm_slli_epi16(T1, 4));
        top = _mm_or_si128(top, _mm_slli_epi16(_mm_srli_si128(T1, 4), 5));
        top = _mm_or_si128(top, _mm_slli_epi16(_mm_srli_si128(T1, 8), 6));
        top = _mm_or_si128(top, _mm_slli_epi16(_mm_srli_si128(T1, 12), 7));
        const int32_t t = _mm_cvtsi128_si32(top);
        memcpy(out + 4 * 64, &t, 4);
    }
}

template <int TYPE>
inline void legacy_row(const uint8_t* src, int64_t blocks, uint8_t* q, uint8_t* scales, uint8_t* mins) {
    constexpr bool five = TYPE == 6 || TYPE == 7, with_min = TYPE == 3 || TYPE == 7;
    constexpr int size = TYPE == 2 ? 18 : TYPE == 3 ? 20 : TYPE == 6 ? 22 : 24;
    constexpr int head = with_min ? 4 : 2, qs_at = head + (five ? 4 : 0), vpb = five ? 5 : 4;
    for (int64_t b = 0; b < blocks; ++b) {
        const uint8_t* p = src + b * size;
        memcpy(scales + b * 32, p, 2);
        if (with_min) memcpy(mins + b * 32, p + 2, 2);
        uint8_t* o = q + b * vpb * 64;
        nibble_chunks(p + qs_at, o, o + 128);
        if (five) {
            uint32_t qh;
            memcpy(&qh, p + head, 4);
            uint8_t top[4];
            for (int l = 0; l < 4; ++l) {
                uint32_t x = 0;
                for (int i = 0; i < 8; ++i) x |= ((qh >> (4 * i + l)) & 1u) << i;
                top[l] = (uint8_t)x;
            }
            memcpy(o + 4 * 64, top, 4);
        }
    }
}

constexpr Spec spec_of(int type) {
    for (const Spec& s : SPECS)
        if (s.type == type) return s;
    return SPECS[0];
}

// One two-level (or Q8_0) block's codes straight into place: its row's 4 bytes in each of the
// block's 64-byte vectors, starting at o.
template <int TYPE>
inline void block_codes(const uint8_t* p, uint8_t* o) {
    if constexpr (TYPE == 8) {  // Q8_0: int8 q -> unsigned q + 128, 4 codes a vector
        for (int c = 0; c < 32; c += 4) {
            uint32_t w;
            memcpy(&w, p + 2 + c, 4);
            w ^= 0x80808080u;
            memcpy(o + c / 4 * 64, &w, 4);
        }
    } else if constexpr (TYPE == 12) {  // Q4_K: qs bytes 16h..16h+15 are sub-block h / 2's half h % 2
        for (int h = 0; h < 8; ++h)
            nibble_chunks(p + 16 + 16 * h, o + (8 * (h / 2) + 2 * (h % 2)) * 64, o + (8 * (h / 2) + 4 + 2 * (h % 2)) * 64);
    } else if constexpr (TYPE == 13) {
        q5k_runs(p, o);
    } else {
        q6k_runs(p, o);
    }
}

// One row (r < n: its blocks at src; r >= n: padding, all zeros) into its slots of tile t. One
// instance per type (TYPE a constant): the type switches fold away and the block loops have constant
// bounds, so the compiler unrolls and vectorizes them (a generic loop ran Q4_0 at ~0.4 GB/s).
template <int TYPE>
void repack_row(const uint8_t* src, int64_t k, int64_t t, int j, uint8_t* qweight, uint8_t* scales,
                uint8_t* mins, uint16_t* ssup, uint16_t* msup) {
    constexpr Spec s = spec_of(TYPE);
    constexpr int64_t gpb = s.block / s.group;
    const int64_t blocks = k / s.block, groups = blocks * gpb;
    constexpr int S = run_k(s.bits), vpr = run_vectors(s.bits);  // codes / vectors per run
    const int64_t chunks = tile_code_bytes(s.bits, k) / 64;      // 64-byte vectors per tile
    constexpr int P = s.two_level && s.has_min ? 2 : 1;           // paired records: twice the stride
    uint8_t* q = qweight + t * chunks * 64 + j * 4;
    if (!src) {  // padding: code 0, scale 0 and min 0 (as the Python repack pads)
        for (int64_t c = 0; c < chunks; ++c) memset(q + c * 64, 0, 4);
        for (int64_t g = 0; g < groups; ++g) {
            const int64_t at = (t * groups + g) * 16 * P + j;
            memset(scales + at * s.scale_bytes, 0, s.scale_bytes);
            if (s.has_min) memset(mins + at * s.scale_bytes, 0, s.scale_bytes);
        }
        for (int64_t b = 0; s.two_level && b < blocks; ++b) {
            ssup[(t * blocks + b) * 16 * P + j] = 0;
            if (s.has_min) msup[(t * blocks + b) * 16 * P + j] = 0;
        }
        return;
    }
    if constexpr (TYPE == 2 || TYPE == 3 || TYPE == 6 || TYPE == 7) {
        legacy_row<TYPE>(src, blocks, q, scales + (t * groups * 16 + j) * 2, mins + (t * groups * 16 + j) * 2);
    } else {
        uint8_t sc[16], mn[16];
        uint16_t ss = 0, ms = 0;
        for (int64_t b = 0; b < blocks; ++b) {
            const uint8_t* p = src + b * s.size;
            block_scales(s.type, p, sc, mn, &ss, &ms);
            block_codes<TYPE>(p, q + b * (s.block / S) * vpr * 64);
            for (int64_t g = 0; g < gpb; ++g) {
                const int64_t at = (t * groups + b * gpb + g) * 16 * P + j;
                memcpy(scales + at * s.scale_bytes, sc + g * s.scale_bytes, s.scale_bytes);
                if (s.has_min) memcpy(mins + at * s.scale_bytes, mn + g * s.scale_bytes, s.scale_bytes);
            }
            if (s.two_level) {
                ssup[(t * blocks + b) * 16 * P + j] = ss;
                if (s.has_min) msup[(t * blocks + b) * 16 * P + j] = ms;
            }
        }
    }
}

}  // namespace

// raw: n rows of k / block blocks each (the tensor's GGUF bytes); the outputs as gguf_repack.py
// allocates them: qweight [tiles, k / (8 | 4), 64], scales and mins [tiles, k / group, 16] (float16
// or one byte each), super_scales and super_mins [tiles, k / 256, 16] float16 (two-level types only;
// Q4_K and Q5_K paired: mins = scales + 16 and super_mins = super_scales + 16, every record twice as far).
// Returns 0, or -1 for a type it does not handle, -2 for a shape that does not fit the type.
extern "C" int slm_repack(const uint8_t* raw, int type, int64_t n, int64_t k, uint8_t* qweight, void* scales,
                          void* mins, void* super_scales, void* super_mins, int threads) {
    const Spec* s = find_spec(type);
    if (!s) return -1;
    if (n <= 0 || k <= 0 || k % s->block) return -2;
    const int64_t tiles = (n + 15) / 16, row_bytes = k / s->block * s->size;
    uint8_t* sc = (uint8_t*)scales;
    uint8_t* mn = (uint8_t*)mins;
    void (*row)(const uint8_t*, int64_t, int64_t, int, uint8_t*, uint8_t*, uint8_t*, uint16_t*, uint16_t*) = nullptr;
    switch (type) {
        case 2: row = repack_row<2>; break;
        case 3: row = repack_row<3>; break;
        case 6: row = repack_row<6>; break;
        case 7: row = repack_row<7>; break;
        case 8: row = repack_row<8>; break;
        case 12: row = repack_row<12>; break;
        case 13: row = repack_row<13>; break;
        default: row = repack_row<14>; break;
    }
#pragma omp parallel for num_threads(threads > 0 ? threads : 1) schedule(dynamic, 4)
    for (int64_t t = 0; t < tiles; ++t) {
        for (int j = 0; j < 16; ++j) {
            int64_t r = t * 16 + j;
            row(r < n ? raw + r * row_bytes : nullptr, k, t, j, qweight, sc, mn, (uint16_t*)super_scales,
                (uint16_t*)super_mins);
        }
    }
    return 0;
}
