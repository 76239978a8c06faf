//! The kubelet API's resource stats on the real control plane: `/stats/summary` (stats/v1alpha1
//! JSON) and `/metrics/resource` (the Prometheus text metrics-server scrapes), read over TLS
//! with service-account tokens (TokenReview, then SubjectAccessReview on `nodes/stats` and
//! `nodes/metrics`, as the kubelet authorizes them):
//! - a caller bound to a ClusterRole with `nodes/stats` and `nodes/metrics` reads both; one
//!   without is refused 403;
//! - the node has non-zero CPU time and working set; a running WAGI pod and a running WASI
//!   command pod have non-zero memory and CPU, and the WAGI pod's CPU rises as it serves;
//! - every series metrics-server reads is there with its labels and timestamp;
//! - the agent's Prometheus `/metrics` (authorized as `nodes/metrics`) counts the pods'
//!   requests and instances;
//! - once a pod is deleted, it is gone from all three.
//!
//! Run: `cargo build --release -p wasinode && cargo test --release -p wasinode-e2e --test node_stats`

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use e2e::agent::{Agent, AgentOptions, TOLERATIONS, hello_pod};
use e2e::cluster::Cluster;
use e2e::registry::Registry;
use e2e::wasinode::{free_port, get};
use serde_json::{Value, json};

const TIMEOUT: Duration = Duration::from_secs(120);

/// GET `path` on the agent's kubelet API with `token`: status and body.
fn kubelet_get(agent: &Agent, token: &str, path: &str) -> Result<(u16, String)> {
    let out = std::process::Command::new("curl")
        .args(["-sk", "--max-time", "20", "-w", "\n%{http_code}", "-H"])
        .arg(format!("Authorization: Bearer {token}"))
        .arg(format!("https://127.0.0.1:{}{path}", agent.port))
        .output()
        .context("running curl")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').context("no status from curl")?;
    Ok((
        code.trim().parse().context("curl status")?,
        body.to_string(),
    ))
}

/// A service account's token; with `stats` it is bound to a ClusterRole that may read the
/// nodes' stats and metrics (what metrics-server's own role grants).
fn token(cluster: &Cluster, name: &str, stats: bool) -> Result<String> {
    cluster.kubectl(&["create", "serviceaccount", name, "-n", "default"])?;
    if stats {
        cluster.apply(&json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": "node-stats-reader"},
            "rules": [{"apiGroups": [""], "resources": ["nodes/stats", "nodes/metrics"],
                       "verbs": ["get"]}],
        }))?;
        cluster.apply(&json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": format!("{name}-node-stats")},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                        "name": "node-stats-reader"},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": "default"}],
        }))?;
    }
    Ok(cluster
        .kubectl(&["create", "token", name, "-n", "default"])?
        .trim()
        .to_string())
}

/// A WASI command pod that keeps printing (container `main`).
fn command_pod(name: &str, image: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "nodeSelector": {"kubernetes.io/arch": "wasm32-wagi"},
            "tolerations": serde_json::from_str::<Value>(TOLERATIONS).unwrap_or(Value::Null),
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 2,
            "containers": [{"name": "main", "image": image,
                            "env": [{"name": "LINES", "value": "100000000"},
                                    {"name": "EVERY_MS", "value": "20"}]}],
        },
    })
}

/// One sample line of Prometheus text: name, labels, value, timestamp.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
    timestamp: Option<i64>,
}

impl Sample {
    fn label(&self, k: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
    }
}

/// The samples of a Prometheus text exposition (no escapes in the label values used here).
fn parse_prometheus(text: &str) -> Result<Vec<Sample>> {
    let mut out = vec![];
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, rest) = match line.find('{') {
            Some(i) => {
                let j = line[i..].find('}').context("unclosed labels")? + i;
                (&line[..j + 1], line[j + 1..].trim())
            }
            None => line.split_once(' ').context("no value")?,
        };
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => {
                let l = l.trim_end_matches('}');
                let labels = l
                    .split("\",")
                    .filter(|kv| !kv.is_empty())
                    .map(|kv| {
                        let (k, v) = kv.split_once("=\"").unwrap_or((kv, ""));
                        (k.to_string(), v.trim_end_matches('"').to_string())
                    })
                    .collect();
                (n.to_string(), labels)
            }
            None => (series.to_string(), vec![]),
        };
        let mut f = rest.split_whitespace();
        let value = f
            .next()
            .context("no value")?
            .parse::<f64>()
            .with_context(|| format!("value of {line:?}"))?;
        let timestamp = f.next().map(|t| t.parse()).transpose()?;
        out.push(Sample {
            name,
            labels,
            value,
            timestamp,
        });
    }
    Ok(out)
}

fn find<'a>(samples: &'a [Sample], name: &str, pod: Option<&str>) -> Option<&'a Sample> {
    samples
        .iter()
        .find(|s| s.name == name && pod.is_none_or(|p| s.label("pod") == Some(p)))
}

fn summary(agent: &Agent, token: &str) -> Result<Value> {
    let (code, body) = kubelet_get(agent, token, "/stats/summary")?;
    ensure!(code == 200, "/stats/summary: HTTP {code}: {body}");
    serde_json::from_str(&body).with_context(|| format!("/stats/summary: {body}"))
}

fn pod_stats<'a>(summary: &'a Value, name: &str) -> Option<&'a Value> {
    summary["pods"]
        .as_array()?
        .iter()
        .find(|p| p["podRef"]["name"] == name)
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

fn resource(agent: &Agent, token: &str) -> Result<Vec<Sample>> {
    let (code, body) = kubelet_get(agent, token, "/metrics/resource")?;
    ensure!(code == 200, "/metrics/resource: HTTP {code}: {body}");
    parse_prometheus(&body).with_context(|| format!("parsing /metrics/resource:\n{body}"))
}

#[test]
fn stats_summary_and_resource_metrics() -> Result<()> {
    let registry = Registry::start();
    let cluster = Cluster::up()?;
    let agent = Agent::start_ready(&cluster, AgentOptions::new("wasi-stats"), TIMEOUT)?;
    let reader = token(&cluster, "stats-reader", true)?;
    let nobody = token(&cluster, "nobody", false)?;

    // Refused to a caller without nodes/stats and nodes/metrics.
    for path in ["/stats/summary", "/metrics/resource", "/metrics"] {
        let (code, body) = kubelet_get(&agent, &nobody, path)?;
        ensure!(code == 403, "{path} without the role: HTTP {code}: {body}");
    }

    let hello = registry.push_guest("hello")?;
    let looping = registry.push_guest("log_lines")?;
    let addr = format!("127.0.0.1:{}", free_port());
    cluster.apply(&hello_pod("web", &addr, &hello))?;
    cluster.apply(&command_pod("cmd", &looping))?;
    cluster
        .wait_for("web to serve", TIMEOUT, || {
            Ok(get(&addr, "/hello").is_ok_and(|r| r.status == 200))
        })
        .with_context(|| agent.output())?;

    // The node and both pods, with their containers.
    let mut s = Value::Null;
    cluster
        .wait_for("both pods in /stats/summary", TIMEOUT, || {
            s = summary(&agent, &reader)?;
            Ok(pod_stats(&s, "web").is_some() && pod_stats(&s, "cmd").is_some())
        })
        .with_context(|| format!("{s:#}\n{}", agent.output()))?;
    let node = &s["node"];
    ensure!(node["nodeName"] == "wasi-stats", "nodeName: {node}");
    ensure!(
        u(&node["cpu"]["usageCoreNanoSeconds"]) > 0,
        "node CPU: {node}"
    );
    ensure!(
        u(&node["memory"]["workingSetBytes"]) > 0,
        "node memory: {node}"
    );
    ensure!(node["startTime"].is_string(), "node startTime: {node}");
    for (pod, container) in [("web", "hello"), ("cmd", "main")] {
        let p = pod_stats(&s, pod).context("pod")?;
        ensure!(p["podRef"]["namespace"] == "default", "{pod}: {p}");
        ensure!(
            p["podRef"]["uid"].as_str().is_some_and(|u| !u.is_empty()),
            "{pod}: {p}"
        );
        let c = p["containers"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["name"] == container))
            .with_context(|| format!("{pod}: no container {container}: {p}"))?;
        ensure!(c["startTime"].is_string(), "{pod}: {c}");
        ensure!(
            u(&c["memory"]["workingSetBytes"]) > 0,
            "{pod}: container memory: {c}"
        );
        ensure!(
            u(&c["cpu"]["usageCoreNanoSeconds"]) > 0,
            "{pod}: container CPU: {c}"
        );
        ensure!(
            u(&p["memory"]["workingSetBytes"]) >= u(&c["memory"]["workingSetBytes"]),
            "{pod}: the pod holds less than its container: {p}"
        );
    }

    // Serving takes CPU, and the pod's CPU time says so.
    let cpu = |s: &Value| {
        u(&pod_stats(s, "web").map_or(Value::Null, |p| p["cpu"].clone())["usageCoreNanoSeconds"])
    };
    let before = cpu(&s);
    for _ in 0..300 {
        let r = get(&addr, "/hello")?;
        ensure!(r.status == 200, "GET /hello: {}", r.status);
    }
    cluster
        .wait_for("web's CPU time to rise", TIMEOUT, || {
            s = summary(&agent, &reader)?;
            Ok(cpu(&s) > before)
        })
        .with_context(|| format!("before {before}: {s:#}"))?;
    // A command's runs count too: its CPU rises while it prints.
    let cmd_cpu =
        |s: &Value| pod_stats(s, "cmd").map_or(0, |p| u(&p["cpu"]["usageCoreNanoSeconds"]));
    let cmd_before = cmd_cpu(&s);
    cluster.wait_for("cmd's CPU time to rise", TIMEOUT, || {
        s = summary(&agent, &reader)?;
        Ok(cmd_cpu(&s) > cmd_before)
    })?;

    // What metrics-server reads, with labels and timestamps.
    let m = resource(&agent, &reader)?;
    for name in [
        "node_cpu_usage_seconds_total",
        "node_memory_working_set_bytes",
    ] {
        let n = find(&m, name, None).with_context(|| format!("no {name}"))?;
        ensure!(n.value > 0.0 && n.timestamp.is_some(), "{name}: {n:?}");
    }
    for name in [
        "container_cpu_usage_seconds_total",
        "container_memory_working_set_bytes",
        "container_start_time_seconds",
        "pod_cpu_usage_seconds_total",
        "pod_memory_working_set_bytes",
    ] {
        let x = find(&m, name, Some("web")).with_context(|| format!("no {name} for web"))?;
        ensure!(x.label("namespace") == Some("default"), "{name}: {x:?}");
        ensure!(x.value > 0.0, "{name}: {x:?}");
        if name.starts_with("container_") {
            ensure!(x.label("container") == Some("hello"), "{name}: {x:?}");
        }
        // Usage carries the time it was read at (ms); start time is a plain gauge.
        ensure!(
            x.timestamp.is_some() != (name == "container_start_time_seconds"),
            "{name}: {x:?}"
        );
    }
    let web_cpu =
        find(&m, "container_cpu_usage_seconds_total", Some("web")).map_or(0.0, |x| x.value);
    ensure!(
        (web_cpu * 1e9) as u64 >= before,
        "container_cpu_usage_seconds_total {web_cpu} is below the summary's {before} ns"
    );
    for name in ["resource_scrape_error", "scrape_error"] {
        let e = find(&m, name, None).with_context(|| format!("no {name}"))?;
        ensure!(e.value == 0.0, "{name}: {e:?}");
    }

    // The agent's own metrics, as the kubelet's /metrics is authorized (nodes/metrics).
    let (code, body) = kubelet_get(&agent, &reader, "/metrics")?;
    ensure!(code == 200, "/metrics: HTTP {code}: {body}");
    let p = parse_prometheus(&body)?;
    let served = p
        .iter()
        .find(|x| {
            x.name == "wasinode_http_requests_total"
                && x.label("pod") == Some("web")
                && x.label("route") == Some("/hello")
                && x.label("code_class") == Some("2xx")
        })
        .with_context(|| format!("no 2xx count for web's /hello:\n{body}"))?;
    ensure!(served.value >= 300.0, "{served:?}");
    ensure!(
        find(&p, "wasinode_instances", Some("cmd")).is_some(),
        "no instances gauge for cmd:\n{body}"
    );

    // Deleted pods are gone from all three.
    cluster.delete_pod("web", TIMEOUT)?;
    cluster.delete_pod("cmd", TIMEOUT)?;
    cluster.wait_for("the deleted pods gone from the stats", TIMEOUT, || {
        let s = summary(&agent, &reader)?;
        let m = resource(&agent, &reader)?;
        let (_, own) = kubelet_get(&agent, &reader, "/metrics")?;
        let own = parse_prometheus(&own)?;
        let series = m
            .iter()
            .chain(&own)
            .any(|x| matches!(x.label("pod"), Some("web" | "cmd")));
        Ok(pod_stats(&s, "web").is_none() && pod_stats(&s, "cmd").is_none() && !series)
    })?;
    if find(
        &resource(&agent, &reader)?,
        "node_cpu_usage_seconds_total",
        None,
    )
    .is_none()
    {
        bail!("the node's series went with the pods");
    }
    cluster.down()
}

/// A WASI 0.3 service's instances serve its requests in the handler's own tasks; its CPU is
/// counted at the engine's epoch ticks, and shows in `/stats/summary` as any other container's.
#[test]
fn a_wasi_0_3_service_reports_its_cpu() -> Result<()> {
    let registry = Registry::start();
    let cluster = Cluster::up()?;
    let agent = Agent::start_ready(&cluster, AgentOptions::new("wasi-stats-p3"), TIMEOUT)?;
    let reader = token(&cluster, "stats-reader", true)?;
    let image = registry.push_component("http-hello-p3")?;
    let port = free_port();
    cluster.apply(&json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "p3", "namespace": "default"},
        "spec": {
            "nodeSelector": {"kubernetes.io/arch": "wasm32-wagi"},
            "tolerations": serde_json::from_str::<Value>(TOLERATIONS).unwrap_or(Value::Null),
            "terminationGracePeriodSeconds": 2,
            "containers": [{"name": "svc", "image": image,
                            "ports": [{"containerPort": port}]}],
        },
    }))?;
    let addr = format!("127.0.0.1:{port}");
    cluster
        .wait_for("the service to serve", TIMEOUT, || {
            Ok(get(&addr, "/").is_ok_and(|r| r.status == 200))
        })
        .with_context(|| agent.output())?;
    let cpu = |s: &Value| {
        pod_stats(s, "p3")
            .and_then(|p| p["containers"].as_array().cloned())
            .and_then(|cs| cs.into_iter().find(|c| c["name"] == "svc"))
            .map_or(0, |c| u(&c["cpu"]["usageCoreNanoSeconds"]))
    };
    let mut s = Value::Null;
    cluster.wait_for("p3 in /stats/summary", TIMEOUT, || {
        s = summary(&agent, &reader)?;
        Ok(pod_stats(&s, "p3").is_some())
    })?;
    let before = cpu(&s);
    // About a second of computing in the guest, over five requests.
    for _ in 0..5 {
        let r = get(&addr, "/spin?100")?;
        ensure!(r.status == 200 && r.body == "spun\n", "/spin: {r:?}");
    }
    s = summary(&agent, &reader)?;
    let after = cpu(&s);
    ensure!(
        after > before + 50_000_000,
        "the service computed for about a second but its CPU went {before} -> {after} ns"
    );
    cluster.down()
}
