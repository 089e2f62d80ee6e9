//! Stage 1 messages: an agent's key advertisement (decoded by the
//! coordinator) and the key roster (decoded by every agent). Any bytes must
//! decode or fail without panicking; whatever decodes must re-encode to the
//! same bytes (the format is canonical) and decode again to the same value.
#![no_main]

use fedcart_common::privacy::secagg::{AdvertiseKeys, KeyRoster};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(keys) = AdvertiseKeys::from_bytes(data) {
        let bytes = keys.to_bytes();
        assert_eq!(bytes, data, "AdvertiseKeys encoding is not canonical");
        assert_eq!(AdvertiseKeys::from_bytes(&bytes).as_ref(), Ok(&keys));
    }
    if let Ok(roster) = KeyRoster::from_bytes(data) {
        let bytes = roster.to_bytes();
        assert_eq!(bytes, data, "KeyRoster encoding is not canonical");
        assert_eq!(KeyRoster::from_bytes(&bytes).as_ref(), Ok(&roster));
    }
});
