# tests/vm/guest snippet (busybox sh, set -e; needs --bin raftblkd --bin raftblk): the
# daemon's own kernel attach. raftblkd runs inside the guest; `raftblk volume attach`
# gives /dev/nbdN set up over netlink; ext4 is made and mounted on it and files written;
# then, with fio writing and verifying through the mounted file system, raftblkd is
# killed with SIGKILL and restarted, then stopped with SIGTERM and restarted: fio must
# finish with no error, the files must match their checksums after dropping caches, and
# the kernel must log no I/O error. Then an online grow reaches the mounted file system
# (resize2fs), a detach of the mounted device is refused, and unmount + detach end it.
# Env: FIO_RUNTIME (seconds, default 20).

step() { echo "ATTACH-STEP $*"; }
fail() { echo "ATTACH-FAIL $*"; dmesg | tail -n 30; tail -n 40 /tmp/raftblkd.log; exit 1; }

# The guest's root is a tmpfs, which has no O_DIRECT: the data directory goes on ext4 on a loop device.
truncate -s 2G /tmp/data.img
loopdev=$(losetup -f)
losetup "$loopdev" /tmp/data.img
mkfs.ext4 -q -F "$loopdev"
mkdir -p /var/lib/raftblk /mnt/v
mount "$loopdev" /var/lib/raftblk
cat >/tmp/raftblkd.toml <<'EOF'
[attach]
request_timeout_s = 5
dead_conn_timeout_s = 120
EOF

daemon_pid=""
start_daemon() {
    raftblkd --config /tmp/raftblkd.toml --bootstrap-volumes none >>/tmp/raftblkd.log 2>&1 &
    daemon_pid=$!
    i=0
    while ! raftblk status >/dev/null 2>&1; do
        i=$((i + 1))
        [ "$i" -lt 600 ] || fail "raftblkd did not answer within 60 s"
        kill -0 "$daemon_pid" 2>/dev/null || fail "raftblkd exited during start"
        sleep 0.1
    done
}

start_daemon
raftblk volume create v --size 256M >/dev/null
dev=$(raftblk volume attach v)
[ -b "$dev" ] || fail "attach printed $dev, not a block device"
name=${dev#/dev/}
step "attached $dev"
[ "$(cat /sys/block/$name/size)" = $((256 * 2048)) ] || fail "size: $(cat /sys/block/$name/size) sectors"
raftblk volume attachments | grep -q "$dev .* v " || { raftblk volume attachments; fail "attachments does not list $dev"; }
# Attaching again is idempotent: the same device.
[ "$(raftblk volume attach v)" = "$dev" ] || fail "a second attach gave another device"

mkfs.ext4 -q -F "$dev"
mount "$dev" /mnt/v
for i in 1 2 3 4 5 6 7 8; do dd if=/dev/urandom of=/mnt/v/file$i bs=1M count=2 2>/dev/null; done
(cd /mnt/v && sha256sum file*) >/tmp/sums
sync
step "ext4 made and mounted, files written"

fio --name=rw --directory=/mnt/v --filename=fio.dat --ioengine=io_uring --direct=1 \
    --rw=randwrite --bs=4k --iodepth=16 --size=48M --time_based --runtime="${FIO_RUNTIME:-20}" \
    --verify=crc32c --verify_fatal=1 --do_verify=1 >/tmp/fio.log 2>&1 &
fio_pid=$!
sleep 4
t0=$(cut -d' ' -f1 /proc/uptime)
kill -9 "$daemon_pid"
wait "$daemon_pid" 2>/dev/null || true
start_daemon
t1=$(cut -d' ' -f1 /proc/uptime)
step "SIGKILL + restart under fio: daemon back in $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }') s"
sleep 4
kill -TERM "$daemon_pid"
wait "$daemon_pid" || fail "raftblkd exited $? on SIGTERM"
start_daemon
step "SIGTERM + restart under fio"
wait "$fio_pid" || { cat /tmp/fio.log; fail "fio failed"; }
grep -qE "^rw: .*err= *0[:,]" /tmp/fio.log || { cat /tmp/fio.log; fail "fio reported an error"; }
echo "GUEST-FIO rw $(grep -oE 'write: IOPS=[^,]*' /tmp/fio.log)"
grep -q "reattach" /tmp/raftblkd.log || fail "the restarted daemon logged no reattach"

echo 3 >/proc/sys/vm/drop_caches
(cd /mnt/v && sha256sum -c /tmp/sums >/dev/null) || fail "checksums differ after the restarts"
step "files intact after SIGKILL and SIGTERM restarts"

raftblk volume resize v 512M >/dev/null
i=0
while [ "$(cat /sys/block/$name/size)" != $((512 * 2048)) ]; do
    i=$((i + 1))
    [ "$i" -lt 100 ] || fail "device still $(cat /sys/block/$name/size) sectors after the resize"
    sleep 0.1
done
resize2fs "$dev" >/dev/null 2>&1 || fail "online resize2fs failed"
blocks=$(dumpe2fs -h "$dev" 2>/dev/null | awk -F: '/^Block count/ { gsub(/ /, "", $2); print $2 }')
[ "$blocks" -ge $((500 * 256)) ] || fail "ext4 has $blocks blocks after the grow"
step "online grow: device and mounted ext4 at 512 MiB"

if raftblk volume detach v 2>/tmp/detach.err; then fail "detach of a mounted device was allowed"; fi
grep -q "mounted" /tmp/detach.err || { cat /tmp/detach.err; fail "the refusal does not say the device is mounted"; }
umount /mnt/v
raftblk volume detach "$dev" >/dev/null
[ -z "$(raftblk --json volume attachments | grep device)" ] || fail "attachment still listed after detach"
if dmesg | grep -E "I/O error|blk_update_request|Buffer I/O"; then fail "kernel logged I/O errors"; fi
kill -TERM "$daemon_pid"
wait "$daemon_pid" || true
echo "attach restart: PASS"
