//! Pools of wasinode nodes (`wasinode nodepool`), as `az aks nodepool` gives AKS users WASI pools.
//!
//! Owns: the `NodePool` custom resource and its CRD ([`resource`]), what `nodepool
//! add|show|list|scale|delete` do to the cluster and how they show a pool ([`ops`]), how a pool's
//! agents join (bootstrap token, RBAC, bootstrap kubeconfig: [`join`]), and the local provisioner,
//! the controller of one pool that runs its `wasinode node` agents as processes on this host
//! ([`local`]).
//!
//! Must not touch: how a node runs pods or talks to the API server as a node (the node crate,
//! used here only for drain, the client and the bootstrap kubeconfig's cluster), command-line
//! flags and terminal output (the CLI hands in plain options and a progress callback, and prints
//! what comes back).

pub mod join;
pub mod local;
pub mod ops;
pub mod resource;

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;

pub use local::{LocalPool, PoolDir, default_state_root};
pub use ops::{AddOptions, add, delete, list, scale, show, table, view};
pub use resource::{NodePool, SpecError};

/// An error the boxed errors of the node crate's kubeconfig helpers come as.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What this crate was doing when the API server failed it (the first half of the message).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    ReadPool,
    ReadPools,
    ListPools,
    CreatePool,
    WritePoolStatus,
    ScalePool,
    DeletePool,
    RemoveFinalizer,
    ListNodes,
    DeleteNode(String),
    ReadCrd,
    InstallCrd,
    CreateBinding(String),
    CreateToken,
    ListTokens,
    DeleteToken,
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Op::ReadPool => f.write_str("reading the node pool"),
            Op::ReadPools => f.write_str("reading node pools"),
            Op::ListPools => f.write_str("listing node pools"),
            Op::CreatePool => f.write_str("creating the node pool"),
            Op::WritePoolStatus => f.write_str("writing the node pool status"),
            Op::ScalePool => f.write_str("scaling the node pool"),
            Op::DeletePool => f.write_str("deleting the node pool"),
            Op::RemoveFinalizer => f.write_str("removing the NodePool finalizer"),
            Op::ListNodes => f.write_str("listing the pool's nodes"),
            Op::DeleteNode(n) => write!(f, "deleting Node {n}"),
            Op::ReadCrd => f.write_str("reading the NodePool CRD"),
            Op::InstallCrd => f.write_str("installing the NodePool CRD"),
            Op::CreateBinding(n) => write!(f, "creating ClusterRoleBinding {n}"),
            Op::CreateToken => f.write_str("creating the bootstrap token"),
            Op::ListTokens => f.write_str("listing bootstrap tokens"),
            Op::DeleteToken => f.write_str("deleting a bootstrap token"),
        }
    }
}

/// How the API server failed a call: one line of what it said, not a debug dump.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("forbidden ({message}); use a cluster admin's kubeconfig")]
    Forbidden { message: String },
    #[error("{message}")]
    Refused { code: u16, message: String },
    #[error("cannot reach the cluster")]
    Unreachable(#[source] kube::Error),
}

impl From<kube::Error> for ApiError {
    fn from(e: kube::Error) -> ApiError {
        match e {
            kube::Error::Api(s) if s.code == 403 => ApiError::Forbidden { message: s.message },
            kube::Error::Api(s) => ApiError::Refused {
                code: s.code,
                message: s.message,
            },
            e => ApiError::Unreachable(e),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("{op}")]
    Api {
        op: Op,
        #[source]
        source: ApiError,
    },
    #[error("reading kubeconfig {}", path.display())]
    ReadKubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    /// Reading the kubeconfig or building a client from it (the node crate's helpers).
    #[error(transparent)]
    Kubeconfig(BoxError),
    #[error("node pool {0} not found (see `wasinode nodepool list`)")]
    NotFound(String),
    #[error(
        "node pool {0} not found: the cluster has no NodePool resource yet (create a pool with `wasinode nodepool add`)"
    )]
    NoNodePoolResource(String),
    #[error("node pool {0} already exists (see `wasinode nodepool show {0}`)")]
    AlreadyExists(String),
    #[error(
        "no permission to read CustomResourceDefinitions; use a kubeconfig of a cluster admin, or ask one to run `wasinode nodepool crd | kubectl apply -f -`"
    )]
    CrdReadForbidden,
    #[error(
        "no permission to install the NodePool CRD ({}); ask a cluster admin to run `wasinode nodepool crd | kubectl apply -f -`",
        resource::CRD_NAME
    )]
    CrdInstallForbidden,
    #[error(
        "the NodePool CRD ({}) was created but the API server does not serve it yet; retry in a moment",
        resource::CRD_NAME
    )]
    CrdNotServed,
    #[error(
        "no permission to create the node bootstrap ClusterRoleBinding {0}; use a cluster admin's kubeconfig"
    )]
    BindingForbidden(String),
    #[error(
        "no permission to create a bootstrap token Secret in kube-system; use a cluster admin's kubeconfig"
    )]
    TokenForbidden,
    #[error("reading /dev/urandom for a bootstrap token")]
    Random(#[source] std::io::Error),
    #[error(
        "a provisioner of an earlier pool {pool} still runs on this host (pid {pid}); stop it (kill {pid}) or use another --state-dir"
    )]
    ProvisionerStillRuns { pool: String, pid: i32 },
    #[error("the provisioner of {pool} is not running; see {}", log.display())]
    ProvisionerNotRunning { pool: String, log: PathBuf },
    #[error(
        "node pool {pool} is not provisioned from this host's state ({}); its provisioner runs on {host:?}: run the command there, or pass its --state-dir",
        dir.display()
    )]
    NotProvisionedHere {
        pool: String,
        dir: PathBuf,
        host: String,
    },
    #[error("timed out after {after:?}: {last}; see {}", log.display())]
    Timeout {
        after: Duration,
        last: String,
        log: PathBuf,
    },
    #[error("timed out after {after:?} deleting node pool {pool}: {last}; see {}", log.display())]
    DeleteTimeout {
        after: Duration,
        pool: String,
        last: String,
        log: PathBuf,
    },
    #[error("all 256 local pool address ranges (127.100.0-255.x) are in use")]
    NoFreeAddresses,
    /// A drain the provisioner could not finish (also written to the pool's status message).
    #[error("draining {node}: {error}")]
    Drain {
        node: String,
        error: node::drain::DrainError,
    },
    #[error("{what} {}", path.display())]
    Io {
        what: IoOp,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("parsing {}", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("starting the pool's provisioner")]
    StartProvisioner(#[source] std::io::Error),
    #[error("starting the agent of {node}")]
    StartAgent {
        node: String,
        #[source]
        source: std::io::Error,
    },
    #[error("process id {0} out of range")]
    Pid(u32),
    #[error("encoding {what}")]
    Encode {
        what: &'static str,
        #[source]
        source: BoxError,
    },
}

/// The file operation an [`Error::Io`] was (the message reads "<op> <path>").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoOp {
    Read,
    ReadCa,
    Write,
    Create,
    Open,
}

impl std::fmt::Display for IoOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            IoOp::Read => "reading",
            IoOp::ReadCa => "reading the cluster CA",
            IoOp::Write => "writing",
            IoOp::Create => "creating",
            IoOp::Open => "opening",
        })
    }
}

impl Error {
    fn api(op: Op) -> impl FnOnce(kube::Error) -> Error {
        move |e| Error::Api {
            op,
            source: e.into(),
        }
    }

    fn io(what: IoOp, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { what, path, source }
    }
}

/// `e` and its sources, `: `-separated (as anyhow's `{:#}` prints them), for logs and status.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        out.push_str(": ");
        out.push_str(&s.to_string());
        next = s.source();
    }
    out
}

/// A client acting as `kubeconfig`'s current context, without kube's built-in retry of 429/503
/// answers: an eviction a PodDisruptionBudget refuses (429) must come back to the drain, which
/// retries it on its own schedule and reports it.
pub async fn client(kubeconfig: &Path) -> Result<kube::Client, Error> {
    node::client_without_retries(kubeconfig)
        .await
        .map_err(|e| Error::Kubeconfig(e.into()))
}

/// This host's name, as the pool's status names its provisioner.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

/// Whether the Node's Ready condition is True.
pub fn node_ready(n: &Node) -> bool {
    n.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}
