//! Key binding against a malicious coordinator: the attacks of issue 11.
//!
//! A coordinator that relays the roster could put keys of its own in place
//! of merchant m3's and so open the shares the others send to "m3". Each
//! agent signs its advertisement with its mTLS key and verifies every entry
//! of the roster before using a key. The attack tests play the malicious
//! coordinator in-process: real agents (`SecureTasks`, with identities from
//! certificates issued by `fedcart-coordinator certs`), the real
//! `ServerSession`, and the roster relay encoded and decoded as the
//! protobuf `Work` message the service pushes; the coordinator's part is
//! done honestly up to the roster, which the test then tampers with. The
//! honest path also runs over real gRPC and mutual TLS with a real
//! coordinator.

use std::collections::BTreeMap;

use fedcart_client::agent::Agent;
use fedcart_client::policy::PrivacyPolicy;
use fedcart_client::secure::{Reply, SecureError, SecureTasks};
use fedcart_client::tls::{AgentTls, KeyIdentity};
use fedcart_common::federation::update::Update;
use fedcart_common::privacy::dp::distributed::DistributedSkellam;
use fedcart_common::privacy::dp::task::{DistributedNoise, DpTask};
use fedcart_common::privacy::secagg::binding::{
    AdvertSigner, BindingContext, BindingError, signed_message, task_digest,
};
use fedcart_common::privacy::secagg::{
    AdvertiseKeys, AfterMasked, ClientSession, KeyRoster, RoundInvite, SecAggConfig, SecAggError,
    ServerSession, ShareUpload, UnmaskResponse, round_seed, stage_name,
};
use fedcart_common::task::{ModelSpec, TaskKind};
use fedcart_common::train::{LocalData, TaskOutput};
use fedcart_coordinator::certs::{self, CertDir};
use fedcart_coordinator::config::SecAggSettings;
use fedcart_coordinator::record::Outcome;
use fedcart_coordinator::server::{ServeOptions, start_with};
use fedcart_coordinator::tls::{TlsFiles, Transport};
use fedcart_proto::v1 as pb;
use fedcart_tests::{churn_run, init_logs, spawn_configured};
use prost::Message;
use tokio::net::TcpListener;

/// Agents in the round (complete graph, threshold 3).
const N: usize = 4;
/// Coordinates of each update.
const DIM: usize = 16;

/// The platform's CA with merchants m0..m3 and `evil` (a merchant with a
/// valid certificate, colluding with the coordinator), and a rogue CA of the
/// coordinator's own that issued a certificate for `m3`.
struct Pki {
    ca: CertDir,
    rogue: CertDir,
    _dir: tempfile::TempDir,
}

fn pki() -> Pki {
    let dir = tempfile::tempdir().unwrap();
    let ca = CertDir::new(dir.path().join("ca"));
    certs::init(&ca, &["localhost".into()]).unwrap();
    for id in ["m0", "m1", "m2", "m3", "evil"] {
        certs::issue(&ca, id).unwrap();
    }
    let rogue = CertDir::new(dir.path().join("rogue"));
    certs::init(&rogue, &["localhost".into()]).unwrap();
    certs::issue(&rogue, "m3").unwrap();
    Pki {
        ca,
        rogue,
        _dir: dir,
    }
}

pub(crate) fn identity(ca: &CertDir, id: &str) -> KeyIdentity {
    AgentTls {
        ca: ca.ca_cert(),
        cert: ca.cert(id),
        key: ca.key(id),
        domain: None,
    }
    .key_identity()
    .unwrap()
}

/// The DER certificate of `id` issued by `ca`.
fn cert_der(ca: &CertDir, id: &str) -> Vec<u8> {
    let pem = std::fs::read(ca.cert(id)).unwrap();
    rustls_pemfile::certs(&mut &pem[..])
        .next()
        .unwrap()
        .unwrap()
        .to_vec()
}

fn task(attempt: u32) -> pb::TaskAssignment {
    pb::TaskAssignment {
        run_id: "keys".into(),
        round: 1,
        task_id: format!("r1a{attempt}-train"),
        secure_aggregation: true,
        ..Default::default()
    }
}

/// Merchant k's update: every coordinate (k + 1) / 100, weight 10.
fn output(k: usize) -> TaskOutput {
    let values = vec![(k + 1) as f32 / 100.0; DIM];
    TaskOutput {
        update: Some(Update {
            values,
            coord_weights: Vec::new(),
            weight: 10.0,
        }),
        metrics: BTreeMap::new(),
        weight: 10.0,
        validation_weight: 0.0,
    }
}

/// Passes a pushed stage request through the protobuf codec, as the
/// service's `Work` stream does.
fn over_the_wire(req: pb::SecAggRequest) -> pb::SecAggRequest {
    let work = pb::Work {
        kind: Some(pb::work::Kind::Secagg(req)),
    };
    match pb::Work::decode(work.encode_to_vec().as_slice())
        .unwrap()
        .kind
    {
        Some(pb::work::Kind::Secagg(r)) => r,
        other => panic!("not a secagg request: {other:?}"),
    }
}

/// Task `t`'s request for `stage`, with `body` and the roster's
/// `key_bindings`, as the service's `Work` stream delivers it.
fn stage_request(
    t: &pb::TaskAssignment,
    stage: &str,
    body: Vec<u8>,
    key_bindings: Vec<pb::KeyBinding>,
) -> pb::SecAggRequest {
    over_the_wire(pb::SecAggRequest {
        run_id: t.run_id.clone(),
        round: t.round,
        task_id: t.task_id.clone(),
        stage: stage.into(),
        body,
        key_bindings,
    })
}

/// The advertise stage's request inviting an agent to task `t`'s round.
fn invitation(t: &pb::TaskAssignment, invite: &RoundInvite) -> pb::SecAggRequest {
    stage_request(t, stage_name::ADVERTISE, invite.to_json(), Vec::new())
}

/// What the coordinator holds after the advertise stage: its session, the
/// roster and one binding per entry (the signature each agent sent and the
/// certificate it would have presented on its mTLS connection).
struct Advertised {
    server: ServerSession,
    roster: KeyRoster,
    bindings: Vec<pb::KeyBinding>,
    config: SecAggConfig,
    context: BindingContext,
}

/// Opens a round: every agent holds its update and answers its invitation.
fn advertise(pki: &Pki, agents: &mut [SecureTasks], t: &pb::TaskAssignment) -> Advertised {
    let config = SecAggConfig::complete(DIM, 0, N, 1.0);
    advertise_with(pki, agents, t, config, None)
}

/// [`advertise`] with the round's configuration and the task's
/// differential privacy as the coordinator sets them.
fn advertise_with(
    pki: &Pki,
    agents: &mut [SecureTasks],
    t: &pb::TaskAssignment,
    config: SecAggConfig,
    dp: Option<DpTask>,
) -> Advertised {
    let given = vec![t.clone(); agents.len()];
    advertise_given(pki, agents, &given, config, dp)
}

/// [`advertise_with`] where agent k was given the task `given[k]` (the same
/// run, round and task id; an honest coordinator gives every agent the
/// same task).
fn advertise_given(
    pki: &Pki,
    agents: &mut [SecureTasks],
    given: &[pb::TaskAssignment],
    config: SecAggConfig,
    dp: Option<DpTask>,
) -> Advertised {
    let t = &given[0];
    let rs = round_seed(fedcart_common::seed::derive(42, &["secagg", &t.task_id]));
    let ids: Vec<u32> = (0..N as u32).collect();
    let mut server = ServerSession::new(config.clone(), rs, &ids).unwrap();
    let mut bindings = Vec::new();
    for (k, agent) in agents.iter_mut().enumerate() {
        let merchant = format!("m{k}");
        agent.hold(&given[k], 42, &merchant, dp.clone(), output(k));
        let invite = RoundInvite {
            config: config.clone(),
            round_seed: rs,
            id: k as u32,
            participants: N,
        };
        let req = invitation(t, &invite);
        let Reply::Message(msg) = agent.respond(&format!("s{k}"), &req).unwrap() else {
            panic!("advertise answers with a message");
        };
        assert!(msg.key_signature.is_some(), "m{k} signs its keys");
        server
            .on_advertise(AdvertiseKeys::from_bytes(&msg.body).unwrap())
            .unwrap();
        bindings.push(pb::KeyBinding {
            agent: k as u32,
            merchant_id: merchant.clone(),
            certificate_chain: vec![cert_der(&pki.ca, &merchant)],
            signature: msg.key_signature,
        });
    }
    let roster = server.close_advertise().unwrap();
    Advertised {
        server,
        roster,
        bindings,
        config,
        context: BindingContext {
            run_id: t.run_id.clone(),
            round: t.round,
            task_id: t.task_id.clone(),
            round_seed: rs,
            task_digest: task_digest(&t.spec_json, t.model_version, t.model_len, &t.model_digest),
        },
    }
}

/// Sends the (possibly tampered) roster to every agent; returns the refusals
/// and feeds the share uploads to the server.
fn share_keys(
    a: &mut Advertised,
    agents: &mut [SecureTasks],
    t: &pb::TaskAssignment,
) -> Vec<SecureError> {
    let req = stage_request(
        t,
        stage_name::SHARE_KEYS,
        a.roster.to_bytes(),
        a.bindings.clone(),
    );
    let mut refused = Vec::new();
    for (k, agent) in agents.iter_mut().enumerate() {
        match agent.respond(&format!("s{k}"), &req) {
            Ok(Reply::Message(msg)) => a
                .server
                .on_shares(ShareUpload::from_bytes(&msg.body).unwrap())
                .unwrap(),
            Ok(_) => panic!("share_keys answers with a message"),
            Err(e) => refused.push(e),
        }
    }
    refused
}

/// Runs the rest of an honest round; returns the decoded sum's values.
fn finish(a: Advertised, agents: &mut [SecureTasks], t: &pb::TaskAssignment) -> Vec<f64> {
    finish_masked(a, agents, t).1
}

/// [`finish`], also returning each agent's masked input as it was sent.
fn finish_masked(
    mut a: Advertised,
    agents: &mut [SecureTasks],
    t: &pb::TaskAssignment,
) -> (Vec<Vec<u8>>, Vec<f64>) {
    let request = |stage: &str, body: Vec<u8>| stage_request(t, stage, body, Vec::new());
    let mut masked = Vec::new();
    for relay in a.server.close_shares().unwrap() {
        let k = relay.to as usize;
        let req = request(stage_name::MASKED_INPUT, relay.to_bytes());
        let Reply::Masked { payload, .. } = agents[k].respond("s", &req).unwrap() else {
            panic!("masked_input answers with an upload");
        };
        a.server.on_masked_bytes(&payload).unwrap();
        masked.push(payload.to_vec());
    }
    let AfterMasked::Unmask(requests) = a.server.close_masked().unwrap() else {
        panic!("no survivor check in this round");
    };
    for q in requests {
        let req = request(stage_name::UNMASK, q.to_bytes());
        let Reply::Message(msg) = agents[q.to as usize].respond("s", &req).unwrap() else {
            panic!("unmask answers with a message");
        };
        a.server
            .on_unmask(UnmaskResponse::from_bytes(&msg.body).unwrap())
            .unwrap();
    }
    (masked, a.server.finish().unwrap().sum.values)
}

fn agents(pki: &Pki) -> Vec<SecureTasks> {
    (0..N)
        .map(|k| SecureTasks::default().with_identity(identity(&pki.ca, &format!("m{k}"))))
        .collect()
}

/// The attacker's own keys for agent 3's slot: a real session's, so they
/// are valid X25519/Ed25519 keys of the right shape.
fn attacker_keys(a: &Advertised) -> AdvertiseKeys {
    // Seeded: the test replays exactly (ChaCha8 is a CryptoRng).
    let mut rng = fedcart_common::seed::rng(7, &["attacker", &a.context.task_id]);
    let mut own = ClientSession::new(a.config.clone(), 3, a.context.round_seed, &mut rng);
    own.advertise().unwrap()
}

/// Signs `keys` as merchant `claimed` with the key of `signer`'s certificate
/// issued by `ca`.
fn sign_as(
    ca: &CertDir,
    signer: &str,
    claimed: &str,
    ctx: &BindingContext,
    keys: &AdvertiseKeys,
) -> pb::KeySignature {
    let key = AdvertSigner::from_pem(&std::fs::read(ca.key(signer)).unwrap()).unwrap();
    let sig = key.sign(&signed_message(ctx, claimed, keys)).unwrap();
    pb::KeySignature {
        scheme: u32::from(sig.scheme),
        signature: sig.signature,
    }
}

/// Every agent refused the roster because of m3's entry, for `reason`; the
/// server then has no shares, the round aborts and no sum is released.
fn assert_refused_over_m3(
    mut a: Advertised,
    agents: &mut [SecureTasks],
    t: &pb::TaskAssignment,
    reason: impl Fn(&BindingError) -> bool,
) {
    let refused = share_keys(&mut a, agents, t);
    assert_eq!(refused.len(), N, "every agent refuses: {refused:?}");
    for e in &refused {
        let SecureError::KeyBinding { source, .. } = e else {
            panic!("refused for another reason: {e}");
        };
        assert_eq!(
            (source.agent, source.merchant.as_str()),
            (3, "m3"),
            "{source}"
        );
        assert!(reason(&source.reason), "{source}");
    }
    assert!(
        matches!(
            a.server.close_shares(),
            Err(SecAggError::TooFewSurvivors { have: 0, .. })
        ),
        "the round must abort with no sum"
    );
}

/// An agent's secrets come from its OS, never from what the coordinator or
/// the other merchants know (the run seed, the task id, the round seed):
/// the same round given twice to fresh agents holding the same updates
/// draws other key pairs and other masked inputs (other pairwise and
/// self-mask seeds), and both rounds decode the same sum.
#[test]
fn an_agents_keys_and_masks_come_from_its_os_not_from_the_run_seed() {
    let pki = pki();
    let t = task(0);
    let round = || {
        let mut agents = agents(&pki);
        let mut a = advertise(&pki, &mut agents, &t);
        assert!(share_keys(&mut a, &mut agents, &t).is_empty());
        let keys = a.roster.keys.clone();
        let (masked, sum) = finish_masked(a, &mut agents, &t);
        (keys, masked, sum)
    };
    let (keys1, masked1, sum1) = round();
    let (keys2, masked2, sum2) = round();
    assert_eq!(keys1.len(), N);
    for (k1, k2) in keys1.iter().zip(&keys2) {
        assert_eq!(k1.id, k2.id);
        assert_ne!(k1.enc_pk, k2.enc_pk, "agent {}", k1.id);
        assert_ne!(k1.mask_pk, k2.mask_pk, "agent {}", k1.id);
    }
    assert_eq!(masked1.len(), N);
    for (k, (m1, m2)) in masked1.iter().zip(&masked2).enumerate() {
        assert_eq!(m1.len(), m2.len());
        assert_ne!(m1, m2, "masked input {k}");
    }
    for (a, b) in sum1.iter().zip(&sum2) {
        assert!((a - 0.1).abs() < 1e-5 && (b - 0.1).abs() < 1e-5, "{a} {b}");
    }
}

/// The round's configuration and the distributed noise planned for it
/// (z = 1 over the round's N agents).
fn planned_noise() -> (SecAggConfig, DistributedNoise) {
    let mut config = SecAggConfig::complete(DIM, 0, N, 1.0);
    let planned = DistributedNoise {
        skellam: DistributedSkellam::new(1.0, 1.0, 1000.0, DIM, N).unwrap(),
        bit_variance: 0.0,
        secagg_clip: 1.0,
        modulus_bits: 32,
    };
    planned.configure(&mut config);
    (config, planned)
}

/// A round's ε is charged to the merchant's ledger, durably, before its
/// masked input leaves: an agent whose ledger cannot be written sends no
/// masked input for that round (the others do), and its budget is unchanged.
#[test]
fn an_agent_whose_ledger_cannot_be_written_sends_no_masked_input() {
    use fedcart_client::budget::Budget;
    use fedcart_client::state::StateDir;
    let pki = pki();
    let t = task(0);
    let (config, noise) = planned_noise();
    let dp = DpTask {
        clip: 1.0,
        clip_bit: false,
        distributed: Some(noise),
    };
    let dir = tempfile::tempdir().unwrap();
    let ledger_dir = dir.path().join("m0-state");
    let mut agents = agents(&pki);
    let budget = Budget::open(StateDir::open(&ledger_dir).unwrap(), 100.0, 1e-5).unwrap();
    agents[0].set_budget(budget);
    let mut a = advertise_with(&pki, &mut agents, &t, config, Some(dp));
    assert!(share_keys(&mut a, &mut agents, &t).is_empty());
    // A file where the ledger's directory was: no write succeeds, not even
    // as root.
    std::fs::remove_dir_all(&ledger_dir).unwrap();
    std::fs::write(&ledger_dir, b"not a directory").unwrap();
    let mut sent = Vec::new();
    for relay in a.server.close_shares().unwrap() {
        let k = relay.to as usize;
        let req = stage_request(&t, stage_name::MASKED_INPUT, relay.to_bytes(), Vec::new());
        match agents[k].respond("s", &req) {
            Ok(Reply::Masked { .. }) => sent.push(k),
            Err(e @ SecureError::Ledger { .. }) if k == 0 => {
                assert!(e.to_string().contains("r1a0-train"), "{e}");
            }
            other => panic!("agent {k}: {other:?}"),
        }
    }
    assert_eq!(sent, [1, 2, 3]);
    assert!(agents[0].budget().unwrap().rounds().is_empty());
}

/// A coordinator that gives merchant m0 its task and the others of the
/// same secure round another one under the same id (a learning rate of 0,
/// so that the unmasked sum is m0's update alone; a thinner DP noise, so
/// that the sum carries less than m0 is charged for; other model values
/// under the same version) got m0's exact update
/// from a round of normal size (found by an attacker probe, with every
/// policy floor met). Each advertisement is signed over the task's digest:
/// every agent refuses the roster, nothing is masked, and no sum is
/// released.
#[test]
fn secure_round_whose_agents_were_given_different_tasks_is_refused_by_every_agent() {
    let pki = pki();
    let mut agents = agents(&pki);
    let honest = pb::TaskAssignment {
        spec_json: br#"{"sgd":{"learning_rate":0.05}}"#.to_vec(),
        model_version: 1,
        model_len: DIM as u64,
        model_digest: vec![7; 32],
        ..task(0)
    };
    let config = SecAggConfig::complete(DIM, 0, N, 1.0);
    for other in [
        pb::TaskAssignment {
            spec_json: br#"{"sgd":{"learning_rate":0.0}}"#.to_vec(),
            ..honest.clone()
        },
        pb::TaskAssignment {
            model_version: 0,
            ..honest.clone()
        },
        // Other model values under the same version (each agent checks
        // the values it trains from against the digest it signs).
        pb::TaskAssignment {
            model_digest: vec![9; 32],
            ..honest.clone()
        },
    ] {
        let mut given = vec![other; N];
        given[0] = honest.clone();
        let mut a = advertise_given(&pki, &mut agents, &given, config.clone(), None);
        let refused = share_keys(&mut a, &mut agents, &honest);
        assert_eq!(refused.len(), N, "every agent refuses: {refused:?}");
        for (k, e) in refused.iter().enumerate() {
            let SecureError::KeyBinding { source, .. } = e else {
                panic!("m{k} refused for another reason: {e}");
            };
            assert_eq!(source.reason, BindingError::BadSignature, "{source}");
            // m0 finds a peer's signature over another task; each of the
            // others finds m0's.
            if k == 0 {
                assert_ne!(source.merchant, "m0", "{source}");
            } else {
                assert_eq!(source.merchant, "m0", "{source}");
            }
        }
        assert!(
            matches!(
                a.server.close_shares(),
                Err(SecAggError::TooFewSurvivors { have: 0, .. })
            ),
            "the round must abort with no sum"
        );
    }
    // Given one task, the same agents commit the exact sum.
    let mut a = advertise_given(&pki, &mut agents, &vec![honest.clone(); N], config, None);
    assert!(share_keys(&mut a, &mut agents, &honest).is_empty());
    for v in finish(a, &mut agents, &honest) {
        assert!((v - 0.1).abs() < 1e-5, "sum {v}");
    }
}

/// The round seed fixes the neighbour graph, and the docs said it is the
/// public one the run seed derives; agents took any seed the coordinator
/// sent, so a coordinator could grind seeds to choose a merchant's
/// neighbours (found by an attacker probe). An invitation with another
/// seed is refused before any key is made.
#[test]
fn a_round_seed_the_coordinator_chose_is_refused_at_the_invitation() {
    let pki = pki();
    let mut agents = agents(&pki);
    let t = task(0);
    agents[0].hold(&t, 42, "m0", None, output(0));
    let invite = |round_seed| RoundInvite {
        config: SecAggConfig::complete(DIM, 0, N, 1.0),
        round_seed,
        id: 0,
        participants: N,
    };
    let request = |invite: RoundInvite| invitation(&t, &invite);
    // A seed of the coordinator's choosing, and another attempt's (seeds
    // are per task id).
    let other = round_seed(fedcart_common::seed::derive(42, &["secagg", "r1a9-train"]));
    for chosen in [[7; 32], other] {
        let refused = agents[0]
            .respond("s0", &request(invite(chosen)))
            .expect_err("a seed the run seed does not derive is refused");
        assert!(
            refused
                .to_string()
                .contains("the round seed is not the one the run seed"),
            "{refused}"
        );
        // A refusal ends the agent's part in the task: held again.
        agents[0].hold(&t, 42, "m0", None, output(0));
    }
    let honest = round_seed(fedcart_common::seed::derive(42, &["secagg", &t.task_id]));
    let answer = agents[0].respond("s0", &request(invite(honest)));
    assert!(matches!(answer, Ok(Reply::Message(_))), "{answer:?}");
}

/// A coordinator replaying stage messages: a second masked-input request
/// for the same task gets no second masked input (the update is gone once
/// sent), and a roster of an earlier attempt, replayed to an agent in the
/// next one, is refused before any share leaves it. The attacker probe of
/// session 46 found both refused by reading the code, with no test trying.
#[test]
fn replayed_stage_messages_get_nothing_from_an_agent() {
    let pki = pki();
    let mut agents = agents(&pki);
    let t0 = task(0);
    let mut a = advertise(&pki, &mut agents, &t0);
    let old_roster = stage_request(
        &t0,
        stage_name::SHARE_KEYS,
        a.roster.to_bytes(),
        a.bindings.clone(),
    );
    assert!(share_keys(&mut a, &mut agents, &t0).is_empty());
    let relay = a
        .server
        .close_shares()
        .unwrap()
        .into_iter()
        .find(|r| r.to == 0)
        .unwrap();
    let masked = stage_request(&t0, stage_name::MASKED_INPUT, relay.to_bytes(), Vec::new());
    assert!(matches!(
        agents[0].respond("s0", &masked),
        Ok(Reply::Masked { .. })
    ));
    let again = agents[0].respond("s0", &masked);
    assert!(
        matches!(again, Err(SecureError::NoUpdate { .. })),
        "a second masked input: {again:?}"
    );

    // The next attempt: every agent holds its new task; the old roster,
    // replayed to m1, names the old task and gets no share bundle.
    let t1 = task(1);
    let mut b = advertise(&pki, &mut agents, &t1);
    let replayed = agents[1].respond("s1", &old_roster);
    assert!(
        matches!(&replayed, Err(SecureError::NoUpdate { task_id, .. }) if task_id == &t0.task_id),
        "{replayed:?}"
    );
    // The refusal ended m1's part in the new attempt too (an agent leaves a
    // round on any refused request): the others still share keys.
    let refused = share_keys(&mut b, &mut agents, &t1);
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert!(
        matches!(refused[0], SecureError::NoUpdate { .. }),
        "{refused:?}"
    );
}

#[test]
fn secure_round_with_keys_substituted_by_the_coordinator_is_refused_by_every_agent() {
    let pki = pki();
    let mut agents = agents(&pki);
    let t = task(0);
    let mut a = advertise(&pki, &mut agents, &t);
    // The coordinator's own valid-looking keys in m3's entry, m3's
    // signature and certificate copied.
    a.roster.keys[3] = attacker_keys(&a);
    assert_refused_over_m3(a, &mut agents, &t, |r| *r == BindingError::BadSignature);

    // The agents keep serving: the next attempt, honestly relayed, commits
    // the exact sum of the four inputs.
    let t = task(1);
    let mut a = advertise(&pki, &mut agents, &t);
    assert!(share_keys(&mut a, &mut agents, &t).is_empty());
    let sum = finish(a, &mut agents, &t);
    for v in sum {
        assert!(
            (v - 0.1).abs() < 1e-5,
            "sum {v}, expected 0.01 + 0.02 + 0.03 + 0.04"
        );
    }
}

#[test]
fn secure_round_whose_m3_entry_carries_another_merchants_certificate_is_refused() {
    let pki = pki();
    let mut agents = agents(&pki);
    let t = task(0);
    let mut a = advertise(&pki, &mut agents, &t);
    // A colluding merchant with a valid certificate signs the coordinator's
    // keys as "m3": the signature verifies, the identity does not match.
    let keys = attacker_keys(&a);
    a.bindings[3].signature = Some(sign_as(&pki.ca, "evil", "m3", &a.context, &keys));
    a.bindings[3].certificate_chain = vec![cert_der(&pki.ca, "evil")];
    a.roster.keys[3] = keys;
    assert_refused_over_m3(a, &mut agents, &t, |r| {
        *r == BindingError::IdentityMismatch {
            certificate: "evil".into(),
        }
    });
}

#[test]
fn secure_round_whose_m3_certificate_comes_from_another_ca_is_refused() {
    let pki = pki();
    let mut agents = agents(&pki);
    let t = task(0);
    let mut a = advertise(&pki, &mut agents, &t);
    // The coordinator's own CA issued "m3" a certificate and signed its keys.
    let keys = attacker_keys(&a);
    a.bindings[3].signature = Some(sign_as(&pki.rogue, "m3", "m3", &a.context, &keys));
    a.bindings[3].certificate_chain = vec![cert_der(&pki.rogue, "m3")];
    a.roster.keys[3] = keys;
    assert_refused_over_m3(a, &mut agents, &t, |r| {
        matches!(r, BindingError::Untrusted(_))
    });
}

#[test]
fn secure_round_with_an_unsigned_or_uncertified_entry_is_refused() {
    let pki = pki();
    let mut agents = agents(&pki);
    let t = task(0);
    let mut a = advertise(&pki, &mut agents, &t);
    a.bindings[3].certificate_chain.clear();
    assert_refused_over_m3(a, &mut agents, &t, |r| *r == BindingError::NoCertificate);
    let t = task(1);
    let mut a = advertise(&pki, &mut agents, &t);
    a.bindings[3].signature = None;
    assert_refused_over_m3(a, &mut agents, &t, |r| *r == BindingError::NoSignature);
}

pub(crate) fn client_tls(ca: &CertDir, id: &str) -> tonic::transport::ClientTlsConfig {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(ca.ca_cert()).unwrap()))
        .domain_name("localhost")
        .identity(Identity::from_pem(
            std::fs::read(ca.cert(id)).unwrap(),
            std::fs::read(ca.key(id)).unwrap(),
        ))
}

/// The next non-ping message of a work stream.
async fn next_work(work: &mut tonic::Streaming<pb::Work>) -> pb::work::Kind {
    loop {
        let msg = work.message().await.unwrap().expect("stream open");
        match msg.kind {
            Some(pb::work::Kind::Ping(_)) | None => continue,
            Some(k) => return k,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secure_round_over_mtls_binds_keys_and_a_badly_signed_advertisement_drops_only_its_sender()
{
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let ca = CertDir::new(dir.path());
    certs::init(&ca, &["localhost".into()]).unwrap();
    let files = TlsFiles::in_dir(dir.path());
    for k in 0..N {
        certs::issue(&ca, &format!("m{k}")).unwrap();
        certs::allow(&files.access, &format!("m{k}")).unwrap();
    }
    let mut run = churn_run("keys-mtls", 1, N, N - 1);
    run.model = ModelSpec::Noop { dim: 50 };
    run.evaluate = false;
    run.secagg = Some(SecAggSettings {
        neighbours: None,
        clip: 1.0,
        verify_survivors: false,
        stage_timeout_ms: Some(120_000),
    });
    let store = tempfile::tempdir().unwrap();
    let coord = start_with(
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
        &store.path().join("c.redb"),
        run,
        std::time::Duration::from_millis(500),
        ServeOptions {
            transport: Transport::Tls(files),
            ..ServeOptions::insecure()
        },
    )
    .await
    .expect("TLS coordinator starts");
    let url = format!("https://localhost:{}", coord.addr.port());

    // m0 joins by hand and signs its advertisement badly.
    let channel = tonic::transport::Endpoint::from_shared(url.clone())
        .unwrap()
        .tls_config(client_tls(&ca, "m0"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = pb::coordinator_client::CoordinatorClient::new(channel);
    let mut work = client
        .join(pb::JoinRequest {
            merchant_id: "m0".into(),
            examples: Default::default(),
            agent_version: "test".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let pb::work::Kind::Welcome(welcome) = next_work(&mut work).await else {
        panic!("welcome first");
    };
    // The honest agents, with their certificates and signing keys.
    let spawn_honest = |k: usize| {
        let id = format!("m{k}");
        let data = LocalData {
            merchant_id: id.clone(),
            ..Default::default()
        };
        let mut a = Agent::new(url.clone(), data).with_key_identity(identity(&ca, &id));
        a.tls = Some(client_tls(&ca, &id));
        spawn_configured(a)
    };
    let mut honest: Vec<_> = (1..N).map(spawn_honest).collect();
    let pb::work::Kind::Task(t) = next_work(&mut work).await else {
        panic!("a task after the welcome");
    };
    let mut secure = SecureTasks::default().with_identity(identity(&ca, "m0"));
    secure.hold(&t, 42, "m0", None, output(0));
    let pb::work::Kind::Secagg(req) = next_work(&mut work).await else {
        panic!("the advertise request");
    };
    let Reply::Message(msg) = secure.respond(&welcome.session_id, &req).unwrap() else {
        panic!("advertise answers with a message");
    };
    let mut forged = msg.clone();
    if let Some(sig) = forged.key_signature.as_mut() {
        let last = sig.signature.len() - 1;
        sig.signature[last] ^= 1;
    }
    let err = client.sec_agg(forged).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    assert!(err.message().contains("refused"), "{err}");
    let unsigned = pb::SecAggMessage {
        key_signature: None,
        ..msg
    };
    let err = client.sec_agg(unsigned).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    assert!(err.message().contains("not signed"), "{err}");
    // m0 leaves; the others verified each other's bindings and commit.
    drop(work);
    drop(client);
    let mut progress = coord.progress.clone();
    progress.wait_for(|p| p.records >= 1).await.unwrap();
    // m0 comes back honest for the evaluation that hands out the version
    // (it selects all four).
    honest.push(spawn_honest(0));
    let shared = coord.shared.clone();
    coord.wait_finished().await.unwrap();
    for a in honest {
        a.stop().await;
    }
    let history = shared.history().unwrap();
    let train: Vec<_> = history
        .iter()
        .filter(|r| r.kind == TaskKind::Train)
        .collect();
    assert_eq!(train.len(), 1, "{history:?}");
    assert_eq!(train[0].outcome, Outcome::Committed, "{:?}", train[0]);
    assert_eq!(train[0].reported, vec!["m1", "m2", "m3"]);
}

#[test]
fn secure_round_whose_roster_lacks_m3s_keys_or_names_an_unlisted_agent_is_refused_naming_agent_3() {
    let pki = pki();
    let mut agents = agents(&pki);
    // m3's keys left out while its id stays listed: every agent uses them
    // (complete graph), so every agent refuses before sharing anything.
    let t = task(0);
    let mut a = advertise(&pki, &mut agents, &t);
    a.roster.keys.retain(|k| k.id != 3);
    let refused = share_keys(&mut a, &mut agents, &t);
    assert_eq!(refused.len(), N, "every agent refuses: {refused:?}");
    for (k, e) in refused.iter().enumerate() {
        let SecureError::Protocol { stage, source } = e else {
            panic!("refused for another reason: {e}");
        };
        assert_eq!(stage, stage_name::SHARE_KEYS);
        let expected = if k == 3 {
            "the roster does not carry this agent's own keys".to_string()
        } else {
            "the roster lacks the keys of agent 3, which this agent needs".to_string()
        };
        assert_eq!(*source, SecAggError::Refused(expected), "agent {k}");
    }
    assert!(matches!(
        a.server.close_shares(),
        Err(SecAggError::TooFewSurvivors { have: 0, .. })
    ));

    // Agent 3 dropped from the id list but its keys still relayed.
    let t = task(1);
    let mut a = advertise(&pki, &mut agents, &t);
    a.roster.ids.retain(|&id| id != 3);
    let refused = share_keys(&mut a, &mut agents, &t);
    assert_eq!(refused.len(), N, "every agent refuses: {refused:?}");
    for e in &refused {
        assert!(
            e.to_string().contains("agent 3") || format!("{e:?}").contains("agent 3"),
            "{e}"
        );
    }

    // The agents keep serving: the next attempt, honestly relayed, commits.
    let t = task(2);
    let mut a = advertise(&pki, &mut agents, &t);
    assert!(share_keys(&mut a, &mut agents, &t).is_empty());
    assert_eq!(finish(a, &mut agents, &t).len(), DIM);
}

/// Distributed DP against a curious coordinator, which sets both the noise
/// each agent adds and the round it adds it to. Splitting the noise across
/// far more agents than the round has shrinks every share: an agent whose
/// policy sets a floor on z refuses the round at the share-keys stage,
/// before any masked input. Noise laid on fewer coordinates than the update
/// has, or calibrated for another encoding, is refused by every agent. The
/// round as planned runs to its sum.
#[test]
fn distributed_noise_split_too_thin_or_on_too_few_coordinates_is_refused() {
    let pki = pki();
    let t = task(0);
    let (config, planned) = planned_noise();
    let dp = |noise| DpTask {
        clip: 1.0,
        clip_bit: false,
        distributed: Some(noise),
    };
    let with_floor = || {
        let mut agents = agents(&pki);
        for a in &mut agents {
            a.set_policy(PrivacyPolicy {
                min_noise_multiplier: 0.5,
                ..a.policy().clone()
            });
        }
        agents
    };
    let mut honest = with_floor();
    let mut a = advertise_with(&pki, &mut honest, &t, config.clone(), Some(dp(planned)));
    assert!(share_keys(&mut a, &mut honest, &t).is_empty());
    assert_eq!(finish(a, &mut honest, &t).len(), DIM);

    let thin = DistributedNoise {
        skellam: DistributedSkellam::new(1.0, 1.0, 1000.0, DIM, 1_000_000).unwrap(),
        ..planned
    };
    let mut floored = with_floor();
    let mut a = advertise_with(&pki, &mut floored, &t, config.clone(), Some(dp(thin)));
    let refused = share_keys(&mut a, &mut floored, &t);
    assert_eq!(refused.len(), N, "{refused:?}");
    let chain = |e: &SecureError| {
        let mut text = e.to_string();
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            text = format!("{text}: {s}");
            source = s.source();
        }
        text
    };
    for e in &refused {
        let text = chain(e);
        assert!(
            matches!(e, SecureError::Policy { .. })
                && text.contains("min_noise_multiplier")
                && text.contains("split across 1000000 agents, 4 in the round"),
            "{text}"
        );
    }
    assert!(
        a.server.close_shares().is_err(),
        "no masked input is asked for"
    );

    let few = DistributedNoise {
        skellam: DistributedSkellam::new(1.0, 1.0, 1000.0, 1, N).unwrap(),
        ..planned
    };
    let mut scaled = config.clone();
    scaled.scale *= 100.0;
    for (noise, config, why) in [
        (few, &config, "covers 1 coordinates, the update has 16"),
        (planned, &scaled, "calibrated for the scale 1000"),
    ] {
        // Without a floor in the policy: the noise is still refused.
        let mut plain = agents(&pki);
        let mut a = advertise_with(&pki, &mut plain, &t, config.clone(), Some(dp(noise)));
        let refused = share_keys(&mut a, &mut plain, &t);
        assert_eq!(refused.len(), N, "{refused:?}");
        assert!(
            refused.iter().all(|e| chain(e).contains(why)),
            "{refused:?}"
        );
    }
}
