//! End-to-end checks of secure aggregation through the in-memory driver and
//! through hand-driven sessions (for the refusal and abort paths).

use fedcart_common::federation::update::Update;
use fedcart_common::privacy::secagg::{
    AfterMasked, ClientSession, Dropouts, KeyRoster, RingVec, SecAggConfig, SecAggError,
    ServerSession, ShareRelay, ShareUpload, Stage, SurvivorCheck, SurvivorSignature, UnmaskRequest,
    UnmaskResponse, encode, masked_from_bytes, round_seed, rounding_rng, run_in_memory,
};
use rand::{RngExt, SeedableRng};
use rand_chacha::{ChaCha8Rng, ChaCha20Rng};

const SEED: u64 = 2026;

/// Seeded updates: values in [−1.2, 1.2] (some beyond a clip of 1.0),
/// integer coordinate weights and example weights.
fn inputs(n: usize, d: usize, cw: usize, seed: u64) -> Vec<Update> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| Update {
            values: (0..d).map(|_| rng.random_range(-1.2f32..1.2)).collect(),
            coord_weights: (0..cw).map(|_| rng.random_range(0..6) as f32).collect(),
            weight: rng.random_range(1..100) as f64,
        })
        .collect()
}

fn config(n: usize, d: usize, cw: usize, sparse: bool) -> SecAggConfig {
    let mut c = if sparse {
        SecAggConfig::sparse(d, cw, n, 1.0)
    } else {
        SecAggConfig::complete(d, cw, n, 1.0)
    };
    if sparse {
        // A third of the holders: survives 30 % random dropouts.
        c.threshold = (c.neighbours + 1) / 3;
    }
    c.max_weight = 1000.0;
    c
}

/// `count` ids spread over 0..n, deterministic.
fn spread(n: usize, count: usize, offset: usize) -> Vec<u32> {
    (0..count)
        .map(|i| ((i * n / count.max(1) + offset) % n) as u32)
        .collect()
}

fn dropouts_at(stage: Stage, ids: Vec<u32>) -> Dropouts {
    let mut d = Dropouts::none();
    match stage {
        Stage::Advertise => d.advertise = ids,
        Stage::ShareKeys => d.share_keys = ids,
        Stage::MaskedInput => d.masked_input = ids,
        Stage::Unmask => d.unmask = ids,
        _ => unreachable!(),
    }
    d
}

/// Runs the round and checks the secure sum against the plain sum of the
/// survivors' encodings (exactly) and of their clipped values (within
/// quantisation).
fn check_round(c: &SecAggConfig, ups: &[Update], dropouts: &Dropouts, seed: u64) {
    let outcome =
        run_in_memory(c, ups, dropouts, seed).unwrap_or_else(|e| panic!("{dropouts:?}: {e}"));
    let out = outcome.output;
    let gone: Vec<u32> = [
        &dropouts.advertise,
        &dropouts.share_keys,
        &dropouts.masked_input,
    ]
    .into_iter()
    .flatten()
    .copied()
    .collect();
    let expected_survivors: Vec<u32> = (0..ups.len() as u32)
        .filter(|i| !gone.contains(i))
        .collect();
    assert_eq!(out.survivors, expected_survivors);

    let mut plain = RingVec::zeros(c.modulus_bits, c.vector_len());
    let mut clipped_sum = vec![0f64; c.num_values];
    let mut weight = 0.0;
    for &id in &out.survivors {
        let u = &ups[id as usize];
        let e = encode(c, u, &mut rounding_rng(seed, id)).unwrap();
        plain.wrapping_add_assign(e.vector());
        for (s, v) in clipped_sum.iter_mut().zip(&u.values) {
            *s += f64::from(v.clamp(-c.clip, c.clip));
        }
        weight += u.weight;
    }
    assert_eq!(out.raw_sum, plain, "ring sums differ with {dropouts:?}");
    for (got, want) in out.sum.values.iter().zip(&clipped_sum) {
        // Quantisation, plus f64 rounding of codes beyond 2^53 in wide rings.
        let tol = out.survivors.len() as f64 / c.scale + 1e-12 * want.abs();
        assert!(
            (got - want).abs() <= tol,
            "decoded {got} vs {want} (tol {tol})"
        );
    }
    assert_eq!(out.sum.weight, weight);
    assert_eq!(out.sum.count, out.survivors.len());
}

const ALL_STAGES: [Stage; 4] = [
    Stage::Advertise,
    Stage::ShareKeys,
    Stage::MaskedInput,
    Stage::Unmask,
];

/// No dropouts, then 10 % and 30 % of the agents dropping at each stage.
fn matrix(n: usize, d: usize, sparse: bool, stages: &[Stage]) {
    matrix_with(n, &config(n, d, 3, sparse), 1.0, stages);
}

/// [`matrix`] for `n` agents under configuration `c` (e.g. another
/// modulus), with the seeded inputs' values multiplied by `magnitude`.
fn matrix_with(n: usize, c: &SecAggConfig, magnitude: f32, stages: &[Stage]) {
    let mut ups = inputs(n, c.num_values, c.num_coord_weights, n as u64);
    for u in &mut ups {
        u.values.iter_mut().for_each(|v| *v *= magnitude);
    }
    let c = c.clone();
    check_round(&c, &ups, &Dropouts::none(), SEED);
    for &stage in stages {
        for frac in [0.1, 0.3] {
            let count = (frac * n as f64).round() as usize;
            check_round(
                &c,
                &ups,
                &dropouts_at(stage, spread(n, count, 1)),
                SEED + count as u64,
            );
        }
    }
}

#[test]
fn secure_sum_equals_plain_sum_n3_every_stage_and_dropout_rate() {
    matrix(3, 37, false, &ALL_STAGES);
}

#[test]
fn secure_sum_equals_plain_sum_n10_every_stage_and_dropout_rate() {
    matrix(10, 50, false, &ALL_STAGES);
}

#[test]
fn secure_sum_equals_plain_sum_n100_complete_graph() {
    matrix(100, 40, false, &ALL_STAGES);
}

#[test]
fn secure_sum_equals_plain_sum_n100_sparse_graph() {
    matrix(100, 40, true, &ALL_STAGES);
}

#[test]
fn dropouts_at_every_stage_at_once_are_recovered() {
    let c = config(20, 30, 0, false);
    let ups = inputs(20, 30, 0, 5);
    let d = Dropouts {
        advertise: vec![1],
        share_keys: vec![4, 7],
        masked_input: vec![9, 13],
        unmask: vec![0, 15],
    };
    check_round(&c, &ups, &d, 11);
}

#[test]
fn malicious_server_check_passes_for_an_honest_server() {
    let mut c = config(10, 20, 2, false);
    c.verify_survivors = true;
    let ups = inputs(10, 20, 2, 8);
    check_round(&c, &ups, &dropouts_at(Stage::MaskedInput, vec![2, 5]), 3);
    check_round(&c, &ups, &dropouts_at(Stage::Unmask, vec![1, 6]), 4);
}

#[test]
fn too_few_masked_inputs_abort_before_any_share_is_requested() {
    let c = config(10, 8, 0, false); // t = 6 of 10 holders
    let ups = inputs(10, 8, 0, 1);
    let err = run_in_memory(
        &c,
        &ups,
        &dropouts_at(Stage::MaskedInput, spread(10, 5, 0)),
        1,
    )
    .unwrap_err();
    assert_eq!(
        err,
        SecAggError::TooFewSurvivors {
            stage: Stage::MaskedInput,
            have: 5,
            need: 6
        }
    );

    // Driven by hand: the abort produces no unmask request and the session
    // can no longer output anything.
    let mut h = Harness::new(c, 10);
    h.masked(&[0, 1, 2, 3, 4]);
    assert!(matches!(
        h.server.close_masked(),
        Err(SecAggError::TooFewSurvivors { .. })
    ));
    assert_eq!(h.server.stage(), Stage::Aborted);
    assert!(matches!(
        h.server.finish(),
        Err(SecAggError::WrongStage {
            actual: Stage::Aborted,
            ..
        })
    ));
}

#[test]
fn too_few_unmask_answers_abort_without_output() {
    let c = config(10, 8, 0, false);
    let ups = inputs(10, 8, 0, 1);
    let err =
        run_in_memory(&c, &ups, &dropouts_at(Stage::Unmask, spread(10, 5, 0)), 1).unwrap_err();
    assert!(
        matches!(
            err,
            SecAggError::NotEnoughShares {
                have: 5,
                need: 6,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn too_few_advertisers_abort() {
    let c = config(10, 8, 0, false);
    let ups = inputs(10, 8, 0, 1);
    let err = run_in_memory(
        &c,
        &ups,
        &dropouts_at(Stage::Advertise, spread(10, 5, 0)),
        1,
    )
    .unwrap_err();
    assert!(matches!(
        err,
        SecAggError::TooFewSurvivors {
            stage: Stage::Advertise,
            ..
        }
    ));
}

/// Drives a server and `n` clients by hand up to the masked-input stage.
struct Harness {
    server: ServerSession,
    clients: Vec<ClientSession>,
    relays: Vec<ShareRelay>,
    ups: Vec<Update>,
}

/// A server and agents 0..n of round `seed`, every agent's keys advertised
/// and the advertise stage closed: the server, the agents and the roster.
fn advertised(
    c: &SecAggConfig,
    n: usize,
    seed: u64,
) -> (ServerSession, Vec<ClientSession>, KeyRoster) {
    let ids: Vec<u32> = (0..n as u32).collect();
    let rs = round_seed(seed);
    let mut server = ServerSession::new(c.clone(), rs, &ids).unwrap();
    let mut clients: Vec<ClientSession> = ids
        .iter()
        .map(|&i| {
            ClientSession::new(
                c.clone(),
                i,
                rs,
                &mut ChaCha20Rng::seed_from_u64(u64::from(i)),
            )
        })
        .collect();
    for cl in &mut clients {
        server.on_advertise(cl.advertise().unwrap()).unwrap();
    }
    let roster = server.close_advertise().unwrap();
    (server, clients, roster)
}

impl Harness {
    fn new(c: SecAggConfig, n: usize) -> Self {
        let (mut server, mut clients, roster) = advertised(&c, n, 9);
        for cl in &mut clients {
            server.on_shares(cl.share_keys(&roster).unwrap()).unwrap();
        }
        let relays = server.close_shares().unwrap();
        let ups = inputs(n, c.num_values, c.num_coord_weights, 4);
        Self {
            server,
            clients,
            relays,
            ups,
        }
    }

    fn masked(&mut self, who: &[u32]) {
        for &i in who {
            let (m, _) = self.clients[i as usize]
                .masked_input(
                    &self.relays[i as usize],
                    &self.ups[i as usize],
                    &mut rounding_rng(1, i),
                )
                .unwrap();
            self.server.on_masked_input(i, &m).unwrap();
        }
    }
}

#[test]
fn client_refuses_a_request_for_both_secrets_of_one_agent() {
    let c = config(4, 6, 0, false);
    let mut h = Harness::new(c, 4);
    h.masked(&[0, 1, 2]);
    let AfterMasked::Unmask(reqs) = h.server.close_masked().unwrap() else {
        panic!()
    };
    let honest = reqs.iter().find(|r| r.to == 0).unwrap().clone();
    assert_eq!(honest.pairwise_of, vec![3]);
    // Ask agent 0 for both secrets of agent 1.
    let mut both = honest.clone();
    both.pairwise_of.push(1);
    let err = h.clients[0].unmask(&both).unwrap_err();
    assert!(err.to_string().contains("both"), "{err}");
    // The refusal is final: the session answers nothing afterwards.
    assert!(matches!(
        h.clients[0].unmask(&honest),
        Err(SecAggError::WrongStage { .. })
    ));
    // Asking an agent for its own pairwise key after its input went out.
    let mut own = reqs.iter().find(|r| r.to == 1).unwrap().clone();
    own.self_mask_of.retain(|&o| o != 1);
    own.pairwise_of.push(1);
    assert!(matches!(
        h.clients[1].unmask(&own),
        Err(SecAggError::Refused(_))
    ));
}

#[test]
fn server_refuses_shares_it_did_not_request() {
    let c = config(4, 6, 0, false);
    let mut h = Harness::new(c, 4);
    h.masked(&[0, 1, 2, 3]);
    let AfterMasked::Unmask(reqs) = h.server.close_masked().unwrap() else {
        panic!()
    };
    // Every request partitions the owners: no owner in both lists.
    for r in &reqs {
        assert!(
            r.pairwise_of.is_empty(),
            "nobody dropped, yet pairwise keys requested"
        );
    }
    let mut resp = h.clients[0].unmask(&reqs[0]).unwrap();
    // A response smuggling a pairwise-key share of a survivor is refused whole.
    resp.pairwise_shares.push((2, vec![1; 33]));
    assert!(matches!(
        h.server.on_unmask(resp),
        Err(SecAggError::Refused(_))
    ));
}

#[test]
fn malformed_bytes_give_errors_at_every_entry_point() {
    let junk: Vec<Vec<u8>> = vec![
        vec![],
        vec![0xff; 3],
        vec![3, 1, 0, 0],
        vec![7, 1, 9, 9, 9, 9, 0xff, 0xff, 0xff, 0xff],
    ];
    for j in &junk {
        assert!(KeyRoster::from_bytes(j).is_err());
        assert!(ShareUpload::from_bytes(j).is_err());
        assert!(ShareRelay::from_bytes(j).is_err());
        assert!(SurvivorCheck::from_bytes(j).is_err());
        assert!(UnmaskRequest::from_bytes(j).is_err());
        assert!(UnmaskResponse::from_bytes(j).is_err());
        assert!(masked_from_bytes(j, &SecAggConfig::complete(2, 0, 3, 1.0)).is_err());
    }
    // A tampered share ciphertext is caught by the AEAD, as an error.
    let c = config(3, 4, 0, false);
    let mut h = Harness::new(c.clone(), 3);
    let mut relay = h.relays[0].clone();
    relay.shares[0].ciphertext[5] ^= 1;
    let err = h.clients[0]
        .masked_input(&relay, &h.ups[0], &mut rounding_rng(1, 0))
        .unwrap_err();
    assert!(matches!(err, SecAggError::BadCiphertext { .. }), "{err}");
    // A masked vector of the wrong length or of another ring is refused.
    assert!(h.server.on_masked_input(1, &RingVec::zeros(32, 3)).is_err());
    assert!(
        h.server
            .on_masked_input(1, &RingVec::zeros(64, c.vector_len()))
            .is_err()
    );
}

#[test]
fn server_refuses_a_low_order_public_key_at_advertise() {
    let c = config(3, 4, 0, false);
    // The identity (every agreement with it is zero), u = 1 (order 4) and a
    // point of order 8 (libsodium's blocklist), as either key.
    let mut order8 = [0u8; 32];
    order8.copy_from_slice(&[
        0xe0, 0xeb, 0x7a, 0x7c, 0x3b, 0x41, 0xb8, 0xae, 0x16, 0x56, 0xe3, 0xfa, 0xf1, 0x9f, 0xc4,
        0x6a, 0xda, 0x09, 0x8d, 0xeb, 0x9c, 0x32, 0xb1, 0xfd, 0x86, 0x62, 0x05, 0x16, 0x5f, 0x49,
        0xb8, 0x00,
    ]);
    let mut one = [0u8; 32];
    one[0] = 1;
    for low in [[0; 32], one, order8] {
        for enc in [true, false] {
            let mut server = ServerSession::new(c.clone(), [1; 32], &[0, 1, 2]).unwrap();
            let mut client =
                ClientSession::new(c.clone(), 0, [1; 32], &mut ChaCha20Rng::seed_from_u64(0));
            let mut keys = client.advertise().unwrap();
            if enc {
                keys.enc_pk = low;
            } else {
                keys.mask_pk = low;
            }
            assert_eq!(
                server.on_advertise(keys),
                Err(SecAggError::BadPublicKey { agent: 0 }),
                "{low:02x?} as {}",
                if enc { "enc_pk" } else { "mask_pk" }
            );
        }
    }
    // The honest advertisement is accepted.
    let mut server = ServerSession::new(c.clone(), [1; 32], &[0, 1, 2]).unwrap();
    let mut client = ClientSession::new(c, 0, [1; 32], &mut ChaCha20Rng::seed_from_u64(0));
    assert_eq!(server.on_advertise(client.advertise().unwrap()), Ok(()));
}

#[test]
fn overflowing_configuration_is_refused_naming_the_parameter() {
    let mut c = SecAggConfig::complete(10, 0, 100, 1.0);
    assert!(c.validate(100).is_ok());
    c.scale *= 4.0;
    let err = c.validate(100).unwrap_err();
    assert!(
        matches!(
            err,
            SecAggError::Config {
                parameter: "scale",
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string().contains("or `scale` (") && err.to_string().contains("lower `clip` ("),
        "{err}"
    );
    let mut c = SecAggConfig::complete(10, 0, 100, 1.0);
    c.max_weight = 1e9;
    let err = c.validate(100).unwrap_err();
    assert!(
        matches!(
            err,
            SecAggError::Config {
                parameter: "max_weight",
                ..
            }
        ),
        "{err}"
    );
    let mut c = SecAggConfig::complete(10, 0, 100, 1.0);
    c.modulus_bits = 16;
    assert!(matches!(
        c.validate(100),
        Err(SecAggError::Config {
            parameter: "scale",
            ..
        })
    ));
    let mut c = SecAggConfig::complete(10, 0, 300, 1.0);
    c.neighbours = 299;
    assert!(matches!(
        c.validate(300),
        Err(SecAggError::Config {
            parameter: "neighbours",
            ..
        })
    ));
    // The server refuses to start a round with such a configuration.
    let mut c = SecAggConfig::complete(10, 0, 100, 1.0);
    c.scale *= 4.0;
    let ids: Vec<u32> = (0..100).collect();
    assert!(ServerSession::new(c, [0; 32], &ids).is_err());
}

#[test]
fn small_modulus_rounds_still_sum_exactly() {
    let mut c = config(10, 12, 1, false);
    c.modulus_bits = 24;
    c.scale = 1000.0;
    c.max_weight = 200.0;
    let ups = inputs(10, 12, 1, 3);
    check_round(&c, &ups, &dropouts_at(Stage::MaskedInput, vec![3]), 5);
}

#[test]
fn clipped_fraction_is_reported_in_the_sum() {
    let c = config(5, 10, 0, false);
    let mut ups = inputs(5, 10, 0, 2);
    for u in &mut ups {
        u.values.iter_mut().for_each(|v| *v = v.clamp(-0.9, 0.9));
    }
    ups[0].values[3] = 5.0;
    ups[2].values[7] = -2.0;
    ups[4].weight = 5000.0; // above max_weight = 1000
    let out = run_in_memory(&c, &ups, &Dropouts::none(), 1)
        .unwrap()
        .output;
    assert_eq!(out.sum.clipped, 3);
    assert!((out.sum.clipped_fraction() - 3.0 / (5.0 * 11.0)).abs() < 1e-12);
    assert_eq!(
        out.sum.weight,
        ups[..4].iter().map(|u| u.weight).sum::<f64>() + 1000.0
    );
}

#[test]
fn malicious_server_with_inconsistent_survivor_lists_is_refused() {
    let mut c = config(5, 6, 0, false); // k = 4, t = 3: a majority of 5 holders
    c.verify_survivors = true;
    let mut h = Harness::new(c, 5);
    h.masked(&[0, 1, 2, 3, 4]);
    let AfterMasked::CheckSurvivors(full) = h.server.close_masked().unwrap() else {
        panic!()
    };
    // The server shows 0, 1, 2 a list claiming 3 and 4 dropped, and 3, 4 the
    // true list: it hopes to get agent 3's pairwise key from 0, 1, 2 and its
    // self-mask seed from 3, 4.
    let short = SurvivorCheck {
        survivors: vec![0, 1, 2],
    };
    let sigs_short: Vec<_> = (0..3)
        .map(|i| h.clients[i].sign_survivors(&short).unwrap())
        .collect();
    let sigs_full: Vec<_> = (3..5)
        .map(|i| h.clients[i].sign_survivors(&full).unwrap())
        .collect();
    // Agent 3 sees only two signatures over its list (t = 3): refuses.
    let to3 = UnmaskRequest {
        to: 3,
        self_mask_of: vec![0, 1, 2, 3, 4],
        pairwise_of: vec![],
        survivors: full.survivors.clone(),
        signatures: sigs_full.clone(),
    };
    assert_eq!(
        h.clients[3].unmask(&to3).unwrap_err(),
        SecAggError::BadSignatures { valid: 2, need: 3 }
    );
    // Padding with signatures over the other list does not help: they do not verify.
    let to4 = UnmaskRequest {
        to: 4,
        signatures: sigs_full.iter().chain(&sigs_short).cloned().collect(),
        ..to3.clone()
    };
    let to4 = UnmaskRequest { to: 4, ..to4 };
    assert_eq!(
        h.clients[4].unmask(&to4).unwrap_err(),
        SecAggError::BadSignatures { valid: 2, need: 3 }
    );
    // Agent 0 is shown its signed list but a request that contradicts it.
    let to0 = UnmaskRequest {
        to: 0,
        self_mask_of: vec![0, 1, 2, 3],
        pairwise_of: vec![4],
        survivors: short.survivors.clone(),
        signatures: sigs_short,
    };
    assert!(matches!(
        h.clients[0].unmask(&to0),
        Err(SecAggError::Refused(_))
    ));
}

/// A coordinator that relays selectively pads the survivor list with agents
/// whose inputs it throws away, to recover one agent's input alone (found by
/// a security review): target X gets only the bundles of P, whom the
/// coordinator then declares dropped; the decoys D get everyone's bundles,
/// mask, sign and hold X's shares. The list {X} ∪ D passes every check but
/// describes no sum: X's input is masked against P alone. Each agent now
/// refuses a list naming a neighbour whose shares never reached it (U3 ⊆ U2
/// of Bonawitz et al.), so X signs nothing and reveals nothing, and the
/// decoys alone are fewer than t: the signatures, and the shares of X's
/// self-mask seed, stay short of the threshold.
#[test]
fn a_survivor_list_padded_with_agents_outside_an_agents_mask_peers_is_refused() {
    const X: u32 = 0;
    let p = [1u32, 2, 3, 4];
    let d = [5u32, 6, 7, 8];
    for verify in [true, false] {
        let mut c = config(9, 6, 0, false);
        c.verify_survivors = verify;
        assert_eq!(c.threshold, 5, "a majority of 9");
        let (_, mut clients, roster) = advertised(&c, 9, 3);
        let uploads: Vec<_> = clients
            .iter_mut()
            .map(|cl| cl.share_keys(&roster).unwrap())
            .collect();
        let relay = |to: u32, from: &[u32]| ShareRelay {
            to,
            shares: from
                .iter()
                .flat_map(|&f| uploads[f as usize].shares.iter())
                .filter(|s| s.to == to)
                .cloned()
                .collect(),
        };
        let ups = inputs(9, c.num_values, c.num_coord_weights, 4);
        // X masks against the P's alone (t − 1 peers, which it accepts).
        clients[X as usize]
            .masked_input(&relay(X, &p), &ups[0], &mut rounding_rng(1, X))
            .unwrap();
        // Each decoy masks against X, the P's and the other decoys.
        for &i in &d {
            let from: Vec<u32> = (0..9).filter(|&f| f != i).collect();
            clients[i as usize]
                .masked_input(&relay(i, &from), &ups[i as usize], &mut rounding_rng(1, i))
                .unwrap();
        }
        let list: Vec<u32> = std::iter::once(X).chain(d).collect();
        let padded = |to: u32, signatures: Vec<SurvivorSignature>| UnmaskRequest {
            to,
            // X is asked only for what it holds.
            self_mask_of: if to == X { vec![X] } else { list.clone() },
            pairwise_of: p.to_vec(),
            survivors: list.clone(),
            signatures,
        };
        if verify {
            let check = SurvivorCheck {
                survivors: list.clone(),
            };
            let err = clients[X as usize].sign_survivors(&check).unwrap_err();
            assert!(
                err.to_string()
                    .contains("names agent 5, a neighbour whose shares never reached"),
                "{err}"
            );
            // The decoys' own views agree with the list: they sign, but four
            // signatures are one short of t, so none of them reveals a share.
            let sigs: Vec<_> = d
                .iter()
                .map(|&i| clients[i as usize].sign_survivors(&check).unwrap())
                .collect();
            for &i in &d {
                assert_eq!(
                    clients[i as usize]
                        .unmask(&padded(i, sigs.clone()))
                        .unwrap_err(),
                    SecAggError::BadSignatures { valid: 4, need: 5 }
                );
            }
        } else {
            let err = clients[X as usize]
                .unmask(&padded(X, Vec::new()))
                .unwrap_err();
            assert!(err.to_string().contains("names agent 5"), "{err}");
            // The decoys answer, but their shares of X's self-mask seed are
            // four, one short of t: X's input stays masked.
            let shares: usize = d
                .iter()
                .map(|&i| {
                    clients[i as usize]
                        .unmask(&padded(i, Vec::new()))
                        .unwrap()
                        .self_mask_shares
                        .iter()
                        .filter(|(owner, _)| *owner == X)
                        .count()
                })
                .sum();
            assert_eq!(shares, 4);
            assert!(shares < c.threshold);
        }
    }
}

/// A configuration in a 2^`bits` ring whose values are clipped to ±`clip`,
/// at the finest scale that ring allows for `n` agents.
fn wide(n: usize, d: usize, bits: u32, clip: f32, sparse: bool) -> SecAggConfig {
    let mut c = config(n, d, 3, sparse);
    c.modulus_bits = bits;
    c.clip = clip;
    c.fit_scale(n);
    c
}

#[test]
fn ring_of_64_bits_sums_values_of_1e11_at_micro_resolution_with_every_dropout() {
    // Values up to 1.2e11 (clip 1e11, as a statistics step's Σx² on Telco),
    // quantised at 1/scale ≈ 2e-7 per agent: 2^32 could not hold even the
    // integer part of one such value.
    let c = wide(10, 40, 64, 1e11, false);
    assert!(c.scale >= 4e6, "scale {}", c.scale);
    matrix_with(10, &c, 1e11, &ALL_STAGES);
    // A 44-bit ring (6 bytes per coordinate) behaves the same.
    let c = wide(10, 40, 44, 1e5, false);
    matrix_with(10, &c, 1e5, &[Stage::MaskedInput, Stage::Unmask]);
}

#[test]
fn ring_of_64_bits_with_the_sparse_graph_and_100_agents_recovers_dropouts() {
    matrix_with(100, &wide(100, 30, 64, 1e9, true), 1e9, &ALL_STAGES);
}

#[test]
fn ring_of_64_bits_passes_the_malicious_server_check_and_all_stage_dropouts() {
    let mut c = wide(20, 30, 64, 1e12, false);
    c.verify_survivors = true;
    let mut ups = inputs(20, 30, 3, 5);
    ups.iter_mut()
        .for_each(|u| u.values.iter_mut().for_each(|v| *v *= 1e12));
    let d = Dropouts {
        advertise: vec![1],
        share_keys: vec![4, 7],
        masked_input: vec![9, 13],
        unmask: vec![0, 15],
    };
    check_round(&c, &ups, &d, 11);
}

#[test]
fn masked_vectors_travel_at_ceil_bits_over_8_bytes_per_coordinate() {
    let ups = inputs(4, 100, 0, 3);
    for (bits, width) in [(32, 4), (64, 8), (44, 6), (24, 3)] {
        let mut c = wide(4, 100, bits, 1.0, false);
        c.num_coord_weights = 0;
        c.max_weight = 200.0;
        let out = run_in_memory(&c, &ups, &Dropouts::none(), 1).unwrap();
        // Header: tag, version, sender, modulus bits, count.
        assert_eq!(
            out.traffic.masked_vector_bytes,
            11 + width * c.vector_len(),
            "{bits} bits"
        );
    }
}

#[test]
fn overflowing_64_bit_configuration_is_refused_naming_the_parameter() {
    let n = 100;
    let mut c = wide(n, 10, 64, 1e12, false);
    assert!(c.validate(n).is_ok());
    // Right at the bound: n · ⌈clip·scale⌉ = 2^63 − 1 − (2^63 − 1) mod n.
    c.clip = 1.0;
    c.scale = (((1u128 << 63) - 1) / n as u128) as f64;
    c.scale = c.scale.next_down().floor();
    assert!(c.validate(n).is_ok(), "{:?}", c.validate(n));
    c.scale *= 1.01;
    let err = c.validate(n).unwrap_err();
    assert!(
        matches!(
            err,
            SecAggError::Config {
                parameter: "scale",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("2^63"), "{err}");
    // A product beyond u64 (clip·scale·n ≈ 1e38) is caught, not wrapped.
    let mut c = wide(n, 10, 64, 1e12, false);
    c.scale = 1e24;
    assert!(matches!(
        c.validate(n),
        Err(SecAggError::Config {
            parameter: "scale",
            ..
        })
    ));
    let mut c = wide(n, 10, 64, 1.0, false);
    c.max_weight = 1e18; // 100 × 1e18 > 2^64
    assert!(matches!(
        c.validate(n),
        Err(SecAggError::Config {
            parameter: "max_weight",
            ..
        })
    ));
    c.max_weight = 1e17;
    assert!(c.validate(n).is_ok());
    for bits in [7, 65] {
        let mut c = wide(n, 10, 64, 1.0, false);
        c.modulus_bits = bits;
        assert!(matches!(
            c.validate(n),
            Err(SecAggError::Config {
                parameter: "modulus_bits",
                ..
            })
        ));
    }
}

/// Completes a hand-driven round: unmask requests to every survivor, their
/// answers, and the server's result.
fn finish_round(
    mut h: Harness,
) -> Result<fedcart_common::privacy::secagg::SecAggOutput, SecAggError> {
    let AfterMasked::Unmask(reqs) = h.server.close_masked()? else {
        panic!("no survivor check configured")
    };
    for r in &reqs {
        let resp = h.clients[r.to as usize].unmask(r)?;
        h.server.on_unmask(resp)?;
    }
    h.server.finish()
}

/// Agent 0's honest masked input with `offset` added (wrapping) to
/// coordinate `index`: what a malicious agent can send, since any residue
/// below the modulus passes the framing checks.
fn tampered_masked(h: &mut Harness, index: usize, offset: u64) -> RingVec {
    let (m, _) = h.clients[0]
        .masked_input(&h.relays[0], &h.ups[0], &mut rounding_rng(1, 0))
        .unwrap();
    let bits = m.modulus_bits();
    let mut words = m.to_u64_vec();
    words[index] = words[index].wrapping_add(offset) & (u64::MAX >> (64 - bits));
    RingVec::from_u64(bits, &words)
}

#[test]
fn a_malicious_agent_wrapping_its_weight_slot_gets_the_round_refused() {
    let c = config(4, 6, 0, false);
    // The honest round decodes.
    let mut h = Harness::new(c.clone(), 4);
    h.masked(&[0, 1, 2, 3]);
    let honest = finish_round(h).unwrap();
    assert!(honest.sum.weight <= 4.0 * c.max_weight);
    // Agent 0 subtracts 5000 from its weight code: the ring wraps it to
    // almost 2^32, far beyond 4 agents × max_weight.
    let mut h = Harness::new(c.clone(), 4);
    let weight_slot = c.num_values + c.num_coord_weights;
    let bad = tampered_masked(&mut h, weight_slot, 0u64.wrapping_sub(5000));
    h.server.on_masked_input(0, &bad).unwrap();
    h.masked(&[1, 2, 3]);
    let err = finish_round(h).unwrap_err();
    assert!(
        matches!(
            err,
            SecAggError::SumOutOfRange {
                what: "weight",
                count: 4,
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string().contains("out-of-range masked input"),
        "{err}"
    );
}

#[test]
fn a_malicious_agent_sending_a_value_beyond_its_clip_gets_the_round_refused() {
    let c = config(4, 6, 0, false);
    // 1.5 × 2^30 codes on value 0: six times the clip of the four agents
    // together, yet a residue below the modulus like any other.
    let mut h = Harness::new(c.clone(), 4);
    let bad = tampered_masked(&mut h, 0, 3 << 29);
    h.server.on_masked_input(0, &bad).unwrap();
    h.masked(&[1, 2, 3]);
    let err = finish_round(h).unwrap_err();
    assert!(
        matches!(
            err,
            SecAggError::SumOutOfRange {
                what: "value",
                index: 0,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn a_share_ciphertext_of_any_other_length_is_refused_before_relaying() {
    let c = config(4, 6, 0, false);
    let (mut server, mut clients, roster) = advertised(&c, 4, 9);
    let honest = clients[0].share_keys(&roster).unwrap();
    assert!(
        honest
            .shares
            .iter()
            .all(|s| s.ciphertext.len() == fedcart_common::privacy::secagg::SHARE_CIPHERTEXT_LEN)
    );
    // A padded bundle (that would swell agent 1's relay) and a short one.
    for len in [
        4 << 20,
        fedcart_common::privacy::secagg::SHARE_CIPHERTEXT_LEN - 1,
    ] {
        let mut bad = honest.clone();
        bad.shares[0].ciphertext.resize(len, 7);
        let err = server.on_shares(bad).unwrap_err();
        assert!(
            matches!(
                err,
                SecAggError::Malformed {
                    what: "ShareUpload",
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("exactly"), "{err}");
    }
    // Nothing of the refused uploads is kept: the honest one is still accepted.
    server.on_shares(honest).unwrap();
}

#[test]
fn a_sparse_graph_below_the_minimum_degree_is_refused_by_server_and_agents() {
    use fedcart_common::privacy::secagg::MIN_NEIGHBOURS;
    let mut c = SecAggConfig::complete(4, 0, 20, 1.0);
    for k in 1..MIN_NEIGHBOURS {
        c.neighbours = k;
        c.threshold = 2;
        let err = c.validate(20).unwrap_err();
        assert!(
            matches!(
                err,
                SecAggError::Config {
                    parameter: "neighbours",
                    ..
                }
            ),
            "k = {k}: {err}"
        );
        assert!(ServerSession::new(c.clone(), [1; 32], &(0..20).collect::<Vec<_>>()).is_err());
    }
    c.neighbours = MIN_NEIGHBOURS;
    c.validate(20).unwrap();
    // A complete graph is fine however small (two agents: degree 1).
    SecAggConfig::complete(4, 0, 2, 1.0).validate(2).unwrap();
    // An agent handed a degree-1 round by a server that skipped the check
    // refuses before sharing anything.
    let ids: Vec<u32> = (0..6).collect();
    let honest = SecAggConfig::complete(4, 0, 6, 1.0);
    let mut server = ServerSession::new(honest.clone(), [1; 32], &ids).unwrap();
    let mut low = honest.clone();
    low.neighbours = 1;
    low.threshold = 2;
    let mut agents: Vec<ClientSession> = ids
        .iter()
        .map(|&i| {
            ClientSession::new(
                low.clone(),
                i,
                [1; 32],
                &mut ChaCha20Rng::seed_from_u64(i.into()),
            )
        })
        .collect();
    for a in &mut agents {
        server.on_advertise(a.advertise().unwrap()).unwrap();
    }
    let roster = server.close_advertise().unwrap();
    assert!(matches!(
        agents[0].share_keys(&roster),
        Err(SecAggError::Config {
            parameter: "neighbours",
            ..
        })
    ));
}

#[test]
fn each_agent_gets_only_the_keys_it_uses_and_refuses_a_roster_missing_one_naming_the_agent() {
    // SecAgg+ over 20 agents: each uses k + 1 entries of the 20.
    let c = config(20, 6, 0, true);
    let ids: Vec<u32> = (0..20).collect();
    let (mut server, mut clients, full) = advertised(&c, 20, 11);
    assert_eq!(full.ids, ids);
    let k = c.degree(20);
    assert!(k + 1 < 20, "a sparse graph: k = {k}");
    let mine = server.roster_for(0);
    assert_eq!(mine.ids, ids, "every agent learns the whole id set");
    let used: Vec<u32> = mine.keys.iter().map(|e| e.id).collect();
    assert_eq!(used.len(), k + 1);
    assert_eq!(clients[0].keys_used(&full).unwrap(), used);
    // Its wire form is the id bitmap (3 bytes for ids 0..20) and k + 1
    // entries of 69 bytes, not 20.
    let framing = 2 + 4 + 3 + 4;
    assert_eq!(mine.to_bytes().len(), framing + (k + 1) * 69);
    assert_eq!(full.to_bytes().len(), framing + 20 * 69);

    // A holder's keys left out: refused naming that agent, nothing shared.
    let holder = *used.iter().find(|&&h| h != 0).unwrap();
    let mut lying = mine.clone();
    lying.keys.retain(|e| e.id != holder);
    let err = clients[0].share_keys(&lying).unwrap_err();
    assert_eq!(
        err,
        SecAggError::Refused(format!(
            "the roster lacks the keys of agent {holder}, which this agent needs"
        ))
    );
    // Keys of an agent the id list does not name.
    let mut unlisted = mine.clone();
    unlisted.ids.retain(|&i| i != holder);
    let err = clients[0].share_keys(&unlisted).unwrap_err();
    assert!(
        err.to_string().contains(&format!("agent {holder}")),
        "{err}"
    );
    // An unsorted id list is malformed.
    let mut unsorted = mine.clone();
    unsorted.ids.swap(0, 1);
    assert!(matches!(
        clients[0].share_keys(&unsorted),
        Err(SecAggError::Malformed { .. })
    ));
    // A key it never uses may be missing or present: the full roster and
    // its own are both accepted (the refusals above changed nothing).
    for (i, cl) in clients.iter_mut().enumerate() {
        let roster = if i % 2 == 0 {
            server.roster_for(i as u32)
        } else {
            full.clone()
        };
        let roster = KeyRoster::from_bytes(&roster.to_bytes()).unwrap();
        server.on_shares(cl.share_keys(&roster).unwrap()).unwrap();
    }
    server.close_shares().unwrap();
}

#[test]
fn a_batch_of_masked_inputs_sums_like_one_at_a_time_and_a_bad_entry_adds_none() {
    // 40,000 values: the batched add splits the vector across threads.
    let c = config(4, 40_000, 3, false);
    let one_by_one = {
        let mut h = Harness::new(c.clone(), 4);
        h.masked(&[0, 1, 2, 3]);
        finish_round(h).unwrap()
    };
    let mut h = Harness::new(c.clone(), 4);
    let masked: Vec<RingVec> = (0..4u32)
        .map(|i| {
            h.clients[i as usize]
                .masked_input(
                    &h.relays[i as usize],
                    &h.ups[i as usize],
                    &mut rounding_rng(1, i),
                )
                .unwrap()
                .0
        })
        .collect();
    // A duplicate, an unknown agent, or a vector of the wrong ring each
    // refuse the whole batch, naming the entry; nothing was added, so the
    // honest batch that follows still sums exactly.
    let wrong_ring = RingVec::zeros(64, c.vector_len());
    for (bad, want) in [
        (
            vec![(0, &masked[0]), (1, &masked[1]), (1, &masked[1])],
            "agent 1",
        ),
        (vec![(0, &masked[0]), (7, &masked[1])], "agent 7"),
        (vec![(0, &masked[0]), (2, &wrong_ring)], "masked input"),
    ] {
        let err = h.server.on_masked_inputs(&bad).unwrap_err();
        assert!(err.to_string().contains(want), "{err}");
    }
    let batch: Vec<(u32, &RingVec)> = (0..4u32).map(|i| (i, &masked[i as usize])).collect();
    h.server.on_masked_inputs(&batch).unwrap();
    let batched = finish_round(h).unwrap();
    assert_eq!(batched.sum, one_by_one.sum);
    assert_eq!(batched.survivors, vec![0, 1, 2, 3]);
}

/// What an agent handed a different id set than its neighbours meets: a
/// share from an agent it does not count as a neighbour, or one addressed
/// to another agent, in its relay. It refuses the relay, naming the sender,
/// and sends no masked input; the honest relay still works.
#[test]
fn a_relay_with_a_share_from_a_non_neighbour_or_for_another_agent_is_refused() {
    let n = 30;
    let c = config(n, 4, 0, true);
    let mut h = Harness::new(c, n);
    let neighbours: Vec<u32> = h.relays[0].shares.iter().map(|s| s.from).collect();
    assert!(neighbours.len() < n - 1, "a sparse graph: {neighbours:?}");
    let stranger = (1..n as u32)
        .find(|j| !neighbours.contains(j))
        .expect("a non-neighbour");
    // A share from the stranger: relayed by a coordinator that showed the
    // stranger another graph, in which agent 0 is its neighbour.
    let mut relay = h.relays[0].clone();
    relay.shares[0].from = stranger;
    let err = h.clients[0]
        .masked_input(&relay, &h.ups[0], &mut rounding_rng(1, 0))
        .unwrap_err();
    assert!(
        err.to_string()
            .contains(&format!("share from {stranger} is not from a neighbour")),
        "{err}"
    );
    // A share addressed to another agent.
    let mut relay = h.relays[0].clone();
    relay.shares[0].to = neighbours[0];
    let err = h.clients[0]
        .masked_input(&relay, &h.ups[0], &mut rounding_rng(1, 0))
        .unwrap_err();
    assert!(err.to_string().contains("is not from a neighbour"), "{err}");
    // The relay as the server built it is accepted.
    h.masked(&[0]);
}

/// Completes a hand-driven round in which `liar` answers the unmask stage
/// first, with its answer changed by `forge`; the other survivors answer
/// honestly. (The server takes the shares in holder order, so the forged
/// ones are among the t it uses first when the liar is among the first t
/// holders.)
fn finish_round_with_liar(
    mut h: Harness,
    liar: u32,
    forge: impl Fn(&mut UnmaskResponse),
) -> Result<fedcart_common::privacy::secagg::SecAggOutput, SecAggError> {
    let AfterMasked::Unmask(mut reqs) = h.server.close_masked()? else {
        panic!("no survivor check configured")
    };
    // The liar's answer first, so its shares are among the first t used.
    reqs.sort_by_key(|r| r.to != liar);
    for r in &reqs {
        let mut resp = h.clients[r.to as usize].unmask(r)?;
        if r.to == liar {
            forge(&mut resp);
        }
        h.server.on_unmask(resp)?;
    }
    h.server.finish()
}

/// Every share's bytes past its x-coordinate flipped.
fn garbled(shares: &mut [(u32, Vec<u8>)]) {
    for (_, s) in shares {
        for b in &mut s[1..] {
            *b ^= 0x5a;
        }
    }
}

/// A merchant that revealed garbage self-mask shares at the unmask stage
/// got the run stopped for good as "an agent sent an out-of-range masked
/// input", naming nobody (found by an attacker probe): the other holders'
/// shares now expose the forged ones, the sum is the honest one, and the
/// forger is named.
#[test]
fn forged_self_mask_shares_are_exposed_by_the_other_holders_and_the_sum_recovered() {
    let c = config(6, 6, 0, false);
    assert!(c.threshold + 2 <= 6, "threshold {}", c.threshold);
    let mut honest = Harness::new(c.clone(), 6);
    honest.masked(&[0, 1, 2, 3, 4, 5]);
    let honest = finish_round(honest).unwrap();
    assert!(honest.forged_shares.is_empty());
    for liar in [0, 2] {
        let mut h = Harness::new(c.clone(), 6);
        h.masked(&[0, 1, 2, 3, 4, 5]);
        let out = finish_round_with_liar(h, liar, |r| garbled(&mut r.self_mask_shares)).unwrap();
        assert_eq!(out.forged_shares, [liar]);
        assert_eq!(out.raw_sum, honest.raw_sum);
        assert_eq!(out.survivors, honest.survivors);
    }
    // The last holder's shares are not among the first t in holder order,
    // however early it answers: the sum is the honest one.
    let mut h = Harness::new(c, 6);
    h.masked(&[0, 1, 2, 3, 4, 5]);
    let out = finish_round_with_liar(h, 5, |r| garbled(&mut r.self_mask_shares)).unwrap();
    assert_eq!(out.raw_sum, honest.raw_sum);
}

/// A merchant that revealed garbage shares of a dropped merchant's key got
/// every attempt aborted with the dropped, honest merchant blamed ("agent N
/// sent bad shares"), and the run stopped on max_attempts (found by an
/// attacker probe): the key is rebuilt without the forged share, which the
/// dropped agent's advertised key proves wrong, and the forger is named.
#[test]
fn forged_shares_of_a_dropped_agents_key_are_exposed_and_its_masks_removed() {
    let c = config(7, 6, 0, false);
    assert!(c.threshold + 2 <= 6, "threshold {}", c.threshold);
    // Agent 3 drops after sharing its keys; six survivors.
    let survivors = [0, 1, 2, 4, 5, 6];
    let mut honest = Harness::new(c.clone(), 7);
    honest.masked(&survivors);
    let honest = finish_round(honest).unwrap();
    assert_eq!(honest.dropped, [3]);
    for liar in [0, 2] {
        let mut h = Harness::new(c.clone(), 7);
        h.masked(&survivors);
        let out = finish_round_with_liar(h, liar, |r| {
            assert_eq!(r.pairwise_shares.len(), 1);
            garbled(&mut r.pairwise_shares);
        })
        .unwrap();
        assert_eq!(out.forged_shares, [liar]);
        assert_eq!(out.raw_sum, honest.raw_sum);
    }
    // One share more than t is enough: the advertised key tells the
    // forged one (five agents, t = 3, agent 2 dropped, four shares).
    let c5 = config(5, 6, 0, false);
    assert_eq!(c5.threshold, 3);
    let mut honest = Harness::new(c5.clone(), 5);
    honest.masked(&[0, 1, 3, 4]);
    let honest = finish_round(honest).unwrap();
    let mut h = Harness::new(c5, 5);
    h.masked(&[0, 1, 3, 4]);
    let out = finish_round_with_liar(h, 1, |r| garbled(&mut r.pairwise_shares)).unwrap();
    assert_eq!(out.forged_shares, [1]);
    assert_eq!(out.raw_sum, honest.raw_sum);
    // Two forgers are too many to tell apart: the round fails without
    // blaming the dropped agent for its shares.
    let mut h = Harness::new(c.clone(), 7);
    h.masked(&survivors);
    let AfterMasked::Unmask(reqs) = h.server.close_masked().unwrap() else {
        panic!()
    };
    for r in &reqs {
        let mut resp = h.clients[r.to as usize].unmask(r).unwrap();
        if r.to < 2 {
            garbled(&mut resp.pairwise_shares);
        }
        h.server.on_unmask(resp).unwrap();
    }
    let err = h.server.finish().unwrap_err().to_string();
    assert!(
        err.contains("two or more of its share holders revealed wrong shares")
            && !err.contains("bad shares"),
        "{err}"
    );
}

/// A share revealed under another holder's x-coordinate would stand in for
/// that holder's (the first of two equal x-coordinates was used): the
/// answer is refused whole.
#[test]
fn a_share_revealed_under_another_holders_x_coordinate_is_refused() {
    let c = config(5, 6, 0, false);
    let mut h = Harness::new(c, 5);
    h.masked(&[0, 1, 2, 3, 4]);
    let AfterMasked::Unmask(reqs) = h.server.close_masked().unwrap() else {
        panic!()
    };
    let r = reqs.iter().find(|r| r.to == 4).unwrap();
    let mut resp = h.clients[4].unmask(r).unwrap();
    // Agent 4 holds x = 5 of every owner's shares; it claims x = 1.
    resp.self_mask_shares[0].1[0] = 1;
    let err = h.server.on_unmask(resp).unwrap_err().to_string();
    assert!(
        err.contains("agent 4 revealed a share of agent 0 under x-coordinate 1"),
        "{err}"
    );
}
