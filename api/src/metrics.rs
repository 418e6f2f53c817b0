//! Prometheus metrics: sandboxes by state, start latency histogram, exec counts, errors.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Upper bounds (seconds) of the start latency histogram.
pub const START_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

#[derive(Default)]
pub struct Metrics {
    start_buckets: Mutex<Vec<u64>>,
    start_sum_us: AtomicU64,
    start_count: AtomicU64,
    execs: Mutex<BTreeMap<&'static str, u64>>,
    errors: Mutex<BTreeMap<&'static str, u64>>,
    requests: Mutex<BTreeMap<u16, u64>>,
    pub sandboxes_created: AtomicU64,
    pub sandboxes_failed: AtomicU64,
}

impl Metrics {
    pub fn new() -> Metrics {
        Metrics {
            start_buckets: Mutex::new(vec![0; START_BUCKETS.len()]),
            ..Default::default()
        }
    }

    pub fn observe_start(&self, seconds: f64) {
        let mut b = self.start_buckets.lock().unwrap();
        for (i, le) in START_BUCKETS.iter().enumerate() {
            if seconds <= *le {
                b[i] += 1;
            }
        }
        self.start_sum_us
            .fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
        self.start_count.fetch_add(1, Ordering::Relaxed);
    }

    /// `result`: ok (exit 0), nonzero, signal, error.
    pub fn exec(&self, result: &'static str) {
        *self.execs.lock().unwrap().entry(result).or_default() += 1;
    }

    pub fn error(&self, kind: &'static str) {
        *self.errors.lock().unwrap().entry(kind).or_default() += 1;
    }

    pub fn request(&self, status: u16) {
        *self.requests.lock().unwrap().entry(status).or_default() += 1;
    }

    /// The text exposition format; `states` are the current sandbox counts.
    pub fn render(&self, states: &[(&str, u64)], backend: &str) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP airlock_sandboxes Sandboxes known to the daemon, by state."
        );
        let _ = writeln!(out, "# TYPE airlock_sandboxes gauge");
        for (state, n) in states {
            let _ = writeln!(
                out,
                "airlock_sandboxes{{state=\"{state}\",backend=\"{backend}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP airlock_sandboxes_created_total Sandboxes started successfully."
        );
        let _ = writeln!(out, "# TYPE airlock_sandboxes_created_total counter");
        let _ = writeln!(
            out,
            "airlock_sandboxes_created_total {}",
            self.sandboxes_created.load(Ordering::Relaxed)
        );
        let _ = writeln!(out, "# HELP airlock_sandboxes_failed_total Sandboxes that failed to start or whose VMM/agent died.");
        let _ = writeln!(out, "# TYPE airlock_sandboxes_failed_total counter");
        let _ = writeln!(
            out,
            "airlock_sandboxes_failed_total {}",
            self.sandboxes_failed.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP airlock_sandbox_start_seconds Time from a create request to a ready agent."
        );
        let _ = writeln!(out, "# TYPE airlock_sandbox_start_seconds histogram");
        let buckets = self.start_buckets.lock().unwrap().clone();
        let count = self.start_count.load(Ordering::Relaxed);
        for (le, n) in START_BUCKETS.iter().zip(buckets) {
            let _ = writeln!(
                out,
                "airlock_sandbox_start_seconds_bucket{{le=\"{le}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "airlock_sandbox_start_seconds_bucket{{le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            out,
            "airlock_sandbox_start_seconds_sum {}",
            self.start_sum_us.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "airlock_sandbox_start_seconds_count {count}");
        let _ = writeln!(
            out,
            "# HELP airlock_execs_total Commands run through exec, by result."
        );
        let _ = writeln!(out, "# TYPE airlock_execs_total counter");
        for (result, n) in self.execs.lock().unwrap().iter() {
            let _ = writeln!(out, "airlock_execs_total{{result=\"{result}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "# HELP airlock_errors_total Errors answered by the API, by kind."
        );
        let _ = writeln!(out, "# TYPE airlock_errors_total counter");
        for (kind, n) in self.errors.lock().unwrap().iter() {
            let _ = writeln!(out, "airlock_errors_total{{kind=\"{kind}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "# HELP airlock_http_requests_total API requests, by status."
        );
        let _ = writeln!(out, "# TYPE airlock_http_requests_total counter");
        for (status, n) in self.requests.lock().unwrap().iter() {
            let _ = writeln!(
                out,
                "airlock_http_requests_total{{status=\"{status}\"}} {n}"
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let m = Metrics::new();
        m.observe_start(0.003);
        m.observe_start(0.2);
        m.exec("ok");
        m.error("not_found");
        let text = m.render(&[("running", 2)], "namespace");
        assert!(text.contains("airlock_sandbox_start_seconds_bucket{le=\"0.005\"} 1"));
        assert!(text.contains("airlock_sandbox_start_seconds_bucket{le=\"0.25\"} 2"));
        assert!(text.contains("airlock_sandbox_start_seconds_bucket{le=\"+Inf\"} 2"));
        assert!(text.contains("airlock_sandboxes{state=\"running\",backend=\"namespace\"} 2"));
        assert!(text.contains("airlock_execs_total{result=\"ok\"} 1"));
        assert!(text.contains("airlock_errors_total{kind=\"not_found\"} 1"));
    }
}
