//! A small, self-contained reader of cgroup usage counters (v1 and v2), and a
//! [`UsageSource`] over it.
//!
//! It only reads; creating cgroups and writing limits is the sandbox tiers' job. Files read:
//!
//! | counter | cgroup v1 | cgroup v2 |
//! |---|---|---|
//! | memory | `memory/memory.usage_in_bytes`, `memory.max_usage_in_bytes` | `memory.current`, `memory.peak` |
//! | CPU time | `cpuacct/cpuacct.usage` (ns) | `cpu.stat` `usage_usec` |
//! | disk bytes | `blkio/blkio.throttle.io_service_bytes_recursive` (Read, Write) | `io.stat` `rbytes`, `wbytes` |
//! | processes | `pids/pids.current` | `pids.current` |
//!
//! Network bytes are not counted by cgroups; [`CgroupUsageSource::with_interfaces`] adds the
//! counters of network interfaces (`/sys/class/net/<if>/statistics`), e.g. the host end of
//! an agent's veth pair (whose rx is the agent's tx).
//!
//! These pseudo-files are generated from kernel memory on read, so they are read
//! synchronously: a read never waits for a device.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use parking_lot::Mutex;

use super::monitor::UsageSource;
use super::ResourceError;
use crate::sandbox::SandboxStats;

/// The default cgroup mount point.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// Where one cgroup's counters live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CgroupLayout {
    /// cgroup v1: one directory per controller hierarchy. `blkio` and `pids` are optional.
    V1 {
        /// The cgroup in the `memory` hierarchy.
        memory: PathBuf,
        /// The cgroup in the `cpuacct` hierarchy.
        cpuacct: PathBuf,
        /// The cgroup in the `blkio` hierarchy.
        blkio: Option<PathBuf>,
        /// The cgroup in the `pids` hierarchy.
        pids: Option<PathBuf>,
    },
    /// cgroup v2: one directory.
    V2 {
        /// The cgroup's directory.
        dir: PathBuf,
    },
}

/// One counter file and how to read it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Field {
    /// A plain number of bytes: current memory.
    Memory,
    /// A plain number of bytes: peak memory.
    MemoryPeak,
    /// A plain number of nanoseconds (v1 `cpuacct.usage`).
    CpuNs,
    /// `usage_usec` of a v2 `cpu.stat`.
    CpuStatUsec,
    /// A v1 `blkio.throttle.io_service_bytes*` table.
    BlkioV1,
    /// A v2 `io.stat` table.
    IoStatV2,
    /// A plain number: processes.
    Pids,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Counter {
    field: Field,
    path: PathBuf,
    /// A missing optional file reads as 0 (e.g. `memory.peak` before Linux 5.19).
    required: bool,
}

/// The counter files, kept open between samples.
struct OpenFiles {
    files: Vec<Option<File>>,
}

impl Drop for OpenFiles {
    fn drop(&mut self) {
        let n = self.files.iter().flatten().count();
        CACHED_FDS.fetch_sub(n, Ordering::Relaxed);
    }
}

/// Descriptors currently kept open by all readers.
static CACHED_FDS: AtomicUsize = AtomicUsize::new(0);

/// How many descriptors readers may keep open: half the soft `RLIMIT_NOFILE`, so the
/// rest of the process keeps room. Beyond it, readers open and close files per sample.
fn fd_budget() -> usize {
    static BUDGET: OnceLock<usize> = OnceLock::new();
    *BUDGET.get_or_init(|| {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes one rlimit into the valid, exclusively borrowed `lim`.
        let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
        if rc != 0 {
            return 0;
        }
        usize::try_from(lim.rlim_cur / 2).unwrap_or(usize::MAX)
    })
}

/// Reads one cgroup's usage counters.
///
/// The counter files are opened on the first read and kept open: a later sample costs one
/// `pread` per file instead of a path walk, `open` and `close` (several times cheaper on
/// cgroupfs). Readers together keep at most half the soft `RLIMIT_NOFILE` descriptors open;
/// past that, files are opened per sample. A cgroup that was removed (its open files then
/// fail with `ENODEV`) is re-opened once; if it is really gone, `read` fails.
pub struct CgroupStatsReader {
    layout: CgroupLayout,
    counters: Vec<Counter>,
    cache: Mutex<Option<Arc<OpenFiles>>>,
}

impl Clone for CgroupStatsReader {
    fn clone(&self) -> Self {
        Self::new(self.layout.clone())
    }
}

impl PartialEq for CgroupStatsReader {
    fn eq(&self, other: &Self) -> bool {
        self.layout == other.layout
    }
}

impl Eq for CgroupStatsReader {}

impl std::fmt::Debug for CgroupStatsReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CgroupStatsReader")
            .field("layout", &self.layout)
            .field("cached", &self.cache.lock().is_some())
            .finish()
    }
}

impl CgroupStatsReader {
    /// A reader for an explicit layout.
    pub fn new(layout: CgroupLayout) -> Self {
        let c = |field, path: PathBuf, required| Counter {
            field,
            path,
            required,
        };
        let counters = match &layout {
            CgroupLayout::V1 {
                memory,
                cpuacct,
                blkio,
                pids,
            } => {
                let mut v = vec![
                    c(Field::Memory, memory.join("memory.usage_in_bytes"), true),
                    c(
                        Field::MemoryPeak,
                        memory.join("memory.max_usage_in_bytes"),
                        true,
                    ),
                    c(Field::CpuNs, cpuacct.join("cpuacct.usage"), true),
                ];
                if let Some(blkio) = blkio {
                    v.push(c(
                        Field::BlkioV1,
                        blkio.join("blkio.throttle.io_service_bytes_recursive"),
                        true,
                    ));
                }
                if let Some(pids) = pids {
                    v.push(c(Field::Pids, pids.join("pids.current"), true));
                }
                v
            }
            CgroupLayout::V2 { dir } => vec![
                c(Field::Memory, dir.join("memory.current"), true),
                // memory.peak exists since Linux 5.19.
                c(Field::MemoryPeak, dir.join("memory.peak"), false),
                c(Field::CpuStatUsec, dir.join("cpu.stat"), true),
                // io.stat and pids.current exist when those controllers are enabled.
                c(Field::IoStatV2, dir.join("io.stat"), false),
                c(Field::Pids, dir.join("pids.current"), false),
            ],
        };
        Self {
            layout,
            counters,
            cache: Mutex::new(None),
        }
    }

    /// The cgroup v1 group `relative` (e.g. `symbiont/agent-…`) in the hierarchies mounted
    /// under `root/<controller>`. `blkio` and `pids` are used when their hierarchies exist.
    pub fn v1(root: impl AsRef<Path>, relative: impl AsRef<Path>) -> Self {
        let root = root.as_ref();
        let rel = relative.as_ref();
        let optional = |ctrl: &str| {
            let base = root.join(ctrl);
            base.is_dir().then(|| base.join(rel))
        };
        Self::new(CgroupLayout::V1 {
            memory: root.join("memory").join(rel),
            cpuacct: root.join("cpuacct").join(rel),
            blkio: optional("blkio"),
            pids: optional("pids"),
        })
    }

    /// The cgroup v2 group at `dir`.
    pub fn v2(dir: impl Into<PathBuf>) -> Self {
        Self::new(CgroupLayout::V2 { dir: dir.into() })
    }

    /// The group `relative` under [`CGROUP_ROOT`]: v2 when the root is a unified hierarchy,
    /// v1 when it holds per-controller hierarchies.
    pub fn detect(relative: impl AsRef<Path>) -> io::Result<Self> {
        let root = Path::new(CGROUP_ROOT);
        if root.join("cgroup.controllers").exists() {
            return Ok(Self::v2(root.join(relative)));
        }
        if root.join("memory").is_dir() && root.join("cpuacct").is_dir() {
            return Ok(Self::v1(root, relative));
        }
        Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "no cgroup hierarchy with memory and cpuacct (v1) or a unified hierarchy (v2) \
                 is mounted at {CGROUP_ROOT}"
            ),
        ))
    }

    /// The layout read.
    pub fn layout(&self) -> &CgroupLayout {
        &self.layout
    }

    /// Reads the counters now. Fails when the cgroup is gone.
    pub fn read(&self) -> io::Result<SandboxStats> {
        let mut buf = Vec::with_capacity(512);
        if let Some(files) = self.open_cached() {
            match self.read_with(&mut buf, |i, path, buf| match &files.files[i] {
                Some(f) => pread_all(f, buf),
                None => read_path(path, buf),
            }) {
                Ok(stats) => return Ok(stats),
                // Stale descriptors (the cgroup was removed, maybe re-created): drop them
                // and read by path once.
                Err(_) => {
                    self.cache.lock().take();
                }
            }
        }
        self.read_with(&mut buf, |_, path, buf| read_path(path, buf))
    }

    fn open_cached(&self) -> Option<Arc<OpenFiles>> {
        let mut cache = self.cache.lock();
        if let Some(files) = &*cache {
            return Some(files.clone());
        }
        let n = self.counters.len();
        if CACHED_FDS.fetch_add(n, Ordering::Relaxed) + n > fd_budget() {
            CACHED_FDS.fetch_sub(n, Ordering::Relaxed);
            return None;
        }
        let mut files = OpenFiles { files: Vec::new() };
        for counter in &self.counters {
            match File::open(&counter.path) {
                Ok(f) => files.files.push(Some(f)),
                Err(_) if !counter.required => {
                    CACHED_FDS.fetch_sub(1, Ordering::Relaxed);
                    files.files.push(None);
                }
                Err(_) => {
                    // Not there (yet): give back the descriptors not opened (dropping
                    // `files` gives back those that were) and read by path.
                    CACHED_FDS.fetch_sub(n - files.files.len(), Ordering::Relaxed);
                    return None;
                }
            }
        }
        let files = Arc::new(files);
        *cache = Some(files.clone());
        Some(files)
    }

    fn read_with(
        &self,
        buf: &mut Vec<u8>,
        mut read: impl FnMut(usize, &Path, &mut Vec<u8>) -> io::Result<()>,
    ) -> io::Result<SandboxStats> {
        let mut stats = SandboxStats::default();
        let mut peak = None;
        for (i, counter) in self.counters.iter().enumerate() {
            buf.clear();
            match read(i, &counter.path, buf) {
                Ok(()) => {}
                Err(e) if !counter.required && e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("{}: {e}", counter.path.display()),
                    ))
                }
            }
            let text = std::str::from_utf8(buf).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: {e}", counter.path.display()),
                )
            })?;
            match counter.field {
                Field::Memory => stats.memory_bytes = parse_number(&counter.path, text)?,
                Field::MemoryPeak => peak = Some(parse_number(&counter.path, text)?),
                Field::CpuNs => stats.cpu_usage_ns = parse_number(&counter.path, text)?,
                Field::CpuStatUsec => {
                    stats.cpu_usage_ns = parse_keyed(text, "usage_usec")
                        .unwrap_or(0)
                        .saturating_mul(1000)
                }
                Field::BlkioV1 => {
                    (stats.disk_read_bytes, stats.disk_write_bytes) = parse_blkio_v1(text)
                }
                Field::IoStatV2 => {
                    (stats.disk_read_bytes, stats.disk_write_bytes) = parse_io_stat_v2(text)
                }
                Field::Pids => stats.pids = parse_number(&counter.path, text)?,
            }
        }
        stats.memory_peak_bytes = peak.unwrap_or(stats.memory_bytes);
        Ok(stats)
    }
}

/// Reads a whole pseudo-file from offset 0 of an open descriptor (cgroupfs regenerates
/// the contents when a read starts at 0).
fn pread_all(file: &File, buf: &mut Vec<u8>) -> io::Result<()> {
    let mut chunk = [0u8; 512];
    let mut off = 0u64;
    loop {
        let n = file.read_at(&mut chunk, off)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        off += n as u64;
        if n < chunk.len() {
            return Ok(());
        }
    }
}

fn read_path(path: &Path, buf: &mut Vec<u8>) -> io::Result<()> {
    File::open(path)?.read_to_end(buf)?;
    Ok(())
}

fn parse_number(path: &Path, text: &str) -> io::Result<u64> {
    let text = text.trim();
    if text == "max" {
        return Ok(u64::MAX);
    }
    text.parse::<u64>().map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: expected a number, got {text:?}: {e}", path.display()),
        )
    })
}

fn read_u64(path: &Path) -> io::Result<u64> {
    let mut buf = Vec::with_capacity(32);
    read_path(path, &mut buf)?;
    parse_number(path, &String::from_utf8_lossy(&buf))
}

/// Sums the `Read` and `Write` lines of a v1 `blkio.throttle.io_service_bytes*` file
/// (`MAJ:MIN Read N`); the `Total` line is ignored.
pub fn parse_blkio_v1(text: &str) -> (u64, u64) {
    let (mut read, mut write) = (0u64, 0u64);
    for line in text.lines() {
        let mut f = line.split_whitespace();
        let (Some(_dev), Some(op), Some(n)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        let Ok(n) = n.parse::<u64>() else { continue };
        match op {
            "Read" => read = read.saturating_add(n),
            "Write" => write = write.saturating_add(n),
            _ => {}
        }
    }
    (read, write)
}

/// Sums `rbytes` and `wbytes` over the devices of a v2 `io.stat` file.
pub fn parse_io_stat_v2(text: &str) -> (u64, u64) {
    let (mut read, mut write) = (0u64, 0u64);
    for line in text.lines() {
        for field in line.split_whitespace().skip(1) {
            if let Some(v) = field.strip_prefix("rbytes=") {
                read = read.saturating_add(v.parse().unwrap_or(0));
            } else if let Some(v) = field.strip_prefix("wbytes=") {
                write = write.saturating_add(v.parse().unwrap_or(0));
            }
        }
    }
    (read, write)
}

/// The value of `key` in a flat-keyed file (`key value` per line, e.g. `cpu.stat`).
pub fn parse_keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let mut f = line.split_whitespace();
        (f.next()? == key).then(|| f.next()?.parse().ok())?
    })
}

/// Received and sent bytes of a network interface, from
/// `/sys/class/net/<iface>/statistics/{rx,tx}_bytes`.
pub fn read_interface_counters(iface: &str) -> io::Result<(u64, u64)> {
    let base = Path::new("/sys/class/net").join(iface).join("statistics");
    Ok((
        read_u64(&base.join("rx_bytes"))?,
        read_u64(&base.join("tx_bytes"))?,
    ))
}

/// Which way an interface's counters count for the agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InterfaceSide {
    /// The interface is inside the agent's network namespace: its rx is the agent's rx.
    Agent,
    /// The host end of the agent's veth pair: its rx is what the agent sent.
    HostPeer,
}

/// A [`UsageSource`] reading a cgroup (and optionally network interfaces) directly.
#[derive(Clone, Debug)]
pub struct CgroupUsageSource {
    reader: CgroupStatsReader,
    interfaces: Vec<(String, InterfaceSide)>,
}

impl CgroupUsageSource {
    /// Reads the cgroup of `reader`.
    pub fn new(reader: CgroupStatsReader) -> Self {
        Self {
            reader,
            interfaces: Vec::new(),
        }
    }

    /// Also counts the traffic of these interfaces as the agent's network bytes.
    pub fn with_interfaces(mut self, interfaces: Vec<(String, InterfaceSide)>) -> Self {
        self.interfaces = interfaces;
        self
    }

    /// Reads everything now.
    pub fn read(&self) -> io::Result<SandboxStats> {
        let mut stats = self.reader.read()?;
        for (iface, side) in &self.interfaces {
            let (rx, tx) = read_interface_counters(iface)?;
            let (rx, tx) = match side {
                InterfaceSide::Agent => (rx, tx),
                InterfaceSide::HostPeer => (tx, rx),
            };
            stats.net_rx_bytes = stats.net_rx_bytes.saturating_add(rx);
            stats.net_tx_bytes = stats.net_tx_bytes.saturating_add(tx);
        }
        Ok(stats)
    }
}

#[async_trait]
impl UsageSource for CgroupUsageSource {
    async fn sample(&self) -> Result<SandboxStats, ResourceError> {
        self.read()
            .map_err(|e| ResourceError::Usage(format!("cgroup read failed: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blkio_v1_sums_reads_and_writes_over_devices() {
        let text = "254:0 Read 4096\n254:0 Write 8192\n254:0 Sync 0\n254:0 Total 12288\n\
                    8:0 Read 1\n8:0 Write 2\nTotal 12291\n";
        assert_eq!(parse_blkio_v1(text), (4097, 8194));
        assert_eq!(parse_blkio_v1("Total 0\n"), (0, 0));
    }

    #[test]
    fn io_stat_v2_sums_rbytes_and_wbytes() {
        let text = "254:0 rbytes=100 wbytes=200 rios=1 wios=2 dbytes=0 dios=0\n\
                    8:0 rbytes=1 wbytes=2 rios=1 wios=1 dbytes=0 dios=0\n";
        assert_eq!(parse_io_stat_v2(text), (101, 202));
    }

    #[test]
    fn keyed_files_are_parsed() {
        let text = "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\n";
        assert_eq!(parse_keyed(text, "usage_usec"), Some(1500));
        assert_eq!(parse_keyed(text, "missing"), None);
    }

    #[test]
    fn v1_and_v2_layouts_are_read_from_files() {
        let root = tempfile::tempdir().expect("tempdir");
        let r = root.path();
        for (dir, file, value) in [
            ("memory/g", "memory.usage_in_bytes", "1000\n"),
            ("memory/g", "memory.max_usage_in_bytes", "2000\n"),
            ("cpuacct/g", "cpuacct.usage", "123456789\n"),
            (
                "blkio/g",
                "blkio.throttle.io_service_bytes_recursive",
                "254:0 Read 10\n254:0 Write 20\nTotal 30\n",
            ),
            ("pids/g", "pids.current", "3\n"),
        ] {
            std::fs::create_dir_all(r.join(dir)).expect("mkdir");
            std::fs::write(r.join(dir).join(file), value).expect("write");
        }
        let stats = CgroupStatsReader::v1(r, "g").read().expect("v1 read");
        assert_eq!(stats.memory_bytes, 1000);
        assert_eq!(stats.memory_peak_bytes, 2000);
        assert_eq!(stats.cpu_usage_ns, 123_456_789);
        assert_eq!((stats.disk_read_bytes, stats.disk_write_bytes), (10, 20));
        assert_eq!(stats.pids, 3);

        let v2 = r.join("v2");
        std::fs::create_dir_all(&v2).expect("mkdir");
        for (file, value) in [
            ("memory.current", "4096\n"),
            ("cpu.stat", "usage_usec 7\nuser_usec 5\n"),
            ("io.stat", "254:0 rbytes=1 wbytes=2 rios=0 wios=0\n"),
            ("pids.current", "1\n"),
        ] {
            std::fs::write(v2.join(file), value).expect("write");
        }
        let stats = CgroupStatsReader::v2(&v2).read().expect("v2 read");
        assert_eq!(stats.memory_bytes, 4096);
        assert_eq!(stats.memory_peak_bytes, 4096, "no memory.peak: falls back");
        assert_eq!(stats.cpu_usage_ns, 7000);
        assert_eq!((stats.disk_read_bytes, stats.disk_write_bytes), (1, 2));
        assert_eq!(stats.pids, 1);
    }

    #[test]
    fn cached_reads_see_new_values() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("g");
        std::fs::create_dir_all(&dir).expect("mkdir");
        let write = |cpu: &str| {
            std::fs::write(dir.join("memory.current"), "1\n").expect("write");
            std::fs::write(dir.join("cpu.stat"), cpu).expect("write");
        };
        write("usage_usec 1\n");
        let reader = CgroupStatsReader::v2(&dir);
        assert_eq!(reader.read().expect("read").cpu_usage_ns, 1000);
        assert!(reader.cache.lock().is_some(), "descriptors kept");
        // Same inode rewritten in place: the kept descriptor sees it.
        std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(dir.join("cpu.stat"))
            .and_then(|mut f| std::io::Write::write_all(&mut f, b"usage_usec 22\n"))
            .expect("rewrite");
        assert_eq!(reader.read().expect("read").cpu_usage_ns, 22_000);
        // (Removal and re-creation need cgroupfs semantics — reads of a removed group's
        // open files fail with ENODEV — and are tested on real cgroups in
        // tests/resource.rs.)
    }

    #[test]
    fn a_missing_cgroup_is_an_error() {
        let reader = CgroupStatsReader::v2("/nonexistent/symbiont-test");
        assert!(reader.read().is_err());
    }

    #[test]
    fn loopback_counters_count_real_traffic() {
        let (rx0, tx0) = read_interface_counters("lo").expect("lo exists");
        let a = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let b = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let payload = vec![7u8; 60_000];
        for _ in 0..4 {
            a.send_to(&payload, b.local_addr().expect("addr"))
                .expect("send");
        }
        let (rx1, tx1) = read_interface_counters("lo").expect("lo exists");
        assert!(rx1 >= rx0 + 240_000, "rx {rx0} -> {rx1}");
        assert!(tx1 >= tx0 + 240_000, "tx {tx0} -> {tx1}");
    }
}
