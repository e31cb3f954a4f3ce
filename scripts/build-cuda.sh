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
cargo build --release -p llorch-worker -p llorch --features cuda --bins
ls -la "${CARGO_TARGET_DIR:-target}"/release/llorch-cuda "${CARGO_TARGET_DIR:-target}"/release/llorch
