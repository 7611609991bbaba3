//! Control groups for native sandboxes, v1 and v2, behind a filesystem seam.
//!
//! Every operation is a read or write of a file below a *root* directory (normally
//! `/sys/fs/cgroup`), so the same code runs against the kernel and, in unit tests, against a
//! temporary directory laid out like either hierarchy.
//!
//! - **v1** (one hierarchy per controller, this machine's hybrid layout): a sandbox gets
//!   `<root>/<controller>/symbiont/<id>` in `memory`, `cpu`, `cpuacct`, `pids`, `blkio` and
//!   `freezer`. Limits: `memory.limit_in_bytes` (+ `memory.memsw.limit_in_bytes` when swap
//!   accounting exists), `cpu.cfs_quota_us`/`cpu.cfs_period_us`, `pids.max`,
//!   `blkio.throttle.{read,write}_bps_device`. Killing freezes the cgroup, SIGKILLs every pid in
//!   it and thaws it, so nothing can fork while it is being emptied.
//! - **v2** (unified): one directory `<root>/symbiont/<id>` with `memory.max`,
//!   `memory.swap.max`, `cpu.max`, `pids.max`, `io.max`; killing writes `cgroup.kill`, pausing
//!   writes `cgroup.freeze`.

use std::fs;
use std::io::{self, ErrorKind};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::sandbox::{SandboxError, SandboxStats};

/// The parent directory (in every controller) under which sandbox cgroups are created.
pub const PARENT: &str = "symbiont";

/// The CFS period used for CPU quotas, in microseconds.
pub const CPU_PERIOD_US: u64 = 100_000;

/// v1 controllers a sandbox joins, in the order they are created.
pub const V1_CONTROLLERS: [&str; 6] = ["memory", "cpu", "cpuacct", "pids", "blkio", "freezer"];

/// v2 controllers enabled for sandboxes.
pub const V2_CONTROLLERS: [&str; 4] = ["memory", "cpu", "io", "pids"];

/// Which cgroup hierarchy the host uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CgroupVersion {
    /// One hierarchy per controller (`/sys/fs/cgroup/<controller>`).
    V1,
    /// The unified hierarchy.
    V2,
}

impl std::fmt::Display for CgroupVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CgroupVersion::V1 => "v1",
            CgroupVersion::V2 => "v2",
        })
    }
}

/// Where the hierarchy is mounted and which version it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupLayout {
    /// v1 or v2.
    pub version: CgroupVersion,
    /// v1: the directory holding one mount per controller; v2: the unified mount.
    pub root: PathBuf,
}

impl CgroupLayout {
    /// Detects the layout below `root` (normally `/sys/fs/cgroup`): unified when
    /// `root/cgroup.controllers` exists; a unified mount at `root/unified` is used when it has
    /// every controller we need; otherwise v1 when `root/memory` exists.
    pub fn detect(root: &Path) -> Result<Self, SandboxError> {
        if root.join("cgroup.controllers").exists() {
            return Ok(Self {
                version: CgroupVersion::V2,
                root: root.to_path_buf(),
            });
        }
        let unified = root.join("unified");
        if let Ok(ctrls) = fs::read_to_string(unified.join("cgroup.controllers")) {
            let have: Vec<&str> = ctrls.split_whitespace().collect();
            if V2_CONTROLLERS.iter().all(|c| have.contains(c)) {
                return Ok(Self {
                    version: CgroupVersion::V2,
                    root: unified,
                });
            }
        }
        let missing: Vec<&str> = V1_CONTROLLERS
            .iter()
            .copied()
            .filter(|c| !root.join(c).is_dir())
            .collect();
        if missing.is_empty() {
            return Ok(Self {
                version: CgroupVersion::V1,
                root: root.to_path_buf(),
            });
        }
        Err(SandboxError::Unavailable {
            tier: crate::types::SecurityTier::Native,
            reason: format!(
                "no usable cgroup hierarchy under {}: v2 needs cgroup.controllers, v1 is missing \
                 controller(s) {} (mount them, e.g. `mount -t cgroup -o memory cgroup \
                 {}/memory`)",
                root.display(),
                missing.join(", "),
                root.display()
            ),
        })
    }

    /// The controllers whose directories exist (v1) or are available (v2).
    pub fn available_controllers(&self) -> Vec<String> {
        match self.version {
            CgroupVersion::V1 => V1_CONTROLLERS
                .iter()
                .filter(|c| self.root.join(c).is_dir())
                .map(|c| c.to_string())
                .collect(),
            CgroupVersion::V2 => fs::read_to_string(self.root.join("cgroup.controllers"))
                .unwrap_or_default()
                .split_whitespace()
                .map(str::to_string)
                .collect(),
        }
    }
}

/// The limits a sandbox cgroup carries.
#[derive(Clone, Debug, PartialEq)]
pub struct CgroupLimits {
    /// Memory ceiling in bytes.
    pub memory_bytes: u64,
    /// CPU share in cores (quota = cores × period).
    pub cpu_cores: f64,
    /// Most tasks.
    pub pids_max: u64,
    /// Block device (major, minor) that disk limits apply to.
    pub block_device: Option<(u32, u32)>,
    /// Read and write ceiling in bytes per second each; 0 = unlimited.
    pub disk_bps: u64,
}

impl CgroupLimits {
    /// The CFS quota in microseconds per [`CPU_PERIOD_US`] (at least 1 ms as the kernel
    /// requires).
    pub fn cpu_quota_us(&self) -> u64 {
        ((self.cpu_cores * CPU_PERIOD_US as f64).round() as u64).max(1_000)
    }
}

/// One sandbox's cgroup(s).
#[derive(Clone, Debug)]
pub struct SandboxCgroup {
    layout: CgroupLayout,
    id: String,
    /// v1: one directory per controller (`(controller, dir)`); v2: one entry `("", dir)`.
    dirs: Vec<(String, PathBuf)>,
}

fn write(path: &Path, value: &str) -> Result<(), SandboxError> {
    fs::write(path, value).map_err(|e| {
        SandboxError::op(
            "cgroup write",
            format!("{} <- {value:?}: {e}", path.display()),
        )
    })
}

fn read(path: &Path) -> Result<String, SandboxError> {
    fs::read_to_string(path)
        .map_err(|e| SandboxError::op("cgroup read", format!("{}: {e}", path.display())))
}

fn read_u64(path: &Path) -> Option<u64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Value of `key` in a flat-keyed file (`key value` lines), e.g. `memory.events`.
pub fn keyed_value(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        (it.next() == Some(key))
            .then(|| it.next())
            .flatten()
            .and_then(|v| v.parse().ok())
    })
}

/// Sums v1 `blkio.throttle.io_service_bytes*` lines (`MAJ:MIN Read N`) into (read, write).
pub fn parse_v1_blkio(text: &str) -> (u64, u64) {
    let (mut r, mut w) = (0u64, 0u64);
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() == 3 && f[0].contains(':') {
            let n: u64 = f[2].parse().unwrap_or(0);
            match f[1] {
                "Read" => r = r.saturating_add(n),
                "Write" => w = w.saturating_add(n),
                _ => {}
            }
        }
    }
    (r, w)
}

/// Sums v2 `io.stat` lines (`MAJ:MIN rbytes=N wbytes=N ...`) into (read, write).
pub fn parse_v2_io_stat(text: &str) -> (u64, u64) {
    let (mut r, mut w) = (0u64, 0u64);
    for line in text.lines() {
        for kv in line.split_whitespace().skip(1) {
            if let Some(v) = kv.strip_prefix("rbytes=") {
                r = r.saturating_add(v.parse().unwrap_or(0));
            } else if let Some(v) = kv.strip_prefix("wbytes=") {
                w = w.saturating_add(v.parse().unwrap_or(0));
            }
        }
    }
    (r, w)
}

impl SandboxCgroup {
    /// The cgroup of sandbox `id` (nothing is created yet).
    pub fn new(layout: &CgroupLayout, id: &str) -> Self {
        let dirs = match layout.version {
            CgroupVersion::V1 => V1_CONTROLLERS
                .iter()
                .map(|c| (c.to_string(), layout.root.join(c).join(PARENT).join(id)))
                .collect(),
            CgroupVersion::V2 => vec![(String::new(), layout.root.join(PARENT).join(id))],
        };
        Self {
            layout: layout.clone(),
            id: id.to_string(),
            dirs,
        }
    }

    /// The hierarchy version.
    pub fn version(&self) -> CgroupVersion {
        self.layout.version
    }

    /// The sandbox id naming the cgroup.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Every directory this cgroup owns (one per v1 controller, one on v2).
    pub fn dirs(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|(_, d)| d.clone()).collect()
    }

    fn dir(&self, controller: &str) -> &Path {
        match self.layout.version {
            CgroupVersion::V2 => &self.dirs[0].1,
            CgroupVersion::V1 => self
                .dirs
                .iter()
                .find(|(c, _)| c == controller)
                .map(|(_, d)| d.as_path())
                .unwrap_or(&self.dirs[0].1),
        }
    }

    /// The `cgroup.procs` files a process must be written to in order to join.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs
            .iter()
            .map(|(_, d)| d.join("cgroup.procs"))
            .collect()
    }

    /// Creates the directories (and on v2 enables the controllers on the way down), then
    /// applies `limits` (skipping values a fresh cgroup already has).
    pub fn create(&self, limits: &CgroupLimits) -> Result<(), SandboxError> {
        match self.layout.version {
            CgroupVersion::V1 => {
                for (_, dir) in &self.dirs {
                    fs::create_dir_all(dir).map_err(|e| {
                        SandboxError::op("cgroup create", format!("{}: {e}", dir.display()))
                    })?;
                }
            }
            CgroupVersion::V2 => {
                let parent = self.layout.root.join(PARENT);
                enable_v2_controllers(&self.layout.root)?;
                fs::create_dir_all(&parent).map_err(|e| {
                    SandboxError::op("cgroup create", format!("{}: {e}", parent.display()))
                })?;
                enable_v2_controllers(&parent)?;
                fs::create_dir_all(&self.dirs[0].1).map_err(|e| {
                    SandboxError::op(
                        "cgroup create",
                        format!("{}: {e}", self.dirs[0].1.display()),
                    )
                })?;
            }
        }
        if let Err(e) = self.apply_inner(limits, true) {
            let _ = self.remove(Duration::from_millis(200));
            return Err(e);
        }
        Ok(())
    }

    /// Writes `limits` (used for live updates).
    pub fn apply(&self, limits: &CgroupLimits) -> Result<(), SandboxError> {
        self.apply_inner(limits, false)
    }

    fn apply_inner(&self, limits: &CgroupLimits, fresh: bool) -> Result<(), SandboxError> {
        match self.layout.version {
            CgroupVersion::V1 => self.apply_v1(limits, fresh),
            CgroupVersion::V2 => self.apply_v2(limits, fresh),
        }
    }

    fn apply_v1(&self, l: &CgroupLimits, fresh: bool) -> Result<(), SandboxError> {
        let mem = self.dir("memory");
        let limit = mem.join("memory.limit_in_bytes");
        let memsw = mem.join("memory.memsw.limit_in_bytes");
        let current = read_u64(&limit).unwrap_or(u64::MAX);
        let bytes = l.memory_bytes.to_string();
        // memsw must stay >= limit: raise memsw first when growing, lower limit first when
        // shrinking.
        let has_memsw = memsw.exists();
        if has_memsw && l.memory_bytes > current {
            write(&memsw, &bytes)?;
            write(&limit, &bytes)?;
        } else {
            write(&limit, &bytes)?;
            if has_memsw {
                write(&memsw, &bytes)?;
            }
        }
        let cpu = self.dir("cpu");
        // A fresh cgroup's period is the kernel default (100 ms), the one we use.
        if !fresh || !cpu.join("cpu.cfs_period_us").exists() {
            write(&cpu.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
        }
        write(&cpu.join("cpu.cfs_quota_us"), &l.cpu_quota_us().to_string())?;
        write(&self.dir("pids").join("pids.max"), &l.pids_max.to_string())?;
        // A fresh cgroup has no throttle rule: nothing to write for "unlimited".
        if let Some((maj, min)) = l.block_device.filter(|_| !(fresh && l.disk_bps == 0)) {
            let blk = self.dir("blkio");
            // 0 removes the rule (unlimited).
            let v = format!("{maj}:{min} {}", l.disk_bps);
            write(&blk.join("blkio.throttle.read_bps_device"), &v)?;
            write(&blk.join("blkio.throttle.write_bps_device"), &v)?;
        }
        Ok(())
    }

    fn apply_v2(&self, l: &CgroupLimits, fresh: bool) -> Result<(), SandboxError> {
        let dir = self.dir("");
        write(&dir.join("memory.max"), &l.memory_bytes.to_string())?;
        let swap = dir.join("memory.swap.max");
        if swap.exists() {
            // Present when the kernel accounts swap: no swapping past the memory limit.
            write(&swap, "0")?;
        }
        write(
            &dir.join("cpu.max"),
            &format!("{} {CPU_PERIOD_US}", l.cpu_quota_us()),
        )?;
        write(&dir.join("pids.max"), &l.pids_max.to_string())?;
        if let Some((maj, min)) = l.block_device.filter(|_| !(fresh && l.disk_bps == 0)) {
            let v = if l.disk_bps == 0 {
                format!("{maj}:{min} rbps=max wbps=max")
            } else {
                format!("{maj}:{min} rbps={0} wbps={0}", l.disk_bps)
            };
            write(&dir.join("io.max"), &v)?;
        }
        Ok(())
    }

    /// Moves process `pid` into every directory of this cgroup.
    pub fn attach(&self, pid: u32) -> Result<(), SandboxError> {
        for f in self.procs_files() {
            write(&f, &pid.to_string())?;
        }
        Ok(())
    }

    /// The pids in the cgroup, never the runtime's own (a safety net: killing them must
    /// never take the runtime down).
    pub fn pids(&self) -> Vec<i32> {
        let dir = match self.layout.version {
            CgroupVersion::V1 => self.dir("freezer"),
            CgroupVersion::V2 => self.dir(""),
        };
        // SAFETY: getpid has no preconditions.
        let me = unsafe { libc::getpid() };
        fs::read_to_string(dir.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .filter(|p| *p != me)
            .collect()
    }

    /// v1: the `tasks` files through which a freshly cloned, single-threaded child moves
    /// itself into this cgroup (writing `0` to `tasks` moves only the caller and, unlike a
    /// pid written to `cgroup.procs`, takes no global lock). Empty on v2, where
    /// `CLONE_INTO_CGROUP` places the child at birth.
    pub fn thread_join_files(&self) -> Vec<PathBuf> {
        match self.layout.version {
            CgroupVersion::V1 => self.dirs.iter().map(|(_, d)| d.join("tasks")).collect(),
            CgroupVersion::V2 => Vec::new(),
        }
    }

    /// v2: the directory a child is cloned into with `CLONE_INTO_CGROUP`.
    pub fn v2_dir(&self) -> Option<&Path> {
        (self.layout.version == CgroupVersion::V2).then(|| self.dirs[0].1.as_path())
    }

    /// Freezes every process (v1 `freezer.state`, v2 `cgroup.freeze`) and waits until the
    /// kernel reports the cgroup frozen.
    pub fn freeze(&self) -> Result<(), SandboxError> {
        match self.layout.version {
            CgroupVersion::V1 => {
                let f = self.dir("freezer").join("freezer.state");
                write(&f, "FROZEN")?;
                self.wait_for(|| read(&f).map(|s| s.trim() == "FROZEN"))
            }
            CgroupVersion::V2 => {
                let d = self.dir("");
                write(&d.join("cgroup.freeze"), "1")?;
                let events = d.join("cgroup.events");
                if !events.exists() {
                    return Ok(());
                }
                self.wait_for(|| read(&events).map(|s| keyed_value(&s, "frozen") == Some(1)))
            }
        }
    }

    /// Thaws what [`SandboxCgroup::freeze`] froze.
    pub fn thaw(&self) -> Result<(), SandboxError> {
        match self.layout.version {
            CgroupVersion::V1 => write(&self.dir("freezer").join("freezer.state"), "THAWED"),
            CgroupVersion::V2 => write(&self.dir("").join("cgroup.freeze"), "0"),
        }
    }

    /// True when frozen.
    pub fn is_frozen(&self) -> bool {
        match self.layout.version {
            CgroupVersion::V1 => read(&self.dir("freezer").join("freezer.state"))
                .map(|s| s.trim() == "FROZEN")
                .unwrap_or(false),
            CgroupVersion::V2 => read(&self.dir("").join("cgroup.freeze"))
                .map(|s| s.trim() == "1")
                .unwrap_or(false),
        }
    }

    fn wait_for(
        &self,
        mut done: impl FnMut() -> Result<bool, SandboxError>,
    ) -> Result<(), SandboxError> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if done()? {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(SandboxError::op(
                    "cgroup freeze",
                    format!("{} did not reach the frozen state within 5s", self.id),
                ));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Kills every process in the cgroup: v2 writes `cgroup.kill`; v1 freezes, SIGKILLs each
    /// pid and thaws (a frozen task cannot fork, so none escapes).
    pub fn kill_all(&self) -> Result<(), SandboxError> {
        match self.layout.version {
            CgroupVersion::V2 => {
                let f = self.dir("").join("cgroup.kill");
                write(&f, "1")
            }
            CgroupVersion::V1 => {
                let frozen = self.freeze();
                for pid in self.pids() {
                    // SAFETY: kill(2) has no memory-safety preconditions.
                    unsafe {
                        libc::kill(pid, libc::SIGKILL);
                    }
                }
                let thawed = self.thaw();
                frozen.and(thawed)
            }
        }
    }

    /// How many times the kernel's OOM killer killed a task in this cgroup.
    pub fn oom_kills(&self) -> u64 {
        match self.layout.version {
            CgroupVersion::V1 => fs::read_to_string(self.dir("memory").join("memory.oom_control"))
                .ok()
                .and_then(|s| keyed_value(&s, "oom_kill"))
                .unwrap_or(0),
            CgroupVersion::V2 => fs::read_to_string(self.dir("").join("memory.events"))
                .ok()
                .and_then(|s| keyed_value(&s, "oom_kill"))
                .unwrap_or(0),
        }
    }

    /// Memory, CPU, block I/O and pid counters (network counters are filled in by the caller).
    pub fn stats(&self) -> Result<SandboxStats, SandboxError> {
        let mut s = SandboxStats::default();
        match self.layout.version {
            CgroupVersion::V1 => {
                let mem = self.dir("memory");
                s.memory_bytes = read_u64(&mem.join("memory.usage_in_bytes")).unwrap_or(0);
                s.memory_peak_bytes = read_u64(&mem.join("memory.max_usage_in_bytes")).unwrap_or(0);
                s.cpu_usage_ns = read_u64(&self.dir("cpuacct").join("cpuacct.usage"))
                    .ok_or_else(|| SandboxError::op("stats", "cpuacct.usage unreadable"))?;
                let blk = fs::read_to_string(
                    self.dir("blkio")
                        .join("blkio.throttle.io_service_bytes_recursive"),
                )
                .or_else(|_| {
                    fs::read_to_string(self.dir("blkio").join("blkio.throttle.io_service_bytes"))
                })
                .unwrap_or_default();
                (s.disk_read_bytes, s.disk_write_bytes) = parse_v1_blkio(&blk);
                s.pids = read_u64(&self.dir("pids").join("pids.current")).unwrap_or(0);
            }
            CgroupVersion::V2 => {
                let d = self.dir("");
                s.memory_bytes = read_u64(&d.join("memory.current")).unwrap_or(0);
                s.memory_peak_bytes = read_u64(&d.join("memory.peak")).unwrap_or(s.memory_bytes);
                let cpu = read(&d.join("cpu.stat"))?;
                s.cpu_usage_ns = keyed_value(&cpu, "usage_usec")
                    .unwrap_or(0)
                    .saturating_mul(1000);
                let io = fs::read_to_string(d.join("io.stat")).unwrap_or_default();
                (s.disk_read_bytes, s.disk_write_bytes) = parse_v2_io_stat(&io);
                s.pids = read_u64(&d.join("pids.current")).unwrap_or(0);
            }
        }
        Ok(s)
    }

    /// True when any of the cgroup's directories still exists.
    pub fn exists(&self) -> bool {
        self.dirs.iter().any(|(_, d)| d.exists())
    }

    /// Removes the directories, retrying while the kernel still reports them busy (tasks
    /// that were just killed take a moment to leave). Missing directories are fine.
    pub fn remove(&self, patience: Duration) -> Result<(), SandboxError> {
        let deadline = Instant::now() + patience;
        for (_, dir) in &self.dirs {
            if !dir.exists() {
                continue;
            }
            if !is_cgroupfs(dir) {
                // The test seam: a plain directory holding the files we wrote.
                fs::remove_dir_all(dir)?;
                continue;
            }
            loop {
                match fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == ErrorKind::NotFound => break,
                    Err(e) if is_busy(&e) && Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => {
                        return Err(SandboxError::op(
                            "cgroup remove",
                            format!("{}: {e}", dir.display()),
                        ))
                    }
                }
            }
        }
        Ok(())
    }
}

fn is_busy(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EBUSY)
}

/// True when `path` lives on a cgroup (v1 or v2) filesystem.
fn is_cgroupfs(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into the zeroed struct we pass; `c` is a valid C string.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        if libc::statfs(c.as_ptr(), &mut st) != 0 {
            return false;
        }
        st.f_type == libc::CGROUP_SUPER_MAGIC || st.f_type == libc::CGROUP2_SUPER_MAGIC
    }
}

fn enable_v2_controllers(dir: &Path) -> Result<(), SandboxError> {
    let want = V2_CONTROLLERS
        .iter()
        .map(|c| format!("+{c}"))
        .collect::<Vec<_>>()
        .join(" ");
    let f = dir.join("cgroup.subtree_control");
    let current = fs::read_to_string(&f).unwrap_or_default();
    if V2_CONTROLLERS
        .iter()
        .all(|c| current.split_whitespace().any(|x| x == *c))
    {
        return Ok(());
    }
    write(&f, &want)
}

/// The whole-disk block device backing `path` (a partition is mapped to its disk, since
/// throttling applies to request queues). `None` for filesystems without a block device
/// (tmpfs, overlay on tmpfs, ...).
pub fn block_device_of(path: &Path) -> Option<(u32, u32)> {
    use std::os::unix::fs::MetadataExt;
    let dev = fs::metadata(path).ok()?.dev();
    // SAFETY: major/minor are pure arithmetic on a dev_t.
    let (maj, min) = (libc::major(dev), libc::minor(dev));
    if maj == 0 {
        return None;
    }
    let sys = PathBuf::from(format!("/sys/dev/block/{maj}:{min}"));
    if !sys.exists() {
        return None;
    }
    if sys.join("partition").exists() {
        let parent = fs::read_to_string(sys.join("..").join("dev")).ok()?;
        let (a, b) = parent.trim().split_once(':')?;
        return Some((a.parse().ok()?, b.parse().ok()?));
    }
    Some((maj, min))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v1_tree() -> tempfile::TempDir {
        let t = tempfile::tempdir().expect("tempdir");
        for c in V1_CONTROLLERS {
            fs::create_dir_all(t.path().join(c)).expect("mkdir");
        }
        t
    }

    fn v2_tree() -> tempfile::TempDir {
        let t = tempfile::tempdir().expect("tempdir");
        fs::write(
            t.path().join("cgroup.controllers"),
            "cpuset cpu io memory hugetlb pids rdma misc\n",
        )
        .expect("write");
        fs::write(t.path().join("cgroup.subtree_control"), "").expect("write");
        t
    }

    fn limits() -> CgroupLimits {
        CgroupLimits {
            memory_bytes: 64 << 20,
            cpu_cores: 0.5,
            pids_max: 32,
            block_device: Some((254, 0)),
            disk_bps: 10_000_000,
        }
    }

    #[test]
    fn detects_v1_and_v2_layouts() {
        let v1 = v1_tree();
        assert_eq!(
            CgroupLayout::detect(v1.path()).expect("v1").version,
            CgroupVersion::V1
        );
        let v2 = v2_tree();
        assert_eq!(
            CgroupLayout::detect(v2.path()).expect("v2").version,
            CgroupVersion::V2
        );
        let empty = tempfile::tempdir().expect("tempdir");
        let err = CgroupLayout::detect(empty.path()).expect_err("nothing mounted");
        assert_eq!(err.code(), "SANDBOX_001");
        assert!(err.to_string().contains("memory"), "{err}");
    }

    #[test]
    fn hybrid_with_populated_unified_prefers_v2() {
        let t = v1_tree();
        fs::create_dir_all(t.path().join("unified")).expect("mkdir");
        fs::write(
            t.path().join("unified/cgroup.controllers"),
            "memory cpu io pids\n",
        )
        .expect("write");
        let l = CgroupLayout::detect(t.path()).expect("detect");
        assert_eq!(l.version, CgroupVersion::V2);
        assert_eq!(l.root, t.path().join("unified"));
        // An empty unified mount (this machine) keeps v1.
        fs::write(t.path().join("unified/cgroup.controllers"), "").expect("write");
        assert_eq!(
            CgroupLayout::detect(t.path()).expect("detect").version,
            CgroupVersion::V1
        );
    }

    #[test]
    fn v1_writer_places_every_limit_in_its_controller() {
        let t = v1_tree();
        let layout = CgroupLayout::detect(t.path()).expect("layout");
        let cg = SandboxCgroup::new(&layout, "sbx1");
        // The kernel creates these files on mkdir; emulate memsw accounting being present.
        fs::create_dir_all(t.path().join("memory/symbiont/sbx1")).expect("mkdir");
        fs::write(
            t.path()
                .join("memory/symbiont/sbx1/memory.memsw.limit_in_bytes"),
            "9223372036854771712",
        )
        .expect("write");
        cg.create(&limits()).expect("create");
        let rd = |p: &str| fs::read_to_string(t.path().join(p)).expect(p);
        assert_eq!(rd("memory/symbiont/sbx1/memory.limit_in_bytes"), "67108864");
        assert_eq!(
            rd("memory/symbiont/sbx1/memory.memsw.limit_in_bytes"),
            "67108864"
        );
        assert_eq!(rd("cpu/symbiont/sbx1/cpu.cfs_quota_us"), "50000");
        assert_eq!(rd("cpu/symbiont/sbx1/cpu.cfs_period_us"), "100000");
        assert_eq!(rd("pids/symbiont/sbx1/pids.max"), "32");
        assert_eq!(
            rd("blkio/symbiont/sbx1/blkio.throttle.read_bps_device"),
            "254:0 10000000"
        );
        assert_eq!(
            rd("blkio/symbiont/sbx1/blkio.throttle.write_bps_device"),
            "254:0 10000000"
        );
        assert!(t.path().join("freezer/symbiont/sbx1").is_dir());
        assert!(t.path().join("cpuacct/symbiont/sbx1").is_dir());
        assert_eq!(cg.procs_files().len(), V1_CONTROLLERS.len());

        // Live update: growing memory raises memsw first; disk 0 removes the rule.
        let mut more = limits();
        more.memory_bytes = 128 << 20;
        more.disk_bps = 0;
        more.cpu_cores = 1.5;
        cg.apply(&more).expect("update");
        assert_eq!(
            rd("memory/symbiont/sbx1/memory.limit_in_bytes"),
            "134217728"
        );
        assert_eq!(rd("cpu/symbiont/sbx1/cpu.cfs_quota_us"), "150000");
        assert_eq!(
            rd("blkio/symbiont/sbx1/blkio.throttle.write_bps_device"),
            "254:0 0"
        );
    }

    #[test]
    fn v2_writer_enables_controllers_and_writes_unified_files() {
        let t = v2_tree();
        let layout = CgroupLayout::detect(t.path()).expect("layout");
        let cg = SandboxCgroup::new(&layout, "sbx2");
        // The kernel creates memory.swap.max when it accounts swap; emulate that.
        fs::create_dir_all(t.path().join("symbiont/sbx2")).expect("mkdir");
        fs::write(t.path().join("symbiont/sbx2/memory.swap.max"), "max").expect("write");
        cg.create(&limits()).expect("create");
        let rd = |p: &str| fs::read_to_string(t.path().join(p)).expect(p);
        assert_eq!(rd("cgroup.subtree_control"), "+memory +cpu +io +pids");
        assert_eq!(
            rd("symbiont/cgroup.subtree_control"),
            "+memory +cpu +io +pids"
        );
        assert_eq!(rd("symbiont/sbx2/memory.max"), "67108864");
        assert_eq!(rd("symbiont/sbx2/memory.swap.max"), "0");
        assert_eq!(rd("symbiont/sbx2/cpu.max"), "50000 100000");
        assert_eq!(rd("symbiont/sbx2/pids.max"), "32");
        assert_eq!(
            rd("symbiont/sbx2/io.max"),
            "254:0 rbps=10000000 wbps=10000000"
        );
        assert_eq!(
            cg.procs_files(),
            vec![t.path().join("symbiont/sbx2/cgroup.procs")]
        );

        let mut unlimited = limits();
        unlimited.disk_bps = 0;
        cg.apply(&unlimited).expect("update");
        assert_eq!(rd("symbiont/sbx2/io.max"), "254:0 rbps=max wbps=max");

        cg.kill_all().expect("kill");
        assert_eq!(rd("symbiont/sbx2/cgroup.kill"), "1");
        cg.freeze().expect("freeze");
        assert_eq!(rd("symbiont/sbx2/cgroup.freeze"), "1");
        assert!(cg.is_frozen());
        cg.thaw().expect("thaw");
        assert_eq!(rd("symbiont/sbx2/cgroup.freeze"), "0");
    }

    #[test]
    fn v1_freeze_and_kill_use_the_freezer() {
        let t = v1_tree();
        let layout = CgroupLayout::detect(t.path()).expect("layout");
        let cg = SandboxCgroup::new(&layout, "sbx3");
        cg.create(&limits()).expect("create");
        cg.freeze().expect("freeze");
        assert!(cg.is_frozen());
        cg.kill_all().expect("kill");
        assert_eq!(
            fs::read_to_string(t.path().join("freezer/symbiont/sbx3/freezer.state"))
                .expect("state"),
            "THAWED"
        );
    }

    #[test]
    fn stats_are_parsed_for_both_versions() {
        let t = v1_tree();
        let layout = CgroupLayout::detect(t.path()).expect("layout");
        let cg = SandboxCgroup::new(&layout, "s");
        cg.create(&limits()).expect("create");
        let w = |p: &str, v: &str| fs::write(t.path().join(p), v).expect(p);
        w("memory/symbiont/s/memory.usage_in_bytes", "1000\n");
        w("memory/symbiont/s/memory.max_usage_in_bytes", "2000\n");
        w("cpuacct/symbiont/s/cpuacct.usage", "123456789\n");
        w(
            "blkio/symbiont/s/blkio.throttle.io_service_bytes_recursive",
            "254:0 Read 10\n254:0 Write 20\n254:0 Sync 30\n254:0 Async 0\n254:0 Total 30\nTotal 30\n",
        );
        w("pids/symbiont/s/pids.current", "3\n");
        w(
            "memory/symbiont/s/memory.oom_control",
            "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
        );
        let s = cg.stats().expect("stats");
        assert_eq!(
            (s.memory_bytes, s.memory_peak_bytes, s.cpu_usage_ns),
            (1000, 2000, 123456789)
        );
        assert_eq!((s.disk_read_bytes, s.disk_write_bytes, s.pids), (10, 20, 3));
        assert_eq!(cg.oom_kills(), 2);

        let t2 = v2_tree();
        let layout = CgroupLayout::detect(t2.path()).expect("layout");
        let cg = SandboxCgroup::new(&layout, "s");
        cg.create(&limits()).expect("create");
        let w = |p: &str, v: &str| fs::write(t2.path().join(p), v).expect(p);
        w("symbiont/s/memory.current", "5\n");
        w("symbiont/s/memory.peak", "7\n");
        w("symbiont/s/cpu.stat", "usage_usec 42\nuser_usec 40\n");
        w(
            "symbiont/s/io.stat",
            "254:0 rbytes=100 wbytes=200 rios=1 wios=2\n8:0 rbytes=1 wbytes=2\n",
        );
        w("symbiont/s/pids.current", "4\n");
        w(
            "symbiont/s/memory.events",
            "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n",
        );
        let s = cg.stats().expect("stats");
        assert_eq!(
            (s.memory_bytes, s.memory_peak_bytes, s.cpu_usage_ns),
            (5, 7, 42_000)
        );
        assert_eq!(
            (s.disk_read_bytes, s.disk_write_bytes, s.pids),
            (101, 202, 4)
        );
        assert_eq!(cg.oom_kills(), 1);
    }

    #[test]
    fn remove_is_idempotent() {
        let t = v2_tree();
        let layout = CgroupLayout::detect(t.path()).expect("layout");
        let cg = SandboxCgroup::new(&layout, "gone");
        cg.create(&limits()).expect("create");
        assert!(cg.exists());
        cg.remove(Duration::from_millis(50)).expect("remove");
        assert!(!cg.exists());
        cg.remove(Duration::from_millis(50)).expect("again");
    }

    #[test]
    fn join_files_are_v1_tasks_files() {
        let t = v1_tree();
        let layout = CgroupLayout::detect(t.path()).expect("layout");
        let cg = SandboxCgroup::new(&layout, "j");
        assert_eq!(
            cg.thread_join_files()[0],
            t.path().join("memory/symbiont/j/tasks")
        );
        assert_eq!(cg.thread_join_files().len(), V1_CONTROLLERS.len());
        assert!(cg.v2_dir().is_none());
        let t2 = v2_tree();
        let layout = CgroupLayout::detect(t2.path()).expect("layout");
        let cg = SandboxCgroup::new(&layout, "j");
        assert!(cg.thread_join_files().is_empty());
        assert_eq!(cg.v2_dir(), Some(t2.path().join("symbiont/j").as_path()));
    }

    #[test]
    fn cpu_quota_has_a_floor() {
        let mut l = limits();
        l.cpu_cores = 0.001;
        assert_eq!(l.cpu_quota_us(), 1_000);
        l.cpu_cores = 2.0;
        assert_eq!(l.cpu_quota_us(), 200_000);
    }
}
