//! A secure sum is released over one set of inputs only, across restarts.
//!
//! Unmasking a secure task's sum shows the coordinator the sum of its
//! survivors' updates. Were the same round (the same base version, so the
//! same updates) unmasked again over another survivor set, the difference of
//! the two sums would be the updates of the merchants in one set and not the
//! other: one merchant's update when the sets differ by one. Within one
//! process the engine never retries a task whose sum it saw
//! ([`RunStop::Revealed`](super::RunStop::Revealed)); this module carries
//! the rule across a coordinator restart.
//!
//! Before the first unmask request of a task leaves, the driver calls
//! [`Engine::before_unmask`] with the merchants whose masked inputs are in
//! the sum, and the engine stores them (meta key `unmasking`) with the
//! round, kind and base version. If the task then commits, the marker is
//! moot (the next task works on another base). If it fails with nothing
//! unmasked, the driver says so ([`Engine::nothing_unmasked`]) and the
//! marker goes. Otherwise — the coordinator was killed, shut down or lost its
//! store between the unmask requests and the commit — a restarted engine
//! cannot tell whether the sum was seen, and takes it as seen: the task is
//! retried over exactly the stored merchants (all of them selected, the
//! round waiting until each one is connected), and an attempt whose masked
//! inputs are not exactly theirs is aborted before anything is unmasked.
//! The retried sum is then the one that may have been seen (new masks, the
//! same inputs), and nothing new is revealed.
//!
//! Nothing new about the inputs, that is: with distributed DP each attempt
//! carries fresh noise, so a sum seen before the restart and the retry's are
//! two releases. The restarted engine writes the lost attempt's record
//! ([`record_lost`]: aborted, [`LOST`], with the ledger's accounting of the
//! sum in a DP training round) before anything else, once; and the marker
//! follows each pinned retry whose unmask requests leave, so a retry lost
//! the same way is accounted too.

use std::collections::BTreeSet;

use fedcart_common::task::TaskKind;
use serde::{Deserialize, Serialize};

use super::{Engine, EngineError, RunStop};
use crate::record::{Outcome, PrivacyRecord, RoundRecord};

/// Meta key of the marker.
const KEY: &str = "unmasking";

/// The marker stored before a secure task's unmask requests leave.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(super) struct Unmasking {
    /// The round.
    round: u64,
    /// The task kind (`stats`, `train`).
    kind: TaskKind,
    /// The version the task's inputs were computed from.
    base_version: u64,
    /// The task whose unmask requests were about to leave.
    task_id: String,
    /// The merchants whose masked inputs the sum holds.
    survivors: BTreeSet<String>,
    /// The merchants selected for the task (the DP ledger's denominator;
    /// empty in markers stored before it was kept: taken as `survivors`).
    #[serde(default)]
    selected: Vec<String>,
}

/// A task whose unmask requests left (`marker`) and that has no record in
/// `history`: the coordinator stopped before writing it, and its sum may
/// have been seen. It gets its record now, aborted, with the ledger's
/// accounting of that sum in a DP training round, and counts as an attempt:
/// the retry's release is a second one (fresh noise over the same inputs),
/// and without this record the ε history would count only that one. A
/// marker whose task has a record (it committed, or failed knowingly) is
/// left alone. When the lost attempt is the round's `max_attempts`-th, the
/// run stops with it, in the same store transaction, as an attempt aborted
/// in the running process stops it: a coordinator that dies at every unmask
/// stage retried the round past the limit, one release after another.
pub(super) fn record_lost(
    store: &crate::store::Store,
    history: &[RoundRecord],
    ledger: Option<&mut crate::ledger::Ledger>,
    attempts: &mut std::collections::BTreeMap<(u64, &'static str), u32>,
    max_attempts: u32,
    marker: &Option<Unmasking>,
) -> Result<(), EngineError> {
    let Some(u) = marker else {
        return Ok(());
    };
    if history.iter().any(|r| r.task_id == u.task_id) {
        return Ok(());
    }
    let privacy = match (ledger, u.kind) {
        (Some(l), TaskKind::Train) => Some(
            l.account_seen(u.survivors.len(), u.selected_count())
                .map_err(|e| EngineError::Config(e.to_string()))?,
        ),
        _ => None,
    };
    let count = attempts
        .entry((u.round, crate::record::kind_name(u.kind)))
        .or_insert(0);
    *count += 1;
    let record = u.lost_record(*count, privacy);
    tracing::warn!(task = %record.task_id, epsilon = ?record.privacy.as_ref().map(|p| p.epsilon),
        "the coordinator stopped after this task's unmask requests left; its sum is taken as seen");
    if *count < max_attempts || store.meta_json::<RunStop>("stopped")?.is_some() {
        store.append_history(&record)?;
        return Ok(());
    }
    let stop = super::stop::gave_up(history, &record, *count);
    tracing::error!(task = %record.task_id, "{stop}");
    let json = serde_json::to_value(&stop).expect("serialisable");
    store.append_history_with_meta(&record, &[("stopped", json)])?;
    Ok(())
}

/// The marker, unless its task committed: a committed statistics or
/// evaluation task leaves the version as it was, and a marker kept past its
/// commit named its merchants in the status as those of a sum that may have
/// been unmasked before a restart, for the rest of that version.
pub(super) fn unless_committed(
    marker: Option<Unmasking>,
    history: &[RoundRecord],
) -> Option<Unmasking> {
    marker.filter(|u| {
        !history
            .iter()
            .any(|r| r.task_id == u.task_id && r.outcome == Outcome::Committed)
    })
}

impl Unmasking {
    /// The record of that task when the coordinator stopped before writing
    /// one: aborted, its sum taken as seen (with `privacy`, the ledger's
    /// accounting of it, in a DP training round).
    fn lost_record(&self, attempt: u32, privacy: Option<PrivacyRecord>) -> RoundRecord {
        let selected = if self.selected.is_empty() {
            self.survivors.iter().cloned().collect()
        } else {
            self.selected.clone()
        };
        let dropped = selected
            .iter()
            .filter(|m| !self.survivors.contains(*m))
            .cloned()
            .collect();
        RoundRecord {
            round: self.round,
            attempt,
            task_id: self.task_id.clone(),
            kind: self.kind,
            outcome: Outcome::Aborted,
            base_version: self.base_version,
            selected,
            reported: self.survivors.iter().cloned().collect(),
            dropped,
            rejected: Vec::new(),
            refused: Vec::new(),
            metrics: Default::default(),
            examples: 0.0,
            started_unix_ms: super::unix_ms(),
            duration_ms: 0,
            bytes_in: 0,
            abort_reason: Some(
                if privacy.is_some() {
                    LOST_ACCOUNTED
                } else {
                    LOST
                }
                .to_string(),
            ),
            privacy,
            secagg_clipped: None,
            sampled: false,
            seen_by: None,
        }
    }

    /// The number of merchants selected (see [`Unmasking::selected`]).
    fn selected_count(&self) -> usize {
        if self.selected.is_empty() {
            self.survivors.len()
        } else {
            self.selected.len()
        }
    }
}

/// The abort reason of a task whose coordinator stopped after its unmask
/// requests left and before its record was written.
pub const LOST: &str = "the coordinator stopped after this task's unmask requests left and before \
                        its record was written: its sum is taken as seen and the round is retried \
                        over the same merchants";

/// [`LOST`] of a training round under differential privacy, whose possibly
/// seen sum the ledger accounted (a run without DP read "accounted, with
/// differential privacy" too).
pub const LOST_ACCOUNTED: &str = "the coordinator stopped after this task's unmask requests left \
                                  and before its record was written: its sum is taken as seen \
                                  (and accounted by the privacy ledger) and the round is retried \
                                  over the same merchants";

/// The marker in `store`, if any (a cleared marker is stored as `null`).
pub(super) fn load(store: &crate::store::Store) -> Result<Option<Unmasking>, EngineError> {
    Ok(store.meta_json::<Option<Unmasking>>(KEY)?.flatten())
}

impl Engine {
    /// The merchants a secure task of `kind` at `round` must be run over:
    /// those of a sum that may have been unmasked before a restart (see the
    /// module documentation), when the task works on the same base.
    pub(super) fn pinned(&self, round: u64, kind: TaskKind) -> Option<&BTreeSet<String>> {
        self.unmasking
            .as_ref()
            .filter(|u| u.round == round && u.kind == kind && u.base_version == self.version)
            .map(|u| &u.survivors)
    }

    /// The merchants the next secure task must be run over because its sum
    /// may have been unmasked before a restart (its base is still the
    /// current version), for the operator's status.
    pub fn pinned_merchants(&self) -> Option<&BTreeSet<String>> {
        self.unmasking
            .as_ref()
            .filter(|u| u.base_version == self.version)
            .map(|u| &u.survivors)
    }

    /// Selection of a pinned task: exactly the pinned merchants, once every
    /// one of them is available. A pinned merchant set aside by the run can
    /// never take part again: the run stops instead of waiting for it.
    pub(super) fn select_pinned(
        &mut self,
        round: u64,
        pinned: BTreeSet<String>,
        available: &[String],
    ) -> Result<Vec<String>, EngineError> {
        if let Some(aside) = pinned.iter().find(|m| self.set_aside.contains(*m)) {
            let stop = RunStop::Revealed {
                round,
                task_id: self
                    .unmasking
                    .as_ref()
                    .map_or(String::new(), |u| u.task_id.clone()),
                reason: format!(
                    "its sum may have been unmasked before the coordinator restarted, and \
                     merchant `{aside}`, whose input it held, is now set aside"
                ),
            };
            let json = serde_json::to_value(&stop).expect("serialisable");
            self.store.put_meta_json(&[("stopped", json)])?;
            tracing::error!("{stop}");
            self.stopped = Some(stop.clone());
            return Err(EngineError::Stopped(stop));
        }
        let present: BTreeSet<&String> = available.iter().collect();
        let missing: Vec<&String> = pinned.iter().filter(|m| !present.contains(m)).collect();
        if !missing.is_empty() {
            tracing::warn!(
                round,
                missing = ?missing,
                "the round's secure sum may have been unmasked before the coordinator \
                 restarted: it is retried over exactly the same merchants, and waits for these"
            );
            return Err(EngineError::NotEnoughAgents {
                available: pinned.len() - missing.len(),
                needed: pinned.len(),
            });
        }
        Ok(pinned.into_iter().collect())
    }

    /// The store entry that clears the marker with the commit of
    /// `record`, when the marker is that task's (see [`unless_committed`]).
    pub(super) fn marker_cleared_by(
        &self,
        record: &RoundRecord,
    ) -> Option<(&'static str, serde_json::Value)> {
        self.unmasking
            .as_ref()
            .filter(|u| u.task_id == record.task_id)
            .map(|_| (KEY, serde_json::Value::Null))
    }

    /// Called by a driver before the first unmask request of the open
    /// secure task leaves, with the merchants whose masked inputs the sum
    /// holds. Stores them durably; refuses (the task must then abort,
    /// nothing unmasked) when the task is pinned to another set or the
    /// store cannot keep the marker.
    pub fn before_unmask(&mut self, survivors: &BTreeSet<String>) -> Result<(), String> {
        let Some(open) = &mut self.open else {
            return Err("no task is open".into());
        };
        let (round, kind, base_version) = (
            open.plan.round,
            open.plan.spec.kind,
            open.plan.model_version,
        );
        let task_id = open.plan.task_id.clone();
        let selected = open.plan.selected.clone();
        if let Some(pinned) = self
            .unmasking
            .as_ref()
            .filter(|u| u.round == round && u.kind == kind && u.base_version == base_version)
        {
            if &pinned.survivors == survivors {
                // The marker now names this attempt: were the coordinator
                // to stop again before its record, a restart accounts this
                // release too (the agents' noise is fresh each attempt).
                // It stays unmarked, so a failure keeps the pin.
                let mut marker = pinned.clone();
                marker.task_id = task_id;
                marker.selected = selected;
                let json = serde_json::to_value(&marker).expect("serialisable");
                self.store.put_meta_json(&[(KEY, json)]).map_err(|e| {
                    format!(
                        "the survivors could not be stored before unmasking ({e}): aborted \
                         before unmasking, nothing was revealed"
                    )
                })?;
                self.unmasking = Some(marker);
                return Ok(());
            }
            let pinned = &pinned.survivors;
            let missing: Vec<&String> = pinned.difference(survivors).collect();
            let extra: Vec<&String> = survivors.difference(pinned).collect();
            return Err(format!(
                "the round's sum may have been unmasked over {} merchants before the coordinator \
                 restarted; this attempt's masked inputs differ (missing {missing:?}, extra \
                 {extra:?}): aborted before unmasking, nothing was revealed",
                pinned.len()
            ));
        }
        let marker = Unmasking {
            round,
            kind,
            base_version,
            task_id,
            survivors: survivors.clone(),
            selected,
        };
        let json = serde_json::to_value(&marker).expect("serialisable");
        self.store.put_meta_json(&[(KEY, json)]).map_err(|e| {
            format!(
                "the survivors could not be stored before unmasking ({e}): aborted before \
                 unmasking, nothing was revealed"
            )
        })?;
        open.marked = true;
        self.unmasking = Some(marker);
        Ok(())
    }

    /// Called by a driver when the open secure task's unmasking failed with
    /// no sum recovered: the marker it stored goes, and the retry selects
    /// freely. A task pinned by an earlier process keeps the pin (that
    /// attempt's sum may have been seen), and if the store cannot clear the
    /// marker the retry stays pinned too (the safe side).
    pub fn nothing_unmasked(&mut self) {
        if !self.open.as_ref().is_some_and(|o| o.marked) {
            return;
        }
        match self.store.put_meta_json(&[(KEY, serde_json::Value::Null)]) {
            Ok(()) => self.unmasking = None,
            Err(e) => {
                tracing::warn!(error = %e, "the unmask marker could not be cleared: the retry keeps its merchants");
            }
        }
    }
}

/// Whether `record` is the record [`record_lost`] wrote for a task the
/// coordinator stopped during: written at the restart, with its survivors as
/// reporting, so neither its time nor its reports are anyone's contact.
pub(crate) fn is_lost(record: &RoundRecord) -> bool {
    record
        .abort_reason
        .as_deref()
        .is_some_and(|a| a == LOST || a == LOST_ACCOUNTED)
}
