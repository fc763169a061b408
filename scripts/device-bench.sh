#!/usr/bin/env bash
# On the lent GPU machine, in one call of at most 5 minutes: the Vulkan loader; every matrix-product
# kernel the trainer can use (f32 and f16, cooperative matrices included) verified against the fp32
# reference on the card and timed, on square products and on each reference workload's shapes; each
# workload's step after tuning, in f32 and f16; the exchange under mpirun; MNIST training beside
# PyTorch at batch 128 and 1024, and f16 against f32 accuracy; the PyTorch reference throughputs.
# Output lands in $OUT (or ./out): log.txt with every command and its output, and results.json.
# Prepare with scripts/prepare-device.sh; carry .bin and .gl. The MNIST files travel in .bin/mnist.
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
# each command gets at most T seconds (default 60), and none starts after 270 s in all
run() {
  local left=$((270 - ($(date +%s) - start)))
  if [ "$left" -le 5 ]; then echo "SKIPPED (time): $*" >>"$log"; return; fi
  local t=${T:-60}; [ "$t" -gt "$left" ] && t=$left
  echo "\$ $*  [$(($(date +%s) - start)) s]" >>"$log"
  timeout "$t" "$@" >>"$log" 2>&1 || echo "FAILED ($?): $*" >>"$log"
}
date -u >"$log"
run nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv
run $B devices
# every kernel, verified then timed (cooperative matrices can only be proven here)
run $B bench matmul --size 4096 --iters 3 --json "$OUT/raw/matmul-4096.json"
run $B bench matmul --size 8192 --iters 2 --precision f16 --json "$OUT/raw/matmul-8192-f16.json"
run $B bench matmul --workload mnist-mlp --batch 8192 --iters 3 --json "$OUT/raw/matmul-mnist-8192.json"
run $B bench matmul --workload seed-logreg --batch 65536 --iters 3 --precision f32 --json "$OUT/raw/matmul-logreg-65536.json"
# the steps, tuned (-v prints each choice and the tuning time)
for w in "seed-logreg 100" "seed-logreg 65536" "mnist-mlp 1024" "mnist-mlp 8192" "wide-mlp 8192"; do
  set -- $w
  run $B -v bench --workload $1 --batch $2 --autotune on --json "$OUT/raw/$1-b$2.json"
done
run $B -v bench --workload mnist-mlp --batch 8192 --precision f16 --autotune on --json "$OUT/raw/mnist-mlp-b8192-f16.json"
T=90 run $B -v bench --workload wide-mlp --batch 8192 --precision f16 --autotune on --json "$OUT/raw/wide-mlp-b8192-f16.json"
run mpirun -np 2 $B bench --workload mnist-mlp --batch 1024 --json "$OUT/raw/mnist-mlp-b1024-2ranks.json"
# end-to-end MNIST beside PyTorch eager with the same settings
for b in 128 1024; do
  run $B train --data $M --model mlp --hidden 1024,1024 --epochs 5 --batch-size $b --lr 0.1 --momentum 0.9 --seed 1 --device gpu
  run python3 .bin/pytorch_train_mnist.py --data $M --hidden 1024,1024 --epochs 5 --batch $b
done
# f16 against f32 on MNIST MLP-256
for p in f32 f16; do
  run $B train --data $M --model mlp --hidden 256 --epochs 5 --batch-size 128 --lr 0.1 --momentum 0.9 --seed 1 --device gpu --precision $p
done
T=120 run python3 .bin/pytorch_reference.py --json "$OUT/raw/pytorch.json"
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
tail -c 6000 "$log"
