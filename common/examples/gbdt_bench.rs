//! Federated gradient-boosted trees (`churn-gbdt`) on Telco: the training
//! time of 100 trees, bytes per merchant per tree and round trips per tree,
//! and the AUC figures of BENCHMARKS.md ("Federated gradient-boosted
//! trees"): federated (the AUC of the pooled held-out predictions, as the
//! round metric reports it) against pooled training and local-only, iid and
//! under label skew. Each federation runs exactly as the engine does it
//! (`reference::federate`: statistics step, sketch round, one round per
//! level, plain sums) and serves the version with the best federated
//! validation AUC.
//!
//! TRAIN and TEST are the split `coordinator/sim/examples/gbdt_reference.py`
//! writes (scikit-learn's `train_test_split(test_size=0.2, stratify=y,
//! random_state=42)`); merchants are dealt like `fedcart-sim --train --test`.
//!
//! `cargo run --release -p fedcart-common --example gbdt_bench -- TRAIN TEST`

use std::time::Instant;

use fedcart_common::data::partition::Partitioner;
use fedcart_common::data::tabular::{Schema, TabularDataset};
use fedcart_common::federation::strategy::FedAvg;
use fedcart_common::model::gbdt::{Ensemble, GbdtParams};
use fedcart_common::reference::{Federated, evaluate, federate, federation_value, stats_step};
use fedcart_common::task::{ModelSpec, TaskKind, TaskSpec};
use fedcart_common::train::{ChurnData, LocalData, run_task};

fn merchants(
    train: &TabularDataset,
    test: &TabularDataset,
    p: Partitioner,
    n: usize,
    seed: u64,
) -> Vec<LocalData> {
    let labels = |d: &TabularDataset| -> Vec<u32> { d.y.iter().map(|&y| y as u32).collect() };
    let a = p.deal(&labels(train), None, n, seed).expect("deal train");
    let b = p.deal(&labels(test), None, n, seed ^ 1).expect("deal test");
    (0..n)
        .map(|k| LocalData {
            merchant_id: format!("m{k:04}"),
            churn: Some(ChurnData {
                train: train.select(&a[k]),
                valid: test.select(&b[k]),
            }),
            ..Default::default()
        })
        .collect()
}

fn spec(params: GbdtParams) -> TaskSpec {
    TaskSpec {
        kind: TaskKind::Train,
        model: ModelSpec::ChurnGbdt {
            num_features: Schema::telco().num_features(),
            params,
            level_len: 0,
        },
        sgd: Default::default(),
        seed: 42,
        round: 0,
        standardizer: None,
        dp: None,
        best_version: None,
    }
}

fn rounds(p: &GbdtParams) -> u64 {
    1 + (p.trees * p.max_depth) as u64
}

/// Grows `params.trees` trees without evaluations, timing it and counting
/// what each merchant sends and receives: (seconds, tree rounds, bytes up
/// per merchant per tree, bytes down per merchant per tree).
fn timed(template: &TaskSpec, ms: &mut [LocalData]) -> (f64, u64, f64, f64) {
    let start = Instant::now();
    let mut spec = template.clone();
    spec.standardizer = stats_step(&spec, ms).expect("stats");
    let mut params = spec.model.initial_params(spec.seed);
    let (mut tree_rounds, mut up, mut down) = (0u64, 0usize, 0usize);
    loop {
        let model = template.model.for_task(&params, &[]).expect("state");
        let family = model.model();
        let analysis = family.analysis().expect("an analysis");
        if analysis.complete(&params) {
            break;
        }
        let sketching = !Ensemble::decode(&params).expect("state").sketched;
        spec.model = model.clone();
        let mut sums = vec![0.0f64; family.update_len()];
        let mut weight = 0.0;
        for m in ms.iter_mut() {
            let u = run_task(&spec, &params, m)
                .expect("task")
                .update
                .expect("update");
            for (s, v) in sums.iter_mut().zip(&u.values) {
                *s += f64::from(*v);
            }
            weight += u.weight;
            if !sketching {
                up += 4 * u.values.len();
                down += 4 * params.len();
            }
        }
        if !sketching {
            tree_rounds += 1;
        }
        params = analysis.next_version(&params, &sums, weight).expect("next");
    }
    let trees = Ensemble::decode(&params).expect("state").trees.len() as f64;
    let n = ms.len() as f64;
    (
        start.elapsed().as_secs_f64(),
        tree_rounds,
        up as f64 / n / trees,
        down as f64 / n / trees,
    )
}

/// Federated (pooled-prediction AUC of the served version), pooled
/// training, and how many merchants the federated model serves better than
/// their local-only one.
fn compare(name: &str, template: &TaskSpec, ms: &[LocalData]) {
    let p = match &template.model {
        ModelSpec::ChurnGbdt { params, .. } => params.clone(),
        _ => unreachable!(),
    };
    let r = rounds(&p);
    let mut fed_data = ms.to_vec();
    let fed = federate(template, &mut fed_data, r, &mut FedAvg).expect("federated");
    let mut s = template.clone();
    s.standardizer = fed.standardizer.clone();
    let fed_auc = evaluate(&s, fed.served(), &mut fed_data).expect("eval")["auc"];
    let mut pooled = [LocalData::pooled("pooled", ms)];
    let central = federate(template, &mut pooled, r, &mut FedAvg).expect("pooled");
    s.standardizer = central.standardizer.clone();
    let pooled_auc = evaluate(&s, central.served(), &mut pooled).expect("eval")["auc"];
    let value = federation_value(template, ms, r, None, Federated::Reference(None))
        .expect("federation value");
    let wins = value
        .merchants
        .iter()
        .filter(|m| {
            m.federated.get("auc").copied().unwrap_or(f64::NAN)
                > m.local_only.get("auc").copied().unwrap_or(f64::NAN)
        })
        .count();
    let with_auc = value
        .merchants
        .iter()
        .filter(|m| m.federated.contains_key("auc"))
        .count();
    println!(
        "{name}: federated AUC {fed_auc:.4} (served best of {} trees), pooled GBDT {pooled_auc:.4}, \
         gap {:.4}; federated beats local-only for {wins} of {} merchants ({with_auc} with both \
         classes held out); local-only mean AUC {:.4}",
        Ensemble::decode(fed.served()).map_or(0, |e| e.trees.len()),
        pooled_auc - fed_auc,
        value.merchants.len(),
        value.pooled["local_only"]
            .get("auc")
            .copied()
            .unwrap_or(f64::NAN),
    );
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let (train, test) = match (args.get(1), args.get(2)) {
        (Some(a), Some(b)) => (a, b),
        _ => return Err("usage: gbdt_bench TRAIN.csv TEST.csv".into()),
    };
    let train = Schema::telco().load_csv(std::path::Path::new(train))?;
    let test = Schema::telco().load_csv(std::path::Path::new(test))?;

    // Cost of 100 trees (defaults otherwise), 5 iid merchants and pooled.
    let hundred = spec(GbdtParams {
        trees: 100,
        ..GbdtParams::default()
    });
    let mut five = merchants(&train, &test, Partitioner::Iid, 5, 42);
    let (secs, tr, up, down) = timed(&hundred, &mut five);
    println!(
        "100 trees, depth {}, 5 merchants in-process: {secs:.2} s; {:.1} round trips per tree; \
         per merchant per tree {:.1} KB up (histograms), {:.1} KB down (the state)",
        GbdtParams::default().max_depth,
        tr as f64 / 100.0,
        up / 1e3,
        down / 1e3
    );
    let mut pooled = [LocalData::pooled("pooled", &five)];
    let (secs, ..) = timed(&hundred, &mut pooled);
    println!("100 trees, pooled (one party): {secs:.2} s");

    let defaults = spec(GbdtParams::default());
    compare("iid, 5 merchants", &defaults, &five);
    let skew3 = merchants(&train, &test, Partitioner::Dirichlet(0.3), 10, 42);
    compare("dirichlet:0.3, 10 merchants", &defaults, &skew3);
    let skew1 = merchants(&train, &test, Partitioner::Dirichlet(0.1), 20, 42);
    compare("dirichlet:0.1, 20 merchants", &defaults, &skew1);
    Ok(())
}
