//! The simulator's virtual clock: how long each merchant takes to train, and
//! who is online when.
//!
//! Nothing sleeps. A merchant's local task lasts `example_seconds × examples
//! × epochs × speed`, where `speed` is the merchant's own factor drawn once
//! from a lognormal distribution (median 1, log-standard-deviation
//! `--speed-sigma`, so a few merchants are many times slower than the rest:
//! phones next to servers). Time is cut into periods of `--availability-period`
//! seconds; in each period a seeded `1 − availability` fraction of the
//! merchants is offline and cannot be handed work (at least one merchant is
//! always online). A merchant that started a task finishes it; losing tasks
//! mid-way is what `--dropout` models.
//!
//! Both drivers read time from here: a synchronous round lasts as long as its
//! slowest selected merchant, and the FedBuff driver orders completion events
//! by these durations. Evaluation (a measurement of the simulator, not part
//! of the protocol) and the one-off statistics step take no virtual time.

use anyhow::bail;
use fedcart_common::model::lr::SgdParams;
use fedcart_common::task::ModelSpec;
use fedcart_common::train::LocalData;
use rand::seq::SliceRandom;
use rand_distr::{Distribution, LogNormal};
use serde::Serialize;

use super::args::SimArgs;

/// The clock's validated settings.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ClockSettings {
    /// Virtual seconds one example takes for one local epoch at speed 1.
    pub example_seconds: f64,
    /// Log-standard-deviation of the merchants' speed factors (0 = all equal).
    pub speed_sigma: f64,
    /// Fraction of merchants online in each period, in (0, 1].
    pub availability: f64,
    /// Length of an availability period, in virtual seconds.
    pub availability_period: f64,
}

impl ClockSettings {
    /// Flags over the TOML file over the defaults (1 ms per example-epoch,
    /// σ = 0.5, everyone online, 60 s periods), validated.
    pub fn from_args(args: &SimArgs, file: &SimArgs) -> anyhow::Result<Self> {
        let s = Self {
            example_seconds: args
                .example_seconds
                .or(file.example_seconds)
                .unwrap_or(1e-3),
            speed_sigma: args.speed_sigma.or(file.speed_sigma).unwrap_or(0.5),
            availability: args.availability.or(file.availability).unwrap_or(1.0),
            availability_period: args
                .availability_period
                .or(file.availability_period)
                .unwrap_or(60.0),
        };
        if !(s.example_seconds.is_finite() && s.example_seconds > 0.0) {
            bail!(
                "--example-seconds {} must be finite and > 0",
                s.example_seconds
            );
        }
        if !(s.speed_sigma.is_finite() && (0.0..=5.0).contains(&s.speed_sigma)) {
            bail!("--speed-sigma {} is not in [0, 5]", s.speed_sigma);
        }
        if !(s.availability > 0.0 && s.availability <= 1.0) {
            bail!("--availability {} is not in (0, 1]", s.availability);
        }
        if !(s.availability_period.is_finite() && s.availability_period > 0.0) {
            bail!(
                "--availability-period {} must be finite and > 0",
                s.availability_period
            );
        }
        Ok(s)
    }
}

/// The simulated merchants' speeds and availability.
#[derive(Debug, Clone)]
pub struct Fleet {
    /// Virtual seconds of one local training task, per merchant.
    task_seconds: Vec<f64>,
    /// The per-merchant speed factors (multipliers of the task time).
    speed: Vec<f64>,
    /// Merchants offline in every period.
    offline: usize,
    period: f64,
    seed: u64,
}

impl Fleet {
    /// Draws every merchant's speed from the run seed and its id, and sizes
    /// its local task from its training examples and the local epochs.
    pub fn new(
        c: &ClockSettings,
        seed: u64,
        merchants: &[LocalData],
        model: &ModelSpec,
        sgd: &SgdParams,
    ) -> Self {
        let epochs = model.model().local_epochs(sgd).max(1) as f64;
        let lognormal = LogNormal::new(0.0, c.speed_sigma).expect("σ validated finite, >= 0");
        let speed: Vec<f64> = merchants
            .iter()
            .map(|m| {
                lognormal.sample(&mut fedcart_common::seed::rng(
                    seed,
                    &["speed", &m.merchant_id],
                ))
            })
            .collect();
        let task_seconds = merchants
            .iter()
            .zip(&speed)
            .map(|(m, f)| {
                let examples = m.examples().get(model.data_family()).copied().unwrap_or(1);
                c.example_seconds * examples.max(1) as f64 * epochs * f
            })
            .collect();
        let n = merchants.len();
        let offline =
            (((1.0 - c.availability) * n as f64).round() as usize).min(n.saturating_sub(1));
        Self {
            task_seconds,
            speed,
            offline,
            period: c.availability_period,
            seed,
        }
    }

    /// Virtual seconds merchant `k` needs for one local training task.
    pub fn task_seconds(&self, k: usize) -> f64 {
        self.task_seconds[k]
    }

    /// Merchant `k`'s speed factor (1 = median).
    pub fn speed(&self, k: usize) -> f64 {
        self.speed[k]
    }

    /// The availability period that virtual time `t` falls in.
    pub fn period_of(&self, t: f64) -> u64 {
        (t / self.period).floor() as u64
    }

    /// The virtual time at which period `p` starts.
    pub fn period_start(&self, p: u64) -> f64 {
        p as f64 * self.period
    }

    /// Which merchants are online during period `p` (seeded, exactly the
    /// configured fraction offline).
    pub fn online(&self, p: u64) -> Vec<bool> {
        let n = self.task_seconds.len();
        let mut online = vec![true; n];
        if self.offline == 0 {
            return online;
        }
        let mut order: Vec<usize> = (0..n).collect();
        order.shuffle(&mut fedcart_common::seed::rng(
            self.seed,
            &["offline", &p.to_string()],
        ));
        for &k in &order[..self.offline] {
            online[k] = false;
        }
        online
    }

    /// How many merchants are online in every period.
    pub fn online_count(&self) -> usize {
        self.task_seconds.len() - self.offline
    }

    /// The ids (of `ids`, in merchant order) online at virtual time `t`.
    pub fn online_ids(&self, ids: &[String], t: f64) -> Vec<String> {
        let online = self.online(self.period_of(t));
        ids.iter()
            .zip(online)
            .filter(|&(_, on)| on)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// A synchronous round's length: its slowest selected merchant (the
    /// coordinator cannot tell a slow merchant from a lost one before then).
    pub fn round_seconds<'a>(
        &self,
        selected: impl IntoIterator<Item = &'a String>,
        index: &std::collections::HashMap<&str, usize>,
    ) -> f64 {
        selected
            .into_iter()
            .filter_map(|id| index.get(id.as_str()))
            .map(|&k| self.task_seconds[k])
            .fold(0.0, f64::max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fleet(sigma: f64, availability: f64, n: usize) -> Fleet {
        let c = ClockSettings {
            example_seconds: 1e-3,
            speed_sigma: sigma,
            availability,
            availability_period: 10.0,
        };
        let merchants: Vec<LocalData> = (0..n)
            .map(|k| LocalData {
                merchant_id: format!("m{k:04}"),
                ..Default::default()
            })
            .collect();
        Fleet::new(
            &c,
            42,
            &merchants,
            &ModelSpec::Noop { dim: 1 },
            &SgdParams::default(),
        )
    }

    #[test]
    fn speeds_are_seeded_heavy_tailed_and_equal_without_sigma() {
        let f = fleet(1.0, 1.0, 200);
        let g = fleet(1.0, 1.0, 200);
        assert_eq!(f.task_seconds, g.task_seconds);
        let mut s = f.speed.clone();
        s.sort_by(f64::total_cmp);
        // Median near 1, the slowest far above it: a lognormal's long tail.
        assert!((0.7..1.4).contains(&s[100]), "median {}", s[100]);
        assert!(s[199] > 5.0 * s[100], "max {} median {}", s[199], s[100]);
        let flat = fleet(0.0, 1.0, 5);
        assert!(flat.speed.iter().all(|&v| v == 1.0));
    }

    #[test]
    fn exactly_the_offline_fraction_is_offline_and_it_changes_by_period() {
        let f = fleet(0.5, 0.7, 10);
        let a = f.online(0);
        assert_eq!(a.iter().filter(|&&on| !on).count(), 3);
        assert_eq!(a, f.online(0));
        assert!((1..20).any(|p| f.online(p) != a));
        assert_eq!(f.period_of(25.0), 2);
        assert_eq!(f.period_start(2), 20.0);
        // Never everyone offline.
        assert_eq!(
            fleet(0.5, 0.01, 3).online(5).iter().filter(|&&o| o).count(),
            1
        );
    }
}
