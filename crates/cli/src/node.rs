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
    /// each its own loopback address); unset, they listen on every address of the host.
    #[arg(long, value_name = "IP")]
    pub pod_address: Option<IpAddr>,
    /// CA certificates (PEM) that sign the client certificates of kubelet API callers
    /// [default: the CA of the kubeconfig's cluster].
    #[arg(long, value_name = "FILE")]
    pub client_ca_file: Option<PathBuf>,
    #[command(flatten)]
    pub engine: crate::engine::EngineArgs,
}

pub async fn node(args: NodeArgs) -> anyhow::Result<i32> {
    let data_dir = args.engine.data_dir();
    let (sup, reports) = crate::engine::start(&data_dir, &args.engine, false)?;
    let kubeconfig = args
        .kubeconfig
        .clone()
        .unwrap_or_else(|| data_dir.join("kubelet.kubeconfig"));
    if !kubeconfig.exists() {
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
    let (client, mut client_ca) = node::connect(&kubeconfig).await?;
    if let Some(file) = &args.client_ca_file {
        client_ca = node::read_pem_certs(file)?;
    }
    let cfg = node::Config {
        node_name: args.node_name.clone(),
        node_ip: args.node_ip,
        pool: args.pool.clone(),
        port: args.port,
        address: args.address,
        pod_address: args.pod_address,
        shutdown_grace: args.engine.shutdown_grace,
        client_ca,
    };
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        crate::run::shutdown_signal().await;
        eprintln!(
            "wasinode: stopping node (grace {:?})",
            args.engine.shutdown_grace
        );
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
    Ok(0)
}
