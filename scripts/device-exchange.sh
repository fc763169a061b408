#!/usr/bin/env bash
# On the lent GPU machine, in one call of at most 4 minutes: the exchange goals (issues 10 and 13)
# for docs/PERF.md. Two ranks share the one GPU, so "alone" steps are the single-rank step on the
# same card. Prepare with scripts/prepare-device.sh; carry .bin and .gl; output in $OUT/log.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
for f in .gl/*.deb; do dpkg -x "$f" /; done
ldconfig
export XDG_RUNTIME_DIR=/tmp OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
OUT=${OUT:-out}
mkdir -p "$OUT/raw"
B=.bin/dptrain
log="$OUT/log.txt"
start=$(date +%s)
run() {
  local left=$((230 - ($(date +%s) - start)))
  if [ "$left" -le 5 ]; then echo "SKIPPED (time): $*" >>"$log"; return; fi
  local t=${T:-40}; [ "$t" -gt "$left" ] && t=$left
  echo "\$ $*  [$(($(date +%s) - start)) s]" >>"$log"
  timeout "$t" "$@" >>"$log" 2>&1 || echo "FAILED ($?): $*" >>"$log"
}
date -u >"$log"
run nvidia-smi --query-gpu=name,driver_version --format=csv
# tune once (cached for the runs after)
run $B -v bench --workload mnist-mlp --batch 1024 --autotune on --json "$OUT/raw/mnist-1rank.json"
MP="mpirun -np 2 --bind-to none"
# goal: the step's allreduces <= 1.1x raw MPI of the same buckets; step <= 1.15 x max(compute, comm)
for mode in "" "--bucket-mb 0" "--bucket-mb 1" "--grad-wire bf16" "--compress powersgd" \
            "--staleness 1" "--sync params --sync-every 8" "--sync params --sync-every 8 --async-average"; do
  run $MP $B bench --workload mnist-mlp --batch 1024 $mode
done
# the ring above 16 MiB (docs/PERF.md, bucket sizes)
run $MP --mca coll_tuned_use_dynamic_rules 1 --mca coll_tuned_allreduce_algorithm 4 \
    $B bench --workload mnist-mlp --batch 1024 --bucket-mb 0
# wide-mlp with a bf16 wire (the 2-GPU goal; one GPU here, so the figure is the exchange, not scaling)
T=90 run $MP $B bench --workload wide-mlp --batch 8192 --steps 5 --repeats 3 --warmup 3 --grad-wire bf16
T=90 run $MP $B bench --workload wide-mlp --batch 8192 --steps 5 --repeats 3 --warmup 3
echo "done in $(($(date +%s) - start)) s" >>"$log"
