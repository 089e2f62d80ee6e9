//! Personalisation: the proximal pull, the validation rule that keeps or
//! discards the copy, and the served user side left untouched.

use rand::RngExt;
use rand_distr::{Distribution, StandardNormal};

use super::*;
use crate::model::FederatedModel;
use crate::model::mf::{ImplicitAlgorithm, MfData, MfHyper, Rating, item_offsets};

/// A merchant of `users` customers rating (or buying) `per_user` of `n`
/// items drawn from a planted rank-2 model; the first rating of each user
/// goes to validation, the second to the test.
fn merchant(n: usize, users: u32, per_user: usize, seed: u64) -> LocalData {
    let mut rng = crate::seed::rng(seed, &["personal-fixture"]);
    let mut normal = |s: f32| -> f32 {
        let z: f32 = StandardNormal.sample(&mut rng);
        z * s
    };
    let items: Vec<[f32; 2]> = (0..n).map(|_| [normal(0.8), normal(0.8)]).collect();
    let people: Vec<[f32; 2]> = (0..users).map(|_| [normal(0.8), normal(0.8)]).collect();
    let mut rng = crate::seed::rng(seed, &["personal-rows"]);
    let (mut train, mut valid, mut test) = (Vec::new(), Vec::new(), Vec::new());
    for u in 0..users {
        let mut seen = Vec::new();
        while seen.len() < per_user {
            let i = rng.random_range(0..n as u32);
            if !seen.contains(&i) {
                seen.push(i);
            }
        }
        for (j, &i) in seen.iter().enumerate() {
            let (p, q) = (people[u as usize], items[i as usize]);
            let r = Rating {
                user: u,
                item: i,
                value: (3.0 + p[0] * q[0] + p[1] * q[1]).clamp(1.0, 5.0),
            };
            match j {
                0 => valid.push(r),
                1 => test.push(r),
                _ => train.push(r),
            }
        }
    }
    LocalData {
        merchant_id: "m0".into(),
        mf: Some(MfData {
            users: (0..users).map(|u| format!("c{u}")).collect(),
            train,
            valid,
            test,
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn hyper(algorithm: ImplicitAlgorithm) -> MfHyper {
    MfHyper {
        learning_rate: 0.02,
        bias_learning_rate: 0.02,
        reg_factors: 0.05,
        epochs: 1,
        negatives: 2,
        algorithm,
        alpha: 2.0,
        ..Default::default()
    }
}

fn ctx() -> RoundContext<'static> {
    static SGD: std::sync::OnceLock<crate::model::sgd::SgdParams> = std::sync::OnceLock::new();
    RoundContext {
        sgd: SGD.get_or_init(Default::default),
        seed: 11,
        round: 4,
        standardizer: None,
        best_version: None,
    }
}

/// Euclidean distance between the item sides of two models.
fn distance(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| f64::from(x - y).powi(2))
        .sum::<f64>()
        .sqrt()
}

/// Mean squared error of the copy on the merchant's training ratings.
fn train_mse(p: &Personalised, data: &LocalData, n: usize, k: usize) -> f64 {
    let mf = data.mf.as_ref().unwrap();
    let mut se = 0.0;
    for r in &mf.train {
        let (u, i) = (r.user as usize, r.item as usize);
        let (b, f) = item_offsets(n, k, i);
        let pu = &p.users.factors[u * k..(u + 1) * k];
        let dot: f32 = pu.iter().zip(&p.params[f..f + k]).map(|(a, b)| a * b).sum();
        let pred = p.params[0] + p.users.bias[u] + p.params[b] + dot;
        se += f64::from(r.value - pred).powi(2);
    }
    se / mf.train.len() as f64
}

#[test]
fn the_proximal_fine_tune_moves_towards_the_local_optimum_and_a_huge_mu_keeps_the_global_copy() {
    let (n, k) = (40, 4);
    let h = hyper(ImplicitAlgorithm::Bpr);
    let shape = MfShape {
        num_items: n,
        k,
        implicit: false,
        hyper: &h,
    };
    let mut global = shape.initial_params(3);
    global[0] = 3.0;
    let base = merchant(n, 60, 12, 1);
    let run = |mu: f32| {
        let mut data = base.clone();
        let p = Personalise {
            epochs: 20,
            proximal: mu,
        };
        let out = shape.personalise(&ctx(), &global, &mut data, &p).unwrap();
        (distance(&out.params, &global), train_mse(&out, &data, n, k))
    };
    let (d0, mse0) = run(0.0);
    let (d1, mse1) = run(1.0);
    let (d10, mse10) = run(10.0);
    let (dinf, _) = run(1e9);
    // The pull shortens the way from the global copy as μ grows ...
    assert!(d0 > d1 && d1 > d10 && d10 > dinf, "{d0} {d1} {d10} {dinf}");
    assert!(dinf < 1e-4, "μ → ∞ keeps the global item side: {dinf}");
    // ... and the free copy fits the merchant's own ratings best.
    assert!(mse0 < mse1 && mse1 < mse10, "{mse0} {mse1} {mse10}");
}

#[test]
fn bpr_and_ials_copies_stay_on_the_global_item_side_under_a_huge_mu() {
    let (n, k) = (40, 4);
    for algorithm in [ImplicitAlgorithm::Bpr, ImplicitAlgorithm::Ials] {
        let h = hyper(algorithm);
        let shape = MfShape {
            num_items: n,
            k,
            implicit: true,
            hyper: &h,
        };
        let global = shape.initial_params(3);
        let base = merchant(n, 60, 12, 2);
        let moved = |mu: f32| {
            let mut data = base.clone();
            let p = Personalise {
                epochs: 3,
                proximal: mu,
            };
            let out = shape.personalise(&ctx(), &global, &mut data, &p).unwrap();
            assert!(out.personal_val.is_finite() && out.global_val.is_finite());
            distance(&out.params, &global)
        };
        let (free, held) = (moved(0.0), moved(1e9));
        assert!(free > 0.1 && held < 1e-3, "{algorithm:?}: {free} vs {held}");
    }
}

/// One customer of an explicit shop: trained on five ratings of 5, asked
/// on validation about item 6, which the federation's μ = 3 predicts.
fn optimist(validation_rating: f32) -> LocalData {
    let r = |item, value| Rating {
        user: 0,
        item,
        value,
    };
    LocalData {
        merchant_id: "shop".into(),
        mf: Some(MfData {
            users: vec!["c0".into()],
            train: (0..5).map(|i| r(i, 5.0)).collect(),
            valid: vec![r(6, validation_rating)],
            test: vec![r(7, 5.0)],
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[test]
fn a_copy_that_does_not_improve_validation_is_discarded_and_one_that_does_is_kept() {
    let (n, k) = (10, 2);
    let h = MfHyper {
        learning_rate: 0.05,
        bias_learning_rate: 0.1,
        ..hyper(ImplicitAlgorithm::Bpr)
    };
    let shape = MfShape {
        num_items: n,
        k,
        implicit: false,
        hyper: &h,
    };
    let mut global = shape.initial_params(3);
    global[0] = 3.0;
    let p = Personalise {
        epochs: 10,
        proximal: 0.1,
    };
    // Fine-tuning on ratings of 5 raises the customer's bias: worse for a
    // validation rating of 3, better for one of 5.
    let mut data = optimist(3.0);
    let out = shape.personalise(&ctx(), &global, &mut data, &p).unwrap();
    assert_eq!(out.metric, "val_rmse");
    assert!(out.personal_val > out.global_val, "{out:?}");
    assert!(!out.kept);
    assert_eq!(out.selected_metrics(), &out.global_metrics);
    let mut data = optimist(5.0);
    let before = {
        let mut d = data.clone();
        shape.evaluate(&ctx(), &global, &mut d).unwrap();
        d.mf.unwrap().state
    };
    let out = shape.personalise(&ctx(), &global, &mut data, &p).unwrap();
    assert!(out.personal_val < out.global_val && out.kept, "{out:?}");
    assert_eq!(out.selected_metrics(), &out.personal_metrics);
    // The served user side stays as an evaluation of the version left it.
    assert_eq!(data.mf.unwrap().state, before);
    assert!(out.users.evaluated.is_empty());
    // No change at all is no improvement: equal validation is discarded.
    let still = Personalise {
        epochs: 0,
        proximal: 0.1,
    };
    let out = shape
        .personalise(&ctx(), &global, &mut optimist(5.0), &still)
        .unwrap();
    assert_eq!(out.personal_val, out.global_val);
    assert!(!out.kept);
}

#[test]
fn a_bad_proximal_weight_is_refused_naming_it() {
    let h = hyper(ImplicitAlgorithm::Bpr);
    let shape = MfShape {
        num_items: 10,
        k: 2,
        implicit: false,
        hyper: &h,
    };
    let global = shape.initial_params(3);
    let p = Personalise {
        epochs: 1,
        proximal: f32::NAN,
    };
    let err = shape
        .personalise(&ctx(), &global, &mut optimist(5.0), &p)
        .unwrap_err();
    assert!(err.to_string().contains("proximal"), "{err}");
}
