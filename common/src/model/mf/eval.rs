//! Held-out metrics of an MF model with the agent's private user state: RMSE
//! for explicit feedback; HR@10 and NDCG@10 for implicit feedback, ranking the
//! held-out item among ALL catalogue items the user has not trained on.

use std::collections::BTreeMap;

use super::{MfData, Rating, item_offsets};

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
        let mut offsets = vec![0usize; num_users + 1];
        for r in ratings {
            offsets[r.user as usize + 1] += 1;
        }
        for u in 0..num_users {
            offsets[u + 1] += offsets[u];
        }
        let mut fill = offsets.clone();
        let mut items = vec![0u32; ratings.len()];
        for r in ratings {
            items[fill[r.user as usize]] = r.item;
            fill[r.user as usize] += 1;
        }
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

/// RMSE of the model on the merchant's test ratings (0 if it has none).
pub fn rmse_of(global: &[f32], n: usize, k: usize, clip: Option<[f32; 2]>, data: &MfData) -> f64 {
    let s = &data.state;
    let mut se = 0.0f64;
    for r in &data.test {
        let (u, i) = (r.user as usize, r.item as usize);
        let (b, f) = item_offsets(n, k, i);
        let pu = &s.factors[u * k..(u + 1) * k];
        let dot: f32 = pu.iter().zip(&global[f..f + k]).map(|(p, q)| p * q).sum();
        let mut pred = global[0] + s.bias[u] + global[b] + dot;
        if let Some([lo, hi]) = clip {
            pred = pred.clamp(lo, hi);
        }
        se += f64::from(r.value - pred).powi(2);
    }
    if data.test.is_empty() {
        0.0
    } else {
        (se / data.test.len() as f64).sqrt()
    }
}

/// The model's score of each test interaction, in order: `b_i + p_u·q_i`,
/// plus `μ + b_u` and clipped to `clip` when `with_user_bias` (explicit
/// feedback, the prediction `rmse_of` measures).
pub fn test_scores(
    global: &[f32],
    n: usize,
    k: usize,
    with_user_bias: bool,
    clip: Option<[f32; 2]>,
    data: &MfData,
) -> Vec<f32> {
    let s = &data.state;
    data.test
        .iter()
        .map(|r| {
            let (u, i) = (r.user as usize, r.item as usize);
            let (b, f) = item_offsets(n, k, i);
            let pu = &s.factors[u * k..(u + 1) * k];
            let dot: f32 = pu.iter().zip(&global[f..f + k]).map(|(p, q)| p * q).sum();
            let mut pred = if with_user_bias {
                global[0] + s.bias[u] + global[b] + dot
            } else {
                global[b] + dot
            };
            if let Some([lo, hi]) = clip {
                pred = pred.clamp(lo, hi);
            }
            pred
        })
        .collect()
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

/// Mean HR@10 and NDCG@10 over the merchant's held-out purchases, with the
/// number of held-out purchases as the weight.
pub fn implicit_metrics(
    global: &[f32],
    n: usize,
    k: usize,
    data: &MfData,
) -> (BTreeMap<String, f64>, f64) {
    let by_user = UserItems::new(&data.train, data.users.len());
    let s = &data.state;
    let biases = &global[1..1 + n];
    let factors = &global[1 + n..];
    let mut scores = vec![0.0f32; n];
    let (mut hr, mut ndcg) = (0.0, 0.0);
    for r in &data.test {
        let u = r.user as usize;
        let pu = &s.factors[u * k..(u + 1) * k];
        for (j, sc) in scores.iter_mut().enumerate() {
            let q = &factors[j * k..(j + 1) * k];
            *sc = biases[j] + pu.iter().zip(q).map(|(a, b)| a * b).sum::<f32>();
        }
        let (h, g) = ranking_metrics(&scores, r.item as usize, by_user.items(u));
        hr += h;
        ndcg += g;
    }
    let m = data.test.len() as f64;
    let (hr, ndcg) = if m > 0.0 {
        (hr / m, ndcg / m)
    } else {
        (0.0, 0.0)
    };
    (
        BTreeMap::from([("hr@10".into(), hr), ("ndcg@10".into(), ndcg)]),
        m,
    )
}
