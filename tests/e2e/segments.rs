//! Customer segmentation as ordinary federated tasks over gRPC and mutual
//! TLS: a real coordinator runs the whole k-means pipeline as rounds (the
//! statistics step, the candidate initialisation, the choice of k by the
//! federated inertia elbow, the chosen k's Lloyd rounds), real agents with
//! certificates answer under secure aggregation with bound keys, and the
//! result equals the plaintext in-process run of the same pipeline: the
//! same k, centres within the secure ring's quantisation, every customer in
//! the same segment. Each agent then writes its `segments.csv` offline.

use std::path::{Path, PathBuf};

use fedcart_client::agent::Agent;
use fedcart_client::config::AgentConfig;
use fedcart_client::data::CustomerTable;
use fedcart_client::state::StateDir;
use fedcart_common::data::standardize::Standardizer;
use fedcart_common::federation::aggregate::SumAccumulator;
use fedcart_common::model::kmeans;
use fedcart_common::model::segments::{Phase, Segmentation};
use fedcart_common::task::{ModelSpec, TaskKind, TaskSpec};
use fedcart_common::train::{LocalData, run_task};
use fedcart_coordinator::certs::{self, CertDir};
use fedcart_coordinator::server::{ServeOptions, start_with};
use fedcart_coordinator::tls::{TlsFiles, Transport};
use fedcart_tests::*;
use tokio::net::TcpListener;

use crate::secure::secure_settings;
use crate::secure_keys::{client_tls, identity};

/// Merchants: the bundled CDNOW log's first customers split by id modulo 3.
const MERCHANTS: usize = 3;
/// Customers taken from the log (ids 1 to 9,999 of 23,570), to keep the
/// test a few seconds long in the dev profile.
const CUSTOMERS: usize = 10_000;
/// The k tried.
const KS: [usize; 4] = [2, 3, 4, 5];

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

/// Splits the CDNOW log into one orders export per merchant and runs each
/// through `fedcart-client prepare` (RFM features, as a merchant would);
/// returns each merchant's `features.csv`.
fn prepared(dir: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string(repo("data/cdnow/CDNOW_master.txt")).unwrap();
    let mut lines = text.lines();
    let header = lines.next().unwrap();
    let mut parts = vec![format!("{header}\n"); MERCHANTS];
    for line in lines {
        let customer: usize = line.split_whitespace().next().unwrap().parse().unwrap();
        if customer >= CUSTOMERS {
            continue;
        }
        parts[customer % MERCHANTS].push_str(line);
        parts[customer % MERCHANTS].push('\n');
    }
    parts
        .iter()
        .enumerate()
        .map(|(m, orders)| {
            let file = dir.join(format!("orders-m{m}.txt"));
            std::fs::write(&file, orders).unwrap();
            let out = dir.join(format!("prepared-m{m}"));
            fedcart_client::prepare::run(&fedcart_client::prepare::PrepareArgs {
                orders: file,
                mapping: Some(repo("client/examples/cdnow-mapping.toml")),
                customer_col: None,
                item_col: None,
                timestamp_col: None,
                timestamp_format: None,
                quantity_col: None,
                amount_col: None,
                amount_is: None,
                rating_col: None,
                merchant_col: None,
                delimiter: None,
                decimal: None,
                cutoff: "1997-09-30".into(),
                churn_window_days: 180,
                trend_window_days: 90,
                on_bad_row: fedcart_common::data::orders::BadRowPolicy::Fail,
                out: out.clone(),
            })
            .unwrap();
            out.join("features.csv")
        })
        .collect()
}

fn config(id: &str, url: &str, features: &Path, state: PathBuf) -> AgentConfig {
    let mut cfg = agent_config(id, "127.0.0.1:1".parse().unwrap(), features);
    cfg.coordinator = url.into();
    cfg.data.schema = Some(fedcart_client::prepare::features_schema());
    cfg.state_dir = Some(state);
    cfg
}

fn model(num_features: usize) -> ModelSpec {
    ModelSpec::Segments {
        num_features,
        ks: KS.to_vec(),
        choose_rounds: 5,
        lloyd_rounds: 20,
        exchange: Default::default(),
    }
}

/// The same pipeline in-process, every exchange a plain sum (as the
/// engine's plaintext path): the final state and the standardiser.
fn plaintext(spec: &ModelSpec, merchants: &mut [LocalData], seed: u64) -> (Vec<f32>, Standardizer) {
    let ids: Vec<String> = merchants.iter().map(|m| m.merchant_id.clone()).collect();
    let mut task = TaskSpec {
        kind: TaskKind::Stats,
        model: spec.clone(),
        sgd: Default::default(),
        seed,
        round: 0,
        standardizer: None,
        dp: None,
        best_version: None,
    };
    let mut acc = SumAccumulator::new(task.update_len(), 0);
    for m in merchants.iter_mut() {
        acc.add(&run_task(&task, &[], m).unwrap().update.unwrap())
            .unwrap();
    }
    let scaler = Standardizer::from_moments(&acc.mean_delta(&Default::default()));
    task.standardizer = Some(scaler.clone());
    task.kind = TaskKind::Train;
    let mut global = spec.initial_params(seed);
    while !spec.model().analysis().unwrap().complete(&global) {
        task.round += 1;
        task.model = spec.for_task(&global, &ids).unwrap();
        let mut acc = SumAccumulator::new(task.update_len(), 0);
        for m in merchants.iter_mut() {
            acc.add(&run_task(&task, &global, m).unwrap().update.unwrap())
                .unwrap();
        }
        let m = task.model.model();
        global = m
            .analysis()
            .unwrap()
            .next_version(&global, acc.sum_values(), acc.total_weight())
            .unwrap();
    }
    (global, scaler)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secure_segmentation_over_mtls_equals_the_plaintext_pipeline_and_agents_write_their_segments()
 {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let features = prepared(dir.path());
    let ca = CertDir::new(dir.path().join("pki"));
    certs::init(&ca, &["localhost".into()]).unwrap();
    let files = TlsFiles::in_dir(dir.path().join("pki"));
    let ids: Vec<String> = (0..MERCHANTS).map(|m| format!("m{m}")).collect();
    for id in &ids {
        certs::issue(&ca, id).unwrap();
        certs::allow(&files.access, id).unwrap();
    }
    let num_features = fedcart_client::prepare::features_schema().num_features();
    let spec = model(num_features);
    let mut run = churn_run("e2e-segments", 0, MERCHANTS, MERCHANTS);
    run.model = spec.clone();
    run.rounds = spec.model().analysis().unwrap().max_versions().unwrap();
    run.evaluate = false;
    run.secagg = Some(secure_settings(1.0));
    run.validate().unwrap();
    let coord = start_with(
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
        &dir.path().join("c.redb"),
        run.clone(),
        std::time::Duration::from_millis(500),
        ServeOptions {
            transport: Transport::Tls(files),
            ..ServeOptions::insecure()
        },
    )
    .await
    .expect("TLS coordinator starts");
    let url = format!("https://localhost:{}", coord.addr.port());

    let mut configs = Vec::new();
    let mut merchants = Vec::new();
    let mut handles = Vec::new();
    for (id, file) in ids.iter().zip(&features) {
        let cfg = config(id, &url, file, dir.path().join(format!("state-{id}")));
        let data = fedcart_client::data::load(&cfg).unwrap();
        merchants.push(data.clone());
        // Certified agents: the default policy, keys bound to certificates.
        let mut agent = Agent::new(url.clone(), data)
            .with_key_identity(identity(&ca, id))
            .with_state(StateDir::open(cfg.state_dir.clone().unwrap()).unwrap())
            .unwrap();
        agent.tls = Some(client_tls(&ca, id));
        agent.backoff = cfg.backoff.clone();
        handles.push(spawn_configured(agent));
        configs.push(cfg);
    }
    let (shared, history) = finish(coord, handles).await;

    // The statistics step, then every exchange one secure round of all
    // three merchants, then one evaluation that handed the state out.
    let trains = committed_trains(&history, MERCHANTS);
    // Candidates, the choice's 5 + 1 Lloyd rounds, then the chosen k's.
    assert!(trains.len() >= 7, "{history:?}");
    let published: Vec<_> = history
        .iter()
        .filter(|r| r.kind == TaskKind::Evaluate)
        .collect();
    assert_eq!(published.len(), 1);
    assert_eq!(published[0].reported.len(), MERCHANTS);

    let state = shared
        .model(trains.len() as u64)
        .unwrap()
        .expect("final version");
    let secure = Segmentation::decode(&state, num_features, &KS).unwrap();
    assert_eq!(secure.phase, Phase::Done);
    let (plain_state, scaler) = plaintext(&spec, &mut merchants, run.seed);
    let plain = Segmentation::decode(&plain_state, num_features, &KS).unwrap();
    assert_eq!(plain.phase, Phase::Done);
    assert_eq!(secure.chosen, plain.chosen);
    assert_eq!(secure.updates, plain.updates);
    let (k, want) = plain.chosen_centres().unwrap();
    let (_, got) = secure.chosen_centres().unwrap();
    let worst = want
        .iter()
        .zip(got)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(worst < 1e-3, "largest centre difference {worst}");
    for (a, b) in plain.curve.iter().zip(&secure.curve) {
        assert!(
            (a - b).abs() <= 1e-3 * a.abs(),
            "{:?} {:?}",
            plain.curve,
            secure.curve
        );
    }

    // Each agent kept the final state and labels its customers with it:
    // the plaintext run's segments, customer for customer.
    let mut sizes = vec![0usize; k];
    for cfg in &configs {
        let out = dir.path().join(format!("{}-segments.csv", cfg.merchant_id));
        let table = CustomerTable::from_config(cfg).unwrap();
        let st = StateDir::open(cfg.state_dir.clone().unwrap()).unwrap();
        let mut file = std::fs::File::create(&out).unwrap();
        let n = fedcart_client::segments::segments(&st, &table, &mut file, &out).unwrap();
        let rows = table.load().unwrap();
        assert_eq!(n, rows.ids.len());
        let expected = kmeans::assign(&scaler.transform(&rows.x), want, k);
        let text = std::fs::read_to_string(&out).unwrap();
        let mut written = csv::Reader::from_reader(text.as_bytes());
        let mut count = 0;
        for (record, (id, (c, _))) in written.records().zip(rows.ids.iter().zip(&expected)) {
            let record = record.unwrap();
            assert_eq!(&record[0], id.as_str());
            assert_eq!(record[1].parse::<usize>().unwrap(), *c, "customer {id}");
            sizes[*c] += 1;
            count += 1;
        }
        assert_eq!(count, n);
    }
    // Every segment holds customers.
    assert!(sizes.iter().all(|&s| s > 0), "{sizes:?}");
}
