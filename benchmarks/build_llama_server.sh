#!/usr/bin/env bash
# Build llama.cpp's llama-server for this CPU (GGML_NATIVE=ON), the peer of `slm serve` in
# benchmarks/serve.py (--llama-server benchmarks/.llama-native/bin/llama-server). Minutes on 2 cores.
# Sources: llama_src.sh ($LLAMA_SRC, else the llama-cpp-python sdist's vendored llama.cpp).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
OUT="$HERE/.llama-native"
mkdir -p "$OUT"
LLAMA_SRC="$("$HERE/llama_src.sh")"
cmake -S "$LLAMA_SRC" -B "$OUT/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=ON \
    -DGGML_OPENMP=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON
cmake --build "$OUT/build" --target llama-server -j "$(nproc)"
mkdir -p "$OUT/bin"
cp "$(find "$OUT/build" -name llama-server -type f -perm -u+x | head -1)" "$OUT/bin/llama-server"
