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
    // One evaluation a version, and the hand-out of the best version by
    // validation AUC when that is not the last.
    let best = shared.best().expect("churn LR selects by val_auc");
    assert_eq!(best.metric, "val_auc");
    assert_eq!(
        history
            .iter()
            .filter(|r| r.kind == fedcart_common::task::TaskKind::Evaluate)
            .count(),
        5 + usize::from(best.version != 5)
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
        best_version: None,
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

/// A round that can never reach its quorum (one of the two selected
/// merchants joins and never answers) used to be retried for ever. Now the
/// service backs off between attempts and, after `run.max_attempts`, ends
/// the run with the dominant cause, stored with the run and shown by the
/// status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_that_can_never_reach_its_quorum_ends_the_run_with_its_cause() {
    use fedcart_coordinator::engine::RunStop;
    use fedcart_proto::v1 as pb;
    let mut run = churn_run("e2e-give-up", 2, 2, 2);
    run.model = fedcart_common::task::ModelSpec::Noop { dim: 10 };
    run.evaluate = false;
    run.round_timeout_ms = 2_000;
    run.max_attempts = 3;
    let store = tempfile::tempdir().unwrap();
    let coord = start_coordinator(&store.path().join("c.redb"), run, 0).await;
    let mut silent = fedcart_tests::raw::RawAgent::join(
        coord.addr,
        fedcart_common::train::LocalData {
            merchant_id: "m1".into(),
            ..Default::default()
        },
    )
    .await;
    let agent = spawn_agent(
        coord.addr,
        fedcart_common::train::LocalData {
            merchant_id: "m0".into(),
            ..Default::default()
        },
    );
    let mut progress = coord.progress.clone();
    progress.wait_for(|p| p.finished).await.unwrap();
    let stopped = progress.borrow().stopped.clone().expect("a stop reason");
    assert!(
        stopped.contains("round 1 (train) aborted 3 times")
            && stopped.contains("1 results, quorum is 2 (in 3 of 3 attempts)"),
        "{stopped}"
    );
    let Some(RunStop::GaveUp { attempts: 3, .. }) = coord.shared.stopped() else {
        panic!("{:?}", coord.shared.stopped());
    };
    let history = coord.shared.history().unwrap();
    assert_eq!(history.len(), 3, "{history:?}");
    assert!(history.iter().all(|r| r.outcome == Outcome::Aborted));
    let status = silent
        .client
        .status(pb::StatusRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(
        status
            .phase
            .starts_with("stopped: round 1 (train) aborted 3 times"),
        "{}",
        status.phase
    );
    agent.stop().await;
    let err = coord
        .shutdown()
        .await
        .expect_err("the run ended with an error");
    assert!(format!("{err:#}").contains("aborted 3 times"), "{err:#}");
}

/// A run whose model does not fit a merchant's data (the operator gave
/// `num_features = 3`; the customer table makes 45): the agent declines
/// that run's tasks with the reason, says what does not fit, and stays
/// connected for the coordinator's other runs, instead of exiting.
/// A merchant whose agent joins again before its old connection is noticed
/// dead (a restart, or a reconnect through a black-holed connection) never
/// receives the task its old session held: the task stopped waiting for it
/// only at its deadline. Now the replaced session's part is dropped at once
/// and the round commits with the others. The run's ten-minute round
/// deadline makes a hang, not a slow round, what the bound catches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merchant_joining_again_is_dropped_from_the_task_its_old_session_held() {
    let mut run = churn_run("e2e-rejoin", 1, 2, 1);
    run.model = fedcart_common::task::ModelSpec::Noop { dim: 10 };
    run.evaluate = false;
    run.round_timeout_ms = 600_000;
    let store = tempfile::tempdir().unwrap();
    let coord = start_coordinator(&store.path().join("c.redb"), run, 0).await;
    let data = |id: &str| fedcart_common::train::LocalData {
        merchant_id: id.into(),
        ..Default::default()
    };
    let mut m0 = fedcart_tests::raw::RawAgent::join(coord.addr, data("m0")).await;
    let mut m1 = fedcart_tests::raw::RawAgent::join(coord.addr, data("m1")).await;
    let task = m0.next_task().await;
    let held = m1.next_task().await;
    assert_eq!(task.task_id, held.task_id);
    m0.answer(&task).await.unwrap();
    // m1's process restarts: a new session, while the old one is open.
    let _again = fedcart_tests::raw::RawAgent::join(coord.addr, data("m1")).await;
    let mut progress = coord.progress.clone();
    tokio::time::timeout(
        std::time::Duration::from_secs(300),
        progress.wait_for(|p| p.version >= 1),
    )
    .await
    .expect("the round commits without waiting for its deadline")
    .unwrap();
    let history = coord.shared.history().unwrap();
    let round = history.last().unwrap();
    assert_eq!(round.outcome, Outcome::Committed, "{round:?}");
    assert_eq!(
        (round.reported.as_slice(), round.dropped.as_slice()),
        (&["m0".to_string()][..], &["m1".to_string()][..])
    );
    coord.shutdown().await.unwrap();
}

/// A merchant whose data does not fit the run (a table of another width)
/// declines its tasks and stays connected. Its decline lasts for the run:
/// it was drawn again at every attempt, and with a task of three among
/// four merchants, one misfit aborted round after round until the run
/// stopped on `max_attempts` (found by a new-user probe). Now, once three
/// others can fill a task, it is not drawn, and its own status says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_whose_data_does_not_fit_a_run_declines_its_tasks_and_stays() {
    let split = telco_split(3, 5);
    let mut run = churn_run("e2e-misfit", 3, 3, 3);
    // Until the fourth merchant joins, every task must take the misfit.
    run.max_attempts = 1_000;
    let store = tempfile::tempdir().unwrap();
    let coord = start_coordinator(&store.path().join("c.redb"), run, 0).await;
    let mut misfit = load_merchant("m3", &split.files[0]);
    let churn = misfit.churn.as_mut().unwrap();
    for part in [&mut churn.train, &mut churn.valid] {
        *part = fedcart_common::data::tabular::TabularDataset {
            ids: part.ids.clone(),
            x: part.x.select(ndarray::Axis(1), &[0, 1, 2]),
            y: part.y.clone(),
        };
    }
    let mut agents = vec![spawn_agent(coord.addr, misfit)];
    for k in 0..2 {
        agents.push(spawn_agent(
            coord.addr,
            load_merchant(&format!("m{k}"), &split.files[k]),
        ));
    }
    // Three connected, m3 among them: the first attempt takes all three
    // and aborts on m3's decline.
    let mut progress = coord.progress.clone();
    progress.wait_for(|p| p.records >= 1).await.unwrap();
    let first = coord.shared.history().unwrap().remove(0);
    assert_eq!(first.outcome, Outcome::Aborted, "{first:?}");
    let width = "the local features do not have the model's width";
    assert_eq!(
        first.rejected,
        [("m3".to_string(), width.to_string())],
        "{first:?}"
    );
    let told = coord.shared.merchant_phase("m3");
    assert!(
        told.contains(&format!(
            "merchant `m3` declined this run's tasks ({width})"
        )),
        "{told}"
    );
    agents.push(spawn_agent(
        coord.addr,
        load_merchant("m2", &split.files[2]),
    ));
    let joined = progress.wait_for(|p| p.agents >= 4).await.unwrap().records as usize;
    progress.wait_for(|p| p.finished).await.unwrap();
    assert!(coord.shared.stopped().is_none(), "the run was not stopped");
    // Every task opened after m2 joined (one may have been open then)
    // commits over the three that can serve the run.
    let history = coord.shared.history().unwrap();
    let after = &history[joined + 1..];
    assert!(
        after.iter().any(|r| r.kind == TaskKind::Train),
        "{history:?}"
    );
    for r in after {
        assert_eq!(r.outcome, Outcome::Committed, "{r:?}");
        if r.kind == TaskKind::Train {
            assert_eq!(r.reported, ["m0", "m1", "m2"], "{r:?}");
        }
    }
    assert_eq!(
        coord.shared.connected(),
        ["m0", "m1", "m2", "m3"],
        "the agent stayed"
    );
    // The agents' tasks end only when stopped: none exited on an error.
    for a in agents {
        a.stop().await;
    }
}

/// A merchant whose table leaves no held-out customer (3 rows at
/// `holdout = 0.2`) trains, and declines its evaluations, naming why: each
/// one was refused as an update of weight 0 ("invalid update"), and the
/// agent took the refusal for a lost coordinator and joined again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merchant_with_no_held_out_customer_trains_and_declines_its_evaluations() {
    let split = telco_split(3, 5);
    let run = churn_run("e2e-no-held-out", 2, 3, 3);
    let store = tempfile::tempdir().unwrap();
    let coord = start_coordinator(&store.path().join("c.redb"), run, 0).await;
    let mut agents: Vec<_> = (0..2)
        .map(|k| spawn_agent(coord.addr, load_merchant(&format!("m{k}"), &split.files[k])))
        .collect();
    let mut tiny = load_merchant("m2", &split.files[2]);
    let churn = tiny.churn.as_mut().unwrap();
    churn.valid = churn.valid.select(&[]);
    agents.push(spawn_agent(coord.addr, tiny));
    let mut progress = coord.progress.clone();
    progress.wait_for(|p| p.finished).await.unwrap();
    let history = coord.shared.history().unwrap();
    let trains: Vec<_> = history
        .iter()
        .filter(|r| r.kind == TaskKind::Train)
        .collect();
    assert!(
        trains.len() == 2 && trains.iter().all(|r| r.outcome == Outcome::Committed),
        "{history:?}"
    );
    assert!(trains.iter().all(|r| r.reported.len() == 3), "m2 trains");
    let evaluations: Vec<_> = history
        .iter()
        .filter(|r| r.kind == TaskKind::Evaluate)
        .collect();
    assert!(!evaluations.is_empty());
    for r in evaluations {
        assert_eq!(r.outcome, Outcome::Committed, "{r:?}");
        assert_eq!(r.reported, ["m0", "m1"], "{r:?}");
        assert_eq!(
            r.rejected,
            [(
                "m2".to_string(),
                fedcart_client::agent::NO_HELD_OUT.to_string()
            )],
            "{r:?}"
        );
    }
    for a in agents {
        a.stop().await;
    }
}

/// A run that evaluated version 1 and then stopped on a fault hands nothing
/// out. The status said "served version 1" of it all the same (found by a
/// new-user probe). Its version 1 had gone to the top of each merchant's
/// state (what `score`, `recommend` and `serve` answer from) as its best so
/// far, in place of the previous run's served model, and stayed there
/// (found by a security review): the agent puts the displaced model back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_stopped_on_a_fault_serves_nothing_and_gives_back_the_model_it_displaced() {
    use fedcart_client::state::{GlobalMeta, StateDir};
    use fedcart_coordinator::engine::RunStop;
    use fedcart_proto::v1 as pb;
    let split = telco_split(2, 11);
    let mut run = churn_run("e2e-fault-served", 3, 2, 2);
    run.round_timeout_ms = 2_000;
    run.max_attempts = 2;
    let store = tempfile::tempdir().unwrap();
    let coord = start_coordinator(&store.path().join("c.redb"), run, 0).await;
    // m0 serves version 4 of an earlier run.
    let states = tempfile::tempdir().unwrap();
    let state = StateDir::open(states.path()).unwrap();
    let m0 = load_merchant("m0", &split.files[0]);
    let width = m0.churn.as_ref().unwrap().train.x.ncols();
    let served = GlobalMeta {
        run_id: "earlier".into(),
        version: 4,
        spec: TaskSpec {
            kind: TaskKind::Evaluate,
            model: fedcart_common::task::ModelSpec::churn_lr(width),
            sgd: Default::default(),
            seed: 1,
            round: 4,
            standardizer: None,
            dp: None,
            best_version: None,
        },
        sha256: None,
    };
    let params: Vec<f32> = (0..=width).map(|i| i as f32 * 0.01).collect();
    state.save_global(&served, &params).unwrap();
    // m1 answers round 1 (training and the evaluation of version 1), then
    // falls silent: round 2 never reaches its quorum.
    let mut raw =
        fedcart_tests::raw::RawAgent::join(coord.addr, load_merchant("m1", &split.files[1])).await;
    let scripted = tokio::spawn(async move {
        loop {
            let task = raw.next_task().await;
            if task.round >= 2 {
                return raw;
            }
            raw.answer(&task).await.unwrap();
        }
    });
    let mut agent = fedcart_client::agent::Agent::new(format!("http://{}", coord.addr), m0)
        .with_policy(fedcart_client::policy::PrivacyPolicy::without_key_binding())
        .with_state(StateDir::open(states.path()).unwrap())
        .unwrap();
    agent.backoff.initial_ms = 20;
    // Returns once it has heard the run ended (and acted on it).
    agent.exit_on_run_end = true;
    let agent = spawn_configured(agent);
    let mut progress = coord.progress.clone();
    progress.wait_for(|p| p.finished).await.unwrap();
    let Some(RunStop::GaveUp { round: 2, .. }) = coord.shared.stopped() else {
        panic!("{:?}", coord.shared.stopped());
    };
    let history = coord.shared.history().unwrap();
    assert!(
        history
            .iter()
            .any(|r| r.kind == TaskKind::Evaluate && r.outcome == Outcome::Committed),
        "version 1 was evaluated: {history:?}"
    );
    let mut raw = scripted.await.unwrap();
    let status = raw
        .client
        .status(pb::StatusRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.best_version, None, "{status:?}");
    agent
        .task
        .await
        .expect("the agent returns when the run ends");
    let (top, top_params) = state.load_global("churn").unwrap().unwrap();
    assert_eq!((top.run_id.as_str(), top.version), ("earlier", 4));
    assert_eq!(top_params, params);
    // The failed run's own directory keeps what m0 evaluated of it.
    assert_eq!(state.held_version("e2e-fault-served"), Some(1));
    let _ = coord.shutdown().await;
}

/// Stops the run from inside the first agent's evaluation of version 2, as
/// an operator's `runs stop` lands while merchants work.
struct StopAtRound2 {
    shared: std::sync::Arc<fedcart_coordinator::service::Shared>,
    done: std::sync::atomic::AtomicBool,
}

impl fedcart_client::agent::TaskObserver for StopAtRound2 {
    fn on_task(&self, task_id: &str) -> fedcart_client::agent::TaskDecision {
        if task_id == "r2a1-evaluate" && !self.done.swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            self.shared.stop_by_operator("test").expect("the run stops");
        }
        fedcart_client::agent::TaskDecision::Accept
    }
}

/// A task that closed before the agent's part of it arrived (here the
/// operator stopped the run as the evaluation was handed out: the model
/// download is refused; an update sent after the close is refused alike) is
/// dropped, and the agent stays in its session, where it hears that the run
/// ended.
/// It ended the session instead, logging an outage ("lost the
/// coordinator"), and had to join again (the probe saw every agent dropped
/// from the next task, which was aborted and sent again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_that_closed_under_the_agent_keeps_it_in_its_session() {
    let split = telco_split(2, 11);
    let dir = tempfile::tempdir().unwrap();
    let coord = start_coordinator(
        &dir.path().join("c.redb"),
        churn_run("stop-mid", 6, 2, 2),
        0,
    )
    .await;
    let stopper = std::sync::Arc::new(StopAtRound2 {
        shared: coord.shared.clone(),
        done: Default::default(),
    });
    let agents: Vec<_> = (0..2)
        .map(|k| {
            let mut a = fedcart_client::agent::Agent::new(
                format!("http://{}", coord.addr),
                load_merchant(&format!("merchant-{k}"), &split.files[k]),
            )
            .with_policy(fedcart_client::policy::PrivacyPolicy::without_key_binding());
            a.backoff.initial_ms = 20;
            a.observer = Some(stopper.clone());
            // Returns once it hears the run ended: in this session, or in
            // a later one.
            a.exit_on_run_end = true;
            spawn_configured(a)
        })
        .collect();
    for a in agents {
        let agent = a.task.await.expect("the agent returns when the run ends");
        assert_eq!(agent.sessions, 1, "the agent joined again");
        assert!(agent.tasks_done >= 3, "{}", agent.tasks_done);
    }
    assert!(coord.shared.stopped().is_some());
    let history = coord.shared.history().unwrap();
    assert!(
        !history
            .iter()
            .any(|r| r.task_id == "r2a1-evaluate" && r.outcome == Outcome::Committed),
        "the stop came during version 2's evaluation"
    );
}
