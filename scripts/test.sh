#!/usr/bin/env bash
# The project's test command (see README): on a fresh Debian machine, as root,
#   bash scripts/test.sh
# installs the system tools the network-namespace tests use (only those missing), then runs
# rustfmt, clippy and every test target. CI runs exactly this (.ci/run), with CI=true, under
# which namespace tests can never be skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

# tool -> Debian package
declare -A packages=(
  [nft]=nftables [tcpdump]=tcpdump [iperf3]=iperf3 [curl]=curl [ip]=iproute2 [ss]=iproute2
  [dig]=dnsutils [getent]=libc-bin
)
missing=()
for tool in "${!packages[@]}"; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("${packages[$tool]}")
done
if ((${#missing[@]})); then
  mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
  if [[ $(id -u) -eq 0 ]]; then
    echo "test.sh: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "test.sh: missing ${missing[*]} and not root; the network-namespace tests will fail" >&2
  fi
fi
# kubectl (kustomize) and kubernetes-validate for tests/daemonset_manifests.rs.
bash scripts/validate-daemonset.sh --install-only ||
  echo "test.sh: could not install the manifest tools; tests/daemonset_manifests.rs will fail" >&2

# Namespaces the tests name nt<pid-hex>n<counter-hex>-<role>; their Drop guards remove them,
# but a test process killed outright (timeout, SIGKILL) cannot. Remove those whose pid is gone.
remove_stale_namespaces() {
  local name pid
  for name in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E '^nt[0-9a-f]+n[0-9a-f]+-' || true); do
    pid=$((16#$(sed -E 's/^nt([0-9a-f]+)n.*/\1/' <<<"$name")))
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "test.sh: removing stale namespace $name"
      ip netns del "$name" 2>/dev/null || true
    fi
  done
}
[[ $(id -u) -eq 0 ]] && remove_stale_namespaces

echo "test.sh: CI=${CI:-unset}"
# A fresh clone gains nothing from incremental artifacts; they would add over a GB of disk.
if [[ ${CI:-} == true ]]; then export CARGO_INCREMENTAL=0; fi
# A full disk shows up as a linker crash (SIGBUS) far from its cause; say how much there is.
free_kib=$(df -Pk . | awk 'NR == 2 {print $4}')
echo "test.sh: $((free_kib / 1024)) MiB free on the build disk (a fresh build needs about 2 GiB)"
if ((free_kib < 2 * 1024 * 1024)); then
  echo "test.sh: WARNING: under 2 GiB free; the build may fail with linker crashes" >&2
fi
set -x
cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
cargo test --all-targets --no-run
# The suite takes a few minutes; a hung test fails the run here, clearly, long before CI's limit.
status=0
timeout --kill-after=30 1200 cargo test --all-targets || status=$?
set +x
if [[ $status -eq 124 ]]; then
  echo "test.sh: the test run exceeded 20 minutes (a test hangs); see the 'running for over 60 seconds' lines above" >&2
fi
[[ $(id -u) -eq 0 ]] && remove_stale_namespaces

# Fuzzing: every target under fuzz/ builds and runs for FUZZ_CI_SECONDS (5) each from its
# seeds; FUZZ_CI_SECONDS=0 skips it. See scripts/fuzz-ci.sh.
bash scripts/fuzz-ci.sh || status=1
exit "$status"
