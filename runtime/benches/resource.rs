//! Resource manager benchmarks.
//!
//! 1. `admission/allocate_deallocate`: one `allocate_resources` + `deallocate_resources`
//!    pair (target: median ≤ 2 µs), against the same-run baseline
//!    `admission/baseline_mutex_hashmap` (an uncontended `parking_lot::Mutex<HashMap>`
//!    insert + remove of the same keys and values).
//! 2. `monitor/round_1000_cgroups`: one monitoring round over 1,000 REAL cgroup v1 groups
//!    (memory, cpuacct, blkio, pids under `symbiont/bench-<uuid>/`), read through
//!    `CgroupUsageSource` — the same reader the tiers' counters go through — measured in
//!    process CPU time, against two baselines over the same 5,000 files without the
//!    manager: `monitor/raw_reads_1000_cgroups` (open + read + close each) and
//!    `monitor/raw_pread_1000_cgroups` (one `pread` on descriptors kept open: the floor).
//! 3. After criterion: the real background loop at a 1 s interval over the same 1,000
//!    cgroups for 10 s, reporting process CPU time / wall time as a share of one core
//!    (target ≤ 5%).
//!
//! Run as root: `cargo bench -p symbiont-runtime --bench resource`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::hint::black_box;

use criterion::Criterion;
use parking_lot::Mutex;
use symbiont_runtime::resource::*;
use symbiont_runtime::{AgentId, ResourceLimits};

const ROOT: &str = "/sys/fs/cgroup";
const BENCH_CONTROLLERS: [&str; 4] = ["memory", "cpuacct", "blkio", "pids"];
const AGENTS: usize = 1000;

fn process_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the valid, exclusively borrowed `ts`.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_PROCESS_CPUTIME_ID) failed");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

/// Per-iteration times of criterion's samples, for the medians printed in the summary.
#[derive(Default)]
struct Samples(Mutex<HashMap<&'static str, Vec<f64>>>);

impl Samples {
    fn push(&self, name: &'static str, total: Duration, iters: u64) {
        self.0
            .lock()
            .entry(name)
            .or_default()
            .push(total.as_secs_f64() / iters.max(1) as f64);
    }
    fn median(&self, name: &'static str) -> f64 {
        median(self.0.lock().get(name).cloned().unwrap_or_default())
    }
}

fn limits() -> ResourceLimits {
    ResourceLimits {
        memory_mb: 64,
        cpu_cores: 0.25,
        disk_io_mbps: 10,
        network_io_mbps: 10,
        execution_timeout: Duration::from_secs(86_400),
        idle_timeout: Duration::from_secs(86_400),
    }
}

fn bench_admission(c: &mut Criterion, samples: &Samples) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let manager = rt.block_on(async {
        DefaultResourceManager::builder(ResourceManagerConfig {
            total_memory: 1 << 50,
            total_cpu_cores: 100_000,
            ..Default::default()
        })
        .monitoring_loop(false)
        .build()
        .await
        .expect("manager")
    });
    // A realistic table: 100 other agents hold allocations.
    rt.block_on(async {
        for _ in 0..100 {
            manager
                .allocate_resources(AgentId::new(), limits())
                .await
                .expect("prefill");
        }
    });
    let ids: Vec<AgentId> = (0..1024).map(|_| AgentId::new()).collect();
    let l = limits();

    let mut group = c.benchmark_group("admission");
    group.bench_function("allocate_deallocate", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for i in 0..iters {
                    let id = ids[(i % 1024) as usize];
                    let a = manager
                        .allocate_resources(id, l.clone())
                        .await
                        .expect("fits");
                    black_box(a);
                    let d = manager.deallocate_resources(id).await.expect("held");
                    black_box(d);
                }
                let took = start.elapsed();
                samples.push("allocate_deallocate", took, iters);
                took
            })
        })
    });

    let table: Mutex<HashMap<AgentId, ResourceLimits>> = Mutex::new(HashMap::new());
    for _ in 0..100 {
        table.lock().insert(AgentId::new(), limits());
    }
    group.bench_function("baseline_mutex_hashmap", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for i in 0..iters {
                let id = ids[(i % 1024) as usize];
                black_box(table.lock().insert(id, l.clone()));
                black_box(table.lock().remove(&id));
            }
            let took = start.elapsed();
            samples.push("baseline_mutex_hashmap", took, iters);
            took
        })
    });
    group.finish();
}

/// 1,000 cgroups under `symbiont/bench-<uuid>/`, removed on drop.
struct BenchCgroups {
    parent: PathBuf,
    names: Vec<String>,
}

impl BenchCgroups {
    fn create(n: usize) -> Self {
        for c in BENCH_CONTROLLERS {
            let dir = Path::new(ROOT).join(c);
            assert!(
                dir.join("cgroup.procs").exists(),
                "the monitoring benchmark needs root and the cgroup v1 `{c}` hierarchy at {}",
                dir.display()
            );
        }
        let parent = Path::new("symbiont").join(format!("bench-{}", uuid::Uuid::new_v4()));
        let names: Vec<String> = (0..n).map(|i| format!("a-{i}")).collect();
        let groups = Self { parent, names };
        for c in BENCH_CONTROLLERS {
            for name in &groups.names {
                let dir = Path::new(ROOT).join(c).join(groups.rel(name));
                std::fs::create_dir_all(&dir)
                    .unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
            }
        }
        groups
    }

    fn rel(&self, name: &str) -> PathBuf {
        self.parent.join(name)
    }
}

impl Drop for BenchCgroups {
    fn drop(&mut self) {
        for c in BENCH_CONTROLLERS {
            for name in &self.names {
                let _ = std::fs::remove_dir(Path::new(ROOT).join(c).join(self.rel(name)));
            }
            let _ = std::fs::remove_dir(Path::new(ROOT).join(c).join(&self.parent));
        }
    }
}

async fn monitored_manager(
    groups: &BenchCgroups,
    interval: Duration,
    looping: bool,
) -> DefaultResourceManager {
    let manager = DefaultResourceManager::builder(ResourceManagerConfig {
        total_memory: 1 << 50,
        total_cpu_cores: 100_000,
        monitoring_interval: interval,
        ..Default::default()
    })
    .monitoring_loop(looping)
    .build()
    .await
    .expect("manager");
    for name in &groups.names {
        let id = AgentId::new();
        manager
            .allocate_resources(id, limits())
            .await
            .expect("allocate");
        let source = CgroupUsageSource::new(CgroupStatsReader::v1(ROOT, groups.rel(name)));
        manager
            .register_usage_source(id, Arc::new(source))
            .expect("register");
    }
    manager
}

fn bench_monitor(c: &mut Criterion, samples: &Samples, groups: &BenchCgroups) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let manager = rt.block_on(monitored_manager(groups, Duration::from_secs(1), false));
    // Baseline: the same files, read with plain std::fs calls.
    let files: Vec<PathBuf> = groups
        .names
        .iter()
        .flat_map(|name| {
            let rel = groups.rel(name);
            [
                Path::new(ROOT)
                    .join("memory")
                    .join(&rel)
                    .join("memory.usage_in_bytes"),
                Path::new(ROOT)
                    .join("memory")
                    .join(&rel)
                    .join("memory.max_usage_in_bytes"),
                Path::new(ROOT)
                    .join("cpuacct")
                    .join(&rel)
                    .join("cpuacct.usage"),
                Path::new(ROOT)
                    .join("blkio")
                    .join(&rel)
                    .join("blkio.throttle.io_service_bytes_recursive"),
                Path::new(ROOT).join("pids").join(&rel).join("pids.current"),
            ]
        })
        .collect();

    let mut group = c.benchmark_group("monitor");
    group.sample_size(30);
    group.measurement_time(Duration::from_secs(10));
    group.bench_function("round_1000_cgroups", |b| {
        b.iter_custom(|iters| {
            let cpu0 = process_cpu_time();
            for _ in 0..iters {
                let round = rt.block_on(manager.run_monitoring_round());
                assert_eq!(round.sampled, AGENTS);
                assert_eq!(round.errors, 0, "every cgroup is readable");
                assert!(round.actions.is_empty());
            }
            let took = process_cpu_time() - cpu0;
            samples.push("round_1000_cgroups", took, iters);
            took
        })
    });
    group.bench_function("raw_reads_1000_cgroups", |b| {
        b.iter_custom(|iters| {
            let cpu0 = process_cpu_time();
            for _ in 0..iters {
                for f in &files {
                    black_box(std::fs::read_to_string(f).expect("read"));
                }
            }
            let took = process_cpu_time() - cpu0;
            samples.push("raw_reads_1000_cgroups", took, iters);
            took
        })
    });
    let open: Vec<std::fs::File> = files
        .iter()
        .map(|f| std::fs::File::open(f).expect("open"))
        .collect();
    group.bench_function("raw_pread_1000_cgroups", |b| {
        b.iter_custom(|iters| {
            use std::os::unix::fs::FileExt;
            let mut buf = [0u8; 512];
            let cpu0 = process_cpu_time();
            for _ in 0..iters {
                for f in &open {
                    black_box(f.read_at(&mut buf, 0).expect("pread"));
                }
            }
            let took = process_cpu_time() - cpu0;
            samples.push("raw_pread_1000_cgroups", took, iters);
            took
        })
    });
    group.finish();
    drop(open);
    let u = manager.all_usage();
    assert_eq!(u.len(), AGENTS);
    assert!(u.iter().all(|u| u.samples > 0 && u.last_error.is_none()));
}

/// The real background loop at a 1 s interval: CPU time over wall time.
fn loop_share_of_a_core(groups: &BenchCgroups, seconds: u64) -> (f64, u64) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let manager = monitored_manager(groups, Duration::from_secs(1), true).await;
        // Let the first (immediate) tick pass, then measure whole intervals.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let samples0: u64 = manager.all_usage().iter().map(|u| u.samples).sum();
        let cpu0 = process_cpu_time();
        let wall0 = Instant::now();
        tokio::time::sleep(Duration::from_secs(seconds)).await;
        let cpu = process_cpu_time() - cpu0;
        let wall = wall0.elapsed();
        let samples1: u64 = manager.all_usage().iter().map(|u| u.samples).sum();
        (cpu.as_secs_f64() / wall.as_secs_f64(), samples1 - samples0)
    })
}

fn main() {
    let samples = Samples::default();
    let mut c = Criterion::default().configure_from_args();
    bench_admission(&mut c, &samples);
    let groups = BenchCgroups::create(AGENTS);
    bench_monitor(&mut c, &samples, &groups);
    let (share, sampled) = loop_share_of_a_core(&groups, 10);
    drop(groups);
    c.final_summary();

    let alloc = samples.median("allocate_deallocate");
    let base = samples.median("baseline_mutex_hashmap");
    let round = samples.median("round_1000_cgroups");
    let raw = samples.median("raw_reads_1000_cgroups");
    let pread = samples.median("raw_pread_1000_cgroups");
    println!();
    println!("== resource benchmark summary (medians of criterion's samples) ==");
    println!(
        "allocate+deallocate: {:.3} µs   baseline mutex+HashMap insert/remove: {:.3} µs   ratio {:.1}x   (target <= 2 µs)",
        alloc * 1e6,
        base * 1e6,
        alloc / base
    );
    println!(
        "monitoring round, 1000 real cgroups: {:.2} ms CPU = {:.2}% of one core at a 1 s interval   (target <= 5%)",
        round * 1e3,
        round * 100.0,
    );
    println!(
        "  baselines, same 5000 files: open+read+close {:.2} ms (round is {:.2}x of it); pread on kept descriptors {:.2} ms (round is {:.2}x of it)",
        raw * 1e3,
        round / raw,
        pread * 1e3,
        round / pread
    );
    println!(
        "background loop, 1000 real cgroups, 1 s interval, 10 s: {:.2}% of one core ({} samples taken)",
        share * 100.0,
        sampled
    );
}
