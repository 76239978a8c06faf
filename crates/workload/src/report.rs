//! What the supervisor tells its sink: container states, pod phases and events. The terminal
//! prints them in standalone mode; the node agent turns them into pod status and Events.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tokio::sync::Notify;

use crate::plan::PodKey;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContainerState {
    Waiting {
        reason: String,
        message: String,
    },
    Running {
        started_at: SystemTime,
    },
    Terminated {
        exit_code: i32,
        reason: String,
        message: String,
        started_at: SystemTime,
        finished_at: SystemTime,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Pending,
    Running,
    Succeeded,
    Failed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Normal,
    Warning,
}

#[derive(Debug, Clone)]
pub enum Report {
    Container {
        pod: PodKey,
        container: String,
        state: ContainerState,
        ready: bool,
        restart_count: u32,
        /// The module's content digest once it is known.
        image_id: Option<String>,
    },
    Pod {
        pod: PodKey,
        phase: Phase,
        reason: Option<String>,
        message: Option<String>,
    },
    Event {
        pod: PodKey,
        kind: EventType,
        reason: String,
        message: String,
    },
    /// What the node's prober concluded about one run of a container (the run that started at
    /// `since`; a verdict about an earlier run is ignored): whether its startup probe has passed
    /// (`started`) and its readiness probe says it is `ready`, and why not, when the prober
    /// knows (`note`, e.g. a probe kind this node cannot run).
    Probe {
        pod: PodKey,
        container: String,
        since: SystemTime,
        started: bool,
        ready: bool,
        note: Option<String>,
    },
}

/// Reports that wait for the sink at most before the overflow policy applies.
pub const REPORT_QUEUE: usize = 4096;

/// Sends reports to the one [`Reports`] made with it; never waits. The queue holds
/// [`REPORT_QUEUE`] reports; when it is full (the sink is behind: the API server slow or away)
/// an Event is dropped and counted, and a state report (a container's state, a pod's phase, a
/// probe verdict) replaces the one still queued for the same container or pod, so that the
/// sink reads the latest of each and nothing the status shows is lost. A full queue thus grows
/// by at most one report per container and pod, which the node's pod limit bounds. A sink that
/// went away is not an error for the workload.
#[derive(Debug)]
pub struct Reporter(Arc<Shared>);

/// The receiving end of a [`Reporter`].
#[derive(Debug)]
pub struct Reports(Arc<Shared>);

#[derive(Debug)]
struct Shared {
    queue: Mutex<Queue>,
    ready: Notify,
}

#[derive(Debug)]
struct Queue {
    items: VecDeque<Report>,
    cap: usize,
    senders: usize,
    receiver_gone: bool,
    dropped_events: u64,
    replaced: u64,
}

/// What a newer report supersedes when the queue is full: the same kind about the same
/// container (or pod).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Slot<'a> {
    Container(&'a PodKey, &'a str),
    Probe(&'a PodKey, &'a str),
    Pod(&'a PodKey),
}

impl Report {
    fn slot(&self) -> Option<Slot<'_>> {
        match self {
            Report::Container { pod, container, .. } => Some(Slot::Container(pod, container)),
            Report::Probe { pod, container, .. } => Some(Slot::Probe(pod, container)),
            Report::Pod { pod, .. } => Some(Slot::Pod(pod)),
            Report::Event { .. } => None,
        }
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Clone for Reporter {
    fn clone(&self) -> Reporter {
        self.0.lock().senders += 1;
        Reporter(self.0.clone())
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        let last = {
            let mut q = self.0.lock();
            q.senders -= 1;
            q.senders == 0
        };
        if last {
            self.0.ready.notify_one();
        }
    }
}

impl Drop for Reports {
    fn drop(&mut self) {
        let mut q = self.0.lock();
        q.receiver_gone = true;
        q.items.clear();
    }
}

impl Reports {
    /// The next report; `None` once every [`Reporter`] is gone and the queue is empty.
    pub async fn recv(&mut self) -> Option<Report> {
        loop {
            let notified = self.0.ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut q = self.0.lock();
                if let Some(r) = q.items.pop_front() {
                    return Some(r);
                }
                if q.senders == 0 {
                    return None;
                }
            }
            notified.await;
        }
    }

    /// The next report if one is queued now.
    pub fn try_recv(&mut self) -> Option<Report> {
        self.0.lock().items.pop_front()
    }

    /// Events dropped and state reports folded into a queued one, because the queue was full.
    pub fn overflowed(&self) -> (u64, u64) {
        let q = self.0.lock();
        (q.dropped_events, q.replaced)
    }
}

impl Reporter {
    /// A reporter and its receiver, with a queue of [`REPORT_QUEUE`] reports.
    pub fn channel() -> (Reporter, Reports) {
        Reporter::with_capacity(REPORT_QUEUE)
    }

    /// A reporter and its receiver, with a queue of `cap` reports (at least 1).
    pub fn with_capacity(cap: usize) -> (Reporter, Reports) {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                items: VecDeque::new(),
                cap: cap.max(1),
                senders: 1,
                receiver_gone: false,
                dropped_events: 0,
                replaced: 0,
            }),
            ready: Notify::new(),
        });
        (Reporter(shared.clone()), Reports(shared))
    }

    pub fn send(&self, r: Report) {
        {
            let mut q = self.0.lock();
            if q.receiver_gone {
                return;
            }
            if q.items.len() >= q.cap {
                let Some(slot) = r.slot() else {
                    q.dropped_events += 1;
                    let n = q.dropped_events;
                    drop(q);
                    if n.is_power_of_two() {
                        tracing::warn!(dropped = n, "report queue full; dropping events");
                    }
                    return;
                };
                let queued = q.items.iter().rposition(|o| o.slot() == Some(slot));
                if let Some(i) = queued {
                    q.items[i] = r;
                    q.replaced += 1;
                    return;
                }
            }
            q.items.push_back(r);
        }
        self.0.ready.notify_one();
    }

    pub fn event(&self, pod: &PodKey, kind: EventType, reason: &str, message: impl Into<String>) {
        self.send(Report::Event {
            pod: pod.clone(),
            kind,
            reason: reason.into(),
            message: message.into(),
        });
    }

    pub fn phase(&self, pod: &PodKey, phase: Phase, reason: Option<&str>, message: Option<String>) {
        self.send(Report::Pod {
            pod: pod.clone(),
            phase,
            reason: reason.map(Into::into),
            message,
        });
    }

    pub fn container(
        &self,
        pod: &PodKey,
        container: &str,
        state: ContainerState,
        ready: bool,
        restart_count: u32,
        image_id: Option<String>,
    ) {
        self.send(Report::Container {
            pod: pod.clone(),
            container: container.into(),
            state,
            ready,
            restart_count,
            image_id,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> PodKey {
        PodKey {
            namespace: "default".into(),
            name: name.into(),
            uid: format!("uid-{name}"),
        }
    }

    fn running(r: &Reporter, pod: &PodKey, restarts: u32) {
        r.container(
            pod,
            "c",
            ContainerState::Running {
                started_at: SystemTime::UNIX_EPOCH,
            },
            true,
            restarts,
            None,
        );
    }

    fn drain(rx: &mut Reports) -> Vec<Report> {
        std::iter::from_fn(|| rx.try_recv()).collect()
    }

    #[test]
    fn a_full_queue_drops_events_and_keeps_the_latest_state_of_each_container() {
        let (r, mut rx) = Reporter::with_capacity(3);
        let (a, b) = (key("a"), key("b"));
        running(&r, &a, 0);
        r.phase(&a, Phase::Running, None, None);
        r.event(&a, EventType::Normal, "Started", "one");
        // Full: an Event is dropped, a state replaces the queued one of its container, and a
        // container with nothing queued still gets in.
        r.event(&a, EventType::Warning, "BackOff", "two");
        running(&r, &a, 1);
        running(&r, &a, 2);
        r.phase(&a, Phase::Failed, Some("Error"), None);
        running(&r, &b, 7);
        assert_eq!(rx.overflowed(), (1, 3));
        let got = drain(&mut rx);
        assert_eq!(got.len(), 4, "{got:?}");
        assert!(matches!(&got[0], Report::Container { pod, restart_count: 2, .. } if *pod == a));
        assert!(matches!(&got[1], Report::Pod { pod, phase: Phase::Failed, .. } if *pod == a));
        assert!(matches!(&got[2], Report::Event { reason, .. } if reason == "Started"));
        assert!(matches!(&got[3], Report::Container { pod, restart_count: 7, .. } if *pod == b));
        // Drained, it takes everything again.
        r.event(&a, EventType::Normal, "Killing", "three");
        assert_eq!(drain(&mut rx).len(), 1);
    }

    #[tokio::test]
    async fn recv_waits_for_a_report_and_ends_when_every_reporter_is_gone() {
        let (r, mut rx) = Reporter::channel();
        let r2 = r.clone();
        let waiter = tokio::spawn(async move {
            let mut n = 0;
            while rx.recv().await.is_some() {
                n += 1;
            }
            n
        });
        tokio::task::yield_now().await;
        running(&r, &key("a"), 0);
        drop(r);
        r2.phase(&key("a"), Phase::Running, None, None);
        drop(r2);
        assert_eq!(waiter.await.unwrap(), 2);
    }

    #[test]
    fn reports_to_a_receiver_that_is_gone_are_discarded() {
        let (r, rx) = Reporter::with_capacity(1);
        drop(rx);
        running(&r, &key("a"), 0);
        running(&r, &key("b"), 0);
        assert!(r.0.lock().items.is_empty());
    }
}
