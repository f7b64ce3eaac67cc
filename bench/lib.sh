# Shared by the bench/ scripts (source it): loopback ports, CPU ticks, the smtp-sink upstream
# and the bench tenant's manifests.

# Sets WORK (a private directory, removed at exit), PIDS (killed at exit) and RELAY_BIN (the
# release build unless RELAY_BIN names another).
bench_start() {
  WORK=$(mktemp -d)
  PIDS=()
  trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"' EXIT
  [[ -n "${RELAY_BIN:-}" ]] || cargo build --release --locked -q -p mailroute-relay
  RELAY_BIN=${RELAY_BIN:-target/release/mailroute-relay}
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
