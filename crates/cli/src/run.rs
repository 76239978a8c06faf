//! `wasinode run`: serve Pod manifests on this machine, no cluster.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use node::probe::{Prober, Runs};
use node::status::ContainerRun;
use workload::{ContainerState, EventType, Phase, PlanContext, PodKey, Report, Supervisor};

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Pod manifests (YAML; several documents per file allowed). Images may be local files
    /// (`file:///abs/path.wasm`, or a path relative to the manifest's folder; `.wat` text works
    /// too) or OCI references (`registry/repo:tag`, `registry/repo@sha256:...`).
    #[arg(required = true, value_name = "MANIFEST")]
    pub manifests: Vec<PathBuf>,
    #[command(flatten)]
    pub engine: crate::engine::EngineArgs,
    /// Do not echo module logs to this terminal (they are still written to the data dir).
    #[arg(long)]
    pub quiet: bool,
    /// The address HTTP components serve on: each container's `ports[].containerPort` (TCP), or
    /// 8080 when it declares none. WAGI pods keep their `default-host` annotation.
    #[arg(long, default_value = "127.0.0.1", value_name = "IP")]
    pub pod_address: std::net::IpAddr,
    /// Serve Prometheus metrics at http://ADDR/metrics (plain HTTP; not served without it).
    #[arg(long, value_name = "ADDR")]
    pub metrics_address: Option<std::net::SocketAddr>,
}

pub async fn run(args: RunArgs) -> anyhow::Result<i32> {
    let data_dir = args.engine.data_dir();
    let (sup, reports) = crate::engine::start(&data_dir, &args.engine, !args.quiet)?;
    let _metrics = match args.metrics_address {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on {addr} (--metrics-address): {e}"))?;
            let bound = listener.local_addr().unwrap_or(addr);
            eprintln!("wasinode: metrics on http://{bound}/metrics");
            let task = tokio::spawn(workload::metrics::serve(listener, sup.metrics().clone()));
            Some(AbortOnDrop(task))
        }
        None => None,
    };
    let seen = Terminal::default();
    let printer = tokio::spawn(print_reports(reports, seen.clone()));
    // Probes as on a node: liveness and startup failures restart the container, readiness is
    // printed (nothing routes by it here); they reach only the pod's own address and ports.
    let prober = Prober::new(Arc::new(seen.clone()), sup.clone(), args.pod_address);

    let mut pods = Vec::new();
    let mut load_errors = 0;
    for path in &args.manifests {
        match workload::manifest::load(path) {
            Ok((p, warnings)) => {
                for w in warnings {
                    eprintln!("wasinode: warning: {w}");
                }
                pods.extend(p);
            }
            Err(e) => {
                eprintln!("wasinode: error: {e}");
                load_errors += 1;
            }
        }
    }
    if pods.is_empty() {
        anyhow::bail!("no pod to run ({} manifest(s) unreadable)", load_errors);
    }
    let volume_dir = Supervisor::volume_dir(&data_dir);
    let contexts: Vec<PlanContext> = pods
        .iter()
        .map(|mp| PlanContext {
            volume_dir: volume_dir.clone(),
            node_ip: None,
            bind_ip: None,
            base_dir: Some(mp.base_dir.clone()),
            local_images: workload::LocalImages::Any,
            secret_dir: None,
            pod_address: Some(args.pod_address),
        })
        .collect();
    let starts = pods.iter().zip(&contexts).map(|(mp, ctx)| {
        let sup = sup.clone();
        async move { sup.start(&mp.pod, ctx, None).await }
    });
    let results = futures::future::join_all(starts).await;
    let mut started = 0;
    let mut serving = false;
    for ((r, mp), ctx) in results.iter().zip(&pods).zip(&contexts) {
        match r {
            Ok(s) => {
                started += 1;
                seen.track(&s.key);
                prober.add(&s.key, &mp.pod, s.listen, ctx);
                if let Some(addr) = s.listen {
                    serving = true;
                    eprintln!(
                        "wasinode: {} serving http://{addr} routes: {}",
                        s.key,
                        s.routes.join(" ")
                    );
                } else {
                    eprintln!(
                        "wasinode: {} running {} container(s)",
                        s.key,
                        s.digests.len()
                    );
                }
            }
            Err(e) => eprintln!("wasinode: error: {e}"),
        }
    }
    if started == 0 {
        prober.stop_all();
        sup.stop_all(args.engine.shutdown_grace).await;
        anyhow::bail!("no pod could start");
    }
    eprintln!(
        "wasinode: {started} of {} pod(s) started; Ctrl-C to stop",
        pods.len()
    );

    let finished_naturally = tokio::select! {
        _ = shutdown_signal() => false,
        _ = sup.finished(), if !serving => true,
    };
    if !finished_naturally {
        eprintln!(
            "wasinode: stopping (grace {:?})",
            args.engine.shutdown_grace
        );
    }
    prober.stop_all();
    sup.stop_all(args.engine.shutdown_grace).await;
    drop(prober);
    drop(sup);
    // Let the printer drain what the pods reported last.
    tokio::time::sleep(Duration::from_millis(50)).await;
    printer.abort();
    if finished_naturally {
        let failed = seen.failed();
        return Ok(if failed == 0 && load_errors == 0 {
            0
        } else {
            1
        });
    }
    Ok(0)
}

/// Stops a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// What the standalone status sink knows of the pods it was told about: their phases (for the
/// exit code), when each container's current run started and what the prober last said (for
/// the prober, as a node's status does). The printer is its only writer.
#[derive(Clone, Default)]
struct Terminal(Arc<Mutex<BTreeMap<PodKey, Seen>>>);

#[derive(Default)]
struct Seen {
    phase: Option<Phase>,
    /// Container -> the start of its current run (`None` while it does not run).
    running: BTreeMap<String, Option<SystemTime>>,
    /// Container -> the prober's last (started, ready, note), as printed.
    probed: BTreeMap<String, (bool, bool, Option<String>)>,
    /// (reason, message) -> how often that Warning came, for at most [`WARNINGS_KEPT`] of them.
    warned: BTreeMap<(String, String), u64>,
}

/// Distinct Warnings counted per pod; past it the counts start again (so a pod whose messages
/// all differ holds this many at most).
const WARNINGS_KEPT: usize = 64;

impl Terminal {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<PodKey, Seen>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps `key` from now on (a pod that started), so that its probes find it before its
    /// first report is printed.
    fn track(&self, key: &PodKey) {
        self.lock().entry(key.clone()).or_default();
    }

    fn failed(&self) -> usize {
        self.lock()
            .values()
            .filter(|s| s.phase == Some(Phase::Failed))
            .count()
    }
}

impl Runs for Terminal {
    fn run_of(&self, key: &PodKey, container: &str) -> Option<ContainerRun> {
        self.lock().get(key).map(|s| ContainerRun {
            running_since: s.running.get(container).copied().flatten(),
            pod_terminal: matches!(s.phase, Some(Phase::Succeeded | Phase::Failed)),
        })
    }
}

/// The standalone status sink: what a kubelet would write to the API, printed.
async fn print_reports(mut rx: workload::Reports, seen: Terminal) {
    while let Some(r) = rx.recv().await {
        match r {
            Report::Pod {
                pod,
                phase,
                reason,
                message,
            } => {
                seen.lock().entry(pod.clone()).or_default().phase = Some(phase);
                let extra = match (reason, message) {
                    (Some(r), Some(m)) => format!(" ({r}: {m})"),
                    (Some(r), None) => format!(" ({r})"),
                    _ => String::new(),
                };
                eprintln!("wasinode: {pod}: {phase:?}{extra}");
            }
            Report::Container {
                pod,
                container,
                state,
                restart_count,
                ..
            } => {
                let since = match &state {
                    ContainerState::Running { started_at } => Some(*started_at),
                    _ => None,
                };
                {
                    let mut all = seen.lock();
                    let s = all.entry(pod.clone()).or_default();
                    s.running.insert(container.clone(), since);
                    if since.is_none() {
                        // Not running is not ready: the next run's verdicts are printed anew.
                        s.probed.remove(&container);
                    }
                }
                print_container(&pod, &container, state, restart_count);
            }
            Report::Event {
                pod,
                kind: EventType::Warning,
                reason,
                message,
            } => {
                let seen_before = {
                    let mut all = seen.lock();
                    let warned = &mut all.entry(pod.clone()).or_default().warned;
                    if warned.len() >= WARNINGS_KEPT {
                        warned.clear();
                    }
                    let n = warned.entry((reason.clone(), message.clone())).or_default();
                    *n += 1;
                    *n
                };
                // As the kubelet's event recorder counts a repeated Event instead of writing it
                // again: the first is printed, then the 2nd, 4th, 8th... with their count (a
                // probe failing every second would otherwise fill the terminal).
                if seen_before == 1 {
                    eprintln!("wasinode: {pod}: warning: {reason}: {message}");
                } else if seen_before.is_power_of_two() {
                    eprintln!("wasinode: {pod}: warning: {reason}: {message} (x{seen_before})");
                }
            }
            Report::Event {
                pod,
                reason,
                message,
                ..
            } => tracing::info!(%pod, %reason, "{message}"),
            Report::Probe {
                pod,
                container,
                started,
                ready,
                note,
                ..
            } => {
                let view = (started, ready, note);
                let changed = {
                    let mut all = seen.lock();
                    let probed = &mut all.entry(pod.clone()).or_default().probed;
                    let changed = probed.get(&container) != Some(&view);
                    probed.insert(container.clone(), view.clone());
                    changed
                };
                if changed {
                    eprintln!("wasinode: {pod}/{container}: {}", probe_line(&view));
                }
            }
        }
    }
}

/// A container's state as the terminal shows it.
fn print_container(pod: &PodKey, container: &str, state: ContainerState, restart_count: u32) {
    match state {
        ContainerState::Terminated {
            exit_code,
            reason,
            message,
            ..
        } => {
            let m = if message.is_empty() {
                String::new()
            } else {
                format!(": {message}")
            };
            eprintln!(
                "wasinode: {pod}/{container}: terminated, exit code {exit_code} ({reason}{m}), restarts {restart_count}"
            );
        }
        ContainerState::Waiting { reason, message } if reason != "ContainerCreating" => {
            eprintln!("wasinode: {pod}/{container}: waiting ({reason}: {message})");
        }
        _ => tracing::debug!(%pod, %container, ?state, "container state"),
    }
}

/// What the prober concluded of a container, as a line: the kubelet's `started` and `ready`.
fn probe_line((started, ready, note): &(bool, bool, Option<String>)) -> String {
    let mut line = match (started, ready) {
        (_, true) => "ready".to_string(),
        (false, false) => "not ready (startup probe not passed)".to_string(),
        (true, false) => "not ready (readiness probe not passed)".to_string(),
    };
    if let Some(n) = note {
        line.push_str(&format!("; {n}"));
    }
    line
}

#[cfg(test)]
mod tests {
    use crate::engine::{parse_duration, parse_size};
    use std::time::Duration;

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("128MiB"), Ok(128 << 20));
        assert_eq!(parse_size("64M"), Ok(64_000_000));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("12 parsecs").is_err());
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert!(parse_duration("soon").is_err());
    }
}
