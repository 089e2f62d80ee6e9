//! What leaves an agent is checked on the wire: every byte the MF agents send
//! during federated rounds passes through a recording TCP proxy, and no user
//! factor row of any merchant appears in it; with secure aggregation on, no
//! window of an agent's plaintext update does either.

use std::sync::{Arc, Mutex};

use fedcart_common::federation::update::f32s_to_le;
use fedcart_common::model::mf::MfHyper;
use fedcart_common::model::mf::movielens;
use fedcart_common::task::ModelSpec;
use fedcart_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Forwards connections on a loopback port to `upstream`, appending every
/// client→server byte to `sent`.
async fn recording_proxy(
    upstream: std::net::SocketAddr,
    sent: Arc<Mutex<Vec<u8>>>,
) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let sent = Arc::clone(&sent);
            tokio::spawn(async move {
                let server = TcpStream::connect(upstream).await.unwrap();
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let up = async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n) = cr.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        sent.lock().unwrap().extend_from_slice(&buf[..n]);
                        if sw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                };
                let down = async move {
                    let _ = tokio::io::copy(&mut sr, &mut cw).await;
                };
                tokio::join!(up, down);
            });
        }
    });
    addr
}

/// How many 32-byte windows of `bytes` (eight little-endian f32s: a row of
/// factors, or a window of an update) are among `needles`.
fn rows_found(bytes: &[u8], needles: &std::collections::HashSet<Vec<u8>>) -> usize {
    bytes.windows(32).filter(|w| needles.contains(*w)).count()
}

/// What a recorded MF run returns: the federation, the coordinator's store
/// (kept alive), the coordinator, the bytes agents sent and the proxy's
/// address for them.
type RecordedRun = (
    movielens::Federated,
    tempfile::TempDir,
    fedcart_coordinator::server::Running,
    Arc<Mutex<Vec<u8>>>,
    std::net::SocketAddr,
    fedcart_coordinator::config::RunConfig,
);

/// Three MovieLens merchants and a 3-round MF run `name` (k = 8, `hyper`)
/// on a real coordinator, behind a proxy that records every byte the agents
/// send.
async fn recorded_mf_run(name: &str, hyper: MfHyper) -> RecordedRun {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../data/ml-latest-small/ratings.csv");
    let rows = movielens::load_ratings(&path).unwrap();
    let fed = movielens::explicit_federation(&rows, 3, 0.2, 4);
    let mut run = churn_run(name, 3, 3, 3);
    run.model = ModelSpec::Mf {
        num_items: fed.catalogue.len(),
        factors: 8,
        hyper,
    };
    let store = tempfile::tempdir().unwrap();
    let coord = start_coordinator(&store.path().join("c.redb"), run.clone(), 0).await;
    let sent = Arc::new(Mutex::new(Vec::new()));
    let proxy = recording_proxy(coord.addr, Arc::clone(&sent)).await;
    (fed, store, coord, sent, proxy, run)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mf_agents_send_no_user_factor_on_the_wire() {
    // Users solved on validation ratings are served too: they stay home.
    let hyper = MfHyper {
        refit_users: true,
        ..Default::default()
    };
    let (mut fed, _store, coord, sent, proxy, run) = recorded_mf_run("wire", hyper).await;
    validate_every_tenth_rating(&mut fed.merchants);
    let agents: Vec<_> = fed
        .merchants
        .iter()
        .map(|m| spawn_agent(proxy, m.clone()))
        .collect();
    coord.wait_finished().await.unwrap();
    let mut trained = Vec::new();
    for a in agents {
        trained.push(a.stop().await);
    }
    let wire = sent.lock().unwrap().clone();
    // The updates did cross the proxy: in each of three rounds every agent
    // sent at least the rows (bias + 8 factors) of the items it trained on
    // (row-sparse uploads carry only those).
    let rows_sent: usize = fed
        .merchants
        .iter()
        .map(|m| {
            let items: std::collections::BTreeSet<u32> =
                m.mf.as_ref()
                    .unwrap()
                    .train
                    .iter()
                    .map(|r| r.item)
                    .collect();
            items.len() * 9 * 4
        })
        .sum();
    assert!(
        wire.len() > 3 * rows_sent,
        "captured only {} bytes",
        wire.len()
    );
    let mut needles = std::collections::HashSet::new();
    let mut solved = 0;
    for agent in &trained {
        let state = &agent.data.mf.as_ref().unwrap().state;
        assert_eq!(state.k, 8);
        let served = state.served.as_ref().map(|s| &s.factors[..]);
        solved += usize::from(served.is_some());
        for row in state
            .factors
            .chunks(8)
            .chain(served.unwrap_or_default().chunks(8))
            .filter(|r| r.iter().any(|v| *v != 0.0))
        {
            needles.insert(f32s_to_le(row));
        }
    }
    assert!(solved > 0, "no merchant served solved users");
    let checked = needles.len();
    let leaked = rows_found(&wire, &needles);
    assert_eq!(leaked, 0, "user factor rows found on the wire");
    assert!(checked > 100, "only {checked} user rows checked");
    // The search finds rows that are on the wire: each merchant's first
    // update, recomputed in process from version 0 (the run's initial
    // model) and fresh users, crosses it item row by item row (it planted
    // a row in the capture instead; found by an attacker probe).
    let spec = fedcart_common::task::TaskSpec {
        kind: fedcart_common::task::TaskKind::Train,
        model: run.model.clone(),
        sgd: run.sgd.clone(),
        seed: run.seed,
        round: 1,
        standardizer: None,
        dp: None,
        best_version: None,
    };
    let initial = run.model.initial_params(run.seed);
    let n = fed.catalogue.len();
    let mut sent_rows = std::collections::HashSet::new();
    for m in &fed.merchants {
        let out = fedcart_common::train::run_task(&spec, &initial, &mut m.clone()).unwrap();
        let values = out.update.unwrap().values;
        // [μ, item biases (n), item factors (n × 8)]: the factor rows the
        // merchant trained on moved from version 0's.
        let factors = &values[1 + n..];
        let start = &initial[1 + n..];
        for (row, before) in factors.chunks(8).zip(start.chunks(8)) {
            if row != before {
                sent_rows.insert(f32s_to_le(row));
            }
        }
    }
    assert!(sent_rows.len() > 100, "only {} item rows", sent_rows.len());
    let found = rows_found(&wire, &sent_rows);
    // (A row that straddles two HTTP/2 frames is not contiguous there.)
    assert!(
        found * 100 >= sent_rows.len() * 99,
        "{found} of {} item rows sent in round 1 found on the wire",
        sent_rows.len()
    );
}

/// Runs a two-round federation of the model-free task (seeded random updates)
/// through the recording proxy and counts how many 8-value windows of the
/// agents' plaintext f32 updates occur in their outgoing bytes.
async fn leaked_update_windows(secure: bool) -> (usize, usize) {
    use fedcart_common::task::{TaskKind, TaskSpec};
    use fedcart_common::train::{LocalData, run_task};
    let dim = 2048;
    let mut run = churn_run(&format!("wire-secagg-{secure}"), 2, 3, 3);
    run.model = ModelSpec::Noop { dim };
    run.evaluate = false;
    run.secagg = secure.then(|| crate::secure::secure_settings(1.0));
    let store = tempfile::tempdir().unwrap();
    let coord = start_coordinator(&store.path().join("c.redb"), run.clone(), 0).await;
    let sent = Arc::new(Mutex::new(Vec::new()));
    let proxy = recording_proxy(coord.addr, Arc::clone(&sent)).await;
    let merchants: Vec<LocalData> = (0..3)
        .map(|k| LocalData {
            merchant_id: format!("m{k}"),
            ..Default::default()
        })
        .collect();
    let agents: Vec<_> = merchants
        .iter()
        .map(|m| spawn_agent(proxy, m.clone()))
        .collect();
    coord.wait_finished().await.unwrap();
    for a in agents {
        a.stop().await;
    }
    let wire = sent.lock().unwrap().clone();
    assert!(
        wire.len() > 2 * 3 * dim * 4,
        "captured only {} bytes",
        wire.len()
    );
    // Every agent's plaintext update of both rounds, recomputed in-process.
    let mut needles = std::collections::HashSet::new();
    for round in 1..=2 {
        let spec = TaskSpec {
            kind: TaskKind::Train,
            model: run.model.clone(),
            sgd: run.sgd.clone(),
            seed: run.seed,
            round,
            standardizer: None,
            dp: None,
            best_version: None,
        };
        for m in &merchants {
            let out = run_task(&spec, &[], &mut m.clone()).unwrap();
            let bytes = f32s_to_le(&out.update.unwrap().values);
            needles.extend(
                bytes
                    .chunks(4)
                    .collect::<Vec<_>>()
                    .windows(8)
                    .map(|w| w.concat()),
            );
        }
    }
    let leaked = rows_found(&wire, &needles);
    (leaked, needles.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_secagg_on_no_window_of_a_plaintext_update_leaves_the_agent() {
    let (leaked, checked) = leaked_update_windows(true).await;
    assert!(checked > 10_000, "only {checked} windows checked");
    assert_eq!(leaked, 0, "plaintext update bytes found on the wire");
    // The same capture without secure aggregation does contain them: the
    // check above can fail.
    let (plain_leaked, _) = leaked_update_windows(false).await;
    assert!(
        plain_leaked > 1000,
        "only {plain_leaked} windows found in plaintext mode"
    );
}

/// Agents configured from nothing but their orders exports hash their item
/// ids into the run's rows: no item id of either merchant's export crosses
/// the wire in clear, though their row-sparse updates do (ids of six or more
/// characters are checked; shorter digit strings occur by chance in binary
/// data). Nor does any customer id: each is rewritten in the exports to a
/// marked form (`household-<id>`) that cannot occur by chance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_on_orders_exports_send_no_item_or_customer_id_on_the_wire() {
    let dir = tempfile::tempdir().unwrap();
    let exports = store_exports(dir.path(), &["433", "324"]);
    const MARK: &[u8] = b"household-";
    for e in &exports {
        let text = std::fs::read_to_string(e).unwrap();
        let mut lines = text.lines();
        let mut out = format!("{}\n", lines.next().unwrap());
        for l in lines {
            let (customer, rest) = l.split_once(',').unwrap();
            out.push_str(&format!("household-{customer},{rest}\n"));
        }
        std::fs::write(e, out).unwrap();
    }
    let ids: std::collections::BTreeSet<String> = exports
        .iter()
        .flat_map(|e| {
            let text = std::fs::read_to_string(e).unwrap();
            text.lines()
                .skip(1)
                .map(|l| l.split(',').nth(1).unwrap().to_owned())
                .collect::<Vec<_>>()
        })
        .collect();
    let mut run = churn_run("wire-orders", 2, 2, 2);
    run.evaluate = false;
    run.model = ModelSpec::MfImplicit {
        num_items: 8_192,
        factors: 4,
        hyper: MfHyper::default(),
    };
    let coord = start_coordinator(&dir.path().join("c.redb"), run, 0).await;
    let sent = Arc::new(Mutex::new(Vec::new()));
    let proxy = recording_proxy(coord.addr, Arc::clone(&sent)).await;
    let agents: Vec<_> = exports
        .iter()
        .enumerate()
        .map(|(k, export)| {
            let cfg = orders_agent_config(&format!("m{k}"), proxy, export);
            spawn_configured(fedcart_client::agent::Agent::from_config(&cfg).unwrap())
        })
        .collect();
    coord.wait_finished().await.unwrap();
    for a in agents {
        assert!(a.stop().await.tasks_done >= 2);
    }
    let wire = sent.lock().unwrap().clone();
    // Two rounds of two agents' updates: thousands of touched rows of
    // 5 floats each.
    assert!(
        wire.len() > 4 * 1_000 * 5 * 4,
        "captured only {} bytes",
        wire.len()
    );
    let long: Vec<&String> = ids.iter().filter(|id| id.len() >= 6).collect();
    assert!(long.len() > 3_000, "only {} ids checked", long.len());
    let ids_in = |bytes: &[u8]| {
        let mut found = std::collections::BTreeSet::new();
        for len in long
            .iter()
            .map(|id| id.len())
            .collect::<std::collections::BTreeSet<_>>()
        {
            let of_len: std::collections::HashSet<&[u8]> = long
                .iter()
                .filter(|id| id.len() == len)
                .map(|id| id.as_bytes())
                .collect();
            found.extend(
                bytes
                    .windows(len)
                    .filter(|w| of_len.contains(w))
                    .map(|w| String::from_utf8_lossy(w).into_owned()),
            );
        }
        found
    };
    let found = ids_in(&wire);
    assert!(found.is_empty(), "item ids on the wire: {found:?}");
    assert!(
        !wire.windows(MARK.len()).any(|w| w == MARK),
        "a customer id on the wire"
    );
    // The search does find an id that is there.
    let mut planted = wire.clone();
    planted.extend_from_slice(long[long.len() / 2].as_bytes());
    assert_eq!(ids_in(&planted).len(), 1);
}

/// A merchant of the explicit MovieLens federation with every tenth
/// training rating set aside as its validation slice (as agents carve one).
fn with_validation(m: &fedcart_common::train::LocalData) -> fedcart_common::train::LocalData {
    let mut m = m.clone();
    let mf = m.mf.as_mut().unwrap();
    let all = std::mem::take(&mut mf.train);
    for (i, r) in all.into_iter().enumerate() {
        if i % 10 == 0 {
            mf.valid.push(r);
        } else {
            mf.train.push(r);
        }
    }
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn personalised_rows_never_leave_the_agent_and_recommend_serves_the_copy_that_won() {
    use fedcart_client::recommend::{Recommender, ServedCopy};
    use fedcart_client::state::StateDir;
    let (fed, _store, coord, sent, proxy, _) = recorded_mf_run("pers", MfHyper::default()).await;
    let states = tempfile::tempdir().unwrap();
    let personalise = fedcart_client::config::PersonaliseConfig {
        epochs: 10,
        proximal: Some(0.0),
    };
    let agents: Vec<_> = fed
        .merchants
        .iter()
        .map(|m| {
            let dir = states.path().join(&m.merchant_id);
            let mut agent =
                fedcart_client::agent::Agent::new(format!("http://{proxy}"), with_validation(m))
                    .with_policy(fedcart_client::policy::PrivacyPolicy::without_key_binding())
                    .with_state(StateDir::open(&dir).unwrap())
                    .unwrap();
            agent.personalise = Some(personalise.clone());
            // Returns once the run's end is announced and handled.
            agent.exit_on_run_end = true;
            spawn_configured(agent)
        })
        .collect();
    coord.wait_finished().await.unwrap();
    let mut done = Vec::new();
    for a in agents {
        done.push(a.task.await.unwrap());
    }
    let wire = sent.lock().unwrap().clone();
    let mut needles = std::collections::HashSet::new();
    let mut kept = 0;
    for agent in &mut done {
        let state = StateDir::open(states.path().join(&agent.data.merchant_id))
            .unwrap()
            .run("pers")
            .unwrap();
        let (meta, global) = state.load_global("mf").unwrap().unwrap();
        let (personal, copy) = state.load_personal().unwrap().expect("personalised");
        assert_eq!(
            (personal.run_id.as_str(), personal.version),
            ("pers", meta.version)
        );
        assert_eq!(personal.metric, "val_rmse");
        let (g, p) = (personal.global_val.unwrap(), personal.personal_val.unwrap());
        assert_eq!(personal.kept, p < g, "kept only where validation improved");
        assert_eq!(copy.is_some(), personal.kept);
        // `recommend` and `serve` rank with the copy that won.
        let served = Recommender::load(&state, fed.catalogue.len()).unwrap();
        let expected = if personal.kept {
            ServedCopy::Personalised
        } else {
            ServedCopy::Global
        };
        assert_eq!(served.copy, expected);
        kept += usize::from(personal.kept);
        // The fine-tuned item rows, kept or not, replayed from the agent's
        // final state (the fine-tune is deterministic).
        let mut spec = meta.spec.clone();
        spec.round = meta.version;
        let settings = fedcart_common::model::mf::Personalise {
            epochs: 10,
            proximal: 0.0,
        };
        let out =
            fedcart_common::train::personalise(&spec, &global, &mut agent.data, &settings).unwrap();
        // (JSON may round the stored figure in its last bit.)
        assert_eq!(out.kept, personal.kept);
        assert!((out.personal_val - p).abs() < 1e-12);
        if let Some((params, _)) = &copy {
            assert_eq!(params, &out.params);
        }
        let factors = 1 + fed.catalogue.len();
        for (row, base) in out.params[factors..]
            .chunks(8)
            .zip(global[factors..].chunks(8))
            .filter(|(r, b)| r != b)
        {
            assert_ne!(row, base);
            needles.insert(f32s_to_le(row));
        }
    }
    assert!(
        needles.len() > 100,
        "only {} tuned rows checked",
        needles.len()
    );
    let leaked = rows_found(&wire, &needles);
    assert_eq!(leaked, 0, "personalised item rows found on the wire");
    let mut planted = wire.clone();
    planted.extend_from_slice(needles.iter().next().unwrap());
    let found = rows_found(&planted, &needles);
    assert_eq!(found, 1, "a planted item row was not found");
    // Ten free epochs on 90 % of a merchant's ratings beat three rounds of
    // one epoch on validation somewhere.
    assert!(kept > 0, "no merchant kept its copy");
}

/// The bytes three Telco merchants' agents under `policy` send while a
/// one-round secure churn run `name` goes through the recording proxy, and
/// each merchant's churn row count.
async fn joined_under(
    policy: fedcart_client::policy::PrivacyPolicy,
    name: &str,
) -> (Vec<u8>, Vec<u64>) {
    let split = telco_split(3, 5);
    let mut run = churn_run(name, 1, 3, 3);
    run.secagg = Some(crate::secure::secure_settings(1.0));
    let store = tempfile::tempdir().unwrap();
    let coord = start_coordinator(&store.path().join("c.redb"), run, 0).await;
    let sent = Arc::new(Mutex::new(Vec::new()));
    let proxy = recording_proxy(coord.addr, Arc::clone(&sent)).await;
    let merchants: Vec<_> = split
        .files
        .iter()
        .enumerate()
        .map(|(k, f)| load_merchant(&format!("m{k}"), f))
        .collect();
    let agents: Vec<_> = merchants
        .iter()
        .map(|m| {
            let agent = fedcart_client::agent::Agent::new(format!("http://{proxy}"), m.clone())
                .with_policy(policy.clone());
            spawn_configured(agent)
        })
        .collect();
    coord.wait_finished().await.unwrap();
    for a in agents {
        a.stop().await;
    }
    let rows = merchants.iter().map(|m| m.examples()["churn"]).collect();
    let wire = sent.lock().unwrap().clone();
    (wire, rows)
}

/// How often `JoinRequest.examples` carries `("churn", n)` in `wire`: the
/// map entry as protobuf encodes it (key 1, value 2).
fn churn_entries(wire: &[u8], n: u64) -> usize {
    let mut entry = vec![0x0a, 5];
    entry.extend_from_slice(b"churn");
    entry.push(0x10);
    let mut v = n;
    while v >= 0x80 {
        entry.push((v as u8 & 0x7f) | 0x80);
        v >>= 7;
    }
    entry.push(v as u8);
    wire.windows(entry.len()).filter(|w| *w == entry).count()
}

/// How often `n` occurs in `wire` as a little-endian f64 (an upload
/// header's `weight`).
fn f64_entries(wire: &[u8], n: u64) -> usize {
    let bytes = (n as f64).to_le_bytes();
    wire.windows(8).filter(|w| *w == bytes).count()
}

/// An agent whose privacy policy requires secure aggregation tells the
/// coordinator which data families it holds when it joins, not how many
/// rows: on the wire, each of its `JoinRequest.examples` entries for
/// `churn` is 1, and its row count appears in none, nor in the header of a
/// masked upload (the statistics step's and the training round's). The same merchants
/// under a policy without that requirement send their row counts, so the
/// check can fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_protective_policy_advertises_which_families_a_merchant_holds_not_how_many_rows() {
    use fedcart_client::policy::PrivacyPolicy;
    let protective = PrivacyPolicy {
        require_secure_aggregation: true,
        ..PrivacyPolicy::without_key_binding()
    };
    let (wire, rows) = joined_under(protective, "wire-join-coarse").await;
    assert!(rows.iter().all(|&n| n > 1000), "{rows:?}");
    assert!(churn_entries(&wire, 1) >= 3, "one join per agent at least");
    for n in &rows {
        assert_eq!(churn_entries(&wire, *n), 0, "row count {n} on the wire");
        // Nor as a masked upload's header weight (an f64): the statistics
        // step's masked upload carried the merchant's row count in clear.
        assert_eq!(f64_entries(&wire, *n), 0, "row count {n} as a weight");
    }
    // The search finds such a weight where one is: planted in the capture.
    let mut planted = wire.clone();
    planted.extend_from_slice(&(rows[0] as f64).to_le_bytes());
    assert_eq!(f64_entries(&planted, rows[0]), 1);
    let (wire, rows) = joined_under(PrivacyPolicy::without_key_binding(), "wire-join-full").await;
    for n in &rows {
        assert!(churn_entries(&wire, *n) >= 1, "row count {n} not found");
    }
    assert_eq!(churn_entries(&wire, 1), 0);
}
