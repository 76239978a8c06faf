//! The kubelet's hard eviction thresholds (`--eviction-hard`): below them the node reports
//! MemoryPressure, DiskPressure or PIDPressure, and its allocatable memory and ephemeral storage
//! are its capacity less them.
//!
//! Syntax and defaults are the kubelet's: `memory.available<100Mi,nodefs.available<10%`, one
//! `signal<value` per entry, the value a quantity (`100Mi`, `1Gi`, `5000`) or a percentage of the
//! signal's capacity. Given at all, the flag replaces every default: a signal it does not name
//! has no threshold (the kubelet documents the same). Without it: `memory.available<100Mi`,
//! `nodefs.available<10%`, `nodefs.inodesFree<5%` (the kubelet's defaults) and
//! `pid.available<10%` (the kubelet has none; the usual setting).

use std::fmt;
use std::str::FromStr;

/// Why an `--eviction-hard` value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EvictionError {
    #[error(
        "{0:?} is not an eviction threshold: write SIGNAL<VALUE, e.g. nodefs.available<10% (only `<` is supported)"
    )]
    Syntax(String),
    #[error(
        "unknown eviction signal {0:?}: wasinode measures memory.available, nodefs.available, nodefs.inodesFree and pid.available"
    )]
    Signal(String),
    #[error("eviction signal {0} is given twice")]
    Twice(&'static str),
    #[error("{signal}<{value}: {why}")]
    Value {
        signal: &'static str,
        value: String,
        why: String,
    },
}

/// One threshold: a minimum amount of what the signal measures.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Threshold {
    /// Bytes (memory, nodefs) or a count (inodes, pids).
    Quantity(u64),
    /// A share of the signal's capacity, 0 to 100.
    Percent(f64),
}

impl Threshold {
    /// The minimum for a capacity of `total`.
    pub fn min_of(self, total: u64) -> u64 {
        match self {
            Threshold::Quantity(q) => q,
            // Rounded up: `available < min` is the kubelet's `available < total * p / 100`.
            Threshold::Percent(p) => (total as f64 * p / 100.0).ceil() as u64,
        }
    }

    /// Whether `available` of `total` is below the threshold.
    pub fn crossed(self, available: u64, total: u64) -> bool {
        available < self.min_of(total)
    }
}

impl fmt::Display for Threshold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Threshold::Quantity(q) => write!(f, "{q}"),
            Threshold::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// The node's hard eviction thresholds; `None`: no threshold for that signal.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvictionHard {
    pub memory_available: Option<Threshold>,
    pub nodefs_available: Option<Threshold>,
    pub nodefs_inodes_free: Option<Threshold>,
    pub pid_available: Option<Threshold>,
}

impl Default for EvictionHard {
    fn default() -> Self {
        EvictionHard {
            memory_available: Some(Threshold::Quantity(100 << 20)),
            nodefs_available: Some(Threshold::Percent(10.0)),
            nodefs_inodes_free: Some(Threshold::Percent(5.0)),
            pid_available: Some(Threshold::Percent(10.0)),
        }
    }
}

impl EvictionHard {
    /// No threshold at all (what an empty `--eviction-hard=` says).
    pub fn none() -> Self {
        EvictionHard {
            memory_available: None,
            nodefs_available: None,
            nodefs_inodes_free: None,
            pid_available: None,
        }
    }
}

impl FromStr for EvictionHard {
    type Err = EvictionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = EvictionHard::none();
        for entry in s.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let (signal, value) = entry
                .split_once('<')
                .filter(|(_, v)| !v.starts_with('='))
                .ok_or_else(|| EvictionError::Syntax(entry.to_string()))?;
            let (name, slot) = match signal.trim() {
                "memory.available" => ("memory.available", &mut out.memory_available),
                "nodefs.available" => ("nodefs.available", &mut out.nodefs_available),
                "nodefs.inodesFree" => ("nodefs.inodesFree", &mut out.nodefs_inodes_free),
                "pid.available" => ("pid.available", &mut out.pid_available),
                other => return Err(EvictionError::Signal(other.to_string())),
            };
            if slot.is_some() {
                return Err(EvictionError::Twice(name));
            }
            *slot = Some(threshold(name, value.trim())?);
        }
        Ok(out)
    }
}

fn threshold(signal: &'static str, value: &str) -> Result<Threshold, EvictionError> {
    let refuse = |why: String| EvictionError::Value {
        signal,
        value: value.to_string(),
        why,
    };
    if let Some(p) = value.strip_suffix('%') {
        let p: f64 = p
            .trim()
            .parse()
            .map_err(|_| refuse("not a percentage".into()))?;
        if !(0.0..=100.0).contains(&p) {
            return Err(refuse("a percentage is between 0% and 100%".into()));
        }
        return Ok(Threshold::Percent(p));
    }
    workload::quantity::value(value)
        .map(Threshold::Quantity)
        .map_err(|e| refuse(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_kubelets_syntax() {
        let e: EvictionHard = "memory.available<500Mi, nodefs.available<1Gi,nodefs.inodesFree<2.5%"
            .parse()
            .unwrap();
        assert_eq!(e.memory_available, Some(Threshold::Quantity(500 << 20)));
        assert_eq!(e.nodefs_available, Some(Threshold::Quantity(1 << 30)));
        assert_eq!(e.nodefs_inodes_free, Some(Threshold::Percent(2.5)));
        assert_eq!(e.pid_available, None, "a signal not named has no threshold");
        assert_eq!("".parse::<EvictionHard>(), Ok(EvictionHard::none()));
    }

    #[test]
    fn refuses_what_the_kubelet_refuses() {
        let err = |s: &str| s.parse::<EvictionHard>().unwrap_err();
        assert!(matches!(
            err("nodefs.available>10%"),
            EvictionError::Syntax(_)
        ));
        assert!(matches!(
            err("nodefs.available<=10%"),
            EvictionError::Syntax(_)
        ));
        assert!(matches!(
            err("imagefs.available<15%"),
            EvictionError::Signal(_)
        ));
        assert!(matches!(
            err("pid.available<5%,pid.available<6%"),
            EvictionError::Twice("pid.available")
        ));
        assert!(matches!(
            err("nodefs.available<110%"),
            EvictionError::Value { .. }
        ));
        assert!(matches!(
            err("memory.available<lots"),
            EvictionError::Value { .. }
        ));
        assert!(matches!(
            err("memory.available<-1Mi"),
            EvictionError::Value { .. }
        ));
    }

    #[test]
    fn a_threshold_is_crossed_strictly_below_it() {
        let ten = Threshold::Percent(10.0);
        assert!(!ten.crossed(100, 1000));
        assert!(ten.crossed(99, 1000));
        assert!(!Threshold::Quantity(5).crossed(5, 10));
        assert!(Threshold::Quantity(5).crossed(4, 10));
        assert!(!Threshold::Percent(0.0).crossed(0, 10), "0% never fires");
        assert!(Threshold::Percent(100.0).crossed(9, 10));
    }
}
