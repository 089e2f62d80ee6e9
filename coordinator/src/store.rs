//! The coordinator's durable state in one redb file.
//!
//! redb was chosen over SQLite because it is pure Rust (no C build), ACID with
//! fsync'd commits by default, and needs no schema migrations for the few
//! key–value tables used here. What is stored:
//!
//! - `meta`: the run configuration (JSON), the latest committed version, the
//!   agreed feature statistics and the strategy's optimiser state;
//! - `models`: every committed global model version, as little-endian f32
//!   bytes cut into chunks just under 1 MiB (redb gives large values
//!   power-of-two allocations), keyed by (version, chunk index);
//! - `versions`: per version, its length and the SHA-256 of its bytes;
//! - `history`: one JSON record per round attempt and per evaluation.
//!
//! A version becomes visible only in the same write transaction that stores
//! its chunks and its round record, so a crash at any moment leaves either
//! the old state or the new one, never a torn model.

use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use sha2_digest::sha256_hex;
use thiserror::Error;

use crate::record::RoundRecord;

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const MODELS: TableDefinition<(u64, u32), &[u8]> = TableDefinition::new("models");
const VERSIONS: TableDefinition<u64, &[u8]> = TableDefinition::new("versions");
const HISTORY: TableDefinition<u64, &[u8]> = TableDefinition::new("history");

/// Chunk size for model bytes: just under 1 MiB, so that redb's power-of-two
/// allocation of a value does not double the space a chunk takes.
const CHUNK_BYTES: usize = 1020 * 1024;

/// Most bytes reserved up front when reading a model; larger models grow as
/// their chunks are read, so the reservation never depends on stored
/// metadata alone.
const MAX_PREALLOC: u64 = 64 << 20;

/// Errors from the store; each names the store file.
#[derive(Debug, Error)]
pub enum StoreError {
    /// redb reported an error.
    #[error("store {path}: {source}")]
    Db {
        /// The store file.
        path: PathBuf,
        /// The cause.
        source: Box<redb::Error>,
    },
    /// Stored bytes did not decode or did not match their checksum.
    #[error("store {path}: corrupt {what}")]
    Corrupt {
        /// The store file.
        path: PathBuf,
        /// What was corrupt.
        what: String,
    },
}

/// Metadata of one committed version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VersionMeta {
    /// Number of f32 values.
    pub len: u64,
    /// SHA-256 of the little-endian bytes, hex.
    pub sha256: String,
}

/// Everything committed together when a round's aggregate is accepted.
pub struct Commit<'a> {
    /// The new version number.
    pub version: u64,
    /// Its parameters.
    pub params: &'a [f32],
    /// The round record to append.
    pub record: &'a RoundRecord,
    /// The strategy's optimiser state after this round.
    pub strategy_state: &'a [f32],
}

/// Handle to the coordinator's store.
pub struct Store {
    db: Database,
    path: PathBuf,
    durable: bool,
    /// Test seam: every later write fails, as on a full or broken disk.
    #[cfg(test)]
    pub(crate) fail_writes: std::sync::atomic::AtomicBool,
}

mod sha2_digest {
    //! A one-function wrapper so the store can checksum model bytes.
    use sha2::{Digest, Sha256};

    /// Lower-case hex SHA-256 of `bytes`.
    pub fn sha256_hex(bytes: &[u8]) -> String {
        Sha256::digest(bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

impl Store {
    /// Opens the store at `path`, creating it (and its tables) if needed.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let err = |e: redb::Error| StoreError::Db {
            path: path.into(),
            source: Box::new(e),
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| err(redb::Error::Io(e)))?;
        }
        let db = Database::create(path).map_err(|e| err(e.into()))?;
        let store = Self {
            db,
            path: path.into(),
            durable: true,
            #[cfg(test)]
            fail_writes: Default::default(),
        };
        let txn = store.db.begin_write().map_err(|e| err(e.into()))?;
        {
            txn.open_table(META).map_err(|e| err(e.into()))?;
            txn.open_table(MODELS).map_err(|e| err(e.into()))?;
            txn.open_table(VERSIONS).map_err(|e| err(e.into()))?;
            txn.open_table(HISTORY).map_err(|e| err(e.into()))?;
        }
        txn.commit().map_err(|e| err(e.into()))?;
        Ok(store)
    }

    /// Opens a scratch store whose commits are atomic but not fsync'd
    /// (redb's `Durability::None`): a crash may lose every commit since the
    /// file was opened. Only for stores thrown away when the process ends,
    /// such as the simulator's temporary one, where the fsync of each
    /// version was a fixed cost per round; the coordinator always uses
    /// [`Store::open`], whose commits are durable when they return.
    pub fn open_scratch(path: &Path) -> Result<Self, StoreError> {
        let mut store = Self::open(path)?;
        store.durable = false;
        Ok(store)
    }

    fn begin_write(&self) -> Result<redb::WriteTransaction, StoreError> {
        #[cfg(test)]
        if self.fail_writes.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(self.err(redb::Error::Io(std::io::Error::other(
                "injected write failure (test)",
            ))));
        }
        let mut txn = self.db.begin_write().map_err(|e| self.err(e))?;
        if !self.durable {
            txn.set_durability(redb::Durability::None)
                .map_err(|e| self.err(e))?;
        }
        Ok(txn)
    }

    /// The store's file path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, e: impl Into<redb::Error>) -> StoreError {
        StoreError::Db {
            path: self.path.clone(),
            source: Box::new(e.into()),
        }
    }

    fn corrupt(&self, what: impl Into<String>) -> StoreError {
        StoreError::Corrupt {
            path: self.path.clone(),
            what: what.into(),
        }
    }

    /// Reads a raw metadata value.
    pub fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(META).map_err(|e| self.err(e))?;
        Ok(table
            .get(key)
            .map_err(|e| self.err(e))?
            .map(|v| v.value().to_vec()))
    }

    /// Reads a JSON metadata value.
    pub fn meta_json<T: for<'de> Deserialize<'de>>(
        &self,
        key: &str,
    ) -> Result<Option<T>, StoreError> {
        match self.meta(key)? {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| self.corrupt(format!("meta `{key}`: {e}"))),
        }
    }

    /// Writes JSON metadata values in one transaction.
    pub fn put_meta_json(&self, entries: &[(&str, serde_json::Value)]) -> Result<(), StoreError> {
        let txn = self.begin_write()?;
        {
            let mut table = txn.open_table(META).map_err(|e| self.err(e))?;
            for (k, v) in entries {
                let bytes = serde_json::to_vec(v).expect("JSON values serialise");
                table
                    .insert(*k, bytes.as_slice())
                    .map_err(|e| self.err(e))?;
            }
        }
        txn.commit().map_err(|e| self.err(e))
    }

    /// Stores version 0 (the initial model) if no version exists yet.
    pub fn init_model(&self, params: &[f32]) -> Result<(), StoreError> {
        if self.latest_version()?.is_some() {
            return Ok(());
        }
        let txn = self.begin_write()?;
        self.write_version(&txn, 0, params)?;
        {
            let mut meta = txn.open_table(META).map_err(|e| self.err(e))?;
            meta.insert("latest_version", 0u64.to_le_bytes().as_slice())
                .map_err(|e| self.err(e))?;
        }
        txn.commit().map_err(|e| self.err(e))
    }

    fn write_version(
        &self,
        txn: &redb::WriteTransaction,
        version: u64,
        params: &[f32],
    ) -> Result<(), StoreError> {
        let bytes = fedcart_common::federation::update::f32s_to_le(params);
        let mut models = txn.open_table(MODELS).map_err(|e| self.err(e))?;
        for (i, chunk) in bytes.chunks(CHUNK_BYTES).enumerate() {
            models
                .insert((version, i as u32), chunk)
                .map_err(|e| self.err(e))?;
        }
        let meta = VersionMeta {
            len: params.len() as u64,
            sha256: sha256_hex(&bytes),
        };
        let mut versions = txn.open_table(VERSIONS).map_err(|e| self.err(e))?;
        versions
            .insert(
                version,
                serde_json::to_vec(&meta).expect("serialisable").as_slice(),
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Atomically stores a new version, its round record, the strategy state
    /// and moves `latest_version` to it.
    pub fn commit(&self, commit: Commit<'_>) -> Result<(), StoreError> {
        let txn = self.begin_write()?;
        self.write_version(&txn, commit.version, commit.params)?;
        self.append_history_in(&txn, commit.record)?;
        {
            let mut meta = txn.open_table(META).map_err(|e| self.err(e))?;
            meta.insert("latest_version", commit.version.to_le_bytes().as_slice())
                .map_err(|e| self.err(e))?;
            let state = fedcart_common::federation::update::f32s_to_le(commit.strategy_state);
            meta.insert("strategy_state", state.as_slice())
                .map_err(|e| self.err(e))?;
        }
        txn.commit().map_err(|e| self.err(e))
    }

    fn append_history_in(
        &self,
        txn: &redb::WriteTransaction,
        record: &RoundRecord,
    ) -> Result<(), StoreError> {
        let mut history = txn.open_table(HISTORY).map_err(|e| self.err(e))?;
        let next = history
            .last()
            .map_err(|e| self.err(e))?
            .map_or(0, |(k, _)| k.value() + 1);
        history
            .insert(
                next,
                serde_json::to_vec(record).expect("serialisable").as_slice(),
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Appends a record that commits no version (aborted round, evaluation, statistics).
    pub fn append_history(&self, record: &RoundRecord) -> Result<(), StoreError> {
        let txn = self.begin_write()?;
        self.append_history_in(&txn, record)?;
        txn.commit().map_err(|e| self.err(e))
    }

    /// Appends a record and writes metadata in the same transaction.
    pub fn append_history_with_meta(
        &self,
        record: &RoundRecord,
        entries: &[(&str, serde_json::Value)],
    ) -> Result<(), StoreError> {
        let txn = self.begin_write()?;
        self.append_history_in(&txn, record)?;
        {
            let mut table = txn.open_table(META).map_err(|e| self.err(e))?;
            for (k, v) in entries {
                let bytes = serde_json::to_vec(v).expect("JSON values serialise");
                table
                    .insert(*k, bytes.as_slice())
                    .map_err(|e| self.err(e))?;
            }
        }
        txn.commit().map_err(|e| self.err(e))
    }

    /// The latest committed version, if any.
    pub fn latest_version(&self) -> Result<Option<u64>, StoreError> {
        match self.meta("latest_version")? {
            None => Ok(None),
            Some(b) => {
                let arr: [u8; 8] = b
                    .as_slice()
                    .try_into()
                    .map_err(|_| self.corrupt("latest_version"))?;
                Ok(Some(u64::from_le_bytes(arr)))
            }
        }
    }

    /// The strategy state saved with the latest commit (empty if none).
    pub fn strategy_state(&self) -> Result<Vec<f32>, StoreError> {
        Ok(self
            .meta("strategy_state")?
            .map(|b| fedcart_common::federation::update::f32s_from_le(&b))
            .unwrap_or_default())
    }

    /// Reads a committed version, verifying its length and checksum.
    pub fn model(&self, version: u64) -> Result<Option<Vec<f32>>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let versions = txn.open_table(VERSIONS).map_err(|e| self.err(e))?;
        let Some(meta) = versions.get(version).map_err(|e| self.err(e))? else {
            return Ok(None);
        };
        let meta: VersionMeta = serde_json::from_slice(meta.value())
            .map_err(|_| self.corrupt(format!("version {version} metadata")))?;
        let models = txn.open_table(MODELS).map_err(|e| self.err(e))?;
        // The stored length is checked against the chunks actually there,
        // never trusted for an allocation: a corrupt length must be an
        // error naming the store, not an abort at start-up.
        let Some(expected) = meta.len.checked_mul(4) else {
            return Err(self.corrupt(format!(
                "version {version} metadata (length {} is impossible)",
                meta.len
            )));
        };
        let mut bytes = Vec::with_capacity(expected.min(MAX_PREALLOC) as usize);
        for entry in models
            .range((version, 0)..=(version, u32::MAX))
            .map_err(|e| self.err(e))?
        {
            let (_, v) = entry.map_err(|e| self.err(e))?;
            if bytes.len() as u64 + v.value().len() as u64 > expected {
                return Err(self.corrupt(format!(
                    "model version {version} (more bytes stored than its length {})",
                    meta.len
                )));
            }
            bytes.extend_from_slice(v.value());
        }
        if bytes.len() as u64 != expected || sha256_hex(&bytes) != meta.sha256 {
            return Err(self.corrupt(format!(
                "model version {version} (length or checksum mismatch)"
            )));
        }
        Ok(Some(fedcart_common::federation::update::f32s_from_le(
            &bytes,
        )))
    }

    /// All history records, oldest first.
    pub fn history(&self) -> Result<Vec<RoundRecord>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(HISTORY).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(|e| self.err(e))? {
            let (k, v) = entry.map_err(|e| self.err(e))?;
            out.push(
                serde_json::from_slice(v.value())
                    .map_err(|_| self.corrupt(format!("history record {}", k.value())))?,
            );
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_corrupt_version_length_is_an_error_naming_the_store_not_an_allocation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.redb");
        let store = Store::open(&path).unwrap();
        store.init_model(&[1.0, 2.0, 3.0]).unwrap();
        for len in [u64::MAX / 2, 1 << 40, 4] {
            let txn = store.db.begin_write().unwrap();
            {
                let mut versions = txn.open_table(VERSIONS).unwrap();
                let meta = VersionMeta {
                    len,
                    sha256: "0".repeat(64),
                };
                versions
                    .insert(0, serde_json::to_vec(&meta).unwrap().as_slice())
                    .unwrap();
            }
            txn.commit().unwrap();
            let err = store.model(0).unwrap_err();
            let shown = err.to_string();
            assert!(shown.contains(&path.display().to_string()), "{shown}");
            assert!(shown.contains("corrupt"), "{shown}");
        }
        drop(store);

        // Start-up refuses the store with an error that names it.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let err = rt.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let run = crate::config::RunConfig {
                max_attempts: crate::config::DEFAULT_MAX_ATTEMPTS,
                early_stopping: None,
                run_id: "corrupt".into(),
                seed: 1,
                rounds: 1,
                model: fedcart_common::task::ModelSpec::Noop { dim: 3 },
                sgd: Default::default(),
                selection: crate::config::Selection {
                    fraction: 1.0,
                    min_agents: 1,
                    max_agents: 1,
                    min_available: 0,
                },
                quorum: 1,
                round_timeout_ms: 1_000,
                evaluate: false,
                strategy: Default::default(),
                secagg: None,
                dp: None,
            };
            let ping = std::time::Duration::from_millis(500);
            crate::server::start(listener, &path, run, ping).await.err()
        });
        let shown = format!("{:#}", err.expect("start-up must fail"));
        assert!(shown.contains(&path.display().to_string()), "{shown}");
    }
}
