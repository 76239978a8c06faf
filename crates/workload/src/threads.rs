//! The threads that serve the pods' HTTP connections: one single-threaded tokio runtime per
//! core, each owning the connections handed to it.
//!
//! A pod's listener accepts on the agent's main runtime (work-stealing, where the API watches,
//! probes and status writes also run) and hands each accepted connection to one of these
//! threads in turn. From then on everything that connection does (hyper's parsing, the route,
//! the guest's instance, its deadline and the response) runs on that one thread: no task is
//! stolen by, or woken from, another core per request. On the work-stealing runtime a request
//! that runs a guest for tens of microseconds kept the other worker waking up to steal the
//! connections queued behind it, and that wake-up and switch was the largest single cost of the
//! request path on these VMs (README, "Where the time goes").
//!
//! What it costs: a connection never moves, so two busy connections on one thread wait for each
//! other while the other core may idle (hand-off is round-robin, so this evens out over many
//! connections). A guest in a tight loop yields at every epoch tick, so it delays the other
//! connections of its thread by at most a tick at a time, and only until its deadline. Each
//! thread holds an epoll descriptor and an eventfd: a few per node, none per pod.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::runtime::Handle;
use tokio::sync::oneshot;

thread_local! {
    /// The index of the serving thread this is (0 on any other thread).
    static LANE: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// The index of the serving thread the caller runs on, in `0..len()` of its set (0 on a thread
/// that is no serving thread). What is kept per serving thread (a WASI 0.3 service's instances)
/// is picked by it, so that a request is served without waking another core.
pub fn lane() -> usize {
    LANE.get()
}

/// A set of serving threads. Cheap to clone; the threads end (and the connections they still
/// hold are closed) when the last clone is dropped.
#[derive(Clone)]
pub struct ServeThreads {
    inner: Arc<Inner>,
}

struct Inner {
    handles: Vec<Handle>,
    next: AtomicUsize,
    /// Dropping these ends each thread's `block_on`, which drops its runtime and tasks.
    _stops: Vec<oneshot::Sender<()>>,
}

impl std::fmt::Debug for ServeThreads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServeThreads")
            .field("threads", &self.inner.handles.len())
            .finish()
    }
}

impl ServeThreads {
    /// Starts `n` threads (at least one), named `wasinode-serve-N`. `on_park` runs on a thread
    /// each time its runtime goes idle (the agent gives its allocator's collect hook).
    pub fn start(n: usize, on_park: Option<fn()>) -> std::io::Result<ServeThreads> {
        let n = n.max(1);
        let mut handles = Vec::with_capacity(n);
        let mut stops = Vec::with_capacity(n);
        for i in 0..n {
            let mut b = tokio::runtime::Builder::new_current_thread();
            b.enable_all();
            if let Some(hook) = on_park {
                b.on_thread_park(hook);
            }
            let rt = b.build()?;
            let (stop, stopped) = oneshot::channel::<()>();
            handles.push(rt.handle().clone());
            stops.push(stop);
            std::thread::Builder::new()
                .name(format!("wasinode-serve-{i}"))
                .spawn(move || {
                    LANE.set(i);
                    // Ends when the sender is dropped (or sends); the runtime and whatever it
                    // still runs are dropped here, on their own thread.
                    let _ = rt.block_on(stopped);
                })?;
        }
        Ok(ServeThreads {
            inner: Arc::new(Inner {
                handles,
                next: AtomicUsize::new(0),
                _stops: stops,
            }),
        })
    }

    /// One thread per core this process may use.
    pub fn per_core(on_park: Option<fn()>) -> std::io::Result<ServeThreads> {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        ServeThreads::start(n, on_park)
    }

    /// How many threads there are.
    pub fn len(&self) -> usize {
        self.inner.handles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.inner.handles.is_empty()
    }

    /// The thread the next connection goes to (round-robin).
    pub fn next(&self) -> &Handle {
        let i = self.inner.next.fetch_add(1, Ordering::Relaxed) % self.inner.handles.len();
        &self.inner.handles[i]
    }

    /// Runs `fut` on the next thread, in `set` (so that the caller can abort it).
    pub fn spawn_in<F>(&self, set: &mut tokio::task::JoinSet<()>, fut: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        set.spawn_on(fut, self.next());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connections_are_spread_over_every_thread_and_end_with_the_last_clone() {
        let threads = ServeThreads::start(2, None).expect("threads");
        let mut set = tokio::task::JoinSet::new();
        let (tx, mut rx) = tokio::sync::mpsc::channel(8);
        for _ in 0..4 {
            let tx = tx.clone();
            threads.spawn_in(&mut set, async move {
                let name = std::thread::current().name().map(String::from);
                let _ = tx.send((name, lane())).await;
            });
        }
        drop(tx);
        let mut seen = std::collections::BTreeMap::new();
        while let Some((name, lane)) = rx.recv().await {
            assert_eq!(
                name.as_deref(),
                Some(format!("wasinode-serve-{lane}").as_str()),
                "a thread's lane is its index"
            );
            *seen.entry(name.unwrap_or_default()).or_insert(0) += 1;
        }
        let want: std::collections::BTreeMap<String, i32> = [
            ("wasinode-serve-0".to_string(), 2),
            ("wasinode-serve-1".to_string(), 2),
        ]
        .into();
        assert_eq!(seen, want);

        // A task still running when the set is dropped ends with its thread.
        let (held_tx, held_rx) = oneshot::channel::<()>();
        let (gone_tx, gone_rx) = oneshot::channel::<()>();
        struct Gone(Option<oneshot::Sender<()>>);
        impl Drop for Gone {
            fn drop(&mut self) {
                if let Some(t) = self.0.take() {
                    let _ = t.send(());
                }
            }
        }
        // Made before the task, so that it tells its drop whether or not the thread polled the
        // task before ending.
        let gone = Gone(Some(gone_tx));
        threads.spawn_in(&mut set, async move {
            let _gone = gone;
            let _ = held_rx.await;
        });
        while set.try_join_next().is_some() {}
        set.detach_all();
        drop(threads);
        gone_rx
            .await
            .expect("the held task was dropped when its thread ended");
        drop(held_tx);
    }
}
