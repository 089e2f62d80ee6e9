//! The matrix-factorisation family behind [`FederatedModel`]: the checks of
//! a task, local training of the item side (the user side updated in place in
//! the agent's private state), evaluation and scoring.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use super::eval::{self, rmse_of};
use super::kernels::{bpr_epoch, explicit_epoch};
use super::{ImplicitAlgorithm, NegativePool, ials};
use super::{
    MU, MfData, MfHyper, UserSnapshot, UserState, initial_params, item_update, layout, model_len,
    shuffle,
};
use crate::federation::update::WeightLayout;
use crate::metrics::FigureWeights;
use crate::model::sgd::SgdParams;
use crate::model::{FederatedModel, LocalData, RoundContext, TaskOutput, TrainError};

/// The most latent factors a task may ask for. Far above any useful model
/// (published recommenders use tens to a few hundred), far below what would
/// exhaust an agent's memory on its private user side.
pub const MAX_FACTORS: usize = 1024;

/// The matrix-factorisation family, explicit or implicit (BPR): a view of
/// `ModelSpec::Mf` / `ModelSpec::MfImplicit` (the only place the two are
/// unpacked is `ModelSpec::model`).
#[derive(Debug, Clone, Copy)]
pub struct MfShape<'a> {
    /// Catalogue size.
    pub num_items: usize,
    /// Latent factors k.
    pub k: usize,
    /// Implicit (BPR) rather than explicit feedback.
    pub implicit: bool,
    /// Hyper-parameters.
    pub hyper: &'a MfHyper,
}

/// The merchant's id and MF data, or [`TrainError::NoData`].
pub(super) fn mf_data(data: &mut LocalData) -> Result<(&str, &mut MfData), TrainError> {
    let LocalData {
        merchant_id, mf, ..
    } = data;
    Ok((merchant_id, mf.as_mut().ok_or(TrainError::NoData("mf"))?))
}

impl MfShape<'_> {
    /// The checks of a train or evaluate task, in order (model length, item
    /// range), then the private user state made ready for `k` factors.
    pub(super) fn prepare(
        &self,
        ctx: &RoundContext<'_>,
        global: &[f32],
        data: &mut MfData,
        merchant: &str,
    ) -> Result<(), TrainError> {
        let (n, k) = (self.num_items, self.k);
        if global.len() != model_len(n, k) {
            return Err(TrainError::ModelLength {
                expected: model_len(n, k),
                got: global.len(),
            });
        }
        if let Some(r) = data
            .train
            .iter()
            .chain(&data.valid)
            .chain(&data.test)
            .find(|r| r.item as usize >= n)
        {
            return Err(TrainError::ItemOutOfRange {
                item: r.item as usize,
                num_items: n,
            });
        }
        data.ensure_users(k, ctx.seed, self.hyper.init_std, merchant);
        Ok(())
    }

    /// [`prepare`](Self::prepare), then `data`'s users made those of the
    /// version `global` is: iALS solves them against its items, SGD pairs the
    /// ones measured with it (`UserState::pair_with_version`). What an
    /// evaluation and a personalisation start from.
    pub(super) fn users_of_version(
        &self,
        ctx: &RoundContext<'_>,
        global: &[f32],
        data: &mut MfData,
        merchant: &str,
    ) -> Result<(), TrainError> {
        self.prepare(ctx, global, data, merchant)?;
        if self.is_ials() {
            self.refresh_users(global, data)
        } else {
            data.state.pair_with_version(ctx.round, ctx.best_version);
            Ok(())
        }
    }

    /// True for an implicit model trained by iALS.
    pub fn is_ials(&self) -> bool {
        self.implicit && self.hyper.algorithm == ImplicitAlgorithm::Ials
    }

    /// iALS: the user side solved in closed form against `global`'s items,
    /// so an evaluated or scored version is paired with its own users.
    pub(super) fn refresh_users(
        &self,
        global: &[f32],
        data: &mut MfData,
    ) -> Result<(), TrainError> {
        if self.is_ials() {
            let (n, k, h) = (self.num_items, self.k, self.hyper);
            let cells = ials::Cells::new(data, n, h.alpha, false);
            ials::solve_users(global, n, k, h, &cells, &mut data.state.factors)?;
        }
        Ok(())
    }

    /// iALS with a validation slice: the user side solved again on each
    /// customer's training purchases *and* validation item, for ranking the
    /// test once validation has chosen (a served model knows the whole
    /// history; the test item is still never seen). `None` for other models
    /// or without a validation slice.
    fn users_with_valid(
        &self,
        global: &[f32],
        data: &MfData,
    ) -> Result<Option<Vec<f32>>, TrainError> {
        if !self.is_ials() || data.valid.is_empty() {
            return Ok(None);
        }
        let (n, k, h) = (self.num_items, self.k, self.hyper);
        let cells = ials::Cells::with_valid(data, n, h.alpha);
        let mut users = vec![0.0f32; data.users.len() * k];
        ials::solve_users(global, n, k, h, &cells, &mut users)?;
        Ok(Some(users))
    }

    /// The held-out metrics of `global` with the user side as `data` holds
    /// it (no pairing, no refresh): RMSE (explicit) or HR@10 / NDCG@10
    /// (implicit, choosing `data.state.pop_blend` on the validation slice),
    /// the validation figures, the count of unknown items, and the weight.
    /// Validation is measured with the trained users. iALS ranks the test
    /// with its users refitted on training and validation purchases
    /// ([`users_with_valid`](Self::users_with_valid)); explicit MF measures
    /// it with users solved on training and validation ratings where
    /// validation preferred solved users (`refit::explicit_served_users`).
    /// Either is returned in [`Measured::refit`]; `data.state` is left as
    /// it was.
    pub(super) fn metrics_of(
        &self,
        global: &[f32],
        data: &mut MfData,
    ) -> Result<Measured, TrainError> {
        let (n, k, h) = (self.num_items, self.k, self.hyper);
        let unknown = data.unknown_items as f64;
        let (mut metrics, weights, refit) = if self.implicit {
            let users = self.users_with_valid(global, data)?;
            let (metrics, weights, blend) =
                eval::implicit_metrics(global, n, k, data, users.as_deref());
            data.state.pop_blend = blend;
            (metrics, weights, users.map(Refit::Ials))
        } else {
            let served = super::refit::explicit_served_users(global, n, k, h, data)?;
            let rmse = match &served {
                Some((bias, factors)) => {
                    eval::rmse_with(global, n, k, h.clip, (bias, factors), &data.test)
                }
                None => rmse_of(global, n, k, h.clip, data),
            };
            let mut metrics = BTreeMap::from([("rmse".into(), rmse)]);
            if !data.valid.is_empty() {
                let val = eval::rmse_on(global, n, k, h.clip, data, &data.valid);
                metrics.insert("val_rmse".into(), val);
            }
            let refit = served.map(|(bias, factors)| Refit::Explicit { bias, factors });
            let weights = FigureWeights {
                examples: data.test.len() as f64,
                validation: data.valid.len() as f64,
            };
            (metrics, weights, refit)
        };
        metrics.insert("unknown_items".into(), unknown);
        Ok(Measured {
            metrics,
            weights,
            refit,
        })
    }
}

impl FederatedModel for MfShape<'_> {
    fn name(&self) -> &'static str {
        match (self.implicit, self.hyper.algorithm) {
            (false, _) => "mf",
            (true, ImplicitAlgorithm::Bpr) => "mf-implicit",
            (true, ImplicitAlgorithm::Ials) => "mf-ials",
        }
    }

    fn data_family(&self) -> &'static str {
        "mf"
    }

    fn model_len(&self) -> usize {
        model_len(self.num_items, self.k)
    }

    /// iALS always weights item rows per item (its confidence weights).
    fn layout(&self) -> WeightLayout {
        let aggregation = if self.is_ials() {
            super::MfAggregation::PerItem
        } else {
            self.hyper.aggregation
        };
        layout(self.num_items, self.k, aggregation)
    }

    /// μ and biases 0, small seeded random item factors.
    fn initial_params(&self, seed: u64) -> Vec<f32> {
        initial_params(self.num_items, self.k, self.hyper.init_std, seed)
    }

    fn local_epochs(&self, _sgd: &SgdParams) -> usize {
        self.hyper.epochs
    }

    /// Validation HR@10 (implicit, with the popularity blend) or validation
    /// RMSE (explicit), reported only by merchants with a validation slice.
    fn selection_metric(&self) -> Option<(&'static str, bool)> {
        Some(if self.implicit {
            ("val_hr@10", true)
        } else {
            ("val_rmse", false)
        })
    }

    /// At least one factor and at most [`MAX_FACTORS`]; step sizes, penalties and the initial spread
    /// finite and non-negative; a clip range with `min <= max`.
    fn check(&self) -> Result<(), TrainError> {
        let h = self.hyper;
        let invalid = |what: &str| Err(TrainError::InvalidModel(what.to_string()));
        if self.k == 0 {
            return invalid("matrix factorisation needs at least one factor");
        }
        // The user side (customers × k) is the agent's own and never sent,
        // so no download limit bounds it: a coordinator's k of 2^27 with one
        // hashed item row passed the model-size check and asked every agent
        // for gigabytes per customer.
        if self.k > MAX_FACTORS {
            return invalid(&format!(
                "matrix factorisation with {} factors: at most {MAX_FACTORS}",
                self.k
            ));
        }
        for (name, v) in [
            ("learning_rate", h.learning_rate),
            ("bias_learning_rate", h.bias_learning_rate),
            ("reg_factors", h.reg_factors),
            ("reg_bias", h.reg_bias),
            ("init_std", h.init_std),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return invalid(&format!("MF `{name}` must be finite and >= 0, got {v}"));
            }
        }
        for (name, v) in [("alpha", h.alpha), ("proximal", h.proximal)] {
            if !(v.is_finite() && v >= 0.0) {
                return invalid(&format!("MF `{name}` must be finite and >= 0, got {v}"));
            }
        }
        if h.epochs == 0 {
            return invalid("MF `epochs` must be ≥ 1: with 0 a round trains nothing");
        }
        if !self.is_ials() && h.learning_rate <= 0.0 {
            return invalid(&format!(
                "MF `learning_rate` must be > 0 (got {}): with 0 a round trains nothing",
                h.learning_rate
            ));
        }
        if self.implicit && !self.is_ials() && h.negatives == 0 {
            return invalid(
                "BPR needs `negatives` ≥ 1: each purchase is ranked against sampled items",
            );
        }
        if self.is_ials() && h.reg_factors <= 0.0 {
            return invalid(
                "iALS needs `reg_factors` > 0: the user solve is not positive definite without it",
            );
        }
        if let Some([lo, hi]) = h.clip
            && !matches!(lo.partial_cmp(&hi), Some(Ordering::Less | Ordering::Equal))
        {
            return invalid(&format!("MF `clip` needs min <= max, got [{lo}, {hi}]"));
        }
        Ok(())
    }

    /// MF needs no statistics step: an empty output of weight 0.
    fn stats(
        &self,
        _ctx: &RoundContext<'_>,
        data: &mut LocalData,
    ) -> Result<TaskOutput, TrainError> {
        mf_data(data)?;
        Ok(TaskOutput {
            update: None,
            metrics: BTreeMap::new(),
            weight: 0.0,
            validation_weight: 0.0,
        })
    }

    /// RMSE (explicit) or HR@10 / NDCG@10 (implicit) of `global` with the
    /// private user state, plus the count of unknown items.
    fn evaluate(
        &self,
        ctx: &RoundContext<'_>,
        global: &[f32],
        data: &mut LocalData,
    ) -> Result<TaskOutput, TrainError> {
        let (merchant, data) = mf_data(data)?;
        self.users_of_version(ctx, global, data, merchant)?;
        let measured = self.metrics_of(global, data)?;
        // Served: what measured the test, users of the whole known history.
        data.state.take_refit(measured.refit, ctx.round);
        Ok(TaskOutput {
            update: None,
            metrics: measured.metrics,
            weight: measured.weights.examples,
            validation_weight: measured.weights.validation,
        })
    }

    fn score(
        &self,
        ctx: &RoundContext<'_>,
        global: &[f32],
        data: &mut LocalData,
    ) -> Result<Vec<f32>, TrainError> {
        let (merchant, data) = mf_data(data)?;
        self.prepare(ctx, global, data, merchant)?;
        self.refresh_users(global, data)?;
        let (n, k, h) = (self.num_items, self.k, self.hyper);
        let trained = (&data.state.bias[..], &data.state.factors[..]);
        if self.implicit {
            return Ok(eval::test_scores(
                global, n, k, false, None, trained, &data.test,
            ));
        }
        // The predictions the evaluation measured: with the served users.
        let solved = super::refit::explicit_served_users(global, n, k, h, data)?;
        let users = solved.as_ref().map_or(trained, |(b, f)| (&b[..], &f[..]));
        Ok(eval::test_scores(
            global, n, k, true, h.clip, users, &data.test,
        ))
    }

    /// Trains from `global` and returns the item-side update; the user
    /// biases and factors are updated in place in [`MfData::state`], and
    /// left as they were when the task fails: a task that diverged wrote
    /// NaNs there, which failed every later task and evaluation of the
    /// merchant in the run (found by a researcher probe: one rating of 5000
    /// kept a merchant out of every round's figures).
    fn fit(
        &self,
        ctx: &RoundContext<'_>,
        global: &[f32],
        data: &mut LocalData,
    ) -> Result<TaskOutput, TrainError> {
        let saved = data.mf.as_ref().map(|m| m.state.clone());
        let out = self.fit_in_place(ctx, global, data);
        if out.is_err()
            && let (Some(mf), Some(saved)) = (&mut data.mf, saved)
        {
            mf.state = saved;
        }
        out
    }
}

impl MfShape<'_> {
    /// [`fit`](Self::fit), leaving the user side as training left it.
    fn fit_in_place(
        &self,
        ctx: &RoundContext<'_>,
        global: &[f32],
        data: &mut LocalData,
    ) -> Result<TaskOutput, TrainError> {
        let (merchant, data) = mf_data(data)?;
        self.prepare(ctx, global, data, merchant)?;
        let (n, k, h) = (self.num_items, self.k, self.hyper);
        let unknown = data.unknown_items as f64;
        if data.train.is_empty() {
            return Ok(TaskOutput {
                update: None,
                metrics: BTreeMap::from([("unknown_items".into(), unknown)]),
                weight: 0.0,
                validation_weight: 0.0,
            });
        }
        if self.is_ials() {
            let (update, loss) = ials::fit(global, n, k, h, data)?;
            let weight = update.weight;
            return Ok(TaskOutput {
                update: Some(update),
                metrics: BTreeMap::from([
                    ("ials_loss".into(), loss),
                    ("unknown_items".into(), unknown),
                ]),
                weight,
                validation_weight: 0.0,
            });
        }
        let mut rng = crate::seed::rng(ctx.seed, &["mf-train", merchant, &ctx.round.to_string()]);
        let mut local = global.to_vec();
        let (mu, items) = local.split_at_mut(1);
        let (ib, itf) = items.split_at_mut(n);
        let mut counts = vec![0.0f32; n];
        let st = &mut data.state;
        let mut order: Vec<u32> = (0..data.train.len() as u32).collect();
        let mut loss = 0.0;
        if self.implicit {
            let by_user = eval::UserItems::new(&data.train, data.users.len());
            // The items negatives are drawn from: the whole catalogue, or
            // only the items this merchant sold (its update then touches
            // only its own rows, so row-sparse traffic pays off).
            let pool: Option<Vec<u32>> = (h.negatives_from == NegativePool::Merchant).then(|| {
                let mut items: Vec<u32> = data.train.iter().map(|r| r.item).collect();
                items.sort_unstable();
                items.dedup();
                items
            });
            for _ in 0..h.epochs.max(1) {
                shuffle(&mut order, &mut rng);
                loss = bpr_epoch(
                    h,
                    k,
                    &data.train,
                    &order,
                    &by_user,
                    &mut st.factors,
                    ib,
                    itf,
                    &mut counts,
                    pool.as_deref(),
                    &mut rng,
                );
            }
        } else {
            let mut sum = 0.0f64;
            for r in &data.train {
                counts[r.item as usize] += 1.0;
                sum += f64::from(r.value);
            }
            // μ is a statistic, not a learned weight: the agent reports its own
            // mean and the per-example-weighted aggregate is the pooled mean.
            // The initial model's μ = 0 means "unknown yet", so the first round
            // trains around the local mean.
            let local_mean = (sum / data.train.len() as f64) as f32;
            let mu_train = if global[MU] == 0.0 {
                local_mean
            } else {
                global[MU]
            };
            mu[0] = local_mean;
            for _ in 0..h.epochs.max(1) {
                shuffle(&mut order, &mut rng);
                loss = explicit_epoch(
                    h,
                    k,
                    &data.train,
                    &order,
                    mu_train,
                    &mut st.bias,
                    &mut st.factors,
                    ib,
                    itf,
                );
            }
        }
        if !loss.is_finite() || local.iter().any(|v| !v.is_finite()) {
            return Err(if self.implicit {
                TrainError::Diverged
            } else {
                diverged_ratings(data)
            });
        }
        let weight = data.train.len() as f64;
        let update = item_update(global, &local, &counts, weight, n, k, h.aggregation)?;
        let name = if self.implicit {
            "bpr_loss"
        } else {
            "train_mse"
        };
        Ok(TaskOutput {
            update: Some(update),
            metrics: BTreeMap::from([(name.into(), loss), ("unknown_items".into(), unknown)]),
            weight,
            validation_weight: 0.0,
        })
    }
}

/// What [`MfShape::metrics_of`] measured: the metrics, their weights
/// (held-out examples, validation rows) and the users refitted on training and validation
/// interactions that measured the test, if any.
pub(super) struct Measured {
    pub metrics: BTreeMap<String, f64>,
    pub weights: FigureWeights,
    pub refit: Option<Refit>,
}

/// A user side solved on training and validation interactions for
/// measuring the test and serving.
pub(super) enum Refit {
    /// iALS user factors. They replace the trained ones: iALS solves its
    /// users afresh from the item side every round, so training never
    /// starts from them.
    Ials(Vec<f32>),
    /// Explicit MF user biases and factors. They go beside the trained ones
    /// ([`UserState::served`]): SGD trains on from the users it left, which
    /// must not have seen a validation rating.
    Explicit { bias: Vec<f32>, factors: Vec<f32> },
}

impl UserState {
    /// Keeps what an evaluation of `version` served with: iALS factors in
    /// place, explicit users in [`UserState::served`]. An explicit
    /// evaluation that kept the trained users clears `served`.
    pub(super) fn take_refit(&mut self, refit: Option<Refit>, version: u64) {
        match refit {
            Some(Refit::Ials(factors)) => self.factors = factors,
            Some(Refit::Explicit { bias, factors }) => {
                self.served = Some(UserSnapshot {
                    version,
                    bias,
                    factors,
                });
            }
            None => self.served = None,
        }
    }
}

/// Why explicit training diverged, in the data's terms: the span of the
/// training ratings and the one farthest from their mean (a typo such as
/// 1000 among 0.5–5 stars diverges whatever the learning rate).
fn diverged_ratings(data: &MfData) -> TrainError {
    let n = data.train.len().max(1) as f64;
    let mean = (data.train.iter().map(|r| f64::from(r.value)).sum::<f64>() / n) as f32;
    let (mut min, mut max) = (f32::INFINITY, f32::NEG_INFINITY);
    let mut farthest: Option<&super::Rating> = None;
    for r in &data.train {
        min = min.min(r.value);
        max = max.max(r.value);
        if farthest.is_none_or(|f| (r.value - mean).abs() > (f.value - mean).abs()) {
            farthest = Some(r);
        }
    }
    let Some(far) = farthest else {
        return TrainError::Diverged;
    };
    TrainError::DivergedRatings {
        min,
        max,
        mean,
        customer: data
            .users
            .get(far.user as usize)
            .cloned()
            .unwrap_or_else(|| format!("#{}", far.user)),
        farthest: far.value,
    }
}
