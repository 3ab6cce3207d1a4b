#!/usr/bin/env bash
# One command for the whole benchmark: bench/run.sh [--quick]
# Builds the release binary, installs the load generator (oha) and nginx when missing,
# then runs every scenario (bench/run.py) and leaves a Markdown + JSON report in
# bench/results/. Every process is started and stopped by PID; every run is bounded.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v oha >/dev/null 2>&1 && [ ! -x "$HOME/.cargo/bin/oha" ]; then
  echo "== installing oha (load generator) with cargo install"
  cargo install oha --locked
fi
if ! command -v nginx >/dev/null 2>&1; then
  echo "== installing nginx (the one-hop floor) from Debian"
  export DEBIAN_FRONTEND=noninteractive
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq nginx-light >/dev/null
fi
echo "== building release binaries"
cargo build --release --bin cascade --example stream_probe --example store_load
exec python3 bench/run.py "$@"
