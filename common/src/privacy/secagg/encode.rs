//! Fixed-point encoding of a whole [`Update`] into one vector modulo
//! 2^modulus_bits, and decoding of the unmasked sum back to f64 sums.
//!
//! Layout: `values ‖ coord_weights ‖ weight ‖ clipped`. Values are clipped to
//! [−clip, clip] and stochastically rounded at resolution 1/scale (unbiased:
//! the expected code is exactly x·scale), weights are clipped to
//! [0, max_weight] and rounded at 1/weight_scale, and the last coordinate
//! counts the coordinates this agent had to clip — summed under the masks like
//! everything else, so the server learns only the total clipped count.

use chacha20::ChaCha8;
use chacha20::cipher::{KeyIvInit, StreamCipher};
use rand::{Rng, RngExt};

use super::ring::{RingVec, Word, Words, with_words};
use super::{SecAggConfig, SecAggError};
use crate::federation::aggregate::SumAccumulator;
use crate::federation::update::Update;

/// An agent's encoded (not yet masked) input. It stays on the agent.
#[derive(Debug, Clone, PartialEq)]
pub struct EncodedInput {
    pub(crate) vector: RingVec,
    num_values: usize,
    clipped: usize,
}

impl EncodedInput {
    /// The encoded vector (values ‖ coord weights ‖ weight ‖ clipped count),
    /// modulo 2^modulus_bits.
    pub fn vector(&self) -> &RingVec {
        &self.vector
    }

    /// How many coordinates (values, coordinate weights and the example
    /// weight) were outside their range and clipped.
    pub fn clipped(&self) -> usize {
        self.clipped
    }

    /// Adds integer noise, in encoded units (multiples of 1/scale), to the
    /// value coordinates before masking: `noise[i]` goes to value `i`, modulo
    /// 2^modulus_bits. This is the hook for distributed differential privacy
    /// (each agent adds discrete noise; the sum carries the total). The
    /// overflow check of [`SecAggConfig::validate`] covers only clipped
    /// values, so leave room for the noise (a lower `scale` or `clip`).
    pub fn add_noise(&mut self, noise: &[i64]) -> Result<(), SecAggError> {
        if noise.len() != self.num_values {
            return Err(SecAggError::WrongLength {
                what: "noise",
                expected: self.num_values,
                got: noise.len(),
            });
        }
        self.vector.add_signed(0, noise);
        Ok(())
    }
}

/// The clipped fraction of a round's coordinates above which drivers warn:
/// a few outliers are what clipping is for; one coordinate in a hundred
/// means the clip is too low for these updates.
pub const CLIPPED_WARNING: f64 = 0.01;

/// The warning for a round that clipped `fraction` of its coordinates, if
/// above [`CLIPPED_WARNING`]; `setting` names where the clip is set.
pub fn clipping_warning(fraction: f64, setting: &str) -> Option<String> {
    (fraction > CLIPPED_WARNING).then(|| {
        format!(
            "secure aggregation clipped {:.1} % of the summed coordinates: each value is clipped \
             to the secure-aggregation clip before encoding, so the sum is distorted; raise \
             {setting}",
            100.0 * fraction
        )
    })
}

/// Values whose rounding uniforms are drawn in one call.
const DRAW_BATCH: usize = 256;

/// Where stochastic rounding's uniforms come from: 64-bit draws, taken in
/// order, each made a uniform in [0, 1) as rand's `StandardUniform` makes
/// an f64. Every `rand::Rng` is a source (a real agent rounds with a
/// ChaCha8 generator seeded per task from the run seed, `client::secure`);
/// [`RoundingDraws`] is the in-memory driver's.
pub trait Draws {
    /// Overwrites `out` with the next `out.len()` draws.
    fn fill_u64(&mut self, out: &mut [u64]);

    /// The next draw.
    fn next_draw(&mut self) -> u64 {
        let mut one = [0u64];
        self.fill_u64(&mut one);
        one[0]
    }
}

impl<R: Rng> Draws for R {
    fn fill_u64(&mut self, out: &mut [u64]) {
        self.fill(out);
    }

    fn next_draw(&mut self) -> u64 {
        self.next_u64()
    }
}

/// Seeded rounding draws: the ChaCha8 keystream under `key` (the `chacha20`
/// crate's cipher), read as little-endian u64s. These are the words of
/// `rand_chacha::ChaCha8Rng::from_seed(key)` drawn 64 bits at a time (that
/// generator's 64-bit block counter and zero stream id fill the ChaCha state
/// as this cipher's 32-bit counter and zero nonce do, for the first 2^32
/// blocks, i.e. 2^35 draws: far more than any vector held in memory), so an
/// input rounds to the same codes as it did with that generator; checked in
/// this module's tests. The reason is speed: the cipher fills a whole batch
/// at a time with its widest backend, 11.5 GB/s per core with AVX-512 (which
/// `.cargo/config.toml` turns on with `--cfg chacha20_avx512`, detected at
/// run time) and 5.1 GB/s with AVX2, against the generator's 4.1 GB/s
/// (BENCHMARKS.md, session 20).
pub struct RoundingDraws {
    cipher: ChaCha8,
}

impl RoundingDraws {
    /// The draws of the ChaCha8 stream keyed with `key`.
    pub fn from_key(key: [u8; 32]) -> Self {
        Self {
            cipher: ChaCha8::new(&key.into(), &[0u8; 12].into()),
        }
    }
}

impl Draws for RoundingDraws {
    fn fill_u64(&mut self, out: &mut [u64]) {
        self.cipher
            .write_keystream(bytemuck::cast_slice_mut::<u64, u8>(out));
        out.iter_mut().for_each(|w| *w = u64::from_le(*w));
    }
}

/// Stochastic rounding: ⌊y + u⌋ with u uniform in [0, 1), one draw at a
/// time (what the batched loops of [`encode`] must equal; tests only).
#[cfg(test)]
fn round<D: Draws>(y: f64, draws: &mut D) -> i64 {
    floor_to_i64(y + unit_f64(draws.next_draw()))
}

/// A 64-bit draw as a uniform f64 in [0, 1), exactly as rand's
/// `StandardUniform` makes one: its top 53 bits times 2^-53.
#[inline(always)]
fn unit_f64(u: u64) -> f64 {
    (u >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// `z.floor() as i64` without the call into libm's `floor` (which the
/// baseline x86-64 target, lacking SSE4.1's `roundsd`, makes for every
/// coordinate): truncation, minus one where it rounded a negative value up.
/// Equal for every f64, saturating alike beyond the i64 range.
#[inline(always)]
fn floor_to_i64(z: f64) -> i64 {
    let t = z as i64;
    t.saturating_sub(i64::from((t as f64) > z))
}

/// Codes below this magnitude take [`encode_batch`]: its floor by the
/// 1.5·2^52 rounding constant is exact for |z| < 2^51.
const FAST_LIMIT: f64 = (1u64 << 50) as f64;

/// 1.5·2^52: adding and subtracting it rounds an f64 below 2^51 in magnitude
/// to the nearest integer, and the bits of `f + ROUNDER` hold the integer `f`.
const ROUNDER: f64 = 6_755_399_441_055_744.0;

/// One batch of values, codes below [`FAST_LIMIT`]: the same codes as
/// [`encode_batch_wide`] (`floor_to_i64(x · scale + unit_f64(u))`) with no
/// branch and no integer–float conversion the baseline x86-64 target lacks
/// in vector form, so the loop vectorises. The uniform is rebuilt exactly
/// ((u >> 11)·2^-53 as (u >> 12)·2^-52 + bit 11·2^-53, a sum without
/// rounding), the nearest integer is read from the bits of `z + ROUNDER`, and
/// one is taken off where that rounded up: the floor. Clipped values are
/// counted; returns whether every value was finite (the caller then finds
/// the first that was not).
#[inline(always)]
fn encode_batch<W: Word>(
    values: &[f32],
    draws: &[u64],
    clip: f64,
    scale: f64,
    out: &mut [W],
    clipped: &mut usize,
) -> bool {
    const TWO_52: f64 = 4_503_599_627_370_496.0;
    const TWO_M52: f64 = 1.0 / (1u64 << 52) as f64;
    const TWO_M53: f64 = 1.0 / (1u64 << 53) as f64;
    let mut finite = true;
    let mut count = 0usize;
    for ((o, &v), &u) in out.iter_mut().zip(values).zip(draws) {
        let x = f64::from(v);
        let magnitude = x.abs();
        finite &= magnitude < f64::INFINITY;
        count += usize::from(magnitude > clip);
        // The clamp of a finite value, written as the compare-and-select
        // that is one `minpd` and one `maxpd`.
        let x = if x < clip { x } else { clip };
        let x = if x > -clip { x } else { -clip };
        let high = f64::from_bits(0x4330_0000_0000_0000 | (u >> 12)) - TWO_52;
        let low = if (u >> 11) & 1 == 1 { TWO_M53 } else { 0.0 };
        let z = x * scale + (high * TWO_M52 + low);
        let shifted = z + ROUNDER;
        let nearest = shifted - ROUNDER;
        let code = (shifted.to_bits() as i64)
            .wrapping_sub(ROUNDER.to_bits() as i64)
            .wrapping_sub(i64::from(nearest > z));
        *o = W::from_u64(code as u64);
    }
    *clipped += count;
    finite
}

/// One batch of values at any scale (codes up to the i64 range).
fn encode_batch_wide<W: Word>(
    values: &[f32],
    draws: &[u64],
    clip: f64,
    scale: f64,
    out: &mut [W],
    clipped: &mut usize,
) -> bool {
    for ((o, &v), &u) in out.iter_mut().zip(values).zip(draws) {
        if !v.is_finite() {
            return false;
        }
        let mut x = f64::from(v);
        if x.abs() > clip {
            *clipped += 1;
            x = x.clamp(-clip, clip);
        }
        *o = W::from_u64(floor_to_i64(x * scale + unit_f64(u)) as u64);
    }
    true
}

/// Encodes an update. NaN or infinite values are an error, never clipped:
/// they mean a diverged model, which clipping would hide.
pub fn encode<D: Draws>(
    config: &SecAggConfig,
    update: &Update,
    rng: &mut D,
) -> Result<EncodedInput, SecAggError> {
    if update.values.len() != config.num_values {
        return Err(SecAggError::WrongLength {
            what: "update values",
            expected: config.num_values,
            got: update.values.len(),
        });
    }
    if update.coord_weights.len() != config.num_coord_weights {
        return Err(SecAggError::WrongLength {
            what: "coordinate weights",
            expected: config.num_coord_weights,
            got: update.coord_weights.len(),
        });
    }
    let mut clipped = 0usize;
    let words = if config.modulus_bits <= 32 {
        Words::U32(encode_words(config, update, rng, &mut clipped)?)
    } else {
        Words::U64(encode_words(config, update, rng, &mut clipped)?)
    };
    Ok(EncodedInput {
        vector: RingVec::from_typed(config.modulus_bits, words),
        num_values: config.num_values,
        clipped,
    })
}

/// The encoding loop in the ring's word type (reduced by the caller).
fn encode_words<W: Word, D: Draws>(
    config: &SecAggConfig,
    update: &Update,
    rng: &mut D,
    clipped: &mut usize,
) -> Result<Vec<W>, SecAggError> {
    let clip = f64::from(config.clip);
    let mut vector: Vec<W> = Vec::with_capacity(config.vector_len());
    // The values' uniforms are drawn DRAW_BATCH at a time: the same 64-bit
    // words, in the same order, as one `random::<f64>()` per value from a
    // block generator (ChaCha), without its per-draw bookkeeping.
    let mut draws = [0u64; DRAW_BATCH];
    let fast = clip * config.scale + 1.0 < FAST_LIMIT;
    for (batch, values) in update.values.chunks(DRAW_BATCH).enumerate() {
        let draws = &mut draws[..values.len()];
        rng.fill_u64(draws);
        let start = vector.len();
        vector.resize(start + values.len(), W::default());
        let out = &mut vector[start..];
        let all_finite = if fast {
            encode_batch(values, draws, clip, config.scale, out, clipped)
        } else {
            encode_batch_wide(values, draws, clip, config.scale, out, clipped)
        };
        if !all_finite {
            let j = values
                .iter()
                .position(|v| !v.is_finite())
                .expect("a batch that is not all finite has a non-finite value");
            return Err(SecAggError::NotFinite {
                index: batch * DRAW_BATCH + j,
                value: f64::from(values[j]),
            });
        }
    }
    // The coordinate weights and the weight, likewise DRAW_BATCH at a time
    // (one draw each, continuing the values' stream).
    let num_weights = update.coord_weights.len() + 1;
    let weight_at = |i: usize| {
        update
            .coord_weights
            .get(i)
            .map_or(update.weight, |&w| f64::from(w))
    };
    for start in (0..num_weights).step_by(DRAW_BATCH) {
        let draws = &mut draws[..DRAW_BATCH.min(num_weights - start)];
        rng.fill_u64(draws);
        for (j, &u) in draws.iter().enumerate() {
            let w = weight_at(start + j);
            let index = config.num_values + start + j;
            if !w.is_finite() || w < 0.0 {
                return Err(SecAggError::NotFinite { index, value: w });
            }
            let mut x = w;
            if x > config.max_weight {
                *clipped += 1;
                x = config.max_weight;
            }
            vector.push(W::from_u64(
                floor_to_i64(x * config.weight_scale + unit_f64(u)) as u64,
            ));
        }
    }
    vector.push(W::from_u64(*clipped as u64));
    Ok(vector)
}

/// Values modulo 2^bits read as two's complement (sign extension by shifts,
/// valid for every width 1..=64), divided by the scale.
fn decode_signed<W: Word>(raw: &[W], config: &SecAggConfig) -> Vec<f64> {
    let shift = 64 - config.modulus_bits;
    raw.iter()
        .map(|r| (((r.to_u64() << shift) as i64) >> shift) as f64 / config.scale)
        .collect()
}

/// Refuses a sum that `count` agents following the protocol cannot produce.
///
/// Each honest value code is at most ⌈clip·scale⌉ in magnitude (plus its
/// share of distributed-DP noise, allowed for at ten standard deviations of
/// the summed noise), each weight code at most ⌈max_weight·weight_scale⌉ and
/// each clipped count at most the vector length. A malicious agent may send
/// any residue; whatever it adds shows up here unless the total stays within
/// these bounds, which is all a sanity check on the sum can enforce.
fn check_bounds(
    config: &SecAggConfig,
    values: &[f64],
    unsigned: &dyn Fn(usize) -> u64,
    count: usize,
) -> Result<(), SecAggError> {
    let n = count as f64;
    let noise = 10.0 * (n * config.noise_variance).sqrt();
    let value_bound = (n * config.max_value_code() as f64 + noise) / config.scale;
    let out = |what, index, value: f64, bound| SecAggError::SumOutOfRange {
        what,
        index,
        value,
        bound,
        count,
    };
    if let Some((i, &v)) = values
        .iter()
        .enumerate()
        .find(|(_, v)| v.abs() > value_bound)
    {
        return Err(out("value", i, v, value_bound));
    }
    let nv = config.num_values;
    let nw = config.num_coord_weights;
    let weight_code_bound = (count as u128).saturating_mul(config.max_weight_code());
    for i in nv..=nv + nw {
        if u128::from(unsigned(i)) > weight_code_bound {
            let what = if i < nv + nw {
                "coordinate weight"
            } else {
                "weight"
            };
            return Err(out(
                what,
                i,
                unsigned(i) as f64 / config.weight_scale,
                weight_code_bound as f64 / config.weight_scale,
            ));
        }
    }
    let clipped_bound = (count as u128).saturating_mul(config.vector_len() as u128);
    let clipped = unsigned(nv + nw + 1);
    if u128::from(clipped) > clipped_bound {
        return Err(out(
            "clipped count",
            nv + nw + 1,
            clipped as f64,
            clipped_bound as f64,
        ));
    }
    Ok(())
}

/// The decoded result of a round: sums over the surviving agents.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedSum {
    /// Sum of the (clipped, quantised) update values.
    pub values: Vec<f64>,
    /// Sum of the per-coordinate weights.
    pub coord_weights: Vec<f64>,
    /// Sum of the example weights.
    pub weight: f64,
    /// Number of agents whose inputs are in the sum.
    pub count: usize,
    /// Total number of coordinates clipped across those agents.
    pub clipped: u64,
}

impl DecodedSum {
    /// Decodes an unmasked sum of `count` agents' encodings. Values are read
    /// as two's complement in modulus_bits; validation guarantees the true
    /// sum lies in range, so this is exact up to quantisation. A sum that
    /// `count` agents within the round's bounds cannot produce is refused
    /// with [`SecAggError::SumOutOfRange`] (a malicious agent's doing).
    pub fn decode(config: &SecAggConfig, raw: &RingVec, count: usize) -> Result<Self, SecAggError> {
        if raw.len() != config.vector_len() {
            return Err(SecAggError::WrongLength {
                what: "summed vector",
                expected: config.vector_len(),
                got: raw.len(),
            });
        }
        if raw.modulus_bits() != config.modulus_bits {
            return Err(SecAggError::Malformed {
                what: "summed vector",
                detail: format!(
                    "modulo 2^{}, the round uses 2^{}",
                    raw.modulus_bits(),
                    config.modulus_bits
                ),
            });
        }
        let nv = config.num_values;
        let nw = config.num_coord_weights;
        let mask = config.modulus_mask();
        let values = with_words!(&raw.words, v => decode_signed(&v[..nv], config));
        let unsigned = |i: usize| raw.get(i) & mask;
        check_bounds(config, &values, &unsigned, count)?;
        Ok(Self {
            values,
            coord_weights: (nv..nv + nw)
                .map(|i| unsigned(i) as f64 / config.weight_scale)
                .collect(),
            weight: unsigned(nv + nw) as f64 / config.weight_scale,
            count,
            clipped: unsigned(nv + nw + 1),
        })
    }

    /// Fraction of all submitted coordinates that were clipped.
    pub fn clipped_fraction(&self) -> f64 {
        let total = self.count * (self.values.len() + self.coord_weights.len() + 1);
        if total == 0 {
            0.0
        } else {
            self.clipped as f64 / total as f64
        }
    }

    /// A warning when more than [`CLIPPED_WARNING`] of the coordinates were
    /// clipped: the sum is then a distorted one, and nothing else says so.
    /// `setting` names where the clip is set (a flag or a config key).
    pub fn clipping_warning(&self, setting: &str) -> Option<String> {
        clipping_warning(self.clipped_fraction(), setting)
    }

    /// The sums as the coordinator's streaming accumulator, ready for
    /// [`SumAccumulator::mean_delta`].
    pub fn into_accumulator(self) -> SumAccumulator {
        SumAccumulator::from_sums(self.values, self.coord_weights, self.weight, self.count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn config() -> SecAggConfig {
        let mut c = SecAggConfig::complete(4, 1, 3, 1.0);
        c.scale = 1000.0;
        c
    }

    #[test]
    fn batched_rounding_draws_equal_one_random_f64_per_value() {
        // Value and coordinate-weight counts around the batch size, after the
        // generator was advanced by an odd number of 32-bit words; some
        // weights above max_weight (clipped).
        for (n, m) in [(1, 0), (255, 1), (256, 255), (257, 256), (1000, 600)] {
            let mut c = SecAggConfig::complete(n, m, 3, 1.0);
            c.scale = 1000.0;
            c.max_weight = 5.0;
            c.weight_scale = 100.0;
            let mut gen_values = rand_chacha::ChaCha8Rng::seed_from_u64(n as u64);
            let update = Update {
                values: (0..n)
                    .map(|_| (gen_values.random::<f32>() - 0.5) * 3.0)
                    .collect(),
                coord_weights: (0..m).map(|_| gen_values.random::<f32>() * 6.0).collect(),
                weight: 2.0,
            };
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
            let _ = rng.next_u32();
            let mut reference = rng.clone();
            let got = encode(&c, &update, &mut rng).unwrap();
            let mut expected: Vec<u64> = update
                .values
                .iter()
                .map(|&v| {
                    let x = f64::from(v).clamp(-1.0, 1.0);
                    (x * c.scale + reference.random::<f64>()).floor() as i64 as u64
                })
                .collect();
            let weights = update.coord_weights.iter().map(|&w| f64::from(w));
            for w in weights.chain([update.weight]) {
                let x = w.min(c.max_weight);
                expected.push(round(x * c.weight_scale, &mut reference) as u64);
            }
            let clipped_weights = update.coord_weights.iter().filter(|&&w| w > 5.0).count();
            assert!(m < 255 || clipped_weights > 0, "m = {m}: no weight clipped");
            let clipped = update.values.iter().filter(|v| v.abs() > 1.0).count() + clipped_weights;
            expected.push(clipped as u64);
            let want = RingVec::from_u64(c.modulus_bits, &expected);
            assert_eq!(got.vector, want, "n = {n}, m = {m}");
            assert_eq!(got.clipped(), clipped, "n = {n}, m = {m}");
            assert_eq!(
                rng.next_u64(),
                reference.next_u64(),
                "n = {n}, m = {m}: streams diverge"
            );
        }
    }

    #[test]
    fn seeded_rounding_draws_are_the_words_of_rand_chachas_chacha8() {
        // Batches shorter than a ChaCha block, across blocks and across many
        // of the cipher's parallel runs, one after the other.
        for seed in [0u64, 7, 1 << 40] {
            let mut generator = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            let mut draws = RoundingDraws::from_key(generator.get_seed());
            for len in [1usize, 3, 8, 256, 257, 4096, 1] {
                let mut got = vec![0u64; len];
                draws.fill_u64(&mut got);
                let want: Vec<u64> = (0..len).map(|_| generator.next_u64()).collect();
                assert_eq!(got, want, "seed {seed}, a batch of {len}");
            }
            assert_eq!(draws.next_draw(), generator.next_u64(), "seed {seed}");
        }
    }

    #[test]
    fn an_update_encodes_to_the_same_words_with_the_seeded_draws_as_with_rand_chacha() {
        // Values past several draw batches, coordinate weights and the
        // weight, in a 32-bit and a 64-bit ring.
        let mut gen_values = rand_chacha::ChaCha8Rng::seed_from_u64(21);
        let update = Update {
            values: (0..10_007)
                .map(|_| (gen_values.random::<f32>() - 0.5) * 3.0)
                .collect(),
            coord_weights: vec![0.5, 3.25, 7.0],
            weight: 4.5,
        };
        for bits in [32, 64] {
            let mut c = SecAggConfig::complete(update.values.len(), 3, 4, 1.0);
            c.modulus_bits = bits;
            c.scale = 1000.0;
            let mut generator = rand_chacha::ChaCha8Rng::seed_from_u64(5);
            let mut draws = RoundingDraws::from_key(generator.get_seed());
            let want = encode(&c, &update, &mut generator).unwrap();
            let got = encode(&c, &update, &mut draws).unwrap();
            assert_eq!(got, want, "{bits}-bit ring");
            assert_eq!(draws.next_draw(), generator.next_u64(), "{bits}-bit ring");
        }
    }

    type Batch<W> = fn(&[f32], &[u64], f64, f64, &mut [W], &mut usize) -> bool;

    /// The codes and clipped count one encoding loop gives (all finite).
    fn codes<W: Word>(
        f: Batch<W>,
        values: &[f32],
        draws: &[u64],
        clip: f32,
        scale: f64,
    ) -> (Vec<W>, usize) {
        let mut out = vec![W::default(); values.len()];
        let mut clipped = 0;
        assert!(f(
            values,
            draws,
            f64::from(clip),
            scale,
            &mut out,
            &mut clipped
        ));
        (out, clipped)
    }

    #[test]
    fn the_vectorised_loop_gives_the_codes_of_the_wide_one() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        let clip = 1.5f32;
        let mut values: Vec<f32> = vec![
            0.0,
            -0.0,
            clip,
            -clip,
            clip.next_up(),
            (-clip).next_down(),
            1e-30,
            -1e-30,
            f32::MIN_POSITIVE,
            -f32::MIN_POSITIVE,
            f32::MAX,
            f32::MIN,
            0.5,
            -0.5,
        ];
        values.extend((0..4_000).map(|_| (rng.random::<f32>() - 0.5) * 4.0));
        // At scale 1, 2^-53 plus the largest uniform (1 − 2^-53, whose last
        // bit is bit 11 of the draw) is exactly 1: a floor that lost that
        // bit would give 0.
        values.push(2f32.powi(-53));
        let mut draws: Vec<u64> = (0..values.len()).map(|_| rng.random()).collect();
        *draws.last_mut().unwrap() = u64::MAX;
        // Uniforms at both ends of [0, 1) and at bit 11's edges.
        draws[..6].copy_from_slice(&[0, u64::MAX, 1 << 11, (1 << 11) - 1, 1 << 12, 1 << 63]);
        // Scales of a small federation, of a large one, of the 2^64 ring,
        // and the largest the vectorised loop takes.
        let largest = (FAST_LIMIT - 1.0) / f64::from(clip) * 0.999_999;
        for scale in [1.0, 1000.0, 2f64.powi(30) / 3.0, 1.25e6, largest] {
            assert!(f64::from(clip) * scale + 1.0 < FAST_LIMIT);
            let wide = codes::<u64>(encode_batch_wide, &values, &draws, clip, scale);
            assert_eq!(codes(encode_batch, &values, &draws, clip, scale), wide);
            assert_eq!(
                codes::<u32>(encode_batch, &values, &draws, clip, scale),
                codes(encode_batch_wide, &values, &draws, clip, scale),
            );
            let clipped = 4 + values[14..].iter().filter(|v| v.abs() > clip).count();
            assert_eq!(wide.1, clipped, "scale {scale}");
        }
        // A non-finite value is reported by both.
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut v = values[..8].to_vec();
            v[5] = bad;
            let loops: [Batch<u32>; 2] = [encode_batch, encode_batch_wide];
            for f in loops {
                assert!(!f(&v, &draws[..8], 1.5, 1000.0, &mut [0u32; 8], &mut 0));
            }
        }
    }

    #[test]
    fn floor_without_libm_equals_floor_for_every_kind_of_value() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let mut values = vec![
            0.0,
            -0.0,
            0.5,
            -0.5,
            1.0,
            -1.0,
            -1.0 - f64::EPSILON,
            2f64.powi(52) + 0.5,
            -(2f64.powi(52)) - 0.5,
            2f64.powi(63),
            -(2f64.powi(63)),
            -(2f64.powi(64)),
            1e300,
            -1e300,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::NAN,
            f64::MIN_POSITIVE,
            -f64::MIN_POSITIVE,
        ];
        values.extend((0..100_000).map(|_| (rng.random::<f64>() - 0.5) * 2e9));
        for z in values {
            assert_eq!(floor_to_i64(z), z.floor() as i64, "{z}");
        }
    }

    #[test]
    fn clipping_is_counted_and_reported_as_a_fraction() {
        let c = config();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let u = Update {
            values: vec![0.5, 2.0, -3.0, 0.25],
            coord_weights: vec![2e6],
            weight: 7.0,
        };
        let e = encode(&c, &u, &mut rng).unwrap();
        assert_eq!(e.clipped(), 3);
        let d = DecodedSum::decode(&c, e.vector(), 1).unwrap();
        assert_eq!(d.clipped, 3);
        assert!((d.clipped_fraction() - 3.0 / 6.0).abs() < 1e-12);
        let warning = d.clipping_warning("--secagg-clip").unwrap();
        assert!(
            warning.starts_with("secure aggregation clipped 50.0 % ")
                && warning.ends_with("raise --secagg-clip"),
            "{warning}"
        );
        assert_eq!(clipping_warning(CLIPPED_WARNING, "x"), None);
        assert_eq!(d.values[1], 1.0);
        assert_eq!(d.values[2], -1.0);
        assert!((d.values[0] - 0.5).abs() <= 1e-3);
        assert_eq!(d.coord_weights, vec![1e6]);
        assert_eq!(d.weight, 7.0);
    }

    #[test]
    fn stochastic_rounding_is_unbiased() {
        let mut c = config();
        c.num_values = 1;
        c.num_coord_weights = 0;
        c.scale = 1.0;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let u = Update {
            values: vec![0.3],
            coord_weights: vec![],
            weight: 1.0,
        };
        let mean: f64 = (0..20_000)
            .map(|_| {
                DecodedSum::decode(&c, encode(&c, &u, &mut rng).unwrap().vector(), 1)
                    .unwrap()
                    .values[0]
            })
            .sum::<f64>()
            / 20_000.0;
        assert!((mean - 0.3).abs() < 0.01, "mean {mean}");
    }

    #[test]
    fn a_64_bit_ring_decodes_large_negative_values_and_carries_added_noise() {
        let mut c = config();
        c.modulus_bits = 64;
        c.clip = 1e12;
        c.scale = 1e6;
        c.validate(3).unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let big = -(2f32.powi(36)); // −6.9e10: its code −6.9e16 needs 57 bits
        let u = Update {
            values: vec![big, 3.0, 0.0, -0.5],
            coord_weights: vec![4.0],
            weight: 2.0,
        };
        let mut e = encode(&c, &u, &mut rng).unwrap();
        assert_eq!(e.vector().modulus_bits(), 64);
        e.add_noise(&[0, -2_000_000, 5, 0]).unwrap();
        let d = DecodedSum::decode(&c, e.vector(), 1).unwrap();
        assert_eq!(d.values[0], f64::from(big));
        assert_eq!(d.values[1], 1.0);
        assert_eq!(d.values[2], 5e-6);
        assert_eq!(d.values[3], -0.5);
        assert_eq!((d.coord_weights[0], d.weight), (4.0, 2.0));
        assert!(matches!(
            e.add_noise(&[1, 2]),
            Err(SecAggError::WrongLength { what: "noise", .. })
        ));
    }

    /// The overflow message gave the largest *scale* as the largest clip
    /// ("lower `scale` (or `clip`) to at most 9.2e-1" for a clip of 1e18
    /// whose limit was near 9e17): each bound it names now validates.
    #[test]
    fn a_clip_too_large_for_the_ring_names_a_clip_and_a_scale_that_fit() {
        let mut c = config();
        c.modulus_bits = 64;
        c.scale = 10.0;
        c.clip = 1e18;
        // config() has k = 2: three agents make the complete graph.
        let e = c.validate(3).unwrap_err().to_string();
        let bound = |name: &str| -> f64 {
            let at = e
                .find(&format!("`{name}` ("))
                .unwrap_or_else(|| panic!("{e}"));
            let rest = &e[at..];
            let start = rest.find("at most ").unwrap() + "at most ".len();
            rest[start..]
                .split([',', ' '])
                .next()
                .unwrap()
                .parse()
                .unwrap()
        };
        let (max_clip, max_scale) = (bound("clip"), bound("scale"));
        assert!(max_clip > 1e16 && max_clip < 1e18, "{e}");
        let mut fits = c.clone();
        fits.clip = (max_clip * 0.999) as f32;
        fits.validate(3).unwrap();
        let mut fits = c.clone();
        fits.scale = max_scale * 0.999;
        fits.validate(3).unwrap();
    }

    #[test]
    fn non_finite_values_are_refused_not_clipped() {
        let c = config();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let u = Update {
            values: vec![0.5, f32::NAN, 0.0, 0.0],
            coord_weights: vec![1.0],
            weight: 1.0,
        };
        assert!(matches!(
            encode(&c, &u, &mut rng),
            Err(SecAggError::NotFinite { index: 1, .. })
        ));
        // A weight that is not finite, or negative, is named by its index
        // in the encoded vector (values first).
        let bad_coord_weight = Update {
            values: vec![0.5, 0.0, 0.0, 0.0],
            coord_weights: vec![f32::INFINITY],
            weight: 1.0,
        };
        let negative_weight = Update {
            coord_weights: vec![1.0],
            weight: -1.0,
            ..bad_coord_weight.clone()
        };
        for (u, at) in [(bad_coord_weight, 4), (negative_weight, 5)] {
            match encode(&c, &u, &mut rng) {
                Err(SecAggError::NotFinite { index, .. }) => assert_eq!(index, at),
                other => panic!("expected NotFinite at {at}, got {other:?}"),
            }
        }
    }
}
