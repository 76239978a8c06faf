//! Facts about this machine that the Node object reports: CPUs, memory, OS image, kernel, ids.

use std::path::Path;

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

    #[test]
    fn detects_this_machine() {
        let h = HostInfo::detect();
        assert!(h.cpus >= 1);
        assert!(h.memory_kib > 0);
        assert!(!h.kernel_version.is_empty());
    }
}
