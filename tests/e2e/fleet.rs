//! `fedcart-client fleet`: one process hosting many real agent sessions, each
//! with its own certificate and connection, against a real coordinator over
//! mutual TLS. The secure rounds run SecAgg+ (degree 4 of 19), so every agent
//! verifies the certificate bindings of exactly the roster entries whose keys
//! it uses, and the committed model must still be the FedAvg of all of them.

use fedcart_client::fleet::{self, FleetArgs, FleetData};
use fedcart_common::federation::strategy::FedAvg;
use fedcart_common::reference;
use fedcart_common::task::{ModelSpec, TaskKind, TaskSpec};
use fedcart_common::train::LocalData;
use fedcart_coordinator::certs::{self, CertDir};
use fedcart_coordinator::config::SecAggSettings;
use fedcart_coordinator::identity::AccessList;
use fedcart_coordinator::server::{ServeOptions, start_with};
use fedcart_coordinator::tls::{TlsFiles, Transport};
use fedcart_tests::{churn_run, committed_trains, init_logs};
use tokio::net::TcpListener;

/// Sessions in the fleet.
const N: usize = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_of_twenty_certified_sessions_completes_two_secure_rounds_and_exits_with_the_run() {
    init_logs();
    let pki = tempfile::tempdir().unwrap();
    let ca = CertDir::new(pki.path());
    certs::init(&ca, &["localhost".into()]).unwrap();
    let files = TlsFiles::in_dir(pki.path());
    let mut access = AccessList::default();
    for k in 0..N {
        // Fleet merchant k of the study is `f<k>`; this fleet hosts 0..N.
        certs::issue(&ca, &format!("f{k}")).unwrap();
        access.allow.push(format!("f{k}"));
    }
    std::fs::write(&files.access, access.to_toml()).unwrap();
    let mut run = churn_run("e2e-fleet", 2, N, N);
    run.model = ModelSpec::Noop { dim: 300 };
    run.evaluate = false;
    run.secagg = Some(SecAggSettings {
        neighbours: Some(4),
        clip: 1.0,
        verify_survivors: false,
        stage_timeout_ms: Some(120_000),
    });
    let store = tempfile::tempdir().unwrap();
    let coord = start_with(
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
        &store.path().join("c.redb"),
        run.clone(),
        std::time::Duration::from_millis(500),
        ServeOptions {
            transport: Transport::Tls(files),
            ..ServeOptions::insecure()
        },
    )
    .await
    .expect("TLS coordinator starts");
    let args = FleetArgs {
        coordinator: format!("https://localhost:{}", coord.addr.port()),
        merchants: N,
        first: 0,
        job_index: None,
        total: None,
        prefix: "f".into(),
        data: FleetData::None,
        partition: "iid".parse().unwrap(),
        seed: 42,
        holdout: 0.2,
        certs: Some(pki.path().to_owned()),
        domain: None,
        exit_when_run_ends: true,
    };
    let agents = fleet::agents(&args).expect("fleet builds");
    // Never signalled: the sessions end because the run announced its end.
    let (_stop, never) = tokio::sync::watch::channel(false);
    let fleet = tokio::spawn(fleet::run(agents, never));
    let shared = coord.shared.clone();
    coord.wait_finished().await.unwrap();
    let agents = fleet.await.unwrap().expect("every session ends cleanly");
    assert!(
        agents.iter().all(|a| a.tasks_done == 3),
        "each session served both rounds and the final version's evaluation"
    );
    let history = shared.history().unwrap();
    assert_eq!(committed_trains(&history, N).len(), 2, "{history:?}");

    let merchants: Vec<LocalData> = (0..N)
        .map(|k| LocalData {
            merchant_id: format!("f{k}"),
            ..Default::default()
        })
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
    let expected = reference::federate(&template, &mut merchants.clone(), 2, &mut FedAvg)
        .unwrap()
        .params;
    let model = shared.model(2).unwrap().unwrap();
    let diff = model
        .iter()
        .zip(&expected)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(
        diff <= 1e-5,
        "secure fleet model differs from FedAvg by {diff}"
    );
}
