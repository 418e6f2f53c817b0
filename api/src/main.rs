//! `airlockd`: the sandbox daemon. See api/README.md.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;

use airlockd::backend::namespace::NamespaceBackend;
use airlockd::backend::vm::VmBackend;
use airlockd::backend::Backend;
use airlockd::daemon::{Daemon, Limits};
use airlockd::model::BackendKind;

/// The Airlock sandbox daemon: an HTTP/1.1 JSON API on a Unix socket.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The API's Unix socket.
    #[arg(long, default_value = "/run/airlock/airlockd.sock")]
    socket: PathBuf,
    /// Where sandbox records, templates and sandbox files live.
    #[arg(long, default_value = "/var/lib/airlock")]
    state_dir: PathBuf,
    /// vm: a jailed microVM per sandbox. namespace: the agent jailed on the host (namespaces,
    /// cgroups, seccomp): a weaker boundary, for hosts that cannot run Linux guests.
    #[arg(long, value_enum, default_value = "vm")]
    backend: BackendKind,
    /// Most sandboxes alive at once.
    #[arg(long, default_value_t = 256)]
    max_sandboxes: usize,
    /// Most vCPUs per sandbox.
    #[arg(long, default_value_t = 8)]
    max_vcpus: u32,
    /// Most memory per sandbox, MiB.
    #[arg(long, default_value_t = 8192)]
    max_memory_mib: u64,
    /// Largest JSON request body, bytes.
    #[arg(long, default_value_t = 1 << 20)]
    max_request_bytes: usize,
    /// Largest file upload (and stdin body), bytes.
    #[arg(long, default_value_t = 1 << 30)]
    max_upload_bytes: u64,
    /// The airlock-agent binary installed into namespace templates (default: beside airlockd).
    #[arg(long)]
    agent_bin: Option<PathBuf>,
    /// airlock-vmm (default: beside airlockd).
    #[arg(long)]
    vmm_bin: Option<PathBuf>,
    /// airlock-jailer (default: beside airlockd).
    #[arg(long)]
    jailer_bin: Option<PathBuf>,
    /// uid and gid that jailed VMMs run as.
    #[arg(long, default_value_t = 10001)]
    jail_uid: u32,
    #[arg(long, default_value_t = 10001)]
    jail_gid: u32,
    /// namespace backend: allow `network: true`, which shares the host's network namespace.
    #[arg(long)]
    namespace_host_network: bool,
    /// vm backend: how long a booting or restored VM's agent may take to answer, seconds. 30 is
    /// ample on hardware KVM; nested or emulated hosts (the test lab) need minutes.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    agent_ready_timeout_s: u64,
    /// Let API clients run commands as uid/gid 0: the sandbox's own root (inside the guest; in
    /// the namespace backend, root of the sandbox's user namespace, whose ids are a host range
    /// of its own), never the host's. Off by default.
    #[arg(long)]
    allow_guest_root: bool,
    /// A directory whose images (each a subdirectory) templates may be built from; repeat for
    /// more. Default: <state-dir>/images. Any other host path is refused.
    #[arg(long = "image-dir")]
    image_dirs: Vec<PathBuf>,
    /// How often the monitor checks for dead sandboxes and timeouts, ms.
    #[arg(long, default_value_t = 250)]
    monitor_interval_ms: u64,
}

fn beside_me(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join(name)))
        .unwrap_or_else(|| PathBuf::from(name))
}

fn vm_host_warning(vmm: &Path) {
    let out = std::process::Command::new(vmm)
        .args(["check-host", "--json"])
        .output();
    if let Ok(out) = out {
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) {
            if v["linux_guests"] == false {
                eprintln!(
                    "airlockd: warning: airlock-vmm check-host says this host cannot run Linux guests ({}); \
                     vm sandboxes will fail to start. airlockd does not fall back to the namespace backend: \
                     choose it with --backend namespace if its weaker boundary is acceptable.",
                    v["reason"].as_str().unwrap_or("no reason given")
                );
            }
        }
    }
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("__launch") {
        let spec = argv.get(2).cloned().unwrap_or_default();
        return ExitCode::from(airlockd::launch::main(&spec) as u8);
    }
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("airlockd: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("airlockd needs root (cgroups, namespaces, jails)".into());
    }
    // Orphaned sandbox processes (the agents the launcher leaves behind) become our children,
    // so we can reap them.
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER, 1) takes no pointers.
    unsafe {
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
    }
    std::fs::create_dir_all(&args.state_dir)
        .map_err(|e| format!("cannot create {}: {e}", args.state_dir.display()))?;
    let state_dir = args
        .state_dir
        .canonicalize()
        .map_err(|e| format!("{}: {e}", args.state_dir.display()))?;
    // Only root may enter the state dir: sandboxes' files live in it, and a setuid program a
    // tenant left in its upper directory must not be runnable by other host users (issue 13,
    // row 6). Jailed VMMs do not need it: they see only their chroot.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&state_dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| format!("cannot make {} private: {e}", state_dir.display()))?;
    }
    let backend = match args.backend {
        BackendKind::Namespace => Backend::Namespace(NamespaceBackend::new(
            state_dir.clone(),
            args.agent_bin
                .clone()
                .unwrap_or_else(|| beside_me("airlock-agent")),
            std::env::current_exe().map_err(|e| e.to_string())?,
            args.namespace_host_network,
        )?),
        BackendKind::Vm => {
            let vmm = args
                .vmm_bin
                .clone()
                .unwrap_or_else(|| beside_me("airlock-vmm"));
            let jailer = args
                .jailer_bin
                .clone()
                .unwrap_or_else(|| beside_me("airlock-jailer"));
            let mut b = VmBackend::new(
                state_dir.clone(),
                vmm.clone(),
                jailer,
                args.jail_uid,
                args.jail_gid,
            )?;
            b.ready_timeout = Duration::from_secs(args.agent_ready_timeout_s);
            vm_host_warning(&vmm);
            Backend::Vm(b)
        }
    };
    let mut image_dirs = Vec::new();
    let wanted = if args.image_dirs.is_empty() {
        vec![state_dir.join("images")]
    } else {
        args.image_dirs.clone()
    };
    if args.image_dirs.is_empty() {
        std::fs::create_dir_all(&wanted[0])
            .map_err(|e| format!("cannot create {}: {e}", wanted[0].display()))?;
    }
    for dir in wanted {
        image_dirs.push(
            dir.canonicalize()
                .map_err(|e| format!("image directory {}: {e}", dir.display()))?,
        );
    }
    let limits = Limits {
        max_sandboxes: args.max_sandboxes.max(1),
        max_vcpus: args.max_vcpus.max(1),
        max_memory_mib: args.max_memory_mib.max(32),
        max_request_bytes: args.max_request_bytes.max(1024),
        max_upload_bytes: args.max_upload_bytes,
        allow_guest_root: args.allow_guest_root,
        image_dirs,
        ..Limits::default()
    };
    let daemon = Daemon::open(&state_dir, backend, limits)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    runtime.block_on(async move {
        if let Some(dir) = args.socket.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
        if args.socket.exists() {
            if std::os::unix::net::UnixStream::connect(&args.socket).is_ok() {
                return Err(format!("another airlockd serves {}", args.socket.display()));
            }
            let _ = std::fs::remove_file(&args.socket);
        }
        let listener = tokio::net::UnixListener::bind(&args.socket)
            .map_err(|e| format!("cannot listen on {}: {e}", args.socket.display()))?;
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&args.socket, std::fs::Permissions::from_mode(0o660));
        let daemon = Arc::new(daemon);
        daemon.recover().await;
        tokio::spawn(
            daemon
                .clone()
                .monitor(Duration::from_millis(args.monitor_interval_ms.max(10))),
        );
        eprintln!(
            "airlockd: serving on {} (backend {}, state {})",
            args.socket.display(),
            daemon.backend.kind().name(),
            state_dir.display()
        );
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| e.to_string())?;
        tokio::select! {
            _ = airlockd::server::serve(daemon.clone(), listener) => {}
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        // Sandboxes keep running: a restarted daemon finds them in the state dir.
        let _ = std::fs::remove_file(&args.socket);
        eprintln!("airlockd: stopping; sandboxes keep running");
        Ok::<(), String>(())
    })?;
    runtime.shutdown_timeout(Duration::from_millis(200));
    Ok(())
}
