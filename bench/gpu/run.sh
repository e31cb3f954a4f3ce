#!/usr/bin/env bash
# The whole GPU check in one run on the GPU machine (no network, no Rust, no models there).
# Carry the CUDA builds as .devbin/llorch and .devbin/llorch-cuda (scripts/build-cuda.sh,
# then copy); everything else is made here. Writes $OUT/log.txt and $OUT/summary.json.
#   bash bench/gpu/run.sh
set -uo pipefail
source "$(dirname "$0")/common.sh" log.txt
step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'

step "synthetic TinyLlama-1.1B shape: Q4_K_M GGUF (llama.cpp's mix), Q4_K alone and bf16 SafeTensors (seed 1)"
$L synth --arch llama --preset tinyllama-1.1b --dtype q4_k_m --out $M/tinyllama-q4km.gguf --seed 1
$L synth --arch llama --preset tinyllama-1.1b --dtype q4_k --out $M/tinyllama-q4k.gguf --seed 1
$L synth --arch llama --preset tinyllama-1.1b --dtype bf16 --out $M/tinyllama-bf16 --seed 1
ls -la $M $M/tinyllama-bf16

step "correctness: CUDA vs CPU logits and greedy tokens on the same weights"
# bf16: the same forward on both devices. Q4_K_M: once with the quantized kernels (each
# device quantizes activations its own way: CUDA q8_1 per 32 values, CPU q8_K per 256) and
# once dequantized (--dequantize: dense f32 matmuls, the exact product of the same weights),
# which checks our CUDA forward against the CPU one on identical math and gives each
# device's quantized kernel its error against the exact result.
for f in tinyllama-q4km.gguf tinyllama-bf16; do
  $L check --model $M/$f --tokens 16 --threads 16 --out $M/check-$f-cpu.json
  $L check --model $M/$f --tokens 16 --cuda-device 0 --out $M/check-$f-cuda.json
done
$L check --model $M/tinyllama-q4km.gguf --dequantize --tokens 16 --threads 16 --out $M/check-q4km-dequant-cpu.json
$L check --model $M/tinyllama-q4km.gguf --dequantize --tokens 16 --cuda-device 0 --out $M/check-q4km-dequant-cuda.json
# Which path carries the error: a 1-token and a 32-token prompt both run through the
# CUDA graph's kernels now (up to 32 rows: the exact product at 1, split-bf16 tensor-core
# products at 32); before, 32 tokens took Candle's matrix-matrix path.
for p in 1 32; do
  ids=$(seq -s, 101 $((100 + p)))
  for d in "--threads 16" "--cuda-device 0"; do
    tag=$(echo $d | cut -c3-6)
    $L check --model $M/tinyllama-q4km.gguf --prompt-ids $ids --tokens 0 $d --out $M/iso-q-$tag-$p.json
    $L check --model $M/tinyllama-q4km.gguf --prompt-ids $ids --tokens 0 --dequantize $d --out $M/iso-f-$tag-$p.json
  done
done

step "speed: llorch bench on CUDA (512-token prompt, 128 tokens, warm-up 2, 5 runs)"
# tinyllama-q4k.gguf (every matrix Q4_K): the file the sessions before the fourteenth
# called Q4_K_M, for comparison with their figures
for f in tinyllama-q4km.gguf tinyllama-q4k.gguf tinyllama-bf16; do
  $L bench --model $M/$f --cuda-device 0 --prompt-tokens 512 --tokens 128 --iterations 5 --warmup 2 \
    --output-json $M/bench-$f.json >/dev/null
done

step "where decode time goes: host time per phase (CUDA runs asynchronously, so this is launch cost)"
$L bench --model $M/tinyllama-q4km.gguf --cuda-device 0 --prompt-tokens 16 --tokens 128 --iterations 2 --warmup 1 \
  --profile --output-json $M/profile-q4km.json 2>&1 | grep -A20 '^phase'

step "peer: PyTorch + transformers on the bf16 folder"
python3 bench/gpu/torch_generate.py --model $M/tinyllama-bf16 --prompt-tokens 512 --tokens 128 > $M/torch.json
cat $M/torch.json

step "the limit: device copy bandwidth"
python3 bench/gpu/bandwidth.py > $M/bandwidth.json
cat $M/bandwidth.json

step "the worker: llorch-cuda on the Q4_K_M file, concurrent streaming clients"
LLORCH_PROFILE=1 RUST_LOG=warn,llorch_engine=info $W --model $M/tinyllama-q4km.gguf --cuda-device 0 --port 8391 --max-batch 32 --max-queue 128 --ctx-size 2048 --kv-cache-mib 4096 &
WP=$!
for i in $(seq 1 600); do curl -sf localhost:8391/health >/dev/null && break; sleep 0.5; done
curl -s localhost:8391/info > $M/info.json; cat $M/info.json; echo
python3 bench/load.py --url http://127.0.0.1:8391 --clients 1,4,8,16,32 --requests 2 --max-tokens 128 \
  --label llorch-cuda | tee $M/load.jsonl
curl -s localhost:8391/metrics > "$OUT/metrics.txt"
grep -E '^llorch_(worker_info|generation_tokens_total|batch_size_(sum|count))' "$OUT/metrics.txt"
kill $WP; wait $WP 2>/dev/null

step "summary"
python3 bench/gpu/summary.py $M "$OUT/summary.json"
cp $M/load.jsonl $M/info.json "$OUT/" 2>/dev/null
(cd $M && tar czf "$OUT/raw.tar.gz" *.json *.jsonl)
