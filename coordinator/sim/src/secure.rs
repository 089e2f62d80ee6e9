//! The simulator's secure rounds: every party of the real protocol
//! (`fedcart_common::privacy::secagg`) in this process, with the round's
//! parameters from `secure_round::round_config` as over gRPC. The round is
//! opened (keys advertised and shared) before the merchants train; each chunk
//! of trained updates is then encoded, masked by its agents in parallel and
//! added into the server's running masked sum, and dropped: the simulator
//! holds no update beyond the chunk being masked, whatever the number of
//! merchants. A merchant whose training failed never sends its masked input
//! and is recovered like any dropout of that stage.

use std::collections::HashMap;
use std::time::Instant;

use anyhow::Context;
use fedcart_common::federation::update::Update;
use fedcart_common::privacy::dp::DistributedNoise;
use fedcart_common::privacy::secagg::{
    Dropouts, InMemoryRound, SecAggConfig, SecAggError, StageTimes,
};
use fedcart_coordinator::engine::{Engine, TaskPlan};
use fedcart_coordinator::secure_round;

use super::dp;

/// An open secure round of the simulator.
pub(crate) struct SecureRound {
    /// Merchant ids by agent index (the order the round was opened with:
    /// the order in which chunks are trained, so that each chunk's agents
    /// are neighbours on the round's ring, `InMemoryRound`).
    ids: Vec<String>,
    /// Agent index of each merchant.
    index: HashMap<String, u32>,
    round: InMemoryRound,
    config: SecAggConfig,
    noise: Option<DistributedNoise>,
    seed: u64,
    task_id: String,
    /// Inputs added into the masked sum so far.
    masked: usize,
    /// Wall-clock seconds spent in the protocol (all parties).
    pub seconds: f64,
}

impl SecureRound {
    /// Opens the secure round of `plan` for `merchants` (the agents invited
    /// to it), of which those in `dropped` fall silent before advertising
    /// their keys, as a dropped agent does over gRPC: the round's parameters
    /// and its threshold are the invited agents', so a round whose survivors
    /// are too few aborts at the advertise stage, as the service's does (it
    /// was opened over the survivors alone and released sums of 2 of 10
    /// merchants that the real protocol never releases). `None` when there
    /// is no one to invite, or the round aborted. With one merchant there is
    /// no sum to hide a value in: the task aborts (and the round is tried
    /// again, as after any abort) without its input being read.
    pub fn open(
        engine: &mut Engine,
        plan: &TaskPlan,
        merchants: Vec<String>,
        dropped: &std::collections::BTreeSet<String>,
        seed: u64,
    ) -> anyhow::Result<Option<Self>> {
        if merchants.is_empty() {
            return Ok(None);
        }
        if merchants.len() == 1 {
            engine.abort_secure(
                "secure aggregation needs at least 2 agents in the round, 1 took part: \
                 aborted, its input was not read"
                    .into(),
            );
            return Ok(None);
        }
        let started = Instant::now();
        let settings = engine
            .run()
            .secagg
            .clone()
            .expect("secure task has settings");
        let n = merchants.len();
        // The same parameters as a gRPC round (2^64 ring for the statistics step).
        let config = secure_round::round_config(&settings, &plan.spec, n);
        let round_seed = fedcart_common::seed::derive(seed, &["secagg", &plan.task_id]);
        let silent = Dropouts {
            advertise: (0..n as u32)
                .filter(|&i| dropped.contains(&merchants[i as usize]))
                .collect(),
            ..Dropouts::none()
        };
        let round = match InMemoryRound::new(&config, n, &silent, round_seed) {
            Ok(round) => Ok(round),
            Err(e @ SecAggError::TooFewSurvivors { .. }) => {
                engine.abort_secure(format!("secure aggregation: {e}"));
                return Ok(None);
            }
            Err(e) => Err(e),
        };
        let round = round.map_err(|e| {
            // The encoder names its own parameters (`scale`, `max_weight`,
            // `modulus_bits`), none of them a flag: the one that set them is
            // the clip.
            let flag = match plan.spec.dp.as_ref().and_then(|d| d.distributed) {
                Some(_) => "--dp-clip (the clip of distributed noise)",
                None => "--secagg-clip",
            };
            let advice = match &e {
                fedcart_common::privacy::secagg::SecAggError::Config { .. } => format!(
                    ": the secure sum's fixed-point ring cannot carry this round's updates of \
                     {n} agents at the clip {:e} set by {flag}; lower it",
                    settings.clip
                ),
                _ => String::new(),
            };
            anyhow::Error::new(e).context(format!(
                "secure aggregation of task {}{advice}",
                plan.task_id
            ))
        })?;
        // As over gRPC: the advertisers, checked against the threshold
        // above, are then checked against the quorum before any share.
        let advertised = n - silent.advertise.len();
        let quorum = engine.run().quorum;
        if advertised < quorum {
            engine.abort_secure(secure_round::before_sharing(advertised, quorum));
            return Ok(None);
        }
        let index = merchants
            .iter()
            .enumerate()
            .map(|(i, m)| (m.clone(), i as u32))
            .collect();
        Ok(Some(Self {
            ids: merchants,
            index,
            round,
            config,
            noise: plan.spec.dp.as_ref().and_then(|d| d.distributed),
            seed,
            task_id: plan.task_id.clone(),
            masked: 0,
            seconds: started.elapsed().as_secs_f64(),
        }))
    }

    /// Masks `inputs` (merchant, update) and adds them into the masked sum;
    /// each update is dropped as soon as its agent has encoded it.
    pub fn mask(&mut self, inputs: Vec<(String, Update)>) -> anyhow::Result<()> {
        if inputs.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let mut batch = Vec::with_capacity(inputs.len());
        for (merchant, update) in inputs {
            let id = *self
                .index
                .get(&merchant)
                .with_context(|| format!("merchant {merchant} is not in the secure round"))?;
            batch.push((id, update));
        }
        let sent = batch.len();
        // The round drops each update once it is encoded.
        let result = match &self.noise {
            Some(noise) => self.round.mask(
                batch,
                &dp::noise_hook(&self.config, noise, self.seed, &self.task_id),
            ),
            None => self.round.mask(batch, &|_, _| Ok(())),
        };
        result.with_context(|| format!("secure aggregation of task {}", self.task_id))?;
        self.masked += sent;
        self.seconds += started.elapsed().as_secs_f64();
        Ok(())
    }

    /// Closes the round: below the run's quorum it aborts before anything is
    /// unmasked (as the service does, so that no refused sum is ever
    /// revealed); otherwise it unmasks and hands the engine the decoded sum.
    /// A round the protocol aborts (too few survivors or shares) aborts the
    /// task. Returns the number of clipped coordinates, the seconds spent
    /// in the protocol and how they split over its stages.
    pub fn finish(self, engine: &mut Engine) -> anyhow::Result<(u64, f64, StageTimes)> {
        let started = Instant::now();
        let quorum = engine.run().quorum;
        let times = self.round.times();
        if self.masked < quorum {
            engine.abort_secure(secure_round::before_unmasking(self.masked, quorum));
            return Ok((0, self.seconds, times));
        }
        let out = match self.round.finish(&[]) {
            Ok(out) => out,
            Err(
                e @ (SecAggError::TooFewSurvivors { .. } | SecAggError::NotEnoughShares { .. }),
            ) => {
                engine.abort_secure(format!("secure aggregation: {e}"));
                return Ok((0, self.seconds + started.elapsed().as_secs_f64(), times));
            }
            // Unmasked, then refused (an out-of-range input): the engine
            // stops the run rather than retry, as the service does.
            Err(e) if let Some(count) = e.revealed_sum_of() => {
                engine.refuse_unmasked_sum(e.to_string(), count);
                return Ok((0, self.seconds + started.elapsed().as_secs_f64(), times));
            }
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("secure aggregation of task {}", self.task_id));
            }
        };
        let survivors: Vec<String> = out
            .output
            .survivors
            .iter()
            .map(|&i| self.ids[i as usize].clone())
            .collect();
        let clipped = out.output.sum.clipped;
        engine
            .set_secure_sum(&survivors, out.output.sum)
            .map_err(|e| anyhow::anyhow!("handing the secure sum to the engine: {e}"))?;
        Ok((
            clipped,
            self.seconds + started.elapsed().as_secs_f64(),
            out.times,
        ))
    }
}

/// Secure aggregation of updates that are all at hand (the FedBuff
/// driver's buffer): open, mask everything, finish. Returns the number of
/// clipped coordinates and the time of each stage.
pub(crate) fn secure_sum(
    engine: &mut Engine,
    plan: &TaskPlan,
    inputs: Vec<(String, Update)>,
    seed: u64,
) -> anyhow::Result<(u64, StageTimes)> {
    let merchants = inputs.iter().map(|(m, _)| m.clone()).collect();
    let none = Default::default();
    let Some(mut round) = SecureRound::open(engine, plan, merchants, &none, seed)? else {
        return Ok((0, StageTimes::default()));
    };
    round.mask(inputs)?;
    let (clipped, _, times) = round.finish(engine)?;
    Ok((clipped, times))
}
