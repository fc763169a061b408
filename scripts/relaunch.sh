#!/usr/bin/env bash
# Rerun a training job after a failure, up to K more times, so that a job whose rank died still
# finishes. Give the job `--checkpoint-dir DIR --resume auto`: the first attempt starts fresh (no
# checkpoint yet), every later one continues exactly from the newest intact checkpoint.
#
#   scripts/relaunch.sh [-k K] [-d SECONDS] -- mpirun -np 4 dptrain train ... --checkpoint-dir ck --resume auto
#
# -k K: retries after the first attempt (default 3). -d: pause between attempts (default 2 s).
# Exits 0 on the first success, else with the last attempt's status.
set -uo pipefail
retries=3
pause=2
while getopts "k:d:" opt; do
  case $opt in
    k) retries=$OPTARG ;;
    d) pause=$OPTARG ;;
    *) echo "usage: $0 [-k K] [-d SECONDS] -- COMMAND..." >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
[ "${1:-}" = "--" ] && shift
if [ $# -eq 0 ]; then
  echo "usage: $0 [-k K] [-d SECONDS] -- COMMAND..." >&2
  exit 2
fi
case " $* " in
  *" --resume auto "*) ;;
  *) echo "relaunch: the command should carry --resume auto (and --checkpoint-dir), or every attempt starts over" >&2 ;;
esac
attempt=0
while :; do
  attempt=$((attempt + 1))
  "$@"
  status=$?
  [ $status -eq 0 ] && exit 0
  if [ $attempt -gt "$retries" ]; then
    echo "relaunch: attempt $attempt failed (status $status); giving up after $retries retries" >&2
    exit $status
  fi
  echo "relaunch: attempt $attempt failed (status $status); resuming (retry $attempt of $retries)" >&2
  sleep "$pause"
done
