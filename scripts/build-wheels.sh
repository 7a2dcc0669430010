#!/usr/bin/env bash
# Build dllama's abi3 wheels (one wheel per CPU family serves every CPython >= 3.10):
#
#   scripts/build-wheels.sh                 # x86_64 and aarch64 into dist/
#   scripts/build-wheels.sh aarch64         # only the Raspberry Pi one (64-bit OS)
#   WHEEL_DIR=out scripts/build-wheels.sh   # elsewhere
#
# Both link through zig (the `ziglang` package from PyPI, in the dev extra) against glibc
# 2.17, so the wheels are tagged manylinux2014 (= manylinux_2_17) and install on any glibc
# from 2.17 on: Raspberry Pi OS bookworm (2.36) and bullseye (2.31), Debian, Ubuntu.
# aarch64 is compiled by Debian's rustc-web with its arm64 std (scripts/aarch64-rust.sh:
# installs rustc-web with apt when missing, needs root then).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${WHEEL_DIR:-dist}
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(x86_64 aarch64)

python=${PYTHON:-python3}
zigdir=$("$python" -c 'import os, ziglang; print(os.path.dirname(ziglang.__file__))' 2>/dev/null) \
    || { echo "build-wheels: zig not found: pip install ziglang (or pip install '.[dev]')" >&2; exit 1; }
export PATH="$zigdir:$PATH"   # maturin --zig runs `zig`

for arch in "${targets[@]}"; do
    case "$arch" in
        x86_64)
            (export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}/wheel-x86_64"
             maturin build --release --zig --target x86_64-unknown-linux-gnu \
                 --compatibility manylinux2014 --out "$out")
            ;;
        aarch64)
            (. scripts/aarch64-rust.sh
             aarch64_rust
             export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}/wheel-aarch64"
             export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUSTFLAGS="$AARCH64_RUSTFLAGS"
             maturin build --release --zig --target aarch64-unknown-linux-gnu \
                 --compatibility manylinux2014 --out "$out")
            ;;
        *) echo "build-wheels: unknown target $arch (x86_64, aarch64)" >&2; exit 2 ;;
    esac
done
ls -l "$out"/*.whl
