//! `fedcart-client rules`: the merchant's "bought together" lists, offline
//! from the local state: the federation's frequent itemsets (the final state
//! of an itemsets run, which the coordinator hands to every agent when the
//! run ends) turned into association rules, kept for the items this merchant
//! sells. Nothing leaves the machine.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use fedcart_common::data::catalogue::Catalogue;
use fedcart_common::itemsets::{self, Apriori, Basket, Rule, StateError};
use fedcart_common::task::{ModelSpec, TaskKind};
use thiserror::Error;

use crate::state::{StateDir, StateError as LocalStateError};

/// Why the lists could not be written.
#[derive(Debug, Error)]
pub enum RulesError {
    /// No itemsets in the local state (`held`: what is, e.g. the segments
    /// of the run `--run` named).
    #[error(
        "{}",
        crate::recommend::missing(
            "frequent-itemsets",
            "an itemsets (`model = { family = \"itemsets\", … }`)",
            held
        )
    )]
    NoItemsets {
        /// The models the state holds instead ([`StateDir::held_models`]).
        held: Vec<String>,
    },
    /// The stored state is one the agent downloaded to count a level, not
    /// the final result.
    #[error(
        "the stored itemsets are level {level} of a run still in progress: keep the agent \
         running (`fedcart-client run`) until the coordinator finishes the run"
    )]
    InProgress {
        /// The level being counted.
        level: usize,
    },
    /// The stored state does not decode.
    #[error("the stored itemsets state is corrupt")]
    Corrupt(#[source] StateError),
    /// The catalogue does not have the run's number of items.
    #[error("the catalogue has {got} items, the itemsets run {expected}")]
    Catalogue {
        /// Items of the run.
        expected: usize,
        /// Items of the configured catalogue.
        got: usize,
    },
    /// The output could not be written.
    #[error("writing {}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The writer's error.
        #[source]
        source: csv::Error,
    },
    /// The local state could not be read.
    #[error(transparent)]
    State(#[from] LocalStateError),
}

/// What [`bought_together`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct Written {
    /// Rows written (item, rule).
    pub rows: usize,
    /// Items of the merchant's catalogue with at least one rule.
    pub items: usize,
    /// Frequent itemsets of the federation.
    pub itemsets: usize,
    /// Baskets across the federation.
    pub baskets: u64,
}

/// The federation's frequent itemsets stored in `state` (the final state of
/// an itemsets run) and the run's catalogue size.
pub fn stored_itemsets(state: &StateDir) -> Result<(Apriori, usize), RulesError> {
    let none = || RulesError::NoItemsets {
        held: state.held_models(),
    };
    let Some((meta, params)) = state.load_global("itemsets")? else {
        return Err(none());
    };
    let ModelSpec::Itemsets {
        num_items,
        min_count,
        ..
    } = meta.spec.model
    else {
        return Err(none());
    };
    let apriori = Apriori::decode(&params, num_items, min_count, 0).map_err(RulesError::Corrupt)?;
    if meta.spec.kind != TaskKind::Evaluate {
        return Err(RulesError::InProgress {
            level: apriori.level(),
        });
    }
    Ok((apriori, num_items))
}

/// Writes `item,bought_with,support,confidence,lift` to `out`: for each item
/// this merchant sells (in its `baskets`), the rules `item → others` of the
/// federation with confidence at least `min_confidence`, best lift first
/// (then confidence), at most `top` per item. Items are named through the
/// shared `catalogue`; several consequent items are separated by spaces.
pub fn bought_together(
    state: &StateDir,
    catalogue: &Catalogue,
    baskets: &[Basket],
    min_confidence: f64,
    top: usize,
    out: &Path,
) -> Result<Written, RulesError> {
    let (apriori, num_items) = stored_itemsets(state)?;
    if catalogue.len() != num_items {
        return Err(RulesError::Catalogue {
            expected: num_items,
            got: catalogue.len(),
        });
    }
    let rules = itemsets::rules(apriori.frequent(), apriori.total_baskets(), min_confidence);
    let sold: HashSet<u32> = baskets.iter().flatten().copied().collect();
    let mut by_item: BTreeMap<u32, Vec<&Rule>> = BTreeMap::new();
    for r in itemsets::bought_together(&rules, &sold) {
        by_item.entry(r.antecedent[0]).or_default().push(r);
    }
    let name =
        |items: &[u32]| itemsets::item_list(items.iter().map(|&i| catalogue.id(i).unwrap_or("?")));
    let write = |source| RulesError::Write {
        path: out.to_owned(),
        source,
    };
    // Staged: a failure part-way leaves the previous lists in place.
    let mut staged = crate::output::Output::create(out).map_err(|e| write(e.into()))?;
    let mut w = csv::Writer::from_writer(&mut staged);
    w.write_record(["item", "bought_with", "support", "confidence", "lift"])
        .map_err(write)?;
    let mut rows = 0;
    for list in by_item.values_mut() {
        list.sort_by(|a, b| {
            b.lift
                .total_cmp(&a.lift)
                .then(b.confidence.total_cmp(&a.confidence))
                .then(a.consequent.cmp(&b.consequent))
        });
        for r in list.iter().take(top) {
            w.write_record([
                // One item (the rule's single antecedent), as the export
                // spells it; `bought_with` may be several, as a list.
                catalogue.id(r.antecedent[0]).unwrap_or("?").to_string(),
                name(&r.consequent),
                format!("{:.6}", r.support),
                format!("{:.6}", r.confidence),
                format!("{:.6}", r.lift),
            ])
            .map_err(write)?;
            rows += 1;
        }
    }
    w.flush().map_err(|e| write(e.into()))?;
    drop(w);
    staged.commit().map_err(|e| write(e.into()))?;
    Ok(Written {
        rows,
        items: by_item.len(),
        itemsets: apriori.frequent().len(),
        baskets: apriori.total_baskets(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::GlobalMeta;
    use fedcart_common::model::sgd::SgdParams;
    use fedcart_common::task::TaskSpec;

    fn meta(kind: TaskKind) -> GlobalMeta {
        GlobalMeta {
            run_id: "r".into(),
            version: 2,
            spec: TaskSpec {
                kind,
                model: ModelSpec::Itemsets {
                    num_items: 3,
                    min_count: 2,
                    candidates: 0,
                },
                sgd: SgdParams::default(),
                seed: 1,
                round: 2,
                standardizer: None,
                dp: None,
                best_version: None,
            },
            sha256: None,
        }
    }

    /// The final state of a federation whose pooled baskets are `baskets`.
    fn final_state(baskets: &[Basket]) -> Vec<f32> {
        let mut a = Apriori::new(3, 2, 0);
        let mut weight = baskets.len() as f64;
        while !a.finished() {
            let counts: Vec<f64> = itemsets::count(baskets, a.candidates())
                .into_iter()
                .map(|c| c as f64)
                .collect();
            a.on_sum(&counts, weight).unwrap();
            weight = 0.0;
        }
        a.encode().unwrap()
    }

    #[test]
    fn lists_name_the_merchants_items_with_support_confidence_and_lift() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        // An id with a space is written as is in `item` (it was a quoted
        // list of one, matching no item id).
        let cat = Catalogue::from_ids(["oat milk", "bread", "jam"]);
        let out = dir.path().join("rules.csv");
        let err = bought_together(&state, &cat, &[], 0.1, 5, &out).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("no frequent-itemsets model yet")
                && err.to_string().contains("fedcart-client run"),
            "{err}"
        );
        // Another run's model here (`--run` named a segments run): said,
        // rather than "run the agent until the run finishes".
        let mut segments = meta(TaskKind::Evaluate);
        segments.run_id = "segments-1".into();
        segments.spec.model = ModelSpec::churn_lr(2);
        let other = tempfile::tempdir().unwrap();
        let other_state = StateDir::open(other.path()).unwrap();
        other_state.save_global(&segments, &[0.0; 3]).unwrap();
        let err = bought_together(&other_state, &cat, &[], 0.1, 5, &out).unwrap_err();
        assert!(
            err.to_string()
                .contains("this state holds churn version 2 of run `segments-1`"),
            "{err}"
        );
        // Pooled: milk+bread in 3 of 4 baskets, jam once.
        let pooled = vec![vec![0, 1], vec![0, 1], vec![0, 1, 2], vec![1]];
        let global = final_state(&pooled);
        state.save_global(&meta(TaskKind::Train), &global).unwrap();
        let err = bought_together(&state, &cat, &[], 0.1, 5, &out).unwrap_err();
        assert!(matches!(err, RulesError::InProgress { .. }), "{err}");
        state
            .save_global(&meta(TaskKind::Evaluate), &global)
            .unwrap();
        // This merchant sells only milk.
        let w = bought_together(&state, &cat, &[vec![0]], 0.1, 5, &out).unwrap();
        assert_eq!((w.rows, w.items, w.baskets), (1, 1, 4));
        let text = std::fs::read_to_string(&out).unwrap();
        // milk → bread: support 3/4, confidence 3/3, lift 1 / (4/4).
        assert_eq!(
            text,
            "item,bought_with,support,confidence,lift\noat milk,bread,0.750000,1.000000,1.000000\n"
        );
        let short = Catalogue::from_ids(["oat milk"]);
        assert!(matches!(
            bought_together(&state, &short, &[vec![0]], 0.1, 5, &out),
            Err(RulesError::Catalogue {
                expected: 3,
                got: 1
            })
        ));
    }
}
