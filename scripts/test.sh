#!/usr/bin/env bash
# THE test command: ./scripts/test.sh (also what .ci/run runs).
#   1. install test dependencies (scripts/install-test-deps.sh)
#   2. cargo fmt --check
#   3. cargo clippy -D warnings (all targets)
#   4. the Kubernetes manifests, offline (deploy/kubernetes/validate.sh)
#   5. cargo build (all targets: benches and fuzz-free crates compile)
#   6. cargo test --workspace (unit + integration against real raftblkd processes)
#   7. a short fuzz run of every cargo-fuzz target (needs nightly; skipped otherwise),
#      but daemon/fuzz only with FUZZ_ALL=1: building the whole daemon (axum, tonic, sled)
#      with sanitizers takes about 5 minutes here, and cargo test runs the same harness
#      (control::fuzzing) over random and damaged messages under proptest
#   8. the real Linux kernel NBD client in a VM (tests/vm/run-kernel-test.sh)
# Stops at the first failure and prints a summary either way.
# Environment: FUZZ_SECONDS (default 10) per fuzz target; SKIP_FUZZ=1, SKIP_VM=1
# to leave those steps out locally (never in CI).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
fuzz_seconds=${FUZZ_SECONDS:-10}

summary=()
current=""
test_log=$(mktemp "${TMPDIR:-/tmp}/raftblk-cargo-test.XXXXXX")
started=$SECONDS

finish() {
    local rc=$?
    echo
    echo "================ scripts/test.sh summary ================"
    local line
    for line in "${summary[@]}"; do echo "  $line"; done
    local passed=0 failed=0
    for line in "${summary[@]}"; do if [[ $line == ok* ]]; then passed=$((passed + 1)); fi; done
    if ((rc != 0)) && [[ -n $current ]]; then
        echo "  FAILED  $current (exit $rc) after $((SECONDS - step_started))s"
        failed=1
    fi
    echo "  total $((SECONDS - started))s"
    echo "steps: $passed passed, $failed failed"
    if ((rc != 0)); then echo "RESULT: FAIL"; else echo "RESULT: PASS"; fi
    # Last line: the cargo tests summed over every test binary; a failed step counts as a failure.
    local tp tf
    tp=$(grep -oE 'test result: [a-zA-Z]+\. [0-9]+ passed' "$test_log" | awk '{s += $4} END {print s + 0}')
    tf=$(grep 'test result:' "$test_log" | grep -oE '[0-9]+ failed' | awk '{s += $1} END {print s + 0}')
    rm -f "$test_log"
    if ((rc != 0)); then tf=$((tf + 1)); fi
    echo "tests: $tp passed, $tf failed"
}
trap finish EXIT

step() {   # step NAME CMD...
    current=$1
    shift
    step_started=$SECONDS
    echo
    echo "================ $current ================"
    "$@"
    if [[ -n $current ]]; then
        summary+=("ok      $current ($((SECONDS - step_started))s)")
    fi
    current=""
}

note() {   # a step that did not run, with the reason
    summary+=("skipped $1: $2")
    echo "!!! skipped $1: $2"
}

in_ci() { [[ ${CI:-} == true || ${CI:-} == 1 ]]; }

fuzz_all() {
    local dir target ran=0
    # One target dir for every fuzz crate: they share most dependencies (the replication
    # crate's include the block device's), built once with the fuzzing flags.
    local target_dir="$root/target/fuzz"
    for dir in */fuzz; do
        [[ -f $dir/Cargo.toml ]] || continue
        if [[ $dir == daemon/fuzz && ${FUZZ_ALL:-} != 1 ]]; then
            echo "--- fuzz $dir: left out (FUZZ_ALL=1 runs it; cargo test ran its harness under proptest)"
            continue
        fi
        local targets
        targets=$(cd "$dir" && cargo +nightly fuzz list)
        for target in $targets; do
            echo "--- fuzz $dir $target (${fuzz_seconds}s)"
            (cd "$dir" && cargo +nightly fuzz run --target-dir "$target_dir" "$target" -- -max_total_time="$fuzz_seconds")
            ran=$((ran + 1))
        done
    done
    echo "fuzzed $ran target(s)"
}

kernel_test() {
    # exit 77 = skipped (not root or no apt outside CI); anything else non-zero fails
    local rc=0
    tests/vm/run-kernel-test.sh || rc=$?
    if ((rc == 77)); then
        summary+=("skipped kernel NBD client (VM): tests/vm/guest needs root and apt-get")
        current=""
        return 0
    fi
    return "$rc"
}

step "install test dependencies" scripts/install-test-deps.sh
step "cargo fmt --check" cargo fmt --all -- --check
step "cargo clippy -D warnings" cargo clippy --workspace --all-targets -- -D warnings
step "Kubernetes manifests (deploy/kubernetes/validate.sh)" deploy/kubernetes/validate.sh
step "cargo build --all-targets" cargo build --workspace --all-targets
# The build above made target/debug/raftblkd and raftblk; the integration tests use them as they are.
cargo_test() {
    set -o pipefail
    env RAFTBLK_TESTS_NO_BUILD=1 cargo test --workspace 2>&1 | tee "$test_log"
}
step "cargo test" cargo_test

if [[ ${SKIP_FUZZ:-} == 1 ]] && ! in_ci; then
    note "fuzz" "SKIP_FUZZ=1"
elif ! compgen -G "*/fuzz/Cargo.toml" >/dev/null; then
    note "fuzz" "no cargo-fuzz crate (*/fuzz/Cargo.toml) in the workspace"
elif ! rustup toolchain list 2>/dev/null | grep -q '^nightly' || ! cargo +nightly --version >/dev/null 2>&1; then
    note "fuzz" "no nightly toolchain (cargo-fuzz needs it)"
elif ! cargo fuzz --version >/dev/null 2>&1; then
    note "fuzz" "cargo-fuzz is not installed"
else
    step "fuzz (${fuzz_seconds}s per target)" fuzz_all
fi

if [[ ${SKIP_VM:-} == 1 ]] && ! in_ci; then
    note "kernel NBD client (VM)" "SKIP_VM=1"
else
    step "kernel NBD client (VM)" kernel_test
fi
