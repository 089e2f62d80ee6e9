//! Row-sparse traffic on the bundled grocery log (20 stores): lossless for
//! uploads, cheaper with in-store negatives, and downloads of changed rows.

use std::path::PathBuf;

use super::*;
use crate::data::orders::OrdersArgs;
use crate::{Experiment, Settings, SimArgs, run_all};

/// A third of the households of the bundled grocery log (every store, the
/// whole year): enough rows for the traffic, quick to load.
fn grocery_head() -> &'static std::path::Path {
    static HEAD: std::sync::OnceLock<tempfile::TempPath> = std::sync::OnceLock::new();
    HEAD.get_or_init(|| {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../data/grocery/orders.csv");
        let text = std::fs::read_to_string(path).unwrap();
        let head: String = text
            .lines()
            .enumerate()
            .filter(|(i, l)| {
                let customer = l.split(',').next().unwrap_or("");
                *i == 0 || customer.parse::<u64>().is_ok_and(|c| c % 3 == 0)
            })
            .map(|(_, l)| format!("{l}\n"))
            .collect();
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), head).unwrap();
        file.into_temp_path()
    })
}

fn grocery(traffic: TrafficMode, pool: &str, precision: RowPrecision) -> Experiment {
    grocery_with(traffic, pool, precision, None)
}

fn grocery_with(
    traffic: TrafficMode,
    pool: &str,
    precision: RowPrecision,
    hash_items: Option<u32>,
) -> Experiment {
    let path = grocery_head();
    let a = SimArgs {
        task: Some("mf-implicit".parse().unwrap()),
        data: Some(format!("orders:{}", path.display()).parse().unwrap()),
        partition: Some("natural".into()),
        rounds: Some(2),
        epochs: Some(1),
        factors: Some(8),
        patience: Some(0),
        traffic: Some(traffic),
        negatives_from: Some(pool.parse().unwrap()),
        download_precision: Some(precision),
        orders: OrdersArgs {
            hash_items,
            ..OrdersArgs::grocery_columns()
        },
        ..Default::default()
    };
    run_all(&Settings::from_args(a).unwrap()).unwrap().remove(0)
}

#[test]
fn hashed_item_ids_size_the_model_by_the_rows_asked_for_and_train() {
    let hashed = grocery_with(
        TrafficMode::Rows,
        "merchant",
        RowPrecision::F32,
        Some(4_096),
    );
    assert_eq!(hashed.model_len, 1 + 4_096 * (1 + 8));
    let exact = grocery(TrafficMode::Rows, "merchant", RowPrecision::F32);
    // A third of the log has 15,683 distinct products: one row each without hashing.
    assert_eq!(exact.model_len, 1 + 15_683 * (1 + 8));
    let hr = hashed.final_metrics["hr@10"];
    assert!(hr.is_finite() && hr > 0.0, "{hr}");
    // 15,683 items on 4,096 rows: the report says most items share one.
    assert!(
        hashed
            .report
            .iter()
            .any(|l| l.contains("--hash-items 4096 for 15683 distinct items: about 98 %")),
        "{:?}",
        hashed.report
    );
}

/// FedBuff's buffer is checked against the merchants the natural partition
/// makes (one per store), not the `--merchants` it ignores: a buffer more
/// stores than there are could never fill, and the run spun forever.
#[test]
fn a_fedbuff_buffer_larger_than_the_stores_is_refused_naming_their_number() {
    let path = grocery_head();
    let a = SimArgs {
        task: Some("mf-implicit".parse().unwrap()),
        data: Some(format!("orders:{}", path.display()).parse().unwrap()),
        partition: Some("natural".into()),
        merchants: Some(30),
        mode: Some("fedbuff".parse().unwrap()),
        buffer: Some(25),
        concurrency: Some(25),
        rounds: Some(2),
        orders: OrdersArgs::grocery_columns(),
        ..Default::default()
    };
    let err = run_all(&Settings::from_args(a).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("--buffer 25 must be in [1, merchants = 20]")
            && err.contains("give --concurrency and --buffer of at most 20"),
        "{err}"
    );
}

fn up(e: &Experiment) -> u64 {
    e.rounds.iter().map(|r| r.bytes_up).sum()
}

fn down(e: &Experiment) -> u64 {
    e.rounds.iter().map(|r| r.bytes_down).sum()
}

#[test]
fn row_sparse_traffic_is_lossless_and_in_store_negatives_shrink_uploads() {
    let dense = grocery(TrafficMode::Dense, "catalogue", RowPrecision::F32);
    let rows = grocery(TrafficMode::Rows, "catalogue", RowPrecision::F32);
    // Same seeds, same metrics, round by round: the row form is lossless.
    assert_eq!(dense.rounds.len(), rows.rounds.len());
    for (a, b) in dense.rounds.iter().zip(&rows.rounds) {
        assert_eq!(a.eval, b.eval);
        assert_eq!(a.train, b.train);
    }
    // A merchant never downloads a version it holds (evaluation, then the
    // next round's training, use the same version), nor sends more than dense.
    assert!(up(&rows) <= up(&dense));
    assert!(down(&rows) < down(&dense));

    let store = grocery(TrafficMode::Rows, "merchant", RowPrecision::F32);
    // A store sells 7–23 % of the catalogue; its update carries only those rows.
    assert!(
        4 * up(&store) < up(&dense),
        "{} vs {}",
        up(&store),
        up(&dense)
    );
    assert!(
        store
            .rounds
            .iter()
            .all(|r| r.committed && r.eval["hr@10"] > 0.0)
    );

    let byte = grocery(TrafficMode::Rows, "merchant", RowPrecision::Int8);
    // At k = 8 a listed row costs 4 (index) + 4 (bias) + 12 bytes in int8, 40 in f32.
    assert!(5 * down(&byte) < 3 * down(&store));
    assert_eq!(up(&byte), up(&store));
    assert!(byte.rounds.iter().all(|r| r.eval["hr@10"].is_finite()));
}

#[test]
fn a_reduced_download_precision_needs_row_traffic() {
    let a = SimArgs {
        download_precision: Some(RowPrecision::F16),
        ..Default::default()
    };
    let err = Settings::from_args(a).unwrap_err().to_string();
    assert!(
        err.contains("--download-precision") && err.contains("--traffic rows"),
        "{err}"
    );
}

/// A download counts the form the coordinator sends, the smaller one: the
/// changed rows with their row list, or the whole model when most rows
/// changed (counted as rows alone it was more than the dense model, 1.9 %
/// over a run; found by a researcher probe).
#[test]
fn a_download_counts_the_smaller_of_the_changed_rows_and_the_whole_model() {
    // μ, 5 item biases, 5 item rows of 3 factors.
    let layout =
        fedcart_common::model::mf::layout(5, 3, fedcart_common::model::mf::MfAggregation::PerItem);
    let v0 = Arc::new(vec![0.5f32; 21]);
    let mut t = Traffic::new(TrafficMode::Rows, RowPrecision::F32, 1);
    let dense = 4 * 21;
    // Nothing held: every row changed, and the whole model goes.
    assert_eq!(t.download(0, 0, &v0, &layout), dense);
    assert_eq!(t.download(0, 0, &v0, &layout), 0, "a version held");
    // One item row changed: its bias, its factors and the row list.
    let mut one = (*v0).clone();
    one[1 + 2] = 1.0;
    one[6 + 3 * 2] = 1.0;
    let rows = t.download(0, 1, &Arc::new(one.clone()), &layout);
    assert!(rows > 0 && rows < dense, "{rows}");
    // Every row changed again: the whole model, not more.
    let all = Arc::new(one.iter().map(|v| v + 1.0).collect::<Vec<f32>>());
    assert_eq!(t.download(0, 2, &all, &layout), dense);
}
