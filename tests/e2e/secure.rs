//! Secure aggregation over gRPC: real agents (and scripted ones that die at a
//! chosen stage) against a real coordinator. The committed model must be the
//! plain FedAvg of exactly the agents whose masked inputs are in the sum, and
//! a round with too few survivors must abort without committing anything.

use fedcart_common::federation::strategy::FedAvg;
use fedcart_common::privacy::secagg::stage_name;
use fedcart_common::reference;
use fedcart_common::task::{ModelSpec, TaskKind, TaskSpec};
use fedcart_common::train::LocalData;
use fedcart_coordinator::config::{RunConfig, SecAggSettings};
use fedcart_coordinator::record::{Outcome, RoundRecord};
use fedcart_tests::raw::{DieAt, RawAgent};
use fedcart_tests::*;

/// Secure-aggregation settings for tests: stage deadlines far beyond what a
/// test needs, so stages close only because agents answered or hung up.
pub fn secure_settings(clip: f32) -> SecAggSettings {
    SecAggSettings {
        neighbours: None,
        clip,
        verify_survivors: false,
        stage_timeout_ms: Some(120_000),
    }
}

/// A secure run of the model-free task (each agent returns a seeded random
/// update in [−1, 1)), which has no statistics step.
fn noop_secure_run(run_id: &str, rounds: u64, n: usize, quorum: usize, dim: usize) -> RunConfig {
    let mut run = churn_run(run_id, rounds, n, quorum);
    run.model = ModelSpec::Noop { dim };
    run.evaluate = false;
    run.secagg = Some(secure_settings(1.0));
    run
}

fn merchant(k: usize) -> LocalData {
    LocalData {
        merchant_id: format!("m{k}"),
        ..Default::default()
    }
}

/// The in-process FedAvg of `rounds` rounds over exactly `merchants`.
fn fedavg_over(run: &RunConfig, merchants: &[LocalData], rounds: u64) -> Vec<f32> {
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
    let mut merchants = merchants.to_vec();
    reference::federate(&template, &mut merchants, rounds, &mut FedAvg)
        .expect("reference federation")
        .params
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn trains(history: &[RoundRecord]) -> Vec<&RoundRecord> {
    history
        .iter()
        .filter(|r| r.kind == fedcart_common::task::TaskKind::Train)
        .collect()
}

/// Four merchants, `dying` of them scripted to disconnect at `die` in the
/// first round; returns the history and the committed version-1 model.
async fn one_round_with_deaths(
    run: RunConfig,
    dying: usize,
    die: DieAt,
) -> (Vec<RoundRecord>, Vec<f32>) {
    let store = tempfile::tempdir().unwrap();
    let coord = start_coordinator(&store.path().join("c.redb"), run, 0).await;
    let mut scripted = Vec::new();
    for k in 4 - dying..4 {
        let raw = RawAgent::join(coord.addr, merchant(k)).await;
        scripted.push(tokio::spawn(raw.secure_then_die(die)));
    }
    let mut agents: Vec<_> = (0..4 - dying)
        .map(|k| spawn_agent(coord.addr, merchant(k)))
        .collect();
    let shared = coord.shared.clone();
    for s in scripted {
        s.await.unwrap();
    }
    // The dead merchants come back with real agents for the evaluation that
    // hands out the committed version (it selects all four).
    agents.extend((4 - dying..4).map(|k| spawn_agent(coord.addr, merchant(k))));
    coord.wait_finished().await.unwrap();
    for a in agents {
        a.stop().await;
    }
    let model = shared.model(1).unwrap().expect("version 1").to_vec();
    (shared.history().unwrap(), model)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_after_its_masked_input_stays_in_the_committed_sum() {
    let run = noop_secure_run("e2e-sa-after", 1, 4, 3, 1000);
    let (history, model) = one_round_with_deaths(run.clone(), 1, DieAt::AfterMaskedInput).await;
    let t = trains(&history);
    assert_eq!(t.len(), 1, "{history:?}");
    assert_eq!(t[0].outcome, Outcome::Committed);
    assert_eq!(t[0].reported, vec!["m0", "m1", "m2", "m3"]);
    // m3 never answered the unmask request: its self mask was rebuilt from
    // the other agents' shares, and its input is in the sum.
    let expected = fedavg_over(&run, &(0..4).map(merchant).collect::<Vec<_>>(), 1);
    let d = max_diff(&model, &expected);
    assert!(d <= 1e-5, "max |secure − fedavg over all four| = {d}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_before_its_masked_input_is_left_out_of_the_committed_sum() {
    let run = noop_secure_run("e2e-sa-before", 1, 4, 3, 1000);
    let (history, model) = one_round_with_deaths(run.clone(), 1, DieAt::BeforeMaskedInput).await;
    let t = trains(&history);
    assert_eq!(t.len(), 1, "{history:?}");
    assert_eq!(t[0].outcome, Outcome::Committed);
    assert_eq!(t[0].reported, vec!["m0", "m1", "m2"]);
    assert_eq!(t[0].dropped, vec!["m3"]);
    // m3's pairwise masks were rebuilt from its recovered key and removed.
    let survivors: Vec<_> = (0..3).map(merchant).collect();
    let expected = fedavg_over(&run, &survivors, 1);
    let d = max_diff(&model, &expected);
    assert!(d <= 1e-5, "max |secure − fedavg over the survivors| = {d}");
    let all = fedavg_over(&run, &(0..4).map(merchant).collect::<Vec<_>>(), 1);
    assert!(
        max_diff(&model, &all) > 1e-3,
        "the dropped agent's update must not be in the sum"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn below_threshold_the_round_aborts_revealing_nothing_and_the_retry_commits() {
    // Four invited, complete graph: threshold t = 3. Two die before their
    // masked input, so two survive: the attempt must abort (the quorum of 2
    // alone would have let it commit).
    let run = noop_secure_run("e2e-sa-abort", 1, 4, 2, 1000);
    let store = tempfile::tempdir().unwrap();
    let coord = start_coordinator(&store.path().join("c.redb"), run.clone(), 0).await;
    let mut progress = coord.progress.clone();
    let mut scripted = Vec::new();
    for k in 2..4 {
        let raw = RawAgent::join(coord.addr, merchant(k)).await;
        scripted.push(tokio::spawn(raw.secure_then_die(DieAt::BeforeMaskedInput)));
    }
    let mut agents: Vec<_> = (0..2)
        .map(|k| spawn_agent(coord.addr, merchant(k)))
        .collect();
    progress.wait_for(|p| p.records >= 1).await.unwrap();
    for s in scripted {
        s.await.unwrap();
    }
    assert_eq!(coord.shared.model(1).unwrap(), None, "nothing committed");
    // The two merchants come back with real agents; the round is retried.
    agents.extend((2..4).map(|k| spawn_agent(coord.addr, merchant(k))));
    let shared = coord.shared.clone();
    coord.wait_finished().await.unwrap();
    for a in agents {
        a.stop().await;
    }
    let history = shared.history().unwrap();
    let t = trains(&history);
    assert_eq!(t.len(), 2, "{history:?}");
    assert_eq!((t[0].round, t[0].attempt), (1, 1));
    assert_eq!(t[0].outcome, Outcome::Aborted);
    let reason = t[0].abort_reason.as_deref().unwrap_or_default();
    assert!(
        reason.contains("secure aggregation")
            && reason.contains("threshold is 3")
            && reason.contains("nothing was revealed"),
        "abort reason: {reason}"
    );
    assert_eq!(t[1].outcome, Outcome::Committed);
    assert_eq!(t[1].attempt, 2);
    assert_eq!(t[1].reported.len(), 4);
    let expected = fedavg_over(&run, &(0..4).map(merchant).collect::<Vec<_>>(), 1);
    let model = shared.model(1).unwrap().unwrap();
    assert!(max_diff(&model, &expected) <= 1e-5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_survivor_lists_still_give_the_fedavg_of_all_agents() {
    let mut run = noop_secure_run("e2e-sa-verify", 2, 3, 3, 500);
    run.secagg.as_mut().unwrap().verify_survivors = true;
    let store = tempfile::tempdir().unwrap();
    let coord = start_coordinator(&store.path().join("c.redb"), run.clone(), 0).await;
    let agents: Vec<_> = (0..3)
        .map(|k| spawn_agent(coord.addr, merchant(k)))
        .collect();
    let shared = coord.shared.clone();
    coord.wait_finished().await.unwrap();
    for a in agents {
        a.stop().await;
    }
    let history = shared.history().unwrap();
    assert!(
        trains(&history)
            .iter()
            .all(|r| r.outcome == Outcome::Committed && r.reported.len() == 3),
        "{history:?}"
    );
    let expected = fedavg_over(&run, &(0..3).map(merchant).collect::<Vec<_>>(), 2);
    let model = shared.model(2).unwrap().unwrap();
    assert!(max_diff(&model, &expected) <= 1e-5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_uploads_and_messages_for_another_agent_are_refused_in_a_secure_task() {
    use fedcart_client::secure::{Reply, SecureTasks};
    use fedcart_common::privacy::secagg::AdvertiseKeys;
    use fedcart_proto::v1 as pb;
    let run = noop_secure_run("e2e-sa-refuse", 1, 2, 2, 100);
    let store = tempfile::tempdir().unwrap();
    let coord = start_coordinator(&store.path().join("c.redb"), run, 0).await;
    let mut a = RawAgent::join(coord.addr, merchant(0)).await;
    let b = RawAgent::join(coord.addr, merchant(1)).await;
    let task = a.next_task().await;
    assert!(task.secure_aggregation);
    let out = a.compute(&task).await;

    // A plaintext update is refused before a byte of its payload is read:
    // its header alone, the stream then held open, gets the refusal (the
    // limit only guards against a hang).
    use futures::StreamExt;
    let header = pb::UpdateChunk {
        part: Some(pb::update_chunk::Part::Header(a.header(&task, &out))),
    };
    let held_open = futures::stream::iter([header]).chain(futures::stream::pending());
    let err = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        a.client.submit_update(held_open),
    )
    .await
    .expect("refused on its header, without waiting for the payload")
    .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    assert!(
        err.message().contains("plaintext updates are refused"),
        "{err}"
    );
    // And with its payload.
    let header = a.header(&task, &out);
    let payload =
        fedcart_common::federation::update::f32s_to_le(&out.update.as_ref().unwrap().values);
    let err = a.send_raw(header, vec![payload]).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    assert!(
        err.message().contains("plaintext updates are refused"),
        "{err}"
    );
    // So is a row-sparse one: its row list alone would tell which rows the
    // merchant touched.
    let mut header = a.header(&task, &out);
    header.encoding = pb::PayloadEncoding::RowsF32 as i32;
    header.payload_len = 12;
    let err = a.send_raw(header, vec![vec![0u8; 12]]).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    assert!(
        err.message().contains("plaintext updates are refused"),
        "{err}"
    );

    // Keys advertised under the other agent's id are refused; our own pass.
    let mut secure =
        SecureTasks::with_policy(fedcart_client::policy::PrivacyPolicy::without_key_binding());
    secure.hold(&task, 42, "m0", None, out);
    let req = a.next_secagg().await;
    let Reply::Message(mut msg) = secure.respond(&a.session_id, &req).unwrap() else {
        panic!("advertise answers with a SecAgg message");
    };
    let mut keys = AdvertiseKeys::from_bytes(&msg.body).unwrap();
    let own = msg.body.clone();
    keys.id = 1 - keys.id;
    msg.body = keys.to_bytes();
    let err = a.client.sec_agg(msg.clone()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    msg.body = own;
    a.client.sec_agg(msg.clone()).await.unwrap();
    let err = a.client.sec_agg(msg.clone()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::AlreadyExists, "{err}");
    // A stage that is not open is refused, as is an unknown stage.
    let early = pb::SecAggMessage {
        stage: "unmask".into(),
        ..msg.clone()
    };
    let err = a.client.sec_agg(early).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
    let unknown = pb::SecAggMessage {
        stage: "masked_input".into(),
        ..msg
    };
    let err = a.client.sec_agg(unknown).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    drop(b);
    drop(a);
    coord.shutdown().await.unwrap();
}

/// Runs a three-round MF federation over three MovieLens merchants, with or
/// without secure aggregation; returns the final model and the last held-out
/// evaluation metrics.
async fn movielens_federation(secure: bool) -> (Vec<f32>, std::collections::BTreeMap<String, f64>) {
    use fedcart_common::model::mf::MfHyper;
    use fedcart_common::model::mf::movielens;
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../data/ml-latest-small/ratings.csv");
    let rows = movielens::load_ratings(&path).unwrap();
    let fed = movielens::explicit_federation(&rows, 3, 0.2, 4);
    let mut run = churn_run(&format!("e2e-sa-mf-{secure}"), 3, 3, 3);
    run.model = ModelSpec::Mf {
        num_items: fed.catalogue.len(),
        factors: 8,
        hyper: MfHyper::default(),
    };
    run.secagg = secure.then(|| secure_settings(1e5));
    let store = tempfile::tempdir().unwrap();
    let coord = start_coordinator(&store.path().join("c.redb"), run, 0).await;
    let agents: Vec<_> = fed
        .merchants
        .iter()
        .map(|m| spawn_agent(coord.addr, m.clone()))
        .collect();
    let shared = coord.shared.clone();
    coord.wait_finished().await.unwrap();
    for a in agents {
        a.stop().await;
    }
    let history = shared.history().unwrap();
    assert!(
        trains(&history)
            .iter()
            .all(|r| r.outcome == Outcome::Committed && r.reported.len() == 3),
        "{history:?}"
    );
    let eval = history
        .iter()
        .rfind(|r| r.kind == fedcart_common::task::TaskKind::Evaluate)
        .expect("an evaluation")
        .metrics
        .clone();
    (shared.model(3).unwrap().unwrap().to_vec(), eval)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mf_federation_with_secure_aggregation_matches_the_plaintext_one() {
    let (secure, secure_eval) = movielens_federation(true).await;
    let (plain, plain_eval) = movielens_federation(false).await;
    let d = max_diff(&secure, &plain);
    eprintln!("MF secure vs plain: max |Δparam| = {d:e}, eval {secure_eval:?} vs {plain_eval:?}");
    // Quantisation: 3 agents × clip 1e5 in a 2^31 range gives a step of
    // ~2.8e-4 per weighted coordinate and round, carried through training.
    assert!(d <= 5e-3, "max |secure − plain| = {d}");
    for (k, v) in &plain_eval {
        assert!(
            (secure_eval[k] - v).abs() <= 1e-4,
            "{k}: {} vs {v}",
            secure_eval[k]
        );
    }
}

/// The Telco churn federation of `federation.rs` (four merchants, statistics
/// step, five FedAvg rounds), with or without secure aggregation; returns the
/// held-out AUC of the final model and the agreed feature statistics.
async fn telco_federation(
    secure: bool,
) -> (
    f64,
    Vec<f32>,
    fedcart_common::data::standardize::Standardizer,
) {
    use fedcart_common::model::lr::LogisticRegression;
    use fedcart_common::train::evaluate_lr;
    let split = telco_split(4, 11);
    let mut run = churn_run(&format!("e2e-sa-churn-{secure}"), 5, 4, 4);
    run.secagg = secure.then(|| secure_settings(1e5));
    let fed = federate_files(&split.files, run).await;
    let shared = &fed.shared;
    let history = shared.history().unwrap();
    assert!(
        history
            .iter()
            .filter(|r| r.kind != fedcart_common::task::TaskKind::Evaluate)
            .all(|r| r.outcome == Outcome::Committed && r.reported.len() == 4),
        "{history:?}"
    );
    let params = shared.model(5).unwrap().unwrap().to_vec();
    let scaler = shared.standardizer().unwrap();
    let auc = evaluate_lr(
        &LogisticRegression::from_params(&params),
        &scaler,
        &split.holdout,
    )["auc"];
    (auc, params, scaler)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telco_churn_with_secure_aggregation_reaches_the_plaintext_auc() {
    let (secure_auc, secure, secure_scaler) = telco_federation(true).await;
    let (plain_auc, plain, plain_scaler) = telco_federation(false).await;
    let d = max_diff(&secure, &plain);
    eprintln!(
        "Telco churn: held-out AUC secure {secure_auc:.5} vs plain {plain_auc:.5}, max |Δparam| = {d:e}"
    );
    // The statistics step ran under secure aggregation too (2^64 ring): the
    // agreed means and deviations match the plaintext ones.
    let means = max_diff(&secure_scaler.mean, &plain_scaler.mean);
    let stds = max_diff(&secure_scaler.std, &plain_scaler.std);
    assert!(means <= 1e-4 && stds <= 1e-4, "Δmean {means}, Δstd {stds}");
    assert!(plain_auc > 0.80, "plaintext AUC {plain_auc}");
    assert!(
        (secure_auc - plain_auc).abs() <= 1e-3,
        "secure AUC {secure_auc} vs plaintext {plain_auc}"
    );
    assert!(d <= 1e-4, "max |secure − plain| = {d}");
}

/// A secure noop round of four merchants at quorum 4 (complete graph,
/// threshold 3) in which merchant 3 dies at `die` and the other three
/// answer every stage: the store's directory, the coordinator, the round's
/// one training record and the stages each of the three was asked for.
async fn one_of_four_dies(
    run_id: &str,
    die: DieAt,
) -> (
    tempfile::TempDir,
    fedcart_coordinator::server::Running,
    RoundRecord,
    Vec<Vec<String>>,
) {
    let run = noop_secure_run(run_id, 1, 4, 4, 100);
    let store = tempfile::tempdir().unwrap();
    let coord = start_coordinator(&store.path().join("c.redb"), run, 0).await;
    let mut progress = coord.progress.clone();
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let dying = RawAgent::join(coord.addr, merchant(3)).await;
    let dying = tokio::spawn(dying.secure_then_die(die));
    let mut logging = Vec::new();
    for k in 0..3 {
        let raw = RawAgent::join(coord.addr, merchant(k)).await;
        logging.push(tokio::spawn(raw.secure_logging_stages(stop_rx.clone())));
    }
    progress.wait_for(|p| p.records >= 1).await.unwrap();
    stop.send(true).unwrap();
    dying.await.unwrap();
    let mut stages = Vec::new();
    for agent in logging {
        stages.push(agent.await.unwrap());
    }
    let history = coord.shared.history().unwrap();
    let t = trains(&history);
    assert_eq!(t.len(), 1, "{history:?}");
    let record = t[0].clone();
    (store, coord, record, stages)
}

/// The retry attack on secure aggregation: with at least t but fewer than
/// `quorum` masked inputs, the old coordinator unmasked the sum, then
/// aborted for want of a quorum and retried over the same inputs, so the
/// difference of two sums revealed individual updates. Now the round aborts
/// before any unmask request is sent and no sum reaches the engine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survivors_at_the_threshold_but_below_the_quorum_abort_before_any_unmask_request() {
    // Four invited, complete graph: threshold t = 3; quorum 4. One agent
    // dies before its masked input: three inputs, ≥ t, < quorum.
    let (_store, coord, t, stages) =
        one_of_four_dies("e2e-sa-quorum", DieAt::BeforeMaskedInput).await;
    for stages in stages {
        assert!(
            stages.iter().all(|s| s != "unmask"),
            "an unmask request was sent: {stages:?}"
        );
        assert!(stages.iter().any(|s| s == "masked_input"), "{stages:?}");
    }
    assert_eq!(t.outcome, Outcome::Aborted);
    assert!(t.reported.is_empty(), "a sum reached the engine: {t:?}");
    let reason = t.abort_reason.as_deref().unwrap_or_default();
    assert!(
        reason.contains("3 masked inputs, quorum is 4") && reason.contains("before unmasking"),
        "abort reason: {reason}"
    );
    assert_eq!(coord.shared.model(1).unwrap(), None, "nothing committed");
    coord.shutdown().await.unwrap();
}

/// Fewer agents advertise keys than the quorum: the inputs can only be
/// fewer still, so the round aborts there, before any share is sent or any
/// agent masks (it went on to the masked inputs and aborted before
/// unmasking, a stage timeout later).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn advertisers_below_the_quorum_abort_before_any_share_is_sent() {
    // Four invited, complete graph: threshold t = 3; quorum 4. One agent
    // dies before advertising: three advertisers, ≥ t, < quorum.
    let (_store, coord, t, stages) =
        one_of_four_dies("e2e-sa-quorum-keys", DieAt::BeforeAdvertise).await;
    for stages in stages {
        assert!(
            stages.iter().all(|s| s == stage_name::ADVERTISE),
            "a stage after the advertisement was sent: {stages:?}"
        );
        assert!(!stages.is_empty());
    }
    assert_eq!(t.outcome, Outcome::Aborted);
    let reason = t.abort_reason.as_deref().unwrap_or_default();
    assert!(
        reason.contains("3 agents advertised keys, quorum is 4")
            && reason.contains("before any share was sent"),
        "abort reason: {reason}"
    );
    coord.shutdown().await.unwrap();
}

/// An operator stops the run while its secure round waits for the agents'
/// shares (`runs stop`). The stop drops the round's session; the driver used
/// to find it gone at its next wake-up and panic ("the round is installed by
/// drive"), so the run never ended: no hand-out, no `RunEnded`, and `serve`
/// never exited. Now the round ends as abandoned and the run ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_stopped_during_a_secure_round_ends_and_its_task_loop_does_not_panic() {
    let run = noop_secure_run("e2e-sa-stop", 3, 3, 3, 100);
    let store = tempfile::tempdir().unwrap();
    let coord = start_coordinator(&store.path().join("c.redb"), run, 0).await;
    let mut waiting = Vec::new();
    for k in 0..3 {
        let raw = RawAgent::join(coord.addr, merchant(k)).await;
        waiting.push(tokio::spawn(raw.secure_until(stage_name::SHARE_KEYS)));
    }
    let mut agents = Vec::new();
    for w in waiting {
        agents.push(w.await.unwrap());
    }
    // Every agent has its share_keys request: the driver waits for answers.
    coord.shared.stop_by_operator("test").unwrap();
    for a in agents {
        let ended = tokio::time::timeout(std::time::Duration::from_secs(60), a.run_ended())
            .await
            .expect("the run ends after the stop");
        assert!(ended, "the stream closed without RunEnded");
    }
    assert!(
        coord
            .shared
            .stopped()
            .is_some_and(|s| s.to_string().contains("test")),
        "{:?}",
        coord.shared.stopped()
    );
    assert_eq!(coord.shared.model(1).unwrap(), None, "nothing committed");
    coord.shutdown().await.expect("the task loop ends cleanly");
}

/// A malicious merchant sends, in every attempt, a masked input whose
/// example weight wraps the ring: the unmasked sum is out of range and is
/// refused. The coordinator has seen that sum, so it must not run the round
/// again over the same inputs (a second sum over another survivor set,
/// minus the first, would be one honest merchant's update): the run stops
/// after the first attempt, naming why, instead of retrying up to
/// `max_attempts`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_unmasked_sum_stops_the_run_instead_of_being_retried() {
    use fedcart_coordinator::engine::RunStop;
    let mut run = noop_secure_run("e2e-sa-revealed", 2, 4, 3, 100);
    run.max_attempts = 3;
    let store = tempfile::tempdir().unwrap();
    let coord = start_coordinator(&store.path().join("c.redb"), run, 0).await;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let malicious = RawAgent::join(coord.addr, merchant(3)).await;
    let malicious = tokio::spawn(malicious.secure_wrapping_weight(stop_rx));
    let agents: Vec<_> = (0..3)
        .map(|k| spawn_agent(coord.addr, merchant(k)))
        .collect();
    let mut progress = coord.progress.clone();
    progress.wait_for(|p| p.finished).await.unwrap();
    stop_tx.send(true).unwrap();
    let sent = malicious.await.unwrap();
    for a in agents {
        a.stop().await;
    }
    let history = coord.shared.history().unwrap();
    let t = trains(&history);
    assert_eq!(t.len(), 1, "one attempt only: {history:?}");
    assert_eq!(sent, 1, "one masked input asked for");
    assert_eq!(t[0].outcome, Outcome::Aborted);
    let reason = t[0].abort_reason.as_deref().unwrap_or_default();
    assert!(
        reason.contains("weight coordinate") && reason.contains("out-of-range masked input"),
        "{reason}"
    );
    let Some(RunStop::Revealed { round: 1, .. }) = coord.shared.stopped() else {
        panic!("{:?}", coord.shared.stopped());
    };
    assert!(
        coord.shared.model(1).unwrap().is_none(),
        "nothing committed"
    );
}

/// A federation of `run`: a coordinator on a fresh store, the raw agent of
/// merchant `raw` (joined first) running `behave` until the returned sender
/// says stop (its task gives what `behave` returns), and honest agents for
/// the merchants `honest`.
struct WithRaw<T> {
    coord: fedcart_coordinator::server::Running,
    _store: tempfile::TempDir,
    stop: tokio::sync::watch::Sender<bool>,
    raw: tokio::task::JoinHandle<T>,
    agents: Vec<fedcart_tests::AgentHandle>,
}

async fn with_raw<T, F>(
    run: RunConfig,
    raw: usize,
    honest: std::ops::Range<usize>,
    behave: impl FnOnce(RawAgent, tokio::sync::watch::Receiver<bool>) -> F,
) -> WithRaw<T>
where
    T: Send + 'static,
    F: std::future::Future<Output = T> + Send + 'static,
{
    let store = tempfile::tempdir().unwrap();
    let coord = start_coordinator(&store.path().join("c.redb"), run, 0).await;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let agent = RawAgent::join(coord.addr, merchant(raw)).await;
    let raw = tokio::spawn(behave(agent, stopped));
    let agents = honest
        .map(|k| spawn_agent(coord.addr, merchant(k)))
        .collect();
    WithRaw {
        coord,
        _store: store,
        stop,
        raw,
        agents,
    }
}

impl<T> WithRaw<T> {
    /// Waits for the run to end, stops every agent, and returns the
    /// coordinator's state with what the raw agent's task returned.
    async fn finish(self) -> (std::sync::Arc<fedcart_coordinator::service::Shared>, T) {
        let shared = self.coord.shared.clone();
        self.coord.wait_finished().await.unwrap();
        let _ = self.stop.send(true);
        let out = self.raw.await.unwrap();
        for a in self.agents {
            a.stop().await;
        }
        (shared, out)
    }
}

/// m3 forging every share bundle it sends, honest m0..m2 (the raw agent's
/// task gives the number of bundles sent).
async fn with_forger(run: RunConfig) -> WithRaw<usize> {
    with_raw(run, 3, 0..3, |a, stop| a.secure_forging_shares(stop)).await
}

/// A malicious merchant forges every share bundle it sends, so that no one
/// can open its shares and the round cannot finish. Each neighbour that
/// fails to open one names the sender; accused by two or more, the forger is set
/// aside for the rest of the run, and the retried round commits the honest
/// merchants' sum (it used to abort until the run gave up, each honest agent
/// blamed for "a secure-aggregation step failed").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merchant_forging_its_shares_is_set_aside_and_the_retried_round_commits() {
    let mut run = noop_secure_run("e2e-sa-forged", 1, 4, 3, 1000);
    run.selection.min_agents = 3;
    let (shared, sent) = with_forger(run.clone()).await.finish().await;
    assert!(sent >= 1, "the forger sent its shares");
    let history = shared.history().unwrap();
    let t = trains(&history);
    assert_eq!(t.len(), 2, "{history:?}");
    assert_eq!(t[0].outcome, Outcome::Aborted, "{:?}", t[0]);
    // Its neighbours (the SecAgg+ graph's) named it; it alone is set aside.
    let accusers = t[0]
        .rejected
        .iter()
        .filter(|(who, why)| {
            who != "m3" && why.starts_with("shares failed authentication from agent")
        })
        .count();
    assert!(accusers >= 2, "{:?}", t[0].rejected);
    let aside: Vec<&str> = t[0]
        .rejected
        .iter()
        .filter(|(_, why)| why.contains("set aside"))
        .map(|(who, _)| who.as_str())
        .collect();
    assert_eq!(aside, ["m3"], "{:?}", t[0].rejected);
    assert_eq!(t[1].outcome, Outcome::Committed, "{:?}", t[1]);
    assert_eq!(t[1].selected, vec!["m0", "m1", "m2"]);
    // Its status tells it so; the others' do not.
    assert!(
        shared.merchant_phase("m3").ends_with(
            "; merchant `m3` is set aside for the rest of this run: a share bundle \
                        between it and another merchant failed authentication in a secure round"
        ),
        "{}",
        shared.merchant_phase("m3")
    );
    assert!(!shared.merchant_phase("m0").contains("set aside"));
    let expected = fedavg_over(&run, &(0..3).map(merchant).collect::<Vec<_>>(), 1);
    let model = shared.model(1).unwrap().unwrap();
    assert!(max_diff(&model, &expected) <= 1e-5);
}

/// A masked input refused for its content went unlogged and unrecorded, so
/// an operator could not tell it from a dropout (found by an attacker
/// probe). Nothing of a refused frame reaches the sum, so the agent may send
/// its input again: a merchant whose later input counted is not recorded as
/// rejected (the record never names a merchant rejected beside an input
/// folded in); one whose input never counted is, with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_masked_input_is_recorded_unless_a_later_one_counted() {
    for resend in [true, false] {
        let mut run = noop_secure_run(&format!("e2e-sa-bad-masked-{resend}"), 1, 4, 3, 1000);
        run.selection.min_agents = 4;
        let (shared, answers) = with_raw(run.clone(), 3, 0..3, move |a, stop| {
            a.secure_uploading_a_bad_masked_input_first(stop, resend)
        })
        .await
        .finish()
        .await;
        let [(first, second)] = &answers[..] else {
            panic!("one masked input: {answers:?}")
        };
        let first = first.as_ref().unwrap_err();
        assert_eq!(first.code(), tonic::Code::InvalidArgument, "{first}");
        assert_eq!(second.is_some(), resend);
        if let Some(second) = second {
            second.as_ref().expect("the well-formed input is taken");
        }
        let history = shared.history().unwrap();
        let t = trains(&history);
        assert_eq!(t.len(), 1, "{history:?}");
        assert_eq!(t[0].outcome, Outcome::Committed, "{:?}", t[0]);
        let recorded = t[0].rejected.iter().any(|(m, why)| {
            m == "m3" && why.starts_with("masked input refused: masked payload_len")
        });
        assert_eq!(recorded, !resend, "{:?}", t[0].rejected);
        assert_eq!(
            t[0].reported.contains(&"m3".to_string()),
            resend,
            "{:?}",
            t[0]
        );
        let counted: Vec<usize> = if resend {
            vec![0, 1, 2, 3]
        } else {
            vec![0, 1, 2]
        };
        let expected = fedavg_over(
            &run,
            &counted.into_iter().map(merchant).collect::<Vec<_>>(),
            1,
        );
        let model = shared.model(1).unwrap().unwrap();
        assert!(max_diff(&model, &expected) <= 1e-5);
    }
}

/// A merchant that revealed forged shares at the unmask stage got the run
/// stopped in one attempt as "an agent sent an out-of-range masked input",
/// naming nobody (found by an attacker probe). With more shares than t, the
/// other holders' shares expose the forged ones: the round commits the sum
/// of every input (the forger's masked input was honest), and the
/// forger alone is named and set aside. The server takes shares in holder
/// order, so the forger (m0, holder x = 1 of every owner) is always among
/// the t shares used first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merchant_revealing_forged_unmask_shares_is_named_and_the_round_commits() {
    // Six merchants, five needed: the first task may start before the
    // sixth joins, and five holders still leave two shares beyond the
    // threshold (three); the run ends at its next task start, which must
    // not wait for the merchant set aside.
    let mut run = noop_secure_run("e2e-sa-unmask-forged", 1, 6, 5, 1000);
    run.selection.min_agents = 5;
    let (shared, forged) = with_raw(run.clone(), 0, 1..6, |a, stop| {
        a.secure_forging_unmask_shares(stop)
    })
    .await
    .finish()
    .await;
    assert!(forged >= 1, "the forger revealed shares");
    let history = shared.history().unwrap();
    let t = trains(&history);
    assert_eq!(t.len(), 1, "{history:?}");
    assert_eq!(t[0].outcome, Outcome::Committed, "{:?}", t[0]);
    let named: Vec<&(String, String)> = t[0]
        .rejected
        .iter()
        .filter(|(_, why)| why.contains("proven forged"))
        .collect();
    assert_eq!(named.len(), 1, "{:?}", t[0].rejected);
    assert_eq!(named[0].0, "m0");
    assert!(
        shared
            .merchant_phase("m0")
            .ends_with("was proven forged by the other holders' shares"),
        "{}",
        shared.merchant_phase("m0")
    );
    assert!(!shared.merchant_phase("m1").contains("set aside"));
    // Every input of the round, the forger's (honest) one included.
    assert!(t[0].reported.contains(&"m0".to_string()), "{:?}", t[0]);
    let counted: Vec<LocalData> = t[0]
        .reported
        .iter()
        .map(|m| merchant(m[1..].parse().unwrap()))
        .collect();
    let expected = fedavg_over(&run, &counted, 1);
    let model = shared.model(1).unwrap().unwrap();
    assert!(max_diff(&model, &expected) <= 1e-5);
}

/// With all four merchants needed, the forger set aside leaves the run
/// short for good: the operator's status says that another merchant must
/// join (the wait read as if the forger's return would end it), and the
/// forger's own status says it is out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_left_short_by_a_merchant_set_aside_says_another_must_join() {
    let run = noop_secure_run("e2e-sa-short", 1, 4, 3, 1000);
    assert_eq!(run.selection.min_agents, 4);
    let f = with_forger(run).await;
    let coord = f.coord;
    let mut progress = coord.shared.progress();
    // The first round's record is written, and no task is open after it.
    progress
        .wait_for(|p| p.records >= 1 && p.open_task.is_none())
        .await
        .unwrap();
    // (The aborted attempt's cause follows.)
    let phase = coord.hub.summary("e2e-sa-short").unwrap().phase;
    assert!(
        phase.starts_with(
            "waiting for agents: 3 of 4 needed can serve it; set aside for the rest of the run: \
             m3 (they do not count again: the run goes on only when 1 more merchant that can \
             serve it joins; `runs stop` ends it); r1a1-train aborted"
        ),
        "{phase}"
    );
    assert!(
        coord
            .shared
            .merchant_phase("m3")
            .contains("`m3` is set aside"),
        "{}",
        coord.shared.merchant_phase("m3")
    );
    assert!(
        coord.shared.model(1).unwrap().is_none(),
        "nothing committed"
    );
    let _ = f.stop.send(true);
    f.raw.await.unwrap();
    for a in f.agents {
        a.stop().await;
    }
    coord.shutdown().await.unwrap();
}

/// One malicious merchant accuses every agent of the round of forged shares
/// after its masked input, one failure header each. Each accusation used to
/// set aside the accused with an accuser already aside: every honest
/// merchant was out after the first task and the run never moved again. An
/// accuser of two or more is the liar: it is set aside alone. Its first
/// accusation withdraws it from the round's stages, so the round may close
/// before the others land; either way at most one honest merchant is set
/// aside and the run commits every round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merchant_accusing_everyone_costs_at_most_one_honest_merchant() {
    let mut run = noop_secure_run("e2e-sa-accuser", 3, 5, 3, 1000);
    run.selection.min_agents = 3;
    let store = tempfile::tempdir().unwrap();
    let coord = start_coordinator(&store.path().join("c.redb"), run.clone(), 0).await;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let liar = RawAgent::join(coord.addr, merchant(4)).await;
    let liar = tokio::spawn(liar.secure_accusing_everyone(stopped, 5));
    let agents: Vec<_> = (0..4)
        .map(|k| spawn_agent(coord.addr, merchant(k)))
        .collect();
    let shared = coord.shared.clone();
    // A guard, not a synchronisation: before the fix the run waited for
    // agents forever.
    tokio::time::timeout(std::time::Duration::from_secs(300), coord.wait_finished())
        .await
        .expect("the run ends")
        .unwrap();
    let _ = stop.send(true);
    assert!(liar.await.unwrap() >= 1, "the liar sent its accusations");
    for a in agents {
        a.stop().await;
    }
    let history = shared.history().unwrap();
    let aside: Vec<&str> = history
        .iter()
        .flat_map(|r| &r.rejected)
        .filter(|(_, why)| why.contains("set aside"))
        .map(|(who, _)| who.as_str())
        .collect();
    assert!(aside.contains(&"m4"), "{history:?}");
    assert!(aside.len() <= 2, "one honest merchant at most: {aside:?}");
    let committed: Vec<_> = trains(&history)
        .into_iter()
        .filter(|r| r.outcome == Outcome::Committed)
        .collect();
    assert_eq!(committed.len(), 3, "{history:?}");
    assert!(committed[2].reported.len() >= 3, "{:?}", committed[2]);
    assert!(!committed[2].reported.iter().any(|m| m == "m4"));
    assert!(shared.model(3).unwrap().is_some());
}
