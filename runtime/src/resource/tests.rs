//! Unit tests of admission, accounting and escalation (fake usage sources and actions, a
//! paused Tokio clock). The real kernel paths are tested in `tests/resource.rs`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use proptest::prelude::*;

use super::*;
use crate::integrations::audit_trail::MockAuditTrail;
use crate::sandbox::SandboxStats;

const MIB: u64 = 1024 * 1024;
const GIB: u64 = 1024 * MIB;

fn limits(memory_mb: u64, cpu: f64) -> ResourceLimits {
    ResourceLimits {
        memory_mb,
        cpu_cores: cpu,
        disk_io_mbps: 0,
        network_io_mbps: 0,
        execution_timeout: Duration::from_secs(3600),
        idle_timeout: Duration::from_secs(3600),
    }
}

fn config(memory: u64, cores: u32) -> ResourceManagerConfig {
    ResourceManagerConfig {
        total_memory: memory,
        total_cpu_cores: cores,
        overcommit: OvercommitPolicy {
            memory: 1.0,
            cpu: 1.0,
            disk_io: 1.0,
            network_io: 1.0,
        },
        monitoring_interval: Duration::from_secs(1),
        ..Default::default()
    }
}

async fn manager(cfg: ResourceManagerConfig) -> DefaultResourceManager {
    DefaultResourceManager::builder(cfg)
        .monitoring_loop(false)
        .build()
        .await
        .expect("manager builds")
}

// ---- admission ----------------------------------------------------------------------

#[tokio::test]
async fn allocation_refused_names_the_short_resource_with_numbers() {
    let m = manager(config(8 * GIB, 8)).await;
    m.allocate_resources(AgentId::new(), limits(7892, 1.0))
        .await
        .expect("fits");
    let err = m
        .allocate_resources(AgentId::new(), limits(512, 1.0))
        .await
        .expect_err("memory is short");
    assert_eq!(err.code(), "RESOURCE_001");
    assert_eq!(
        err.to_string(),
        "insufficient resources: memory: requested 512 MiB, available 300 MiB of 8192 MiB"
    );

    let err = m
        .allocate_resources(AgentId::new(), limits(100, 7.5))
        .await
        .expect_err("cpu is short");
    assert!(
        err.to_string()
            .contains("cpu: requested 7.5 cores, available 7 of 8 cores"),
        "{err}"
    );
    assert!(!err.to_string().contains("memory"), "{err}");
}

#[tokio::test]
async fn every_short_resource_is_named_including_bandwidth() {
    let mut cfg = config(GIB, 1);
    cfg.total_disk_io_mbps = 100;
    cfg.total_network_io_mbps = 50;
    let m = manager(cfg).await;
    let mut l = limits(2048, 2.0);
    l.disk_io_mbps = 200;
    l.network_io_mbps = 60;
    let err = m
        .allocate_resources(AgentId::new(), l)
        .await
        .expect_err("everything short");
    let msg = err.to_string();
    for part in [
        "memory: requested 2048 MiB, available 1024 MiB of 1024 MiB",
        "cpu: requested 2 cores, available 1 of 1 cores",
        "disk_io: requested 200 MB/s, available 100 MB/s of 100 MB/s",
        "network_io: requested 60 Mb/s, available 50 Mb/s of 50 Mb/s",
    ] {
        assert!(msg.contains(part), "missing {part:?} in {msg}");
    }
    assert_eq!(m.capacity().agents, 0, "a refused request reserves nothing");
}

#[tokio::test]
async fn unlimited_bandwidth_reserves_nothing_and_zero_totals_mean_no_ceiling() {
    let mut cfg = config(GIB, 4);
    cfg.total_disk_io_mbps = 100;
    let m = manager(cfg).await;
    let mut l = limits(10, 0.1);
    l.disk_io_mbps = 0; // unlimited: best effort
    l.network_io_mbps = 100_000; // no network ceiling configured
    for _ in 0..5 {
        m.allocate_resources(AgentId::new(), l.clone())
            .await
            .expect("fits");
    }
    let snap = m.capacity();
    assert_eq!(snap.used.disk_io_mbps, 0);
    assert_eq!(snap.capacity.network_io_mbps, None);
    assert_eq!(snap.free.disk_io_mbps, Some(100));
}

#[tokio::test]
async fn overcommit_scales_capacity_and_is_reported() {
    let mut cfg = config(GIB, 2);
    cfg.overcommit.cpu = 4.0;
    let m = manager(cfg).await;
    for _ in 0..8 {
        m.allocate_resources(AgentId::new(), limits(16, 1.0))
            .await
            .expect("8 cores of capacity");
    }
    let err = m
        .allocate_resources(AgentId::new(), limits(16, 1.0))
        .await
        .expect_err("capacity reached");
    assert!(
        err.to_string().contains(
            "cpu: requested 1 cores, available 0 of 8 cores (2 host cores × overcommit 4)"
        ),
        "{err}"
    );
    // Default policy: no memory overcommit, some CPU overcommit.
    let d = OvercommitPolicy::default();
    assert_eq!(d.memory, 1.0);
    assert!(d.cpu > 1.0);
}

#[tokio::test]
async fn double_allocation_is_idempotent_or_refused_and_update_is_atomic() {
    let m = manager(config(GIB, 2)).await;
    let id = AgentId::new();
    let a = m
        .allocate_resources(id, limits(512, 1.0))
        .await
        .expect("first");
    let b = m
        .allocate_resources(id, limits(512, 1.0))
        .await
        .expect("same limits: the existing allocation");
    assert_eq!(a, b);
    assert_eq!(m.capacity().used.memory_bytes, 512 * MIB, "counted once");

    let err = m
        .allocate_resources(id, limits(256, 1.0))
        .await
        .expect_err("different limits");
    assert_eq!(err.code(), "RESOURCE_005");

    // Grow within capacity (its own 512 MiB count as given back).
    let grown = m
        .update_allocation(id, limits(1024, 2.0))
        .await
        .expect("fits");
    assert_eq!(grown.limits.memory_mb, 1024);
    assert_eq!(m.capacity().used.memory_bytes, GIB);
    // Too big: nothing changes.
    let err = m
        .update_allocation(id, limits(2048, 1.0))
        .await
        .expect_err("too big");
    assert_eq!(err.code(), "RESOURCE_001");
    assert_eq!(m.allocation(id).expect("kept").limits.memory_mb, 1024);

    let released = m.deallocate_resources(id).await.expect("held");
    assert_eq!(released.limits.memory_mb, 1024);
    assert_eq!(m.capacity().used, ResourceAmounts::default());
    let err = m.deallocate_resources(id).await.expect_err("gone");
    assert_eq!(err.code(), "RESOURCE_006");
}

#[tokio::test]
async fn impossible_limits_are_refused_with_resource_004() {
    let m = manager(config(GIB, 2)).await;
    let err = m
        .allocate_resources(AgentId::new(), limits(0, 1.0))
        .await
        .expect_err("0 MiB");
    assert_eq!(err.code(), "RESOURCE_004");
    assert!(err.to_string().contains("memory_mb"), "{err}");
}

#[tokio::test]
async fn totals_left_at_zero_come_from_the_host_probe() {
    let host = FixedHost {
        cpu_cores: 3,
        memory_bytes: 5 * GIB,
    };
    let m = DefaultResourceManager::builder(ResourceManagerConfig::default())
        .host(Arc::new(host))
        .monitoring_loop(false)
        .build()
        .await
        .expect("builds");
    assert_eq!(m.host_totals().cpu_cores, 3);
    assert_eq!(m.host_totals().memory_bytes, 5 * GIB);
    let mut cfg = ResourceManagerConfig {
        total_cpu_cores: 7,
        ..Default::default()
    };
    cfg.total_memory = GIB;
    let m = DefaultResourceManager::builder(cfg)
        .host(Arc::new(host))
        .monitoring_loop(false)
        .build()
        .await
        .expect("builds");
    assert_eq!(m.host_totals().cpu_cores, 7, "configured totals win");
    assert_eq!(m.host_totals().memory_bytes, GIB);
}

struct BrokenHost;
impl HostProbe for BrokenHost {
    fn cpu_cores(&self) -> std::io::Result<u32> {
        Err(std::io::Error::other("no affinity"))
    }
    fn memory_bytes(&self) -> std::io::Result<u64> {
        Err(std::io::Error::other("no /proc"))
    }
}

#[tokio::test]
async fn undetectable_totals_are_a_config_error_saying_what_to_set() {
    let err = DefaultResourceManager::builder(ResourceManagerConfig::default())
        .host(Arc::new(BrokenHost))
        .build()
        .await
        .expect_err("cannot detect");
    assert_eq!(err.code(), "CONFIG_001");
    assert!(err.to_string().contains("resource.total_memory"), "{err}");
}

#[tokio::test]
async fn invalid_config_is_refused_with_dotted_keys() {
    let mut cfg = config(GIB, 1);
    cfg.overcommit.memory = 0.0;
    cfg.escalation.throttle_factor = 1.5;
    cfg.escalation.overuse = vec![
        EscalationStep::new(EscalationAction::Kill),
        EscalationStep::new(EscalationAction::Warn),
    ];
    let err = DefaultResourceManager::new(cfg).await.expect_err("invalid");
    let msg = err.to_string();
    for key in [
        "resource.overcommit.memory",
        "resource.escalation.throttle_factor",
        "resource.escalation.overuse",
    ] {
        assert!(msg.contains(key), "missing {key} in {msg}");
    }
}

// ---- enforceability -----------------------------------------------------------------

const COUNT_ONLY_NETWORK: EnforcementSupport = EnforcementSupport {
    memory: true,
    cpu: true,
    pids: true,
    disk_io: true,
    network_io: false,
};

#[tokio::test]
async fn a_limit_the_tier_cannot_enforce_is_refused_with_resource_002() {
    let m = manager(config(GIB, 2)).await;
    let mut l = limits(64, 0.5);
    l.network_io_mbps = 10;
    let err = m
        .allocate_for_tier(
            AgentId::new(),
            l.clone(),
            SecurityTier::Tier2,
            COUNT_ONLY_NETWORK,
        )
        .await
        .expect_err("gvisor here cannot shape network");
    assert_eq!(err.code(), "RESOURCE_002");
    let msg = err.to_string();
    assert!(
        msg.contains("gvisor sandbox cannot enforce network_io_mbps = 10 Mb/s"),
        "{msg}"
    );
    assert_eq!(m.capacity().agents, 0, "nothing reserved");

    // 0 = unlimited needs no enforcement.
    l.network_io_mbps = 0;
    let a = m
        .allocate_for_tier(AgentId::new(), l, SecurityTier::Tier2, COUNT_ONLY_NETWORK)
        .await
        .expect("unlimited network is fine");
    assert!(a.enforcement_checked);
    assert_eq!(a.tier, Some(SecurityTier::Tier2));
}

#[tokio::test]
async fn enforcement_off_skips_the_refusal_but_still_accounts() {
    let mut cfg = config(GIB, 2);
    cfg.enforcement_enabled = false;
    let m = manager(cfg).await;
    assert!(!m.enforcement_enabled());
    let mut l = limits(64, 0.5);
    l.network_io_mbps = 10;
    let nothing = EnforcementSupport {
        memory: false,
        cpu: false,
        pids: false,
        disk_io: false,
        network_io: false,
    };
    let a = m
        .allocate_for_tier(AgentId::new(), l, SecurityTier::Tier1, nothing)
        .await
        .expect("admitted with enforcement off");
    assert!(!a.enforcement_checked);
    assert_eq!(m.capacity().used.memory_bytes, 64 * MIB);
    let err = m
        .allocate_for_tier(
            AgentId::new(),
            limits(2048, 0.5),
            SecurityTier::Tier1,
            nothing,
        )
        .await
        .expect_err("capacity still counts");
    assert_eq!(err.code(), "RESOURCE_001");
}

#[test]
fn unenforceable_lists_every_missing_limit() {
    let mut l = limits(64, 0.5);
    l.disk_io_mbps = 5;
    l.network_io_mbps = 0;
    let none = EnforcementSupport {
        memory: false,
        cpu: false,
        pids: false,
        disk_io: false,
        network_io: false,
    };
    assert_eq!(
        unenforceable_limits(&l, &none),
        vec![
            "memory_mb = 64 MiB".to_string(),
            "cpu_cores = 0.5".to_string(),
            "disk_io_mbps = 5 MB/s".to_string(),
        ]
    );
}

// ---- concurrency ----------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_allocations_never_hand_out_the_same_capacity() {
    // Capacity for exactly 100 agents of 1 core; 32 tasks race for 3200 slots.
    let m = manager(config(1024 * GIB, 100)).await;
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let m = m.clone();
        tasks.push(tokio::spawn(async move {
            let mut won = Vec::new();
            for _ in 0..100 {
                let id = AgentId::new();
                match m.allocate_resources(id, limits(1, 1.0)).await {
                    Ok(_) => won.push(id),
                    Err(e) => assert_eq!(e.code(), "RESOURCE_001"),
                }
                tokio::task::yield_now().await;
            }
            won
        }));
    }
    let mut winners = Vec::new();
    for t in tasks {
        winners.extend(t.await.expect("task"));
    }
    assert_eq!(winners.len(), 100, "exactly the capacity was handed out");
    let snap = m.capacity();
    assert_eq!(snap.used.cpu_millicores, 100_000);
    assert_eq!(snap.free.cpu_millicores, 0);

    // Churn: tasks release and re-acquire concurrently; totals are never exceeded.
    let mut tasks = Vec::new();
    for chunk in winners.chunks(10) {
        let m = m.clone();
        let chunk = chunk.to_vec();
        tasks.push(tokio::spawn(async move {
            for round in 0..50 {
                for id in &chunk {
                    // Only this task touches these ids: a held allocation must be there.
                    let held = m.allocation(*id).is_some();
                    assert_eq!(m.deallocate_resources(*id).await.is_ok(), held);
                    let l = limits(1, if round % 2 == 0 { 1.0 } else { 0.5 });
                    // Others may have taken the freed capacity; both outcomes are valid.
                    match m.allocate_resources(*id, l).await {
                        Ok(a) => assert_eq!(a.agent_id, *id),
                        Err(e) => assert_eq!(e.code(), "RESOURCE_001"),
                    }
                    let s = m.capacity();
                    assert!(s.used.cpu_millicores <= s.capacity.cpu_millicores);
                    assert_eq!(
                        s.used.cpu_millicores + s.free.cpu_millicores,
                        s.capacity.cpu_millicores
                    );
                    tokio::task::yield_now().await;
                }
            }
        }));
    }
    let extra = {
        let m = m.clone();
        tokio::spawn(async move {
            let mut n = 0;
            for _ in 0..2000 {
                if m.allocate_resources(AgentId::new(), limits(1, 0.5))
                    .await
                    .is_ok()
                {
                    n += 1;
                }
                tokio::task::yield_now().await;
            }
            n
        })
    };
    for t in tasks {
        t.await.expect("churn task");
    }
    let _ = extra.await.expect("extra task");
    let s = m.capacity();
    let sum: u64 = m
        .allocations()
        .iter()
        .map(|a| a.amounts.cpu_millicores)
        .sum();
    assert_eq!(sum, s.used.cpu_millicores, "used is the sum of allocations");
    assert!(s.used.cpu_millicores <= s.capacity.cpu_millicores);
}

#[derive(Clone, Debug)]
enum Op {
    Alloc(usize, u64, u32, u64),
    Dealloc(usize),
    Resize(usize, u64, u32),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0usize..12, 1u64..3000, 1u32..3000, 0u64..80)
            .prop_map(|(a, m, c, d)| Op::Alloc(a, m, c, d)),
        (0usize..12).prop_map(Op::Dealloc),
        (0usize..12, 1u64..3000, 1u32..3000).prop_map(|(a, m, c)| Op::Resize(a, m, c)),
    ]
}

proptest! {
    #[test]
    fn accounting_never_exceeds_totals_and_free_plus_used_is_total(
        ops in proptest::collection::vec(op(), 1..200),
        mem_gib in 1u64..8,
        cores in 1u32..8,
        cpu_ratio in 1u32..5,
    ) {
        let host = HostTotals {
            memory_bytes: mem_gib * GIB,
            cpu_cores: cores,
            disk_io_mbps: 200,
            network_io_mbps: 0,
        };
        let policy = OvercommitPolicy { memory: 1.0, cpu: f64::from(cpu_ratio), disk_io: 1.0, network_io: 1.0 };
        let mut ledger = Ledger::new(host, policy);
        let ids: Vec<AgentId> = (0..12).map(|_| AgentId::new()).collect();
        // A model: agent -> amounts.
        let mut model: HashMap<AgentId, ResourceAmounts> = HashMap::new();
        for op in ops {
            match op {
                Op::Alloc(a, mem, milli, disk) => {
                    let mut l = limits(mem, f64::from(milli) / 1000.0);
                    l.disk_io_mbps = disk;
                    let amounts = ResourceAmounts::of(&l);
                    let used: ResourceAmounts = sum(&model);
                    let cap = ledger.snapshot().capacity;
                    let fits = used.memory_bytes + amounts.memory_bytes <= cap.memory_bytes
                        && used.cpu_millicores + amounts.cpu_millicores <= cap.cpu_millicores
                        && used.disk_io_mbps + amounts.disk_io_mbps <= 200;
                    match ledger.allocate(ids[a], &l, None, false) {
                        Ok(Allocated::New(_)) => {
                            prop_assert!(!model.contains_key(&ids[a]));
                            prop_assert!(fits, "admitted a request that does not fit");
                            model.insert(ids[a], amounts);
                        }
                        Ok(Allocated::Existing(_)) => prop_assert_eq!(model.get(&ids[a]), Some(&amounts)),
                        Err(ResourceError::Insufficient(_)) => {
                            prop_assert!(!model.contains_key(&ids[a]));
                            prop_assert!(!fits, "refused a request that fits");
                        }
                        Err(ResourceError::AlreadyAllocated { .. }) => prop_assert!(model.contains_key(&ids[a])),
                        Err(e) => prop_assert!(false, "unexpected {e}"),
                    }
                }
                Op::Dealloc(a) => {
                    let released = ledger.release(ids[a]);
                    prop_assert_eq!(released.map(|r| r.amounts), model.remove(&ids[a]));
                }
                Op::Resize(a, mem, milli) => {
                    let l = limits(mem, f64::from(milli) / 1000.0);
                    if ledger.resize(ids[a], &l).is_ok() {
                        model.insert(ids[a], ResourceAmounts::of(&l));
                    }
                }
            }
            let s = ledger.snapshot();
            prop_assert_eq!(s.used, sum(&model));
            prop_assert!(s.used.memory_bytes <= s.capacity.memory_bytes);
            prop_assert!(s.used.cpu_millicores <= s.capacity.cpu_millicores);
            prop_assert_eq!(s.free.memory_bytes + s.used.memory_bytes, s.capacity.memory_bytes);
            prop_assert_eq!(s.free.cpu_millicores + s.used.cpu_millicores, s.capacity.cpu_millicores);
            prop_assert_eq!(s.free.disk_io_mbps.map(|f| f + s.used.disk_io_mbps), s.capacity.disk_io_mbps);
            prop_assert_eq!(s.agents, model.len());
        }
    }
}

fn sum(model: &HashMap<AgentId, ResourceAmounts>) -> ResourceAmounts {
    model
        .values()
        .fold(ResourceAmounts::default(), |mut acc, a| {
            acc.memory_bytes += a.memory_bytes;
            acc.cpu_millicores += a.cpu_millicores;
            acc.disk_io_mbps += a.disk_io_mbps;
            acc.network_io_mbps += a.network_io_mbps;
            acc
        })
}

// ---- monitoring and escalation (paused clock) ----------------------------------------

/// A usage source that integrates rates over the (paused) Tokio clock, like a kernel
/// counter would, and obeys the "kernel" limits the fake actions apply.
struct FakeSource {
    state: Mutex<FakeState>,
    fail: AtomicBool,
    hang: AtomicBool,
}

struct FakeState {
    last: Instant,
    cpu_rate: f64,
    cpu_cap: Option<f64>,
    frozen: bool,
    cpu_ns: f64,
    write_rate: f64,
    written: f64,
    memory: u64,
}

impl FakeSource {
    fn new(cpu_rate: f64) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(FakeState {
                last: Instant::now(),
                cpu_rate,
                cpu_cap: None,
                frozen: false,
                cpu_ns: 0.0,
                write_rate: 0.0,
                written: 0.0,
                memory: 10 * MIB,
            }),
            fail: AtomicBool::new(false),
            hang: AtomicBool::new(false),
        })
    }

    fn advance(&self) {
        let mut s = self.state.lock();
        let now = Instant::now();
        let dt = now.duration_since(s.last).as_secs_f64();
        s.last = now;
        if !s.frozen {
            let rate = s.cpu_cap.map_or(s.cpu_rate, |c| s.cpu_rate.min(c));
            s.cpu_ns += rate * dt * 1e9;
            s.written += s.write_rate * dt;
        }
    }

    fn set_cpu_rate(&self, rate: f64) {
        self.advance();
        self.state.lock().cpu_rate = rate;
    }
}

#[async_trait]
impl UsageSource for FakeSource {
    async fn sample(&self) -> Result<SandboxStats, ResourceError> {
        if self.hang.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        if self.fail.load(Ordering::SeqCst) {
            return Err(ResourceError::Usage("sandbox gone".into()));
        }
        self.advance();
        let s = self.state.lock();
        Ok(SandboxStats {
            memory_bytes: s.memory,
            memory_peak_bytes: s.memory,
            cpu_usage_ns: s.cpu_ns as u64,
            disk_write_bytes: s.written as u64,
            pids: 1,
            ..Default::default()
        })
    }
}

#[derive(Default)]
struct RecordingActions {
    calls: Mutex<Vec<(AgentId, EscalationAction, Option<ResourceLimits>)>>,
    source: Mutex<Option<Arc<FakeSource>>>,
    fail: AtomicBool,
    ignore_limits: AtomicBool,
    calls_made: AtomicU64,
}

impl RecordingActions {
    fn record(
        &self,
        id: AgentId,
        a: EscalationAction,
        l: Option<ResourceLimits>,
    ) -> Result<(), ResourceError> {
        self.calls_made.fetch_add(1, Ordering::SeqCst);
        if self.fail.load(Ordering::SeqCst) {
            return Err(ResourceError::Action {
                agent: id,
                action: a.name(),
                message: "injected failure".into(),
            });
        }
        self.calls.lock().push((id, a, l));
        Ok(())
    }

    fn actions(&self) -> Vec<EscalationAction> {
        self.calls.lock().iter().map(|c| c.1).collect()
    }

    fn source(&self) -> Option<Arc<FakeSource>> {
        self.source.lock().clone()
    }
}

#[async_trait]
impl EnforcementActions for RecordingActions {
    async fn warn(&self, id: AgentId, _reason: &str) -> Result<(), ResourceError> {
        self.record(id, EscalationAction::Warn, None)
    }
    async fn throttle(&self, id: AgentId, l: &ResourceLimits) -> Result<(), ResourceError> {
        self.record(id, EscalationAction::Throttle, Some(l.clone()))?;
        if self.ignore_limits.load(Ordering::SeqCst) {
            return Ok(());
        }
        if let Some(s) = self.source() {
            s.advance();
            s.state.lock().cpu_cap = Some(l.cpu_cores);
        }
        Ok(())
    }
    async fn suspend(&self, id: AgentId, _reason: &str) -> Result<(), ResourceError> {
        self.record(id, EscalationAction::Suspend, None)?;
        if let Some(s) = self.source() {
            s.advance();
            s.state.lock().frozen = true;
        }
        Ok(())
    }
    async fn stop(&self, id: AgentId, _reason: &str) -> Result<(), ResourceError> {
        self.record(id, EscalationAction::Stop, None)
    }
    async fn kill(&self, id: AgentId, _reason: &str) -> Result<(), ResourceError> {
        self.record(id, EscalationAction::Kill, None)
    }
}

struct Rig {
    m: DefaultResourceManager,
    id: AgentId,
    source: Arc<FakeSource>,
    actions: Arc<RecordingActions>,
    audit: Arc<MockAuditTrail>,
}

async fn rig(cfg: ResourceManagerConfig, l: ResourceLimits, cpu_rate: f64) -> Rig {
    let audit = Arc::new(MockAuditTrail::new_sync());
    let actions = Arc::new(RecordingActions::default());
    let m = DefaultResourceManager::builder(cfg)
        .audit(audit.clone())
        .actions(actions.clone())
        .monitoring_loop(false)
        .build()
        .await
        .expect("builds");
    let id = AgentId::new();
    m.allocate_resources(id, l).await.expect("allocated");
    let source = FakeSource::new(cpu_rate);
    *actions.source.lock() = Some(source.clone());
    m.register_usage_source(id, source.clone())
        .expect("registered");
    Rig {
        m,
        id,
        source,
        actions,
        audit,
    }
}

impl Rig {
    /// Advances the clock one interval and runs a round to completion.
    async fn tick(&self) -> Vec<ActionRecord> {
        tokio::time::advance(self.m.config().monitoring_interval).await;
        self.m.run_monitoring_round().await.settle().await
    }
}

fn escalation_cfg() -> ResourceManagerConfig {
    use EscalationAction::*;
    let mut cfg = config(8 * GIB, 8);
    cfg.escalation = EscalationConfig {
        overuse: vec![
            EscalationStep::new(Warn),
            EscalationStep::new(Throttle),
            EscalationStep::with_grace(Suspend, Duration::from_secs(10)),
            EscalationStep::new(Kill),
        ],
        execution_timeout: vec![EscalationStep::new(Kill)],
        idle: vec![EscalationStep::new(Stop)],
        overuse_samples: 3,
        recovery_samples: 2,
        overuse_tolerance: 1.1,
        throttle_factor: 0.5,
        idle_cpu_threshold: 0.01,
        default_grace: Duration::ZERO,
        stop_grace: Duration::from_secs(1),
    };
    cfg
}

#[tokio::test(start_paused = true)]
async fn usage_reports_rates_over_the_last_interval() {
    let r = rig(escalation_cfg(), limits(512, 2.0), 0.75).await;
    r.source.state.lock().write_rate = 3_000_000.0;
    r.tick().await;
    let u = r.m.usage(r.id).expect("monitored");
    assert_eq!(u.samples, 1);
    assert_eq!(u.cpu_cores, 0.0, "no rate from a single sample");
    r.tick().await;
    let u = r.m.usage(r.id).expect("monitored");
    assert!((u.cpu_cores - 0.75).abs() < 1e-6, "{}", u.cpu_cores);
    assert!((u.disk_write_bytes_per_sec - 3e6).abs() < 1.0);
    assert_eq!(u.memory_bytes, 10 * MIB);
    assert!((r.m.load(r.id).expect("load") - 0.375).abs() < 1e-6);
    assert!((r.m.headroom(r.id).expect("headroom") - 0.625).abs() < 1e-6);
    let json = serde_json::to_value(r.m.all_usage()).expect("serializes");
    assert_eq!(json[0]["agent_id"], serde_json::json!(r.id.to_string()));
}

#[tokio::test(start_paused = true)]
async fn sustained_cpu_overuse_walks_warn_throttle_suspend_kill() {
    use EscalationAction::*;
    // Limit 1 core, uses 2: overuse when enforcement is off or the tier only counts.
    let r = rig(escalation_cfg(), limits(512, 1.0), 2.0).await;
    // Sample 1: baseline; samples 2,3: over but not yet K=3 consecutive.
    for _ in 0..3 {
        assert!(r.tick().await.is_empty());
    }
    let steps = r.tick().await;
    assert_eq!(steps.len(), 1);
    assert_eq!(steps[0].action, Warn);
    assert_eq!(steps[0].kind, ViolationKind::CpuOveruse);
    assert!(
        steps[0].reason.contains("cpu overuse: 2.00 cores"),
        "{}",
        steps[0].reason
    );

    // Grace 0: the next sample still over → throttle to 0.5 cores.
    let steps = r.tick().await;
    assert_eq!(steps[0].action, Throttle);
    assert_eq!(steps[0].new_limits.as_ref().map(|l| l.cpu_cores), Some(0.5));
    let u = r.m.usage(r.id).expect("usage");
    assert_eq!(u.effective_limits.cpu_cores, 0.5);
    assert_eq!(u.limits.cpu_cores, 1.0);

    // The throttle worked (rate capped to 0.5): the violation clears after 2 samples.
    for _ in 0..3 {
        assert!(r.tick().await.is_empty());
    }
    assert!(r.m.usage(r.id).expect("usage").violations.is_empty());
    assert!(r
        .audit
        .events_of(&AuditEventType::ResourceViolation)
        .iter()
        .any(|e| e.metadata.get("action").map(String::as_str) == Some("cleared")));

    // It escapes the throttle and further throttles do not hold (a tier that only
    // counts): the ladder starts over and climbs past throttle.
    r.source.state.lock().cpu_cap = None;
    r.actions.ignore_limits.store(true, Ordering::SeqCst);
    let mut taken = Vec::new();
    for _ in 0..10 {
        taken.extend(r.tick().await.into_iter().map(|s| s.action));
        if taken.last() == Some(&Suspend) {
            break;
        }
    }
    assert_eq!(taken, vec![Warn, Throttle, Suspend]);
    let u = r.m.usage(r.id).expect("usage");
    assert!(u.held, "suspend holds the agent");

    // Frozen: no CPU, but held → kill after the suspend step's 10 s grace, not before.
    for _ in 0..9 {
        assert!(r.tick().await.is_empty(), "inside the grace");
    }
    let steps = r.tick().await;
    assert_eq!(steps[0].action, Kill);
    assert!(steps[0].outcome.is_ok());
    assert!(
        r.m.usage(r.id).is_none(),
        "killed agents are no longer monitored"
    );
    assert_eq!(
        r.actions.actions(),
        vec![Warn, Throttle, Warn, Throttle, Suspend, Kill]
    );
    let audited: Vec<String> = r
        .audit
        .events_of(&AuditEventType::ResourceViolation)
        .iter()
        .filter_map(|e| e.metadata.get("action").cloned())
        .collect();
    assert_eq!(
        audited,
        vec!["warn", "throttle", "cleared", "warn", "throttle", "suspend", "kill"]
    );
}

#[tokio::test(start_paused = true)]
async fn clear_violations_releases_a_hold() {
    use EscalationAction::*;
    let mut cfg = escalation_cfg();
    cfg.escalation.overuse = vec![
        EscalationStep::with_grace(Suspend, Duration::from_secs(5)),
        EscalationStep::new(Kill),
    ];
    cfg.escalation.overuse_samples = 1;
    let r = rig(cfg, limits(512, 1.0), 3.0).await;
    r.tick().await; // baseline
    assert_eq!(r.tick().await[0].action, Suspend);
    r.tick().await;
    // An operator resumes the agent and it behaves.
    r.m.clear_violations(r.id);
    {
        let mut s = r.source.state.lock();
        s.frozen = false;
        s.cpu_rate = 0.2;
    }
    for _ in 0..10 {
        assert!(
            r.tick().await.is_empty(),
            "no kill after the hold is released"
        );
    }
    assert!(!r.m.usage(r.id).expect("usage").held);
}

#[tokio::test(start_paused = true)]
async fn idle_agent_is_stopped_after_idle_timeout_and_not_before() {
    let mut l = limits(512, 1.0);
    l.idle_timeout = Duration::from_secs(5);
    let r = rig(escalation_cfg(), l, 0.5).await;
    // Busy for a while: never idle.
    for _ in 0..8 {
        assert!(r.tick().await.is_empty());
    }
    // Goes quiet (below the 0.01 core threshold).
    r.source.set_cpu_rate(0.001);
    let start = Instant::now();
    let mut stopped_at = None;
    for _ in 0..10 {
        let steps = r.tick().await;
        if let Some(s) = steps.first() {
            assert_eq!(s.action, EscalationAction::Stop);
            assert_eq!(s.kind, ViolationKind::Idle);
            stopped_at = Some(Instant::now());
            break;
        }
    }
    let idle = stopped_at.expect("stopped") - start;
    // The last busy interval ends at `start`; quiet for >= 5 s at 1 s resolution.
    assert!(
        idle >= Duration::from_secs(5) && idle <= Duration::from_secs(7),
        "{idle:?}"
    );
    assert!(r.m.usage(r.id).is_none());
}

#[tokio::test(start_paused = true)]
async fn recorded_activity_keeps_an_agent_from_being_idle() {
    let mut l = limits(512, 1.0);
    l.idle_timeout = Duration::from_secs(3);
    let r = rig(escalation_cfg(), l, 0.0).await;
    for _ in 0..10 {
        r.m.record_activity(r.id);
        assert!(r.tick().await.is_empty());
    }
    let mut stopped = false;
    for _ in 0..5 {
        stopped |= !r.tick().await.is_empty();
    }
    assert!(stopped);
}

#[tokio::test(start_paused = true)]
async fn runaway_agent_is_killed_after_execution_timeout() {
    let mut l = limits(512, 4.0);
    l.execution_timeout = Duration::from_secs(4);
    let r = rig(escalation_cfg(), l, 1.0).await;
    for _ in 0..4 {
        assert!(r.tick().await.is_empty(), "within the timeout");
    }
    let steps = r.tick().await;
    assert_eq!(steps.len(), 1);
    assert_eq!(steps[0].action, EscalationAction::Kill);
    assert_eq!(steps[0].kind, ViolationKind::ExecutionTimeout);
    assert!(
        steps[0]
            .reason
            .contains("execution timeout: running for 5s, execution_timeout 4s"),
        "{}",
        steps[0].reason
    );
    assert!(steps[0].reason.contains("RESOURCE_003"));
}

#[tokio::test(start_paused = true)]
async fn restart_execution_clock_gives_a_new_execution_its_full_time() {
    let mut l = limits(512, 4.0);
    l.execution_timeout = Duration::from_secs(4);
    let r = rig(escalation_cfg(), l, 1.0).await;
    for _ in 0..3 {
        r.tick().await;
    }
    r.m.restart_execution_clock(r.id);
    for _ in 0..4 {
        assert!(r.tick().await.is_empty());
    }
    assert_eq!(r.tick().await.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_failed_final_step_is_retried_and_audited_as_failed() {
    let mut l = limits(512, 4.0);
    l.execution_timeout = Duration::from_secs(2);
    let r = rig(escalation_cfg(), l, 1.0).await;
    r.actions.fail.store(true, Ordering::SeqCst);
    let mut failures = 0;
    for _ in 0..6 {
        for s in r.tick().await {
            assert!(s.outcome.is_err());
            failures += 1;
        }
    }
    assert!(
        failures >= 3,
        "retried every sample after grace 0: {failures}"
    );
    assert!(r.m.usage(r.id).is_some(), "still monitored");
    let failed = r
        .audit
        .events_of(&AuditEventType::ResourceViolation)
        .into_iter()
        .filter(|e| {
            e.metadata
                .get("outcome")
                .is_some_and(|o| o.contains("injected failure") && o.contains("RESOURCE_007"))
        })
        .count();
    assert_eq!(failed, failures);
    r.actions.fail.store(false, Ordering::SeqCst);
    let steps = r.tick().await;
    assert!(steps[0].outcome.is_ok());
    assert!(r.m.usage(r.id).is_none());
}

#[tokio::test(start_paused = true)]
async fn without_actions_acting_steps_fail_loudly() {
    let mut l = limits(512, 4.0);
    l.execution_timeout = Duration::from_secs(1);
    let m = manager(escalation_cfg()).await;
    let id = AgentId::new();
    m.allocate_resources(id, l).await.expect("allocated");
    m.register_usage_source(id, FakeSource::new(1.0))
        .expect("registered");
    tokio::time::advance(Duration::from_secs(2)).await;
    let steps = m.run_monitoring_round().await.settle().await;
    let err = steps[0].outcome.as_ref().expect_err("no actions");
    assert!(
        err.contains("no enforcement actions are configured"),
        "{err}"
    );
}

#[tokio::test(start_paused = true)]
async fn sampling_errors_and_hangs_are_counted_not_fatal() {
    let mut cfg = escalation_cfg();
    cfg.sample_timeout = Duration::from_millis(200);
    let r = rig(cfg, limits(512, 1.0), 0.5).await;
    r.source.fail.store(true, Ordering::SeqCst);
    tokio::time::advance(Duration::from_secs(1)).await;
    let round = r.m.run_monitoring_round().await;
    assert_eq!((round.sampled, round.errors), (1, 1));
    let u = r.m.usage(r.id).expect("usage");
    assert_eq!(u.sample_errors, 1);
    assert!(u
        .last_error
        .as_deref()
        .is_some_and(|e| e.contains("sandbox gone") && e.contains("RESOURCE_008")));

    r.source.fail.store(false, Ordering::SeqCst);
    r.source.hang.store(true, Ordering::SeqCst);
    let round = r.m.run_monitoring_round().await;
    assert_eq!(round.errors, 1);
    let u = r.m.usage(r.id).expect("usage");
    assert!(u
        .last_error
        .as_deref()
        .is_some_and(|e| e.contains("timed out after 200ms")));
}

#[tokio::test(start_paused = true)]
async fn the_background_loop_samples_every_interval() {
    let audit = Arc::new(MockAuditTrail::new_sync());
    let actions = Arc::new(RecordingActions::default());
    let mut l = limits(512, 4.0);
    l.execution_timeout = Duration::from_secs(10);
    let m = DefaultResourceManager::builder(escalation_cfg())
        .audit(audit.clone())
        .actions(actions.clone())
        .build()
        .await
        .expect("builds");
    let id = AgentId::new();
    m.allocate_resources(id, l).await.expect("allocated");
    m.register_usage_source(id, FakeSource::new(1.0))
        .expect("registered");
    tokio::time::sleep(Duration::from_millis(5500)).await;
    let samples = m.usage(id).expect("usage").samples;
    assert!((4..=6).contains(&samples), "{samples} samples in 5.5 s");
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert_eq!(actions.actions(), vec![EscalationAction::Kill]);
    assert!(m.usage(id).is_none());
}

#[tokio::test(start_paused = true)]
async fn allocation_and_release_are_audited() {
    let audit = Arc::new(MockAuditTrail::new_sync());
    let m = DefaultResourceManager::builder(config(GIB, 1))
        .audit(audit.clone())
        .monitoring_loop(false)
        .build()
        .await
        .expect("builds");
    let id = AgentId::new();
    m.allocate_resources(id, limits(512, 1.0))
        .await
        .expect("ok");
    let _ = m
        .allocate_resources(AgentId::new(), limits(1024, 1.0))
        .await;
    m.deallocate_resources(id).await.expect("ok");
    assert_eq!(audit.events_of(&AuditEventType::ResourceAllocated).len(), 1);
    assert_eq!(
        audit.events_of(&AuditEventType::ResourceDeallocated).len(),
        1
    );
    let refused = audit.events_of(&AuditEventType::ResourceViolation);
    assert_eq!(refused.len(), 1);
    assert_eq!(
        refused[0].metadata.get("code").map(String::as_str),
        Some("RESOURCE_001")
    );
}

#[tokio::test]
async fn registering_requires_an_allocation_and_deallocation_stops_monitoring() {
    let m = manager(config(GIB, 1)).await;
    let id = AgentId::new();
    let err = m
        .register_usage_source(id, FakeSource::new(0.0))
        .expect_err("not allocated");
    assert_eq!(err.code(), "RESOURCE_006");
    m.allocate_resources(id, limits(16, 0.5)).await.expect("ok");
    m.register_usage_source(id, FakeSource::new(0.0))
        .expect("ok");
    assert!(m.usage(id).is_some());
    m.deallocate_resources(id).await.expect("ok");
    assert!(m.usage(id).is_none());
}

#[tokio::test(start_paused = true)]
async fn following_the_lifecycle_pauses_idle_checks_while_suspended_and_stops_on_termination() {
    use crate::lifecycle::{DefaultLifecycleController, LifecycleConfig};
    let controller = DefaultLifecycleController::new(LifecycleConfig::default())
        .await
        .expect("controller");
    let mut l = limits(64, 1.0);
    l.idle_timeout = Duration::from_secs(3);
    let r = rig(escalation_cfg(), l.clone(), 0.0).await;
    let follower = r.m.follow_lifecycle(&controller);
    controller
        .register_agent(crate::types::AgentConfig {
            id: r.id,
            resource_limits: l,
            ..Default::default()
        })
        .expect("registered");
    controller.initialize_agent(r.id).await.expect("ready");
    controller.start_agent(r.id).await.expect("running");
    controller
        .suspend_agent(r.id, "operator")
        .await
        .expect("suspended");
    tokio::task::yield_now().await;
    for _ in 0..10 {
        assert!(r.tick().await.is_empty(), "a suspended agent is not idle");
    }
    controller.resume_agent(r.id).await.expect("resumed");
    tokio::task::yield_now().await;
    // Idle clock restarted at the resume: stop after 3 more seconds, not at once.
    assert!(r.tick().await.is_empty());
    assert!(r.tick().await.is_empty());
    let mut stopped = Vec::new();
    for _ in 0..3 {
        stopped.extend(r.tick().await);
    }
    assert_eq!(stopped.len(), 1);
    assert_eq!(stopped[0].kind, ViolationKind::Idle);

    // A fresh registration is dropped when the agent terminates.
    r.m.register_usage_source(r.id, r.source.clone())
        .expect("registered again");
    controller.terminate_agent(r.id).await.expect("terminated");
    tokio::task::yield_now().await;
    assert!(r.m.usage(r.id).is_none());
    follower.abort();
}

// ---- configuration ------------------------------------------------------------------

#[test]
fn escalation_ladders_parse_from_toml_as_names_or_tables() {
    let text = r#"
        total_disk_io_mbps = 400
        [overcommit]
        cpu = 2.0
        [escalation]
        overuse = ["warn", { action = "throttle", grace = "30s" }, "Kill"]
        idle = []
        overuse_samples = 2
    "#;
    let cfg: ResourceManagerConfig = toml::from_str(text).expect("parses");
    assert_eq!(cfg.total_disk_io_mbps, 400);
    assert_eq!(cfg.overcommit.cpu, 2.0);
    assert_eq!(cfg.overcommit.memory, 1.0);
    assert_eq!(
        cfg.escalation.overuse,
        vec![
            EscalationStep::new(EscalationAction::Warn),
            EscalationStep::with_grace(EscalationAction::Throttle, Duration::from_secs(30)),
            EscalationStep::new(EscalationAction::Kill),
        ]
    );
    assert!(cfg.escalation.idle.is_empty());
    assert_eq!(
        cfg.escalation.execution_timeout,
        EscalationConfig::default().execution_timeout
    );
    // Round trip.
    let back: ResourceManagerConfig =
        toml::from_str(&toml::to_string(&cfg).expect("serializes")).expect("parses back");
    assert_eq!(back, cfg);

    let err = toml::from_str::<ResourceManagerConfig>("[escalation]\nidle = [\"explode\"]\n")
        .expect_err("unknown action");
    assert!(
        err.to_string()
            .contains("unknown escalation action `explode`"),
        "{err}"
    );
    let err = toml::from_str::<ResourceManagerConfig>(
        "[escalation]\nidle = [{ action = \"stop\", gracee = \"1s\" }]\n",
    )
    .expect_err("unknown key");
    assert!(err.to_string().contains("gracee"), "{err}");
}

#[test]
fn default_config_is_valid() {
    let mut issues = Vec::new();
    ResourceManagerConfig::default().validate(&mut issues);
    assert!(issues.is_empty(), "{issues:?}");
}
