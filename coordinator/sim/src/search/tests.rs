//! The search: deterministic for a seed, within its budget, choosing by
//! federated validation; its settings errors name the flag.

use std::path::PathBuf;

use super::*;
use crate::SimArgs;

fn movielens_mf() -> SimArgs {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(crate::data::DEFAULT_MOVIELENS);
    SimArgs {
        task: Some("mf".parse().unwrap()),
        data: Some(format!("movielens:{}", path.display()).parse().unwrap()),
        merchants: Some(4),
        rounds: Some(2),
        epochs: Some(1),
        ..Default::default()
    }
}

fn pool() -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new().build().unwrap()
}

#[test]
fn the_search_is_deterministic_within_budget_and_drops_a_config_that_cannot_learn() {
    let s = Settings::from_args(movielens_mf()).unwrap();
    let task = TaskChoice::Mf;
    let (_, data) = s.experiments().remove(0);
    let given = given(&s, task);
    // A learning rate of 1e-6 barely moves the model from its random
    // start: a configuration every validation slice scores badly.
    let frozen = SearchConfig {
        lr: 1e-6,
        factors: 2,
        ..given
    };
    let configs = [
        frozen,
        given,
        SearchConfig {
            lr: 2.0 * given.lr,
            ..given
        },
        SearchConfig {
            factors: 16,
            ..given
        },
    ];
    let pool = pool();
    let a = halve(&s, task, &data, &pool, &configs, 9).unwrap();
    let b = halve(&s, task, &data, &pool, &configs, 9).unwrap();
    let zero = |mut x: SearchSummary| {
        x.seconds = 0.0;
        x.seconds_per_round = 0.0;
        x.trials
            .iter_mut()
            .flat_map(|t| &mut t.rungs)
            .for_each(|r| r.seconds = 0.0);
        x
    };
    let (a, b) = (zero(a), zero(b));
    assert_eq!(a, b, "same seed, same search");

    // Budget 9 over 4 candidates: two rungs of ⌊4.5⌋ rounds, 4 × 1 then 2 × 2.
    let plan: Vec<(usize, u64)> = a
        .schedule
        .iter()
        .map(|r| (r.candidates, r.rounds))
        .collect();
    assert_eq!(plan, vec![(4, 1), (2, 2)]);
    assert_eq!(a.rounds_used, 8);
    assert!(a.rounds_used <= a.budget);
    assert_eq!(a.metric, "val_rmse");
    assert!(!a.higher_is_better);

    // The frozen configuration is dropped after the first rung, worst of all.
    let first: Vec<f64> = a
        .trials
        .iter()
        .map(|t| {
            t.rungs[0]
                .value
                .unwrap_or_else(|| panic!("{:?}", t.rungs[0]))
        })
        .collect();
    assert_eq!(a.trials[0].rungs.len(), 1);
    assert!(!a.trials[0].rungs[0].kept);
    assert!(first[1..].iter().all(|&v| v < first[0] - 0.05), "{first:?}");
    // Each rung keeps the better half by validation, and the choice is the
    // last rung's best.
    let mut order: Vec<usize> = (0..4).collect();
    order.sort_by(|&x, &y| first[x].total_cmp(&first[y]));
    let second: Vec<usize> = a
        .trials
        .iter()
        .filter(|t| t.rungs.len() == 2)
        .map(|t| t.candidate)
        .collect();
    let mut expected = order[..2].to_vec();
    expected.sort_unstable();
    assert_eq!(second, expected);
    let last = |k: usize| a.trials[k].rungs[1].value.unwrap();
    let other = second.iter().copied().find(|&k| k != a.chosen).unwrap();
    assert!(second.contains(&a.chosen) && last(a.chosen) <= last(other));
    assert!(a.trials[a.chosen].rungs[1].kept && !a.trials[other].rungs[1].kept);
    for t in &a.trials {
        for r in &t.rungs {
            assert_eq!(r.rounds, r.allotted, "no trial stops early in two rounds");
            assert!(r.error.is_none() && r.best_version.is_some() && r.bytes_up > 0);
        }
    }

    // Its score is what the engine selects: the chosen configuration run
    // alone for the last rung's rounds has that best version and value.
    let alone = crate::run_one(&with_config(&s, &configs[a.chosen]), task, &data, &pool).unwrap();
    let best = alone.best.expect("a validation metric");
    assert_eq!(
        (best.round, best.value),
        (
            a.trials[a.chosen].rungs[1].best_version.unwrap(),
            last(a.chosen)
        )
    );
}

#[test]
fn candidates_start_from_the_given_settings_and_follow_the_seed() {
    let s = Settings::from_args(movielens_mf()).unwrap();
    let a = candidates(&s, TaskChoice::Mf).unwrap();
    assert_eq!(a.len(), crate::settings::DEFAULT_SEARCH_CANDIDATES);
    assert_eq!(a[0], given(&s, TaskChoice::Mf));
    assert_eq!(a, candidates(&s, TaskChoice::Mf).unwrap());
    for (k, c) in a.iter().enumerate() {
        assert!(!a[..k].contains(c), "candidate {k} repeats");
        let k = a[0].factors;
        assert!(
            [k / 2, k, 2 * k, 4 * k].contains(&c.factors),
            "k {}",
            c.factors
        );
        // Explicit MF draws no negatives: that knob stays as given.
        assert_eq!(c.negatives, a[0].negatives);
    }
    let mut other = movielens_mf();
    other.seed = Some(7);
    let b = candidates(&Settings::from_args(other).unwrap(), TaskChoice::Mf).unwrap();
    assert_eq!(a[0], b[0]);
    assert_ne!(a[1..], b[1..]);
}

#[test]
fn search_settings_that_cannot_work_are_refused_naming_the_flag() {
    let refused = |a: SimArgs| Settings::from_args(a).unwrap_err().to_string();
    let mut a = movielens_mf();
    a.search = Some(23);
    let e = refused(a);
    assert!(
        e.contains("--search 23") && e.contains("at least 24") && e.contains("--search-candidates"),
        "{e}"
    );
    let mut a = movielens_mf();
    a.search = Some(40);
    a.task = Some("churn-lr".parse().unwrap());
    a.data = None;
    let e = refused(a);
    assert!(e.contains("--search") && e.contains("--task mf"), "{e}");
    let mut a = movielens_mf();
    a.search = Some(40);
    a.dp_clip = Some("1".into());
    a.dp_noise = Some(0.5);
    let e = refused(a);
    assert!(
        e.contains("--search") && e.contains("differential privacy"),
        "{e}"
    );
    let mut a = movielens_mf();
    a.search = Some(40);
    a.search_candidates = Some(1);
    assert!(refused(a).contains("--search-candidates must be ≥ 2"));
}

#[test]
fn the_config_key_turns_the_search_on_and_its_errors_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sim.toml");
    std::fs::write(&path, "task = \"mf\"\nsearch = 40\nsearch_candidates = 4\n").unwrap();
    let s = Settings::from_args(SimArgs {
        config: Some(path.clone()),
        ..Default::default()
    })
    .unwrap();
    assert_eq!((s.search, s.search_candidates), (Some(40), 4));
    std::fs::write(&path, "task = \"mf\"\nsearch = 5\nsearch_candidates = 4\n").unwrap();
    let e = Settings::from_args(SimArgs {
        config: Some(path),
        ..Default::default()
    })
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("`search` in")
            && e.contains("at least 8")
            && e.contains("`search_candidates` in"),
        "{e}"
    );
}

#[test]
fn an_ials_search_tunes_alpha_in_place_of_the_learning_rate_and_chooses_by_validation() {
    let mut args = movielens_mf();
    args.task = Some("mf-ials".parse().unwrap());
    args.factors = Some(4);
    let s = Settings::from_args(args).unwrap();
    let task = TaskChoice::MfIals;
    let base = given(&s, task);
    assert_eq!(base.alpha, Some(fedcart_common::model::mf::IALS_ALPHA));
    let all = candidates(&s, task).unwrap();
    assert_eq!(all[0], base);
    for c in &all {
        // No learning rate or negatives to tune: they stay as given.
        assert_eq!((c.lr, c.negatives), (base.lr, base.negatives));
        let a = c.alpha.expect("every iALS candidate has an α");
        assert!(
            [0.25, 1.0, 4.0]
                .iter()
                .any(|m| a == base.alpha.unwrap() * m)
        );
        assert!([1, 2].contains(&c.epochs), "sweeps {}", c.epochs);
        // At most twice the given factors: an item solve costs k³.
        assert!(c.factors <= 2 * base.factors, "k {}", c.factors);
    }
    assert!(all.iter().any(|c| c.alpha != base.alpha));
    // The trials run with the candidate's α and score by `val_hr@10`.
    let configs = [
        base,
        SearchConfig {
            alpha: Some(4.0 * base.alpha.unwrap()),
            factors: 8,
            ..base
        },
    ];
    let (_, data) = s.experiments().remove(0);
    let summary = halve(&s, task, &data, &pool(), &configs, 2).unwrap();
    assert_eq!(summary.metric, "val_hr@10");
    assert!(summary.higher_is_better);
    let values: Vec<f64> = summary
        .trials
        .iter()
        .map(|t| t.rungs[0].value.unwrap())
        .collect();
    let best = if values[1] > values[0] { 1 } else { 0 };
    assert_eq!(summary.chosen, best, "{values:?}");
    // Another α is another model: the two trials do not score alike.
    assert_ne!(values[0], values[1]);
    assert!(
        flags(&configs[1], false).contains("--alpha 16"),
        "{}",
        flags(&configs[1], false)
    );
}

/// The chosen configuration's flags paste back: explicit MF refuses
/// `--negatives`, which the report listed.
#[test]
fn the_chosen_flags_are_the_ones_the_task_takes() {
    let c = SearchConfig {
        factors: 8,
        lr: 0.02,
        reg: 0.01,
        epochs: 5,
        negatives: 4,
        alpha: None,
    };
    assert_eq!(
        flags(&c, false),
        "--factors 8 --lr 0.02 --reg 0.01 --epochs 5"
    );
    assert!(flags(&c, true).ends_with("--negatives 4"));
}
