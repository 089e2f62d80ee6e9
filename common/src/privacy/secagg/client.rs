//! The agent's side of the protocol, as a state machine driven by the
//! messages the server relays. It holds the agent's secrets and its own
//! update; it reveals, for each neighbour, at most one of that neighbour's two
//! secrets, and never its own pairwise-mask key once its masked input is out.

use std::collections::{BTreeMap, BTreeSet};

use ed25519_dalek::SigningKey;
use rand::{CryptoRng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use rayon::prelude::*;
use zeroize::Zeroizing;

use super::crypto::{self, BUNDLE_LEN, SHARE_LEN, SecretKey, SharedAgreements, Sign};
use super::encode::{Draws, EncodedInput, encode};
use super::graph::NeighbourGraph;
use super::ring::{RingVec, check_shape};
use super::wire::{
    AdvertiseKeys, EncryptedShare, KeyRoster, ShareRelay, ShareUpload, SurvivorCheck,
    SurvivorSignature, UnmaskRequest, UnmaskResponse,
};
use super::{SecAggConfig, SecAggError, Stage};
use crate::federation::update::Update;

/// HKDF info strings separating the two uses of X25519 agreements.
pub(crate) const INFO_SHARE: &[u8] = b"/share-encryption";
pub(crate) const INFO_MASK: &[u8] = b"/pairwise-mask";

/// Shares this agent holds for one owner: (pairwise key share, self-mask share).
type HeldShares = (Zeroizing<Vec<u8>>, Zeroizing<Vec<u8>>);

/// One agent's session for one round.
pub struct ClientSession {
    config: SecAggConfig,
    id: u32,
    round_seed: [u8; 32],
    enc_sk: SecretKey,
    mask_sk: SecretKey,
    /// The public halves of `enc_sk` and `mask_sk`, computed once.
    enc_pk: [u8; 32],
    mask_pk: [u8; 32],
    /// Agreements shared with the other parties of an in-memory round, if
    /// this session is driven by one (`None` for a real agent).
    shared: Option<std::sync::Arc<SharedAgreements>>,
    sig_sk: Option<SigningKey>,
    self_seed: Zeroizing<[u8; 32]>,
    dealer: ChaCha20Rng,
    stage: Stage,
    /// Every agent id in the roster, sorted, kept only with the
    /// malicious-server check (a survivor list may name any of them): O(n)
    /// per agent, which a process playing n agents would hold n times.
    roster_ids: Vec<u32>,
    /// This agent's neighbours in the round's graph, sorted: computed once
    /// in stage 2, so later stages need not rebuild the O(n) graph.
    neighbours: Vec<u32>,
    /// The roster entries of this agent's neighbours only: O(k) per agent,
    /// not O(n), so that a process playing n agents holds O(n·k) keys.
    roster: BTreeMap<u32, AdvertiseKeys>,
    /// Survivor-signature keys of every roster entry (malicious-server check
    /// only: signatures may come from any survivor).
    sig_keys: BTreeMap<u32, [u8; 32]>,
    /// Shares held, by owner (includes this agent's own shares of itself).
    held: BTreeMap<u32, HeldShares>,
    /// Share-encryption keys agreed with each neighbour in stage 2.
    share_keys: BTreeMap<u32, Zeroizing<[u8; 32]>>,
    /// Neighbours in the pairwise masks (those whose shares reached us).
    mask_peers: Vec<u32>,
    signed_survivors: Option<Vec<u32>>,
}

impl ClientSession {
    /// Starts a session: draws the two X25519 key pairs, the self-mask seed
    /// and (if the malicious-server check is on) an Ed25519 key from `rng`,
    /// which must be a cryptographic generator (OS entropy in production).
    pub fn new<R: CryptoRng>(
        config: SecAggConfig,
        id: u32,
        round_seed: [u8; 32],
        rng: &mut R,
    ) -> Self {
        let enc_sk = SecretKey::random_from_rng(rng);
        let mask_sk = SecretKey::random_from_rng(rng);
        let sig_sk = config.verify_survivors.then(|| SigningKey::generate(rng));
        let mut self_seed = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(self_seed.as_mut());
        let mut dealer_seed = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(dealer_seed.as_mut());
        Self {
            config,
            id,
            round_seed,
            enc_pk: enc_sk.public_key(),
            mask_pk: mask_sk.public_key(),
            shared: None,
            enc_sk,
            mask_sk,
            sig_sk,
            self_seed,
            dealer: ChaCha20Rng::from_seed(*dealer_seed),
            stage: Stage::Advertise,
            roster_ids: Vec::new(),
            neighbours: Vec::new(),
            roster: BTreeMap::new(),
            sig_keys: BTreeMap::new(),
            held: BTreeMap::new(),
            share_keys: BTreeMap::new(),
            mask_peers: Vec::new(),
            signed_survivors: None,
        }
    }

    /// As [`ClientSession::new`], for an agent played in the same process as
    /// the other parties, which computes each pair's agreement once.
    pub(crate) fn new_sharing<R: CryptoRng>(
        config: SecAggConfig,
        id: u32,
        round_seed: [u8; 32],
        rng: &mut R,
        shared: std::sync::Arc<SharedAgreements>,
    ) -> Self {
        let mut session = Self::new(config, id, round_seed, rng);
        session.shared = Some(shared);
        session
    }

    /// X25519 agreement with `theirs` (one of this agent's public keys is
    /// `my_public`) through HKDF, shared with the pair's other end when the
    /// session has an in-memory driver's cache.
    fn agree(
        &self,
        mine: &SecretKey,
        my_public: &[u8; 32],
        theirs: &[u8; 32],
        info: &[u8],
        peer: u32,
    ) -> Result<Zeroizing<[u8; 32]>, SecAggError> {
        match &self.shared {
            Some(shared) => shared.agree(mine, my_public, theirs, &self.round_seed, info, peer),
            None => crypto::agree(mine, theirs, &self.round_seed, info, peer),
        }
    }

    /// The round's parameters (as the coordinator sent them).
    pub fn config(&self) -> &SecAggConfig {
        &self.config
    }

    /// This agent's id in the round.
    pub fn id(&self) -> u32 {
        self.id
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

    /// Stage 1: the public keys to send to the server.
    pub fn advertise(&mut self) -> Result<AdvertiseKeys, SecAggError> {
        self.expect(Stage::Advertise)?;
        self.stage = Stage::ShareKeys;
        Ok(self.own_keys())
    }

    fn own_keys(&self) -> AdvertiseKeys {
        AdvertiseKeys {
            id: self.id,
            enc_pk: self.enc_pk,
            mask_pk: self.mask_pk,
            sig_pk: self.sig_sk.as_ref().map(|k| k.verifying_key().to_bytes()),
        }
    }

    /// The ids of the roster entries whose keys this session uses in the
    /// round `roster` describes: its share holders (its neighbours and
    /// itself), or every entry when survivor lists are signed (any survivor's
    /// signature key checks the list). These are the entries an agent must
    /// verify before [`ClientSession::share_keys`]; the others' keys never
    /// touch its secrets.
    pub fn keys_used(&self, roster: &KeyRoster) -> Result<Vec<u32>, SecAggError> {
        let ids = checked_ids(roster)?;
        if self.config.verify_survivors {
            return Ok(ids.to_vec());
        }
        let n = ids.len();
        self.config.validate(n)?;
        let graph = NeighbourGraph::new(&self.round_seed, ids, self.config.degree(n))?;
        Ok(graph.holders(self.id))
    }

    /// Stage 2: given the round's ids and the keys this agent uses,
    /// Shamir-shares the pairwise-mask secret key and the self-mask seed
    /// t-of-(k+1) among the neighbours and itself, and encrypts each
    /// neighbour's bundle to that neighbour.
    ///
    /// The roster is refused, naming the agent, when it carries keys of an
    /// agent it does not list or two entries for one agent, and when it lacks
    /// the keys of an agent whose keys this one uses ([`Self::keys_used`]);
    /// entries it does not use are ignored, as their keys never touch its
    /// secrets.
    pub fn share_keys(&mut self, roster: &KeyRoster) -> Result<ShareUpload, SecAggError> {
        self.expect(Stage::ShareKeys)?;
        let ids = checked_ids(roster)?;
        let mut map = BTreeMap::new();
        for k in &roster.keys {
            if ids.binary_search(&k.id).is_err() {
                return Err(SecAggError::Refused(format!(
                    "the roster carries keys of agent {}, which its id list does not name",
                    k.id
                )));
            }
            if map.insert(k.id, k).is_some() {
                return Err(SecAggError::Duplicate {
                    stage: Stage::ShareKeys,
                    agent: k.id,
                });
            }
        }
        if map.get(&self.id).copied() != Some(&self.own_keys()) {
            return Err(SecAggError::Refused(
                "the roster does not carry this agent's own keys".into(),
            ));
        }
        let n = ids.len();
        self.config.validate(n)?;
        let graph = NeighbourGraph::new(&self.round_seed, ids, self.config.degree(n))?;
        let holders = graph.holders(self.id);
        let used: &[u32] = if self.config.verify_survivors {
            ids
        } else {
            &holders
        };
        if let Some(missing) = used.iter().find(|id| !map.contains_key(id)) {
            return Err(SecAggError::Refused(format!(
                "the roster lacks the keys of agent {missing}, which this agent needs"
            )));
        }
        if self.config.verify_survivors
            && let Some(k) = map.values().find(|k| k.sig_pk.is_none())
        {
            return Err(SecAggError::Refused(format!(
                "agent {} in the roster has no signature key",
                k.id
            )));
        }
        let t = self.config.threshold;
        let sk_bytes = self.mask_sk.to_bytes();
        let sk_shares = crypto::split(&sk_bytes, t, holders.len(), &mut self.dealer);
        let b_shares = crypto::split(&self.self_seed, t, holders.len(), &mut self.dealer);
        let me = self.id;
        let own = holders
            .iter()
            .position(|&h| h == me)
            .expect("an agent holds its own shares");
        self.held
            .insert(me, (sk_shares[own].clone(), b_shares[own].clone()));
        // One X25519 agreement per neighbour, in parallel; the derived keys are
        // kept to open the neighbours' bundles in stage 3.
        let sealed: Vec<(u32, Zeroizing<[u8; 32]>, EncryptedShare)> = holders
            .par_iter()
            .enumerate()
            .filter(|&(_, &h)| h != me)
            .map(|(i, &h)| {
                let key = self.agree(&self.enc_sk, &self.enc_pk, &map[&h].enc_pk, INFO_SHARE, h)?;
                let mut plain = Zeroizing::new(Vec::with_capacity(BUNDLE_LEN));
                plain.extend_from_slice(&me.to_le_bytes());
                plain.extend_from_slice(&h.to_le_bytes());
                plain.extend_from_slice(&sk_shares[i]);
                plain.extend_from_slice(&b_shares[i]);
                let ciphertext = crypto::seal(&key, &self.round_seed, me, h, &plain);
                Ok((
                    h,
                    key,
                    EncryptedShare {
                        from: me,
                        to: h,
                        ciphertext,
                    },
                ))
            })
            .collect::<Result<_, SecAggError>>()?;
        let mut shares = Vec::with_capacity(sealed.len());
        for (h, key, share) in sealed {
            self.share_keys.insert(h, key);
            shares.push(share);
        }
        if self.config.verify_survivors {
            self.sig_keys = map
                .iter()
                .filter_map(|(&id, k)| k.sig_pk.map(|pk| (id, pk)))
                .collect();
        }
        self.roster = holders.iter().map(|h| (*h, map[h].clone())).collect();
        self.neighbours = graph.neighbours(self.id);
        if self.config.verify_survivors {
            self.roster_ids = ids.to_vec();
        }
        self.stage = Stage::MaskedInput;
        Ok(ShareUpload {
            from: self.id,
            shares,
        })
    }

    /// Stage 3: decrypts the relayed bundles, then masks `update` (encoded
    /// with stochastic rounding drawn from `rounding`). Returns the masked
    /// vector (modulo 2^modulus_bits) and this agent's clipped-coordinate
    /// count.
    pub fn masked_input<D: Draws>(
        &mut self,
        relay: &ShareRelay,
        update: &Update,
        rounding: &mut D,
    ) -> Result<(RingVec, usize), SecAggError> {
        let encoded = encode(&self.config, update, rounding)?;
        let clipped = encoded.clipped();
        Ok((self.masked_encoded(relay, &encoded)?, clipped))
    }

    /// Stage 3 for an already encoded input (see [`super::encode()`]).
    pub fn masked_encoded(
        &mut self,
        relay: &ShareRelay,
        input: &EncodedInput,
    ) -> Result<RingVec, SecAggError> {
        self.masked_encoded_into(relay, input.clone())
    }

    /// As [`Self::masked_encoded`], masking the input's own buffer in place
    /// instead of a copy of it.
    pub fn masked_encoded_into(
        &mut self,
        relay: &ShareRelay,
        input: EncodedInput,
    ) -> Result<RingVec, SecAggError> {
        let (mut out, masks) = self.input_and_masks(relay, input)?;
        crypto::apply_masks(&mut out, &masks);
        Ok(out)
    }

    /// Everything [`ClientSession::masked_encoded_into`] does but adding the
    /// masks: checks the relay, keeps the neighbours' shares, derives the
    /// pairwise and self mask seeds and moves to the next stage, then returns
    /// the encoded input **unmasked** with the masks it must take. Only the
    /// in-memory driver calls it, to expand each pair's mask once for both
    /// ends ([`crypto::apply_masks_shared`]) before any vector reaches the
    /// server.
    pub(crate) fn input_and_masks(
        &mut self,
        relay: &ShareRelay,
        input: EncodedInput,
    ) -> Result<(RingVec, Vec<crypto::Mask>), SecAggError> {
        self.expect(Stage::MaskedInput)?;
        check_shape(
            &input.vector,
            "encoded input",
            self.config.modulus_bits,
            self.config.vector_len(),
        )?;
        if relay.to != self.id {
            return Err(SecAggError::Refused(format!(
                "relay addressed to {}, not {}",
                relay.to, self.id
            )));
        }
        let mut peers = BTreeSet::new();
        for s in &relay.shares {
            if s.to != self.id || self.neighbours.binary_search(&s.from).is_err() {
                return Err(SecAggError::Refused(format!(
                    "share from {} is not from a neighbour",
                    s.from
                )));
            }
            if !peers.insert(s.from) {
                return Err(SecAggError::Duplicate {
                    stage: Stage::MaskedInput,
                    agent: s.from,
                });
            }
            let key = &self.share_keys[&s.from];
            let plain = crypto::open(key, &self.round_seed, s.from, self.id, &s.ciphertext)?;
            if plain.len() != BUNDLE_LEN
                || plain[..4] != s.from.to_le_bytes()
                || plain[4..8] != self.id.to_le_bytes()
            {
                return Err(SecAggError::BadCiphertext {
                    from: s.from,
                    to: self.id,
                });
            }
            let sk = Zeroizing::new(plain[8..8 + SHARE_LEN].to_vec());
            let b = Zeroizing::new(plain[8 + SHARE_LEN..].to_vec());
            self.held.insert(s.from, (sk, b));
        }
        if peers.len() + 1 < self.config.threshold {
            return Err(SecAggError::TooFewSurvivors {
                stage: Stage::ShareKeys,
                have: peers.len() + 1,
                need: self.config.threshold,
            });
        }
        let peer_list: Vec<u32> = peers.iter().copied().collect();
        let mut masks: Vec<crypto::Mask> = peer_list
            .par_iter()
            .map(|&v| {
                let seed = self.agree(
                    &self.mask_sk,
                    &self.mask_pk,
                    &self.roster[&v].mask_pk,
                    INFO_MASK,
                    v,
                )?;
                Ok((*seed, if self.id < v { Sign::Plus } else { Sign::Minus }))
            })
            .collect::<Result<_, SecAggError>>()?;
        masks.push((*self.self_seed, Sign::Plus));
        self.mask_peers = peers.into_iter().collect();
        self.stage = if self.config.verify_survivors {
            Stage::Consistency
        } else {
            Stage::Unmask
        };
        Ok((input.vector, masks))
    }

    /// Optional stage (malicious-server check): signs the survivor list the
    /// server shows, after checking it contains this agent and at least t ids.
    pub fn sign_survivors(
        &mut self,
        check: &SurvivorCheck,
    ) -> Result<SurvivorSignature, SecAggError> {
        self.expect(Stage::Consistency)?;
        let list = &check.survivors;
        if !list.windows(2).all(|w| w[0] < w[1])
            || !list
                .iter()
                .all(|id| self.roster_ids.binary_search(id).is_ok())
        {
            return Err(SecAggError::Refused(
                "survivor list is unsorted or names unknown agents".into(),
            ));
        }
        if list.binary_search(&self.id).is_err() {
            return Err(SecAggError::Refused(
                "survivor list omits this agent, whose input was sent".into(),
            ));
        }
        if list.len() < self.config.threshold {
            return Err(SecAggError::TooFewSurvivors {
                stage: Stage::Consistency,
                have: list.len(),
                need: self.config.threshold,
            });
        }
        self.check_listed_neighbours(list)?;
        let key = self
            .sig_sk
            .as_ref()
            .ok_or_else(|| SecAggError::Refused("no signature key".into()))?;
        let signature = crypto::sign(key, &crypto::survivor_message(&self.round_seed, list));
        self.signed_survivors = Some(list.clone());
        self.stage = Stage::Unmask;
        Ok(SurvivorSignature {
            from: self.id,
            signature,
        })
    }

    /// Stage 4: reveals the requested shares, refusing the whole request if
    /// it asks for both secrets of one agent, for this agent's own pairwise
    /// key, for shares this agent does not hold, or (with the malicious-server
    /// check) if it lacks t valid signatures over the list this agent signed.
    pub fn unmask(&mut self, request: &UnmaskRequest) -> Result<UnmaskResponse, SecAggError> {
        self.expect(Stage::Unmask)?;
        // Whatever happens next, this session never answers a second request.
        self.stage = Stage::Done;
        let selfs: BTreeSet<u32> = request.self_mask_of.iter().copied().collect();
        let pairs: BTreeSet<u32> = request.pairwise_of.iter().copied().collect();
        if request.to != self.id
            || selfs.len() != request.self_mask_of.len()
            || pairs.len() != request.pairwise_of.len()
        {
            return Err(SecAggError::Refused(
                "unmask request is misaddressed or repeats an agent".into(),
            ));
        }
        if let Some(both) = selfs.intersection(&pairs).next() {
            return Err(SecAggError::Refused(format!(
                "request asks for both the self-mask seed and the pairwise key of agent {both}"
            )));
        }
        if pairs.contains(&self.id) || !selfs.contains(&self.id) {
            return Err(SecAggError::Refused(
                "request treats this agent as dropped although its masked input was sent".into(),
            ));
        }
        if let Some(unknown) = selfs
            .iter()
            .chain(&pairs)
            .find(|o| !self.held.contains_key(o))
        {
            return Err(SecAggError::Refused(format!(
                "no shares held for agent {unknown}"
            )));
        }
        if self.config.verify_survivors {
            self.check_signatures(request, &selfs, &pairs)?;
        } else if !request.survivors.is_empty() {
            // Unsigned, but it must agree with what is asked of this agent:
            // the agent's ledger reads its length.
            let listed = |o: &u32| request.survivors.binary_search(o).is_ok();
            if !request.survivors.is_sorted_by(|a, b| a < b)
                || !selfs.iter().all(listed)
                || pairs.iter().any(listed)
            {
                return Err(SecAggError::Refused(
                    "requested shares disagree with the request's survivor list".into(),
                ));
            }
            self.check_listed_neighbours(&request.survivors)?;
        }
        let pick = |ids: &BTreeSet<u32>, second: bool| {
            ids.iter()
                .map(|o| {
                    let (sk, b) = &self.held[o];
                    (*o, if second { b.to_vec() } else { sk.to_vec() })
                })
                .collect()
        };
        Ok(UnmaskResponse {
            from: self.id,
            self_mask_shares: pick(&selfs, true),
            pairwise_shares: pick(&pairs, false),
        })
    }

    /// Refuses a survivor list that names a neighbour whose shares never
    /// reached this agent (Bonawitz et al.'s check U3 ⊆ U2, on this agent's
    /// neighbourhood). Such a survivor's input is not masked against this
    /// agent's, so the list would not describe the sum: a coordinator that
    /// relays selectively can pad the list with agents whose inputs it
    /// throws away, while this agent's only mask peers are ones it declares
    /// dropped, and recover this agent's input alone from the others'
    /// shares. With the check this agent refuses such a list, and its
    /// neighbours outside its mask peers are too few to rebuild its
    /// self-mask seed without its share: its t − 1 mask peers and t of them
    /// would be more than a neighbourhood holds at a majority threshold.
    /// An honest coordinator relays every bundle, so the survivors among
    /// this agent's neighbours are always among its mask peers.
    fn check_listed_neighbours(&self, list: &[u32]) -> Result<(), SecAggError> {
        let unmasked = list.iter().find(|&&v| {
            v != self.id
                && self.neighbours.binary_search(&v).is_ok()
                && self.mask_peers.binary_search(&v).is_err()
        });
        match unmasked {
            Some(v) => Err(SecAggError::Refused(format!(
                "survivor list names agent {v}, a neighbour whose shares never reached this \
                 agent: its input is not masked against this agent's, so the list does not \
                 describe the sum"
            ))),
            None => Ok(()),
        }
    }

    fn check_signatures(
        &self,
        request: &UnmaskRequest,
        selfs: &BTreeSet<u32>,
        pairs: &BTreeSet<u32>,
    ) -> Result<(), SecAggError> {
        let signed = self
            .signed_survivors
            .as_ref()
            .ok_or_else(|| SecAggError::Refused("survivor list never signed".into()))?;
        if &request.survivors != signed {
            return Err(SecAggError::Refused(
                "unmask request carries a survivor list other than the one signed".into(),
            ));
        }
        if !selfs.iter().all(|s| signed.binary_search(s).is_ok())
            || pairs.iter().any(|p| signed.binary_search(p).is_ok())
        {
            return Err(SecAggError::Refused(
                "requested shares disagree with the signed survivor list".into(),
            ));
        }
        let message = crypto::survivor_message(&self.round_seed, signed);
        let mut valid = BTreeSet::new();
        for sig in &request.signatures {
            let Some(&pk) = self.sig_keys.get(&sig.from) else {
                continue;
            };
            if signed.binary_search(&sig.from).is_ok()
                && crypto::verify(&pk, &message, &sig.signature)
            {
                valid.insert(sig.from);
            }
        }
        if valid.len() < self.config.threshold {
            return Err(SecAggError::BadSignatures {
                valid: valid.len(),
                need: self.config.threshold,
            });
        }
        Ok(())
    }
}

/// The roster's id list, checked to be sorted without duplicates (the wire
/// form guarantees it; a roster built in memory may not).
fn checked_ids(roster: &KeyRoster) -> Result<&[u32], SecAggError> {
    if !roster.ids.windows(2).all(|w| w[0] < w[1]) {
        return Err(SecAggError::Malformed {
            what: "KeyRoster",
            detail: "the id list is not sorted or repeats an id".into(),
        });
    }
    Ok(&roster.ids)
}
