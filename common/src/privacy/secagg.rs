//! Secure aggregation: the coordinator learns the sum of the agents' updates
//! and nothing else about any one of them.
//!
//! This is the protocol of Bonawitz et al. (CCS 2017, "Practical Secure
//! Aggregation for Privacy-Preserving Machine Learning") with the sparse
//! neighbour graph of Bell et al. (CCS 2020, "Secure Single-Server Aggregation
//! with (Poly)Logarithmic Overhead", "SecAgg+"), written as two message-driven
//! state machines — [`ClientSession`] for an agent, [`ServerSession`] for the
//! coordinator — with no I/O: the gRPC service and the simulator drive them,
//! and [`run_in_memory`] drives both in one process.
//!
//! # Threat model
//!
//! * **Semi-honest server and agents** (default): every party follows the
//!   protocol but tries to learn from what it sees. The server learns only the
//!   sum of the inputs of the survivors `U3` (agents whose masked input arrived
//!   before the masked-input stage closed), plus who dropped when. Any set of
//!   fewer than `t` colluding holders of an agent's shares, with or without the
//!   server, learns nothing about that agent's input beyond the sum.
//! * **Malicious server, optional** (`verify_survivors`): a server could tell
//!   different agents different survivor lists so as to collect both secrets of
//!   one agent. With the check on, every survivor signs (Ed25519) the survivor
//!   list it is shown, and an agent reveals shares only when shown at least `t`
//!   valid signatures from survivors over exactly the list it signed; with
//!   `t > (k + 1) / 2` two conflicting lists cannot both gather `t` signatures
//!   among one agent's holders. The Ed25519 verifying keys travel in the
//!   roster, bound to the agents' certificates like every other key (below),
//!   so the server cannot sign a list in an agent's name. A malicious server
//!   can still make the round abort, and the graph is fixed by the public
//!   round seed over the agents that advertised.
//! * **Keys are bound to certificates** ([`binding`]). The server relays
//!   the roster, so it could otherwise put keys of its own in place of an
//!   agent's and open the shares sent to it. Each agent signs its
//!   advertisement — run, round, task (attempt), round seed, merchant id and
//!   all its keys, domain-separated — with its mutual-TLS key; the server
//!   relays with every entry that signature and the certificate chain the
//!   agent presented on its own connection; every agent verifies each entry
//!   (chain to its trusted CA for client authentication, certificate
//!   identity = the entry's merchant id, signature, one entry per merchant)
//!   before using any key, and refuses the round otherwise. What a malicious
//!   server **can still do**: drop or exclude agents (leave an entry out of
//!   the roster, relay nothing, close a stage early) — each agent's policy
//!   bounds the degree and threshold it accepts, and a round with too few
//!   survivors aborts without output; show different agents different
//!   subsets of valid entries or different survivor lists (the
//!   `verify_survivors` check is what stops it from collecting both secrets
//!   of one agent); replay nothing useful, since a signature holds for one
//!   task attempt only. What it **cannot** do without the CA's key: make an
//!   agent use keys that its owner did not advertise for this round. The
//!   binding is only as strong as the CA: whoever holds the CA key can
//!   certify a key of its own for any merchant id, so the CA key must not
//!   live on the coordinator's host. Without TLS (the simulator, plaintext
//!   test setups) nothing is bound; agents accept that only when told to
//!   (`privacy.require_key_binding = false`).
//! * **Malicious agents are bounded by the sum's range, not by clipping.**
//!   Clipping runs on the agent, so it binds only honest agents: a malicious
//!   agent may send any residue below the modulus. The server refuses a
//!   decoded sum that `|U3|` agents within the round's bounds cannot produce
//!   ([`SecAggError::SumOutOfRange`]: a value beyond `|U3|`·clip plus ten
//!   standard deviations of any distributed noise, a weight beyond
//!   `|U3|`·max_weight, e.g. a wrapped weight slot), aborting the round. Within
//!   those bounds one malicious agent can still move each summed coordinate by
//!   up to about 2·`|U3|`·clip and the weight by up to `|U3|`·max_weight, and
//!   no one can tell which agent it was; a robust, per-update defence needs
//!   updates in the clear (or zero-knowledge range proofs, not implemented).
//! * **Not covered**: differential privacy of the sum itself (add noise before
//!   aggregation for that).
//!
//! # Stages
//!
//! Each stage has a deadline enforced by the driver; `close_*` closes a stage
//! with whoever answered, so any agent may drop out at any stage.
//!
//! 1. **Advertise keys.** Each agent draws two X25519 key pairs — one whose
//!    agreements key the encryption of shares, one whose agreements seed the
//!    pairwise masks — and sends the public keys ([`AdvertiseKeys`]), signed
//!    with its certificate key over gRPC ([`binding::signed_message`]). The
//!    server sends each agent its [`KeyRoster`]: the ids of the `U1` agents
//!    that answered and the keys of the entries that agent uses (its share
//!    holders, or all with the malicious-server check), each with its
//!    [`binding::KeyBinding`]; each agent verifies those bindings
//!    ([`binding::verify_roster_entries`]) before stage 2.
//!    Everyone derives the k-regular neighbour graph over `U1`
//!    from the public round seed ([`NeighbourGraph`]).
//! 2. **Share keys.** Each agent draws a self-mask seed `b` (32 bytes) and
//!    Shamir-shares `b` and its pairwise-mask secret key t-of-(k + 1) among its
//!    k neighbours and itself; each neighbour's two shares are encrypted with
//!    ChaCha20-Poly1305 under HKDF-SHA256(X25519 agreement, salt = round seed),
//!    nonce and associated data binding round, sender and recipient, and
//!    relayed by the server ([`ShareUpload`] → [`ShareRelay`]); every
//!    ciphertext is exactly [`SHARE_CIPHERTEXT_LEN`] bytes and the server
//!    refuses any other length, so no sender can swell a neighbour's relay
//!    past the message limit. `U2` = agents
//!    whose shares arrived.
//! 3. **Masked input.** Each agent encodes its whole [`Update`](crate::federation::update::Update) (values ‖
//!    coordinate weights ‖ weight ‖ clipped count) in fixed point modulo
//!    2^modulus_bits (an agent may then add integer noise for differential
//!    privacy, [`EncodedInput::add_noise`]) and adds `PRG(b)` and, for each neighbour `v` in `U2`,
//!    `±PRG(s_uv)` (+ if `u < v`, − otherwise), where `s_uv` =
//!    HKDF-SHA256(X25519(u, v), salt = round seed). The PRG is AES-128-CTR
//!    keyed with the seed's first 128 bits (128-bit security; the seeds are
//!    uniformly random). The server adds each masked vector into
//!    one running sum as it arrives. `U3` = agents whose vector arrived.
//! 4. **Unmask.** For every owner in `U2`, the server asks its holders in `U3`
//!    for the self-mask share if the owner is in `U3`, or for the pairwise-key
//!    share if not — never both ([`UnmaskRequest`]). With `t` shares it
//!    recovers each `b` and each dropped agent's key, recomputes the masks and
//!    removes them from the sum. Agents refuse a request that names both
//!    secrets of one owner, or treats them as dropped.
//!
//! (With `verify_survivors`, a consistency stage sits between 3 and 4.)
//! Fewer than `t` answers where they are needed aborts the round with
//! [`SecAggError::TooFewSurvivors`] or [`SecAggError::NotEnoughShares`]; the
//! server checks this before asking for any share, and on abort the masked
//! sum is dropped unread: no partial sum is ever output.
//!
//! The threshold protects a single round only. A driver that unmasks a sum
//! and then refuses it (e.g. for want of its own quorum) and retries over the
//! same inputs with other survivors lets the difference of the two sums
//! reveal individual inputs; the coordinator's drivers therefore never
//! unmask with fewer than max(t, quorum) inputs, and stop the run rather
//! than retry a sum that was revealed but not committed.
//!
//! # Structural invariant
//!
//! The server role never holds an individual update in the clear: it sees
//! only masked vectors, which [`ServerSession::on_masked_input`] borrows and
//! adds into the single [`MaskedSum`] (O(d) memory; no per-agent vector is
//! stored anywhere in the server's state), and the sum leaves only through
//! [`ServerSession::finish`], which consumes the session after removing every
//! mask. Since every survivor's self mask is removed only as part of the total,
//! no single input is ever unmasked.
//!
//! # Parameters ([`SecAggConfig`]) and what each guarantees
//!
//! * `n` — agents invited. The sum is over `U3`, which must have at least `t`
//!   members.
//! * `neighbours` = k — graph degree; k ≥ n − 1 is the complete graph (plain
//!   SecAgg). Each agent's cost is O(k·d) PRG output rather than O(n·d). Bell
//!   et al. show k = O(log n) keeps the sum private when the fraction of
//!   corrupted and dropped agents is bounded; the privacy of an input rests on
//!   its k pairwise masks, so for small n prefer the complete graph. A sparse
//!   graph needs k ≥ [`MIN_NEIGHBOURS`] = 4, checked by the server and every
//!   agent: the server learns each survivor's self mask, so the masked inputs
//!   of a group of survivors closed under the graph's edges add up to that
//!   group's sum — with k = 1 (a perfect matching) each pair's. k + 1 ≤ 255
//!   because shares live in GF(256) (one x-coordinate per holder); an odd k
//!   needs an even number of agents.
//! * `threshold` = t — shares needed to recover a secret, 2 ≤ t ≤ k + 1.
//!   Fewer than t colluding holders learn nothing about a secret; at least t of
//!   an agent's holders must survive to the end. Use t > (k + 1)/2 when the
//!   malicious-server check is wanted.
//! * `clip`, `scale` — values are clipped to [−clip, clip] and encoded as
//!   ⌊x·scale + u⌋, u uniform in [0, 1) (unbiased stochastic rounding), so each
//!   decoded sum is within (number of agents)/scale of the sum of the clipped
//!   values, and exactly equal to the sum of the encodings. Clipped coordinates
//!   are counted, never hidden ([`DecodedSum::clipped_fraction`]).
//! * `max_weight`, `weight_scale` — the same for the example weight and the
//!   per-coordinate weights, which are non-negative.
//! * `modulus_bits` — arithmetic modulo 2^modulus_bits (8..=64). Configuration
//!   is refused ([`SecAggConfig::validate`], bounds computed in u128) when
//!   n × the largest encoded magnitude could wrap the modulus, naming the
//!   parameter to change. Vectors of rings up to 2^32 live in u32 words and
//!   take mask words of 4 keystream bytes, wider rings u64 words and 8 bytes
//!   ([`RingVec`]); on the wire a masked coordinate takes ⌈bits/8⌉ bytes, so
//!   a 32-bit round sends 4 bytes per coordinate and a 64-bit round 8.
//!
//! # Modulus and resolution per task ([`SecAggConfig::for_task`])
//!
//! Every driver builds a round's configuration with
//! [`SecAggConfig::for_task`], so the simulator and the gRPC coordinator
//! agree on ring, graph and resolution:
//!
//! | task | ring | clip | scale (n agents) | wire |
//! |---|---|---|---|---|
//! | `Train`, `Evaluate` | 2^32 | run's `clip` | ⌊2^30 / (n·clip)⌋ | 4 B/coordinate |
//! | same, beyond 16 384 agents (< 2^16 steps per clip) | 2^64 | run's `clip` | ⌊2^62 / (n·clip)⌋ | 8 B |
//! | `Stats` (Σx, Σx² per feature) | 2^64 | [`STATS_CLIP`] = 2^44 | ⌊2^18 / n⌋ | 8 B |
//!
//! The statistics step needs the wide ring: on Telco one merchant's Σx² of
//! TotalCharges is ~1e10 while a one-hot feature's Σx is ~1e2, and no single
//! fixed-point scale in 2^32 carries both (a scale fine enough for the
//! counts overflows on Σx²). In 2^64 each agent's sums are quantised at
//! 1/scale ≈ 3.8e-6·n (unbiased; integer sums exact), a summed coordinate is
//! within n/scale of the plaintext sum (6.1e-5 for 4 agents) and an agreed
//! mean within that over the total row count (1.1e-8 for Telco's 5 634
//! training rows) — below the f32 rounding of the plaintext path. The
//! statistics round is one vector of 2 × features, so the doubled width
//! costs nothing that matters; training rounds keep 4 bytes per coordinate.
//! Graph: complete up to [`COMPLETE_GRAPH_UP_TO`] agents, SecAgg+ degree
//! 2·⌈log2 n⌉ above, unless the run sets `neighbours`.

use thiserror::Error;

pub mod binding;
mod client;
mod config;
mod crypto;
mod driver;
mod encode;
mod graph;
mod invite;
mod ring;
mod server;
mod wire;

/// The start of the failure reason an agent reports when a neighbour's
/// share bundle fails authentication; the sender's agent number follows.
pub const FORGED_SHARES: &str = "shares failed authentication from agent ";

pub use client::ClientSession;
pub use config::{
    COMPLETE_GRAPH_UP_TO, MAX_HOLDERS, MIN_NEIGHBOURS, MIN_STEPS_PER_CLIP, STATS_CLIP, SecAggConfig,
};
pub use crypto::SHARE_CIPHERTEXT_LEN;
pub use driver::{
    Dropouts, EncodedHook, InMemoryOutcome, InMemoryRound, StageTimes, Traffic, round_seed,
    rounding_rng, run_in_memory, run_in_memory_with, task_round_seed,
};
pub use encode::{
    CLIPPED_WARNING, DecodedSum, Draws, EncodedInput, RoundingDraws, clipping_warning, encode,
};
pub use graph::NeighbourGraph;
pub use invite::{RoundInvite, stage_name};
pub use ring::{RingVec, bytes_per_element};
pub use server::{AfterMasked, MaskedSum, SecAggOutput, ServerSession};
pub use wire::{
    AdvertiseKeys, EncryptedShare, KeyRoster, ShareRelay, ShareUpload, SurvivorCheck,
    SurvivorSignature, UnmaskRequest, UnmaskResponse, masked_from_bytes, masked_to_bytes,
};

/// A protocol stage, as reported in errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Stage 1: public keys.
    Advertise,
    /// Stage 2: encrypted shares.
    ShareKeys,
    /// Stage 3: masked inputs.
    MaskedInput,
    /// Optional: survivor-list signatures.
    Consistency,
    /// Stage 4: share reveal.
    Unmask,
    /// The round ended.
    Done,
    /// The round was aborted.
    Aborted,
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

/// Why a secure-aggregation step failed or the round aborted.
#[derive(Debug, Error, PartialEq)]
pub enum SecAggError {
    /// A configuration parameter is unusable; the message says how to fix it.
    #[error("secure aggregation parameter `{parameter}`: {message}")]
    Config {
        /// The parameter to change.
        parameter: &'static str,
        /// What is wrong and what to do.
        message: String,
    },
    /// Bytes or a message that do not decode or make sense.
    #[error("malformed {what}: {detail}")]
    Malformed {
        /// The message or field.
        what: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// A vector of the wrong length.
    #[error("{what} has {got} coordinates, expected {expected}")]
    WrongLength {
        /// Which vector.
        what: &'static str,
        /// Expected length.
        expected: usize,
        /// Length received.
        got: usize,
    },
    /// A NaN, infinite or negative-weight input coordinate.
    #[error(
        "input coordinate {index} is {value}: values must be finite and weights finite and >= 0"
    )]
    NotFinite {
        /// Position in the encoded vector.
        index: usize,
        /// The bad value.
        value: f64,
    },
    /// A message arrived in the wrong stage (for example after its deadline).
    #[error("message for stage {expected} arrived in stage {actual}")]
    WrongStage {
        /// Stage the message belongs to.
        expected: Stage,
        /// Stage the session is in.
        actual: Stage,
    },
    /// A message from an agent not (or no longer) in the round.
    #[error("agent {agent} is not part of stage {stage}")]
    UnknownAgent {
        /// The stage.
        stage: Stage,
        /// The agent.
        agent: u32,
    },
    /// A second message from the same agent in one stage.
    #[error("agent {agent} answered stage {stage} twice")]
    Duplicate {
        /// The stage.
        stage: Stage,
        /// The agent.
        agent: u32,
    },
    /// The round aborted: too few agents answered a stage.
    #[error(
        "round aborted at stage {stage}: {have} agents answered, the threshold is {need}; nothing was revealed"
    )]
    TooFewSurvivors {
        /// The stage that closed short.
        stage: Stage,
        /// Agents that answered.
        have: usize,
        /// The threshold t.
        need: usize,
    },
    /// The round aborted: an agent's secret cannot be recovered.
    #[error(
        "round aborted: agent {agent} has {have} share holders left, {need} needed; nothing was revealed"
    )]
    NotEnoughShares {
        /// Owner of the secret.
        agent: u32,
        /// Shares (or holders) available.
        have: usize,
        /// The threshold t.
        need: usize,
    },
    /// A share ciphertext failed authentication.
    #[error("share bundle from {from} to {to} failed authentication")]
    BadCiphertext {
        /// Sender.
        from: u32,
        /// Recipient.
        to: u32,
    },
    /// A public key of low order (its agreement would not be secret).
    #[error("agent {agent} advertised a low-order public key")]
    BadPublicKey {
        /// The agent.
        agent: u32,
    },
    /// The shares revealed for a dropped agent's key rebuild no key that
    /// matches the one it advertised, even without any one of them. The
    /// owner is not at fault: its shares were dealt before it dropped and
    /// the holders revealed them (it said "agent N sent bad shares").
    #[error(
        "the shares revealed for dropped agent {agent}'s pairwise key rebuild another key than \
         the one it advertised, even without any one of them: two or more of its share holders \
         revealed wrong shares, or too few shares were revealed to tell which was wrong"
    )]
    KeyMismatch {
        /// The dropped agent whose key was rebuilt.
        agent: u32,
    },
    /// The shares revealed for a secret lie on no common polynomial once
    /// any one of them is left out.
    #[error(
        "the shares revealed for agent {agent}'s secret disagree in more than one place: two or \
         more of its share holders revealed wrong shares"
    )]
    InconsistentShares {
        /// The owner of the secret.
        agent: u32,
    },
    /// Too few valid survivor-list signatures.
    #[error("{valid} valid survivor-list signatures, {need} needed; refusing to reveal shares")]
    BadSignatures {
        /// Valid signatures seen.
        valid: usize,
        /// The threshold t.
        need: usize,
    },
    /// The unmasked sum holds a coordinate that no `count` agents following
    /// the protocol could have produced: some agent sent an out-of-range
    /// input (a wrapped weight, a residue beyond its clip). The round's sum
    /// is refused whole.
    #[error(
        "round refused: the decoded sum's {what} coordinate {index} is {value}, beyond the \
         {bound} that {count} agents within the round's clip and max_weight can reach; an agent \
         sent an out-of-range masked input (or revealed wrong self-mask shares that the other \
         holders' shares could not expose)"
    )]
    SumOutOfRange {
        /// Which part of the vector: `value`, `coordinate weight`, `weight`
        /// or `clipped count`.
        what: &'static str,
        /// Position in the encoded vector.
        index: usize,
        /// The decoded value.
        value: f64,
        /// The largest magnitude honest agents can reach.
        bound: f64,
        /// Agents whose inputs are in the sum.
        count: usize,
    },
    /// An agent refused a request that would break the protocol's guarantees.
    #[error("refused: {0}")]
    Refused(String),
}

impl SecAggError {
    /// When the error came after the masks were removed, the number of
    /// agents whose inputs the raw sum holds: whoever ran the server has
    /// seen that sum, so a refused one must never be computed again over
    /// the same inputs (the difference of two such sums would be one
    /// agent's input). `None` for every error that leaves the sum unread.
    pub fn revealed_sum_of(&self) -> Option<usize> {
        match self {
            Self::SumOutOfRange { count, .. } => Some(*count),
            _ => None,
        }
    }
}
