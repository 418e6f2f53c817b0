//! The `airlock-vmm` command line: `--api-sock` serves the Firecracker-compatible API,
//! `--no-api --config-file` boots straight from a config, `check-host` reports what this host can
//! run.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::mpsc::channel;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use clap::{Parser, Subcommand};

use airlock_vmm::builder::StartOptions;
use airlock_vmm::check_host::check_host;
use airlock_vmm::config::VmConfig;
use airlock_vmm::devices::bus::lock;
use airlock_vmm::rpc::api_server;
use airlock_vmm::rpc::controller::Controller;
use airlock_vmm::vstate::vcpu::VmExit;

#[derive(Parser, Debug)]
#[command(
    name = "airlock-vmm",
    version,
    about = "Airlock's KVM microVM monitor (Firecracker-compatible API and config)",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    /// Serve the API on this Unix socket path.
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,
    /// Boot from this Firecracker-format JSON config at once.
    #[arg(long, value_name = "PATH")]
    config_file: Option<PathBuf>,
    /// Serve no API (needs --config-file).
    #[arg(long)]
    no_api: bool,
    /// Instance id reported by `GET /`.
    #[arg(long, default_value = "anonymous-instance")]
    id: String,
    /// Print a line on stderr when the guest signals it is ready, with the boot time and the VMM's
    /// own memory.
    #[arg(long)]
    boot_timer: bool,
    /// Put an emulated PCI test device on a PCI bus (for the test guest's `pci` scenario).
    #[arg(long)]
    pci_test_device: bool,
    /// Run without seccomp filters (debugging only).
    #[arg(long)]
    no_seccomp: bool,
    /// Use this seccomp filter file (seccompiler JSON with `main`, `api`, `vcpu` and `uffd`
    /// filters) instead of the built-in filters.
    #[arg(long, value_name = "PATH", conflicts_with = "no_seccomp")]
    seccomp_filter: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Report whether this host can run Linux guests, and why not.
    CheckHost {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Apply a Diff snapshot's memory file onto its base memory file, in place. The base then
    /// holds the memory a Full snapshot taken with the Diff would have.
    SnapshotMerge {
        /// The base memory file (from a Full snapshot, or earlier merges); it is overwritten.
        #[arg(long)]
        base: String,
        /// The Diff snapshot's memory file.
        #[arg(long)]
        diff: String,
    },
}

/// The API socket's path, for the termination-signal handler to remove.
static SOCKET_PATH: std::sync::OnceLock<std::ffi::CString> = std::sync::OnceLock::new();

extern "C" fn remove_socket_and_exit(signal: libc::c_int) {
    if let Some(path) = SOCKET_PATH.get() {
        // SAFETY: unlink and _exit are async-signal-safe; the path is a static C string.
        unsafe { libc::unlink(path.as_ptr()) };
    }
    // SAFETY: as above; the exit status follows the shell's 128 + signal convention.
    unsafe { libc::_exit(128 + signal) };
}

/// SIGTERM, SIGINT and SIGHUP remove the API socket before the VMM exits, so the next VMM on that
/// path does not find it taken.
fn remove_socket_on_termination(path: &std::path::Path) {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return;
    };
    let _ = SOCKET_PATH.set(c_path);
    for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: installing a handler that only calls async-signal-safe functions.
        unsafe {
            libc::signal(
                signal,
                remove_socket_and_exit as *const () as libc::sighandler_t,
            )
        };
    }
}

fn fail(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("airlock-vmm: error: {message}");
    ExitCode::from(1)
}

fn main() -> ExitCode {
    let start_time = Instant::now();
    let cli = Cli::parse();
    if let Some(Command::SnapshotMerge { base, diff }) = &cli.command {
        return match airlock_vmm::vstate::memory::merge_diff(base, diff) {
            Ok(bytes) => {
                println!("merged {bytes} bytes of {diff} into {base}");
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        };
    }
    if let Some(Command::CheckHost { json }) = cli.command {
        let report = check_host();
        if json {
            match serde_json::to_string_pretty(&report) {
                Ok(text) => println!("{text}"),
                Err(e) => return fail(e),
            }
        } else {
            print!("{}", report.render_text());
        }
        return ExitCode::SUCCESS;
    }
    run_vmm(cli, start_time)
}

fn run_vmm(cli: Cli, start_time: Instant) -> ExitCode {
    if cli.no_api && cli.api_sock.is_some() {
        return fail("--no-api and --api-sock exclude each other");
    }
    if cli.no_api && cli.config_file.is_none() {
        return fail("--no-api needs --config-file (there would be no way to configure the VM)");
    }
    if !cli.no_api && cli.api_sock.is_none() {
        return fail("give --api-sock PATH to serve the API, or --no-api --config-file PATH");
    }
    // Before the API socket's threads start: they inherit the main thread's filter.
    if let Err(e) = airlock_vmm::seccomp::init(cli.no_seccomp, cli.seccomp_filter.as_deref()) {
        return fail(e);
    }
    let config = match &cli.config_file {
        Some(path) => match VmConfig::from_file(path) {
            Ok(c) => c,
            Err(e) => return fail(e),
        },
        None => VmConfig::default(),
    };
    let server = match &cli.api_sock {
        Some(path) => match api_server::bind(path) {
            Ok(s) => {
                remove_socket_on_termination(path);
                Some(s)
            }
            Err(e) => return fail(e),
        },
        None => None,
    };

    let (exit_tx, exit_rx) = channel();
    let opts = StartOptions {
        start_time,
        report_boot_time: cli.boot_timer,
        pci_test_device: cli.pci_test_device,
    };
    let controller = Arc::new(Mutex::new(Controller::new(cli.id, config, opts, exit_tx)));
    let socket = cli.api_sock.clone();
    let cleanup = move || {
        if let Some(path) = &socket {
            let _ = std::fs::remove_file(path);
        }
    };
    if cli.config_file.is_some() {
        if let Err(e) = lock(&controller).start() {
            cleanup();
            return fail(e.0);
        }
    }
    if let Some(server) = server {
        let api_controller = controller.clone();
        let spawned = std::thread::Builder::new()
            .name("fc_api".into())
            .spawn(move || {
                if let Err(e) = airlock_vmm::seccomp::apply(airlock_vmm::seccomp::ThreadRole::Api) {
                    eprintln!("airlock-vmm: error: {e}");
                    std::process::exit(1);
                }
                api_server::serve(server, api_controller)
            });
        if let Err(e) = spawned {
            cleanup();
            return fail(format!("cannot start the API thread: {e}"));
        }
    }

    // Every vCPU thread holds a sender, and so does the controller: this waits until the guest
    // stops or a vCPU fails.
    let exit = exit_rx.recv();
    if let Some(vmm) = lock(&controller).vmm() {
        vmm.flush_console();
    }
    cleanup();
    match exit {
        Ok(exit) => {
            match &exit {
                VmExit::Reboot => {}
                VmExit::Shutdown(why) => eprintln!("airlock-vmm: {why}; stopping the VM"),
                VmExit::Error(why) => eprintln!("airlock-vmm: error: {why}"),
            }
            // Exit at once: the vCPU threads are still parked in KVM and need no orderly join.
            airlock_vmm::vstate::vm::defer_kvm_teardown();
            std::process::exit(exit.exit_code())
        }
        Err(_) => fail("every vCPU stopped without a reason"),
    }
}
