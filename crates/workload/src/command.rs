//! A container of a pod without WAGI annotations: its module runs as a WASI command, stdout and
//! stderr go to its log, and `restartPolicy` decides whether it runs again (with the kubelet's
//! doubling back-off).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use runtime::{AllowList, Invocation, Preopen, Program, RunError, Runtime, Stream};
use tokio_util::sync::CancellationToken;

use crate::logs::{ContainerLog, LogStore};
use crate::plan::{PodKey, RestartPolicy};
use crate::report::{ContainerState, EventType, Reporter};

pub struct CommandSpec {
    pub pod: PodKey,
    pub container: String,
    pub program: Arc<Program>,
    /// argv[1..]; argv[0] is the container name.
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub mounts: Vec<Preopen>,
    /// Where the container may connect (`wasi:http`, `wasi:sockets`): the pod's
    /// `wasinode.dev/allowed-outbound-hosts`, as for its HTTP containers.
    pub allowed_hosts: Arc<AllowList>,
    pub log: ContainerLog,
    /// The container's `limits.memory` and `limits.cpu`.
    pub limits: runtime::Limits,
    /// The container's usage.
    pub meter: Option<Arc<crate::usage::ContainerUsage>>,
    /// The container's trap, timeout and memory-limit counters.
    pub metrics: Option<crate::metrics::ContainerMetrics>,
}

/// Back-off between restarts: `initial`, doubling up to `max`; reset after a run of 10 minutes.
#[derive(Clone, Copy, Debug)]
pub struct RestartBackoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Default for RestartBackoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_secs(10),
            max: Duration::from_secs(300),
        }
    }
}

/// Runs the container until it is done under its restart policy, or until `stop`.
/// Returns the last exit code (`None` when stopped).
#[allow(clippy::too_many_arguments)]
pub async fn run_container(
    rt: Runtime,
    spec: CommandSpec,
    restart: RestartPolicy,
    backoff: RestartBackoff,
    reports: Reporter,
    logs: LogStore,
    stop: CancellationToken,
    mut kill: tokio::sync::mpsc::Receiver<crate::supervisor::Restart>,
) -> Option<i32> {
    let image_id = Some(spec.program.digest().to_string());
    let mut argv = vec![spec.container.clone()];
    argv.extend(spec.args.iter().cloned());
    let mut restarts = 0u32;
    let mut delay = backoff.initial;
    loop {
        let started = SystemTime::now();
        let began = Instant::now();
        if let Some(u) = &spec.meter {
            u.set_started(started);
        }
        reports.container(
            &spec.pod,
            &spec.container,
            ContainerState::Running {
                started_at: started,
            },
            true,
            restarts,
            image_id.clone(),
        );
        if restarts == 0 {
            reports.event(
                &spec.pod,
                EventType::Normal,
                "Started",
                format!("Started container {}", spec.container),
            );
        }
        let inv = Invocation {
            entrypoint: "_start".into(),
            args: argv.clone(),
            env: runtime::Environ::new(&spec.env),
            stdin: Default::default(),
            stdout: Stream::Lines(Arc::new(spec.log.stdout())),
            stderr: Stream::Lines(Arc::new(spec.log.clone())),
            preopens: spec.mounts.clone(),
            allowed_hosts: spec.allowed_hosts.clone(),
            timeout: None,
            limits: spec.limits.clone(),
            meter: spec.meter.as_ref().map(|u| u.meter.clone()),
        };
        let run = rt.run(&spec.program, inv);
        tokio::pin!(run);
        // A failed liveness or startup probe kills this run (a request about an earlier run is
        // stale); it then ends as a killed container does, exit code 137.
        let mut kill_open = true;
        let ended = loop {
            tokio::select! {
                r = &mut run => break Ok(r),
                _ = stop.cancelled() => {
                    reports.container(&spec.pod, &spec.container, ContainerState::Terminated {
                        exit_code: 137, reason: "Killed".into(), message: "stopped by wasinode".into(),
                        started_at: started, finished_at: SystemTime::now(),
                    }, false, restarts, image_id.clone());
                    return None;
                }
                k = kill.recv(), if kill_open => match k {
                    Some(k) if k.since >= started => break Err(k),
                    Some(_) => {}
                    None => kill_open = false,
                },
            }
        };
        let (code, message) = match ended {
            Err(k) => {
                reports.event(&spec.pod, EventType::Normal, "Killing", k.message.clone());
                (137, k.message)
            }
            Ok(result) => {
                if let (Err(e), Some(m)) = (&result, &spec.metrics) {
                    m.failed(e);
                }
                match result {
                    Ok(o) => (o.exit_code, String::new()),
                    Err(RunError::Trap { message, .. }) => (1, format!("trap: {message}")),
                    Err(e) => (1, e.to_string()),
                }
            }
        };
        if !message.is_empty() {
            spec.log.note(&format!("wasinode: {message}"));
        }
        let reason = if code == 0 { "Completed" } else { "Error" };
        let finished = ContainerState::Terminated {
            exit_code: code,
            reason: reason.into(),
            message: message.clone(),
            started_at: started,
            finished_at: SystemTime::now(),
        };
        reports.container(
            &spec.pod,
            &spec.container,
            finished,
            false,
            restarts,
            image_id.clone(),
        );
        let again = match restart {
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure => code != 0,
            RestartPolicy::Never => false,
        };
        if !again {
            return Some(code);
        }
        if began.elapsed() > Duration::from_secs(600) {
            delay = backoff.initial;
        }
        let msg = format!(
            "Back-off {}s restarting container {} (exit code {code})",
            delay.as_secs_f32(),
            spec.container
        );
        reports.event(&spec.pod, EventType::Warning, "BackOff", msg.clone());
        reports.container(
            &spec.pod,
            &spec.container,
            ContainerState::Waiting {
                reason: "CrashLoopBackOff".into(),
                message: msg,
            },
            false,
            restarts,
            image_id.clone(),
        );
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.cancelled() => return None,
        }
        delay = (delay * 2).min(backoff.max);
        logs.rotate(&spec.pod, &spec.container).await;
        restarts += 1;
    }
}
