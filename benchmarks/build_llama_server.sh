#!/usr/bin/env bash
# Build llama.cpp's llama-server for this CPU (GGML_NATIVE=ON), the peer of `slm serve` in
# benchmarks/serve.py (--llama-server benchmarks/.llama-native/bin/llama-server). Minutes on 2 cores.
# Sources: $LLAMA_SRC (a llama.cpp checkout), else the vendored llama.cpp of the installed
# llama-cpp-python's sdist (the same version the Python benchmarks compare with), shared with
# build_llama_avx2.sh's download.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
SRC_DIR="$HERE/.llama-avx2"
OUT="$HERE/.llama-native"
PY="${PY:-python3}"
mkdir -p "$OUT"
if [ -z "${LLAMA_SRC:-}" ]; then
    VER="$("$PY" -c 'import llama_cpp; print(llama_cpp.__version__)')"
    if [ ! -d "$SRC_DIR/src/vendor/llama.cpp" ]; then
        "$PY" -m pip download --no-deps --no-binary llama-cpp-python "llama-cpp-python==$VER" -d "$SRC_DIR/sdist"
        mkdir -p "$SRC_DIR/src"
        tar -xzf "$SRC_DIR"/sdist/llama_cpp_python-*.tar.gz -C "$SRC_DIR/src" --strip-components=1
    fi
    LLAMA_SRC="$SRC_DIR/src/vendor/llama.cpp"
fi
cmake -S "$LLAMA_SRC" -B "$OUT/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=ON \
    -DGGML_OPENMP=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON
cmake --build "$OUT/build" --target llama-server -j "$(nproc)"
mkdir -p "$OUT/bin"
cp "$(find "$OUT/build" -name llama-server -type f -perm -u+x | head -1)" "$OUT/bin/llama-server"
