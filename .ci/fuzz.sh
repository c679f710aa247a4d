#!/usr/bin/env bash
# Runs every cargo-fuzz target (fuzz/) for FUZZ_SECONDS (default 30) from its corpus; called by
# .ci/run. Works with the stable toolchain alone: with `-s none` cargo-fuzz passes rustc no -Z
# flag (the sanitizers need nightly, and this crate forbids unsafe code, so they would add
# build time rather than findings). A crash, a hang (-timeout) or a blown memory limit makes
# `cargo fuzz run` exit non-zero, which fails CI; the input that did it is kept in
# fuzz/artifacts/TARGET/ and printed in the log (reproduce: `cargo fuzz run -s none TARGET FILE`).
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${FUZZ_SECONDS:-30}"
cargo_fuzz_version=0.13.2

if ! cargo fuzz --version 2>/dev/null | grep -qF "$cargo_fuzz_version"; then
  cargo install cargo-fuzz --version "$cargo_fuzz_version" --locked --quiet
fi
# cargo-fuzz has no --locked: check the fuzz crate's lock file is current before it builds.
cargo fetch --locked --quiet --manifest-path fuzz/Cargo.toml

# Unoptimised build: about half the CPU time of the optimised one (which cargo-fuzz builds with
# one codegen unit), and still tens to hundreds of thousands of inputs per target in 30 s on a
# loaded 2-core machine; the long runs in fuzz/README.md use the optimised build.
cargo fuzz build -s none --dev

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
targets=$(cargo fuzz list)
for target in $targets; do
  echo "-- fuzz $target (${seconds} s)"
  # New inputs go to a scratch corpus: the committed one (fuzz/corpus/TARGET) is only read.
  mkdir -p "$scratch/$target"
  log="$scratch/$target.log"
  if ! cargo fuzz run -s none --dev "$target" "$scratch/$target" "fuzz/corpus/$target" -- \
    -max_total_time="$seconds" -timeout=10 -print_final_stats=1 >"$log" 2>&1; then
    grep -m 3 -A 2 'panicked' "$log" >&2 || true
    tail -n 30 "$log" >&2
    echo "fuzz target $target failed (input kept in fuzz/artifacts/$target/)" >&2
    exit 1
  fi
  grep -E '^(Done|stat::number_of_executed_units|stat::peak_rss_mb)' "$log" || true
done
