// A small program over a kernel library's C entry points (no Python, no torch), for running the AVX2
// kernels under an emulated CPU without AVX512 (qemu-x86_64 -cpu Haswell): `kernel_driver LIB`
// prints "supported N", then one line per call, "name hash" (FNV-1a of the output bytes), on inputs
// from a fixed pseudo-random sequence; `--force` calls the kernels even where slm_supported() says
// no (to show that an AVX512 library then dies of SIGILL under the emulator: the check can fail).
// Built without any -m flag: the driver itself is plain x86-64.
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <vector>

static uint64_t rng = 88172645463325252ull;
static uint32_t next() {
    rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
    return (uint32_t)(rng >> 16);
}
static float uni() { return (float)(next() % 20001) / 10000.f - 1.f; }  // [-1, 1]
static uint16_t half() { return (uint16_t)((next() & 0x8000) | (0x2c00 + next() % 0x1000)); }  // |x| in [1/16, 1/2)
static uint16_t bf16(float f) { uint32_t u; memcpy(&u, &f, 4); return (uint16_t)(u >> 16); }

static uint64_t fnv(const void* p, size_t n) {
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; ++i) h = (h ^ ((const uint8_t*)p)[i]) * 1099511628211ull;
    return h;
}

typedef int (*qgemm_t)(const void*, int, int64_t, int64_t, int64_t, const uint8_t*, const void*, const void*, int,
                       const void*, const void*, int64_t, int, int64_t, int64_t, int64_t, int, int64_t, void*, int,
                       int64_t, int);
typedef int (*attn_t)(int, int64_t, int64_t, int64_t, int64_t, int64_t, const void*, int64_t, int64_t, int64_t,
                      const void*, int64_t, int64_t, int64_t, const void*, int64_t, int64_t, int64_t, int64_t,
                      const int64_t*, int64_t, int64_t, int64_t, float, void*, int);
typedef int (*fpacked_t)(const void*, int64_t, int64_t, int64_t, const uint8_t*, int, int64_t, int64_t, const void*,
                         void*, int64_t, int);
typedef int (*frows_t)(const void*, int64_t, int64_t, int64_t, const void*, int64_t, int, int64_t, const void*, void*,
                       int64_t, int);

// n values of dtype dt (0 float32, 1 bfloat16, 2 float16) as bytes
static std::vector<uint8_t> values(size_t n, int dt) {
    std::vector<uint8_t> b(n * (dt ? 2 : 4));
    for (size_t i = 0; i < n; ++i) {
        if (dt == 0) { float f = uni(); memcpy(&b[4 * i], &f, 4); }
        else { uint16_t h = dt == 1 ? bf16(uni()) : half(); memcpy(&b[2 * i], &h, 2); }
    }
    return b;
}

int main(int argc, char** argv) {
    if (argc < 2) return 2;
    void* lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (!lib) { fprintf(stderr, "%s\n", dlerror()); return 3; }
    int (*supported)(void) = (int (*)(void))dlsym(lib, "slm_supported");
    const int ok = supported();
    printf("supported %d\n", ok);
    if (!ok && !(argc > 2 && !strcmp(argv[2], "--force"))) return 0;
    qgemm_t qgemm = (qgemm_t)dlsym(lib, "slm_qgemm");
    attn_t attn = (attn_t)dlsym(lib, "slm_attn");
    fpacked_t fpacked = (fpacked_t)dlsym(lib, "slm_fgemm_packed");
    frows_t frows = (frows_t)dlsym(lib, "slm_fgemm_rows");
    int (*pairs)(int) = (int (*)(int))dlsym(lib, "slm_fgemm_pairs");
    // qgemm: every bit width x scale kind x mins, decode and prefill M, 1 and 2 threads
    const int64_t N = 40, K = 500, KP = 512, G = 32, tiles = 3, ng = KP / G, sbg = 8;
    for (int bits : {4, 5, 6, 8})
        for (int kind : {0, 1, 2, 3, 6, 7, 10, 11, 14, 15})  // 6, 7: 2, 3 paired (format.py); + 8: float16 supers
            for (int mins = (kind & 7) >= 6; mins < 2; ++mins)
                for (int64_t M : {1, 2, 5}) {
                    std::vector<uint8_t> qw(tiles * KP * (bits == 8 ? 16 : bits * 2));  // 64-byte vectors: format.py
                    for (auto& c : qw) c = (uint8_t)next();
                    const size_t nsc = tiles * ng * 16;
                    std::vector<uint8_t> sc(nsc * 4), mn(nsc * 4);
                    for (size_t i = 0; i < nsc; ++i) {
                        if (kind == 0) { float f = uni() * 0.02f; memcpy(&sc[4 * i], &f, 4); f = uni() * 0.05f; memcpy(&mn[4 * i], &f, 4); }
                        else if (kind == 1) { uint16_t h = half(); memcpy(&sc[2 * i], &h, 2); h = half(); memcpy(&mn[2 * i], &h, 2); }
                        else { sc[i] = (uint8_t)((kind & 7) == 3 ? next() % 64 - 32 : next() % 64); mn[i] = (uint8_t)(next() % 64); }
                    }
                    const size_t nss = tiles * (ng / sbg) * 16, es = kind & 8 ? 2 : 4;  // super-scales, their bytes
                    std::vector<uint8_t> ss(nss * es), sm(nss * es);
                    for (size_t i = 0; i < nss; ++i) {
                        if (es == 2) { uint16_t h = half(); memcpy(&ss[2 * i], &h, 2); h = half(); memcpy(&sm[2 * i], &h, 2); }
                        else { float f = uni() * 0.01f; memcpy(&ss[4 * i], &f, 4); f = uni() * 0.01f; memcpy(&sm[4 * i], &f, 4); }
                    }
                    std::vector<uint8_t> rec(nsc * 2);  // paired: a (tile, group)'s 16 scales, then its 16 mins
                    std::vector<uint8_t> srec(ss.size() * 2);
                    for (size_t i = 0; i < nsc; ++i) rec[i / 16 * 32 + i % 16] = sc[i], rec[i / 16 * 32 + 16 + i % 16] = mn[i];
                    for (size_t i = 0; i < nss; ++i) {
                        memcpy(&srec[(i / 16 * 32 + i % 16) * es], &ss[i * es], es);
                        memcpy(&srec[(i / 16 * 32 + 16 + i % 16) * es], &sm[i * es], es);
                    }
                    const bool pr = (kind & 7) >= 6;
                    std::vector<float> x(M * K);
                    for (auto& f : x) f = uni() * 3;
                    std::vector<float> out(M * N);
                    const int rc = qgemm(x.data(), 0, M, K, K, qw.data(), pr ? rec.data() : sc.data(),
                                         pr ? rec.data() + 16 : mins ? mn.data() : nullptr, kind,
                                         pr ? srec.data() : ss.data(), pr ? srec.data() + 16 * es : sm.data(), sbg, bits,
                                         tiles, KP, G, mins ? 0 : 1 << (bits - 1), N, out.data(), 0, N, M > 2 ? 2 : 1);
                    printf("qgemm-b%d-k%d-m%d-M%ld %d %016llx\n", bits, kind, mins, (long)M, rc,
                           (unsigned long long)fnv(out.data(), out.size() * 4));
                }
    // attention: each dtype, with and without a window, several queries per row
    const int64_t B = 2, S = 3, H = 4, Hkv = 2, D = 40, L = 20;
    for (int dt = 0; dt < 3; ++dt)
        for (int64_t window : {0, 5}) {
            auto q = values(B * H * S * D, dt), k = values(B * Hkv * L * D, dt), v = values(B * Hkv * L * D, dt);
            std::vector<uint8_t> out(B * S * H * D * (dt ? 2 : 4));
            const int rc = attn(dt, B, S, H, Hkv, D, q.data(), H * S * D, S * D, D, k.data(), Hkv * L * D, L * D, D,
                                v.data(), Hkv * L * D, L * D, D, L, nullptr, 0, 0, window, 0.158f, out.data(), 2);
            printf("attn-dt%d-w%ld %d %016llx\n", dt, (long)window, rc, (unsigned long long)fnv(out.data(), out.size()));
        }
    // float matmul, both layouts (packed: [tiles, K, 16]; bfloat16 there only without pairs)
    const int64_t FN = 37, FK = 50, FT = 3;
    for (int dt = 0; dt < 3; ++dt)
        for (int64_t M : {1, 2, 5}) {
            auto x = values(M * FK, dt), w = values(FN * FK, dt), bias = values(FN, dt);
            std::vector<uint8_t> out(M * FN * (dt ? 2 : 4));
            int rc = frows(x.data(), M, FK, FK, w.data(), FK, dt, FN, bias.data(), out.data(), FN, 2);
            printf("fgemm-rows-dt%d-M%ld%s %d %016llx\n", dt, (long)M, dt == 1 && pairs(1) ? "-pairs" : "", rc,
                   (unsigned long long)fnv(out.data(), out.size()));
            if (pairs(dt)) continue;
            const size_t es = dt ? 2 : 4;
            std::vector<uint8_t> packed(FT * FK * 16 * es, 0);
            for (int64_t n = 0; n < FN; ++n)
                for (int64_t kk = 0; kk < FK; ++kk)
                    memcpy(&packed[((n / 16) * FK * 16 + kk * 16 + n % 16) * es], &w[(n * FK + kk) * es], es);
            rc = fpacked(x.data(), M, FK, FK, packed.data(), dt, FT, FN, bias.data(), out.data(), FN, 2);
            printf("fgemm-packed-dt%d-M%ld %d %016llx\n", dt, (long)M, rc, (unsigned long long)fnv(out.data(), out.size()));
        }
    return 0;
}
