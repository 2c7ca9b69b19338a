#!/usr/bin/env bash
# The session feed into a large table while CoA/Disconnect traffic runs (docs/BENCHMARKS.md,
# "Session feed into a large table"). Loopback only, bounded in time; stops by itself.
#
#   cargo build --release -p dynauthd -p dynauth-loadgen --bins --example commit_agent
#   target/release/loadgen sessions --count 10000000 --out /tmp/s10m.jsonl
#   scripts/bench-feed.sh /tmp/s10m.jsonl 10000000 1000000
#   DYNAUTHD=path/to/other/dynauthd scripts/bench-feed.sh ...   # another build of the server
#
# dynauthd (table-only, one shard on CPU 1) loads FILE (N sessions). Then loadgen runs 10 s of
# CoA (90 %) and unknown-session (10 %) requests against them twice: alone, and while
# commit_agent (on CPU 0 with loadgen) feeds FEED new sessions over the control socket in
# batches of 1,000 (as fast as it can, or at FEED_RATE upserts/s). Prints both loadgen rates
# and the feed rate.
set -euo pipefail
cd "$(dirname "$0")/.."
FILE=${1:?sessions file}
N=${2:?sessions in the file}
FEED=${3:?sessions to feed}
SOCK=/tmp/bench-feed.$$.sock
PORT=13798
if ss -Hlun "sport = :$PORT" | grep -q .; then
    echo "port $PORT is taken: stop the earlier server first" >&2
    exit 1
fi
"${DYNAUTHD:-target/release/dynauthd}" --listen 127.0.0.1:$PORT --client 127.0.0.1/32=bench-secret \
    --shards 1 --cpus 1 --io mmsg --control "$SOCK" --data-plane table --sessions "$FILE" \
    > /tmp/bench-feed-dynauthd.log 2>&1 &
DPID=$!
trap 'kill $DPID 2>/dev/null || true; rm -f "$SOCK"' EXIT
started=$(date +%s.%N)
for _ in $(seq 1200); do [ -S "$SOCK" ] && break; sleep 0.1; done
echo "dynauthd ready with $N sessions after $(echo "$(date +%s.%N) - $started" | bc) s"
load() {
    target/release/loadgen --target 127.0.0.1:$PORT --secret bench-secret --synthetic "$N" \
        --mix coa=9,unknown=1 --duration 10s --window 128 --threads 1 --cpus 0 |
        grep -E "^rate|^latency"
}
echo "== lookups alone"
load
echo "== lookups while the feed runs"
taskset -c 0 target/release/examples/commit_agent "$SOCK" feed "$FEED" 1 --feed-only --from="$N" \
    ${FEED_RATE:+--rate=$FEED_RATE} \
    > /tmp/bench-feed-agent.log 2>&1 &
APID=$!
load
wait $APID || true
cat /tmp/bench-feed-agent.log
kill -INT $DPID
wait $DPID 2>/dev/null || true
