#!/usr/bin/env bash
# Autobahn|Testsuite (fuzzingclient) against the gateway's `/echo` route: by default the
# permessage-deflate cases 12.* and 13.*; other cases as arguments (e.g. '1.*' '9.*').
# Needs Python 2.7 (the suite's last release runs on it only): `python2.7` on PATH, or
# env PYTHON2. Installs autobahntestsuite from PyPI into target/autobahn/py, builds and
# starts the gateway binary, writes the report to target/autobahn/report, and fails
# unless every case's behaviour is OK, NON-STRICT or INFORMATIONAL (close: OK or
# INFORMATIONAL). Not part of scripts/test.sh: Debian 12 has no Python 2.7 package.
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON2:-python2.7}"
"$py" -c 'import sys; assert sys.version_info[:2] == (2, 7), sys.version' \
  || { echo "autobahn: needs Python 2.7 (set PYTHON2)"; exit 2; }
dir=target/autobahn
mkdir -p "$dir"
if [ ! -d "$dir/py/autobahntestsuite" ]; then
  echo "==> pip install autobahntestsuite (Python 2.7, into $dir/py)"
  "$py" -m pip install --quiet --disable-pip-version-check --target "$dir/py" autobahntestsuite==25.10.1
fi
# env GATEWAY_BIN: test that binary instead of building target/debug/gateway.
bin="${GATEWAY_BIN:-}"
if [ -z "$bin" ]; then
  cargo build -p gateway --bins
  bin=./target/debug/gateway
fi
cases=("$@")
[ ${#cases[@]} -gt 0 ] || cases=('12.*' '13.*')

out="$dir/gateway.out"
# 16 MiB messages (cases 9.*), and room for a whole case's burst in the send queue.
SWITCHBOARD_LOG=warn "$bin" --listen 127.0.0.1:0 --grpc-addr 127.0.0.1:0 --admin-addr 127.0.0.1:0 \
  --anonymous --echo-route --max-message-bytes 16777216 --send-queue 100000 >"$out" &
gw=$!
trap 'kill "$gw" 2>/dev/null || true' EXIT
for _ in $(seq 100); do grep -q LISTENING "$out" && break; sleep 0.1; done
addr="$(grep -o 'client=[^ ]*' "$out" | cut -d= -f2)"
[ -n "$addr" ] || { echo "autobahn: the gateway did not start"; exit 1; }

python3 - "$dir" "$addr" "${cases[@]}" <<'EOF'
import json, os, sys
d, addr, cases = sys.argv[1], sys.argv[2], sys.argv[3:]
spec = {"outdir": os.path.abspath(os.path.join(d, "report")),
        "servers": [{"agent": "switchboard", "url": "ws://%s/echo" % addr}],
        "cases": cases, "exclude-cases": [], "exclude-agent-cases": {}}
json.dump(spec, open(os.path.join(d, "spec.json"), "w"))
EOF
rm -rf "$dir/report"
echo "==> wstest -m fuzzingclient, cases ${cases[*]}"
# --target installs skip the .pth files namespace packages (zope) need: add the dir as a site.
(cd "$dir" && "$py" -c "import site, sys; site.addsitedir('py'); sys.argv = ['wstest', '-m', 'fuzzingclient', '-s', 'spec.json']; from autobahntestsuite import wstest; wstest.run()" >wstest.log 2>&1)

python3 - "$dir/report/index.json" <<'EOF'
import json, sys
results = json.load(open(sys.argv[1]))["switchboard"]
good = {"OK", "NON-STRICT", "INFORMATIONAL"}
bad = sorted((c, r["behavior"], r["behaviorClose"]) for c, r in results.items()
             if r["behavior"] not in good or r["behaviorClose"] not in {"OK", "INFORMATIONAL"})
counts = {}
for r in results.values():
    counts[r["behavior"]] = counts.get(r["behavior"], 0) + 1
print("autobahn: %d cases: %s" % (len(results), ", ".join("%s %d" % kv for kv in sorted(counts.items()))))
for c in bad:
    print("  FAILED %s: %s (close %s)" % c)
sys.exit(1 if bad or not results else 0)
EOF
