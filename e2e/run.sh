#!/usr/bin/env bash
# End-to-end against a real Kubernetes cluster (KUBECONFIG or the in-cluster account):
# applies the CRDs and the dual-delivery example into a fresh namespace, runs the operator
# against it, checks the published ConfigMap and every resource's Ready condition, then runs
# a relay on that ConfigMap's document and sends a message through it to smtp-sink, and a
# relay watching the ConfigMap (--configmap) that picks up a change.
# Without a reachable cluster it says so and exits 0 (scripts/test calls it on every run).
# Usage: e2e/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v kubectl >/dev/null 2>&1; then
  echo "e2e: skipped: kubectl is not installed (see docs/testing.md)"
  exit 0
fi
if ! kubectl version --request-timeout=5s >/dev/null 2>&1; then
  echo "e2e: skipped: no Kubernetes cluster reachable (KUBECONFIG=${KUBECONFIG:-~/.kube/config})"
  exit 0
fi

NS="mailroute-e2e-$$"
WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  kubectl delete namespace "$NS" --wait=false >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT
fail() { echo "e2e: FAILED: $*" >&2; exit 1; }

cargo build --locked -q -p mailroute-operator -p mailroute-relay
kubectl apply -f crds/ >/dev/null
kubectl create namespace "$NS" >/dev/null
for f in examples/dual-delivery/*.yaml; do
  sed -e "s/namespace: [a-z0-9-]*/namespace: $NS/" "$f" | kubectl apply -n "$NS" -f - >/dev/null
done

target/debug/mailroute-operator run --namespace "$NS" >"$WORK/operator.log" 2>&1 & PIDS+=($!)

for _ in $(seq 60); do
  kubectl get configmap mailroute-relay-config -n "$NS" >/dev/null 2>&1 && break
  sleep 1
done
kubectl get configmap mailroute-relay-config -n "$NS" -o jsonpath='{.data.config\.json}' >"$WORK/config.json" \
  || fail "no ConfigMap mailroute-relay-config after 60 s (operator log: $(tail -5 "$WORK/operator.log"))"
for kind in mailroutes relaypolicies routingrules; do
  for name in $(kubectl get "$kind" -n "$NS" -o jsonpath='{.items[*].metadata.name}'); do
    status=$(kubectl get "$kind" "$name" -n "$NS" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')
    [[ "$status" == "True" ]] || fail "$kind/$name is not Ready: $status"
  done
done
echo "e2e: ConfigMap published, every resource Ready"

# A relay on the published document, delivering to smtp-sink on loopback.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
SINK=$(free_port); RELAY=$(free_port)
smtp-sink -u root -d "$WORK/%M." 127.0.0.1:"$SINK" 10 & PIDS+=($!)
python3 - "$WORK/config.json" "$SINK" <<'PY'
import json, sys
path, port = sys.argv[1], int(sys.argv[2])
doc = json.load(open(path))
for route in doc["config"]["routes"].values():
    route["destination"] = {"host": {"host": "127.0.0.1", "port": port}}
    route["tls"]["mode"] = "Disabled"
# The hash covers the config: recompute it as the relay checks it.
import hashlib
doc["hash"] = "sha256:" + hashlib.sha256(json.dumps(doc["config"], separators=(",", ":"), ensure_ascii=False).encode()).hexdigest()
json.dump(doc, open(path, "w"))
PY
target/debug/mailroute-relay --config "$WORK/config.json" --hostname relay.e2e.example \
  --smtp 127.0.0.1:"$RELAY" >"$WORK/relay.log" 2>&1 & PIDS+=($!)
sleep 1
swaks --server 127.0.0.1:"$RELAY" --from someone@partner.example --to alice@example.com \
  --header "Subject: e2e" --body "through the cluster's configuration" >/dev/null \
  || fail "the relay refused the message (relay log: $(tail -5 "$WORK/relay.log"))"
ls "$WORK" | grep -q '^[0-9A-F]' || fail "nothing reached smtp-sink"
echo "e2e: a message went through a relay running the cluster's configuration"

# A relay on the ConfigMap itself (--configmap, through KUBECONFIG as kubectl reaches the
# cluster): it lists and watches the operator's objects, becomes ready, and a change reaches it.
ADMIN=$(free_port); WATCHING=$(free_port)
target/debug/mailroute-relay --configmap "$NS/mailroute-relay-config" --hostname relay.e2e.example \
  --smtp 127.0.0.1:"$WATCHING" --admin 127.0.0.1:"$ADMIN" >"$WORK/watching.log" 2>&1 & PIDS+=($!)
metric() { curl -fsS "http://127.0.0.1:$ADMIN/metrics" 2>/dev/null | awk -v m="$1" '$1 == m {print $2}'; }
for _ in $(seq 30); do
  [[ "$(metric mailroute_relay_config_source_up)" == "1" ]] && break
  sleep 1
done
[[ "$(metric mailroute_relay_config_source_up)" == "1" ]] \
  || fail "the --configmap relay is not watching (log: $(tail -5 "$WORK/watching.log"))"
before=$(metric mailroute_relay_config_generation)
kubectl patch relaypolicies -n "$NS" "$(kubectl get relaypolicies -n "$NS" -o jsonpath='{.items[0].metadata.name}')" \
  --type merge -p '{"spec":{"licenses":4242}}' >/dev/null
for _ in $(seq 30); do
  [[ "$(metric mailroute_relay_config_generation)" != "$before" ]] && break
  sleep 1
done
[[ "$(metric mailroute_relay_config_generation)" != "$before" ]] \
  || fail "a change did not reach the --configmap relay within 30 s (log: $(tail -5 "$WORK/watching.log"))"
echo "e2e: a relay watching the ConfigMap picked up a change (generation $before -> $(metric mailroute_relay_config_generation))"

# explain on the cluster's own configuration (--configmap): the same answer the relays give.
target/debug/mailroute-operator explain --configmap "$NS/mailroute-relay-config" \
  --from someone@partner.example --to alice@example.com -o json >"$WORK/explain.json" \
  || fail "explain --configmap did not accept the message the relay accepted: $(head -c 400 "$WORK/explain.json")"
python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); assert d["recipients"][0]["accepted"] and d["legs"], d' "$WORK/explain.json" \
  || fail "explain --configmap: no accepted recipient or no leg"
echo "e2e: explain --configmap answers as the relay does"
