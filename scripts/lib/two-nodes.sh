# Shared by scripts/bench and scripts/soak (sourced, not run): the two-node network-namespace
# topology of tests/support/netns.rs with pod client (10.200.1.2) on node a and pod server
# (10.200.2.2) on node b, the agents' configs, the load servers in pod server, and starting,
# stopping and measuring the agents.
#
# The caller sets BIN (nodetunnel), LOAD (nodetunnel-bench) and PREFIX (a short namespace-name
# prefix), and may set BENCH_AGENT_YAML (extra lines under `agent:` for both agents). After
# sourcing: $P-* namespaces exist, $WORK is a scratch directory, $SERVER the server pod's IP,
# the iperf3 (5201), echo (7000) and DNS (53/udp) servers run, and an EXIT trap cleans everything up.
# Functions: nsx, write_configs, start_agents, stop_agents, agent_cpu, agent_rss,
# agent_rss_parts, agent_fds, settle.

P="$PREFIX$(printf '%x' $$)"       # unique prefix for this run's namespaces
WORK=$(mktemp -d)
PIDS=()
AGENTS=()
EXTRA_PODS=()   # pods a caller added with `pod`, deleted on exit too
cleanup() {
  set +e
  for pid in "${AGENTS[@]}" "${PIDS[@]}"; do kill "$pid" 2>/dev/null; done
  for pid in "${AGENTS[@]}" "${PIDS[@]}"; do wait "$pid" 2>/dev/null; done
  for ns in client server "${EXTRA_PODS[@]}" a b; do ip netns del "$P-$ns" 2>/dev/null; done
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

nsx() { local ns=$1; shift; ip netns exec "$P-$ns" "$@"; }

echo "== topology ($P-*)"
node() {  # node NAME
  ip netns add "$P-$1"
  nsx "$1" ip link set lo up
  nsx "$1" sysctl -qw net.ipv4.ip_forward=1
}
pod() {   # pod NODE NODE_INDEX NAME HOST
  local node=$1 name=$3 ip="10.200.$2.$4" gw="10.200.$2.1"
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
  # Connection-rate runs leave many TIME_WAIT sockets behind; the range stays above the agent
  # ports (15001, 15006, 15008), which a TIME_WAIT socket would keep the agent from binding.
  nsx "$name" sysctl -qw net.ipv4.ip_local_port_range="32768 65000" net.ipv4.tcp_tw_reuse=1
}
node a; node b
ip link add l-b netns "$P-a" type veth peer name l-a netns "$P-b"
nsx a ip addr add 10.199.1.1/24 dev l-b; nsx a ip link set l-b up
nsx b ip addr add 10.199.1.2/24 dev l-a; nsx b ip link set l-a up
nsx a ip route add 10.200.2.0/24 via 10.199.1.2
nsx b ip route add 10.200.1.0/24 via 10.199.1.1
pod a 1 client 2
pod b 2 server 2
SERVER=10.200.2.2

"$BIN" ca init --out-dir "$WORK/ca" >/dev/null
# Writes both agents' configs; $1 is extra YAML for the client node's agent only.
write_configs() {
  local n pod extra
  for n in a b; do
    mkdir -p "$WORK/$n/state"
    if [[ $n == a ]]; then pod=client; extra=${1:-}; else pod=server; extra=""; fi
    cat >"$WORK/$n/config.yaml" <<YAML
agent:
  node: node-$n
  trustDomain: cluster.local
  pods:
    - {workload: default/$pod, netns: /run/netns/$P-$pod}
  dns: {upstreams: ["$SERVER"]}
${BENCH_AGENT_YAML:-}
$extra
workloads:
  - {uid: cluster1//Pod/default/client, name: client, namespace: default, serviceAccount: client,
     workloadIps: [10.200.1.2], protocol: HBONE, node: node-a}
  - {uid: cluster1//Pod/default/server, name: server, namespace: default, serviceAccount: server,
     workloadIps: [$SERVER], protocol: HBONE, node: node-b,
     services: {default/echo.default.svc.cluster.local: {80: 7000}}}
services:
  - {name: echo, namespace: default, hostname: echo.default.svc.cluster.local,
     vips: [/10.96.0.10], ports: {80: 7000}}
policies: []
YAML
    "$BIN" check-config "$WORK/$n/config.yaml" >/dev/null
  done
}
write_configs

# Servers in pod server; started with `ip netns exec` itself so $! is the process.
ip netns exec "$P-server" iperf3 -s -p 5201 >/dev/null 2>&1 &
PIDS+=($!)
ip netns exec "$P-server" "$LOAD" serve --listen 0.0.0.0:7000 &
PIDS+=($!)
ip netns exec "$P-server" "$LOAD" dns-serve --listen 0.0.0.0:53 &
PIDS+=($!)
for _ in $(seq 100); do
  [[ $(nsx server ss -ltnH | grep -cE ':(5201|7000) ') -ge 2 &&
     $(nsx server ss -lunH | grep -cE ':53 ') -ge 1 ]] && break
  sleep 0.1
done

start_agents() {
  AGENTS=()
  for n in a b; do
    # Each node's agent runs its own copy of the binary, as on two real nodes: pages of one
    # file mapped by both agents would be shared, and the kernel does not reclaim shared pages
    # when an agent gives back its start-up code (admin/readiness.rs, release_startup_pages_once_ready).
    # Written to disk before it starts, as a node's binary long has been: the kernel reclaims
    # no page of a file whose data is not written back yet.
    cp "$BIN" "$WORK/$n/nodetunnel"
    sync "$WORK/$n/nodetunnel"
    RUST_LOG=warn ip netns exec "$P-$n" "$WORK/$n/nodetunnel" run --config "$WORK/$n/config.yaml" \
      --state-dir "$WORK/$n/state" --ca-cert "$WORK/ca/ca-cert.pem" \
      --ca-key "$WORK/ca/ca-key.pem" --log-format json 2>"$WORK/$n/agent.log" &
    AGENTS+=($!)
  done
  for n in a b; do
    for _ in $(seq 150); do
      nsx "$n" curl -sf -o /dev/null http://127.0.0.1:15021/healthz/ready && break
      sleep 0.2
    done
    nsx "$n" curl -sf -o /dev/null http://127.0.0.1:15021/healthz/ready ||
      { echo "agent on node $n not ready; log:" >&2; tail -20 "$WORK/$n/agent.log" >&2; exit 1; }
  done
}

stop_agents() {
  for pid in "${AGENTS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${AGENTS[@]}"; do wait "$pid" 2>/dev/null || true; done
  AGENTS=()
}

# Sum of user+system CPU seconds of the agents (0 when none run).
agent_cpu() {
  local ticks=0 pid
  for pid in "${AGENTS[@]}"; do
    ticks=$((ticks + $(sed 's/.*) //' "/proc/$pid/stat" | awk '{print $12 + $13}')))
  done
  python3 -c "print($ticks / $(getconf CLK_TCK))"
}

# RSS in KiB of agent number $1.
agent_rss() { awk '/^VmRSS/ {print $2}' "/proc/${AGENTS[$1]}/status"; }

# Resident KiB of agent number $1 by kind: "anon file" (heap and stacks; the binary's code).
agent_rss_parts() { awk '/^RssAnon/ {a=$2} /^RssFile/ {f=$2} END {print a, f}' "/proc/${AGENTS[$1]}/status"; }

# Open file descriptors of agent number $1.
agent_fds() { find "/proc/${AGENTS[$1]}/fd" -mindepth 1 -maxdepth 1 | wc -l; }

# Waits until every agent's RSS has settled (two reads 1 s apart within 1 %), bounded.
settle() {
  for _ in $(seq 5); do
    local before="$(agent_rss 0) $(agent_rss 1)"
    sleep 1
    local after="$(agent_rss 0) $(agent_rss 1)"
    python3 - "$before" "$after" <<'PY' && return
import sys
b, a = [list(map(int, s.split())) for s in sys.argv[1:]]
sys.exit(0 if all(abs(x - y) <= 0.01 * x for x, y in zip(b, a)) else 1)
PY
  done
}

