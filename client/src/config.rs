//! Agent configuration: `merchant.toml` → validated plain structs, with
//! environment overrides for the coordinator address and paths.

use std::path::{Path, PathBuf};

use fedcart_common::data::tabular::Schema;
use serde::{Deserialize, Serialize};

/// Why `merchant.toml` could not be used. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{}: cannot read the agent configuration", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown, missing or mistyped keys.
    #[error("{}: invalid agent configuration", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's error: line, column and key, and the valid keys
        /// when one is misspelled.
        #[source]
        source: toml::de::Error,
    },
    /// `data.holdout` is outside (0, 1).
    #[error("{}: `data.holdout` = {value} must be in (0, 1)", path.display())]
    Holdout {
        /// The file.
        path: PathBuf,
        /// The value given.
        value: f64,
    },
}

/// Reconnection backoff: doubles from `initial_ms` up to `max_ms`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backoff {
    /// First wait after a failure.
    pub initial_ms: u64,
    /// Longest wait.
    pub max_ms: u64,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial_ms: 100,
            max_ms: 5_000,
        }
    }
}

/// Where the merchant's data is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Churn CSV (customer rows with a label), read with `schema`.
    pub churn_csv: Option<PathBuf>,
    /// Schema of the churn CSV; defaults to the Telco schema.
    #[serde(default)]
    pub schema: Option<Schema>,
    /// Fraction of rows held out for local evaluation.
    #[serde(default = "holdout")]
    pub holdout: f64,
    /// Seed of the local train/held-out split.
    #[serde(default)]
    pub split_seed: u64,
    /// Ratings or purchases in MovieLens CSV format (`userId,movieId,rating,timestamp`),
    /// for recommender tasks.
    #[serde(default)]
    pub ratings_csv: Option<std::path::PathBuf>,
    /// The platform's shared catalogue (one item id per line); required with
    /// `ratings_csv` and `orders_csv`.
    #[serde(default)]
    pub catalogue: Option<std::path::PathBuf>,
    /// The merchant's orders export, for frequent-itemset tasks: one basket
    /// per customer and timestamp, items mapped through `catalogue`. Read
    /// with the column mapping `orders` (needs its `item` column).
    #[serde(default)]
    pub orders_csv: Option<PathBuf>,
    /// Column mapping of `orders_csv` (`[data.orders]`, the keys of
    /// `fedcart-client prepare --mapping`).
    #[serde(default)]
    pub orders: Option<fedcart_common::data::orders::OrdersMapping>,
}

fn holdout() -> f64 {
    0.2
}

/// The whole `merchant.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Coordinator URL, e.g. `http://127.0.0.1:50051` (env `FEDCART_COORDINATOR`).
    pub coordinator: String,
    /// This merchant's id (env `FEDCART_MERCHANT_ID`).
    pub merchant_id: String,
    /// Directory for the agent's local state (env `FEDCART_STATE_DIR`).
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
    /// The merchant's data.
    pub data: DataConfig,
    /// Reconnection backoff.
    #[serde(default)]
    pub backoff: Backoff,
    /// Mutual TLS files; without them the agent speaks plaintext, which only
    /// an `--insecure` coordinator accepts.
    #[serde(default)]
    pub tls: Option<crate::tls::AgentTls>,
    /// The protections this merchant requires of every task (`[privacy]`);
    /// see [`crate::policy::PrivacyPolicy`] for the keys and defaults.
    #[serde(default)]
    pub privacy: crate::policy::PrivacyPolicy,
}

impl AgentConfig {
    /// Reads a TOML file and applies environment overrides.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut cfg: Self = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })?;
        if let Ok(v) = std::env::var("FEDCART_COORDINATOR") {
            cfg.coordinator = v;
        }
        if let Ok(v) = std::env::var("FEDCART_MERCHANT_ID") {
            cfg.merchant_id = v;
        }
        if let Ok(v) = std::env::var("FEDCART_STATE_DIR") {
            cfg.state_dir = Some(v.into());
        }
        if !(cfg.data.holdout > 0.0 && cfg.data.holdout < 1.0) {
            return Err(ConfigError::Holdout {
                path: path.to_owned(),
                value: cfg.data.holdout,
            });
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_text(text: &str) -> (tempfile::TempDir, PathBuf, Result<AgentConfig, ConfigError>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("merchant.toml");
        std::fs::write(&path, text).unwrap();
        let result = AgentConfig::load(&path);
        (dir, path, result)
    }

    #[test]
    fn a_holdout_outside_0_1_is_refused_naming_the_file_and_key() {
        let (_dir, path, result) = load_text(
            "coordinator = \"http://127.0.0.1:1\"\nmerchant_id = \"m0\"\n[data]\nholdout = 1.5\n",
        );
        assert_eq!(
            result.unwrap_err().to_string(),
            format!("{}: `data.holdout` = 1.5 must be in (0, 1)", path.display())
        );
    }

    #[test]
    fn a_misspelled_key_names_the_file_and_the_parser_names_the_key() {
        let (_dir, path, result) = load_text(
            "coordinator = \"http://127.0.0.1:1\"\nmerchant_id = \"m0\"\n[data]\nholdot = 0.2\n",
        );
        let err = result.unwrap_err();
        assert!(
            err.to_string().starts_with(&path.display().to_string()),
            "{err}"
        );
        let cause = std::error::Error::source(&err).unwrap().to_string();
        assert!(cause.contains("holdot"), "{cause}");
    }
}
