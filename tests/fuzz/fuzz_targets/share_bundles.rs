//! Stage 2 messages: an agent's encrypted share bundles (decoded by the
//! coordinator) and the relayed bundles addressed to one agent (decoded by
//! that agent). Decode or fail, never panic; decode(encode(x)) == x.
#![no_main]

use fedcart_common::privacy::secagg::{ShareRelay, ShareUpload};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(upload) = ShareUpload::from_bytes(data) {
        let bytes = upload.to_bytes();
        assert_eq!(bytes, data, "ShareUpload encoding is not canonical");
        assert_eq!(ShareUpload::from_bytes(&bytes).as_ref(), Ok(&upload));
    }
    if let Ok(relay) = ShareRelay::from_bytes(data) {
        let bytes = relay.to_bytes();
        assert_eq!(bytes, data, "ShareRelay encoding is not canonical");
        assert_eq!(ShareRelay::from_bytes(&bytes).as_ref(), Ok(&relay));
    }
});
