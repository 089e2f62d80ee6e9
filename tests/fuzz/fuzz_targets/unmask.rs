//! Stage 4 and the optional consistency stage: unmask responses (decoded by
//! the coordinator), unmask requests (decoded by agents), survivor lists and
//! survivor-list signatures. Decode or fail, never panic; decode(encode(x))
//! == x and the encoding is canonical.
#![no_main]

use fedcart_common::privacy::secagg::{
    SurvivorCheck, SurvivorSignature, UnmaskRequest, UnmaskResponse,
};
use libfuzzer_sys::fuzz_target;

macro_rules! round_trip {
    ($ty:ty, $data:expr) => {
        if let Ok(msg) = <$ty>::from_bytes($data) {
            let bytes = msg.to_bytes();
            assert_eq!(
                bytes,
                $data,
                "{} encoding is not canonical",
                stringify!($ty)
            );
            assert_eq!(<$ty>::from_bytes(&bytes).as_ref(), Ok(&msg));
        }
    };
}

fuzz_target!(|data: &[u8]| {
    round_trip!(UnmaskResponse, data);
    round_trip!(UnmaskRequest, data);
    round_trip!(SurvivorCheck, data);
    round_trip!(SurvivorSignature, data);
});
