#!/usr/bin/env bash
# Print the llama.cpp source folder the peer builds use: $LLAMA_SRC if set, else the vendored
# llama.cpp of the installed llama-cpp-python's sdist (the same version the Python benchmarks
# compare with), downloaded and unpacked under benchmarks/.llama-avx2/src once.
set -euo pipefail
if [ -n "${LLAMA_SRC:-}" ]; then echo "$LLAMA_SRC"; exit 0; fi
HERE="$(cd "$(dirname "$0")" && pwd)"
DIR="$HERE/.llama-avx2"
PY="${PY:-python3}"
if [ ! -d "$DIR/src/vendor/llama.cpp" ]; then
    VER="$("$PY" -c 'import llama_cpp; print(llama_cpp.__version__)')"
    "$PY" -m pip download -q --no-deps --no-binary llama-cpp-python "llama-cpp-python==$VER" -d "$DIR/sdist" >&2
    mkdir -p "$DIR/src"
    tar -xzf "$DIR"/sdist/llama_cpp_python-*.tar.gz -C "$DIR/src" --strip-components=1
fi
echo "$DIR/src/vendor/llama.cpp"
