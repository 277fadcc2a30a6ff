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

echo "test.sh: CI=${CI:-unset}"
set -x
cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
cargo test --all-targets
