#!/usr/bin/env bash
# Packs what the GPU checks need for a lent device machine (no Rust there, torch 2.11 from pip):
# the release `droppos-pipeline-torch`, stripped and gzipped, into device-carry/ (git-ignored;
# name it in the device tool's `carry`). Then run scripts/device_check.sh there, e.g.
#   run(command="bash scripts/device_check.sh", carry=["device-carry"], timeout_s=540)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/env.sh
source scripts/env.sh
cargo build --release --locked --bin droppos-pipeline-torch
mkdir -p device-carry
strip -o device-carry/droppos-pipeline-torch "$CARGO_TARGET_DIR/release/droppos-pipeline-torch"
gzip -9 -f device-carry/droppos-pipeline-torch
git rev-parse HEAD >device-carry/COMMIT
ls -l device-carry >&2
