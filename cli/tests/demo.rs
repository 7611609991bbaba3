//! The README's main command, `symbiont demo`, runs for real: a daemon with the three example
//! agents in native sandboxes, their messages, a task and a verified audit trail.

use std::process::Command;

#[test]
fn demo_runs_the_example_agents_schedules_a_task_and_verifies_the_audit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("demo");
    let out = Command::new(env!("CARGO_BIN_EXE_symbiont"))
        .args(["demo", "--step-timeout", "60s", "--data-dir"])
        .arg(&data)
        .env_remove("SYMBIONT_CONFIG")
        .output()
        .expect("run symbiont demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed\n{stdout}\n{stderr}");
    for name in ["reporter", "summarizer", "collector"] {
        assert!(
            stdout.contains(&format!("{name:<10}")) && stdout.contains("in a native sandbox"),
            "{name} ran in a native sandbox:\n{stdout}"
        );
    }
    assert!(
        stdout.contains("collector  -> summarizer topic=documents"),
        "{stdout}"
    );
    assert!(
        stdout.contains("summarizer -> reporter   topic=summaries"),
        "{stdout}"
    );
    assert!(stdout.contains("| meeting.txt |"), "{stdout}");
    assert!(stdout.contains("| release-notes.txt |"), "{stdout}");
    assert!(stdout.contains("2 document(s)"), "{stdout}");
    assert!(stdout.contains("stopped cleanly"), "{stdout}");
    assert!(
        stdout.contains("hash chain and signatures intact"),
        "{stdout}"
    );
    // A second demo refuses a directory that already holds state.
    let again = Command::new(env!("CARGO_BIN_EXE_symbiont"))
        .args(["demo", "--data-dir"])
        .arg(&data)
        .output()
        .expect("run symbiont demo");
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("already holds a runtime's state"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
}
