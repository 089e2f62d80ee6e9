//! Differential privacy for federated rounds: clipping, noise and accounting.
//!
//! The guarantee is *agent-level* (DP-FedAvg, McMahan et al. 2018): adding or
//! removing one merchant's whole contribution to a round changes the released
//! sum by at most the clip norm `C` in L2. The pieces, in round order:
//!
//! 1. [`clip`]: each agent turns its weighted update back into a per-example
//!    delta, clips it to L2 norm `C` and sends it with weight 1 (fixed `C`, or
//!    [`clip::AdaptiveClip`] tracking a private quantile of the norms, Andrew
//!    et al. 2021).
//! 2. Noise on the sum, either [`noise::CentralGaussian`] added by a trusted
//!    coordinator after aggregation (std = `noise_multiplier · C`), or
//!    [`distributed::DistributedSkellam`], integer noise that each agent adds to
//!    its fixed-point vector before secure aggregation so that only the noised
//!    sum is ever decoded.
//!    [`task`] carries both to the agents inside the `TaskSpec`, and
//!    [`task::privatise`] is where `run_task` clips.
//! 3. [`rdp`] and [`accountant`]: the Rényi-DP accountant of the Poisson-sampled
//!    Gaussian mechanism (Mironov et al. 2019), matching Google's
//!    `dp_accounting` numerically, the conversion to (ε, δ), and a solver for the
//!    smallest noise multiplier meeting a target ε.

pub mod accountant;
pub mod clip;
pub mod distributed;
pub mod noise;
pub mod rdp;
pub mod task;

pub use accountant::{Accountant, EpsilonReport, NoiseSolution, solve_noise_multiplier};
pub use clip::{AdaptiveClip, ClipReport, clip_l2, dp_update};
pub use distributed::DistributedSkellam;
pub use noise::CentralGaussian;
pub use task::{DistributedNoise, DpTask, privatise};

use thiserror::Error;

/// The largest δ of an (ε, δ) guarantee that a run, a merchant's cap or the
/// planner accepts: δ is the probability that the guarantee fails outright,
/// and past 1 % it is no guarantee whatever the federation's size (at
/// δ = 0.5 a run of ε 12.3 read as 3.1).
pub const MAX_DELTA: f64 = 0.01;

/// Why `delta` is refused, if it is above [`MAX_DELTA`]; each caller adds
/// the setting's name and its advice.
pub fn delta_above_max(delta: f64) -> Option<String> {
    (delta > MAX_DELTA).then(|| {
        format!(
            "{delta} is above {MAX_DELTA}: δ is the probability that the guarantee fails outright"
        )
    })
}

use crate::federation::update::UpdateError;

/// Why a privacy computation was refused.
#[derive(Debug, Error, PartialEq)]
pub enum DpError {
    /// A parameter is outside its valid range; `name` is the parameter.
    #[error("{name} = {value} is invalid: {reason}")]
    InvalidParameter {
        /// The parameter's name (for example `sampling_rate`).
        name: &'static str,
        /// The value received.
        value: f64,
        /// The range it must lie in.
        reason: &'static str,
    },
    /// No noise multiplier up to the search limit reaches the target ε.
    #[error(
        "no noise multiplier up to {max_sigma} reaches epsilon {target_epsilon} \
         (it gives {epsilon_at_max})"
    )]
    TargetUnreachable {
        /// The ε asked for.
        target_epsilon: f64,
        /// The largest noise multiplier tried.
        max_sigma: f64,
        /// The ε that multiplier gives.
        epsilon_at_max: f64,
    },
    /// The update to clip is malformed.
    #[error(transparent)]
    Update(#[from] UpdateError),
}

/// Checks `lo < value < hi` (open) or `lo < value <= hi` (`hi_closed`),
/// rejecting NaN, and names the parameter in the error.
pub(crate) fn check_range(
    name: &'static str,
    value: f64,
    lo: f64,
    hi: f64,
    hi_closed: bool,
    reason: &'static str,
) -> Result<(), DpError> {
    let ok = value > lo && (value < hi || (hi_closed && value == hi));
    if ok {
        Ok(())
    } else {
        Err(DpError::InvalidParameter {
            name,
            value,
            reason,
        })
    }
}
