//! Resource metrics as standard tooling reads them, on the real control plane with a real
//! metrics-server (built from its Go module by `tools/cluster metrics-server`, run as a host
//! process, registered as the APIService `v1beta1.metrics.k8s.io`; see `e2e::metrics_server`):
//! - three `wasinode node` agents, each on its own address of a veth pair's host end (a real
//!   address, as their InternalIP and where their WAGI listeners bind; metrics-server serves on
//!   the first), their `kubelet-serving` CSRs approved, so metrics-server scrapes
//!   `/metrics/resource` over TLS verified against the cluster CA, as `CN=metrics-server`
//!   authorized by SubjectAccessReview on `nodes/metrics`;
//! - `kubectl top node` shows every node with its CPU and memory;
//! - a Deployment of WAGI pods (cpu requests, the seed's nodeSelector and tolerations, one pod per
//!   node by anti-affinity: they all serve the same port on their node's address) shows in
//!   `kubectl top pod` while idle, and with a non-zero CPU once loaded;
//! - a HorizontalPodAutoscaler (autoscaling/v2, CPU utilization, short scale-down
//!   stabilization; the controller-manager syncs HPAs every 5 s) scales it out while a bounded
//!   load runs against its pods, and back in to its minimum after the load stops.
//!
//! Every wait is on a condition with a deadline; nothing asserts on timing.
//!
//! Run: `cargo build --release -p wasinode && cargo test --release -p wasinode-e2e --test node_top -- --nocapture`

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use e2e::agent::{Agent, AgentOptions, TOLERATIONS};
use e2e::cluster::Cluster;
use e2e::metrics_server::MetricsServer;
use e2e::netns::NetNs;
use e2e::registry::Registry;
use e2e::wasinode::free_port;
use serde_json::{Value, json};

const TIMEOUT: Duration = Duration::from_secs(90);
/// Scaling waits: metrics every 10 s (metrics-server's least resolution), a CPU rate needs two,
/// the HPA controller syncs every 5 s, new pods pull, start and turn Ready.
const SCALE_TIMEOUT: Duration = Duration::from_secs(240);
const NODES: [&str; 3] = ["wasi-top-1", "wasi-top-2", "wasi-top-3"];
const APP: &str = "top-hello";
/// The pods' CPU request; the HPA targets half of it.
const CPU_REQUEST: &str = "5m";
const TARGET_UTILIZATION: u32 = 50;
/// The load's bounds: it stops by itself after this long or this many requests.
const LOAD_MAX_TIME: Duration = Duration::from_secs(300);
const LOAD_MAX_REQUESTS: u64 = 2_000_000;
/// Pause after each round of one request to every target, so the load stays a few hundred
/// requests a second on a small shared machine.
const LOAD_PAUSE: Duration = Duration::from_millis(3);

#[test]
fn top_and_horizontal_pod_autoscaler() -> Result<()> {
    let registry = Registry::start();
    let cluster = Cluster::up()?;
    let net = NetNs::with_hosts(NODES.len() as u32)?;
    let mut agents = vec![];
    for (name, ip) in NODES.iter().zip(&net.host_ips) {
        let ip = ip.to_string();
        let opts = AgentOptions::new(name)
            .ip(&ip)
            .args(&["--pod-address", &ip]);
        agents.push(Agent::start(&cluster, opts)?);
    }
    let outputs = |agents: &[Agent]| -> String {
        agents
            .iter()
            .map(|a| format!("=== agent {}\n{}", a.node_name(), a.output()))
            .collect()
    };
    for agent in &mut agents {
        agent.wait_ready(&cluster, TIMEOUT)?;
    }
    for node in NODES {
        approve_serving_csr(&cluster, node).with_context(|| outputs(&agents))?;
    }
    let mut ms = MetricsServer::start(&cluster, net.host_ip.into())?;
    ms.wait_available(&cluster, TIMEOUT)?;
    let image = registry.push_guest("hello")?;
    let port = free_port();

    let run = || -> Result<()> {
        top_node(&cluster)?;
        autoscale(&cluster, &image, port)
    };
    let result = run().with_context(|| format!("{}\n{}", ms.output(), outputs(&agents)));
    ensure!(ms.running(), "metrics-server exited:\n{}", ms.output());
    result?;
    drop(ms);
    for agent in &mut agents {
        agent.terminate(Duration::from_secs(20))?;
    }
    cluster.down()
}

/// Approves the node's `kubernetes.io/kubelet-serving` CSR as an admin would, and waits until
/// it is issued (the agent then serves the cluster-signed certificate).
fn approve_serving_csr(cluster: &Cluster, node: &str) -> Result<()> {
    let mut name = String::new();
    cluster.wait_for(&format!("{node}'s kubelet-serving CSR"), TIMEOUT, || {
        let csrs = cluster.kubectl_json(&["get", "csr"])?;
        let found = csrs["items"].as_array().and_then(|items| {
            items.iter().find(|c| {
                c["spec"]["signerName"] == "kubernetes.io/kubelet-serving"
                    && c["spec"]["username"] == format!("system:node:{node}")
            })
        });
        if let Some(c) = found {
            name = c["metadata"]["name"].as_str().unwrap_or_default().into();
        }
        Ok(!name.is_empty())
    })?;
    cluster.kubectl(&["certificate", "approve", &name])?;
    cluster.wait_for(&format!("CSR {name} issued"), TIMEOUT, || {
        let csr = cluster.kubectl_json(&["get", "csr", &name])?;
        Ok(csr["status"]["certificate"]
            .as_str()
            .is_some_and(|c| !c.is_empty()))
    })
}

/// `kubectl top node` lists every node with a CPU figure and a non-zero memory figure.
fn top_node(cluster: &Cluster) -> Result<()> {
    let mut last = String::new();
    cluster
        .wait_for("kubectl top node to list every node", SCALE_TIMEOUT, || {
            last = cluster.kubectl(&["top", "node", "--no-headers"])?;
            Ok(NODES
                .iter()
                .all(|n| top_row(&last, n).is_some_and(|(_, mem)| mem > 0)))
        })
        .with_context(|| format!("last kubectl top node:\n{last}"))?;
    eprintln!("kubectl top node:\n{last}");
    // The same figures straight from the metrics API, as the HPA controller reads them.
    let list: Value = serde_json::from_str(&cluster.kubectl(&[
        "get",
        "--raw",
        "/apis/metrics.k8s.io/v1beta1/nodes",
    ])?)?;
    for node in NODES {
        let item = list["items"]
            .as_array()
            .and_then(|items| items.iter().find(|i| i["metadata"]["name"] == node))
            .with_context(|| format!("{node} missing from the metrics API: {list}"))?;
        ensure!(
            item["usage"]["cpu"].is_string() && item["usage"]["memory"].is_string(),
            "{item}"
        );
    }
    Ok(())
}

/// One `kubectl top` row for `name`: (CPU in millicores, memory in MiB).
fn top_row(out: &str, name: &str) -> Option<(u64, u64)> {
    out.lines().find_map(|l| {
        let cols: Vec<&str> = l.split_whitespace().collect();
        if cols.first() != Some(&name) {
            return None;
        }
        let cpu = cols.get(1)?;
        let cpu = match cpu.strip_suffix('m') {
            Some(m) => m.parse().ok()?,
            None => cpu.parse::<u64>().ok()? * 1000,
        };
        // Node rows: NAME CPU CPU% MEMORY MEMORY%; pod rows: NAME CPU MEMORY.
        let mem = cols
            .iter()
            .skip(2)
            .find(|c| c.ends_with("Mi") || c.ends_with("Ki") || c.ends_with("Gi"))?;
        let (num, unit) = mem.split_at(mem.len() - 2);
        let num: u64 = num.parse().ok()?;
        let mib = match unit {
            "Ki" => num.div_ceil(1024),
            "Gi" => num * 1024,
            _ => num,
        };
        Some((cpu, mib))
    })
}

fn deployment(image: &str, port: u16) -> Result<Value> {
    Ok(json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": APP, "namespace": "default"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": APP}},
            "template": {
                "metadata": {
                    "labels": {"app": APP},
                    "annotations": {
                        "alpha.wagi.krustlet.dev/default-host": format!("0.0.0.0:{port}"),
                        "alpha.wagi.krustlet.dev/modules": r#"{"hello": {"route": "/hello"}}"#,
                    },
                },
                "spec": {
                    "nodeSelector": {"kubernetes.io/arch": "wasm32-wagi"},
                    "tolerations": serde_json::from_str::<Value>(TOLERATIONS)?,
                    // Every replica serves the same port on its node's address: one per node.
                    "affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [{
                        "labelSelector": {"matchLabels": {"app": APP}},
                        "topologyKey": "kubernetes.io/hostname",
                    }]}},
                    "terminationGracePeriodSeconds": 5,
                    "containers": [{
                        "name": "hello",
                        "image": image,
                        "resources": {"requests": {"cpu": CPU_REQUEST}},
                    }],
                },
            },
        },
    }))
}

fn hpa() -> Value {
    json!({
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": APP, "namespace": "default"},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": APP},
            "minReplicas": 1,
            "maxReplicas": NODES.len(),
            "metrics": [{"type": "Resource", "resource": {
                "name": "cpu",
                "target": {"type": "Utilization", "averageUtilization": TARGET_UTILIZATION},
            }}],
            "behavior": {
                "scaleUp": {"stabilizationWindowSeconds": 0,
                    "policies": [{"type": "Pods", "value": NODES.len(), "periodSeconds": 5}]},
                "scaleDown": {"stabilizationWindowSeconds": 5,
                    "policies": [{"type": "Percent", "value": 100, "periodSeconds": 5}]},
            },
        },
    })
}

/// The Deployment's pods that are Running and Ready, as (name, podIP or else hostIP).
fn ready_pods(cluster: &Cluster) -> Result<Vec<(String, String)>> {
    let list =
        cluster.kubectl_json(&["get", "pods", "-n", "default", "-l", &format!("app={APP}")])?;
    Ok(list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| {
            p["metadata"]["deletionTimestamp"].is_null()
                && p["status"]["phase"] == "Running"
                && e2e::metrics_server::condition_true(p, "Ready")
        })
        .filter_map(|p| {
            Some((
                p["metadata"]["name"].as_str()?.to_string(),
                p["status"]["podIP"]
                    .as_str()
                    .or(p["status"]["hostIP"].as_str())?
                    .to_string(),
            ))
        })
        .collect())
}

/// How many of the Deployment's pods exist (terminating ones included).
fn pod_count(cluster: &Cluster) -> Result<usize> {
    let names = cluster.kubectl(&[
        "get",
        "pods",
        "-n",
        "default",
        "-l",
        &format!("app={APP}"),
        "-o",
        "name",
    ])?;
    Ok(names.lines().filter(|l| !l.trim().is_empty()).count())
}

fn hpa_status(cluster: &Cluster) -> Result<Value> {
    Ok(cluster.kubectl_json(&["get", "hpa", APP, "-n", "default"])?["status"].clone())
}

fn autoscale(cluster: &Cluster, image: &str, port: u16) -> Result<()> {
    cluster.apply(&deployment(image, port)?)?;
    let mut first = String::new();
    cluster.wait_for("the Deployment's first pod Ready", TIMEOUT, || {
        let pods = ready_pods(cluster)?;
        if let Some((name, _)) = pods.first() {
            first = name.clone();
        }
        Ok(!pods.is_empty())
    })?;
    // Idle (no request served yet), the pod still has metrics, as a container on a kubelet has.
    let mut last = String::new();
    cluster
        .wait_for(
            &format!("kubectl top pod to list the idle pod {first}"),
            SCALE_TIMEOUT,
            || {
                last = cluster.kubectl(&["top", "pod", "-n", "default", "--no-headers"])?;
                Ok(top_row(&last, &first).is_some())
            },
        )
        .with_context(|| format!("last kubectl top pod:\n{last}"))?;
    eprintln!("idle: kubectl top pod:\n{last}");
    cluster.apply(&hpa())?;

    let load = Load::start();
    let result = (|| -> Result<()> {
        let refresh = |load: &Load| -> Result<Vec<(String, String)>> {
            let pods = ready_pods(cluster)?;
            load.set_targets(pods.iter().map(|(_, ip)| format!("{ip}:{port}")).collect());
            Ok(pods)
        };
        refresh(&load)?;
        cluster
            .wait_for(
                &format!("kubectl top pod to show CPU for the loaded pod {first}"),
                SCALE_TIMEOUT,
                || {
                    load.check()?;
                    last = cluster.kubectl(&["top", "pod", "-n", "default", "--no-headers"])?;
                    Ok(top_row(&last, &first).is_some_and(|(cpu, _)| cpu > 0))
                },
            )
            .with_context(|| format!("last kubectl top pod:\n{last}"))?;
        eprintln!(
            "loaded ({} requests so far): kubectl top pod:\n{last}",
            load.served()
        );
        let started = Instant::now();
        let mut status = Value::Null;
        cluster
            .wait_for(
                "the HPA to want more than one replica",
                SCALE_TIMEOUT,
                || {
                    load.check()?;
                    refresh(&load)?;
                    status = hpa_status(cluster)?;
                    Ok(status["desiredReplicas"].as_u64().is_some_and(|n| n > 1))
                },
            )
            .with_context(|| describe_hpa(cluster, &status))?;
        eprintln!(
            "scaled out after {:?}: desiredReplicas {}",
            started.elapsed(),
            status["desiredReplicas"]
        );
        // The new replicas run, each on another node, and take their share of the load.
        let mut pods = vec![];
        cluster
            .wait_for("a second replica Ready", SCALE_TIMEOUT, || {
                load.check()?;
                pods = refresh(&load)?;
                Ok(pods.len() > 1)
            })
            .with_context(|| describe_hpa(cluster, &status))?;
        let mut nodes: Vec<&String> = pods.iter().map(|(_, ip)| ip).collect();
        nodes.sort();
        nodes.dedup();
        ensure!(
            nodes.len() == pods.len(),
            "two replicas on one node: {pods:?}"
        );
        eprintln!("ready replicas under load: {pods:?}");
        Ok(())
    })();
    let served = load.stop()?;
    result?;
    eprintln!("load stopped after {served} requests");

    let started = Instant::now();
    let mut status = Value::Null;
    cluster
        .wait_for(
            "the HPA to scale back in to one replica",
            SCALE_TIMEOUT,
            || {
                status = hpa_status(cluster)?;
                Ok(status["desiredReplicas"] == 1
                    && status["currentReplicas"] == 1
                    && pod_count(cluster)? == 1)
            },
        )
        .with_context(|| describe_hpa(cluster, &status))?;
    eprintln!("scaled in after {:?}", started.elapsed());
    let events = cluster.kubectl(&[
        "get",
        "events",
        "-n",
        "default",
        "--field-selector",
        &format!("involvedObject.name={APP}"),
    ])?;
    ensure!(
        events.contains("SuccessfulRescale"),
        "no SuccessfulRescale Event for the HPA:\n{events}"
    );
    Ok(())
}

fn describe_hpa(cluster: &Cluster, status: &Value) -> String {
    format!(
        "HPA status {status}\n{}\n{}",
        cluster
            .kubectl(&["describe", "hpa", APP, "-n", "default"])
            .unwrap_or_else(|e| format!("{e:#}")),
        cluster
            .kubectl(&["top", "pod", "-n", "default"])
            .unwrap_or_else(|e| format!("{e:#}")),
    )
}

/// A background load: GET /hello on every target in turn over kept-alive connections, until
/// stopped, [`LOAD_MAX_TIME`] or [`LOAD_MAX_REQUESTS`].
struct Load {
    targets: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    served: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl Load {
    fn start() -> Load {
        let targets = Arc::new(Mutex::new(Vec::<String>::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicU64::new(0));
        let (t, s, n) = (targets.clone(), stop.clone(), served.clone());
        let thread = std::thread::spawn(move || -> Result<()> {
            let deadline = Instant::now() + LOAD_MAX_TIME;
            let mut conns: Vec<(String, Option<BufReader<TcpStream>>)> = vec![];
            let mut failures = 0u32;
            while !s.load(Ordering::Relaxed)
                && Instant::now() < deadline
                && n.load(Ordering::Relaxed) < LOAD_MAX_REQUESTS
            {
                let now = t.lock().map(|v| v.clone()).unwrap_or_default();
                conns.retain(|(a, _)| now.contains(a));
                for a in &now {
                    if !conns.iter().any(|(b, _)| b == a) {
                        conns.push((a.clone(), None));
                    }
                }
                for (addr, conn) in &mut conns {
                    match request(addr, conn) {
                        Ok(()) => {
                            n.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            *conn = None;
                            failures += 1;
                            // A pod just deleted or not yet listening fails a few; many is a bug.
                            if failures > 1000 {
                                return Err(e.context("1000 failed load requests"));
                            }
                        }
                    }
                }
                std::thread::sleep(LOAD_PAUSE);
            }
            Ok(())
        });
        Load {
            targets,
            stop,
            served,
            thread: Some(thread),
        }
    }

    fn set_targets(&self, targets: Vec<String>) {
        if let Ok(mut t) = self.targets.lock() {
            *t = targets;
        }
    }

    fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// Fails when the load has ended (by an error or its bounds) before it was stopped.
    fn check(&self) -> Result<()> {
        if self.thread.as_ref().is_some_and(|t| t.is_finished()) {
            bail!("the load ended early after {} requests", self.served());
        }
        Ok(())
    }

    /// Stops the load; the number of requests served, or the error that ended it.
    fn stop(mut self) -> Result<u64> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join()
                .map_err(|_| anyhow::anyhow!("the load thread panicked"))??;
        }
        Ok(self.served())
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One keep-alive `GET /hello` on `conn` (connecting first if needed); expects 200 `hello world`.
fn request(addr: &str, conn: &mut Option<BufReader<TcpStream>>) -> Result<()> {
    if conn.is_none() {
        let s = TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        *conn = Some(BufReader::new(s));
    }
    let r = conn.as_mut().context("no connection")?;
    r.get_mut()
        .write_all(format!("GET /hello HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())?;
    let mut status = String::new();
    r.read_line(&mut status)?;
    ensure!(status.starts_with("HTTP/1.1 200"), "{addr}: {status:?}");
    let mut length = None;
    let mut close = false;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            bail!("{addr}: connection closed in the response head");
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            if k == "content-length" {
                length = v.parse::<usize>().ok();
            } else if k == "connection" && v.eq_ignore_ascii_case("close") {
                close = true;
            }
        }
    }
    let length = length.with_context(|| format!("{addr}: no Content-Length"))?;
    let mut body = vec![0; length];
    r.read_exact(&mut body)?;
    ensure!(
        body == b"hello world\n",
        "{addr}: body {:?}",
        String::from_utf8_lossy(&body)
    );
    if close {
        *conn = None;
    }
    Ok(())
}
