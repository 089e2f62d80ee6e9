//! Mutual TLS, identities and hardening over real sockets: admitted, refused
//! (no certificate, foreign CA, revoked, unknown, impersonating), plaintext
//! refused by a TLS coordinator; fuzzed bytes into every RPC; `/metrics` and
//! health over two rounds.

use std::time::Duration;

use fedcart_coordinator::certs::{self, CertDir};
use fedcart_coordinator::server::{ServeOptions, start_with};
use fedcart_coordinator::tls::{TlsFiles, Transport};
use fedcart_proto::v1 as pb;
use fedcart_proto::v1::coordinator_client::CoordinatorClient;
use fedcart_tests::*;
use tokio::net::TcpListener;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// A CA with a coordinator certificate and merchants `m0`, `m1` allowed.
fn pki(dir: &std::path::Path) -> (CertDir, TlsFiles) {
    let cd = CertDir::new(dir);
    certs::init(&cd, &["localhost".into()]).unwrap();
    let files = TlsFiles::in_dir(dir);
    for id in ["m0", "m1", "outsider"] {
        certs::issue(&cd, id).unwrap();
    }
    certs::allow(&files.access, "m0").unwrap();
    certs::allow(&files.access, "m1").unwrap();
    (cd, files)
}

fn client_tls(ca: &CertDir, who: Option<(&CertDir, &str)>) -> ClientTlsConfig {
    let mut cfg = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(ca.ca_cert()).unwrap()))
        .domain_name("localhost");
    if let Some((dir, id)) = who {
        cfg = cfg.identity(Identity::from_pem(
            std::fs::read(dir.cert(id)).unwrap(),
            std::fs::read(dir.key(id)).unwrap(),
        ));
    }
    cfg
}

async fn start_tls(
    store: &std::path::Path,
    files: TlsFiles,
    run_id: &str,
    rounds: u64,
) -> fedcart_coordinator::server::Running {
    start_tls_run(store, files, churn_run(run_id, rounds, 2, 2)).await
}

/// [`start_tls`] with the run as given.
async fn start_tls_run(
    store: &std::path::Path,
    files: TlsFiles,
    run: fedcart_coordinator::config::RunConfig,
) -> fedcart_coordinator::server::Running {
    init_logs();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
    start_with(
        listener,
        store,
        run,
        Duration::from_millis(500),
        ServeOptions {
            transport: Transport::Tls(files),
            http: Some(http),
            http_token: None,
            limits: Default::default(),
        },
    )
    .await
    .expect("TLS coordinator starts")
}

/// Tries to join as `claimed` over `tls`; Ok(()) when a welcome arrives.
async fn try_join(
    addr: std::net::SocketAddr,
    tls: Option<ClientTlsConfig>,
    claimed: &str,
) -> Result<(), String> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut ep = Endpoint::from_shared(format!("{scheme}://localhost:{}", addr.port()))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10));
    if let Some(t) = tls {
        ep = ep.tls_config(t).unwrap();
    }
    let ch = ep.connect().await.map_err(|e| format!("connect: {e:?}"))?;
    let mut c = CoordinatorClient::new(ch);
    let req = pb::JoinRequest {
        merchant_id: claimed.into(),
        examples: Default::default(),
        agent_version: "test".into(),
    };
    let mut s = c
        .join(req)
        .await
        .map_err(|e| format!("join: {e}"))?
        .into_inner();
    match s.message().await {
        Ok(Some(pb::Work {
            kind: Some(pb::work::Kind::Welcome(_)),
        })) => Ok(()),
        other => Err(format!("no welcome: {other:?}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_allowed_merchants_with_our_ca_certificates_are_admitted() {
    let dir = tempfile::tempdir().unwrap();
    let (cd, files) = pki(dir.path());
    let other = tempfile::tempdir().unwrap();
    let other_ca = CertDir::new(other.path());
    certs::init(&other_ca, &["localhost".into()]).unwrap();
    certs::issue(&other_ca, "m0").unwrap();
    let store = tempfile::tempdir().unwrap();
    let coord = start_tls(&store.path().join("c.redb"), files.clone(), "tls", 1).await;
    let addr = coord.addr;

    try_join(addr, Some(client_tls(&cd, Some((&cd, "m0")))), "m0")
        .await
        .expect("a valid, allowed certificate joins");
    let no_cert = try_join(addr, Some(client_tls(&cd, None)), "m0").await;
    assert!(no_cert.is_err(), "no client certificate: {no_cert:?}");
    let foreign = try_join(addr, Some(client_tls(&cd, Some((&other_ca, "m0")))), "m0").await;
    assert!(foreign.is_err(), "certificate from another CA: {foreign:?}");
    let unknown = try_join(
        addr,
        Some(client_tls(&cd, Some((&cd, "outsider")))),
        "outsider",
    )
    .await;
    assert!(unknown.unwrap_err().contains("not on the allow-list"));
    let impersonate = try_join(addr, Some(client_tls(&cd, Some((&cd, "m1")))), "m0").await;
    assert!(impersonate.unwrap_err().contains("may not join as"));
    let plaintext = try_join(addr, None, "m0").await;
    assert!(
        plaintext.is_err(),
        "plaintext to a TLS coordinator: {plaintext:?}"
    );

    // A session id is bound to the certificate that joined it.
    let channel = |id: &str| {
        Endpoint::from_shared(format!("https://localhost:{}", addr.port()))
            .unwrap()
            .tls_config(client_tls(&cd, Some((&cd, id))))
            .unwrap()
            .connect_lazy()
    };
    let mut m1 = CoordinatorClient::new(channel("m1"));
    let mut work = m1
        .join(pb::JoinRequest {
            merchant_id: "m1".into(),
            examples: Default::default(),
            agent_version: "test".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let Some(pb::Work {
        kind: Some(pb::work::Kind::Welcome(w)),
    }) = work.message().await.unwrap()
    else {
        panic!("welcome expected");
    };
    let stolen = pb::ModelRequest {
        session_id: w.session_id.clone(),
        ..Default::default()
    };
    let Err(err) = CoordinatorClient::new(channel("m0"))
        .download_model(stolen)
        .await
    else {
        panic!("a session of m1 used with m0's certificate must be refused");
    };
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    assert!(err.message().contains("session of `m1`"), "{err}");
    // The same session on the other two calls a merchant makes: an upload
    // (its header names the session) and a secure-aggregation message.
    let header = pb::UpdateChunk {
        part: Some(pb::update_chunk::Part::Header(pb::UpdateHeader {
            session_id: w.session_id.clone(),
            ..Default::default()
        })),
    };
    let Err(err) = CoordinatorClient::new(channel("m0"))
        .submit_update(futures::stream::iter(vec![header]))
        .await
    else {
        panic!("an upload under m1's session with m0's certificate must be refused");
    };
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    assert!(err.message().contains("session of `m1`"), "{err}");
    let Err(err) = CoordinatorClient::new(channel("m0"))
        .sec_agg(pb::SecAggMessage {
            session_id: w.session_id.clone(),
            ..Default::default()
        })
        .await
    else {
        panic!(
            "a secure-aggregation message under m1's session with m0's certificate must be refused"
        );
    };
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    assert!(err.message().contains("session of `m1`"), "{err}");

    // Revocation takes effect without a restart.
    certs::revoke(&files.access, &cd, "m1", None).unwrap();
    let revoked = try_join(addr, Some(client_tls(&cd, Some((&cd, "m1")))), "m1").await;
    assert!(revoked.unwrap_err().contains("revoked"));
    coord.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_merchant_loses_its_open_session_and_the_run_goes_on() {
    loses_its_open_session_and_the_run_goes_on(
        |access, cd| {
            certs::revoke(access, cd, "m2", None).unwrap();
        },
        "`m2` is revoked",
    )
    .await;
}

/// The same when the operator takes the merchant off the allow-list
/// (`access.toml` edited while the coordinator runs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merchant_taken_off_the_allow_list_loses_its_open_session_and_the_run_goes_on() {
    loses_its_open_session_and_the_run_goes_on(
        |access, _| {
            let mut list =
                fedcart_coordinator::identity::AccessList::load_or_default(access).unwrap();
            list.allow.retain(|id| id != "m2");
            // Replaced whole, as `certs` replaces it: a file truncated and
            // then written can be read empty in between by the
            // coordinator's watch, which then refuses everyone.
            let tmp = access.with_extension("tmp");
            std::fs::write(&tmp, list.to_toml()).unwrap();
            std::fs::rename(&tmp, access).unwrap();
        },
        "`m2` is not on the allow-list",
    )
    .await;
}

/// m2, connected and selected, is refused by `refuse` (given the access
/// file and the CA): its Join stream ends with PERMISSION_DENIED saying
/// `why`, and the run finishes with the others, never selecting m2 again.
async fn loses_its_open_session_and_the_run_goes_on(
    refuse: impl FnOnce(&std::path::Path, &CertDir),
    why: &str,
) {
    let dir = tempfile::tempdir().unwrap();
    let (cd, files) = pki(dir.path());
    certs::issue(&cd, "m2").unwrap();
    certs::allow(&files.access, "m2").unwrap();
    let split = telco_split(2, 5);
    let store = tempfile::tempdir().unwrap();
    init_logs();
    let mut run = churn_run("revoke", 1, 2, 2);
    run.selection.max_agents = 3;
    run.evaluate = false;
    let coord = start_with(
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
        &store.path().join("c.redb"),
        run,
        Duration::from_millis(500),
        ServeOptions {
            transport: Transport::Tls(files.clone()),
            http: None,
            http_token: None,
            limits: Default::default(),
        },
    )
    .await
    .unwrap();

    // m2 joins first, so it is selected in the first task.
    let channel = Endpoint::from_shared(format!("https://localhost:{}", coord.addr.port()))
        .unwrap()
        .tls_config(client_tls(&cd, Some((&cd, "m2"))))
        .unwrap()
        .connect_lazy();
    let join = pb::JoinRequest {
        merchant_id: "m2".into(),
        examples: Default::default(),
        agent_version: "test".into(),
    };
    let mut work = CoordinatorClient::new(channel)
        .join(join)
        .await
        .unwrap()
        .into_inner();
    let agents: Vec<_> = (0..2)
        .map(|k| {
            let id = format!("m{k}");
            let mut a = fedcart_client::agent::Agent::new(
                format!("https://localhost:{}", coord.addr.port()),
                load_merchant(&id, &split.files[k]),
            );
            a.tls = Some(client_tls(&cd, Some((&cd, &id))));
            spawn_configured(a)
        })
        .collect();
    let first = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let msg = work.message().await.unwrap().expect("stream open");
            if let Some(pb::work::Kind::Task(t)) = msg.kind {
                return t;
            }
        }
    })
    .await
    .expect("m2 gets a task");

    // Refused while connected and selected: its stream ends with a status.
    refuse(&files.access, &cd);
    let status = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match work.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("the stream ended without a status"),
                Err(status) => return status,
            }
        }
    })
    .await
    .expect("the revoked merchant's Join stream is closed");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains(why), "{}", status.message());

    // The run goes on with the others and never selects m2 again.
    let mut progress = coord.progress.clone();
    tokio::time::timeout(Duration::from_secs(120), progress.wait_for(|p| p.finished))
        .await
        .expect("the run finishes without m2")
        .unwrap();
    let history = coord.shared.history().unwrap();
    assert_eq!(history[0].task_id, first.task_id);
    assert!(history[0].dropped.contains(&"m2".to_string()));
    assert!(
        history[1..]
            .iter()
            .all(|r| !r.selected.contains(&"m2".to_string()))
    );
    assert!(
        history
            .iter()
            .any(|r| r.kind == fedcart_common::task::TaskKind::Train
                && r.outcome == fedcart_coordinator::record::Outcome::Committed)
    );
    for a in agents {
        a.stop().await;
    }
    coord.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_is_served_only_when_insecure_is_explicit() {
    let store = tempfile::tempdir().unwrap();
    let coord =
        start_coordinator(&store.path().join("c.redb"), churn_run("plain", 1, 2, 2), 0).await;
    try_join(coord.addr, None, "m0")
        .await
        .expect("insecure coordinator takes plaintext");
    coord.shutdown().await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let cfg = fedcart_coordinator::config::CoordinatorConfig {
        serve: fedcart_coordinator::config::ServeConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            store: dir.path().join("s.redb"),
            ping_interval_ms: 500,
            tls: None,
            http_listen: None,
            http_token_file: None,
        },
        run: churn_run("r", 1, 1, 1),
    };
    let err = fedcart_coordinator::server::start_from_config(&cfg, false)
        .await
        .err()
        .expect("no TLS and no --insecure must refuse to start");
    assert!(format!("{err:#}").contains("--insecure"), "{err:#}");

    // A CA path that names nothing is reported as itself, not as the
    // operator's token the HTTP listener looks for beside it.
    let missing = dir.path().join("pki/ca.pem");
    let mut cfg = cfg;
    cfg.serve.http_listen = Some("127.0.0.1:0".parse().unwrap());
    cfg.serve.tls = Some(fedcart_coordinator::tls::TlsFiles {
        ca: missing.clone(),
        cert: missing.clone(),
        key: missing.clone(),
        access: dir.path().join("pki/access.txt"),
    });
    let err = fedcart_coordinator::server::start_from_config(&cfg, false)
        .await
        .err()
        .expect("no CA, no start");
    let err = format!("{err:#}");
    assert!(
        err.starts_with(&format!("`serve.tls.ca`: reading {}", missing.display()))
            && !err.contains("token"),
        "{err}"
    );
}

/// A connection to the gRPC port that never starts its TLS handshake is
/// dropped after `HANDSHAKE_TIMEOUT`, while a merchant joins meanwhile. Such
/// sockets were kept for ever, and about a thousand of them (no certificate
/// needed) used up the coordinator's file descriptors and locked every
/// merchant out (found by a penetration probe).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_never_starts_tls_is_dropped() {
    use tokio::io::AsyncReadExt;
    let dir = tempfile::tempdir().unwrap();
    let (cd, files) = pki(dir.path());
    let store = tempfile::tempdir().unwrap();
    let coord = start_tls(&store.path().join("c.redb"), files, "idle-tls", 1).await;
    let mut idle = Vec::new();
    for _ in 0..8 {
        idle.push(tokio::net::TcpStream::connect(coord.addr).await.unwrap());
    }
    try_join(coord.addr, Some(client_tls(&cd, Some((&cd, "m0")))), "m0")
        .await
        .expect("a merchant joins beside idle sockets");
    for mut socket in idle {
        let mut byte = [0u8; 1];
        // A guard, not a synchronisation: the server's close ends the read.
        let read = tokio::time::timeout(
            fedcart_coordinator::tls::HANDSHAKE_TIMEOUT * 6,
            socket.read(&mut byte),
        )
        .await
        .expect("the server closes an idle socket");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    }
    coord.shutdown().await.unwrap();
}

/// One address that holds `MAX_CONNECTIONS_PER_PEER` half-sent requests
/// gets no more connections, and the health probe from another address is
/// answered. One client could hold every connection the HTTP listener
/// serves, reopening each the header timeout closed, and the health probes
/// went unanswered for as long as it liked (found by a penetration probe).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_hold_every_http_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let (_, files) = pki(dir.path());
    let store = tempfile::tempdir().unwrap();
    let coord = start_tls(&store.path().join("c.redb"), files, "slow-http", 1).await;
    let http = coord.http_addr.expect("HTTP listener");
    let mut held = Vec::new();
    for _ in 0..fedcart_common::http::MAX_CONNECTIONS_PER_PEER {
        let mut s = tokio::net::TcpStream::connect(http).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHo").await.unwrap();
        held.push(s);
    }
    // The listener counts each connection as it accepts it, in order: the
    // next one from this address is closed unanswered.
    let mut extra = tokio::net::TcpStream::connect(http).await.unwrap();
    let _ = extra
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await;
    let mut answer = Vec::new();
    let _ = extra.read_to_end(&mut answer).await;
    assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));
    // Another address (a kubelet's) is served.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut probe = socket.connect(http).await.unwrap();
    probe
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    probe.read_to_end(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    drop(held);
    coord.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_across_two_rounds_and_health_is_serving_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let (cd, files) = pki(dir.path());
    let split = telco_split(2, 5);
    let store = tempfile::tempdir().unwrap();
    // With central DP: ε is one of the gauges.
    let mut run = churn_run("tls-metrics", 2, 2, 2);
    run.dp = Some(fedcart_coordinator::config::DpSettings::central(
        1.0, 1.0, 1e-5,
    ));
    let coord = start_tls_run(&store.path().join("c.redb"), files, run).await;
    let http = coord.http_addr.expect("HTTP listener");

    // gRPC health over mutual TLS.
    let ch = Endpoint::from_shared(format!("https://localhost:{}", coord.addr.port()))
        .unwrap()
        .tls_config(client_tls(&cd, Some((&cd, "m0"))))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(ch);
    let h = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        h.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    let before = http_get(http, "/metrics").await;
    assert!(!before.contains("fedcart_rounds_committed_total{run=\"tls-metrics\",kind=\"train\"}"));
    let agents: Vec<_> = (0..2)
        .map(|k| {
            let id = format!("m{k}");
            let mut a = fedcart_client::agent::Agent::new(
                format!("https://localhost:{}", coord.addr.port()),
                load_merchant(&id, &split.files[k]),
            );
            a.tls = Some(client_tls(&cd, Some((&cd, &id))));
            spawn_configured(a)
        })
        .collect();
    let mut progress = coord.progress.clone();
    progress.wait_for(|p| p.version >= 1).await.unwrap();
    let mid = http_get(http, "/metrics").await;
    progress.wait_for(|p| p.finished).await.unwrap();
    let after = http_get(http, "/metrics").await;
    let committed = |text: &str| {
        metric(
            text,
            "fedcart_rounds_committed_total{run=\"tls-metrics\",kind=\"train\"}",
        )
    };
    assert!(committed(&mid) >= 1.0, "{mid}");
    assert_eq!(committed(&after), 2.0, "{after}");
    assert_eq!(
        metric(&after, "fedcart_model_version{run=\"tls-metrics\"}"),
        2.0
    );
    assert!(
        metric(
            &after,
            "fedcart_update_bytes_in_total{run=\"tls-metrics\",kind=\"train\"}"
        ) > 0.0
    );
    assert_eq!(
        metric(
            &after,
            "fedcart_agents_reported_total{run=\"tls-metrics\",kind=\"train\"}"
        ),
        4.0
    );
    let epsilon = metric(&after, "fedcart_dp_epsilon{run=\"tls-metrics\"}");
    assert!(epsilon > 0.0 && epsilon.is_finite(), "{after}");
    let status = http_get(http, "/api/status").await;
    assert!(status.contains("\"model_version\":2"), "{status}");
    assert!(http_get(http, "/").await.contains("id=\"charts\""));

    // The `status` command's client over mutual TLS, as table and JSON.
    let tls = fedcart_coordinator::status::ClientTls {
        ca: cd.ca_cert(),
        cert: cd.cert("m0"),
        key: cd.key("m0"),
        domain: Some("localhost".into()),
    };
    let url = format!("https://localhost:{}", coord.addr.port());
    let reply = fedcart_coordinator::status::fetch(&url, Some(&tls), None)
        .await
        .unwrap();
    let json = fedcart_coordinator::status::to_json(&reply);
    assert_eq!(json["model_version"], 2);
    assert_eq!(json["run_id"], "tls-metrics");
    assert_eq!(json["run_ids"], serde_json::json!(["tls-metrics"]));
    assert_eq!(json["last_round"]["outcome"], "committed");
    // ε spent, as /metrics has it.
    assert_eq!(json["epsilon"].as_f64(), Some(epsilon));
    assert_eq!(json["delta"].as_f64(), Some(1e-5));
    // The version merchants are served, by model selection; its pooled
    // figure is the operator's alone (below).
    let best = coord.shared.best().expect("churn LR selects by val_auc");
    assert_eq!(json["best_version"].as_u64(), Some(best.version));
    assert_eq!(json["best_metric"], "val_auc");
    assert!(json["best_value"].is_null(), "{json}");
    let table = fedcart_coordinator::status::to_table(&reply);
    assert!(
        table.contains("model version")
            && table.contains("finished")
            && table.contains(&format!("ε = {epsilon:.3} spent (δ = 1e-5)"))
            && table.contains(&format!("{} (best val_auc)", best.version)),
        "{table}"
    );
    let operator = fedcart_coordinator::status::ClientTls {
        cert: cd.cert("operator"),
        key: cd.key("operator"),
        ..tls.clone()
    };
    let reply = fedcart_coordinator::status::fetch(&url, Some(&operator), None)
        .await
        .unwrap();
    assert_eq!(reply.best_value, Some(best.value));
    assert!(
        fedcart_coordinator::status::to_table(&reply).contains(&format!(
            "{} (best val_auc: {:.4})",
            best.version, best.value
        ))
    );
    assert!(
        fedcart_coordinator::status::fetch(&url, None, None)
            .await
            .is_err(),
        "status without a certificate is refused"
    );
    for a in agents {
        a.stop().await;
    }
    coord.shutdown().await.unwrap();
}

/// The value of the first sample line starting with `series` (0 if absent).
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

/// A minimal HTTP/1.1 GET over a fresh connection; returns the body.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    assert!(
        text.starts_with("HTTP/1.1 200"),
        "{path}: {}",
        text.lines().next().unwrap_or("")
    );
    text.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default()
}

/// A raw HTTP/1.1 request with extra header lines; returns the whole
/// response (status line, headers, body).
pub async fn http_raw(addr: std::net::SocketAddr, method: &str, path: &str, extra: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{extra}\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    String::from_utf8_lossy(&buf).into_owned()
}

/// The operator identity `certs init` made reads the whole status; a
/// merchant's certificate reads only its own part of it (none of a round
/// that did not select it); an operator certificate never takes part as a
/// merchant; a revoked operator is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_see_every_merchant_merchants_see_themselves_and_operators_never_train() {
    use fedcart_coordinator::record::RoundRecord;
    use fedcart_coordinator::status::{ClientTls, fetch};
    let dir = tempfile::tempdir().unwrap();
    let (cd, files) = pki(dir.path());
    // A merchant of the federation that no round of this run selects.
    certs::issue(&cd, "m2").unwrap();
    certs::allow(&files.access, "m2").unwrap();
    let split = telco_split(2, 7);
    let store = tempfile::tempdir().unwrap();
    let coord = start_tls(&store.path().join("c.redb"), files.clone(), "tls", 1).await;
    let url = format!("https://localhost:{}", coord.addr.port());

    let op = try_join(
        coord.addr,
        Some(client_tls(&cd, Some((&cd, certs::OPERATOR)))),
        "operator",
    )
    .await;
    let err = op.expect_err("an operator certificate may not join");
    assert!(err.contains("may not take part as a merchant"), "{err}");

    let agents: Vec<_> = (0..2)
        .map(|k| {
            let id = format!("m{k}");
            let mut a =
                fedcart_client::agent::Agent::new(url.clone(), load_merchant(&id, &split.files[k]));
            a.tls = Some(client_tls(&cd, Some((&cd, &id))));
            spawn_configured(a)
        })
        .collect();
    let mut progress = coord.progress.clone();
    tokio::time::timeout(Duration::from_secs(120), progress.wait_for(|p| p.finished))
        .await
        .expect("the run finishes")
        .unwrap();

    let tls = |id: &str| ClientTls {
        ca: cd.ca_cert(),
        cert: cd.cert(id),
        key: cd.key(id),
        domain: Some("localhost".into()),
    };
    let all = fetch(&url, Some(&tls(certs::OPERATOR)), None)
        .await
        .unwrap();
    let last: RoundRecord = serde_json::from_str(&all.last_round_json).unwrap();
    assert_eq!(
        last.selected,
        ["m0", "m1"],
        "the operator sees every merchant"
    );
    let own = fetch(&url, Some(&tls("m0")), None).await.unwrap();
    assert_eq!(all.connected_agents, ["m0", "m1"]);
    assert_eq!(
        own.connected_agents,
        ["m0"],
        "who else is connected is not shown"
    );
    let mine: RoundRecord = serde_json::from_str(&own.last_round_json).unwrap();
    assert_eq!(mine.selected, ["m0"]);
    assert!(mine.reported.iter().all(|m| m == "m0"));
    assert!(
        !own.last_round_json.contains("m1"),
        "{}",
        own.last_round_json
    );
    // The federation's figures are the operator's: in this round of two,
    // m0 would subtract its own share and read m1's AUC and customer count.
    assert!(!last.metrics.is_empty() && last.examples > 0.0);
    assert!(mine.metrics.is_empty(), "{:?}", mine.metrics);
    assert_eq!((mine.examples, mine.bytes_in), (0.0, 0));
    assert_eq!(mine.seen_by.as_deref(), Some("m0"));
    assert!(all.best_value.is_some());
    assert_eq!(own.best_value, None);
    assert_eq!(own.best_version, all.best_version);
    let table = fedcart_coordinator::status::to_table(&own);
    assert!(table.contains("m0 reported"), "{table}");
    for (metric, value) in &last.metrics {
        let shown = format!("{value:.4}");
        assert!(!table.contains(&shown), "{metric} {shown} in {table}");
    }
    // A merchant the run never selected reads none of its aggregates, and
    // nobody connected; it learns the run's id only, not its progress or
    // served version (an outsider followed any run's round, version and
    // best version).
    let outside = fetch(&url, Some(&tls("m2")), None).await.unwrap();
    assert_eq!(
        outside.last_round_json, "",
        "a round that did not select m2"
    );
    assert!(outside.connected_agents.is_empty());
    assert!(all.model_version > 0);
    assert_eq!(
        (
            outside.run_id.as_str(),
            outside.model_version,
            outside.round
        ),
        ("tls", 0, 0)
    );
    assert_eq!((outside.best_version, outside.epsilon), (None, None));
    assert!(
        outside
            .phase
            .contains("`m2` is not connected to this run and has not taken part in it"),
        "{}",
        outside.phase
    );

    certs::revoke(&files.access, &cd, certs::OPERATOR, None).unwrap();
    let err = fetch(&url, Some(&tls(certs::OPERATOR)), None)
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("revoked"), "{err:#}");

    for a in agents {
        a.stop().await;
    }
    coord.shutdown().await.unwrap();
}

/// Every HTTP route but the probes requires the operator's token: without
/// it (or with a wrong one) a request gets 401 and no run data; the bearer
/// header, the browser's `?token=` and its cookie get through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_requests_without_the_operators_token_get_no_run_data() {
    use fedcart_coordinator::http_auth::OperatorToken;
    let dir = tempfile::tempdir().unwrap();
    let (cd, files) = pki(dir.path());
    let store = tempfile::tempdir().unwrap();
    let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let coord = start_with(
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
        &store.path().join("c.redb"),
        churn_run("secret-run", 1, 2, 2),
        Duration::from_millis(500),
        ServeOptions {
            transport: Transport::Tls(files),
            http: Some(http),
            http_token: Some(OperatorToken::from_file(&cd.operator_token()).unwrap()),
            limits: Default::default(),
        },
    )
    .await
    .unwrap();
    let http = coord.http_addr.expect("HTTP listener");
    let token = std::fs::read_to_string(cd.operator_token()).unwrap();
    let token = token.trim();

    for path in ["/api/status", "/metrics", "/", "/api/status?token=x"] {
        for extra in [
            "",
            "Authorization: Bearer wrong-token-123456\r\n",
            "Cookie: fedcart_operator=nope\r\n",
        ] {
            let resp = http_raw(http, "GET", path, extra).await;
            assert!(resp.starts_with("HTTP/1.1 401"), "{path} {extra}: {resp}");
            assert!(!resp.contains("secret-run"), "{path}: {resp}");
            assert!(!resp.contains("fedcart_round"), "{path}: {resp}");
        }
    }
    for probe in ["/healthz", "/readyz"] {
        assert!(
            http_raw(http, "GET", probe, "")
                .await
                .starts_with("HTTP/1.1 200")
        );
    }
    let bearer = format!("Authorization: Bearer {token}\r\n");
    let status = http_raw(http, "GET", "/api/status", &bearer).await;
    assert!(
        status.starts_with("HTTP/1.1 200") && status.contains("secret-run"),
        "{status}"
    );
    assert!(
        http_raw(http, "GET", "/metrics", &bearer)
            .await
            .starts_with("HTTP/1.1 200")
    );

    // A browser: `/?token=` sets an HttpOnly cookie and drops the token from
    // the URL; the cookie then opens the dashboard and its API.
    let login = http_raw(http, "GET", &format!("/?token={token}"), "").await;
    assert!(login.starts_with("HTTP/1.1 303"), "{login}");
    let cookie = login
        .lines()
        .find_map(|l| l.strip_prefix("set-cookie: "))
        .expect("a cookie is set");
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let pair = cookie.split(';').next().unwrap();
    let with_cookie = format!("Cookie: {pair}\r\n");
    let page = http_raw(http, "GET", "/", &with_cookie).await;
    assert!(
        page.starts_with("HTTP/1.1 200") && page.contains("id=\"charts\""),
        "{page}"
    );
    let api = http_raw(http, "GET", "/api/status", &with_cookie).await;
    assert!(api.contains("secret-run"), "{api}");
    // The login form posts the same token.
    let posted = post_login(http, &format!("token={token}")).await;
    assert!(posted.starts_with("HTTP/1.1 303"), "{posted}");
    // A wrong token from the form or the URL gets the form again, saying
    // so, and no cookie.
    let wrong = post_login(http, "token=not-the-token").await;
    let by_url = http_raw(http, "GET", "/?token=not-the-token", "").await;
    // A body announced and never sent is read as no token once its time is
    // up: the connection was held open for ever (the header timeout does
    // not cover a body). The bound only catches a hang.
    let stalled = tokio::time::timeout(
        fedcart_coordinator::http_auth::LOGIN_BODY_TIMEOUT * 6,
        http_raw(
            http,
            "POST",
            "/login",
            "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\ntoken=",
        ),
    )
    .await
    .expect("a stalled login body is answered, not held open");
    for resp in [wrong, by_url, stalled] {
        assert!(
            resp.starts_with("HTTP/1.1 401")
                && resp.contains("That is not the operator's token")
                && resp.contains("<form")
                && !resp.contains("set-cookie"),
            "{resp}"
        );
    }
    coord.shutdown().await.unwrap();
}

/// The dashboard's login form posting `body` (`token=…`).
async fn post_login(http: std::net::SocketAddr, body: &str) -> String {
    http_raw(
        http,
        "POST",
        "/login",
        &format!(
            "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    )
    .await
}

/// Two agents with one merchant identity: the second to join replaces the
/// first, whose stream is closed with a status saying why, and the first
/// stops with what to fix instead of idling on an open stream that gets no
/// tasks (or taking the session back in turn).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_agent_with_the_same_identity_takes_over_and_the_first_stops_saying_why() {
    use fedcart_client::agent::Agent;
    let store = tempfile::tempdir().unwrap();
    // Three agents are needed: no task starts, the sessions only idle.
    let coord = start_coordinator(
        &store.path().join("c.redb"),
        churn_run("e2e-twice", 1, 3, 3),
        0,
    )
    .await;
    let mut progress = coord.shared.progress();
    let m0 = || fedcart_common::train::LocalData {
        merchant_id: "m0".into(),
        ..Default::default()
    };
    let mut first = Agent::new(format!("http://{}", coord.addr), m0());
    let (_stop_first, rx) = tokio::sync::watch::channel(false);
    let first = tokio::spawn(async move { first.run(rx).await });
    progress.wait_for(|p| p.agents == 1).await.unwrap();
    let second = spawn_agent(coord.addr, m0());
    let err = first.await.unwrap().expect_err("the replaced agent stops");
    let fix = err.what_to_fix().expect("a permanent error");
    assert!(
        err.to_string()
            .contains("joined again on another connection")
            || format!("{err:?}").contains("joined again"),
        "{err:?}"
    );
    assert!(fix.contains("one agent per merchant"), "{fix}");
    progress.wait_for(|p| p.agents == 1).await.unwrap();
    assert_eq!(coord.shared.connected(), vec!["m0"]);
    second.stop().await;
}

/// The operator's `status` and `runs` name what is wrong with a connection
/// that fails for a reason other than nobody listening: plaintext against
/// the TLS port, a coordinator certificate from another CA or for another
/// name, and nothing listening at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_connection_failures_name_their_cause() {
    use fedcart_coordinator::status::{ClientTls, fetch, with_hint};
    let dir = tempfile::tempdir().unwrap();
    let (cd, files) = pki(dir.path());
    let other = CertDir::new(dir.path().join("other"));
    certs::init(&other, &["localhost".into()]).unwrap();
    let store = tempfile::tempdir().unwrap();
    let coord = start_tls(&store.path().join("c.redb"), files, "hints", 1).await;
    let port = coord.addr.port();
    let tls = |cd: &CertDir, domain: &str| ClientTls {
        ca: cd.ca_cert(),
        cert: cd.cert(certs::OPERATOR),
        key: cd.key(certs::OPERATOR),
        domain: Some(domain.into()),
    };
    let hint = |url: String, tls: Option<ClientTls>| async move {
        let e = fetch(&url, tls.as_ref(), None).await.unwrap_err();
        format!(
            "{:#}",
            with_hint(e, &url, tls.is_some().then_some(certs::OPERATOR))
        )
    };
    let https = format!("https://localhost:{port}");
    let plain = hint(format!("http://127.0.0.1:{port}"), None).await;
    assert!(
        plain.contains("speaks TLS: use https://")
            || plain.contains("use https:// and `--certs DIR`"),
        "{plain}"
    );
    let foreign = hint(https.clone(), Some(tls(&other, "localhost"))).await;
    assert!(
        foreign.contains("not signed by the CA in `--certs`"),
        "{foreign}"
    );
    let name = hint(https.clone(), Some(tls(&cd, "shop.example"))).await;
    assert!(
        name.contains("not issued for the host")
            && name.contains("connect by one of the names it was issued for"),
        "{name}"
    );
    // Without `--domain` the URL's host is verified, as the agent does
    // (status and runs verified `localhost` whatever the URL said, and
    // refused a certificate issued for the URL's host). This certificate
    // names only localhost.
    let by_url = ClientTls {
        domain: None,
        ..tls(&cd, "")
    };
    fetch(&https, Some(&by_url), None).await.unwrap();
    let ip = format!("https://127.0.0.1:{port}");
    let e = fetch(&ip, Some(&by_url), None).await.unwrap_err();
    let e = with_hint(e, &ip, Some(certs::OPERATOR));
    assert!(
        format!("{e:#}").contains(&format!("not issued for the host of {ip}")),
        "{e:#}"
    );
    // An identity of another CA, with this coordinator's CA: the
    // coordinator refuses it after the handshake, which the client read
    // as a broken pipe ("nothing answered … is the coordinator running?").
    let stranger = ClientTls {
        ca: cd.ca_cert(),
        cert: other.cert(certs::OPERATOR),
        key: other.key(certs::OPERATOR),
        domain: Some("localhost".into()),
    };
    let e = fetch(&https, Some(&stranger), None).await.unwrap_err();
    let e = format!("{e:#}");
    assert!(
        e.contains("is not a client certificate the CA in") && !e.contains("nothing answered"),
        "{e}"
    );
    coord.shutdown().await.unwrap();
    let gone = hint(https, Some(tls(&cd, "localhost"))).await;
    assert!(gone.contains("nothing answered at"), "{gone}");
}
