#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs the real peers (SoftHSM2, OpenSC, OpenSSL,
# Python cryptography), then formatting, lints, and every unit and integration test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash softhsm/install.sh
cargo fmt --check
cargo clippy --all-targets --quiet -- -D warnings
cargo test --all-targets 2>&1
