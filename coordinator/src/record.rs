//! What the coordinator remembers about each round attempt.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// How a task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Enough results arrived; the aggregate was committed.
    Committed,
    /// Fewer results than the quorum arrived by the deadline; nothing changed.
    Aborted,
}

/// One history entry: a statistics, training or evaluation task of a round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundRecord {
    /// Round number (the version a training round produces); 0 for statistics.
    pub round: u64,
    /// Attempt number of this round, from 1; an aborted round is retried.
    pub attempt: u32,
    /// The task id sent to agents.
    pub task_id: String,
    /// `stats`, `train` or `evaluate`.
    pub kind: String,
    /// Committed or aborted.
    pub outcome: Outcome,
    /// The global version trained from (train) or evaluated (evaluate).
    pub base_version: u64,
    /// Agents selected for the task.
    pub selected: Vec<String>,
    /// Agents whose result was accepted.
    pub reported: Vec<String>,
    /// Agents that disconnected or missed the deadline.
    pub dropped: Vec<String>,
    /// Rejected submissions: agent and reason.
    pub rejected: Vec<(String, String)>,
    /// Example-weighted mean of the agents' reported metrics.
    pub metrics: BTreeMap<String, f64>,
    /// Total example weight of accepted results.
    pub examples: f64,
    /// Milliseconds since the Unix epoch when the task started.
    pub started_unix_ms: i64,
    /// Wall-clock duration of the task in milliseconds.
    pub duration_ms: u64,
    /// Bytes of update payload received.
    pub bytes_in: u64,
    /// Why the task aborted, if it did.
    #[serde(default)]
    pub abort_reason: Option<String>,
    /// Differential privacy of a committed training round: clip, noise,
    /// sampling rate and ε so far (replayed on restart).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub privacy: Option<crate::ledger::PrivacyRecord>,
}
