#!/usr/bin/env bash
# Build the core crate for aarch64 and run its tests under qemu-user, once as a Pi 4
# (Cortex-A72: NEON, no dot product) and once as a Pi 5 (Cortex-A76: NEON + dotprod), so
# both NEON paths run for real. Uses Debian's rustc-web (its aarch64 std) and gcc cross linker.
#
#   scripts/test-aarch64.sh            # install what is missing (needs root + apt), then test
#   TEST_ARGS="kernels" scripts/...    # extra arguments for the test binaries (a filter)
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v qemu-aarch64 >/dev/null || need+=(qemu-user)
command -v aarch64-linux-gnu-gcc >/dev/null || need+=(gcc-aarch64-linux-gnu)
[ -x /usr/bin/rustc ] || need+=(rustc-web)
ls /usr/lib/rustlib/aarch64-unknown-linux-gnu/lib/libstd-*.rlib >/dev/null 2>&1 || need+=(libstd-rust-web-dev:arm64)
if [ ${#need[@]} -gt 0 ]; then
    echo "installing: ${need[*]}"
    dpkg --add-architecture arm64
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q rustc-web libstd-rust-web-dev:arm64 gcc-aarch64-linux-gnu qemu-user
fi

/usr/bin/rustc --version
export RUSTC=/usr/bin/rustc
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target/aarch64}"
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
# dynamic binaries hang under this qemu-user: link statically
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+crt-static"

status=0
for cpu in cortex-a72 cortex-a76; do
    echo "=== aarch64 tests on qemu -cpu $cpu ==="
    export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -cpu $cpu"
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
