//! Lifecycle benchmarks (issue 2): agent creation (AgentInstance::new + registration in the
//! controller), one state transition, registering 10,000 agents, and the runtime-side memory
//! per registered agent (measured with a counting global allocator).
//!
//! Run: `cargo bench -p symbiont-runtime --bench lifecycle`

#![allow(missing_docs)] // criterion's macros generate undocumented items

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use symbiont_runtime::integrations::audit_trail::{AuditError, AuditEvent, AuditTrail};
use symbiont_runtime::lifecycle::{DefaultLifecycleController, LifecycleConfig, NoopDriver};
use symbiont_runtime::*;

/// Counts live heap bytes so the bench can report memory per registered agent.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: delegates every call to the system allocator unchanged; only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn config(max_agents: usize) -> LifecycleConfig {
    LifecycleConfig {
        max_agents,
        state_check_interval: Duration::from_secs(3600),
        ..Default::default()
    }
}

fn agent_config(i: usize) -> AgentConfig {
    AgentConfig {
        name: format!("agent-{i}"),
        dsl_source: "agent a { run [\"/bin/true\"] }".into(),
        capabilities: vec![Capability::Messaging],
        ..Default::default()
    }
}

fn controller(rt: &tokio::runtime::Runtime, max: usize) -> DefaultLifecycleController {
    rt.block_on(DefaultLifecycleController::new(config(max)))
        .expect("controller")
}

/// An audit sink that takes every event and drops it: measures what the lifecycle itself
/// spends building and handing over the audit record.
struct DiscardAudit;

#[async_trait::async_trait]
impl AuditTrail for DiscardAudit {
    async fn record_event(&self, event: AuditEvent) -> Result<(), AuditError> {
        drop(std::hint::black_box(event));
        Ok(())
    }
    fn submit(&self, event: AuditEvent) {
        drop(std::hint::black_box(event));
    }
    async fn flush(&self) -> Result<(), AuditError> {
        Ok(())
    }
}

fn audited_controller(rt: &tokio::runtime::Runtime, max: usize) -> DefaultLifecycleController {
    let audit = Arc::new(DiscardAudit);
    rt.block_on(DefaultLifecycleController::with_driver(
        config(max),
        Arc::new(NoopDriver),
        Some(audit),
    ))
    .expect("controller")
}

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");

    // Agent creation: build the instance and register it. The controller is replaced every
    // 10,000 registrations (outside the timed region) so the table stays at a realistic size.
    c.bench_function("agent_creation (AgentInstance::new + register)", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut done = 0u64;
            while done < iters {
                let n = (iters - done).min(10_000);
                let ctl = controller(&rt, 20_000);
                let configs: Vec<_> = (0..n as usize).map(agent_config).collect();
                let start = std::time::Instant::now();
                for cfg in configs {
                    let agent = AgentInstance::new(cfg);
                    ctl.register_instance(agent).expect("register");
                }
                total += start.elapsed();
                done += n;
            }
            total
        })
    });

    // One state transition (Running <-> Ready), published on the event stream.
    let ctl = controller(&rt, 10);
    let id = ctl.register_agent(agent_config(0)).expect("register");
    for s in [AgentState::Initializing, AgentState::Ready] {
        ctl.transition(id, s, "setup").expect("setup");
    }
    let mut running = false;
    c.bench_function("state_transition", |b| {
        b.iter(|| {
            let to = if running {
                AgentState::Ready
            } else {
                AgentState::Running
            };
            running = !running;
            ctl.transition(id, to, "bench").expect("valid")
        })
    });

    // The same transition with an audit sink attached (submit per transition).
    let ctl = audited_controller(&rt, 10);
    let id = ctl.register_agent(agent_config(0)).expect("register");
    for s in [AgentState::Initializing, AgentState::Ready] {
        ctl.transition(id, s, "setup").expect("setup");
    }
    let mut running = false;
    c.bench_function("state_transition (audited)", |b| {
        b.iter(|| {
            let to = if running {
                AgentState::Ready
            } else {
                AgentState::Running
            };
            running = !running;
            ctl.transition(id, to, "bench").expect("valid")
        })
    });

    // Registering 10,000 agents into a fresh controller.
    let mut group = c.benchmark_group("register_10k");
    group.sample_size(20);
    group.bench_function("register 10,000 agents", |b| {
        b.iter_batched(
            || {
                (
                    controller(&rt, 20_000),
                    (0..10_000).map(agent_config).collect::<Vec<_>>(),
                )
            },
            |(ctl, configs)| {
                for cfg in configs {
                    ctl.register_agent(cfg).expect("register");
                }
                ctl
            },
            BatchSize::LargeInput,
        )
    });
    group.finish();

    // Memory per registered agent: live heap growth of the controller over 10,000 agents
    // (configs are built first, so only what the runtime keeps per agent is counted, plus
    // the config itself, which the runtime owns once registered).
    let ctl = controller(&rt, 20_000);
    let before = LIVE.load(Ordering::SeqCst);
    for i in 0..10_000 {
        ctl.register_agent(agent_config(i)).expect("register");
    }
    let after = LIVE.load(Ordering::SeqCst);
    let per_agent = (after - before) as f64 / 10_000.0;
    println!(
        "memory per registered agent: {:.0} bytes ({:.2} KiB) over 10,000 agents (target <= 64 KiB)",
        per_agent,
        per_agent / 1024.0
    );
    drop(ctl);
}

criterion_group!(lifecycle, benches);
criterion_main!(lifecycle);
