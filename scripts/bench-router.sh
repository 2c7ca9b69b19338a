#!/usr/bin/env bash
# The routing tier side by side (docs/BENCHMARKS.md, "Routing tier"): the same CoA load
# direct to an owner, through one router, through two routers, and through one router with
# no affinity cache (every request a Redis round trip). One run, one machine, loopback only,
# bounded in time; every process it starts is stopped at the end.
#
#   cargo build --release -p dynauthd -p dynauth-loadgen --bins
#   scripts/bench-router.sh [SESSIONS] [SECONDS]
#
# WINDOW (environment, default 64): requests outstanding per path (two generators of half
# that for the two-router path). A closed loop with few outstanding measures the path's
# latency as much as its capacity: raise it to compare capacities.
#
# CPU 1: the owner (one shard), the router(s) (one shard each), redis-server. CPU 0: loadgen
# (closed loop, 64 outstanding per generator; with two routers, two generators of 32 each).
# The owner publishes its sessions to Redis itself (--affinity-redis).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-100000}
SECS=${2:-10}
RPORT=16390
OWNER=13801
R1=13802
R2=13803
for p in $OWNER $R1 $R2; do
    if ss -Hlun "sport = :$p" | grep -q .; then
        echo "port $p is taken: stop the earlier server first" >&2
        exit 1
    fi
done
if ss -Hltn "sport = :$RPORT" | grep -q .; then
    echo "port $RPORT is taken: stop the earlier redis first" >&2
    exit 1
fi
TMP=$(mktemp -d /tmp/bench-router.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$TMP"
}
trap cleanup EXIT
echo owner-secret > "$TMP/owner.secret"
target/release/loadgen sessions --count "$N" --seed 7 --out "$TMP/sessions.jsonl"

taskset -c 1 redis-server --bind 127.0.0.1 --port $RPORT --save '' --appendonly no \
    > "$TMP/redis.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do redis-cli -p $RPORT ping 2>/dev/null | grep -q PONG && break; sleep 0.05; done

start() { # LOG ARGS...: starts a dynauthd, waits for its banner
    local log=$1
    shift
    target/release/dynauthd "$@" > "$log" 2> "$log.err" &
    PIDS+=($!)
    for _ in $(seq 600); do grep -q "dynauthd listening" "$log" && return 0; sleep 0.05; done
    echo "dynauthd did not start: $*" >&2
    cat "$log.err" >&2
    exit 1
}
start "$TMP/owner.log" --listen 127.0.0.1:$OWNER --client 127.0.0.1/32=owner-secret \
    --sessions "$TMP/sessions.jsonl" --shards 1 --cpus 1 --io mmsg \
    --affinity-redis redis://127.0.0.1:$RPORT --owner-id bench-owner \
    --owner-address 127.0.0.1:$OWNER --metrics 127.0.0.1:19801
# The owner publishes its whole table at start; wait until Redis has every session.
for _ in $(seq 1200); do
    KEYS=$(redis-cli -p $RPORT dbsize)
    [ "$KEYS" -ge "$N" ] && break
    sleep 0.1
done
echo "redis holds $(redis-cli -p $RPORT dbsize) keys for $N sessions ($(redis-cli -p $RPORT info memory | grep used_memory_human))"

router() { # PORT METRICS EXTRA...
    local port=$1 metrics=$2
    shift 2
    start "$TMP/router-$port.log" --role router --listen 127.0.0.1:$port \
        --client 127.0.0.1/32=dac-secret --affinity-redis redis://127.0.0.1:$RPORT \
        --owner-secret-file "$TMP/owner.secret" --forward-bind 127.0.0.1:0 \
        --shards 1 --cpus 1 --io mmsg --metrics 127.0.0.1:$metrics "$@"
}
router $R1 19802
router $R2 19803

load() { # TARGET SECRET WINDOW OUT
    taskset -c 0 target/release/loadgen --target "$1" --secret "$2" --synthetic "$N" --seed 7 \
        --mix coa=1 --targets uniform --duration "${SECS}s" --window "$3" --threads 1 \
        --json > "$4"
}
summary() { # NAME JSON...
    python3 - "$@" <<'EOF'
import json, sys
name, files = sys.argv[1], sys.argv[2:]
rate = p50 = p99 = 0.0
answered = timeouts = 0
for f in files:
    r = json.load(open(f))
    rate += r["achieved_rate_rps"]
    p50 = max(p50, r["latency"]["p50_us"] / 1000)
    p99 = max(p99, r["latency"]["p99_us"] / 1000)
    answered += r["answered"]
    timeouts += r["timeouts"]
print(f"{name}\t{rate:.0f}\t{p50:.3f}\t{p99:.3f}\t{answered}\t{timeouts}")
EOF
}
scrape() { curl -s "127.0.0.1:$1/metrics" | grep -E "^$2 " | awk '{print $2}'; }

echo "== direct to the owner"
W=${WINDOW:-64}
load 127.0.0.1:$OWNER owner-secret "$W" "$TMP/direct.json"
echo "== through one router (cache on)"
load 127.0.0.1:$R1 dac-secret "$W" "$TMP/r1.json"
R1_REQ=$(scrape 19802 dynauth_router_forwarded_total)
R1_RT=$(scrape 19802 dynauth_router_redis_round_trips_total)
R1_US=$(scrape 19802 dynauth_router_redis_seconds_sum)
R1_HIT=$(scrape 19802 dynauth_router_cache_hit_ratio)
echo "== through two routers at once (two generators, 32 outstanding each)"
load 127.0.0.1:$R1 dac-secret $((W / 2)) "$TMP/r2a.json" &
LA=$!
load 127.0.0.1:$R2 dac-secret $((W / 2)) "$TMP/r2b.json"
wait $LA
echo "== through one router, no cache (--affinity-cache-ttl 0s)"
R2PID=${PIDS[-1]}   # router 2: stopped, then started again without a cache
kill "$R2PID" 2>/dev/null || true
wait "$R2PID" 2>/dev/null || true
router $R2 19803 --affinity-cache-ttl 0s
load 127.0.0.1:$R2 dac-secret "$W" "$TMP/nocache.json"
NC_REQ=$(scrape 19803 dynauth_router_forwarded_total)
NC_RT=$(scrape 19803 dynauth_router_redis_round_trips_total)
NC_US=$(scrape 19803 dynauth_router_redis_seconds_sum)

echo
printf 'path\tanswers/s\tp50 ms\tp99 ms\tanswered\ttimeouts\n'
summary "direct" "$TMP/direct.json"
summary "1 router" "$TMP/r1.json"
summary "2 routers" "$TMP/r2a.json" "$TMP/r2b.json"
summary "1 router, no cache" "$TMP/nocache.json"
python3 - "$R1_REQ" "$R1_RT" "$R1_US" "$R1_HIT" "$NC_REQ" "$NC_RT" "$NC_US" <<'EOF'
import sys
r1_req, r1_rt, r1_s, hit, nc_req, nc_rt, nc_s = map(float, sys.argv[1:])
print()
print(f"router, cache on : {r1_rt/r1_req:.4f} Redis round trips per request, hit ratio {hit:.4f}, "
      f"{1e6*r1_s/max(r1_rt,1):.1f} us per round trip, {1e6*r1_s/r1_req:.2f} us of Redis per request")
print(f"router, no cache : {nc_rt/nc_req:.4f} Redis round trips per request, "
      f"{1e6*nc_s/max(nc_rt,1):.1f} us per round trip, {1e6*nc_s/nc_req:.2f} us of Redis per request")
EOF
