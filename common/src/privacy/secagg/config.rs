//! Protocol parameters and the checks that run before any key is generated:
//! graph degree, share threshold, fixed-point range and the modulus that the
//! sum of all encodings must fit in.

use serde::{Deserialize, Serialize};

use super::SecAggError;
use crate::kind::TaskKind;

/// Largest number of holders of one secret: Shamir over GF(256) has 255
/// non-zero evaluation points, and every holder needs its own.
pub const MAX_HOLDERS: usize = 255;

/// [`SecAggConfig::for_task`] uses the complete graph (plain SecAgg) up to
/// this many agents when no degree is configured, SecAgg+ above: a
/// complete graph of 64 costs each agent 64 mask streams, about what the
/// logarithmic degree costs at 2^32 agents, and for small rounds the privacy
/// of an input should rest on every other agent's mask.
pub const COMPLETE_GRAPH_UP_TO: usize = 64;

/// Bound on each statistics sum one agent sends (Σx or Σx² of one feature):
/// 2^44 ≈ 1.76e13, e.g. 10^5 rows of values up to 1.3e4 or 10^6 rows up to
/// 4.2e3. Telco's largest, Σ TotalCharges² over all 7043 rows, is 7.3e10.
/// Larger sums are clipped and counted ([`super::DecodedSum::clipped`]).
pub const STATS_CLIP: f32 = 17_592_186_044_416.0;

/// Smallest number of quantisation steps per `clip` a training round
/// accepts in the 32-bit ring (2^16, i.e. a resolution of clip/65536 per
/// agent); beyond it (more than 16 384 agents) the round moves to 2^64.
pub const MIN_STEPS_PER_CLIP: f64 = 65_536.0;

/// Parameters of one secure-aggregation round, shared by the server and every
/// agent (the coordinator sends them with the round).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SecAggConfig {
    /// Number of model values in each update.
    pub num_values: usize,
    /// Number of per-coordinate weights in each update (0 for uniform layouts).
    pub num_coord_weights: usize,
    /// Graph degree k: how many neighbours each agent masks with and shares its
    /// secrets with. Values ≥ n − 1 give the complete graph (plain SecAgg).
    /// k + 1 ≤ 255 because each secret is shared among the neighbours and the
    /// agent itself over GF(256).
    pub neighbours: usize,
    /// Shamir threshold t: how many of the k + 1 holders of an agent's secret
    /// must answer at unmask time. Must satisfy 2 ≤ t ≤ k + 1; t > (k + 1)/2
    /// is needed for the malicious-server guarantee.
    pub threshold: usize,
    /// Update values are clipped to [−clip, clip] before encoding.
    pub clip: f32,
    /// Fixed-point scale of values: a value x is encoded as ⌊x·scale + u⌋ with
    /// u uniform in [0, 1), so the quantisation step is 1/scale.
    pub scale: f64,
    /// Example weights and per-coordinate weights are clipped to [0, max_weight].
    pub max_weight: f64,
    /// Fixed-point scale of weights (1.0 encodes integer counts exactly).
    pub weight_scale: f64,
    /// Arithmetic is modulo 2^modulus_bits (8..=64). Masked vectors travel at
    /// ⌈modulus_bits/8⌉ bytes per coordinate.
    pub modulus_bits: u32,
    /// Run the malicious-server consistency check: agents sign the survivor
    /// list and refuse to reveal shares without t valid, matching signatures.
    pub verify_survivors: bool,
    /// Variance, in encoded units, of the noise one agent may add to each
    /// value coordinate (distributed differential privacy; 0 without noise).
    /// Only the sanity bound on the decoded sum uses it
    /// ([`super::DecodedSum::decode`]): it widens each value's bound by ten
    /// standard deviations of the summed noise.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub noise_variance: f64,
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

/// Smallest graph degree `neighbours` accepted for a sparse graph (one that
/// is not complete). The server learns every survivor's self mask, so it can
/// add the masked inputs of any group of survivors that is closed under the
/// graph's edges and cancel their pairwise masks: it learns each connected
/// part's sum. Degree 1 is a perfect matching (every pair's sum leaks); the
/// degree-k Harary graph stays connected until k agents drop or collude, so
/// degree 2 (a ring) splits after two dropouts. Four is the floor; SecAgg+'s
/// 2·⌈log2 n⌉ is the recommendation. A complete graph (k ≥ n − 1) is always
/// accepted.
pub const MIN_NEIGHBOURS: usize = 4;

/// The SecAgg+ degree for `n` agents: 2·⌈log2 n⌉ (the logarithmic degree of
/// Bell et al.), capped at n − 1, at least 1.
fn sparse_degree(n: usize) -> usize {
    let log = usize::BITS - n.max(2).saturating_sub(1).leading_zeros();
    (2 * log as usize).min(n.saturating_sub(1)).max(1)
}

impl SecAggConfig {
    /// Plain SecAgg (complete graph) for `n` agents with a majority threshold,
    /// values clipped to ±`clip` at a resolution that leaves room for the sum of
    /// `n` encodings in 32 bits. Adjust fields afterwards as needed.
    pub fn complete(num_values: usize, num_coord_weights: usize, n: usize, clip: f32) -> Self {
        let k = n.saturating_sub(1).clamp(1, MAX_HOLDERS - 1);
        Self::with_degree(num_values, num_coord_weights, n, k, clip)
    }

    /// SecAgg+ for `n` agents: degree 2·⌈log2 n⌉ (the logarithmic degree of
    /// Bell et al.), capped at n − 1, with a majority threshold.
    pub fn sparse(num_values: usize, num_coord_weights: usize, n: usize, clip: f32) -> Self {
        Self::with_degree(num_values, num_coord_weights, n, sparse_degree(n), clip)
    }

    /// The configuration of one round of a task — what every driver (the
    /// simulator, the gRPC coordinator) calls, so a task gets the same ring,
    /// graph and resolution whoever drives it.
    ///
    /// * Graph: `neighbours` if given (capped at n − 1), else the complete
    ///   graph up to [`COMPLETE_GRAPH_UP_TO`] agents and the SecAgg+ degree
    ///   2·⌈log2 n⌉ above; majority threshold ⌈k/2⌉ + 1.
    /// * [`TaskKind::Stats`]: the 2^64 ring, values clipped to
    ///   [`STATS_CLIP`] (`clip` is ignored: it bounds model deltas, not raw
    ///   sums), scale ⌊2^62 / (STATS_CLIP · n)⌋ = ⌊2^18 / n⌋. Each agent's Σx
    ///   and Σx² are quantised at 1/scale ≈ 3.8e-6 · n (unbiased), so a
    ///   summed coordinate is within n/scale ≈ 3.8e-6 · n² of the plaintext
    ///   sum, and the agreed mean E[x] within that divided by the total row
    ///   count: 4 agents, 5 634 Telco rows → 6.1e-5 on a sum, 1.1e-8 on a
    ///   mean, below the f32 rounding the plaintext path already applies.
    ///   Integer-valued sums (one-hot counts) are encoded exactly. Row
    ///   counts (the weight) up to 10^12 per agent.
    /// * [`TaskKind::Train`] / [`TaskKind::Evaluate`]: the 2^32 ring (4 bytes
    ///   per coordinate) with values clipped to ±`clip` at scale
    ///   ⌊2^30 / (n · clip)⌋; when that leaves fewer than
    ///   [`MIN_STEPS_PER_CLIP`] steps per clip, or 2^32 cannot hold n × the
    ///   largest weight or clipped count, the 2^64 ring at ⌊2^62 / (n · clip)⌋.
    pub fn for_task(
        kind: TaskKind,
        num_values: usize,
        num_coord_weights: usize,
        n: usize,
        clip: f32,
        neighbours: Option<usize>,
    ) -> Self {
        let k = match neighbours {
            Some(k) => k.min(n.saturating_sub(1)).max(1),
            None if n <= COMPLETE_GRAPH_UP_TO => n.saturating_sub(1).clamp(1, MAX_HOLDERS - 1),
            None => sparse_degree(n),
        };
        let mut c = Self::with_degree(num_values, num_coord_weights, n, k, clip);
        match kind {
            TaskKind::Stats => {
                c.widen(n);
                // Above 2^18 agents the scale would drop below 1: keep it at 1
                // and lower the clip instead.
                let room = 2f64.powi(62) / n.max(1) as f64;
                c.clip = STATS_CLIP.min(room as f32);
                c.fit_scale(n);
            }
            TaskKind::Train | TaskKind::Evaluate => {
                let steps = c.scale * f64::from(clip);
                if c.validate(n).is_err() || steps < MIN_STEPS_PER_CLIP {
                    c.widen(n);
                }
            }
        }
        c
    }

    /// Moves to the 2^64 ring: finest scale for n agents, weights up to 10^12.
    fn widen(&mut self, n: usize) {
        self.modulus_bits = 64;
        self.max_weight = 1.0e12;
        self.fit_scale(n);
    }

    fn with_degree(
        num_values: usize,
        num_coord_weights: usize,
        n: usize,
        k: usize,
        clip: f32,
    ) -> Self {
        let mut c = Self {
            num_values,
            num_coord_weights,
            neighbours: k,
            threshold: k.div_ceil(2) + 1,
            clip,
            scale: 1.0,
            max_weight: 1.0e6,
            weight_scale: 1.0,
            modulus_bits: 32,
            verify_survivors: false,
            noise_variance: 0.0,
        };
        c.fit_scale(n);
        c
    }

    /// Sets `scale` to the finest resolution that leaves a factor 2 of
    /// headroom below 2^(modulus_bits − 1) for the sum of `n` encodings:
    /// ⌊2^(modulus_bits − 2) / (n · clip)⌋, at least 1.
    pub fn fit_scale(&mut self, n: usize) {
        let room = (self.modulus_bits.clamp(2, 64) - 2) as i32;
        let n = n.max(1) as f64;
        let scale = (2f64.powi(room) / (n * f64::from(self.clip.max(f32::MIN_POSITIVE)))).floor();
        self.scale = scale.max(1.0);
    }

    /// Length of the masked vector: values ‖ coordinate weights ‖ example
    /// weight ‖ clipped-coordinate count.
    pub fn vector_len(&self) -> usize {
        self.num_values + self.num_coord_weights + 2
    }

    /// The degree actually used with `n` agents.
    pub fn degree(&self, n: usize) -> usize {
        self.neighbours.min(n.saturating_sub(1))
    }

    /// Bit mask of the modulus (2^bits − 1).
    pub(crate) fn modulus_mask(&self) -> u64 {
        super::ring::mask_u64(self.modulus_bits)
    }

    /// Bytes per masked coordinate on the wire: ⌈modulus_bits/8⌉.
    pub fn bytes_per_element(&self) -> usize {
        super::ring::bytes_per_element(self.modulus_bits)
    }

    /// Largest magnitude of one encoded value: ⌈clip·scale⌉ (stochastic
    /// rounding can round up to it). Saturates rather than wraps.
    pub(crate) fn max_value_code(&self) -> u128 {
        (f64::from(self.clip) * self.scale).ceil() as u128
    }

    /// Largest encoded weight: ⌈max_weight·weight_scale⌉.
    pub(crate) fn max_weight_code(&self) -> u128 {
        (self.max_weight * self.weight_scale).ceil() as u128
    }

    /// Checks every parameter for a round with `n` agents, before any work is
    /// done: the sum of `n` encodings must not wrap the modulus (it would
    /// decode to garbage without any error), and the graph and threshold must
    /// be realisable. Errors name the parameter to change.
    pub fn validate(&self, n: usize) -> Result<(), SecAggError> {
        let bad = |parameter: &'static str, message: String| {
            Err(SecAggError::Config { parameter, message })
        };
        if n < 2 {
            return bad(
                "participants",
                format!("secure aggregation needs at least 2 agents, got {n}"),
            );
        }
        if !(8..=64).contains(&self.modulus_bits) {
            return bad(
                "modulus_bits",
                format!("{} is outside 8..=64", self.modulus_bits),
            );
        }
        if !(self.clip.is_finite() && self.clip > 0.0) {
            return bad("clip", format!("{} must be finite and positive", self.clip));
        }
        if !(self.scale.is_finite() && self.scale > 0.0) {
            return bad(
                "scale",
                format!("{} must be finite and positive", self.scale),
            );
        }
        if !(self.max_weight.is_finite() && self.max_weight > 0.0) {
            return bad(
                "max_weight",
                format!("{} must be finite and positive", self.max_weight),
            );
        }
        if !(self.weight_scale.is_finite() && self.weight_scale > 0.0) {
            return bad(
                "weight_scale",
                format!("{} must be finite and positive", self.weight_scale),
            );
        }
        if !(self.noise_variance.is_finite() && self.noise_variance >= 0.0) {
            return bad(
                "noise_variance",
                format!("{} must be finite and >= 0", self.noise_variance),
            );
        }
        let k = self.degree(n);
        if k == 0 {
            return bad("neighbours", "must be at least 1".into());
        }
        if k < n - 1 && k < MIN_NEIGHBOURS {
            return bad(
                "neighbours",
                format!(
                    "k = {k} with {n} agents is a sparse graph below the minimum degree \
                     {MIN_NEIGHBOURS}: the server could learn the sums of small groups of agents \
                     (k = 1 pairs them up); use at least {MIN_NEIGHBOURS}, or the complete graph"
                ),
            );
        }
        if k + 1 > MAX_HOLDERS {
            return bad(
                "neighbours",
                format!(
                    "k = {k} gives {} share holders; GF(256) Shamir allows at most {MAX_HOLDERS}",
                    k + 1
                ),
            );
        }
        if self.threshold < 2 || self.threshold > k + 1 {
            return bad(
                "threshold",
                format!(
                    "t = {} must be in 2..={} (k + 1 holders with k = {k})",
                    self.threshold,
                    k + 1
                ),
            );
        }
        // u128 throughout: at 64 bits the bounds themselves need 64 bits and
        // their products with n need more.
        let bits = self.modulus_bits;
        let signed_room = (1u128 << (bits - 1)) - 1;
        let unsigned_room = (1u128 << bits) - 1;
        let n128 = n as u128;
        let vmax = self.max_value_code();
        if vmax.saturating_mul(n128) > signed_room {
            return bad(
                "scale",
                format!(
                    "{n} agents × max encoded value ⌈clip·scale⌉ = {vmax} exceeds 2^{} − 1 = {signed_room}: \
                     the sum could wrap the modulus; lower `clip` ({}) to at most {:.6e}, or \
                     `scale` ({}) to at most {:.6e}, or raise `modulus_bits`",
                    bits - 1,
                    self.clip,
                    (signed_room / n128) as f64 / self.scale,
                    self.scale,
                    (signed_room / n128) as f64 / f64::from(self.clip)
                ),
            );
        }
        let wmax = self.max_weight_code();
        if wmax.saturating_mul(n128) > unsigned_room {
            return bad(
                "max_weight",
                format!(
                    "{n} agents × max encoded weight ⌈max_weight·weight_scale⌉ = {wmax} exceeds 2^{bits} − 1: \
                     lower `max_weight` or `weight_scale` (at most {} encoded units per agent), or raise `modulus_bits`",
                    unsigned_room / n128
                ),
            );
        }
        let len = self.vector_len() as u128;
        if len.saturating_mul(n128) > unsigned_room {
            return bad(
                "modulus_bits",
                format!(
                    "the clipped-coordinate count of {n} agents × {len} coordinates does not fit 2^{bits}"
                ),
            );
        }
        Ok(())
    }
}
