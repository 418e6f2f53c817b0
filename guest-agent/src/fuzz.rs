//! Stable-Rust fuzzing of the request decoder (`protocol::decode_request`, the function the
//! server routes every request through). A seeded generator builds requests from a corpus of
//! valid ones, mutates them (bit flips, splices of tricky tokens, truncation, duplication) and
//! checks that decoding never panics and that what it accepts satisfies the protocol's
//! invariants. `cargo fuzz` needs nightly; this runs on stable in CI, bounded in time.

use std::time::{Duration, Instant};

use crate::protocol::{decode_request, Request};

/// A small, fast, seeded PRNG (xorshift64*): runs are reproducible from their seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// Valid requests the mutations start from: (method, target, body).
pub const CORPUS: &[(&str, &str, &str)] = &[
    ("GET", "/v1/health", ""),
    ("GET", "/v1/version", ""),
    (
        "POST",
        "/v1/exec",
        r#"{"argv":["sh","-c","echo hi"],"env":{"A":"b"},"cwd":"/tmp","timeout_ms":1000}"#,
    ),
    (
        "POST",
        "/v1/exec",
        r#"{"argv":["bash"],"pty":{"rows":24,"cols":80},"stdin":true,"uid":0,"gid":0}"#,
    ),
    ("POST", "/v1/processes", r#"{"argv":["sleep","10"]}"#),
    ("GET", "/v1/processes", ""),
    ("GET", "/v1/processes/p1", ""),
    ("GET", "/v1/processes/p1/attach", ""),
    ("GET", "/v1/processes/p1/wait?timeout_ms=100", ""),
    ("POST", "/v1/processes/p1/stdin?close=true", "data"),
    (
        "POST",
        "/v1/processes/p1/signal",
        r#"{"signal":"SIGTERM","group":true}"#,
    ),
    ("POST", "/v1/processes/p1/signal", r#"{"signal":9}"#),
    ("POST", "/v1/processes/p1/kill", ""),
    (
        "POST",
        "/v1/processes/p1/resize",
        r#"{"rows":50,"cols":132}"#,
    ),
    ("DELETE", "/v1/processes/p1", ""),
    ("POST", "/v1/processes/kill-all", ""),
    ("GET", "/v1/files/stat?path=/etc/passwd", ""),
    ("GET", "/v1/files/list?path=/tmp&depth=3", ""),
    (
        "GET",
        "/v1/files/content?path=/tmp/x&offset=10&length=20",
        "",
    ),
    (
        "PUT",
        "/v1/files/content?path=/tmp/x&mode=0600&uid=0&gid=0&create_parents=true&append=false",
        "body",
    ),
    (
        "POST",
        "/v1/files/mkdir",
        r#"{"path":"/tmp/a/b","mode":"0700","parents":true}"#,
    ),
    (
        "POST",
        "/v1/files/remove",
        r#"{"path":"/tmp/a","recursive":true,"missing_ok":true}"#,
    ),
    (
        "POST",
        "/v1/files/rename",
        r#"{"from":"/tmp/a","to":"/tmp/b"}"#,
    ),
    ("POST", "/v1/files/chmod", r#"{"path":"/tmp/b","mode":493}"#),
    ("POST", "/v1/time", r#"{"unix_ns":1700000000000000000}"#),
    ("POST", "/v1/entropy", r#"{"seed":"AAECAwQFBgc="}"#),
    ("POST", "/v1/shutdown", ""),
];

/// Fragments spliced into inputs: the kinds of thing that break hand-written decoders.
const TOKENS: &[&str] = &[
    "..",
    "/..",
    "%2e%2e",
    "%00",
    "\u{0}",
    "?",
    "&",
    "=",
    "%",
    "//",
    "/v1/",
    "{",
    "}",
    "[",
    "]",
    "\"",
    "\\",
    "\\u0000",
    ":",
    ",",
    "null",
    "true",
    "-1",
    "0",
    "1e999",
    "18446744073709551616",
    "-9223372036854775809",
    "340282366920938463463374607431768211456",
    "\u{ffff}",
    "é",
    "SIG",
    "\"argv\":",
    "\"path\":",
    "\"mode\":\"0777777\"",
    "\"signal\":\"KILL\"",
    "depth=65",
    "depth=0",
    "{\"rows\":0,\"cols\":0}",
    "=AAAA",
    "\"seed\":\"\"",
];

const METHODS: &[&str] = &[
    "GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "", "get", "P\u{0}ST",
];

fn mutate(rng: &mut Rng, input: &mut Vec<u8>) {
    for _ in 0..=rng.below(4) {
        match rng.below(7) {
            0 if !input.is_empty() => {
                let i = rng.below(input.len());
                input[i] ^= 1 << rng.below(8);
            }
            1 => {
                let i = rng.below(input.len() + 1);
                let token = rng.pick(TOKENS).as_bytes();
                input.splice(i..i, token.iter().copied());
            }
            2 if !input.is_empty() => {
                let i = rng.below(input.len());
                let n = rng.below(input.len() - i + 1);
                input.drain(i..i + n);
            }
            3 => {
                let len = input.len();
                input.truncate(rng.below(len + 1));
            }
            4 if !input.is_empty() && input.len() < 64 * 1024 => {
                let i = rng.below(input.len());
                let n = rng.below(input.len() - i + 1);
                let copy: Vec<u8> = input[i..i + n].to_vec();
                let at = rng.below(input.len() + 1);
                input.splice(at..at, copy);
            }
            5 => {
                let i = rng.below(input.len() + 1);
                let b = (rng.next_u64() & 0xff) as u8;
                input.insert(i, b);
            }
            _ => {
                let n = rng.below(16);
                for _ in 0..n {
                    input.push((rng.next_u64() & 0xff) as u8);
                }
            }
        }
    }
}

/// What a run did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FuzzReport {
    pub iterations: u64,
    pub accepted: u64,
    pub rejected: u64,
}

fn check_path(path: &str) {
    assert!(path.starts_with('/'), "accepted a relative path {path:?}");
    assert!(!path.contains('\0'), "accepted a NUL in {path:?}");
    assert!(
        path == "/"
            || !path
                .split('/')
                .skip(1)
                .any(|c| c.is_empty() || c == "." || c == ".."),
        "accepted an unnormalized path {path:?}"
    );
}

/// Invariants of every request the decoder accepts.
pub fn check_invariants(request: &Request) {
    match request {
        Request::Exec(spec) | Request::Start(spec) => {
            assert!(!spec.argv.is_empty() && !spec.argv[0].is_empty());
            if let Some(cwd) = &spec.cwd {
                check_path(cwd);
            }
        }
        Request::Stat { path, .. }
        | Request::ListDir { path, .. }
        | Request::ReadFile { path, .. } => check_path(path),
        Request::WriteFile(spec) => check_path(&spec.path),
        Request::Mkdir(spec) => check_path(&spec.path),
        Request::Remove(spec) => {
            check_path(&spec.path);
            assert_ne!(spec.path, "/");
        }
        Request::Rename(spec) => {
            check_path(&spec.from);
            check_path(&spec.to);
        }
        Request::Chmod(spec) => {
            check_path(&spec.path);
            assert!(spec.mode.0 <= 0o7777);
        }
        Request::Signal { signal, .. } => assert!((1..=64).contains(signal)),
        Request::AddEntropy { seed } => assert!(!seed.is_empty()),
        _ => {}
    }
}

/// Fuzzes the decoder until `budget` passes or `max_iterations` inputs have been tried.
pub fn run(seed: u64, budget: Duration, max_iterations: u64) -> FuzzReport {
    let mut rng = Rng::new(seed);
    let mut report = FuzzReport::default();
    let deadline = Instant::now() + budget;
    while report.iterations < max_iterations
        && (report.iterations % 256 != 0 || Instant::now() < deadline)
    {
        let (method, target, body) = *rng.pick(CORPUS);
        let method = if rng.below(8) == 0 {
            *rng.pick(METHODS)
        } else {
            method
        };
        let mut target = target.as_bytes().to_vec();
        let mut body = body.as_bytes().to_vec();
        match rng.below(3) {
            0 => mutate(&mut rng, &mut target),
            1 => mutate(&mut rng, &mut body),
            _ => {
                mutate(&mut rng, &mut target);
                mutate(&mut rng, &mut body);
            }
        }
        // hyper hands the server a valid &str target; any bytes may arrive in a body.
        let target = String::from_utf8_lossy(&target);
        match decode_request(method, &target, &body) {
            Ok(request) => {
                check_invariants(&request);
                report.accepted += 1;
            }
            Err(e) => {
                // Every rejection maps to a client error status with a message.
                assert!(e.status().is_client_error(), "{e} -> {}", e.status());
                assert!(!e.to_string().is_empty());
                report.rejected += 1;
            }
        }
        report.iterations += 1;
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corpus_is_valid() {
        for (method, target, body) in CORPUS {
            let r = decode_request(method, target, body.as_bytes());
            assert!(r.is_ok(), "{method} {target}: {r:?}");
        }
    }

    #[test]
    fn runs_are_reproducible() {
        let a = run(42, Duration::from_secs(10), 2000);
        let b = run(42, Duration::from_secs(10), 2000);
        assert_eq!(a, b);
        assert_eq!(a.iterations, 2000);
        assert!(a.accepted > 0 && a.rejected > 0, "{a:?}");
    }
}
