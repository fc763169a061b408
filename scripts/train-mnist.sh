#!/usr/bin/env bash
# The main job: train an MLP (784-256-10) on MNIST for 5 epochs on the best device (a hardware GPU, else the
# CPU reference), save it with its settings, evaluate the saved file, and draw the training curves.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
source scripts/env.sh
data=$(scripts/get-mnist.sh)
cargo build --release --quiet
./target/release/dptrain train --data "$data" --model mlp --hidden 256 --epochs 5 \
  --batch-size 128 --lr 0.1 --momentum 0.9 --seed 1 --save mnist-mlp.safetensors \
  --metrics-out mnist-mlp.jsonl --log-every 50 "$@"
./target/release/dptrain eval --model-file mnist-mlp.safetensors --data "$data" --report
./target/release/dptrain plot mnist-mlp.jsonl --out mnist-mlp.png
