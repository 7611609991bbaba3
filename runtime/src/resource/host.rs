//! What the machine offers: CPU cores and memory, behind the [`HostProbe`] seam so admission
//! can be tested with any totals.
//!
//! [`SystemHost`] reads the real machine: the cores this process may run on
//! (`std::thread::available_parallelism`, which honours the scheduler affinity mask and
//! cgroup CPU quotas) and `MemTotal` from `/proc/meminfo`, lowered to the runtime's own
//! cgroup memory limit when it runs inside a smaller cgroup (v1 or v2).

use std::io;
use std::path::Path;

/// Where the manager learns the machine's totals when the configuration leaves them at 0.
pub trait HostProbe: Send + Sync + 'static {
    /// CPU cores available to this process.
    fn cpu_cores(&self) -> io::Result<u32>;
    /// Memory available to this process, in bytes.
    fn memory_bytes(&self) -> io::Result<u64>;
}

/// The real machine.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemHost;

impl HostProbe for SystemHost {
    fn cpu_cores(&self) -> io::Result<u32> {
        let n = std::thread::available_parallelism()?.get();
        Ok(u32::try_from(n).unwrap_or(u32::MAX))
    }

    fn memory_bytes(&self) -> io::Result<u64> {
        let meminfo = std::fs::read_to_string("/proc/meminfo")?;
        let total = parse_meminfo_total(&meminfo).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "/proc/meminfo has no MemTotal line",
            )
        })?;
        let own_limit = std::fs::read_to_string("/proc/self/cgroup")
            .ok()
            .and_then(|text| own_cgroup_memory_limit(Path::new("/sys/fs/cgroup"), &text));
        Ok(match own_limit {
            Some(limit) if limit < total => limit,
            _ => total,
        })
    }
}

/// Fixed totals (for tests and for hosts where detection is not wanted).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FixedHost {
    /// CPU cores.
    pub cpu_cores: u32,
    /// Memory in bytes.
    pub memory_bytes: u64,
}

impl HostProbe for FixedHost {
    fn cpu_cores(&self) -> io::Result<u32> {
        Ok(self.cpu_cores)
    }
    fn memory_bytes(&self) -> io::Result<u64> {
        Ok(self.memory_bytes)
    }
}

/// `MemTotal` of a `/proc/meminfo` text, in bytes.
pub fn parse_meminfo_total(text: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix("MemTotal:")?;
        let mut parts = rest.split_whitespace();
        let value: u64 = parts.next()?.parse().ok()?;
        let factor = match parts.next() {
            Some("kB") | Some("KB") => 1024,
            None => 1,
            Some(_) => return None,
        };
        value.checked_mul(factor)
    })
}

/// Limits at or above this many bytes mean "no limit" (cgroup v1 reports
/// `PAGE_COUNTER_MAX` pages, about 2^63).
const UNLIMITED_BYTES: u64 = 1 << 60;

/// The memory limit of the cgroup this process is in, from a `/proc/self/cgroup` text and
/// the cgroup mount root. `None` when there is no limit or it cannot be read.
pub fn own_cgroup_memory_limit(cgroup_root: &Path, proc_self_cgroup: &str) -> Option<u64> {
    for line in proc_self_cgroup.lines() {
        let mut fields = line.splitn(3, ':');
        let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
        let rel = path.trim_start_matches('/');
        let file = if controllers.split(',').any(|c| c == "memory") {
            cgroup_root
                .join("memory")
                .join(rel)
                .join("memory.limit_in_bytes")
        } else if controllers.is_empty() {
            // cgroup v2: only meaningful when memory is delegated there.
            let unified = if cgroup_root.join("cgroup.controllers").exists() {
                cgroup_root.to_path_buf()
            } else {
                cgroup_root.join("unified")
            };
            unified.join(rel).join("memory.max")
        } else {
            continue;
        };
        if let Ok(text) = std::fs::read_to_string(&file) {
            let text = text.trim();
            if text == "max" {
                continue;
            }
            if let Ok(limit) = text.parse::<u64>() {
                if limit < UNLIMITED_BYTES {
                    return Some(limit);
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_total_is_read_in_bytes() {
        let text = "MemTotal:       24683656 kB\nMemFree:        1000 kB\n";
        assert_eq!(parse_meminfo_total(text), Some(24_683_656 * 1024));
        assert_eq!(parse_meminfo_total("MemFree: 1 kB\n"), None);
    }

    #[test]
    fn own_cgroup_limit_is_read_from_v1_and_v2_layouts() {
        let root = tempfile::tempdir().expect("tempdir");
        let v1 = root.path().join("memory/agents/x");
        std::fs::create_dir_all(&v1).expect("mkdir");
        std::fs::write(v1.join("memory.limit_in_bytes"), "1073741824\n").expect("write");
        let text = "12:memory:/agents/x\n0::/whatever\n";
        assert_eq!(
            own_cgroup_memory_limit(root.path(), text),
            Some(1_073_741_824)
        );

        // Unlimited v1 value is ignored.
        std::fs::write(v1.join("memory.limit_in_bytes"), "9223372036854771712\n").expect("write");
        assert_eq!(own_cgroup_memory_limit(root.path(), text), None);

        let v2 = root.path().join("unified/svc");
        std::fs::create_dir_all(&v2).expect("mkdir");
        std::fs::write(v2.join("memory.max"), "536870912\n").expect("write");
        assert_eq!(
            own_cgroup_memory_limit(root.path(), "0::/svc\n"),
            Some(536_870_912)
        );
        std::fs::write(v2.join("memory.max"), "max\n").expect("write");
        assert_eq!(own_cgroup_memory_limit(root.path(), "0::/svc\n"), None);
    }

    #[test]
    fn system_host_reports_this_machine() {
        let host = SystemHost;
        assert!(host.cpu_cores().expect("cores") >= 1);
        assert!(host.memory_bytes().expect("memory") > 64 * 1024 * 1024);
    }
}
