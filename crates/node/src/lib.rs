//! The Kubernetes node agent (`wasinode node`): a kubelet whose runtime is wasmtime.
//!
//! Owns: registering the Node (labels, taints, addresses, capacity, nodeInfo, conditions from
//! memory, disk and PID pressure), its Lease heartbeats and status updates, the watch of the
//! pods bound to this node, turning the Supervisor's reports into pod status and Events,
//! graceful pod deletion, cordon and drain ([`drain`]), the node's client certificate (CSR
//! bootstrap and renewal, [`bootstrap`]), and the kubelet API (logs) with its serving
//! certificate ([`server`]).
//!
//! Must not touch: how pods run (plan, fetch, compile, listeners, logs belong to the workload
//! crate, driven only through its `Supervisor`), wasmtime, registries, terminal output (the CLI).

pub mod authcache;
pub mod bootstrap;
pub mod drain;
pub mod eviction;
pub mod host;
pub mod labels;
pub mod logs;
pub mod podapi;
pub mod podnet;
pub mod pods;
pub mod portforward;
pub mod probe;
pub mod register;
pub mod resolve;
pub mod server;
pub mod spdy;
pub mod stats;
pub mod status;
pub mod volume;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use serde_json::Value;
use workload::{PlanContext, Reports, Supervisor};

/// How this node presents itself.
#[derive(Debug, Clone)]
pub struct Config {
    pub node_name: String,
    pub node_ip: IpAddr,
    /// The `agentpool` label.
    pub pool: String,
    /// The kubelet API port advertised in `daemonEndpoints`.
    pub port: u16,
    /// The address the kubelet API listens on (`0.0.0.0`: every address of the host).
    pub address: IpAddr,
    /// When set, WAGI listeners whose `default-host` names no address (`0.0.0.0:3001`) bind
    /// this one instead, so that several nodes can share one host (see `PlanContext::bind_ip`).
    pub pod_address: Option<IpAddr>,
    /// The `pods` capacity the Node advertises; a pod bound beyond it is rejected (`OutOfpods`).
    pub max_pods: u32,
    /// Which local files pods may name as images (`--allow-local-images`; none by default).
    pub local_images: workload::LocalImages,
    /// Bounds of the kubelet API's connections (as every WAGI listener's).
    pub conn_limits: workload::listen::ConnLimits,
    /// Time running pods get to stop when the agent shuts down.
    pub shutdown_grace: Duration,
    /// DER certificates of the CA that signs callers' client certificates (the cluster CA).
    pub client_ca: Vec<Vec<u8>>,
    /// Labels added to (or overriding) the seed's (`--node-labels`).
    pub labels: Vec<(String, String)>,
    /// The taints the Node is registered with (`--register-with-taints`; default
    /// [`register::default_taints`]).
    pub taints: Vec<register::TaintSpec>,
    /// When set, the client certificate is renewed before it expires.
    pub client_renewal: Option<bootstrap::Renewal>,
    /// Renew the serving certificate this long after it was installed instead of at 70–90% of
    /// its lifetime (the hidden `--cert-renew-after`, for tests).
    pub cert_renew_after: Option<Duration>,
    /// `--pod-cidr`: each pod's own address, on a node-local interface (see [`podnet`]).
    pub pod_net: Option<Arc<podnet::PodNet>>,
    /// `--eviction-hard`: the pressure conditions' thresholds, also held back from allocatable.
    pub eviction_hard: eviction::EvictionHard,
}

/// Longest wait on shutdown for the last pod statuses and Events to be written.
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(10);

/// A Kubernetes `Time` (RFC 3339, seconds) as JSON.
pub(crate) fn time(t: SystemTime) -> Value {
    let ts = k8s_openapi::jiff::Timestamp::try_from(t).unwrap_or_default();
    serde_json::to_value(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(ts))
        .unwrap_or(Value::Null)
}

/// A client acting with the identity of `kubeconfig` (its current context).
pub async fn client_from_kubeconfig(path: &Path) -> anyhow::Result<kube::Client> {
    Ok(connect(path).await?.0)
}

/// A client acting with the identity of `kubeconfig`, and the DER certificates of the cluster
/// CA it trusts (the kubelet API's client CA unless told otherwise).
pub async fn connect(path: &Path) -> anyhow::Result<(kube::Client, Vec<Vec<u8>>)> {
    let kc = kube::config::Kubeconfig::read_from(path)
        .with_context(|| format!("reading kubeconfig {}", path.display()))?;
    let config =
        kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
            .await
            .with_context(|| format!("loading kubeconfig {}", path.display()))?;
    let mut ca = config.root_cert.clone().unwrap_or_default();
    if ca.is_empty()
        && let Some(file) = &config.root_cert_file
    {
        ca = read_pem_certs(file)?;
    }
    let client = kube::Client::try_from(config).context("creating the Kubernetes client")?;
    Ok((client, ca))
}

/// A client acting with the identity of `kubeconfig` that does not retry 429, 503 and 504
/// answers itself (kube's default does, up to 15 times): for [`drain::drain`], which must see
/// an eviction refused by a PodDisruptionBudget at once.
pub async fn client_without_retries(path: &Path) -> anyhow::Result<kube::Client> {
    let kc = kube::config::Kubeconfig::read_from(path)
        .with_context(|| format!("reading kubeconfig {}", path.display()))?;
    let mut config =
        kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
            .await
            .with_context(|| format!("loading kubeconfig {}", path.display()))?;
    config.default_retry = false;
    kube::Client::try_from(config).context("creating the Kubernetes client")
}

/// As [`connect`], with a client whose identity the returned slot can replace (certificate
/// renewal: see [`bootstrap::Renewal`]).
pub async fn connect_renewable(
    path: &Path,
) -> anyhow::Result<(kube::Client, Vec<Vec<u8>>, bootstrap::ClientSlot)> {
    let (inner, ca) = connect(path).await?;
    let (client, slot) = bootstrap::swappable(inner);
    Ok((client, ca, slot))
}

/// DER certificates of a PEM file.
pub fn read_pem_certs(path: &Path) -> anyhow::Result<Vec<Vec<u8>>> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .map(|c| c.map(|c| c.as_ref().to_vec()))
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing {}", path.display()))?;
    Ok(certs)
}

/// Runs the node until `shutdown` resolves: registers and heartbeats, runs the pods bound to
/// it through `sup`, and writes what `reports` say as pod status and Events. On shutdown, every
/// pod is stopped within the grace period. The pods keep running, and their deletions are
/// handled, until `shutdown` resolves: `wasinode node --drain-on-shutdown` drains the node
/// ([`drain::drain`]) inside it.
pub async fn run(
    cfg: Config,
    client: kube::Client,
    sup: Supervisor,
    reports: Reports,
    data_dir: PathBuf,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind((cfg.address, cfg.port))
        .await
        .with_context(|| {
            format!(
                "cannot listen on {}:{} (--address, --port)",
                cfg.address, cfg.port
            )
        })?;
    let host = host::HostInfo::detect();
    let allocatable = pods::Allocatable::of(&host, &cfg.eviction_hard);
    let heartbeat = tokio::spawn(register::heartbeat(
        client.clone(),
        cfg.clone(),
        host,
        data_dir.clone(),
    ));
    let (statuses, inbox) = status::Statuses::new(
        client.clone(),
        cfg.node_name.clone(),
        cfg.node_ip,
        cfg.pod_net
            .is_none()
            .then(|| cfg.pod_address.unwrap_or(cfg.node_ip)),
    );
    let sink = tokio::spawn(statuses.clone().sink(reports, inbox));
    let slot = server::cert_slot(server::self_signed(&cfg.node_name, cfg.node_ip)?);
    let rotate = tokio::spawn(server::rotate_serving_cert(
        client.clone(),
        cfg.node_name.clone(),
        cfg.node_ip,
        slot.clone(),
        cfg.cert_renew_after,
    ));
    let renew = cfg
        .client_renewal
        .clone()
        .map(|r| tokio::spawn(bootstrap::keep_client_cert_renewed(r)));
    let ctx = Arc::new(pods::Context {
        client,
        sup: sup.clone(),
        statuses: statuses.clone(),
        plan: PlanContext {
            volume_dir: Supervisor::volume_dir(&data_dir),
            node_ip: Some(cfg.node_ip),
            bind_ip: cfg.pod_address,
            base_dir: None,
            local_images: cfg.local_images.clone(),
            secret_dir: Some(volume::secret_root(&data_dir, data_dir.join("secrets"))),
            pod_address: None,
        },
        handled: Mutex::default(),
        max_pods: cfg.max_pods as usize,
        pod_net: cfg.pod_net.clone(),
        prober: probe::Prober::new(Arc::new(statuses.clone()), sup.clone(), cfg.node_ip),
        allocatable,
        store: Default::default(),
    });
    let api = tokio::spawn(server::serve(
        listener,
        slot,
        cfg.client_ca.clone(),
        Arc::new(server::State {
            client: ctx.client.clone(),
            node_name: cfg.node_name.clone(),
            logs_root: sup.logs().root().to_path_buf(),
            statuses: statuses.clone(),
            auth: authcache::AuthCache::default(),
            stats: stats::Stats::new(cfg.node_name.clone(), sup.usage().clone()),
            metrics: sup.metrics().clone(),
            pods: ctx.clone(),
        }),
        cfg.conn_limits,
    ));
    let prober = ctx.prober.clone();
    pods::run(&cfg.node_name, ctx, shutdown).await;
    prober.stop_all();
    sup.stop_all(cfg.shutdown_grace).await;
    heartbeat.abort();
    rotate.abort();
    if let Some(r) = renew {
        r.abort();
    }
    api.abort();
    // The sink writes what the stopped pods reported last (and publishes queued Events), within
    // a deadline: an API server that is away does not hold the agent's exit.
    // Nothing serves while the agent is away: every pod says so (its phase stays Running, so a
    // restarted agent re-adopts it), the last thing written before the agent exits.
    for key in statuses.all_unready() {
        statuses.mark(&key).await;
    }
    if !statuses.flush(SHUTDOWN_FLUSH).await {
        tracing::warn!(
            "pod statuses not all written within {SHUTDOWN_FLUSH:?} of shutdown; the API server is slow or away"
        );
    }
    sink.abort();
    Ok(())
}
