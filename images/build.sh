#!/usr/bin/env bash
# Builds the Airlock test guest: images/out/test-guest (ELF, entry 0x100200) and
# images/out/test-guest.bzImage (the same image behind a Linux setup header).
set -euo pipefail

images="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$images/.." && pwd)"
out="$images/out"
target=x86_64-unknown-none

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# The guest's bare-metal target, and the static musl target the workspace builds for
# (.cargo/config.toml), so that `cargo run` works right after this script.
for t in "$target" x86_64-unknown-linux-musl; do
    if ! rustup target list --installed | grep -qx "$t"; then
        rustup target add "$t"
    fi
done
if ! command -v objcopy >/dev/null 2>&1; then
    as_root apt-get update
    as_root apt-get install -y binutils
fi
if ! command -v python3 >/dev/null 2>&1; then
    as_root apt-get update
    as_root apt-get install -y python3
fi

cargo build --manifest-path "$repo/Cargo.toml" --release -p airlock-test-guest --target "$target"

target_dir="$(cargo metadata --manifest-path "$repo/Cargo.toml" --format-version 1 --no-deps |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')"
elf="$target_dir/$target/release/airlock-test-guest"

mkdir -p "$out"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
cp "$elf" "$tmp/test-guest"
objcopy -O binary "$elf" "$tmp/test-guest.bin"
python3 "$images/test-guest/mkbzimage.py" "$elf" "$tmp/test-guest.bin" "$tmp/test-guest.bzImage"

# Replace outputs only when they changed, so their mtimes stay put on no-op builds.
for f in test-guest test-guest.bzImage; do
    if ! cmp -s "$tmp/$f" "$out/$f"; then
        cp "$tmp/$f" "$out/$f.new"
        mv "$out/$f.new" "$out/$f"
    fi
done

echo "$out/test-guest"
echo "$out/test-guest.bzImage"
