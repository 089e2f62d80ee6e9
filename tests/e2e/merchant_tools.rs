//! `recommend` and `score` on merchants that took part in a federation, from
//! the state the agents kept on disk; the private user factors survive a
//! restart.

use fedcart_client::agent::Agent;
use fedcart_client::data::Items;
use fedcart_client::recommend::{recommend, score};
use fedcart_client::state::StateDir;
use fedcart_common::data::tabular::Schema;
use fedcart_common::metrics::auc;
use fedcart_common::model::mf::MfHyper;
use fedcart_common::model::mf::movielens;
use fedcart_common::task::ModelSpec;
use fedcart_tests::*;

fn spawn_with_state(
    addr: std::net::SocketAddr,
    data: fedcart_common::train::LocalData,
    dir: &std::path::Path,
) -> AgentHandle {
    let mut a = Agent::new(format!("http://{addr}"), data)
        .with_state(StateDir::open(dir).unwrap())
        .unwrap();
    a.backoff.initial_ms = 20;
    spawn_configured(a)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn score_writes_a_churn_probability_per_customer_that_ranks_churners_first() {
    let split = telco_split(2, 3);
    let store = tempfile::tempdir().unwrap();
    let states = tempfile::tempdir().unwrap();
    let coord =
        start_coordinator(&store.path().join("c.redb"), churn_run("score", 3, 2, 2), 0).await;
    let agents: Vec<_> = (0..2)
        .map(|k| {
            spawn_with_state(
                coord.addr,
                load_merchant(&format!("m{k}"), &split.files[k]),
                &states.path().join(format!("m{k}")),
            )
        })
        .collect();
    coord.wait_finished().await.unwrap();
    for a in agents {
        a.stop().await;
    }
    let state = StateDir::open(states.path().join("m0")).unwrap();
    let (meta, _) = state
        .load_global("churn")
        .unwrap()
        .expect("global churn model kept");
    assert_eq!(
        meta.version, 3,
        "the evaluation after the last round delivers version 3"
    );
    assert!(
        state
            .load_metrics("churn")
            .unwrap()
            .unwrap()
            .contains_key("auc")
    );
    let out = states.path().join("churn_scores.csv");
    let table =
        fedcart_client::data::CustomerTable::csv(split.files[0].clone(), Schema::telco(), b',');
    let mut file = std::fs::File::create(&out).unwrap();
    let n = score(&state, &table, &mut file, &out).unwrap();
    drop(file);
    let ds = Schema::telco().load_csv(&split.files[0]).unwrap();
    assert_eq!(n, ds.len());
    let mut rd = csv::Reader::from_path(&out).unwrap();
    let rows: Vec<(String, f32)> = rd
        .records()
        .map(|r| {
            let r = r.unwrap();
            (r[0].to_string(), r[1].parse().unwrap())
        })
        .collect();
    assert_eq!(rows.len(), n);
    assert!(
        rows.iter()
            .zip(&ds.ids)
            .all(|((id, p), want)| id == want && *p > 0.0 && *p < 1.0)
    );
    let probs: Vec<f32> = rows.iter().map(|r| r.1).collect();
    let a = auc(ds.y.as_slice().unwrap(), &probs);
    assert!(
        a > 0.75,
        "AUC of the scores on the merchant's own customers: {a}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recommend_gives_top_k_unbought_items_and_user_factors_survive_restart() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../data/ml-latest-small/ratings.csv");
    let rows = movielens::load_ratings(&path).unwrap();
    let mut fed = movielens::explicit_federation(&rows, 2, 0.2, 9);
    validate_every_tenth_rating(&mut fed.merchants);
    let num_items = fed.catalogue.len();
    let mut run = churn_run("mf", 2, 2, 2);
    run.model = ModelSpec::Mf {
        num_items,
        factors: 8,
        hyper: MfHyper {
            refit_users: true,
            ..Default::default()
        },
    };
    let store = tempfile::tempdir().unwrap();
    let states = tempfile::tempdir().unwrap();
    let coord = start_coordinator(&store.path().join("c.redb"), run, 0).await;
    let agents: Vec<_> = fed
        .merchants
        .iter()
        .enumerate()
        .map(|(k, m)| spawn_with_state(coord.addr, m.clone(), &states.path().join(format!("m{k}"))))
        .collect();
    coord.wait_finished().await.unwrap();
    let mut trained = Vec::new();
    for a in agents {
        trained.push(a.stop().await);
    }
    let mf = fed.merchants[0].mf.as_ref().unwrap();
    let state = StateDir::open(states.path().join("m0")).unwrap();
    let customer = mf.users[0].clone();
    let recs = recommend(
        &state,
        mf,
        &Items::Listed(fed.catalogue.clone()),
        &customer,
        10,
    )
    .unwrap();
    assert_eq!(recs.len(), 10);
    assert!(recs.windows(2).all(|w| w[0].score >= w[1].score));
    // Ranked with the users solved on training and validation ratings that
    // measured the served version's test where validation preferred them,
    // else with the trained ones.
    let mut solved = 0;
    for (k, m) in fed.merchants.iter().enumerate() {
        let mf = m.mf.as_ref().unwrap();
        let state = StateDir::open(states.path().join(format!("m{k}"))).unwrap();
        let top = recommend(
            &state,
            mf,
            &Items::Listed(fed.catalogue.clone()),
            &mf.users[0],
            1,
        )
        .unwrap()
        .remove(0);
        let (meta, global) = state.load_global("mf").unwrap().unwrap();
        let users = state.load_users().unwrap().unwrap();
        let predicted = |(bias, factors): (&[f32], &[f32])| {
            let i = fed.catalogue.index(&top.item).unwrap() as usize;
            let (b, q) = fedcart_common::model::mf::item_offsets(num_items, 8, i);
            let dot: f32 = factors[..8]
                .iter()
                .zip(&global[q..q + 8])
                .map(|(a, b)| a * b)
                .sum();
            global[0] + global[b] + bias[0] + dot
        };
        let trained = predicted((&users.bias, &users.factors));
        match &users.served {
            Some(s) => {
                assert_eq!(s.version, meta.version);
                assert_eq!(top.score, predicted((&s.bias, &s.factors)));
                assert_ne!(top.score, trained);
                solved += 1;
            }
            None => assert_eq!(top.score, trained),
        }
    }
    assert!(
        solved > 0,
        "no merchant's validation preferred solved users"
    );
    let bought: std::collections::HashSet<&str> = mf
        .train
        .iter()
        .chain(&mf.valid)
        .chain(&mf.test)
        .filter(|r| r.user == 0)
        .map(|r| fed.catalogue.id(r.item).unwrap())
        .collect();
    assert!(!bought.is_empty());
    assert!(recs.iter().all(|r| !bought.contains(r.item.as_str())));
    assert!(
        recommend(
            &state,
            mf,
            &Items::Listed(fed.catalogue.clone()),
            "no-such-customer",
            10
        )
        .is_err()
    );

    // A restarted agent resumes with the trained private factors.
    let restarted = Agent::new("http://127.0.0.1:1", fed.merchants[0].clone())
        .with_state(StateDir::open(states.path().join("m0")).unwrap())
        .unwrap();
    let kept = &restarted.data.mf.as_ref().unwrap().state;
    assert_eq!(kept, &trained[0].data.mf.as_ref().unwrap().state);
    assert_eq!(kept.k, 8);
}

#[test]
fn deploy_configs_load_with_the_real_config_types() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let c =
        fedcart_coordinator::config::CoordinatorConfig::load(&root.join("docker/coordinator.toml"))
            .unwrap();
    assert_eq!(
        c.run.model,
        ModelSpec::churn_lr(Schema::telco().num_features())
    );
    assert!(c.serve.tls.is_some() && c.serve.http_listen.is_some());
    for m in [
        "docker/merchant-m0.toml",
        "docker/merchant-m1.toml",
        "docker/merchant-m2.toml",
        "systemd/merchant.toml",
    ] {
        let a = fedcart_client::config::AgentConfig::load(&root.join(m)).unwrap();
        assert!(a.tls.is_some() && a.state_dir.is_some(), "{m}");
    }
}

/// Model selection over gRPC: the run keeps the best version by federated
/// validation RMSE, and its last task hands that version (not the last one)
/// to every agent, which keeps it as the model it serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_end_up_holding_the_best_version_by_validation_not_the_last() {
    use fedcart_common::model::mf::MfData;
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../data/ml-latest-small/ratings.csv");
    let rows: Vec<_> = movielens::load_ratings(&path)
        .unwrap()
        .into_iter()
        .filter(|r| r.user.len() <= 2)
        .collect();
    let fed = movielens::explicit_federation(&rows, 2, 0.2, 9);
    let catalogue = &fed.catalogue;
    let merchants: Vec<_> = movielens::partition_users(&rows, 2, 9)
        .iter()
        .enumerate()
        .map(|(k, users)| {
            let train = movielens::rows_of(&fed.train, users);
            let (train, valid) = movielens::validation_split(&train, false, 9);
            let test = movielens::rows_of(&fed.test, users);
            fedcart_common::train::LocalData {
                merchant_id: format!("m{k}"),
                mf: Some(MfData::with_validation(&train, &valid, &test, catalogue)),
                ..Default::default()
            }
        })
        .collect();
    let mut run = churn_run("mf-best", 8, 2, 2);
    // A large step without a penalty overfits after a few rounds, so the
    // best version by validation comes before the last one.
    run.model = ModelSpec::Mf {
        num_items: catalogue.len(),
        factors: 8,
        hyper: MfHyper {
            learning_rate: 0.05,
            reg_factors: 0.0,
            reg_bias: 0.0,
            epochs: 5,
            ..Default::default()
        },
    };
    run.early_stopping = Some(fedcart_coordinator::config::EarlyStopping { patience: 3 });
    let store = tempfile::tempdir().unwrap();
    let states = tempfile::tempdir().unwrap();
    let coord = start_coordinator(&store.path().join("c.redb"), run, 0).await;
    let shared = coord.shared.clone();
    let (recorders, agents): (Vec<_>, Vec<_>) = merchants
        .iter()
        .map(|m| {
            let dir = states.path().join(&m.merchant_id);
            TopRecorder::agent(coord.addr, m.clone(), dir, "mf")
        })
        .unzip();
    coord.wait_finished().await.unwrap();
    for a in agents {
        a.stop().await;
    }
    let history = shared.history().unwrap();
    let evals: Vec<_> = history
        .iter()
        .filter(|r| r.kind == fedcart_common::task::TaskKind::Evaluate)
        .collect();
    // What `score` and `recommend` read, seen as each task arrived, was
    // only ever a version that was the best so far when it was evaluated
    // (it was the last trained one during the run). The run stops early,
    // so no evaluation of its last version hands that one out.
    let mut selected = std::collections::BTreeSet::new();
    let mut best_so_far = f64::INFINITY;
    for r in &evals[..evals.len() - 1] {
        if r.metrics["val_rmse"] < best_so_far {
            best_so_far = r.metrics["val_rmse"];
            selected.insert(r.base_version);
        }
    }
    for r in &recorders {
        let seen = r.seen.lock().unwrap();
        assert!(seen.len() > evals.len(), "{seen:?}");
        assert!(
            seen.iter().flatten().all(|v| selected.contains(v)),
            "tops seen {seen:?}, versions ever selected {selected:?}"
        );
    }
    let (best, best_rmse) =
        evals[..evals.len() - 1]
            .iter()
            .fold((0, f64::INFINITY), |(b, v), r| {
                let x = r.metrics["val_rmse"];
                if x < v { (r.base_version, x) } else { (b, v) }
            });
    let latest = evals[evals.len() - 2].base_version;
    assert!(
        best < latest,
        "best {best} (val_rmse {best_rmse}) vs latest {latest}"
    );
    // The last task evaluated the best version with the users it was measured with.
    let serving = evals.last().unwrap();
    assert_eq!(serving.base_version, best);
    let measured = evals.iter().find(|r| r.base_version == best).unwrap();
    assert_eq!(serving.metrics["val_rmse"], measured.metrics["val_rmse"]);
    let params = shared.model(best).unwrap().unwrap();
    for m in &merchants {
        let state = StateDir::open(states.path().join(&m.merchant_id)).unwrap();
        let (meta, kept) = state.load_global("mf").unwrap().unwrap();
        assert_eq!(meta.version, best, "{}", m.merchant_id);
        assert_eq!(&kept, params.as_ref());
    }
}

/// Records the version at the top of an agent's state directory (what
/// `score` and `recommend` answer from) as each task arrives.
struct TopRecorder {
    dir: std::path::PathBuf,
    family: &'static str,
    seen: std::sync::Mutex<Vec<Option<u64>>>,
}

impl TopRecorder {
    /// An agent of `data` whose state is `dir`, recording its top.
    fn agent(
        addr: std::net::SocketAddr,
        data: fedcart_common::train::LocalData,
        dir: std::path::PathBuf,
        family: &'static str,
    ) -> (std::sync::Arc<Self>, AgentHandle) {
        let r = std::sync::Arc::new(TopRecorder {
            dir,
            family,
            seen: Default::default(),
        });
        let mut a = Agent::new(format!("http://{addr}"), data)
            .with_state(StateDir::open(&r.dir).unwrap())
            .unwrap();
        a.backoff.initial_ms = 20;
        a.observer = Some(r.clone());
        (r, spawn_configured(a))
    }
}

impl fedcart_client::agent::TaskObserver for TopRecorder {
    fn on_task(&self, _task_id: &str) -> fedcart_client::agent::TaskDecision {
        let top = StateDir::open(&self.dir)
            .unwrap()
            .load_global(self.family)
            .unwrap()
            .map(|(meta, _)| meta.version);
        self.seen.lock().unwrap().push(top);
        fedcart_client::agent::TaskDecision::Accept
    }
}

/// A version that becomes the best mid-run reaches the top (where `score`
/// reads) at the next evaluation, which names it the best; each version
/// evaluated meanwhile waits as the run's candidate; the evaluation of the
/// last version hands it out. The top is never a version no evaluation
/// selected, before the hand-out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_selected_mid_run_is_served_from_the_next_evaluation() {
    let split = telco_split(2, 3);
    let store = tempfile::tempdir().unwrap();
    let states = tempfile::tempdir().unwrap();
    let rounds = 6;
    let coord = start_coordinator(
        &store.path().join("c.redb"),
        churn_run("mid", rounds, 2, 2),
        0,
    )
    .await;
    let shared = coord.shared.clone();
    let (recorders, agents): (Vec<_>, Vec<_>) = (0..2)
        .map(|k| {
            let data = load_merchant(&format!("m{k}"), &split.files[k]);
            TopRecorder::agent(
                coord.addr,
                data,
                states.path().join(format!("m{k}")),
                "churn",
            )
        })
        .unzip();
    coord.wait_finished().await.unwrap();
    for a in agents {
        a.stop().await;
    }
    let history = shared.history().unwrap();
    let mut selected = std::collections::BTreeSet::new();
    let mut best_so_far = f64::NEG_INFINITY;
    for r in history
        .iter()
        .filter(|r| r.kind == fedcart_common::task::TaskKind::Evaluate && r.base_version < rounds)
    {
        if r.metrics["val_auc"] > best_so_far {
            best_so_far = r.metrics["val_auc"];
            selected.insert(r.base_version);
        }
    }
    let served = shared.best().expect("selects by val_auc").version;
    for r in &recorders {
        let seen: Vec<u64> = r.seen.lock().unwrap().iter().flatten().copied().collect();
        // The last version is held from its hand-out until the serving of
        // the best, if it is not the best.
        assert!(
            seen.iter().all(|v| selected.contains(v) || *v == rounds),
            "tops seen {seen:?}, versions selected before the last {selected:?}"
        );
        // Promoted from the candidate: neither the first nor the handed-out version.
        assert!(
            seen.iter().any(|&v| v > 1 && v < rounds),
            "tops seen {seen:?}, selected {selected:?}"
        );
        let (meta, _) = StateDir::open(&r.dir)
            .unwrap()
            .load_global("churn")
            .unwrap()
            .unwrap();
        assert_eq!(meta.version, served, "the top ends on the served version");
    }
}

/// Abandons every task pushed to it (a merchant that keeps dropping out).
struct AbandonAll;

impl fedcart_client::agent::TaskObserver for AbandonAll {
    fn on_task(&self, _task_id: &str) -> fedcart_client::agent::TaskDecision {
        fedcart_client::agent::TaskDecision::Abandon
    }
}

/// A run that never commits a version (its quorum fails once and it gives
/// up) must not replace the model `score` and `recommend` answer from: the
/// agent keeps the untrained version 0 it downloaded under the run's own
/// directory only, and its top still holds the last run's trained version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_that_never_trained_leaves_the_served_model_alone() {
    let states = tempfile::tempdir().unwrap();
    let state = |k: usize| states.path().join(format!("m{k}"));
    let merchant = |k: usize| fedcart_common::train::LocalData {
        merchant_id: format!("m{k}"),
        ..Default::default()
    };
    let noop_run = |id: &str, rounds: u64| {
        let mut run = churn_run(id, rounds, 2, 2);
        run.model = ModelSpec::Noop { dim: 8 };
        run.evaluate = false;
        run
    };
    // A run that trains: the agents' tops hold its last version, 2 (the
    // run does not evaluate between rounds, but its final version is handed
    // out in one evaluation task).
    let store = tempfile::tempdir().unwrap();
    let coord = start_coordinator(&store.path().join("c.redb"), noop_run("base", 2), 0).await;
    let agents: Vec<_> = (0..2)
        .map(|k| spawn_with_state(coord.addr, merchant(k), &state(k)))
        .collect();
    coord.wait_finished().await.unwrap();
    for a in agents {
        a.stop().await;
    }
    let top = |k: usize| {
        let (meta, _) = StateDir::open(state(k))
            .unwrap()
            .load_global("noop")
            .unwrap()
            .unwrap();
        (meta.run_id, meta.version)
    };
    assert_eq!(top(0), ("base".to_owned(), 2));

    // A run whose first round loses one of its two merchants and gives up.
    let store = tempfile::tempdir().unwrap();
    let mut run = noop_run("never", 2);
    run.max_attempts = 1;
    let coord = start_coordinator(&store.path().join("c.redb"), run, 0).await;
    let m0 = spawn_with_state(coord.addr, merchant(0), &state(0));
    let mut dropper = Agent::new(format!("http://{}", coord.addr), merchant(1))
        .with_state(StateDir::open(state(1)).unwrap())
        .unwrap();
    dropper.backoff.initial_ms = 20;
    dropper.observer = Some(std::sync::Arc::new(AbandonAll));
    let m1 = spawn_configured(dropper);
    let shared = coord.shared.clone();
    // Giving up ends the task loop with the stop as its error.
    let e = coord.wait_finished().await.unwrap_err();
    assert!(format!("{e:#}").contains("quorum is 2"), "{e:#}");
    assert!(
        matches!(
            shared.stopped(),
            Some(fedcart_coordinator::engine::RunStop::GaveUp { .. })
        ),
        "{:?}",
        shared.stopped()
    );
    m0.stop().await;
    m1.stop().await;
    // Merchant 0 did download the new run's version 0 ...
    let (meta, _) = StateDir::open(state(0))
        .unwrap()
        .run("never")
        .unwrap()
        .load_global("noop")
        .unwrap()
        .unwrap();
    assert_eq!(meta.version, 0);
    // ... and still serves the trained one.
    assert_eq!(top(0), ("base".to_owned(), 2));
    assert_eq!(top(1), ("base".to_owned(), 2));
}
