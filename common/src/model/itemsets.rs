//! Federated frequent itemsets as an ordinary federated task: the family
//! behind `ModelSpec::Itemsets`, so that the engine runs Apriori's levels as
//! rounds over either transport (see `crate::itemsets` for the protocol and
//! what a count vector reveals).
//!
//! The "global model" is the encoded [`Apriori`] state ([`Apriori::encode`]):
//! the frequent itemsets so far with their federated counts, and the current
//! level's candidates. A training round is one level: each agent downloads
//! the state, counts its baskets containing each candidate and returns the
//! counts (weight: its number of baskets). The coordinator does not apply a
//! step to the summed counts: [`Analysis::next_version`] feeds them to
//! [`Apriori::on_sum`], and the next version is the new state. The run is
//! [`Analysis::complete`] when a level has no candidate; the engine then
//! hands the final state to every agent in one evaluation task, which is
//! what `fedcart-client rules` reads. Counts are integers, summed exactly:
//! under secure aggregation in the statistics step's 2^64 ring, never clipped.

use std::collections::{BTreeMap, HashSet};

use super::{Analysis, FederatedModel, LocalData, RoundContext, TaskOutput, TrainError};
use crate::itemsets::{self, Apriori, Basket, EXACT_F32, STATE_HEADER};

/// Level-wise frequent itemsets over a catalogue of `num_items` items.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Itemsets {
    /// Catalogue size (the agreed platform catalogue).
    pub num_items: usize,
    /// Minimum support: baskets across the federation.
    pub min_count: u64,
    /// Candidates of the level being counted (the length of this task's
    /// update), set by the coordinator from the state's header.
    pub candidates: usize,
}

impl Itemsets {
    fn state(&self, global: &[f32]) -> Result<Apriori, TrainError> {
        Apriori::decode(global, self.num_items, self.min_count, 0)
            .map_err(|e| TrainError::InvalidModel(e.to_string()))
    }

    fn baskets<'d>(&self, data: &'d LocalData) -> Result<&'d [Basket], TrainError> {
        let baskets = data
            .baskets
            .as_deref()
            .ok_or(TrainError::NoData("baskets"))?;
        if let Some(&item) = baskets
            .iter()
            .flatten()
            .find(|&&i| i as usize >= self.num_items)
        {
            return Err(TrainError::ItemOutOfRange {
                item: item as usize,
                num_items: self.num_items,
            });
        }
        Ok(baskets)
    }

    /// Whether each basket contains a frequent itemset of two or more items
    /// (one the global rules speak about).
    fn covered(&self, global: &[f32], data: &LocalData) -> Result<Vec<bool>, TrainError> {
        let state = self.state(global)?;
        let baskets = self.baskets(data)?;
        let sets: Vec<&[u32]> = state
            .frequent()
            .iter()
            .filter(|f| f.items.len() >= 2)
            .map(|f| f.items.as_slice())
            .collect();
        Ok(baskets
            .iter()
            .map(|b| {
                let have: HashSet<u32> = b.iter().copied().collect();
                sets.iter().any(|s| s.iter().all(|i| have.contains(i)))
            })
            .collect())
    }
}

impl FederatedModel for Itemsets {
    fn name(&self) -> &'static str {
        "itemsets"
    }

    fn data_family(&self) -> &'static str {
        "baskets"
    }

    /// The length of the first state (level 1: every catalogue item a
    /// candidate); later states have other lengths.
    fn model_len(&self) -> usize {
        STATE_HEADER + self.num_items
    }

    fn update_len(&self) -> usize {
        self.candidates
    }

    fn initial_params(&self, _seed: u64) -> Vec<f32> {
        Apriori::new(self.num_items, self.min_count, 0)
            .encode()
            .unwrap_or_default()
    }

    fn local_epochs(&self, _sgd: &super::sgd::SgdParams) -> usize {
        1
    }

    fn check(&self) -> Result<(), TrainError> {
        if self.num_items == 0 || self.num_items as u64 >= EXACT_F32 {
            return Err(TrainError::InvalidModel(format!(
                "itemsets need a catalogue of 1 to 2^24 − 1 items, not {}",
                self.num_items
            )));
        }
        if self.min_count == 0 {
            return Err(TrainError::InvalidModel(
                "itemsets need a minimum support of at least 1 basket".into(),
            ));
        }
        Ok(())
    }

    fn stats(
        &self,
        _ctx: &RoundContext<'_>,
        _data: &mut LocalData,
    ) -> Result<TaskOutput, TrainError> {
        Ok(TaskOutput {
            update: None,
            metrics: BTreeMap::new(),
            weight: 0.0,
            validation_weight: 0.0,
        })
    }

    fn fit(
        &self,
        _ctx: &RoundContext<'_>,
        global: &[f32],
        data: &mut LocalData,
    ) -> Result<TaskOutput, TrainError> {
        self.check()?;
        let state = self.state(global)?;
        if state.candidates().len() != self.candidates {
            return Err(TrainError::ModelLength {
                expected: self.candidates,
                got: state.candidates().len(),
            });
        }
        let baskets = self.baskets(data)?;
        let update = itemsets::count_update(baskets, state.candidates());
        let weight = update.weight;
        Ok(TaskOutput {
            update: Some(update),
            metrics: BTreeMap::new(),
            weight,
            validation_weight: 0.0,
        })
    }

    /// The share of the merchant's baskets that contain a frequent itemset
    /// of two or more items (`covered`), weighted by its baskets.
    fn evaluate(
        &self,
        _ctx: &RoundContext<'_>,
        global: &[f32],
        data: &mut LocalData,
    ) -> Result<TaskOutput, TrainError> {
        let covered = self.covered(global, data)?;
        let n = covered.len() as f64;
        let share = covered.iter().filter(|&&c| c).count() as f64 / n.max(1.0);
        Ok(TaskOutput {
            update: None,
            metrics: BTreeMap::from([("covered".to_string(), share)]),
            weight: n,
            validation_weight: 0.0,
        })
    }

    /// 1 for each basket that contains a frequent itemset of two or more
    /// items, 0 otherwise.
    fn score(
        &self,
        _ctx: &RoundContext<'_>,
        global: &[f32],
        data: &mut LocalData,
    ) -> Result<Vec<f32>, TrainError> {
        Ok(self
            .covered(global, data)?
            .into_iter()
            .map(|c| if c { 1.0 } else { 0.0 })
            .collect())
    }

    fn analysis(&self) -> Option<&dyn Analysis> {
        Some(self)
    }
}

impl Analysis for Itemsets {
    fn next_version(
        &self,
        global: &[f32],
        sums: &[f64],
        total_weight: f64,
    ) -> Result<Vec<f32>, TrainError> {
        let mut state = self.state(global)?;
        state
            .on_sum(sums, total_weight)
            .map_err(|e| TrainError::InvalidModel(e.to_string()))?;
        state
            .encode()
            .map_err(|e| TrainError::InvalidModel(e.to_string()))
    }

    fn first_bad_value(
        &self,
        _sender: &str,
        update: &crate::federation::update::Update,
    ) -> Option<usize> {
        update.values.iter().position(|&v| {
            !(v.is_finite() && v >= 0.0 && v.fract() == 0.0 && f64::from(v) <= update.weight)
        })
    }

    fn complete(&self, global: &[f32]) -> bool {
        Apriori::header(global).is_ok_and(|(_, candidates)| candidates == 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::sgd::SgdParams;

    fn ctx(sgd: &SgdParams) -> RoundContext<'_> {
        RoundContext {
            sgd,
            seed: 1,
            round: 1,
            standardizer: None,
            best_version: None,
        }
    }

    fn merchant(baskets: Vec<Basket>) -> LocalData {
        LocalData {
            merchant_id: "m".into(),
            baskets: Some(baskets),
            ..Default::default()
        }
    }

    /// Runs every level with the given merchants, summing plainly.
    fn federate(model: Itemsets, merchants: &mut [LocalData]) -> Vec<f32> {
        let sgd = SgdParams::default();
        let mut global = model.initial_params(0);
        let mut levels = 0;
        while !model.complete(&global) {
            let (_, candidates) = Apriori::header(&global).unwrap();
            let m = Itemsets {
                candidates,
                ..model
            };
            let mut sums = vec![0.0; candidates];
            let mut weight = 0.0;
            for d in merchants.iter_mut() {
                let u = m.fit(&ctx(&sgd), &global, d).unwrap().update.unwrap();
                assert_eq!(u.values.len(), m.update_len());
                for (s, v) in sums.iter_mut().zip(&u.values) {
                    *s += f64::from(*v);
                }
                weight += u.weight;
            }
            global = m.next_version(&global, &sums, weight).unwrap();
            levels += 1;
            assert!(levels < 10);
        }
        global
    }

    #[test]
    fn levels_as_rounds_find_the_pooled_frequent_itemsets_and_the_state_round_trips() {
        let model = Itemsets {
            num_items: 5,
            min_count: 2,
            candidates: 0,
        };
        assert_eq!(model.initial_params(0).len(), model.model_len());
        let a = vec![vec![0, 1, 2], vec![0, 1], vec![3]];
        let b = vec![vec![0, 1, 2], vec![1, 2], vec![4]];
        let global = federate(model, &mut [merchant(a.clone()), merchant(b.clone())]);
        let state = Apriori::decode(&global, 5, 2, 0).unwrap();
        assert!(state.finished());
        assert_eq!(state.total_baskets(), 6);
        let found: Vec<(Vec<u32>, u64)> = state
            .frequent()
            .iter()
            .map(|f| (f.items.clone(), f.count))
            .collect();
        // Pooled: {0}:3 {1}:4 {2}:3 {0,1}:3 {0,2}:2 {1,2}:3 {0,1,2}:2.
        assert_eq!(
            found,
            vec![
                (vec![0], 3),
                (vec![1], 4),
                (vec![2], 3),
                (vec![0, 1], 3),
                (vec![0, 2], 2),
                (vec![1, 2], 3),
                (vec![0, 1, 2], 2),
            ]
        );
        assert_eq!(state.encode().unwrap(), global);
        // The final state: 2 of the 3 baskets of merchant a hold a frequent pair.
        let sgd = SgdParams::default();
        let out = model
            .evaluate(&ctx(&sgd), &global, &mut merchant(a))
            .unwrap();
        assert!((out.metrics["covered"] - 2.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn a_corrupt_state_or_a_foreign_item_is_refused_not_counted() {
        let model = Itemsets {
            num_items: 3,
            min_count: 1,
            candidates: 3,
        };
        let sgd = SgdParams::default();
        let mut global = model.initial_params(0);
        let mut bad = global.clone();
        bad[STATE_HEADER + 1] = 0.5;
        let err = model
            .fit(&ctx(&sgd), &bad, &mut merchant(vec![vec![0]]))
            .unwrap_err();
        assert!(err.to_string().contains("not an integer"), "{err}");
        bad[STATE_HEADER + 1] = 7.0;
        let err = model
            .fit(&ctx(&sgd), &bad, &mut merchant(vec![vec![0]]))
            .unwrap_err();
        assert!(err.to_string().contains("outside the catalogue"), "{err}");
        let err = model
            .fit(&ctx(&sgd), &global, &mut merchant(vec![vec![0, 9]]))
            .unwrap_err();
        assert_eq!(
            err,
            TrainError::ItemOutOfRange {
                item: 9,
                num_items: 3
            }
        );
        global.push(1.0);
        assert!(
            model
                .fit(&ctx(&sgd), &global, &mut merchant(vec![]))
                .is_err()
        );
        // Counts that are not whole baskets never become a state.
        assert!(
            model
                .next_version(&model.initial_params(0), &[1.0, 0.5, 2.0], 3.0)
                .is_err()
        );
    }
}
