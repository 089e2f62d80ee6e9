//! Unit tests of the Lloyd step, the federated step through the sum, the
//! initialisation and the elbow.

use ndarray::{Array2, Axis};
use rand::RngExt;

use super::*;
use crate::federation::aggregate::SumAccumulator;

fn blobs(seed: u64, n: usize) -> Array2<f32> {
    let mut rng = crate::seed::rng(seed, &["blobs"]);
    let centres = [[0.0f32, 0.0], [5.0, 5.0], [-5.0, 5.0]];
    let mut v = Vec::with_capacity(n * 2);
    for i in 0..n {
        let c = centres[i % 3];
        v.push(c[0] + rng.random::<f32>() - 0.5);
        v.push(c[1] + rng.random::<f32>() - 0.5);
    }
    Array2::from_shape_vec((n, 2), v).unwrap()
}

#[test]
fn lloyd_step_sums_and_counts_rows_by_nearest_centre() {
    let x = Array2::from_shape_vec((4, 1), vec![0.0, 1.0, 9.0, 11.0]).unwrap();
    let step = lloyd_step(&x, &[0.0, 10.0], 2);
    assert_eq!(step.counts, vec![2, 2]);
    assert_eq!(step.sums, vec![1.0, 20.0]);
    assert_eq!(step.inertia, 0.0 + 1.0 + 1.0 + 1.0);
    let u = step.update(&[0.0, 10.0], 1);
    assert_eq!(u.values, vec![1.0, 0.0]);
    assert_eq!(u.coord_weights, vec![2.0, 2.0]);
    assert_eq!(u.weight, 4.0);
}

#[test]
fn federated_step_through_the_sum_equals_the_pooled_lloyd_update() {
    let x = blobs(1, 90);
    let km = KMeans {
        k: 3,
        num_features: 2,
        init: &[],
    };
    let centres = vec![1.0f32, 1.0, 4.0, 4.0, -4.0, 4.0];
    let mut acc = SumAccumulator::new(6, 3);
    for part in 0..3 {
        let rows = x.select(Axis(0), &(part * 30..(part + 1) * 30).collect::<Vec<_>>());
        acc.add(&lloyd_step(&rows, &centres, 3).update(&centres, 2))
            .unwrap();
    }
    let step = acc.mean_delta(&km.layout());
    let fed: Vec<f32> = centres.iter().zip(&step).map(|(c, s)| c + s).collect();
    let pooled = lloyd_step(&x, &centres, 3);
    for c in 0..3 {
        for j in 0..2 {
            let want = pooled.sums[c * 2 + j] / pooled.counts[c] as f64;
            assert!((f64::from(fed[c * 2 + j]) - want).abs() < 1e-5);
        }
    }
}

#[test]
fn an_empty_cluster_keeps_its_centre() {
    let x = Array2::from_shape_vec((2, 1), vec![0.0, 1.0]).unwrap();
    let km = KMeans {
        k: 2,
        num_features: 1,
        init: &[],
    };
    let centres = [0.5f32, 100.0];
    let mut acc = SumAccumulator::new(2, 2);
    acc.add(&lloyd_step(&x, &centres, 2).update(&centres, 1))
        .unwrap();
    let step = acc.mean_delta(&km.layout());
    assert_eq!(step, vec![0.0, 0.0]);
}

#[test]
fn candidates_are_means_of_at_least_the_minimum_cluster_size() {
    let x = blobs(2, 60);
    let mut rng = crate::seed::rng(3, &["t"]);
    let (c, sizes) = local_candidates(&x, 6, &mut rng);
    assert_eq!(c.len(), 2 * sizes.len());
    assert!(sizes.iter().all(|&s| s >= MIN_CANDIDATE_SIZE as f64));
    assert!(sizes.iter().sum::<f64>() <= 60.0);
    // Too few rows to form one cluster of the minimum size: no candidate.
    let tiny = x.select(Axis(0), &[0, 1, 2, 3]);
    assert!(local_candidates(&tiny, 3, &mut rng).1.is_empty());
}

#[test]
fn candidates_initialise_near_the_true_blobs_and_replay() {
    let x = blobs(4, 300);
    let mut all = Vec::new();
    let mut sizes = Vec::new();
    for part in 0..3 {
        let rows = x.select(Axis(0), &(part * 100..(part + 1) * 100).collect::<Vec<_>>());
        let mut rng = crate::seed::rng(5, &["cand", &part.to_string()]);
        let (c, s) = local_candidates(&rows, 6, &mut rng);
        all.extend(c);
        sizes.extend(s);
    }
    let init = |seed| {
        let mut rng = crate::seed::rng(seed, &["init"]);
        centres_from_candidates(&all, &sizes, 2, 3, 5, &mut rng)
    };
    let c = init(6);
    assert_eq!(c, init(6));
    // Each blob has a centre within 0.5 of it.
    for t in [[0.0f32, 0.0], [5.0, 5.0], [-5.0, 5.0]] {
        assert!(
            (0..3).any(|i| (c[2 * i] - t[0]).abs() < 0.5 && (c[2 * i + 1] - t[1]).abs() < 0.5),
            "{c:?}"
        );
    }
}

#[test]
fn elbow_finds_the_bend_of_the_curve() {
    assert_eq!(elbow(&[1, 2, 3, 4, 5], &[100.0, 50.0, 10.0, 8.0, 7.0]), 3);
    assert_eq!(elbow(&[2, 3], &[5.0, 4.0]), 3);
}

/// A probe's federated curve rose at k = 8 (a poor local optimum: the best
/// 8-clustering is never worse than the best 7-clustering), and the largest
/// second difference then read k = 7 as the elbow of a curve with no bend
/// there. A fit no better than a smaller k's is left out of the choice.
#[test]
fn a_fit_worse_than_a_smaller_ks_does_not_make_an_elbow() {
    let ks = [2, 3, 4, 5, 6, 7, 8];
    let probe = [1325.0, 1113.0, 929.0, 808.0, 736.0, 640.0, 704.0];
    assert_eq!(
        improving_fits(&ks, &probe),
        [
            (2, 1325.0),
            (3, 1113.0),
            (4, 929.0),
            (5, 808.0),
            (6, 736.0),
            (7, 640.0)
        ]
    );
    assert_eq!(elbow(&ks, &probe), 4);
    // Another probe curve: k = 7 no better than k = 6 (426 → 444 → 351).
    // Without the failed fit the gains per added cluster are compared
    // across the gap it leaves.
    let gap = [900.0, 600.0, 500.0, 426.0, 444.0, 351.0];
    assert_eq!(
        improving_fits(&[2, 3, 4, 5, 6, 7], &gap).len(),
        5,
        "only k = 6 is left out"
    );
    assert_eq!(elbow(&[2, 3, 4, 5, 6, 7], &gap), 3);
    // The slope form equals the plain second difference on an even curve.
    assert_eq!(elbow(&[2, 4, 6], &[10.0, 4.0, 3.0]), 4);
    // Every larger fit failed: the smallest k is the only measurement.
    assert_eq!(elbow(&ks, &[5.0, 6.0, 7.0, 8.0, 9.0, 9.5, 10.0]), 2);
}

/// A flat curve has no elbow (the curve of a probe's table whose distance
/// one-hot columns of thousands of values dominated: 0.19 % gained from
/// k = 2 to 8, and the largest second difference picked 6): the smallest k.
#[test]
fn a_flat_inertia_curve_keeps_the_smallest_k() {
    let ks = [2, 3, 4, 5, 6, 7, 8];
    let flat = [
        80137312.0, 80113368.0, 80094272.0, 80059472.0, 80022768.0, 80023808.0, 79986872.0,
    ];
    assert!(is_flat(&flat));
    assert_eq!(elbow(&ks, &flat), 2);
    // The bundled CDNOW RFM curve is far from flat.
    let cdnow = [141229.0, 117331.0, 102145.0, 89855.0, 84056.0];
    assert!(!is_flat(&cdnow));
    assert_eq!(elbow(&ks[..5], &cdnow), 3);
}

#[test]
fn model_len_matches_layout_and_init() {
    let init = vec![0.5; 6];
    let km = KMeans {
        k: 3,
        num_features: 2,
        init: &init,
    };
    km.check().unwrap();
    km.layout().validate(km.model_len()).unwrap();
    assert_eq!(km.initial_params(0), init);
    let bad = KMeans {
        k: 3,
        num_features: 2,
        init: &init[..5],
    };
    assert!(bad.check().is_err());
}
