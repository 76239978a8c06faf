//! `wasinode nodepool`: the flags of the pool commands, wired to the nodepool crate (which owns
//! the NodePool CRD, what the commands do and the local provisioner).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use nodepool::local::Host;
use nodepool::resource::{self, WASM_WASI};
use serde_json::Value;

use crate::engine::parse_duration;

#[derive(clap::Args, Debug)]
pub struct NodePoolArgs {
    #[command(subcommand)]
    command: PoolCommand,
}

#[derive(clap::Subcommand, Debug)]
enum PoolCommand {
    /// Create a pool of WASI nodes and start its agents on this host; prints the pool as JSON.
    Add(AddArgs),
    /// Print one pool (JSON by default): count, runtime, labels, taints, nodes and readiness.
    Show(ShowArgs),
    /// List the pools of the cluster (a table by default, taints included).
    List(ListArgs),
    /// Change a pool's node count; nodes removed are cordoned and drained through the Eviction
    /// API (PodDisruptionBudgets respected) before their agents stop and their Nodes are deleted.
    Scale(ScaleArgs),
    /// Drain and remove every node of a pool, then the pool. Nothing of it is left running.
    Delete(DeleteArgs),
    /// Print the NodePool CustomResourceDefinition (for `kubectl apply -f -` by a cluster admin).
    Crd,
    /// Run a pool's local provisioner in the foreground (`add` starts it detached).
    #[command(hide = true)]
    Provision(ProvisionArgs),
}

#[derive(clap::Args, Debug)]
struct Common {
    /// Kubeconfig of a cluster admin (the first file of $KUBECONFIG, else ~/.kube/config).
    #[arg(long, value_name = "FILE")]
    kubeconfig: Option<PathBuf>,
    /// Where this host keeps its pools' agents, logs and state
    /// [default: $WASINODE_STATE_DIR, else $XDG_STATE_HOME/wasinode/pools, else ~/.local/state/wasinode/pools].
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq)]
enum Output {
    Json,
    Yaml,
    Table,
}

#[derive(clap::Args, Debug)]
struct AddArgs {
    /// The pool's name (a DNS label); its nodes are named NAME-000000, NAME-000001, ...
    #[arg(long, short = 'n', value_name = "NAME")]
    name: String,
    /// How many nodes the pool has.
    #[arg(long, short = 'c', default_value_t = 1, value_parser = clap::value_parser!(u32).range(0..=250))]
    node_count: u32,
    /// `WasmWasi` (the only runtime wasinode pools have; `OCIContainer` pools belong to the cluster's own tooling).
    #[arg(long, default_value = WASM_WASI, value_name = "RUNTIME")]
    workload_runtime: String,
    /// Extra node labels, `key=value` (comma-separated or repeated).
    #[arg(long, value_delimiter = ',', value_name = "KEY=VALUE")]
    labels: Vec<String>,
    /// Node taints `key=value:Effect` (comma-separated or repeated)
    /// [default: the seed's kubernetes.io/arch=wasm32-wagi:NoSchedule and :NoExecute; "" for none].
    #[arg(long, value_delimiter = ',', value_name = "KEY=VALUE:EFFECT")]
    taints: Option<Vec<String>>,
    /// The kubelet API port of every node (each node listens on its own loopback address).
    #[arg(long, default_value_t = 10250)]
    kubelet_port: u16,
    /// First node address (node i gets this + i; addresses this host holds) [default: the first
    /// free 127.100.<k>.1]. Non-loopback addresses let the pool's pods back Services (the API
    /// server refuses loopback endpoints).
    #[arg(long, value_name = "IPV4")]
    address_base: Option<std::net::Ipv4Addr>,
    /// A plain-HTTP registry the agents may pull from besides loopback ones (repeatable).
    #[arg(long, value_name = "HOST[:PORT]")]
    insecure_registry: Vec<String>,
    /// The agents' hard eviction thresholds (`wasinode node --eviction-hard`, the kubelet's
    /// syntax: `nodefs.available<5Gi,memory.available<500Mi`) [default: the kubelet's].
    #[arg(long, value_name = "SIGNAL<VALUE,...", value_parser = parse_eviction_hard)]
    eviction_hard: Option<String>,
    /// How long to wait for every node to be Ready.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    timeout: Duration,
    #[arg(long, short = 'o', value_enum, default_value = "json")]
    output: Output,
    #[command(flatten)]
    common: Common,
}

#[derive(clap::Args, Debug)]
struct ShowArgs {
    /// The pool's name.
    name: String,
    #[arg(long, short = 'o', value_enum, default_value = "json")]
    output: Output,
    #[command(flatten)]
    common: Common,
}

#[derive(clap::Args, Debug)]
struct ListArgs {
    #[arg(long, short = 'o', value_enum, default_value = "table")]
    output: Output,
    #[command(flatten)]
    common: Common,
}

#[derive(clap::Args, Debug)]
struct ScaleArgs {
    /// The pool's name.
    name: String,
    /// The new node count.
    #[arg(long, short = 'c', value_parser = clap::value_parser!(u32).range(0..=250))]
    node_count: u32,
    /// How long to wait for the pool to reach the new count (draining included).
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    timeout: Duration,
    #[command(flatten)]
    common: Common,
}

#[derive(clap::Args, Debug)]
struct DeleteArgs {
    /// The pool's name.
    name: String,
    /// How long to wait for the nodes to drain and the pool to go.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    timeout: Duration,
    #[command(flatten)]
    common: Common,
}

#[derive(clap::Args, Debug)]
struct ProvisionArgs {
    name: String,
    #[arg(long, value_name = "DIR")]
    state_dir: PathBuf,
}

/// Progress lines of the pool commands, on stderr.
fn progress(line: &str) {
    eprintln!("wasinode: {line}");
}

pub async fn nodepool(args: NodePoolArgs) -> anyhow::Result<i32> {
    match args.command {
        PoolCommand::Add(a) => add(a).await,
        PoolCommand::Show(a) => {
            let (client, _) = a.common.client().await?;
            let root = a
                .common
                .state_dir
                .clone()
                .unwrap_or_else(nodepool::default_state_root);
            print(a.output, &nodepool::show(&client, &root, &a.name).await?)?;
            Ok(0)
        }
        PoolCommand::List(a) => {
            let (client, _) = a.common.client().await?;
            let views = nodepool::list(&client).await?;
            match a.output {
                Output::Table => print!("{}", nodepool::table(&views)),
                Output::Json => println!("{}", serde_json::to_string_pretty(&views)?),
                Output::Yaml => print!("{}", serde_yaml::to_string(&views)?),
            }
            Ok(0)
        }
        PoolCommand::Scale(a) => {
            let (client, kubeconfig) = a.common.client().await?;
            let host = a.common.host()?;
            nodepool::scale(
                &client,
                &kubeconfig,
                &host,
                &a.name,
                a.node_count,
                a.timeout,
                &progress,
            )
            .await?;
            Ok(0)
        }
        PoolCommand::Delete(a) => {
            let (client, _) = a.common.client().await?;
            let host = a.common.host()?;
            nodepool::delete(&client, &host, &a.name, a.timeout, &progress).await?;
            Ok(0)
        }
        PoolCommand::Crd => {
            print!("{}", serde_yaml::to_string(&resource::crd())?);
            Ok(0)
        }
        PoolCommand::Provision(a) => {
            nodepool::local::provision(
                &a.state_dir,
                &a.name,
                &exe()?,
                crate::run::shutdown_signal(),
            )
            .await?;
            Ok(0)
        }
    }
}

/// The wasinode binary the provisioners and agents run (this one).
fn exe() -> anyhow::Result<PathBuf> {
    std::env::current_exe().context("locating the wasinode binary")
}

impl Common {
    fn kubeconfig(&self) -> anyhow::Result<PathBuf> {
        let candidates: Vec<PathBuf> = match (&self.kubeconfig, std::env::var_os("KUBECONFIG")) {
            (Some(f), _) => vec![f.clone()],
            (None, Some(list)) => std::env::split_paths(&list).collect(),
            (None, None) => std::env::var_os("HOME")
                .map(|h| PathBuf::from(h).join(".kube/config"))
                .into_iter()
                .collect(),
        };
        let found = candidates.iter().find(|p| p.is_file()).with_context(|| {
            format!(
                "no kubeconfig found ({}); pass --kubeconfig FILE or set KUBECONFIG",
                candidates
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?;
        std::path::absolute(found).context("resolving the kubeconfig path")
    }

    async fn client(&self) -> anyhow::Result<(kube::Client, PathBuf)> {
        let path = self.kubeconfig()?;
        let client = nodepool::client(&path).await?;
        Ok((client, path))
    }

    /// This host's pools (the state directory created if missing) and the binary they run.
    fn host(&self) -> anyhow::Result<Host> {
        let root = self
            .state_dir
            .clone()
            .unwrap_or_else(nodepool::default_state_root);
        std::fs::create_dir_all(&root)
            .with_context(|| format!("creating the state directory {}", root.display()))?;
        let state_root = std::path::absolute(&root).context("resolving the state directory")?;
        Ok(Host {
            state_root,
            exe: exe()?,
        })
    }
}

fn print(output: Output, v: &Value) -> anyhow::Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(v)?),
        Output::Yaml => print!("{}", serde_yaml::to_string(v)?),
        Output::Table => print!("{}", nodepool::table(std::slice::from_ref(v))),
    }
    Ok(())
}

async fn add(a: AddArgs) -> anyhow::Result<i32> {
    resource::validate_name(&a.name)?;
    let spec = resource::Spec::new(
        a.node_count,
        &a.workload_runtime,
        &a.labels,
        a.taints.as_deref(),
    )?;
    let (client, kubeconfig) = a.common.client().await?;
    let host = a.common.host()?;
    let opts = nodepool::AddOptions {
        name: a.name,
        spec,
        kubelet_port: a.kubelet_port,
        address_base: a.address_base,
        insecure_registries: a.insecure_registry,
        eviction_hard: a.eviction_hard,
        timeout: a.timeout,
    };
    let v = nodepool::add(&client, &kubeconfig, &host, &opts, &progress).await?;
    print(a.output, &v)?;
    Ok(0)
}

/// An `--eviction-hard` value, checked here so that a bad one is refused before any agent starts.
fn parse_eviction_hard(s: &str) -> Result<String, node::eviction::EvictionError> {
    s.parse::<node::eviction::EvictionHard>()?;
    Ok(s.to_string())
}
