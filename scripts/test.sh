#!/usr/bin/env bash
# README command (b): formatting, lints and the whole test suite.
# Prepares the environment on first use (scripts/env.sh); later runs reuse the venv and the
# cargo target folder in ~/.cache/droppos-pipeline.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/env.sh
source scripts/env.sh

start=$(date +%s)
echo "== cargo fmt --check" >&2
cargo fmt --all --check
echo "== cargo clippy (all targets, warnings are errors)" >&2
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test" >&2
cargo test --workspace --locked
echo "== all checks passed in $(( $(date +%s) - start )) s" >&2
