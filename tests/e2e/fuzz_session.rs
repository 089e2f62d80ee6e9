//! Fuzzing past the session check: a merchant with a valid mutual-TLS
//! identity joins a secure round and, at every secure-aggregation stage,
//! sends seeded mutations of its own honest answer (truncated, bit-flipped,
//! retagged, extended, re-chunked) before the honest one. Each mutation that
//! our own decoder refuses must be refused by the coordinator with the
//! decoder's error (so the handler's parser ran, not the session lookup);
//! one that decodes but names another agent must be refused as an impostor.
//! Nothing may be answered `Unknown` or `Unauthenticated`, and the round must
//! still commit exactly the in-process FedAvg of all three agents.
//!
//! `tests/e2e/fuzz.rs` covers the other side: random bytes with no session.

use std::collections::BTreeMap;
use std::time::Duration;

use fedcart_client::secure::{Reply, SecureTasks, send};
use fedcart_common::federation::strategy::FedAvg;
use fedcart_common::privacy::secagg::{
    AdvertiseKeys, RoundInvite, SecAggConfig, ShareUpload, UnmaskResponse, masked_from_bytes,
    stage_name,
};
use fedcart_common::reference;
use fedcart_common::task::{ModelSpec, TaskKind, TaskSpec};
use fedcart_common::train::{LocalData, run_task};
use fedcart_coordinator::certs::{self, CertDir};
use fedcart_coordinator::config::{RunConfig, SecAggSettings};
use fedcart_coordinator::limits::Limits;
use fedcart_coordinator::record::Outcome;
use fedcart_coordinator::server::{ServeOptions, start_with};
use fedcart_coordinator::tls::{TlsFiles, Transport};
use fedcart_proto::v1 as pb;
use fedcart_proto::v1::coordinator_client::CoordinatorClient;
use fedcart_tests::*;
use tokio::net::TcpListener;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Status, Streaming};

/// Mutations per stage message; the whole test stays well under a minute.
const CASES: usize = 120;

/// splitmix64: a tiny seeded generator for the mutations.
struct Gen(u64);
impl Gen {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
    /// Fewer than `max` random bytes.
    fn bytes_below(&mut self, max: usize) -> Vec<u8> {
        let n = self.below(max);
        self.bytes(n)
    }

    /// A seeded mutation of a valid wire message.
    fn mutate(&mut self, valid: &[u8]) -> Vec<u8> {
        let mut b = valid.to_vec();
        match self.below(8) {
            0 => b.truncate(self.below(b.len())),
            1 => {
                let i = self.below(b.len());
                b[i] ^= (self.next() as u8) | 1;
            }
            2 => {
                let extra = 1 + self.below(8);
                b.extend(self.bytes(extra));
            }
            3 => b = self.bytes_below(200),
            4 if b.len() >= 6 => {
                let at = 2 + self.below(b.len() - 5);
                let v = if self.next().is_multiple_of(2) {
                    u32::MAX
                } else {
                    self.next() as u32
                };
                b[at..at + 4].copy_from_slice(&v.to_le_bytes());
            }
            5 => b[0] = 1 + ((b[0] + self.below(8) as u8) % 9),
            6 => b[1] = b[1].wrapping_add(1 + self.below(250) as u8),
            _ => {
                let at = self.below(b.len());
                let extra = 1 + self.below(16);
                let ins = self.bytes(extra);
                b.splice(at..at, ins);
            }
        }
        b
    }
}

/// How the coordinator answered the mutations of one stage.
#[derive(Debug, Default)]
struct Tally {
    /// Refused with exactly the error our own decoder gives for the bytes.
    decoder: usize,
    /// Decoded, but named another agent: refused as an impostor.
    impostor: usize,
    /// Refused by the upload framing or reassembly (masked input only).
    framing: usize,
    /// Decoded and named us: a valid answer, so not sent.
    skipped: usize,
}

/// A CA with a coordinator certificate and merchants `m0`..`m2` allowed.
fn pki(dir: &std::path::Path) -> (CertDir, TlsFiles) {
    let cd = CertDir::new(dir);
    certs::init(&cd, &["localhost".into()]).unwrap();
    let files = TlsFiles::in_dir(dir);
    for id in ["m0", "m1", "m2"] {
        certs::issue(&cd, id).unwrap();
        certs::allow(&files.access, id).unwrap();
    }
    (cd, files)
}

fn client_tls(ca: &CertDir, id: &str) -> ClientTlsConfig {
    ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(ca.ca_cert()).unwrap()))
        .domain_name("localhost")
        .identity(Identity::from_pem(
            std::fs::read(ca.cert(id)).unwrap(),
            std::fs::read(ca.key(id)).unwrap(),
        ))
}

/// The key-binding identity of merchant `id` (its mTLS key and the CA).
fn key_identity(ca: &CertDir, id: &str) -> fedcart_client::tls::KeyIdentity {
    fedcart_client::tls::AgentTls {
        ca: ca.ca_cert(),
        cert: ca.cert(id),
        key: ca.key(id),
        domain: None,
    }
    .key_identity()
    .unwrap()
}

fn noop_secure_run(n: usize) -> RunConfig {
    let mut run = churn_run("fuzz-mtls", 1, n, n);
    run.model = ModelSpec::Noop { dim: 200 };
    run.evaluate = false;
    run.secagg = Some(SecAggSettings {
        neighbours: None,
        clip: 1.0,
        verify_survivors: false,
        stage_timeout_ms: Some(120_000),
    });
    run
}

fn merchant(k: usize) -> LocalData {
    LocalData {
        merchant_id: format!("m{k}"),
        ..Default::default()
    }
}

/// The in-process FedAvg of one round over `merchants`.
fn fedavg_over(run: &RunConfig, merchants: &[LocalData]) -> Vec<f32> {
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
    let mut merchants = merchants.to_vec();
    reference::federate(&template, &mut merchants, 1, &mut FedAvg)
        .expect("reference federation")
        .params
}

async fn next_work(work: &mut Streaming<pb::Work>) -> pb::work::Kind {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(60), work.message())
            .await
            .expect("work within 60 s")
            .expect("work stream")
            .expect("stream open");
        match msg.kind {
            Some(pb::work::Kind::Ping(_)) | None => continue,
            Some(k) => return k,
        }
    }
}

async fn next_secagg(work: &mut Streaming<pb::Work>, stage: &str) -> pb::SecAggRequest {
    match next_work(work).await {
        pb::work::Kind::Secagg(r) if r.stage == stage => r,
        other => panic!("expected the {stage} request, got {other:?}"),
    }
}

/// Sends mutations of the honest stage message `msg`; `decode` is our own
/// decoder for the stage, returning the sender id the bytes claim.
async fn fuzz_stage(
    client: &mut CoordinatorClient<Channel>,
    g: &mut Gen,
    msg: &pb::SecAggMessage,
    my_id: u32,
    decode: impl Fn(&[u8]) -> Result<u32, String>,
) -> Tally {
    let mut t = Tally::default();
    for case in 0..CASES {
        let body = g.mutate(&msg.body);
        let expected = decode(&body);
        if expected == Ok(my_id) {
            t.skipped += 1;
            continue;
        }
        let sent = pb::SecAggMessage {
            body: body.clone(),
            ..msg.clone()
        };
        let err = client
            .sec_agg(sent)
            .await
            .expect_err(&format!("{} case {case}: mutation accepted", msg.stage));
        match expected {
            Err(decoder_says) => {
                assert!(
                    matches!(err.code(), Code::InvalidArgument | Code::OutOfRange),
                    "{} case {case}: {err}",
                    msg.stage
                );
                assert_eq!(err.message(), decoder_says, "{} case {case}", msg.stage);
                t.decoder += 1;
            }
            Ok(other) => {
                assert_eq!(err.code(), Code::PermissionDenied, "{err}");
                assert!(
                    err.message()
                        .contains(&format!("claims to come from agent {other}")),
                    "{err}"
                );
                t.impostor += 1;
            }
        }
    }
    t
}

/// Sends a masked-input upload exactly as given.
async fn submit(
    client: &mut CoordinatorClient<Channel>,
    header: pb::UpdateHeader,
    chunks: Vec<pb::update_chunk::Part>,
) -> Result<pb::SubmitReply, Status> {
    let mut msgs = vec![pb::UpdateChunk {
        part: Some(pb::update_chunk::Part::Header(header)),
    }];
    msgs.extend(
        chunks
            .into_iter()
            .map(|p| pb::UpdateChunk { part: Some(p) }),
    );
    client
        .submit_update(futures::stream::iter(msgs))
        .await
        .map(|r| r.into_inner())
}

/// Mutated masked-input uploads: wrong declared length, payloads cut into
/// seeded chunks that add up to too few or too many bytes, a second header
/// among the data, a frame naming another agent, and a frame whose
/// coordinate count the decoder refuses. Every one must be refused.
async fn fuzz_masked(
    client: &mut CoordinatorClient<Channel>,
    g: &mut Gen,
    header: &pb::UpdateHeader,
    payload: &[u8],
    config: &SecAggConfig,
) -> Tally {
    use pb::update_chunk::Part;
    let mut t = Tally::default();
    let chunked = |g: &mut Gen, bytes: &[u8]| -> Vec<Part> {
        let size = 1 + g.below(bytes.len() / 2);
        bytes
            .chunks(size)
            .map(|c| Part::Data(c.to_vec().into()))
            .collect()
    };
    for case in 0..CASES {
        let mut h = header.clone();
        let mut body = payload.to_vec();
        let kind = case % 6;
        let (chunks, expect): (Vec<Part>, &str) = match kind {
            0 => {
                h.payload_len = h.payload_len.wrapping_add(1 + g.below(100) as u64);
                (chunked(g, &body), "masked payload_len")
            }
            1 => {
                body.truncate(g.below(body.len()));
                (chunked(g, &body), "payload shorter than declared")
            }
            2 => {
                let extra = 1 + g.below(64);
                body.extend(g.bytes(extra));
                (chunked(g, &body), "payload larger than declared")
            }
            3 => {
                let mut parts = chunked(g, &body);
                let at = g.below(parts.len());
                parts.insert(at, Part::Header(header.clone()));
                (parts, "only data chunks may follow the header")
            }
            4 => {
                // Tag, version, sender and modulus: framed for someone else.
                let i = g.below(7);
                body[i] ^= (g.next() as u8) | 1;
                (chunked(g, &body), "framed for another agent")
            }
            _ => {
                // The coordinate count: the decoder itself must refuse it.
                let n = u32::from_le_bytes(body[7..11].try_into().unwrap());
                let bad = n.wrapping_add(1 + g.below(1000) as u32);
                body[7..11].copy_from_slice(&bad.to_le_bytes());
                (chunked(g, &body), "")
            }
        };
        let err = submit(client, h, chunks)
            .await
            .expect_err(&format!("masked case {case} (kind {kind}) accepted"));
        assert!(
            !matches!(err.code(), Code::Unknown | Code::Unauthenticated),
            "masked case {case}: {err}"
        );
        if expect.is_empty() {
            let decoder_says = masked_from_bytes(&body, config)
                .expect_err("a wrong count must not decode")
                .to_string();
            assert_eq!(err.message(), decoder_says, "masked case {case}");
            t.decoder += 1;
        } else {
            assert!(err.message().contains(expect), "masked case {case}: {err}");
            t.framing += 1;
        }
    }
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutated_secure_aggregation_messages_from_a_joined_mtls_agent_are_refused_by_the_handlers()
{
    let dir = tempfile::tempdir().unwrap();
    let (cd, files) = pki(dir.path());
    let run = noop_secure_run(3);
    init_logs();
    let store = tempfile::tempdir().unwrap();
    let coord = start_with(
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
        &store.path().join("c.redb"),
        run.clone(),
        Duration::from_millis(500),
        ServeOptions {
            transport: Transport::Tls(files),
            http: None,
            http_token: None,
            // Hundreds of RPCs in a burst from one identity: lift the rate
            // limit so the handlers, not the token bucket, answer them.
            limits: Limits {
                rpcs_per_second: 1e6,
                rpc_burst: 1e6,
                ..Default::default()
            },
        },
    )
    .await
    .expect("TLS coordinator starts");
    let url = format!("https://localhost:{}", coord.addr.port());
    let channel = Endpoint::from_shared(url.clone())
        .unwrap()
        .timeout(Duration::from_secs(30))
        .tls_config(client_tls(&cd, "m0"))
        .unwrap()
        .connect()
        .await
        .expect("mutual TLS as m0");
    let mut client = CoordinatorClient::new(channel);
    let mut g = Gen(0x005E_CA66_F022);

    // Joins under a certificate's identity with other merchant ids are refused.
    for case in 0..20 {
        let claimed = format!("m{}", 3 + g.below(1000));
        let err = client
            .join(pb::JoinRequest {
                merchant_id: claimed.clone(),
                examples: Default::default(),
                agent_version: String::from_utf8_lossy(&g.bytes_below(40)).into(),
            })
            .await
            .map(|_| ())
            .expect_err(&format!("join case {case} as {claimed}"));
        assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    }
    let mut work = client
        .join(pb::JoinRequest {
            merchant_id: "m0".into(),
            examples: Default::default(),
            agent_version: "fuzz".into(),
        })
        .await
        .expect("m0 joins")
        .into_inner();
    let pb::work::Kind::Welcome(welcome) = next_work(&mut work).await else {
        panic!("welcome first");
    };
    let session = welcome.session_id;
    let agents: Vec<_> = (1..3)
        .map(|k| {
            let id = format!("m{k}");
            let mut a = fedcart_client::agent::Agent::new(url.clone(), merchant(k))
                .with_key_identity(key_identity(&cd, &id));
            a.tls = Some(client_tls(&cd, &id));
            spawn_configured(a)
        })
        .collect();

    let pb::work::Kind::Task(task) = next_work(&mut work).await else {
        panic!("a task after the welcome");
    };
    assert!(task.secure_aggregation);
    // Model requests under our own session with the wrong task are refused
    // by the engine's precheck, not by the session lookup.
    for case in 0..20 {
        let req = pb::ModelRequest {
            session_id: session.clone(),
            run_id: task.run_id.clone(),
            round: task.round + 1 + g.below(5) as u64,
            task_id: String::from_utf8_lossy(&g.bytes_below(20)).into(),
            model_version: g.next() % 4,
            cached_version: g.next() % 4,
            row_precision: (g.next() % 4) as i32,
            cached_digest: g.bytes_below(40),
        };
        let err = client
            .download_model(req)
            .await
            .map(|_| ())
            .expect_err(&format!("download case {case}"));
        assert!(
            !matches!(err.code(), Code::Unknown | Code::Unauthenticated),
            "download case {case}: {err}"
        );
    }
    let spec: TaskSpec = serde_json::from_slice(&task.spec_json).unwrap();
    let mut data = merchant(0);
    let global = if task.model_len > 0 {
        fedcart_client::transfer::download(&mut client, &session, &task)
            .await
            .expect("download")
    } else {
        Vec::new()
    };
    let out = run_task(&spec, &global, &mut data).expect("noop task");
    let mut secure = SecureTasks::default().with_identity(key_identity(&cd, "m0"));
    secure.hold(&task, spec.seed, "m0", None, out);

    let mut tallies = BTreeMap::new();
    // Stage 1: key advertisement.
    let req = next_secagg(&mut work, stage_name::ADVERTISE).await;
    let invite = RoundInvite::from_json(&req.body).unwrap();
    let Reply::Message(msg) = secure.respond(&session, &req).unwrap() else {
        panic!("advertise answers with a message");
    };
    let t = fuzz_stage(&mut client, &mut g, &msg, invite.id, |b| {
        AdvertiseKeys::from_bytes(b)
            .map(|k| k.id)
            .map_err(|e| e.to_string())
    })
    .await;
    tallies.insert(stage_name::ADVERTISE, t);
    send(&mut client, Reply::Message(msg)).await.unwrap();

    // Stage 2: encrypted share bundles.
    let req = next_secagg(&mut work, stage_name::SHARE_KEYS).await;
    let Reply::Message(msg) = secure.respond(&session, &req).unwrap() else {
        panic!("share_keys answers with a message");
    };
    let t = fuzz_stage(&mut client, &mut g, &msg, invite.id, |b| {
        ShareUpload::from_bytes(b)
            .map(|u| u.from)
            .map_err(|e| e.to_string())
    })
    .await;
    tallies.insert(stage_name::SHARE_KEYS, t);
    send(&mut client, Reply::Message(msg)).await.unwrap();

    // Stage 3: the masked input, through SubmitUpdate's chunk reassembly.
    let req = next_secagg(&mut work, stage_name::MASKED_INPUT).await;
    let Reply::Masked { header, payload } = secure.respond(&session, &req).unwrap() else {
        panic!("masked_input answers with an upload");
    };
    let t = fuzz_masked(&mut client, &mut g, &header, &payload, &invite.config).await;
    tallies.insert(stage_name::MASKED_INPUT, t);
    send(&mut client, Reply::Masked { header, payload })
        .await
        .unwrap();

    // Stage 4: unmask responses.
    let req = next_secagg(&mut work, stage_name::UNMASK).await;
    let Reply::Message(msg) = secure.respond(&session, &req).unwrap() else {
        panic!("unmask answers with a message");
    };
    let t = fuzz_stage(&mut client, &mut g, &msg, invite.id, |b| {
        UnmaskResponse::from_bytes(b)
            .map(|r| r.from)
            .map_err(|e| e.to_string())
    })
    .await;
    tallies.insert(stage_name::UNMASK, t);
    send(&mut client, Reply::Message(msg)).await.unwrap();

    // The evaluation that hands out the committed version, answered honestly.
    let pb::work::Kind::Task(eval) = next_work(&mut work).await else {
        panic!("the final evaluation after the round");
    };
    assert!(eval.task_id.ends_with("-evaluate"), "{}", eval.task_id);
    let spec: TaskSpec = serde_json::from_slice(&eval.spec_json).unwrap();
    let global = fedcart_client::transfer::download(&mut client, &session, &eval)
        .await
        .expect("download");
    let out = run_task(&spec, &global, &mut data).expect("noop evaluation");
    fedcart_client::transfer::upload(&mut client, &session, &eval, &out)
        .await
        .expect("upload");

    eprintln!("fuzz over mTLS, {CASES} mutations per stage: {tallies:?}");
    for (stage, t) in &tallies {
        // A sixth of the masked-input mutations target its decoder; the rest
        // target the upload's framing and reassembly.
        let want = if *stage == stage_name::MASKED_INPUT {
            CASES / 6
        } else {
            CASES / 3
        };
        assert!(
            t.decoder >= want,
            "stage {stage}: only {} mutations reached the decoder: {t:?}",
            t.decoder
        );
    }

    let shared = coord.shared.clone();
    tokio::time::timeout(Duration::from_secs(60), coord.wait_finished())
        .await
        .expect("the run finishes within 60 s")
        .unwrap();
    for a in agents {
        a.stop().await;
    }
    let history = shared.history().unwrap();
    let trains: Vec<_> = history
        .iter()
        .filter(|r| r.kind == TaskKind::Train)
        .collect();
    assert_eq!(trains.len(), 1, "{history:?}");
    assert_eq!(trains[0].outcome, Outcome::Committed);
    assert_eq!(trains[0].reported, vec!["m0", "m1", "m2"]);
    let expected = fedavg_over(&run, &(0..3).map(merchant).collect::<Vec<_>>());
    let model = shared.model(1).unwrap().expect("version 1");
    let d = model
        .iter()
        .zip(&expected)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(d <= 1e-5, "max |secure − fedavg| = {d}");
}
