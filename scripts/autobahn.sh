#!/usr/bin/env bash
# Autobahn|Testsuite (fuzzingclient) against the gateway's `/echo` route: by default the
# permessage-deflate cases 12.* and 13.*; other cases as arguments (e.g. '1.*' '9.*').
# Needs Python 2.7 (the suite's last release runs on it only): env PYTHON2, or else
# Debian 11's Python 2.7 packages unpacked into target/autobahn. Installs autobahntestsuite from PyPI into target/autobahn/py, builds and starts the gateway
# binary, writes the report to target/autobahn/report, and fails unless every case's
# behaviour is OK, NON-STRICT or INFORMATIONAL (close: OK or INFORMATIONAL).
# scripts/test.sh runs every case but the long deflate groups 12.2-12.5 and 13.2-13.7.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=target/autobahn
mkdir -p "$dir"

# Python 2.7: env PYTHON2, else Debian 11's packages unpacked into
# $dir/python2.7 (Debian 12 has no Python 2.7), fetched with apt from the machine's own
# Debian mirror with a private apt state (nothing is installed system-wide).
unpacked_python2() {
  local root="$PWD/$dir/python2.7"
  if [ ! -x "$root/python" ]; then
    echo "==> Python 2.7 from Debian 11 (bullseye) packages, unpacked into $dir/python2.7" >&2
    local mirror
    mirror="$(grep -hoE '^URIs: *[^ ]+' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -1 | sed 's/^URIs: *//')"
    [ -n "$mirror" ] || mirror="$(grep -hoE '^deb +[^ ]+' /etc/apt/sources.list 2>/dev/null | head -1 | sed 's/^deb *//')"
    [ -n "$mirror" ] || { echo "autobahn: no Debian mirror in the apt sources" >&2; exit 2; }
    rm -rf "$root" && mkdir -p "$root/apt/lists/partial" "$root/apt/cache/archives/partial" "$root/debs" "$root/fs"
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror bullseye main" >"$root/apt/sources.list"
    local opts=(-o "Dir::Etc::sourcelist=$root/apt/sources.list" -o "Dir::Etc::sourceparts=-"
      -o "Dir::State::Lists=$root/apt/lists" -o "Dir::Cache=$root/apt/cache" -o "APT::Sandbox::User=root" -qq)
    apt-get "${opts[@]}" update >&2
    (cd "$root/debs" && apt-get "${opts[@]}" download python2.7 python2.7-minimal libpython2.7-minimal \
      libpython2.7-stdlib libpython2.7-dev python2.7-dev libssl1.1 libffi7 >&2)
    for d in "$root"/debs/*.deb; do dpkg -x "$d" "$root/fs"; done
    python3 -m pip download --quiet --disable-pip-version-check --no-deps -d "$root/wheels" \
      pip==20.3.4 setuptools==44.1.1 wheel==0.37.1 >&2
    local f="$root/fs"
    cat >"$root/python" <<EOS
#!/bin/sh
export LD_LIBRARY_PATH="$f/usr/lib/x86_64-linux-gnu:$f/lib/x86_64-linux-gnu" PYTHONHOME="$f/usr"
export PYTHONPATH="\${PYTHONPATH:+\$PYTHONPATH:}$root/base" PYTHONWARNINGS=ignore
export CFLAGS="-I$f/usr/include -I$f/usr/include/python2.7 -I$f/usr/include/x86_64-linux-gnu/python2.7" LDFLAGS="-L$f/usr/lib/x86_64-linux-gnu"
exec "$f/usr/bin/python2.7" "\$@"
EOS
    chmod +x "$root/python"
    PYTHONPATH="$root/wheels/pip-20.3.4-py2.py3-none-any.whl" "$root/python" -m pip install --quiet \
      --disable-pip-version-check --no-index --find-links "$root/wheels" --target "$root/base" pip setuptools wheel >&2
  fi
  echo "$root/python"
}
# Only the unpacked one unless PYTHON2 names another: a `python2.7` found on PATH may be a
# pyenv shim of a version not selected (CI's is, and fails), or lack `wheel`, which
# autobahntestsuite's wsaccel needs to build.
py="${PYTHON2:-}"
[ -n "$py" ] || py="$(unpacked_python2)"
"$py" -c 'import sys; assert sys.version_info[:2] == (2, 7), sys.version' \
  || { echo "autobahn: needs Python 2.7 (set PYTHON2)"; exit 2; }
if [ ! -d "$dir/py/autobahntestsuite" ]; then
  echo "==> pip install autobahntestsuite (Python 2.7, into $dir/py)"
  "$py" -m pip install --quiet --disable-pip-version-check --no-build-isolation --target "$dir/py" \
    autobahntestsuite==25.10.1 2>&1 | grep -v DEPRECATION || true
  [ -d "$dir/py/autobahntestsuite" ] || { echo "autobahn: autobahntestsuite did not install"; exit 2; }
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
