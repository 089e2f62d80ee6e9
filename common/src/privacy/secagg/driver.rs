//! An in-memory driver: runs the server and every agent in one process,
//! passing every message but the masked vectors through its byte encoding
//! (a masked vector goes to the server as it is, its frame's length
//! counted), with dropouts injected
//! at chosen stages. Tests use it to check the protocol end to end, the
//! simulator to run secure rounds without a network, and the benchmark to
//! count bytes per agent.

use std::borrow::Borrow;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Instant;

use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use rayon::prelude::*;

use super::client::ClientSession;
use super::crypto::{self, SharedAgreements};
use super::encode::{EncodedInput, RoundingDraws, encode};
use super::graph::NeighbourGraph;
use super::ring::RingVec;
use super::server::{AfterMasked, SecAggOutput, ServerSession};
use super::wire::{
    AdvertiseKeys, KeyRoster, ShareRelay, ShareUpload, SurvivorCheck, SurvivorSignature,
    UnmaskRequest, UnmaskResponse, masked_frame_len,
};
use super::{SecAggConfig, SecAggError, Stage};
use crate::federation::update::Update;
use crate::seed;

/// Which agents (by index into the inputs) fall silent at which stage: an
/// agent listed under a stage sends nothing in that stage or any later one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dropouts {
    /// Never advertise keys.
    pub advertise: Vec<u32>,
    /// Advertise, then never send shares.
    pub share_keys: Vec<u32>,
    /// Send shares, then never send a masked input.
    pub masked_input: Vec<u32>,
    /// Send a masked input, then never answer the unmask request.
    pub unmask: Vec<u32>,
}

impl Dropouts {
    /// No dropouts.
    pub fn none() -> Self {
        Self::default()
    }
}

/// Bytes moved during one in-memory round (every message as encoded).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Traffic {
    /// Mean bytes sent by an agent that completed the round.
    pub sent_per_agent: f64,
    /// Mean bytes received by an agent that completed the round.
    pub received_per_agent: f64,
    /// Of `sent_per_agent`, the masked vector itself.
    pub masked_vector_bytes: usize,
}

/// Wall-clock seconds each stage of an in-memory round took, all parties
/// together: where a round's time goes.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct StageTimes {
    /// Stage 1: every agent's key pairs and advertisement, the server's
    /// checks (two low-order probes per agent) and the roster.
    pub advertise: f64,
    /// Stage 2: each agent's roster, agreements, Shamir sharing and
    /// encryption, the server's checks and relays.
    pub share_keys: f64,
    /// Stage 3, agents: encoding (stochastic rounding), the distributed-DP
    /// hook, opening the relayed shares, the pairwise agreements and the
    /// k + 1 mask streams added into each input.
    pub mask: f64,
    /// Stage 3, server: checking each masked input and adding it into the
    /// running sum.
    pub server_add: f64,
    /// The survivor check (if on) and the unmask requests and answers.
    pub unmask: f64,
    /// The server's recovery of every needed secret, the regeneration and
    /// removal of the masks, and decoding.
    pub finish: f64,
}

impl StageTimes {
    /// Adds another round's (or chunk's) times to these.
    pub fn add(&mut self, other: &StageTimes) {
        self.advertise += other.advertise;
        self.share_keys += other.share_keys;
        self.mask += other.mask;
        self.server_add += other.server_add;
        self.unmask += other.unmask;
        self.finish += other.finish;
    }
}

/// The result of [`run_in_memory`].
#[derive(Debug, Clone, PartialEq)]
pub struct InMemoryOutcome {
    /// The server's output.
    pub output: SecAggOutput,
    /// Traffic figures.
    pub traffic: Traffic,
    /// Wall-clock time of each stage.
    pub times: StageTimes,
}

/// The public round seed of a run's secure task `task_id`: derived from the
/// run seed and the task id alone, so every agent checks the seed the
/// coordinator invites it with (a seed of the coordinator's choosing would
/// let it grind the neighbour graph, e.g. to give a merchant only
/// colluding neighbours).
pub fn task_round_seed(run_seed: u64, task_id: &str) -> [u8; 32] {
    round_seed(seed::derive(run_seed, &["secagg", task_id]))
}

/// The public round seed the driver uses for `seed`.
pub fn round_seed(seed: u64) -> [u8; 32] {
    let mut out = [0u8; 32];
    for (i, chunk) in out.chunks_mut(8).enumerate() {
        chunk.copy_from_slice(&seed::derive(seed, &["secagg-round", &i.to_string()]).to_le_bytes());
    }
    out
}

/// The stochastic-rounding generator the driver gives agent `id`, so tests
/// can re-encode an input exactly as the agent did.
pub fn rounding_rng(seed: u64, id: u32) -> RoundingDraws {
    RoundingDraws::from_key(seed::rng(seed, &["secagg-rounding", &id.to_string()]).get_seed())
}

/// Runs one round over `inputs` (agent `i` is `inputs[i]`'s) with the given
/// dropouts. Agent key material comes from seeded ChaCha20, which makes the
/// run reproducible; real agents seed from OS entropy.
pub fn run_in_memory(
    config: &SecAggConfig,
    inputs: &[Update],
    dropouts: &Dropouts,
    seed: u64,
) -> Result<InMemoryOutcome, SecAggError> {
    run_in_memory_with(config, inputs, dropouts, seed, &|_, _| Ok(()))
}

/// A hook on an agent's encoded input, called with the agent's id between
/// encoding and masking (distributed DP adds its noise there). Agents mask in
/// parallel, so the hook is shared between threads.
pub type EncodedHook<'a> = dyn Fn(u32, &mut EncodedInput) -> Result<(), SecAggError> + Sync + 'a;

/// As [`run_in_memory`], with `hook` applied to every agent's encoded input
/// before it is masked.
pub fn run_in_memory_with(
    config: &SecAggConfig,
    inputs: &[Update],
    dropouts: &Dropouts,
    seed: u64,
    hook: &EncodedHook<'_>,
) -> Result<InMemoryOutcome, SecAggError> {
    let mut round = InMemoryRound::new(config, inputs.len(), dropouts, seed)?;
    let silent: BTreeSet<u32> = dropouts.masked_input.iter().copied().collect();
    let sending: Vec<(u32, &Update)> = (0..inputs.len() as u32)
        .filter(|id| !silent.contains(id) && round.expects(*id))
        .map(|id| (id, &inputs[id as usize]))
        .collect();
    round.mask(sending, hook)?;
    round.finish(&dropouts.unmask)
}

/// One round driven in memory stage by stage, for a caller whose inputs
/// appear over time (the simulator trains merchants chunk by chunk): keys are
/// advertised and shared when the round is created, each input is encoded,
/// masked by its agent and added into the server's running sum as soon as it
/// is handed to [`InMemoryRound::mask`] — so no more than one call's inputs
/// and masked vectors are alive at once — and [`InMemoryRound::finish`] runs
/// the unmask stage. An agent that never gets its input masked is a dropout
/// of the masked-input stage, recovered like any other.
///
/// Callers name agents by index, `0..n`; each agent's protocol id (the id
/// its messages carry and the server knows it by) is its index's place on
/// the round's SecAgg+ ring ([`NeighbourGraph::ring`]), so that agents with
/// consecutive indices are neighbours. A caller that hands in its inputs in
/// index order, a chunk at a time, then has most of each agent's neighbours
/// in the same call, whose pair masks [`InMemoryRound::mask`] expands once
/// for both ends. Everything else an agent draws from its index (its keys,
/// its stochastic rounding, the hook), and every id in and out of this type
/// is an index, so the sum does not depend on the mapping.
pub struct InMemoryRound {
    config: SecAggConfig,
    seed: u64,
    server: ServerSession,
    /// Protocol id of agent `i` at index `i`.
    pid: Vec<u32>,
    /// Agent index of protocol id `p` at index `p`.
    agent: Vec<u32>,
    /// Agent `i`'s session at index `i`; `None` once it dropped out.
    clients: Vec<Option<ClientSession>>,
    /// The encoded share relay addressed to each agent, if it has one.
    relays: Vec<Option<Vec<u8>>>,
    sent: Vec<usize>,
    received: Vec<usize>,
    masked_len: usize,
    times: StageTimes,
}

impl InMemoryRound {
    /// Runs the advertise and share-keys stages over agents `0..n` (those
    /// listed in `dropouts.advertise` and `dropouts.share_keys`, by index,
    /// fall silent there). Agent key material comes from seeded ChaCha20, which makes the
    /// run reproducible; real agents seed from OS entropy.
    pub fn new(
        config: &SecAggConfig,
        n: usize,
        dropouts: &Dropouts,
        seed: u64,
    ) -> Result<Self, SecAggError> {
        let started = Instant::now();
        let ids: Vec<u32> = (0..n as u32).collect();
        let rs = round_seed(seed);
        let pid = ring_order(config, &rs, &ids);
        let mut agent = vec![0u32; n];
        for (i, &p) in pid.iter().enumerate() {
            agent[p as usize] = i as u32;
        }
        let at = |p: u32| agent[p as usize] as usize;
        let mut server = ServerSession::new(config.clone(), rs, &ids)?;
        let mut sent = vec![0usize; n];
        let mut received = vec![0usize; n];
        // Every party lives here: each pair's X25519 agreement is computed once.
        let shared = Arc::new(SharedAgreements::default());
        let silent: BTreeSet<u32> = dropouts.advertise.iter().copied().collect();
        // Each agent draws its keys from its own seeded generator, so they do
        // not depend on the threads.
        let mut clients: Vec<Option<ClientSession>> = ids
            .par_iter()
            .map(|&i| {
                let mut rng = ChaCha20Rng::seed_from_u64(seed::derive(
                    seed,
                    &["secagg-client", &i.to_string()],
                ));
                let session = ClientSession::new_sharing(
                    config.clone(),
                    pid[i as usize],
                    rs,
                    &mut rng,
                    shared.clone(),
                );
                (!silent.contains(&i)).then_some(session)
            })
            .collect();
        let drop_now = |clients: &mut Vec<Option<ClientSession>>, list: &[u32]| {
            list.iter().for_each(|&d| clients[d as usize] = None);
        };

        let adverts: Vec<(u32, Vec<u8>)> = clients
            .par_iter_mut()
            .filter_map(Option::as_mut)
            .map(|c| Ok((c.id(), c.advertise()?.to_bytes())))
            .collect::<Result<_, SecAggError>>()?;
        let mut keys = Vec::with_capacity(adverts.len());
        for (id, bytes) in adverts {
            sent[at(id)] += bytes.len();
            keys.push(AdvertiseKeys::from_bytes(&bytes)?);
        }
        server.on_advertise_many(keys)?;
        server.close_advertise()?;
        let advertised = Instant::now();

        drop_now(&mut clients, &dropouts.share_keys);
        // Each agent gets its own roster (every id, the keys it uses) through
        // its byte encoding and shares its keys, in parallel (each with its
        // own dealer, so the result does not depend on the threads); the
        // server takes the uploads in id order.
        let server_ref = &server;
        let uploads: Vec<(u32, usize, Vec<u8>)> = clients
            .par_iter_mut()
            .filter_map(Option::as_mut)
            .map(|c| {
                let roster = server_ref.roster_for(c.id()).to_bytes();
                let upload = c.share_keys(&KeyRoster::from_bytes(&roster)?)?;
                Ok((c.id(), roster.len(), upload.to_bytes()))
            })
            .collect::<Result<_, SecAggError>>()?;
        for (id, roster_len, bytes) in uploads {
            received[at(id)] += roster_len;
            sent[at(id)] += bytes.len();
            server.on_shares(ShareUpload::from_bytes(&bytes)?)?;
        }
        let mut relays = vec![None; n];
        for relay in server.close_shares()? {
            relays[at(relay.to)] = Some(relay.to_bytes());
        }
        let times = StageTimes {
            advertise: (advertised - started).as_secs_f64(),
            share_keys: advertised.elapsed().as_secs_f64(),
            ..StageTimes::default()
        };
        Ok(Self {
            config: config.clone(),
            seed,
            server,
            pid,
            agent,
            clients,
            relays,
            sent,
            received,
            masked_len: 0,
            times,
        })
    }

    /// Wall-clock time of each stage so far.
    pub fn times(&self) -> StageTimes {
        self.times
    }

    /// Whether agent `id` (an index) is still in the round and has not sent its masked
    /// input yet.
    pub fn expects(&self, id: u32) -> bool {
        self.relays.get(id as usize).is_some_and(Option::is_some)
            && self.clients[id as usize].is_some()
    }

    /// Stage 3 for `inputs` (agent index, update): each agent encodes its update
    /// (stochastic rounding from [`rounding_rng`]), applies `hook`, masks it
    /// and hands the masked vector to the server, which adds it into its
    /// running sum. The agents encode and derive their masks in parallel
    /// (rayon); the batch is then masked in one pass in which each pair's
    /// keystream is expanded once for both ends
    /// ([`crypto::apply_masks_shared`]; each vector gets exactly the words
    /// it would get masked alone, half the AES work when the whole graph is
    /// in the batch), and the server adds the batch in one parallel pass
    /// ([`ServerSession::on_masked_inputs`]).
    /// Each input is an owned [`Update`] or a borrowed one (`&Update`); an
    /// owned update is dropped as soon as it is encoded, so that a batch's
    /// f32 updates and its encoded vectors are not all alive at once (at
    /// d = 1M, 64 agents: 256 MB less at the peak). The server takes each
    /// masked vector as it is, not through its wire frame (`masked_to_bytes`,
    /// whose length is counted): copying 4·d bytes per agent into a fresh
    /// frame and adding them from it cost about 5 % of the CPU at
    /// (1000, 100k) (BENCHMARKS.md).
    pub fn mask<U: Borrow<Update> + Send>(
        &mut self,
        inputs: Vec<(u32, U)>,
        hook: &EncodedHook<'_>,
    ) -> Result<(), SecAggError> {
        let mut work = Vec::with_capacity(inputs.len());
        for (id, update) in inputs {
            if !self.expects(id) {
                return Err(SecAggError::UnknownAgent {
                    stage: Stage::MaskedInput,
                    agent: id,
                });
            }
            let i = id as usize;
            let relay = self.relays[i].take().expect("checked by expects");
            let client = self.clients[i].take().expect("checked by expects");
            work.push((id, client, relay, Some(update)));
        }
        let started = Instant::now();
        let (config, seed) = (&self.config, self.seed);
        let mut prepared: Vec<Result<(RingVec, Vec<_>), SecAggError>> = work
            .par_iter_mut()
            .map(|(id, client, relay, update)| {
                let relay = ShareRelay::from_bytes(relay)?;
                let mut rng = rounding_rng(seed, *id);
                let update = update.take().expect("each input is encoded once");
                let mut encoded = encode(config, update.borrow(), &mut rng)?;
                drop(update);
                hook(*id, &mut encoded)?;
                client.input_and_masks(&relay, encoded)
            })
            .collect();
        // Every party is here: each pair's mask is expanded once for both
        // ends, and every vector is masked before the server sees it.
        let (targets, masks): (Vec<_>, Vec<_>) = prepared
            .iter_mut()
            .filter_map(|p| p.as_mut().ok())
            .map(|(vector, masks)| (vector, masks.as_slice()))
            .unzip();
        crypto::apply_masks_shared(targets, &masks);
        let wires = prepared.into_iter().map(|p| p.map(|(vector, _)| vector));
        let masked = Instant::now();
        self.times.mask += (masked - started).as_secs_f64();
        let mut inputs = Vec::with_capacity(work.len());
        for ((id, client, relay, _), wire) in work.into_iter().zip(wires) {
            let i = id as usize;
            self.received[i] += relay.len();
            self.clients[i] = Some(client);
            let masked = wire?;
            self.masked_len = masked_frame_len(masked.len(), masked.modulus_bits());
            self.sent[i] += self.masked_len;
            inputs.push((self.pid[i], masked));
        }
        let inputs: Vec<(u32, &RingVec)> = inputs.iter().map(|(id, v)| (*id, v)).collect();
        self.server.on_masked_inputs(&inputs)?;
        self.times.server_add += masked.elapsed().as_secs_f64();
        Ok(())
    }

    /// The rest of the round: the agents that got no input masked are
    /// dropouts; those in `unmask_dropouts` (indices) fall silent in the
    /// unmask stage. The server recovers the masks and returns the sum, its
    /// survivors and dropouts given as indices, in order.
    pub fn finish(mut self, unmask_dropouts: &[u32]) -> Result<InMemoryOutcome, SecAggError> {
        let started = Instant::now();
        let agent = &self.agent;
        let at = |p: u32| agent[p as usize] as usize;
        let (sent, received) = (&mut self.sent, &mut self.received);
        let clients = &mut self.clients;
        for (c, relay) in clients.iter_mut().zip(&self.relays) {
            if relay.is_some() {
                *c = None;
            }
        }
        let server = &mut self.server;
        let requests = match server.close_masked()? {
            AfterMasked::Unmask(r) => r,
            AfterMasked::CheckSurvivors(check) => {
                let check_bytes = check.to_bytes();
                for c in clients.iter_mut().flatten() {
                    received[at(c.id())] += check_bytes.len();
                    let sig = c
                        .sign_survivors(&SurvivorCheck::from_bytes(&check_bytes)?)?
                        .to_bytes();
                    sent[at(c.id())] += sig.len();
                    server.on_survivor_signature(SurvivorSignature::from_bytes(&sig)?)?;
                }
                server.close_survivor_check()?
            }
        };

        unmask_dropouts
            .iter()
            .for_each(|&d| clients[d as usize] = None);
        for req in requests {
            let bytes = req.to_bytes();
            let to = at(req.to);
            let Some(c) = clients[to].as_mut() else {
                continue;
            };
            received[to] += bytes.len();
            let resp = c.unmask(&UnmaskRequest::from_bytes(&bytes)?)?.to_bytes();
            sent[to] += resp.len();
            server.on_unmask(UnmaskResponse::from_bytes(&resp)?)?;
        }
        let done: Vec<usize> = clients.iter().flatten().map(|c| at(c.id())).collect();
        let unmasked = Instant::now();
        self.times.unmask += (unmasked - started).as_secs_f64();
        let mut output = self.server.finish()?;
        for list in [&mut output.survivors, &mut output.dropped] {
            list.iter_mut().for_each(|p| *p = self.agent[*p as usize]);
            list.sort_unstable();
        }
        self.times.finish += unmasked.elapsed().as_secs_f64();
        let mean =
            |v: &[usize]| done.iter().map(|&i| v[i] as f64).sum::<f64>() / done.len().max(1) as f64;
        let traffic = Traffic {
            sent_per_agent: mean(&self.sent),
            received_per_agent: mean(&self.received),
            masked_vector_bytes: self.masked_len,
        };
        Ok(InMemoryOutcome {
            output,
            traffic,
            times: self.times,
        })
    }
}

/// Protocol ids for agents `0..n` that put agent `i` at place `i` of the
/// round's SecAgg+ ring (identity when no graph can be built: the server
/// then refuses the round with the reason). The server builds the graph
/// over the agents that advertised; with advertise-stage dropouts the ring
/// differs and the places are only near, which costs speed, not
/// correctness.
fn ring_order(config: &SecAggConfig, round_seed: &[u8; 32], ids: &[u32]) -> Vec<u32> {
    match NeighbourGraph::new(round_seed, ids, config.degree(ids.len())) {
        Ok(graph) => graph.ring().to_vec(),
        Err(_) => ids.to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Agents with consecutive indices are neighbours on the ring the server
    /// builds, so a batch of consecutive agents shares most of its pair
    /// masks; ids come back out as indices (`check_round` in
    /// `tests/secagg.rs` checks the sums and survivor lists with dropouts).
    #[test]
    fn consecutive_agents_are_neighbours_on_the_servers_ring() {
        let n = 40;
        let mut config = SecAggConfig::sparse(8, 0, n, 1.0);
        config.neighbours = 6;
        let round = InMemoryRound::new(&config, n, &Dropouts::none(), 11).unwrap();
        assert_ne!(
            round.pid,
            (0..n as u32).collect::<Vec<_>>(),
            "a shuffled ring"
        );
        for i in 0..n {
            let holders = round.server.keys_used_by(round.pid[i]);
            for d in 1..=3 {
                let next = round.pid[(i + d) % n];
                assert!(
                    holders.contains(&next),
                    "agent {i} and agent {}",
                    (i + d) % n
                );
            }
            assert_eq!(round.agent[round.pid[i] as usize], i as u32);
        }
    }

    /// An update that records when it is dropped.
    struct Tracked<'a>(Update, &'a [std::sync::atomic::AtomicBool], usize);

    impl Borrow<Update> for Tracked<'_> {
        fn borrow(&self) -> &Update {
            &self.0
        }
    }

    impl Drop for Tracked<'_> {
        fn drop(&mut self) {
            self.1[self.2].store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// An owned input is dropped once its agent has encoded it (before the
    /// hook that follows encoding runs), not when the batch is done; the
    /// sum is the one of the same inputs borrowed.
    #[test]
    fn an_owned_update_is_dropped_as_soon_as_it_is_encoded() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let n = 12;
        let config = SecAggConfig::sparse(8, 0, n, 1.0);
        let updates: Vec<Update> = (0..n)
            .map(|i| Update {
                values: (0..8).map(|j| (i * 8 + j) as f32 / 200.0).collect(),
                coord_weights: Vec::new(),
                weight: 1.0 + i as f64,
            })
            .collect();
        let borrowed = run_in_memory(&config, &updates, &Dropouts::none(), 5).unwrap();

        let dropped: Vec<AtomicBool> = (0..n).map(|_| AtomicBool::new(false)).collect();
        let hook = |id: u32, _: &mut EncodedInput| {
            assert!(
                dropped[id as usize].load(Ordering::SeqCst),
                "agent {id}'s update is still alive after encoding"
            );
            Ok(())
        };
        let mut round = InMemoryRound::new(&config, n, &Dropouts::none(), 5).unwrap();
        for chunk in [0..5u32, 5..n as u32] {
            let batch: Vec<(u32, Tracked<'_>)> = chunk
                .map(|i| {
                    (
                        i,
                        Tracked(updates[i as usize].clone(), &dropped, i as usize),
                    )
                })
                .collect();
            round.mask(batch, &hook).unwrap();
        }
        assert!(dropped.iter().all(|d| d.load(Ordering::SeqCst)));
        let owned = round.finish(&[]).unwrap();
        assert_eq!(owned.output.raw_sum, borrowed.output.raw_sum);
        assert_eq!(owned.output.sum.values, borrowed.output.sum.values);
        assert_eq!(owned.output.survivors, (0..n as u32).collect::<Vec<_>>());
    }
}
