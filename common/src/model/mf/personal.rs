//! Personalisation: a merchant's one-off local fine-tune of the served
//! global item side, kept only where its own validation slice improves.
//!
//! After the federation has chosen the version it serves, a merchant may
//! train a private copy of the item side (and its own user side) for a few
//! local epochs, pulled towards the served rows by a proximal term
//! `(μ/2)‖x − x_global‖²` per item row `x = [q_i, b_i]`:
//! - explicit MF and BPR take an SGD epoch with the run's hyper-parameters,
//!   then the proximal step of each row for the gradient steps it received
//!   in that epoch (`η_i = lr·steps_i`): `x ← (x + η_i μ x_global) / (1 + η_i μ)`,
//!   exact for any μ (μ = 0 is plain local training, μ → ∞ the global copy);
//! - iALS alternates its closed-form solves, the item solve with `ρ = μ`
//!   (the same proximal solve its training rounds use).
//!
//! The copy is then evaluated on the merchant's validation slice (the
//! implicit ranking choosing its popularity blend again) and kept only when
//! it is strictly better than the served global copy there. Nothing of it
//! leaves the merchant: it is never an update and never uploaded.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::eval::UserItems;
use super::family::mf_data;
use super::kernels::{bpr_epoch, explicit_epoch};
use super::{MU, MfShape, NegativePool, UserState, ials, shuffle};
use crate::metrics::FigureWeights;
use crate::model::{LocalData, RoundContext, TrainError};

/// Default proximal weight μ of SGD-trained MF (explicit and BPR), chosen
/// on the merchants' validation slices (BENCHMARKS.md, "Personalisation"):
/// one epoch's proximal step on a row with `s` steps is `lr·s·μ`, so with
/// lr 0.01–0.05 and a few steps per row μ must be large to hold a row.
pub const DEFAULT_PROXIMAL: f32 = 10.0;
/// Default proximal weight μ of iALS (its item solve's ρ), chosen on the
/// merchants' validation slices (BENCHMARKS.md, "Personalisation"): it
/// competes with `Σ_u p_u p_uᵀ` over all the merchant's users, so a row the
/// merchant never sold is not pulled to zero by a small μ.
pub const DEFAULT_PROXIMAL_IALS: f32 = 100.0;

/// A merchant's personalisation settings: how long to fine-tune and how
/// strongly the copy is held to the global item side.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Personalise {
    /// Local epochs of fine-tuning (iALS: sweeps of item and user solves);
    /// 0 turns personalisation off.
    pub epochs: usize,
    /// The proximal weight μ pulling each item row towards the served global
    /// row (finite, ≥ 0).
    pub proximal: f32,
}

impl Personalise {
    /// `epochs` with `proximal`, or the default μ of `shape`'s algorithm.
    pub fn with_default(epochs: usize, proximal: Option<f32>, shape: &MfShape<'_>) -> Self {
        let default = if shape.is_ials() {
            DEFAULT_PROXIMAL_IALS
        } else {
            DEFAULT_PROXIMAL
        };
        Self {
            epochs,
            proximal: proximal.unwrap_or(default),
        }
    }

    /// μ finite and non-negative.
    pub fn check(&self) -> Result<(), TrainError> {
        if !(self.proximal.is_finite() && self.proximal >= 0.0) {
            return Err(TrainError::InvalidModel(format!(
                "personalisation `proximal` must be finite and >= 0, got {}",
                self.proximal
            )));
        }
        Ok(())
    }
}

/// The outcome of one merchant's personalisation.
#[derive(Debug, Clone, PartialEq)]
pub struct Personalised {
    /// The fine-tuned federated layout (μ, item biases, item factors): the
    /// merchant's private copy.
    pub params: Vec<f32>,
    /// The fine-tuned user side, with the popularity blend chosen for the
    /// copy (no evaluated snapshots).
    pub users: UserState,
    /// The validation metric compared (`val_hr@10` or `val_rmse`).
    pub metric: &'static str,
    /// The served global copy's validation figure (NaN without a slice).
    pub global_val: f64,
    /// The personalised copy's validation figure (NaN without a slice).
    pub personal_val: f64,
    /// Whether the copy is kept: strictly better on validation.
    pub kept: bool,
    /// The served global copy's metrics (validation and held-out).
    pub global_metrics: BTreeMap<String, f64>,
    /// The personalised copy's metrics (validation and held-out).
    pub personal_metrics: BTreeMap<String, f64>,
    /// The weights of both copies' metrics: the held-out examples and the
    /// validation rows.
    pub weights: FigureWeights,
}

impl Personalised {
    /// The metrics of the copy the merchant serves: the personalised one
    /// where it was kept, else the global one.
    pub fn selected_metrics(&self) -> &BTreeMap<String, f64> {
        if self.kept {
            &self.personal_metrics
        } else {
            &self.global_metrics
        }
    }
}

impl MfShape<'_> {
    /// Fine-tunes a private copy of `global` (the served version `ctx.round`)
    /// on the merchant's training rows and compares it with `global` on the
    /// validation slice. `data`'s user side is left as the served version's
    /// (paired with it as an evaluation of that version would be), so later
    /// federated rounds are unaffected.
    pub fn personalise(
        &self,
        ctx: &RoundContext<'_>,
        global: &[f32],
        data: &mut LocalData,
        p: &Personalise,
    ) -> Result<Personalised, TrainError> {
        p.check()?;
        let (merchant, data) = mf_data(data)?;
        self.users_of_version(ctx, global, data, merchant)?;
        // Served: users refitted on the whole known history (what measured
        // the test); the fine-tune itself starts from the training users.
        let measured = self.metrics_of(global, data)?;
        let (global_metrics, weights) = (measured.metrics, measured.weights);
        let mut served_users = data.state.clone();
        served_users.take_refit(measured.refit, ctx.round);
        let tuned = self.fine_tune(ctx, global, data, merchant, p);
        let result = tuned.and_then(|params| {
            let measured = self.metrics_of(&params, data)?;
            let mut users = data.state.clone();
            users.take_refit(measured.refit, ctx.round);
            Ok((params, measured.metrics, users))
        });
        data.state = served_users;
        let (params, personal_metrics, mut users) = result?;
        users.evaluated.clear();
        let (metric, higher) = if self.implicit {
            ("val_hr@10", true)
        } else {
            ("val_rmse", false)
        };
        let get = |m: &BTreeMap<String, f64>| m.get(metric).copied().unwrap_or(f64::NAN);
        let (global_val, personal_val) = (get(&global_metrics), get(&personal_metrics));
        let kept = if higher {
            personal_val > global_val
        } else {
            personal_val < global_val
        };
        Ok(Personalised {
            params,
            users,
            metric,
            global_val,
            personal_val,
            kept,
            global_metrics,
            personal_metrics,
            weights,
        })
    }

    /// `p.epochs` of proximal fine-tuning from `global`, the user side
    /// trained in place in `data.state`; returns the item side.
    fn fine_tune(
        &self,
        ctx: &RoundContext<'_>,
        global: &[f32],
        data: &mut super::MfData,
        merchant: &str,
        p: &Personalise,
    ) -> Result<Vec<f32>, TrainError> {
        let (n, k, h) = (self.num_items, self.k, self.hyper);
        let mut local = global.to_vec();
        if p.epochs == 0 || data.train.is_empty() {
            return Ok(local);
        }
        if self.is_ials() {
            let mut hp = h.clone();
            hp.proximal = p.proximal;
            let by_user = ials::Cells::new(data, n, h.alpha, false);
            let by_item = ials::Cells::new(data, n, h.alpha, true);
            for _ in 0..p.epochs {
                ials::solve_items(global, &mut local, n, k, &hp, &by_item, &data.state.factors)?;
                ials::solve_users(&local, n, k, &hp, &by_user, &mut data.state.factors)?;
            }
            return Ok(local);
        }
        let mut rng = crate::seed::rng(
            ctx.seed,
            &["mf-personalise", merchant, &ctx.round.to_string()],
        );
        let mu_train = global[MU];
        let mut order: Vec<u32> = (0..data.train.len() as u32).collect();
        let mut steps = vec![0.0f32; n];
        let by_user = UserItems::new(&data.train, data.users.len());
        let pool: Option<Vec<u32>> = (self.implicit && h.negatives_from == NegativePool::Merchant)
            .then(|| {
                let mut items: Vec<u32> = data.train.iter().map(|r| r.item).collect();
                items.sort_unstable();
                items.dedup();
                items
            });
        let st = &mut data.state;
        let mut loss = 0.0;
        for _ in 0..p.epochs {
            shuffle(&mut order, &mut rng);
            steps.fill(0.0);
            let (_, items) = local.split_at_mut(1);
            let (ib, itf) = items.split_at_mut(n);
            loss = if self.implicit {
                bpr_epoch(
                    h,
                    k,
                    &data.train,
                    &order,
                    &by_user,
                    &mut st.factors,
                    ib,
                    itf,
                    &mut steps,
                    pool.as_deref(),
                    &mut rng,
                )
            } else {
                for r in &data.train {
                    steps[r.item as usize] += 1.0;
                }
                explicit_epoch(
                    h,
                    k,
                    &data.train,
                    &order,
                    mu_train,
                    &mut st.bias,
                    &mut st.factors,
                    ib,
                    itf,
                )
            };
            proximal_step(
                global,
                &mut local,
                n,
                k,
                &steps,
                h.learning_rate,
                h.bias_learning_rate,
                p.proximal,
            );
        }
        if !loss.is_finite() || local.iter().any(|v| !v.is_finite()) {
            return Err(TrainError::Diverged);
        }
        Ok(local)
    }
}

/// The proximal operator of `(μ/2)‖x_i − g_i‖²` on every item row that took
/// `steps[i]` gradient steps, with step `η = lr·steps[i]` (factors) and
/// `blr·steps[i]` (bias): `x ← (x + ημ g) / (1 + ημ)`. Rows without steps
/// did not move and are left alone.
#[allow(clippy::too_many_arguments)]
fn proximal_step(
    global: &[f32],
    local: &mut [f32],
    n: usize,
    k: usize,
    steps: &[f32],
    lr: f32,
    blr: f32,
    mu: f32,
) {
    let shrink = |x: &mut f32, g: f32, eta: f32| {
        let t = f64::from(eta) * f64::from(mu);
        *x = ((f64::from(*x) + t * f64::from(g)) / (1.0 + t)) as f32;
    };
    for (i, &s) in steps.iter().enumerate() {
        if s == 0.0 {
            continue;
        }
        let (b, f) = super::item_offsets(n, k, i);
        shrink(&mut local[b], global[b], blr * s);
        for j in f..f + k {
            shrink(&mut local[j], global[j], lr * s);
        }
    }
}

#[cfg(test)]
mod tests;
