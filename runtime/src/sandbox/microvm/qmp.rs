//! A minimal QMP (QEMU Machine Protocol) client: connect to the VM's QMP socket, negotiate
//! capabilities, run one command and return its `return` value. Used for `stop`/`cont`
//! (pause/resume), `query-blockstats` (disk counters) and `block_set_io_throttle`.

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::sandbox::SandboxError;

/// Runs `command` with `arguments` on the QMP socket at `path`.
pub async fn execute(
    path: &Path,
    command: &str,
    arguments: Option<Value>,
) -> Result<Value, SandboxError> {
    let op = format!("qmp {command}");
    let run = async {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|e| SandboxError::op(&op, format!("{}: {e}", path.display())))?;
        let (read, mut write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        // Greeting.
        next_reply(&mut lines, &op).await?;
        write
            .write_all(b"{\"execute\":\"qmp_capabilities\"}\n")
            .await
            .map_err(|e| SandboxError::op(&op, e))?;
        next_reply(&mut lines, &op).await?;
        let mut req = json!({ "execute": command });
        if let Some(args) = arguments {
            req["arguments"] = args;
        }
        let mut text = req.to_string();
        text.push('\n');
        write
            .write_all(text.as_bytes())
            .await
            .map_err(|e| SandboxError::op(&op, e))?;
        let reply = next_reply(&mut lines, &op).await?;
        if let Some(err) = reply.get("error") {
            return Err(SandboxError::op(&op, err.to_string()));
        }
        Ok(reply.get("return").cloned().unwrap_or(Value::Null))
    };
    tokio::time::timeout(Duration::from_secs(5), run)
        .await
        .map_err(|_| SandboxError::op(format!("qmp {command}"), "timed out"))?
}

/// The next line that is not an asynchronous event.
async fn next_reply(
    lines: &mut tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
    op: &str,
) -> Result<Value, SandboxError> {
    loop {
        let line = lines
            .next_line()
            .await
            .map_err(|e| SandboxError::op(op, e))?
            .ok_or_else(|| SandboxError::op(op, "QMP connection closed"))?;
        let v: Value = serde_json::from_str(&line).map_err(|e| SandboxError::op(op, e))?;
        if v.get("event").is_none() {
            return Ok(v);
        }
    }
}

/// Sums `rd_bytes` and `wr_bytes` over a `query-blockstats` answer.
pub fn blockstats_bytes(ret: &Value) -> (u64, u64) {
    let mut rd = 0;
    let mut wr = 0;
    if let Some(devs) = ret.as_array() {
        for d in devs {
            rd += d["stats"]["rd_bytes"].as_u64().unwrap_or(0);
            wr += d["stats"]["wr_bytes"].as_u64().unwrap_or(0);
        }
    }
    (rd, wr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blockstats_are_summed() {
        let ret = json!([
            {"device": "", "qdev": "ws", "stats": {"rd_bytes": 10, "wr_bytes": 20}},
            {"device": "x", "stats": {"rd_bytes": 1, "wr_bytes": 2}}
        ]);
        assert_eq!(blockstats_bytes(&ret), (11, 22));
        assert_eq!(blockstats_bytes(&Value::Null), (0, 0));
    }

    #[tokio::test]
    async fn talks_to_a_qmp_peer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("qmp.sock");
        let listener = tokio::net::UnixListener::bind(&path).expect("bind");
        let server = tokio::spawn(async move {
            let (s, _) = listener.accept().await.expect("accept");
            let (r, mut w) = s.into_split();
            let mut lines = BufReader::new(r).lines();
            w.write_all(b"{\"QMP\":{\"version\":{}}}\n")
                .await
                .expect("greet");
            let caps = lines.next_line().await.expect("read").expect("line");
            assert!(caps.contains("qmp_capabilities"));
            w.write_all(b"{\"return\":{}}\n").await.expect("w");
            let cmd = lines.next_line().await.expect("read").expect("line");
            assert!(cmd.contains("\"stop\""));
            w.write_all(b"{\"event\":\"STOP\"}\n{\"return\":{\"ok\":1}}\n")
                .await
                .expect("w");
        });
        let ret = execute(&path, "stop", None).await.expect("executes");
        assert_eq!(ret["ok"], 1);
        server.await.expect("server");
    }
}
