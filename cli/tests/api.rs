//! The HTTP API over real HTTP on loopback, against a real `symbiont up` process with
//! real native sandboxes: every route, authentication, error bodies and statuses, body
//! limits, the OpenAPI document against the router, and the metrics exposition.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{assert_error, cat_definition, echo_definition, examples_dir, send, TestDaemon};
use reqwest::Method;
use serde_json::{json, Value};

const NIL: &str = "00000000-0000-0000-0000-00000000abcd";

fn method(verb: &str) -> Method {
    Method::from_bytes(verb.as_bytes()).expect("method")
}

/// The router's (method, path) pairs.
fn router_routes() -> BTreeSet<(String, String)> {
    symbiont::server::route_table()
        .into_iter()
        .map(|(v, p)| (v.as_str().to_string(), p.to_string()))
        .collect()
}

fn concrete(path: &str) -> String {
    path.replace("{id}", NIL)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_but_health_needs_a_valid_token() {
    let d = TestDaemon::start();
    // Health needs none.
    let (status, health) = send(d.http.get(format!("{}/health", d.url))).await;
    assert_eq!(status, 200, "{health}");
    assert_eq!(health["status"], "ok");
    assert!(health["tiers"]
        .as_array()
        .expect("tiers")
        .iter()
        .any(|t| t["tier"] == "native"));

    let routes = router_routes();
    assert!(routes.len() >= 20, "{routes:?}");
    for (verb, path) in &routes {
        if path == "/health" {
            continue;
        }
        let url = format!("{}{}", d.url, concrete(path));
        // No token.
        let resp = d
            .http
            .request(method(verb), &url)
            .send()
            .await
            .expect("send");
        assert_eq!(
            resp.headers()
                .get("www-authenticate")
                .and_then(|v| v.to_str().ok()),
            Some("Bearer realm=\"symbiont\""),
            "{verb} {path}"
        );
        let status = resp.status().as_u16();
        let body: Value = resp.json().await.expect("json error body");
        assert_error(status, &body, 401, "API_001");
        // A wrong token.
        let (status, body) =
            send(d.http.request(method(verb), &url).bearer_auth(
                "sym_0000000000000000000000000000000000000000000000000000000000000000",
            ))
            .await;
        assert_error(status, &body, 401, "API_001");
        // Not a bearer scheme.
        let (status, body) = send(
            d.http
                .request(method(verb), &url)
                .header("authorization", format!("Basic {}", d.token)),
        )
        .await;
        assert_error(status, &body, 401, "API_001");
    }

    // Revoking the token (offline, while the daemon runs) takes effect on the next request.
    let (code, _, err) = d.cli(&["token", "revoke", "test"]);
    assert_eq!(code, 0, "{err}");
    let (status, body) = d.get("/v1/agents").await;
    assert_error(status, &body, 401, "API_001");
    let (code, out, err) = d.cli(&["token", "create", "--name", "second"]);
    assert_eq!(code, 0, "{err}");
    let (status, body) = send(
        d.http
            .get(format!("{}/v1/agents", d.url))
            .bearer_auth(out.trim()),
    )
    .await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_validates_and_matches_the_router() {
    let d = TestDaemon::start();
    let (status, doc) = d.get("/openapi.json").await;
    assert_eq!(status, 200, "{doc}");
    let text = serde_json::to_string(&doc).expect("json");

    // It parses as an OpenAPI 3.1 document.
    let spec = oas3::from_json(&text).expect("a valid OpenAPI document");
    assert!(spec.openapi.starts_with("3."), "{}", spec.openapi);
    assert_eq!(spec.info.title, "symbiont");

    // Paths and methods are exactly the router's.
    let mut documented = BTreeSet::new();
    for (path, item) in spec.paths.as_ref().expect("paths") {
        for (verb, op) in [
            ("GET", &item.get),
            ("POST", &item.post),
            ("DELETE", &item.delete),
            ("PUT", &item.put),
            ("PATCH", &item.patch),
        ] {
            if let Some(op) = op {
                documented.insert((verb.to_string(), path.clone()));
                assert!(
                    !op.responses.as_ref().is_none_or(|r| r.is_empty()),
                    "{verb} {path} documents no response"
                );
                let secured = op.security.iter().any(|s| s.0.contains_key("bearer"));
                assert_eq!(
                    secured,
                    path != "/health",
                    "{verb} {path}: bearer security must be declared on every route but /health"
                );
            }
        }
    }
    assert_eq!(
        documented,
        router_routes(),
        "OpenAPI paths vs router routes"
    );

    // Every `$ref` resolves to a schema in components.
    let schemas = doc["components"]["schemas"].as_object().expect("schemas");
    let mut refs = Vec::new();
    fn walk(v: &Value, refs: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                if let Some(Value::String(r)) = m.get("$ref") {
                    refs.push(r.clone());
                }
                m.values().for_each(|v| walk(v, refs));
            }
            Value::Array(a) => a.iter().for_each(|v| walk(v, refs)),
            _ => {}
        }
    }
    walk(&doc, &mut refs);
    assert!(refs.len() > 20, "{refs:?}");
    for r in &refs {
        let name = r
            .strip_prefix("#/components/schemas/")
            .unwrap_or_else(|| panic!("unexpected $ref {r}"));
        assert!(schemas.contains_key(name), "dangling $ref {r}");
    }
    assert!(doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer");

    // And the daemon serves each documented operation (no API_005 / API_006).
    for (verb, path) in &documented {
        let mut req = d.req(method(verb), &concrete(path));
        if verb == "POST" {
            req = req.json(&json!({}));
        }
        let (status, body) = send(req).await;
        assert!(
            status != 404 || body["error"]["code"] != "API_005",
            "{verb} {path} documented but not routed: {body}"
        );
        assert_ne!(status, 405, "{verb} {path}: {body}");
    }
    // What is not documented is not served.
    let (status, body) = d.get("/v1/nothing-here").await;
    assert_error(status, &body, 404, "API_005");
    let (status, body) = send(d.req(Method::PUT, "/v1/agents")).await;
    assert_error(status, &body, 405, "API_006");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_routes_create_inspect_control_and_delete_agents() {
    let d = TestDaemon::start();
    let examples = examples_dir();

    // From a definition's text (host files read from base_dir).
    let echo = d
        .create_agent(&echo_definition("echo"), Some(&examples))
        .await;
    assert_eq!(echo["name"], "echo");
    assert_eq!(echo["state"], "running", "{echo}");
    assert_eq!(echo["tier"], "native");
    assert!(echo["sandbox_id"].as_str().is_some(), "{echo}");
    let echo_id = echo["id"].as_str().expect("id").to_string();

    // From a JSON AgentConfig, left ready (start: false), with a client-chosen id.
    let chosen = uuid::Uuid::new_v4().to_string();
    let (status, quiet) = d
        .post(
            "/v1/agents",
            json!({
                "config": {
                    "id": chosen,
                    "name": "quiet",
                    "dsl_source": cat_definition("quiet"),
                    "priority": "High",
                    "metadata": {"team": "ops"}
                },
                "start": false
            }),
        )
        .await;
    assert_eq!(status, 201, "{quiet}");
    assert_eq!(quiet["id"], chosen.as_str());
    assert_eq!(quiet["state"], "ready", "{quiet}");

    // The same id again: AGENT_004.
    let (status, body) = d
        .post(
            "/v1/agents",
            json!({"config": {"id": chosen, "name": "again", "dsl_source": cat_definition("again")}}),
        )
        .await;
    assert_error(status, &body, 409, "AGENT_004");

    // List and get.
    let (status, list) = d.get("/v1/agents").await;
    assert_eq!(status, 200);
    let names: Vec<_> = list["agents"]
        .as_array()
        .expect("agents")
        .iter()
        .map(|a| a["name"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(names, ["echo", "quiet"]);
    let (status, got) = d.get(&format!("/v1/agents/{echo_id}")).await;
    assert_eq!(status, 200);
    assert_eq!(got["id"], echo_id.as_str());
    assert_eq!(got["mode"], "persistent");

    // Live resource usage appears once the monitor samples (interval shortened below).
    // Start, suspend, resume, stop.
    let (status, started) = d.post_empty(&format!("/v1/agents/{chosen}/start")).await;
    assert_eq!(status, 200, "{started}");
    assert_eq!(started["state"], "running");
    let (status, suspended) = d.post_empty(&format!("/v1/agents/{chosen}/suspend")).await;
    assert_eq!(status, 200, "{suspended}");
    assert_eq!(suspended["state"], "suspended");
    // Suspending twice is a state-machine refusal: AGENT_002, 409.
    let (status, body) = d.post_empty(&format!("/v1/agents/{chosen}/suspend")).await;
    assert_error(status, &body, 409, "AGENT_002");
    let (status, resumed) = d.post_empty(&format!("/v1/agents/{chosen}/resume")).await;
    assert_eq!(status, 200, "{resumed}");
    assert_eq!(resumed["state"], "running");
    let (status, stopped) = d.post_empty(&format!("/v1/agents/{chosen}/stop")).await;
    assert_eq!(status, 200, "{stopped}");
    assert_eq!(stopped["state"], "terminated");

    // Logs: the echo agent logs a line when ready.
    let mut found = false;
    for _ in 0..50 {
        let (status, logs) = d.get(&format!("/v1/agents/{echo_id}/logs?tail=10")).await;
        assert_eq!(status, 200, "{logs}");
        found = logs["lines"]
            .as_array()
            .expect("lines")
            .iter()
            .any(|l| l["line"].as_str().is_some_and(|t| t.contains("ready")));
        if found {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(found, "no ready line in the echo agent's logs");
    let (status, body) = d.get(&format!("/v1/agents/{echo_id}/logs?tail=lots")).await;
    assert_error(status, &body, 400, "API_007");

    // Delete.
    let (status, body) = d.delete(&format!("/v1/agents/{chosen}")).await;
    assert_eq!(status, 204, "{body}");
    let (status, body) = d.get(&format!("/v1/agents/{chosen}")).await;
    assert_error(status, &body, 404, "AGENT_001");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_agents_bad_ids_and_bad_bodies_get_json_errors() {
    let d = TestDaemon::start();
    // Unknown agent: 404 AGENT_001 on every agent route.
    for (verb, path) in [
        ("GET", "/v1/agents/{id}"),
        ("DELETE", "/v1/agents/{id}"),
        ("POST", "/v1/agents/{id}/start"),
        ("POST", "/v1/agents/{id}/suspend"),
        ("POST", "/v1/agents/{id}/resume"),
        ("POST", "/v1/agents/{id}/stop"),
        ("GET", "/v1/agents/{id}/logs"),
    ] {
        let (status, body) = send(d.req(method(verb), &concrete(path))).await;
        assert_error(status, &body, 404, "AGENT_001");
        assert!(
            body["error"]["message"]
                .as_str()
                .expect("msg")
                .contains(NIL),
            "{body}"
        );
    }
    let (status, body) = d
        .post("/v1/tasks", json!({"agent_id": NIL, "input": "x"}))
        .await;
    assert_error(status, &body, 404, "AGENT_001");
    let (status, body) = d
        .post(
            "/v1/messages",
            json!({"to": NIL, "topic": "t", "payload": "x"}),
        )
        .await;
    assert_error(status, &body, 404, "AGENT_001");
    // Unknown task: SCHED_002.
    let (status, body) = d.get(&format!("/v1/tasks/{NIL}")).await;
    assert_error(status, &body, 404, "SCHED_002");
    let (status, body) = d.post_empty(&format!("/v1/tasks/{NIL}/cancel")).await;
    assert_error(status, &body, 404, "SCHED_002");

    // Not a UUID: 400 API_007.
    let (status, body) = d.get("/v1/agents/not-a-uuid").await;
    assert_error(status, &body, 400, "API_007");
    assert!(body["error"]["message"]
        .as_str()
        .expect("msg")
        .contains("not-a-uuid"));

    // Invalid JSON: 400 API_002 saying where.
    let (status, body) = send(
        d.req(Method::POST, "/v1/agents")
            .header("content-type", "application/json")
            .body("{\"definition\": \"agent a {\",,}"),
    )
    .await;
    assert_error(status, &body, 400, "API_002");
    let message = body["error"]["message"].as_str().expect("msg");
    assert!(
        message.contains("not valid JSON") && message.contains("line 1 column"),
        "{message}"
    );
    // Valid JSON of the wrong shape: 400 API_002 naming the field.
    let (status, body) = d.post("/v1/tasks", json!({"agent_id": 12})).await;
    assert_error(status, &body, 400, "API_002");
    assert!(
        body["error"]["message"]
            .as_str()
            .expect("msg")
            .contains("agent_id"),
        "{body}"
    );
    let (status, body) = d.post("/v1/tasks", json!({"agnet_id": NIL})).await;
    assert_error(status, &body, 400, "API_002");
    assert!(
        body["error"]["message"]
            .as_str()
            .expect("msg")
            .contains("agnet_id"),
        "{body}"
    );
    // Not declared as JSON: 415 API_004.
    let (status, body) = send(d.req(Method::POST, "/v1/tasks").body("{}")).await;
    assert_error(status, &body, 415, "API_004");

    // Over [api] max_body_bytes (64 KiB here): 413 API_003.
    let big = "x".repeat(200 * 1024);
    let (status, body) = d.post("/v1/agents", json!({ "definition": big })).await;
    assert_error(status, &body, 413, "API_003");
    // Just under the limit is read (and refused for what it says, not its size).
    let (status, body) = d
        .post(
            "/v1/agents",
            json!({ "definition": format!("agent a {{ run [\"/bin/true\"] }} # {}", "x".repeat(60 * 1024)) }),
        )
        .await;
    assert_ne!(status, 413, "{body}");

    // A definition with an error: 422 DSL_001 with the rendered diagnostics.
    let (status, body) = d
        .post(
            "/v1/agents",
            json!({"definition": "agent bad {\n  run [\"/bin/true\"]\n  capabilities [netwrok]\n}\n"}),
        )
        .await;
    assert_error(status, &body, 422, "DSL_001");
    let message = body["error"]["message"].as_str().expect("msg");
    assert!(
        message.contains("netwrok") && message.contains("did you mean"),
        "{message}"
    );
    // Neither a definition nor a dsl_source.
    let (status, body) = d.post("/v1/agents", json!({"config": {"name": "x"}})).await;
    assert_error(status, &body, 400, "API_007");
    // A relative base_dir.
    let (status, body) = d
        .post(
            "/v1/agents",
            json!({"definition": cat_definition("r"), "base_dir": "rel/dir"}),
        )
        .await;
    assert_error(status, &body, 400, "API_007");
    // A definition whose own policy refuses its limits fails initialization: 422
    // AGENT_005 naming the SEC_001 cause; the agent stays, Failed, for inspection.
    let (status, body) = d
        .post(
            "/v1/agents",
            json!({"definition": "agent greedy {\n  run [\"/bin/true\"]\n  limits { memory = 512MiB }\n  policy { deny memory > 256 }\n}\n"}),
        )
        .await;
    assert_error(status, &body, 422, "AGENT_005");
    assert!(
        body["error"]["message"]
            .as_str()
            .expect("msg")
            .contains("SEC_001"),
        "{body}"
    );
    let (_, list) = d.get("/v1/agents").await;
    assert!(
        list["agents"]
            .as_array()
            .expect("agents")
            .iter()
            .any(|a| a["name"] == "greedy" && a["state"] == "failed"),
        "{list}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_routes_submit_wait_list_cancel_and_deduplicate() {
    let d = TestDaemon::start();
    let echo = d
        .create_agent(&echo_definition("echo"), Some(&examples_dir()))
        .await;
    let id = echo["id"].as_str().expect("id").to_string();

    let (status, receipt) = d
        .post(
            "/v1/tasks",
            json!({"agent_id": id, "input": "hello", "priority": "high", "timeout": "20s"}),
        )
        .await;
    assert_eq!(status, 202, "{receipt}");
    assert_eq!(receipt["duplicate"], false);
    let task_id = receipt["task_id"].as_str().expect("task id").to_string();
    let (status, task) = d.get(&format!("/v1/tasks/{task_id}?wait=30s")).await;
    assert_eq!(status, 200, "{task}");
    assert_eq!(task["status"], "completed", "{task}\n{}", d.logs());
    assert_eq!(task["priority"], "high");
    assert_eq!(task["input"], "hello");
    assert_eq!(task["timeout_ms"], 20_000);
    // The echo agent answers a task with its input upper-cased.
    assert_eq!(task["output"], "HELLO", "{task}");

    // Binary input.
    let (status, receipt) = d
        .post(
            "/v1/tasks",
            json!({"agent_id": id, "input_base64": "AAEC/w==", "idempotency_key": "k1"}),
        )
        .await;
    assert_eq!(status, 202, "{receipt}");
    let first = receipt["task_id"].clone();
    // The same key again: the first task, 200, duplicate.
    let (status, again) = d
        .post(
            "/v1/tasks",
            json!({"agent_id": id, "input": "other", "idempotency_key": "k1"}),
        )
        .await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["duplicate"], true);
    assert_eq!(again["task_id"], first);
    let (_, bin) = d
        .get(&format!("/v1/tasks/{}", first.as_str().expect("id")))
        .await;
    assert_eq!(bin["input_base64"], "AAEC/w==");
    assert!(bin["input"].is_null(), "{bin}");

    // A delayed task can be cancelled; cancelling again is SCHED_008.
    let (status, receipt) = d
        .post(
            "/v1/tasks",
            json!({"agent_id": id, "input": "later", "delay": "60s"}),
        )
        .await;
    assert_eq!(status, 202, "{receipt}");
    let later = receipt["task_id"].as_str().expect("id").to_string();
    let (status, cancelled) = d.post_empty(&format!("/v1/tasks/{later}/cancel")).await;
    assert_eq!(status, 200, "{cancelled}");
    assert_eq!(cancelled["status"], "cancelled");
    let (status, body) = d.post_empty(&format!("/v1/tasks/{later}/cancel")).await;
    assert_error(status, &body, 409, "SCHED_008");

    // List, filtered.
    let (status, list) = d.get(&format!("/v1/tasks?agent={id}")).await;
    assert_eq!(status, 200);
    let ids: Vec<_> = list["tasks"]
        .as_array()
        .expect("tasks")
        .iter()
        .map(|t| t["id"].as_str().unwrap_or_default().to_string())
        .collect();
    assert!(ids.contains(&task_id) && ids.contains(&later), "{list}");
    let (_, cancelled_only) = d.get("/v1/tasks?status=cancelled").await;
    assert_eq!(cancelled_only["tasks"].as_array().expect("tasks").len(), 1);
    let (status, body) = d.get("/v1/tasks?agent=nope").await;
    assert_error(status, &body, 400, "API_007");

    // Field validation.
    let (status, body) = d
        .post("/v1/tasks", json!({"agent_id": id, "priority": "urgent"}))
        .await;
    assert_error(status, &body, 400, "API_007");
    let (status, body) = d
        .post("/v1/tasks", json!({"agent_id": id, "timeout": "soon"}))
        .await;
    assert_error(status, &body, 400, "API_007");
    let (status, body) = d.post("/v1/tasks", json!({"input": "x"})).await;
    assert_error(status, &body, 400, "API_007");
    let (status, body) = d
        .post(
            "/v1/tasks",
            json!({"agent_id": id, "input": "a", "input_base64": "YQ=="}),
        )
        .await;
    assert_error(status, &body, 400, "API_007");
    // A terminated agent takes no tasks: SCHED_001, 409.
    let (status, _) = d.post_empty(&format!("/v1/agents/{id}/stop")).await;
    assert_eq!(status, 200);
    let (status, body) = d.post("/v1/tasks", json!({"agent_id": id})).await;
    assert_error(status, &body, 409, "SCHED_001");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_routes_send_publish_and_show_dead_letters() {
    let d = TestDaemon::start();
    let echo = d
        .create_agent(&echo_definition("echo"), Some(&examples_dir()))
        .await;
    let echo_id = echo["id"].as_str().expect("id").to_string();
    // An agent whose policy allows no receive at all (default deny).
    let closed = d.create_agent(&cat_definition("closed"), None).await;
    let closed_id = closed["id"].as_str().expect("id").to_string();

    let (status, receipt) = d
        .post(
            "/v1/messages",
            json!({"to": echo_id, "topic": "chat", "payload": "hi", "priority": "high", "ttl": "30s"}),
        )
        .await;
    assert_eq!(status, 202, "{receipt}");
    assert!(receipt["message_id"].as_str().is_some());
    // Publishing (no `to`) is accepted too.
    let (status, receipt) = d
        .post(
            "/v1/messages",
            json!({"topic": "broadcast", "payload_base64": "aGk="}),
        )
        .await;
    assert_eq!(status, 202, "{receipt}");

    // Refused by the recipient's policy: SEC_001, 403, and a dead letter.
    let (status, body) = d
        .post(
            "/v1/messages",
            json!({"to": closed_id, "topic": "chat", "payload": "no"}),
        )
        .await;
    assert_error(status, &body, 403, "SEC_001");
    let (status, letters) = d.get("/v1/messages/dead-letters").await;
    assert_eq!(status, 200, "{letters}");
    let letters = letters["dead_letters"].as_array().expect("list");
    assert!(
        letters
            .iter()
            .any(|l| l["to"] == closed_id.as_str() && l["topic"] == "chat" && l["size"] == 2),
        "{letters:?}"
    );
    // Bad fields.
    let (status, body) = d
        .post(
            "/v1/messages",
            json!({"to": echo_id, "topic": "", "payload": "x"}),
        )
        .await;
    assert_error(status, &body, 400, "API_007");
    let (status, body) = d
        .post(
            "/v1/messages",
            json!({"to": echo_id, "topic": "t", "payload_base64": "%%%"}),
        )
        .await;
    assert_error(status, &body, 400, "API_007");
    let (status, body) = d.post("/v1/messages", json!({"to": echo_id})).await;
    assert_error(status, &body, 400, "API_002");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_routes_query_by_agent_type_and_time_and_verify() {
    let d = TestDaemon::start();
    let t0 = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
    let a = d.create_agent(&cat_definition("a"), None).await;
    let b = d.create_agent(&cat_definition("b"), None).await;
    let a_id = a["id"].as_str().expect("id").to_string();
    let b_id = b["id"].as_str().expect("id").to_string();
    let (status, _) = d.post_empty(&format!("/v1/agents/{a_id}/stop")).await;
    assert_eq!(status, 200);

    // By agent: only a's events, and they include its creation and its stop.
    let (status, events) = d.get(&format!("/v1/audit?agent={a_id}")).await;
    assert_eq!(status, 200, "{events}");
    let events = events["events"].as_array().expect("events").clone();
    assert!(!events.is_empty());
    assert!(
        events.iter().all(|e| e["agent"] == a_id.as_str()),
        "{events:?}"
    );
    assert!(
        events.iter().any(|e| e["type"] == "AgentCreated"),
        "{events:?}"
    );
    assert!(
        events
            .iter()
            .any(|e| e["type"] == "StateChanged" && e["metadata"]["to"] == "Terminated"),
        "{events:?}"
    );
    // Sequence numbers increase.
    let seqs: Vec<u64> = events
        .iter()
        .map(|e| e["seq"].as_u64().expect("seq"))
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]));

    // By type.
    let (_, created) = d.get("/v1/audit?type=AgentCreated").await;
    let created = created["events"].as_array().expect("events").clone();
    let agents: BTreeSet<_> = created
        .iter()
        .map(|e| e["agent"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(agents, BTreeSet::from([a_id.clone(), b_id.clone()]));
    // By time: nothing before t0 in [.., t0), everything of a after.
    let (_, before) = d.get(&format!("/v1/audit?agent={a_id}&until={t0}")).await;
    assert_eq!(before["events"].as_array().expect("events").len(), 0);
    let (_, after) = d.get(&format!("/v1/audit?agent={a_id}&since={t0}")).await;
    assert_eq!(
        after["events"].as_array().expect("events").len(),
        events.len()
    );
    let (_, recent) = d.get(&format!("/v1/audit?agent={a_id}&since=1h")).await;
    assert_eq!(
        recent["events"].as_array().expect("events").len(),
        events.len()
    );
    // Limit and tail.
    let (_, first) = d.get("/v1/audit?limit=2").await;
    let first = first["events"].as_array().expect("events").clone();
    assert_eq!(first.len(), 2);
    let (_, last) = d.get("/v1/audit?tail=3").await;
    let last = last["events"].as_array().expect("events").clone();
    assert_eq!(last.len(), 3);
    assert!(last[0]["seq"].as_u64() > first[1]["seq"].as_u64());
    let (_, last_of_a) = d.get(&format!("/v1/audit?agent={a_id}&tail=1")).await;
    assert_eq!(
        last_of_a["events"][0]["seq"],
        events.last().expect("last")["seq"]
    );
    // Bad parameters.
    let (status, body) = d.get("/v1/audit?type=NoSuchType").await;
    assert_error(status, &body, 400, "API_007");
    let (status, body) = d.get("/v1/audit?since=yesterday-ish").await;
    assert_error(status, &body, 400, "API_007");
    let (status, body) = d.get("/v1/audit?limit=-1").await;
    assert_error(status, &body, 400, "API_007");

    // Verify.
    let (status, report) = d.get("/v1/audit/verify").await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["ok"], true, "{report}");
    assert!(report["events"].as_u64().expect("events") >= events.len() as u64);
    assert!(report["report"].as_str().expect("text").starts_with("OK"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_prometheus_text_with_agents_tasks_messages_usage_and_audit() {
    let d = TestDaemon::start_with(common::Settings {
        extra: "[resource]\nmonitoring_interval = \"200ms\"\n".into(),
        ..Default::default()
    });
    let echo = d
        .create_agent(&echo_definition("echo"), Some(&examples_dir()))
        .await;
    let id = echo["id"].as_str().expect("id").to_string();
    let ready = d
        .post(
            "/v1/agents",
            json!({"definition": cat_definition("idle"), "start": false}),
        )
        .await;
    assert_eq!(ready.0, 201, "{}", ready.1);
    let (_, receipt) = d
        .post("/v1/tasks", json!({"agent_id": id, "input": "x"}))
        .await;
    let task = receipt["task_id"].as_str().expect("id").to_string();
    let (_, done) = d.get(&format!("/v1/tasks/{task}?wait=30s")).await;
    assert_eq!(done["status"], "completed", "{done}");
    let (status, _) = d
        .post(
            "/v1/messages",
            json!({"to": id, "topic": "chat", "payload": "hi"}),
        )
        .await;
    assert_eq!(status, 202);

    // Live usage shows in the agent's status once sampled.
    let mut sampled = Value::Null;
    for _ in 0..50 {
        let (_, agent) = d.get(&format!("/v1/agents/{id}")).await;
        if agent["usage"]["sampled_at"].is_string()
            && agent["usage"]["memory_bytes"].as_u64() > Some(0)
        {
            sampled = agent;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        sampled["usage"]["pids"].as_u64() >= Some(1),
        "no usage sampled: {sampled}"
    );
    assert_eq!(sampled["usage"]["memory_limit_bytes"], 64 * 1024 * 1024);

    let resp = d
        .req(Method::GET, "/metrics")
        .send()
        .await
        .expect("metrics");
    assert_eq!(resp.status(), 200);
    let ctype = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(ctype.starts_with("text/plain; version=0.0.4"), "{ctype}");
    let text = resp.text().await.expect("text");
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("valid exposition format");
    let value = |name: &str, labels: &[(&str, &str)]| -> f64 {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => f64::NAN,
            })
            .unwrap_or_else(|| panic!("no sample {name}{labels:?} in\n{text}"))
    };
    assert_eq!(value("symbiont_up", &[]), 1.0);
    assert_eq!(value("symbiont_agents", &[("state", "running")]), 1.0);
    assert_eq!(value("symbiont_agents", &[("state", "ready")]), 1.0);
    assert_eq!(value("symbiont_agents", &[("state", "failed")]), 0.0);
    assert!(value("symbiont_tasks_finished_total", &[("status", "completed")]) >= 1.0);
    assert!(value("symbiont_messages_sent_total", &[]) >= 1.0);
    assert!(value("symbiont_audit_events_appended_total", &[]) >= 5.0);
    assert!(value("symbiont_audit_events_durable_total", &[]) >= 5.0);
    assert!(
        value(
            "symbiont_agent_memory_bytes",
            &[("agent", &id), ("name", "echo")]
        ) > 0.0
    );
    assert!(value("symbiont_agent_pids", &[("agent", &id)]) >= 1.0);
    assert!(value("symbiont_process_resident_memory_bytes", &[]) > 1e6);
    assert!(
        value(
            "symbiont_http_requests_total",
            &[
                ("method", "POST"),
                ("route", "/v1/tasks"),
                ("status", "202")
            ]
        ) >= 1.0
    );
    assert!(scrape
        .samples
        .iter()
        .any(|s| s.metric == "symbiont_http_request_duration_seconds"));
}
