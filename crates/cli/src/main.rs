//! The `wasinode` binary: `run` serves pods standalone (the workload crate), `node` joins a
//! cluster as a node (the node crate), `nodepool` manages pools of such nodes (the nodepool
//! crate), `push` and `pull` move modules to and from registries (the oci crate).
//!
//! Flags and wiring only: each subcommand parses its flags into the library's plain options,
//! calls the library, and prints what comes back; errors become `anyhow` here, at the edge.

mod engine;
mod node;
mod nodepool;
mod pushpull;
mod run;

use std::io::IsTerminal as _;

use clap::{Parser, Subcommand};

/// mimalloc instead of glibc's malloc. Per request, the server allocates and frees many small
/// objects on whichever worker thread polls it (a store, its WASI context, CGI variables, hyper's
/// buffers); mimalloc's thread-local free lists make that cheaper, and it returns the pages of
/// freed memory to the kernel, where glibc keeps what thousands of deleted pods used (measured in
/// bench/run node's density section: README, Benchmark). The feature `system-allocator` keeps
/// glibc's malloc instead, for heap profilers that hook it (heaptrack: README, Benchmark).
#[cfg(not(feature = "system-allocator"))]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Giving back what mimalloc holds for nothing.
#[cfg(not(feature = "system-allocator"))]
mod allocator {
    use std::cell::Cell;
    use std::time::{Duration, Instant};

    unsafe extern "C" {
        /// mimalloc's own: frees the calling thread's empty pages, and with `force` purges
        /// (returns to the kernel) the arena memory waiting to be purged.
        fn mi_collect(force: bool);
    }

    /// How often, at most, a worker thread collects its heap when it goes idle.
    const EVERY: Duration = Duration::from_secs(2);

    /// Run by each tokio worker when it parks (has nothing to do). A block freed on another
    /// thread than the one that allocated it waits on its page's list until the owning thread
    /// allocates again in that size class, and so does the page it empties: after thousands of
    /// pods were deleted (their state freed by whichever worker ran the delete) such pages were
    /// part of what the agent kept: collecting here took the resident memory 120 s after a
    /// 3,000-pod wave from 83 to 75 MiB (bench/run node's density section; README, Benchmark).
    /// It runs at most every [`EVERY`] per thread and never on a busy one; its cost on the
    /// request path was within the benchmark's noise.
    pub fn collect_when_idle() {
        thread_local! {
            static LAST: Cell<Option<Instant>> = const { Cell::new(None) };
        }
        let now = Instant::now();
        if LAST.get().is_some_and(|t| now.duration_since(t) < EVERY) {
            return;
        }
        LAST.set(Some(now));
        // SAFETY: mimalloc is this binary's global allocator (linked in by the mimalloc crate);
        // mi_collect takes no pointer and may be called from any thread at any time.
        unsafe { mi_collect(true) };
    }
}

/// What every runtime thread of the binary runs when it goes idle.
fn park_hook() -> Option<fn()> {
    #[cfg(not(feature = "system-allocator"))]
    return Some(allocator::collect_when_idle);
    #[cfg(feature = "system-allocator")]
    return None;
}

#[derive(Parser, Debug)]
#[command(
    name = "wasinode",
    version,
    about = "Run WebAssembly (WAGI and WASI) pods, standalone or as a Kubernetes node",
    long_about = "wasinode runs Kubernetes Pods whose container images are WebAssembly modules, on \
wasmtime. Pods with the alpha.wagi.krustlet.dev/default-host and .../modules annotations serve HTTP \
routes CGI-style (WAGI); other pods run their modules as WASI commands.\n\n\
Examples:\n  wasinode run examples/wagi-demo.yaml\n  wasinode push hello.wasm 127.0.0.1:5000/hello:v1\n  wasinode pull 127.0.0.1:5000/hello:v1"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve Pod manifests on this machine, no cluster needed, until SIGINT/SIGTERM.
    Run(run::RunArgs),
    /// Join a Kubernetes cluster as a node that runs the pods bound to it, until SIGINT/SIGTERM.
    Node(Box<node::NodeArgs>),
    /// Pools of WASI nodes on a cluster: add, show, list, scale, delete (`workloadRuntime: WasmWasi`).
    Nodepool(nodepool::NodePoolArgs),
    /// Publish a .wasm (or .wat) module to an OCI registry; prints the manifest digest.
    Push(pushpull::PushArgs),
    /// Fetch a module from an OCI registry into the local store; prints the manifest digest.
    Pull(pushpull::PullArgs),
}

fn main() -> std::process::ExitCode {
    // wasmtime makes an error value on some ordinary paths (a component store whose guest
    // fibers are disposed when it is dropped, once per request), and each captures a backtrace
    // when RUST_BACKTRACE is set in the environment: a third of the server's CPU per request.
    // Library backtraces are never shown by wasinode (errors are printed by their messages), so
    // unless the user asked for them with RUST_LIB_BACKTRACE, they are off; panics keep theirs.
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        // SAFETY: first thing in main, before any thread exists.
        unsafe { std::env::set_var("RUST_LIB_BACKTRACE", "0") };
    }
    // No transparent huge pages (why: the function's comment).
    if let Err(e) = runtime::no_transparent_huge_pages() {
        eprintln!("wasinode: warning: transparent huge pages stay on: {e}");
    }
    raise_open_files_limit();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("WASINODE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        // Escape codes only for a person at a terminal: an agent's log is often a file (a node
        // pool's agent.log, journald, `kubectl logs` of a DaemonSet).
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cli = Cli::parse();
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all();
    if let Some(hook) = park_hook() {
        rt.on_thread_park(hook);
    }
    let rt = match rt.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("wasinode: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        match cli.command {
            Command::Run(a) => run::run(a).await,
            Command::Node(a) => node::node(*a).await,
            Command::Nodepool(a) => nodepool::nodepool(a).await,
            Command::Push(a) => pushpull::push(a).await.map(|_| 0),
            Command::Pull(a) => pushpull::pull(a).await.map(|_| 0),
        }
    });
    match result {
        Ok(0) => std::process::ExitCode::SUCCESS,
        Ok(code) => std::process::ExitCode::from(code.clamp(1, 255) as u8),
        Err(e) => {
            eprintln!("wasinode: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Raises this process's soft limit of open files to its hard limit, as Go programs (the
/// kubelet, containerd) do at start: a pod costs the agent a descriptor while it serves (its
/// listener), and Debian's default soft limit of 1,024 would cap a node near a thousand pods
/// while the hard limit allows far more. The hard limit is the operator's to set.
fn raise_open_files_limit() {
    #[cfg(unix)]
    {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit and setrlimit with a valid pointer to a local rlimit.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
                lim.rlim_cur = lim.rlim_max;
                libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            }
        }
    }
}
