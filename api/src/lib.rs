//! `airlockd`, the Airlock sandbox daemon, and the pieces its CLI (`airlock`) and benchmark
//! share. See api/README.md for the API, the CLI and the backends.

pub mod agent;
pub mod backend;
pub mod cgroup;
pub mod client;
pub mod daemon;
pub mod error;
pub mod gpu;
pub mod launch;
pub mod metrics;
pub mod model;
pub mod seccomp;
pub mod server;
pub mod sys;
pub mod userns;
