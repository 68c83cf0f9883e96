#!/usr/bin/env bash
# The real Linux kernel NBD client against raftblkd, through tests/vm/guest (the
# project's throwaway Debian-kernel guest under QEMU; `tests/vm/guest --help`).
#
#   1. start target/debug/raftblkd on free loopback ports with a temp data dir
#   2. guest: tests/vm/kernel-smoke.sh (nbd-client, mkfs.ext4, mount, files +
#      sha256, drop caches, fsck, verify, fstrim, fsck), checksums to the host
#   3. SIGTERM raftblkd (must exit 0), restart it on the same data dir
#   4. host: copy the volume out with nbdcopy, e2fsck it, and check every file's
#      sha256 with debugfs: the kernel's writes are really in raftblkd's store
#   5. guest: tests/vm/fio-verify.sh (fio io_uring randwrite QD32 with a crc32c
#      verify, a sequential read, a clean dmesg)
#   6. guest: tests/vm/ublk-check.sh (ublk_drv loaded, /dev/ublk-control present)
#   7. guest: tests/vm/attach-restart.sh (raftblkd and raftblk inside the guest: `volume
#      attach` over netlink, ext4 mounted, SIGKILL and SIGTERM restarts under fio verify
#      with no I/O error, online grow with resize2fs, detach refused while mounted)
#   8. guest: tests/vm/csi-kernel.sh (daemon/tests/csi_services.rs's kernel test: CSI
#      NodeStage with mkfs only when empty, restage without mkfs, NodeExpand of a mounted
#      ext4, a raw block volume, the fence refusing a taken-over node's writes)
#   9. print the guest's timings
#
# Exit: 0 passed; 77 skipped (QEMU cannot run here and not CI); anything else failed.
# Env: FIO_RUNTIME (default 5), KEEP_WORK=1, RAFTBLK_VM_CACHE (the guest's cache).
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
guest=$root/tests/vm/guest
fio_runtime=${FIO_RUNTIME:-5}

# The guest needs root (packages, a kernel unpacked into the cache) and apt.
if [[ $(id -u) != 0 ]] || ! command -v apt-get >/dev/null; then
    if [[ ${CI:-} == true || ${CI:-} == 1 ]]; then
        echo "run-kernel-test: the guest needs root and apt-get (Debian); CI has both" >&2
        exit 1
    fi
    echo "!!!!!!!!!! run-kernel-test: SKIPPED: the guest needs root and apt-get (Debian) !!!!!!!!!!"
    exit 77
fi
"$guest" --prepare

bins=${CARGO_TARGET_DIR:-$root/target}/debug
if [[ ! -x $bins/raftblkd || ! -x $bins/raftblk ]]; then
    (cd "$root" && cargo build -p raftblk-daemon --bins)
fi
raftblkd=$bins/raftblkd
raftblk=$bins/raftblk

work=$(mktemp -d "${TMPDIR:-/tmp}/raftblk-kernel-test.XXXXXX")
daemon_pid=""
alive() { [[ -n $1 && -e /proc/$1 ]] && ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2>/dev/null; }
cleanup() {
    local rc=$?
    if alive "$daemon_pid"; then
        kill -9 "$daemon_pid" 2>/dev/null || true
        wait "$daemon_pid" 2>/dev/null || true
    fi
    if ((rc != 0)); then
        echo "---- raftblkd log (last 40 lines) ----"
        tail -n 40 "$work/raftblkd.log" 2>/dev/null || true
    fi
    if [[ ${KEEP_WORK:-} == 1 ]]; then echo "work dir kept: $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

free_port() {
    local port=$((20000 + RANDOM % 20000))
    while (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do port=$((port + 1)); done
    echo "$port"
}
nbd_port=$(free_port)
api_port=$(free_port)
while [[ $api_port == "$nbd_port" ]]; do api_port=$(free_port); done
api=http://127.0.0.1:$api_port
cli() { "$raftblk" --api "$api" "$@"; }

start_daemon() {
    "$raftblkd" --data-dir "$work/data" --nbd-listen "127.0.0.1:$nbd_port" \
        --api-listen "127.0.0.1:$api_port" --nbd-socket "$work/nbd.sock" \
        --bootstrap-volumes none >>"$work/raftblkd.log" 2>&1 &
    daemon_pid=$!
    local i
    for i in $(seq 300); do
        if cli status >/dev/null 2>&1; then return 0; fi
        alive "$daemon_pid" || { echo "raftblkd exited during start" >&2; return 1; }
        sleep 0.1
    done
    echo "raftblkd did not answer within 30 s" >&2
    return 1
}

stop_daemon() {   # SIGTERM; must exit 0 within 15 s
    local i rc=0
    kill -TERM "$daemon_pid"
    for i in $(seq 150); do alive "$daemon_pid" || break; sleep 0.1; done
    if alive "$daemon_pid"; then echo "raftblkd did not exit within 15 s of SIGTERM" >&2; return 1; fi
    wait "$daemon_pid" || rc=$?
    daemon_pid=""
    if ((rc != 0)); then echo "raftblkd exited $rc on SIGTERM" >&2; return 1; fi
}

metric() {   # metric 'name{labels}' -> value (0 if absent)
    local body
    body=$(exec 3<>"/dev/tcp/127.0.0.1/$api_port" && printf 'GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n' >&3 && cat <&3)
    awk -v k="$1" '$1 == k { print $2; found = 1 } END { if (!found) print 0 }' <<<"$body"
}

timings=()
run_vm() {   # run_vm LABEL guest-args...
    local label=$1 t0=$SECONDS rc=0
    shift
    echo "=== guest: $label"
    "$guest" -q --log "$work/$label.log" --timeout 600 --host-port "$nbd_port" "$@" || rc=$?
    timings+=("$label: guest exit $rc, $((SECONDS - t0))s wall")
    grep -aE 'GUEST-(TIME|FIO)|ATTACH-|CSI-KERNEL|checksums ok|PASS|device size|size:' "$work/$label.log" | tr -d '\r' | sed "s/^/  [$label] /" || true
    if ((rc != 0)); then
        echo "guest $label failed with exit $rc (124 = host timeout, 125 = VM/infra failure)" >&2
        return "$rc"
    fi
}

echo "=== raftblkd on 127.0.0.1:$nbd_port (API $api), data in $work/data"
start_daemon
size=$((1024 * 1024 * 1024))
cli volume create kvol --size 1G >/dev/null
cli volume create smoke --size 1G >/dev/null

# 2. our snippet
mkdir -p "$work/out"
run_vm kernel-smoke --export kvol --out "$work/out" --env "EXPECT_SIZE=$size" -- "$root/tests/vm/kernel-smoke.sh"
[[ -s $work/out/sums ]] || { echo "guest left no checksums in /out/sums" >&2; exit 1; }
written=$(metric 'raftblk_volume_bytes_total{op="write",volume="kvol"}')
echo "raftblkd counted $written bytes written to kvol"
awk -v w="$written" 'BEGIN { exit !(w + 0 >= 8 * 1024 * 1024) }' || { echo "raftblkd saw less than 8 MiB of writes to kvol" >&2; exit 1; }

# 3. clean shutdown and restart
stop_daemon
start_daemon

# 4. the host reads the kernel's filesystem back out of raftblkd
nbdcopy "nbd://127.0.0.1:$nbd_port/kvol" "$work/kvol.img"
e2fsck -f -n "$work/kvol.img"
checked=0
while read -r sum path; do
    got=$(debugfs -R "cat /$path" "$work/kvol.img" 2>/dev/null | sha256sum | cut -d' ' -f1)
    if [[ $got != "$sum" ]]; then echo "host check: /$path has sha256 $got, the guest wrote $sum" >&2; exit 1; fi
    checked=$((checked + 1))
done <"$work/out/sums"
echo "host check: $checked files verified in the volume after a SIGTERM restart"
rm -f "$work/kvol.img"

# 5. fio with verification through the kernel client
run_vm fio-verify --export smoke --env "FIO_RUNTIME=$fio_runtime" -- "$root/tests/vm/fio-verify.sh"

# 6. the guest's ublk driver, for the ublk front end's tests
run_vm ublk-check -- "$root/tests/vm/ublk-check.sh"

# 7. the daemon's own kernel attach, inside the guest: ext4 on /dev/nbdN survives SIGKILL
#    and SIGTERM restarts of raftblkd under fio verify, then grows online
run_vm attach-restart --mem 2048 --bin "$raftblkd" --bin "$raftblk" -- "$root/tests/vm/attach-restart.sh"

# 8. the CSI Node service against the guest's kernel (daemon/tests/csi_services.rs's kernel test)
csi_test=$(cd "$root" && cargo test -p raftblk-daemon --test csi_services --no-run 2>&1 |
    sed -n 's/.*Executable tests\/csi_services.rs (\(.*\))$/\1/p' | tail -n 1)
[[ $csi_test == /* ]] || csi_test=$root/$csi_test
[[ -x $csi_test ]] || { echo "cannot find the csi_services test binary ($csi_test)" >&2; exit 1; }
run_vm csi-kernel --mem 2048 --bin "$raftblkd" --bin "$csi_test" --env "CSI_TEST=$(basename "$csi_test")" \
    -- "$root/tests/vm/csi-kernel.sh"

stop_daemon
echo "=== kernel NBD client timings"
for t in "${timings[@]}"; do echo "  $t"; done
echo "kernel NBD client test: PASS"
