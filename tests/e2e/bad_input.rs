//! Bad updates are rejected with specific statuses while the round goes on,
//! and dropouts are absorbed by the quorum or abort the round cleanly.

use fedcart_common::federation::update::f32s_to_le;
use fedcart_coordinator::record::Outcome;
use fedcart_proto::v1 as pb;
use fedcart_tests::raw::RawAgent;
use fedcart_tests::*;
use tonic::Code;

/// Asserts a submission failed with `code` and a message containing `needle`.
macro_rules! assert_rejected {
    ($result:expr, $code:expr, $needle:expr) => {{
        let status = $result.expect_err("submission must be rejected");
        assert_eq!(status.code(), $code, "{status:?}");
        assert!(
            status.message().contains($needle),
            "message `{}` lacks `{}`",
            status.message(),
            $needle
        );
    }};
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_bad_update_gets_its_status_and_the_round_completes_with_the_good_ones() {
    let split = telco_split(7, 5);
    let dir = tempfile::tempdir().unwrap();
    let mut run = churn_run("e2e-bad", 1, 7, 3);
    run.evaluate = false;
    let coord = start_coordinator(&dir.path().join("c.redb"), run, 0).await;
    let agents: Vec<_> = (0..3)
        .map(|k| {
            spawn_agent(
                coord.addr,
                load_merchant(&format!("merchant-{k}"), &split.files[k]),
            )
        })
        .collect();
    // Three merchants send bad updates and one honest raw agent answers
    // before them (the round closes once the last bad one is refused).
    let mut raw = Vec::new();
    for k in 3..7 {
        raw.push(
            RawAgent::join(
                coord.addr,
                load_merchant(&format!("merchant-{k}"), &split.files[k]),
            )
            .await,
        );
    }
    for agent in &mut raw {
        let stats = agent.next_task().await;
        assert!(stats.task_id.ends_with("-stats"));
        agent.answer(&stats).await.unwrap();
    }
    let mut tasks = Vec::new();
    for agent in &mut raw {
        tasks.push(agent.next_task().await);
    }
    let task = tasks[0].clone();
    assert!(task.task_id.ends_with("-train"));
    let [mut evil, mut nan, mut long, mut honest]: [RawAgent; 4] = raw.try_into().ok().unwrap();
    let mut outsider = RawAgent::join(coord.addr, load_merchant("outsider", &split.files[0])).await;

    let out = evil.compute(&task).await;
    let update = out.update.clone().unwrap();
    let good = evil.header(&task, &out);
    let payload = update.payload_bytes();

    // Refusals before the update is looked at: nothing is recorded.
    let mut h = good.clone();
    h.round += 1;
    assert_rejected!(
        evil.send_raw(h, vec![payload.clone()]).await,
        Code::FailedPrecondition,
        "is not open"
    );
    let mut h = good.clone();
    h.round = 0;
    h.task_id = "r0a1-stats".into();
    assert_rejected!(
        evil.send_raw(h, vec![payload.clone()]).await,
        Code::FailedPrecondition,
        "is not open"
    );
    let mut h = good.clone();
    h.session_id = "not-a-session".into();
    assert_rejected!(
        evil.send_raw(h, vec![payload.clone()]).await,
        Code::Unauthenticated,
        "unknown session"
    );
    let mut h = outsider.header(&task, &out);
    h.session_id = outsider.session_id.clone();
    assert_rejected!(
        outsider.send_raw(h, vec![payload.clone()]).await,
        Code::PermissionDenied,
        "not selected"
    );

    // A failure report (the agent leaves the task) is a header alone, with
    // a short printable reason, from a selected agent that has not reported.
    // A malformed one is answered and carries no update, so it ends nothing.
    let failure = |agent: &RawAgent, reason: &str| pb::UpdateHeader {
        session_id: agent.session_id.clone(),
        run_id: task.run_id.clone(),
        round: task.round,
        task_id: task.task_id.clone(),
        failure: reason.into(),
        ..Default::default()
    };
    assert_rejected!(
        outsider
            .send_raw(failure(&outsider, "local training diverged"), vec![])
            .await,
        Code::PermissionDenied,
        "not selected"
    );
    let mut h = failure(&evil, "local training diverged");
    h.payload_len = 4;
    h.num_values = 1;
    assert_rejected!(
        evil.send_raw(h, vec![vec![0; 4]]).await,
        Code::InvalidArgument,
        "a failure report carries no update"
    );
    assert_rejected!(
        evil.send_raw(failure(&evil, &"x".repeat(201)), vec![])
            .await,
        Code::InvalidArgument,
        "at most 200 are accepted"
    );
    assert_rejected!(
        evil.send_raw(failure(&evil, "ok\r\nforged log line"), vec![])
            .await,
        Code::InvalidArgument,
        "control characters"
    );

    let honest_out = honest.compute(&tasks[3]).await;
    let honest_good = honest.header(&tasks[3], &honest_out);
    let honest_payload = honest_out.update.clone().unwrap().payload_bytes();
    honest
        .send_raw(honest_good.clone(), vec![honest_payload.clone()])
        .await
        .expect("the honest update is accepted");
    assert_rejected!(
        honest.send_raw(honest_good, vec![honest_payload]).await,
        Code::AlreadyExists,
        "already submitted"
    );
    // Nor can an agent leave a task it has reported in: its update stays.
    assert_rejected!(
        honest
            .send_raw(failure(&honest, "local training diverged"), vec![])
            .await,
        Code::AlreadyExists,
        "already submitted"
    );
    // A refused update is the merchant's one update for the task: the
    // round record says why, and nothing it sends after is taken (a valid
    // update after a refused one would sit beside "rejected" in the record).
    let mut h = good.clone();
    h.num_values -= 1;
    h.payload_len -= 4;
    assert_rejected!(
        evil.send_raw(h, vec![payload[..payload.len() - 4].to_vec()])
            .await,
        Code::InvalidArgument,
        "wrong vector length"
    );
    assert_rejected!(
        evil.send_raw(good.clone(), vec![payload.clone()]).await,
        Code::FailedPrecondition,
        "was refused: it may send no other"
    );
    let nan_good = nan.header(&task, &out);
    let mut values = update.values.clone();
    values[3] = f32::NAN;
    assert_rejected!(
        nan.send_raw(nan_good.clone(), vec![f32s_to_le(&values)])
            .await,
        Code::InvalidArgument,
        "value 3 is not finite"
    );
    values[3] = f32::INFINITY;
    assert_rejected!(
        nan.send_raw(nan_good, vec![f32s_to_le(&values)]).await,
        Code::FailedPrecondition,
        "was refused"
    );
    let mut longer = payload.clone();
    longer.extend_from_slice(&[0, 0, 0, 0]);
    assert_rejected!(
        long.send_raw(long.header(&task, &out), vec![longer]).await,
        Code::OutOfRange,
        "larger than declared"
    );

    // The raw sessions serve the rest of the run.
    let raw: Vec<_> = [evil, nan, long, honest, outsider]
        .into_iter()
        .map(|a| tokio::spawn(a.serve()))
        .collect();

    let shared = coord.shared.clone();
    coord.wait_finished().await.unwrap();
    for a in agents {
        a.stop().await;
    }
    for a in raw {
        a.await.unwrap();
    }
    let train = shared
        .history()
        .unwrap()
        .into_iter()
        .find(|r| r.kind == fedcart_common::task::TaskKind::Train)
        .unwrap();
    assert_eq!(train.outcome, Outcome::Committed);
    assert_eq!(
        train.reported,
        ["merchant-0", "merchant-1", "merchant-2", "merchant-6"],
        "the three refused merchants are not in the sum"
    );
    let why = |m: &str| -> Vec<&str> {
        train
            .rejected
            .iter()
            .filter(|(a, _)| a == m)
            .map(|(_, r)| r.as_str())
            .collect()
    };
    assert_eq!(
        train.refused,
        ["merchant-3", "merchant-4", "merchant-5"],
        "the refused updates, as /metrics counts them"
    );
    assert!(
        matches!(why("merchant-3")[..], [r] if r.contains("wrong vector length")),
        "{train:?}"
    );
    assert!(
        matches!(why("merchant-4")[..], [r] if r.contains("not finite (NaN)")),
        "{train:?}"
    );
    assert!(
        matches!(why("merchant-5")[..], [r] if r.contains("larger than declared")),
        "{train:?}"
    );
}

async fn run_with_a_dropout(quorum: usize) -> Vec<fedcart_coordinator::record::RoundRecord> {
    let split = telco_split(4, 9);
    let dir = tempfile::tempdir().unwrap();
    // With quorum 3 one round is enough; with quorum 4 the aborted round is
    // retried and a second round follows.
    let rounds = if quorum == 4 { 2 } else { 1 };
    let mut run = churn_run(&format!("e2e-drop-{quorum}"), rounds, 4, 3);
    run.quorum = quorum;
    run.evaluate = false;
    let coord = start_coordinator(&dir.path().join("c.redb"), run, 0).await;
    let mut agents: Vec<_> = (0..3)
        .map(|k| {
            spawn_agent(
                coord.addr,
                load_merchant(&format!("merchant-{k}"), &split.files[k]),
            )
        })
        .collect();
    let mut flaky = RawAgent::join(coord.addr, load_merchant("merchant-3", &split.files[3])).await;
    let stats = flaky.next_task().await;
    flaky.answer(&stats).await.unwrap();
    let train = flaky.next_task().await;
    assert_eq!(train.task_id, "r1a1-train");
    // Disconnect mid-round, after being selected and before answering.
    drop(flaky);
    // With quorum 4 the round aborts, with quorum 3 it commits without it;
    // either way the merchant comes back as a well-behaved agent (the
    // evaluation that hands out the last version selects all four).
    let mut progress = coord.progress.clone();
    progress.wait_for(|p| p.records >= 2).await.unwrap();
    agents.push(spawn_agent(
        coord.addr,
        load_merchant("merchant-3", &split.files[3]),
    ));
    let shared = coord.shared.clone();
    coord.wait_finished().await.unwrap();
    for a in agents {
        a.stop().await;
    }
    shared.history().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropout_within_quorum_still_commits_the_round() {
    let history = run_with_a_dropout(3).await;
    let r1 = history.iter().find(|r| r.task_id == "r1a1-train").unwrap();
    assert_eq!(r1.outcome, Outcome::Committed);
    assert_eq!(r1.reported.len(), 3);
    assert_eq!(r1.dropped, vec!["merchant-3".to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropout_below_quorum_aborts_cleanly_and_the_next_round_runs() {
    let history = run_with_a_dropout(4).await;
    let first = history.iter().find(|r| r.task_id == "r1a1-train").unwrap();
    assert_eq!(first.outcome, Outcome::Aborted);
    assert_eq!(
        first.abort_reason.as_deref(),
        Some("3 results, quorum is 4")
    );
    let retry = history.iter().find(|r| r.task_id == "r1a2-train").unwrap();
    assert_eq!(retry.outcome, Outcome::Committed);
    assert_eq!(retry.reported.len(), 4);
    assert!(
        history
            .iter()
            .any(|r| r.task_id == "r2a1-train" && r.outcome == Outcome::Committed)
    );
}
