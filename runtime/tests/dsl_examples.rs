//! The example agents in `examples/agents/` (collector -> summarizer -> reporter): every
//! definition checks without warnings, maps to a valid native-tier `SandboxSpec`, and their
//! policies allow the pipeline and nothing else. The pipeline itself runs for real, in native
//! sandboxes through the runtime, in `integration_tests.rs`.

use std::path::{Path, PathBuf};

use symbiont_runtime::dsl::{self, HandlerOutput, LoadOptions, Trigger};
use symbiont_runtime::{AgentConfig, SecurityTier};

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/agents")
}

fn compile(name: &str) -> dsl::CompiledAgent {
    let path = examples_dir().join(format!("{name}.agent"));
    let source = std::fs::read_to_string(&path).expect("example exists");
    let config = AgentConfig {
        name: name.into(),
        dsl_source: source,
        ..Default::default()
    };
    let options = LoadOptions {
        base_dir: Some(examples_dir()),
        file_name: Some(format!("{name}.agent")),
        ..Default::default()
    };
    dsl::compile(&config, &options).unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn every_example_checks_cleanly_and_maps_to_a_valid_native_spec() {
    let mut names: Vec<String> = std::fs::read_dir(examples_dir())
        .expect("examples/agents exists")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "agent"))
        .map(|p| p.file_stem().expect("stem").to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["collector", "reporter", "summarizer"]);
    for name in &names {
        let def = dsl::check_file(&examples_dir().join(format!("{name}.agent")))
            .unwrap_or_else(|d| panic!("{}", d.render()));
        assert!(def.warnings.is_empty(), "{}", def.warnings.render());
        let compiled = compile(name);
        compiled.spec.validate().expect("valid spec");
        assert_eq!(compiled.tier, SecurityTier::Native);
        assert!(
            compiled.policy.check_network().is_err(),
            "{name} has no network"
        );
        let program = Path::new(&compiled.spec.argv[0]);
        assert!(
            program.exists(),
            "{name} runs {} which this host lacks; install python3 (`apt-get install -y python3`)",
            program.display()
        );
        let script = compiled.spec.argv[1].trim_start_matches("/workspace/");
        assert!(compiled
            .spec
            .files
            .iter()
            .any(|f| f.path == Path::new(script)));
        assert!(compiled
            .spec
            .files
            .iter()
            .any(|f| f.path == Path::new("frames.py")));
        for h in &compiled.handlers {
            assert!(
                compiled.policy.check_exec(&h.name).is_ok(),
                "{name}: {}",
                h.name
            );
        }
    }
}

#[test]
fn example_policies_allow_the_pipeline_and_nothing_else() {
    use symbiont_runtime::policy::{AgentRef, MessageMeta};
    use symbiont_runtime::Priority;
    let collector = compile("collector");
    let summarizer = compile("summarizer");
    let reporter = compile("reporter");
    let doc = MessageMeta::new("documents").size(1000);
    assert!(collector.policy.check_send(AgentRef::NONE, doc).is_ok());
    assert!(collector
        .policy
        .check_send(AgentRef::NONE, doc.size(100 * 1024))
        .is_err());
    assert!(collector
        .policy
        .check_send(AgentRef::NONE, MessageMeta::new("summaries"))
        .is_err());
    assert!(summarizer
        .policy
        .check_receive(AgentRef::named("collector"), doc)
        .is_ok());
    assert!(summarizer
        .policy
        .check_receive(AgentRef::named("reporter"), doc)
        .is_err());
    let summary = MessageMeta::new("summaries").size(300);
    assert!(summarizer
        .policy
        .check_send(AgentRef::NONE, summary)
        .is_ok());
    assert!(summarizer
        .policy
        .check_send(AgentRef::NONE, summary.size(17 * 1024))
        .is_err());
    assert!(reporter
        .policy
        .check_receive(AgentRef::named("summarizer"), summary)
        .is_ok());
    let request = MessageMeta::new("report-request");
    assert!(reporter
        .policy
        .check_receive(AgentRef::named("anyone"), request)
        .is_ok());
    assert!(reporter
        .policy
        .check_receive(AgentRef::named("anyone"), request.priority(Priority::Low))
        .is_err());
    assert_eq!(
        reporter.handler("hourly").map(|h| &h.output),
        Some(&HandlerOutput::Publish {
            topic: "report".into()
        })
    );
    assert!(matches!(
        &reporter.handler("hourly").expect("hourly").trigger,
        Trigger::Schedule(c) if c.normalized == "0 0 * * * *"
    ));
}
