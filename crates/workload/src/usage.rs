//! The usage of the pods a supervisor runs, for stats and limits: one [`runtime::Meter`] per
//! container (cumulative CPU nanoseconds, current memory bytes), made when the pod's start
//! begins and handed to every invocation of the container, and forgotten when the pod stops.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use runtime::Meter;

use crate::plan::PodKey;

/// One container's usage.
#[derive(Debug)]
pub struct ContainerUsage {
    pub name: String,
    pub meter: Arc<Meter>,
    /// When the container (its current run, for a command) started, in nanoseconds since the
    /// Unix epoch; 0 until it runs.
    started_ns: AtomicU64,
}

impl ContainerUsage {
    /// When the container started; `None` while it has not.
    pub fn started(&self) -> Option<SystemTime> {
        match self.started_ns.load(Ordering::Relaxed) {
            0 => None,
            ns => Some(UNIX_EPOCH + Duration::from_nanos(ns)),
        }
    }

    pub(crate) fn set_started(&self, at: SystemTime) {
        let ns = at
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos().max(1) as u64);
        self.started_ns.store(ns, Ordering::Relaxed);
    }
}

/// One pod's usage: its containers, in the order of its spec.
#[derive(Debug)]
pub struct PodUsage {
    pub key: PodKey,
    /// When the node began starting the pod.
    pub started: SystemTime,
    pub containers: Vec<Arc<ContainerUsage>>,
}

impl PodUsage {
    pub fn container(&self, name: &str) -> Option<&Arc<ContainerUsage>> {
        self.containers.iter().find(|c| c.name == name)
    }

    /// CPU time of all the pod's containers, in nanoseconds.
    pub fn cpu_ns(&self) -> u64 {
        self.containers.iter().map(|c| c.meter.cpu_ns()).sum()
    }

    /// Memory all the pod's containers hold now, in bytes.
    pub fn memory_bytes(&self) -> u64 {
        self.containers.iter().map(|c| c.meter.memory_bytes()).sum()
    }
}

/// The usage of every pod of one supervisor. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Usage {
    pods: Arc<Mutex<BTreeMap<PodKey, Arc<PodUsage>>>>,
}

impl Usage {
    /// Every pod that is starting or running, with its containers' usage.
    pub fn pods(&self) -> Vec<Arc<PodUsage>> {
        let pods = self.pods.lock().unwrap_or_else(|p| p.into_inner());
        pods.values().cloned().collect()
    }

    pub fn pod(&self, key: &PodKey) -> Option<Arc<PodUsage>> {
        let pods = self.pods.lock().unwrap_or_else(|p| p.into_inner());
        pods.get(key).cloned()
    }

    /// The meter of one container of a pod that runs.
    pub fn meter(&self, key: &PodKey, container: &str) -> Option<Arc<Meter>> {
        self.pod(key)?.container(container).map(|c| c.meter.clone())
    }

    /// Starts accounting for a pod with these containers.
    pub(crate) fn insert<'a>(
        &self,
        key: &PodKey,
        containers: impl Iterator<Item = &'a str>,
    ) -> Arc<PodUsage> {
        let pod = Arc::new(PodUsage {
            key: key.clone(),
            started: SystemTime::now(),
            containers: containers
                .map(|name| {
                    Arc::new(ContainerUsage {
                        name: name.to_string(),
                        meter: Meter::new(),
                        started_ns: AtomicU64::new(0),
                    })
                })
                .collect(),
        });
        let mut pods = self.pods.lock().unwrap_or_else(|p| p.into_inner());
        pods.insert(key.clone(), pod.clone());
        pod
    }

    /// Forgets a pod that no longer runs.
    pub(crate) fn remove(&self, key: &PodKey) {
        let mut pods = self.pods.lock().unwrap_or_else(|p| p.into_inner());
        pods.remove(key);
    }
}
