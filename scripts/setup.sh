#!/usr/bin/env bash
# Install the system packages dptrain needs on Debian/Ubuntu, only those that are missing:
# the Vulkan loader and Mesa's drivers (lavapipe runs WGSL on the CPU when there is no GPU),
# Open MPI (headers for the mpi crate, mpirun for multi-rank runs), libclang (the mpi crate's bindgen) and
# DejaVu (the TrueType font `dptrain plot` draws PNG text with; without it, a built-in bitmap font serves).
set -euo pipefail
pkgs=(mesa-vulkan-drivers libvulkan1 libopenmpi-dev openmpi-bin libclang-dev pkg-config fonts-dejavu-core)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}" >&2
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo not found; install the Rust toolchain (https://rustup.rs) and rerun" >&2
  exit 1
fi
