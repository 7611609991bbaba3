//! The bytes on disk: segment names and headers, entry lines, head slots, and the exact
//! messages that are hashed and signed. `docs/audit.md` specifies the same in prose for
//! third-party verifiers; the two must always agree.
//!
//! A segment file `seg-<first seq, 20 digits>.log` is a 1024-byte header (two 512-byte head
//! slots) followed by entry lines. Each line is one JSON object ending in `\n`; the entry's
//! hash is the SHA-256 of the line's bytes without the `\n`, and the next entry's `prev` is
//! that hash in lower-case hex.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{AuditEvent, AuditEventType};
use crate::types::{AgentId, AuditId};

/// Version of the on-disk format (written into every head slot as `v`).
pub const AUDIT_FORMAT_VERSION: u32 = 1;
/// Bytes before the first entry line of a segment (two head slots).
pub const SEGMENT_HEADER_LEN: u64 = 1024;
/// Bytes of one head slot (JSON padded with spaces, last byte `\n`).
pub(crate) const SLOT_LEN: usize = 512;

/// A SHA-256 digest.
pub(crate) type Hash = [u8; 32];
/// The `prev` of the very first entry (seq 0).
pub(crate) const ZERO_HASH: Hash = [0; 32];

const CHECKPOINT_DOMAIN: &[u8] = b"symbiont-audit/checkpoint/v1\0";
const HEAD_DOMAIN: &[u8] = b"symbiont-audit/head/v1\0";

/// The file name of the segment whose first entry is `first_seq`: `seg-<20 digits>.log`.
pub fn segment_file_name(first_seq: u64) -> String {
    format!("seg-{first_seq:020}.log")
}

/// The first sequence number encoded in a segment file name, if it is one.
pub(crate) fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("seg-")?.strip_suffix(".log")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The segments in `dir`, ordered by first sequence number.
pub(crate) fn list_segments(dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let mut segments = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        if let Some(first) = name.to_str().and_then(parse_segment_name) {
            segments.push((first, entry.path()));
        }
    }
    segments.sort_by_key(|(first, _)| *first);
    Ok(segments)
}

/// SHA-256 of one entry line (without its `\n`).
pub(crate) fn hash_line(line: &[u8]) -> Hash {
    Sha256::digest(line).into()
}

/// Nanoseconds since the Unix epoch (0 for times before it, saturating far in the future).
pub(crate) fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The inverse of [`unix_nanos`].
pub(crate) fn from_unix_nanos(ns: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(ns)
}

/// The message a checkpoint's signature covers:
/// `"symbiont-audit/checkpoint/v1\0" || u64be(seq) || prev (32 bytes) || u64be(ts)`.
pub(crate) fn checkpoint_message(seq: u64, prev: &Hash, ts: u64) -> Vec<u8> {
    let mut m = Vec::with_capacity(CHECKPOINT_DOMAIN.len() + 48);
    m.extend_from_slice(CHECKPOINT_DOMAIN);
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(prev);
    m.extend_from_slice(&ts.to_be_bytes());
    m
}

/// Lower-case hex of a hash.
pub(crate) fn hex_hash(h: &Hash) -> String {
    hex::encode(h)
}

/// Parses 64 hex digits into a hash.
pub(crate) fn parse_hash(s: &str) -> Option<Hash> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

/// Parses 128 hex digits into a signature.
pub(crate) fn parse_sig(s: &str) -> Option<[u8; 64]> {
    let mut out = [0u8; 64];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

/// What an entry line is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Kind {
    /// An audit event.
    Event,
    /// A signed checkpoint.
    Checkpoint,
}

#[derive(Serialize)]
struct EventLineOut<'a> {
    seq: u64,
    prev: &'a str,
    ts: u64,
    kind: Kind,
    id: &'a AuditId,
    #[serde(rename = "type")]
    event_type: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    agent: Option<&'a AgentId>,
    details: &'a str,
    #[serde(skip_serializing_if = "HashMap::is_empty")]
    meta: &'a HashMap<String, String>,
}

#[derive(Serialize)]
struct CheckpointLineOut<'a> {
    seq: u64,
    prev: &'a str,
    ts: u64,
    kind: Kind,
    reason: &'a str,
    key: &'a str,
    sig: &'a str,
}

/// Appends the line (with its `\n`) of event entry `seq` to `buf`; returns the line's range.
pub(crate) fn write_event_line(
    buf: &mut Vec<u8>,
    seq: u64,
    prev: &Hash,
    event: &AuditEvent,
) -> std::ops::Range<usize> {
    let start = buf.len();
    let mut prev_hex = [0u8; 64];
    // Encoding 32 bytes into a 64-byte buffer cannot fail.
    let _ = hex::encode_to_slice(prev, &mut prev_hex);
    let event_type = event.event_type.name();
    let line = EventLineOut {
        seq,
        prev: std::str::from_utf8(&prev_hex).unwrap_or_default(),
        ts: unix_nanos(event.timestamp),
        kind: Kind::Event,
        id: &event.id,
        event_type: &event_type,
        agent: event.agent_id.as_ref(),
        details: &event.details,
        meta: &event.metadata,
    };
    // Serializing plain strings, numbers and maps of strings into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *buf, &line);
    let end = buf.len();
    buf.push(b'\n');
    start..end
}

/// Appends the line of checkpoint `seq` (already signed) to `buf`; returns the line's range.
pub(crate) fn write_checkpoint_line(
    buf: &mut Vec<u8>,
    seq: u64,
    prev: &Hash,
    ts: u64,
    reason: &str,
    key: &[u8; 32],
    sig: &[u8; 64],
) -> std::ops::Range<usize> {
    let start = buf.len();
    let line = CheckpointLineOut {
        seq,
        prev: &hex_hash(prev),
        ts,
        kind: Kind::Checkpoint,
        reason,
        key: &hex::encode(key),
        sig: &hex::encode(sig),
    };
    let _ = serde_json::to_writer(&mut *buf, &line);
    let end = buf.len();
    buf.push(b'\n');
    start..end
}

/// One entry line as read back (borrowing from the segment's bytes where it can).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LineView<'a> {
    pub seq: u64,
    #[serde(borrow)]
    pub prev: &'a str,
    pub ts: u64,
    pub kind: Kind,
    #[serde(default)]
    pub id: Option<AuditId>,
    #[serde(default, rename = "type", borrow)]
    pub event_type: Option<Cow<'a, str>>,
    #[serde(default)]
    pub agent: Option<AgentId>,
    #[serde(default, borrow)]
    pub details: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub meta: Option<BTreeMap<Cow<'a, str>, Cow<'a, str>>>,
    #[serde(default, borrow)]
    pub reason: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub key: Option<&'a str>,
    #[serde(default, borrow)]
    pub sig: Option<&'a str>,
}

impl<'a> LineView<'a> {
    /// Parses one line (without its `\n`).
    pub fn parse(line: &'a [u8]) -> Result<Self, String> {
        let view: LineView<'a> = serde_json::from_slice(line).map_err(|e| e.to_string())?;
        match view.kind {
            Kind::Event => {
                if view.id.is_none() || view.event_type.is_none() || view.details.is_none() {
                    return Err("an event needs `id`, `type` and `details`".into());
                }
                if view.reason.is_some() || view.key.is_some() || view.sig.is_some() {
                    return Err("an event cannot carry checkpoint fields".into());
                }
            }
            Kind::Checkpoint => {
                if view.key.is_none() || view.sig.is_none() {
                    return Err("a checkpoint needs `key` and `sig`".into());
                }
                if view.id.is_some() || view.event_type.is_some() || view.details.is_some() {
                    return Err("a checkpoint cannot carry event fields".into());
                }
            }
        }
        Ok(view)
    }

    /// The decoded `prev`.
    pub fn prev_hash(&self) -> Option<Hash> {
        parse_hash(self.prev)
    }

    /// The event this line records (`None` for checkpoints or an unknown type name).
    pub fn to_event(&self) -> Option<AuditEvent> {
        if self.kind != Kind::Event {
            return None;
        }
        Some(AuditEvent {
            id: self.id?,
            timestamp: from_unix_nanos(self.ts),
            event_type: self.event_type.as_deref()?.parse().ok()?,
            agent_id: self.agent,
            details: self.details.as_deref().unwrap_or_default().to_string(),
            metadata: self
                .meta
                .as_ref()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect::<HashMap<_, _>>()
                })
                .unwrap_or_default(),
        })
    }

    /// Whether this is an event of `event_type`.
    pub fn is_type(&self, event_type: &AuditEventType) -> bool {
        self.kind == Kind::Event && self.event_type.as_deref() == Some(&*event_type.name())
    }

    /// A metadata value.
    pub fn meta_value(&self, key: &str) -> Option<&str> {
        self.meta.as_ref()?.get(key).map(|v| v.as_ref())
    }
}

/// The signed head of one segment: "the entry `seq` of this segment has hash `hash`", plus
/// `sealed` once the segment is closed and a successor exists.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Head {
    /// Monotonic within the segment; the valid slot with the highest `gen` is current.
    pub gen: u64,
    /// Which slot (0 or 1) it was written to: always `gen % 2`.
    pub slot: u8,
    /// The last entry covered.
    pub seq: u64,
    /// That entry's hash.
    pub hash: Hash,
    /// When the head was signed (ns since the epoch).
    pub ts: u64,
    /// The segment is complete and a successor segment exists.
    pub sealed: bool,
    /// The signer's public key.
    pub key: [u8; 32],
    /// Ed25519 signature over [`Head::message`].
    pub sig: [u8; 64],
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct HeadJson<'a> {
    v: u32,
    kind: &'a str,
    gen: u64,
    slot: u8,
    seq: u64,
    hash: &'a str,
    ts: u64,
    sealed: bool,
    key: &'a str,
    sig: &'a str,
}

/// What a head slot holds.
#[derive(Debug)]
pub(crate) enum SlotState {
    /// Never written (spaces, newlines or zeros).
    Blank,
    /// A well-formed head (signature not yet checked).
    Head(Head),
    /// Something that is neither.
    Invalid(String),
}

impl Head {
    /// The signed message: `"symbiont-audit/head/v1\0" || u64be(gen) || u8(slot) ||
    /// u64be(seq) || hash (32 bytes) || u64be(ts) || u8(sealed)`.
    pub fn message(gen: u64, slot: u8, seq: u64, hash: &Hash, ts: u64, sealed: bool) -> Vec<u8> {
        let mut m = Vec::with_capacity(HEAD_DOMAIN.len() + 58);
        m.extend_from_slice(HEAD_DOMAIN);
        m.extend_from_slice(&gen.to_be_bytes());
        m.push(slot);
        m.extend_from_slice(&seq.to_be_bytes());
        m.extend_from_slice(hash);
        m.extend_from_slice(&ts.to_be_bytes());
        m.push(u8::from(sealed));
        m
    }

    /// This head's signed message.
    pub fn own_message(&self) -> Vec<u8> {
        Self::message(
            self.gen,
            self.slot,
            self.seq,
            &self.hash,
            self.ts,
            self.sealed,
        )
    }

    /// The 512 bytes of its slot.
    pub fn encode(&self) -> [u8; SLOT_LEN] {
        let json = HeadJson {
            v: AUDIT_FORMAT_VERSION,
            kind: "head",
            gen: self.gen,
            slot: self.slot,
            seq: self.seq,
            hash: &hex_hash(&self.hash),
            ts: self.ts,
            sealed: self.sealed,
            key: &hex::encode(self.key),
            sig: &hex::encode(self.sig),
        };
        let mut out = [b' '; SLOT_LEN];
        out[SLOT_LEN - 1] = b'\n';
        // A head is about 400 bytes of JSON: it always fits.
        let text = serde_json::to_vec(&json).unwrap_or_default();
        let n = text.len().min(SLOT_LEN - 1);
        out[..n].copy_from_slice(&text[..n]);
        out
    }

    /// Reads one slot.
    pub fn decode(bytes: &[u8]) -> SlotState {
        if bytes.iter().all(|b| matches!(b, b' ' | b'\n' | 0)) {
            return SlotState::Blank;
        }
        if bytes.len() != SLOT_LEN || bytes[SLOT_LEN - 1] != b'\n' {
            return SlotState::Invalid("head slot is not 512 bytes ending in a newline".into());
        }
        let text = &bytes[..SLOT_LEN - 1];
        let end = text
            .iter()
            .rposition(|b| *b != b' ')
            .map(|i| i + 1)
            .unwrap_or(0);
        let json: HeadJson<'_> = match serde_json::from_slice(&text[..end]) {
            Ok(j) => j,
            Err(e) => return SlotState::Invalid(format!("head slot is not valid JSON: {e}")),
        };
        if json.v != AUDIT_FORMAT_VERSION || json.kind != "head" {
            return SlotState::Invalid(format!(
                "head slot has version {} kind `{}` (expected {AUDIT_FORMAT_VERSION}, `head`)",
                json.v, json.kind
            ));
        }
        let (Some(hash), Some(sig)) = (parse_hash(json.hash), parse_sig(json.sig)) else {
            return SlotState::Invalid("head slot has a malformed hash or signature".into());
        };
        let Some(key) = parse_hash(json.key) else {
            return SlotState::Invalid("head slot has a malformed key".into());
        };
        SlotState::Head(Head {
            gen: json.gen,
            slot: json.slot,
            seq: json.seq,
            hash,
            ts: json.ts,
            sealed: json.sealed,
            key,
            sig,
        })
    }
}

/// The 1024-byte header of a new segment: both slots blank.
pub(crate) fn blank_header() -> [u8; SEGMENT_HEADER_LEN as usize] {
    let mut out = [b' '; SEGMENT_HEADER_LEN as usize];
    out[SLOT_LEN - 1] = b'\n';
    out[2 * SLOT_LEN - 1] = b'\n';
    out
}

/// Iterates the lines of a segment's body: `(offset of the line in the file, line without
/// its newline, whether it ended in a newline)`.
pub(crate) struct Lines<'a> {
    data: &'a [u8],
    pos: usize,
    base: u64,
}

impl<'a> Lines<'a> {
    /// Lines of `body`, which starts at file offset `base`.
    pub fn new(body: &'a [u8], base: u64) -> Self {
        Self {
            data: body,
            pos: 0,
            base,
        }
    }
}

impl<'a> Iterator for Lines<'a> {
    type Item = (u64, &'a [u8], bool);

    fn next(&mut self) -> Option<Self::Item> {
        if self.pos >= self.data.len() {
            return None;
        }
        let rest = &self.data[self.pos..];
        let offset = self.base + self.pos as u64;
        match memchr::memchr(b'\n', rest) {
            Some(i) => {
                self.pos += i + 1;
                Some((offset, &rest[..i], true))
            }
            None => {
                self.pos = self.data.len();
                Some((offset, rest, false))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_names_round_trip_and_reject_others() {
        assert_eq!(segment_file_name(42), "seg-00000000000000000042.log");
        assert_eq!(parse_segment_name(&segment_file_name(42)), Some(42));
        assert_eq!(parse_segment_name("seg-42.log"), None);
        assert_eq!(parse_segment_name("seg-0000000000000000004x.log"), None);
        assert_eq!(parse_segment_name("torn-00000000000000000042.log"), None);
    }

    #[test]
    fn event_line_parses_back_to_the_same_event() {
        let event = AuditEvent::new(
            AuditEventType::Custom("x\"y\n".into()),
            Some(AgentId::new()),
            "details with \"quotes\" and\nnewline",
        )
        .with("k", "v");
        let mut buf = Vec::new();
        let range = write_event_line(&mut buf, 7, &[1; 32], &event);
        assert_eq!(buf.last(), Some(&b'\n'));
        assert_eq!(memchr::memchr_iter(b'\n', &buf).count(), 1);
        let view = LineView::parse(&buf[range]).expect("parse");
        assert_eq!(view.seq, 7);
        assert_eq!(view.prev_hash(), Some([1; 32]));
        let back = view.to_event().expect("event");
        assert_eq!(back.id, event.id);
        assert_eq!(back.event_type, event.event_type);
        assert_eq!(back.details, event.details);
        assert_eq!(back.metadata, event.metadata);
        assert_eq!(unix_nanos(back.timestamp), unix_nanos(event.timestamp));
    }

    #[test]
    fn lines_with_unknown_or_mixed_fields_are_refused() {
        let ok = br#"{"seq":1,"prev":"00","ts":1,"kind":"event","id":"67e55044-10b1-426f-9247-bb680e5fe0c8","type":"AgentCreated","details":""}"#;
        assert!(LineView::parse(ok).is_ok());
        let extra = br#"{"seq":1,"prev":"00","ts":1,"kind":"event","id":"67e55044-10b1-426f-9247-bb680e5fe0c8","type":"AgentCreated","details":"","payload":"x"}"#;
        assert!(LineView::parse(extra).is_err());
        let mixed = br#"{"seq":1,"prev":"00","ts":1,"kind":"checkpoint","key":"00","sig":"00","details":""}"#;
        assert!(LineView::parse(mixed).is_err());
    }

    #[test]
    fn head_slot_round_trips_and_blank_is_blank() {
        let head = Head {
            gen: 3,
            slot: 1,
            seq: 99,
            hash: [7; 32],
            ts: 123,
            sealed: true,
            key: [9; 32],
            sig: [5; 64],
        };
        let bytes = head.encode();
        match Head::decode(&bytes) {
            SlotState::Head(back) => assert_eq!(back, head),
            other => panic!("expected a head, got {other:?}"),
        }
        let header = blank_header();
        assert!(matches!(
            Head::decode(&header[..SLOT_LEN]),
            SlotState::Blank
        ));
        let mut garbled = bytes;
        garbled[10] = b'#';
        assert!(matches!(Head::decode(&garbled), SlotState::Invalid(_)));
    }

    #[test]
    fn lines_iterator_reports_the_unterminated_tail() {
        let body = b"a\nbb\nccc";
        let lines: Vec<_> = Lines::new(body, 1024).collect();
        assert_eq!(
            lines,
            vec![
                (1024, &b"a"[..], true),
                (1026, &b"bb"[..], true),
                (1029, &b"ccc"[..], false)
            ]
        );
    }
}
