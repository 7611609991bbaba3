//! Bounded priority mailboxes, the anti-replay window and the dead-letter queue.
//!
//! A mailbox holds sealed envelopes (ciphertext) in one FIFO queue per priority and hands
//! them out `Critical` first. It is bounded in messages and in bytes: a sender first
//! *reserves* room (waiting for a receiver to make space, up to the delivery timeout), then
//! seals and pushes, so a slow consumer can never make the bus hold unbounded memory.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::Notify;

use super::crypto::{Envelope, MessageKind};
use crate::types::{AgentId, MessageId, Priority};

fn prio_index(p: Priority) -> usize {
    match p {
        Priority::Low => 0,
        Priority::Normal => 1,
        Priority::High => 2,
        Priority::Critical => 3,
    }
}

#[derive(Default)]
struct Inner {
    queues: [VecDeque<Envelope>; 4],
    len: usize,
    bytes: usize,
    reserved: usize,
    reserved_bytes: usize,
    closed: bool,
}

/// What `Mailbox::reserve` found.
pub(crate) enum Reserve {
    /// Room is reserved; call `push` or `release`.
    Reserved,
    /// Full: wait for `writable` and try again.
    Full,
    /// The mailbox is closed (its agent was unregistered).
    Closed,
}

/// One agent's inbox.
pub(crate) struct Mailbox {
    inner: Mutex<Inner>,
    /// Signalled when envelopes arrive.
    pub readable: Notify,
    /// Signalled when room is freed.
    pub writable: Notify,
    capacity: usize,
    max_bytes: usize,
}

impl Mailbox {
    pub fn new(capacity: usize, max_bytes: usize) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            readable: Notify::new(),
            writable: Notify::new(),
            capacity,
            max_bytes,
        }
    }

    /// Reserves room for one envelope of about `size` bytes.
    pub fn reserve(&self, size: usize) -> Reserve {
        let mut g = self.inner.lock();
        if g.closed {
            return Reserve::Closed;
        }
        let count_ok = g.len + g.reserved < self.capacity;
        // An empty mailbox always admits one message (max_message_size <= max_bytes is
        // validated, but be safe).
        let bytes_ok =
            g.bytes + g.reserved_bytes + size <= self.max_bytes || g.len + g.reserved == 0;
        if count_ok && bytes_ok {
            g.reserved += 1;
            g.reserved_bytes += size;
            Reserve::Reserved
        } else {
            Reserve::Full
        }
    }

    /// Gives back a reservation that will not be used.
    pub fn release(&self, size: usize) {
        {
            let mut g = self.inner.lock();
            g.reserved = g.reserved.saturating_sub(1);
            g.reserved_bytes = g.reserved_bytes.saturating_sub(size);
        }
        self.writable.notify_waiters();
    }

    /// Pushes a sealed envelope into a reserved slot. Returns it back when the mailbox was
    /// closed meanwhile.
    pub fn push(&self, reserved_size: usize, env: Envelope) -> Result<(), Box<Envelope>> {
        {
            let mut g = self.inner.lock();
            g.reserved = g.reserved.saturating_sub(1);
            g.reserved_bytes = g.reserved_bytes.saturating_sub(reserved_size);
            if g.closed {
                return Err(Box::new(env));
            }
            g.len += 1;
            g.bytes += env.size();
            g.queues[prio_index(env.header.priority)].push_back(env);
        }
        self.readable.notify_waiters();
        Ok(())
    }

    /// Takes up to `max` envelopes, highest priority first, FIFO within a priority.
    /// Envelopes whose `expires_ms` is before `now_ms` are returned separately.
    pub fn pop(&self, max: usize, now_ms: u64) -> (Vec<Envelope>, Vec<Envelope>) {
        let mut live = Vec::new();
        let mut expired = Vec::new();
        {
            let mut g = self.inner.lock();
            'outer: for q in (0..4).rev() {
                while live.len() < max {
                    let Some(env) = g.queues[q].pop_front() else {
                        continue 'outer;
                    };
                    g.len -= 1;
                    g.bytes = g.bytes.saturating_sub(env.size());
                    if env.header.expires_ms <= now_ms {
                        expired.push(env);
                    } else {
                        live.push(env);
                    }
                }
                break;
            }
        }
        if !live.is_empty() || !expired.is_empty() {
            self.writable.notify_waiters();
        }
        (live, expired)
    }

    /// Removes every expired envelope.
    pub fn take_expired(&self, now_ms: u64) -> Vec<Envelope> {
        let mut out = Vec::new();
        {
            let mut g = self.inner.lock();
            let mut freed = 0usize;
            let mut bytes = 0usize;
            for q in g.queues.iter_mut() {
                q.retain(|e| {
                    if e.header.expires_ms <= now_ms {
                        freed += 1;
                        bytes += e.size();
                        out.push(e.clone());
                        false
                    } else {
                        true
                    }
                });
            }
            g.len -= freed;
            g.bytes = g.bytes.saturating_sub(bytes);
        }
        if !out.is_empty() {
            self.writable.notify_waiters();
        }
        out
    }

    /// Closes the mailbox and returns what it held.
    pub fn close(&self) -> Vec<Envelope> {
        let out: Vec<Envelope> = {
            let mut g = self.inner.lock();
            g.closed = true;
            g.len = 0;
            g.bytes = 0;
            g.queues.iter_mut().flat_map(|q| q.drain(..)).collect()
        };
        self.readable.notify_waiters();
        self.writable.notify_waiters();
        out
    }

    pub fn is_closed(&self) -> bool {
        self.inner.lock().closed
    }

    /// (messages, bytes) held.
    pub fn usage(&self) -> (usize, usize) {
        let g = self.inner.lock();
        (g.len, g.bytes)
    }
}

/// Sliding anti-replay window over sequence numbers (RFC 4303 style, ring bitmap).
pub(crate) struct ReplayWindow {
    top: u64,
    bits: Vec<u64>,
}

impl ReplayWindow {
    /// A window remembering the last `size` sequence numbers (rounded up to 64).
    pub fn new(size: usize) -> Self {
        Self {
            top: 0,
            bits: vec![0; size.div_ceil(64).max(1)],
        }
    }

    fn width(&self) -> u64 {
        (self.bits.len() * 64) as u64
    }

    fn bit(&self, seq: u64) -> (usize, u64) {
        let i = seq % self.width();
        ((i / 64) as usize, 1u64 << (i % 64))
    }

    /// Whether `seq` would be accepted (not seen, not too old), without remembering it.
    pub fn check(&self, seq: u64) -> Result<(), &'static str> {
        if seq == 0 {
            return Err("sequence number 0 is never valid");
        }
        if seq > self.top {
            return Ok(());
        }
        if self.top - seq >= self.width() {
            return Err("sequence number is older than the replay window");
        }
        let (i, m) = self.bit(seq);
        if self.bits[i] & m != 0 {
            return Err("sequence number already seen");
        }
        Ok(())
    }

    /// True (and remembered) when `seq` was not seen before and is not too old.
    pub fn check_and_mark(&mut self, seq: u64) -> Result<(), &'static str> {
        if seq == 0 {
            return Err("sequence number 0 is never valid");
        }
        let w = self.width();
        if seq > self.top {
            if seq - self.top >= w {
                self.bits.iter_mut().for_each(|b| *b = 0);
            } else {
                for s in self.top + 1..seq {
                    let (i, m) = self.bit(s);
                    self.bits[i] &= !m;
                }
            }
            self.top = seq;
            let (i, m) = self.bit(seq);
            self.bits[i] |= m;
            return Ok(());
        }
        if self.top - seq >= w {
            return Err("sequence number is older than the replay window");
        }
        let (i, m) = self.bit(seq);
        if self.bits[i] & m != 0 {
            return Err("sequence number already seen");
        }
        self.bits[i] |= m;
        Ok(())
    }
}

/// Why a message ended in the dead-letter queue.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum DeadLetterReason {
    /// Its TTL elapsed before it was delivered.
    Expired,
    /// The recipient's mailbox stayed full for the whole delivery timeout.
    MailboxFull,
    /// The recipient was unregistered while it waited.
    RecipientGone,
    /// Verification refused it (the code and reason are those of the SEC_001 rejection).
    Rejected {
        /// Stable error code.
        code: String,
        /// Why.
        reason: String,
    },
    /// A reply for a request nobody waits for any more (timed out or unknown).
    ReplyUnclaimed,
    /// The sandbox bridge closed before the message could be written to the agent.
    BridgeClosed,
}

/// One dead letter: the message's metadata, why, and the sealed envelope when there is one
/// (ciphertext only: the dead-letter queue never holds a plaintext payload when encryption is
/// on).
#[derive(Clone, Debug)]
pub struct DeadLetter {
    /// Message id.
    pub message_id: MessageId,
    /// Sender.
    pub from: AgentId,
    /// Recipient.
    pub to: AgentId,
    /// Topic.
    pub topic: String,
    /// Priority.
    pub priority: Priority,
    /// Kind.
    pub kind: MessageKind,
    /// Payload size in bytes.
    pub size: usize,
    /// Why.
    pub reason: DeadLetterReason,
    /// When it was dead-lettered.
    pub at: SystemTime,
    /// The sealed envelope, when the message had been sealed.
    pub envelope: Option<Envelope>,
}

/// A bounded queue of dead letters; the oldest are dropped (and counted) when full.
pub(crate) struct DeadLetterQueue {
    items: Mutex<VecDeque<DeadLetter>>,
    capacity: usize,
    dropped: AtomicU64,
    total: AtomicU64,
}

impl DeadLetterQueue {
    pub fn new(capacity: usize) -> Self {
        Self {
            items: Mutex::new(VecDeque::new()),
            capacity,
            dropped: AtomicU64::new(0),
            total: AtomicU64::new(0),
        }
    }

    pub fn push(&self, letter: DeadLetter) {
        self.total.fetch_add(1, Ordering::Relaxed);
        let mut q = self.items.lock();
        while q.len() >= self.capacity.max(1) {
            q.pop_front();
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        q.push_back(letter);
    }

    pub fn snapshot(&self) -> Vec<DeadLetter> {
        self.items.lock().iter().cloned().collect()
    }

    pub fn drain(&self) -> Vec<DeadLetter> {
        self.items.lock().drain(..).collect()
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.items.lock().len()
    }

    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_window_accepts_each_sequence_once_within_the_window() {
        let mut w = ReplayWindow::new(128);
        assert!(w.check_and_mark(0).is_err());
        assert!(w.check(5).is_ok());
        assert!(w.check(5).is_ok(), "check does not remember");
        for s in [5u64, 3, 4, 10, 1] {
            assert!(w.check_and_mark(s).is_ok(), "{s}");
        }
        for s in [5u64, 3, 4, 10, 1] {
            assert!(w.check_and_mark(s).is_err(), "replay {s}");
        }
        assert!(w.check_and_mark(2).is_ok());
        assert!(w.check_and_mark(200).is_ok());
        assert!(w.check_and_mark(10).is_err(), "too old");
        assert!(w.check_and_mark(73).is_ok(), "inside window, unseen");
        assert!(w.check_and_mark(73).is_err());
        // Bits of skipped numbers were cleared when the window advanced.
        assert!(w.check_and_mark(199).is_ok());
        assert!(w.check_and_mark(1000).is_ok());
        assert!(w.check_and_mark(999).is_ok());
        assert!(w.check_and_mark(1000).is_err());
    }

    #[test]
    fn dead_letter_queue_is_bounded() {
        let q = DeadLetterQueue::new(2);
        for _ in 0..5 {
            q.push(DeadLetter {
                message_id: MessageId::new(),
                from: AgentId::new(),
                to: AgentId::new(),
                topic: "t".into(),
                priority: Priority::Low,
                kind: MessageKind::Direct,
                size: 1,
                reason: DeadLetterReason::Expired,
                at: SystemTime::now(),
                envelope: None,
            });
        }
        assert_eq!(q.len(), 2);
        assert_eq!(q.dropped(), 3);
        assert_eq!(q.total(), 5);
    }
}
