# tests/vm/guest snippet (busybox sh, set -e; needs --bin raftblkd --bin <csi_services test
# binary>, env CSI_TEST=<its file name>): the CSI Node service against the guest's kernel.
# Runs daemon/tests/csi_services.rs's kernel test for real here (on the host it skips):
# NodeStage attaches a volume, makes ext4 only because it is empty, mounts it; files
# written through NodePublish's bind mount are there after NodeUnstage + NodeStage again
# (no second mkfs); ControllerExpand + NodeExpand grow the mounted ext4; a raw block
# volume is bound and written; after a forced takeover by another node the mounted
# device's writes are refused (the fence).

# The guest's root is a tmpfs (no O_DIRECT): raftblkd's data and the test's temp files go
# on ext4 on a loop device.
truncate -s 2G /tmp/data.img
loopdev=$(losetup -f)
losetup "$loopdev" /tmp/data.img
mkfs.ext4 -q -F "$loopdev"
mkdir -p /var/lib/raftblk
mount "$loopdev" /var/lib/raftblk
mkdir -p /var/lib/raftblk/tmp
export TMPDIR=/var/lib/raftblk/tmp
# e2fsprogs' blkid (in /usr/sbin), not busybox's, which lacks -p.
export PATH=/usr/sbin:$PATH
export RAFTBLKD_BIN=/usr/local/bin/raftblkd
"/usr/local/bin/$CSI_TEST" --exact kernel_stage_mkfs_restage_expand_raw_block_and_fence --nocapture \
    --test-threads=1 >/tmp/csi.log 2>&1 || { cat /tmp/csi.log; dmesg | tail -n 20; exit 1; }
cat /tmp/csi.log
grep -q "CSI-KERNEL: PASS" /tmp/csi.log || { echo "the kernel test did not run (skipped?)"; exit 1; }
echo "csi kernel: PASS"
