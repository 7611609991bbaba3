//! The embedded store: a small keyed-table trait ([`Store`]) with a durable SQLite backend
//! ([`SqliteStore`], WAL, `synchronous=FULL` by default) and an in-memory one
//! ([`MemoryStore`]) for tests and ephemeral runs.
//!
//! Components keep their own records (agents, tasks, keys, ...) as serialized values in
//! named tables; the store only promises that a write that returned `Ok` survives a crash
//! (with `sync = "full"`) and that [`Store::apply`] batches are atomic.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;
use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::config::{ConfigIssue, Validate};

/// Errors of the embedded store.
#[derive(Debug, Error)]
pub enum StorageError {
    /// The database could not be opened, read or written.
    #[error("storage error: {0}")]
    Backend(String),
    /// A stored record could not be decoded.
    #[error("corrupt record {table}/{key}: {message}")]
    Corrupt {
        /// Table.
        table: String,
        /// Key.
        key: String,
        /// Decoder message.
        message: String,
    },
}

impl StorageError {
    /// Stable code: STORAGE_001 backend failure, STORAGE_002 corrupt record.
    pub fn code(&self) -> &'static str {
        match self {
            StorageError::Backend(_) => "STORAGE_001",
            StorageError::Corrupt { .. } => "STORAGE_002",
        }
    }
}

impl From<rusqlite::Error> for StorageError {
    fn from(e: rusqlite::Error) -> Self {
        StorageError::Backend(e.to_string())
    }
}

/// One write of an atomic batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreOp {
    /// Insert or replace `table/key`.
    Put {
        /// Table.
        table: String,
        /// Key.
        key: String,
        /// Value.
        value: Vec<u8>,
    },
    /// Remove `table/key` (no error when absent).
    Delete {
        /// Table.
        table: String,
        /// Key.
        key: String,
    },
}

/// A durable keyed-table store. Calls are synchronous and short; call them from
/// `spawn_blocking` when on a latency-sensitive async path.
pub trait Store: Send + Sync + 'static {
    /// Inserts or replaces `table/key`.
    fn put(&self, table: &str, key: &str, value: &[u8]) -> Result<(), StorageError>;
    /// Reads `table/key`.
    fn get(&self, table: &str, key: &str) -> Result<Option<Vec<u8>>, StorageError>;
    /// Removes `table/key`; true when it existed.
    fn delete(&self, table: &str, key: &str) -> Result<bool, StorageError>;
    /// Every entry of `table`, ordered by key.
    fn scan(&self, table: &str) -> Result<Vec<(String, Vec<u8>)>, StorageError>;
    /// Applies all `ops` atomically: all or none survive a crash.
    fn apply(&self, ops: &[StoreOp]) -> Result<(), StorageError>;

    /// Stores `value` as JSON.
    fn put_json<T: Serialize>(&self, table: &str, key: &str, value: &T) -> Result<(), StorageError>
    where
        Self: Sized,
    {
        let bytes = serde_json::to_vec(value).map_err(|e| StorageError::Corrupt {
            table: table.into(),
            key: key.into(),
            message: e.to_string(),
        })?;
        self.put(table, key, &bytes)
    }
}

/// Decodes a JSON value read from `table/key`.
pub fn decode_json<T: for<'de> Deserialize<'de>>(
    table: &str,
    key: &str,
    bytes: &[u8],
) -> Result<T, StorageError> {
    serde_json::from_slice(bytes).map_err(|e| StorageError::Corrupt {
        table: table.into(),
        key: key.into(),
        message: e.to_string(),
    })
}

/// Encodes `value` as JSON for [`Store::put`].
pub fn encode_json<T: Serialize>(value: &T) -> Result<Vec<u8>, StorageError> {
    serde_json::to_vec(value).map_err(|e| StorageError::Backend(format!("encode: {e}")))
}

/// Which store backend to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum StorageBackend {
    /// SQLite file under `data_dir` (durable).
    #[default]
    Sqlite,
    /// In memory only (lost at exit).
    Memory,
}

/// How hard SQLite syncs a commit to disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SyncMode {
    /// fsync on every commit: nothing acknowledged is lost on power failure.
    #[default]
    Full,
    /// fsync at WAL checkpoints only: survives a process crash, not a power cut.
    Normal,
}

/// `[storage]` configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Backend.
    pub backend: StorageBackend,
    /// Directory for the runtime's durable state (database, audit log, keys).
    pub data_dir: PathBuf,
    /// SQLite sync mode.
    pub sync: SyncMode,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            backend: StorageBackend::Sqlite,
            data_dir: PathBuf::from("/var/lib/symbiont"),
            sync: SyncMode::Full,
        }
    }
}

impl Validate for StorageConfig {
    fn validate(&self, issues: &mut Vec<ConfigIssue>) {
        if self.data_dir.as_os_str().is_empty() {
            issues.push(ConfigIssue::new("storage.data_dir", "must not be empty"));
        }
    }
}

impl StorageConfig {
    /// Opens the configured store (creating `data_dir` when needed).
    pub fn open(&self) -> Result<Arc<dyn Store>, StorageError> {
        Ok(match self.backend {
            StorageBackend::Memory => Arc::new(MemoryStore::new()),
            StorageBackend::Sqlite => {
                std::fs::create_dir_all(&self.data_dir).map_err(|e| {
                    StorageError::Backend(format!("create {}: {e}", self.data_dir.display()))
                })?;
                Arc::new(SqliteStore::open(
                    self.data_dir.join("state.db"),
                    self.sync,
                )?)
            }
        })
    }
}

/// A [`Store`] in one SQLite database file (WAL journal).
pub struct SqliteStore {
    conn: Mutex<Connection>,
    path: PathBuf,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish()
    }
}

impl SqliteStore {
    /// Opens (or creates) the database at `path`.
    pub fn open(path: impl AsRef<Path>, sync: SyncMode) -> Result<Self, StorageError> {
        let path = path.as_ref().to_path_buf();
        let conn = Connection::open(&path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(
            None,
            "synchronous",
            match sync {
                SyncMode::Full => "FULL",
                SyncMode::Normal => "NORMAL",
            },
        )?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS kv (
                tbl   TEXT NOT NULL,
                key   TEXT NOT NULL,
                value BLOB NOT NULL,
                PRIMARY KEY (tbl, key)
            ) WITHOUT ROWID;",
        )?;
        Ok(Self {
            conn: Mutex::new(conn),
            path,
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Store for SqliteStore {
    fn put(&self, table: &str, key: &str, value: &[u8]) -> Result<(), StorageError> {
        self.conn
            .lock()
            .prepare_cached("INSERT OR REPLACE INTO kv (tbl, key, value) VALUES (?1, ?2, ?3)")?
            .execute(params![table, key, value])?;
        Ok(())
    }

    fn get(&self, table: &str, key: &str) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self
            .conn
            .lock()
            .prepare_cached("SELECT value FROM kv WHERE tbl = ?1 AND key = ?2")?
            .query_row(params![table, key], |row| row.get(0))
            .optional()?)
    }

    fn delete(&self, table: &str, key: &str) -> Result<bool, StorageError> {
        let n = self
            .conn
            .lock()
            .prepare_cached("DELETE FROM kv WHERE tbl = ?1 AND key = ?2")?
            .execute(params![table, key])?;
        Ok(n > 0)
    }

    fn scan(&self, table: &str) -> Result<Vec<(String, Vec<u8>)>, StorageError> {
        let conn = self.conn.lock();
        let mut stmt =
            conn.prepare_cached("SELECT key, value FROM kv WHERE tbl = ?1 ORDER BY key")?;
        let rows = stmt.query_map(params![table], |row| Ok((row.get(0)?, row.get(1)?)))?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    fn apply(&self, ops: &[StoreOp]) -> Result<(), StorageError> {
        let mut conn = self.conn.lock();
        let tx = conn.transaction()?;
        for op in ops {
            match op {
                StoreOp::Put { table, key, value } => {
                    tx.prepare_cached(
                        "INSERT OR REPLACE INTO kv (tbl, key, value) VALUES (?1, ?2, ?3)",
                    )?
                    .execute(params![table, key, value])?;
                }
                StoreOp::Delete { table, key } => {
                    tx.prepare_cached("DELETE FROM kv WHERE tbl = ?1 AND key = ?2")?
                        .execute(params![table, key])?;
                }
            }
        }
        tx.commit()?;
        Ok(())
    }
}

/// A [`Store`] held in memory (nothing survives the process).
#[derive(Debug, Default)]
pub struct MemoryStore {
    tables: Mutex<BTreeMap<String, BTreeMap<String, Vec<u8>>>>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Store for MemoryStore {
    fn put(&self, table: &str, key: &str, value: &[u8]) -> Result<(), StorageError> {
        self.tables
            .lock()
            .entry(table.to_string())
            .or_default()
            .insert(key.to_string(), value.to_vec());
        Ok(())
    }

    fn get(&self, table: &str, key: &str) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self
            .tables
            .lock()
            .get(table)
            .and_then(|t| t.get(key).cloned()))
    }

    fn delete(&self, table: &str, key: &str) -> Result<bool, StorageError> {
        Ok(self
            .tables
            .lock()
            .get_mut(table)
            .map(|t| t.remove(key).is_some())
            .unwrap_or(false))
    }

    fn scan(&self, table: &str) -> Result<Vec<(String, Vec<u8>)>, StorageError> {
        Ok(self
            .tables
            .lock()
            .get(table)
            .map(|t| t.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default())
    }

    fn apply(&self, ops: &[StoreOp]) -> Result<(), StorageError> {
        let mut tables = self.tables.lock();
        for op in ops {
            match op {
                StoreOp::Put { table, key, value } => {
                    tables
                        .entry(table.clone())
                        .or_default()
                        .insert(key.clone(), value.clone());
                }
                StoreOp::Delete { table, key } => {
                    if let Some(t) = tables.get_mut(table) {
                        t.remove(key);
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exercise(store: &dyn Store) {
        store.put("t", "b", b"2").expect("put");
        store.put("t", "a", b"1").expect("put");
        store.put("u", "a", b"x").expect("put");
        assert_eq!(store.get("t", "a").expect("get"), Some(b"1".to_vec()));
        assert_eq!(store.get("t", "zz").expect("get"), None);
        let keys: Vec<_> = store
            .scan("t")
            .expect("scan")
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(keys, ["a", "b"]);
        assert!(store.delete("t", "a").expect("delete"));
        assert!(!store.delete("t", "a").expect("delete"));
        store
            .apply(&[
                StoreOp::Put {
                    table: "t".into(),
                    key: "c".into(),
                    value: b"3".to_vec(),
                },
                StoreOp::Delete {
                    table: "t".into(),
                    key: "b".into(),
                },
            ])
            .expect("apply");
        let keys: Vec<_> = store
            .scan("t")
            .expect("scan")
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(keys, ["c"]);
    }

    #[test]
    fn memory_store_behaves_like_a_store() {
        exercise(&MemoryStore::new());
    }

    #[test]
    fn sqlite_store_behaves_like_a_store_and_persists() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.db");
        {
            let store = SqliteStore::open(&path, SyncMode::Full).expect("open");
            exercise(&store);
        }
        let store = SqliteStore::open(&path, SyncMode::Full).expect("reopen");
        assert_eq!(store.get("t", "c").expect("get"), Some(b"3".to_vec()));
        assert_eq!(store.get("u", "a").expect("get"), Some(b"x".to_vec()));
    }
}
