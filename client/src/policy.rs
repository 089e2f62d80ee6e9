//! The merchant's own privacy policy (`[privacy]` in `merchant.toml`): the
//! protections a task must carry before this agent works on it.
//!
//! The coordinator chooses each task's protections — secure aggregation on
//! or off, its threshold and graph degree, the survivor-list check, the
//! differential-privacy settings. Without a local policy the agent would
//! take whatever it is sent; with one, a task below the policy is refused
//! before anything leaves the agent (no model download, no update, no
//! masked input), with a log line naming the setting, the task's value and
//! the policy's. The coordinator then counts the agent as a dropout.
//!
//! What the agent can check is what it is told: central differential
//! privacy adds its noise on the coordinator, out of the agent's sight, so
//! `min_noise_multiplier` can only be met by distributed noise (added on
//! the agents under secure aggregation).

use fedcart_common::privacy::dp::distributed::DistributedNoise;
use fedcart_common::privacy::secagg::SecAggConfig;
use fedcart_common::task::{ModelSpec, TaskKind, TaskSpec};
use serde::{Deserialize, Serialize};

/// The protections this merchant requires; every default accepts what the
/// coordinator accepted before the policy existed, except rounds of two
/// agents under secure aggregation (`min_neighbours = 2`) and secure rounds
/// whose keys are not bound to merchant certificates (`require_key_binding`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrivacyPolicy {
    /// Refuse training and statistics tasks that are not securely
    /// aggregated (default `false`). Evaluation tasks are not checked: they
    /// are never securely aggregated, and send metrics and (churn models) a
    /// per-class score histogram of the held-out rows in the clear.
    pub require_secure_aggregation: bool,
    /// Smallest Shamir threshold t accepted: fewer than t colluding holders
    /// of this agent's shares learn nothing (default 2, the protocol's floor).
    pub min_threshold: usize,
    /// Fewest other agents whose pairwise masks must cover this agent's
    /// input, i.e. the round's graph degree (default 2: in a round of two
    /// agents the sum minus one's own input is the other's).
    pub min_neighbours: usize,
    /// Require the survivor-list signatures that guard against a server
    /// telling agents different survivor lists, with a threshold that is a
    /// majority of the share holders, without which the check does not hold
    /// (default `false`).
    pub require_verify_survivors: bool,
    /// Fewest masked inputs (this agent's included) a secure sum may hold
    /// for this agent to reveal its shares at the unmask stage (default 0:
    /// no floor beyond the threshold). Read off the survivor list of the
    /// unmask request, which only `require_verify_survivors` makes
    /// trustworthy (signed by at least t survivors); without it a
    /// coordinator that deviates from the protocol can show each agent
    /// another list. With both, a coordinator that closes the round with
    /// fewer inputs, to isolate one merchant's, gets no shares from the
    /// agents that hold this policy.
    pub min_survivors: usize,
    /// Refuse training tasks without differential privacy (default `false`).
    pub require_dp: bool,
    /// Smallest noise multiplier z accepted for a training task; above 0 it
    /// requires distributed noise (added here, under secure aggregation),
    /// since the agent cannot see central noise (default 0: no requirement).
    /// Checked on the task's z, then, once the round's size is known, on
    /// the z the sum gets when all its agents add their shares.
    pub min_noise_multiplier: f64,
    /// In a secure round, sign this agent's keys with its mTLS key and
    /// accept the roster only if every entry is signed by the key of a
    /// certificate from the agent's CA naming the entry's merchant (default
    /// `true`; see `fedcart_common::privacy::secagg::binding`). Without it
    /// the coordinator could substitute a merchant's keys and open what is
    /// sent to it. An agent without a `[tls]` identity then refuses secure
    /// rounds; `false` accepts unauthenticated keys (plaintext test setups,
    /// the simulator's loopback transport).
    pub require_key_binding: bool,
    /// The most ε (at `epsilon_delta`) this merchant's updates may ever
    /// spend, over every training round of every run (default: no cap). The
    /// agent keeps its own ledger in `state_dir` (which this key requires)
    /// and refuses a round that would pass the cap before its update leaves
    /// (see [`crate::budget`]). Only agent-side (distributed) noise can be
    /// counted, so with a cap a training task without it is refused.
    pub max_epsilon: Option<f64>,
    /// δ of `max_epsilon` (default 1e-5).
    pub epsilon_delta: f64,
    /// Take part in evaluation tasks (default `true`). An evaluation sends,
    /// in the clear, the metrics and (churn models) per-class score
    /// histograms of the held-out and validation customers; a coordinator
    /// that evaluates crafted models reads from them each such customer's
    /// value of a feature, with its label (found by an attacker probe).
    /// `false` declines them: the run selects its served version on the
    /// other merchants' validation, and this agent fetches the served
    /// version when the run ends. Declining an evaluation does not keep
    /// the merchant out of the run's training.
    pub allow_evaluation: bool,
}

impl Default for PrivacyPolicy {
    fn default() -> Self {
        Self {
            require_secure_aggregation: false,
            min_threshold: 2,
            min_neighbours: 2,
            require_verify_survivors: false,
            min_survivors: 0,
            require_dp: false,
            min_noise_multiplier: 0.0,
            require_key_binding: true,
            max_epsilon: None,
            epsilon_delta: 1e-5,
            allow_evaluation: true,
        }
    }
}

/// A task below the merchant's policy: which setting, what the task offers
/// and what the policy requires.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error(
    "task refused by the merchant's privacy policy: `privacy.{setting}` requires {policy}, \
     the task has {task}; relax the policy in merchant.toml or ask the platform to raise it"
)]
pub struct PolicyViolation {
    /// The policy key, under `[privacy]`.
    pub setting: &'static str,
    /// The task's value.
    pub task: String,
    /// The policy's value.
    pub policy: String,
}

fn violation(setting: &'static str, task: impl ToString, policy: impl ToString) -> PolicyViolation {
    PolicyViolation {
        setting,
        task: task.to_string(),
        policy: policy.to_string(),
    }
}

impl PrivacyPolicy {
    /// The checks of the section's values: a message naming the key.
    pub fn check(&self) -> Result<(), String> {
        if !(self.min_noise_multiplier.is_finite() && self.min_noise_multiplier >= 0.0) {
            return Err(format!(
                "`privacy.min_noise_multiplier` = {} must be finite and >= 0",
                self.min_noise_multiplier
            ));
        }
        if let Some(e) = self.max_epsilon
            && !(e.is_finite() && e > 0.0)
        {
            return Err(format!(
                "`privacy.max_epsilon` = {e} must be finite and > 0 (remove the key for no cap)"
            ));
        }
        if !(self.epsilon_delta > 0.0 && self.epsilon_delta < 1.0) {
            return Err(format!(
                "`privacy.epsilon_delta` = {} must be in (0, 1), e.g. 1e-5",
                self.epsilon_delta
            ));
        }
        // As the coordinator's `run.dp.delta`: past 1 % the cap is no
        // guarantee (at δ = 0.5 a run of ε 12.3 read as 3.1 against it).
        if let Some(why) = fedcart_common::privacy::dp::delta_above_max(self.epsilon_delta) {
            return Err(format!(
                "`privacy.epsilon_delta` = {why}, and the larger it is the smaller the same \
                 rounds' ε reads against `max_epsilon` — use 1e-5, as runs do"
            ));
        }
        Ok(())
    }

    /// Checks a pushed task before any work: secure aggregation, differential
    /// privacy and its noise multiplier.
    pub fn check_task(&self, spec: &TaskSpec, secure: bool) -> Result<(), PolicyViolation> {
        if spec.kind == TaskKind::Evaluate && !self.allow_evaluation {
            return Err(violation(
                "allow_evaluation",
                "an evaluation (its score histograms of held-out and validation customers go in \
                 the clear)",
                "no evaluations",
            ));
        }
        let sends_update = matches!(spec.kind, TaskKind::Train | TaskKind::Stats);
        if self.require_secure_aggregation && sends_update && !secure {
            return Err(violation(
                "require_secure_aggregation",
                "secure aggregation off",
                "secure aggregation on",
            ));
        }
        if spec.kind != TaskKind::Train {
            return Ok(());
        }
        if self.require_dp && spec.dp.is_none() {
            return Err(violation(
                "require_dp",
                "no differential privacy",
                "differential privacy",
            ));
        }
        // Agent-side noise goes into a masked input only: a task asking for
        // it in the clear would send the update without noise and charge
        // nothing (found by an attacker probe, past every DP key).
        if !secure
            && spec.dp.as_ref().is_some_and(|d| d.distributed.is_some())
            && let Some(setting) = self.dp_setting()
        {
            return Err(violation(
                setting,
                "distributed noise without secure aggregation (the update would leave \
                 without it)",
                "distributed noise under secure aggregation",
            ));
        }
        // An analysis (segments, frequent itemsets for rules) sums exact
        // counts and cannot carry differential privacy: like statistics and
        // evaluation it is not charged, and a cap does not keep the merchant
        // out of it (`require_dp` does). Boosted trees are a model, and
        // stay refused under a cap.
        let segments_or_rules = matches!(
            spec.model,
            ModelSpec::KMeans { .. } | ModelSpec::Segments { .. } | ModelSpec::Itemsets { .. }
        );
        if let Some(cap) = self.max_epsilon
            && !segments_or_rules
            && spec.dp.as_ref().and_then(|d| d.distributed).is_none()
        {
            return Err(violation(
                "max_epsilon",
                "no agent-side (distributed) noise: this agent cannot count the round's ε",
                format!(
                    "distributed noise within ε <= {cap} at δ = {:e}",
                    self.epsilon_delta
                ),
            ));
        }
        if self.min_noise_multiplier > 0.0 {
            // The release's, the clip-bit count included.
            let z = spec.dp.as_ref().and_then(|d| {
                d.distributed
                    .map(|n| n.release_noise_multiplier(n.skellam.min_survivors, d.clip_bit))
            });
            match z {
                None => {
                    return Err(violation(
                        "min_noise_multiplier",
                        "no agent-side (distributed) noise",
                        format!("distributed noise with z >= {}", self.min_noise_multiplier),
                    ));
                }
                Some(z) if z < self.min_noise_multiplier => {
                    return Err(violation(
                        "min_noise_multiplier",
                        format!("z = {z}"),
                        format!("z >= {}", self.min_noise_multiplier),
                    ));
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// The example counts this agent advertises when it joins, per data
    /// family. The coordinator uses them only to tell which runs an agent
    /// can serve (a family with rows); a merchant whose policy requires
    /// secure aggregation or differential privacy tells it only that: 1 for
    /// a family with rows, 0 for one without, not how many.
    pub fn advertised_examples(
        &self,
        examples: impl IntoIterator<Item = (String, u64)>,
    ) -> std::collections::HashMap<String, u64> {
        let coarse = self.require_secure_aggregation || self.require_dp;
        examples
            .into_iter()
            .map(|(family, n)| (family, if coarse { n.min(1) } else { n }))
            .collect()
    }

    /// Checks a distributed-DP round's noise against `min_noise_multiplier`
    /// once the round's size is known: the multiplier the sum gets at best,
    /// when every one of the round's `agents` adds its share,
    /// z·√(agents / min_survivors). The task's z alone is not enough: the
    /// coordinator also sets how many agents the noise is split across, and
    /// a split across more agents than the round has shrinks every share.
    pub fn check_noise(
        &self,
        noise: &DistributedNoise,
        clip_bit: bool,
        agents: usize,
    ) -> Result<(), PolicyViolation> {
        let best = noise.release_noise_multiplier(agents, clip_bit);
        if self.min_noise_multiplier > 0.0 && (best.is_nan() || best < self.min_noise_multiplier) {
            let k = &noise.skellam;
            return Err(violation(
                "min_noise_multiplier",
                format!(
                    "z = {} split across {} agents{}, {agents} in the round: z = {best:.3} at best",
                    k.noise_multiplier,
                    k.min_survivors,
                    if clip_bit {
                        " with the clip-bit count's noise"
                    } else {
                        ""
                    }
                ),
                format!("z >= {}", self.min_noise_multiplier),
            ));
        }
        Ok(())
    }

    /// The first key asking for differential privacy, if any.
    fn dp_setting(&self) -> Option<&'static str> {
        if self.max_epsilon.is_some() {
            Some("max_epsilon")
        } else if self.min_noise_multiplier > 0.0 {
            Some("min_noise_multiplier")
        } else if self.require_dp {
            Some("require_dp")
        } else {
            None
        }
    }

    /// Checks a secure round's parameters when the invitation arrives:
    /// threshold and survivor-list check.
    pub fn check_round(&self, config: &SecAggConfig) -> Result<(), PolicyViolation> {
        if config.threshold < self.min_threshold {
            return Err(violation(
                "min_threshold",
                format!("threshold {}", config.threshold),
                format!("threshold >= {}", self.min_threshold),
            ));
        }
        if self.require_verify_survivors && !config.verify_survivors {
            return Err(violation(
                "require_verify_survivors",
                "no survivor-list check",
                "the survivor-list check",
            ));
        }
        // The check holds only when two disjoint survivor lists cannot both
        // gather t signatures: t must be a majority of the k + 1 holders.
        let holders = config.neighbours + 1;
        if self.require_verify_survivors && 2 * config.threshold <= holders {
            return Err(violation(
                "require_verify_survivors",
                format!(
                    "threshold {} of {holders} share holders (two survivor lists could each \
                     gather it)",
                    config.threshold
                ),
                format!("a majority threshold (> {holders}/2)"),
            ));
        }
        Ok(())
    }

    /// The default policy without key binding: for agents that have no
    /// certificate by design (plaintext test federations, the simulator's
    /// in-process loopback transport), which then take the roster's keys
    /// as the coordinator relays them.
    pub fn without_key_binding() -> Self {
        Self {
            require_key_binding: false,
            ..Self::default()
        }
    }

    /// Checks, when a secure round's invitation arrives, that this agent can
    /// bind its keys and check its peers' when the policy requires it.
    pub fn check_binding(&self, has_identity: bool) -> Result<(), PolicyViolation> {
        if self.require_key_binding && !has_identity {
            return Err(violation(
                "require_key_binding",
                "no [tls] identity on this agent to sign its keys and verify its peers'",
                "keys bound to merchant certificates",
            ));
        }
        Ok(())
    }

    /// Checks the round's roster, `n` agents, against `min_survivors` before
    /// any share or masked input is sent: a sum holds at most its roster.
    /// Refusing only at the unmask stage came too late: this agent's masked
    /// input was in, and the other agents' shares could unmask it.
    pub fn check_roster(&self, n: usize) -> Result<(), PolicyViolation> {
        self.at_least_min_survivors(n, || {
            format!("a round of {n} agents (a sum holds at most its roster)")
        })
    }

    /// Checks the unmask stage's survivor count, `survivors` masked inputs
    /// in the sum, against `min_survivors`.
    pub fn check_survivors(&self, survivors: usize) -> Result<(), PolicyViolation> {
        self.at_least_min_survivors(survivors, || format!("a sum of {survivors} masked inputs"))
    }

    /// `count` against `min_survivors`, the task described by `task`.
    fn at_least_min_survivors(
        &self,
        count: usize,
        task: impl FnOnce() -> String,
    ) -> Result<(), PolicyViolation> {
        if count < self.min_survivors {
            return Err(violation(
                "min_survivors",
                task(),
                format!("at least {}", self.min_survivors),
            ));
        }
        Ok(())
    }

    /// Checks the graph degree once the roster fixes the number of agents
    /// `n`, before any share is sent.
    pub fn check_degree(&self, config: &SecAggConfig, n: usize) -> Result<(), PolicyViolation> {
        let k = config.degree(n);
        if k < self.min_neighbours {
            return Err(violation(
                "min_neighbours",
                format!(
                    "{k} {} ({n} agents)",
                    if k == 1 { "neighbour" } else { "neighbours" }
                ),
                format!("at least {}", self.min_neighbours),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedcart_common::privacy::dp::distributed::DistributedSkellam;
    use fedcart_common::task::ModelSpec;

    fn spec(kind: TaskKind) -> TaskSpec {
        TaskSpec {
            kind,
            model: ModelSpec::Noop { dim: 3 },
            sgd: Default::default(),
            seed: 1,
            round: 1,
            standardizer: None,
            dp: None,
            best_version: None,
        }
    }

    fn train_spec() -> TaskSpec {
        spec(TaskKind::Train)
    }

    fn dp_task(
        noise: DistributedNoise,
        clip_bit: bool,
    ) -> fedcart_common::privacy::dp::task::DpTask {
        fedcart_common::privacy::dp::task::DpTask {
            clip: 1.0,
            clip_bit,
            distributed: Some(noise),
        }
    }

    /// The coordinator sets the task's z and how many agents the noise is
    /// split across: a floor on z alone would let it shrink every share by
    /// splitting across more agents than the round has.
    #[test]
    fn the_noise_floor_is_checked_on_what_the_rounds_agents_can_add() {
        let p = PrivacyPolicy {
            min_noise_multiplier: 1.0,
            ..PrivacyPolicy::default()
        };
        let noise = |skellam| DistributedNoise {
            skellam,
            bit_variance: 0.0,
            secagg_clip: 1.0,
            modulus_bits: 32,
        };
        let planned = noise(DistributedSkellam::new(1.0, 1.0, 1000.0, 10, 4).unwrap());
        p.check_noise(&planned, false, 4).unwrap();
        p.check_noise(&planned, false, 6).unwrap();
        let inflated = noise(DistributedSkellam::new(1.0, 1.0, 1000.0, 10, 1_000_000).unwrap());
        let e = p.check_noise(&inflated, false, 4).unwrap_err();
        assert_eq!(e.setting, "min_noise_multiplier");
        assert!(
            e.task
                .contains("split across 1000000 agents, 4 in the round: z = 0.002 at best"),
            "{}",
            e.task
        );
        // A round that lost one of its four planned agents before it began
        // cannot give z = 1 either; without a floor anything goes.
        assert!(p.check_noise(&planned, false, 3).is_err());
        PrivacyPolicy::default()
            .check_noise(&inflated, false, 4)
            .unwrap();
    }

    /// With adaptive clipping the clip-bit count is released with the
    /// model's sum: a count with thin noise (the coordinator's
    /// `count_noise_std` just above z/2) let a z_Δ of 1.82 pass a floor of
    /// 1 while the release had z = 0.5 (found by an attacker probe), and a
    /// count without noise passed any floor.
    #[test]
    fn the_noise_floor_counts_the_clip_bit_release_under_adaptive_clipping() {
        let p = PrivacyPolicy {
            min_noise_multiplier: 1.0,
            ..PrivacyPolicy::default()
        };
        let (z, agents, scale) = (0.5f64, 3, 1000.0);
        let sigma_b = 0.26f64;
        let z_delta = (z.powi(-2) - (2.0 * sigma_b).powi(-2)).powf(-0.5);
        let noise = |bit_variance| DistributedNoise {
            skellam: DistributedSkellam::new(z_delta, 1.0, scale, 10, agents).unwrap(),
            bit_variance,
            secagg_clip: 1.0,
            modulus_bits: 32,
        };
        let thin = noise((sigma_b * scale).powi(2) / agents as f64);
        assert!((z_delta - 1.82).abs() < 0.01, "{z_delta}");
        assert!((thin.release_noise_multiplier(agents, true) - z).abs() < 1e-9);
        assert!((thin.release_noise_multiplier(agents, false) - z_delta).abs() < 1e-9);
        let e = p.check_noise(&thin, true, agents).unwrap_err();
        assert!(e.task.contains("z = 0.500 at best"), "{}", e.task);
        assert!(p.check_noise(&noise(0.0), true, agents).is_err());
        // A count with wide noise (σ_b = 2): the release's z is below z_Δ,
        // and above the floor.
        let wide = noise((2.0 * scale).powi(2) / agents as f64);
        let z_wide = wide.release_noise_multiplier(agents, true);
        assert!(z_wide < z_delta && z_wide > 1.0, "{z_wide}");
        p.check_noise(&wide, true, agents).unwrap();
        // The task's own check, before the round: the same release.
        let mut spec = train_spec();
        spec.dp = Some(dp_task(thin, true));
        assert_eq!(
            p.check_task(&spec, true).unwrap_err().setting,
            "min_noise_multiplier"
        );
        spec.dp = Some(dp_task(wide, true));
        p.check_task(&spec, true).unwrap();
    }

    /// Agent-side noise is added to a masked input only: a training task
    /// carrying it but not secure sent the clipped update without noise and
    /// charged nothing, past `require_dp`, `max_epsilon` and the noise
    /// floor (found by an attacker probe with a patched coordinator).
    #[test]
    fn distributed_noise_without_secure_aggregation_is_refused_by_any_dp_key() {
        let noise = DistributedNoise {
            skellam: DistributedSkellam::new(2.0, 1.0, 1000.0, 10, 3).unwrap(),
            bit_variance: 0.0,
            secagg_clip: 1.0,
            modulus_bits: 32,
        };
        let mut spec = train_spec();
        spec.dp = Some(dp_task(noise, false));
        for (policy, setting) in [
            (
                PrivacyPolicy {
                    require_dp: true,
                    ..PrivacyPolicy::default()
                },
                "require_dp",
            ),
            (
                PrivacyPolicy {
                    min_noise_multiplier: 1.0,
                    ..PrivacyPolicy::default()
                },
                "min_noise_multiplier",
            ),
            (
                PrivacyPolicy {
                    max_epsilon: Some(20.0),
                    ..PrivacyPolicy::default()
                },
                "max_epsilon",
            ),
        ] {
            let e = policy.check_task(&spec, false).unwrap_err();
            assert_eq!(e.setting, setting);
            assert!(e.to_string().contains("without secure aggregation"), "{e}");
            policy.check_task(&spec, true).unwrap();
        }
    }

    #[test]
    fn a_merchant_requiring_protection_advertises_which_families_it_holds_not_how_many_rows() {
        let counts = || [("churn".to_string(), 5634), ("mf".to_string(), 0)];
        let open = PrivacyPolicy::default().advertised_examples(counts());
        assert_eq!((open["churn"], open["mf"]), (5634, 0));
        for policy in [
            PrivacyPolicy {
                require_secure_aggregation: true,
                ..PrivacyPolicy::default()
            },
            PrivacyPolicy {
                require_dp: true,
                ..PrivacyPolicy::default()
            },
        ] {
            let coarse = policy.advertised_examples(counts());
            assert_eq!((coarse["churn"], coarse["mf"]), (1, 0));
        }
    }

    /// Survivor lists signed by fewer than a majority of the share holders
    /// do not stop a server from showing two groups different lists.
    #[test]
    fn the_survivor_check_is_required_with_a_majority_threshold() {
        let p = PrivacyPolicy {
            require_verify_survivors: true,
            ..PrivacyPolicy::default()
        };
        let mut c = SecAggConfig::complete(3, 0, 5, 1.0);
        c.verify_survivors = true;
        assert_eq!((c.neighbours, c.threshold), (4, 3));
        p.check_round(&c).unwrap();
        c.threshold = 2;
        let e = p.check_round(&c).unwrap_err();
        assert_eq!(e.setting, "require_verify_survivors");
        assert!(
            e.task.contains("threshold 2 of 5 share holders"),
            "{}",
            e.task
        );
        // Without the requirement the policy leaves the threshold to min_threshold.
        PrivacyPolicy::default().check_round(&c).unwrap();
    }

    #[test]
    fn the_default_policy_accepts_what_the_coordinator_sends_except_two_agent_rounds() {
        let p = PrivacyPolicy::default();
        p.check_task(&spec(TaskKind::Train), false).unwrap();
        let c = SecAggConfig::complete(3, 0, 3, 1.0);
        p.check_round(&c).unwrap();
        p.check_degree(&c, 3).unwrap();
        let err = p.check_degree(&c, 2).unwrap_err();
        assert_eq!(err.setting, "min_neighbours");
        // Key binding is required by default: an agent without a TLS
        // identity refuses secure rounds unless the merchant opts out.
        assert_eq!(
            p.check_binding(false).unwrap_err().setting,
            "require_key_binding"
        );
        p.check_binding(true).unwrap();
        PrivacyPolicy::without_key_binding()
            .check_binding(false)
            .unwrap();
        let toml: PrivacyPolicy = toml::from_str("require_key_binding = false").unwrap();
        assert_eq!(toml, PrivacyPolicy::without_key_binding());
    }

    #[test]
    fn each_refusal_names_the_setting_the_task_value_and_the_policy_value() {
        let p = PrivacyPolicy {
            require_secure_aggregation: true,
            min_threshold: 4,
            require_dp: true,
            ..Default::default()
        };
        let err = p.check_task(&spec(TaskKind::Train), false).unwrap_err();
        assert_eq!(
            err.to_string(),
            "task refused by the merchant's privacy policy: `privacy.require_secure_aggregation` \
             requires secure aggregation on, the task has secure aggregation off; relax the \
             policy in merchant.toml or ask the platform to raise it"
        );
        // Evaluation sends metrics only.
        p.check_task(&spec(TaskKind::Evaluate), false).unwrap();
        let err = p.check_task(&spec(TaskKind::Train), true).unwrap_err();
        assert_eq!(err.setting, "require_dp");
        let c = SecAggConfig::complete(3, 0, 4, 1.0); // t = 3
        let err = p.check_round(&c).unwrap_err();
        assert_eq!(
            (err.setting, err.task.as_str()),
            ("min_threshold", "threshold 3")
        );
        let z = PrivacyPolicy {
            min_noise_multiplier: 0.5,
            ..Default::default()
        };
        let mut central = spec(TaskKind::Train);
        central.dp = Some(fedcart_common::privacy::dp::task::DpTask {
            clip: 1.0,
            clip_bit: false,
            distributed: None,
        });
        assert_eq!(
            z.check_task(&central, true).unwrap_err().setting,
            "min_noise_multiplier"
        );
        // An ε cap counts agent-side noise only: a training task without it
        // (no DP, or central noise) is refused; other kinds are not charged.
        let capped = PrivacyPolicy {
            max_epsilon: Some(8.0),
            ..Default::default()
        };
        for task in [spec(TaskKind::Train), central.clone()] {
            let err = capped.check_task(&task, true).unwrap_err();
            assert_eq!(err.setting, "max_epsilon");
            assert!(
                err.task.contains("no agent-side (distributed) noise"),
                "{err}"
            );
        }
        capped.check_task(&spec(TaskKind::Evaluate), false).unwrap();
        capped.check_task(&spec(TaskKind::Stats), true).unwrap();
        // An analysis (segments, itemsets) cannot carry DP and is not
        // charged: a capped merchant takes part (it was refused at every
        // attempt, and the run never finished); `require_dp` keeps it out.
        let mut segments = spec(TaskKind::Train);
        segments.model = ModelSpec::KMeans {
            k: 4,
            num_features: 3,
            init: Vec::new(),
        };
        capped.check_task(&segments, true).unwrap();
        let strict = PrivacyPolicy {
            require_dp: true,
            ..capped.clone()
        };
        assert_eq!(
            strict.check_task(&segments, true).unwrap_err().setting,
            "require_dp"
        );
    }
}
