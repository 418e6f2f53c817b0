//! The `airlock` CLI against a real airlockd (namespace backend).

use airlock_tests::daemon::*;

#[test]
fn cli_drives_the_daemon() {
    if skip_if_unsupported("cli_drives_the_daemon") {
        return;
    }
    let d = DaemonUnderTest::start(&[]);
    let rootfs = test_rootfs().unwrap();
    let (code, out, err) = d.cli(
        &["templates", "create", "default", rootfs.to_str().unwrap()],
        None,
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "default");
    assert!(
        err.contains("[default] copying the root filesystem"),
        "progress is shown: {err}"
    );
    let (code, out, _) = d.cli(&["templates"], None);
    assert_eq!(code, 0);
    assert!(
        out.contains("default") && out.contains("namespace"),
        "{out}"
    );

    let (code, id, err) = d.cli(&["create", "--label", "who=cli", "--env", "A=1"], None);
    assert_eq!(code, 0, "{err}");
    let id = id.trim().to_string();
    assert!(
        id.starts_with("sb-") && !id.contains('\n'),
        "create prints the id alone: {id:?}"
    );

    let (code, out, err) = d.cli(
        &[
            "exec",
            &id,
            "--",
            "sh",
            "-c",
            "echo $A; echo e >&2; exit 42",
        ],
        None,
    );
    assert_eq!((code, out.as_str(), err.as_str()), (42, "1\n", "e\n"));
    let (code, out, _) = d.cli(
        &["exec", "-i", &id, "--", "tr", "a-z", "A-Z"],
        Some(b"shout"),
    );
    assert_eq!((code, out.as_str()), (0, "SHOUT"));
    let (code, _, err) = d.cli(&["exec", &id, "--", "no-such-program"], None);
    assert_eq!(code, 127, "{err}");
    let (code, out, _) = d.cli(&["--json", "exec", &id, "--", "true"], None);
    assert_eq!(code, 0);
    let last: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(last["type"], "exit");

    // cp both ways.
    let local = d.dir.join("up.txt");
    std::fs::write(&local, "via cp\n").unwrap();
    let (code, _, err) = d.cli(
        &[
            "cp",
            local.to_str().unwrap(),
            &format!("{id}:/home/sandbox/up.txt"),
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let back = d.dir.join("down.txt");
    let (code, _, err) = d.cli(
        &[
            "cp",
            &format!("{id}:/home/sandbox/up.txt"),
            back.to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(std::fs::read_to_string(&back).unwrap(), "via cp\n");
    let (code, _, err) = d.cli(&["cp", &format!("{id}:/home/../etc/passwd"), "-"], None);
    assert_ne!(code, 0);
    assert!(err.contains(".."), "{err}");

    let (code, out, _) = d.cli(&["ls", "--label", "who=cli"], None);
    assert_eq!(code, 0);
    assert!(out.contains(&id) && out.contains("running"), "{out}");
    let (code, out, _) = d.cli(&["--json", "ls"], None);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["sandboxes"][0]["id"], id.as_str());

    assert_eq!(
        d.cli(&["pause", &id], None).1.trim(),
        format!("{id} paused")
    );
    let (code, _, err) = d.cli(&["exec", &id, "--", "true"], None);
    assert_eq!(code, 1);
    assert!(err.contains("paused"), "{err}");
    assert_eq!(
        d.cli(&["resume", &id], None).1.trim(),
        format!("{id} running")
    );

    let (code, snap, err) = d.cli(&["snapshot", &id, "--name", "snap1"], None);
    assert_eq!((code, snap.trim()), (0, "snap1"), "{err}");
    let (code, forks, err) = d.cli(&["fork", &id, "-n", "2"], None);
    assert_eq!(code, 0, "{err}");
    let forks: Vec<&str> = forks.lines().collect();
    assert_eq!(forks.len(), 2);
    let (code, out, _) = d.cli(
        &["exec", forks[1], "--", "cat", "/home/sandbox/up.txt"],
        None,
    );
    assert_eq!((code, out.as_str()), (0, "via cp\n"));

    let (code, out, _) = d.cli(&["rm", &id, forks[0], forks[1]], None);
    assert_eq!(code, 0);
    assert_eq!(out.lines().count(), 3);
    let (code, _, err) = d.cli(&["exec", &id, "--", "true"], None);
    assert_eq!(code, 1);
    assert!(err.contains("no sandbox"), "{err}");

    // No daemon: a clear message.
    let mut cmd = std::process::Command::new(airlock_tests::workspace_bin("airlock"));
    let out = cmd
        .args(["--socket", "/nonexistent/x.sock", "ls"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot reach airlockd"),
        "{out:?}"
    );
}
