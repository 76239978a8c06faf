//! Pods as wasinode runs them, whatever the front end.
//!
//! Owns: Pod -> Plan (pure, validated), the Supervisor (fetch, compile, start, stop), WAGI
//! listeners, WASI command containers with restart policy, container log files, and the reports
//! (container states, pod phases, events) that a sink turns into what users see.
//!
//! Must not touch: the Kubernetes API server (the node crate does), terminal output (the CLI
//! does), wasmtime details (the runtime crate does).

pub mod command;
pub mod image;
pub mod listen;
pub mod logs;
pub mod manifest;
pub mod metrics;
pub mod plan;
pub mod quantity;
pub mod report;
pub mod serve;
pub mod supervisor;
pub mod threads;
pub mod usage;

pub use image::{Images, PullRetry};
pub use logs::LogStore;
pub use plan::{LocalImages, Plan, PlanContext, PodKey};
pub use report::{ContainerState, EventType, Phase, Report, Reporter, Reports};
pub use supervisor::{StartError, Started, Supervisor, SupervisorConfig};
