//! Local work on a merchant's data: the one function both the agent process
//! and the simulator call to carry out a task.
//!
//! `run_task` takes the task, the global parameters and the merchant's local
//! data (including any private state, which it may update) and returns the
//! update to send plus local metrics. What it returns is, by construction,
//! only the federated parameters' weighted delta or aggregate statistics.
//! The work itself is the model family's ([`crate::model::FederatedModel`]);
//! this module picks the operation and applies differential privacy.

pub use crate::model::churn::classification_metrics;
pub use crate::model::churn_lr::evaluate_lr;
pub use crate::model::{ChurnData, LocalData, TaskOutput, TrainError, weighted_delta};
use crate::task::{TaskKind, TaskSpec};

/// Carries out `spec` on `data`, starting from `global`, after checking
/// its model's shape and hyper-parameters ([`ModelSpec::check`](crate::task::ModelSpec::check)).
///
/// A training task with differential privacy (`spec.dp`) returns the clipped,
/// weight-1 form of the update (see [`crate::privacy::dp::task`]): agent and simulator
/// clip here, in the one function they share.
pub fn run_task(
    spec: &TaskSpec,
    global: &[f32],
    data: &mut LocalData,
) -> Result<TaskOutput, TrainError> {
    let model = spec.model.model();
    // The spec is the coordinator's: checked here, before anything is sized
    // from it, whoever sent it (the agent had trusted its MF shape).
    model.check()?;
    let ctx = spec.context();
    let mut out = match spec.kind {
        TaskKind::Stats => model.stats(&ctx, data)?,
        TaskKind::Train => model.fit(&ctx, global, data)?,
        TaskKind::Evaluate => model.evaluate(&ctx, global, data)?,
    };
    if let (Some(dp), TaskKind::Train) = (&spec.dp, spec.kind) {
        crate::privacy::dp::privatise(dp, &model.layout(), &mut out.update)
            .map_err(TrainError::Privacy)?;
    }
    Ok(out)
}

/// A merchant's personalisation of the served recommender `global` (the
/// version `spec.round`): the one-off proximal fine-tune of
/// [`crate::model::mf::MfShape::personalise`]. Its result stays with the
/// merchant; nothing of it is an update. A model that is not matrix
/// factorisation is [`TrainError::InvalidModel`].
pub fn personalise(
    spec: &TaskSpec,
    global: &[f32],
    data: &mut LocalData,
    settings: &crate::model::mf::Personalise,
) -> Result<crate::model::mf::Personalised, TrainError> {
    let shape = spec.model.mf_shape().ok_or_else(|| {
        TrainError::InvalidModel(format!(
            "personalisation needs a matrix-factorisation model, not `{}`",
            spec.model.name()
        ))
    })?;
    spec.model.check()?;
    shape.personalise(&spec.context(), global, data, settings)
}
