#!/usr/bin/env bash
# The fuzz stage of CI (scripts/test.sh runs it after the tests): every target under fuzz/
# builds and runs briefly from its seeds, so a dependency bump or a parser change that breaks a
# target, or a crash its seeds reach, fails CI. scripts/fuzz.sh runs them longer.
#   scripts/fuzz-ci.sh            # FUZZ_CI_SECONDS per target (default 5)
# Installs what is missing: the nightly toolchain (cargo-fuzz needs it; minimal profile) and
# cargo-fuzz (a pinned version, built with its own lockfile). FUZZ_BUILD_FLAGS (default --dev)
# go to `cargo fuzz build`, which builds every target in one cargo invocation.
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_FUZZ_VERSION=0.13.2
seconds=${FUZZ_CI_SECONDS:-5}
[[ $seconds =~ ^[0-9]+$ ]] || { echo "fuzz-ci: FUZZ_CI_SECONDS must be a number, got '$seconds'" >&2; exit 2; }
((seconds > 0)) || { echo "fuzz-ci: FUZZ_CI_SECONDS=0, skipped"; exit 0; }

started=$SECONDS
if ! rustup run nightly rustc --version >/dev/null 2>&1; then
  echo "fuzz-ci: installing the nightly toolchain (cargo-fuzz needs it)"
  rustup toolchain install nightly --profile minimal >/dev/null || {
    echo "fuzz-ci: FAILED: no nightly toolchain (rustup toolchain install nightly)" >&2
    exit 1
  }
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "fuzz-ci: installing cargo-fuzz $CARGO_FUZZ_VERSION"
  cargo install cargo-fuzz --locked --version "$CARGO_FUZZ_VERSION" --quiet || {
    echo "fuzz-ci: FAILED: could not install cargo-fuzz" >&2
    exit 1
  }
fi
echo "fuzz-ci: tools ready after $((SECONDS - started))s"
# Unoptimised (--dev): the optimised, sanitizer-instrumented build of the whole agent takes
# many minutes; for a brief run from the seeds, build time is what counts.
FUZZ_BUILD_FLAGS=${FUZZ_BUILD_FLAGS:---dev} bash scripts/fuzz.sh "$seconds"
echo "fuzz-ci: the fuzz stage took $((SECONDS - started))s"
