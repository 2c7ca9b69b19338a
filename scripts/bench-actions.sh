#!/usr/bin/env bash
# The action path against table-only mode, same generator, same machine (docs/BENCHMARKS.md,
# "Actions to the data plane"). Loopback only, bounded in time; stops by itself.
#
#   cargo build --release -p dynauthd -p dynauth-loadgen --bins --example commit_agent
#   scripts/bench-actions.sh agent|table SESSIONS [churn|storm]
#   DYNAUTHD=path/to/other/dynauthd scripts/bench-actions.sh ...   # another build of the server
#
# dynauthd: one shard pinned to CPU 1. commit_agent (owns NAS "bench", loads the sessions over
# the control socket, commits every action at once) and loadgen on CPU 0. churn: 10 s of CoA
# to known sessions (90 %) and unknown ones (10 %, NAK 503), 128 outstanding; storm: every
# session disconnected once, 128 outstanding.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:?agent or table}
N=${2:?sessions}
SHAPE=${3:-churn}
SOCK=/tmp/bench-actions.$$.sock
PORT=13799
if ss -Hlun "sport = :$PORT" | grep -q .; then
    echo "port $PORT is taken: stop the earlier server first" >&2
    exit 1
fi
"${DYNAUTHD:-target/release/dynauthd}" --listen 127.0.0.1:$PORT --client 127.0.0.1/32=bench-secret \
    --shards 1 --cpus 1 --io mmsg --control "$SOCK" --data-plane "$MODE" \
    > /tmp/bench-actions-dynauthd.log 2>&1 &
DPID=$!
APID=""
trap 'kill $DPID $APID 2>/dev/null || true; rm -f "$SOCK"' EXIT
for _ in $(seq 50); do [ -S "$SOCK" ] && break; sleep 0.1; done
FEED=""
[ "$MODE" = table ] && FEED=--feed-only
rm -f /tmp/bench-actions-agent.log
taskset -c 0 target/release/examples/commit_agent "$SOCK" bench "$N" 1 $FEED \
    > /tmp/bench-actions-agent.log 2>&1 &
APID=$!
for _ in $(seq 600); do grep -q ready /tmp/bench-actions-agent.log 2>/dev/null && break; sleep 0.1; done
cat /tmp/bench-actions-agent.log
case "$SHAPE" in
    churn) LOAD=(--mix coa=9,unknown=1 --duration 10s) ;;
    storm) LOAD=(--profile mass-disconnect) ;;
    *) echo "shape: churn or storm" >&2; exit 2 ;;
esac
target/release/loadgen --target 127.0.0.1:$PORT --secret bench-secret --synthetic "$N" \
    "${LOAD[@]}" --window 128 --threads 1 --cpus 0
kill -INT $DPID
wait $DPID 2>/dev/null || true
