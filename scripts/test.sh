#!/usr/bin/env bash
# The test command (README "Test"): installs what the tests need, fetches the shipped
# models, builds the workspace, checks formatting and lints, and runs every test.
# Idempotent: a second run reuses the models, the venv and target/.
set -euo pipefail
cd "$(dirname "$0")/.."
log() { echo "== $*" >&2; }

# 1. Tools the tests call: promtool (Debian package prometheus) and Python's openai client.
if ! command -v promtool >/dev/null; then
  log "installing promtool (apt package prometheus)"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import openai, yaml" 2>/dev/null; then
  log "creating .venv with the openai client and PyYAML"
  python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check openai pyyaml
fi
export LLORCH_TEST_PYTHON="$PWD/.venv/bin/python"

# 2. Build (release: the tests run real models, and debug Candle is ~20x slower).
log "building"
cargo build --release --workspace --bins

# 3. Models: the default one is required; the others widen tokenizer and parity coverage.
log "fetching models into ${LLORCH_MODELS_DIR:-$HOME/.cache/llorch/models}"
./target/release/llorch models fetch "${LLORCH_TEST_MODELS:-all}"

# 4. Formatting and lints.
log "cargo fmt --check, cargo clippy"
cargo fmt --all -- --check
cargo clippy --release --workspace --all-targets -- -D warnings

# 5. Deployment files: Prometheus config, manifests, dashboard.
log "deploy/ checks"
promtool check config deploy/prometheus/prometheus.yml
.venv/bin/python deploy/check.py

# 6. Tests.
log "tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --release --workspace --no-fail-fast
else
  cargo test --release --workspace --no-fail-fast
fi
