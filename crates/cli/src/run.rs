//! `wasinode run`: serve Pod manifests on this machine, no cluster.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

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
    let phases: Arc<Mutex<BTreeMap<PodKey, Phase>>> = Arc::default();
    let printer = tokio::spawn(print_reports(reports, phases.clone()));

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
    let starts = pods.iter().map(|mp| {
        let ctx = PlanContext {
            volume_dir: volume_dir.clone(),
            node_ip: None,
            bind_ip: None,
            base_dir: Some(mp.base_dir.clone()),
            local_images: workload::LocalImages::Any,
            secret_dir: None,
            pod_address: Some(args.pod_address),
        };
        let sup = sup.clone();
        async move { sup.start(&mp.pod, &ctx, None).await }
    });
    let results = futures::future::join_all(starts).await;
    let mut started = 0;
    let mut serving = false;
    for r in &results {
        match r {
            Ok(s) => {
                started += 1;
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
    sup.stop_all(args.engine.shutdown_grace).await;
    drop(sup);
    // Let the printer drain what the pods reported last.
    tokio::time::sleep(Duration::from_millis(50)).await;
    printer.abort();
    if finished_naturally {
        let phases = phases.lock().unwrap_or_else(|p| p.into_inner());
        let failed = phases.values().filter(|p| **p == Phase::Failed).count();
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

/// The standalone status sink: what a kubelet would write to the API, printed.
async fn print_reports(mut rx: workload::Reports, phases: Arc<Mutex<BTreeMap<PodKey, Phase>>>) {
    while let Some(r) = rx.recv().await {
        match r {
            Report::Pod {
                pod,
                phase,
                reason,
                message,
            } => {
                phases
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(pod.clone(), phase);
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
            } => match state {
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
            },
            Report::Event {
                pod,
                kind: EventType::Warning,
                reason,
                message,
            } => {
                eprintln!("wasinode: {pod}: warning: {reason}: {message}");
            }
            Report::Event {
                pod,
                reason,
                message,
                ..
            } => tracing::info!(%pod, %reason, "{message}"),
            // Probes run in node mode only.
            Report::Probe { .. } => {}
        }
    }
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
