#!/usr/bin/env bash
# The worker with and without steps launched ahead (LLORCH_DECODE_AHEAD=0), alternating, on
# the synthetic TinyLlama Q4_K_M file: concurrent streaming clients as in run.sh, more
# requests a level. Carry the binaries as in run.sh. Writes $OUT/ahead-log.txt and
# $OUT/ahead.jsonl (one row per level and round, labelled ahead=0 / ahead=1).
#   bash bench/gpu/ahead.sh [ROUNDS=3]
set -uo pipefail
source "$(dirname "$0")/common.sh" ahead-log.txt
[ -f $M/tinyllama-q4km.gguf ] || $L synth --arch llama --preset tinyllama-1.1b --dtype q4_k_m --out $M/tinyllama-q4km.gguf --seed 1
: > "$OUT/ahead.jsonl"
for r in $(seq 1 "${1:-3}"); do
  for a in 0 1; do
    echo "=== round $r, LLORCH_DECODE_AHEAD=$a ($(date +%T))"
    LLORCH_DECODE_AHEAD=$a $W --model $M/tinyllama-q4km.gguf --cuda-device 0 --port 8393 --max-batch 32 \
      --max-queue 256 --ctx-size 2048 --kv-cache-mib 4096 &
    WP=$!
    for i in $(seq 1 600); do curl -sf localhost:8393/health >/dev/null && break; sleep 0.5; done
    python3 bench/load.py --url http://127.0.0.1:8393 --clients 1,4,8,16,32 --requests 4 --max-tokens 128 \
      --label "ahead=$a" | tee -a "$OUT/ahead.jsonl"
    kill $WP; wait $WP 2>/dev/null
  done
done
python3 - "$OUT/ahead.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
print("clients  ahead=0 tok/s (median, runs)        ahead=1 tok/s (median, runs)")
for c in sorted({r["clients"] for r in rows}):
    cell = lambda a: [round(r["tokens_per_s"]) for r in rows if r["clients"] == c and r["label"] == f"ahead={a}"]
    z, o = cell(0), cell(1)
    print(f"{c:>7}  {statistics.median(z):>7.0f} {str(z):<24} {statistics.median(o):>7.0f} {str(o):<24} {statistics.median(o) / statistics.median(z) - 1:+.1%}")
PY
