#!/usr/bin/env bash
# Builds what Airlock boots, from package registries only. images/README.md documents it all.
#
#   bash images/build.sh                 test guest + the default image (the set-up command)
#   bash images/build.sh test-guest      images/out/test-guest, images/out/test-guest.bzImage
#   bash images/build.sh default         images/out/default: Debian cloud kernel + initrd + minimal rootfs
#   bash images/build.sh python          images/out/python: the same kernel + a Debian python3 rootfs
#   bash images/build.sh microvm-kernel  images/out/microvm: a kernel built from linux-source with
#                                        images/microvm.config, no initrd (tens of minutes)
#
# Every step is keyed by the hashes of its inputs (a stamp per step under images/out/stamps), so a
# second run with nothing changed only re-checks those hashes.
set -euo pipefail
shopt -s inherit_errexit

images="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$images/.." && pwd)"
out="$images/out"
cache="$out/cache"
stamps="$out/stamps"
tool="$images/imagetool.py"
suite=bookworm
# The image's kernel command line; the VMM adds root= and virtio_mmio.device= itself.
boot_args="console=ttyS0 reboot=k panic=-1 pci=off"
# Modules the initrd loads (with their dependencies), for Debian's kernel.
initrd_modules="virtio_mmio virtio_blk virtio_net vsock vmw_vsock_virtio_transport_common vmw_vsock_virtio_transport virtio_rng"

log() { printf 'images: %s\n' "$*" >&2; }
die() {
    printf 'images: error: %s\n' "$*" >&2
    exit 1
}
as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# --- apt: tools, package resolution and downloads -------------------------------------------

apt_updated=
apt_update_once() {
    if [ -z "$apt_updated" ]; then
        log "apt-get update"
        as_root apt-get update -qq
        apt_updated=1
        # apt leaves a list it did not need to fetch again with its old time: remember the update.
        mkdir -p "$stamps"
        touch "$stamps/apt-updated"
    fi
}

# need CMD PACKAGE...: installs the packages when CMD is missing.
need() {
    local cmd="$1"
    shift
    if ! command -v "$cmd" >/dev/null 2>&1 && ! [ -x "/usr/sbin/$cmd" ] && ! [ -x "/sbin/$cmd" ]; then
        apt_update_once
        log "installing $* (for $cmd)"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
    fi
}

# Lists older than this are refreshed before any version is resolved from them: a mirror keeps
# only current versions, so old lists name .debs that answer 404.
apt_lists_max_age_min=$((12 * 60))
apt_lists_checked=
apt_lists_fresh_enough() {
    [ -n "$apt_lists_checked" ] && return 0
    apt_lists_checked=1
    local newest
    # apt dates a list by the mirror's Last-Modified, not by the download: our own stamp says
    # when lists were last refreshed here.
    newest="$(find "$stamps/apt-updated" -mmin "-$apt_lists_max_age_min" 2>/dev/null || true)"
    if [ -z "$newest" ]; then
        log "the package lists are missing or older than $((apt_lists_max_age_min / 60)) hours"
        apt_update_once
    fi
}

# The package lists can be empty on a fresh machine; update them once, then only when asked.
apt_show() {
    apt_lists_fresh_enough
    if ! apt-cache show --no-all-versions "$1" >/dev/null 2>&1; then
        apt_update_once
    fi
    apt-cache show --no-all-versions "$1" 2>/dev/null || die "package $1 not found in apt's lists"
}

# Answers from apt-cache are kept in $stamps/apt-resolved while apt's lists stay the same
# (apt-cache takes most of a second per call on these lists).
apt_memo() {
    local q="$1" lists hit
    apt_lists_fresh_enough
    lists="$(find /var/lib/apt/lists/ -maxdepth 1 -printf '%f %s %T@\n' 2>/dev/null | sort | sha256sum | cut -c1-16)"
    if [ "$(head -n1 "$stamps/apt-resolved" 2>/dev/null)" != "$lists" ]; then
        mkdir -p "$stamps"
        printf '%s\n' "$lists" >"$stamps/apt-resolved"
    fi
    hit="$(awk -v q="$q" '$1 == q {print $2; exit}' "$stamps/apt-resolved")"
    if [ -z "$hit" ]; then
        case "$q" in
            version:*) hit="$(apt_show "${q#version:}" | awk '/^Version:/ {print $2; exit}')" ;;
            depends:*)
                apt_show "${q#depends:}" >/dev/null
                hit="$(apt-cache depends "${q#depends:}" | awk -v p="$2" 'index($0, "Depends: " p) {print $2; exit}')"
                ;;
        esac
        [ -n "$hit" ] || die "apt cannot resolve $q"
        printf '%s %s\n' "$q" "$hit" >>"$stamps/apt-resolved"
    fi
    printf '%s\n' "$hit"
}
pkg_version() { apt_memo "version:$1"; }
# depends_on PACKAGE PREFIX: the first dependency of PACKAGE whose name starts with PREFIX.
depends_on() { apt_memo "depends:$1" "$2"; }

# fetch_deb PACKAGE: prints the path of PACKAGE's candidate .deb under images/out/cache/debs,
# downloading it only when that version is not there yet.
fetch_deb() {
    local pkg="$1" ver file tmp
    ver="$(pkg_version "$pkg")"
    file="$cache/debs/${pkg}_${ver}.deb"
    if ! [ -s "$file" ]; then
        mkdir -p "$cache/debs"
        tmp="$(mktemp -d "$cache/debs/.dl.XXXXXX")"
        chmod 755 "$tmp"
        log "downloading $pkg $ver"
        # apt warns that it downloads as root unsandboxed; only that line is dropped.
        (
            cd "$tmp"
            apt-get download -qq "$pkg=$ver" 2>&1 | { grep -v 'unsandboxed' || true; } >&2
        )
        local got=("$tmp"/*.deb)
        if ! [ -s "${got[0]}" ]; then
            rm -rf "$tmp"
            # Stale lists name versions the mirror no longer has (a 404): refresh them and
            # start over once, so that every version is resolved again from the same lists.
            if [ -z "${AIRLOCK_IMAGES_APT_REFRESHED:-}" ]; then
                log "apt-get download $pkg=$ver failed: refreshing the package lists and starting again"
                as_root apt-get update -qq
                exec env AIRLOCK_IMAGES_APT_REFRESHED=1 bash "$images/build.sh" "${build_args[@]}"
            fi
            die "apt-get download $pkg=$ver failed, also after refreshing the package lists"
        fi
        mv "${got[0]}" "$file"
        rm -rf "$tmp"
    fi
    printf '%s\n' "$file"
}

# --- stamps ----------------------------------------------------------------------------------

# key ARG...: one hash over files (their sha256) and literal strings (given as =STRING).
key() {
    local a
    for a in "$@"; do
        case "$a" in
            =*) printf 's %s\n' "${a#=}" ;;
            *) printf 'f %s\n' "$(sha256sum <"$a" | cut -d' ' -f1)" ;;
        esac
    done | sha256sum | cut -d' ' -f1
}
# fresh STEP KEY OUTPUT...: true when STEP last ran with KEY and its outputs are all there.
fresh() {
    local step="$1" k="$2" o
    shift 2
    [ "$(cat "$stamps/$step" 2>/dev/null)" = "$k" ] || return 1
    for o in "$@"; do [ -e "$o" ] || return 1; done
}
mark() {
    mkdir -p "$stamps"
    printf '%s\n' "$2" >"$stamps/$1"
}

# install_if_changed SRC DST: replace DST only when it differs, so its mtime stays on no-op runs.
install_if_changed() {
    if ! cmp -s "$1" "$2"; then
        cp "$1" "$2.new"
        mv "$2.new" "$2"
    fi
}

# --- the pieces ------------------------------------------------------------------------------

host_tools() {
    need python3 python3
    need lz4 lz4
    need mkfs.ext4 e2fsprogs
    need debugfs e2fsprogs
}

build_test_guest() {
    local target=x86_64-unknown-none t
    # The guest's bare-metal target, and the static musl target the workspace builds for
    # (.cargo/config.toml), so that `cargo run` works right after this script.
    for t in "$target" x86_64-unknown-linux-musl; do
        if ! rustup target list --installed | grep -qx "$t"; then
            rustup target add "$t"
        fi
    done
    need objcopy binutils
    need python3 python3
    cargo build --manifest-path "$repo/Cargo.toml" --release -p airlock-test-guest --target "$target"
    local elf="$target_dir/$target/release/airlock-test-guest"
    mkdir -p "$out"
    local tmp
    tmp="$(mktemp -d)"
    cp "$elf" "$tmp/test-guest"
    objcopy -O binary "$elf" "$tmp/test-guest.bin"
    python3 "$images/test-guest/mkbzimage.py" "$elf" "$tmp/test-guest.bin" "$tmp/test-guest.bzImage"
    install_if_changed "$tmp/test-guest" "$out/test-guest"
    install_if_changed "$tmp/test-guest.bzImage" "$out/test-guest.bzImage"
    rm -rf "$tmp"
    echo "$out/test-guest"
    echo "$out/test-guest.bzImage"
}

# Sets $agent (the static airlock-agent) and $agent_version.
build_agent() {
    if ! rustup target list --installed | grep -qx x86_64-unknown-linux-musl; then
        rustup target add x86_64-unknown-linux-musl
    fi
    cargo build --manifest-path "$repo/Cargo.toml" --release -p airlock-agent
    agent="$target_dir/x86_64-unknown-linux-musl/release/airlock-agent"
    "$py" "$tool" elf-check "$agent"
    agent_version="$("$agent" --version | awk '{print $2}')"
}

# Sets $kver (kernel release), $kpkg_version, $kdir (vmlinux, config, modules tree) from
# Debian's linux-image-cloud-amd64.
debian_kernel() {
    local pkg deb k
    pkg="$(depends_on linux-image-cloud-amd64 linux-image-)"
    kver="${pkg#linux-image-}"
    kpkg="$pkg"
    kpkg_version="$(pkg_version "$pkg")"
    deb="$(fetch_deb "$pkg")"
    kdir="$out/build/kernel-$kver"
    k="$(key "$deb" "$tool" "=$kver")"
    if ! fresh "kernel-$kver" "$k" "$kdir/vmlinux" "$kdir/config"; then
        log "extracting vmlinux and modules from $pkg"
        rm -rf "$kdir"
        mkdir -p "$kdir"
        dpkg-deb -x "$deb" "$kdir/root"
        "$py" "$tool" vmlinux "$kdir/root/boot/vmlinuz-$kver" "$kdir/vmlinux"
        cp "$kdir/root/boot/config-$kver" "$kdir/config"
        mark "kernel-$kver" "$k"
    fi
}

# Builds images/kmod against Debian's headers package for $kver; sets $kmod.
debian_kmod() {
    local debs=() p k build hdr
    local major_minor
    major_minor="$(printf '%s' "$kver" | cut -d. -f1-2)"
    for p in "linux-headers-$kver" "linux-headers-${kver%-cloud-amd64}-common" "linux-kbuild-$major_minor"; do
        debs+=("$(fetch_deb "$p")")
    done
    kmod="$out/build/kmod-$kver/airlock_virtio_mmio_cmdline.ko"
    k="$(key "${debs[@]}" "$images/kmod/airlock_virtio_mmio_cmdline.c" "$images/kmod/Kbuild")"
    fresh "kmod-$kver" "$k" "$kmod" && return 0
    need make make
    need gcc-12 gcc-12
    need strip binutils
    log "building the virtio-mmio helper module against linux-headers-$kver"
    build="$out/build/kmod-$kver"
    rm -rf "$build"
    mkdir -p "$build/src"
    for p in "${debs[@]}"; do dpkg-deb -x "$p" "$build/headers"; done
    hdr="$build/headers/usr/src/linux-headers-$kver"
    # Debian's per-flavour Makefile includes the common one by its installed path.
    sed -i "s|/usr/src/|$build/headers/usr/src/|" "$hdr/Makefile"
    cp "$images/kmod/airlock_virtio_mmio_cmdline.c" "$images/kmod/Kbuild" "$build/src/"
    make -s -C "$hdr" M="$build/src" modules >"$build/make.log" 2>&1 ||
        { cat "$build/make.log" >&2; die "building the helper module failed"; }
    strip --strip-debug -o "$kmod" "$build/src/airlock_virtio_mmio_cmdline.ko"
    rm -rf "$build/headers" "$build/src"
    mark "kmod-$kver" "$k"
}

# Sets $busybox (the static busybox binary, extracted from busybox-static).
busybox_static() {
    local deb k
    deb="$(fetch_deb busybox-static)"
    busybox="$out/build/busybox/bin/busybox"
    k="$(key "$deb")"
    if ! fresh busybox "$k" "$busybox"; then
        rm -rf "$out/build/busybox"
        dpkg-deb -x "$deb" "$out/build/busybox"
        mark busybox "$k"
    fi
    busybox_version="$(pkg_version busybox-static)"
}

# The initrd for Debian's kernel: busybox, the modules in load order, the helper module, /init.
debian_initrd() {
    local dest="$1" k stage moddir m
    k="$(key "$stamps/kernel-$kver" "$kmod" "$busybox" "$images/initrd/init" "$tool" "$images/build.sh" "=$initrd_modules")"
    fresh "initrd-$kver" "$k" "$out/build/initrd-$kver.cpio.gz" || {
        log "packing the initrd"
        stage="$out/build/initrd-$kver"
        moddir="$kdir/root/lib/modules/$kver"
        rm -rf "$stage"
        mkdir -p "$stage"/{bin,dev,proc,sys,newroot,lib/modules}
        cp "$busybox" "$stage/bin/busybox"
        for m in sh cat echo insmod mkdir mount umount reboot switch_root usleep; do
            ln -s busybox "$stage/bin/$m"
        done
        ln -s bin "$stage/sbin"
        install -m 0755 "$images/initrd/init" "$stage/init"
        # shellcheck disable=SC2086
        "$py" "$tool" moddeps "$moddir" $initrd_modules >"$stage/modules.list"
        : >"$stage/lib/modules/load-order"
        while read -r m; do
            cp "$moddir/$m" "$stage/lib/modules/"
            basename "$m" >>"$stage/lib/modules/load-order"
        done <"$stage/modules.list"
        rm "$stage/modules.list"
        cp "$kmod" "$stage/lib/modules/"
        "$py" "$tool" cpio "$stage" "$out/build/initrd-$kver.cpio.gz"
        rm -rf "$stage"
        mark "initrd-$kver" "$k"
    }
    install_if_changed "$out/build/initrd-$kver.cpio.gz" "$dest"
}

# write_accounts ROOT: root, the unprivileged `sandbox` user (uid/gid 1000) and nobody.
write_accounts() {
    local r="$1"
    mkdir -p "$r/etc"
    cat >"$r/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
sandbox:x:1000:1000:Airlock sandbox user:/home/sandbox:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
EOF
    cat >"$r/etc/group" <<'EOF'
root:x:0:
sandbox:x:1000:
nogroup:x:65534:
EOF
    cat >"$r/etc/shadow" <<'EOF'
root:*:19000:0:99999:7:::
sandbox:!:19000:0:99999:7:::
nobody:*:19000:0:99999:7:::
EOF
    chmod 0640 "$r/etc/shadow"
}

# The minimal rootfs tree: busybox with its applets, the agent as /sbin/init, the accounts.
stage_minimal() {
    local r="$1" applet
    rm -rf "$r"
    mkdir -p "$r"/{bin,sbin,usr/bin,usr/sbin,etc,dev,proc,sys,run,mnt,root,home/sandbox,tmp,var/tmp}
    install -m 0755 "$busybox" "$r/bin/busybox"
    while read -r applet; do
        case "$applet" in
            sbin/init | linuxrc | bin/busybox | "") continue ;;
        esac
        mkdir -p "$r/$(dirname "$applet")"
        ln -sf "$(realpath -m --relative-to="$r/$(dirname "$applet")" "$r/bin/busybox")" "$r/$applet"
    done < <("$busybox" --list-full | sort)
    install -m 0755 "$agent" "$r/sbin/init"
    write_accounts "$r"
    printf '127.0.0.1 localhost\n::1 localhost\n' >"$r/etc/hosts"
    printf 'airlock\n' >"$r/etc/hostname"
    printf 'Airlock minimal rootfs (busybox %s, airlock-agent %s)\n' "$busybox_version" "$agent_version" >"$r/etc/airlock-release"
    chmod 0700 "$r/root"
    chmod 1777 "$r/tmp" "$r/var/tmp"
    chmod 0755 "$r/home/sandbox"
}

# own_tree ROOT: root owns everything but the sandbox user's home. Needs root; without it
# mkfs_ext4 fixes the ownership inside the image instead (debugfs).
own_tree() {
    if [ "$(id -u)" -eq 0 ]; then
        chown -R -h 0:0 "$1"
        chown 1000:1000 "$1/home/sandbox"
    fi
}

# mkfs_ext4 ROOT IMAGE SIZE_MIB: an ext4 image of ROOT, made without mounting anything.
mkfs_ext4() {
    local r="$1" img="$2" size="$3" uuid tmp
    # A UUID and hash seed derived from the contents, and fixed times: same tree, same image.
    uuid="$("$py" "$tool" tree-hash "$r" | sed -E 's/^(.{8})(.{4})(.{4})(.{4})(.{12}).*/\1-\2-\3-\4-\5/')"
    tmp="$img.tmp"
    rm -f "$tmp"
    find "$r" -exec touch -h -d @946684800 {} +
    E2FSPROGS_FAKE_TIME=946684800 SOURCE_DATE_EPOCH=946684800 \
        mkfs.ext4 -q -F -L airlock-root -U "$uuid" -E "hash_seed=$uuid,root_owner=0:0" \
        -d "$r" "$tmp" "${size}M" >/dev/null
    if [ "$(id -u)" -ne 0 ]; then
        # Files copied by a non-root build belong to the builder: give them to root in the image.
        (cd "$r" && find . -mindepth 1 -printf '%P\n') | while read -r p; do
            printf 'sif "/%s" uid 0\nsif "/%s" gid 0\n' "$p" "$p"
        done >"$img.debugfs"
        printf 'sif /home/sandbox uid 1000\nsif /home/sandbox gid 1000\n' >>"$img.debugfs"
        debugfs -w -f "$img.debugfs" "$tmp" >/dev/null 2>&1
        rm -f "$img.debugfs"
    fi
    e2fsck -fn "$tmp" >/dev/null 2>&1 || die "e2fsck found errors in $tmp"
    mv "$tmp" "$img"
}

# write_manifest DIR NAME FLAVOR KERNEL_SOURCE: images/README.md documents the fields.
write_manifest() {
    local dir="$1" name="$2" flavor="$3" ksource="$4" k contents initrd_args=()
    contents="$("$py" "$tool" tree-hash "$dir/rootfs")"
    if [ -e "$dir/initrd" ]; then
        initrd_args=("initrd.path=initrd" "initrd.sha256=$(sha256sum <"$dir/initrd" | cut -d' ' -f1)")
        initrd_args+=("initrd.modules=$("$py" -c 'import json,sys; print(json.dumps(sys.argv[1].split()))' "$initrd_modules")")
    else
        initrd_args=("initrd=null")
    fi
    k="$(key "$dir/vmlinux" "$dir/rootfs.ext4" "=$contents" "=${initrd_args[*]}" "=$agent_version" "=$kver" "=$ksource" "$images/build.sh")"
    fresh "manifest-$name" "$k" "$dir/manifest.json" && return 0
    "$py" "$tool" manifest "$dir/manifest.json" \
        "format_version=1" \
        "name=$name" \
        "build_date=$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
        "boot_args=$boot_args" \
        "kernel.path=vmlinux" \
        "kernel.format=elf64-x86_64" \
        "kernel.source=$ksource" \
        "kernel.version=$kver" \
        "kernel.package=${kpkg:-linux-source}" \
        "kernel.package_version=$kpkg_version" \
        "kernel.sha256=$(sha256sum <"$dir/vmlinux" | cut -d' ' -f1)" \
        "${initrd_args[@]}" \
        "rootfs.path=rootfs.ext4" \
        "rootfs.dir=rootfs" \
        "rootfs.flavor=$flavor" \
        "rootfs.sha256=$(sha256sum <"$dir/rootfs.ext4" | cut -d' ' -f1)" \
        "rootfs.contents_sha256=$contents" \
        "rootfs.size_bytes=$(stat -c %s "$dir/rootfs.ext4")" \
        "rootfs.init=/sbin/init" \
        "rootfs.user.name=sandbox" \
        "rootfs.user.uid=1000" \
        "rootfs.user.gid=1000" \
        "agent.version=$agent_version" \
        "agent.sha256=$(sha256sum <"$agent" | cut -d' ' -f1)" \
        "agent.path=/sbin/init"
    mark "manifest-$name" "$k"
}

# Copies the Debian kernel and the initrd into an image directory.
debian_boot_files() {
    local dir="$1"
    install_if_changed "$kdir/vmlinux" "$dir/vmlinux"
    install_if_changed "$kdir/config" "$dir/config"
    debian_initrd "$dir/initrd"
}

build_default() {
    local dir="$out/default" k
    host_tools
    build_agent
    debian_kernel
    debian_kmod
    busybox_static
    mkdir -p "$dir"
    debian_boot_files "$dir"
    k="$(key "$busybox" "$agent" "$tool" "$images/build.sh")"
    if ! fresh rootfs-minimal "$k" "$dir/rootfs.ext4" "$dir/rootfs/sbin/init"; then
        log "staging the minimal rootfs and making rootfs.ext4"
        stage_minimal "$dir/rootfs"
        own_tree "$dir/rootfs"
        mkfs_ext4 "$dir/rootfs" "$dir/rootfs.ext4" 128
        mark rootfs-minimal "$k"
    fi
    write_manifest "$dir" default minimal debian-cloud
    ls -l "$dir"
}

build_python() {
    local dir="$out/python" k base mirror
    [ "$(id -u)" -eq 0 ] || die "the python image needs root: debootstrap unpacks packages as root (run as root)"
    host_tools
    need debootstrap debootstrap
    build_agent
    debian_kernel
    debian_kmod
    busybox_static
    mkdir -p "$dir"
    debian_boot_files "$dir"
    mirror="$("$py" "$tool" mirror)"
    # The debootstrap step is keyed by what it installs, not by this script, so edits here do not
    # cost a fresh debootstrap; bump the recipe number when its recipe changes.
    base="$out/build/python-base"
    k="$(key "=recipe 1" "=$suite" "=$mirror" "=python3,python3-pip")"
    if ! fresh python-base "$k" "$base/usr/bin/python3"; then
        log "debootstrap $suite (minbase, python3, python3-pip) from $mirror: takes a minute or more"
        rm -rf "$base"
        mkdir -p "$base" "$cache/debootstrap"
        debootstrap --variant=minbase --include=python3,python3-pip --cache-dir="$cache/debootstrap" \
            "$suite" "$base" "$mirror" >"$out/build/debootstrap.log" 2>&1 ||
            { tail -n 30 "$out/build/debootstrap.log" >&2; die "debootstrap failed (log: $out/build/debootstrap.log)"; }
        rm -rf "$base"/var/cache/apt/archives/*.deb "$base"/var/lib/apt/lists/*_Packages "$base"/var/log/*.log
        mark python-base "$k"
    fi
    k="$(key "$stamps/python-base" "$agent" "$images/build.sh")"
    if ! fresh rootfs-python "$k" "$dir/rootfs.ext4" "$dir/rootfs/sbin/init"; then
        log "staging the python rootfs and making rootfs.ext4"
        rm -rf "$dir/rootfs"
        cp -a "$base" "$dir/rootfs"
        local r="$dir/rootfs"
        # Debian's merged /usr: /sbin is a link to usr/sbin, and minbase has no init of its own.
        install -m 0755 "$agent" "$r/usr/sbin/init"
        grep -q '^sandbox:' "$r/etc/passwd" || {
            echo 'sandbox:x:1000:1000:Airlock sandbox user:/home/sandbox:/bin/bash' >>"$r/etc/passwd"
            echo 'sandbox:x:1000:' >>"$r/etc/group"
            echo 'sandbox:!:19000:0:99999:7:::' >>"$r/etc/shadow"
        }
        mkdir -p "$r/home/sandbox"
        chown 1000:1000 "$r/home/sandbox"
        printf 'airlock\n' >"$r/etc/hostname"
        printf 'Airlock python rootfs (Debian %s, airlock-agent %s)\n' "$suite" "$agent_version" >"$r/etc/airlock-release"
        local used
        used="$(du -sm "$r" | cut -f1)"
        mkfs_ext4 "$r" "$dir/rootfs.ext4" $((used + used / 4 + 256))
        mark rootfs-python "$k"
    fi
    write_manifest "$dir" python python debian-cloud
    ls -l "$dir"
}

# The smaller kernel: Debian's linux-source package configured from images/microvm.config (all
# drivers built in, no modules, no initrd), and the minimal rootfs next to it.
build_microvm() {
    local dir="$out/microvm" k deb src tarball srcver jobs
    host_tools
    need make make
    need gcc-12 gcc-12
    need gcc gcc
    need bc bc
    need flex flex
    need bison bison
    need perl perl
    [ -e /usr/include/libelf.h ] || need nonexistent-libelf-dev libelf-dev
    [ -e /usr/include/openssl/ssl.h ] || need nonexistent-libssl-dev libssl-dev
    need xz xz-utils
    build_default >/dev/null
    local srcpkg
    srcpkg="$(depends_on linux-source linux-source-)"
    deb="$(fetch_deb "$srcpkg")"
    kpkg="$srcpkg"
    kpkg_version="$(pkg_version "$srcpkg")"
    src="$out/build/$srcpkg"
    k="$(key "$deb" "$images/microvm.config" "$images/build.sh")"
    if ! fresh microvm-kernel "$k" "$out/build/microvm-vmlinux"; then
        rm -rf "$src"
        mkdir -p "$src"
        log "unpacking $srcpkg $kpkg_version"
        dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$src" --wildcards './usr/src/linux-source-*.tar.xz'
        tarball="$(ls "$src"/usr/src/linux-source-*.tar.xz)"
        tar -xJf "$tarball" -C "$src"
        rm -rf "${src:?}/usr"
        srcver="$(basename "$tarball" .tar.xz)"
        log "configuring $srcver from images/microvm.config (allnoconfig + the fragment)"
        make -s -C "$src/$srcver" ARCH=x86_64 KCONFIG_ALLCONFIG="$images/microvm.config" allnoconfig
        "$py" - "$images/microvm.config" "$src/$srcver/.config" <<'EOF'
import sys
want = [l.strip() for l in open(sys.argv[1]) if l.startswith("CONFIG_")]
have = set(l.strip() for l in open(sys.argv[2]))
missing = [w for w in want if w not in have]
if missing:
    sys.exit("images: error: the kernel config did not take: " + ", ".join(missing))
EOF
        if [ -n "${AIRLOCK_MICROVM_CONFIG_ONLY:-}" ]; then
            cp "$src/$srcver/.config" "$out/build/microvm-config"
            log "AIRLOCK_MICROVM_CONFIG_ONLY: configured $srcver (config at $out/build/microvm-config); not building"
            return 0
        fi
        jobs="$(nproc)"
        log "building vmlinux with $jobs jobs: tens of minutes on 2 cores"
        make -s -C "$src/$srcver" ARCH=x86_64 -j"$jobs" vmlinux
        cp "$src/$srcver/vmlinux" "$out/build/microvm-vmlinux"
        cp "$src/$srcver/.config" "$out/build/microvm-config"
        make -s -C "$src/$srcver" kernelrelease >"$out/build/microvm-release"
        rm -rf "$src"
        mark microvm-kernel "$k"
    fi
    kver="$(cat "$out/build/microvm-release")"
    mkdir -p "$dir"
    install_if_changed "$out/build/microvm-vmlinux" "$dir/vmlinux"
    install_if_changed "$out/build/microvm-config" "$dir/config"
    rm -f "$dir/initrd"
    # The same minimal tree and image as the default image.
    rm -rf "$dir/rootfs"
    cp -a "$out/default/rootfs" "$dir/rootfs"
    install_if_changed "$out/default/rootfs.ext4" "$dir/rootfs.ext4"
    write_manifest "$dir" microvm minimal microvm
    ls -l "$dir"
}

# --- main ------------------------------------------------------------------------------------

need python3 python3
# The interpreter itself, not a wrapper (pyenv's shims cost a fraction of a second per call).
py="$(python3 -c 'import sys; print(sys.executable)')"
target_dir="$(cargo metadata --manifest-path "$repo/Cargo.toml" --format-version 1 --no-deps |
    "$py" -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')"

[ "$#" -gt 0 ] || set -- test-guest default
build_args=("$@")
for what in "$@"; do
    case "$what" in
        test-guest) build_test_guest ;;
        default | minimal) build_default ;;
        python) build_python ;;
        microvm-kernel | microvm) build_microvm ;;
        *) die "unknown target '$what' (test-guest, default, python, microvm-kernel)" ;;
    esac
done
