//! Coordinator configuration: TOML file → validated plain structs.
//!
//! `RunConfig` describes the federated run (and is stored with it, so a
//! restarted coordinator resumes exactly the run it was doing);
//! `ServeConfig` is how this process serves it.
//!
//! Relative paths in the file (`serve.store`, `serve.tls.*`) are relative to
//! the file's directory, not to the working directory. The TLS files can be
//! overridden by `FEDCART_TLS_CA`, `FEDCART_TLS_CERT`, `FEDCART_TLS_KEY` and
//! `FEDCART_TLS_ACCESS` (relative to the working directory); the command
//! line adds `FEDCART_STORE`, `FEDCART_LISTEN` and `FEDCART_HTTP_LISTEN`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use fedcart_common::federation::strategy::StrategySpec;
use fedcart_common::model::lr::SgdParams;
use fedcart_common::privacy::secagg::MIN_NEIGHBOURS;
use fedcart_common::task::ModelSpec;
use serde::{Deserialize, Serialize};
use thiserror::Error;

pub mod dp;
mod pinpoint;
pub use dp::{ClipNorm, DpMode, DpSettings};

/// How agents are chosen for a round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Selection {
    /// Fraction of connected agents to select.
    pub fraction: f64,
    /// Never select fewer than this many (a round waits for them to connect).
    pub min_agents: usize,
    /// Never select more than this many.
    pub max_agents: usize,
    /// Wait until this many agents are connected before selecting (Flower's
    /// `min_available_clients`); 0 means `min_agents`. Unlike `min_agents` it
    /// does not force more agents into the selection: the simulator's gRPC
    /// transport sets it to every merchant so a fraction is drawn from the
    /// same pool as in-process.
    #[serde(default)]
    pub min_available: usize,
}

/// The most parameters a run's model may have (2^30 f32 values, 4 GiB):
/// the coordinator holds a version in memory and every agent downloads it.
pub const MAX_MODEL_VALUES: usize = 1 << 30;

/// The federated run: model, rounds, selection and aggregation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// Identifier carried by every message of the run.
    pub run_id: String,
    /// Seed for selection and for every agent's local randomness.
    pub seed: u64,
    /// Number of training rounds (= the last version).
    pub rounds: u64,
    /// The model family.
    pub model: ModelSpec,
    /// Local training hyper-parameters (the defaults when left out: the
    /// analyses — itemsets, segments — train nothing and need none).
    #[serde(default)]
    pub sgd: SgdParams,
    /// Agent selection.
    pub selection: Selection,
    /// Results needed to commit a round; fewer by the deadline aborts it.
    pub quorum: usize,
    /// Deadline of each task, in milliseconds from its start.
    pub round_timeout_ms: u64,
    /// Run an evaluation task after every committed round. Off, the last
    /// version is still handed to the agents in one evaluation task after
    /// the last round (or a planned stop).
    #[serde(default = "yes")]
    pub evaluate: bool,
    /// Aggregation strategy, parsed once when the file is read (written as
    /// its name, e.g. `fedavg` or `fedprox:0.01`; the default is `fedavg`).
    #[serde(default, deserialize_with = "strategy_key")]
    pub strategy: StrategySpec,
    /// Secure aggregation: when set, the coordinator only ever learns the sum
    /// of the statistics and training updates.
    #[serde(default)]
    pub secagg: Option<SecAggSettings>,
    /// Merchant-level differential privacy (DP-FedAvg): clipping on the
    /// agents, noise on the sum, ε after every round (see `config::dp`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dp: Option<DpSettings>,
    /// Attempts of one round (statistics, training or evaluation) before the
    /// run gives up on it and stops with the dominant cause, instead of
    /// retrying a round that can never commit for ever. The service backs
    /// off between attempts. Default [`DEFAULT_MAX_ATTEMPTS`].
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Early stopping on the federated validation metric (the model's
    /// `ModelSpec::selection_metric`): the run stops once that many evaluated
    /// versions in a row did not improve on the best one. The best version
    /// is tracked whether or not this is set (`Engine::best`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub early_stopping: Option<EarlyStopping>,
}

/// The patience rule of early stopping (`run.early_stopping`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EarlyStopping {
    /// Evaluated versions without a new best before the run stops (>= 1).
    pub patience: u64,
}

/// Attempts of one round before the run stops: enough to ride out a few
/// rounds lost to dropouts, few enough that a round that can never commit
/// ends the run within minutes.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 10;

fn default_max_attempts() -> u32 {
    DEFAULT_MAX_ATTEMPTS
}

/// Secure-aggregation settings of a run (see `fedcart_common::privacy::secagg`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecAggSettings {
    /// Neighbours per agent (SecAgg+); `None` is the complete graph up to 64
    /// agents and 2·⌈log2 n⌉ above. At least `MIN_NEIGHBOURS` (4): a sparse
    /// graph of lower degree lets the coordinator learn small groups' sums.
    #[serde(default)]
    pub neighbours: Option<usize>,
    /// Every update value is clipped to [-clip, clip] before encoding; the
    /// clipped fraction is reported per round (default 1e5, the simulator's
    /// for model tasks: a bound on what one merchant can add, not a clip
    /// of honest updates).
    #[serde(default = "default_secagg_clip")]
    pub clip: f32,
    /// Malicious-server consistency check (signed survivor lists).
    #[serde(default)]
    pub verify_survivors: bool,
    /// Deadline of each protocol stage after the first (share keys, masked
    /// input, survivor check, unmask), in milliseconds; agents that miss it
    /// are dropouts. `None` is a quarter of `round_timeout_ms` (the first
    /// stage, advertising keys, closes with the round timeout because it
    /// follows local training).
    #[serde(default)]
    pub stage_timeout_ms: Option<u64>,
}

impl SecAggSettings {
    /// The deadline of one stage after the first.
    pub fn stage_timeout(&self, round_timeout_ms: u64) -> std::time::Duration {
        std::time::Duration::from_millis(
            self.stage_timeout_ms.unwrap_or(round_timeout_ms / 4).max(1),
        )
    }
}

fn yes() -> bool {
    true
}

/// `run.secagg.clip` when left out.
pub const DEFAULT_SECAGG_CLIP: f32 = 1e5;

fn default_secagg_clip() -> f32 {
    DEFAULT_SECAGG_CLIP
}

/// Parses `run.strategy`, naming the key in the error (the TOML parser adds
/// the line and column, [`CoordinatorConfig::load`] the file).
fn strategy_key<'de, D: serde::Deserializer<'de>>(d: D) -> Result<StrategySpec, D::Error> {
    let name = String::deserialize(d)?;
    name.parse()
        .map_err(|e| serde::de::Error::custom(format!("invalid `run.strategy`: {e}")))
}

/// How this coordinator process serves a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeConfig {
    /// Address for the gRPC service.
    #[serde(deserialize_with = "listen_addr")]
    pub listen: SocketAddr,
    /// Path of the redb store.
    pub store: PathBuf,
    /// Keepalive ping interval on agents' Join streams, milliseconds.
    #[serde(default = "ping_ms")]
    pub ping_interval_ms: u64,
    /// Mutual TLS files; required unless the coordinator runs `--insecure`.
    #[serde(default)]
    pub tls: Option<crate::tls::TlsFiles>,
    /// Address of the HTTP listener for `/metrics`, health and the dashboard.
    #[serde(default, deserialize_with = "optional_listen_addr")]
    pub http_listen: Option<SocketAddr>,
    /// The operator's bearer token every HTTP route but `/healthz` and
    /// `/readyz` requires (env `FEDCART_HTTP_TOKEN_FILE`). Default with TLS:
    /// `operator.token` beside `serve.tls.ca`, as `certs init` writes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_token_file: Option<PathBuf>,
}

impl ServeConfig {
    /// The token file the HTTP listener requires: `http_token_file`, else
    /// with TLS the `operator.token` beside the CA, else none (plaintext
    /// development mode).
    pub fn effective_http_token_file(&self) -> Option<PathBuf> {
        self.http_token_file.clone().or_else(|| {
            self.tls.as_ref().map(|t| {
                t.ca.parent()
                    .unwrap_or(Path::new("."))
                    .join(crate::certs::OPERATOR_TOKEN)
            })
        })
    }
}

fn ping_ms() -> u64 {
    5_000
}

pub use fedcart_common::cli::parse_listen_addr;

fn listen_addr<'de, D: serde::Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    parse_listen_addr(&String::deserialize(d)?).map_err(serde::de::Error::custom)
}

fn optional_listen_addr<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<SocketAddr>, D::Error> {
    Option::<String>::deserialize(d)?
        .map(|s| parse_listen_addr(&s).map_err(serde::de::Error::custom))
        .transpose()
}

/// The whole `coordinator.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorConfig {
    /// Serving settings.
    pub serve: ServeConfig,
    /// The run.
    pub run: RunConfig,
}

/// A configuration problem, naming the file and the field.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{file}: {source}")]
    Io {
        /// The file.
        file: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The TOML did not parse or has unknown/missing fields.
    #[error("{file}: {message}")]
    Parse {
        /// The file.
        file: PathBuf,
        /// The parser's message (with line and column).
        message: String,
    },
    /// An environment override is empty, not UTF-8, names a missing file,
    /// or sets only part of `[serve.tls]`.
    #[error("{file}: environment variable {var}: {message}", file = file.display())]
    Env {
        /// The configuration file the override applies to.
        file: PathBuf,
        /// The variable.
        var: &'static str,
        /// What is wrong with its value.
        message: String,
    },
    /// A field has an invalid value.
    #[error("invalid `{field}`: {message}")]
    Invalid {
        /// The dotted field name.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// The environment overrides of `[serve.tls]`, with the key each replaces.
pub const TLS_ENV: [(&str, &str); 4] = [
    ("FEDCART_TLS_CA", "serve.tls.ca"),
    ("FEDCART_TLS_CERT", "serve.tls.cert"),
    ("FEDCART_TLS_KEY", "serve.tls.key"),
    ("FEDCART_TLS_ACCESS", "serve.tls.access"),
];

impl CoordinatorConfig {
    /// Reads and validates a TOML file; relative paths are resolved against
    /// its directory and the `FEDCART_TLS_*` overrides applied.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::load_with_env(path, |v| std::env::var_os(v))
    }

    /// [`CoordinatorConfig::load`] with the environment given as a function.
    pub fn load_with_env(
        path: &Path,
        env: impl Fn(&str) -> Option<std::ffi::OsString>,
    ) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            file: path.into(),
            source,
        })?;
        let mut cfg: Self = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            file: path.into(),
            message: pinpoint::message(&e, &text),
        })?;
        let base = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        };
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        resolve(&mut cfg.serve.store);
        if let Some(p) = &mut cfg.serve.http_token_file {
            resolve(p);
        }
        if let Some(t) = &mut cfg.serve.tls {
            for p in [&mut t.ca, &mut t.cert, &mut t.key, &mut t.access] {
                resolve(p);
            }
        }
        if cfg.serve.ping_interval_ms == 0 {
            // A zero interval pings every agent in a busy loop.
            return Err(ConfigError::Parse {
                file: path.into(),
                message: "invalid `serve.ping_interval_ms`: 0 must be ≥ 1 (milliseconds between \
                          keepalive pings on each agent's stream; leave it out for 5000)"
                    .into(),
            });
        }
        cfg.apply_tls_env(path, env)?;
        // The run's table as written: which `hyper` keys it gives (the typed
        // read above keeps TOML's line numbers in its errors, a table does not).
        let doc: toml::Table = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            file: path.into(),
            message: e.to_string(),
        })?;
        let run_table = doc.get("run").and_then(toml::Value::as_table);
        run_table
            .map_or(Ok(()), |t| cfg.run.unknown_inline_keys(t))
            .and_then(|()| cfg.run.under_dp_defaults(run_table))
            .map_err(|message| ConfigError::Parse {
                file: path.into(),
                message,
            })?;
        cfg.run.validate()?;
        Ok(cfg)
    }

    /// Applies [`TLS_ENV`]; a bad value is an error naming the variable.
    fn apply_tls_env(
        &mut self,
        path: &Path,
        env: impl Fn(&str) -> Option<std::ffi::OsString>,
    ) -> Result<(), ConfigError> {
        let err = |var: &'static str, message: String| ConfigError::Env {
            file: path.into(),
            var,
            message,
        };
        let mut found: [Option<PathBuf>; 4] = Default::default();
        for ((var, _), slot) in TLS_ENV.iter().zip(&mut found) {
            let Some(v) = env(var) else { continue };
            let Some(v) = v.to_str().filter(|v| !v.trim().is_empty()) else {
                return Err(err(var, format!("{v:?} is not a non-empty UTF-8 path")));
            };
            let p = PathBuf::from(v);
            // The access file may not exist yet (`certs issue` creates it);
            // the others must.
            if *var != "FEDCART_TLS_ACCESS" {
                match std::fs::metadata(&p) {
                    Ok(m) if m.is_file() => {}
                    Ok(_) => return Err(err(var, format!("{} is not a file", p.display()))),
                    Err(e) => return Err(err(var, format!("{}: {e}", p.display()))),
                }
            }
            *slot = Some(p);
        }
        let [ca, cert, key, access] = found;
        match &mut self.serve.tls {
            Some(t) => {
                for (slot, v) in [
                    (&mut t.ca, ca),
                    (&mut t.cert, cert),
                    (&mut t.key, key),
                    (&mut t.access, access),
                ] {
                    if let Some(v) = v {
                        *slot = v;
                    }
                }
            }
            None => match (ca, cert, key, access) {
                (None, None, None, None) => {}
                (Some(ca), Some(cert), Some(key), Some(access)) => {
                    self.serve.tls = Some(crate::tls::TlsFiles {
                        ca,
                        cert,
                        key,
                        access,
                    })
                }
                (ca, cert, key, _) => {
                    let missing = [ca.is_none(), cert.is_none(), key.is_none(), true]
                        .iter()
                        .position(|m| *m)
                        .map_or("FEDCART_TLS_ACCESS", |i| TLS_ENV[i].0);
                    return Err(err(
                        missing,
                        "is needed too: the file has no `[serve.tls]` section, so all of \
                         FEDCART_TLS_CA, FEDCART_TLS_CERT, FEDCART_TLS_KEY and FEDCART_TLS_ACCESS \
                         must be set"
                            .into(),
                    ));
                }
            },
        }
        Ok(())
    }
}

/// A run file for `runs submit`: a `[run]` table as in coordinator.toml
/// (other tables, such as `[serve]`, are ignored).
#[derive(Deserialize)]
struct RunFile {
    run: RunConfig,
}

/// Scheduled retraining of a submitted run (`[schedule]` in its TOML): when
/// an instance finishes, the next one starts `every` later from its served
/// version (the best evaluated, else the last), as a new run
/// `<id>.<n>` with the same configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    /// Wait between the end of one instance and the start of the next, ms.
    pub every_ms: u64,
    /// How many instances follow the first (`None`: no limit).
    pub repeat: Option<u64>,
}

/// `[schedule]` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ScheduleToml {
    every: String,
    repeat: Option<u64>,
}

/// A duration such as `24h`, `90m`, `30s`, `500ms` or `7d`, in ms.
fn parse_every(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(split);
    let unit_ms: u64 = match unit.trim() {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => {
            return Err(format!(
                "`{text}` is not a duration: a whole number and one of ms, s, m, h, d (e.g. \"24h\")"
            ));
        }
    };
    let ms = n
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(unit_ms))
        .ok_or_else(|| format!("`{text}` is not a duration: a whole number comes first"))?;
    // A wait of years is a typo that no list shows.
    if ms > MAX_EVERY_MS {
        return Err(format!(
            "`{text}` must be at most 366d (the wait between one instance's end and the next \
             one's start)"
        ));
    }
    Ok(ms)
}

/// The shortest wait between the instances of an unbounded schedule (no
/// `repeat`): back to back they would retrain without pause, for ever.
const MIN_EVERY_MS: u64 = 1_000;
/// The longest wait between scheduled instances.
const MAX_EVERY_MS: u64 = 366 * 86_400_000;

impl RunConfig {
    /// What the operator is warned of when a secure run's rounds may hold
    /// fewer than 3 merchants: agents refuse them under their default
    /// policy (`privacy.min_neighbours = 2`), and such a run failed every
    /// round after its attempts with nothing said before. For `serve` and
    /// `runs submit` (the simulator's merchants apply no policy).
    pub fn small_secure_round_warning(&self) -> Option<String> {
        (self.secagg.is_some() && self.selection.min_agents < 3).then(|| {
            format!(
                "run `{}`: a secure round may start with {} merchant{} (selection.min_agents), \
                 and agents refuse rounds of fewer than 3 under their default privacy policy \
                 (privacy.min_neighbours = 2): set selection.min_agents to 3 or more",
                self.run_id,
                self.selection.min_agents,
                if self.selection.min_agents == 1 {
                    ""
                } else {
                    "s"
                }
            )
        })
    }

    /// Refuses a key of the run's `sgd` or `model` table that no field
    /// reads. Those types skip unknown keys (they travel to agents, which
    /// must read a newer coordinator's specs), so a misspelt `class_weigth`
    /// or `prox_muu` was dropped without a word and the run trained with
    /// the default. Every field is serialised, so a written key missing from
    /// the typed value serialised back is one nothing read.
    fn unknown_inline_keys(&self, table: &toml::Table) -> Result<(), String> {
        let typed = [
            ("sgd", toml::Value::try_from(&self.sgd)),
            ("model", toml::Value::try_from(&self.model)),
        ];
        for (key, known) in typed {
            let (Some(toml::Value::Table(written)), Ok(toml::Value::Table(known))) =
                (table.get(key), known)
            else {
                continue;
            };
            if let Some(k) = written.keys().find(|k| !known.contains_key(*k)) {
                let takes: Vec<&str> = known.keys().map(String::as_str).collect();
                return Err(format!(
                    "unknown key `{k}` in `run.{key}` (it takes: {})",
                    takes.join(", ")
                ));
            }
        }
        Ok(())
    }

    /// Parses and validates a run from TOML: a `[run]` table (so a
    /// coordinator.toml can be submitted as it is) or the run's keys at the
    /// top level, with an optional `[schedule]` (`every`, `repeat`).
    /// `source` names the file in errors.
    pub fn from_toml(text: &str, source: &Path) -> Result<(Self, Option<Schedule>), ConfigError> {
        let parse = |message: String| ConfigError::Parse {
            file: source.into(),
            message,
        };
        let mut doc: toml::Table = toml::from_str(text).map_err(|e| parse(e.to_string()))?;
        let schedule = match doc.remove("schedule") {
            None => None,
            Some(v) => {
                let s: ScheduleToml = v.try_into().map_err(|e: toml::de::Error| {
                    parse(fedcart_common::config_errors::explain(
                        &format!("[schedule]: {e}"),
                        text,
                    ))
                })?;
                let every_ms = parse_every(&s.every).map_err(|message| ConfigError::Invalid {
                    field: "schedule.every",
                    message,
                })?;
                if s.repeat.is_none() && every_ms < MIN_EVERY_MS {
                    return Err(ConfigError::Invalid {
                        field: "schedule.every",
                        message: format!(
                            "`{}` without `repeat` would start instances back to back for ever: \
                             wait at least 1s, or give `repeat`",
                            s.every
                        ),
                    });
                }
                Some(Schedule {
                    every_ms,
                    repeat: s.repeat,
                })
            }
        };
        let (mut run, table) = if let Some(toml::Value::Table(t)) = doc.get("run") {
            // Keys beside `[run]` would be dropped without a word.
            let beside: Vec<String> = doc
                .keys()
                .filter(|k| *k != "run" && *k != "serve")
                .map(|k| format!("`{k}`"))
                .collect();
            if !beside.is_empty() {
                return Err(parse(format!(
                    "this file has a `[run]` table and {} outside it: put every key of the \
                     run inside `[run]` (only `[schedule]` goes beside it, and a `[serve]` \
                     table is ignored), or remove the \
                     `[run]` line and write the run's keys at the top level",
                    beside.join(", ")
                )));
            }
            let run = toml::from_str::<RunFile>(text)
                .map(|f| f.run)
                .map_err(|e| parse(pinpoint::message(&e, text)))?;
            (run, t.clone())
        } else if doc.contains_key("serve") {
            // `[serve]` is read beside a `[run]` table (a coordinator.toml);
            // beside top-level run keys it was refused as an unknown field
            // while the message above said it is ignored.
            return Err(parse(
                "this file has the run's keys at the top level and a `[serve]` table: a \
                 `[serve]` table goes with a `[run]` table (as in a coordinator.toml, where \
                 `runs submit` ignores it); put the run's keys under `[run]`, or remove `[serve]`"
                    .into(),
            ));
        } else if schedule.is_some() {
            // The schedule is not one of the run's keys: the rest is.
            let run = toml::Value::Table(doc.clone())
                .try_into::<RunConfig>()
                .map_err(|e| parse(fedcart_common::config_errors::explain(&e.to_string(), text)))?;
            (run, doc)
        } else {
            let run = toml::from_str::<RunConfig>(text)
                .map_err(|e| parse(pinpoint::message(&e, text)))?;
            (run, doc)
        };
        run.unknown_inline_keys(&table).map_err(parse)?;
        run.under_dp_defaults(Some(&table)).map_err(parse)?;
        run.validate()?;
        if let Some(s) = &schedule {
            // Instance n runs as `<id>.<n>`, which must pass the id rule too.
            let last = s.repeat.map_or(u64::MAX, |r| r.saturating_add(1));
            let longest = run.run_id.len() + 1 + last.to_string().len();
            let max = fedcart_common::identity::MAX_MERCHANT_ID_LEN;
            if longest > max {
                return Err(ConfigError::Invalid {
                    field: "run.run_id",
                    message: format!(
                        "`{}` is {} characters: a scheduled run's instances are `<id>.<n>` up to \
                         `<id>.{last}`, {longest} characters, past the {max} an id may have; \
                         shorten the id{}",
                        run.run_id,
                        run.run_id.len(),
                        if s.repeat.is_none() {
                            " (without `repeat` there is room for any instance number)"
                        } else {
                            ""
                        }
                    ),
                });
            }
        }
        if schedule.is_some() && run.dp.is_some() {
            return Err(ConfigError::Invalid {
                field: "schedule",
                message: "scheduled retraining of a run with `run.dp` would spend the privacy \
                          budget again in every instance, and ε is not accounted across \
                          instances: not supported"
                    .into(),
            });
        }
        Ok((run, schedule))
    }

    /// Under DP-FedAvg, an explicit MF run's `hyper` keys that `table` (the
    /// run's TOML table, as written) leaves out take
    /// [`MfHyper::explicit_dp`](fedcart_common::model::mf::MfHyper::explicit_dp)'s
    /// values instead of the no-DP defaults the model table was read over:
    /// clipping and noise on every coordinate favour the smaller, slower
    /// settings (BENCHMARKS.md, "Explicit MF defaults"). `factors` is
    /// always given, so it is the operator's. The keys were checked when the
    /// model table was read.
    fn under_dp_defaults(&mut self, table: Option<&toml::Table>) -> Result<(), String> {
        let ModelSpec::Mf { hyper, .. } = &mut self.model else {
            return Ok(());
        };
        if self.dp.is_none() {
            return Ok(());
        }
        let given = table
            .and_then(|t| t.get("model"))
            .and_then(|m| m.get("hyper"))
            .cloned()
            .unwrap_or_else(|| toml::Value::Table(toml::Table::new()));
        *hyper = fedcart_common::model::mf::explicit_dp_hyper(given)
            .map_err(|e| format!("run.model.hyper: {e}"))?;
        Ok(())
    }

    /// Checks the values once, before any work starts.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field, message: String| Err(ConfigError::Invalid { field, message });
        if self.run_id.is_empty() {
            return bad("run.run_id", "must not be empty".into());
        }
        // The id names the run's sub-tree in the store (`run/<id>/…`).
        if fedcart_common::identity::validate_id(&self.run_id).is_err() {
            return bad(
                "run.run_id",
                format!(
                    "`{}` must be 1 to {} characters of [A-Za-z0-9-_.@], not only dots",
                    self.run_id.chars().take(140).collect::<String>(),
                    fedcart_common::identity::MAX_MERCHANT_ID_LEN
                ),
            );
        }
        if self.rounds == 0 {
            return bad(
                "run.rounds",
                "0 must be ≥ 1: round r commits version r, and a run ends after its last".into(),
            );
        }
        if let Some(es) = &self.early_stopping {
            if es.patience == 0 {
                return bad(
                    "run.early_stopping.patience",
                    "must be at least 1 (leave `early_stopping` out to train every round)".into(),
                );
            }
            if self.model.selection_metric().is_none() || !self.evaluate {
                return bad(
                    "run.early_stopping",
                    format!(
                        "model `{}` reports no validation metric to stop on{}",
                        self.model.name(),
                        if self.evaluate {
                            ""
                        } else {
                            " (and run.evaluate is off)"
                        }
                    ),
                );
            }
        }
        if !(self.selection.fraction > 0.0 && self.selection.fraction <= 1.0) {
            return bad(
                "run.selection.fraction",
                format!("{} is not in (0, 1]", self.selection.fraction),
            );
        }
        if self.selection.min_agents == 0 || self.selection.min_agents > self.selection.max_agents {
            return bad(
                "run.selection.min_agents",
                format!(
                    "must be ≥ 1 and ≤ max_agents ({})",
                    self.selection.max_agents
                ),
            );
        }
        if self.quorum == 0 || self.quorum > self.selection.min_agents {
            return bad(
                "run.quorum",
                format!(
                    "{} must be ≥ 1 and ≤ selection.min_agents ({})",
                    self.quorum, self.selection.min_agents
                ),
            );
        }
        if self.round_timeout_ms == 0 {
            return bad("run.round_timeout_ms", "must be positive".into());
        }
        if self.max_attempts == 0 {
            return bad("run.max_attempts", "must be ≥ 1".into());
        }
        if !(self.sgd.learning_rate.is_finite() && self.sgd.learning_rate > 0.0) {
            return bad(
                "run.sgd.learning_rate",
                format!(
                    "{} must be finite and positive",
                    shown_f32(self.sgd.learning_rate)
                ),
            );
        }
        if self.sgd.batch_size == 0 {
            return bad("run.sgd.batch_size", "0 must be ≥ 1".into());
        }
        if self.sgd.epochs == 0 {
            return bad("run.sgd.epochs", "0 must be ≥ 1".into());
        }
        // A NaN penalty would reach every agent's weights (and cannot even
        // be written into a task spec's JSON); a negative one rewards large
        // weights.
        for (field, v) in [
            ("run.sgd.l2", self.sgd.l2),
            ("run.sgd.prox_mu", self.sgd.prox_mu),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return bad(field, format!("{} must be finite and ≥ 0", shown_f32(v)));
            }
        }
        // The model's size first: the coordinator allocates it when the run
        // opens, and a catalogue of billions of rows must be a refusal
        // naming the setting, not an aborted process.
        if let ModelSpec::Mf {
            num_items, factors, ..
        }
        | ModelSpec::MfImplicit {
            num_items, factors, ..
        } = &self.model
        {
            let values = (*num_items as u128) * (*factors as u128 + 1);
            if *num_items == 0 || values > MAX_MODEL_VALUES as u128 {
                return bad(
                    "run.model",
                    format!(
                        "num_items {num_items} × (factors {factors} + 1) must be between 1 and \
                         {MAX_MODEL_VALUES} values (4 GiB of f32): hash the catalogue into fewer \
                         rows or use fewer factors"
                    ),
                );
            }
        }
        if let Err(e) = self.model.check() {
            return bad("run.model", e.to_string());
        }
        if self.model.model_len() > MAX_MODEL_VALUES {
            return bad(
                "run.model",
                format!(
                    "{} values, more than the {MAX_MODEL_VALUES} (4 GiB of f32) a run may hold",
                    self.model.model_len()
                ),
            );
        }
        // Boosting spends one round on the feature sketch, then one per
        // level of each tree: with fewer rounds the run "finishes" with no
        // tree, and its constant model would be served.
        if let ModelSpec::ChurnGbdt { params, .. } = &self.model {
            let first_tree = 1 + params.max_depth as u64;
            if self.rounds < first_tree {
                return bad(
                    "run.rounds",
                    format!(
                        "{} ends before the first tree is grown: churn_gbdt spends one round on \
                         the feature sketch, then one per level of each tree (max_depth {}); give \
                         at least {first_tree}, or 1 + trees × max_depth = {} for every tree",
                        self.rounds,
                        params.max_depth,
                        1 + (params.trees * params.max_depth) as u64
                    ),
                );
            }
        }
        if self.model.is_analysis() {
            if let Some(needed) = self.model.model().analysis().and_then(|a| a.max_versions())
                && self.rounds < needed
            {
                return bad(
                    "run.rounds",
                    format!(
                        "{} is too few for the {} analysis, which can take {needed} rounds",
                        self.rounds,
                        self.model.name()
                    ),
                );
            }
            // An analysis's next version is computed from the exact sum: no
            // strategy step, and no noise (which would change the counts).
            if self.dp.is_some() {
                return bad(
                    "run.dp",
                    format!(
                        "the {} analysis sums exact counts; differential privacy is not \
                         supported for it: leave the DP settings out (secure aggregation still \
                         hides each merchant's counts from the coordinator)",
                        self.model.name()
                    ),
                );
            }
            if self.strategy != StrategySpec::FedAvg {
                return bad(
                    "run.strategy",
                    format!(
                        "the {} analysis computes each version from the summed counts; \
                         use \"fedavg\" (the strategy is not applied)",
                        self.model.name()
                    ),
                );
            }
        }
        if let Some(dp) = &self.dp {
            dp.validate(self)?;
        }
        self.check_strategy()?;
        if let Some(sa) = &self.secagg {
            if !(sa.clip.is_finite() && sa.clip > 0.0) {
                return bad(
                    "run.secagg.clip",
                    format!("{} must be finite and positive", shown_f32(sa.clip)),
                );
            }
            if let Some(k) = sa.neighbours
                && k < MIN_NEIGHBOURS
            {
                return bad(
                    "run.secagg.neighbours",
                    format!(
                        "{k} is below the minimum {MIN_NEIGHBOURS}: in a sparse graph of low \
                         degree the coordinator could learn the sums of small groups of agents \
                         (with 1, of every pair); use at least {MIN_NEIGHBOURS}, or leave it unset \
                         for the complete graph up to 64 agents"
                    ),
                );
            }
            if sa.stage_timeout_ms == Some(0) {
                return bad("run.secagg.stage_timeout_ms", "must be positive".into());
            }
            if self.selection.max_agents < 2 {
                return bad(
                    "run.selection.max_agents",
                    format!(
                        "{} is too few for secure aggregation, which hides each merchant's update \
                         in a sum of at least 2: select at least 2, or leave out [run.secagg]",
                        self.selection.max_agents
                    ),
                );
            }
        }
        Ok(())
    }

    /// The one place that holds the rule "a strategy that needs individual
    /// updates cannot run under a protection that hides them", for secure
    /// aggregation and differential privacy alike.
    fn check_strategy(&self) -> Result<(), ConfigError> {
        let protection = if self.secagg.is_some() {
            Some("secure aggregation")
        } else if self.dp.is_some() {
            Some("differential privacy")
        } else {
            None
        };
        if let Some(protection) = protection {
            self.strategy
                .require_streaming(protection)
                .map_err(|e| ConfigError::Invalid {
                    field: "run.strategy",
                    message: e.to_string(),
                })?;
        }
        // FedProx is a client-side term: a model whose local training has
        // none would run FedAvg while the run's records say FedProx.
        if !self.model.takes_proximal_term() {
            let given = match self.strategy {
                StrategySpec::FedProx { .. } => Some("run.strategy"),
                _ if self.sgd.prox_mu > 0.0 => Some("run.sgd.prox_mu"),
                _ => None,
            };
            if let Some(field) = given {
                return Err(ConfigError::Invalid {
                    field,
                    message: format!(
                        "FedProx's proximal term is added by churn-lr and churn-mlp local \
                         training; the `{}` model's has none, so it would run plain FedAvg: use \
                         `fedavg`",
                        self.model.name()
                    ),
                });
            }
        }
        // Krum's guarantee holds against f Byzantine updates among at least
        // 2f + 3; below that it silently degrades to whatever it keeps.
        if let StrategySpec::Krum {
            byzantine, keep, ..
        } = self.strategy
        {
            let most = self.selection.max_agents;
            if 2 * byzantine + 3 > most || keep > most {
                return Err(ConfigError::Invalid {
                    field: "run.strategy",
                    message: format!(
                        "{} tolerates {byzantine} malicious merchants only among at least {} \
                         updates (2f + 3), and keeps {keep}; a round has at most {most} \
                         (selection.max_agents): lower f or select more merchants",
                        self.strategy,
                        2 * byzantine + 3
                    ),
                });
            }
        }
        Ok(())
    }
}

/// A 32-bit setting as an error shows it: a value written beyond the
/// float range (`1e300`) reads as infinite, and "inf must be finite" named
/// a value the operator never wrote (found by a fault probe).
fn shown_f32(v: f32) -> String {
    if v.is_infinite() {
        format!("{v} (or a value beyond ±3.4e38, the range of a 32-bit float)")
    } else {
        v.to_string()
    }
}

#[cfg(test)]
mod tests {
    use fedcart_common::federation::strategy::StrategySpec;
    use fedcart_common::model::mf::MfHyper;

    use super::*;

    const EXAMPLE: &str = include_str!("../examples/coordinator.toml");

    /// Writes `text` to a temporary `coordinator.toml` and loads it.
    fn load(text: &str) -> (tempfile::TempDir, Result<CoordinatorConfig, ConfigError>) {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("coordinator.toml");
        std::fs::write(&path, text).expect("write config");
        let cfg = CoordinatorConfig::load(&path);
        (dir, cfg)
    }

    /// A secure run whose rounds may hold 2 merchants failed every round
    /// against agents under their default policy, with nothing said: the
    /// operator is warned, naming the key.
    #[test]
    fn a_secure_run_whose_rounds_may_hold_two_merchants_is_warned_about() {
        let (_dir, cfg) = load(EXAMPLE);
        let mut run = cfg.expect("example loads").run;
        run.selection.min_agents = 2;
        assert_eq!(run.small_secure_round_warning(), None, "not secure");
        run.secagg = Some(SecAggSettings {
            neighbours: None,
            clip: 1.0,
            verify_survivors: false,
            stage_timeout_ms: None,
        });
        let w = run.small_secure_round_warning().expect("warned");
        assert!(
            w.contains("may start with 2 merchants (selection.min_agents)")
                && w.contains("privacy.min_neighbours = 2"),
            "{w}"
        );
        run.selection.min_agents = 3;
        assert_eq!(run.small_secure_round_warning(), None);
    }

    #[test]
    fn example_strategy_is_parsed_once_at_load() {
        let (_dir, cfg) =
            load(&EXAMPLE.replace("strategy = \"fedavg\"", "strategy = \"fedprox:0.01\""));
        let cfg = cfg.expect("example loads");
        assert_eq!(cfg.run.strategy, StrategySpec::FedProx { mu: 0.01 });
        // Stored runs keep the plain string form.
        let json = serde_json::to_value(&cfg.run).expect("serialises");
        assert_eq!(json["strategy"], "fedprox:0.01");
    }

    /// The example configuration with its `model = …` line replaced.
    fn with_model(model: &str) -> String {
        let line = EXAMPLE
            .lines()
            .find(|l| l.starts_with("model = "))
            .expect("the example names its model");
        EXAMPLE.replace(line, model)
    }

    #[test]
    fn an_mf_runs_hyper_parameters_load_from_the_model_table_over_the_familys_defaults() {
        let hyper_of = |model: &str| {
            let (_dir, cfg) = load(&with_model(model));
            cfg.map(|c| c.run.model.mf_shape().expect("an MF run").hyper.clone())
        };
        let mf = "model = { family = \"mf\", num_items = 50, factors = 8, \
                  hyper = { refit_users = true, learning_rate = 0.03 } }";
        let (_dir, cfg) = load(&with_model(mf));
        let cfg = cfg.expect("loads");
        let shape = cfg.run.model.mf_shape().expect("an MF run");
        assert!(shape.hyper.refit_users && !shape.implicit);
        assert_eq!((shape.k, shape.hyper.learning_rate), (8, 0.03));
        // The keys left out keep the explicit defaults, not those of the
        // struct (one epoch, another penalty): the simulator's settings.
        assert_eq!(
            *shape.hyper,
            MfHyper {
                refit_users: true,
                learning_rate: 0.03,
                ..MfHyper::explicit()
            }
        );
        let plain = "model = { family = \"mf\", num_items = 50, factors = 8 }";
        assert_eq!(hyper_of(plain).expect("loads"), MfHyper::explicit());
        // Implicit models start from their algorithm's defaults.
        let implicit = "model = { family = \"mf_implicit\", num_items = 50, factors = 8 }";
        assert_eq!(hyper_of(implicit).expect("loads"), MfHyper::bpr());
        let epochs = implicit.replace(" }", ", hyper = { epochs = 2 } }");
        let bpr = hyper_of(&epochs).expect("loads");
        assert_eq!(
            bpr,
            MfHyper {
                epochs: 2,
                ..MfHyper::bpr()
            }
        );
        let ials = implicit.replace(" }", ", hyper = { algorithm = \"ials\", alpha = 8.0 } }");
        let ials = hyper_of(&ials).expect("loads");
        assert_eq!(
            ials,
            MfHyper {
                alpha: 8.0,
                ..MfHyper::ials()
            }
        );
        // A misspelt key is named, with the keys there are.
        let typo = plain.replace(" }", ", hyper = { learning_rat = 0.1 } }");
        let err = format!("{:#}", hyper_of(&typo).expect_err("refused"));
        assert!(err.contains("unknown key `learning_rat` in hyper"), "{err}");
        assert!(err.contains("learning_rate"), "{err}");
        let bad = implicit.replace(" }", ", hyper = { algorithm = \"als\" } }");
        let err = format!("{:#}", hyper_of(&bad).expect_err("refused"));
        assert!(err.contains("hyper.algorithm"), "{err}");
        // What the coordinator hands the agents reads back as it was.
        let spec = fedcart_common::task::ModelSpec::MfImplicit {
            num_items: 50,
            factors: 8,
            hyper: MfHyper {
                clip: Some([1.0, 5.0]),
                ..ials
            },
        };
        let json = serde_json::to_string(&spec).unwrap();
        assert_eq!(
            serde_json::from_str::<fedcart_common::task::ModelSpec>(&json).unwrap(),
            spec
        );
    }

    #[test]
    fn an_explicit_mf_run_under_dp_reads_its_hyper_table_over_the_dp_defaults() {
        let dp = "\n[run.dp]\nclip = 1.0\nnoise_multiplier = 1.0\ndelta = 1e-5\n\
                  population = 100\n";
        let mf = "model = { family = \"mf\", num_items = 50, factors = 32 }";
        let epochs = "model = { family = \"mf\", num_items = 50, factors = 32, \
                      hyper = { epochs = 7, refit_users = true } }";
        let implicit = "model = { family = \"mf_implicit\", num_items = 50, factors = 32 }";
        let src = Path::new("run.toml");
        for (model, with_dp, want) in [
            (mf, true, MfHyper::explicit_dp()),
            (mf, false, MfHyper::explicit()),
            (
                epochs,
                true,
                MfHyper {
                    epochs: 7,
                    refit_users: true,
                    ..MfHyper::explicit_dp()
                },
            ),
            (
                epochs,
                false,
                MfHyper {
                    epochs: 7,
                    refit_users: true,
                    ..MfHyper::explicit()
                },
            ),
            // No DP-specific defaults were chosen for the implicit models.
            (implicit, true, MfHyper::bpr()),
        ] {
            let text = with_model(model) + if with_dp { dp } else { "" };
            let (_dir, cfg) = load(&text);
            let run = cfg.expect("loads").run;
            assert_eq!(run.dp.is_some(), with_dp);
            let hyper = run.model.mf_shape().expect("an MF run").hyper.clone();
            assert_eq!(hyper, want, "{model} (dp: {with_dp})");
            // A submitted run reads the same, with a `[run]` table or the
            // run's keys at the top level.
            let (submitted, _) = RunConfig::from_toml(&text, src).expect("loads");
            assert_eq!(submitted, run);
            let top = toml::to_string(&run).expect("serialises");
            assert_eq!(RunConfig::from_toml(&top, src).expect("loads").0, run);
        }
        // The DP defaults are the smaller, slower settings.
        let (dp, plain) = (MfHyper::explicit_dp(), MfHyper::explicit());
        assert!(dp.learning_rate < plain.learning_rate && dp.epochs < plain.epochs);
    }

    /// `[run.dp]` is refused where its ε could not hold: for every analysis
    /// (each sums exact counts) and for a scheduled run (each instance would
    /// spend the budget again, unaccounted), the error naming the key. Each
    /// run loads without the `[run.dp]`.
    #[test]
    fn dp_is_refused_for_analyses_and_for_scheduled_runs_naming_the_key() {
        let dp = "\n[run.dp]\nclip = 1.0\nnoise_multiplier = 1.0\ndelta = 1e-5\n\
                  population = 100\n";
        for model in [
            "model = { family = \"itemsets\", num_items = 50, min_count = 2 }",
            "model = { family = \"segments\", num_features = 8, ks = [2, 3], lloyd_rounds = 4 }",
            "model = { family = \"churn_gbdt\", num_features = 8 }",
        ] {
            let (_dir, plain) = load(&with_model(model));
            plain.unwrap_or_else(|e| panic!("{model} without DP: {e}"));
            let (_dir, cfg) = load(&(with_model(model) + dp));
            let e = cfg.expect_err(model).to_string();
            assert!(
                e.contains("run.dp") && e.contains("not supported"),
                "{model}: {e}"
            );
        }
        let src = Path::new("run.toml");
        let schedule = "\n[schedule]\nevery = \"1h\"\n";
        RunConfig::from_toml(&format!("{EXAMPLE}{schedule}"), src).expect("loads without DP");
        let e = RunConfig::from_toml(&format!("{EXAMPLE}{dp}{schedule}"), src)
            .expect_err("scheduled under DP")
            .to_string();
        assert!(
            e.contains("schedule") && e.contains("privacy budget again"),
            "{e}"
        );
    }

    /// A scheduled run's instances are `<id>.<n>`: an id that leaves no
    /// room for the last instance's suffix is refused at submission (the
    /// schedule ended with a log line when the instance could not start),
    /// and `.`/`..` are no run ids (an agent keeps a run in `runs/<id>/`).
    #[test]
    fn run_ids_leave_room_for_scheduled_instances_and_are_not_only_dots() {
        let src = Path::new("run.toml");
        let with_id = |id: &str, schedule: &str| {
            EXAMPLE.replace("run_id = \"churn-1\"", &format!("run_id = \"{id}\"")) + schedule
        };
        let repeat9 = "\n[schedule]\nevery = \"1h\"\nrepeat = 9\n";
        let forever = "\n[schedule]\nevery = \"1h\"\n";
        // repeat = 9: instances 1..=10, so `.10` is the longest suffix.
        let fits = "x".repeat(128 - 3);
        RunConfig::from_toml(&with_id(&fits, repeat9), src).expect("room for `.10`");
        let e = RunConfig::from_toml(&with_id(&"x".repeat(126), repeat9), src)
            .expect_err("no room for `.10`")
            .to_string();
        assert!(
            e.contains("run.run_id") && e.contains(".10`, 129 characters"),
            "{e}"
        );
        // Without `repeat`, room for any instance number.
        let e = RunConfig::from_toml(&with_id(&fits, forever), src)
            .expect_err("unbounded")
            .to_string();
        assert!(e.contains("without `repeat`"), "{e}");
        RunConfig::from_toml(&with_id(&"x".repeat(100), forever), src).expect("short id");
        // Unscheduled, the whole 128 characters are the run's.
        RunConfig::from_toml(&with_id(&"x".repeat(128), ""), src).expect("unscheduled");
        for dots in [".", ".."] {
            let e = RunConfig::from_toml(&with_id(dots, ""), src)
                .expect_err(dots)
                .to_string();
            assert!(
                e.contains("run.run_id") && e.contains("not only dots"),
                "{e}"
            );
        }
    }

    #[test]
    fn a_bare_secagg_table_takes_every_default_the_readme_documents() {
        let (_dir, cfg) = load(&format!("{EXAMPLE}\n[run.secagg]\n"));
        let secagg = cfg
            .expect("loads")
            .run
            .secagg
            .expect("secure aggregation on");
        assert_eq!(secagg.clip, DEFAULT_SECAGG_CLIP);
        assert_eq!(secagg.neighbours, None);
        assert!(!secagg.verify_survivors);
        assert_eq!(secagg.stage_timeout_ms, None);
        let readme = include_str!("../../README.md");
        assert!(
            readme.contains("clip = 1e5 "),
            "README documents the default clip"
        );
    }

    #[test]
    fn missing_strategy_defaults_to_fedavg() {
        let (_dir, cfg) = load(&EXAMPLE.replace("strategy = \"fedavg\"\n", ""));
        assert_eq!(cfg.expect("loads").run.strategy, StrategySpec::FedAvg);
    }

    #[test]
    fn unknown_strategy_error_names_the_key_and_the_file() {
        let (_dir, cfg) = load(&EXAMPLE.replace("strategy = \"fedavg\"", "strategy = \"fedfoo\""));
        let err = cfg.expect_err("unknown strategy refused");
        let text = err.to_string();
        assert!(matches!(err, ConfigError::Parse { .. }), "{text}");
        assert!(text.contains("coordinator.toml"), "{text}");
        assert!(text.contains("run.strategy"), "{text}");
        assert!(text.contains("fedfoo"), "{text}");
    }

    #[test]
    fn paths_resolve_from_the_config_files_directory_and_env_overrides_name_the_variable() {
        let (dir, cfg) = load(EXAMPLE);
        let cfg = cfg.expect("example loads");
        assert_eq!(
            cfg.serve.store,
            dir.path().join("../../var/coordinator.redb")
        );
        let tls = cfg.serve.tls.expect("tls section");
        assert_eq!(tls.ca, dir.path().join("../../pki/ca.pem"));
        assert_eq!(tls.access, dir.path().join("../../pki/access.toml"));

        let path = dir.path().join("coordinator.toml");
        let pem = dir.path().join("elsewhere.pem");
        std::fs::write(&pem, "").unwrap();
        let with = |var: &'static str, value: PathBuf| {
            move |k: &str| (k == var).then(|| value.clone().into_os_string())
        };
        let cfg = CoordinatorConfig::load_with_env(&path, with("FEDCART_TLS_KEY", pem.clone()))
            .expect("override applies");
        assert_eq!(cfg.serve.tls.unwrap().key, pem);
        let missing = dir.path().join("missing.pem");
        let err = CoordinatorConfig::load_with_env(&path, with("FEDCART_TLS_CA", missing.clone()))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("FEDCART_TLS_CA") && err.contains(&missing.display().to_string()),
            "{err}"
        );
    }

    fn run() -> RunConfig {
        let (_dir, cfg) = load(EXAMPLE);
        cfg.expect("example loads").run
    }

    /// A model the coordinator could not allocate (a catalogue of billions
    /// of rows), or one the agents cannot train (no factors, a hidden layer
    /// of width 0), is refused by name when the run is configured or
    /// submitted, and when a stored run is opened, instead of aborting the
    /// coordinator or the agents.
    #[test]
    fn a_model_too_large_or_without_a_shape_is_refused_naming_run_model() {
        let refused = |model: ModelSpec| {
            let mut r = run();
            r.model = model;
            match r.validate() {
                Err(ConfigError::Invalid { field, message }) => {
                    assert_eq!(field, "run.model", "{message}");
                    message
                }
                other => panic!("expected run.model to be refused, got {other:?}"),
            }
        };
        let huge = refused(ModelSpec::MfImplicit {
            num_items: 4_000_000_000,
            factors: 64,
            hyper: Default::default(),
        });
        assert!(
            huge.contains("num_items 4000000000 × (factors 64 + 1)"),
            "{huge}"
        );
        let none = refused(ModelSpec::MfImplicit {
            num_items: 100,
            factors: 0,
            hyper: Default::default(),
        });
        assert!(none.contains("at least one factor"), "{none}");
        refused(ModelSpec::churn_mlp(8, vec![0]));
        let share = refused(ModelSpec::ChurnLr {
            num_features: 8,
            valid_fraction: 0.6,
        });
        assert!(
            share.contains("valid_fraction 0.6 is not in [0, 0.5)"),
            "{share}"
        );
        refused(ModelSpec::Noop {
            dim: MAX_MODEL_VALUES + 1,
        });
        // A stored run that predates the check is refused by name when opened.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.redb");
        let mut r = run();
        {
            let store = crate::store::Store::open(&path).unwrap();
            r.model = ModelSpec::MfImplicit {
                num_items: 4_000_000_000,
                factors: 64,
                hyper: Default::default(),
            };
            let json = serde_json::to_value(&r).unwrap();
            store.put_meta_json(&[("run_config", json)]).unwrap();
        }
        let store = crate::store::Store::open(&path).unwrap();
        let e = crate::engine::Engine::open(store, r)
            .err()
            .expect("refused")
            .to_string();
        assert!(e.contains("num_items 4000000000"), "{e}");
    }

    /// `krum:20` with ten merchants ran, Krum quietly keeping what it could:
    /// f needs 2f + 3 updates, and Multi-Krum cannot keep more than a round has.
    #[test]
    fn krum_beyond_its_bound_is_refused_naming_the_strategy() {
        let mut r = run();
        r.selection.min_agents = 3;
        r.selection.max_agents = 10;
        r.quorum = 3;
        for ok in ["krum:3", "multikrum:2:5"] {
            r.strategy = ok.parse().unwrap();
            r.validate().unwrap();
        }
        for bad in ["krum:4", "krum:20", "multikrum:1:11"] {
            r.strategy = bad.parse().unwrap();
            match r.validate() {
                Err(ConfigError::Invalid { field, message }) => {
                    assert_eq!(field, "run.strategy");
                    assert!(message.contains("selection.max_agents"), "{message}");
                }
                other => panic!("{bad}: expected a refusal, got {other:?}"),
            }
        }
    }

    /// An analysis trains nothing: its run needs no `sgd` line (README's
    /// itemsets example failed with "missing field `sgd`").
    #[test]
    fn a_run_without_sgd_takes_the_defaults() {
        let line = "sgd = { epochs = 1, batch_size = 32, learning_rate = 0.05, l2 = 0.0 }";
        assert!(EXAMPLE.contains(line));
        let (_dir, cfg) = load(&EXAMPLE.replace(line, ""));
        assert_eq!(cfg.unwrap().run.sgd, SgdParams::default());
    }

    /// A misspelt key inside `sgd = { … }` or `model = { … }` was dropped
    /// without a word (the run trained with the default); it is refused
    /// naming the key and the table, in a coordinator.toml and a submitted run.
    #[test]
    fn a_misspelt_key_in_sgd_or_model_is_refused() {
        let line = "sgd = { epochs = 1, batch_size = 32, learning_rate = 0.05, l2 = 0.0 }";
        let typo =
            "sgd = { epochs = 1, batch_size = 32, learning_rate = 0.05, l2 = 0.0, prox_muu = 0.5 }";
        let (_dir, cfg) = load(&EXAMPLE.replace(line, typo));
        let e = cfg.unwrap_err().to_string();
        assert!(
            e.contains("unknown key `prox_muu` in `run.sgd`") && e.contains("prox_mu"),
            "{e}"
        );
        let e = RunConfig::from_toml(&EXAMPLE.replace(line, typo), Path::new("run.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown key `prox_muu` in `run.sgd`"), "{e}");
        let model = EXAMPLE
            .lines()
            .find(|l| l.trim_start().starts_with("model = {"))
            .expect("the example's model line");
        let typo = model.replacen("family", "num_hiden = 3, family", 1);
        let (_dir, cfg) = load(&EXAMPLE.replace(model, &typo));
        let e = cfg.unwrap_err().to_string();
        assert!(e.contains("unknown key `num_hiden` in `run.model`"), "{e}");
        // Every key the example writes is read.
        let (_dir, cfg) = load(EXAMPLE);
        cfg.unwrap();
    }

    /// FedProx with a model whose local training has no proximal term ran
    /// as FedAvg while its records said FedProx.
    #[test]
    fn fedprox_is_refused_for_a_model_without_a_proximal_term() {
        let mut r = run();
        r.strategy = "fedprox:0.1".parse().unwrap();
        r.validate().unwrap();
        r.model = ModelSpec::Noop { dim: 4 };
        match r.validate() {
            Err(ConfigError::Invalid { field, message }) => {
                assert_eq!(field, "run.strategy");
                assert!(message.contains("`noop` model's has none"), "{message}");
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        r.strategy = StrategySpec::FedAvg;
        r.sgd.prox_mu = 0.5;
        assert!(matches!(
            r.validate(),
            Err(ConfigError::Invalid {
                field: "run.sgd.prox_mu",
                ..
            })
        ));
    }

    /// Values that would make a run do nothing, spin, or carry NaN into
    /// every agent's weights are refused at load, naming the key.
    #[test]
    fn settings_that_cannot_train_or_would_spin_are_refused_naming_the_key() {
        let sgd = "sgd = { epochs = 1, batch_size = 32, learning_rate = 0.05, l2 = 0.0 }";
        for (line, field, says) in [
            (
                sgd.replace("l2 = 0.0", "l2 = nan"),
                "run.sgd.l2",
                "NaN must be finite",
            ),
            (
                sgd.replace("l2 = 0.0", "l2 = inf"),
                "run.sgd.l2",
                "inf (or a value beyond ±3.4e38, the range of a 32-bit float) must be finite",
            ),
            (
                sgd.replace("learning_rate = 0.05", "learning_rate = 1e300"),
                "run.sgd.learning_rate",
                "inf (or a value beyond ±3.4e38, the range of a 32-bit float) must be finite",
            ),
            (
                sgd.replace("l2 = 0.0", "l2 = -50.0"),
                "run.sgd.l2",
                "-50 must be finite and ≥ 0",
            ),
            (
                sgd.replace("epochs = 1", "epochs = 0"),
                "run.sgd.epochs",
                "0 must be ≥ 1",
            ),
            (
                sgd.replace("batch_size = 32", "batch_size = 0"),
                "run.sgd.batch_size",
                "0 must be ≥ 1",
            ),
        ] {
            let (_dir, cfg) = load(&EXAMPLE.replace(sgd, &line));
            match cfg {
                Err(ConfigError::Invalid { field: f, message }) => {
                    assert_eq!(f, field, "{line}");
                    assert!(message.contains(says), "{line}: {message}");
                }
                other => panic!("{line}: expected a refusal, got {other:?}"),
            }
        }
        for (model, says) in [
            (
                r#"model = { family = "churn_lr", num_features = 0 }"#,
                "churn-lr needs at least one feature",
            ),
            (
                r#"model = { family = "mf_implicit", num_items = 50, factors = 4, hyper = { epochs = 0 } }"#,
                "`epochs` must be ≥ 1",
            ),
            (
                r#"model = { family = "mf_implicit", num_items = 50, factors = 4, hyper = { negatives = 0 } }"#,
                "BPR needs `negatives` ≥ 1",
            ),
            (
                r#"model = { family = "mf_implicit", num_items = 50, factors = 4, hyper = { learning_rate = 0.0 } }"#,
                "`learning_rate` must be > 0",
            ),
        ] {
            match load(&with_model(model)).1 {
                Err(ConfigError::Invalid { field, message }) => {
                    assert_eq!(field, "run.model", "{model}");
                    assert!(message.contains(says), "{model}: {message}");
                }
                other => panic!("{model}: expected a refusal, got {other:?}"),
            }
        }
        let (_dir, cfg) = load(&EXAMPLE.replace("ping_interval_ms = 5000", "ping_interval_ms = 0"));
        let e = cfg.unwrap_err().to_string();
        assert!(
            e.contains("coordinator.toml: invalid `serve.ping_interval_ms`: 0 must be ≥ 1"),
            "{e}"
        );
    }

    /// `listen = "localhost:50051"` is refused with the addresses to write
    /// (a listener binds an interface; names are not resolved).
    #[test]
    fn a_host_name_as_listen_address_says_to_write_an_ip() {
        let (_dir, cfg) = load(&EXAMPLE.replace(
            &format!("listen = \"{}\"", load(EXAMPLE).1.unwrap().serve.listen),
            "listen = \"localhost:50051\"",
        ));
        let e = cfg.unwrap_err().to_string();
        assert!(
            e.contains("`localhost:50051` is not IP:PORT: write e.g. 127.0.0.1:50051"),
            "{e}"
        );
        assert_eq!(
            parse_listen_addr("0.0.0.0:9090"),
            Ok("0.0.0.0:9090".parse().unwrap())
        );
    }

    #[test]
    fn runs_that_cannot_work_are_refused_when_submitted() {
        // Boosting with fewer rounds than one tree takes: no tree, and a
        // constant model served (a probe saw it replace a merchant's churn
        // model).
        let mut r = run();
        r.model = ModelSpec::ChurnGbdt {
            num_features: 8,
            params: fedcart_common::model::gbdt::GbdtParams {
                trees: 10,
                max_depth: 3,
                ..Default::default()
            },
            level_len: 0,
        };
        r.rounds = 3;
        match r.validate() {
            Err(ConfigError::Invalid { field, message }) => {
                assert_eq!(field, "run.rounds");
                assert!(
                    message.contains("give at least 4") && message.contains("= 31"),
                    "{message}"
                );
            }
            other => panic!("expected run.rounds to be refused, got {other:?}"),
        }
        r.rounds = 4;
        assert!(r.validate().is_ok());
        // Secure aggregation over at most one merchant.
        let mut r = run();
        r.secagg = Some(SecAggSettings {
            neighbours: None,
            clip: 1.0,
            verify_survivors: false,
            stage_timeout_ms: None,
        });
        r.selection.min_agents = 1;
        r.selection.max_agents = 1;
        r.quorum = 1;
        match r.validate() {
            Err(ConfigError::Invalid { field, message }) => {
                assert_eq!(field, "run.selection.max_agents");
                assert!(message.contains("at least 2"), "{message}");
            }
            other => panic!("expected run.selection.max_agents to be refused, got {other:?}"),
        }
    }

    #[test]
    fn secagg_neighbours_below_the_minimum_are_refused_naming_the_key() {
        let mut run = run();
        let settings = |neighbours| {
            Some(SecAggSettings {
                neighbours,
                clip: 1.0,
                verify_survivors: false,
                stage_timeout_ms: None,
            })
        };
        run.secagg = settings(Some(1));
        match run.validate() {
            Err(ConfigError::Invalid { field, message }) => {
                assert_eq!(field, "run.secagg.neighbours");
                assert!(message.contains("pair"), "{message}");
            }
            other => panic!("expected run.secagg.neighbours to be refused, got {other:?}"),
        }
        run.secagg = settings(Some(MIN_NEIGHBOURS - 1));
        assert!(run.validate().is_err());
        run.secagg = settings(Some(MIN_NEIGHBOURS));
        assert!(run.validate().is_ok());
        run.secagg = settings(None);
        assert!(run.validate().is_ok());
    }

    #[test]
    fn a_run_of_zero_rounds_is_refused_naming_the_key() {
        let mut run = run();
        run.rounds = 0;
        match run.validate() {
            Err(ConfigError::Invalid { field, message }) => {
                assert_eq!(field, "run.rounds");
                assert!(message.starts_with("0 must be ≥ 1"), "{message}");
            }
            other => panic!("expected run.rounds to be refused, got {other:?}"),
        }
        run.rounds = 1;
        assert!(run.validate().is_ok());
    }

    #[test]
    fn individual_update_strategy_refused_under_secure_aggregation() {
        let mut run = run();
        run.strategy = StrategySpec::FedMedian;
        assert!(run.validate().is_ok(), "fine without a protection");
        run.secagg = Some(SecAggSettings {
            neighbours: None,
            clip: 1.0,
            verify_survivors: false,
            stage_timeout_ms: None,
        });
        match run.validate() {
            Err(ConfigError::Invalid { field, message }) => {
                assert_eq!(field, "run.strategy");
                assert!(message.contains("fedmedian"), "{message}");
                assert!(message.contains("secure aggregation"), "{message}");
            }
            other => panic!("expected run.strategy to be refused, got {other:?}"),
        }
        run.strategy = StrategySpec::FedAvg;
        assert!(run.validate().is_ok());
    }

    #[test]
    fn a_run_file_takes_a_run_table_or_top_level_keys_and_an_optional_schedule() {
        let src = Path::new("run.toml");
        // coordinator.toml as it is: its `[run]`, `[serve]` ignored.
        let (run, schedule) = RunConfig::from_toml(EXAMPLE, src).unwrap();
        assert_eq!(schedule, None);
        let top = toml::to_string(&run).unwrap();
        assert_eq!(RunConfig::from_toml(&top, src).unwrap().0, run);
        let (again, schedule) =
            RunConfig::from_toml(&format!("{top}\n[schedule]\nevery = \"90m\"\n"), src).unwrap();
        assert_eq!(again, run);
        assert_eq!(
            schedule,
            Some(Schedule {
                every_ms: 90 * 60_000,
                repeat: None
            })
        );
        let bad = RunConfig::from_toml(&format!("{top}\n[schedule]\nevery = \"soon\"\n"), src)
            .unwrap_err()
            .to_string();
        assert!(
            bad.contains("schedule.every") && bad.contains("`soon`"),
            "{bad}"
        );
        let schedule = |every: &str, repeat: &str| {
            RunConfig::from_toml(
                &format!("{top}\n[schedule]\nevery = \"{every}\"\n{repeat}"),
                src,
            )
            .map(|_| ())
            .map_err(|e| e.to_string())
        };
        for every in ["99999999999d", "367d"] {
            let e = schedule(every, "").unwrap_err();
            assert!(e.contains("must be at most 366d"), "{every}: {e}");
        }
        let e = schedule("0s", "").unwrap_err();
        assert!(e.contains("back to back for ever"), "{e}");
        for (every, repeat) in [("1s", ""), ("366d", ""), ("0s", "repeat = 1\n")] {
            schedule(every, repeat).unwrap();
        }
        let typo = RunConfig::from_toml(&format!("{top}\n[schedule]\nevry = \"1h\"\n"), src)
            .unwrap_err()
            .to_string();
        assert!(typo.contains("run.toml") && typo.contains("evry"), "{typo}");
    }

    /// Mistakes a new-user probe made in run files, each answered with
    /// what to write instead.
    #[test]
    fn a_run_file_with_keys_in_the_wrong_place_or_misspelt_says_what_to_write() {
        let src = Path::new("run.toml");
        let err = |text: &str| RunConfig::from_toml(text, src).unwrap_err().to_string();
        // Top-level run keys beside a `[run]` table were dropped silently.
        let e = err(&format!(
            "rounds = 50
seed = 9
{EXAMPLE}"
        ));
        assert!(
            e.contains("run.toml") && e.contains("a `[run]` table and `rounds`, `seed` outside it"),
            "{e}"
        );
        // Top-level run keys and a `[serve]` table: refused as an unknown
        // field while the message above said `[serve]` is ignored.
        let e = err(
            "run_id = \"r\"\nrounds = 2\nmodel = { family = \"churn_lr\" }\n\
             [serve]\nlisten = \"127.0.0.1:1\"\n",
        );
        assert!(
            e.contains("a `[serve]` table goes with a `[run]` table")
                && e.contains("put the run's keys under `[run]`, or remove `[serve]`"),
            "{e}"
        );
        // `[schedule]` inside `[run]`, and in coordinator.toml.
        let e = err(&format!("{EXAMPLE}\n[run.schedule]\nevery = \"1h\"\n"));
        assert!(
            e.contains("unknown field `schedule`") && e.contains(pinpoint::SCHEDULE_GOES),
            "{e}"
        );
        let (_dir, loaded) = load(&format!("{EXAMPLE}\n[schedule]\nevery = \"1h\"\n"));
        let e = loaded.unwrap_err().to_string();
        assert!(e.contains(pinpoint::SCHEDULE_GOES), "{e}");
        // A misspelt required key of the model table (its keys are read
        // leniently: they travel to agents) is named, not only the key
        // missing; with the run's keys at the top level and a schedule too.
        let typo = EXAMPLE.replace("num_features = 8", "num_featurs = 8");
        let (run, _) = RunConfig::from_toml(EXAMPLE, src).unwrap();
        let top = toml::to_string(&run)
            .unwrap()
            .replace("num_features = 8", "num_featurs = 8");
        for text in [typo, format!("{top}\n[schedule]\nevery = \"1h\"\n")] {
            let e = err(&text);
            assert!(
                e.contains("missing field `num_features`")
                    && e.contains("(`num_featurs` on line")
                    && e.contains("is it `num_features` misspelt?)"),
                "{e}"
            );
        }
        // Rust's type names are said in words.
        let e = err(&EXAMPLE.replace("seed = 42", "seed = \"42\""));
        assert!(e.contains("expected a whole number (0 or more)"), "{e}");
    }
}
