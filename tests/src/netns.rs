//! A network namespace joined to the root namespace by a veth pair, so that tests have real
//! (non-loopback) addresses: the API server refuses loopback addresses in EndpointSlices, so a node
//! that backs a Service needs one. Dummy interfaces are not available on these machines; veth pairs
//! are. Needs root and iproute2 (`ip`), which tools/setup installs.
//!
//! ```no_run
//! let net = e2e::netns::NetNs::new()?;
//! // The host end, e.g. 10.213.0.1, is in the root namespace: give it to the node as --node-ip.
//! println!("node ip {}", net.host_ip);
//! // Inside the namespace, the other end (e.g. 10.213.0.2) reaches it over the veth.
//! let out = net.run(&["curl", "-s", &format!("http://{}:8080/", net.host_ip)])?;
//! # let _ = out;
//! # anyhow::Ok(())
//! ```
//!
//! Each [`NetNs`] takes a block of 10.213.0.0/16 (a /30, or larger for [`NetNs::with_hosts`]) that
//! no interface in the root namespace holds (chosen under a lock file, so concurrent test processes
//! never share one) and is removed on drop, panics included. A test process killed before its drop leaves its namespace and pair behind: every
//! [`NetNs::new`] first removes those whose owning process (the PID in their names) is gone.
//! Stop the processes you started inside a namespace (e.g. with `ip netns exec`) before dropping it.

use std::fs::{File, OpenOptions};
use std::net::Ipv4Addr;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result, bail};

/// Every namespace this module creates is named `NS_PREFIX<pid>-<n>`.
pub const NS_PREFIX: &str = "wasinode-";
/// Every host-end interface this module creates is named `LINK_PREFIX<pid>-<n>h` (its peer
/// `...p`); at most 15 characters.
pub const LINK_PREFIX: &str = "wn";
/// The range the pairs' /30s come from.
pub const RANGE: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 213, 0, 0), 16);

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A network namespace and the veth pair joining it to the root namespace. Removed on drop.
#[derive(Debug)]
pub struct NetNs {
    /// The namespace's name (`ip netns exec NAME ...`).
    pub name: String,
    /// The veth end in the root namespace.
    pub host_if: String,
    /// The veth end inside the namespace.
    pub ns_if: String,
    /// The host end's (first) address (in the root namespace), e.g. 10.213.0.1.
    pub host_ip: Ipv4Addr,
    /// Every address of the host end, consecutive from `host_ip` (one unless
    /// [`NetNs::with_hosts`] asked for more).
    pub host_ips: Vec<Ipv4Addr>,
    /// The namespace end's address, the block's last usable one (e.g. 10.213.0.2 in a /30). The
    /// namespace's default route is via `host_ip`.
    pub ns_ip: Ipv4Addr,
    /// The prefix length of every address (30 for one host address).
    pub prefix_len: u8,
    /// A range of the block no interface holds, e.g. for a node's `--pod-cidr` (see
    /// [`NetNs::with_pod_range`]): the namespace reaches its addresses over the veth once the
    /// host end holds them.
    pub pod_range: Option<(Ipv4Addr, u8)>,
}

/// Runs `ip ARGS...`; fails with its stderr unless it succeeds.
fn ip(args: &[&str]) -> Result<String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running ip {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "ip {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The PID in a name made by this module (`<prefix><pid>-<n>...`), if it is one.
fn owner_pid(name: &str, prefix: &str) -> Option<u32> {
    name.strip_prefix(prefix)?.split('-').next()?.parse().ok()
}

fn process_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Removes namespaces and host-end links made by processes that no longer run.
fn sweep_stale() -> Result<()> {
    for line in ip(&["-o", "link", "show"])?.lines() {
        // "12: wn123-0h@if11: <...> ..."
        let Some(name) = line.split(": ").nth(1) else {
            continue;
        };
        let name = name.split('@').next().unwrap_or(name);
        if let Some(pid) = owner_pid(name, LINK_PREFIX)
            && name.ends_with('h')
            && !process_alive(pid)
        {
            let _ = ip(&["link", "del", name]);
        }
    }
    for line in ip(&["netns", "list"])?.lines() {
        // "wasinode-123-0" or "wasinode-123-0 (id: 3)"
        let name = line.split_whitespace().next().unwrap_or("");
        if let Some(pid) = owner_pid(name, NS_PREFIX)
            && !process_alive(pid)
        {
            let _ = ip(&["netns", "del", name]);
        }
    }
    Ok(())
}

/// The subnets (first and last address) of the IPv4 addresses held by interfaces of the root
/// namespace.
fn subnets_in_use() -> Result<Vec<(u32, u32)>> {
    let mut used = vec![];
    for line in ip(&["-o", "-4", "addr", "show"])?.lines() {
        // "4: eth0    inet 10.1.2.3/24 brd ... scope global eth0"
        let mut words = line.split_whitespace();
        while let Some(w) = words.next() {
            if w == "inet"
                && let Some((addr, len)) = words.next().and_then(|a| a.split_once('/'))
                && let (Ok(addr), Ok(len)) = (addr.parse::<Ipv4Addr>(), len.parse::<u32>())
                && len <= 32
            {
                let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
                let first = u32::from(addr) & mask;
                used.push((first, first | !mask));
            }
        }
    }
    Ok(used)
}

/// The lock that makes choosing and taking a /30 atomic across test processes.
fn lock() -> Result<File> {
    let path = std::env::temp_dir().join("wasinode-netns.lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    file.lock()
        .with_context(|| format!("locking {}", path.display()))?;
    Ok(file)
}

impl NetNs {
    /// Creates a namespace and a veth pair with a free /30: the host end (`.1` of the /30) in the
    /// root namespace, the other (`.2`) in the namespace, both up, with `lo` up and a default route
    /// via the host end inside the namespace. The host end never forwards what it receives, so
    /// the namespace reaches nothing beyond this host's own addresses.
    pub fn new() -> Result<NetNs> {
        NetNs::with_hosts(1)
    }

    /// Like [`NetNs::new`], with `hosts` consecutive addresses on the host end (e.g. one per node
    /// of a node pool: `--address-base` the first), in the smallest block that holds them, the
    /// namespace's address, the network and the broadcast address.
    pub fn with_hosts(hosts: u32) -> Result<NetNs> {
        NetNs::create_block(hosts, None)
    }

    /// Like [`NetNs::with_hosts`], with a free /`pods_len` range inside the block as
    /// [`NetNs::pod_range`] (the host addresses below it, the namespace's above it).
    pub fn with_pod_range(hosts: u32, pods_len: u8) -> Result<NetNs> {
        NetNs::create_block(hosts, Some(pods_len))
    }

    fn create_block(hosts: u32, pods_len: Option<u8>) -> Result<NetNs> {
        let hosts = hosts.max(1);
        let mut size = (hosts + 3).next_power_of_two();
        let spare = match pods_len {
            Some(len) if (26..=30).contains(&len) => {
                let spare = 1u32 << (32 - len);
                if hosts >= spare {
                    bail!("{hosts} host addresses do not fit below a /{len}");
                }
                size = size.max(4 * spare);
                Some(spare)
            }
            Some(len) => bail!("a pod range of /{len}: /26 to /30 only"),
            None => None,
        };
        if size > 256 {
            bail!("{hosts} host addresses: at most 253");
        }
        let _lock = lock()?;
        sweep_stale()?;
        let used = subnets_in_use()?;
        let base = u32::from(RANGE.0);
        let blocks = (1u32 << (32 - RANGE.1)) / size;
        let block = (0..blocks)
            .map(|i| base + i * size)
            .find(|net| {
                let last = net + size - 1;
                used.iter().all(|&(a, b)| b < *net || a > last)
            })
            .context("no free block left in 10.213.0.0/16")?;
        let pid = std::process::id();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let net = NetNs {
            name: format!("{NS_PREFIX}{pid}-{n}"),
            host_if: format!("{LINK_PREFIX}{pid}-{n}h"),
            ns_if: format!("{LINK_PREFIX}{pid}-{n}p"),
            host_ip: Ipv4Addr::from(block + 1),
            host_ips: (1..=hosts).map(|k| Ipv4Addr::from(block + k)).collect(),
            ns_ip: Ipv4Addr::from(block + size - 2),
            prefix_len: (32 - size.trailing_zeros()) as u8,
            pod_range: spare.map(|n| (Ipv4Addr::from(block + n), (32 - n.trailing_zeros()) as u8)),
        };
        // From here on, dropping `net` removes whatever was made.
        net.create()?;
        Ok(net)
    }

    fn create(&self) -> Result<()> {
        let peer = format!("{}/{}", self.ns_ip, self.prefix_len);
        let gw = self.host_ip.to_string();
        let ns = self.name.as_str();
        ip(&["netns", "add", ns])?;
        ip(&[
            "link",
            "add",
            &self.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &self.ns_if,
        ])?;
        ip(&["link", "set", &self.ns_if, "netns", ns])?;
        for addr in &self.host_ips {
            let host = format!("{addr}/{}", self.prefix_len);
            ip(&["addr", "add", &host, "dev", &self.host_if])?;
        }
        // Nothing the namespace sends is forwarded beyond the host end, whatever the host's
        // ip_forward: its traffic reaches this host's own addresses only.
        let forwarding = format!("/proc/sys/net/ipv4/conf/{}/forwarding", self.host_if);
        std::fs::write(&forwarding, "0").with_context(|| format!("writing {forwarding}"))?;
        ip(&["link", "set", &self.host_if, "up"])?;
        ip(&["-n", ns, "addr", "add", &peer, "dev", &self.ns_if])?;
        ip(&["-n", ns, "link", "set", &self.ns_if, "up"])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        ip(&["-n", ns, "route", "add", "default", "via", &gw])?;
        Ok(())
    }

    /// A command that runs `program` inside the namespace (`ip netns exec NAME program`); add
    /// arguments, environment and stdio as usual.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// Runs `argv` inside the namespace and returns its output, whatever its exit status.
    pub fn output(&self, argv: &[&str]) -> Result<Output> {
        let (program, args) = argv.split_first().context("empty command")?;
        self.command(program)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {} in netns {}", argv.join(" "), self.name))
    }

    /// Runs `argv` inside the namespace; its stdout, or an error with its stderr if it fails.
    pub fn run(&self, argv: &[&str]) -> Result<String> {
        let out = self.output(argv)?;
        if !out.status.success() {
            bail!(
                "{} in netns {} failed ({}): {}",
                argv.join(" "),
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting one end of a veth pair deletes both, wherever the other is.
        let _ = ip(&["link", "del", &self.host_if]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pid_parses_only_our_names() {
        assert_eq!(owner_pid("wasinode-123-0", NS_PREFIX), Some(123));
        assert_eq!(owner_pid("wn77-3h", LINK_PREFIX), Some(77));
        assert_eq!(owner_pid("wlan0", LINK_PREFIX), None);
        assert_eq!(owner_pid("other-1-2", NS_PREFIX), None);
    }
}
