//! Bytes on the wire per merchant, and the model copy each merchant trains
//! from: dense vectors, or row-sparse forms for catalogue-sized models
//! (`--traffic rows`, `fedcart_common::federation::sparse`).
//!
//! In `rows` mode a plaintext update travels as the rows the merchant
//! touched, and a download as the rows that changed since the version the
//! merchant holds (nothing when it already holds the version), with the
//! factor rows at `--download-precision`. Under secure aggregation uploads
//! stay dense: the masked vector must not reveal which rows are non-zero.
//! Row-sparse uploads are lossless, so metrics do not change; a reduced
//! download precision changes what the merchants train from (the quantised
//! global model), and so the metrics.

use std::sync::Arc;

use clap::ValueEnum;
use fedcart_common::federation::sparse::{self, RowPrecision};
use fedcart_common::federation::update::{Update, WeightLayout};
use serde::{Deserialize, Serialize};

/// How updates and models are counted on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrafficMode {
    /// Whole vectors, every task.
    #[default]
    Dense,
    /// Touched rows up, changed rows down (row-structured models only).
    Rows,
}

/// Per-merchant transfer accounting for one experiment.
pub struct Traffic {
    mode: TrafficMode,
    precision: RowPrecision,
    /// The version each merchant holds, and that version's global model.
    held: Vec<Option<(u64, Arc<Vec<f32>>)>>,
}

impl Traffic {
    /// Accounting for `merchants` merchants.
    pub fn new(mode: TrafficMode, precision: RowPrecision, merchants: usize) -> Self {
        Self {
            mode,
            precision,
            held: vec![None; merchants],
        }
    }

    /// The model the merchants are handed for a task: the global model, or
    /// its quantised copy when downloads use a reduced precision.
    pub fn handed_out(&self, global: &Arc<Vec<f32>>, layout: &WeightLayout) -> Arc<Vec<f32>> {
        if self.mode == TrafficMode::Rows
            && self.precision != RowPrecision::F32
            && layout.has_rows()
        {
            Arc::new(sparse::quantized(global, layout, self.precision))
        } else {
            Arc::clone(global)
        }
    }

    /// Bytes merchant `k` downloads to hold `version` (`global`), and
    /// records that it now holds it.
    pub fn download(
        &mut self,
        k: usize,
        version: u64,
        global: &Arc<Vec<f32>>,
        layout: &WeightLayout,
    ) -> u64 {
        let dense = 4 * global.len() as u64;
        if self.mode == TrafficMode::Dense || !layout.has_rows() {
            return dense;
        }
        let held = self.held[k].replace((version, Arc::clone(global)));
        let bytes = match &held {
            Some((v, _)) if *v == version => 0,
            _ => {
                let old = held.as_ref().map(|(_, m)| m.as_slice());
                // The coordinator sends whichever form is smaller
                // (`service::rows::rows_download`); the rows' form counted
                // alone overstated a round where most rows changed (a
                // researcher probe: 1.9 % over a run).
                match sparse::changed_rows(global, old, layout) {
                    Ok(rows) => sparse::model_len_bytes(layout, rows.len(), self.precision)
                        .min(dense as usize),
                    Err(_) => dense as usize,
                }
            }
        };
        bytes as u64
    }

    /// Bytes of a plaintext upload of `update` in this mode (`None`: keep the
    /// dense count).
    pub fn upload(&self, update: &Update, layout: &WeightLayout) -> Option<u64> {
        if self.mode == TrafficMode::Dense || !layout.has_rows() {
            return None;
        }
        // The agent sends whichever form is smaller.
        let rows = sparse::touched_rows(update, layout).ok()?;
        let dense = 4 * (update.values.len() + update.coord_weights.len());
        Some(sparse::update_len(layout, rows.len()).min(dense) as u64)
    }
}

#[cfg(test)]
mod tests;
