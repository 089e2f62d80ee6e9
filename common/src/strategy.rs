//! The `Strategy` seam: how a round's updates become the next global model.
//!
//! Streaming strategies see only the weighted mean step (which is all secure
//! aggregation can reveal); strategies that need each update (median, Krum)
//! say so and the engine keeps the individual updates for them — which is why
//! they cannot be combined with secure aggregation.

use crate::aggregate::SumAccumulator;
use crate::update::{Update, WeightLayout};

/// Turns aggregated updates into the next global parameters.
pub trait Strategy: Send {
    /// A short name for logs and reports, e.g. `fedavg`.
    fn name(&self) -> String;

    /// Whether the strategy needs every individual update (true for robust
    /// statistics). Streaming strategies return false.
    fn needs_individual_updates(&self) -> bool {
        false
    }

    /// Applies the weighted mean step of a round to the global parameters.
    fn apply(&mut self, global: &[f32], mean_delta: &[f32]) -> Vec<f32>;

    /// Aggregates individual updates. The default folds them into a sum and
    /// calls [`Strategy::apply`] on the mean step.
    fn aggregate_individual(
        &mut self,
        global: &[f32],
        updates: &[Update],
        layout: &WeightLayout,
    ) -> Vec<f32> {
        let ncw = updates.first().map_or(0, |u| u.coord_weights.len());
        let mut acc = SumAccumulator::new(global.len(), ncw);
        for u in updates {
            // Updates reaching a strategy were validated by the engine.
            let _ = acc.add(u);
        }
        let delta = acc.mean_delta(layout);
        self.apply(global, &delta)
    }

    /// Server-side optimiser state to persist with a committed version (empty
    /// for stateless strategies), so a restarted coordinator carries on exactly.
    fn state(&self) -> Vec<f32> {
        Vec::new()
    }

    /// Restores state saved by [`Strategy::state`].
    fn restore(&mut self, _state: &[f32]) {}
}

/// Federated averaging (McMahan et al. 2017): the new model is the global
/// model plus the example-weighted mean of the agents' steps.
#[derive(Debug, Clone, Default)]
pub struct FedAvg;

impl Strategy for FedAvg {
    fn name(&self) -> String {
        "fedavg".into()
    }

    fn apply(&mut self, global: &[f32], mean_delta: &[f32]) -> Vec<f32> {
        global.iter().zip(mean_delta).map(|(g, d)| g + d).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fedavg_adds_the_mean_step() {
        let mut s = FedAvg;
        assert_eq!(s.apply(&[1.0, 1.0], &[0.5, -1.0]), vec![1.5, 0.0]);
    }
}
