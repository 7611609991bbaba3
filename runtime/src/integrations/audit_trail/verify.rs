//! The verifier: checks a log directory against a trusted public key and names the first
//! bad entry.
//!
//! It needs only the directory and the public key (no daemon, no private key). Checks, in
//! log order: every segment's head slots (well-formed, signed by the trusted key, written to
//! their own slot); every entry line (well-formed, `seq` one more than the previous, `prev`
//! the SHA-256 of the previous line); every checkpoint's signature; that the segment's
//! signed head names an entry that is present with exactly that hash; that closed segments
//! are sealed and followed by their successor; and that a log not starting at seq 0 has a
//! retention event accounting for it. Entries after the newest signed head are reported as
//! an unsigned tail; bytes that do not form valid entries there are a torn tail (what a
//! crash leaves), not a failure.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::format::{
    checkpoint_message, hash_line, list_segments, parse_sig, segment_file_name, Hash, Head, Kind,
    LineView, Lines, SlotState, SEGMENT_HEADER_LEN, SLOT_LEN, ZERO_HASH,
};
use super::keys::AuditPublicKey;
use super::{AuditError, AuditEventType};

/// What kind of damage verification found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProblemKind {
    /// The directory holds no segments.
    NoLog,
    /// A line or head slot is not well-formed.
    Malformed,
    /// An entry's content was changed.
    Modified,
    /// Entries (or whole segments) were removed from the middle.
    Missing,
    /// An entry was added that the writer never wrote.
    Inserted,
    /// Entries are not in sequence order.
    Reordered,
    /// A checkpoint or head signature does not verify with the trusted key.
    BadSignature,
    /// Signed by a different key than the trusted one.
    WrongKey,
    /// The end of the log was cut off.
    Truncated,
    /// A segment has no signed head.
    MissingHead,
    /// The log does not start at seq 0 and no retention event explains it.
    UnaccountedStart,
}

/// The first problem found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VerifyProblem {
    /// What kind of problem.
    pub kind: ProblemKind,
    /// The segment file it is in.
    pub segment: String,
    /// The sequence number of the bad entry, when it has one.
    pub seq: Option<u64>,
    /// Byte offset in the segment file.
    pub offset: Option<u64>,
    /// What is wrong, in words.
    pub message: String,
}

impl fmt::Display for VerifyProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.kind)?;
        if let Some(seq) = self.seq {
            write!(f, " at seq {seq}")?;
        }
        write!(f, " in {}", self.segment)?;
        if let Some(offset) = self.offset {
            write!(f, " (offset {offset})")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Bytes at the end of the newest segment that do not form valid entries and are not
/// covered by any signature: what a crash mid-write leaves. The writer cuts them off (and
/// keeps a copy) the next time it opens the log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TornTail {
    /// The segment.
    pub segment: String,
    /// Where the torn bytes start.
    pub offset: u64,
    /// How many bytes.
    pub bytes: u64,
    /// Why the first of them is not a valid entry.
    pub reason: String,
}

/// The outcome of [`verify_dir`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    /// The directory verified.
    pub dir: PathBuf,
    /// The trusted public key (hex).
    pub public_key: String,
    /// Segments checked.
    pub segments: usize,
    /// Entries checked (events and checkpoints).
    pub entries: u64,
    /// Of which events.
    pub events: u64,
    /// Of which signed checkpoints (every one verified).
    pub checkpoints: u64,
    /// First sequence number present.
    pub first_seq: Option<u64>,
    /// Last valid sequence number.
    pub last_seq: Option<u64>,
    /// The newest signed head covers the log up to this sequence number.
    pub signed_through: Option<u64>,
    /// Valid entries after `signed_through` (chained, but no signature covers them yet).
    pub unsigned_tail: u64,
    /// Torn bytes at the end, if any.
    pub torn_tail: Option<TornTail>,
    /// The first seq a retention event declared kept, if the log records one.
    pub retention_first_kept: Option<u64>,
    /// The first problem; `None` when the log verifies.
    pub problem: Option<VerifyProblem>,
}

impl VerifyReport {
    /// Whether the log verified.
    pub fn is_ok(&self) -> bool {
        self.problem.is_none()
    }
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.problem {
            None => writeln!(
                f,
                "OK: audit log {} verifies with public key {}",
                self.dir.display(),
                self.public_key
            )?,
            Some(problem) => writeln!(
                f,
                "FAILED: audit log {} does not verify with public key {}\nfirst bad entry: {problem}",
                self.dir.display(),
                self.public_key
            )?,
        }
        write!(
            f,
            "segments: {}, entries checked: {} ({} events, {} signed checkpoints)",
            self.segments, self.entries, self.events, self.checkpoints
        )?;
        if let (Some(first), Some(last)) = (self.first_seq, self.last_seq) {
            write!(f, ", seq {first}..={last}")?;
        }
        writeln!(f)?;
        if let Some(kept) = self.retention_first_kept {
            writeln!(f, "retention: entries before seq {kept} were removed")?;
        }
        if self.problem.is_none() {
            if let Some(signed) = self.signed_through {
                write!(f, "signed through seq {signed}")?;
                if self.unsigned_tail > 0 {
                    write!(
                        f,
                        "; {} newer entries are chained but not yet covered by a signature",
                        self.unsigned_tail
                    )?;
                }
                writeln!(f)?;
            }
        }
        if let Some(torn) = &self.torn_tail {
            writeln!(
                f,
                "torn tail: {} bytes at offset {} of {} ({}); the writer removes it on its next start",
                torn.bytes, torn.offset, torn.segment, torn.reason
            )?;
        }
        Ok(())
    }
}

#[derive(Clone)]
struct PrevEntry {
    seq: u64,
    hash: Hash,
    offset: u64,
    segment: String,
}

#[derive(Default)]
struct ChainState {
    prev: Option<PrevEntry>,
    prev_sealed: bool,
}

fn problem(
    kind: ProblemKind,
    segment: &str,
    seq: Option<u64>,
    offset: Option<u64>,
    message: impl Into<String>,
) -> VerifyProblem {
    VerifyProblem {
        kind,
        segment: segment.to_string(),
        seq,
        offset,
        message: message.into(),
    }
}

/// Verifies the log in `dir` against `public_key`. `Err` only when the directory cannot
/// be read; a log that does not verify gives a report whose `problem` names the first bad
/// entry.
pub fn verify_dir(dir: &Path, public_key: &AuditPublicKey) -> Result<VerifyReport, AuditError> {
    let mut report = VerifyReport {
        dir: dir.to_path_buf(),
        public_key: public_key.to_hex(),
        segments: 0,
        entries: 0,
        events: 0,
        checkpoints: 0,
        first_seq: None,
        last_seq: None,
        signed_through: None,
        unsigned_tail: 0,
        torn_tail: None,
        retention_first_kept: None,
        problem: None,
    };
    let segments = match list_segments(dir) {
        Ok(segments) => segments,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            report.problem = Some(problem(
                ProblemKind::NoLog,
                &dir.display().to_string(),
                None,
                None,
                "the directory does not exist",
            ));
            return Ok(report);
        }
        Err(e) => {
            return Err(AuditError::Read(format!("{}: {e}", dir.display())));
        }
    };
    if segments.is_empty() {
        report.problem = Some(problem(
            ProblemKind::NoLog,
            &dir.display().to_string(),
            None,
            None,
            "no segment files (seg-*.log) in the directory",
        ));
        return Ok(report);
    }
    let mut state = ChainState::default();
    for (i, (first, path)) in segments.iter().enumerate() {
        let last = i + 1 == segments.len();
        let data = std::fs::read(path)
            .map_err(|e| AuditError::Read(format!("{}: {e}", path.display())))?;
        report.segments += 1;
        if let Err(p) = verify_segment(&mut report, &mut state, *first, &data, last, public_key) {
            report.problem = Some(p);
            return Ok(report);
        }
    }
    if let Some(first) = report.first_seq {
        if first > 0 && report.retention_first_kept.is_none_or(|kept| first > kept) {
            let (first_segment, _) = &segments[0];
            report.problem = Some(problem(
                ProblemKind::UnaccountedStart,
                &segment_file_name(*first_segment),
                Some(0),
                None,
                match report.retention_first_kept {
                    None => format!(
                        "the log starts at seq {first} but no retention event records removing entries 0..={}",
                        first - 1
                    ),
                    Some(kept) => format!(
                        "the log starts at seq {first} but retention only removed entries before seq {kept}: entries {kept}..={} are missing",
                        first - 1
                    ),
                },
            ));
        }
    }
    Ok(report)
}

/// The line starting at `offset` of `data` (file offsets), parsed, with its hash.
fn line_at(data: &[u8], offset: u64) -> Option<(LineView<'_>, Hash)> {
    let rest = data.get(offset as usize..)?;
    let end = memchr::memchr(b'\n', rest)?;
    let line = &rest[..end];
    let view = LineView::parse(line).ok()?;
    Some((view, hash_line(line)))
}

fn checkpoint_signature_ok(view: &LineView<'_>, key: &AuditPublicKey) -> bool {
    match (view.sig.and_then(parse_sig), view.prev_hash()) {
        (Some(sig), Some(prev)) => key.verify(&checkpoint_message(view.seq, &prev, view.ts), &sig),
        _ => false,
    }
}

#[allow(clippy::too_many_arguments)]
fn diagnose(
    view: &LineView<'_>,
    hash: &Hash,
    offset: u64,
    next_offset: u64,
    expected: u64,
    prev: &PrevEntry,
    prev_prev_hash: Option<Hash>,
    head: &Head,
    data: &[u8],
    key: &AuditPublicKey,
) -> Option<VerifyProblem> {
    let prev_ok = view.prev_hash() == Some(prev.hash);
    if view.seq == expected && prev_ok {
        return None;
    }
    let seg = prev.segment.as_str();
    let next = || line_at(data, next_offset);
    if view.seq == expected {
        let next = next();
        if next
            .as_ref()
            .is_some_and(|(n, _)| n.seq == expected && n.prev_hash() == Some(prev.hash))
        {
            return Some(problem(
                ProblemKind::Inserted,
                seg,
                Some(expected),
                Some(offset),
                format!(
                    "an entry claiming seq {expected} was inserted (the genuine entry {expected} follows it)"
                ),
            ));
        }
        let intact = next
            .as_ref()
            .is_some_and(|(n, _)| n.seq == expected + 1 && n.prev_hash() == Some(*hash))
            || view.kind == Kind::Checkpoint && checkpoint_signature_ok(view, key)
            || view.seq == head.seq && *hash == head.hash;
        return Some(if intact {
            problem(
                ProblemKind::Modified,
                seg,
                Some(prev.seq),
                Some(prev.offset),
                format!(
                    "entry {} was altered: its hash no longer matches the `prev` recorded by entry {expected}",
                    prev.seq
                ),
            )
        } else {
            problem(
                ProblemKind::Modified,
                seg,
                Some(expected),
                Some(offset),
                format!(
                    "entry {expected} was altered: its `prev` does not match entry {}",
                    prev.seq
                ),
            )
        });
    }
    if view.seq > expected {
        if view.seq == expected + 1 && next().is_some_and(|(n, _)| n.seq == expected) {
            return Some(problem(
                ProblemKind::Reordered,
                seg,
                Some(expected),
                Some(offset),
                format!(
                    "entries {expected} and {} are out of order (entry {} comes first)",
                    expected + 1,
                    expected + 1
                ),
            ));
        }
        let message = if view.seq == expected + 1 {
            format!(
                "entry {expected} is missing (deleted): entry {} follows entry {}",
                view.seq, prev.seq
            )
        } else {
            format!(
                "entries {expected}..={} are missing (deleted): entry {} follows entry {}",
                view.seq - 1,
                view.seq,
                prev.seq
            )
        };
        return Some(problem(
            ProblemKind::Missing,
            seg,
            Some(expected),
            Some(offset),
            message,
        ));
    }
    // view.seq < expected
    if view.seq + 1 == expected {
        let genuine = prev_prev_hash.is_some_and(|pp| view.prev_hash() == Some(pp))
            && next().is_none_or(|(n, _)| n.prev_hash() == Some(*hash));
        return Some(if genuine {
            problem(
                ProblemKind::Inserted,
                seg,
                Some(prev.seq),
                Some(prev.offset),
                format!(
                    "an entry claiming seq {} was inserted (the genuine entry {} follows it)",
                    prev.seq, prev.seq
                ),
            )
        } else {
            problem(
                ProblemKind::Inserted,
                seg,
                Some(view.seq),
                Some(offset),
                format!(
                    "a second entry with seq {} was inserted after the genuine one",
                    view.seq
                ),
            )
        });
    }
    Some(problem(
        ProblemKind::Reordered,
        seg,
        Some(expected),
        Some(offset),
        format!(
            "entry {} comes after entry {}: entries are out of order",
            view.seq, prev.seq
        ),
    ))
}

fn verify_segment(
    report: &mut VerifyReport,
    state: &mut ChainState,
    first: u64,
    data: &[u8],
    last: bool,
    key: &AuditPublicKey,
) -> Result<(), VerifyProblem> {
    let name = segment_file_name(first);
    let key_hex = key.to_hex();
    let key_bytes = key.to_bytes();
    if data.is_empty() {
        if last && state.prev.is_some() && state.prev_sealed {
            report.torn_tail = Some(TornTail {
                segment: name,
                offset: 0,
                bytes: 0,
                reason: "an empty segment left by an interrupted rotation".into(),
            });
            return Ok(());
        }
        return Err(problem(
            ProblemKind::Truncated,
            &name,
            Some(first),
            Some(0),
            "the segment file is empty",
        ));
    }
    if data.len() < SEGMENT_HEADER_LEN as usize {
        return Err(problem(
            ProblemKind::Truncated,
            &name,
            Some(first),
            Some(0),
            format!(
                "the segment is {} bytes, shorter than its {SEGMENT_HEADER_LEN}-byte header",
                data.len()
            ),
        ));
    }

    // The signed head.
    let mut head: Option<Head> = None;
    for slot in 0..2u8 {
        let at = slot as usize * SLOT_LEN;
        let here = Some(at as u64);
        match Head::decode(&data[at..at + SLOT_LEN]) {
            SlotState::Blank => {}
            SlotState::Invalid(why) => {
                return Err(problem(
                    ProblemKind::Malformed,
                    &name,
                    None,
                    here,
                    format!("head slot {slot}: {why}"),
                ))
            }
            SlotState::Head(h) => {
                if h.key != key_bytes {
                    return Err(problem(
                        ProblemKind::WrongKey,
                        &name,
                        None,
                        here,
                        format!(
                            "head slot {slot} is signed by key {}, not the trusted key {key_hex}",
                            hex::encode(h.key)
                        ),
                    ));
                }
                if h.slot != slot {
                    return Err(problem(
                        ProblemKind::Malformed,
                        &name,
                        None,
                        here,
                        format!("head slot {slot} holds a head written for slot {}", h.slot),
                    ));
                }
                if !key.verify(&h.own_message(), &h.sig) {
                    return Err(problem(
                        ProblemKind::BadSignature,
                        &name,
                        Some(h.seq),
                        here,
                        format!("head slot {slot}: the signature does not verify"),
                    ));
                }
                if head.as_ref().is_some_and(|b| b.gen == h.gen) {
                    return Err(problem(
                        ProblemKind::Malformed,
                        &name,
                        None,
                        here,
                        "both head slots carry the same generation",
                    ));
                }
                if head.as_ref().is_none_or(|b| h.gen > b.gen) {
                    head = Some(h);
                }
            }
        }
    }
    let Some(head) = head else {
        return Err(problem(
            ProblemKind::MissingHead,
            &name,
            None,
            Some(0),
            "the segment has no signed head",
        ));
    };

    let mut expected = first;
    let mut prev: Option<PrevEntry> = state.prev.clone();
    report.first_seq.get_or_insert(first);
    let mut prev_prev_hash: Option<Hash> = None;
    let mut last_checkpoint: Option<u64> = None;
    let mut valid_in_segment = 0u64;
    for (offset, line, complete) in
        Lines::new(&data[SEGMENT_HEADER_LEN as usize..], SEGMENT_HEADER_LEN)
    {
        let next_offset = offset + line.len() as u64 + 1;
        let soft = last && expected > head.seq;
        let checked = (|| -> Result<(LineView<'_>, Hash), VerifyProblem> {
            if !complete {
                return Err(problem(
                    ProblemKind::Truncated,
                    &name,
                    Some(expected),
                    Some(offset),
                    format!("entry {expected} is cut short (no newline at the end of the file)"),
                ));
            }
            let view = LineView::parse(line).map_err(|e| {
                problem(
                    ProblemKind::Malformed,
                    &name,
                    Some(expected),
                    Some(offset),
                    format!("the line where entry {expected} belongs is not a valid entry: {e}"),
                )
            })?;
            let hash = hash_line(line);
            if expected == first {
                if view.seq != first {
                    return Err(problem(
                        ProblemKind::Malformed,
                        &name,
                        Some(first),
                        Some(offset),
                        format!(
                            "the segment's name says it starts at seq {first}, its first entry is seq {}",
                            view.seq
                        ),
                    ));
                }
                if view.kind != Kind::Checkpoint {
                    return Err(problem(
                        ProblemKind::Malformed,
                        &name,
                        Some(first),
                        Some(offset),
                        "the segment does not start with a signed anchor checkpoint",
                    ));
                }
                match &state.prev {
                    Some(p) if p.seq + 1 != first => {
                        return Err(problem(
                            ProblemKind::Missing,
                            &name,
                            Some(p.seq + 1),
                            Some(offset),
                            format!(
                                "entries {}..={} are missing: segment {} ends at seq {} and {name} starts at seq {first}",
                                p.seq + 1,
                                first - 1,
                                p.segment,
                                p.seq
                            ),
                        ))
                    }
                    Some(p) if view.prev_hash() != Some(p.hash) => {
                        return Err(problem(
                            ProblemKind::Modified,
                            &name,
                            Some(first),
                            Some(offset),
                            format!(
                                "the anchor of {name} does not continue {} (its `prev` is not the hash of entry {})",
                                p.segment, p.seq
                            ),
                        ))
                    }
                    None if first == 0 && view.prev_hash() != Some(ZERO_HASH) => {
                        return Err(problem(
                            ProblemKind::Malformed,
                            &name,
                            Some(0),
                            Some(offset),
                            "the genesis entry must have an all-zero `prev`",
                        ))
                    }
                    _ => {}
                }
            } else if let Some(p) = &prev {
                if let Some(bad) = diagnose(
                    &view,
                    &hash,
                    offset,
                    next_offset,
                    expected,
                    p,
                    prev_prev_hash,
                    &head,
                    data,
                    key,
                ) {
                    return Err(bad);
                }
            }
            if view.kind == Kind::Checkpoint {
                if view.key != Some(key_hex.as_str()) {
                    return Err(problem(
                        ProblemKind::WrongKey,
                        &name,
                        Some(view.seq),
                        Some(offset),
                        format!(
                            "checkpoint {} is signed by key {}, not the trusted key {key_hex}",
                            view.seq,
                            view.key.unwrap_or_default()
                        ),
                    ));
                }
                if !checkpoint_signature_ok(&view, key) {
                    let since = match last_checkpoint {
                        Some(c) => format!(
                            "; one of entries {}..={} was altered and the chain re-hashed, or the checkpoint was forged",
                            c + 1,
                            view.seq.saturating_sub(1)
                        ),
                        None => String::new(),
                    };
                    return Err(problem(
                        ProblemKind::BadSignature,
                        &name,
                        Some(view.seq),
                        Some(offset),
                        format!(
                            "checkpoint {}: the signature does not verify{since}",
                            view.seq
                        ),
                    ));
                }
            }
            if view.seq == head.seq && hash != head.hash {
                let since = last_checkpoint
                    .map(|c| {
                        format!(
                            " (one of entries {}..={} was altered and the chain re-hashed)",
                            c + 1,
                            view.seq
                        )
                    })
                    .unwrap_or_default();
                return Err(problem(
                    ProblemKind::Modified,
                    &name,
                    Some(view.seq),
                    Some(offset),
                    format!(
                        "entry {} differs from what the signed head records{since}",
                        view.seq
                    ),
                ));
            }
            Ok((view, hash))
        })();
        let (view, hash) = match checked {
            Ok(ok) => ok,
            Err(p) if soft => {
                report.torn_tail = Some(TornTail {
                    segment: name.clone(),
                    offset,
                    bytes: data.len() as u64 - offset,
                    reason: p.message,
                });
                break;
            }
            Err(p) => return Err(p),
        };
        match view.kind {
            Kind::Checkpoint => {
                report.checkpoints += 1;
                last_checkpoint = Some(view.seq);
            }
            Kind::Event => {
                report.events += 1;
                if view.is_type(&AuditEventType::AuditMaintenance)
                    && view.meta_value("action") == Some("retention")
                {
                    if let Some(kept) = view
                        .meta_value("first_kept_seq")
                        .and_then(|v| v.parse().ok())
                    {
                        report.retention_first_kept = Some(
                            report
                                .retention_first_kept
                                .map_or(kept, |k: u64| k.max(kept)),
                        );
                    }
                }
            }
        }
        report.entries += 1;
        report.last_seq = Some(view.seq);
        valid_in_segment += 1;
        prev_prev_hash = prev.as_ref().map(|p| p.hash);
        prev = Some(PrevEntry {
            seq: view.seq,
            hash,
            offset,
            segment: name.clone(),
        });
        expected += 1;
    }

    let last_seq = expected.checked_sub(1).filter(|_| valid_in_segment > 0);
    if last_seq.is_none_or(|l| head.seq > l) {
        let ends = match last_seq {
            Some(l) => format!("the segment ends at seq {l}"),
            None => "the segment holds no entries".into(),
        };
        return Err(problem(
            ProblemKind::Truncated,
            &name,
            Some(expected),
            None,
            format!(
                "the signed head covers seq {} but {ends}: entries {expected}..={} were removed",
                head.seq, head.seq
            ),
        ));
    }
    let last_seq = last_seq.unwrap_or(first);
    if !last {
        if head.seq != last_seq {
            return Err(problem(
                ProblemKind::Inserted,
                &name,
                Some(head.seq + 1),
                None,
                format!(
                    "entries {}..={last_seq} follow the sealed head of a closed segment",
                    head.seq + 1
                ),
            ));
        }
        if !head.sealed {
            return Err(problem(
                ProblemKind::Malformed,
                &name,
                Some(last_seq),
                None,
                "a later segment exists but this one was never sealed",
            ));
        }
    } else {
        report.unsigned_tail = last_seq - head.seq;
        if head.sealed && report.torn_tail.is_none() {
            return Err(problem(
                ProblemKind::Truncated,
                &name,
                Some(last_seq + 1),
                None,
                "the segment was sealed, so a later segment existed, but it is missing",
            ));
        }
    }
    report.signed_through = Some(head.seq);
    report.last_seq = Some(last_seq);
    state.prev = prev;
    state.prev_sealed = head.sealed;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_directory_is_a_failed_verification_not_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = super::super::AuditKey::from_seed(&[1; 32]).public_key();
        let report = verify_dir(&dir.path().join("nope"), &key).expect("report");
        assert_eq!(report.problem.map(|p| p.kind), Some(ProblemKind::NoLog));
        let report = verify_dir(dir.path(), &key).expect("report");
        assert_eq!(report.problem.map(|p| p.kind), Some(ProblemKind::NoLog));
    }
}
