//! The example agents in `examples/agents/` (collector -> summarizer -> reporter): every
//! definition checks without warnings and maps to a valid native-tier `SandboxSpec`; and the
//! three programs, fed frames exactly as the runtime does (4-byte big-endian length + JSON),
//! together produce the report a user expects.
//!
//! The pipeline test runs each program with the host's `/usr/bin/python3` in a temporary
//! directory holding the spec's files (the workspace), without a sandbox: it checks the
//! programs and the frame protocol, not the sandbox.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{json, Value};
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

fn frame(value: &Value) -> Vec<u8> {
    let body = serde_json::to_vec(value).expect("json");
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend(body);
    out
}

fn parse_frames(mut bytes: &[u8]) -> Vec<Value> {
    let mut frames = Vec::new();
    while bytes.len() >= 4 {
        let len = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
        assert!(bytes.len() >= 4 + len, "truncated frame");
        frames.push(serde_json::from_slice(&bytes[4..4 + len]).expect("frame is JSON"));
        bytes = &bytes[4 + len..];
    }
    assert!(bytes.is_empty(), "trailing bytes after the last frame");
    frames
}

/// Materializes the spec's files in a fresh workspace and runs its program there with
/// `input` frames on stdin; returns the frames it wrote.
fn run(compiled: &dsl::CompiledAgent, workspace: &Path, input: &[Value]) -> Vec<Value> {
    for f in &compiled.spec.files {
        let path = workspace.join(&f.path);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(&path, &f.contents).expect("write");
    }
    let argv: Vec<String> = compiled
        .spec
        .argv
        .iter()
        .map(|a| match a.strip_prefix("/workspace/") {
            Some(rest) => workspace.join(rest).display().to_string(),
            None => a.clone(),
        })
        .collect();
    let mut child = Command::new(&argv[0])
        .args(&argv[1..])
        .current_dir(workspace)
        .env_clear()
        .envs(&compiled.spec.env)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}; install python3", argv[0]));
    let mut stdin = child.stdin.take().expect("stdin");
    for v in input {
        stdin.write_all(&frame(v)).expect("write frame");
    }
    drop(stdin);
    let out = child.wait_with_output().expect("wait");
    assert!(
        out.status.success(),
        "{} failed: {}",
        argv[1],
        String::from_utf8_lossy(&out.stderr)
    );
    parse_frames(&out.stdout)
}

fn outputs(frames: &[Value]) -> Vec<Value> {
    for f in frames {
        assert_ne!(f["type"], "error", "handler failed: {f}");
    }
    assert_eq!(
        frames.last().map(|f| f["type"].clone()),
        Some(json!("done"))
    );
    frames
        .iter()
        .filter(|f| f["type"] == "output")
        .map(|f| f["payload"].clone())
        .collect()
}

#[test]
fn collector_summarizer_reporter_pipeline_produces_the_report() {
    let collector = compile("collector");
    let summarizer = compile("summarizer");
    let reporter = compile("reporter");
    let (wc, ws, wr) = (
        tempfile::tempdir().expect("tmp"),
        tempfile::tempdir().expect("tmp"),
        tempfile::tempdir().expect("tmp"),
    );

    // Collector: on start, one document per inbox file.
    let docs = outputs(&run(
        &collector,
        wc.path(),
        &[json!({"type": "start", "handler": "start"})],
    ));
    let names: Vec<&str> = docs
        .iter()
        .map(|d| d["name"].as_str().expect("name"))
        .collect();
    assert_eq!(names, ["meeting.txt", "release-notes.txt"]);
    assert!(docs[0]["text"]
        .as_str()
        .expect("text")
        .starts_with("Meeting notes, Tuesday.\n"));

    // Summarizer: one summary per document message.
    let input: Vec<Value> = docs
        .iter()
        .map(|d| json!({"type": "message", "handler": "message:documents", "topic": "documents", "from": "collector", "payload": d}))
        .collect();
    let frames = run(&summarizer, ws.path(), &input);
    let dones = frames.iter().filter(|f| f["type"] == "done").count();
    assert_eq!(dones, 2, "one run per message");
    let summaries = outputs(&frames);
    assert_eq!(summaries.len(), 2);
    assert_eq!(summaries[0]["name"], "meeting.txt");
    assert_eq!(summaries[0]["lines"], 3);
    assert_eq!(summaries[0]["words"], 19);
    assert_eq!(summaries[0]["top_words"][0], json!(["agreed", 1]));

    // Reporter: records the summaries, then answers a report request.
    let mut input: Vec<Value> = summaries
        .iter()
        .map(|s| json!({"type": "message", "handler": "message:summaries", "topic": "summaries", "from": "summarizer", "payload": s}))
        .collect();
    input.push(json!({"type": "message", "handler": "message:report-request", "topic": "report-request", "from": "user", "payload": null}));
    let frames = run(&reporter, wr.path(), &input);
    let replies = outputs(&frames);
    assert_eq!(replies.len(), 1);
    let report = replies[0]["report"].as_str().expect("report text");
    assert!(report.contains("| meeting.txt | 3 | 19 |"), "{report}");
    assert!(report.contains("| release-notes.txt | 4 |"), "{report}");
    assert!(report.contains("2 document(s)"), "{report}");
    let on_disk = std::fs::read_to_string(wr.path().join("report.md")).expect("report.md written");
    assert_eq!(on_disk, report);

    // The hourly schedule publishes the same report from the persisted state.
    let frames = run(
        &reporter,
        wr.path(),
        &[json!({"type": "schedule", "handler": "hourly"})],
    );
    assert_eq!(outputs(&frames)[0]["report"].as_str(), Some(report));
}
