#!/usr/bin/env bash
# End-to-end throughput on loopback, side by side in one run (SPEC section 10):
#   direct  : smtp-source -> smtp-sink                  (the physical limit of this path)
#   relay   : smtp-source -> mailroute-relay -> smtp-sink
#   postfix : smtp-source -> Postfix (relayhost) -> smtp-sink
# for 1 KiB and 100 KiB messages at concurrency 1 and 50, plus the relay's CPU per message.
# Usage: bench/relay-throughput.sh [MESSAGES]   (default 5000; bounded, stops by itself)
#        RELAY_BIN=path/to/mailroute-relay bench/relay-throughput.sh   (another build, e.g. before a change)
# Needs postfix (smtp-source, smtp-sink, postfix) as scripts/test installs it; run as root
# (Postfix's own daemons drop privileges). Figures go to stdout; docs/benchmarks.md keeps them.
set -euo pipefail
cd "$(dirname "$0")/.."
MESSAGES=${1:-5000}
source bench/lib.sh
bench_start

start_sink
# Every load comes from 127.0.0.1 (an older build, measured for comparison, lacks the flag).
PER_IP=""
"$RELAY_BIN" --help | grep -q -- --max-sessions-per-ip && PER_IP="--max-sessions-per-ip 1000"

# The relay: one tenant whose mailbox route is the sink.
RELAY=$(free_port)
write_manifests "$WORK/manifests"
"$RELAY_BIN" --manifests "$WORK/manifests" --hostname relay.bench.example \
  --smtp 127.0.0.1:"$RELAY" --max-sessions 1000 $PER_IP >"$WORK/relay.log" 2>&1 & RELAY_PID=$!
PIDS+=($RELAY_PID)
wait_port "$RELAY"

# Postfix as a relay to the same sink.
start_postfix

# Runs smtp-source; prints messages per second.
run() { # port size concurrency
  local start end
  start=$(date +%s.%N)
  smtp-source -s "$3" -l "$2" -m "$MESSAGES" -f bench@bench.example -t user@bench.example \
    -M client.bench.example 127.0.0.1:"$1" >/dev/null
  end=$(date +%s.%N)
  awk -v m="$MESSAGES" -v a="$start" -v b="$end" 'BEGIN { print m / (b - a) }'
}

run_postfix() {
  local start end
  start=$(date +%s.%N)
  smtp-source -s "$3" -l "$2" -m "$MESSAGES" -f bench@bench.example -t user@bench.example \
    -M client.bench.example 127.0.0.1:"$POSTFIX" >/dev/null
  postfix_drained
  end=$(date +%s.%N)
  awk -v m="$MESSAGES" -v a="$start" -v b="$end" 'BEGIN { print m / (b - a) }'
}

HZ=$(getconf CLK_TCK)
printf '%-8s %-5s %10s %10s %10s %8s %8s %14s\n' size conc direct relay postfix rel/dir rel/pfx "relay-cpu-us"
for size in 1024 102400; do
  for conc in 1 50; do
    direct=$(run "$SINK" "$size" "$conc")
    before=$(clock_ticks "$RELAY_PID")
    relay=$(run "$RELAY" "$size" "$conc")
    after=$(clock_ticks "$RELAY_PID")
    cpu_us=$(awk -v t="$((after - before))" -v hz="$HZ" -v m="$MESSAGES" 'BEGIN { print t * 1000000 / hz / m }')
    postfix=$(run_postfix "$POSTFIX" "$size" "$conc")
    printf '%-8s %-5s %10.0f %10.0f %10.0f %8.2f %8.2f %14.0f\n' "$size" "$conc" \
      "$direct" "$relay" "$postfix" "$(awk -v a="$relay" -v b="$direct" 'BEGIN { print a / b }')" \
      "$(awk -v a="$relay" -v b="$postfix" 'BEGIN { print a / b }')" "$cpu_us"
  done
done
