#!/usr/bin/env bash
# --state-dir against no state directory, same generator, same machine, back to back
# (docs/BENCHMARKS.md, "Durable state"). Loopback only, bounded; stops by itself.
#
#   cargo build --release -p dynauthd -p dynauth-loadgen --bins
#   scripts/bench-durable.sh storm SESSIONS     # a Disconnect storm, without then with --state-dir
#   scripts/bench-durable.sh restart SESSIONS   # start-up: --sessions FILE vs restore from the state dir
#
# Environment: DYNAUTHD (the server binary, default target/release/dynauthd), WINDOW
# (loadgen's outstanding requests, closed loop, default 128), RATE (open loop instead: the
# offered requests/s), BATCH (dynauthd --batch for both runs, default its own).
#
# dynauthd: one shard pinned to CPU 1, table-only data plane; loadgen on CPU 0, closed loop,
# 128 outstanding, every session disconnected once.
set -euo pipefail
cd "$(dirname "$0")/.."
WHAT=${1:?storm or restart}
N=${2:?sessions}
PORT=13798
FILE=/tmp/bench-durable-$N.jsonl
DIR=/tmp/bench-durable-state
[ -f "$FILE" ] || target/release/loadgen sessions --count "$N" --seed 1 --out "$FILE"
if ss -Hlun "sport = :$PORT" | grep -q .; then
    echo "port $PORT is taken: stop the earlier server first" >&2
    exit 1
fi
DPID=""
trap '[ -n "$DPID" ] && kill $DPID 2>/dev/null; true' EXIT

# Starts dynauthd with "$@"; waits for its banner; prints the seconds it took.
serve() {
    rm -f /tmp/bench-durable.out
    local t0; t0=$(date +%s.%N)
    "${DYNAUTHD:-target/release/dynauthd}" --listen 127.0.0.1:$PORT --client 127.0.0.1/32=bench-secret \
        --shards 1 --cpus 1 --io mmsg --stats-interval 0 ${BATCH:+--batch "$BATCH"} "$@" \
        > /tmp/bench-durable.out 2>/tmp/bench-durable.err &
    DPID=$!
    for _ in $(seq 1200); do grep -q "dynauthd listening" /tmp/bench-durable.out 2>/dev/null && break; sleep 0.05; done
    echo "ready after $(echo "$(date +%s.%N) - $t0" | bc) s: $*"
}
stop() { kill -TERM $DPID; wait $DPID 2>/dev/null || true; DPID=""; }
storm() {
    local shape=(--window "${WINDOW:-128}")
    [ -n "${RATE:-}" ] && shape=(--rate "$RATE")
    target/release/loadgen --target 127.0.0.1:$PORT --secret bench-secret --synthetic "$N" \
        --profile mass-disconnect "${shape[@]}" --threads 1 --cpus 0 --server-pid "$DPID"
}

case "$WHAT" in
    storm)
        serve --sessions "$FILE"; storm; stop
        rm -rf "$DIR"
        serve --sessions "$FILE" --state-dir "$DIR"; storm; stop
        grep -h "state:" /tmp/bench-durable.err | tail -3
        ;;
    restart)
        serve --sessions "$FILE"; stop
        rm -rf "$DIR"
        serve --sessions "$FILE" --state-dir "$DIR"; stop     # the import + first snapshot
        serve --state-dir "$DIR"                             # restore from the snapshot
        grep -h "state: restored" /tmp/bench-durable.err
        kill -KILL $DPID; wait $DPID 2>/dev/null || true; DPID=""
        du -sh "$DIR"
        ;;
    *) echo "storm or restart" >&2; exit 2 ;;
esac
