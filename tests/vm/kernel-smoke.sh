# tests/vm/guest snippet (busybox sh, set -e): the Linux kernel NBD client on a
# raftblkd volume. Connect /dev/nbd0, mkfs.ext4, mount, write files of assorted
# sizes, record their checksums, sync, drop caches, fsck, remount, verify,
# unmount, fsck again, disconnect. The checksums go to /out/sums so the host can
# check the same files after restarting raftblkd.
# Env (from tests/vm/guest): NBD_HOST NBD_PORT NBD_EXPORT; optional FILES (default 24).
DEV=/dev/nbd0
MNT=/mnt/vol
FILES=${FILES:-24}

vm_time connect nbd_connect "$DEV" -b 4096 -t 60
size=$(blockdev --getsize64 "$DEV")
echo "device size: $size bytes"
[ "$size" -eq "${EXPECT_SIZE:-$size}" ] || { echo "size $size, expected $EXPECT_SIZE"; exit 1; }

vm_time mkfs mkfs.ext4 -q -F -E lazy_itable_init=1,lazy_journal_init=1 -L raftblk "$DEV"
mkdir -p "$MNT"
vm_time mount mount -t ext4 "$DEV" "$MNT"

i=0
while [ "$i" -lt "$FILES" ]; do
    dd if=/dev/urandom of="$MNT/f$i" bs=4k count=$(( (i * 37) % 256 + 1 )) 2>/dev/null
    i=$((i + 1))
done
mkdir -p "$MNT/dir/sub"
dd if=/dev/urandom of="$MNT/dir/sub/big" bs=1M count=8 2>/dev/null
(cd "$MNT" && sha256sum f* dir/sub/big >/tmp/sums)
vm_time sync sync

umount "$MNT"
echo 3 >/proc/sys/vm/drop_caches
vm_time fsck1 e2fsck -f -n "$DEV"
mount -t ext4 "$DEV" "$MNT"
(cd "$MNT" && sha256sum -c /tmp/sums >/tmp/check) || { cat /tmp/check; exit 1; }
echo "checksums ok: $(wc -l </tmp/sums) files"
# discard through the filesystem (NBD_CMD_TRIM), then everything still verifies
vm_time fstrim fstrim -v "$MNT" || echo "fstrim not available"
rm -f "$MNT/f0"
sync
umount "$MNT"
echo 3 >/proc/sys/vm/drop_caches
vm_time fsck2 e2fsck -f -n "$DEV"
grep -v ' f0$' /tmp/sums >/tmp/sums2

mkdir -p /out
cp /tmp/sums2 /out/sums
vm_time disconnect nbd_disconnect "$DEV"
echo "kernel smoke: PASS"
