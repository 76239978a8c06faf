//! The one engine both fronts run on: wasmtime Runtime, OCI client and content store, Images,
//! LogStore and the Supervisor with its report channel. `run` and `node` differ only in where
//! pods come from and where reports go.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use workload::{Images, LogStore, PullRetry, Reporter, Reports, Supervisor, SupervisorConfig};

/// The flags `run` and `node` share: where data lives and how modules run.
#[derive(clap::Args, Debug, Clone)]
pub struct EngineArgs {
    /// Where modules, compiled code and container logs are kept
    /// [default: $WASINODE_DATA_DIR, else $XDG_DATA_HOME/wasinode, else ~/.local/share/wasinode].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Longest a WAGI request may run before it is cut with 504 (e.g. 30s, 500ms, 2m).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub request_timeout: Duration,
    /// Memory one module instance may use, all its memories together (e.g. 128MiB, 64M, 1GiB).
    #[arg(long, default_value = "128MiB", value_parser = parse_size)]
    pub max_memory: usize,
    /// Module instances that may run at once (slots reserved by the pooling allocator). WASI 0.3
    /// services, whose instances are reused, have a pool of this size of their own, reserved
    /// when the first one is loaded.
    #[arg(long, default_value_t = 1000)]
    pub max_instances: u32,
    /// Longest one outbound HTTP request of a module may take, connect to last byte (a WAGI
    /// request's own deadline cuts it sooner; this bounds those of WASI commands).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub outbound_timeout: Duration,
    /// WAGI requests one pod may have running at once; more are answered 503 at once, so a pod
    /// whose requests hang cannot take every instance slot [default: a tenth of
    /// --max-instances, at least 1].
    #[arg(long, value_name = "N")]
    pub max_instances_per_pod: Option<u32>,
    /// Threads that serve the pods' HTTP connections, each owning the connections handed to it
    /// (0: serve them on the agent's main runtime) [default: one per core].
    #[arg(long, value_name = "N")]
    pub serve_threads: Option<usize>,
    /// A plain-HTTP registry to allow besides loopback ones (HOST[:PORT]; repeatable).
    #[arg(long, value_name = "HOST[:PORT]")]
    pub insecure_registry: Vec<String>,
    /// Time in-flight requests and running pods get to stop after SIGINT/SIGTERM.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,
    /// Connections one pod's listener holds at most; at the cap a new connection evicts the
    /// oldest idle one (the kubelet API has its own cap of the same size).
    #[arg(long, default_value_t = 1024, value_name = "N")]
    pub max_connections_per_pod: usize,
    /// Longest wait for a request's head, and longest idle keep-alive (HTTP/1); a request
    /// whose body takes longer than --request-timeout plus this is answered 408.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    pub header_timeout: Duration,
    /// A connection with no request in flight this long is closed (HTTP/1 and HTTP/2).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub idle_timeout: Duration,
    /// First wait before restarting a WASI container (doubles up to 5 minutes), as the kubelet does.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub restart_backoff: Duration,
    /// A container log file is rotated before it grows past this size (as the kubelet's
    /// --container-log-max-size): `<container>.log` becomes `<container>.log.<timestamp>`.
    #[arg(long, default_value = "10Mi", value_parser = parse_size, value_name = "SIZE")]
    pub container_log_max_size: usize,
    /// Log files kept per container run, the current one included (as the kubelet's
    /// --container-log-max-files); older rotated files are deleted.
    #[arg(long, default_value_t = 5, value_name = "N",
          value_parser = clap::value_parser!(u32).range(2..))]
    pub container_log_max_files: u32,
    /// Testing only: the container log writer writes at most this many bytes per second, as on
    /// a slow disk (lines beyond what it keeps up with are dropped and counted).
    #[arg(long, hide = true, value_parser = parse_size, value_name = "SIZE")]
    pub container_log_write_rate: Option<usize>,
}

impl EngineArgs {
    /// The bounds of every HTTP listener's connections (WAGI listeners and the kubelet API).
    pub fn conn_limits(&self) -> workload::listen::ConnLimits {
        workload::listen::ConnLimits {
            max_connections: self.max_connections_per_pod.max(1),
            header_timeout: self.header_timeout,
            idle_timeout: self.idle_timeout,
            ..Default::default()
        }
    }

    /// The threads pods' connections are served on (`None` for `--serve-threads 0`).
    pub fn serve_threads(&self) -> anyhow::Result<Option<workload::threads::ServeThreads>> {
        use workload::threads::ServeThreads;
        let threads = match self.serve_threads {
            Some(0) => return Ok(None),
            Some(n) => ServeThreads::start(n, crate::park_hook()),
            None => ServeThreads::per_core(crate::park_hook()),
        };
        threads
            .map(Some)
            .context("cannot start the threads that serve pods' connections")
    }

    /// How container logs are kept.
    pub fn log_config(&self, echo: bool) -> workload::logs::LogConfig {
        workload::logs::LogConfig {
            echo,
            max_size: self.container_log_max_size as u64,
            max_files: self.container_log_max_files as usize,
            write_rate: self.container_log_write_rate.map(|r| r as u64),
            ..Default::default()
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.data_dir.clone().unwrap_or_else(oci::default_data_dir)
    }
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration like 30s or 500ms: {e}"))
}

pub fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: usize = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 128MiB"))?;
    let mult: usize = match unit.trim() {
        "" | "B" => 1,
        "K" | "KB" | "k" => 1000,
        "Ki" | "KiB" => 1 << 10,
        "M" | "MB" => 1_000_000,
        "Mi" | "MiB" => 1 << 20,
        "G" | "GB" => 1_000_000_000,
        "Gi" | "GiB" => 1 << 30,
        u => {
            return Err(format!(
                "{s:?}: unknown unit {u:?} (use B, KiB, MiB, GiB, K, M, G)"
            ));
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// Creates `data_dir` and everything a Supervisor needs under it.
/// `echo_logs` also prints module log lines to stderr (they are written to the data dir either way).
pub fn start(
    data_dir: &Path,
    opts: &EngineArgs,
    echo_logs: bool,
) -> anyhow::Result<(Supervisor, Reports)> {
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("cannot create data dir {}", data_dir.display()))?;
    let rt = runtime::Runtime::new(runtime::RuntimeConfig {
        max_memory: opts.max_memory,
        max_instances: opts.max_instances,
        outbound_timeout: opts.outbound_timeout,
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
    let logs = LogStore::start_with(data_dir.join("logs"), opts.log_config(echo_logs));
    let (reporter, reports) = Reporter::channel();
    let sup = Supervisor::new(
        rt,
        images,
        logs,
        reporter,
        SupervisorConfig {
            request_timeout: opts.request_timeout,
            max_instances_per_pod: opts
                .max_instances_per_pod
                .unwrap_or(opts.max_instances / 10)
                .max(1),
            restart_backoff: workload::command::RestartBackoff {
                initial: opts.restart_backoff,
                max: Duration::from_secs(300),
            },
            conn_limits: opts.conn_limits(),
            serve_threads: opts.serve_threads()?,
            ..Default::default()
        },
    );
    Ok((sup, reports))
}
