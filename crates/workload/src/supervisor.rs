//! The Supervisor: plan -> fetch -> compile -> start for each pod, and stop. Both fronts (the
//! standalone `run` and the node agent) drive pods only through this type.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::Pod;
use oci::Credentials;
use runtime::{Invocation, Program, ProgramKind, Runtime, Stream};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use wagi::routes::{RouteTable, join, parse_routes_output};

use crate::command::{CommandSpec, RestartBackoff, run_container};
use crate::image::Images;
use crate::listen::{ConnLimits, Conns};
use crate::logs::LogStore;
use crate::metrics::Metrics;
use crate::plan::{ContainerPlan, Plan, PlanContext, PlanKind, PodKey, plan};
use crate::report::{ContainerState, EventType, Phase, Reporter};
use crate::serve::{Handler, WagiApp, serve};
use crate::usage::Usage;

/// Binds a pod's listener; a port in use is `PortInUse`, as the kubelet's port conflicts say.
async fn bind(listen: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(listen).await.map_err(|e| StartError {
        reason: if e.kind() == std::io::ErrorKind::AddrInUse {
            "PortInUse".into()
        } else {
            "CannotListen".into()
        },
        message: format!("cannot listen on {listen}: {e}"),
        container: None,
    })
}

#[derive(Clone, Debug)]
pub struct SupervisorConfig {
    /// Per-request deadline of WAGI routes.
    pub request_timeout: Duration,
    /// Sent as SERVER_SOFTWARE.
    pub server_software: String,
    pub restart_backoff: RestartBackoff,
    /// WAGI requests one pod may have running at once (instances in flight).
    pub max_instances_per_pod: u32,
    /// Bounds of each WAGI listener's connections.
    pub conn_limits: ConnLimits,
    /// How the instances of WASI 0.3 services are reused (their request timeout is
    /// `request_timeout`).
    pub service_limits: runtime::ServiceLimits,
    /// Where the pods' connections are served ([`crate::threads`]); `None`: on the runtime
    /// their listeners run on.
    pub serve_threads: Option<crate::threads::ServeThreads>,
}

impl Default for SupervisorConfig {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(30),
            server_software: format!("wasinode/{}", env!("CARGO_PKG_VERSION")),
            restart_backoff: RestartBackoff::default(),
            max_instances_per_pod: 100,
            conn_limits: ConnLimits::default(),
            service_limits: runtime::ServiceLimits::default(),
            serve_threads: None,
        }
    }
}

/// Why a pod could not start: a kubelet-style reason and a message that says exactly what is wrong.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{reason}: {message}")]
pub struct StartError {
    pub reason: String,
    pub message: String,
    /// The container the error is about, if any.
    pub container: Option<String>,
}

impl StartError {
    /// A registry pull that failed (not found, unauthorized, unreachable, ...): the kubelet
    /// retries these with back-off (`ErrImagePull`, then `ImagePullBackOff`) instead of failing
    /// the pod.
    pub fn is_image_pull(&self) -> bool {
        self.reason == "ErrImagePull"
    }
}

/// A pod that started.
#[derive(Debug, Clone)]
pub struct Started {
    pub key: PodKey,
    /// The address a WAGI pod listens on.
    pub listen: Option<SocketAddr>,
    /// Routes served (WAGI), including `_routes` sub-routes.
    pub routes: Vec<String>,
    pub warnings: Vec<String>,
    /// Container name -> module digest.
    pub digests: Vec<(String, String)>,
}

/// A pod the supervisor holds: reserved from the moment its start begins (so a second start of
/// the same pod is refused at once), with its task once started.
struct Running {
    stop: CancellationToken,
    /// `None` while the pod is starting.
    task: Option<JoinHandle<()>>,
}

type Pods = Arc<Mutex<BTreeMap<PodKey, Running>>>;

/// Frees the reservation of a start that did not get as far as installing its task.
struct Reservation {
    pods: Pods,
    key: PodKey,
    usage: Usage,
    metrics: Metrics,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut pods = self.pods.lock().unwrap_or_else(|p| p.into_inner());
        if pods.get(&self.key).is_some_and(|r| r.task.is_none()) {
            pods.remove(&self.key);
            self.usage.remove(&self.key);
            self.metrics.remove_pod(&self.key);
        }
    }
}

#[derive(Clone)]
pub struct Supervisor {
    runtime: Runtime,
    images: Images,
    logs: LogStore,
    reports: Reporter,
    config: SupervisorConfig,
    pods: Pods,
    /// Where to ask a running pod's servers to restart one of its containers.
    restarts: Restarts,
    usage: Usage,
    metrics: Metrics,
}

impl Supervisor {
    pub fn new(
        runtime: Runtime,
        images: Images,
        logs: LogStore,
        reports: Reporter,
        config: SupervisorConfig,
    ) -> Self {
        let usage = Usage::default();
        let metrics = Metrics::new(usage.clone(), logs.clone());
        Self {
            runtime,
            images,
            logs,
            reports,
            config,
            pods: Arc::default(),
            restarts: Arc::default(),
            metrics,
            usage,
        }
    }

    /// The agent's Prometheus metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// CPU and memory of the pods that run, per container.
    pub fn usage(&self) -> &Usage {
        &self.usage
    }

    pub fn logs(&self) -> &LogStore {
        &self.logs
    }

    pub fn runtime(&self) -> &Runtime {
        &self.runtime
    }

    /// Where this supervisor's reports go (for a front that reports about its pods itself, in
    /// order with the supervisor's own reports).
    pub fn reporter(&self) -> &Reporter {
        &self.reports
    }

    /// Pods that are starting or running now (a finished WASI pod is forgotten).
    pub fn running(&self) -> Vec<PodKey> {
        let pods = self.pods.lock().unwrap_or_else(|p| p.into_inner());
        pods.iter()
            .filter(|(_, r)| r.task.as_ref().is_none_or(|t| !t.is_finished()))
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Reports a pod that could not start as the standalone front shows it: the container (if
    /// the error names one) waiting with the reason, a `Failed` Event, and the pod Failed.
    pub fn report_failure(&self, key: &PodKey, e: &StartError) {
        if let Some(c) = &e.container {
            self.reports.container(
                key,
                c,
                ContainerState::Waiting {
                    reason: e.reason.clone(),
                    message: e.message.clone(),
                },
                false,
                0,
                None,
            );
        }
        self.reports
            .event(key, EventType::Warning, "Failed", e.message.clone());
        self.reports
            .phase(key, Phase::Failed, Some(&e.reason), Some(e.message.clone()));
    }

    /// Plans, fetches, compiles and starts `pod`. On error the pod is reported Failed with the
    /// reason, and nothing of it is left running.
    pub async fn start(
        &self,
        pod: &Pod,
        ctx: &PlanContext,
        creds: Option<&Credentials>,
    ) -> Result<Started, StartError> {
        let key = crate::plan::pod_key(pod);
        let result = self.start_inner(pod, ctx, creds).await;
        if let Err(e) = &result {
            self.report_failure(&key, e);
        }
        result
    }

    /// Like [`Supervisor::start`], but a failure is only returned, not reported: the caller
    /// decides whether the pod fails ([`Supervisor::report_failure`]) or waits and is retried
    /// (the node agent's image pull back-off).
    pub async fn try_start(
        &self,
        pod: &Pod,
        ctx: &PlanContext,
        creds: Option<&Credentials>,
    ) -> Result<Started, StartError> {
        self.start_inner(pod, ctx, creds).await
    }

    async fn start_inner(
        &self,
        pod: &Pod,
        ctx: &PlanContext,
        creds: Option<&Credentials>,
    ) -> Result<Started, StartError> {
        let plan = plan(pod, ctx).map_err(|e| StartError {
            reason: "InvalidPodSpec".into(),
            message: e.to_string(),
            container: None,
        })?;
        let key = plan.key.clone();
        let stop = {
            let mut pods = self.pods.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(r) = pods.get(&key) {
                let state = if r.task.is_none() {
                    "starting"
                } else {
                    "running"
                };
                return Err(StartError {
                    reason: "AlreadyRunning".into(),
                    message: format!("pod {key} is already {state}"),
                    container: None,
                });
            }
            let stop = CancellationToken::new();
            pods.insert(
                key.clone(),
                Running {
                    stop: stop.clone(),
                    task: None,
                },
            );
            stop
        };
        let _reservation = Reservation {
            pods: self.pods.clone(),
            key: key.clone(),
            usage: self.usage.clone(),
            metrics: self.metrics.clone(),
        };
        let usage = self
            .usage
            .insert(&key, plan.containers.iter().map(|c| c.name.as_str()));
        for w in &plan.warnings {
            self.reports
                .event(&key, EventType::Warning, "PodSpecWarning", w.clone());
        }
        let mut programs = HashMap::new();
        for c in &plan.containers {
            // What the node spends getting the container ready is the container's CPU too.
            let meter = usage.container(&c.name).map(|u| u.meter.clone());
            let loading = self.load_container(&key, c, ctx, creds);
            let program = runtime::usage::Metered::new(loading, meter.clone()).await?;
            if let Some(m) = meter {
                m.set_resident(program.code_bytes() as u64);
            }
            programs.insert(c.name.clone(), program);
        }
        for c in &plan.containers {
            for m in &c.mounts {
                if m.host.starts_with(&ctx.volume_dir) && !ctx.volume_dir.as_os_str().is_empty() {
                    tokio::fs::create_dir_all(&m.host)
                        .await
                        .map_err(|e| StartError {
                            reason: "CreateContainerConfigError".into(),
                            message: format!("cannot create volume {}: {e}", m.host.display()),
                            container: Some(c.name.clone()),
                        })?;
                }
            }
        }
        let digests = plan
            .containers
            .iter()
            .filter_map(|c| {
                programs
                    .get(&c.name)
                    .map(|p| (c.name.clone(), p.digest().to_string()))
            })
            .collect();
        let started = match &plan.kind {
            _ if stop.is_cancelled() => {
                return Err(StartError {
                    reason: "Stopped".into(),
                    message: format!("pod {key} was stopped while it was starting"),
                    container: None,
                });
            }
            PlanKind::Wagi { listen, routes } => {
                self.start_wagi(&plan, *listen, routes, &programs, stop)
                    .await?
            }
            PlanKind::Wasi { restart } => self.start_wasi(&plan, *restart, &programs, stop).await?,
        };
        Ok(Started {
            key,
            warnings: plan.warnings.clone(),
            digests,
            ..started
        })
    }

    async fn load_container(
        &self,
        key: &PodKey,
        c: &ContainerPlan,
        ctx: &PlanContext,
        creds: Option<&Credentials>,
    ) -> Result<Arc<Program>, StartError> {
        let waiting = |reason: &str, message: String| {
            self.reports.container(
                key,
                &c.name,
                ContainerState::Waiting {
                    reason: reason.into(),
                    message,
                },
                false,
                0,
                None,
            );
        };
        waiting("ContainerCreating", String::new());
        self.reports.event(
            key,
            EventType::Normal,
            "Pulling",
            format!("Pulling image {:?}", c.image),
        );
        let pull_began = std::time::Instant::now();
        let fetched = self
            .images
            .fetch(
                &c.image,
                c.image_pull_policy.as_deref(),
                &ctx.local_images,
                ctx.base_dir.as_deref(),
                creds,
            )
            .await
            .map_err(|e| StartError {
                reason: e.reason().into(),
                message: format!("container {}: {e}", c.name),
                container: Some(c.name.clone()),
            })?;
        self.metrics.pulled(pull_began.elapsed());
        self.reports.event(
            key,
            EventType::Normal,
            "Pulled",
            format!(
                "Image {:?} is {} ({} bytes)",
                c.image,
                fetched.digest,
                fetched.bytes.len()
            ),
        );
        if let Some(p) = self.runtime.loaded(&fetched.digest) {
            return Ok(p);
        }
        let rt = self.runtime.clone();
        let digest = fetched.digest.clone();
        let compile_began = std::time::Instant::now();
        let loaded = tokio::task::spawn_blocking(move || rt.load(&digest, &fetched.bytes)).await;
        match loaded {
            Ok(Ok(p)) => {
                self.metrics.compiled(compile_began.elapsed());
                Ok(p)
            }
            Ok(Err(e)) => Err(StartError {
                reason: "CreateContainerError".into(),
                message: format!("container {}: {e}", c.name),
                container: Some(c.name.clone()),
            }),
            Err(e) => Err(StartError {
                reason: "CreateContainerError".into(),
                message: format!("container {}: compiler task failed: {e}", c.name),
                container: Some(c.name.clone()),
            }),
        }
    }

    async fn start_wagi(
        &self,
        plan: &Plan,
        listen: SocketAddr,
        routes: &[crate::plan::RoutePlan],
        programs: &HashMap<String, Arc<Program>>,
        stop: CancellationToken,
    ) -> Result<Started, StartError> {
        let key = &plan.key;
        let mut table = RouteTable::new();
        let mut served = Vec::new();
        let mut recipes = Vec::new();
        for r in routes {
            let c = plan.containers.iter().find(|c| c.name == r.container);
            let (Some(c), Some(program)) = (c, programs.get(&r.container)) else {
                continue;
            };
            if program.kind() == ProgramKind::Command {
                return Err(StartError {
                    reason: "CreateContainerError".into(),
                    message: format!(
                        "container {}: its image is a {}, which cannot serve route {}: \
                         a route takes a WAGI module or a wasi:http handler component",
                        c.name,
                        program.kind(),
                        r.pattern.as_declared()
                    ),
                    container: Some(c.name.clone()),
                });
            }
            let handler = |entrypoint: String, route: String| {
                self.handler(
                    c,
                    program,
                    entrypoint,
                    r.argv.clone(),
                    r.allowed_hosts.clone(),
                    key,
                )
                .map(|mut h| {
                    h.metrics = Some(Arc::new(self.metrics.route(key, &route, Some(&c.name))));
                    Arc::new(h)
                })
            };
            let clash = |e: wagi::routes::RouteError| StartError {
                reason: "RouteConflict".into(),
                message: format!("container {}: {e}", c.name),
                container: Some(c.name.clone()),
            };
            let h = handler(r.entrypoint.clone(), r.pattern.as_declared())?;
            recipes.push(Route::new(r, &r.pattern, &r.entrypoint, &h));
            table.insert(r.pattern.clone(), h).map_err(clash)?;
            served.push(r.pattern.as_declared());
            if program.exports_func("_routes") {
                for sub in self.sub_routes(c, program).await? {
                    let pattern = join(&r.pattern, &sub.pattern).map_err(clash)?;
                    served.push(pattern.as_declared());
                    let h = handler(sub.entrypoint.clone(), pattern.as_declared())?;
                    recipes.push(Route::new(r, &pattern, &sub.entrypoint, &h));
                    table.insert(pattern, h).map_err(clash)?;
                }
            }
        }
        let listener = bind(listen).await?;
        let bound = listener.local_addr().unwrap_or(listen);
        let unit = Unit {
            addr: bound,
            routes: recipes,
            server: None,
        };
        let task = self.spawn_units(plan, programs, vec![(unit, listener, table)], stop);
        let now = SystemTime::now();
        let usage = self.usage.pod(key);
        for c in &plan.containers {
            if let Some(u) = usage.as_ref().and_then(|u| u.container(&c.name)) {
                u.set_started(now);
            }
            let image_id = programs.get(&c.name).map(|p| p.digest().to_string());
            self.reports.container(
                key,
                &c.name,
                ContainerState::Running { started_at: now },
                true,
                0,
                image_id,
            );
            self.reports.event(
                key,
                EventType::Normal,
                "Started",
                format!("Started container {}: serving on {bound}", c.name),
            );
        }
        self.reports.phase(key, Phase::Running, None, None);
        self.install(key, task);
        Ok(Started {
            key: key.clone(),
            listen: Some(bound),
            routes: served,
            warnings: vec![],
            digests: vec![],
        })
    }

    /// The executor's view of container `c` serving through `program`.
    fn handler(
        &self,
        c: &ContainerPlan,
        program: &Arc<Program>,
        entrypoint: String,
        argv: Option<String>,
        allowed_hosts: Arc<runtime::AllowList>,
        key: &PodKey,
    ) -> Result<Handler, StartError> {
        let limits = runtime::ServiceLimits {
            request_timeout: self.config.request_timeout,
            // A 0.3 service's instances are kept per serving thread (runtime::service).
            lanes: self.config.serve_threads.as_ref().map_or(1, |t| t.len()),
            ..self.config.service_limits
        };
        Handler::new(
            &self.runtime,
            limits,
            &c.name,
            program.clone(),
            entrypoint,
            argv,
            c.env.clone(),
            c.mounts.clone(),
            allowed_hosts,
            self.logs.container(key, &c.name),
            self.limits_of(key, c),
            self.usage.meter(key, &c.name),
        )
        .map(|mut h| {
            if c.resources.memory_limit.is_some() {
                h.limit_events = Some(crate::serve::LimitEvents::new(
                    self.reports.clone(),
                    key.clone(),
                ));
            }
            h
        })
        .map_err(|e| StartError {
            reason: "CreateContainerError".into(),
            message: format!("container {}: {e}", c.name),
            container: Some(c.name.clone()),
        })
    }

    /// Serves `table` on `listener` until `stop`. The grace period is enforced by `stop`, which
    /// aborts the server (and with it every open connection) when it runs out; the server itself
    /// waits for in-flight requests.
    fn spawn_server(
        &self,
        key: &PodKey,
        listener: TcpListener,
        table: RouteTable<Arc<Handler>>,
        stop: CancellationToken,
    ) -> JoinHandle<()> {
        let app = Arc::new(WagiApp {
            pod: key.to_string(),
            routes: table,
            runtime: self.runtime.clone(),
            timeout: self.config.request_timeout,
            server_software: self.config.server_software.clone(),
            slots: Arc::new(tokio::sync::Semaphore::new(
                self.config.max_instances_per_pod.max(1) as usize,
            )),
            in_flight: Some(self.metrics.in_flight(key)),
            unrouted: Some(self.metrics.route(key, "", None)),
            threads: self.config.serve_threads.clone(),
        });
        tokio::spawn(serve(
            listener,
            app,
            Conns::new(self.config.conn_limits),
            stop,
            Duration::from_secs(24 * 3600),
        ))
    }

    async fn sub_routes(
        &self,
        c: &ContainerPlan,
        program: &Arc<Program>,
    ) -> Result<Vec<wagi::routes::SubRoute>, StartError> {
        let err = |m: String| StartError {
            reason: "CreateContainerError".into(),
            message: format!("container {}: _routes: {m}", c.name),
            container: Some(c.name.clone()),
        };
        let mut inv = Invocation::new("_routes");
        inv.env = runtime::Environ::new(&c.env);
        inv.stdout = Stream::Capture { limit: 1 << 20 };
        inv.timeout = Some(self.config.request_timeout);
        let out = self
            .runtime
            .run(program, inv)
            .await
            .map_err(|e| err(e.to_string()))?;
        parse_routes_output(&String::from_utf8_lossy(&out.stdout)).map_err(|e| err(e.to_string()))
    }

    /// Containers of a pod without a WAGI table: HTTP handler components are served on their
    /// ports, commands (preview-1 modules and `wasi:cli/run` components) run under the restart
    /// policy.
    async fn start_wasi(
        &self,
        plan: &Plan,
        restart: crate::plan::RestartPolicy,
        programs: &HashMap<String, Arc<Program>>,
        stop: CancellationToken,
    ) -> Result<Started, StartError> {
        let key = plan.key.clone();
        let mut handles = Vec::new();
        let mut servers = Vec::new();
        let mut listeners = Vec::new();
        // Bind every port before anything starts, so a port in use fails the pod cleanly.
        for c in &plan.containers {
            if !programs
                .get(&c.name)
                .is_some_and(|p| p.kind().serves_http())
            {
                continue;
            }
            for addr in &c.listen {
                let l = bind(*addr).await.map_err(|e| StartError {
                    container: Some(c.name.clone()),
                    message: format!("container {}: {}", c.name, e.message),
                    ..e
                })?;
                listeners.push((c, l));
            }
        }
        let mut listen = None;
        let mut routes = Vec::new();
        let mut units = Vec::new();
        for (c, listener) in listeners {
            let Some(program) = programs.get(&c.name) else {
                continue;
            };
            let bound = listener.local_addr().ok();
            listen = listen.or(bound);
            let mut table = RouteTable::new();
            let everything = wagi::routes::RoutePattern::parse("/...").map_err(|e| StartError {
                reason: "CreateContainerError".into(),
                message: e.to_string(),
                container: None,
            })?;
            let mut handler = self.handler(
                c,
                program,
                String::new(),
                None,
                c.allowed_hosts.clone(),
                &key,
            )?;
            handler.metrics = Some(Arc::new(self.metrics.route(&key, "/...", Some(&c.name))));
            let handler = Arc::new(handler);
            let route = Route {
                container: c.name.clone(),
                pattern: everything.clone(),
                entrypoint: String::new(),
                argv: None,
                allowed_hosts: c.allowed_hosts.clone(),
                handler: handler.clone(),
            };
            table.insert(everything, handler).map_err(|e| StartError {
                reason: "CreateContainerError".into(),
                message: e.to_string(),
                container: None,
            })?;
            if let Some(b) = bound {
                routes.push(format!("http://{b}/ ({})", c.name));
            }
            let addr = bound.unwrap_or(std::net::SocketAddr::from(([0, 0, 0, 0], 0)));
            units.push((
                Unit {
                    addr,
                    routes: vec![route],
                    server: None,
                },
                listener,
                table,
            ));
        }
        if !units.is_empty() {
            servers.push(self.spawn_units(plan, programs, units, stop.clone()));
        }
        let now = SystemTime::now();
        let usage = self.usage.pod(&key);
        for c in &plan.containers {
            let Some(program) = programs.get(&c.name) else {
                continue;
            };
            let container_usage = usage.as_ref().and_then(|u| u.container(&c.name)).cloned();
            if program.kind().serves_http() {
                if let Some(u) = &container_usage {
                    u.set_started(now);
                }
                self.reports.container(
                    &key,
                    &c.name,
                    ContainerState::Running { started_at: now },
                    true,
                    0,
                    Some(program.digest().to_string()),
                );
                let ports: Vec<String> = c.listen.iter().map(|a| a.to_string()).collect();
                self.reports.event(
                    &key,
                    EventType::Normal,
                    "Started",
                    format!(
                        "Started container {}: {} serving on {}",
                        c.name,
                        program.kind(),
                        ports.join(", ")
                    ),
                );
                continue;
            }
            let spec = CommandSpec {
                pod: key.clone(),
                container: c.name.clone(),
                program: program.clone(),
                args: c.args.clone(),
                env: c.env.clone(),
                mounts: c.mounts.clone(),
                allowed_hosts: c.allowed_hosts.clone(),
                log: self.logs.container(&key, &c.name),
                limits: self.limits_of(&key, c),
                meter: container_usage,
                metrics: Some(self.metrics.container(&key, &c.name)),
            };
            handles.push(tokio::spawn(run_container(
                self.runtime.clone(),
                spec,
                restart,
                self.config.restart_backoff,
                self.reports.clone(),
                self.logs.clone(),
                stop.clone(),
                self.command_restarts(&key, &c.name),
            )));
        }
        self.reports.phase(&key, Phase::Running, None, None);
        let reports = self.reports.clone();
        let pod = key.clone();
        let pods = self.pods.clone();
        let usage = self.usage.clone();
        let metrics = self.metrics.clone();
        let task = tokio::spawn(async move {
            let serving = !servers.is_empty();
            let mut codes = Vec::new();
            for h in handles {
                codes.push(h.await.ok().flatten());
            }
            // A pod that serves never finishes on its own: its servers end only when it stops.
            for s in servers {
                let _ = s.await;
            }
            if serving || codes.iter().any(Option::is_none) {
                return; // stopped, not finished
            }
            // Finished: nothing of the pod runs, so the supervisor forgets it.
            pods.lock().unwrap_or_else(|p| p.into_inner()).remove(&pod);
            usage.remove(&pod);
            metrics.remove_pod(&pod);
            let failed = codes.iter().flatten().filter(|c| **c != 0).count();
            if failed == 0 {
                reports.phase(&pod, Phase::Succeeded, Some("Completed"), None);
            } else {
                reports.phase(
                    &pod,
                    Phase::Failed,
                    Some("Error"),
                    Some(format!("{failed} container(s) exited with a non-zero code")),
                );
            }
        });
        self.install(&key, task);
        Ok(Started {
            key,
            listen,
            routes,
            warnings: vec![],
            digests: vec![],
        })
    }

    /// Gives a reserved pod its task. A pod stopped while it was starting has no reservation
    /// left: its task (already told to stop) is cut.
    fn install(&self, key: &PodKey, task: JoinHandle<()>) {
        let mut pods = self.pods.lock().unwrap_or_else(|p| p.into_inner());
        match pods.get_mut(key) {
            Some(r) if r.task.is_none() => r.task = Some(task),
            _ => task.abort(),
        }
    }

    /// Stops a pod: listeners stop accepting, in-flight requests get `grace`, commands are
    /// cancelled. Returns once nothing of the pod runs and its port is free.
    pub async fn stop(&self, key: &PodKey, grace: Duration) -> bool {
        self.restarts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
        let running = self
            .pods
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
        let Some(Running { stop, task }) = running else {
            return false;
        };
        self.reports.event(
            key,
            EventType::Normal,
            "Killing",
            "Stopping pod".to_string(),
        );
        stop.cancel();
        if let Some(mut task) = task
            && tokio::time::timeout(grace + Duration::from_secs(1), &mut task)
                .await
                .is_err()
        {
            task.abort();
            let _ = task.await;
        }
        self.usage.remove(key);
        self.metrics.remove_pod(key);
        true
    }

    /// Stops every pod.
    pub async fn stop_all(&self, grace: Duration) {
        let keys: Vec<PodKey> = self
            .pods
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect();
        let stops = keys.iter().map(|k| self.stop(k, grace));
        futures::future::join_all(stops).await;
        self.logs.flush().await;
    }

    /// Resolves when no started pod has anything left running (all commands finished; WAGI pods
    /// never finish on their own).
    pub async fn finished(&self) {
        loop {
            if self.running().is_empty() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Where a pod's emptyDir volumes go under `data_dir`.
    /// What the runtime enforces for a container's `resources.limits`. A memory limit above the
    /// node's per-instance maximum gets that maximum, and the pod is told so in an Event.
    fn limits_of(&self, key: &PodKey, c: &ContainerPlan) -> runtime::Limits {
        let node = self.runtime.config().max_memory;
        let memory = c
            .resources
            .memory_limit
            .map(|m| usize::try_from(m).unwrap_or(usize::MAX));
        if let Some(m) = memory.filter(|m| *m > node) {
            self.reports.event(
                key,
                EventType::Warning,
                "MemoryLimitAboveNodeMaximum",
                format!(
                    "container {}: limits.memory is {m} bytes but this node gives an instance at most {node} (its --max-memory); instances get {node}",
                    c.name
                ),
            );
        }
        let tick = self.runtime.config().epoch_tick;
        runtime::Limits {
            memory,
            cpu: c
                .resources
                .cpu_limit
                .and_then(|m| runtime::CpuQuota::new(m, tick))
                .map(Arc::new),
        }
    }

    pub fn volume_dir(data_dir: &std::path::Path) -> PathBuf {
        data_dir.join("volumes")
    }
}

/// A request to restart one container of a running pod, as the kubelet restarts a container
/// whose liveness or startup probe failed: its routes stop serving (in-flight requests get
/// `grace`), it waits out the restart back-off, and its handlers are made again.
#[derive(Debug, Clone)]
pub struct Restart {
    pub container: String,
    /// The `startedAt` of the run that failed: a request about an earlier run is stale.
    pub since: SystemTime,
    /// The `Killing` Event's message (and the terminated state's).
    pub message: String,
    pub grace: Duration,
}

/// Restart requests queued per pod at most; beyond it a request is refused (the prober asks
/// again about the next run).
const RESTART_QUEUE: usize = 16;

/// Per running pod: where each container takes restart requests (its pod's servers, or its
/// command's run).
type Restarts = Arc<Mutex<BTreeMap<PodKey, Vec<(String, tokio::sync::mpsc::Sender<Restart>)>>>>;

/// One route of a served pod, kept so that its container's handler can be made again.
struct Route {
    container: String,
    pattern: wagi::routes::RoutePattern,
    entrypoint: String,
    argv: Option<String>,
    allowed_hosts: Arc<runtime::AllowList>,
    handler: Arc<Handler>,
}

impl Route {
    fn new(
        r: &crate::plan::RoutePlan,
        pattern: &wagi::routes::RoutePattern,
        entrypoint: &str,
        handler: &Arc<Handler>,
    ) -> Route {
        Route {
            container: r.container.clone(),
            pattern: pattern.clone(),
            entrypoint: entrypoint.to_string(),
            argv: r.argv.clone(),
            allowed_hosts: r.allowed_hosts.clone(),
            handler: handler.clone(),
        }
    }
}

/// A listener address of a pod, the routes served there, and the server serving them now.
struct Unit {
    addr: SocketAddr,
    routes: Vec<Route>,
    server: Option<Server>,
}

impl Unit {
    fn serves(&self, container: &str) -> bool {
        self.routes.iter().any(|r| r.container == container)
    }
}

/// A running server task; cut when dropped (so that nothing outlives the pod's task).
struct Server {
    task: JoinHandle<()>,
    stop: CancellationToken,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Server {
    /// Stops accepting at once; in-flight requests get `grace`, then are cut.
    async fn shut(mut self, grace: Duration) {
        self.stop.cancel();
        if tokio::time::timeout(grace, &mut self.task).await.is_err() {
            self.task.abort();
            let _ = (&mut self.task).await;
        }
    }
}

/// One container's runs under its pod's servers.
struct ContainerRuns {
    /// When the current run started (`None`: the first run, started with the pod).
    started_at: Option<SystemTime>,
    began: std::time::Instant,
    restarts: u32,
    delay: Duration,
    /// Killed under `restartPolicy: Never`: it does not run again.
    dead: bool,
}

/// The servers of one pod, which restart a container on request.
struct PodServers {
    sup: Supervisor,
    plan: Plan,
    programs: HashMap<String, Arc<Program>>,
    units: Vec<Unit>,
    runs: HashMap<String, ContainerRuns>,
    stop: CancellationToken,
}

/// Removes a pod's restart queue when its servers end.
struct Deregister {
    restarts: Restarts,
    key: PodKey,
    tx: tokio::sync::mpsc::Sender<Restart>,
}

impl Drop for Deregister {
    fn drop(&mut self) {
        let mut map = self.restarts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(v) = map.get_mut(&self.key) {
            v.retain(|(_, tx)| !tx.same_channel(&self.tx));
            if v.is_empty() {
                map.remove(&self.key);
            }
        }
    }
}

impl Supervisor {
    /// Serves each unit on its bound listener until `stop`, under one task that also restarts
    /// a container when [`Supervisor::restart_container`] asks.
    fn spawn_units(
        &self,
        plan: &Plan,
        programs: &HashMap<String, Arc<Program>>,
        units: Vec<(Unit, TcpListener, RouteTable<Arc<Handler>>)>,
        stop: CancellationToken,
    ) -> JoinHandle<()> {
        let key = plan.key.clone();
        let mut live = Vec::new();
        let mut containers: Vec<String> = Vec::new();
        for (mut u, listener, table) in units {
            let token = stop.child_token();
            u.server = Some(Server {
                task: self.spawn_server(&key, listener, table, token.clone()),
                stop: token,
            });
            for r in &u.routes {
                if !containers.contains(&r.container) {
                    containers.push(r.container.clone());
                }
            }
            live.push(u);
        }
        let (tx, rx) = tokio::sync::mpsc::channel(RESTART_QUEUE);
        self.restarts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.clone())
            .or_default()
            .extend(containers.into_iter().map(|c| (c, tx.clone())));
        let gone = Deregister {
            restarts: self.restarts.clone(),
            key,
            tx,
        };
        let pod = PodServers {
            sup: self.clone(),
            plan: plan.clone(),
            programs: programs.clone(),
            units: live,
            runs: HashMap::new(),
            stop,
        };
        tokio::spawn(pod.run(rx, gone))
    }

    /// Asks the pod to restart `r.container` (its liveness or startup probe failed): its
    /// routes through the pod's servers, a command by killing its run. False when the pod does
    /// not run that container, or too many requests are queued.
    pub fn restart_container(&self, key: &PodKey, r: Restart) -> bool {
        let tx = {
            let map = self.restarts.lock().unwrap_or_else(|p| p.into_inner());
            let found = map
                .get(key)
                .and_then(|v| v.iter().find(|(c, _)| *c == r.container));
            match found {
                Some((_, tx)) => tx.clone(),
                None => return false,
            }
        };
        tx.try_send(r).is_ok()
    }

    /// A restart queue for command container `container` of `key`.
    fn command_restarts(
        &self,
        key: &PodKey,
        container: &str,
    ) -> tokio::sync::mpsc::Receiver<Restart> {
        let (tx, rx) = tokio::sync::mpsc::channel(RESTART_QUEUE);
        self.restarts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.clone())
            .or_default()
            .push((container.to_string(), tx));
        rx
    }
}

impl PodServers {
    async fn run(mut self, mut rx: tokio::sync::mpsc::Receiver<Restart>, _gone: Deregister) {
        let stop = self.stop.clone();
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                r = rx.recv() => match r {
                    Some(r) => self.restart(r).await,
                    None => {
                        stop.cancelled().await;
                        break;
                    }
                },
            }
        }
        // Every server was told to stop (its token is a child of `stop`): wait until they end.
        for u in &mut self.units {
            if let Some(s) = u.server.as_mut() {
                let _ = (&mut s.task).await;
            }
        }
    }

    /// Serves unit `i` again with its routes, except `without`'s (nothing when no route is
    /// left); the server serving it now is shut first (in-flight requests get `grace`).
    async fn swap(
        &mut self,
        i: usize,
        without: Option<&str>,
        grace: Duration,
    ) -> Result<(), StartError> {
        let key = self.plan.key.clone();
        let u = &mut self.units[i];
        if let Some(old) = u.server.take() {
            old.shut(grace).await;
        }
        let mut table = RouteTable::new();
        for r in u
            .routes
            .iter()
            .filter(|r| Some(r.container.as_str()) != without)
        {
            table
                .insert(r.pattern.clone(), r.handler.clone())
                .map_err(|e| StartError {
                    reason: "RouteConflict".into(),
                    message: format!("container {}: {e}", r.container),
                    container: Some(r.container.clone()),
                })?;
        }
        if table.is_empty() {
            return Ok(());
        }
        let listener = bind(u.addr).await?;
        let token = self.stop.child_token();
        u.server = Some(Server {
            task: self.sup.spawn_server(&key, listener, table, token.clone()),
            stop: token,
        });
        Ok(())
    }

    /// Makes the handlers of `name`'s routes again (fresh instances, a 0.3 service's pool).
    fn recreate(&mut self, name: &str) -> Result<(), StartError> {
        let key = self.plan.key.clone();
        let (Some(c), Some(program)) = (
            self.plan.containers.iter().find(|c| c.name == name),
            self.programs.get(name),
        ) else {
            return Ok(());
        };
        for u in &mut self.units {
            for r in u.routes.iter_mut().filter(|r| r.container == name) {
                let mut h = self.sup.handler(
                    c,
                    program,
                    r.entrypoint.clone(),
                    r.argv.clone(),
                    r.allowed_hosts.clone(),
                    &key,
                )?;
                // The route keeps its series across restarts.
                h.metrics = r.handler.metrics.clone();
                r.handler = Arc::new(h);
            }
        }
        Ok(())
    }

    /// Kills the container's routes, waits out its back-off, serves them again with new
    /// handlers; reported as the kubelet reports a restarted container.
    async fn restart(&mut self, r: Restart) {
        let name = r.container.clone();
        if !self.units.iter().any(|u| u.serves(&name)) {
            return;
        }
        let backoff = self.sup.config.restart_backoff;
        let run = self
            .runs
            .entry(name.clone())
            .or_insert_with(|| ContainerRuns {
                started_at: None,
                began: std::time::Instant::now(),
                restarts: 0,
                delay: backoff.initial,
                dead: false,
            });
        if run.dead || run.started_at.is_some_and(|t| r.since < t) {
            return; // about a run that is already gone
        }
        let started_at = run.started_at.unwrap_or(r.since);
        if run.began.elapsed() > Duration::from_secs(600) {
            run.delay = backoff.initial;
        }
        let mut restarts = run.restarts;
        let key = self.plan.key.clone();
        let reports = self.sup.reports.clone();
        let image_id = self.programs.get(&name).map(|p| p.digest().to_string());
        reports.event(&key, EventType::Normal, "Killing", r.message.clone());
        for i in 0..self.units.len() {
            if self.units[i].serves(&name)
                && let Err(e) = self.swap(i, Some(&name), r.grace).await
            {
                tracing::warn!(pod = %key, "serving the other containers of the pod: {e}");
            }
        }
        reports.container(
            &key,
            &name,
            ContainerState::Terminated {
                exit_code: 137,
                reason: "Error".into(),
                message: r.message.clone(),
                started_at,
                finished_at: SystemTime::now(),
            },
            false,
            restarts,
            image_id.clone(),
        );
        // A killed container exits non-zero: only `restartPolicy: Never` keeps it down, and the
        // pod fails once nothing of it runs.
        if matches!(
            self.plan.kind,
            PlanKind::Wasi {
                restart: crate::plan::RestartPolicy::Never
            }
        ) {
            if let Some(run) = self.runs.get_mut(&name) {
                run.dead = true;
            }
            let all_dead = self.plan.containers.iter().all(|c| {
                self.units.iter().any(|u| u.serves(&c.name))
                    && self.runs.get(&c.name).is_some_and(|r| r.dead)
            });
            if all_dead {
                reports.phase(
                    &key,
                    Phase::Failed,
                    Some("Error"),
                    Some(format!(
                        "container {name} failed its probe under restartPolicy Never"
                    )),
                );
            }
            return;
        }
        // The next run writes a new log; this one becomes the previous one.
        self.sup.logs.rotate(&key, &name).await;
        loop {
            let delay = self.runs.get(&name).map_or(backoff.initial, |r| r.delay);
            let pod = format!("{}_{}({})", key.name, key.namespace, key.uid);
            reports.event(
                &key,
                EventType::Warning,
                "BackOff",
                format!("Back-off restarting failed container {name} in pod {pod}"),
            );
            reports.container(
                &key,
                &name,
                ContainerState::Waiting {
                    reason: "CrashLoopBackOff".into(),
                    message: format!(
                        "back-off {}s restarting failed container={name} pod={pod}",
                        delay.as_secs_f32()
                    ),
                },
                false,
                restarts,
                image_id.clone(),
            );
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.stop.cancelled() => return,
            }
            if let Some(run) = self.runs.get_mut(&name) {
                run.delay = (run.delay * 2).min(backoff.max);
            }
            let mut failed = self.recreate(&name).err();
            if failed.is_none() {
                for i in 0..self.units.len() {
                    if self.units[i].serves(&name)
                        && let Err(e) = self.swap(i, None, r.grace).await
                    {
                        failed = Some(e);
                    }
                }
            }
            let Some(e) = failed else { break };
            reports.event(&key, EventType::Warning, "Failed", e.message.clone());
            reports.container(
                &key,
                &name,
                ContainerState::Waiting {
                    reason: e.reason.clone(),
                    message: e.message.clone(),
                },
                false,
                restarts,
                image_id.clone(),
            );
        }
        restarts += 1;
        let now = SystemTime::now();
        if let Some(u) = self.sup.usage.pod(&key)
            && let Some(c) = u.container(&name)
        {
            c.set_started(now);
        }
        if let Some(run) = self.runs.get_mut(&name) {
            run.restarts = restarts;
            run.started_at = Some(now);
            run.began = std::time::Instant::now();
        }
        reports.container(
            &key,
            &name,
            ContainerState::Running { started_at: now },
            true,
            restarts,
            image_id,
        );
        reports.event(
            &key,
            EventType::Normal,
            "Started",
            format!("Started container {name}"),
        );
    }
}
