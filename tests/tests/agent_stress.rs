//! The guest agent under load: a 1 GiB output stream with backpressure, 200 concurrent execs,
//! a fork bomb and a memory hog in the user cgroup while health keeps answering.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use airlock_tests::agent::*;
use http::Method;
use serde_json::json;

/// These tests load both cores; one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn one_gib_stream_with_backpressure() {
    if skip_if_unsupported("one_gib_stream_with_backpressure") {
        return;
    }
    let _serial = serial();
    let agent = AgentUnderTest::start(&[]);
    run_bounded(Duration::from_secs(120), async {
        let mut c = agent.client().await;
        // A slow reader: the agent must hold back the producer, not buffer its output.
        let mut stream = c
            .exec(&json!({"argv": ["sh", "-c", "head -c 1073741824 /dev/zero; echo finished >&2"]}))
            .await
            .unwrap();
        let _started = stream.next_event().await.unwrap().unwrap();
        let _first = stream.next_event().await.unwrap().unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let rss_paused = agent.rss_kib();
        let start = Instant::now();
        let mut total = 0u64;
        let mut stderr = Vec::new();
        let mut exit = None;
        while let Some(line) = stream.next_line().await.unwrap() {
            let event: Event = serde_json::from_slice(&line).unwrap();
            match event.kind {
                EventKind::Stdout => {
                    let bytes = event.bytes().unwrap();
                    assert!(bytes.iter().all(|b| *b == 0));
                    total += bytes.len() as u64;
                }
                EventKind::Stderr => stderr.extend(event.bytes().unwrap()),
                EventKind::Exit => exit = Some(event),
                _ => {}
            }
        }
        let elapsed = start.elapsed();
        let total = total + _first.bytes().map_or(0, |b| b.len() as u64);
        assert_eq!(total, 1 << 30);
        assert_eq!(stderr, b"finished\n");
        assert_eq!(exit.unwrap().code, Some(0));
        let rss_end = agent.rss_kib();
        println!(
            "1 GiB through the agent in {:.2} s ({:.0} MB/s); agent RSS while paused {rss_paused:?} KiB, after {rss_end:?} KiB",
            elapsed.as_secs_f64(),
            (1u64 << 30) as f64 / 1e6 / elapsed.as_secs_f64()
        );
        if let Some(rss) = rss_paused {
            assert!(
                rss < 64 * 1024,
                "agent RSS {rss} KiB while a reader paused: output is being buffered"
            );
        }
        if let Some(rss) = rss_end {
            assert!(rss < 128 * 1024, "agent RSS {rss} KiB after a 1 GiB stream");
        }
    });
}

#[test]
fn two_hundred_concurrent_execs() {
    if skip_if_unsupported("two_hundred_concurrent_execs") {
        return;
    }
    let _serial = serial();
    let agent = AgentUnderTest::start(&[]);
    run_bounded(Duration::from_secs(60), async {
        let start = Instant::now();
        let mut tasks = Vec::new();
        for i in 0..200 {
            let mut client = agent.client().await;
            tasks.push(tokio::spawn(async move {
                let out = exec(
                    &mut client,
                    json!({"argv": ["sh", "-c", format!("echo task{i}; sleep 0.2")]}),
                )
                .await;
                assert_eq!(out.stdout, format!("task{i}\n").into_bytes());
                assert_eq!(out.exit.unwrap().code, Some(0));
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        println!(
            "200 concurrent execs in {:.2} s",
            start.elapsed().as_secs_f64()
        );
        let mut c = agent.client().await;
        let list = c.call(Method::GET, "/v1/processes", None).await.unwrap();
        assert_eq!(list["processes"].as_array().unwrap().len(), 0);
    });
}

#[test]
fn fork_bomb_is_contained_and_health_answers() {
    if skip_if_unsupported("fork_bomb_is_contained_and_health_answers") {
        return;
    }
    let _serial = serial();
    let agent = AgentUnderTest::start(&["--user-pids-max", "128"]);
    run_bounded(Duration::from_secs(60), async {
        let mut c = agent.client().await;
        let h = c.call(Method::GET, "/v1/health", None).await.unwrap();
        if h["cgroup"].is_null() {
            airlock_tests::not_run(
                "fork_bomb_is_contained_and_health_answers",
                &format!("no user cgroup here ({})", h["cgroup_error"]),
            );
            return;
        }
        c.call(
            Method::POST,
            "/v1/processes",
            Some(&json!({"argv": ["sh", "-c", "bomb() { bomb | bomb & }; bomb"]})),
        )
        .await
        .unwrap();
        let mut worst = Duration::ZERO;
        let mut peak = 0;
        let until = Instant::now() + Duration::from_secs(3);
        while Instant::now() < until {
            let t = Instant::now();
            let h = tokio::time::timeout(
                Duration::from_secs(5),
                c.call(Method::GET, "/v1/health", None),
            )
            .await
            .expect("health did not answer within 5 s during a fork bomb")
            .unwrap();
            worst = worst.max(t.elapsed());
            peak = peak.max(h["cgroup"]["pids_current"].as_u64().unwrap_or(0));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(peak <= 128, "pids limit exceeded: {peak}");
        assert!(peak >= 64, "the bomb never grew ({peak}); did it run?");
        assert!(worst < Duration::from_secs(2), "health took {worst:?}");
        let killed = c
            .call(Method::POST, "/v1/processes/kill-all", None)
            .await
            .unwrap();
        let h = c.call(Method::GET, "/v1/health", None).await.unwrap();
        assert_eq!(h["cgroup"]["pids_current"], 0, "{h}");
        println!(
            "fork bomb: peak {peak} tasks (limit 128), worst health latency {:.1} ms, kill-all: {killed}",
            worst.as_secs_f64() * 1e3
        );
        // The sandbox is usable again.
        let out = exec(&mut c, json!({"argv": ["echo", "ok"]})).await;
        assert_eq!(out.stdout, b"ok\n");
    });
}

#[test]
fn memory_hog_is_killed_inside_its_cgroup() {
    if skip_if_unsupported("memory_hog_is_killed_inside_its_cgroup") {
        return;
    }
    let _serial = serial();
    let agent = AgentUnderTest::start(&["--user-memory-max", "64M"]);
    run_bounded(Duration::from_secs(60), async {
        let mut c = agent.client().await;
        let h = c.call(Method::GET, "/v1/health", None).await.unwrap();
        if h["cgroup"].is_null() {
            airlock_tests::not_run(
                "memory_hog_is_killed_inside_its_cgroup",
                &format!("no user cgroup here ({})", h["cgroup_error"]),
            );
            return;
        }
        let out = exec(
            &mut c,
            json!({"argv": ["sh", "-c", "x=$(head -c 300000000 /dev/zero | tr '\\0' a); echo survived ${#x}"], "timeout_ms": 30000}),
        )
        .await;
        let exit = out.exit.unwrap();
        assert!(!exit.timed_out);
        assert!(
            exit.signal == Some(9) || !String::from_utf8_lossy(&out.stdout).contains("survived"),
            "the hog was not stopped: {exit:?} {:?}",
            String::from_utf8_lossy(&out.stdout)
        );
        let h = c.call(Method::GET, "/v1/health", None).await.unwrap();
        assert_eq!(h["status"], "ok");
        println!("memory hog ended with {exit:?}");
    });
}
