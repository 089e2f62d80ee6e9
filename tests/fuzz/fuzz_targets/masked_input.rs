//! Stage 3: a masked-input frame, checked against the round's configuration
//! (modulus and vector length) as the coordinator checks a reassembled
//! upload. The first input byte picks the round's modulus and the second its
//! vector length; the rest is the frame. Decode or fail, never panic; what
//! decodes re-encodes to the same frame, and every coordinate is below the
//! modulus.
#![no_main]

use fedcart_common::privacy::secagg::{SecAggConfig, masked_from_bytes, masked_to_bytes};
use libfuzzer_sys::fuzz_target;

/// Moduli the rings use: the 32-bit default, the 64-bit statistics ring and
/// packed widths in between (distributed DP picks those).
const BITS: [u32; 8] = [32, 64, 20, 24, 40, 8, 48, 63];

fuzz_target!(|data: &[u8]| {
    let [pick, len, frame @ ..] = data else {
        return;
    };
    let mut config = SecAggConfig::complete(usize::from(len % 16), 0, 3, 1.0);
    config.modulus_bits = BITS[usize::from(pick % 8)];
    if let Ok((from, masked)) = masked_from_bytes(frame, &config) {
        assert_eq!(masked.len(), config.vector_len());
        assert_eq!(masked.modulus_bits(), config.modulus_bits);
        let top = if config.modulus_bits == 64 {
            u64::MAX
        } else {
            (1u64 << config.modulus_bits) - 1
        };
        assert!(masked.to_u64_vec().iter().all(|&c| c <= top));
        assert_eq!(masked_to_bytes(from, &masked), frame);
    }
});
