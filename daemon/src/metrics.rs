//! Counters for `/metrics` (Prometheus text format). Cheap atomics and one small map; nothing here
//! is on a lock that a request waits for long.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the upstream latency histogram, in seconds.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// Audit write latency: the trail is written from every handler, which holds no `Metrics`.
static AUDIT_WRITES: std::sync::Mutex<Histogram> = std::sync::Mutex::new(Histogram {
    counts: [0; BUCKETS.len()],
    count: 0,
    sum: 0.0,
});

pub fn audit_write(took: Duration) {
    AUDIT_WRITES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .observe(took);
}

#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

#[derive(Default)]
pub struct Metrics {
    mints: AtomicU64,
    activations: AtomicU64,
    refusals: Mutex<BTreeMap<&'static str, u64>>,
    alerts: Mutex<BTreeMap<&'static str, u64>>,
    upstream: Mutex<BTreeMap<String, Histogram>>,
}

impl Metrics {
    pub fn mint(&self) {
        self.mints.fetch_add(1, Ordering::Relaxed);
    }

    pub fn activation(&self) {
        self.activations.fetch_add(1, Ordering::Relaxed);
    }

    pub fn refusal(&self, reason: &'static str) {
        *self
            .refusals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(reason)
            .or_default() += 1;
    }

    pub fn refusal_alert(&self, kind: &'static str) {
        *self
            .alerts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(kind)
            .or_default() += 1;
    }

    pub fn upstream(&self, service: &str, took: Duration) {
        let mut map = self.upstream.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(service.to_owned()).or_default().observe(took);
    }

    /// The Prometheus text exposition (version 0.0.4).
    pub fn render(&self, live_tokens: u64) -> String {
        let mut out = String::with_capacity(2048);
        let _ = writeln!(out, "# HELP till_mints_total Tokens minted.");
        let _ = writeln!(out, "# TYPE till_mints_total counter");
        let _ = writeln!(
            out,
            "till_mints_total {}",
            self.mints.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP till_activations_total Activations spent (requests sent upstream)."
        );
        let _ = writeln!(out, "# TYPE till_activations_total counter");
        let _ = writeln!(
            out,
            "till_activations_total {}",
            self.activations.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP till_refusals_total Requests refused, by reason."
        );
        let _ = writeln!(out, "# TYPE till_refusals_total counter");
        for (reason, n) in self
            .refusals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(out, "till_refusals_total{{reason=\"{reason}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "# HELP till_live_tokens Tokens that can still be spent."
        );
        let _ = writeln!(out, "# TYPE till_live_tokens gauge");
        let _ = writeln!(out, "till_live_tokens {live_tokens}");
        let _ = writeln!(out, "# HELP till_alerts_total Alerts raised, by kind.");
        let _ = writeln!(out, "# TYPE till_alerts_total counter");
        for (kind, n) in self.alerts.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(out, "till_alerts_total{{kind=\"{kind}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "# HELP till_upstream_seconds Upstream request latency, to the answer's headers."
        );
        let _ = writeln!(out, "# TYPE till_upstream_seconds histogram");
        for (service, h) in self
            .upstream
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            for (i, le) in BUCKETS.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "till_upstream_seconds_bucket{{service=\"{service}\",le=\"{le}\"}} {}",
                    h.counts[i]
                );
            }
            let _ = writeln!(
                out,
                "till_upstream_seconds_bucket{{service=\"{service}\",le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(
                out,
                "till_upstream_seconds_sum{{service=\"{service}\"}} {}",
                h.sum
            );
            let _ = writeln!(
                out,
                "till_upstream_seconds_count{{service=\"{service}\"}} {}",
                h.count
            );
        }
        let _ = writeln!(
            out,
            "# HELP till_audit_write_seconds Time to append one event to the trail."
        );
        let _ = writeln!(out, "# TYPE till_audit_write_seconds histogram");
        let h = AUDIT_WRITES.lock().unwrap_or_else(|e| e.into_inner());
        for (i, le) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "till_audit_write_seconds_bucket{{le=\"{le}\"}} {}",
                h.counts[i]
            );
        }
        let _ = writeln!(
            out,
            "till_audit_write_seconds_bucket{{le=\"+Inf\"}} {}",
            h.count
        );
        let _ = writeln!(out, "till_audit_write_seconds_sum {}", h.sum);
        let _ = writeln!(out, "till_audit_write_seconds_count {}", h.count);
        out
    }
}

impl Histogram {
    fn observe(&mut self, took: Duration) {
        let secs = took.as_secs_f64();
        for (i, le) in BUCKETS.iter().enumerate() {
            if secs <= *le {
                self.counts[i] += 1;
            }
        }
        self.count += 1;
        self.sum += secs;
    }
}
