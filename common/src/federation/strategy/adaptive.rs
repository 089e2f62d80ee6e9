//! Server optimisers over the mean step: FedAvgM (Hsu et al. 2019) and the
//! adaptive family FedAdagrad / FedAdam / FedYogi (Reddi et al. 2021).
//!
//! All of them see only the weighted mean step of a round, so they combine
//! with secure aggregation. Their state (momentum, second moments) is saved
//! with every committed version so a restarted coordinator carries on exactly.

use super::Strategy;

/// FedAvg with server momentum: `v ← β·v + Δ`, `x ← x + η·v`.
#[derive(Debug, Clone)]
pub struct FedAvgM {
    /// Server momentum β.
    pub momentum: f32,
    /// Server learning rate η.
    pub lr: f32,
    velocity: Vec<f32>,
}

impl FedAvgM {
    /// FedAvgM with momentum β and server learning rate η (Flower: η = 1).
    pub fn new(momentum: f32, lr: f32) -> Self {
        Self {
            momentum,
            lr,
            velocity: Vec::new(),
        }
    }
}

impl Strategy for FedAvgM {
    fn name(&self) -> String {
        format!("fedavgm:{}:{}", self.momentum, self.lr)
    }

    fn apply(&mut self, global: &[f32], mean_delta: &[f32]) -> Vec<f32> {
        if self.velocity.len() != global.len() {
            self.velocity = vec![0.0; global.len()];
        }
        let (beta, lr) = (self.momentum, self.lr);
        self.velocity
            .iter_mut()
            .zip(mean_delta)
            .zip(global)
            .map(|((v, d), g)| {
                *v = beta * *v + d;
                g + lr * *v
            })
            .collect()
    }

    fn state(&self) -> Vec<f32> {
        self.velocity.clone()
    }

    fn restore(&mut self, state: &[f32]) {
        self.velocity = state.to_vec();
    }
}

/// Which second-moment rule an adaptive server optimiser uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdaptiveKind {
    /// `v ← v + Δ²`.
    Adagrad,
    /// `v ← β₂·v + (1 − β₂)·Δ²`.
    Adam,
    /// `v ← v − (1 − β₂)·Δ²·sign(v − Δ²)`.
    Yogi,
}

/// FedAdagrad / FedAdam / FedYogi (Reddi et al. 2021, Algorithm 2), with
/// Flower's defaults η = 0.1, β₁ = 0.9, β₂ = 0.99, τ = 1e-9, and the paper's
/// update without bias correction:
/// `m ← β₁·m + (1 − β₁)·Δ`, `v` by the rule above, `x ← x + η·m / (√v + τ)`.
#[derive(Debug, Clone)]
pub struct FedAdaptive {
    /// The second-moment rule.
    pub kind: AdaptiveKind,
    /// Server learning rate η.
    pub eta: f32,
    /// First-moment decay β₁.
    pub beta1: f32,
    /// Second-moment decay β₂ (unused by Adagrad).
    pub beta2: f32,
    /// Adaptivity τ: keeps the step finite where `v` is 0.
    pub tau: f32,
    m: Vec<f32>,
    v: Vec<f32>,
}

impl FedAdaptive {
    /// The optimiser with Flower's default hyper-parameters.
    pub fn new(kind: AdaptiveKind) -> Self {
        Self {
            kind,
            eta: 0.1,
            beta1: 0.9,
            beta2: 0.99,
            tau: 1e-9,
            m: Vec::new(),
            v: Vec::new(),
        }
    }
}

impl Strategy for FedAdaptive {
    fn name(&self) -> String {
        let base = match self.kind {
            AdaptiveKind::Adagrad => "fedadagrad",
            AdaptiveKind::Adam => "fedadam",
            AdaptiveKind::Yogi => "fedyogi",
        };
        format!("{base}:{}", self.eta)
    }

    fn apply(&mut self, global: &[f32], mean_delta: &[f32]) -> Vec<f32> {
        let n = global.len();
        if self.m.len() != n || self.v.len() != n {
            self.m = vec![0.0; n];
            self.v = vec![0.0; n];
        }
        let (b1, b2, eta, tau, kind) = (self.beta1, self.beta2, self.eta, self.tau, self.kind);
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let d = mean_delta[i];
            let d2 = d * d;
            self.m[i] = b1 * self.m[i] + (1.0 - b1) * d;
            let v = &mut self.v[i];
            *v = match kind {
                AdaptiveKind::Adagrad => *v + d2,
                AdaptiveKind::Adam => b2 * *v + (1.0 - b2) * d2,
                AdaptiveKind::Yogi => *v - (1.0 - b2) * d2 * (*v - d2).signum(),
            };
            out.push(global[i] + eta * self.m[i] / (v.max(0.0).sqrt() + tau));
        }
        out
    }

    fn state(&self) -> Vec<f32> {
        [self.m.as_slice(), self.v.as_slice()].concat()
    }

    fn restore(&mut self, state: &[f32]) {
        let half = state.len() / 2;
        self.m = state[..half].to_vec();
        self.v = state[half..].to_vec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-5, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn fedavgm_accumulates_momentum_across_rounds() {
        let mut s = FedAvgM::new(0.5, 1.0);
        // Round 1: v = 1, x = 0 + 1. Round 2: v = 0.5 + 1 = 1.5, x = 1 + 1.5.
        let x1 = s.apply(&[0.0], &[1.0]);
        close(&x1, &[1.0]);
        close(&s.apply(&x1, &[1.0]), &[2.5]);
    }

    #[test]
    fn adaptive_first_two_steps_match_hand_computation() {
        // Δ = 0.2 twice, η = 0.1, β₁ = 0.9, β₂ = 0.99, τ ≈ 0.
        // Step 1: m = 0.02, v_adam = 0.0004, v_adagrad = 0.04, v_yogi = 0.0004.
        let mut adam = FedAdaptive::new(AdaptiveKind::Adam);
        let mut adagrad = FedAdaptive::new(AdaptiveKind::Adagrad);
        let mut yogi = FedAdaptive::new(AdaptiveKind::Yogi);
        close(&adam.apply(&[1.0], &[0.2]), &[1.0 + 0.1 * 0.02 / 0.02]);
        close(&adagrad.apply(&[1.0], &[0.2]), &[1.0 + 0.1 * 0.02 / 0.2]);
        close(&yogi.apply(&[1.0], &[0.2]), &[1.0 + 0.1 * 0.02 / 0.02]);
        // Step 2: m = 0.038; adam v = 0.99·0.0004 + 0.0004 = 0.000796;
        // adagrad v = 0.08; yogi v = 0.0004 − 0.0004·sign(0.0004 − 0.04) = 0.0008.
        let m2 = 0.9f32 * 0.02 + 0.1 * 0.2;
        close(
            &adam.apply(&[0.0], &[0.2]),
            &[0.1 * m2 / 0.000_796f32.sqrt()],
        );
        close(&adagrad.apply(&[0.0], &[0.2]), &[0.1 * m2 / 0.08f32.sqrt()]);
        close(&yogi.apply(&[0.0], &[0.2]), &[0.1 * m2 / 0.0008f32.sqrt()]);
    }

    #[test]
    fn adaptive_state_round_trips() {
        let mut a = FedAdaptive::new(AdaptiveKind::Adam);
        a.apply(&[0.0, 0.0], &[0.1, -0.3]);
        let mut b = FedAdaptive::new(AdaptiveKind::Adam);
        b.restore(&a.state());
        assert_eq!(
            a.apply(&[1.0, 1.0], &[0.2, 0.2]),
            b.apply(&[1.0, 1.0], &[0.2, 0.2])
        );
    }
}
