//! `fedcart-client fleet`: one process hosting many real agent sessions, for
//! load tests and for studies that want the real protocol at scale.
//!
//! Each session is an ordinary [`Agent`] (the same session loop, transfers,
//! secure aggregation and privacy policy as `fedcart-client run`) with its
//! own merchant id, certificate and key, TCP connection and state; they only
//! share the process and its tokio runtime. Merchant `k` of the study is
//! `<prefix><k>`; a process hosts merchants `first .. first + merchants`, so
//! an Indexed Job gives each index its slice with `--job-index`.
//!
//! Data: `none` for tasks that need none (the `noop` model of load tests), or
//! `churn:PATH`, a customer CSV in the Telco schema dealt into the study's
//! `--total` merchants by `--partition` (the simulator's partitioners), each
//! merchant keeping a stratified `--holdout` of its rows for evaluation, as
//! a merchant's own agent does.
//!
//! Certificates: `--certs DIR` holds `ca.pem` and `<id>.pem` / `<id>.key`
//! for every hosted merchant (the files `fedcart-coordinator certs issue`
//! writes). Without it the sessions speak plaintext to an `--insecure`
//! coordinator and, having no key to bind, take secure rounds unbound.

use std::path::PathBuf;

use fedcart_common::data::partition::{PartitionError, Partitioner};
use fedcart_common::data::split;
use fedcart_common::data::tabular::{Schema, TabularDataset};
use fedcart_common::train::{ChurnData, LocalData};
use tokio::sync::watch;

use crate::agent::{Agent, AgentError};
use crate::data::DataError;
use crate::policy::PrivacyPolicy;
use crate::tls::{AgentTls, TlsError};

/// Where the fleet's merchants get their data.
#[derive(Debug, Clone, PartialEq)]
pub enum FleetData {
    /// No data: only tasks that need none (the `noop` model).
    None,
    /// A customer CSV in the Telco schema, dealt into the study's merchants.
    Churn(PathBuf),
}

impl std::str::FromStr for FleetData {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once(':') {
            None if s == "none" => Ok(Self::None),
            Some(("churn", path)) if !path.is_empty() => Ok(Self::Churn(path.into())),
            _ => Err(format!("`{s}`: expected `none` or `churn:PATH`")),
        }
    }
}

/// The `fleet` subcommand's arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct FleetArgs {
    /// The coordinator's URL: `https://HOST:PORT` (with `--certs`), or
    /// `http://HOST:PORT` for an `--insecure` coordinator.
    #[arg(long, env = "FEDCART_COORDINATOR")]
    pub coordinator: String,
    /// Agent sessions hosted by this process.
    #[arg(long)]
    pub merchants: usize,
    /// Index (in the study) of this process's first merchant.
    #[arg(long, default_value_t = 0, conflicts_with = "job_index")]
    pub first: usize,
    /// Index of this process in a Kubernetes Indexed Job: its first merchant
    /// is `job_index × merchants`.
    #[arg(long)]
    pub job_index: Option<usize>,
    /// Merchants in the whole study, over every fleet process (the data is
    /// dealt into this many); default: this process's last merchant + 1.
    #[arg(long)]
    pub total: Option<usize>,
    /// Merchant ids are `<prefix><index>`.
    #[arg(long, default_value = "m")]
    pub prefix: String,
    /// The merchants' data: `none`, or `churn:PATH` (a customer CSV in the
    /// Telco schema).
    #[arg(long, default_value = "none")]
    pub data: FleetData,
    /// How the data's rows are dealt into the study's merchants: `iid`,
    /// `dirichlet:ALPHA` (label skew) or `zipf:S` (size skew).
    #[arg(long, default_value = "iid")]
    pub partition: Partitioner,
    /// Seed of the partition.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Fraction of each merchant's rows held out for evaluation.
    #[arg(long, default_value_t = 0.2)]
    pub holdout: f64,
    /// Directory with `ca.pem` and `<id>.pem` / `<id>.key` for every hosted
    /// merchant (as `fedcart-coordinator certs issue` writes them).
    #[arg(long)]
    pub certs: Option<PathBuf>,
    /// Name to verify on the coordinator's certificate (default: the URL's host).
    #[arg(long)]
    pub domain: Option<String>,
    /// Exit once the coordinator announces the end of its run (batch jobs);
    /// by default sessions stay idle, waiting for the next run.
    #[arg(long)]
    pub exit_when_run_ends: bool,
}

/// Why a fleet could not start, or how it ended badly.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// The arguments do not describe a fleet.
    #[error("{flag}: {why}")]
    Args {
        /// The flag at fault.
        flag: &'static str,
        /// What is wrong with it.
        why: String,
    },
    /// The data file could not be read.
    #[error(transparent)]
    Data(#[from] DataError),
    /// The data could not be dealt into the study's merchants.
    #[error("--partition")]
    Partition(#[from] PartitionError),
    /// A merchant's certificate files are missing or wrong.
    #[error("the certificate of merchant `{merchant}`")]
    Tls {
        /// The merchant.
        merchant: String,
        /// What is wrong with its files.
        #[source]
        source: Box<TlsError>,
    },
    /// Sessions ended with a permanent error (the first one is the source).
    #[error("{failed} of {sessions} sessions stopped; the first, merchant `{merchant}`")]
    Sessions {
        /// Sessions that stopped with an error.
        failed: usize,
        /// Sessions hosted.
        sessions: usize,
        /// The first failed session's merchant.
        merchant: String,
        /// Its error.
        #[source]
        source: Box<AgentError>,
    },
}

impl FleetArgs {
    /// The study indices of the merchants this process hosts.
    pub fn indices(&self) -> std::ops::Range<usize> {
        let first = self
            .job_index
            .map_or(self.first, |i| i.saturating_mul(self.merchants));
        first..first.saturating_add(self.merchants)
    }

    /// The id of the study's merchant `index`.
    pub fn merchant_id(&self, index: usize) -> String {
        format!("{}{index}", self.prefix)
    }
}

/// The agents of the fleet, ready to run: data dealt, certificates loaded.
pub fn agents(args: &FleetArgs) -> Result<Vec<Agent>, FleetError> {
    let bad = |flag, why: String| FleetError::Args { flag, why };
    if args.merchants == 0 {
        return Err(bad("--merchants", "must be at least 1".into()));
    }
    // The last merchant's index must exist: saturating arithmetic would
    // silently host fewer sessions (none at all at the top of the range).
    let start = match args.job_index {
        Some(i) => i.checked_mul(args.merchants),
        None => Some(args.first),
    };
    if start.and_then(|s| s.checked_add(args.merchants)).is_none() {
        let flag = if args.job_index.is_some() {
            "--job-index"
        } else {
            "--first"
        };
        return Err(bad(
            flag,
            format!(
                "the slice of {} merchants starting there runs past the largest index ({})",
                args.merchants,
                usize::MAX
            ),
        ));
    }
    let range = args.indices();
    let total = args.total.unwrap_or(range.end);
    if range.end > total {
        return Err(bad(
            "--total",
            format!(
                "{total} merchants in the study, but this process hosts merchants {} to {}",
                range.start,
                range.end - 1
            ),
        ));
    }
    if !(0.0..1.0).contains(&args.holdout) {
        return Err(bad(
            "--holdout",
            format!("{} is not in [0, 1)", args.holdout),
        ));
    }
    if let Err(e) = fedcart_common::identity::validate_id(&args.merchant_id(range.start)) {
        return Err(bad("--prefix", e.to_string()));
    }
    if args.certs.is_none() && args.coordinator.starts_with("https://") {
        return Err(bad(
            "--certs",
            format!(
                "{} is https://, which needs each merchant's certificate: give --certs DIR \
                 (ca.pem and <id>.pem / <id>.key per merchant, as `fedcart-coordinator certs \
                 issue` writes them), or an http:// URL for a coordinator run with --insecure",
                args.coordinator
            ),
        ));
    }
    let mut data = match &args.data {
        FleetData::None => None,
        FleetData::Churn(path) => Some(deal_churn(args, path, total)?),
    };
    let mut out = Vec::with_capacity(args.merchants);
    for index in range {
        let merchant_id = args.merchant_id(index);
        let mut local = LocalData {
            merchant_id: merchant_id.clone(),
            ..Default::default()
        };
        if let Some((ds, parts)) = &mut data {
            let rows = std::mem::take(&mut parts[index]);
            local.churn = Some(churn_slice(ds, &rows, &merchant_id, args));
        }
        let mut agent = Agent::new(args.coordinator.clone(), local);
        agent.exit_on_run_end = args.exit_when_run_ends;
        agent = match &args.certs {
            Some(dir) => {
                let files = AgentTls {
                    ca: dir.join("ca.pem"),
                    cert: dir.join(format!("{merchant_id}.pem")),
                    key: dir.join(format!("{merchant_id}.key")),
                    domain: args.domain.clone(),
                };
                let tls = |source| FleetError::Tls {
                    merchant: merchant_id.clone(),
                    source: Box::new(source),
                };
                agent.tls = Some(files.client_config().map_err(tls)?);
                agent.with_key_identity(files.key_identity().map_err(tls)?)
            }
            // A plaintext fleet has no key to bind: it runs against an
            // `--insecure` development coordinator only.
            None => agent.with_policy(PrivacyPolicy::without_key_binding()),
        };
        out.push(agent);
    }
    Ok(out)
}

/// The study's churn rows and, per merchant index, its rows.
fn deal_churn(
    args: &FleetArgs,
    path: &std::path::Path,
    total: usize,
) -> Result<(TabularDataset, Vec<Vec<usize>>), FleetError> {
    let ds = Schema::telco()
        .load_csv(path)
        .map_err(|source| DataError::Churn {
            path: path.to_owned(),
            source,
        })?;
    let labels: Vec<u32> = ds.y.iter().map(|&y| u32::from(y > 0.5)).collect();
    // The partitioners' own wording is the simulator's (its flags, a
    // recommender's users): said here in the fleet's terms.
    let parts = args
        .partition
        .deal(&labels, None, total, args.seed)
        .map_err(|e| match e {
            PartitionError::NoGroups => FleetError::Args {
                flag: "--partition",
                why: "`natural` keeps an orders export's stores, and a fleet deals a customer \
                      table (`--data churn:PATH`): choose iid, dirichlet:ALPHA or zipf:S"
                    .into(),
            },
            PartitionError::TooFewUnits { units, merchants } => FleetError::Args {
                flag: "--total",
                why: format!(
                    "{} holds {units} customers, too few for {merchants} merchants (each needs \
                     at least one): give a --total of at most {units}, or a larger table",
                    path.display()
                ),
            },
            e => FleetError::Partition(e),
        })?;
    Ok((ds, parts))
}

/// One merchant's rows, split into training and held-out rows (each
/// merchant its own split, as in the simulator).
fn churn_slice(
    ds: &TabularDataset,
    rows: &[usize],
    merchant_id: &str,
    args: &FleetArgs,
) -> ChurnData {
    let mine = ds.select(rows);
    let labels = mine.y.to_vec();
    let (train, valid) = split::merchant_train_test(&labels, args.holdout, args.seed, merchant_id);
    ChurnData {
        train: mine.select(&train),
        valid: mine.select(&valid),
    }
}

/// Runs every agent's session loop concurrently until `shutdown` (or, with
/// `exit_when_run_ends`, until the run ends) and returns the agents. A
/// session that stops with a permanent error does not stop the others; the
/// fleet then reports how many stopped, with the first error.
pub async fn run(
    agents: Vec<Agent>,
    shutdown: watch::Receiver<bool>,
) -> Result<Vec<Agent>, FleetError> {
    let sessions = agents.len();
    let handles: Vec<_> = agents
        .into_iter()
        .map(|mut agent| {
            let rx = shutdown.clone();
            tokio::spawn(async move {
                let result = agent.run(rx).await;
                (agent, result)
            })
        })
        .collect();
    let mut done = Vec::with_capacity(sessions);
    let mut failed: Vec<(String, AgentError)> = Vec::new();
    for handle in handles {
        // A panicking session is a bug, not a merchant's error: surface it.
        let (agent, result) = handle.await.expect("an agent session panicked");
        if let Err(e) = result {
            failed.push((agent.data.merchant_id.clone(), e));
        }
        done.push(agent);
    }
    match failed.len() {
        0 => Ok(done),
        n => {
            let (merchant, source) = failed.swap_remove(0);
            Err(FleetError::Sessions {
                failed: n,
                sessions,
                merchant,
                source: Box::new(source),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        fleet: FleetArgs,
    }

    fn parse(args: &[&str]) -> FleetArgs {
        let mut all = vec!["fleet", "--coordinator", "http://127.0.0.1:1"];
        all.extend_from_slice(args);
        Cli::try_parse_from(all).expect("arguments parse").fleet
    }

    #[test]
    fn a_job_index_selects_its_slice_of_the_study() {
        let a = parse(&["--merchants", "1000", "--job-index", "7"]);
        assert_eq!(a.indices(), 7000..8000);
        assert_eq!(a.merchant_id(7000), "m7000");
        let b = parse(&["--merchants", "3", "--first", "5", "--prefix", "shop-"]);
        assert_eq!(b.indices(), 5..8);
        assert_eq!(b.merchant_id(5), "shop-5");
    }

    #[test]
    fn bad_fleets_are_refused_naming_the_flag() {
        let err = |args: &[&str]| agents(&parse(args)).err().expect("refused").to_string();
        assert!(err(&["--merchants", "0"]).starts_with("--merchants"));
        let e = err(&["--merchants", "10", "--job-index", "1", "--total", "15"]);
        assert!(e.starts_with("--total") && e.contains("10 to 19"), "{e}");
        assert!(err(&["--merchants", "1", "--prefix", "bad id/"]).starts_with("--prefix"));
        // A slice past the largest index hosted no session and exited 0.
        let top = usize::MAX.to_string();
        assert!(err(&["--merchants", "2", "--first", &top]).starts_with("--first"));
        let half = (usize::MAX / 2 + 1).to_string();
        assert!(err(&["--merchants", "2", "--job-index", &half]).starts_with("--job-index"));
        assert!(
            Cli::try_parse_from([
                "fleet",
                "--coordinator",
                "x",
                "--merchants",
                "1",
                "--data",
                "csv:x"
            ])
            .is_err()
        );
    }

    #[test]
    fn churn_rows_are_dealt_once_over_the_whole_study() {
        let csv = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../data/telco-churn/Telco-Customer-Churn.csv");
        let data = format!("churn:{}", csv.display());
        let rows = |first: &str| -> Vec<usize> {
            agents(&parse(&[
                "--merchants",
                "2",
                "--first",
                first,
                "--total",
                "6",
                "--data",
                &data,
            ]))
            .expect("fleet builds")
            .iter()
            .map(|a| {
                let c = a.data.churn.as_ref().expect("churn data");
                c.train.len() + c.valid.len()
            })
            .collect()
        };
        let all: Vec<usize> = ["0", "2", "4"].iter().flat_map(|f| rows(f)).collect();
        assert_eq!(all.len(), 6);
        assert_eq!(
            all.iter().sum::<usize>(),
            7043,
            "every row dealt exactly once: {all:?}"
        );
        // Refusals in the fleet's terms (they named the simulator's flags
        // and a recommender's users).
        let e = agents(&parse(&[
            "--merchants",
            "2",
            "--data",
            &data,
            "--partition",
            "natural",
        ]))
        .err()
        .expect("refused")
        .to_string();
        assert!(
            e.starts_with("--partition")
                && e.contains("--data churn:PATH")
                && !e.contains("--merchant-col"),
            "{e}"
        );
        let e = agents(&parse(&[
            "--merchants",
            "2",
            "--data",
            &data,
            "--total",
            "100000",
        ]))
        .err()
        .expect("refused")
        .to_string();
        assert!(
            e.starts_with("--total") && e.contains("holds 7043 customers") && !e.contains("users"),
            "{e}"
        );
    }

    /// An https:// coordinator without --certs names the flag (the agents
    /// said "none is configured", and the fix spoke of `[tls]`).
    #[test]
    fn an_https_coordinator_without_certs_names_the_flag() {
        let a = FleetArgs {
            coordinator: "https://127.0.0.1:1".into(),
            ..parse(&["--merchants", "2"])
        };
        let e = agents(&a).err().expect("refused").to_string();
        assert!(
            e.starts_with("--certs: https://127.0.0.1:1 is https://"),
            "{e}"
        );
    }
}
