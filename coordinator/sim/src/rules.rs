//! `--task rules`: federated frequent itemsets and association rules
//! (`fedcart_common::itemsets`), driven level by level in-process.
//!
//! The merchants' orders become baskets in one catalogue (the union of the
//! item ids of every merchant, agreed as the MF tasks agree theirs). Each level
//! is one exchange: the coordinator's [`Apriori`] hands out the candidates,
//! every merchant returns its count update, the updates are summed — with
//! `--secagg`, by the real secure-aggregation protocol in the 2^64 ring of a
//! statistics task, so the coordinator sees only the federation's counts —
//! and `Apriori::on_sum` moves to the next level. Bytes per merchant: the
//! candidates down (4 bytes per item id) and the counts up (4 bytes each).
//!
//! With `--transport grpc` the levels are instead ordinary federated rounds
//! of the real coordinator service and agents (see [`over_grpc`]).

use std::collections::HashSet;
use std::time::Instant;

use anyhow::Context;
use fedcart_common::data::catalogue::Catalogue;
use fedcart_common::federation::aggregate::SumAccumulator;
use fedcart_common::itemsets::{self, Apriori, Basket, Itemset, Rule};
use fedcart_common::privacy::secagg::{Dropouts, SecAggConfig, run_in_memory};
use fedcart_common::task::{ModelSpec, TaskKind};
use rayon::prelude::*;

use fedcart_common::train::LocalData;
use fedcart_coordinator::config::{RunConfig, SecAggSettings, Selection};

use crate::Transport;
use crate::data::{DataSpec, Population, TaskChoice};
use crate::experiment::{Experiment, RoundRow};
use crate::settings::Settings;

/// A merchant's id and its baskets.
pub type MerchantBaskets = (String, Vec<Basket>);

/// Rules reported need at least this confidence (as mlxtend's
/// `association_rules(metric="confidence", min_threshold=…)`).
pub const MIN_CONFIDENCE: f64 = 0.1;

/// The federated result: frequent itemsets, rules and the catalogue.
#[derive(Debug, Clone)]
pub struct Mined {
    /// Frequent itemsets with their federated counts.
    pub frequent: Vec<Itemset>,
    /// Baskets across the federation.
    pub baskets: u64,
    /// Rules above [`MIN_CONFIDENCE`].
    pub rules: Vec<Rule>,
    /// The agreed catalogue.
    pub catalogue: Catalogue,
    /// Each merchant's id and the catalogue items it sells.
    pub sold: Vec<(String, HashSet<u32>)>,
}

/// Mines the merchants' baskets level by level; `secure` sums every level
/// with secure aggregation (over a graph of degree `neighbours`, or the
/// default). Also returns one report row per level.
pub fn mine(
    merchants: &[(String, Vec<Basket>)],
    num_items: usize,
    min_support: u64,
    max_len: usize,
    secure: bool,
    neighbours: Option<usize>,
    seed: u64,
    pool: &rayon::ThreadPool,
) -> anyhow::Result<(Apriori, Vec<RoundRow>)> {
    let mut apriori = Apriori::new(num_items, min_support, max_len);
    let mut rows = Vec::new();
    while !apriori.finished() {
        let started = Instant::now();
        let level = apriori.level();
        let cands = apriori.candidates().to_vec();
        let updates: Vec<_> = pool.install(|| {
            merchants
                .par_iter()
                .map(|(_, b)| itemsets::count_update(b, &cands))
                .collect()
        });
        let mut row = RoundRow {
            round: level as u64,
            selected: merchants.len(),
            reported: merchants.len(),
            committed: true,
            bytes_down: (4 * cands.len() * level * merchants.len()) as u64,
            ..Default::default()
        };
        let acc = if secure {
            let secure_start = Instant::now();
            let cfg = SecAggConfig::for_task(
                TaskKind::Stats,
                cands.len(),
                0,
                merchants.len(),
                1e5,
                neighbours,
            );
            let round_seed = fedcart_common::seed::derive(seed, &["itemsets", &level.to_string()]);
            let out = run_in_memory(&cfg, &updates, &Dropouts::none(), round_seed)
                .with_context(|| format!("secure aggregation of level {level}"))?;
            row.clipped = out.output.sum.clipped;
            row.bytes_up =
                (cfg.modulus_bits.div_ceil(8) as usize * cands.len() * merchants.len()) as u64;
            row.secagg_seconds = secure_start.elapsed().as_secs_f64();
            out.output.sum.into_accumulator()
        } else {
            let mut acc = SumAccumulator::new(cands.len(), 0);
            for u in &updates {
                acc.add(u)?;
            }
            row.bytes_up = (4 * cands.len() * merchants.len()) as u64;
            acc
        };
        let before = apriori.frequent().len();
        apriori.on_sum(acc.sum_values(), acc.total_weight())?;
        row.eval.insert("candidates".into(), cands.len() as f64);
        row.eval.insert(
            "frequent".into(),
            (apriori.frequent().len() - before) as f64,
        );
        row.seconds = started.elapsed().as_secs_f64();
        rows.push(row);
    }
    Ok((apriori, rows))
}

/// `--transport grpc`: the levels as ordinary federated rounds of the real
/// coordinator service (`ModelSpec::Itemsets`, see
/// `fedcart_common::model::itemsets`), one real agent per merchant counting
/// its baskets, with `--secagg` the real secure-aggregation stages; the
/// frequent itemsets are read from the committed final state. Bytes down
/// are the whole state each level (frequent itemsets so far and the
/// candidates), bytes up the counts (8 bytes each under secure aggregation).
fn over_grpc(
    s: &Settings,
    task: TaskChoice,
    data: &DataSpec,
    merchants: &[MerchantBaskets],
    catalogue: &Catalogue,
    min_support: u64,
    load_seconds: f64,
) -> anyhow::Result<(Experiment, Apriori)> {
    let n = merchants.len();
    let model = ModelSpec::Itemsets {
        num_items: catalogue.len(),
        min_count: min_support,
        candidates: 0,
    };
    // A level of k items needs a basket of k items: the longest basket
    // bounds the number of levels (one more finds no candidate frequent).
    let longest = merchants
        .iter()
        .flat_map(|(_, b)| b.iter().map(Vec::len))
        .max()
        .unwrap_or(0);
    let run = RunConfig {
        run_id: "simulation".into(),
        seed: s.seed,
        rounds: (longest as u64 + 1).min(s.rounds),
        model: model.clone(),
        sgd: Default::default(),
        selection: Selection {
            fraction: 1.0,
            min_agents: n,
            max_agents: n,
            min_available: 0,
        },
        quorum: n,
        round_timeout_ms: u64::MAX / 2,
        evaluate: false,
        early_stopping: None,
        strategy: Default::default(),
        secagg: s.secagg.then(|| SecAggSettings {
            neighbours: s.secagg_neighbours,
            clip: s.secagg_clip(task),
            verify_survivors: false,
            stage_timeout_ms: None,
        }),
        dp: None,
        max_attempts: s.max_attempts,
    };
    run.validate()?;
    let pop = Population {
        merchants: merchants
            .iter()
            .map(|(id, b)| LocalData {
                merchant_id: id.clone(),
                baskets: Some(b.clone()),
                ..Default::default()
            })
            .collect(),
        model,
        // Not carried on this path (`load` reads the export apart): skipped
        // rows are on standard error only.
        notes: Vec::new(),
    };
    let fleet = crate::clock::Fleet::new(&s.clock, s.seed, &pop.merchants, &pop.model, &run.sgd);
    let exp = crate::grpc::run(s, task, data, pop, run, &fleet, load_seconds)?;
    let apriori = Apriori::decode(&exp.final_model, catalogue.len(), min_support, 0)
        .context("the committed itemsets state")?;
    Ok((exp, apriori))
}

/// Reads the orders, deals them into merchants and builds their baskets.
pub fn load(s: &Settings, data: &DataSpec) -> anyhow::Result<(Vec<MerchantBaskets>, Catalogue)> {
    let DataSpec::Orders(src) = data else {
        anyhow::bail!("--task rules needs --data orders:PATH (with an item column)");
    };
    let parts = crate::data::orders::merchant_orders(src, s.merchants, s.partition, s.seed)?;
    let catalogue = Catalogue::from_ids(
        parts
            .iter()
            .flat_map(|(_, o)| o.iter().filter_map(|o| o.item.clone()))
            .collect::<std::collections::BTreeSet<_>>(),
    );
    if catalogue.is_empty() {
        anyhow::bail!(
            "{}: no item ids; give the item column (--item-col)",
            src.path.display()
        );
    }
    let merchants = parts
        .iter()
        .map(|(id, o)| (id.clone(), itemsets::baskets(o, &catalogue)))
        .collect();
    Ok((merchants, catalogue))
}

/// Runs `--task rules` and returns the experiment (report lines included).
pub fn run(
    s: &Settings,
    task: TaskChoice,
    data: &DataSpec,
    pool: &rayon::ThreadPool,
) -> anyhow::Result<(Experiment, Mined)> {
    let TaskChoice::Rules(min_support) = task else {
        anyhow::bail!("not a rules task");
    };
    let load_start = Instant::now();
    let (merchants, catalogue) = load(s, data)?;
    let load_seconds = load_start.elapsed().as_secs_f64();
    let (mut exp, apriori) = match s.transport {
        Transport::Inproc => {
            let mut exp = Experiment::new(
                task,
                data,
                s,
                merchants.len(),
                &ModelSpec::Noop { dim: 0 },
                load_seconds,
            );
            let (apriori, rows) = mine(
                &merchants,
                catalogue.len(),
                min_support,
                // One level a round, as in a real federation: `--rounds`
                // caps the itemset size.
                usize::try_from(s.rounds).unwrap_or(usize::MAX),
                s.secagg,
                s.secagg_neighbours,
                s.seed,
                pool,
            )?;
            exp.rounds = rows;
            exp.finish();
            (exp, apriori)
        }
        Transport::Grpc => over_grpc(
            s,
            task,
            data,
            &merchants,
            &catalogue,
            min_support,
            load_seconds,
        )?,
    };
    let rules = itemsets::rules(apriori.frequent(), apriori.total_baskets(), MIN_CONFIDENCE);
    let name =
        |items: &[u32]| itemsets::item_list(items.iter().map(|&i| catalogue.id(i).unwrap_or("?")));
    exp.report.push(format!(
        "rules: {} baskets, {} frequent itemsets (min support {min_support} baskets), {} rules (confidence >= {MIN_CONFIDENCE})",
        apriori.total_baskets(),
        apriori.frequent().len(),
        rules.len()
    ));
    if rules.is_empty() {
        let multi = merchants
            .iter()
            .flat_map(|(_, b)| b)
            .any(|basket| basket.len() > 1);
        exp.report.push(if multi && s.rounds < 2 {
            // Pairs were never counted: a smaller --min-support was advised.
            format!(
                "--rounds {} counts single items only (one itemset size per round), and a rule \
                 needs two: give --rounds 2 or more, or leave it out",
                s.rounds
            )
        } else if multi {
            no_rules_hint(apriori.frequent(), apriori.total_baskets(), min_support)
        } else {
            format!(
                "every one of the {} baskets holds a single item, so no two items are ever \
                 bought together: rules need baskets (orders) of several items; with one line \
                 per order in the export, no --min-support finds any",
                apriori.total_baskets()
            )
        });
    }
    exp.report
        .push("| antecedent | consequent | support | confidence | lift |".into());
    exp.report.push("|---|---|---:|---:|---:|".into());
    let mut top: Vec<&Rule> = rules.iter().collect();
    top.sort_by(|a, b| {
        b.lift
            .total_cmp(&a.lift)
            .then(a.antecedent.cmp(&b.antecedent))
    });
    for r in top.iter().take(20) {
        exp.report.push(format!(
            "| {} | {} | {:.4} | {:.3} | {:.2} |",
            name(&r.antecedent),
            name(&r.consequent),
            r.support,
            r.confidence,
            r.lift
        ));
    }
    let sold = merchants
        .iter()
        .map(|(id, b)| (id.clone(), b.iter().flatten().copied().collect()))
        .collect();
    let mined = Mined {
        frequent: apriori.frequent().to_vec(),
        baskets: apriori.total_baskets(),
        rules,
        catalogue,
        sold,
    };
    Ok((exp, mined))
}

/// Writes `rules.csv` (global rules), `itemsets.csv` and
/// `bought_together.csv` under `dir`: CSV with quoting, an itemset's ids as
/// one field ([`itemsets::item_list`]).
pub fn write(dir: &std::path::Path, mined: &Mined) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = |items: &[u32]| {
        itemsets::item_list(items.iter().map(|&i| mined.catalogue.id(i).unwrap_or("?")))
    };
    let write = |file: &str, header: &[&str], rows: &mut dyn Iterator<Item = Vec<String>>| {
        let path = dir.join(file);
        let mut w =
            csv::Writer::from_path(&path).with_context(|| format!("writing {}", path.display()))?;
        let all = || -> Result<(), csv::Error> {
            w.write_record(header)?;
            for r in rows {
                w.write_record(&r)?;
            }
            Ok(w.flush()?)
        };
        all().with_context(|| format!("writing {}", path.display()))
    };
    write(
        "rules.csv",
        &["antecedent", "consequent", "support", "confidence", "lift"],
        &mut mined.rules.iter().map(|r| {
            vec![
                name(&r.antecedent),
                name(&r.consequent),
                r.support.to_string(),
                r.confidence.to_string(),
                r.lift.to_string(),
            ]
        }),
    )?;
    write(
        "itemsets.csv",
        &["itemset", "count", "support"],
        &mut mined.frequent.iter().map(|f| {
            vec![
                name(&f.items),
                f.count.to_string(),
                (f.count as f64 / mined.baskets.max(1) as f64).to_string(),
            ]
        }),
    )?;
    // Each merchant's "bought together" lists: the single-item rules from the
    // items it sells, best lift first.
    write(
        "bought_together.csv",
        &["merchant", "item", "bought_with", "confidence", "lift"],
        &mut mined.sold.iter().flat_map(|(merchant, sold)| {
            itemsets::bought_together(&mined.rules, sold)
                .into_iter()
                .map(|r| {
                    vec![
                        merchant.clone(),
                        // One item, as the export spells it; `bought_with`
                        // may be several, as a list.
                        mined
                            .catalogue
                            .id(r.antecedent[0])
                            .unwrap_or("?")
                            .to_string(),
                        name(&r.consequent),
                        r.confidence.to_string(),
                        r.lift.to_string(),
                    ]
                })
                .collect::<Vec<_>>()
        }),
    )?;
    Ok(())
}

/// Why a run found no rule, and the flag that changes it: no item (or no
/// pair of items) reaches `min_support` baskets, or every pair that does
/// falls under the confidence floor.
fn no_rules_hint(frequent: &[Itemset], baskets: u64, min_support: u64) -> String {
    // A value to try: 1 % of the baskets when that is smaller, else a
    // quarter of the support given (the hint said "smaller" and then named
    // 1 % of a large log, six times the support that had found nothing).
    let percent = (baskets / 100).max(1);
    let smaller = if percent < min_support {
        format!("1 % of the baskets is {percent}")
    } else {
        format!("try {}", (min_support / 4).max(2))
    };
    if frequent.is_empty() {
        format!(
            "no item is in {min_support} or more of the {baskets} baskets: give a smaller \
             --min-support ({smaller})"
        )
    } else if frequent.iter().all(|f| f.items.len() < 2) {
        format!(
            "{} items reach {min_support} baskets, but no two of them are bought together that \
             often: give a smaller --min-support ({smaller})",
            frequent.len()
        )
    } else {
        format!(
            "every rule among the frequent itemsets has a confidence under {MIN_CONFIDENCE}: the \
             items are bought together less often than apart"
        )
    }
}

#[cfg(test)]
mod tests;
