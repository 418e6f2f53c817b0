//! The wire protocol (see PROTOCOL.md): request types, the request decoder that the server and
//! the fuzz test share, and the newline-delimited JSON events of an output stream.
//!
//! Decoding is two-phase so that the server can stream large bodies: [`decode_route`] looks only
//! at the method and request target; when it answers [`Route::Json`], the server reads the body
//! (bounded by [`MAX_JSON_BODY`]) and calls [`JsonRoute::decode`]. [`decode_request`] chains the
//! two exactly as the server does, for the fuzz test.

use std::collections::BTreeMap;

use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::error::{AgentError, AgentResult};

/// Bumped on any incompatible change; reported by `GET /v1/health`.
pub const PROTOCOL_VERSION: u32 = 1;
/// The largest JSON request body accepted.
pub const MAX_JSON_BODY: usize = 1024 * 1024;
/// The largest request target (path and query) accepted.
pub const MAX_TARGET_LEN: usize = 8192;
pub const MAX_ARGV: usize = 4096;
pub const MAX_ENV: usize = 4096;
pub const MAX_ENTROPY_SEED: usize = 4096;
pub const MAX_LIST_DEPTH: u32 = 64;
pub const MAX_PROCESS_ID_LEN: usize = 64;

/// What a request asks for, fully decoded and validated.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    Health,
    Version,
    /// `POST /v1/exec`: run and stream the output in the response.
    Exec(ExecSpec),
    /// `POST /v1/processes`: run in the background.
    Start(ExecSpec),
    ListProcesses,
    GetProcess {
        id: String,
    },
    Attach {
        id: String,
    },
    Wait {
        id: String,
        timeout_ms: Option<u64>,
    },
    /// The request body is streamed to the process's stdin.
    Stdin {
        id: String,
        close: bool,
    },
    Signal {
        id: String,
        signal: i32,
        group: bool,
    },
    Kill {
        id: String,
    },
    Resize {
        id: String,
        size: PtySize,
    },
    RemoveProcess {
        id: String,
    },
    KillUserProcesses,
    Stat {
        path: String,
        user: UserParam,
    },
    ListDir {
        path: String,
        depth: u32,
        user: UserParam,
    },
    ReadFile {
        path: String,
        offset: u64,
        length: Option<u64>,
        user: UserParam,
    },
    /// The request body is streamed into the file.
    WriteFile(WriteFileSpec),
    Mkdir(MkdirSpec),
    Remove(RemoveSpec),
    Rename(RenameSpec),
    Chmod(ChmodSpec),
    SetTime {
        unix_ns: i128,
    },
    AddEntropy {
        seed: Vec<u8>,
    },
    Shutdown,
}

/// The outcome of looking at method and target alone.
#[derive(Debug, Clone, PartialEq)]
pub enum Route {
    /// Decoded; any body is either ignored or streamed (stdin, file writes).
    Ready(Request),
    /// The request needs its JSON body decoded.
    Json(JsonRoute),
}

/// Endpoints whose parameters come in a JSON body.
#[derive(Debug, Clone, PartialEq)]
pub enum JsonRoute {
    Exec,
    Start,
    Signal { id: String },
    Resize { id: String },
    Mkdir,
    Remove,
    Rename,
    Chmod,
    SetTime,
    AddEntropy,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExecSpec {
    pub argv: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub cwd: Option<String>,
    #[serde(default)]
    pub uid: Option<u32>,
    #[serde(default)]
    pub gid: Option<u32>,
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Give the process a stdin pipe, fed by `POST /v1/processes/{id}/stdin`.
    #[serde(default)]
    pub stdin: bool,
    /// Run on a pseudo-terminal of this size (stdin, stdout and stderr all on it).
    #[serde(default)]
    pub pty: Option<PtySize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PtySize {
    pub rows: u16,
    pub cols: u16,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct SignalBody {
    signal: SignalName,
    #[serde(default = "default_true")]
    group: bool,
}

/// A signal as a number (`15`) or a name (`"SIGTERM"` or `"TERM"`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
enum SignalName {
    Number(i32),
    Name(String),
}

/// A file mode as a number (`420`) or an octal string (`"0644"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "ModeRepr")]
pub struct FileMode(pub u32);

#[derive(Deserialize)]
#[serde(untagged)]
enum ModeRepr {
    Number(u32),
    Octal(String),
}

impl TryFrom<ModeRepr> for FileMode {
    type Error = String;
    fn try_from(repr: ModeRepr) -> Result<Self, String> {
        let mode = match repr {
            ModeRepr::Number(n) => n,
            ModeRepr::Octal(s) => {
                let digits = s.strip_prefix("0o").unwrap_or(&s);
                u32::from_str_radix(digits, 8)
                    .map_err(|_| format!("mode {s:?} is not an octal number like \"0644\""))?
            }
        };
        if mode > 0o7777 {
            return Err(format!("mode {mode:#o} has bits beyond 07777"));
        }
        Ok(FileMode(mode))
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WriteFileSpec {
    pub path: String,
    #[serde(default)]
    pub mode: Option<FileModeParam>,
    #[serde(default)]
    pub uid: Option<u32>,
    #[serde(default)]
    pub gid: Option<u32>,
    /// Create missing parent directories (owned like the file).
    #[serde(default)]
    pub create_parents: bool,
    /// Append to the file instead of replacing it.
    #[serde(default)]
    pub append: bool,
}

/// In a query string a mode is always an octal string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct FileModeParam(pub u32);

impl TryFrom<String> for FileModeParam {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        FileMode::try_from(ModeRepr::Octal(s)).map(|m| FileModeParam(m.0))
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MkdirSpec {
    pub path: String,
    #[serde(default)]
    pub mode: Option<FileMode>,
    #[serde(default = "default_true")]
    pub parents: bool,
    #[serde(default)]
    pub uid: Option<u32>,
    #[serde(default)]
    pub gid: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoveSpec {
    pub path: String,
    #[serde(default)]
    pub recursive: bool,
    /// Succeed when the path does not exist.
    #[serde(default)]
    pub missing_ok: bool,
    #[serde(default)]
    pub uid: Option<u32>,
    #[serde(default)]
    pub gid: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenameSpec {
    pub from: String,
    pub to: String,
    #[serde(default)]
    pub uid: Option<u32>,
    #[serde(default)]
    pub gid: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChmodSpec {
    pub path: String,
    pub mode: FileMode,
    #[serde(default)]
    pub uid: Option<u32>,
    #[serde(default)]
    pub gid: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TimeBody {
    unix_ns: i128,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EntropyBody {
    seed: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PathQuery {
    path: String,
    #[serde(default)]
    uid: Option<u32>,
    #[serde(default)]
    gid: Option<u32>,
}

/// Who a file operation acts as: `uid` and `gid` (each defaults to the sandbox user's). The
/// kernel checks the operation's paths and permissions as for that user.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UserParam {
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    path: String,
    #[serde(default)]
    depth: Option<u32>,
    #[serde(default)]
    uid: Option<u32>,
    #[serde(default)]
    gid: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReadQuery {
    path: String,
    #[serde(default)]
    offset: Option<u64>,
    #[serde(default)]
    length: Option<u64>,
    #[serde(default)]
    uid: Option<u32>,
    #[serde(default)]
    gid: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WaitQuery {
    #[serde(default)]
    timeout_ms: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StdinQuery {
    #[serde(default)]
    close: bool,
}

fn default_true() -> bool {
    true
}

/// Decodes a whole request as the server does: route, then (when needed) the JSON body.
pub fn decode_request(method: &str, target: &str, body: &[u8]) -> AgentResult<Request> {
    match decode_route(method, target)? {
        Route::Ready(request) => Ok(request),
        Route::Json(route) => {
            if body.len() > MAX_JSON_BODY {
                return Err(AgentError::PayloadTooLarge {
                    limit: MAX_JSON_BODY,
                });
            }
            route.decode(body)
        }
    }
}

/// Routes a request by method and target (`/v1/...?query`).
pub fn decode_route(method: &str, target: &str) -> AgentResult<Route> {
    if target.len() > MAX_TARGET_LEN {
        return Err(AgentError::bad_request(format!(
            "request target is longer than {MAX_TARGET_LEN} bytes"
        )));
    }
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, q),
        None => (target, ""),
    };
    let segments: Vec<&str> = match path.strip_prefix("/v1/") {
        Some(rest) => rest.split('/').collect(),
        None => {
            return Err(AgentError::NotFound(format!(
                "no endpoint {path:?}: this agent speaks protocol {PROTOCOL_VERSION}, under /v1/"
            )))
        }
    };
    let not_allowed = || AgentError::MethodNotAllowed {
        method: method.chars().take(32).collect(),
        path: path.chars().take(256).collect(),
    };
    use Request as R;
    let ready = |r: Request| Ok(Route::Ready(r));
    match (segments.as_slice(), method) {
        (["health"], "GET") => ready(R::Health),
        (["version"], "GET") => ready(R::Version),
        (["exec"], "POST") => Ok(Route::Json(JsonRoute::Exec)),
        (["processes"], "GET") => ready(R::ListProcesses),
        (["processes"], "POST") => Ok(Route::Json(JsonRoute::Start)),
        (["processes", "kill-all"], "POST") => ready(R::KillUserProcesses),
        (["processes", id], "GET") => ready(R::GetProcess {
            id: process_id(id)?,
        }),
        (["processes", id], "DELETE") => ready(R::RemoveProcess {
            id: process_id(id)?,
        }),
        (["processes", id, "attach"], "GET") => ready(R::Attach {
            id: process_id(id)?,
        }),
        (["processes", id, "wait"], "GET") => {
            let q: WaitQuery = parse_query(query)?;
            ready(R::Wait {
                id: process_id(id)?,
                timeout_ms: q.timeout_ms,
            })
        }
        (["processes", id, "stdin"], "POST") => {
            let q: StdinQuery = parse_query(query)?;
            ready(R::Stdin {
                id: process_id(id)?,
                close: q.close,
            })
        }
        (["processes", id, "signal"], "POST") => Ok(Route::Json(JsonRoute::Signal {
            id: process_id(id)?,
        })),
        (["processes", id, "kill"], "POST") => ready(R::Kill {
            id: process_id(id)?,
        }),
        (["processes", id, "resize"], "POST") => Ok(Route::Json(JsonRoute::Resize {
            id: process_id(id)?,
        })),
        (["files", "stat"], "GET") => {
            let q: PathQuery = parse_query(query)?;
            ready(R::Stat {
                path: normalize_path(&q.path)?,
                user: UserParam {
                    uid: q.uid,
                    gid: q.gid,
                },
            })
        }
        (["files", "list"], "GET") => {
            let q: ListQuery = parse_query(query)?;
            let depth = q.depth.unwrap_or(1);
            if depth == 0 || depth > MAX_LIST_DEPTH {
                return Err(AgentError::bad_request(format!(
                    "depth must be between 1 and {MAX_LIST_DEPTH}, not {depth}"
                )));
            }
            ready(R::ListDir {
                path: normalize_path(&q.path)?,
                depth,
                user: UserParam {
                    uid: q.uid,
                    gid: q.gid,
                },
            })
        }
        (["files", "content"], "GET") => {
            let q: ReadQuery = parse_query(query)?;
            ready(R::ReadFile {
                path: normalize_path(&q.path)?,
                offset: q.offset.unwrap_or(0),
                length: q.length,
                user: UserParam {
                    uid: q.uid,
                    gid: q.gid,
                },
            })
        }
        (["files", "content"], "PUT") => {
            let mut spec: WriteFileSpec = parse_query(query)?;
            spec.path = normalize_path(&spec.path)?;
            ready(R::WriteFile(spec))
        }
        (["files", "mkdir"], "POST") => Ok(Route::Json(JsonRoute::Mkdir)),
        (["files", "remove"], "POST") => Ok(Route::Json(JsonRoute::Remove)),
        (["files", "rename"], "POST") => Ok(Route::Json(JsonRoute::Rename)),
        (["files", "chmod"], "POST") => Ok(Route::Json(JsonRoute::Chmod)),
        (["time"], "POST") => Ok(Route::Json(JsonRoute::SetTime)),
        (["entropy"], "POST") => Ok(Route::Json(JsonRoute::AddEntropy)),
        (["shutdown"], "POST") => ready(R::Shutdown),
        (
            ["health"]
            | ["version"]
            | ["exec"]
            | ["processes"]
            | ["processes", _]
            | ["processes", _, "attach" | "wait" | "stdin" | "signal" | "kill" | "resize"]
            | ["files", "stat" | "list" | "content" | "mkdir" | "remove" | "rename" | "chmod"]
            | ["time"]
            | ["entropy"]
            | ["shutdown"],
            _,
        ) => Err(not_allowed()),
        _ => Err(AgentError::NotFound(format!(
            "no endpoint {:?}",
            path.chars().take(256).collect::<String>()
        ))),
    }
}

impl JsonRoute {
    /// Decodes and validates the JSON body of this route.
    pub fn decode(&self, body: &[u8]) -> AgentResult<Request> {
        Ok(match self {
            JsonRoute::Exec => Request::Exec(validate_exec(parse_json(body)?)?),
            JsonRoute::Start => Request::Start(validate_exec(parse_json(body)?)?),
            JsonRoute::Signal { id } => {
                let b: SignalBody = parse_json(body)?;
                Request::Signal {
                    id: id.clone(),
                    signal: signal_number(&b.signal)?,
                    group: b.group,
                }
            }
            JsonRoute::Resize { id } => Request::Resize {
                id: id.clone(),
                size: validate_pty_size(parse_json(body)?)?,
            },
            JsonRoute::Mkdir => {
                let mut spec: MkdirSpec = parse_json(body)?;
                spec.path = normalize_path(&spec.path)?;
                Request::Mkdir(spec)
            }
            JsonRoute::Remove => {
                let mut spec: RemoveSpec = parse_json(body)?;
                spec.path = normalize_path(&spec.path)?;
                if spec.path == "/" {
                    return Err(AgentError::bad_request("refusing to remove \"/\""));
                }
                Request::Remove(spec)
            }
            JsonRoute::Rename => {
                let mut spec: RenameSpec = parse_json(body)?;
                spec.from = normalize_path(&spec.from)?;
                spec.to = normalize_path(&spec.to)?;
                Request::Rename(spec)
            }
            JsonRoute::Chmod => {
                let mut spec: ChmodSpec = parse_json(body)?;
                spec.path = normalize_path(&spec.path)?;
                Request::Chmod(spec)
            }
            JsonRoute::SetTime => {
                let b: TimeBody = parse_json(body)?;
                if b.unix_ns < 0 || b.unix_ns > i64::MAX as i128 {
                    return Err(AgentError::bad_request(
                        "unix_ns must be between 0 and 2^63-1 nanoseconds since the epoch",
                    ));
                }
                Request::SetTime { unix_ns: b.unix_ns }
            }
            JsonRoute::AddEntropy => {
                let b: EntropyBody = parse_json(body)?;
                let seed = base64::engine::general_purpose::STANDARD
                    .decode(b.seed.as_bytes())
                    .map_err(|e| AgentError::bad_request(format!("seed is not base64: {e}")))?;
                if seed.is_empty() || seed.len() > MAX_ENTROPY_SEED {
                    return Err(AgentError::bad_request(format!(
                        "seed must be 1 to {MAX_ENTROPY_SEED} bytes, not {}",
                        seed.len()
                    )));
                }
                Request::AddEntropy { seed }
            }
        })
    }
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> AgentResult<T> {
    serde_json::from_slice(body)
        .map_err(|e| AgentError::bad_request(format!("invalid JSON body: {e}")))
}

fn parse_query<T: serde::de::DeserializeOwned>(query: &str) -> AgentResult<T> {
    serde_urlencoded::from_str(query)
        .map_err(|e| AgentError::bad_request(format!("invalid query string: {e}")))
}

fn process_id(id: &str) -> AgentResult<String> {
    if id.is_empty()
        || id.len() > MAX_PROCESS_ID_LEN
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(AgentError::bad_request(format!(
            "process id {:?} is not a valid id (letters, digits, '-' and '_', at most {MAX_PROCESS_ID_LEN})",
            id.chars().take(80).collect::<String>()
        )));
    }
    Ok(id.to_string())
}

fn validate_pty_size(size: PtySize) -> AgentResult<PtySize> {
    if size.rows == 0 || size.cols == 0 {
        return Err(AgentError::bad_request(
            "pty rows and cols must be at least 1",
        ));
    }
    Ok(size)
}

fn has_nul(s: &str) -> bool {
    s.as_bytes().contains(&0)
}

fn validate_exec(mut spec: ExecSpec) -> AgentResult<ExecSpec> {
    if spec.argv.is_empty() || spec.argv[0].is_empty() {
        return Err(AgentError::bad_request(
            "argv must hold at least the program to run",
        ));
    }
    if spec.argv.len() > MAX_ARGV || spec.env.len() > MAX_ENV {
        return Err(AgentError::bad_request(format!(
            "at most {MAX_ARGV} arguments and {MAX_ENV} environment variables"
        )));
    }
    if spec.argv.iter().any(|a| has_nul(a)) {
        return Err(AgentError::bad_request("argv must not contain NUL bytes"));
    }
    for (key, value) in &spec.env {
        if key.is_empty() || key.contains('=') || has_nul(key) || has_nul(value) {
            return Err(AgentError::bad_request(format!(
                "environment variable name {key:?} must be non-empty, without '=' or NUL, and its value without NUL"
            )));
        }
    }
    if let Some(cwd) = &spec.cwd {
        spec.cwd = Some(normalize_path(cwd)?);
    }
    if let Some(size) = spec.pty {
        validate_pty_size(size)?;
    }
    Ok(spec)
}

/// Path rule: a path must be absolute and free of NUL; `.` and `..` components are resolved
/// lexically (`/a/./b/../c` becomes `/a/c`, `/..` stays `/`). Symlinks are left to the kernel:
/// the agent serves the sandbox's whole filesystem.
pub fn normalize_path(path: &str) -> AgentResult<String> {
    if !path.starts_with('/') {
        return Err(AgentError::bad_request(format!(
            "path {:?} is not absolute: paths must start with '/'",
            path.chars().take(256).collect::<String>()
        )));
    }
    if has_nul(path) {
        return Err(AgentError::bad_request("path must not contain NUL bytes"));
    }
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            other => parts.push(other),
        }
    }
    Ok(format!("/{}", parts.join("/")))
}

fn signal_number(signal: &SignalName) -> AgentResult<i32> {
    let number = match signal {
        SignalName::Number(n) => *n,
        SignalName::Name(name) => {
            let upper = name.to_ascii_uppercase();
            let full = if upper.starts_with("SIG") {
                upper
            } else {
                format!("SIG{upper}")
            };
            match full.parse::<nix::sys::signal::Signal>() {
                Ok(s) => s as i32,
                Err(_) => {
                    return Err(AgentError::bad_request(format!(
                        "unknown signal {:?}",
                        name.chars().take(32).collect::<String>()
                    )))
                }
            }
        }
    };
    if !(1..=64).contains(&number) {
        return Err(AgentError::bad_request(format!(
            "signal {number} is out of range 1..=64"
        )));
    }
    Ok(number)
}

/// One event of an output stream (`application/x-ndjson`, one JSON object a line). `seq` counts
/// the events of one process from 0, across attaches. Fields that do not apply are left out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub seq: u64,
    #[serde(rename = "type")]
    pub kind: EventKind,
    /// `started`: the process id in the agent's table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// `started`: the process's pid in the guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<i32>,
    /// `stdout` / `stderr`: the bytes, base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    /// `exit`: the exit code when the process exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    /// `exit`: the signal when a signal ended the process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// `exit`: true when the agent killed the process because `timeout_ms` passed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub timed_out: bool,
    /// `error`: what went wrong.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Started,
    Stdout,
    Stderr,
    Exit,
    Error,
}

impl Event {
    pub fn new(seq: u64, kind: EventKind) -> Event {
        Event {
            seq,
            kind,
            id: None,
            pid: None,
            data: None,
            code: None,
            signal: None,
            timed_out: false,
            message: None,
        }
    }

    /// The decoded bytes of a `stdout`/`stderr` event.
    pub fn bytes(&self) -> Option<Vec<u8>> {
        let data = self.data.as_ref()?;
        base64::engine::general_purpose::STANDARD
            .decode(data.as_bytes())
            .ok()
    }

    /// One NDJSON line.
    pub fn to_line(&self) -> Vec<u8> {
        let mut line = serde_json::to_vec(self).expect("events always serialize");
        line.push(b'\n');
        line
    }
}

/// Encodes output bytes as one NDJSON line without an intermediate `Event` (the hot path of an
/// output stream: base64 needs no JSON escaping).
pub fn output_line(seq: u64, kind: EventKind, data: &[u8]) -> Vec<u8> {
    let name = match kind {
        EventKind::Stderr => "stderr",
        _ => "stdout",
    };
    let encoded_len = data.len().div_ceil(3) * 4;
    let mut line = Vec::with_capacity(encoded_len + 48);
    line.extend_from_slice(format!("{{\"seq\":{seq},\"type\":\"{name}\",\"data\":\"").as_bytes());
    let start = line.len();
    line.resize(start + encoded_len, 0);
    let written = base64::engine::general_purpose::STANDARD
        .encode_slice(data, &mut line[start..])
        .expect("buffer sized for base64");
    line.truncate(start + written);
    line.extend_from_slice(b"\"}\n");
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_normalized_lexically() {
        assert_eq!(normalize_path("/").unwrap(), "/");
        assert_eq!(normalize_path("/a/./b/../c/").unwrap(), "/a/c");
        assert_eq!(normalize_path("/../../etc//passwd").unwrap(), "/etc/passwd");
        assert!(normalize_path("relative/path").is_err());
        assert!(normalize_path("").is_err());
        assert!(normalize_path("/a\0b").is_err());
    }

    #[test]
    fn routes_decode() {
        assert_eq!(
            decode_request("GET", "/v1/health", b"").unwrap(),
            Request::Health
        );
        let r = decode_request("POST", "/v1/exec", br#"{"argv":["true"],"timeout_ms":5}"#).unwrap();
        match r {
            Request::Exec(spec) => {
                assert_eq!(spec.argv, vec!["true"]);
                assert_eq!(spec.timeout_ms, Some(5));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            decode_request("GET", "/v1/files/list?path=/a/../b&depth=3", b"").unwrap(),
            Request::ListDir {
                path: "/b".into(),
                depth: 3,
                user: UserParam::default(),
            }
        );
        assert_eq!(
            decode_request("GET", "/v1/files/stat?path=/etc&uid=0&gid=0", b"").unwrap(),
            Request::Stat {
                path: "/etc".into(),
                user: UserParam {
                    uid: Some(0),
                    gid: Some(0)
                },
            }
        );
        assert_eq!(
            decode_request("POST", "/v1/processes/p-1/stdin?close=true", b"ignored").unwrap(),
            Request::Stdin {
                id: "p-1".into(),
                close: true
            }
        );
        match decode_request("PUT", "/v1/files/content?path=%2Ftmp%2Fx&mode=0600", b"").unwrap() {
            Request::WriteFile(spec) => {
                assert_eq!(spec.path, "/tmp/x");
                assert_eq!(spec.mode, Some(FileModeParam(0o600)));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_requests_are_errors_with_statuses() {
        use http::StatusCode;
        let status = |m: &str, t: &str, b: &[u8]| decode_request(m, t, b).unwrap_err().status();
        assert_eq!(status("GET", "/nope", b""), StatusCode::NOT_FOUND);
        assert_eq!(status("GET", "/v2/health", b""), StatusCode::NOT_FOUND);
        assert_eq!(
            status("DELETE", "/v1/health", b""),
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert_eq!(status("POST", "/v1/exec", b"{"), StatusCode::BAD_REQUEST);
        assert_eq!(
            status("POST", "/v1/exec", br#"{"argv":[]}"#),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            status("POST", "/v1/exec", br#"{"argv":["a"],"bogus":1}"#),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            status("POST", "/v1/exec", &vec![b' '; MAX_JSON_BODY + 1]),
            StatusCode::PAYLOAD_TOO_LARGE
        );
        assert_eq!(
            status("GET", "/v1/processes/a%2Fb", b""),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            status("GET", "/v1/files/stat?path=rel", b""),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            status("GET", "/v1/files/list?path=/&depth=0", b""),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            status("POST", "/v1/files/remove", br#"{"path":"/a/.."}"#),
            StatusCode::BAD_REQUEST
        );
    }

    #[test]
    fn signals_by_name_or_number() {
        let decode = |b: &str| decode_request("POST", "/v1/processes/x/signal", b.as_bytes());
        for (body, want) in [
            (r#"{"signal":"SIGTERM"}"#, 15),
            (r#"{"signal":"int"}"#, 2),
            (r#"{"signal":9,"group":false}"#, 9),
        ] {
            match decode(body).unwrap() {
                Request::Signal { signal, .. } => assert_eq!(signal, want),
                other => panic!("{other:?}"),
            }
        }
        assert!(decode(r#"{"signal":"SIGNOPE"}"#).is_err());
        assert!(decode(r#"{"signal":0}"#).is_err());
    }

    #[test]
    fn modes_accept_numbers_and_octal_strings() {
        let decode = |b: &str| decode_request("POST", "/v1/files/chmod", b.as_bytes());
        for body in [
            r#"{"path":"/x","mode":"0755"}"#,
            r#"{"path":"/x","mode":493}"#,
        ] {
            match decode(body).unwrap() {
                Request::Chmod(spec) => assert_eq!(spec.mode, FileMode(0o755)),
                other => panic!("{other:?}"),
            }
        }
        assert!(decode(r#"{"path":"/x","mode":"9"}"#).is_err());
        assert!(decode(r#"{"path":"/x","mode":70000}"#).is_err());
    }

    #[test]
    fn output_lines_parse_back() {
        let line = output_line(7, EventKind::Stderr, b"hello\n\x00\xff");
        let event: Event = serde_json::from_slice(&line).unwrap();
        assert_eq!(event.seq, 7);
        assert_eq!(event.kind, EventKind::Stderr);
        assert_eq!(event.bytes().unwrap(), b"hello\n\x00\xff");
        let mut exit = Event::new(8, EventKind::Exit);
        exit.code = Some(3);
        let text = String::from_utf8(exit.to_line()).unwrap();
        assert_eq!(text, "{\"seq\":8,\"type\":\"exit\",\"code\":3}\n");
    }
}
