//! How rounds are driven: synchronous rounds or FedBuff, and FedBuff's
//! validated parameters.

use anyhow::bail;
use fedcart_common::federation::fedbuff::Staleness;
use serde::Serialize;

use crate::args::{ModeName, SimArgs};

/// How rounds are driven.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Synchronous rounds (FedAvg and friends): select, wait for all, commit.
    Sync,
    /// Buffered asynchronous aggregation.
    FedBuff(FedBuffSettings),
}

/// FedBuff's validated settings.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FedBuffSettings {
    /// K: updates per committed version.
    pub buffer: usize,
    /// C: merchants training at once.
    pub concurrency: usize,
    /// s(τ).
    #[serde(serialize_with = "display_str")]
    pub staleness: Staleness,
    /// η: the buffered mean step is multiplied by it.
    pub server_lr: f64,
}

fn display_str<S: serde::Serializer>(v: &Staleness, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&v.to_string())
}

impl Mode {
    /// Flags over the TOML file over the defaults: `sync`; for `fedbuff`,
    /// C = ⌈fraction·merchants⌉ (the synchronous round's parallelism),
    /// K = max(1, C/4), s = sqrt, η = 1.
    pub fn from_args(
        args: &SimArgs,
        file: &SimArgs,
        merchants: usize,
        fraction: f64,
    ) -> anyhow::Result<Self> {
        let mode = args.mode.or(file.mode).unwrap_or(ModeName::Sync);
        let buffer = args.buffer.or(file.buffer);
        let concurrency = args.concurrency.or(file.concurrency);
        let staleness = args.staleness.clone().or(file.staleness.clone());
        let server_lr = args.server_lr.or(file.server_lr);
        match mode {
            ModeName::Sync => {
                if buffer.is_some()
                    || concurrency.is_some()
                    || staleness.is_some()
                    || server_lr.is_some()
                {
                    bail!(
                        "--buffer, --concurrency, --staleness and --server-lr apply only to --mode fedbuff"
                    );
                }
                Ok(Self::Sync)
            }
            ModeName::Fedbuff => {
                let concurrency =
                    concurrency.unwrap_or(((fraction * merchants as f64).ceil() as usize).max(1));
                let buffer = buffer.unwrap_or((concurrency / 4).max(1));
                if concurrency == 0 || concurrency > merchants {
                    bail!("--concurrency {concurrency} is not in [1, merchants = {merchants}]");
                }
                if buffer == 0 || buffer > merchants {
                    bail!(
                        "--buffer {buffer} is not in [1, merchants = {merchants}] (a merchant \
                         waits for its buffered update to be committed before training again)"
                    );
                }
                let staleness: Staleness = staleness
                    .as_deref()
                    .unwrap_or("sqrt")
                    .parse()
                    .map_err(|e| anyhow::anyhow!("--staleness: {e}"))?;
                let server_lr = server_lr.unwrap_or(1.0);
                if !(server_lr.is_finite() && server_lr > 0.0) {
                    bail!("--server-lr {server_lr} must be finite and > 0");
                }
                Ok(Self::FedBuff(FedBuffSettings {
                    buffer,
                    concurrency,
                    staleness,
                    server_lr,
                }))
            }
        }
    }

    /// Synchronous rounds of every merchant carrying as many merchant updates
    /// as `rounds` of this mode: the length of the federation-value baselines
    /// (a FedBuff version holds only K updates).
    pub fn baseline_rounds(&self, rounds: u64, merchants: usize) -> u64 {
        match self {
            Self::Sync => rounds,
            Self::FedBuff(f) => (rounds * f.buffer as u64)
                .div_ceil(merchants.max(1) as u64)
                .max(1),
        }
    }

    /// `sync` or `fedbuff`, for reports.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Sync => "sync",
            Self::FedBuff(_) => "fedbuff",
        }
    }
}
