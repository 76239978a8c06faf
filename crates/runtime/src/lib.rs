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

/// Turns transparent huge pages off for this process (the error says why the kernel refused).
/// The heap is then backed page by page: mimalloc
/// asks for huge pages on its arenas (madvise), and a 2 MiB page stays resident while any small
/// object on it lives: in bench/run node the agent held 45 MiB right after joining instead of
/// 30, and 138 MiB instead of 75 after 2,000 pods were deleted. Nothing here gains from them: the
/// heap is small objects, and wasm linear memories are reset page by page. The wasinode binary
/// calls it first thing, and so does the instantiate bench, so that what it measures is backed
/// as the binary's path is.
pub fn no_transparent_huge_pages() -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    rustix::thread::disable_transparent_huge_pages(true)?;
    Ok(())
}
