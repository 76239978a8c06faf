//! The Node object and its heartbeats: create or update the Node, keep its status true, and renew
//! its Lease in `kube-node-lease`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

use crate::eviction::EvictionHard;
use crate::host::{HostInfo, Pressure};
pub use crate::labels::{
    TaintSpec, check_key, check_value, default_taints, node_may_set, parse_labels, parse_taints,
};
use crate::{Config, time};

/// The `kubernetes.io/arch` label, taint key and `nodeInfo.architecture` of a wasinode node.
///
/// `nodeInfo.architecture` says `wasm32-wagi` rather than the host's `amd64`: the kubelet fills
/// both the label and that field from the platform its containers run on, and ours run on
/// wasm32 whatever the host CPU is. Keeping them equal means no tool sees two answers.
pub const ARCH: &str = "wasm32-wagi";
/// Semver within skew of a 1.33 control plane; the pre-release part names us.
pub const KUBELET_VERSION: &str = "v1.33.0-wasinode";
/// The kubelet's default `--max-pods`.
pub const MAX_PODS: u32 = 110;
pub const LEASE_NAMESPACE: &str = "kube-node-lease";
pub const LEASE_DURATION_SECONDS: i32 = 40;
/// How often the Lease is renewed (the kubelet's: a quarter of its duration).
pub const LEASE_RENEW: Duration = Duration::from_secs(10);
/// The longest one Lease call may take before it is given up and retried. Short, so that a call
/// that hangs (a stalled connection) costs seconds, and several retries fit in the Lease's 30 s
/// left after the renewal interval; a Lease PATCH on a healthy API server takes milliseconds.
pub const LEASE_CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// The first wait before a failed renewal is retried; it doubles up to [`LEASE_RENEW`].
pub const LEASE_RETRY_MIN: Duration = Duration::from_millis(200);
/// The longest a Node call (registration, GET, status PATCH) may take (the kubelet bounds its
/// heartbeat client by `nodeStatusUpdateFrequency`, 10 s).
pub const STATUS_CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// The status is rewritten at least this often even when nothing changed (the kubelet's
/// `nodeStatusReportFrequency`; the Lease is the heartbeat).
pub const STATUS_REPORT: Duration = Duration::from_secs(5 * 60);
/// How often the pressure conditions are measured (the kubelet's `nodeStatusUpdateFrequency`).
pub const STATUS_CHECK: Duration = Duration::from_secs(10);

/// Why a call of the heartbeat failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("no answer from the API server within {0:?}")]
    TimedOut(Duration),
    #[error(transparent)]
    Api(#[from] kube::Error),
}

/// `call`, given up after `limit`. Dropping a request that is waiting for its response closes
/// its connection, so the retry goes on another one.
async fn bounded<T>(
    limit: Duration,
    call: impl std::future::Future<Output = kube::Result<T>>,
) -> Result<T, CallError> {
    match tokio::time::timeout(limit, call).await {
        Ok(answer) => Ok(answer?),
        Err(_) => Err(CallError::TimedOut(limit)),
    }
}

pub fn runtime_version() -> String {
    format!("wasinode://{} (wasmtime 48)", env!("CARGO_PKG_VERSION"))
}

/// Labels and spec of the Node object (what `create` sends and an update patches). The
/// `--node-labels` are added to the seed's labels (and may override them).
pub fn node_object(cfg: &Config) -> Value {
    let mut labels = json!({
        "kubernetes.io/arch": ARCH,
        "kubernetes.io/os": "linux",
        "kubernetes.io/hostname": cfg.node_name,
        "beta.kubernetes.io/arch": ARCH,
        "beta.kubernetes.io/os": "linux",
        "agentpool": cfg.pool,
    });
    for (k, v) in &cfg.labels {
        labels[k] = json!(v);
    }
    let taints: Vec<Value> = cfg.taints.iter().map(TaintSpec::to_json).collect();
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": cfg.node_name,
            "labels": labels,
        },
        "spec": {
            "taints": taints,
        },
    })
}

/// Whether a taint is managed by Kubernetes itself (node lifecycle, cordon, cloud provider)
/// rather than registered by the node: re-registering keeps those.
fn system_taint(key: &str) -> bool {
    key.starts_with("node.kubernetes.io/") || key.starts_with("node.cloudprovider.kubernetes.io/")
}

/// The taints an existing Node should have: the registered ones plus the system taints it
/// carries now. `None` when it already has exactly those (ignoring `timeAdded`).
pub fn wanted_taints(have: &[Value], want: &[Value]) -> Option<Vec<Value>> {
    let same = |a: &Value, b: &Value| {
        a["key"] == b["key"]
            && a["effect"] == b["effect"]
            && a.get("value").and_then(Value::as_str).unwrap_or("")
                == b.get("value").and_then(Value::as_str).unwrap_or("")
    };
    let mut out: Vec<Value> = have
        .iter()
        .filter(|t| t["key"].as_str().is_some_and(system_taint))
        .cloned()
        .collect();
    for t in want {
        if !out.iter().any(|x| same(x, t)) {
            out.push(t.clone());
        }
    }
    let equal = out.len() == have.len() && out.iter().all(|t| have.iter().any(|h| same(h, t)));
    (!equal).then_some(out)
}

/// The node's conditions and when each last changed status.
#[derive(Debug, Default, Clone)]
pub struct Conditions {
    /// The thresholds of the pressure conditions.
    eviction: EvictionHard,
    /// type -> (status, lastTransitionTime).
    seen: HashMap<&'static str, (&'static str, SystemTime)>,
}

impl Conditions {
    pub fn new(eviction: EvictionHard) -> Conditions {
        Conditions {
            eviction,
            seen: HashMap::new(),
        }
    }

    /// The conditions for `pressure` at `now` (MemoryPressure, DiskPressure, PIDPressure,
    /// Ready), and whether any status differs from the previous call's.
    pub fn observe(&mut self, pressure: &Pressure, now: SystemTime) -> (Vec<Value>, bool) {
        let mut all: Vec<(&'static str, &'static str, &'static str, String)> = pressure
            .conditions(&self.eviction)
            .into_iter()
            .map(|c| (c.type_, c.status, c.reason, c.message))
            .collect();
        all.push((
            "Ready",
            "True",
            "KubeletReady",
            "wasinode is posting ready status".into(),
        ));
        let mut changed = false;
        let out = all
            .into_iter()
            .map(|(type_, status, reason, message)| {
                let since = match self.seen.get(type_) {
                    Some((s, t)) if *s == status => *t,
                    _ => {
                        changed = true;
                        self.seen.insert(type_, (status, now));
                        now
                    }
                };
                json!({
                    "type": type_, "status": status, "reason": reason, "message": message,
                    "lastHeartbeatTime": time(now), "lastTransitionTime": time(since),
                })
            })
            .collect();
        (out, changed)
    }
}

/// Whether the Node's conditions in the API differ in status from `conds` (or lack one).
pub fn differs(node: &Node, conds: &[Value]) -> bool {
    let have = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_deref())
        .unwrap_or_default();
    conds.iter().any(|c| {
        !have
            .iter()
            .any(|h| c["type"] == h.type_.as_str() && c["status"] == h.status.as_str())
    })
}

/// `status` of the Node as the kubelet would report it now, with `conditions` from
/// [`Conditions::observe`]. Allocatable is capacity less the kubelet's default hard eviction
/// thresholds (100 MiB of memory, 10% of the data dir's filesystem).
pub fn node_status(
    cfg: &Config,
    host: &HostInfo,
    pressure: &Pressure,
    conditions: Vec<Value>,
) -> Value {
    let mut capacity = json!({
        "cpu": host.cpus.to_string(),
        "memory": format!("{}Ki", host.memory_kib),
        "pods": cfg.max_pods.to_string(),
    });
    let mut allocatable = capacity.clone();
    let memory = crate::pods::Allocatable::of(host, &cfg.eviction_hard).memory;
    allocatable["memory"] = json!(format!("{}Ki", memory / 1024));
    if let Some(d) = pressure.disk {
        capacity["ephemeral-storage"] = json!(format!("{}Ki", d.total_bytes / 1024));
        let held = cfg
            .eviction_hard
            .nodefs_available
            .map_or(0, |t| t.min_of(d.total_bytes));
        allocatable["ephemeral-storage"] = json!(d.total_bytes.saturating_sub(held).to_string());
    }
    json!({
        "status": {
            "capacity": capacity,
            "allocatable": allocatable,
            "addresses": [
                {"type": "InternalIP", "address": cfg.node_ip.to_string()},
                {"type": "Hostname", "address": cfg.node_name},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": cfg.port}},
            "nodeInfo": {
                "machineID": host.machine_id,
                "systemUUID": host.system_uuid,
                "bootID": host.boot_id,
                "kernelVersion": host.kernel_version,
                "osImage": host.os_image,
                "containerRuntimeVersion": runtime_version(),
                "kubeletVersion": KUBELET_VERSION,
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": ARCH,
            },
            "conditions": conditions,
        }
    })
}

/// Creates the Node, or updates the labels and taints of an existing one of the same name.
/// Returns the Node's uid. The status is written by [`patch_status`]. Each API call is bounded
/// by [`STATUS_CALL_TIMEOUT`].
pub async fn register(client: &kube::Client, cfg: &Config) -> Result<String, CallError> {
    let nodes: Api<Node> = Api::all(client.clone());
    let want = node_object(cfg);
    let node = match bounded(STATUS_CALL_TIMEOUT, nodes.get_opt(&cfg.node_name)).await? {
        Some(existing) => {
            // Merge patch: our labels win, other labels (set by admins) stay.
            let labels = json!({"metadata": {"labels": want["metadata"]["labels"]}});
            let node = bounded(
                STATUS_CALL_TIMEOUT,
                nodes.patch(
                    &cfg.node_name,
                    &PatchParams::default(),
                    &Patch::Merge(&labels),
                ),
            )
            .await?;
            let have: Vec<Value> = existing
                .spec
                .as_ref()
                .and_then(|s| s.taints.as_ref())
                .map(|t| {
                    t.iter()
                        .filter_map(|t| serde_json::to_value(t).ok())
                        .collect()
                })
                .unwrap_or_default();
            let want_taints = want["spec"]["taints"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            match wanted_taints(&have, &want_taints) {
                None => node,
                Some(taints) => {
                    let patch = json!({"spec": {"taints": taints}});
                    let patched = bounded(
                        STATUS_CALL_TIMEOUT,
                        nodes.patch(
                            &cfg.node_name,
                            &PatchParams::default(),
                            &Patch::Merge(&patch),
                        ),
                    )
                    .await;
                    match patched {
                        Ok(n) => n,
                        Err(e @ CallError::TimedOut(_)) => return Err(e),
                        Err(CallError::Api(e)) => {
                            // NodeRestriction forbids a node to change its own taints once
                            // the Node exists: only an admin can.
                            let why = match &e {
                                kube::Error::Api(s) => s.message.clone(),
                                other => other.to_string(),
                            };
                            let list: Vec<String> =
                                cfg.taints.iter().map(ToString::to_string).collect();
                            tracing::warn!(
                                "node {} already exists with other taints, which this identity \
                                 cannot change ({why}); keeping them. An admin can set them \
                                 with `kubectl taint nodes {} ...`, or delete the Node so that \
                                 it is registered again with [{}]",
                                cfg.node_name,
                                cfg.node_name,
                                list.join(", ")
                            );
                            node
                        }
                    }
                }
            }
        }
        None => {
            let obj: Node = serde_json::from_value(want).map_err(kube::Error::SerdeError)?;
            match bounded(
                STATUS_CALL_TIMEOUT,
                nodes.create(&PostParams::default(), &obj),
            )
            .await
            {
                Ok(n) => n,
                Err(CallError::Api(kube::Error::Api(e))) if e.code == 409 => {
                    bounded(STATUS_CALL_TIMEOUT, nodes.get(&cfg.node_name)).await?
                }
                Err(e) => return Err(e),
            }
        }
    };
    Ok(node.metadata.uid.unwrap_or_default())
}

/// Writes the Node's status (a merge patch of `status`: conditions, capacity, nodeInfo...),
/// bounded by [`STATUS_CALL_TIMEOUT`].
pub async fn patch_status(
    client: &kube::Client,
    cfg: &Config,
    status: &Value,
) -> Result<(), CallError> {
    let nodes: Api<Node> = Api::all(client.clone());
    bounded(
        STATUS_CALL_TIMEOUT,
        nodes.patch_status(
            &cfg.node_name,
            &PatchParams::default(),
            &Patch::Merge(status),
        ),
    )
    .await?;
    Ok(())
}

fn lease_object(cfg: &Config, node_uid: &str, now: SystemTime) -> Value {
    json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": cfg.node_name,
            "namespace": LEASE_NAMESPACE,
            "ownerReferences": [{
                "apiVersion": "v1", "kind": "Node", "name": cfg.node_name, "uid": node_uid,
            }],
        },
        "spec": {
            "holderIdentity": cfg.node_name,
            "leaseDurationSeconds": LEASE_DURATION_SECONDS,
            "renewTime": micro_time(now),
        },
    })
}

fn micro_time(t: SystemTime) -> Value {
    let ts = k8s_openapi::jiff::Timestamp::try_from(t).unwrap_or_default();
    serde_json::to_value(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
        ts,
    ))
    .unwrap_or(Value::Null)
}

/// Creates the Lease or renews it, each API call bounded by [`LEASE_CALL_TIMEOUT`].
pub async fn renew_lease(
    client: &kube::Client,
    cfg: &Config,
    node_uid: &str,
) -> Result<(), CallError> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), LEASE_NAMESPACE);
    let now = SystemTime::now();
    let want = lease_object(cfg, node_uid, now);
    let patch = json!({"metadata": {"ownerReferences": want["metadata"]["ownerReferences"]}, "spec": want["spec"]});
    let patched = bounded(
        LEASE_CALL_TIMEOUT,
        leases.patch(
            &cfg.node_name,
            &PatchParams::default(),
            &Patch::Merge(&patch),
        ),
    )
    .await;
    match patched {
        Ok(_) => Ok(()),
        Err(CallError::Api(kube::Error::Api(e))) if e.code == 404 => {
            let obj: Lease = serde_json::from_value(want).map_err(kube::Error::SerdeError)?;
            bounded(
                LEASE_CALL_TIMEOUT,
                leases.create(&PostParams::default(), &obj),
            )
            .await?;
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// Keeps the node alive: registers (retrying with backoff until the API server answers), then
/// runs two tasks that cannot hold each other up: one renews the Lease every 10 s (retrying
/// a failed or timed-out renewal at once, with backoff), the other measures the pressure
/// conditions as often and rewrites the status when a condition changed, when the API's Node
/// shows other conditions, and at least every 5 minutes. Every API call is bounded by a short
/// timeout, so a call that hangs (a stalled connection) costs one attempt, not the Lease.
/// Never returns; dropping it (aborting its task) stops both tasks.
pub async fn heartbeat(client: kube::Client, cfg: Config, host: HostInfo, data_dir: PathBuf) {
    let mut delay = Duration::from_millis(500);
    let uid = loop {
        match register(&client, &cfg).await {
            Ok(uid) => break uid,
            Err(e) => {
                tracing::warn!(
                    "registering node {}: {e}; retrying in {delay:?}",
                    cfg.node_name
                );
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
    };
    tracing::info!(node = %cfg.node_name, "node registered");
    // Dropping the set aborts both tasks.
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(keep_lease(client.clone(), cfg.clone(), uid));
    tasks.spawn(keep_status(client, cfg, host, data_dir));
    while let Some(done) = tasks.join_next().await {
        if let Err(e) = done {
            tracing::error!("a node heartbeat task ended: {e}");
        }
    }
}

/// Renews the Lease every [`LEASE_RENEW`] after the last renewal; a failed renewal is retried
/// after [`LEASE_RETRY_MIN`], doubling up to [`LEASE_RENEW`] (as the kubelet's lease controller
/// retries). Never returns.
async fn keep_lease(client: kube::Client, cfg: Config, uid: String) {
    let mut clients = LeaseClient {
        shared: client,
        kubeconfig: cfg.client_renewal.as_ref().map(|r| r.kubeconfig.clone()),
        own: None,
        built_from: None,
    };
    let mut backoff = LEASE_RETRY_MIN;
    loop {
        let client = clients.get().await;
        match renew_lease(&client, &cfg, &uid).await {
            Ok(()) => {
                backoff = LEASE_RETRY_MIN;
                tokio::time::sleep(LEASE_RENEW).await;
            }
            Err(e) => {
                tracing::warn!("renewing lease: {e}; retrying in {backoff:?}");
                clients.forget();
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(LEASE_RENEW);
            }
        }
    }
}

/// The client the Lease is renewed with: one of its own, built from the node's kubeconfig, so
/// that its connection is used by nothing else (a watch or another task's call that hangs
/// cannot be the pooled connection the next renewal picks), and built again after a failed
/// renewal, so that the retry goes on a new connection (as the kubelet closes its connections
/// when heartbeats fail), and again when the kubeconfig changed (certificate renewal rewrites
/// it), so that the Lease is renewed with the current certificate. The agent's shared client
/// when there is no kubeconfig to build from.
struct LeaseClient {
    shared: kube::Client,
    kubeconfig: Option<PathBuf>,
    own: Option<kube::Client>,
    /// The kubeconfig's modification time when `own` was built.
    built_from: Option<SystemTime>,
}

impl LeaseClient {
    async fn get(&mut self) -> kube::Client {
        if let Some(path) = &self.kubeconfig {
            let modified = tokio::fs::metadata(path)
                .await
                .and_then(|m| m.modified())
                .ok();
            if modified != self.built_from {
                self.own = None;
            }
            if self.own.is_none() {
                match own_client(path.clone()).await {
                    Ok(c) => {
                        self.own = Some(c);
                        self.built_from = modified;
                    }
                    Err(e) => tracing::warn!(
                        "a client of its own for the Lease from {}: {e}; using the shared one",
                        path.display()
                    ),
                }
            }
        }
        self.own.clone().unwrap_or_else(|| self.shared.clone())
    }

    /// Drops the own client, closing its connections; the next [`LeaseClient::get`] builds
    /// another.
    fn forget(&mut self) {
        self.own = None;
    }
}

/// Why the Lease's own client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum LeaseClientError {
    #[error(transparent)]
    Kubeconfig(#[from] kube::config::KubeconfigError),
    #[error(transparent)]
    Client(#[from] kube::Error),
    #[error("building the client stopped: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// A new client (with a connection pool of its own) acting with the identity of `kubeconfig`.
/// Built on a blocking thread: it reads the kubeconfig and the files it names.
async fn own_client(kubeconfig: PathBuf) -> Result<kube::Client, LeaseClientError> {
    let runtime = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        runtime.block_on(async {
            let kc = kube::config::Kubeconfig::read_from(&kubeconfig)?;
            let config = kube::Config::from_custom_kubeconfig(
                kc,
                &kube::config::KubeConfigOptions::default(),
            )
            .await?;
            Ok(kube::Client::try_from(config)?)
        })
    })
    .await?
}

/// Every [`STATUS_CHECK`]: measures the pressure conditions (on a blocking thread: it reads
/// `/proc` and the data dir's filesystem) and writes the Node's status when they changed, when
/// the API's Node shows other conditions (after an outage the node lifecycle controller has
/// set Ready=Unknown, and that must be corrected at once, as the kubelet does), when the last
/// write failed, and at least every [`STATUS_REPORT`]. Never returns.
async fn keep_status(client: kube::Client, cfg: Config, host: HostInfo, data_dir: PathBuf) {
    let nodes: Api<Node> = Api::all(client.clone());
    let mut conditions = Conditions::new(cfg.eviction_hard);
    let mut last_status: Option<Instant> = None;
    let mut unwritten = false;
    let mut tick = tokio::time::interval(STATUS_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let dir = data_dir.clone();
        let pressure = match tokio::task::spawn_blocking(move || Pressure::measure(&dir)).await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!("measuring node pressure: {e}");
                continue;
            }
        };
        let (conds, changed) = conditions.observe(&pressure, SystemTime::now());
        let stale = match bounded(STATUS_CALL_TIMEOUT, nodes.get(&cfg.node_name)).await {
            Ok(node) => differs(&node, &conds),
            Err(e) => {
                tracing::debug!("reading node {}: {e}", cfg.node_name);
                false
            }
        };
        if changed || stale || unwritten || last_status.is_none_or(|t| t.elapsed() >= STATUS_REPORT)
        {
            if changed || stale {
                tracing::info!(node = %cfg.node_name, "node conditions changed");
            }
            let status = node_status(&cfg, &host, &pressure, conds);
            match patch_status(&client, &cfg, &status).await {
                Ok(()) => {
                    last_status = Some(Instant::now());
                    unwritten = false;
                }
                Err(e) => {
                    // Written again next round.
                    unwritten = true;
                    tracing::warn!("updating node status: {e}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn cfg() -> Config {
        Config {
            node_name: "n1".into(),
            node_ip: "10.0.0.5".parse().unwrap(),
            pool: "wasinode".into(),
            port: 10250,
            address: "0.0.0.0".parse().unwrap(),
            pod_address: None,
            max_pods: MAX_PODS,
            local_images: workload::LocalImages::Refused,
            conn_limits: Default::default(),
            shutdown_grace: Duration::from_secs(1),
            client_ca: vec![],
            labels: vec![("tier".into(), "edge".into())],
            taints: default_taints(),
            cert_renew_after: None,
            client_renewal: None,
            pod_net: None,
            eviction_hard: EvictionHard::default(),
        }
    }

    #[test]
    fn node_object_has_labels_and_taints() {
        let n = node_object(&cfg());
        assert_eq!(n["metadata"]["labels"]["kubernetes.io/arch"], "wasm32-wagi");
        assert_eq!(n["metadata"]["labels"]["agentpool"], "wasinode");
        assert_eq!(n["metadata"]["labels"]["kubernetes.io/hostname"], "n1");
        let effects: Vec<_> = n["spec"]["taints"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["effect"].as_str().unwrap())
            .collect();
        assert_eq!(effects, ["NoSchedule", "NoExecute"]);
        assert_eq!(n["metadata"]["labels"]["tier"], "edge");
        let _: Node = serde_json::from_value(n).unwrap();
    }

    #[test]
    fn empty_taints_register_none() {
        let mut c = cfg();
        c.taints = vec![];
        assert_eq!(node_object(&c)["spec"]["taints"], json!([]));
    }

    #[test]
    fn existing_taints_are_replaced_but_system_taints_stay() {
        let seed: Vec<Value> = default_taints().iter().map(TaintSpec::to_json).collect();
        let unsched = json!({"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule",
            "timeAdded": "2026-01-01T00:00:00Z"});
        let mut have = seed.clone();
        have.push(unsched.clone());
        assert_eq!(wanted_taints(&have, &seed), None);
        let other = json!({"key": "old", "value": "x", "effect": "NoSchedule"});
        let got = wanted_taints(&[other, unsched.clone()], &seed).unwrap();
        assert_eq!(got.len(), 3);
        assert_eq!(got[0], unsched);
        assert_eq!(wanted_taints(&seed, &[]).unwrap(), Vec::<Value>::new());
    }

    #[test]
    fn conditions_change_only_when_a_status_does() {
        let mut c = Conditions::default();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let calm = Pressure {
            memory_total_kib: Some(1 << 20),
            memory_available_kib: Some(1 << 19),
            disk: None,
            pids: Some((10, 1000)),
        };
        let (conds, changed) = c.observe(&calm, t0);
        assert!(changed);
        assert_eq!(conds.len(), 4);
        let t1 = t0 + Duration::from_secs(10);
        let (conds, changed) = c.observe(&calm, t1);
        assert!(!changed);
        assert_eq!(conds[0]["lastTransitionTime"], time(t0));
        assert_eq!(conds[0]["lastHeartbeatTime"], time(t1));
        let mut low = calm;
        low.memory_available_kib = Some(1);
        let t2 = t1 + Duration::from_secs(10);
        let (conds, changed) = c.observe(&low, t2);
        assert!(changed);
        assert_eq!(conds[0]["status"], "True");
        assert_eq!(conds[0]["lastTransitionTime"], time(t2));
        // The others keep their transition time.
        assert_eq!(conds[2]["lastTransitionTime"], time(t0));
    }

    #[test]
    fn a_condition_changed_by_the_controller_is_noticed() {
        let pressure = Pressure {
            memory_total_kib: Some(1 << 20),
            memory_available_kib: Some(1 << 19),
            disk: None,
            pids: Some((10, 1000)),
        };
        let (conds, _) = Conditions::default().observe(&pressure, SystemTime::now());
        let mut node: Node = serde_json::from_value(
            json!({"metadata": {"name": "n1"}, "status": {"conditions": conds}}),
        )
        .unwrap();
        assert!(!differs(&node, &conds));
        if let Some(c) = node
            .status
            .as_mut()
            .and_then(|s| s.conditions.as_mut())
            .and_then(|c| c.iter_mut().find(|c| c.type_ == "Ready"))
        {
            c.status = "Unknown".into();
        }
        assert!(differs(&node, &conds));
        assert!(differs(
            &serde_json::from_value(json!({"metadata": {"name": "n1"}})).unwrap(),
            &conds
        ));
    }

    #[test]
    fn status_parses_as_node_status() {
        let host = HostInfo::detect();
        let now = SystemTime::now();
        let pressure = Pressure::measure(Path::new("/tmp"));
        let (conds, _) = Conditions::default().observe(&pressure, now);
        let s = node_status(&cfg(), &host, &pressure, conds);
        let node: Node =
            serde_json::from_value(json!({"metadata": {"name": "n1"}, "status": s["status"]}))
                .unwrap();
        let st = node.status.unwrap();
        let info = st.node_info.unwrap();
        assert_eq!(info.kubelet_version, KUBELET_VERSION);
        assert!(info.container_runtime_version.starts_with("wasinode://"));
        assert_eq!(
            st.daemon_endpoints.unwrap().kubelet_endpoint.unwrap().port,
            10250
        );
        let ready = st
            .conditions
            .unwrap()
            .into_iter()
            .find(|c| c.type_ == "Ready")
            .unwrap();
        assert_eq!(ready.status, "True");
        let capacity = st.capacity.unwrap();
        assert_eq!(capacity["pods"].0, "110");
        assert!(capacity.contains_key("ephemeral-storage"));
        assert!(st.allocatable.unwrap().contains_key("ephemeral-storage"));
    }

    #[test]
    fn lease_parses() {
        let l: Lease =
            serde_json::from_value(lease_object(&cfg(), "uid-1", SystemTime::now())).unwrap();
        let spec = l.spec.unwrap();
        assert_eq!(spec.lease_duration_seconds, Some(40));
        assert!(spec.renew_time.is_some());
        assert_eq!(l.metadata.owner_references.unwrap()[0].uid, "uid-1");
    }
}
