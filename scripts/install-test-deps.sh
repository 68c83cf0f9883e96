#!/usr/bin/env bash
# Installs what the test suite needs, and only what is missing (idempotent):
#   - Debian packages: fio, libnbd-bin (nbdinfo, nbdcopy, nbdsh), python3-libnbd,
#     nbdkit, qemu-utils (qemu-io, qemu-img), iproute2, tcpdump (peer traffic captures),
#     python3-venv (deploy/kubernetes/validate.sh's venv for kubernetes-validate),
#     protobuf-compiler (protoc, to check daemon/src/csi/csi.v1.rs against daemon/proto/csi.proto)
#   - cargo-fuzz, when a nightly toolchain is installed
# `apt-get update` runs at most once, and only when a package is missing.
# Every install uses --no-remove: on these machines qemu-utils may come from
# bookworm-backports, and a plain install of something that conflicts with it
# would silently remove it (tests/vm/guest handles qemu-system-x86 the same way).
set -euo pipefail

packages=(fio libnbd-bin python3-libnbd nbdkit qemu-utils iproute2 tcpdump python3-venv protobuf-compiler libprotobuf-dev)

installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

missing=()
for p in "${packages[@]}"; do
    installed "$p" || missing+=("$p")
done

if ((${#missing[@]})); then
    echo "install-test-deps: installing ${missing[*]}"
    sudo=()
    if [[ $(id -u) != 0 ]]; then
        command -v sudo >/dev/null || { echo "install-test-deps: need root (or sudo) to install ${missing[*]}" >&2; exit 1; }
        sudo=(sudo)
    fi
    "${sudo[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-remove "${missing[@]}"
    for p in "${missing[@]}"; do
        installed "$p" || { echo "install-test-deps: $p is still not installed" >&2; exit 1; }
    done
else
    echo "install-test-deps: Debian packages present (${packages[*]})"
fi

# The tools the tests call, whatever package provides them.
for t in fio nbdinfo nbdcopy nbdsh nbdkit qemu-io qemu-img ip tcpdump; do
    command -v "$t" >/dev/null || { echo "install-test-deps: $t not found after install" >&2; exit 1; }
done
# nbdsh and the tests need a python3 that can import Debian's libnbd binding.
/usr/bin/python3 -c 'import nbd' || { echo "install-test-deps: /usr/bin/python3 cannot import nbd" >&2; exit 1; }

# Rust components the test command uses.
for c in fmt clippy; do
    cargo "$c" --version >/dev/null 2>&1 || { echo "install-test-deps: cargo $c is missing (rustup component add ${c/fmt/rustfmt})" >&2; exit 1; }
done

# cargo-fuzz, only useful with a nightly toolchain.
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    if cargo fuzz --version >/dev/null 2>&1; then
        echo "install-test-deps: $(cargo fuzz --version)"
    else
        echo "install-test-deps: installing cargo-fuzz"
        cargo install cargo-fuzz --locked
    fi
else
    echo "install-test-deps: no nightly toolchain; cargo-fuzz not installed (fuzzing will be skipped)"
fi
