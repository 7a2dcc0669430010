#!/usr/bin/env bash
# The whole test suite: the Rust core (x86_64, then aarch64 under qemu), then pytest.
# Expects the package installed with its test extra (see README.md).
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo test (rust core, $(uname -m))"
cargo test -p dllama-core

if [ "${DLLAMA_SKIP_AARCH64:-0}" != "1" ] && [ -x scripts/test-aarch64.sh ]; then
  echo "== cargo test (rust core, aarch64 under qemu)"
  scripts/test-aarch64.sh
fi

echo "== lint: ruff, mypy --strict, the _core stub against the built module"
python -m ruff check python tests benchmarks converter
python -m mypy
python -m mypy.stubtest dllama._core

# the chat page test drives Debian's headless Chromium through chromium-driver
if ! command -v chromedriver >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "installing: chromium chromium-driver (for the chat page test)"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver
fi

echo "== pytest"
python -m pytest -ra tests
