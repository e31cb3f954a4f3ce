#!/usr/bin/env bash
# Concurrent streaming clients against one llorch-cpu worker and, in the same run, against
# llama.cpp's server at the same parallelism (`--parallel N`, restarted for each N), on the
# default GGUF, 2 threads each. Writes bench/results/load-cpu-*.jsonl.
#   bash bench/cpu_load.sh /path/to/llama-server      (build: see bench/README.md)
set -euo pipefail
cd "$(dirname "$0")/.."
LS=${1:?path to llama-server}
M=$(./target/release/llorch models list 2>/dev/null | awk '/smollm2/ && /\.gguf/ {print $NF; exit}')
M=${M:-$HOME/.cache/llorch/models/SmolLM2-135M-Instruct.Q4_1.gguf}
CLIENTS=${CLIENTS:-1 4 8 16 32}
R=bench/results; mkdir -p $R
wait_up() { for _ in $(seq 1 240); do curl -sf "$1/health" >/dev/null && return 0; sleep 0.5; done; return 1; }

./target/release/llorch-cpu --model "$M" --port 8390 --threads 2 --max-batch 32 --max-queue 128 2>/dev/null &
P=$!; wait_up http://127.0.0.1:8390
python3 bench/load.py --url http://127.0.0.1:8390 --clients "$(echo $CLIENTS | tr ' ' ,)" --requests 2 \
  --max-tokens 64 --label llorch-cpu | tee $R/load-cpu-smollm2.jsonl
kill $P; wait $P 2>/dev/null || true

: > $R/load-cpu-smollm2-llamacpp.jsonl
for n in $CLIENTS; do
  "$LS" -m "$M" --port 8391 -t 2 -tb 2 --parallel $n -c $((2048 * n)) --no-webui >/dev/null 2>&1 &
  P=$!; wait_up http://127.0.0.1:8391
  python3 bench/load.py --url http://127.0.0.1:8391 --clients $n --requests 2 --max-tokens 64 \
    --label "llama-server --parallel $n" | tee -a $R/load-cpu-smollm2-llamacpp.jsonl
  kill $P; wait $P 2>/dev/null || true
done
