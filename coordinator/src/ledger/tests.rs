//! The engine with `[run.dp]`: noise of the right scale on the sum, seeded
//! replay, ε per round equal to the accountant's, adaptive clipping, the ε
//! history surviving a restart, distributed noise through real secure
//! aggregation, and configuration errors naming the field.

use fedcart_common::federation::update::Update;
use fedcart_common::privacy::dp::accountant::epsilon_for;
use fedcart_common::privacy::secagg::{Dropouts, SecAggConfig, run_in_memory_with};
use fedcart_common::task::{ModelSpec, TaskKind};

use super::*;
use crate::config::{SecAggSettings, Selection};
use crate::engine::{Engine, EngineError, RunStop, Submission};
use crate::record::Outcome;
use crate::store::Store;

const DIM: usize = 20_000;

fn run(dp: DpSettings, selected: usize) -> RunConfig {
    RunConfig {
        run_id: "dp".into(),
        seed: 7,
        rounds: 3,
        model: ModelSpec::Noop { dim: DIM },
        sgd: Default::default(),
        selection: Selection {
            fraction: 0.5,
            min_agents: selected,
            max_agents: selected,
            min_available: 0,
        },
        quorum: 1,
        round_timeout_ms: 1_000,
        evaluate: false,
        strategy: Default::default(),
        secagg: None,
        dp: Some(dp),
        max_attempts: crate::config::DEFAULT_MAX_ATTEMPTS,
        early_stopping: None,
    }
}

fn agents(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("m{i:02}")).collect()
}

/// One training round where every selected agent sends `value` in every
/// coordinate (already clipped form: weight 1) and, if asked, a clip bit.
fn round(engine: &mut Engine, all: &[String], value: f32, bit: Option<f32>) -> RoundRecord {
    let plan = engine.start_task(all).unwrap();
    let mut values = vec![value; DIM];
    values.extend(bit);
    assert_eq!(values.len(), plan.spec.update_len());
    let update = Update {
        values,
        coord_weights: vec![],
        weight: 1.0,
    };
    report_all(engine, &plan, Some(update));
    engine.finish_task().unwrap()
}

/// Every agent `plan` selected reports `update` (weight 1, no figures).
fn report_all(engine: &mut Engine, plan: &crate::engine::TaskPlan, update: Option<Update>) {
    for id in &plan.selected {
        let sub = Submission {
            update: update.clone(),
            metrics: Default::default(),
            weight: 1.0,
            validation_weight: 1.0,
            bytes: 0,
        };
        engine
            .submit(id, "dp", plan.round, &plan.task_id, sub)
            .unwrap();
    }
}

/// The evaluation that hands the final version to the agents once training
/// is over (`run.evaluate` is off in these runs, so it is the only one).
/// Returns whether there was one.
fn serve_final(engine: &mut Engine, all: &[String]) -> bool {
    match engine.start_task(all) {
        Ok(plan) if plan.spec.kind == TaskKind::Evaluate => {
            evaluate_without_figures(engine, &plan);
            true
        }
        Ok(plan) => panic!("{} is not the final evaluation", plan.task_id),
        Err(_) => false,
    }
}

/// Every agent `plan` selected reports no figures; the task commits.
fn evaluate_without_figures(engine: &mut Engine, plan: &crate::engine::TaskPlan) {
    report_all(engine, plan, None);
    assert_eq!(engine.finish_task().unwrap().outcome, Outcome::Committed);
}

fn std_dev(xs: &[f32]) -> (f64, f64) {
    let n = xs.len() as f64;
    let mean = xs.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
    let var = xs
        .iter()
        .map(|&x| (f64::from(x) - mean).powi(2))
        .sum::<f64>()
        / (n - 1.0);
    (mean, var.sqrt())
}

#[test]
fn central_noise_on_the_sum_has_std_sigma_c_and_is_fresh_each_run() {
    let dir = tempfile::tempdir().unwrap();
    let all = agents(10);
    let (z, c) = (2.0, 0.5);
    let cfg = run(DpSettings::central(c, z, 1e-5), 5);
    let mut engine = Engine::open(
        Store::open(&dir.path().join("a.redb")).unwrap(),
        cfg.clone(),
    )
    .unwrap();
    let before = engine.global();
    let rec = round(&mut engine, &all, 0.0, None);
    assert_eq!(rec.outcome, Outcome::Committed);
    // Zero updates: the step is pure noise / m, so m·step has std z·C.
    let step: Vec<f32> = engine
        .global()
        .iter()
        .zip(before.iter())
        .map(|(a, b)| (a - b) * 5.0)
        .collect();
    let (mean, sd) = std_dev(&step);
    // 20 000 draws: the std estimate's relative error is ~0.5%, the mean's
    // std error 0.007; the bounds are 10 standard errors wide.
    assert!(
        (sd / (z * c) - 1.0).abs() < 0.05,
        "std {sd}, want {}",
        z * c
    );
    assert!(mean.abs() < 0.07, "mean {mean}");
    // The noise comes from the OS: the same configuration, seed included,
    // draws other noise.
    let dir2 = tempfile::tempdir().unwrap();
    let mut again = Engine::open(
        Store::open(&dir2.path().join("b.redb")).unwrap(),
        cfg.clone(),
    )
    .unwrap();
    round(&mut again, &all, 0.0, None);
    assert_ne!(again.global(), engine.global());
    // The simulator's seeded source replays bit for bit for a seed (and is
    // therefore not private); another seed draws other noise.
    let seeded = |cfg: RunConfig| {
        let dir = tempfile::tempdir().unwrap();
        let mut e = Engine::open(Store::open(&dir.path().join("s.redb")).unwrap(), cfg).unwrap();
        e.set_noise_source(NoiseSource::SeededNotPrivate);
        round(&mut e, &all, 0.0, None);
        e.global()
    };
    let mut other_cfg = cfg.clone();
    other_cfg.seed = 8;
    let first = seeded(cfg.clone());
    assert_eq!(seeded(cfg), first);
    assert_ne!(seeded(other_cfg), first);
}

/// The released step divides by the number of merchants *selected*, not by
/// the number who reported: a dropout damps the step instead of being
/// re-weighted (which would let the sensitivity depend on who reported).
/// The same seeded noise in both runs: with one of five dropped, the step
/// is smaller by exactly that merchant's update / 5.
#[test]
fn a_dropout_damps_the_central_dp_step_by_the_fixed_denominator() {
    let all = agents(10);
    let cfg = run(DpSettings::central(0.5, 2.0, 1e-5), 5);
    let v = 0.002_f32; // norm 0.002·√20000 ≈ 0.28, under the clip 0.5
    let step = |report: usize| {
        let dir = tempfile::tempdir().unwrap();
        let mut e = Engine::open(
            Store::open(&dir.path().join("d.redb")).unwrap(),
            cfg.clone(),
        )
        .unwrap();
        e.set_noise_source(NoiseSource::SeededNotPrivate);
        let before = e.global();
        let plan = e.start_task(&all).unwrap();
        assert_eq!(plan.selected.len(), 5);
        for id in plan.selected.iter().take(report) {
            let sub = Submission {
                update: Some(Update {
                    values: vec![v; DIM],
                    coord_weights: vec![],
                    weight: 1.0,
                }),
                metrics: Default::default(),
                weight: 1.0,
                validation_weight: 1.0,
                bytes: 0,
            };
            e.submit(id, "dp", plan.round, &plan.task_id, sub).unwrap();
        }
        let rec = e.finish_task().unwrap();
        assert_eq!(rec.outcome, Outcome::Committed);
        assert_eq!(rec.reported.len(), report);
        let after = e.global();
        after
            .iter()
            .zip(before.iter())
            .map(|(a, b)| a - b)
            .collect::<Vec<f32>>()
    };
    let (five, four) = (step(5), step(4));
    for (j, (a, b)) in five.iter().zip(&four).enumerate() {
        // Reported / selected would give (4v + noise) / 4 instead.
        assert!(
            ((a - b) - v / 5.0).abs() < 1e-5,
            "coordinate {j}: {a} - {b} is not v / 5 = {}",
            v / 5.0
        );
    }
}

/// The attack of a merchant who knows the run seed (every agent gets it in
/// the task spec): regenerate the coordinator's noise from
/// `seed::rng(seed, ["dp-noise", task])`, subtract it from the released step
/// and read the exact sum of the other merchants' updates. With noise from
/// the OS the residual is noise of the full scale.
#[test]
fn a_merchant_who_knows_the_run_seed_cannot_regenerate_the_central_noise() {
    use fedcart_common::privacy::dp::CentralGaussian;
    let dir = tempfile::tempdir().unwrap();
    let all = agents(10);
    let (z, c, m) = (2.0, 0.5, 5);
    let cfg = run(DpSettings::central(c, z, 1e-5), m);
    let mut engine = Engine::open(
        Store::open(&dir.path().join("a.redb")).unwrap(),
        cfg.clone(),
    )
    .unwrap();
    let before = engine.global();
    let rec = round(&mut engine, &all, 0.0, None);
    // The attacker's copy of the noise the coordinator used to add.
    let mut guess = vec![0.0f64; DIM];
    CentralGaussian::new(z, c).unwrap().add_to_sum(
        &mut guess,
        &mut fedcart_common::seed::rng(cfg.seed, &["dp-noise", &rec.task_id]),
    );
    // m·step − guessed noise = the sum of the updates (all zero here) if the
    // guess is right.
    let residual: Vec<f32> = engine
        .global()
        .iter()
        .zip(before.iter())
        .zip(&guess)
        .map(|((a, b), g)| ((f64::from(a - b) * m as f64) - g) as f32)
        .collect();
    let (_, sd) = std_dev(&residual);
    // Independent noise: the residual has std √2·z·C; a regenerated noise
    // would leave only f32 rounding (std < 1e-5).
    assert!(
        (sd / (2f64.sqrt() * z * c) - 1.0).abs() < 0.05,
        "the noise was regenerated from the seed: residual std {sd}"
    );
}

#[test]
fn epsilon_per_round_equals_the_accountants_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run.redb");
    let all = agents(10);
    let (z, delta) = (1.3, 1e-5);
    let cfg = run(DpSettings::central(1.0, z, delta), 5);
    let mut engine = Engine::open(Store::open(&path).unwrap(), cfg.clone()).unwrap();
    let mut eps = Vec::new();
    for _ in 0..2 {
        let rec = round(&mut engine, &all, 0.01, None);
        let p = rec.privacy.expect("privacy recorded");
        assert_eq!(
            p.sampling_rate, 1.0,
            "the selection is public: no amplification"
        );
        assert_eq!(p.denominator, 5);
        eps.push(p.epsilon);
    }
    for (t, e) in eps.iter().enumerate() {
        let want = epsilon_for(1.0, z, t as u64 + 1, delta).unwrap().epsilon;
        assert!((e - want).abs() < 1e-12, "round {}: {e} vs {want}", t + 1);
    }
    assert!(eps[1] > eps[0]);
    // Restart from the store: the ledger replays the history and the third
    // round's ε is the three-round ε.
    drop(engine);
    let mut engine = Engine::open(Store::open(&path).unwrap(), cfg).unwrap();
    assert_eq!(engine.ledger().unwrap().epsilon(), Some(eps[1]));
    let rec = round(&mut engine, &all, 0.01, None);
    let want = epsilon_for(1.0, z, 3, delta).unwrap().epsilon;
    assert!((rec.privacy.unwrap().epsilon - want).abs() < 1e-12);
    let history: Vec<f64> = engine
        .store()
        .history()
        .unwrap()
        .iter()
        .filter_map(|r| r.privacy.as_ref().map(|p| p.epsilon))
        .collect();
    assert_eq!(history.len(), 3);
    assert_eq!(&history[..2], &eps[..]);
}

#[test]
fn adaptive_clip_shrinks_when_everyone_fits_and_grows_when_nobody_does() {
    let mut settings = DpSettings::central(1.0, 0.5, 1e-5);
    settings.clip = ClipNorm::Adaptive;
    settings.initial_clip = 1.0;
    settings.count_noise_std = Some(0.5);
    let all = agents(20);
    let clips = |bit: f32| {
        let dir = tempfile::tempdir().unwrap();
        let mut engine = Engine::open(
            Store::open(&dir.path().join("a.redb")).unwrap(),
            run(settings.clone(), 20),
        )
        .unwrap();
        let mut clip = 1.0;
        (0..3)
            .map(|_| {
                let p = round(&mut engine, &all, 0.0, Some(bit)).privacy.unwrap();
                // Each round uses the clip the previous one chose.
                assert_eq!(p.clip, clip);
                assert_eq!(engine.ledger().unwrap().clip(), p.next_clip);
                clip = p.next_clip;
                clip
            })
            .collect::<Vec<_>>()
    };
    // All 20 unclipped: b̄ ≈ 1 > γ = 0.5, so C shrinks by ≈ e^(−0.1) a round.
    let down = clips(0.5);
    assert!(
        down[0] < 1.0 && down[1] < down[0] && down[2] < down[1],
        "{down:?}"
    );
    assert!((down[0] - (-0.2f64 * 0.5).exp()).abs() < 0.02, "{down:?}");
    let up = clips(-0.5);
    assert!(up[0] > 1.0 && up[2] > up[1], "{up:?}");
}

#[test]
fn distributed_noise_added_by_agents_under_secure_aggregation_has_the_target_scale() {
    let dir = tempfile::tempdir().unwrap();
    let all = agents(8);
    let (z, c) = (1.5, 0.25);
    let mut settings = DpSettings::central(c, z, 1e-5);
    settings.mode = DpMode::Distributed;
    let mut cfg = run(settings, 8);
    cfg.secagg = Some(SecAggSettings {
        neighbours: None,
        clip: 1.0,
        verify_survivors: false,
        stage_timeout_ms: None,
    });
    cfg.validate().unwrap();
    let mut engine = Engine::open(Store::open(&dir.path().join("a.redb")).unwrap(), cfg).unwrap();
    let before = engine.global();
    let plan = engine.start_task(&all).unwrap();
    assert!(plan.secure);
    let noise = plan
        .spec
        .dp
        .as_ref()
        .unwrap()
        .distributed
        .expect("agents add noise");
    let mut sa = SecAggConfig::complete(DIM, 0, 8, 1.0);
    noise.configure(&mut sa);
    sa.validate(8).unwrap();
    let zeros: Vec<Update> = (0..8)
        .map(|_| Update {
            values: vec![0.0; DIM],
            coord_weights: vec![],
            weight: 1.0,
        })
        .collect();
    // Each agent adds its Skellam share, as the simulator's agents do.
    let hook = |id: u32, input: &mut fedcart_common::privacy::secagg::EncodedInput| {
        let mut rng = fedcart_common::seed::rng(7, &["dp-skellam", &plan.task_id, &id.to_string()]);
        fedcart_common::privacy::dp::distributed::noise_encoded(input, &sa, &noise, &mut rng)
            .map_err(|e| fedcart_common::privacy::secagg::SecAggError::Config {
                parameter: "dp",
                message: e.to_string(),
            })
    };
    let out = run_in_memory_with(&sa, &zeros, &Dropouts::none(), 1, &hook).unwrap();
    let survivors: Vec<String> = plan.selected.clone();
    engine.set_secure_sum(&survivors, out.output.sum).unwrap();
    let rec = engine.finish_task().unwrap();
    let p = rec.privacy.unwrap();
    assert_eq!(p.noise_multiplier, z);
    let step: Vec<f32> = engine
        .global()
        .iter()
        .zip(before.iter())
        .map(|(a, b)| (a - b) * 8.0)
        .collect();
    let (mean, sd) = std_dev(&step);
    // Δ₂ = s·C + √d in encoded units: the noise std in value units is
    // z·(C + √d / s), a hair above z·C.
    let want = z * (c + (DIM as f64).sqrt() / noise.skellam.scale);
    assert!((sd / want - 1.0).abs() < 0.05, "std {sd}, want {want}");
    assert!(mean.abs() < 0.05, "mean {mean}");
}

#[test]
fn bad_dp_settings_are_refused_naming_the_field() {
    let field = |dp: DpSettings, edit: &dyn Fn(&mut RunConfig)| {
        let mut cfg = run(dp, 5);
        edit(&mut cfg);
        match cfg.validate() {
            Err(crate::config::ConfigError::Invalid { field, .. }) => field,
            other => panic!("expected an invalid field, got {other:?}"),
        }
    };
    let ok = DpSettings::central(1.0, 1.0, 1e-5);
    let mut both = ok.clone();
    both.target_epsilon = Some(2.0);
    assert_eq!(field(both, &|_| {}), "run.dp.noise_multiplier");
    assert_eq!(
        field(DpSettings::central(-1.0, 1.0, 1e-5), &|_| {}),
        "run.dp.clip"
    );
    assert_eq!(
        field(DpSettings::central(1.0, 1.0, 1.5), &|_| {}),
        "run.dp.delta"
    );
    let mut dist = ok.clone();
    dist.mode = DpMode::Distributed;
    assert_eq!(field(dist, &|_| {}), "run.dp.mode");
    assert_eq!(
        field(ok.clone(), &|c| c.strategy =
            fedcart_common::federation::strategy::StrategySpec::FedMedian),
        "run.strategy"
    );
    let mut target = ok.clone();
    target.noise_multiplier = None;
    target.target_epsilon = Some(-1.0);
    assert_eq!(field(target, &|_| {}), "run.dp.target_epsilon");
    // TOML: a number or "adaptive".
    let t: DpSettings = toml::from_str(
        "clip = \"adaptive\"\ntarget_epsilon = 4.0\ndelta = 1e-5\nmode = \"central\"",
    )
    .unwrap();
    assert_eq!(t.clip, ClipNorm::Adaptive);
    let t: DpSettings = toml::from_str("clip = 0.5\nnoise_multiplier = 1.1\ndelta = 1e-6").unwrap();
    assert_eq!(t.clip, ClipNorm::Fixed(0.5));
    let e = toml::from_str::<DpSettings>("clip = \"big\"\nnoise_multiplier = 1.0\ndelta = 1e-5")
        .unwrap_err()
        .to_string();
    assert!(e.contains("adaptive"), "{e}");
}

#[test]
fn target_epsilon_is_met_by_the_solved_noise_over_the_planned_rounds() {
    let dir = tempfile::tempdir().unwrap();
    let all = agents(10);
    let mut settings = DpSettings::central(1.0, 1.0, 1e-5);
    settings.noise_multiplier = None;
    settings.target_epsilon = Some(2.0);
    settings.population = Some(10);
    let mut engine = Engine::open(
        Store::open(&dir.path().join("a.redb")).unwrap(),
        run(settings, 5),
    )
    .unwrap();
    let mut last = 0.0;
    while engine.version() < 3 {
        last = round(&mut engine, &all, 0.0, None).privacy.unwrap().epsilon;
    }
    assert!(serve_final(&mut engine, &all));
    assert!(engine.finished());
    assert!(last <= 2.0 && last > 1.99, "final epsilon {last}");
}

/// Distributed rounds that commit with only the quorum (3 of the 4
/// selected) each: `z` is solved for that worst case, so all three planned
/// rounds run and end at the target (the budget check refused the last one
/// when the plan assumed every agent's share).
#[test]
fn a_distributed_target_is_planned_for_rounds_that_commit_with_the_quorum() {
    let dir = tempfile::tempdir().unwrap();
    let all = agents(10);
    let mut settings = DpSettings::central(1.0, 1.0, 1e-5);
    settings.noise_multiplier = None;
    settings.target_epsilon = Some(2.0);
    let cfg = distributed_secure_run(settings);
    let mut engine = Engine::open(Store::open(&dir.path().join("q.redb")).unwrap(), cfg).unwrap();
    let (spent, stop) = distributed_rounds_with_three_survivors(&mut engine, &all);
    assert!(stop.is_none() && engine.stopped().is_none(), "{stop:?}");
    assert_eq!(engine.version(), 3);
    let last = *spent.last().unwrap();
    assert!(last <= 2.0 && last > 1.99, "{spent:?}");
}

/// Distributed training rounds in which only the first three selected
/// agents survive, until the run ends: the ε after each, and the stop that
/// refused the next round, if one did.
fn distributed_rounds_with_three_survivors(
    engine: &mut Engine,
    all: &[String],
) -> (Vec<f64>, Option<RunStop>) {
    use fedcart_common::privacy::secagg::DecodedSum;
    let mut spent = Vec::new();
    loop {
        let plan = match engine.start_task(all) {
            Ok(plan) if plan.spec.kind == TaskKind::Evaluate => {
                // Training is over: the final version goes to the agents.
                assert_eq!(plan.round, engine.version());
                evaluate_without_figures(engine, &plan);
                continue;
            }
            Ok(plan) => plan,
            Err(EngineError::Stopped(stop)) => {
                // A planned stop: the last version still goes to the agents.
                assert!(serve_final(engine, all));
                return (spent, Some(stop));
            }
            Err(EngineError::Finished) => return (spent, None),
            Err(e) => panic!("{e}"),
        };
        let survivors = &plan.selected[..3];
        let sum = DecodedSum {
            values: vec![0.0; plan.spec.update_len()],
            coord_weights: Vec::new(),
            weight: 0.0,
            count: survivors.len(),
            clipped: 0,
        };
        engine.set_secure_sum(survivors, sum).unwrap();
        let rec = engine.finish_task().unwrap();
        assert_eq!(rec.outcome, Outcome::Committed);
        spent.push(rec.privacy.unwrap().epsilon);
    }
}

/// The budget is enforced: a cohort larger than the plan's (5 selected
/// where `selection.min_agents` planned 4) with only the quorum of 3
/// surviving has less noise per round than planned (z·√(3 / 5)), so ε grows
/// faster; the run stops before the round that could exceed
/// `target_epsilon`, saying so, and the ε spent never exceeds the target.
#[test]
fn the_run_stops_before_a_round_would_exceed_target_epsilon() {
    let dir = tempfile::tempdir().unwrap();
    let all = agents(10);
    let mut settings = DpSettings::central(1.0, 1.0, 1e-5);
    settings.noise_multiplier = None;
    settings.target_epsilon = Some(2.0);
    let mut cfg = distributed_secure_run(settings);
    cfg.selection.max_agents = 10;
    let mut engine = Engine::open(Store::open(&dir.path().join("b.redb")).unwrap(), cfg).unwrap();
    // Three of the five selected survive each secure round.
    let (spent, stop) = distributed_rounds_with_three_survivors(&mut engine, &all);
    let stop = stop.expect("the budget stops the run");
    assert!(engine.finished());
    assert_eq!(engine.stopped(), Some(&stop));
    let RunStop::Budget {
        round,
        spent: at_stop,
        next,
        target,
        over_plan,
    } = stop.clone()
    else {
        panic!("{stop:?}");
    };
    // Rounds at √(4/5) of the planned worst case: the third does not fit.
    assert_eq!(round, 3, "{stop} {spent:?}");
    assert_eq!(spent.len(), 2);
    assert!(spent.iter().all(|&e| e <= target), "{spent:?}");
    assert_eq!(Some(&at_stop), spent.last());
    assert!(at_stop <= target && next > target, "{stop}");
    let text = stop.to_string();
    assert!(
        text.contains("target_epsilon 2") && text.contains(&format!("round {round}")),
        "{text}"
    );
    // The plan took `min_agents` (4) for the cohort; five were selected.
    assert_eq!(over_plan, Some((4, 5)), "{text}");
    assert!(
        text.contains("planned for rounds of 4 merchants")
            && text.contains("selected 5: set run.dp.population"),
        "{text}"
    );
    // The stop is stored with the run: a restarted engine stays stopped.
    drop(engine);
    let cfg = engine_cfg_of(&dir);
    let again = Engine::open(Store::open(&dir.path().join("b.redb")).unwrap(), cfg).unwrap();
    assert!(
        matches!(again.stopped(), Some(RunStop::Budget { round: 3, .. })),
        "{:?}",
        again.stopped()
    );
    assert!(again.finished());
}

/// δ must stay below 1/n for the n merchants a round can be drawn from:
/// with `population` unset the check at start took `min_agents` (3), and a
/// δ of 0.009 ran rounds over 150 merchants. The round is not started, the
/// stop names the keys to set and stays across a restart; a federation of
/// 111 (δ·n < 1) trains.
#[test]
fn a_delta_not_below_one_over_the_merchants_available_stops_the_run_before_the_round() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = run(DpSettings::central(1.0, 1.0, 0.009), 3);
    cfg.selection.max_agents = 200;
    cfg.validate()
        .expect("the check at start passes: 0.009 < 1/3");
    let mut engine = Engine::open(
        Store::open(&dir.path().join("d.redb")).unwrap(),
        cfg.clone(),
    )
    .unwrap();
    round(&mut engine, &agents(111), 0.0, None);
    let e = engine.start_task(&agents(150)).unwrap_err();
    let EngineError::Stopped(stop) = e else {
        panic!("{e}");
    };
    assert_eq!(
        stop,
        RunStop::Delta {
            round: 2,
            delta: 0.009,
            merchants: 150,
            assumed: 3
        }
    );
    let text = stop.to_string();
    assert!(
        text.starts_with("run.dp.delta = 0.009 is not below 1/150")
            && text.contains("set run.dp.population to the federation's size"),
        "{text}"
    );
    assert_eq!(
        engine.store().history().unwrap().len(),
        1,
        "nothing started"
    );
    drop(engine);
    let again = Engine::open(Store::open(&dir.path().join("d.redb")).unwrap(), cfg).unwrap();
    assert_eq!(again.stopped(), Some(&stop));
}

/// `settings` in distributed mode over a secure run of 4 selected agents
/// that commits with 3.
fn distributed_secure_run(mut settings: DpSettings) -> RunConfig {
    settings.mode = DpMode::Distributed;
    let mut cfg = run(settings, 4);
    cfg.quorum = 3;
    cfg.secagg = Some(SecAggSettings {
        neighbours: None,
        clip: 1.0,
        verify_survivors: false,
        stage_timeout_ms: None,
    });
    cfg
}

fn engine_cfg_of(dir: &tempfile::TempDir) -> RunConfig {
    let store = Store::open(&dir.path().join("b.redb")).unwrap();
    store.meta_json::<RunConfig>("run_config").unwrap().unwrap()
}

/// A secure sum that was unmasked and then refused (a malicious agent's
/// out-of-range input) released nothing, but the coordinator saw it with the
/// agents' noise in it: the round is accounted at the noise of its
/// survivors, the run stops rather than retrying over the same inputs, and a
/// restarted engine replays both.
#[test]
fn a_refused_unmasked_sum_is_accounted_and_stops_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let all = agents(10);
    let settings = DpSettings::central(1.0, 1.0, 1e-5);
    let cfg = distributed_secure_run(settings);
    let path = dir.path().join("r.redb");
    let mut engine = Engine::open(Store::open(&path).unwrap(), cfg.clone()).unwrap();
    let plan = engine.start_task(&all).unwrap();
    engine.refuse_unmasked_sum("round refused: out of range".into(), 3);
    let rec = engine.finish_task().unwrap();
    assert_eq!(rec.outcome, Outcome::Aborted);
    assert_eq!(
        rec.abort_reason.as_deref(),
        Some("secure aggregation: round refused: out of range")
    );
    let p = rec.privacy.expect("accounted");
    let z = engine.ledger().unwrap().noise_multiplier();
    assert!(
        (p.noise_multiplier - z * (3.0f64 / 4.0).sqrt()).abs() < 1e-12,
        "{p:?}"
    );
    assert!(p.epsilon > 0.0 && p.steps == 1, "{p:?}");
    assert_eq!(engine.ledger().unwrap().epsilon(), Some(p.epsilon));
    assert!(
        matches!(engine.stopped(), Some(RunStop::Revealed { round: 1, .. })),
        "{:?}",
        engine.stopped()
    );
    assert!(engine.finished());
    assert!(engine.start_task(&all).is_err(), "no second attempt");
    assert_eq!(engine.version(), 0, "{}", plan.task_id);
    drop(engine);
    let again = Engine::open(Store::open(&path).unwrap(), cfg).unwrap();
    assert_eq!(again.ledger().unwrap().epsilon(), Some(p.epsilon));
    assert!(matches!(again.stopped(), Some(RunStop::Revealed { .. })));
}

/// δ at or above 1/n (n the population, else `selection.min_agents`) is no
/// guarantee, and a noise scale z·clip beyond f32 cannot be added: both are
/// refused at submission, naming the field (they ran, and the second failed
/// every round with a non-finite aggregate).
#[test]
fn a_meaningless_delta_or_an_overflowing_noise_scale_is_refused() {
    let refused = |dp: DpSettings| match run(dp, 4).validate() {
        Err(crate::config::ConfigError::Invalid { field, message }) => (field, message),
        other => panic!("{other:?}"),
    };
    let (field, message) = refused(DpSettings::central(1.0, 1.0, 0.25));
    assert_eq!(field, "run.dp.delta");
    assert!(message.contains("above 0.01"), "{message}");
    let mut large = DpSettings::central(1.0, 1.0, 0.005);
    large.population = Some(400);
    let (field, message) = refused(large);
    assert_eq!(field, "run.dp.delta");
    assert!(message.contains("not below 1/400"), "{message}");
    // The population, when given, is the n: 5e-4 is below 1/1000.
    let mut with_population = DpSettings::central(1.0, 1.0, 5e-4);
    with_population.population = Some(1000);
    run(with_population.clone(), 4).validate().unwrap();
    with_population.population = Some(3000);
    assert_eq!(refused(with_population.clone()).0, "run.dp.delta");
    // A federation smaller than a round's cohort is not one.
    with_population.population = Some(2);
    let (field, message) = refused(with_population);
    assert_eq!(field, "run.dp.population");
    assert!(
        message.contains("fewer than selection.min_agents (4)"),
        "{message}"
    );
    assert_eq!(
        refused(DpSettings::central(1.0, 1e300, 1e-5)).0,
        "run.dp.noise_multiplier"
    );
    // A clip that large is refused on its own (above 1e15).
    assert_eq!(
        refused(DpSettings::central(1e300, 1.0, 1e-5)).0,
        "run.dp.clip"
    );
}

/// A fixed noise multiplier too small for the planned rounds ran without a
/// word; the operator now hears the ε it reaches (as the ledger accounts
/// it) and what to change, and nothing when the plan stays within ε = 10
/// or a target stops the run.
#[test]
fn a_noise_multiplier_too_small_for_the_planned_rounds_is_called_out() {
    let mut cfg = run(DpSettings::central(1.0, 0.5, 1e-5), 5);
    cfg.rounds = 5;
    let eps = epsilon_for(1.0, 0.5, 5, 1e-5).unwrap().epsilon;
    assert!(eps > 10.0, "{eps}");
    let w = cfg
        .dp
        .as_ref()
        .unwrap()
        .weak_guarantee_warning(&cfg)
        .expect("a warning");
    assert!(
        w.starts_with(&format!(
            "run.dp: noise_multiplier 0.5 over 5 rounds reaches ε = {eps:.3e} at δ = 1e-5"
        )),
        "{w}"
    );
    assert!(epsilon_for(1.0, 2.0, 5, 1e-5).unwrap().epsilon < 10.0);
    let within = run(DpSettings::central(1.0, 2.0, 1e-5), 5);
    let within = RunConfig {
        rounds: 5,
        ..within
    };
    assert_eq!(
        within.dp.as_ref().unwrap().weak_guarantee_warning(&within),
        None
    );
    let mut targeted = cfg.clone();
    targeted.dp.as_mut().unwrap().target_epsilon = Some(50.0);
    assert_eq!(
        targeted
            .dp
            .as_ref()
            .unwrap()
            .weak_guarantee_warning(&targeted),
        None
    );
}
