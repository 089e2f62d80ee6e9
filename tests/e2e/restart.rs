//! Killing the coordinator loses nothing committed, and the run carries on.

use std::time::Duration;

use fedcart_coordinator::record::Outcome;
use fedcart_tests::*;

#[test]
fn coordinator_dropped_after_round_2_resumes_and_versions_read_back_bit_identical() {
    let main_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    main_rt.block_on(async {
        let split = telco_split(4, 21);
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("c.redb");
        let run = churn_run("e2e-restart", 5, 4, 4);

        // The first coordinator lives in its own runtime so that it can be
        // dropped whole, mid-flight, as a killed process would be.
        let first_rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
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
