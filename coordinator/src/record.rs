//! What the coordinator remembers about each round attempt.

use std::collections::BTreeMap;

use fedcart_common::task::TaskKind;
use serde::{Deserialize, Serialize};

use crate::config::DpMode;

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
    /// Statistics, training or evaluation (stored as `stats`, `train` or
    /// `evaluate`, as when this field was a string).
    pub kind: TaskKind,
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
    /// Rejected submissions, and tasks merchants left (declined by their
    /// privacy policy, failed locally): agent and reason.
    pub rejected: Vec<(String, String)>,
    /// Of those, the merchants whose update the coordinator refused
    /// (malformed, non-finite, out of range); a merchant that left the task
    /// sent none. Empty in records written before it was kept.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refused: Vec<String>,
    /// The agents' reported metrics pooled, each weighted by the rows it
    /// is a mean over: validation figures (`val_*`) by the agents'
    /// validation rows, the others by their example weight
    /// (`fedcart_common::metrics::PooledMean`).
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
    pub privacy: Option<PrivacyRecord>,
    /// Secure aggregation of a committed task: how much of the sum its clip
    /// cut (a sum, like everything else the service learns of a secure task).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secagg_clipped: Option<ClippedRecord>,
    /// An evaluation that reached a sample of the available merchants, not
    /// every one: if the run ends serving its version, that version is
    /// handed out once more, to every merchant. Absent (false) in records
    /// written before it existed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sampled: bool,
    /// Set only on the copy a merchant's `status` gets ([`Self::seen_by`]):
    /// the merchant it was cut for. Never stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seen_by: Option<String>,
}

impl RoundRecord {
    /// The record as merchant `id` may see it: the task, its outcome and
    /// itself in the lists of selected, reported, dropped and rejected
    /// agents; no other merchant's id or fate, and none of the federation's
    /// figures. The pooled metrics, example count and bytes are the
    /// operator's: in a round of two, a merchant would subtract its own
    /// share and read the other's AUC, or its number of customers. An abort
    /// reason that names another merchant is replaced.
    pub fn seen_by(mut self, id: &str) -> Self {
        let others: std::collections::BTreeSet<String> = self
            .selected
            .iter()
            .chain(&self.reported)
            .chain(&self.dropped)
            .chain(self.rejected.iter().map(|(m, _)| m))
            .filter(|m| *m != id)
            .cloned()
            .collect();
        for list in [&mut self.selected, &mut self.reported, &mut self.dropped] {
            list.retain(|m| m == id);
        }
        self.rejected.retain(|(m, _)| m == id);
        self.metrics.clear();
        self.examples = 0.0;
        self.bytes_in = 0;
        if let Some(reason) = &self.abort_reason {
            // Any occurrence, not whole words: ids hold `@` and `.`, which
            // a split on punctuation cut (`x@acme`, `shop.` went through).
            // Redacting a reason too many is the safe side.
            let names_another = others.iter().any(|m| reason.contains(m.as_str()));
            if names_another {
                self.abort_reason = Some(
                    "aborted for a cause that names other merchants: the operator's `status` \
                     shows it"
                        .into(),
                );
            }
        }
        self.seen_by = Some(id.to_string());
        self
    }

    /// Makes every number of the record storable: JSON has no NaN or ∞
    /// (serde writes `null`, which the record cannot be read back from), so
    /// a non-finite metric is dropped, any other NaN is replaced by 0 and
    /// an infinity by ±`f64::MAX`. Returns what was changed, for a warning.
    /// Submissions are checked before they are folded in; this is the last
    /// line, so that no figure can make a stored history unreadable.
    pub fn make_storable(&mut self) -> Vec<String> {
        let mut changed = Vec::new();
        self.metrics.retain(|k, v| {
            let keep = v.is_finite();
            if !keep {
                changed.push(format!("metric `{k}` = {v} dropped"));
            }
            keep
        });
        let mut clamp = |name: &str, v: &mut f64| {
            if !v.is_finite() {
                let (stored, shown) = if v.is_nan() {
                    (0.0, "0")
                } else if *v > 0.0 {
                    (f64::MAX, "f64::MAX")
                } else {
                    (-f64::MAX, "-f64::MAX")
                };
                changed.push(format!("`{name}` = {v} stored as {shown}"));
                *v = stored;
            }
        };
        clamp("examples", &mut self.examples);
        if let Some(p) = &mut self.privacy {
            clamp("privacy.sampling_rate", &mut p.sampling_rate);
            clamp("privacy.noise_multiplier", &mut p.noise_multiplier);
            clamp("privacy.clip", &mut p.clip);
            clamp("privacy.next_clip", &mut p.next_clip);
            clamp("privacy.epsilon", &mut p.epsilon);
            clamp("privacy.delta", &mut p.delta);
            if let Some(u) = &mut p.unclipped_fraction {
                clamp("privacy.unclipped_fraction", u);
            }
        }
        if let Some(c) = &mut self.secagg_clipped {
            clamp("secagg_clipped.fraction", &mut c.fraction);
        }
        changed
    }
}

/// The coordinates secure aggregation clipped in one task, over every
/// survivor: each value beyond `run.secagg.clip` is cut to it before
/// encoding, so a clip too low for the updates distorts the sum without
/// failing the round.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ClippedRecord {
    /// Coordinates clipped, summed over the survivors.
    pub coordinates: u64,
    /// Their fraction of every coordinate the survivors encoded.
    pub fraction: f64,
}

impl ClippedRecord {
    /// The operator's warning when the clip distorted the sum
    /// ([`secagg::clipping_warning`](fedcart_common::privacy::secagg::clipping_warning)).
    pub fn warning(&self) -> Option<String> {
        fedcart_common::privacy::secagg::clipping_warning(self.fraction, "`run.secagg.clip`")
    }
}

/// What the ledger recorded about one committed training round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrivacyRecord {
    /// Who added the noise.
    pub mode: DpMode,
    /// Sampling rate the round was accounted at: 1, since the selection is
    /// public (records before this rule hold selected / connected).
    pub sampling_rate: f64,
    /// The noise multiplier the round was accounted at (in distributed mode,
    /// lowered by dropouts: `z·√(survivors / selected)`).
    pub noise_multiplier: f64,
    /// The clip norm of the round.
    pub clip: f64,
    /// The fixed denominator (merchants selected).
    pub denominator: usize,
    /// Adaptive clipping: the noised fraction of merchants not clipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unclipped_fraction: Option<f64>,
    /// The clip norm of the next round.
    pub next_clip: f64,
    /// ε of the whole run so far, at `delta`.
    pub epsilon: f64,
    /// δ of the guarantee.
    pub delta: f64,
    /// Rounds composed so far.
    pub steps: u64,
}

/// The short name of a task kind: the suffix of task ids (`r3a1-train`), the
/// `kind` of stored records and the metrics' `kind` label.
pub fn kind_name(kind: TaskKind) -> &'static str {
    match kind {
        TaskKind::Stats => "stats",
        TaskKind::Train => "train",
        TaskKind::Evaluate => "evaluate",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A training record as the store wrote it while `kind` was a `String`.
    const OLD_TRAIN: &str = r#"{"round":3,"attempt":2,"task_id":"r3a2-train","kind":"train","outcome":"committed","base_version":2,"selected":["a","b"],"reported":["a","b"],"dropped":[],"rejected":[["c","agent `c` was not selected for this task"]],"metrics":{"loss":0.5},"examples":10.0,"started_unix_ms":1700000000000,"duration_ms":12,"bytes_in":64,"abort_reason":null}"#;

    #[test]
    fn record_written_with_string_kind_decodes_and_reencodes_unchanged() {
        let r: RoundRecord = serde_json::from_str(OLD_TRAIN).expect("old record decodes");
        assert_eq!(r.kind, TaskKind::Train);
        assert_eq!(r.outcome, Outcome::Committed);
        assert_eq!(serde_json::to_string(&r).expect("encodes"), OLD_TRAIN);
    }

    /// A merchant's copy of a record keeps an abort reason only when it
    /// names no other merchant of the round: ids with `@` or a trailing
    /// `.` went through the word split that decided it.
    #[test]
    fn a_merchants_copy_hides_any_abort_reason_naming_another_merchant() {
        for other in ["x@acme", "shop.", "m1"] {
            let mut r: RoundRecord = serde_json::from_str(OLD_TRAIN).unwrap();
            r.selected = vec!["m0".into(), other.into()];
            r.abort_reason = Some(format!("secure aggregation: shares from {other} missing"));
            let mine = r.seen_by("m0");
            let reason = mine.abort_reason.unwrap();
            assert!(!reason.contains(other), "{other}: {reason}");
            assert!(reason.contains("operator's `status`"), "{reason}");
        }
        let mut r: RoundRecord = serde_json::from_str(OLD_TRAIN).unwrap();
        r.abort_reason = Some("1 results, quorum is 2".into());
        assert_eq!(
            r.seen_by("a").abort_reason.as_deref(),
            Some("1 results, quorum is 2")
        );
    }

    #[test]
    fn every_kind_is_stored_under_its_old_name() {
        for kind in [TaskKind::Stats, TaskKind::Train, TaskKind::Evaluate] {
            let json = serde_json::to_value(kind).expect("encodes");
            assert_eq!(json, kind_name(kind));
            let old = OLD_TRAIN.replace(
                "\"kind\":\"train\"",
                &format!("\"kind\":\"{}\"", kind_name(kind)),
            );
            let r: RoundRecord = serde_json::from_str(&old).expect("decodes");
            assert_eq!(r.kind, kind);
        }
    }

    #[test]
    fn a_record_with_non_finite_figures_is_stored_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open_scratch(&dir.path().join("r.redb")).unwrap();
        let record = RoundRecord {
            round: 1,
            attempt: 1,
            task_id: "r1a1-evaluate".into(),
            kind: TaskKind::Evaluate,
            outcome: Outcome::Committed,
            base_version: 1,
            selected: vec!["m0".into()],
            reported: vec!["m0".into()],
            dropped: vec![],
            rejected: vec![],
            refused: vec![],
            metrics: [("pr_auc", f64::INFINITY), ("auc", 0.75), ("loss", f64::NAN)]
                .map(|(k, v)| (k.to_string(), v))
                .into(),
            examples: f64::INFINITY,
            started_unix_ms: 0,
            duration_ms: 0,
            bytes_in: 0,
            abort_reason: None,
            privacy: None,
            secagg_clipped: None,
            sampled: false,
            seen_by: None,
        };
        store.append_history(&record).unwrap();
        let back = store.history().unwrap().pop().unwrap();
        assert_eq!(back.metrics.len(), 1);
        assert_eq!(back.metrics["auc"], 0.75);
        assert_eq!(back.examples, f64::MAX);
    }

    /// What `Status` reads of the history without decoding all of it: the
    /// records appended since a key, and the last one.
    #[test]
    fn the_history_reads_from_a_key_and_its_last_record_alone() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open_scratch(&dir.path().join("r.redb")).unwrap();
        assert!(store.last_history().unwrap().is_none());
        assert!(store.history_from(0).unwrap().is_empty());
        for round in 1..=3 {
            let mut r: RoundRecord = serde_json::from_str(OLD_TRAIN).unwrap();
            r.round = round;
            r.selected = vec![format!("m{round}")];
            store.append_history(&r).unwrap();
        }
        let all = store.history().unwrap();
        let from = store.history_from(0).unwrap();
        assert_eq!(from.iter().map(|(_, r)| r.clone()).collect::<Vec<_>>(), all);
        let after_first = store.history_from(from[0].0 + 1).unwrap();
        assert_eq!(
            after_first.iter().map(|(_, r)| r.round).collect::<Vec<_>>(),
            [2, 3]
        );
        assert_eq!(store.last_history().unwrap().unwrap().round, 3);
    }

    /// The warning says what each figure was stored as: 0 for a NaN,
    /// ±f64::MAX for an infinity (it said "±f64::MAX" for a NaN too).
    #[test]
    fn the_warning_names_the_value_each_figure_was_stored_as() {
        let mut r: RoundRecord = serde_json::from_str(OLD_TRAIN).unwrap();
        r.examples = f64::NAN;
        r.metrics.insert("auc".into(), f64::NEG_INFINITY);
        r.secagg_clipped = Some(ClippedRecord {
            coordinates: 1,
            fraction: f64::NEG_INFINITY,
        });
        let changed = r.make_storable();
        assert_eq!(
            changed,
            [
                "metric `auc` = -inf dropped",
                "`examples` = NaN stored as 0",
                "`secagg_clipped.fraction` = -inf stored as -f64::MAX",
            ]
        );
        assert_eq!(r.examples, 0.0);
        assert_eq!(r.secagg_clipped.unwrap().fraction, -f64::MAX);
    }
}
