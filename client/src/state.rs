//! The agent's durable local state in `state_dir`: the latest global model of
//! each task family (parameters, version, task spec), the private MF user
//! state, and the last local metrics. Files are written atomically (temp
//! file, fsync, rename), so a crash leaves the previous version intact and a
//! restarted agent resumes with its private user factors.
//!
//! Layout: `global-<family>.json` (meta: version, spec) + `global-<family>.f32`
//! (little-endian parameters), `mf-users.json`, `metrics-<family>.json`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use fedcart_common::model::mf::UserState;
use fedcart_common::task::TaskSpec;
use serde::{Deserialize, Serialize};

/// What is known about a stored global model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GlobalMeta {
    /// Run the model belongs to.
    pub run_id: String,
    /// Committed version.
    pub version: u64,
    /// The task spec it came with (model shape, standardiser).
    pub spec: TaskSpec,
}

/// The agent's state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
}

/// Writes `bytes` to `path` atomically and durably.
fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    if let Some(parent) = path.parent()
        && let Ok(d) = std::fs::File::open(parent)
    {
        let _ = d.sync_all();
    }
    Ok(())
}

impl StateDir {
    /// Opens (creating) `dir`.
    pub fn open(dir: impl Into<PathBuf>) -> anyhow::Result<Self> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self { dir })
    }

    fn read_json<T: for<'de> Deserialize<'de>>(&self, name: &str) -> anyhow::Result<Option<T>> {
        let path = self.dir.join(name);
        match std::fs::read(&path) {
            Ok(b) => Ok(Some(
                serde_json::from_slice(&b).with_context(|| format!("{}", path.display()))?,
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Stores the global model of `spec`'s family.
    pub fn save_global(&self, meta: &GlobalMeta, params: &[f32]) -> anyhow::Result<()> {
        let family = meta.spec.model.data_family();
        write_atomic(
            &self.dir.join(format!("global-{family}.f32")),
            &fedcart_common::federation::update::f32s_to_le(params),
        )?;
        write_atomic(
            &self.dir.join(format!("global-{family}.json")),
            &serde_json::to_vec_pretty(meta)?,
        )
    }

    /// The latest stored global model of `family` (`mf`, `churn`, …).
    pub fn load_global(&self, family: &str) -> anyhow::Result<Option<(GlobalMeta, Vec<f32>)>> {
        let Some(meta) = self.read_json::<GlobalMeta>(&format!("global-{family}.json"))? else {
            return Ok(None);
        };
        let path = self.dir.join(format!("global-{family}.f32"));
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        if bytes.len() % 4 != 0 {
            anyhow::bail!(
                "{}: {} bytes is not a whole number of f32",
                path.display(),
                bytes.len()
            );
        }
        Ok(Some((
            meta,
            fedcart_common::federation::update::f32s_from_le(&bytes),
        )))
    }

    /// Stores the private MF user state.
    pub fn save_users(&self, state: &UserState) -> anyhow::Result<()> {
        write_atomic(&self.dir.join("mf-users.json"), &serde_json::to_vec(state)?)
    }

    /// The private MF user state, if saved.
    pub fn load_users(&self) -> anyhow::Result<Option<UserState>> {
        self.read_json("mf-users.json")
    }

    /// Stores the last local metrics of a family.
    pub fn save_metrics(&self, family: &str, m: &BTreeMap<String, f64>) -> anyhow::Result<()> {
        write_atomic(
            &self.dir.join(format!("metrics-{family}.json")),
            &serde_json::to_vec_pretty(m)?,
        )
    }

    /// The last local metrics of a family.
    pub fn load_metrics(&self, family: &str) -> anyhow::Result<Option<BTreeMap<String, f64>>> {
        self.read_json(&format!("metrics-{family}.json"))
    }
}
