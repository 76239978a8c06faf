//! `wasinode node`: join a Kubernetes cluster as a node whose runtime is wasmtime.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::engine::parse_duration;

#[derive(clap::Args, Debug)]
pub struct NodeArgs {
    /// Kubeconfig the agent acts with (its current context). With --bootstrap-kubeconfig and no
    /// such file yet, the node's own kubeconfig is written here after the CSR is issued
    /// [default: <data-dir>/kubelet.kubeconfig].
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// Kubeconfig with a bootstrap token: used once to obtain the node's client certificate by
    /// CSR (kubernetes.io/kube-apiserver-client-kubelet) when --kubeconfig does not exist yet.
    #[arg(long, value_name = "FILE")]
    pub bootstrap_kubeconfig: Option<PathBuf>,
    /// Longest wait for the client certificate to be issued.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    pub bootstrap_timeout: Duration,
    /// The Node's name (also its `kubernetes.io/hostname` label).
    #[arg(long, value_name = "NAME")]
    pub node_name: String,
    /// The node's InternalIP; pods report it as hostIP and podIP.
    #[arg(long, value_name = "IP")]
    pub node_ip: IpAddr,
    /// The `agentpool` label.
    #[arg(long, default_value = "wasinode", value_name = "NAME")]
    pub pool: String,
    /// The kubelet API port (HTTPS; `kubectl logs` goes through it), advertised in the Node's
    /// daemonEndpoints.
    #[arg(long, default_value_t = 10250)]
    pub port: u16,
    /// The address the kubelet API listens on.
    #[arg(long, default_value = "0.0.0.0", value_name = "IP")]
    pub address: IpAddr,
    /// WAGI listeners whose default-host names no address (`0.0.0.0:3001`, `:3001`) bind this
    /// address instead. For several nodes on one host (the local node-pool provisioner gives
    /// each its own loopback address); unset, they listen on every address of the host. HTTP
    /// components serve on this address [default: the node's address].
    #[arg(long, value_name = "IP")]
    pub pod_address: Option<IpAddr>,
    /// Give each pod (but hostNetwork ones) its own IPv4 address from this range, e.g.
    /// 10.214.0.0/24: added to --pod-interface while the pod is here, reported as its podIP,
    /// bound by its listeners (so two pods may serve the same port). The cluster must route the
    /// range to this node. Needs root.
    #[arg(long, value_name = "CIDR")]
    pub pod_cidr: Option<String>,
    /// The node-local interface --pod-cidr addresses are added to.
    #[arg(long, default_value = "lo", value_name = "NAME", requires = "pod_cidr")]
    pub pod_interface: String,
    /// Pods this node takes (its `pods` capacity, as the kubelet's --max-pods); a pod bound to it
    /// beyond that is rejected with OutOfpods, as the kubelet does.
    #[arg(long, default_value_t = node::register::MAX_PODS, value_name = "N")]
    pub max_pods: u32,
    /// Hard eviction thresholds, as the kubelet's --eviction-hard: below one the node reports
    /// MemoryPressure, DiskPressure or PIDPressure (the node lifecycle controller then taints
    /// it, so that no new pod is scheduled there), and allocatable is capacity less them.
    /// Signals: memory.available, nodefs.available (the --data-dir's filesystem),
    /// nodefs.inodesFree, pid.available; values a quantity or a percentage of capacity. Given
    /// at all, it replaces every default, so a signal it leaves out has no threshold (as with
    /// the kubelet); `--eviction-hard=` sets none.
    #[arg(
        long,
        value_name = "SIGNAL<VALUE,...",
        default_value = "memory.available<100Mi,nodefs.available<10%,nodefs.inodesFree<5%,pid.available<10%"
    )]
    pub eviction_hard: node::eviction::EvictionHard,
    /// CA certificates (PEM) that sign the client certificates of kubelet API callers
    /// [default: the CA of the kubeconfig's cluster].
    #[arg(long, value_name = "FILE")]
    pub client_ca_file: Option<PathBuf>,
    /// Labels added to the Node's (kubelet-style): `key=value,key2=value2`. They are merged
    /// into an existing Node of the same name.
    #[arg(long, value_name = "K=V,...", value_parser = parse_labels, default_value = "")]
    pub node_labels: Labels,
    /// Taints the Node is registered with: `key=value:Effect,key2:Effect` (Effect: NoSchedule,
    /// PreferNoSchedule or NoExecute); an empty string registers none. Note that
    /// NodeRestriction lets a node set its taints only when it creates its Node object.
    #[arg(
        long,
        value_name = "K=V:EFFECT,...",
        value_parser = parse_taints,
        default_value = "kubernetes.io/arch=wasm32-wagi:NoSchedule,kubernetes.io/arch=wasm32-wagi:NoExecute"
    )]
    pub register_with_taints: Taints,
    /// On SIGTERM/SIGINT, first cordon the node and evict its pods through the Eviction API
    /// (PodDisruptionBudgets are honoured), serving each pod until it is deleted; then stop.
    #[arg(long)]
    pub drain_on_shutdown: bool,
    /// Longest time --drain-on-shutdown waits for evictions (blocked by a PodDisruptionBudget)
    /// and for the evicted pods to be gone; then the node stops anyway and exits with 1.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// Let pods name local modules (`file:///...` or a path) beneath this folder. By default a
    /// node takes registry references only: an image names a file the agent reads and runs, and
    /// pod authors are not trusted with the host's files. Paths are resolved by the kernel
    /// without leaving the folder (no `..`, no link out of it).
    #[arg(long, value_name = "DIR")]
    pub allow_local_images: Option<PathBuf>,
    /// Testing only: renew the client and serving certificates this long after they were
    /// obtained instead of at 70–90% of their lifetime.
    #[arg(long, hide = true, value_parser = parse_duration, value_name = "DURATION")]
    pub cert_renew_after: Option<Duration>,
    #[command(flatten)]
    pub engine: crate::engine::EngineArgs,
}

#[derive(Debug, Clone)]
pub struct Labels(pub Vec<(String, String)>);

#[derive(Debug, Clone)]
pub struct Taints(pub Vec<node::register::TaintSpec>);

fn parse_labels(s: &str) -> Result<Labels, String> {
    node::register::parse_labels(s).map(Labels)
}

fn parse_taints(s: &str) -> Result<Taints, String> {
    node::register::parse_taints(s).map(Taints)
}

pub async fn node(args: NodeArgs) -> anyhow::Result<i32> {
    let data_dir = args.engine.data_dir();
    let (sup, reports) = crate::engine::start(&data_dir, &args.engine, false)?;
    let kubeconfig = args
        .kubeconfig
        .clone()
        .unwrap_or_else(|| data_dir.join("kubelet.kubeconfig"));
    let expired = kubeconfig.exists() && node::bootstrap::client_cert_expired(&kubeconfig);
    if expired {
        if args.bootstrap_kubeconfig.is_some() {
            eprintln!(
                "wasinode: the client certificate in {} has expired; bootstrapping again",
                kubeconfig.display()
            );
        } else {
            anyhow::bail!(
                "the client certificate in {} has expired; give --bootstrap-kubeconfig to obtain \
                 a new one by CSR",
                kubeconfig.display()
            );
        }
    }
    if !kubeconfig.exists() || expired {
        let Some(bootstrap) = &args.bootstrap_kubeconfig else {
            anyhow::bail!(
                "kubeconfig {} does not exist; give --bootstrap-kubeconfig to obtain one by CSR",
                kubeconfig.display()
            );
        };
        eprintln!(
            "wasinode: requesting the client certificate of system:node:{}",
            args.node_name
        );
        node::bootstrap::bootstrap(
            bootstrap,
            &kubeconfig,
            &args.node_name,
            args.bootstrap_timeout,
        )
        .await?;
    }
    let (client, mut client_ca, slot) = node::connect_renewable(&kubeconfig).await?;
    if let Some(file) = &args.client_ca_file {
        client_ca = node::read_pem_certs(file)?;
    }
    let local_images = match &args.allow_local_images {
        None => workload::LocalImages::Refused,
        Some(dir) => workload::LocalImages::Beneath(
            std::fs::canonicalize(dir)
                .map_err(|e| anyhow::anyhow!("--allow-local-images {}: {e}", dir.display()))?,
        ),
    };
    let cfg = node::Config {
        local_images,
        conn_limits: args.engine.conn_limits(),
        node_name: args.node_name.clone(),
        node_ip: args.node_ip,
        pool: args.pool.clone(),
        port: args.port,
        address: args.address,
        pod_address: args.pod_address,
        pod_net: args
            .pod_cidr
            .as_deref()
            .map(|c| node::podnet::PodNet::new(c, &args.pod_interface).map(std::sync::Arc::new))
            .transpose()?,
        max_pods: args.max_pods,
        shutdown_grace: args.engine.shutdown_grace,
        client_ca,
        labels: args.node_labels.0.clone(),
        taints: args.register_with_taints.0.clone(),
        client_renewal: Some(node::bootstrap::Renewal {
            kubeconfig: kubeconfig.clone(),
            node_name: args.node_name.clone(),
            slot,
            renew_after: args.cert_renew_after,
            timeout: args.bootstrap_timeout,
            bootstrap_kubeconfig: args.bootstrap_kubeconfig.clone(),
        }),
        cert_renew_after: args.cert_renew_after,
        eviction_hard: args.eviction_hard,
    };
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let drain = args.drain_on_shutdown.then(|| node::drain::DrainOptions {
        timeout: args.drain_timeout,
        ..Default::default()
    });
    let drain_kubeconfig = kubeconfig.clone();
    let node_name = args.node_name.clone();
    let grace = args.engine.shutdown_grace;
    let drain_failed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let failed = drain_failed.clone();
    tokio::spawn(async move {
        crate::run::shutdown_signal().await;
        if let Some(opts) = drain {
            eprintln!("wasinode: draining node {node_name} (a second signal stops at once)");
            // The node keeps running and deleting its pods while the drain waits for them.
            let progress = |line: &str| eprintln!("wasinode: drain: {line}");
            let drain = async {
                // Built now: the node's current certificate (it may have been renewed), and no
                // retries of refused evictions hidden in the client.
                let client = node::client_without_retries(&drain_kubeconfig)
                    .await
                    .map_err(|e| format!("{e:#}"))?;
                node::drain::drain(&client, &node_name, &opts, &progress)
                    .await
                    .map_err(|e| e.to_string())
            };
            tokio::select! {
                result = drain => {
                    if let Err(e) = result {
                        eprintln!("wasinode: drain failed: {e}");
                        failed.store(true, std::sync::atomic::Ordering::SeqCst);
                    }
                }
                () = crate::run::shutdown_signal() => {
                    eprintln!("wasinode: drain interrupted");
                    failed.store(true, std::sync::atomic::Ordering::SeqCst);
                }
            }
        }
        eprintln!("wasinode: stopping node (grace {grace:?})");
        let _ = tx.send(());
    });
    eprintln!(
        "wasinode: node {} ({}) joining the cluster",
        args.node_name, args.node_ip
    );
    node::run(cfg, client, sup, reports, data_dir, async move {
        let _ = rx.await;
    })
    .await?;
    if drain_failed.load(std::sync::atomic::Ordering::SeqCst) {
        return Ok(1);
    }
    Ok(0)
}
