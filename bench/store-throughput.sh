#!/usr/bin/env bash
# The cost of the shared store, side by side in one run on loopback:
#   direct        : smtp-source -> smtp-sink
#   relay memory  : smtp-source -> mailroute-relay (--store memory) -> smtp-sink
#   relay redis   : smtp-source -> mailroute-relay (--store redis://) -> smtp-sink
# The client is bound to the tenant by its IP range, so every recipient goes through the quota
# reserve and settle scripts, and every message through the delivery ledger lookup.
# Usage: bench/store-throughput.sh [MESSAGES]   (default 5000; bounded, stops by itself)
#        RELAY_BIN=path/to/mailroute-relay bench/store-throughput.sh   (another build)
# Needs postfix (smtp-source, smtp-sink) and redis-server, as scripts/test installs them.
set -euo pipefail
cd "$(dirname "$0")/.."
MESSAGES=${1:-5000}
WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

source bench/lib.sh

[[ -n "${RELAY_BIN:-}" ]] || cargo build --release --locked -q -p mailroute-relay
RELAY_BIN=${RELAY_BIN:-target/release/mailroute-relay}

start_sink

REDIS=$(free_port)
redis-server --bind 127.0.0.1 --port "$REDIS" --save '' --appendonly no >"$WORK/redis.log" 2>&1 & REDIS_PID=$!
PIDS+=($REDIS_PID)
wait_port "$REDIS"

write_manifests "$WORK/manifests" "  authentication: {ipRanges: [{cidr: 127.0.0.0/16}]}
  limits:
    perCustomer: {recipientsPerDay: 1000000000, recipientsPer10Minutes: 1000000000}"

start_relay() { # store -> prints "port pid"
  local port
  port=$(free_port)
  "$RELAY_BIN" --manifests "$WORK/manifests" --hostname relay.bench.example \
    --smtp 127.0.0.1:"$port" --max-sessions 1000 --max-sessions-per-ip 1000 --store "$1" >>"$WORK/relay.log" 2>&1 &
  wait_port "$port"
  echo "$port $!"
}
read -r MEM MEM_PID < <(start_relay memory)
read -r RED RED_PID < <(start_relay "redis://127.0.0.1:$REDIS/0")
PIDS+=("$MEM_PID" "$RED_PID")

run() { # port size concurrency
  local start end
  start=$(date +%s.%N)
  smtp-source -s "$3" -l "$2" -m "$MESSAGES" -f bench@bench.example -t user@bench.example \
    -M client.bench.example 127.0.0.1:"$1" >/dev/null
  end=$(date +%s.%N)
  awk -v m="$MESSAGES" -v a="$start" -v b="$end" 'BEGIN { print m / (b - a) }'
}
per_msg_us() { awk -v t="$1" -v hz="$(getconf CLK_TCK)" -v m="$MESSAGES" 'BEGIN { print t * 1000000 / hz / m }'; }

printf '%-6s %-5s %9s %11s %11s %9s %14s %14s %14s\n' size conc direct relay-mem relay-redis red/mem \
  mem-cpu-us redis-relay-us redis-server-us
for size in 1024; do
  for conc in 1 50; do
    direct=$(run "$SINK" "$size" "$conc")
    b=$(clock_ticks "$MEM_PID"); mem=$(run "$MEM" "$size" "$conc"); a=$(clock_ticks "$MEM_PID")
    mem_cpu=$(per_msg_us $((a - b)))
    b=$(clock_ticks "$RED_PID"); rb=$(clock_ticks "$REDIS_PID")
    red=$(run "$RED" "$size" "$conc")
    a=$(clock_ticks "$RED_PID"); ra=$(clock_ticks "$REDIS_PID")
    printf '%-6s %-5s %9.0f %11.0f %11.0f %9.2f %14.0f %14.0f %14.0f\n' "$size" "$conc" \
      "$direct" "$mem" "$red" "$(awk -v a="$red" -v b="$mem" 'BEGIN { print a / b }')" \
      "$mem_cpu" "$(per_msg_us $((a - b)))" "$(per_msg_us $((ra - rb)))"
  done
done
echo "redis keys after the run: $(redis-cli -p "$REDIS" dbsize)"
