//! Federated k-means segmentation of customers on their RFM features.
//!
//! # Lloyd rounds as ordinary updates
//!
//! The federated parameters are the k centres, `k · d` values in the
//! standardised feature space (standardised with the statistics step, like
//! the churn families). In a training round each merchant assigns its
//! customers to the nearest global centre `μ_c` and sends, for every cluster
//! `c`, the sum `Σ_{x ∈ c} (x − μ_c)` (d values) and the count `n_c` as the
//! cluster's per-coordinate weight. The layout groups the `d` coordinates of a
//! centre under one weight, so the engine's usual "sum, then divide" gives
//! `Σ_m Σ_{x∈c}(x − μ_c) / Σ_m n_c = mean_c − μ_c`, and FedAvg's
//! `global + step` is exactly the Lloyd update `μ_c ← mean_c`; a cluster no
//! merchant fills keeps its centre. Nothing else leaves a merchant, so the
//! step is a plain sum and secure aggregation hides each merchant's sums and
//! counts like any other update. The engine needs no k-means code.
//!
//! # Initialisation (k-means++ without rows)
//!
//! [`local_candidates`] runs k-means++ and a few Lloyd iterations on the
//! merchant's own (standardised) customers and proposes the centres of its
//! local clusters with their sizes; clusters of fewer than
//! [`MIN_CANDIDATE_SIZE`] customers are dropped, so a candidate is always the
//! mean of at least that many customers, never one customer's row. The
//! coordinator clusters the weighted candidates ([`centres_from_candidates`]:
//! weighted k-means++, weighted Lloyd, best of several seeds). What the
//! candidates reveal: each merchant's local cluster means and sizes, i.e. a
//! coarse picture of its customer distribution (how many customers of which
//! broad RFM profile it has). Candidates are not secure-aggregated (they are
//! not a sum); a merchant unwilling to reveal that much can propose none and
//! the first centres come from the others.
//!
//! # Choosing k
//!
//! [`elbow`] picks k from the federated inertia curve (the evaluation metric
//! `inertia`, a per-customer mean summed with example weights across
//! merchants): the k after which adding a cluster gains least relative to
//! the gain before it (largest second difference of the curve).

use std::collections::BTreeMap;

use ndarray::{Array2, ArrayView1};
use rand::{Rng, RngExt};

use super::{FederatedModel, LocalData, RoundContext, TaskOutput, TrainError};
use crate::data::standardize::{Standardizer, stats_update};
use crate::federation::update::{Segment, Update, WeightLayout};

/// Smallest local cluster a merchant proposes as an initial candidate: a
/// candidate is the mean of at least this many customers.
pub const MIN_CANDIDATE_SIZE: usize = 5;

/// Lloyd iterations of a merchant's local clustering (candidates).
const LOCAL_ITERS: usize = 10;

/// k-means on `num_features` standardised features with `k` centres.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KMeans<'a> {
    /// Number of segments.
    pub k: usize,
    /// Feature width (the RFM features of the orders pipeline).
    pub num_features: usize,
    /// The agreed first centres (`k · d`, standardised space), or empty for
    /// zeros (only useful in tests).
    pub init: &'a [f32],
}

impl KMeans<'_> {
    /// All of the merchant's customers (training and held-out rows): a
    /// segmentation has no held-out set.
    fn rows(&self, data: &LocalData) -> Result<Array2<f32>, TrainError> {
        let churn = data.churn.as_ref().ok_or(TrainError::NoData("churn"))?;
        if churn.train.x.ncols() != self.num_features {
            return Err(TrainError::FeatureWidth {
                expected: self.num_features,
                got: churn.train.x.ncols(),
            });
        }
        let x = ndarray::concatenate(
            ndarray::Axis(0),
            &[churn.train.x.view(), churn.valid.x.view()],
        )
        .expect("train and held-out rows have the same width");
        Ok(x)
    }

    fn prepare(
        &self,
        ctx: &RoundContext<'_>,
        global: &[f32],
        data: &LocalData,
    ) -> Result<Array2<f32>, TrainError> {
        let x = self.rows(data)?;
        if global.len() != self.model_len() {
            return Err(TrainError::ModelLength {
                expected: self.model_len(),
                got: global.len(),
            });
        }
        let scaler = ctx.standardizer.ok_or(TrainError::MissingStandardizer)?;
        Ok(scaler.transform(&x))
    }
}

impl FederatedModel for KMeans<'_> {
    fn name(&self) -> &'static str {
        "kmeans"
    }

    fn data_family(&self) -> &'static str {
        "churn"
    }

    fn model_len(&self) -> usize {
        self.k * self.num_features
    }

    fn layout(&self) -> WeightLayout {
        WeightLayout {
            segments: vec![Segment {
                len: self.model_len(),
                group_len: Some(self.num_features),
            }],
            num_coord_weights: self.k,
        }
    }

    fn stats_len(&self) -> usize {
        2 * self.num_features
    }

    fn initial_params(&self, _seed: u64) -> Vec<f32> {
        if self.init.len() == self.model_len() {
            self.init.to_vec()
        } else {
            vec![0.0; self.model_len()]
        }
    }

    fn local_epochs(&self, _sgd: &super::sgd::SgdParams) -> usize {
        1
    }

    fn check(&self) -> Result<(), TrainError> {
        if self.k == 0 || self.num_features == 0 {
            return Err(TrainError::InvalidModel(
                "k-means needs k >= 1 and at least one feature".into(),
            ));
        }
        if !self.init.is_empty() && self.init.len() != self.model_len() {
            return Err(TrainError::InvalidModel(format!(
                "k-means init has {} values, k·d = {}",
                self.init.len(),
                self.model_len()
            )));
        }
        Ok(())
    }

    fn stats(
        &self,
        _ctx: &RoundContext<'_>,
        data: &mut LocalData,
    ) -> Result<TaskOutput, TrainError> {
        let update = stats_update(&self.rows(data)?);
        let weight = update.weight;
        Ok(TaskOutput {
            update: Some(update),
            metrics: BTreeMap::new(),
            weight,
            validation_weight: 0.0,
        })
    }

    fn fit(
        &self,
        ctx: &RoundContext<'_>,
        global: &[f32],
        data: &mut LocalData,
    ) -> Result<TaskOutput, TrainError> {
        self.check()?;
        let x = self.prepare(ctx, global, data)?;
        let step = lloyd_step(&x, global, self.k);
        let n = x.nrows() as f64;
        let update = step.update(global, self.num_features);
        if update.values.iter().any(|v| !v.is_finite()) {
            return Err(TrainError::Diverged);
        }
        Ok(TaskOutput {
            update: Some(update),
            metrics: BTreeMap::from([("inertia".to_string(), step.inertia / n.max(1.0))]),
            weight: n,
            validation_weight: 0.0,
        })
    }

    fn evaluate(
        &self,
        ctx: &RoundContext<'_>,
        global: &[f32],
        data: &mut LocalData,
    ) -> Result<TaskOutput, TrainError> {
        let x = self.prepare(ctx, global, data)?;
        let step = lloyd_step(&x, global, self.k);
        let n = x.nrows() as f64;
        Ok(TaskOutput {
            update: None,
            metrics: BTreeMap::from([("inertia".to_string(), step.inertia / n.max(1.0))]),
            weight: n,
            validation_weight: 0.0,
        })
    }

    /// The segment (0..k, as f32) of each of the merchant's customers, training
    /// rows then held-out rows.
    fn score(
        &self,
        ctx: &RoundContext<'_>,
        global: &[f32],
        data: &mut LocalData,
    ) -> Result<Vec<f32>, TrainError> {
        let x = self.prepare(ctx, global, data)?;
        Ok(assign(&x, global, self.k)
            .into_iter()
            .map(|(c, _)| c as f32)
            .collect())
    }
}

/// What one merchant's Lloyd step computes from its rows and the centres.
#[derive(Debug, Clone, PartialEq)]
pub struct LloydStep {
    /// `Σ_{x∈c} x` per cluster, `k · d`, in f64.
    pub sums: Vec<f64>,
    /// Customers per cluster.
    pub counts: Vec<u64>,
    /// `Σ ‖x − μ_{c(x)}‖²` against the centres the step started from.
    pub inertia: f64,
}

impl LloydStep {
    /// The update the merchant sends: `Σ_{x∈c}(x − μ_c)` per cluster, the
    /// counts as per-cluster weights, weight = rows.
    pub fn update(&self, centres: &[f32], d: usize) -> Update {
        let values = self
            .sums
            .iter()
            .enumerate()
            .map(|(i, s)| (s - self.counts[i / d] as f64 * f64::from(centres[i])) as f32)
            .collect();
        Update {
            values,
            coord_weights: self.counts.iter().map(|&c| c as f32).collect(),
            weight: self.counts.iter().sum::<u64>() as f64,
        }
    }
}

fn sq_dist(x: ArrayView1<'_, f32>, c: &[f32]) -> f64 {
    x.iter()
        .zip(c)
        .map(|(a, b)| {
            let t = f64::from(*a) - f64::from(*b);
            t * t
        })
        .sum()
}

/// Nearest centre of every row (lowest index on ties) and its squared distance.
pub fn assign(x: &Array2<f32>, centres: &[f32], k: usize) -> Vec<(usize, f64)> {
    let d = x.ncols();
    x.rows()
        .into_iter()
        .map(|row| {
            (0..k)
                .map(|c| (c, sq_dist(row, &centres[c * d..(c + 1) * d])))
                .fold(
                    (0, f64::INFINITY),
                    |best, cur| {
                        if cur.1 < best.1 { cur } else { best }
                    },
                )
        })
        .collect()
}

/// One merchant's Lloyd step: per-cluster sums and counts and the inertia.
pub fn lloyd_step(x: &Array2<f32>, centres: &[f32], k: usize) -> LloydStep {
    let d = x.ncols();
    let mut sums = vec![0.0; k * d];
    let mut counts = vec![0u64; k];
    let mut inertia = 0.0;
    for (row, (c, dist)) in x.rows().into_iter().zip(assign(x, centres, k)) {
        counts[c] += 1;
        inertia += dist;
        for (s, v) in sums[c * d..(c + 1) * d].iter_mut().zip(row) {
            *s += f64::from(*v);
        }
    }
    LloydStep {
        sums,
        counts,
        inertia,
    }
}

/// Sum of squared distances of the rows to their nearest centre.
pub fn inertia(x: &Array2<f32>, centres: &[f32], k: usize) -> f64 {
    assign(x, centres, k).iter().map(|(_, d)| d).sum()
}

/// Weighted k-means++ seeding over `points` (`n · d`, weights `w`).
fn plus_plus(points: &[f32], w: &[f64], d: usize, k: usize, rng: &mut impl Rng) -> Vec<f32> {
    let n = w.len();
    let dist = |i: usize, c: &[f32]| -> f64 {
        points[i * d..(i + 1) * d]
            .iter()
            .zip(c)
            .map(|(a, b)| f64::from(a - b).powi(2))
            .sum()
    };
    let pick = |weights: &[f64], rng: &mut dyn FnMut() -> f64| -> usize {
        let total: f64 = weights.iter().sum();
        let mut r = rng() * total;
        for (i, wi) in weights.iter().enumerate() {
            r -= wi;
            if r < 0.0 {
                return i;
            }
        }
        weights.iter().rposition(|&x| x > 0.0).unwrap_or(0)
    };
    let mut draw = || rng.random::<f64>();
    let first = pick(w, &mut draw);
    let mut centres = points[first * d..(first + 1) * d].to_vec();
    let mut best: Vec<f64> = (0..n).map(|i| dist(i, &centres[..d])).collect();
    while centres.len() < k * d {
        let score: Vec<f64> = best.iter().zip(w).map(|(b, wi)| b * wi).collect();
        let i = if score.iter().sum::<f64>() > 0.0 {
            pick(&score, &mut draw)
        } else {
            pick(w, &mut draw)
        };
        let c = points[i * d..(i + 1) * d].to_vec();
        for (j, b) in best.iter_mut().enumerate() {
            *b = b.min(dist(j, &c));
        }
        centres.extend(c);
    }
    centres
}

/// Weighted Lloyd iterations over points held in one place; returns the
/// centres and the weighted inertia.
fn weighted_lloyd(
    points: &[f32],
    w: &[f64],
    d: usize,
    k: usize,
    mut centres: Vec<f32>,
    iters: usize,
) -> (Vec<f32>, f64) {
    let x = Array2::from_shape_vec((w.len(), d), points.to_vec()).expect("n · d points");
    let mut last = f64::INFINITY;
    for _ in 0..iters {
        let a = assign(&x, &centres, k);
        let mut sums = vec![0.0f64; k * d];
        let mut counts = vec![0.0f64; k];
        let mut inertia = 0.0;
        for (i, (c, dist)) in a.iter().enumerate() {
            counts[*c] += w[i];
            inertia += w[i] * dist;
            for j in 0..d {
                sums[c * d + j] += w[i] * f64::from(points[i * d + j]);
            }
        }
        for c in 0..k {
            if counts[c] > 0.0 {
                for j in 0..d {
                    centres[c * d + j] = (sums[c * d + j] / counts[c]) as f32;
                }
            }
        }
        if (last - inertia).abs() <= 1e-9 * last.abs() {
            last = inertia;
            break;
        }
        last = inertia;
    }
    let a = assign(&x, &centres, k);
    let inertia: f64 = a.iter().zip(w).map(|((_, dist), wi)| dist * wi).sum();
    (centres, inertia.min(last))
}

/// A merchant's proposals for the first centres: the means and sizes of its
/// local clusters (local k-means++ then Lloyd on `x`, already standardised
/// with the federation's statistics), keeping only clusters of at least
/// [`MIN_CANDIDATE_SIZE`] customers. Returns `(centres m·d, sizes m)`.
pub fn local_candidates(
    x: &Array2<f32>,
    clusters: usize,
    rng: &mut impl Rng,
) -> (Vec<f32>, Vec<f64>) {
    let n = x.nrows();
    let d = x.ncols();
    let m = clusters.min(n / MIN_CANDIDATE_SIZE);
    if m == 0 {
        return (Vec::new(), Vec::new());
    }
    let points: Vec<f32> = x.iter().copied().collect();
    let ones = vec![1.0; n];
    let seeds = plus_plus(&points, &ones, d, m, rng);
    let (centres, _) = weighted_lloyd(&points, &ones, d, m, seeds, LOCAL_ITERS);
    let step = lloyd_step(x, &centres, m);
    let mut out = Vec::new();
    let mut sizes = Vec::new();
    for c in 0..m {
        let size = step.counts[c] as usize;
        if size >= MIN_CANDIDATE_SIZE {
            out.extend(
                step.sums[c * d..(c + 1) * d]
                    .iter()
                    .map(|s| (s / size as f64) as f32),
            );
            sizes.push(size as f64);
        }
    }
    (out, sizes)
}

/// The coordinator's side of the initialisation: k centres from everyone's
/// weighted candidates (weighted k-means++ and Lloyd, the best of `n_init`
/// seeds by weighted inertia). Fewer candidates than `k` repeat the last.
pub fn centres_from_candidates(
    candidates: &[f32],
    sizes: &[f64],
    d: usize,
    k: usize,
    n_init: usize,
    rng: &mut impl Rng,
) -> Vec<f32> {
    if sizes.is_empty() {
        return vec![0.0; k * d];
    }
    let mut best: Option<(Vec<f32>, f64)> = None;
    for _ in 0..n_init.max(1) {
        let seeds = plus_plus(candidates, sizes, d, k, rng);
        let (c, inertia) = weighted_lloyd(candidates, sizes, d, k, seeds, 100);
        if best.as_ref().is_none_or(|(_, b)| inertia < *b) {
            best = Some((c, inertia));
        }
    }
    best.expect("at least one init").0
}

/// Below this share of its first inertia gained from its first k to its
/// last, an inertia curve is flat: more clusters barely fit the customers
/// better, so the data show no segments and an elbow is noise. Set by
/// judgement, not tuned: RFM features of the bundled logs gain about half
/// of their inertia from k = 2 to 8; a table whose distance is dominated by
/// one-hot columns of many values (each rare value standardised to about
/// 1/√p) gained 0.19 % and its "elbow" picked six segments, four of them a
/// few dozen customers sharing one rare value.
pub const FLAT_CURVE_GAIN: f64 = 0.05;

/// Whether an inertia curve (increasing k) is flat ([`FLAT_CURVE_GAIN`]).
pub fn is_flat(inertias: &[f64]) -> bool {
    match (inertias.first(), inertias.last()) {
        (Some(&first), Some(&last)) if inertias.len() >= 2 && first > 0.0 => {
            (first - last) / first < FLAT_CURVE_GAIN
        }
        _ => false,
    }
}

/// The points of an inertia curve (increasing k) whose fit is better than
/// every smaller k's. The best k + 1 clustering is never worse than the
/// best k one (one more centre placed on any customer keeps every distance),
/// so a fit that comes out no better than a smaller k's is a poor local
/// optimum of k-means, not a measurement of k: on a probe's orders it
/// raised the curve at k = 8 (704 after 640 at k = 7), and the largest
/// second difference then picked k = 7 for a curve with no bend there.
pub fn improving_fits(ks: &[usize], inertias: &[f64]) -> Vec<(usize, f64)> {
    let mut kept: Vec<(usize, f64)> = Vec::with_capacity(ks.len());
    for (&k, &inertia) in ks.iter().zip(inertias) {
        if kept.last().is_none_or(|&(_, best)| inertia < best) {
            kept.push((k, inertia));
        }
    }
    kept
}

/// The elbow of an inertia curve `inertias[i]` = inertia with `ks[i]`
/// clusters (increasing k): the k where the gain of one more cluster drops
/// the most (the largest second difference; per added cluster where k
/// steps unevenly). Only fits better than every smaller k's count
/// ([`improving_fits`]). Needs three points; with fewer it returns the last
/// k counted. A flat curve ([`is_flat`]) has no elbow: the smallest k.
pub fn elbow(ks: &[usize], inertias: &[f64]) -> usize {
    let fits = improving_fits(ks, inertias);
    if fits.len() < 3 {
        return fits.last().map_or(1, |&(k, _)| k);
    }
    let curve: Vec<f64> = fits.iter().map(|&(_, i)| i).collect();
    if is_flat(&curve) {
        return fits[0].0;
    }
    let gain = |a: (usize, f64), b: (usize, f64)| (a.1 - b.1) / (b.0 - a.0) as f64;
    fits.windows(3)
        .map(|w| (w[1].0, gain(w[0], w[1]) - gain(w[1], w[2])))
        .fold((fits[1].0, f64::NEG_INFINITY), |best, cur| {
            if cur.1 > best.1 { cur } else { best }
        })
        .0
}

/// Standardises a merchant's rows for the local candidate step.
pub fn standardised_rows(
    data: &LocalData,
    num_features: usize,
    scaler: &Standardizer,
) -> Result<Array2<f32>, TrainError> {
    let km = KMeans {
        k: 1,
        num_features,
        init: &[],
    };
    Ok(scaler.transform(&km.rows(data)?))
}

#[cfg(test)]
mod tests;
