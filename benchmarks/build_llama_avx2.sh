#!/usr/bin/env bash
# Build llama.cpp's llama-bench for AVX2 only (no AVX512, no AVX-VNNI unless AVX_VNNI=ON), the peer of
# slmkit's AVX2 kernels in benchmarks/avx2.py. Minutes on 2 cores. Sources: $LLAMA_SRC (a llama.cpp
# checkout), else the vendored llama.cpp of the installed llama-cpp-python's sdist (pip download).
#     benchmarks/build_llama_avx2.sh            # -> benchmarks/.llama-avx2/bin/llama-bench
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
OUT="$HERE/.llama-avx2"
mkdir -p "$OUT"
LLAMA_SRC="$("$HERE/llama_src.sh")"
# GGML_NATIVE=OFF: no -march=native; one CPU backend (no per-CPU variants chosen at run time)
cmake -S "$LLAMA_SRC" -B "$OUT/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
    -DGGML_NATIVE=OFF -DGGML_BACKEND_DL=OFF -DGGML_CPU_ALL_VARIANTS=OFF \
    -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
    -DGGML_AVX_VNNI="${AVX_VNNI:-OFF}" -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF \
    -DGGML_AVX512_BF16=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
    -DGGML_OPENMP=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=OFF
cmake --build "$OUT/build" --target llama-bench -j "$(nproc)"
mkdir -p "$OUT/bin"
cp "$(find "$OUT/build" -name llama-bench -type f -perm -u+x | head -1)" "$OUT/bin/llama-bench"
# an AVX512 instruction is EVEX-encoded (first opcode byte 0x62 in 64-bit code): there must be none
if command -v objdump >/dev/null; then
    n=$(objdump -d "$OUT/bin/llama-bench" | awk -F'\t' 'NF>=3 {split($2,b," "); i=1;
        while (b[i]=="66"||b[i]=="67"||b[i]=="f2"||b[i]=="f3") i++; if (b[i]=="62") c++} END {print c+0}')
    echo "EVEX-encoded instructions in llama-bench: $n"
    [ "$n" = 0 ] || { echo "llama-bench has AVX512 code: not an AVX2-only build" >&2; exit 1; }
fi
echo "$OUT/bin/llama-bench"
