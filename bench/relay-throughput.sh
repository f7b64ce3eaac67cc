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
WORK=$(mktemp -d)
chmod 755 "$WORK"  # Postfix daemons run as user postfix
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  [[ -f "$WORK/postfix/main.cf" ]] && postfix -c "$WORK/postfix" stop >/dev/null 2>&1 || true
  [[ -n "${KEEP:-}" ]] || rm -rf "$WORK"
}
trap cleanup EXIT

source bench/lib.sh

[[ -n "${RELAY_BIN:-}" ]] || cargo build --release --locked -q -p mailroute-relay
RELAY_BIN=${RELAY_BIN:-target/release/mailroute-relay}

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

# Postfix as a relay to the same sink: a private instance, disk queue, no chroot.
POSTFIX=$(free_port)
mkdir -p "$WORK/postfix"
cat > "$WORK/postfix/main.cf" <<CF
compatibility_level = 3.6
queue_directory = $WORK/postfix/queue
data_directory = $WORK/postfix/data
mail_owner = postfix
setgid_group = postdrop
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
myhostname = postfix.bench.example
mydestination =
mynetworks = 127.0.0.0/8
relayhost = [127.0.0.1]:$SINK
smtpd_relay_restrictions = permit_mynetworks, reject
maillog_file_prefixes = $WORK
maillog_file = $WORK/postfix/maillog
default_process_limit = 200
smtp_destination_concurrency_limit = 50
CF
sed -E -e 's/^smtp( +)inet( +)n( +)-( +)y/127.0.0.1:'"$POSTFIX"'\1inet\2n\3-\4n/' \
  -e 's/^([a-z]+ +unix +[-n] +[-n] +)y/\1n/' \
  /etc/postfix/master.cf > "$WORK/postfix/master.cf"
mkdir -p "$WORK/postfix/queue" "$WORK/postfix/data"
chown postfix "$WORK/postfix/data"
postfix -c "$WORK/postfix" start >/dev/null 2>&1 || true
wait_port "$POSTFIX"

# Runs smtp-source; prints messages per second.
run() { # port size concurrency
  local start end
  start=$(date +%s.%N)
  smtp-source -s "$3" -l "$2" -m "$MESSAGES" -f bench@bench.example -t user@bench.example \
    -M client.bench.example 127.0.0.1:"$1" >/dev/null
  end=$(date +%s.%N)
  awk -v m="$MESSAGES" -v a="$start" -v b="$end" 'BEGIN { print m / (b - a) }'
}

# Postfix has not delivered when smtp-source finishes: wait until its queue is empty.
postfix_drained() {
  for _ in $(seq 600); do
    [[ -z "$(find "$WORK/postfix/queue/active" "$WORK/postfix/queue/incoming" "$WORK/postfix/queue/deferred" -type f 2>/dev/null | head -1)" ]] && return 0
    sleep 0.1
  done
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
