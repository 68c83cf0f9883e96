# tests/vm/guest snippet (busybox sh, set -e): fio through the kernel NBD client on a
# raftblkd volume: 4 KiB random writes at QD32 with io_uring and O_DIRECT, every block
# written with a crc32c header and verified by reading it back; then a sequential read
# with libaio. Fails on any I/O error, short I/O or verify mismatch, or a kernel I/O error.
# Env: NBD_HOST NBD_PORT NBD_EXPORT; FIO_RUNTIME (seconds, default 5).
DEV=/dev/nbd0

# fio_ok NAME LOG: the job finished with err= 0, and its IOPS line for the log.
fio_ok() {
    grep -E "^$1: .*err= *[0-9]+" "$2" | head -n 1
    grep -qE "^$1: .*err= *0[:,]" "$2" || { echo "fio job $1 reported an error"; cat "$2"; return 1; }
    echo "GUEST-FIO $1 $(grep -oE '(read|write): IOPS=[^,]*' "$2" | tr '\n' ' ')"
}

vm_time connect nbd_connect "$DEV" -b 4096 -t 60
vm_time randwrite-verify fio --name=rw --filename="$DEV" --ioengine=io_uring --direct=1 \
    --rw=randwrite --bs=4k --iodepth=32 --size=64M --time_based --runtime="${FIO_RUNTIME:-5}" \
    --verify=crc32c --verify_fatal=1 --do_verify=1 >/tmp/rw.log 2>&1 || { cat /tmp/rw.log; exit 1; }
fio_ok rw /tmp/rw.log
vm_time seqread fio --name=sr --filename="$DEV" --ioengine=libaio --direct=1 --rw=read --bs=1M \
    --iodepth=4 --size=64M >/tmp/sr.log 2>&1 || { cat /tmp/sr.log; exit 1; }
fio_ok sr /tmp/sr.log
if dmesg | grep -E "I/O error|blk_update_request|Buffer I/O"; then echo "kernel logged I/O errors"; exit 1; fi
vm_time disconnect nbd_disconnect "$DEV"
echo "fio verify: PASS"
