//! The agent definition language's parser and checks: a corpus of invalid definitions, each
//! with the exact diagnostics it must produce (`dsl_corpus/invalid/NAME.expected`; set
//! `DSL_BLESS=1` to rewrite them after an intended change, then review the diff), a corpus of
//! valid ones, specific semantics, and property tests that no input panics the parser.

use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use proptest::prelude::*;
use symbiont_runtime::dsl::{self, HandlerOutput, LoadOptions, Severity, Trigger};
use symbiont_runtime::policy::{ActionPattern, AuditMode, Condition, PolicyStatement};
use symbiont_runtime::{Capability, SecurityTier};

fn corpus(kind: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/dsl_corpus")
        .join(kind)
}

fn agent_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("corpus directory exists")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "agent"))
        .collect();
    files.sort();
    files
}

/// Loads a corpus file with a relative base directory so rendered output is portable.
fn load_corpus_file(path: &Path, kind: &str) -> Result<dsl::AgentDefinition, dsl::Diagnostics> {
    let source = std::fs::read_to_string(path).expect("readable");
    let name = path
        .file_name()
        .expect("name")
        .to_string_lossy()
        .to_string();
    let options = LoadOptions {
        base_dir: Some(PathBuf::from("tests/dsl_corpus").join(kind)),
        ..LoadOptions::default()
    };
    dsl::load(&source, &name, &options)
}

#[test]
fn invalid_corpus_gives_the_expected_diagnostics() {
    // Host-file paths are relative to the package root, where cargo runs integration tests.
    assert!(
        Path::new("tests/dsl_corpus").is_dir(),
        "run from the runtime/ package root"
    );
    let bless = std::env::var_os("DSL_BLESS").is_some();
    let files = agent_files(&corpus("invalid"));
    assert!(
        files.len() >= 40,
        "the invalid corpus has {} files",
        files.len()
    );
    let mut failures = Vec::new();
    for path in files {
        let rendered = match load_corpus_file(&path, "invalid") {
            Ok(_) => {
                failures.push(format!("{}: parsed, but must be refused", path.display()));
                continue;
            }
            Err(d) => {
                assert!(
                    d.has_errors(),
                    "{}: refused without an error",
                    path.display()
                );
                for e in d.errors() {
                    assert!(
                        e.line >= 1 && e.column >= 1,
                        "{}: no location",
                        path.display()
                    );
                }
                d.render()
            }
        };
        let expected_path = path.with_extension("expected");
        if bless {
            std::fs::write(&expected_path, &rendered).expect("write expected");
            continue;
        }
        let expected = std::fs::read_to_string(&expected_path).unwrap_or_else(|_| {
            panic!(
                "{} is missing; run with DSL_BLESS=1 to create it",
                expected_path.display()
            )
        });
        if expected != rendered {
            failures.push(format!(
                "{}:\n--- expected\n{expected}--- got\n{rendered}",
                path.display()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_invalid_diagnostic_has_a_caret_and_a_hint() {
    for path in agent_files(&corpus("invalid")) {
        let d = load_corpus_file(&path, "invalid").expect_err("invalid");
        let rendered = d.render();
        assert!(
            rendered.contains('^'),
            "{}: no caret:\n{rendered}",
            path.display()
        );
        for e in d.errors() {
            assert!(
                e.hint.as_deref().is_some_and(|h| !h.is_empty()),
                "{}: error without a hint:\n{rendered}",
                path.display()
            );
            assert!(
                !e.label.is_empty(),
                "{}: error without a label",
                path.display()
            );
        }
    }
}

#[test]
fn valid_corpus_parses_without_errors_or_warnings() {
    let files = agent_files(&corpus("valid"));
    assert!(files.len() >= 5);
    for path in files {
        match load_corpus_file(&path, "valid") {
            Ok(def) => assert!(
                def.warnings.is_empty(),
                "{}: warnings:\n{}",
                path.display(),
                def.warnings.render()
            ),
            Err(d) => panic!("{}:\n{}", path.display(), d.render()),
        }
    }
}

#[test]
fn everything_definition_reads_every_construct() {
    let def = load_corpus_file(&corpus("valid").join("everything.agent"), "valid")
        .unwrap_or_else(|d| panic!("{}", d.render()));
    assert_eq!(def.name, "everything");
    assert_eq!(def.version.as_deref(), Some("2.0.0-rc.1+build.5"));
    assert_eq!(
        def.description.as_deref(),
        Some("Exercises every statement: \"quoted\", tab\there, é")
    );
    assert_eq!(def.tier, Some(SecurityTier::Tier2));
    assert_eq!(def.image.as_deref(), Some("local/busybox:latest"));
    assert_eq!(def.workdir.as_deref(), Some(Path::new("/workspace/app")));
    assert_eq!(def.argv, ["/bin/sh", "-c", "exec /workspace/main.sh"]);
    assert_eq!(def.env.get("LOG_LEVEL").map(String::as_str), Some("debug"));
    assert_eq!(def.env.get("_PRIVATE").map(String::as_str), Some(""));
    assert_eq!(def.env.len(), 3);

    let main = &def.files[0];
    assert_eq!(main.path, Path::new("main.sh"));
    assert_eq!(
        String::from_utf8_lossy(&main.contents),
        "#!/bin/sh\n# the block is dedented; this line keeps its two extra spaces:\n  echo \"hello from $MODE\"\n"
    );
    assert_eq!(main.mode, 0o755, "a #! script defaults to executable");
    assert_eq!(def.files[1].mode, 0o600);
    assert_eq!(def.files[1].contents, b"{\"retries\": 3}");
    assert_eq!(def.files[2].contents, b"host file content\n");
    assert!(def.files[2].host_path.is_some());

    assert_eq!(
        def.capabilities,
        vec![
            Capability::Network,
            Capability::Messaging,
            Capability::FileSystem,
            Capability::Custom("gpu".into())
        ]
    );
    assert_eq!(def.limits.memory_mb, Some(1024));
    assert_eq!(def.limits.cpu_cores, Some(1.5));
    assert_eq!(def.limits.disk_io_mbps, Some(0));
    assert_eq!(def.limits.network_io_mbps, Some(20));
    assert_eq!(
        def.limits.execution_timeout,
        Some(Duration::from_secs(5400))
    );
    assert_eq!(def.limits.idle_timeout, Some(Duration::from_secs(600)));

    let names: Vec<&str> = def.handlers.iter().map(|h| h.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "start",
            "job-runner",
            "message:ping",
            "every-five",
            "schedule:0 0 12 * * Mon-Fri",
            "schedule:0 0 0 1 1 * 2030"
        ]
    );
    assert_eq!(
        def.handlers[0].output,
        HandlerOutput::Publish {
            topic: "ready".into()
        }
    );
    assert_eq!(
        def.handlers[1].output,
        HandlerOutput::Reply {
            topic: "results".into()
        }
    );
    assert_eq!(def.handlers[1].timeout, Some(Duration::from_secs(120)));
    assert_eq!(def.handlers[4].timeout, Some(Duration::from_secs(30)));
    match &def.handlers[3].trigger {
        Trigger::Schedule(c) => {
            assert_eq!(c.normalized, "0 */5 * * * *");
            // 00:00:00 UTC -> next is 00:05:00.
            let next = c.next_after(UNIX_EPOCH).expect("fires");
            assert_eq!(next, UNIX_EPOCH + Duration::from_secs(300));
        }
        other => panic!("not a schedule: {other:?}"),
    }

    let rules: Vec<_> = def
        .policy
        .iter()
        .filter_map(|s| match s {
            PolicyStatement::Rule(r) => Some(r),
            _ => None,
        })
        .collect();
    assert_eq!(rules.len(), 19);
    assert_eq!(
        rules[1].text,
        "allow send to topic \"results\" when priority >= High and size <= 4KiB"
    );
    assert_eq!(rules[1].conditions.len(), 2);
    assert!(matches!(rules[1].conditions[1], Condition::Size(_, 4096)));
    assert_eq!(rules[1].origin.line, 46);
    assert!(matches!(rules[16].action, ActionPattern::Resource { amount, .. } if amount == 8.0));
    assert!(matches!(rules[17].action, ActionPattern::Resource { amount, .. } if amount == 7200.0));
    let audits: Vec<_> = def
        .policy
        .iter()
        .filter_map(|s| match s {
            PolicyStatement::Audit(a) => Some(a),
            _ => None,
        })
        .collect();
    assert_eq!(audits.len(), 3);
    assert_eq!(audits[1].mode, AuditMode::None);
}

#[test]
fn warnings_flag_handlers_the_policy_makes_unreachable() {
    let source = r#"
agent lonely {
  run ["/bin/true"]
  capabilities [network, filesystem]
  on message "jobs" reply "results"
  policy { deny network }
}
"#;
    let def = dsl::parse(source, "lonely.agent").unwrap_or_else(|d| panic!("{}", d.render()));
    let messages: Vec<&str> = def
        .warnings
        .items()
        .iter()
        .map(|w| w.message.as_str())
        .collect();
    assert_eq!(def.warnings.items().len(), 4, "{}", def.warnings.render());
    assert!(messages
        .iter()
        .any(|m| m.contains("receive messages on `jobs`")));
    assert!(messages.iter().any(|m| m.contains("send on `results`")));
    assert!(messages.iter().any(|m| m.contains("`network` is denied")));
    assert!(messages
        .iter()
        .any(|m| m.contains("`filesystem` grants nothing")));
    assert!(def
        .warnings
        .items()
        .iter()
        .all(|w| w.severity == Severity::Warning));
    let rendered = def.warnings.render();
    assert!(
        rendered.contains("lonely.agent: 0 errors and 4 warnings"),
        "{rendered}"
    );
}

#[test]
fn host_files_are_refused_without_a_base_directory() {
    let source = "agent a { run [\"/bin/true\"] file \"x\" from \"notes.txt\" }";
    let d = dsl::parse(source, "a.agent").expect_err("no base dir");
    assert!(d
        .render()
        .contains("host files need a definition loaded from a file"));
}

#[test]
fn check_reads_host_files_next_to_the_definition() {
    let path = corpus("valid").join("everything.agent");
    let def = dsl::check_file(&path).unwrap_or_else(|d| panic!("{}", d.render()));
    assert_eq!(def.files[2].contents, b"host file content\n");
    let missing = dsl::check_file(Path::new("/nonexistent/dir/x.agent")).expect_err("missing");
    assert!(missing
        .render()
        .contains("cannot read /nonexistent/dir/x.agent"));
}

#[test]
fn oversized_sources_are_refused_with_a_diagnostic() {
    let big = format!(
        "agent a {{ run [\"/bin/true\"] }}{}",
        " ".repeat(2 * 1024 * 1024)
    );
    let d = dsl::parse(&big, "big.agent").expect_err("too big");
    assert!(d.render().contains("at most 1048576 are accepted"));
}

#[test]
fn deep_nesting_attempts_do_not_overflow_the_stack() {
    let nested = format!(
        "agent a {{ run {}\"x\"{} }}",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    assert!(dsl::parse(&nested, "nested.agent").is_err());
    let braces = format!("agent a {}", "{".repeat(200_000));
    assert!(dsl::parse(&braces, "braces.agent").is_err());
}

#[test]
fn policy_statements_parse_on_their_own() {
    let statements = dsl::parse_policy(
        "allow send to topic \"x\" when size <= 4096 deny network audit all",
        "policies[0]",
    )
    .unwrap_or_else(|d| panic!("{}", d.render()));
    assert_eq!(statements.len(), 3);
    let err = dsl::parse_policy("allow sned to topic \"x\"", "policies[1]").expect_err("typo");
    let rendered = err.render();
    assert!(rendered.contains("policies[1]:1:7"), "{rendered}");
    assert!(rendered.contains("did you mean `send`?"), "{rendered}");
}

// ---------------------------------------------------------------- property tests

fn valid_sources() -> Vec<String> {
    let mut sources: Vec<String> = agent_files(&corpus("valid"))
        .into_iter()
        .map(|p| std::fs::read_to_string(p).expect("readable"))
        .collect();
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/agents");
    for p in agent_files(&examples) {
        sources.push(std::fs::read_to_string(p).expect("readable"));
    }
    sources
}

const TOKENS: &[&str] = &[
    "agent",
    "a",
    "{",
    "}",
    "[",
    "]",
    "=",
    ",",
    "run",
    "\"/bin/true\"",
    "env",
    "file",
    "from",
    "mode",
    "0755",
    "capabilities",
    "network",
    "limits",
    "memory",
    "64MiB",
    "on",
    "start",
    "message",
    "schedule",
    "\"* * * * *\"",
    "reply",
    "send",
    "to",
    "topic",
    "as",
    "timeout",
    "30s",
    "policy",
    "allow",
    "deny",
    "receive",
    "any",
    "write",
    "\"/tmp\"",
    "exec",
    "when",
    "and",
    "priority",
    ">=",
    "High",
    "size",
    "<",
    "meta",
    "==",
    "audit",
    "all",
    "denials",
    "none",
    "for",
    "\"\"\"",
    "\"",
    "\\",
    "#",
    "//",
    "\n",
    "é",
    "\u{0}",
    "-1",
    "1.2.3",
    "version",
    "\"1.0.0\"",
    "tier",
    "docker",
];

fn mutate(source: &str, ops: &[(u8, usize, usize)]) -> String {
    let mut bytes = source.as_bytes().to_vec();
    for &(op, a, b) in ops {
        let len = bytes.len().max(1);
        let (i, j) = (a % len, b % len);
        match op % 4 {
            0 if !bytes.is_empty() => {
                let (lo, hi) = (i.min(j), i.max(j).min(bytes.len()));
                bytes.drain(lo..hi.min(lo + 16));
            }
            1 => {
                let token = TOKENS[b % TOKENS.len()];
                let at = i.min(bytes.len());
                bytes.splice(at..at, token.bytes());
            }
            2 if !bytes.is_empty() => {
                let (lo, hi) = (i.min(j), i.max(j).min(bytes.len()));
                let chunk: Vec<u8> = bytes[lo..hi.min(lo + 64)].to_vec();
                bytes.splice(lo..lo, chunk);
            }
            _ if !bytes.is_empty() => {
                let at = i.min(bytes.len() - 1);
                bytes[at] = (b % 128) as u8;
            }
            _ => {}
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

fn exercise(source: &str) {
    match dsl::parse(source, "fuzz.agent") {
        Ok(def) => {
            let _ = def.warnings.render();
            let config = symbiont_runtime::AgentConfig {
                dsl_source: source.to_string(),
                ..Default::default()
            };
            let _ = dsl::compile(&config, &LoadOptions::default());
        }
        Err(d) => {
            assert!(d.has_errors());
            let rendered = d.render();
            assert!(rendered.contains("error"));
        }
    }
    let _ = dsl::parse_policy(source, "policies[0]").map_err(|d| d.render());
}

proptest! {
    // DSL_FUZZ_CASES=100000 for a longer hunt.
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("DSL_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(512)
    ))]

    #[test]
    fn arbitrary_strings_never_panic(source in any::<String>()) {
        exercise(&source);
    }

    #[test]
    fn token_soup_never_panics(tokens in prop::collection::vec(0..TOKENS.len(), 0..80)) {
        let source: Vec<&str> = tokens.into_iter().map(|i| TOKENS[i]).collect();
        exercise(&source.join(" "));
    }

    #[test]
    fn mutated_valid_sources_never_panic(
        which in 0usize..64,
        ops in prop::collection::vec((any::<u8>(), any::<usize>(), any::<usize>()), 1..6),
    ) {
        let sources = valid_sources();
        let source = &sources[which % sources.len()];
        exercise(&mutate(source, &ops));
    }
}
