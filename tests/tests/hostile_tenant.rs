//! Issue 13: escapes found by attacking the namespace backend as sandboxed code (uid 1000) and as
//! an API client, one regression test per row that applies here. Each failed before its fix.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use airlock_tests::daemon::*;
use serde_json::json;

/// The default template, and one sandbox of it.
async fn default_sandbox(c: &DaemonClient) -> String {
    make_template(c, "default").await;
    create(c, json!({"template": "default"})).await
}

/// Rows 1, 5, 6: the daemon hands out no root, builds templates only from its image
/// directories, keeps its state private, and the sandbox's kernel knobs are read-only.
#[test]
fn the_daemon_hands_out_no_host_privilege() {
    if skip_if_unsupported("the_daemon_hands_out_no_host_privilege") {
        return;
    }
    let d = DaemonUnderTest::start(&[]);
    run_bounded(Duration::from_secs(90), async {
        let c = d.client();
        let id = default_sandbox(&c).await;

        // Row 1: uid 0 or gid 0 is refused (it was host root), for exec and for processes.
        for (path, body) in [
            ("exec", json!({"cmd": ["id", "-u"], "uid": 0})),
            ("exec", json!({"cmd": ["id", "-u"], "gid": 0})),
            ("processes", json!({"cmd": ["sleep", "1"], "uid": 0})),
        ] {
            let (s, v) = checked(
                &c,
                Method::POST,
                &format!("/v1/sandboxes/{id}/{path}"),
                Some(&body),
            )
            .await;
            assert_eq!(s, StatusCode::FORBIDDEN, "{path} {body}: {v}");
        }
        // /proc/sys and friends are read-only mounts in the sandbox: core_pattern cannot be set
        // even by a process that somehow held root there.
        let out = sh(
            &c,
            &id,
            "for m in /proc/sys /proc/sysrq-trigger; do [ -e $m ] || echo $m absent; awk -v m=$m '$2 == m {print m, substr($4, 1, 2)}' /proc/mounts; done",
        )
        .await;
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("/proc/sys ro"), "{text}");
        // (Some kernels, this host's among them, have no sysrq-trigger.)
        assert!(
            text.contains("/proc/sysrq-trigger ro") || text.contains("/proc/sysrq-trigger absent"),
            "{text}"
        );

        // Row 5: a template from an arbitrary host directory (it has bin/) is refused.
        let (s, v) = checked(
            &c,
            Method::POST,
            "/v1/templates",
            Some(&json!({"name": "host-usr", "image": "/usr"})),
        )
        .await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
        assert!(
            v["error"].as_str().unwrap_or("").contains("--image-dir"),
            "{v}"
        );
    });
    // Row 6: the state dir (sandboxes' upper directories, setuid files a tenant left) is root's.
    let mode = std::fs::metadata(&d.state_dir)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o700, "state dir mode {mode:o}");
}

/// Rows 2, 8, 9, 12: the file API acts as the sandbox user, so a tenant's symbolic links lead
/// only where the tenant could go; uploads are the user's own files, made without a chown by
/// name; a FIFO is refused at once; a missing cwd is named.
#[test]
fn the_file_api_follows_no_tenant_link_into_root_files() {
    if skip_if_unsupported("the_file_api_follows_no_tenant_link_into_root_files") {
        return;
    }
    let d = DaemonUnderTest::start(&[]);
    run_bounded(Duration::from_secs(90), async {
        let c = d.client();
        let id = default_sandbox(&c).await;
        let out = sh(
            &c,
            &id,
            "cd /home/sandbox && ln -s /usr/bin ubin && ln -s /etc etcl && mkfifo fifo && echo ok",
        )
        .await;
        assert_eq!(String::from_utf8_lossy(&out.stdout), "ok\n", "{out:?}");

        // Row 8: an upload through a link into a root-owned directory is refused...
        let up = c
            .upload(
                &id,
                "/home/sandbox/ubin/evilcmd",
                airlockd::agent::bytes_body(b"#!/bin/sh\necho pwned\n".to_vec()),
            )
            .await;
        assert!(up.is_err(), "upload through a planted link: {up:?}");
        // ...and so is removing a root file through one.
        let (s, v) = checked(
            &c,
            Method::POST,
            &format!("/v1/sandboxes/{id}/files/remove"),
            Some(&json!({"path": "/home/sandbox/etcl/passwd"})),
        )
        .await;
        assert!(
            s.is_client_error(),
            "remove through a planted link: {s} {v}"
        );
        let out = sh(
            &c,
            &id,
            "test -e /usr/bin/evilcmd && echo made; test -e /etc/passwd && echo kept",
        )
        .await;
        assert_eq!(String::from_utf8_lossy(&out.stdout), "kept\n");

        // Row 2: an upload is the sandbox user's own file, and no temporary is left behind.
        c.upload(
            &id,
            "/home/sandbox/mine",
            airlockd::agent::bytes_body(b"data".to_vec()),
        )
        .await
        .unwrap();
        let out = sh(
            &c,
            &id,
            "stat -c '%u %g' /home/sandbox/mine; ls -a /home/sandbox | grep -c airlock",
        )
        .await;
        assert_eq!(String::from_utf8_lossy(&out.stdout), "1000 1000\n0\n");

        // Row 9: a FIFO is refused at once, not waited on.
        let started = std::time::Instant::now();
        let got = c.download_bytes(&id, "/home/sandbox/fifo").await;
        let e = got.expect_err("a FIFO was read");
        assert!(e.to_string().contains("not a regular file"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(10));

        // Row 12: a missing cwd is named, not "cannot start".
        let (s, v) = checked(
            &c,
            Method::POST,
            &format!("/v1/sandboxes/{id}/exec"),
            Some(&json!({"cmd": ["pwd"], "cwd": "/nowhere"})),
        )
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
        assert!(v["error"].as_str().unwrap_or("").contains("cwd"), "{v}");
    });
}

/// Rows 4 and 10: a timeout ends everything the command started, a child that left its process
/// group with `setsid` included (each process has a cgroup of its own, killed whole).
#[test]
fn a_timeout_ends_the_whole_process_tree() {
    if skip_if_unsupported("a_timeout_ends_the_whole_process_tree") {
        return;
    }
    let d = DaemonUnderTest::start(&[]);
    run_bounded(Duration::from_secs(90), async {
        let c = d.client();
        let id = default_sandbox(&c).await;
        let out = c
            .exec(
                &id,
                &json!({"cmd": ["sh", "-c",
                    "setsid sh -c 'echo $$ > /tmp/escaped; exec sleep 300' </dev/null >/dev/null 2>&1 & sleep 300"],
                    "timeout_ms": 1500}),
            )
            .await
            .unwrap();
        let exit = out.events.last().unwrap();
        assert_eq!(exit["timed_out"], true, "{exit}");
        // The escaped child is gone within a few seconds of the timeout.
        let mut alive = String::new();
        for _ in 0..50 {
            let out = sh(
                &c,
                &id,
                "kill -0 $(cat /tmp/escaped) 2>/dev/null && echo alive",
            )
            .await;
            alive = String::from_utf8_lossy(&out.stdout).into_owned();
            if alive.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(alive, "", "the setsid child outlived the timeout");
    });
}

/// Row 12: `airlock health | head -c 1` ends quietly when its reader goes away (it panicked on
/// the broken pipe).
#[test]
fn the_cli_ends_quietly_on_a_closed_pipe() {
    if skip_if_unsupported("the_cli_ends_quietly_on_a_closed_pipe") {
        return;
    }
    let d = DaemonUnderTest::start(&[]);
    let bin = airlock_tests::workspace_bin("airlock");
    // `health` prints several lines; the reader takes one byte and leaves.
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "for i in 1 2 3 4 5 6 7 8; do {} health; done | head -c 1 >/dev/null",
            bin.display()
        ))
        .env("AIRLOCK_SOCKET", &d.socket)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// Issue 13, "snapshots and forks reinstall the agent": a tenant who can write where a template
/// once kept its agent (here `/.airlock`, left writable by its image) replaces it with a script,
/// snapshots the sandbox and starts a fork. The fork must run the daemon's own agent, not the
/// script: before the fix the script ran as the fork's PID 1, with root's kept capabilities.
#[test]
fn a_fork_runs_the_daemons_agent_not_the_tenants() {
    if skip_if_unsupported("a_fork_runs_the_daemons_agent_not_the_tenants") {
        return;
    }
    let base = test_rootfs().expect("a root filesystem");
    let image = std::env::temp_dir().join(format!("airlock-tamper-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&image);
    let copied = std::process::Command::new("cp")
        .arg("-a")
        .arg(&base)
        .arg(&image)
        .status()
        .unwrap();
    assert!(copied.success(), "cp -a {}", base.display());
    std::fs::create_dir_all(image.join(".airlock")).unwrap();
    std::os::unix::fs::chown(image.join(".airlock"), Some(1000), Some(1000)).unwrap();

    let d = DaemonUnderTest::start(&[]);
    run_bounded(Duration::from_secs(120), async {
        let c = d.client();
        c.call(
            Method::POST,
            "/v1/templates",
            Some(&json!({"name": "writable-airlock", "image": image})),
        )
        .await
        .expect("template");
        let id = create(&c, json!({"template": "writable-airlock"})).await;
        let out = sh(
            &c,
            &id,
            "id -u; rm -f /.airlock/airlock-agent; printf '#!/bin/sh\\necho planted > /planted\\nexec sleep 600\\n' > /.airlock/airlock-agent && chmod 755 /.airlock/airlock-agent && echo replaced",
        )
        .await;
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("1000\nreplaced"), "{text} {:?}", out);

        let (s, v) = checked(
            &c,
            Method::POST,
            &format!("/v1/sandboxes/{id}/snapshot"),
            Some(&json!({"template": "tampered"})),
        )
        .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        let (s, v) = checked(
            &c,
            Method::POST,
            "/v1/sandboxes",
            Some(&json!({"template": "tampered"})),
        )
        .await;
        assert_eq!(s, StatusCode::CREATED, "the fork did not start: {v}");
        let fork = v["id"].as_str().unwrap().to_string();
        let out = sh(
            &c,
            &fork,
            "[ -e /planted ] && echo planted || echo clean; head -c 9 /.airlock/airlock-agent",
        )
        .await;
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.starts_with("clean\n#!/bin/sh"), "{text}");
    });
    let _ = std::fs::remove_dir_all(&image);
}

/// Row 3: the sandbox's own limits (memory, tasks, CPU) were bind-mounted read-write into it, so
/// its root could lift them; the parent `airlock` cgroup had none. Here the host's root stands
/// in for a tenant who got root in the sandbox: in the sandbox's mount namespace it writes
/// "unlimited" into every limit the sandbox can see. The sandbox's limits, which now live one
/// level up where the sandbox cannot see them, stay as they were; the parent holds the host
/// share.
#[test]
fn sandbox_root_cannot_lift_its_own_limits() {
    if skip_if_unsupported("sandbox_root_cannot_lift_its_own_limits") {
        return;
    }
    let d = DaemonUnderTest::start(&[]);
    run_bounded(Duration::from_secs(90), async {
        let c = d.client();
        make_template(&c, "default").await;
        let id = create(&c, json!({"template": "default", "memory_mib": 128})).await;
        let cg = std::path::Path::new("/sys/fs/cgroup");
        let v1 = cg.join("pids/airlock").join(&id).is_dir();
        // (limit file on the host, the same knob as the sandbox sees it, "unlimited")
        let knobs: Vec<(std::path::PathBuf, &str, &str)> = if v1 {
            let at = |c: &str, f: &str| cg.join(c).join("airlock").join(&id).join(f);
            vec![
                (
                    at("memory", "memory.limit_in_bytes"),
                    "/sys/fs/cgroup/memory/memory.limit_in_bytes",
                    "-1",
                ),
                (
                    at("pids", "pids.max"),
                    "/sys/fs/cgroup/pids/pids.max",
                    "max",
                ),
                (
                    at("cpu", "cpu.cfs_quota_us"),
                    "/sys/fs/cgroup/cpu/cpu.cfs_quota_us",
                    "-1",
                ),
            ]
        } else {
            let at = |f: &str| cg.join("airlock").join(&id).join(f);
            vec![
                (at("memory.max"), "/sys/fs/cgroup/memory.max", "max"),
                (at("pids.max"), "/sys/fs/cgroup/pids.max", "max"),
                (at("cpu.max"), "/sys/fs/cgroup/cpu.max", "max"),
            ]
        };
        let before: Vec<String> = knobs
            .iter()
            .map(|(host, _, _)| std::fs::read_to_string(host).unwrap())
            .collect();
        assert_eq!(before[0].trim(), (128u64 << 20).to_string());

        // A process of the sandbox, to enter its mount namespace through.
        let procs = if v1 {
            cg.join("freezer/airlock").join(&id).join("cgroup.procs")
        } else {
            cg.join("airlock")
                .join(&id)
                .join("sandbox/agent/cgroup.procs")
        };
        let pid = std::fs::read_to_string(&procs).unwrap();
        let pid = pid.lines().next().expect("a process in the sandbox").trim();
        let script: String = knobs
            .iter()
            .map(|(_, inside, unlimited)| format!("echo {unlimited} > {inside}; "))
            .collect();
        let out = std::process::Command::new("nsenter")
            .args(["-t", pid, "-m", "--", "sh", "-c", &script])
            .output()
            .unwrap();
        // (Whether each write takes or is refused does not matter: only where it lands.)
        let _ = out;
        for ((host, inside, _), was) in knobs.iter().zip(&before) {
            let now = std::fs::read_to_string(host).unwrap();
            assert_eq!(&now, was, "{} changed through {inside}", host.display());
        }

        // The parent holds the host share: neither memory nor tasks are unlimited.
        let (mem, pids) = if v1 {
            (
                cg.join("memory/airlock/memory.limit_in_bytes"),
                cg.join("pids/airlock/pids.max"),
            )
        } else {
            (cg.join("airlock/memory.max"), cg.join("airlock/pids.max"))
        };
        let mem: u64 = std::fs::read_to_string(mem)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let total_kib: u64 = std::fs::read_to_string("/proc/meminfo")
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap();
        assert!(mem < total_kib << 10, "airlock memory limit {mem}");
        let pids = std::fs::read_to_string(pids).unwrap();
        assert_ne!(pids.trim(), "max");
    });
}

/// Row 10, first half: a client that disconnects while its command prints nothing was not
/// noticed: the exec stayed `running`, kept the sandbox busy, and `idle_timeout_s` never fired.
/// Now the daemon notices the closed connection, the agent ends the command, and the idle
/// timeout stops the sandbox.
#[test]
fn a_silent_exec_whose_client_left_ends() {
    use std::io::{Read, Write};
    if skip_if_unsupported("a_silent_exec_whose_client_left_ends") {
        return;
    }
    let d = DaemonUnderTest::start(&[]);
    run_bounded(Duration::from_secs(90), async {
        let c = d.client();
        make_template(&c, "default").await;
        let id = create(&c, json!({"template": "default", "idle_timeout_s": 3})).await;
        let mut conn = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
        let body = json!({"cmd": ["sleep", "300"]}).to_string();
        write!(
            conn,
            "POST /v1/sandboxes/{id}/exec HTTP/1.1\r\nHost: airlock\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut head = [0u8; 512];
        let n = conn.read(&mut head).unwrap();
        let head = String::from_utf8_lossy(&head[..n]).to_string();
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");

        // While the client waits, the silent command keeps the sandbox busy past its idle
        // timeout.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let (_, v) = checked(&c, Method::GET, &format!("/v1/sandboxes/{id}"), None).await;
        assert_eq!(v["state"], "running", "{v}");

        drop(conn);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let (_, v) = checked(&c, Method::GET, &format!("/v1/sandboxes/{id}"), None).await;
            if v["state"] == "stopped" {
                assert_eq!(v["state_reason"], "idle timeout", "{v}");
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "20 s after its client left, the silent exec still holds the sandbox: {v}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    });
}

/// The host uid of a sandbox's agent (its PID 1), from /proc on the host.
async fn agent_host_uid(c: &DaemonClient, id: &str) -> u32 {
    let v = c
        .call(Method::GET, &format!("/v1/sandboxes/{id}"), None)
        .await
        .unwrap();
    let pid = v["pid"].as_i64().expect("a running sandbox's pid");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .and_then(|euid| euid.parse().ok())
        .expect("an effective uid")
}

/// Rows 1 and 7: every sandbox ran as host uid 1000 (root as host root), so per-user kernel
/// limits were shared: 128 inotify instances in one sandbox gave the next EMFILE. Each sandbox
/// is now root of a user namespace whose ids are a host range of its own; with the operator's
/// leave (`--allow-guest-root`) a client may run as that root, which is not host root.
#[test]
fn each_sandbox_is_a_host_user_of_its_own() {
    if skip_if_unsupported("each_sandbox_is_a_host_user_of_its_own") {
        return;
    }
    let d = DaemonUnderTest::start(&["--allow-guest-root"]);
    run_bounded(Duration::from_secs(150), async {
        let c = d.client();
        let a = default_sandbox(&c).await;
        let b = create(&c, json!({"template": "default"})).await;
        let (ua, ub) = (agent_host_uid(&c, &a).await, agent_host_uid(&c, &b).await);
        assert!(ua != 0 && ua != 1000, "sandbox {a}'s root is host uid {ua}");
        assert!(ub != 0 && ub != 1000, "sandbox {b}'s root is host uid {ub}");
        assert!(ua.abs_diff(ub) >= 65536, "ranges overlap: {ua}, {ub}");

        // Inside: the sandbox user is 1000 and its root is 0, mapped to the range.
        let out = sh(&c, &a, "id -u; cat /proc/self/uid_map").await;
        let text = String::from_utf8_lossy(&out.stdout);
        let words: Vec<&str> = text.split_whitespace().collect();
        assert_eq!(
            words,
            ["1000", "0", &ua.to_string(), "65536"],
            "id -u and the uid map"
        );
        let root = c
            .exec(
                &a,
                &json!({"cmd": ["sh", "-c",
                    "id -u; touch /etc/made-by-root && chown 1000:1000 /etc/made-by-root && echo owns-its-tree; \
                     echo '|/tmp/x' > /proc/sys/kernel/core_pattern 2>/dev/null || echo core_pattern-refused; \
                     hostname evil 2>/dev/null || echo hostname-refused"],
                    "uid": 0, "gid": 0}),
            )
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&root.stdout);
        for want in [
            "0\n",
            "owns-its-tree",
            "core_pattern-refused",
            "hostname-refused",
        ] {
            assert!(text.contains(want), "{want:?} not in {text}");
        }
        let pattern = std::fs::read_to_string("/proc/sys/kernel/core_pattern").unwrap();
        assert!(!pattern.contains("/tmp/x"), "{pattern}");
        // What sandbox root made is its own, not the host's, seen from the host.
        let upper = d
            .state_dir
            .join("sandboxes")
            .join(&a)
            .join("upper/etc/made-by-root");
        {
            use std::os::unix::fs::MetadataExt;
            let m = std::fs::symlink_metadata(&upper).unwrap();
            assert_eq!(m.uid(), ua + 1000, "{}", upper.display());
        }
        // A snapshot holds the ids the sandbox saw; a fork of it sees them as its own.
        let (s, v) = checked(
            &c,
            Method::POST,
            &format!("/v1/sandboxes/{a}/snapshot"),
            Some(&json!({"template": "from-a"})),
        )
        .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        {
            use std::os::unix::fs::MetadataExt;
            let copied = d.state_dir.join("templates/from-a/rootfs/etc/made-by-root");
            let m = std::fs::symlink_metadata(&copied).unwrap();
            assert_eq!((m.uid(), m.gid()), (1000, 1000), "{}", copied.display());
        }
        let fork = create(&c, json!({"template": "from-a"})).await;
        let uf = agent_host_uid(&c, &fork).await;
        assert!(
            uf != ua && uf != ub && uf != 0,
            "fork's root is host uid {uf}"
        );
        let out = sh(
            &c,
            &fork,
            "stat -c %u:%g /etc/made-by-root; stat -c %u /etc/passwd",
        )
        .await;
        assert_eq!(String::from_utf8_lossy(&out.stdout), "1000:1000\n0\n");
        // rm frees the fork's range; the others stay claimed.
        let ranges = || {
            std::fs::read_dir(d.state_dir.join("uid-ranges"))
                .unwrap()
                .count()
        };
        assert_eq!(ranges(), 3);
        c.call(Method::DELETE, &format!("/v1/sandboxes/{fork}"), None)
            .await
            .unwrap();
        assert_eq!(ranges(), 2);

        // Row 7 itself: A's sandbox user holds every inotify instance it can get; B's still
        // gets one. (Python, for inotify_init: the default image's busybox has no inotify tool.)
        let python = airlock_tests::repo_root().join("images/out/python");
        if !python.join("rootfs").is_dir() {
            eprintln!(
                "NOT RUN each_sandbox_is_a_host_user_of_its_own (inotify half): images/out/python is not built (bash images/build.sh python)"
            );
            return;
        }
        c.call(
            Method::POST,
            "/v1/templates",
            Some(&json!({"name": "python", "image": python})),
        )
        .await
        .unwrap();
        let pa = create(&c, json!({"template": "python"})).await;
        let pb = create(&c, json!({"template": "python"})).await;
        let hog = "import ctypes, time\n\
                   libc = ctypes.CDLL(None)\n\
                   held = [fd for fd in (libc.inotify_init() for _ in range(300)) if fd >= 0]\n\
                   print(len(held), flush=True)\n\
                   time.sleep(8)\n";
        let probe = "import ctypes; print(ctypes.CDLL(None).inotify_init())";
        let hog_body = json!({"cmd": ["python3", "-c", hog]});
        let (held, other) = tokio::join!(c.exec(&pa, &hog_body), async {
            tokio::time::sleep(Duration::from_secs(4)).await;
            c.exec(&pb, &json!({"cmd": ["python3", "-c", probe]})).await
        });
        let held: u32 = String::from_utf8_lossy(&held.unwrap().stdout)
            .trim()
            .parse()
            .expect("the hog's count");
        assert!(held < 300, "sandbox {pa} was not limited at all ({held})");
        let other = other.unwrap();
        let fd: i32 = String::from_utf8_lossy(&other.stdout)
            .trim()
            .parse()
            .unwrap_or(-1);
        assert!(
            fd >= 0,
            "sandbox {pb} got no inotify instance while {pa} held {held}: {}",
            String::from_utf8_lossy(&other.stderr)
        );
    });
}
