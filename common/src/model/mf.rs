//! Federated matrix factorisation for recommendations, explicit (ratings,
//! biased MF `r̂ = μ + b_u + b_i + p_u·q_i`, RMSE) and implicit (purchases,
//! BPR with sampled negatives, HR@10 / NDCG@10).
//!
//! A merchant's customers are its own while the item space is the shared
//! catalogue, so the model splits in two:
//! - federated: the global mean μ, the item biases and the item factors, laid
//!   out as `[μ | b_0 … b_{n−1} | q_0 … q_{n−1}]` (length `1 + n·(k+1)`);
//! - private: user biases and user factors, kept in [`MfData::state`] inside
//!   the agent (serde-serialisable so it survives restarts), never sent.
//!
//! Item rows are aggregated per item: an agent sends `n_i·Δq_i`, `n_i·Δb_i`
//! and its evidence counts `n_i` as per-coordinate weights, so an item rated
//! by one merchant moves by that merchant's full step instead of being
//! diluted by everyone who never saw it (see [`MfAggregation`]).

mod defaults;
mod eval;
mod family;
pub mod ials;
mod kernels;
pub mod movielens;
mod personal;
mod refit;

use rand::Rng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};

use super::TrainError;
use crate::data::catalogue::ItemIndex;
use crate::data::interactions::Interaction;
use crate::federation::update::{Segment, Update, WeightLayout};

pub use defaults::{
    IALS_ALPHA, IALS_PROXIMAL, IALS_REG, IMPLICIT_FACTORS, MF_DP_FACTORS, MF_EPOCHS, MF_FACTORS,
    MF_LR, explicit_dp_hyper,
};
pub(crate) use defaults::{explicit_hyper, implicit_hyper};
pub use eval::{
    POP_BLEND_GRID, blend, item_buyers, local_popularity, popularity_metrics, ranking_metrics,
    rmse_of,
};
pub use family::MfShape;
pub use kernels::{bpr_epoch, explicit_epoch};
pub use personal::{DEFAULT_PROXIMAL, DEFAULT_PROXIMAL_IALS, Personalise, Personalised};

/// How the coordinator averages the item rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum MfAggregation {
    /// Each item row is weighted by the agents' evidence for that item (its
    /// rating count, or gradient touches for BPR); untouched items keep their value.
    #[default]
    PerItem,
    /// Plain FedAvg: every coordinate weighted by the agent's example count,
    /// which dilutes the update of an item most merchants never saw.
    Uniform,
}

/// Hyper-parameters of local MF training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MfHyper {
    /// SGD step size for the factors.
    pub learning_rate: f32,
    /// SGD step size for μ and the biases.
    pub bias_learning_rate: f32,
    /// L2 penalty on user and item factors.
    pub reg_factors: f32,
    /// L2 penalty on user and item biases.
    pub reg_bias: f32,
    /// Local passes over the training interactions per round.
    pub epochs: usize,
    /// Sampled negatives per positive (BPR only).
    pub negatives: usize,
    /// Standard deviation of the random initial factors.
    pub init_std: f32,
    /// Rating scale `[min, max]` predictions are clipped to (explicit only),
    /// as Surprise does with its `rating_scale`.
    pub clip: Option<[f32; 2]>,
    /// Per-item or plain FedAvg weighting of the item rows.
    pub aggregation: MfAggregation,
    /// Where BPR draws its negatives from.
    pub negatives_from: NegativePool,
    /// How an implicit model is trained: BPR (SGD on sampled pairs) or
    /// iALS (closed-form alternating solves over every cell, see [`ials`]).
    /// Explicit MF ignores it.
    pub algorithm: ImplicitAlgorithm,
    /// iALS confidence scale α: a purchase of strength `v` weighs
    /// `1 + α·ln(1 + v)` against 1 for every unbought item.
    pub alpha: f32,
    /// iALS proximal weight ρ pulling each merchant's item solve towards
    /// the global rows (0: the merchant's own solve).
    pub proximal: f32,
    /// Explicit MF: measure the test and serve with users solved in closed
    /// form on training and validation ratings, where users solved on
    /// training alone beat the trained ones on validation (`refit`). Off by
    /// default: at small k the solve costs about as much as the round's
    /// training (BENCHMARKS.md). iALS always serves its refitted users.
    pub refit_users: bool,
}

/// The training algorithm of an implicit MF model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ImplicitAlgorithm {
    /// Bayesian personalised ranking with sampled negatives (SGD).
    #[default]
    Bpr,
    /// Implicit alternating least squares with confidence weights.
    Ials,
}

/// The items BPR samples negatives from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum NegativePool {
    /// The whole shared catalogue: every item row moves every round.
    #[default]
    Catalogue,
    /// The items the merchant sold (in its training interactions): its
    /// update touches only its own rows, a fraction of a large catalogue.
    Merchant,
}

impl std::str::FromStr for NegativePool {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "catalogue" => Ok(Self::Catalogue),
            "merchant" => Ok(Self::Merchant),
            other => Err(format!(
                "unknown negative pool `{other}`: use catalogue or merchant"
            )),
        }
    }
}

impl Default for MfHyper {
    fn default() -> Self {
        Self {
            learning_rate: 0.01,
            bias_learning_rate: 0.01,
            reg_factors: 0.05,
            reg_bias: 0.02,
            epochs: 1,
            negatives: 1,
            init_std: 0.1,
            clip: None,
            aggregation: MfAggregation::PerItem,
            negatives_from: NegativePool::Catalogue,
            algorithm: ImplicitAlgorithm::Bpr,
            alpha: 1.0,
            proximal: 0.0,
            refit_users: false,
        }
    }
}

/// Index of μ in the federated vector.
pub const MU: usize = 0;

/// Length of the federated vector for `num_items` items and `k` factors.
pub fn model_len(num_items: usize, k: usize) -> usize {
    1 + num_items * (k + 1)
}

/// Offset of item `i`'s bias, and of the first factor of item `i`.
pub fn item_offsets(num_items: usize, k: usize, i: usize) -> (usize, usize) {
    (1 + i, 1 + num_items + i * k)
}

/// The weight layout of the federated vector.
pub fn layout(num_items: usize, k: usize, aggregation: MfAggregation) -> WeightLayout {
    match aggregation {
        MfAggregation::Uniform => WeightLayout::uniform(),
        MfAggregation::PerItem => WeightLayout {
            segments: vec![
                Segment {
                    len: 1,
                    group_len: None,
                },
                Segment {
                    len: num_items,
                    group_len: Some(1),
                },
                Segment {
                    len: num_items * k,
                    group_len: Some(k),
                },
            ],
            num_coord_weights: num_items,
        },
    }
}

/// The first global model: μ and biases 0, item factors small Gaussian noise
/// from `seed` (factors must not start equal, or they never separate).
pub fn initial_params(num_items: usize, k: usize, init_std: f32, seed: u64) -> Vec<f32> {
    let mut out = vec![0.0; model_len(num_items, k)];
    let mut rng = crate::seed::rng(seed, &["mf-items"]);
    for v in &mut out[1 + num_items..] {
        let z: f32 = StandardNormal.sample(&mut rng);
        *v = z * init_std;
    }
    out
}

/// One rating or purchase in dense indices.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Rating {
    /// The merchant-local user index (position in [`MfData::users`]).
    pub user: u32,
    /// The catalogue item index.
    pub item: u32,
    /// Rating (explicit) or strength (implicit; unused by BPR).
    pub value: f32,
}

/// The agent's private user-side model. It never leaves the agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct UserState {
    /// Factor count the state was built for (a change re-initialises it).
    pub k: usize,
    /// Run seed the state was initialised from.
    pub seed: u64,
    /// The customer id of each row, in row order (empty in a state saved
    /// before ids were kept: its rows are then positions in the data it was
    /// trained on). A merchant's export gains and loses customers between
    /// runs; rows are matched by id ([`MfData::adopt_user_order`]), never by
    /// position.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<String>,
    /// User biases, one per local user.
    pub bias: Vec<f32>,
    /// User factors, `users × k` row-major.
    pub factors: Vec<f32>,
    /// Weight of the merchant's own item popularity in the blended ranking
    /// score (implicit only; 0 = the model alone, 1 = popularity alone),
    /// chosen by the last evaluation on the validation slice.
    #[serde(default)]
    pub pop_blend: f32,
    /// The user biases and factors as each of the last
    /// [`KEPT_SNAPSHOTS`] evaluated versions found them, so that evaluating
    /// an older version again (the coordinator's final serving task hands
    /// out the best version, not the last) pairs its item side with the user
    /// side it was measured with, not with users trained on later versions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub evaluated: Vec<UserSnapshot>,
    /// Explicit MF: the user biases and factors solved again on training
    /// *and* validation ratings against the version last evaluated
    /// (`version`), kept where validation preferred solved users to the
    /// trained ones (see `refit`). The test is measured and the merchant
    /// served with them; training never reads them, so later rounds go on
    /// from [`bias`](Self::bias) and [`factors`](Self::factors), which never
    /// saw a validation rating.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub served: Option<UserSnapshot>,
}

/// How many evaluated versions' user states an agent keeps: more than the
/// default patience (5), so an early-stopped run's best version always has
/// its own. The run's best version so far, which evaluation tasks name
/// (`TaskSpec::best_version`), is kept however far back it is.
pub const KEPT_SNAPSHOTS: usize = 16;

/// The private user side as one evaluated version found it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserSnapshot {
    /// The evaluated version (the evaluation task's round).
    pub version: u64,
    /// User biases.
    pub bias: Vec<f32>,
    /// User factors, `users × k`.
    pub factors: Vec<f32>,
}

impl UserState {
    /// The user biases and factors to serve `version` with: the
    /// [`served`](Self::served) users solved for that version where there
    /// are some, else the trained ones.
    pub fn serving_side(&self, version: u64) -> (&[f32], &[f32]) {
        match &self.served {
            Some(s) if s.version == version => (&s.bias, &s.factors),
            _ => (&self.bias, &self.factors),
        }
    }

    /// Before evaluating `version`: restores the user side it was first
    /// evaluated with, or remembers the current one as its own (keeping the
    /// last [`KEPT_SNAPSHOTS`], and `best`'s, the run's best version so far,
    /// however old). Returns whether it restored.
    pub fn pair_with_version(&mut self, version: u64, best: Option<u64>) -> bool {
        if let Some(s) = self.evaluated.iter().find(|s| s.version == version)
            && s.bias.len() == self.bias.len()
            && s.factors.len() == self.factors.len()
        {
            self.bias.clone_from(&s.bias);
            self.factors.clone_from(&s.factors);
            return true;
        }
        self.evaluated.retain(|s| s.version != version);
        self.evaluated.push(UserSnapshot {
            version,
            bias: self.bias.clone(),
            factors: self.factors.clone(),
        });
        // The best version's snapshot does not count against the others'.
        let pinned = |s: &UserSnapshot| best == Some(s.version) && s.version != version;
        let others = self.evaluated.iter().filter(|s| !pinned(s)).count();
        if others > KEPT_SNAPSHOTS
            && let Some(oldest) = self.evaluated.iter().position(|s| !pinned(s))
        {
            self.evaluated.remove(oldest);
        }
        false
    }
}

/// A merchant's recommender data: interactions in dense indices plus the
/// private user state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct MfData {
    /// The merchant's own customer ids; a user's index is its position.
    pub users: Vec<String>,
    /// Training interactions.
    pub train: Vec<Rating>,
    /// The validation slice, carved out of the training interactions (a
    /// random 10 % for explicit, each user's latest remaining purchase for
    /// implicit; from an orders log, the last line of the basket before the
    /// tested one). Never trained on; model selection, early stopping and the
    /// popularity blend look only at it, never at `test`.
    #[serde(default)]
    pub valid: Vec<Rating>,
    /// Held-out interactions (a random 20 % for explicit, each user's last
    /// purchase for implicit).
    pub test: Vec<Rating>,
    /// Interactions dropped because the catalogue does not know the item.
    pub unknown_items: u64,
    /// Private user biases and factors.
    #[serde(default)]
    pub state: UserState,
}

impl MfData {
    /// Maps a merchant's interactions into dense indices: users in order of
    /// first appearance, items through the shared catalogue. Interactions with
    /// an item the catalogue lacks are counted in `unknown_items` and skipped.
    pub fn new(train: &[Interaction], test: &[Interaction], catalogue: &dyn ItemIndex) -> Self {
        Self::with_validation(train, &[], test, catalogue)
    }

    /// [`MfData::new`] with a validation slice (see [`MfData::valid`]);
    /// users are numbered in order of first appearance in train, validation,
    /// then test.
    pub fn with_validation(
        train: &[Interaction],
        valid: &[Interaction],
        test: &[Interaction],
        catalogue: &dyn ItemIndex,
    ) -> Self {
        let mut users: Vec<String> = Vec::new();
        let mut index: std::collections::HashMap<String, u32> = Default::default();
        let mut unknown = 0u64;
        let mut map = |rows: &[Interaction], unknown: &mut u64| -> Vec<Rating> {
            let mut out = Vec::with_capacity(rows.len());
            for r in rows {
                let Some(item) = catalogue.index(&r.item) else {
                    *unknown += 1;
                    continue;
                };
                let next = users.len() as u32;
                let user = *index.entry(r.user.clone()).or_insert_with(|| {
                    users.push(r.user.clone());
                    next
                });
                out.push(Rating {
                    user,
                    item,
                    value: r.value,
                });
            }
            out
        };
        let train = map(train, &mut unknown);
        let valid = map(valid, &mut unknown);
        let test = map(test, &mut unknown);
        MfData {
            users,
            train,
            valid,
            test,
            unknown_items: unknown,
            state: UserState::default(),
        }
    }

    /// Pools several merchants' data for the centralised baseline. User ids
    /// are prefixed with their merchant (customers of different merchants are
    /// different people); the private state starts afresh.
    pub fn pooled(parts: &[(&str, &MfData)]) -> Self {
        let mut out = MfData::default();
        for (merchant, d) in parts {
            let offset = out.users.len() as u32;
            out.users
                .extend(d.users.iter().map(|u| format!("{merchant}:{u}")));
            let shift = |r: &Rating| Rating {
                user: r.user + offset,
                ..*r
            };
            out.train.extend(d.train.iter().map(shift));
            out.valid.extend(d.valid.iter().map(shift));
            out.test.extend(d.test.iter().map(shift));
            out.unknown_items += d.unknown_items;
        }
        out
    }

    /// Makes sure every user has private state for `k` factors, initialising
    /// a user the first time it is seen from (seed, merchant, user id) so the
    /// result does not depend on the order users arrive in.
    pub fn ensure_users(&mut self, k: usize, seed: u64, init_std: f32, merchant: &str) {
        let s = &mut self.state;
        if s.k != k || s.seed != seed {
            *s = UserState {
                k,
                seed,
                ..Default::default()
            };
        }
        for u in s.bias.len()..self.users.len() {
            let mut rng = crate::seed::rng(seed, &["mf-user", merchant, &self.users[u]]);
            s.bias.push(0.0);
            for _ in 0..k {
                let z: f32 = StandardNormal.sample(&mut rng);
                s.factors.push(z * init_std);
            }
        }
        if s.users.len() != s.bias.len() {
            s.users = self.users[..s.bias.len().min(self.users.len())].to_vec();
        }
    }

    /// Puts the users of `saved` (a stored [`UserState::users`]) first, in
    /// their stored order, so that row `i` of that state is again user `i`
    /// here; customers the export gained follow, and customers it lost keep
    /// their place without interactions. Returns whether anything moved.
    /// Without ids (an older state) nothing can be matched and nothing moves.
    pub fn adopt_user_order(&mut self, saved: &[String]) -> bool {
        if saved.is_empty() || self.users.get(..saved.len()) == Some(saved) {
            return false;
        }
        let known: std::collections::HashSet<&str> = saved.iter().map(String::as_str).collect();
        let mut order: Vec<String> = saved.to_vec();
        order.extend(
            self.users
                .iter()
                .filter(|u| !known.contains(u.as_str()))
                .cloned(),
        );
        let place: std::collections::HashMap<&str, u32> = order
            .iter()
            .enumerate()
            .map(|(i, u)| (u.as_str(), i as u32))
            .collect();
        let moved: Vec<u32> = self.users.iter().map(|u| place[u.as_str()]).collect();
        for r in self
            .train
            .iter_mut()
            .chain(&mut self.valid)
            .chain(&mut self.test)
        {
            r.user = moved[r.user as usize];
        }
        self.users = order;
        true
    }
}

/// Builds the item-side update from the local and global vectors: per item
/// `n_i·Δ` with the counts as coordinate weights, or plain `n·Δ`.
pub fn item_update(
    global: &[f32],
    local: &[f32],
    counts: &[f32],
    weight: f64,
    n: usize,
    k: usize,
    aggregation: MfAggregation,
) -> Result<Update, TrainError> {
    let mut values = vec![0.0f32; global.len()];
    let w = weight as f32;
    values[MU] = (local[MU] - global[MU]) * w;
    let coord_weights = match aggregation {
        MfAggregation::Uniform => {
            for (v, (l, g)) in values.iter_mut().zip(local.iter().zip(global)).skip(1) {
                *v = (l - g) * w;
            }
            Vec::new()
        }
        MfAggregation::PerItem => {
            for (i, &c) in counts.iter().enumerate() {
                if c == 0.0 {
                    continue;
                }
                let (b, f) = item_offsets(n, k, i);
                values[b] = (local[b] - global[b]) * c;
                for j in f..f + k {
                    values[j] = (local[j] - global[j]) * c;
                }
            }
            counts.to_vec()
        }
    };
    if values.iter().any(|v| !v.is_finite()) {
        return Err(TrainError::Diverged);
    }
    Ok(Update {
        values,
        coord_weights,
        weight,
    })
}

/// Fisher–Yates over u32 indices (no allocation per epoch).
fn shuffle<R: Rng>(order: &mut [u32], rng: &mut R) {
    use rand::RngExt;
    for i in (1..order.len()).rev() {
        let j = rng.random_range(0..=i);
        order.swap(i, j);
    }
}

#[cfg(test)]
mod tests;
