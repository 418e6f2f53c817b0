#!/usr/bin/env bash
# The main job on the default image, end to end: build what is needed, start airlockd, make a
# template from images/out/default, create a sandbox, run commands in it, and clean up.
#
# The backend is chosen explicitly from `airlock-vmm check-host`: `vm` where this host can run
# Linux guests, otherwise `namespace`, which is a weaker boundary (see api/README.md). The daemon
# itself never switches backends on its own.
set -euo pipefail
cd "$(dirname "$0")/.."

bash images/build.sh
cargo build --release --workspace
bin=target/x86_64-unknown-linux-musl/release
export PATH="$PWD/$bin:$PATH"

if airlock-vmm check-host --json | grep -q '"linux_guests": true'; then
    backend=vm
else
    backend=namespace
    echo "demo: this host cannot run Linux guests ($(airlock-vmm check-host --json | sed -n 's/.*"reason": "\(.*\)".*/\1/p' | head -1))"
    echo "demo: using the namespace backend: the agent runs jailed on the host, a weaker boundary than a VM"
fi

work=$(mktemp -d)
export AIRLOCK_SOCKET="$work/airlockd.sock"
airlockd --backend "$backend" --socket "$AIRLOCK_SOCKET" --state-dir "$work/state" \
    --image-dir "$PWD/images/out" 2>"$work/airlockd.log" &
daemon=$!
cleanup() {
    kill "$daemon" 2>/dev/null || true
    wait "$daemon" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
for _ in $(seq 100); do [ -S "$AIRLOCK_SOCKET" ] && break; sleep 0.05; done

airlock templates create default images/out/default >/dev/null
id=$(airlock create --template default)
echo "demo: sandbox $id ($backend backend)"
airlock exec "$id" -- sh -c 'echo "hello from $(cat /etc/hostname), running as $(id -un)"; uname -sr'
airlock exec "$id" -- sh -c 'echo 21 > /tmp/x; echo $(( $(cat /tmp/x) * 2 ))'
airlock rm "$id"
echo "demo: done"
