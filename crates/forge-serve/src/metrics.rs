//! `GET /metrics`: the server's counters in Prometheus' text format.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::registry::Registry;

/// Latency buckets, seconds.
const BUCKETS: [f64; 11] = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// One route's latencies: the count in each bucket (made cumulative when rendered), the sum and
/// the count.
type Latency = ([u64; BUCKETS.len()], f64, u64);

#[derive(Default)]
pub struct Metrics {
    /// Requests by (route, status).
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    latency: Mutex<BTreeMap<String, Latency>>,
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
    rejected: AtomicU64,
    attempts_passed: AtomicU64,
    attempts_failed: AtomicU64,
}

impl Metrics {
    pub fn request(&self, route: &str, status: u16, seconds: f64) {
        *self.requests.lock().expect("metrics").entry((route.to_string(), status)).or_default() += 1;
        let mut l = self.latency.lock().expect("metrics");
        let e = l.entry(route.to_string()).or_insert(([0; BUCKETS.len()], 0.0, 0));
        if let Some(i) = BUCKETS.iter().position(|b| seconds <= *b) {
            e.0[i] += 1;
        }
        e.1 += seconds;
        e.2 += 1;
    }

    pub fn tokens(&self, prompt: usize, completion: usize) {
        self.prompt_tokens.fetch_add(prompt as u64, Ordering::Relaxed);
        self.completion_tokens.fetch_add(completion as u64, Ordering::Relaxed);
    }

    /// One graded attempt of retry-until-success.
    pub fn attempt(&self, passed: bool) {
        let c = if passed { &self.attempts_passed } else { &self.attempts_failed };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// A request turned away because its model's queue was full.
    pub fn rejected(&self) {
        self.rejected.fetch_add(1, Ordering::Relaxed);
    }

    pub fn render(&self, registry: &Registry) -> String {
        let mut s = String::new();
        let family = |s: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        family(&mut s, "forge_requests_total", "counter", "HTTP requests by route and status.");
        for ((route, status), n) in self.requests.lock().expect("metrics").iter() {
            let _ = writeln!(s, "forge_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}");
        }
        family(&mut s, "forge_request_seconds", "histogram", "Request latency by route.");
        for (route, (buckets, sum, count)) in self.latency.lock().expect("metrics").iter() {
            let mut cum = 0;
            for (b, n) in BUCKETS.iter().zip(buckets) {
                cum += n;
                let _ = writeln!(s, "forge_request_seconds_bucket{{route=\"{route}\",le=\"{b}\"}} {cum}");
            }
            let _ = writeln!(s, "forge_request_seconds_bucket{{route=\"{route}\",le=\"+Inf\"}} {count}");
            let _ = writeln!(s, "forge_request_seconds_sum{{route=\"{route}\"}} {sum}");
            let _ = writeln!(s, "forge_request_seconds_count{{route=\"{route}\"}} {count}");
        }
        let counter = |s: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        };
        counter(
            &mut s,
            "forge_prompt_tokens_total",
            "Prompt tokens processed.",
            self.prompt_tokens.load(Ordering::Relaxed),
        );
        counter(
            &mut s,
            "forge_completion_tokens_total",
            "Tokens generated.",
            self.completion_tokens.load(Ordering::Relaxed),
        );
        counter(
            &mut s,
            "forge_rejected_total",
            "Requests turned away with 503: queue full.",
            self.rejected.load(Ordering::Relaxed),
        );
        family(&mut s, "forge_verified_attempts_total", "counter", "Answers graded by retry-until-success.");
        for (result, c) in [("pass", &self.attempts_passed), ("fail", &self.attempts_failed)] {
            let _ = writeln!(s, "forge_verified_attempts_total{{result=\"{result}\"}} {}", c.load(Ordering::Relaxed));
        }
        let c = registry.counts();
        counter(&mut s, "forge_model_loads_total", "Models loaded.", c.loads);
        counter(&mut s, "forge_model_load_failures_total", "Model loads that failed.", c.failed_loads);
        counter(&mut s, "forge_model_reloads_total", "NPCs pointed at a rebuild's new files.", c.reloads);
        counter(&mut s, "forge_model_evictions_total", "Models dropped to keep the memory budget.", c.evictions);
        let resident = registry.resident();
        let gauge = |s: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        gauge(&mut s, "forge_models_resident", "Models in memory.", resident.len() as u64);
        let working = registry.working_bytes();
        gauge(
            &mut s,
            "forge_resident_bytes",
            "Bytes counted against the budget: resident models, their answers, loads under way.",
            registry.used_bytes(),
        );
        gauge(&mut s, "forge_answer_bytes", "Bytes the running answers hold (KV caches, activations).", working);
        gauge(
            &mut s,
            "forge_memory_budget_bytes",
            "The memory budget: models (weights, tokenizers, adapters) and their running answers.",
            registry.budget(),
        );
        family(&mut s, "forge_model_resident_bytes", "gauge", "Bytes of each resident model.");
        for (name, b) in &resident {
            let _ = writeln!(s, "forge_model_resident_bytes{{model=\"{name}\"}} {b}");
        }
        s
    }
}
