//! The `symbiont` command line as a user runs it: offline commands (`config check`,
//! `dsl check`, `token`) and the client commands against a real daemon, with their exit
//! codes, tables and `--json` output.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::{cli, echo_definition, examples_dir, TestDaemon};
use serde_json::Value;

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

#[test]
fn config_check_names_the_key_and_line_and_prints_the_effective_config() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[api]\nlisten = \"127.0.0.1:7420\"\n\n[lifecycle]\nmax_agents = 0\n",
    )
    .expect("write");
    let (code, out, err) = cli(&["config", "check", bad.to_str().expect("utf8")], &[]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("bad.toml:5: lifecycle.max_agents"),
        "expected file:line: key in {err}"
    );
    let typo = dir.path().join("typo.toml");
    std::fs::write(&typo, "[api]\nlisten = \"127.0.0.1:7420\"\nmax_body = 5\n").expect("write");
    let (code, _, err) = cli(&["config", "check", typo.to_str().expect("utf8")], &[]);
    assert_eq!(code, 1);
    assert!(
        err.contains("typo.toml:3") && err.contains("max_body"),
        "{err}"
    );
    let (code, out, _) = cli(
        &["--json", "config", "check", typo.to_str().expect("utf8")],
        &[],
    );
    assert_eq!(code, 1);
    let v = json(&out);
    assert_eq!(v["ok"], false);
    assert_eq!(v["code"], "CONFIG_001");

    let good = dir.path().join("good.toml");
    std::fs::write(&good, "[api]\nlisten = \"127.0.0.1:9999\"\n").expect("write");
    let (code, out, err) = cli(&["config", "check", good.to_str().expect("utf8")], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("good.toml: ok"), "{out}");
    // --print: defaults, file and environment merged.
    let (code, out, _) = cli(
        &["config", "check", good.to_str().expect("utf8"), "--print"],
        &[("SYMBIONT_MAX_AGENTS", "7")],
    );
    assert_eq!(code, 0);
    assert!(out.contains("listen = \"127.0.0.1:9999\""), "{out}");
    assert!(out.contains("max_agents = 7"), "{out}");
    // A bad environment override is an error too.
    let (code, _, err) = cli(
        &["config", "check", good.to_str().expect("utf8")],
        &[("SYMBIONT_MAX_AGENTS", "lots")],
    );
    assert_eq!(code, 1);
    assert!(err.contains("SYMBIONT_MAX_AGENTS"), "{err}");
}

#[test]
fn dsl_check_prints_rendered_diagnostics_and_exits_1_on_errors() {
    let examples = examples_dir();
    let files: Vec<String> = ["collector", "summarizer", "reporter"]
        .iter()
        .map(|n| examples.join(format!("{n}.agent")).display().to_string())
        .collect();
    let args: Vec<&str> = ["dsl", "check"]
        .into_iter()
        .chain(files.iter().map(String::as_str))
        .collect();
    let (code, out, err) = cli(&args, &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(out.matches(": ok: agent").count(), 3, "{out}");

    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("bad.agent");
    std::fs::write(
        &bad,
        "agent bad {\n  run [\"/bin/true\"]\n  capabilities [netwrok]\n}\n",
    )
    .expect("write");
    let (code, out, _) = cli(
        &["dsl", "check", bad.to_str().expect("utf8"), &files[0]],
        &[],
    );
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("error[DSL_001]"), "{out}");
    assert!(out.contains("bad.agent:3:17"), "{out}");
    assert!(out.contains("did you mean `network`"), "{out}");
    assert!(out.contains(": ok: agent `collector`"), "{out}");
}

#[test]
fn tokens_are_created_saved_listed_and_revoked_offline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let data_s = data.to_str().expect("utf8");
    let token_file = dir.path().join("cfg").join("token");
    let (code, out, err) = cli(
        &[
            "--token-file",
            token_file.to_str().expect("utf8"),
            "token",
            "create",
            "--data-dir",
            data_s,
            "--name",
            "laptop",
            "--save",
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let token = out.trim();
    assert!(token.starts_with("sym_") && token.len() == 68, "{out}");
    assert!(err.contains("shown only this once"), "{err}");
    let saved = std::fs::read_to_string(&token_file).expect("token file");
    assert_eq!(saved.trim(), token);
    let mode = std::fs::metadata(&token_file)
        .expect("meta")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    // The store holds only the hash, privately.
    let stored = std::fs::read_to_string(data.join("api_tokens.json")).expect("store");
    assert!(!stored.contains(&token[4..]), "the token itself is stored");
    let (code, out, _) = cli(&["--json", "token", "list", "--data-dir", data_s], &[]);
    assert_eq!(code, 0);
    let list = json(&out);
    assert_eq!(list[0]["name"], "laptop");
    let id = list[0]["id"].as_str().expect("id").to_string();
    let (code, out, _) = cli(&["token", "list", "--data-dir", data_s], &[]);
    assert_eq!(code, 0);
    assert!(out.contains("laptop") && out.contains(&id), "{out}");
    let (code, out, _) = cli(&["token", "revoke", "--data-dir", data_s, &id], &[]);
    assert_eq!(code, 0);
    assert!(out.contains("revoked token `laptop`"), "{out}");
    let (code, _, err) = cli(&["token", "revoke", "--data-dir", data_s, &id], &[]);
    assert_eq!(code, 2);
    assert!(err.contains("no token with id or name"), "{err}");
}

#[test]
fn client_commands_drive_a_running_daemon() {
    let d = TestDaemon::start();
    let work = tempfile::tempdir().expect("tempdir");
    std::fs::copy(
        examples_dir().join("echo_agent.py"),
        work.path().join("echo_agent.py"),
    )
    .expect("copy");
    let def = work.path().join("echo.agent");
    std::fs::write(&def, echo_definition("echo")).expect("write");

    // agent create FILE: host files are read next to the definition.
    let (code, out, err) = d.cli(&["agent", "create", def.to_str().expect("utf8")]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("(echo) is running [native tier]"), "{out}");
    let id = out
        .split_whitespace()
        .nth(1)
        .expect("id in output")
        .to_string();

    // agent create --from-json, left ready.
    let cfg = work.path().join("quiet.json");
    std::fs::write(
        &cfg,
        serde_json::json!({
            "name": "quiet",
            "dsl_source": common::cat_definition("quiet"),
        })
        .to_string(),
    )
    .expect("write");
    let (code, out, err) = d.cli(&[
        "--json",
        "agent",
        "create",
        "--from-json",
        cfg.to_str().expect("utf8"),
        "--no-start",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let quiet = json(&out);
    assert_eq!(quiet["state"], "ready");
    let quiet_id = quiet["id"].as_str().expect("id").to_string();
    for (verb, state) in [
        ("start", "running"),
        ("suspend", "suspended"),
        ("resume", "running"),
    ] {
        let (code, out, err) = d.cli(&["agent", verb, &quiet_id]);
        assert_eq!(code, 0, "{verb}: {err}");
        assert!(out.ends_with(&format!("is {state}\n")), "{verb}: {out}");
    }

    // list (table and JSON), status, logs.
    let (code, out, _) = d.cli(&["agent", "list"]);
    assert_eq!(code, 0);
    let header = out.lines().next().expect("header");
    assert!(header.contains("ID") && header.contains("STATE"), "{out}");
    assert!(out.contains(&id) && out.contains("quiet"), "{out}");
    let (_, out, _) = d.cli(&["--json", "agent", "list"]);
    assert_eq!(json(&out)["agents"].as_array().expect("agents").len(), 2);
    let (code, out, _) = d.cli(&["agent", "status", &id]);
    assert_eq!(code, 0);
    assert!(out.contains("state") && out.contains("running"), "{out}");
    let (code, out, _) = d.cli(&["agent", "logs", &id, "-n", "5"]);
    assert_eq!(code, 0);
    assert!(out.contains("python echo agent"), "{out}");

    // task submit --wait, status, list; cancelling a finished task is refused.
    let (code, out, err) = d.cli(&[
        "task", "submit", "--agent", &id, "--input", "hi there", "--wait",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("is completed"), "{out}");
    assert!(out.contains("output:"), "{out}");
    let task_id = out.split_whitespace().nth(1).expect("task id").to_string();
    let (code, out, _) = d.cli(&["--json", "task", "status", &task_id]);
    assert_eq!(code, 0);
    assert_eq!(json(&out)["input"], "hi there");
    let input = work.path().join("input.bin");
    std::fs::write(&input, [0u8, 1, 2, 255]).expect("write");
    let (code, out, _) = d.cli(&[
        "--json",
        "task",
        "submit",
        "--agent",
        &id,
        "--input-file",
        input.to_str().expect("utf8"),
    ]);
    assert_eq!(code, 0);
    let queued = json(&out);
    let (code, out, _) = d.cli(&[
        "--json",
        "task",
        "status",
        queued["task_id"].as_str().expect("id"),
        "--wait",
    ]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(json(&out)["input_base64"], "AAEC/w==");
    let (code, out, _) = d.cli(&["task", "list", "--agent", &id]);
    assert_eq!(code, 0);
    assert!(out.contains(&task_id), "{out}");
    let (code, _, err) = d.cli(&["task", "cancel", &task_id]);
    assert_eq!(code, 1);
    assert!(err.contains("error[SCHED_008] (HTTP 409)"), "{err}");

    // send, dead letters.
    let (code, out, err) = d.cli(&["send", "--to", &id, "--topic", "chat", "--payload", "hello"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("accepted"), "{out}");
    let (code, out, err) = d.cli(&["send", "--to", &quiet_id, "--payload", "refused"]);
    assert_eq!(code, 1, "{out}");
    assert!(err.contains("error[SEC_001] (HTTP 403)"), "{err}");
    let (code, out, _) = d.cli(&["dead-letters"]);
    assert_eq!(code, 0);
    assert!(out.contains(&quiet_id), "{out}");

    // audit through the daemon, and offline.
    let (code, out, err) = d.cli(&["audit", "verify", "--remote"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("OK: audit log"), "{out}");
    let (code, out, _) = d.cli(&["audit", "tail", "--remote", "-n", "3"]);
    assert_eq!(code, 0);
    assert_eq!(out.lines().count(), 3, "{out}");
    let (code, out, _) = d.cli(&["audit", "tail", "--remote", "-n", "2", "--json"]);
    assert_eq!(code, 0);
    for line in out.lines() {
        let v = json(line);
        assert!(v["seq"].is_u64() && v["type"].is_string(), "{line}");
    }
    let (code, out, err) = d.cli(&["audit", "verify"]);
    assert_eq!(code, 0, "offline: {out}{err}");

    // stop, delete; then the agent is unknown: exit 1 with the API's code.
    let (code, out, _) = d.cli(&["agent", "stop", &id]);
    assert_eq!(code, 0);
    assert!(out.contains("is terminated"), "{out}");
    let (code, out, _) = d.cli(&["agent", "delete", &id]);
    assert_eq!(code, 0);
    assert!(out.contains("deleted"), "{out}");
    let (code, _, err) = d.cli(&["agent", "status", &id]);
    assert_eq!(code, 1);
    assert!(err.contains("error[AGENT_001] (HTTP 404)"), "{err}");

    // The token from a token file works too; a wrong token is an API error (exit 1).
    let token_file = work.path().join("token");
    std::fs::write(&token_file, format!("{}\n", d.token)).expect("write");
    let (code, _, err) = cli(
        &["--url", &d.url, "agent", "list"],
        &[("SYMBIONT_TOKEN_FILE", token_file.to_str().expect("utf8"))],
    );
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = cli(
        &["--url", &d.url, "--token", "sym_nope", "agent", "list"],
        &[],
    );
    assert_eq!(code, 1);
    assert!(err.contains("error[API_001] (HTTP 401)"), "{err}");
}

#[test]
fn an_unreachable_daemon_is_exit_2_with_a_hint() {
    // A port nothing listens on: bind one, then free it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let (code, _, err) = cli(&["--url", &url, "--token", "x", "agent", "list"], &[]);
    assert_eq!(code, 2);
    assert!(err.contains("cannot reach the symbiont daemon"), "{err}");
    assert!(err.contains("symbiont up"), "{err}");
}

#[test]
fn a_second_daemon_on_the_same_data_directory_is_refused() {
    let d = TestDaemon::start();
    let (code, out, err) = cli(
        &[
            "--config",
            d.config.to_str().expect("utf8"),
            "up",
            "--listen",
            "127.0.0.1:0",
        ],
        &[],
    );
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        err.contains(&format!("another symbiont daemon (pid {})", d.pid())),
        "{err}"
    );
    // The first one is unharmed.
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let (status, _) = rt.block_on(d.get("/v1/agents"));
    assert_eq!(status, 200);
}
