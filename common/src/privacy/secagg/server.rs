//! The server's side of the protocol: collects keys, relays encrypted
//! shares, folds masked inputs into one running sum, and removes the masks at
//! the end using shares revealed by the survivors.
//!
//! The server never holds an individual update in the clear, by
//! construction: masked inputs enter [`MaskedSum::add`], which borrows the
//! vector, adds it into the single running sum and keeps nothing else; no
//! field of [`ServerSession`] can store a per-agent vector. The only way out
//! of a `MaskedSum` is [`ServerSession::finish`], which consumes it, and only
//! after every mask seed it needs has been recovered; on any failure the sum
//! is dropped unread.

use std::collections::{BTreeMap, BTreeSet};

use rayon::prelude::*;
use zeroize::Zeroizing;

use super::crypto;
use super::encode::DecodedSum;
use super::graph::NeighbourGraph;
use super::ring::{RingVec, check_shape, packed_in_range};
use super::wire::{
    AdvertiseKeys, EncryptedShare, KeyRoster, ShareRelay, ShareUpload, SurvivorCheck,
    SurvivorSignature, UnmaskRequest,
};
use super::{SecAggConfig, SecAggError, Stage};

mod unmask;

/// Whether either X25519 key of an advertisement is of low order.
fn has_low_order_key(keys: &AdvertiseKeys) -> bool {
    crypto::is_low_order(&keys.enc_pk) || crypto::is_low_order(&keys.mask_pk)
}

/// The running sum of masked inputs, modulo 2^modulus_bits: O(d) memory
/// however many agents report. It has no accessor: its content leaves only
/// through [`ServerSession::finish`] with all masks removed.
pub struct MaskedSum {
    sum: RingVec,
}

impl MaskedSum {
    fn new(bits: u32, len: usize) -> Self {
        Self {
            sum: RingVec::zeros(bits, len),
        }
    }

    /// Adds one masked vector; the caller keeps (and may drop) its buffer.
    fn add(&mut self, masked: &RingVec) {
        self.sum.wrapping_add_assign(masked);
    }

    /// Adds several masked vectors in one parallel pass.
    fn add_all(&mut self, masked: &[&RingVec]) {
        self.sum.wrapping_add_all(masked);
    }

    /// Adds one masked vector given as packed little-endian bytes
    /// (⌈bits/8⌉ per coordinate), without copying it into a vector first.
    /// Elements wrap in the machine word; `finish` reduces.
    fn add_le_bytes(&mut self, body: &[u8]) {
        self.sum.add_le(body);
    }
}

/// What the server sends after the masked-input stage closes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AfterMasked {
    /// Semi-honest mode: one unmask request per survivor.
    Unmask(Vec<UnmaskRequest>),
    /// Malicious-server check: broadcast this list for survivors to sign.
    CheckSurvivors(SurvivorCheck),
}

/// The result of a completed round.
#[derive(Debug, Clone, PartialEq)]
pub struct SecAggOutput {
    /// The unmasked sum modulo 2^modulus_bits.
    pub raw_sum: RingVec,
    /// The decoded sums (values, coordinate weights, weight, clipped count).
    pub sum: DecodedSum,
    /// Agents whose inputs are in the sum.
    pub survivors: Vec<u32>,
    /// Agents that shared keys but whose inputs are not in the sum.
    pub dropped: Vec<u32>,
    /// Agents that revealed a share at the unmask stage that the other
    /// holders' shares prove wrong (a forged share of a self-mask seed or
    /// of a dropped agent's key). The sum was recovered without it; the
    /// sender followed the protocol nowhere else the server can see.
    pub forged_shares: Vec<u32>,
}

/// A share revealed at the unmask stage, with its sender.
type Revealed = (u32, Zeroizing<Vec<u8>>);

/// The server's session for one round.
pub struct ServerSession {
    config: SecAggConfig,
    round_seed: [u8; 32],
    participants: BTreeSet<u32>,
    stage: Stage,
    keys: BTreeMap<u32, AdvertiseKeys>,
    graph: Option<NeighbourGraph>,
    uploads: BTreeMap<u32, Vec<EncryptedShare>>,
    sum: Option<MaskedSum>,
    survivors: BTreeSet<u32>,
    signatures: BTreeMap<u32, [u8; 64]>,
    requests: BTreeMap<u32, UnmaskRequest>,
    /// Per owner, the shares revealed at the unmask stage with their
    /// senders (each checked to carry its sender's x-coordinate).
    sk_shares: BTreeMap<u32, Vec<Revealed>>,
    b_shares: BTreeMap<u32, Vec<Revealed>>,
    responded: BTreeSet<u32>,
    /// Each owner's share holders (sorted by id), as the unmask stage
    /// looks them up: once per owner, not once per revealed share.
    holders_of: BTreeMap<u32, Vec<u32>>,
}

impl ServerSession {
    /// A round over the invited `participants` with the public `round_seed`
    /// (fresh per round; it fixes the neighbour graph and binds every key).
    pub fn new(
        config: SecAggConfig,
        round_seed: [u8; 32],
        participants: &[u32],
    ) -> Result<Self, SecAggError> {
        let set: BTreeSet<u32> = participants.iter().copied().collect();
        if set.len() != participants.len() {
            return Err(SecAggError::Malformed {
                what: "participants",
                detail: "an id appears twice".into(),
            });
        }
        config.validate(set.len())?;
        Ok(Self {
            config,
            round_seed,
            participants: set,
            stage: Stage::Advertise,
            keys: BTreeMap::new(),
            graph: None,
            uploads: BTreeMap::new(),
            sum: None,
            survivors: BTreeSet::new(),
            signatures: BTreeMap::new(),
            requests: BTreeMap::new(),
            sk_shares: BTreeMap::new(),
            b_shares: BTreeMap::new(),
            responded: BTreeSet::new(),
            holders_of: BTreeMap::new(),
        })
    }

    /// The current stage.
    pub fn stage(&self) -> Stage {
        self.stage
    }

    fn expect(&self, stage: Stage) -> Result<(), SecAggError> {
        if self.stage != stage {
            return Err(SecAggError::WrongStage {
                expected: stage,
                actual: self.stage,
            });
        }
        Ok(())
    }

    /// Aborts the round: drops the masked sum and every share received.
    fn abort(&mut self, err: SecAggError) -> SecAggError {
        self.stage = Stage::Aborted;
        self.sum = None;
        self.sk_shares.clear();
        self.b_shares.clear();
        err
    }

    fn enough(&mut self, stage: Stage, have: usize) -> Result<(), SecAggError> {
        if have < self.config.threshold {
            return Err(self.abort(SecAggError::TooFewSurvivors {
                stage,
                have,
                need: self.config.threshold,
            }));
        }
        Ok(())
    }

    fn graph(&self) -> &NeighbourGraph {
        self.graph
            .as_ref()
            .expect("the graph is built when the advertise stage closes")
    }

    /// The agents whose roster entries `id` uses (its share holders, or
    /// everyone when survivor lists are signed), once the advertise stage
    /// closed: the bindings to relay to it with the roster.
    pub fn keys_used_by(&self, id: u32) -> Vec<u32> {
        if self.config.verify_survivors {
            return self.keys.keys().copied().collect();
        }
        self.graph().holders(id)
    }

    /// Whether `sender` sent `holder` a share bundle: `holder` is one of
    /// its share holders, once the advertise stage closed (before that no
    /// bundle exists, so no one can have failed to open one).
    pub fn shares_with(&self, sender: u32, holder: u32) -> bool {
        self.graph
            .as_ref()
            .is_some_and(|g| g.adjacent(sender, holder))
    }

    /// Stage 1 input: one agent's keys.
    pub fn on_advertise(&mut self, keys: AdvertiseKeys) -> Result<(), SecAggError> {
        let low_order = has_low_order_key(&keys);
        self.admit(keys, low_order)
    }

    /// Stage 1 input of many agents at once, as if each were given to
    /// [`Self::on_advertise`] in turn (the first refusal is returned): the
    /// low-order checks, one X25519 agreement per key, run in parallel.
    pub fn on_advertise_many(&mut self, all: Vec<AdvertiseKeys>) -> Result<(), SecAggError> {
        let low_order: Vec<bool> = all.par_iter().map(has_low_order_key).collect();
        all.into_iter()
            .zip(low_order)
            .try_for_each(|(keys, low)| self.admit(keys, low))
    }

    /// Admits one advertisement whose low-order check gave `low_order`.
    fn admit(&mut self, keys: AdvertiseKeys, low_order: bool) -> Result<(), SecAggError> {
        self.expect(Stage::Advertise)?;
        if !self.participants.contains(&keys.id) {
            return Err(SecAggError::UnknownAgent {
                stage: Stage::Advertise,
                agent: keys.id,
            });
        }
        if self.config.verify_survivors && keys.sig_pk.is_none() {
            return Err(SecAggError::Refused(format!(
                "agent {} advertised no signature key",
                keys.id
            )));
        }
        if low_order {
            return Err(SecAggError::BadPublicKey { agent: keys.id });
        }
        if self.keys.contains_key(&keys.id) {
            return Err(SecAggError::Duplicate {
                stage: Stage::Advertise,
                agent: keys.id,
            });
        }
        self.keys.insert(keys.id, keys);
        Ok(())
    }

    /// Closes stage 1 with whoever answered; returns the full roster (every
    /// id and every key). What each agent is sent is
    /// [`Self::roster_for`] that agent: the ids and only the keys it uses.
    pub fn close_advertise(&mut self) -> Result<KeyRoster, SecAggError> {
        self.expect(Stage::Advertise)?;
        let n = self.keys.len();
        self.enough(Stage::Advertise, n)?;
        if let Err(e) = self.config.validate(n) {
            return Err(self.abort(e));
        }
        let ids: Vec<u32> = self.keys.keys().copied().collect();
        match NeighbourGraph::new(&self.round_seed, &ids, self.config.degree(n)) {
            Ok(g) => self.graph = Some(g),
            Err(e) => return Err(self.abort(e)),
        }
        self.stage = Stage::ShareKeys;
        Ok(KeyRoster {
            ids,
            keys: self.keys.values().cloned().collect(),
        })
    }

    /// The roster to send agent `id` once the advertise stage closed: every
    /// id that advertised and the keys of the entries `id` uses
    /// ([`Self::keys_used_by`]: k + 1 under SecAgg+), so the share-keys
    /// stage sends O(n·k) keys in all rather than n to each agent.
    pub fn roster_for(&self, id: u32) -> KeyRoster {
        KeyRoster {
            ids: self.keys.keys().copied().collect(),
            keys: self
                .keys_used_by(id)
                .iter()
                .filter_map(|h| self.keys.get(h).cloned())
                .collect(),
        }
    }

    /// Stage 2 input: one agent's encrypted bundles, exactly one per neighbour.
    pub fn on_shares(&mut self, upload: ShareUpload) -> Result<(), SecAggError> {
        self.expect(Stage::ShareKeys)?;
        let from = upload.from;
        if !self.keys.contains_key(&from) {
            return Err(SecAggError::UnknownAgent {
                stage: Stage::ShareKeys,
                agent: from,
            });
        }
        if self.uploads.contains_key(&from) {
            return Err(SecAggError::Duplicate {
                stage: Stage::ShareKeys,
                agent: from,
            });
        }
        let mut to: Vec<u32> = upload.shares.iter().map(|s| s.to).collect();
        to.sort_unstable();
        if upload.shares.iter().any(|s| s.from != from) || to != self.graph().neighbours(from) {
            return Err(SecAggError::Refused(format!(
                "agent {from} did not send one share per neighbour"
            )));
        }
        if let Some(s) = upload
            .shares
            .iter()
            .find(|s| s.ciphertext.len() != crypto::SHARE_CIPHERTEXT_LEN)
        {
            return Err(SecAggError::Malformed {
                what: "ShareUpload",
                detail: format!(
                    "agent {from}'s share for agent {} is {} bytes; every share ciphertext is \
                     exactly {} bytes",
                    s.to,
                    s.ciphertext.len(),
                    crypto::SHARE_CIPHERTEXT_LEN
                ),
            });
        }
        self.uploads.insert(from, upload.shares);
        Ok(())
    }

    /// Closes stage 2; returns one relay per agent that sent its shares.
    pub fn close_shares(&mut self) -> Result<Vec<ShareRelay>, SecAggError> {
        self.expect(Stage::ShareKeys)?;
        self.enough(Stage::ShareKeys, self.uploads.len())?;
        self.check_holders(&self.uploads.keys().copied().collect())?;
        let mut relays: BTreeMap<u32, Vec<EncryptedShare>> =
            self.uploads.keys().map(|&u| (u, Vec::new())).collect();
        for shares in self.uploads.values_mut() {
            for s in shares.drain(..) {
                if let Some(r) = relays.get_mut(&s.to) {
                    r.push(s);
                }
            }
        }
        self.sum = Some(MaskedSum::new(
            self.config.modulus_bits,
            self.config.vector_len(),
        ));
        self.stage = Stage::MaskedInput;
        Ok(relays
            .into_iter()
            .map(|(to, shares)| ShareRelay { to, shares })
            .collect())
    }

    /// Every agent that shared keys must keep at least t holders among
    /// `alive`, or its masks could never be removed: abort now, before
    /// anything is revealed.
    fn check_holders(&mut self, alive: &BTreeSet<u32>) -> Result<(), SecAggError> {
        let t = self.config.threshold;
        let short = self.uploads.keys().find_map(|&o| {
            let have = self
                .graph()
                .holders(o)
                .iter()
                .filter(|h| alive.contains(h))
                .count();
            (have < t).then_some((o, have))
        });
        if let Some((agent, have)) = short {
            return Err(self.abort(SecAggError::NotEnoughShares {
                agent,
                have,
                need: t,
            }));
        }
        Ok(())
    }

    /// Stage 3 input: adds one masked vector into the running sum. The vector
    /// is only borrowed; nothing of it is kept apart from the sum.
    pub fn on_masked_input(&mut self, from: u32, masked: &RingVec) -> Result<(), SecAggError> {
        self.check_masked_sender(from)?;
        self.check_masked_vector(masked)?;
        self.sum
            .as_mut()
            .expect("the sum exists from stage 3 on")
            .add(masked);
        self.survivors.insert(from);
        Ok(())
    }

    /// Stage 3 inputs of several agents at once (the in-memory driver's
    /// batch): each is checked as by [`Self::on_masked_input`], and all are
    /// added in one parallel pass. If any is refused, none is added and the
    /// first refusal is returned.
    pub fn on_masked_inputs(&mut self, inputs: &[(u32, &RingVec)]) -> Result<(), SecAggError> {
        let mut seen = BTreeSet::new();
        for &(from, masked) in inputs {
            self.check_masked_sender(from)?;
            if !seen.insert(from) {
                return Err(SecAggError::Duplicate {
                    stage: Stage::MaskedInput,
                    agent: from,
                });
            }
            self.check_masked_vector(masked)?;
        }
        let vectors: Vec<&RingVec> = inputs.iter().map(|&(_, v)| v).collect();
        self.sum
            .as_mut()
            .expect("the sum exists from stage 3 on")
            .add_all(&vectors);
        self.survivors.extend(seen);
        Ok(())
    }

    /// Stage 3 input straight from the wire (the bytes of
    /// [`super::masked_to_bytes`]): the framing and modulus are checked, then
    /// the body is added into the sum without an intermediate vector.
    /// Returns the sender.
    pub fn on_masked_bytes(&mut self, bytes: &[u8]) -> Result<u32, SecAggError> {
        let (from, body) = super::wire::masked_body(bytes, &self.config)?;
        self.check_masked_sender(from)?;
        if !packed_in_range(self.config.modulus_bits, body) {
            return Err(SecAggError::Malformed {
                what: "masked input",
                detail: "coordinate outside the modulus".into(),
            });
        }
        self.sum
            .as_mut()
            .expect("the sum exists from stage 3 on")
            .add_le_bytes(body);
        self.survivors.insert(from);
        Ok(from)
    }

    fn check_masked_sender(&self, from: u32) -> Result<(), SecAggError> {
        self.expect(Stage::MaskedInput)?;
        if !self.uploads.contains_key(&from) {
            return Err(SecAggError::UnknownAgent {
                stage: Stage::MaskedInput,
                agent: from,
            });
        }
        if self.survivors.contains(&from) {
            return Err(SecAggError::Duplicate {
                stage: Stage::MaskedInput,
                agent: from,
            });
        }
        Ok(())
    }

    /// A masked vector's ring, length and range.
    fn check_masked_vector(&self, masked: &RingVec) -> Result<(), SecAggError> {
        check_shape(
            masked,
            "masked input",
            self.config.modulus_bits,
            self.config.vector_len(),
        )?;
        if !masked.in_range() {
            return Err(SecAggError::Malformed {
                what: "masked input",
                detail: "coordinate outside the modulus".into(),
            });
        }
        Ok(())
    }

    /// The agents whose masked inputs the sum holds (final once stage 3
    /// closed): the sum an unmasking reveals is theirs.
    pub fn survivors(&self) -> &BTreeSet<u32> {
        &self.survivors
    }

    /// Closes stage 3 with whoever answered.
    pub fn close_masked(&mut self) -> Result<AfterMasked, SecAggError> {
        self.expect(Stage::MaskedInput)?;
        self.enough(Stage::MaskedInput, self.survivors.len())?;
        self.check_holders(&self.survivors.clone())?;
        let survivors: Vec<u32> = self.survivors.iter().copied().collect();
        if self.config.verify_survivors {
            self.stage = Stage::Consistency;
            return Ok(AfterMasked::CheckSurvivors(SurvivorCheck { survivors }));
        }
        self.stage = Stage::Unmask;
        // The list goes along unsigned: an agent accounts its distributed
        // noise at the survivors it names (a smaller sum carries less noise).
        Ok(AfterMasked::Unmask(
            self.make_requests(survivors, Vec::new()),
        ))
    }

    /// Optional stage input: one survivor's signature over the survivor list.
    pub fn on_survivor_signature(&mut self, sig: SurvivorSignature) -> Result<(), SecAggError> {
        self.expect(Stage::Consistency)?;
        if !self.survivors.contains(&sig.from) {
            return Err(SecAggError::UnknownAgent {
                stage: Stage::Consistency,
                agent: sig.from,
            });
        }
        let list: Vec<u32> = self.survivors.iter().copied().collect();
        let pk = self.keys[&sig.from].sig_pk.unwrap_or_default();
        if !crypto::verify(
            &pk,
            &crypto::survivor_message(&self.round_seed, &list),
            &sig.signature,
        ) {
            return Err(SecAggError::BadSignatures { valid: 0, need: 1 });
        }
        self.signatures.insert(sig.from, sig.signature);
        Ok(())
    }

    /// Closes the consistency check; returns the unmask requests carrying the
    /// signatures. Only survivors that signed are asked.
    pub fn close_survivor_check(&mut self) -> Result<Vec<UnmaskRequest>, SecAggError> {
        self.expect(Stage::Consistency)?;
        self.enough(Stage::Consistency, self.signatures.len())?;
        let survivors: Vec<u32> = self.survivors.iter().copied().collect();
        let sigs = self
            .signatures
            .iter()
            .map(|(&from, &signature)| SurvivorSignature { from, signature })
            .collect();
        self.stage = Stage::Unmask;
        Ok(self.make_requests(survivors, sigs))
    }

    /// For each survivor: the self-mask shares of surviving owners and the
    /// pairwise-key shares of dropped owners it holds. The survivor/dropped
    /// split is one partition of the owners, so no owner's two secrets are
    /// ever both requested.
    fn make_requests(
        &mut self,
        survivors: Vec<u32>,
        signatures: Vec<SurvivorSignature>,
    ) -> Vec<UnmaskRequest> {
        let asked: Vec<u32> = if self.config.verify_survivors {
            self.signatures.keys().copied().collect()
        } else {
            self.survivors.iter().copied().collect()
        };
        let graph = self.graph();
        let requests: Vec<UnmaskRequest> = asked
            .into_iter()
            .map(|u| {
                let owners = graph
                    .holders(u)
                    .into_iter()
                    .filter(|o| self.uploads.contains_key(o));
                let (self_mask_of, pairwise_of) = owners.partition(|o| self.survivors.contains(o));
                UnmaskRequest {
                    to: u,
                    self_mask_of,
                    pairwise_of,
                    survivors: survivors.clone(),
                    signatures: signatures.clone(),
                }
            })
            .collect();
        self.requests = requests.iter().map(|r| (r.to, r.clone())).collect();
        requests
    }
}
