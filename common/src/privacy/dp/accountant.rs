//! The privacy ledger of a run: RDP composed over rounds, ε on demand, and the
//! noise-multiplier solver.
//!
//! RDP composes by addition at each order, so the [`Accountant`] keeps one
//! running sum per order; each round costs one RDP vector (cached when the
//! round repeats the previous `(q, σ)`, as it does in a steady run) and an ε
//! query is one pass over the orders. The state is plain numbers and
//! serialises, so a coordinator restarted from its store carries on exactly.

use serde::{Deserialize, Serialize};

use super::rdp::{default_orders, epsilon_from_rdp, rdp_vector};
use super::{DpError, check_range};

/// Default absolute tolerance on the noise multiplier of
/// [`solve_noise_multiplier`]: the returned σ meets the target and σ − 1e-4
/// does not, far finer than any σ a deployment would quote.
pub const DEFAULT_SIGMA_TOLERANCE: f64 = 1e-4;

/// The largest noise multiplier the solver tries before declaring a target
/// unreachable. ε of T Gaussian steps falls like `sqrt(T log(1/δ))/σ`, so
/// 1e6 covers ε down to about 1e-3 for a million full-participation steps.
pub const MAX_NOISE_MULTIPLIER: f64 = 1e6;

/// ε at a δ, with the RDP order that achieved it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EpsilonReport {
    /// The privacy loss ε.
    pub epsilon: f64,
    /// The Rényi order α at which the conversion was tightest. An optimum at
    /// the smallest or largest order suggests the order grid is too narrow.
    pub order: f64,
}

/// Running RDP of a sequence of Poisson-sampled Gaussian rounds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Accountant {
    /// The Rényi orders tracked (all > 1).
    orders: Vec<f64>,
    /// The composed RDP at each order.
    rdp: Vec<f64>,
    /// Rounds composed so far.
    steps: u64,
    /// The last `(q, σ)` seen and its one-step RDP vector.
    #[serde(skip)]
    cache: Option<(f64, f64, Vec<f64>)>,
}

impl Default for Accountant {
    fn default() -> Self {
        Self::new()
    }
}

impl Accountant {
    /// An empty ledger over `dp_accounting`'s default orders.
    pub fn new() -> Self {
        let orders = default_orders();
        let rdp = vec![0.0; orders.len()];
        Self {
            orders,
            rdp,
            steps: 0,
            cache: None,
        }
    }

    /// An empty ledger over custom orders; each must be finite and > 1.
    pub fn with_orders(orders: Vec<f64>) -> Result<Self, DpError> {
        for &a in &orders {
            check_range("order", a, 1.0, f64::INFINITY, false, "must be > 1")?;
        }
        let rdp = vec![0.0; orders.len()];
        Ok(Self {
            orders,
            rdp,
            steps: 0,
            cache: None,
        })
    }

    /// Records one round: each agent was included with probability `q` and
    /// the sum was released with Gaussian noise of std `sigma · C`.
    pub fn step(&mut self, q: f64, sigma: f64) -> Result<(), DpError> {
        self.compose(q, sigma, 1)
    }

    /// Records `count` identical rounds at once (RDP composes linearly).
    pub fn compose(&mut self, q: f64, sigma: f64, count: u64) -> Result<(), DpError> {
        check_range("sampling_rate", q, 0.0, 1.0, true, "must be in (0, 1]")?;
        check_range(
            "noise_multiplier",
            sigma,
            0.0,
            f64::INFINITY,
            false,
            "must be finite and > 0",
        )?;
        let fresh = !matches!(&self.cache, Some((cq, cs, _)) if *cq == q && *cs == sigma);
        if fresh {
            self.cache = Some((q, sigma, rdp_vector(q, sigma, &self.orders)));
        }
        if let Some((_, _, one)) = &self.cache {
            let k = count as f64;
            for (acc, r) in self.rdp.iter_mut().zip(one) {
                *acc += k * r;
            }
        }
        self.steps += count;
        Ok(())
    }

    /// Rounds composed so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// The tracked orders.
    pub fn orders(&self) -> &[f64] {
        &self.orders
    }

    /// The composed RDP, one value per order.
    pub fn rdp(&self) -> &[f64] {
        &self.rdp
    }

    /// ε of everything composed so far at `delta` ∈ (0, 1).
    pub fn epsilon(&self, delta: f64) -> Result<EpsilonReport, DpError> {
        check_range("delta", delta, 0.0, 1.0, false, "must be in (0, 1)")?;
        let (epsilon, order) = epsilon_from_rdp(&self.orders, &self.rdp, delta);
        Ok(EpsilonReport { epsilon, order })
    }
}

/// ε of `steps` rounds at sampling rate `q` and noise multiplier `sigma`.
pub fn epsilon_for(q: f64, sigma: f64, steps: u64, delta: f64) -> Result<EpsilonReport, DpError> {
    check_range(
        "steps",
        steps as f64,
        0.0,
        f64::INFINITY,
        false,
        "must be >= 1",
    )?;
    let mut acc = Accountant::new();
    acc.compose(q, sigma, steps)?;
    acc.epsilon(delta)
}

/// The result of [`solve_noise_multiplier`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct NoiseSolution {
    /// The smallest noise multiplier found whose ε is at most the target.
    pub noise_multiplier: f64,
    /// The ε it gives.
    pub epsilon: f64,
    /// The optimal order at that ε.
    pub order: f64,
}

/// The smallest noise multiplier σ whose ε after `steps` rounds at rate `q`
/// is at most `target_epsilon` at `delta`, to within `tolerance` on σ.
///
/// Like Opacus' `get_noise_multiplier`, it brackets by doubling (from σ = 1)
/// and then bisects, relying on ε falling as σ grows. Unlike Opacus, the
/// tolerance is on σ rather than on ε, which gives a two-sided guarantee: the
/// returned σ meets the target and `σ − tolerance` does not (unless the
/// bracket bottomed out at `tolerance` itself, for absurdly loose targets).
pub fn solve_noise_multiplier(
    target_epsilon: f64,
    delta: f64,
    q: f64,
    steps: u64,
    tolerance: f64,
) -> Result<NoiseSolution, DpError> {
    check_range(
        "target_epsilon",
        target_epsilon,
        0.0,
        f64::INFINITY,
        false,
        "must be finite and > 0",
    )?;
    check_range(
        "tolerance",
        tolerance,
        0.0,
        f64::INFINITY,
        false,
        "must be > 0",
    )?;
    let eval = |sigma: f64| epsilon_for(q, sigma, steps, delta);
    // Bracket: ε(lo) > target >= ε(hi).
    let mut hi = 1.0;
    let mut hi_report = eval(hi)?;
    let mut lo;
    if hi_report.epsilon > target_epsilon {
        loop {
            lo = hi;
            hi *= 2.0;
            if hi > MAX_NOISE_MULTIPLIER {
                return Err(DpError::TargetUnreachable {
                    target_epsilon,
                    max_sigma: lo,
                    epsilon_at_max: eval(lo)?.epsilon,
                });
            }
            hi_report = eval(hi)?;
            if hi_report.epsilon <= target_epsilon {
                break;
            }
        }
    } else {
        loop {
            lo = hi / 2.0;
            if lo < tolerance {
                lo = 0.0;
                break;
            }
            let r = eval(lo)?;
            if r.epsilon > target_epsilon {
                break;
            }
            hi = lo;
            hi_report = r;
        }
    }
    while hi - lo > tolerance {
        let mid = 0.5 * (lo + hi);
        let r = eval(mid)?;
        if r.epsilon <= target_epsilon {
            hi = mid;
            hi_report = r;
        } else {
            lo = mid;
        }
    }
    Ok(NoiseSolution {
        noise_multiplier: hi,
        epsilon: hi_report.epsilon,
        order: hi_report.order,
    })
}

#[cfg(test)]
mod tests;
