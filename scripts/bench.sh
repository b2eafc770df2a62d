#!/usr/bin/env bash
# Reproduces docs/performance.md on a 2-core machine: Switchboard against Node `ws`,
# bare fastwebsockets and tokio-tungstenite (servers pinned to core 0, the load tool to
# core 1, both at real-time priority, medians of 3 runs), then 100k sessions over six
# SO_REUSEPORT gateways held for 5 minutes, then the criterion benches.
# Extra arguments go to `bench compare` (e.g. --runs 5, --servers switchboard,node-ws).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p gateway -p bench
{ [ -d node_modules/ws ] && [ -x node_modules/@oven/bun-linux-x64/bin/bun ]; } || npm install --no-audit --no-fund
taskset -c 1 chrt -r 1 ./target/release/bench compare --realtime "$@"
./target/release/bench capacity --connections 100000 --gateways 6 --workers 6 --minutes 5
cargo bench -p gateway --bench hot_paths
