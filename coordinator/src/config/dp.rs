//! The `[run.dp]` section: merchant-level differential privacy of a run
//! (DP-FedAvg), validated once with errors naming the field.
//!
//! ```toml
//! [run.dp]
//! clip = 0.5            # L2 clip norm C of each merchant's delta, or "adaptive"
//! target_epsilon = 4.0  # or noise_multiplier = 1.1
//! delta = 1e-5
//! mode = "central"      # or "distributed" (needs [run.secagg])
//! population = 1000     # merchants in the federation (for the sampling rate)
//! ```

use fedcart_common::privacy::dp::accountant::DEFAULT_SIGMA_TOLERANCE;
use fedcart_common::privacy::dp::{AdaptiveClip, solve_noise_multiplier};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The sampling rate every round is accounted at: 1, whatever fraction of
/// the connected agents the cohort is. Amplification by
/// subsampling needs a selection the adversary cannot see, and ours is
/// neither secret nor unpredictable: it is derived from the run seed (sent
/// to every agent) and the task id, and published in every round record.
pub const ACCOUNTED_SAMPLING_RATE: f64 = 1.0;

use super::{ConfigError, RunConfig};

/// Who adds the noise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DpMode {
    /// The coordinator adds Gaussian noise to the sum (it is trusted to see
    /// the un-noised sum, e.g. of a secure aggregation).
    #[default]
    Central,
    /// Each agent adds its share of Skellam noise to its fixed-point input
    /// before secure-aggregation masking; nobody sees an un-noised sum.
    Distributed,
}

/// The clip norm: a fixed `C`, or adaptive (a private quantile estimate).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ClipNorm {
    /// A fixed L2 clip norm.
    Fixed(f64),
    /// Follow the `target_quantile` of the merchants' delta norms, starting
    /// from `initial_clip`.
    Adaptive,
}

impl Serialize for ClipNorm {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Fixed(c) => s.serialize_f64(*c),
            Self::Adaptive => s.serialize_str("adaptive"),
        }
    }
}

impl<'de> Deserialize<'de> for ClipNorm {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Num(f64),
            Str(String),
        }
        match Raw::deserialize(d)? {
            Raw::Num(c) => Ok(Self::Fixed(c)),
            Raw::Str(s) if s == "adaptive" => Ok(Self::Adaptive),
            Raw::Str(s) => Err(serde::de::Error::custom(format!(
                "clip `{s}` is neither a number nor \"adaptive\""
            ))),
        }
    }
}

impl std::str::FromStr for ClipNorm {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "adaptive" {
            return Ok(Self::Adaptive);
        }
        s.parse::<f64>()
            .map(Self::Fixed)
            .map_err(|_| format!("`{s}` is neither a clip norm nor `adaptive`"))
    }
}

/// Merchant-level DP settings of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpSettings {
    /// L2 clip norm of each merchant's per-example delta, or `"adaptive"`.
    pub clip: ClipNorm,
    /// Noise std divided by the clip norm; give this or `target_epsilon`.
    #[serde(default)]
    pub noise_multiplier: Option<f64>,
    /// Solve the noise multiplier up front so that ε after `rounds` rounds
    /// (accounted at sampling rate 1) is at most this; the run stops before
    /// a round that could exceed it.
    #[serde(default)]
    pub target_epsilon: Option<f64>,
    /// δ of the (ε, δ) guarantee; keep it below 1 / population.
    pub delta: f64,
    /// Who adds the noise.
    #[serde(default)]
    pub mode: DpMode,
    /// Number of merchants in the federation, for the planned cohort (the
    /// default adaptive-clip count noise). ε is accounted at sampling rate 1
    /// whatever the cohort (the selection is public: see
    /// `ACCOUNTED_SAMPLING_RATE`), and so is `target_epsilon`.
    #[serde(default)]
    pub population: Option<usize>,
    /// Adaptive clipping: the first clip norm.
    #[serde(default = "initial_clip")]
    pub initial_clip: f64,
    /// Adaptive clipping: the quantile of delta norms to track.
    #[serde(default = "half")]
    pub target_quantile: f64,
    /// Adaptive clipping: the geometric learning rate η.
    #[serde(default = "clip_lr")]
    pub clip_learning_rate: f64,
    /// Adaptive clipping: std of the noise on the sum of clip bits [default:
    /// max(expected cohort / 20, noise multiplier), Andrew et al.'s m/20
    /// raised so that the delta noise stays within 16% of the total].
    #[serde(default)]
    pub count_noise_std: Option<f64>,
}

fn initial_clip() -> f64 {
    0.1
}
fn half() -> f64 {
    0.5
}
fn clip_lr() -> f64 {
    0.2
}

impl DpSettings {
    /// Settings with a fixed clip and noise multiplier, central mode.
    pub fn central(clip: f64, noise_multiplier: f64, delta: f64) -> Self {
        Self {
            clip: ClipNorm::Fixed(clip),
            noise_multiplier: Some(noise_multiplier),
            target_epsilon: None,
            delta,
            mode: DpMode::Central,
            population: None,
            initial_clip: initial_clip(),
            target_quantile: half(),
            clip_learning_rate: clip_lr(),
            count_noise_std: None,
        }
    }

    /// The sampling rate the plan assumes: `⌈fraction·population⌉` clamped to
    /// the selection bounds, over the population; `fraction` without one.
    pub fn planned_sampling_rate(&self, run: &RunConfig) -> f64 {
        let sel = &run.selection;
        match self.population {
            Some(p) if p > 0 => {
                let want = ((p as f64 * sel.fraction).ceil() as usize)
                    .clamp(sel.min_agents, sel.max_agents)
                    .min(p);
                want as f64 / p as f64
            }
            _ => sel.fraction,
        }
    }

    /// The expected cohort the plan assumes (for the default count noise).
    pub fn planned_cohort(&self, run: &RunConfig) -> f64 {
        match self.population {
            Some(p) if p > 0 => self.planned_sampling_rate(run) * p as f64,
            _ => run.selection.min_agents as f64,
        }
    }

    /// The noise multiplier `z` to account each round with: as configured,
    /// or solved for `target_epsilon` over `run.rounds` rounds.
    ///
    /// In distributed mode a round's noise is the survivors' shares, and the
    /// budget check before each round assumes the worst, a commit with only
    /// `run.quorum` of the selected agents (`z·√(quorum / selected)`). A
    /// target is therefore solved for that worst case over the planned
    /// cohort ([`Self::planned_cohort`]): `z` is the solved multiplier times
    /// `√(cohort / quorum)`, so every planned round passes the check (it did
    /// not: the last one was always refused when quorum < cohort). Rounds
    /// with more survivors are accounted at their larger multiplier.
    pub fn noise_multiplier(&self, run: &RunConfig) -> Result<f64, ConfigError> {
        if let Some(z) = self.noise_multiplier {
            return Ok(z);
        }
        let target = self.target_epsilon.unwrap_or(f64::NAN);
        // Rounds are accounted without amplification by subsampling (the
        // selection is public: see `ACCOUNTED_SAMPLING_RATE`).
        let q = ACCOUNTED_SAMPLING_RATE;
        let z = solve_noise_multiplier(
            target,
            self.delta,
            q,
            run.rounds.max(1),
            DEFAULT_SIGMA_TOLERANCE,
        )
        .map(|s| s.noise_multiplier)
        .map_err(|e| ConfigError::Invalid {
            field: "run.dp.target_epsilon",
            message: e.to_string(),
        })?;
        Ok(match self.mode {
            DpMode::Central => z,
            DpMode::Distributed => {
                let cohort = self.planned_cohort(run).ceil().max(1.0);
                let worst = (run.quorum.max(1) as f64).min(cohort);
                z * (cohort / worst).sqrt()
            }
        })
    }

    /// What the operator should hear when a fixed `noise_multiplier` takes
    /// the run's planned rounds past ε = 10 (without a `target_epsilon` to
    /// stop it): the ε it reaches, and what to change. ε is computed as the
    /// ledger accounts a round (sampling rate 1, central noise; distributed
    /// rounds with dropouts reach more).
    pub fn weak_guarantee_warning(&self, run: &RunConfig) -> Option<String> {
        const WEAK: f64 = 10.0;
        if self.target_epsilon.is_some() {
            return None;
        }
        let z = self.noise_multiplier?;
        let eps = fedcart_common::privacy::dp::accountant::epsilon_for(
            ACCOUNTED_SAMPLING_RATE,
            z,
            run.rounds.max(1),
            self.delta,
        )
        .ok()?
        .epsilon;
        (eps > WEAK).then(|| {
            format!(
                "run.dp: noise_multiplier {z} over {} rounds reaches ε = {eps:.3e} at δ = {:e}, \
                 above {WEAK}: a guarantee this weak bounds little in practice; raise \
                 noise_multiplier, or set target_epsilon to stop the run at a budget",
                run.rounds, self.delta
            )
        })
    }

    /// Std of the noise on the sum of clip bits (adaptive clipping).
    pub fn count_noise_std(&self, run: &RunConfig, z: f64) -> f64 {
        self.count_noise_std
            .unwrap_or_else(|| (self.planned_cohort(run) / 20.0).max(z))
    }

    /// Checks every field, naming it; `run` supplies the context (strategy,
    /// secure aggregation, rounds).
    pub fn validate(&self, run: &RunConfig) -> Result<(), ConfigError> {
        let bad = |field, message: String| Err(ConfigError::Invalid { field, message });
        match self.clip {
            ClipNorm::Fixed(c) if !(c.is_finite() && c > 0.0) => {
                return bad("run.dp.clip", format!("{c} must be finite and > 0"));
            }
            // 1e-300 is 0 as the f32 the updates are clipped in: every
            // update and all the noise vanish, and the run reported its ε as
            // if it had trained.
            // 1e36 was taken: the noise σ·C (1e38) filled the f32 model
            // with near-infinite values, and the run then blamed the
            // merchants' learning rate for the divergence.
            ClipNorm::Fixed(c) if c > fedcart_common::data::standardize::MAX_FEATURE_MAGNITUDE => {
                return bad(
                    "run.dp.clip",
                    format!(
                        "{c:e} is above 1e15: it bounds a merchant's whole update, whose norm is \
                         rarely above a few units, and the noise it scales (noise_multiplier × \
                         clip) would overflow the 32-bit model; use `adaptive`, or a clip near \
                         the updates' norm"
                    ),
                );
            }
            ClipNorm::Fixed(c) if (c as f32) < f32::MIN_POSITIVE => {
                return bad(
                    "run.dp.clip",
                    format!(
                        "{c:e} is below the smallest normal 32-bit number ({:e}): every clipped \
                         update would be 0 and the model would never move",
                        f32::MIN_POSITIVE
                    ),
                );
            }
            _ => {}
        }
        if !(self.delta > 0.0 && self.delta < 1.0) {
            return bad("run.dp.delta", format!("{} is not in (0, 1)", self.delta));
        }
        match (self.noise_multiplier, self.target_epsilon) {
            (Some(_), Some(_)) | (None, None) => {
                return bad(
                    "run.dp.noise_multiplier",
                    "give exactly one of noise_multiplier and target_epsilon".into(),
                );
            }
            (Some(z), None) if !(z.is_finite() && z > 0.0) => {
                return bad(
                    "run.dp.noise_multiplier",
                    format!("{z} must be finite and > 0"),
                );
            }
            (None, Some(e)) if !(e.is_finite() && e > 0.0) => {
                return bad(
                    "run.dp.target_epsilon",
                    format!("{e} must be finite and > 0"),
                );
            }
            _ => {}
        }
        if self.population == Some(0) {
            return bad("run.dp.population", "must be ≥ 1".into());
        }
        // Each round selects at least min_agents merchants: a smaller
        // federation would overstate the sampling amplification.
        if let Some(p) = self.population
            && p < run.selection.min_agents
        {
            return bad(
                "run.dp.population",
                format!(
                    "{p} is fewer than selection.min_agents ({}): every round selects at least \
                     that many merchants, so the federation holds at least as many",
                    run.selection.min_agents
                ),
            );
        }
        // δ is the chance the guarantee fails outright: past 1 % it is no
        // guarantee whatever the federation's size (a federation of one
        // merchant passed the 1/n check below with δ = 0.9, at ε 0).
        if let Some(why) = fedcart_common::privacy::dp::delta_above_max(self.delta) {
            return bad(
                "run.dp.delta",
                format!(
                    "{why} — use 1e-5 (it must be below 1/n for n merchants; 1/n² is the usual \
                     choice)"
                ),
            );
        }
        // (ε, δ)-DP with δ ≥ 1/n allows releasing one of n merchants' data
        // whole: no guarantee at all.
        let protected = self.population.unwrap_or(run.selection.min_agents).max(1);
        if self.delta >= 1.0 / protected as f64 {
            return bad(
                "run.dp.delta",
                format!(
                    "{} is not below 1/{protected} ({} merchants: {}); a δ that large \
                     allows one merchant's data to be released whole — use 1e-5 (below 1/n is required; 1/n² is \
                     the usual choice)",
                    self.delta,
                    protected,
                    if self.population.is_some() {
                        "run.dp.population"
                    } else {
                        "selection.min_agents"
                    },
                ),
            );
        }
        let z = self.noise_multiplier(run)?;
        let clip = match self.clip {
            ClipNorm::Fixed(c) => c,
            ClipNorm::Adaptive => self.initial_clip,
        };
        if !((z * clip) as f32).is_finite() {
            return bad(
                "run.dp.noise_multiplier",
                format!(
                    "z = {z:e} with clip {clip:e} gives a noise scale z·clip beyond f32: no update \
                     could carry it"
                ),
            );
        }
        if self.clip == ClipNorm::Adaptive {
            let sigma_b = self.count_noise_std(run, z);
            AdaptiveClip::new(
                self.initial_clip,
                self.target_quantile,
                self.clip_learning_rate,
                sigma_b,
            )
            .map_err(|e| ConfigError::Invalid {
                field: "run.dp.initial_clip",
                message: e.to_string(),
            })?;
            AdaptiveClip::delta_noise_multiplier(z, sigma_b).map_err(|e| ConfigError::Invalid {
                field: "run.dp.count_noise_std",
                message: e.to_string(),
            })?;
        }
        if self.mode == DpMode::Distributed && run.secagg.is_none() {
            return bad(
                "run.dp.mode",
                "distributed noise is added under secure aggregation; set [run.secagg] \
                 or use mode = \"central\""
                    .into(),
            );
        }
        Ok(())
    }
}
