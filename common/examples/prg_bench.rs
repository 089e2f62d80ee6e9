//! Release-mode probe of the candidate mask PRGs and of X25519, on one
//! thread: keystream GB/s of AES-128-CTR and AES-256-CTR (the `aes` crate
//! picks its backend — VAES-512, VAES-256 or AES-NI — at run time) and of
//! ChaCha8/12/20 (`rand_chacha`), written into a 64 KiB buffer as the masking
//! loop does; and microseconds per X25519 agreement (`x25519-dalek`, and AWS-LC's,
//! which secure rounds use); and the SHA-256 model digest an agent checks
//! in a secure round.
//!
//! Run: `cargo run --release -p fedcart-common --example prg_bench`
//! (optional: `-- <MiB per cipher>`, default 2048).

use std::hint::black_box;
use std::time::Instant;

use aes::{Aes128, Aes256};
use ctr::Ctr64BE;
use ctr::cipher::{KeyIvInit, StreamCipher};
use rand::{Rng, SeedableRng};
use rand_chacha::{ChaCha8Rng, ChaCha12Rng, ChaCha20Rng};
use x25519_dalek::{PublicKey, StaticSecret};

const CHUNK: usize = 64 * 1024;

/// GB/s of `fill` writing `total` bytes, chunk by chunk, best of three.
fn rate(total: usize, mut fill: impl FnMut(usize, &mut [u8])) -> f64 {
    let mut buf = vec![0u8; CHUNK];
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let start = Instant::now();
        for i in 0..total / CHUNK {
            fill(i, &mut buf);
            black_box(&buf);
        }
        best = best.min(start.elapsed().as_secs_f64());
    }
    total as f64 / best / 1e9
}

fn main() {
    let mib: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("MiB per cipher: a number"))
        .unwrap_or(2048);
    let total = mib << 20;
    let key = [7u8; 32];
    // One cipher per 64 KiB chunk, keyed and positioned as the masking loop does.
    let aes128 = rate(total, |i, buf| {
        let iv = ((i * CHUNK / 16) as u128).to_be_bytes();
        let key16: &[u8; 16] = key[..16].try_into().expect("16 bytes");
        let mut c = Ctr64BE::<Aes128>::new(key16.into(), &iv.into());
        c.write_keystream(buf);
    });
    // The same keystream through AWS-LC's AES-128-CTR (a 128-bit counter,
    // equal to the 64-bit one while its low half does not wrap): zero the
    // chunk, then encrypt it in place.
    let aes128_lc = rate(total, |i, buf| {
        use aws_lc_rs::cipher::{AES_128, EncryptingKey, EncryptionContext, UnboundCipherKey};
        use aws_lc_rs::iv::FixedLength;
        let iv = ((i * CHUNK / 16) as u128).to_be_bytes();
        let unbound = UnboundCipherKey::new(&AES_128, &key[..16]).expect("16-byte key");
        let c = EncryptingKey::ctr(unbound).expect("AES-128-CTR");
        buf.fill(0);
        c.less_safe_encrypt(buf, EncryptionContext::Iv128(FixedLength::from(iv)))
            .expect("CTR encrypts any length");
    });
    let aes256 = rate(total, |i, buf| {
        let iv = ((i * CHUNK / 16) as u128).to_be_bytes();
        let mut c = Ctr64BE::<Aes256>::new(&key.into(), &iv.into());
        c.write_keystream(buf);
    });
    let mut c8 = ChaCha8Rng::from_seed(key);
    let chacha8 = rate(total, |_, buf| c8.fill_bytes(buf));
    let mut c12 = ChaCha12Rng::from_seed(key);
    let chacha12 = rate(total, |_, buf| c12.fill_bytes(buf));
    let mut c20 = ChaCha20Rng::from_seed(key);
    let chacha20 = rate(total, |_, buf| c20.fill_bytes(buf));
    println!("keystream, one thread, {mib} MiB per cipher (GB/s, best of 3):");
    for (name, r) in [
        ("AES-128-CTR (Ctr64BE)", aes128),
        ("AES-128-CTR (aws-lc-rs)", aes128_lc),
        ("AES-256-CTR (Ctr64BE)", aes256),
        ("ChaCha8 (rand_chacha)", chacha8),
        ("ChaCha12 (rand_chacha)", chacha12),
        ("ChaCha20 (rand_chacha)", chacha20),
    ] {
        println!("  {name:<24} {r:6.2}");
    }

    let mut rng = ChaCha20Rng::seed_from_u64(1);
    let secrets: Vec<StaticSecret> = (0..64)
        .map(|_| StaticSecret::random_from_rng(&mut rng))
        .collect();
    let publics: Vec<PublicKey> = secrets.iter().map(PublicKey::from).collect();
    let reps = 2000;
    let start = Instant::now();
    for i in 0..reps {
        let s = secrets[i % 64].diffie_hellman(&publics[(i * 7 + 1) % 64]);
        black_box(s.as_bytes());
    }
    let agree_us = start.elapsed().as_secs_f64() / reps as f64 * 1e6;
    let start = Instant::now();
    for i in 0..reps {
        black_box(PublicKey::from(&secrets[i % 64]));
    }
    let base_us = start.elapsed().as_secs_f64() / reps as f64 * 1e6;
    println!(
        "X25519 (x25519-dalek): agreement {agree_us:.1} µs; public key from secret: {base_us:.1} µs"
    );

    // The same through AWS-LC, which secure rounds use (`SecretKey`).
    use aws_lc_rs::agreement::{PrivateKey, UnparsedPublicKey, X25519, agree};
    let keys: Vec<PrivateKey> = secrets
        .iter()
        .map(|s| PrivateKey::from_private_key(&X25519, s.as_bytes()).expect("32 bytes"))
        .collect();
    let start = Instant::now();
    for i in 0..reps {
        let peer = UnparsedPublicKey::new(&X25519, publics[(i * 7 + 1) % 64].as_bytes());
        let out = agree(&keys[i % 64], peer, (), |k| Ok(k[0])).expect("contributory");
        black_box(out);
    }
    let agree_us = start.elapsed().as_secs_f64() / reps as f64 * 1e6;
    let start = Instant::now();
    for i in 0..reps {
        // AWS-LC derives the public key when it loads the secret.
        let key = PrivateKey::from_private_key(&X25519, secrets[i % 64].as_bytes());
        black_box(
            key.expect("32 bytes")
                .compute_public_key()
                .expect("public key"),
        );
    }
    let base_us = start.elapsed().as_secs_f64() / reps as f64 * 1e6;
    println!(
        "X25519 (aws-lc-rs): agreement {agree_us:.1} µs; public key from secret: {base_us:.1} µs"
    );

    // What an agent adds to a secure round to check the model's values
    // against the task's digest (`federation::update::model_digest`).
    for values in [100_000usize, 1_171_457] {
        let model: Vec<f32> = (0..values).map(|i| i as f32 * 1e-3).collect();
        let reps = 200;
        let start = Instant::now();
        for _ in 0..reps {
            black_box(fedcart_common::federation::update::model_digest(black_box(
                &model,
            )));
        }
        let each = start.elapsed().as_secs_f64() / reps as f64;
        println!(
            "model digest (SHA-256) of {values} f32: {:.3} ms ({:.2} GB/s)",
            each * 1e3,
            4.0 * values as f64 / each / 1e9
        );
    }
}
