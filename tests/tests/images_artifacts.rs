//! Checks the guest images that `images/build.sh` builds, as artifacts: the kernel is the ELF
//! our loader takes; virtio-mmio, virtio-blk, vsock and ext4 are built in or loaded by the initrd,
//! in dependency order; the root filesystem holds the agent as /sbin/init, busybox or python3 and
//! the unprivileged user; and the manifest matches what is there. Booting the image is
//! `linux_guest.rs`'s job (it needs a host that can run Linux guests).
//!
//! The default image must exist (`bash images/build.sh`, which `tests/run-all.sh` runs first).
//! The python and microvm images are built on demand only; their checks print one line saying
//! why they did not run when their output is missing.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use airlock_tests::{repo_root, scratch_dir};
use serde_json::Value;

fn image_dir(name: &str) -> PathBuf {
    repo_root().join("images/out").join(name)
}

fn say(line: &str) {
    // Straight to stderr: libtest captures the output of passing tests, and this must be seen.
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// The image's manifest, or None (after one line saying why) when an optional image is missing.
fn manifest(name: &str, required: bool) -> Option<Value> {
    let path = image_dir(name).join("manifest.json");
    if !path.exists() {
        assert!(
            !required,
            "{} not found: run `bash images/build.sh` first",
            path.display()
        );
        // The microVM image's build target is named for what is slow about it: the kernel.
        let target = if name == "microvm" {
            "microvm-kernel"
        } else {
            name
        };
        airlock_tests::not_run(
            &format!("{name}_image_is_complete_and_matches_its_manifest"),
            &format!(
                "{} does not exist (build it with `bash images/build.sh {target}`)",
                path.display()
            ),
        );
        return None;
    }
    let text = std::fs::read_to_string(&path).unwrap();
    Some(serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
}

// --- SHA-256 (FIPS 180-4), so that the hashes are recomputed here without extra crates --------

fn sha256(data: &[u8]) -> String {
    const K: [u32; 64] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
        0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
        0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
        0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
        0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
        0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
        0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
        0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2,
    ];
    let mut h: [u32; 8] = [
        0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
        0x5be0cd19,
    ];
    let mut tail = data[data.len() - data.len() % 64..].to_vec();
    tail.push(0x80);
    while tail.len() % 64 != 56 {
        tail.push(0);
    }
    tail.extend_from_slice(&((data.len() as u64) * 8).to_be_bytes());
    let full = &data[..data.len() - data.len() % 64];
    for block in full.chunks_exact(64).chain(tail.chunks_exact(64)) {
        let mut w = [0u32; 64];
        for i in 0..16 {
            w[i] = u32::from_be_bytes(block[i * 4..i * 4 + 4].try_into().unwrap());
        }
        for i in 16..64 {
            let s0 = w[i - 15].rotate_right(7) ^ w[i - 15].rotate_right(18) ^ (w[i - 15] >> 3);
            let s1 = w[i - 2].rotate_right(17) ^ w[i - 2].rotate_right(19) ^ (w[i - 2] >> 10);
            w[i] = w[i - 16]
                .wrapping_add(s0)
                .wrapping_add(w[i - 7])
                .wrapping_add(s1);
        }
        let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut hh] = h;
        for i in 0..64 {
            let s1 = e.rotate_right(6) ^ e.rotate_right(11) ^ e.rotate_right(25);
            let ch = (e & f) ^ (!e & g);
            let t1 = hh
                .wrapping_add(s1)
                .wrapping_add(ch)
                .wrapping_add(K[i])
                .wrapping_add(w[i]);
            let s0 = a.rotate_right(2) ^ a.rotate_right(13) ^ a.rotate_right(22);
            let maj = (a & b) ^ (a & c) ^ (b & c);
            let t2 = s0.wrapping_add(maj);
            hh = g;
            g = f;
            f = e;
            e = d.wrapping_add(t1);
            d = c;
            c = b;
            b = a;
            a = t1.wrapping_add(t2);
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d, e, f, g, hh]) {
            *x = x.wrapping_add(y);
        }
    }
    h.iter().map(|x| format!("{x:08x}")).collect()
}

fn sha256_file(path: &Path) -> String {
    sha256(&std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
}

#[test]
fn sha256_matches_known_vectors() {
    assert_eq!(
        sha256(b""),
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
    assert_eq!(
        sha256(b"abc"),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    let long = vec![b'a'; 1000];
    assert_eq!(
        sha256(&long),
        "41edece42d63e8d9bf515a9ba6932e1c20cbc9f5a5d134645adb5db1b9737ea3"
    );
}

// --- the kernel -------------------------------------------------------------------------------

/// What the VMM's loader (linux-loader's ELF path) needs: a little-endian ELF64 x86_64
/// executable with a 64-bit entry point and loadable segments.
fn check_vmlinux(path: &Path, version: &str) {
    let data = std::fs::read(path).unwrap();
    assert!(data.len() > 64, "{}: too short", path.display());
    assert_eq!(
        &data[..4],
        b"\x7fELF",
        "{}: not an ELF file",
        path.display()
    );
    assert_eq!(data[4], 2, "ELF class must be 64-bit");
    assert_eq!(data[5], 1, "ELF data must be little-endian");
    let u16_at = |o: usize| u16::from_le_bytes(data[o..o + 2].try_into().unwrap());
    let u32_at = |o: usize| u32::from_le_bytes(data[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(data[o..o + 8].try_into().unwrap());
    assert_eq!(u16_at(16), 2, "ELF type must be ET_EXEC");
    assert_eq!(u16_at(18), 62, "ELF machine must be x86_64 (62)");
    let entry = u64_at(24);
    assert!(entry != 0, "no entry point");
    let (phoff, phentsize, phnum) = (u64_at(32) as usize, u16_at(54) as usize, u16_at(56));
    assert!(phentsize >= 56 && phnum > 0, "no program headers");
    let mut loads = 0;
    let mut entry_in_load = false;
    for i in 0..phnum as usize {
        let ph = phoff + i * phentsize;
        if u32_at(ph) == 1 {
            loads += 1;
            let (paddr, memsz) = (u64_at(ph + 24), u64_at(ph + 40));
            let (vaddr, filesz, offset) = (u64_at(ph + 16), u64_at(ph + 32), u64_at(ph + 8));
            assert!(
                offset + filesz <= data.len() as u64,
                "segment {i} runs past the end of the file"
            );
            // The loader places segments at their physical addresses; the entry point is
            // physical too (startup_64), or virtual in the same segment.
            if (paddr..paddr + memsz).contains(&entry) || (vaddr..vaddr + memsz).contains(&entry) {
                entry_in_load = true;
            }
        }
    }
    assert!(loads > 0, "no PT_LOAD segments");
    assert!(
        entry_in_load,
        "entry point {entry:#x} is in no loadable segment"
    );
    let banner = format!("Linux version {version}");
    assert!(
        data.windows(banner.len()).any(|w| w == banner.as_bytes()),
        "{}: no \"{banner}\" banner: the kernel is not the version the manifest names",
        path.display()
    );
}

fn read_config(path: &Path) -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e} (the kernel's config)", path.display()));
    text.lines()
        .filter_map(|l| l.split_once('='))
        .filter(|(k, _)| k.starts_with("CONFIG_"))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

// --- the initrd -------------------------------------------------------------------------------

struct CpioEntry {
    mode: u32,
    data: Vec<u8>,
}

/// A gzip'd newc cpio, unpacked with `gzip -dc` and parsed here.
fn read_initrd(path: &Path) -> BTreeMap<String, CpioEntry> {
    let out = Command::new("gzip")
        .arg("-dc")
        .arg(path)
        .output()
        .expect("run gzip");
    assert!(out.status.success(), "{}: not gzip data", path.display());
    let d = out.stdout;
    let mut entries = BTreeMap::new();
    let mut i = 0;
    loop {
        assert!(i + 110 <= d.len(), "initrd: truncated cpio");
        assert_eq!(&d[i..i + 6], b"070701", "initrd: not a newc cpio at {i}");
        let field = |k: usize| {
            u32::from_str_radix(
                std::str::from_utf8(&d[i + 6 + 8 * k..i + 14 + 8 * k]).unwrap(),
                16,
            )
            .unwrap() as usize
        };
        let (mode, size, namesize) = (field(1) as u32, field(6), field(11));
        let name = String::from_utf8(d[i + 110..i + 110 + namesize - 1].to_vec()).unwrap();
        i = (i + 110 + namesize + 3) & !3;
        let data = d[i..i + size].to_vec();
        i = (i + size + 3) & !3;
        if name == "TRAILER!!!" {
            return entries;
        }
        entries.insert(name, CpioEntry { mode, data });
    }
}

/// The .modinfo key=value pairs of a kernel module (an ELF64 relocatable object).
fn modinfo(module: &[u8]) -> Vec<(String, String)> {
    let u16_at = |o: usize| u16::from_le_bytes(module[o..o + 2].try_into().unwrap()) as usize;
    let u32_at = |o: usize| u32::from_le_bytes(module[o..o + 4].try_into().unwrap()) as usize;
    let u64_at = |o: usize| u64::from_le_bytes(module[o..o + 8].try_into().unwrap()) as usize;
    assert_eq!(&module[..4], b"\x7fELF");
    let (shoff, shentsize, shnum, shstrndx) = (u64_at(40), u16_at(58), u16_at(60), u16_at(62));
    let section = |i: usize| {
        let s = shoff + i * shentsize;
        (u32_at(s), u64_at(s + 24), u64_at(s + 32))
    };
    let strtab = section(shstrndx).1;
    for i in 0..shnum {
        let (name, offset, size) = section(i);
        let name_start = strtab + name;
        let name_end = name_start + module[name_start..].iter().position(|&b| b == 0).unwrap();
        if &module[name_start..name_end] == b".modinfo" {
            return module[offset..offset + size]
                .split(|&b| b == 0)
                .filter_map(|f| {
                    let f = String::from_utf8_lossy(f);
                    f.split_once('=')
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                })
                .collect();
        }
    }
    Vec::new()
}

/// The kernel features the sandbox needs, each built in (=y) or a module the initrd loads.
const NEEDED: &[(&str, &str)] = &[
    ("CONFIG_VIRTIO", "virtio"),
    ("CONFIG_VIRTIO_MMIO", "virtio_mmio"),
    ("CONFIG_VIRTIO_BLK", "virtio_blk"),
    ("CONFIG_VSOCKETS", "vsock"),
    (
        "CONFIG_VIRTIO_VSOCKETS_COMMON",
        "vmw_vsock_virtio_transport_common",
    ),
    ("CONFIG_VIRTIO_VSOCKETS", "vmw_vsock_virtio_transport"),
    ("CONFIG_EXT4_FS", "ext4"),
];

/// Kernel features, and the initrd that loads what the kernel builds as modules.
fn check_kernel_features(dir: &Path, manifest: &Value) {
    let config = read_config(&dir.join("config"));
    for key in [
        "CONFIG_DEVTMPFS",
        "CONFIG_SERIAL_8250_CONSOLE",
        "CONFIG_UNIX",
    ] {
        assert_eq!(config.get(key).map(String::as_str), Some("y"), "{key}");
    }
    let modular: Vec<(&str, &str)> = NEEDED
        .iter()
        .copied()
        .filter(|(key, _)| {
            let v = config.get(*key).map(String::as_str);
            assert!(
                matches!(v, Some("y") | Some("m")),
                "{key} is {v:?}: the guest cannot work without it"
            );
            v == Some("m")
        })
        .collect();
    let cmdline_devices = config
        .get("CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES")
        .map(String::as_str)
        == Some("y");
    if modular.is_empty() && cmdline_devices {
        // Everything built in (the microvm kernel): no initrd needed.
        assert!(
            manifest["initrd"].is_null(),
            "an all-built-in kernel has no initrd"
        );
        return;
    }
    assert_eq!(
        manifest["initrd"]["path"], "initrd",
        "modules need an initrd"
    );
    let initrd_path = dir.join("initrd");
    assert_eq!(
        manifest["initrd"]["sha256"].as_str().unwrap(),
        sha256_file(&initrd_path),
        "manifest initrd.sha256"
    );
    let initrd = read_initrd(&initrd_path);
    let init = &initrd.get("init").expect("initrd has /init");
    assert!(init.mode & 0o111 != 0, "/init is not executable");
    let script = String::from_utf8_lossy(&init.data);
    assert!(script.starts_with("#!/bin/sh"), "/init is a shell script");
    for needle in [
        "mount -t proc",
        "mount -t sysfs",
        "mount -t devtmpfs",
        "/lib/modules/load-order",
        "insmod",
        "tries=$((wait * 20))",
        "switch_root /newroot",
        "init=/sbin/init",
        "reboot -f",
    ] {
        assert!(script.contains(needle), "/init lacks `{needle}`:\n{script}");
    }
    let sh = initrd.get("bin/sh").expect("initrd has /bin/sh");
    assert_eq!(sh.mode & 0o170000, 0o120000, "/bin/sh is a link to busybox");
    let busybox = initrd.get("bin/busybox").expect("initrd has busybox");
    assert_eq!(&busybox.data[..4], b"\x7fELF", "busybox is an ELF binary");
    for applet in ["mount", "insmod", "switch_root", "usleep", "cat", "reboot"] {
        assert!(
            initrd.contains_key(&format!("bin/{applet}")),
            "initrd lacks {applet}"
        );
    }

    // The load order: every module's dependencies come before it, and every modular feature
    // the sandbox needs is in it.
    let order_text = String::from_utf8(
        initrd
            .get("lib/modules/load-order")
            .expect("initrd has lib/modules/load-order")
            .data
            .clone(),
    )
    .unwrap();
    let order: Vec<&str> = order_text.lines().filter(|l| !l.is_empty()).collect();
    let version = manifest["kernel"]["version"].as_str().unwrap();
    let mut loaded = BTreeSet::new();
    for file in &order {
        let module = initrd
            .get(&format!("lib/modules/{file}"))
            .unwrap_or_else(|| panic!("load-order names {file}, which the initrd lacks"));
        let info = modinfo(&module.data);
        let get = |k: &str| {
            info.iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
        };
        let name = get("name").unwrap_or_else(|| panic!("{file}: no name in .modinfo"));
        let vermagic = get("vermagic").unwrap_or_default();
        assert!(
            vermagic.starts_with(&format!("{version} ")),
            "{file}: vermagic {vermagic:?} does not match kernel {version}"
        );
        for dep in get("depends")
            .unwrap_or_default()
            .split(',')
            .filter(|d| !d.is_empty())
        {
            assert!(
                loaded.contains(&dep.replace('-', "_")),
                "{file} is loaded before its dependency {dep}: {order:?}"
            );
        }
        loaded.insert(name.replace('-', "_"));
    }
    for (key, module) in &modular {
        assert!(
            loaded.contains(*module),
            "{key}=m but the initrd does not load {module}: {order:?}"
        );
    }
    if let Some(listed) = manifest["initrd"]["modules"].as_array() {
        for m in listed {
            let m = m.as_str().unwrap().replace('-', "_");
            assert!(
                loaded.contains(&m),
                "manifest lists {m}, the initrd does not load it"
            );
        }
    }
    if !cmdline_devices {
        // The kernel ignores virtio_mmio.device= without CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES;
        // the initrd's helper module registers the devices from those tokens instead.
        let helper = initrd
            .get("lib/modules/airlock_virtio_mmio_cmdline.ko")
            .expect("the kernel lacks CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES and the initrd lacks the helper module");
        let info = modinfo(&helper.data);
        assert!(
            info.iter()
                .any(|(k, v)| k == "vermagic" && v.starts_with(&format!("{version} "))),
            "the helper module is not built for {version}: {info:?}"
        );
        assert!(info
            .iter()
            .any(|(k, v)| k == "parm" && v.starts_with("device:")));
        assert!(
            script.contains("virtio_mmio.device=*)"),
            "/init reads virtio_mmio.device="
        );
        assert!(script.contains("insmod /lib/modules/airlock_virtio_mmio_cmdline.ko $devices"));
    }
}

// --- the root filesystem (read with debugfs, nothing mounted) -----------------------------------

fn debugfs(image: &Path, request: &str) -> String {
    let out = Command::new("debugfs")
        .args(["-R", request])
        .arg(image)
        .output()
        .expect("run debugfs (e2fsprogs; images/build.sh installs it)");
    assert!(
        out.status.success(),
        "debugfs -R {request:?} failed: {out:?}"
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// (type, mode, uid, gid) from `debugfs stat`.
fn ext4_stat(image: &Path, path: &str) -> (String, u32, u32, u32) {
    let text = debugfs(image, &format!("stat {path}"));
    let word_after = |label: &str| -> String {
        let at = text
            .find(label)
            .unwrap_or_else(|| panic!("{path} not in {}: {text}", image.display()));
        text[at + label.len()..]
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    };
    (
        word_after("Type:"),
        u32::from_str_radix(&word_after("Mode:"), 8).unwrap(),
        word_after("User:").parse().unwrap(),
        word_after("Group:").parse().unwrap(),
    )
}

fn ext4_read(image: &Path, path: &str) -> Vec<u8> {
    let dir = scratch_dir("ext4-dump");
    let dest = dir.join("file");
    debugfs(image, &format!("dump {path} {}", dest.display()));
    let data = std::fs::read(&dest).unwrap_or_else(|e| panic!("{path} not dumped: {e}"));
    let _ = std::fs::remove_dir_all(dir);
    data
}

/// The same hash as images/imagetool.py's tree-hash: sorted lines
/// "<type> <mode> <path> <sha256 | link target | ->", ownership and times left out.
fn tree_hash(top: &Path) -> String {
    fn walk(top: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            out.push(path.strip_prefix(top).unwrap().to_path_buf());
            if std::fs::symlink_metadata(&path).unwrap().is_dir() {
                walk(top, &path, out);
            }
        }
    }
    use std::os::unix::ffi::OsStrExt;
    let mut paths = Vec::new();
    walk(top, top, &mut paths);
    paths.sort_by(|a, b| a.as_os_str().as_bytes().cmp(b.as_os_str().as_bytes()));
    let mut text = Vec::new();
    for rel in paths {
        let path = top.join(&rel);
        let meta = std::fs::symlink_metadata(&path).unwrap();
        let mode = format!("{:04o}", meta.mode() & 0o7777);
        let ft = meta.file_type();
        let (kind, what) = if ft.is_symlink() {
            let target = std::fs::read_link(&path).unwrap();
            ("l", target.as_os_str().as_bytes().to_vec())
        } else if ft.is_dir() {
            ("d", b"-".to_vec())
        } else if ft.is_file() {
            ("f", sha256_file(&path).into_bytes())
        } else {
            use std::os::unix::fs::FileTypeExt;
            let dev = meta.rdev();
            let kind = if ft.is_char_device() {
                "c"
            } else if ft.is_block_device() {
                "b"
            } else {
                "o"
            };
            let what = if kind == "o" {
                b"-".to_vec()
            } else {
                format!("{}:{}", libc::major(dev), libc::minor(dev)).into_bytes()
            };
            (kind, what)
        };
        text.extend_from_slice(format!("{kind} {mode} ").as_bytes());
        text.extend_from_slice(rel.as_os_str().as_bytes());
        text.push(b' ');
        text.extend_from_slice(&what);
        text.push(b'\n');
    }
    sha256(&text)
}

fn agent_version(binary: &Path) -> String {
    let out = Command::new(binary)
        .arg("--version")
        .output()
        .unwrap_or_else(|e| panic!("run {} --version: {e}", binary.display()));
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_string()
}

/// The rootfs image and its staged tree (which the namespace backend runs the agent from).
fn check_rootfs(dir: &Path, manifest: &Value, programs: &[&str]) {
    let image = dir.join("rootfs.ext4");
    let tree = dir.join(manifest["rootfs"]["dir"].as_str().unwrap());
    assert_eq!(
        manifest["rootfs"]["sha256"].as_str().unwrap(),
        sha256_file(&image),
        "manifest rootfs.sha256"
    );
    assert_eq!(
        manifest["rootfs"]["size_bytes"].as_u64().unwrap(),
        std::fs::metadata(&image).unwrap().len()
    );
    assert_eq!(
        manifest["rootfs"]["contents_sha256"].as_str().unwrap(),
        tree_hash(&tree),
        "manifest rootfs.contents_sha256 against the staged tree {}",
        tree.display()
    );
    let superblock = debugfs(&image, "stats");
    assert!(
        superblock.contains("Filesystem magic number:  0xEF53"),
        "not ext4: {superblock}"
    );
    assert!(superblock.contains("extent"), "ext4 features: {superblock}");

    // The agent is /sbin/init, root-owned and executable, in the image and in the tree.
    let agent_sha = manifest["agent"]["sha256"].as_str().unwrap();
    let init_in_image = ext4_read(&image, "/sbin/init");
    assert_eq!(
        sha256(&init_in_image),
        agent_sha,
        "/sbin/init in rootfs.ext4 is the agent"
    );
    let init_in_tree = tree.join("sbin/init");
    assert_eq!(
        sha256_file(&init_in_tree),
        agent_sha,
        "sbin/init in the staged tree"
    );
    assert_eq!(
        agent_version(&init_in_tree),
        manifest["agent"]["version"].as_str().unwrap(),
        "the agent's --version against the manifest"
    );
    let built = airlock_tests::workspace_bin("airlock-agent");
    assert_eq!(
        agent_version(&built),
        manifest["agent"]["version"].as_str().unwrap(),
        "the image's agent is not the version this workspace builds: run `bash images/build.sh`"
    );
    if sha256_file(&built) != agent_sha {
        say(&format!(
            "images: note: {} differs from the agent in {} (same version; rebuild the image with `bash images/build.sh` to pick it up)",
            built.display(),
            dir.display()
        ));
    }
    let sbin_init = debugfs(&image, "stat /sbin/init");
    let (kind, mode, uid, gid) = ext4_stat(&image, "/sbin/init");
    assert!(
        kind == "regular" || sbin_init.contains("Type: symlink"),
        "/sbin/init type {kind}"
    );
    if kind == "regular" {
        assert_eq!(
            (mode & 0o777, uid, gid),
            (0o755, 0, 0),
            "/sbin/init mode and owner"
        );
    }

    // The unprivileged user, with a home of its own; everything else belongs to root.
    let passwd = String::from_utf8(ext4_read(&image, "/etc/passwd")).unwrap();
    let sandbox = passwd
        .lines()
        .find(|l| l.starts_with("sandbox:"))
        .unwrap_or_else(|| panic!("no sandbox user in /etc/passwd:\n{passwd}"));
    let fields: Vec<&str> = sandbox.split(':').collect();
    assert_eq!((fields[2], fields[3]), ("1000", "1000"), "{sandbox}");
    assert_eq!(manifest["rootfs"]["user"]["name"], "sandbox");
    assert_eq!(manifest["rootfs"]["user"]["uid"], 1000);
    let group = String::from_utf8(ext4_read(&image, "/etc/group")).unwrap();
    assert!(
        group.lines().any(|l| l.starts_with("sandbox:x:1000:")),
        "{group}"
    );
    assert!(
        passwd.lines().any(|l| l.starts_with("root:x:0:0:")),
        "{passwd}"
    );
    let (_, mode, uid, gid) = ext4_stat(&image, "/home/sandbox");
    assert_eq!((uid, gid), (1000, 1000), "/home/sandbox owner");
    assert_eq!(mode & 0o777, 0o755);
    let (_, mode, uid, _) = ext4_stat(&image, "/tmp");
    assert_eq!((mode & 0o7777, uid), (0o1777, 0), "/tmp mode and owner");
    let (_, _, uid, _) = ext4_stat(&image, "/etc/passwd");
    assert_eq!(uid, 0, "/etc/passwd owner");
    for d in ["/proc", "/sys", "/dev", "/run"] {
        let (kind, ..) = ext4_stat(&image, d);
        assert_eq!(kind, "directory", "{d}");
    }
    for program in programs {
        let (kind, mode, uid, _) = ext4_stat(&image, program);
        assert!(kind == "regular" || kind == "symlink", "{program}: {kind}");
        assert_eq!(uid, 0, "{program} owner");
        if kind == "regular" {
            assert!(mode & 0o111 != 0, "{program} is not executable");
        }
        let staged = tree.join(program.trim_start_matches('/'));
        assert!(
            staged.exists(),
            "{} missing from the staged tree",
            staged.display()
        );
    }
    let perms = std::fs::metadata(&tree).unwrap().permissions();
    assert!(
        perms.mode() & 0o002 == 0,
        "the staged tree is world-writable"
    );
}

fn check_manifest_basics(dir: &Path, manifest: &Value, name: &str) {
    assert_eq!(manifest["format_version"], 1);
    assert_eq!(manifest["name"], name);
    assert!(manifest["build_date"].as_str().unwrap().ends_with('Z'));
    let boot_args = manifest["boot_args"].as_str().unwrap();
    assert!(boot_args.contains("console=ttyS0") && boot_args.contains("reboot=k"));
    assert_eq!(manifest["kernel"]["path"], "vmlinux");
    assert_eq!(manifest["kernel"]["format"], "elf64-x86_64");
    assert_eq!(
        manifest["kernel"]["sha256"].as_str().unwrap(),
        sha256_file(&dir.join("vmlinux")),
        "manifest kernel.sha256"
    );
    assert_eq!(manifest["rootfs"]["init"], "/sbin/init");
    assert_eq!(manifest["agent"]["path"], "/sbin/init");
}

fn check_image(name: &str, required: bool, programs: &[&str]) {
    let Some(manifest) = manifest(name, required) else {
        return;
    };
    let dir = image_dir(name);
    check_manifest_basics(&dir, &manifest, name);
    check_vmlinux(
        &dir.join("vmlinux"),
        manifest["kernel"]["version"].as_str().unwrap(),
    );
    check_kernel_features(&dir, &manifest);
    check_rootfs(&dir, &manifest, programs);
}

#[test]
fn default_image_is_complete_and_matches_its_manifest() {
    let manifest = manifest("default", true).unwrap();
    assert_eq!(manifest["kernel"]["source"], "debian-cloud");
    assert_eq!(manifest["rootfs"]["flavor"], "minimal");
    check_image(
        "default",
        true,
        &["/bin/busybox", "/bin/sh", "/usr/bin/env"],
    );
    // busybox's own init must not shadow the agent.
    let tree = image_dir("default").join("rootfs");
    assert!(!std::fs::symlink_metadata(tree.join("sbin/init"))
        .unwrap()
        .is_symlink());
    assert!(!tree.join("linuxrc").exists());
}

#[test]
fn python_image_is_complete_and_matches_its_manifest() {
    check_image(
        "python",
        false,
        &["/usr/bin/python3", "/usr/bin/pip3", "/usr/bin/dpkg"],
    );
}

#[test]
fn microvm_image_is_complete_and_matches_its_manifest() {
    check_image("microvm", false, &["/bin/busybox", "/bin/sh"]);
}
