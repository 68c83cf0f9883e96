# tests/vm/guest snippet (busybox sh, set -e): fio through the kernel NBD client on a
# raftblkd volume: 4 KiB random writes at QD32 with io_uring and O_DIRECT, every block
# written with a crc32c header and verified by reading it back; then a sequential read
# with libaio. Fails on any I/O error, short I/O or verify mismatch.
# Env: NBD_HOST NBD_PORT NBD_EXPORT; FIO_RUNTIME (seconds, default 5).
DEV=/dev/nbd0
vm_time connect nbd_connect "$DEV" -b 4096 -t 60
vm_time randwrite-verify fio --name=rw --filename="$DEV" --ioengine=io_uring --direct=1 \
    --rw=randwrite --bs=4k --iodepth=32 --size=64M --time_based --runtime="${FIO_RUNTIME:-5}" \
    --verify=crc32c --verify_fatal=1 --do_verify=1 --output-format=terse --terse-version=3 >/tmp/fio.terse
# terse v3: field 6 is the error count; 49/50 are write IOPS/bandwidth fields.
awk -F';' '{ print "GUEST-FIO randwrite errors=" $6 " write_iops=" $49 }' /tmp/fio.terse
[ "$(awk -F';' '{ print $6 }' /tmp/fio.terse)" = 0 ] || { echo "fio reported errors"; exit 1; }
vm_time seqread fio --name=sr --filename="$DEV" --ioengine=libaio --direct=1 --rw=read --bs=1M \
    --iodepth=4 --size=64M --output-format=terse --terse-version=3 >/tmp/fio2.terse
[ "$(awk -F';' '{ print $6 }' /tmp/fio2.terse)" = 0 ] || { echo "fio read reported errors"; exit 1; }
if dmesg | grep -E "I/O error|blk_update_request|Buffer I/O" ; then echo "kernel logged I/O errors"; exit 1; fi
vm_time disconnect nbd_disconnect "$DEV"
echo "fio verify: PASS"
