#!/usr/bin/env bash
# The whole test suite, as CI runs it: system packages, formatting, lints, then every test
# (kernels against CPU references on lavapipe, accuracy bars, GPU/CPU equivalence, real mpirun,
# reliability, bad input). Ends with one summary line "tests: N passed, M failed".
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
source scripts/env.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
log=$(mktemp)
status=0
cargo test --workspace --lib --bins --tests 2>&1 | tee "$log" || status=$?
summary=$(awk '/^test result:/ { for (i = 1; i < NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
  END { printf "tests: %d passed, %d failed", p, f }' "$log")
rm -f "$log"
echo "$summary"
exit $status
