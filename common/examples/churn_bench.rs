//! Telco churn with five merchants: centralised and federated logistic
//! regression and MLP, printing the held-out metrics recorded in
//! BENCHMARKS.md. `--export DIR` also writes the exact encoded train/held-out
//! split as CSV so scikit-learn can be run side by side on the same rows.
//!
//! `cargo run --release -p fedcart-common --example churn_bench [-- --export DIR]`

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use fedcart_common::data::orders::{
    BadRowPolicy, ChurnConfig, OrdersMapping, TimestampFormat, derive, read_orders,
};
use fedcart_common::data::tabular::{Schema, TabularDataset};
use fedcart_common::federation::strategy::FedAvg;
use fedcart_common::model::churn::partition_churn;
use fedcart_common::model::lr::SgdParams;
use fedcart_common::model::mlp::EarlyStopping;
use fedcart_common::reference::{evaluate, federate};
use fedcart_common::task::{ModelSpec, TaskKind, TaskSpec};
use fedcart_common::train::LocalData;

const ROUNDS: u64 = 20;

fn write_split(ds: &TabularDataset, path: &Path) -> std::io::Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    for (row, y) in ds.x.rows().into_iter().zip(&ds.y) {
        let cells: Vec<String> = row.iter().map(|v| v.to_string()).collect();
        writeln!(f, "{},{}", cells.join(","), y)?;
    }
    f.flush()
}

fn show(name: &str, m: &BTreeMap<String, f64>) {
    // Undefined figures (no predicted or actual churner) are absent.
    let get = |k: &str| m.get(k).map_or("–".to_string(), |v| format!("{v:.4}"));
    println!(
        "{name:<26} auc {}  log_loss {}  accuracy {}  precision {}  recall {}",
        get("auc"),
        get("log_loss"),
        get("accuracy"),
        get("precision"),
        get("recall")
    );
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let export = args
        .iter()
        .position(|a| a == "--export")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from);
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/telco-churn/Telco-Customer-Churn.csv");
    let ds = Schema::telco().load_csv(&path)?;
    let d = Schema::telco().num_features();
    let mut merchants = partition_churn(&ds, 5, 0.2, 42);
    let mut pooled = vec![LocalData::pooled("all", &merchants)];
    if let Some(dir) = &export {
        std::fs::create_dir_all(dir)?;
        let c = pooled[0].churn.as_ref().expect("churn data");
        write_split(&c.train, &dir.join("train.csv"))?;
        write_split(&c.valid, &dir.join("valid.csv"))?;
        println!("wrote {}/train.csv and valid.csv", dir.display());
    }
    let lr = TaskSpec {
        kind: TaskKind::Train,
        model: ModelSpec::churn_lr(d),
        sgd: SgdParams::default(),
        seed: 42,
        round: 0,
        standardizer: None,
        dp: None,
        best_version: None,
    };
    let mlp = TaskSpec {
        model: ModelSpec::churn_mlp(d, vec![32]),
        sgd: SgdParams {
            epochs: 5,
            learning_rate: 0.001,
            early_stopping: Some(EarlyStopping {
                validation_fraction: 0.15,
                patience: 2,
            }),
            ..Default::default()
        },
        ..lr.clone()
    };
    println!(
        "Telco churn, 5 iid merchants, {ROUNDS} rounds, held-out 20% per merchant (stratified)"
    );
    for spec in [lr, mlp] {
        let c = federate(&spec, &mut pooled, ROUNDS, &mut FedAvg)?;
        let f = federate(&spec, &mut merchants, ROUNDS, &mut FedAvg)?;
        show(
            &format!("{} centralised", spec.model.name()),
            c.rounds.last().expect("rounds"),
        );
        show(
            &format!("{} federated", spec.model.name()),
            f.rounds.last().expect("rounds"),
        );
        // The federated model scored on the pooled held-out rows, so both
        // figures are one AUC over the same 1409 customers.
        let mut on_pooled = spec.clone();
        on_pooled.standardizer = f.standardizer.clone();
        let pooled_metrics = evaluate(&on_pooled, &f.params, &mut pooled)?;
        show(
            &format!("{} fed, pooled eval", spec.model.name()),
            &pooled_metrics,
        );
    }
    cdnow()
}

/// CDNOW through the orders pipeline: cutoff 1997-09-30, churn window 180
/// days, customers dealt into five iid merchants.
fn cdnow() -> Result<(), Box<dyn std::error::Error>> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/cdnow/CDNOW_master.txt");
    let (orders, report) = read_orders(&path, &OrdersMapping::cdnow(), BadRowPolicy::Fail)?;
    let cutoff = TimestampFormat::Iso8601.parse("1997-09-30")?;
    let prepared = derive(&orders, &ChurnConfig::new(cutoff, 180))?;
    let s = &prepared.summary;
    println!(
        "\nCDNOW: {} order lines, {} customers, label rate {:.4} (cutoff {}, window {} days), 5 iid merchants, {ROUNDS} rounds",
        report.rows_read, s.customers, s.label_rate, s.cutoff, s.churn_window_days
    );
    let d = prepared.features.x.ncols();
    let mut merchants = partition_churn(&prepared.features, 5, 0.2, 42);
    let mut pooled = vec![LocalData::pooled("all", &merchants)];
    let lr = TaskSpec {
        kind: TaskKind::Train,
        model: ModelSpec::churn_lr(d),
        sgd: SgdParams::default(),
        seed: 42,
        round: 0,
        standardizer: None,
        dp: None,
        best_version: None,
    };
    let mlp = TaskSpec {
        model: ModelSpec::churn_mlp(d, vec![32]),
        sgd: SgdParams {
            epochs: 5,
            learning_rate: 0.001,
            early_stopping: Some(EarlyStopping {
                validation_fraction: 0.15,
                patience: 2,
            }),
            ..Default::default()
        },
        ..lr.clone()
    };
    for spec in [lr, mlp] {
        let c = federate(&spec, &mut pooled, ROUNDS, &mut FedAvg)?;
        let f = federate(&spec, &mut merchants, ROUNDS, &mut FedAvg)?;
        show(
            &format!("{} centralised", spec.model.name()),
            c.rounds.last().expect("rounds"),
        );
        show(
            &format!("{} federated", spec.model.name()),
            f.rounds.last().expect("rounds"),
        );
        let mut on_pooled = spec.clone();
        on_pooled.standardizer = f.standardizer.clone();
        let pooled_metrics = evaluate(&on_pooled, &f.params, &mut pooled)?;
        show(
            &format!("{} fed, pooled eval", spec.model.name()),
            &pooled_metrics,
        );
    }
    Ok(())
}
