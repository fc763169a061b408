#!/usr/bin/env bash
# Run here (the CPU machine) before a device call: build the release binary, strip it into .bin/
# (unstripped it is over the 64 MiB a call may carry), copy the PyTorch anchors beside it, and fetch
# the Vulkan loader packages into .gl/ (both folders are ignored by git).
# Then one device call: carry [".bin", ".gl"], command `OUT=$OUT bash scripts/device-bench.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --quiet
mkdir -p .bin
cp target/release/dptrain .bin/
strip .bin/dptrain
cp ../shared/anchors/pytorch_reference.py ../shared/anchors/pytorch_train_mnist.py .bin/
mkdir -p .bin/mnist
cp ../shared/datasets/mnist/*.gz .bin/mnist/
[ -d .gl ] && ls .gl/*.deb >/dev/null 2>&1 || bash ../shared/device/prepare-gl.sh
du -sh .bin .gl
