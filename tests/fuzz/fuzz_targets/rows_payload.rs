//! Row-sparse wire forms of MF models (`federation::sparse`): an uploaded
//! update (`decode_update`) and a downloaded model applied to a cached copy
//! (`apply_model`), for a small MF layout whose item count and factor count
//! come from the first two bytes. Decode or fail, never panic; a decoded
//! update re-encodes to the same bytes; a refused download leaves the cached
//! copy untouched.
#![no_main]

use fedcart_common::federation::sparse;
use fedcart_common::model::mf::{MfAggregation, layout, model_len};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let [items, k, payload @ ..] = data else {
        return;
    };
    let (n, k) = (usize::from(items % 16) + 1, usize::from(k % 5) + 1);
    let l = layout(n, k, MfAggregation::PerItem);
    let len = model_len(n, k);
    if let Ok(update) = sparse::decode_update(payload, len, &l, 1.0) {
        let again = sparse::encode_update(&update, &l).expect("row-structured layout");
        // Rows listed with all-zero contents are dropped on re-encoding.
        assert!(again.len() <= payload.len());
        let back = sparse::decode_update(&again, len, &l, 1.0).expect("re-encoded update decodes");
        assert_eq!(back, update);
    }
    let cached: Vec<f32> = (0..len).map(|i| i as f32 * 0.5).collect();
    let mut copy = cached.clone();
    if sparse::apply_model(payload, &mut copy, &l).is_err() {
        assert_eq!(copy, cached, "a refused download changed the cached model");
    } else {
        assert!(copy.iter().all(|v| v.is_finite()));
    }
});
