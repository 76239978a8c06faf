//! What the supervisor tells its sink: container states, pod phases and events. The terminal
//! prints them in standalone mode; the node agent turns them into pod status and Events.

use std::time::SystemTime;

use tokio::sync::mpsc;

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

/// Sends reports; a sink that went away is not an error for the workload.
#[derive(Clone, Debug)]
pub struct Reporter(mpsc::UnboundedSender<Report>);

impl Reporter {
    pub fn channel() -> (Reporter, mpsc::UnboundedReceiver<Report>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Reporter(tx), rx)
    }

    pub fn send(&self, r: Report) {
        let _ = self.0.send(r);
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
