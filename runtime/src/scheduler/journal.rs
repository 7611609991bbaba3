//! Write-ahead persistence of task records: one writer thread group-commits every write
//! queued while the previous commit was running into one atomic [`Store::apply`] batch.
//!
//! Awaited writes ([`Journal::write`]) return once their batch is committed; submitted
//! writes ([`Journal::submit`]) are ordered with them but not awaited (used for final
//! statuses, where losing the write means at worst one more execution after a crash).

use std::sync::mpsc;
use std::sync::Arc;

use tokio::sync::oneshot;

use super::{TaskRecord, TASKS_TABLE};
use crate::storage::{encode_json, StorageError, Store, StoreOp};

/// Most writes folded into one commit.
const MAX_BATCH: usize = 8192;

struct Job {
    ops: Vec<StoreOp>,
    ack: Option<oneshot::Sender<Result<(), String>>>,
}

/// The handle of the writer thread; the thread ends when the last handle is dropped.
pub(crate) struct Journal {
    tx: mpsc::Sender<Job>,
}

impl Journal {
    /// Starts the writer thread over `store`.
    pub(crate) fn start(store: Arc<dyn Store>) -> Result<Self, StorageError> {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("symbiont-sched-journal".into())
            .spawn(move || writer(store, rx))
            .map_err(|e| StorageError::Backend(format!("spawn journal thread: {e}")))?;
        Ok(Self { tx })
    }

    /// Commits `ops` (atomically, possibly with other writes) and waits for the commit.
    pub(crate) async fn write(&self, ops: Vec<StoreOp>) -> Result<(), StorageError> {
        let (ack, done) = oneshot::channel();
        self.tx
            .send(Job {
                ops,
                ack: Some(ack),
            })
            .map_err(|_| StorageError::Backend("journal thread is gone".into()))?;
        match done.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(message)) => Err(StorageError::Backend(message)),
            Err(_) => Err(StorageError::Backend("journal thread is gone".into())),
        }
    }

    /// Queues `ops` for the next commit without waiting.
    pub(crate) fn submit(&self, ops: Vec<StoreOp>) {
        if self.tx.send(Job { ops, ack: None }).is_err() {
            tracing::error!("scheduler journal thread is gone; a task record was not persisted");
        }
    }
}

fn writer(store: Arc<dyn Store>, rx: mpsc::Receiver<Job>) {
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        while jobs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        let ops: Vec<StoreOp> = jobs.iter_mut().flat_map(|j| j.ops.drain(..)).collect();
        let result = store.apply(&ops).map_err(|e| e.to_string());
        if let Err(e) = &result {
            tracing::error!(error = %e, writes = ops.len(), "scheduler journal commit failed");
        }
        for job in jobs {
            if let Some(ack) = job.ack {
                let _ = ack.send(result.clone());
            }
        }
    }
}

/// The store write for `record`.
pub(crate) fn put_op(record: &TaskRecord) -> Result<StoreOp, StorageError> {
    Ok(StoreOp::Put {
        table: TASKS_TABLE.to_string(),
        key: record.task.id.to_string(),
        value: encode_json(record)?,
    })
}

/// The store write forgetting task `key`.
pub(crate) fn delete_op(key: String) -> StoreOp {
    StoreOp::Delete {
        table: TASKS_TABLE.to_string(),
        key,
    }
}
