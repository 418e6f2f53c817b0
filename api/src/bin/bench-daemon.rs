//! Benchmark of a running airlockd: sandbox create-to-first-exec latency and execs per second
//! through the API, with p50/p95/p99 at 1, 10 and 50 concurrent clients.
//!
//! `bench-daemon --socket /run/airlock/airlockd.sock [--template default] [--per-client 10]`

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use http::Method;

use airlockd::client::DaemonClient;

#[derive(Parser)]
struct Args {
    #[arg(
        long,
        env = "AIRLOCK_SOCKET",
        default_value = "/run/airlock/airlockd.sock"
    )]
    socket: String,
    #[arg(long, default_value = "default")]
    template: String,
    /// Sandboxes (create-to-first-exec) and execs done by each client.
    #[arg(long, default_value_t = 10)]
    per_client: usize,
    #[arg(long, value_delimiter = ',', default_value = "1,10,50")]
    clients: Vec<usize>,
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn line(what: &str, clients: usize, mut ms: Vec<f64>, wall: Duration) {
    ms.sort_by(f64::total_cmp);
    println!(
        "{what:<26} {clients:>7} {:>6} {:>9.2} {:>9.2} {:>9.2} {:>10.1}",
        ms.len(),
        pct(&ms, 50.0),
        pct(&ms, 95.0),
        pct(&ms, 99.0),
        ms.len() as f64 / wall.as_secs_f64()
    );
}

async fn create_exec(c: &DaemonClient, template: &str) -> (f64, String) {
    let t = Instant::now();
    let v = c
        .call(
            Method::POST,
            "/v1/sandboxes",
            Some(&serde_json::json!({"template": template, "memory_mib": 64})),
        )
        .await
        .expect("create");
    let id = v["id"].as_str().unwrap().to_string();
    let out = c
        .exec(&id, &serde_json::json!({"cmd": ["true"]}))
        .await
        .expect("exec");
    assert_eq!(out.code, Some(0), "{out:?}");
    (t.elapsed().as_secs_f64() * 1000.0, id)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let args = Arc::new(Args::parse());
    let c = DaemonClient::new(&args.socket);
    c.call(Method::GET, "/v1/health", None)
        .await
        .expect("airlockd answers health");
    println!(
        "{:<26} {:>7} {:>6} {:>9} {:>9} {:>9} {:>10}",
        "measure", "clients", "n", "p50_ms", "p95_ms", "p99_ms", "per_sec"
    );
    for &n in &args.clients {
        // Create-to-first-exec.
        let t = Instant::now();
        let tasks: Vec<_> = (0..n)
            .map(|_| {
                let (c, a) = (c.clone(), args.clone());
                tokio::spawn(async move {
                    let mut out = vec![];
                    for _ in 0..a.per_client {
                        out.push(create_exec(&c, &a.template).await);
                    }
                    out
                })
            })
            .collect();
        let mut lat = vec![];
        let mut ids = vec![];
        for task in tasks {
            for (ms, id) in task.await.unwrap() {
                lat.push(ms);
                ids.push(id);
            }
        }
        line("create -> first exec", n, lat, t.elapsed());
        // Execs per second: each client on its own sandbox.
        let t = Instant::now();
        let tasks: Vec<_> = ids
            .iter()
            .take(n)
            .cloned()
            .map(|id| {
                let (c, a) = (c.clone(), args.clone());
                tokio::spawn(async move {
                    let mut out = vec![];
                    for _ in 0..a.per_client * 10 {
                        let t = Instant::now();
                        let r = c
                            .exec(&id, &serde_json::json!({"cmd": ["true"]}))
                            .await
                            .expect("exec");
                        assert_eq!(r.code, Some(0));
                        out.push(t.elapsed().as_secs_f64() * 1000.0);
                    }
                    out
                })
            })
            .collect();
        let mut lat = vec![];
        for task in tasks {
            lat.extend(task.await.unwrap());
        }
        line("exec `true`", n, lat, t.elapsed());
        for id in ids {
            let _ = c
                .call(Method::DELETE, &format!("/v1/sandboxes/{id}"), None)
                .await;
        }
    }
}
