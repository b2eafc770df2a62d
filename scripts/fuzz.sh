#!/usr/bin/env bash
# Bounded fuzzing of the client protocol decoder, the token checks and presence's
# delta application (not part of CI). Usage: scripts/fuzz.sh [seconds per target, default 60]
# Needs cargo-fuzz (`cargo install cargo-fuzz`); on a stable toolchain RUSTC_BOOTSTRAP=1
# lets it pass the compiler flags it needs. A crash leaves its input under
# fuzz/artifacts/<target>/: turn it into a regression test before fixing.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs="${1:-60}"
for target in protocol_decode auth_verify presence_deltas; do
  echo "==> $target for ${secs}s"
  RUSTC_BOOTSTRAP=1 cargo fuzz run --sanitizer none "$target" -- -max_total_time="$secs" -rss_limit_mb=2048
done
