//! Pod addresses (`--pod-cidr`): each pod (but hostNetwork ones) gets its own IPv4 address from
//! the node's pod range, added as a /32 to a node-local interface (`--pod-interface`) while the
//! pod is on the node and removed when it is forgotten. The pod reports it as its `podIP` and its
//! listeners bind it, so two pods on one node may serve the same port; two pods wanting one port
//! of one address still meet `PortInUse`.
//!
//! Addresses are handed out lowest first, skipping the range's network and broadcast addresses; a
//! pod this agent re-adopts after a restart keeps the address its status names when that is in
//! the range and free. The interface is changed with iproute2's `ip` (the agent runs as root when
//! it is given `--pod-cidr`); routing the range to the node is the cluster's business (a route
//! per node to its pod range, as with any kubelet whose CNI plugin does not do it).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Mutex;

/// What can go wrong with pod addresses.
#[derive(Debug, thiserror::Error)]
pub enum PodNetError {
    #[error("--pod-cidr {cidr:?} is not an IPv4 range ADDRESS/LENGTH")]
    BadCidr { cidr: String },
    #[error("no pod address left in {cidr} ({in_use} in use)")]
    Exhausted { cidr: String, in_use: usize },
    #[error("ip {args} failed: {stderr}")]
    Ip { args: String, stderr: String },
    #[error("running ip {args}")]
    Spawn {
        args: String,
        #[source]
        source: std::io::Error,
    },
}

/// The node's pod range and the addresses handed out from it, by pod uid.
#[derive(Debug)]
pub struct PodNet {
    cidr: String,
    first: u32,
    last: u32,
    interface: String,
    assigned: Mutex<BTreeMap<String, Ipv4Addr>>,
}

impl PodNet {
    /// `cidr` as `10.214.0.0/24` (host bits are ignored); addresses go on `interface`.
    pub fn new(cidr: &str, interface: &str) -> Result<PodNet, PodNetError> {
        let bad = || PodNetError::BadCidr {
            cidr: cidr.to_string(),
        };
        let (addr, len) = cidr.split_once('/').ok_or_else(bad)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
        let len: u32 = len.parse().ok().filter(|l| *l <= 32).ok_or_else(bad)?;
        let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
        let network = u32::from(addr) & mask;
        let broadcast = network | !mask;
        // /31 and /32 have no network or broadcast address to skip.
        let (first, last) = if len >= 31 {
            (network, broadcast)
        } else {
            (network + 1, broadcast - 1)
        };
        Ok(PodNet {
            cidr: format!("{}/{len}", Ipv4Addr::from(network)),
            first,
            last,
            interface: interface.to_string(),
            assigned: Mutex::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Ipv4Addr>> {
        self.assigned.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Picks the address of pod `uid` (the one it has, else `previous` when in range and free,
    /// else the lowest free one) without touching the interface.
    fn pick(&self, uid: &str, previous: Option<IpAddr>) -> Result<Ipv4Addr, PodNetError> {
        let mut assigned = self.lock();
        if let Some(a) = assigned.get(uid) {
            return Ok(*a);
        }
        let in_use = |a: Ipv4Addr| assigned.values().any(|b| *b == a);
        let previous = match previous {
            Some(IpAddr::V4(a)) if (self.first..=self.last).contains(&u32::from(a)) => Some(a),
            _ => None,
        };
        let addr = previous
            .filter(|a| !in_use(*a))
            .or_else(|| {
                (self.first..=self.last)
                    .map(Ipv4Addr::from)
                    .find(|a| !in_use(*a))
            })
            .ok_or_else(|| PodNetError::Exhausted {
                cidr: self.cidr.clone(),
                in_use: assigned.len(),
            })?;
        assigned.insert(uid.to_string(), addr);
        Ok(addr)
    }

    /// The address of pod `uid`, on the interface when this returns.
    pub async fn assign(&self, uid: &str, previous: Option<IpAddr>) -> Result<IpAddr, PodNetError> {
        let addr = self.pick(uid, previous)?;
        let local = format!("{addr}/32");
        match ip(&["addr", "add", &local, "dev", &self.interface]).await {
            Ok(()) => Ok(addr.into()),
            // Already there: added for this pod before the agent restarted.
            Err(PodNetError::Ip { stderr, .. }) if stderr.contains("File exists") => {
                Ok(addr.into())
            }
            Err(e) => {
                self.lock().remove(uid);
                Err(e)
            }
        }
    }

    /// Takes pod `uid`'s address off the interface and frees it (no-op if it has none).
    pub async fn release(&self, uid: &str) {
        let Some(addr) = self.lock().remove(uid) else {
            return;
        };
        let local = format!("{addr}/32");
        if let Err(e) = ip(&["addr", "del", &local, "dev", &self.interface]).await {
            tracing::warn!(%addr, interface = %self.interface, "removing a pod address: {e}");
        }
    }
}

async fn ip(args: &[&str]) -> Result<(), PodNetError> {
    let out = tokio::process::Command::new("ip")
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|source| PodNetError::Spawn {
            args: args.join(" "),
            source,
        })?;
    if out.status.success() {
        return Ok(());
    }
    Err(PodNetError::Ip {
        args: args.join(" "),
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_skip_network_and_broadcast_and_run_out() {
        let net = PodNet::new("10.214.0.9/30", "lo").unwrap();
        assert_eq!(net.cidr, "10.214.0.8/30");
        let a = net.pick("a", None).unwrap();
        let b = net.pick("b", None).unwrap();
        assert_eq!(
            (a, b),
            (
                "10.214.0.9".parse().unwrap(),
                "10.214.0.10".parse().unwrap()
            )
        );
        assert_eq!(net.pick("a", None).unwrap(), a, "a pod keeps its address");
        assert!(matches!(
            net.pick("c", None),
            Err(PodNetError::Exhausted { in_use: 2, .. })
        ));
        net.lock().remove("a");
        assert_eq!(net.pick("c", None).unwrap(), a, "a freed address is reused");
    }

    #[test]
    fn a_readopted_pod_keeps_its_previous_address_when_free_and_in_range() {
        let net = PodNet::new("10.214.0.0/24", "lo").unwrap();
        let prev = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        assert_eq!(
            net.pick("a", prev("10.214.0.7")).unwrap().to_string(),
            "10.214.0.7"
        );
        // Taken, out of range, or IPv6: the lowest free one.
        assert_eq!(
            net.pick("b", prev("10.214.0.7")).unwrap().to_string(),
            "10.214.0.1"
        );
        assert_eq!(
            net.pick("c", prev("10.215.0.7")).unwrap().to_string(),
            "10.214.0.2"
        );
        assert_eq!(
            net.pick("d", prev("::1")).unwrap().to_string(),
            "10.214.0.3"
        );
    }

    #[test]
    fn malformed_ranges_are_refused() {
        for bad in [
            "10.214.0.0",
            "10.214.0.0/33",
            "fd00::/64",
            "x/24",
            "10.214.0.0/",
        ] {
            assert!(PodNet::new(bad, "lo").is_err(), "{bad}");
        }
    }
}
