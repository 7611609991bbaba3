//! A definition plus its `AgentConfig` becomes a `SandboxSpec`, a handler list and a policy
//! set, with the documented precedence.

use std::path::Path;
use std::time::Duration;

use symbiont_runtime::dsl::{self, HandlerOutput, LoadOptions, Trigger};
use symbiont_runtime::{AgentConfig, Capability, ExecutionMode, ResourceLimits, SecurityTier};

fn config(source: &str) -> AgentConfig {
    AgentConfig {
        name: "mapped".into(),
        dsl_source: source.into(),
        ..Default::default()
    }
}

const SOURCE: &str = r#"
agent mapped {
  tier  = docker
  image = "local/busybox:latest"
  run ["/bin/sh", "/workspace/main.sh", "--verbose"]
  env { GREETING = "hello" PATH = "/usr/bin:/bin" }
  file "main.sh" = """
      #!/bin/sh
      echo "$GREETING"
      """
  file "conf/settings.json" mode 0600 = "{}"
  capabilities [messaging, "custom:gpu"]
  limits { memory = 128MiB  cpu = 4  disk_io = 0  network_io = 5  timeout = 10m  idle_timeout = 2h }
  on start send "ready"
  on message "jobs" reply "results"
  policy {
    allow receive from topic "jobs"
    allow send to topic "results"
    allow send to topic "ready"
    allow write "/var/lib/mapped"
  }
}
"#;

#[test]
fn definition_and_config_become_a_sandbox_spec() {
    let cfg = AgentConfig {
        security_tier: SecurityTier::Tier2,
        resource_limits: ResourceLimits {
            memory_mb: 512,
            cpu_cores: 1.0,
            disk_io_mbps: 50,
            network_io_mbps: 0,
            execution_timeout: Duration::from_secs(3600),
            idle_timeout: Duration::from_secs(300),
        },
        capabilities: vec![Capability::Custom("audio".into())],
        ..config(SOURCE)
    };
    let compiled = dsl::compile(&cfg, &LoadOptions::default()).unwrap_or_else(|e| panic!("{e}"));
    let spec = &compiled.spec;
    assert_eq!(spec.agent_id, cfg.id);
    assert_eq!(spec.argv, ["/bin/sh", "/workspace/main.sh", "--verbose"]);
    assert_eq!(spec.env["GREETING"], "hello");
    assert_eq!(
        spec.env.len(),
        2,
        "nothing else is added to the environment"
    );
    assert_eq!(spec.files.len(), 2);
    assert_eq!(spec.files[0].path, Path::new("main.sh"));
    assert_eq!(spec.files[0].contents, b"#!/bin/sh\necho \"$GREETING\"\n");
    assert_eq!(spec.files[0].mode, 0o755);
    assert_eq!(spec.files[1].mode, 0o600);
    assert_eq!(spec.workdir, Path::new("/workspace"));
    assert_eq!(spec.image.as_deref(), Some("local/busybox:latest"));
    // The stronger isolation wins: gvisor (config) over docker (definition).
    assert_eq!(compiled.tier, SecurityTier::Tier2);

    // Limits: the config is the ceiling; 0 bandwidth = unlimited.
    assert_eq!(spec.limits.memory_mb, 128);
    assert_eq!(
        spec.limits.cpu_cores, 1.0,
        "the definition asked 4, the config allows 1"
    );
    assert_eq!(spec.limits.disk_io_mbps, 50, "unlimited asked, 50 allowed");
    assert_eq!(spec.limits.network_io_mbps, 5, "5 asked, unlimited allowed");
    assert_eq!(spec.limits.execution_timeout, Duration::from_secs(600));
    assert_eq!(spec.limits.idle_timeout, Duration::from_secs(300));
    for limit in ["cpu", "disk_io", "idle_timeout"] {
        assert!(
            compiled
                .notes
                .iter()
                .any(|n| n.starts_with(&format!("limits.{limit}:"))),
            "{limit}: {:?}",
            compiled.notes
        );
    }
    assert!(!compiled
        .notes
        .iter()
        .any(|n| n.starts_with("limits.memory")));

    // Capabilities: union + implied by rules; network never granted.
    assert_eq!(
        spec.capabilities,
        vec![
            Capability::FileSystem,
            Capability::Messaging,
            Capability::Custom("audio".into()),
            Capability::Custom("gpu".into()),
        ]
    );
    assert!(compiled.policy.check_network().is_err());
    assert_eq!(
        compiled.policy.writable_paths(),
        [Path::new("/var/lib/mapped")]
    );
    // Persistent agents have no wall-clock limit on their main program.
    assert_eq!(spec.timeout, None);
    spec.validate().expect("valid spec");

    // Handlers for the scheduler and the bus.
    assert_eq!(compiled.handlers.len(), 2);
    assert_eq!(compiled.handlers[0].trigger, Trigger::Start);
    assert_eq!(
        compiled.handlers[0].output,
        HandlerOutput::Publish {
            topic: "ready".into()
        }
    );
    assert_eq!(compiled.topics().collect::<Vec<_>>(), ["jobs"]);
    assert_eq!(
        compiled.handler("message:jobs").map(|h| &h.output),
        Some(&HandlerOutput::Reply {
            topic: "results".into()
        })
    );
}

#[test]
fn ephemeral_and_scheduled_agents_get_a_timeout_and_config_schedules_become_handlers() {
    let src = "agent t { run [\"/bin/true\"] limits { timeout = 90s } }";
    let cfg = AgentConfig {
        execution_mode: ExecutionMode::Ephemeral,
        ..config(src)
    };
    let compiled = dsl::compile(&cfg, &LoadOptions::default()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(compiled.spec.timeout, Some(Duration::from_secs(90)));

    let cfg = AgentConfig {
        execution_mode: ExecutionMode::Scheduled {
            schedule: "0 */5 * * * *".into(),
        },
        ..config(src)
    };
    let compiled = dsl::compile(&cfg, &LoadOptions::default()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(compiled.handlers.len(), 1);
    assert_eq!(compiled.handlers[0].name, "schedule:0 */5 * * * *");
    assert!(compiled.policy.check_exec("schedule:0 */5 * * * *").is_ok());

    // The same schedule in the definition is not added twice (5- and 6-field forms agree).
    let src2 = "agent t { run [\"/bin/true\"] on schedule \"*/5 * * * *\" }";
    let cfg = AgentConfig {
        execution_mode: ExecutionMode::Scheduled {
            schedule: "0 */5 * * * *".into(),
        },
        ..config(src2)
    };
    let compiled = dsl::compile(&cfg, &LoadOptions::default()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(compiled.handlers.len(), 1);

    let cfg = AgentConfig {
        execution_mode: ExecutionMode::Scheduled {
            schedule: "every tuesday".into(),
        },
        ..config(src)
    };
    let err = dsl::compile(&cfg, &LoadOptions::default()).expect_err("bad schedule");
    assert_eq!(err.code(), "DSL_001");
    assert!(
        err.to_string().contains("AgentConfig.execution_mode"),
        "{err}"
    );
}

#[test]
fn a_bad_or_empty_dsl_source_fails_with_the_rendered_diagnostics() {
    let err = dsl::compile(&config(""), &LoadOptions::default()).expect_err("empty");
    assert_eq!(err.code(), "DSL_001");
    assert!(err.to_string().contains("the definition is empty"), "{err}");

    let err = dsl::compile(
        &config("agent x { run [\"/bin/true\"] capabilities [teleport] }"),
        &LoadOptions::default(),
    )
    .expect_err("bad capability");
    assert_eq!(err.code(), "DSL_001");
    let text = err.to_string();
    assert!(text.contains("mapped:dsl_source:1:43"), "{text}");
    assert!(text.contains("unknown capability `teleport`"), "{text}");
    assert!(text.contains('^'), "{text}");
}

#[test]
fn a_definition_refused_by_its_own_resource_policy_is_a_security_error() {
    let src =
        "agent big { run [\"/bin/true\"] limits { memory = 512MiB } policy { deny memory > 256 } }";
    let err = dsl::compile(&config(src), &LoadOptions::default()).expect_err("denied");
    assert_eq!(err.code(), "SEC_001");
    assert!(err.to_string().contains("deny memory > 256"), "{err}");
    // The operator can impose the same through AgentConfig.policies.
    let src = "agent big { run [\"/bin/true\"] limits { memory = 512MiB } }";
    let cfg = AgentConfig {
        policies: vec!["deny memory > 256".into()],
        ..config(src)
    };
    assert_eq!(
        dsl::compile(&cfg, &LoadOptions::default())
            .expect_err("denied")
            .code(),
        "SEC_001"
    );
}

#[test]
fn network_comes_from_the_capability_or_an_allow_rule_and_deny_removes_it() {
    let with_cap = "agent n { run [\"/bin/true\"] capabilities [network] }";
    let c =
        dsl::compile(&config(with_cap), &LoadOptions::default()).unwrap_or_else(|e| panic!("{e}"));
    assert!(c.spec.has_capability(&Capability::Network));
    let d = c.policy.check_network().expect("allowed");
    let rule = c
        .policy
        .rule(d.rule.expect("implicit rule"))
        .expect("exists");
    assert!(rule.origin.source.contains("capability `network`"));

    let with_rule = "agent n { run [\"/bin/true\"] policy { allow network } }";
    let c =
        dsl::compile(&config(with_rule), &LoadOptions::default()).unwrap_or_else(|e| panic!("{e}"));
    assert!(c.spec.has_capability(&Capability::Network));

    let none = "agent n { run [\"/bin/true\"] }";
    let c = dsl::compile(&config(none), &LoadOptions::default()).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        c.spec.capabilities.is_empty(),
        "capabilities not granted are denied"
    );
    assert!(c.policy.check_network().is_err());

    let cfg = AgentConfig {
        capabilities: vec![Capability::Network],
        ..config(none)
    };
    let c = dsl::compile(&cfg, &LoadOptions::default()).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        c.spec.has_capability(&Capability::Network),
        "config grants count too"
    );

    let cfg = AgentConfig {
        capabilities: vec![Capability::Network, Capability::FileSystem],
        policies: vec!["deny network".into()],
        ..config(none)
    };
    let c = dsl::compile(&cfg, &LoadOptions::default()).unwrap_or_else(|e| panic!("{e}"));
    assert!(!c.spec.has_capability(&Capability::Network));
    assert!(
        !c.spec.has_capability(&Capability::FileSystem),
        "no writable path named"
    );
}

#[test]
fn host_files_come_from_the_base_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("prog.sh"), "#!/bin/sh\necho hi\n").expect("write");
    let src =
        "agent h { run [\"/bin/sh\", \"/workspace/prog.sh\"] file \"prog.sh\" from \"prog.sh\" }";
    let options = LoadOptions {
        base_dir: Some(dir.path().to_path_buf()),
        ..Default::default()
    };
    let c = dsl::compile(&config(src), &options).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.spec.files[0].contents, b"#!/bin/sh\necho hi\n");
    assert_eq!(c.spec.files[0].mode, 0o755);

    let small = LoadOptions {
        max_file_bytes: 4,
        ..options
    };
    let err = dsl::compile(&config(src), &small).expect_err("too large");
    assert!(err.to_string().contains("byte limit"), "{err}");
}
