//! An in-memory driver: runs the server and every agent in one process,
//! passing every message through its byte encoding, with dropouts injected
//! at chosen stages. Tests use it to check the protocol end to end, the
//! simulator to run secure rounds without a network, and the benchmark to
//! count bytes per agent.

use rand::SeedableRng;
use rand_chacha::{ChaCha8Rng, ChaCha20Rng};

use super::client::ClientSession;
use super::encode::{EncodedInput, encode};
use super::server::{AfterMasked, SecAggOutput, ServerSession};
use super::wire::{
    AdvertiseKeys, KeyRoster, ShareRelay, ShareUpload, SurvivorCheck, SurvivorSignature,
    UnmaskRequest, UnmaskResponse, masked_to_bytes,
};
use super::{SecAggConfig, SecAggError};
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

/// The result of [`run_in_memory`].
#[derive(Debug, Clone, PartialEq)]
pub struct InMemoryOutcome {
    /// The server's output.
    pub output: SecAggOutput,
    /// Traffic figures.
    pub traffic: Traffic,
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
pub fn rounding_rng(seed: u64, id: u32) -> ChaCha8Rng {
    seed::rng(seed, &["secagg-rounding", &id.to_string()])
}

/// Runs one round over `inputs` (agent `i` has id `i`) with the given
/// dropouts. Agent key material comes from seeded ChaCha20, which makes the
/// run reproducible; real agents seed from OS entropy.
pub fn run_in_memory(
    config: &SecAggConfig,
    inputs: &[Update],
    dropouts: &Dropouts,
    seed: u64,
) -> Result<InMemoryOutcome, SecAggError> {
    run_in_memory_with(config, inputs, dropouts, seed, &mut |_, _| Ok(()))
}

/// A hook on an agent's encoded input, called with the agent's id between
/// encoding and masking (distributed DP adds its noise there).
pub type EncodedHook<'a> = dyn FnMut(u32, &mut EncodedInput) -> Result<(), SecAggError> + 'a;

/// As [`run_in_memory`], with `hook` applied to every agent's encoded input
/// before it is masked.
pub fn run_in_memory_with(
    config: &SecAggConfig,
    inputs: &[Update],
    dropouts: &Dropouts,
    seed: u64,
    hook: &mut EncodedHook<'_>,
) -> Result<InMemoryOutcome, SecAggError> {
    let n = inputs.len();
    let ids: Vec<u32> = (0..n as u32).collect();
    let rs = round_seed(seed);
    let mut server = ServerSession::new(config.clone(), rs, &ids)?;
    let mut sent = vec![0usize; n];
    let mut received = vec![0usize; n];
    let mut clients: Vec<Option<ClientSession>> = ids
        .iter()
        .map(|&id| {
            let mut rng =
                ChaCha20Rng::seed_from_u64(seed::derive(seed, &["secagg-client", &id.to_string()]));
            Some(ClientSession::new(config.clone(), id, rs, &mut rng))
        })
        .collect();
    let drop_now = |clients: &mut Vec<Option<ClientSession>>, list: &[u32]| {
        list.iter().for_each(|&d| clients[d as usize] = None);
    };

    drop_now(&mut clients, &dropouts.advertise);
    for c in clients.iter_mut().flatten() {
        let bytes = c.advertise()?.to_bytes();
        sent[c.id() as usize] += bytes.len();
        server.on_advertise(AdvertiseKeys::from_bytes(&bytes)?)?;
    }
    let roster = server.close_advertise()?.to_bytes();

    drop_now(&mut clients, &dropouts.share_keys);
    for c in clients.iter_mut().flatten() {
        received[c.id() as usize] += roster.len();
        let bytes = c.share_keys(&KeyRoster::from_bytes(&roster)?)?.to_bytes();
        sent[c.id() as usize] += bytes.len();
        server.on_shares(ShareUpload::from_bytes(&bytes)?)?;
    }
    let relays: Vec<Vec<u8>> = server
        .close_shares()?
        .iter()
        .map(ShareRelay::to_bytes)
        .collect();

    drop_now(&mut clients, &dropouts.masked_input);
    let mut masked_len = 0;
    for bytes in &relays {
        let relay = ShareRelay::from_bytes(bytes)?;
        let Some(c) = clients[relay.to as usize].as_mut() else {
            continue;
        };
        received[relay.to as usize] += bytes.len();
        let mut rng = rounding_rng(seed, relay.to);
        let mut encoded = encode(config, &inputs[relay.to as usize], &mut rng)?;
        hook(relay.to, &mut encoded)?;
        let masked = c.masked_encoded(&relay, &encoded)?;
        let wire = masked_to_bytes(relay.to, &masked);
        drop(masked);
        masked_len = wire.len();
        sent[relay.to as usize] += wire.len();
        server.on_masked_bytes(&wire)?;
    }
    let requests = match server.close_masked()? {
        AfterMasked::Unmask(r) => r,
        AfterMasked::CheckSurvivors(check) => {
            let check_bytes = check.to_bytes();
            for c in clients.iter_mut().flatten() {
                received[c.id() as usize] += check_bytes.len();
                let sig = c
                    .sign_survivors(&SurvivorCheck::from_bytes(&check_bytes)?)?
                    .to_bytes();
                sent[c.id() as usize] += sig.len();
                server.on_survivor_signature(SurvivorSignature::from_bytes(&sig)?)?;
            }
            server.close_survivor_check()?
        }
    };

    drop_now(&mut clients, &dropouts.unmask);
    for req in requests {
        let bytes = req.to_bytes();
        let Some(c) = clients[req.to as usize].as_mut() else {
            continue;
        };
        received[req.to as usize] += bytes.len();
        let resp = c.unmask(&UnmaskRequest::from_bytes(&bytes)?)?.to_bytes();
        sent[req.to as usize] += resp.len();
        server.on_unmask(UnmaskResponse::from_bytes(&resp)?)?;
    }
    let output = server.finish()?;
    let done: Vec<usize> = clients.iter().flatten().map(|c| c.id() as usize).collect();
    let mean =
        |v: &[usize]| done.iter().map(|&i| v[i] as f64).sum::<f64>() / done.len().max(1) as f64;
    let traffic = Traffic {
        sent_per_agent: mean(&sent),
        received_per_agent: mean(&received),
        masked_vector_bytes: masked_len,
    };
    Ok(InMemoryOutcome { output, traffic })
}
