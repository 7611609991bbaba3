//! Agent definition parsing and policy evaluation.
//!
//! - `dsl_parse/<example>`: `dsl::load` of each definition in `examples/agents/` (parse,
//!   checks, host files read), and `dsl_compile/<example>`: the whole `dsl::compile` (plus the
//!   `AgentConfig` merge, the policy set and the `SandboxSpec`).
//! - `policy_eval_100/<case>/indexed`: one `PolicySet::evaluate` on a 100-rule policy, per
//!   decision kind; `.../linear` is the same-run baseline: a scan of all 100 rules in order,
//!   deny first, as an unindexed engine would do. Target: indexed median <= 1 us.
//!
//! Run: `cargo bench -p symbiont-runtime --bench dsl_policy`; medians are in
//! `target/criterion/<group>/<case>/new/estimates.json`.

use std::collections::HashMap;
use std::hint::black_box;
use std::path::{Path, PathBuf};

use criterion::{criterion_group, criterion_main, Criterion};
use symbiont_runtime::dsl::{self, LoadOptions};
use symbiont_runtime::policy::{
    Action, AgentRef, Decision, Effect, MessageMeta, PolicySet, ResourceKind,
};
use symbiont_runtime::{AgentConfig, Priority};

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/agents")
}

fn parse_examples(c: &mut Criterion) {
    let options = LoadOptions {
        base_dir: Some(examples()),
        ..Default::default()
    };
    let mut group = c.benchmark_group("dsl_parse");
    for name in ["collector", "summarizer", "reporter"] {
        let source =
            std::fs::read_to_string(examples().join(format!("{name}.agent"))).expect("example");
        group.bench_function(name, |b| {
            b.iter(|| dsl::load(black_box(&source), "bench.agent", &options).expect("valid"))
        });
    }
    group.finish();

    let mut group = c.benchmark_group("dsl_compile");
    for name in ["collector", "summarizer", "reporter"] {
        let config = AgentConfig {
            name: name.into(),
            dsl_source: std::fs::read_to_string(examples().join(format!("{name}.agent")))
                .expect("example"),
            policies: vec!["deny memory > 4096".into()],
            ..Default::default()
        };
        group.bench_function(name, |b| {
            b.iter(|| dsl::compile(black_box(&config), &options).expect("valid"))
        });
    }
    group.finish();
}

/// 100 rules of every kind: exact and wildcard topics, agents, conditions, paths, handlers,
/// resources.
fn hundred_rules() -> Vec<String> {
    (0..100)
        .map(|i| match i % 10 {
            0 => format!("allow send to topic \"topic-{i}\""),
            1 => {
                format!("allow send to topic \"topic-{i}\" when priority >= High and size <= 4KiB")
            }
            2 => format!(
                "deny send to topic \"topic-{}\" when meta \"tenant\" == \"evil\"",
                i - 2
            ),
            3 => format!("allow receive from agent \"agent-{i}\""),
            4 => format!("allow receive from topic \"feed-{i}.*\""),
            5 => format!("allow send to topic \"metrics.{i}.*\""),
            6 => format!("allow write \"/var/lib/app-{i}\""),
            7 => format!("deny exec \"handler-{i}\""),
            8 => format!("deny memory > {}", 1024 + i),
            _ => format!("deny receive from agent \"banned-{i}\""),
        })
        .collect()
}

/// The baseline: every rule in order, deny first, no index.
fn linear(set: &PolicySet, action: &Action<'_>) -> (bool, Option<usize>) {
    let rules = set.rules();
    if let Some(i) = rules
        .iter()
        .position(|r| r.effect == Effect::Deny && r.matches(action))
    {
        return (false, Some(i));
    }
    match rules
        .iter()
        .position(|r| r.effect == Effect::Allow && r.matches(action))
    {
        Some(i) => (true, Some(i)),
        None => (false, None),
    }
}

fn policy_eval(c: &mut Criterion) {
    let set = PolicySet::from_sources(&hundred_rules()).expect("compiles");
    assert_eq!(set.len(), 100);
    let mut tenant = HashMap::new();
    tenant.insert("tenant".to_string(), "evil".to_string());
    let none = AgentRef::NONE;
    let meta = MessageMeta::new;
    let cases: Vec<(&str, Action<'_>)> = vec![
        (
            "send_exact_allow",
            Action::Send {
                to: none,
                meta: meta("topic-50"),
            },
        ),
        (
            "send_conditional_allow",
            Action::Send {
                to: none,
                meta: meta("topic-41").priority(Priority::High).size(100),
            },
        ),
        (
            "send_meta_deny",
            Action::Send {
                to: none,
                meta: meta("topic-60").metadata(&tenant),
            },
        ),
        (
            "send_prefix_allow",
            Action::Send {
                to: none,
                meta: meta("metrics.95.cpu"),
            },
        ),
        (
            "send_default_deny",
            Action::Send {
                to: none,
                meta: meta("unknown-topic"),
            },
        ),
        (
            "receive_agent_allow",
            Action::Receive {
                from: AgentRef::named("agent-73"),
                meta: meta("x"),
            },
        ),
        (
            "receive_topic_prefix",
            Action::Receive {
                from: AgentRef::named("someone"),
                meta: meta("feed-84.news"),
            },
        ),
        ("network_default_deny", Action::Network),
        (
            "write_allow",
            Action::Write {
                path: Path::new("/var/lib/app-96/data.db"),
            },
        ),
        (
            "exec_deny",
            Action::Exec {
                handler: "handler-97",
            },
        ),
        (
            "memory_request",
            Action::Resource {
                kind: ResourceKind::Memory,
                amount: 2048.0,
            },
        ),
    ];
    let mut group = c.benchmark_group("policy_eval_100");
    for (name, action) in &cases {
        // Same answer both ways (guards the baseline as much as the index).
        let d: Decision = set.evaluate(action);
        assert_eq!(
            (d.allowed, d.rule.map(|r| r.0 as usize)),
            linear(&set, action),
            "{name}"
        );
        group.bench_function(format!("{name}/indexed"), |b| {
            b.iter(|| set.evaluate(black_box(action)))
        });
        group.bench_function(format!("{name}/linear"), |b| {
            b.iter(|| linear(&set, black_box(action)))
        });
    }
    group.finish();
}

/// The generated `benches()` group function (criterion's macro cannot carry a doc comment).
#[allow(missing_docs)]
mod group {
    use super::*;
    criterion_group!(benches, parse_examples, policy_eval);
}

criterion_main!(group::benches);
