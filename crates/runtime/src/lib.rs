//! wasmtime for wasinode.
//!
//! Owns: the one `Engine` of a process (pooling allocator, epoch ticker), compiling a module once
//! per content digest (precompiled on disk, linked once into an `InstancePre`), and running one
//! invocation: a fresh WASI preview-1 context (args, env, stdin, preopens, captured or streamed
//! stdout/stderr), a per-instance memory limit, a deadline, and outbound HTTP through the
//! `wasi_experimental_http` ABI behind an allow-list. Components (`wasi:http` 0.2 handlers and
//! `wasi:cli/run` commands) are told apart from core modules by their bytes and exports, linked
//! once into a `ProxyPre` / `CommandPre`, and run with a fresh instance per request or per run.
//!
//! Must not touch: HTTP serving, CGI, Kubernetes types, registries. Callers hand it bytes and a
//! digest; it hands back what the guest wrote and how it ended.

mod cache;
mod component;
mod engine;
mod environ;
mod limits;
mod outbound;
mod output;
mod quota;
mod run;
mod service;
pub mod usage;
mod writev;

pub use component::{ComponentBody, ProgramKind};
pub use engine::{Program, Runtime, RuntimeConfig, RuntimeError};
pub use environ::Environ;
pub use outbound::{AllowList, AllowListError};
pub use output::{LineSink, STDERR_CAPTURE_LIMIT, STDOUT_CAPTURE_LIMIT, Stream};
pub use quota::{CpuQuota, Limits, PERIOD as CPU_PERIOD};
pub use run::{Invocation, Outcome, Preopen, RunError};
pub use service::{Service, ServiceLimits};
pub use usage::Meter;
