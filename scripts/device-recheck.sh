#!/usr/bin/env bash
# A short device call (about 2 minutes) after kernel changes: the f16 kernels verified and timed on
# square products, the small workloads (fused step against separate kernels), the f16 workloads, and
# the PyTorch reference in the same call. Same preparation and output as scripts/device-bench.sh.
set -uo pipefail
cd "$(dirname "$0")/.."
for f in .gl/*.deb; do dpkg -x "$f" /; done
ldconfig
export XDG_RUNTIME_DIR=/tmp OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
OUT=${OUT:-out}
mkdir -p "$OUT/raw"
B=.bin/dptrain
M=.bin/mnist
log="$OUT/log.txt"
start=$(date +%s)
run() {
  local left=$((200 - ($(date +%s) - start)))
  if [ "$left" -le 5 ]; then echo "SKIPPED (time): $*" >>"$log"; return; fi
  local t=${T:-45}; [ "$t" -gt "$left" ] && t=$left
  echo "\$ $*  [$(($(date +%s) - start)) s]" >>"$log"
  timeout "$t" "$@" >>"$log" 2>&1 || echo "FAILED ($?): $*" >>"$log"
}
date -u >"$log"
run $B bench matmul --size 4096 --iters 3 --precision f16 --json "$OUT/raw/matmul-4096-f16.json"
run $B bench matmul --size 8192 --iters 2 --precision f16 --json "$OUT/raw/matmul-8192-f16.json"
run $B bench --workload seed-logreg --batch 100 --steps 300 --autotune on --json "$OUT/raw/seed-logreg-b100.json"
DPTRAIN_FUSED=off run $B bench --workload seed-logreg --batch 100 --steps 300 --autotune on --json "$OUT/raw/seed-logreg-b100-unfused.json"
run $B bench --workload seed-logreg --batch 65536 --autotune on --json "$OUT/raw/seed-logreg-b65536.json"
run $B bench --workload mnist-mlp --batch 1024 --autotune on --json "$OUT/raw/mnist-mlp-b1024.json"
run $B -v bench --workload mnist-mlp --batch 8192 --precision f16 --autotune on --json "$OUT/raw/mnist-mlp-b8192-f16.json"
run $B -v bench --workload wide-mlp --batch 8192 --precision f16 --autotune on --json "$OUT/raw/wide-mlp-b8192-f16.json"
for p in f32 f16; do
  run $B train --data $M --model mlp --hidden 256 --epochs 5 --batch-size 128 --lr 0.1 --momentum 0.9 --seed 1 --device gpu --precision $p
done
T=60 run python3 .bin/pytorch_reference.py --skip-sgemm --json "$OUT/raw/pytorch.json"
python3 - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]; raw = os.path.join(out, "raw"); merged = {}
for f in sorted(os.listdir(raw)):
    try: merged[f[:-5]] = json.load(open(os.path.join(raw, f)))
    except Exception as e: merged[f[:-5]] = {"error": str(e)}
json.dump(merged, open(os.path.join(out, "results.json"), "w"), indent=1)
PY
rm -rf "$OUT/raw"
echo "done in $(($(date +%s) - start)) s" >>"$log"
grep -v "INFO" "$log" | tail -c 9000
