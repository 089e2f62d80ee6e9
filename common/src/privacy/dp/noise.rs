//! Central Gaussian noise, added by a trusted coordinator after aggregation.
//!
//! The coordinator sums the clipped, weight-1 updates ([`super::dp_update`]),
//! adds independent `N(0, (z·C)²)` noise to every coordinate of the *sum*, and
//! only then divides (the division by the number of reports is
//! post-processing). With L2 sensitivity `C` this is the Gaussian mechanism
//! with noise multiplier `z`, which is what the [`super::Accountant`] is
//! told each round. Use this when the coordinator is trusted to see the
//! un-noised sum; otherwise use [`super::DistributedSkellam`] under secure
//! aggregation.
//!
//! The noise is drawn from a caller-supplied RNG so that a run replays bit for
//! bit: derive it with `seed::rng(run_seed, &["dp-noise", round])`. Sampling is
//! rand_distr's ziggurat normal on f64, added to the f64 sums before they are
//! rounded back to f32.

use rand::Rng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};

use super::{DpError, check_range};

/// Gaussian noise calibrated to a clip norm.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CentralGaussian {
    /// The noise multiplier `z`: noise std divided by the L2 sensitivity.
    pub noise_multiplier: f64,
    /// The clip norm `C`, which is the L2 sensitivity of the sum.
    pub clip: f64,
}

impl CentralGaussian {
    /// Validated noise settings.
    pub fn new(noise_multiplier: f64, clip: f64) -> Result<Self, DpError> {
        check_range(
            "noise_multiplier",
            noise_multiplier,
            0.0,
            f64::INFINITY,
            false,
            "must be finite and > 0",
        )?;
        check_range(
            "clip",
            clip,
            0.0,
            f64::INFINITY,
            false,
            "must be finite and > 0",
        )?;
        Ok(Self {
            noise_multiplier,
            clip,
        })
    }

    /// The per-coordinate noise std on the sum, `z · C`.
    pub fn std(&self) -> f64 {
        self.noise_multiplier * self.clip
    }

    /// Adds noise to every coordinate of a summed update, in place.
    pub fn add_to_sum<R: Rng + ?Sized>(&self, sum: &mut [f64], rng: &mut R) {
        let std = self.std();
        for v in sum.iter_mut() {
            let z: f64 = StandardNormal.sample(rng);
            *v += std * z;
        }
    }

    /// Adds the noise to a sum and returns the noised mean `(sum + noise) / n`
    /// for `n` weight-1 reports, as f32 — the DP-FedAvg step for a uniform
    /// layout. `n = 0` gives the zero step (nothing was released).
    pub fn noised_mean<R: Rng + ?Sized>(&self, sum: &[f64], n: usize, rng: &mut R) -> Vec<f32> {
        if n == 0 {
            return vec![0.0; sum.len()];
        }
        let mut noised = sum.to_vec();
        self.add_to_sum(&mut noised, rng);
        noised.iter().map(|v| (v / n as f64) as f32).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seed;

    #[test]
    fn noise_std_on_the_sum_is_multiplier_times_clip() {
        let g = CentralGaussian::new(1.3, 0.5).unwrap();
        let mut rng = seed::rng(3, &["central"]);
        let n = 200_000;
        let mut sum = vec![10.0; n];
        g.add_to_sum(&mut sum, &mut rng);
        let noise: Vec<f64> = sum.iter().map(|v| v - 10.0).collect();
        let mean = noise.iter().sum::<f64>() / n as f64;
        let var = noise.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
        // Std error of the mean is 0.65/sqrt(2e5) = 0.0015; of the std ~0.1%.
        assert!(mean.abs() < 0.006, "mean {mean}");
        assert!(
            (var.sqrt() / g.std() - 1.0).abs() < 0.01,
            "std {}",
            var.sqrt()
        );
    }

    #[test]
    fn noise_replays_for_a_seed_and_differs_across_seeds() {
        let g = CentralGaussian::new(1.0, 1.0).unwrap();
        let a = g.noised_mean(&[1.0; 8], 4, &mut seed::rng(9, &["r1"]));
        let b = g.noised_mean(&[1.0; 8], 4, &mut seed::rng(9, &["r1"]));
        let c = g.noised_mean(&[1.0; 8], 4, &mut seed::rng(9, &["r2"]));
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(
            g.noised_mean(&[1.0; 3], 0, &mut seed::rng(9, &["r1"])),
            vec![0.0; 3]
        );
    }

    #[test]
    fn bad_noise_settings_are_refused_by_name() {
        assert!(matches!(
            CentralGaussian::new(0.0, 1.0),
            Err(DpError::InvalidParameter {
                name: "noise_multiplier",
                ..
            })
        ));
        assert!(matches!(
            CentralGaussian::new(1.0, f64::INFINITY),
            Err(DpError::InvalidParameter { name: "clip", .. })
        ));
    }
}
