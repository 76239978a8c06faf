//! soak: `wasinode node` on the local control plane (as node-bench: `tools/cluster up`, one agent
//! joined by bootstrap token) under everything at once for a bounded time, and whether it comes
//! out as it went in. A benchmark, not a test: it prints figures and asserts no timing. It fails
//! only when a pod never becomes Ready or the harness breaks (control plane, agent, ports).
//!
//! For `SOAK_SECS`, all at once:
//! - pod churn: waves of `WAVE_PODS` WAGI pods (bound at creation, each on its own port, the same
//!   ports every wave) created `CREATE_CONCURRENCY` at a time, all Ready, all deleted, then
//!   `WAVE_PAUSE_SECS` of rest; waves follow each other until the time is up;
//! - steady load: `LOAD_CONNS` client threads, each a round-robin over the routes of `LOAD_PODS`
//!   long-lived WAGI pods (`hello.wasm` on `/hello`, one request per connection); a request
//!   counts as answered when it gets 200 `hello world`, as failed otherwise;
//! - a guest spamming stderr: a WASI command pod (`examples/guests/spam.rs`) writing lines to its
//!   log in a tight loop (a count large enough to outlast the run, then it exits);
//! - a slowloris client: `SLOWLORIS_CONNS` connections, two in three to a `victim` WAGI pod (a
//!   half-sent request head, one more byte every second) and one in three to the kubelet API
//!   (silent: no TLS handshake); a connection the agent closes is opened again. One more client
//!   thread requests the victim's `/hello` every 50 ms (counted apart from the healthy pods).
//!
//! The agent runs with `--max-connections-per-pod MAX_CONNS` (below what the slowloris client
//! opens, so eviction of the oldest idle connection is exercised), `--header-timeout`,
//! `--idle-timeout`, `--container-log-max-size`, `--container-log-max-files` as set below.
//!
//! Rows: `joined` (Node Ready, no pod), `start` (every long-lived pod Ready and every client
//! running), one per wave (sampled after the wave's pause), `end`, and `drained` (clients stopped,
//! every pod deleted, `WAVE_PAUSE_SECS` later, so log files closed when idle). Each row: the
//! agent's VmRSS and threads (`/proc/<pid>/status`), open descriptors (`/proc/<pid>/fd`), bytes
//! allocated under its data dir (a walk: st_blocks), requests answered and failed. Tokio's task
//! count is not visible from outside the process without `tokio_unstable`: printed as n/a.
//! Verdict against the targets: descriptors and disk flat (end within a slack of their level
//! after the first wave), VmRSS within 10% of it, zero failed requests to the healthy pods.
//!
//! Run it through `bench/run soak` (builds the agent, the guests and the control plane first), or
//! directly: `target/release/soak` from the repo root.
//!
//! Knobs (environment): SOAK_SECS=600 WAVE_PODS=20 WAVE_PAUSE_SECS=5 MAX_WAVES=10000
//! LOAD_PODS=10 LOAD_CONNS=4 SLOWLORIS_CONNS=600 MAX_CONNS=200 HEADER_TIMEOUT_SECS=10
//! IDLE_TIMEOUT_SECS=30 LOG_MAX_SIZE_MIB=10 LOG_MAX_FILES=5 CREATE_CONCURRENCY=8
//! NODE_BASE_PORT=23000 READY_TIMEOUT_SECS=120.

use std::io::{ErrorKind, Read, Seek, SeekFrom, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use e2e::cluster::Cluster;
use e2e::guests::guest;
use e2e::wasinode::{Wasinode, free_port, get};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, LogParams, PostParams};
use serde_json::json;
use wasinode_bench::{
    Bench, LABEL, NODE, NS, admin_client, answers_hello, env_usize, fd_kinds, mib, node_ready,
    open_fds, proc_status, wagi_pod,
};

const SPAM_POD: &str = "soak-spam";
const VICTIM_POD: &str = "soak-victim";
/// Error messages of failed healthy requests kept for the report.
const KEEP_ERRORS: usize = 5;

// ------------------------------------------------------------------------------------------------
// Clients (plain threads: blocking sockets, bounded by a stop flag and a deadline).

#[derive(Default)]
struct Counts {
    ok: AtomicU64,
    failed: AtomicU64,
    /// The first few failures, as the client saw them.
    errors: Mutex<Vec<String>>,
}

impl Counts {
    fn record(&self, port: u16, r: Result<e2e::wasinode::HttpResponse>) {
        match r {
            Ok(r) if r.status == 200 && r.body.trim_end() == "hello world" => {
                self.ok.fetch_add(1, Ordering::Relaxed);
            }
            other => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                let what = match other {
                    Ok(r) => format!("port {port}: {} {:?}", r.status, r.body),
                    Err(e) => format!("port {port}: {e:#}"),
                };
                if let Ok(mut errs) = self.errors.lock()
                    && errs.len() < KEEP_ERRORS
                {
                    errs.push(what);
                }
            }
        }
    }
    fn get(&self) -> (u64, u64) {
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

/// Keeps going until `stop` or `deadline`, whichever comes first.
fn running(stop: &AtomicBool, deadline: Instant) -> bool {
    !stop.load(Ordering::Relaxed) && Instant::now() < deadline
}

/// One load thread: round-robin over `ports` from `offset`, pausing `pause` between requests.
fn load_thread(
    ports: Vec<u16>,
    offset: usize,
    pause: Duration,
    counts: Arc<Counts>,
    stop: Arc<AtomicBool>,
    deadline: Instant,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut i = offset;
        while running(&stop, deadline) && !ports.is_empty() {
            let port = ports[i % ports.len()];
            counts.record(port, get(&format!("127.0.0.1:{port}"), "/hello"));
            i += 1;
            if !pause.is_zero() {
                std::thread::sleep(pause);
            }
        }
    })
}

#[derive(Default)]
struct Slow {
    /// Connections open right now.
    held: AtomicU64,
    /// Connections opened in all.
    opened: AtomicU64,
    /// Connections the agent closed (evicted at the cap, or timed out) that were opened again.
    closed_by_agent: AtomicU64,
    /// Connects that failed.
    connect_errors: AtomicU64,
}

/// The slowloris client: `n` connections, two in three to `victim` (a half-sent head, one more
/// byte a second), one in three to `kubelet` (silent). Checks each once a second.
fn slowloris_thread(
    victim: SocketAddr,
    kubelet: SocketAddr,
    n: usize,
    slow: Arc<Slow>,
    stop: Arc<AtomicBool>,
    deadline: Instant,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut conns: Vec<Option<TcpStream>> = (0..n).map(|_| None).collect();
        let mut buf = [0u8; 256];
        while running(&stop, deadline) {
            let tick = Instant::now();
            for (i, slot) in conns.iter_mut().enumerate() {
                if !running(&stop, deadline) {
                    break;
                }
                let to_victim = i % 3 != 2;
                if let Some(s) = slot {
                    // Closed by the agent: EOF, an error, or an answer (408).
                    let alive = match s.read(&mut buf) {
                        Ok(_) => false,
                        Err(e) => e.kind() == ErrorKind::WouldBlock,
                    };
                    if !alive {
                        *slot = None;
                        slow.closed_by_agent.fetch_add(1, Ordering::Relaxed);
                        slow.held.fetch_sub(1, Ordering::Relaxed);
                    } else if to_victim {
                        let _ = s.write(b"a");
                    }
                }
                if slot.is_none() {
                    let target = if to_victim { victim } else { kubelet };
                    match TcpStream::connect_timeout(&target, Duration::from_secs(1)) {
                        Ok(mut s) => {
                            if to_victim {
                                let _ =
                                    s.write_all(b"GET /hello HTTP/1.1\r\nHost: victim\r\nX-Slow: ");
                            }
                            if s.set_nonblocking(true).is_ok() {
                                *slot = Some(s);
                                slow.opened.fetch_add(1, Ordering::Relaxed);
                                slow.held.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Err(_) => {
                            slow.connect_errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
            if let Some(rest) = Duration::from_secs(1).checked_sub(tick.elapsed()) {
                std::thread::sleep(rest);
            }
        }
    })
}

// ------------------------------------------------------------------------------------------------
// Samples of the agent, from outside.

#[derive(Clone, Copy, Default)]
struct Sample {
    at: Duration,
    rss_kib: u64,
    threads: u64,
    fds: u64,
    disk: u64,
    ok: u64,
    failed: u64,
    victim_ok: u64,
    victim_failed: u64,
    slow_held: u64,
    slow_closed: u64,
}

/// Bytes allocated to files under `dir` (st_blocks, links not followed; files that vanish
/// during the walk are skipped). Bounded by depth.
fn disk_bytes(dir: &Path) -> u64 {
    fn walk(dir: &Path, depth: usize) -> u64 {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return 0;
        };
        let mut sum = 0;
        for e in entries.flatten() {
            let Ok(m) = e.path().symlink_metadata() else {
                continue;
            };
            if m.is_dir() && depth < 16 {
                sum += walk(&e.path(), depth + 1);
            } else if m.is_file() {
                sum += m.blocks() * 512;
            }
        }
        sum
    }
    walk(dir, 0)
}

/// What the spam guest's logs hold: (files, bytes, the highest line number on disk, lines the
/// log says were dropped, in the files kept).
fn spam_logs(logs: &Path) -> (usize, u64, u64, u64) {
    let Ok(entries) = std::fs::read_dir(logs) else {
        return (0, 0, 0, 0);
    };
    let Some(dir) = entries.flatten().map(|e| e.path()).find(|p| {
        p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(&format!("{NS}_{SPAM_POD}_")))
    }) else {
        return (0, 0, 0, 0);
    };
    let (mut files, mut bytes, mut dropped, mut at) = (0, 0, 0, 0);
    for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        let Ok(m) = e.metadata() else { continue };
        files += 1;
        at = at.max(last_spam_line(&e.path()));
        bytes += m.blocks() * 512;
        // The notes: `wasinode: N lines dropped (log writer behind)`.
        if let Ok(text) = std::fs::read(e.path()) {
            let text = String::from_utf8_lossy(&text);
            for l in text.lines() {
                if let Some(n) = l
                    .split_once("wasinode: ")
                    .and_then(|(_, rest)| rest.strip_suffix(" lines dropped (log writer behind)"))
                    .and_then(|n| n.trim().parse::<u64>().ok())
                {
                    dropped += n;
                }
            }
        }
    }
    (files, bytes, at, dropped)
}

/// The highest `spam <n>` in the last 64 KiB of a log file.
fn last_spam_line(path: &Path) -> u64 {
    let Ok(mut f) = std::fs::File::open(path) else {
        return 0;
    };
    let len = f.metadata().map_or(0, |m| m.len());
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(64 << 10)));
    let mut tail = Vec::new();
    let _ = f.take(64 << 10).read_to_end(&mut tail);
    String::from_utf8_lossy(&tail)
        .lines()
        .filter_map(|l| l.split_once(" spam ").map(|(_, r)| r))
        .filter_map(|r| r.split_whitespace().next()?.parse::<u64>().ok())
        .max()
        .unwrap_or(0)
}

struct Probe {
    pid: u32,
    data_dir: PathBuf,
    t0: Instant,
    healthy: Arc<Counts>,
    victim: Arc<Counts>,
    slow: Arc<Slow>,
}

impl Probe {
    /// One sample; the walk runs on a blocking thread.
    async fn sample(&self) -> Result<Sample> {
        let (pid, dir) = (self.pid, self.data_dir.clone());
        let (rss_kib, threads, fds, disk) = tokio::task::spawn_blocking(move || {
            (
                proc_status(pid, "VmRSS:").unwrap_or(0),
                proc_status(pid, "Threads:").unwrap_or(0),
                open_fds(pid),
                disk_bytes(&dir),
            )
        })
        .await?;
        let (ok, failed) = self.healthy.get();
        let (victim_ok, victim_failed) = self.victim.get();
        Ok(Sample {
            at: self.t0.elapsed(),
            rss_kib,
            threads,
            fds,
            disk,
            ok,
            failed,
            victim_ok,
            victim_failed,
            slow_held: self.slow.held.load(Ordering::Relaxed),
            slow_closed: self.slow.closed_by_agent.load(Ordering::Relaxed),
        })
    }
}

fn header() {
    println!(
        "  {:<9} {:>6} {:>9} {:>5} {:>9} {:>7} {:>5} {:>21} {:>17} {:>17}  note",
        "row",
        "t (s)",
        "RSS MiB",
        "fds",
        "disk MiB",
        "threads",
        "tasks",
        "healthy ok / failed",
        "victim ok / fail",
        "slowloris held/re"
    );
}

fn row(label: &str, s: &Sample, note: &str) {
    println!(
        "  {label:<9} {:>6.0} {:>9.1} {:>5} {:>9.1} {:>7} {:>5} {:>21} {:>17} {:>17}  {note}",
        s.at.as_secs_f64(),
        mib(s.rss_kib),
        s.fds,
        s.disk as f64 / (1 << 20) as f64,
        s.threads,
        "n/a",
        format!("{} / {}", s.ok, s.failed),
        format!("{} / {}", s.victim_ok, s.victim_failed),
        format!("{} / {}", s.slow_held, s.slow_closed),
    );
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

// ------------------------------------------------------------------------------------------------
// Pods besides the WAGI ones of the lib.

/// The spamming WASI command (restartPolicy Always, as a Deployment's pod would be).
fn spam_pod(image: &str, lines: u64) -> Result<Pod> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": SPAM_POD, "namespace": NS, "labels": {LABEL: "spam"}},
        "spec": {
            "nodeName": NODE,
            "tolerations": [
                {"key": "kubernetes.io/arch", "operator": "Equal", "value": "wasm32-wagi", "effect": "NoSchedule"},
                {"key": "kubernetes.io/arch", "operator": "Equal", "value": "wasm32-wagi", "effect": "NoExecute"},
            ],
            "terminationGracePeriodSeconds": 2,
            "containers": [{
                "name": "spam",
                "image": image,
                "env": [{"name": "SPAM_LINES", "value": lines.to_string()}],
            }],
        },
    }))?)
}

async fn spam_restarts(pods: &Api<Pod>) -> i32 {
    pods.get(SPAM_POD)
        .await
        .ok()
        .and_then(|p| p.status?.container_statuses)
        .and_then(|cs| cs.first().map(|c| c.restart_count))
        .unwrap_or(-1)
}

/// Waits (bounded) until nothing listens on `ports`: the last wave's listeners are gone.
async fn wait_ports_free(ports: &[u16], timeout: Duration) -> Result<()> {
    let until = Instant::now() + timeout;
    loop {
        let taken: Vec<u16> = ports
            .iter()
            .copied()
            .filter(|p| TcpListener::bind(("127.0.0.1", *p)).is_err())
            .collect();
        if taken.is_empty() {
            return Ok(());
        }
        if Instant::now() > until {
            bail!("ports {taken:?} still taken {timeout:?} after their pods were deleted");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ------------------------------------------------------------------------------------------------

#[tokio::main]
async fn main() -> Result<()> {
    let soak = Duration::from_secs(env_usize("SOAK_SECS", 600) as u64);
    let wave_pods = env_usize("WAVE_PODS", 20).max(1);
    let wave_pause = Duration::from_secs(env_usize("WAVE_PAUSE_SECS", 5) as u64);
    let max_waves = env_usize("MAX_WAVES", 10_000).max(1);
    let load_pods = env_usize("LOAD_PODS", 10).max(1);
    let load_conns = env_usize("LOAD_CONNS", 4).max(1);
    let slowloris_conns = env_usize("SLOWLORIS_CONNS", 600);
    let max_conns = env_usize("MAX_CONNS", 200).max(1);
    let header_timeout = env_usize("HEADER_TIMEOUT_SECS", 10).max(1);
    let idle_timeout = env_usize("IDLE_TIMEOUT_SECS", 30).max(1);
    let log_max_mib = env_usize("LOG_MAX_SIZE_MIB", 10).max(1);
    let log_max_files = env_usize("LOG_MAX_FILES", 5).max(2);
    let concurrency = env_usize("CREATE_CONCURRENCY", 8).max(1);
    let base_port = env_usize("NODE_BASE_PORT", 23000) as u16;
    let ready_timeout = Duration::from_secs(env_usize("READY_TIMEOUT_SECS", 120) as u64);
    // Enough lines to outlast the run (the guest writes a few hundred thousand a second), so the
    // spammer does not restart mid-run; it stops by this count in any case.
    let spam_lines = 1_000_000 * soak.as_secs().max(60) + 10_000_000;

    let hello = guest("hello")?;
    let spam = guest("spam")?;
    let cluster = Cluster::up()?;
    let kubelet_port = free_port();
    let bootstrap = cluster.bootstrap_kubeconfig();
    let max_pods = (load_pods + wave_pods + 10).to_string();
    // The operator's opt-in to local modules: the soak measures the node, not the registry.
    let guest_dir = hello.parent().context("guest dir")?;
    let agent = Wasinode::start(&[
        "node",
        "--allow-local-images",
        guest_dir.to_str().context("guest dir path")?,
        "--max-pods",
        &max_pods,
        "--port",
        &kubelet_port.to_string(),
        "--bootstrap-kubeconfig",
        bootstrap.to_str().context("kubeconfig path")?,
        "--node-name",
        NODE,
        "--node-ip",
        "127.0.0.1",
        e2e::agent::EVICTION_HARD_ARG,
        "--max-connections-per-pod",
        &max_conns.to_string(),
        "--header-timeout",
        &format!("{header_timeout}s"),
        "--idle-timeout",
        &format!("{idle_timeout}s"),
        "--container-log-max-size",
        &format!("{log_max_mib}Mi"),
        "--container-log-max-files",
        &log_max_files.to_string(),
    ])?;
    let pid = agent.pid();
    let data_dir = agent.data_dir.clone();
    let client = admin_client(&cluster.kubeconfig()).await?;
    let nodes: Api<Node> = Api::all(client.clone());
    let (mut b, watch_task) = Bench::joined(
        cluster,
        agent,
        client.clone(),
        &hello,
        base_port,
        ready_timeout,
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let healthy = Arc::new(Counts::default());
    let victim = Arc::new(Counts::default());
    let slow = Arc::new(Slow::default());
    let probe = Probe {
        pid,
        data_dir: data_dir.clone(),
        t0: Instant::now(),
        healthy: healthy.clone(),
        victim: victim.clone(),
        slow: slow.clone(),
    };

    println!(
        "soak: wasinode node on the local control plane for {} s, all at once: waves of {wave_pods} WAGI pods \
         created ({concurrency} in flight), Ready, deleted, {} s apart; {load_conns} client threads round-robin \
         over {load_pods} steady WAGI pods; one WASI guest spamming stderr; a slowloris client with \
         {slowloris_conns} connections (2/3 half-sent heads to a victim pod, 1/3 silent to the kubelet API)",
        soak.as_secs(),
        wave_pause.as_secs()
    );
    println!(
        "  agent flags: --max-connections-per-pod {max_conns} --header-timeout {header_timeout}s --idle-timeout \
         {idle_timeout}s --container-log-max-size {log_max_mib}Mi --container-log-max-files {log_max_files}"
    );
    println!("  load average before the pods: {}", loadavg());
    header();
    let joined = probe.sample().await?;
    row("joined", &joined, "Node Ready, no pod");
    let joined_kinds = fd_kinds(pid, &data_dir);

    // ---- The long-lived pods: steady WAGI pods, the victim, the spammer.
    let (steady_ports, mut specs) = b.port_pods("soak-steady", "steady", load_pods, NODE)?;
    let victim_port = b.ports.free()?;
    specs.push(wagi_pod(
        VICTIM_POD,
        "victim",
        victim_port,
        &b.image,
        Some(NODE),
    )?);
    specs.push(spam_pod(&format!("file://{}", spam.display()), spam_lines)?);
    let names: Vec<String> = specs
        .iter()
        .filter_map(|p| p.metadata.name.clone())
        .collect();
    let api = b.pods.clone();
    let created: Vec<Result<()>> = futures::stream::iter(specs)
        .map(|pod| {
            let api = api.clone();
            async move {
                api.create(&PostParams::default(), &pod).await?;
                Ok(())
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    created.into_iter().collect::<Result<Vec<()>>>()?;
    for n in &names {
        b.wait_ready(n, ready_timeout.max(Duration::from_secs(300)))
            .await?;
    }
    let silent: Vec<u16> = steady_ports
        .iter()
        .chain([&victim_port])
        .copied()
        .filter(|p| !answers_hello(*p))
        .collect();
    if !silent.is_empty() {
        b.fail(format!(
            "Ready pods on ports {silent:?} do not answer hello world"
        ));
    }

    // ---- The clients, bounded by the stop flag and by a deadline past the run's end.
    let stop = Arc::new(AtomicBool::new(false));
    let client_deadline = Instant::now() + soak + Duration::from_secs(1800);
    let mut threads = vec![];
    for c in 0..load_conns {
        threads.push(load_thread(
            steady_ports.clone(),
            c * load_pods / load_conns,
            Duration::ZERO,
            healthy.clone(),
            stop.clone(),
            client_deadline,
        ));
    }
    threads.push(load_thread(
        vec![victim_port],
        0,
        Duration::from_millis(50),
        victim.clone(),
        stop.clone(),
        client_deadline,
    ));
    let loopback = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
    threads.push(slowloris_thread(
        loopback(victim_port),
        loopback(kubelet_port),
        slowloris_conns,
        slow.clone(),
        stop.clone(),
        client_deadline,
    ));
    tokio::time::sleep(Duration::from_secs(5)).await;
    let start = probe.sample().await?;
    let soak_t0 = Instant::now();
    row(
        "start",
        &start,
        &format!("{} long-lived pods Ready, clients running 5 s", names.len()),
    );

    // ---- Waves until the time is up.
    let mut wave_ports = Vec::with_capacity(wave_pods);
    for _ in 0..wave_pods {
        wave_ports.push(b.ports.free()?);
    }
    let logs_params = LogParams {
        container: Some("spam".into()),
        tail_lines: Some(1),
        ..LogParams::default()
    };
    let (mut waves, mut node_checks, mut node_ready_checks) = (0usize, 0u32, 0u32);
    let (mut logs_ok, mut logs_failed) = (0u32, 0u32);
    let mut first_wave: Option<Sample> = None;
    // Descriptors of the first waves: one sample can catch the slowloris client's connections
    // mid-eviction (a dip of a hundred or more), so the level is their median.
    let mut early_fds: Vec<u64> = Vec::new();
    while soak_t0.elapsed() < soak && waves < max_waves {
        waves += 1;
        wait_ports_free(&wave_ports, Duration::from_secs(60)).await?;
        let took = b
            .churn(&format!("wave{waves}"), &wave_ports, concurrency)
            .await?;
        tokio::time::sleep(wave_pause).await;
        node_checks += 1;
        if node_ready(&nodes).await.unwrap_or(false) {
            node_ready_checks += 1;
        }
        // `kubectl logs` of the spammer (API server -> kubelet API, which the slowloris client
        // is holding connections to).
        match b.pods.logs(SPAM_POD, &logs_params).await {
            Ok(l) if !l.trim().is_empty() => logs_ok += 1,
            _ => logs_failed += 1,
        }
        let sample = probe.sample().await?;
        row(
            &format!("wave {waves}"),
            &sample,
            &format!(
                "{wave_pods} pods created, Ready, deleted in {:.1} s",
                took.as_secs_f64()
            ),
        );
        if early_fds.len() < 3 {
            early_fds.push(sample.fds);
        }
        first_wave.get_or_insert(sample);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let end = probe.sample().await?;
    row(
        "end",
        &end,
        &format!("{waves} waves, {} pods run and deleted", waves * wave_pods),
    );
    let end_kinds = fd_kinds(pid, &data_dir);
    let (spam_files, spam_bytes, spam_at, spam_dropped) = {
        let logs = data_dir.join("logs");
        tokio::task::spawn_blocking(move || spam_logs(&logs)).await?
    };
    let restarts = spam_restarts(&b.pods).await;
    let lost_ready: u32 = {
        let st = b.rx.borrow();
        names
            .iter()
            .filter_map(|n| st.pods.get(n))
            .map(|p| p.lost_ready)
            .sum()
    };

    // ---- Drain: clients stopped, every pod deleted, log files idle-closed.
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = tokio::task::spawn_blocking(move || t.join()).await;
    }
    b.delete_groups(&["steady", "victim", "spam"]).await?;
    tokio::time::sleep(wave_pause.max(Duration::from_secs(7))).await;
    let drained = probe.sample().await?;
    row("drained", &drained, "clients stopped, every pod deleted");
    let drained_kinds = fd_kinds(pid, &data_dir);

    // ---- Figures and verdict.
    let held = end.at.saturating_sub(start.at).as_secs_f64().max(1e-9);
    let healthy_reqs = (end.ok - start.ok) + (end.failed - start.failed);
    println!(
        "  healthy pods: {} requests answered hello world, {} failed over the run ({:.0} req/s); \
         victim pod (under slowloris): {} answered, {} failed",
        end.ok,
        end.failed,
        healthy_reqs as f64 / held,
        end.victim_ok,
        end.victim_failed
    );
    if let Ok(errs) = healthy.errors.lock()
        && !errs.is_empty()
    {
        println!("  first failures: {}", errs.join("; "));
    }
    println!(
        "  slowloris: {} connections opened in all, {} closed by the agent (evicted at the cap of {max_conns} \
         or timed out) and opened again, {} connects refused or timed out",
        slow.opened.load(Ordering::Relaxed),
        slow.closed_by_agent.load(Ordering::Relaxed),
        slow.connect_errors.load(Ordering::Relaxed),
    );
    println!(
        "  spam guest: at line {spam_at} on disk ({:.0} lines/s), restarts {restarts}; its logs {spam_files} files, \
         {:.1} MiB (bound 2 x {log_max_files} x {log_max_mib} MiB); {spam_dropped} lines dropped noted in the files kept",
        spam_at as f64 / end.at.saturating_sub(joined.at).as_secs_f64().max(1e-9),
        spam_bytes as f64 / (1 << 20) as f64,
    );
    println!(
        "  Node Ready at {node_ready_checks}/{node_checks} checks (one per wave); `kubectl logs` of the spammer \
         answered {logs_ok}/{} times; long-lived pods seen leaving Ready: {lost_ready}",
        logs_ok + logs_failed
    );
    println!(
        "  agent descriptors by kind: joined: {joined_kinds}; end: {end_kinds}; drained: {drained_kinds}"
    );
    println!("  load average at the end: {}", loadavg());

    let mut reference = first_wave.unwrap_or(start);
    early_fds.sort_unstable();
    if let Some(m) = early_fds.get(early_fds.len() / 2) {
        reference.fds = *m;
    }
    // Slack: descriptors move with connections in flight (load threads, the slowloris client's
    // reopened connections, the watch and API calls); disk with how full each current log file is.
    let fd_slack = 32 + reference.fds / 20;
    let disk_slack = (log_max_mib as u64 + 1) << 20;
    let rss_change = end.rss_kib as f64 / reference.rss_kib.max(1) as f64 - 1.0;
    let met = |b: bool| if b { "MET" } else { "MISSED" };
    let fds_flat = end.fds <= reference.fds + fd_slack;
    let disk_flat = end.disk <= reference.disk + disk_slack;
    let rss_ok = rss_change <= 0.10;
    let no_failed = end.failed == 0;
    println!(
        "  verdict (end against after wave 1; descriptors: median of waves 1-3): descriptors {} -> {} (slack {fd_slack}): {}; disk {:.1} -> {:.1} MiB \
         (slack {} MiB): {}; VmRSS {:.1} -> {:.1} MiB ({:+.1}%, target within 10%): {}; failed requests to healthy \
         pods {} (target 0): {}",
        reference.fds,
        end.fds,
        met(fds_flat),
        reference.disk as f64 / (1 << 20) as f64,
        end.disk as f64 / (1 << 20) as f64,
        disk_slack >> 20,
        met(disk_flat),
        mib(reference.rss_kib),
        mib(end.rss_kib),
        rss_change * 100.0,
        met(rss_ok),
        end.failed,
        met(no_failed)
    );
    println!(
        "  drained against joined: descriptors {} -> {}, disk {:.1} -> {:.1} MiB, VmRSS {:.1} -> {:.1} MiB",
        joined.fds,
        drained.fds,
        joined.disk as f64 / (1 << 20) as f64,
        drained.disk as f64 / (1 << 20) as f64,
        mib(joined.rss_kib),
        mib(drained.rss_kib)
    );

    watch_task.abort();
    b.agent.signal("TERM")?;
    let _ = b.agent.wait_exit(Duration::from_secs(30));
    let Bench {
        cluster, failures, ..
    } = b;
    cluster.down()?;
    if !failures.is_empty() {
        bail!("functional failures: {}", failures.join("; "));
    }
    Ok(())
}
