//! virtio devices driven by the test guest's polling drivers through the real `airlock-vmm`:
//! block (a host file's checksum read in the guest, a pattern written by the guest checked on the
//! host), rng, vsock (both directions, through Unix sockets) and net (frames through a real TAP,
//! seen and answered with a packet socket), plus device state across a snapshot.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use airlock_tests::{api_request, scratch_dir, test_guest, VmmProcess};
use serde_json::{json, Value};

const TIMEOUT: Duration = Duration::from_secs(120);

fn config(boot_args: &str, extra: Value) -> Value {
    let mut c = json!({
        "boot-source": {"kernel_image_path": test_guest("elf"), "boot_args": boot_args},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 64},
    });
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    c
}

fn run(dir: &Path, config: &Value) -> VmmProcess {
    let path = dir.join("vm.json");
    std::fs::write(&path, config.to_string()).unwrap();
    VmmProcess::spawn(&["--no-api", "--config-file", path.to_str().unwrap()])
}

fn finish_ok(vmm: &mut VmmProcess, scenario: &str) -> Vec<String> {
    let (status, console, stderr) = vmm.finish(TIMEOUT);
    assert!(
        status.success() && console.iter().any(|l| l == &format!("PROBE OK {scenario}")),
        "{scenario}: {status}\n{}\n{stderr}",
        console.join("\n")
    );
    console
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

fn disk(dir: &Path, sectors: usize) -> (PathBuf, Vec<u8>) {
    let content: Vec<u8> = (0..sectors * 512)
        .map(|i| ((i * 131 + 17) % 256) as u8)
        .collect();
    let path = dir.join("disk.img");
    std::fs::write(&path, &content).unwrap();
    (path, content)
}

#[test]
fn block_reads_writes_and_refuses() {
    let dir = scratch_dir("virtio-blk");
    let (path, content) = disk(&dir, 64);
    let drive = json!({"drives": [{"drive_id": "scratch", "path_on_host": path, "is_root_device": false, "is_read_only": false}]});
    let mut vmm = run(
        &dir,
        &config("probe=virtio-blk blk_read=8 blk_write=8", drive),
    );
    let console = finish_ok(&mut vmm, "virtio-blk");
    let want = format!(
        "BLK READ 8 sectors fnv1a64 {:016x}",
        fnv1a64(&content[..8 * 512])
    );
    for line in [
        want.as_str(),
        "BLK capacity 64",
        "BLK ID scratch",
        "BLK WROTE 8 sectors",
        "BLK FLUSHED",
        "BLK OUT OF RANGE REFUSED",
    ] {
        assert!(
            console.iter().any(|l| l == line),
            "missing {line:?} in {console:?}"
        );
    }
    let after = std::fs::read(&path).unwrap();
    for sector in 8..16usize {
        for i in 0..512usize {
            let expected = (((sector * 512 + i) * 7 + 3) % 251) as u8;
            assert_eq!(
                after[sector * 512 + i],
                expected,
                "sector {sector} byte {i}"
            );
        }
    }
    assert_eq!(
        after[16 * 512..],
        content[16 * 512..],
        "nothing written past the request"
    );

    // Read-only: the guest's write comes back IOERR and the file is untouched.
    let (path, content) = disk(&dir, 32);
    let drive = json!({"drives": [{"drive_id": "ro", "path_on_host": path, "is_root_device": false, "is_read_only": true}]});
    let mut vmm = run(
        &dir,
        &config("probe=virtio-blk blk_read=4 blk_write=4 blk_ro=1", drive),
    );
    let console = finish_ok(&mut vmm, "virtio-blk");
    assert!(
        console.iter().any(|l| l == "BLK WRITE REFUSED"),
        "{console:?}"
    );
    assert_eq!(std::fs::read(&path).unwrap(), content);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn rng_fills_guest_buffers() {
    let dir = scratch_dir("virtio-rng");
    let mut vmm = run(&dir, &config("probe=virtio-rng", json!({"entropy": {}})));
    let console = finish_ok(&mut vmm, "virtio-rng");
    assert!(
        console
            .iter()
            .any(|l| l.starts_with("RNG ") && l.ends_with("x2 ok")),
        "{console:?}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn vsock_connects_both_ways() {
    let dir = scratch_dir("virtio-vsock");
    let uds = dir.join("v.sock");
    // Guest-initiated connections to host port 5000 reach <uds>_5000: echo what arrives.
    let listener = UnixListener::bind(format!("{}_5000", uds.display())).unwrap();
    let echo = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        let mut buf = [0u8; 15];
        s.read_exact(&mut buf).unwrap();
        s.write_all(&buf).unwrap();
        buf.to_vec()
    });
    let vsock = json!({"vsock": {"guest_cid": 3, "uds_path": uds}});
    let mut vmm = run(
        &dir,
        &config(
            "probe=virtio-vsock vsock_port=5000 vsock_listen=6000",
            vsock,
        ),
    );
    assert_eq!(echo.join().unwrap(), b"ping from guest");
    vmm.wait_for_line(TIMEOUT, |l| l == "VSOCK echo ok")
        .expect("guest-initiated echo");
    // Host-initiated: Firecracker's CONNECT handshake on uds_path.
    let mut s = UnixStream::connect(&uds).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s.write_all(b"CONNECT 6000\n").unwrap();
    let mut reader = BufReader::new(s.try_clone().unwrap());
    let mut ok = String::new();
    reader.read_line(&mut ok).unwrap();
    assert!(ok.starts_with("OK ") && ok.ends_with('\n'), "{ok:?}");
    s.write_all(b"hello from host\n").unwrap();
    let mut back = String::new();
    reader.read_line(&mut back).unwrap();
    assert_eq!(back, "hello from host\n");
    drop(s);
    let console = finish_ok(&mut vmm, "virtio-vsock");
    assert!(
        console.iter().any(|l| l == "VSOCK accepted on port 6000"),
        "{console:?}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// A TAP device for one test, removed on drop.
struct Tap(String);

impl Tap {
    fn new() -> Tap {
        let name = format!("alk{}", std::process::id() % 100_000);
        let ip = |args: &[&str]| {
            let out = std::process::Command::new("ip")
                .args(args)
                .output()
                .expect("run ip");
            assert!(
                out.status.success(),
                "ip {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        ip(&["tuntap", "add", "dev", &name, "mode", "tap"]);
        ip(&["link", "set", &name, "up"]);
        Tap(name)
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.0])
            .output();
    }
}

const ETHERTYPE: u16 = 0x88b5;

/// A raw packet socket on the TAP's host side, for the test's own protocol only.
fn packet_socket(ifname: &str) -> i32 {
    // SAFETY: plain socket calls with values we own; errors are checked.
    unsafe {
        let fd = libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW,
            i32::from(ETHERTYPE.to_be()),
        );
        assert!(
            fd >= 0,
            "packet socket: {}",
            std::io::Error::last_os_error()
        );
        let name = std::ffi::CString::new(ifname).unwrap();
        let mut addr: libc::sockaddr_ll = std::mem::zeroed();
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = ETHERTYPE.to_be();
        addr.sll_ifindex = libc::if_nametoindex(name.as_ptr()) as i32;
        let rc = libc::bind(
            fd,
            &addr as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        );
        assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
        let tv = libc::timeval {
            tv_sec: 60,
            tv_usec: 0,
        };
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &tv as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as u32,
        );
        fd
    }
}

fn recv_frame(fd: i32) -> Vec<u8> {
    let mut buf = vec![0u8; 2048];
    // SAFETY: receiving into our own buffer.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
    assert!(
        n > 0,
        "no frame from the guest: {}",
        std::io::Error::last_os_error()
    );
    buf.truncate(n as usize);
    buf
}

#[test]
fn net_frames_cross_a_real_tap() {
    let dir = scratch_dir("virtio-net");
    let tap = Tap::new();
    let fd = packet_socket(&tap.0);
    let mac = "06:00:ac:10:00:02";
    let net = json!({"network-interfaces": [{"iface_id": "eth0", "host_dev_name": tap.0, "guest_mac": mac}]});
    let mut vmm = run(&dir, &config("probe=virtio-net", net));
    let frame = recv_frame(fd);
    assert_eq!(
        &frame[6..12],
        &[6, 0, 0xac, 0x10, 0, 2],
        "source MAC is the guest's"
    );
    assert!(String::from_utf8_lossy(&frame[14..]).starts_with("airlock-net-test from guest"));
    // Answer from a host MAC; the guest replies "pong: " + our payload.
    let mut reply = vec![0u8; 14];
    reply[..6].copy_from_slice(&frame[6..12]);
    reply[6..12].copy_from_slice(&[6, 0, 0xac, 0x10, 0, 1]);
    reply[12..14].copy_from_slice(&ETHERTYPE.to_be_bytes());
    reply.extend_from_slice(b"hello guest");
    reply.resize(60, 0);
    // SAFETY: sending our own buffer on our own socket.
    let sent = unsafe { libc::send(fd, reply.as_ptr().cast(), reply.len(), 0) };
    assert_eq!(
        sent,
        reply.len() as isize,
        "{}",
        std::io::Error::last_os_error()
    );
    let pong = loop {
        let f = recv_frame(fd);
        if f[6..12] == [6, 0, 0xac, 0x10, 0, 2] {
            break f;
        }
    };
    assert!(
        String::from_utf8_lossy(&pong[14..]).starts_with("pong: hello guest"),
        "{:?}",
        String::from_utf8_lossy(&pong[14..])
    );
    let console = finish_ok(&mut vmm, "virtio-net");
    assert!(
        console.iter().any(|l| l == "NET received hello guest"),
        "{console:?}"
    );
    // SAFETY: closing our own socket.
    unsafe { libc::close(fd) };
    let _ = std::fs::remove_dir_all(dir);
}

/// A host end that stops reading, twice.
/// 1. From the start, until the guest says it is stalled: its 1 MiB outgrew the socket buffer and
///    the device's window (256 KiB), so the VMM holds a backlog. When the host reads again the
///    backlog must flush on its own (no guest packet comes to push it) and the guest must hear
///    it has credit.
/// 2. With the last 256 KiB unread: the guest can finish (the socket plus the window hold it) and
///    sends SHUTDOWN while the VMM still holds part of its data, which must still all arrive.
#[test]
fn vsock_backlog_flushes_when_the_host_reads_again() {
    const BULK: usize = 1 << 20;
    const HELD_AT_END: usize = 256 << 10;
    let dir = scratch_dir("virtio-vsock-backlog");
    let uds = dir.join("v.sock");
    let listener = UnixListener::bind(format!("{}_5000", uds.display())).unwrap();
    let vsock = json!({"vsock": {"guest_cid": 3, "uds_path": uds}});
    let mut vmm = run(
        &dir,
        &config(
            &format!(
                "probe=virtio-vsock vsock_port=5000 vsock_bulk_kib={}",
                BULK >> 10
            ),
            vsock,
        ),
    );
    let console = vmm.console.clone();
    let guest_said = move |prefix: &str| {
        let deadline = std::time::Instant::now() + TIMEOUT;
        while std::time::Instant::now() < deadline {
            if (console.lock().unwrap().iter()).any(|l| l.starts_with(prefix)) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    };
    let host = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        let mut ping = [0u8; 15];
        s.read_exact(&mut ping).unwrap();
        s.write_all(&ping).unwrap();
        let stalled = guest_said("VSOCK stalled");
        let mut data = vec![0u8; BULK - HELD_AT_END];
        s.read_exact(&mut data).unwrap();
        let finished_while_held = guest_said("VSOCK bulk sent");
        s.read_to_end(&mut data).unwrap();
        (stalled, finished_while_held, data)
    });
    let (stalled, finished_while_held, data) = host.join().unwrap();
    let console = finish_ok(&mut vmm, "virtio-vsock");
    assert!(
        stalled,
        "the guest never ran out of credit sending 1 MiB to a host that was not reading: {console:?}"
    );
    assert!(
        finished_while_held,
        "the guest could not finish with {HELD_AT_END} bytes unread: {console:?}"
    );
    assert_eq!(data.len(), BULK, "bytes the host got");
    if let Some(i) = (0..data.len()).find(|&i| data[i] != (i % 251) as u8) {
        panic!(
            "byte {i} of the bulk transfer is {:#x}, not {:#x}",
            data[i],
            i % 251
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn devices_survive_a_snapshot_and_vsock_can_be_renamed() {
    let dir = scratch_dir("virtio-snap");
    let (path, _) = disk(&dir, 16);
    let sock = dir.join("t.sock");
    let cfg = config(
        "probe=spin",
        json!({
            "drives": [{"drive_id": "d", "path_on_host": path, "is_root_device": false, "is_read_only": true}],
            "vsock": {"guest_cid": 3, "uds_path": dir.join("v1.sock")},
            "entropy": {},
        }),
    );
    std::fs::write(dir.join("vm.json"), cfg.to_string()).unwrap();
    let template = VmmProcess::spawn(&[
        "--api-sock",
        sock.to_str().unwrap(),
        "--config-file",
        dir.join("vm.json").to_str().unwrap(),
    ]);
    template
        .wait_for_line(TIMEOUT, |l| l == "SPIN 2")
        .expect("spins");
    assert_eq!(
        api_request(&sock, "PATCH", "/vm", Some(r#"{"state": "Paused"}"#)).0,
        204
    );
    let body = json!({"snapshot_type": "Full", "snapshot_path": dir.join("s.state"), "mem_file_path": dir.join("s.mem")});
    let (status, reply) = api_request(&sock, "PUT", "/snapshot/create", Some(&body.to_string()));
    assert_eq!(status, 204, "{reply}");
    drop(template);
    // The template's vsock socket is still taken by nobody, but a fork must not reuse it.
    let sock2 = dir.join("r.sock");
    let _restored = VmmProcess::spawn(&["--api-sock", sock2.to_str().unwrap()]);
    let load = json!({
        "snapshot_path": dir.join("s.state"),
        "mem_backend": {"backend_type": "File", "backend_path": dir.join("s.mem")},
        "vsock_override": {"uds_path": dir.join("v2.sock")},
        "resume_vm": true,
    });
    let (status, reply) = api_request(&sock2, "PUT", "/snapshot/load", Some(&load.to_string()));
    assert_eq!(status, 204, "{reply}");
    assert!(
        dir.join("v2.sock").exists(),
        "the override's socket is listening"
    );
    let bad = json!({
        "snapshot_path": dir.join("s.state"),
        "mem_backend": {"backend_type": "File", "backend_path": dir.join("s.mem")},
        "network_overrides": [{"iface_id": "eth9", "host_dev_name": "tap9"}],
    });
    let sock3 = dir.join("r3.sock");
    let _other = VmmProcess::spawn(&["--api-sock", sock3.to_str().unwrap()]);
    let (status, reply) = api_request(&sock3, "PUT", "/snapshot/load", Some(&bad.to_string()));
    assert_eq!(status, 400);
    assert!(
        reply.contains("no network interface \\\"eth9\\\""),
        "{reply}"
    );
    let _ = std::fs::remove_dir_all(dir);
}
