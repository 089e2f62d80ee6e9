//! The privacy part of a task: what the coordinator tells each agent about
//! clipping (and, under secure aggregation, about noise), and the one place
//! where an agent's update is turned into its DP form.
//!
//! [`crate::train::run_task`] calls [`privatise`] on every training output
//! when the [`crate::task::TaskSpec`] carries a [`DpTask`], so the agent
//! process and the simulator clip identically. The clipped update has
//! example weight 1 and every per-coordinate weight 1 ([`super::dp_update`]),
//! so one merchant moves the sum by at most `C` in L2.
//!
//! With adaptive clipping (Andrew et al. 2021) the update carries one extra
//! trailing coordinate, the merchant's centred clip bit (`+½` if its delta
//! fitted under `C`, `−½` otherwise). It travels through the same sum — and
//! the same secure aggregation — as the model coordinates, so the
//! coordinator only learns the noised count of unclipped merchants.

use serde::{Deserialize, Serialize};

pub use super::distributed::DistributedNoise;
use super::{DpError, dp_update};
use crate::federation::update::Update;
use crate::federation::update::{Segment, WeightLayout};

/// The privacy instructions of one training task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DpTask {
    /// The clip norm `C` of this round (under adaptive clipping, the current
    /// private quantile estimate).
    pub clip: f64,
    /// Append the centred clip bit as a trailing coordinate (adaptive clipping).
    #[serde(default)]
    pub clip_bit: bool,
    /// Present when agents add the noise themselves under secure aggregation
    /// (distributed mode); absent when the coordinator adds it (central mode).
    #[serde(default)]
    pub distributed: Option<DistributedNoise>,
}

impl DpTask {
    /// Number of extra trailing coordinates the update carries (the clip bit).
    pub fn extra_len(&self) -> usize {
        usize::from(self.clip_bit)
    }

    /// The weight layout of the DP update: the model's layout with the clip
    /// bit as one more uniform coordinate.
    /// (A uniform layout stays uniform: its one segment simply grows.)
    pub fn layout(&self, model_layout: WeightLayout) -> WeightLayout {
        if !self.clip_bit || model_layout.segments.is_empty() {
            return model_layout;
        }
        let mut layout = model_layout;
        layout.segments.push(Segment {
            len: 1,
            group_len: None,
        });
        layout
    }
}

/// Replaces a training output's update (taken from `update`, the
/// `TaskOutput::update` field) by its DP form: the per-example delta
/// clipped to `dp.clip`, weight 1, per-coordinate weights 1, plus the clip
/// bit when asked. `model_layout` is the model's own layout (without the bit).
pub fn privatise(
    dp: &DpTask,
    model_layout: &WeightLayout,
    out: &mut Option<Update>,
) -> Result<(), DpError> {
    let Some(update) = out.take() else {
        return Ok(());
    };
    let (mut clipped, report) = dp_update(&update, model_layout, dp.clip)?;
    if dp.clip_bit {
        clipped.values.push(if report.clipped { -0.5 } else { 0.5 });
    }
    *out = Some(clipped);
    Ok(())
}

#[cfg(test)]
mod tests;
