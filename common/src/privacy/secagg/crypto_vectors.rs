//! Published test vectors, run through the exact crate paths `crypto.rs`
//! uses, so a dependency bump that changed an algorithm would fail here.

use super::*;

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn hex32(s: &str) -> [u8; 32] {
    hex(s).try_into().unwrap()
}

#[test]
fn x25519_matches_rfc7748_section_5_2() {
    let cases = [
        (
            "a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4",
            "e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c",
            "c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552",
        ),
        (
            "4b66e9d4d1b4673c5ad22691957d6af5c11b6421e0ea01d42ca4169e7918ba0d",
            "e5210f12786811d3f4b7959d0538ae2c31dbe7106fc03c3efc4cd549c715a493",
            "95cbde9476e8907d7aade45cb4b873f88b595a68799fa152e6f8f7647aac7957",
        ),
    ];
    for (scalar, u, out) in cases {
        let secret = SecretKey::from_bytes(hex32(scalar));
        let shared = secret.diffie_hellman(&hex32(u)).unwrap();
        assert_eq!(*shared, hex32(out));
    }
}

#[test]
fn x25519_matches_rfc7748_section_6_1() {
    let alice = SecretKey::from_bytes(hex32(
        "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a",
    ));
    let bob = SecretKey::from_bytes(hex32(
        "5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb",
    ));
    let alice_pub = alice.public_key();
    let bob_pub = bob.public_key();
    assert_eq!(
        alice_pub,
        hex32("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
    );
    assert_eq!(
        bob_pub,
        hex32("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
    );
    let shared = hex32("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742");
    assert_eq!(*alice.diffie_hellman(&bob_pub).unwrap(), shared);
    assert_eq!(*bob.diffie_hellman(&alice_pub).unwrap(), shared);
}

#[test]
fn x25519_matches_rfc7748_section_5_2_iterated_1000_times() {
    // k = u = 9; each step computes X25519(k, u), then u = old k, k = result.
    let mut k = hex32("0900000000000000000000000000000000000000000000000000000000000000");
    let mut u = k;
    for i in 1..=1000 {
        let out = *SecretKey::from_bytes(k).diffie_hellman(&u).unwrap();
        u = k;
        k = out;
        if i == 1 {
            assert_eq!(
                k,
                hex32("422c8e7a6227d7bca1350b3e2bb7279f7897b87bb6854b783c60e80311ae3079")
            );
        }
    }
    assert_eq!(
        k,
        hex32("684cf59ba83309552800ef566f2f4d3c1c3887c49360e3875f2eb94d99532c51")
    );
}

/// AWS-LC's X25519 gives x25519-dalek's bytes (the implementation secure
/// rounds used before), so a seeded round keeps its keys, masks and sums:
/// public keys and agreements of random secrets, random peer bytes (about
/// half of them on the twist, with bit 255 set or not), and the same
/// refusal of every low-order point.
#[test]
fn aws_lc_x25519_gives_the_bytes_of_x25519_dalek() {
    use curve25519_dalek::constants::EIGHT_TORSION;
    use rand::{RngExt, SeedableRng};
    use x25519_dalek::{PublicKey, StaticSecret};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7748);
    for i in 0..500 {
        let bytes: [u8; 32] = rng.random();
        let ours = SecretKey::from_bytes(bytes);
        let theirs = StaticSecret::from(bytes);
        assert_eq!(ours.public_key(), PublicKey::from(&theirs).to_bytes());
        let peer: [u8; 32] = if i % 2 == 0 {
            PublicKey::from(&StaticSecret::from(rng.random::<[u8; 32]>())).to_bytes()
        } else {
            rng.random()
        };
        let reference = theirs.diffie_hellman(&PublicKey::from(peer));
        assert!(reference.was_contributory());
        assert_eq!(
            *ours.diffie_hellman(&peer).unwrap(),
            *reference.as_bytes(),
            "secret {bytes:02x?}, peer {peer:02x?}"
        );
    }
    for t in EIGHT_TORSION.iter() {
        for high in [0, 0x80] {
            let mut u = t.to_montgomery().to_bytes();
            u[31] |= high;
            let secret: [u8; 32] = rng.random();
            assert!(
                !StaticSecret::from(secret)
                    .diffie_hellman(&PublicKey::from(u))
                    .was_contributory()
            );
            assert!(SecretKey::from_bytes(secret).diffie_hellman(&u).is_none());
        }
    }
}

#[test]
fn hkdf_sha256_matches_rfc5869_case_1_with_split_info() {
    // `hkdf32` passes its info as several pieces; the crate must treat them
    // as their concatenation, which the split here checks.
    let ikm = hex("0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b");
    let salt = hex("000102030405060708090a0b0c");
    let info = hex("f0f1f2f3f4f5f6f7f8f9");
    let (prk, hk) = Hkdf::<Sha256>::extract(Some(&salt), &ikm);
    assert_eq!(
        prk.as_slice(),
        hex("077709362c2e32df0ddc3f0dc47bba6390b6c73bb50f9c3122ec844ad7c2b3e5").as_slice()
    );
    let mut okm = [0u8; 42];
    hk.expand_multi_info(&[&info[..4], &info[4..]], &mut okm)
        .unwrap();
    assert_eq!(
        okm.as_slice(),
        hex("3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865")
            .as_slice()
    );
}

#[test]
fn chacha20poly1305_matches_rfc8439_section_2_8_2() {
    let key: [u8; 32] = hex32("808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9f");
    let nonce: [u8; 12] = hex("070000004041424344454647").try_into().unwrap();
    let aad = hex("50515253c0c1c2c3c4c5c6c7");
    let plaintext = b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the future, sunscreen would be it.";
    let expected = hex(
        "d31a8d34648e60db7b86afbc53ef7ec2a4aded51296e08fea9e2b5a736ee62d6
         3dbea45e8ca9671282fafb69da92728b1a71de0a9e060b2905d6a5b67ecd3b36
         92ddbd7f2d778b8c9803aee328091b58fab324e4fad675945585808b4831d7bc
         3ff4def08e4b7a9de576d26586cec64b6116
         1ae10b594f09e26a7e902ecbd0600691",
    );
    let cipher = ChaCha20Poly1305::new(&key.into());
    let sealed = cipher
        .encrypt(
            &Nonce::from(nonce),
            Payload {
                msg: plaintext,
                aad: &aad,
            },
        )
        .unwrap();
    assert_eq!(sealed, expected);
    let opened = cipher
        .decrypt(
            &Nonce::from(nonce),
            Payload {
                msg: &sealed,
                aad: &aad,
            },
        )
        .unwrap();
    assert_eq!(opened, plaintext);
}

#[test]
fn aes128_ctr_keystream_matches_sp800_38a_f_5_1() {
    // The PRG keys AES-128 with the first 16 bytes of the seed; the other 16
    // must not matter.
    let mut seed = [0xa5u8; 32];
    seed[..16].copy_from_slice(&hex("2b7e151628aed2a6abf7158809cf4f3c"));
    let counter = u128::from_be_bytes(hex("f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff").try_into().unwrap());
    let plaintext = hex(
        "6bc1bee22e409f96e93d7e117393172aae2d8a571e03ac9c9eb76fac45af8e51
         30c81c46a35ce411e5fbc1191a0a52eff69f2445df4f9b17ad2b417be66c3710",
    );
    let expected = hex(
        "874d6191b620e3261bef6864990db6ce9806f66b7970fdff8617187bb9fffdff
         5ae4df3edbd5d35e5b4f09020db03eab1e031dda2fbe03d1792170a0f3009cee",
    );
    let mut ks = vec![0u8; 64];
    keystream(&seed, counter, &mut ks);
    let ct: Vec<u8> = ks.iter().zip(&plaintext).map(|(k, p)| k ^ p).collect();
    assert_eq!(ct, expected);
}

#[test]
fn chunked_masks_equal_one_long_keystream() {
    // `apply_masks` restarts the counter at every chunk; the result must be
    // the same stream as one uninterrupted keystream, read as u32 words for
    // rings of at most 32 bits and as u64 words above.
    let seed = [7u8; 32];
    for (bits, width) in [(32u32, 4usize), (24, 4), (64, 8), (40, 8)] {
        let len = 2 * CHUNK_BYTES / width + 5;
        let mut bytes = vec![0u8; len * width];
        keystream(&seed, 0, &mut bytes);
        let modulus = crate::privacy::secagg::ring::mask_u64(bits);
        let mut masked = RingVec::from_u64(bits, &vec![10u64; len]);
        apply_masks(&mut masked, &[(seed, Sign::Plus)]);
        for i in 0..len {
            let mut w = [0u8; 8];
            w[..width].copy_from_slice(&bytes[width * i..width * (i + 1)]);
            let m = u64::from_le_bytes(w);
            assert_eq!(
                masked.get(i),
                10u64.wrapping_add(m) & modulus,
                "coordinate {i} at {bits} bits"
            );
        }
        apply_masks(&mut masked, &[(seed, Sign::Minus)]);
        assert!(masked.to_u64_vec().iter().all(|&m| m == 10), "{bits} bits");
    }
}

/// The in-memory driver's batch masking gives every vector the words it
/// would get masked alone: pairs inside the batch (one seed, opposite
/// signs), seeds of peers outside it, self masks, a seed used by three
/// vectors, every ring width (u32 and u64 words, reduced and full), lengths
/// that end mid-chunk, and a vector of another length (masked alone).
#[test]
fn batch_masking_with_shared_keystreams_equals_masking_each_vector_alone() {
    use rand::{RngExt, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    for bits in [32u32, 24, 64, 40] {
        let len = 3 * SHARED_CHUNK_BYTES / 4 + 7;
        let n = 6;
        let pair: Vec<Vec<[u8; 32]>> = (0..n)
            .map(|_| (0..n).map(|_| rng.random()).collect())
            .collect();
        let common: [u8; 32] = rng.random();
        let mut masks: Vec<Vec<([u8; 32], Sign)>> = (0..n)
            .map(|u| {
                let mut m: Vec<([u8; 32], Sign)> = (0..n)
                    .filter(|&v| v != u)
                    .map(|v| {
                        let (lo, hi) = (u.min(v), u.max(v));
                        let sign = if u < v { Sign::Plus } else { Sign::Minus };
                        (pair[lo][hi], sign)
                    })
                    .collect();
                m.push((rng.random(), Sign::Plus)); // a peer outside the batch
                m.push((rng.random(), Sign::Minus));
                m.push((rng.random(), Sign::Plus)); // the self mask
                m
            })
            .collect();
        for m in masks.iter_mut().take(3) {
            m.push((common, Sign::Plus));
        }
        let mut vectors: Vec<RingVec> = (0..n)
            .map(|u| {
                let l = if u == 4 { len - 3 } else { len };
                let words: Vec<u64> = (0..l).map(|_| rng.random()).collect();
                let mut v = RingVec::from_u64(64, &words);
                if bits < 64 {
                    let m = crate::privacy::secagg::ring::mask_u64(bits);
                    v = RingVec::from_u64(bits, &words.iter().map(|w| w & m).collect::<Vec<_>>());
                }
                v
            })
            .collect();
        let mut alone = vectors.clone();
        for (v, m) in alone.iter_mut().zip(&masks) {
            apply_masks(v, m);
        }
        let lists: Vec<&[Mask]> = masks.iter().map(Vec::as_slice).collect();
        apply_masks_shared(vectors.iter_mut().collect(), &lists);
        assert_eq!(vectors, alone, "{bits} bits");
    }
}

#[test]
fn shamir_recovers_from_any_threshold_subset_and_not_below() {
    use rand::SeedableRng;
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
    let secret = [42u8; 32];
    let shares = split(&secret, 3, 5, &mut rng);
    let subset = vec![shares[4].clone(), shares[1].clone(), shares[2].clone()];
    assert_eq!(*recover(3, &subset, 0).unwrap(), secret);
    let dup = vec![shares[0].clone(), shares[0].clone(), shares[1].clone()];
    assert!(matches!(
        recover(3, &dup, 9),
        Err(SecAggError::NotEnoughShares {
            agent: 9,
            have: 2,
            need: 3
        })
    ));
}

#[test]
fn sealed_share_fails_in_the_other_direction() {
    let key = [3u8; 32];
    let seed = [1u8; 32];
    let ct = seal(&key, &seed, 1, 2, b"share");
    assert_eq!(open(&key, &seed, 1, 2, &ct).unwrap().as_slice(), b"share");
    assert!(open(&key, &seed, 2, 1, &ct).is_err());
    assert!(open(&key, &[2u8; 32], 1, 2, &ct).is_err());
}

#[test]
fn ed25519_matches_rfc8032_test_1() {
    let secret = hex32("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60");
    let public = hex32("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a");
    let expected = hex(
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b",
    );
    let key = SigningKey::from_bytes(&secret);
    assert_eq!(key.verifying_key().to_bytes(), public);
    let sig = sign(&key, b"");
    assert_eq!(sig.as_slice(), expected.as_slice());
    assert!(verify(&public, b"", &sig));
    assert!(!verify(&public, b"x", &sig));
}

#[test]
fn the_edwards_low_order_check_agrees_with_the_probe_agreement() {
    use curve25519_dalek::constants::EIGHT_TORSION;
    use rand::{RngExt, SeedableRng};
    let p_minus_one = hex32("ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f");
    let p = hex32("edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f");
    let p_plus_one = hex32("eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f");
    // Every point of order dividing 8 in Montgomery form, the non-canonical
    // encodings of u = 0 and 1 (p, p + 1), and u = −1 (a low-order point of
    // the twist, which `to_edwards` refuses), each also with bit 255 set
    // (X25519 ignores it).
    let mut low: Vec<[u8; 32]> = EIGHT_TORSION
        .iter()
        .map(|t| t.to_montgomery().to_bytes())
        .chain([p_minus_one, p, p_plus_one])
        .collect();
    low.extend(low.clone().into_iter().map(|mut u| {
        u[31] |= 0x80;
        u
    }));
    for u in &low {
        assert!(probe_is_low_order(u), "{u:02x?} is of low order");
        assert!(is_low_order(u), "{u:02x?}");
    }
    // Honest keys, and arbitrary bytes: about half of those are on the
    // twist, so both branches of the check are taken.
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(17);
    let mut twist = 0;
    for i in 0..600 {
        let u = if i % 3 == 0 {
            SecretKey::from_bytes(rng.random::<[u8; 32]>()).public_key()
        } else {
            rng.random::<[u8; 32]>()
        };
        twist += usize::from(MontgomeryPoint(u).to_edwards(0).is_none());
        assert_eq!(is_low_order(&u), probe_is_low_order(&u), "{u:02x?}");
        assert!(!is_low_order(&u));
    }
    assert!(
        (100..300).contains(&twist),
        "{twist} of 400 random keys on the twist"
    );
}
