//! The Firecracker-compatible HTTP API on a Unix socket: requests are parsed into
//! [`controller::ApiRequest`]s, which the [`controller::Controller`] carries out.

pub mod api_server;
pub mod controller;
