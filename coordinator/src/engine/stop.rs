//! Stopping a run before its last round: a round that aborted
//! `run.max_attempts` times, a privacy budget that the next round would
//! exceed, a secure sum that was revealed but could not be committed, or
//! early stopping on the federated validation metric.
//! The reason is stored with the run (meta key `stopped`), so a restarted
//! coordinator stays stopped and its status says why.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::record::{Outcome, RoundRecord, kind_name};

/// The start of the message of a merchant's local training that diverged
/// (`fedcart_common::model::TrainError::Diverged`), as drivers report it
/// with [`Engine::fail_agent`](super::Engine::fail_agent).
pub const DIVERGED: &str = "local training diverged";

/// Why a run stopped before its last round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "stop")]
pub enum RunStop {
    /// One round aborted `run.max_attempts` times in a row.
    GaveUp {
        /// The round.
        round: u64,
        /// `stats`, `train` or `evaluate`.
        kind: String,
        /// Attempts made.
        attempts: u32,
        /// The dominant cause of the aborts.
        cause: String,
    },
    /// Composing the next training round would exceed `target_epsilon`.
    Budget {
        /// The round that was not started.
        round: u64,
        /// ε spent so far.
        spent: f64,
        /// ε after the next round.
        next: f64,
        /// The configured `run.dp.target_epsilon`.
        target: f64,
        /// In distributed mode, when the round selected more merchants than
        /// the cohort the noise was planned for: (planned, selected). Their
        /// worst-case commit (the quorum) then holds less noise than planned,
        /// so the target is reached before `run.rounds`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        over_plan: Option<(usize, usize)>,
    },
    /// More merchants could be selected for a training round than
    /// `run.dp.delta` protects (δ ≥ 1/n): the check at start took
    /// `run.dp.population`, or `selection.min_agents` without it, for the
    /// federation's size. The round is not started.
    Delta {
        /// The round that was not started.
        round: u64,
        /// `run.dp.delta`.
        delta: f64,
        /// Merchants available to it.
        merchants: usize,
        /// What the check at start took for the federation's size.
        assumed: usize,
    },
    /// A secure sum was unmasked but the round could not be committed:
    /// retrying over the same inputs would let the difference of two sums
    /// reveal individual updates, so the run stops instead.
    Revealed {
        /// The round.
        round: u64,
        /// The task whose sum was revealed.
        task_id: String,
        /// Why it could not be committed.
        reason: String,
    },
    /// `run.early_stopping.patience` evaluated versions in a row did not
    /// improve the federated validation metric: a planned end, the best
    /// version stands.
    EarlyStopped {
        /// The last evaluated version.
        version: u64,
        /// The best version so far.
        best_version: u64,
        /// The validation metric.
        metric: String,
        /// Its value at the best version.
        best: f64,
    },
    /// An operator stopped the run (`runs stop`): a planned end, the
    /// committed versions stand.
    Operator {
        /// The operator's certificate name (`plaintext` without TLS).
        by: String,
        /// The last committed version when it stopped.
        version: u64,
    },
}

impl RunStop {
    /// A planned end (exhausted privacy budget, early stopping) rather than a
    /// fault: the committed versions stand and the process exits cleanly.
    pub fn is_planned(&self) -> bool {
        matches!(
            self,
            Self::Budget { .. } | Self::EarlyStopped { .. } | Self::Operator { .. }
        )
    }
}

impl RunStop {
    /// The stop as a merchant may read it (its `status`, the `RunEnded`
    /// message every agent receives): the same words without what came from
    /// other merchants — the cause of a round that kept aborting names the
    /// merchants whose results were refused and why (`from x@acme`: "the
    /// local features do not have the model's width"), and a revealed sum's
    /// reason may too. A cause every merchant shares (all training diverged)
    /// is kept: it is the merchant's own as much as anyone's.
    pub fn for_merchants(&self) -> String {
        const WITHHELD: &str = "the operator's `status` gives it";
        let mut seen = self.clone();
        match &mut seen {
            Self::GaveUp { cause, .. }
                if !cause.starts_with("every merchant's local training diverged") =>
            {
                *cause = WITHHELD.into();
            }
            Self::Revealed { reason, .. } => *reason = WITHHELD.into(),
            _ => {}
        }
        seen.to_string()
    }
}

impl std::fmt::Display for RunStop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::GaveUp {
                round,
                kind,
                attempts,
                cause,
            } => write!(
                f,
                "round {round} ({kind}) aborted {attempts} times (run.max_attempts): {cause}; \
                 the run stops"
            ),
            Self::Budget {
                round,
                spent,
                next,
                target,
                over_plan,
            } => {
                write!(
                    f,
                    "privacy budget: ε spent {spent:.4}; round {round} would bring it to \
                     {next:.4}, above run.dp.target_epsilon {target}; the run stops before round \
                     {round}"
                )?;
                if let Some((planned, selected)) = over_plan {
                    write!(
                        f,
                        " (the distributed noise was planned for rounds of {planned} merchants, \
                         run.dp.population × selection.fraction, or selection.min_agents without \
                         a population, and round {round} selected {selected}: set \
                         run.dp.population to the federation's size)"
                    )?;
                }
                Ok(())
            }
            Self::Delta {
                round,
                delta,
                merchants,
                assumed,
            } => write!(
                f,
                "run.dp.delta = {delta} is not below 1/{merchants}: {merchants} merchants could \
                 be selected for round {round}, and a δ that large allows one merchant's data to \
                 be released whole (the check at start took {assumed} merchants, \
                 run.dp.population or else selection.min_agents); the run stops before round \
                 {round}: set run.dp.population to the federation's size and run.dp.delta below \
                 1/n (1e-5 is the usual choice)"
            ),
            Self::Revealed {
                round,
                task_id,
                reason,
            } => write!(
                f,
                "round {round}: the secure sum of task {task_id} was revealed but not committed \
                 ({reason}); retrying would expose the difference of two sums over the same \
                 inputs, so the run stops"
            ),
            Self::EarlyStopped {
                version,
                best_version,
                metric,
                best,
            } => write!(
                f,
                "early stopping: no better {metric} than version {best_version}'s {best:.4} \
                 up to version {version} (run.early_stopping.patience); version \
                 {best_version} is served"
            ),
            Self::Operator { by, version } => write!(
                f,
                "stopped by operator `{by}` at version {version} (`runs stop`)"
            ),
        }
    }
}

/// Why one attempt aborted: its abort reason and the results refused in
/// it (the first one's merchant and reason, and how many more).
pub fn attempt_cause(record: &RoundRecord) -> String {
    let mut cause = record
        .abort_reason
        .clone()
        .unwrap_or_else(|| "aborted".into());
    if let Some((who, why)) = record.rejected.first() {
        cause.push_str(&format!("; refused from {who}: {why}"));
        let more = record.rejected.len() - 1;
        if more > 0 {
            cause.push_str(&format!(" (and {more} more)"));
        }
    }
    cause
}

/// The stop when `record`, the `attempts`-th attempt of its round, is the
/// last one `run.max_attempts` allows: the round's aborted attempts in
/// `history` and it give the dominant cause.
pub(super) fn gave_up(history: &[RoundRecord], record: &RoundRecord, attempts: u32) -> RunStop {
    let key = (record.round, kind_name(record.kind));
    let mut tried: Vec<RoundRecord> = history
        .iter()
        .filter(|r| (r.round, kind_name(r.kind)) == key && r.outcome == Outcome::Aborted)
        .cloned()
        .collect();
    tried.push(record.clone());
    RunStop::GaveUp {
        round: record.round,
        kind: key.1.to_string(),
        attempts,
        cause: dominant_cause(&tried),
    }
}

/// The dominant cause of a round's aborted attempts: every merchant's local
/// training diverged (when every failure or rejection is a divergence),
/// otherwise the most frequent rejection or agent-reported failure (a
/// withdrawal, such as a privacy policy's refusal), otherwise the most
/// frequent abort reason.
pub fn dominant_cause(attempts: &[RoundRecord]) -> String {
    let rejections: Vec<&str> = attempts
        .iter()
        .flat_map(|r| r.rejected.iter().map(|(_, why)| why.as_str()))
        .collect();
    if !rejections.is_empty() && rejections.iter().all(|why| why.starts_with(DIVERGED)) {
        let from = attempts.last().map_or(0, |r| r.base_version);
        return format!(
            "every merchant's local training diverged from version {from} (lower the learning \
             rate, or check the data: each merchant's own log says more, such as its ratings' \
             span for explicit MF)"
        );
    }
    fn count<'a>(reasons: &[&'a str]) -> BTreeMap<&'a str, usize> {
        let mut count = BTreeMap::new();
        for r in reasons {
            *count.entry(*r).or_default() += 1;
        }
        count
    }
    if !rejections.is_empty() {
        let total = rejections.len();
        let mut ranked: Vec<(&str, usize)> = count(&rejections).into_iter().collect();
        // A refusal of the round's size (`min_neighbours`, `min_survivors`,
        // `min_threshold`) follows from the others: one merchant's spent
        // budget leaves a round the other merchants' policies refuse as too
        // small, and naming theirs first sent the operator to edit the
        // policies of the wrong merchants. Then the most frequent first;
        // equal counts in the reasons' order.
        let follows = |why: &str| {
            [
                "privacy.min_neighbours",
                "privacy.min_survivors",
                "privacy.min_threshold",
            ]
            .iter()
            .any(|k| why.contains(k))
        };
        ranked.sort_by(|a, b| {
            follows(a.0)
                .cmp(&follows(b.0))
                .then(b.1.cmp(&a.1))
                .then(a.0.cmp(b.0))
        });
        // Who gave it: the operator's next question.
        let from = |reason: &str| {
            let who: std::collections::BTreeSet<&str> = attempts
                .iter()
                .flat_map(|r| r.rejected.iter())
                .filter(|(_, why)| why == reason)
                .map(|(m, _)| m.as_str())
                .collect();
            let named: Vec<&str> = who.iter().copied().take(5).collect();
            let more = who.len() - named.len();
            let more = if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            };
            format!("{}{more}", named.join(", "))
        };
        let (reason, n) = ranked[0];
        let mut cause = format!(
            "most results were refused or withdrawn: `{reason}` ({n} of {total}; from {})",
            from(reason)
        );
        // The next reason too: one merchant's spent budget
        // (`privacy.max_epsilon`) leaves a round the others' policies
        // refuse as too small, and the first alone told half the story.
        if let Some(&(next, m)) = ranked.get(1) {
            let after = if follows(next) && !follows(reason) {
                ": a round the first refusal left too small"
            } else {
                ""
            };
            cause.push_str(&format!(
                ", and `{next}` ({m} of {total}; from {}{after})",
                from(next)
            ));
        }
        return cause;
    }
    let aborts: Vec<&str> = attempts
        .iter()
        .filter_map(|r| r.abort_reason.as_deref())
        .collect();
    match count(&aborts).into_iter().max_by_key(|(_, n)| *n) {
        Some((reason, n)) => format!("{reason} (in {n} of {} attempts)", aborts.len()),
        None => "no attempt committed".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A merchant's status and the `RunEnded` every agent receives once
    /// carried "(10 of 10; from x@acme)" and the other merchant's refusal;
    /// the merchants' wording keeps what the run did, not who did what.
    #[test]
    fn the_merchants_wording_of_a_stop_names_no_other_merchant() {
        let gave_up = RunStop::GaveUp {
            round: 3,
            kind: "train".into(),
            attempts: 10,
            cause: "most results were refused or withdrawn: `the local features do not have \
                    the model's width` (10 of 10; from x@acme)"
                .into(),
        };
        assert!(gave_up.to_string().contains("x@acme"));
        let shown = gave_up.for_merchants();
        assert!(
            !shown.contains("x@acme") && !shown.contains("width"),
            "{shown}"
        );
        assert!(
            shown.starts_with("round 3 (train) aborted 10 times (run.max_attempts)"),
            "{shown}"
        );
        let revealed = RunStop::Revealed {
            round: 2,
            task_id: "r2-train".into(),
            reason: "missing m7's unmasking".into(),
        };
        let shown = revealed.for_merchants();
        assert!(
            !shown.contains("m7") && shown.contains("r2-train"),
            "{shown}"
        );
        // What every merchant shares, or names no merchant, is kept.
        let diverged = RunStop::GaveUp {
            round: 1,
            kind: "train".into(),
            attempts: 3,
            cause: "every merchant's local training diverged from version 0 (lower the \
                    learning rate)"
                .into(),
        };
        assert_eq!(diverged.for_merchants(), diverged.to_string());
        let early = RunStop::EarlyStopped {
            version: 9,
            best_version: 4,
            metric: "val_auc".into(),
            best: 0.8,
        };
        assert_eq!(early.for_merchants(), early.to_string());
    }

    /// One merchant's spent budget leaves a round the others refuse as too
    /// small: twice as many refusals name `min_neighbours`, but the cause is
    /// the budget, which is named first (a probe's operator was sent to the
    /// wrong merchants' policies).
    #[test]
    fn a_refusal_of_the_rounds_size_is_named_after_the_refusal_that_caused_it() {
        let refusal = |setting: &str| {
            format!("declined by the merchant's privacy policy (privacy.{setting})")
        };
        let (size, budget) = (refusal("min_neighbours"), refusal("max_epsilon"));
        let attempts: Vec<RoundRecord> = (1..=3)
            .map(|attempt| {
                serde_json::from_value(serde_json::json!({
                    "round": 3, "attempt": attempt, "task_id": format!("r3a{attempt}-train"),
                    "kind": "train", "outcome": "aborted", "base_version": 2,
                    "selected": ["m0", "m1", "m2"], "reported": [], "dropped": [],
                    "rejected": [["m0", size], ["m1", budget], ["m2", size]],
                    "metrics": {}, "examples": 0.0, "started_unix_ms": 0, "duration_ms": 0,
                    "bytes_in": 0,
                }))
                .unwrap()
            })
            .collect();
        let cause = dominant_cause(&attempts);
        assert!(
            cause.starts_with(&format!(
                "most results were refused or withdrawn: `{budget}` (3 of 9; from m1), and \
                 `{size}` (6 of 9; from m0, m2: a round the first refusal left too small)"
            )),
            "{cause}"
        );
    }
}
