//! The host cgroup holding one VMM process: a CPU quota (the agent's `cpu_cores`) and a
//! memory ceiling (guest RAM plus the VMM's own overhead), so a VM can neither take more
//! CPU than its share nor grow past its budget on the host.
//!
//! Works on cgroup v2 (`/sys/fs/cgroup/symbiont/<name>`, `cpu.max`, `memory.max`) and on
//! v1/hybrid hosts (`/sys/fs/cgroup/{cpu,memory}/symbiont/<name>`, `cpu.cfs_quota_us`,
//! `memory.limit_in_bytes`). Self-contained on purpose (the native tier has its own module).

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::sandbox::SandboxError;

/// CFS period used for quotas.
pub const CPU_PERIOD_US: u64 = 100_000;

/// The CFS quota for `cores` per [`CPU_PERIOD_US`] (at least 1 ms).
pub fn cpu_quota_us(cores: f64) -> u64 {
    ((cores * CPU_PERIOD_US as f64).round() as u64).max(1_000)
}

/// Which cgroup layout the host uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Layout {
    /// Unified hierarchy at the given root.
    V2(PathBuf),
    /// Separate `cpu` and `memory` hierarchies.
    V1 {
        /// The cpu controller's root.
        cpu: PathBuf,
        /// The memory controller's root.
        memory: PathBuf,
    },
}

impl Layout {
    /// Detects the layout under `/sys/fs/cgroup`.
    pub fn detect() -> Option<Layout> {
        let root = Path::new("/sys/fs/cgroup");
        if root.join("cgroup.controllers").exists() {
            return Some(Layout::V2(root.to_path_buf()));
        }
        let cpu = root.join("cpu");
        let memory = root.join("memory");
        (cpu.join("cpu.cfs_quota_us").exists() && memory.join("memory.limit_in_bytes").exists())
            .then_some(Layout::V1 { cpu, memory })
    }
}

/// One VMM's cgroup(s).
#[derive(Debug)]
pub struct HostCgroup {
    layout: Layout,
    dirs: Vec<PathBuf>,
}

fn write(path: &Path, value: &str) -> Result<(), SandboxError> {
    std::fs::write(path, value).map_err(|e| {
        SandboxError::op(
            "cgroup setup",
            format!("write {value} to {}: {e}", path.display()),
        )
    })
}

impl HostCgroup {
    /// Creates `symbiont/<name>` with the CPU quota and memory ceiling.
    pub fn create(name: &str, cpu_cores: f64, memory_bytes: u64) -> Result<Self, SandboxError> {
        let layout = Layout::detect().ok_or_else(|| {
            SandboxError::op(
                "cgroup setup",
                "no usable cgroup v1 cpu/memory or cgroup v2 hierarchy",
            )
        })?;
        let dirs = match &layout {
            Layout::V2(root) => {
                let parent = root.join("symbiont");
                std::fs::create_dir_all(&parent).map_err(|e| {
                    SandboxError::op("cgroup setup", format!("{}: {e}", parent.display()))
                })?;
                for ctl in ["+cpu", "+memory"] {
                    let _ = std::fs::write(root.join("cgroup.subtree_control"), ctl);
                    let _ = std::fs::write(parent.join("cgroup.subtree_control"), ctl);
                }
                vec![parent.join(name)]
            }
            Layout::V1 { cpu, memory } => {
                vec![
                    cpu.join("symbiont").join(name),
                    memory.join("symbiont").join(name),
                ]
            }
        };
        for d in &dirs {
            std::fs::create_dir_all(d)
                .map_err(|e| SandboxError::op("cgroup setup", format!("{}: {e}", d.display())))?;
        }
        let cg = Self { layout, dirs };
        if let Err(e) = cg
            .set_cpu(cpu_cores)
            .and_then(|_| cg.set_memory(memory_bytes))
        {
            cg.remove_now();
            return Err(e);
        }
        Ok(cg)
    }

    /// The `cgroup.procs` files a child writes `0` into to join (before exec).
    pub fn procs_files(&self) -> Vec<CString> {
        self.dirs
            .iter()
            .filter_map(|d| CString::new(d.join("cgroup.procs").to_string_lossy().as_bytes()).ok())
            .collect()
    }

    /// Sets the CPU quota.
    pub fn set_cpu(&self, cores: f64) -> Result<(), SandboxError> {
        let quota = cpu_quota_us(cores);
        match &self.layout {
            Layout::V2(_) => write(
                &self.dirs[0].join("cpu.max"),
                &format!("{quota} {CPU_PERIOD_US}"),
            ),
            Layout::V1 { .. } => {
                write(
                    &self.dirs[0].join("cpu.cfs_period_us"),
                    &CPU_PERIOD_US.to_string(),
                )?;
                write(&self.dirs[0].join("cpu.cfs_quota_us"), &quota.to_string())
            }
        }
    }

    fn set_memory(&self, bytes: u64) -> Result<(), SandboxError> {
        match &self.layout {
            Layout::V2(_) => write(&self.dirs[0].join("memory.max"), &bytes.to_string()),
            Layout::V1 { .. } => write(
                &self.dirs[1].join("memory.limit_in_bytes"),
                &bytes.to_string(),
            ),
        }
    }

    /// CPU time used by everything in the cgroup, in nanoseconds.
    pub fn cpu_usage_ns(&self) -> Option<u64> {
        match &self.layout {
            Layout::V2(_) => std::fs::read_to_string(self.dirs[0].join("cpu.stat"))
                .ok()?
                .lines()
                .find_map(|l| l.strip_prefix("usage_usec "))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(|us| us * 1000),
            Layout::V1 { .. } => {
                let acct = self.dirs[0].join("cpuacct.usage");
                std::fs::read_to_string(acct).ok()?.trim().parse().ok()
            }
        }
    }

    /// The directories (for tests and diagnostics).
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    fn remove_now(&self) -> bool {
        let mut ok = true;
        for d in &self.dirs {
            if d.exists() && std::fs::remove_dir(d).is_err() {
                ok = false;
            }
        }
        ok
    }

    /// Removes the cgroup(s) once their processes are gone (retries briefly: the kernel
    /// frees a cgroup slightly after its last task exits).
    pub async fn remove(&self) {
        for _ in 0..50 {
            if self.remove_now() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tracing::warn!(dirs = ?self.dirs, "could not remove the VMM cgroup");
    }
}

impl Drop for HostCgroup {
    fn drop(&mut self) {
        if self.remove_now() {
            return;
        }
        // Dropped while the VMM may still be exiting (a sandbox dropped without `destroy`,
        // a runtime shutting down): keep trying briefly off-thread so nothing is left behind.
        let dirs = std::mem::take(&mut self.dirs);
        let _ = std::thread::Builder::new()
            .name("symbiont-cg-reap".into())
            .spawn(move || {
                for _ in 0..500 {
                    if dirs
                        .iter()
                        .all(|d| !d.exists() || std::fs::remove_dir(d).is_ok())
                    {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quota_follows_cores() {
        assert_eq!(cpu_quota_us(1.0), 100_000);
        assert_eq!(cpu_quota_us(0.5), 50_000);
        assert_eq!(cpu_quota_us(2.25), 225_000);
        assert_eq!(cpu_quota_us(0.001), 1_000, "never below 1 ms");
    }
}
