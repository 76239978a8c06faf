//! The Kubernetes node agent (`wasinode node`): a kubelet whose runtime is wasmtime.
//!
//! Owns: registering the Node (labels, taints, addresses, capacity, nodeInfo, conditions), its
//! Lease heartbeats and status updates, the watch of the pods bound to this node, turning the
//! Supervisor's reports into pod status and Events, graceful pod deletion, and the node's client
//! certificate (CSR bootstrap). Later: the kubelet API (logs) and its serving certificate.
//!
//! Must not touch: how pods run (plan, fetch, compile, listeners, logs belong to the workload
//! crate, driven only through its `Supervisor`), wasmtime, registries, terminal output (the CLI).

pub mod bootstrap;
pub mod host;
pub mod pods;
pub mod register;
pub mod resolve;
pub mod status;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use serde_json::Value;
use tokio::sync::mpsc::UnboundedReceiver;
use workload::{PlanContext, Report, Supervisor};

/// How this node presents itself.
#[derive(Debug, Clone)]
pub struct Config {
    pub node_name: String,
    pub node_ip: IpAddr,
    /// The `agentpool` label.
    pub pool: String,
    /// The kubelet API port advertised in `daemonEndpoints`.
    pub port: u16,
    /// Time running pods get to stop when the agent shuts down.
    pub shutdown_grace: Duration,
}

/// A Kubernetes `Time` (RFC 3339, seconds) as JSON.
pub(crate) fn time(t: SystemTime) -> Value {
    let ts = k8s_openapi::jiff::Timestamp::try_from(t).unwrap_or_default();
    serde_json::to_value(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(ts))
        .unwrap_or(Value::Null)
}

/// A client acting with the identity of `kubeconfig` (its current context).
pub async fn client_from_kubeconfig(path: &Path) -> anyhow::Result<kube::Client> {
    let kc = kube::config::Kubeconfig::read_from(path)
        .with_context(|| format!("reading kubeconfig {}", path.display()))?;
    let config =
        kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
            .await
            .with_context(|| format!("loading kubeconfig {}", path.display()))?;
    kube::Client::try_from(config).context("creating the Kubernetes client")
}

/// Runs the node until `shutdown` resolves: registers and heartbeats, runs the pods bound to
/// it through `sup`, and writes what `reports` say as pod status and Events. On shutdown, every
/// pod is stopped within the grace period.
pub async fn run(
    cfg: Config,
    client: kube::Client,
    sup: Supervisor,
    reports: UnboundedReceiver<Report>,
    data_dir: PathBuf,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) -> anyhow::Result<()> {
    let host = host::HostInfo::detect();
    let heartbeat = tokio::spawn(register::heartbeat(client.clone(), cfg.clone(), host));
    let statuses = status::Statuses::new(client.clone(), cfg.node_name.clone(), cfg.node_ip);
    let sink = tokio::spawn(statuses.clone().sink(reports));
    let ctx = Arc::new(pods::Context {
        client,
        sup: sup.clone(),
        statuses,
        plan: PlanContext {
            volume_dir: Supervisor::volume_dir(&data_dir),
            node_ip: Some(cfg.node_ip),
            base_dir: None,
        },
        handled: Mutex::default(),
    });
    pods::run(&cfg.node_name, ctx, shutdown).await;
    sup.stop_all(cfg.shutdown_grace).await;
    heartbeat.abort();
    // Let the sink write what the stopped pods reported last.
    tokio::time::sleep(Duration::from_millis(100)).await;
    sink.abort();
    Ok(())
}
