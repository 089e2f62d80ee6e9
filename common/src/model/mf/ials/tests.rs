//! iALS: the closed-form solves are stationary points of the objective, the
//! federated item step is the confidence-weighted mean of the merchants'
//! solves, a singular or non-finite solve is an error naming what failed,
//! and a fit replays bit for bit.

use std::path::Path;

use rand::RngExt;

use super::*;
use crate::federation::aggregate::SumAccumulator;
use crate::federation::strategy::{FedAvg, Strategy};
use crate::model::mf::{ImplicitAlgorithm, Rating, eval, initial_params, layout, model_len};
use crate::reference::federate;
use crate::task::{ModelSpec, TaskKind, TaskSpec};
use crate::train::{LocalData, run_task};

const N: usize = 12;
const K: usize = 3;

fn hyper() -> MfHyper {
    MfHyper {
        algorithm: ImplicitAlgorithm::Ials,
        reg_factors: 0.5,
        reg_bias: 0.2,
        alpha: 3.0,
        proximal: 0.7,
        epochs: 1,
        ..Default::default()
    }
}

/// A merchant with `users` customers buying seeded random items (one
/// repeated row, so duplicate cells are merged).
fn shop(users: usize, seed: u64) -> MfData {
    let mut rng = crate::seed::rng(seed, &["ials-test"]);
    let mut train = Vec::new();
    for u in 0..users as u32 {
        for _ in 0..4 {
            train.push(Rating {
                user: u,
                item: rng.random_range(0..N as u32),
                value: rng.random_range(1..4) as f32,
            });
        }
    }
    train.push(train[0]);
    MfData {
        users: (0..users).map(|u| format!("c{u}")).collect(),
        train,
        ..Default::default()
    }
}

/// A global model with seeded random biases and factors.
fn global(seed: u64) -> Vec<f32> {
    let mut g = initial_params(N, K, 0.5, seed);
    let mut rng = crate::seed::rng(seed, &["ials-bias"]);
    for b in &mut g[1..1 + N] {
        *b = rng.random_range(-0.3..0.3);
    }
    g
}

/// `c_ui` of every cell, summed over repeated rows, from the raw ratings.
fn confidences(data: &MfData, alpha: f32) -> Vec<Vec<f64>> {
    let mut v = vec![vec![0.0f32; N]; data.users.len()];
    for r in &data.train {
        v[r.user as usize][r.item as usize] += r.value;
    }
    v.iter()
        .map(|row| {
            row.iter()
                .map(|&x| if x > 0.0 { confidence(alpha, x) } else { 1.0 })
                .collect()
        })
        .collect()
}

fn score(model: &[f32], users: &[f32], u: usize, i: usize) -> f64 {
    let (b, f) = item_offsets(N, K, i);
    f64::from(model[b])
        + (0..K)
            .map(|j| f64::from(users[u * K + j]) * f64::from(model[f + j]))
            .sum::<f64>()
}

/// The closed-form user factors of `data`'s `users` against the item side `g`.
fn solved_users(data: &MfData, h: &MfHyper, g: &[f32], users: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; users * K];
    solve_users(g, N, K, h, &Cells::new(data, N, h.alpha, false), &mut out).unwrap();
    out
}

#[test]
fn the_user_solve_zeroes_the_gradient_over_every_cell() {
    let data = shop(5, 1);
    let (h, g) = (hyper(), global(2));
    let users = solved_users(&data, &h, &g, 5);
    let c = confidences(&data, h.alpha);
    for u in 0..5 {
        // ∂/∂p_u of Σ_i c_ui (s_ui − y_ui)² / 2 + λ‖p_u‖² / 2, cell by cell.
        for f in 0..K {
            let mut grad = f64::from(h.reg_factors) * f64::from(users[u * K + f]);
            for (i, &cui) in c[u].iter().enumerate() {
                let y = if cui > 1.0 { 1.0 } else { 0.0 };
                let (_, off) = item_offsets(N, K, i);
                grad += cui * (score(&g, &users, u, i) - y) * f64::from(g[off + f]);
            }
            assert!(grad.abs() < 1e-4, "user {u} factor {f}: gradient {grad}");
        }
    }
}

#[test]
fn the_item_solve_zeroes_the_proximal_gradient_over_every_cell() {
    let data = shop(6, 3);
    let (h, g) = (hyper(), global(4));
    let users = solved_users(&data, &h, &g, 6);
    let mut local = g.clone();
    let weights = solve_items(
        &g,
        &mut local,
        N,
        K,
        &h,
        &Cells::new(&data, N, h.alpha, true),
        &users,
    )
    .unwrap();
    let c = confidences(&data, h.alpha);
    let rho = f64::from(h.proximal);
    for i in 0..N {
        let (b, off) = item_offsets(N, K, i);
        // Coordinates 0..K are q_i, K is b_i (the constant user feature 1).
        for f in 0..=K {
            let (x, x0, reg) = if f < K {
                (local[off + f], g[off + f], h.reg_factors)
            } else {
                (local[b], g[b], h.reg_bias)
            };
            let mut grad = f64::from(reg) * f64::from(x) + rho * f64::from(x - x0);
            for u in 0..6 {
                let y = if c[u][i] > 1.0 { 1.0 } else { 0.0 };
                let feature = if f < K {
                    f64::from(users[u * K + f])
                } else {
                    1.0
                };
                grad += c[u][i] * (score(&local, &users, u, i) - y) * feature;
            }
            assert!(
                grad.abs() < 1e-4,
                "item {i} coordinate {f}: gradient {grad}"
            );
        }
        let total: f64 = (0..6).map(|u| c[u][i]).sum();
        assert!(
            (f64::from(weights[i]) - total).abs() < 1e-3,
            "item {i} weight"
        );
    }
}

#[test]
fn the_federated_item_step_is_the_confidence_weighted_mean_of_the_merchants_solves() {
    let h = hyper();
    let g = global(5);
    let shops = [shop(4, 6), shop(7, 7)];
    let layout = layout(N, K, super::super::MfAggregation::PerItem);
    let mut acc = SumAccumulator::new(g.len(), layout.num_coord_weights);
    let mut solves = Vec::new();
    for s in &shops {
        let mut d = s.clone();
        d.state.factors = vec![0.0; d.users.len() * K];
        let (update, _) = fit(&g, N, K, &h, &mut d).unwrap();
        // What the merchant solved, recovered from its weighted delta.
        let local: Vec<f32> = (0..g.len())
            .map(|j| {
                let i = if j == 0 {
                    return g[0];
                } else if j <= N {
                    j - 1
                } else {
                    (j - 1 - N) / K
                };
                g[j] + update.values[j] / update.coord_weights[i]
            })
            .collect();
        solves.push((local, update.coord_weights.clone()));
        acc.add(&update).unwrap();
    }
    let next = FedAvg.apply(&g, &acc.mean_delta(&layout));
    for (j, &got) in next.iter().enumerate().skip(1) {
        let i = if j <= N { j - 1 } else { (j - 1 - N) / K };
        let (w0, w1) = (solves[0].1[i], solves[1].1[i]);
        let want = (solves[0].0[j] * w0 + solves[1].0[j] * w1) / (w0 + w1);
        assert!((got - want).abs() < 1e-4, "coordinate {j}: {got} vs {want}");
    }
    assert_eq!(next[0], g[0], "μ is not an iALS parameter");
}

#[test]
fn a_singular_or_non_finite_solve_is_an_error_naming_the_item() {
    let data = shop(4, 8);
    let h = hyper();
    let mut g = global(9);
    let users = vec![0.3f32; 4 * K];
    // A NaN in item 3's global row reaches its proximal right-hand side.
    let (_, off) = item_offsets(N, K, 3);
    g[off + 1] = f32::NAN;
    let mut local = g.clone();
    let cells = Cells::new(&data, N, h.alpha, true);
    let item3_sold = !cells.row(3).0.is_empty();
    let err = solve_items(&g, &mut local, N, K, &h, &cells, &users).unwrap_err();
    assert_eq!(
        err,
        TrainError::Singular("item 3".into()),
        "sold: {item3_sold}"
    );
    // No penalty and users without a factor: nothing pins the unsold rows.
    let flat = MfHyper {
        reg_factors: 0.0,
        reg_bias: 0.0,
        proximal: 0.0,
        ..h.clone()
    };
    let zeros = vec![0.0f32; 4 * K];
    let err = solve_items(&global(9), &mut local, N, K, &flat, &cells, &zeros).unwrap_err();
    assert!(matches!(err, TrainError::Singular(_)), "{err}");
    // Through the task: a non-finite global model is refused, never trained on.
    let spec = spec_of(h, 1);
    let mut m = LocalData {
        merchant_id: "m".into(),
        mf: Some(data),
        ..Default::default()
    };
    let err = run_task(&spec, &g, &mut m).unwrap_err();
    assert!(matches!(err, TrainError::Singular(_)), "{err}");
    // And a spec without a penalty is refused before any work.
    let no_reg = spec_of(
        MfHyper {
            reg_factors: 0.0,
            ..hyper()
        },
        1,
    );
    assert!(matches!(
        no_reg.model.check(),
        Err(TrainError::InvalidModel(_))
    ));
}

fn spec_of(hyper: MfHyper, round: u64) -> TaskSpec {
    TaskSpec {
        kind: TaskKind::Train,
        model: ModelSpec::MfImplicit {
            num_items: N,
            factors: K,
            hyper,
        },
        sgd: Default::default(),
        seed: 11,
        round,
        standardizer: None,
        dp: None,
        best_version: None,
    }
}

#[test]
fn an_ials_train_task_replays_bit_for_bit_and_sends_only_item_rows() {
    let spec = spec_of(hyper(), 1);
    assert_eq!(spec.model.name(), "mf-ials");
    let g = spec.model.initial_params(spec.seed);
    let run = || {
        let mut m = LocalData {
            merchant_id: "m".into(),
            mf: Some(shop(5, 12)),
            ..Default::default()
        };
        run_task(&spec, &g, &mut m).unwrap().update.unwrap()
    };
    let (a, b) = (run(), run());
    assert_eq!(a, b);
    assert_eq!(
        (a.values.len(), a.coord_weights.len()),
        (model_len(N, K), N)
    );
    assert!(a.values.iter().all(|v| v.is_finite()));
    // The spec travels as JSON with its algorithm.
    let json = serde_json::to_string(&spec).unwrap();
    assert_eq!(serde_json::from_str::<TaskSpec>(&json).unwrap(), spec);
}

#[test]
fn federated_ials_ranks_held_out_purchases_above_popularity_on_movielens() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/ml-latest-small/ratings.csv");
    let rows = crate::model::mf::movielens::load_ratings(&path).unwrap();
    let fed = crate::model::mf::movielens::implicit_federation(&rows, 10, 4.0, 42);
    let n = fed.catalogue.len();
    let mut s = spec_of(
        MfHyper {
            reg_factors: 1.0,
            reg_bias: 1.0,
            alpha: 10.0,
            proximal: 1.0,
            ..hyper()
        },
        1,
    );
    s.model = ModelSpec::MfImplicit {
        num_items: n,
        factors: 16,
        hyper: match s.model {
            ModelSpec::MfImplicit { hyper, .. } => hyper,
            _ => unreachable!(),
        },
    };
    let mut merchants = fed.merchants.clone();
    let f = federate(&s, &mut merchants, 3, &mut FedAvg).unwrap();
    let hr = f.rounds.last().unwrap()["hr@10"];
    let pooled = LocalData::pooled("all", &merchants).mf.unwrap();
    let (pop, _) = eval::popularity_metrics(&eval::item_buyers(&pooled, n), &pooled);
    eprintln!("federated iALS hr@10 {hr}, popularity {}", pop["hr@10"]);
    assert!(
        hr > pop["hr@10"],
        "federated iALS hr@10 {hr} vs popularity {pop:?}"
    );
}

#[test]
fn an_evaluation_ranks_the_test_with_users_refitted_on_validation_and_serves_them() {
    // Each customer also has a validation purchase and a test purchase.
    let mut data = shop(5, 21);
    let mut rng = crate::seed::rng(22, &["ials-held-out"]);
    for u in 0..5u32 {
        for slice in [&mut data.valid, &mut data.test] {
            slice.push(Rating {
                user: u,
                item: rng.random_range(0..N as u32),
                value: 1.0,
            });
        }
    }
    let mut spec = spec_of(hyper(), 1);
    spec.kind = TaskKind::Evaluate;
    let g = global(23);
    let mut m = LocalData {
        merchant_id: "m".into(),
        mf: Some(data.clone()),
        ..Default::default()
    };
    let out = run_task(&spec, &g, &mut m).unwrap();
    let h = hyper();
    let trained = solved_users(&data, &h, &g, 5);
    let mut refit = vec![0.0f32; 5 * K];
    solve_users(
        &g,
        N,
        K,
        &h,
        &Cells::with_valid(&data, N, h.alpha),
        &mut refit,
    )
    .unwrap();
    assert_ne!(trained, refit, "the validation purchases move the users");
    let mut expect = data.clone();
    expect.state.factors = trained;
    let (with_refit, _, _) = eval::implicit_metrics(&g, N, K, &expect, Some(&refit));
    let (train_only, _, _) = eval::implicit_metrics(&g, N, K, &expect, None);
    // Validation, which chooses, is ranked with the training users only.
    for key in ["val_hr@10", "val_ndcg@10", "pop_blend"] {
        assert_eq!(out.metrics[key], train_only[key], "{key}");
    }
    // The test is ranked with the refitted users, which are then served.
    assert_eq!(out.metrics["ndcg@10"], with_refit["ndcg@10"]);
    assert_ne!(with_refit["ndcg@10"], train_only["ndcg@10"]);
    assert_eq!(m.mf.unwrap().state.factors, refit);
}
