// slmkit's tiled code layout (src/slmkit/quant/format.py CHUNK / code_vectors), for every
// translation unit that reads or writes it: a row tile's codes come in runs of 64-byte vectors,
// run_k(bits) inputs per run in run_vectors(bits) vectors (int8: one set of 4 codes; int4: two
// sets as nibbles; 6 / 5 bits: 2 / 4 nibble vectors and one of the codes' top bits).
#pragma once
#include <stdint.h>

constexpr int run_k(int bits) { return bits == 8 ? 4 : bits == 4 ? 8 : bits == 6 ? 16 : 32; }
constexpr int run_vectors(int bits) { return bits == 6 ? 3 : bits == 5 ? 5 : 1; }

// Bytes of one row tile's codes over KP inputs (KP a multiple of run_k(bits)).
constexpr int64_t tile_code_bytes(int bits, int64_t KP) { return KP / run_k(bits) * run_vectors(bits) * 64; }
