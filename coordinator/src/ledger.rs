//! The privacy ledger of a run: the coordinator's side of DP-FedAvg.
//!
//! Each training round the ledger tells the agents the clip norm (and, in
//! distributed mode, their share of the noise) through the task's
//! [`DpTask`]; at the end of the round it turns the sum of the clipped,
//! weight-1 updates into the noised step, moves the adaptive clip, composes
//! the round into the RDP [`Accountant`] and writes a [`PrivacyRecord`] into
//! the round record. Replaying those records rebuilds the ledger exactly, so
//! a restarted coordinator continues the same ε history (the noise itself is
//! fresh: see *Noise*).
//!
//! # The estimator and its sensitivity
//!
//! Every selected merchant sends its delta clipped to L2 norm `C` with weight
//! 1 (see `fedcart_common::privacy::dp::clip`). The released step is
//! `(Σ clipped deltas + noise) / m`, where the **fixed denominator** `m` is
//! the number of merchants *selected* for the round — the expected number of
//! participants, fixed before any data is touched — not the number that
//! reported (McMahan et al. 2018's fixed-denominator estimator). Adding or
//! removing one merchant then moves the released sum by at most `C`, and the
//! denominator reveals nothing. A round with dropouts is damped by
//! reported / selected rather than re-weighted.
//!
//! # Noise
//!
//! Central noise (the Gaussian on the sum and the noise on the clip-bit count
//! of adaptive clipping) comes from a ChaCha20 stream seeded from the OS
//! CSPRNG for every release ([`NoiseSource::Os`]). It must not derive from
//! the run seed: every agent receives the seed in each task spec and could
//! regenerate and subtract the noise. Only the simulator uses
//! [`NoiseSource::SeededNotPrivate`], and labels its reports so.
//!
//! # Accounting
//!
//! Every round is composed at sampling rate `q = 1`
//! ([`ACCOUNTED_SAMPLING_RATE`]): the cohort is drawn from the public run
//! seed and published in the round records, so subsampling amplifies
//! nothing. A released sum is accounted whether or not its round commits (a
//! revealed secure sum that cannot be committed is accounted, and the run
//! stops; a sum whose unmask requests left before the coordinator stopped is
//! accounted when it restarts, `engine::unmask`). With `target_epsilon` the engine stops the run before a round that
//! could take ε above the target, assuming in distributed mode that it
//! commits with only `run.quorum` survivors; the target's `z` is solved for
//! that worst case over the planned cohort (`DpSettings::noise_multiplier`),
//! so the planned rounds fit unless more agents are selected than planned.
//!
//! Approximations that remain, with their direction:
//! - Distributed mode analyses the sum of the agents' Skellam shares as a
//!   Gaussian of the same variance. Skellam's RDP exceeds the Gaussian's by a
//!   term that vanishes as the variance grows (Agarwal et al. 2021): ε is
//!   slightly **under**-stated, negligibly at the scales `distributed_noise`
//!   picks.
//! - Fixed-size versus Poisson sampling does not arise at `q = 1`. If a
//!   secret selection ever restores `q < 1`, accounting a fixed-size cohort
//!   as Poisson sampling under-states ε slightly (and the fixed denominator
//!   assumes add/remove adjacency).
//! - Dropouts in distributed mode are accounted exactly (`z·√(k/m)`), after
//!   the fact; the pre-round budget check uses the worst case.
//!
//! The one-off feature-statistics step of churn models and the reported
//! training/evaluation metrics are outside the guarantee.

use fedcart_common::federation::aggregate::SumAccumulator;
use fedcart_common::privacy::dp::distributed::max_scale;
use fedcart_common::privacy::dp::{
    Accountant, AdaptiveClip, CentralGaussian, DistributedNoise, DistributedSkellam, DpError,
    DpTask,
};
use fedcart_common::task::TaskKind;

use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

use crate::config::{ClipNorm, DpMode, DpSettings, RunConfig};
pub use crate::record::PrivacyRecord;
use crate::record::RoundRecord;
use crate::task::TaskPlan;

/// Where the coordinator's noise (the Gaussian on the sum, and the noise on
/// the clip-bit count of adaptive clipping) comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NoiseSource {
    /// A ChaCha20 stream seeded from the operating system's CSPRNG for every
    /// release. The only private choice, and the service's: the run seed is
    /// sent to every agent in each task spec, so noise derived from it could
    /// be regenerated and subtracted by any merchant.
    #[default]
    Os,
    /// Derived from the run seed and the task id, so that a simulation
    /// replays bit for bit. **Not private**: anyone who knows the seed
    /// removes the noise. For the simulator's experiments only.
    SeededNotPrivate,
}

impl NoiseSource {
    /// How reports label the source.
    pub fn label(self) -> &'static str {
        match self {
            Self::Os => "os csprng (fresh per release)",
            Self::SeededNotPrivate => "seeded (reproducible simulation, not private)",
        }
    }
}

/// The coordinator's DP state for one run.
#[derive(Debug, Clone)]
pub struct Ledger {
    settings: DpSettings,
    /// Where the noise comes from (the OS unless a simulation asks).
    noise: NoiseSource,
    /// Overall noise multiplier `z` (what the accountant is told).
    z: f64,
    /// Noise multiplier of the delta sum (`z` without adaptive clipping).
    z_delta: f64,
    /// Std of the noise on the clip-bit sum (adaptive clipping).
    sigma_b: f64,
    adaptive: Option<AdaptiveClip>,
    clip: f64,
    accountant: Accountant,
    epsilon: Option<f64>,
}

impl Ledger {
    /// The ledger of `run` after replaying `history` (a restart).
    pub fn open(
        settings: &DpSettings,
        run: &RunConfig,
        history: &[RoundRecord],
    ) -> Result<Self, String> {
        let z = settings.noise_multiplier(run).map_err(|e| e.to_string())?;
        let (adaptive, z_delta, sigma_b, clip) = match settings.clip {
            ClipNorm::Fixed(c) => (None, z, 0.0, c),
            ClipNorm::Adaptive => {
                let sigma_b = settings.count_noise_std(run, z);
                let a = AdaptiveClip::new(
                    settings.initial_clip,
                    settings.target_quantile,
                    settings.clip_learning_rate,
                    sigma_b,
                )
                .map_err(|e| e.to_string())?;
                let z_delta =
                    AdaptiveClip::delta_noise_multiplier(z, sigma_b).map_err(|e| e.to_string())?;
                (Some(a), z_delta, sigma_b, settings.initial_clip)
            }
        };
        let mut ledger = Self {
            settings: settings.clone(),
            noise: NoiseSource::Os,
            z,
            z_delta,
            sigma_b,
            adaptive,
            clip,
            accountant: Accountant::new(),
            epsilon: None,
        };
        // Every record with a privacy entry released a sum: the committed
        // rounds, and a revealed secure sum that could not be committed.
        for r in history {
            if let (Some(p), TaskKind::Train) = (&r.privacy, r.kind) {
                ledger
                    .accountant
                    .step(p.sampling_rate, p.noise_multiplier)
                    .map_err(|e| e.to_string())?;
                ledger.set_clip(p.next_clip).map_err(|e| e.to_string())?;
                ledger.epsilon = Some(p.epsilon);
            }
        }
        Ok(ledger)
    }

    fn set_clip(&mut self, clip: f64) -> Result<(), DpError> {
        self.clip = clip;
        if self.adaptive.is_some() {
            let s = &self.settings;
            self.adaptive = Some(AdaptiveClip::new(
                clip,
                s.target_quantile,
                s.clip_learning_rate,
                self.sigma_b,
            )?);
        }
        Ok(())
    }

    /// Where the noise comes from.
    pub fn noise_source(&self) -> NoiseSource {
        self.noise
    }

    /// Chooses where the noise comes from; [`NoiseSource::Os`] unless a
    /// simulation wants reproducible (and therefore not private) noise.
    pub fn set_noise_source(&mut self, source: NoiseSource) {
        self.noise = source;
    }

    /// The noise multiplier every round is planned at.
    pub fn noise_multiplier(&self) -> f64 {
        self.z
    }

    /// The current clip norm.
    pub fn clip(&self) -> f64 {
        self.clip
    }

    /// ε spent so far (None before the first committed round).
    pub fn epsilon(&self) -> Option<f64> {
        self.epsilon
    }

    /// ε spent so far and the most ε can be after one more training round
    /// of `selected` merchants that commits with at least `quorum` of them:
    /// the budget check made before a round starts. In distributed mode each
    /// dropout removes its share of the noise, so the worst case is a round
    /// that commits with only `quorum` survivors (`z·√(quorum / selected)`).
    pub fn epsilon_if_one_more_round(
        &self,
        selected: usize,
        quorum: usize,
    ) -> Result<(f64, f64), DpError> {
        let delta = self.settings.delta;
        let spent = match self.accountant.steps() {
            0 => 0.0,
            _ => self.accountant.epsilon(delta)?.epsilon,
        };
        let z = match self.settings.mode {
            DpMode::Central => self.z,
            DpMode::Distributed => {
                let m = selected.max(1);
                self.z * (quorum.clamp(1, m) as f64 / m as f64).sqrt()
            }
        };
        let mut next = self.accountant.clone();
        next.step(ACCOUNTED_SAMPLING_RATE, z)?;
        Ok((spent, next.epsilon(delta)?.epsilon))
    }

    /// The settings in force.
    pub fn settings(&self) -> &DpSettings {
        &self.settings
    }

    /// The DP instructions of a training task with `selected` merchants and
    /// a model of `model_len` values.
    pub fn task(&self, selected: usize, model_len: usize) -> Result<DpTask, DpError> {
        let clip_bit = self.adaptive.is_some();
        let distributed = match self.settings.mode {
            DpMode::Central => None,
            DpMode::Distributed => Some(self.distributed_noise(selected, model_len)?),
        };
        Ok(DpTask {
            clip: self.clip,
            clip_bit,
            distributed,
        })
    }

    fn distributed_noise(
        &self,
        selected: usize,
        model_len: usize,
    ) -> Result<DistributedNoise, DpError> {
        let value_clip = if self.adaptive.is_some() {
            self.clip.max(0.5)
        } else {
            self.clip
        };
        // An f32 clip no smaller than the f64 one, so nothing within C is cut.
        let mut secagg_clip = value_clip as f32;
        if f64::from(secagg_clip) < value_clip {
            secagg_clip *= 1.0 + f32::EPSILON;
        }
        // The 2^32 ring when its scale keeps the rounding term √d of the
        // sensitivity below 1% of s·C; otherwise 2^64, with the scale capped
        // so that each agent's Skellam variance stays far inside the Poisson
        // sampler's range (1.8e19).
        let sqrt_d = (model_len as f64).sqrt();
        let scale_for = |bits| {
            max_scale(
                bits,
                selected,
                self.clip,
                f64::from(secagg_clip),
                self.z_delta,
                self.sigma_b,
                model_len,
            )
        };
        let (modulus_bits, scale) = match scale_for(32) {
            Ok(s) if s * self.clip >= 100.0 * sqrt_d => (32, s),
            _ => {
                let cap = ((1e9 * (selected.max(1) as f64).sqrt() / self.z_delta.max(1e-9)
                    - sqrt_d)
                    / f64::from(secagg_clip))
                .floor();
                (64, scale_for(64)?.min(cap).max(1.0))
            }
        };
        let skellam =
            DistributedSkellam::new(self.z_delta, self.clip, scale, model_len, selected.max(1))?;
        let bit_variance = if self.adaptive.is_some() {
            (self.sigma_b * scale).powi(2) / selected.max(1) as f64
        } else {
            0.0
        };
        Ok(DistributedNoise {
            skellam,
            bit_variance,
            secagg_clip,
            modulus_bits,
        })
    }

    /// Releases the round: noise (central mode), the fixed-denominator step
    /// of the model's length, the clip update and the accounting. `sum` holds
    /// the clipped updates of the `survivors` merchants whose inputs it
    /// contains, out of `plan.selected`. The noise comes from the
    /// [`NoiseSource`]; `seed` (the run seed) is used only by the seeded,
    /// simulation-only source.
    pub fn release(
        &mut self,
        sum: &SumAccumulator,
        plan: &TaskPlan,
        survivors: usize,
        seed: u64,
    ) -> Result<(Vec<f32>, PrivacyRecord), DpError> {
        match self.noise {
            NoiseSource::Os => {
                let mut os = rand::rand_core::UnwrapErr(rand::rngs::SysRng);
                let mut rng = ChaCha20Rng::from_rng(&mut os);
                self.release_with(sum, plan, survivors, &mut rng)
            }
            NoiseSource::SeededNotPrivate => {
                let mut rng = fedcart_common::seed::rng(seed, &["dp-noise", &plan.task_id]);
                self.release_with(sum, plan, survivors, &mut rng)
            }
        }
    }

    fn release_with<R: rand::Rng>(
        &mut self,
        sum: &SumAccumulator,
        plan: &TaskPlan,
        survivors: usize,
        rng: &mut R,
    ) -> Result<(Vec<f32>, PrivacyRecord), DpError> {
        let m = plan.selected.len().max(1);
        let model_len = plan.spec.model.model_len();
        let mut values = sum.sum_values().to_vec();
        if self.settings.mode == DpMode::Central {
            CentralGaussian::new(self.z_delta, self.clip)?
                .add_to_sum(&mut values[..model_len], rng);
        }
        let z_accounted = self.z_accounted(survivors, m);
        let step: Vec<f32> = values[..model_len]
            .iter()
            .map(|v| (v / m as f64) as f32)
            .collect();
        let used_clip = self.clip;
        let mut unclipped_fraction = None;
        if let Some(a) = &mut self.adaptive {
            let bit_sum = values.get(model_len).copied().unwrap_or(0.0);
            let fraction = match self.settings.mode {
                DpMode::Central => a.update(bit_sum, m as f64, rng)?,
                DpMode::Distributed => a.update_noised(bit_sum, m as f64)?,
            };
            unclipped_fraction = Some(fraction);
            self.clip = a.clip();
        }
        let record = self.step(z_accounted, used_clip, m, unclipped_fraction)?;
        Ok((step, record))
    }

    /// Accounts a training round whose secure sum was unmasked and then
    /// refused (out of the round's bounds): nothing is released, but the
    /// sum, with the agents' noise in it, was seen. The clip stays as it was.
    pub fn account_revealed(
        &mut self,
        plan: &TaskPlan,
        survivors: usize,
    ) -> Result<PrivacyRecord, DpError> {
        self.account_seen(survivors, plan.selected.len())
    }

    /// Accounts a sum of `survivors` inputs out of `selected` merchants that
    /// may have been seen without a record of it: a coordinator stopped after
    /// its unmask requests left and before the round's record was written
    /// (see `engine::unmask`). Accounted as [`Ledger::account_revealed`]
    /// accounts a sum seen and refused: the retry adds fresh noise to the
    /// same inputs, a second release.
    pub fn account_seen(
        &mut self,
        survivors: usize,
        selected: usize,
    ) -> Result<PrivacyRecord, DpError> {
        let m = selected.max(1);
        let z_accounted = self.z_accounted(survivors, m);
        self.step(z_accounted, self.clip, m, None)
    }

    /// The noise multiplier a round of `survivors` out of `m` selected is
    /// accounted at: z centrally; in distributed mode each survivor added
    /// 1/m of the variance, so z·√(survivors / m).
    fn z_accounted(&self, survivors: usize, m: usize) -> f64 {
        match self.settings.mode {
            DpMode::Central => self.z,
            DpMode::Distributed => self.z * (survivors.min(m) as f64 / m as f64).sqrt(),
        }
    }

    /// One accounted round and its record.
    fn step(
        &mut self,
        z_accounted: f64,
        used_clip: f64,
        m: usize,
        unclipped_fraction: Option<f64>,
    ) -> Result<PrivacyRecord, DpError> {
        let q = ACCOUNTED_SAMPLING_RATE;
        self.accountant.step(q, z_accounted)?;
        let eps = self.accountant.epsilon(self.settings.delta)?;
        self.epsilon = Some(eps.epsilon);
        Ok(PrivacyRecord {
            mode: self.settings.mode,
            sampling_rate: q,
            noise_multiplier: z_accounted,
            clip: used_clip,
            denominator: m,
            unclipped_fraction,
            next_clip: self.clip,
            epsilon: eps.epsilon,
            delta: self.settings.delta,
            steps: self.accountant.steps(),
        })
    }
}

/// The sampling rate every round is accounted at (defined beside the DP
/// settings, which plan the noise with it).
pub use crate::config::dp::ACCOUNTED_SAMPLING_RATE;

#[cfg(test)]
mod tests;
