//! Held-out metrics of an MF model with the agent's private user state: RMSE
//! for explicit feedback; HR@10 and NDCG@10 for implicit feedback, ranking the
//! held-out item among ALL catalogue items the user has not trained on.

use std::collections::BTreeMap;

use super::{MfData, Rating, item_offsets};
use crate::metrics::FigureWeights;

/// Cut-off of the ranking metrics.
pub const TOP_K: usize = 10;

/// Each user's training items, sorted (compressed rows), for excluding them
/// from rankings and from sampled negatives.
#[derive(Debug, Clone)]
pub struct UserItems {
    offsets: Vec<usize>,
    items: Vec<u32>,
}

impl UserItems {
    /// Groups `ratings` by user; duplicates are kept once.
    pub fn new(ratings: &[Rating], num_users: usize) -> Self {
        let (offsets, mut items) = group_by_user(ratings, num_users, |r| r.item);
        for u in 0..num_users {
            items[offsets[u]..offsets[u + 1]].sort_unstable();
        }
        Self { offsets, items }
    }

    /// The sorted training items of user `u` (may contain repeats).
    pub fn items(&self, u: usize) -> &[u32] {
        &self.items[self.offsets[u]..self.offsets[u + 1]]
    }
}

/// `of` each of `ratings`, grouped by user in a stable counting sort: user
/// `u`'s at `values[offsets[u]..offsets[u + 1]]`. Returns `(offsets, values)`.
pub(super) fn group_by_user<T: Copy>(
    ratings: &[Rating],
    num_users: usize,
    of: impl Fn(&Rating) -> T,
) -> (Vec<usize>, Vec<T>) {
    let mut offsets = vec![0usize; num_users + 1];
    for r in ratings {
        offsets[r.user as usize + 1] += 1;
    }
    for u in 0..num_users {
        offsets[u + 1] += offsets[u];
    }
    let mut fill = offsets.clone();
    let mut values: Vec<T> = ratings.iter().map(&of).collect();
    for r in ratings {
        values[fill[r.user as usize]] = of(r);
        fill[r.user as usize] += 1;
    }
    (offsets, values)
}

/// RMSE of the model on the merchant's test ratings (0 if it has none).
pub fn rmse_of(global: &[f32], n: usize, k: usize, clip: Option<[f32; 2]>, data: &MfData) -> f64 {
    rmse_on(global, n, k, clip, data, &data.test)
}

/// RMSE of the model on `rows` of the merchant (its test or validation
/// ratings; 0 if empty).
pub fn rmse_on(
    global: &[f32],
    n: usize,
    k: usize,
    clip: Option<[f32; 2]>,
    data: &MfData,
    rows: &[Rating],
) -> f64 {
    let s = &data.state;
    rmse_with(global, n, k, clip, (&s.bias, &s.factors), rows)
}

/// RMSE on `rows` with the user side `(biases, factors)` given (0 if empty).
pub fn rmse_with(
    global: &[f32],
    n: usize,
    k: usize,
    clip: Option<[f32; 2]>,
    users: (&[f32], &[f32]),
    rows: &[Rating],
) -> f64 {
    let se: f64 = rows
        .iter()
        .map(|r| f64::from(r.value - predict(global, n, k, true, clip, users, r)).powi(2))
        .sum();
    if rows.is_empty() {
        0.0
    } else {
        (se / rows.len() as f64).sqrt()
    }
}

/// The model's score of each of `rows`, in order (see [`predict`]).
pub fn test_scores(
    global: &[f32],
    n: usize,
    k: usize,
    with_user_bias: bool,
    clip: Option<[f32; 2]>,
    users: (&[f32], &[f32]),
    rows: &[Rating],
) -> Vec<f32> {
    rows.iter()
        .map(|r| predict(global, n, k, with_user_bias, clip, users, r))
        .collect()
}

/// The model's score of `r` with the user side `(biases, factors)`:
/// `b_i + p_u·q_i`, plus `μ + b_u` and clipped to `clip` when
/// `with_user_bias` (explicit feedback, the prediction RMSE measures).
fn predict(
    global: &[f32],
    n: usize,
    k: usize,
    with_user_bias: bool,
    clip: Option<[f32; 2]>,
    (bias, factors): (&[f32], &[f32]),
    r: &Rating,
) -> f32 {
    let (u, i) = (r.user as usize, r.item as usize);
    let (b, f) = item_offsets(n, k, i);
    let pu = &factors[u * k..(u + 1) * k];
    let dot: f32 = pu.iter().zip(&global[f..f + k]).map(|(p, q)| p * q).sum();
    let mut pred = if with_user_bias {
        global[0] + bias[u] + global[b] + dot
    } else {
        global[b] + dot
    };
    if let Some([lo, hi]) = clip {
        pred = pred.clamp(lo, hi);
    }
    pred
}

/// HR@10 and NDCG@10 contributions of one held-out item: its 0-based rank
/// among `scores`, skipping the user's training items `exclude` (sorted).
/// Ties count against the held-out item, so a constant model scores nothing.
pub fn ranking_metrics(scores: &[f32], target: usize, exclude: &[u32]) -> (f64, f64) {
    let t = scores[target];
    let mut rank = 0usize;
    for (j, &s) in scores.iter().enumerate() {
        if j != target && s >= t && exclude.binary_search(&(j as u32)).is_err() {
            rank += 1;
        }
    }
    if rank < TOP_K {
        (1.0, 1.0 / ((rank + 2) as f64).log2())
    } else {
        (0.0, 0.0)
    }
}

/// Weights of the merchant's own popularity tried in the blended score
/// `(1 − w)·z(model) + w·z(log(1 + popularity))`; 1 is popularity with its
/// ties broken by the model (see [`blend`]), so a merchant whose validation
/// prefers its bestsellers gets them.
pub const POP_BLEND_GRID: [f32; 7] = [0.0, 0.1, 0.2, 0.35, 0.5, 0.7, 1.0];

/// The merchant's own popularity of each item, `log(1 + distinct users
/// who bought it)` over the training interactions, standardised over the
/// catalogue (all zeros when nothing was bought).
pub fn local_popularity(data: &MfData, n: usize) -> Vec<f32> {
    let by_user = UserItems::new(&data.train, data.users.len());
    let mut count = vec![0u32; n];
    for u in 0..data.users.len() {
        let items = by_user.items(u);
        for (j, &i) in items.iter().enumerate() {
            if j == 0 || items[j - 1] != i {
                count[i as usize] += 1;
            }
        }
    }
    let mut pop: Vec<f32> = count.iter().map(|&c| (c as f32).ln_1p()).collect();
    standardise(&mut pop);
    pop
}

/// Shifts and scales `v` to mean 0 and standard deviation 1 (left centred
/// when constant), so model scores and popularity blend on one scale.
fn standardise(v: &mut [f32]) {
    let n = v.len().max(1) as f64;
    let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
    let var = v
        .iter()
        .map(|&x| (f64::from(x) - mean).powi(2))
        .sum::<f64>()
        / n;
    let sd = if var > 0.0 { var.sqrt() } else { 1.0 };
    for x in v {
        *x = ((f64::from(*x) - mean) / sd) as f32;
    }
}

/// The model's score of every item for user `u`: `b_i + p_u·q_i`,
/// standardised over the catalogue.
pub fn user_scores(global: &[f32], n: usize, k: usize, data: &MfData, u: usize, out: &mut [f32]) {
    scores_of(global, n, &data.state.factors[u * k..(u + 1) * k], out);
}

/// Standardised scores of every item for the user factors `pu`.
fn scores_of(global: &[f32], n: usize, pu: &[f32], out: &mut [f32]) {
    let k = pu.len();
    let biases = &global[1..1 + n];
    let factors = &global[1 + n..];
    for (j, sc) in out.iter_mut().enumerate() {
        let q = &factors[j * k..(j + 1) * k];
        *sc = biases[j] + pu.iter().zip(q).map(|(a, b)| a * b).sum::<f32>();
    }
    standardise(out);
}

/// How much of the model a blend of weight 1 keeps: enough to order items
/// of equal popularity, too little to reorder different popularities.
const TIE_BREAK: f32 = 1e-4;

/// Blends standardised model scores with standardised popularity. At
/// `w = 1` the model still breaks popularity's ties: a merchant with one
/// customer has the same popularity (none) for every item that customer has
/// not bought, and a tie ranks nothing (ties count against a held-out item,
/// and a shop would list arbitrary items).
pub fn blend(model: &[f32], pop: &[f32], w: f32, out: &mut [f32]) {
    let m_weight = (1.0 - w).max(TIE_BREAK);
    for ((o, &m), &p) in out.iter_mut().zip(model).zip(pop) {
        *o = m_weight * m + w * p;
    }
}

/// Ranking metrics of the merchant's implicit model: HR@10 and NDCG@10 on
/// the test purchases (`hr@10`, `ndcg@10`) and on the validation slice
/// (`val_hr@10`, `val_ndcg@10`), with the popularity blend weight
/// (`pop_blend`) chosen on the validation slice alone: the grid value with
/// the best validation HR@10, then NDCG@10 (exact ties to the larger
/// weight, popularity), or 0 without a
/// validation slice. A validation item is ranked against everything the user
/// has not trained on; a test item also excludes the validation items (the
/// customer bought those too). With `test_users` (`users × k`), the test
/// items are ranked with those user factors instead of `data.state`'s: the
/// users refitted on their whole known history, validation included, once
/// validation has done its choosing (iALS, whose user side is a closed-form
/// solve). Returns the metrics, their weights (the test purchases behind
/// `hr@10` and `ndcg@10`, the validation purchases behind the `val_*`
/// figures) and the chosen blend.
pub fn implicit_metrics(
    global: &[f32],
    n: usize,
    k: usize,
    data: &MfData,
    test_users: Option<&[f32]>,
) -> (BTreeMap<String, f64>, FigureWeights, f32) {
    let nu = data.users.len();
    let by_user = UserItems::new(&data.train, nu);
    let with_valid = if data.valid.is_empty() {
        by_user.clone()
    } else {
        let mut all = data.train.clone();
        all.extend_from_slice(&data.valid);
        UserItems::new(&all, nu)
    };
    let pop = local_popularity(data, n);
    // One scoring pass per user ranks its validation and test items under
    // every grid weight (a rank is O(n), the scores O(n·k)); the weight is
    // then chosen on the validation sums alone and its test column reported.
    let mut valid_of: Vec<Vec<u32>> = vec![Vec::new(); nu];
    let mut test_of: Vec<Vec<u32>> = vec![Vec::new(); nu];
    for r in &data.valid {
        valid_of[r.user as usize].push(r.item);
    }
    for r in &data.test {
        test_of[r.user as usize].push(r.item);
    }
    let grid: &[f32] = if data.valid.is_empty() {
        &[0.0]
    } else {
        &POP_BLEND_GRID
    };
    let mut model = vec![0.0f32; n];
    let mut model_test = vec![0.0f32; n];
    let mut scores = vec![0.0f32; n];
    let mut val = vec![(0.0f64, 0.0f64); grid.len()];
    let mut test = vec![(0.0f64, 0.0f64); grid.len()];
    for u in 0..nu {
        if valid_of[u].is_empty() && test_of[u].is_empty() {
            continue;
        }
        user_scores(global, n, k, data, u, &mut model);
        let for_test = match test_users {
            Some(users) if !test_of[u].is_empty() => {
                scores_of(global, n, &users[u * k..(u + 1) * k], &mut model_test);
                &model_test
            }
            _ => &model,
        };
        for (g, &w) in grid.iter().enumerate() {
            blend(&model, &pop, w, &mut scores);
            for &item in &valid_of[u] {
                let (h, d) = ranking_metrics(&scores, item as usize, by_user.items(u));
                val[g].0 += h;
                val[g].1 += d;
            }
            if test_of[u].is_empty() {
                continue;
            }
            blend(for_test, &pop, w, &mut scores);
            for &item in &test_of[u] {
                let (h, d) = ranking_metrics(&scores, item as usize, with_valid.items(u));
                test[g].0 += h;
                test[g].1 += d;
            }
        }
    }
    // The best validation HR@10, then NDCG@10; an exact tie goes to the
    // larger popularity weight: the model has to beat the merchant's own
    // bestsellers on validation to move its ranking (a tie chose the model
    // alone, and small stores, with a few validation hits, tie often).
    let mut best = 0;
    for g in 1..val.len() {
        if (val[g].0, val[g].1) >= (val[best].0, val[best].1) {
            best = g;
        }
    }
    let w = grid[best];
    let (hr, ndcg) = test[best];
    let mean = |x: f64, m: usize| if m > 0 { x / m as f64 } else { 0.0 };
    // A merchant with no test purchase (no customer with two distinct
    // items) has no test figure: it read as a measured 0 (a data probe).
    let mut metrics = BTreeMap::new();
    if !data.test.is_empty() {
        metrics.insert("hr@10".into(), mean(hr, data.test.len()));
        metrics.insert("ndcg@10".into(), mean(ndcg, data.test.len()));
    }
    if !data.valid.is_empty() {
        let m = data.valid.len();
        metrics.insert("val_hr@10".into(), mean(val[best].0, m));
        metrics.insert("val_ndcg@10".into(), mean(val[best].1, m));
        metrics.insert("val_hr@10_model".into(), mean(val[0].0, m));
        metrics.insert("val_hr@10_pop".into(), mean(val[grid.len() - 1].0, m));
        metrics.insert("pop_blend".into(), f64::from(w));
    }
    let weights = FigureWeights {
        examples: data.test.len() as f64,
        validation: data.valid.len() as f64,
    };
    (metrics, weights, w)
}

/// Distinct buyers of each item among `data`'s training and validation
/// interactions (what a popularity baseline counts: it needs no validation).
pub fn item_buyers(data: &MfData, n: usize) -> Vec<u32> {
    let mut all = data.train.clone();
    all.extend_from_slice(&data.valid);
    let by_user = UserItems::new(&all, data.users.len());
    let mut count = vec![0u32; n];
    for u in 0..data.users.len() {
        let items = by_user.items(u);
        for (j, &i) in items.iter().enumerate() {
            if j == 0 || items[j - 1] != i {
                count[i as usize] += 1;
            }
        }
    }
    count
}

/// HR@10 and NDCG@10 of ranking every test purchase by `counts` (a
/// popularity baseline), excluding the user's training and validation items;
/// ties count against the held-out item. Returns the metrics and the number
/// of test purchases.
pub fn popularity_metrics(counts: &[u32], data: &MfData) -> (BTreeMap<String, f64>, f64) {
    let scores: Vec<f32> = counts.iter().map(|&c| c as f32).collect();
    let mut all = data.train.clone();
    all.extend_from_slice(&data.valid);
    let by_user = UserItems::new(&all, data.users.len());
    let (mut hr, mut ndcg) = (0.0, 0.0);
    for r in &data.test {
        let (h, g) = ranking_metrics(&scores, r.item as usize, by_user.items(r.user as usize));
        hr += h;
        ndcg += g;
    }
    let m = data.test.len();
    let mean = |x: f64| if m > 0 { x / m as f64 } else { 0.0 };
    (
        BTreeMap::from([("hr@10".into(), mean(hr)), ("ndcg@10".into(), mean(ndcg))]),
        m as f64,
    )
}
