#!/usr/bin/env bash
# How many messages a second one Redis core can decide for (docs/scaling.md).
#
# 1. redis-benchmark against one redis-server (no persistence), with the exact commands a relay
#    sends for a single-recipient message of a tenant bound by its IP range (two counters): the
#    reservation script, the ledger lookup (EXISTS), and the settlement script for a gathered
#    batch of 10 holds. 50 clients, with and without pipelining; requests a second each.
# 2. 1, 2 and 3 relay processes on that one Redis, each fed by its own smtp-source (1 KiB,
#    concurrency 50) at once: messages a second together, and the share of one core the
#    redis-server used. On this 2-core machine the relays saturate the cores long before Redis
#    does; Redis's microseconds per message then give its ceiling.
# Usage: bench/store-ceiling.sh [MESSAGES_PER_RELAY]   (default 4000; bounded, stops by itself)
#        RELAY_BIN=path/to/mailroute-relay bench/store-ceiling.sh
set -euo pipefail
cd "$(dirname "$0")/.."
MESSAGES=${1:-4000}
source bench/lib.sh
bench_start

R=$(free_port)
(cd "$WORK" && exec redis-server --bind 127.0.0.1 --port "$R" --save '' --appendonly no \
  --protected-mode no >"$WORK/redis.log" 2>&1) & RPID=$!; PIDS+=($RPID)
wait_port "$R"
cli() { redis-cli -p "$R" "$@"; }

echo "== redis-benchmark: requests a second (50 clients)"
reserve=$(cli SCRIPT LOAD "$(cat store/src/reserve.lua)")
finish=$(cli SCRIPT LOAD "$(cat store/src/finish.lua)")
now=$(date +%s%3N)
t="mailroute:{bench}:customer"
reserve_cmd=(EVALSHA "$reserve" 4 "$t:day:n" "$t:day:h" "$t:10m:n" "$t:10m:h"
  "$now" "hold:__rand_int__" $((now + 900000))
  1000000000 86400000 3600000 1 "" 1000000000 600000 25000 1 "")
keys=(); args=()
for i in $(seq 10); do
  keys+=("$t:day:n" "$t:day:h" "$t:day:u:0" "$t:10m:n" "$t:10m:h" "$t:10m:u:0")
  args+=("hold:$i" 86400000 3600000 1 "" "hold:$i" 600000 25000 1 "")
done
finish_cmd=(EVALSHA "$finish" "${#keys[@]}" "${keys[@]}" "$now" 1 "${args[@]}")
exists_cmd=(EXISTS "mailroute:ledger:{01234567}:0123456789abcdef__rand_int__")
declare -A RPS
for p in 1 16; do
  for name in reserve exists finish; do
    declare -n cmd="${name}_cmd"
    rps=$(redis-benchmark -p "$R" -c 50 -P "$p" -n 200000 -r 1000000 -q "${cmd[@]}" 2>/dev/null \
      | tr '\r' '\n' | sed -n 's/.*: \([0-9.]*\) requests per second.*/\1/p' | tail -1)
    RPS[$name.$p]=$rps
    printf '%-8s pipeline %-3s %10.0f/s\n' "$name" "$p" "$rps"
  done
done
for p in 1 16; do
  awk -v r="${RPS[reserve.$p]}" -v e="${RPS[exists.$p]}" -v f="${RPS[finish.$p]}" -v p="$p" \
    'BEGIN { printf "one core, pipeline %s: %.0f messages/s (1 reservation + 1 lookup + 1/10 settlement batch)\n", p, 1 / (1/r + 1/e + 1/(10*f)) }'
done
cli FLUSHALL >/dev/null

echo "== relays on one Redis (1 KiB, concurrency 50 each)"
start_sink
write_manifests "$WORK/manifests" "  authentication: {ipRanges: [{cidr: 127.0.0.0/16}]}
  limits:
    perCustomer: {recipientsPerDay: 1000000000, recipientsPer10Minutes: 1000000000}"
RELAYS=()
for i in 1 2 3; do
  port=$(free_port)
  "$RELAY_BIN" --manifests "$WORK/manifests" --hostname "relay$i.bench.example" \
    --smtp 127.0.0.1:"$port" --max-sessions 1000 --max-sessions-per-ip 1000 \
    --store "redis://127.0.0.1:$R/0" >>"$WORK/relay.log" 2>&1 & PIDS+=($!)
  wait_port "$port"; RELAYS+=("$port")
done
printf '%-7s %9s %14s %12s %10s\n' relays msg/s redis-core-% redis-us/msg ops/msg
for n in 1 2 3; do
  ticks_before=$(clock_ticks "$RPID")
  ops_before=$(cli info stats | tr -d '\r' | sed -n 's/^total_commands_processed://p')
  start=$(date +%s.%N)
  loads=()
  for port in "${RELAYS[@]:0:$n}"; do
    smtp-source -s 50 -l 1024 -m "$MESSAGES" -f bench@bench.example -t user@bench.example \
      -M client.bench.example 127.0.0.1:"$port" >/dev/null & loads+=($!)
  done
  wait "${loads[@]}"
  end=$(date +%s.%N)
  ticks=$(( $(clock_ticks "$RPID") - ticks_before ))
  ops=$(( $(cli info stats | tr -d '\r' | sed -n 's/^total_commands_processed://p') - ops_before ))
  awk -v n="$n" -v m=$((n * MESSAGES)) -v a="$start" -v b="$end" -v t="$ticks" \
    -v hz="$(getconf CLK_TCK)" -v o="$ops" 'BEGIN {
      s = b - a; printf "%-7s %9.0f %14.0f %12.1f %10.1f\n", n, m / s, 100 * t / hz / s,
        t * 1e6 / hz / m, o / m }'
done

echo "== memory"
# The tenant's quota keys after the load above (two windows: counts and holds).
total=0
while read -r key; do
  [[ -n "$key" ]] || continue
  used=$(cli MEMORY USAGE "$key")
  printf '%-40s %6s bytes\n' "$key" "$used"
  total=$((total + used))
done < <(cli --scan --pattern 'mailroute:{bench}:*')
echo "tenant quota keys: $total bytes"
# Ledger entries as the relay writes them (16 octets in hex, a 4-octet message tag, 5 days'
# expiry): 100,000 of them.
cli FLUSHALL >/dev/null
before=$(cli info memory | tr -d '\r' | sed -n 's/^used_memory://p')
python3 - <<'PY' | cli --pipe >/dev/null
import hashlib
for i in range(100000):
    h = hashlib.sha256(str(i).encode()).hexdigest()
    k = "mailroute:ledger:{%s}:%s" % (h[:8], h[8:32])  # 16 octets, 4 of them the tag
    print("*5\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$1\r\n1\r\n$2\r\nPX\r\n$9\r\n432000000\r" % (len(k), k))
PY
after=$(cli info memory | tr -d '\r' | sed -n 's/^used_memory://p')
echo "ledger: $(cli DBSIZE) entries, $(( (after - before) / 100000 )) bytes each"
