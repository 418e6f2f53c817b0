#!/usr/bin/env bash
# Fetches Debian's packaged cloud kernel and leaves its bzImage at images/out/linux/bzImage.
# Used by the Linux-guest boot test on hosts that can run Linux guests (see check-host).
set -euo pipefail
cd "$(dirname "$0")"
out=out/linux
[ -s "$out/bzImage" ] && { echo "$out/bzImage"; exit 0; }
mkdir -p "$out/pkg"
apt-get update -qq
pkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/ {print $2; exit}')
(cd "$out/pkg" && apt-get download "$pkg")
dpkg -x "$out"/pkg/*.deb "$out/pkg/root"
cp "$out"/pkg/root/boot/vmlinuz-* "$out/bzImage"
rm -rf "$out/pkg"
echo "$out/bzImage"
