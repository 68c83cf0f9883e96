#!/usr/bin/env bash
# The fio comparison runner: the same fio jobs against raftblkd, qemu-nbd
# (--cache=none --aio=io_uring), nbdkit's file plugin and fio's io_uring engine
# on a raw file (the disk's ceiling), all in one run on the same file system.
# Prints IOPS, bandwidth, mean and p99 latency, server CPU time per I/O, and the
# ratios raftblkd/qemu-nbd and raftblkd/raw. Results land in bench-results/.
#
# Then the replicated runs: the same jobs on replicas=0, 1 and 2 volumes of a
# local 3-node cluster (raftblk dev-cluster), through the leader's node, and on an
# encrypted replicas=2 volume. An encrypted volume of raftblkd alone runs beside the
# plain one. With --baseline REV, raftblkd built at git revision REV runs the 4k jobs
# on a plain volume too, alternating with the current build --ab-rounds times (an A/B
# of the same jobs in one run, e.g. to price per-block checksums).
#
# Usage: benches/run.sh [--runtime SECONDS] [--size SIZE] [--dir DIR] [--no-replicated]
#                       [--baseline REV] [--ab-rounds N]
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

runtime=15
size=2G
dir=""
replicated=1
baseline=""
ab_rounds=2
while [[ $# -gt 0 ]]; do
    case $1 in
        --runtime) runtime=$2; shift 2 ;;
        --size) size=$2; shift 2 ;;
        --dir) dir=$2; shift 2 ;;
        --no-replicated) replicated=0; shift ;;
        --baseline) baseline=$2; shift 2 ;;
        --ab-rounds) ab_rounds=$2; shift 2 ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) echo "unknown argument $1 (try --help)" >&2; exit 2 ;;
    esac
done

need=()
command -v fio >/dev/null || need+=(fio)
command -v qemu-nbd >/dev/null || need+=(qemu-utils)
command -v nbdkit >/dev/null || need+=(nbdkit)
command -v python3 >/dev/null || need+=(python3)
if [[ ${#need[@]} -gt 0 ]]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-remove "${need[@]}"
fi
fio --enghelp 2>/dev/null | grep -qw nbd || { echo "this fio has no nbd engine" >&2; exit 1; }

cargo build --release -p raftblk-daemon --bins
target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
raftblkd=$target_dir/release/raftblkd
raftblk=$target_dir/release/raftblk
# Encrypted volumes need a KEK; a fixed one is fine for a benchmark.
export RAFTBLK_KEK=000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f

# The baseline build for the A/B, in its own worktree and target directory.
base_raftblkd=""
if [[ -n $baseline ]]; then
    base_src=$root/bench-results/baseline-src
    rm -rf "$base_src"; git worktree prune
    git worktree add --detach "$base_src" "$baseline" >/dev/null
    (cd "$base_src" && cargo build --release -p raftblk-daemon --bins --target-dir "$root/bench-results/baseline-target")
    base_raftblkd=$root/bench-results/baseline-target/release/raftblkd
    git worktree remove --force "$base_src"
fi

work=${dir:-$root/bench-results/work}
out=$root/bench-results/$(date +%Y%m%d-%H%M%S)
mkdir -p "$work" "$out"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

free_port() {
    local p=$((20000 + RANDOM % 20000))
    while (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; do p=$((p + 1)); done
    echo "$p"
}
wait_port() {
    for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done
    echo "nothing listens on port $1" >&2; return 1
}
cpu_ticks() {   # summed over a comma-separated list of pids
    local t=0 p
    for p in ${1//,/ }; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done
    echo "$t"
}

# name|fio options
jobs=(
    "randwrite-4k-qd1|--rw=randwrite --bs=4k --iodepth=1"
    "randwrite-4k-qd32|--rw=randwrite --bs=4k --iodepth=32"
    "randread-4k-qd32|--rw=randread --bs=4k --iodepth=32"
    "write-1m-qd8|--rw=write --bs=1m --iodepth=8"
    "read-1m-qd8|--rw=read --bs=1m --iodepth=8"
)
common="--size=$size --time_based --runtime=$runtime --ramp_time=2 --numjobs=1 --group_reporting --output-format=json"

# run_target NAME PID FIO-TARGET-OPTIONS...: prefill once (so reads hit data,
# not holes), then every job; records server CPU ticks per job.
run_target() {
    local name=$1 pid=$2; shift 2
    echo "== $name: prefill"
    fio --name=prefill --rw=write --bs=1m --iodepth=8 --size="$size" "$@" >/dev/null
    for j in "${jobs[@]}"; do
        local jn=${j%%|*} opts=${j#*|} before after
        echo "== $name: $jn"
        # Every job starts on a quiet disk: what the previous job left in the page cache
        # (three copies' worth on a replicated volume) is written back first, not during
        # this job.
        sync
        sleep 1
        before=$([[ $pid != 0 ]] && cpu_ticks "$pid" || echo 0)
        # shellcheck disable=SC2086
        fio --name="$jn" $opts $common "$@" >"$out/$name.$jn.json"
        after=$([[ $pid != 0 ]] && cpu_ticks "$pid" || echo 0)
        echo $((after - before)) >"$out/$name.$jn.cputicks"
    done
}

# run_alone NAME BINARY [volume create flags]: raftblkd alone, one volume, every job.
run_alone() {
    local name=$1 bin=$2; shift 2
    local rport aport rpid
    rport=$(free_port); aport=$(free_port)
    "$bin" --data-dir "$work/$name" --nbd-listen "127.0.0.1:$rport" --api-listen "127.0.0.1:$aport" \
        --nbd-socket "$work/$name.sock" --bootstrap-volumes none --log-level warn &
    pids+=($!); rpid=$!
    wait_port "$aport"
    "$raftblk" --api "127.0.0.1:$aport" volume create bench --size "$size" "$@" >/dev/null
    run_target "$name" "$rpid" --ioengine=nbd --uri="nbd://127.0.0.1:$rport/bench"
    kill "$rpid"; wait "$rpid" || true
    rm -rf "${work:?}/$name"
}

run_alone raftblkd "$raftblkd"
run_alone raftblkd-enc "$raftblkd" --encrypted
if [[ -n $base_raftblkd ]]; then
    # A/B: the 4k jobs alternate between the baseline and the current build.
    all_jobs=("${jobs[@]}")
    jobs=("${all_jobs[@]:0:3}")
    for r in $(seq "$ab_rounds"); do
        run_alone "ab-base.r$r" "$base_raftblkd"
        run_alone "ab-new.r$r" "$raftblkd"
    done
    jobs=("${all_jobs[@]}")
fi

# qemu-nbd on a file of the same size in the same file system
truncate -s "$size" "$work/qemu.img"
qport=$(free_port)
qemu-nbd -f raw --cache=none --aio=io_uring -x bench -b 127.0.0.1 -p "$qport" -t -e 8 "$work/qemu.img" &
pids+=($!); qpid=$!
wait_port "$qport"
run_target qemu-nbd "$qpid" --ioengine=nbd --uri="nbd://127.0.0.1:$qport/bench"
kill "$qpid"; wait "$qpid" 2>/dev/null || true

# nbdkit file plugin
truncate -s "$size" "$work/nbdkit.img"
kport=$(free_port)
nbdkit -f -i 127.0.0.1 -p "$kport" file "$work/nbdkit.img" &
pids+=($!); kpid=$!
wait_port "$kport"
run_target nbdkit "$kpid" --ioengine=nbd --uri="nbd://127.0.0.1:$kport/"
kill "$kpid"; wait "$kpid" 2>/dev/null || true

# fio's own io_uring engine on a raw file: the ceiling
truncate -s "$size" "$work/raw.img"
run_target raw 0 --ioengine=io_uring --direct=1 --filename="$work/raw.img"

if [[ $replicated == 1 ]]; then
    cport=$(free_port)
    while (exec 3<>"/dev/tcp/127.0.0.1/$((cport + 22))") 2>/dev/null; do cport=$((cport + 100)); done
    "$raftblk" dev-cluster --nodes 3 --base-dir "$work/cluster" --base-port "$cport" --volume-size 0 \
        >"$work/cluster.log" 2>&1 &
    pids+=($!); cpid=$!
    wait_port "$((cport + 21))"
    api="127.0.0.1:$((cport + 1))"
    for _ in $(seq 100); do "$raftblk" --api "$api" status >/dev/null 2>&1 && break; sleep 0.2; done
    for r in 0 1 2 2e; do
        if [[ $r == 2e ]]; then
            "$raftblk" --api "$api" volume create "r$r" --size "$size" --replicas 2 --encrypted >/dev/null
        else
            "$raftblk" --api "$api" volume create "r$r" --size "$size" --replicas "$r" >/dev/null
        fi
        # Serve from the leader's node, as a client next to its primary would be.
        for _ in $(seq 100); do
            leader=$("$raftblk" --api "$api" --json volume inspect "r$r" | python3 -c 'import json,sys; print(json.load(sys.stdin)["replication"]["leader"])')
            [[ $leader != 0 ]] && break
            sleep 0.1
        done
        if [[ $leader != 1 ]]; then
            "$raftblk" --api "$api" volume transfer-leader "r$r" 1 >/dev/null
            for _ in $(seq 100); do
                leader=$("$raftblk" --api "$api" --json volume inspect "r$r" | python3 -c 'import json,sys; print(json.load(sys.stdin)["replication"]["leader"])')
                [[ $leader == 1 ]] && break
                sleep 0.1
            done
        fi
        # CPU is that of every node: replication costs CPU on the followers too.
        node_pids=$(pgrep -f "raftblkd --node-id [0-9]+ --data-dir $work/cluster" | paste -sd, -)
        run_target "replicas$r" "$node_pids" --ioengine=nbd --uri="nbd://127.0.0.1:$cport/r$r"
        # Each volume's data goes when its runs are done: the disk holds one at a time.
        "$raftblk" --api "$api" volume delete "r$r" --force >/dev/null || true
    done
    kill -INT "$cpid"; wait "$cpid" 2>/dev/null || true
    # The node alone once more, after the cluster: this host's speed drifts over a run, and
    # the targets' ratios use the mean of the two alone runs around the cluster's.
    run_alone raftblkd-after "$raftblkd"
fi

python3 "$root/benches/report.py" "$out" "$runtime" | tee "$out/table.md"
echo "results: $out"
