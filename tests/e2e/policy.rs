//! The merchant's privacy policy against a real coordinator: a task whose
//! protections fall below an agent's `[privacy]` policy is refused by that
//! agent before anything leaves it, and the round goes on without it.

use fedcart_client::agent::Agent;
use fedcart_client::config::Backoff;
use fedcart_client::policy::PrivacyPolicy;
use fedcart_client::transfer::declined_by_policy;
use fedcart_common::task::{ModelSpec, TaskKind};
use fedcart_common::train::LocalData;
use fedcart_coordinator::config::{RunConfig, SecAggSettings};
use fedcart_coordinator::record::{Outcome, RoundRecord};
use fedcart_tests::*;

fn merchant(k: usize) -> LocalData {
    LocalData {
        merchant_id: format!("m{k}"),
        ..Default::default()
    }
}

/// One round of the model-free task over four agents, quorum three. The
/// refusing agent tells the coordinator it leaves the task, so the round
/// (and the key-advertising stage, which contains training) closes when
/// the other three have answered, not at the minute-long deadline.
fn noop_run(run_id: &str, secure: bool) -> RunConfig {
    let mut run = churn_run(run_id, 1, 4, 3);
    run.model = ModelSpec::Noop { dim: 200 };
    run.evaluate = false;
    run.round_timeout_ms = 60_000;
    run.secagg = secure.then_some(SecAggSettings {
        neighbours: None,
        clip: 1.0,
        verify_survivors: false,
        stage_timeout_ms: Some(120_000),
    });
    run
}

/// Runs `run` with m0–m2 on the plaintext harness's policy (the default
/// without key binding) and m3 on `policy`; returns
/// the training record.
async fn run_with_strict_m3(run: RunConfig, policy: PrivacyPolicy) -> RoundRecord {
    let mut trains = train_records_with_m3(run, |m3| m3.with_policy(policy)).await;
    let record = trains.remove(0);
    assert!(trains.is_empty());
    record
}

/// Runs `run` to its end with m0–m2 on the plaintext harness's policy and
/// m3 built by `m3` from a plain agent; returns the training records.
async fn train_records_with_m3(
    run: RunConfig,
    m3: impl FnOnce(Agent) -> Agent,
) -> Vec<RoundRecord> {
    let store = tempfile::tempdir().unwrap();
    let coord = start_coordinator(&store.path().join("c.redb"), run, 0).await;
    let mut agents: Vec<_> = (0..3)
        .map(|k| spawn_agent(coord.addr, merchant(k)))
        .collect();
    let mut strict = m3(Agent::new(format!("http://{}", coord.addr), merchant(3)));
    strict.backoff = Backoff {
        initial_ms: 20,
        max_ms: 500,
    };
    agents.push(spawn_configured(strict));
    let shared = coord.shared.clone();
    coord.wait_finished().await.unwrap();
    for a in agents {
        a.stop().await;
    }
    train_records(&shared)
}

/// The training records of a run, oldest first.
fn train_records(shared: &fedcart_coordinator::service::Shared) -> Vec<RoundRecord> {
    shared
        .history()
        .unwrap()
        .into_iter()
        .filter(|r| r.kind == TaskKind::Train)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_requiring_secure_aggregation_sends_nothing_to_a_plain_run() {
    let policy = PrivacyPolicy {
        require_secure_aggregation: true,
        ..PrivacyPolicy::without_key_binding()
    };
    let r = run_with_strict_m3(noop_run("e2e-policy-plain", false), policy).await;
    assert_eq!(r.outcome, Outcome::Committed, "{r:?}");
    assert_eq!(r.reported, vec!["m0", "m1", "m2"]);
    assert_eq!(r.dropped, vec!["m3"]);
    assert_eq!(
        r.rejected,
        declined_by_m3(&declined_by_policy("require_secure_aggregation")),
        "m3 sent nothing but its refusal"
    );
    // Nothing was refused: /metrics' fedcart_updates_rejected_total and
    // the agents' `rejected` count `refused` (a decline counted as one).
    assert!(r.refused.is_empty(), "{r:?}");
}

/// Agents m0, m1, … on the states in `states`, each with a ledger capped
/// far above what a test spends (at `delta`).
fn budgeted_agents(
    addr: std::net::SocketAddr,
    states: &[tempfile::TempDir],
    delta: f64,
) -> Vec<AgentHandle> {
    use fedcart_client::budget::Budget;
    use fedcart_client::state::StateDir;
    states
        .iter()
        .enumerate()
        .map(|(k, state)| {
            let budget = Budget::open(StateDir::open(state.path()).unwrap(), 1e3, delta).unwrap();
            let agent = Agent::new(format!("http://{addr}"), merchant(k))
                .with_policy(PrivacyPolicy {
                    max_epsilon: Some(1e3),
                    epsilon_delta: delta,
                    ..PrivacyPolicy::without_key_binding()
                })
                .with_budget(budget);
            spawn_configured(agent)
        })
        .collect()
}

/// Runs the one-round `run` with m0–m2 as [`budgeted_agents`] on `states`
/// and m3 on `m3_policy`; returns the training record, committed over
/// m0–m2.
async fn budgeted_round_with_m3(
    run: RunConfig,
    states: &[tempfile::TempDir],
    delta: f64,
    m3_policy: PrivacyPolicy,
) -> RoundRecord {
    let store = tempfile::tempdir().unwrap();
    let coord = start_coordinator(&store.path().join("c.redb"), run, 0).await;
    let mut agents = budgeted_agents(coord.addr, states, delta);
    let mut m3 = Agent::new(format!("http://{}", coord.addr), merchant(3)).with_policy(m3_policy);
    m3.backoff = Backoff {
        initial_ms: 20,
        max_ms: 500,
    };
    agents.push(spawn_configured(m3));
    let shared = coord.shared.clone();
    coord.wait_finished().await.unwrap();
    for a in agents {
        a.stop().await;
    }
    let mut trains = train_records(&shared);
    assert_eq!(trains.len(), 1, "{trains:?}");
    let r = trains.remove(0);
    assert_eq!(r.outcome, Outcome::Committed, "{r:?}");
    assert_eq!(r.reported, vec!["m0", "m1", "m2"], "{r:?}");
    r
}

/// The round record's rejections when m3 alone left the task with `reason`.
fn declined_by_m3(reason: &str) -> Vec<(String, String)> {
    vec![("m3".to_string(), reason.to_string())]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_whose_minimum_threshold_is_above_the_rounds_sends_no_masked_input() {
    // Four agents, complete graph: the coordinator's threshold is 3.
    let policy = PrivacyPolicy {
        min_threshold: 4,
        ..PrivacyPolicy::without_key_binding()
    };
    let r = run_with_strict_m3(noop_run("e2e-policy-secure", true), policy).await;
    assert_eq!(r.outcome, Outcome::Committed, "{r:?}");
    // The sum is over the three that advertised keys; m3 never did.
    assert_eq!(r.reported, vec!["m0", "m1", "m2"]);
    assert_eq!(r.dropped, vec!["m3"]);
    assert_eq!(
        r.rejected,
        declined_by_m3(&declined_by_policy("min_threshold"))
    );
}

/// A round whose roster is smaller than a merchant's `min_survivors` gets
/// nothing from it: it refuses when the roster arrives, before any share or
/// masked input. (It used to refuse only at the unmask stage, when its
/// masked input was already in and the others' shares could unmask it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_sends_no_masked_input_to_a_round_smaller_than_its_min_survivors() {
    let policy = PrivacyPolicy {
        min_survivors: 5,
        ..PrivacyPolicy::without_key_binding()
    };
    let r = run_with_strict_m3(noop_run("e2e-policy-roster", true), policy).await;
    assert_eq!(r.outcome, Outcome::Committed, "{r:?}");
    // The sum is over the other three; m3's input is not in it.
    assert_eq!(r.reported, vec!["m0", "m1", "m2"]);
    assert_eq!(r.dropped, vec!["m3"]);
    assert_eq!(
        r.rejected,
        declined_by_m3(&declined_by_policy("min_survivors"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_without_a_certificate_refuses_secure_rounds_under_the_default_policy() {
    // The default policy requires keys bound to merchant certificates; a
    // plaintext agent has none to sign with or to check its peers' against.
    let r = run_with_strict_m3(
        noop_run("e2e-policy-unbound", true),
        PrivacyPolicy::default(),
    )
    .await;
    assert_eq!(r.outcome, Outcome::Committed, "{r:?}");
    assert_eq!(r.reported, vec!["m0", "m1", "m2"]);
    assert_eq!(r.dropped, vec!["m3"]);
    assert_eq!(
        r.rejected,
        declined_by_m3(&declined_by_policy("require_key_binding"))
    );
}

/// A curious coordinator that wants more of a merchant than its budget
/// allows runs more rounds, then another run. The merchant's own ledger
/// (`privacy.max_epsilon`, in its state directory) charges each round it
/// sends a noised masked input in and refuses the rest before anything
/// leaves, in this run, in the next one, and after the agent restarts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merchants_epsilon_cap_holds_across_rounds_runs_and_restarts() {
    use fedcart_client::budget::{Budget, LEDGER_FILE};
    use fedcart_client::state::StateDir;
    use fedcart_common::privacy::dp::accountant::epsilon_for;
    use fedcart_coordinator::config::{DpMode, DpSettings};

    let (z, delta) = (1.0, 1e-5);
    let distributed = |run_id: &str, rounds: u64| {
        let mut run = noop_run(run_id, true);
        run.rounds = rounds;
        let mut dp = DpSettings::central(1.0, z, delta);
        dp.mode = DpMode::Distributed;
        run.dp = Some(dp);
        run
    };
    // Room for one full-participation round at z and not for two.
    let one = epsilon_for(1.0, z, 1, delta).unwrap().epsilon;
    let two = epsilon_for(1.0, z, 2, delta).unwrap().epsilon;
    let policy = PrivacyPolicy {
        max_epsilon: Some((one + two) / 2.0),
        epsilon_delta: delta,
        ..PrivacyPolicy::without_key_binding()
    };
    let state = tempfile::tempdir().unwrap();
    for (run, rounds, m3_rounds) in [
        (distributed("e2e-budget-a", 3), 3, vec![1]),
        // Another run, a restarted agent on the same state: nothing left.
        (distributed("e2e-budget-b", 1), 1, vec![]),
    ] {
        let dir = StateDir::open(state.path()).unwrap();
        let budget = Budget::open(dir, policy.max_epsilon.unwrap(), delta).unwrap();
        let policy = policy.clone();
        let records =
            train_records_with_m3(run, |m3| m3.with_policy(policy).with_budget(budget)).await;
        assert_eq!(records.len(), rounds, "{records:?}");
        for r in &records {
            assert_eq!(r.outcome, Outcome::Committed, "{r:?}");
            if m3_rounds.contains(&r.round) {
                assert_eq!(r.reported, vec!["m0", "m1", "m2", "m3"], "{r:?}");
            } else {
                assert_eq!(r.reported, vec!["m0", "m1", "m2"], "{r:?}");
                assert_eq!(
                    r.rejected,
                    declined_by_m3(&declined_by_policy("max_epsilon")),
                    "{r:?}"
                );
            }
        }
    }
    let ledger: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state.path().join(LEDGER_FILE)).unwrap()).unwrap();
    let charged = ledger["rounds"].as_array().unwrap();
    assert_eq!(charged.len(), 1, "{ledger}");
    assert_eq!(charged[0]["run_id"], "e2e-budget-a");
    assert_eq!(charged[0]["noise_multiplier"], z);
}

/// A round whose sum holds fewer noise shares than the agents were charged
/// for: m3 advertises keys, then leaves before sharing them (its policy
/// wants more neighbours than the round of four has), so the sum holds
/// three of the four planned shares. Each survivor's own ledger is charged
/// again at the unmask stage, before it reveals a share, at the noise the
/// sum carries, `z·√(3/4)`: what the coordinator's ledger accounts, not
/// the `z` of a full round charged when the masked input left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merchants_ledger_is_charged_at_the_survivors_of_the_sum_not_the_roster() {
    use fedcart_client::budget::Budget;
    use fedcart_client::state::StateDir;
    use fedcart_common::privacy::dp::accountant::epsilon_for;
    use fedcart_coordinator::config::{DpMode, DpSettings};

    let (z, delta) = (1.0, 1e-5);
    let mut run = noop_run("e2e-budget-survivors", true);
    let mut dp = DpSettings::central(1.0, z, delta);
    dp.mode = DpMode::Distributed;
    run.dp = Some(dp);
    let states: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let policy = PrivacyPolicy {
        min_neighbours: 4,
        ..PrivacyPolicy::without_key_binding()
    };
    let r = &budgeted_round_with_m3(run, &states, delta, policy).await;
    let accounted = r.privacy.as_ref().expect("a DP round").noise_multiplier;
    let want = z * (3.0f64 / 4.0).sqrt();
    assert!((accounted - want).abs() < 1e-12, "{accounted}");
    let epsilon = epsilon_for(1.0, want, 1, delta).unwrap().epsilon;
    for state in &states {
        let b = Budget::open(StateDir::open(state.path()).unwrap(), 1e3, delta).unwrap();
        assert_eq!(b.rounds().len(), 1, "{:?}", b.rounds());
        assert!(
            (b.rounds()[0].noise_multiplier - want).abs() < 1e-12,
            "{:?}",
            b.rounds()
        );
        assert!(
            (b.spent() - epsilon).abs() < 1e-9,
            "{} vs {epsilon}",
            b.spent()
        );
    }
}

/// A coordinator that closes a secure round with fewer masked inputs than a
/// merchant's `privacy.min_survivors` (here three of four, m3 having left
/// after advertising its keys) gets no shares from that merchant: with the
/// threshold at three of the three survivors, the sum cannot be unmasked,
/// the attempt aborts and is retried, and nothing is ever committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_reveals_no_shares_for_a_sum_of_fewer_inputs_than_its_policy_allows() {
    let mut run = noop_run("e2e-policy-survivors", true);
    run.max_attempts = 2;
    let store = tempfile::tempdir().unwrap();
    let coord = start_coordinator(&store.path().join("c.redb"), run, 0).await;
    let policy = |min_survivors, min_neighbours| PrivacyPolicy {
        min_survivors,
        min_neighbours,
        ..PrivacyPolicy::without_key_binding()
    };
    let mut agents = Vec::new();
    for (k, p) in [
        (0, policy(4, 2)),
        (1, policy(0, 2)),
        (2, policy(0, 2)),
        (3, policy(0, 4)),
    ] {
        let mut a = Agent::new(format!("http://{}", coord.addr), merchant(k)).with_policy(p);
        a.backoff = Backoff {
            initial_ms: 20,
            max_ms: 500,
        };
        agents.push(spawn_configured(a));
    }
    let shared = coord.shared.clone();
    let ended = coord.wait_finished().await;
    assert!(
        ended
            .as_ref()
            .is_err_and(|e| e.to_string().contains("run.max_attempts")
                && e.to_string().contains(
                    "`declined by the merchant's privacy policy (privacy.min_neighbours)` (2 of \
                     4; from m3), and `declined by the merchant's privacy policy \
                     (privacy.min_survivors)` (2 of 4; from m0)"
                )),
        "{ended:?}"
    );
    for a in agents {
        a.stop().await;
    }
    let trains = train_records(&shared);
    assert_eq!(trains.len(), 2, "{trains:?}");
    for r in &trains {
        assert_eq!(r.outcome, Outcome::Aborted, "{r:?}");
        // m0's refusal is recorded, and ended the stage without its deadline.
        assert!(
            r.rejected
                .contains(&("m0".to_string(), declined_by_policy("min_survivors"))),
            "{r:?}"
        );
    }
    assert!(shared.model(1).unwrap().is_none(), "nothing committed");
    assert!(
        shared.stopped().is_some(),
        "the run gave up after its attempts"
    );
}

/// With adaptive clipping the clip-bit count is released with the model's
/// sum, its noise set by the coordinator (`count_noise_std`). A merchant
/// charged and checked its floor at the deltas' multiplier alone: with the
/// release at z = 0.5 (the coordinator's own ε 21.4) the merchant's ledger
/// read 4.5 and a floor of 1 let every round through (found by an attacker
/// probe with the shipped coordinator). Each ledger is now charged at the
/// release's multiplier, what the coordinator accounts, and a floor of 1
/// keeps the merchant out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_adaptive_clipping_a_merchant_is_charged_for_the_clip_bit_release_too() {
    use fedcart_client::budget::Budget;
    use fedcart_client::state::StateDir;
    use fedcart_common::privacy::dp::accountant::epsilon_for;
    use fedcart_coordinator::config::{ClipNorm, DpMode, DpSettings};

    let (z, delta) = (0.5, 1e-5);
    let mut run = noop_run("e2e-budget-adaptive", true);
    let mut dp = DpSettings::central(1.0, z, delta);
    dp.mode = DpMode::Distributed;
    dp.clip = ClipNorm::Adaptive;
    dp.count_noise_std = Some(0.26);
    run.dp = Some(dp);
    let states: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let policy = PrivacyPolicy {
        min_noise_multiplier: 1.0,
        ..PrivacyPolicy::without_key_binding()
    };
    let r = &budgeted_round_with_m3(run, &states, delta, policy).await;
    assert_eq!(
        r.rejected,
        declined_by_m3(&declined_by_policy("min_noise_multiplier"))
    );
    let privacy = r.privacy.as_ref().expect("a DP round");
    for state in &states {
        let b = Budget::open(StateDir::open(state.path()).unwrap(), 1e3, delta).unwrap();
        assert_eq!(b.rounds().len(), 1, "{:?}", b.rounds());
        let charged = b.rounds()[0].noise_multiplier;
        // The noise of three of the four planned agents' shares, as the
        // coordinator accounts it; well below the deltas' z_Δ ≈ 1.82·√¾.
        assert!(
            (charged - privacy.noise_multiplier).abs() < 1e-9,
            "charged {charged}, accounted {}",
            privacy.noise_multiplier
        );
        assert!(charged < z, "{charged}");
        let epsilon = epsilon_for(1.0, charged, 1, delta).unwrap().epsilon;
        assert!((b.spent() - epsilon).abs() < 1e-9, "{}", b.spent());
    }
}

/// Evaluations send the score histograms of a merchant's held-out and
/// validation customers in the clear, from which a coordinator evaluating
/// crafted models read each customer's feature values and labels (an
/// attacker probe). A merchant with `allow_evaluation = false` declines
/// every evaluation, stays in every training round (the decline is not
/// lasting), and ends the run holding the version the run serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merchant_declining_evaluations_still_trains_and_ends_with_the_served_version() {
    use fedcart_client::state::StateDir;
    let split = telco_split(4, 31);
    let store = tempfile::tempdir().unwrap();
    let coord = start_coordinator(
        &store.path().join("c.redb"),
        churn_run("e2e-no-eval", 3, 4, 3),
        0,
    )
    .await;
    let mut agents: Vec<_> = (0..3)
        .map(|k| spawn_agent(coord.addr, load_merchant(&format!("m{k}"), &split.files[k])))
        .collect();
    let state = tempfile::tempdir().unwrap();
    let mut m3 = Agent::new(
        format!("http://{}", coord.addr),
        load_merchant("m3", &split.files[3]),
    )
    .with_policy(PrivacyPolicy {
        allow_evaluation: false,
        ..PrivacyPolicy::without_key_binding()
    })
    .with_state(StateDir::open(state.path()).unwrap())
    .unwrap();
    m3.backoff = Backoff {
        initial_ms: 20,
        max_ms: 500,
    };
    // Returns once it heard the run end (and fetched what it serves).
    m3.exit_on_run_end = true;
    let m3 = spawn_configured(m3);
    m3.task.await.expect("m3 returns when the run ends");
    let shared = coord.shared.clone();
    coord.wait_finished().await.unwrap();
    for a in agents.drain(..) {
        a.stop().await;
    }
    let history = shared.history().unwrap();
    let (evals, trains): (Vec<&RoundRecord>, Vec<&RoundRecord>) = history
        .iter()
        .filter(|r| r.outcome == Outcome::Committed && r.kind != TaskKind::Stats)
        .partition(|r| r.kind == TaskKind::Evaluate);
    assert_eq!(trains.len(), 3, "{history:?}");
    for r in &trains {
        assert!(r.reported.contains(&"m3".to_string()), "{r:?}");
    }
    assert!(!evals.is_empty());
    for r in &evals {
        assert!(!r.reported.contains(&"m3".to_string()), "{r:?}");
        assert_eq!(
            r.rejected,
            declined_by_m3(&declined_by_policy("allow_evaluation")),
            "{r:?}"
        );
    }
    let served = shared.best().expect("a served version").version;
    let (top, params) = StateDir::open(state.path())
        .unwrap()
        .load_global("churn")
        .unwrap()
        .expect("m3 holds the served version");
    assert_eq!((top.run_id.as_str(), top.version), ("e2e-no-eval", served));
    assert_eq!(params, *shared.model(served).unwrap().unwrap());
}
