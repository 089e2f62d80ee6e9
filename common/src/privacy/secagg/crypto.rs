//! The cryptographic building blocks of secure aggregation, each a thin call
//! into an audited crate: X25519 agreement (AWS-LC through `aws-lc-rs`),
//! the Edwards form of Curve25519 (`curve25519-dalek`), HKDF-SHA256
//! (`hkdf`), ChaCha20-Poly1305 (`chacha20poly1305`), AES-128-CTR as the mask
//! PRG (`aes` + `ctr`), Shamir sharing over GF(256) (`blahaj`) and Ed25519
//! (`ed25519-dalek`). Nothing here implements a primitive by hand.

use aes::Aes128;
use blahaj::{Share, Sharks};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Nonce};
use ctr::Ctr64BE;
use ctr::cipher::{KeyIvInit, StreamCipher};
use curve25519_dalek::montgomery::MontgomeryPoint;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use hkdf::Hkdf;
use rand::CryptoRng;
use rayon::prelude::*;
use sha2::Sha256;
use zeroize::Zeroizing;

use super::SecAggError;
use super::ring::{RingVec, Word, Words, with_words};

/// Domain-separation prefix of every key derivation, AAD and signed message,
/// so that nothing produced here can be replayed in another protocol.
pub(crate) const LABEL: &[u8] = b"fedcart-secagg/v1";

/// Keystream bytes per work unit of the mask PRG: 64 KiB (16 Ki u32 or
/// 8 Ki u64 coordinates), small enough to stay in L2 while every mask of the
/// round is added into it, large enough that the AES key schedule per unit is
/// noise.
const CHUNK_BYTES: usize = 64 * 1024;

/// Length in bytes of one Shamir share of a 32-byte secret (x, then 32 y).
pub(crate) const SHARE_LEN: usize = 33;

/// Plaintext of one share bundle: sender and recipient ids (4 bytes each),
/// then the pairwise-key share and the self-mask share.
pub(crate) const BUNDLE_LEN: usize = 8 + 2 * SHARE_LEN;

/// The one length of a share-bundle ciphertext: the bundle plus the 16-byte
/// Poly1305 tag. The server refuses any other length before relaying, so a
/// sender cannot inflate a neighbour's relay past the message limit.
pub const SHARE_CIPHERTEXT_LEN: usize = BUNDLE_LEN + 16;

/// Whether a mask is added to or subtracted from a vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sign {
    /// Add the PRG output (modulo the word).
    Plus,
    /// Subtract the PRG output (modulo the word).
    Minus,
}

/// One mask: the PRG seed and whether its output is added or subtracted.
pub(crate) type Mask = ([u8; 32], Sign);

/// HKDF-SHA256 with `salt`, expanded to 32 bytes under `LABEL ‖ info`.
pub(crate) fn hkdf32(salt: &[u8], ikm: &[u8], info: &[u8]) -> [u8; 32] {
    let hk = Hkdf::<Sha256>::new(Some(salt), ikm);
    let mut out = [0u8; 32];
    hk.expand_multi_info(&[LABEL, info], &mut out)
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    out
}

/// An X25519 secret key: 32 random bytes, clamped by the X25519 function
/// itself (RFC 7748), kept so that the mask key can be Shamir-shared for
/// dropout recovery. Agreement and public key are AWS-LC's (`aws-lc-rs`;
/// its X25519 is s2n-bignum's formally verified code), which gives the bytes
/// of x25519-dalek (checked against it in `crypto_vectors`) in less than
/// half its time on x86-64.
pub(crate) struct SecretKey {
    bytes: Zeroizing<[u8; 32]>,
    key: aws_lc_rs::agreement::PrivateKey,
}

impl SecretKey {
    /// The key whose bytes are `bytes` (any 32 bytes are a key).
    pub(crate) fn from_bytes(bytes: [u8; 32]) -> Self {
        let key = aws_lc_rs::agreement::PrivateKey::from_private_key(
            &aws_lc_rs::agreement::X25519,
            &bytes,
        )
        .expect("AWS-LC takes any 32 bytes as an X25519 private key");
        Self {
            bytes: Zeroizing::new(bytes),
            key,
        }
    }

    /// A key of 32 bytes drawn from `rng` (one `fill_bytes`, as x25519-dalek
    /// draws it, so a seeded round keeps its keys).
    pub(crate) fn random_from_rng<R: CryptoRng + ?Sized>(rng: &mut R) -> Self {
        let mut bytes = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(bytes.as_mut());
        Self::from_bytes(*bytes)
    }

    /// The secret's bytes, for sharing.
    pub(crate) fn to_bytes(&self) -> Zeroizing<[u8; 32]> {
        self.bytes.clone()
    }

    /// The public key X25519(secret, 9).
    pub(crate) fn public_key(&self) -> [u8; 32] {
        let public = self
            .key
            .compute_public_key()
            .expect("an X25519 public key is always computable");
        let mut out = [0u8; 32];
        out.copy_from_slice(public.as_ref());
        out
    }

    /// X25519(secret, theirs), or `None` when it is all zero (`theirs` is of
    /// low order: the "shared" secret would be known to everyone). AWS-LC
    /// refuses exactly that output; any 32 bytes parse as a u-coordinate.
    pub(crate) fn diffie_hellman(&self, theirs: &[u8; 32]) -> Option<Zeroizing<[u8; 32]>> {
        let peer =
            aws_lc_rs::agreement::UnparsedPublicKey::new(&aws_lc_rs::agreement::X25519, theirs);
        aws_lc_rs::agreement::agree(&self.key, peer, (), |shared| {
            let mut out = Zeroizing::new([0u8; 32]);
            out.copy_from_slice(shared);
            Ok(out)
        })
        .ok()
    }
}

/// X25519 agreement followed by HKDF, refusing low-order public keys (an
/// all-zero shared secret would give every party the same "secret" key).
pub(crate) fn agree(
    mine: &SecretKey,
    theirs: &[u8; 32],
    round_seed: &[u8; 32],
    info: &[u8],
    peer: u32,
) -> Result<Zeroizing<[u8; 32]>, SecAggError> {
    let shared = mine
        .diffie_hellman(theirs)
        .ok_or(SecAggError::BadPublicKey { agent: peer })?;
    Ok(Zeroizing::new(hkdf32(round_seed, shared.as_ref(), info)))
}

/// X25519 agreements computed once per pair of public keys, for a driver
/// that plays every party of a round in one process (the in-memory driver):
/// X25519(a, B) and X25519(b, A) are the same bytes, so the second party of
/// a pair reads what the first computed instead of repeating the scalar
/// multiplication. Never used across processes: a real agent agrees alone.
#[derive(Default)]
pub(crate) struct SharedAgreements {
    /// Raw shared secrets by the ordered pair of public keys.
    agreed: std::sync::Mutex<std::collections::HashMap<KeyPair, Zeroizing<[u8; 32]>>>,
}

/// Two X25519 public keys, the smaller first.
type KeyPair = ([u8; 32], [u8; 32]);

impl SharedAgreements {
    /// As [`agree`] for the holder of `mine`, whose public key is `my_public`,
    /// reusing the pair's shared secret if its other end already computed it.
    pub(crate) fn agree(
        &self,
        mine: &SecretKey,
        my_public: &[u8; 32],
        theirs: &[u8; 32],
        round_seed: &[u8; 32],
        info: &[u8],
        peer: u32,
    ) -> Result<Zeroizing<[u8; 32]>, SecAggError> {
        let pair = if my_public <= theirs {
            (*my_public, *theirs)
        } else {
            (*theirs, *my_public)
        };
        let known = self
            .agreed
            .lock()
            .expect("agreement cache lock")
            .get(&pair)
            .cloned();
        let shared = match known {
            Some(shared) => shared,
            None => {
                let bytes = mine
                    .diffie_hellman(theirs)
                    .ok_or(SecAggError::BadPublicKey { agent: peer })?;
                self.agreed
                    .lock()
                    .expect("agreement cache lock")
                    .insert(pair, bytes.clone());
                bytes
            }
        };
        Ok(Zeroizing::new(hkdf32(round_seed, shared.as_ref(), info)))
    }
}

/// Whether an advertised X25519 public key is of low order (agreement with it
/// gives the all-zero secret whatever the other key). The server refuses such
/// keys at advertise time, so one bad agent cannot make every neighbour fail.
///
/// A key on the curve is checked in Edwards form (`to_edwards`, then
/// `is_small_order`: three doublings), about a fifth of an X25519 ladder;
/// it is the same answer, since a clamped scalar is a multiple of 8 below the
/// group order ℓ, so its product with a point is the identity exactly when
/// the point's order divides 8. A key on the twist (honest agents never send
/// one, `to_edwards` returns `None` for it) takes the probe agreement itself.
pub(crate) fn is_low_order(public: &[u8; 32]) -> bool {
    match MontgomeryPoint(*public).to_edwards(0) {
        Some(point) => point.is_small_order(),
        None => probe_is_low_order(public),
    }
}

/// The definition [`is_low_order`] shortcuts: agreement with a fixed secret
/// is all zero.
fn probe_is_low_order(public: &[u8; 32]) -> bool {
    SecretKey::from_bytes([0x5a; 32])
        .diffie_hellman(public)
        .is_none()
}

/// Nonce and associated data binding a share ciphertext to its round and to
/// its direction: both directions of a pair share one agreed key, so the
/// nonce carries (from, to) and never repeats under that key.
fn nonce_and_aad(round_seed: &[u8; 32], from: u32, to: u32) -> (Nonce, Vec<u8>) {
    let mut nonce = [0u8; 12];
    nonce[..4].copy_from_slice(&from.to_le_bytes());
    nonce[4..8].copy_from_slice(&to.to_le_bytes());
    let mut aad = Vec::with_capacity(LABEL.len() + 40);
    aad.extend_from_slice(LABEL);
    aad.extend_from_slice(round_seed);
    aad.extend_from_slice(&from.to_le_bytes());
    aad.extend_from_slice(&to.to_le_bytes());
    (Nonce::from(nonce), aad)
}

/// Encrypts a share bundle from `from` to `to` under their agreed key.
pub(crate) fn seal(
    key: &[u8; 32],
    round_seed: &[u8; 32],
    from: u32,
    to: u32,
    plaintext: &[u8],
) -> Vec<u8> {
    let cipher = ChaCha20Poly1305::new(&(*key).into());
    let (nonce, aad) = nonce_and_aad(round_seed, from, to);
    cipher
        .encrypt(
            &nonce,
            Payload {
                msg: plaintext,
                aad: &aad,
            },
        )
        .expect("ChaCha20-Poly1305 accepts messages far longer than a share bundle")
}

/// Decrypts and authenticates a share bundle; any tampering, wrong key or
/// wrong direction gives [`SecAggError::BadCiphertext`].
pub(crate) fn open(
    key: &[u8; 32],
    round_seed: &[u8; 32],
    from: u32,
    to: u32,
    ciphertext: &[u8],
) -> Result<Zeroizing<Vec<u8>>, SecAggError> {
    let cipher = ChaCha20Poly1305::new(&(*key).into());
    let (nonce, aad) = nonce_and_aad(round_seed, from, to);
    cipher
        .decrypt(
            &nonce,
            Payload {
                msg: ciphertext,
                aad: &aad,
            },
        )
        .map(Zeroizing::new)
        .map_err(|_| SecAggError::BadCiphertext { from, to })
}

/// Splits a 32-byte secret into `holders` Shamir shares, any `threshold` of
/// which recover it. Share `i` (0-based) has x-coordinate `i + 1`.
pub(crate) fn split<R: rand::CryptoRng>(
    secret: &[u8; 32],
    threshold: usize,
    holders: usize,
    rng: &mut R,
) -> Vec<Zeroizing<Vec<u8>>> {
    debug_assert!(threshold >= 1 && threshold <= holders && holders <= 255);
    Sharks(threshold as u8)
        .dealer_rng(secret, rng)
        .take(holders)
        .map(|s| Zeroizing::new(Vec::from(&s)))
        .collect()
}

/// Recovers a 32-byte secret from at least `threshold` shares with distinct,
/// non-zero x-coordinates; duplicates are dropped before interpolation.
pub(crate) fn recover(
    threshold: usize,
    shares: &[Zeroizing<Vec<u8>>],
    owner: u32,
) -> Result<Zeroizing<[u8; 32]>, SecAggError> {
    recover_from(threshold, shares.iter().map(|s| s.as_slice()), owner)
}

/// [`recover`] from borrowed shares, taken in order.
pub(crate) fn recover_from<'a>(
    threshold: usize,
    shares: impl IntoIterator<Item = &'a [u8]>,
    owner: u32,
) -> Result<Zeroizing<[u8; 32]>, SecAggError> {
    let mut seen = [false; 256];
    let mut picked: Vec<Share> = Vec::with_capacity(threshold);
    for bytes in shares {
        if bytes.len() != SHARE_LEN || bytes[0] == 0 || seen[bytes[0] as usize] {
            continue;
        }
        seen[bytes[0] as usize] = true;
        picked.push(Share::try_from(bytes).map_err(|e| SecAggError::Malformed {
            what: "share",
            detail: e.to_string(),
        })?);
        if picked.len() == threshold {
            break;
        }
    }
    if picked.len() < threshold {
        return Err(SecAggError::NotEnoughShares {
            agent: owner,
            have: picked.len(),
            need: threshold,
        });
    }
    let secret = Sharks(threshold as u8)
        .recover(&picked)
        .map_err(|e| SecAggError::Malformed {
            what: "share set",
            detail: e.to_string(),
        })?;
    let mut out = Zeroizing::new([0u8; 32]);
    out.copy_from_slice(&secret);
    Ok(out)
}

/// The mask PRG: AES-128-CTR keyed with the first 16 bytes of the 32-byte
/// seed (128-bit security: a seed is uniformly random — a self-mask seed from
/// the agent's CSPRNG, a pairwise seed from HKDF — so any 16 of its bytes
/// are a uniformly random AES-128 key), the 16-byte counter block being
/// `first_block` big-endian (a zero upper half for every vector we mask: the
/// 64-bit block counter covers 2^68 bytes). Element `i` of a mask is the
/// little-endian word (u32 for rings of at most 32 bits, u64 above) at bytes
/// `w·i..w·(i+1)` of the keystream, so any range can be generated
/// independently of the others. AES-128 rather than AES-256: 10 rounds
/// instead of 14 for the same 128-bit PRG security, ≈ 1.4x the keystream per
/// core (`examples/prg_bench.rs`, BENCHMARKS.md). `Ctr64BE` gives the same
/// keystream as a 128-bit counter while the low half does not wrap, and runs
/// ~1.4x faster than `Ctr128BE` here. (Its speed depends on the cipher's
/// block helpers being inlined, which is why fedcart-common builds as one
/// codegen unit in release: see the workspace `Cargo.toml`.)
pub(crate) fn keystream(seed: &[u8; 32], first_block: u128, out: &mut [u8]) {
    let key: &[u8; 16] = seed[..16].try_into().expect("a 32-byte seed has 16 bytes");
    let mut cipher = Ctr64BE::<Aes128>::new(key.into(), &first_block.to_be_bytes().into());
    cipher.write_keystream(out);
}

/// Adds (or subtracts) the PRG outputs of every `(seed, sign)` into `target`
/// modulo 2^bits (the caller reduces the result). Work is split by
/// coordinate range across rayon threads, and within a range every mask is
/// streamed through one cache-resident buffer.
pub(crate) fn apply_masks(target: &mut RingVec, masks: &[Mask]) {
    with_words!(&mut target.words, v => apply_masks_words(v, masks));
    target.reduce();
}

fn apply_masks_words<W: Word>(target: &mut [W], masks: &[Mask]) {
    if masks.is_empty() {
        return;
    }
    let chunk_len = CHUNK_BYTES / W::BYTES;
    target.par_chunks_mut(chunk_len).enumerate().for_each_init(
        || vec![0u8; CHUNK_BYTES],
        |buf, (ci, chunk)| {
            let bytes = &mut buf[..chunk.len() * W::BYTES];
            let first_block = (ci * CHUNK_BYTES / 16) as u128;
            for (seed, sign) in masks {
                keystream(seed, first_block, bytes);
                mask_chunk(chunk, bytes, *sign);
            }
        },
    );
}

/// Keystream bytes per work unit of [`apply_masks_shared`]: 16 KiB, so that
/// a 100k-coordinate vector still splits into enough units for every core
/// (one AES key schedule per unit and seed is still under 1 % of its cost).
const SHARED_CHUNK_BYTES: usize = 16 * 1024;

/// As [`apply_masks`] on each of `targets` with its own `masks[i]`, for a
/// driver that plays several agents in one process: a seed that masks more
/// than one of them — the two ends of a pair, with opposite signs — is
/// expanded once per coordinate range and added to (or subtracted from)
/// each. Every target ends with exactly the words [`apply_masks`] gives it
/// (the additions commute modulo 2^bits), at half the keystream when every
/// pair is in the batch. Targets must share one length and word type;
/// any that do not are masked alone.
pub(crate) fn apply_masks_shared(mut targets: Vec<&mut RingVec>, masks: &[&[Mask]]) {
    assert_eq!(targets.len(), masks.len(), "one mask list per target");
    let len = targets.first().map_or(0, |t| t.len());
    let mut u32s: Vec<(&mut [u32], &[Mask])> = Vec::new();
    let mut u64s: Vec<(&mut [u64], &[Mask])> = Vec::new();
    for (target, masks) in targets.iter_mut().zip(masks) {
        if target.len() != len {
            apply_masks(target, masks);
            continue;
        }
        match &mut target.words {
            Words::U32(v) => u32s.push((v, masks)),
            Words::U64(v) => u64s.push((v, masks)),
        }
    }
    apply_masks_shared_words(u32s, len);
    apply_masks_shared_words(u64s, len);
    targets.iter_mut().for_each(|t| t.reduce());
}

/// A seed and the targets it masks, each with its sign.
type SeedUses = ([u8; 32], Vec<(usize, Sign)>);

fn apply_masks_shared_words<W: Word>(targets: Vec<(&mut [W], &[Mask])>, len: usize) {
    if targets.is_empty() {
        return;
    }
    // Each distinct seed with the targets (and signs) it masks, in order of
    // first use.
    let mut index: std::collections::HashMap<[u8; 32], usize> = Default::default();
    let mut uses: Vec<SeedUses> = Vec::new();
    for (t, (_, masks)) in targets.iter().enumerate() {
        for (seed, sign) in masks.iter() {
            let at = *index.entry(*seed).or_insert_with(|| {
                uses.push((*seed, Vec::new()));
                uses.len() - 1
            });
            uses[at].1.push((t, *sign));
        }
    }
    // Coordinate range `ci` of every target, for one worker to own.
    let chunk_len = SHARED_CHUNK_BYTES / W::BYTES;
    let mut ranges: Vec<Vec<&mut [W]>> = (0..len.div_ceil(chunk_len))
        .map(|_| Vec::with_capacity(targets.len()))
        .collect();
    for (target, _) in targets {
        for (ci, chunk) in target.chunks_mut(chunk_len).enumerate() {
            ranges[ci].push(chunk);
        }
    }
    ranges.into_par_iter().enumerate().for_each_init(
        || vec![0u8; SHARED_CHUNK_BYTES],
        |buf, (ci, mut chunks)| {
            let words = chunks.first().map_or(0, |c| c.len());
            let bytes = &mut buf[..words * W::BYTES];
            let first_block = (ci * SHARED_CHUNK_BYTES / 16) as u128;
            for (seed, users) in &uses {
                keystream(seed, first_block, bytes);
                for &(t, sign) in users {
                    mask_chunk(chunks[t], bytes, sign);
                }
            }
        },
    );
}

/// Adds or subtracts one keystream chunk, read as little-endian words.
#[inline(always)]
fn mask_chunk<W: Word>(chunk: &mut [W], bytes: &[u8], sign: Sign) {
    let words = bytes.chunks_exact(W::BYTES);
    match sign {
        Sign::Plus => chunk
            .iter_mut()
            .zip(words)
            .for_each(|(t, m)| *t = t.wadd(W::load_full(m))),
        Sign::Minus => chunk
            .iter_mut()
            .zip(words)
            .for_each(|(t, m)| *t = t.wsub(W::load_full(m))),
    }
}

/// The message a client signs in the survivor-consistency check: the round
/// and the sorted list of agents whose masked inputs the server accepted.
pub(crate) fn survivor_message(round_seed: &[u8; 32], survivors: &[u32]) -> Vec<u8> {
    let mut m = Vec::with_capacity(LABEL.len() + 48 + 4 * survivors.len());
    m.extend_from_slice(LABEL);
    m.extend_from_slice(b"/survivors");
    m.extend_from_slice(round_seed);
    m.extend_from_slice(&(survivors.len() as u32).to_le_bytes());
    for s in survivors {
        m.extend_from_slice(&s.to_le_bytes());
    }
    m
}

/// Signs the survivor list.
pub(crate) fn sign(key: &SigningKey, message: &[u8]) -> [u8; 64] {
    key.sign(message).to_bytes()
}

/// Verifies a survivor-list signature against an advertised Ed25519 key.
pub(crate) fn verify(public: &[u8; 32], message: &[u8], signature: &[u8; 64]) -> bool {
    match VerifyingKey::from_bytes(public) {
        Ok(vk) => vk
            .verify(message, &Signature::from_bytes(signature))
            .is_ok(),
        Err(_) => false,
    }
}

#[cfg(test)]
#[path = "crypto_vectors.rs"]
mod vectors;
