//! The prober: `startupProbe`, `readinessProbe` and `livenessProbe` of the pods this node runs,
//! with the kubelet's semantics (pkg/kubelet/prober):
//! - each probe runs every `periodSeconds` (first at once), not before `initialDelaySeconds`
//!   since the container's run started, each attempt bounded by `timeoutSeconds`;
//! - a result counts once the same result came `successThreshold` / `failureThreshold` times in
//!   a row; readiness starts as failure (a container with a readiness probe starts unready),
//!   liveness as success, startup as unknown;
//! - the startup probe gates the others: they do not run until it passes, and it stops then
//!   (the readiness probe runs at once when it passes);
//! - a liveness or startup failure restarts the container through the Supervisor (`Killing`
//!   Event "Container X failed liveness probe, will be restarted", restart back-off), and that
//!   probe holds until the container's next run;
//! - every failed attempt is a Warning `Unhealthy` Event ("Readiness probe failed: ..."), a
//!   redirect to another host a Warning `ProbeWarning` (and a success);
//! - `httpGet` (host defaulting to the pod's address, HTTP or HTTPS without certificate checks,
//!   httpHeaders, port by number or containerPort name, 200..399 passes, redirects followed only
//!   on the same host, at most 10), `tcpSocket` (a connection opens), `grpc`
//!   (`grpc.health.v1.Health/Check` over h2c, SERVING passes);
//! - `exec` cannot run on a WebAssembly node (there is no process to run a command in): such a
//!   probe always fails, as an exec probe whose command cannot run does on a kubelet, and the pod
//!   says why in a Warning Event and in its Ready condition's message.
//!
//! Results reach the pod's status only through the Supervisor's report channel
//! ([`Report::Probe`]), which the status sink applies: the node's API status in `wasinode node`,
//! the terminal in `wasinode run`. What the prober reads of a container's runs comes from that
//! same sink ([`Runs`]). One task per container that has probes; probes in flight on the node
//! are bounded ([`MAX_IN_FLIGHT`]), each holds one connection.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::{Buf, Bytes};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use k8s_openapi::api::core::v1::{Container, Pod, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use workload::supervisor::Restart;
use workload::{EventType, PodKey, Report, Supervisor};

use crate::status::{ContainerRun, Statuses};

/// Probes running at once on this node at most; a probe waits for its turn.
pub const MAX_IN_FLIGHT: usize = 64;
/// The part of an HTTP probe's response body that is read (the kubelet's limit).
const MAX_BODY: usize = 10 * 1024;
/// Redirects an HTTP probe follows at most (Go's client).
const MAX_REDIRECTS: usize = 10;
/// The gRPC health response read at most.
const MAX_GRPC_BODY: usize = 64 * 1024;
/// How often a worker looks again at a container that does not run (yet).
const IDLE_RECHECK: Duration = Duration::from_secs(1);
/// As the kubelet's probes say who they are.
const USER_AGENT: &str = "kube-probe/1.33";

/// Why an exec probe fails here.
pub const EXEC_UNSUPPORTED: &str = "exec probes cannot run on a WebAssembly node (there is no process to run a command in): the probe always fails";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Startup,
    Readiness,
    Liveness,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Startup => "Startup",
            Kind::Readiness => "Readiness",
            Kind::Liveness => "Liveness",
        }
    }
    fn field(self) -> &'static str {
        match self {
            Kind::Startup => "startupProbe",
            Kind::Readiness => "readinessProbe",
            Kind::Liveness => "livenessProbe",
        }
    }
    /// The value a probe holds before it concludes (the kubelet's `initialValue`).
    fn initial(self) -> Verdict {
        match self {
            Kind::Startup => Verdict::Unknown,
            Kind::Readiness => Verdict::Failure,
            Kind::Liveness => Verdict::Success,
        }
    }
}

/// The result of one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Failure,
}

/// What a probe holds (the kubelet's results manager).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Unknown,
    Success,
    Failure,
}

/// The threshold state machine of one probe: a result counts once it came `success` (or
/// `failure`) times in a row.
#[derive(Debug, Clone)]
pub struct Threshold {
    kind: Kind,
    success: u32,
    failure: u32,
    verdict: Verdict,
    last: Option<Outcome>,
    run: u32,
}

impl Threshold {
    pub fn new(kind: Kind, success: u32, failure: u32) -> Threshold {
        Threshold {
            kind,
            success: success.max(1),
            failure: failure.max(1),
            verdict: kind.initial(),
            last: None,
            run: 0,
        }
    }

    pub fn verdict(&self) -> Verdict {
        self.verdict
    }

    /// A new run of the container: the probe holds its initial value again (the streak of
    /// results carries over, as the kubelet's worker keeps it).
    pub fn new_run(&mut self) {
        self.verdict = self.kind.initial();
    }

    /// Records one attempt; returns the verdict when this attempt set it (threshold reached).
    pub fn observe(&mut self, o: Outcome) -> Option<Verdict> {
        if self.last == Some(o) {
            self.run = self.run.saturating_add(1);
        } else {
            self.last = Some(o);
            self.run = 1;
        }
        let needed = match o {
            Outcome::Success => self.success,
            Outcome::Failure => self.failure,
        };
        if self.run < needed {
            return None;
        }
        self.verdict = match o {
            Outcome::Success => Verdict::Success,
            Outcome::Failure => Verdict::Failure,
        };
        if self.verdict == Verdict::Failure && matches!(self.kind, Kind::Liveness | Kind::Startup) {
            // The container is restarted: its next run needs a full streak again.
            self.run = 0;
        }
        Some(self.verdict)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Action {
    Http {
        https: bool,
        host: Option<String>,
        port: Result<u16, String>,
        path: String,
        headers: Vec<(String, String)>,
    },
    Tcp {
        host: Option<String>,
        port: Result<u16, String>,
    },
    Grpc {
        port: Result<u16, String>,
        service: String,
    },
    Exec,
    Missing,
}

/// One probe of a container, with the kubelet's defaults filled in.
#[derive(Debug, Clone)]
struct Spec {
    kind: Kind,
    action: Action,
    initial_delay: Duration,
    period: Duration,
    timeout: Duration,
    success_threshold: u32,
    failure_threshold: u32,
    termination_grace: Option<Duration>,
}

fn secs(v: Option<i32>, default: i32, min: i32) -> Duration {
    Duration::from_secs(v.unwrap_or(default).max(min) as u64)
}

/// The port a probe names: a number, or the name of one of the container's ports (or a number
/// written as a string), as the kubelet's `extractPort`.
fn port_of(p: &IntOrString, c: &Container) -> Result<u16, String> {
    let n = match p {
        IntOrString::Int(n) => *n,
        IntOrString::String(name) => c
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .map(|p| p.container_port)
            .or_else(|| name.parse().ok())
            .ok_or_else(|| format!("port {name:?} not found"))?,
    };
    u16::try_from(n)
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("invalid port number: {n}"))
}

impl Spec {
    fn of(kind: Kind, p: &Probe, c: &Container) -> Spec {
        let action = if let Some(h) = &p.http_get {
            Action::Http {
                https: h
                    .scheme
                    .as_deref()
                    .is_some_and(|s| s.eq_ignore_ascii_case("https")),
                host: h.host.clone().filter(|h| !h.is_empty()),
                port: port_of(&h.port, c),
                path: h.path.clone().unwrap_or_default(),
                headers: h
                    .http_headers
                    .iter()
                    .flatten()
                    .map(|h| (h.name.clone(), h.value.clone()))
                    .collect(),
            }
        } else if let Some(t) = &p.tcp_socket {
            Action::Tcp {
                host: t.host.clone().filter(|h| !h.is_empty()),
                port: port_of(&t.port, c),
            }
        } else if let Some(g) = &p.grpc {
            Action::Grpc {
                port: port_of(&IntOrString::Int(g.port), c),
                service: g.service.clone().unwrap_or_default(),
            }
        } else if p.exec.is_some() {
            Action::Exec
        } else {
            Action::Missing
        };
        Spec {
            kind,
            action,
            initial_delay: secs(p.initial_delay_seconds, 0, 0),
            period: secs(p.period_seconds, 10, 1),
            timeout: secs(p.timeout_seconds, 1, 1),
            success_threshold: p.success_threshold.unwrap_or(1).max(1) as u32,
            failure_threshold: p.failure_threshold.unwrap_or(3).max(1) as u32,
            termination_grace: p
                .termination_grace_period_seconds
                .map(|s| Duration::from_secs(s.clamp(1, 3600) as u64)),
        }
    }
}

/// The probes of one container.
fn specs(c: &Container) -> Vec<Spec> {
    [
        (Kind::Startup, &c.startup_probe),
        (Kind::Liveness, &c.liveness_probe),
        (Kind::Readiness, &c.readiness_probe),
    ]
    .into_iter()
    .filter_map(|(k, p)| p.as_ref().map(|p| Spec::of(k, p, c)))
    .collect()
}

/// What one attempt found: the outcome and what the kubelet would print of it, or a prober
/// error (the attempt is thrown away).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Attempt {
    Success,
    /// Passed, with something worth a `ProbeWarning` (a redirect not followed).
    Warning(String),
    Failure(String),
    Error(String),
}

/// Where the prober reads when a container's current run started: the status sink that applies
/// the Supervisor's reports (the node's [`Statuses`], or `wasinode run`'s terminal printer).
pub trait Runs: Send + Sync + 'static {
    /// The run of container `container` of pod `key`; `None` once the pod is forgotten (its
    /// probes then stop).
    fn run_of(&self, key: &PodKey, container: &str) -> Option<ContainerRun>;
}

impl Runs for Statuses {
    fn run_of(&self, key: &PodKey, container: &str) -> Option<ContainerRun> {
        Statuses::run_of(self, key, container)
    }
}

/// What the workers share.
struct Shared {
    runs: Arc<dyn Runs>,
    sup: Supervisor,
    node_ip: IpAddr,
    permits: Semaphore,
    tls: Arc<rustls::ClientConfig>,
}

/// The probe workers of the pods this node runs.
#[derive(Clone)]
pub struct Prober {
    shared: Arc<Shared>,
    workers: Arc<Mutex<BTreeMap<PodKey, Vec<JoinHandle<()>>>>>,
}

impl Prober {
    /// Probes pods on `node_ip` unless their listener names another address; `runs` says when
    /// each container's current run started.
    pub fn new(runs: Arc<dyn Runs>, sup: Supervisor, node_ip: IpAddr) -> Prober {
        Prober {
            shared: Arc::new(Shared {
                runs,
                sup,
                node_ip,
                permits: Semaphore::new(MAX_IN_FLIGHT),
                tls: Arc::new(insecure_tls()),
            }),
            workers: Arc::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<PodKey, Vec<JoinHandle<()>>>> {
        self.workers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts probing the containers of a pod that started, whose listener is `listen` (the
    /// probes' default host is its address, else the node's); `ctx` is what the pod was planned
    /// with, which says the ports it serves. No-op for a pod already probed or without probes.
    pub fn add(
        &self,
        key: &PodKey,
        pod: &Pod,
        listen: Option<SocketAddr>,
        ctx: &workload::PlanContext,
    ) {
        let Some(spec) = &pod.spec else { return };
        // Most pods have no probes: nothing below (a plan of the pod's ports) is done for them.
        if spec.containers.iter().all(|c| {
            c.startup_probe.is_none() && c.readiness_probe.is_none() && c.liveness_probe.is_none()
        }) {
            return;
        }
        let target = listen
            .map(|a| a.ip())
            .filter(|ip| !ip.is_unspecified())
            .unwrap_or(self.shared.node_ip);
        let pod_grace = Duration::from_secs(
            spec.termination_grace_period_seconds
                .unwrap_or(30)
                .clamp(0, 3600) as u64,
        );
        let ports: Arc<[u16]> = crate::portforward::served(pod, ctx)
            .iter()
            .map(|a| a.port())
            .collect();
        let mut workers = self.lock();
        if workers.contains_key(key) {
            return;
        }
        let mut tasks = Vec::new();
        for c in &spec.containers {
            let probes = specs(c);
            if probes.is_empty() {
                continue;
            }
            for p in probes.iter().filter(|p| p.action == Action::Exec) {
                self.shared.sup.reporter().event(
                    key,
                    EventType::Warning,
                    "ProbeNotSupported",
                    format!(
                        "container {}: {}.exec: {EXEC_UNSUPPORTED}",
                        c.name,
                        p.kind.field()
                    ),
                );
            }
            let worker = Worker {
                shared: self.shared.clone(),
                key: key.clone(),
                container: c.name.clone(),
                target,
                ports: ports.clone(),
                pod_grace,
                probes: probes
                    .into_iter()
                    .map(|spec| ProbeState {
                        threshold: Threshold::new(
                            spec.kind,
                            spec.success_threshold,
                            spec.failure_threshold,
                        ),
                        spec,
                        next: Instant::now(),
                        on_hold: false,
                    })
                    .collect(),
            };
            tasks.push(tokio::spawn(worker.run()));
        }
        if !tasks.is_empty() {
            workers.insert(key.clone(), tasks);
        }
    }

    /// Stops probing a pod (it is being deleted or is gone): nothing of its probes keeps
    /// running.
    pub fn remove(&self, key: &PodKey) {
        if let Some(tasks) = self.lock().remove(key) {
            for t in tasks {
                t.abort();
            }
        }
    }

    /// Pods being probed now.
    pub fn probed(&self) -> usize {
        let mut w = self.lock();
        w.retain(|_, tasks| tasks.iter().any(|t| !t.is_finished()));
        w.len()
    }

    /// Stops every worker (the agent is stopping).
    pub fn stop_all(&self) {
        for (_, tasks) in std::mem::take(&mut *self.lock()) {
            for t in tasks {
                t.abort();
            }
        }
    }
}

struct ProbeState {
    spec: Spec,
    threshold: Threshold,
    next: Instant,
    /// After a liveness or startup failure: no probing until the container's next run.
    on_hold: bool,
}

/// Probes one container for as long as its pod is kept and not finished.
struct Worker {
    shared: Arc<Shared>,
    key: PodKey,
    container: String,
    target: IpAddr,
    /// The ports the pod serves: the only ones its probes may reach.
    ports: Arc<[u16]>,
    pod_grace: Duration,
    probes: Vec<ProbeState>,
}

/// What the worker last told the status sink.
type Published = (SystemTime, bool, bool, Option<String>);

impl Worker {
    fn started(&self) -> bool {
        self.probes
            .iter()
            .filter(|p| p.spec.kind == Kind::Startup)
            .all(|p| p.threshold.verdict() == Verdict::Success)
    }

    fn ready(&self) -> bool {
        self.started()
            && self
                .probes
                .iter()
                .filter(|p| p.spec.kind == Kind::Readiness)
                .all(|p| p.threshold.verdict() == Verdict::Success)
    }

    /// Why the container is not ready, when this node is the reason.
    fn note(&self) -> Option<String> {
        let exec: Vec<&str> = self
            .probes
            .iter()
            .filter(|p| p.spec.action == Action::Exec)
            .map(|p| p.spec.kind.field())
            .collect();
        (!exec.is_empty()).then(|| format!("{}: {EXEC_UNSUPPORTED}", exec.join(", ")))
    }

    async fn run(mut self) {
        let mut since: Option<SystemTime> = None;
        let mut published: Option<Published> = None;
        loop {
            let next = self.probes.iter().map(|p| p.next).min();
            if let Some(next) = next {
                tokio::time::sleep_until(next.into()).await;
            }
            let Some(run) = self.shared.runs.run_of(&self.key, &self.container) else {
                return; // the pod is forgotten
            };
            if run.pod_terminal {
                return;
            }
            let now = Instant::now();
            let Some(started_at) = run.running_since else {
                // Not running (yet, or in its restart back-off): look again soon.
                for p in &mut self.probes {
                    if p.next <= now {
                        p.next = now + p.spec.period.min(IDLE_RECHECK);
                    }
                }
                continue;
            };
            if since != Some(started_at) {
                since = Some(started_at);
                for p in &mut self.probes {
                    p.threshold.new_run();
                    p.on_hold = false;
                }
            }
            let ran_for = SystemTime::now()
                .duration_since(started_at)
                .unwrap_or_default();
            for i in 0..self.probes.len() {
                if self.probes[i].next > now {
                    continue;
                }
                let period = self.probes[i].spec.period;
                self.probes[i].next = now + period;
                let kind = self.probes[i].spec.kind;
                if self.probes[i].on_hold || ran_for < self.probes[i].spec.initial_delay {
                    continue;
                }
                let started = self.started();
                if (kind == Kind::Startup) == started {
                    continue; // startup runs until it passes; the others only after
                }
                let attempt = self.attempt(i).await;
                let outcome = match &attempt {
                    Attempt::Success => Outcome::Success,
                    Attempt::Warning(m) => {
                        self.event(
                            "ProbeWarning",
                            format!("{} probe warning: {m}", kind.name()),
                        );
                        Outcome::Success
                    }
                    Attempt::Failure(m) => {
                        self.event("Unhealthy", format!("{} probe failed: {m}", kind.name()));
                        Outcome::Failure
                    }
                    Attempt::Error(m) => {
                        self.event("Unhealthy", format!("{} probe errored: {m}", kind.name()));
                        continue; // thrown away, as the kubelet does
                    }
                };
                let Some(verdict) = self.probes[i].threshold.observe(outcome) else {
                    continue;
                };
                match (kind, verdict) {
                    (Kind::Startup, Verdict::Success) => {
                        // The readiness probe runs at once (the kubelet triggers it).
                        for p in &mut self.probes {
                            if p.spec.kind == Kind::Readiness {
                                p.next = now;
                            }
                        }
                    }
                    (Kind::Liveness | Kind::Startup, Verdict::Failure) => {
                        self.probes[i].on_hold = true;
                        self.restart(kind, started_at, i);
                    }
                    _ => {}
                }
            }
            let view = (started_at, self.started(), self.ready(), self.note());
            if published.as_ref() != Some(&view) {
                self.shared.sup.reporter().send(Report::Probe {
                    pod: self.key.clone(),
                    container: self.container.clone(),
                    since: view.0,
                    started: view.1,
                    ready: view.2,
                    note: view.3.clone(),
                });
                published = Some(view);
            }
        }
    }

    fn event(&self, reason: &str, message: String) {
        self.shared
            .sup
            .reporter()
            .event(&self.key, EventType::Warning, reason, message);
    }

    /// The container failed its liveness or startup probe: the Supervisor restarts it.
    fn restart(&self, kind: Kind, since: SystemTime, i: usize) {
        let probe = match kind {
            Kind::Startup => "startup",
            _ => "liveness",
        };
        let message = format!(
            "Container {} failed {probe} probe, will be restarted",
            self.container
        );
        let grace = self.probes[i]
            .spec
            .termination_grace
            .unwrap_or(self.pod_grace);
        let asked = self.shared.sup.restart_container(
            &self.key,
            Restart {
                container: self.container.clone(),
                since,
                message: message.clone(),
                grace,
            },
        );
        if !asked {
            tracing::warn!(pod = %self.key, container = %self.container, "{message}, but this container cannot be restarted here (it serves nothing the node can restart)");
        }
    }

    /// The host a probe connects to: the pod's own address, and only on a port the pod serves.
    /// The agent runs as root on the node and pods share its network stack, so a probe of
    /// another host, or of a port the pod does not serve (on the node's address, a host
    /// service's), would let a pod author reach what the pod itself cannot; such a probe fails,
    /// saying why.
    fn own(&self, host: Option<&str>, port: u16) -> Result<String, String> {
        if let Some(h) = host {
            let bare = h.trim_start_matches('[').trim_end_matches(']');
            let mine = match bare.parse::<IpAddr>() {
                Ok(ip) => ip == self.target,
                Err(_) => bare.eq_ignore_ascii_case("localhost") && self.target.is_loopback(),
            };
            if !mine {
                return Err(format!(
                    "probe host {h:?} is not the pod's address {}: on a WebAssembly node a probe reaches only its own pod",
                    self.target
                ));
            }
        }
        if !self.ports.contains(&port) {
            return Err(format!(
                "port {port} is not served by this pod (it serves {:?}): on a WebAssembly node a probe reaches only its own pod",
                self.ports
            ));
        }
        Ok(self.target.to_string())
    }

    /// One attempt of probe `i`, within its timeout, holding one of the node's probe slots.
    async fn attempt(&self, i: usize) -> Attempt {
        let spec = &self.probes[i].spec;
        let Ok(_permit) = self.shared.permits.acquire().await else {
            return Attempt::Error("the prober is stopping".into());
        };
        let target = self.target;
        match &spec.action {
            Action::Exec => Attempt::Failure(EXEC_UNSUPPORTED.into()),
            Action::Missing => Attempt::Error(format!(
                "missing probe handler for {}:{}",
                self.key, self.container
            )),
            Action::Tcp { host, port } => match port {
                Err(e) => Attempt::Error(e.clone()),
                Ok(port) => match self.own(host.as_deref(), *port) {
                    Err(why) => Attempt::Failure(why),
                    Ok(host) => tcp_probe(&host, *port, spec.timeout).await,
                },
            },
            Action::Http {
                https,
                host,
                port,
                path,
                headers,
            } => match port {
                Err(e) => Attempt::Error(e.clone()),
                Ok(port) => {
                    let host = match self.own(host.as_deref(), *port) {
                        Err(why) => return Attempt::Failure(why),
                        Ok(host) => host,
                    };
                    let url = HttpTarget {
                        https: *https,
                        host,
                        port: *port,
                        path: path.clone(),
                    };
                    http_probe(&url, headers, spec.timeout, &self.shared.tls).await
                }
            },
            Action::Grpc { port, service } => match port {
                Err(e) => Attempt::Error(e.clone()),
                Ok(port) => match self.own(None, *port) {
                    Err(why) => Attempt::Failure(why),
                    Ok(_) => {
                        grpc_probe(SocketAddr::new(target, *port), service, spec.timeout).await
                    }
                },
            },
        }
    }
}

// ---- tcpSocket --------------------------------------------------------------------------------

async fn dial(host: &str, port: u16) -> std::io::Result<TcpStream> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    match bare.parse::<IpAddr>() {
        Ok(ip) => TcpStream::connect(SocketAddr::new(ip, port)).await,
        Err(_) => TcpStream::connect((bare, port)).await,
    }
}

fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

async fn tcp_probe(host: &str, port: u16, timeout: Duration) -> Attempt {
    let addr = join_host_port(host, port);
    match tokio::time::timeout(timeout, dial(host, port)).await {
        Ok(Ok(_stream)) => Attempt::Success,
        Ok(Err(e)) => Attempt::Failure(format!("dial tcp {addr}: connect: {e}")),
        Err(_) => Attempt::Failure(format!("dial tcp {addr}: i/o timeout")),
    }
}

// ---- httpGet ----------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq)]
struct HttpTarget {
    https: bool,
    host: String,
    port: u16,
    /// Path and query as the probe names them.
    path: String,
}

impl HttpTarget {
    fn authority(&self) -> String {
        join_host_port(&self.host, self.port)
    }

    fn path_and_query(&self) -> String {
        if self.path.starts_with('/') {
            self.path.clone()
        } else {
            format!("/{}", self.path)
        }
    }

    fn url(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://{}{}", self.authority(), self.path_and_query())
    }

    /// Where `location` (a redirect's Location) leads from here; `None` if it is not a URL.
    fn follow(&self, location: &str) -> Option<HttpTarget> {
        let uri: Uri = location.parse().ok()?;
        match (uri.scheme_str(), uri.authority()) {
            (Some(scheme), Some(auth)) => {
                let https = scheme.eq_ignore_ascii_case("https");
                if !https && !scheme.eq_ignore_ascii_case("http") {
                    return None;
                }
                let port = auth.port_u16().unwrap_or(if https { 443 } else { 80 });
                Some(HttpTarget {
                    https,
                    host: auth
                        .host()
                        .trim_start_matches('[')
                        .trim_end_matches(']')
                        .to_string(),
                    port,
                    path: uri
                        .path_and_query()
                        .map_or("/".into(), |p| p.as_str().to_string()),
                })
            }
            _ => {
                let path = if location.starts_with('/') {
                    location.to_string()
                } else {
                    // Relative to the current path's folder.
                    let base = self.path_and_query();
                    let base = base.split('?').next().unwrap_or("/");
                    let dir = &base[..base.rfind('/').map_or(0, |i| i + 1)];
                    format!("{dir}{location}")
                };
                Some(HttpTarget {
                    path,
                    ..self.clone()
                })
            }
        }
    }
}

/// Whether a redirect is followed: only to the same host name (any port), as the kubelet's
/// probes (`followNonLocalRedirects=false`).
fn same_host(a: &HttpTarget, b: &HttpTarget) -> bool {
    a.host.eq_ignore_ascii_case(&b.host)
}

/// The request headers of an HTTP probe, as the kubelet builds them: the probe's own, then
/// `User-Agent` and `Accept: */*` unless it set them (an empty `Accept` removes it); a `Host`
/// header names the virtual host.
fn probe_headers(headers: &[(String, String)], authority: &str) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (k, v) in headers {
        if let (Ok(k), Ok(v)) = (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(v),
        ) {
            map.append(k, v);
        }
    }
    if !map.contains_key(header::USER_AGENT) {
        map.insert(header::USER_AGENT, HeaderValue::from_static(USER_AGENT));
    }
    match map.get(header::ACCEPT) {
        None => {
            map.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        }
        Some(v) if v.is_empty() => {
            map.remove(header::ACCEPT);
        }
        Some(_) => {}
    }
    if !map.contains_key(header::HOST)
        && let Ok(v) = HeaderValue::from_str(authority)
    {
        map.insert(header::HOST, v);
    }
    map.insert(header::CONNECTION, HeaderValue::from_static("close"));
    map
}

async fn http_probe(
    target: &HttpTarget,
    headers: &[(String, String)],
    timeout: Duration,
    tls: &Arc<rustls::ClientConfig>,
) -> Attempt {
    let first = target.clone();
    let work = async {
        let mut current = first.clone();
        let mut redirects = 0usize;
        loop {
            let (status, location, body) = match http_get(&current, headers, tls).await {
                Ok(r) => r,
                Err(e) => return Attempt::Failure(format!("Get {:?}: {e}", current.url())),
            };
            if status.is_redirection()
                && matches!(status.as_u16(), 301 | 302 | 303 | 307 | 308)
                && let Some(next) = location.as_deref().and_then(|l| current.follow(l))
            {
                // Another port of the same address may be a host service's (pods share the
                // node's network stack): only the probed port is followed.
                if !same_host(&first, &next) || next.port != first.port {
                    return Attempt::Warning(format!(
                        "Probe terminated redirects, Response body: {}",
                        String::from_utf8_lossy(&body)
                    ));
                }
                redirects += 1;
                if redirects >= MAX_REDIRECTS {
                    return Attempt::Failure(format!(
                        "Get {:?}: stopped after {MAX_REDIRECTS} redirects",
                        next.url()
                    ));
                }
                current = next;
                continue;
            }
            let code = status.as_u16();
            return if (200..300).contains(&code) {
                Attempt::Success
            } else if (300..400).contains(&code) {
                Attempt::Warning(format!(
                    "Probe terminated redirects, Response body: {}",
                    String::from_utf8_lossy(&body)
                ))
            } else {
                Attempt::Failure(format!("HTTP probe failed with statuscode: {code}"))
            };
        }
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(a) => a,
        Err(_) => Attempt::Failure(format!(
            "Get {:?}: context deadline exceeded (Client.Timeout exceeded while awaiting headers)",
            target.url()
        )),
    }
}

/// One GET: the status, the Location header, and at most [`MAX_BODY`] bytes of the body.
async fn http_get(
    t: &HttpTarget,
    headers: &[(String, String)],
    tls: &Arc<rustls::ClientConfig>,
) -> Result<(StatusCode, Option<String>, Bytes), String> {
    let stream = dial(&t.host, t.port)
        .await
        .map_err(|e| format!("dial tcp {}: connect: {e}", t.authority()))?;
    let _ = stream.set_nodelay(true);
    let mut req = Request::builder()
        .method(Method::GET)
        .uri(t.path_and_query())
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    *req.headers_mut() = probe_headers(headers, &t.authority());
    if t.https {
        let name = rustls::pki_types::ServerName::try_from(t.host.clone())
            .map_err(|e| format!("tls: {e}"))?;
        let conn = tokio_rustls::TlsConnector::from(tls.clone())
            .connect(name, stream)
            .await
            .map_err(|e| format!("tls: {e}"))?;
        http1_exchange(conn, req).await
    } else {
        http1_exchange(stream, req).await
    }
}

/// Sends `req` on a new HTTP/1.1 connection over `io` and reads the response (the connection
/// is driven in this future: no task is spawned).
async fn http1_exchange<IO>(
    io: IO,
    req: Request<Empty<Bytes>>,
) -> Result<(StatusCode, Option<String>, Bytes), String>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| e.to_string())?;
    let exchange = async move {
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let location = resp
            .headers()
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(String::from);
        let mut body = resp.into_body();
        let mut read = Vec::new();
        while read.len() < MAX_BODY {
            match body.frame().await {
                Some(Ok(f)) => {
                    if let Some(d) = f.data_ref() {
                        let take = d.len().min(MAX_BODY - read.len());
                        read.extend_from_slice(&d[..take]);
                    }
                }
                Some(Err(e)) => return Err(e.to_string()),
                None => break,
            }
        }
        Ok((status, location, Bytes::from(read)))
    };
    drive(exchange, conn).await
}

/// Runs `work` while polling the connection future `conn` that serves it.
async fn drive<W, C, T, E>(work: W, conn: C) -> Result<T, String>
where
    W: std::future::Future<Output = Result<T, String>>,
    C: std::future::Future<Output = Result<(), E>>,
{
    tokio::pin!(work);
    tokio::pin!(conn);
    let mut conn_done = false;
    loop {
        tokio::select! {
            r = &mut work => return r,
            _ = &mut conn, if !conn_done => conn_done = true,
        }
    }
}

/// TLS for HTTPS probes: the kubelet does not check the container's certificate
/// (`InsecureSkipVerify`), but the handshake's signatures are still verified.
fn insecure_tls() -> rustls::ClientConfig {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier = Arc::new(AnyCertificate(provider.clone()));
    let builder =
        rustls::ClientConfig::builder_with_provider(provider).with_safe_default_protocol_versions();
    match builder {
        Ok(b) => b
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth(),
        Err(_) => rustls::ClientConfig::builder()
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth(),
    }
}

#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

// ---- grpc -------------------------------------------------------------------------------------

/// A `grpc.health.v1.HealthCheckRequest` for `service`, framed as a gRPC message. The message
/// is one optional string field (`service = 1`), encoded here rather than through a protobuf
/// code generator for two fixed messages.
fn health_request(service: &str) -> Bytes {
    let mut msg = Vec::new();
    if !service.is_empty() {
        msg.push(0x0a); // field 1, length-delimited
        let mut n = service.len();
        while n >= 0x80 {
            msg.push((n as u8 & 0x7f) | 0x80);
            n >>= 7;
        }
        msg.push(n as u8);
        msg.extend_from_slice(service.as_bytes());
    }
    let mut framed = Vec::with_capacity(5 + msg.len());
    framed.push(0); // not compressed
    framed.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    framed.extend_from_slice(&msg);
    Bytes::from(framed)
}

fn varint(buf: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *buf.first()?;
        buf.advance(1);
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// The `status` of a framed `grpc.health.v1.HealthCheckResponse` (0 when absent, as proto3).
fn health_status(body: &[u8]) -> Result<u64, String> {
    if body.len() < 5 {
        return Err("the health response has no message".into());
    }
    if body[0] != 0 {
        return Err("the health response is compressed".into());
    }
    let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
    let mut msg = body
        .get(5..5 + len)
        .ok_or("the health response message is cut short")?;
    let mut status = 0;
    while !msg.is_empty() {
        let key = varint(&mut msg).ok_or("bad protobuf")?;
        match key & 7 {
            0 => {
                let v = varint(&mut msg).ok_or("bad protobuf")?;
                if key >> 3 == 1 {
                    status = v;
                }
            }
            1 | 5 => {
                let n = if key & 7 == 1 { 8 } else { 4 };
                if msg.len() < n {
                    return Err("bad protobuf".into());
                }
                msg.advance(n);
            }
            2 => {
                let n = varint(&mut msg).ok_or("bad protobuf")? as usize;
                if msg.len() < n {
                    return Err("bad protobuf".into());
                }
                msg.advance(n);
            }
            _ => return Err("bad protobuf".into()),
        }
    }
    Ok(status)
}

fn serving_status_name(s: u64) -> String {
    match s {
        0 => "UNKNOWN".into(),
        1 => "SERVING".into(),
        2 => "NOT_SERVING".into(),
        3 => "SERVICE_UNKNOWN".into(),
        n => n.to_string(),
    }
}

fn grpc_code_name(c: u32) -> &'static str {
    const NAMES: [&str; 17] = [
        "OK",
        "Canceled",
        "Unknown",
        "InvalidArgument",
        "DeadlineExceeded",
        "NotFound",
        "AlreadyExists",
        "PermissionDenied",
        "ResourceExhausted",
        "FailedPrecondition",
        "Aborted",
        "OutOfRange",
        "Unimplemented",
        "Internal",
        "Unavailable",
        "DataLoss",
        "Unauthenticated",
    ];
    NAMES.get(c as usize).copied().unwrap_or("Unknown")
}

enum GrpcError {
    Connect(String),
    Rpc(u32, String),
}

async fn grpc_probe(addr: SocketAddr, service: &str, timeout: Duration) -> Attempt {
    let within = format!("{}s", timeout.as_secs_f32());
    match tokio::time::timeout(timeout, grpc_check(addr, service, timeout)).await {
        Err(_) => Attempt::Failure(format!(
            "timeout: health rpc did not complete within {within}"
        )),
        Ok(Err(GrpcError::Connect(e))) => Attempt::Failure(format!(
            "error: failed to connect service at \"{addr}\": {e}"
        )),
        Ok(Err(GrpcError::Rpc(12, m))) => Attempt::Failure(format!(
            "error: this server does not implement the grpc health protocol (grpc.health.v1.Health): {m}"
        )),
        Ok(Err(GrpcError::Rpc(4, _))) => Attempt::Failure(format!(
            "timeout: health rpc did not complete within {within}"
        )),
        Ok(Err(GrpcError::Rpc(code, m))) => Attempt::Failure(format!(
            "error: health rpc probe failed: rpc error: code = {} desc = {m}",
            grpc_code_name(code)
        )),
        Ok(Ok(1)) => Attempt::Success,
        Ok(Ok(s)) => Attempt::Failure(format!(
            "service unhealthy (responded with {:?})",
            serving_status_name(s)
        )),
    }
}

/// `grpc.health.v1.Health/Check` over HTTP/2 without TLS (prior knowledge), as the kubelet's
/// gRPC probe calls it; returns the serving status.
async fn grpc_check(addr: SocketAddr, service: &str, timeout: Duration) -> Result<u64, GrpcError> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| GrpcError::Connect(e.to_string()))?;
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .map_err(|e| GrpcError::Connect(e.to_string()))?;
    let uri = format!("http://{addr}/grpc.health.v1.Health/Check");
    let req = Request::builder()
        .method(Method::POST)
        .uri(uri)
        .header(header::CONTENT_TYPE, "application/grpc")
        .header(header::TE, "trailers")
        .header(header::USER_AGENT, USER_AGENT)
        .header("grpc-timeout", format!("{}m", timeout.as_millis().max(1)))
        .body(Full::new(health_request(service)))
        .map_err(|e| GrpcError::Connect(e.to_string()))?;
    let exchange = async move {
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("rpc: {e}"))?;
        let (parts, body) = resp.into_parts();
        let collected = http_body_util::Limited::new(body, MAX_GRPC_BODY)
            .collect()
            .await
            .map_err(|e| format!("reading the health response: {e}"))?;
        let trailers = collected.trailers().cloned();
        Ok((parts, trailers, collected.to_bytes()))
    };
    let (parts, trailers, body) = drive(exchange, conn)
        .await
        .map_err(|e| GrpcError::Rpc(14, e))?;
    if parts.status != StatusCode::OK {
        return Err(GrpcError::Rpc(
            2,
            format!(
                "unexpected HTTP status code received from server: {}",
                parts.status.as_u16()
            ),
        ));
    }
    // The status is in the trailers, or in the headers of a trailers-only response.
    let fields = trailers
        .as_ref()
        .filter(|t| t.contains_key("grpc-status"))
        .unwrap_or(&parts.headers);
    let code = fields
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u32>().ok())
        .ok_or_else(|| {
            GrpcError::Rpc(
                13,
                "server closed the stream without sending trailers".into(),
            )
        })?;
    if code != 0 {
        let message = fields
            .get("grpc-message")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        return Err(GrpcError::Rpc(code, message));
    }
    health_status(&body).map_err(|e| GrpcError::Rpc(13, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_starts_failed_and_needs_its_success_threshold() {
        let mut t = Threshold::new(Kind::Readiness, 2, 3);
        assert_eq!(t.verdict(), Verdict::Failure);
        assert_eq!(t.observe(Outcome::Success), None);
        assert_eq!(t.observe(Outcome::Success), Some(Verdict::Success));
        // Two failures are below the threshold; a success in between starts the count again
        // (and it takes two successes in a row to count).
        assert_eq!(t.observe(Outcome::Failure), None);
        assert_eq!(t.observe(Outcome::Failure), None);
        assert_eq!(t.verdict(), Verdict::Success);
        assert_eq!(t.observe(Outcome::Success), None);
        assert_eq!(t.observe(Outcome::Success), Some(Verdict::Success));
        assert_eq!(t.observe(Outcome::Failure), None);
        assert_eq!(t.observe(Outcome::Failure), None);
        assert_eq!(t.observe(Outcome::Failure), Some(Verdict::Failure));
        assert_eq!(t.verdict(), Verdict::Failure);
        // Each further failure keeps it failed.
        assert_eq!(t.observe(Outcome::Failure), Some(Verdict::Failure));
        // A new run starts unready again.
        assert_eq!(t.observe(Outcome::Success), None);
        assert_eq!(t.observe(Outcome::Success), Some(Verdict::Success));
        t.new_run();
        assert_eq!(t.verdict(), Verdict::Failure);
    }

    #[test]
    fn liveness_starts_passing_and_a_failure_needs_a_full_streak_after_restart() {
        let mut t = Threshold::new(Kind::Liveness, 1, 3);
        assert_eq!(t.verdict(), Verdict::Success);
        assert_eq!(t.observe(Outcome::Failure), None);
        assert_eq!(t.observe(Outcome::Failure), None);
        assert_eq!(t.observe(Outcome::Failure), Some(Verdict::Failure));
        t.new_run();
        assert_eq!(t.verdict(), Verdict::Success);
        // The next run fails only after three failures of its own.
        assert_eq!(t.observe(Outcome::Failure), None);
        assert_eq!(t.observe(Outcome::Failure), None);
        assert_eq!(t.observe(Outcome::Failure), Some(Verdict::Failure));
    }

    #[test]
    fn startup_is_unknown_until_it_passes() {
        let mut t = Threshold::new(Kind::Startup, 1, 2);
        assert_eq!(t.verdict(), Verdict::Unknown);
        assert_eq!(t.observe(Outcome::Failure), None);
        assert_eq!(t.verdict(), Verdict::Unknown);
        assert_eq!(t.observe(Outcome::Success), Some(Verdict::Success));
        let mut t = Threshold::new(Kind::Startup, 1, 2);
        assert_eq!(t.observe(Outcome::Failure), None);
        assert_eq!(t.observe(Outcome::Failure), Some(Verdict::Failure));
    }

    #[test]
    fn zero_thresholds_count_as_one() {
        let mut t = Threshold::new(Kind::Readiness, 0, 0);
        assert_eq!(t.observe(Outcome::Success), Some(Verdict::Success));
        assert_eq!(t.observe(Outcome::Failure), Some(Verdict::Failure));
    }

    fn container() -> Container {
        serde_json::from_value(serde_json::json!({
            "name": "c", "image": "x",
            "ports": [{"name": "http", "containerPort": 3001}],
        }))
        .unwrap()
    }

    #[test]
    fn ports_by_number_name_or_numeric_string() {
        let c = container();
        assert_eq!(port_of(&IntOrString::Int(8080), &c), Ok(8080));
        assert_eq!(port_of(&IntOrString::String("http".into()), &c), Ok(3001));
        assert_eq!(port_of(&IntOrString::String("9090".into()), &c), Ok(9090));
        assert!(port_of(&IntOrString::String("grpc".into()), &c).is_err());
        assert!(port_of(&IntOrString::Int(0), &c).is_err());
        assert!(port_of(&IntOrString::Int(70000), &c).is_err());
    }

    #[test]
    fn kubelet_defaults_fill_an_empty_probe() {
        let p: Probe = serde_json::from_value(
            serde_json::json!({"httpGet": {"port": "http", "path": "healthz"}}),
        )
        .unwrap();
        let s = Spec::of(Kind::Liveness, &p, &container());
        assert_eq!(s.period, Duration::from_secs(10));
        assert_eq!(s.timeout, Duration::from_secs(1));
        assert_eq!((s.success_threshold, s.failure_threshold), (1, 3));
        assert_eq!(s.initial_delay, Duration::ZERO);
        let Action::Http {
            port, path, https, ..
        } = s.action
        else {
            panic!("not http")
        };
        assert_eq!((port, path.as_str(), https), (Ok(3001), "healthz", false));
        let exec: Probe =
            serde_json::from_value(serde_json::json!({"exec": {"command": ["true"]}})).unwrap();
        assert_eq!(
            Spec::of(Kind::Readiness, &exec, &container()).action,
            Action::Exec
        );
    }

    #[test]
    fn redirects_resolve_and_only_same_host_ones_are_followed() {
        let t = HttpTarget {
            https: false,
            host: "127.0.0.1".into(),
            port: 3001,
            path: "/a/b?x=1".into(),
        };
        assert_eq!(t.url(), "http://127.0.0.1:3001/a/b?x=1");
        let rel = t.follow("c").unwrap();
        assert_eq!(rel.path, "/a/c");
        let abs = t.follow("/healthz").unwrap();
        assert_eq!(
            (abs.host.as_str(), abs.port, abs.path.as_str()),
            ("127.0.0.1", 3001, "/healthz")
        );
        let other_port = t.follow("http://127.0.0.1:4000/ok").unwrap();
        assert!(same_host(&t, &other_port));
        assert_eq!(other_port.port, 4000);
        let other = t.follow("https://example.com/").unwrap();
        assert!(!same_host(&t, &other));
        assert_eq!((other.https, other.port), (true, 443));
    }

    #[test]
    fn probe_headers_as_the_kubelet_sends_them() {
        let h = probe_headers(&[], "127.0.0.1:3001");
        assert_eq!(h[header::USER_AGENT], USER_AGENT);
        assert_eq!(h[header::ACCEPT], "*/*");
        assert_eq!(h[header::HOST], "127.0.0.1:3001");
        let h = probe_headers(
            &[
                ("Accept".into(), "".into()),
                ("Host".into(), "example.com".into()),
                ("X-Probe".into(), "1".into()),
                ("X-Probe".into(), "2".into()),
            ],
            "127.0.0.1:3001",
        );
        assert!(!h.contains_key(header::ACCEPT));
        assert_eq!(h[header::HOST], "example.com");
        assert_eq!(h.get_all("x-probe").iter().count(), 2);
    }

    #[test]
    fn health_messages_encode_and_decode() {
        assert_eq!(&health_request("")[..], &[0, 0, 0, 0, 0]);
        assert_eq!(
            &health_request("db")[..],
            &[0, 0, 0, 0, 4, 0x0a, 2, b'd', b'b']
        );
        assert_eq!(health_status(&[0, 0, 0, 0, 2, 0x08, 1]), Ok(1));
        assert_eq!(health_status(&[0, 0, 0, 0, 0]), Ok(0));
        // Unknown fields are skipped.
        assert_eq!(
            health_status(&[0, 0, 0, 0, 6, 0x12, 2, b'h', b'i', 0x08, 2]),
            Ok(2)
        );
        assert!(health_status(&[0, 0, 0, 0, 9, 0x08]).is_err());
        assert!(health_status(&[1, 0, 0, 0, 0]).is_err());
    }

    /// A loopback HTTP/1 server answering each request with `answer(path)`.
    async fn http_server(answer: fn(&str) -> (u16, Option<&'static str>)) -> SocketAddr {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((s, _)) = l.accept().await else { return };
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: Request<hyper::body::Incoming>| async move {
                            let (code, location) = answer(req.uri().path());
                            let mut r = http::Response::builder().status(code);
                            if let Some(l) = location {
                                r = r.header(header::LOCATION, l);
                            }
                            Ok::<_, std::convert::Infallible>(
                                r.body(Full::new(Bytes::from("body"))).unwrap(),
                            )
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        addr
    }

    fn target(addr: SocketAddr, path: &str) -> HttpTarget {
        HttpTarget {
            https: false,
            host: addr.ip().to_string(),
            port: addr.port(),
            path: path.into(),
        }
    }

    #[tokio::test]
    async fn http_probe_outcomes() {
        let addr = http_server(|path| match path {
            "/ok" => (200, None),
            "/fail" => (500, None),
            "/moved" => (302, Some("/ok")),
            "/away" => (302, Some("http://192.0.2.1/")),
            "/loop" => (302, Some("/loop")),
            _ => (404, None),
        })
        .await;
        let tls = Arc::new(insecure_tls());
        let t = Duration::from_secs(5);
        assert_eq!(
            http_probe(&target(addr, "/ok"), &[], t, &tls).await,
            Attempt::Success
        );
        assert_eq!(
            http_probe(&target(addr, "/fail"), &[], t, &tls).await,
            Attempt::Failure("HTTP probe failed with statuscode: 500".into())
        );
        assert_eq!(
            http_probe(&target(addr, "/moved"), &[], t, &tls).await,
            Attempt::Success
        );
        assert_eq!(
            http_probe(&target(addr, "/away"), &[], t, &tls).await,
            Attempt::Warning("Probe terminated redirects, Response body: body".into())
        );
        let Attempt::Failure(m) = http_probe(&target(addr, "/loop"), &[], t, &tls).await else {
            panic!("a redirect loop passed")
        };
        assert!(m.ends_with("stopped after 10 redirects"), "{m}");
        // Nothing listens: a failure naming the address.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let Attempt::Failure(m) = http_probe(&target(closed, "/"), &[], t, &tls).await else {
            panic!("a closed port passed")
        };
        assert!(m.contains(&closed.to_string()), "{m}");
        let Attempt::Failure(m) = tcp_probe("127.0.0.1", closed.port(), t).await else {
            panic!("a closed port passed")
        };
        assert!(m.starts_with(&format!("dial tcp {closed}")), "{m}");
        assert_eq!(
            tcp_probe("127.0.0.1", addr.port(), t).await,
            Attempt::Success
        );
    }

    #[tokio::test]
    async fn an_http_probe_that_gets_no_answer_fails_at_its_timeout() {
        // Accepts and never answers.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let _held = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = l.accept().await {
                held.push(s);
            }
        });
        let tls = Arc::new(insecure_tls());
        let Attempt::Failure(m) =
            http_probe(&target(addr, "/"), &[], Duration::from_millis(200), &tls).await
        else {
            panic!("a silent server passed")
        };
        assert!(m.contains("Client.Timeout exceeded"), "{m}");
    }

    #[tokio::test]
    async fn https_probes_do_not_check_the_certificate() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["someone-else.example".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let der = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone()], der)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(s).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(
                        |req: Request<hyper::body::Incoming>| async move {
                            let code = if req.uri().path() == "/ok" { 200 } else { 503 };
                            Ok::<_, std::convert::Infallible>(
                                http::Response::builder()
                                    .status(code)
                                    .body(Full::new(Bytes::from("tls")))
                                    .unwrap(),
                            )
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        let tls = Arc::new(insecure_tls());
        let mut t = target(addr, "/ok");
        t.https = true;
        let timeout = Duration::from_secs(5);
        assert_eq!(http_probe(&t, &[], timeout, &tls).await, Attempt::Success);
        t.path = "/down".into();
        assert_eq!(
            http_probe(&t, &[], timeout, &tls).await,
            Attempt::Failure("HTTP probe failed with statuscode: 503".into())
        );
        // Plain HTTP to a TLS port fails.
        t.https = false;
        let Attempt::Failure(_) = http_probe(&t, &[], timeout, &tls).await else {
            panic!("plain HTTP to a TLS server passed")
        };
    }

    /// A loopback gRPC health server (HTTP/2 prior knowledge): SERVING for "", NOT_SERVING
    /// for "down", Unimplemented for any other method.
    async fn grpc_server() -> SocketAddr {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((s, _)) = l.accept().await else { return };
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        |req: Request<hyper::body::Incoming>| async move {
                            let path = req.uri().path().to_string();
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let mut trailers = HeaderMap::new();
                            let msg: Vec<u8> = if path != "/grpc.health.v1.Health/Check" {
                                trailers.insert("grpc-status", HeaderValue::from_static("12"));
                                vec![]
                            } else {
                                trailers.insert("grpc-status", HeaderValue::from_static("0"));
                                let status = if &body[5..] == b"\x0a\x04down" { 2 } else { 1 };
                                vec![0, 0, 0, 0, 2, 0x08, status]
                            };
                            let stream = futures::stream::iter(vec![
                                Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(
                                    Bytes::from(msg),
                                )),
                                Ok(hyper::body::Frame::trailers(trailers)),
                            ]);
                            let resp = http::Response::builder()
                                .header("content-type", "application/grpc")
                                .body(http_body_util::StreamBody::new(stream))
                                .unwrap();
                            Ok::<_, std::convert::Infallible>(resp)
                        },
                    );
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn grpc_probe_reads_the_serving_status() {
        let addr = grpc_server().await;
        let t = Duration::from_secs(5);
        assert_eq!(grpc_probe(addr, "", t).await, Attempt::Success);
        assert_eq!(
            grpc_probe(addr, "down", t).await,
            Attempt::Failure("service unhealthy (responded with \"NOT_SERVING\")".into())
        );
        // An HTTP/1-only server is no gRPC server.
        let h1 = http_server(|_| (200, None)).await;
        let Attempt::Failure(_) = grpc_probe(h1, "", t).await else {
            panic!("an HTTP/1 server passed a gRPC probe")
        };
    }
}
