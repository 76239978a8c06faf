//! One invocation of a program: a fresh store and WASI context, run to completion, under a
//! deadline and a memory limit.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use wasmtime::Store;
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::pipe::{MemoryInputPipe, MemoryOutputPipe};
use wasmtime_wasi::{FsPerms, I32Exit, WasiCtxBuilder};

use crate::engine::{Compiled, Program, Runtime};
use crate::limits::InstanceLimiter;
use crate::outbound::{AllowList, OutboundState};
use crate::output::{
    DiscardStream, LineStream, STDERR_CAPTURE_LIMIT, STDOUT_CAPTURE_LIMIT, Stream,
};

/// The state of one store.
pub struct Host {
    pub(crate) wasi: WasiP1Ctx,
    /// The guest's environment, read by `environ_get` (environ.rs), not by `wasi`.
    pub(crate) env: crate::environ::Environ,
    pub(crate) limiter: InstanceLimiter,
    pub(crate) outbound: OutboundState,
}

/// A host directory the guest sees at `guest`.
#[derive(Clone, Debug)]
pub struct Preopen {
    pub host: PathBuf,
    pub guest: String,
    pub read_only: bool,
}

/// What to run and with what.
#[derive(Clone, Debug)]
pub struct Invocation {
    /// Exported function to call: `_start` for commands, or a WAGI entrypoint.
    pub entrypoint: String,
    pub args: Vec<String>,
    pub env: crate::Environ,
    pub stdin: Bytes,
    pub stdout: Stream,
    pub stderr: Stream,
    pub preopens: Vec<Preopen>,
    pub allowed_hosts: Arc<AllowList>,
    /// Wall-clock limit for the whole invocation; `None` runs until the guest returns.
    pub timeout: Option<Duration>,
    /// The container's memory and CPU limits (the node's own apply beside them).
    pub limits: crate::Limits,
    /// The container's usage, charged with this invocation's CPU time and memory.
    pub meter: Option<Arc<crate::Meter>>,
}

impl Invocation {
    pub fn new(entrypoint: impl Into<String>) -> Self {
        Self {
            entrypoint: entrypoint.into(),
            args: Vec::new(),
            env: crate::Environ::default(),
            stdin: Bytes::new(),
            stdout: Stream::Capture {
                limit: STDOUT_CAPTURE_LIMIT,
            },
            stderr: Stream::Capture {
                limit: STDERR_CAPTURE_LIMIT,
            },
            preopens: Vec::new(),
            allowed_hosts: Arc::new(AllowList::deny_all()),
            timeout: None,
            limits: crate::Limits::default(),
            meter: None,
        }
    }
}

/// How a guest ended when it ended on its own.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// 0 when the entrypoint returned or called `proc_exit(0)`.
    pub exit_code: i32,
    /// What the guest wrote, for streams set to `Capture`.
    pub stdout: Bytes,
    pub stderr: Bytes,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("the module did not finish within {0:?}")]
    Timeout(Duration),
    #[error("the module tried to use more than {limit} bytes of memory")]
    MemoryLimit { limit: usize, stderr: Bytes },
    #[error("the module trapped: {message}")]
    Trap { message: String, stderr: Bytes },
    #[error("the module has no exported function {0:?}")]
    NoEntrypoint(String),
    #[error("too many instances running at once; try again")]
    Busy,
    #[error("cannot start the module: {0}")]
    Setup(String),
    #[error("a {0} cannot serve HTTP requests")]
    NotHttp(crate::ProgramKind),
    #[error("a {0} is not run as a command")]
    NotCommand(crate::ProgramKind),
    #[error("the component answered with an error: {0}")]
    GuestHttp(String),
    #[error("the component returned without setting a response")]
    NoResponse,
}

/// Opens every preopen of an invocation in `b`.
pub(crate) fn preopen_all(b: &mut WasiCtxBuilder, preopens: &[Preopen]) -> Result<(), RunError> {
    for p in preopens {
        let perms = if p.read_only {
            FsPerms::ReadOnly
        } else {
            FsPerms::ReadWrite
        };
        b.preopened_dir(&p.host, &p.guest, perms).map_err(|e| {
            RunError::Setup(format!(
                "cannot open {} for {}: {e:#}",
                p.host.display(),
                p.guest
            ))
        })?;
    }
    Ok(())
}

pub(crate) fn pipe_for(
    stream: &Stream,
) -> (
    Option<MemoryOutputPipe>,
    Box<dyn wasmtime_wasi::cli::StdoutStream + Sync>,
) {
    match stream {
        Stream::Capture { limit } => {
            let pipe = MemoryOutputPipe::new(*limit);
            (Some(pipe.clone()), Box::new(pipe))
        }
        Stream::Lines(sink) => (None, Box::new(LineStream(sink.clone()))),
        Stream::Discard => (None, Box::new(DiscardStream)),
    }
}

/// What a capture pipe holds, without a copy. Call it only once the store is dropped: the store
/// holds the other handles of the pipe.
pub(crate) fn captured(pipe: Option<MemoryOutputPipe>) -> Bytes {
    let Some(pipe) = pipe else {
        return Bytes::new();
    };
    match pipe.try_into_inner() {
        Some(bytes) => bytes.freeze(),
        None => {
            tracing::error!("captured output still shared after its store was dropped; lost");
            Bytes::new()
        }
    }
}

/// Whether `e` is the pooling allocator out of slots (instances, memories, tables or stacks):
/// a matter of load, not of the module.
pub(crate) fn pool_full(e: &wasmtime::Error) -> bool {
    e.chain()
        .any(|c| c.is::<wasmtime::PoolConcurrencyLimitError>())
}

impl Runtime {
    /// Runs `inv` on a fresh instance of `program`. Each call is isolated: a trap, a timeout or a
    /// memory limit ends only this invocation.
    /// The memory budget of one instance with these limits: the container's, never above the
    /// node's.
    pub(crate) fn memory_limit(&self, limits: &crate::Limits) -> usize {
        let node = self.inner.config.max_memory;
        limits.memory.map_or(node, |m| m.min(node))
    }

    pub async fn run(&self, program: &Program, inv: Invocation) -> Result<Outcome, RunError> {
        let timeout = inv.timeout;
        // Every poll (set-up, instantiation, the guest, the store's drop) is the container's CPU.
        let meter = inv.meter.clone();
        let fut = crate::usage::Metered::new(self.run_inner(program, inv), meter);
        match timeout {
            // Guests yield at every epoch tick, so dropping the future on timeout stops the guest
            // even in a tight loop, and stops it too while it waits on an outbound request.
            Some(t) => tokio::time::timeout(t, fut)
                .await
                .map_err(|_| RunError::Timeout(t))?,
            None => fut.await,
        }
    }

    async fn run_inner(&self, program: &Program, inv: Invocation) -> Result<Outcome, RunError> {
        let pre = match &program.compiled {
            Compiled::Module { pre, .. } => pre,
            Compiled::Command(pre) => return self.run_command(pre, inv).await,
            Compiled::Http(_) | Compiled::Service(_) => {
                return Err(RunError::NotCommand(program.kind()));
            }
        };
        let deadline = inv.timeout.map(|t| tokio::time::Instant::now() + t);
        let limit = self.memory_limit(&inv.limits);
        let cpu = inv.limits.cpu.clone();
        let mut b = WasiCtxBuilder::new();
        b.args(&inv.args);
        b.stdin(MemoryInputPipe::new(inv.stdin));
        let (stdout_pipe, stdout) = pipe_for(&inv.stdout);
        let (stderr_pipe, stderr) = pipe_for(&inv.stderr);
        b.stdout(stdout).stderr(stderr);
        preopen_all(&mut b, &inv.preopens)?;
        let host = Host {
            wasi: b.build_p1(),
            env: inv.env,
            limiter: InstanceLimiter::new(limit).metered(inv.meter.clone()),
            outbound: OutboundState::new(
                inv.allowed_hosts.clone(),
                self.inner.http.clone(),
                deadline,
                self.inner.config.outbound_timeout,
            ),
        };
        let mut store = Store::new(&self.inner.engine, host);
        store.limiter(|h| &mut h.limiter);
        store.set_epoch_deadline(1);
        let meter = inv.meter.clone();
        store.epoch_deadline_callback(move |_| {
            Ok(crate::quota::on_tick(cpu.as_ref(), meter.as_ref()))
        });

        let instance = match pre.instantiate_async(&mut store).await {
            Ok(i) => i,
            Err(e) => {
                let refused = store.data().limiter.refused;
                drop(store);
                if refused {
                    return Err(RunError::MemoryLimit {
                        limit,
                        stderr: captured(stderr_pipe),
                    });
                }
                if pool_full(&e) {
                    return Err(RunError::Busy);
                }
                // A start function that trapped.
                if let Some(trap) = e.downcast_ref::<wasmtime::Trap>() {
                    return Err(RunError::Trap {
                        message: trap.to_string(),
                        stderr: captured(stderr_pipe),
                    });
                }
                return Err(RunError::Setup(format!("{e:#}")));
            }
        };
        let func = instance
            .get_typed_func::<(), ()>(&mut store, &inv.entrypoint)
            .map_err(|_| RunError::NoEntrypoint(inv.entrypoint.clone()))?;
        let result = func.call_async(&mut store, ()).await;
        let refused = store.data().limiter.refused;
        drop(store);
        let stderr = captured(stderr_pipe);
        let exit_code = match result {
            Ok(()) => 0,
            Err(e) => match e.downcast_ref::<I32Exit>() {
                Some(I32Exit(code)) => *code,
                // No fiber stack left for the call.
                None if pool_full(&e) => return Err(RunError::Busy),
                None if refused => {
                    return Err(RunError::MemoryLimit { limit, stderr });
                }
                None => {
                    let message = match e.downcast_ref::<wasmtime::Trap>() {
                        Some(trap) => trap.to_string(),
                        None => format!("{e:#}"),
                    };
                    return Err(RunError::Trap { message, stderr });
                }
            },
        };
        Ok(Outcome {
            exit_code,
            stdout: captured(stdout_pipe),
            stderr,
        })
    }
}
