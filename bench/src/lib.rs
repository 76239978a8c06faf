//! Shared by the benchmarks that drive `wasinode node` on the local control plane
//! (`bin/node-bench.rs`, `bin/soak.rs`): a kube-runtime pod watch that records when each pod was
//! seen added, scheduled, Ready and deleted; WAGI pod specs; free loopback ports; `/proc` samples
//! of the agent; and [`Bench`], the control plane + agent + watch with pod create/Ready/delete
//! helpers. Everything here measures from a client's point of view and asserts no timing.

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use e2e::cluster::Cluster;
use e2e::wasinode::{Wasinode, get};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;
use tokio::sync::watch;

/// The Node's name.
pub const NODE: &str = "wasi-bench-node";
pub const NS: &str = "default";
/// Every pod of this run carries this label; its value names the group.
pub const LABEL: &str = "bench.wasinode.dev/group";

/// A number from the environment, or `default` when unset or not a number.
pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

// ------------------------------------------------------------------------------------------------
// What this process's watch has seen, with the instant it saw it.

#[derive(Default, Clone, Debug)]
pub struct Seen {
    pub added: Option<Instant>,
    pub scheduled: Option<Instant>,
    pub ready: Option<Instant>,
    /// Times the pod was seen not Ready after having been Ready.
    pub lost_ready: u32,
    pub deleted: Option<Instant>,
}

#[derive(Default)]
pub struct State {
    pub synced: bool,
    pub pods: HashMap<String, Seen>,
    /// `BenchProbe` condition messages seen on the floor pod.
    pub probes: HashMap<String, Instant>,
}

pub fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

impl State {
    pub fn observe(&mut self, pod: &Pod, now: Instant) {
        let Some(name) = pod.metadata.name.clone() else {
            return;
        };
        let seen = self.pods.entry(name).or_default();
        seen.added.get_or_insert(now);
        if pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.as_ref())
            .is_some()
        {
            seen.scheduled.get_or_insert(now);
        }
        if is_ready(pod) {
            seen.ready.get_or_insert(now);
        } else if seen.ready.is_some() && pod.metadata.deletion_timestamp.is_none() {
            seen.lost_ready += 1;
        }
        for c in pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .into_iter()
            .flatten()
        {
            if c.type_ == "BenchProbe"
                && let Some(m) = &c.message
            {
                self.probes.entry(m.clone()).or_insert(now);
            }
        }
    }
}

/// Watches this run's pods (label `LABEL` present) into a `watch` channel of [`State`].
pub fn spawn_watch(client: kube::Client) -> (watch::Receiver<State>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = watch::channel(State::default());
    let task = tokio::spawn(async move {
        let api: Api<Pod> = Api::namespaced(client, NS);
        let mut events = watcher(api, watcher::Config::default().labels(LABEL))
            .default_backoff()
            .boxed();
        while let Some(ev) = events.next().await {
            let now = Instant::now();
            match ev {
                Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) => {
                    tx.send_modify(|s| s.observe(&p, now))
                }
                Ok(watcher::Event::Delete(p)) => tx.send_modify(|s| {
                    if let Some(n) = &p.metadata.name {
                        s.pods
                            .entry(n.clone())
                            .or_default()
                            .deleted
                            .get_or_insert(now);
                    }
                }),
                Ok(watcher::Event::InitDone) => tx.send_modify(|s| s.synced = true),
                Ok(watcher::Event::Init) => {}
                Err(e) => eprintln!("bench: pod watch: {e} (the watcher retries)"),
            }
        }
    });
    (rx, task)
}

/// Waits until `pred` holds on the watched state; the error says what was awaited.
pub async fn wait_state(
    rx: &mut watch::Receiver<State>,
    what: &str,
    timeout: Duration,
    pred: impl FnMut(&State) -> bool,
) -> Result<()> {
    match tokio::time::timeout(timeout, rx.wait_for(pred)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(_)) => bail!("the pod watch ended while waiting for {what}"),
        Err(_) => bail!("timed out after {timeout:?} waiting for {what}"),
    }
}

// ------------------------------------------------------------------------------------------------
// Pods.

/// A WAGI pod serving `hello.wasm` on `/hello` at `127.0.0.1:port`, with the seed's nodeSelector
/// and tolerations; bound to `node` at creation when given.
pub fn wagi_pod(
    name: &str,
    group: &str,
    port: u16,
    image: &str,
    node: Option<&str>,
) -> Result<Pod> {
    let mut pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": NS,
            "labels": {LABEL: group},
            "annotations": {
                "alpha.wagi.krustlet.dev/default-host": format!("127.0.0.1:{port}"),
                "alpha.wagi.krustlet.dev/modules": r#"{"hello": {"route": "/hello"}}"#,
            },
        },
        "spec": {
            "nodeSelector": {"kubernetes.io/arch": "wasm32-wagi"},
            "tolerations": [
                {"key": "kubernetes.io/arch", "operator": "Equal", "value": "wasm32-wagi", "effect": "NoSchedule"},
                {"key": "kubernetes.io/arch", "operator": "Equal", "value": "wasm32-wagi", "effect": "NoExecute"},
            ],
            "terminationGracePeriodSeconds": 2,
            "containers": [{"name": "hello", "image": image}],
        },
    });
    if let Some(node) = node {
        pod["spec"]["nodeName"] = json!(node);
    }
    Ok(serde_json::from_value(pod)?)
}

/// Ports from `NODE_BASE_PORT` upward that nothing listens on right now.
pub struct Ports(pub u16);
impl Ports {
    /// The next port nothing listens on.
    pub fn free(&mut self) -> Result<u16> {
        loop {
            let p = self.0;
            ensure!(p < u16::MAX, "ran out of ports");
            self.0 += 1;
            if TcpListener::bind(("127.0.0.1", p)).is_ok() {
                return Ok(p);
            }
        }
    }
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub fn proc_status(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Where a process's resident memory is, from `/proc/<pid>/smaps`, in KiB: (the wasm instance
/// pool, other anonymous memory, file-backed and shared). The pool is told by its size: the
/// pooling allocator reserves one mapping of many GiB for every slot's linear memory, far larger
/// than any other (the allocator's arenas are at most a few GiB).
pub fn rss_split(pid: u32) -> Option<(u64, u64, u64)> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let (mut pool, mut anon, mut file) = (0u64, 0u64, 0u64);
    let mut kind = 1;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let Some(first) = fields.next() else { continue };
        if let Some((lo, hi)) = first.split_once('-')
            && let (Ok(lo), Ok(hi)) = (u64::from_str_radix(lo, 16), u64::from_str_radix(hi, 16))
        {
            // A mapping's header: address range, perms, offset, dev, inode, path.
            let path = fields.nth(4).unwrap_or("");
            kind = if hi.saturating_sub(lo) >= 64 << 30 {
                0
            } else if path.is_empty() || path.starts_with('[') {
                1
            } else {
                2
            };
        } else if first == "Rss:" {
            let kib: u64 = fields.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            match kind {
                0 => pool += kib,
                1 => anon += kib,
                _ => file += kib,
            }
        }
    }
    Some((pool, anon, file))
}

/// `rss_split` as text.
pub fn rss_split_text(pid: u32) -> String {
    match rss_split(pid) {
        Some((pool, anon, file)) => format!(
            "wasm pool {:.1} MiB, other anonymous {:.1} MiB, files and shared {:.1} MiB",
            pool as f64 / 1024.0,
            anon as f64 / 1024.0,
            file as f64 / 1024.0
        ),
        None => "smaps unreadable".into(),
    }
}

/// The agent's open descriptors.
pub fn open_fds(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64)
}

/// The agent's TCP sockets: (listening, other), from its descriptors and its network
/// namespace's `/proc/<pid>/net/tcp{,6}`. "Other" is mostly connected sockets: the API client's
/// pooled connections and clients of the node's own servers.
pub fn tcp_sockets(pid: u32) -> (u64, u64) {
    let inodes: std::collections::BTreeSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|t| {
            let t = t.to_string_lossy();
            Some(t.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
        })
        .collect();
    let (mut listening, mut other) = (0, 0);
    for table in ["tcp", "tcp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // sl local rem st tx:rx tr:when retrnsmt uid timeout inode ...
            let (Some(state), Some(inode)) = (f.get(3), f.get(9)) else {
                continue;
            };
            if inodes.contains(*inode) {
                if *state == "0A" {
                    listening += 1;
                } else {
                    other += 1;
                }
            }
        }
    }
    (listening, other)
}

/// The agent's descriptors by kind (`socket`, `pipe`, `anon_inode:[eventpoll]`, files by their
/// directory under the data dir or elsewhere), most numerous first.
pub fn fd_kinds(pid: u32, data_dir: &Path) -> String {
    let mut kinds: std::collections::BTreeMap<String, u32> = Default::default();
    for e in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let Ok(target) = std::fs::read_link(e.path()) else {
            continue;
        };
        let t = target.to_string_lossy();
        let kind = if let Some((k, _)) = t.split_once(':')
            && !t.starts_with('/')
        {
            k.to_string()
        } else if let Ok(rel) = target.strip_prefix(data_dir) {
            let top: std::path::PathBuf = rel.components().take(1).collect();
            format!("file <data>/{}", top.display())
        } else {
            format!("file {}", target.parent().unwrap_or(&target).display())
        };
        *kinds.entry(kind).or_default() += 1;
    }
    let mut v: Vec<(String, u32)> = kinds.into_iter().collect();
    v.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
    v.iter()
        .map(|(k, n)| format!("{n} {k}"))
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

pub fn answers_hello(port: u16) -> bool {
    get(&format!("127.0.0.1:{port}"), "/hello")
        .is_ok_and(|r| r.status == 200 && r.body.trim_end() == "hello world")
}

pub async fn node_ready(nodes: &Api<Node>) -> Result<bool> {
    let node = nodes.get(NODE).await?;
    Ok(node
        .status
        .and_then(|s| s.conditions)
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True")))
}

// ------------------------------------------------------------------------------------------------

/// The local control plane, one joined agent, and a pod watch: what node-bench and soak drive.
pub struct Bench {
    pub cluster: Cluster,
    pub agent: Wasinode,
    pub pods: Api<Pod>,
    pub rx: watch::Receiver<State>,
    pub image: String,
    pub ports: Ports,
    pub ready_timeout: Duration,
    pub failures: Vec<String>,
}

impl Bench {
    /// The bench over `cluster` and its joined `agent`: its pod watch started and synced, and
    /// the Node Ready (bootstrap CSR, Node, Ready) within 120 s. Also returns the watch's task.
    pub async fn joined(
        cluster: Cluster,
        agent: Wasinode,
        client: kube::Client,
        hello: &Path,
        base_port: u16,
        ready_timeout: Duration,
    ) -> Result<(Bench, tokio::task::JoinHandle<()>)> {
        let nodes: Api<Node> = Api::all(client.clone());
        let (rx, watch_task) = spawn_watch(client.clone());
        let mut b = Bench {
            cluster,
            agent,
            pods: Api::namespaced(client, NS),
            rx,
            image: format!("file://{}", hello.display()),
            ports: Ports(base_port),
            ready_timeout,
            failures: vec![],
        };
        wait_state(
            &mut b.rx,
            "the pod watch's initial list",
            Duration::from_secs(30),
            |s| s.synced,
        )
        .await?;
        let deadline = Instant::now() + Duration::from_secs(120);
        while !node_ready(&nodes).await.unwrap_or(false) {
            if Instant::now() > deadline {
                bail!("node {NODE} not Ready after 120 s:\n{}", b.agent_tail());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok((b, watch_task))
    }

    /// `n` WAGI pods named `{prefix}-{i}` in `group`, each on its own free port, bound to `node`
    /// at creation: their ports and specs, in order.
    pub fn port_pods(
        &mut self,
        prefix: &str,
        group: &str,
        n: usize,
        node: &str,
    ) -> Result<(Vec<u16>, Vec<Pod>)> {
        let mut ports = Vec::with_capacity(n);
        let mut specs = Vec::with_capacity(n);
        for i in 0..n {
            let port = self.ports.free()?;
            ports.push(port);
            specs.push(wagi_pod(
                &format!("{prefix}-{i}"),
                group,
                port,
                &self.image,
                Some(node),
            )?);
        }
        Ok((ports, specs))
    }

    pub fn agent_tail(&self) -> String {
        let out = self.agent.output();
        let lines: Vec<&str> = out.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    pub fn pod_dump(&self, name: &str) -> String {
        self.cluster
            .kubectl(&["describe", "pod", name, "-n", NS])
            .unwrap_or_else(|e| format!("{e:#}"))
    }

    /// Waits for `name` to be Ready; on timeout the error carries the pod and the agent's output.
    pub async fn wait_ready(&mut self, name: &str, timeout: Duration) -> Result<Instant> {
        let what = format!("pod {name} to be Ready");
        if let Err(e) = wait_state(&mut self.rx, &what, timeout, |s| {
            s.pods.get(name).is_some_and(|p| p.ready.is_some())
        })
        .await
        {
            bail!(
                "{e:#}\n{}\n--- agent output (tail)\n{}",
                self.pod_dump(name),
                self.agent_tail()
            );
        }
        Ok(self.rx.borrow().pods[name].ready.expect("ready"))
    }

    /// Deletes every pod of `groups` and waits until the watch saw each deleted.
    pub async fn delete_groups(&mut self, groups: &[&str]) -> Result<(usize, Duration)> {
        let selector = format!("{LABEL} in ({})", groups.join(","));
        let names: Vec<String> = self
            .pods
            .list(&ListParams::default().labels(&selector))
            .await?
            .items
            .into_iter()
            .filter_map(|p| p.metadata.name)
            .collect();
        let t0 = Instant::now();
        self.pods
            .delete_collection(
                &DeleteParams::default(),
                &ListParams::default().labels(&selector),
            )
            .await?;
        let what = format!("{} pods of {groups:?} to be deleted", names.len());
        wait_state(&mut self.rx, &what, Duration::from_secs(180), |s| {
            names
                .iter()
                .all(|n| s.pods.get(n).is_some_and(|p| p.deleted.is_some()))
        })
        .await
        .with_context(|| self.agent_tail())?;
        Ok((names.len(), t0.elapsed()))
    }

    /// Creates a bound pod and waits for Ready: (create sent -> Ready, create sent -> ADDED,
    /// create round-trip).
    pub async fn bound_pod(
        &mut self,
        name: &str,
        group: &str,
    ) -> Result<(Duration, Duration, Duration, u16)> {
        let port = self.ports.free()?;
        let pod = wagi_pod(name, group, port, &self.image, Some(NODE))?;
        let t0 = Instant::now();
        self.pods.create(&PostParams::default(), &pod).await?;
        let rtt = t0.elapsed();
        let ready = self.wait_ready(name, self.ready_timeout).await?;
        let added = self.rx.borrow().pods[name]
            .added
            .expect("added before ready");
        Ok((ready - t0, added.saturating_duration_since(t0), rtt, port))
    }

    /// One churn cycle: a pod on each of `ports` (group `group`), all Ready, then all deleted.
    /// Returns the time from the first create to the last deletion seen.
    pub async fn churn(
        &mut self,
        group: &str,
        ports: &[u16],
        concurrency: usize,
    ) -> Result<Duration> {
        let mut names = vec![];
        let mut specs = vec![];
        for (i, port) in ports.iter().enumerate() {
            let name = format!("bench-{group}-{i}");
            specs.push(wagi_pod(&name, group, *port, &self.image, Some(NODE))?);
            names.push(name);
        }
        let t0 = Instant::now();
        let api = self.pods.clone();
        let created: Vec<Result<()>> = futures::stream::iter(specs)
            .map(|pod| {
                let api = api.clone();
                async move {
                    api.create(&PostParams::default(), &pod).await?;
                    Ok(())
                }
            })
            .buffer_unordered(concurrency)
            .collect()
            .await;
        created.into_iter().collect::<Result<Vec<()>>>()?;
        let timeout = self.ready_timeout.max(Duration::from_secs(300));
        let what = format!("every pod of {group} to be Ready");
        wait_state(&mut self.rx, &what, timeout, |s| {
            names
                .iter()
                .all(|n| s.pods.get(n).is_some_and(|p| p.ready.is_some()))
        })
        .await
        .with_context(|| self.agent_tail())?;
        self.delete_groups(&[group]).await?;
        Ok(t0.elapsed())
    }

    pub fn fail(&mut self, what: String) {
        println!("  FAILED: {what}");
        self.failures.push(what);
    }
}

pub async fn admin_client(kubeconfig: &Path) -> Result<kube::Client> {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig)
        .with_context(|| format!("reading {}", kubeconfig.display()))?;
    let config =
        kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
            .await?;
    Ok(kube::Client::try_from(config)?)
}
