// slmkit's tiled code layout (src/slmkit/quant/format.py CHUNK / code_vectors), for every
// translation unit that reads or writes it: a row tile's codes come in runs of 64-byte vectors,
// run_k(bits) inputs per run in run_vectors(bits) vectors (int8: one set of 4 codes; int4: two
// sets as nibbles; 6 / 5 bits: 2 / 4 nibble vectors and one of the codes' top bits).
#pragma once
#include <omp.h>
#include <stdint.h>

#include <atomic>

constexpr int run_k(int bits) { return bits == 8 ? 4 : bits == 4 ? 8 : bits == 6 ? 16 : 32; }
constexpr int run_vectors(int bits) { return bits == 6 ? 3 : bits == 5 ? 5 : 1; }

// Bytes of one row tile's codes over KP inputs (KP a multiple of run_k(bits)).
constexpr int64_t tile_code_bytes(int bits, int64_t KP) { return KP / run_k(bits) * run_vectors(bits) * 64; }

// From this many activation rows the kernels' threads quantize them, not the calling thread alone (serial,
// they were ~1.3% of a 512-token prefill while the other thread waited).
constexpr int PAR_PREP_ROWS = 8;

// Two-level scales (the K-quants'), kernel kinds 6 / 7 = 2 / 3 paired (format.py two_level_parts): elements
// from one (tile, group) record of sub-scales (or mins) to the next, and from one (tile, super-block) record
// of super-scales (or super-mins) to the next. Pairing keeps a tile's metadata in two streams, not four.
constexpr int record_stride(int scale_kind) { return scale_kind & 4 ? 32 : 16; }

// Scale-kind bit 8 (two-level kinds only): super-scales and super-mins in float16, as GGUF's K-quants
// store d and dmin (2 bytes a row per super-block instead of 4), else float32 (slmkit's own two-level
// quantizer, whose super-scales would be subnormal in float16).
constexpr int SUPER_F16 = 8;

// The scale-kind arguments of slm_qgemm (both builds), checked: 0, or -1. kind: 0 float32, 1 float16,
// 2 uint8 / 3 int8 x super-scale, + 4 paired with mins (record_stride), + SUPER_F16.
static inline int check_scales(int kind, const void* scales, const void* mins, const void* ss, const void* sm,
                               int64_t sbg, int64_t KP, int64_t G) {
    const int k = kind & ~SUPER_F16;
    if (kind < 0 || kind > 15 || k == 4 || k == 5 || (kind & SUPER_F16 && k < 2)) return -1;
    const int64_t es = kind & SUPER_F16 ? 2 : 4;  // bytes of a super-scale
    if (k >= 6 && (!mins || mins != (const uint8_t*)scales + 16 || sm != (const char*)ss + 16 * es)) return -1;
    if (k >= 2 && (sbg <= 0 || (KP / G) % sbg || !ss || (mins && !sm))) return -1;
    // two-level scales: <= 256 inputs a super-block, so every int32 sum is exact (qgemm.cpp super_end)
    if (k >= 2 && G * sbg > 256) return -1;
    return 0;
}

// Element i of super-scales (or super-mins) p of float16 or float32 (SUPER_F16), as a byte address.
static inline const void* super_at(const void* p, int64_t i, bool f16) { return (const char*)p + i * (f16 ? 2 : 4); }

// Two-level scales: how many powers of two finer than its super-block's a group's activation scale may be
// (quant_row). The bound keeps every super-block sum exact in int32 whatever the scale kind: 256 inputs x
// (2^bits - 1) x 127 x 255 (a uint8 sub-scale) x 2^E < 2^31: 4 bits 0.99e9 at E = 3, 5 bits 2.06e9 at 3,
// 6 bits 2.09e9 at 2, 8 bits 2.11e9 at 0 (format.py ACT_SHIFT_MAX).
constexpr int act_shift_max(int bits) { return bits == 8 ? 0 : bits == 6 ? 2 : 3; }

// The e <= E of a group of absmax gmax in a block of absmax am: the largest with gmax x 2^e <= am (exact
// float products), so the group's codes round(x * 2^e / scale) stay within the block's int8 range.
static inline int group_exp(float gmax, float am, int E) {
    int e = E;
    while (e > 0 && !(gmax * (float)(1 << e) <= am)) --e;
    return e;
}

// Whether every group's activation code sum fits int16 (|sum| <= G x 127 x 2^E, quant_row), so the kernels may
// take the mins two groups at a time (pair_sums).
static inline bool sums_fit_int16(int64_t G, int E) { return G * 127 << E < 32768; }

// A row's code sums of the groups of each super-block two by two, as int16 pairs (the second 0 past
// the block's end), at the first group's index: what the kernels' vpmaddwd / vpdpwssd of paired mins
// take (qgemm_avx2.cpp min_pairs, qgemm.cpp super_end). Once a call, for all tiles.
static inline void pair_sums(const int32_t* xs, int64_t ng, int64_t sbg, int32_t* xp) {
    for (int64_t g = 0; g < ng; ++g) {
        const bool first = (g % sbg) % 2 == 0, two = (g % sbg) + 1 < sbg;
        xp[g] = first ? (int32_t)((uint32_t)(uint16_t)xs[g] | (two ? (uint32_t)(uint16_t)xs[g + 1] << 16 : 0u)) : 0;
    }
}

// From this many activation rows a matmul's blocks of row tiles go to whichever thread is free, one at a time
// from a shared counter, instead of each thread a fixed half: one slower thread (a busy or an efficiency core,
// a VM's noisy neighbour) otherwise left the other waiting at the end of every matmul (Phi-3-mini Q4_K_M
// 512-token prefill, Zen 4 VM, 2 threads, 15 interleaved rounds: median 129 -> 143 tok/s). Fewer rows (decode,
// a few speculative rows) keep the contiguous halves: their blocks take microseconds, and each thread's
// weights stream in order.
constexpr int SHARED_BLOCK_ROWS = 8;

// A matmul's blocks, handed out (BlockCursor) one at a time from a counter where the call has at least
// SHARED_BLOCK_ROWS activation rows, else as contiguous shares. Made once per call, before its parallel region.
struct BlockQueue {
    std::atomic<int64_t> next{0};
    const bool shared;
    explicit BlockQueue(int64_t rows) : shared(rows >= SHARED_BLOCK_ROWS) {}
};

// The blocks [0, n) of q one thread of a parallel region runs: from q's counter one at a time, or a
// contiguous share as omp for schedule(static) splits them.
struct BlockCursor {
    BlockQueue& q;
    int64_t b, end;
    BlockCursor(BlockQueue& queue, int64_t n) : q(queue), b(0), end(n) {
        if (q.shared) {
            b = q.next.fetch_add(1, std::memory_order_relaxed);
            return;
        }
        const int64_t nth = omp_get_num_threads(), per = (n + nth - 1) / nth;
        b = omp_get_thread_num() * per;
        end = b + per < n ? b + per : n;
    }
    bool more() const { return b < end; }
    void next() { b = q.shared ? q.next.fetch_add(1, std::memory_order_relaxed) : b + 1; }
};
