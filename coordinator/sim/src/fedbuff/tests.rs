//! FedBuff driver tests: equivalence with synchronous FedAvg in the limit,
//! staleness weighting as committed to the store, determinism, and accuracy.

use std::path::PathBuf;

use fedcart_common::federation::fedbuff::Staleness;

use super::*;
use crate::{Experiment, SimArgs, data, run_all};
use fedcart_coordinator::config::{RunConfig, Selection};
use fedcart_coordinator::store::Store;

fn repo(path: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path)
        .display()
        .to_string()
}

fn churn_args() -> SimArgs {
    SimArgs {
        task: Some("churn-lr".parse().unwrap()),
        data: Some(
            format!("telco:{}", repo(data::DEFAULT_TELCO))
                .parse()
                .unwrap(),
        ),
        merchants: Some(4),
        rounds: Some(3),
        ..Default::default()
    }
}

fn run(a: SimArgs) -> Vec<Experiment> {
    run_all(&Settings::from_args(a).unwrap()).unwrap()
}

#[test]
fn a_full_buffer_without_staleness_replays_synchronous_fedavg() {
    // K = C = all merchants, everyone online: every buffer holds every
    // merchant's update on the same version, so FedBuff is FedAvg — the same
    // models, metrics and virtual times.
    let mut a = churn_args();
    a.speed_sigma = Some(1.0);
    let sync = run(a.clone());
    a.mode = Some(crate::ModeName::Fedbuff);
    a.buffer = Some(4);
    a.concurrency = Some(4);
    let buff = run(a);
    let (s, b) = (&sync[0], &buff[0]);
    assert_eq!(b.mode, "fedbuff");
    assert_eq!(s.rounds.len(), b.rounds.len());
    for (rs, rb) in s.rounds.iter().zip(&b.rounds) {
        assert_eq!(rs.eval, rb.eval, "round {}", rs.round);
        assert_eq!(rs.virtual_seconds, rb.virtual_seconds);
        // The same uploads and downloads, evaluations' histograms included
        // (FedBuff's collective tasks once counted no bytes up).
        assert_eq!(
            (rs.bytes_up, rs.bytes_down),
            (rb.bytes_up, rb.bytes_down),
            "round {}",
            rs.round
        );
        assert_eq!((rb.reported, rb.staleness_max), (4, 0));
    }
    assert!(s.rounds[0].virtual_seconds > 0.0);
    assert!(
        s.rounds
            .windows(2)
            .all(|w| w[1].virtual_seconds > w[0].virtual_seconds)
    );
}

/// Runs the FedBuff driver on `noop:4` (seeded random updates that ignore the
/// global model) with K = 1 and returns the committed versions and rows.
fn noop_versions(staleness: &str) -> (Vec<Vec<f32>>, Vec<RoundRow>, Vec<String>) {
    let a = SimArgs {
        task: Some("noop:4".parse().unwrap()),
        merchants: Some(3),
        rounds: Some(12),
        mode: Some(crate::ModeName::Fedbuff),
        buffer: Some(1),
        concurrency: Some(3),
        staleness: Some(staleness.into()),
        speed_sigma: Some(1.0),
        ..Default::default()
    };
    let s = Settings::from_args(a).unwrap();
    let crate::mode::Mode::FedBuff(cfg) = &s.mode else {
        unreachable!()
    };
    let task = data::TaskChoice::Noop(4);
    let pop = data::build(
        task,
        &data::DataSpec::None,
        None,
        b',',
        3,
        s.partition,
        s.mf_hyper(task),
        s.factors(task),
        s.seed,
    )
    .unwrap();
    let run = RunConfig {
        run_id: "simulation".into(),
        seed: s.seed,
        rounds: s.rounds,
        model: pop.model.clone(),
        sgd: s.sgd(task),
        selection: Selection {
            fraction: 1.0,
            min_agents: 1,
            max_agents: 3,
            min_available: 0,
        },
        quorum: 1,
        round_timeout_ms: u64::MAX / 2,
        evaluate: false,
        strategy: Default::default(),
        secagg: None,
        dp: None,
        max_attempts: fedcart_coordinator::config::DEFAULT_MAX_ATTEMPTS,
        early_stopping: None,
    };
    let dir = tempfile::tempdir().unwrap();
    let mut engine = Engine::open(Store::open(&dir.path().join("s.redb")).unwrap(), run).unwrap();
    let fleet = Fleet::new(&s.clock, s.seed, &pop.merchants, &pop.model, &s.sgd(task));
    let ids: Vec<String> = pop
        .merchants
        .iter()
        .map(|m| m.merchant_id.clone())
        .collect();
    let merchants: Vec<Mutex<LocalData>> = pop.merchants.into_iter().map(Mutex::new).collect();
    let mut exp = Experiment::new(task, &data::DataSpec::None, &s, 3, &pop.model, 0.0);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    let cx = Ctx {
        s: &s,
        cfg,
        ids: &ids,
        merchants: &merchants,
        fleet: &fleet,
        malicious: &BTreeSet::new(),
        pool: &pool,
        bar: &indicatif::ProgressBar::hidden(),
    };
    drive(&cx, &mut engine, &mut exp).unwrap();
    let versions = (0..=12)
        .map(|v| {
            engine
                .store()
                .model(v)
                .unwrap()
                .expect("every version stored")
        })
        .collect();
    let who = engine
        .store()
        .history()
        .unwrap()
        .into_iter()
        .filter(|r| r.kind == fedcart_common::task::TaskKind::Train)
        .map(|r| r.reported[0].clone())
        .collect();
    (versions, exp.rounds, who)
}

#[test]
fn stale_updates_are_committed_with_the_smaller_weight() {
    let (versions, rows, who) = noop_versions("sqrt");
    assert_eq!(rows.len(), 12);
    assert!(
        rows.iter().any(|r| r.staleness_max >= 1),
        "no stale update in {rows:?}"
    );
    assert!(rows.iter().any(|r| r.staleness_max == 0));
    for (v, (row, merchant)) in rows.iter().zip(&who).enumerate() {
        let v = v + 1;
        let tau = row.staleness_max;
        // The update the merchant computed on the version it downloaded.
        let spec = TaskSpec {
            kind: TaskKind::Train,
            model: fedcart_common::task::ModelSpec::Noop { dim: 4 },
            sgd: Default::default(),
            seed: 42,
            round: v as u64 - tau,
            standardizer: None,
            dp: None,
            best_version: None,
        };
        let mut local = LocalData {
            merchant_id: merchant.clone(),
            ..Default::default()
        };
        let u = run_task(&spec, &[0.0; 4], &mut local)
            .unwrap()
            .update
            .unwrap();
        let s = Staleness::Sqrt.weight(tau);
        for ((now, before), x) in versions[v].iter().zip(&versions[v - 1]).zip(&u.values) {
            let step = now - before;
            assert!(
                (step - s as f32 * x).abs() < 1e-6,
                "version {v} τ {tau}: step {step}, update {x} × s {s}"
            );
        }
    }
    // The same schedule with s = 1: the stale steps are larger, fresh ones equal.
    let (flat, rows_c, who_c) = noop_versions("const");
    assert_eq!((rows_c.len(), &who_c), (rows.len(), &who));
    for (v, row) in rows.iter().enumerate() {
        let (sqrt_step, const_step) = (
            (versions[v + 1][0] - versions[v][0]).abs(),
            (flat[v + 1][0] - flat[v][0]).abs(),
        );
        if row.staleness_max == 0 {
            assert_eq!(sqrt_step, const_step);
        } else {
            assert!(sqrt_step < const_step, "version {}", v + 1);
        }
    }
}

#[test]
fn same_seed_gives_identical_fedbuff_runs_whatever_the_thread_count() {
    let mut a = churn_args();
    a.merchants = Some(8);
    a.rounds = Some(6);
    a.mode = Some(crate::ModeName::Fedbuff);
    a.buffer = Some(2);
    a.concurrency = Some(5);
    a.speed_sigma = Some(1.0);
    a.availability = Some(0.75);
    a.availability_period = Some(0.5);
    a.dropout = Some(0.1);
    a.threads = Some(1);
    let one = run(a.clone());
    a.threads = Some(3);
    let three = run(a.clone());
    assert_eq!(one[0].without_timings(), three[0].without_timings());
    assert!(one[0].rounds.iter().any(|r| r.staleness_max > 0));
    a.seed = Some(7);
    assert_ne!(one[0].without_timings(), run(a)[0].without_timings());
}

#[test]
fn fedbuff_trains_churn_lr_to_a_sane_auc_with_heavy_tailed_speeds() {
    let mut a = churn_args();
    a.merchants = Some(10);
    a.rounds = Some(12);
    a.mode = Some(crate::ModeName::Fedbuff);
    a.buffer = Some(3);
    a.concurrency = Some(10);
    a.speed_sigma = Some(1.0);
    let e = &run(a)[0];
    let auc = e.final_metrics["auc"];
    assert!(auc > 0.8, "auc {auc}");
    assert!(e.rounds.iter().all(|r| r.committed && r.reported == 3));
    assert!(e.rounds.iter().any(|r| r.staleness_mean > 0.0));
}

#[test]
fn fedbuff_settings_are_validated() {
    let mut a = churn_args();
    a.buffer = Some(2);
    let e = Settings::from_args(a).unwrap_err().to_string();
    assert!(e.contains("only to --mode fedbuff"), "{e}");
    let mut a = churn_args();
    a.mode = Some(crate::ModeName::Fedbuff);
    a.buffer = Some(5);
    assert!(
        Settings::from_args(a.clone())
            .unwrap_err()
            .to_string()
            .contains("--buffer 5")
    );
    a.buffer = None;
    a.staleness = Some("poly:-1".into());
    assert!(Settings::from_args(a.clone()).is_err());
    a.staleness = None;
    let s = Settings::from_args(a).unwrap();
    assert_eq!(
        s.mode,
        crate::mode::Mode::FedBuff(FedBuffSettings {
            buffer: 1,
            concurrency: 4,
            staleness: Staleness::Sqrt,
            server_lr: 1.0
        })
    );
    assert!("async".parse::<crate::ModeName>().is_err());
    // With DP, η above 1 would scale clipped updates past the clip the noise
    // and the reported ε were sized for (ε 9.0 reported at an effective
    // noise multiplier of 0.01 with η = 100).
    let mut a = churn_args();
    a.mode = Some(crate::ModeName::Fedbuff);
    a.dp_clip = Some("1".into());
    a.dp_noise = Some(1.0);
    a.server_lr = Some(100.0);
    let e = Settings::from_args(a.clone()).unwrap_err().to_string();
    assert!(
        e.starts_with("--server-lr 100 above 1 with differential privacy")
            && e.ends_with("give 1 or less (or leave DP out)"),
        "{e}"
    );
    a.server_lr = Some(1.0);
    Settings::from_args(a.clone()).unwrap();
    a.server_lr = Some(0.5);
    Settings::from_args(a).unwrap();
    let mut a = churn_args();
    a.availability = Some(0.0);
    assert!(
        Settings::from_args(a)
            .unwrap_err()
            .to_string()
            .contains("availability")
    );
}

#[test]
fn fedbuff_settings_come_from_the_toml_file_too() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sim.toml");
    std::fs::write(
        &path,
        "mode = \"fedbuff\"\nbuffer = 2\nconcurrency = 3\nstaleness = \"poly:0.5\"\n\
         speed_sigma = 1.5\navailability = 0.5\n",
    )
    .unwrap();
    let mut a = churn_args();
    a.config = Some(path);
    a.concurrency = Some(4);
    let s = Settings::from_args(a).unwrap();
    let crate::mode::Mode::FedBuff(f) = &s.mode else {
        panic!("{:?}", s.mode)
    };
    assert_eq!(
        (f.buffer, f.concurrency, f.staleness),
        (2, 4, Staleness::Poly(0.5))
    );
    assert_eq!((s.clock.speed_sigma, s.clock.availability), (1.5, 0.5));
}

#[test]
fn fedbuff_buffers_go_through_secure_aggregation() {
    let a = SimArgs {
        task: Some("noop:8".parse().unwrap()),
        merchants: Some(4),
        rounds: Some(3),
        mode: Some(crate::ModeName::Fedbuff),
        buffer: Some(2),
        concurrency: Some(4),
        speed_sigma: Some(1.0),
        secagg: true,
        ..Default::default()
    };
    let e = &run(a)[0];
    assert_eq!(e.rounds.len(), 3);
    assert!(
        e.rounds
            .iter()
            .all(|r| r.committed && r.reported == 2 && r.clipped == 0),
        "{:?}",
        e.rounds
    );
}

#[test]
fn the_example_fedbuff_config_parses() {
    let s = Settings::from_args(SimArgs {
        config: Some(repo("coordinator/sim/examples/simulate-fedbuff.toml").into()),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(
        s.mode,
        crate::mode::Mode::FedBuff(FedBuffSettings {
            buffer: 5,
            concurrency: 20,
            staleness: Staleness::Sqrt,
            server_lr: 1.0
        })
    );
    assert_eq!(s.clock.speed_sigma, 1.0);
}

/// Explicit MF's global mean μ is a statistic (each merchant reports its
/// own mean against the version it downloaded): applied to a later version,
/// each stale update added the whole mean again, and RMSE climbed to 3–7
/// on ratings of 0.5–5. Taken against the version it is applied to, every
/// version stays a sane model.
#[test]
fn stale_explicit_mf_updates_do_not_add_the_global_mean_again() {
    let a = SimArgs {
        task: Some("mf".parse().unwrap()),
        data: Some(
            format!("movielens:{}", repo(data::DEFAULT_MOVIELENS))
                .parse()
                .unwrap(),
        ),
        factors: Some(8),
        rounds: Some(6),
        patience: Some(0),
        mode: Some(crate::ModeName::Fedbuff),
        ..Default::default()
    };
    let e = &run(a)[0];
    assert!(e.rounds.iter().any(|r| r.staleness_mean > 0.0));
    let rmse: Vec<f64> = e
        .rounds
        .iter()
        .filter_map(|r| r.eval.get("rmse").copied())
        .collect();
    assert_eq!(rmse.len(), 6, "{rmse:?}");
    assert!(rmse.iter().all(|&r| r < 1.2), "{rmse:?}");
}

/// Combinations that cannot commit a version are refused before any round
/// (they ran ten aborted attempts and ended with an error that named
/// neither flag): a Krum buffer below 2f + 3, a secure buffer of one, and
/// `--patience` for a model without a validation metric.
#[test]
fn fedbuff_buffers_no_version_can_commit_with_and_a_patience_nothing_reads_are_refused() {
    let refused = |a: SimArgs, want: &str| {
        let err = run_all(&Settings::from_args(a).unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains(want), "{err}");
    };
    let mut a = churn_args();
    a.merchants = Some(8);
    a.mode = Some(crate::ModeName::Fedbuff);
    a.strategy = Some("krum:1".parse().unwrap());
    refused(
        a,
        "--strategy krum:1 needs at least 5 updates a version, but --buffer 2",
    );
    let mut a = churn_args();
    a.task = Some("noop:8".parse().unwrap());
    a.data = None;
    a.merchants = Some(6);
    a.mode = Some(crate::ModeName::Fedbuff);
    a.secagg = true;
    refused(a, "give --buffer 2 or more");
    let mut a = churn_args();
    a.task = Some("noop:8".parse().unwrap());
    a.data = None;
    a.patience = Some(1);
    refused(
        a,
        "--patience applies to models that report a validation metric",
    );
}

/// Row-sparse traffic is not modelled by the FedBuff driver (whole vectors
/// move): refused, where it reported dense bytes as if rows had moved.
#[test]
fn row_sparse_traffic_is_refused_under_fedbuff() {
    let a = SimArgs {
        task: Some("mf".parse().unwrap()),
        mode: Some(crate::ModeName::Fedbuff),
        traffic: Some(crate::traffic::TrafficMode::Rows),
        ..Default::default()
    };
    let err = Settings::from_args(a).unwrap_err().to_string();
    assert!(err.contains("--mode fedbuff moves whole vectors"), "{err}");
}

/// Under FedBuff with DP every committed version's row carried no ε: the
/// summary gave the total while metrics.json, metrics.csv and report.html
/// showed none. Each row carries the ε spent so far, rising, the last the
/// run's total.
#[test]
fn fedbuff_rows_carry_the_epsilon_spent_so_far() {
    let mut a = churn_args();
    a.mode = Some(crate::ModeName::Fedbuff);
    a.merchants = Some(10);
    a.rounds = Some(4);
    a.dp_clip = Some("1".into());
    a.dp_noise = Some(1.0);
    let exp = run(a).remove(0);
    let eps: Vec<f64> = exp.rounds.iter().filter_map(|r| r.epsilon).collect();
    assert_eq!(eps.len(), exp.rounds.iter().filter(|r| r.committed).count());
    assert!(
        eps.len() >= 2 && eps.windows(2).all(|w| w[1] > w[0]),
        "{eps:?}"
    );
    let total = exp.privacy.as_ref().unwrap().epsilon;
    assert_eq!(eps.last().copied(), Some(total));
    assert!(
        exp.rounds
            .iter()
            .all(|r| r.dp_clip.is_none_or(|c| c == 1.0))
    );
}
