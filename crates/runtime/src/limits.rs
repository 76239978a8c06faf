//! Per-instance memory limit: the sum of every linear memory and table of one instance, not a
//! limit per memory (a module with two memories gets the same budget as one with one).

use wasmtime::ResourceLimiter;

#[derive(Debug)]
pub(crate) struct InstanceLimiter {
    limit: usize,
    used: usize,
    /// Set when a grow was refused, so a trap that follows is reported as the limit it was.
    pub(crate) refused: bool,
}

impl InstanceLimiter {
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            limit,
            used: 0,
            refused: false,
        }
    }

    fn grow(&mut self, current: usize, desired: usize) -> bool {
        let extra = desired.saturating_sub(current);
        match self.used.checked_add(extra) {
            Some(total) if total <= self.limit => {
                self.used = total;
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
        1
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
}
