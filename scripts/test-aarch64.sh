#!/usr/bin/env bash
# Build the core crate for aarch64 and run its tests under qemu-user, once as a Pi 4
# (Cortex-A72: NEON, no dot product) and once as a Pi 5 (Cortex-A76: NEON + dotprod), so
# both NEON paths run for real. Uses Debian's rustc-web with its aarch64 std
# (scripts/aarch64-rust.sh), the gcc cross linker and qemu-user.
#
#   scripts/test-aarch64.sh            # install what is missing (needs root + apt), then test
#   TEST_ARGS="kernels" scripts/...    # extra arguments for the test binaries (a filter)
#
# Installs with apt, only when missing: rustc-web, gcc-aarch64-linux-gnu with the cross glibc
# it links against (libc6-dev-arm64-cross: only a Recommends of the gcc, which apt_install
# leaves out) and qemu-user; it unpacks libstd-rust-web-dev:arm64 into a cache unless
# installed (see aarch64-rust.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/aarch64-rust.sh

apt_install gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user
aarch64_rust
"$RUSTC" --version

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target/aarch64}"
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUSTFLAGS="$AARCH64_RUSTFLAGS"
# Dynamically linked test binaries run against the cross toolchain's own glibc: -L makes
# qemu find its ld.so, and LD_LIBRARY_PATH makes that ld.so load the libc of the same build
# (not an arm64 libc6 from the host's /lib/aarch64-linux-gnu, when one is installed: two
# glibc builds mixed hang at the first thread).
sysroot=/usr/aarch64-linux-gnu

status=0
for cpu in cortex-a72 cortex-a76; do
    echo "=== aarch64 tests on qemu -cpu $cpu ==="
    export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -cpu $cpu -L $sysroot -E LD_LIBRARY_PATH=$sysroot/lib"
    log="$CARGO_TARGET_DIR/test-$cpu.log"
    mkdir -p "$CARGO_TARGET_DIR"
    # shellcheck disable=SC2086
    if cargo test --no-fail-fast -p dllama-core --lib --tests --target aarch64-unknown-linux-gnu -- ${TEST_ARGS:-} --nocapture >"$log" 2>&1; then
        rc=0
    else
        rc=$?
    fi
    grep -E 'kernel paths|test result|FAILED|panicked|^error|^warning' "$log" || true
    if [ "$rc" -ne 0 ]; then
        echo "FAILED on $cpu (exit $rc), full log: $log"
        status=1
    fi
done
exit $status
