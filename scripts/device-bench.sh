#!/usr/bin/env bash
# On the lent GPU machine, in one call (under 5 minutes): Vulkan loader, dptrain bench on every
# reference workload, the matrix product alone, the exchange under mpirun, and the PyTorch reference
# on the same card; JSON and a markdown table of the ratios land in $OUT (or ./out).
# Prepare with scripts/prepare-device.sh; carry .bin and .gl.
set -uo pipefail
cd "$(dirname "$0")/.."
for f in .gl/*.deb; do dpkg -x "$f" /; done
ldconfig
export XDG_RUNTIME_DIR=/tmp OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
OUT=${OUT:-out}
mkdir -p "$OUT/raw"
B=.bin/dptrain
log="$OUT/log.txt"
run() { echo "\$ $*" >>"$log"; timeout "${T:-150}" "$@" >>"$log" 2>&1 || echo "FAILED ($?): $*" >>"$log"; }
# (an environment variable before `run` reaches the command: `VAR=x run cmd`)
date -u >"$log"
run nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv
run $B devices
run $B bench matmul --size 4096 --iters 10 --json "$OUT/raw/matmul.json"
run $B bench --workload seed-logreg --batch 100 --steps 300 --json "$OUT/raw/seed-logreg-b100.json"
# what 16 steps per submission buy over one
DPTRAIN_STEPS_PER_SUBMIT=1 run $B bench --workload seed-logreg --batch 100 --steps 300 --json "$OUT/raw/seed-logreg-b100-1step.json"
run $B bench --workload seed-logreg --batch 65536 --json "$OUT/raw/seed-logreg-b65536.json"
run $B bench --workload mnist-mlp --batch 1024 --json "$OUT/raw/mnist-mlp-b1024.json"
run $B bench --workload mnist-mlp --batch 8192 --json "$OUT/raw/mnist-mlp-b8192.json"
run $B bench --workload wide-mlp --batch 8192 --json "$OUT/raw/wide-mlp-b8192.json"
run mpirun -np 2 $B bench --workload mnist-mlp --batch 1024 --json "$OUT/raw/mnist-mlp-b1024-2ranks.json"
run mpirun -np 2 $B bench comm --max-bytes 268435456 --iters 10 --json "$OUT/raw/comm-2ranks.json"
T=240 run python3 .bin/pytorch_reference.py --json "$OUT/raw/pytorch.json"
python3 scripts/perf_table.py "$OUT/raw" >"$OUT/table.md" 2>>"$log"
# at most 8 files come back: merge the raw JSON into one
python3 - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]; raw = os.path.join(out, "raw"); merged = {}
for f in sorted(os.listdir(raw)):
    try: merged[f[:-5]] = json.load(open(os.path.join(raw, f)))
    except Exception as e: merged[f[:-5]] = {"error": str(e)}
json.dump(merged, open(os.path.join(out, "results.json"), "w"), indent=1)
PY
rm -rf "$OUT/raw"
cat "$OUT/table.md"
