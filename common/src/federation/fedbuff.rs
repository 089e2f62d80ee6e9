//! Buffered asynchronous aggregation (FedBuff, Nguyen et al., AISTATS 2022):
//! the pure part — staleness functions and the buffer fold.
//!
//! In FedBuff the server keeps several merchants training at once, each on
//! the version it downloaded. A finished update is *stale* by τ = the number
//! of versions committed since that download, and enters the buffer scaled by
//! s(τ). After K updates the server commits
//! `global + η · Σᵢ s(τᵢ)·wᵢΔᵢ / Σᵢ wᵢ`: the example-weighted mean of the
//! buffered deltas with each numerator scaled by its staleness weight, times
//! the server learning rate η. With equal example weights this is the paper's
//! `η/K · Σ s(τᵢ)Δᵢ`: stale updates shrink the step instead of being
//! renormalised away.
//!
//! Only the numerator is scaled (an update's `weight` and `coord_weights` are
//! left alone), so the fold is still "sum, then divide by the summed weights"
//! — exactly what the round engine and secure aggregation compute. The
//! simulator's event-driven driver (`coordinator/src/simulate/fedbuff.rs`)
//! uses [`weigh`] on every update it hands the engine; [`Buffer`] is the same
//! fold as a standalone value, the reference the driver is tested against.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::federation::aggregate::SumAccumulator;
use crate::federation::update::{Update, UpdateError, WeightLayout};

/// How much an update that is τ versions stale counts, relative to a fresh one.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Staleness {
    /// s(τ) = 1: staleness is ignored (plain asynchronous averaging).
    Const,
    /// s(τ) = 1/√(1+τ), the FedBuff paper's choice.
    Sqrt,
    /// s(τ) = (1+τ)^(−a), a polynomial decay with exponent `a` ≥ 0.
    Poly(f64),
}

/// A staleness function name that does not parse.
#[derive(Debug, Error, PartialEq)]
#[error("unknown staleness function `{0}` (known: const, sqrt, poly:A with A >= 0)")]
pub struct BadStaleness(pub String);

impl Staleness {
    /// The weight s(τ) ∈ (0, 1] of an update `tau` versions stale.
    pub fn weight(self, tau: u64) -> f64 {
        let t = 1.0 + tau as f64;
        match self {
            Self::Const => 1.0,
            Self::Sqrt => 1.0 / t.sqrt(),
            Self::Poly(a) => t.powf(-a),
        }
    }
}

impl FromStr for Staleness {
    type Err = BadStaleness;

    /// Parses `const`, `sqrt` (also `inv-sqrt`) or `poly:A`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "const" | "constant" => Ok(Self::Const),
            "sqrt" | "inv-sqrt" => Ok(Self::Sqrt),
            _ => match s.strip_prefix("poly:").map(str::parse::<f64>) {
                Some(Ok(a)) if a.is_finite() && a >= 0.0 => Ok(Self::Poly(a)),
                _ => Err(BadStaleness(s.into())),
            },
        }
    }
}

impl fmt::Display for Staleness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Const => f.write_str("const"),
            Self::Sqrt => f.write_str("sqrt"),
            Self::Poly(a) => write!(f, "poly:{a}"),
        }
    }
}

/// Scales an update's weighted values by `factor` (= s(τ)·η) in place,
/// leaving its example and per-coordinate weights — the denominators — alone.
pub fn weigh(update: &mut Update, factor: f64) {
    let f = factor as f32;
    update.values.iter_mut().for_each(|v| *v *= f);
}

/// The server-side buffer of one FedBuff step: a running sum of
/// staleness-weighted updates and the staleness of each.
#[derive(Debug, Clone)]
pub struct Buffer {
    acc: SumAccumulator,
    capacity: usize,
    staleness: Staleness,
    server_lr: f64,
    taus: Vec<u64>,
}

impl Buffer {
    /// An empty buffer of `capacity` (K) updates for a model of `model_len`
    /// values and `num_coord_weights` per-coordinate weights.
    pub fn new(
        model_len: usize,
        num_coord_weights: usize,
        capacity: usize,
        staleness: Staleness,
        server_lr: f64,
    ) -> Self {
        Self {
            acc: SumAccumulator::new(model_len, num_coord_weights),
            capacity: capacity.max(1),
            staleness,
            server_lr,
            taus: Vec::with_capacity(capacity),
        }
    }

    /// Folds in one update that is `tau` versions stale; returns the factor
    /// s(τ)·η its values were scaled by.
    pub fn add(&mut self, update: &Update, tau: u64) -> Result<f64, UpdateError> {
        let factor = self.staleness.weight(tau) * self.server_lr;
        let mut scaled = update.clone();
        weigh(&mut scaled, factor);
        self.acc.add(&scaled)?;
        self.taus.push(tau);
        Ok(factor)
    }

    /// Updates folded in since the last [`Buffer::take_step`].
    pub fn len(&self) -> usize {
        self.taus.len()
    }

    /// True when nothing is buffered.
    pub fn is_empty(&self) -> bool {
        self.taus.is_empty()
    }

    /// True once K updates are in: time to commit a version.
    pub fn is_full(&self) -> bool {
        self.taus.len() >= self.capacity
    }

    /// The staleness of each buffered update, in arrival order.
    pub fn stalenesses(&self) -> &[u64] {
        &self.taus
    }

    /// The step to add to the global model, and an empty buffer afterwards.
    pub fn take_step(&mut self, layout: &WeightLayout) -> Vec<f32> {
        let step = self.acc.mean_delta(layout);
        self.acc = SumAccumulator::new(self.acc.sum_values().len(), self.acc.num_coord_weights());
        self.taus.clear();
        step
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upd(values: &[f32], weight: f64) -> Update {
        Update {
            values: values.iter().map(|v| v * weight as f32).collect(),
            coord_weights: Vec::new(),
            weight,
        }
    }

    #[test]
    fn sqrt_staleness_weighs_fresh_one_and_three_stale_one_half() {
        assert_eq!(Staleness::Sqrt.weight(0), 1.0);
        assert_eq!(Staleness::Sqrt.weight(3), 0.5);
        assert_eq!(Staleness::Const.weight(100), 1.0);
        assert_eq!(Staleness::Poly(1.0).weight(3), 0.25);
        assert_eq!(Staleness::Poly(0.5).weight(8), 1.0 / 3.0);
    }

    #[test]
    fn two_updates_staleness_zero_and_three_fold_with_weights_one_and_half() {
        // Δ₁ = (2, 4) fresh, Δ₂ = (6, −2) three versions stale, equal
        // example weights: step = (1·Δ₁ + ½·Δ₂) / 2 = (2.5, 1.5).
        let mut b = Buffer::new(2, 0, 2, Staleness::Sqrt, 1.0);
        assert_eq!(b.add(&upd(&[2.0, 4.0], 10.0), 0).unwrap(), 1.0);
        assert!(!b.is_full());
        assert_eq!(b.add(&upd(&[6.0, -2.0], 10.0), 3).unwrap(), 0.5);
        assert!(b.is_full());
        assert_eq!(b.stalenesses(), &[0, 3]);
        let step = b.take_step(&WeightLayout::uniform());
        assert_eq!(step, vec![2.5, 1.5]);
        assert!(b.is_empty());
        // The buffer is reusable: a second step sees only the new updates.
        b.add(&upd(&[1.0, 1.0], 1.0), 0).unwrap();
        assert_eq!(b.take_step(&WeightLayout::uniform()), vec![1.0, 1.0]);
    }

    #[test]
    fn server_learning_rate_and_example_weights_scale_the_step() {
        // Weights 1 and 3, both fresh, η = 0.5: 0.5·(1·1 + 3·5)/4 = 2.
        let mut b = Buffer::new(1, 0, 2, Staleness::Sqrt, 0.5);
        b.add(&upd(&[1.0], 1.0), 0).unwrap();
        b.add(&upd(&[5.0], 3.0), 0).unwrap();
        assert_eq!(b.take_step(&WeightLayout::uniform()), vec![2.0]);
    }

    #[test]
    fn equally_stale_updates_still_shrink_the_step() {
        // Staleness is not renormalised away: two updates both 3 stale give
        // half the step two fresh ones would.
        let mut b = Buffer::new(1, 0, 2, Staleness::Sqrt, 1.0);
        b.add(&upd(&[4.0], 1.0), 3).unwrap();
        b.add(&upd(&[4.0], 1.0), 3).unwrap();
        assert_eq!(b.take_step(&WeightLayout::uniform()), vec![2.0]);
    }

    #[test]
    fn grouped_coordinates_keep_their_count_denominators() {
        use crate::federation::update::Segment;
        // One grouped segment of 2 groups × 1 coordinate. Merchant A has 1
        // rating of group 0 (Δ=4), fresh; merchant B has 3 ratings of group 0
        // (Δ=4) and 2 of group 1 (Δ=2), 3 stale (s = ½).
        let layout = WeightLayout {
            segments: vec![Segment {
                len: 2,
                group_len: Some(1),
            }],
            num_coord_weights: 2,
        };
        let a = Update {
            values: vec![4.0, 0.0],
            coord_weights: vec![1.0, 0.0],
            weight: 1.0,
        };
        let b_upd = Update {
            values: vec![12.0, 4.0],
            coord_weights: vec![3.0, 2.0],
            weight: 5.0,
        };
        let mut b = Buffer::new(2, 2, 2, Staleness::Sqrt, 1.0);
        b.add(&a, 0).unwrap();
        b.add(&b_upd, 3).unwrap();
        // group 0: (4 + ½·12)/4 = 2.5; group 1: (½·4)/2 = 1.
        assert_eq!(b.take_step(&layout), vec![2.5, 1.0]);
    }

    #[test]
    fn staleness_names_parse_and_print_back() {
        for s in ["const", "sqrt", "poly:0.5", "poly:2"] {
            let f: Staleness = s.parse().unwrap();
            assert_eq!(f.to_string(), s);
        }
        assert_eq!("inv-sqrt".parse::<Staleness>(), Ok(Staleness::Sqrt));
        for bad in ["poly:-1", "poly:x", "hinge", "poly:inf"] {
            assert!(bad.parse::<Staleness>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_wrong_length_update_is_refused_and_not_counted() {
        let mut b = Buffer::new(2, 0, 2, Staleness::Const, 1.0);
        assert!(b.add(&upd(&[1.0], 1.0), 0).is_err());
        assert!(b.is_empty());
    }
}
