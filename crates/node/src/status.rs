//! The node's status sink: the Supervisor's reports become pod status (PATCH `pods/<p>/status`)
//! and Events, as the kubelet writes them. The sink is the only writer of pod status: the
//! reconciler changes records and asks the sink to write them ([`Statuses::mark`],
//! [`Statuses::written`]), so two writes of one pod never race. Events are core/v1 Events as the
//! kubelet writes them (the Node authorizer lets a node write those, not events.k8s.io ones, so
//! kube-runtime's `Recorder` is refused): stamped when they happened, a repeat of the same
//! reason and message within 10 minutes folded into the first one (`count`, `lastTimestamp`) as
//! the kubelet's event correlator does, published by tasks of their own (several lanes, each
//! pod's Events in order in one lane) behind bounded queues so that a slow API server delays
//! neither status nor pods.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Event, Pod};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::sync::oneshot;
use workload::{ContainerState, EventType, Phase, PodKey, Report, Reports};

use crate::time;

#[derive(Debug, Clone)]
struct ContainerRecord {
    state: ContainerState,
    last_state: Option<ContainerState>,
    ready: bool,
    restart_count: u32,
    image_id: Option<String>,
    /// The prober's last verdict (about the run that started at its `since`).
    probe: Option<ProbeView>,
}

#[derive(Debug, Clone)]
struct ProbeView {
    since: SystemTime,
    started: bool,
    ready: bool,
    note: Option<String>,
}

/// Which probes gate a container: a startup probe gates `started` (and so readiness), a
/// readiness probe gates `ready` (the container starts unready, as the kubelet's).
#[derive(Debug, Clone, Copy, Default)]
struct Gates {
    startup: bool,
    readiness: bool,
}

/// What the prober reads of a container: when its current run started (`None` while it does
/// not run), and whether the pod is done (Succeeded or Failed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContainerRun {
    pub running_since: Option<SystemTime>,
    pub pod_terminal: bool,
}

/// What the node knows of one pod's status.
#[derive(Debug, Clone)]
pub struct PodRecord {
    /// Container name and image, in spec order.
    containers: Vec<(String, String)>,
    records: HashMap<String, ContainerRecord>,
    phase: Phase,
    reason: Option<String>,
    message: Option<String>,
    start_time: SystemTime,
    /// Condition type -> (status, lastTransitionTime).
    conditions: HashMap<&'static str, (bool, SystemTime)>,
    /// Restarts counted before this agent took the pod in hand (a restarted agent re-adopting
    /// it), per container; the Supervisor counts from 0 again.
    restarts_before: HashMap<String, u32>,
    /// The probes of each container that gate its `started` and `ready`.
    gates: HashMap<String, Gates>,
    /// `spec.hostNetwork`: such a pod's IP is the node's, as the kubelet reports it.
    host_network: bool,
    /// The pod's own address (`--pod-cidr`), when it has one.
    pod_ip: Option<IpAddr>,
}

const CONDITIONS: [&str; 4] = [
    "PodReadyToStartContainers",
    "Initialized",
    "ContainersReady",
    "Ready",
];

impl PodRecord {
    /// A record for `pod`. A pod that already has a status (this agent was restarted and
    /// re-adopts it) keeps its `startTime`, its conditions' transition times and its containers'
    /// restart counts.
    pub fn new(pod: &Pod, now: SystemTime) -> PodRecord {
        let containers = pod
            .spec
            .as_ref()
            .map(|s| {
                s.containers
                    .iter()
                    .map(|c| (c.name.clone(), c.image.clone().unwrap_or_default()))
                    .collect()
            })
            .unwrap_or_default();
        let status = pod.status.as_ref();
        let start_time = status
            .and_then(|s| s.start_time.as_ref())
            .map_or(now, |t| SystemTime::from(t.0));
        let mut conditions = HashMap::new();
        for c in status
            .and_then(|s| s.conditions.as_ref())
            .into_iter()
            .flatten()
        {
            let (Some(type_), Some(at)) = (
                CONDITIONS.iter().find(|t| **t == c.type_),
                c.last_transition_time
                    .as_ref()
                    .map(|t| SystemTime::from(t.0)),
            ) else {
                continue;
            };
            conditions.insert(*type_, (c.status == "True", at));
        }
        let restarts_before = status
            .and_then(|s| s.container_statuses.as_ref())
            .into_iter()
            .flatten()
            .map(|c| (c.name.clone(), u32::try_from(c.restart_count).unwrap_or(0)))
            .collect();
        PodRecord {
            containers,
            records: HashMap::new(),
            phase: Phase::Pending,
            reason: None,
            message: None,
            start_time,
            conditions,
            restarts_before,
            gates: pod
                .spec
                .iter()
                .flat_map(|s| &s.containers)
                .map(|c| {
                    let gates = Gates {
                        startup: c.startup_probe.is_some(),
                        readiness: c.readiness_probe.is_some(),
                    };
                    (c.name.clone(), gates)
                })
                .collect(),
            host_network: pod
                .spec
                .as_ref()
                .and_then(|s| s.host_network)
                .unwrap_or(false),
            pod_ip: None,
        }
    }

    /// Applies a container or pod report (events are not status).
    pub fn apply(&mut self, report: &Report) {
        match report {
            Report::Container {
                container,
                state,
                ready,
                restart_count,
                image_id,
                ..
            } => {
                let rec =
                    self.records
                        .entry(container.clone())
                        .or_insert_with(|| ContainerRecord {
                            state: state.clone(),
                            last_state: None,
                            ready: false,
                            restart_count: 0,
                            image_id: None,
                            probe: None,
                        });
                if matches!(rec.state, ContainerState::Terminated { .. })
                    && !matches!(state, ContainerState::Terminated { .. })
                {
                    rec.last_state = Some(rec.state.clone());
                }
                rec.state = state.clone();
                rec.ready = *ready;
                rec.restart_count = *restart_count;
                if image_id.is_some() {
                    rec.image_id = image_id.clone();
                }
            }
            Report::Pod {
                phase,
                reason,
                message,
                ..
            } => {
                self.phase = *phase;
                self.reason = reason.clone();
                self.message = message.clone();
                // A pod that failed before its containers ran: they wait for the same reason
                // (`kubectl get pods` shows a container's waiting reason over the pod's).
                if *phase == Phase::Failed
                    && let Some(reason) = reason
                {
                    for rec in self.records.values_mut() {
                        if matches!(rec.state, ContainerState::Waiting { .. }) {
                            rec.state = ContainerState::Waiting {
                                reason: reason.clone(),
                                message: message.clone().unwrap_or_default(),
                            };
                        }
                    }
                }
            }
            Report::Probe {
                container,
                since,
                started,
                ready,
                note,
                ..
            } => {
                if let Some(rec) = self.records.get_mut(container) {
                    rec.probe = Some(ProbeView {
                        since: *since,
                        started: *started,
                        ready: *ready,
                        note: note.clone(),
                    });
                }
            }
            Report::Event { .. } => {}
        }
    }

    /// The pod was stopped for deletion: running containers become terminated.
    pub fn terminate(&mut self, now: SystemTime) {
        for (name, _) in &self.containers {
            let rec = self
                .records
                .entry(name.clone())
                .or_insert_with(|| ContainerRecord {
                    state: ContainerState::Waiting {
                        reason: "ContainerCreating".into(),
                        message: String::new(),
                    },
                    last_state: None,
                    ready: false,
                    restart_count: 0,
                    image_id: None,
                    probe: None,
                });
            rec.ready = false;
            match &rec.state {
                ContainerState::Running { started_at } => {
                    rec.state = ContainerState::Terminated {
                        exit_code: 0,
                        reason: "Completed".into(),
                        message: "stopped by wasinode for pod deletion".into(),
                        started_at: *started_at,
                        finished_at: now,
                    };
                }
                ContainerState::Waiting { .. } => {
                    rec.state = ContainerState::Terminated {
                        exit_code: 0,
                        reason: "ContainerStatusUnknown".into(),
                        message: "the pod was deleted before the container started".into(),
                        started_at: now,
                        finished_at: now,
                    };
                }
                ContainerState::Terminated { .. } => {}
            }
        }
        if self.phase != Phase::Failed {
            self.phase = Phase::Succeeded;
        }
    }

    /// The prober's verdict about the container's current run, if it has one.
    fn verdict(&self, name: &str) -> Option<&ProbeView> {
        let rec = self.records.get(name)?;
        match rec.state {
            ContainerState::Running { started_at } => {
                rec.probe.as_ref().filter(|p| p.since == started_at)
            }
            _ => None,
        }
    }

    /// Running, and past its startup probe if it has one (the status's `started`).
    fn started(&self, name: &str) -> bool {
        let running = self
            .records
            .get(name)
            .is_some_and(|r| matches!(r.state, ContainerState::Running { .. }));
        let gates = self.gates.get(name).copied().unwrap_or_default();
        running && (!gates.startup || self.verdict(name).is_some_and(|p| p.started))
    }

    /// Serving, started, and passing its readiness probe if it has one (the status's `ready`).
    fn ready(&self, name: &str) -> bool {
        let serving = self.records.get(name).is_some_and(|r| r.ready);
        let gates = self.gates.get(name).copied().unwrap_or_default();
        serving
            && self.started(name)
            && (!gates.readiness || self.verdict(name).is_some_and(|p| p.ready))
    }

    /// What the prober reads of container `name`.
    pub fn run_of(&self, name: &str) -> ContainerRun {
        let running_since = match self.records.get(name).map(|r| &r.state) {
            Some(ContainerState::Running { started_at }) => Some(*started_at),
            _ => None,
        };
        ContainerRun {
            running_since,
            pod_terminal: matches!(self.phase, Phase::Succeeded | Phase::Failed),
        }
    }

    /// The kubelet's message on a false Ready condition: the unready containers, and what the
    /// prober said of them.
    fn unready_message(&self) -> Option<String> {
        let unready: Vec<&str> = self
            .containers
            .iter()
            .map(|(n, _)| n.as_str())
            .filter(|n| !self.ready(n))
            .collect();
        if unready.is_empty() {
            return None;
        }
        let mut m = format!("containers with unready status: [{}]", unready.join(" "));
        for n in &unready {
            if let Some(note) = self.verdict(n).and_then(|p| p.note.as_deref()) {
                m.push_str(&format!("; {n}: {note}"));
            }
        }
        Some(m)
    }

    fn condition(&mut self, type_: &'static str, status: bool, now: SystemTime) -> Value {
        let entry = self.conditions.entry(type_).or_insert((status, now));
        if entry.0 != status {
            *entry = (status, now);
        }
        let mut c = json!({
            "type": type_,
            "status": if status { "True" } else { "False" },
            "lastTransitionTime": time(entry.1),
            "lastProbeTime": null,
        });
        if !status && matches!(type_, "Ready" | "ContainersReady") {
            let reason = match self.phase {
                Phase::Succeeded => "PodCompleted",
                Phase::Failed => "PodFailed",
                _ => "ContainersNotReady",
            };
            c["reason"] = json!(reason);
            if reason == "ContainersNotReady"
                && let Some(m) = self.unready_message()
            {
                c["message"] = json!(m);
            }
        }
        c
    }

    /// The `status` the kubelet would write now (a strategic merge patch body), for a node whose
    /// pods serve on its own address.
    pub fn status(&mut self, uid: &str, node_ip: IpAddr, now: SystemTime) -> Value {
        self.status_at(uid, node_ip, Some(node_ip), now)
    }

    /// The `status` the kubelet would write now: `hostIP` the node's address, `podIP` the
    /// address the pod's listeners serve on (`--pod-address`; the node's for a hostNetwork pod).
    pub fn status_at(
        &mut self,
        uid: &str,
        node_ip: IpAddr,
        pod_ip: Option<IpAddr>,
        now: SystemTime,
    ) -> Value {
        let terminal = matches!(self.phase, Phase::Succeeded | Phase::Failed);
        let all_ready =
            !self.containers.is_empty() && self.containers.iter().all(|(n, _)| self.ready(n));
        let ready = all_ready && self.phase == Phase::Running;
        let conditions = vec![
            self.condition("PodReadyToStartContainers", !terminal, now),
            self.condition("Initialized", true, now),
            self.condition("ContainersReady", ready, now),
            self.condition("Ready", ready, now),
        ];
        let statuses: Vec<Value> = self
            .containers
            .iter()
            .map(|(name, image)| {
                let rec = self.records.get(name);
                let state = match rec {
                    Some(r) => state_json(&r.state),
                    None if self.phase == Phase::Failed => json!({"waiting": {
                        "reason": self.reason.clone().unwrap_or_else(|| "Failed".into()),
                        "message": self.message.clone().unwrap_or_default(),
                    }}),
                    None => json!({"waiting": {"reason": "ContainerCreating"}}),
                };
                let image_id = rec.and_then(|r| r.image_id.clone()).unwrap_or_default();
                let mut s = json!({
                    "name": name,
                    "image": image,
                    "imageID": image_id,
                    "ready": self.ready(name),
                    "started": self.started(name),
                    "restartCount": rec.map_or(0, |r| r.restart_count)
                        + self.restarts_before.get(name).copied().unwrap_or(0),
                    "state": state,
                    "lastState": rec.and_then(|r| r.last_state.as_ref()).map_or(json!({}), state_json),
                });
                if !image_id.is_empty() {
                    s["containerID"] = json!(format!("wasm://{uid}/{name}"));
                }
                s
            })
            .collect();
        let ip = node_ip.to_string();
        let pod_ip = match (self.host_network, self.pod_ip) {
            (true, _) => Some(node_ip),
            (false, own) => own.or(pod_ip),
        };
        let mut body = json!({
            "metadata": {"uid": uid},
            "status": {
                "phase": phase_name(self.phase),
                "reason": self.reason,
                "message": self.message,
                "hostIP": ip,
                "hostIPs": [{"ip": ip}],
                "podIP": pod_ip.map(|ip| ip.to_string()),
                "podIPs": pod_ip.map(|ip| json!([{"ip": ip.to_string()}])),
                "startTime": time(self.start_time),
                "conditions": conditions,
                "containerStatuses": statuses,
            }
        });
        if pod_ip.is_none()
            && let Some(s) = body["status"].as_object_mut()
        {
            // No address yet: say nothing of it (a null would delete it in a merge patch).
            s.remove("podIP");
            s.remove("podIPs");
        }
        body
    }
}

fn phase_name(p: Phase) -> &'static str {
    match p {
        Phase::Pending => "Pending",
        Phase::Running => "Running",
        Phase::Succeeded => "Succeeded",
        Phase::Failed => "Failed",
    }
}

fn state_json(s: &ContainerState) -> Value {
    match s {
        ContainerState::Waiting { reason, message } => {
            let mut w = json!({"reason": reason});
            if !message.is_empty() {
                w["message"] = json!(message);
            }
            json!({"waiting": w})
        }
        ContainerState::Running { started_at } => {
            json!({"running": {"startedAt": time(*started_at)}})
        }
        ContainerState::Terminated {
            exit_code,
            reason,
            message,
            started_at,
            finished_at,
        } => {
            let mut t = json!({
                "exitCode": exit_code, "reason": reason,
                "startedAt": time(*started_at), "finishedAt": time(*finished_at),
            });
            if !message.is_empty() {
                t["message"] = json!(message);
            }
            json!({"terminated": t})
        }
    }
}

/// Pod status records shared by the reconciler and the report sink, and the writer of both.
#[derive(Clone)]
pub struct Statuses {
    client: kube::Client,
    node_name: String,
    node_ip: IpAddr,
    /// The address pods serve on (`--pod-address`, else `node_ip`): their `podIP`. `None` when
    /// each pod gets its own (`--pod-cidr`): a pod has no podIP until it has its address.
    pod_ip: Option<IpAddr>,
    pods: Arc<Mutex<BTreeMap<PodKey, PodRecord>>>,
    to_sink: mpsc::Sender<SinkMsg>,
    /// One queue per publishing lane; a pod's Events all go through the lane of its uid.
    events: Arc<[mpsc::Sender<EventMsg>]>,
    dropped_events: Arc<std::sync::atomic::AtomicU64>,
}

/// What the reconciler asks of the sink.
enum SinkMsg {
    /// Write this pod's status; tell `done` once written (or why not).
    Write(PodKey, Option<oneshot::Sender<kube::Result<()>>>),
    /// Write every pending status, then wait for the queued Events; then tell `done`.
    Flush(oneshot::Sender<()>),
}

enum EventMsg {
    Publish {
        pod: PodKey,
        kind: EventType,
        reason: String,
        message: String,
        at: SystemTime,
    },
    Flush(oneshot::Sender<()>),
    /// The pod is gone: forget its series.
    Forget(String),
}

/// Requests to the sink waiting at most (the reconciler waits when it is full).
const SINK_QUEUE: usize = 4096;
/// Events waiting to be published at most, per lane; beyond it new ones are dropped and counted.
const EVENT_QUEUE: usize = 256;
/// Events published at once: each lane publishes its Events in order, and every Event of one pod
/// goes through the same lane, so a pod's Events keep their order and a repeat finds its series.
/// With one publisher, a node filling up (three Events per pod, thousands of pods a minute, a
/// create being a round-trip of a few milliseconds) can outrun its queue, whose overflow is
/// dropped.
const EVENT_LANES: usize = 8;
/// Longest Event note the API accepts is 1 kB.
const MAX_NOTE: usize = 1000;

/// The receiving ends of a [`Statuses`]: hand them to [`Statuses::sink`].
pub struct SinkInbox {
    requests: mpsc::Receiver<SinkMsg>,
    events: Vec<mpsc::Receiver<EventMsg>>,
}

impl Statuses {
    pub fn new(
        client: kube::Client,
        node_name: String,
        node_ip: IpAddr,
        pod_ip: Option<IpAddr>,
    ) -> (Statuses, SinkInbox) {
        let (to_sink, requests) = mpsc::channel(SINK_QUEUE);
        let (events_tx, events): (Vec<_>, Vec<_>) =
            (0..EVENT_LANES).map(|_| mpsc::channel(EVENT_QUEUE)).unzip();
        (
            Statuses {
                client,
                node_name,
                node_ip,
                pod_ip,
                pods: Arc::default(),
                to_sink,
                events: events_tx.into(),
                dropped_events: Arc::default(),
            },
            SinkInbox { requests, events },
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<PodKey, PodRecord>> {
        self.pods.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts keeping the status of `pod` (no-op if already kept).
    pub fn track(&self, key: &PodKey, pod: &Pod) {
        self.lock()
            .entry(key.clone())
            .or_insert_with(|| PodRecord::new(pod, SystemTime::now()));
    }

    /// The pod's own address (`--pod-cidr`): its `podIP` from now on (if the pod is kept).
    pub fn set_pod_ip(&self, key: &PodKey, ip: IpAddr) {
        if let Some(r) = self.lock().get_mut(key) {
            r.pod_ip = Some(ip);
        }
    }

    /// The kept pod named `ns/name`, if any.
    pub fn find(&self, ns: &str, name: &str) -> Option<PodKey> {
        self.lock()
            .keys()
            .find(|k| k.namespace == ns && k.name == name)
            .cloned()
    }

    /// What the prober reads of one container of a kept pod (`None`: the pod is not kept).
    pub fn run_of(&self, key: &PodKey, container: &str) -> Option<ContainerRun> {
        self.lock().get(key).map(|r| r.run_of(container))
    }

    /// Every pod whose status is kept.
    pub fn keys(&self) -> Vec<PodKey> {
        self.lock().keys().cloned().collect()
    }

    pub fn forget(&self, key: &PodKey) {
        // After the Events queued before it; if the queue is full the series go at the cap.
        let _ = self
            .lane(&key.uid)
            .try_send(EventMsg::Forget(key.uid.clone()));
        self.lock().remove(key);
    }

    /// Marks every kept pod's containers not ready (the agent is stopping, so nothing of them
    /// serves until it runs again; the phase stays, so a restarted agent re-adopts them), and
    /// returns those pods.
    pub fn all_unready(&self) -> Vec<PodKey> {
        let mut pods = self.lock();
        for r in pods.values_mut() {
            for c in r.records.values_mut() {
                c.ready = false;
            }
        }
        pods.keys().cloned().collect()
    }

    /// Marks the pod's containers terminated (it is being deleted).
    pub fn terminate(&self, key: &PodKey) {
        if let Some(r) = self.lock().get_mut(key) {
            r.terminate(SystemTime::now());
        }
    }

    /// Every container of the pod is waiting for `reason` (e.g. `CreateContainerConfigError`).
    pub fn waiting(&self, key: &PodKey, reason: &str, message: &str) {
        if let Some(r) = self.lock().get_mut(key) {
            for (name, _) in r.containers.clone() {
                r.apply(&Report::Container {
                    pod: key.clone(),
                    container: name,
                    state: ContainerState::Waiting {
                        reason: reason.into(),
                        message: message.into(),
                    },
                    ready: false,
                    restart_count: 0,
                    image_id: None,
                });
            }
        }
    }

    /// Asks the sink to write the pod's status (the reconciler's only way to write it).
    pub async fn mark(&self, key: &PodKey) {
        let _ = self.to_sink.send(SinkMsg::Write(key.clone(), None)).await;
    }

    /// Asks the sink to write the pod's status and waits until it has, at most `timeout`.
    pub async fn written(&self, key: &PodKey, timeout: Duration) -> kube::Result<()> {
        let (tx, rx) = oneshot::channel();
        if self
            .to_sink
            .send(SinkMsg::Write(key.clone(), Some(tx)))
            .await
            .is_err()
        {
            return Ok(());
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(r)) => r,
            _ => Ok(()),
        }
    }

    /// Waits, at most `timeout`, until the sink has written every pending status and published
    /// every queued Event (on shutdown).
    pub async fn flush(&self, timeout: Duration) -> bool {
        let (tx, rx) = oneshot::channel();
        if self.to_sink.send(SinkMsg::Flush(tx)).await.is_err() {
            return true;
        }
        tokio::time::timeout(timeout, rx).await.is_ok()
    }

    /// Writes the pod's status to the API server. A pod that is gone is not an error.
    async fn write_now(&self, key: &PodKey) -> kube::Result<()> {
        let body = match self.lock().get_mut(key) {
            Some(r) => r.status_at(&key.uid, self.node_ip, self.pod_ip, SystemTime::now()),
            None => return Ok(()),
        };
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &key.namespace);
        match pods
            .patch_status(&key.name, &PatchParams::default(), &Patch::Strategic(&body))
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Records a report; returns the pod whose status changed.
    fn apply(&self, report: &Report) -> Option<PodKey> {
        let (Report::Container { pod, .. } | Report::Pod { pod, .. } | Report::Probe { pod, .. }) =
            report
        else {
            return None;
        };
        let mut pods = self.lock();
        let rec = pods.get_mut(pod)?;
        rec.apply(report);
        Some(pod.clone())
    }

    /// The queue of the lane that publishes the Events of the pod with this uid.
    fn lane(&self, uid: &str) -> &mpsc::Sender<EventMsg> {
        use std::hash::{Hash, Hasher};
        let mut h = std::hash::DefaultHasher::new();
        uid.hash(&mut h);
        &self.events[(h.finish() % self.events.len() as u64) as usize]
    }

    /// Queues an Event about the pod, as the kubelet records them; never waits. When the queue
    /// is full (the API server slow or away) the Event is dropped and counted.
    pub fn event(&self, pod: &PodKey, kind: EventType, reason: &str, message: &str) {
        let msg = EventMsg::Publish {
            pod: pod.clone(),
            kind,
            reason: reason.to_string(),
            message: message.to_string(),
            at: SystemTime::now(),
        };
        if self.lane(&pod.uid).try_send(msg).is_err() {
            let n = self
                .dropped_events
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if n.is_power_of_two() {
                tracing::warn!(%pod, reason, dropped = n + 1, "event queue full; dropping events");
            }
        }
    }

    /// The sink: applies reports, coalesces them, and writes each changed pod's status; failed
    /// writes are retried every 2 s while the API server is away. Events are published by
    /// tasks of their own, [`EVENT_LANES`] at once. Returns when `reports` is closed and nothing is pending, or when the
    /// last [`Statuses`] is gone.
    pub async fn sink(self, mut rx: Reports, inbox: SinkInbox) {
        let SinkInbox {
            mut requests,
            events,
        } = inbox;
        let publishers: Vec<_> = events
            .into_iter()
            .map(|lane| {
                let recorder = EventRecorder {
                    client: self.client.clone(),
                    node_name: self.node_name.clone(),
                    series: BTreeMap::new(),
                };
                tokio::spawn(publish_events(recorder, lane))
            })
            .collect();
        let mut pending: BTreeSet<PodKey> = BTreeSet::new();
        let mut waiting: Vec<(PodKey, oneshot::Sender<kube::Result<()>>)> = Vec::new();
        let mut flushes: Vec<oneshot::Sender<()>> = Vec::new();
        let mut reports_open = true;
        loop {
            let retry = tokio::time::sleep(Duration::from_secs(2));
            tokio::select! {
                r = rx.recv(), if reports_open => match r {
                    Some(r) => self.take(r, &mut pending),
                    None => reports_open = false,
                },
                m = requests.recv() => match m {
                    Some(SinkMsg::Write(key, done)) => {
                        pending.insert(key.clone());
                        if let Some(done) = done {
                            waiting.push((key, done));
                        }
                    }
                    Some(SinkMsg::Flush(done)) => flushes.push(done),
                    None => {
                        if !reports_open && pending.is_empty() {
                            break;
                        }
                    }
                },
                _ = retry, if !pending.is_empty() => {}
            }
            // Everything that arrived meanwhile goes into the same round of writes.
            while let Some(r) = rx.try_recv() {
                self.take(r, &mut pending);
            }
            // Each pod once per round, several pods at a time: one write of a pod is never in
            // flight beside another of the same pod, and a round of thousands of pods (a node
            // filling up) is not one API round-trip after another.
            let this = &self;
            let mut writes = futures::stream::iter(std::mem::take(&mut pending))
                .map(|key| async move {
                    let result = this.write_now(&key).await;
                    (key, result)
                })
                .buffer_unordered(STATUS_WRITES_IN_FLIGHT);
            while let Some((key, result)) = writes.next().await {
                if let Err(e) = &result {
                    tracing::warn!(pod = %key, "writing pod status: {e}; will retry");
                    pending.insert(key.clone());
                }
                let mut i = 0;
                while i < waiting.len() {
                    if waiting[i].0 == key {
                        let (_, done) = waiting.swap_remove(i);
                        let _ = done.send(match &result {
                            Ok(()) => Ok(()),
                            Err(e) => Err(kube::Error::Service(e.to_string().into())),
                        });
                    } else {
                        i += 1;
                    }
                }
            }
            for done in flushes.drain(..) {
                let lanes = self.events.iter().map(|lane| async move {
                    let (tx, rx) = oneshot::channel();
                    if lane.send(EventMsg::Flush(tx)).await.is_ok() {
                        let _ = rx.await;
                    }
                });
                futures::future::join_all(lanes).await;
                let _ = done.send(());
            }
            if !reports_open && pending.is_empty() && requests.is_closed() {
                break;
            }
        }
        drop(self);
        for publisher in publishers {
            let _ = publisher.await;
        }
    }

    fn take(&self, r: Report, pending: &mut BTreeSet<PodKey>) {
        if let Report::Event {
            pod,
            kind,
            reason,
            message,
        } = &r
        {
            self.event(pod, *kind, reason, message);
        } else if let Some(k) = self.apply(&r) {
            pending.insert(k);
        }
    }
}

/// Events already written, by (pod uid, type, reason, message): a repeat within
/// [`SERIES_WINDOW`] updates the first one's count.
struct EventRecorder {
    client: kube::Client,
    node_name: String,
    series: BTreeMap<(String, &'static str, String, String), Series>,
}

struct Series {
    name: String,
    count: u32,
    last: SystemTime,
}

/// Status writes of different pods in flight at once (the API client allows
/// [`crate::bootstrap::MAX_API_REQUESTS_IN_FLIGHT`] for everything together).
const STATUS_WRITES_IN_FLIGHT: usize = 16;

/// How long a repeated Event is folded into the first (the kubelet correlator's window).
const SERIES_WINDOW: Duration = Duration::from_secs(600);
/// Series remembered at most, per lane.
const MAX_SERIES: usize = 4096 / EVENT_LANES;

impl EventRecorder {
    async fn publish(
        &mut self,
        pod: &PodKey,
        kind: EventType,
        reason: &str,
        message: &str,
        at: SystemTime,
    ) -> kube::Result<()> {
        let type_ = match kind {
            EventType::Normal => "Normal",
            EventType::Warning => "Warning",
        };
        let message = truncate(message, MAX_NOTE);
        let events: Api<Event> = Api::namespaced(self.client.clone(), &pod.namespace);
        let key = (pod.uid.clone(), type_, reason.to_string(), message.clone());
        if let Some(s) = self.series.get_mut(&key)
            && at.duration_since(s.last).unwrap_or_default() < SERIES_WINDOW
        {
            s.count += 1;
            s.last = at;
            let patch = json!({"count": s.count, "lastTimestamp": time(at)});
            match events
                .patch(&s.name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => return Ok(()),
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
        let nanos = at
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let name = format!("{}.{nanos:x}", pod.name);
        let ev = json!({
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": name, "namespace": pod.namespace},
            "involvedObject": {
                "apiVersion": "v1", "kind": "Pod",
                "namespace": pod.namespace, "name": pod.name, "uid": pod.uid,
            },
            "reason": reason,
            "message": message,
            "type": type_,
            "source": {"component": "wasinode", "host": self.node_name},
            "reportingComponent": "wasinode",
            "reportingInstance": self.node_name,
            "firstTimestamp": time(at),
            "lastTimestamp": time(at),
            "count": 1,
        });
        let ev: Event = serde_json::from_value(ev).map_err(kube::Error::SerdeError)?;
        events.create(&PostParams::default(), &ev).await?;
        if self.series.len() >= MAX_SERIES {
            let now = SystemTime::now();
            self.series
                .retain(|_, s| now.duration_since(s.last).unwrap_or_default() < SERIES_WINDOW);
            if self.series.len() >= MAX_SERIES {
                self.series.clear();
            }
        }
        self.series.insert(
            key,
            Series {
                name,
                count: 1,
                last: at,
            },
        );
        Ok(())
    }
}

/// Publishes queued Events in order; returns when every sender is gone.
async fn publish_events(mut recorder: EventRecorder, mut rx: mpsc::Receiver<EventMsg>) {
    while let Some(msg) = rx.recv().await {
        match msg {
            EventMsg::Publish {
                pod,
                kind,
                reason,
                message,
                at,
            } => {
                if let Err(e) = recorder.publish(&pod, kind, &reason, &message, at).await {
                    tracing::warn!(%pod, reason, "cannot create event: {e}");
                }
            }
            EventMsg::Flush(done) => {
                let _ = done.send(());
            }
            EventMsg::Forget(uid) => recorder.series.retain(|k, _| k.0 != uid),
        }
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod() -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "default", "uid": "u1"},
            "spec": {"containers": [{"name": "c", "image": "file:///x.wasm"}]},
        }))
        .unwrap()
    }

    fn key() -> PodKey {
        workload::plan::pod_key(&pod())
    }

    #[test]
    fn pod_ip_is_the_pod_address_and_host_ip_the_node_address() {
        let now = SystemTime::now();
        let (node, pods): (IpAddr, IpAddr) =
            ("10.213.0.1".parse().unwrap(), "10.214.0.7".parse().unwrap());
        let s = PodRecord::new(&pod(), now).status_at("u1", node, Some(pods), now);
        assert_eq!(s["status"]["hostIP"], "10.213.0.1");
        assert_eq!(s["status"]["hostIPs"], json!([{"ip": "10.213.0.1"}]));
        assert_eq!(s["status"]["podIP"], "10.214.0.7");
        assert_eq!(s["status"]["podIPs"], json!([{"ip": "10.214.0.7"}]));
        // A hostNetwork pod has the node's address, as the kubelet reports it.
        let mut host = pod();
        if let Some(spec) = host.spec.as_mut() {
            spec.host_network = Some(true);
        }
        let s = PodRecord::new(&host, now).status_at("u1", node, Some(pods), now);
        assert_eq!(s["status"]["podIP"], "10.213.0.1");
        // A pod waiting for its own address (--pod-cidr) has no podIP yet; then it has it.
        let mut r = PodRecord::new(&pod(), now);
        let s = r.status_at("u1", node, None, now);
        assert!(
            s["status"].get("podIP").is_none() && s["status"].get("podIPs").is_none(),
            "{s}"
        );
        r.pod_ip = Some("10.214.0.9".parse().unwrap());
        let s = r.status_at("u1", node, None, now);
        assert_eq!(s["status"]["podIPs"], json!([{"ip": "10.214.0.9"}]));
    }

    /// The supervisor's reports of container `c` running and the pod Running.
    fn start_running(r: &mut PodRecord, now: SystemTime) {
        r.apply(&Report::Container {
            pod: key(),
            container: "c".into(),
            state: ContainerState::Running { started_at: now },
            ready: true,
            restart_count: 0,
            image_id: Some("sha256:ab".into()),
        });
        r.apply(&Report::Pod {
            pod: key(),
            phase: Phase::Running,
            reason: None,
            message: None,
        });
    }

    #[test]
    fn probes_gate_started_and_ready_for_the_current_run_only() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "default", "uid": "u1"},
            "spec": {"containers": [{"name": "c", "image": "file:///x.wasm",
                "startupProbe": {"tcpSocket": {"port": 80}},
                "readinessProbe": {"exec": {"command": ["true"]}}}]},
        }))
        .unwrap();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let now = SystemTime::now();
        let mut r = PodRecord::new(&pod, now);
        start_running(&mut r, now);
        let cs = |r: &mut PodRecord| r.status("u1", ip, now)["status"].clone();
        let s = cs(&mut r);
        let c = &s["containerStatuses"][0];
        assert_eq!(
            (c["started"].clone(), c["ready"].clone()),
            (json!(false), json!(false))
        );
        let probe = |since, started, ready, note: Option<&str>| Report::Probe {
            pod: key(),
            container: "c".into(),
            since,
            started,
            ready,
            note: note.map(String::from),
        };
        r.apply(&probe(now, true, false, Some("readinessProbe: cannot run")));
        let s = cs(&mut r);
        assert_eq!(s["containerStatuses"][0]["started"], true);
        assert_eq!(s["containerStatuses"][0]["ready"], false);
        let ready = s["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "Ready")
            .unwrap()
            .clone();
        assert_eq!(ready["reason"], "ContainersNotReady");
        assert_eq!(
            ready["message"],
            "containers with unready status: [c]; c: readinessProbe: cannot run"
        );
        r.apply(&probe(now, true, true, None));
        assert_eq!(cs(&mut r)["containerStatuses"][0]["ready"], true);
        // A new run: the verdict about the last one no longer counts, nor does a late one.
        let later = now + Duration::from_secs(5);
        start_running(&mut r, later);
        assert_eq!(cs(&mut r)["containerStatuses"][0]["ready"], false);
        r.apply(&probe(now, true, true, None));
        assert_eq!(cs(&mut r)["containerStatuses"][0]["ready"], false);
        r.apply(&probe(later, true, true, None));
        assert_eq!(cs(&mut r)["containerStatuses"][0]["ready"], true);
    }

    #[test]
    fn running_and_ready_after_start() {
        let now = SystemTime::now();
        let mut r = PodRecord::new(&pod(), now);
        let s = r.status("u1", "10.0.0.1".parse().unwrap(), now);
        assert_eq!(s["status"]["phase"], "Pending");
        assert_eq!(
            s["status"]["containerStatuses"][0]["state"]["waiting"]["reason"],
            "ContainerCreating"
        );
        start_running(&mut r, now);
        let s = r.status("u1", "10.0.0.1".parse().unwrap(), now);
        assert_eq!(s["status"]["phase"], "Running");
        assert_eq!(s["status"]["podIP"], "10.0.0.1");
        let cs = &s["status"]["containerStatuses"][0];
        assert_eq!(cs["ready"], true);
        assert_eq!(cs["started"], true);
        assert_eq!(cs["imageID"], "sha256:ab");
        assert!(cs["state"]["running"]["startedAt"].is_string());
        let ready = s["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "Ready")
            .unwrap();
        assert_eq!(ready["status"], "True");
        // The body is a valid Pod status.
        let _: Pod =
            serde_json::from_value(json!({"metadata": {}, "status": s["status"]})).unwrap();

        r.terminate(now);
        let s = r.status("u1", "10.0.0.1".parse().unwrap(), now);
        assert_eq!(s["status"]["phase"], "Succeeded");
        assert_eq!(
            s["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"],
            0
        );
    }

    #[test]
    fn a_readopted_pod_keeps_its_start_time_and_restart_count() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "default", "uid": "u1"},
            "spec": {"containers": [{"name": "c", "image": "file:///x.wasm"}]},
            "status": {
                "startTime": "2026-01-02T03:04:05Z",
                "conditions": [{"type": "Ready", "status": "True",
                    "lastTransitionTime": "2026-01-02T03:04:06Z"}],
                "containerStatuses": [{"name": "c", "image": "file:///x.wasm", "imageID": "",
                    "ready": true, "restartCount": 2}],
            },
        }))
        .unwrap();
        let now = SystemTime::now();
        let mut r = PodRecord::new(&pod, now);
        start_running(&mut r, now);
        let s = r.status("u1", "10.0.0.1".parse().unwrap(), now);
        assert_eq!(s["status"]["startTime"], "2026-01-02T03:04:05Z");
        assert_eq!(s["status"]["containerStatuses"][0]["restartCount"], 2);
        let ready = s["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "Ready")
            .unwrap();
        assert_eq!(ready["lastTransitionTime"], "2026-01-02T03:04:06Z");
    }

    #[test]
    fn containers_of_a_failed_pod_wait_for_its_reason() {
        let now = SystemTime::now();
        let mut r = PodRecord::new(&pod(), now);
        r.apply(&Report::Container {
            pod: key(),
            container: "c".into(),
            state: ContainerState::Waiting {
                reason: "ContainerCreating".into(),
                message: String::new(),
            },
            ready: false,
            restart_count: 0,
            image_id: None,
        });
        r.apply(&Report::Pod {
            pod: key(),
            phase: Phase::Failed,
            reason: Some("PortInUse".into()),
            message: Some("cannot listen on 127.0.0.1:80".into()),
        });
        let s = r.status("u1", "10.0.0.1".parse().unwrap(), now);
        let w = &s["status"]["containerStatuses"][0]["state"]["waiting"];
        assert_eq!(w["reason"], "PortInUse");
        assert_eq!(w["message"], "cannot listen on 127.0.0.1:80");
    }

    #[test]
    fn failed_pod_says_why() {
        let now = SystemTime::now();
        let mut r = PodRecord::new(&pod(), now);
        r.apply(&Report::Pod {
            pod: key(),
            phase: Phase::Failed,
            reason: Some("InvalidPodSpec".into()),
            message: Some("bad modules annotation".into()),
        });
        let s = r.status("u1", "10.0.0.1".parse().unwrap(), now);
        assert_eq!(s["status"]["phase"], "Failed");
        assert_eq!(s["status"]["reason"], "InvalidPodSpec");
        assert_eq!(s["status"]["message"], "bad modules annotation");
        assert_eq!(
            s["status"]["containerStatuses"][0]["state"]["waiting"]["reason"],
            "InvalidPodSpec"
        );
    }
}
