#!/usr/bin/env bash
# TLS on the client side, side by side in one run on loopback (SPEC section 10, issue 16):
#   relay-ecdsa : smtp-load -> mailroute-relay (ECDSA P-256 certificate) -> smtp-sink
#   relay-rsa   : the same with an RSA-2048 certificate
#   postfix     : smtp-load -> Postfix (the same ECDSA certificate, relayhost) -> smtp-sink
# each in plaintext, with STARTTLS and a full handshake per session, and with STARTTLS resuming
# sessions (tickets); one 1 KiB message per session (a handshake per message: the worst case);
# concurrency 50. Columns: messages a second, the relay's CPU per message, the ratio to Postfix
# in the same mode, and the client's count of full and resumed handshakes.
# Then TLS on the upstream side: smtp-load (plaintext) -> relay -> a Postfix smtpd that
# discards the mail (ECDSA certificate), over the relay's pooled connections, in clear and with
# STARTTLS (tls.mode Required, the certificate not verified); the relay's CPU per message.
# Usage: bench/tls-throughput.sh [MESSAGES]   (default 4000; bounded, stops by itself)
#        RELAY_BIN=path/to/mailroute-relay bench/tls-throughput.sh   (another build)
# Needs postfix (smtp-sink, postfix), as scripts/test installs it, and openssl; run as root
# (Postfix's own daemons drop privileges). The load generator is relay/examples/smtp-load.rs.
set -euo pipefail
cd "$(dirname "$0")/.."
MESSAGES=${1:-4000}
CONCURRENCY=50
source bench/lib.sh
bench_start
cargo build --release --locked -q -p mailroute-relay --example smtp-load
LOAD=target/release/examples/smtp-load

start_sink
for kind in ecdsa rsa; do
  case $kind in
    ecdsa) newkey=(-newkey ec -pkeyopt ec_paramgen_curve:P-256) ;;
    rsa) newkey=(-newkey rsa:2048) ;;
  esac
  openssl req -x509 "${newkey[@]}" -nodes -days 2 -subj /CN=relay.bench.example \
    -addext subjectAltName=DNS:relay.bench.example \
    -keyout "$WORK/$kind.key" -out "$WORK/$kind.crt" 2>/dev/null
done
chmod 644 "$WORK"/*.key "$WORK"/*.crt

write_manifests "$WORK/manifests"
declare -A PORT PID
for kind in ecdsa rsa; do
  PORT[$kind]=$(free_port)
  "$RELAY_BIN" --manifests "$WORK/manifests" --hostname relay.bench.example \
    --smtp 127.0.0.1:"${PORT[$kind]}" --max-sessions 1000 --max-sessions-per-ip 1000 \
    --tls-cert "$WORK/$kind.crt" --tls-key "$WORK/$kind.key" >>"$WORK/relay-$kind.log" 2>&1 &
  PID[$kind]=$!; PIDS+=("${PID[$kind]}")
  wait_port "${PORT[$kind]}"
done
start_postfix "smtpd_tls_security_level = may
smtpd_tls_chain_files = $WORK/ecdsa.key, $WORK/ecdsa.crt"

load() { # port mode -> "msg/s full resumed"
  local flags=()
  case $2 in
    full) flags=(--starttls) ;;
    resumed) flags=(--starttls --resume) ;;
  esac
  "$LOAD" --to 127.0.0.1:"$1" --messages "$MESSAGES" --concurrency "$CONCURRENCY" "${flags[@]}" |
    awk '{ print $6, $8, $10 }'
}
per_msg_us() { awk -v t="$1" -v hz="$(getconf CLK_TCK)" -v m="$MESSAGES" 'BEGIN { print t * 1000000 / hz / m }'; }

printf '%-12s %-8s %9s %10s %8s %7s %8s\n' server mode msg/s relay-us vs-pfx full resumed
for mode in plain full resumed; do
  start=$(date +%s.%N)
  read -r _ pfull presumed < <(load "$POSTFIX" "$mode")
  postfix_drained
  end=$(date +%s.%N)
  postfix=$(awk -v m="$MESSAGES" -v a="$start" -v b="$end" 'BEGIN { print m / (b - a) }')
  for kind in ecdsa rsa; do
    before=$(clock_ticks "${PID[$kind]}")
    read -r rate full resumed < <(load "${PORT[$kind]}" "$mode")
    after=$(clock_ticks "${PID[$kind]}")
    printf '%-12s %-8s %9.0f %10.0f %8.1f %7s %8s\n' "relay-$kind" "$mode" "$rate" \
      "$(per_msg_us $((after - before)))" "$(awk -v a="$rate" -v b="$postfix" 'BEGIN { print a / b }')" \
      "$full" "$resumed"
  done
  printf '%-12s %-8s %9.0f %10s %8s %7s %8s\n' postfix "$mode" "$postfix" "" "" "$pfull" "$presumed"
done

# The upstream side: a Postfix that discards what it receives, offering STARTTLS.
start_postfix "smtpd_tls_security_level = may
smtpd_tls_chain_files = $WORK/ecdsa.key, $WORK/ecdsa.crt
relayhost =
relay_domains = bench.example
relay_transport = discard:
default_transport = discard:" upstream
UPSTREAM=$POSTFIX
declare -A UPORT UPID
for mode in Disabled Required; do
  mkdir -p "$WORK/up-$mode"
  sed -e "s/port: $SINK/port: $UPSTREAM/" \
    -e "s/tls: {mode: Disabled}/tls: {mode: $mode, requireCASigned: false, validateHostname: false}/" \
    "$WORK/manifests/bench.yaml" > "$WORK/up-$mode/bench.yaml"
  UPORT[$mode]=$(free_port)
  "$RELAY_BIN" --manifests "$WORK/up-$mode" --hostname relay.bench.example \
    --smtp 127.0.0.1:"${UPORT[$mode]}" --max-sessions 1000 --max-sessions-per-ip 1000 \
    >>"$WORK/relay-up-$mode.log" 2>&1 &
  UPID[$mode]=$!; PIDS+=("${UPID[$mode]}")
  wait_port "${UPORT[$mode]}"
done
printf '%-12s %-8s %9s %10s\n' upstream tls msg/s relay-us
for mode in Disabled Required; do
  before=$(clock_ticks "${UPID[$mode]}")
  read -r rate _ _ < <(load "${UPORT[$mode]}" plain)
  after=$(clock_ticks "${UPID[$mode]}")
  printf '%-12s %-8s %9.0f %10.0f\n' postfix-sink "$mode" "$rate" "$(per_msg_us $((after - before)))"
done
