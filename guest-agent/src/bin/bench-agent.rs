//! Benchmark: exec round-trip latency (`true`) and stdout throughput through the agent, beside
//! the same work done by spawning the process directly on the host.
//!
//! Usage: bench-agent [--iterations N] [--megabytes M] [--agent PATH]
//! Starts `airlock-agent --init never` on a Unix socket in a temporary directory (the binary
//! next to this one unless --agent says otherwise) and talks to it with the crate's client.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use airlock_agent::client::AgentClient;
use airlock_agent::protocol::EventKind;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn summary(name: &str, mut samples_us: Vec<f64>) {
    samples_us.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    println!(
        "{name:<34} p50 {:>8.0} us   p95 {:>8.0} us   p99 {:>8.0} us   (n={})",
        percentile(&samples_us, 50.0),
        percentile(&samples_us, 95.0),
        percentile(&samples_us, 99.0),
        samples_us.len()
    );
}

struct Options {
    iterations: usize,
    megabytes: u64,
    agent: PathBuf,
}

fn options() -> Options {
    let exe = std::env::current_exe().expect("current exe");
    let mut opts = Options {
        iterations: 500,
        megabytes: 1024,
        agent: exe.with_file_name("airlock-agent"),
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| panic!("{arg} needs a value"));
        match arg.as_str() {
            "--iterations" => opts.iterations = value().parse().expect("--iterations N"),
            "--megabytes" => opts.megabytes = value().parse().expect("--megabytes M"),
            "--agent" => opts.agent = PathBuf::from(value()),
            other => panic!("unknown argument {other}; see the source header for usage"),
        }
    }
    opts
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let opts = options();
    let dir = std::env::temp_dir().join(format!("airlock-bench-agent-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let socket = dir.join("agent.sock");
    let mut agent = Command::new(&opts.agent)
        .arg("--listen")
        .arg(format!("unix:{}", socket.display()))
        .args(["--init", "never", "--cgroup-name"])
        .arg(format!("airlock-bench-{}", std::process::id()))
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("start {}: {e}", opts.agent.display()));
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut client = loop {
        match AgentClient::connect_unix(&socket).await {
            Ok(c) => break c,
            Err(e) if Instant::now() > deadline => panic!("agent did not come up: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    };
    let spec_true = serde_json::json!({"argv": ["true"]});
    // Warm up.
    for _ in 0..20 {
        client
            .exec(&spec_true)
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
    }
    let mut through_agent = Vec::with_capacity(opts.iterations);
    for _ in 0..opts.iterations {
        let t = Instant::now();
        let out = client
            .exec(&spec_true)
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        through_agent.push(t.elapsed().as_secs_f64() * 1e6);
        assert_eq!(out.exit.and_then(|e| e.code), Some(0));
    }
    let mut direct = Vec::with_capacity(opts.iterations);
    for _ in 0..opts.iterations {
        let t = Instant::now();
        let status = Command::new("true").status().expect("spawn true");
        direct.push(t.elapsed().as_secs_f64() * 1e6);
        assert!(status.success());
    }
    println!("exec round trip of `true`:");
    summary("  through the agent (unix socket)", through_agent);
    summary("  direct std::process::Command", direct);

    let bytes = opts.megabytes << 20;
    let script = format!("head -c {bytes} /dev/zero");
    let t = Instant::now();
    let mut stream = client
        .exec(&serde_json::json!({"argv": ["sh", "-c", script]}))
        .await
        .unwrap();
    let mut received = 0u64;
    while let Some(event) = stream.next_event().await.unwrap() {
        if event.kind == EventKind::Stdout {
            received += event.bytes().map_or(0, |b| b.len() as u64);
        }
    }
    let agent_secs = t.elapsed().as_secs_f64();
    assert_eq!(received, bytes);
    let t = Instant::now();
    let mut child = Command::new("sh")
        .args(["-c", &script])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn head");
    let mut pipe = child.stdout.take().expect("stdout");
    let mut buf = vec![0u8; 64 * 1024];
    let mut direct_received = 0u64;
    loop {
        let n = pipe.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        direct_received += n as u64;
    }
    child.wait().expect("wait");
    let direct_secs = t.elapsed().as_secs_f64();
    assert_eq!(direct_received, bytes);
    println!("stdout throughput, {} MiB:", opts.megabytes);
    println!(
        "  through the agent (NDJSON+base64)  {:>8.0} MB/s",
        bytes as f64 / 1e6 / agent_secs
    );
    println!(
        "  direct pipe read                   {:>8.0} MB/s",
        bytes as f64 / 1e6 / direct_secs
    );

    let _ = client.call(http::Method::POST, "/v1/shutdown", None).await;
    let _ = agent.wait();
    let _ = std::fs::remove_dir_all(&dir);
}
