//! The `Strategy` seam: how a round's updates become the next global model.
//!
//! Streaming strategies see only the weighted mean step (which is all secure
//! aggregation can reveal); strategies that need each update (median, Krum)
//! say so and the engine keeps the individual updates for them — which is why
//! they cannot be combined with secure aggregation.

mod adaptive;
mod robust;

pub use adaptive::{AdaptiveKind, FedAdaptive, FedAvgM};
pub use robust::{FedMedian, FedTrimmedAvg, Krum, per_update_steps};

use crate::aggregate::SumAccumulator;
use crate::update::{Update, WeightLayout};

/// The names [`strategy_by_name`] understands, for error messages and `--help`.
pub const KNOWN: &str = "fedavg, fedprox:MU, fedavgm[:MOMENTUM[:LR]], fedadam[:ETA], fedyogi[:ETA], \
fedadagrad[:ETA], fedmedian, fedtrimmedavg:BETA, krum:F, multikrum:F:M";

/// Builds a strategy from its configured name, e.g. `fedavg`, `fedprox:0.01`,
/// `fedavgm:0.9`, `fedadam`, `fedadam:0.05`, `fedtrimmedavg:0.1`, `krum:2`,
/// `multikrum:2:5`. Parameters follow the name, separated by colons.
pub fn strategy_by_name(name: &str) -> Result<Box<dyn Strategy>, String> {
    let mut parts = name.split(':');
    let head = parts.next().unwrap_or_default();
    let args: Vec<&str> = parts.collect();
    let num = |i: usize, what: &str| -> Result<Option<f64>, String> {
        match args.get(i) {
            None => Ok(None),
            Some(s) => s
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite())
                .map(Some)
                .ok_or_else(|| format!("strategy `{name}`: {what} `{s}` is not a number")),
        }
    };
    let required = |i: usize, what: &str| -> Result<f64, String> {
        num(i, what)?.ok_or_else(|| format!("strategy `{name}` needs a {what} (e.g. `{head}:…`)"))
    };
    let max_args = match head {
        "fedavg" | "fedmedian" => 0,
        "fedprox" | "fedadam" | "fedyogi" | "fedadagrad" | "fedtrimmedavg" | "krum" => 1,
        "fedavgm" | "multikrum" => 2,
        other => return Err(format!("unknown strategy `{other}` (known: {KNOWN})")),
    };
    if args.len() > max_args {
        return Err(format!(
            "strategy `{name}` takes at most {max_args} parameter(s) (known: {KNOWN})"
        ));
    }
    let count = |i: usize, what: &str| -> Result<usize, String> {
        let v = required(i, what)?;
        if v < 0.0 || v.fract() != 0.0 {
            return Err(format!(
                "strategy `{name}`: {what} must be a whole number ≥ 0"
            ));
        }
        Ok(v as usize)
    };
    Ok(match head {
        "fedavg" => Box::new(FedAvg),
        "fedprox" => {
            let mu = required(0, "proximal coefficient μ")?;
            if mu < 0.0 {
                return Err(format!("strategy `{name}`: μ must be ≥ 0"));
            }
            Box::new(FedProx { mu: mu as f32 })
        }
        "fedavgm" => Box::new(FedAvgM::new(
            num(0, "momentum")?.unwrap_or(0.9) as f32,
            num(1, "server learning rate")?.unwrap_or(1.0) as f32,
        )),
        "fedadam" | "fedyogi" | "fedadagrad" => {
            let kind = match head {
                "fedadam" => AdaptiveKind::Adam,
                "fedyogi" => AdaptiveKind::Yogi,
                _ => AdaptiveKind::Adagrad,
            };
            let mut s = FedAdaptive::new(kind);
            if let Some(eta) = num(0, "server learning rate η")? {
                s.eta = eta as f32;
            }
            Box::new(s)
        }
        "fedmedian" => Box::new(FedMedian),
        "fedtrimmedavg" => {
            let beta = required(0, "trim fraction β")?;
            if !(0.0..0.5).contains(&beta) {
                return Err(format!("strategy `{name}`: β must be in [0, 0.5)"));
            }
            Box::new(FedTrimmedAvg { beta })
        }
        "krum" => Box::new(Krum {
            byzantine: count(0, "number of Byzantine agents f")?,
            keep: 1,
        }),
        _ => {
            let keep = count(1, "number of updates kept m")?;
            if keep == 0 {
                return Err(format!("strategy `{name}`: m must be ≥ 1"));
            }
            Box::new(Krum {
                byzantine: count(0, "number of Byzantine agents f")?,
                keep,
            })
        }
    })
}

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

    /// The FedProx proximal coefficient μ local training must use (0 = none).
    /// Drivers copy it into `SgdParams::prox_mu` / the MF hyper-parameters.
    fn prox_mu(&self) -> f32 {
        0.0
    }
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

/// FedProx (Li et al. 2020): FedAvg on the server; the proximal term
/// `μ/2 ‖w − w_global‖²` is added to each agent's local objective.
#[derive(Debug, Clone)]
pub struct FedProx {
    /// Proximal coefficient μ.
    pub mu: f32,
}

impl Strategy for FedProx {
    fn name(&self) -> String {
        format!("fedprox:{}", self.mu)
    }

    fn apply(&mut self, global: &[f32], mean_delta: &[f32]) -> Vec<f32> {
        FedAvg.apply(global, mean_delta)
    }

    fn prox_mu(&self) -> f32 {
        self.mu
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_with_parameters_and_bad_names_are_explained() {
        for n in [
            "fedavg",
            "fedprox:0.01",
            "fedavgm:0.9",
            "fedavgm",
            "fedadam",
            "fedyogi:0.05",
            "fedadagrad",
            "fedmedian",
            "fedtrimmedavg:0.1",
            "krum:2",
            "multikrum:2:5",
        ] {
            assert!(strategy_by_name(n).is_ok(), "{n}");
        }
        assert_eq!(strategy_by_name("fedprox:0.01").unwrap().prox_mu(), 0.01);
        assert!(
            strategy_by_name("fedmedian")
                .unwrap()
                .needs_individual_updates()
        );
        assert!(
            !strategy_by_name("fedadam")
                .unwrap()
                .needs_individual_updates()
        );
        let e = strategy_by_name("fedfoo").err().unwrap();
        assert!(
            e.contains("unknown strategy `fedfoo`") && e.contains("multikrum"),
            "{e}"
        );
        assert!(strategy_by_name("fedprox").err().unwrap().contains("μ"));
        assert!(strategy_by_name("fedtrimmedavg:0.7").is_err());
        assert!(strategy_by_name("krum:x").err().unwrap().contains("`x`"));
        assert!(strategy_by_name("fedavg:1").is_err());
    }

    #[test]
    fn fedavg_adds_the_mean_step() {
        let mut s = FedAvg;
        assert_eq!(s.apply(&[1.0, 1.0], &[0.5, -1.0]), vec![1.5, 0.0]);
    }
}
