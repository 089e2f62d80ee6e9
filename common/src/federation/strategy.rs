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

use crate::federation::aggregate::SumAccumulator;
use crate::federation::update::{Update, WeightLayout};

/// The names [`StrategySpec`] parses, for error messages and `--help`.
pub const KNOWN: &str = "fedavg, fedprox:MU, fedavgm[:MOMENTUM[:LR]], fedadam[:ETA], fedyogi[:ETA], \
fedadagrad[:ETA], fedmedian, fedtrimmedavg:BETA, krum:F, multikrum:F:M";

/// Why a strategy name was refused, or why a strategy cannot run with the
/// chosen protections. Messages quote what the user wrote.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StrategyError {
    /// The name before the first colon is not a strategy.
    #[error("unknown strategy `{0}` (known: {KNOWN})")]
    Unknown(String),
    /// More colon-separated parameters than the strategy takes.
    #[error("strategy `{name}` takes at most {max} parameter(s) (known: {KNOWN})")]
    TooManyParameters {
        /// The whole name as written.
        name: String,
        /// How many it takes.
        max: usize,
    },
    /// A required parameter is missing.
    #[error("strategy `{name}` needs a {what} (e.g. `{example}`)")]
    Missing {
        /// The whole name as written.
        name: String,
        /// What the parameter is.
        what: &'static str,
        /// The strategy written with every parameter it needs, as it parses.
        example: &'static str,
    },
    /// A parameter is not a finite number.
    #[error("strategy `{name}`: {what} `{value}` is not a number")]
    NotANumber {
        /// The whole name as written.
        name: String,
        /// What the parameter is.
        what: &'static str,
        /// The text that did not parse.
        value: String,
    },
    /// A parameter is a number outside its range.
    #[error("strategy `{name}`: {rule}")]
    OutOfRange {
        /// The whole name as written.
        name: String,
        /// The range it must be in.
        rule: &'static str,
    },
    /// The strategy needs every individual update, which the named protection
    /// (secure aggregation, differential privacy) never reveals.
    #[error(
        "strategy `{strategy}` needs every individual update, which {protection} never reveals; use a streaming strategy (fedavg, fedprox, fedavgm, fedadam, fedyogi, fedadagrad)"
    )]
    NeedsIndividualUpdates {
        /// The strategy as written.
        strategy: String,
        /// The protection that hides individual updates.
        protection: &'static str,
    },
}

/// A server strategy with its parameters, parsed once from its name
/// (`fedavg`, `fedprox:0.01`, `fedavgm:0.9`, `fedadam`, `fedadam:0.05`,
/// `fedtrimmedavg:0.1`, `krum:2`, `multikrum:2:5`: parameters follow the name,
/// separated by colons). Serialised as that name, so configs and stored run
/// records keep their text form.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum StrategySpec {
    /// Federated averaging.
    #[default]
    FedAvg,
    /// FedProx with proximal coefficient μ.
    FedProx {
        /// Proximal coefficient μ ≥ 0.
        mu: f64,
    },
    /// FedAvg with server momentum.
    FedAvgM {
        /// Momentum (default 0.9).
        momentum: Option<f64>,
        /// Server learning rate (default 1).
        lr: Option<f64>,
    },
    /// FedAdam, FedYogi or FedAdagrad.
    Adaptive {
        /// Which optimiser.
        kind: AdaptiveKind,
        /// Server learning rate η (the optimiser's default when absent).
        eta: Option<f64>,
    },
    /// Coordinate-wise median.
    FedMedian,
    /// Coordinate-wise trimmed mean.
    FedTrimmedAvg {
        /// Fraction trimmed at each end, in [0, 0.5).
        beta: f64,
    },
    /// Krum (keep = 1) or Multi-Krum.
    Krum {
        /// Number of Byzantine agents tolerated.
        byzantine: usize,
        /// Updates kept and averaged (1 for Krum).
        keep: usize,
        /// Whether it was written `multikrum`.
        multi: bool,
    },
}

impl std::str::FromStr for StrategySpec {
    type Err = StrategyError;

    fn from_str(name: &str) -> Result<Self, StrategyError> {
        let mut parts = name.split(':');
        let head = parts.next().unwrap_or_default();
        let args: Vec<&str> = parts.collect();
        let num = |i: usize, what: &'static str| -> Result<Option<f64>, StrategyError> {
            match args.get(i) {
                None => Ok(None),
                Some(s) => s
                    .parse::<f64>()
                    .ok()
                    .filter(|v| v.is_finite())
                    .map(Some)
                    .ok_or_else(|| StrategyError::NotANumber {
                        name: name.into(),
                        what,
                        value: (*s).into(),
                    }),
            }
        };
        let required = |i: usize, what: &'static str| -> Result<f64, StrategyError> {
            num(i, what)?.ok_or_else(|| StrategyError::Missing {
                name: name.into(),
                what,
                // Only these take a required parameter; each example is one
                // the tests parse.
                example: match head {
                    "fedprox" => "fedprox:0.01",
                    "fedtrimmedavg" => "fedtrimmedavg:0.1",
                    "krum" => "krum:1",
                    _ => "multikrum:1:3",
                },
            })
        };
        let out_of_range = |rule: &'static str| StrategyError::OutOfRange {
            name: name.into(),
            rule,
        };
        let max_args = match head {
            "fedavg" | "fedmedian" => 0,
            "fedprox" | "fedadam" | "fedyogi" | "fedadagrad" | "fedtrimmedavg" | "krum" => 1,
            "fedavgm" | "multikrum" => 2,
            other => return Err(StrategyError::Unknown(other.into())),
        };
        if args.len() > max_args {
            return Err(StrategyError::TooManyParameters {
                name: name.into(),
                max: max_args,
            });
        }
        let count = |i: usize, what: &'static str| -> Result<usize, StrategyError> {
            let v = required(i, what)?;
            if v < 0.0 || v.fract() != 0.0 {
                return Err(out_of_range(match what {
                    "number of Byzantine agents f" => "f must be a whole number ≥ 0",
                    _ => "m must be a whole number ≥ 0",
                }));
            }
            Ok(v as usize)
        };
        Ok(match head {
            "fedavg" => StrategySpec::FedAvg,
            "fedprox" => {
                let mu = required(0, "proximal coefficient μ")?;
                if mu < 0.0 {
                    return Err(out_of_range("μ must be ≥ 0"));
                }
                StrategySpec::FedProx { mu }
            }
            "fedavgm" => {
                let momentum = num(0, "momentum")?;
                let lr = num(1, "server learning rate")?;
                // β ≥ 1 never forgets a step; η ≤ 0 never moves (or moves
                // against) the model.
                if momentum.is_some_and(|b| !(0.0..1.0).contains(&b)) {
                    return Err(out_of_range("the momentum β must be in [0, 1)"));
                }
                if lr.is_some_and(|eta| eta <= 0.0) {
                    return Err(out_of_range("the server learning rate η must be > 0"));
                }
                StrategySpec::FedAvgM { momentum, lr }
            }
            "fedadam" | "fedyogi" | "fedadagrad" => {
                let eta = num(0, "server learning rate η")?;
                if eta.is_some_and(|eta| eta <= 0.0) {
                    return Err(out_of_range("the server learning rate η must be > 0"));
                }
                StrategySpec::Adaptive {
                    kind: match head {
                        "fedadam" => AdaptiveKind::Adam,
                        "fedyogi" => AdaptiveKind::Yogi,
                        _ => AdaptiveKind::Adagrad,
                    },
                    eta,
                }
            }
            "fedmedian" => StrategySpec::FedMedian,
            "fedtrimmedavg" => {
                let beta = required(0, "trim fraction β")?;
                if !(0.0..0.5).contains(&beta) {
                    return Err(out_of_range("β must be in [0, 0.5)"));
                }
                StrategySpec::FedTrimmedAvg { beta }
            }
            "krum" => StrategySpec::Krum {
                byzantine: count(0, "number of Byzantine agents f")?,
                keep: 1,
                multi: false,
            },
            _ => {
                let keep = count(1, "number of updates kept m")?;
                if keep == 0 {
                    return Err(out_of_range("m must be ≥ 1"));
                }
                StrategySpec::Krum {
                    byzantine: count(0, "number of Byzantine agents f")?,
                    keep,
                    multi: true,
                }
            }
        })
    }
}

impl std::fmt::Display for StrategySpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StrategySpec::FedAvg => write!(f, "fedavg"),
            StrategySpec::FedProx { mu } => write!(f, "fedprox:{mu}"),
            StrategySpec::FedAvgM { momentum, lr } => match (momentum, lr) {
                (None, _) => write!(f, "fedavgm"),
                (Some(m), None) => write!(f, "fedavgm:{m}"),
                (Some(m), Some(lr)) => write!(f, "fedavgm:{m}:{lr}"),
            },
            StrategySpec::Adaptive { kind, eta } => {
                let head = match kind {
                    AdaptiveKind::Adam => "fedadam",
                    AdaptiveKind::Yogi => "fedyogi",
                    AdaptiveKind::Adagrad => "fedadagrad",
                };
                match eta {
                    None => write!(f, "{head}"),
                    Some(eta) => write!(f, "{head}:{eta}"),
                }
            }
            StrategySpec::FedMedian => write!(f, "fedmedian"),
            StrategySpec::FedTrimmedAvg { beta } => write!(f, "fedtrimmedavg:{beta}"),
            StrategySpec::Krum {
                byzantine,
                keep,
                multi,
            } => {
                if *multi {
                    write!(f, "multikrum:{byzantine}:{keep}")
                } else {
                    write!(f, "krum:{byzantine}")
                }
            }
        }
    }
}

impl TryFrom<String> for StrategySpec {
    type Error = StrategyError;

    fn try_from(s: String) -> Result<Self, StrategyError> {
        s.parse()
    }
}

impl From<StrategySpec> for String {
    fn from(s: StrategySpec) -> String {
        s.to_string()
    }
}

impl StrategySpec {
    /// Whether the strategy needs every individual update (robust
    /// statistics); streaming strategies see only the weighted mean step.
    pub fn needs_individual_updates(&self) -> bool {
        matches!(
            self,
            StrategySpec::FedMedian
                | StrategySpec::FedTrimmedAvg { .. }
                | StrategySpec::Krum { .. }
        )
    }

    /// The one rule shared by every driver and config: a strategy that needs
    /// individual updates cannot run under a protection that hides them
    /// (`protection` names it, e.g. "secure aggregation").
    pub fn require_streaming(&self, protection: &'static str) -> Result<(), StrategyError> {
        if self.needs_individual_updates() {
            return Err(StrategyError::NeedsIndividualUpdates {
                strategy: self.to_string(),
                protection,
            });
        }
        Ok(())
    }

    /// A fresh strategy object (with empty optimiser state).
    pub fn build(&self) -> Box<dyn Strategy> {
        match *self {
            StrategySpec::FedAvg => Box::new(FedAvg),
            StrategySpec::FedProx { mu } => Box::new(FedProx { mu: mu as f32 }),
            StrategySpec::FedAvgM { momentum, lr } => Box::new(FedAvgM::new(
                momentum.unwrap_or(0.9) as f32,
                lr.unwrap_or(1.0) as f32,
            )),
            StrategySpec::Adaptive { kind, eta } => {
                let mut s = FedAdaptive::new(kind);
                if let Some(eta) = eta {
                    s.eta = eta as f32;
                }
                Box::new(s)
            }
            StrategySpec::FedMedian => Box::new(FedMedian),
            StrategySpec::FedTrimmedAvg { beta } => Box::new(FedTrimmedAvg { beta }),
            StrategySpec::Krum {
                byzantine, keep, ..
            } => Box::new(Krum { byzantine, keep }),
        }
    }
}

/// Builds a strategy from its configured name; see [`StrategySpec`].
pub fn strategy_by_name(name: &str) -> Result<Box<dyn Strategy>, String> {
    name.parse::<StrategySpec>()
        .map(|s| s.build())
        .map_err(|e| e.to_string())
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

    /// The fewest updates a round needs for the strategy's guarantee (Krum:
    /// 2f + 3); a round with fewer is aborted rather than aggregated.
    fn min_updates(&self) -> usize {
        1
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

    /// A missing parameter's hint read `krum:…`: it is now a name that
    /// parses, for each strategy that needs one.
    #[test]
    fn a_missing_parameter_is_shown_with_an_example_that_parses() {
        for (name, example) in [
            ("fedprox", "fedprox:0.01"),
            ("fedtrimmedavg", "fedtrimmedavg:0.1"),
            ("krum", "krum:1"),
            ("multikrum", "multikrum:1:3"),
            ("multikrum:1", "multikrum:1:3"),
        ] {
            let e = name.parse::<StrategySpec>().unwrap_err().to_string();
            assert!(e.ends_with(&format!("(e.g. `{example}`)")), "{name}: {e}");
            assert!(!e.contains('…'), "{e}");
            example.parse::<StrategySpec>().unwrap();
        }
    }

    /// A server step of 0 never moved the model, a negative one ran it
    /// backwards, and a momentum of 1 or more never forgot a step.
    #[test]
    fn server_rates_and_momenta_that_cannot_train_are_refused() {
        for (n, says) in [
            ("fedavgm:0.9:0", "η must be > 0"),
            ("fedavgm:-5:-5", "β must be in [0, 1)"),
            ("fedavgm:1", "β must be in [0, 1)"),
            ("fedadam:-1", "η must be > 0"),
            ("fedyogi:-1", "η must be > 0"),
            ("fedadagrad:0", "η must be > 0"),
        ] {
            let e = n.parse::<StrategySpec>().unwrap_err().to_string();
            assert!(e.contains(says) && e.contains(n), "{n}: {e}");
        }
        for ok in ["fedavgm:0", "fedavgm:0.5:2", "fedadam:0.1"] {
            ok.parse::<StrategySpec>().unwrap();
        }
    }

    #[test]
    fn specs_round_trip_through_their_names_and_serde() {
        for n in [
            "fedavg",
            "fedprox:0.01",
            "fedavgm",
            "fedavgm:0.9",
            "fedavgm:0.9:0.4",
            "fedadam",
            "fedyogi:0.05",
            "fedmedian",
            "fedtrimmedavg:0.1",
            "krum:2",
            "multikrum:2:5",
        ] {
            let spec: StrategySpec = n.parse().unwrap();
            assert_eq!(spec.to_string(), n);
            let json = serde_json::to_string(&spec).unwrap();
            assert_eq!(json, format!("\"{n}\""));
            assert_eq!(serde_json::from_str::<StrategySpec>(&json).unwrap(), spec);
            assert_eq!(spec.build().name().split(':').next(), n.split(':').next());
        }
        let e = serde_json::from_str::<StrategySpec>("\"fedfoo\"").unwrap_err();
        assert!(e.to_string().contains("unknown strategy `fedfoo`"), "{e}");
    }

    #[test]
    fn the_individual_update_rule_names_the_strategy_and_the_protection() {
        let median: StrategySpec = "fedmedian".parse().unwrap();
        let e = median.require_streaming("secure aggregation").unwrap_err();
        assert!(
            e.to_string().contains("`fedmedian`") && e.to_string().contains("secure aggregation")
        );
        assert!(
            "fedadam"
                .parse::<StrategySpec>()
                .unwrap()
                .require_streaming("secure aggregation")
                .is_ok()
        );
    }

    #[test]
    fn fedavg_adds_the_mean_step() {
        let mut s = FedAvg;
        assert_eq!(s.apply(&[1.0, 1.0], &[0.5, -1.0]), vec![1.5, 0.0]);
    }
}
