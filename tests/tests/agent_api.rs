//! The guest agent's API end to end: the real `airlock-agent` binary, PID 1 of fresh
//! namespaces, driven over its Unix socket.

use std::io::Write;
use std::time::{Duration, Instant};

use airlock_tests::agent::*;
use http::{Method, StatusCode};
use serde_json::json;

use airlock_agent::client::hyper_body;

const LIMIT: Duration = Duration::from_secs(60);

fn check_seq(events: &[Event]) {
    for pair in events.windows(2) {
        assert!(pair[1].seq > pair[0].seq, "seq not increasing: {events:?}");
    }
}

#[test]
fn health_version_and_bad_requests() {
    if skip_if_unsupported("health_version_and_bad_requests") {
        return;
    }
    let agent = AgentUnderTest::start(&[]);
    run_bounded(LIMIT, async {
        let mut c = agent.client().await;
        // One connection carries many requests.
        for _ in 0..20 {
            let h = c.call(Method::GET, "/v1/health", None).await.unwrap();
            assert_eq!(h["status"], "ok");
            assert_eq!(h["protocol"], 1);
            assert_eq!(h["pid1"], true);
        }
        let v = c.call(Method::GET, "/v1/version", None).await.unwrap();
        assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));

        let cases: Vec<(Method, &str, Option<serde_json::Value>, StatusCode)> = vec![
            (Method::GET, "/v2/health", None, StatusCode::NOT_FOUND),
            (Method::GET, "/v1/nope", None, StatusCode::NOT_FOUND),
            (
                Method::DELETE,
                "/v1/health",
                None,
                StatusCode::METHOD_NOT_ALLOWED,
            ),
            (
                Method::POST,
                "/v1/exec",
                Some(json!({"argv": []})),
                StatusCode::BAD_REQUEST,
            ),
            (
                Method::POST,
                "/v1/exec",
                Some(json!({"argv": ["x"], "bogus": 1})),
                StatusCode::BAD_REQUEST,
            ),
            (
                Method::POST,
                "/v1/exec",
                Some(json!({"argv": ["/no/such/program"]})),
                StatusCode::NOT_FOUND,
            ),
            (
                Method::GET,
                "/v1/processes/nope",
                None,
                StatusCode::NOT_FOUND,
            ),
            (
                Method::GET,
                "/v1/files/stat?path=relative",
                None,
                StatusCode::BAD_REQUEST,
            ),
        ];
        for (method, path, body, want) in cases {
            let (status, value) = c.json(method.clone(), path, body.as_ref()).await.unwrap();
            assert_eq!(status, want, "{method} {path}: {value}");
            assert!(
                value["error"]["message"]
                    .as_str()
                    .is_some_and(|m| !m.is_empty()),
                "{value}"
            );
            assert!(value["error"]["code"].is_string());
        }
        // Malformed JSON and an oversized body.
        let (status, _) = agent.raw_request("POST", "/v1/exec", "{\"argv\":").unwrap();
        assert_eq!(status, 400);
        // An oversized body is refused from its declared length, before it is read.
        {
            use std::io::{Read, Write};
            let mut s = std::os::unix::net::UnixStream::connect(&agent.socket).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.write_all(b"POST /v1/exec HTTP/1.1\r\nHost: a\r\nContent-Length: 2097152\r\n\r\n{\"argv\":[\"").unwrap();
            let mut buf = [0u8; 4096];
            let n = s.read(&mut buf).unwrap();
            let text = String::from_utf8_lossy(&buf[..n]);
            assert!(text.starts_with("HTTP/1.1 413"), "{text}");
            assert!(text.contains("payload_too_large"), "{text}");
        }
        // ... and so is one streamed without a length, once it passes the limit.
        let big =
            futures_util::stream::iter((0..40).map(|_| Ok(bytes::Bytes::from(vec![b' '; 65536]))));
        match c
            .send(
                Method::POST,
                "/v1/exec",
                airlock_agent::client::stream_body(big),
            )
            .await
        {
            Ok(r) => assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE),
            Err(e) => {
                let _ = writeln!(
                    std::io::stderr(),
                    "NOTE: the agent closed the connection during the oversized upload: {e}"
                );
            }
        }
        let mut c = agent.client().await;
        // Garbage that is not HTTP at all ends only that connection.
        {
            use std::io::{Read, Write};
            let mut s = std::os::unix::net::UnixStream::connect(&agent.socket).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let _ = s.write_all(b"\x00\xff\r\n\r\nGARBAGE / HTTP/9\r\n\r\n");
            let mut sink = Vec::new();
            let _ = s.read_to_end(&mut sink);
        }
        let h = c.call(Method::GET, "/v1/health", None).await.unwrap();
        assert_eq!(h["status"], "ok");
    });
}

#[test]
fn exec_streams_output_in_order_with_exit_code() {
    if skip_if_unsupported("exec_streams_output_in_order_with_exit_code") {
        return;
    }
    let agent = AgentUnderTest::start(&[]);
    run_bounded(LIMIT, async {
        let mut c = agent.client().await;
        let out = exec(
            &mut c,
            json!({"argv": ["sh", "-c", "i=0; while [ $i -lt 2000 ]; do echo line$i; i=$((i+1)); done; echo oops >&2; exit 7"]}),
        )
        .await;
        let expected: String = (0..2000).map(|i| format!("line{i}\n")).collect();
        assert_eq!(String::from_utf8(out.stdout).unwrap(), expected);
        assert_eq!(out.stderr, b"oops\n");
        assert_eq!(out.events.first().unwrap().kind, EventKind::Started);
        let exit = out.exit.expect("exit event");
        assert_eq!(exit.code, Some(7));
        assert_eq!(exit.signal, None);
        check_seq(&out.events);

        // argv, env and cwd are passed through; the environment starts clean.
        let out = exec(
            &mut c,
            json!({"argv": ["sh", "-c", "echo \"$FOO|$PWD|$HOME_SET|$PATH\"", "ignored"],
                   "env": {"FOO": "bar baz"}, "cwd": "/tmp/../tmp"}),
        )
        .await;
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(text.starts_with("bar baz|/tmp||/usr/local/sbin"), "{text}");

        // The exit signal of a process that kills itself.
        let out = exec(&mut c, json!({"argv": ["sh", "-c", "kill -TERM $$"]})).await;
        assert_eq!(out.exit.unwrap().signal, Some(15));
    });
}

#[test]
fn user_code_runs_unprivileged_in_its_cgroup() {
    if skip_if_unsupported("user_code_runs_unprivileged_in_its_cgroup") {
        return;
    }
    let agent = AgentUnderTest::start(&[]);
    run_bounded(LIMIT, async {
        let mut c = agent.client().await;
        let out = exec(
            &mut c,
            json!({"argv": ["sh", "-c", "id -u; id -g; cat /proc/self/cgroup"]}),
        )
        .await;
        let text = String::from_utf8(out.stdout).unwrap();
        let mut lines = text.lines();
        assert_eq!(lines.next(), Some("65534"), "{text}");
        assert_eq!(lines.next(), Some("65534"), "{text}");
        let health = c.call(Method::GET, "/v1/health", None).await.unwrap();
        if health["cgroup"].is_null() {
            let _ = writeln!(
                std::io::stderr(),
                "NOTE: no user cgroup on this host: {}",
                health["cgroup_error"]
            );
        } else {
            assert!(
                text.contains(&agent.cgroup_name),
                "not in the user cgroup: {text}"
            );
        }
        assert_eq!(sh_root(&mut c, "id -u").await, "0\n");
        let out = exec(
            &mut c,
            json!({"argv": ["id", "-u"], "uid": 1234, "gid": 1234}),
        )
        .await;
        assert_eq!(out.stdout, b"1234\n");
        // The agent itself is shielded from the OOM killer; user code is not.
        let scores = sh_root(&mut c, "cat /proc/1/oom_score_adj /proc/self/oom_score_adj").await;
        let scores: Vec<&str> = scores.lines().collect();
        assert_eq!(scores[1], "0", "user code is not shielded");
        if scores[0] != "-1000" {
            let _ = writeln!(std::io::stderr(), "NOTE: the agent could not lower its oom_score_adj here (no CAP_SYS_RESOURCE); got {}",
                scores[0]
            );
        }
    });
}

#[test]
fn timeout_kills_the_whole_process_group() {
    if skip_if_unsupported("timeout_kills_the_whole_process_group") {
        return;
    }
    let agent = AgentUnderTest::start(&[]);
    run_bounded(LIMIT, async {
        let mut c = agent.client().await;
        let started = Instant::now();
        let out = exec(
            &mut c,
            json!({"argv": ["sh", "-c", "sleep 100 & sleep 100"], "timeout_ms": 300}),
        )
        .await;
        let exit = out.exit.unwrap();
        assert!(exit.timed_out, "{exit:?}");
        assert_eq!(exit.signal, Some(9));
        assert!(started.elapsed() < Duration::from_secs(5));
        // Nothing named sleep is left in the namespace.
        let left = sh_root(
            &mut c,
            "cat /proc/[0-9]*/comm 2>/dev/null | grep -c sleep || true",
        )
        .await;
        assert_eq!(left.trim(), "0");
    });
}

#[test]
fn background_processes_stdin_signals_wait_kill() {
    if skip_if_unsupported("background_processes_stdin_signals_wait_kill") {
        return;
    }
    let agent = AgentUnderTest::start(&[]);
    run_bounded(LIMIT, async {
        let mut c = agent.client().await;
        // start + stdin + attach = exec with stdin.
        let id = start(
            &mut c,
            json!({"argv": ["sh", "-c", "cat; echo done"], "stdin": true}),
        )
        .await;
        let mut c2 = agent.client().await;
        let r = c2
            .send(
                Method::POST,
                &format!("/v1/processes/{id}/stdin"),
                airlock_agent::client::bytes_body("hello "),
            )
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let body = c2
            .send(
                Method::POST,
                &format!("/v1/processes/{id}/stdin?close=true"),
                airlock_agent::client::stream_body(futures_util::stream::iter(
                    ["wor", "ld\n"].map(|s| Ok(bytes::Bytes::from(s))),
                )),
            )
            .await
            .unwrap();
        assert_eq!(body.status(), 200);
        let out = c.attach(&id).await.unwrap().collect().await.unwrap();
        assert_eq!(out.stdout, b"hello world\ndone\n");
        assert_eq!(out.exit.unwrap().code, Some(0));
        // A closed stdin stays closed.
        let (status, _) = c
            .json(Method::POST, &format!("/v1/processes/{id}/stdin"), None)
            .await
            .unwrap();
        assert_eq!(status, StatusCode::CONFLICT);

        // Signals by name to a running process; wait reports the signal.
        let pid_id = start(&mut c, json!({"argv": ["sleep", "100"]})).await;
        let list = c.call(Method::GET, "/v1/processes", None).await.unwrap();
        assert!(list["processes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["id"] == pid_id.as_str() && p["state"] == "running"));
        let w = c
            .call(
                Method::GET,
                &format!("/v1/processes/{pid_id}/wait?timeout_ms=100"),
                None,
            )
            .await
            .unwrap();
        assert_eq!(w["state"], "running");
        c.call(
            Method::POST,
            &format!("/v1/processes/{pid_id}/signal"),
            Some(&json!({"signal": "SIGTERM"})),
        )
        .await
        .unwrap();
        let w = c
            .call(
                Method::GET,
                &format!("/v1/processes/{pid_id}/wait?timeout_ms=5000"),
                None,
            )
            .await
            .unwrap();
        assert_eq!(w["state"], "exited");
        assert_eq!(w["exit"]["signal"], 15);
        let (status, _) = c
            .json(
                Method::POST,
                &format!("/v1/processes/{pid_id}/signal"),
                Some(&json!({"signal": 9})),
            )
            .await
            .unwrap();
        assert_eq!(status, StatusCode::CONFLICT);

        // Kill, then remove.
        let kid = start(&mut c, json!({"argv": ["sleep", "100"]})).await;
        c.call(Method::POST, &format!("/v1/processes/{kid}/kill"), None)
            .await
            .unwrap();
        let w = c
            .call(
                Method::GET,
                &format!("/v1/processes/{kid}/wait?timeout_ms=5000"),
                None,
            )
            .await
            .unwrap();
        assert_eq!(w["exit"]["signal"], 9);
        c.call(Method::DELETE, &format!("/v1/processes/{kid}"), None)
            .await
            .unwrap();
        let (status, _) = c
            .json(Method::GET, &format!("/v1/processes/{kid}"), None)
            .await
            .unwrap();
        assert_eq!(status, StatusCode::NOT_FOUND);
    });
}

#[test]
fn attach_detach_and_reattach() {
    if skip_if_unsupported("attach_detach_and_reattach") {
        return;
    }
    let agent = AgentUnderTest::start(&[]);
    run_bounded(LIMIT, async {
        let mut c = agent.client().await;
        let id = start(
            &mut c,
            json!({"argv": ["sh", "-c", "echo one; sleep 0.5; echo two"]}),
        )
        .await;
        {
            let mut first = agent.client().await;
            let mut stream = first.attach(&id).await.unwrap();
            let event = stream.next_event().await.unwrap().unwrap();
            assert_eq!(event.bytes().unwrap(), b"one\n");
            // A second client is refused while one is attached.
            let mut other = agent.client().await;
            match other.attach(&id).await {
                Err(airlock_agent::client::ClientError::Status { status, .. }) => {
                    assert_eq!(status, StatusCode::CONFLICT)
                }
                Err(e) => panic!("{e}"),
                Ok(_) => panic!("second attach accepted"),
            }
        } // detach: the process goes on
        tokio::time::sleep(Duration::from_millis(100)).await;
        let out = c.attach(&id).await.unwrap().collect().await.unwrap();
        assert_eq!(out.stdout, b"two\n");
        let exit = out.exit.unwrap();
        assert_eq!(exit.code, Some(0));
        assert!(exit.seq >= 2, "seq continues across attaches: {exit:?}");
        // Attaching after the end gives the exit again.
        let again = c.attach(&id).await.unwrap().collect().await.unwrap();
        assert_eq!(again.exit.unwrap().code, Some(0));
    });
}

#[test]
fn pty_with_resize_and_input() {
    if skip_if_unsupported("pty_with_resize_and_input") {
        return;
    }
    let agent = AgentUnderTest::start(&[]);
    run_bounded(LIMIT, async {
        let mut c = agent.client().await;
        let mut stream = c
            .exec(&json!({"argv": ["sh", "-c", "stty size; test -t 0 && echo tty; read line; stty size; echo got:$line"],
                          "pty": {"rows": 24, "cols": 80}, "stdin": true}))
            .await
            .unwrap();
        let id = stream.process_id.clone().unwrap();
        let mut output = Vec::new();
        // Wait for the first size and "tty" before resizing.
        while !String::from_utf8_lossy(&output).contains("tty") {
            let event = stream
                .next_event()
                .await
                .unwrap()
                .expect("stream ended early");
            if event.kind == EventKind::Stdout {
                output.extend(event.bytes().unwrap());
            }
        }
        let mut c2 = agent.client().await;
        c2.call(
            Method::POST,
            &format!("/v1/processes/{id}/resize"),
            Some(&json!({"rows": 40, "cols": 100})),
        )
        .await
        .unwrap();
        c2.send(
            Method::POST,
            &format!("/v1/processes/{id}/stdin"),
            airlock_agent::client::bytes_body("hi\n"),
        )
        .await
        .unwrap();
        let rest = stream.collect().await.unwrap();
        output.extend(rest.stdout);
        let text = String::from_utf8_lossy(&output);
        assert!(text.contains("24 80"), "{text:?}");
        assert!(text.contains("40 100"), "{text:?}");
        assert!(text.contains("got:hi"), "{text:?}");
        assert_eq!(rest.exit.unwrap().code, Some(0));
    });
}

#[test]
fn files_stream_stat_list_mkdir_rename_chmod_remove() {
    if skip_if_unsupported("files_stream_stat_list_mkdir_rename_chmod_remove") {
        return;
    }
    let agent = AgentUnderTest::start(&[]);
    run_bounded(LIMIT, async {
        let mut c = agent.client().await;
        // A 20 MiB file streamed in 64 KiB chunks, with parents created.
        let chunk: Vec<u8> = (0..65536u32).map(|i| (i * 7 % 251) as u8).collect();
        let chunks = 320;
        let stream = futures_util::stream::iter((0..chunks).map({
            let chunk = bytes::Bytes::from(chunk.clone());
            move |_| Ok(chunk.clone())
        }));
        let r = c
            .send(
                Method::PUT,
                "/v1/files/content?path=/tmp/w/d/big.bin&create_parents=true&mode=0600",
                airlock_agent::client::stream_body(stream),
            )
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let st = c
            .call(Method::GET, "/v1/files/stat?path=/tmp/w/d/big.bin", None)
            .await
            .unwrap();
        assert_eq!(st["size"], 65536 * chunks);
        assert_eq!(st["type"], "file");
        assert_eq!(st["mode"], 0o600);
        assert_eq!(
            st["uid"], 65534,
            "files belong to the sandbox user by default"
        );
        // Read back, streamed, and a range.
        let r = c
            .send(
                Method::GET,
                "/v1/files/content?path=/tmp/w/d/big.bin",
                airlock_agent::client::empty_body(),
            )
            .await
            .unwrap();
        let body = collect_body(r).await;
        assert_eq!(body.len(), 65536 * chunks as usize);
        assert!(body.chunks(65536).all(|c| c == chunk.as_slice()));
        let r = c
            .send(
                Method::GET,
                "/v1/files/content?path=/tmp/w/d/big.bin&offset=10&length=5",
                airlock_agent::client::empty_body(),
            )
            .await
            .unwrap();
        assert_eq!(collect_body(r).await, chunk[10..15].to_vec());
        // User code sees the file.
        let out = exec(&mut c, json!({"argv": ["wc", "-c", "/tmp/w/d/big.bin"]})).await;
        assert!(String::from_utf8_lossy(&out.stdout).starts_with(&format!("{}", 65536 * chunks)));

        c.call(
            Method::POST,
            "/v1/files/mkdir",
            Some(&json!({"path": "/tmp/w/x/y/z", "mode": "0700"})),
        )
        .await
        .unwrap();
        let st = c
            .call(Method::GET, "/v1/files/stat?path=/tmp/w/x/y/z", None)
            .await
            .unwrap();
        assert_eq!(
            (st["type"].as_str(), st["mode"].as_u64()),
            (Some("dir"), Some(0o700))
        );
        let l1 = c
            .call(Method::GET, "/v1/files/list?path=/tmp/w", None)
            .await
            .unwrap();
        let names: Vec<&str> = l1["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["path"].as_str().unwrap())
            .collect();
        assert_eq!(names, vec!["/tmp/w/d", "/tmp/w/x"]);
        let l3 = c
            .call(Method::GET, "/v1/files/list?path=/tmp/w&depth=4", None)
            .await
            .unwrap();
        assert_eq!(l3["entries"].as_array().unwrap().len(), 5, "{l3}");
        c.call(
            Method::POST,
            "/v1/files/rename",
            Some(&json!({"from": "/tmp/w/d/big.bin", "to": "/tmp/w/moved.bin"})),
        )
        .await
        .unwrap();
        c.call(
            Method::POST,
            "/v1/files/chmod",
            Some(&json!({"path": "/tmp/w/moved.bin", "mode": "0755"})),
        )
        .await
        .unwrap();
        let st = c
            .call(
                Method::GET,
                "/v1/files/stat?path=/tmp/./w/d/../moved.bin",
                None,
            )
            .await
            .unwrap();
        assert_eq!(st["mode"], 0o755);
        assert_eq!(st["path"], "/tmp/w/moved.bin");
        // Append.
        c.send(
            Method::PUT,
            "/v1/files/content?path=/tmp/w/log&append=true",
            airlock_agent::client::bytes_body("a"),
        )
        .await
        .unwrap();
        c.send(
            Method::PUT,
            "/v1/files/content?path=/tmp/w/log&append=true",
            airlock_agent::client::bytes_body("b"),
        )
        .await
        .unwrap();
        let r = c
            .send(
                Method::GET,
                "/v1/files/content?path=/tmp/w/log",
                airlock_agent::client::empty_body(),
            )
            .await
            .unwrap();
        assert_eq!(collect_body(r).await, b"ab");

        let (status, v) = c
            .json(
                Method::POST,
                "/v1/files/remove",
                Some(&json!({"path": "/tmp/w"})),
            )
            .await
            .unwrap();
        assert_eq!(status, StatusCode::CONFLICT, "{v}");
        c.call(
            Method::POST,
            "/v1/files/remove",
            Some(&json!({"path": "/tmp/w", "recursive": true})),
        )
        .await
        .unwrap();
        let (status, _) = c
            .json(Method::GET, "/v1/files/stat?path=/tmp/w", None)
            .await
            .unwrap();
        assert_eq!(status, StatusCode::NOT_FOUND);
        c.call(
            Method::POST,
            "/v1/files/remove",
            Some(&json!({"path": "/tmp/w", "missing_ok": true})),
        )
        .await
        .unwrap();
        let (status, _) = c
            .json(Method::GET, "/v1/files/content?path=/tmp/nothing", None)
            .await
            .unwrap();
        assert_eq!(status, StatusCode::NOT_FOUND);
        // The agent's /tmp is its own tmpfs, not the host's.
        assert!(!std::path::Path::new("/tmp/w").exists());
    });
}

/// Starts a background process; returns its id.
async fn start(c: &mut AgentClient, spec: serde_json::Value) -> String {
    let p = c
        .call(Method::POST, "/v1/processes", Some(&spec))
        .await
        .unwrap();
    p["id"].as_str().unwrap().to_string()
}

async fn collect_body(r: http::Response<hyper_body::Incoming>) -> Vec<u8> {
    assert_eq!(r.status(), 200);
    airlock_agent::client::read_body(r).await.unwrap().to_vec()
}

#[test]
fn time_and_entropy() {
    if skip_if_unsupported("time_and_entropy") {
        return;
    }
    let agent = AgentUnderTest::start(&[]);
    run_bounded(LIMIT, async {
        let mut c = agent.client().await;
        // Setting the clock to now leaves the host's clock as it is.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        c.call(
            Method::POST,
            "/v1/time",
            Some(&json!({"unix_ns": now as u64})),
        )
        .await
        .unwrap();
        let (status, _) = c
            .json(Method::POST, "/v1/time", Some(&json!({"unix_ns": -1})))
            .await
            .unwrap();
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let r = c
            .call(
                Method::POST,
                "/v1/entropy",
                Some(&json!({"seed": "c2VlZCBieXRlcyBmb3IgdGhlIHBvb2w="})),
            )
            .await
            .unwrap();
        assert_eq!(r["credited_bits"], 8 * 23);
        let (status, _) = c
            .json(
                Method::POST,
                "/v1/entropy",
                Some(&json!({"seed": "not base64!"})),
            )
            .await
            .unwrap();
        assert_eq!(status, StatusCode::BAD_REQUEST);
    });
}

#[test]
fn client_disconnect_kills_and_reaps_the_process() {
    if skip_if_unsupported("client_disconnect_kills_and_reaps_the_process") {
        return;
    }
    let agent = AgentUnderTest::start(&[]);
    run_bounded(LIMIT, async {
        let mut c = agent.client().await;
        let pid;
        {
            let mut gone = agent.client().await;
            let mut stream = gone
                .exec(&json!({"argv": ["sh", "-c", "sleep 1000 & sleep 1000"]}))
                .await
                .unwrap();
            let started = stream.next_event().await.unwrap().unwrap();
            pid = started.pid.unwrap();
        } // the client goes away mid-stream
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let left = sh_root(&mut c, &format!("test -e /proc/{pid} && echo alive; cat /proc/[0-9]*/comm 2>/dev/null | grep -c sleep || true")).await;
            if left.trim() == "0" {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "still there after the client left: {left}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let list = c.call(Method::GET, "/v1/processes", None).await.unwrap();
        assert_eq!(list["processes"].as_array().unwrap().len(), 0, "{list}");
    });
}

#[test]
fn orphans_are_reaped_by_pid1() {
    if skip_if_unsupported("orphans_are_reaped_by_pid1") {
        return;
    }
    let agent = AgentUnderTest::start(&[]);
    run_bounded(LIMIT, async {
        let mut c = agent.client().await;
        let out = exec(
            &mut c,
            json!({"argv": ["sh", "-c", "setsid sleep 0.2 >/dev/null 2>&1 & echo $!"]}),
        )
        .await;
        let orphan: u32 = String::from_utf8(out.stdout)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let state = sh_root(
                &mut c,
                &format!("cat /proc/{orphan}/stat 2>/dev/null | cut -d' ' -f3"),
            )
            .await;
            if state.trim().is_empty() {
                break; // gone: reaped, not a zombie
            }
            assert!(
                Instant::now() < deadline,
                "orphan {orphan} not reaped (state {state})"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let h = c.call(Method::GET, "/v1/health", None).await.unwrap();
        assert!(h["orphans_reaped"].as_u64().unwrap() >= 1, "{h}");
    });
}

#[test]
fn init_duties_and_power_off() {
    if skip_if_unsupported("init_duties_and_power_off") {
        return;
    }
    let mut agent = AgentUnderTest::start(&["--net", "lo,10.1.2.3/24,10.1.2.1"]);
    run_bounded(LIMIT, async {
        let mut c = agent.client().await;
        let text = sh_root(&mut c, "cat /proc/sys/kernel/hostname; cat /sys/class/net/lo/flags; grep ' /tmp ' /proc/mounts | cut -d' ' -f3; echo $$; ls /dev/pts/ptmx; grep -c '^lo[[:space:]]*00000000[[:space:]]*0102010A' /proc/net/route").await;
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "airlock-test");
        let flags = u32::from_str_radix(lines[1].trim_start_matches("0x"), 16).unwrap();
        assert_eq!(flags & 1, 1, "lo is up");
        assert_eq!(lines[2], "tmpfs");
        assert!(lines[3].parse::<u32>().unwrap() > 1);
        assert_eq!(lines[4], "/dev/pts/ptmx");
        assert_eq!(
            lines[5], "1",
            "default route via 10.1.2.1 from --net: {text}"
        );
        let r = c.call(Method::POST, "/v1/shutdown", None).await.unwrap();
        assert_eq!(r["power_off"], true);
    });
    let status = agent
        .wait_exit(Duration::from_secs(10))
        .expect("agent powered off");
    println!("agent exited: {status}");
}
