//! The merchant's own privacy budget (`privacy.max_epsilon` in
//! `merchant.toml`): a ledger, kept in the agent's state directory, of every
//! training round this agent sent a differentially private update in, over
//! every run of every coordinator it ever worked for.
//!
//! The coordinator keeps a ledger of each run, but the coordinator is the
//! party the budget protects against: it decides how many rounds a run has,
//! how many runs there are, and which agents each round takes. A curious
//! coordinator that wants more of a merchant than one run's ε only has to
//! run more rounds or start another run. This ledger is the merchant's own
//! count, which the coordinator cannot reset, and the agent refuses any
//! round that would take it past `max_epsilon` before its update leaves.
//!
//! # What is charged
//!
//! Only distributed noise can be counted here: central noise is added on
//! the coordinator, out of the agent's sight, so with a budget set a
//! training task without agent-side noise is refused (its ε, from where the
//! merchant stands, is unbounded). Each round in which this agent sends its
//! masked input costs one Gaussian step at sampling rate 1 (the agent
//! cannot verify the coordinator's sampling, and knows it was picked) with
//! noise multiplier `z·√(min(n, m)/m)`: the task's `z`, split across `m`
//! planned survivors, in a round of `n` agents. That is the noise the sum
//! carries when at least `min(n, m)` agents' shares reach it, the premise
//! of distributed DP; a round of fewer agents than planned is charged at
//! its lower multiplier. The charge is written (fsync, rename) *before* the
//! masked input is built, so a crash after sending never forgets a round;
//! a round that fails after the charge stays charged. The unmask request
//! then names the sum's survivors `s` (agents that dropped after the roster
//! add no noise): before revealing a share the agent charges the round
//! again at `z·√(min(s, m)/m)` when that is lower ([`Budget::settle`]).
//! The count is signed by the survivors only under `verify_survivors`; a
//! coordinator that deviates from the protocol, or never asks this agent,
//! can still leave the ledger at the first charge.
//!
//! Evaluation metrics, the churn models' feature statistics and the
//! analyses' (segments, rules) exchanges are not differentially private and
//! are not charged; the coordinator's ledger does not count them either.
//!
//! The ledger keeps Rényi DP per order ([`Accountant`]), so ε is recomputed
//! at whatever δ the policy names, and a changed δ needs no migration.
//!
//! Each run's charged rounds are also kept in that run's own directory
//! ([`RUN_RECORD`], written before the ledger): a ledger deleted or
//! restored from an older backup beside them is completed from them when
//! it is opened ([`Budget::restored`] says what was taken back), instead of
//! starting a fresh budget with the rounds already sent forgotten.

use std::path::PathBuf;

use fedcart_common::privacy::dp::Accountant;
use fedcart_common::privacy::dp::distributed::DistributedNoise;
use serde::{Deserialize, Serialize};

use crate::policy::PolicyViolation;
use crate::state::{StateDir, StateError};

/// The ledger's file in the agent's state directory.
pub const LEDGER_FILE: &str = "privacy-ledger.json";

/// Each run's own record of its charged rounds, in `runs/<run>/`.
pub const RUN_RECORD: &str = "privacy-rounds.json";

/// One charged round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Spent {
    /// The run.
    pub run_id: String,
    /// The round (model version it trained towards).
    pub round: u64,
    /// The task.
    pub task_id: String,
    /// The noise multiplier the round was charged at.
    pub noise_multiplier: f64,
    /// When it was charged (Unix milliseconds).
    pub at_unix_ms: u64,
}

/// The ledger as stored: the composed RDP and every charged round.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Ledger {
    accountant: Accountant,
    rounds: Vec<Spent>,
}

impl Ledger {
    /// Composes the accountant again from the rounds, at its orders; the
    /// multiplier it cannot take, if one is not a positive number.
    fn recompose(&mut self) -> Result<(), f64> {
        let mut acc =
            Accountant::with_orders(self.accountant.orders().to_vec()).unwrap_or_default();
        for r in &self.rounds {
            acc.step(1.0, r.noise_multiplier)
                .map_err(|_| r.noise_multiplier)?;
        }
        self.accountant = acc;
        Ok(())
    }
}

/// The budget: `max_epsilon` at `delta` against the stored ledger.
#[derive(Debug, Clone)]
pub struct Budget {
    state: StateDir,
    max_epsilon: f64,
    delta: f64,
    ledger: Ledger,
    /// What the runs' own records added to the ledger as read, if anything.
    restored: Option<String>,
}

/// Why a charge could not be made: over the budget, or the ledger could not
/// be written (then nothing may be sent either).
#[derive(Debug, thiserror::Error)]
pub enum ChargeError {
    /// The round would take the ledger past `max_epsilon`.
    #[error(transparent)]
    Over(#[from] PolicyViolation),
    /// The ledger could not be written.
    #[error("recording the round in the privacy ledger")]
    State(#[source] StateError),
    /// The round's noise multiplier is not a positive number.
    #[error("the round's noise multiplier {0} is not a positive number")]
    Noise(f64),
}

impl Budget {
    /// Opens the ledger in `state` (empty when the file does not exist),
    /// completed from the runs' own records ([`RUN_RECORD`]): a round they
    /// hold and the ledger does not is taken back, and one they hold at a
    /// lower noise multiplier is charged at it ([`Budget::restored`] says
    /// which; the next charge writes the completed ledger). A ledger or a
    /// record that does not decode is an error naming the file, never a
    /// fresh start: that would reset the budget.
    pub fn open(state: StateDir, max_epsilon: f64, delta: f64) -> Result<Self, StateError> {
        let mut ledger = state.read_json::<Ledger>(LEDGER_FILE)?.unwrap_or_default();
        let mut taken = Vec::new();
        for recorded in run_records(&state)? {
            let same = |r: &Spent| {
                r.run_id == recorded.run_id
                    && r.round == recorded.round
                    && r.task_id == recorded.task_id
            };
            match ledger.rounds.iter_mut().find(|r| same(r)) {
                Some(r) if r.noise_multiplier <= recorded.noise_multiplier => {}
                Some(r) => {
                    r.noise_multiplier = recorded.noise_multiplier;
                    taken.push(recorded.run_id.clone());
                }
                None => {
                    taken.push(recorded.run_id.clone());
                    ledger.rounds.push(recorded);
                }
            }
        }
        let mut restored = None;
        if !taken.is_empty() {
            ledger.rounds.sort_by_key(|r| r.at_unix_ms);
            // Recorded multipliers were checked positive and finite.
            let _ = ledger.recompose();
            let rounds = taken.len();
            taken.sort();
            taken.dedup();
            restored = Some(format!(
                "the privacy ledger {} lacked {} round{} that the runs' own records hold (runs \
                 {}): taken back from them, ε {:.3} spent at δ = {:e} over {} rounds (a deleted \
                 or older ledger does not reset the budget)",
                state.path().join(LEDGER_FILE).display(),
                rounds,
                if rounds == 1 { "" } else { "s" },
                taken.join(", "),
                epsilon(&ledger.accountant, delta),
                delta,
                ledger.rounds.len()
            ));
        }
        Ok(Self {
            state,
            max_epsilon,
            delta,
            ledger,
            restored,
        })
    }

    /// What [`Budget::open`] took back from the runs' own records into a
    /// ledger that lacked it, as one sentence for a warning.
    pub fn restored(&self) -> Option<&str> {
        self.restored.as_deref()
    }

    /// Writes `next` durably: the run's own record of its rounds first,
    /// then the ledger.
    fn write(&self, next: &Ledger, run_id: &str) -> Result<(), StateError> {
        let of_run: Vec<&Spent> = next.rounds.iter().filter(|r| r.run_id == run_id).collect();
        self.state.run(run_id)?.write_json(RUN_RECORD, &of_run)?;
        self.state.write_json(LEDGER_FILE, next)
    }

    /// The ledger's path.
    pub fn path(&self) -> PathBuf {
        self.state.path().join(LEDGER_FILE)
    }

    /// ε spent so far at the policy's δ (0 before any round).
    pub fn spent(&self) -> f64 {
        epsilon(&self.ledger.accountant, self.delta)
    }

    /// The charged rounds, oldest first.
    pub fn rounds(&self) -> &[Spent] {
        &self.ledger.rounds
    }

    /// The policy's cap and δ.
    pub fn limit(&self) -> (f64, f64) {
        (self.max_epsilon, self.delta)
    }

    /// ε after one more round at `noise_multiplier` (∞ for a multiplier
    /// that is not a positive number).
    pub fn after(&self, noise_multiplier: f64) -> f64 {
        let mut acc = self.ledger.accountant.clone();
        match acc.step(1.0, noise_multiplier) {
            Ok(()) => epsilon(&acc, self.delta),
            Err(_) => f64::INFINITY,
        }
    }

    /// Refuses a round at `noise_multiplier` that would take the ledger past
    /// the cap.
    pub fn check(&self, noise_multiplier: f64) -> Result<(), PolicyViolation> {
        let after = self.after(noise_multiplier);
        if after <= self.max_epsilon {
            return Ok(());
        }
        Err(PolicyViolation {
            setting: "max_epsilon",
            task: format!(
                "one more round at z = {noise_multiplier:.4}, which would bring this merchant's ε to \
                 {after:.3} ({:.3} spent over {} rounds, ledger {})",
                self.spent(),
                self.ledger.rounds.len(),
                self.path().display()
            ),
            policy: format!("ε <= {} at δ = {:e}", self.max_epsilon, self.delta),
        })
    }

    /// Checks and records one round, durably, before its update may leave.
    /// Returns ε after it.
    pub fn charge(&mut self, spent: Spent) -> Result<f64, ChargeError> {
        let z = spent.noise_multiplier;
        if !(z.is_finite() && z > 0.0) {
            return Err(ChargeError::Noise(z));
        }
        self.check(z)?;
        let mut next = self.ledger.clone();
        next.accountant
            .step(1.0, z)
            .map_err(|_| ChargeError::Noise(z))?;
        let run_id = spent.run_id.clone();
        next.rounds.push(spent);
        self.write(&next, &run_id).map_err(ChargeError::State)?;
        self.ledger = next;
        self.restored = None;
        Ok(self.spent())
    }
}

impl Budget {
    /// Re-charges a round already charged once its survivors are known: a
    /// sum of fewer noise shares than planned carries less noise, so the
    /// round's entry drops to `noise_multiplier` when that is lower (never
    /// higher: the first charge stays the floor), and the accountant is
    /// composed again from the entries. A round with no entry is charged
    /// now. Written durably before the agent answers; returns ε after it,
    /// `None` when nothing changed. The cap is not checked: the masked input
    /// has left, so the round is spent whatever the agent does next.
    pub fn settle(&mut self, spent: Spent) -> Result<Option<f64>, ChargeError> {
        let z = spent.noise_multiplier;
        if !(z.is_finite() && z > 0.0) {
            return Err(ChargeError::Noise(z));
        }
        let run_id = spent.run_id.clone();
        let mut next = self.ledger.clone();
        let same = |r: &Spent| {
            r.run_id == spent.run_id && r.round == spent.round && r.task_id == spent.task_id
        };
        match next.rounds.iter_mut().rev().find(|r| same(r)) {
            Some(r) if r.noise_multiplier <= z => return Ok(None),
            Some(r) => r.noise_multiplier = z,
            None => next.rounds.push(spent),
        }
        next.recompose().map_err(ChargeError::Noise)?;
        self.write(&next, &run_id).map_err(ChargeError::State)?;
        self.ledger = next;
        self.restored = None;
        Ok(Some(self.spent()))
    }
}

impl Budget {
    /// What `fedcart-client budget` prints: ε spent against the cap, then
    /// one line per run (its rounds and the ε of those rounds alone).
    pub fn report(&self) -> String {
        let of = if self.max_epsilon.is_finite() {
            format!(" of {}", self.max_epsilon)
        } else {
            String::new()
        };
        let mut out = format!(
            "privacy budget: ε {:.3}{of} spent at δ = {:e} over {} rounds (ledger {}{})\n",
            self.spent(),
            self.delta,
            self.ledger.rounds.len(),
            self.path().display(),
            if self.path().exists() {
                ""
            } else {
                ": no such file yet"
            }
        );
        // A cap lowered below what was spent read like any other figure.
        if self.max_epsilon.is_finite() && self.spent() >= self.max_epsilon {
            out.push_str(
                "the budget is spent: every further round with noise is refused (a higher \
                 `privacy.max_epsilon` would allow more, at the merchant's choice)\n",
            );
        }
        let mut runs: std::collections::BTreeMap<&str, Accountant> = Default::default();
        for r in &self.ledger.rounds {
            // Charged multipliers were checked positive and finite.
            let _ = runs
                .entry(&r.run_id)
                .or_default()
                .step(1.0, r.noise_multiplier);
        }
        if !runs.is_empty() {
            out.push_str("run\trounds\tε of its rounds alone\n");
        }
        for (run, acc) in runs {
            out.push_str(&format!(
                "{run}\t{}\t{:.3}\n",
                acc.steps(),
                epsilon(&acc, self.delta)
            ));
        }
        out
    }
}

/// What `fedcart-client budget` prints, and a warning for standard error:
/// the ledger's report; without a cap, the ledger kept while there was one
/// (it was said to be none), with a line saying so; `None` without a cap
/// and without a ledger. The warning: no ledger, yet the state directory
/// holds runs the agent took part in (a deleted ledger read as nothing
/// spent).
pub fn command_report(
    state: StateDir,
    max_epsilon: Option<f64>,
    delta: f64,
) -> Result<Option<(String, Option<String>)>, StateError> {
    let kept = state.path().join(LEDGER_FILE).exists();
    // The runs' own records of charged rounds count without the ledger (it
    // read as none without a cap, though they hold its rounds; found by an
    // operator probe).
    let recorded = std::fs::read_dir(state.path().join("runs")).is_ok_and(|runs| {
        runs.flatten()
            .any(|run| run.path().join(RUN_RECORD).is_file())
    });
    let cap = match max_epsilon {
        Some(cap) => cap,
        None if kept || recorded => f64::INFINITY,
        None => return Ok(None),
    };
    let budget = Budget::open(state.clone(), cap, delta)?;
    let mut text = String::new();
    if max_epsilon.is_none() {
        text.push_str(
            "no `privacy.max_epsilon` now, so rounds are neither checked nor charged; the ledger \
             kept while it was set:\n",
        );
    }
    text.push_str(&budget.report());
    let runs = state.path().join("runs");
    let worked = std::fs::read_dir(&runs).is_ok_and(|mut d| d.next().is_some());
    let warning = match budget.restored() {
        Some(taken) => Some(taken.to_string()),
        None => (!kept && worked).then(|| {
            format!(
                "{} does not exist, yet {} holds runs this agent took part in. If \
                 `privacy.max_epsilon` was not set during them, nothing was charged then and \
                 their ε is not counted now (only rounds from now on are). If the ledger was \
                 deleted, and those runs were before this agent kept their own records of the \
                 rounds it was charged, the ε spent then is forgotten: restore the ledger from a \
                 backup",
                budget.path().display(),
                runs.display()
            )
        }),
    };
    Ok(Some((text, warning)))
}

/// Every run's own record of its charged rounds ([`RUN_RECORD`]), in the
/// order of the runs' directory names.
fn run_records(state: &StateDir) -> Result<Vec<Spent>, StateError> {
    let runs = state.path().join("runs");
    let Ok(dir) = std::fs::read_dir(&runs) else {
        return Ok(Vec::new());
    };
    let mut names: Vec<String> = dir
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join(RUN_RECORD).is_file())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    let mut all = Vec::new();
    for name in names {
        let run = StateDir::open(runs.join(&name))?;
        all.extend(run.read_json::<Vec<Spent>>(RUN_RECORD)?.unwrap_or_default());
    }
    Ok(all)
}

fn epsilon(acc: &Accountant, delta: f64) -> f64 {
    if acc.steps() == 0 {
        return 0.0;
    }
    acc.epsilon(delta).map_or(f64::INFINITY, |r| r.epsilon)
}

/// The multiplier a distributed-DP round is charged at: the release's
/// ([`DistributedNoise::release_noise_multiplier`], the clip-bit count's
/// noise included with adaptive clipping) with the noise of `agents` of the
/// planned survivors in the sum, at most all of them.
pub fn round_noise_multiplier(noise: &DistributedNoise, clip_bit: bool, agents: usize) -> f64 {
    noise.release_noise_multiplier(agents.min(noise.skellam.min_survivors.max(1)), clip_bit)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedcart_common::privacy::dp::accountant::epsilon_for;

    fn spent(round: u64, z: f64) -> Spent {
        Spent {
            run_id: "r".into(),
            round,
            task_id: format!("r{round}a1-train"),
            noise_multiplier: z,
            at_unix_ms: 0,
        }
    }

    #[test]
    fn rounds_compose_as_full_participation_gaussian_steps_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        let one = epsilon_for(1.0, 2.0, 1, 1e-5).unwrap().epsilon;
        let three = epsilon_for(1.0, 2.0, 3, 1e-5).unwrap().epsilon;
        let four = epsilon_for(1.0, 2.0, 4, 1e-5).unwrap().epsilon;
        let cap = (three + four) / 2.0;
        let mut b = Budget::open(state.clone(), cap, 1e-5).unwrap();
        assert_eq!(b.spent(), 0.0);
        assert!((b.charge(spent(1, 2.0)).unwrap() - one).abs() < 1e-9);
        b.charge(spent(2, 2.0)).unwrap();
        // The agent restarts: the ledger is read back, not started afresh.
        let mut b = Budget::open(state.clone(), cap, 1e-5).unwrap();
        assert!((b.charge(spent(3, 2.0)).unwrap() - three).abs() < 1e-9);
        let refused = b.charge(spent(4, 2.0)).unwrap_err();
        let text = refused.to_string();
        assert!(
            matches!(refused, ChargeError::Over(_))
                && text.contains("privacy.max_epsilon")
                && text.contains(&format!("{four:.3}"))
                && text.contains("over 3 rounds")
                && text.contains(LEDGER_FILE),
            "{text}"
        );
        let b = Budget::open(state, cap, 1e-5).unwrap();
        assert_eq!(b.rounds().len(), 3, "a refused round is not recorded");
        let report = b.report();
        assert!(
            report.starts_with(&format!(
                "privacy budget: ε {three:.3} of {cap} spent at δ = 1e-5 over 3 rounds"
            )) && report.contains(&format!("\nr\t3\t{three:.3}\n")),
            "{report}"
        );
        assert_eq!(b.rounds()[2], spent(3, 2.0));
        // More noise per round costs less: the same cap holds more rounds.
        assert!(b.check(20.0).is_ok());
        // `budget` without the cap shows the ledger kept (it said there
        // was none), and says the cap is gone.
        let (text, warning) = command_report(b.state.clone(), None, 1e-5)
            .unwrap()
            .unwrap();
        assert!(
            text.starts_with("no `privacy.max_epsilon` now")
                && text.contains(&format!(
                    "privacy budget: ε {three:.3} spent at δ = 1e-5 over 3 rounds"
                )),
            "{text}"
        );
        assert_eq!(warning, None);
    }

    /// A ledger deleted beside the runs it charged read as nothing spent,
    /// naming a file that does not exist: now said, with a warning.
    #[test]
    fn a_missing_ledger_beside_past_runs_is_warned_about() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        assert!(command_report(state.clone(), None, 1e-5).unwrap().is_none());
        let (text, warning) = command_report(state.clone(), Some(4.0), 1e-5)
            .unwrap()
            .unwrap();
        assert!(text.contains(": no such file yet"), "{text}");
        assert_eq!(warning, None, "a fresh agent has nothing to warn about");
        std::fs::create_dir_all(dir.path().join("runs").join("churn-dp")).unwrap();
        let (_, warning) = command_report(state, Some(4.0), 1e-5).unwrap().unwrap();
        assert!(
            warning
                .as_ref()
                .is_some_and(|w| w.contains("the ε spent then is forgotten")
                    && w.contains(
                        "If `privacy.max_epsilon` was not set during them, nothing was \
                               charged then"
                    )),
            "a ledger gone beside past runs"
        );
    }

    /// Deleting the ledger (or restoring an older backup) beside the runs
    /// it charged started a fresh budget: an agent with a cap of 8 sent
    /// rounds worth ε 10.7. Each run keeps its own record of its rounds, and
    /// the ledger is completed from them, at their lower multipliers.
    #[test]
    fn a_deleted_or_older_ledger_is_completed_from_the_runs_own_records() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        let mut b = Budget::open(state.clone(), 100.0, 1e-5).unwrap();
        assert_eq!(b.restored(), None);
        b.charge(spent(1, 2.0)).unwrap();
        let older = std::fs::read(dir.path().join(LEDGER_FILE)).unwrap();
        b.charge(spent(2, 2.0)).unwrap();
        b.settle(spent(2, 1.0)).unwrap();
        let mut other = spent(1, 3.0);
        other.run_id = "r2".into();
        other.task_id = "r2-t1".into();
        b.charge(other).unwrap();
        let whole = b.spent();
        let run = dir.path().join("runs").join("r").join(RUN_RECORD);
        assert!(run.is_file(), "each run keeps its own record");
        // Deleted: every round comes back, and the cap holds.
        std::fs::remove_file(dir.path().join(LEDGER_FILE)).unwrap();
        let b = Budget::open(state.clone(), 100.0, 1e-5).unwrap();
        assert!((b.spent() - whole).abs() < 1e-9, "{} vs {whole}", b.spent());
        assert_eq!(b.rounds().len(), 3);
        let taken = b.restored().unwrap();
        assert!(
            taken.contains("lacked 3 rounds that the runs' own records hold (runs r, r2)"),
            "{taken}"
        );
        let (_, warning) = command_report(state.clone(), Some(100.0), 1e-5)
            .unwrap()
            .unwrap();
        assert_eq!(warning.as_deref(), Some(taken));
        // Without the cap and without the ledger (opening does not write
        // one), `budget` reads the runs' records too (it said the agent
        // keeps no ledger).
        assert!(!dir.path().join(LEDGER_FILE).exists());
        let (text, warning) = command_report(state.clone(), None, 1e-5)
            .unwrap()
            .expect("the runs' records are a ledger");
        assert!(text.contains("over 3 rounds"), "{text}");
        assert!(warning.is_some_and(|w| w.contains("lacked 3 rounds")));
        // An older ledger (before round 2 and its settling): completed too.
        std::fs::write(dir.path().join(LEDGER_FILE), &older).unwrap();
        let mut b = Budget::open(state.clone(), 100.0, 1e-5).unwrap();
        assert!((b.spent() - whole).abs() < 1e-9);
        assert!(b.restored().unwrap().contains("lacked 2 rounds"));
        // Its report says when the cap is spent.
        assert!(!b.report().contains("the budget is spent"));
        let tight = Budget::open(state.clone(), whole / 2.0, 1e-5).unwrap();
        assert!(
            tight
                .report()
                .contains("\nthe budget is spent: every further round")
        );
        // The next charge writes the completed ledger; nothing is left to
        // take back.
        b.charge(spent(3, 2.0)).unwrap();
        let b = Budget::open(state.clone(), 100.0, 1e-5).unwrap();
        assert_eq!((b.rounds().len(), b.restored()), (4, None));
        // A record that does not decode is an error naming it.
        std::fs::write(&run, b"[{").unwrap();
        let e = Budget::open(state, 100.0, 1e-5).unwrap_err();
        assert!(e.to_string().contains(RUN_RECORD), "{e}");
    }

    #[test]
    fn a_ledger_that_does_not_decode_is_an_error_naming_it_not_a_fresh_budget() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(LEDGER_FILE), b"{\"rounds\": [").unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        let e = Budget::open(state, 1.0, 1e-5).unwrap_err();
        assert!(e.to_string().contains(LEDGER_FILE), "{e}");
    }

    #[test]
    fn a_round_settled_at_fewer_survivors_is_recharged_durably_and_never_lowered() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        let mut b = Budget::open(state.clone(), 100.0, 1e-5).unwrap();
        b.charge(spent(1, 2.0)).unwrap();
        b.charge(spent(2, 2.0)).unwrap();
        // Round 2's sum held fewer shares than planned: z 2 → 1.
        let after = b.settle(spent(2, 1.0)).unwrap().unwrap();
        let mut want = Accountant::new();
        want.step(1.0, 2.0).unwrap();
        want.step(1.0, 1.0).unwrap();
        let want = want.epsilon(1e-5).unwrap().epsilon;
        assert!((after - want).abs() < 1e-9, "{after} vs {want}");
        // Read back after a restart; a later, larger figure changes nothing.
        let mut b = Budget::open(state.clone(), 100.0, 1e-5).unwrap();
        assert!((b.spent() - want).abs() < 1e-9);
        assert_eq!(b.rounds().len(), 2);
        assert_eq!(b.rounds()[1].noise_multiplier, 1.0);
        assert_eq!(b.settle(spent(2, 1.5)).unwrap(), None);
        assert_eq!(b.rounds()[1].noise_multiplier, 1.0);
        // A round never charged (its charge was lost) is charged now.
        b.settle(spent(3, 3.0)).unwrap().unwrap();
        assert_eq!(b.rounds().len(), 3);
        assert!(matches!(
            b.settle(spent(3, f64::NAN)),
            Err(ChargeError::Noise(_))
        ));
    }

    #[test]
    fn a_round_of_fewer_agents_than_planned_is_charged_at_its_lower_noise() {
        let noise = DistributedNoise {
            skellam: fedcart_common::privacy::dp::DistributedSkellam::new(2.0, 1.0, 1e3, 10, 4)
                .unwrap(),
            bit_variance: 0.0,
            secagg_clip: 1.0,
            modulus_bits: 32,
        };
        assert_eq!(round_noise_multiplier(&noise, false, 10), 2.0);
        assert_eq!(round_noise_multiplier(&noise, false, 4), 2.0);
        assert!((round_noise_multiplier(&noise, false, 1) - 1.0).abs() < 1e-12);
        // With adaptive clipping, the count released with the sum: none
        // here, so no privacy at all (a charge refuses it).
        assert_eq!(round_noise_multiplier(&noise, true, 4), 0.0);
        let dir = tempfile::tempdir().unwrap();
        let mut b = Budget::open(StateDir::open(dir.path()).unwrap(), 100.0, 1e-5).unwrap();
        for z in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(matches!(b.charge(spent(1, z)), Err(ChargeError::Noise(_))));
        }
        assert!(b.rounds().is_empty());
    }
}
