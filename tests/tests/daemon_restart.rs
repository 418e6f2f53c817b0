//! The daemon survives its own restart; a sandbox whose agent dies is reported and freed
//! without disturbing the others.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use airlock_tests::daemon::*;
use serde_json::json;

fn cgroup_dirs(id: &str) -> Vec<PathBuf> {
    ["memory", "cpu", "pids", "freezer", "devices"]
        .iter()
        .map(|c| PathBuf::from(format!("/sys/fs/cgroup/{c}/airlock/{id}")))
        .filter(|p| p.exists())
        .collect()
}

async fn wait_state(c: &DaemonClient, id: &str, state: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = c
            .call(Method::GET, &format!("/v1/sandboxes/{id}"), None)
            .await
            .unwrap();
        if v["state"] == state {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{id} did not become {state}: {v}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn sandboxes_survive_a_daemon_restart_and_dead_agents_are_freed() {
    if skip_if_unsupported("sandboxes_survive_a_daemon_restart_and_dead_agents_are_freed") {
        return;
    }
    let mut d = DaemonUnderTest::start(&["--monitor-interval-ms", "50"]);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let c = d.client();
    let (a, b, victim) = rt.block_on(async {
        make_template(&c, "default").await;
        let a = create(
            &c,
            json!({"template": "default", "labels": {"keep": "yes"}}),
        )
        .await;
        let b = create(&c, json!({"template": "default"})).await;
        let victim = create(&c, json!({"template": "default"})).await;
        sh(&c, &a, "echo persisted > /home/sandbox/f").await;
        // A background process must live through the restart too.
        c.call(
            Method::POST,
            &format!("/v1/sandboxes/{a}/processes"),
            Some(&json!({"cmd": ["sleep", "300"]})),
        )
        .await
        .unwrap();
        (a, b, victim)
    });
    let victim_pid = rt
        .block_on(c.call(Method::GET, &format!("/v1/sandboxes/{victim}"), None))
        .unwrap()["pid"]
        .as_i64()
        .unwrap() as i32;

    // The daemon dies hard; while it is down the victim's agent dies too.
    d.stop(libc::SIGKILL);
    // SAFETY: kill(2) on the sandbox's agent, which this test created.
    unsafe {
        libc::kill(victim_pid, libc::SIGKILL);
    }
    d.restart();
    let c = d.client();
    run_bounded(Duration::from_secs(60), async {
        let va = c
            .call(Method::GET, &format!("/v1/sandboxes/{a}"), None)
            .await
            .unwrap();
        assert_eq!(va["state"], "running", "{va}");
        assert_eq!(
            sh(&c, &a, "cat /home/sandbox/f").await.stdout,
            b"persisted\n"
        );
        let procs = c
            .call(Method::GET, &format!("/v1/sandboxes/{a}/processes"), None)
            .await
            .unwrap();
        assert!(
            procs["processes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["state"] == "running"),
            "{procs}"
        );
        let v = wait_state(&c, &victim, "failed").await;
        assert!(
            v["state_reason"].as_str().unwrap().contains("restarted"),
            "{v}"
        );
        assert!(
            cgroup_dirs(&victim).is_empty(),
            "the dead sandbox's cgroups remain"
        );

        // An agent killed while the daemon runs: reported, freed, the others undisturbed.
        let pid_b = c
            .call(Method::GET, &format!("/v1/sandboxes/{b}"), None)
            .await
            .unwrap()["pid"]
            .as_i64()
            .unwrap() as i32;
        assert!(!cgroup_dirs(&b).is_empty());
        // SAFETY: kill(2) on the sandbox's agent, which this test created.
        unsafe {
            libc::kill(pid_b, libc::SIGKILL);
        }
        let v = wait_state(&c, &b, "failed").await;
        assert!(
            v["state_reason"].as_str().unwrap().contains("exited"),
            "{v}"
        );
        assert!(
            cgroup_dirs(&b).is_empty(),
            "the dead sandbox's cgroups remain"
        );
        assert!(
            !d.state_dir.join("sandboxes").join(&b).exists(),
            "its directory remains"
        );
        let (s, e) = c
            .request(
                Method::POST,
                &format!("/v1/sandboxes/{b}/exec"),
                Some(&json!({"cmd": ["true"]})),
            )
            .await
            .unwrap();
        assert_eq!(s, StatusCode::CONFLICT);
        assert!(e["error"].as_str().unwrap().contains("failed"), "{e}");
        let m = c
            .send(Method::GET, "/metrics", airlockd::agent::empty_body())
            .await
            .unwrap();
        let text = String::from_utf8_lossy(
            &airlockd::agent::read_limited(m.into_body(), 1 << 20)
                .await
                .unwrap(),
        )
        .into_owned();
        assert!(
            text.contains("airlock_sandboxes{state=\"failed\",backend=\"namespace\"} 2"),
            "{text}"
        );
        assert_eq!(sh(&c, &a, "echo still").await.stdout, b"still\n");
    });
    // A graceful stop leaves sandboxes running too.
    d.restart();
    run_bounded(Duration::from_secs(30), async {
        let c = d.client();
        assert_eq!(sh(&c, &a, "echo again").await.stdout, b"again\n");
    });
}
