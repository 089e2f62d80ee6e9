//! Implicit alternating least squares (iALS; Hu, Koren & Volinsky 2008) with
//! a learned item bias, federated as FedAvg of local item solves.
//!
//! The model scores `s_ui = b_i + p_u·q_i` (the layout and scoring of
//! [`super::MfShape`]; μ is unused) and minimises
//! `Σ_u Σ_i c_ui (y_ui − s_ui)² + λ(Σ‖p_u‖² + Σ‖q_i‖²) + λ_b Σ b_i²` over
//! every (user, item) cell: `y_ui = 1` and `c_ui = 1 + α·ln(1 + v_ui)` for a
//! purchase of strength `v_ui` (quantity), `y = 0` and `c = 1` otherwise.
//! The bias `b_i` is a regression of "was it bought" on a constant user
//! feature: the federation's popularity of the item, learned with the factors.
//!
//! - **User side, private and exact.** Given the item side, each `p_u` is the
//!   closed-form solve of `(QᵀQ + Σ_{i∈I_u}(c_ui − 1) q_i q_iᵀ + λI) p_u =
//!   Σ_{i∈I_u}(c_ui(1 − b_i) + b_i) q_i − Qᵀb` (Cholesky on k × k, the
//!   catalogue's Gramian computed once per solve). Users never leave the agent,
//!   and an evaluation solves them again for the version it evaluates, so a
//!   version is always paired with its own users.
//! - **Item side, federated.** Each merchant solves every catalogue row
//!   `[q_i, b_i]` on its own users with a proximal pull `ρ‖x − x_global‖²`,
//!   and sends `w_i·(x_i − x_global)` with the per-item weight
//!   `w_i = Σ_{u local} c_ui` (its users plus their extra confidence on `i`):
//!   the engine's per-item sum-then-divide is then the confidence-weighted
//!   mean of the local solves, a plain sum, so secure aggregation and DP work
//!   as for BPR. Items a merchant did not sell are solved too (its users did
//!   not buy them: evidence against), all with one shared factorisation.
//!   This is not the exact ALS item step (which needs per-item sufficient
//!   statistics, `k(k+1)/2 + k` values per item; see BENCHMARKS.md) but moves
//!   the same `1 + n(k+1)` values as BPR.
//!
//! Every solve checks its pivots: a system that is not positive definite or
//! not finite is a [`TrainError::Singular`] naming the item or user, never
//! a silent NaN.

use ndarray::{Array1, Array2, ArrayView2};

use super::{MfData, MfHyper, Rating, item_offsets};
use crate::federation::update::Update;
use crate::model::TrainError;

/// Confidence weight of a purchase of strength `value`: `1 + α·ln(1 + v)`
/// (Hu et al.'s logarithmic scaling, with ε = 1), so a pack of 40 does not
/// outweigh everything else a customer bought.
pub fn confidence(alpha: f32, value: f32) -> f64 {
    1.0 + f64::from(alpha) * f64::from(value.max(0.0)).ln_1p()
}

/// Observed cells grouped by one side (users or items): for each row the
/// other side's indices and `c − 1`, duplicates merged.
#[derive(Debug, Clone)]
pub struct Cells {
    offsets: Vec<usize>,
    other: Vec<u32>,
    extra: Vec<f64>,
}

impl Cells {
    /// Groups the merchant's training purchases by user (`by_item` false)
    /// or by item; repeated (user, item) rows add their strengths.
    pub fn new(data: &MfData, n: usize, alpha: f32, by_item: bool) -> Self {
        Self::of(data.train.iter(), data.users.len(), n, alpha, by_item)
    }

    /// [`Cells::new`] over the training purchases and the validation slice:
    /// a customer's whole known history, for the user side a served version
    /// ranks the test with once validation has chosen it.
    pub fn with_valid(data: &MfData, n: usize, alpha: f32) -> Self {
        let rows = data.train.iter().chain(&data.valid);
        Self::of(rows, data.users.len(), n, alpha, false)
    }

    fn of<'a>(
        cells: impl Iterator<Item = &'a Rating>,
        num_users: usize,
        n: usize,
        alpha: f32,
        by_item: bool,
    ) -> Self {
        let rows = if by_item { n } else { num_users };
        let mut pairs: Vec<(u32, u32, f32)> = cells
            .map(|r| {
                if by_item {
                    (r.item, r.user, r.value)
                } else {
                    (r.user, r.item, r.value)
                }
            })
            .collect();
        pairs.sort_by_key(|&(a, b, _)| (a, b));
        let mut offsets = vec![0usize; rows + 1];
        let mut other = Vec::with_capacity(pairs.len());
        let mut strength: Vec<f32> = Vec::with_capacity(pairs.len());
        let mut last: Option<(u32, u32)> = None;
        for (a, b, v) in pairs {
            if last == Some((a, b)) {
                *strength.last_mut().expect("a previous cell") += v;
                continue;
            }
            last = Some((a, b));
            offsets[a as usize + 1] += 1;
            other.push(b);
            strength.push(v);
        }
        for r in 0..rows {
            offsets[r + 1] += offsets[r];
        }
        let extra = strength
            .iter()
            .map(|&v| confidence(alpha, v) - 1.0)
            .collect();
        Self {
            offsets,
            other,
            extra,
        }
    }

    /// Row `r`'s cells: the other side's indices and their `c − 1`.
    pub fn row(&self, r: usize) -> (&[u32], &[f64]) {
        let span = self.offsets[r]..self.offsets[r + 1];
        (&self.other[span.clone()], &self.extra[span])
    }
}

/// `s − Σ x_p·y_p` over equal-length slices, in some order of summation.
type MinusDot = fn(f64, &[f64], &[f64]) -> f64;

/// Cholesky factorisation in place of the symmetric matrix `a` (lower
/// triangle read and overwritten with `L`, `a = L·Lᵀ`), the dot products
/// taken by `minus`. Fails when a pivot is not positive and finite: the
/// matrix is not positive definite.
fn cholesky(a: &mut Array2<f64>, minus: MinusDot) -> Result<(), ()> {
    let d = a.nrows();
    let a = a.as_slice_mut().ok_or(())?;
    for j in 0..d {
        let (upper, lower) = a.split_at_mut((j + 1) * d);
        let row_j = &mut upper[j * d..];
        let s = minus(row_j[j], &row_j[..j], &row_j[..j]);
        if !(s.is_finite() && s > 0.0) {
            return Err(());
        }
        let l = s.sqrt();
        row_j[j] = l;
        for row_i in lower.chunks_exact_mut(d) {
            row_i[j] = minus(row_i[j], &row_i[..j], &row_j[..j]) / l;
        }
    }
    Ok(())
}

/// `s − x_0·y_0 − x_1·y_1 − …`, subtracted in that order (the rounding of
/// the textbook loop, so iALS solves replay bit for bit).
fn minus_dot(s: f64, x: &[f64], y: &[f64]) -> f64 {
    x.iter().zip(y).fold(s, |s, (a, b)| s - a * b)
}

/// `s − Σ x_p·y_p` with four running sums: no chain of dependent adds, so
/// the loop vectorises (several times faster at k ≥ 64), rounding otherwise.
fn minus_dot_unordered(s: f64, x: &[f64], y: &[f64]) -> f64 {
    let (xc, xr) = x.as_chunks::<4>();
    let (yc, yr) = y.as_chunks::<4>();
    let mut acc = [0.0f64; 4];
    for (a, b) in xc.iter().zip(yc) {
        for l in 0..4 {
            acc[l] += a[l] * b[l];
        }
    }
    let tail: f64 = xr.iter().zip(yr).map(|(a, b)| a * b).sum();
    s - ((acc[0] + acc[1]) + (acc[2] + acc[3]) + tail)
}

/// Solves `L·Lᵀ x = b` in place of `b`, with `l` from [`cholesky`].
fn cholesky_solve(l: &Array2<f64>, b: &mut [f64], minus: MinusDot) {
    let d = l.nrows();
    let l = l
        .as_slice()
        .expect("`cholesky` factorised a standard-layout matrix");
    for i in 0..d {
        let row = &l[i * d..(i + 1) * d];
        b[i] = minus(b[i], &row[..i], &b[..i]) / row[i];
    }
    for i in (0..d).rev() {
        let mut s = b[i];
        for p in i + 1..d {
            s -= l[p * d + i] * b[p];
        }
        b[i] = s / l[i * d + i];
    }
}

/// Factorises `a` and solves `a·x = b` in place of `b`; `what` names the
/// system in the error (an item or a user). Sums in a fixed order, so
/// iALS replays bit for bit.
pub(super) fn solve_spd(
    a: Array2<f64>,
    b: &mut [f64],
    what: impl Fn() -> String,
) -> Result<(), TrainError> {
    solve_spd_with(a, b, what, minus_dot)
}

/// [`solve_spd`] with vectorised dot products (deterministic too, rounded
/// differently): for systems solved afresh, where no earlier figure pins
/// the rounding.
pub(super) fn solve_spd_unordered(
    a: Array2<f64>,
    b: &mut [f64],
    what: impl Fn() -> String,
) -> Result<(), TrainError> {
    solve_spd_with(a, b, what, minus_dot_unordered)
}

fn solve_spd_with(
    mut a: Array2<f64>,
    b: &mut [f64],
    what: impl Fn() -> String,
    minus: MinusDot,
) -> Result<(), TrainError> {
    if !a.is_standard_layout() {
        a = a.as_standard_layout().into_owned();
    }
    cholesky(&mut a, minus).map_err(|()| TrainError::Singular(what()))?;
    cholesky_solve(&a, b, minus);
    if b.iter().all(|x| x.is_finite()) {
        Ok(())
    } else {
        Err(TrainError::Singular(what()))
    }
}

/// Adds `w·x·xᵀ` to the symmetric `a` (lower triangle only).
fn add_outer(a: &mut Array2<f64>, x: &[f64], w: f64) {
    for i in 0..x.len() {
        let wx = w * x[i];
        for j in 0..=i {
            a[[i, j]] += wx * x[j];
        }
    }
}

/// The catalogue's item factors as an `n × k` view of the global vector.
fn item_factors(global: &[f32], n: usize, k: usize) -> ArrayView2<'_, f32> {
    ArrayView2::from_shape((n, k), &global[1 + n..1 + n + n * k]).expect("MF layout")
}

/// Solves every user's factors in closed form against the item side of
/// `global` (biases and factors), writing them to `users` (`users × k`).
/// Users without training purchases get the solve of an empty history
/// (what the model knows of a customer who bought nothing).
pub fn solve_users(
    global: &[f32],
    n: usize,
    k: usize,
    h: &MfHyper,
    cells: &Cells,
    users: &mut [f32],
) -> Result<(), TrainError> {
    let q = item_factors(global, n, k);
    let bias = &global[1..1 + n];
    // QᵀQ and Qᵀb in f32 through matrixmultiply, accumulated into f64.
    let gram = q.t().dot(&q).mapv(f64::from);
    let qb: Array1<f64> = q.t().dot(&Array1::from(bias.to_vec())).mapv(f64::from);
    let reg = f64::from(h.reg_factors);
    let num_users = users.len() / k.max(1);
    let mut qi = vec![0.0f64; k];
    for u in 0..num_users {
        let mut a = gram.clone();
        let mut rhs: Vec<f64> = qb.iter().map(|x| -x).collect();
        for f in 0..k {
            a[[f, f]] += reg;
        }
        let (items, extra) = cells.row(u);
        for (&i, &e) in items.iter().zip(extra) {
            let i = i as usize;
            for (dst, &src) in qi.iter_mut().zip(q.row(i)) {
                *dst = f64::from(src);
            }
            add_outer(&mut a, &qi, e);
            let b = f64::from(bias[i]);
            let scale = (1.0 + e) * (1.0 - b) + b;
            for (r, x) in rhs.iter_mut().zip(&qi) {
                *r += scale * x;
            }
        }
        solve_spd(a, &mut rhs, || format!("user #{u} of this merchant"))?;
        for (dst, &src) in users[u * k..(u + 1) * k].iter_mut().zip(&rhs) {
            *dst = src as f32;
        }
    }
    Ok(())
}

/// The merchant's item step: every catalogue row `[q_i, b_i]` solved on
/// its users (`users`, `users × k`) with the proximal pull `ρ` towards the
/// rows of `global`, written into `local` (a copy of `global`'s layout).
/// Returns each item's confidence weight `Σ_u c_ui` over the merchant's users.
pub fn solve_items(
    global: &[f32],
    local: &mut [f32],
    n: usize,
    k: usize,
    h: &MfHyper,
    by_item: &Cells,
    users: &[f32],
) -> Result<Vec<f32>, TrainError> {
    let d = k + 1;
    let num_users = users.len() / k.max(1);
    let rho = f64::from(h.proximal);
    // P̃ᵀP̃ over the merchant's users, with the constant feature appended.
    let mut base = Array2::<f64>::zeros((d, d));
    let mut pu = vec![1.0f64; d];
    for u in 0..num_users {
        for (dst, &src) in pu.iter_mut().zip(&users[u * k..(u + 1) * k]) {
            *dst = f64::from(src);
        }
        add_outer(&mut base, &pu, 1.0);
    }
    for f in 0..k {
        base[[f, f]] += f64::from(h.reg_factors) + rho;
    }
    base[[k, k]] += f64::from(h.reg_bias) + rho;
    // Items nobody here bought share one factorisation.
    let mut shared = base.clone();
    cholesky(&mut shared, minus_dot)
        .map_err(|()| TrainError::Singular("the item rows this merchant did not sell".into()))?;
    // Their right-hand side is ρ·x_global alone, so A⁻¹ is formed once
    // (row-major, column by column) and each row costs one product.
    let mut unsold = vec![0.0f64; d * d];
    let mut column = vec![0.0f64; d];
    for c in 0..d {
        column.fill(0.0);
        column[c] = 1.0;
        cholesky_solve(&shared, &mut column, minus_dot);
        for r in 0..d {
            unsold[r * d + c] = column[r];
        }
    }
    let mut weights = vec![num_users as f32; n];
    let mut rhs = vec![0.0f64; d];
    let mut row = vec![0.0f64; d];
    for (i, weight) in weights.iter_mut().enumerate() {
        let (b_off, f_off) = item_offsets(n, k, i);
        for f in 0..k {
            rhs[f] = rho * f64::from(global[f_off + f]);
        }
        rhs[k] = rho * f64::from(global[b_off]);
        let (buyers, extra) = by_item.row(i);
        if buyers.is_empty() {
            for (r, out) in row.iter_mut().enumerate() {
                let m = &unsold[r * d..(r + 1) * d];
                *out = m.iter().zip(&rhs).map(|(a, x)| a * x).sum::<f64>();
            }
            rhs.copy_from_slice(&row);
            if !rhs.iter().all(|x| x.is_finite()) {
                return Err(TrainError::Singular(format!("item {i}")));
            }
        } else {
            let mut a = base.clone();
            let mut total = 0.0f64;
            for (&u, &e) in buyers.iter().zip(extra) {
                let u = u as usize;
                for (dst, &src) in pu.iter_mut().zip(&users[u * k..(u + 1) * k]) {
                    *dst = f64::from(src);
                }
                pu[k] = 1.0;
                add_outer(&mut a, &pu, e);
                for (r, x) in rhs.iter_mut().zip(&pu) {
                    *r += (1.0 + e) * x;
                }
                total += e;
            }
            solve_spd(a, &mut rhs, || format!("item {i}"))?;
            *weight = (num_users as f64 + total) as f32;
        }
        for f in 0..k {
            local[f_off + f] = rhs[f] as f32;
        }
        local[b_off] = rhs[k] as f32;
    }
    Ok(weights)
}

/// One local iALS round of a merchant from `global`: the users solved
/// against the global items, then `epochs` sweeps of (items, users) with
/// the items pulled towards `global`. Returns the item-side update (per-item
/// weights `Σ_u c_ui`, the rows pre-multiplied by them; μ untouched) of
/// example weight `data.train.len()`, and the mean weighted squared error
/// of the observed cells as the training loss.
pub fn fit(
    global: &[f32],
    n: usize,
    k: usize,
    h: &MfHyper,
    data: &mut MfData,
) -> Result<(Update, f64), TrainError> {
    let by_user = Cells::new(data, n, h.alpha, false);
    let by_item = Cells::new(data, n, h.alpha, true);
    solve_users(global, n, k, h, &by_user, &mut data.state.factors)?;
    let mut local = global.to_vec();
    let mut weights = Vec::new();
    for sweep in 0..h.epochs.max(1) {
        if sweep > 0 {
            solve_users(&local, n, k, h, &by_user, &mut data.state.factors)?;
        }
        weights = solve_items(global, &mut local, n, k, h, &by_item, &data.state.factors)?;
    }
    let loss = observed_loss(&local, n, k, &by_user, &data.state.factors);
    let mut values = vec![0.0f32; global.len()];
    for (i, &w) in weights.iter().enumerate() {
        let (b, f) = item_offsets(n, k, i);
        values[b] = (local[b] - global[b]) * w;
        for j in f..f + k {
            values[j] = (local[j] - global[j]) * w;
        }
    }
    if values.iter().any(|v| !v.is_finite()) || !loss.is_finite() {
        return Err(TrainError::Diverged);
    }
    let update = Update {
        values,
        coord_weights: weights,
        weight: data.train.len() as f64,
    };
    Ok((update, loss))
}

/// Mean squared error `(1 − s_ui)²` over the observed cells: a training
/// metric (the unobserved cells' part of the objective is not summed).
fn observed_loss(model: &[f32], n: usize, k: usize, by_user: &Cells, users: &[f32]) -> f64 {
    let mut se = 0.0f64;
    let mut m = 0usize;
    for u in 0..users.len() / k.max(1) {
        let pu = &users[u * k..(u + 1) * k];
        for &i in by_user.row(u).0 {
            let (b, f) = item_offsets(n, k, i as usize);
            let s = model[b]
                + pu.iter()
                    .zip(&model[f..f + k])
                    .map(|(p, q)| p * q)
                    .sum::<f32>();
            se += f64::from(1.0 - s).powi(2);
            m += 1;
        }
    }
    se / m.max(1) as f64
}

#[cfg(test)]
mod tests;
