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
//! | `advertise_keys` | [`RoundInvite`] JSON | `SecAgg` RPC with [`AdvertiseKeys`](fedcart_common::privacy::secagg::AdvertiseKeys) and its `key_signature` |
//! | `share_keys`     | `KeyRoster` + `key_bindings` | `SecAgg` RPC with the `ShareUpload`, once every binding verified |
//! | `masked_input`   | `ShareRelay`        | `SubmitUpdate`, `PAYLOAD_ENCODING_MASKED_U32`, the masked frame |
//! | `sign_survivors` | `SurvivorCheck`     | `SecAgg` RPC with the `SurvivorSignature` |
//! | `unmask`         | `UnmaskRequest`     | `SecAgg` RPC with the `UnmaskResponse`    |
//!
//! Keys are bound to the merchant's certificate (the privacy policy's
//! `require_key_binding`, on by default): the advertisement is signed with
//! the mTLS key ([`KeyIdentity`]), and the roster is used only after every
//! entry's certificate chain, identity and signature verified
//! ([`verify_roster`]); otherwise the round is refused with one log line
//! naming the merchant and what failed, and the agent serves later rounds.
//!
//! Key material comes from the operating system's generator; the stochastic
//! rounding of the fixed-point encoding is seeded per task from the run seed,
//! so a run replays exactly. The plaintext update never leaves this module:
//! only its masked encoding does.

use fedcart_common::privacy::dp::distributed::noise_encoded;
use fedcart_common::privacy::dp::task::DpTask;
use fedcart_common::privacy::secagg::binding::{
    BindingContext, BindingError, EntryRefused, KeyBinding, KeySignature, UnixTime, signed_message,
    task_digest, verify_roster_entries,
};
use fedcart_common::privacy::secagg::{
    ClientSession, KeyRoster, RoundInvite, SecAggError, ShareRelay, SurvivorCheck, UnmaskRequest,
    encode, masked_to_bytes, stage_name, task_round_seed,
};
use fedcart_common::train::TaskOutput;
use fedcart_proto::v1 as pb;
use fedcart_proto::v1::coordinator_client::CoordinatorClient;
use tonic::transport::Channel;

use crate::tls::KeyIdentity;
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
    /// A roster entry's key binding failed: the round is refused, nothing
    /// was sent with the roster's keys.
    #[error("round {round} task `{task_id}`")]
    KeyBinding {
        /// Round named by the request.
        round: u64,
        /// Task named by the request.
        task_id: String,
        /// Which entry, whose, and what failed.
        #[source]
        source: EntryRefused,
    },
    /// The advertisement could not be signed with the merchant's key.
    #[error("signing the key advertisement")]
    Sign(#[source] BindingError),
    /// The merchant's privacy ledger could not record the round: nothing
    /// was sent.
    #[error("round {round} task `{task_id}`")]
    Ledger {
        /// Round named by the request.
        round: u64,
        /// Task named by the request.
        task_id: String,
        /// What failed.
        #[source]
        source: crate::budget::ChargeError,
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
    round: u64,
    task_id: String,
    /// Run seed, for the stochastic-rounding generator.
    seed: u64,
    merchant: String,
    output: TaskOutput,
    /// The task's differential privacy. In distributed mode this agent's
    /// share of the Skellam noise goes onto its encoded input before
    /// masking, once checked against the round (`DistributedNoise::check_round`).
    dp: Option<DpTask>,
    session: Option<ClientSession>,
    /// What the round's advertisements are signed for, set with the session.
    context: Option<BindingContext>,
    /// [`task_digest`] of the task as it was pushed: signed with the keys,
    /// so that every verified peer was given this same task.
    task_digest: [u8; 32],
    /// Distributed DP under a budget: the noise multiplier the round is
    /// charged at, fixed once the roster's size is known.
    charge_at: Option<f64>,
}

/// The secure tasks this agent is taking part in: at most one per run (a
/// coordinator runs one task of a run at a time, but several runs at once,
/// each with its own secure rounds).
#[derive(Default)]
pub struct SecureTasks {
    held: std::collections::HashMap<String, Held>,
    /// The merchant's policy, checked on the invitation and the roster.
    policy: crate::policy::PrivacyPolicy,
    /// The merchant's mTLS key and trusted CAs, binding keys to certificates.
    identity: Option<std::sync::Arc<KeyIdentity>>,
    /// The merchant's ε ledger (`privacy.max_epsilon`), charged before each
    /// distributed-DP masked input leaves.
    budget: Option<crate::budget::Budget>,
}

impl SecureTasks {
    /// No held task, checking rounds against `policy`.
    pub fn with_policy(policy: crate::policy::PrivacyPolicy) -> Self {
        Self {
            held: Default::default(),
            policy,
            identity: None,
            budget: None,
        }
    }

    /// Charges distributed-DP rounds to `budget` and refuses those that
    /// would pass it (see [`crate::budget`]).
    pub fn set_budget(&mut self, budget: crate::budget::Budget) {
        self.budget = Some(budget);
    }

    /// The merchant's ε ledger, when its policy caps ε.
    pub fn budget(&self) -> Option<&crate::budget::Budget> {
        self.budget.as_ref()
    }

    /// Checks a pushed task against the policy and, for a distributed-DP
    /// training task, against the budget at the task's noise multiplier
    /// (the most the round can have; the share-keys stage checks again at
    /// the round's size).
    pub fn check_task(
        &self,
        spec: &fedcart_common::task::TaskSpec,
        secure: bool,
    ) -> Result<(), crate::policy::PolicyViolation> {
        self.policy.check_task(spec, secure)?;
        if let Some(budget) = &self.budget
            && spec.kind == fedcart_common::task::TaskKind::Train
            && let Some(dp) = &spec.dp
            && let Some(noise) = &dp.distributed
        {
            budget
                .check(noise.release_noise_multiplier(noise.skellam.min_survivors, dp.clip_bit))?;
        }
        Ok(())
    }

    /// Replaces the policy, keeping the identity.
    pub fn set_policy(&mut self, policy: crate::policy::PrivacyPolicy) {
        self.policy = policy;
    }

    /// Signs this agent's keys with `identity` and checks its peers' against
    /// its CAs.
    pub fn with_identity(mut self, identity: KeyIdentity) -> Self {
        self.identity = Some(std::sync::Arc::new(identity));
        self
    }

    /// Sets the key-binding identity (see [`Self::with_identity`]).
    pub fn set_identity(&mut self, identity: KeyIdentity) {
        self.identity = Some(std::sync::Arc::new(identity));
    }

    /// The merchant's privacy policy.
    pub fn policy(&self) -> &crate::policy::PrivacyPolicy {
        &self.policy
    }

    /// Keeps the output of a secure task until the coordinator asks for its
    /// masked input. A newer task of the same run replaces an older one (the
    /// coordinator runs one task of a run at a time); another run's task is
    /// kept beside it.
    pub fn hold(
        &mut self,
        task: &pb::TaskAssignment,
        seed: u64,
        merchant: &str,
        dp: Option<DpTask>,
        out: TaskOutput,
    ) {
        self.held.insert(
            task.run_id.clone(),
            Held {
                round: task.round,
                task_id: task.task_id.clone(),
                seed,
                merchant: merchant.to_string(),
                output: out,
                dp,
                session: None,
                context: None,
                task_digest: task_digest(
                    &task.spec_json,
                    task.model_version,
                    task.model_len,
                    &task.model_digest,
                ),
                charge_at: None,
            },
        );
    }

    /// Drops what is held for `run_id` (its update and session keys): the
    /// run ended, and no unmask request will come for it.
    pub fn forget(&mut self, run_id: &str) {
        self.held.remove(run_id);
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
            self.held.remove(&req.run_id);
        }
        result
    }

    fn step(&mut self, session_id: &str, req: &pb::SecAggRequest) -> Result<Reply, SecureError> {
        let policy = &self.policy;
        let identity = self.identity.as_deref();
        let budget = &mut self.budget;
        let refuse = |source| SecureError::Policy {
            round: req.round,
            task_id: req.task_id.clone(),
            source,
        };
        let held = match self.held.get_mut(&req.run_id) {
            Some(h) if h.round == req.round && h.task_id == req.task_id => h,
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
        let signed = |body: Vec<u8>, key_signature: Option<KeySignature>| {
            Reply::Message(pb::SecAggMessage {
                session_id: session_id.to_string(),
                run_id: req.run_id.clone(),
                round: req.round,
                task_id: req.task_id.clone(),
                stage: req.stage.clone(),
                body,
                key_signature: key_signature.map(|s| pb::KeySignature {
                    scheme: u32::from(s.scheme),
                    signature: s.signature,
                }),
            })
        };
        let message = |body: Vec<u8>| signed(body, None);
        if stage == stage_name::ADVERTISE {
            let invite = RoundInvite::from_json(&req.body).map_err(protocol)?;
            // The seed fixes the neighbour graph: it must be the run's, not
            // one the coordinator chose (found by an attacker probe).
            if invite.round_seed != task_round_seed(held.seed, &req.task_id) {
                return Err(protocol(SecAggError::Refused(
                    "the round seed is not the one the run seed and the task id derive: the \
                     coordinator chose it (it would fix the neighbour graph)"
                        .into(),
                )));
            }
            policy.check_round(&invite.config).map_err(refuse)?;
            policy.check_binding(identity.is_some()).map_err(refuse)?;
            let context = BindingContext {
                run_id: req.run_id.clone(),
                round: req.round,
                task_id: req.task_id.clone(),
                round_seed: invite.round_seed,
                task_digest: held.task_digest,
            };
            let mut os = rand::rand_core::UnwrapErr(rand::rngs::SysRng);
            let mut session =
                ClientSession::new(invite.config, invite.id, invite.round_seed, &mut os);
            let keys = session.advertise().map_err(protocol)?;
            let signature = identity
                .map(|id| {
                    id.signer
                        .sign(&signed_message(&context, &held.merchant, &keys))
                        .map_err(SecureError::Sign)
                })
                .transpose()?;
            held.session = Some(session);
            held.context = Some(context);
            return Ok(signed(keys.to_bytes(), signature));
        }
        let session = held.session.as_mut().ok_or_else(|| SecureError::NoUpdate {
            round: req.round,
            task_id: req.task_id.clone(),
        })?;
        match stage {
            stage_name::SHARE_KEYS => {
                let roster = KeyRoster::from_bytes(&req.body).map_err(protocol)?;
                policy
                    .check_degree(session.config(), roster.ids.len())
                    .map_err(refuse)?;
                policy.check_roster(roster.ids.len()).map_err(refuse)?;
                if policy.require_key_binding {
                    // Checked on the invitation: with the policy on, a session
                    // exists only when the agent has an identity.
                    let (Some(identity), Some(context)) = (identity, &held.context) else {
                        return Err(refuse(crate::policy::PolicyViolation {
                            setting: "require_key_binding",
                            task: "no identity to verify the roster with".into(),
                            policy: "keys bound to merchant certificates".into(),
                        }));
                    };
                    let bindings: Vec<KeyBinding> =
                        req.key_bindings.iter().map(key_binding).collect();
                    // Exactly the entries whose keys this agent uses: its
                    // share holders (SecAgg+: k + 1 of n), or all of them.
                    let used = session.keys_used(&roster).map_err(protocol)?;
                    let used = |id: u32| used.binary_search(&id).is_ok();
                    verify_roster_entries(
                        &identity.cas,
                        context,
                        &roster,
                        &bindings,
                        UnixTime::now(),
                        used,
                    )
                    .map_err(|source| SecureError::KeyBinding {
                        round: req.round,
                        task_id: req.task_id.clone(),
                        source,
                    })?;
                }
                // Distributed DP: the noise must protect this round before
                // any of it is added (its encoding, coordinates, clip and
                // the agents it is split across).
                if let Some(dp) = &held.dp
                    && let Some(noise) = &dp.distributed
                {
                    noise
                        .check_round(session.config(), dp.clip, dp.clip_bit)
                        .map_err(|e| protocol(SecAggError::Refused(e)))?;
                    policy
                        .check_noise(noise, dp.clip_bit, roster.ids.len())
                        .map_err(refuse)?;
                    if let Some(budget) = budget {
                        let z = crate::budget::round_noise_multiplier(
                            noise,
                            dp.clip_bit,
                            roster.ids.len(),
                        );
                        budget.check(z).map_err(refuse)?;
                        held.charge_at = Some(z);
                    }
                }
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
                if let Some(noise) = held.dp.as_ref().and_then(|d| d.distributed.as_ref()) {
                    // Charged, durably, before anything of this round leaves.
                    if let Some(budget) = budget {
                        let spent = crate::budget::Spent {
                            run_id: req.run_id.clone(),
                            round: req.round,
                            task_id: req.task_id.clone(),
                            noise_multiplier: held
                                .charge_at
                                .unwrap_or(noise.skellam.noise_multiplier),
                            at_unix_ms: std::time::SystemTime::now()
                                .duration_since(std::time::UNIX_EPOCH)
                                .map_or(0, |d| d.as_millis() as u64),
                        };
                        let epsilon = budget.charge(spent).map_err(|source| match source {
                            crate::budget::ChargeError::Over(v) => refuse(v),
                            source => SecureError::Ledger {
                                round: req.round,
                                task_id: req.task_id.clone(),
                                source,
                            },
                        })?;
                        let (cap, delta) = budget.limit();
                        tracing::info!(
                            task = %req.task_id,
                            epsilon = %format_args!("{epsilon:.3}"),
                            max_epsilon = cap,
                            delta,
                            rounds = budget.rounds().len(),
                            "round charged to the privacy budget"
                        );
                    }
                    // The noise must stay secret from the coordinator: OS entropy.
                    let mut os = rand::rand_core::UnwrapErr(rand::rngs::SysRng);
                    noise_encoded(&mut encoded, session.config(), noise, &mut os).map_err(|e| {
                        SecureError::Protocol {
                            stage: stage.to_string(),
                            source: SecAggError::Refused(e.to_string()),
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
                    // The row count travels only inside the masked
                    // vector (its weight slot): the clear header says 1, so
                    // a curious coordinator reads no merchant's count (the
                    // statistics step's denominator included).
                    weight: 1.0,
                    metrics: held
                        .output
                        .metrics
                        .iter()
                        .map(|(k, v)| (k.clone(), *v))
                        .collect(),
                    failure: String::new(),
                    // Its validation rows likewise.
                    validation_weight: Some(1.0),
                    lasting: false,
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
                // The sum's inputs are known now: the list this request
                // names (signed by t survivors with the survivor check).
                let survivors = request.survivors.len();
                if let Some(dp) = &held.dp
                    && let Some(noise) = &dp.distributed
                    && (budget.is_some() || policy.min_noise_multiplier > 0.0)
                {
                    if survivors == 0 {
                        return Err(protocol(SecAggError::Refused(
                            "unmask request names no survivors: the round's noise cannot be \
                             accounted"
                                .into(),
                        )));
                    }
                    // A sum of fewer shares than charged for carries less
                    // noise: charged again, durably, before any share
                    // leaves, and kept even if this agent then refuses (the
                    // other holders may unmask the sum without it).
                    if let Some(budget) = budget {
                        let z =
                            crate::budget::round_noise_multiplier(noise, dp.clip_bit, survivors);
                        let spent = crate::budget::Spent {
                            run_id: req.run_id.clone(),
                            round: req.round,
                            task_id: req.task_id.clone(),
                            noise_multiplier: z,
                            at_unix_ms: std::time::SystemTime::now()
                                .duration_since(std::time::UNIX_EPOCH)
                                .map_or(0, |d| d.as_millis() as u64),
                        };
                        let settled =
                            budget.settle(spent).map_err(|source| SecureError::Ledger {
                                round: req.round,
                                task_id: req.task_id.clone(),
                                source,
                            })?;
                        if let Some(epsilon) = settled {
                            let (cap, delta) = budget.limit();
                            tracing::warn!(
                                task = %req.task_id,
                                survivors,
                                planned = noise.skellam.min_survivors,
                                noise_multiplier = %format_args!("{z:.4}"),
                                epsilon = %format_args!("{epsilon:.3}"),
                                max_epsilon = cap,
                                delta,
                                "the sum holds fewer noise shares than charged for: round charged again"
                            );
                            if epsilon > cap {
                                return Err(refuse(crate::policy::PolicyViolation {
                                    setting: "max_epsilon",
                                    task: format!(
                                        "a sum of {survivors} of {} planned noise shares \
                                         (z = {z:.4}), which brings this merchant's ε to \
                                         {epsilon:.3}",
                                        noise.skellam.min_survivors
                                    ),
                                    policy: format!("ε <= {cap} at δ = {delta:e}"),
                                }));
                            }
                        }
                    }
                    policy
                        .check_noise(noise, dp.clip_bit, survivors)
                        .map_err(refuse)?;
                }
                policy.check_survivors(survivors).map_err(refuse)?;
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
        let named = (req.run_id.clone(), req.round, req.task_id.clone());
        let (me, reply) = tokio::task::spawn_blocking(move || {
            let reply = me.respond(&session_id_owned, &req);
            (me, reply.map_err(|e| (req.stage.clone(), e)))
        })
        .await
        .map_err(SecureError::Panicked)?;
        *self = me;
        // Why this agent leaves the round, told to the coordinator so that
        // it stops waiting for us: a fixed, data-free reason.
        let mut leaving: Option<String> = None;
        match reply {
            Ok(reply) => {
                if let Err(status) = send(client, reply).await {
                    self.held.remove(&named.0);
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
                leaving = Some(crate::transfer::declined_by_policy(source.setting));
            }
            Err((
                stage,
                SecureError::KeyBinding {
                    task_id, source, ..
                },
            )) => {
                tracing::warn!(
                    stage,
                    task = %task_id,
                    merchant = %source.merchant,
                    agent = source.agent,
                    "secure round refused: {source}"
                );
                leaving = Some(crate::transfer::KEY_BINDING_REFUSED.into());
            }
            // Nothing held: the task's failure was reported when it failed
            // (or the round is over).
            Err((stage, e @ SecureError::NoUpdate { .. })) => {
                tracing::warn!(stage, error = %e, "secure-aggregation request not answered");
            }
            // A neighbour sent shares this agent cannot open: named, so that
            // the coordinator can set the sender aside.
            Err((
                stage,
                e @ SecureError::Protocol {
                    source: SecAggError::BadCiphertext { from, .. },
                    ..
                },
            )) => {
                tracing::warn!(stage, error = %e, "secure round left: a neighbour's shares are forged");
                leaving = Some(crate::transfer::forged_shares(from));
            }
            // The merchant's ledger could not be written (a full disk):
            // nothing was sent, and no later round can be charged either,
            // so the agent stops with the file and the fix, as it does for
            // its other state files, instead of declining round after round
            // with the cause left out of both sides' logs (found by a fault
            // probe).
            Err((
                stage,
                e @ SecureError::Ledger {
                    source: crate::budget::ChargeError::State(_),
                    ..
                },
            )) => {
                tracing::warn!(stage, error = %crate::agent::Chain(&e),
                    "secure-aggregation request not answered");
                self.report_leaving(client, session_id, &named, crate::transfer::STEP_FAILED)
                    .await;
                return Err(e);
            }
            Err((stage, e)) => {
                tracing::warn!(stage, error = %crate::agent::Chain(&e),
                    "secure-aggregation request not answered");
                leaving = Some(crate::transfer::STEP_FAILED.into());
            }
        }
        if let Some(reason) = leaving {
            self.report_leaving(client, session_id, &named, &reason)
                .await;
        }
        Ok(())
    }

    /// Tells the coordinator this agent leaves the round `named`, with a
    /// fixed, data-free `reason`. Best effort: a failure is logged.
    async fn report_leaving(
        &self,
        client: &mut CoordinatorClient<Channel>,
        session_id: &str,
        named: &(String, u64, String),
        reason: &str,
    ) {
        let (run_id, round, task_id) = named;
        let named = (run_id.as_str(), *round, task_id.as_str());
        if let Err(e) =
            crate::transfer::report_failure(client, session_id, named, reason, false).await
        {
            tracing::warn!(task = %task_id, error = %e, "the coordinator was not told");
        }
    }
}

/// A roster entry's binding as the coordinator relayed it. A scheme code
/// beyond u16 is no TLS scheme: 0, which verification refuses.
fn key_binding(b: &pb::KeyBinding) -> KeyBinding {
    KeyBinding {
        agent: b.agent,
        merchant_id: b.merchant_id.clone(),
        certificate_chain: b.certificate_chain.clone(),
        signature: b.signature.as_ref().map(|s| KeySignature {
            scheme: u16::try_from(s.scheme).unwrap_or(0),
            signature: s.signature.clone(),
        }),
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
        Reply::Masked { header, payload } => submit_chunked(client, header, payload.into()).await,
    }
}
