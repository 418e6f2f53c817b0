//! `airlock-agent`: see the crate README and PROTOCOL.md.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};

use airlock_agent::cgroup::{self, UserCgroup, UserCgroupConfig};
use airlock_agent::init::{self, NetConfig};
use airlock_agent::listen::{ListenAddr, Listener};
use airlock_agent::log;
use airlock_agent::process::{ProcessTable, Reaper, UserDefaults};
use airlock_agent::server::{self, AgentState};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum InitMode {
    /// Act as init when running as PID 1.
    Auto,
    Always,
    Never,
}

/// The in-guest agent of an Airlock sandbox.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Where to serve the protocol: vsock:PORT, vsock:CID:PORT or unix:PATH.
    #[arg(long, default_value = "vsock:52")]
    listen: ListenAddr,
    /// Whether to do init's work (mounts, hostname, network, orphan reaping, power off).
    #[arg(long, value_enum, default_value = "auto")]
    init: InitMode,
    /// Hostname to set as init (default: airlock.hostname= on the kernel command line).
    #[arg(long)]
    hostname: Option<String>,
    /// Interface to configure as init: IFACE,ADDR/PREFIX[,GATEWAY] (default: airlock.net=).
    #[arg(long)]
    net: Option<NetConfig>,
    /// User that user code runs as by default (default: the user "sandbox", else 65534).
    #[arg(long)]
    user_uid: Option<u32>,
    /// Group of user code (default: the user's group, else 65534).
    #[arg(long)]
    user_gid: Option<u32>,
    /// Name of the user cgroup directory.
    #[arg(long, default_value = "airlock-user")]
    cgroup_name: String,
    /// Do not put user code in a cgroup.
    #[arg(long)]
    no_cgroup: bool,
    /// Most processes (tasks) user code may have at once ("max" for no limit).
    #[arg(long, default_value = "4096")]
    user_pids_max: String,
    /// Memory limit of user code, e.g. 512M ("max" for none; default: 90% of the guest's).
    #[arg(long)]
    user_memory_max: Option<String>,
    /// CPU weight of user code, where the agent has 100.
    #[arg(long, default_value_t = 50)]
    user_cpu_weight: u64,
}

fn default_user(args: &Args) -> UserDefaults {
    use nix::unistd::{Uid, User};
    let euid = nix::unistd::geteuid();
    if !euid.is_root() {
        // Without root there is no one else to become.
        return UserDefaults {
            uid: euid.as_raw(),
            gid: nix::unistd::getegid().as_raw(),
        };
    }
    let named = if args.user_uid.is_none() {
        User::from_name("sandbox").ok().flatten()
    } else {
        args.user_uid
            .and_then(|uid| User::from_uid(Uid::from_raw(uid)).ok().flatten())
    };
    let uid = args
        .user_uid
        .or(named.as_ref().map(|u| u.uid.as_raw()))
        .unwrap_or(65534);
    let gid = args
        .user_gid
        .or(named.as_ref().map(|u| u.gid.as_raw()))
        .unwrap_or(if args.user_uid.is_some() { uid } else { 65534 });
    UserDefaults { uid, gid }
}

fn main() -> ExitCode {
    let pid1 = std::process::id() == 1;
    let args = match Args::try_parse() {
        Ok(args) => args,
        // As init a bad command line must not panic the kernel: run with defaults.
        Err(e) if pid1 => {
            log!("ignoring the command line ({e}); running with defaults");
            Args::parse_from(["airlock-agent"])
        }
        Err(e) => e.exit(),
    };
    let as_init = match args.init {
        InitMode::Auto => pid1,
        InitMode::Always => true,
        InitMode::Never => false,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            log!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(args, as_init, pid1))
}

async fn bind(addr: &ListenAddr, pid1: bool) -> Option<Listener> {
    loop {
        match Listener::bind(addr) {
            Ok(listener) => return Some(listener),
            Err(e) if pid1 => {
                // init must not exit; the vsock device may simply not be there yet.
                log!("cannot listen on {addr}: {e}; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => {
                log!("cannot listen on {addr}: {e}");
                return None;
            }
        }
    }
}

async fn run(args: Args, as_init: bool, pid1: bool) -> ExitCode {
    let started = Instant::now();
    // Bind first: a Unix socket path then resolves in the mount table the agent was started
    // with, before init mounts a fresh /tmp.
    let Some(listener) = bind(&args.listen, pid1).await else {
        return ExitCode::FAILURE;
    };
    if as_init {
        init::mount_early_filesystems();
        let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
        let hostname = args
            .hostname
            .clone()
            .or_else(|| init::cmdline_value(&cmdline, "airlock.hostname").map(str::to_string));
        if let Some(name) = hostname {
            init::set_hostname(&name);
        }
        if let Err(e) = init::bring_up("lo") {
            log!("init: cannot bring up lo: {e}");
        }
        let net = args.net.clone().or_else(|| {
            let text = init::cmdline_value(&cmdline, "airlock.net")?;
            text.parse()
                .map_err(|e| log!("init: ignoring airlock.net: {e}"))
                .ok()
        });
        if let Some(net) = net {
            if let Err(e) = init::configure_interface(&net) {
                log!("init: cannot configure {}: {e}", net.iface);
            }
        }
    }
    let root = nix::unistd::geteuid().is_root();
    if root {
        // User code may be OOM-killed; the agent should be the last choice.
        if let Err(e) = std::fs::write("/proc/self/oom_score_adj", "-1000") {
            log!("cannot shield the agent from the OOM killer: {e}");
        }
    }
    let user = default_user(&args);
    let (cgroup, cgroup_error) = if args.no_cgroup {
        (None, Some("disabled by --no-cgroup".to_string()))
    } else {
        let pids_max = match cgroup::parse_size(&args.user_pids_max) {
            Ok(v) => v,
            Err(e) => {
                log!("--user-pids-max: {e}");
                return ExitCode::FAILURE;
            }
        };
        let memory_max = match &args.user_memory_max {
            Some(text) => match cgroup::parse_size(text) {
                Ok(v) => v,
                Err(e) => {
                    log!("--user-memory-max: {e}");
                    return ExitCode::FAILURE;
                }
            },
            None => cgroup::default_memory_max(),
        };
        let config = UserCgroupConfig {
            name: args.cgroup_name.clone(),
            pids_max,
            memory_max,
            cpu_weight: Some(args.user_cpu_weight.clamp(1, 10000)),
        };
        match UserCgroup::setup(&config) {
            Ok(cg) => (Some(Arc::new(cg)), None),
            Err(e) => {
                log!("user code runs without a cgroup: {e}");
                (None, Some(e.to_string()))
            }
        }
    };
    let reaper = Arc::new(Reaper::default());
    tokio::spawn(reaper.clone().run());
    let file_owner = user.clone();
    let state = Arc::new(AgentState {
        table: Arc::new(ProcessTable::new(reaper, user.clone(), cgroup)),
        started,
        pid1,
        file_owner,
        cgroup_error,
        socket_path: match &args.listen {
            ListenAddr::Unix(path) => Some(path.clone()),
            ListenAddr::Vsock { .. } => None,
        },
    });
    let on_signal = state.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        let _ = tokio::task::spawn_blocking(move || on_signal.shutdown()).await;
    });
    log!(
        "listening on {} (protocol {}, init: {as_init}, user {}:{}, cgroup: {})",
        args.listen,
        airlock_agent::protocol::PROTOCOL_VERSION,
        user.uid,
        user.gid,
        state
            .table
            .cgroup()
            .map_or("none".to_string(), |c| c.dirs[0].display().to_string()),
    );
    server::serve(listener, state).await;
    ExitCode::SUCCESS
}
