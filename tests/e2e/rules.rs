//! Frequent itemsets as an ordinary federated task over gRPC: a real
//! coordinator runs Apriori's levels as rounds, real agents count their own
//! baskets (read from their orders exports) under secure aggregation, and
//! the committed itemsets equal the plaintext in-process result exactly;
//! every agent then writes its "bought together" lists offline.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use fedcart_client::agent::Agent;
use fedcart_client::config::AgentConfig;
use fedcart_client::state::StateDir;
use fedcart_common::data::orders::{OrdersMapping, TimestampFormat};
use fedcart_common::federation::aggregate::SumAccumulator;
use fedcart_common::itemsets::{self, Apriori};
use fedcart_common::task::{ModelSpec, TaskKind};
use fedcart_tests::*;

use crate::secure::secure_settings;

/// The three smallest stores of the bundled grocery log (2,678 baskets).
const STORES: [&str; 3] = ["433", "324", "363"];
/// Minimum support: 231 frequent items and 51 frequent pairs on those stores.
const MIN_COUNT: u64 = 10;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

/// Writes each store's lines of the grocery log to its own export, and the
/// shared catalogue (every item id of the three stores, sorted).
fn exports(dir: &Path) -> (Vec<PathBuf>, PathBuf, usize) {
    let text = std::fs::read_to_string(repo("data/grocery/orders.csv")).unwrap();
    let mut lines = text.lines();
    let header = lines.next().unwrap();
    assert_eq!(header, "customer,item,timestamp,quantity,amount,merchant");
    let mut by_store: BTreeMap<&str, String> = BTreeMap::new();
    let mut items = BTreeSet::new();
    for line in lines {
        let fields: Vec<&str> = line.split(',').collect();
        if STORES.contains(&fields[5]) {
            let out = by_store
                .entry(fields[5])
                .or_insert_with(|| format!("{header}\n"));
            out.push_str(line);
            out.push('\n');
            items.insert(fields[1]);
        }
    }
    let files = STORES
        .iter()
        .map(|s| {
            let path = dir.join(format!("store-{s}.csv"));
            std::fs::write(&path, &by_store[s]).unwrap();
            path
        })
        .collect();
    let catalogue = dir.join("catalogue.txt");
    let list: Vec<&str> = items.iter().copied().collect();
    std::fs::write(&catalogue, list.join("\n") + "\n").unwrap();
    (files, catalogue, items.len())
}

fn config(id: &str, addr: std::net::SocketAddr, orders: &Path, catalogue: &Path) -> AgentConfig {
    let mut cfg = agent_config(id, addr, Path::new("unused.csv"));
    cfg.data.churn_csv = None;
    cfg.data.orders_csv = Some(orders.into());
    cfg.data.catalogue = Some(catalogue.into());
    cfg.data.orders = Some(OrdersMapping {
        customer: "customer".into(),
        item: Some("item".into()),
        timestamp: "timestamp".into(),
        timestamp_format: TimestampFormat::Auto,
        quantity: Some("quantity".into()),
        amount: "amount".into(),
        amount_is: Default::default(),
        rating: None,
        merchant: None,
        delimiter: Default::default(),
        decimal: Default::default(),
    });
    cfg
}

/// Apriori over the same merchants in-process, every level a plain sum.
fn plaintext(baskets: &[Vec<itemsets::Basket>], num_items: usize) -> Apriori {
    let mut a = Apriori::new(num_items, MIN_COUNT, 0);
    while !a.finished() {
        let mut acc = SumAccumulator::new(a.candidates().len(), 0);
        for b in baskets {
            acc.add(&itemsets::count_update(b, a.candidates())).unwrap();
        }
        a.on_sum(acc.sum_values(), acc.total_weight()).unwrap();
    }
    a
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secure_itemsets_over_grpc_equal_the_plaintext_result_and_agents_write_their_lists() {
    let dir = tempfile::tempdir().unwrap();
    let (files, catalogue, num_items) = exports(dir.path());
    let mut run = churn_run("e2e-itemsets", 10, STORES.len(), STORES.len());
    run.model = ModelSpec::Itemsets {
        num_items,
        min_count: MIN_COUNT,
        candidates: 0,
    };
    run.evaluate = false;
    run.secagg = Some(secure_settings(1.0));
    run.validate().unwrap();
    let coord = start_coordinator(&dir.path().join("c.redb"), run, 0).await;
    let mut baskets = Vec::new();
    let mut handles = Vec::new();
    let mut configs = Vec::new();
    for (s, file) in STORES.iter().zip(&files) {
        let mut cfg = config(&format!("store-{s}"), coord.addr, file, &catalogue);
        cfg.state_dir = Some(dir.path().join(format!("state-{s}")));
        let data = fedcart_client::data::load(&cfg).unwrap();
        baskets.push(data.baskets.clone().unwrap());
        // A plaintext agent (no certificate): its policy takes secure
        // rounds without key binding, as `fedcart_tests::spawn_agent`'s.
        let mut agent = Agent::new(cfg.coordinator.clone(), data)
            .with_policy(fedcart_client::policy::PrivacyPolicy::without_key_binding())
            .with_state(StateDir::open(cfg.state_dir.clone().unwrap()).unwrap())
            .unwrap();
        agent.backoff = cfg.backoff.clone();
        handles.push(spawn_configured(agent));
        configs.push(cfg);
    }
    let (shared, history) = finish(coord, handles).await;

    // Every level was one secure round of all three stores, then one
    // evaluation handed the final state out.
    let trains = committed_trains(&history, 3);
    assert!(trains.len() >= 2, "{history:?}");
    let published: Vec<_> = history
        .iter()
        .filter(|r| r.kind == TaskKind::Evaluate)
        .collect();
    assert_eq!(published.len(), 1);
    assert_eq!(published[0].reported.len(), 3);

    let version = trains.len() as u64;
    let state = shared.model(version).unwrap().expect("final version");
    let secure = Apriori::decode(&state, num_items, MIN_COUNT, 0).unwrap();
    let plain = plaintext(&baskets, num_items);
    assert!(secure.finished());
    assert_eq!(secure.total_baskets(), 2_678);
    assert_eq!(secure.frequent(), plain.frequent());
    assert_eq!(secure.total_baskets(), plain.total_baskets());
    let pairs = plain
        .frequent()
        .iter()
        .filter(|f| f.items.len() == 2)
        .count();
    assert_eq!(pairs, 51);

    // Each agent kept the final state; its lists are the global rules from
    // the items it sells.
    let rules = itemsets::rules(plain.frequent(), plain.total_baskets(), 0.1);
    for (cfg, own) in configs.iter().zip(&baskets) {
        let out = dir.path().join(format!("{}-rules.csv", cfg.merchant_id));
        let cat = fedcart_client::data::catalogue(&catalogue).unwrap();
        let state = StateDir::open(cfg.state_dir.clone().unwrap()).unwrap();
        let w = fedcart_client::rules::bought_together(&state, &cat, own, 0.1, 1000, &out).unwrap();
        let sold: std::collections::HashSet<u32> = own.iter().flatten().copied().collect();
        let expected = itemsets::bought_together(&rules, &sold);
        assert!(!expected.is_empty());
        assert_eq!(w.rows, expected.len());
        let text = std::fs::read_to_string(&out).unwrap();
        let mut rows = csv::Reader::from_reader(text.as_bytes());
        let mut written: Vec<(String, String, f64, f64)> = rows
            .records()
            .map(|r| {
                let r = r.unwrap();
                (
                    r[0].to_string(),
                    r[1].to_string(),
                    r[3].parse().unwrap(),
                    r[4].parse().unwrap(),
                )
            })
            .collect();
        written.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        let mut want: Vec<(String, String, f64, f64)> = expected
            .iter()
            .map(|r| {
                let name = |v: &[u32]| {
                    v.iter()
                        .map(|&i| cat.id(i).unwrap())
                        .collect::<Vec<_>>()
                        .join(" ")
                };
                (
                    name(&r.antecedent),
                    name(&r.consequent),
                    r.confidence,
                    r.lift,
                )
            })
            .collect();
        want.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        for (w, e) in written.iter().zip(&want) {
            assert_eq!((&w.0, &w.1), (&e.0, &e.1));
            assert!((w.2 - e.2).abs() < 1e-6 && (w.3 - e.3).abs() < 1e-5);
        }
    }
}
