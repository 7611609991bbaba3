//! The ready queue (strict priority with aging) and the delay queue (by due instant).
//!
//! Rank of a ready task: `ready_since − level × aging_interval` in nanoseconds since the
//! scheduler's epoch; the smallest rank (then the lowest sequence number) is served first.
//! See the module documentation of [`crate::scheduler`] for what this guarantees.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Duration;

use tokio::time::Instant;

use crate::types::{Priority, TaskId};

/// The aging level of a priority: Low 0, Normal 1, High 2, Critical 3.
pub(crate) fn level(priority: Priority) -> i128 {
    match priority {
        Priority::Low => 0,
        Priority::Normal => 1,
        Priority::High => 2,
        Priority::Critical => 3,
    }
}

/// The rank of a task of `priority` that became ready at `ready_since`.
pub(crate) fn rank(
    epoch: Instant,
    ready_since: Instant,
    priority: Priority,
    aging_interval: Duration,
) -> i128 {
    let since = ready_since.saturating_duration_since(epoch).as_nanos() as i128;
    since - level(priority) * aging_interval.as_nanos() as i128
}

/// Ready tasks by (rank, sequence). Entries may be stale (cancelled tasks); the caller
/// checks each popped id against its table.
#[derive(Debug, Default)]
pub(crate) struct ReadyQueue {
    heap: BinaryHeap<Reverse<(i128, u64, TaskId)>>,
}

impl ReadyQueue {
    pub(crate) fn push(&mut self, rank: i128, seq: u64, id: TaskId) {
        self.heap.push(Reverse((rank, seq, id)));
    }

    pub(crate) fn pop(&mut self) -> Option<(i128, u64, TaskId)> {
        self.heap.pop().map(|Reverse(e)| e)
    }

    fn peek(&self) -> Option<(i128, u64)> {
        self.heap.peek().map(|Reverse((r, s, _))| (*r, *s))
    }
}

/// Two ready queues ranked alike: Critical tasks and the others, so that Critical tasks can
/// use reserved slots while the others' slots are full.
#[derive(Debug, Default)]
pub(crate) struct ReadyQueues {
    critical: ReadyQueue,
    other: ReadyQueue,
}

impl ReadyQueues {
    pub(crate) fn push(&mut self, rank: i128, seq: u64, id: TaskId, priority: Priority) {
        if priority == Priority::Critical {
            self.critical.push(rank, seq, id);
        } else {
            self.other.push(rank, seq, id);
        }
    }

    /// Pops the best-ranked task; only Critical ones unless `allow_other`.
    pub(crate) fn pop(&mut self, allow_other: bool) -> Option<(i128, u64, TaskId)> {
        let other = if allow_other { self.other.peek() } else { None };
        match (self.critical.peek(), other) {
            (Some(c), Some(o)) if o < c => self.other.pop(),
            (Some(_), _) => self.critical.pop(),
            (None, Some(_)) => self.other.pop(),
            (None, None) => None,
        }
    }
}

/// Tasks not due yet, by due instant.
#[derive(Debug, Default)]
pub(crate) struct DelayQueue {
    heap: BinaryHeap<Reverse<(Instant, u64, TaskId)>>,
}

impl DelayQueue {
    pub(crate) fn push(&mut self, due: Instant, seq: u64, id: TaskId) {
        self.heap.push(Reverse((due, seq, id)));
    }

    /// The earliest due instant.
    pub(crate) fn next_due(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse((due, _, _))| *due)
    }

    /// Pops one entry due at or before `now`.
    pub(crate) fn pop_due(&mut self, now: Instant) -> Option<(Instant, TaskId)> {
        match self.heap.peek() {
            Some(Reverse((due, _, _))) if *due <= now => {
                self.heap.pop().map(|Reverse((due, _, id))| (due, id))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_time_tasks_pop_by_priority_then_fifo() {
        let epoch = Instant::now();
        let aging = Duration::from_secs(10);
        let mut q = ReadyQueue::default();
        let ids: Vec<TaskId> = (0..5).map(|_| TaskId::new()).collect();
        let prios = [
            Priority::Low,
            Priority::Critical,
            Priority::Normal,
            Priority::High,
            Priority::Critical,
        ];
        for (seq, (id, p)) in ids.iter().zip(prios).enumerate() {
            q.push(rank(epoch, epoch, p, aging), seq as u64, *id);
        }
        let order: Vec<TaskId> = std::iter::from_fn(|| q.pop().map(|e| e.2)).collect();
        assert_eq!(order, [ids[1], ids[4], ids[3], ids[2], ids[0]]);
    }

    #[test]
    fn a_low_task_overtakes_high_tasks_that_became_ready_two_intervals_later() {
        let epoch = Instant::now();
        let aging = Duration::from_secs(10);
        let mut q = ReadyQueue::default();
        let low = TaskId::new();
        q.push(rank(epoch, epoch, Priority::Low, aging), 0, low);
        let high_early = TaskId::new();
        q.push(
            rank(
                epoch,
                epoch + Duration::from_secs(19),
                Priority::High,
                aging,
            ),
            1,
            high_early,
        );
        let high_late = TaskId::new();
        q.push(
            rank(
                epoch,
                epoch + Duration::from_secs(21),
                Priority::High,
                aging,
            ),
            2,
            high_late,
        );
        assert_eq!(q.pop().map(|e| e.2), Some(high_early));
        assert_eq!(q.pop().map(|e| e.2), Some(low));
        assert_eq!(q.pop().map(|e| e.2), Some(high_late));
    }

    #[test]
    fn ready_queues_merge_by_rank_and_can_serve_critical_only() {
        let epoch = Instant::now();
        let aging = Duration::from_secs(1);
        let mut q = ReadyQueues::default();
        let old_low = TaskId::new();
        let crit = TaskId::new();
        let high = TaskId::new();
        // A Low task aged 10 s outranks a fresh Critical one.
        q.push(
            rank(epoch, epoch, Priority::Low, aging),
            0,
            old_low,
            Priority::Low,
        );
        let later = epoch + Duration::from_secs(10);
        q.push(
            rank(epoch, later, Priority::Critical, aging),
            1,
            crit,
            Priority::Critical,
        );
        q.push(
            rank(epoch, later, Priority::High, aging),
            2,
            high,
            Priority::High,
        );
        assert_eq!(q.pop(false).map(|e| e.2), Some(crit));
        assert_eq!(q.pop(false), None);
        assert_eq!(q.pop(true).map(|e| e.2), Some(old_low));
        assert_eq!(q.pop(true).map(|e| e.2), Some(high));
    }

    #[test]
    fn delay_queue_releases_only_due_entries_in_order() {
        let now = Instant::now();
        let mut q = DelayQueue::default();
        let (a, b) = (TaskId::new(), TaskId::new());
        q.push(now + Duration::from_secs(2), 0, b);
        q.push(now + Duration::from_secs(1), 1, a);
        assert_eq!(q.next_due(), Some(now + Duration::from_secs(1)));
        assert!(q.pop_due(now).is_none());
        assert_eq!(
            q.pop_due(now + Duration::from_secs(5)).map(|e| e.1),
            Some(a)
        );
        assert_eq!(
            q.pop_due(now + Duration::from_secs(5)).map(|e| e.1),
            Some(b)
        );
    }
}
