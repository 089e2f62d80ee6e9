//! A full churn federation over gRPC reproduces the in-process reference.

use fedcart_common::federation::strategy::FedAvg;
use fedcart_common::model::lr::LogisticRegression;
use fedcart_common::reference;
use fedcart_common::task::{TaskKind, TaskSpec};
use fedcart_common::train::evaluate_lr;
use fedcart_coordinator::record::Outcome;
use fedcart_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_agents_over_grpc_match_in_process_fedavg_and_beat_auc_0_80() {
    let split = telco_split(4, 11);
    let run = churn_run("e2e-fedavg", 5, 4, 4);
    let fed = federate_files(&split.files, run.clone()).await;
    let shared = &fed.shared;

    let history = shared.history().unwrap();
    let trains: Vec<_> = history
        .iter()
        .filter(|r| r.kind == fedcart_common::task::TaskKind::Train)
        .collect();
    assert_eq!(trains.len(), 5);
    assert!(
        trains
            .iter()
            .all(|r| r.outcome == Outcome::Committed && r.reported.len() == 4)
    );
    assert_eq!(
        history
            .iter()
            .filter(|r| r.kind == fedcart_common::task::TaskKind::Evaluate)
            .count(),
        5
    );

    let params = shared.model(5).unwrap().unwrap();
    let scaler = shared.standardizer().unwrap();
    let auc = evaluate_lr(
        &LogisticRegression::from_params(&params),
        &scaler,
        &split.holdout,
    )["auc"];
    assert!(auc > 0.80, "held-out AUC {auc}");

    // The same partitions, seeds and FedAvg computed directly in-process.
    let mut merchants: Vec<_> = split
        .files
        .iter()
        .enumerate()
        .map(|(k, f)| load_merchant(&format!("merchant-{k}"), f))
        .collect();
    let template = TaskSpec {
        kind: TaskKind::Train,
        model: run.model.clone(),
        sgd: run.sgd.clone(),
        seed: run.seed,
        round: 0,
        standardizer: None,
        dp: None,
    };
    let expected = reference::federate(&template, &mut merchants, 5, &mut FedAvg).unwrap();
    assert_eq!(expected.standardizer.as_ref(), Some(&scaler));
    let max_diff = params
        .iter()
        .zip(&expected.params)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(max_diff <= 1e-5, "max |grpc − in-process| = {max_diff}");
}
