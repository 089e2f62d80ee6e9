//! The invitation that opens a secure-aggregation round for one agent: the
//! round's parameters, its public seed and the agent's id in the round. The
//! gRPC coordinator sends it (as JSON) in the body of the `advertise_keys`
//! request; the agent builds its [`ClientSession`](super::ClientSession)
//! from it.

use serde::{Deserialize, Serialize};

use super::{SecAggConfig, SecAggError};

/// Stage names carried by the gRPC messages (`SecAggRequest.stage` from the
/// coordinator, `SecAggMessage.stage` from an agent). The masked input has no
/// `SecAggMessage`: it travels through `SubmitUpdate` with the masked payload
/// encoding.
pub mod stage_name {
    /// Coordinator → agent: a [`RoundInvite`](super::RoundInvite) (JSON);
    /// agent → coordinator: [`AdvertiseKeys`](crate::privacy::secagg::AdvertiseKeys).
    pub const ADVERTISE: &str = "advertise_keys";
    /// Coordinator → agent: the [`KeyRoster`](crate::privacy::secagg::KeyRoster);
    /// agent → coordinator: its [`ShareUpload`](crate::privacy::secagg::ShareUpload).
    pub const SHARE_KEYS: &str = "share_keys";
    /// Coordinator → agent: its [`ShareRelay`](crate::privacy::secagg::ShareRelay);
    /// the agent answers with its masked input through `SubmitUpdate`.
    pub const MASKED_INPUT: &str = "masked_input";
    /// Coordinator → agent: the [`SurvivorCheck`](crate::privacy::secagg::SurvivorCheck);
    /// agent → coordinator: its [`SurvivorSignature`](crate::privacy::secagg::SurvivorSignature).
    pub const SIGN_SURVIVORS: &str = "sign_survivors";
    /// Coordinator → agent: its [`UnmaskRequest`](crate::privacy::secagg::UnmaskRequest);
    /// agent → coordinator: its [`UnmaskResponse`](crate::privacy::secagg::UnmaskResponse).
    pub const UNMASK: &str = "unmask";
}

/// What an agent needs to start its session for one round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundInvite {
    /// Parameters shared by the server and every agent of the round.
    pub config: SecAggConfig,
    /// Public round seed: fixes the neighbour graph and binds every key and
    /// ciphertext of the round.
    pub round_seed: [u8; 32],
    /// This agent's id in the round (its index among the selected agents).
    pub id: u32,
    /// Number of agents invited (the `n` the configuration was validated for).
    pub participants: usize,
}

impl RoundInvite {
    /// The JSON body of the `advertise_keys` request.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("invitations serialise")
    }

    /// Parses and checks an invitation: the configuration must be valid for
    /// the announced number of agents and the id must be one of them, so a
    /// bad invitation is refused before any key is drawn.
    pub fn from_json(bytes: &[u8]) -> Result<Self, SecAggError> {
        let invite: Self = serde_json::from_slice(bytes).map_err(|e| SecAggError::Malformed {
            what: "round invitation",
            detail: e.to_string(),
        })?;
        invite.config.validate(invite.participants)?;
        if invite.id as usize >= invite.participants {
            return Err(SecAggError::Malformed {
                what: "round invitation",
                detail: format!(
                    "agent id {} is not below the {} participants",
                    invite.id, invite.participants
                ),
            });
        }
        Ok(invite)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invitations_round_trip_and_bad_ones_are_refused() {
        let invite = RoundInvite {
            config: SecAggConfig::complete(10, 2, 4, 1.0),
            round_seed: [3; 32],
            id: 2,
            participants: 4,
        };
        assert_eq!(RoundInvite::from_json(&invite.to_json()).unwrap(), invite);
        let outside = RoundInvite {
            id: 4,
            ..invite.clone()
        };
        assert!(matches!(
            RoundInvite::from_json(&outside.to_json()),
            Err(SecAggError::Malformed { .. })
        ));
        let alone = RoundInvite {
            participants: 1,
            id: 0,
            ..invite
        };
        assert!(matches!(
            RoundInvite::from_json(&alone.to_json()),
            Err(SecAggError::Config { .. })
        ));
        assert!(RoundInvite::from_json(b"{").is_err());
    }

    /// The agent masks with the scales the coordinator sent, so a number
    /// must parse to exactly the value that was written. A decimal longer
    /// than `f64` can hold once parsed (with serde_json's default, fast
    /// parser) to a neighbour of the value its shortest form parses to, and
    /// the invitation changed on its second trip (found by the
    /// `round_invite` fuzz target).
    #[test]
    fn long_decimals_parse_to_the_value_their_shortest_form_does() {
        let json = br#"{"config":{"num_values":5,"num_coord_weights":0,"neighbours":2,"threshold":2,"clip":1.0,"scale":357913941.2,"max_weight":1000000.7777777777777777777777777777777777777777777770,"weight_scale":0.4,"modulus_bits":32,"verify_survivors":false},"round_seed":[246,225,157,8,203,40,255,12,174,72,252,14,34,19,83,1,5,190,100,176,167,42,132,97,88,38,120,255,216,103,1,199],"id":0,"participants":3}"#;
        let invite = RoundInvite::from_json(json).unwrap();
        let nearest: f64 = "1000000.777777777777777777777777777777777777777777777"
            .parse()
            .unwrap();
        assert_eq!(invite.config.max_weight, nearest);
        let again = RoundInvite::from_json(&invite.to_json()).unwrap();
        assert_eq!(again, invite);
    }
}
