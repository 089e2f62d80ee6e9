//! The noop model used to measure the coordinator's and transport's overhead:
//! agents return a seeded random update of `dim` values without training.

use std::collections::BTreeMap;

use super::{FederatedModel, LocalData, RoundContext, TaskOutput, TrainError};
use crate::federation::update::Update;

/// No model: a seeded random update of `dim` values in [-1, 1), weight 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Noop {
    /// Update length.
    pub dim: usize,
}

impl Noop {
    /// The random update of this agent and round (the statistics step and
    /// training both return it; nothing is trained).
    fn random_update(&self, ctx: &RoundContext<'_>, merchant_id: &str) -> TaskOutput {
        let seed = crate::seed::derive(ctx.seed, &["noop", merchant_id, &ctx.round.to_string()]);
        let values = uniform_pm1(seed, self.dim);
        let update = Update {
            values,
            coord_weights: Vec::new(),
            weight: 1.0,
        };
        TaskOutput {
            update: Some(update),
            metrics: BTreeMap::new(),
            weight: 1.0,
            validation_weight: 0.0,
        }
    }
}

impl FederatedModel for Noop {
    fn name(&self) -> &'static str {
        "noop"
    }

    fn data_family(&self) -> &'static str {
        "noop"
    }

    fn model_len(&self) -> usize {
        self.dim
    }

    fn stats(
        &self,
        ctx: &RoundContext<'_>,
        data: &mut LocalData,
    ) -> Result<TaskOutput, TrainError> {
        Ok(self.random_update(ctx, &data.merchant_id))
    }

    fn fit(
        &self,
        ctx: &RoundContext<'_>,
        _global: &[f32],
        data: &mut LocalData,
    ) -> Result<TaskOutput, TrainError> {
        Ok(self.random_update(ctx, &data.merchant_id))
    }

    fn evaluate(
        &self,
        _ctx: &RoundContext<'_>,
        _global: &[f32],
        _data: &mut LocalData,
    ) -> Result<TaskOutput, TrainError> {
        Ok(TaskOutput {
            update: None,
            metrics: BTreeMap::new(),
            weight: 1.0,
            validation_weight: 0.0,
        })
    }

    /// Nothing is modelled: no scores.
    fn score(
        &self,
        _ctx: &RoundContext<'_>,
        _global: &[f32],
        _data: &mut LocalData,
    ) -> Result<Vec<f32>, TrainError> {
        Ok(Vec::new())
    }
}

/// `n` values uniform on the grid `k · 2⁻²³ − 1`, k in 0..2²⁴, i.e. in
/// [-1, 1), from `LANES` interleaved xoshiro128+ streams seeded by
/// SplitMix64 from `seed`.
///
/// The noop task stands for "training" in overhead benchmarks, so its cost
/// must be negligible next to what is measured: one `random_range` call per
/// value on ChaCha8 was most of the simulator's noop round. The lanes are
/// independent, so the compiler runs them in SIMD registers (plain SSE2
/// shifts, adds and xors), about 1 ns per 4 values; each 32-bit output keeps
/// its top 24 bits (xoshiro128+'s strong ones), exactly representable in f32.
/// Not a cryptographic or statistically demanding generator: noop only.
// Indexing all four state arrays by lane is the form the vectoriser likes.
#[allow(clippy::needless_range_loop)]
fn uniform_pm1(seed: u64, n: usize) -> Vec<f32> {
    const LANES: usize = 16;
    const SCALE: f32 = 1.0 / (1u32 << 23) as f32;
    let mut sm = seed;
    let mut splitmix = || {
        sm = sm.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = sm;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let mut s = [[0u32; LANES]; 4];
    for lane in 0..LANES {
        let (a, b) = (splitmix(), splitmix());
        // Never all zero: the top word is odd.
        s[0][lane] = a as u32;
        s[1][lane] = (a >> 32) as u32;
        s[2][lane] = b as u32;
        s[3][lane] = (b >> 32) as u32 | 1;
    }
    // Whole blocks of LANES values (the tail is cut off at the end), so that
    // the conversion below is a fixed-size loop the compiler vectorises.
    let mut out = Vec::with_capacity(n.next_multiple_of(LANES));
    while out.len() < n {
        let [s0, s1, s2, s3] = &mut s;
        let mut r = [0u32; LANES];
        for i in 0..LANES {
            r[i] = s0[i].wrapping_add(s3[i]);
            let t = s1[i] << 9;
            s2[i] ^= s0[i];
            s3[i] ^= s1[i];
            s1[i] ^= s2[i];
            s0[i] ^= s3[i];
            s2[i] ^= t;
            s3[i] = s3[i].rotate_left(11);
        }
        let mut f = [0.0f32; LANES];
        for i in 0..LANES {
            // < 2²⁴ after the shift: a signed conversion is exact (and SIMD).
            f[i] = ((r[i] >> 8) as i32) as f32 * SCALE - 1.0;
        }
        out.extend_from_slice(&f);
    }
    out.truncate(n);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_pm1_is_seeded_bounded_and_centred() {
        let draw = |seed| uniform_pm1(seed, 10_001);
        let a = draw(1);
        assert_eq!(a.len(), 10_001);
        assert_eq!(a, draw(1));
        assert_ne!(a, draw(2));
        assert!(a.iter().all(|v| (-1.0..1.0).contains(v)));
        let mean = a.iter().map(|&v| f64::from(v)).sum::<f64>() / a.len() as f64;
        // Uniform on [-1, 1): standard error of the mean is 0.577/√n ≈ 0.006.
        assert!(mean.abs() < 0.03, "mean {mean}");
        let below = a.iter().filter(|&&v| v < -0.5).count() as f64 / a.len() as f64;
        assert!((below - 0.25).abs() < 0.02, "fraction below -0.5: {below}");
        // Neighbouring values (different lanes) are not correlated.
        let lag1 = a.windows(2).map(|w| f64::from(w[0] * w[1])).sum::<f64>() / a.len() as f64;
        assert!(lag1.abs() < 0.02, "lag-1 product mean {lag1}");
    }
}
