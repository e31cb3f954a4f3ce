#!/usr/bin/env bash
# CPU benchmark, llorch vs llama.cpp in the same run, same GGUF, same threads, same lengths.
# Usage: bench/cpu.sh [THREADS]   (needs reference/.venv with llama-cpp-python; see reference/README.md)
# Writes bench/results/cpu-<model>-{llorch,llamacpp}.json and prints a table.
set -euo pipefail
cd "$(dirname "$0")/.."
T=${1:-2}
PY=${LLAMACPP_PYTHON:-reference/.venv/bin/python}
cargo build --release -p llorch -q
for m in smollm2-135m-instruct qwen2.5-coder-0.5b-instruct; do
  path=$(./target/release/llorch models fetch "$m" 2>/dev/null | tail -1)
  ./target/release/llorch bench --model "$m" --threads "$T" --iterations 5 --warmup 1 --tokens 128 --prompt-tokens 128 \
    --output-json "bench/results/cpu-$m-llorch.json" >/dev/null
  "$PY" bench/llamacpp_bench.py --model "$path" --threads "$T" --iterations 5 --warmup 1 --tokens 128 --prompt-tokens 128 \
    > "bench/results/cpu-$m-llamacpp.json"
done
python3 - <<'PY'
import json
print(f"| model | llorch prefill tok/s | llama.cpp prefill | ratio | llorch decode tok/s | llama.cpp decode | ratio |")
print("|---|---|---|---|---|---|---|")
for m in ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"]:
    a = json.load(open(f"bench/results/cpu-{m}-llorch.json")); b = json.load(open(f"bench/results/cpu-{m}-llamacpp.json"))
    ap, bp = a["prefill_tokens_per_second"]["median"], b["prefill_tokens_per_second"]["median"]
    ad, bd = a["decode_tokens_per_second"]["median"], b["decode_tokens_per_second"]["median"]
    print(f"| {m} | {ap:.1f} | {bp:.1f} | {ap/bp:.2f}x | {ad:.1f} | {bd:.1f} | {ad/bd:.2f}x |")
PY
