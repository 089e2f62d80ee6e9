//! The agent's side of secure aggregation over gRPC.
//!
//! For a task marked `secure_aggregation` the agent trains as usual but
//! keeps the update instead of uploading it ([`SecureTasks::hold`]). The
//! coordinator then pushes the protocol stages over the Join stream
//! (`SecAggRequest`); each is answered by one step of a
//! [`ClientSession`]:
//!
//! | request          | body                | answer                                   |
//! |------------------|---------------------|------------------------------------------|
//! | `advertise_keys` | [`RoundInvite`] JSON | `SecAgg` RPC with [`AdvertiseKeys`](fedcart_common::privacy::secagg::AdvertiseKeys) |
//! | `share_keys`     | `KeyRoster`         | `SecAgg` RPC with the `ShareUpload`       |
//! | `masked_input`   | `ShareRelay`        | `SubmitUpdate`, `PAYLOAD_ENCODING_MASKED_U32`, the masked frame |
//! | `sign_survivors` | `SurvivorCheck`     | `SecAgg` RPC with the `SurvivorSignature` |
//! | `unmask`         | `UnmaskRequest`     | `SecAgg` RPC with the `UnmaskResponse`    |
//!
//! Key material comes from the operating system's generator; the stochastic
//! rounding of the fixed-point encoding is seeded per task from the run seed,
//! so a run replays exactly. The plaintext update never leaves this module:
//! only its masked encoding does.

use fedcart_common::privacy::dp::distributed::noise_encoded;
use fedcart_common::privacy::dp::task::DistributedNoise;
use fedcart_common::privacy::secagg::{
    ClientSession, KeyRoster, RoundInvite, ShareRelay, SurvivorCheck, UnmaskRequest, encode,
    masked_to_bytes, stage_name,
};
use fedcart_common::train::TaskOutput;
use fedcart_proto::v1 as pb;
use fedcart_proto::v1::coordinator_client::CoordinatorClient;
use tonic::transport::Channel;

use crate::transfer::submit_chunked;

/// Why a stage request was not answered ([`SecureTasks::respond`]), or why
/// answering broke the session ([`SecureTasks::handle`]).
#[derive(Debug, thiserror::Error)]
pub enum SecureError {
    /// The request names a task this agent holds no update for (it was not
    /// trained here, training failed, or the round already ended).
    #[error("no update held for round {round} task `{task_id}`")]
    NoUpdate {
        /// Round named by the request.
        round: u64,
        /// Task named by the request.
        task_id: String,
    },
    /// A request for a stage this agent does not know.
    #[error("unknown secure-aggregation stage `{0}`")]
    UnknownStage(String),
    /// The protocol session refused the request or its body.
    #[error("stage `{stage}`: {source}")]
    Protocol {
        /// The stage.
        stage: String,
        /// The session's error.
        source: fedcart_common::privacy::secagg::SecAggError,
    },
    /// The answer could not be delivered because the connection broke; the
    /// session ends and the agent reconnects.
    #[error("secure-aggregation answer not delivered")]
    NotDelivered(#[source] tonic::Status),
    /// The round is below the merchant's privacy policy; nothing was sent.
    #[error("round {round} task `{task_id}`")]
    Policy {
        /// Round named by the request.
        round: u64,
        /// Task named by the request.
        task_id: String,
        /// Which setting the round falls short of.
        #[source]
        source: crate::policy::PolicyViolation,
    },
    /// The protocol step panicked on its blocking thread.
    #[error("secure-aggregation step panicked")]
    Panicked(#[source] tokio::task::JoinError),
}

/// What to send to the coordinator after a stage step.
#[derive(Debug)]
pub enum Reply {
    /// A stage message for the `SecAgg` RPC.
    Message(pb::SecAggMessage),
    /// The masked input, for `SubmitUpdate`: header and payload bytes.
    Masked {
        /// Upload header (masked encoding, plaintext metrics and weight).
        header: pb::UpdateHeader,
        /// The masked frame.
        payload: Vec<u8>,
    },
}

struct Held {
    run_id: String,
    round: u64,
    task_id: String,
    /// Run seed, for the stochastic-rounding generator.
    seed: u64,
    merchant: String,
    output: TaskOutput,
    /// Distributed DP: this agent's share of the Skellam noise goes onto its
    /// encoded input before masking.
    noise: Option<DistributedNoise>,
    session: Option<ClientSession>,
}

/// The secure task this agent is taking part in, if any.
#[derive(Default)]
pub struct SecureTasks {
    held: Option<Held>,
    /// The merchant's policy, checked on the invitation and the roster.
    policy: crate::policy::PrivacyPolicy,
}

impl SecureTasks {
    /// No held task, checking rounds against `policy`.
    pub fn with_policy(policy: crate::policy::PrivacyPolicy) -> Self {
        Self { held: None, policy }
    }

    /// The merchant's privacy policy.
    pub fn policy(&self) -> &crate::policy::PrivacyPolicy {
        &self.policy
    }

    /// Keeps the output of a secure task until the coordinator asks for its
    /// masked input. A newer task replaces an older one: the coordinator runs
    /// one task at a time.
    pub fn hold(
        &mut self,
        task: &pb::TaskAssignment,
        seed: u64,
        merchant: &str,
        noise: Option<DistributedNoise>,
        out: TaskOutput,
    ) {
        self.held = Some(Held {
            run_id: task.run_id.clone(),
            round: task.round,
            task_id: task.task_id.clone(),
            seed,
            merchant: merchant.to_string(),
            output: out,
            noise,
            session: None,
        });
    }

    /// True while an update is held for a secure task.
    pub fn holding(&self) -> bool {
        self.held.is_some()
    }

    /// One protocol step: the answer to `req`, without sending it. On any
    /// error the held update and session are discarded (the coordinator
    /// treats this agent as a dropout).
    pub fn respond(
        &mut self,
        session_id: &str,
        req: &pb::SecAggRequest,
    ) -> Result<Reply, SecureError> {
        let result = self.step(session_id, req);
        if result.is_err() || req.stage == stage_name::UNMASK {
            self.held = None;
        }
        result
    }

    fn step(&mut self, session_id: &str, req: &pb::SecAggRequest) -> Result<Reply, SecureError> {
        let policy = &self.policy;
        let refuse = |source| SecureError::Policy {
            round: req.round,
            task_id: req.task_id.clone(),
            source,
        };
        let held = match &mut self.held {
            Some(h)
                if h.run_id == req.run_id && h.round == req.round && h.task_id == req.task_id =>
            {
                h
            }
            _ => {
                return Err(SecureError::NoUpdate {
                    round: req.round,
                    task_id: req.task_id.clone(),
                });
            }
        };
        let stage = req.stage.as_str();
        let protocol = |source| SecureError::Protocol {
            stage: req.stage.clone(),
            source,
        };
        let message = |body: Vec<u8>| {
            Reply::Message(pb::SecAggMessage {
                session_id: session_id.to_string(),
                run_id: req.run_id.clone(),
                round: req.round,
                task_id: req.task_id.clone(),
                stage: req.stage.clone(),
                body,
            })
        };
        if stage == stage_name::ADVERTISE {
            let invite = RoundInvite::from_json(&req.body).map_err(protocol)?;
            policy.check_round(&invite.config).map_err(refuse)?;
            let mut os = rand::rand_core::UnwrapErr(rand::rngs::SysRng);
            let mut session =
                ClientSession::new(invite.config, invite.id, invite.round_seed, &mut os);
            let keys = session.advertise().map_err(protocol)?;
            held.session = Some(session);
            return Ok(message(keys.to_bytes()));
        }
        let session = held.session.as_mut().ok_or_else(|| SecureError::NoUpdate {
            round: req.round,
            task_id: req.task_id.clone(),
        })?;
        match stage {
            stage_name::SHARE_KEYS => {
                let roster = KeyRoster::from_bytes(&req.body).map_err(protocol)?;
                policy
                    .check_degree(session.config(), roster.keys.len())
                    .map_err(refuse)?;
                let upload = session.share_keys(&roster).map_err(protocol)?;
                Ok(message(upload.to_bytes()))
            }
            stage_name::MASKED_INPUT => {
                let relay = ShareRelay::from_bytes(&req.body).map_err(protocol)?;
                let update = held.output.update.as_ref().ok_or(SecureError::NoUpdate {
                    round: req.round,
                    task_id: req.task_id.clone(),
                })?;
                let mut rounding = fedcart_common::seed::rng(
                    held.seed,
                    &["secagg-rounding", &held.task_id, &held.merchant],
                );
                let mut encoded =
                    encode(session.config(), update, &mut rounding).map_err(protocol)?;
                let clipped = encoded.clipped();
                if let Some(noise) = &held.noise {
                    // The noise must stay secret from the coordinator: OS entropy.
                    let mut os = rand::rand_core::UnwrapErr(rand::rngs::SysRng);
                    noise_encoded(&mut encoded, session.config(), noise, &mut os).map_err(|e| {
                        SecureError::Protocol {
                            stage: stage.to_string(),
                            source: fedcart_common::privacy::secagg::SecAggError::Refused(
                                e.to_string(),
                            ),
                        }
                    })?;
                }
                let masked = session.masked_encoded(&relay, &encoded).map_err(protocol)?;
                if clipped > 0 {
                    tracing::info!(task = %req.task_id, clipped, "update coordinates clipped for secure aggregation");
                }
                let payload = masked_to_bytes(session.id(), &masked);
                let header = pb::UpdateHeader {
                    session_id: session_id.to_string(),
                    run_id: req.run_id.clone(),
                    round: req.round,
                    task_id: req.task_id.clone(),
                    encoding: pb::PayloadEncoding::MaskedU32 as i32,
                    payload_len: payload.len() as u64,
                    num_values: update.values.len() as u64,
                    num_coord_weights: update.coord_weights.len() as u64,
                    weight: held.output.weight,
                    metrics: held
                        .output
                        .metrics
                        .iter()
                        .map(|(k, v)| (k.clone(), *v))
                        .collect(),
                };
                // The plaintext update is no longer needed.
                held.output.update = None;
                Ok(Reply::Masked { header, payload })
            }
            stage_name::SIGN_SURVIVORS => {
                let check = SurvivorCheck::from_bytes(&req.body).map_err(protocol)?;
                let sig = session.sign_survivors(&check).map_err(protocol)?;
                Ok(message(sig.to_bytes()))
            }
            stage_name::UNMASK => {
                let request = UnmaskRequest::from_bytes(&req.body).map_err(protocol)?;
                let response = session.unmask(&request).map_err(protocol)?;
                Ok(message(response.to_bytes()))
            }
            other => Err(SecureError::UnknownStage(other.chars().take(40).collect())),
        }
    }

    /// Answers one pushed request: the protocol step runs on a blocking
    /// thread (masking costs one PRG stream per neighbour), then the answer
    /// is sent. A refused step or a rejected answer is logged and makes this
    /// agent a dropout of the round; only a broken connection is an error.
    pub async fn handle(
        &mut self,
        client: &mut CoordinatorClient<Channel>,
        session_id: &str,
        req: pb::SecAggRequest,
    ) -> Result<(), SecureError> {
        let mut me = std::mem::take(self);
        let session_id_owned = session_id.to_string();
        let (me, reply) = tokio::task::spawn_blocking(move || {
            let reply = me.respond(&session_id_owned, &req);
            (me, reply.map_err(|e| (req.stage.clone(), e)))
        })
        .await
        .map_err(SecureError::Panicked)?;
        *self = me;
        match reply {
            Ok(reply) => {
                if let Err(status) = send(client, reply).await {
                    self.held = None;
                    if matches!(
                        status.code(),
                        tonic::Code::Unavailable | tonic::Code::Cancelled | tonic::Code::Unknown
                    ) {
                        return Err(SecureError::NotDelivered(status));
                    }
                    tracing::warn!(%status, "secure-aggregation answer refused");
                }
            }
            Err((
                stage,
                SecureError::Policy {
                    task_id, source, ..
                },
            )) => {
                tracing::warn!(
                    stage,
                    task = %task_id,
                    setting = %format_args!("privacy.{}", source.setting),
                    task_value = %source.task,
                    policy_value = %source.policy,
                    "secure round refused by the privacy policy: {source}"
                );
            }
            Err((stage, e)) => {
                tracing::warn!(stage, error = %e, "secure-aggregation request not answered");
            }
        }
        Ok(())
    }
}

/// Sends a [`Reply`]: a `SecAgg` call, or the masked frame as a chunked
/// `SubmitUpdate` upload.
pub async fn send(
    client: &mut CoordinatorClient<Channel>,
    reply: Reply,
) -> Result<(), tonic::Status> {
    match reply {
        Reply::Message(msg) => client.sec_agg(msg).await.map(|_| ()),
        Reply::Masked { header, payload } => submit_chunked(client, header, &payload).await,
    }
}
