//! A container's resource limits as the runtime enforces them: a memory budget per instance, and
//! a CPU quota shared by all of the container's instances.
//!
//! The CPU quota works like the kernel's CFS bandwidth control (`cpu.max`, which the kubelet sets
//! from `limits.cpu`): in each period of [`PERIOD`] the container's instances together may run
//! wasm for `limit x PERIOD`; past that, each of them waits for the next period.
//!
//! Run time is counted at the epoch ticks: every tick an instance sees while it runs wasm charges
//! one tick to its container. A tick falls into a short run with the probability that the run is
//! long compared to a tick, so the charge is an unbiased estimate of the time spent in the guest,
//! and it costs nothing on the request path (the callback runs once per tick, not per request).
//! It is wall time in the guest, so on an overloaded host it over-counts: the limit errs on the
//! strict side.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// The enforcement period, as CFS's default `cpu.cfs_period_us` (100 ms).
pub const PERIOD: Duration = Duration::from_millis(100);

/// What one container may use. Default: only the node's limits.
#[derive(Debug, Clone, Default)]
pub struct Limits {
    /// Bytes of linear memory, tables and host-held data per instance (`limits.memory`); never
    /// above the node's `max_memory`, which applies when this is `None`.
    pub memory: Option<usize>,
    /// The container's CPU quota (`limits.cpu`), shared by all of its instances.
    pub cpu: Option<std::sync::Arc<CpuQuota>>,
}

/// CPU time a container's instances may spend per [`PERIOD`].
#[derive(Debug)]
pub struct CpuQuota {
    /// Nanoseconds of guest run time per period.
    quota: u64,
    /// What one tick charges, in nanoseconds.
    tick: u64,
    state: Mutex<Window>,
}

#[derive(Debug)]
struct Window {
    start: Instant,
    used: u64,
    throttled: u64,
}

impl CpuQuota {
    /// A quota of `millicores` (1000 = one core), counted in ticks of `tick` (the engine's epoch
    /// tick). Returns `None` for 0: Kubernetes refuses a zero CPU limit, and no quota is no limit.
    pub fn new(millicores: u64, tick: Duration) -> Option<CpuQuota> {
        if millicores == 0 {
            return None;
        }
        let quota = (PERIOD.as_nanos() as u64).saturating_mul(millicores) / 1000;
        Some(CpuQuota {
            quota,
            tick: tick.as_nanos() as u64,
            state: Mutex::new(Window {
                start: Instant::now(),
                used: 0,
                throttled: 0,
            }),
        })
    }

    /// Charges one tick of run time at `now`; returns how long the instance must wait when the
    /// period's quota is spent.
    pub fn charge(&self, now: Instant) -> Option<Duration> {
        let mut w = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let elapsed = now.saturating_duration_since(w.start);
        if elapsed >= PERIOD {
            // A new period; periods with nothing charged are skipped, not banked.
            let periods = elapsed.as_nanos() / PERIOD.as_nanos();
            w.start += PERIOD * periods as u32;
            w.used = 0;
        }
        w.used = w.used.saturating_add(self.tick);
        if w.used <= self.quota {
            return None;
        }
        w.throttled += 1;
        Some((w.start + PERIOD).saturating_duration_since(now))
    }

    /// How many times an instance of this container was made to wait.
    pub fn throttled(&self) -> u64 {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .throttled
    }
}

/// The epoch callback's answer for an instance with these limits: yield to the executor, and,
/// when the container's CPU quota is spent, first wait for the next period (counted in the
/// container's meter).
pub(crate) fn on_tick(
    cpu: Option<&std::sync::Arc<CpuQuota>>,
    meter: Option<&std::sync::Arc<crate::Meter>>,
) -> wasmtime::UpdateDeadline {
    match cpu.and_then(|q| q.charge(Instant::now())) {
        Some(wait) => {
            if let Some(m) = meter {
                m.was_throttled();
            }
            wasmtime::UpdateDeadline::YieldCustom(1, Box::pin(tokio::time::sleep(wait)))
        }
        None => wasmtime::UpdateDeadline::Yield(1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TICK: Duration = Duration::from_millis(10);

    #[test]
    fn half_a_core_runs_half_of_each_period() {
        let q = CpuQuota::new(500, TICK).expect("quota");
        let t0 = q.state.lock().expect("lock").start;
        // Five ticks of 10 ms fit in 50 ms of a 100 ms period; the sixth waits for the next.
        for i in 0..5 {
            assert_eq!(q.charge(t0 + TICK * i), None, "tick {i}");
        }
        assert_eq!(q.charge(t0 + TICK * 5), Some(Duration::from_millis(50)));
        // The next period starts afresh.
        assert_eq!(q.charge(t0 + PERIOD), None);
        assert_eq!(q.throttled(), 1);
    }

    #[test]
    fn idle_periods_are_not_banked() {
        let q = CpuQuota::new(100, TICK).expect("quota");
        let t0 = q.state.lock().expect("lock").start;
        let later = t0 + PERIOD * 7 + Duration::from_millis(30);
        assert_eq!(q.charge(later), None);
        assert_eq!(
            q.charge(later + Duration::from_millis(1)),
            Some(Duration::from_millis(69)),
            "one tick per 100 ms for a tenth of a core, however long it idled"
        );
    }

    #[test]
    fn zero_is_no_quota() {
        assert!(CpuQuota::new(0, TICK).is_none());
    }
}
