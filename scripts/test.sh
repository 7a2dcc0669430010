#!/usr/bin/env bash
# The whole test suite: the Rust core (x86_64, then aarch64 under qemu), the wheels (the
# aarch64 one installed and run in an arm64 Debian root under qemu), then pytest.
# Expects the package installed with its test extra (see README.md).
set -euo pipefail
cd "$(dirname "$0")/.."

t0=$SECONDS
step() { echo "== $* (at $((SECONDS - t0)) s)"; }

step "cargo test (rust core, $(uname -m))"
cargo test -p dllama-core

if [ "${DLLAMA_SKIP_AARCH64:-0}" != "1" ]; then
  step "cargo test (rust core, aarch64 under qemu)"
  scripts/test-aarch64.sh

  step "wheels: x86_64 and aarch64 (manylinux2014, abi3)"
  wheels=target/ci-wheels
  rm -f "$wheels"/dllama-*.whl
  WHEEL_DIR=$wheels PYTHON=python scripts/build-wheels.sh x86_64 aarch64
  step "arm64 Debian root (cached in ${DLLAMA_CI_CACHE:-/var/cache/dllama-ci}), the aarch64 wheel installed in it"
  scripts/arm64-root.sh prepare
  DLLAMA_ARM64_WHEEL=$(scripts/arm64-root.sh install "$wheels"/dllama-*aarch64.whl)
  export DLLAMA_ARM64_WHEEL   # tests/test_arm64_wheel.py runs it
fi

step "lint: ruff, mypy --strict, the _core stub against the built module"
python -m ruff check python tests benchmarks converter
python -m mypy
python -m mypy.stubtest dllama._core

# the chat page test drives Debian's headless Chromium through chromium-driver
if ! command -v chromedriver >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "installing: chromium chromium-driver (for the chat page test)"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver
fi

step "pytest"
python -m pytest -ra tests
step "done"
