//! The pods bound to this node: a kube-runtime Controller over a `spec.nodeName=<node>` watch
//! (never two reconciles of one pod at once, retries with backoff) drives the Supervisor.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, Preconditions};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use workload::plan::pod_key;
use workload::{ContainerState, EventType, Phase, PlanContext, PodKey, StartError, Supervisor};

use crate::resolve::{ApiObjects, resolve};
use crate::status::Statuses;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}

pub struct Context {
    pub client: kube::Client,
    pub sup: Supervisor,
    pub statuses: Statuses,
    pub plan: PlanContext,
    /// The pods this agent has taken in hand, and those waiting to pull an image again.
    pub handled: Mutex<Handled>,
    /// The node's `pods` capacity: admission rejects a pod beyond it (`OutOfpods`).
    pub max_pods: usize,
    /// Each pod's own address (`--pod-cidr`), when the node gives pods their own.
    pub pod_net: Option<Arc<crate::podnet::PodNet>>,
    /// The probes of the pods this node runs.
    pub prober: crate::probe::Prober,
    /// The node's allocatable CPU and memory: admission rejects a pod whose requests do not fit
    /// beside those of the pods it runs (`OutOfcpu`, `OutOfmemory`).
    pub allocatable: Allocatable,
    /// The pods bound to this node as the pod watch sees them, once [`run`] has started (the
    /// kubelet API's `/pods` and port-forward read it).
    pub store: std::sync::OnceLock<Store<Pod>>,
}

/// CPU (millicores) and memory (bytes) that pods may request, as the Node's `allocatable`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Allocatable {
    pub cpu: u64,
    pub memory: u64,
}

impl Allocatable {
    /// What `register::node_status` publishes: every CPU, and memory less the
    /// `memory.available` eviction threshold.
    pub fn of(
        host: &crate::host::HostInfo,
        eviction: &crate::eviction::EvictionHard,
    ) -> Allocatable {
        let memory = host.memory_kib.saturating_mul(1024);
        Allocatable {
            cpu: host.cpus as u64 * 1000,
            memory: memory
                .saturating_sub(eviction.memory_available.map_or(0, |t| t.min_of(memory))),
        }
    }
}

/// A pod's CPU (millicores) and memory (bytes) requests, as the scheduler sums them: its
/// containers' requests (defaulting to their limits), or its largest init container's when that
/// is more. An unreadable quantity counts as 0 here; planning fails the pod with the reason.
pub fn pod_requests(pod: &Pod) -> (u64, u64) {
    let Some(spec) = &pod.spec else {
        return (0, 0);
    };
    let of = |c: &k8s_openapi::api::core::v1::Container, name: &str, cpu: bool| -> u64 {
        let r = c.resources.as_ref();
        let q = r
            .and_then(|r| r.requests.as_ref())
            .and_then(|m| m.get(name))
            .or_else(|| r.and_then(|r| r.limits.as_ref()).and_then(|m| m.get(name)));
        q.and_then(|q| {
            if cpu {
                workload::quantity::milli_value(&q.0).ok()
            } else {
                workload::quantity::value(&q.0).ok()
            }
        })
        .unwrap_or(0)
    };
    let sum = |name: &str, cpu: bool| -> u64 {
        let main: u64 = spec.containers.iter().map(|c| of(c, name, cpu)).sum();
        let init = spec
            .init_containers
            .iter()
            .flatten()
            .map(|c| of(c, name, cpu))
            .max()
            .unwrap_or(0);
        main.max(init)
    };
    (sum("cpu", true), sum("memory", false))
}

/// Uids of the pods this agent has taken in hand (started or tried to), and the image pull
/// back-off of the pods whose pull failed.
#[derive(Default)]
pub struct Handled {
    uids: BTreeSet<String>,
    pulls: BTreeMap<String, PullBackoff>,
    /// CPU and memory requests of the admitted pods, by uid.
    requests: BTreeMap<String, (u64, u64)>,
}

impl Handled {
    pub fn contains(&self, uid: &str) -> bool {
        self.uids.contains(uid)
    }
    pub fn insert(&mut self, uid: String) {
        self.uids.insert(uid);
    }
    pub fn remove(&mut self, uid: &str) {
        self.uids.remove(uid);
        self.requests.remove(uid);
    }
}

/// A pod whose image pull failed: as the kubelet, it waits with `ErrImagePull`, then
/// `ImagePullBackOff` until `retry_at`; the delay doubles from 10 s to 5 min.
struct PullBackoff {
    backoff: oci::Backoff,
    failed_at: Instant,
    retry_at: Instant,
    container: String,
    image: String,
    error: String,
    /// Whether the pod was shown in ImagePullBackOff since the last failure.
    shown: bool,
}

/// How long `ErrImagePull` shows before `ImagePullBackOff`.
const ERR_IMAGE_PULL_SHOWN: Duration = Duration::from_secs(2);

impl Context {
    fn handled(&self) -> std::sync::MutexGuard<'_, Handled> {
        self.handled.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn grace_of(pod: &Pod) -> Duration {
    let secs = pod
        .metadata
        .deletion_grace_period_seconds
        .or_else(|| {
            pod.spec
                .as_ref()
                .and_then(|s| s.termination_grace_period_seconds)
        })
        .unwrap_or(30);
    Duration::from_secs(secs.clamp(0, 3600) as u64)
}

fn is_terminal(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

/// The kubelet's admission message when the node already runs `max_pods` pods (those running,
/// and those waiting to pull their image again), or None when the pod fits.
fn over_capacity(ctx: &Context) -> Option<String> {
    let used = ctx.sup.running().len() + ctx.handled().pulls.len();
    (used >= ctx.max_pods).then(|| {
        format!(
            "Pod was rejected: Node didn't have enough resource: pods, requested: 1, used: {used}, capacity: {}",
            ctx.max_pods
        )
    })
}

/// The kubelet's admission for CPU and memory: the pod's requests must fit in allocatable
/// beside those of the pods this node runs (or will run again after a pull back-off). Returns
/// the reason (`OutOfcpu`, `OutOfmemory`) and message, or None when the pod fits.
fn over_resources(ctx: &Context, requests: (u64, u64)) -> Option<(&'static str, String)> {
    let running: HashSet<String> = ctx.sup.running().into_iter().map(|k| k.uid).collect();
    let handled = ctx.handled();
    let (mut cpu, mut memory) = (0u64, 0u64);
    for (uid, (c, m)) in &handled.requests {
        if running.contains(uid) || handled.pulls.contains_key(uid) {
            cpu = cpu.saturating_add(*c);
            memory = memory.saturating_add(*m);
        }
    }
    let alloc = ctx.allocatable;
    let short = |name: &str, requested: u64, used: u64, capacity: u64| {
        format!(
            "Pod was rejected: Node didn't have enough resource: {name}, requested: {requested}, used: {used}, capacity: {capacity}"
        )
    };
    if requests.0 > 0 && cpu.saturating_add(requests.0) > alloc.cpu {
        return Some(("OutOfcpu", short("cpu", requests.0, cpu, alloc.cpu)));
    }
    if requests.1 > 0 && memory.saturating_add(requests.1) > alloc.memory {
        return Some((
            "OutOfmemory",
            short("memory", requests.1, memory, alloc.memory),
        ));
    }
    None
}

async fn reconcile(pod: Arc<Pod>, ctx: Arc<Context>) -> Result<Action, Error> {
    let key = pod_key(&pod);
    if pod.metadata.deletion_timestamp.is_some() {
        delete(&pod, &key, &ctx).await?;
        return Ok(Action::await_change());
    }
    if ctx.handled().contains(&key.uid) || is_terminal(&pod) {
        return Ok(Action::await_change());
    }
    ctx.statuses.track(&key, &pod);
    if let Some(message) = over_capacity(&ctx) {
        // As the kubelet's admission: the pod is Failed with reason OutOfpods and an Event.
        tracing::warn!(pod = %key, "{message}");
        ctx.handled().insert(key.uid.clone());
        ctx.statuses
            .event(&key, EventType::Warning, "OutOfpods", &message);
        ctx.sup
            .reporter()
            .phase(&key, Phase::Failed, Some("OutOfpods"), Some(message));
        return Ok(Action::await_change());
    }
    let requests = pod_requests(&pod);
    if let Some((reason, message)) = over_resources(&ctx, requests) {
        tracing::warn!(pod = %key, "{message}");
        ctx.handled().insert(key.uid.clone());
        ctx.statuses
            .event(&key, EventType::Warning, reason, &message);
        ctx.sup
            .reporter()
            .phase(&key, Phase::Failed, Some(reason), Some(message));
        return Ok(Action::await_change());
    }
    {
        let mut handled = ctx.handled();
        handled.insert(key.uid.clone());
        handled.requests.insert(key.uid.clone(), requests);
    }
    // A pod this node already ran (the agent restarted) keeps the Running status it has until
    // the supervisor reports it started again: no flip back to Pending in between.
    let readopted = pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
    if !readopted {
        ctx.statuses.mark(&key).await;
    }
    let mut pod = without_service_account_token(&pod);
    let Some(plan) = pod_plan(&ctx, &key, &pod).await else {
        ctx.handled().remove(&key.uid);
        return Ok(Action::requeue(Duration::from_secs(10)));
    };
    // The address the pod serves on, for its fieldRefs to status.podIP (a hostNetwork pod's is
    // the node's).
    let host_network = pod
        .spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false);
    if let (false, Some(ip)) = (host_network, plan.bind_ip) {
        pod.status.get_or_insert_with(Default::default).pod_ip = Some(ip.to_string());
    }
    let node_ip = ctx
        .plan
        .node_ip
        .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED.into());
    let mut objects = ApiObjects::new(ctx.client.clone());
    let secret_dir = ctx
        .plan
        .secret_dir
        .clone()
        .unwrap_or_else(|| ctx.plan.volume_dir.clone());
    let resolved = match resolve(
        &pod,
        &mut objects,
        node_ip,
        &ctx.plan.volume_dir,
        &secret_dir,
    )
    .await
    {
        Ok(r) => r,
        Err(e) => {
            // As the kubelet: the pod waits with CreateContainerConfigError and is retried.
            tracing::warn!(pod = %key, "{e}");
            ctx.statuses
                .waiting(&key, "CreateContainerConfigError", &e.0);
            ctx.statuses
                .event(&key, EventType::Warning, "Failed", &format!("Error: {e}"));
            ctx.statuses.mark(&key).await;
            ctx.handled().remove(&key.uid);
            return Ok(Action::requeue(Duration::from_secs(10)));
        }
    };
    for w in &resolved.warnings {
        ctx.statuses.event(
            &key,
            EventType::Warning,
            "FailedToRetrieveImagePullSecret",
            w,
        );
    }
    if let Some(wait) = pull_back_off(&key, &ctx) {
        ctx.handled().remove(&key.uid);
        return Ok(Action::requeue(wait));
    }
    match ctx
        .sup
        .try_start(&resolved.pod, &plan, resolved.creds.as_ref())
        .await
    {
        Ok(s) => {
            ctx.handled().pulls.remove(&key.uid);
            tracing::info!(pod = %key, listen = ?s.listen, "pod started");
            ctx.prober.add(&key, &resolved.pod, s.listen, &ctx.plan);
        }
        Err(e) if e.is_image_pull() => {
            tracing::warn!(pod = %key, "image pull failed: {e}");
            pull_failed(&key, &pod, &e, &ctx);
            ctx.handled().remove(&key.uid);
            return Ok(Action::requeue(ERR_IMAGE_PULL_SHOWN));
        }
        Err(e) => {
            ctx.handled().pulls.remove(&key.uid);
            ctx.sup.report_failure(&key, &e);
            tracing::warn!(pod = %key, "pod failed to start: {e}");
        }
    }
    Ok(Action::await_change())
}

/// The plan context of `pod`: the node's, or with `--pod-cidr` one whose listeners bind the
/// pod's own address (which becomes its podIP). `None` when no address could be had: the pod
/// waits (a Warning Event says why, as the kubelet's FailedCreatePodSandBox) and is retried.
async fn pod_plan<'a>(
    ctx: &'a Context,
    key: &PodKey,
    pod: &Pod,
) -> Option<std::borrow::Cow<'a, PlanContext>> {
    let host_network = pod
        .spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false);
    let Some(net) = ctx.pod_net.as_ref().filter(|_| !host_network) else {
        return Some(std::borrow::Cow::Borrowed(&ctx.plan));
    };
    let previous = pod
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.as_deref())
        .and_then(|ip| ip.parse().ok());
    match net.assign(&key.uid, previous).await {
        Ok(ip) => {
            ctx.statuses.set_pod_ip(key, ip);
            Some(std::borrow::Cow::Owned(PlanContext {
                bind_ip: Some(ip),
                pod_address: Some(ip),
                ..ctx.plan.clone()
            }))
        }
        Err(e) => {
            tracing::warn!(pod = %key, "no pod address: {e}");
            ctx.statuses.event(
                key,
                EventType::Warning,
                "FailedCreatePodSandBox",
                &format!("Failed to give the pod an address: {e}"),
            );
            None
        }
    }
}

/// The container waits for `reason`; reported through the supervisor's channel so that it
/// lands after what the supervisor reported of the same attempt.
fn report_waiting(ctx: &Context, key: &PodKey, container: &str, reason: &str, message: String) {
    ctx.sup.reporter().container(
        key,
        container,
        ContainerState::Waiting {
            reason: reason.into(),
            message,
        },
        false,
        0,
        None,
    );
}

/// A failed pull: `ErrImagePull` and the kubelet's Events; the next try waits for the back-off.
fn pull_failed(key: &PodKey, pod: &Pod, e: &StartError, ctx: &Context) {
    let container = e.container.clone().unwrap_or_default();
    let image = pod
        .spec
        .as_ref()
        .and_then(|s| s.containers.iter().find(|c| c.name == container))
        .and_then(|c| c.image.clone())
        .unwrap_or_default();
    let now = Instant::now();
    {
        let mut handled = ctx.handled();
        let entry = handled
            .pulls
            .entry(key.uid.clone())
            .or_insert_with(|| PullBackoff {
                backoff: oci::Backoff::kubelet(),
                failed_at: now,
                retry_at: now,
                container: container.clone(),
                image: image.clone(),
                error: String::new(),
                shown: false,
            });
        let delay = entry.backoff.next_delay();
        entry.failed_at = now;
        entry.retry_at = now + delay;
        entry.container = container.clone();
        entry.image = image.clone();
        entry.error = e.message.clone();
        entry.shown = false;
    }
    report_waiting(ctx, key, &container, "ErrImagePull", e.message.clone());
    let r = ctx.sup.reporter();
    r.event(
        key,
        EventType::Warning,
        "Failed",
        format!("Failed to pull image {image:?}: {}", e.message),
    );
    r.event(key, EventType::Warning, "Failed", "Error: ErrImagePull");
}

/// While the pod's pull back-off runs: shows `ImagePullBackOff` (once `ErrImagePull` has been
/// shown a moment) and returns how long to wait; `None` when it is time to pull again.
fn pull_back_off(key: &PodKey, ctx: &Context) -> Option<Duration> {
    let now = Instant::now();
    let (container, message, first) = {
        let mut handled = ctx.handled();
        let b = handled.pulls.get_mut(&key.uid)?;
        if now >= b.retry_at {
            return None;
        }
        let shown_err = b.failed_at + ERR_IMAGE_PULL_SHOWN;
        if now < shown_err {
            return Some(shown_err - now);
        }
        let first = !b.shown;
        b.shown = true;
        (
            b.container.clone(),
            format!(
                "Back-off pulling image {:?}: ErrImagePull: {}",
                b.image, b.error
            ),
            first.then(|| b.image.clone()),
        )
    };
    let wait = ctx
        .handled()
        .pulls
        .get(&key.uid)
        .map_or(Duration::ZERO, |b| {
            b.retry_at.saturating_duration_since(now)
        });
    if let Some(image) = first {
        report_waiting(ctx, key, &container, "ImagePullBackOff", message);
        let r = ctx.sup.reporter();
        r.event(
            key,
            EventType::Normal,
            "BackOff",
            format!("Back-off pulling image {image:?}"),
        );
        r.event(key, EventType::Warning, "Failed", "Error: ImagePullBackOff");
    }
    Some(wait)
}

/// The pod without the projected `kube-api-access-*` volume the ServiceAccount admission plugin
/// adds to every pod (token, `kube-root-ca.crt`, namespace): wasm modules get no API credentials
/// from this node yet, so it is left out rather than failing the pod. Other projected volumes
/// stay, and the planner reports them as unsupported.
pub fn without_service_account_token(pod: &Pod) -> Pod {
    let mut pod = pod.clone();
    let Some(spec) = pod.spec.as_mut() else {
        return pod;
    };
    let Some(volumes) = spec.volumes.as_mut() else {
        return pod;
    };
    let is_token = |v: &k8s_openapi::api::core::v1::Volume| {
        v.projected.as_ref().is_some_and(|p| {
            let sources = p.sources.as_deref().unwrap_or_default();
            sources.iter().any(|s| s.service_account_token.is_some())
                && sources.iter().all(|s| {
                    s.service_account_token.is_some()
                        || s.config_map
                            .as_ref()
                            .is_some_and(|c| c.name == "kube-root-ca.crt")
                        || s.downward_api.is_some()
                })
        })
    };
    let dropped: HashSet<String> = volumes
        .iter()
        .filter(|v| is_token(v))
        .map(|v| v.name.clone())
        .collect();
    if dropped.is_empty() {
        return pod;
    }
    volumes.retain(|v| !dropped.contains(&v.name));
    for c in spec
        .containers
        .iter_mut()
        .chain(spec.init_containers.iter_mut().flatten())
    {
        if let Some(mounts) = c.volume_mounts.as_mut() {
            mounts.retain(|m| !dropped.contains(&m.name));
        }
    }
    pod
}

/// Graceful deletion as the kubelet does it: stop within the grace period, write the final
/// status, then delete with grace 0 and a UID precondition.
async fn delete(pod: &Pod, key: &PodKey, ctx: &Context) -> Result<(), Error> {
    let grace = grace_of(pod);
    // As the kubelet's: no liveness restart of a pod being deleted.
    ctx.prober.remove(key);
    ctx.sup.stop(key, grace).await;
    ctx.statuses.track(key, pod);
    ctx.statuses.terminate(key);
    // The final status is written (by the sink) before the object goes, as the kubelet does.
    ctx.statuses.written(key, Duration::from_secs(30)).await?;
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &key.namespace);
    let dp = DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: Some(Preconditions {
            uid: Some(key.uid.clone()),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    match pods.delete(&key.name, &dp).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
        Err(e) => return Err(e.into()),
    }
    forget_pod(ctx, key).await;
    tracing::info!(pod = %key, "pod deleted");
    Ok(())
}

/// Everything of a pod whose object is gone: whatever still runs (cut at once), its status
/// record, pull back-off, logs and volumes. The one cleanup of graceful deletion, force
/// deletion (grace 0) and pods deleted while the agent was away.
async fn forget_pod(ctx: &Context, key: &PodKey) {
    ctx.prober.remove(key);
    ctx.sup.stop(key, Duration::ZERO).await;
    ctx.statuses.forget(key);
    if let Some(net) = &ctx.pod_net {
        net.release(&key.uid).await;
    }
    {
        let mut handled = ctx.handled();
        handled.remove(&key.uid);
        handled.pulls.remove(&key.uid);
    }
    ctx.sup.logs().remove_pod(key).await;
    remove_volumes(ctx, key).await;
}

/// Removes a pod's emptyDir, configMap and secret volumes.
async fn remove_volumes(ctx: &Context, key: &PodKey) {
    if key.uid.is_empty() {
        return;
    }
    let _ = tokio::fs::remove_dir_all(ctx.plan.volume_dir.join(&key.uid)).await;
    if let Some(secrets) = &ctx.plan.secret_dir {
        let _ = tokio::fs::remove_dir_all(secrets.join(&key.uid)).await;
    }
}

fn error_policy(pod: Arc<Pod>, e: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(pod = ?pod.metadata.name, "reconcile failed: {e}; retrying");
    Action::requeue(Duration::from_secs(2))
}

/// Forgets pods this agent holds whose object is gone (force-deleted, or deleted while the
/// agent was busy or away): once the pod store has synced, then every 5 s. The first sweep also
/// removes log and volume folders of pods no longer in the API (deleted while the agent was
/// down).
async fn sweep_orphans(store: Store<Pod>, ctx: Arc<Context>) {
    if store.wait_until_ready().await.is_err() {
        return;
    }
    let mut first = true;
    loop {
        let live: HashSet<String> = store
            .state()
            .iter()
            .filter_map(|p| p.metadata.uid.clone())
            .collect();
        let mut held: HashSet<PodKey> = ctx.sup.running().into_iter().collect();
        held.extend(ctx.statuses.keys());
        for key in held {
            if !live.contains(&key.uid) {
                tracing::info!(pod = %key, "pod object is gone; forgetting it");
                forget_pod(&ctx, &key).await;
            }
        }
        if std::mem::take(&mut first) {
            remove_stale_dirs(&ctx, &live).await;
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

/// Removes log folders (`<ns>_<name>_<uid>`) and volume folders (`<uid>`) of pods that are
/// neither in the API nor held by this agent.
async fn remove_stale_dirs(ctx: &Context, live: &HashSet<String>) {
    let mut keep = live.clone();
    keep.extend(ctx.statuses.keys().into_iter().map(|k| k.uid));
    keep.extend(ctx.sup.running().into_iter().map(|k| k.uid));
    let logs = ctx.sup.logs().root().to_path_buf();
    let mut roots = vec![ctx.plan.volume_dir.clone()];
    roots.extend(ctx.plan.secret_dir.clone());
    let removed = tokio::task::spawn_blocking(move || {
        let mut removed = 0usize;
        let uid_of_log = |name: &str| name.rsplit('_').next().map(String::from);
        for (root, is_log) in
            std::iter::once((logs, true)).chain(roots.into_iter().map(|r| (r, false)))
        {
            let Ok(entries) = std::fs::read_dir(&root) else {
                continue;
            };
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let uid = if is_log {
                    uid_of_log(&name)
                } else {
                    Some(name.clone())
                };
                if let Some(uid) = uid
                    && !keep.contains(&uid)
                    && e.file_type().is_ok_and(|t| t.is_dir())
                    && std::fs::remove_dir_all(e.path()).is_ok()
                {
                    removed += 1;
                }
            }
        }
        removed
    })
    .await
    .unwrap_or(0);
    if removed > 0 {
        tracing::info!(
            removed,
            "removed the logs and volumes of pods deleted while the agent was away"
        );
    }
}

/// Runs the pod controller until `shutdown` resolves.
pub async fn run(
    node_name: &str,
    ctx: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let pods: Api<Pod> = Api::all(ctx.client.clone());
    let wc = watcher::Config::default().fields(&format!("spec.nodeName={node_name}"));
    let controller = Controller::new(pods, wc).graceful_shutdown_on(shutdown);
    let sweeper = tokio::spawn(sweep_orphans(controller.store(), ctx.clone()));
    let gone = ctx.clone();
    let store = controller.store();
    let _ = ctx.store.set(store.clone());
    controller
        .run(reconcile, error_policy, ctx)
        .for_each(|r| {
            let ctx = gone.clone();
            let store = store.clone();
            async move {
                match r {
                    // The pod watch failed (API server away, ...): retried with back-off.
                    Err(kube::runtime::controller::Error::QueueError(e)) => {
                        tracing::warn!("watching the pods of this node: {e}; retrying")
                    }
                    // A pod deleted without grace (`--force --grace-period=0`) is gone from the
                    // store before a reconcile sees it: clean up at once.
                    Err(kube::runtime::controller::Error::ObjectNotFound(r)) => {
                        let ns = r.namespace.clone().unwrap_or_default();
                        // Not a pod of the same name created since (its uid is in the store).
                        if let Some(key) = ctx.statuses.find(&ns, &r.name)
                            && !store
                                .state()
                                .iter()
                                .any(|p| p.metadata.uid.as_deref() == Some(key.uid.as_str()))
                        {
                            tracing::info!(pod = %key, "pod object is gone; forgetting it");
                            forget_pod(&ctx, &key).await;
                        }
                    }
                    Err(e) => tracing::debug!("pod controller: {e}"),
                    Ok(_) => {}
                }
            }
        })
        .await;
    sweeper.abort();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_only_the_service_account_token_volume() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "default", "uid": "u"},
            "spec": {
                "containers": [{"name": "c", "image": "x", "volumeMounts": [
                    {"name": "kube-api-access-abcde", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"},
                    {"name": "data", "mountPath": "/data"},
                ]}],
                "volumes": [
                    {"name": "kube-api-access-abcde", "projected": {"sources": [
                        {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}},
                        {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                        {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}]}},
                    ]}},
                    {"name": "data", "emptyDir": {}},
                ],
            },
        }))
        .unwrap();
        let p = without_service_account_token(&pod);
        let spec = p.spec.unwrap();
        let vols: Vec<_> = spec.volumes.unwrap().into_iter().map(|v| v.name).collect();
        assert_eq!(vols, ["data"]);
        let mounts: Vec<_> = spec.containers[0]
            .volume_mounts
            .clone()
            .unwrap()
            .into_iter()
            .map(|m| m.name)
            .collect();
        assert_eq!(mounts, ["data"]);
    }
}
