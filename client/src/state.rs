//! The agent's durable local state in `state_dir`: the latest global model of
//! each task family (parameters, version, task spec), the private MF user
//! state, and the last local metrics. Files are written atomically (temp
//! file, fsync, rename), so a crash leaves the previous version intact and a
//! restarted agent resumes with its private user factors.
//!
//! Layout: `global-<family>.json` (meta: version, spec, the parameters'
//! SHA-256) + `global-<family>-<first 16 hex digits of it>.f32`
//! (little-endian parameters), `mf-users.json`, `metrics-<family>.json`, and
//! the recommender's personalisation: `personal-mf.json` (what was decided,
//! for which run and version) + `personal-mf-<hash>.f32` and
//! `personal-mf-users-<hash>.json` (the fine-tuned copy, only when it was
//! kept). Parameter files are named by their checksum and written before the
//! meta that names them, so a meta and its parameters always go together
//! (states written before read `global-<family>.f32` and `personal-mf.f32`).
//! None of it is ever uploaded.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use fedcart_common::model::mf::UserState;
use fedcart_common::task::TaskSpec;
use serde::{Deserialize, Serialize};

/// The help of `--run` on the commands that answer from the state
/// directory (`recommend`, `score`, `segments`, `rules`, `serve`): what
/// they read with it and without it (see [`StateDir::run`] and
/// [`StateDir::publish_served`]).
pub const RUN_FLAG_HELP: &str = "Answer from this run's latest version (`runs/<id>/` in the state \
directory), whether or not it is the run's best [default: the version served at the top of the \
state directory: the best that model selection chose in the latest run of this kind]";

/// What is known about a stored global model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GlobalMeta {
    /// Run the model belongs to.
    pub run_id: String,
    /// Committed version.
    pub version: u64,
    /// The task spec it came with (model shape, standardiser).
    pub spec: TaskSpec,
    /// SHA-256 (hex) of the parameter file, written with the meta so that a
    /// reader running beside the agent (`serve`) can tell a parameter file
    /// from the next version apart from this one's. Absent in older states.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

/// What personalisation decided for one served recommender (see
/// `fedcart_common::model::mf::Personalised`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PersonalMeta {
    /// The run of the global model it was fine-tuned from.
    pub run_id: String,
    /// That global model's version.
    pub version: u64,
    /// Whether the fine-tuned copy was kept (strictly better validation);
    /// only then are its parameters and users stored.
    pub kept: bool,
    /// The validation metric compared (`val_hr@10`, `val_rmse`).
    pub metric: String,
    /// The global copy's validation figure (`None`: no validation slice).
    pub global_val: Option<f64>,
    /// The fine-tuned copy's validation figure.
    pub personal_val: Option<f64>,
    /// Fine-tuning epochs.
    pub epochs: usize,
    /// The proximal weight μ.
    pub proximal: f32,
    /// SHA-256 (hex) of `personal-mf.f32` when kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

/// The agent's state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
}

/// Why the state directory could not be read or written. Every variant
/// names the file (or directory) involved.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The state directory could not be created.
    #[error("creating the state directory {}{}", path.display(),
        if path.is_file() { " (`state_dir` names a file, not a directory)" } else { "" })]
    Create {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Another agent process holds this state directory
    /// ([`StateDir::lock_for_agent`]).
    #[error(
        "another agent is running with the state directory {}{}: run one agent per merchant \
         (stop the other first; two would spend the privacy budget and overwrite the user \
         factors side by side)",
        path.display(),
        pid.map(|p| format!(" (process {p})")).unwrap_or_default()
    )]
    InUse {
        /// The directory.
        path: PathBuf,
        /// The process that took the lock, as it wrote it there.
        pid: Option<u32>,
    },
    /// A state file exists but could not be read.
    #[error("reading {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A state file could not be written (or synced) under its temporary name.
    #[error("writing {}", path.display())]
    Write {
        /// The temporary file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The written temporary file could not replace the previous version.
    #[error("renaming to {}", path.display())]
    Rename {
        /// The final file name.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A JSON state file does not decode (edited by hand, or from another version).
    #[error("{}", path.display())]
    Decode {
        /// The file.
        path: PathBuf,
        /// The decoder's error, with line and column.
        #[source]
        source: serde_json::Error,
    },
    /// A value could not be encoded for writing.
    #[error("encoding {}", path.display())]
    Encode {
        /// The file it was meant for.
        path: PathBuf,
        /// The encoder's error.
        #[source]
        source: serde_json::Error,
    },
    /// The parameter file does not match its meta's checksum: the agent is
    /// between writing the two (read again), or the file was altered.
    #[error(
        "{}: does not match the checksum in its meta file (damaged, or being written: it is read \
         again; a damaged file is replaced when the coordinator hands the model out again)",
        path.display()
    )]
    Mismatch {
        /// The parameter file.
        path: PathBuf,
    },
    /// A run id that cannot name a state directory.
    #[error("run id `{run_id}`: {message}")]
    RunId {
        /// The id (at most 140 characters of it).
        run_id: String,
        /// Why it is refused.
        message: String,
    },
    /// A stored model holds a NaN or an infinity (the coordinator never
    /// hands one out: the file was altered).
    #[error(
        "{}: parameter {index} is {value}, not a finite number (the file was altered; it is \
         replaced when the coordinator hands the model out again)",
        path.display()
    )]
    NotFinite {
        /// The model file.
        path: PathBuf,
        /// The first non-finite parameter.
        index: usize,
        /// Its value.
        value: f32,
    },
    /// A stored model's length is not a whole number of `f32`s.
    #[error("{}: {len} bytes is not a whole number of f32", path.display())]
    Truncated {
        /// The model file.
        path: PathBuf,
        /// Its length in bytes.
        len: usize,
    },
}

/// Encodes `value` as JSON for `path` (pretty-printed when people may read it).
fn to_json<T: Serialize>(path: &Path, value: &T, pretty: bool) -> Result<Vec<u8>, StateError> {
    let encoded = if pretty {
        serde_json::to_vec_pretty(value)
    } else {
        serde_json::to_vec(value)
    };
    encoded.map_err(|source| StateError::Encode {
        path: path.to_owned(),
        source,
    })
}

/// A stored model as `key version V of run R`.
fn described(key: &str, meta: &GlobalMeta) -> String {
    format!("{key} version {} of run `{}`", meta.version, meta.run_id)
}

/// The SHA-256 of `bytes` in lower-case hex.
fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The name of a data file written for a meta with checksum `sha`.
fn data_file(stem: &str, sha: &str, ext: &str) -> String {
    format!("{stem}-{}.{ext}", &sha[..16.min(sha.len())])
}

/// Writes `bytes` to `path` atomically and durably.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StateError> {
    let tmp = path.with_extension("tmp");
    let write = |source| StateError::Write {
        path: tmp.clone(),
        source,
    };
    let mut f = std::fs::File::create(&tmp).map_err(write)?;
    if let Err(e) = f.write_all(bytes).and_then(|_| f.sync_all()) {
        // A disk that filled up kept the partial file, which took more of
        // the space the next attempt needed.
        drop(f);
        let _ = std::fs::remove_file(&tmp);
        return Err(write(e));
    }
    if let Err(source) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(StateError::Rename {
            path: path.to_owned(),
            source,
        });
    }
    if let Some(parent) = path.parent()
        && let Ok(d) = std::fs::File::open(parent)
    {
        let _ = d.sync_all();
    }
    Ok(())
}

impl StateDir {
    /// The state of one run, `runs/<run_id>/` under this directory (created):
    /// the agent keeps each run's latest model, user factors and metrics
    /// there besides the latest of any run at the top, so `--run` picks one
    /// of several concurrent runs of a family. The id follows the
    /// coordinator's rule for run ids (which keeps it a plain directory name).
    pub fn run(&self, run_id: &str) -> Result<Self, StateError> {
        fedcart_common::identity::validate_id(run_id).map_err(|e| StateError::RunId {
            run_id: run_id.chars().take(140).collect(),
            message: e.to_string(),
        })?;
        Self::open(self.dir.join("runs").join(run_id))
    }

    /// A run's last evaluated version that selection may still choose,
    /// `candidate/` under the run's directory (created), in the same layout:
    /// the agent keeps it there, with the users and metrics of its
    /// evaluation, until the coordinator names it the best (the next
    /// evaluation's `best_version`, or the run's end), and only then puts it
    /// at the top, where `score`, `recommend` and `serve` read.
    pub fn candidate(&self) -> Result<Self, StateError> {
        Self::open(self.dir.join("candidate"))
    }

    /// Puts the model `from` holds, if it is version `version` of
    /// `run_id`, here, with its MF users and its metrics (the global model
    /// first, as a task stores them). Returns whether it did.
    pub fn adopt(&self, from: &StateDir, run_id: &str, version: u64) -> Result<bool, StateError> {
        let Some((key, meta)) = from.latest_meta()? else {
            return Ok(false);
        };
        if meta.run_id != run_id || meta.version != version {
            return Ok(false);
        }
        Ok(from.copy_model(&key, self)?.is_some())
    }

    /// At the end of run `run_id` serving `version`: puts the run's
    /// candidate at the top if it is that version and the top still holds
    /// a model of this run (or none of its family). The end is announced
    /// again at each join, by when the top may hold a later run's model,
    /// which it must not replace. Returns whether it did.
    pub fn publish_served(&self, run_id: &str, version: u64) -> Result<bool, StateError> {
        let candidate = self.run(run_id)?.candidate()?;
        let Some((key, meta)) = candidate.latest_meta()? else {
            return Ok(false);
        };
        if meta.run_id != run_id || meta.version != version {
            return Ok(false);
        }
        if let Some(top) = self.read_json::<GlobalMeta>(&format!("global-{key}.json"))?
            && (top.run_id != run_id || top.version == version)
        {
            return Ok(false);
        }
        self.adopt(&candidate, run_id, version)
    }

    /// The models run `run_id` displaced at the top, `before/` under the
    /// run's directory (created), in the same layout.
    fn displaced(&self, run_id: &str) -> Result<Self, StateError> {
        Self::open(self.run(run_id)?.dir.join("before"))
    }

    /// Copies the model stored here under state key `key`, with its MF users
    /// and its metrics, to `to`. Returns its meta, if there was one.
    fn copy_model(&self, key: &str, to: &StateDir) -> Result<Option<GlobalMeta>, StateError> {
        let Some((meta, params)) = self.load_global(key)? else {
            return Ok(None);
        };
        to.save_global(&meta, &params)?;
        if meta.spec.model.mf_shape().is_some()
            && let Some(users) = self.load_users()?
        {
            to.save_users(&users)?;
        }
        let family = meta.spec.model.data_family();
        if let Some(m) = self.load_metrics(family)? {
            to.save_metrics(family, &m)?;
        }
        Ok(Some(meta))
    }

    /// Before run `run_id` puts a model under state key `key` at the top
    /// (this directory): keeps the model there, if another run's, in the
    /// run's `before/`, unless the run displaced one already. A run that
    /// fails puts it back ([`StateDir::give_back`]): a run serves a version
    /// only once it ends well, and its best so far had replaced the last
    /// run's served model for good.
    pub fn keep_displaced(&self, run_id: &str, key: &str) -> Result<(), StateError> {
        let name = format!("global-{key}.json");
        let Some(top) = self.read_json::<GlobalMeta>(&name)? else {
            return Ok(());
        };
        if top.run_id == run_id {
            return Ok(());
        }
        let before = self.displaced(run_id)?;
        if before.read_json::<GlobalMeta>(&name)?.is_none() {
            self.copy_model(key, &before)?;
        }
        Ok(())
    }

    /// When run `run_id` failed (it serves no version): puts back at the
    /// top each model the run displaced there ([`StateDir::keep_displaced`])
    /// whose place the run's own model still holds. Returns what it put
    /// back, as `key version V of run R`.
    pub fn give_back(&self, run_id: &str) -> Result<Vec<String>, StateError> {
        if self.held_version(run_id).is_none() {
            return Ok(Vec::new());
        }
        let before = self.displaced(run_id)?;
        let mut back = Vec::new();
        for key in before.state_keys() {
            let top = self.read_json::<GlobalMeta>(&format!("global-{key}.json"))?;
            if top.is_none_or(|t| t.run_id != run_id) {
                continue;
            }
            if let Some(meta) = before.copy_model(&key, self)? {
                back.push(described(&key, &meta));
            }
        }
        Ok(back)
    }

    /// The state keys of the models stored here, sorted.
    fn state_keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter_map(|n| Some(n.strip_prefix("global-")?.strip_suffix(".json")?.to_owned()))
            .collect();
        keys.sort();
        keys
    }

    /// The meta of the highest version stored here and its state key,
    /// without reading parameters.
    fn latest_meta(&self) -> Result<Option<(String, GlobalMeta)>, StateError> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Ok(None);
        };
        let mut best: Option<(String, GlobalMeta)> = None;
        for name in entries
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
        {
            let Some(key) = name
                .strip_prefix("global-")
                .and_then(|n| n.strip_suffix(".json"))
            else {
                continue;
            };
            if let Some(meta) = self.read_json::<GlobalMeta>(&name)?
                && best.as_ref().is_none_or(|(_, b)| meta.version > b.version)
            {
                best = Some((key.to_owned(), meta));
            }
        }
        Ok(best)
    }

    /// The global models stored here, as `family version V of run R`,
    /// sorted by family (for errors that say what there is instead).
    pub fn held_models(&self) -> Vec<String> {
        self.state_keys()
            .into_iter()
            .filter_map(|family| {
                let meta = self
                    .read_json::<GlobalMeta>(&format!("global-{family}.json"))
                    .ok()??;
                Some(described(&family, &meta))
            })
            .collect()
    }

    /// The latest version of `run_id`'s models this directory holds, if it
    /// holds any (read only: no directory is created for a run never
    /// joined).
    pub fn held_version(&self, run_id: &str) -> Option<u64> {
        fedcart_common::identity::validate_id(run_id).ok()?;
        let run = Self {
            dir: self.dir.join("runs").join(run_id),
        };
        std::fs::read_dir(&run.dir)
            .ok()?
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| n.starts_with("global-") && n.ends_with(".json"))
            .filter_map(|n| run.read_json::<GlobalMeta>(&n).ok()?)
            .map(|meta| meta.version)
            .max()
    }

    /// The runs with a state of their own here, sorted.
    pub fn runs(&self) -> Vec<String> {
        let mut out: Vec<String> = std::fs::read_dir(self.dir.join("runs"))
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().is_dir())
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        out.sort();
        out
    }

    /// Opens (creating) `dir`. A directory it creates is the merchant's
    /// alone (mode 0700 on Unix): it holds every customer id with its user
    /// factors, which the default umask left readable by every local user.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, StateError> {
        let dir = dir.into();
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder.create(&dir).map_err(|source| StateError::Create {
            path: dir.clone(),
            source,
        })?;
        Ok(Self { dir })
    }

    /// Takes this directory for one running agent (`fedcart-client run`):
    /// an exclusive lock on `agent.lock`, held while the returned file is
    /// open, and released by the OS when the process ends however it ends.
    /// A second agent on the same directory is refused naming the first's
    /// process; the reading commands (`score`, `recommend`, `serve`) take
    /// no lock.
    pub fn lock_for_agent(&self) -> Result<std::fs::File, StateError> {
        use std::io::{Read, Seek, Write};
        let path = self.dir.join("agent.lock");
        let io = |source| StateError::Write {
            path: path.clone(),
            source,
        };
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut text = String::new();
                let pid = file
                    .read_to_string(&mut text)
                    .ok()
                    .and_then(|_| text.trim().parse().ok());
                return Err(StateError::InUse {
                    path: self.dir.clone(),
                    pid,
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
        }
        file.set_len(0).map_err(io)?;
        file.rewind().map_err(io)?;
        writeln!(file, "{}", std::process::id()).map_err(io)?;
        Ok(file)
    }

    /// Reads `name` from this directory (`None` when it does not exist).
    pub(crate) fn read_json<T: for<'de> Deserialize<'de>>(
        &self,
        name: &str,
    ) -> Result<Option<T>, StateError> {
        let path = self.dir.join(name);
        match std::fs::read(&path) {
            Ok(b) => match serde_json::from_slice(&b) {
                Ok(v) => Ok(Some(v)),
                Err(source) => Err(StateError::Decode { path, source }),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StateError::Read { path, source }),
        }
    }

    /// Writes `value` as `name` in this directory, atomically and durably.
    pub(crate) fn write_json<T: Serialize>(&self, name: &str, value: &T) -> Result<(), StateError> {
        let path = self.dir.join(name);
        write_atomic(&path, &to_json(&path, value, true)?)
    }

    /// Stores the global model of `spec` under its state key (its data family,
    /// or `segments` for k-means, so an analysis never replaces a model).
    /// The parameters go first, to a file named by their checksum, and the
    /// meta, with that checksum, last; the previous parameter files go only
    /// then. Each file is written atomically, and so is the pair: an agent
    /// stopped between the two writes leaves the previous meta naming the
    /// previous file, which is still there (with one fixed parameter file,
    /// the new parameters beside the old meta failed their checksum, and the
    /// agent could not start again).
    pub fn save_global(&self, meta: &GlobalMeta, params: &[f32]) -> Result<(), StateError> {
        let family = meta.spec.model.state_key();
        let bytes = fedcart_common::federation::update::f32s_to_le(params);
        let sha = sha256_hex(&bytes);
        let stem = format!("global-{family}");
        let file = data_file(&stem, &sha, "f32");
        write_atomic(&self.dir.join(&file), &bytes)?;
        let meta = GlobalMeta {
            sha256: Some(sha),
            ..meta.clone()
        };
        let path = self.dir.join(format!("{stem}.json"));
        write_atomic(&path, &to_json(&path, &meta, true)?)?;
        self.remove_data_files(&stem, "f32", &file);
        Ok(())
    }

    /// The parameter file a meta with checksum `sha` names: `stem-<16 hex>.ext`
    /// when it exists, else the fixed `stem.ext` of states written before
    /// files were named by checksum.
    fn data_path(&self, stem: &str, sha: Option<&str>, ext: &str) -> PathBuf {
        let fixed = self.dir.join(format!("{stem}.{ext}"));
        match sha {
            // The file its meta names, unless only an older layout's
            // fixed-name file is there (a missing file is named as the one
            // the meta expects).
            Some(sha) => {
                let named = self.dir.join(data_file(stem, sha, ext));
                if named.exists() || !fixed.exists() {
                    named
                } else {
                    fixed
                }
            }
            None => fixed,
        }
    }

    /// Removes `stem`'s parameter files other than `keep` (older versions,
    /// the fixed-name file of an older layout, one left by an agent stopped
    /// before its meta). Best effort: a file left behind is only space.
    fn remove_data_files(&self, stem: &str, ext: &str, keep: &str) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for name in entries
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
        {
            let ours = name == format!("{stem}.{ext}")
                || name
                    .strip_prefix(&format!("{stem}-"))
                    .and_then(|rest| rest.strip_suffix(&format!(".{ext}")))
                    .is_some_and(|h| h.len() == 16 && h.bytes().all(|b| b.is_ascii_hexdigit()));
            if ours && name != keep {
                let _ = std::fs::remove_file(self.dir.join(&name));
            }
        }
    }

    /// The state directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The latest stored global model under `family` (`mf`, `churn`, `segments`, …).
    pub fn load_global(&self, family: &str) -> Result<Option<(GlobalMeta, Vec<f32>)>, StateError> {
        let Some(meta) = self.read_json::<GlobalMeta>(&format!("global-{family}.json"))? else {
            return Ok(None);
        };
        let path = self.data_path(&format!("global-{family}"), meta.sha256.as_deref(), "f32");
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(source) => return Err(StateError::Read { path, source }),
        };
        if meta
            .sha256
            .as_ref()
            .is_some_and(|want| *want != sha256_hex(&bytes))
        {
            return Err(StateError::Mismatch { path });
        }
        if bytes.len() % 4 != 0 {
            return Err(StateError::Truncated {
                path,
                len: bytes.len(),
            });
        }
        let params = fedcart_common::federation::update::f32s_from_le(&bytes);
        if let Some((index, &value)) = params.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(StateError::NotFinite { path, index, value });
        }
        Ok(Some((meta, params)))
    }

    /// The stored global model of the highest version here, whatever its
    /// family (a run's directory holds one per model the run trains).
    pub fn latest_global(&self) -> Result<Option<(GlobalMeta, Vec<f32>)>, StateError> {
        match self.latest_meta()? {
            Some((key, _)) => self.load_global(&key),
            None => Ok(None),
        }
    }

    /// The item rows of the stored recommender, if there is one.
    pub fn mf_rows(&self) -> Result<Option<usize>, StateError> {
        Ok(self
            .read_json::<GlobalMeta>("global-mf.json")?
            .and_then(|m| m.spec.model.mf_shape().map(|s| s.num_items)))
    }

    /// Stores the private MF user state.
    pub fn save_users(&self, state: &UserState) -> Result<(), StateError> {
        let path = self.dir.join("mf-users.json");
        write_atomic(&path, &to_json(&path, state, false)?)
    }

    /// The private MF user state, if saved.
    pub fn load_users(&self) -> Result<Option<UserState>, StateError> {
        self.read_json("mf-users.json")
    }

    /// Stores a personalisation outcome: with `copy` (kept), the fine-tuned
    /// parameters and users first and the meta, with their checksum, last;
    /// without, the meta alone (the global copy is served).
    pub fn save_personal(
        &self,
        meta: &PersonalMeta,
        copy: Option<(&[f32], &UserState)>,
    ) -> Result<(), StateError> {
        let mut meta = meta.clone();
        // As `save_global`: the copy's files are named by its checksum and
        // written before the meta that names them, older ones removed after.
        let mut keep = (String::new(), String::new());
        if let Some((params, users)) = copy {
            let bytes = fedcart_common::federation::update::f32s_to_le(params);
            let sha = sha256_hex(&bytes);
            keep = (
                data_file("personal-mf", &sha, "f32"),
                data_file("personal-mf-users", &sha, "json"),
            );
            write_atomic(&self.dir.join(&keep.0), &bytes)?;
            let path = self.dir.join(&keep.1);
            write_atomic(&path, &to_json(&path, users, false)?)?;
            meta.sha256 = Some(sha);
        } else {
            meta.sha256 = None;
        }
        let path = self.dir.join("personal-mf.json");
        write_atomic(&path, &to_json(&path, &meta, true)?)?;
        self.remove_data_files("personal-mf", "f32", &keep.0);
        self.remove_data_files("personal-mf-users", "json", &keep.1);
        Ok(())
    }

    /// The stored personalisation outcome, with the fine-tuned parameters
    /// and users when it was kept.
    #[allow(clippy::type_complexity)]
    pub fn load_personal(
        &self,
    ) -> Result<Option<(PersonalMeta, Option<(Vec<f32>, UserState)>)>, StateError> {
        let Some(meta) = self.read_json::<PersonalMeta>("personal-mf.json")? else {
            return Ok(None);
        };
        if !meta.kept {
            return Ok(Some((meta, None)));
        }
        let path = self.data_path("personal-mf", meta.sha256.as_deref(), "f32");
        let bytes = std::fs::read(&path).map_err(|source| StateError::Read {
            path: path.clone(),
            source,
        })?;
        if meta.sha256.as_deref() != Some(sha256_hex(&bytes).as_str()) {
            return Err(StateError::Mismatch { path });
        }
        if bytes.len() % 4 != 0 {
            return Err(StateError::Truncated {
                path,
                len: bytes.len(),
            });
        }
        let users_path = self.data_path("personal-mf-users", meta.sha256.as_deref(), "json");
        let users_name = users_path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("personal-mf-users.json")
            .to_owned();
        let users = self
            .read_json::<UserState>(&users_name)?
            .ok_or_else(|| StateError::Read {
                path: users_path.clone(),
                source: std::io::ErrorKind::NotFound.into(),
            })?;
        let params = fedcart_common::federation::update::f32s_from_le(&bytes);
        Ok(Some((meta, Some((params, users)))))
    }

    /// Stores the last local metrics of a family.
    pub fn save_metrics(&self, family: &str, m: &BTreeMap<String, f64>) -> Result<(), StateError> {
        let path = self.dir.join(format!("metrics-{family}.json"));
        write_atomic(&path, &to_json(&path, m, true)?)
    }

    /// The last local metrics of a family.
    pub fn load_metrics(&self, family: &str) -> Result<Option<BTreeMap<String, f64>>, StateError> {
        self.read_json(&format!("metrics-{family}.json"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A state directory holds every customer id with its user factors:
    /// one the agent creates is readable by the merchant's user alone (it
    /// was 0755 under the default umask).
    #[cfg(unix)]
    #[test]
    fn a_created_state_directory_is_the_merchants_alone() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kit").join("state");
        let state = StateDir::open(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "{mode:o}");
        state.run("r1").unwrap();
        assert!(path.join("runs").exists());
    }

    /// A second `fedcart-client run` of the same kit is refused at start,
    /// naming the first's process (it used to take the first's session
    /// over, and both wrote the ledger); the reading commands are not.
    #[test]
    fn a_second_agent_on_the_same_state_directory_is_refused_naming_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        let held = state.lock_for_agent().expect("the first agent");
        let again = StateDir::open(dir.path()).unwrap();
        let e = again.lock_for_agent().expect_err("a second agent");
        assert!(
            matches!(e, StateError::InUse { pid: Some(p), .. } if p == std::process::id()),
            "{e:?}"
        );
        let shown = e.to_string();
        assert!(
            shown.contains(&dir.path().display().to_string())
                && shown.contains(&format!("(process {})", std::process::id()))
                && shown.contains("run one agent per merchant"),
            "{shown}"
        );
        // Readers go on reading.
        assert_eq!(again.runs(), Vec::<String>::new());
        drop(held);
        again
            .lock_for_agent()
            .expect("free once the first agent ends");
    }

    /// A candidate is adopted only as the version and run named, with the
    /// metrics of its evaluation.
    #[test]
    fn a_candidate_is_adopted_only_as_the_run_and_version_named() {
        use fedcart_common::model::sgd::SgdParams;
        use fedcart_common::task::{ModelSpec, TaskKind};
        let dir = tempfile::tempdir().unwrap();
        let top = StateDir::open(dir.path()).unwrap();
        let candidate = top.run("r").unwrap().candidate().unwrap();
        assert!(
            !top.adopt(&candidate, "r", 2).unwrap(),
            "an empty candidate"
        );
        let meta = GlobalMeta {
            run_id: "r".into(),
            version: 2,
            spec: TaskSpec {
                kind: TaskKind::Evaluate,
                model: ModelSpec::churn_lr(2),
                sgd: SgdParams::default(),
                seed: 1,
                round: 2,
                standardizer: None,
                dp: None,
                best_version: Some(1),
            },
            sha256: None,
        };
        candidate.save_global(&meta, &[1.0, 2.0, 3.0]).unwrap();
        let metrics = BTreeMap::from([("auc".to_string(), 0.8)]);
        candidate.save_metrics("churn", &metrics).unwrap();
        assert!(!top.adopt(&candidate, "r", 3).unwrap());
        assert!(!top.adopt(&candidate, "other", 2).unwrap());
        assert!(top.load_global("churn").unwrap().is_none());
        assert!(top.adopt(&candidate, "r", 2).unwrap());
        let (m, p) = top.load_global("churn").unwrap().unwrap();
        assert_eq!((m.version, p), (2, vec![1.0, 2.0, 3.0]));
        assert_eq!(top.load_metrics("churn").unwrap(), Some(metrics));
        // A run's candidate is not a run of its own.
        assert_eq!(top.runs(), ["r"]);
        assert_eq!(top.held_version("r"), None);
        // The run's end publishes it again only over this run's own model:
        // announced at a later join, it leaves another run's model alone.
        assert!(!top.publish_served("r", 2).unwrap(), "already at the top");
        let other = GlobalMeta {
            run_id: "later".into(),
            version: 1,
            ..meta.clone()
        };
        top.save_global(&other, &[9.0; 3]).unwrap();
        assert!(!top.publish_served("r", 2).unwrap());
        let (m, _) = top.load_global("churn").unwrap().unwrap();
        assert_eq!(m.run_id, "later");
        let own = GlobalMeta {
            version: 1,
            ..meta.clone()
        };
        top.save_global(&own, &[0.0; 3]).unwrap();
        assert!(
            !top.publish_served("r", 3).unwrap(),
            "not the served version"
        );
        assert!(top.publish_served("r", 2).unwrap());
        assert_eq!(top.load_global("churn").unwrap().unwrap().0.version, 2);
    }

    /// A run whose best so far replaced another run's model at the top
    /// gives it back when the run fails (found by a security review: a
    /// failed DP run's version 1, of AUC 0.25, stayed served); a top a
    /// later run took is left to it.
    #[test]
    fn a_failed_run_gives_back_the_model_it_displaced_at_the_top() {
        use fedcart_common::model::sgd::SgdParams;
        use fedcart_common::task::{ModelSpec, TaskKind};
        let dir = tempfile::tempdir().unwrap();
        let top = StateDir::open(dir.path()).unwrap();
        let churn = |run: &str, version| GlobalMeta {
            run_id: run.into(),
            version,
            spec: TaskSpec {
                kind: TaskKind::Evaluate,
                model: ModelSpec::churn_lr(2),
                sgd: SgdParams::default(),
                seed: 1,
                round: version,
                standardizer: None,
                dp: None,
                best_version: None,
            },
            sha256: None,
        };
        let auc = |v: f64| BTreeMap::from([("auc".to_string(), v)]);
        // What a run's evaluation does when it publishes.
        let publish = |run: &str, version, params: &[f32], metric| {
            top.keep_displaced(run, "churn").unwrap();
            top.run(run)
                .unwrap()
                .save_global(&churn(run, version), params)
                .unwrap();
            top.save_global(&churn(run, version), params).unwrap();
            top.save_metrics("churn", &auc(metric)).unwrap();
        };
        publish("served", 3, &[1.0, 2.0, 3.0], 0.8);
        assert!(top.give_back("failed").unwrap().is_empty(), "never joined");
        assert!(
            top.give_back("served").unwrap().is_empty(),
            "displaced none"
        );
        publish("failed", 1, &[0.0; 3], 0.25);
        publish("failed", 2, &[0.5; 3], 0.3);
        assert_eq!(
            top.give_back("failed").unwrap(),
            ["churn version 3 of run `served`"]
        );
        let (m, p) = top.load_global("churn").unwrap().unwrap();
        assert_eq!((m.run_id.as_str(), m.version), ("served", 3));
        assert_eq!(p, [1.0, 2.0, 3.0]);
        assert_eq!(top.load_metrics("churn").unwrap(), Some(auc(0.8)));
        // The failed run's own directory keeps its model.
        assert_eq!(top.held_version("failed"), Some(2));
        // The end announced again at a later join: the top is not its own.
        assert!(top.give_back("failed").unwrap().is_empty());
        // A run that fails after a later run took the top leaves it.
        publish("failed-too", 1, &[0.0; 3], 0.25);
        publish("later", 1, &[7.0; 3], 0.9);
        assert!(top.give_back("failed-too").unwrap().is_empty());
        assert_eq!(top.load_global("churn").unwrap().unwrap().0.run_id, "later");
        // A run's `before/` is not a run of its own.
        assert_eq!(top.runs(), ["failed", "failed-too", "later", "served"]);
    }

    /// `state_dir` pointing at a file says so, not only "File exists".
    #[test]
    fn a_state_dir_that_is_a_file_is_named_as_such() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ca.pem");
        std::fs::write(&file, "x").unwrap();
        let e = StateDir::open(&file).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "creating the state directory {} (`state_dir` names a file, not a directory)",
                file.display()
            )
        );
    }

    #[test]
    fn segments_centres_are_kept_beside_the_churn_model_not_over_it() {
        use fedcart_common::model::sgd::SgdParams;
        use fedcart_common::task::{ModelSpec, TaskKind, TaskSpec};
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        let spec = |model: ModelSpec| TaskSpec {
            kind: TaskKind::Train,
            model,
            sgd: SgdParams::default(),
            seed: 1,
            round: 1,
            standardizer: None,
            dp: None,
            best_version: None,
        };
        let meta = |model| GlobalMeta {
            run_id: "r".into(),
            version: 1,
            spec: spec(model),
            sha256: None,
        };
        let churn = meta(ModelSpec::churn_lr(2));
        let segments = meta(ModelSpec::KMeans {
            k: 2,
            num_features: 2,
            init: Vec::new(),
        });
        state.save_global(&churn, &[1.0, 2.0, 3.0]).unwrap();
        state.save_global(&segments, &[4.0; 6]).unwrap();
        let (m, p) = state.load_global("churn").unwrap().unwrap();
        assert_eq!((m.spec.model, p), (churn.spec.model, vec![1.0, 2.0, 3.0]));
        let (m, p) = state.load_global("segments").unwrap().unwrap();
        assert_eq!((m.spec.model, p), (segments.spec.model, vec![4.0; 6]));
        // `recommend` on this state (a churn run's, say `--run r`) says what
        // it holds instead of only "no recommender model yet".
        assert_eq!(
            state.held_models(),
            [
                "churn version 1 of run `r`",
                "segments version 1 of run `r`"
            ]
        );
        let Err(err) = crate::recommend::Recommender::load(&state, 10) else {
            panic!("no recommender here");
        };
        assert_eq!(
            err.to_string(),
            "no recommender model here: this state holds churn version 1 of run `r`, segments \
             version 1 of run `r`, and no recommender model (with --run, name a run that trains \
             one; without it, the latest run of each kind is read)"
        );
        let empty = StateDir::open(dir.path().join("empty")).unwrap();
        assert!(empty.held_models().is_empty());
        // A run's version, read without creating a directory for a run
        // never joined (nor for an id that is no run id).
        state
            .run("r")
            .unwrap()
            .save_global(&meta(ModelSpec::churn_lr(0)), &[1.0])
            .unwrap();
        assert_eq!(state.held_version("r"), Some(1));
        for never in ["other", "../r"] {
            assert_eq!(state.held_version(never), None);
        }
        assert_eq!(state.runs(), ["r"]);
    }

    #[test]
    fn metrics_round_trip_and_a_missing_file_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path().join("state")).unwrap();
        assert_eq!(state.load_metrics("churn").unwrap(), None);
        let m = BTreeMap::from([("auc".to_string(), 0.75)]);
        state.save_metrics("churn", &m).unwrap();
        assert_eq!(state.load_metrics("churn").unwrap(), Some(m));
    }

    #[test]
    fn a_corrupt_state_file_is_refused_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        let path = dir.path().join("mf-users.json");
        std::fs::write(&path, "{not json").unwrap();
        let err = state.load_users().unwrap_err();
        assert!(
            matches!(&err, StateError::Decode { path: p, .. } if *p == path),
            "{err:?}"
        );
        assert_eq!(err.to_string(), path.display().to_string());
    }

    /// Version 1 of a churn LR model of run `r`, as stored by a training task.
    fn churn_meta() -> GlobalMeta {
        use fedcart_common::model::sgd::SgdParams;
        use fedcart_common::task::{ModelSpec, TaskKind, TaskSpec};
        GlobalMeta {
            run_id: "r".into(),
            version: 1,
            spec: TaskSpec {
                kind: TaskKind::Train,
                model: ModelSpec::churn_lr(2),
                sgd: SgdParams::default(),
                seed: 1,
                round: 1,
                standardizer: None,
                dp: None,
                best_version: None,
            },
            sha256: None,
        }
    }

    #[test]
    fn a_parameter_file_from_another_version_than_its_meta_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        let meta = churn_meta();
        state.save_global(&meta, &[1.0, 2.0, 3.0]).unwrap();
        assert_eq!(
            state.load_global("churn").unwrap().unwrap().1,
            vec![1.0, 2.0, 3.0]
        );
        let data_files = || -> Vec<String> {
            let mut v: Vec<String> = std::fs::read_dir(dir.path())
                .unwrap()
                .flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.starts_with("global-churn") && n.ends_with(".f32"))
                .collect();
            v.sort();
            v
        };
        // The agent was stopped after writing version 2's parameters and
        // before its meta (seen when an agent was killed mid-round: with one
        // fixed parameter file it could not start again). The meta still
        // names version 1's file, which is still there.
        let v2 = fedcart_common::federation::update::f32s_to_le(&[4.0, 5.0, 6.0]);
        let v2_file = data_file("global-churn", &sha256_hex(&v2), "f32");
        std::fs::write(dir.path().join(&v2_file), &v2).unwrap();
        assert_eq!(data_files().len(), 2);
        let (read, params) = state.load_global("churn").unwrap().unwrap();
        assert_eq!((read.version, params), (1, vec![1.0, 2.0, 3.0]));
        // The next save leaves only its own file.
        let meta2 = GlobalMeta {
            version: 2,
            ..meta.clone()
        };
        state.save_global(&meta2, &[7.0, 8.0]).unwrap();
        let (read, params) = state.load_global("churn").unwrap().unwrap();
        assert_eq!((read.version, params), (2, vec![7.0, 8.0]));
        assert_eq!(data_files().len(), 1, "{:?}", data_files());
        // A state of the older layout (one fixed parameter file) caught
        // between its two writes is still told apart, naming the file.
        let f32s = dir.path().join("global-churn.f32");
        for f in data_files() {
            std::fs::remove_file(dir.path().join(f)).unwrap();
        }
        std::fs::write(&f32s, &v2).unwrap();
        let err = state.load_global("churn").unwrap_err();
        assert!(
            matches!(&err, StateError::Mismatch { path } if *path == f32s),
            "{err:?}"
        );
    }

    /// A model file altered to hold a NaN (its checksum updated with it) is
    /// refused naming the file and the parameter: `score` printed NaN for
    /// every customer and `serve` answered `null` with a 200. A model file
    /// that is gone is named by the name its meta gave it (it was named by
    /// an older layout's fixed name, which never existed).
    #[test]
    fn a_model_file_with_a_nan_or_gone_is_refused_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        let meta = churn_meta();
        state.save_global(&meta, &[1.0, f32::NAN, 3.0]).unwrap();
        let err = state.load_global("churn").unwrap_err();
        let StateError::NotFinite { path, index, .. } = &err else {
            panic!("{err:?}");
        };
        assert_eq!(*index, 1);
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with("global-churn-") && path.exists(), "{err}");
        assert!(err.to_string().contains("parameter 1 is NaN"), "{err}");
        std::fs::remove_file(path).unwrap();
        let err = state.load_global("churn").unwrap_err();
        assert!(
            matches!(&err, StateError::Read { path: p, .. } if p.file_name().unwrap().to_string_lossy() == name),
            "{err:?}"
        );
    }
}
