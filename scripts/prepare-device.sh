#!/usr/bin/env bash
# Run here (the CPU machine) before a device call: build the release binary into .bin/, copy the
# PyTorch reference beside it, and fetch the Vulkan loader packages into .gl/ (both ignored by git).
# Then one device call: carry [".bin", ".gl"], command `bash scripts/device-bench.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --quiet
mkdir -p .bin
cp target/release/dptrain .bin/
cp ../shared/anchors/pytorch_reference.py .bin/
[ -d .gl ] && ls .gl/*.deb >/dev/null 2>&1 || bash ../shared/device/prepare-gl.sh
ls -la .bin .gl
