//! What `wasinode nodepool add|show|list|scale|delete` do to the cluster, and how a pool is shown.
//!
//! A pool is a `NodePool` object in the cluster (see [`crate::resource`]); its nodes are `wasinode
//! node` agents run by a local provisioner on this host (see [`crate::local`]), joined by a
//! bootstrap token (see [`crate::join`]). Progress goes to the caller's `progress` callback, one
//! line at a time; what a command shows at the end comes back as JSON for the caller to print.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

use crate::local::{Host, LocalPool, PoolDir};
use crate::resource::{self, NodePool, POOL_LABEL};
use crate::{Error, Op, join, local, node_ready};

/// Where progress lines go (the CLI prints them on stderr).
pub type Progress<'a> = &'a (dyn Fn(&str) + Send + Sync);

/// A new pool, as `nodepool add` takes it.
#[derive(Debug, Clone)]
pub struct AddOptions {
    /// A DNS label ([`resource::validate_name`]); its nodes are named NAME-000000, ...
    pub name: String,
    pub spec: resource::Spec,
    /// The kubelet API port of every node (each node listens on its own loopback address).
    pub kubelet_port: u16,
    /// Address of node 0 (node i gets this + i); `None`: the first free `127.100.<k>.1`.
    pub address_base: Option<Ipv4Addr>,
    /// Plain-HTTP registries the agents may pull from besides loopback ones.
    pub insecure_registries: Vec<String>,
    /// The agents' `--eviction-hard` (`None`: their default).
    pub eviction_hard: Option<String>,
    /// How long to wait for every node to be Ready.
    pub timeout: Duration,
}

/// The pool `name`, or an error saying it does not exist.
pub async fn get_pool(client: &kube::Client, name: &str) -> Result<NodePool, Error> {
    let api = resource::api(client);
    match api.get_opt(name).await {
        Ok(Some(np)) => Ok(np),
        Ok(None) => Err(Error::NotFound(name.to_string())),
        Err(kube::Error::Api(s)) if s.code == 404 => {
            Err(Error::NoNodePoolResource(name.to_string()))
        }
        Err(e) => Err(Error::api(Op::ReadPool)(e)),
    }
}

/// The pool's Nodes (by the pool label), by name.
pub async fn pool_nodes(
    client: &kube::Client,
    pool: &str,
) -> Result<BTreeMap<String, Node>, Error> {
    let nodes: Api<Node> = Api::all(client.clone());
    let lp = ListParams::default().labels(&format!("{POOL_LABEL}={pool}"));
    let list = nodes.list(&lp).await.map_err(Error::api(Op::ListNodes))?;
    Ok(list
        .into_iter()
        .filter_map(|n| Some((n.metadata.name.clone()?, n)))
        .collect())
}

/// What `show` prints: the pool as its spec says, with each node's readiness read from its Node.
pub fn view(np: &NodePool, nodes: &BTreeMap<String, Node>) -> Value {
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

/// The `list` table of [`view`]s: one row per pool, taints included (AKS's list leaves them out).
pub fn table(pools: &[Value]) -> String {
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

/// Creates the pool and starts its provisioner on this host; returns the pool's [`view`] once
/// every node is Ready. `kubeconfig` (absolute) is what the provisioner acts with and whose
/// cluster the agents join.
pub async fn add(
    client: &kube::Client,
    kubeconfig: &Path,
    host: &Host,
    a: &AddOptions,
    progress: Progress<'_>,
) -> Result<Value, Error> {
    resource::validate_name(&a.name)?;
    let root = &host.state_root;
    let dir = PoolDir::new(root, &a.name);
    resource::ensure_crd(client).await?;
    let api = resource::api(client);
    if api
        .get_opt(&a.name)
        .await
        .map_err(Error::api(Op::ReadPools))?
        .is_some()
    {
        return Err(Error::AlreadyExists(a.name.clone()));
    }
    if let Some(pid) = dir.provisioner_pid() {
        return Err(Error::ProvisionerStillRuns {
            pool: a.name.clone(),
            pid,
        });
    }
    join::ensure_bindings(client).await?;
    let token = join::create_token(client, &a.name).await?;
    let address_base = match a.address_base {
        Some(b) => b,
        None => local::free_address_base(root)?,
    };
    // A directory left by a pool that no longer exists in the cluster: start afresh.
    let _ = std::fs::remove_dir_all(&dir.0);
    dir.save(&LocalPool {
        name: a.name.clone(),
        kubeconfig: kubeconfig.to_path_buf(),
        address_base,
        kubelet_port: a.kubelet_port,
        agent_args: a
            .insecure_registries
            .iter()
            .flat_map(|r| ["--insecure-registry".to_string(), r.clone()])
            .chain(
                a.eviction_hard
                    .iter()
                    .map(|e| format!("--eviction-hard={e}")),
            )
            .collect(),
    })?;
    join::write_bootstrap_kubeconfig(kubeconfig, &token, &dir.bootstrap_kubeconfig())?;

    let mut np = NodePool::new(&a.name, &resource::api_resource(), a.spec.clone());
    np.metadata.finalizers = Some(vec![resource::FINALIZER.to_string()]);
    let created = match api.create(&PostParams::default(), &np).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => Err(Error::AlreadyExists(a.name.clone())),
        Err(e) => Err(Error::api(Op::CreatePool)(e)),
    };
    if let Err(e) = created {
        // Leave nothing of the attempt behind: its token and its directory.
        let _ = join::delete_tokens(client, &a.name).await;
        let _ = std::fs::remove_dir_all(&dir.0);
        return Err(e);
    }
    let status = resource::Status {
        provisioning_state: "Creating".into(),
        provisioner: crate::hostname(),
        ..Default::default()
    };
    api.patch_status(
        &a.name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": status})),
    )
    .await
    .map_err(Error::api(Op::WritePoolStatus))?;
    let pid = local::spawn_provisioner(&dir, &a.name, &host.exe)?;
    progress(&format!(
        "node pool {} created; provisioner pid {pid} runs its {} node(s) on {}.. (logs: {})",
        a.name,
        a.spec.count,
        address_base,
        dir.0.display()
    ));
    wait_until(client, &a.name, a.timeout, &dir, progress, |np, nodes| {
        let v = view(np, nodes);
        v["readyNodes"].as_u64() == Some(u64::from(np.spec.count))
            && v["provisioningState"] == "Succeeded"
    })
    .await?;
    let np = get_pool(client, &a.name).await?;
    let nodes = pool_nodes(client, &a.name).await?;
    Ok(view(&np, &nodes))
}

/// Polls the pool until `done`, printing each change of readiness or state; fails at `timeout`
/// with the pool's last status message, or at once if the provisioner died.
async fn wait_until(
    client: &kube::Client,
    name: &str,
    timeout: Duration,
    dir: &PoolDir,
    progress: Progress<'_>,
    done: impl Fn(&NodePool, &BTreeMap<String, Node>) -> bool,
) -> Result<(), Error> {
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
            progress(&line);
            last = line;
        }
        if dir.provisioner_pid().is_none() {
            return Err(Error::ProvisionerNotRunning {
                pool: name.to_string(),
                log: dir.log(),
            });
        }
        if start.elapsed() > timeout {
            return Err(Error::Timeout {
                after: timeout,
                last,
                log: dir.log(),
            });
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// One pool's [`view`]; on the host whose `state_root` provisions it, with `provisionerRunning`.
pub async fn show(client: &kube::Client, state_root: &Path, name: &str) -> Result<Value, Error> {
    let np = get_pool(client, name).await?;
    let nodes = pool_nodes(client, name).await?;
    let mut v = view(&np, &nodes);
    // On the provisioning host, say whether the provisioner is alive (the status is what it
    // last wrote; `scale` and `delete` restart a dead one).
    let dir = PoolDir::new(state_root, name);
    if dir.config().is_file() {
        v["provisionerRunning"] = json!(dir.provisioner_pid().is_some());
    }
    Ok(v)
}

/// Every pool's [`view`] (none when the cluster has no NodePool resource yet).
pub async fn list(client: &kube::Client) -> Result<Vec<Value>, Error> {
    let pools = match resource::api(client).list(&ListParams::default()).await {
        Ok(l) => l.items,
        // No CRD yet: no pools.
        Err(kube::Error::Api(s)) if s.code == 404 => vec![],
        Err(e) => return Err(Error::api(Op::ListPools)(e)),
    };
    let mut views = Vec::new();
    for np in &pools {
        let name = np.metadata.name.clone().unwrap_or_default();
        views.push(view(np, &pool_nodes(client, &name).await?));
    }
    Ok(views)
}

/// The pool's local directory, with its provisioner running; an error naming the host that runs
/// the pool when it is not this one.
fn local_pool(host: &Host, np: &NodePool) -> Result<PoolDir, Error> {
    let name = np.metadata.name.clone().unwrap_or_default();
    let dir = PoolDir::new(&host.state_root, &name);
    if !dir.config().is_file() {
        let provisioner = np
            .status
            .as_ref()
            .map(|s| s.provisioner.clone())
            .unwrap_or_default();
        return Err(Error::NotProvisionedHere {
            pool: name,
            dir: dir.0,
            host: provisioner,
        });
    }
    local::spawn_provisioner(&dir, &name, &host.exe)?;
    Ok(dir)
}

/// Sets the pool's node count and waits (up to `timeout`) until it has exactly that many nodes,
/// all Ready; nodes removed are cordoned and drained through the Eviction API first.
pub async fn scale(
    client: &kube::Client,
    kubeconfig: &Path,
    host: &Host,
    name: &str,
    node_count: u32,
    timeout: Duration,
    progress: Progress<'_>,
) -> Result<(), Error> {
    let np = get_pool(client, name).await?;
    let dir = local_pool(host, &np)?;
    if node_count > np.spec.count {
        // New nodes join with a fresh token (the first may have expired).
        let token = join::create_token(client, name).await?;
        join::write_bootstrap_kubeconfig(kubeconfig, &token, &dir.bootstrap_kubeconfig())?;
    }
    resource::api(client)
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"count": node_count}})),
        )
        .await
        .map_err(Error::api(Op::ScalePool))?;
    let want = node_count;
    wait_until(client, name, timeout, &dir, progress, |np, nodes| {
        let v = view(np, nodes);
        let ready = v["readyNodes"].as_u64().unwrap_or(0);
        let settled = v["provisioningState"] == "Succeeded";
        let extra = nodes
            .keys()
            .filter_map(|n| resource::node_index(name, n))
            .any(|i| i >= want);
        ready == u64::from(want) && settled && !extra
    })
    .await?;
    progress(&format!("node pool {name} has {want} node(s)"));
    Ok(())
}

/// Deletes the pool and waits (up to `timeout`) until its provisioner has drained and removed
/// every node and lifted its finalizer; then removes the pool's directory on this host.
pub async fn delete(
    client: &kube::Client,
    host: &Host,
    name: &str,
    timeout: Duration,
    progress: Progress<'_>,
) -> Result<(), Error> {
    let np = get_pool(client, name).await?;
    let dir = local_pool(host, &np)?;
    resource::api(client)
        .delete(name, &DeleteParams::default())
        .await
        .map_err(Error::api(Op::DeletePool))?;
    progress(&format!(
        "deleting node pool {name}: draining and stopping its nodes"
    ));
    let start = Instant::now();
    let mut last = String::new();
    loop {
        let gone = resource::api(client)
            .get_opt(name)
            .await
            .map_err(Error::api(Op::ReadPool))?;
        let Some(np) = gone else { break };
        let status = np.status.unwrap_or_default();
        let line = format!("{} {}", status.provisioning_state, status.message);
        if line != last {
            progress(&format!("{name}: {}", line.trim()));
            last.clone_from(&line);
        }
        if dir.provisioner_pid().is_none() {
            // Restart it: it finishes the deletion it may have been killed in.
            local::spawn_provisioner(&dir, name, &host.exe)?;
        }
        if start.elapsed() > timeout {
            return Err(Error::DeleteTimeout {
                after: timeout,
                pool: name.to_string(),
                last: line.trim().to_string(),
                log: dir.log(),
            });
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
    progress(&format!("node pool {name} deleted"));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, ready: bool) -> (String, Node) {
        let n: Node = serde_json::from_value(json!({
            "metadata": {"name": name},
            "status": {"conditions": [
                {"type": "Ready", "status": if ready { "True" } else { "False" }},
            ]},
        }))
        .unwrap_or_default();
        (name.to_string(), n)
    }

    fn pool(count: u32) -> NodePool {
        let spec = resource::Spec::new(count, "WasmWasi", &["team=a".into()], None)
            .unwrap_or_else(|e| panic!("{e}"));
        let mut np = NodePool::new("p", &resource::api_resource(), spec);
        np.status = Some(resource::Status {
            provisioning_state: "Updating".into(),
            ready_nodes: 2,
            nodes: vec![resource::NodeStatus {
                name: "p-000000".into(),
                address: "127.100.0.1".into(),
                ready: true,
                restarts: 0,
            }],
            provisioner: "host-a".into(),
            message: String::new(),
        });
        np
    }

    #[test]
    fn show_reads_readiness_from_the_nodes_not_from_the_last_status() {
        // The status says 2 ready; the Nodes say 1 (p-000001 went NotReady, p-000002 is not
        // registered yet).
        let nodes = BTreeMap::from([node("p-000000", true), node("p-000001", false)]);
        let v = view(&pool(3), &nodes);
        assert_eq!(v["readyNodes"], 1);
        assert_eq!(v["count"], 3);
        assert_eq!(v["workloadRuntime"], "WasmWasi");
        assert_eq!(v["provisioner"], "host-a");
        assert_eq!(v["nodeLabels"], json!({"team": "a"}));
        assert_eq!(
            v["nodes"],
            json!([
                {"name": "p-000000", "address": "127.100.0.1", "ready": true},
                {"name": "p-000001", "address": "", "ready": false},
                {"name": "p-000002", "address": "", "ready": false},
            ])
        );
        assert!(
            v.get("message").is_none(),
            "no message when all is well: {v}"
        );
        // A pool being deleted says so whatever its provisioner last wrote, with its message.
        let mut np = pool(1);
        np.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ));
        if let Some(s) = np.status.as_mut() {
            s.message = "draining p-000000: blocked".into();
        }
        let v = view(&np, &nodes);
        assert_eq!(v["provisioningState"], "Deleting");
        assert_eq!(v["message"], "draining p-000000: blocked");
        let t = table(&[v]);
        let row = t.lines().nth(1).unwrap_or_default();
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(
            cells,
            [
                "p",
                "1",
                "1/1",
                "WasmWasi",
                "Deleting",
                "kubernetes.io/arch=wasm32-wagi:NoSchedule,kubernetes.io/arch=wasm32-wagi:NoExecute",
                "team=a"
            ],
            "{t}"
        );
    }

    #[test]
    fn api_errors_read_as_one_line_saying_what_failed() {
        let status = |code: u16, message: &str| {
            kube::Error::Api(Box::new(kube::core::Status {
                code,
                message: message.into(),
                ..Default::default()
            }))
        };
        let e = Error::api(Op::ScalePool)(status(403, "nodepools.wasinode.dev \"p\" is forbidden"));
        assert_eq!(
            crate::chain(&e),
            "scaling the node pool: forbidden (nodepools.wasinode.dev \"p\" is forbidden); use a cluster admin's kubeconfig"
        );
        let e = Error::api(Op::CreatePool)(status(422, "spec.count: Invalid value"));
        assert_eq!(
            crate::chain(&e),
            "creating the node pool: spec.count: Invalid value"
        );
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
