//! Acceptance figures of federated boosted trees on Telco (BENCHMARKS.md,
//! "Federated gradient-boosted trees"), pinned on the project's own split:
//! 20 % of Telco held out (stratified, seed 42), the rest dealt iid to five
//! merchants. Ignored: about a minute in release, longer in the dev
//! profile. Run with
//! `cargo test --release -p fedcart-common --test gbdt_telco -- --ignored`.

use std::path::Path;

use fedcart_common::data::split;
use fedcart_common::data::tabular::Schema;
use fedcart_common::federation::strategy::FedAvg;
use fedcart_common::model::gbdt::GbdtParams;
use fedcart_common::reference::{evaluate, federate};
use fedcart_common::task::{ModelSpec, TaskKind, TaskSpec};
use fedcart_common::train::{ChurnData, LocalData};

#[test]
#[ignore = "about a minute in release; see BENCHMARKS.md"]
fn telco_federated_gbdt_reaches_0_845_auc_within_0_005_of_pooled_gbdt() {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/telco-churn/Telco-Customer-Churn.csv");
    let ds = Schema::telco().load_csv(&path).unwrap();
    let (rest, held_out) = split::stratified_train_test(ds.y.as_slice().unwrap(), 0.2, 42);
    let test = ds.select(&held_out);
    let train = ds.select(&rest);
    let parts = split::iid_partition(&(0..train.len()).collect::<Vec<_>>(), 5, 42);
    let test_parts = split::iid_partition(&(0..test.len()).collect::<Vec<_>>(), 5, 43);
    let mut merchants: Vec<LocalData> = (0..5)
        .map(|k| LocalData {
            merchant_id: format!("m{k:04}"),
            churn: Some(ChurnData {
                train: train.select(&parts[k]),
                valid: test.select(&test_parts[k]),
            }),
            ..Default::default()
        })
        .collect();
    let params = GbdtParams::default();
    let rounds = 1 + (params.trees * params.max_depth) as u64;
    let template = TaskSpec {
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
    };
    let fed = federate(&template, &mut merchants, rounds, &mut FedAvg).unwrap();
    let mut s = template.clone();
    s.standardizer = fed.standardizer.clone();
    let fed_auc = evaluate(&s, fed.served(), &mut merchants).unwrap()["auc"];
    let mut pooled = [LocalData::pooled("pooled", &merchants)];
    let central = federate(&template, &mut pooled, rounds, &mut FedAvg).unwrap();
    s.standardizer = central.standardizer.clone();
    let pooled_auc = evaluate(&s, central.served(), &mut pooled).unwrap()["auc"];
    assert!(fed_auc >= 0.845, "federated AUC {fed_auc}");
    assert!(
        (fed_auc - pooled_auc).abs() <= 0.005,
        "federated {fed_auc} vs pooled {pooled_auc}"
    );
}
