#!/usr/bin/env bash
# The first command (README "Run"): builds, fetches the default model, and starts
# pool-managerd on 127.0.0.1:9200, which spawns a llorch worker for the model on the best
# device found and routes /v1/* to it. Extra arguments go to pool-managerd
# (e.g. --config deploy/pool.toml, --bind 0.0.0.0:9200).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace --bins
./target/release/llorch models fetch
exec ./target/release/pool-managerd "$@"
