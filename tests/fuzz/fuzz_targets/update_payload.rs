//! A plaintext update upload after chunk reassembly. The coordinator's
//! reassembly (`service::read_payload`) reads from a tonic `Streaming` and
//! is not callable as a pure function, so this target fuzzes the pure steps
//! around it: the header's vector lengths (first two bytes), the payload cut
//! into chunks at fuzzer-chosen points and concatenated under the declared
//! length, then `Update::from_payload` and `validate`. Decode or fail, never
//! panic; decode(encode(x)) == x bit for bit.
#![no_main]

use fedcart_common::federation::update::{Update, WeightLayout};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let [values, weights, cut, payload @ ..] = data else {
        return;
    };
    let (nv, nw) = (usize::from(*values), usize::from(weights % 4));
    let declared = 4 * (nv + nw);
    // Reassemble chunk by chunk, refusing more than declared as the service does.
    let step = usize::from(*cut).max(1);
    let mut joined = Vec::with_capacity(declared);
    for chunk in payload.chunks(step) {
        if joined.len() + chunk.len() > declared {
            return;
        }
        joined.extend_from_slice(chunk);
    }
    match Update::from_payload(&joined, nv, nw, 1.0) {
        Ok(update) => {
            assert_eq!(joined.len(), declared);
            let again = update.payload_bytes();
            assert_eq!(again, joined, "payload encoding is not the identity");
            let _ = update.validate(nv, &WeightLayout::uniform());
        }
        Err(_) => assert_ne!(joined.len(), declared),
    }
});
