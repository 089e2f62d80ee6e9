//! Per-agent L2 clipping, fixed or adaptive, and the DP form of an update.
//!
//! # What is clipped, and the sensitivity
//!
//! An agent's [`Update`] carries `weight · (local − global)` (grouped segments
//! are pre-multiplied by per-group counts instead). Clipping that weighted
//! vector would bound nothing useful — its norm scales with the merchant's
//! data size — so [`dp_update`] first divides the weights back out, giving the
//! per-example-normalised delta `Δ = local − global`, clips `Δ` to L2 norm `C`,
//! and sends it with **weight 1 and every per-coordinate weight 1**.
//!
//! This is DP-FedAvg's equal-weight estimator (McMahan et al. 2018): the sum
//! over the round's agents moves by at most `C` in L2 when one agent is added
//! or removed, so `C` is the L2 sensitivity of the sum, whatever the layout.
//! The example count and the per-item counts are themselves private (they
//! reveal how big a merchant is and which items it sells), which is why they
//! are replaced by constants rather than sent. The coordinator's
//! `mean_delta` then divides every coordinate by the number of reports; an
//! item an agent never touched contributes a zero step, so the released mean
//! is a damped average rather than a per-item one. Dividing by the actual
//! number of reports treats that number as public (the coordinator sees who
//! reports); a deployment that must hide it divides by the expected cohort
//! size `q·N` instead (McMahan et al.'s fixed-denominator estimator).

use rand::Rng;
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};

use super::{DpError, check_range};
use crate::federation::update::{Update, WeightLayout};

/// What clipping did to one vector.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ClipReport {
    /// L2 norm before clipping.
    pub norm: f64,
    /// Whether the vector was scaled down (its norm exceeded the clip).
    pub clipped: bool,
}

/// L2 norm of an f32 vector, accumulated in f64.
pub fn l2_norm(values: &[f32]) -> f64 {
    values
        .iter()
        .map(|&v| f64::from(v) * f64::from(v))
        .sum::<f64>()
        .sqrt()
}

/// Scales `values` in place so that its L2 norm is at most `clip`; vectors
/// already within the bound are left bit-for-bit untouched.
///
/// The scale factor carries a 1e-6 relative margin so that f32 rounding of
/// the scaled coordinates can never push the norm back above `clip` (each
/// rounding moves the norm by at most 2⁻²⁴ relative).
pub fn clip_l2(values: &mut [f32], clip: f64) -> Result<ClipReport, DpError> {
    check_range(
        "clip",
        clip,
        0.0,
        f64::INFINITY,
        false,
        "must be finite and > 0",
    )?;
    let norm = l2_norm(values);
    if !norm.is_finite() {
        return Err(DpError::InvalidParameter {
            name: "update norm",
            value: norm,
            reason: "the update must be finite",
        });
    }
    if norm <= clip {
        return Ok(ClipReport {
            norm,
            clipped: false,
        });
    }
    let factor = clip / norm * (1.0 - 1e-6);
    for v in values.iter_mut() {
        *v = (f64::from(*v) * factor) as f32;
    }
    Ok(ClipReport {
        norm,
        clipped: true,
    })
}

/// The DP form of an update: the per-example delta clipped to `clip`, with
/// example weight 1 and every per-coordinate weight 1 (see the module docs
/// for why, and for the sensitivity this gives).
///
/// Coordinates of a group whose count is 0 (an item the agent never touched)
/// carry a zero delta.
pub fn dp_update(
    update: &Update,
    layout: &WeightLayout,
    clip: f64,
) -> Result<(Update, ClipReport), DpError> {
    update.validate(update.values.len(), layout)?;
    layout.validate(update.values.len())?;
    let mut delta = vec![0.0f32; update.values.len()];
    if layout.segments.is_empty() {
        for (d, v) in delta.iter_mut().zip(&update.values) {
            *d = (f64::from(*v) / update.weight) as f32;
        }
    } else {
        let mut offset = 0;
        for seg in &layout.segments {
            let range = offset..offset + seg.len;
            let (d, v) = (&mut delta[range.clone()], &update.values[range]);
            let divide = |d: &mut [f32], v: &[f32], w: f64| {
                if w > 0.0 {
                    d.iter_mut()
                        .zip(v)
                        .for_each(|(d, v)| *d = (f64::from(*v) / w) as f32);
                }
            };
            match seg.group_len {
                None => divide(d, v, update.weight),
                // One weight per group of g consecutive coordinates.
                Some(g) => {
                    let groups = d.chunks_mut(g.max(1)).zip(v.chunks(g.max(1)));
                    for ((d, v), &w) in groups.zip(&update.coord_weights) {
                        divide(d, v, f64::from(w));
                    }
                }
            }
            offset += seg.len;
        }
    }
    let report = clip_l2(&mut delta, clip)?;
    let out = Update {
        values: delta,
        coord_weights: vec![1.0; layout.num_coord_weights],
        weight: 1.0,
    };
    Ok((out, report))
}

/// Adaptive clipping by a private quantile estimate (Andrew, Thakkar,
/// McMahan and Ramaswamy 2021, "Differentially Private Learning with Adaptive
/// Clipping").
///
/// Each round every sampled agent reports one centred bit, `+½` if its
/// delta's norm was at most the current clip `C` (it was not clipped) and
/// `−½` otherwise. The coordinator noises the sum of the bits, divides by the
/// expected cohort size `m` and adds ½ to get the unclipped fraction `b̄`,
/// and updates geometrically `C ← C · exp(−η (b̄ − γ))`: when more than a
/// fraction γ of agents fit under `C` it shrinks, otherwise it grows, so `C`
/// tracks the γ-quantile of the update norms. The bit sum travels through the
/// same (secure) sum as the updates, as one extra coordinate.
///
/// Privacy: centring makes the bit sum's sensitivity ½ under adding or
/// removing an agent. Releasing both sums is one Gaussian mechanism, accounted
/// with the overall noise multiplier `z`; the delta sum then gets noise
/// multiplier `z_Δ` from [`AdaptiveClip::delta_noise_multiplier`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdaptiveClip {
    /// The current clip norm `C`.
    clip: f64,
    /// The target quantile γ of unclipped updates (0.5 = track the median).
    target_quantile: f64,
    /// The geometric learning rate η (Andrew et al. use 0.2).
    learning_rate: f64,
    /// Std σ_b of the Gaussian noise on the sum of centred bits (Andrew et al.
    /// suggest m/20 for an expected cohort of m).
    count_noise_std: f64,
}

impl AdaptiveClip {
    /// A tracker starting at `initial_clip`.
    pub fn new(
        initial_clip: f64,
        target_quantile: f64,
        learning_rate: f64,
        count_noise_std: f64,
    ) -> Result<Self, DpError> {
        check_range(
            "initial_clip",
            initial_clip,
            0.0,
            f64::INFINITY,
            false,
            "must be > 0",
        )?;
        check_range(
            "target_quantile",
            target_quantile,
            0.0,
            1.0,
            false,
            "must be in (0, 1)",
        )?;
        check_range(
            "learning_rate",
            learning_rate,
            0.0,
            f64::INFINITY,
            false,
            "must be > 0",
        )?;
        if !(count_noise_std >= 0.0 && count_noise_std.is_finite()) {
            return Err(DpError::InvalidParameter {
                name: "count_noise_std",
                value: count_noise_std,
                reason: "must be finite and >= 0",
            });
        }
        Ok(Self {
            clip: initial_clip,
            target_quantile,
            learning_rate,
            count_noise_std,
        })
    }

    /// The clip norm to use this round.
    pub fn clip(&self) -> f64 {
        self.clip
    }

    /// An agent's centred bit for this round: `+0.5` if a delta of this norm
    /// is not clipped by the current `C`, else `−0.5`.
    pub fn unclipped_bit(&self, norm: f64) -> f64 {
        if norm <= self.clip { 0.5 } else { -0.5 }
    }

    /// Updates `C` from the exact sum of the agents' centred bits, adding the
    /// count noise here (trusted-coordinator mode). Returns the noised
    /// unclipped fraction b̄.
    pub fn update<R: Rng + ?Sized>(
        &mut self,
        bit_sum: f64,
        expected_cohort: f64,
        rng: &mut R,
    ) -> Result<f64, DpError> {
        let noise = if self.count_noise_std > 0.0 {
            Normal::new(0.0, self.count_noise_std)
                .map_err(|_| DpError::InvalidParameter {
                    name: "count_noise_std",
                    value: self.count_noise_std,
                    reason: "must be finite and >= 0",
                })?
                .sample(rng)
        } else {
            0.0
        };
        self.update_noised(bit_sum + noise, expected_cohort)
    }

    /// Updates `C` from an already noised sum of centred bits (for example
    /// one decoded from secure aggregation, where the agents added the
    /// noise). Returns b̄.
    pub fn update_noised(
        &mut self,
        noised_bit_sum: f64,
        expected_cohort: f64,
    ) -> Result<f64, DpError> {
        check_range(
            "expected_cohort",
            expected_cohort,
            0.0,
            f64::INFINITY,
            false,
            "must be > 0",
        )?;
        if !noised_bit_sum.is_finite() {
            return Err(DpError::InvalidParameter {
                name: "noised_bit_sum",
                value: noised_bit_sum,
                reason: "must be finite",
            });
        }
        // A fraction is in [0, 1]; the noised one is clamped there
        // (post-processing: no privacy cost). Unclamped, the count noise of
        // a small cohort under strong privacy (σ_b of tens over 2 agents)
        // read fractions like −170, and one round multiplied C by 1e15; now
        // a round moves C by at most exp(η·max(γ, 1 − γ)).
        let fraction = (noised_bit_sum / expected_cohort + 0.5).clamp(0.0, 1.0);
        self.clip *= (-self.learning_rate * (fraction - self.target_quantile)).exp();
        Ok(fraction)
    }

    /// The noise multiplier for the delta sum, `z_Δ = (z⁻² − (2σ_b)⁻²)^(−½)`
    /// (Andrew et al. 2021, Thm. 1), so that releasing the delta sum with
    /// `z_Δ · C` noise and the centred-bit count with std `σ_b` costs the same
    /// privacy as one Gaussian mechanism with multiplier `z` — the value to
    /// give the accountant. Needs `2σ_b > z`.
    pub fn delta_noise_multiplier(z: f64, count_noise_std: f64) -> Result<f64, DpError> {
        check_range(
            "noise_multiplier",
            z,
            0.0,
            f64::INFINITY,
            false,
            "must be > 0",
        )?;
        let rest = z.powi(-2) - (2.0 * count_noise_std).powi(-2);
        if rest <= 0.0 || !rest.is_finite() {
            return Err(DpError::InvalidParameter {
                name: "count_noise_std",
                value: count_noise_std,
                reason: "must exceed noise_multiplier / 2",
            });
        }
        Ok(rest.powf(-0.5))
    }
}

#[cfg(test)]
mod tests;
