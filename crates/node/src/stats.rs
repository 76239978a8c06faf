//! The kubelet's resource stats: `/stats/summary` (the stats/v1alpha1 `Summary` as JSON) and
//! `/metrics/resource` (the Prometheus text that metrics-server scrapes), from the supervisor's
//! per-container usage ([`workload::usage`]) and the node's own figures from /proc.
//!
//! - Node CPU: `/proc/stat`'s first line, every state but idle and iowait, in core-nanoseconds;
//!   memory: `MemTotal - MemFree` used, less `Inactive(file)` for the working set (as the
//!   kubelet reads the root cgroup), `MemAvailable` available, `AnonPages` as RSS.
//! - The agent itself is the `kubelet` system container (`/proc/self/stat`, `VmRSS`).
//! - Pods and containers: CPU time measured per invocation, memory of the live instances and
//!   the compiled code each container holds. A pod's figures are its containers' sums.
//! - `usageNanoCores` is the rate since the previous sample at least a second older (or since
//!   the start, before there is one), as the kubelet's cadvisor rates are between samples.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use workload::usage::{PodUsage, Usage};

use crate::time;

/// A Kubernetes `Time` with fractional seconds, as the summary's `time` fields carry them.
fn micro_time(t: SystemTime) -> Value {
    let ts = k8s_openapi::jiff::Timestamp::try_from(t).unwrap_or_default();
    serde_json::to_value(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
        ts,
    ))
    .unwrap_or(Value::Null)
}

/// The node's figures from /proc at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeSample {
    pub cpu_ns: u64,
    pub boot: Option<SystemTime>,
    pub memory_usage: u64,
    pub memory_working_set: u64,
    pub memory_available: u64,
    pub memory_rss: u64,
    pub page_faults: Option<u64>,
    pub major_page_faults: Option<u64>,
    /// The agent's own CPU time and resident memory.
    pub agent_cpu_ns: u64,
    pub agent_rss: u64,
}

/// Busy time of all CPUs in clock ticks and the boot time (seconds since the epoch) from the
/// text of /proc/stat.
pub fn parse_proc_stat(text: &str) -> (Option<u64>, Option<u64>) {
    let mut busy = None;
    let mut btime = None;
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        match fields.next() {
            Some("cpu") => {
                let v: Vec<u64> = fields.filter_map(|f| f.parse().ok()).collect();
                // user nice system idle iowait irq softirq steal (guest time is in user already)
                let total: u64 = v.iter().take(8).sum();
                let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
                busy = Some(total.saturating_sub(idle));
            }
            Some("btime") => btime = fields.next().and_then(|f| f.parse().ok()),
            _ => {}
        }
    }
    (busy, btime)
}

/// A `Name:   N kB` field of /proc/meminfo or /proc/self/status, in bytes.
fn kib_field(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse::<u64>().ok())
        .map(|k| k * 1024)
}

/// Used, working set, available and RSS bytes from the text of /proc/meminfo.
pub fn parse_meminfo(text: &str) -> Option<(u64, u64, u64, u64)> {
    let total = kib_field(text, "MemTotal")?;
    let free = kib_field(text, "MemFree")?;
    let usage = total.saturating_sub(free);
    let inactive_file = kib_field(text, "Inactive(file)").unwrap_or(0);
    let available = kib_field(text, "MemAvailable").unwrap_or(free);
    let rss = kib_field(text, "AnonPages").unwrap_or(0);
    Some((usage, usage.saturating_sub(inactive_file), available, rss))
}

/// utime + stime in clock ticks from the text of /proc/<pid>/stat.
pub fn parse_pid_stat(text: &str) -> Option<u64> {
    // The command (field 2) is in parentheses and may hold spaces: fields count from its end.
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the command: state is field 3, utime field 14, stime field 15.
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some(utime + stime)
}

fn vmstat_field(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|n| n.trim().parse().ok())
}

/// Reads the node's figures (blocking: call it off the async workers).
pub fn sample_node() -> NodeSample {
    let ticks = rustix::param::clock_ticks_per_second().max(1);
    let ns_per_tick = 1_000_000_000 / ticks;
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let (busy, btime) = parse_proc_stat(&read("/proc/stat"));
    let (usage, ws, available, rss) = parse_meminfo(&read("/proc/meminfo")).unwrap_or_default();
    let vmstat = read("/proc/vmstat");
    let status = read("/proc/self/status");
    NodeSample {
        cpu_ns: busy.unwrap_or(0).saturating_mul(ns_per_tick),
        boot: btime.map(|s| UNIX_EPOCH + Duration::from_secs(s)),
        memory_usage: usage,
        memory_working_set: ws,
        memory_available: available,
        memory_rss: rss,
        page_faults: vmstat_field(&vmstat, "pgfault"),
        major_page_faults: vmstat_field(&vmstat, "pgmajfault"),
        agent_cpu_ns: parse_pid_stat(&read("/proc/self/stat"))
            .unwrap_or(0)
            .saturating_mul(ns_per_tick),
        agent_rss: kib_field(&status, "VmRSS").unwrap_or(0),
    }
}

/// A cumulative CPU figure at a moment, to rate the next one against.
#[derive(Debug, Clone, Copy)]
struct Point {
    at: SystemTime,
    cpu_ns: u64,
}

/// Samples older than this are replaced; rates are over at least this long.
const RATE_WINDOW: Duration = Duration::from_secs(1);

/// What `/stats/summary` and `/metrics/resource` are made from.
pub struct Stats {
    node_name: String,
    usage: Usage,
    started: SystemTime,
    /// The previous sample of each CPU counter, by what it counts.
    previous: Mutex<BTreeMap<String, Point>>,
}

/// One pod's figures at one moment.
struct PodFigures {
    pod: Arc<PodUsage>,
    containers: Vec<(String, SystemTime, u64, u64)>,
}

/// Everything a response is made of, read at one moment.
pub struct Snapshot {
    at: SystemTime,
    node: NodeSample,
    pods: Vec<PodFigures>,
}

impl Stats {
    pub fn new(node_name: String, usage: Usage) -> Arc<Stats> {
        Arc::new(Stats {
            node_name,
            usage,
            started: SystemTime::now(),
            previous: Mutex::new(BTreeMap::new()),
        })
    }

    /// Reads the node and every running pod now.
    pub async fn snapshot(&self) -> Snapshot {
        let node = tokio::task::spawn_blocking(sample_node)
            .await
            .unwrap_or_default();
        let at = SystemTime::now();
        let mut pods: Vec<PodFigures> = self
            .usage
            .pods()
            .into_iter()
            .map(|pod| {
                let containers = pod
                    .containers
                    .iter()
                    .filter_map(|c| {
                        let started = c.started()?;
                        Some((
                            c.name.clone(),
                            started,
                            c.meter.cpu_ns(),
                            c.meter.memory_bytes(),
                        ))
                    })
                    .collect();
                PodFigures { pod, containers }
            })
            .filter(|p| !p.containers.is_empty())
            .collect();
        pods.sort_by(|a, b| {
            (&a.pod.key.namespace, &a.pod.key.name).cmp(&(&b.pod.key.namespace, &b.pod.key.name))
        });
        Snapshot { at, node, pods }
    }

    /// Nanocores used since the previous sample of `what` (or since `since`), recording this one.
    fn rate(&self, what: String, now: Point, since: SystemTime) -> u64 {
        let mut prev = self.previous.lock().unwrap_or_else(|p| p.into_inner());
        let base = prev.get(&what).copied().unwrap_or(Point {
            at: since,
            cpu_ns: 0,
        });
        let secs = now
            .at
            .duration_since(base.at)
            .unwrap_or_default()
            .as_secs_f64();
        let rate = if secs > 0.0 && now.cpu_ns >= base.cpu_ns {
            ((now.cpu_ns - base.cpu_ns) as f64 / secs) as u64
        } else {
            0
        };
        let stale = now
            .at
            .duration_since(base.at)
            .is_ok_and(|d| d >= RATE_WINDOW);
        if stale || now.cpu_ns < base.cpu_ns {
            prev.insert(what, now);
        }
        rate
    }

    /// Forgets the samples of pods that no longer run.
    fn prune(&self, snap: &Snapshot) {
        let live: std::collections::HashSet<&str> =
            snap.pods.iter().map(|p| p.pod.key.uid.as_str()).collect();
        let mut prev = self.previous.lock().unwrap_or_else(|p| p.into_inner());
        prev.retain(|k, _| match k.split_once('/') {
            Some((uid, _)) => live.contains(uid),
            None => true,
        });
    }

    fn cpu(&self, what: String, at: SystemTime, cpu_ns: u64, since: SystemTime) -> Value {
        let nano_cores = self.rate(what, Point { at, cpu_ns }, since);
        json!({
            "time": micro_time(at),
            "usageNanoCores": nano_cores,
            "usageCoreNanoSeconds": cpu_ns,
        })
    }

    /// The stats/v1alpha1 `Summary`.
    pub fn summary(&self, snap: &Snapshot) -> Value {
        self.prune(snap);
        let at = snap.at;
        let n = &snap.node;
        let boot = n.boot.unwrap_or(self.started);
        let mut memory = json!({
            "time": micro_time(at),
            "availableBytes": n.memory_available,
            "usageBytes": n.memory_usage,
            "workingSetBytes": n.memory_working_set,
            "rssBytes": n.memory_rss,
        });
        if let (Some(pf), Some(mpf)) = (n.page_faults, n.major_page_faults) {
            memory["pageFaults"] = json!(pf);
            memory["majorPageFaults"] = json!(mpf);
        }
        let agent = json!({
            "name": "kubelet",
            "startTime": time(self.started),
            "cpu": self.cpu("kubelet".into(), at, n.agent_cpu_ns, self.started),
            "memory": {
                "time": micro_time(at),
                "usageBytes": n.agent_rss,
                "workingSetBytes": n.agent_rss,
                "rssBytes": n.agent_rss,
            },
        });
        let pods: Vec<Value> = snap
            .pods
            .iter()
            .map(|p| {
                let key = &p.pod.key;
                let containers: Vec<Value> = p
                    .containers
                    .iter()
                    .map(|(name, started, cpu, mem)| {
                        json!({
                            "name": name,
                            "startTime": time(*started),
                            "cpu": self.cpu(format!("{}/{name}", key.uid), at, *cpu, *started),
                            "memory": {
                                "time": micro_time(at),
                                "usageBytes": mem,
                                "workingSetBytes": mem,
                                "rssBytes": mem,
                            },
                        })
                    })
                    .collect();
                let cpu: u64 = p.containers.iter().map(|c| c.2).sum();
                let mem: u64 = p.containers.iter().map(|c| c.3).sum();
                json!({
                    "podRef": {"name": key.name, "namespace": key.namespace, "uid": key.uid},
                    "startTime": time(p.pod.started),
                    "containers": containers,
                    "cpu": self.cpu(format!("{}/", key.uid), at, cpu, p.pod.started),
                    "memory": {
                        "time": micro_time(at),
                        "usageBytes": mem,
                        "workingSetBytes": mem,
                        "rssBytes": mem,
                    },
                })
            })
            .collect();
        json!({
            "node": {
                "nodeName": self.node_name,
                "systemContainers": [agent],
                "startTime": time(boot),
                "cpu": self.cpu("node".into(), at, n.cpu_ns, boot),
                "memory": memory,
            },
            "pods": pods,
        })
    }
}

/// A label value as the Prometheus text format escapes it.
fn escape(v: &str) -> String {
    v.replace('\\', r"\\")
        .replace('"', "\\\"")
        .replace('\n', r"\n")
}

fn ms(t: SystemTime) -> u128 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis()
}

fn secs(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// The kubelet's `/metrics/resource`: families sorted by name, each with the kubelet's HELP
/// and TYPE lines, labels sorted, and the time of each usage figure (milliseconds) after its
/// value, as the kubelet writes them and metrics-server reads them.
pub fn resource_metrics(snap: &Snapshot) -> String {
    let at = ms(snap.at);
    let mut out = String::new();
    let family = |out: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
    };
    let container_labels = |p: &PodFigures, c: &str| {
        format!(
            "container=\"{}\",namespace=\"{}\",pod=\"{}\"",
            escape(c),
            escape(&p.pod.key.namespace),
            escape(&p.pod.key.name)
        )
    };
    let pod_labels = |p: &PodFigures| {
        format!(
            "namespace=\"{}\",pod=\"{}\"",
            escape(&p.pod.key.namespace),
            escape(&p.pod.key.name)
        )
    };
    family(
        &mut out,
        "container_cpu_usage_seconds_total",
        "counter",
        "[STABLE] Cumulative cpu time consumed by the container in core-seconds",
    );
    for p in &snap.pods {
        for (c, _, cpu, _) in &p.containers {
            let _ = writeln!(
                out,
                "container_cpu_usage_seconds_total{{{}}} {} {at}",
                container_labels(p, c),
                secs(*cpu)
            );
        }
    }
    family(
        &mut out,
        "container_memory_working_set_bytes",
        "gauge",
        "[STABLE] Current working set of the container in bytes",
    );
    for p in &snap.pods {
        for (c, _, _, mem) in &p.containers {
            let _ = writeln!(
                out,
                "container_memory_working_set_bytes{{{}}} {mem} {at}",
                container_labels(p, c)
            );
        }
    }
    family(
        &mut out,
        "container_start_time_seconds",
        "gauge",
        "[STABLE] Start time of the container since unix epoch in seconds",
    );
    for p in &snap.pods {
        for (c, started, _, _) in &p.containers {
            let t = started
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64();
            let _ = writeln!(
                out,
                "container_start_time_seconds{{{}}} {t}",
                container_labels(p, c)
            );
        }
    }
    family(
        &mut out,
        "node_cpu_usage_seconds_total",
        "counter",
        "[STABLE] Cumulative cpu time consumed by the node in core-seconds",
    );
    let _ = writeln!(
        out,
        "node_cpu_usage_seconds_total {} {at}",
        secs(snap.node.cpu_ns)
    );
    family(
        &mut out,
        "node_memory_working_set_bytes",
        "gauge",
        "[STABLE] Current working set of the node in bytes",
    );
    let _ = writeln!(
        out,
        "node_memory_working_set_bytes {} {at}",
        snap.node.memory_working_set
    );
    family(
        &mut out,
        "pod_cpu_usage_seconds_total",
        "counter",
        "[STABLE] Cumulative cpu time consumed by the pod in core-seconds",
    );
    for p in &snap.pods {
        let cpu: u64 = p.containers.iter().map(|c| c.2).sum();
        let _ = writeln!(
            out,
            "pod_cpu_usage_seconds_total{{{}}} {} {at}",
            pod_labels(p),
            secs(cpu)
        );
    }
    family(
        &mut out,
        "pod_memory_working_set_bytes",
        "gauge",
        "[STABLE] Current working set of the pod in bytes",
    );
    for p in &snap.pods {
        let mem: u64 = p.containers.iter().map(|c| c.3).sum();
        let _ = writeln!(
            out,
            "pod_memory_working_set_bytes{{{}}} {mem} {at}",
            pod_labels(p)
        );
    }
    family(
        &mut out,
        "resource_scrape_error",
        "gauge",
        "[STABLE] 1 if there was an error while getting container metrics, 0 otherwise",
    );
    let _ = writeln!(out, "resource_scrape_error 0");
    family(
        &mut out,
        "scrape_error",
        "gauge",
        "[ALPHA] (Deprecated since 1.29.0) 1 if there was an error while getting container \
         metrics, 0 otherwise",
    );
    let _ = writeln!(out, "scrape_error 0");
    out
}

type Body = http_body_util::combinators::BoxBody<bytes::Bytes, std::convert::Infallible>;

fn response(content_type: &'static str, body: String) -> http::Response<Body> {
    use http_body_util::BodyExt;
    let mut r = http::Response::new(http_body_util::Full::new(bytes::Bytes::from(body)).boxed());
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    r
}

/// `GET /stats/summary`.
pub async fn summary_response(stats: &Stats) -> http::Response<Body> {
    let snap = stats.snapshot().await;
    let body = serde_json::to_string(&stats.summary(&snap)).unwrap_or_default();
    response("application/json", body)
}

/// `GET /metrics/resource`.
pub async fn resource_response(stats: &Stats) -> http::Response<Body> {
    let snap = stats.snapshot().await;
    response(
        "text/plain; version=0.0.4; charset=utf-8",
        resource_metrics(&snap),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_busy_time_and_boot() {
        let text = "cpu  100 5 50 1000 20 3 2 1 0 0\ncpu0 1 2 3 4\nbtime 1700000000\n";
        assert_eq!(parse_proc_stat(text), (Some(161), Some(1_700_000_000)));
    }

    #[test]
    fn meminfo_working_set() {
        let text = "MemTotal: 1000 kB\nMemFree: 200 kB\nMemAvailable: 600 kB\n\
                    Inactive(file): 300 kB\nAnonPages: 100 kB\n";
        assert_eq!(
            parse_meminfo(text),
            Some((800 * 1024, 500 * 1024, 600 * 1024, 100 * 1024))
        );
    }

    #[test]
    fn pid_stat_with_spaces_in_the_command() {
        let text = "42 (a b) S 1 42 42 0 -1 4194560 10 0 0 0 7 3 0 0 20 0 1 0 5 0 0";
        assert_eq!(parse_pid_stat(text), Some(10));
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
