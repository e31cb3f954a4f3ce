#!/usr/bin/env bash
# Builds llorch-cuda and a CUDA-enabled llorch CLI (--features cuda).
#
# On a machine with the CUDA toolkit installed (nvcc on PATH, CUDA_HOME set), this is just:
#   CUDA_COMPUTE_CAP=<your GPU, e.g. 89 or 90> cargo build --release -p llorch-worker -p llorch --features cuda
# On a machine without a GPU or CUDA (our dev and CI machines), it first installs a CUDA 13.0
# build toolchain from PyPI (nvcc, headers, link-time libraries, a stub libcuda) with
# ../shared/cuda/toolchain.sh or, if that is absent, the same steps vendored here.
# Output: target/release/llorch-cuda and target/release/llorch (both need the CUDA
# libraries at run time; they cannot start on a machine without them).
# Keep target/ between builds: a cold build takes ~20 minutes on 2 cores (Candle's kernels).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvcc >/dev/null; then
  TC=../shared/cuda/toolchain.sh
  [ -f "$TC" ] || TC=scripts/cuda-toolchain.sh
  eval "$(bash "$TC")"
fi
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
# The binaries often run on another machine than the one that builds them (the GPU host),
# so on x86-64 the CPU code targets x86-64-v3 (AVX2/FMA/F16C, which Candle's quantized
# CPU kernels use) instead of .cargo/config.toml's target-cpu=native: a build host with
# AVX-512 made binaries that died of SIGILL on a GPU host without it. Set RUSTFLAGS to
# choose otherwise (e.g. "-C target-cpu=native" to build and run on the same machine).
if [ -z "${RUSTFLAGS+x}" ] && [ "$(uname -m)" = x86_64 ]; then
  export RUSTFLAGS="-C target-cpu=x86-64-v3"
fi
cargo build --release -p llorch-worker -p llorch --features cuda --bins
ls -la "${CARGO_TARGET_DIR:-target}"/release/llorch-cuda "${CARGO_TARGET_DIR:-target}"/release/llorch
