//! Differential privacy over gRPC: real agents clip inside `run_task` from
//! the task they receive, the coordinator adds Gaussian noise from the OS
//! CSPRNG to the sum (a merchant who knows the run seed cannot regenerate
//! it), and every training round records the accountant's ε.

use fedcart_common::federation::strategy::{FedAvg, Strategy};
use fedcart_common::privacy::dp::accountant::epsilon_for;
use fedcart_common::privacy::dp::{CentralGaussian, DpTask};
use fedcart_common::reference::stats_step;
use fedcart_common::seed;
use fedcart_common::task::{TaskKind, TaskSpec};
use fedcart_common::train::run_task;
use fedcart_coordinator::config::DpSettings;
use fedcart_coordinator::record::Outcome;
use fedcart_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_clip_and_a_merchant_who_knows_the_seed_cannot_remove_the_coordinators_noise() {
    let split = telco_split(4, 5);
    let (clip, z, delta) = (0.5, 1.0, 1e-5);
    let mut run = churn_run("e2e-dp", 3, 4, 4);
    run.dp = Some(DpSettings::central(clip, z, delta));
    let fed = federate_files(&split.files, run.clone()).await;
    let shared = &fed.shared;
    let history = shared.history().unwrap();
    let trains: Vec<_> = history
        .iter()
        .filter(|r| r.kind == fedcart_common::task::TaskKind::Train)
        .collect();
    assert_eq!(trains.len(), 3);
    for (t, r) in trains.iter().enumerate() {
        assert_eq!(r.outcome, Outcome::Committed);
        // The clear-text header carries weight 1 under DP, not the row
        // count: the recorded total is the number of reports.
        assert_eq!(r.examples, r.reported.len() as f64, "round {}", t + 1);
        let p = r.privacy.as_ref().expect("ε recorded");
        let want = epsilon_for(1.0, z, t as u64 + 1, delta).unwrap().epsilon;
        assert!(
            (p.epsilon - want).abs() < 1e-12,
            "round {}: {}",
            t + 1,
            p.epsilon
        );
    }

    // The attack: the same rounds in-process, by someone who knows the run
    // seed (every agent does): clipped updates from run_task, summed, noised
    // with the stream the coordinator used to derive from the seed, divided
    // by the 4 selected. That used to reproduce the committed model to 1e-5,
    // i.e. the noise could be subtracted; now it is independent noise.
    let mut merchants: Vec<_> = split
        .files
        .iter()
        .enumerate()
        .map(|(k, f)| load_merchant(&format!("merchant-{k}"), f))
        .collect();
    let mut spec = TaskSpec {
        kind: TaskKind::Stats,
        model: run.model.clone(),
        sgd: run.sgd.clone(),
        seed: run.seed,
        round: 0,
        standardizer: None,
        dp: None,
        best_version: None,
    };
    spec.standardizer = stats_step(&spec, &mut merchants).unwrap();
    spec.kind = TaskKind::Train;
    spec.dp = Some(DpTask {
        clip,
        clip_bit: false,
        distributed: None,
    });
    let noise = CentralGaussian::new(z, clip).unwrap();
    let mut params = run.model.initial_params(run.seed);
    let mut plain_step_norm = 0.0f64;
    for t in 1..=3u64 {
        spec.round = t;
        let mut sum = vec![0.0f64; params.len()];
        for m in merchants.iter_mut() {
            let u = run_task(&spec, &params, m).unwrap().update.unwrap();
            let norm = u
                .values
                .iter()
                .map(|v| f64::from(*v).powi(2))
                .sum::<f64>()
                .sqrt();
            assert!(norm <= clip, "an agent's update has norm {norm} > C");
            for (s, v) in sum.iter_mut().zip(&u.values) {
                *s += f64::from(*v);
            }
        }
        plain_step_norm = sum.iter().map(|s| (s / 4.0).powi(2)).sum::<f64>().sqrt();
        noise.add_to_sum(
            &mut sum,
            &mut seed::rng(run.seed, &["dp-noise", &format!("r{t}a1-train")]),
        );
        let step: Vec<f32> = sum.iter().map(|s| (s / 4.0) as f32).collect();
        params = FedAvg.apply(&params, &step);
    }
    assert!(plain_step_norm <= clip);
    let grpc = shared.model(3).unwrap().unwrap();
    let max_diff = grpc
        .iter()
        .zip(&params)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(
        max_diff > 1e-2,
        "the seed regenerated the coordinator's noise: max |grpc − in-process| = {max_diff}"
    );
}

/// Runs two rounds of the model-free task over loopback gRPC with two real
/// agents; returns the committed version-2 model.
async fn noop_federation(run_id: &str, dp: Option<DpSettings>) -> Vec<f32> {
    let mut run = churn_run(run_id, 2, 2, 2);
    run.model = fedcart_common::task::ModelSpec::Noop { dim: 50 };
    run.evaluate = false;
    run.dp = dp;
    let store = tempfile::tempdir().unwrap();
    let coord = start_coordinator(&store.path().join("c.redb"), run, 0).await;
    let agents: Vec<_> = (0..2)
        .map(|k| {
            let data = fedcart_common::train::LocalData {
                merchant_id: format!("m{k}"),
                ..Default::default()
            };
            spawn_agent(coord.addr, data)
        })
        .collect();
    let shared = coord.shared.clone();
    coord.wait_finished().await.unwrap();
    for a in agents {
        a.stop().await;
    }
    shared.model(2).unwrap().expect("version 2").to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_federations_with_central_dp_commit_different_models_and_without_dp_identical_ones() {
    let dp = || Some(DpSettings::central(0.5, 1.0, 1e-5));
    let (a, b) = (
        noop_federation("e2e-dp-twice", dp()).await,
        noop_federation("e2e-dp-twice", dp()).await,
    );
    assert_ne!(a, b, "the same configuration and seed drew the same noise");
    let (c, d) = (
        noop_federation("e2e-plain-twice", None).await,
        noop_federation("e2e-plain-twice", None).await,
    );
    assert_eq!(c, d, "without DP a seed replays bit for bit");
}
