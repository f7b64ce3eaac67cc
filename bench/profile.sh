#!/usr/bin/env bash
# Where the relay's time per message goes, in counts that repeat from run to run (SPEC 10,
# issue 16), for 1 KiB messages at concurrency 50 from smtp-source through the relay to
# smtp-sink, after a warm-up:
#   instructions per message, in all and for the top functions by own cost
#     (valgrind --tool=callgrind, counters zeroed after the warm-up);
#   allocations per message (valgrind --tool=dhat: two runs, the difference of their totals);
#   system calls per message, by name (strace -c -f attached after the warm-up);
#   context switches per message (every thread's voluntary and involuntary, /proc, without
#   strace).
# Usage: bench/profile.sh [MESSAGES]   (default 2000; bounded, stops by itself)
#        RELAY_BIN=path/to/mailroute-relay bench/profile.sh   (another build, e.g. before a change)
# Needs valgrind and strace (Debian packages) and Postfix's smtp-source and smtp-sink.
set -euo pipefail
cd "$(dirname "$0")/.."
MESSAGES=${1:-2000}
WARMUP=200
source bench/lib.sh
bench_start
command -v valgrind >/dev/null && command -v strace >/dev/null \
  || { echo "bench/profile.sh needs valgrind and strace (apt-get install valgrind strace)" >&2; exit 2; }
start_sink
write_manifests "$WORK/manifests"

# Starts the relay under the command prefix given ("" for none); sets RELAY and RELAY_PID.
start_relay() {
  RELAY=$(free_port)
  # shellcheck disable=SC2086
  $1 "$RELAY_BIN" --manifests "$WORK/manifests" --hostname relay.bench.example \
    --smtp 127.0.0.1:"$RELAY" --max-sessions 1000 --max-sessions-per-ip 1000 \
    >"$WORK/relay.log" 2>&1 & RELAY_PID=$!
  PIDS+=($RELAY_PID)
  # NB: under valgrind the relay takes seconds to start.
  for _ in $(seq 600); do (exec 3<>/dev/tcp/127.0.0.1/"$RELAY") 2>/dev/null && return 0; sleep 0.1; done
  echo "the relay never listened: $(tail -3 "$WORK/relay.log")" >&2
  exit 1
}
load() { # messages
  timeout 600 smtp-source -s 50 -l 1024 -m "$1" -f bench@bench.example -t user@bench.example \
    -M client.bench.example 127.0.0.1:"$RELAY" >/dev/null
}
stop_relay() {
  kill -TERM "$RELAY_PID" 2>/dev/null || true
  for _ in $(seq 300); do kill -0 "$RELAY_PID" 2>/dev/null || return 0; sleep 0.1; done
  kill -KILL "$RELAY_PID" 2>/dev/null || true
}
switches() { # pid
  cat /proc/"$1"/task/*/status 2>/dev/null \
    | awk '/^(voluntary|nonvoluntary)_ctxt_switches/ {n += $2} END {print n + 0}'
}

echo "bench/profile.sh: $MESSAGES messages of 1 KiB at concurrency 50 after $WARMUP of warm-up"

# Natively: system calls and context switches.
start_relay ""
load "$WARMUP"
before=$(switches "$RELAY_PID")
load "$MESSAGES"
after=$(switches "$RELAY_PID")
# NB: then a second load under strace (ptrace adds switches of its own).
strace -c -f -q -p "$RELAY_PID" -o "$WORK/strace.txt" & STRACE=$!
sleep 1
load "$MESSAGES"
kill -INT "$STRACE"; wait "$STRACE" 2>/dev/null || true
stop_relay
awk -v m="$MESSAGES" -v b="$before" -v a="$after" 'BEGIN { printf "context switches per message: %.1f\n", (a - b) / m }'
echo "system calls per message (strace -c -f; strace itself slows the relay, not the counts):"
awk -v m="$MESSAGES" '
  $1 ~ /^[0-9.]+$/ && NF >= 5 && $NF != "total" { name = $NF; calls = $4; total += calls; row[name] = calls }
  END {
    printf "  %-22s %8.2f\n", "all", total / m
    n = 0
    for (k in row) order[++n] = k
    for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (row[order[j]] > row[order[i]]) { t = order[i]; order[i] = order[j]; order[j] = t }
    for (i = 1; i <= n && i <= 8; i++) printf "  %-22s %8.2f\n", order[i], row[order[i]] / m
  }' "$WORK/strace.txt"

# Under callgrind: instructions, counted from after the warm-up to after the load. NB: valgrind
# hides the CPU's SHA extensions, so SHA-256 runs in software here (natively it uses SHA-NI
# where the CPU has it): its share of the instructions is larger than natively.
start_relay "valgrind --tool=callgrind --callgrind-out-file=$WORK/callgrind.out --dump-instr=no --collect-atstart=yes"
load "$WARMUP"
callgrind_control -z "$RELAY_PID" >/dev/null
load "$MESSAGES"
callgrind_control -d "$RELAY_PID" >/dev/null
stop_relay
dump=$(ls "$WORK"/callgrind.out.* 2>/dev/null | head -1)
[[ -n "$dump" ]] || { echo "no callgrind dump" >&2; exit 1; }
total=$(awk '/^(summary|totals):/ {print $2; exit}' "$dump")
awk -v t="$total" -v m="$MESSAGES" 'BEGIN { printf "instructions per message: %.0f\n", t / m }'
echo "top functions by own instructions, per message:"
# NB: in a dump taken while the threads run, callgrind lists the frames at the bottom of every
# thread's stack (thread start, the runtime's worker loop) with the whole cost: left out.
callgrind_annotate --threshold=100 "$dump" 2>/dev/null \
  | awk -v m="$MESSAGES" -v t="$total" '/^ *[0-9,]+ \(/ && n < 15 {
      c = $1; gsub(",", "", c); c += 0
      if (c >= 0.9 * t) next
      line = $0; sub(/^ *[0-9,]+ \( *[0-9.]+%\) +/, "", line); sub(/ \[[^]]*\]$/, "", line)
      sub(/^.*\/registry\/src\/[^\/]+\//, "", line); sub(/^\/rustc\/[0-9a-f]+\/library\//, "", line)
      printf "  %9.0f  %s\n", c / m, substr(line, 1, 110); n++ }'

# Under dhat: allocations, from two runs that differ by MESSAGES.
allocs() { # messages after the warm-up
  start_relay "valgrind --tool=dhat --dhat-out-file=$WORK/dhat.$1.json"
  load "$WARMUP"
  if (($1 > 0)); then load "$1"; fi
  stop_relay
  python3 - "$WORK/dhat.$1.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
print(sum(p["tb"] for p in d["pps"]), sum(p["tbk"] for p in d["pps"]))
PY
}
read -r bytes0 blocks0 < <(allocs 0)
read -r bytes1 blocks1 < <(allocs "$MESSAGES")
awk -v m="$MESSAGES" -v a="$blocks0" -v b="$blocks1" -v x="$bytes0" -v y="$bytes1" \
  'BEGIN { printf "allocations per message: %.1f (%.0f bytes)\n", (b - a) / m, (y - x) / m }'
