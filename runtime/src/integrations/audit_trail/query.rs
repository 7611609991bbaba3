//! Reading the log back: filter by agent, event type and time range, the last N events, and
//! the JSON-lines export format.
//!
//! Queries read the segments as they are on disk and do not verify them (run
//! [`super::verify_dir`] for that); lines that are not valid events (checkpoints, a torn
//! tail) are skipped.

use std::path::Path;
use std::time::SystemTime;

use serde::Serialize;

use super::format::{list_segments, segment_file_name, Kind, LineView, Lines, SEGMENT_HEADER_LEN};
use super::{AuditError, AuditEvent, AuditEventType};
use crate::types::AgentId;

/// Which events to return. Every set field must match; `since` is inclusive, `until`
/// exclusive (both compare the event's own timestamp).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AuditQuery {
    /// Only events about this agent.
    pub agent: Option<AgentId>,
    /// Only events of this type.
    pub event_type: Option<AuditEventType>,
    /// Only events at or after this time.
    pub since: Option<SystemTime>,
    /// Only events before this time.
    pub until: Option<SystemTime>,
    /// At most this many (the oldest first).
    pub limit: Option<usize>,
}

impl AuditQuery {
    fn matches_view(&self, view: &LineView<'_>) -> bool {
        if view.kind != Kind::Event {
            return false;
        }
        if let Some(agent) = &self.agent {
            if view.agent.as_ref() != Some(agent) {
                return false;
            }
        }
        if let Some(t) = &self.event_type {
            if !view.is_type(t) {
                return false;
            }
        }
        let ts = view.ts;
        if self
            .since
            .is_some_and(|s| ts < super::format::unix_nanos(s))
        {
            return false;
        }
        if self
            .until
            .is_some_and(|u| ts >= super::format::unix_nanos(u))
        {
            return false;
        }
        true
    }
}

/// One event as stored, with its place in the log.
#[derive(Clone, Debug, PartialEq)]
pub struct AuditRecord {
    /// Its sequence number.
    pub seq: u64,
    /// The segment file holding it.
    pub segment: String,
    /// The event.
    pub event: AuditEvent,
}

#[derive(Serialize)]
struct ExportLine<'a> {
    seq: u64,
    segment: &'a str,
    id: String,
    timestamp: String,
    #[serde(rename = "type")]
    event_type: String,
    agent: Option<String>,
    details: &'a str,
    metadata: std::collections::BTreeMap<&'a str, &'a str>,
}

impl AuditRecord {
    /// The record as one JSON object (the export format: `seq`, `segment`, `id`,
    /// `timestamp` in RFC 3339, `type`, `agent` or null, `details`, `metadata`), without a
    /// trailing newline.
    pub fn to_json_line(&self) -> String {
        let line = ExportLine {
            seq: self.seq,
            segment: &self.segment,
            id: self.event.id.to_string(),
            timestamp: humantime::format_rfc3339_nanos(self.event.timestamp).to_string(),
            event_type: self.event.event_type.to_string(),
            agent: self.event.agent_id.map(|a| a.to_string()),
            details: &self.event.details,
            metadata: self
                .event
                .metadata
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect(),
        };
        serde_json::to_string(&line).unwrap_or_default()
    }
}

fn read_segment(path: &Path) -> Result<Vec<u8>, AuditError> {
    std::fs::read(path).map_err(|e| AuditError::Read(format!("{}: {e}", path.display())))
}

fn segments(dir: &Path) -> Result<Vec<(u64, std::path::PathBuf)>, AuditError> {
    list_segments(dir).map_err(|e| AuditError::Read(format!("{}: {e}", dir.display())))
}

/// Visits every event matching `query`, oldest first, until `visit` returns `false`.
pub fn scan_dir(
    dir: &Path,
    query: &AuditQuery,
    mut visit: impl FnMut(AuditRecord) -> bool,
) -> Result<(), AuditError> {
    let mut left = query.limit.unwrap_or(usize::MAX);
    for (first, path) in segments(dir)? {
        if left == 0 {
            break;
        }
        let data = read_segment(&path)?;
        let name = segment_file_name(first);
        let body = data.get(SEGMENT_HEADER_LEN as usize..).unwrap_or_default();
        for (_, line, complete) in Lines::new(body, SEGMENT_HEADER_LEN) {
            if !complete {
                break;
            }
            let Ok(view) = LineView::parse(line) else {
                continue;
            };
            if !query.matches_view(&view) {
                continue;
            }
            let Some(event) = view.to_event() else {
                continue;
            };
            left -= 1;
            let go_on = visit(AuditRecord {
                seq: view.seq,
                segment: name.clone(),
                event,
            });
            if !go_on || left == 0 {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// Every event matching `query`, oldest first.
pub fn query_dir(dir: &Path, query: &AuditQuery) -> Result<Vec<AuditRecord>, AuditError> {
    let mut out = Vec::new();
    scan_dir(dir, query, |r| {
        out.push(r);
        true
    })?;
    Ok(out)
}

/// The last `n` events (oldest first), reading segments from the newest backwards.
pub fn tail_dir(dir: &Path, n: usize) -> Result<Vec<AuditRecord>, AuditError> {
    let mut newest_first: Vec<AuditRecord> = Vec::new();
    if n == 0 {
        return Ok(newest_first);
    }
    for (first, path) in segments(dir)?.into_iter().rev() {
        let data = read_segment(&path)?;
        let name = segment_file_name(first);
        let body = data.get(SEGMENT_HEADER_LEN as usize..).unwrap_or_default();
        let mut here: Vec<AuditRecord> = Vec::new();
        for (_, line, complete) in Lines::new(body, SEGMENT_HEADER_LEN) {
            if !complete {
                break;
            }
            let Some((seq, event)) = LineView::parse(line)
                .ok()
                .and_then(|v| Some((v.seq, v.to_event()?)))
            else {
                continue;
            };
            here.push(AuditRecord {
                seq,
                segment: name.clone(),
                event,
            });
        }
        newest_first.extend(here.into_iter().rev().take(n - newest_first.len()));
        if newest_first.len() >= n {
            break;
        }
    }
    newest_first.reverse();
    Ok(newest_first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_of_a_missing_directory_fail_with_a_read_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = query_dir(&dir.path().join("none"), &AuditQuery::default()).expect_err("missing");
        assert_eq!(err.code(), "AUDIT_005");
    }
}
