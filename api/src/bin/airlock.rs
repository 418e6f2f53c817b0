//! `airlock`: the command-line client of airlockd. See api/README.md.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use base64::Engine;
use bytes::Bytes;
use clap::{Parser, Subcommand};
use http::Method;
use http_body_util::BodyExt;

use airlockd::agent::{bytes_body, stream_body};
use airlockd::client::{ClientError, DaemonClient};

/// Command-line client of the Airlock sandbox daemon.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// The daemon's socket.
    #[arg(
        long,
        env = "AIRLOCK_SOCKET",
        default_value = "/run/airlock/airlockd.sock",
        global = true
    )]
    socket: PathBuf,
    /// Print JSON (one document, or NDJSON events for exec) for scripts.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a sandbox; prints its id alone on stdout.
    Create {
        #[arg(long, short, default_value = "default")]
        template: String,
        #[arg(long)]
        vcpus: Option<u32>,
        /// Memory, MiB.
        #[arg(long)]
        memory: Option<u64>,
        /// Seconds until the sandbox is killed.
        #[arg(long)]
        timeout: Option<u64>,
        /// Seconds of inactivity after which it is killed.
        #[arg(long)]
        idle_timeout: Option<u64>,
        /// KEY=VALUE, repeatable.
        #[arg(long = "env", short)]
        env: Vec<String>,
        /// KEY=VALUE, repeatable.
        #[arg(long = "label", short)]
        labels: Vec<String>,
        #[arg(long)]
        network: bool,
    },
    /// List sandboxes.
    Ls {
        #[arg(long = "label", short)]
        labels: Vec<String>,
        #[arg(long)]
        state: Option<String>,
    },
    /// Show one sandbox.
    Get {
        id: String,
    },
    /// Run a command, streaming its output; exits with its exit code.
    Exec {
        id: String,
        #[arg(long = "env", short)]
        env: Vec<String>,
        #[arg(long)]
        cwd: Option<String>,
        #[arg(long)]
        uid: Option<u32>,
        #[arg(long)]
        timeout_ms: Option<u64>,
        /// Send this process's stdin to the command.
        #[arg(long, short)]
        interactive: bool,
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// Copy a file: `airlock cp local ID:/path` or `airlock cp ID:/path local` (`-` is stdin/stdout).
    Cp {
        src: String,
        dst: String,
    },
    Pause {
        id: String,
    },
    Resume {
        id: String,
    },
    /// Snapshot a sandbox into a new template; prints the template's name.
    Snapshot {
        id: String,
        #[arg(long)]
        name: Option<String>,
    },
    /// Fork a sandbox into N new ones; prints their ids.
    Fork {
        id: String,
        #[arg(short = 'n', long, default_value_t = 1)]
        count: usize,
        #[arg(long)]
        name: Option<String>,
    },
    /// Set a sandbox's timeout to SECONDS from now.
    Timeout {
        id: String,
        seconds: u64,
    },
    /// Kill sandboxes and forget them.
    Rm {
        ids: Vec<String>,
    },
    /// Kill a sandbox, keeping its record.
    Kill {
        id: String,
    },
    /// Templates: list (default), create NAME IMAGE_DIR, rm NAME.
    Templates {
        #[command(subcommand)]
        action: Option<TemplateCmd>,
    },
    /// The daemon's health.
    Health,
}

#[derive(Debug, Subcommand)]
enum TemplateCmd {
    Ls,
    Create {
        name: String,
        image: PathBuf,
        #[arg(long)]
        vcpus: Option<u32>,
        #[arg(long)]
        memory: Option<u64>,
    },
    Rm {
        name: String,
    },
}

fn pairs(items: &[String], what: &str) -> Result<BTreeMap<String, String>, String> {
    items
        .iter()
        .map(|i| {
            i.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| format!("{what} {i:?} must be KEY=VALUE"))
        })
        .collect()
}

enum Failure {
    Client(ClientError),
    Usage(String),
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        Failure::Client(e)
    }
}

impl From<String> for Failure {
    fn from(e: String) -> Self {
        Failure::Usage(e)
    }
}

fn main() -> ExitCode {
    // As other command-line tools: a reader that goes away (`airlock health | head -3`) ends
    // the program quietly instead of a panic in println! (issue 13, row 12).
    // SAFETY: signal(2) with SIG_DFL installs no handler; nothing else runs yet.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(run(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(Failure::Client(e)) => {
            eprintln!("airlock: {e}");
            ExitCode::from(1)
        }
        Err(Failure::Usage(e)) => {
            eprintln!("airlock: {e}");
            ExitCode::from(2)
        }
    }
}

fn print_json(v: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn table(sandboxes: &[serde_json::Value]) {
    println!(
        "{:<20} {:<9} {:<10} {:<16} {:>5} {:>7}  LABELS",
        "ID", "STATE", "BACKEND", "TEMPLATE", "VCPUS", "MEM_MIB"
    );
    for s in sandboxes {
        let labels: Vec<String> = s["labels"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                    .collect()
            })
            .unwrap_or_default();
        println!(
            "{:<20} {:<9} {:<10} {:<16} {:>5} {:>7}  {}",
            s["id"].as_str().unwrap_or(""),
            s["state"].as_str().unwrap_or(""),
            s["backend"].as_str().unwrap_or(""),
            s["template"].as_str().unwrap_or(""),
            s["vcpus"].to_string(),
            s["memory_mib"].to_string(),
            labels.join(",")
        );
    }
}

async fn run(cli: Cli) -> Result<u8, Failure> {
    let c = DaemonClient::new(&cli.socket);
    let json = cli.json;
    match cli.command {
        Command::Create {
            template,
            vcpus,
            memory,
            timeout,
            idle_timeout,
            env,
            labels,
            network,
        } => {
            let mut body = serde_json::json!({"template": template, "env": pairs(&env, "--env")?, "labels": pairs(&labels, "--label")?, "network": network});
            for (k, v) in [
                ("vcpus", vcpus.map(u64::from)),
                ("memory_mib", memory),
                ("timeout_s", timeout),
                ("idle_timeout_s", idle_timeout),
            ] {
                if let Some(v) = v {
                    body[k] = v.into();
                }
            }
            let v = c.call(Method::POST, "/v1/sandboxes", Some(&body)).await?;
            if json {
                print_json(&v)
            } else {
                println!("{}", v["id"].as_str().unwrap_or(""))
            }
        }
        Command::Ls { labels, state } => {
            let mut q: Vec<(String, String)> = labels
                .into_iter()
                .map(|l| ("label".to_string(), l))
                .collect();
            if let Some(s) = state {
                q.push(("state".into(), s));
            }
            let qs = serde_urlencoded::to_string(&q).unwrap_or_default();
            let v = c
                .call(Method::GET, &format!("/v1/sandboxes?{qs}"), None)
                .await?;
            if json {
                print_json(&v)
            } else {
                table(v["sandboxes"].as_array().map(Vec::as_slice).unwrap_or(&[]))
            }
        }
        Command::Get { id } => print_json(
            &c.call(Method::GET, &format!("/v1/sandboxes/{id}"), None)
                .await?,
        ),
        Command::Exec {
            id,
            env,
            cwd,
            uid,
            timeout_ms,
            interactive,
            cmd,
        } => {
            return exec(&c, json, &id, env, cwd, uid, timeout_ms, interactive, cmd).await;
        }
        Command::Cp { src, dst } => cp(&c, &src, &dst, json).await?,
        Command::Pause { id } => lifecycle(&c, &id, "pause", json).await?,
        Command::Resume { id } => lifecycle(&c, &id, "resume", json).await?,
        Command::Kill { id } => lifecycle(&c, &id, "kill", json).await?,
        Command::Snapshot { id, name } => {
            let body = serde_json::json!({"template": name});
            let v = c
                .call(
                    Method::POST,
                    &format!("/v1/sandboxes/{id}/snapshot"),
                    Some(&body),
                )
                .await?;
            if json {
                print_json(&v)
            } else {
                println!("{}", v["name"].as_str().unwrap_or(""))
            }
        }
        Command::Fork { id, count, name } => {
            let body = serde_json::json!({"count": count, "template": name});
            let v = c
                .call(
                    Method::POST,
                    &format!("/v1/sandboxes/{id}/fork"),
                    Some(&body),
                )
                .await?;
            if json {
                print_json(&v)
            } else {
                for s in v["sandboxes"].as_array().into_iter().flatten() {
                    println!("{}", s["id"].as_str().unwrap_or(""));
                }
                for e in v["errors"].as_array().into_iter().flatten() {
                    eprintln!("airlock: a fork failed: {}", e.as_str().unwrap_or(""));
                }
                if v["errors"].as_array().is_some_and(|e| !e.is_empty()) {
                    return Ok(1);
                }
            }
        }
        Command::Timeout { id, seconds } => {
            let v = c
                .call(
                    Method::POST,
                    &format!("/v1/sandboxes/{id}/timeout"),
                    Some(&serde_json::json!({"timeout_s": seconds})),
                )
                .await?;
            if json {
                print_json(&v)
            } else {
                println!("{id} timeout_at_ms={}", v["timeout_at_ms"])
            }
        }
        Command::Rm { ids } => {
            let mut failed = false;
            for id in ids {
                match c
                    .call(Method::DELETE, &format!("/v1/sandboxes/{id}"), None)
                    .await
                {
                    Ok(_) => println!("{id}"),
                    Err(e) => {
                        eprintln!("airlock: {id}: {e}");
                        failed = true;
                    }
                }
            }
            return Ok(u8::from(failed));
        }
        Command::Templates { action } => match action.unwrap_or(TemplateCmd::Ls) {
            TemplateCmd::Ls => {
                let v = c.call(Method::GET, "/v1/templates", None).await?;
                if json {
                    print_json(&v)
                } else {
                    println!(
                        "{:<24} {:<10} {:>5} {:>7} {:>12}  SOURCE",
                        "NAME", "BACKEND", "VCPUS", "MEM_MIB", "SIZE"
                    );
                    for t in v["templates"].as_array().into_iter().flatten() {
                        println!(
                            "{:<24} {:<10} {:>5} {:>7} {:>12}  {}",
                            t["name"].as_str().unwrap_or(""),
                            t["backend"].as_str().unwrap_or(""),
                            t["vcpus"].to_string(),
                            t["memory_mib"].to_string(),
                            t["size_bytes"].to_string(),
                            t["source"].as_str().unwrap_or("")
                        );
                    }
                }
            }
            TemplateCmd::Create {
                name,
                image,
                vcpus,
                memory,
            } => {
                let image =
                    std::path::absolute(&image).map_err(|e| format!("{}: {e}", image.display()))?;
                let body = serde_json::json!({"name": name, "image": image, "vcpus": vcpus, "memory_mib": memory});
                let mut events = c
                    .stream(
                        Method::POST,
                        "/v1/templates",
                        bytes_body(body.to_string()),
                        true,
                    )
                    .await?;
                loop {
                    let ev = match events.next().await {
                        Ok(Some(ev)) => ev,
                        Ok(None) => break,
                        // A broken stream is airlock's own failure, not the command's: 125, as documented.
                        Err(e) => {
                            eprintln!("airlock: the exec stream broke: {e}");
                            return Ok(125);
                        }
                    };
                    if json {
                        println!("{ev}");
                    }
                    match ev["type"].as_str() {
                        Some("progress") if !json => {
                            let mut line =
                                format!("[{name}] {}", ev["step"].as_str().unwrap_or(""));
                            if let (Some(d), Some(t)) =
                                (ev["bytes_done"].as_u64(), ev["bytes_total"].as_u64())
                            {
                                line.push_str(&format!(
                                    ": {:.1} / {:.1} MiB",
                                    d as f64 / 1048576.0,
                                    t as f64 / 1048576.0
                                ));
                            }
                            eprintln!("{line}");
                        }
                        Some("done") if !json => {
                            println!("{}", ev["template"]["name"].as_str().unwrap_or(""))
                        }
                        Some("error") => {
                            if !json {
                                eprintln!(
                                    "airlock: template {name}: {}",
                                    ev["message"].as_str().unwrap_or("")
                                );
                            }
                            return Ok(1);
                        }
                        _ => {}
                    }
                }
            }
            TemplateCmd::Rm { name } => {
                c.call(Method::DELETE, &format!("/v1/templates/{name}"), None)
                    .await?;
                println!("{name}");
            }
        },
        Command::Health => print_json(&c.call(Method::GET, "/v1/health", None).await?),
    }
    Ok(0)
}

async fn lifecycle(c: &DaemonClient, id: &str, action: &str, json: bool) -> Result<(), Failure> {
    let v = c
        .call(Method::POST, &format!("/v1/sandboxes/{id}/{action}"), None)
        .await?;
    if json {
        print_json(&v)
    } else {
        println!("{id} {}", v["state"].as_str().unwrap_or(""))
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn exec(
    c: &DaemonClient,
    json: bool,
    id: &str,
    env: Vec<String>,
    cwd: Option<String>,
    uid: Option<u32>,
    timeout_ms: Option<u64>,
    interactive: bool,
    cmd: Vec<String>,
) -> Result<u8, Failure> {
    let mut spec = serde_json::json!({"cmd": cmd, "env": pairs(&env, "--env")?});
    if let Some(c) = cwd {
        spec["cwd"] = c.into();
    }
    if let Some(u) = uid {
        spec["uid"] = u.into();
    }
    if let Some(t) = timeout_ms {
        spec["timeout_ms"] = t.into();
    }
    if interactive {
        let mut input = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut input)
            .map_err(|e| format!("reading stdin: {e}"))?;
        spec["stdin_base64"] = base64::engine::general_purpose::STANDARD
            .encode(input)
            .into();
    }
    let mut events = match c
        .stream(
            Method::POST,
            &format!("/v1/sandboxes/{id}/exec"),
            bytes_body(spec.to_string()),
            false,
        )
        .await
    {
        Ok(e) => e,
        // As a shell does: 127 when the program does not exist.
        Err(e)
            if e.status() == Some(http::StatusCode::NOT_FOUND)
                && e.to_string().contains("cannot start") =>
        {
            eprintln!("airlock: {e}");
            return Ok(127);
        }
        Err(e) => return Err(e.into()),
    };
    let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
    while let Some(ev) = events.next().await? {
        if json {
            let _ = writeln!(out, "{ev}");
        }
        let data = || {
            base64::engine::general_purpose::STANDARD
                .decode(ev["data"].as_str().unwrap_or(""))
                .unwrap_or_default()
        };
        match ev["type"].as_str() {
            Some("stdout") if !json => {
                let _ = out.write_all(&data());
                let _ = out.flush();
            }
            Some("stderr") if !json => {
                let _ = err.write_all(&data());
                let _ = err.flush();
            }
            Some("exit") => {
                if let Some(code) = ev["code"].as_i64() {
                    return Ok(code.clamp(0, 255) as u8);
                }
                return Ok((128 + ev["signal"].as_i64().unwrap_or(0)).clamp(0, 255) as u8);
            }
            Some("error") => {
                eprintln!(
                    "airlock: exec failed: {}",
                    ev["message"].as_str().unwrap_or("")
                );
                return Ok(125);
            }
            _ => {}
        }
    }
    eprintln!("airlock: the stream ended without an exit status");
    Ok(125)
}

/// `ID:/path` → Some((id, path)); a local path → None.
fn remote(spec: &str) -> Option<(&str, &str)> {
    let (id, path) = spec.split_once(':')?;
    (!id.is_empty() && !id.contains('/') && path.starts_with('/')).then_some((id, path))
}

async fn cp(c: &DaemonClient, src: &str, dst: &str, json: bool) -> Result<(), Failure> {
    match (remote(src), remote(dst)) {
        (None, Some((id, path))) => {
            let body = if src == "-" {
                let mut input = Vec::new();
                std::io::Read::read_to_end(&mut std::io::stdin(), &mut input)
                    .map_err(|e| format!("reading stdin: {e}"))?;
                bytes_body(input)
            } else {
                let file = tokio::fs::File::open(src)
                    .await
                    .map_err(|e| format!("{src}: {e}"))?;
                let stream = futures_util::stream::unfold(file, |mut f| async move {
                    use tokio::io::AsyncReadExt;
                    let mut buf = vec![0u8; 256 << 10];
                    match f.read(&mut buf).await {
                        Ok(0) => None,
                        Ok(n) => {
                            buf.truncate(n);
                            Some((Ok(Bytes::from(buf)), f))
                        }
                        Err(e) => Some((Err(e), f)),
                    }
                });
                stream_body(stream)
            };
            let v = c.upload(id, path, body).await?;
            if json {
                print_json(&v)
            } else {
                eprintln!("{} bytes -> {id}:{path}", v["bytes"])
            }
        }
        (Some((id, path)), None) => {
            let resp = c.download(id, path).await?;
            let mut body = resp.into_body();
            let mut sink: Box<dyn Write> = if dst == "-" {
                Box::new(std::io::stdout())
            } else {
                Box::new(std::fs::File::create(dst).map_err(|e| format!("{dst}: {e}"))?)
            };
            let mut total = 0u64;
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| ClientError::Transport(e.to_string()))?;
                if let Ok(data) = frame.into_data() {
                    total += data.len() as u64;
                    sink.write_all(&data).map_err(|e| format!("{dst}: {e}"))?;
                }
            }
            sink.flush().map_err(|e| format!("{dst}: {e}"))?;
            if dst != "-" {
                if json {
                    print_json(&serde_json::json!({"path": dst, "bytes": total}))
                } else {
                    eprintln!("{id}:{path} -> {dst} ({total} bytes)")
                }
            }
        }
        _ => {
            return Err(Failure::Usage(
                "cp needs one local path and one ID:/absolute/path".into(),
            ))
        }
    }
    Ok(())
}
