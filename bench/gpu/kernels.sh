#!/usr/bin/env bash
# Where a CUDA-graph decode step's time goes, on the GPU machine: the real binary's step
# profiled kernel by kernel with Nsight Compute (one decode step of the synthetic TinyLlama
# Q4_K_M, 512 positions in), then bench/gpu/kernels.py on decode.cu: the matrix-vector
# kernels (batches of 8 too), the tensor-core ones with split bf16 products (the default) and
# with plain bf16, for batches of 1, 8, 16 and 32 (extra variants as NAME=FILE.cu[:FLAGS]
# arguments). Carry the binary as in run.sh (only `llorch` is needed).
# Writes $OUT/ncu.csv, $OUT/kernels.json, $OUT/kernels-simple.json and $OUT/kernels-log.txt.
#   bash bench/gpu/kernels.sh [NAME=FILE.cu[:FLAGS] ...]
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
exec > >(tee "$OUT/kernels-log.txt") 2>&1
export PATH=$PATH:/usr/local/cuda/bin:$(dirname "$(ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)")
B=$PWD/.devbin
if [ -f $B/llorch.xz ]; then
  mkdir -p /tmp/llorch-bin
  xz -dc $B/llorch.xz > /tmp/llorch-bin/llorch && chmod +x /tmp/llorch-bin/llorch
  B=/tmp/llorch-bin
fi
M=/tmp/llorch-gpu; mkdir -p $M
export RUST_LOG=${RUST_LOG:-warn}
[ -f $M/tinyllama-q4km.gguf ] || $B/llorch synth --arch llama --preset tinyllama-1.1b --dtype q4_k_m --out $M/tinyllama-q4km.gguf --seed 1
echo "=== llorch bench (graph decode), $(date +%T)"
$B/llorch bench --model $M/tinyllama-q4km.gguf --cuda-device 0 --prompt-tokens 512 --tokens 128 --iterations 3 --warmup 1 >/dev/null
echo "=== Nsight Compute: one decode step's kernels, $(date +%T)"
# skip the first decode steps (warm-up, capture): 112 kernels per step of this model
ncu --clock-control none -k regex:'^(mv_|attention|embed)' --launch-skip 560 --launch-count 112 \
  --metrics gpu__time_duration.sum,dram__bytes_read.sum,launch__registers_per_thread,sm__warps_active.avg.pct_of_peak_sustained_active,launch__grid_size \
  --csv --page raw $B/llorch bench --model $M/tinyllama-q4km.gguf --cuda-device 0 --prompt-tokens 512 --tokens 16 \
  --iterations 1 --warmup 0 --output-json /dev/null > $OUT/ncu.csv 2>$OUT/ncu-err.txt || tail -5 $OUT/ncu-err.txt
python3 - "$OUT/ncu.csv" <<'PY'
import csv, io, sys, collections
t = open(sys.argv[1]).read()
rows = list(csv.DictReader(io.StringIO(t[t.find('"ID"'):])))
rows = [r for r in rows if r.get("Kernel Name") and r.get("gpu__time_duration.sum", "").replace(".", "").replace(",", "").isdigit()]
agg = collections.defaultdict(lambda: [0, 0.0, 0.0, "", "", ""])
for r in rows:
    a = agg[r["Kernel Name"][:40]]
    a[0] += 1; a[1] += float(r["gpu__time_duration.sum"].replace(",", "")); a[2] += float(r["dram__bytes_read.sum"].replace(",", ""))
    a[3] = r["launch__registers_per_thread"]; a[4] = r["sm__warps_active.avg.pct_of_peak_sustained_active"]; a[5] = r["launch__grid_size"]
tot = sum(a[1] for a in agg.values())
print(f"{'kernel':40} {'n':>4} {'us/launch':>10} {'total_us':>9} {'MB/launch':>10} {'GB/s':>7} regs occ% grid")
for k, a in sorted(agg.items(), key=lambda kv: -kv[1][1]):
    print(f"{k:40} {a[0]:4} {a[1]/a[0]/1e3:10.2f} {a[1]/1e3:9.1f} {a[2]/a[0]/1e6:10.2f} {a[2]/a[1]:7.0f} {a[3]} {a[4]} {a[5]}")
print(f"sum of kernel times per step: {tot/1e3:.1f} us over {sum(a[0] for a in agg.values())} kernels")
PY
echo "=== kernel variants, $(date +%T)"
D=crates/llorch-engine/src/model/decode.cu
python3 bench/gpu/kernels.py --out "$OUT" --types q4_k,q6_k mv=$D:"pdl persist" bf16x3=$D:"mm pdl persist" bf16=$D:"-DMM_SPLIT=0 mm pdl persist" "$@" | grep -v '^{'
echo "=== the other weight types: whole steps only, $(date +%T)"
python3 bench/gpu/kernels.py --out "$OUT" --json kernels-simple.json --no-kernels --types q8_0,q4_0,q4_1,q5_0 \
  mv=$D:"pdl persist" bf16x3=$D:"mm pdl persist" | grep -v '^{'

