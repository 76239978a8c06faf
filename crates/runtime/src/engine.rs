//! The one Engine of a process, its Linker, and the programs compiled from content digests.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, InstancePre, Linker, Module,
    PoolingAllocationConfig,
};

use wasmtime::component;
use wasmtime_wasi::p2::bindings::CommandPre;
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p3::bindings::ServicePre;

use crate::cache::Artifact;
use crate::component::{ComponentHost, ProgramKind};
use crate::run::Host;

/// How the engine is set up; fixed for the life of the process.
#[derive(Clone, Debug)]
pub struct RuntimeConfig {
    /// Memory one instance may use (all its linear memories and tables together).
    pub max_memory: usize,
    /// Instances that may run at once; the pooling allocator reserves slots for this many.
    pub max_instances: u32,
    /// Where precompiled modules are kept; `None` compiles in memory only.
    pub cache_dir: Option<PathBuf>,
    /// How often running guests yield to the scheduler and deadlines are checked.
    pub epoch_tick: Duration,
    /// Longest one outbound HTTP request of a guest may take, connect to last byte; an
    /// invocation's own deadline (WAGI requests have one) cuts it sooner. This is what bounds
    /// the requests of invocations without a deadline (WASI commands).
    pub outbound_timeout: Duration,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            max_memory: 128 << 20,
            max_instances: 1000,
            cache_dir: None,
            epoch_tick: Duration::from_millis(10),
            outbound_timeout: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("cannot set up the wasm engine: {0}")]
    Engine(String),
    #[error("module {digest} is not valid WebAssembly: {reason}")]
    Compile { digest: String, reason: String },
    #[error("module {digest} cannot be linked: {reason}")]
    Link { digest: String, reason: String },
    #[error(
        "component {digest} exports neither wasi:http/incoming-handler@0.2 (an HTTP handler) nor \
         wasi:cli/run@0.2 (a command), so there is nothing to serve or run; it exports: {}",
        if exports.is_empty() { "nothing".to_string() } else { exports.join(", ") }
    )]
    NothingToRun {
        digest: String,
        exports: Vec<String>,
    },
}

/// A module or component compiled once and linked once, ready to be instantiated per
/// invocation.
pub struct Program {
    digest: String,
    pub(crate) compiled: Compiled,
}

pub(crate) enum Compiled {
    Module {
        module: Module,
        pre: InstancePre<Host>,
    },
    Http(ProxyPre<ComponentHost>),
    Service(ServicePre<ComponentHost>),
    Command(CommandPre<ComponentHost>),
}

impl Program {
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// What the program is for, as its bytes and exports said.
    pub fn kind(&self) -> ProgramKind {
        match &self.compiled {
            Compiled::Module { .. } => ProgramKind::Module,
            Compiled::Http(_) => ProgramKind::HttpHandler,
            Compiled::Service(_) => ProgramKind::HttpService,
            Compiled::Command(_) => ProgramKind::Command,
        }
    }

    /// Bytes of compiled code the program keeps mapped (what a container running it holds
    /// between requests).
    pub fn code_bytes(&self) -> usize {
        let r = match &self.compiled {
            Compiled::Module { module, .. } => module.image_range(),
            Compiled::Http(pre) => pre.instance_pre().component().image_range(),
            Compiled::Service(pre) => pre.instance_pre().component().image_range(),
            Compiled::Command(pre) => pre.instance_pre().component().image_range(),
        };
        (r.end as usize).saturating_sub(r.start as usize)
    }

    /// Whether the program is a core module exporting a function of this name.
    pub fn exports_func(&self, name: &str) -> bool {
        match &self.compiled {
            Compiled::Module { module, .. } => module
                .exports()
                .any(|e| e.name() == name && e.ty().func().is_some()),
            _ => false,
        }
    }
}

impl std::fmt::Debug for Program {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Program")
            .field("digest", &self.digest)
            .finish()
    }
}

/// Cheap to clone; every clone shares the engine, linker and programs.
#[derive(Clone)]
pub struct Runtime {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) engine: Engine,
    pub(crate) linker: Linker<Host>,
    components: component::Linker<ComponentHost>,
    /// The engine of programs that need the component model's concurrency (see [`Concurrent`]).
    concurrent: Arc<OnceLock<Result<Concurrent, String>>>,
    pub(crate) config: RuntimeConfig,
    pub(crate) http: reqwest::Client,
    programs: Mutex<HashMap<String, Arc<Program>>>,
    compiling: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    stop_ticker: Arc<AtomicBool>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop_ticker.store(true, Ordering::Relaxed);
    }
}

/// The engine and component linker of WASI 0.3 services, made on first use.
///
/// The component model's concurrency (async lifts, streams, futures: what every WASI 0.3
/// service uses) costs every store and every guest-to-host call of an engine that supports it a
/// task of its own in the store's concurrent state, whether the guest uses it or not. With it off,
/// a 0.2 `wasi:http` request cost 16% less server CPU (alternating A/B, `wrk -t1 -c16`; WAGI
/// requests within the noise) and instantiate-and-run of a WAGI module fell from 7.3-8.0 to
/// 5.5 µs. So core modules and 0.2 components run on an engine without it, and only programs
/// that need it on this second one, which a node that never runs one does not make.
pub(crate) struct Concurrent {
    pub(crate) engine: Engine,
    components: component::Linker<ComponentHost>,
}

/// The engine set-up both engines share: the pooling allocator, epochs, stacks.
fn engine_config(config: &RuntimeConfig, concurrent: bool) -> Config {
    let mut pool = PoolingAllocationConfig::default();
    // One fiber stack per running instance, module or component, so `max_instances` is what
    // bounds concurrency. A component is several core instances (its module, the preview-1
    // adapter, shims) with one or two memories and a few tables: room for that many.
    pool.total_component_instances(config.max_instances)
        .total_core_instances(config.max_instances.saturating_mul(8))
        .total_memories(config.max_instances.saturating_mul(2))
        .total_tables(config.max_instances.saturating_mul(4))
        .total_stacks(config.max_instances)
        .max_memories_per_module(4)
        .max_memory_size(config.max_memory)
        // Resetting a slot after each request was most of the per-request cost (bench/run
        // under perf: madvise, copy-on-write faults and cross-core TLB flushes took 73% of
        // the server's CPU). Keeping the first 2 MiB of a used slot resident and resetting
        // only the pages the guest dirtied (pagemap scan, Linux >= 6.7; `Auto` falls back to
        // madvise elsewhere) halved instantiate-and-run in the instantiate bench.
        .linear_memory_keep_resident(2 << 20)
        .table_keep_resident(64 << 10)
        .pagemap_scan(wasmtime::Enabled::Auto)
        // A slot goes back to its free list the moment it is reset, not batched. Once reset by
        // the pagemap scan, a memory or table still queues a decommit of the (empty) rest, and
        // a batch of 16 held 8 slots out of the pool until one `process_madvise` of zero-length
        // ranges freed them: a syscall that decommitted nothing every 8 requests, and the next
        // request took a slot whose pages were cold in the cache instead of the one just reset.
        // Flushed one at a time, an empty decommit is no syscall at all (wasmtime 48 skips
        // zero-length ranges unless batched), and the pool's module affinity hands the same
        // warm slot back. Server CPU per request fell about 4% for WAGI and 0.2 components
        // (an alternating A/B with `wrk -t1 -c16`, in the notes of issue 13; README "Where the
        // time goes" says what the syscall was).
        .decommit_batch_size(1);
    let mut cfg = Config::new();
    cfg.epoch_interruption(true)
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
        .max_wasm_stack(1 << 20)
        .async_stack_size(2 << 20);
    if concurrent {
        cfg.wasm_component_model_async(true);
    } else {
        cfg.concurrency_support(false);
    }
    cfg
}

/// Components: every WASI 0.2 interface (sockets and name lookup present but refusing every
/// address unless allowed, see component.rs) and wasi:http; on the concurrent engine WASI 0.3
/// beside them (their interfaces are versioned apart), for wasi:http/service.
fn component_linker(
    engine: &Engine,
    concurrent: bool,
) -> wasmtime::Result<component::Linker<ComponentHost>> {
    let mut components: component::Linker<ComponentHost> = component::Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut components)?;
    wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut components)?;
    if concurrent {
        wasmtime_wasi::p3::add_to_linker(&mut components)?;
        wasmtime_wasi_http::p3::add_to_linker(&mut components)?;
    }
    Ok(components)
}

impl Runtime {
    pub fn new(config: RuntimeConfig) -> Result<Self, RuntimeError> {
        let err = |e: wasmtime::Error| RuntimeError::Engine(format!("{e:#}"));
        let engine = Engine::new(&engine_config(&config, false)).map_err(err)?;

        let mut linker: Linker<Host> = Linker::new(&engine);
        wasmtime_wasi::p1::add_to_linker_async(&mut linker, |h: &mut Host| &mut h.wasi)
            .map_err(err)?;
        // Every buffer of an fd_write, as WAGI wrote them (see writev.rs).
        crate::writev::add_to_linker(&mut linker).map_err(err)?;
        // The environment from one prepared buffer, not cloned per call (see environ.rs).
        crate::environ::add_to_linker(&mut linker).map_err(err)?;
        crate::outbound::add_to_linker(&mut linker).map_err(err)?;
        let components = component_linker(&engine, false).map_err(err)?;

        // No proxy from the environment: a proxy would resolve names itself, past the resolver
        // that keeps guests off restricted addresses.
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .dns_resolver(Arc::new(crate::outbound::GuardedResolver::system()))
            .connect_timeout(config.outbound_timeout)
            .build()
            .map_err(|e| RuntimeError::Engine(format!("outbound HTTP client: {e}")))?;

        let stop_ticker = Arc::new(AtomicBool::new(false));
        let concurrent = Arc::new(OnceLock::new());
        spawn_ticker(
            engine.clone(),
            concurrent.clone(),
            config.epoch_tick,
            stop_ticker.clone(),
        );

        Ok(Runtime {
            inner: Arc::new(Inner {
                engine,
                linker,
                components,
                concurrent,
                config,
                http,
                programs: Mutex::new(HashMap::new()),
                compiling: Mutex::new(HashMap::new()),
                stop_ticker,
            }),
        })
    }

    pub fn config(&self) -> &RuntimeConfig {
        &self.inner.config
    }

    /// The program for `digest`, compiling `bytes` (wasm or WAT) only if no program of that digest
    /// exists yet, in memory or in the disk cache. Concurrent loads of one digest compile once.
    /// This blocks while compiling: call it from a blocking task.
    pub fn load(&self, digest: &str, bytes: &[u8]) -> Result<Arc<Program>, RuntimeError> {
        if let Some(p) = self.loaded(digest) {
            return Ok(p);
        }
        let gate = {
            let mut map = self
                .inner
                .compiling
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            map.entry(digest.to_string()).or_default().clone()
        };
        let _held = gate.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = self.loaded(digest) {
            return Ok(p);
        }
        let link_err = |e: wasmtime::Error| RuntimeError::Link {
            digest: digest.to_string(),
            reason: format!("{e:#}"),
        };
        let dir = self.inner.config.cache_dir.as_deref();
        let engine = &self.inner.engine;
        let on_concurrent = |first: Option<RuntimeError>| match self.concurrent() {
            Ok(c) => {
                crate::cache::load_or_compile(&c.engine, dir, digest, bytes).map(|a| (a, Some(c)))
            }
            // Without the second engine, what the first said is the better reason.
            Err(e) => Err(first.unwrap_or(e)),
        };
        let (artifact, concurrent) = match crate::cache::load_or_compile(engine, dir, digest, bytes)
        {
            Ok(Artifact::Component(c))
                if crate::component::kind_of(&crate::component::export_names(engine, &c))
                    == Some(ProgramKind::HttpService) =>
            {
                on_concurrent(None)?
            }
            Ok(a) => (a, None),
            // A component that uses the component model's concurrency is refused by the first
            // engine; it gets the one that has it. Anything else (a core module, bytes that are
            // no wasm at all) would fail there the same way, and does not make the second engine.
            Err(e)
                if wat::parse_bytes(bytes)
                    .is_ok_and(|b| crate::component::is_component_binary(&b)) =>
            {
                on_concurrent(Some(e))?
            }
            Err(e) => return Err(e),
        };
        let compiled = match artifact {
            Artifact::Module(module) => {
                let pre = self
                    .inner
                    .linker
                    .instantiate_pre(&module)
                    .map_err(link_err)?;
                Compiled::Module { module, pre }
            }
            Artifact::Component(c) => {
                let exports = crate::component::export_names(c.engine(), &c);
                let Some(kind) = crate::component::kind_of(&exports) else {
                    return Err(RuntimeError::NothingToRun {
                        digest: digest.to_string(),
                        exports,
                    });
                };
                let linker = concurrent.map_or(&self.inner.components, |c| &c.components);
                let pre = linker.instantiate_pre(&c).map_err(link_err)?;
                match kind {
                    ProgramKind::HttpHandler => {
                        Compiled::Http(ProxyPre::new(pre).map_err(link_err)?)
                    }
                    ProgramKind::HttpService => {
                        Compiled::Service(ServicePre::new(pre).map_err(link_err)?)
                    }
                    _ => Compiled::Command(CommandPre::new(pre).map_err(link_err)?),
                }
            }
        };
        let program = Arc::new(Program {
            digest: digest.to_string(),
            compiled,
        });
        self.inner
            .programs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(digest.to_string(), program.clone());
        self.inner
            .compiling
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(digest);
        Ok(program)
    }

    /// The engine with the component model's concurrency, made on the first call.
    fn concurrent(&self) -> Result<&Concurrent, RuntimeError> {
        let made = self.inner.concurrent.get_or_init(|| {
            let engine = Engine::new(&engine_config(&self.inner.config, true))
                .map_err(|e| format!("{e:#}"))?;
            let components = component_linker(&engine, true).map_err(|e| format!("{e:#}"))?;
            tracing::info!(
                "made the engine of WASI 0.3 components (the component model's concurrency)"
            );
            Ok(Concurrent { engine, components })
        });
        made.as_ref()
            .map_err(|e| RuntimeError::Engine(format!("the engine of WASI 0.3 components: {e}")))
    }

    /// The program already loaded for `digest`, if any.
    pub fn loaded(&self, digest: &str) -> Option<Arc<Program>> {
        self.inner
            .programs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(digest)
            .cloned()
    }

    /// Forget programs whose digest is not in `keep` (their machine code stays in the disk cache).
    pub fn retain(&self, keep: &dyn Fn(&str) -> bool) {
        self.inner
            .programs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|d, _| keep(d));
    }
}

fn spawn_ticker(
    engine: Engine,
    concurrent: Arc<OnceLock<Result<Concurrent, String>>>,
    tick: Duration,
    stop: Arc<AtomicBool>,
) {
    let spawned = std::thread::Builder::new()
        .name("wasm-epoch".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(tick);
                engine.increment_epoch();
                if let Some(Ok(c)) = concurrent.get() {
                    c.engine.increment_epoch();
                }
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the epoch ticker: deadlines will not be enforced");
    }
}
