//! The kinds of work a round hands out. A leaf module so that both the task
//! description (`task`) and the secure-aggregation configuration
//! (`privacy::secagg::config`) can name it without importing each other.

use serde::{Deserialize, Serialize};

/// The three kinds of work a round can hand out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskKind {
    /// Report feature sums and counts for global standardisation.
    Stats,
    /// Train from the global model and return a weighted update.
    Train,
    /// Evaluate the global model on the local held-out split.
    Evaluate,
}
