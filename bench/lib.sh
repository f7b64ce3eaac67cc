# Shared by the bench/ scripts (source it): loopback ports, CPU ticks, the smtp-sink upstream
# and the bench tenant's manifests.

# Sets WORK (a private directory, removed at exit), PIDS (killed at exit) and RELAY_BIN (the
# release build unless RELAY_BIN names another).
bench_start() {
  WORK=$(mktemp -d)
  chmod 755 "$WORK"  # Postfix daemons run as user postfix
  PIDS=()
  trap bench_stop EXIT
  [[ -n "${RELAY_BIN:-}" ]] || cargo build --release --locked -q -p mailroute-relay
  RELAY_BIN=${RELAY_BIN:-target/release/mailroute-relay}
}
bench_stop() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for d in "$WORK"/*/; do
    [[ -f "$d/main.cf" ]] && postfix -c "$d" stop >/dev/null 2>&1 || true
  done
  [[ -n "${KEEP:-}" ]] || rm -rf "$WORK"
}

# Starts Postfix as a relay to the sink: a private instance in $WORK/NAME (default postfix),
# disk queue, no chroot, listening on a free port; sets POSTFIX. Extra main.cf lines may
# follow as the first argument (e.g. smtpd TLS settings; a later line wins). Needs root (its
# daemons drop privileges).
start_postfix() { # [extra main.cf lines] [name]
  local name=${2:-postfix}
  POSTFIX=$(free_port)
  mkdir -p "$WORK/$name"
  cat > "$WORK/$name/main.cf" <<CF
compatibility_level = 3.6
queue_directory = $WORK/$name/queue
data_directory = $WORK/$name/data
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
maillog_file = $WORK/$name/maillog
default_process_limit = 200
smtp_destination_concurrency_limit = 50
${1:-}
CF
  sed -E -e 's/^smtp( +)inet( +)n( +)-( +)y/127.0.0.1:'"$POSTFIX"'\1inet\2n\3-\4n/' \
    -e 's/^([a-z]+ +unix +[-n] +[-n] +)y/\1n/' \
    /etc/postfix/master.cf > "$WORK/$name/master.cf"
  mkdir -p "$WORK/$name/queue" "$WORK/$name/data"
  chown postfix "$WORK/$name/data"
  postfix -c "$WORK/$name" start >/dev/null 2>&1 || true
  wait_port "$POSTFIX"
}

# Postfix has not delivered when its client finishes: waits until the queue of instance NAME
# (default postfix) is empty.
postfix_drained() { # [name]
  local q="$WORK/${1:-postfix}/queue"
  for _ in $(seq 600); do
    [[ -z "$(find "$q/active" "$q/incoming" "$q/deferred" -type f 2>/dev/null | head -1)" ]] && return 0
    sleep 0.1
  done
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 200); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; return 1; }
clock_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# Starts smtp-sink on a free port; sets SINK and appends its pid to PIDS.
start_sink() {
  SINK=$(free_port)
  smtp-sink -u root -m 500 127.0.0.1:"$SINK" 1000 & PIDS+=($!)
  wait_port "$SINK"
}

# Writes DIR/bench.yaml: a route to the sink and tenant bench.example; extra policy fields
# (indented two spaces) may follow as the second argument.
write_manifests() { # dir [extra policy lines]
  mkdir -p "$1"
  cat > "$1/bench.yaml" <<YAML
apiVersion: mailroute.io/v1alpha1
kind: MailRoute
metadata: {name: sink, namespace: bench}
spec:
  host: 127.0.0.1
  port: $SINK
  tls: {mode: Disabled}
  connectionPool: {maxConnections: 100, maxMessagesPerConnection: 100000, idleTimeout: 60s}
---
apiVersion: mailroute.io/v1alpha1
kind: RelayPolicy
metadata: {name: bench, namespace: bench}
spec:
  domains: [bench.example]
  licenses: 100000
  inboundRoute: sink
${2:-}
YAML
}
