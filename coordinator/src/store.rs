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
//!
//! **Many runs, one file.** The store's first run keeps the four tables
//! under their plain names (so a single-run store from before runs were
//! first-class is read as it is); every later run has its own sub-tree, the
//! same four tables named `run/<id>/meta` and so on. The `runs` table lists
//! every run with its sub-tree and submission time ([`RunEntry`]); a store
//! without it that holds a run is that run's store ([`StoreFile::runs`]
//! lists it). A [`Store`] is one run's view; [`StoreFile`] is the file.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use sha2_digest::sha256_hex;
use thiserror::Error;

use crate::record::RoundRecord;

/// The run registry: run id → [`RunEntry`] (JSON).
const RUNS: TableDefinition<&str, &[u8]> = TableDefinition::new("runs");

/// One run's four tables, named under its sub-tree's prefix.
#[derive(Debug, Clone)]
struct Tables {
    meta: String,
    models: String,
    versions: String,
    history: String,
}

impl Tables {
    fn under(prefix: &str) -> Self {
        Self {
            meta: format!("{prefix}meta"),
            models: format!("{prefix}models"),
            versions: format!("{prefix}versions"),
            history: format!("{prefix}history"),
        }
    }
    fn meta(&self) -> TableDefinition<'_, &'static str, &'static [u8]> {
        TableDefinition::new(&self.meta)
    }
    fn models(&self) -> TableDefinition<'_, (u64, u32), &'static [u8]> {
        TableDefinition::new(&self.models)
    }
    fn versions(&self) -> TableDefinition<'_, u64, &'static [u8]> {
        TableDefinition::new(&self.versions)
    }
    fn history(&self) -> TableDefinition<'_, u64, &'static [u8]> {
        TableDefinition::new(&self.history)
    }
}

/// A run as the registry (`runs` table) records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunEntry {
    /// The run's id.
    pub run_id: String,
    /// Prefix of its tables: empty for the store's first run, else
    /// `run/<id>/`.
    pub prefix: String,
    /// Milliseconds since the Unix epoch when it was submitted (0 for a run
    /// found in a store from before the registry).
    pub submitted_unix_ms: i64,
    /// Position in submission order, from 0.
    pub order: u64,
    /// The run this one continues from (scheduled retraining), if any.
    #[serde(default)]
    pub continues: Option<String>,
    /// Scheduled retraining: when this run finishes, the next instance.
    #[serde(default)]
    pub schedule: Option<crate::config::Schedule>,
    /// Which instance of its schedule this run is, from 1.
    #[serde(default = "first_instance")]
    pub instance: u64,
    /// The operator who ended the schedule after this instance finished
    /// (`runs stop` of a finished instance): no further instance starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule_ended_by: Option<String>,
}

fn first_instance() -> u64 {
    1
}

impl RunEntry {
    /// The id of the next instance of a scheduled run: `<base>.<n+1>`,
    /// where the first instance's id is the base.
    pub fn next_id(&self) -> String {
        let base = match self.instance {
            1 => self.run_id.as_str(),
            _ => self
                .run_id
                .rsplit_once('.')
                .map_or(self.run_id.as_str(), |(b, _)| b),
        };
        format!("{base}.{}", self.instance + 1)
    }

    /// True when the schedule allows an instance after this one.
    pub fn repeats(&self) -> bool {
        self.schedule_ended_by.is_none()
            && self
                .schedule
                .as_ref()
                .is_some_and(|s| s.repeat.is_none_or(|r| self.instance <= r))
    }
}

/// Bytes free for unprivileged writes on the file system holding `path`
/// (its directory's, for a file not yet created).
#[cfg(unix)]
fn free_bytes(path: &Path) -> Option<u64> {
    let dir = match path.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(p) => p,
        None => Path::new("."),
    };
    let st = rustix::fs::statvfs(dir).ok()?;
    Some(st.f_bavail.saturating_mul(st.f_frsize))
}

#[cfg(not(unix))]
fn free_bytes(_: &Path) -> Option<u64> {
    None
}

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
    /// redb reported an error. The cause is in the message, not a source
    /// of its own: a log line that prints the chain said it twice.
    #[error("store {path}: {cause}", path = path.display())]
    Db {
        /// The store file.
        path: PathBuf,
        /// The cause.
        cause: Box<redb::Error>,
    },
    /// A write failed with an I/O error (a full disk): redb takes no more
    /// writes on the file until it is opened again.
    #[error(
        "store {path}: a write failed ({cause}); the store takes no more writes until the \
         coordinator restarts: free space or mend the disk, then restart it (what was committed \
         before is kept)",
        path = path.display()
    )]
    Io {
        /// The store file.
        path: PathBuf,
        /// The I/O error.
        cause: String,
    },
    /// The store's file system has too little space for the next task's
    /// version ([`Store::check_room`]).
    #[error(
        "store {path}: its file system has {free_mb:.1} MB free, and the next task needs about \
         {need_mb:.1} MB (its model version, twice, and its record): free space or move the store, \
         then start the coordinator again (no task was started: no attempt is used and no sum is \
         revealed; what was committed is kept)",
        path = path.display(),
        free_mb = *free as f64 / 1e6,
        need_mb = *need as f64 / 1e6
    )]
    NoRoom {
        /// The store file.
        path: PathBuf,
        /// Bytes free for unprivileged writes.
        free: u64,
        /// Bytes the next task needs.
        need: u64,
    },
    /// Another process holds the file open (redb locks it): another
    /// coordinator serving the same `serve.store`.
    #[error(
        "store {path} is in use by another process (another coordinator serving the same \
         `serve.store`?): stop that one, or give this one another `serve.store`",
        path = path.display()
    )]
    InUse {
        /// The store file.
        path: PathBuf,
    },
    /// The file exists but holds no byte: not a store redb wrote (it never
    /// leaves one empty), more likely one truncated by a failed copy or a
    /// full disk. Opening it would start a new store over it in silence.
    #[error(
        "store {path} is an empty file (0 bytes): not a fedcart store, perhaps one cut short by a \
         failed copy or a full disk; restore it from a backup, or delete it to start a new store \
         there",
        path = path.display()
    )]
    Empty {
        /// The store file.
        path: PathBuf,
    },
    /// The path no longer names the file the coordinator opened: it was
    /// replaced (a copy moved over it, a backup restored) or removed while
    /// the coordinator ran. Writing on would commit to a file no one can
    /// open again, and every later version would be lost at the next start.
    #[error(
        "store {path} was replaced or removed while the coordinator ran: it no longer names the \
         file the coordinator opened, so nothing more is written (what was committed since the \
         swap is only in the old file); stop the coordinator and start it on the store you mean \
         to keep",
        path = path.display()
    )]
    Replaced {
        /// The store file.
        path: PathBuf,
    },
    /// A write after one that failed with an I/O error (a full disk): redb
    /// takes no more writes on the file until it is opened again, and says
    /// only "Previous I/O error occurred", which named neither the cause nor
    /// what to do in the coordinator's last line.
    #[error(
        "store {path}: a write failed earlier ({cause}), and the store takes no more writes until \
         the coordinator restarts: free space or mend the disk, then restart it (what was \
         committed before is kept)",
        path = path.display()
    )]
    AfterIo {
        /// The store file.
        path: PathBuf,
        /// The first failed write's error.
        cause: String,
    },
    /// Stored bytes did not decode or did not match their checksum.
    #[error(
        "store {path}: corrupt {what}: restore the store from a backup (a copy taken while the \
         coordinator was stopped); the coordinator keeps no second copy",
        path = path.display()
    )]
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

/// Handle to one run's part of the coordinator's store.
pub struct Store {
    db: Arc<Database>,
    path: PathBuf,
    /// The opened file's identity ([`FileIdentity`]).
    identity: Option<FileIdentity>,
    /// The first I/O error a write met ([`StoreError::AfterIo`]).
    first_io: FirstIo,
    durable: bool,
    tables: Tables,
    /// Test seam: every later write fails, as on a full or broken disk.
    #[cfg(test)]
    pub(crate) fail_writes: std::sync::atomic::AtomicBool,
    /// Test seam: the free bytes [`Store::check_room`] sees (`u64::MAX`:
    /// the file system's).
    #[cfg(test)]
    pub(crate) free_for_test: std::sync::atomic::AtomicU64,
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

/// The coordinator's store file, shared by the runs it holds (redb opens a
/// file once per process).
#[derive(Clone)]
pub struct StoreFile {
    db: Arc<Database>,
    path: PathBuf,
    identity: Option<FileIdentity>,
    first_io: FirstIo,
}

/// The first I/O error met on a store file, shared by its run views.
type FirstIo = Arc<std::sync::Mutex<Option<String>>>;

/// The store error for redb's `e` on `path`: an I/O error is kept in
/// `first_io`, and redb's "Previous I/O error occurred" after it becomes
/// [`StoreError::AfterIo`], naming it.
fn db_error(path: &Path, first_io: &FirstIo, e: redb::Error) -> StoreError {
    let mut first = first_io.lock().unwrap_or_else(|p| p.into_inner());
    match &e {
        redb::Error::Io(io) => {
            let cause = first.get_or_insert_with(|| io.to_string()).clone();
            return StoreError::Io {
                path: path.into(),
                cause,
            };
        }
        redb::Error::PreviousIo => {
            if let Some(cause) = first.clone() {
                return StoreError::AfterIo {
                    path: path.into(),
                    cause,
                };
            }
        }
        _ => {}
    }
    StoreError::Db {
        path: path.into(),
        cause: Box::new(e),
    }
}

/// Device and inode of the file a path names (none off Unix, or when it
/// cannot be read): each write checks that the store's path still names the
/// file it opened (a store moved over it while the coordinator ran took in
/// four more versions, lost at the next start without a word).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileIdentity(u64, u64);

impl FileIdentity {
    fn of(path: &Path) -> Option<Self> {
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(path).ok().map(|m| Self(m.dev(), m.ino()))
        }
        #[cfg(not(unix))]
        {
            let _ = path;
            None
        }
    }

    /// `Replaced` when `path` no longer names the file `opened` was.
    fn check(opened: Option<Self>, path: &Path) -> Result<(), StoreError> {
        match opened {
            Some(id) if Self::of(path) != Some(id) => {
                Err(StoreError::Replaced { path: path.into() })
            }
            _ => Ok(()),
        }
    }
}

impl StoreFile {
    /// Opens the store file at `path`, creating it if needed.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let err = |e: redb::Error| StoreError::Db {
            path: path.into(),
            cause: Box::new(e),
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| err(redb::Error::Io(e)))?;
        }
        // redb would write a new database over an empty file.
        if std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.len() == 0) {
            return Err(StoreError::Empty { path: path.into() });
        }
        let new = std::fs::symlink_metadata(path).is_err();
        // redb panics ("internal error: entered unreachable code") on some
        // damaged B-tree pages instead of returning an error: the operator
        // got a panic inside redb naming no file (found by a fault probe).
        let opened = std::panic::catch_unwind(|| {
            let db = Database::create(path).map_err(|e| match e {
                redb::DatabaseError::DatabaseAlreadyOpen => StoreError::InUse { path: path.into() },
                // A damaged file named in redb's words only ("DB corrupted:
                // File truncated below stored layout", "I/O error: Not a redb
                // database") gave no remedy (found by a fault probe).
                redb::DatabaseError::Storage(redb::StorageError::Corrupted(m)) => {
                    StoreError::Corrupt {
                        path: path.into(),
                        what: format!("file ({m})"),
                    }
                }
                redb::DatabaseError::Storage(redb::StorageError::Io(e))
                    if e.kind() == std::io::ErrorKind::InvalidData =>
                {
                    StoreError::Corrupt {
                        path: path.into(),
                        what: format!("header ({e}: not a store, or its first pages are damaged)"),
                    }
                }
                e => err(e.into()),
            })?;
            let file = Self {
                db: Arc::new(db),
                path: path.into(),
                identity: FileIdentity::of(path),
                first_io: FirstIo::default(),
            };
            // Every model version, each merchant's metrics and its part of
            // the best version's evaluation: the coordinator's user's alone
            // (it was created 0644 by the umask; found by an attacker probe).
            // A store that exists keeps the mode its operator gave it.
            #[cfg(unix)]
            if new {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                    .map_err(|e| err(redb::Error::Io(e)))?;
            }
            let txn = file.db.begin_write().map_err(|e| file.err(e))?;
            txn.open_table(RUNS).map_err(|e| match e {
                // Damaged table metadata reads as a changed type definition.
                e @ (redb::TableError::TypeDefinitionChanged { .. }
                | redb::TableError::TableTypeMismatch { .. }) => StoreError::Corrupt {
                    path: path.into(),
                    what: format!("table definitions ({e})"),
                },
                e => file.err(e),
            })?;
            txn.commit().map_err(|e| file.err(e))?;
            Ok(file)
        });
        opened.unwrap_or_else(|_| {
            Err(StoreError::Corrupt {
                path: path.into(),
                what: "pages (the storage engine stopped on an inconsistency while opening it)"
                    .into(),
            })
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, e: impl Into<redb::Error>) -> StoreError {
        db_error(&self.path, &self.first_io, e.into())
    }

    /// Every run in the store, in submission order. A store written before
    /// the registry existed lists its one run (found in the plain tables).
    pub fn runs(&self) -> Result<Vec<RunEntry>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(RUNS).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(|e| self.err(e))? {
            let (k, v) = entry.map_err(|e| self.err(e))?;
            let run: RunEntry =
                serde_json::from_slice(v.value()).map_err(|_| StoreError::Corrupt {
                    path: self.path.clone(),
                    what: format!("run registry entry `{}`", k.value()),
                })?;
            out.push(run);
        }
        drop(table);
        drop(txn);
        if out.is_empty() {
            // A single-run store from before the registry: its run is in the
            // plain tables.
            let first = self.run_view("")?;
            if let Some(cfg) = first.meta_json::<serde_json::Value>("run_config")? {
                let run_id = cfg
                    .get("run_id")
                    .and_then(|v| v.as_str())
                    .unwrap_or_default()
                    .to_owned();
                out.push(RunEntry {
                    run_id,
                    prefix: String::new(),
                    submitted_unix_ms: 0,
                    order: 0,
                    continues: None,
                    schedule: None,
                    instance: 1,
                    schedule_ended_by: None,
                });
            }
        }
        out.sort_by_key(|r| r.order);
        Ok(out)
    }

    /// Registers `run_id` (the first run gets the plain tables, later ones
    /// `run/<id>/`) and returns its entry; an id already registered returns
    /// the existing entry unchanged.
    pub fn register(
        &self,
        run_id: &str,
        submitted_unix_ms: i64,
        continues: Option<String>,
        schedule: Option<crate::config::Schedule>,
        instance: u64,
    ) -> Result<RunEntry, StoreError> {
        let existing = self.runs()?;
        if let Some(e) = existing.iter().find(|e| e.run_id == run_id) {
            if e.submitted_unix_ms == 0 && e.order == 0 && e.prefix.is_empty() {
                // A store from before the registry: record its run now.
                self.put_entry(e)?;
            }
            return Ok(e.clone());
        }
        let prefix = if existing.is_empty() {
            String::new()
        } else {
            format!("run/{run_id}/")
        };
        let entry = RunEntry {
            run_id: run_id.to_owned(),
            prefix,
            submitted_unix_ms,
            order: existing.iter().map(|e| e.order + 1).max().unwrap_or(0),
            continues,
            schedule,
            instance,
            schedule_ended_by: None,
        };
        if let Some(first) = existing.first().filter(|e| e.submitted_unix_ms == 0) {
            self.put_entry(first)?;
        }
        self.put_entry(&entry)?;
        Ok(entry)
    }

    /// Takes `run_id` out of the registry: for a run registered by a
    /// submission that stopped before its configuration was written (the
    /// coordinator killed between the two), which holds nothing committed.
    pub fn unregister(&self, run_id: &str) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut table = txn.open_table(RUNS).map_err(|e| self.err(e))?;
            table.remove(run_id).map_err(|e| self.err(e))?;
        }
        txn.commit().map_err(|e| self.err(e))
    }

    /// Records that `by` ended the schedule of the registered run `entry`.
    pub fn end_schedule(&self, entry: &RunEntry, by: &str) -> Result<RunEntry, StoreError> {
        let ended = RunEntry {
            schedule_ended_by: Some(by.to_owned()),
            ..entry.clone()
        };
        self.put_entry(&ended)?;
        Ok(ended)
    }

    fn put_entry(&self, entry: &RunEntry) -> Result<(), StoreError> {
        FileIdentity::check(self.identity, &self.path)?;
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut table = txn.open_table(RUNS).map_err(|e| self.err(e))?;
            let bytes = serde_json::to_vec(entry).expect("serialisable");
            table
                .insert(entry.run_id.as_str(), bytes.as_slice())
                .map_err(|e| self.err(e))?;
        }
        txn.commit().map_err(|e| self.err(e))
    }

    /// The store of the run registered as `entry`.
    pub fn run(&self, entry: &RunEntry) -> Result<Store, StoreError> {
        self.run_view(&entry.prefix)
    }

    fn run_view(&self, prefix: &str) -> Result<Store, StoreError> {
        let store = Store {
            db: Arc::clone(&self.db),
            path: self.path.clone(),
            identity: self.identity,
            first_io: Arc::clone(&self.first_io),
            durable: true,
            tables: Tables::under(prefix),
            #[cfg(test)]
            fail_writes: Default::default(),
            #[cfg(test)]
            free_for_test: std::sync::atomic::AtomicU64::new(u64::MAX),
        };
        let txn = store.db.begin_write().map_err(|e| store.err(e))?;
        {
            let t = &store.tables;
            txn.open_table(t.meta()).map_err(|e| store.err(e))?;
            txn.open_table(t.models()).map_err(|e| store.err(e))?;
            txn.open_table(t.versions()).map_err(|e| store.err(e))?;
            txn.open_table(t.history()).map_err(|e| store.err(e))?;
        }
        txn.commit().map_err(|e| store.err(e))?;
        Ok(store)
    }
}

impl Store {
    /// Opens the store at `path`, creating it (and its tables) if needed, as
    /// the view of its first run (the only run of a single-run store).
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        StoreFile::open(path)?.run_view("")
    }

    /// The view of run `run_id` in the store at `path`, if it holds it.
    pub fn open_run(path: &Path, run_id: &str) -> Result<Option<Self>, StoreError> {
        let file = StoreFile::open(path)?;
        let entry = file.runs()?.into_iter().find(|e| e.run_id == run_id);
        entry.map(|e| file.run(&e)).transpose()
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
        FileIdentity::check(self.identity, &self.path)?;
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

    /// Refuses, before a task starts, when the store's file system has less
    /// than `need` bytes free for unprivileged writes: a task whose version
    /// cannot be committed made its merchants train and, in a secure round,
    /// revealed a sum that was then lost, and every restart on the full disk
    /// did it again and counted one more attempt until `run.max_attempts`
    /// stopped the run for good (found by a fault probe). Passes where the
    /// free space cannot be read.
    pub fn check_room(&self, need: u64) -> Result<(), StoreError> {
        #[cfg(test)]
        let free = match self.free_for_test.load(std::sync::atomic::Ordering::SeqCst) {
            u64::MAX => free_bytes(&self.path),
            seam => Some(seam),
        };
        #[cfg(not(test))]
        let free = free_bytes(&self.path);
        let Some(free) = free else {
            return Ok(());
        };
        if free >= need {
            return Ok(());
        }
        Err(StoreError::NoRoom {
            path: self.path.clone(),
            free,
            need,
        })
    }

    fn err(&self, e: impl Into<redb::Error>) -> StoreError {
        db_error(&self.path, &self.first_io, e.into())
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
        let table = txn
            .open_table(self.tables.meta())
            .map_err(|e| self.err(e))?;
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
            let mut table = txn
                .open_table(self.tables.meta())
                .map_err(|e| self.err(e))?;
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
            let mut meta = txn
                .open_table(self.tables.meta())
                .map_err(|e| self.err(e))?;
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
        let mut models = txn
            .open_table(self.tables.models())
            .map_err(|e| self.err(e))?;
        for (i, chunk) in bytes.chunks(CHUNK_BYTES).enumerate() {
            models
                .insert((version, i as u32), chunk)
                .map_err(|e| self.err(e))?;
        }
        let meta = VersionMeta {
            len: params.len() as u64,
            sha256: sha256_hex(&bytes),
        };
        let mut versions = txn
            .open_table(self.tables.versions())
            .map_err(|e| self.err(e))?;
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
            let mut meta = txn
                .open_table(self.tables.meta())
                .map_err(|e| self.err(e))?;
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
        let mut history = txn
            .open_table(self.tables.history())
            .map_err(|e| self.err(e))?;
        let next = history
            .last()
            .map_err(|e| self.err(e))?
            .map_or(0, |(k, _)| k.value() + 1);
        let mut storable = record.clone();
        let changed = storable.make_storable();
        if !changed.is_empty() {
            tracing::warn!(task = %record.task_id, changed = %changed.join("; "), "a round record held numbers JSON cannot store");
        }
        history
            .insert(
                next,
                serde_json::to_vec(&storable)
                    .expect("serialisable")
                    .as_slice(),
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
            let mut table = txn
                .open_table(self.tables.meta())
                .map_err(|e| self.err(e))?;
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
        let versions = txn
            .open_table(self.tables.versions())
            .map_err(|e| self.err(e))?;
        let Some(meta) = versions.get(version).map_err(|e| self.err(e))? else {
            return Ok(None);
        };
        let meta: VersionMeta = serde_json::from_slice(meta.value())
            .map_err(|_| self.corrupt(format!("version {version} metadata")))?;
        let models = txn
            .open_table(self.tables.models())
            .map_err(|e| self.err(e))?;
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

    /// The history records from key `from` on, with their keys, oldest
    /// first (what was appended since a reader last looked).
    pub fn history_from(&self, from: u64) -> Result<Vec<(u64, RoundRecord)>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn
            .open_table(self.tables.history())
            .map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for entry in table.range(from..).map_err(|e| self.err(e))? {
            let (k, v) = entry.map_err(|e| self.err(e))?;
            let record = serde_json::from_slice(v.value())
                .map_err(|_| self.corrupt(format!("history record {}", k.value())))?;
            out.push((k.value(), record));
        }
        Ok(out)
    }

    /// The last history record, if any, without reading the others.
    pub fn last_history(&self) -> Result<Option<RoundRecord>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn
            .open_table(self.tables.history())
            .map_err(|e| self.err(e))?;
        let Some((k, v)) = table.last().map_err(|e| self.err(e))? else {
            return Ok(None);
        };
        serde_json::from_slice(v.value())
            .map(Some)
            .map_err(|_| self.corrupt(format!("history record {}", k.value())))
    }

    /// All history records, oldest first.
    pub fn history(&self) -> Result<Vec<RoundRecord>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn
            .open_table(self.tables.history())
            .map_err(|e| self.err(e))?;
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

    /// A second coordinator on the same store is told another process has
    /// it (redb said only "Database already open. Cannot acquire lock.").
    #[test]
    fn a_store_held_by_another_opener_says_it_is_in_use_naming_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.redb");
        let held = Store::open(&path).unwrap();
        let Err(e) = Store::open(&path) else {
            panic!("opened twice")
        };
        assert!(matches!(e, StoreError::InUse { .. }), "{e:?}");
        let shown = e.to_string();
        assert!(
            shown.contains(&path.display().to_string())
                && shown.contains("in use by another process")
                && shown.contains("`serve.store`"),
            "{shown}"
        );
        drop(held);
        Store::open(&path).expect("free again");
    }

    /// A store whose pages were damaged on disk is refused with an error
    /// naming the file and the remedy: redb panicked on some of them
    /// ("entered unreachable code"), naming no file (found by a fault
    /// probe flipping 64 bytes at a page boundary).
    #[test]
    fn a_store_with_damaged_pages_is_refused_naming_the_file_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.redb");
        let store = Store::open(&good).unwrap();
        store.init_model(&vec![0.5f32; 50_000]).unwrap();
        for i in 0..40u64 {
            store
                .put_meta_json(&[(&format!("k{i}"), serde_json::json!(i))])
                .unwrap();
        }
        drop(store);
        let bytes = std::fs::read(&good).unwrap();
        let mut refused = 0;
        for offset in (4096..bytes.len().min(1 << 20)).step_by(4096) {
            let bad = dir.path().join(format!("bad-{offset}.redb"));
            let mut damaged = bytes.clone();
            for b in &mut damaged[offset..(offset + 64).min(bytes.len())] {
                *b ^= 0xA5;
            }
            std::fs::write(&bad, &damaged).unwrap();
            let opened = std::panic::catch_unwind(|| StoreFile::open(&bad).map(|_| ()));
            let opened = opened.unwrap_or_else(|_| panic!("opening damage at {offset} panicked"));
            if let Err(e) = opened {
                refused += 1;
                let shown = e.to_string();
                assert!(shown.contains(&bad.display().to_string()), "{shown}");
            }
        }
        // Most damage lands in pages the open never reads; nine of these
        // offsets made redb panic.
        assert!(refused > 0, "no damage met");
    }

    /// A truncated store and one with a zeroed header were refused in
    /// redb's words ("DB corrupted: File truncated below stored layout",
    /// "I/O error: Not a redb database"), with no remedy and the second
    /// pointing at the disk (found by a fault probe): both read as corrupt
    /// with the backup remedy.
    #[test]
    fn a_truncated_or_headerless_store_is_refused_as_corrupt_with_the_remedy() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.redb");
        let store = Store::open(&good).unwrap();
        store.init_model(&vec![0.5f32; 500_000]).unwrap();
        drop(store);
        let bytes = std::fs::read(&good).unwrap();
        let truncated = dir.path().join("truncated.redb");
        std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
        let headerless = dir.path().join("headerless.redb");
        let mut zeroed = bytes.clone();
        zeroed[..4096].fill(0);
        std::fs::write(&headerless, &zeroed).unwrap();
        for bad in [truncated, headerless] {
            let Err(e) = StoreFile::open(&bad) else {
                panic!("{} opened", bad.display())
            };
            let shown = e.to_string();
            assert!(
                matches!(e, StoreError::Corrupt { .. })
                    && shown.contains(&bad.display().to_string())
                    && shown.contains("restore the store from a backup"),
                "{shown}"
            );
        }
    }

    /// The store holds every model version and each merchant's metrics and
    /// evaluation parts: a new one is its user's alone. One that exists
    /// keeps its mode.
    #[cfg(unix)]
    #[test]
    fn a_new_store_is_readable_by_its_user_alone() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/c.redb");
        drop(StoreFile::open(&path).unwrap());
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        drop(StoreFile::open(&path).unwrap());
        assert_eq!(mode(&path), 0o640);
    }

    #[test]
    fn a_corrupt_version_length_is_an_error_naming_the_store_not_an_allocation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.redb");
        let store = Store::open(&path).unwrap();
        store.init_model(&[1.0, 2.0, 3.0]).unwrap();
        for len in [u64::MAX / 2, 1 << 40, 4] {
            let txn = store.db.begin_write().unwrap();
            {
                let mut versions = txn.open_table(store.tables.versions()).unwrap();
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

    /// A stored version whose bytes were changed in place (same length) is
    /// refused by its checksum, naming the store and the version; it is
    /// never handed out as a model.
    /// A store file cut to 0 bytes was opened as a new store, its runs
    /// submitted again from version 0 under the same ids, without a word.
    #[test]
    fn an_empty_store_file_is_refused_not_started_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("coordinator.redb");
        std::fs::write(&path, b"").unwrap();
        let e = StoreFile::open(&path).err().expect("refused");
        assert!(matches!(e, StoreError::Empty { .. }), "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains("coordinator.redb") && msg.contains("empty file"),
            "{msg}"
        );
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0, "left as it was");
        // A path with no file yet is a new store, as before.
        let fresh = dir.path().join("new.redb");
        StoreFile::open(&fresh).unwrap();
        assert!(std::fs::metadata(&fresh).unwrap().len() > 0);
    }

    /// redb answers every write after one that failed (a full disk) with
    /// "Previous I/O error occurred": the coordinator's last line named
    /// neither the disk nor what to do. The first failure is kept and told.
    #[test]
    fn a_write_after_a_failed_one_names_the_first_failure() {
        let first_io = FirstIo::default();
        let path = Path::new("/srv/store.redb");
        let e = db_error(path, &first_io, redb::Error::PreviousIo);
        assert!(
            matches!(e, StoreError::Db { .. }),
            "nothing to name yet: {e}"
        );
        // The first failure says what to do, with its cause once (it was
        // "I/O error: No space left …: I/O error: No space left …" and no
        // advice; found by a fault probe).
        let full = std::io::Error::from_raw_os_error(28);
        let e = db_error(path, &first_io, redb::Error::Io(full));
        assert!(std::error::Error::source(&e).is_none());
        let e = e.to_string();
        assert_eq!(
            e,
            "store /srv/store.redb: a write failed (No space left on device (os error 28)); the \
             store takes no more writes until the coordinator restarts: free space or mend the \
             disk, then restart it (what was committed before is kept)"
        );
        let e = db_error(path, &first_io, redb::Error::PreviousIo).to_string();
        assert!(
            e.starts_with(
                "store /srv/store.redb: a write failed earlier (No space left on device (os \
                 error 28)), and the store takes no more writes until the coordinator restarts"
            ),
            "{e}"
        );
    }

    /// A store file moved over (or removed from) the path while it is open:
    /// writes are refused naming the path, as the coordinator kept
    /// committing to the unlinked file and lost every such version at its
    /// next start.
    #[test]
    fn a_store_replaced_while_open_refuses_every_later_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.redb");
        let store = Store::open(&path).unwrap();
        store.init_model(&[1.0, 2.0]).unwrap();
        let copy = dir.path().join("copy.redb");
        std::fs::copy(&path, &copy).unwrap();
        std::fs::rename(&copy, &path).unwrap();
        let put = || store.put_meta_json(&[("note", serde_json::json!(1))]);
        let e = put().expect_err("refused");
        assert!(matches!(e, StoreError::Replaced { .. }), "{e}");
        assert!(e.to_string().starts_with(&format!(
            "store {} was replaced or removed while the coordinator ran",
            path.display()
        )));
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(put(), Err(StoreError::Replaced { .. })));
    }

    #[test]
    fn a_version_tampered_with_at_the_same_length_fails_its_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.redb");
        let store = Store::open(&path).unwrap();
        store.init_model(&[1.0, 2.0, 3.0]).unwrap();
        assert_eq!(store.model(0).unwrap(), Some(vec![1.0, 2.0, 3.0]));
        let txn = store.db.begin_write().unwrap();
        {
            let mut models = txn.open_table(store.tables.models()).unwrap();
            let mut bytes = models
                .get((0, 0))
                .unwrap()
                .expect("chunk 0")
                .value()
                .to_vec();
            bytes[5] ^= 0x01; // 2.0 becomes another finite f32
            models.insert((0, 0), bytes.as_slice()).unwrap();
        }
        txn.commit().unwrap();
        let shown = store.model(0).unwrap_err().to_string();
        assert!(shown.contains(&path.display().to_string()), "{shown}");
        assert!(
            shown.contains("model version 0") && shown.contains("checksum"),
            "{shown}"
        );
    }
}
