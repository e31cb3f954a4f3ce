#!/usr/bin/env bash
# CUDA-graph decode (crates/llorch-engine/src/model/graph.rs + decode.cu) on the GPU machine:
# for each GGUF weight type the kernels read, the decode logits of the graph path against
# Candle's CUDA path (LLORCH_CUDA_GRAPH=0), the graph launched eagerly, and the CPU, on the
# same synthetic weights; then decode speed with and without graphs. Carry the binaries as
# in run.sh. Writes $OUT/graph-log.txt and $OUT/graph.json.
#   bash bench/gpu/graph.sh
set -uo pipefail
source "$(dirname "$0")/common.sh" graph-log.txt
step "synthetic models (seed 1)"
[ -f $M/tinyllama-q4km.gguf ] || $L synth --arch llama --preset tinyllama-1.1b --dtype q4_k_m --out $M/tinyllama-q4km.gguf --seed 1
[ -f $M/tinyllama-q6k.gguf ] || $L synth --arch llama --preset tinyllama-1.1b --dtype q6_k --out $M/tinyllama-q6k.gguf --seed 1
for t in q8_0 q4_0 q4_1 q5_0; do
  [ -f $M/smollm2-$t.gguf ] || $L synth --arch llama --preset smollm2-135m --dtype $t --out $M/smollm2-$t.gguf --seed 1
done
[ -f $M/qwen2-q4_1.gguf ] || $L synth --arch qwen2 --preset tiny --dtype q4_1 --out $M/qwen2-q4_1.gguf --seed 1
# Qwen2.5-0.5B's shape as Q4_K_M: its 896-wide rows fall back to Q5_0 (Q4_K) and Q8_0 (Q6_K),
# as in the real file, so half the layers' Q, K, V are Q5_0 + Q8_0 with biases (`mvx_q5_0_q8_0`)
[ -f $M/qwen25-q4km.gguf ] || $L synth --arch qwen2 --preset qwen2.5-0.5b --dtype q4_k_m --out $M/qwen25-q4km.gguf --seed 1

step "decode logits: CPU, Candle CUDA, graph eager, graph"
for f in tinyllama-q4km tinyllama-q6k smollm2-q8_0 smollm2-q4_0 smollm2-q4_1 smollm2-q5_0 qwen2-q4_1 qwen25-q4km; do
  $L check --model $M/$f.gguf --tokens 8 --threads 16 --out $M/g-$f-cpu.json
  $L check --model $M/$f.gguf --tokens 8 --threads 16 --dequantize --out $M/g-$f-exact.json
  LLORCH_CUDA_GRAPH=0 $L check --model $M/$f.gguf --tokens 8 --cuda-device 0 --out $M/g-$f-candle.json
  LLORCH_CUDA_GRAPH=eager $L check --model $M/$f.gguf --tokens 8 --cuda-device 0 --out $M/g-$f-eager.json
  RUST_LOG=info $L check --model $M/$f.gguf --tokens 8 --cuda-device 0 --out $M/g-$f-graph.json 2>&1 | grep -v "^$" | tail -3
done
python3 - "$M" <<'PY'
import json, math, sys
m = sys.argv[1]
def rel(a, b):
    return math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b)) / max(sum(y * y for y in b), 1e-30))
for f in ["tinyllama-q4km", "tinyllama-q6k", "smollm2-q8_0", "smollm2-q4_0", "smollm2-q4_1", "smollm2-q5_0", "qwen2-q4_1",
          "qwen25-q4km"]:
    try:
        r = {k: json.load(open(f"{m}/g-{f}-{k}.json")) for k in ["cpu", "exact", "candle", "eager", "graph"]}
    except OSError as e:
        print(f, "missing", e); continue
    # the graph multiplies f32 activations by the dequantized weights: the exact product,
    # what the CPU computes with --dequantize (the 32-token prefill on CUDA is exact too)
    same = lambda k, ref: sum(a == b for a, b in zip(r[k]["greedy_ids"], r[ref]["greedy_ids"]))
    d = lambda k, ref: rel(r[k]["decode_logits"], r[ref]["decode_logits"])
    print(f"{f:15} graph-vs-eager {d('graph', 'eager'):.1e} graph-vs-exact {d('graph', 'exact'):.1e}"
          f" greedy {same('graph', 'exact')}/8 | candle-vs-cpu {d('candle', 'cpu'):.1e} greedy {same('candle', 'cpu')}/8"
          f" | margins exact {min(r['exact']['greedy_margins']):.3f}")
PY

step "a 100-token prompt (longer than the graph's rows): Candle's path, dequantized weights in TF32 products, vs the exact product"
ids=$(seq -s, 101 200)
M1=$M/tinyllama-q4km.gguf
$L check --model $M1 --prompt-ids $ids --tokens 0 --cuda-device 0 --out $M/long-cuda.json
$L check --model $M1 --prompt-ids $ids --tokens 0 --threads 16 --dequantize --out $M/long-exact.json
$L check --model $M1 --prompt-ids $ids --tokens 0 --threads 16 --out $M/long-cpu.json
python3 - "$M" <<'PY'
import json, math, sys
m = sys.argv[1]
r = {k: json.load(open(f"{m}/long-{k}.json"))["logits"] for k in ("cuda", "exact", "cpu")}
rel = lambda x, y: math.sqrt(sum((p - q) ** 2 for p, q in zip(x, y)) / sum(q * q for q in y))
print(f"100-token prefill logits vs exact: CUDA (TF32) {rel(r['cuda'], r['exact']):.1e}, CPU quantized kernels {rel(r['cpu'], r['exact']):.1e}")
PY

step "same greedy outputs alone and batched (worker: 2, 4, 6, 12 and 28 at once, the graph's 2, 4, 8, 16 and 32 buckets), and alone as without steps launched ahead"
worker() {
  "$@" --model ${WM:-$M/smollm2-q8_0.gguf} --cuda-device 0 --port 8392 --max-batch 32 --ctx-size 1024 --kv-cache-mib 2048 &
  WP=$!
  for i in $(seq 1 300); do curl -sf localhost:8392/health >/dev/null && break; sleep 0.5; done
}
worker env LLORCH_DECODE_AHEAD=0 $W
python3 bench/gpu/same_outputs.py http://127.0.0.1:8392 2 --save $M/alone-no-ahead.json
kill $WP; wait $WP 2>/dev/null
worker $W
python3 bench/gpu/same_outputs.py http://127.0.0.1:8392 2 --against $M/alone-no-ahead.json
python3 bench/gpu/same_outputs.py http://127.0.0.1:8392 4
python3 bench/gpu/same_outputs.py http://127.0.0.1:8392 6
python3 bench/gpu/same_outputs.py http://127.0.0.1:8392 12
python3 bench/gpu/same_outputs.py http://127.0.0.1:8392 28
kill $WP; wait $WP 2>/dev/null

step "the mixed QKV products (Q4_K_M: TinyLlama's 10 layers with V in Q6_K, mvx_q4_k_q6_k; Qwen2.5-0.5B's 12 with Q5_0 + Q8_0 and biases, mvx_q5_0_q8_0): same greedy outputs alone and 2, 4, 6 at once (buckets 2, 4, 8)"
for f in tinyllama-q4km qwen25-q4km; do
  echo "$f:"
  WM=$M/$f.gguf worker $W
  python3 bench/gpu/same_outputs.py http://127.0.0.1:8392 2
  python3 bench/gpu/same_outputs.py http://127.0.0.1:8392 4
  python3 bench/gpu/same_outputs.py http://127.0.0.1:8392 6
  kill $WP; wait $WP 2>/dev/null
done

step "decode speed: graph vs Candle (512-token prompt, 128 tokens); graph without steps launched ahead"
for f in tinyllama-q4km smollm2-q4_1; do
  LLORCH_DECODE_AHEAD=0 $L bench --model $M/$f.gguf --cuda-device 0 --prompt-tokens 512 --tokens 128 --iterations 2 --warmup 1 \
    --output-json $M/gb-$f-noahead.json 2>&1 | grep -E "^run" | tail -1 | sed "s/^/graph=1 ahead=0 $f: /"
done
for g in 1 0; do
  for f in tinyllama-q4km smollm2-q4_1; do
    LLORCH_CUDA_GRAPH=$g $L bench --model $M/$f.gguf --cuda-device 0 --prompt-tokens 512 --tokens 128 --iterations 2 --warmup 1 \
      --output-json $M/gb-$f-$g.json 2>&1 | grep -E "^run" | tail -1 | sed "s/^/graph=$g $f: /"
  done
done

step "where a graph step's time goes (eager launches, each kernel waited for; 512-token prompt)"
LLORCH_CUDA_GRAPH=eager $L bench --model $M/tinyllama-q4km.gguf --cuda-device 0 --prompt-tokens 512 --tokens 64 --iterations 1 --warmup 1 \
  --profile --output-json $M/gp-eager.json 2>&1 | grep -A20 '^phase'
step "graph step vs the rest of the engine's step"
$L bench --model $M/tinyllama-q4km.gguf --cuda-device 0 --prompt-tokens 512 --tokens 64 --iterations 1 --warmup 1 \
  --profile --output-json $M/gp-graph.json 2>&1 | grep -A20 '^phase'

(cd $M && tar czf "$OUT/graph-raw.tar.gz" gb-*.json gp-*.json)
