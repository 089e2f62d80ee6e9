//! Gradient-boosted trees over gRPC: a real coordinator grows the trees one
//! level per secure round from real agents' summed histograms, and the
//! committed trees are the in-process federation's up to the secure sum's
//! quantisation; each agent then scores its customers with the final model
//! through `fedcart-client score`'s code path.

use fedcart_client::agent::Agent;
use fedcart_client::state::StateDir;
use fedcart_common::data::tabular::Schema;
use fedcart_common::federation::strategy::FedAvg;
use fedcart_common::model::gbdt::{Ensemble, GbdtParams, ensemble::Node};
use fedcart_common::task::{ModelSpec, TaskKind, TaskSpec};
use fedcart_coordinator::record::Outcome;
use fedcart_tests::*;

use crate::secure::secure_settings;

const TREES: usize = 3;
const DEPTH: usize = 2;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secure_gbdt_over_grpc_grows_the_in_process_trees_in_one_round_per_level() {
    let split = telco_split(3, 5);
    let dir = tempfile::tempdir().unwrap();
    let model = ModelSpec::ChurnGbdt {
        num_features: Schema::telco().num_features(),
        params: GbdtParams {
            trees: TREES,
            max_depth: DEPTH,
            ..GbdtParams::default()
        },
        level_len: 0,
    };
    let rounds = 1 + (TREES * DEPTH) as u64;
    let mut run = churn_run("e2e-gbdt", rounds, 3, 3);
    run.model = model.clone();
    run.secagg = Some(secure_settings(1.0));
    run.validate().unwrap();
    let coord = start_coordinator(&dir.path().join("c.redb"), run.clone(), 0).await;
    let mut handles = Vec::new();
    let mut merchants = Vec::new();
    for (k, file) in split.files.iter().enumerate() {
        let data = load_merchant(&format!("merchant-{k}"), file);
        merchants.push(data.clone());
        let state = StateDir::open(dir.path().join(format!("state-{k}"))).unwrap();
        let mut agent = Agent::new(format!("http://{}", coord.addr), data)
            .with_policy(fedcart_client::policy::PrivacyPolicy::without_key_binding())
            .with_state(state)
            .unwrap();
        agent.backoff.initial_ms = 20;
        handles.push(spawn_configured(agent));
    }
    let (shared, history) = finish(coord, handles).await;

    // The sketch round, then one secure round per tree level; one
    // evaluation per completed tree.
    let trains = committed_trains(&history, 3);
    assert_eq!(trains.len() as u64, rounds, "{history:#?}");
    let evaluations: Vec<_> = history
        .iter()
        .filter(|r| r.kind == TaskKind::Evaluate && r.outcome == Outcome::Committed)
        .collect();
    // The best ensemble by validation AUC (ties to the earlier one) is
    // the one served; when it is not the last, a final serving evaluation
    // hands it to the agents.
    let per_tree: Vec<_> = evaluations
        .iter()
        .filter(|r| r.base_version == r.round && r.attempt == 1)
        .collect();
    assert_eq!(per_tree.len(), TREES);
    let (best, _) = per_tree.iter().fold((0, f64::NEG_INFINITY), |(b, v), r| {
        let x = r.metrics["val_auc"];
        if x > v { (r.base_version, x) } else { (b, v) }
    });
    assert_eq!(
        evaluations.len(),
        TREES + usize::from(best != rounds),
        "{evaluations:#?}"
    );
    assert_eq!(evaluations.last().unwrap().base_version, best);
    let last = per_tree.last().unwrap();
    assert!(last.metrics["val_auc"] > 0.75, "{:?}", last.metrics);
    assert!(last.metrics["auc"] > 0.75, "{:?}", last.metrics);

    let secure = shared.model(rounds).unwrap().expect("final version");
    let secure = Ensemble::decode(&secure).unwrap();
    let template = TaskSpec {
        kind: TaskKind::Train,
        model,
        sgd: run.sgd.clone(),
        seed: run.seed,
        round: 0,
        standardizer: None,
        dp: None,
        best_version: None,
    };
    let plain = fedcart_common::reference::federate(&template, &mut merchants, rounds, &mut FedAvg)
        .unwrap();
    let plain_ens = Ensemble::decode(&plain.params).unwrap();
    assert_eq!(secure.edges, plain_ens.edges);
    assert!((secure.base_score - plain_ens.base_score).abs() < 1e-5);
    assert_eq!(secure.trees.len(), TREES);
    for (s, p) in secure.trees.iter().zip(&plain_ens.trees) {
        for (a, b) in s.nodes.iter().zip(&p.nodes) {
            match (a, b) {
                (Node::Leaf(x), Node::Leaf(y)) => assert!((x - y).abs() < 1e-4, "{x} vs {y}"),
                _ => assert_eq!(a, b),
            }
        }
    }

    // Each agent kept the served (best) model and scores its customers with it.
    let scaler = shared.standardizer().unwrap();
    let final_params = shared.model(best).unwrap().unwrap();
    for (k, m) in merchants.iter().enumerate() {
        let state = StateDir::open(dir.path().join(format!("state-{k}"))).unwrap();
        let ds = &m.churn.as_ref().unwrap().valid;
        let (version, p) = fedcart_client::recommend::churn_probabilities(&state, ds).unwrap();
        assert_eq!(version.version, best);
        let want = fedcart_common::model::gbdt::predict(&final_params, &scaler, &ds.x).unwrap();
        assert_eq!(p, want);
    }
}
