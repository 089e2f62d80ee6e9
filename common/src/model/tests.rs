//! Unit tests of the [`FederatedModel`] seam, one set of checks for every
//! family. (`common/tests/model_families.rs` pins the same families' results
//! bit for bit against the code before the trait existed.)

use ndarray::{Array1, Array2};
use rand::RngExt;

use super::churn::DEFAULT_VALID_FRACTION;
use super::churn_lr::ChurnLr;
use super::churn_mlp::ChurnMlp;
use super::mf::{MfAggregation, MfData, MfHyper, MfShape, Rating};
use super::noop::Noop;
use super::sgd::{EarlyStopping, SgdParams};
use super::*;

const FEATURES: usize = 4;
const HIDDEN: [usize; 2] = [5, 3];
const ITEMS: usize = 12;

fn rows(rng: &mut impl rand::Rng, n: usize) -> TabularDataset {
    let x = Array2::from_shape_fn((n, FEATURES), |_| rng.random_range(-1.0f32..1.0));
    let y = Array1::from_shape_fn(n, |i| f32::from(u8::from(x[[i, 0]] + x[[i, 1]] > 0.0)));
    TabularDataset {
        ids: (0..n).map(|i| format!("c{i}")).collect(),
        x,
        y,
    }
}

/// A merchant with a few seeded churn rows and a few seeded ratings.
fn tiny_merchant(seed: u64) -> LocalData {
    let mut rng = crate::seed::rng(seed, &["tiny-merchant"]);
    let train = rows(&mut rng, 30);
    let valid = rows(&mut rng, 10);
    let mut ratings = Vec::new();
    for user in 0..5u32 {
        for _ in 0..4 {
            ratings.push(Rating {
                user,
                item: rng.random_range(0..ITEMS as u32),
                value: rng.random_range(1..=5u32) as f32,
            });
        }
    }
    let test = ratings.split_off(15);
    LocalData {
        merchant_id: "tiny".into(),
        churn: Some(ChurnData { train, valid }),
        mf: Some(MfData {
            users: (0..5).map(|u| format!("u{u}")).collect(),
            train: ratings,
            test,
            ..Default::default()
        }),
        baskets: None,
    }
}

/// One of each family (MF in both feedback modes and both aggregations).
fn families(hyper: &[MfHyper; 2]) -> Vec<Box<dyn FederatedModel + '_>> {
    let mut out: Vec<Box<dyn FederatedModel + '_>> = vec![
        Box::new(ChurnLr {
            num_features: FEATURES,
            valid_fraction: DEFAULT_VALID_FRACTION,
        }),
        Box::new(ChurnMlp {
            num_features: FEATURES,
            hidden: &HIDDEN,
            valid_fraction: DEFAULT_VALID_FRACTION,
        }),
        Box::new(Noop { dim: 21 }),
    ];
    for h in hyper {
        for implicit in [false, true] {
            out.push(Box::new(MfShape {
                num_items: ITEMS,
                k: 3,
                implicit,
                hyper: h,
            }));
        }
    }
    out
}

fn mf_hypers() -> [MfHyper; 2] {
    [
        MfHyper::default(),
        MfHyper {
            aggregation: MfAggregation::Uniform,
            epochs: 2,
            ..Default::default()
        },
    ]
}

fn context<'a>(sgd: &'a SgdParams, scaler: Option<&'a Standardizer>) -> RoundContext<'a> {
    RoundContext {
        sgd,
        seed: 11,
        round: 0,
        standardizer: scaler,
        best_version: None,
    }
}

#[test]
fn model_len_equals_the_initial_parameters_and_the_layout() {
    let hyper = mf_hypers();
    for m in families(&hyper) {
        let init = m.initial_params(5);
        assert_eq!(init.len(), m.model_len(), "{}", m.name());
        assert!(init.iter().all(|v| v.is_finite()), "{}", m.name());
        assert_eq!(init, m.initial_params(5), "{} is seeded", m.name());
        m.layout()
            .validate(m.model_len())
            .unwrap_or_else(|e| panic!("{}: {e}", m.name()));
        assert!(m.check().is_ok(), "{}", m.name());
    }
}

#[test]
fn a_fit_from_the_initial_model_returns_a_finite_update_of_model_len_and_replays() {
    let hyper = mf_hypers();
    let sgd = SgdParams {
        epochs: 2,
        early_stopping: Some(EarlyStopping::default()),
        ..Default::default()
    };
    let data = tiny_merchant(3);
    let scaler = Standardizer::fit(&data.churn.as_ref().expect("churn rows").train.x);
    let ctx = context(&sgd, Some(&scaler));
    for m in families(&hyper) {
        let global = m.initial_params(5);
        let fit = |mut d: LocalData| (m.fit(&ctx, &global, &mut d), d);
        let (a, after) = fit(data.clone());
        let (b, _) = fit(data.clone());
        let a = a.unwrap_or_else(|e| panic!("{}: {e}", m.name()));
        assert_eq!(Ok(&a), b.as_ref(), "{} replays bit for bit", m.name());
        let update = a.update.expect("a training update");
        assert_eq!(update.values.len(), m.model_len(), "{}", m.name());
        update
            .validate(m.model_len(), &m.layout())
            .unwrap_or_else(|e| panic!("{}: {e}", m.name()));
        assert!(update.weight > 0.0, "{}", m.name());
        let eval = m
            .evaluate(&ctx, &global, &mut after.clone())
            .unwrap_or_else(|e| panic!("{}: {e}", m.name()));
        // An evaluation sends a vector only if the family sums one (churn:
        // score histograms), of exactly `eval_len` finite values.
        match &eval.update {
            None => assert_eq!(m.eval_len(), 0, "{}", m.name()),
            Some(u) => u
                .validate(m.eval_len(), &Default::default())
                .unwrap_or_else(|e| panic!("{}: {e}", m.name())),
        }
        assert!(eval.metrics.values().all(|v| v.is_finite()), "{}", m.name());
    }
}

#[test]
fn mf_fit_keeps_user_factors_in_local_data_and_sends_only_item_rows() {
    let hyper = MfHyper::default();
    let m = MfShape {
        num_items: ITEMS,
        k: 3,
        implicit: false,
        hyper: &hyper,
    };
    let sgd = SgdParams::default();
    let mut data = tiny_merchant(4);
    let out = m
        .fit(&context(&sgd, None), &m.initial_params(1), &mut data)
        .expect("fit");
    let state = &data.mf.as_ref().expect("mf data").state;
    assert_eq!((state.bias.len(), state.factors.len()), (5, 15));
    assert_eq!(
        out.update.expect("update").values.len(),
        1 + ITEMS * (3 + 1)
    );
}

#[test]
fn tasks_check_the_global_length_and_the_local_data_first() {
    let sgd = SgdParams::default();
    let lr = ChurnLr {
        num_features: FEATURES,
        valid_fraction: DEFAULT_VALID_FRACTION,
    };
    let mut data = tiny_merchant(2);
    let err = lr.fit(&context(&sgd, None), &[0.0; 2], &mut data);
    assert_eq!(
        err,
        Err(TrainError::ModelLength {
            expected: FEATURES + 1,
            got: 2
        })
    );
    let err = lr.fit(&context(&sgd, None), &[0.0; FEATURES + 1], &mut data);
    assert_eq!(err, Err(TrainError::MissingStandardizer));
    let mut no_churn = LocalData::default();
    assert_eq!(
        lr.stats(&context(&sgd, None), &mut no_churn),
        Err(TrainError::NoData("churn"))
    );
}

#[test]
fn check_refuses_a_zero_width_mlp_layer() {
    let m = ChurnMlp {
        num_features: FEATURES,
        hidden: &[0],
        valid_fraction: DEFAULT_VALID_FRACTION,
    };
    assert!(matches!(m.check(), Err(TrainError::InvalidModel(_))));
    assert_eq!(m.initial_params(1), vec![0.0; m.model_len()]);
}

#[test]
fn scores_cover_the_held_out_examples_and_agree_with_evaluation() {
    let hyper = mf_hypers();
    let sgd = SgdParams::default();
    let data = tiny_merchant(6);
    let scaler = Standardizer::fit(&data.churn.as_ref().expect("churn rows").train.x);
    let ctx = context(&sgd, Some(&scaler));
    for m in families(&hyper) {
        let global = m.initial_params(8);
        let mut d = data.clone();
        let scores = m.score(&ctx, &global, &mut d).expect("scores");
        let eval = m.evaluate(&ctx, &global, &mut d).expect("evaluation");
        assert!(scores.iter().all(|s| s.is_finite()), "{}", m.name());
        match m.name() {
            "churn-lr" | "churn-mlp" => {
                let valid = &d.churn.as_ref().expect("churn rows").valid;
                assert_eq!(scores.len(), valid.len());
                let y = valid.y.as_slice().expect("contiguous labels");
                assert_eq!(crate::metrics::auc(y, &scores), eval.metrics["auc"]);
            }
            "mf" => {
                let test = &d.mf.as_ref().expect("mf data").test;
                assert_eq!(scores.len(), test.len());
                let se: f64 = test
                    .iter()
                    .zip(&scores)
                    .map(|(r, s)| f64::from(r.value - s).powi(2))
                    .sum();
                let rmse = (se / test.len() as f64).sqrt();
                assert_eq!(rmse, eval.metrics["rmse"]);
            }
            "mf-implicit" => {
                assert_eq!(scores.len(), d.mf.as_ref().expect("mf data").test.len());
            }
            _ => assert!(scores.is_empty(), "{}", m.name()),
        }
    }
}

#[test]
fn check_refuses_unusable_mf_hyper_parameters() {
    let bad = [
        MfHyper {
            learning_rate: f32::NAN,
            ..Default::default()
        },
        MfHyper {
            reg_bias: -1.0,
            ..Default::default()
        },
        MfHyper {
            clip: Some([5.0, 1.0]),
            ..Default::default()
        },
    ];
    for h in &bad {
        let m = MfShape {
            num_items: ITEMS,
            k: 3,
            implicit: false,
            hyper: h,
        };
        assert!(
            matches!(m.check(), Err(TrainError::InvalidModel(_))),
            "{h:?}"
        );
    }
    let default = MfHyper::default();
    let no_factors = MfShape {
        num_items: ITEMS,
        k: 0,
        implicit: true,
        hyper: &default,
    };
    assert!(no_factors.check().is_err());
}

/// What an agent tells the coordinator of a failed task names no user,
/// item or value of its data, and a divergence keeps the prefix the
/// coordinator reads to name a round's cause.
#[test]
fn a_failures_public_reason_carries_nothing_of_the_data() {
    let errors = [
        TrainError::NoData("mf"),
        TrainError::ModelLength {
            expected: 9173,
            got: 9181,
        },
        TrainError::FeatureWidth {
            expected: 9173,
            got: 9181,
        },
        TrainError::Diverged,
        TrainError::ItemOutOfRange {
            item: 9181,
            num_items: 9173,
        },
        TrainError::InvalidModel("customer 9181".into()),
        TrainError::Singular("customer 9181".into()),
        TrainError::MissingStandardizer,
    ];
    for e in &errors {
        let reason = e.public_reason();
        assert!(
            !reason.contains("9181") && !reason.contains("9173"),
            "{e}: {reason}"
        );
        assert!(reason.len() <= 200);
    }
    assert!(
        TrainError::Diverged
            .public_reason()
            .starts_with("local training diverged")
    );
}
