//! The `vm` backend. Sandboxes need a host where `airlock-vmm check-host` says Linux guests
//! run, and the default image (`bash images/build.sh`); elsewhere the end-to-end test prints one
//! line saying why it did not run. What runs anywhere: the daemon starts with `--backend vm`,
//! reports it, and never falls back to `namespace`.

use std::io::Write;

use std::time::Duration;

use airlock_tests::daemon::*;
use serde_json::json;

#[test]
fn vm_backend_daemon_reports_itself_and_never_falls_back() {
    if airlock_tests::agent::cannot_run_reason().is_some() {
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED vm_backend_daemon_reports_itself_and_never_falls_back: needs root"
        );
        return;
    }
    let mut d = DaemonUnderTest::start(&[]);
    d.args = vec!["--backend".into(), "vm".into()];
    d.restart();
    run_bounded(Duration::from_secs(60), async {
        let c = d.client();
        let h = c.call(Method::GET, "/v1/health", None).await.unwrap();
        assert_eq!(h["backend"], "vm");
        assert!(h["isolation"].as_str().unwrap().contains("microvm"));
        // A root tree is not a vm image: refused by name, nothing falls back.
        let rootfs = test_rootfs();
        if let Some(rootfs) = rootfs {
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

#[test]
fn vm_backend_end_to_end() {
    let report = airlock_tests::host_report();
    if report["linux_guests"] != true {
        let _ = writeln!(std::io::stderr(), "SKIPPED vm_backend_end_to_end: airlock-vmm check-host says this host cannot run Linux guests: {}",
            report["reason"].as_str().unwrap_or("no reason given")
        );
        return;
    }
    let image = airlock_tests::repo_root().join("images/out/default");
    if !image.join("vmlinux").exists() || !image.join("rootfs.ext4").exists() {
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED vm_backend_end_to_end: images/out/default is not built (bash images/build.sh)"
        );
        return;
    }
    let mut d = DaemonUnderTest::start(&[]);
    d.args = vec!["--backend".into(), "vm".into()];
    d.restart();
    run_bounded(Duration::from_secs(300), async {
        let c = d.client();
        let t = c
            .call(
                Method::POST,
                "/v1/templates",
                Some(&json!({"name": "default", "image": image})),
            )
            .await
            .unwrap();
        assert_eq!(t["backend"], "vm");
        let id = create(&c, json!({"template": "default"})).await;
        let out = sh(&c, &id, "echo hi; uname -s").await;
        assert_eq!(String::from_utf8_lossy(&out.stdout), "hi\nLinux\n");
        sh(&c, &id, "echo mem > /tmp/m").await;
        checked(&c, Method::POST, &format!("/v1/sandboxes/{id}/pause"), None).await;
        checked(
            &c,
            Method::POST,
            &format!("/v1/sandboxes/{id}/resume"),
            None,
        )
        .await;
        let f = c
            .call(
                Method::POST,
                &format!("/v1/sandboxes/{id}/fork"),
                Some(&json!({"count": 2})),
            )
            .await
            .unwrap();
        for s in f["sandboxes"].as_array().unwrap() {
            let fid = s["id"].as_str().unwrap();
            // A vm fork carries memory: the tmpfs file is there.
            assert_eq!(sh(&c, fid, "cat /tmp/m").await.stdout, b"mem\n");
        }
    });
}
