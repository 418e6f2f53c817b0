//! `airlock-agent`: the agent inside every Airlock sandbox. It serves the protocol described in
//! PROTOCOL.md over vsock (or a Unix socket on a host) and runs user code for the sandbox API.

pub mod acting_user;
pub mod cgroup;
pub mod client;
pub mod error;
pub mod files;
pub mod fuzz;
pub mod init;
pub mod listen;
pub mod process;
pub mod protocol;
pub mod server;
pub mod system;

/// Logs one line to stderr (the console when the agent is the guest's init).
#[macro_export]
macro_rules! log {
    ($($arg:tt)*) => {
        eprintln!("airlock-agent: {}", format_args!($($arg)*))
    };
}
