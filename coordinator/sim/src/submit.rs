//! How a simulated merchant's local result reaches the engine, shared by the
//! synchronous and the FedBuff drivers: a failed task drops the merchant;
//! under secure aggregation the update is set aside for the masked sum and
//! the engine gets only the metrics.

use fedcart_common::federation::update::Update;
use fedcart_common::train::{TaskOutput, TrainError};
use fedcart_coordinator::engine::{Engine, Submission};

/// The output of a local task, or `None` after dropping the merchant from
/// the open task when it failed (as a merchant whose training failed would),
/// with the failure recorded so that a round that keeps aborting is
/// reported with its cause.
pub fn accept(
    engine: &mut Engine,
    id: &str,
    out: Result<TaskOutput, TrainError>,
) -> Option<TaskOutput> {
    match out {
        Ok(o) => Some(o),
        Err(e) => {
            tracing::warn!(merchant = %id, error = %e, "local task failed; dropped");
            engine.fail_agent(id, e.to_string());
            None
        }
    }
}

/// The submission of `out`, counting its update's bytes. With `secure`, the
/// update goes into `secure_inputs` instead (the in-process secure
/// aggregation adds it into the masked sum).
pub fn route(
    id: &str,
    mut out: TaskOutput,
    secure: bool,
    secure_inputs: &mut Vec<(String, Update)>,
) -> Submission {
    let bytes = out
        .update
        .as_ref()
        .map_or(0, |u| 4 * (u.values.len() + u.coord_weights.len()) as u64);
    let update = if secure {
        if let Some(u) = out.update.take() {
            secure_inputs.push((id.to_string(), u));
        }
        None
    } else {
        out.update
    };
    Submission {
        update,
        metrics: out.metrics,
        weight: out.weight,
        validation_weight: out.validation_weight,
        bytes,
    }
}
