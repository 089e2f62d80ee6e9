//! The one place where protobuf types become domain types and errors become
//! gRPC statuses.

use fedcart_common::federation::update::UpdateError;
use fedcart_common::privacy::secagg::SecAggError;
use fedcart_common::privacy::secagg::binding::{KeyBinding, KeySignature};
use fedcart_common::task::TaskKind;
use fedcart_proto::v1 as pb;
use tonic::Status;

use crate::engine::{SubmitError, TaskPlan};

impl From<SubmitError> for Status {
    fn from(e: SubmitError) -> Self {
        let msg = e.to_string();
        match e {
            SubmitError::WrongRun { .. } => Status::not_found(msg),
            SubmitError::Closed { .. }
            | SubmitError::Dropped(_)
            | SubmitError::AlreadyRefused(_) => Status::failed_precondition(msg),
            SubmitError::NotSelected(_) => Status::permission_denied(msg),
            SubmitError::Duplicate(_) => Status::already_exists(msg),
            SubmitError::Invalid(UpdateError::PayloadLength { .. }) => Status::out_of_range(msg),
            SubmitError::Invalid(_)
            | SubmitError::NotACount { .. }
            | SubmitError::BadMetric(_)
            | SubmitError::MetricOverflow(_)
            | SubmitError::NotAHistogramCount { .. }
            | SubmitError::ImpossibleStatistics { .. }
            | SubmitError::HistogramTotal { .. }
            | SubmitError::PlaintextInSecureTask(_) => Status::invalid_argument(msg),
            SubmitError::UnexpectedSecureSum(_) => Status::failed_precondition(msg),
        }
    }
}

/// The status for a secure-aggregation message the session refused.
pub fn secagg_status(e: SecAggError) -> Status {
    let msg = e.to_string();
    match e {
        SecAggError::WrongStage { .. } => Status::failed_precondition(msg),
        SecAggError::UnknownAgent { .. } => Status::permission_denied(msg),
        SecAggError::Duplicate { .. } => Status::already_exists(msg),
        SecAggError::WrongLength { .. } => Status::out_of_range(msg),
        _ => Status::invalid_argument(msg),
    }
}

/// The protobuf enum value for a task kind.
pub fn task_kind(kind: TaskKind) -> pb::TaskKind {
    match kind {
        TaskKind::Stats => pb::TaskKind::Stats,
        TaskKind::Train => pb::TaskKind::Train,
        TaskKind::Evaluate => pb::TaskKind::Evaluate,
    }
}

/// The task's spec as pushed to every agent of it (and bound, by digest,
/// into a secure round's signed advertisements).
pub(super) fn spec_json(plan: &TaskPlan) -> Vec<u8> {
    serde_json::to_vec(&plan.spec).expect("task specs serialise")
}

/// The assignment message pushed to each selected agent; `model_digest` is
/// its version's ([`super::Shared::model_digest`]), empty when the task
/// needs no model.
pub fn assignment(
    run_id: &str,
    plan: &TaskPlan,
    deadline_unix_ms: i64,
    secure: bool,
    model_digest: Vec<u8>,
) -> pb::TaskAssignment {
    pb::TaskAssignment {
        run_id: run_id.to_string(),
        round: plan.round,
        task_id: plan.task_id.clone(),
        kind: task_kind(plan.spec.kind) as i32,
        model_version: plan.model_version,
        model_len: plan.model_len,
        spec_json: spec_json(plan),
        deadline_unix_ms,
        secure_aggregation: secure,
        hands_out: plan.hands_out,
        model_digest,
    }
}

/// The signature an agent sent with its key advertisement.
pub(super) fn key_signature(sig: Option<pb::KeySignature>) -> Option<KeySignature> {
    sig.map(|s| KeySignature {
        // A scheme code beyond u16 is no TLS scheme: 0 is refused as unsupported.
        scheme: u16::try_from(s.scheme).unwrap_or(0),
        signature: s.signature,
    })
}

/// A roster entry's binding, as relayed to the agents.
pub(super) fn key_binding_to_pb(b: &KeyBinding) -> pb::KeyBinding {
    pb::KeyBinding {
        agent: b.agent,
        merchant_id: b.merchant_id.clone(),
        certificate_chain: b.certificate_chain.clone(),
        signature: b.signature.as_ref().map(|s| pb::KeySignature {
            scheme: u32::from(s.scheme),
            signature: s.signature.clone(),
        }),
    }
}
