#!/usr/bin/env bash
# One server under a fixed CPU budget, so that the server and not the generator is the
# bottleneck on a 2-vCPU machine (docs/BENCHMARKS.md, "a receive batch's MD5s four at a
# time"). Loopback only, bounded in time (5 s of load); stops by itself. Needs root (a cgroup).
#
#   cargo build --release -p dynauthd -p dynauth-loadgen --bins
#   target/release/loadgen sessions --count 1000000 --seed 1 --out /tmp/s1m.jsonl
#   QUOTA_US=5000 PERIOD_US=10000 scripts/bench-capped.sh echo
#   QUOTA_US=5000 PERIOD_US=10000 scripts/bench-capped.sh target/release/dynauthd
#
# The server (the echo ceiling, or the dynauthd binary given) runs on CPU 1; once it listens
# its threads move into a CPU quota of QUOTA_US per PERIOD_US (default half a CPU); loadgen
# runs outside it on CPU 0: Disconnects to uniformly drawn sessions of /tmp/s1m.jsonl
# (SESSIONS=), 10 % unknown, 256 outstanding. Prints loadgen's rate and the server's CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
SERVER=${1:?echo or the path of a dynauthd binary}
PORT=${PORT:-13905}
SESSIONS=${SESSIONS:-/tmp/s1m.jsonl}
QUOTA_US=${QUOTA_US:-5000}
PERIOD_US=${PERIOD_US:-10000}
if ss -Hlun "sport = :$PORT" | grep -q .; then
    echo "port $PORT is taken: stop the earlier server first" >&2
    exit 1
fi
if [ -d /sys/fs/cgroup/cpu ] && [ ! -f /sys/fs/cgroup/cgroup.controllers ]; then
    GROUP=/sys/fs/cgroup/cpu/dynauth-bench          # cgroup v1
    mkdir -p $GROUP
    echo "$PERIOD_US" > $GROUP/cpu.cfs_period_us
    echo "$QUOTA_US" > $GROUP/cpu.cfs_quota_us
    TASKS=$GROUP/tasks
else
    GROUP=/sys/fs/cgroup/dynauth-bench              # cgroup v2
    mkdir -p $GROUP
    echo "+cpu" > /sys/fs/cgroup/cgroup.subtree_control 2>/dev/null || true
    echo "$QUOTA_US $PERIOD_US" > $GROUP/cpu.max
    TASKS=$GROUP/cgroup.threads
fi
if [ "$SERVER" = echo ]; then
    target/release/loadgen echo-server --listen 127.0.0.1:$PORT --threads 1 --cpus 1 \
        > /tmp/bench-capped-server.log 2>&1 &
    EXPECT=(--expect echo)
else
    "$SERVER" --listen 127.0.0.1:$PORT --client 127.0.0.1/32=bench-secret --shards 1 --cpus 1 \
        --io mmsg --stats-interval 0 --sessions "$SESSIONS" > /tmp/bench-capped-server.log 2>&1 &
    EXPECT=()
fi
PID=$!
trap 'kill -TERM $PID 2>/dev/null || true' EXIT
for _ in $(seq 600); do ss -Hlun "sport = :$PORT" | grep -q . && break; sleep 0.1; done
sleep 1
for t in /proc/$PID/task/*; do basename "$t" > $TASKS; done
target/release/loadgen --target 127.0.0.1:$PORT --secret bench-secret --synthetic 1000000 \
    --mix disconnect=9,unknown=1 --targets uniform --duration 5s --window 256 --threads 1 \
    --cpus 0 --server-pid $PID "${EXPECT[@]}" | grep -E "^rate|^generator|^server CPU"
