//! Facts about this machine that the Node object reports: CPUs, memory, OS image, kernel, ids,
//! and the resources whose shortage the node conditions report (memory, disk, PIDs).

use std::path::Path;

use crate::eviction::{EvictionHard, Threshold};

/// What `status.nodeInfo` and `status.capacity` say about the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostInfo {
    pub cpus: usize,
    /// Total memory in KiB (`MemTotal` of /proc/meminfo).
    pub memory_kib: u64,
    /// `PRETTY_NAME` of /etc/os-release.
    pub os_image: String,
    pub kernel_version: String,
    pub machine_id: String,
    pub system_uuid: String,
    pub boot_id: String,
}

fn read_trimmed(path: impl AsRef<Path>) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// `MemTotal` in KiB from the text of /proc/meminfo.
pub fn parse_meminfo(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// `MemAvailable` in KiB from the text of /proc/meminfo.
pub fn parse_mem_available(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// The number of tasks from the text of /proc/loadavg (`0.10 0.20 0.30 2/345 6789` -> 345).
pub fn parse_loadavg_tasks(text: &str) -> Option<u64> {
    text.split_whitespace()
        .nth(3)
        .and_then(|f| f.split_once('/'))
        .and_then(|(_, total)| total.parse().ok())
}

/// Size and free space of a filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskStats {
    pub total_bytes: u64,
    /// Available to unprivileged users (`f_bavail`).
    pub available_bytes: u64,
    pub total_inodes: u64,
    pub free_inodes: u64,
}

/// What the node's pressure conditions are computed from, measured now. `None`: could not be
/// read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pressure {
    pub memory_total_kib: Option<u64>,
    pub memory_available_kib: Option<u64>,
    /// The filesystem of the data dir (modules, logs, volumes): the kubelet's nodefs.
    pub disk: Option<DiskStats>,
    /// Tasks (processes and threads) now, and `/proc/sys/kernel/pid_max`.
    pub pids: Option<(u64, u64)>,
}

/// One pressure condition as the kubelet reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PressureCondition {
    pub type_: &'static str,
    /// `"True"` (under pressure), `"False"` or `"Unknown"` (cannot measure).
    pub status: &'static str,
    pub reason: &'static str,
    pub message: String,
}

impl Pressure {
    pub fn measure(data_dir: &Path) -> Pressure {
        let meminfo = std::fs::read_to_string("/proc/meminfo").ok();
        let pid_max = read_trimmed("/proc/sys/kernel/pid_max").and_then(|s| s.parse().ok());
        // Tasks (threads) in the system, the 4th field's denominator of /proc/loadavg (what
        // the kubelet reads through sysinfo): each takes one of pid_max's ids.
        let running = std::fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|t| parse_loadavg_tasks(&t))
            .or_else(|| {
                std::fs::read_dir("/proc").ok().map(|d| {
                    d.filter_map(Result::ok)
                        .filter(|e| {
                            e.file_name()
                                .to_str()
                                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
                        })
                        .count() as u64
                })
            });
        Pressure {
            memory_total_kib: meminfo.as_deref().and_then(parse_meminfo),
            memory_available_kib: meminfo.as_deref().and_then(parse_mem_available),
            disk: disk_stats(data_dir),
            pids: running.zip(pid_max),
        }
    }

    /// MemoryPressure, DiskPressure and PIDPressure, with the kubelet's reasons, against the
    /// node's hard eviction thresholds (a signal without one is never under pressure).
    pub fn conditions(&self, eviction: &EvictionHard) -> [PressureCondition; 3] {
        let total_memory = self.memory_total_kib.unwrap_or(0).saturating_mul(1024);
        let memory = match self.memory_available_kib {
            Some(a)
                if eviction
                    .memory_available
                    .is_some_and(|t| t.crossed(a.saturating_mul(1024), total_memory)) =>
            {
                PressureCondition {
                    type_: "MemoryPressure",
                    status: "True",
                    reason: "KubeletHasInsufficientMemory",
                    message: format!(
                        "wasinode has insufficient memory available: {} MiB available, threshold {}",
                        a / 1024,
                        in_mib(eviction.memory_available)
                    ),
                }
            }
            Some(_) => PressureCondition {
                type_: "MemoryPressure",
                status: "False",
                reason: "KubeletHasSufficientMemory",
                message: "wasinode has sufficient memory available".into(),
            },
            None => unknown(
                "MemoryPressure",
                "cannot read MemAvailable from /proc/meminfo",
            ),
        };
        let disk = match self.disk {
            None => unknown("DiskPressure", "cannot statvfs the data dir"),
            Some(d) => {
                let low_space = d.total_bytes > 0
                    && eviction
                        .nodefs_available
                        .is_some_and(|t| t.crossed(d.available_bytes, d.total_bytes));
                // Filesystems without inodes (btrfs) report 0 of them.
                let low_inodes = d.total_inodes > 0
                    && eviction
                        .nodefs_inodes_free
                        .is_some_and(|t| t.crossed(d.free_inodes, d.total_inodes));
                if low_space || low_inodes {
                    PressureCondition {
                        type_: "DiskPressure",
                        status: "True",
                        reason: "KubeletHasDiskPressure",
                        message: format!(
                            "wasinode has disk pressure: {} of {} MiB available (threshold {}), \
                             {} of {} inodes free (threshold {})",
                            d.available_bytes >> 20,
                            d.total_bytes >> 20,
                            in_mib(eviction.nodefs_available),
                            d.free_inodes,
                            d.total_inodes,
                            plain(eviction.nodefs_inodes_free),
                        ),
                    }
                } else {
                    PressureCondition {
                        type_: "DiskPressure",
                        status: "False",
                        reason: "KubeletHasNoDiskPressure",
                        message: "wasinode has no disk pressure".into(),
                    }
                }
            }
        };
        let pids = match self.pids {
            None => unknown("PIDPressure", "cannot count processes in /proc"),
            Some((running, max))
                if max > 0
                    && eviction
                        .pid_available
                        .is_some_and(|t| t.crossed(max.saturating_sub(running), max)) =>
            {
                PressureCondition {
                    type_: "PIDPressure",
                    status: "True",
                    reason: "KubeletHasInsufficientPID",
                    message: format!(
                        "wasinode has insufficient PID available: {running} processes of \
                         pid_max {max} (threshold {} available)",
                        plain(eviction.pid_available)
                    ),
                }
            }
            Some(_) => PressureCondition {
                type_: "PIDPressure",
                status: "False",
                reason: "KubeletHasSufficientPID",
                message: "wasinode has sufficient PID available".into(),
            },
        };
        [memory, disk, pids]
    }
}

/// A threshold of bytes as a person reads it (`100 MiB`, `10%`, `none`).
fn in_mib(t: Option<Threshold>) -> String {
    match t {
        None => "none".into(),
        Some(Threshold::Quantity(q)) => format!("{} MiB", q >> 20),
        Some(t) => t.to_string(),
    }
}

/// A threshold of a count (`5%`, `1000`, `none`).
fn plain(t: Option<Threshold>) -> String {
    t.map_or_else(|| "none".into(), |t| t.to_string())
}

fn unknown(type_: &'static str, why: &str) -> PressureCondition {
    PressureCondition {
        type_,
        status: "Unknown",
        reason: "NodeStatusUnknown",
        message: format!("wasinode {why}"),
    }
}

/// `statvfs` of `path` (or of its nearest existing ancestor).
pub fn disk_stats(path: &Path) -> Option<DiskStats> {
    let mut p = path;
    while !p.exists() {
        p = p.parent()?;
    }
    let s = rustix::fs::statvfs(p).ok()?;
    Some(DiskStats {
        total_bytes: s.f_blocks.saturating_mul(s.f_frsize),
        available_bytes: s.f_bavail.saturating_mul(s.f_frsize),
        total_inodes: s.f_files,
        free_inodes: s.f_ffree,
    })
}

/// `PRETTY_NAME` from the text of /etc/os-release (quotes removed).
pub fn parse_os_release(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim().trim_matches('"').trim_matches('\'').to_string())
        .filter(|v| !v.is_empty())
}

impl HostInfo {
    pub fn detect() -> HostInfo {
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let memory_kib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|t| parse_meminfo(&t))
            .unwrap_or(0);
        let os_image = std::fs::read_to_string("/etc/os-release")
            .ok()
            .and_then(|t| parse_os_release(&t))
            .unwrap_or_else(|| "unknown".into());
        let kernel_version =
            read_trimmed("/proc/sys/kernel/osrelease").unwrap_or_else(|| "unknown".into());
        let machine_id = read_trimmed("/etc/machine-id")
            .or_else(|| read_trimmed("/var/lib/dbus/machine-id"))
            .unwrap_or_default();
        let system_uuid =
            read_trimmed("/sys/class/dmi/id/product_uuid").unwrap_or_else(|| machine_id.clone());
        let boot_id = read_trimmed("/proc/sys/kernel/random/boot_id").unwrap_or_default();
        HostInfo {
            cpus,
            memory_kib,
            os_image,
            kernel_version,
            machine_id,
            system_uuid,
            boot_id,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_files() {
        assert_eq!(
            parse_meminfo("MemTotal:       16318412 kB\nMemFree: 1 kB\n"),
            Some(16318412)
        );
        assert_eq!(parse_meminfo("MemFree: 1 kB\n"), None);
        assert_eq!(
            parse_os_release("NAME=\"Debian\"\nPRETTY_NAME=\"Debian GNU/Linux 13 (trixie)\"\n"),
            Some("Debian GNU/Linux 13 (trixie)".into())
        );
        assert_eq!(parse_os_release("NAME=x\n"), None);
    }

    fn calm() -> Pressure {
        Pressure {
            memory_total_kib: Some(8 << 20),
            memory_available_kib: Some(4 << 20),
            disk: Some(DiskStats {
                total_bytes: 100 << 30,
                available_bytes: 50 << 30,
                total_inodes: 1000,
                free_inodes: 500,
            }),
            pids: Some((300, 4_194_304)),
        }
    }

    fn statuses(p: &Pressure) -> Vec<&'static str> {
        p.conditions(&EvictionHard::default())
            .iter()
            .map(|c| c.status)
            .collect()
    }

    #[test]
    fn no_pressure_on_a_calm_machine() {
        let c = calm().conditions(&EvictionHard::default());
        assert_eq!(statuses(&calm()), ["False", "False", "False"]);
        assert_eq!(c[0].reason, "KubeletHasSufficientMemory");
        assert_eq!(c[1].reason, "KubeletHasNoDiskPressure");
        assert_eq!(c[2].reason, "KubeletHasSufficientPID");
    }

    #[test]
    fn memory_pressure_below_100_mib_available() {
        let mut p = calm();
        p.memory_available_kib = Some(100 * 1024);
        assert_eq!(statuses(&p)[0], "False");
        p.memory_available_kib = Some(100 * 1024 - 1);
        let c = &p.conditions(&EvictionHard::default())[0];
        assert_eq!(
            (c.status, c.reason),
            ("True", "KubeletHasInsufficientMemory")
        );
    }

    #[test]
    fn disk_pressure_below_10_percent_space_or_5_percent_inodes() {
        let mut p = calm();
        let mut d = p.disk.unwrap();
        d.available_bytes = d.total_bytes / 10;
        p.disk = Some(d);
        assert_eq!(statuses(&p)[1], "False");
        d.available_bytes = d.total_bytes / 10 - 1;
        p.disk = Some(d);
        assert_eq!(
            p.conditions(&EvictionHard::default())[1].reason,
            "KubeletHasDiskPressure"
        );
        d.available_bytes = d.total_bytes / 2;
        d.free_inodes = 49;
        p.disk = Some(d);
        assert_eq!(statuses(&p)[1], "True");
        d.total_inodes = 0;
        d.free_inodes = 0;
        p.disk = Some(d);
        assert_eq!(statuses(&p)[1], "False");
    }

    #[test]
    fn pid_pressure_below_10_percent_of_pid_max() {
        let mut p = calm();
        p.pids = Some((900, 1000));
        assert_eq!(statuses(&p)[2], "False");
        p.pids = Some((901, 1000));
        assert_eq!(
            p.conditions(&EvictionHard::default())[2].reason,
            "KubeletHasInsufficientPID"
        );
    }

    #[test]
    fn the_admins_thresholds_replace_the_defaults() {
        let mut p = calm();
        let mut d = p.disk.unwrap();
        d.available_bytes = d.total_bytes / 20;
        p.disk = Some(d);
        assert_eq!(statuses(&p)[1], "True", "5% free is under the default 10%");
        let one_gib: EvictionHard = "nodefs.available<1Gi".parse().unwrap();
        assert_eq!(
            p.conditions(&one_gib).map(|c| c.status),
            ["False", "False", "False"]
        );
        let all: EvictionHard = "nodefs.available<100%".parse().unwrap();
        let c = &p.conditions(&all)[1];
        assert_eq!(c.status, "True");
        assert!(c.message.contains("(threshold 100%)"), "{}", c.message);
        p.memory_available_kib = Some(1024);
        p.pids = Some((999, 1000));
        assert_eq!(
            p.conditions(&EvictionHard::none()).map(|c| c.status),
            ["False", "False", "False"],
            "no threshold, no pressure"
        );
    }

    #[test]
    fn unknown_when_unmeasurable() {
        assert_eq!(
            statuses(&Pressure::default()),
            ["Unknown", "Unknown", "Unknown"]
        );
    }

    #[test]
    fn measures_this_machine() {
        let p = Pressure::measure(Path::new("/tmp/does/not/exist"));
        assert!(p.memory_available_kib.is_some());
        assert!(p.disk.is_some_and(|d| d.total_bytes > 0));
        assert!(p.pids.is_some_and(|(n, max)| n > 0 && max > n));
        assert_eq!(
            parse_loadavg_tasks("0.10 0.20 0.30 2/345 6789\n"),
            Some(345)
        );
        assert_eq!(parse_loadavg_tasks("0.10 0.20"), None);
        assert_eq!(
            parse_mem_available("MemTotal: 10 kB\nMemAvailable:   1234 kB\n"),
            Some(1234)
        );
    }

    #[test]
    fn detects_this_machine() {
        let h = HostInfo::detect();
        assert!(h.cpus >= 1);
        assert!(h.memory_kib > 0);
        assert!(!h.kernel_version.is_empty());
    }
}
