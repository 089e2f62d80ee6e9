//! The explicit user solve: it recovers users whose ratings the item side
//! explains exactly, an evaluation serves solved users only where
//! validation prefers them, and training never starts from them.

use rand::RngExt;

use super::*;
use crate::model::mf::{Rating, initial_params, rmse_of};
use crate::task::{ModelSpec, TaskKind, TaskSpec};
use crate::train::{LocalData, run_task};

const N: usize = 10;
const K: usize = 2;

/// A global model with seeded random μ, item biases and factors.
fn global(seed: u64) -> Vec<f32> {
    let mut g = initial_params(N, K, 0.8, seed);
    let mut rng = crate::seed::rng(seed, &["refit-bias"]);
    g[0] = 3.5;
    for b in &mut g[1..1 + N] {
        *b = rng.random_range(-0.5..0.5);
    }
    g
}

/// The rating `global` predicts for user bias `bu` and factors `pu`.
fn rating(g: &[f32], bu: f32, pu: &[f32], i: usize) -> f32 {
    let (b, f) = item_offsets(N, K, i);
    g[0] + bu + g[b] + pu.iter().zip(&g[f..f + K]).map(|(p, q)| p * q).sum::<f32>()
}

/// Three customers with seeded true users, each rating every item exactly
/// as `g` predicts for them: items 0–5 train, 6–7 validate, 8–9 test.
fn shop(g: &[f32]) -> (MfData, Vec<f32>, Vec<f32>) {
    let mut rng = crate::seed::rng(5, &["refit-users"]);
    let bias: Vec<f32> = (0..3).map(|_| rng.random_range(-0.5..0.5)).collect();
    let factors: Vec<f32> = (0..3 * K).map(|_| rng.random_range(-1.0..1.0)).collect();
    let mut data = MfData {
        users: vec!["a".into(), "b".into(), "c".into()],
        ..Default::default()
    };
    for u in 0..3 {
        for i in 0..N {
            let r = Rating {
                user: u as u32,
                item: i as u32,
                value: rating(g, bias[u], &factors[u * K..(u + 1) * K], i),
            };
            match i {
                0..6 => data.train.push(r),
                6..8 => data.valid.push(r),
                _ => data.test.push(r),
            }
        }
    }
    (data, bias, factors)
}

fn unregularised() -> MfHyper {
    MfHyper {
        reg_factors: 0.0,
        reg_bias: 0.0,
        ..Default::default()
    }
}

#[test]
fn the_solve_recovers_users_whose_ratings_the_items_explain() {
    let g = global(3);
    let (data, bias, factors) = shop(&g);
    let ((b, f), _) =
        solve_explicit_users(&g, N, K, &unregularised(), &data.train, &[], 3).unwrap();
    for (got, want) in b.iter().chain(&f).zip(bias.iter().chain(&factors)) {
        assert!((got - want).abs() < 1e-3, "{got} vs {want}");
    }
    // A penalty shrinks the factors towards 0.
    let h = MfHyper {
        reg_factors: 1.0,
        ..unregularised()
    };
    let ((_, shrunk), _) = solve_explicit_users(&g, N, K, &h, &data.train, &[], 3).unwrap();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>();
    assert!(norm(&shrunk) < norm(&f));
    // A customer without ratings keeps zeros.
    let ((b, f), _) =
        solve_explicit_users(&g, N, K, &unregularised(), &data.train, &[], 4).unwrap();
    assert_eq!((b[3], &f[3 * K..]), (0.0, &[0.0; K][..]));
}

fn lightly_regularised() -> MfHyper {
    MfHyper {
        reg_factors: 0.01,
        reg_bias: 0.01,
        refit_users: true,
        ..Default::default()
    }
}

fn evaluate(h: MfHyper, g: &[f32], data: &MfData, round: u64) -> (LocalData, f64, f64) {
    let spec = TaskSpec {
        kind: TaskKind::Evaluate,
        model: ModelSpec::Mf {
            num_items: N,
            factors: K,
            hyper: h,
        },
        sgd: Default::default(),
        seed: 11,
        round,
        standardizer: None,
        dp: None,
        best_version: None,
    };
    let mut m = LocalData {
        merchant_id: "m".into(),
        mf: Some(data.clone()),
        ..Default::default()
    };
    let out = run_task(&spec, g, &mut m).unwrap();
    (m, out.metrics["rmse"], out.metrics["val_rmse"])
}

#[test]
fn an_evaluation_serves_users_solved_on_validation_where_validation_prefers_them() {
    let (g, h) = (global(3), lightly_regularised());
    let (data, _, _) = shop(&g);
    // The trained users are the seeded initial ones: far from the truth.
    let (m, rmse, val) = evaluate(h.clone(), &g, &data, 4);
    let state = &m.mf.as_ref().unwrap().state;
    let (_, (bias, factors)) =
        solve_explicit_users(&g, N, K, &h, &data.train, &data.valid, 3).unwrap();
    let mut trained = data.clone();
    trained.state.clone_from(state);
    trained.state.served = None;
    // Validation, which chooses the version, is measured with the trained users.
    assert_eq!(val, rmse_on(&g, N, K, None, &trained, &data.valid));
    // The test is measured, and the merchant served, with the solved users.
    assert_eq!(
        rmse,
        rmse_with(&g, N, K, None, (&bias, &factors), &data.test)
    );
    assert!(rmse < rmse_of(&g, N, K, None, &trained) / 10.0);
    let served = state
        .served
        .as_ref()
        .expect("solved users kept for serving");
    assert_eq!(
        (served.version, &served.bias, &served.factors),
        (4, &bias, &factors)
    );
    assert_eq!(state.serving_side(4), (&bias[..], &factors[..]));
    // Another version, and training, see the trained users only.
    assert_eq!(state.serving_side(5), (&state.bias[..], &state.factors[..]));
    assert_ne!(state.factors, factors);
}

#[test]
fn users_validation_does_not_prefer_or_an_operator_turned_off_are_not_served() {
    let (g, h) = (global(3), lightly_regularised());
    let (mut data, _, _) = shop(&g);
    // Trained users already equal to the solve on training ratings: the
    // solve cannot beat them on validation.
    let ((bias, factors), _) = solve_explicit_users(&g, N, K, &h, &data.train, &[], 3).unwrap();
    data.state = crate::model::mf::UserState {
        k: K,
        seed: 11,
        bias,
        factors,
        served: Some(crate::model::mf::UserSnapshot {
            version: 1,
            bias: vec![9.0; 3],
            factors: vec![9.0; 3 * K],
        }),
        ..Default::default()
    };
    let (m, rmse, _) = evaluate(h.clone(), &g, &data, 1);
    let state = &m.mf.as_ref().unwrap().state;
    assert!(state.served.is_none(), "the earlier choice is cleared");
    assert_eq!(rmse, rmse_of(&g, N, K, None, &data));
    assert_eq!(
        state.serving_side(1),
        (&data.state.bias[..], &data.state.factors[..])
    );
    // Off (the default), nothing is solved even where validation would
    // prefer it.
    let (data, _, _) = shop(&g);
    let off = MfHyper {
        refit_users: false,
        ..h
    };
    let (m, rmse, _) = evaluate(off, &g, &data, 4);
    assert!(m.mf.as_ref().unwrap().state.served.is_none());
    let mut trained = data.clone();
    trained.state.clone_from(&m.mf.as_ref().unwrap().state);
    assert_eq!(rmse, rmse_of(&g, N, K, None, &trained));
}

/// `‖(ZᵀZ + D)x − Zᵀy‖∞` of user `u`'s solve on `rows`.
fn normal_equations_residual(
    g: &[f32],
    h: &MfHyper,
    rows: &[Rating],
    u: u32,
    bu: f32,
    pu: &[f32],
) -> f64 {
    let mine: Vec<&Rating> = rows.iter().filter(|r| r.user == u).collect();
    let c = mine.len() as f64;
    let x: Vec<f64> = std::iter::once(bu)
        .chain(pu.iter().copied())
        .map(f64::from)
        .collect();
    let mut lhs: Vec<f64> = x
        .iter()
        .enumerate()
        .map(|(j, v)| {
            let p = if j == 0 { h.reg_bias } else { h.reg_factors };
            f64::from(p) * c * v
        })
        .collect();
    for r in mine {
        let (b, f) = item_offsets(N, K, r.item as usize);
        let z: Vec<f64> = std::iter::once(1.0)
            .chain(g[f..f + K].iter().map(|&q| f64::from(q)))
            .collect();
        let y = f64::from(r.value) - f64::from(g[0]) - f64::from(g[b]);
        let fit: f64 = z.iter().zip(&x).map(|(a, b)| a * b).sum();
        for (l, zj) in lhs.iter_mut().zip(&z) {
            *l += (fit - y) * zj;
        }
    }
    lhs.iter().fold(0.0, |m, v| m.max(v.abs()))
}

#[test]
fn the_primal_and_the_dual_solve_both_meet_the_normal_equations() {
    let g = global(3);
    let h = MfHyper {
        reg_factors: 0.3,
        reg_bias: 0.1,
        ..Default::default()
    };
    let (mut data, _, _) = shop(&g);
    // Customer 2 keeps one training rating and one validation rating: fewer
    // than k + 1 = 3 rows each time, so both of its solves take the dual form.
    data.train.retain(|r| r.user != 2 || r.item == 0);
    data.valid.retain(|r| r.user != 2 || r.item == 6);
    let both: Vec<Rating> = data.train.iter().chain(&data.valid).copied().collect();
    let ((b0, f0), (b1, f1)) =
        solve_explicit_users(&g, N, K, &h, &data.train, &data.valid, 3).unwrap();
    for u in 0..3u32 {
        let k = u as usize * K;
        let on_train =
            normal_equations_residual(&g, &h, &data.train, u, b0[u as usize], &f0[k..k + K]);
        let on_all = normal_equations_residual(&g, &h, &both, u, b1[u as usize], &f1[k..k + K]);
        assert!(
            on_train < 1e-5 && on_all < 1e-5,
            "user {u}: {on_train} {on_all}"
        );
    }
    assert_ne!(
        f0[2 * K..],
        f1[2 * K..],
        "the validation rating moves customer 2"
    );
}
