//! Killing the coordinator loses nothing committed, and the run carries on.

use std::time::Duration;

use fedcart_coordinator::record::Outcome;
use fedcart_tests::*;

/// A runtime of its own, so that a coordinator started in it can be
/// dropped whole, mid-flight, as a killed process would be.
fn runtime(threads: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn coordinator_dropped_after_round_2_resumes_and_versions_read_back_bit_identical() {
    let main_rt = runtime(2);
    main_rt.block_on(async {
        let split = telco_split(4, 21);
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("c.redb");
        let run = churn_run("e2e-restart", 5, 4, 4);

        // The first coordinator lives in its own runtime so that it can be
        // dropped whole, mid-flight, as a killed process would be.
        let first_rt = runtime(1);
        let (s, r) = (store.clone(), run.clone());
        let first = first_rt
            .spawn(async move { start_coordinator(&s, r, 0).await })
            .await
            .unwrap();
        let addr = first.addr;
        let agents: Vec<_> = split
            .files
            .iter()
            .enumerate()
            .map(|(k, f)| spawn_agent(addr, load_merchant(&format!("merchant-{k}"), f)))
            .collect();
        let mut progress = first.progress.clone();
        progress.wait_for(|p| p.version >= 2).await.unwrap();
        let v1 = first.shared.model(1).unwrap().unwrap();
        let v2 = first.shared.model(2).unwrap().unwrap();
        drop(first);
        tokio::task::spawn_blocking(move || first_rt.shutdown_timeout(Duration::from_secs(10)))
            .await
            .unwrap();

        // A new coordinator on the same store and port; agents reconnect by themselves.
        let second = start_coordinator(&store, run, addr.port()).await;
        assert!(
            second.progress.borrow().version >= 2,
            "resumed from the last committed version"
        );
        let shared = second.shared.clone();
        second.wait_finished().await.unwrap();
        for a in agents {
            a.stop().await;
        }

        assert_eq!(*shared.model(1).unwrap().unwrap(), *v1);
        assert_eq!(*shared.model(2).unwrap().unwrap(), *v2);
        assert_eq!(shared.model(5).unwrap().unwrap().len(), v1.len());
        let history = shared.history().unwrap();
        for round in 1..=5 {
            let committed = history
                .iter()
                .filter(|r| {
                    r.kind == fedcart_common::task::TaskKind::Train
                        && r.round == round
                        && r.outcome == Outcome::Committed
                })
                .count();
            assert_eq!(committed, 1, "round {round} committed exactly once");
        }
    });
}

/// Abandons (as a merchant whose machine went away) every task of rounds 1
/// to 3 while `on` is set.
struct AwayEarly {
    on: std::sync::atomic::AtomicBool,
}

impl fedcart_client::agent::TaskObserver for AwayEarly {
    fn on_task(&self, task_id: &str) -> fedcart_client::agent::TaskDecision {
        let early = ["r1a", "r2a", "r3a"].iter().any(|r| task_id.starts_with(r));
        if early && self.on.load(std::sync::atomic::Ordering::SeqCst) {
            fedcart_client::agent::TaskDecision::Abandon
        } else {
            fedcart_client::agent::TaskDecision::Accept
        }
    }
}

/// A coordinator whose store was lost (or restored from an older backup)
/// begins the run again under the same id, with other values under the
/// same version numbers. An agent away for the new history's first rounds
/// still holds a version of the old one: the changed rows of the new
/// history applied to it would give a model neither history has, trained
/// on without a word. The digest of the held copy's task shows it is not
/// the store's version, so the coordinator sends the whole model, and the
/// agent trains from exactly the store's version.
#[test]
fn an_agent_holding_a_version_of_another_history_of_the_run_gets_the_whole_model() {
    let main_rt = runtime(2);
    main_rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let exports = store_exports(dir.path(), &["433", "324", "363"]);
        let mf_run = |seed: u64, lr: f32| {
            let mut run = churn_run("history", 4, 3, 2);
            run.seed = seed;
            run.evaluate = false;
            // Rows enough that a round changes few of them, so the model
            // goes as changed rows.
            run.model = fedcart_common::task::ModelSpec::MfImplicit {
                num_items: 1 << 18,
                factors: 4,
                hyper: fedcart_common::model::mf::MfHyper::bpr(),
            };
            run.sgd.learning_rate = lr;
            // Every round waits for all three, so m2 is drawn into each
            // (it abandons rounds 1 to 3 of the new history once drawn).
            run.selection.min_agents = 3;
            run
        };
        let first_rt = runtime(1);
        let (store, run) = (dir.path().join("a.redb"), mf_run(1, 0.05));
        let first = first_rt
            .spawn(async move { start_coordinator(&store, run, 0).await })
            .await
            .unwrap();
        let addr = first.addr;
        let away = std::sync::Arc::new(AwayEarly {
            on: Default::default(),
        });
        let agents: Vec<_> = exports
            .iter()
            .enumerate()
            .map(|(k, export)| {
                let cfg = orders_agent_config(&format!("m{k}"), addr, export);
                let mut agent = fedcart_client::agent::Agent::from_config(&cfg).unwrap();
                agent.backoff.initial_ms = 20;
                agent.backoff.max_ms = 200;
                if k == 2 {
                    agent.observer = Some(away.clone());
                }
                spawn_configured(agent)
            })
            .collect();
        let mut progress = first.progress.clone();
        progress.wait_for(|p| p.version >= 2).await.unwrap();
        let old = first.shared.model(2).unwrap().unwrap();
        // m2 stays away from the new history's first three rounds.
        away.on.store(true, std::sync::atomic::Ordering::SeqCst);
        drop(first);
        tokio::task::spawn_blocking(move || first_rt.shutdown_timeout(Duration::from_secs(10)))
            .await
            .unwrap();

        // The store is gone: the run begins again on a new one, with other
        // settings, on the same port.
        let second =
            start_coordinator(&dir.path().join("b.redb"), mf_run(2, 0.2), addr.port()).await;
        let shared = second.shared.clone();
        second.wait_finished().await.unwrap();
        let mut stopped = Vec::new();
        for a in agents {
            stopped.push(a.stop().await);
        }
        let m2 = &stopped[2];
        // m2 trained round 4 from version 3 of the new history, and holds
        // the last version it fetched (rows changed since) exactly.
        let new = shared.model(2).unwrap().unwrap();
        assert_ne!(*old, *new, "the two histories differ at version 2");
        // m2 trained round 4 from version 3 of the new history, and holds
        // the last version it fetched (rows changed since) exactly.
        let history = shared.history().unwrap();
        let round4 = history
            .iter()
            .find(|r| r.round == 4 && r.outcome == Outcome::Committed)
            .unwrap();
        assert!(round4.reported.contains(&"m2".to_string()), "{round4:?}");
        let (run, version, params) = m2.held_model().unwrap();
        assert_eq!(run, "history");
        assert!(version >= 3, "{version}");
        assert!(
            params == shared.model(version).unwrap().unwrap().as_slice(),
            "m2 holds another model than version {version}"
        );
    });
}
