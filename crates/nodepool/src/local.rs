//! The local provisioner: a pool's agents as processes on this host.
//!
//! `nodepool add` starts one detached provisioner per pool (`wasinode nodepool provision P`, its
//! own process group, so it outlives the command and the terminal's Ctrl-C). The provisioner is a
//! small controller of the pool's `NodePool` object: it keeps agents `P-000000 .. P-<count-1>`
//! running (restarting any that die, with backoff), drains and removes the ones above `count`
//! (so `kubectl scale nodepool` is graceful too), writes the pool's status, and on the pool's
//! deletion drains every node, stops every agent, deletes the Nodes and lifts its finalizer.
//!
//! Each node owns one address (`127.100.<pool>.<1+index>` by default, or `--address-base` plus
//! its index): its kubelet API listens there and its WAGI listeners bind there (`wasinode node
//! --node-ip/--address/--pod-address`), so the nodes of one host never share a port. Pods on
//! loopback nodes cannot back a Service (the API server refuses loopback endpoints): give the pool
//! non-loopback addresses this host holds (e.g. on a veth pair, as tests/tests/node_services.rs
//! does) for that.
//!
//! On this host a pool is a directory: `pool.json` (what to run), `bootstrap.kubeconfig`,
//! `provisioner.pid`, `provisioner.log`, and `nodes/<node>/` (the agent's data dir and `agent.log`).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tracing::{info, warn};

use crate::resource::{self, NodePool, NodeStatus, POOL_LABEL};
use crate::{Error, IoOp, Op};

/// This host's side of its pools: where their directories are, and the `wasinode` binary that
/// runs their provisioners (`wasinode nodepool provision P --state-dir ROOT`) and agents
/// (`wasinode node ...`).
#[derive(Debug, Clone)]
pub struct Host {
    pub state_root: PathBuf,
    pub exe: PathBuf,
}

/// What a pool's provisioner needs, written by `nodepool add` to `<pool dir>/pool.json`.
#[derive(Serialize, Deserialize, Debug, Clone)]
#[serde(rename_all = "camelCase")]
pub struct LocalPool {
    pub name: String,
    /// The kubeconfig the provisioner acts with (absolute).
    pub kubeconfig: PathBuf,
    /// Address of node 0; node i gets this plus i.
    pub address_base: Ipv4Addr,
    pub kubelet_port: u16,
    /// Extra `wasinode node` flags (e.g. `--insecure-registry HOST`).
    #[serde(default)]
    pub agent_args: Vec<String>,
}

impl LocalPool {
    pub fn address(&self, index: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.address_base).saturating_add(index))
    }
}

/// `$WASINODE_STATE_DIR`, else `$XDG_STATE_HOME/wasinode/pools`, else `~/.local/state/wasinode/pools`.
pub fn default_state_root() -> PathBuf {
    if let Some(d) = std::env::var_os("WASINODE_STATE_DIR") {
        return PathBuf::from(d);
    }
    let base = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .unwrap_or_else(|| PathBuf::from("/var/lib"));
    base.join("wasinode").join("pools")
}

/// A pool's directory on this host.
#[derive(Debug, Clone)]
pub struct PoolDir(pub PathBuf);

impl PoolDir {
    pub fn new(root: &Path, pool: &str) -> PoolDir {
        PoolDir(root.join(pool))
    }
    pub fn config(&self) -> PathBuf {
        self.0.join("pool.json")
    }
    pub fn bootstrap_kubeconfig(&self) -> PathBuf {
        self.0.join("bootstrap.kubeconfig")
    }
    pub fn pid_file(&self) -> PathBuf {
        self.0.join("provisioner.pid")
    }
    pub fn log(&self) -> PathBuf {
        self.0.join("provisioner.log")
    }
    pub fn node_dir(&self, node: &str) -> PathBuf {
        self.0.join("nodes").join(node)
    }
    pub fn load(&self) -> Result<LocalPool, Error> {
        let text = std::fs::read(self.config()).map_err(Error::io(IoOp::Read, self.config()))?;
        serde_json::from_slice(&text).map_err(|source| Error::Parse {
            path: self.config(),
            source,
        })
    }
    /// Writes `pool.json`, mode 0600 (it names the admin kubeconfig the provisioner acts with).
    pub fn save(&self, p: &LocalPool) -> Result<(), Error> {
        std::fs::create_dir_all(&self.0).map_err(Error::io(IoOp::Create, &self.0))?;
        let bytes = serde_json::to_vec_pretty(p).map_err(|e| Error::Encode {
            what: "pool.json",
            source: e.into(),
        })?;
        crate::join::write_private(&self.config(), &bytes)
    }
    /// The provisioner's pid, if it is running.
    pub fn provisioner_pid(&self) -> Option<i32> {
        let pid: i32 = std::fs::read_to_string(self.pid_file())
            .ok()?
            .trim()
            .parse()
            .ok()?;
        alive(pid).then_some(pid)
    }
}

pub fn alive(pid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks that the process exists.
    pid > 0 && unsafe { libc::kill(pid, 0) } == 0
}

fn signal(pid: i32, sig: libc::c_int) {
    // SAFETY: sends a signal to a process this provisioner started.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// The `127.100.<k>.1` base that no other pool under `root` uses.
pub fn free_address_base(root: &Path) -> Result<Ipv4Addr, Error> {
    let mut used = Vec::new();
    if let Ok(entries) = std::fs::read_dir(root) {
        for e in entries.flatten() {
            if let Ok(p) = PoolDir(e.path()).load() {
                used.push(p.address_base);
            }
        }
    }
    (0..=255u8)
        .map(|k| Ipv4Addr::new(127, 100, k, 1))
        .find(|a| !used.contains(a))
        .ok_or(Error::NoFreeAddresses)
}

/// Starts the pool's provisioner (`exe nodepool provision POOL --state-dir ROOT`), detached,
/// unless it is already running. Returns its pid.
pub fn spawn_provisioner(dir: &PoolDir, pool: &str, exe: &Path) -> Result<i32, Error> {
    if let Some(pid) = dir.provisioner_pid() {
        return Ok(pid);
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.log())
        .map_err(Error::io(IoOp::Open, dir.log()))?;
    let log_too = log.try_clone().map_err(Error::io(IoOp::Open, dir.log()))?;
    let root = dir.0.parent().unwrap_or(Path::new("/"));
    let child = std::process::Command::new(exe)
        .args(["nodepool", "provision", pool, "--state-dir"])
        .arg(root)
        .stdin(Stdio::null())
        .stdout(log_too)
        .stderr(log)
        .env(
            "WASINODE_LOG",
            std::env::var("WASINODE_LOG").unwrap_or_else(|_| "info".into()),
        )
        .process_group(0)
        .spawn()
        .map_err(Error::StartProvisioner)?;
    let pid = i32::try_from(child.id()).map_err(|_| Error::Pid(child.id()))?;
    std::fs::write(dir.pid_file(), pid.to_string())
        .map_err(Error::io(IoOp::Write, dir.pid_file()))?;
    Ok(pid)
}

use std::os::unix::process::CommandExt as _;

/// One agent process and its restart bookkeeping.
struct Agent {
    child: Option<tokio::process::Child>,
    started: Instant,
    restarts: u32,
    next_start: Instant,
}

const RESTART_FIRST: Duration = Duration::from_secs(1);
const RESTART_MAX: Duration = Duration::from_secs(60);
const STOP_GRACE: Duration = Duration::from_secs(30);
const TICK: Duration = Duration::from_secs(2);
/// One drain attempt; a blocked drain is reported in the pool's status and tried again.
const DRAIN_ROUND: Duration = Duration::from_secs(30);

struct Provisioner {
    pool: LocalPool,
    dir: PoolDir,
    exe: PathBuf,
    client: kube::Client,
    agents: BTreeMap<u32, Agent>,
    ever_ready: bool,
    last_status: Option<resource::Status>,
}

/// `wasinode nodepool provision P`: the pool's controller on this host, until the pool is
/// deleted (`Ok` once its agents are stopped, its Nodes deleted and its finalizer lifted) or
/// `stop` completes (every agent stopped; the pool stays in the cluster). Agents run `exe node`.
pub async fn provision(
    root: &Path,
    name: &str,
    exe: &Path,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), Error> {
    let dir = PoolDir::new(root, name);
    let pool = dir.load()?;
    std::fs::write(dir.pid_file(), std::process::id().to_string())
        .map_err(Error::io(IoOp::Write, dir.pid_file()))?;
    let client = crate::client(&pool.kubeconfig).await?;
    let mut p = Provisioner {
        pool,
        dir: dir.clone(),
        exe: exe.to_path_buf(),
        client,
        agents: BTreeMap::new(),
        ever_ready: false,
        last_status: None,
    };
    tokio::pin!(stop);
    info!(pool = name, "provisioner started");
    loop {
        match p.tick().await {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => warn!("pool {name}: {}", crate::chain(&e)),
        }
        tokio::select! {
            _ = &mut stop => {
                info!(pool = name, "stopping every agent (the pool stays in the cluster)");
                let indexes: Vec<u32> = p.agents.keys().copied().collect();
                for i in indexes {
                    p.stop_agent(i).await;
                }
                break;
            }
            _ = tokio::time::sleep(TICK) => {}
        }
    }
    let _ = std::fs::remove_file(dir.pid_file());
    info!(pool = name, "provisioner stopped");
    Ok(())
}

impl Provisioner {
    /// One reconcile; `Ok(true)` when the pool is gone and the provisioner is done.
    async fn tick(&mut self) -> Result<bool, Error> {
        let api = resource::api(&self.client);
        let name = self.pool.name.clone();
        let np = api.get_opt(&name).await.map_err(Error::api(Op::ReadPool))?;
        let Some(np) = np else {
            // Deleted without our finalizer (e.g. forced): still leave nothing behind.
            self.scale_to(0, false).await?;
            return Ok(true);
        };
        if np.metadata.deletion_timestamp.is_some() {
            self.write_status("Deleting", None).await?;
            self.scale_to(0, true).await?;
            crate::join::delete_tokens(&self.client, &name).await?;
            let finalizers: Vec<String> = np
                .metadata
                .finalizers
                .unwrap_or_default()
                .into_iter()
                .filter(|f| f != resource::FINALIZER)
                .collect();
            api.patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"finalizers": finalizers}})),
            )
            .await
            .map_err(Error::api(Op::RemoveFinalizer))?;
            info!(pool = %name, "pool deleted: agents stopped, Nodes deleted");
            return Ok(true);
        }
        let count = np.spec.count;
        let above: Vec<u32> = self
            .agents
            .keys()
            .copied()
            .filter(|i| *i >= count)
            .collect();
        if !above.is_empty() {
            self.write_status("Scaling", None).await?;
            self.scale_to(count, true).await?;
        }
        for i in 0..count {
            self.keep_running(i, &np.spec)?;
        }
        self.refresh_status(count).await?;
        Ok(false)
    }

    /// Drains (when `drain`), stops and deletes the nodes with index >= `count`, highest first.
    async fn scale_to(&mut self, count: u32, drain: bool) -> Result<(), Error> {
        let nodes: Api<Node> = Api::all(self.client.clone());
        // Nodes of the pool in the API without a local agent (e.g. after a provisioner crash).
        let lp = ListParams::default().labels(&format!("{POOL_LABEL}={}", self.pool.name));
        let listed = nodes.list(&lp).await.map_err(Error::api(Op::ListNodes))?;
        let plan = scale_down(
            &self.pool.name,
            count,
            self.agents.keys().copied(),
            listed.iter().filter_map(|n| n.metadata.name.as_deref()),
            drain,
        );
        for Removal {
            index: i,
            node,
            drain,
        } in plan
        {
            if drain {
                info!(%node, "draining");
                let opts = node::drain::DrainOptions {
                    timeout: DRAIN_ROUND,
                    ..Default::default()
                };
                let progress = |line: &str| info!(%node, "{line}");
                if let Err(error) = node::drain::drain(&self.client, &node, &opts, &progress).await
                {
                    let e = Error::Drain { node, error };
                    self.write_status("Scaling", Some(&e.to_string())).await?;
                    return Err(e);
                }
            }
            self.stop_agent(i).await;
            match nodes.delete(&node, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(Error::api(Op::DeleteNode(node))(e)),
            }
            let _ = std::fs::remove_dir_all(self.dir.node_dir(&node));
            info!(%node, "node removed");
        }
        Ok(())
    }

    /// Starts agent `i` if it is not running, or restarts it after its backoff if it died.
    fn keep_running(&mut self, i: u32, spec: &resource::Spec) -> Result<(), Error> {
        let now = Instant::now();
        let agent = self.agents.entry(i).or_insert(Agent {
            child: None,
            started: now,
            restarts: 0,
            next_start: now,
        });
        if let Some(child) = &mut agent.child {
            match child.try_wait() {
                Ok(None) => return Ok(()),
                Ok(Some(status)) => {
                    let ran = now.duration_since(agent.started);
                    let wait = if ran > Duration::from_secs(300) {
                        RESTART_FIRST
                    } else {
                        (RESTART_FIRST * 2u32.saturating_pow(agent.restarts.min(6)))
                            .min(RESTART_MAX)
                    };
                    warn!(
                        node = %resource::node_name(&self.pool.name, i),
                        "agent exited ({status}) after {ran:?}; restarting in {wait:?}"
                    );
                    agent.child = None;
                    agent.restarts += 1;
                    agent.next_start = now + wait;
                }
                Err(e) => warn!("agent {i}: {e}"),
            }
        }
        if agent.child.is_none() && now >= agent.next_start {
            let child = spawn_agent(&self.pool, &self.dir, &self.exe, i, spec)?;
            agent.child = Some(child);
            agent.started = now;
        }
        Ok(())
    }

    async fn stop_agent(&mut self, i: u32) {
        let Some(mut agent) = self.agents.remove(&i) else {
            return;
        };
        let Some(child) = &mut agent.child else {
            return;
        };
        if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
            signal(pid, libc::SIGTERM);
        }
        if tokio::time::timeout(STOP_GRACE, child.wait())
            .await
            .is_err()
        {
            let _ = child.kill().await;
        }
    }

    async fn refresh_status(&mut self, count: u32) -> Result<(), Error> {
        let nodes: Api<Node> = Api::all(self.client.clone());
        let lp = ListParams::default().labels(&format!("{POOL_LABEL}={}", self.pool.name));
        let list = nodes.list(&lp).await.map_err(Error::api(Op::ListNodes))?;
        let ready: BTreeMap<String, bool> = list
            .into_iter()
            .filter_map(|n| Some((n.metadata.name.clone()?, crate::node_ready(&n))))
            .collect();
        let entries: Vec<NodeStatus> = (0..count)
            .map(|i| {
                let name = resource::node_name(&self.pool.name, i);
                NodeStatus {
                    ready: ready.get(&name).copied().unwrap_or(false),
                    address: self.pool.address(i).to_string(),
                    restarts: self.agents.get(&i).map_or(0, |a| a.restarts),
                    name,
                }
            })
            .collect();
        let n_ready = entries.iter().filter(|n| n.ready).count() as u32;
        let state = if n_ready == count {
            self.ever_ready = true;
            "Succeeded"
        } else if self.ever_ready {
            "Updating"
        } else {
            "Creating"
        };
        let status = resource::Status {
            provisioning_state: state.into(),
            ready_nodes: n_ready,
            nodes: entries,
            provisioner: crate::hostname(),
            message: String::new(),
        };
        self.patch_status(status).await
    }

    /// Sets the provisioning state, and the message when `message` is given (a drain blocked
    /// by a PodDisruptionBudget stays on record until the drain succeeds).
    async fn write_status(&mut self, state: &str, message: Option<&str>) -> Result<(), Error> {
        let mut status = self.last_status.clone().unwrap_or_default();
        status.provisioning_state = state.into();
        if let Some(m) = message {
            status.message = m.into();
        }
        status.provisioner = crate::hostname();
        self.patch_status(status).await
    }

    async fn patch_status(&mut self, status: resource::Status) -> Result<(), Error> {
        if self.last_status.as_ref() == Some(&status) {
            return Ok(());
        }
        let api: Api<NodePool> = resource::api(&self.client);
        api.patch_status(
            &self.pool.name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": status})),
        )
        .await
        .map_err(Error::api(Op::WritePoolStatus))?;
        self.last_status = Some(status);
        Ok(())
    }
}

fn spawn_agent(
    pool: &LocalPool,
    dir: &PoolDir,
    exe: &Path,
    i: u32,
    spec: &resource::Spec,
) -> Result<tokio::process::Child, Error> {
    let node = resource::node_name(&pool.name, i);
    let data = dir.node_dir(&node);
    std::fs::create_dir_all(&data).map_err(Error::io(IoOp::Create, &data))?;
    let log_path = data.join("agent.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(Error::io(IoOp::Open, &log_path))?;
    let log_too = log.try_clone().map_err(Error::io(IoOp::Open, &log_path))?;
    let addr = pool.address(i).to_string();
    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg("node")
        .arg("--bootstrap-kubeconfig")
        .arg(dir.bootstrap_kubeconfig())
        .args(["--node-name", &node, "--node-ip", &addr, "--address", &addr])
        .args(["--pod-address", &addr, "--pool", &pool.name])
        .args(["--port", &pool.kubelet_port.to_string()])
        .arg(format!(
            "--register-with-taints={}",
            spec.node_taints.join(",")
        ))
        .arg("--data-dir")
        .arg(&data)
        .args(labels_arg(&spec.node_labels))
        .args(&pool.agent_args)
        .stdin(Stdio::null())
        .stdout(log_too)
        .stderr(log)
        .kill_on_drop(false);
    // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe; it makes the agent stop (SIGTERM,
    // graceful) when its provisioner dies, so no agent outlives the process that restarts it.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|source| Error::StartAgent {
        node: node.clone(),
        source,
    })?;
    info!(%node, %addr, "agent started");
    Ok(child)
}

fn labels_arg(labels: &BTreeMap<String, String>) -> Option<String> {
    (!labels.is_empty()).then(|| {
        let kv: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        format!("--node-labels={}", kv.join(","))
    })
}

/// One node a scale-down removes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removal {
    pub index: u32,
    pub node: String,
    /// Whether it is cordoned and drained first: only when the scale-down drains and the node's
    /// agent runs here (a Node left without an agent has no pod that could still stop).
    pub drain: bool,
}

/// Which nodes go when pool `pool` keeps `count`: every index >= `count` that has an agent here
/// (`agents`) or a Node in the cluster (`nodes`: the names of the pool's Nodes), highest index
/// first, so a pool shrinks from its end and its lowest names stay.
pub fn scale_down<'a>(
    pool: &str,
    count: u32,
    agents: impl IntoIterator<Item = u32>,
    nodes: impl IntoIterator<Item = &'a str>,
    drain: bool,
) -> Vec<Removal> {
    let agents: std::collections::BTreeSet<u32> = agents.into_iter().collect();
    let mut doomed: std::collections::BTreeSet<u32> =
        agents.iter().copied().filter(|i| *i >= count).collect();
    doomed.extend(
        nodes
            .into_iter()
            .filter_map(|n| resource::node_index(pool, n))
            .filter(|i| *i >= count),
    );
    doomed
        .into_iter()
        .rev()
        .map(|index| Removal {
            index,
            node: resource::node_name(pool, index),
            drain: drain && agents.contains(&index),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn removed(plan: &[Removal]) -> Vec<(&str, bool)> {
        plan.iter().map(|r| (r.node.as_str(), r.drain)).collect()
    }

    #[test]
    fn scaling_down_removes_the_highest_nodes_first_and_drains_only_running_agents() {
        // Agents 0-2 run here; the cluster also has a Node 4 whose agent died with an earlier
        // provisioner, and Nodes of other pools whose names start alike.
        let nodes = [
            "p-000000",
            "p-000001",
            "p-000002",
            "p-000004",
            "px-000003",
            "p-3",
            "p-0000001",
        ];
        let plan = scale_down("p", 1, [0, 1, 2], nodes, true);
        assert_eq!(
            removed(&plan),
            [("p-000004", false), ("p-000002", true), ("p-000001", true)]
        );
        assert_eq!(plan[1].index, 2);
        // Growing or keeping the count removes only the stray Node above it.
        assert_eq!(
            removed(&scale_down("p", 3, [0, 1, 2], nodes, true)),
            [("p-000004", false)]
        );
        assert!(scale_down("p", 5, [0, 1, 2], nodes, true).is_empty());
        // A pool deleted without its finalizer: everything goes, nothing is drained.
        assert_eq!(
            removed(&scale_down("p", 0, [0, 1, 2], nodes, false)),
            [
                ("p-000004", false),
                ("p-000002", false),
                ("p-000001", false),
                ("p-000000", false)
            ]
        );
        // A node with both an agent and a Node is removed once.
        assert_eq!(scale_down("p", 0, [0], ["p-000000"], true).len(), 1);
    }

    fn pool(name: &str, base: Ipv4Addr) -> LocalPool {
        LocalPool {
            name: name.into(),
            kubeconfig: "/admin.kubeconfig".into(),
            address_base: base,
            kubelet_port: 10250,
            agent_args: vec!["--insecure-registry".into(), "r:5000".into()],
        }
    }

    #[test]
    fn a_pool_directory_keeps_its_config_private_and_knows_a_dead_provisioner()
    -> Result<(), Box<dyn std::error::Error>> {
        use std::os::unix::fs::PermissionsExt as _;
        let root = tempfile::tempdir()?;
        let dir = PoolDir::new(root.path(), "p");
        let p = root.path().join("p");
        assert_eq!(dir.config(), p.join("pool.json"));
        assert_eq!(dir.bootstrap_kubeconfig(), p.join("bootstrap.kubeconfig"));
        assert_eq!(dir.log(), p.join("provisioner.log"));
        assert_eq!(dir.node_dir("p-000001"), p.join("nodes/p-000001"));
        // Nothing there yet: loading says which file is missing.
        let e = dir
            .load()
            .err()
            .map(|e| crate::chain(&e))
            .unwrap_or_default();
        assert!(
            e.starts_with(&format!("reading {}", dir.config().display())),
            "{e}"
        );

        let saved = pool("p", Ipv4Addr::new(127, 100, 3, 1));
        dir.save(&saved)?;
        let mode = std::fs::metadata(dir.config())?.permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "pool.json names the admin kubeconfig");
        let loaded = dir.load()?;
        assert_eq!(loaded.kubeconfig, saved.kubeconfig);
        assert_eq!(loaded.agent_args, saved.agent_args);
        assert_eq!(loaded.address(2), Ipv4Addr::new(127, 100, 3, 3));

        // No pid file, garbage, or the pid of a process that has exited: no provisioner runs.
        assert_eq!(dir.provisioner_pid(), None);
        std::fs::write(dir.pid_file(), "not a pid")?;
        assert_eq!(dir.provisioner_pid(), None);
        let mut child = std::process::Command::new("true").spawn()?;
        let dead = child.id();
        child.wait()?;
        std::fs::write(dir.pid_file(), dead.to_string())?;
        assert_eq!(dir.provisioner_pid(), None);
        std::fs::write(dir.pid_file(), std::process::id().to_string())?;
        assert_eq!(
            dir.provisioner_pid(),
            i32::try_from(std::process::id()).ok()
        );

        // A broken pool.json is refused with the file's name.
        std::fs::write(dir.config(), "{")?;
        let e = dir.load().err().map(|e| e.to_string()).unwrap_or_default();
        assert_eq!(e, format!("parsing {}", dir.config().display()));
        Ok(())
    }

    #[test]
    fn a_new_pool_gets_the_first_address_range_no_pool_here_uses()
    -> Result<(), Box<dyn std::error::Error>> {
        let root = tempfile::tempdir()?;
        assert_eq!(
            free_address_base(root.path())?,
            Ipv4Addr::new(127, 100, 0, 1)
        );
        PoolDir::new(root.path(), "a").save(&pool("a", Ipv4Addr::new(127, 100, 0, 1)))?;
        PoolDir::new(root.path(), "b").save(&pool("b", Ipv4Addr::new(127, 100, 1, 1)))?;
        std::fs::create_dir_all(root.path().join("broken"))?;
        std::fs::write(root.path().join("broken/pool.json"), "{")?;
        assert_eq!(
            free_address_base(root.path())?,
            Ipv4Addr::new(127, 100, 2, 1)
        );
        Ok(())
    }

    #[test]
    fn agents_get_the_pools_labels_as_one_flag() {
        assert_eq!(labels_arg(&BTreeMap::new()), None);
        let labels = BTreeMap::from([
            ("team".to_string(), "a".to_string()),
            ("tier".to_string(), "".to_string()),
        ]);
        assert_eq!(
            labels_arg(&labels).as_deref(),
            Some("--node-labels=team=a,tier=")
        );
    }
}
