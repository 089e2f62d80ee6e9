//! The protocol messages and their byte encoding.
//!
//! The server receives these bytes from the network, so decoding is
//! bounds-checked everywhere and returns [`SecAggError::Malformed`] on any
//! truncated, oversized or trailing input; it never panics and never
//! allocates more than the input length justifies. Format: a one-byte message
//! tag, a one-byte version, then little-endian fields; variable-length fields
//! carry a u32 length prefix.

use super::ring::{RingVec, packed_in_range};
use super::{SecAggConfig, SecAggError};

mod codec;
use codec::{Reader, Writer};

/// Stage 1, agent → server: the agent's public keys for this round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdvertiseKeys {
    /// The agent.
    pub id: u32,
    /// X25519 public key used to encrypt the shares sent to this agent.
    pub enc_pk: [u8; 32],
    /// X25519 public key whose agreements seed the pairwise masks.
    pub mask_pk: [u8; 32],
    /// Ed25519 verifying key for the survivor-list signature (only when the
    /// malicious-server check is on).
    pub sig_pk: Option<[u8; 32]>,
}

/// Stage 1 result, server → one agent: who is in the round, and the keys
/// that agent uses.
///
/// Every agent needs the whole id set (the neighbour graph is built over it)
/// but only the keys of its share holders (its neighbours and itself), or of
/// every entry when survivor lists are signed (any survivor's signature key
/// may check the list). Sending each agent just those makes the share-keys
/// stage O(n·k) bytes instead of O(n²): on the wire the ids are a bitmap
/// (n/8 bytes) and the keys k + 1 entries of 69 bytes. An agent refuses a
/// roster that lacks a key it needs or carries keys of an agent it does not
/// list ([`ClientSession::share_keys`](super::ClientSession::share_keys));
/// entries it does not use are ignored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRoster {
    /// Every agent that advertised in time, sorted by id, no duplicates.
    pub ids: Vec<u32>,
    /// Keys of some of those agents (see above), sorted by id.
    pub keys: Vec<AdvertiseKeys>,
}

/// Writes sorted, distinct ids as a bitmap: a u32 byte count, then bit
/// `id % 8` of byte `id / 8` set for each id. The last byte is never zero,
/// so the encoding is canonical.
fn write_id_set(w: &mut Writer, ids: &[u32]) {
    let len = ids.last().map_or(0, |&m| m as usize / 8 + 1);
    let mut bitmap = vec![0u8; len];
    for &id in ids {
        bitmap[id as usize / 8] |= 1 << (id % 8);
    }
    w.bytes(&bitmap);
}

/// Reads the bitmap of [`write_id_set`] (at most 8 ids per input byte).
fn read_id_set(r: &mut Reader) -> Result<Vec<u32>, SecAggError> {
    let n = r.u32()? as usize;
    let bitmap = r.take(n)?;
    if bitmap.last() == Some(&0) {
        return Err(r.err("id bitmap ends in a zero byte".into()));
    }
    if n > (u32::MAX as usize).div_ceil(8) {
        return Err(r.err(format!("id bitmap of {n} bytes names ids beyond u32")));
    }
    let mut ids = Vec::with_capacity(bitmap.iter().map(|b| b.count_ones() as usize).sum());
    for (i, &byte) in bitmap.iter().enumerate() {
        for bit in 0..8 {
            if byte & (1 << bit) != 0 {
                ids.push((i * 8 + bit) as u32);
            }
        }
    }
    Ok(ids)
}

/// One encrypted share bundle (shares of the pairwise-mask secret key and of
/// the self-mask seed), from one agent to one neighbour, relayed by the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncryptedShare {
    /// Sender (owner of the shared secrets).
    pub from: u32,
    /// Recipient (holder of the shares).
    pub to: u32,
    /// ChaCha20-Poly1305 ciphertext bound to (round, from, to).
    pub ciphertext: Vec<u8>,
}

/// Stage 2, agent → server: one bundle per neighbour.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareUpload {
    /// The sending agent.
    pub from: u32,
    /// One bundle per neighbour.
    pub shares: Vec<EncryptedShare>,
}

/// Stage 2 result, server → one agent: the bundles addressed to it by
/// neighbours that completed stage 2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareRelay {
    /// The recipient.
    pub to: u32,
    /// Bundles addressed to `to`.
    pub shares: Vec<EncryptedShare>,
}

/// Optional stage, server → every survivor: the survivor list to sign.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SurvivorCheck {
    /// Sorted ids of the agents whose masked inputs are in the sum.
    pub survivors: Vec<u32>,
}

/// Optional stage, agent → server: Ed25519 signature of the survivor list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SurvivorSignature {
    /// The signer.
    pub from: u32,
    /// Signature over the round seed and the sorted survivor list.
    pub signature: [u8; 64],
}

/// Stage 4, server → one survivor: which share to reveal for which agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnmaskRequest {
    /// The agent asked.
    pub to: u32,
    /// Agents whose self-mask seed share is asked for (survivors).
    pub self_mask_of: Vec<u32>,
    /// Agents whose pairwise-mask key share is asked for (dropped agents).
    pub pairwise_of: Vec<u32>,
    /// Signed survivor list (empty unless the malicious-server check is on).
    pub survivors: Vec<u32>,
    /// Signatures over `survivors`.
    pub signatures: Vec<SurvivorSignature>,
}

/// Stage 4, agent → server: the shares it agreed to reveal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnmaskResponse {
    /// The answering agent.
    pub from: u32,
    /// (owner, share of the owner's self-mask seed).
    pub self_mask_shares: Vec<(u32, Vec<u8>)>,
    /// (owner, share of the owner's pairwise-mask secret key).
    pub pairwise_shares: Vec<(u32, Vec<u8>)>,
}

fn write_keys(w: &mut Writer, k: &AdvertiseKeys) {
    w.u32(k.id);
    w.raw(&k.enc_pk);
    w.raw(&k.mask_pk);
    match &k.sig_pk {
        Some(s) => {
            w.raw(&[1]);
            w.raw(s);
        }
        None => w.raw(&[0]),
    }
}

fn read_keys(r: &mut Reader) -> Result<AdvertiseKeys, SecAggError> {
    let id = r.u32()?;
    let enc_pk = r.arr()?;
    let mask_pk = r.arr()?;
    let sig_pk = match r.u8()? {
        0 => None,
        1 => Some(r.arr()?),
        f => return Err(r.err(format!("signature-key flag {f}"))),
    };
    Ok(AdvertiseKeys {
        id,
        enc_pk,
        mask_pk,
        sig_pk,
    })
}

fn write_shares(w: &mut Writer, shares: &[EncryptedShare]) {
    w.u32(shares.len() as u32);
    for s in shares {
        w.u32(s.from);
        w.u32(s.to);
        w.bytes(&s.ciphertext);
    }
}

fn read_shares(r: &mut Reader) -> Result<Vec<EncryptedShare>, SecAggError> {
    let n = r.count(12)?;
    (0..n)
        .map(|_| {
            Ok(EncryptedShare {
                from: r.u32()?,
                to: r.u32()?,
                ciphertext: r.bytes()?,
            })
        })
        .collect()
}

fn write_owned(w: &mut Writer, shares: &[(u32, Vec<u8>)]) {
    w.u32(shares.len() as u32);
    for (owner, s) in shares {
        w.u32(*owner);
        w.bytes(s);
    }
}

fn read_owned(r: &mut Reader) -> Result<Vec<(u32, Vec<u8>)>, SecAggError> {
    let n = r.count(8)?;
    (0..n).map(|_| Ok((r.u32()?, r.bytes()?))).collect()
}

macro_rules! wire {
    ($ty:ty, $tag:expr, $name:expr, |$s:ident, $w:ident| $enc:block, |$r:ident| $dec:block) => {
        impl $ty {
            /// Encodes the message to bytes.
            pub fn to_bytes(&self) -> Vec<u8> {
                let $s = self;
                let mut $w = Writer::new($tag);
                $enc
                $w.0
            }

            /// Decodes a message; malformed input gives an error, never a panic.
            pub fn from_bytes(bytes: &[u8]) -> Result<Self, SecAggError> {
                let mut $r = Reader::new(bytes, $tag, $name)?;
                let value = $dec;
                $r.finish(value)
            }
        }
    };
}

wire!(
    AdvertiseKeys,
    1,
    "AdvertiseKeys",
    |s, w| {
        write_keys(&mut w, s);
    },
    |r| { read_keys(&mut r)? }
);
wire!(
    KeyRoster,
    2,
    "KeyRoster",
    |s, w| {
        write_id_set(&mut w, &s.ids);
        w.u32(s.keys.len() as u32);
        s.keys.iter().for_each(|k| write_keys(&mut w, k));
    },
    |r| {
        let ids = read_id_set(&mut r)?;
        let n = r.count(69)?;
        KeyRoster {
            ids,
            keys: (0..n)
                .map(|_| read_keys(&mut r))
                .collect::<Result<_, _>>()?,
        }
    }
);
wire!(
    ShareUpload,
    3,
    "ShareUpload",
    |s, w| {
        w.u32(s.from);
        write_shares(&mut w, &s.shares);
    },
    |r| {
        ShareUpload {
            from: r.u32()?,
            shares: read_shares(&mut r)?,
        }
    }
);
wire!(
    ShareRelay,
    4,
    "ShareRelay",
    |s, w| {
        w.u32(s.to);
        write_shares(&mut w, &s.shares);
    },
    |r| {
        ShareRelay {
            to: r.u32()?,
            shares: read_shares(&mut r)?,
        }
    }
);
wire!(
    SurvivorCheck,
    5,
    "SurvivorCheck",
    |s, w| {
        w.ids(&s.survivors);
    },
    |r| {
        SurvivorCheck {
            survivors: r.ids()?,
        }
    }
);
wire!(
    SurvivorSignature,
    6,
    "SurvivorSignature",
    |s, w| {
        w.u32(s.from);
        w.raw(&s.signature);
    },
    |r| {
        SurvivorSignature {
            from: r.u32()?,
            signature: r.arr()?,
        }
    }
);
wire!(
    UnmaskRequest,
    7,
    "UnmaskRequest",
    |s, w| {
        w.u32(s.to);
        w.ids(&s.self_mask_of);
        w.ids(&s.pairwise_of);
        w.ids(&s.survivors);
        w.u32(s.signatures.len() as u32);
        for sig in &s.signatures {
            w.u32(sig.from);
            w.raw(&sig.signature);
        }
    },
    |r| {
        let to = r.u32()?;
        let self_mask_of = r.ids()?;
        let pairwise_of = r.ids()?;
        let survivors = r.ids()?;
        let n = r.count(68)?;
        let signatures = (0..n)
            .map(|_| {
                Ok(SurvivorSignature {
                    from: r.u32()?,
                    signature: r.arr()?,
                })
            })
            .collect::<Result<_, SecAggError>>()?;
        UnmaskRequest {
            to,
            self_mask_of,
            pairwise_of,
            survivors,
            signatures,
        }
    }
);
wire!(
    UnmaskResponse,
    8,
    "UnmaskResponse",
    |s, w| {
        w.u32(s.from);
        write_owned(&mut w, &s.self_mask_shares);
        write_owned(&mut w, &s.pairwise_shares);
    },
    |r| {
        UnmaskResponse {
            from: r.u32()?,
            self_mask_shares: read_owned(&mut r)?,
            pairwise_shares: read_owned(&mut r)?,
        }
    }
);

/// Encodes a masked input: tag, version, sender id, modulus bits (one
/// byte), coordinate count, then each coordinate as ⌈bits/8⌉ little-endian
/// bytes — 4 bytes per coordinate in a 32-bit round, 8 in a 64-bit one.
pub fn masked_to_bytes(from: u32, masked: &RingVec) -> Vec<u8> {
    let mut w = Writer::new(9);
    w.u32(from);
    w.raw(&[masked.modulus_bits() as u8]);
    w.u32(masked.len() as u32);
    masked.write_le(&mut w.0);
    w.0
}

/// The length of [`masked_to_bytes`]'s frame for a vector of `len`
/// coordinates modulo 2^bits.
pub(crate) fn masked_frame_len(len: usize, bits: u32) -> usize {
    11 + len * super::ring::bytes_per_element(bits)
}

/// Checks the framing of a masked input against the round's configuration
/// and returns (sender, body bytes): the round's modulus, exactly
/// `vector_len` coordinates of ⌈bits/8⌉ bytes, and nothing after them.
pub(crate) fn masked_body<'a>(
    bytes: &'a [u8],
    config: &SecAggConfig,
) -> Result<(u32, &'a [u8]), SecAggError> {
    let mut r = Reader::new(bytes, 9, "MaskedInput")?;
    let from = r.u32()?;
    let bits = u32::from(r.u8()?);
    if bits != config.modulus_bits {
        return Err(r.err(format!(
            "coordinates modulo 2^{bits}, the round uses 2^{}",
            config.modulus_bits
        )));
    }
    let width = config.bytes_per_element();
    let n = r.count(width)?;
    let expected_len = config.vector_len();
    if n != expected_len {
        return Err(SecAggError::WrongLength {
            what: "masked input",
            expected: expected_len,
            got: n,
        });
    }
    let body = r.take(width * n)?;
    r.finish((from, body))
}

/// Decodes a masked input produced by [`masked_to_bytes`], checking it
/// against the round's modulus and vector length, and that every coordinate
/// is below the modulus. Returns (sender, coordinates). The server skips
/// this copy with `ServerSession::on_masked_bytes`.
pub fn masked_from_bytes(
    bytes: &[u8],
    config: &SecAggConfig,
) -> Result<(u32, RingVec), SecAggError> {
    let (from, body) = masked_body(bytes, config)?;
    if !packed_in_range(config.modulus_bits, body) {
        return Err(SecAggError::Malformed {
            what: "MaskedInput",
            detail: "coordinate outside the modulus".into(),
        });
    }
    Ok((from, RingVec::read_le(config.modulus_bits, body)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> UnmaskRequest {
        UnmaskRequest {
            to: 3,
            self_mask_of: vec![1, 3],
            pairwise_of: vec![2],
            survivors: vec![1, 3],
            signatures: vec![SurvivorSignature {
                from: 1,
                signature: [7; 64],
            }],
        }
    }

    #[test]
    fn messages_round_trip() {
        let keys = AdvertiseKeys {
            id: 5,
            enc_pk: [1; 32],
            mask_pk: [2; 32],
            sig_pk: Some([3; 32]),
        };
        assert_eq!(AdvertiseKeys::from_bytes(&keys.to_bytes()).unwrap(), keys);
        let roster = KeyRoster {
            ids: vec![0, 5, 7, 8, 1000],
            keys: vec![
                keys.clone(),
                AdvertiseKeys {
                    sig_pk: None,
                    id: 8,
                    ..keys
                },
            ],
        };
        let bytes = roster.to_bytes();
        // Five ids in a 126-byte bitmap, two entries of 101 and 69 bytes.
        assert_eq!(bytes.len(), 2 + 4 + 126 + 4 + 101 + 69);
        assert_eq!(KeyRoster::from_bytes(&bytes).unwrap(), roster);
        let empty = KeyRoster {
            ids: vec![],
            keys: vec![],
        };
        assert_eq!(KeyRoster::from_bytes(&empty.to_bytes()).unwrap(), empty);
        assert_eq!(
            UnmaskRequest::from_bytes(&request().to_bytes()).unwrap(),
            request()
        );
        let resp = UnmaskResponse {
            from: 1,
            self_mask_shares: vec![(2, vec![1; 33])],
            pairwise_shares: vec![],
        };
        assert_eq!(UnmaskResponse::from_bytes(&resp.to_bytes()).unwrap(), resp);
        for bits in [32, 24, 64, 40] {
            let mut config = SecAggConfig::complete(1, 0, 3, 1.0);
            config.modulus_bits = bits;
            let top = crate::privacy::secagg::ring::mask_u64(bits);
            let v = RingVec::from_u64(bits, &[1, top, 2]);
            let bytes = masked_to_bytes(4, &v);
            assert_eq!(bytes.len(), 11 + 3 * config.bytes_per_element());
            assert_eq!(bytes.len(), masked_frame_len(3, bits));
            assert_eq!(masked_from_bytes(&bytes, &config).unwrap(), (4, v));
            // A vector of another ring is refused, not misread.
            config.modulus_bits = if bits == 64 { 32 } else { 64 };
            assert!(masked_from_bytes(&bytes, &config).is_err());
        }
    }

    #[test]
    fn every_truncation_and_corruption_gives_an_error_not_a_panic() {
        let bytes = request().to_bytes();
        for cut in 0..bytes.len() {
            assert!(
                UnmaskRequest::from_bytes(&bytes[..cut]).is_err(),
                "prefix {cut} accepted"
            );
        }
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert!(UnmaskRequest::from_bytes(&trailing).is_err());
        // Wrong tag: a request is not a response.
        assert!(UnmaskResponse::from_bytes(&bytes).is_err());
        // A huge declared count must not allocate or panic.
        let mut huge = bytes.clone();
        huge[6..10].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            UnmaskRequest::from_bytes(&huge),
            Err(SecAggError::Malformed { .. })
        ));
        // Flipping any byte either still decodes or errors; it never panics.
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0xff;
            let _ = UnmaskRequest::from_bytes(&b);
            let _ = KeyRoster::from_bytes(&b);
            let _ = ShareUpload::from_bytes(&b);
        }
        let config = SecAggConfig::complete(1, 0, 3, 1.0); // 3 coordinates
        let short = RingVec::from_u64(32, &[1, 2]);
        assert!(masked_from_bytes(&masked_to_bytes(1, &short), &config).is_err());
        // A 20-bit coordinate (3 bytes) with bits above 2^20 is refused.
        let mut c20 = config.clone();
        c20.modulus_bits = 20;
        let mut b = masked_to_bytes(1, &RingVec::from_u64(20, &[1, 2, 3]));
        assert!(masked_from_bytes(&b, &c20).is_ok());
        let last = b.len() - 1;
        b[last] |= 0x80;
        assert!(masked_from_bytes(&b, &c20).is_err());
        assert!(masked_from_bytes(&b[..last], &c20).is_err());
        assert!(AdvertiseKeys::from_bytes(&[]).is_err());
    }

    #[test]
    fn a_roster_id_bitmap_that_is_not_canonical_or_truncated_is_refused() {
        let roster = KeyRoster {
            ids: vec![1, 9],
            keys: vec![],
        };
        let bytes = roster.to_bytes();
        for cut in 0..bytes.len() {
            assert!(
                KeyRoster::from_bytes(&bytes[..cut]).is_err(),
                "prefix {cut}"
            );
        }
        // A trailing zero byte in the bitmap would decode to the same ids.
        let mut padded = bytes[..2].to_vec();
        padded.extend_from_slice(&3u32.to_le_bytes());
        padded.extend_from_slice(&[0b10, 0b10, 0]);
        padded.extend_from_slice(&0u32.to_le_bytes());
        let err = KeyRoster::from_bytes(&padded).unwrap_err();
        assert!(err.to_string().contains("zero byte"), "{err}");
    }
}
