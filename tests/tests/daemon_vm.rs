//! The `vm` backend end to end: each sandbox a jailed `airlock-vmm` microVM running the default
//! image's agent. The end-to-end tests need a host where `airlock-vmm check-host` says Linux
//! guests run (hardware KVM, or the nested lab: `bash tests/lab/run.sh vm`); elsewhere each prints
//! its NOT RUN line with check-host's reason. What runs anywhere: the daemon starts with
//! `--backend vm`, reports it, and never falls back to `namespace`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use airlock_tests::daemon::*;
use airlock_tests::{linux_guests_unavailable, not_run, repo_root};
use serde_json::json;

/// The agent-ready wait the tests give the daemon: the lab's nested, emulated KVM boots the
/// default image in tens of seconds; hardware in well under one.
const AGENT_READY_S: &str = "400";

#[test]
fn vm_backend_daemon_reports_itself_and_never_falls_back() {
    if let Some(reason) = airlock_tests::agent::cannot_run_reason() {
        not_run(
            "vm_backend_daemon_reports_itself_and_never_falls_back",
            &reason,
        );
        return;
    }
    let d = DaemonUnderTest::start_vm(&[]);
    run_bounded(Duration::from_secs(60), async {
        let c = d.client();
        let h = c.call(Method::GET, "/v1/health", None).await.unwrap();
        assert_eq!(h["backend"], "vm");
        assert!(h["isolation"].as_str().unwrap().contains("microvm"));
        // A root tree is not a vm image: refused by name, nothing falls back.
        if let Some(rootfs) = test_rootfs() {
            let (s, v) = checked(
                &c,
                Method::POST,
                "/v1/templates",
                Some(&json!({"name": "x", "image": rootfs})),
            )
            .await;
            assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
            assert!(v["error"].as_str().unwrap().contains("vmlinux"), "{v}");
        }
        let (s, _) = checked(
            &c,
            Method::POST,
            "/v1/sandboxes",
            Some(&json!({"template": "x"})),
        )
        .await;
        assert_eq!(s, StatusCode::NOT_FOUND);
    });
}

/// The default image, or the reason the vm end-to-end tests cannot run here.
fn vm_image_or_reason() -> Result<PathBuf, String> {
    if let Some(r) = airlock_tests::agent::cannot_run_reason() {
        return Err(r);
    }
    if let Some(r) = linux_guests_unavailable() {
        return Err(r);
    }
    let image = repo_root().join("images/out/default");
    if !image.join("vmlinux").exists() || !image.join("rootfs.ext4").exists() {
        return Err("images/out/default is not built (bash images/build.sh)".into());
    }
    Ok(image)
}

fn vm_daemon(extra: &[&str]) -> DaemonUnderTest {
    // Some checks run as root inside the guest (ping, sysrq, devmem).
    let mut args = vec![
        "--agent-ready-timeout-s",
        AGENT_READY_S,
        "--allow-guest-root",
    ];
    args.extend_from_slice(extra);
    DaemonUnderTest::start_vm(&args)
}

/// Builds the template `name` from the default image through the CLI, which prints the build's
/// progress; returns the progress lines.
fn cli_template(d: &DaemonUnderTest, name: &str, image: &Path) -> String {
    let t = Instant::now();
    let (code, out, err) = d.cli_within(
        Duration::from_secs(900),
        &["templates", "create", name, image.to_str().unwrap()],
        None,
    );
    assert_eq!(
        code,
        0,
        "template build failed: {out}\n{err}\ndaemon: {}",
        d.stderr.lock().unwrap()
    );
    assert_eq!(out.trim(), name, "{out}");
    eprintln!(
        "template {name}: built in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    err
}

/// What a sandbox's VM leaves on the host while it lives: its VMM process, jail, cgroups, TAP.
#[derive(Debug, Default, PartialEq)]
struct Traces {
    processes: Vec<String>,
    paths: Vec<PathBuf>,
}

fn traces(d: &DaemonUnderTest, id: &str, tap: Option<&str>) -> Traces {
    let mut t = Traces::default();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if text.contains("airlock-vmm") && text.contains(id) {
            t.processes.push(text);
        }
    }
    let mut candidates = vec![
        d.state_dir.join("jail/airlock-vmm").join(id),
        d.state_dir.join("sandboxes").join(id),
    ];
    if let Some(tap) = tap {
        candidates.push(PathBuf::from("/sys/class/net").join(tap));
    }
    for cg in [
        "/sys/fs/cgroup",
        "/sys/fs/cgroup/memory",
        "/sys/fs/cgroup/cpu",
        "/sys/fs/cgroup/pids",
    ] {
        for parent in ["airlock-vmm", "airlock"] {
            candidates.push(Path::new(cg).join(parent).join(id));
        }
    }
    t.paths = candidates.into_iter().filter(|p| p.exists()).collect();
    t
}

/// A process's memory, pids and CPU-quota limits, from its cgroups (v2 or v1).
#[derive(Debug, Default)]
struct CgroupLimits {
    memory: Option<u64>,
    pids: Option<u64>,
    cpu_quota_us: Option<u64>,
}

fn cgroup_limits(pid: u32) -> CgroupLimits {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    let read = |path: PathBuf| -> Option<u64> {
        std::fs::read_to_string(path)
            .ok()?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    let mut limits = CgroupLimits::default();
    for line in text.lines() {
        let mut f = line.splitn(3, ':');
        let (_, controllers, path) = (f.next(), f.next().unwrap_or(""), f.next().unwrap_or(""));
        let rel = path.trim_start_matches('/');
        if controllers.is_empty() {
            let dir = Path::new("/sys/fs/cgroup").join(rel);
            limits.memory = limits.memory.or(read(dir.join("memory.max")));
            limits.pids = limits.pids.or(read(dir.join("pids.max")));
            limits.cpu_quota_us = limits.cpu_quota_us.or(read(dir.join("cpu.max")));
        }
        for c in controllers.split(',') {
            let dir = Path::new("/sys/fs/cgroup").join(c).join(rel);
            match c {
                "memory" => limits.memory = read(dir.join("memory.limit_in_bytes")),
                "pids" => limits.pids = read(dir.join("pids.max")),
                "cpu" => limits.cpu_quota_us = read(dir.join("cpu.cfs_quota_us")),
                _ => {}
            }
        }
    }
    limits
}

async fn wait_state(
    c: &DaemonClient,
    id: &str,
    want: &[&str],
    limit: Duration,
) -> serde_json::Value {
    let deadline = Instant::now() + limit;
    loop {
        let (s, v) = c
            .request(Method::GET, &format!("/v1/sandboxes/{id}"), None)
            .await
            .unwrap();
        if s == StatusCode::NOT_FOUND && want.contains(&"gone") {
            return json!({"state": "gone"});
        }
        if want.iter().any(|w| v["state"] == *w) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{id} is not {want:?} after {limit:?}: {v}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[test]
fn vm_backend_end_to_end() {
    let image = match vm_image_or_reason() {
        Ok(i) => i,
        Err(r) => return not_run("vm_backend_end_to_end", &r),
    };
    let d = vm_daemon(&[]);
    let progress = cli_template(&d, "default", &image);
    assert!(
        progress.contains("booting"),
        "the CLI shows the build's progress: {progress}"
    );
    assert!(progress.contains("snapshot"), "{progress}");

    // Create through the CLI.
    let t = Instant::now();
    let (code, out, err) = d.cli_within(
        Duration::from_secs(600),
        &["create", "--template", "default"],
        None,
    );
    assert_eq!(code, 0, "{out}{err}\n{}", d.stderr.lock().unwrap());
    let id = out.trim().to_string();
    eprintln!(
        "create from the template's snapshot: {:.2} s",
        t.elapsed().as_secs_f64()
    );

    // The jailer's cgroup limits on the sandbox's VMM, read back from the kernel.
    run_bounded(Duration::from_secs(60), async {
        let v = d
            .client()
            .call(Method::GET, &format!("/v1/sandboxes/{id}"), None)
            .await
            .unwrap();
        let pid = v["pid"].as_u64().expect("a VMM pid") as u32;
        let limits = cgroup_limits(pid);
        let mem =
            (v["memory_mib"].as_u64().unwrap() + airlockd::backend::vm::VMM_OVERHEAD_MIB) << 20;
        let vcpus = v["vcpus"].as_u64().unwrap();
        assert_eq!(limits.memory, Some(mem), "{limits:?}");
        assert_eq!(
            limits.pids,
            Some(airlockd::backend::vm::VMM_BASE_PIDS + vcpus),
            "{limits:?}"
        );
        assert_eq!(
            limits.cpu_quota_us,
            Some(vcpus * 100_000 + 50_000),
            "{limits:?}"
        );
        eprintln!("the VMM's cgroup limits: {limits:?}");
    });

    // Exec through the CLI: output and the exit code.
    let (code, out, _) = d.cli_within(
        Duration::from_secs(120),
        &["exec", &id, "--", "sh", "-c", "echo hi; uname -s; exit 7"],
        None,
    );
    assert_eq!((code, out.as_str()), (7, "hi\nLinux\n"));

    run_bounded(Duration::from_secs(1500), async {
        let c = d.client();
        // Streamed stdout and stderr apart, the exit code, the unprivileged user, env, cwd, stdin.
        let out = c
            .exec(
                &id,
                &json!({"cmd": ["sh", "-c", "cat; echo $X; pwd; id -u; echo oops >&2; exit 3"],
                "stdin": "in\n", "env": {"X": "y"}, "cwd": "/tmp"}),
            )
            .await
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "in\ny\n/tmp\n1000\n");
        assert_eq!(out.stderr, b"oops\n");
        assert_eq!(out.code, Some(3));
        assert_eq!(out.events[0]["type"], "started");
        // Output larger than one vsock window arrives whole.
        assert_eq!(
            sh(&c, &id, "head -c 600000 /dev/zero").await.stdout.len(),
            600_000
        );
        // A timeout ends the command.
        let t = Instant::now();
        let out = c
            .exec(&id, &json!({"cmd": ["sleep", "60"], "timeout_ms": 2000}))
            .await
            .unwrap();
        assert_ne!(out.code, Some(0), "{:?}", out.events);
        assert!(
            t.elapsed() < Duration::from_secs(50),
            "the timeout did not end the command"
        );
        // A PTY of the asked size.
        let out = c
            .exec(
                &id,
                &json!({"cmd": ["sh", "-c", "tty; stty size"], "pty": {"rows": 33, "cols": 101}}),
            )
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            text.contains("/dev/pts/") && text.contains("33 101"),
            "{text}"
        );
        assert_eq!(out.code, Some(0), "{text}");
        // The guest's clock is the host's (set after the restore).
        assert_clock_is_the_hosts(&c, &id).await;

        // Files: mkdir, upload, download, stat, list, remove.
        let (s, _) = checked(
            &c,
            Method::POST,
            &format!("/v1/sandboxes/{id}/files/mkdir"),
            Some(&json!({"path": "/home/sandbox/d/e"})),
        )
        .await;
        assert_eq!(s, StatusCode::CREATED);
        let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let v = c
            .upload(
                &id,
                "/home/sandbox/d/e/blob",
                airlockd::agent::bytes_body(payload.clone()),
            )
            .await
            .unwrap();
        assert_eq!(v["bytes"], 300_000);
        assert_eq!(
            c.download_bytes(&id, "/home/sandbox/d/e/blob")
                .await
                .unwrap()
                .to_vec(),
            payload
        );
        let (s, st) = checked(
            &c,
            Method::GET,
            &format!("/v1/sandboxes/{id}/files/stat?path=/home/sandbox/d/e/blob"),
            None,
        )
        .await;
        assert_eq!((s, st["size"].as_u64()), (StatusCode::OK, Some(300_000)));
        let (_, l) = checked(
            &c,
            Method::GET,
            &format!("/v1/sandboxes/{id}/files/list?path=/home/sandbox/d&depth=2"),
            None,
        )
        .await;
        assert_eq!(l["entries"].as_array().unwrap().len(), 2, "{l}");
        let (s, _) = checked(
            &c,
            Method::POST,
            &format!("/v1/sandboxes/{id}/files/remove"),
            Some(&json!({"path": "/home/sandbox/d", "recursive": true})),
        )
        .await;
        assert_eq!(s, StatusCode::OK);
        let (s, _) = checked(
            &c,
            Method::GET,
            &format!("/v1/sandboxes/{id}/files/stat?path=/home/sandbox/d"),
            None,
        )
        .await;
        assert_eq!(s, StatusCode::NOT_FOUND);

        // A background process, signalled.
        let (s, p) = checked(
            &c,
            Method::POST,
            &format!("/v1/sandboxes/{id}/processes"),
            Some(&json!({"cmd": ["sleep", "1000"]})),
        )
        .await;
        assert_eq!(s, StatusCode::CREATED, "{p}");
        let victim = p["process_id"].as_str().unwrap().to_string();
        let (s, _) = checked(
            &c,
            Method::POST,
            &format!("/v1/sandboxes/{id}/processes/{victim}/signal"),
            Some(&json!({"signal": "TERM"})),
        )
        .await;
        assert_eq!(s, StatusCode::OK);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (_, p) = checked(
                &c,
                Method::GET,
                &format!("/v1/sandboxes/{id}/processes/{victim}"),
                None,
            )
            .await;
            if p["state"] == "exited" {
                assert_eq!(p["exit"]["signal"], 15, "{p}");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "SIGTERM did not end the process: {p}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        // Pause and resume: execs are refused while paused.
        let (s, v) = checked(&c, Method::POST, &format!("/v1/sandboxes/{id}/pause"), None).await;
        assert_eq!((s, v["state"].as_str()), (StatusCode::OK, Some("paused")));
        let (s, _) = checked(
            &c,
            Method::POST,
            &format!("/v1/sandboxes/{id}/exec"),
            Some(&json!({"cmd": ["true"]})),
        )
        .await;
        assert_eq!(s, StatusCode::CONFLICT);
        let (s, _) = checked(
            &c,
            Method::POST,
            &format!("/v1/sandboxes/{id}/resume"),
            None,
        )
        .await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(sh(&c, &id, "echo back").await.stdout, b"back\n");

        // Fork a running sandbox: memory (a tmpfs file, a running process) and disk come along;
        // each fork draws different random numbers (reseeded) and keeps the host's time.
        sh(&c, &id, "echo mem > /dev/shm/m 2>/dev/null || echo mem > /tmp/m; cp /dev/shm/m /tmp/m 2>/dev/null; echo disk > /home/sandbox/d1; sync").await;
        let (_, p) = checked(
            &c,
            Method::POST,
            &format!("/v1/sandboxes/{id}/processes"),
            Some(&json!({"cmd": ["sleep", "1001"]})),
        )
        .await;
        assert!(p["process_id"].is_string(), "{p}");
        let t = Instant::now();
        let (s, f) = checked(
            &c,
            Method::POST,
            &format!("/v1/sandboxes/{id}/fork"),
            Some(&json!({"count": 2})),
        )
        .await;
        assert_eq!(s, StatusCode::CREATED, "{f}");
        eprintln!("fork of 2: {:.2} s", t.elapsed().as_secs_f64());
        let forks: Vec<String> = f["sandboxes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["id"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(forks.len(), 2, "{f}");
        let mut randoms = vec![];
        let mut generations = vec![vm_generation(&c, &id).await];
        for fid in &forks {
            generations.push(vm_generation(&c, fid).await);
            assert_eq!(sh(&c, fid, "cat /tmp/m").await.stdout, b"mem\n");
            assert_eq!(sh(&c, fid, "cat /home/sandbox/d1").await.stdout, b"disk\n");
            let ps = sh(&c, fid, "ps").await;
            assert!(
                String::from_utf8_lossy(&ps.stdout).contains("sleep 1001"),
                "the fork carries the running process: {}",
                String::from_utf8_lossy(&ps.stdout)
            );
            randoms.push(
                sh(&c, fid, "head -c 16 /dev/urandom | od -An -tx1")
                    .await
                    .stdout,
            );
            assert_clock_is_the_hosts(&c, fid).await;
        }
        assert_ne!(
            randoms[0], randoms[1],
            "two forks drew the same random numbers"
        );
        eprintln!("VM generations (parent, forks): {generations:?}");
        for (i, g) in generations.iter().enumerate() {
            assert!(
                !generations[..i].contains(g),
                "a fork kept a VM generation: {generations:?}"
            );
        }
        // Forks are independent.
        sh(&c, &forks[0], "echo changed > /home/sandbox/d1").await;
        assert_eq!(
            sh(&c, &forks[1], "cat /home/sandbox/d1").await.stdout,
            b"disk\n"
        );

        // Snapshot into a new template, and a sandbox from it.
        let (s, snap) = checked(
            &c,
            Method::POST,
            &format!("/v1/sandboxes/{id}/snapshot"),
            Some(&json!({"template": "mine"})),
        )
        .await;
        assert_eq!(s, StatusCode::CREATED, "{snap}");
        let from_snap = create(&c, json!({"template": "mine"})).await;
        assert_eq!(
            sh(&c, &from_snap, "cat /home/sandbox/d1").await.stdout,
            b"disk\n"
        );

        // Kill keeps the record; rm forgets it and leaves nothing behind.
        let (s, v) = checked(
            &c,
            Method::POST,
            &format!("/v1/sandboxes/{}/kill", forks[1]),
            None,
        )
        .await;
        assert_eq!((s, v["state"].as_str()), (StatusCode::OK, Some("stopped")));
        for sid in [&forks[0], &forks[1], &from_snap] {
            let (s, _) = checked(&c, Method::DELETE, &format!("/v1/sandboxes/{sid}"), None).await;
            assert_eq!(s, StatusCode::OK);
            assert_eq!(
                traces(&d, sid, None),
                Traces::default(),
                "{sid} left traces behind"
            );
        }
        let (s, _) = checked(&c, Method::DELETE, "/v1/templates/mine", None).await;
        assert_eq!(s, StatusCode::OK);
    });
    // rm through the CLI.
    let (code, _, err) = d.cli(&["rm", &id], None);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        traces(&d, &id, None),
        Traces::default(),
        "{id} left traces behind"
    );
}

/// A running VM sandbox survives a daemon restart (SIGKILL of the daemon, then a new one on the
/// same state): its VM, memory and files are still there.
#[test]
fn vm_sandbox_survives_a_daemon_restart() {
    let image = match vm_image_or_reason() {
        Ok(i) => i,
        Err(r) => return not_run("vm_sandbox_survives_a_daemon_restart", &r),
    };
    let mut d = vm_daemon(&[]);
    cli_template(&d, "default", &image);
    let id = run_bounded_value(Duration::from_secs(600), async {
        let c = d.client();
        let id = create(&c, json!({"template": "default"})).await;
        sh(&c, &id, "echo kept > /tmp/k").await;
        id
    });
    d.stop(libc::SIGKILL);
    d.restart();
    run_bounded(Duration::from_secs(600), async {
        let c = d.client();
        assert_eq!(
            sh(&c, &id, "cat /tmp/k").await.stdout,
            b"kept\n",
            "the sandbox lost its memory over the restart"
        );
        let (s, _) = checked(&c, Method::DELETE, &format!("/v1/sandboxes/{id}"), None).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(
            traces(&d, &id, None),
            Traces::default(),
            "{id} left traces behind"
        );
    });
}

/// `timeout_s` and `idle_timeout_s` end VM sandboxes, and nothing of them is left.
#[test]
fn vm_sandboxes_time_out() {
    let image = match vm_image_or_reason() {
        Ok(i) => i,
        Err(r) => return not_run("vm_sandboxes_time_out", &r),
    };
    let d = vm_daemon(&[]);
    cli_template(&d, "default", &image);
    run_bounded(Duration::from_secs(600), async {
        let c = d.client();
        let timed = create(&c, json!({"template": "default", "timeout_s": 5})).await;
        let idle = create(&c, json!({"template": "default", "idle_timeout_s": 5})).await;
        for (sid, reason) in [(&timed, "timeout"), (&idle, "idle timeout")] {
            let v = wait_state(&c, sid, &["stopped", "gone"], Duration::from_secs(120)).await;
            eprintln!("{sid}: {v}");
            if v["state"] == "stopped" {
                assert_eq!(v["state_reason"], reason, "{v}");
            }
            assert_eq!(
                traces(&d, sid, None),
                Traces::default(),
                "{sid} left traces behind"
            );
        }
    });
}

/// A sandbox with `network: true` gets its TAP and reaches the host through it; removing it
/// removes the TAP.
#[test]
fn vm_network_sandbox_reaches_its_tap() {
    let image = match vm_image_or_reason() {
        Ok(i) => i,
        Err(r) => return not_run("vm_network_sandbox_reaches_its_tap", &r),
    };
    let d = vm_daemon(&[]);
    cli_template(&d, "default", &image);
    run_bounded(Duration::from_secs(900), async {
        let c = d.client();
        let net = c
            .call(
                Method::POST,
                "/v1/sandboxes",
                Some(&json!({"template": "default", "network": true})),
            )
            .await
            .unwrap_or_else(|e| panic!("network sandbox: {e}\n{}", d.stderr.lock().unwrap()));
        let net_id = net["id"].as_str().unwrap().to_string();
        let rec = c
            .call(Method::GET, &format!("/v1/sandboxes/{net_id}"), None)
            .await
            .unwrap();
        let tap = rec["tap"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| panic!("no TAP in {rec}"));
        assert!(Path::new("/sys/class/net").join(&tap).exists());
        // The TAP's address on the host is the guest's gateway.
        let ip = std::process::Command::new("ip")
            .args(["-4", "-o", "addr", "show", "dev", &tap])
            .output()
            .expect("ip(8)");
        let text = String::from_utf8_lossy(&ip.stdout).to_string();
        let host_ip = text
            .split_whitespace()
            .skip_while(|w| *w != "inet")
            .nth(1)
            .and_then(|a| a.split('/').next())
            .unwrap_or_else(|| panic!("no address on {tap}: {text}"))
            .to_string();
        let ping = c
            .exec(
                &net_id,
                &json!({"cmd": ["ping", "-c", "1", "-W", "20", &host_ip], "uid": 0}),
            )
            .await
            .unwrap();
        assert_eq!(
            ping.code,
            Some(0),
            "the guest cannot reach {host_ip}: {}{}",
            String::from_utf8_lossy(&ping.stdout),
            String::from_utf8_lossy(&ping.stderr)
        );
        let (s, _) = checked(&c, Method::DELETE, &format!("/v1/sandboxes/{net_id}"), None).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(
            traces(&d, &net_id, Some(&tap)),
            Traces::default(),
            "{net_id} left traces behind"
        );
    });
}

/// A guest that panics and a VMM killed mid-exec are reported with their reason and freed; a
/// template whose agent never answers fails with the wait's reason and leaves nothing.
#[test]
fn vm_failures_are_reported_and_nothing_leaks() {
    let image = match vm_image_or_reason() {
        Ok(i) => i,
        Err(r) => return not_run("vm_failures_are_reported_and_nothing_leaks", &r),
    };
    let d = vm_daemon(&[]);
    cli_template(&d, "default", &image);
    run_bounded(Duration::from_secs(900), async {
        let c = d.client();
        // A kernel panic: the guest reboots, the VMM exits, the sandbox is failed with a reason.
        let id = create(&c, json!({"template": "default"})).await;
        let _ = c
            .exec(
                &id,
                &json!({"cmd": ["sh", "-c", "echo c > /proc/sysrq-trigger"], "uid": 0}),
            )
            .await;
        let v = wait_state(&c, &id, &["failed"], Duration::from_secs(120)).await;
        let reason = v["state_reason"].as_str().unwrap_or_default().to_string();
        assert!(reason.contains("exited") || reason.contains("panic"), "{v}");
        eprintln!("guest panic reported as: {reason}");
        assert_eq!(
            traces(&d, &id, None),
            Traces::default(),
            "{id} left traces behind"
        );

        // SIGKILL of the VMM during a streaming exec.
        let id = create(&c, json!({"template": "default"})).await;
        let pid = c
            .call(Method::GET, &format!("/v1/sandboxes/{id}"), None)
            .await
            .unwrap();
        let exec = {
            let c = c.clone();
            let id = id.clone();
            tokio::spawn(async move {
                c.exec(
                    &id,
                    &json!({"cmd": ["sh", "-c", "while true; do echo tick; sleep 0.2; done"]}),
                )
                .await
            })
        };
        tokio::time::sleep(Duration::from_secs(3)).await;
        let vmm_pids: Vec<i32> = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
                let text = String::from_utf8_lossy(&cmd).replace('\0', " ");
                (text.contains("airlock-vmm") && text.contains(&id) && !text.contains("jailer"))
                    .then(|| e.file_name().to_string_lossy().parse().ok())
                    .flatten()
            })
            .collect();
        assert!(!vmm_pids.is_empty(), "no VMM process found for {id}: {pid}");
        for p in &vmm_pids {
            // SAFETY: kill(2) on the sandbox's VMM, found by its command line just now.
            unsafe { libc::kill(*p, libc::SIGKILL) };
        }
        let ended = tokio::time::timeout(Duration::from_secs(60), exec).await;
        assert!(ended.is_ok(), "the exec did not end when its VMM died");
        let v = wait_state(&c, &id, &["failed"], Duration::from_secs(60)).await;
        assert!(
            v["state_reason"]
                .as_str()
                .unwrap_or_default()
                .contains("exited"),
            "{v}"
        );
        assert_eq!(
            traces(&d, &id, None),
            Traces::default(),
            "{id} left traces behind"
        );

        // A guest that cannot boot (its init does not exist: the initrd reboots it): the build
        // fails at once with that reason, not after the agent timeout.
        let t = Instant::now();
        let (s, e) = checked(
            &c,
            Method::POST,
            "/v1/templates",
            Some(&json!({"name": "noinit", "image": image, "boot_args": "init=/nonexistent"})),
        )
        .await;
        assert_eq!(s, StatusCode::BAD_GATEWAY, "{e}");
        assert!(
            e["error"]
                .as_str()
                .unwrap()
                .contains("exited before the agent answered"),
            "{e}"
        );
        assert!(
            t.elapsed() < Duration::from_secs(300),
            "the failed boot took {:?}",
            t.elapsed()
        );
        assert!(!d.state_dir.join("jail/airlock-vmm/tpl-noinit").exists());
    });
    drop(d);

    // An agent that never answers (init is a shell waiting on the console): the build fails
    // when the daemon's --agent-ready-timeout-s runs out, naming the option, and leaves nothing.
    let d = DaemonUnderTest::start_vm(&["--agent-ready-timeout-s", "90"]);
    run_bounded(Duration::from_secs(600), async {
        let c = d.client();
        let (s, e) = checked(
            &c,
            Method::POST,
            "/v1/templates",
            Some(&json!({"name": "silent", "image": image, "boot_args": "init=/bin/sh"})),
        )
        .await;
        assert_eq!(s, StatusCode::BAD_GATEWAY, "{e}");
        let msg = e["error"].as_str().unwrap();
        assert!(
            msg.contains("did not become ready") && msg.contains("--agent-ready-timeout-s"),
            "{e}"
        );
        assert!(
            !d.state_dir.join("jail/airlock-vmm/tpl-silent").exists(),
            "the jail is left"
        );
        let left: Vec<String> = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .filter(|c| c.contains("airlock-vmm") && c.contains("tpl-silent"))
            .collect();
        assert!(left.is_empty(), "VMM processes left: {left:?}");
    });
}

/// A restored VM's clock is set from the host's: within 10 s of it.
async fn assert_clock_is_the_hosts(c: &DaemonClient, id: &str) {
    let out = sh(c, id, "date +%s").await;
    let guest_now: u64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|e| {
            panic!(
                "{id}: `date +%s` gave no number ({e}): exit {:?}, signal {:?}, error {:?}, stderr {:?}, events {:?}",
                out.code,
                out.signal,
                out.error,
                String::from_utf8_lossy(&out.stderr),
                out.events
            )
        });
    let host_now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        host_now.abs_diff(guest_now) <= 10,
        "{id}: guest clock {guest_now}, host {host_now}"
    );
}

/// The VM generation register (MMIO 0xd0000010, 16 bytes, new and random after every restore),
/// read by the guest's root with busybox devmem.
async fn vm_generation(c: &DaemonClient, id: &str) -> String {
    let out = c
        .exec(id, &json!({"cmd": ["sh", "-c",
            "for a in 0xd0000010 0xd0000014 0xd0000018 0xd000001c; do devmem $a 32; done"], "uid": 0}))
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    assert_eq!(
        out.code,
        Some(0),
        "devmem: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_ne!(
        text, "0x00000000 0x00000000 0x00000000 0x00000000",
        "a restored VM has generation 0"
    );
    text
}

/// Like run_bounded, returning the future's value.
fn run_bounded_value<T, F: std::future::Future<Output = T>>(limit: Duration, body: F) -> T {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        tokio::time::timeout(limit, body)
            .await
            .unwrap_or_else(|_| panic!("test body did not finish within {limit:?}"))
    })
}
