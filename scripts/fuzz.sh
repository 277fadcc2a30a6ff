#!/usr/bin/env bash
# Runs every cargo-fuzz target (fuzz/README.md) for a while each:
#   scripts/fuzz.sh [SECONDS] [TARGET...]
# SECONDS per target defaults to 30 (or $FUZZ_SECONDS); TARGETs default to all of
# `cargo fuzz list`. Each target starts from its committed seeds (fuzz/seeds/<target>) and its
# local corpus (fuzz/corpus/<target>, git-ignored, where new inputs go). Every target runs even
# after one fails; the script exits 1 if any crashed, leaked, ran out of memory or hung for
# more than 10 s on one input (the input is saved under fuzz/artifacts/<target>/).
# Needs the nightly toolchain and `cargo install cargo-fuzz`. FUZZ_BUILD_FLAGS: see below.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-${FUZZ_SECONDS:-30}}
shift $(($# > 0 ? 1 : 0))
if ! [[ $seconds =~ ^[0-9]+$ ]] || ((seconds == 0)); then
  echo "fuzz.sh: SECONDS must be a positive integer, got '$seconds'" >&2
  exit 2
fi
if (($#)); then
  targets=("$@")
else
  mapfile -t targets < <(cargo +nightly fuzz list)
fi

# Build once, then run the binaries: `cargo fuzz run` would rebuild whenever src/ changed in
# between, eating the time budget of the targets after it. FUZZ_BUILD_FLAGS go to
# `cargo fuzz build` (e.g. `--dev`: unoptimised, much quicker to build, slower to run).
read -r -a build_flags <<<"${FUZZ_BUILD_FLAGS:-}"
started=$SECONDS
cargo +nightly fuzz build "${build_flags[@]}"
echo "fuzz.sh: built in $((SECONDS - started))s"
profile=release
for flag in "${build_flags[@]}"; do
  [[ $flag == --dev || $flag == -D ]] && profile=debug
done
bin="fuzz/target/$(rustc +nightly -vV | sed -n 's/^host: //p')/$profile"
failed=()
for target in "${targets[@]}"; do
  echo "fuzz.sh: $target for ${seconds}s"
  mkdir -p "fuzz/corpus/$target" "fuzz/seeds/$target" "fuzz/artifacts/$target"
  if ! "$bin/$target" "fuzz/corpus/$target" "fuzz/seeds/$target" \
    -artifact_prefix="fuzz/artifacts/$target/" -max_total_time="$seconds" -timeout=10 \
    -print_final_stats=1; then
    failed+=("$target")
  fi
done

if ((${#failed[@]})); then
  echo "fuzz.sh: FAILED: ${failed[*]} (inputs in fuzz/artifacts/<target>/)" >&2
  exit 1
fi
echo "fuzz.sh: ${#targets[@]} targets, ${seconds}s each, no findings"
