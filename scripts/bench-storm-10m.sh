#!/usr/bin/env bash
# A Disconnect storm over a 10M-session table while a session feed keeps inserting, drawn as a
# time series (docs/BENCHMARKS.md, "Storm over 10M sessions"). Loopback only, bounded in time;
# stops by itself.
#
#   cargo build --release -p dynauthd -p dynauth-loadgen -p dynauth-bench-harness --bins \
#       --example commit_agent
#   target/release/loadgen sessions --count 10000000 --out /tmp/s10m.jsonl
#   scripts/bench-storm-10m.sh /tmp/s10m.jsonl 10000000 OUT.svg
#
# dynauthd (table-only, one shard on CPU 1) loads FILE. loadgen (CPU 0) sends 20 s of
# Disconnect-Requests (90 %, targets drawn uniformly over the whole table) and requests for
# unknown sessions (10 %), 128 outstanding; from second 5 on, commit_agent (CPU 0) feeds
# 500,000 new sessions over the control socket. The JSON report's time series becomes OUT.svg.
set -euo pipefail
cd "$(dirname "$0")/.."
FILE=${1:?sessions file}
N=${2:?sessions in the file}
OUT=${3:?svg to write}
SOCK=/tmp/bench-storm.$$.sock
PORT=13797
if ss -Hlun "sport = :$PORT" | grep -q .; then
    echo "port $PORT is taken: stop the earlier server first" >&2
    exit 1
fi
target/release/dynauthd --listen 127.0.0.1:$PORT --client 127.0.0.1/32=bench-secret \
    --shards 1 --cpus 1 --io mmsg --control "$SOCK" --data-plane table --sessions "$FILE" \
    > /tmp/bench-storm-dynauthd.log 2>&1 &
DPID=$!
APID=""
trap 'kill $DPID $APID 2>/dev/null || true; rm -f "$SOCK"' EXIT
for _ in $(seq 1200); do [ -S "$SOCK" ] && break; sleep 0.1; done
(
    sleep 5
    exec taskset -c 0 target/release/examples/commit_agent "$SOCK" feed 500000 1 --feed-only \
        --from="$N" > /tmp/bench-storm-agent.log 2>&1
) &
APID=$!
target/release/loadgen --target 127.0.0.1:$PORT --secret bench-secret --synthetic "$N" \
    --targets uniform --mix disconnect=9,unknown=1 --duration 20s --window 128 --threads 1 \
    --cpus 0 --json > /tmp/bench-storm.json || true
wait $APID || true
cat /tmp/bench-storm-agent.log
target/release/bench-harness series /tmp/bench-storm.json --out "$OUT"
python3 - <<'EOF'
import json
r = json.load(open("/tmp/bench-storm.json"))
print("requests", r["requests"], "answered", r["answered"], "timeouts", r["timeouts"],
      "rate", round(r["achieved_rate_rps"]), "p99 us", r["latency"]["p99_us"])
EOF
kill -INT $DPID
wait $DPID 2>/dev/null || true
