//! Agent configuration: `merchant.toml` → validated plain structs, with
//! environment overrides for the coordinator address and every path.
//!
//! Relative paths in the file are relative to the file's own directory, so a
//! merchant kit (`fedcart-coordinator certs issue --kit DIR`) runs from any
//! working directory. Every setting that names a file or address can be
//! overridden by `FEDCART_<SECTION>_<KEY>` (see [`ENV_OVERRIDES`]); a
//! relative path given in the environment is relative to the working
//! directory, like any path typed in a shell.

use std::path::{Path, PathBuf};

use fedcart_common::data::orders::Delimiter;
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
    #[error("{}: invalid agent configuration: {message}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's error: line, column and key, and the valid keys
        /// when one is misspelled, in words a merchant reads
        /// ([`fedcart_common::config_errors::explain`]).
        message: String,
    },
    /// An environment override is empty, not UTF-8, names a missing file,
    /// or sets only part of the `[tls]` section.
    #[error("{}: environment variable {var}: {message}", path.display())]
    Env {
        /// The configuration file the override applies to.
        path: PathBuf,
        /// The variable, e.g. `FEDCART_TLS_CERT`.
        var: &'static str,
        /// What is wrong with its value.
        message: String,
    },
    /// `data.delimiter` is `whitespace`, which only orders exports support.
    #[error(
        "{}: `data.delimiter` = whitespace is only for orders exports (`prepare --delimiter`); \
         customer and ratings tables need comma, tab, semicolon or pipe",
        path.display()
    )]
    Delimiter {
        /// The file.
        path: PathBuf,
    },
    /// Two settings that exclude each other are both set, or one needs
    /// another that is missing.
    #[error("{}: {message}", path.display())]
    Data {
        /// The file.
        path: PathBuf,
        /// Which keys, and what to do.
        message: String,
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
    /// The platform's shared catalogue (one item id per line). Without it,
    /// item ids are hashed into the run's item rows (`hash_items`).
    #[serde(default)]
    pub catalogue: Option<std::path::PathBuf>,
    /// Without a catalogue, item ids are hashed into the rows of the
    /// federated item model (the run's `num_items`), so no item list is
    /// shared (see `HashedItems`). `true` by default; `false` requires
    /// `catalogue` for item-based tasks.
    #[serde(default = "yes")]
    pub hash_items: bool,
    /// The merchant's orders export, read with the column mapping `orders`.
    /// It is the merchant's one data source: the agent derives from it the
    /// churn features and labels (unless `churn_csv` is set), the
    /// recommender's interactions (unless `ratings_csv` is set; needs the
    /// `item` column) and the baskets of frequent-itemset tasks.
    #[serde(default)]
    pub orders_csv: Option<PathBuf>,
    /// How churn labels are derived from `orders_csv` (`[data.churn]`).
    #[serde(default)]
    pub churn: ChurnLabels,
    /// Column mapping of `orders_csv` (`[data.orders]`, the keys of
    /// `fedcart-client prepare --mapping`).
    #[serde(default)]
    pub orders: Option<fedcart_common::data::orders::OrdersMapping>,
    /// Display names of catalogue items: a CSV with a header whose first
    /// column is the item id and second its name (MovieLens' `movies.csv`
    /// fits as is). `recommend` and `serve` show them beside the ids.
    #[serde(default)]
    pub item_names: Option<PathBuf>,
    /// Field separator of `churn_csv`, `ratings_csv` and `item_names`:
    /// comma (default), tab, semicolon or pipe.
    #[serde(default)]
    pub delimiter: Delimiter,
    /// What the agent does with a row of `orders_csv` it cannot use (a
    /// blank customer id, an unreadable date, a negative amount): `fail`
    /// (default) stops, naming the line and column; `skip` leaves the row
    /// out and logs how many were left out, by reason, but stops when one
    /// reason that points to a setting leaves out more than a tenth of the
    /// rows; `skip_all` has no such limit. Returns (a negative quantity)
    /// are netted against the purchases they return, under any policy.
    #[serde(default)]
    pub on_bad_row: fedcart_common::data::orders::BadRowPolicy,
}

/// `[data.churn]`: how the agent labels churn from the orders export, as
/// `fedcart-client prepare` does. Training uses the orders before `cutoff`
/// as history and the `churn_window_days` after it as the label; `score`
/// and `segments` describe customers by their whole history.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChurnLabels {
    /// History ends here (ISO-8601, YYYYMMDD or unix seconds). Default: the
    /// day after the last order minus the churn window, so every label is
    /// observed.
    #[serde(default)]
    pub cutoff: Option<String>,
    /// A customer churned if they bought nothing this many days after the
    /// cutoff (default 90).
    #[serde(default)]
    pub churn_window_days: Option<u32>,
    /// Length of the "recent" part of the trend feature (default 90).
    #[serde(default)]
    pub trend_window_days: Option<u32>,
}

impl DataConfig {
    /// The separator byte of the merchant's CSV files (checked at load).
    pub fn delimiter_byte(&self) -> u8 {
        self.delimiter.byte().unwrap_or(b',')
    }
}

impl DataConfig {
    /// What the orders export does not serve because a CSV of the same
    /// data is also set (a merchant who ran `prepare` and then added
    /// `orders_csv`): one line per CSV that wins, logged when the agent
    /// reads its data.
    pub fn shadowed(&self) -> Vec<String> {
        if self.orders_csv.is_none() {
            return Vec::new();
        }
        let mut notes = Vec::new();
        if let Some(p) = &self.churn_csv {
            notes.push(format!(
                "churn tasks read `data.churn_csv` ({}), not the orders export \
                 `data.orders_csv`: remove `churn_csv` to label churn from the export",
                p.display()
            ));
        }
        if let Some(p) = &self.ratings_csv {
            notes.push(format!(
                "recommender tasks read `data.ratings_csv` ({}), not the orders export \
                 `data.orders_csv`: remove `ratings_csv` to take interactions from the export",
                p.display()
            ));
        }
        notes
    }

    /// Combinations of keys that cannot work, as a message naming them.
    fn check(&self) -> Result<(), String> {
        if self.orders_csv.is_some() && self.orders.is_none() {
            return Err(
                "`data.orders_csv` needs its column mapping `[data.orders]` \
                 (customer, timestamp and amount columns at least; item for \
                 recommendations and rules)"
                    .into(),
            );
        }
        // The mapping keys are the simulator's too, where a store column
        // feeds `--partition natural`; read here, every store's customers
        // would be merged into one merchant's.
        if let Some(column) = self.orders.as_ref().and_then(|o| o.merchant.as_ref()) {
            return Err(format!(
                "`merchant = \"{column}\"` in `[data.orders]` names a store column, which an \
                 agent does not read: an agent reads one store's export, so the customers of \
                 every store in it would be merged (the same customer id at two stores read as \
                 one customer). Give this agent its store's rows only (the header and the rows \
                 whose `{column}` is this store, e.g. with `awk -F, -v s=STORE 'NR == 1 || $N == \
                 s'`, N the column's position) and remove the key; a multi-store export is for \
                 the simulator's `--partition natural`"
            ));
        }
        if let Some(orders) = &self.orders
            && self.delimiter != Delimiter::Comma
            && orders.delimiter == Delimiter::Comma
            && self.churn_csv.is_none()
            && self.ratings_csv.is_none()
            && self.item_names.is_none()
        {
            return Err(format!(
                "`data.delimiter` = \"{}\" separates `churn_csv`, `ratings_csv` and `item_names`, \
                 none of which is set; the orders export's separator is `delimiter` in \
                 `[data.orders]` (now the default comma): move the key there",
                self.delimiter.name()
            ));
        }
        if self.orders_csv.is_none() && self.churn != ChurnLabels::default() {
            return Err(
                "`[data.churn]` labels the orders export: it needs `data.orders_csv`".into(),
            );
        }
        if self.churn.churn_window_days == Some(0) {
            return Err("`data.churn.churn_window_days` must be at least 1".into());
        }
        if let Some(c) = &self.churn.cutoff
            && let Err(m) = fedcart_common::data::orders::TimestampFormat::parse_setting(c.trim())
        {
            return Err(format!("`data.churn.cutoff` = {c:?}: {m}"));
        }
        if !self.hash_items
            && self.catalogue.is_none()
            && (self.ratings_csv.is_some() || self.orders_csv.is_some())
        {
            return Err("`data.hash_items` = false needs `data.catalogue`".into());
        }
        Ok(())
    }
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
    /// How models travel (`[transfer]`).
    #[serde(default)]
    pub transfer: TransferConfig,
    /// Personalisation of the recommender when a run ends (`[personalise]`);
    /// off when absent.
    #[serde(default)]
    pub personalise: Option<PersonaliseConfig>,
}

/// `[personalise]`: when a recommender run ends, the agent fine-tunes a
/// private copy of the version it was served on its own purchases (local
/// epochs with a proximal pull towards the global item rows) and serves it
/// only if its validation slice scores it strictly better. The copy never
/// leaves the agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PersonaliseConfig {
    /// Local fine-tuning epochs (iALS: item and user sweeps), at least 1.
    pub epochs: usize,
    /// Proximal weight μ pulling each item row towards the global row
    /// (finite, ≥ 0) [default: 10 for `mf` and BPR, 100 for iALS].
    #[serde(default)]
    pub proximal: Option<f32>,
}

impl PersonaliseConfig {
    /// The checks of the section: at least one epoch, μ finite and ≥ 0.
    fn check(&self) -> Result<(), String> {
        if self.epochs == 0 {
            return Err(
                "`personalise.epochs` must be at least 1 (remove the section to turn \
                        personalisation off)"
                    .into(),
            );
        }
        if let Some(mu) = self.proximal
            && !(mu.is_finite() && mu >= 0.0)
        {
            return Err(format!(
                "`personalise.proximal` = {mu} must be finite and >= 0"
            ));
        }
        Ok(())
    }
}

/// `[transfer]`: how models travel between coordinator and agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransferConfig {
    /// Precision of the factor rows of downloaded recommender models: `f32`
    /// (exact, the default), `f16` or `int8` (8 bits with a per-row scale),
    /// which halve or quarter the download; the agent then trains and
    /// recommends from the rounded model.
    #[serde(default)]
    pub download_precision: fedcart_common::federation::sparse::RowPrecision,
    /// Row-sparse transfers of recommender models (the default): plaintext
    /// updates as the rows the merchant touched, downloads as the rows
    /// changed since the version it holds. `false` sends whole vectors.
    #[serde(default = "yes")]
    pub rows: bool,
}

impl Default for TransferConfig {
    fn default() -> Self {
        Self {
            download_precision: Default::default(),
            rows: true,
        }
    }
}

fn yes() -> bool {
    true
}

/// Every environment override of `merchant.toml`, with the key it replaces.
/// Paths given here are relative to the working directory.
pub const ENV_OVERRIDES: [(&str, &str); 11] = [
    ("FEDCART_COORDINATOR", "coordinator"),
    ("FEDCART_MERCHANT_ID", "merchant_id"),
    ("FEDCART_STATE_DIR", "state_dir"),
    ("FEDCART_DATA_CHURN_CSV", "data.churn_csv"),
    ("FEDCART_DATA_RATINGS_CSV", "data.ratings_csv"),
    ("FEDCART_DATA_CATALOGUE", "data.catalogue"),
    ("FEDCART_DATA_ORDERS_CSV", "data.orders_csv"),
    ("FEDCART_DATA_ITEM_NAMES", "data.item_names"),
    ("FEDCART_TLS_CA", "tls.ca"),
    ("FEDCART_TLS_CERT", "tls.cert"),
    ("FEDCART_TLS_KEY", "tls.key"),
];

/// Joins a relative `p` onto `base` (the configuration file's directory).
pub fn resolve(base: &Path, p: &mut PathBuf) {
    if p.is_relative() {
        *p = base.join(&*p);
    }
}

/// The directory that relative paths in the file at `path` are relative to.
pub fn base_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    }
}

impl AgentConfig {
    /// Reads a TOML file, resolves its relative paths against the file's
    /// directory and applies the environment overrides ([`ENV_OVERRIDES`]).
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::load_with_env(path, |var| std::env::var_os(var))
    }

    /// [`AgentConfig::load`] with the environment given as a function
    /// (tests pass a map instead of mutating the process environment).
    pub fn load_with_env(
        path: &Path,
        env: impl Fn(&str) -> Option<std::ffi::OsString>,
    ) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut cfg: Self = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: fedcart_common::config_errors::explain(&e.to_string(), &text),
        })?;
        cfg.resolve_paths(&base_dir(path));
        let id_from_env = env("FEDCART_MERCHANT_ID").is_some();
        cfg.apply_env(path, env)?;
        // Checked here, naming where the id came from: the coordinator's
        // refusal blamed the certificate.
        if let Err(e) = fedcart_common::identity::validate_id(&cfg.merchant_id) {
            let message =
                format!("{e}: give the id `certs issue` named on this merchant's certificate");
            return Err(if id_from_env {
                ConfigError::Env {
                    path: path.to_owned(),
                    var: "FEDCART_MERCHANT_ID",
                    message,
                }
            } else {
                ConfigError::Data {
                    path: path.to_owned(),
                    message: format!("`merchant_id`: {message}"),
                }
            });
        }
        if !(cfg.data.holdout > 0.0 && cfg.data.holdout < 1.0) {
            return Err(ConfigError::Holdout {
                path: path.to_owned(),
                value: cfg.data.holdout,
            });
        }
        if cfg.data.delimiter.byte().is_none() {
            return Err(ConfigError::Delimiter {
                path: path.to_owned(),
            });
        }
        cfg.data.check().map_err(|message| ConfigError::Data {
            path: path.to_owned(),
            message,
        })?;
        cfg.privacy.check().map_err(|message| ConfigError::Data {
            path: path.to_owned(),
            message,
        })?;
        if cfg.privacy.max_epsilon.is_some() && cfg.state_dir.is_none() {
            return Err(ConfigError::Data {
                path: path.to_owned(),
                message: "`privacy.max_epsilon` needs `state_dir` (or FEDCART_STATE_DIR): the \
                          agent keeps its privacy ledger there, across restarts and runs"
                    .into(),
            });
        }
        if cfg.backoff.initial_ms == 0 || cfg.backoff.max_ms < cfg.backoff.initial_ms {
            // A zero wait reconnects in a busy loop.
            return Err(ConfigError::Data {
                path: path.to_owned(),
                message: format!(
                    "`backoff.initial_ms` = {} must be ≥ 1 and `backoff.max_ms` = {} at least \
                     as large (milliseconds; leave the section out for 100 and 5000)",
                    cfg.backoff.initial_ms, cfg.backoff.max_ms
                ),
            });
        }
        if let Some(p) = &cfg.personalise {
            p.check().map_err(|message| ConfigError::Data {
                path: path.to_owned(),
                message,
            })?;
        }
        Ok(cfg)
    }

    /// Makes every relative path of the file relative to `base`.
    fn resolve_paths(&mut self, base: &Path) {
        let d = &mut self.data;
        for p in [
            &mut self.state_dir,
            &mut d.churn_csv,
            &mut d.ratings_csv,
            &mut d.catalogue,
            &mut d.orders_csv,
            &mut d.item_names,
        ]
        .into_iter()
        .flatten()
        {
            resolve(base, p);
        }
        if let Some(t) = &mut self.tls {
            for p in [&mut t.ca, &mut t.cert, &mut t.key] {
                resolve(base, p);
            }
        }
    }

    /// Applies [`ENV_OVERRIDES`]; a bad value is an error naming the variable.
    fn apply_env(
        &mut self,
        path: &Path,
        env: impl Fn(&str) -> Option<std::ffi::OsString>,
    ) -> Result<(), ConfigError> {
        let err = |var: &'static str, message: String| ConfigError::Env {
            path: path.to_owned(),
            var,
            message,
        };
        // The value of `var`, if set: non-empty UTF-8.
        let get = |var: &'static str| -> Result<Option<String>, ConfigError> {
            match env(var) {
                None => Ok(None),
                Some(v) => match v.into_string() {
                    Ok(s) if !s.trim().is_empty() => Ok(Some(s)),
                    Ok(_) => Err(err(var, "is set but empty".into())),
                    Err(v) => Err(err(var, format!("{v:?} is not UTF-8"))),
                },
            }
        };
        // A file named by `var` must exist, so the error names the variable
        // rather than surfacing later as an unreadable path.
        let file = |var: &'static str| -> Result<Option<PathBuf>, ConfigError> {
            let Some(v) = get(var)? else { return Ok(None) };
            let p = PathBuf::from(v);
            match std::fs::metadata(&p) {
                Ok(m) if m.is_file() => Ok(Some(p)),
                Ok(_) => Err(err(var, format!("{} is not a file", p.display()))),
                Err(e) => Err(err(var, format!("{}: {e}", p.display()))),
            }
        };
        if let Some(v) = get("FEDCART_COORDINATOR")? {
            self.coordinator = v;
        }
        if let Some(v) = get("FEDCART_MERCHANT_ID")? {
            self.merchant_id = v;
        }
        if let Some(v) = get("FEDCART_STATE_DIR")? {
            self.state_dir = Some(v.into());
        }
        let d = &mut self.data;
        for (var, slot) in [
            ("FEDCART_DATA_CHURN_CSV", &mut d.churn_csv),
            ("FEDCART_DATA_RATINGS_CSV", &mut d.ratings_csv),
            ("FEDCART_DATA_CATALOGUE", &mut d.catalogue),
            ("FEDCART_DATA_ORDERS_CSV", &mut d.orders_csv),
            ("FEDCART_DATA_ITEM_NAMES", &mut d.item_names),
        ] {
            if let Some(p) = file(var)? {
                *slot = Some(p);
            }
        }
        let (ca, cert, key) = (
            file("FEDCART_TLS_CA")?,
            file("FEDCART_TLS_CERT")?,
            file("FEDCART_TLS_KEY")?,
        );
        match &mut self.tls {
            Some(t) => {
                for (slot, v) in [(&mut t.ca, ca), (&mut t.cert, cert), (&mut t.key, key)] {
                    if let Some(v) = v {
                        *slot = v;
                    }
                }
            }
            None => match (ca, cert, key) {
                (None, None, None) => {}
                (Some(ca), Some(cert), Some(key)) => {
                    self.tls = Some(crate::tls::AgentTls {
                        ca,
                        cert,
                        key,
                        domain: None,
                    })
                }
                (ca, cert, _) => {
                    let missing = if ca.is_none() {
                        "FEDCART_TLS_CA"
                    } else if cert.is_none() {
                        "FEDCART_TLS_CERT"
                    } else {
                        "FEDCART_TLS_KEY"
                    };
                    return Err(err(
                        missing,
                        "is needed too: the file has no `[tls]` section, so \
                         FEDCART_TLS_CA, FEDCART_TLS_CERT and FEDCART_TLS_KEY must all be set"
                            .into(),
                    ));
                }
            },
        }
        Ok(())
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
    fn the_personalise_section_is_read_and_bad_values_are_refused_naming_the_key() {
        let head = "coordinator = \"http://127.0.0.1:1\"\nmerchant_id = \"m0\"\n\
                    [data]\nratings_csv = \"r.csv\"\n[personalise]\n";
        let (_dir, _, ok) = load_text(&format!("{head}epochs = 5\n"));
        let p = ok.unwrap().personalise.unwrap();
        assert_eq!((p.epochs, p.proximal), (5, None));
        let (_dir, _, ok) = load_text(&format!("{head}epochs = 2\nproximal = 0.5\n"));
        assert_eq!(ok.unwrap().personalise.unwrap().proximal, Some(0.5));
        for (body, needle) in [
            ("epochs = 0\n", "`personalise.epochs` must be at least 1"),
            (
                "epochs = 3\nproximal = -1.0\n",
                "`personalise.proximal` = -1",
            ),
            ("epochs = 3\nmu = 1.0\n", "unknown field `mu`"),
        ] {
            let (_dir, _, result) = load_text(&format!("{head}{body}"));
            let err = format!("{:#}", anyhow::Error::from(result.unwrap_err()));
            assert!(err.contains(needle), "{body}: {err}");
        }
    }

    #[test]
    fn an_epsilon_cap_needs_a_state_dir_and_sane_values_naming_the_key() {
        let head = "coordinator = \"http://127.0.0.1:1\"\nmerchant_id = \"m0\"\n";
        let data = "[data]\nratings_csv = \"r.csv\"\n";
        let (_dir, _, ok) = load_text(&format!(
            "{head}state_dir = \"state\"\n{data}[privacy]\nmax_epsilon = 8.0\n"
        ));
        let privacy = ok.unwrap().privacy;
        assert_eq!(
            (privacy.max_epsilon, privacy.epsilon_delta),
            (Some(8.0), 1e-5)
        );
        for (body, needle) in [
            (
                format!("{head}{data}[privacy]\nmax_epsilon = 8.0\n"),
                "`privacy.max_epsilon` needs `state_dir`",
            ),
            (
                format!("{head}state_dir = \"s\"\n{data}[privacy]\nmax_epsilon = -1.0\n"),
                "`privacy.max_epsilon` = -1 must be finite and > 0",
            ),
            (
                format!("{head}{data}[privacy]\nepsilon_delta = 1.0\n"),
                "`privacy.epsilon_delta` = 1 must be in (0, 1)",
            ),
            (
                format!("{head}{data}[privacy]\nepsilon_delta = 0.5\n"),
                "`privacy.epsilon_delta` = 0.5 is above 0.01",
            ),
            (
                format!("{head}{data}[privacy]\nmin_noise_multiplier = -0.5\n"),
                "`privacy.min_noise_multiplier` = -0.5 must be finite and >= 0",
            ),
        ] {
            let (_dir, path, result) = load_text(&body);
            let err = result.unwrap_err().to_string();
            assert!(
                err.contains(needle) && err.contains(&path.display().to_string()),
                "{body}: {err}"
            );
        }
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
    fn orders_settings_that_cannot_work_are_refused_naming_the_keys() {
        let head = "coordinator = \"http://127.0.0.1:1\"\nmerchant_id = \"m0\"\n[data]\n";
        for (text, needle) in [
            (
                "orders_csv = \"o.csv\"\n",
                "`data.orders_csv` needs its column mapping `[data.orders]`",
            ),
            (
                "[data.churn]\nchurn_window_days = 30\n",
                "`[data.churn]` labels the orders export",
            ),
            (
                "orders_csv = \"o.csv\"\n[data.orders]\ncustomer = \"c\"\ntimestamp = \"t\"\n\
                 amount = \"a\"\n[data.churn]\ncutoff = \"last tuesday\"\n",
                "`data.churn.cutoff` = \"last tuesday\"",
            ),
            (
                "orders_csv = \"o.csv\"\n[data.orders]\ncustomer = \"c\"\ntimestamp = \"t\"\n\
                 amount = \"a\"\n[data.churn]\nchurn_window_days = 0\n",
                "`data.churn.churn_window_days` must be at least 1",
            ),
            (
                "ratings_csv = \"r.csv\"\nhash_items = false\n",
                "`data.hash_items` = false needs `data.catalogue`",
            ),
            // A store column was taken and ignored: every store's customers
            // merged into one merchant's.
            (
                "orders_csv = \"o.csv\"\n[data.orders]\ncustomer = \"c\"\ntimestamp = \"t\"\n\
                 amount = \"a\"\nmerchant = \"store\"\n",
                "`merchant = \"store\"` in `[data.orders]` names a store column, which an agent \
                 does not read",
            ),
        ] {
            let (_dir, path, result) = load_text(&format!("{head}{text}"));
            let err = result.unwrap_err().to_string();
            assert!(err.starts_with(&path.display().to_string()), "{err}");
            assert!(err.contains(needle), "{text}: {err}");
        }
    }

    /// Pasted CSVs beside an orders export win, and the agent says so.
    #[test]
    fn csvs_beside_an_orders_export_are_named_as_what_the_agent_reads() {
        let head = "coordinator = \"http://127.0.0.1:1\"\nmerchant_id = \"m0\"\n[data]\n";
        let orders = "orders_csv = \"o.csv\"\n";
        let mapping = "[data.orders]\ncustomer = \"c\"\ntimestamp = \"t\"\namount = \"a\"\n";
        let notes = |keys: &str| {
            let (_dir, _, result) = load_text(&format!("{head}{keys}{mapping}"));
            result.unwrap().data.shadowed()
        };
        assert!(notes(orders).is_empty());
        let both = notes(&format!(
            "{orders}churn_csv = \"c.csv\"\nratings_csv = \"r.csv\"\n"
        ));
        assert_eq!(both.len(), 2, "{both:?}");
        assert!(
            both[0].starts_with("churn tasks read `data.churn_csv` (")
                && both[0].contains("c.csv")
                && both[1].starts_with("recommender tasks read `data.ratings_csv` ("),
            "{both:?}"
        );
        // Without an export, the CSVs are simply the data.
        let (_dir, _, result) = load_text(&format!("{head}churn_csv = \"c.csv\"\n"));
        assert!(result.unwrap().data.shadowed().is_empty());
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
        assert!(err.to_string().contains("holdot"), "{err}");
        // A value of the wrong type is said in words, not Rust's type names.
        let (_dir, _, result) = load_text(
            "coordinator = \"http://127.0.0.1:1\"\nmerchant_id = \"m0\"\n[data]\nholdout = \"0.2\"\n",
        );
        let err = result.unwrap_err().to_string();
        assert!(
            err.contains("invalid type: string \"0.2\", expected a number"),
            "{err}"
        );
    }

    #[test]
    fn relative_paths_resolve_from_the_config_files_directory_not_the_cwd() {
        let dir = tempfile::tempdir().unwrap();
        let kit = dir.path().join("kit");
        std::fs::create_dir(&kit).unwrap();
        let path = kit.join("merchant.toml");
        std::fs::write(
            &path,
            "coordinator = \"https://localhost:1\"\nmerchant_id = \"m0\"\nstate_dir = \"state\"\n\
             [data]\nchurn_csv = \"data/customers.csv\"\n\
             [tls]\nca = \"ca.pem\"\ncert = \"/abs/m0.pem\"\nkey = \"m0.key\"\n",
        )
        .unwrap();
        let cfg = AgentConfig::load_with_env(&path, |_| None).unwrap();
        assert_eq!(cfg.state_dir, Some(kit.join("state")));
        assert_eq!(cfg.data.churn_csv, Some(kit.join("data/customers.csv")));
        let tls = cfg.tls.unwrap();
        assert_eq!(tls.ca, kit.join("ca.pem"));
        assert_eq!(tls.cert, PathBuf::from("/abs/m0.pem"));
        assert_eq!(tls.key, kit.join("m0.key"));
    }

    #[test]
    fn environment_overrides_replace_paths_and_a_bad_value_names_the_variable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("merchant.toml");
        std::fs::write(
            &path,
            "coordinator = \"https://localhost:1\"\nmerchant_id = \"m0\"\n[data]\n",
        )
        .unwrap();
        let pem = dir.path().join("x.pem");
        std::fs::write(&pem, "").unwrap();
        let env = |vars: Vec<(&'static str, std::ffi::OsString)>| {
            move |k: &str| vars.iter().find(|(v, _)| *v == k).map(|(_, x)| x.clone())
        };
        let all = vec![
            ("FEDCART_TLS_CA", pem.clone().into_os_string()),
            ("FEDCART_TLS_CERT", pem.clone().into_os_string()),
            ("FEDCART_TLS_KEY", pem.clone().into_os_string()),
            ("FEDCART_DATA_CHURN_CSV", pem.clone().into_os_string()),
        ];
        let cfg = AgentConfig::load_with_env(&path, env(all)).unwrap();
        assert_eq!(cfg.tls.unwrap().key, pem);
        assert_eq!(cfg.data.churn_csv, Some(pem.clone()));

        let missing = dir.path().join("nope.pem");
        let err = AgentConfig::load_with_env(
            &path,
            env(vec![("FEDCART_TLS_CERT", missing.clone().into_os_string())]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("FEDCART_TLS_CERT") && err.contains(&missing.display().to_string()),
            "{err}"
        );
        let err = AgentConfig::load_with_env(
            &path,
            env(vec![("FEDCART_TLS_CERT", pem.clone().into_os_string())]),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("FEDCART_TLS_CA"), "{err}");
        // A merchant id no certificate can hold is named here, with where
        // it came from (the coordinator's refusal blamed the certificate).
        let err =
            AgentConfig::load_with_env(&path, env(vec![("FEDCART_MERCHANT_ID", "bad id".into())]))
                .unwrap_err()
                .to_string();
        assert_eq!(
            err,
            format!(
                "{}: environment variable FEDCART_MERCHANT_ID: merchant id `bad id` must be \
                 1–128 characters of [A-Za-z0-9-_.@], not only dots: give the id `certs issue` \
                 named on this merchant's certificate",
                path.display()
            )
        );
        let bad = dir.path().join("bad.toml");
        std::fs::write(
            &bad,
            "coordinator = \"https://localhost:1\"\nmerchant_id = \"\"\n[data]\n",
        )
        .unwrap();
        let err = AgentConfig::load_with_env(&bad, |_| None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(": `merchant_id`: merchant id `` must be"),
            "{err}"
        );
        let err = AgentConfig::load_with_env(&path, env(vec![("FEDCART_STATE_DIR", "".into())]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("FEDCART_STATE_DIR is set but empty")
                || err.contains("FEDCART_STATE_DIR: is set but empty"),
            "{err}"
        );
    }

    #[test]
    fn a_whitespace_delimiter_is_refused_for_customer_tables() {
        let (_dir, path, result) = load_text(
            "coordinator = \"http://127.0.0.1:1\"\nmerchant_id = \"m0\"\n[data]\ndelimiter = \"whitespace\"\n",
        );
        let err = result.unwrap_err().to_string();
        assert!(
            err.starts_with(&path.display().to_string()) && err.contains("data.delimiter"),
            "{err}"
        );
        let (_dir, _path, result) = load_text(
            "coordinator = \"http://127.0.0.1:1\"\nmerchant_id = \"m0\"\n[data]\ndelimiter = \"semicolon\"\n",
        );
        assert_eq!(result.unwrap().data.delimiter_byte(), b';');
    }

    /// `data.delimiter` does not reach the orders export, whose separator
    /// is its mapping's: set where it separates nothing, it is refused
    /// saying where the key belongs; the mapping takes `;` as the flag does.
    #[test]
    fn a_data_delimiter_that_separates_nothing_points_at_the_orders_mapping() {
        let head = "coordinator = \"http://127.0.0.1:1\"\nmerchant_id = \"m0\"\n[data]\n\
                    orders_csv = \"orders.csv\"\n";
        let orders = "orders = { customer = \"c\", item = \"i\", timestamp = \"t\", amount = \"a\"";
        let (_dir, path, result) =
            load_text(&format!("{head}delimiter = \"semicolon\"\n{orders} }}\n"));
        let err = result.unwrap_err().to_string();
        assert!(
            err.starts_with(&path.display().to_string())
                && err.contains("`data.delimiter` = \"semicolon\" separates `churn_csv`")
                && err.contains("`delimiter` in `[data.orders]`"),
            "{err}"
        );
        let (_dir, _path, result) = load_text(&format!("{head}{orders}, delimiter = \";\" }}\n"));
        let cfg = result.unwrap();
        assert_eq!(
            cfg.data.orders.unwrap().delimiter,
            fedcart_common::data::orders::Delimiter::Semicolon
        );
    }

    /// A zero backoff would reconnect in a busy loop.
    #[test]
    fn a_zero_backoff_is_refused() {
        for backoff in [
            "initial_ms = 0\nmax_ms = 0",
            "initial_ms = 500\nmax_ms = 100",
        ] {
            let (_dir, _path, result) = load_text(&format!(
                "coordinator = \"http://127.0.0.1:1\"\nmerchant_id = \"m0\"\n[data]\n[backoff]\n{backoff}\n"
            ));
            let err = result.unwrap_err().to_string();
            assert!(err.contains("`backoff.initial_ms`"), "{err}");
        }
    }
}
