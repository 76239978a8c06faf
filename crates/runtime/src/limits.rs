//! Per-instance memory limit: the sum of every linear memory and table of one instance, not a
//! limit per memory (a module with two memories gets the same budget as one with one), plus what
//! the host holds for the instance (outbound HTTP responses not yet closed).

use std::sync::Arc;

use wasmtime::ResourceLimiter;

use crate::usage::Meter;

#[derive(Debug)]
pub(crate) struct InstanceLimiter {
    limit: usize,
    used: usize,
    /// Set when a grow was refused, so a trap that follows is reported as the limit it was.
    pub(crate) refused: bool,
    /// The container's usage: what this instance holds is counted there while it lives.
    meter: Option<Arc<Meter>>,
}

impl Drop for InstanceLimiter {
    fn drop(&mut self) {
        if let Some(m) = &self.meter {
            m.shrank(self.used);
            m.instance_ended();
        }
    }
}

impl InstanceLimiter {
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            limit,
            used: 0,
            refused: false,
            meter: None,
        }
    }

    /// Counts what this instance holds in `meter` while it lives.
    pub(crate) fn metered(mut self, meter: Option<Arc<Meter>>) -> Self {
        if let Some(m) = &meter {
            m.instance_started();
        }
        self.meter = meter;
        self
    }

    fn take(&mut self, total: usize) {
        if let Some(m) = &self.meter {
            m.grew(total - self.used);
        }
        self.used = total;
    }

    /// Bytes of the budget not yet used.
    pub(crate) fn available(&self) -> usize {
        self.limit.saturating_sub(self.used)
    }

    /// Takes `bytes` of the budget for something the host holds for the guest; false (and
    /// nothing taken) when that would exceed the budget. A refusal here is not a refused grow:
    /// the guest is told through the call that asked, and `refused` is left alone.
    pub(crate) fn reserve(&mut self, bytes: usize) -> bool {
        match self.used.checked_add(bytes) {
            Some(total) if total <= self.limit => {
                self.take(total);
                true
            }
            _ => false,
        }
    }

    /// Gives back what `reserve` took.
    pub(crate) fn release(&mut self, bytes: usize) {
        let left = self.used.saturating_sub(bytes);
        if let Some(m) = &self.meter {
            m.shrank(self.used - left);
        }
        self.used = left;
    }

    fn grow(&mut self, current: usize, desired: usize) -> bool {
        let extra = desired.saturating_sub(current);
        match self.used.checked_add(extra) {
            Some(total) if total <= self.limit => {
                self.take(total);
                true
            }
            _ => {
                self.refused = true;
                false
            }
        }
    }
}

impl ResourceLimiter for InstanceLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(self.grow(current, desired))
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // Table elements are counted at pointer size against the same budget.
        let size = std::mem::size_of::<usize>();
        Ok(self.grow(current.saturating_mul(size), desired.saturating_mul(size)))
    }

    fn instances(&self) -> usize {
        // A module is one instance; a component is several core instances (its modules, the
        // preview-1 adapter, shims). The pooling allocator bounds them per component anyway.
        64
    }

    fn memories(&self) -> usize {
        // More than one memory is allowed; their sum is what is limited.
        16
    }

    fn tables(&self) -> usize {
        16
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_is_shared_by_all_memories() {
        let mut l = InstanceLimiter::new(100);
        assert!(l.grow(0, 60));
        assert!(!l.grow(0, 60), "second memory must not get its own 100");
        assert!(l.refused);
        assert!(l.grow(60, 100));
        assert!(!l.grow(0, 1));
    }

    #[test]
    fn host_reservations_share_the_budget_and_are_given_back() {
        let mut l = InstanceLimiter::new(100);
        assert!(l.grow(0, 40));
        assert!(l.reserve(50));
        assert_eq!(l.available(), 10);
        assert!(!l.reserve(11), "more than what is left");
        assert!(!l.refused, "a refused reservation is not a refused grow");
        assert!(
            !l.grow(40, 60),
            "memory cannot grow into what the host holds"
        );
        l.release(50);
        assert!(l.grow(40, 60));
        assert_eq!(l.available(), 40);
    }

    #[test]
    fn the_meter_holds_what_the_instance_holds_while_it_lives() {
        let m = Meter::new();
        let mut l = InstanceLimiter::new(100).metered(Some(m.clone()));
        assert!(l.grow(0, 40));
        assert!(l.reserve(20));
        assert_eq!(m.instances_bytes(), 60);
        l.release(20);
        assert!(!l.grow(40, 200), "refused grows are not counted");
        assert_eq!(m.instances_bytes(), 40);
        assert_eq!(m.instances(), 1);
        drop(l);
        assert_eq!(m.instances_bytes(), 0);
        assert_eq!(m.instances(), 0);
    }
}
