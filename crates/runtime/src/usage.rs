//! What one container uses, as the kubelet's stats report it: cumulative CPU time and current
//! memory. A [`Meter`] is made once per container when it starts and handed to every
//! invocation of it ([`crate::Invocation::meter`]); per request that costs a few relaxed atomic
//! adds and two reads of the monotonic clock per poll of the guest's future.
//!
//! - CPU: the time each poll of an invocation's future takes on its thread ([`Metered`]):
//!   everything done on the guest's behalf while it is polled (store and WASI context set-up,
//!   instantiation, the guest's own code, host calls, the store's drop) and nothing of other
//!   tasks on the same thread, nor the time the guest waits (it is not polled then). Short polls
//!   are timed by the wall clock, long-running guests by the thread's CPU clock
//!   (`CLOCK_THREAD_CPUTIME_ID`).
//! - Memory: the bytes the instances' [`crate::limits::InstanceLimiter`]s hold (every linear
//!   memory and table, and what the host holds for the guest, such as outbound responses),
//!   while the instances live, plus a fixed part for what the container holds between
//!   requests (its compiled code), set with [`Meter::set_resident`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// One container's usage. Shared by every invocation of the container; read by stats.
#[derive(Debug, Default)]
pub struct Meter {
    cpu_ns: AtomicU64,
    instances_bytes: AtomicU64,
    resident_bytes: AtomicU64,
    instances: AtomicU64,
    throttled: AtomicU64,
}

impl Meter {
    pub fn new() -> Arc<Meter> {
        Arc::new(Meter::default())
    }

    /// CPU time used by the container since it started, in nanoseconds (never decreases).
    pub fn cpu_ns(&self) -> u64 {
        self.cpu_ns.load(Ordering::Relaxed)
    }

    /// Memory the container holds now, in bytes: its live instances and its resident part.
    pub fn memory_bytes(&self) -> u64 {
        self.instances_bytes
            .load(Ordering::Relaxed)
            .saturating_add(self.resident_bytes.load(Ordering::Relaxed))
    }

    /// Bytes the live instances hold now (without the resident part).
    pub fn instances_bytes(&self) -> u64 {
        self.instances_bytes.load(Ordering::Relaxed)
    }

    /// Instances of the container alive now (a 0.3 service's pooled ones included).
    pub fn instances(&self) -> u64 {
        self.instances.load(Ordering::Relaxed)
    }

    /// Times an instance of the container waited because its CPU quota (`limits.cpu`) was
    /// spent (never decreases).
    pub fn throttled(&self) -> u64 {
        self.throttled.load(Ordering::Relaxed)
    }

    pub(crate) fn was_throttled(&self) {
        self.throttled.fetch_add(1, Ordering::Relaxed);
    }

    /// What the container holds whatever its instances do (its compiled code).
    pub fn set_resident(&self, bytes: u64) {
        self.resident_bytes.store(bytes, Ordering::Relaxed);
    }

    /// Adds CPU time measured elsewhere (a compile on a blocking thread, say).
    pub fn add_cpu_ns(&self, ns: u64) {
        self.cpu_ns.fetch_add(ns, Ordering::Relaxed);
    }

    pub(crate) fn instance_started(&self) {
        self.instances.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn instance_ended(&self) {
        self.instances.fetch_sub(1, Ordering::Relaxed);
    }

    pub(crate) fn grew(&self, bytes: usize) {
        self.instances_bytes
            .fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub(crate) fn shrank(&self, bytes: usize) {
        self.instances_bytes
            .fetch_sub(bytes as u64, Ordering::Relaxed);
    }
}

/// The CPU time of the calling thread, in nanoseconds.
pub fn thread_cpu_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    (t.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(t.tv_nsec as u64)
}

/// Runs `f` and adds the CPU time it took on this thread to `meter`.
pub fn measure<R>(meter: Option<&Meter>, f: impl FnOnce() -> R) -> R {
    let Some(m) = meter else {
        return f();
    };
    let before = thread_cpu_ns();
    let r = f();
    m.add_cpu_ns(thread_cpu_ns().saturating_sub(before));
    r
}

/// A poll at least this long makes the next polls of the same future read the thread's CPU
/// clock (a system call, about half a microsecond here) instead of the wall clock (vDSO, tens of
/// nanoseconds).
const LONG_POLL: Duration = Duration::from_micros(500);

pin_project_lite::pin_project! {
    /// A future whose polls are charged to a meter. Short polls (most requests run to their end
    /// in one or two) are charged their wall time, which is the thread's CPU time unless the
    /// thread was preempted during it; once a poll has taken [`LONG_POLL`] or more, the
    /// guest is a long-running one (it yields at every epoch tick), and every further poll is
    /// charged the thread's CPU time, so that a busy host does not inflate it.
    pub struct Metered<F> {
        #[pin]
        inner: F,
        meter: Option<Arc<Meter>>,
        precise: bool,
    }
}

impl<F: Future> Metered<F> {
    pub fn new(inner: F, meter: Option<Arc<Meter>>) -> Self {
        Self {
            inner,
            meter,
            precise: false,
        }
    }
}

impl<F: Future> Future for Metered<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let Some(m) = this.meter else {
            return this.inner.poll(cx);
        };
        if *this.precise {
            let before = thread_cpu_ns();
            let r = this.inner.poll(cx);
            m.add_cpu_ns(thread_cpu_ns().saturating_sub(before));
            return r;
        }
        let before = Instant::now();
        let r = this.inner.poll(cx);
        let took = before.elapsed();
        m.add_cpu_ns(took.as_nanos() as u64);
        if took >= LONG_POLL {
            *this.precise = true;
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measure_counts_this_threads_cpu() {
        let m = Meter::new();
        let mut x = 0u64;
        measure(Some(&m), || {
            for i in 0..5_000_000u64 {
                x = std::hint::black_box(x.wrapping_add(i));
            }
        });
        assert!(m.cpu_ns() > 0, "spinning took no CPU time");
    }

    #[test]
    fn a_long_poll_makes_the_next_ones_read_the_thread_clock() {
        let m = Meter::new();
        let mut polls = 0;
        let fut = std::future::poll_fn(|_| {
            polls += 1;
            if polls > 1 {
                return Poll::Ready(());
            }
            let t = Instant::now();
            while t.elapsed() < LONG_POLL * 2 {
                std::hint::spin_loop();
            }
            Poll::Pending
        });
        let mut f = std::pin::pin!(Metered::new(fut, Some(m.clone())));
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(f.as_mut().poll(&mut cx).is_pending());
        assert!(f.precise, "a poll of twice LONG_POLL is long");
        assert!(m.cpu_ns() >= LONG_POLL.as_nanos() as u64 * 2);
        assert!(f.as_mut().poll(&mut cx).is_ready());
    }

    #[test]
    fn memory_is_instances_plus_resident() {
        let m = Meter::new();
        m.set_resident(1000);
        m.grew(500);
        assert_eq!(m.memory_bytes(), 1500);
        m.shrank(500);
        assert_eq!(m.memory_bytes(), 1000);
    }
}
