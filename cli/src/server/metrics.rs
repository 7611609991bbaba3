//! `GET /metrics`: the runtime's state in the Prometheus text exposition format (0.0.4).
//!
//! Gauges are read from the runtime at scrape time (agents by state, tasks by status,
//! per-agent resource usage); counters come from the components' own counters (messages,
//! tasks, audit events) and from [`HttpMetrics`], which the request middleware updates.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use parking_lot::Mutex;
use symbiont_runtime::runtime::Runtime;
use symbiont_runtime::AgentState;

use super::AppState;

/// Upper bounds (seconds) of the request latency histogram's buckets.
const BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5, 2.5, 10.0,
];

#[derive(Default)]
struct Histogram {
    counts: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

impl Histogram {
    fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        for (i, bound) in BUCKETS.iter().enumerate() {
            if secs <= *bound {
                self.counts[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(
            u64::try_from(d.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }
}

/// Request counters and latencies by route.
#[derive(Default)]
pub struct HttpMetrics {
    /// (method, route, status) -> count.
    requests: Mutex<HashMap<(String, String, u16), u64>>,
    /// route -> latency histogram.
    latency: Mutex<HashMap<String, std::sync::Arc<Histogram>>>,
}

impl std::fmt::Debug for HttpMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpMetrics").finish_non_exhaustive()
    }
}

impl HttpMetrics {
    fn record(&self, method: &str, route: &str, status: u16, elapsed: Duration) {
        *self
            .requests
            .lock()
            .entry((method.to_string(), route.to_string(), status))
            .or_default() += 1;
        let histogram = self
            .latency
            .lock()
            .entry(route.to_string())
            .or_default()
            .clone();
        histogram.observe(elapsed);
    }
}

/// The middleware counting every request by its route template.
pub async fn track(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = req.method().as_str().to_string();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let response = next.run(req).await;
    state.metrics.record(
        &method,
        &route,
        response.status().as_u16(),
        started.elapsed(),
    );
    response
}

/// Escapes a label value.
fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// A text exposition being written.
struct Exposition {
    out: String,
}

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape(v));
            }
            self.out.push('}');
        }
        if value.is_finite() {
            let _ = writeln!(self.out, " {value}");
        } else if value.is_nan() {
            self.out.push_str(" NaN\n");
        } else if value > 0.0 {
            self.out.push_str(" +Inf\n");
        } else {
            self.out.push_str(" -Inf\n");
        }
    }

    fn single(&mut self, name: &str, kind: &str, help: &str, value: f64) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }
}

/// This process's resident memory (VmRSS), bytes.
pub fn resident_memory_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
}

/// Renders every metric.
pub fn render(runtime: &Runtime, http: &HttpMetrics) -> String {
    let mut e = Exposition {
        out: String::with_capacity(8192),
    };
    let health = runtime.health();
    e.single("symbiont_up", "gauge", "1 while the daemon serves.", 1.0);
    e.single(
        "symbiont_uptime_seconds",
        "gauge",
        "Seconds since the runtime started.",
        health.uptime_secs as f64,
    );
    if let Some(rss) = resident_memory_bytes() {
        e.single(
            "symbiont_process_resident_memory_bytes",
            "gauge",
            "The daemon's resident memory (VmRSS).",
            rss as f64,
        );
    }

    // Agents by state.
    let agents = runtime.list_agents();
    let mut by_state: BTreeMap<String, usize> = AgentState::ALL
        .iter()
        .map(|s| (crate::api::state_name(*s), 0))
        .collect();
    for a in &agents {
        *by_state.entry(crate::api::state_name(a.state)).or_default() += 1;
    }
    e.family("symbiont_agents", "gauge", "Agents by state.");
    for (state, n) in &by_state {
        e.sample("symbiont_agents", &[("state", state)], *n as f64);
    }

    // Tasks.
    let s = runtime.scheduler().stats();
    e.family("symbiont_tasks", "gauge", "Unfinished tasks by status.");
    for (status, n) in [
        ("queued", s.queued),
        ("delayed", s.delayed),
        ("waiting", s.waiting),
        ("running", s.running),
    ] {
        e.sample("symbiont_tasks", &[("status", status)], n as f64);
    }
    e.family(
        "symbiont_tasks_finished_total",
        "counter",
        "Tasks that reached a final status since the daemon started.",
    );
    for (status, n) in [
        ("completed", s.completed),
        ("failed", s.failed),
        ("timedout", s.timed_out),
        ("cancelled", s.cancelled),
    ] {
        e.sample(
            "symbiont_tasks_finished_total",
            &[("status", status)],
            n as f64,
        );
    }
    e.single(
        "symbiont_tasks_retried_total",
        "counter",
        "Retries scheduled since the daemon started.",
        s.retried as f64,
    );
    e.single(
        "symbiont_tasks_recovered_total",
        "counter",
        "Tasks re-queued from the store at start (after a restart or crash).",
        s.recovered as f64,
    );

    // Messages.
    let b = runtime.bus().stats();
    e.single(
        "symbiont_messages_sent_total",
        "counter",
        "Messages accepted into a mailbox.",
        b.sent as f64,
    );
    e.single(
        "symbiont_messages_delivered_total",
        "counter",
        "Messages delivered to their recipient.",
        b.delivered as f64,
    );
    e.single(
        "symbiont_messages_rejected_total",
        "counter",
        "Messages refused with SEC_001 (signature, policy, replay, TTL).",
        b.rejected as f64,
    );
    e.single(
        "symbiont_messages_dead_lettered_total",
        "counter",
        "Messages that went to the dead-letter queue.",
        b.dead_lettered as f64,
    );

    // Audit.
    let a = runtime.audit_stats();
    e.single(
        "symbiont_audit_events_appended_total",
        "counter",
        "Audit events submitted to the trail since the daemon started.",
        a.submitted as f64,
    );
    e.single(
        "symbiont_audit_events_durable_total",
        "counter",
        "Of which synced to disk and covered by a signed head.",
        a.flushed as f64,
    );

    // Per-agent resource usage.
    let names: HashMap<_, _> = agents.iter().map(|a| (a.id, a.name.clone())).collect();
    let usage = runtime.resources().all_usage();
    let per_agent: [(&str, &str, &str); 8] = [
        (
            "symbiont_agent_memory_bytes",
            "gauge",
            "Memory used by the agent's sandbox.",
        ),
        (
            "symbiont_agent_cpu_cores",
            "gauge",
            "CPU cores used over the last sampling interval.",
        ),
        (
            "symbiont_agent_cpu_seconds_total",
            "counter",
            "CPU time consumed by the agent's sandbox.",
        ),
        (
            "symbiont_agent_disk_read_bytes_total",
            "counter",
            "Bytes read from block devices.",
        ),
        (
            "symbiont_agent_disk_write_bytes_total",
            "counter",
            "Bytes written to block devices.",
        ),
        (
            "symbiont_agent_network_receive_bytes_total",
            "counter",
            "Bytes received.",
        ),
        (
            "symbiont_agent_network_transmit_bytes_total",
            "counter",
            "Bytes sent.",
        ),
        (
            "symbiont_agent_pids",
            "gauge",
            "Processes and threads in the sandbox.",
        ),
    ];
    for (i, (name, kind, help)) in per_agent.iter().enumerate() {
        e.family(name, kind, help);
        for u in &usage {
            let id = u.agent_id.to_string();
            let agent_name = names.get(&u.agent_id).cloned().unwrap_or_default();
            let value = match i {
                0 => u.memory_bytes as f64,
                1 => u.cpu_cores,
                2 => u.cpu_time_ns as f64 / 1e9,
                3 => u.disk_read_bytes as f64,
                4 => u.disk_write_bytes as f64,
                5 => u.net_rx_bytes as f64,
                6 => u.net_tx_bytes as f64,
                _ => u.pids as f64,
            };
            e.sample(name, &[("agent", &id), ("name", &agent_name)], value);
        }
    }

    // HTTP.
    let requests: Vec<_> = {
        let map = http.requests.lock();
        let mut v: Vec<_> = map.iter().map(|(k, n)| (k.clone(), *n)).collect();
        v.sort();
        v
    };
    e.family(
        "symbiont_http_requests_total",
        "counter",
        "API requests by method, route and status.",
    );
    for ((method, route, status), n) in &requests {
        e.sample(
            "symbiont_http_requests_total",
            &[
                ("method", method),
                ("route", route),
                ("status", &status.to_string()),
            ],
            *n as f64,
        );
    }
    let latency: Vec<_> = {
        let map = http.latency.lock();
        let mut v: Vec<_> = map.iter().map(|(k, h)| (k.clone(), h.clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    let name = "symbiont_http_request_duration_seconds";
    e.family(name, "histogram", "API request latency by route.");
    for (route, h) in &latency {
        for (i, bound) in BUCKETS.iter().enumerate() {
            e.sample(
                &format!("{name}_bucket"),
                &[("route", route), ("le", &bound.to_string())],
                h.counts[i].load(Ordering::Relaxed) as f64,
            );
        }
        let count = h.count.load(Ordering::Relaxed) as f64;
        e.sample(
            &format!("{name}_bucket"),
            &[("route", route), ("le", "+Inf")],
            count,
        );
        e.sample(
            &format!("{name}_sum"),
            &[("route", route)],
            h.sum_ns.load(Ordering::Relaxed) as f64 / 1e9,
        );
        e.sample(&format!("{name}_count"), &[("route", route)], count);
    }
    e.out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        let mut e = Exposition { out: String::new() };
        e.family("x", "gauge", "help\nmore");
        e.sample("x", &[("name", "q\"")], 1.5);
        e.sample("x", &[], f64::INFINITY);
        assert_eq!(
            e.out,
            "# HELP x help\\nmore\n# TYPE x gauge\nx{name=\"q\\\"\"} 1.5\nx +Inf\n"
        );
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(200));
        h.observe(Duration::from_millis(3));
        assert_eq!(h.counts[0].load(Ordering::Relaxed), 0);
        assert_eq!(h.counts[1].load(Ordering::Relaxed), 1);
        assert_eq!(h.counts[6].load(Ordering::Relaxed), 2);
        assert_eq!(h.count.load(Ordering::Relaxed), 2);
    }
}
