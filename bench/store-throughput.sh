#!/usr/bin/env bash
# The cost of the shared store, side by side in one run on loopback:
#   direct    : smtp-source -> smtp-sink
#   memory    : smtp-source -> mailroute-relay (--store memory) -> smtp-sink
#   redis     : the same relay on one redis-server (--store redis://)
#   sentinel  : on a master, its replica and three sentinels (--store redis-sentinel://)
#   cluster   : on a Redis Cluster of three masters (--store redis-cluster://)
# The client is bound to the tenant by its IP range, so every recipient goes through the quota
# reserve and settle scripts, and every message through the delivery ledger lookup.
# Columns: messages a second, the ratio to memory, relay CPU and Redis CPU (every data node
# together) in microseconds per message, and per message the Redis commands processed and the
# bytes in and out of the data nodes (replication to the replica included).
# Usage: bench/store-throughput.sh [MESSAGES]   (default 5000; bounded, stops by itself)
#        RELAY_BIN=path/to/mailroute-relay bench/store-throughput.sh   (another build)
#        STORES="memory redis" bench/store-throughput.sh   (a subset)
#        ROUNDS=3 bench/store-throughput.sh   (every store again, in turn, that many times, then
#        the median ratio to memory per store: a neighbour's load moves single runs a lot)
# Needs postfix (smtp-source, smtp-sink), redis-server and redis-sentinel, as scripts/test
# installs them.
set -euo pipefail
cd "$(dirname "$0")/.."
MESSAGES=${1:-5000}
STORES=${STORES:-memory redis sentinel cluster}
ROUNDS=${ROUNDS:-1}
source bench/lib.sh
bench_start

start_sink

redis_node() { # port [extra args...] ; appends the pid to PIDS
  local port=$1
  shift
  (cd "$WORK" && exec redis-server --bind 127.0.0.1 --port "$port" --save '' --appendonly no \
    --protected-mode no "$@" >>"$WORK/redis-$port.log" 2>&1) & PIDS+=($!)
  wait_port "$port"
}
pid_of_port() { ss -ltnpH "sport = :$1" | sed -n 's/.*pid=\([0-9]*\).*/\1/p' | head -1; }

declare -A URL NODES
# One server.
R=$(free_port); redis_node "$R"
URL[redis]="redis://127.0.0.1:$R/0"; NODES[redis]="$R"
# Sentinel: master, replica, three sentinels (quorum 2).
if [[ " $STORES " == *" sentinel "* ]]; then
  M=$(free_port); S=$(free_port)
  redis_node "$M"; redis_node "$S" --replicaof 127.0.0.1 "$M"
  hosts=()
  for i in 1 2 3; do
    p=$(free_port)
    printf 'port %s\nbind 127.0.0.1\nprotected-mode no\nsentinel monitor bench 127.0.0.1 %s 2\n' "$p" "$M" \
      >"$WORK/sentinel-$i.conf"
    redis-sentinel "$WORK/sentinel-$i.conf" >>"$WORK/sentinel-$i.log" 2>&1 & PIDS+=($!)
    wait_port "$p"; hosts+=("127.0.0.1:$p")
  done
  URL[sentinel]="redis-sentinel://$(IFS=,; echo "${hosts[*]}")/bench/0"; NODES[sentinel]="$M $S"
fi
# Cluster: three masters.
if [[ " $STORES " == *" cluster "* ]]; then
  nodes=(); ports=()
  for i in 1 2 3; do
    p=$(free_port)
    # The bus port is named: the default (port + 10000) is past 65535 for some free ports.
    redis_node "$p" --cluster-enabled yes --cluster-config-file "nodes-$p.conf" --cluster-port "$(free_port)"
    nodes+=("127.0.0.1:$p"); ports+=("$p")
  done
  redis-cli --cluster create "${nodes[@]}" --cluster-replicas 0 --cluster-yes >"$WORK/cluster.log"
  for _ in $(seq 100); do
    redis-cli -p "${ports[0]}" cluster info | grep -q cluster_state:ok && break
    sleep 0.1
  done
  URL[cluster]="redis-cluster://$(IFS=,; echo "${nodes[*]}")"; NODES[cluster]="${ports[*]}"
fi
URL[memory]=memory; NODES[memory]=""

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
declare -A PORT PID
for s in $STORES; do
  read -r PORT[$s] PID[$s] < <(start_relay "${URL[$s]}")
  PIDS+=("${PID[$s]}")
done

run() { # port size concurrency -> messages a second
  local start end
  start=$(date +%s.%N)
  smtp-source -s "$3" -l "$2" -m "$MESSAGES" -f bench@bench.example -t user@bench.example \
    -M client.bench.example 127.0.0.1:"$1" >/dev/null
  end=$(date +%s.%N)
  awk -v m="$MESSAGES" -v a="$start" -v b="$end" 'BEGIN { print m / (b - a) }'
}
per_msg_us() { awk -v t="$1" -v hz="$(getconf CLK_TCK)" -v m="$MESSAGES" 'BEGIN { print t * 1000000 / hz / m }'; }
# Sums over the store's data nodes: CPU ticks, commands processed, bytes in and out.
node_ticks() { local t=0; for p in $1; do t=$((t + $(clock_ticks "$(pid_of_port "$p")"))); done; echo "$t"; }
node_stat() { # ports field...
  local ports=$1 sum=0 p f v
  shift
  for p in $ports; do
    for f in "$@"; do
      v=$(redis-cli -p "$p" info stats | tr -d '\r' | sed -n "s/^$f://p")
      sum=$((sum + ${v:-0}))
    done
  done
  echo "$sum"
}

printf '%-9s %-5s %9s %8s %9s %10s %9s %10s\n' store conc msg/s vs-mem relay-us redis-us ops/msg bytes/msg
declare -A RATIOS
for round in $(seq "$ROUNDS"); do
  for conc in 1 50; do
    size=1024
    direct=$(run "$SINK" "$size" "$conc")
    printf '%-9s %-5s %9.0f\n' direct "$conc" "$direct"
    mem=""
    for s in $STORES; do
      n=${NODES[$s]}
      rb=$(clock_ticks "${PID[$s]}"); nb=$(node_ticks "$n")
      ob=$(node_stat "$n" total_commands_processed)
      bb=$(node_stat "$n" total_net_input_bytes total_net_output_bytes)
      rate=$(run "${PORT[$s]}" "$size" "$conc")
      ra=$(clock_ticks "${PID[$s]}"); na=$(node_ticks "$n")
      oa=$(node_stat "$n" total_commands_processed)
      ba=$(node_stat "$n" total_net_input_bytes total_net_output_bytes)
      [[ -n "$mem" ]] || mem=$rate
      RATIOS[$s $conc]+=" $(awk -v a="$rate" -v b="$mem" 'BEGIN { print a / b }')"
      printf '%-9s %-5s %9.0f %8.2f %9.0f %10.0f %9.1f %10.0f\n' "$s" "$conc" "$rate" \
        "$(awk -v a="$rate" -v b="$mem" 'BEGIN { print a / b }')" \
        "$(per_msg_us $((ra - rb)))" "$(per_msg_us $((na - nb)))" \
        "$(awk -v d=$((oa - ob)) -v m="$MESSAGES" 'BEGIN { print d / m }')" \
        "$(awk -v d=$((ba - bb)) -v m="$MESSAGES" 'BEGIN { print d / m }')"
    done
  done
done
if ((ROUNDS > 1)); then
  echo "median ratio to memory over $ROUNDS rounds (each round's ratios):"
  for conc in 1 50; do
    for s in $STORES; do
      # shellcheck disable=SC2086
      printf '%-9s %-5s %6.2f   (%s )\n' "$s" "$conc" \
        "$(printf '%s\n' ${RATIOS[$s $conc]} | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }')" \
        "${RATIOS[$s $conc]}"
    done
  done
fi
