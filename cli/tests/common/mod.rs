//! A real `symbiont up` process for the integration tests: a temporary data directory, a
//! free loopback port (port 0, read back from the daemon's "listening on" line), a token
//! created with `symbiont token create`, and helpers for HTTP requests, SIGTERM and
//! kill -9 / restart on the same data directory.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The binary under test.
pub fn exe() -> &'static str {
    env!("CARGO_BIN_EXE_symbiont")
}

/// Runs the CLI and returns (exit code, stdout, stderr).
pub fn cli(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = Command::new(exe())
        .args(args)
        .envs(env.iter().copied())
        .env_remove("SYMBIONT_URL")
        .env_remove("SYMBIONT_TOKEN")
        .env_remove("SYMBIONT_CONFIG")
        .output()
        .expect("run symbiont");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Settings of a test daemon.
#[derive(Clone, Debug)]
pub struct Settings {
    /// `[api] max_body_bytes`.
    pub max_body_bytes: usize,
    /// `[lifecycle] termination_timeout`.
    pub termination_timeout: &'static str,
    /// Extra TOML appended to the configuration.
    pub extra: String,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            max_body_bytes: 64 * 1024,
            termination_timeout: "10s",
            extra: String::new(),
        }
    }
}

/// A daemon under test. Stopped (SIGTERM, then SIGKILL after 30 s) when dropped.
pub struct TestDaemon {
    /// Holds the data directory.
    pub dir: tempfile::TempDir,
    /// The configuration file.
    pub config: PathBuf,
    /// The token.
    pub token: String,
    /// Base URL of the running daemon.
    pub url: String,
    /// The process.
    pub child: Option<Child>,
    /// An HTTP client.
    pub http: reqwest::Client,
    starts: usize,
}

impl TestDaemon {
    /// Starts a daemon on a fresh data directory.
    pub fn start() -> Self {
        Self::start_with(Settings::default())
    }

    /// Starts a daemon with `settings`.
    pub fn start_with(settings: Settings) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        let config = dir.path().join("runtime_config.toml");
        std::fs::write(
            &config,
            format!(
                r#"[storage]
data_dir = "{data}"

[api]
listen = "127.0.0.1:0"
max_body_bytes = {max_body}

[lifecycle]
termination_timeout = "{term}"

[sandbox]
state_dir = "{state}"

[sandbox.microvm]
accel = "tcg"

[log]
level = "info"
{extra}
"#,
                data = data.display(),
                max_body = settings.max_body_bytes,
                term = settings.termination_timeout,
                state = dir.path().join("sandboxes").display(),
                extra = settings.extra,
            ),
        )
        .expect("write config");
        let config_s = config.to_str().expect("utf8");
        let (code, out, err) = cli(
            &["--config", config_s, "token", "create", "--name", "test"],
            &[],
        );
        assert_eq!(code, 0, "token create failed: {err}");
        let token = out.trim().to_string();
        assert!(token.starts_with("sym_"), "unexpected token output {out:?}");
        let mut d = TestDaemon {
            dir,
            config,
            token,
            url: String::new(),
            child: None,
            http: reqwest::Client::new(),
            starts: 0,
        };
        d.launch();
        d
    }

    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The daemon's stderr log of start number `n` (0-based).
    pub fn log_path(&self, n: usize) -> PathBuf {
        self.dir.path().join(format!("daemon-{n}.log"))
    }

    /// Everything the daemon logged so far (all starts).
    pub fn logs(&self) -> String {
        (0..self.starts)
            .map(|n| std::fs::read_to_string(self.log_path(n)).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n----- restart -----\n")
    }

    /// Starts the daemon process (again) on the same data directory.
    pub fn launch(&mut self) {
        let log = std::fs::File::create(self.log_path(self.starts)).expect("log file");
        self.starts += 1;
        let mut child = Command::new(exe())
            .args(["--config", self.config.to_str().expect("utf8"), "up"])
            .env_remove("SYMBIONT_LOG_LEVEL")
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start the daemon");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if let Some(url) = line.strip_prefix("symbiont: listening on ") {
                    let _ = tx.send(url.trim().to_string());
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(90)) {
            Ok(url) => self.url = url,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "the daemon did not start within 90s; its log:\n{}",
                    self.logs()
                );
            }
        }
        self.child = Some(child);
    }

    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// kill -9, and reap.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("SIGKILL");
            child.wait().expect("reap");
        }
    }

    /// SIGTERM; waits up to `limit` for the exit and returns (exit code, time taken).
    pub fn terminate(&mut self, limit: Duration) -> (Option<i32>, Duration) {
        let mut child = self.child.take().expect("running");
        let t0 = Instant::now();
        let pid = i32::try_from(child.id()).expect("pid");
        // SAFETY: signalling our own unreaped child.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return (status.code(), t0.elapsed());
            }
            if t0.elapsed() > limit {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "the daemon did not exit within {limit:?} of SIGTERM; log:\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `symbiont --config CFG --url URL --token TOKEN args...`
    pub fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let mut all = vec![
            "--config",
            self.config.to_str().expect("utf8"),
            "--url",
            &self.url,
            "--token",
            &self.token,
        ];
        all.extend_from_slice(args);
        cli(&all, &[])
    }

    /// A request with the token.
    pub fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(&self.token)
    }

    /// GET with the token → (status, JSON).
    pub async fn get(&self, path: &str) -> (u16, Value) {
        send(self.req(reqwest::Method::GET, path)).await
    }

    /// POST JSON with the token → (status, JSON).
    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        send(self.req(reqwest::Method::POST, path).json(&body)).await
    }

    /// POST without a body, with the token → (status, JSON).
    pub async fn post_empty(&self, path: &str) -> (u16, Value) {
        send(self.req(reqwest::Method::POST, path)).await
    }

    /// DELETE with the token → (status, JSON or null).
    pub async fn delete(&self, path: &str) -> (u16, Value) {
        send(self.req(reqwest::Method::DELETE, path)).await
    }

    /// Creates an agent from `definition` (host files read from `base_dir`), started.
    pub async fn create_agent(&self, definition: &str, base_dir: Option<&Path>) -> Value {
        let mut body = serde_json::json!({ "definition": definition });
        if let Some(dir) = base_dir {
            body["base_dir"] = Value::String(dir.display().to_string());
        }
        let (status, agent) = self.post("/v1/agents", body).await;
        assert_eq!(status, 201, "create failed: {agent}\nlog:\n{}", self.logs());
        agent
    }

    /// Waits until the agent reaches `state` (or panics after `limit`).
    pub async fn wait_state(&self, id: &str, state: &str, limit: Duration) -> Value {
        let t0 = Instant::now();
        loop {
            let (status, agent) = self.get(&format!("/v1/agents/{id}")).await;
            if status == 200 && agent["state"] == state {
                return agent;
            }
            if t0.elapsed() > limit {
                panic!(
                    "agent {id} not {state} after {limit:?}: {status} {agent}\nlog:\n{}",
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for TestDaemon {
    /// A graceful stop, so the daemon destroys its sandboxes (cgroups included) and no
    /// leftover trips `scripts/leak-check.sh`; SIGKILL only if that takes too long.
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Ok(pid) = i32::try_from(child.id()) {
                // SAFETY: signalling our own unreaped child.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(30) {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Sends and decodes (an empty body is `null`).
pub async fn send(req: reqwest::RequestBuilder) -> (u16, Value) {
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    let bytes = resp.bytes().await.expect("body");
    let value = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
    };
    (status, value)
}

/// Asserts an error body: `{"error": {"code", "message", "status"}}`.
pub fn assert_error(status: u16, body: &Value, want_status: u16, want_code: &str) {
    assert_eq!(status, want_status, "body: {body}");
    assert_eq!(body["error"]["code"], want_code, "body: {body}");
    assert_eq!(body["error"]["status"], want_status, "body: {body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "no message: {body}"
    );
}

/// The repository's `examples/agents` directory.
pub fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("examples")
        .join("agents")
        .canonicalize()
        .expect("examples/agents")
}

/// A persistent agent running the example Python echo agent: a task's result is its
/// input upper-cased; direct messages are echoed back to the sender.
pub fn echo_definition(name: &str) -> String {
    format!(
        r#"agent {name} {{
  run ["/usr/bin/python3", "/workspace/echo_agent.py"]
  file "echo_agent.py" from "echo_agent.py"
  limits {{ memory = 64MiB  cpu = 0.5 }}
  policy {{
    allow receive from any
    allow send to any
  }}
}}"#
    )
}

/// The smallest persistent agent: reads stdin until it closes.
pub fn cat_definition(name: &str) -> String {
    format!(
        r#"agent {name} {{
  run ["/bin/sh", "-c", "cat >/dev/null"]
  limits {{ memory = 32MiB  cpu = 0.2 }}
}}"#
    )
}
