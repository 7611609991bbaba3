//! Durability of the daemon: kill -9 under load (agents running, tasks queued and
//! running, messages in flight) and a restart on the same data directory lose no
//! acknowledged task and no acknowledged audit event, the persistent agents come back in
//! new sandboxes, and the audit log verifies; SIGTERM stops everything and exits 0.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{cli, echo_definition, examples_dir, Settings, TestDaemon};
use parking_lot::Mutex;
use serde_json::{json, Value};

/// A persistent agent that takes 50 ms per task and answers with the input upper-cased.
fn slow_worker(name: &str) -> String {
    format!(
        r#"agent {name} {{
  run ["/usr/bin/python3", "/workspace/slow.py"]
  file "slow.py" = """
      import base64, json, struct, sys, time
      inp, out = sys.stdin.buffer, sys.stdout.buffer
      def read():
          head = inp.read(4)
          if len(head) < 4:
              return None
          return json.loads(inp.read(struct.unpack(">I", head)[0]))
      def write(frame):
          body = json.dumps(frame).encode()
          out.write(struct.pack(">I", len(body)) + body)
          out.flush()
      read()  # hello
      while True:
          frame = read()
          if frame is None:
              break
          if frame["type"] == "task":
              time.sleep(0.05)
              data = base64.b64decode(frame["input"])
              write({{"type": "task_result", "task_id": frame["task_id"], "ok": True,
                     "output": base64.b64encode(data.upper()).decode()}})
      """
  limits {{ memory = 64MiB  cpu = 0.5 }}
}}"#
    )
}

/// Every event of the log: id -> (seq, type).
async fn audit_snapshot(d: &TestDaemon) -> BTreeMap<String, (u64, String)> {
    let (status, events) = d.get("/v1/audit?limit=100000").await;
    assert_eq!(status, 200, "{events}");
    events["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| {
            (
                e["id"].as_str().expect("id").to_string(),
                (
                    e["seq"].as_u64().expect("seq"),
                    e["type"].as_str().expect("type").to_string(),
                ),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_under_load_loses_no_acknowledged_task_or_audit_event() {
    let mut d = TestDaemon::start_with(Settings {
        extra: "[scheduler]\nmax_concurrent_tasks = 4\n".into(),
        ..Default::default()
    });
    let w1 = d.create_agent(&slow_worker("w1"), None).await;
    let w2 = d.create_agent(&slow_worker("w2"), None).await;
    let echo = d
        .create_agent(&echo_definition("echo"), Some(&examples_dir()))
        .await;
    // Suspended before the crash: must come back suspended, not running.
    let paused = d
        .create_agent(&common::cat_definition("paused"), None)
        .await;
    let paused_id = paused["id"].as_str().expect("id").to_string();
    let (status, body) = d
        .post_empty(&format!("/v1/agents/{paused_id}/suspend"))
        .await;
    assert_eq!(status, 200, "{body}");
    // Stopped on purpose before the crash: must stay terminated.
    let gone = d.create_agent(&common::cat_definition("gone"), None).await;
    let gone_id = gone["id"].as_str().expect("id").to_string();
    let (status, body) = d.post_empty(&format!("/v1/agents/{gone_id}/stop")).await;
    assert_eq!(status, 200, "{body}");
    let workers: Vec<String> = [&w1, &w2]
        .iter()
        .map(|a| a["id"].as_str().expect("id").to_string())
        .collect();
    let echo_id = echo["id"].as_str().expect("id").to_string();
    let old_sandboxes: Vec<String> = [&w1, &w2, &echo]
        .iter()
        .map(|a| a["sandbox_id"].as_str().expect("sandbox").to_string())
        .collect();

    // Load: 4 submitters and a message sender, until the daemon dies under them.
    let acked: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let failed = Arc::new(AtomicU64::new(0));
    let sent = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = Vec::new();
    for c in 0..4 {
        let (url, token) = (d.url.clone(), d.token.clone());
        let (acked, failed, stop, workers) =
            (acked.clone(), failed.clone(), stop.clone(), workers.clone());
        load.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) && i < 150 {
                let input = format!("job-{c}-{i}");
                let body = json!({"agent_id": workers[i % 2], "input": input, "timeout": "60s"});
                let resp = http
                    .post(format!("{url}/v1/tasks"))
                    .bearer_auth(&token)
                    .json(&body)
                    .send()
                    .await;
                match resp {
                    Ok(r) if r.status().is_success() => match r.json::<Value>().await {
                        Ok(v) => acked
                            .lock()
                            .push((v["task_id"].as_str().expect("id").to_string(), input)),
                        Err(_) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    },
                    _ => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                i += 1;
            }
        }));
    }
    {
        let (url, token) = (d.url.clone(), d.token.clone());
        let (sent, stop, echo_id) = (sent.clone(), stop.clone(), echo_id.clone());
        load.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            while !stop.load(Ordering::Relaxed) {
                let resp = http
                    .post(format!("{url}/v1/messages"))
                    .bearer_auth(&token)
                    .json(&json!({"to": echo_id, "topic": "chat", "payload": "ping"}))
                    .send()
                    .await;
                match resp {
                    Ok(r) if r.status().as_u16() == 202 => {
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => tokio::time::sleep(Duration::from_millis(5)).await,
                }
            }
        }));
    }

    // Let tasks pile up (each takes 50 ms; 4 at a time), snapshot the acknowledged audit
    // log while the load runs, then kill -9 mid-load.
    let t0 = Instant::now();
    while acked.lock().len() < 120 && t0.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = audit_snapshot(&d).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, running) = d.get("/v1/tasks?status=running").await;
    assert_eq!(status, 200);
    let (_, queued) = d.get("/v1/tasks?status=queued").await;
    let in_flight = running["tasks"].as_array().map_or(0, Vec::len)
        + queued["tasks"].as_array().map_or(0, Vec::len);
    let old_pid = d.pid();
    d.kill9();
    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await.expect("load task");
    }
    let acked: Vec<(String, String)> = acked.lock().clone();
    eprintln!(
        "killed daemon {old_pid}: {} tasks acknowledged, {} submits failed, {} messages sent, {in_flight} tasks queued or running at the last look, {} audit events acknowledged",
        acked.len(),
        failed.load(Ordering::Relaxed),
        sent.load(Ordering::Relaxed),
        before.len()
    );
    assert!(acked.len() >= 120, "too little load: {}", acked.len());
    assert!(
        in_flight > 0,
        "no task was queued or running when the daemon was killed"
    );
    assert!(sent.load(Ordering::Relaxed) > 0, "no message was in flight");

    // The killed daemon's sandboxes died with it (the lifeline), before any restart.
    let t0 = Instant::now();
    loop {
        let leftovers = std::process::Command::new("pgrep")
            .args(["-f", "/workspace/slow.py"])
            .output()
            .expect("pgrep");
        let pids = String::from_utf8_lossy(&leftovers.stdout).to_string();
        // Other tests do not run slow.py; any survivor would be this daemon's.
        if pids.trim().is_empty() {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "sandboxed programs survived kill -9 of the daemon: {pids}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Restart on the same data directory.
    d.launch();

    // The persistent agents come back, in new sandboxes.
    for (id, old) in workers.iter().chain([&echo_id]).zip(&old_sandboxes) {
        let agent = d.wait_state(id, "running", Duration::from_secs(60)).await;
        assert_ne!(agent["sandbox_id"].as_str(), Some(old.as_str()), "{agent}");
    }

    d.wait_state(&paused_id, "suspended", Duration::from_secs(30))
        .await;
    let (_, still_gone) = d.get(&format!("/v1/agents/{gone_id}")).await;
    assert_eq!(still_gone["state"], "terminated", "{still_gone}");

    // Every acknowledged task exists and completes, with the right output.
    let mut recovered = 0;
    for (task_id, input) in &acked {
        let t0 = Instant::now();
        let task = loop {
            let (status, task) = d.get(&format!("/v1/tasks/{task_id}?wait=30s")).await;
            assert_eq!(status, 200, "acknowledged task {task_id} is lost: {task}");
            if task["status"] != "queued"
                && task["status"] != "running"
                && task["status"] != "waiting"
            {
                break task;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(120),
                "task {task_id} never finished: {task}\n{}",
                d.logs()
            );
        };
        assert_eq!(task["status"], "completed", "{task}");
        assert_eq!(task["input"], input.as_str());
        // The echo agent answers a task with its input upper-cased.
        assert_eq!(
            task["output"].as_str(),
            Some(input.to_uppercase().as_str()),
            "task {task_id}'s output is not its input's: {task}"
        );
        if task["recovered"] == true {
            recovered += 1;
        }
    }
    assert!(recovered > 0, "no task was recovered from the store");

    // Every audit event acknowledged before the kill is there, at the same place; every
    // acknowledged task's scheduling is in the log.
    let after = audit_snapshot(&d).await;
    for (id, (seq, kind)) in &before {
        assert_eq!(
            after.get(id),
            Some(&(*seq, kind.clone())),
            "audit event {id} (#{seq} {kind}) acknowledged before the kill is lost"
        );
    }
    let (_, scheduled) = d.get("/v1/audit?type=TaskScheduled&limit=100000").await;
    let scheduled: BTreeSet<String> = scheduled["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter_map(|e| e["metadata"]["task_id"].as_str().map(str::to_string))
        .collect();
    for (task_id, _) in &acked {
        assert!(
            scheduled.contains(task_id),
            "the scheduling of acknowledged task {task_id} is not in the audit log"
        );
    }

    // The log verifies, through the daemon and offline with the public key.
    let (status, report) = d.get("/v1/audit/verify").await;
    assert_eq!(status, 200);
    assert_eq!(report["ok"], true, "{report}");
    let (code, out, err) = cli(
        &[
            "--config",
            d.config.to_str().expect("utf8"),
            "audit",
            "verify",
        ],
        &[],
    );
    assert_eq!(code, 0, "offline verify failed: {out}{err}");
    eprintln!(
        "after restart: {} tasks completed ({recovered} recovered), {} audit events before the kill all present, log verifies",
        acked.len(),
        before.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_agents_flushes_the_audit_and_exits_0_and_agents_return_on_restart() {
    let mut d = TestDaemon::start_with(Settings {
        termination_timeout: "4s",
        ..Default::default()
    });
    // A program that ignores SIGTERM must be killed at the end of termination_timeout.
    let stubborn = d
        .create_agent(
            r#"agent stubborn {
  run ["/bin/sh", "-c", "trap '' TERM; while :; do sleep 0.1; done"]
  limits { memory = 32MiB  cpu = 0.2 }
}"#,
            None,
        )
        .await;
    let echo = d
        .create_agent(&echo_definition("echo"), Some(&examples_dir()))
        .await;
    let stubborn_id = stubborn["id"].as_str().expect("id").to_string();
    let echo_id = echo["id"].as_str().expect("id").to_string();
    // A request in flight when the signal comes still gets its answer.
    let (status, receipt) = d
        .post(
            "/v1/tasks",
            json!({"agent_id": echo_id, "input": "x", "delay": "1s"}),
        )
        .await;
    assert_eq!(status, 202);
    let waiter = {
        let url = format!(
            "{}/v1/tasks/{}?wait=3s",
            d.url,
            receipt["task_id"].as_str().expect("id")
        );
        let token = d.token.clone();
        tokio::spawn(async move {
            reqwest::Client::new()
                .get(url)
                .bearer_auth(token)
                .send()
                .await
                .map(|r| r.status().as_u16())
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;

    let (code, took) = d.terminate(Duration::from_secs(30));
    assert_eq!(code, Some(0), "exit code; log:\n{}", d.logs());
    assert!(
        took < Duration::from_secs(4 + 4 + 3),
        "shutdown took {took:?} (termination_timeout 4s for requests, 4s for agents)"
    );
    assert_eq!(
        waiter
            .await
            .expect("join")
            .expect("in-flight request answered"),
        200
    );
    let leftovers = std::process::Command::new("pgrep")
        .args(["-f", "trap '' TERM"])
        .output()
        .expect("pgrep");
    assert!(
        String::from_utf8_lossy(&leftovers.stdout).trim().is_empty(),
        "the stubborn agent's program survived the shutdown"
    );

    // The audit log is complete and closed: it verifies offline and ends with the stop.
    let config = d.config.to_str().expect("utf8").to_string();
    let (code, out, err) = cli(&["--config", &config, "audit", "verify"], &[]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, _) = cli(&["--config", &config, "audit", "tail", "-n", "40"], &[]);
    assert_eq!(code, 0);
    assert!(out.contains("runtime stopping"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.contains(&stubborn_id) && l.contains("-> Terminated")),
        "{out}"
    );

    // Both agents were running: both come back.
    d.launch();
    d.wait_state(&stubborn_id, "running", Duration::from_secs(30))
        .await;
    d.wait_state(&echo_id, "running", Duration::from_secs(30))
        .await;
}
