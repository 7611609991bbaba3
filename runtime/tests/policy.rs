//! The policy engine: deny overrides allow, default deny, conditions on message metadata,
//! audit selection, merging of `AgentConfig::policies`, enforcement hooks and the audit
//! records they produce.

use std::collections::HashMap;
use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;

use symbiont_runtime::dsl::{self, LoadOptions};
use symbiont_runtime::integrations::audit_trail::{AuditEventType, MockAuditTrail};
use symbiont_runtime::policy::{
    Action, ActionKind, ActionPattern, AgentPolicies, AgentRef, AuditMode, Condition, Effect,
    MessageMeta, Origin, PolicyEnforcer, PolicyError, PolicySet, PolicyStatement, ResourceKind,
    RuleSpec, TextPattern,
};
use symbiont_runtime::{AgentConfig, AgentId, Capability, Priority, ResourceLimits};

fn set(statements: &[&str]) -> PolicySet {
    PolicySet::from_sources(statements).unwrap_or_else(|e| panic!("{e}"))
}

fn send(topic: &str) -> MessageMeta<'_> {
    MessageMeta::new(topic)
}

#[test]
fn deny_overrides_allow_whatever_the_order() {
    for statements in [
        vec!["allow send to topic \"x\"", "deny send to topic \"x\""],
        vec!["deny send to topic \"x\"", "allow send to topic \"x\""],
        vec!["allow send to any", "deny send to topic \"x\""],
        vec!["deny send to topic \"x*\"", "allow send to topic \"x\""],
    ] {
        let p = set(&statements);
        let err = p
            .check_send(AgentRef::NONE, send("x"))
            .expect_err("deny wins");
        assert_eq!(err.code(), "SEC_001");
        let rule = p
            .rule(
                p.evaluate(&Action::Send {
                    to: AgentRef::NONE,
                    meta: send("x"),
                })
                .rule
                .expect("a rule"),
            )
            .expect("exists");
        assert_eq!(rule.effect, Effect::Deny, "{statements:?}");
    }
}

#[test]
fn actions_needing_a_grant_are_denied_by_default() {
    let p = PolicySet::empty();
    assert!(p.check_send(AgentRef::NONE, send("t")).is_err());
    assert!(p.check_receive(AgentRef::named("a"), send("t")).is_err());
    assert!(p.check_network().is_err());
    assert!(p.check_write(Path::new("/data")).is_err());
    assert!(p.check_exec("start").is_err());
    let d = p.evaluate(&Action::Network);
    assert_eq!(d.rule, None);
    assert!(!d.allowed);
    assert!(d.audit, "denials are audited by default");
    match p.check_network().expect_err("denied") {
        PolicyError::Denied { rule, .. } => assert!(rule.contains("denied by default")),
        other => panic!("{other:?}"),
    }
    // Resource requests are allowed unless denied...
    assert!(p.check_resources(&ResourceLimits::default()).is_ok());
    // ...or unless allow rules exist for the resource, which then must grant it.
    let p = set(&["allow memory <= 256"]);
    let mut limits = ResourceLimits {
        memory_mb: 256,
        ..Default::default()
    };
    assert!(p.check_resources(&limits).is_ok());
    limits.memory_mb = 512;
    let err = p.check_resources(&limits).expect_err("not granted");
    assert!(err.to_string().contains("memory = 512 MiB"), "{err}");
}

#[test]
fn resource_rules_compare_requests() {
    let p = set(&[
        "deny memory > 1024",
        "deny cpu >= 4",
        "deny timeout > 2h",
        "deny network_io > 100",
    ]);
    let ok = ResourceLimits {
        memory_mb: 1024,
        cpu_cores: 2.0,
        ..Default::default()
    };
    assert!(p.check_resources(&ok).is_ok());
    let err = p
        .check_resources(&ResourceLimits {
            memory_mb: 2048,
            ..Default::default()
        })
        .expect_err("too much memory");
    assert_eq!(err.code(), "SEC_001");
    assert!(err.to_string().contains("deny memory > 1024"), "{err}");
    assert!(p
        .check_resources(&ResourceLimits {
            cpu_cores: 4.0,
            ..Default::default()
        })
        .is_err());
    // 0 bandwidth means unlimited, which exceeds any bound.
    assert!(p
        .check_resources(&ResourceLimits {
            network_io_mbps: 0,
            ..Default::default()
        })
        .is_err());
    assert!(p
        .check_resources(&ResourceLimits {
            execution_timeout: std::time::Duration::from_secs(3 * 3600),
            ..Default::default()
        })
        .is_err());
}

#[test]
fn conditions_look_at_message_metadata() {
    let p = set(&[
        "allow send to topic \"alerts\" when priority >= High",
        "allow send to topic \"bulk\" when size <= 4KiB",
        "allow send to topic \"tenant\" when meta \"tenant\" == \"acme\"",
        "deny send to topic \"tenant\" when meta \"classification\" != \"public\"",
        "allow receive from any when priority == Critical and size < 100",
    ]);
    assert!(p
        .check_send(AgentRef::NONE, send("alerts").priority(Priority::High))
        .is_ok());
    assert!(p
        .check_send(AgentRef::NONE, send("alerts").priority(Priority::Critical))
        .is_ok());
    assert!(p
        .check_send(AgentRef::NONE, send("alerts").priority(Priority::Normal))
        .is_err());

    assert!(p
        .check_send(AgentRef::NONE, send("bulk").size(4096))
        .is_ok());
    assert!(p
        .check_send(AgentRef::NONE, send("bulk").size(4097))
        .is_err());

    let mut meta = HashMap::new();
    meta.insert("tenant".to_string(), "acme".to_string());
    // A missing key differs from any value: the deny applies.
    assert!(p
        .check_send(AgentRef::NONE, send("tenant").metadata(&meta))
        .is_err());
    meta.insert("classification".to_string(), "public".to_string());
    assert!(p
        .check_send(AgentRef::NONE, send("tenant").metadata(&meta))
        .is_ok());
    meta.insert("tenant".to_string(), "other".to_string());
    assert!(p
        .check_send(AgentRef::NONE, send("tenant").metadata(&meta))
        .is_err());

    let critical = send("x").priority(Priority::Critical);
    assert!(p
        .check_receive(AgentRef::named("anyone"), critical.size(99))
        .is_ok());
    assert!(p
        .check_receive(AgentRef::named("anyone"), critical.size(100))
        .is_err());
}

#[test]
fn targets_match_agents_by_name_pattern_or_id_and_topics_by_pattern() {
    let id = AgentId::new();
    let p = set(&[
        "allow receive from agent \"collector\"",
        "allow receive from agent \"worker-*\"",
        &format!("allow receive from agent \"{id}\""),
        "allow send to topic \"reports.*\"",
        "allow send to agent \"reporter\"",
    ]);
    assert!(p
        .check_receive(AgentRef::named("collector"), send("t"))
        .is_ok());
    assert!(p
        .check_receive(AgentRef::named("worker-7"), send("t"))
        .is_ok());
    assert!(p
        .check_receive(AgentRef::named("intruder"), send("t"))
        .is_err());
    assert!(p
        .check_receive(
            AgentRef {
                name: None,
                id: Some(id)
            },
            send("t")
        )
        .is_ok());
    assert!(p
        .check_receive(
            AgentRef {
                name: None,
                id: Some(AgentId::new())
            },
            send("t")
        )
        .is_err());
    assert!(p.check_send(AgentRef::NONE, send("reports.daily")).is_ok());
    assert!(p.check_send(AgentRef::NONE, send("report")).is_err());
    assert!(p
        .check_send(AgentRef::new("reporter", AgentId::new()), send("anything"))
        .is_ok());
    // A topic publish has no recipient agent: agent rules do not match it.
    assert!(p.check_send(AgentRef::NONE, send("anything")).is_err());
}

#[test]
fn decisions_name_the_rule_and_where_it_was_written() {
    let source = "agent a {\n  run [\"/bin/true\"]\n  policy {\n    allow network\n    deny network\n  }\n}\n";
    let def = dsl::parse(source, "a.agent").unwrap_or_else(|d| panic!("{}", d.render()));
    let p = PolicySet::compile(def.policy).expect("compiles");
    let d = p.evaluate(&Action::Network);
    let rule = p.rule(d.rule.expect("rule")).expect("exists");
    assert_eq!(rule.text, "deny network");
    assert_eq!(rule.origin.to_string(), "a.agent:5:5");
    match p.check_network().expect_err("denied") {
        PolicyError::Denied { action, rule, .. } => {
            assert_eq!(action, "network access");
            assert_eq!(rule, "rule `deny network` at a.agent:5:5");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn audit_statements_select_what_is_recorded() {
    let p = PolicySet::empty();
    for kind in ActionKind::ALL {
        assert_eq!(p.audit_mode(kind), AuditMode::Denials);
    }
    let p = set(&[
        "allow network",
        "allow send to any",
        "audit all",
        "audit none for network",
        "audit denials for send, resources",
    ]);
    assert_eq!(p.audit_mode(ActionKind::Exec), AuditMode::All);
    assert_eq!(p.audit_mode(ActionKind::Network), AuditMode::None);
    assert_eq!(p.audit_mode(ActionKind::Send), AuditMode::Denials);
    assert_eq!(p.audit_mode(ActionKind::Resource), AuditMode::Denials);
    assert!(
        !p.evaluate(&Action::Network).audit,
        "audit none for network"
    );
    assert!(
        p.evaluate(&Action::Exec { handler: "x" }).audit,
        "audit all: denials too"
    );
    let allowed_send = p.evaluate(&Action::Send {
        to: AgentRef::NONE,
        meta: send("t"),
    });
    assert!(
        allowed_send.allowed && !allowed_send.audit,
        "denials only for send"
    );
    // Later statements win: the operator's config comes after the definition.
    let p = set(&["audit none", "audit all"]);
    assert!(p.evaluate(&Action::Network).audit);
}

#[test]
fn writable_paths_follow_write_rules() {
    let p = set(&[
        "allow write \"/var/lib/app\"",
        "allow write \"/var/lib/app/cache\"",
        "deny write \"/var/lib/app/keys\"",
        "allow write \"/srv/out\"",
        "deny write \"/srv\"",
    ]);
    assert_eq!(p.writable_paths(), [Path::new("/var/lib/app")]);
    assert_eq!(p.read_only_paths(), [Path::new("/var/lib/app/keys")]);
    assert!(p.check_write(Path::new("/var/lib/app/data/x.db")).is_ok());
    assert!(p.check_write(Path::new("/var/lib/app/keys/k")).is_err());
    assert!(
        p.check_write(Path::new("/var/lib/apple")).is_err(),
        "prefix is by component"
    );
    assert!(
        p.check_write(Path::new("/srv/out/file")).is_err(),
        "denied parent wins"
    );
    assert!(p
        .check_write(Path::new("/var/lib/app/../../../etc"))
        .is_err());
    assert!(p.check_write(Path::new("relative")).is_err());
}

#[test]
fn rules_that_cannot_be_enforced_are_refused() {
    let mut rule = RuleSpec::new(Effect::Deny, ActionPattern::Network, Origin::implicit());
    rule.conditions
        .push(Condition::Size(symbiont_runtime::policy::CmpOp::Gt, 1));
    let err = PolicySet::compile([PolicyStatement::Rule(rule)]).expect_err("invalid");
    assert_eq!(err.code(), "SEC_002");
    let rel = RuleSpec::new(
        Effect::Allow,
        ActionPattern::Write("data".into()),
        Origin::implicit(),
    );
    assert!(PolicySet::compile([PolicyStatement::Rule(rel)]).is_err());
    let err = PolicySet::from_sources(&["allow teleport"]).expect_err("syntax");
    assert_eq!(err.code(), "SEC_002");
    assert!(err.to_string().contains("policies[0]:1:7"), "{err}");
}

#[test]
fn exec_is_granted_for_declared_handlers_only() {
    let config = AgentConfig {
        name: "worker".into(),
        dsl_source: r#"agent worker {
            run ["/bin/true"]
            on start
            on message "jobs" as job
            on schedule "*/5 * * * *" as tick
            policy { allow receive from any  deny exec "tick" }
        }"#
        .into(),
        ..Default::default()
    };
    let compiled = dsl::compile(&config, &LoadOptions::default()).unwrap_or_else(|e| panic!("{e}"));
    let p = &compiled.policy;
    assert!(p.check_exec("start").is_ok());
    assert!(p.check_exec("job").is_ok());
    assert!(
        p.check_exec("tick").is_err(),
        "deny overrides the implicit grant"
    );
    assert!(p.check_exec("undeclared").is_err());
}

#[test]
fn agent_config_policies_merge_with_the_definition() {
    let source = r#"agent fetcher {
        run ["/bin/true"]
        capabilities [network]
        on message "urls" reply "pages"
        policy {
            allow receive from topic "urls"
            allow send to topic "pages"
            audit denials
        }
    }"#;
    // Without config policies: network granted by the capability, messaging as written.
    let base = AgentConfig {
        name: "fetcher".into(),
        dsl_source: source.into(),
        ..Default::default()
    };
    let compiled = dsl::compile(&base, &LoadOptions::default()).unwrap_or_else(|e| panic!("{e}"));
    assert!(compiled.policy.check_network().is_ok());
    assert!(compiled.spec.has_capability(&Capability::Network));
    assert!(compiled
        .policy
        .check_send(AgentRef::NONE, send("other"))
        .is_err());

    // The operator denies network, adds a grant and audits everything.
    let config = AgentConfig {
        policies: vec![
            "deny network".into(),
            "allow send to topic \"other\" when priority >= High".into(),
            "audit all".into(),
        ],
        ..base.clone()
    };
    let compiled = dsl::compile(&config, &LoadOptions::default()).unwrap_or_else(|e| panic!("{e}"));
    let p = &compiled.policy;
    let err = p.check_network().expect_err("operator denies");
    assert!(err.to_string().contains("policies[0]:1:1"), "{err}");
    assert!(
        !compiled.spec.has_capability(&Capability::Network),
        "sandbox gets no network"
    );
    assert!(compiled.notes.iter().any(|n| n.contains("network")));
    assert!(p
        .check_send(AgentRef::NONE, send("other").priority(Priority::High))
        .is_ok());
    assert!(p.check_send(AgentRef::NONE, send("pages")).is_ok());
    assert!(
        p.evaluate(&Action::Send {
            to: AgentRef::NONE,
            meta: send("pages")
        })
        .audit
    );

    // A config statement that does not parse fails the agent with DSL_001 naming it.
    let bad = AgentConfig {
        policies: vec!["deny netwrk".into()],
        ..base
    };
    let err = dsl::compile(&bad, &LoadOptions::default()).expect_err("bad statement");
    assert_eq!(err.code(), "DSL_001");
    assert!(err.to_string().contains("policies[0]:1:6"), "{err}");
    assert!(err.to_string().contains("did you mean `network`?"), "{err}");
}

#[tokio::test]
async fn enforcer_records_what_the_audit_selection_asks_for() {
    let audit = Arc::new(MockAuditTrail::new_sync());
    let agent = AgentId::new();
    let policy = Arc::new(set(&["allow send to topic \"ok\"", "deny network"]));
    let enforcer = PolicyEnforcer::new(agent, policy, Some(audit.clone()));

    assert!(enforcer.check_send(AgentRef::NONE, send("ok")).is_ok());
    assert!(
        audit.events().is_empty(),
        "allowed decisions are not recorded by default"
    );

    let err = enforcer
        .check_send(AgentRef::named("x"), send("secret"))
        .expect_err("denied");
    assert_eq!(err.code(), "SEC_001");
    assert!(enforcer.check_network().is_err());
    let events = audit.events_of(&AuditEventType::PolicyDecision);
    assert_eq!(events.len(), 2);
    assert_eq!(events[0].agent_id, Some(agent));
    assert_eq!(events[0].metadata["allowed"], "false");
    assert_eq!(events[0].metadata["action_kind"], "send");
    assert!(events[0].metadata["rule"].contains("denied by default"));
    assert_eq!(
        events[1].metadata["rule"],
        "rule `deny network` at policies[1]:1:1"
    );
    assert_eq!(events[1].metadata["rule_origin"], "policies[1]:1:1");

    // `audit none` records nothing, `audit all` records allowed decisions too.
    let quiet = PolicyEnforcer::new(agent, Arc::new(set(&["audit none"])), Some(audit.clone()));
    assert!(quiet.check_network().is_err());
    assert_eq!(audit.events().len(), 2);
    let loud = PolicyEnforcer::new(
        agent,
        Arc::new(set(&["allow write \"/data\"", "audit all"])),
        Some(audit.clone()),
    );
    assert!(loud.check_write(Path::new("/data/x")).is_ok());
    assert!(loud.check_resources(&ResourceLimits::default()).is_ok());
    assert_eq!(audit.events().len(), 2 + 1 + ResourceKind::ALL.len());
}

#[tokio::test]
async fn agent_policies_check_both_ends_of_a_delivery() {
    let audit = Arc::new(MockAuditTrail::new_sync());
    let registry = AgentPolicies::new(Some(audit.clone()));
    let (collector, summarizer, stranger) = (AgentId::new(), AgentId::new(), AgentId::new());
    registry.register(
        collector,
        "collector",
        Arc::new(set(&["allow send to topic \"documents\""])),
    );
    registry.register(
        summarizer,
        "summarizer",
        Arc::new(set(&["allow receive from agent \"collector\""])),
    );
    registry.register(stranger, "stranger", Arc::new(set(&["allow send to any"])));

    assert!(registry
        .check_delivery(collector, summarizer, send("documents"))
        .is_ok());
    // The sender may not send on this topic.
    assert!(registry
        .check_delivery(collector, summarizer, send("other"))
        .is_err());
    // The recipient does not accept the stranger.
    let err = registry
        .check_delivery(stranger, summarizer, send("documents"))
        .expect_err("refused");
    assert!(
        err.to_string().contains("receive from agent `stranger`"),
        "{err}"
    );
    // Topic publish: only the sender's send rules.
    assert!(registry
        .check_send(collector, None, send("documents"))
        .is_ok());
    // Unknown agents are refused.
    assert!(registry
        .check_send(AgentId::new(), None, send("documents"))
        .is_err());
    registry.unregister(collector);
    assert!(registry
        .check_send(collector, None, send("documents"))
        .is_err());
    let denials = audit.events_of(&AuditEventType::PolicyDecision);
    assert_eq!(denials.len(), 2, "two policy denials recorded");
}

#[test]
fn patterns_compile_to_exact_prefix_or_glob() {
    assert_eq!(TextPattern::new("a"), TextPattern::Exact("a".into()));
    assert_eq!(TextPattern::new("a.*"), TextPattern::Prefix("a.".into()));
    assert_eq!(TextPattern::new("*"), TextPattern::Any);
    assert_eq!(TextPattern::new("*.log"), TextPattern::Glob("*.log".into()));
}

#[test]
fn hundred_rule_policy_decides_like_a_linear_scan() {
    // The index must give the same answer as trying every rule in order.
    let mut statements = Vec::new();
    for i in 0..100 {
        statements.push(match i % 5 {
            0 => format!("allow send to topic \"t{i}\""),
            1 => format!("deny send to topic \"t{}\" when size > {i}", i - 1),
            2 => format!("allow receive from agent \"a{i}\""),
            3 => format!("allow send to topic \"p{i}.*\" when priority >= High"),
            _ => format!("deny memory > {}", 10_000 + i),
        });
    }
    let p = PolicySet::from_sources(&statements).expect("compiles");
    let topics: Vec<String> = (0..110)
        .map(|i| format!("t{i}"))
        .chain((0..110).map(|i| format!("p{i}.x")))
        .collect();
    for topic in &topics {
        for size in [0usize, 50, 200] {
            for prio in [Priority::Low, Priority::High] {
                let action = Action::Send {
                    to: AgentRef::NONE,
                    meta: send(topic).size(size).priority(prio),
                };
                let indexed = p.evaluate(&action);
                let deny = p
                    .rules()
                    .iter()
                    .position(|r| r.effect == Effect::Deny && r.matches(&action));
                let allow = p
                    .rules()
                    .iter()
                    .position(|r| r.effect == Effect::Allow && r.matches(&action));
                let linear = match (deny, allow) {
                    (Some(d), _) => (false, Some(d)),
                    (None, Some(a)) => (true, Some(a)),
                    (None, None) => (false, None),
                };
                assert_eq!(
                    (indexed.allowed, indexed.rule.map(|r| r.0 as usize)),
                    linear,
                    "{topic} size {size} {prio:?}"
                );
            }
        }
    }
}

// ---------------------------------------------------------------- no allocation per decision

mod counting {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    thread_local! {
        static ACTIVE: Cell<bool> = const { Cell::new(false) };
        static COUNT: Cell<usize> = const { Cell::new(0) };
    }

    /// Counts the allocations made on the current thread while [`count`] runs.
    pub struct Counting;

    // SAFETY: every call is forwarded unchanged to the system allocator; the thread-locals
    // are const-initialized `Cell`s, so touching them never allocates or recurses.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            if ACTIVE.try_with(Cell::get).unwrap_or(false) {
                let _ = COUNT.try_with(|c| c.set(c.get() + 1));
            }
            // SAFETY: same contract as our caller's.
            unsafe { System.alloc(layout) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            // SAFETY: `ptr` came from `System.alloc` with this layout.
            unsafe { System.dealloc(ptr, layout) }
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            if ACTIVE.try_with(Cell::get).unwrap_or(false) {
                let _ = COUNT.try_with(|c| c.set(c.get() + 1));
            }
            // SAFETY: `ptr` came from `System.alloc` with this layout.
            unsafe { System.realloc(ptr, layout, new_size) }
        }
    }

    /// Runs `f` and returns how many allocations it made on this thread.
    pub fn count(f: impl FnOnce()) -> usize {
        COUNT.with(|c| c.set(0));
        ACTIVE.with(|a| a.set(true));
        f();
        ACTIVE.with(|a| a.set(false));
        COUNT.with(Cell::get)
    }
}

#[global_allocator]
static ALLOCATOR: counting::Counting = counting::Counting;

#[test]
fn evaluation_does_not_allocate() {
    let statements: Vec<String> = (0..100)
        .map(|i| match i % 5 {
            0 => format!("allow send to topic \"t{i}\" when priority >= High and size <= 4KiB"),
            1 => format!("deny send to topic \"t{}\" when meta \"k\" == \"v\"", i - 1),
            2 => format!("allow receive from agent \"a{i}*\""),
            3 => format!("allow write \"/data/{i}\""),
            _ => format!("deny memory > {}", 1000 + i),
        })
        .collect();
    let p = PolicySet::from_sources(&statements).expect("compiles");
    let mut meta = HashMap::new();
    meta.insert("k".to_string(), "v".to_string());
    let id = AgentId::new();
    let actions = [
        Action::Send {
            to: AgentRef::NONE,
            meta: send("t50").priority(Priority::High).metadata(&meta),
        },
        Action::Send {
            to: AgentRef::new("x", id),
            meta: send("nothing"),
        },
        Action::Receive {
            from: AgentRef::named("a42-worker"),
            meta: send("x"),
        },
        Action::Network,
        Action::Write {
            path: Path::new("/data/13/file"),
        },
        Action::Exec { handler: "h" },
        Action::Resource {
            kind: ResourceKind::Memory,
            amount: 4096.0,
        },
    ];
    let mut allowed = 0;
    let allocations = counting::count(|| {
        for action in &actions {
            if p.evaluate(action).allowed {
                allowed += 1;
            }
        }
    });
    assert_eq!(allocations, 0);
    // The counter does see allocations (this test could fail).
    assert_eq!(counting::count(|| drop(black_box(vec![1u8]))), 1);
    assert_eq!(allowed, 2, "the receive and the write are granted");
}

#[test]
fn write_matching_is_by_component_and_refuses_unnormal_paths() {
    let p = set(&[
        "allow write \"/srv/data/\"",
        "deny write \"/srv/data/keys\"",
        "allow write \"/\"",
    ]);
    assert!(p.check_write(Path::new("/srv/data")).is_ok());
    assert!(p.check_write(Path::new("/srv/data/x")).is_ok());
    assert!(p.check_write(Path::new("/srv/data/keys")).is_err());
    assert!(p.check_write(Path::new("/srv/data/keys/k")).is_err());
    assert!(
        p.check_write(Path::new("/srv/data/keysafe")).is_ok(),
        "component, not prefix"
    );
    // Spellings that would dodge a byte-wise deny are refused outright.
    for dodge in [
        "/srv/data//keys",
        "/srv/data/./keys",
        "/srv/data/x/../keys",
        "/srv/data/keys/",
        "srv",
    ] {
        let d = p.evaluate(&Action::Write {
            path: Path::new(dodge),
        });
        assert!(!d.allowed, "{dodge}");
        assert!(p.check_write(Path::new(dodge)).is_err(), "{dodge}");
    }
    assert!(
        p.check_write(Path::new("/etc/x")).is_ok(),
        "allow write \"/\" grants everything else"
    );
}
