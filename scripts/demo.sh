#!/usr/bin/env bash
# nodetunnel demo, on one machine, as root:
#   bash scripts/demo.sh
# Builds the agent, makes two "nodes" and three "pods" as network namespaces, starts one agent
# per node with a shared root CA, sends traffic with curl between unmodified apps
# (python3 -m http.server), shows the rules the agent installed, a call that policy refuses (with
# `nodetunnel explain`), who talked to whom with which identities and how many bytes (from the
# agents' JSON access logs), the client IP the server saw, and that the node-to-node link
# carried only TLS for mesh traffic; then removes everything it made (also on Ctrl-C or error).
#
#   node a: pod client  10.200.1.2  HBONE, captured
#   node b: pod web     10.200.2.2  HBONE, captured, http.server on :8080, VIP 10.96.0.10:80
#           pod legacy  10.200.2.3  TCP (not in the mesh), http.server on :8080
set -euo pipefail
cd "$(dirname "$0")/.."

[[ $(id -u) -eq 0 ]] || { echo "demo.sh: run as root (it creates network namespaces)" >&2; exit 1; }

declare -A packages=([nft]=nftables [tcpdump]=tcpdump [curl]=curl [jq]=jq [ip]=iproute2
  [python3]=python3)
missing=()
for tool in "${!packages[@]}"; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("${packages[$tool]}")
done
if ((${#missing[@]})); then
  echo "== installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

echo "== building nodetunnel"
cargo build --quiet --bin nodetunnel
BIN=$PWD/target/debug/nodetunnel

P="ntd$(printf '%x' $$)"          # unique prefix for this run's namespaces
WORK=$(mktemp -d)
PIDS=()
cleanup() {
  set +e
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null; done
  for ns in client web legacy a b; do ip netns del "$P-$ns" 2>/dev/null; done
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

nsx() { local ns=$1; shift; ip netns exec "$P-$ns" "$@"; }

echo "== topology ($P-*)"
node() {  # node NAME INDEX
  ip netns add "$P-$1"
  nsx "$1" ip link set lo up
  nsx "$1" sysctl -qw net.ipv4.ip_forward=1
}
pod() {   # pod NODE NODE_INDEX NAME HOST
  local node=$1 index=$2 name=$3 host=$4 ip="10.200.$2.$4" gw="10.200.$2.1"
  ip netns add "$P-$name"
  nsx "$name" ip link set lo up
  ip link add eth0 netns "$P-$name" type veth peer name "v-$name" netns "$P-$node"
  nsx "$name" ip addr add "$ip/32" dev eth0
  nsx "$name" ip link set eth0 up
  nsx "$name" ip route add "$gw" dev eth0 scope link
  nsx "$name" ip route add default via "$gw" dev eth0
  nsx "$node" ip addr add "$gw/32" dev "v-$name"
  nsx "$node" ip link set "v-$name" up
  nsx "$node" ip route add "$ip/32" dev "v-$name"
}
node a; node b
ip link add l-b netns "$P-a" type veth peer name l-a netns "$P-b"
nsx a ip addr add 10.199.1.1/24 dev l-b; nsx a ip link set l-b up
nsx b ip addr add 10.199.1.2/24 dev l-a; nsx b ip link set l-a up
nsx a ip route add 10.200.2.0/24 via 10.199.1.2
nsx b ip route add 10.200.1.0/24 via 10.199.1.1
pod a 1 client 2
pod b 2 web 2
pod b 2 legacy 3

echo "== shared root CA and agent configs"
"$BIN" ca init --out-dir "$WORK/ca" >/dev/null
model() {
  cat <<YAML
workloads:
  - {uid: cluster1//Pod/default/client, name: client, namespace: default, serviceAccount: client,
     workloadIps: [10.200.1.2], protocol: HBONE, node: node-a}
  - {uid: cluster1//Pod/default/web, name: web, namespace: default, serviceAccount: web,
     workloadIps: [10.200.2.2], protocol: HBONE, node: node-b, labels: {app: web},
     services: {default/web.default.svc.cluster.local: {80: 8080}}}
  - {uid: cluster1//Pod/default/legacy, name: legacy, namespace: default, serviceAccount: legacy,
     workloadIps: [10.200.2.3], protocol: TCP, node: node-b}
services:
  - {name: web, namespace: default, hostname: web.default.svc.cluster.local,
     vips: [/10.96.0.10], ports: {80: 8080}}
policies: []
istioResources:   # Istio's own YAML: only 'client' may call web, and only over mTLS
  - apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: web-allow-client, namespace: default}
    spec:
      selector: {matchLabels: {app: web}}
      action: ALLOW
      rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/client]}}]}]
  - apiVersion: security.istio.io/v1
    kind: PeerAuthentication
    metadata: {name: default, namespace: istio-system}
    spec: {mtls: {mode: STRICT}}
YAML
}
for n in a b; do
  mkdir -p "$WORK/$n/state"
  {
    echo "agent:"
    echo "  node: node-$n"
    echo "  pods:"
    if [[ $n == a ]]; then pods=(client); else pods=(web); fi
    for pod in "${pods[@]}"; do
      echo "    - {workload: default/$pod, netns: /run/netns/$P-$pod}"
    done
    model
  } >"$WORK/$n/config.yaml"
  "$BIN" check-config "$WORK/$n/config.yaml"
done

echo "== starting agents"
for n in a b; do
  RUST_LOG=info ip netns exec "$P-$n" "$BIN" run --config "$WORK/$n/config.yaml" \
    --state-dir "$WORK/$n/state" --ca-cert "$WORK/ca/ca-cert.pem" --ca-key "$WORK/ca/ca-key.pem" \
    --log-format json 2>"$WORK/$n/agent.log" &
  PIDS+=($!)
done
for n in a b; do
  for _ in $(seq 150); do
    nsx "$n" curl -sf -o /dev/null http://127.0.0.1:15021/healthz/ready && break
    sleep 0.2
  done
  nsx "$n" curl -sf -o /dev/null http://127.0.0.1:15021/healthz/ready ||
    { echo "agent on node $n not ready; log:" >&2; tail -20 "$WORK/$n/agent.log" >&2; exit 1; }
  echo "agent on node-$n ready"
done

MARKER="NODETUNNEL-DEMO-$P"
for pod in web legacy; do
  mkdir -p "$WORK/www-$pod"
  echo "hello from $pod: $MARKER" >"$WORK/www-$pod/index.html"
  # Background processes are started with `ip netns exec` itself (not the nsx function), so
  # that $! is the process, which `ip netns exec` becomes, and our signals reach it.
  ip netns exec "$P-$pod" python3 -m http.server 8080 --bind 0.0.0.0 \
    --directory "$WORK/www-$pod" >/dev/null 2>"$WORK/www-$pod.log" &
  PIDS+=($!)
done
for pod in web legacy; do
  for _ in $(seq 100); do nsx "$pod" ss -ltnH | grep -q ':8080 ' && break; sleep 0.1; done
done

ip netns exec "$P-a" tcpdump -n -U --immediate-mode -Z root -s 0 -i l-b -w "$WORK/link.pcap" tcp \
  2>"$WORK/tcpdump.err" &
TCPDUMP=$!
PIDS+=("$TCPDUMP")
for _ in $(seq 100); do grep -q "listening on" "$WORK/tcpdump.err" && break; sleep 0.1; done

echo
echo "== capture: rules the agent installed in pod client (nothing was configured in the pod)"
nsx client nft list table inet nodetunnel | grep -E 'chain |redirect' | sed 's/^[[:space:]]*/  /'

echo
echo "== traffic (plain curl in pod client; it knows nothing about the mesh)"
for url in http://10.200.2.2:8080/ http://10.96.0.10/ http://10.200.2.3:8080/; do
  printf '%-26s -> ' "$url"
  nsx client curl -s --max-time 10 "$url" || echo "(failed)"
done

echo
echo "== authorization (web allows only spiffe://.../sa/client, mTLS STRICT)"
printf '%-40s -> ' "legacy (plain TCP, no identity) -> web"
nsx legacy curl -s --max-time 5 http://10.200.2.2:8080/ || echo "refused"
"$BIN" explain --config "$WORK/b/config.yaml" --from default/legacy --to web:8080 2>/dev/null |
  sed -n '1,4p' | sed 's/^/  /' || true


for _ in $(seq 50); do
  [[ $(grep -c '"connection complete"' "$WORK/b/agent.log" || true) -ge 3 ]] && break
  sleep 0.1
done
kill -INT "$TCPDUMP"; wait "$TCPDUMP" 2>/dev/null || true

echo
echo "== who talked to whom (agents' access logs)"
for n in a b; do
  jq -rR --arg node "node-$n" 'fromjson? | select(.scope=="access" and .message=="connection complete")
    | def id(f): (f // "") | if . == "" then "no identity: plain TCP" else . end;
      "\($node) \(.direction): \(.["src.workload"] // "?") [\(id(.["src.identity"]))]"
      + " -> \(.["dst.workload"] // "?") [\(id(.["dst.identity"]))] via \(.["dst.addr"])"
      + "  sent=\(.bytes_sent) recv=\(.bytes_recv)"
      + (if (.error // "") != "" then "  error=\(.error)" else "" end)' \
    "$WORK/$n/agent.log"
done

echo
echo "== what the server app saw (original source preserved: the client pod's IP, not the agent's)"
awk '{print "  web got a request from " $1}' "$WORK/www-web.log" | sort | uniq -c

echo
echo "== the node-to-node link (capture on node-a)"
hbone=$(tcpdump -r "$WORK/link.pcap" -nn 'tcp port 15008 and (tcp[tcpflags] & tcp-push != 0)' \
  2>/dev/null | wc -l)
tls=$(tcpdump -r "$WORK/link.pcap" -nn \
  'tcp port 15008 and tcp[((tcp[12] & 0xf0) >> 2)] = 0x17' 2>/dev/null | wc -l)
plain=$(tcpdump -r "$WORK/link.pcap" -nn 'tcp port 8080 and (tcp[tcpflags] & tcp-push != 0)' \
  2>/dev/null | wc -l)
echo "HBONE (port 15008) data packets: $hbone, of which start with a TLS application-data record: $tls"
echo "plaintext port-8080 data packets (the TCP workload 'legacy', outside the mesh): $plain"
hits=$(grep -c -a "$MARKER" "$WORK/link.pcap" || true)
echo "packets whose bytes show the page text '$MARKER' in clear: $hits (only legacy's are expected)"
if tcpdump -r "$WORK/link.pcap" -nn -A 'tcp port 15008' 2>/dev/null | grep -q "$MARKER"; then
  echo "!! the marker appeared in clear on 15008: mesh traffic was NOT encrypted"
else
  echo "mesh traffic on 15008: encrypted (marker never seen in clear)"
fi
echo
echo "== done; cleaning up"
