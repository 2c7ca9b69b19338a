#!/usr/bin/env bash
# Closed-loop round trips per second of one loadgen thread against the bundled echo server,
# each pinned to its own CPU (docs/LOADGEN.md, "Performance"). Usage:
#   loadgen/scripts/echo-ceiling.sh [WINDOW...]        (default windows: 64 256)
# Environment: LOADGEN (binary, default target/release/loadgen), DURATION (default 5),
# REPEAT (runs per window, default 3), PORT (default 19999), LG_CPU / ECHO_CPU (0 / 1).
set -euo pipefail
LOADGEN=${LOADGEN:-target/release/loadgen}
DURATION=${DURATION:-5}
REPEAT=${REPEAT:-3}
PORT=${PORT:-19999}
LG_CPU=${LG_CPU:-0}
ECHO_CPU=${ECHO_CPU:-1}
WINDOWS=("${@:-64 256}")
[ -x "$LOADGEN" ] || cargo build --release -p dynauth-loadgen
"$LOADGEN" echo-server --listen "127.0.0.1:$PORT" --threads 1 --cpus "$ECHO_CPU" &
ECHO=$!
trap 'kill $ECHO 2>/dev/null || true' EXIT
sleep 0.3
SUMMARY='
import json, sys
r = json.load(sys.stdin); g = r["generator"]; l = r["latency"]
cpu = g["cpu_ns_per_request"]
print("window %4d: %9.0f round trips/s  p50 %.0f us p99 %.0f us  %.0f ns CPU/request  worker busy %.0f%%  => %.0f/s per busy core"
      % (r["window"], r["achieved_rate_rps"], l["p50_us"], l["p99_us"], cpu, 100 * g["worker_utilisation"], 1e9 / max(cpu, 1)))
'
echo "# $(date -u +%FT%TZ) $(uname -r) load: $(cut -d' ' -f1-3 /proc/loadavg)"
for w in ${WINDOWS[@]}; do
  for _ in $(seq "$REPEAT"); do
    "$LOADGEN" --target "127.0.0.1:$PORT" --expect echo --mix coa=1 --window "$w" \
      --duration "$DURATION" --threads 1 --cpus "$LG_CPU" --json --quiet |
      python3 -c "$SUMMARY"
  done
done
