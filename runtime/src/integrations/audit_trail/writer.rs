//! [`DurableAuditTrail`]: the append-only, hash-chained, signed log the runtime records into.
//!
//! Producers put events into a bounded queue (`submit` blocks and `record_event` waits while
//! it is full); one dedicated writer thread drains everything queued, appends it to the
//! active segment in a single write and syncs according to the [`FsyncPolicy`] (group
//! commit). Signatures are amortised: a signed checkpoint every `checkpoint_every` entries /
//! `checkpoint_interval`, a signed anchor at the start of every segment, and the segment's
//! signed head (two slots in its header) rewritten at every sync point. With
//! `fsync = "always"` the head covering commit *k* rides along in the same `fdatasync` as
//! commit *k+1* (or follows within [`SEAL_DELAY`] when the queue goes idle), so a busy trail
//! pays one sync per commit and a head never names an entry that is not already durable.
//!
//! On open, the newest segment is scanned: a torn tail (bytes after the last valid entry,
//! none of them covered by the signed head) is cut off, saved to a `torn-*.bin` file beside
//! the log and the repair recorded as an [`AuditEventType::AuditMaintenance`] event; damage
//! inside the signed part is refused ([`AuditError::Corrupt`]) rather than "repaired".

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use parking_lot::{Condvar, Mutex};
use tokio::sync::{oneshot, watch, Notify};

use super::format::{
    blank_header, checkpoint_message, hash_line, list_segments, segment_file_name, unix_nanos,
    write_checkpoint_line, write_event_line, Hash, Head, Kind, LineView, Lines, SlotState,
    SEGMENT_HEADER_LEN, SLOT_LEN, ZERO_HASH,
};
use super::keys::{AuditKey, AuditPublicKey};
use super::query::{query_dir, tail_dir, AuditQuery, AuditRecord};
use super::verify::{verify_dir, VerifyReport};
use super::{AuditConfig, AuditError, AuditEvent, AuditEventType, AuditTrail, FsyncPolicy};
use crate::config::Validate;

/// How long an idle `always` trail waits for more events before writing a head of its own
/// (busy trails carry the head in the next commit instead).
pub const SEAL_DELAY: Duration = Duration::from_millis(2);

/// The longest an `always` writer lingers to fill a group commit (see `writer_loop`).
pub const MAX_LINGER: Duration = Duration::from_millis(2);

/// What [`DurableAuditTrail::apply_retention`] removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RetentionOutcome {
    /// File names of the removed segments, oldest first.
    pub removed_segments: Vec<String>,
    /// The first sequence number still in the log.
    pub first_kept_seq: u64,
}

/// Counters of a [`DurableAuditTrail`] (for metrics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AuditStats {
    /// Events submitted to this handle since it was opened.
    pub submitted: u64,
    /// Of which synced and covered by a signed head.
    pub flushed: u64,
}

/// The durable, tamper-evident audit trail. See the module documentation.
pub struct DurableAuditTrail {
    shared: Arc<Shared>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    dir: PathBuf,
    public_key: AuditPublicKey,
}

impl std::fmt::Debug for DurableAuditTrail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DurableAuditTrail")
            .field("dir", &self.dir)
            .field("public_key", &self.public_key.to_hex())
            .finish()
    }
}

struct Shared {
    state: Mutex<QueueState>,
    /// Wakes the writer.
    wake: Condvar,
    /// Wakes blocked `submit` callers once the writer drained the queue.
    space: Condvar,
    /// Wakes waiting `record_event` callers once the writer drained the queue.
    space_async: Notify,
    progress: watch::Sender<Progress>,
    capacity: usize,
}

#[derive(Clone, Debug, Default)]
struct Progress {
    /// Every ticket up to this one is synced and covered by a signed head.
    flushed: u64,
    failed: Option<Arc<str>>,
    stopped: bool,
}

#[derive(Default)]
struct QueueState {
    queue: Vec<AuditEvent>,
    /// One per queued `record_event`, answered once its commit is durable (dropped if the
    /// trail fails). Only the callers whose events were in a commit are woken by it.
    acks: Vec<oneshot::Sender<()>>,
    /// Ticket of the last event enqueued (tickets start at 1).
    enqueued: u64,
    flush_to: u64,
    commands: Vec<Command>,
    closing: bool,
    failed: Option<Arc<str>>,
    /// While the writer lingers for a fuller batch: wake it when the queue reaches this.
    wake_at: usize,
}

enum Command {
    Retention(oneshot::Sender<Result<RetentionOutcome, AuditError>>),
}

impl DurableAuditTrail {
    /// Opens (or creates) the trail configured by `config`, with `data_dir` (the runtime's
    /// `storage.data_dir`) supplying the default log directory and key path. Loads the audit
    /// key or generates it on first start, repairs a torn tail, writes a signed `open`
    /// checkpoint, applies retention and starts the writer thread.
    pub fn open(config: &AuditConfig, data_dir: &Path) -> Result<Self, AuditError> {
        let (key, _) = AuditKey::load_or_generate(&config.resolved_key_path(data_dir))?;
        Self::open_with_key(config, config.resolved_dir(data_dir), key)
    }

    /// Opens the trail in `dir`, signing with `key`.
    pub fn open_with_key(
        config: &AuditConfig,
        dir: PathBuf,
        key: AuditKey,
    ) -> Result<Self, AuditError> {
        let mut issues = Vec::new();
        config.validate(&mut issues);
        if !issues.is_empty() {
            return Err(AuditError::Write(format!(
                "invalid [audit] configuration: {}",
                issues
                    .iter()
                    .map(|i| format!("{}: {}", i.key, i.message))
                    .collect::<Vec<_>>()
                    .join("; ")
            )));
        }
        let public_key = key.public_key();
        let mut log = SegmentLog::open(config, &dir, key)?;
        log.apply_retention(SystemTime::now())?;
        let (progress, _) = watch::channel(Progress::default());
        let shared = Arc::new(Shared {
            state: Mutex::new(QueueState::default()),
            wake: Condvar::new(),
            space: Condvar::new(),
            space_async: Notify::new(),
            progress,
            capacity: config.queue_capacity,
        });
        let writer_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("symbiont-audit".into())
            .spawn(move || {
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    writer_loop(&mut log, &writer_shared)
                }));
                if outcome.is_err() {
                    fail(&writer_shared, "the audit writer thread panicked".into());
                }
                {
                    // Whatever is still queued will never be written: answer its waiters
                    // (their acks drop) instead of leaving them hanging.
                    let mut st = writer_shared.state.lock();
                    st.closing = true;
                    st.acks.clear();
                    st.queue.clear();
                }
                writer_shared.progress.send_modify(|p| p.stopped = true);
                writer_shared.space.notify_all();
                writer_shared.space_async.notify_waiters();
            })
            .map_err(|e| AuditError::Write(format!("cannot start the audit writer: {e}")))?;
        tracing::info!(dir = %dir.display(), public_key = %public_key.to_hex(), "audit trail open");
        Ok(Self {
            shared,
            thread: Mutex::new(Some(thread)),
            dir,
            public_key,
        })
    }

    /// The log directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The public key verifiers need.
    pub fn public_key(&self) -> AuditPublicKey {
        self.public_key
    }

    /// Events submitted and made durable so far.
    pub fn stats(&self) -> AuditStats {
        let submitted = self.shared.state.lock().enqueued;
        let flushed = self.shared.progress.borrow().flushed;
        AuditStats { submitted, flushed }
    }

    /// Records `event` like [`AuditTrail::record_event`] and returns its ticket (1 for the
    /// first event submitted to this handle, then 2, ...), useful to correlate
    /// acknowledgements.
    pub async fn record(&self, event: AuditEvent) -> Result<u64, AuditError> {
        let (ack, acked) = oneshot::channel();
        let ticket = self.enqueue_async(event, ack).await?;
        match acked.await {
            Ok(()) => Ok(ticket),
            Err(_) => Err(self.failure()),
        }
    }

    /// Why the writer stopped answering.
    fn failure(&self) -> AuditError {
        let st = self.shared.state.lock();
        AuditError::Write(match &st.failed {
            Some(failed) => failed.to_string(),
            None => "the audit trail closed before the event was written".into(),
        })
    }

    /// Events matching `query`, read from the log as it is on disk now.
    pub fn query(&self, query: &AuditQuery) -> Result<Vec<AuditRecord>, AuditError> {
        query_dir(&self.dir, query)
    }

    /// The last `n` events.
    pub fn tail(&self, n: usize) -> Result<Vec<AuditRecord>, AuditError> {
        tail_dir(&self.dir, n)
    }

    /// Verifies the log with this trail's own public key (call [`AuditTrail::flush`] first
    /// to have everything submitted covered).
    pub fn verify(&self) -> Result<VerifyReport, AuditError> {
        verify_dir(&self.dir, &self.public_key)
    }

    /// Applies the configured retention now (it is also applied on open and whenever a
    /// segment is closed).
    pub async fn apply_retention(&self) -> Result<RetentionOutcome, AuditError> {
        let (tx, rx) = oneshot::channel();
        {
            let mut st = self.shared.state.lock();
            if let Some(failed) = &st.failed {
                return Err(AuditError::Write(failed.to_string()));
            }
            if st.closing {
                return Err(AuditError::Write("the audit trail is closed".into()));
            }
            st.commands.push(Command::Retention(tx));
            self.shared.wake.notify_one();
        }
        rx.await
            .map_err(|_| AuditError::Write("the audit writer stopped".into()))?
    }

    /// Writes a signed `close` checkpoint, syncs and stops the writer. Events submitted
    /// before are written first; later ones are refused.
    pub async fn close(&self) -> Result<(), AuditError> {
        self.request_close();
        let mut rx = self.shared.progress.subscribe();
        let result = rx
            .wait_for(|p| p.stopped)
            .await
            .map(|p| p.failed.clone())
            .map_err(|_| AuditError::Write("the audit writer vanished".into()))?;
        if let Some(handle) = self.thread.lock().take() {
            let _ = handle.join();
        }
        match result {
            Some(failed) => Err(AuditError::Write(failed.to_string())),
            None => Ok(()),
        }
    }

    fn request_close(&self) {
        let mut st = self.shared.state.lock();
        st.closing = true;
        self.shared.wake.notify_one();
    }

    /// Puts `event` in the queue if there is room; gives it back otherwise.
    #[allow(clippy::type_complexity)]
    fn try_enqueue(
        &self,
        event: AuditEvent,
        ack: oneshot::Sender<()>,
    ) -> Result<Result<u64, (AuditEvent, oneshot::Sender<()>)>, AuditError> {
        let mut st = self.shared.state.lock();
        if let Some(failed) = &st.failed {
            return Err(AuditError::Write(failed.to_string()));
        }
        if st.closing {
            return Err(AuditError::Write("the audit trail is closed".into()));
        }
        if st.queue.len() >= self.shared.capacity {
            return Ok(Err((event, ack)));
        }
        st.acks.push(ack);
        Ok(Ok(push(&self.shared, &mut st, event)))
    }

    async fn enqueue_async(
        &self,
        mut event: AuditEvent,
        mut ack: oneshot::Sender<()>,
    ) -> Result<u64, AuditError> {
        loop {
            let notified = self.shared.space_async.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.try_enqueue(event, ack)? {
                Ok(ticket) => return Ok(ticket),
                Err(back) => {
                    (event, ack) = back;
                    notified.await;
                }
            }
        }
    }

    async fn wait_flushed(&self, ticket: u64) -> Result<(), AuditError> {
        let field = |p: &Progress| p.flushed;
        let mut rx = self.shared.progress.subscribe();
        let progress = rx
            .wait_for(|p| field(p) >= ticket || p.failed.is_some() || p.stopped)
            .await
            .map_err(|_| AuditError::Write("the audit writer vanished".into()))?
            .clone();
        if field(&progress) >= ticket {
            Ok(())
        } else if let Some(failed) = progress.failed {
            Err(AuditError::Write(failed.to_string()))
        } else {
            Err(AuditError::Write(
                "the audit trail closed before the event was written".into(),
            ))
        }
    }
}

fn push(shared: &Shared, st: &mut QueueState, event: AuditEvent) -> u64 {
    let was_empty = st.queue.is_empty();
    st.queue.push(event);
    st.enqueued += 1;
    if was_empty || st.queue.len() == st.wake_at {
        shared.wake.notify_one();
    }
    st.enqueued
}

fn fail(shared: &Shared, message: Arc<str>) {
    tracing::error!(error = %message, "audit trail failed; no further events are recorded");
    shared.state.lock().failed = Some(Arc::clone(&message));
    shared.progress.send_modify(|p| {
        if p.failed.is_none() {
            p.failed = Some(message);
        }
    });
}

#[async_trait]
impl AuditTrail for DurableAuditTrail {
    async fn record_event(&self, event: AuditEvent) -> Result<(), AuditError> {
        self.record(event).await.map(|_| ())
    }

    fn submit(&self, event: AuditEvent) {
        let mut st = self.shared.state.lock();
        loop {
            if let Some(failed) = &st.failed {
                tracing::warn!(error = %failed, event_type = %event.event_type,
                    "audit event dropped: the trail has failed");
                return;
            }
            if st.closing {
                tracing::warn!(event_type = %event.event_type,
                    "audit event dropped: the trail is closed");
                return;
            }
            if st.queue.len() < self.shared.capacity {
                push(&self.shared, &mut st, event);
                return;
            }
            // Back-pressure: the writer is an independent thread, so waiting here always
            // ends once it drains the queue.
            self.shared.space.wait(&mut st);
        }
    }

    async fn flush(&self) -> Result<(), AuditError> {
        let ticket = {
            let mut st = self.shared.state.lock();
            if let Some(failed) = &st.failed {
                return Err(AuditError::Write(failed.to_string()));
            }
            st.flush_to = st.enqueued;
            self.shared.wake.notify_one();
            st.enqueued
        };
        self.wait_flushed(ticket).await
    }
}

impl Drop for DurableAuditTrail {
    fn drop(&mut self) {
        self.request_close();
        if let Some(handle) = self.thread.lock().take() {
            let _ = handle.join();
        }
    }
}

fn writer_loop(log: &mut SegmentLog, shared: &Shared) {
    let mut batch: Vec<AuditEvent> = Vec::with_capacity(shared.capacity.min(64 * 1024));
    let mut acks: Vec<oneshot::Sender<()>> = Vec::new();
    let mut flushed = 0u64;
    let mut last_batch = 0usize;
    loop {
        let (upto, flush_to, closing, commands, was_full) = {
            let mut st = shared.state.lock();
            loop {
                if !st.queue.is_empty()
                    || st.closing
                    || !st.commands.is_empty()
                    || st.flush_to > flushed
                {
                    break;
                }
                match log.next_deadline() {
                    Some(deadline) if deadline <= Instant::now() => break,
                    Some(deadline) => {
                        shared.wake.wait_until(&mut st, deadline);
                    }
                    None => shared.wake.wait(&mut st),
                }
            }
            // Group commit under load: the producers the previous commit released are
            // still queueing their next events; a commit started now would sync only the
            // first few. Linger (a fraction of a sync's duration) for about half of them.
            let target = (last_batch / 2).min(shared.capacity);
            if log.policy == FsyncPolicy::Always
                && !st.queue.is_empty()
                && st.queue.len() < target
                && !st.closing
                && st.commands.is_empty()
                && st.flush_to <= flushed
            {
                let deadline = Instant::now() + log.linger();
                st.wake_at = target;
                while st.queue.len() < target && !st.closing && Instant::now() < deadline {
                    shared.wake.wait_until(&mut st, deadline);
                }
                st.wake_at = 0;
            }
            let was_full = st.queue.len() >= shared.capacity;
            std::mem::swap(&mut st.queue, &mut batch);
            std::mem::swap(&mut st.acks, &mut acks);
            (
                st.enqueued,
                st.flush_to,
                st.closing,
                std::mem::take(&mut st.commands),
                was_full,
            )
        };
        if was_full {
            // Only producers that found the queue full wait for room.
            shared.space.notify_all();
            shared.space_async.notify_waiters();
        }

        let had_batch = !batch.is_empty();
        last_batch = batch.len();
        let step = (|| -> Result<(), AuditError> {
            for event in batch.drain(..) {
                log.append_event(&event)?;
            }
            log.checkpoint_if_due()?;
            log.commit()
        })();
        if let Err(e) = step {
            fail(shared, e.to_string().into());
            return;
        }
        for ack in acks.drain(..) {
            let _ = ack.send(());
        }

        if closing {
            let closed = log.append_checkpoint("close").and_then(|_| log.seal(false));
            match closed {
                Ok(()) => shared.progress.send_modify(|p| p.flushed = upto),
                Err(e) => fail(shared, e.to_string().into()),
            }
            for Command::Retention(reply) in commands {
                let _ = reply.send(Err(AuditError::Write("the audit trail is closed".into())));
            }
            return;
        }

        let now = Instant::now();
        if flush_to > flushed || log.seal_due(now, had_batch) {
            if let Err(e) = log.seal(false) {
                fail(shared, e.to_string().into());
                return;
            }
            flushed = upto;
            shared.progress.send_modify(|p| p.flushed = upto);
        }

        for Command::Retention(reply) in commands {
            let outcome = log.apply_retention(SystemTime::now());
            if let Err(e) = &outcome {
                tracing::error!(error = %e, "audit retention failed");
            }
            let _ = reply.send(outcome);
        }
    }
}

fn io_err(what: &str, path: &Path, e: std::io::Error) -> AuditError {
    AuditError::Write(format!("{what} {}: {e}", path.display()))
}

fn sync_dir(dir: &Path) -> Result<(), AuditError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err("cannot sync directory", dir, e))
}

/// The writer's view of the log: the active segment and the chain's tip.
struct SegmentLog {
    dir: PathBuf,
    key: AuditKey,
    key_bytes: [u8; 32],
    policy: FsyncPolicy,
    fsync_interval: Duration,
    segment_size: u64,
    checkpoint_every: u64,
    checkpoint_interval: Duration,
    retention: Option<Duration>,
    max_segments: Option<usize>,

    file: File,
    path: PathBuf,
    seg_len: u64,
    /// Lines appended but not yet written to the file.
    buf: Vec<u8>,
    next_seq: u64,
    /// Hash of entry `next_seq - 1`.
    last_hash: Hash,
    /// Last entry written to the file.
    written: (u64, Hash),
    /// Last entry known to be synced.
    durable: (u64, Hash),
    /// Last entry the segment's head names.
    head_seq: u64,
    head_gen: u64,
    since_checkpoint: u64,
    last_checkpoint: Instant,
    last_sync: Instant,
    /// With `always`: when to write a head of our own if no commit carries one first.
    seal_deadline: Option<Instant>,
    /// Moving average of how long a data sync takes.
    sync_ewma: Duration,
}

/// What recovery found in the newest segment.
struct Recovered {
    next_seq: u64,
    last_hash: Hash,
    valid_end: u64,
    head: Head,
    /// A slot that held garbage and should be overwritten first.
    bad_slot: Option<(u8, String)>,
}

impl SegmentLog {
    fn open(config: &AuditConfig, dir: &Path, key: AuditKey) -> Result<Self, AuditError> {
        fs::create_dir_all(dir).map_err(|e| io_err("cannot create", dir, e))?;
        let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o700));
        let key_bytes = key.public_key().to_bytes();
        let mut repairs: Vec<AuditEvent> = Vec::new();
        let mut segments = list_segments(dir).map_err(|e| io_err("cannot list", dir, e))?;

        // A crash between creating a segment file and writing its header leaves it empty.
        while let Some((first, path)) = segments.last().cloned() {
            let len = fs::metadata(&path)
                .map_err(|e| io_err("cannot stat", &path, e))?
                .len();
            if len != 0 {
                break;
            }
            fs::remove_file(&path).map_err(|e| io_err("cannot remove", &path, e))?;
            sync_dir(dir)?;
            tracing::warn!(segment = %path.display(), "removed an empty segment left by a crash");
            repairs.push(
                AuditEvent::new(
                    AuditEventType::AuditMaintenance,
                    None,
                    format!(
                        "removed empty segment {} left by an interrupted rotation",
                        segment_file_name(first)
                    ),
                )
                .with("action", "repair")
                .with("segment", segment_file_name(first)),
            );
            segments.pop();
        }

        let now = Instant::now();
        let mut log = match segments.last() {
            None => {
                let path = dir.join(segment_file_name(0));
                let (file, seg_len, anchor_hash) =
                    create_segment(&path, 0, &ZERO_HASH, "genesis", &key, &key_bytes)?;
                sync_dir(dir)?;
                Self {
                    dir: dir.to_path_buf(),
                    key,
                    key_bytes,
                    policy: config.fsync,
                    fsync_interval: config.fsync_interval,
                    segment_size: config.segment_size,
                    checkpoint_every: config.checkpoint_every,
                    checkpoint_interval: config.checkpoint_interval,
                    retention: config.retention,
                    max_segments: config.max_segments,
                    file,
                    path,
                    seg_len,
                    buf: Vec::new(),
                    next_seq: 1,
                    last_hash: anchor_hash,
                    written: (0, anchor_hash),
                    durable: (0, anchor_hash),
                    head_seq: 0,
                    head_gen: 1,
                    since_checkpoint: 0,
                    last_checkpoint: now,
                    last_sync: now,
                    seal_deadline: None,
                    sync_ewma: Duration::ZERO,
                }
            }
            Some((first, path)) => {
                let path = path.clone();
                let mut data = fs::read(&path).map_err(|e| io_err("cannot read", &path, e))?;
                let rec = recover_segment(&path, *first, &data, &key_bytes, &key.public_key())?;
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&path)
                    .map_err(|e| io_err("cannot open", &path, e))?;
                if rec.valid_end < data.len() as u64 {
                    let torn = data.split_off(rec.valid_end as usize);
                    let saved = dir.join(format!(
                        "torn-{first:020}-{}-{}.bin",
                        rec.valid_end,
                        unix_nanos(SystemTime::now())
                    ));
                    fs::write(&saved, &torn)
                        .and_then(|_| File::open(&saved)?.sync_all())
                        .map_err(|e| io_err("cannot save the torn tail to", &saved, e))?;
                    file.set_len(rec.valid_end)
                        .and_then(|_| file.sync_all())
                        .map_err(|e| io_err("cannot truncate", &path, e))?;
                    sync_dir(dir)?;
                    tracing::warn!(segment = %path.display(), offset = rec.valid_end,
                        bytes = torn.len(), saved = %saved.display(),
                        "repaired the audit log's torn tail");
                    repairs.push(
                        AuditEvent::new(
                            AuditEventType::AuditMaintenance,
                            None,
                            format!(
                                "torn tail repaired: {} bytes after seq {} removed from {} (saved to {})",
                                torn.len(),
                                rec.next_seq - 1,
                                segment_file_name(*first),
                                saved.file_name().and_then(|n| n.to_str()).unwrap_or_default()
                            ),
                        )
                        .with("action", "repair")
                        .with("segment", segment_file_name(*first))
                        .with("offset", rec.valid_end.to_string())
                        .with("bytes_removed", torn.len().to_string())
                        .with("last_good_seq", (rec.next_seq - 1).to_string()),
                    );
                }
                // The next head goes to the damaged slot (if any) so it is overwritten first.
                let mut head_gen = rec.head.gen;
                if let Some((slot, why)) = &rec.bad_slot {
                    if (head_gen + 1) % 2 != u64::from(*slot) {
                        head_gen += 1;
                    }
                    repairs.push(
                        AuditEvent::new(
                            AuditEventType::AuditMaintenance,
                            None,
                            format!(
                                "head slot {slot} of {} was unreadable ({why}); rewritten",
                                segment_file_name(*first)
                            ),
                        )
                        .with("action", "repair")
                        .with("segment", segment_file_name(*first)),
                    );
                }
                let tip = (rec.next_seq - 1, rec.last_hash);
                Self {
                    dir: dir.to_path_buf(),
                    key,
                    key_bytes,
                    policy: config.fsync,
                    fsync_interval: config.fsync_interval,
                    segment_size: config.segment_size,
                    checkpoint_every: config.checkpoint_every,
                    checkpoint_interval: config.checkpoint_interval,
                    retention: config.retention,
                    max_segments: config.max_segments,
                    file,
                    path,
                    seg_len: rec.valid_end,
                    buf: Vec::new(),
                    next_seq: rec.next_seq,
                    last_hash: rec.last_hash,
                    written: tip,
                    durable: tip,
                    head_seq: rec.head.seq,
                    head_gen,
                    since_checkpoint: 0,
                    last_checkpoint: now,
                    last_sync: now,
                    seal_deadline: None,
                    sync_ewma: Duration::ZERO,
                }
            }
        };
        for event in &repairs {
            log.append_event(event)?;
        }
        log.append_checkpoint("open")?;
        log.seal(false)?;
        Ok(log)
    }

    /// The earliest moment the writer must act without new events.
    fn next_deadline(&self) -> Option<Instant> {
        let mut deadline = self.seal_deadline;
        let mut consider = |t: Instant| {
            deadline = Some(deadline.map_or(t, |d| d.min(t)));
        };
        if self.since_checkpoint > 0 {
            consider(self.last_checkpoint + self.checkpoint_interval);
        }
        if self.policy == FsyncPolicy::Interval && self.written.0 > self.durable.0 {
            consider(self.last_sync + self.fsync_interval);
        }
        deadline
    }

    /// Whether the writer should seal now (without a flush request).
    fn seal_due(&self, now: Instant, had_batch: bool) -> bool {
        match self.policy {
            FsyncPolicy::Always => {
                !had_batch
                    && self.head_seq < self.written.0
                    && self.seal_deadline.is_some_and(|d| d <= now)
            }
            FsyncPolicy::Interval => {
                self.written.0 > self.durable.0 && self.last_sync + self.fsync_interval <= now
            }
            FsyncPolicy::Never => false,
        }
    }

    fn append_event(&mut self, event: &AuditEvent) -> Result<(), AuditError> {
        if self.seg_len + self.buf.len() as u64 >= self.segment_size {
            self.rotate()?;
        }
        let range = write_event_line(&mut self.buf, self.next_seq, &self.last_hash, event);
        self.last_hash = hash_line(&self.buf[range]);
        self.next_seq += 1;
        self.since_checkpoint += 1;
        if self.since_checkpoint >= self.checkpoint_every {
            self.append_checkpoint("periodic")?;
        }
        Ok(())
    }

    fn append_checkpoint(&mut self, reason: &str) -> Result<(), AuditError> {
        let ts = unix_nanos(SystemTime::now());
        let sig = self
            .key
            .sign(&checkpoint_message(self.next_seq, &self.last_hash, ts));
        let range = write_checkpoint_line(
            &mut self.buf,
            self.next_seq,
            &self.last_hash,
            ts,
            reason,
            &self.key_bytes,
            &sig,
        );
        self.last_hash = hash_line(&self.buf[range]);
        self.next_seq += 1;
        self.since_checkpoint = 0;
        self.last_checkpoint = Instant::now();
        Ok(())
    }

    fn checkpoint_if_due(&mut self) -> Result<(), AuditError> {
        if self.since_checkpoint > 0 && self.last_checkpoint.elapsed() >= self.checkpoint_interval {
            self.append_checkpoint("periodic")?;
        }
        Ok(())
    }

    fn write_out(&mut self) -> Result<(), AuditError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        self.file
            .write_all_at(&self.buf, self.seg_len)
            .map_err(|e| io_err("cannot write", &self.path, e))?;
        self.seg_len += self.buf.len() as u64;
        self.buf.clear();
        self.written = (self.next_seq - 1, self.last_hash);
        Ok(())
    }

    fn sync(&mut self) -> Result<(), AuditError> {
        let start = Instant::now();
        self.file
            .sync_data()
            .map_err(|e| io_err("cannot sync", &self.path, e))?;
        self.durable = self.written;
        self.last_sync = Instant::now();
        let took = self.last_sync - start;
        self.sync_ewma = (self.sync_ewma * 7 + took) / 8;
        Ok(())
    }

    /// How long to wait for a fuller batch: a quarter of a typical sync, at most
    /// [`MAX_LINGER`].
    fn linger(&self) -> Duration {
        (self.sync_ewma / 4).min(MAX_LINGER)
    }

    fn write_head(&mut self, (seq, hash): (u64, Hash), sealed: bool) -> Result<(), AuditError> {
        self.head_gen += 1;
        let slot = (self.head_gen % 2) as u8;
        let ts = unix_nanos(SystemTime::now());
        let sig = self
            .key
            .sign(&Head::message(self.head_gen, slot, seq, &hash, ts, sealed));
        let head = Head {
            gen: self.head_gen,
            slot,
            seq,
            hash,
            ts,
            sealed,
            key: self.key_bytes,
            sig,
        };
        self.file
            .write_all_at(&head.encode(), u64::from(slot) * SLOT_LEN as u64)
            .map_err(|e| io_err("cannot write the head of", &self.path, e))?;
        self.head_seq = seq;
        Ok(())
    }

    /// Writes what was appended since the last commit, per the fsync policy.
    fn commit(&mut self) -> Result<(), AuditError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        match self.policy {
            FsyncPolicy::Always => {
                // The head for the previous commit (already durable) rides along.
                if self.head_seq < self.durable.0 {
                    self.write_head(self.durable, false)?;
                }
                self.write_out()?;
                self.sync()?;
                self.seal_deadline = Some(Instant::now() + SEAL_DELAY);
            }
            FsyncPolicy::Interval => self.write_out()?,
            FsyncPolicy::Never => {
                self.write_out()?;
                self.write_head(self.written, false)?;
            }
        }
        Ok(())
    }

    /// Makes everything appended durable (per policy) and covered by the signed head.
    fn seal(&mut self, sealed: bool) -> Result<(), AuditError> {
        self.write_out()?;
        let syncing = self.policy != FsyncPolicy::Never;
        if syncing && self.durable != self.written {
            self.sync()?;
        }
        if self.head_seq != self.written.0 || sealed {
            self.write_head(self.written, sealed)?;
            if syncing {
                self.file
                    .sync_data()
                    .map_err(|e| io_err("cannot sync", &self.path, e))?;
            }
        }
        self.seal_deadline = None;
        Ok(())
    }

    /// Closes the active segment (sealed head) and starts the next one with a signed anchor.
    fn rotate(&mut self) -> Result<(), AuditError> {
        self.seal(true)?;
        let first = self.next_seq;
        let path = self.dir.join(segment_file_name(first));
        let (file, seg_len, anchor_hash) = create_segment(
            &path,
            first,
            &self.last_hash,
            "anchor",
            &self.key,
            &self.key_bytes,
        )?;
        if self.policy != FsyncPolicy::Never {
            sync_dir(&self.dir)?;
        }
        self.file = file;
        self.path = path;
        self.seg_len = seg_len;
        self.next_seq = first + 1;
        self.last_hash = anchor_hash;
        self.written = (first, anchor_hash);
        self.durable = (first, anchor_hash);
        self.head_seq = first;
        self.head_gen = 1;
        self.since_checkpoint = 0;
        self.last_checkpoint = Instant::now();
        tracing::debug!(segment = %self.path.display(), "started a new audit segment");
        if let Err(e) = self.apply_retention(SystemTime::now()) {
            tracing::error!(error = %e, "audit retention failed");
        }
        Ok(())
    }

    /// Removes the oldest segments beyond `max_segments` or older than `retention`, after
    /// recording (durably) which sequence number the log now starts at.
    fn apply_retention(&mut self, now: SystemTime) -> Result<RetentionOutcome, AuditError> {
        let segments = list_segments(&self.dir).map_err(|e| io_err("cannot list", &self.dir, e))?;
        let mut remove = 0usize;
        if let Some(max) = self.max_segments {
            remove = segments.len().saturating_sub(max);
        }
        if let Some(retention) = self.retention {
            let cutoff = unix_nanos(now.checked_sub(retention).unwrap_or(SystemTime::UNIX_EPOCH));
            // Segment i is entirely older than the cutoff when its successor's anchor is.
            while remove + 1 < segments.len() {
                match anchor_ts(&segments[remove + 1].1) {
                    Some(ts) if ts < cutoff => remove += 1,
                    _ => break,
                }
            }
        }
        // Never the active segment.
        remove = remove.min(segments.len().saturating_sub(1));
        let first_kept_seq = segments.get(remove).map(|s| s.0).unwrap_or(0);
        if remove == 0 {
            return Ok(RetentionOutcome {
                removed_segments: Vec::new(),
                first_kept_seq: segments.first().map(|s| s.0).unwrap_or(0),
            });
        }
        let names: Vec<String> = segments[..remove]
            .iter()
            .map(|(first, _)| segment_file_name(*first))
            .collect();
        let event = AuditEvent::new(
            AuditEventType::AuditMaintenance,
            None,
            format!(
                "retention: removing {} segment(s) holding seq {}..={}",
                remove,
                segments[0].0,
                first_kept_seq - 1
            ),
        )
        .with("action", "retention")
        .with("first_kept_seq", first_kept_seq.to_string())
        .with("removed_segments", names.join(","));
        self.append_event(&event)?;
        self.seal(false)?;
        for (_, path) in &segments[..remove] {
            fs::remove_file(path).map_err(|e| io_err("cannot remove", path, e))?;
        }
        sync_dir(&self.dir)?;
        tracing::info!(removed = remove, first_kept_seq, "audit retention applied");
        Ok(RetentionOutcome {
            removed_segments: names,
            first_kept_seq,
        })
    }
}

/// Creates segment `path` whose anchor checkpoint is entry `first` (chained to `prev`),
/// with a head already naming the anchor, in one write; synced.
fn create_segment(
    path: &Path,
    first: u64,
    prev: &Hash,
    reason: &str,
    key: &AuditKey,
    key_bytes: &[u8; 32],
) -> Result<(File, u64, Hash), AuditError> {
    let mut bytes = blank_header().to_vec();
    let ts = unix_nanos(SystemTime::now());
    let sig = key.sign(&checkpoint_message(first, prev, ts));
    let range = write_checkpoint_line(&mut bytes, first, prev, ts, reason, key_bytes, &sig);
    let anchor_hash = hash_line(&bytes[range]);
    let head_ts = unix_nanos(SystemTime::now());
    let head = Head {
        gen: 1,
        slot: 1,
        seq: first,
        hash: anchor_hash,
        ts: head_ts,
        sealed: false,
        key: *key_bytes,
        sig: key.sign(&Head::message(1, 1, first, &anchor_hash, head_ts, false)),
    };
    bytes[SLOT_LEN..2 * SLOT_LEN].copy_from_slice(&head.encode());
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| io_err("cannot create", path, e))?;
    file.write_all(&bytes)
        .and_then(|_| file.sync_all())
        .map_err(|e| io_err("cannot write", path, e))?;
    Ok((file, bytes.len() as u64, anchor_hash))
}

/// The timestamp of a segment's anchor (its first line).
fn anchor_ts(path: &Path) -> Option<u64> {
    let file = File::open(path).ok()?;
    let mut buf = vec![0u8; 4096];
    let n = file.read_at(&mut buf, SEGMENT_HEADER_LEN).ok()?;
    let line = &buf[..n];
    let end = memchr::memchr(b'\n', line)?;
    let view = LineView::parse(&line[..end]).ok()?;
    (view.kind == Kind::Checkpoint).then_some(view.ts)
}

/// Scans the newest segment: its signed head, and the longest prefix of entries that are
/// well-formed and chained. Fails when that prefix does not reach what the head signed.
fn recover_segment(
    path: &Path,
    first: u64,
    data: &[u8],
    key_bytes: &[u8; 32],
    public_key: &AuditPublicKey,
) -> Result<Recovered, AuditError> {
    let name = segment_file_name(first);
    if data.len() < SEGMENT_HEADER_LEN as usize {
        return Err(AuditError::Corrupt(format!(
            "{}: {} bytes, shorter than the segment header; run `symbiont audit verify`",
            path.display(),
            data.len()
        )));
    }
    let mut best: Option<Head> = None;
    let mut bad_slot = None;
    for slot in 0..2u8 {
        let bytes = &data[slot as usize * SLOT_LEN..(slot as usize + 1) * SLOT_LEN];
        match Head::decode(bytes) {
            SlotState::Blank => {}
            SlotState::Invalid(why) => bad_slot = Some((slot, why)),
            SlotState::Head(head) => {
                if head.key != *key_bytes {
                    return Err(AuditError::Key(format!(
                        "{name} is signed by audit key {}, but the configured key is {}; \
                         restore the original key file",
                        hex::encode(head.key),
                        hex::encode(key_bytes)
                    )));
                }
                if head.slot != slot || !public_key.verify(&head.own_message(), &head.sig) {
                    bad_slot = Some((slot, "signature does not verify".into()));
                    continue;
                }
                if best.as_ref().is_none_or(|b| head.gen > b.gen) {
                    best = Some(head);
                }
            }
        }
    }
    let Some(head) = best else {
        return Err(AuditError::Corrupt(format!(
            "{name} has no valid signed head; run `symbiont audit verify`"
        )));
    };

    let mut next_seq = first;
    let mut last_hash = ZERO_HASH;
    let mut valid_end = SEGMENT_HEADER_LEN;
    let mut head_hash_seen = None;
    for (offset, line, complete) in
        Lines::new(&data[SEGMENT_HEADER_LEN as usize..], SEGMENT_HEADER_LEN)
    {
        if !complete {
            break;
        }
        let Ok(view) = LineView::parse(line) else {
            break;
        };
        if view.seq != next_seq {
            break;
        }
        if next_seq == first {
            // The anchor: a checkpoint, signed by us; its `prev` is taken as signed.
            let (Some(key), Some(sig), Some(prev)) = (view.key, view.sig, view.prev_hash()) else {
                break;
            };
            if view.kind != Kind::Checkpoint {
                break;
            }
            if key != hex::encode(key_bytes) {
                return Err(AuditError::Key(format!(
                    "{name} is signed by audit key {key}, but the configured key is {}; \
                     restore the original key file",
                    hex::encode(key_bytes)
                )));
            }
            let Some(sig) = super::format::parse_sig(sig) else {
                break;
            };
            if !public_key.verify(&checkpoint_message(view.seq, &prev, view.ts), &sig) {
                break;
            }
        } else {
            if view.prev_hash() != Some(last_hash) {
                break;
            }
            if view.kind == Kind::Checkpoint {
                let (Some(sig), Some(prev)) = (
                    view.sig.and_then(super::format::parse_sig),
                    view.prev_hash(),
                ) else {
                    break;
                };
                if !public_key.verify(&checkpoint_message(view.seq, &prev, view.ts), &sig) {
                    break;
                }
            }
        }
        last_hash = hash_line(line);
        if view.seq == head.seq {
            head_hash_seen = Some(last_hash);
        }
        next_seq += 1;
        valid_end = offset + line.len() as u64 + 1;
    }
    if head_hash_seen != Some(head.hash) {
        let detail = if next_seq <= head.seq {
            format!(
                "the signed head covers seq {} but only entries up to seq {} are intact",
                head.seq,
                next_seq as i128 - 1
            )
        } else {
            format!("entry {} does not match the signed head", head.seq)
        };
        return Err(AuditError::Corrupt(format!(
            "{}: {detail}; refusing to repair signed entries away, run `symbiont audit verify`",
            path.display()
        )));
    }
    Ok(Recovered {
        next_seq,
        last_hash,
        valid_end,
        head,
        bad_slot,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> AuditConfig {
        AuditConfig {
            segment_size: super::super::MIN_SEGMENT_SIZE,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn events_are_chained_signed_and_verify() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = AuditKey::from_seed(&[3; 32]);
        let public = key.public_key();
        let trail = DurableAuditTrail::open_with_key(&config(), dir.path().join("audit"), key)
            .expect("open");
        for i in 0..10 {
            trail
                .record_event(AuditEvent::new(
                    AuditEventType::TaskStarted,
                    None,
                    format!("task {i}"),
                ))
                .await
                .expect("record");
        }
        trail.flush().await.expect("flush");
        let report = verify_dir(trail.dir(), &public).expect("verify");
        assert!(report.is_ok(), "{report}");
        assert_eq!(report.events, 10);
        assert_eq!(report.unsigned_tail, 0);
        trail.close().await.expect("close");
        let err = trail
            .record_event(AuditEvent::new(AuditEventType::TaskStarted, None, "late"))
            .await
            .expect_err("closed");
        assert_eq!(err.code(), "AUDIT_001");
    }

    #[tokio::test]
    async fn submit_blocks_at_capacity_instead_of_growing_memory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = AuditConfig {
            queue_capacity: 4,
            fsync: FsyncPolicy::Never,
            ..config()
        };
        let trail = Arc::new(
            DurableAuditTrail::open_with_key(
                &cfg,
                dir.path().into(),
                AuditKey::from_seed(&[4; 32]),
            )
            .expect("open"),
        );
        let t = Arc::clone(&trail);
        tokio::task::spawn_blocking(move || {
            for i in 0..1000 {
                t.submit(AuditEvent::new(
                    AuditEventType::TaskStarted,
                    None,
                    format!("{i}"),
                ));
                assert!(t.shared.state.lock().queue.len() <= 4);
            }
        })
        .await
        .expect("join");
        trail.flush().await.expect("flush");
        assert_eq!(
            trail.query(&AuditQuery::default()).expect("query").len(),
            1000
        );
    }

    #[test]
    fn seal_is_due_only_when_idle_past_the_delay() {
        // A seal deadline in the past and no batch: due. With a batch: the commit carried
        // the head, not due.
        let dir = tempfile::tempdir().expect("tempdir");
        let mut log =
            SegmentLog::open(&config(), dir.path(), AuditKey::from_seed(&[5; 32])).expect("open");
        log.append_event(&AuditEvent::new(AuditEventType::TaskStarted, None, "x"))
            .expect("append");
        log.commit().expect("commit");
        assert!(log.head_seq < log.written.0);
        let later = Instant::now() + SEAL_DELAY * 2;
        assert!(log.seal_due(later, false));
        assert!(!log.seal_due(later, true));
        assert!(!log.seal_due(Instant::now() - SEAL_DELAY, false));
        log.seal(false).expect("seal");
        assert_eq!(log.head_seq, log.written.0);
        assert!(!log.seal_due(later, false));
    }
}
