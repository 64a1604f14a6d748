#!/usr/bin/env bash
# Runs the CSR-parsing + policy fuzz target for SECONDS (default 300) with libFuzzer and
# AddressSanitizer, seeded with the hostile-CSR corpus. Installs cargo-fuzz if missing. The
# machine has only a stable toolchain, so RUSTC_BOOTSTRAP=1 lets cargo-fuzz pass its -Z flags.
#   bash tests/fuzz/run.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/../.."
secs=${1:-300}
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir tests/fuzz csr_policy "$scratch" tests/data/csr/bad \
  -- -max_total_time="$secs" -max_len=65536 -rss_limit_mb=2048 2>&1 | tail -25
