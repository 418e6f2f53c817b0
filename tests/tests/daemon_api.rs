//! airlockd end to end (namespace backend): every API area, with each answer's status checked
//! against api/openapi.yaml.

use std::time::{Duration, Instant};

use airlock_tests::daemon::*;
use base64::Engine;
use serde_json::json;

#[test]
fn sandbox_exec_files_processes_lifecycle() {
    if skip_if_unsupported("sandbox_exec_files_processes_lifecycle") {
        return;
    }
    let d = DaemonUnderTest::start(&[]);
    run_bounded(Duration::from_secs(90), async {
        let c = d.client();
        let t = make_template(&c, "default").await;
        assert_eq!(t["backend"], "namespace");
        let (s, v) = checked(&c, Method::POST, "/v1/sandboxes", Some(&json!({"template": "default", "env": {"GREETING": "hi"}, "labels": {"team": "a"}, "memory_mib": 128}))).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        let id = v["id"].as_str().unwrap().to_string();
        assert_eq!(v["backend"], "namespace");
        assert!(v["isolation"].as_str().unwrap().contains("weaker"));
        assert_eq!(v["state"], "running");

        // Exec: streamed stdout, stderr, exit code; sandbox env; unprivileged user; own PID 1.
        let out = sh(
            &c,
            &id,
            "echo $GREETING; echo oops >&2; id -u; cat /proc/1/cmdline | head -c 30; exit 3",
        )
        .await;
        assert_eq!(out.code, Some(3));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.starts_with("hi\n1000\n"), "{stdout}");
        assert!(stdout.contains("airlock-agent"), "{stdout}");
        assert_eq!(out.stderr, b"oops\n");
        assert_eq!(out.events[0]["type"], "started");
        assert_eq!(out.events.last().unwrap()["type"], "exit");
        // stdin, per-exec env, cwd.
        let out = c.exec(&id, &json!({"cmd": ["sh", "-c", "cat; echo $X; pwd"], "stdin": "in\n", "env": {"X": "y"}, "cwd": "/tmp"})).await.unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "in\ny\n/tmp\n");
        // Output larger than one chunk arrives whole.
        let out = sh(&c, &id, "head -c 300000 /dev/zero").await;
        assert_eq!(out.stdout.len(), 300000);
        // The sandbox has no route to the host's network (network off).
        let out = sh(
            &c,
            &id,
            "cat /proc/net/dev | tail -n +3 | cut -d: -f1 | tr -d ' '",
        )
        .await;
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "lo");

        // Files.
        let (s, _) = checked(
            &c,
            Method::POST,
            &format!("/v1/sandboxes/{id}/files/mkdir"),
            Some(&json!({"path": "/home/sandbox/d/e"})),
        )
        .await;
        assert_eq!(s, StatusCode::CREATED);
        let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let v = c
            .upload(
                &id,
                "/home/sandbox/d/e/blob",
                airlockd::agent::bytes_body(payload.clone()),
            )
            .await
            .unwrap();
        assert_eq!(v["bytes"], 200_000);
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
        assert_eq!(s, StatusCode::OK);
        assert_eq!(st["size"], 200_000);
        assert_eq!(st["type"], "file");
        let (s, l) = checked(
            &c,
            Method::GET,
            &format!("/v1/sandboxes/{id}/files/list?path=/home/sandbox/d&depth=2"),
            None,
        )
        .await;
        assert_eq!(s, StatusCode::OK);
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

        // Background processes: stdin kept open, attach, signal, list, delete.
        let (s, p) = checked(
            &c,
            Method::POST,
            &format!("/v1/sandboxes/{id}/processes"),
            Some(&json!({"cmd": ["cat"], "open_stdin": true})),
        )
        .await;
        assert_eq!(s, StatusCode::CREATED, "{p}");
        let pid = p["process_id"].as_str().unwrap().to_string();
        let (s, w) = c
            .request_raw(
                Method::POST,
                &format!("/v1/sandboxes/{id}/processes/{pid}/stdin?close=true"),
                airlockd::agent::bytes_body("piped\n"),
            )
            .await
            .unwrap();
        assert_eq!(s, StatusCode::OK, "{w}");
        let attach = c
            .stream(
                Method::GET,
                &format!("/v1/sandboxes/{id}/processes/{pid}/attach"),
                airlockd::agent::empty_body(),
                false,
            )
            .await
            .unwrap();
        let out = attach.collect_exec().await.unwrap();
        assert_eq!(out.stdout, b"piped\n");
        assert_eq!(out.code, Some(0));
        let (_, p) = checked(
            &c,
            Method::POST,
            &format!("/v1/sandboxes/{id}/processes"),
            Some(&json!({"cmd": ["sleep", "100"]})),
        )
        .await;
        let sleeper = p["process_id"].as_str().unwrap().to_string();
        let (s, list) = checked(
            &c,
            Method::GET,
            &format!("/v1/sandboxes/{id}/processes"),
            None,
        )
        .await;
        assert_eq!(s, StatusCode::OK);
        assert!(list["processes"].as_array().unwrap().len() >= 2);
        let (s, _) = checked(
            &c,
            Method::POST,
            &format!("/v1/sandboxes/{id}/processes/{sleeper}/signal"),
            Some(&json!({"signal": "TERM"})),
        )
        .await;
        assert_eq!(s, StatusCode::OK);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let (_, p) = checked(
                &c,
                Method::GET,
                &format!("/v1/sandboxes/{id}/processes/{sleeper}"),
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
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (s, _) = checked(
            &c,
            Method::DELETE,
            &format!("/v1/sandboxes/{id}/processes/{sleeper}"),
            None,
        )
        .await;
        assert_eq!(s, StatusCode::OK);

        // Pause: execs are refused while frozen; resume brings it back.
        let (s, v) = checked(&c, Method::POST, &format!("/v1/sandboxes/{id}/pause"), None).await;
        assert_eq!((s, v["state"].as_str()), (StatusCode::OK, Some("paused")));
        let (s, e) = checked(
            &c,
            Method::POST,
            &format!("/v1/sandboxes/{id}/exec"),
            Some(&json!({"cmd": ["true"]})),
        )
        .await;
        assert_eq!(s, StatusCode::CONFLICT);
        assert!(e["error"].as_str().unwrap().contains("paused"), "{e}");
        let (s, _) = checked(
            &c,
            Method::POST,
            &format!("/v1/sandboxes/{id}/resume"),
            None,
        )
        .await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(sh(&c, &id, "echo back").await.stdout, b"back\n");

        // Snapshot into a template, fork: the files come along, the labels say whence.
        sh(&c, &id, "echo state > /home/sandbox/mark").await;
        let (s, f) = checked(
            &c,
            Method::POST,
            &format!("/v1/sandboxes/{id}/fork"),
            Some(&json!({"count": 3})),
        )
        .await;
        assert_eq!(s, StatusCode::CREATED, "{f}");
        let forks: Vec<String> = f["sandboxes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["id"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(forks.len(), 3);
        assert!(f["template"]["carries"]
            .as_str()
            .unwrap()
            .contains("not carried"));
        for fid in &forks {
            assert_eq!(
                sh(&c, fid, "cat /home/sandbox/mark").await.stdout,
                b"state\n"
            );
        }
        // Forks are independent.
        sh(&c, &forks[0], "echo changed > /home/sandbox/mark").await;
        assert_eq!(
            sh(&c, &forks[1], "cat /home/sandbox/mark").await.stdout,
            b"state\n"
        );
        let (s, l) = checked(
            &c,
            Method::GET,
            &format!("/v1/sandboxes?label=airlock.forked-from={id}"),
            None,
        )
        .await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(l["sandboxes"].as_array().unwrap().len(), 3);
        let (_, l) = checked(
            &c,
            Method::GET,
            "/v1/sandboxes?label=team=a&label=airlock.forked-from=nobody",
            None,
        )
        .await;
        assert_eq!(l["sandboxes"].as_array().unwrap().len(), 0);
        let (s, snap) = checked(
            &c,
            Method::POST,
            &format!("/v1/sandboxes/{id}/snapshot"),
            Some(&json!({"template": "mine"})),
        )
        .await;
        assert_eq!(s, StatusCode::CREATED, "{snap}");
        let (s, _) = checked(&c, Method::DELETE, "/v1/templates/mine", None).await;
        assert_eq!(s, StatusCode::OK);
        // A template in use cannot go.
        let (s, _) = checked(&c, Method::DELETE, "/v1/templates/default", None).await;
        assert_eq!(s, StatusCode::CONFLICT);

        // Kill keeps the record; calls on it get a clear 409; DELETE forgets it.
        let (s, v) = checked(
            &c,
            Method::POST,
            &format!("/v1/sandboxes/{}/kill", forks[2]),
            None,
        )
        .await;
        assert_eq!((s, v["state"].as_str()), (StatusCode::OK, Some("stopped")));
        let (s, e) = checked(
            &c,
            Method::POST,
            &format!("/v1/sandboxes/{}/exec", forks[2]),
            Some(&json!({"cmd": ["true"]})),
        )
        .await;
        assert_eq!(s, StatusCode::CONFLICT);
        assert!(
            e["error"].as_str().unwrap().contains("stopped (killed)"),
            "{e}"
        );
        let (s, _) = checked(
            &c,
            Method::DELETE,
            &format!("/v1/sandboxes/{}", forks[2]),
            None,
        )
        .await;
        assert_eq!(s, StatusCode::OK);
        let (s, _) = checked(
            &c,
            Method::GET,
            &format!("/v1/sandboxes/{}", forks[2]),
            None,
        )
        .await;
        assert_eq!(s, StatusCode::NOT_FOUND);

        // Health and metrics.
        let (s, h) = checked(&c, Method::GET, "/v1/health", None).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(h["backend"], "namespace");
        assert_eq!(h["sandboxes"]["running"], 3);
        let resp = c
            .send(Method::GET, "/metrics", airlockd::agent::empty_body())
            .await
            .unwrap();
        let text = String::from_utf8_lossy(
            &airlockd::agent::read_limited(resp.into_body(), 1 << 20)
                .await
                .unwrap(),
        )
        .into_owned();
        assert!(
            text.contains("airlock_sandboxes{state=\"running\",backend=\"namespace\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("airlock_sandbox_start_seconds_count"),
            "{text}"
        );
        assert!(
            text.contains("airlock_execs_total{result=\"ok\"}"),
            "{text}"
        );
        assert!(
            text.contains("airlock_errors_total{kind=\"conflict\"}"),
            "{text}"
        );
        let (s, _) = checked(&c, Method::GET, "/v1/openapi.yaml", None).await;
        assert_eq!(s, StatusCode::OK);
        let _ = base64::engine::general_purpose::STANDARD.encode(b"");
    });
}

#[test]
fn timeouts_and_idle_timeouts_end_sandboxes() {
    if skip_if_unsupported("timeouts_and_idle_timeouts_end_sandboxes") {
        return;
    }
    let d = DaemonUnderTest::start(&["--monitor-interval-ms", "50"]);
    run_bounded(Duration::from_secs(60), async {
        let c = d.client();
        make_template(&c, "default").await;
        let short = create(&c, json!({"template": "default", "timeout_s": 1})).await;
        let idle = create(&c, json!({"template": "default", "idle_timeout_s": 1})).await;
        let extended = create(&c, json!({"template": "default", "timeout_s": 1})).await;
        let (s, _) = checked(
            &c,
            Method::POST,
            &format!("/v1/sandboxes/{extended}/timeout"),
            Some(&json!({"timeout_s": 60})),
        )
        .await;
        assert_eq!(s, StatusCode::OK);
        // A running exec is activity: the idle timer waits for it.
        let busy = create(&c, json!({"template": "default", "idle_timeout_s": 1})).await;
        let out = sh(&c, &busy, "sleep 1.6; echo done").await;
        assert_eq!(out.stdout, b"done\n");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s1 = c
                .call(Method::GET, &format!("/v1/sandboxes/{short}"), None)
                .await
                .unwrap();
            let s2 = c
                .call(Method::GET, &format!("/v1/sandboxes/{idle}"), None)
                .await
                .unwrap();
            if s1["state"] == "stopped" && s2["state"] == "stopped" {
                assert_eq!(s1["state_reason"], "timeout");
                assert_eq!(s2["state_reason"], "idle timeout");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "timeouts did not fire: {s1} {s2}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let e = c
            .call(Method::GET, &format!("/v1/sandboxes/{extended}"), None)
            .await
            .unwrap();
        assert_eq!(e["state"], "running", "{e}");
    });
}
