//! The segmentation pipeline through plain sums: the state round-trips, the
//! exchanges find the blobs and their number, and bad answers are caught.

use ndarray::{Array1, Array2};
use rand::RngExt;

use super::*;
use crate::data::standardize::Standardizer;
use crate::data::tabular::TabularDataset;
use crate::federation::aggregate::SumAccumulator;
use crate::model::ChurnData;
use crate::model::sgd::SgdParams;

/// Three blobs in 2-D; merchant `part` holds every third row from `part`.
fn blobs(seed: u64, n: usize) -> Array2<f32> {
    let mut rng = crate::seed::rng(seed, &["blobs"]);
    let centres = [[0.0f32, 0.0], [6.0, 6.0], [-6.0, 6.0]];
    let mut v = Vec::with_capacity(n * 2);
    for i in 0..n {
        let c = centres[(i / 7) % 3];
        v.push(c[0] + rng.random::<f32>() - 0.5);
        v.push(c[1] + rng.random::<f32>() - 0.5);
    }
    Array2::from_shape_vec((n, 2), v).unwrap()
}

fn merchant(id: &str, x: Array2<f32>) -> LocalData {
    let n = x.nrows();
    LocalData {
        merchant_id: id.into(),
        churn: Some(ChurnData {
            train: TabularDataset {
                ids: (0..n).map(|i| i.to_string()).collect(),
                x,
                y: Array1::zeros(n),
            },
            valid: TabularDataset {
                ids: Vec::new(),
                x: Array2::zeros((0, 2)),
                y: Array1::zeros(0),
            },
        }),
        ..Default::default()
    }
}

fn merchants() -> Vec<LocalData> {
    (0..3)
        .map(|m| {
            let x = blobs(m as u64 + 1, 120);
            merchant(&format!("m{m}"), x)
        })
        .collect()
}

fn spec<'a>(ks: &'a [usize], exchange: &'a Exchange) -> Segments<'a> {
    Segments {
        num_features: 2,
        ks,
        choose_rounds: 4,
        lloyd_rounds: 20,
        exchange,
    }
}

/// Runs the pipeline to the end with every merchant selected, summing the
/// answers plainly as the engine does; returns the states in order.
fn federate(ks: &[usize], data: &mut [LocalData]) -> Vec<Vec<f32>> {
    let sgd = SgdParams::default();
    let pooled: Vec<_> = data
        .iter()
        .map(|d| d.churn.clone().unwrap().train.x)
        .collect();
    let views: Vec<_> = pooled.iter().map(|x| x.view()).collect();
    let scaler = Standardizer::fit(&ndarray::concatenate(ndarray::Axis(0), &views).unwrap());
    let ctx = RoundContext {
        sgd: &sgd,
        seed: 9,
        round: 1,
        standardizer: Some(&scaler),
        best_version: None,
    };
    let ids: Vec<String> = data.iter().map(|d| d.merchant_id.clone()).collect();
    let first = Exchange::default();
    let mut global = spec(ks, &first).initial_params(9);
    let mut states = vec![global.clone()];
    while !spec(ks, &first).complete(&global) {
        let (phase, chosen) = Segmentation::header(&global).unwrap();
        let exchange = Exchange {
            phase,
            chosen,
            slots: if phase == Phase::Candidates {
                ids.clone()
            } else {
                Vec::new()
            },
        };
        let m = spec(ks, &exchange);
        let mut acc = SumAccumulator::new(m.update_len(), 0);
        for d in data.iter_mut() {
            let u = m.fit(&ctx, &global, d).unwrap().update.unwrap();
            assert_eq!(u.values.len(), m.update_len());
            assert_eq!(m.first_bad_value(&d.merchant_id, &u), None);
            acc.add(&u).unwrap();
        }
        global = m
            .next_version(&global, acc.sum_values(), acc.total_weight())
            .unwrap();
        assert_eq!(global.len(), m.model_len());
        states.push(global.clone());
        assert!(states.len() as u64 <= m.max_versions() + 1);
    }
    states
}

/// A Lloyd round in which a cluster holds fewer than MIN_CANDIDATE_SIZE
/// customers across the federation leaves that centre where it was: its
/// mean would be (nearly) those customers' own rows, published to every
/// merchant. A cluster of exactly that many moves.
#[test]
fn a_cluster_of_fewer_than_five_customers_does_not_move_its_centre() {
    let mut s = Segmentation::new(2, &[2], 3);
    s.phase = Phase::Lloyd;
    s.chosen = 2;
    s.centres[0] = vec![0.0, 0.0, 10.0, 10.0];
    let before = s.centres[0].clone();
    // Per cluster the sum of its customers' features, then the counts, then
    // the inertia: cluster 0 holds one customer at (1, 2), cluster 1 five.
    let sums = [1.0, 2.0, 55.0, 60.0, 1.0, 5.0, 3.0];
    s.on_sum(&sums, 0, 4, 20).unwrap();
    assert_eq!(&s.centres[0][..2], &before[..2], "one customer's row");
    assert_eq!(&s.centres[0][2..], &[11.0, 12.0]);
    let four = [
        4.0,
        8.0,
        60.0,
        65.0,
        kmeans::MIN_CANDIDATE_SIZE as f64 - 1.0,
        5.0,
        3.0,
    ];
    s.on_sum(&four, 0, 4, 20).unwrap();
    assert_eq!(&s.centres[0][..2], &before[..2]);
    let five = [
        5.0,
        10.0,
        65.0,
        70.0,
        kmeans::MIN_CANDIDATE_SIZE as f64,
        5.0,
        3.0,
    ];
    s.on_sum(&five, 0, 4, 20).unwrap();
    assert_eq!(&s.centres[0][..2], &[1.0, 2.0]);
}

#[test]
fn the_state_round_trips_with_its_seed() {
    let mut s = Segmentation::new(3, &[2, 4], u64::MAX - 12345);
    s.phase = Phase::Lloyd;
    s.chosen = 4;
    s.updates = 7;
    s.curve = vec![10.5, 3.25];
    s.centres[1][5] = -1.5;
    let v = s.encode();
    assert_eq!(v.len(), Segmentation::encoded_len(3, &[2, 4]));
    assert_eq!(Segmentation::decode(&v, 3, &[2, 4]).unwrap(), s);
    assert_eq!(Segmentation::header(&v).unwrap(), (Phase::Lloyd, 4));
    // Another run's k or width, or a corrupt header, is refused.
    assert!(Segmentation::decode(&v, 3, &[2, 5]).is_err());
    assert!(Segmentation::decode(&v, 2, &[2, 4]).is_err());
    let mut bad = v.clone();
    bad[1] = 7.0;
    assert!(Segmentation::decode(&bad, 3, &[2, 4]).is_err());
}

#[test]
fn the_pipeline_chooses_three_segments_for_three_blobs_and_converges_on_them() {
    let ks: Vec<usize> = DEFAULT_KS.collect();
    let states = federate(&ks, &mut merchants());
    let last = Segmentation::decode(states.last().unwrap(), 2, &ks).unwrap();
    assert_eq!(last.phase, Phase::Done);
    assert_eq!(last.chosen, 3);
    // The curve is the inertia of every k, decreasing.
    assert!(
        last.curve.windows(2).all(|w| w[1] <= w[0]),
        "{:?}",
        last.curve
    );
    // Candidates, the choice's 4 + 1 Lloyd rounds, then at most 20 in all.
    assert!(
        states.len() >= 1 + 1 + 5 && states.len() <= 1 + 21,
        "{}",
        states.len()
    );
    // Every customer is in its blob's segment: each segment holds one
    // blob's rows at every merchant.
    let data = merchants();
    let pooled: Vec<_> = data
        .iter()
        .map(|d| d.churn.clone().unwrap().train.x)
        .collect();
    let views: Vec<_> = pooled.iter().map(|x| x.view()).collect();
    let scaler = Standardizer::fit(&ndarray::concatenate(ndarray::Axis(0), &views).unwrap());
    let (k, centres) = last.chosen_centres().unwrap();
    for x in &pooled {
        let labels = kmeans::assign(&scaler.transform(x), centres, k);
        for (i, (c, _)) in labels.iter().enumerate() {
            let (j, _) = labels[(i / 7) % 3 * 7];
            assert_eq!(*c, j, "row {i}");
        }
    }
    // The same run replays bit for bit.
    assert_eq!(states, federate(&ks, &mut merchants()));
}

#[test]
fn one_k_skips_the_choice_and_a_foreign_slot_or_a_tiny_candidate_is_refused() {
    let states = federate(&[3], &mut merchants());
    let after = Segmentation::decode(&states[1], 2, &[3]).unwrap();
    assert_eq!((after.phase, after.chosen), (Phase::Lloyd, 3));
    let ids = vec!["m0".to_string(), "m1".to_string()];
    let exchange = Exchange {
        phase: Phase::Candidates,
        chosen: 0,
        slots: ids,
    };
    let m = spec(&[3], &exchange);
    let slot = state::slot_len(&[3], 2);
    let size_at = |s: usize, c: usize| s * slot + 9 * 2 + c;
    let mut u = Update {
        values: vec![0.0; m.update_len()],
        coord_weights: Vec::new(),
        weight: 100.0,
    };
    u.values[size_at(0, 0)] = 10.0;
    assert_eq!(m.first_bad_value("m0", &u), None);
    // m1 proposing in m0's slot: one merchant speaking for another.
    assert_eq!(m.first_bad_value("m1", &u), Some(size_at(0, 0)));
    // Candidates in two slots.
    u.values[size_at(1, 0)] = 10.0;
    assert_eq!(m.first_bad_value("m0", &u), Some(size_at(1, 0)));
    u.values[size_at(1, 0)] = 0.0;
    // A candidate of fewer customers than the minimum, or more than it has.
    u.values[size_at(0, 1)] = 2.0;
    assert_eq!(m.first_bad_value("m0", &u), Some(size_at(0, 1)));
    u.values[size_at(0, 1)] = 101.0;
    assert_eq!(m.first_bad_value("m0", &u), Some(size_at(0, 1)));
    // No candidate at all: the summed exchange is refused with the reason.
    let global = m.initial_params(1);
    let err = m
        .next_version(&global, &vec![0.0; m.update_len()], 0.0)
        .unwrap_err();
    assert!(err.to_string().contains("no merchant proposed"), "{err}");
}

#[test]
fn a_task_for_another_phase_or_a_merchant_without_a_slot_is_refused() {
    let sgd = SgdParams::default();
    let mut data = merchants();
    let scaler = Standardizer::fit(&data[0].churn.as_ref().unwrap().train.x);
    let ctx = RoundContext {
        sgd: &sgd,
        seed: 1,
        round: 1,
        standardizer: Some(&scaler),
        best_version: None,
    };
    let exchange = Exchange {
        phase: Phase::Candidates,
        chosen: 0,
        slots: vec!["m1".into()],
    };
    let m = spec(&[3], &exchange);
    let global = m.initial_params(1);
    let err = m.fit(&ctx, &global, &mut data[0]).unwrap_err();
    assert!(err.to_string().contains("no slot"), "{err}");
    let lloyd = Exchange {
        phase: Phase::Lloyd,
        chosen: 3,
        slots: Vec::new(),
    };
    let err = spec(&[3], &lloyd)
        .fit(&ctx, &global, &mut data[0])
        .unwrap_err();
    assert!(err.to_string().contains("the state is at"), "{err}");
}
