//! `wasinode nodepool`: pools of wasinode nodes, as `az aks nodepool` gives AKS users WASI pools.
//!
//! A pool is a `NodePool` object in the cluster (see [`resource`]); its nodes are `wasinode
//! node` agents run by a local provisioner on this host (see [`local`]), joined by a bootstrap
//! token (see [`join`]).

pub mod join;
pub mod local;
pub mod resource;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

use crate::engine::parse_duration;
use local::{LocalPool, PoolDir};
use resource::{NodePool, POOL_LABEL, WASM_WASI};

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
    /// First node address (node i gets this + i) [default: the first free 127.100.<k>.1].
    #[arg(long, value_name = "IPV4")]
    address_base: Option<std::net::Ipv4Addr>,
    /// A plain-HTTP registry the agents may pull from besides loopback ones (repeatable).
    #[arg(long, value_name = "HOST[:PORT]")]
    insecure_registry: Vec<String>,
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

pub async fn nodepool(args: NodePoolArgs) -> anyhow::Result<i32> {
    match args.command {
        PoolCommand::Add(a) => add(a).await,
        PoolCommand::Show(a) => show(a).await,
        PoolCommand::List(a) => list(a).await,
        PoolCommand::Scale(a) => scale(a).await,
        PoolCommand::Delete(a) => delete(a).await,
        PoolCommand::Crd => {
            print!("{}", serde_yaml::to_string(&resource::crd())?);
            Ok(0)
        }
        PoolCommand::Provision(a) => local::provision(&a.state_dir, &a.name).await.map(|_| 0),
    }
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
        let client = client(&path).await?;
        Ok((client, path))
    }

    fn state_root(&self) -> anyhow::Result<PathBuf> {
        let root = self
            .state_dir
            .clone()
            .unwrap_or_else(local::default_state_root);
        std::fs::create_dir_all(&root)
            .with_context(|| format!("creating the state directory {}", root.display()))?;
        std::path::absolute(&root).context("resolving the state directory")
    }
}

/// A client acting as `kubeconfig`'s current context, without kube's built-in retry of 429/503
/// answers: an eviction a PodDisruptionBudget refuses (429) must come back to the drain, which
/// retries it on its own schedule and reports it.
pub(crate) async fn client(kubeconfig: &Path) -> anyhow::Result<kube::Client> {
    node::client_without_retries(kubeconfig).await
}

pub(crate) fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

pub(crate) fn node_ready(n: &Node) -> bool {
    n.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// One-line API errors: what the server said, not a debug dump.
fn api_context(e: kube::Error, what: &str) -> anyhow::Error {
    match e {
        kube::Error::Api(s) if s.code == 403 => anyhow::anyhow!(
            "{what}: forbidden ({}); use a cluster admin's kubeconfig",
            s.message
        ),
        kube::Error::Api(s) => anyhow::anyhow!("{what}: {}", s.message),
        e => anyhow::anyhow!("{what}: cannot reach the cluster ({e})"),
    }
}

async fn get_pool(client: &kube::Client, name: &str) -> anyhow::Result<NodePool> {
    let api = resource::api(client);
    match api.get_opt(name).await {
        Ok(Some(np)) => Ok(np),
        Ok(None) => anyhow::bail!("node pool {name} not found (see `wasinode nodepool list`)"),
        Err(kube::Error::Api(s)) if s.code == 404 => anyhow::bail!(
            "node pool {name} not found: the cluster has no NodePool resource yet (create a pool with `wasinode nodepool add`)"
        ),
        Err(e) => Err(api_context(e, "reading the node pool")),
    }
}

async fn pool_nodes(client: &kube::Client, pool: &str) -> anyhow::Result<BTreeMap<String, Node>> {
    let nodes: Api<Node> = Api::all(client.clone());
    let lp = ListParams::default().labels(&format!("{POOL_LABEL}={pool}"));
    let list = nodes
        .list(&lp)
        .await
        .map_err(|e| api_context(e, "listing the pool's nodes"))?;
    Ok(list
        .into_iter()
        .filter_map(|n| Some((n.metadata.name.clone()?, n)))
        .collect())
}

/// What `show` prints: the pool as its spec says, with each node's readiness read from its Node.
fn view(np: &NodePool, nodes: &BTreeMap<String, Node>) -> Value {
    let name = np.metadata.name.clone().unwrap_or_default();
    let status = np.status.clone().unwrap_or_default();
    let addresses: BTreeMap<&str, &str> = status
        .nodes
        .iter()
        .map(|n| (n.name.as_str(), n.address.as_str()))
        .collect();
    let node_list: Vec<Value> = (0..np.spec.count)
        .map(|i| {
            let n = resource::node_name(&name, i);
            json!({
                "name": n,
                "address": addresses.get(n.as_str()).copied().unwrap_or(""),
                "ready": nodes.get(&n).is_some_and(node_ready),
            })
        })
        .collect();
    let ready = node_list.iter().filter(|n| n["ready"] == true).count();
    let mut v = json!({
        "name": name,
        "count": np.spec.count,
        "workloadRuntime": np.spec.workload_runtime,
        "nodeLabels": np.spec.node_labels,
        "nodeTaints": np.spec.node_taints,
        "provisioningState": if np.metadata.deletion_timestamp.is_some() { "Deleting" } else { status.provisioning_state.as_str() },
        "readyNodes": ready,
        "nodes": node_list,
        "provisioner": status.provisioner,
    });
    if !status.message.is_empty() {
        v["message"] = json!(status.message);
    }
    v
}

fn print(output: Output, v: &Value) -> anyhow::Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(v)?),
        Output::Yaml => print!("{}", serde_yaml::to_string(v)?),
        Output::Table => print!("{}", table(std::slice::from_ref(v))),
    }
    Ok(())
}

/// The `list` table: one row per pool, taints included (AKS's list leaves them out).
fn table(pools: &[Value]) -> String {
    let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
    let join = |v: &Value| {
        let items: Vec<String> = match v {
            Value::Array(a) => a.iter().map(s).collect(),
            Value::Object(o) => o.iter().map(|(k, v)| format!("{k}={}", s(v))).collect(),
            _ => vec![],
        };
        if items.is_empty() {
            "<none>".to_string()
        } else {
            items.join(",")
        }
    };
    let mut rows = vec![
        [
            "NAME", "COUNT", "READY", "RUNTIME", "STATE", "TAINTS", "LABELS",
        ]
        .map(String::from),
    ];
    for p in pools {
        rows.push([
            s(&p["name"]),
            p["count"].to_string(),
            format!("{}/{}", p["readyNodes"], p["count"]),
            s(&p["workloadRuntime"]),
            s(&p["provisioningState"]),
            join(&p["nodeTaints"]),
            join(&p["nodeLabels"]),
        ]);
    }
    let widths: Vec<usize> = (0..7)
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let cells: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(cells.join("   ").trim_end());
        out.push('\n');
    }
    out
}

fn parse_labels(items: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    let mut labels = BTreeMap::new();
    for item in items.iter().filter(|i| !i.is_empty()) {
        let (k, v) = item
            .split_once('=')
            .with_context(|| format!("invalid label {item:?}: expected key=value"))?;
        anyhow::ensure!(!k.is_empty(), "invalid label {item:?}: the key is empty");
        anyhow::ensure!(
            k != POOL_LABEL,
            "the {POOL_LABEL} label is the pool's name; it cannot be set with --labels"
        );
        labels.insert(k.to_string(), v.to_string());
    }
    Ok(labels)
}

fn check_runtime(runtime: &str) -> anyhow::Result<String> {
    if runtime.eq_ignore_ascii_case(WASM_WASI) {
        return Ok(WASM_WASI.to_string());
    }
    if runtime.eq_ignore_ascii_case("OCIContainer") {
        anyhow::bail!(
            "--workload-runtime OCIContainer: wasinode pools run WebAssembly only; container node pools belong to the cluster's own tooling (e.g. `az aks nodepool add` without --workload-runtime)"
        );
    }
    anyhow::bail!("unknown --workload-runtime {runtime:?}: the only runtime is {WASM_WASI}")
}

async fn add(a: AddArgs) -> anyhow::Result<i32> {
    resource::validate_name(&a.name).map_err(anyhow::Error::msg)?;
    let runtime = check_runtime(&a.workload_runtime)?;
    let labels = parse_labels(&a.labels)?;
    let taints: Vec<String> = match &a.taints {
        None => resource::default_taints(),
        Some(t) => t.iter().filter(|t| !t.is_empty()).cloned().collect(),
    };
    for t in &taints {
        resource::validate_taint(t).map_err(anyhow::Error::msg)?;
    }
    let (client, kubeconfig) = a.common.client().await?;
    let root = a.common.state_root()?;
    let dir = PoolDir::new(&root, &a.name);
    resource::ensure_crd(&client).await?;
    let api = resource::api(&client);
    if api
        .get_opt(&a.name)
        .await
        .map_err(|e| api_context(e, "reading node pools"))?
        .is_some()
    {
        anyhow::bail!(
            "node pool {} already exists (see `wasinode nodepool show {}`)",
            a.name,
            a.name
        );
    }
    if let Some(pid) = dir.provisioner_pid() {
        anyhow::bail!(
            "a provisioner of an earlier pool {} still runs on this host (pid {pid}); stop it (kill {pid}) or use another --state-dir",
            a.name
        );
    }
    join::ensure_bindings(&client).await?;
    let token = join::create_token(&client, &a.name).await?;
    let address_base = match a.address_base {
        Some(b) => b,
        None => local::free_address_base(&root)?,
    };
    // A directory left by a pool that no longer exists in the cluster: start afresh.
    let _ = std::fs::remove_dir_all(&dir.0);
    dir.save(&LocalPool {
        name: a.name.clone(),
        kubeconfig: kubeconfig.clone(),
        address_base,
        kubelet_port: a.kubelet_port,
        agent_args: a
            .insecure_registry
            .iter()
            .flat_map(|r| ["--insecure-registry".to_string(), r.clone()])
            .collect(),
    })?;
    join::write_bootstrap_kubeconfig(&kubeconfig, &token, &dir.bootstrap_kubeconfig())?;

    let mut np = NodePool::new(
        &a.name,
        &resource::api_resource(),
        resource::Spec {
            count: a.node_count,
            workload_runtime: runtime,
            node_labels: labels,
            node_taints: taints,
        },
    );
    np.metadata.finalizers = Some(vec![resource::FINALIZER.to_string()]);
    let created = match api.create(&PostParams::default(), &np).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => {
            Err(anyhow::anyhow!("node pool {} already exists", a.name))
        }
        Err(e) => Err(api_context(e, "creating the node pool")),
    };
    if let Err(e) = created {
        // Leave nothing of the attempt behind: its token and its directory.
        let _ = join::delete_tokens(&client, &a.name).await;
        let _ = std::fs::remove_dir_all(&dir.0);
        return Err(e);
    }
    let status = resource::Status {
        provisioning_state: "Creating".into(),
        provisioner: hostname(),
        ..Default::default()
    };
    api.patch_status(
        &a.name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": status})),
    )
    .await
    .map_err(|e| api_context(e, "writing the node pool status"))?;
    let pid = local::spawn_provisioner(&dir, &a.name)?;
    eprintln!(
        "wasinode: node pool {} created; provisioner pid {pid} runs its {} node(s) on {}.. (logs: {})",
        a.name,
        a.node_count,
        address_base,
        dir.0.display()
    );
    wait_until(&client, &a.name, a.timeout, &dir, |np, nodes| {
        let v = view(np, nodes);
        v["readyNodes"].as_u64() == Some(u64::from(np.spec.count))
            && v["provisioningState"] == "Succeeded"
    })
    .await?;
    let np = get_pool(&client, &a.name).await?;
    let nodes = pool_nodes(&client, &a.name).await?;
    print(a.output, &view(&np, &nodes))?;
    Ok(0)
}

/// Polls the pool until `done`, printing each change of readiness or state; fails at `timeout`
/// with the pool's last status message, or at once if the provisioner died.
async fn wait_until(
    client: &kube::Client,
    name: &str,
    timeout: Duration,
    dir: &PoolDir,
    done: impl Fn(&NodePool, &BTreeMap<String, Node>) -> bool,
) -> anyhow::Result<()> {
    let start = Instant::now();
    let mut last = String::new();
    loop {
        let np = get_pool(client, name).await?;
        let nodes = pool_nodes(client, name).await?;
        if done(&np, &nodes) {
            return Ok(());
        }
        let v = view(&np, &nodes);
        let line = format!(
            "{name}: {}/{} nodes Ready ({}){}",
            v["readyNodes"],
            v["count"],
            v["provisioningState"].as_str().unwrap_or(""),
            v["message"]
                .as_str()
                .map(|m| format!(": {m}"))
                .unwrap_or_default()
        );
        if line != last {
            eprintln!("wasinode: {line}");
            last = line;
        }
        if dir.provisioner_pid().is_none() {
            anyhow::bail!(
                "the provisioner of {name} is not running; see {}",
                dir.log().display()
            );
        }
        if start.elapsed() > timeout {
            anyhow::bail!(
                "timed out after {timeout:?}: {last}; see {}",
                dir.log().display()
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn show(a: ShowArgs) -> anyhow::Result<i32> {
    let (client, _) = a.common.client().await?;
    let np = get_pool(&client, &a.name).await?;
    let nodes = pool_nodes(&client, &a.name).await?;
    let mut v = view(&np, &nodes);
    // On the provisioning host, say whether the provisioner is alive (the status is what it
    // last wrote; `scale` and `delete` restart a dead one).
    let root = a
        .common
        .state_dir
        .clone()
        .unwrap_or_else(local::default_state_root);
    let dir = PoolDir::new(&root, &a.name);
    if dir.config().is_file() {
        v["provisionerRunning"] = json!(dir.provisioner_pid().is_some());
    }
    print(a.output, &v)?;
    Ok(0)
}

async fn list(a: ListArgs) -> anyhow::Result<i32> {
    let (client, _) = a.common.client().await?;
    let pools = match resource::api(&client).list(&ListParams::default()).await {
        Ok(l) => l.items,
        // No CRD yet: no pools.
        Err(kube::Error::Api(s)) if s.code == 404 => vec![],
        Err(e) => return Err(api_context(e, "listing node pools")),
    };
    let mut views = Vec::new();
    for np in &pools {
        let name = np.metadata.name.clone().unwrap_or_default();
        views.push(view(np, &pool_nodes(&client, &name).await?));
    }
    match a.output {
        Output::Table => print!("{}", table(&views)),
        Output::Json => println!("{}", serde_json::to_string_pretty(&views)?),
        Output::Yaml => print!("{}", serde_yaml::to_string(&views)?),
    }
    Ok(0)
}

/// The pool's local directory, with its provisioner running; an error naming the host that runs
/// the pool when it is not this one.
fn local_pool(root: &Path, np: &NodePool) -> anyhow::Result<PoolDir> {
    let name = np.metadata.name.clone().unwrap_or_default();
    let dir = PoolDir::new(root, &name);
    if !dir.config().is_file() {
        let host = np
            .status
            .as_ref()
            .map(|s| s.provisioner.clone())
            .unwrap_or_default();
        anyhow::bail!(
            "node pool {name} is not provisioned from this host's state ({}); its provisioner runs on {:?}: run the command there, or pass its --state-dir",
            dir.0.display(),
            host
        );
    }
    local::spawn_provisioner(&dir, &name)?;
    Ok(dir)
}

async fn scale(a: ScaleArgs) -> anyhow::Result<i32> {
    let (client, kubeconfig) = a.common.client().await?;
    let root = a.common.state_root()?;
    let np = get_pool(&client, &a.name).await?;
    let dir = local_pool(&root, &np)?;
    if a.node_count > np.spec.count {
        // New nodes join with a fresh token (the first may have expired).
        let token = join::create_token(&client, &a.name).await?;
        join::write_bootstrap_kubeconfig(&kubeconfig, &token, &dir.bootstrap_kubeconfig())?;
    }
    resource::api(&client)
        .patch(
            &a.name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"count": a.node_count}})),
        )
        .await
        .map_err(|e| api_context(e, "scaling the node pool"))?;
    let want = a.node_count;
    wait_until(&client, &a.name, a.timeout, &dir, |np, nodes| {
        let v = view(np, nodes);
        let ready = v["readyNodes"].as_u64().unwrap_or(0);
        let settled = v["provisioningState"] == "Succeeded";
        let extra = nodes
            .keys()
            .filter_map(|n| resource::node_index(&a.name, n))
            .any(|i| i >= want);
        ready == u64::from(want) && settled && !extra
    })
    .await?;
    eprintln!("wasinode: node pool {} has {want} node(s)", a.name);
    Ok(0)
}

async fn delete(a: DeleteArgs) -> anyhow::Result<i32> {
    let (client, _) = a.common.client().await?;
    let root = a.common.state_root()?;
    let np = get_pool(&client, &a.name).await?;
    let dir = local_pool(&root, &np)?;
    resource::api(&client)
        .delete(&a.name, &DeleteParams::default())
        .await
        .map_err(|e| api_context(e, "deleting the node pool"))?;
    eprintln!(
        "wasinode: deleting node pool {}: draining and stopping its nodes",
        a.name
    );
    let start = Instant::now();
    let mut last = String::new();
    loop {
        let gone = resource::api(&client)
            .get_opt(&a.name)
            .await
            .map_err(|e| api_context(e, "reading the node pool"))?;
        let Some(np) = gone else { break };
        let status = np.status.unwrap_or_default();
        let line = format!("{} {}", status.provisioning_state, status.message);
        if line != last {
            eprintln!("wasinode: {}: {}", a.name, line.trim());
            last.clone_from(&line);
        }
        if dir.provisioner_pid().is_none() {
            // Restart it: it finishes the deletion it may have been killed in.
            local::spawn_provisioner(&dir, &a.name)?;
        }
        if start.elapsed() > a.timeout {
            anyhow::bail!(
                "timed out after {:?} deleting node pool {}: {}; see {}",
                a.timeout,
                a.name,
                line.trim(),
                dir.log().display()
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // The provisioner exits right after lifting its finalizer.
    for _ in 0..100 {
        if dir.provisioner_pid().is_none() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = std::fs::remove_dir_all(&dir.0);
    eprintln!("wasinode: node pool {} deleted", a.name);
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_pools_are_refused_with_a_pointer() {
        assert_eq!(check_runtime("wasmwasi").ok().as_deref(), Some(WASM_WASI));
        let e = check_runtime("OCIContainer")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("cluster's own tooling"), "{e}");
        assert!(check_runtime("Docker").is_err());
    }

    #[test]
    fn labels_parse_and_the_pool_label_is_reserved() {
        let l = parse_labels(&["a=b".into(), "c=".into()]).unwrap_or_default();
        assert_eq!(l.get("a").map(String::as_str), Some("b"));
        assert_eq!(l.get("c").map(String::as_str), Some(""));
        assert!(parse_labels(&["novalue".into()]).is_err());
        assert!(parse_labels(&["agentpool=x".into()]).is_err());
    }

    #[test]
    fn the_table_shows_taints() {
        let t = table(&[json!({
            "name": "p", "count": 2, "readyNodes": 1, "workloadRuntime": "WasmWasi",
            "provisioningState": "Creating", "nodeTaints": ["k=v:NoSchedule"], "nodeLabels": {},
        })]);
        let lines: Vec<&str> = t.lines().collect();
        assert!(
            lines[0].starts_with("NAME") && lines[0].contains("TAINTS"),
            "{t}"
        );
        assert!(
            lines[1].contains("1/2") && lines[1].contains("k=v:NoSchedule"),
            "{t}"
        );
        assert!(lines[1].contains("<none>"), "{t}");
    }
}
