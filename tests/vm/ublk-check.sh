# tests/vm/guest snippet (busybox sh, set -e): the guest kernel has the ublk driver loaded
# (the harness's own check, so the ublk front end's tests can rely on it): the control
# device exists and is a character device, and the kernel names the module.
[ -c /dev/ublk-control ] || { echo "no /dev/ublk-control"; ls -l /dev | head -40; exit 1; }
grep -q '^ublk_drv ' /proc/modules || { echo "ublk_drv not loaded"; cat /proc/modules; exit 1; }
echo "ublk check: PASS ($(uname -r))"
