//! Secure aggregation over gRPC: the coordinator's driver of
//! [`ServerSession`] for a task whose plan is `secure`.
//!
//! The round runs in stages, each closed by a deadline or as soon as every
//! agent expected in it has answered or hung up:
//!
//! 1. The task is pushed as usual, followed by an `advertise_keys` request
//!    whose body is the agent's [`RoundInvite`] (configuration, round seed,
//!    id). Agents train first, then advertise their keys (`SecAgg` RPC). This
//!    stage closes with the round timeout, since it contains local training.
//!    Over mutual TLS each advertisement must come signed with the agent's
//!    certificate key ([`binding`]); the signature is checked here, on the
//!    certificate the handshake verified, so a merchant that signs badly
//!    drops only itself.
//! 2. `share_keys`: every agent that advertised gets its roster
//!    ([`ServerSession::roster_for`]): the ids of all who advertised and the
//!    keys of the entries it uses (its share holders under SecAgg+, all with
//!    signed survivor lists), each entry with its [`KeyBinding`] (the
//!    signature and the certificate chain the agent presented on its own
//!    connection); every agent verifies them before using a key, so the
//!    coordinator cannot substitute keys, and refuses a roster that lacks a
//!    key it needs. Each answers with its encrypted shares, which the
//!    coordinator relays without being able to open them.
//! 3. `masked_input`: each agent gets the bundles addressed to it and uploads
//!    its masked vector through `SubmitUpdate` with
//!    `PAYLOAD_ENCODING_MASKED_U32` (the bytes of
//!    [`fedcart_common::privacy::secagg::masked_to_bytes`]). The bytes go straight
//!    into [`ServerSession::on_masked_bytes`], which adds them into the one
//!    running masked sum; the plaintext metrics in the header go to the
//!    engine with no update.
//! 4. Optional `sign_survivors` (`verify_survivors`), then `unmask`: the
//!    survivors reveal the shares asked of them, the session removes the
//!    masks from the sum, and only that sum reaches the engine
//!    ([`Engine::set_secure_sum`](crate::engine::Engine::set_secure_sum)).
//!
//! Any protocol failure (too few survivors, unrecoverable shares) aborts the
//! task with the session's error in the round record; the masked sum is
//! dropped unread and the round is attempted again. Fewer masked inputs than
//! `run.quorum` abort the task the same way, **before** any unmask request
//! is sent: a sum unmasked and then refused for want of a quorum would be
//! retried over the same inputs, and the difference of the two sums would
//! be one merchant's update. Fewer advertisers than the quorum abort
//! earlier still, before any share is sent. Stages after the first use
//! `secagg.stage_timeout_ms`.
//!
//! The round seed is derived from the run seed and the task id, so anyone
//! who knows the run seed knows it: it fixes only public things (the
//! neighbour graph, the HKDF salt, the AEAD nonces and associated data, the
//! signed survivor message). Every secret of the round (agents' key pairs,
//! self-mask seeds, distributed-DP noise) comes from each agent's OS CSPRNG.
//!
//! No code here holds an individual update in the clear: the coordinator
//! only ever sees masked bytes, which it never decodes one by one.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, MutexGuard};

use fedcart_common::privacy::secagg::binding::{self, BindingContext, KeyBinding};
use fedcart_common::privacy::secagg::{
    AdvertiseKeys, AfterMasked, RingVec, RoundInvite, SecAggError, ServerSession, ShareUpload,
    Stage, SurvivorSignature, UnmaskResponse, bytes_per_element, masked_to_bytes, stage_name,
    task_round_seed,
};
use fedcart_proto::v1 as pb;
use tokio::sync::watch;
use tokio::time::Instant;
use tonic::{Response, Status, Streaming};

use super::Shared;
use super::convert::{key_binding_to_pb, key_signature, secagg_status};
use crate::engine::{Submission, TaskPlan};
use crate::secure_round::round_config;

/// The secure round in progress: the server's session and who is expected
/// to answer the open stage.
pub(super) struct SecureRound {
    run_id: String,
    round: u64,
    task_id: String,
    /// `None` only once `finish` has consumed it.
    server: Option<ServerSession>,
    vector_len: usize,
    /// The round's modulus is 2^modulus_bits.
    modulus_bits: u32,
    /// Merchant → id in the round (its index among the selected agents).
    ids: BTreeMap<String, u32>,
    /// Id → the session its invitation went to. Only that session holds
    /// the agent's part of the round: a merchant that reconnects under a new
    /// session (a restarted process) cannot answer, so waiting stops for it.
    sessions: BTreeMap<u32, String>,
    /// What every advertisement is signed for (run, round, task, round seed).
    context: BindingContext,
    /// Id → the binding relayed with its roster entry.
    bindings: BTreeMap<u32, KeyBinding>,
    stage: Stage,
    expected: BTreeSet<u32>,
    answered: BTreeSet<u32>,
}

/// Merchant → (its session id, its Join stream's work queue).
type Targets = std::collections::HashMap<
    String,
    (String, tokio::sync::mpsc::Sender<Result<pb::Work, Status>>),
>;

/// The shutdown signal fired while a secure round was running.
pub(super) struct Interrupted;

impl Shared {
    fn secure_round(&self) -> MutexGuard<'_, Option<SecureRound>> {
        self.secure.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Each connected merchant's session and work queue, taken once per
    /// stage: finding a merchant's session by scanning every session for
    /// each push was quadratic in the number of agents.
    fn targets(&self) -> Targets {
        self.agents()
            .iter()
            .map(|(session, a)| (a.merchant_id.clone(), (session.clone(), a.tx.clone())))
            .collect()
    }

    /// Pushes one stage request to `merchant`'s current session (in
    /// `targets`) and returns that session's id; an agent whose queue is gone
    /// or full simply misses the stage (it becomes a dropout) and `None` is
    /// returned.
    fn push_secagg(
        &self,
        targets: &Targets,
        merchant: &str,
        plan: &TaskPlan,
        run_id: &str,
        stage: &str,
        body: Vec<u8>,
        key_bindings: Vec<pb::KeyBinding>,
    ) -> Option<String> {
        let target = targets.get(merchant);
        let work = pb::Work {
            kind: Some(pb::work::Kind::Secagg(pb::SecAggRequest {
                run_id: run_id.to_string(),
                round: plan.round,
                task_id: plan.task_id.clone(),
                stage: stage.to_string(),
                body,
                key_bindings,
            })),
        };
        match target {
            Some((session, tx)) if tx.try_send(Ok(work)).is_ok() => {
                // The chaos test (tests/chaos) kills processes on this line.
                tracing::debug!(merchant, stage, task = %plan.task_id, "secure-aggregation request sent");
                Some(session.clone())
            }
            _ => {
                tracing::info!(merchant, stage, task = %plan.task_id, "secure-aggregation request not delivered");
                None
            }
        }
    }
}

impl SecureRound {
    fn check_task(&self, run_id: &str, round: u64, task_id: &str) -> Result<(), Status> {
        if run_id != self.run_id {
            return Err(Status::not_found(format!(
                "run `{run_id}` is not this coordinator's run `{}`",
                self.run_id
            )));
        }
        if round != self.round || task_id != self.task_id {
            return Err(Status::failed_precondition(format!(
                "round {round} task `{task_id}` has no open secure aggregation (open: round {} task `{}`)",
                self.round, self.task_id
            )));
        }
        Ok(())
    }

    /// The merchant's id, if it is expected to answer `stage` now and has not.
    fn expect_answer(&self, merchant: &str, stage: Stage) -> Result<u32, Status> {
        let id = *self.ids.get(merchant).ok_or_else(|| {
            Status::permission_denied(format!("agent `{merchant}` was not selected for this task"))
        })?;
        if stage != self.stage {
            return Err(Status::failed_precondition(format!(
                "secure-aggregation stage {stage} is not open (open: {})",
                self.stage
            )));
        }
        if !self.expected.contains(&id) {
            return Err(Status::permission_denied(format!(
                "agent `{merchant}` is not part of stage {stage}"
            )));
        }
        if self.answered.contains(&id) {
            return Err(Status::already_exists(format!(
                "agent `{merchant}` already answered stage {stage}"
            )));
        }
        Ok(id)
    }

    fn server(&mut self) -> &mut ServerSession {
        self.server
            .as_mut()
            .expect("the session lives until the round ends")
    }

    fn open_stage(&mut self, stage: Stage, expected: impl IntoIterator<Item = u32>) {
        self.stage = stage;
        self.expected = expected.into_iter().collect();
        self.answered.clear();
    }
}

fn refuse_impostor(claimed: u32, id: u32) -> Result<(), Status> {
    if claimed != id {
        return Err(Status::permission_denied(format!(
            "message claims to come from agent {claimed}, this session is agent {id}"
        )));
    }
    Ok(())
}

/// The binding of `merchant`'s advertisement `keys`: with a certificate
/// chain (mutual TLS), the signature must be there and verify with the end
/// entity's key over the advertisement in this round; without TLS there is
/// nothing to check and agents that require binding will refuse the entry.
fn bind_advertisement(
    context: &BindingContext,
    merchant: &str,
    keys: &AdvertiseKeys,
    chain: Vec<Vec<u8>>,
    signature: Option<pb::KeySignature>,
) -> Result<KeyBinding, Status> {
    let signature = key_signature(signature);
    if let Some(cert) = chain.first() {
        let sig = signature.as_ref().ok_or_else(|| {
            Status::permission_denied(format!(
                "the key advertisement of `{merchant}` is not signed with its certificate's key"
            ))
        })?;
        let message = binding::signed_message(context, merchant, keys);
        binding::verify_signature(cert, &message, sig).map_err(|e| {
            tracing::warn!(merchant, error = %e, "key advertisement refused");
            Status::permission_denied(format!("key advertisement of `{merchant}` refused: {e}"))
        })?;
    }
    Ok(KeyBinding {
        agent: keys.id,
        merchant_id: merchant.to_string(),
        certificate_chain: chain,
        signature,
    })
}

/// One stage message from an agent (the `SecAgg` RPC), after the caller
/// checked the session and its certificate; `chain` is the certificate chain
/// the agent presented on this connection (empty without TLS).
pub(super) fn on_message(
    shared: &Shared,
    merchant: &str,
    chain: Vec<Vec<u8>>,
    msg: pb::SecAggMessage,
) -> Result<pb::SecAggReply, Status> {
    let stage = match msg.stage.as_str() {
        stage_name::ADVERTISE => Stage::Advertise,
        stage_name::SHARE_KEYS => Stage::ShareKeys,
        stage_name::SIGN_SURVIVORS => Stage::Consistency,
        stage_name::UNMASK => Stage::Unmask,
        other => {
            return Err(Status::invalid_argument(format!(
                "unknown secure-aggregation stage `{}` (masked inputs go through SubmitUpdate)",
                other.chars().take(40).collect::<String>()
            )));
        }
    };
    {
        let mut guard = shared.secure_round();
        let round = guard
            .as_mut()
            .ok_or_else(|| Status::failed_precondition("no secure-aggregation round is open"))?;
        round.check_task(&msg.run_id, msg.round, &msg.task_id)?;
        let id = round.expect_answer(merchant, stage)?;
        let body = &msg.body;
        match stage {
            Stage::Advertise => {
                let keys = AdvertiseKeys::from_bytes(body).map_err(secagg_status)?;
                refuse_impostor(keys.id, id)?;
                let bound =
                    bind_advertisement(&round.context, merchant, &keys, chain, msg.key_signature)?;
                round.server().on_advertise(keys).map(|()| {
                    round.bindings.insert(id, bound);
                })
            }
            Stage::ShareKeys => {
                let upload = ShareUpload::from_bytes(body).map_err(secagg_status)?;
                refuse_impostor(upload.from, id)?;
                round.server().on_shares(upload)
            }
            Stage::Consistency => {
                let sig = SurvivorSignature::from_bytes(body).map_err(secagg_status)?;
                refuse_impostor(sig.from, id)?;
                round.server().on_survivor_signature(sig)
            }
            _ => {
                let resp = UnmaskResponse::from_bytes(body).map_err(secagg_status)?;
                refuse_impostor(resp.from, id)?;
                round.server().on_unmask(resp)
            }
        }
        .map_err(secagg_status)?;
        round.answered.insert(id);
    }
    shared.bump();
    Ok(pb::SecAggReply {
        message: format!("stage {stage} accepted from `{merchant}`"),
    })
}

/// The first bytes of `id`'s masked-input frame in a ring of 2^bits
/// (message tag, version, sender, modulus), and the whole frame's length for
/// `len` coordinates.
fn masked_frame(id: u32, bits: u32, len: usize) -> (Vec<u8>, u64) {
    let mut head = masked_to_bytes(id, &RingVec::zeros(bits, 0));
    let total = head.len() + bytes_per_element(bits) * len;
    // Drop the (zero) coordinate count: the prefix ends with the modulus.
    head.truncate(head.len() - 4);
    (head, total as u64)
}

/// A masked input uploaded through `SubmitUpdate` (header already read, the
/// session and the task prechecked by the caller). The payload is added into
/// the masked sum as it is, never decoded; the header's metrics and example
/// weight (plaintext in every round) go to the engine with no update.
pub(super) async fn submit_masked(
    shared: &Shared,
    merchant: &str,
    header: pb::UpdateHeader,
    mut stream: Streaming<pb::UpdateChunk>,
) -> Result<Response<pb::SubmitReply>, Status> {
    if let Some((k, _)) = header.metrics.iter().find(|(_, v)| !v.is_finite()) {
        return Err(Status::invalid_argument(format!(
            "metric `{k}` is not finite"
        )));
    }
    if !(header.weight.is_finite() && header.weight >= 0.0) {
        return Err(Status::invalid_argument(format!(
            "example weight {} must be finite and >= 0",
            header.weight
        )));
    }
    let (id, prefix, declared) = {
        let guard = shared.secure_round();
        let round = guard.as_ref().ok_or_else(|| {
            Status::invalid_argument(format!(
                "task `{}` is not under secure aggregation: send PAYLOAD_ENCODING_F32",
                header.task_id
            ))
        })?;
        round.check_task(&header.run_id, header.round, &header.task_id)?;
        let id = round.expect_answer(merchant, Stage::MaskedInput)?;
        let (prefix, len) = masked_frame(id, round.modulus_bits, round.vector_len);
        (id, prefix, len)
    };
    if header.payload_len != declared {
        return Err(Status::invalid_argument(format!(
            "masked payload_len {} is not the {declared} bytes of a masked vector for this task",
            header.payload_len
        )));
    }
    let (_slot, payload) = super::receive_payload(shared, &mut stream, declared).await?;
    {
        let mut guard = shared.secure_round();
        let round = guard
            .as_mut()
            .ok_or_else(|| Status::failed_precondition("the secure round has ended"))?;
        round.check_task(&header.run_id, header.round, &header.task_id)?;
        // The stage may have closed while the payload streamed in.
        round.expect_answer(merchant, Stage::MaskedInput)?;
        // The frame must name this session's agent before anything is added.
        if !payload.starts_with(&prefix) {
            return Err(Status::permission_denied(
                "masked input is framed for another agent or another message type",
            ));
        }
        round
            .server()
            .on_masked_bytes(&payload)
            .map_err(secagg_status)?;
        round.answered.insert(id);
    }
    drop(payload);
    let sub = Submission {
        update: None,
        metrics: header.metrics.into_iter().collect(),
        weight: header.weight,
        // The engine weighs a secure task's figures equally.
        validation_weight: header.validation_weight.unwrap_or(header.weight),
        bytes: declared,
    };
    let result =
        shared
            .engine()
            .submit(merchant, &header.run_id, header.round, &header.task_id, sub);
    shared.bump();
    result.map_err(Status::from)?;
    Ok(Response::new(pb::SubmitReply {
        message: format!("accepted masked input from `{merchant}`"),
    }))
}

/// Runs the secure aggregation of `plan` (already pushed to its agents) to
/// its end: the decoded sum handed to the engine, or the task marked aborted
/// with the reason. `deadline` is the round's (it bounds local training and
/// key advertisement).
pub(super) async fn run(
    shared: &Arc<Shared>,
    plan: &TaskPlan,
    run_id: &str,
    deadline: Instant,
    changed: &mut watch::Receiver<u64>,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), Interrupted> {
    let result = drive(shared, plan, run_id, deadline, changed, shutdown).await;
    *shared.secure_round() = None;
    match result {
        Ok(Ok(())) => Ok(()),
        Ok(Err(reason)) => {
            tracing::warn!(task = %plan.task_id, %reason, "secure aggregation aborted");
            shared.engine().abort_secure(reason);
            Ok(())
        }
        Err(Interrupted) => Err(Interrupted),
    }
}

type Outcome = Result<Result<(), String>, Interrupted>;

/// The value of a step of [`drive`], or the driver's end with the step's
/// abort reason.
macro_rules! or_abort {
    ($step:expr) => {
        match $step {
            Ok(value) => value,
            Err(reason) => return Ok(Err(reason)),
        }
    };
}

async fn drive(
    shared: &Arc<Shared>,
    plan: &TaskPlan,
    run_id: &str,
    deadline: Instant,
    changed: &mut watch::Receiver<u64>,
    shutdown: &mut watch::Receiver<bool>,
) -> Outcome {
    let (settings, seed, stage_timeout, quorum) = {
        let engine = shared.engine();
        let run = engine.run();
        let settings = run
            .secagg
            .clone()
            .expect("secure tasks come from runs with secagg settings");
        let timeout = settings.stage_timeout(run.round_timeout_ms);
        (settings, run.seed, timeout, run.quorum)
    };
    let n = plan.selected.len();
    let config = round_config(&settings, &plan.spec, n);
    let rs = task_round_seed(seed, &plan.task_id);
    let ids: Vec<u32> = (0..n as u32).collect();
    // An agent that already said its local task failed answers nothing.
    let expected: BTreeSet<u32> = {
        let engine = shared.engine();
        plan.selected
            .iter()
            .zip(&ids)
            .filter(|(m, _)| !engine.has_dropped(m))
            .map(|(_, &id)| id)
            .collect()
    };
    // As pushed with the task (`run_tasks`; cached, so the same bytes).
    let model_digest = match plan.model_len {
        0 => Vec::new(),
        _ => or_abort!(
            shared
                .model_digest(plan.model_version)
                .map(|d| d.to_vec())
                .map_err(|e| e.to_string())
        ),
    };
    let server = match ServerSession::new(config.clone(), rs, &ids) {
        Ok(s) => s,
        Err(e) => return Ok(Err(e.to_string())),
    };
    *shared.secure_round() = Some(SecureRound {
        run_id: run_id.to_string(),
        round: plan.round,
        task_id: plan.task_id.clone(),
        server: Some(server),
        vector_len: config.vector_len(),
        modulus_bits: config.modulus_bits,
        ids: plan
            .selected
            .iter()
            .cloned()
            .zip(ids.iter().copied())
            .collect(),
        context: BindingContext {
            run_id: run_id.to_string(),
            round: plan.round,
            task_id: plan.task_id.clone(),
            round_seed: rs,
            // The task each agent was pushed (`convert::assignment`): the
            // same bytes for every agent of the round.
            task_digest: binding::task_digest(
                &super::convert::spec_json(plan),
                plan.model_version,
                plan.model_len,
                &model_digest,
            ),
        },
        bindings: BTreeMap::new(),
        sessions: BTreeMap::new(),
        stage: Stage::Advertise,
        expected,
        answered: BTreeSet::new(),
    });
    let targets = shared.targets();
    for (id, merchant) in plan.selected.iter().enumerate() {
        let invite = RoundInvite {
            config: config.clone(),
            round_seed: rs,
            id: id as u32,
            participants: n,
        };
        let session = shared.push_secagg(
            &targets,
            merchant,
            plan,
            run_id,
            stage_name::ADVERTISE,
            invite.to_json(),
            Vec::new(),
        );
        if let Some(session) = session {
            // Fails only once an operator's stop dropped the round, which
            // the next stage's step reports.
            let _ = step(shared, |r| {
                r.sessions.insert(id as u32, session);
                Ok(())
            });
        }
    }
    let push = |targets: &Targets, stage: &str, to: u32, body: Vec<u8>| {
        let merchant = &plan.selected[to as usize];
        // A later stage's request goes to the merchant's current session;
        // waiting for its answer is tied to the invitation's session.
        let _ = shared.push_secagg(targets, merchant, plan, run_id, stage, body, Vec::new());
    };
    wait_stage(shared, deadline, changed, shutdown).await?;

    // Stage 2: send each agent its roster — every id, but only the keys of
    // the entries it uses (its share holders under SecAgg+) — with those
    // entries' certificate bindings. A whole roster and every binding to
    // every agent would queue O(n²) bytes here (about 100 MB at n = 1,000);
    // this is O(n·k) keys plus an n-bit id set per agent.
    let ids = or_abort!(step(shared, |r| Ok(r.server().close_advertise()?.ids)));
    if ids.len() < quorum {
        return Ok(Err(crate::secure_round::before_sharing(ids.len(), quorum)));
    }
    let rosters = or_abort!(step(shared, |r| {
        r.open_stage(Stage::ShareKeys, ids.iter().copied());
        let all: BTreeMap<u32, pb::KeyBinding> = r
            .bindings
            .iter()
            .map(|(&id, b)| (id, key_binding_to_pb(b)))
            .collect();
        let rosters: Vec<(u32, Vec<u8>, Vec<pb::KeyBinding>)> = ids
            .iter()
            .map(|&id| {
                let roster = r.server().roster_for(id);
                let bindings = roster
                    .keys
                    .iter()
                    .filter_map(|k| all.get(&k.id).cloned())
                    .collect();
                (id, roster.to_bytes(), bindings)
            })
            .collect();
        Ok(rosters)
    }));
    let targets = shared.targets();
    for (id, body, bindings) in rosters {
        let merchant = &plan.selected[id as usize];
        let _ = shared.push_secagg(
            &targets,
            merchant,
            plan,
            run_id,
            stage_name::SHARE_KEYS,
            body,
            bindings,
        );
    }
    wait_stage(shared, Instant::now() + stage_timeout, changed, shutdown).await?;

    // Stage 3: relay the share bundles; masked inputs come via SubmitUpdate.
    let relays = or_abort!(step(shared, |r| {
        let relays = r.server().close_shares()?;
        r.open_stage(Stage::MaskedInput, relays.iter().map(|x| x.to));
        Ok(relays)
    }));
    let targets = shared.targets();
    relays
        .iter()
        .for_each(|x| push(&targets, stage_name::MASKED_INPUT, x.to, x.to_bytes()));
    wait_stage(shared, Instant::now() + stage_timeout, changed, shutdown).await?;

    // The masked inputs in the sum are final now. Below the quorum the task
    // would abort after unmasking, and its retry over the same inputs with
    // other survivors would let the difference of the two sums reveal
    // individual updates: abort before anything is unmasked.
    let in_sum = or_abort!(step(shared, |r| Ok(r.answered.len())));
    if in_sum < quorum {
        return Ok(Err(crate::secure_round::before_unmasking(in_sum, quorum)));
    }
    let after = or_abort!(step(shared, |r| r.server().close_masked()));
    let requests = match after {
        AfterMasked::Unmask(requests) => requests,
        AfterMasked::CheckSurvivors(check) => {
            or_abort!(step(shared, |r| {
                r.open_stage(Stage::Consistency, check.survivors.iter().copied());
                Ok(())
            }));
            let bytes = check.to_bytes();
            let targets = shared.targets();
            check
                .survivors
                .iter()
                .for_each(|&s| push(&targets, stage_name::SIGN_SURVIVORS, s, bytes.clone()));
            wait_stage(shared, Instant::now() + stage_timeout, changed, shutdown).await?;
            or_abort!(step(shared, |r| r.server().close_survivor_check()))
        }
    };

    // Stage 4: ask each survivor for its shares, then remove the masks.
    // First the engine stores whose inputs the sum holds, so that a
    // restarted coordinator retries this round over exactly them (or it
    // refuses: a retry after a restart over other merchants).
    let inputs_of: BTreeSet<String> = or_abort!(step(shared, |r| {
        Ok(r.server()
            .survivors()
            .iter()
            .filter_map(|&i| plan.selected.get(i as usize).cloned())
            .collect())
    }));
    or_abort!(shared.engine().before_unmask(&inputs_of));
    or_abort!(step(shared, |r| {
        r.open_stage(Stage::Unmask, requests.iter().map(|q| q.to));
        Ok(())
    }));
    let targets = shared.targets();
    requests
        .iter()
        .for_each(|q| push(&targets, stage_name::UNMASK, q.to, q.to_bytes()));
    wait_stage(shared, Instant::now() + stage_timeout, changed, shutdown).await?;
    // Taken out of the round, whose stage closes: a late answer is then
    // refused as out of stage instead of reaching a session that is gone.
    let server = shared.secure_round().as_mut().and_then(|r| {
        r.stage = Stage::Done;
        r.server.take()
    });
    let Some(server) = server else {
        return Ok(Err(STOPPED.to_string()));
    };
    // Removing the masks is CPU-bound (one PRG stream per survivor and per
    // dropped neighbour pair): keep it off the async workers.
    let output = tokio::task::spawn_blocking(move || server.finish())
        .await
        .map_err(|_| Interrupted)?;
    let output = match output {
        Ok(o) => o,
        Err(e) => {
            match e.revealed_sum_of() {
                // Unmasked, then refused: never to be computed again.
                Some(count) => shared.engine().refuse_unmasked_sum(e.to_string(), count),
                // Nothing recovered: the retry may select afresh.
                None => shared.engine().nothing_unmasked(),
            }
            return Ok(Err(e.to_string()));
        }
    };
    let survivors: Vec<String> = output
        .survivors
        .iter()
        .map(|&i| plan.selected[i as usize].clone())
        .collect();
    tracing::info!(task = %plan.task_id, survivors = survivors.len(), dropped = output.dropped.len(),
        clipped_fraction = output.sum.clipped_fraction(), "secure sum recovered");
    for merchant in output
        .forged_shares
        .iter()
        .filter_map(|&i| plan.selected.get(i as usize))
    {
        tracing::warn!(task = %plan.task_id, merchant = %merchant,
            "revealed a share at the unmask stage that the other holders' shares prove forged; \
             the sum was recovered without it, and the merchant is set aside for the rest of the run");
        shared.engine().forged_share(merchant);
    }
    if let Some(warning) = output.sum.clipping_warning("`run.secagg.clip`") {
        tracing::warn!(task = %plan.task_id, "{warning}");
    }
    let count = survivors.len();
    let mut engine = shared.engine();
    Ok(engine.set_secure_sum(&survivors, output.sum).map_err(|e| {
        // The sum was unmasked: refused, it must not be computed again.
        engine.refuse_unmasked_sum(e.to_string(), count);
        e.to_string()
    }))
}

/// Runs one step on the open round's session; a protocol error becomes the
/// abort reason.
fn step<T>(
    shared: &Shared,
    f: impl FnOnce(&mut SecureRound) -> Result<T, SecAggError>,
) -> Result<T, String> {
    let mut guard = shared.secure_round();
    // An operator's stop drops the round while its driver runs
    // (`Shared::stop_by_operator`): the driver ends at its next step.
    let Some(round) = guard.as_mut() else {
        return Err(STOPPED.to_string());
    };
    f(round).map_err(|e| e.to_string())
}

/// Why a secure round ends when an operator stopped its run while it was open.
const STOPPED: &str =
    "the run was stopped while the secure round was open: its masked sum was dropped unread";

/// Stops waiting for `merchant` in the secure round's open stage: its local
/// task failed and it said so (`UpdateHeader.failure`), so it answers no
/// stage. The protocol treats it as any other dropout; an agent can only
/// withdraw itself (the merchant is its session's).
pub(super) fn decline(shared: &Shared, merchant: &str) {
    let mut guard = shared.secure_round();
    if let Some(r) = guard.as_mut()
        && let Some(&id) = r.ids.get(merchant)
        && !r.answered.contains(&id)
    {
        r.expected.remove(&id);
    }
}

/// An agent's report that the share bundle of another agent of the round
/// failed authentication ([`fedcart_common::privacy::secagg::FORGED_SHARES`]
/// and its number): the engine weighs the accusation
/// ([`crate::engine::Engine::accuse`]). Any other reason, a number that is
/// not in the round, or an agent that sent the accuser no share bundle (not
/// one of its share holders, or before the bundles went out) is no
/// accusation.
pub(super) fn accusation(shared: &Shared, accuser: &str, reason: &str) {
    let Some(from) = reason
        .strip_prefix(fedcart_common::privacy::secagg::FORGED_SHARES)
        .and_then(|n| n.parse::<u32>().ok())
    else {
        return;
    };
    let accused = {
        let guard = shared.secure_round();
        let Some(r) = guard.as_ref() else { return };
        let Some(&by) = r.ids.get(accuser) else {
            return;
        };
        let sent = r.server.as_ref().is_some_and(|s| s.shares_with(from, by));
        match r.ids.iter().find(|(_, id)| **id == from) {
            Some((m, _)) if sent => m.clone(),
            _ => {
                tracing::warn!(
                    accuser,
                    agent = from,
                    "an accusation of forged shares against an agent that sent the accuser none \
                     is ignored"
                );
                return;
            }
        }
    };
    let aside = shared.engine().accuse(accuser, &accused);
    if !aside.is_empty() {
        tracing::warn!(
            accuser,
            accused = %accused,
            set_aside = %aside.join(", "),
            "a secure round's share bundle failed authentication: merchants set aside for the \
             rest of the run"
        );
    }
}

/// Waits until every agent expected in the open stage has answered, left or
/// declined, or until `until`. An agent has left when the session its
/// invitation went to is gone, even if its merchant joined again under a new
/// session: the new process holds nothing of this round and will never
/// answer.
async fn wait_stage(
    shared: &Shared,
    until: Instant,
    changed: &mut watch::Receiver<u64>,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), Interrupted> {
    loop {
        // Counted under both locks (the secure round's first; nothing takes
        // them the other way round) without copying every session id, which
        // at a thousand agents made each answer cost a thousand allocations.
        let outstanding = {
            let guard = shared.secure_round();
            // Dropped by an operator's stop: nothing more to wait for.
            let Some(r) = guard.as_ref() else {
                return Ok(());
            };
            let agents = shared.agents();
            r.expected
                .iter()
                .filter(|id| {
                    !r.answered.contains(id)
                        && r.sessions.get(id).is_some_and(|s| agents.contains_key(s))
                })
                .count()
        };
        if outstanding == 0 {
            return Ok(());
        }
        tokio::select! {
            _ = changed.changed() => {}
            _ = tokio::time::sleep_until(until) => return Ok(()),
            _ = shutdown.changed() => return Err(Interrupted),
        }
    }
}
