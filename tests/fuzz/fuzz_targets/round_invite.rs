//! The `advertise_keys` request body an agent receives: a JSON round
//! invitation naming the round's configuration. Parse or fail, never panic
//! (a hostile configuration must be refused before any key is drawn); what
//! parses serialises and parses back to the same invitation.
#![no_main]

use fedcart_common::privacy::secagg::RoundInvite;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(invite) = RoundInvite::from_json(data) {
        assert!((invite.id as usize) < invite.participants);
        let again = RoundInvite::from_json(&invite.to_json()).expect("re-parses");
        // Compare through JSON: a NaN clip would make `==` fail by itself.
        assert_eq!(again.to_json(), invite.to_json());
    }
});
