//! The one engine both fronts run on: wasmtime Runtime, OCI client and content store, Images,
//! LogStore and the Supervisor with its report channel. `run` and `node` differ only in where
//! pods come from and where reports go.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::mpsc::UnboundedReceiver;
use workload::{Images, LogStore, PullRetry, Report, Reporter, Supervisor, SupervisorConfig};

pub struct EngineOptions {
    pub max_memory: usize,
    pub max_instances: u32,
    pub insecure_registry: Vec<String>,
    pub request_timeout: Duration,
    pub restart_backoff: Duration,
    /// Echo module logs to stderr (they are written to the data dir either way).
    pub echo_logs: bool,
}

/// Creates `data_dir` and everything a Supervisor needs under it.
pub fn start(
    data_dir: &Path,
    opts: &EngineOptions,
) -> anyhow::Result<(Supervisor, UnboundedReceiver<Report>)> {
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("cannot create data dir {}", data_dir.display()))?;
    let rt = runtime::Runtime::new(runtime::RuntimeConfig {
        max_memory: opts.max_memory,
        max_instances: opts.max_instances,
        cache_dir: Some(data_dir.join("modules")),
        ..Default::default()
    })?;
    let store = oci::Store::open(data_dir)?;
    let creds = oci::Credentials::from_docker_config_env().unwrap_or_else(|e| {
        eprintln!("wasinode: warning: ignoring Docker credentials: {e}");
        oci::Credentials::default()
    });
    let client = oci::Client::new(store, creds, opts.insecure_registry.clone());
    let images = Images::new(
        Some(client),
        PullRetry {
            attempts: 3,
            first_delay: Duration::from_millis(500),
        },
    );
    let logs = LogStore::start(data_dir.join("logs"), opts.echo_logs);
    let (reporter, reports) = Reporter::channel();
    let sup = Supervisor::new(
        rt,
        images,
        logs,
        reporter,
        SupervisorConfig {
            request_timeout: opts.request_timeout,
            restart_backoff: workload::command::RestartBackoff {
                initial: opts.restart_backoff,
                max: Duration::from_secs(300),
            },
            ..Default::default()
        },
    );
    Ok((sup, reports))
}
