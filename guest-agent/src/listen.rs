//! Where the agent listens: `vsock:PORT`, `vsock:CID:PORT` (in a guest) or `unix:PATH` (on a
//! host, for tests and local use).

use std::fmt;
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The vsock port the agent listens on unless told otherwise.
pub const DEFAULT_VSOCK_PORT: u32 = 52;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Vsock { cid: u32, port: u32 },
    Unix(PathBuf),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ListenAddrError {
    #[error("listen address {0:?} must start with \"vsock:\" or \"unix:\"")]
    UnknownScheme(String),
    #[error("vsock address {0:?} must be vsock:PORT or vsock:CID:PORT with decimal numbers")]
    BadVsock(String),
    #[error("unix socket path is empty")]
    EmptyPath,
    #[error("unix socket path {0:?} is longer than the 107 bytes a socket address can hold")]
    PathTooLong(String),
}

impl std::str::FromStr for ListenAddr {
    type Err = ListenAddrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(rest) = s.strip_prefix("vsock:") {
            let rest = rest.trim_start_matches("//");
            let bad = || ListenAddrError::BadVsock(s.to_string());
            let (cid, port) = match rest.split_once(':') {
                Some((cid, port)) => (
                    if cid == "-1" || cid.eq_ignore_ascii_case("any") {
                        libc::VMADDR_CID_ANY
                    } else {
                        cid.parse().map_err(|_| bad())?
                    },
                    port,
                ),
                None => (libc::VMADDR_CID_ANY, rest),
            };
            let port = port.parse().map_err(|_| bad())?;
            Ok(ListenAddr::Vsock { cid, port })
        } else if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(ListenAddrError::EmptyPath);
            }
            if path.len() > 107 {
                return Err(ListenAddrError::PathTooLong(path.to_string()));
            }
            Ok(ListenAddr::Unix(PathBuf::from(path)))
        } else {
            Err(ListenAddrError::UnknownScheme(s.to_string()))
        }
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Vsock { cid, port } if *cid == libc::VMADDR_CID_ANY => {
                write!(f, "vsock:{port}")
            }
            ListenAddr::Vsock { cid, port } => write!(f, "vsock:{cid}:{port}"),
            ListenAddr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// A bound listener of either kind.
pub enum Listener {
    Unix(tokio::net::UnixListener),
    Vsock(tokio_vsock::VsockListener),
}

/// An accepted connection of either kind.
pub enum Connection {
    Unix(tokio::net::UnixStream),
    Vsock(tokio_vsock::VsockStream),
}

impl Listener {
    /// Binds the address. A stale Unix socket file left by an earlier run is replaced.
    pub fn bind(addr: &ListenAddr) -> std::io::Result<Listener> {
        match addr {
            ListenAddr::Unix(path) => {
                if let Ok(meta) = std::fs::symlink_metadata(path) {
                    use std::os::unix::fs::FileTypeExt;
                    if meta.file_type().is_socket() {
                        std::fs::remove_file(path)?;
                    }
                }
                Ok(Listener::Unix(tokio::net::UnixListener::bind(path)?))
            }
            ListenAddr::Vsock { cid, port } => Ok(Listener::Vsock(
                tokio_vsock::VsockListener::bind(tokio_vsock::VsockAddr::new(*cid, *port))?,
            )),
        }
    }

    pub async fn accept(&self) -> std::io::Result<Connection> {
        match self {
            Listener::Unix(l) => l.accept().await.map(|(s, _)| Connection::Unix(s)),
            Listener::Vsock(l) => l.accept().await.map(|(s, _)| Connection::Vsock(s)),
        }
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Connection::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Connection::Vsock(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Connection::Unix(s) => Pin::new(s).poll_write(cx, buf),
            Connection::Vsock(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Connection::Unix(s) => Pin::new(s).poll_flush(cx),
            Connection::Vsock(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Connection::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Connection::Vsock(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_vsock_and_unix() {
        assert_eq!(
            "vsock:52".parse::<ListenAddr>().unwrap(),
            ListenAddr::Vsock {
                cid: libc::VMADDR_CID_ANY,
                port: 52
            }
        );
        assert_eq!(
            "vsock:3:1024".parse::<ListenAddr>().unwrap(),
            ListenAddr::Vsock { cid: 3, port: 1024 }
        );
        assert_eq!(
            "vsock://-1:52".parse::<ListenAddr>().unwrap(),
            ListenAddr::Vsock {
                cid: libc::VMADDR_CID_ANY,
                port: 52
            }
        );
        assert_eq!(
            "unix:/run/agent.sock".parse::<ListenAddr>().unwrap(),
            ListenAddr::Unix("/run/agent.sock".into())
        );
        assert!(matches!(
            "vsock:x".parse::<ListenAddr>(),
            Err(ListenAddrError::BadVsock(_))
        ));
        assert!(matches!(
            "tcp:1".parse::<ListenAddr>(),
            Err(ListenAddrError::UnknownScheme(_))
        ));
        assert_eq!(
            "unix:".parse::<ListenAddr>(),
            Err(ListenAddrError::EmptyPath)
        );
        let long = format!("unix:/{}", "a".repeat(120));
        assert!(matches!(
            long.parse::<ListenAddr>(),
            Err(ListenAddrError::PathTooLong(_))
        ));
        assert_eq!(
            "vsock:52".parse::<ListenAddr>().unwrap().to_string(),
            "vsock:52"
        );
    }
}
