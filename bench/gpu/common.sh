# The preamble the GPU machine's scripts share (sourced, with the log's file name): $OUT and
# the log, the carried binaries unpacked (.devbin/*.xz: the transfer limit is 64 MiB; plain
# binaries in .devbin work too), the synthetic models' folder and `step` headings.
#   source "$(dirname "$0")/common.sh" LOG_NAME
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
exec > >(tee "$OUT/$1") 2>&1
B=$PWD/.devbin
if [ -f "$B/llorch.xz" ]; then
  mkdir -p /tmp/llorch-bin
  for b in llorch llorch-cuda; do xz -dc "$B/$b.xz" > /tmp/llorch-bin/$b && chmod +x /tmp/llorch-bin/$b; done
  B=/tmp/llorch-bin
fi
L=$B/llorch; W=$B/llorch-cuda; M=/tmp/llorch-gpu; mkdir -p "$M"
export LLORCH_MODELS_DIR=$M RUST_LOG=${RUST_LOG:-warn}
step() { echo; echo "=== $* ($(date +%T))"; }
