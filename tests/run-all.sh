#!/usr/bin/env bash
# Runs every test: builds the test guest and the workspace (release, once), then the unit and
# integration tests, formatting and lints. Installs what it needs; safe to run on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."

# The test guest and the default image, then the python image (about a minute, cached after).
bash images/build.sh
bash images/build.sh python
for component in clippy rustfmt; do
    rustup component list --installed 2>/dev/null | grep -q "^$component" || rustup component add "$component"
done

cargo fmt --all --check
cargo build --release --workspace
# --workspace includes the test guest crate, whose pure logic is unit-tested on the host.
cargo test --release --workspace
cargo clippy --release --workspace --all-targets -- -D warnings
cargo clippy --release -p airlock-test-guest --target x86_64-unknown-none -- -D warnings
