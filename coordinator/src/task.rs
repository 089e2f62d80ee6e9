//! The task the engine hands out: the vocabulary the engine, the privacy
//! ledger and the drivers share, kept below all of them.

use fedcart_common::task::TaskSpec;

/// A task handed out to agents.
#[derive(Debug, Clone)]
pub struct TaskPlan {
    /// Round number.
    pub round: u64,
    /// Attempt of this round, from 1.
    pub attempt: u32,
    /// Unique task id, e.g. `r3a1-train`.
    pub task_id: String,
    /// What the agents must do.
    pub spec: TaskSpec,
    /// Global version to download (and its length); length 0 = none.
    pub model_version: u64,
    /// Number of f32 values in that version (0 if none is needed).
    pub model_len: u64,
    /// Selected agents, sorted.
    pub selected: Vec<String>,
    /// True when the task's updates go through secure aggregation: agents
    /// submit only metrics, and the driver hands over the unmasked sum.
    pub secure: bool,
    /// True for the evaluation that hands the run's model out (of the last
    /// version, or the serving task of the best): every available merchant
    /// takes it, and keeps its version as the one it serves.
    pub hands_out: bool,
}
