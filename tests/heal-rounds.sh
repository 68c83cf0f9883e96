#!/usr/bin/env bash
# Issue 12's healing target, "10 runs of 10": runs the control-plane test
# j_twenty_volumes_heal_within_dead_after_plus_15s RUNS times, each killing ROUNDS nodes in
# a row (5 nodes, 20 replicas=2 volumes with a copy on every victim, node_dead_after_s 5;
# every round must be back to 3 healthy copies within 20 s). Prints each round's time and a
# summary; exits non-zero if any run failed.
#
# Usage: tests/heal-rounds.sh [--runs N] [--rounds N]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=10
rounds=10
while [[ $# -gt 0 ]]; do
    case $1 in
        --runs) runs=$2; shift 2 ;;
        --rounds) rounds=$2; shift 2 ;;
        -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
        *) echo "unknown argument $1 (try --help)" >&2; exit 2 ;;
    esac
done
command -v qemu-io >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-utils; }
cargo build -p raftblk-daemon --bins
cargo test -p raftblk-tests --test control_plane --no-run
failed=0
log=$(mktemp)
for run in $(seq "$runs"); do
    if RAFTBLK_HEAL_ROUNDS=$rounds cargo test -q -p raftblk-tests --test control_plane \
        j_twenty_volumes_heal_within_dead_after_plus_15s -- --nocapture >"$log" 2>&1; then
        status=ok
    else
        status=FAILED
        failed=$((failed + 1))
    fi
    grep -o 'MEASURED healing round [0-9]*: .*' "$log" | sed "s/^/run $run: /"
    echo "run $run: $status"
    [[ $status == ok ]] || grep -E 'panicked|not healed|bound' "$log" | head -5
done
rm -f "$log"
echo "RESULT $runs runs of $rounds rounds: $((runs - failed)) passed, $failed failed"
((failed == 0))
