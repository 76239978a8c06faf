//! `wasinode node` as the tests run it: an agent joined to a [`Cluster`] by its bootstrap
//! kubeconfig, with a free kubelet port, a node name and IP, a pool and a data dir that is kept
//! across restarts (so a restarted agent finds its kubeconfig, module cache and container logs and
//! re-adopts its pods). Killed on drop.
//!
//! ```no_run
//! # use e2e::{agent::{Agent, AgentOptions}, cluster::Cluster};
//! let cluster = Cluster::up()?;
//! let mut agent = Agent::start(&cluster, AgentOptions::new("wasi-node-1"))?;
//! agent.wait_ready(&cluster, std::time::Duration::from_secs(60))?;
//! agent.kill()?;      // kill -9
//! agent.restart()?;   // the same node, port and data dir
//! # anyhow::Ok(())
//! ```
//!
//! Also the pod manifests the node tests share ([`wagi_pod`], [`TOLERATIONS`]).

use std::path::PathBuf;
use std::process::{Command, ExitStatus};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::cluster::Cluster;
use crate::wasinode::{Wasinode, binary, free_port};

macro_rules! eviction_hard {
    () => {
        "memory.available<100Mi,nodefs.available<1Gi,nodefs.inodesFree<5%,pid.available<10%"
    };
}

/// `--eviction-hard` of every agent the tests start: the kubelet's defaults, except that disk
/// pressure begins below 1 GiB free rather than below 10% of the filesystem. The tests run on
/// shared machines whose disks other work fills: with 9.8% of a 252 GB disk free, every test node
/// reported DiskPressure, kube-scheduler placed no pod on it and the tests timed out. What a test
/// node needs is an amount of space, not a share of whatever disk it is on.
pub const EVICTION_HARD: &str = eviction_hard!();

/// [`EVICTION_HARD`] as the agent's argument.
pub const EVICTION_HARD_ARG: &str = concat!("--eviction-hard=", eviction_hard!());

/// How to start an agent. `AgentOptions::new(name)` gives node IP 127.0.0.1, the default pool
/// and no extra arguments.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    pub node_name: String,
    pub node_ip: String,
    pub pool: Option<String>,
    /// Appended to the command line (e.g. `--shutdown-grace 5s`).
    pub args: Vec<String>,
    /// Extra environment (`WASINODE_LOG` is `$WASINODE_AGENT_LOG`, else `info`, and
    /// `DOCKER_CONFIG` an empty folder unless set here).
    pub env: Vec<(String, String)>,
}

impl AgentOptions {
    pub fn new(node_name: &str) -> AgentOptions {
        AgentOptions {
            node_name: node_name.to_string(),
            node_ip: "127.0.0.1".to_string(),
            pool: None,
            args: vec![],
            env: vec![],
        }
    }

    pub fn ip(mut self, ip: &str) -> Self {
        self.node_ip = ip.to_string();
        self
    }

    pub fn pool(mut self, pool: &str) -> Self {
        self.pool = Some(pool.to_string());
        self
    }

    pub fn args(mut self, args: &[&str]) -> Self {
        self.args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }
}

/// A `wasinode node` process (killed on drop) and the directory it keeps across restarts.
pub struct Agent {
    pub opts: AgentOptions,
    /// The kubelet API port (HTTPS), the same for every run.
    pub port: u16,
    /// `--data-dir`: `kubelet.kubeconfig`, `modules/`, `logs/`, `volumes/`.
    pub data_dir: PathBuf,
    bootstrap: PathBuf,
    /// One output file per run, `agent-<n>.out`.
    outputs: Vec<PathBuf>,
    process: Option<Wasinode>,
    dir: Option<tempfile::TempDir>,
}

impl Agent {
    /// Starts the agent (does not wait for the Node; see [`Agent::wait_ready`]).
    pub fn start(cluster: &Cluster, opts: AgentOptions) -> Result<Agent> {
        let dir = tempfile::Builder::new()
            .prefix("wasinode-agent-")
            .tempdir()?;
        let mut agent = Agent {
            opts,
            port: free_port(),
            data_dir: dir.path().join("data"),
            bootstrap: cluster.bootstrap_kubeconfig(),
            outputs: vec![],
            process: None,
            dir: Some(dir),
        };
        agent.spawn()?;
        Ok(agent)
    }

    /// Starts the agent and waits until its Node is Ready.
    pub fn start_ready(cluster: &Cluster, opts: AgentOptions, timeout: Duration) -> Result<Agent> {
        let mut agent = Agent::start(cluster, opts)?;
        agent
            .wait_ready(cluster, timeout)
            .with_context(|| agent.output())?;
        Ok(agent)
    }

    fn dir(&self) -> PathBuf {
        self.data_dir
            .parent()
            .map(PathBuf::from)
            .unwrap_or_else(|| self.data_dir.clone())
    }

    fn spawn(&mut self) -> Result<()> {
        if self.running() {
            bail!("the agent is still running (pid {:?})", self.pid());
        }
        let log = self
            .dir()
            .join(format!("agent-{}.out", self.outputs.len() + 1));
        let mut cmd = Command::new(binary());
        cmd.arg("node")
            .arg("--bootstrap-kubeconfig")
            .arg(&self.bootstrap)
            .arg("--port")
            .arg(self.port.to_string())
            .arg("--node-name")
            .arg(&self.opts.node_name)
            .arg("--node-ip")
            .arg(&self.opts.node_ip)
            .arg("--data-dir")
            .arg(&self.data_dir);
        if let Some(pool) = &self.opts.pool {
            cmd.arg("--pool").arg(pool);
        }
        if !self
            .opts
            .args
            .iter()
            .any(|a| a.starts_with("--eviction-hard"))
        {
            cmd.arg(EVICTION_HARD_ARG);
        }
        // No credentials from the user's own Docker config: only what a test gives.
        cmd.args(&self.opts.args)
            .env(
                "WASINODE_LOG",
                std::env::var("WASINODE_AGENT_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("NO_COLOR", "1")
            .env("DOCKER_CONFIG", self.dir().join("docker"));
        for (k, v) in &self.opts.env {
            cmd.env(k, v);
        }
        self.outputs.push(log.clone());
        self.process = Some(Wasinode::spawn(cmd, log, self.data_dir.clone(), None)?);
        Ok(())
    }

    /// Starts the agent again with the same node name, IP, port, arguments and data dir (so with
    /// the kubeconfig it obtained the first time). It must have exited first.
    pub fn restart(&mut self) -> Result<()> {
        self.spawn()
    }

    /// The node's own kubeconfig (written after the CSR was issued).
    pub fn kubeconfig(&self) -> PathBuf {
        self.data_dir.join("kubelet.kubeconfig")
    }

    pub fn node_name(&self) -> &str {
        &self.opts.node_name
    }

    /// The process id of the current run.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(Wasinode::pid)
    }

    /// Whether the current run is still going.
    pub fn running(&mut self) -> bool {
        self.process.as_mut().is_some_and(Wasinode::running)
    }

    fn process(&mut self) -> Result<&mut Wasinode> {
        self.process.as_mut().context("the agent was never started")
    }

    /// `kill -9`, then waits for the process to be gone.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        let p = self.process()?;
        p.signal("KILL")?;
        p.wait_exit(Duration::from_secs(10))
    }

    /// SIGTERM, then the exit status (within `timeout`).
    pub fn terminate(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let p = self.process()?;
        p.signal("TERM")?;
        p.wait_exit(timeout)
    }

    /// SIGINT, then the exit status (within `timeout`).
    pub fn interrupt(&mut self, timeout: Duration) -> Result<ExitStatus> {
        self.process()?.interrupt(timeout)
    }

    /// Waits until `addr` accepts connections; fails early if the agent exits.
    pub fn wait_listening(&mut self, addr: &str, timeout: Duration) -> Result<()> {
        self.process()?.wait_listening(addr, timeout)
    }

    /// Resident memory of the current run in KiB.
    pub fn rss_kib(&self) -> Result<u64> {
        self.process
            .as_ref()
            .context("the agent was never started")?
            .rss_kib()
    }

    /// Waits until the agent's Node has condition Ready=True (and the agent still runs).
    pub fn wait_ready(&mut self, cluster: &Cluster, timeout: Duration) -> Result<()> {
        let name = self.opts.node_name.clone();
        cluster.wait_for(&format!("node {name} Ready"), timeout, || {
            if !self.running() {
                bail!("the agent exited:\n{}", self.output());
            }
            node_ready(cluster, &name)
        })
    }

    /// Everything every run printed, each run headed by `--- run N`.
    pub fn output(&self) -> String {
        let mut out = String::new();
        for (i, path) in self.outputs.iter().enumerate() {
            out.push_str(&format!("--- agent run {}\n", i + 1));
            out.push_str(&std::fs::read_to_string(path).unwrap_or_default());
        }
        out
    }

    /// What the current run printed.
    pub fn last_output(&self) -> String {
        self.outputs
            .last()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // Kill first, so nothing writes into the directory while it is removed.
        self.process = None;
        let keep = std::env::var_os("WASINODE_KEEP_CLUSTER").is_some_and(|v| v != "0");
        if (std::thread::panicking() || keep)
            && let Some(dir) = self.dir.take()
        {
            eprintln!("agent: kept {}", dir.keep().display());
        }
    }
}

/// Whether node `name` has condition Ready=True.
pub fn node_ready(cluster: &Cluster, name: &str) -> Result<bool> {
    let node = cluster.kubectl_json(&["get", "node", name])?;
    Ok(node["status"]["conditions"].as_array().is_some_and(|cs| {
        cs.iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    }))
}

/// Checks that `kubectl describe node` shows the seed's pool label and `wasm32-wagi` label and
/// taints (both effects).
pub fn check_seed_node(cluster: &Cluster, node: &str, pool: &str) -> Result<()> {
    let describe = cluster.kubectl(&["describe", "node", node])?;
    for want in [
        format!("agentpool={pool}"),
        "kubernetes.io/arch=wasm32-wagi".to_string(),
        "kubernetes.io/arch=wasm32-wagi:NoExecute".to_string(),
        "kubernetes.io/arch=wasm32-wagi:NoSchedule".to_string(),
    ] {
        if !describe.contains(&want) {
            bail!("kubectl describe node {node} lacks {want:?}:\n{describe}");
        }
    }
    Ok(())
}

/// The tolerations of the seed's node taints (`kubernetes.io/arch=wasm32-wagi`, both effects).
pub const TOLERATIONS: &str = r#"[
  {"key": "kubernetes.io/arch", "operator": "Equal", "value": "wasm32-wagi", "effect": "NoSchedule"},
  {"key": "kubernetes.io/arch", "operator": "Equal", "value": "wasm32-wagi", "effect": "NoExecute"}
]"#;

/// A WAGI pod in `default` with the seed's nodeSelector, its tolerations when `tolerate`, one
/// container `hello` running `image`, default-host `addr` and the modules annotation `modules`,
/// and a 5 s termination grace period.
pub fn wagi_pod(name: &str, addr: &str, modules: &str, image: &str, tolerate: bool) -> Value {
    let mut pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": "default",
            "annotations": {
                "alpha.wagi.krustlet.dev/default-host": addr,
                "alpha.wagi.krustlet.dev/modules": modules,
            },
        },
        "spec": {
            "nodeSelector": {"kubernetes.io/arch": "wasm32-wagi"},
            "terminationGracePeriodSeconds": 5,
            "containers": [{"name": "hello", "image": image}],
        },
    });
    if tolerate {
        pod["spec"]["tolerations"] = serde_json::from_str(TOLERATIONS).unwrap_or(Value::Null);
    }
    pod
}

/// `wagi_pod` with the tolerations and one route `/hello` to container `hello`.
pub fn hello_pod(name: &str, addr: &str, image: &str) -> Value {
    wagi_pod(name, addr, r#"{"hello": {"route": "/hello"}}"#, image, true)
}
