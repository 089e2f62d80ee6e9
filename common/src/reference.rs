//! Reference federations run directly in-process: the plain loop that the
//! coordinator's engine must reproduce, and the centralised and local-only
//! baselines that the federation-value report compares against.
//!
//! All three are the same loop over `train::run_task` with a different
//! grouping of the data: centralised is one "merchant" holding everyone's rows,
//! local-only is each merchant in a federation of one.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::data::standardize::Standardizer;
use crate::federation::aggregate::SumAccumulator;
use crate::federation::strategy::Strategy;
use crate::metrics::{FigureWeights, PooledMean};
use crate::model::mf::{item_buyers, popularity_metrics};
use crate::task::{TaskKind, TaskSpec};
use crate::train::{LocalData, TrainError, run_task};

/// The outcome of an in-process federation.
#[derive(Debug, Clone)]
pub struct Federation {
    /// Final global parameters.
    pub params: Vec<f32>,
    /// The standardiser agreed in the statistics step, if the family uses one.
    pub standardizer: Option<Standardizer>,
    /// The merchants' evaluation metrics pooled after each round (each
    /// weighted by its rows, [`PooledMean`]).
    pub rounds: Vec<BTreeMap<String, f64>>,
    /// The round (1-based) with the best federated validation metric, and
    /// its parameters: the version a merchant is served. `None` when the
    /// family reports no validation metric.
    pub best: Option<(u64, Vec<f32>)>,
}

impl Federation {
    /// The parameters to serve: the best version by validation, else the last.
    pub fn served(&self) -> &[f32] {
        self.best.as_ref().map_or(&self.params, |(_, p)| p)
    }

    /// The round of [`served`](Self::served): an evaluation of it with this
    /// round pairs it with the private user state it was measured with.
    pub fn served_round(&self) -> u64 {
        self.best
            .as_ref()
            .map_or(self.rounds.len() as u64, |(r, _)| *r)
    }
}

/// Per-merchant value of joining the federation: the same merchant's
/// held-out metrics under a model trained on its data alone, under the
/// federated model, and under a centralised model trained on everyone's
/// pooled rows.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct MerchantValue {
    /// The merchant.
    pub merchant: String,
    /// Metrics of the model trained on this merchant's data alone.
    pub local_only: BTreeMap<String, f64>,
    /// Metrics of the federated model's served version (with this
    /// merchant's private state): the reported run's own figures under
    /// [`Federated::Served`].
    pub federated: BTreeMap<String, f64>,
    /// Metrics of the centralised model on this merchant's held-out rows;
    /// `None` for families with private per-merchant state (MF user factors
    /// exist only in the pooled model, so a per-merchant figure would mix
    /// two models).
    pub centralized: Option<BTreeMap<String, f64>>,
    /// Implicit recommenders: ranking by this merchant's own bestsellers
    /// (distinct buyers per item in its training rows).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub own_popularity: Option<BTreeMap<String, f64>>,
    /// Implicit recommenders: ranking by every merchant's bestsellers pooled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub global_popularity: Option<BTreeMap<String, f64>>,
    /// With personalisation: the metrics of the merchant's fine-tuned copy
    /// of the federated model (whether it kept it or not).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub personalised: Option<BTreeMap<String, f64>>,
    /// With personalisation: whether the merchant kept its fine-tuned copy
    /// (strictly better on its validation slice) and serves it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub personalised_kept: Option<bool>,
    /// The merchant's evaluation weight (held-out examples).
    pub weight: f64,
    /// The merchant's validation rows, the weight of its validation figures
    /// (`val_*`) in the pooled columns; 0 without a validation slice.
    pub validation_weight: f64,
}

impl MerchantValue {
    /// The weights of this merchant's figures in the pooled columns.
    fn figure_weights(&self) -> crate::metrics::FigureWeights {
        crate::metrics::FigureWeights {
            examples: self.weight,
            validation: self.validation_weight,
        }
    }

    /// The metrics of the copy the merchant serves after federating: its
    /// personalised copy where it kept it, else the federated model.
    pub fn selected(&self) -> &BTreeMap<String, f64> {
        match (&self.personalised, self.personalised_kept) {
            (Some(p), Some(true)) => p,
            _ => &self.federated,
        }
    }

    /// Drops every figure (a merchant with nothing held out).
    fn clear_metrics(&mut self) {
        for m in [&mut self.local_only, &mut self.federated]
            .into_iter()
            .chain(self.centralized.as_mut())
            .chain(self.own_popularity.as_mut())
            .chain(self.global_popularity.as_mut())
            .chain(self.personalised.as_mut())
        {
            m.clear();
        }
    }
}

/// The federation-value report of one population.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FederationValue {
    /// Rounds the baselines (local-only, centralised, and a reference
    /// federation) trained at most: FedAvg, every merchant each round.
    pub rounds: u64,
    /// The run's early-stopping patience, which the baselines follow too
    /// (each stops after that many evaluations without a new best).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub patience: Option<u64>,
    /// Baselines that could not be computed, one line each (a merchant
    /// whose training diverged alone has no local-only figure).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    /// Held-out metrics of the centralised model over all merchants' rows.
    pub centralized_pooled: BTreeMap<String, f64>,
    /// One entry per merchant, in input order.
    pub merchants: Vec<MerchantValue>,
    /// Weighted means over the merchants of each column (`local_only`,
    /// `federated`, and for implicit recommenders `own_popularity`,
    /// `global_popularity`): validation figures by validation rows, the
    /// others by held-out rows.
    pub pooled: BTreeMap<String, BTreeMap<String, f64>>,
}

/// One merchant's figures under the version a federation serves.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServedFigures {
    /// Its held-out metrics under the served version, with its private state.
    pub metrics: BTreeMap<String, f64>,
    /// With personalisation: the metrics of its fine-tuned copy and whether
    /// it kept (serves) it.
    pub personalised: Option<(BTreeMap<String, f64>, bool)>,
}

/// Where the federated column of [`federation_value`] comes from.
#[derive(Debug, Clone, Copy)]
pub enum Federated<'a> {
    /// A reference federation trained here (FedAvg, every merchant each
    /// round, the baselines' rounds) and the version it would serve; with a
    /// [`Personalise`](crate::model::mf::Personalise), every merchant also
    /// fine-tunes that version (recommenders). For callers without a run of
    /// their own.
    Reference(Option<&'a crate::model::mf::Personalise>),
    /// The figures of the run being reported, by merchant id: the report's
    /// federated (and personalised) column is that run's served version,
    /// whatever its strategy, selection, early stopping or personalisation.
    Served(&'a BTreeMap<String, ServedFigures>),
}

/// Why a federation-value report could not be computed.
#[derive(Debug, thiserror::Error)]
pub enum ValueError {
    /// A baseline's training or evaluation failed.
    #[error(transparent)]
    Train(#[from] TrainError),
    /// [`Federated::Served`] lacks a merchant of the population.
    #[error("merchant {0} has no figures for the served version")]
    MissingServed(String),
}

/// The task a merchant trains alone with for its local-only column:
/// `template`, except that gradient-boosted trees keep the same share of
/// the merchant's own rows per leaf. `min_child_weight` is a hessian sum
/// sized for the federation's training rows; alone, a merchant holding a
/// fraction `f` of them uses `f` times it (at least 1, XGBoost's default,
/// unless the federation's value is smaller). Otherwise a store of 40
/// customers, whose rows hold a hessian sum of at most 10, could never
/// split: its local-only model would be a constant, AUC 0.5, and every
/// federation would "beat" it.
fn alone_template(template: &TaskSpec, m: &LocalData, total_rows: usize) -> TaskSpec {
    let mut spec = template.clone();
    if let crate::task::ModelSpec::ChurnGbdt { params, .. } = &mut spec.model {
        let rows = m.churn.as_ref().map_or(0, |c| c.train.len());
        let share = rows as f32 / total_rows.max(1) as f32;
        params.min_child_weight =
            (params.min_child_weight * share).max(params.min_child_weight.min(1.0));
    }
    spec
}

/// Trains local-only and centralised versions of `template`'s model on
/// copies of `merchants` and compares them merchant by merchant with the
/// federated model's figures (`federated`: the reported run's served
/// version, or a reference federation trained here).
pub fn federation_value(
    template: &TaskSpec,
    merchants: &[LocalData],
    rounds: u64,
    patience: Option<u64>,
    federated: Federated<'_>,
) -> Result<FederationValue, ValueError> {
    use crate::federation::strategy::FedAvg;
    let served: Vec<ServedFigures> = match federated {
        Federated::Served(by_id) => merchants
            .iter()
            .map(|m| {
                by_id
                    .get(&m.merchant_id)
                    .cloned()
                    .ok_or_else(|| ValueError::MissingServed(m.merchant_id.clone()))
            })
            .collect::<Result<_, _>>()?,
        Federated::Reference(personalise) => {
            reference_figures(template, merchants, rounds, patience, personalise)?
        }
    };
    let mut pooled = [LocalData::pooled("centralized", merchants)];
    let central = federate_until(template, &mut pooled, rounds, &mut FedAvg, patience)?;
    let has_private_state = template.model.data_family() == "mf";
    let implicit = matches!(template.model, crate::task::ModelSpec::MfImplicit { .. });
    let num_items = template.model.mf_shape().map_or(0, |s| s.num_items);
    let global_buyers: Option<Vec<u32>> = implicit.then(|| {
        let mut total = vec![0u32; num_items];
        for m in merchants.iter().filter_map(|m| m.mf.as_ref()) {
            for (t, c) in total.iter_mut().zip(item_buyers(m, num_items)) {
                *t += c;
            }
        }
        total
    });
    let total_rows: usize = merchants
        .iter()
        .filter_map(|m| m.churn.as_ref())
        .map(|c| c.train.len())
        .sum();
    let mut out = Vec::with_capacity(merchants.len());
    let mut notes = Vec::new();
    for (m, fed) in merchants.iter().zip(served) {
        let mut alone = [m.clone()];
        let alone_template = alone_template(template, m, total_rows);
        // The evaluation weight (held-out examples) is the merchant's,
        // whatever the model. A merchant whose training diverges alone (an
        // outlier in its data, say) has no local-only figure; the others'
        // columns are still measured.
        let (local_only, weights) =
            match federate_until(&alone_template, &mut alone, rounds, &mut FedAvg, patience) {
                Ok(local) => {
                    let mut spec = alone_template;
                    spec.standardizer = local.standardizer.clone();
                    spec.round = local.served_round();
                    evaluate_pooled(&spec, local.served(), &mut alone)?
                }
                Err(e) => {
                    notes.push(format!(
                        "merchant {}: no local-only figure ({e})",
                        m.merchant_id
                    ));
                    let mut alone = [m.clone()];
                    let initial = template.model.initial_params(template.seed);
                    let (_, weights) = evaluate_pooled(&alone_template, &initial, &mut alone)?;
                    (BTreeMap::new(), weights)
                }
            };
        let centralized = if has_private_state {
            None
        } else {
            let mut spec = template.clone();
            spec.standardizer = central.standardizer.clone();
            spec.round = central.served_round();
            Some(evaluate(&spec, central.served(), &mut [m.clone()])?)
        };
        let (own_popularity, global_popularity) = match (&global_buyers, &m.mf) {
            (Some(global), Some(d)) => (
                Some(popularity_metrics(&item_buyers(d, num_items), d).0),
                Some(popularity_metrics(global, d).0),
            ),
            _ => (None, None),
        };
        let (personalised, personalised_kept) = match fed.personalised {
            Some((p, kept)) => (Some(p), Some(kept)),
            None => (None, None),
        };
        let mut value = MerchantValue {
            merchant: m.merchant_id.clone(),
            local_only,
            federated: fed.metrics,
            centralized,
            own_popularity,
            global_popularity,
            personalised,
            personalised_kept,
            weight: weights.examples,
            validation_weight: weights.validation,
        };
        if weights.examples <= 0.0 {
            // Nothing held out: no figure rather than a 0.0 that reads as
            // a measurement.
            value.clear_metrics();
        }
        out.push(value);
    }
    let mut spec = template.clone();
    spec.standardizer = central.standardizer.clone();
    spec.round = central.served_round();
    let centralized_pooled = evaluate(&spec, central.served(), &mut pooled)?;
    Ok(FederationValue {
        rounds,
        patience,
        notes,
        centralized_pooled,
        pooled: pooled_columns(&out),
        merchants: out,
    })
}

/// Each merchant's figures under the version a reference federation of
/// `rounds` FedAvg rounds serves, evaluated with the private state the
/// federation left it; with `personalise` (recommenders), its fine-tuned copy.
fn reference_figures(
    template: &TaskSpec,
    merchants: &[LocalData],
    rounds: u64,
    patience: Option<u64>,
    personalise: Option<&crate::model::mf::Personalise>,
) -> Result<Vec<ServedFigures>, TrainError> {
    use crate::federation::strategy::FedAvg;
    let mut fed_data = merchants.to_vec();
    let fed = federate_until(template, &mut fed_data, rounds, &mut FedAvg, patience)?;
    let mut spec = template.clone();
    spec.standardizer = fed.standardizer.clone();
    spec.round = fed.served_round();
    let has_private_state = template.model.data_family() == "mf";
    let mut out = Vec::with_capacity(merchants.len());
    for m in fed_data.iter_mut() {
        let (metrics, _) = evaluate_weighted(&spec, fed.served(), m)?;
        let personalised = match personalise {
            Some(p) if has_private_state => {
                let p = crate::train::personalise(&spec, fed.served(), m, p)?;
                Some((p.personal_metrics, p.kept))
            }
            _ => None,
        };
        out.push(ServedFigures {
            metrics,
            personalised,
        });
    }
    Ok(out)
}

/// One column of the per-merchant report.
type Column = fn(&MerchantValue) -> Option<&BTreeMap<String, f64>>;

/// Weighted means of each column of the per-merchant report: held-out
/// figures by the merchants' held-out rows, validation figures (`val_*`)
/// by their validation rows.
fn pooled_columns(rows: &[MerchantValue]) -> BTreeMap<String, BTreeMap<String, f64>> {
    let mut out = BTreeMap::new();
    let columns: [(&str, Column); 6] = [
        ("local_only", |m| Some(&m.local_only)),
        ("federated", |m| Some(&m.federated)),
        ("own_popularity", |m| m.own_popularity.as_ref()),
        ("global_popularity", |m| m.global_popularity.as_ref()),
        ("personalised", |m| m.personalised.as_ref()),
        // Each merchant's served copy: its personalised one where kept.
        ("selected", |m| {
            m.personalised.as_ref().map(|_| m.selected())
        }),
    ];
    for (name, get) in columns {
        // Each metric over the merchants that have it: a merchant whose
        // held-out rows are of one class has no AUC, and its weight must
        // not dilute the others' (it did: a constant model's 0.5 read 0.47).
        let mut pool = PooledMean::default();
        for m in rows {
            let Some(metrics) = get(m) else { continue };
            pool.add(metrics, m.figure_weights());
        }
        let means = pool.mean();
        if !means.is_empty() {
            out.insert(name.to_string(), means);
        }
    }
    out
}

/// One merchant's held-out metrics for `params` and their weights.
fn evaluate_weighted(
    template: &TaskSpec,
    params: &[f32],
    merchant: &mut LocalData,
) -> Result<(BTreeMap<String, f64>, FigureWeights), TrainError> {
    let mut spec = template.clone();
    spec.kind = TaskKind::Evaluate;
    let out = run_task(&spec, params, merchant)?;
    let weights = out.figure_weights();
    Ok((out.metrics, weights))
}

/// Runs the statistics step (if the model family has one) and `rounds`
/// training rounds with every merchant taking part, evaluating after each.
///
/// `template` supplies the model and hyper-parameters; its kind, round and
/// standardiser are filled in here.
pub fn federate(
    template: &TaskSpec,
    merchants: &mut [LocalData],
    rounds: u64,
    strategy: &mut dyn Strategy,
) -> Result<Federation, TrainError> {
    federate_until(template, merchants, rounds, strategy, None)
}

/// [`federate`] with the engine's early stopping: with `patience`, the
/// federation stops once that many evaluations in a row did not improve on
/// the best one (`run.early_stopping`), so a baseline gets the stopping
/// rule of the run it is compared with.
pub fn federate_until(
    template: &TaskSpec,
    merchants: &mut [LocalData],
    rounds: u64,
    strategy: &mut dyn Strategy,
    patience: Option<u64>,
) -> Result<Federation, TrainError> {
    let mut spec = template.clone();
    spec.standardizer = stats_step(&spec, merchants)?;
    if spec.model.is_analysis() {
        return federate_analysis(spec, merchants, rounds, patience);
    }
    let mut stale = Patience::new(patience);
    let mut params = spec.model.initial_params(spec.seed);
    let layout = spec.model.layout();
    let mut history = Vec::new();
    let (mut best, mut best_value): (Option<(u64, Vec<f32>)>, Option<f64>) = (None, None);
    for round in 1..=rounds {
        spec.kind = TaskKind::Train;
        spec.round = round;
        let mut acc = SumAccumulator::new(params.len(), layout.num_coord_weights);
        for m in merchants.iter_mut() {
            let out = run_task(&spec, &params, m)?;
            if let Some(u) = out.update {
                acc.add(&u).map_err(|_| TrainError::ModelLength {
                    expected: params.len(),
                    got: u.values.len(),
                })?;
            }
        }
        params = strategy.apply(&params, &acc.mean_delta(&layout));
        let metrics = evaluate(&spec, &params, merchants)?;
        // Model selection on the federated validation metric, as the engine does.
        if let Some((name, higher)) = spec.model.selection_metric()
            && let Some(&v) = metrics.get(name).filter(|v| v.is_finite())
        {
            let better = match best_value {
                None => true,
                Some(b) => (higher && v > b) || (!higher && v < b),
            };
            if better {
                best_value = Some(v);
                best = Some((round, params.clone()));
            }
            stale.evaluated(better);
        }
        history.push(metrics);
        if stale.exhausted() {
            break;
        }
    }
    Ok(Federation {
        params,
        standardizer: spec.standardizer,
        rounds: history,
        best,
    })
}

/// [`federate`] for an analysis (boosted trees, itemsets), as the engine
/// runs it: each round's task is sized by the state
/// (`ModelSpec::for_task`, every merchant selected), the next state is computed from the plain
/// sum, and the state is evaluated at its checkpoints (between trees) and
/// at the end. `rounds` caps the versions; `Federation::rounds` holds one
/// entry per evaluation and `best` the best evaluated version.
fn federate_analysis(
    mut spec: TaskSpec,
    merchants: &mut [LocalData],
    rounds: u64,
    patience: Option<u64>,
) -> Result<Federation, TrainError> {
    let mut stale = Patience::new(patience);
    let template = spec.model.clone();
    let mut params = template.initial_params(spec.seed);
    let mut history = Vec::new();
    let (mut best, mut best_value): (Option<(u64, Vec<f32>)>, Option<f64>) = (None, None);
    let ids: Vec<String> = {
        let mut ids: Vec<String> = merchants.iter().map(|m| m.merchant_id.clone()).collect();
        ids.sort();
        ids
    };
    for round in 1..=rounds {
        let model = template.for_task(&params, &ids)?;
        let family = model.model();
        let analysis = family.analysis().expect("an analysis");
        if analysis.complete(&params) {
            break;
        }
        spec.model = model.clone();
        spec.kind = TaskKind::Train;
        spec.round = round;
        let mut sums = vec![0.0f64; family.update_len()];
        let mut weight = 0.0;
        for m in merchants.iter_mut() {
            if let Some(u) = run_task(&spec, &params, m)?.update {
                if u.values.len() != sums.len() {
                    return Err(TrainError::ModelLength {
                        expected: sums.len(),
                        got: u.values.len(),
                    });
                }
                sums.iter_mut()
                    .zip(&u.values)
                    .for_each(|(s, v)| *s += f64::from(*v));
                weight += u.weight;
            }
        }
        params = analysis.next_version(&params, &sums, weight)?;
        if analysis.checkpoint(&params) || analysis.complete(&params) {
            let metrics = evaluate(&spec, &params, merchants)?;
            if let Some((name, higher)) = spec.model.selection_metric()
                && let Some(&v) = metrics.get(name).filter(|v| v.is_finite())
            {
                let better = best_value.is_none_or(|b| (higher && v > b) || (!higher && v < b));
                if better {
                    best_value = Some(v);
                    best = Some((round, params.clone()));
                }
                stale.evaluated(better);
            }
            history.push(metrics);
            if stale.exhausted() {
                break;
            }
        }
    }
    Ok(Federation {
        params,
        standardizer: spec.standardizer,
        rounds: history,
        best,
    })
}

/// Evaluations in a row without a new best, against the patience of
/// early stopping (none: never exhausted).
struct Patience {
    limit: Option<u64>,
    stale: u64,
}

impl Patience {
    fn new(limit: Option<u64>) -> Self {
        Self { limit, stale: 0 }
    }

    fn evaluated(&mut self, improved: bool) {
        self.stale = if improved { 0 } else { self.stale + 1 };
    }

    fn exhausted(&self) -> bool {
        self.limit.is_some_and(|p| self.stale >= p)
    }
}

/// The statistics step: the weighted mean of `[Σx, Σx²]` over merchants.
pub fn stats_step(
    spec: &TaskSpec,
    merchants: &mut [LocalData],
) -> Result<Option<Standardizer>, TrainError> {
    let len = spec.model.stats_len();
    if len == 0 {
        return Ok(None);
    }
    let mut s = spec.clone();
    s.kind = TaskKind::Stats;
    let mut acc = SumAccumulator::new(len, 0);
    for m in merchants.iter_mut() {
        if let Some(u) = run_task(&s, &[], m)?.update {
            acc.add(&u).map_err(|_| TrainError::ModelLength {
                expected: len,
                got: u.values.len(),
            })?;
        }
    }
    // As the coordinator's statistics step: the rows it was taken over too.
    Ok(Some(
        Standardizer::from_moments(&acc.mean_delta(&Default::default()))
            .with_rows(acc.total_weight()),
    ))
}

/// The weighted mean of every merchant's held-out and validation metrics
/// for `params`, each by the rows it is a mean over ([`PooledMean`]), with
/// the metrics the family computes from the summed evaluation vectors
/// (churn: AUC and PR-AUC from score histograms) in place of their means —
/// what the engine reports for an evaluation round.
pub fn evaluate(
    template: &TaskSpec,
    params: &[f32],
    merchants: &mut [LocalData],
) -> Result<BTreeMap<String, f64>, TrainError> {
    Ok(evaluate_pooled(template, params, merchants)?.0)
}

/// [`evaluate`] and the merchants' total weights.
fn evaluate_pooled(
    template: &TaskSpec,
    params: &[f32],
    merchants: &mut [LocalData],
) -> Result<(BTreeMap<String, f64>, FigureWeights), TrainError> {
    let mut spec = template.clone();
    spec.kind = TaskKind::Evaluate;
    let mut pool = PooledMean::default();
    let mut total = FigureWeights::default();
    let mut pooled = vec![0.0f64; spec.model.eval_len()];
    for m in merchants.iter_mut() {
        let out = run_task(&spec, params, m)?;
        pool.add(&out.metrics, out.figure_weights());
        total.examples += out.weight;
        total.validation += out.validation_weight;
        out.add_values_to(&mut pooled);
    }
    let mut sums = pool.mean();
    if !pooled.is_empty() {
        let pooled = spec.model.pooled_metrics(&pooled);
        if let [_] = merchants {
            // One merchant's own AUC is exact; the histogram's is the same
            // up to binning, and the federated column beside it is exact.
            for (k, v) in pooled {
                sums.entry(k).or_insert(v);
            }
        } else {
            sums.extend(pooled);
        }
    }
    Ok((sums, total))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::split;
    use crate::data::tabular::Schema;
    use crate::federation::strategy::FedAvg;
    use crate::model::lr::SgdParams;
    use crate::task::ModelSpec;
    use crate::train::ChurnData;
    use std::path::Path;

    /// A merchant whose held-out rows are of one class has no AUC: the
    /// pooled AUC is the others' (its weight used to dilute it: a constant
    /// model's 0.5 over 16 of 17 held-out rows read 0.4706), while its
    /// other metrics still count.
    #[test]
    fn a_pooled_metric_averages_only_the_merchants_that_have_it() {
        let row = |merchant: &str, weight: f64, metrics: &[(&str, f64)]| {
            let m: BTreeMap<String, f64> =
                metrics.iter().map(|(k, v)| (k.to_string(), *v)).collect();
            MerchantValue {
                merchant: merchant.into(),
                local_only: m.clone(),
                federated: m,
                centralized: None,
                own_popularity: None,
                global_popularity: None,
                personalised: None,
                personalised_kept: None,
                weight,
                validation_weight: 0.0,
            }
        };
        let rows = [
            row("a", 10.0, &[("auc", 0.5), ("accuracy", 0.8)]),
            row("b", 6.0, &[("auc", 0.5), ("accuracy", 0.5)]),
            row("c", 1.0, &[("accuracy", 1.0)]),
        ];
        let pooled = pooled_columns(&rows);
        assert_eq!(pooled["federated"]["auc"], 0.5);
        assert!((pooled["local_only"]["accuracy"] - 12.0 / 17.0).abs() < 1e-12);
    }

    fn telco_merchants(n: usize, seed: u64) -> Vec<LocalData> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../data/telco-churn/Telco-Customer-Churn.csv");
        let ds = Schema::telco().load_csv(&path).unwrap();
        let all: Vec<usize> = (0..ds.len()).collect();
        split::iid_partition(&all, n, seed)
            .into_iter()
            .enumerate()
            .map(|(k, rows)| {
                let part = ds.select(&rows);
                let (tr, va) = split::stratified_train_test(part.y.as_slice().unwrap(), 0.2, seed);
                LocalData {
                    merchant_id: format!("m{k}"),
                    churn: Some(ChurnData {
                        train: part.select(&tr),
                        valid: part.select(&va),
                    }),
                    mf: None,
                    baskets: None,
                }
            })
            .collect()
    }

    /// A Telco churn logistic-regression training spec seeded with `seed`.
    fn churn_lr_spec(seed: u64) -> TaskSpec {
        TaskSpec {
            kind: TaskKind::Train,
            model: ModelSpec::churn_lr(Schema::telco().num_features()),
            sgd: SgdParams::default(),
            seed,
            round: 0,
            standardizer: None,
            dp: None,
            best_version: None,
        }
    }

    #[test]
    fn telco_lr_federation_reaches_auc_above_0_8_and_is_deterministic() {
        let spec = TaskSpec {
            kind: TaskKind::Train,
            model: ModelSpec::churn_lr(Schema::telco().num_features()),
            sgd: SgdParams {
                epochs: 1,
                batch_size: 32,
                learning_rate: 0.05,
                ..Default::default()
            },
            seed: 42,
            round: 0,
            standardizer: None,
            dp: None,
            best_version: None,
        };
        let mut merchants = telco_merchants(4, 42);
        let a = federate(&spec, &mut merchants, 5, &mut FedAvg).unwrap();
        let b = federate(&spec, &mut merchants, 5, &mut FedAvg).unwrap();
        assert_eq!(a.params, b.params);
        let auc = a.rounds.last().unwrap()["auc"];
        assert!(auc > 0.80, "auc {auc}");
    }

    /// With patience, a federation stops after that many evaluations in a
    /// row without a new best, as the engine does; the baselines of a run
    /// that stopped early get its rule (a probe saw local-only trained 11
    /// rounds against a run stopped after 3).
    #[test]
    fn a_federation_with_patience_stops_after_evaluations_without_a_new_best() {
        let mut spec = churn_lr_spec(5);
        spec.sgd.learning_rate = 0.5;
        let merchants = telco_merchants(3, 5);
        let rounds = 12;
        let full = federate(&spec, &mut merchants.clone(), rounds, &mut FedAvg).unwrap();
        let (name, higher) = spec.model.selection_metric().expect("val_auc");
        let values: Vec<f64> = full.rounds.iter().map(|m| m[name]).collect();
        for patience in [1, 2] {
            // Where the rule stops, read off the full run's figures.
            let (mut best, mut stale, mut stop) = (None::<f64>, 0, values.len());
            for (i, v) in values.iter().enumerate() {
                if best.is_none_or(|b| if higher { *v > b } else { *v < b }) {
                    (best, stale) = (Some(*v), 0);
                } else {
                    stale += 1;
                }
                if stale >= patience {
                    stop = i + 1;
                    break;
                }
            }
            assert!(
                stop < values.len(),
                "{values:?}: no stop at patience {patience}"
            );
            let stopped = federate_until(
                &spec,
                &mut merchants.clone(),
                rounds,
                &mut FedAvg,
                Some(patience),
            )
            .unwrap();
            assert_eq!(stopped.rounds, full.rounds[..stop], "patience {patience}");
            assert!(stopped.served_round() <= stop as u64);
        }
        let never = federate_until(&spec, &mut merchants.clone(), rounds, &mut FedAvg, None);
        assert_eq!(never.unwrap().rounds, full.rounds);
    }

    #[test]
    fn federation_value_compares_each_merchant_three_ways() {
        let spec = churn_lr_spec(3);
        let merchants = telco_merchants(4, 3);
        let value =
            federation_value(&spec, &merchants, 3, None, Federated::Reference(None)).unwrap();
        assert_eq!(value.merchants.len(), 4);
        let fed = federate(&spec, &mut merchants.clone(), 3, &mut FedAvg).unwrap();
        // The federated column is the federated model on each merchant's own rows.
        let mut spec_fed = spec.clone();
        spec_fed.standardizer = fed.standardizer.clone();
        // A merchant's own metrics (its exact AUC, not the pooled-histogram
        // figures `evaluate` adds for a federation).
        let (m0, _) = evaluate_weighted(&spec_fed, &fed.params, &mut merchants[0].clone()).unwrap();
        assert_eq!(value.merchants[0].federated, m0);
        for m in &value.merchants {
            let central = m.centralized.as_ref().expect("LR has no private state");
            assert!(m.local_only["auc"] > 0.5 && m.federated["auc"] > 0.5 && central["auc"] > 0.5);
        }
        assert!(value.centralized_pooled["auc"] > 0.8);
    }

    /// Alone, a merchant's trees get its share of `min_child_weight`: a
    /// Telco merchant with 1/60 of the rows (about 94, hessian sum at most
    /// 24) cannot split a node into two children of 20 and would be a
    /// constant model; with its share (floored at 1) it grows real trees.
    /// Other families train alone with the template unchanged.
    #[test]
    fn a_small_merchant_alone_grows_trees_with_its_share_of_min_child_weight() {
        use crate::model::gbdt::ensemble::Node;
        use crate::model::gbdt::{Ensemble, GbdtParams};
        let merchants = telco_merchants(60, 7);
        let total: usize = merchants
            .iter()
            .map(|m| m.churn.as_ref().unwrap().train.len())
            .sum();
        let params = GbdtParams {
            trees: 3,
            ..GbdtParams::default()
        };
        assert_eq!(params.min_child_weight, 20.0, "the federation's default");
        let spec = TaskSpec {
            model: ModelSpec::ChurnGbdt {
                num_features: Schema::telco().num_features(),
                params: params.clone(),
                level_len: 0,
            },
            ..churn_lr_spec(7)
        };
        let alone = alone_template(&spec, &merchants[0], total);
        let ModelSpec::ChurnGbdt { params: mine, .. } = &alone.model else {
            unreachable!()
        };
        assert_eq!(mine.min_child_weight, 1.0, "20/60 is floored at 1");
        let big = alone_template(&spec, &LocalData::pooled("all", &merchants), total);
        let ModelSpec::ChurnGbdt { params: all, .. } = &big.model else {
            unreachable!()
        };
        assert!((all.min_child_weight - 20.0).abs() < 1e-4, "all the rows");
        let lr = churn_lr_spec(7);
        assert_eq!(alone_template(&lr, &merchants[0], total), lr);

        let rounds = 1 + (params.trees * params.max_depth) as u64;
        let splits = |spec: &TaskSpec| {
            let out = federate(spec, &mut [merchants[0].clone()], rounds, &mut FedAvg).unwrap();
            let ensemble = Ensemble::decode(&out.params).unwrap();
            assert!(!ensemble.trees.is_empty());
            let split = |n: &&Node| matches!(n, Node::Split { .. });
            let counts = ensemble
                .trees
                .iter()
                .map(|t| t.nodes.iter().filter(split).count());
            counts.sum::<usize>()
        };
        assert_eq!(splits(&spec), 0, "with 20 every tree is one leaf");
        assert!(splits(&alone) > 0, "with its share it splits");
    }

    #[test]
    fn served_figures_are_the_federated_column_and_a_missing_merchant_is_named() {
        let spec = churn_lr_spec(3);
        let merchants = telco_merchants(3, 3);
        let figures = |k: usize| ServedFigures {
            metrics: BTreeMap::from([("auc".to_string(), 0.5 + 0.1 * k as f64)]),
            personalised: None,
        };
        let mut served: BTreeMap<String, ServedFigures> =
            (0..3).map(|k| (format!("m{k}"), figures(k))).collect();
        let value =
            federation_value(&spec, &merchants, 2, None, Federated::Served(&served)).unwrap();
        for (k, m) in value.merchants.iter().enumerate() {
            assert_eq!(m.federated, figures(k).metrics);
            assert!(m.weight > 0.0 && m.personalised.is_none());
        }
        let total: f64 = value.merchants.iter().map(|m| m.weight).sum();
        let mean: f64 = value
            .merchants
            .iter()
            .map(|m| m.federated["auc"] * m.weight)
            .sum::<f64>()
            / total;
        assert!((value.pooled["federated"]["auc"] - mean).abs() < 1e-12);
        served.remove("m1");
        let err =
            federation_value(&spec, &merchants, 2, None, Federated::Served(&served)).unwrap_err();
        assert!(
            matches!(&err, ValueError::MissingServed(m) if m == "m1"),
            "{err}"
        );
    }
}
