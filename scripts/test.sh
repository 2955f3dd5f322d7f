#!/usr/bin/env bash
# The project's test command (README.md): formatting, lints, and every test on SQLite and on
# the PostgreSQL server at TEST_POSTGRES_URL (default postgres://postgres@127.0.0.1:5432/test;
# each test creates and drops its own database there).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
