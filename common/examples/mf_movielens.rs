//! Federated matrix factorisation on MovieLens ml-latest-small: centralised,
//! federated (per-item and plain FedAvg weighting) and local-only, explicit
//! (RMSE on a seeded 80/20 split) or implicit (HR@10 / NDCG@10, leave-last-out).
//!
//! ```text
//! cargo run --release -p fedcart-common --example mf_movielens -- explicit
//! cargo run --release -p fedcart-common --example mf_movielens -- implicit
//! cargo run --release -p fedcart-common --example mf_movielens -- explicit --export /tmp/split
//! ```
//! Options (`--name value`): merchants, rounds, epochs, k, lr, blr, reg, regb,
//! std, negatives, seed, central_epochs, export (directory for train.csv/test.csv).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use fedcart_common::federation::strategy::FedAvg;
use fedcart_common::model::mf::movielens;
use fedcart_common::model::mf::{MfAggregation, MfHyper};
use fedcart_common::reference::{evaluate, federate};
use fedcart_common::task::{ModelSpec, TaskKind, TaskSpec};
use fedcart_common::train::LocalData;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let implicit = args.first().is_some_and(|a| a == "implicit");
    let opt = |name: &str, default: f64| -> f64 {
        args.windows(2)
            .find(|w| w[0] == format!("--{name}"))
            .map_or(default, |w| w[1].parse().expect("numeric option"))
    };
    let export = args
        .windows(2)
        .find(|w| w[0] == "--export")
        .map(|w| PathBuf::from(&w[1]));
    let seed = opt("seed", 42.0) as u64;
    let merchants_n = opt("merchants", 10.0) as usize;
    let rounds = opt("rounds", 30.0) as u64;
    let k = opt("k", if implicit { 64.0 } else { 32.0 }) as usize;
    let hyper = MfHyper {
        learning_rate: opt("lr", if implicit { 0.05 } else { 0.01 }) as f32,
        bias_learning_rate: opt("blr", if implicit { 0.05 } else { 0.01 }) as f32,
        reg_factors: opt("reg", if implicit { 0.01 } else { 0.1 }) as f32,
        reg_bias: opt("regb", if implicit { 0.01 } else { 0.05 }) as f32,
        epochs: opt("epochs", 5.0) as usize,
        negatives: opt("negatives", 4.0) as usize,
        init_std: opt("std", 0.1) as f32,
        clip: (!implicit).then_some([0.5, 5.0]),
        aggregation: MfAggregation::PerItem,
        ..Default::default()
    };
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/ml-latest-small/ratings.csv");
    let rows = movielens::load_ratings(&path)?;
    let fed = if implicit {
        movielens::implicit_federation(&rows, merchants_n, 4.0, seed)
    } else {
        movielens::explicit_federation(&rows, merchants_n, 0.2, seed)
    };
    if let Some(dir) = &export {
        std::fs::create_dir_all(dir)?;
        movielens::write_csv(&dir.join("train.csv"), &fed.train)?;
        movielens::write_csv(&dir.join("test.csv"), &fed.test)?;
        println!(
            "exported {} train / {} test rows to {}",
            fed.train.len(),
            fed.test.len(),
            dir.display()
        );
    }
    let n = fed.catalogue.len();
    let spec_for = |hyper: MfHyper, factors: usize| TaskSpec {
        kind: TaskKind::Train,
        model: if implicit {
            ModelSpec::MfImplicit {
                num_items: n,
                factors,
                hyper,
            }
        } else {
            ModelSpec::Mf {
                num_items: n,
                factors,
                hyper,
            }
        },
        sgd: Default::default(),
        seed,
        round: 0,
        standardizer: None,
        dp: None,
        best_version: None,
    };
    let metric = if implicit { "hr@10" } else { "rmse" };
    println!(
        "{} items, {} train / {} test, {} merchants, k={k}, {hyper:?}",
        n,
        fed.train.len(),
        fed.test.len(),
        merchants_n
    );
    let spec = spec_for(hyper.clone(), k);
    let mut merchants = fed.merchants.clone();

    // Centralised: everyone's data in one merchant, same local epochs per round.
    let mut central = vec![LocalData::pooled("central", &merchants)];
    let c = federate(&spec, &mut central, rounds, &mut FedAvg)?;
    report("centralised", &c.rounds, metric, implicit);

    let f = federate(&spec, &mut merchants, rounds, &mut FedAvg)?;
    report("federated per-item", &f.rounds, metric, implicit);
    let fed_per_merchant = per_merchant(&spec, &f.params, &mut merchants, metric)?;

    let uniform = spec_for(
        MfHyper {
            aggregation: MfAggregation::Uniform,
            ..hyper.clone()
        },
        k,
    );
    let mut um = fed.merchants.clone();
    let u = federate(&uniform, &mut um, rounds, &mut FedAvg)?;
    report("federated plain FedAvg", &u.rounds, metric, implicit);

    // Local-only: each merchant a federation of one; merged by test weight.
    let mut local_hist: Vec<BTreeMap<String, f64>> = vec![BTreeMap::new(); rounds as usize];
    let mut local_per_merchant = Vec::new();
    let mut total = 0.0;
    for m in fed.merchants.iter() {
        let mut one = vec![m.clone()];
        let r = federate(&spec, &mut one, rounds, &mut FedAvg)?;
        let w = test_weight(&one[0], implicit);
        total += w;
        for (acc, h) in local_hist.iter_mut().zip(&r.rounds) {
            for (key, v) in h {
                *acc.entry(key.clone()).or_default() += v * w;
            }
        }
        local_per_merchant.push(r.rounds.last().map_or(0.0, |h| h[metric]));
    }
    for h in &mut local_hist {
        h.values_mut().for_each(|v| *v /= total);
    }
    report("local-only", &local_hist, metric, implicit);

    if implicit {
        let (hr, ndcg) = popularity(&central[0], n);
        println!(
            "{:32} final hr@10={hr:.4} ndcg@10={ndcg:.4}",
            "popularity (pooled counts)"
        );
    }
    // Baseline-only (biases, k = 0), centralised.
    if !implicit {
        let b = federate(
            &spec_for(hyper.clone(), 0),
            &mut central,
            rounds,
            &mut FedAvg,
        )?;
        report("centralised biases-only (k=0)", &b.rounds, metric, implicit);
    }
    println!("\nper merchant {metric} (federated vs local-only):");
    let mut wins = 0;
    for (m, (a, b)) in fed_per_merchant.iter().zip(&local_per_merchant).enumerate() {
        let better = if implicit { a > b } else { a < b };
        wins += usize::from(better);
        println!("  m{m}: {a:.4} vs {b:.4}");
    }
    println!(
        "federated better for {wins}/{} merchants",
        fed_per_merchant.len()
    );
    let med = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        (v[(v.len() - 1) / 2] + v[v.len() / 2]) / 2.0
    };
    println!(
        "median merchant {metric}: federated {:.4}, local-only {:.4}",
        med(&fed_per_merchant),
        med(&local_per_merchant)
    );
    Ok(())
}

/// Ranks items by pooled purchase count: the non-personalised reference.
fn popularity(pooled: &LocalData, n: usize) -> (f64, f64) {
    let d = pooled.mf.as_ref().expect("mf data");
    let mut scores = vec![0.0f32; n];
    let mut seen = vec![Vec::new(); d.users.len()];
    for r in &d.train {
        scores[r.item as usize] += 1.0;
        seen[r.user as usize].push(r.item);
    }
    seen.iter_mut().for_each(|s| s.sort_unstable());
    let (mut hr, mut ndcg) = (0.0, 0.0);
    for r in &d.test {
        let (h, g) = fedcart_common::model::mf::ranking_metrics(
            &scores,
            r.item as usize,
            &seen[r.user as usize],
        );
        hr += h;
        ndcg += g;
    }
    let m = d.test.len().max(1) as f64;
    (hr / m, ndcg / m)
}

fn test_weight(m: &LocalData, _implicit: bool) -> f64 {
    m.mf.as_ref().map_or(0.0, |d| d.test.len() as f64)
}

fn per_merchant(
    spec: &TaskSpec,
    params: &[f32],
    merchants: &mut [LocalData],
    metric: &str,
) -> Result<Vec<f64>, Box<dyn std::error::Error>> {
    let mut out = Vec::new();
    for m in merchants.iter_mut() {
        let r = evaluate(spec, params, std::slice::from_mut(m))?;
        out.push(r[metric]);
    }
    Ok(out)
}

fn report(name: &str, rounds: &[BTreeMap<String, f64>], metric: &str, implicit: bool) {
    let series: Vec<String> = rounds
        .iter()
        .enumerate()
        .filter(|(r, _)| (r + 1) % 5 == 0 || *r == 0)
        .map(|(r, h)| format!("r{}={:.4}", r + 1, h[metric]))
        .collect();
    let last = rounds.last().cloned().unwrap_or_default();
    let extra = if implicit {
        format!(
            " ndcg@10={:.4}",
            last.get("ndcg@10").copied().unwrap_or(0.0)
        )
    } else {
        String::new()
    };
    println!(
        "{name:32} final {metric}={:.4}{extra}  [{}]",
        last[metric],
        series.join(" ")
    );
}
