//! The explicit model's user side solved in closed form against fixed item
//! rows: each user's bias and factors minimise the squared error of their
//! ratings plus the penalties SGD applies per rating (`reg · n_u`). What
//! serves a merchant once validation has chosen a version: users that know
//! the validation ratings too (the test ratings are still never seen), as
//! iALS serves users refitted on the validation purchase.

use ndarray::{Array1, Array2, Axis, Slice};

use super::eval::{group_by_user, rmse_on, rmse_with};
use super::ials::solve_spd_unordered;
use super::{MfData, MfHyper, Rating, item_offsets};
use crate::model::TrainError;

/// User biases and `users × k` factors.
pub type UserSide = (Vec<f32>, Vec<f32>);

/// Each user's bias and factors solved against `global`'s μ, item biases and
/// item factors twice: on their `train` ratings, and on `train` plus `extra`
/// (the validation slice). A user without ratings keeps bias 0 and factors 0.
///
/// With `Z` the rows `[1 | q_i]` of a user's `m` ratings, `y` their
/// `r − μ − b_i` and `D` the penalties, the solve is
/// `x = (ZᵀZ + D)⁻¹Zᵀy`, a `(k+1)²` system; a user with fewer ratings than
/// that takes the equal `x = D⁻¹Zᵀ(ZD⁻¹Zᵀ + I)⁻¹y`, an `m²` one (most users
/// at k ≥ 64). Products go through matrixmultiply in f32, solves in f64.
pub fn solve_explicit_users(
    global: &[f32],
    n: usize,
    k: usize,
    h: &MfHyper,
    train: &[Rating],
    extra: &[Rating],
    num_users: usize,
) -> Result<(UserSide, UserSide), TrainError> {
    let d = k + 1;
    let (train_of, extra_of) = (by_user(train, num_users), by_user(extra, num_users));
    let mu = global[0];
    let mut out = [
        (vec![0.0f32; num_users], vec![0.0f32; num_users * k]),
        (vec![0.0f32; num_users], vec![0.0f32; num_users * k]),
    ];
    for u in 0..num_users {
        let (mine, more) = (train_of.rows(u), extra_of.rows(u));
        // Training rows first, then the extra ones.
        let all = mine.len() + more.len();
        let mut z = Array2::<f32>::zeros((all, d));
        let mut y = Array1::<f32>::zeros(all);
        for (j, r) in mine.iter().chain(more).enumerate() {
            let (b, f) = item_offsets(n, k, r.item as usize);
            let mut row = z.row_mut(j);
            row[0] = 1.0;
            for (x, &q) in row.iter_mut().skip(1).zip(&global[f..f + k]) {
                *x = q;
            }
            y[j] = r.value - mu - global[b];
        }
        let mut gram_of_train: Option<(Array2<f64>, Array1<f64>)> = None;
        for (pass, m) in [mine.len(), all].into_iter().enumerate() {
            if m == 0 || (pass == 1 && more.is_empty()) {
                continue;
            }
            let c = m as f64;
            let penalty: Vec<f64> = std::iter::once(f64::from(h.reg_bias) * c)
                .chain(std::iter::repeat_n(f64::from(h.reg_factors) * c, k))
                .collect();
            let (z, y) = (
                z.slice_axis(Axis(0), Slice::from(..m)),
                y.slice_axis(Axis(0), Slice::from(..m)),
            );
            let what = || format!("user #{u} of this merchant");
            let x = if m < d && penalty.iter().all(|&p| p > 0.0) {
                // Dual: (Z D^-1/2)(Z D^-1/2)ᵀ + I, then x = D⁻¹Zᵀα.
                let scale: Array1<f32> = penalty.iter().map(|&p| (1.0 / p.sqrt()) as f32).collect();
                let zs = &z * &scale;
                let mut kernel = zs.dot(&zs.t()).mapv(f64::from);
                for i in 0..m {
                    kernel[[i, i]] += 1.0;
                }
                let mut alpha: Vec<f64> = y.iter().map(|&v| f64::from(v)).collect();
                solve_spd_unordered(kernel, &mut alpha, what)?;
                let alpha = Array1::from(alpha);
                let zt_alpha = z.t().mapv(f64::from).dot(&alpha);
                zt_alpha.iter().zip(&penalty).map(|(v, p)| v / p).collect()
            } else {
                // ZᵀZ and Zᵀy, the training rows' reused by the second solve.
                let (gram, zty) = match gram_of_train.take() {
                    Some((mut gram, mut zty)) => {
                        let zv = z.slice_axis(Axis(0), Slice::from(mine.len()..));
                        let yv = y.slice_axis(Axis(0), Slice::from(mine.len()..));
                        gram += &zv.t().dot(&zv).mapv(f64::from);
                        zty += &zv.t().dot(&yv).mapv(f64::from);
                        (gram, zty)
                    }
                    None => (z.t().dot(&z).mapv(f64::from), z.t().dot(&y).mapv(f64::from)),
                };
                if pass == 0 {
                    gram_of_train = Some((gram.clone(), zty.clone()));
                }
                let mut a = gram;
                for (j, p) in penalty.iter().enumerate() {
                    a[[j, j]] += p;
                }
                let mut x = zty.to_vec();
                solve_spd_unordered(a, &mut x, what)?;
                x
            };
            let (bias, factors) = &mut out[pass];
            bias[u] = x[0] as f32;
            for (dst, &src) in factors[u * k..(u + 1) * k].iter_mut().zip(&x[1..]) {
                *dst = src as f32;
            }
        }
        if more.is_empty() {
            // Nothing extra: the second solve is the first.
            let [(b0, f0), (b1, f1)] = &mut out;
            b1[u] = b0[u];
            f1[u * k..(u + 1) * k].copy_from_slice(&f0[u * k..(u + 1) * k]);
        }
    }
    let [on_train, on_all] = out;
    Ok((on_train, on_all))
}

/// Ratings grouped by user (a counting sort).
struct ByUser {
    start: Vec<usize>,
    rows: Vec<Rating>,
}

impl ByUser {
    fn rows(&self, u: usize) -> &[Rating] {
        &self.rows[self.start[u]..self.start[u + 1]]
    }
}

fn by_user(ratings: &[Rating], num_users: usize) -> ByUser {
    let (start, rows) = group_by_user(ratings, num_users, |r| *r);
    ByUser { start, rows }
}

/// Explicit MF with a validation slice and `refit_users` on: the user side
/// to measure the test and serve the merchant with, once validation has
/// chosen the version. The users
/// are solved on training ratings alone first; only if those beat the trained
/// users on the validation slice (strictly) are the users solved on training
/// and validation ratings returned. `None` keeps the trained users: off, no
/// validation slice, or validation preferred them.
pub(super) fn explicit_served_users(
    global: &[f32],
    n: usize,
    k: usize,
    h: &MfHyper,
    data: &MfData,
) -> Result<Option<UserSide>, TrainError> {
    if !h.refit_users || data.valid.is_empty() {
        return Ok(None);
    }
    let users = data.users.len();
    let trained = rmse_on(global, n, k, h.clip, data, &data.valid);
    let ((bias, factors), on_all) =
        solve_explicit_users(global, n, k, h, &data.train, &data.valid, users)?;
    let solved = rmse_with(global, n, k, h.clip, (&bias, &factors), &data.valid);
    if solved >= trained || !solved.is_finite() {
        return Ok(None);
    }
    Ok(Some(on_all))
}

#[cfg(test)]
mod tests;
