//! Distributed DP under secure aggregation: each agent adds Skellam noise to
//! its fixed-point vector, so the decoded sum carries the target noise and no
//! party ever sees an un-noised sum (Agarwal, Kairouz and Liu 2021, "The
//! Skellam Mechanism for Differentially Private Federated Learning").
//!
//! # Why Skellam
//!
//! The symmetric Skellam distribution `Sk(μ) = Poisson(μ/2) − Poisson(μ/2)`
//! is integer-valued, has variance μ, and is closed under addition: the sum of
//! independent `Sk(μᵢ)` is `Sk(Σμᵢ)`. So if each of `k` agents adds `Sk(μ/k)`
//! to its integer vector, the masked sum decoded by secure aggregation is
//! exactly the Skellam mechanism with variance μ, and the modular arithmetic
//! of the masks never meets a float. Sampling is exact up to f64 arithmetic:
//! two draws from rand_distr's Poisson (Knuth's multiplication method below
//! λ = 12, the Ahrens–Dieter 1982 normal-deviate rejection method above).
//!
//! # Parameters and the encoding scale
//!
//! The secure-aggregation encoding maps a clipped delta `x` (L2 norm ≤ `C`) to
//! the integers `round(s · x)`, for a scale `s`. Rounding moves each of the
//! `d` coordinates by less than 1 (by at most ½ for round-to-nearest), so an
//! agent's integer vector has L2 norm at most `Δ₂ = s·C + √d`; that is the
//! sensitivity in the integer domain. For a target noise multiplier `z`, the
//! sum must carry variance `μ = (z·Δ₂)²` per coordinate. Larger `s` makes the
//! rounding term negligible (keep `√d ≪ s·C`), but the modulus of secure
//! aggregation must hold the sum of `n` encoded vectors plus noise without
//! wrapping: roughly `n·s·C + 6√μ` per coordinate must stay below half the
//! modulus (see [`DistributedSkellam::max_abs_sum`]).
//!
//! The noise is added in place to whatever word type the encoding uses:
//! i64/i32 (`add_noise_i64`, `add_noise_i32`) or unsigned ring elements
//! modulo 2⁶⁴/2³² (`add_noise_u64`, `add_noise_u32`), always wrapping, so it
//! composes with the masks' modular arithmetic.
//!
//! The privacy of the noised integer sum is the Skellam RDP bound
//! ([`skellam_rdp`]), which approaches the Gaussian `αΔ₂²/(2μ)` as μ grows; at
//! the variances of practice (μ ≫ Δ₂) the extra term is negligible and the
//! Gaussian accountant with multiplier `z` is an accurate guide.
//!
//! # Dropouts
//!
//! Each agent adds `μ / m` where `m` is the number of survivors planned for.
//! If `k ≥ m` agents' vectors end up in the sum, the total variance is
//! `k·μ/m ≥ μ` and the guarantee holds (with margin). If fewer survive, the
//! variance falls to `k·μ/m` and the effective noise multiplier to
//! `z·√(k/m)` ([`DistributedSkellam::effective_noise_multiplier`]): the round
//! must then either be discarded or accounted at that lower multiplier. The
//! coordinator knows `k` after unmasking, so it can always do the latter.

use rand::Rng;
use rand_distr::{Distribution, Poisson};
use serde::{Deserialize, Serialize};

use super::{DpError, check_range};

/// Draws one symmetric Skellam variate with the given variance.
///
/// `variance = 0` gives 0; `variance / 2` must stay below rand_distr's
/// Poisson limit (1.8e19).
pub fn sample_skellam<R: Rng + ?Sized>(variance: f64, rng: &mut R) -> Result<i64, DpError> {
    check_variance(variance)?;
    if variance == 0.0 {
        return Ok(0);
    }
    Ok(skellam_from(&poisson_for(variance)?, rng))
}

/// One draw from an already built Poisson pair: the difference of two
/// independent Poisson variates. The samples are integers held in f64 and
/// stay far below 2⁵³ for any usable variance, so the casts are exact.
fn skellam_from<R: Rng + ?Sized>(poisson: &Poisson<f64>, rng: &mut R) -> i64 {
    let a = poisson.sample(rng);
    let b = poisson.sample(rng);
    a as i64 - b as i64
}

/// A fixed-point word that Skellam noise is added to, wrapping modulo its
/// width (2⁶⁴ or 2³²) as the masked sum does. Casting the signed draw to the
/// word keeps its low bits, which is reduction modulo the width.
pub trait NoiseWord: Copy {
    /// `self + noise` modulo the word's width.
    fn wrapping_add_noise(self, noise: i64) -> Self;
}

macro_rules! noise_word {
    ($($t:ty),*) => {$(
        impl NoiseWord for $t {
            fn wrapping_add_noise(self, noise: i64) -> Self {
                self.wrapping_add(noise as $t)
            }
        }
    )*};
}
noise_word!(i64, i32, u64, u32);

/// Adds independent `Sk(variance)` noise to every coordinate of a
/// fixed-point vector, wrapping modulo the word's width.
pub fn add_skellam<W: NoiseWord, R: Rng + ?Sized>(
    values: &mut [W],
    variance: f64,
    rng: &mut R,
) -> Result<(), DpError> {
    check_variance(variance)?;
    if variance == 0.0 {
        return Ok(());
    }
    let poisson = poisson_for(variance)?;
    for v in values.iter_mut() {
        *v = v.wrapping_add_noise(skellam_from(&poisson, rng));
    }
    Ok(())
}

fn check_variance(variance: f64) -> Result<(), DpError> {
    if variance >= 0.0 && variance.is_finite() {
        Ok(())
    } else {
        Err(DpError::InvalidParameter {
            name: "variance",
            value: variance,
            reason: "must be finite and >= 0",
        })
    }
}

fn poisson_for(variance: f64) -> Result<Poisson<f64>, DpError> {
    Poisson::new(variance / 2.0).map_err(|_| DpError::InvalidParameter {
        name: "variance",
        value: variance,
        reason: "must be below 3.6e19: each agent's noise variance grows with (clip × noise \
                 multiplier)², so lower the DP clip (`--dp-clip`, `run.dp.clip`) or the noise \
                 multiplier (`--dp-noise`, `run.dp.noise_multiplier`)",
    })
}

/// RDP at integer order `alpha` ≥ 2 of the Skellam mechanism with variance
/// `mu` on integer vectors of L1 sensitivity `delta1` and L2 sensitivity
/// `delta2` (Agarwal et al. 2021, Thm. 3.5 / Cor. 3.6):
/// `αΔ₂²/(2μ) + min(((2α−1)Δ₂² + 6Δ₁)/(4μ²), 3Δ₁/(2μ))`.
pub fn skellam_rdp(alpha: u32, mu: f64, delta1: f64, delta2: f64) -> f64 {
    let a = f64::from(alpha);
    let gaussian = a * delta2 * delta2 / (2.0 * mu);
    let extra = (((2.0 * a - 1.0) * delta2 * delta2 + 6.0 * delta1) / (4.0 * mu * mu))
        .min(3.0 * delta1 / (2.0 * mu));
    gaussian + extra
}

/// Distributed Skellam noise calibrated to a noise multiplier, clip and
/// fixed-point scale; see the module docs for every parameter's role.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DistributedSkellam {
    /// Target noise multiplier `z` of the summed release.
    pub noise_multiplier: f64,
    /// Clip norm `C` of each agent's delta (before encoding).
    pub clip: f64,
    /// Fixed-point scale `s`: a delta `x` is encoded as `round(s·x)`.
    pub scale: f64,
    /// Number of coordinates `d` of the encoded vector.
    pub dim: usize,
    /// Survivors planned for: each agent adds `μ / min_survivors`.
    pub min_survivors: usize,
}

impl DistributedSkellam {
    /// Validated settings.
    pub fn new(
        noise_multiplier: f64,
        clip: f64,
        scale: f64,
        dim: usize,
        min_survivors: usize,
    ) -> Result<Self, DpError> {
        let pos = "must be finite and > 0";
        check_range(
            "noise_multiplier",
            noise_multiplier,
            0.0,
            f64::INFINITY,
            false,
            pos,
        )?;
        check_range("clip", clip, 0.0, f64::INFINITY, false, pos)?;
        check_range("scale", scale, 0.0, f64::INFINITY, false, pos)?;
        check_range("dim", dim as f64, 0.0, f64::INFINITY, false, "must be >= 1")?;
        check_range(
            "min_survivors",
            min_survivors as f64,
            0.0,
            f64::INFINITY,
            false,
            "must be >= 1",
        )?;
        let out = Self {
            noise_multiplier,
            clip,
            scale,
            dim,
            min_survivors,
        };
        poisson_for(out.per_agent_variance())?;
        Ok(out)
    }

    /// L2 sensitivity of one agent's encoded vector, `s·C + √d`.
    pub fn l2_sensitivity(&self) -> f64 {
        self.scale * self.clip + (self.dim as f64).sqrt()
    }

    /// L1 sensitivity bound, `min(Δ₂², √d·Δ₂)` (integer vectors).
    pub fn l1_sensitivity(&self) -> f64 {
        let d2 = self.l2_sensitivity();
        (d2 * d2).min((self.dim as f64).sqrt() * d2)
    }

    /// Target per-coordinate variance of the summed noise, `(z·Δ₂)²`.
    pub fn total_variance(&self) -> f64 {
        (self.noise_multiplier * self.l2_sensitivity()).powi(2)
    }

    /// Variance each agent adds, `μ / min_survivors`.
    pub fn per_agent_variance(&self) -> f64 {
        self.total_variance() / self.min_survivors as f64
    }

    /// The noise multiplier the sum actually has when `survivors` agents'
    /// noise made it in: `z·√(survivors / min_survivors)`. Account the round
    /// at this value (it is below `z` when more agents dropped than planned).
    pub fn effective_noise_multiplier(&self, survivors: usize) -> f64 {
        self.noise_multiplier * (survivors as f64 / self.min_survivors as f64).sqrt()
    }

    /// Skellam RDP at integer order `alpha` of one release with `survivors`
    /// agents' noise in the sum.
    pub fn rdp(&self, alpha: u32, survivors: usize) -> f64 {
        let mu = self.per_agent_variance() * survivors as f64;
        skellam_rdp(alpha, mu, self.l1_sensitivity(), self.l2_sensitivity())
    }

    /// A bound on the absolute value of a summed coordinate for `agents`
    /// encoded vectors plus noise (6 standard deviations, a tail of 2e-9 per
    /// coordinate): the secure-aggregation modulus must exceed twice this.
    pub fn max_abs_sum(&self, agents: usize) -> f64 {
        agents as f64 * (self.scale * self.clip + 1.0) + 6.0 * self.total_variance().sqrt()
    }

    /// Adds this agent's share of the noise to its encoded i64 vector.
    pub fn add_noise_i64<R: Rng + ?Sized>(
        &self,
        values: &mut [i64],
        rng: &mut R,
    ) -> Result<(), DpError> {
        add_skellam(values, self.per_agent_variance(), rng)
    }

    /// Adds this agent's share of the noise to its encoded i32 vector
    /// (wrapping modulo 2³²).
    pub fn add_noise_i32<R: Rng + ?Sized>(
        &self,
        values: &mut [i32],
        rng: &mut R,
    ) -> Result<(), DpError> {
        add_skellam(values, self.per_agent_variance(), rng)
    }

    /// Adds this agent's share to u64 ring elements (modulo 2⁶⁴).
    pub fn add_noise_u64<R: Rng + ?Sized>(
        &self,
        values: &mut [u64],
        rng: &mut R,
    ) -> Result<(), DpError> {
        add_skellam(values, self.per_agent_variance(), rng)
    }

    /// Adds this agent's share to u32 ring elements (modulo 2³²).
    pub fn add_noise_u32<R: Rng + ?Sized>(
        &self,
        values: &mut [u32],
        rng: &mut R,
    ) -> Result<(), DpError> {
        add_skellam(values, self.per_agent_variance(), rng)
    }
}

/// Adds this agent's share of the distributed noise to its encoded
/// secure-aggregation input, in place, **before masking**: Skellam noise of
/// variance `noise.skellam.per_agent_variance()` on the `noise.skellam.dim`
/// model coordinates and `noise.bit_variance` on the clip-bit coordinate that
/// follows them (if the update has one). The coordinate weights, example
/// weight and clipped count are left alone: under DP they are the constants 1
/// and 0. The result stays reduced modulo the configuration's ring.
///
/// This is the agent-side hook of distributed DP: call it between
/// `secagg::encode` and `ClientSession::masked_encoded`, with an RNG the agent
/// keeps to itself (the simulator derives it from the run seed).
pub fn noise_encoded<R: Rng + ?Sized>(
    input: &mut crate::privacy::secagg::EncodedInput,
    config: &crate::privacy::secagg::SecAggConfig,
    noise: &DistributedNoise,
    rng: &mut R,
) -> Result<(), DpError> {
    let dim = noise.skellam.dim;
    if dim > config.num_values {
        return Err(DpError::InvalidParameter {
            name: "dim",
            value: dim as f64,
            reason: "exceeds the encoded update's value count",
        });
    }
    let mut draws = vec![0i64; config.num_values];
    add_skellam(&mut draws[..dim], noise.skellam.per_agent_variance(), rng)?;
    add_skellam(&mut draws[dim..], noise.bit_variance, rng)?;
    input
        .add_noise(&draws)
        .map_err(|_| DpError::InvalidParameter {
            name: "num_values",
            value: config.num_values as f64,
            reason: "does not match the encoded input",
        })
}

/// The largest fixed-point scale `s` for which `agents` encoded deltas of
/// L2 norm ≤ `clip` (each coordinate at most `value_clip`), plus the summed
/// noise at 6 standard deviations, stay inside a quarter of the
/// secure-aggregation ring of `modulus_bits` (a factor 2 of headroom below
/// the signed range). `z` is the noise multiplier of the model coordinates
/// and `bit_std` the std of the clip-bit noise in value units (0 if none).
pub fn max_scale(
    modulus_bits: u32,
    agents: usize,
    clip: f64,
    value_clip: f64,
    z: f64,
    bit_std: f64,
    dim: usize,
) -> Result<f64, DpError> {
    let room = 2f64.powi(modulus_bits as i32 - 2);
    let n = agents as f64;
    let fixed = n + 6.0 * z * (dim as f64).sqrt();
    let per_unit = n * value_clip + 6.0 * (z * clip).max(bit_std);
    let s = ((room - fixed) / per_unit).floor();
    if s >= 1.0 && s.is_finite() {
        Ok(s)
    } else {
        Err(DpError::InvalidParameter {
            name: "modulus_bits",
            value: f64::from(modulus_bits),
            reason: "the ring cannot hold the summed encodings plus noise at any scale",
        })
    }
}

/// Agent-side noise of a distributed-DP round: Skellam noise added to the
/// fixed-point encoding before masking (see this module).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DistributedNoise {
    /// Noise on the model coordinates: multiplier, clip, encoding scale,
    /// dimension and the number of agents the noise is split across.
    pub skellam: DistributedSkellam,
    /// Skellam variance (in encoded units) each agent adds to the clip-bit
    /// coordinate; 0 without adaptive clipping.
    pub bit_variance: f64,
    /// The value clip secure aggregation must use: `max(C, ½)` so that
    /// neither a clipped delta coordinate nor a clip bit is clipped again.
    pub secagg_clip: f32,
    /// The ring the scale was sized for (2^32 or 2^64).
    pub modulus_bits: u32,
}

impl DistributedNoise {
    /// Sets the encoding of a secure-aggregation configuration to the one the
    /// noise was calibrated for (value clip, fixed-point scale, ring, and the
    /// per-agent noise variance the sum's sanity bound allows for). Agents and
    /// the coordinator must both call this on the round's configuration.
    pub fn configure(&self, config: &mut crate::privacy::secagg::SecAggConfig) {
        config.clip = self.secagg_clip;
        config.scale = self.skellam.scale;
        config.modulus_bits = self.modulus_bits;
        config.noise_variance = self.skellam.per_agent_variance().max(self.bit_variance);
    }

    /// The noise multiplier of a round's whole release when `survivors`
    /// agents' noise is in the sum: the model coordinates'
    /// ([`DistributedSkellam::effective_noise_multiplier`]) composed, with
    /// adaptive clipping (`clip_bit`), with the clip-bit count's, released
    /// with them: `z⁻² = z_Δ⁻² + (2σ_b)⁻²` (Andrew et al. 2021, Thm. 1, as the
    /// coordinator splits its `z`), where `σ_b = √(bit_variance·survivors) /
    /// scale` is the count's noise in bits. A merchant charges and checks its
    /// floor at this: `z_Δ` alone left out the count, whose noise the
    /// coordinator sets (a thin one made any `z_Δ` pass a floor of 1 with the
    /// release at 0.5; found by an attacker probe). No count noise gives 0.
    pub fn release_noise_multiplier(&self, survivors: usize, clip_bit: bool) -> f64 {
        let z_delta = self.skellam.effective_noise_multiplier(survivors);
        if !clip_bit {
            return z_delta;
        }
        let sigma_b = (self.bit_variance * survivors as f64).sqrt() / self.skellam.scale;
        if !(sigma_b > 0.0 && z_delta > 0.0) {
            return 0.0;
        }
        (z_delta.powi(-2) + (2.0 * sigma_b).powi(-2)).powf(-0.5)
    }

    /// The agent's check, before it adds its share, that this noise was
    /// planned for the secure round it is asked for. The coordinator sets
    /// both, and every way they could disagree shrinks what each agent adds
    /// relative to its input:
    /// * the parameters are in range (a deserialised task skipped
    ///   [`DistributedSkellam::new`]'s checks);
    /// * the noise was calibrated for the round's encoding: its fixed-point
    ///   scale, value clip and ring ([`Self::configure`]);
    /// * it covers every model coordinate of the update (`dim`: the round's
    ///   values less the clip bit) and a delta clipped to `dp_clip` (the clip
    ///   the agent's training applied) at most.
    ///
    /// How many agents the noise is split across (`min_survivors`) is the
    /// merchant's policy's to judge against the round's size
    /// ([`DistributedSkellam::effective_noise_multiplier`] of its agents).
    pub fn check_round(
        &self,
        config: &crate::privacy::secagg::SecAggConfig,
        dp_clip: f64,
        clip_bit: bool,
    ) -> Result<(), String> {
        let k = &self.skellam;
        DistributedSkellam::new(k.noise_multiplier, k.clip, k.scale, k.dim, k.min_survivors)
            .map_err(|e| format!("the round's distributed noise: {e}"))?;
        if !(self.bit_variance.is_finite() && self.bit_variance >= 0.0) {
            return Err(format!(
                "the round's clip-bit noise variance {} is not a variance",
                self.bit_variance
            ));
        }
        let mismatch = |what: &str, noise: String, round: String| {
            Err(format!(
                "the distributed noise was calibrated for {what} {noise}, the secure round uses \
                 {round}: each agent's share would not give the planned noise"
            ))
        };
        if config.scale != k.scale {
            return mismatch("the scale", k.scale.to_string(), config.scale.to_string());
        }
        if config.clip != self.secagg_clip {
            return mismatch(
                "the value clip",
                self.secagg_clip.to_string(),
                config.clip.to_string(),
            );
        }
        if config.modulus_bits != self.modulus_bits {
            return mismatch(
                "the ring",
                format!("2^{}", self.modulus_bits),
                format!("2^{}", config.modulus_bits),
            );
        }
        let values = config.num_values;
        if k.dim + usize::from(clip_bit) != values {
            return Err(format!(
                "the distributed noise covers {} coordinates, the update has {values} model \
                 coordinates: the others would go without noise",
                k.dim,
                values = values - usize::from(clip_bit)
            ));
        }
        if k.clip < dp_clip {
            return Err(format!(
                "the distributed noise is calibrated for deltas clipped to {}, the round clips \
                 them to {dp_clip}",
                k.clip
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
