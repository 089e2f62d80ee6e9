//! The inner SGD loops: one epoch of biased MF on explicit ratings and one
//! epoch of BPR on implicit purchases. Plain f32 loops over contiguous rows,
//! no allocation per rating.

use rand::{Rng, RngExt};

use super::eval::UserItems;
use super::{MfHyper, Rating};

/// One SGD epoch of biased MF over `ratings` in the given order, updating
/// user and item biases and factors in place (Funk SVD as in Surprise's SVD).
/// μ is held fixed: a per-rating SGD step on it would leave it jittering by
/// about `sqrt(lr/2)·σ`, which costs more RMSE than anything else here.
/// Returns the mean squared training error seen during the epoch.
pub fn explicit_epoch(
    h: &MfHyper,
    k: usize,
    ratings: &[Rating],
    order: &[u32],
    mu: f32,
    user_bias: &mut [f32],
    user_factors: &mut [f32],
    item_bias: &mut [f32],
    item_factors: &mut [f32],
) -> f64 {
    let (lr, blr) = (h.learning_rate, h.bias_learning_rate);
    let (reg, regb) = (h.reg_factors, h.reg_bias);
    let mut se = 0.0f64;
    for &idx in order {
        let r = ratings[idx as usize];
        let (u, i) = (r.user as usize, r.item as usize);
        let pu = &mut user_factors[u * k..(u + 1) * k];
        let qi = &mut item_factors[i * k..(i + 1) * k];
        let mut dot = 0.0f32;
        for (p, q) in pu.iter().zip(qi.iter()) {
            dot += p * q;
        }
        let e = r.value - (mu + user_bias[u] + item_bias[i] + dot);
        se += f64::from(e * e);
        user_bias[u] += blr * (e - regb * user_bias[u]);
        item_bias[i] += blr * (e - regb * item_bias[i]);
        for (p, q) in pu.iter_mut().zip(qi.iter_mut()) {
            let (pv, qv) = (*p, *q);
            *p += lr * (e * qv - reg * pv);
            *q += lr * (e * pv - reg * qv);
        }
    }
    se / order.len().max(1) as f64
}

/// One epoch of BPR (Rendle et al. 2009): for each positive `(u, i)`, draw
/// `negatives` items `j` the user has not interacted with (uniformly over the
/// whole catalogue, or over `pool`) and take a step on `−ln σ(x̂_ui − x̂_uj)` with
/// `x̂_uj = b_j + p_u·q_j`. Adds to `touches` how many gradient steps each item
/// received (the evidence that weights its federated update). Returns the
/// mean loss.
pub fn bpr_epoch<R: Rng>(
    h: &MfHyper,
    k: usize,
    positives: &[Rating],
    order: &[u32],
    by_user: &UserItems,
    user_factors: &mut [f32],
    item_bias: &mut [f32],
    item_factors: &mut [f32],
    touches: &mut [f32],
    pool: Option<&[u32]>,
    rng: &mut R,
) -> f64 {
    let n = item_bias.len() as u32;
    // Every candidate negative a user can have: all items, or the pool
    // (sorted, and a superset of every user's training items).
    let candidates = pool.map_or(n, |p| p.len() as u32);
    let (lr, blr) = (h.learning_rate, h.bias_learning_rate);
    let (reg, regb) = (h.reg_factors, h.reg_bias);
    let mut loss = 0.0f64;
    let mut steps = 0u64;
    for &idx in order {
        let r = positives[idx as usize];
        let (u, i) = (r.user as usize, r.item as usize);
        let seen = by_user.items(u);
        if seen.len() as u32 >= candidates {
            continue;
        }
        for _ in 0..h.negatives.max(1) {
            let j = loop {
                let j = match pool {
                    None => rng.random_range(0..n),
                    Some(p) => p[rng.random_range(0..p.len())],
                };
                if seen.binary_search(&j).is_err() {
                    break j as usize;
                }
            };
            let pu = &mut user_factors[u * k..(u + 1) * k];
            let (qi, qj) = two_rows(item_factors, k, i, j);
            let mut x = item_bias[i] - item_bias[j];
            for f in 0..k {
                x += pu[f] * (qi[f] - qj[f]);
            }
            // σ(−x) is the gradient scale; ln(1 + e^{−x}) the loss, computed stably.
            let g = 1.0 / (1.0 + x.exp());
            loss += f64::from(if x > 0.0 {
                (-x).exp().ln_1p()
            } else {
                -x + x.exp().ln_1p()
            });
            for f in 0..k {
                let (p, a, b) = (pu[f], qi[f], qj[f]);
                pu[f] += lr * (g * (a - b) - reg * p);
                qi[f] += lr * (g * p - reg * a);
                qj[f] += lr * (-g * p - reg * b);
            }
            item_bias[i] += blr * (g - regb * item_bias[i]);
            item_bias[j] += blr * (-g - regb * item_bias[j]);
            touches[i] += 1.0;
            touches[j] += 1.0;
            steps += 1;
        }
    }
    loss / steps.max(1) as f64
}

/// Mutable rows `i` and `j` (`i != j`) of a row-major matrix with `k` columns.
fn two_rows(m: &mut [f32], k: usize, i: usize, j: usize) -> (&mut [f32], &mut [f32]) {
    if i < j {
        let (a, b) = m.split_at_mut(j * k);
        (&mut a[i * k..(i + 1) * k], &mut b[..k])
    } else {
        let (a, b) = m.split_at_mut(i * k);
        (&mut b[..k], &mut a[j * k..(j + 1) * k])
    }
}
