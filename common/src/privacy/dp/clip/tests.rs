//! Clipping bounds, the DP form of updates, and adaptive-clip convergence.

use super::*;
use crate::federation::update::Segment;
use crate::seed;
use rand_distr::StandardNormal;

#[test]
fn clipped_vectors_fit_the_bound_and_keep_their_direction() {
    let mut rng = seed::rng(1, &["clip"]);
    for trial in 0..200usize {
        let len = 1 + trial % 37;
        let scale = 10f64.powi((trial % 7) as i32 - 3);
        let orig: Vec<f32> = (0..len)
            .map(|_| {
                let z: f64 = StandardNormal.sample(&mut rng);
                (z * scale) as f32
            })
            .collect();
        let clip = 0.7;
        let mut v = orig.clone();
        let r = clip_l2(&mut v, clip).unwrap();
        assert!(l2_norm(&v) <= clip, "trial {trial}: {}", l2_norm(&v));
        if r.clipped {
            // Clipped to the bound (within the 1e-6 margin), same direction.
            assert!(l2_norm(&v) > clip * (1.0 - 1e-5));
            let ratio = f64::from(v[0]) / f64::from(orig[0]);
            for (a, b) in v.iter().zip(&orig) {
                assert!((f64::from(*a) - ratio * f64::from(*b)).abs() <= 1e-6 * clip);
            }
        } else {
            assert_eq!(v, orig, "an unclipped vector must be untouched");
            assert!(r.norm <= clip);
        }
    }
}

#[test]
fn clipping_rejects_a_bad_bound_and_infinite_input() {
    let mut v = vec![1.0f32, 2.0];
    assert!(matches!(
        clip_l2(&mut v, 0.0),
        Err(DpError::InvalidParameter { name: "clip", .. })
    ));
    let mut v = vec![f32::INFINITY];
    assert!(clip_l2(&mut v, 1.0).is_err());
}

#[test]
fn dp_update_normalises_weights_away_and_sends_weight_one() {
    // Uniform layout: weight 4, local − global = [3, 4] (norm 5).
    let u = Update {
        values: vec![12.0, 16.0],
        coord_weights: vec![],
        weight: 4.0,
    };
    let (small, r) = dp_update(&u, &WeightLayout::uniform(), 10.0).unwrap();
    assert!(!r.clipped && (r.norm - 5.0).abs() < 1e-12);
    assert_eq!(small.values, vec![3.0, 4.0]);
    assert_eq!(small.weight, 1.0);
    let (big, r) = dp_update(&u, &WeightLayout::uniform(), 1.0).unwrap();
    assert!(r.clipped);
    assert!(l2_norm(&big.values) <= 1.0);
    assert!((big.values[0] - 0.6).abs() < 1e-5 && (big.values[1] - 0.8).abs() < 1e-5);
}

#[test]
fn dp_update_divides_grouped_rows_by_their_counts_and_zeroes_untouched_groups() {
    // One uniform coordinate (weight 2) then 3 groups of 2 coordinates,
    // the middle group untouched.
    let layout = WeightLayout {
        segments: vec![
            Segment {
                len: 1,
                group_len: None,
            },
            Segment {
                len: 6,
                group_len: Some(2),
            },
        ],
        num_coord_weights: 3,
    };
    let u = Update {
        values: vec![2.0, 3.0, 6.0, 0.0, 0.0, 5.0, 10.0],
        coord_weights: vec![3.0, 0.0, 5.0],
        weight: 2.0,
    };
    let (out, r) = dp_update(&u, &layout, 100.0).unwrap();
    assert!(!r.clipped);
    assert_eq!(out.values, vec![1.0, 1.0, 2.0, 0.0, 0.0, 1.0, 2.0]);
    assert_eq!(out.coord_weights, vec![1.0; 3]);
    assert_eq!(out.weight, 1.0);
    // A malformed update is refused, not clipped.
    let bad = Update {
        coord_weights: vec![1.0],
        ..u
    };
    assert!(matches!(
        dp_update(&bad, &layout, 1.0),
        Err(DpError::Update(_))
    ));
}

/// Runs adaptive clipping against log-normal update norms (`exp(N(0, 1))`,
/// whose γ-quantile is `exp(Φ⁻¹(γ))`) and returns the mean clip over the last
/// 100 of 400 rounds.
fn settle(target_quantile: f64, initial: f64) -> f64 {
    let cohort = 100;
    let mut rng = seed::rng(7, &["adaptive", &target_quantile.to_string()]);
    let mut ac = AdaptiveClip::new(initial, target_quantile, 0.2, cohort as f64 / 20.0).unwrap();
    let mut tail = 0.0;
    for round in 0..400 {
        let bit_sum: f64 = (0..cohort)
            .map(|_| {
                let z: f64 = StandardNormal.sample(&mut rng);
                ac.unclipped_bit(z.exp())
            })
            .sum();
        ac.update(bit_sum, cohort as f64, &mut rng).unwrap();
        if round >= 300 {
            tail += ac.clip() / 100.0;
        }
    }
    tail
}

#[test]
fn adaptive_clip_converges_to_the_target_quantile() {
    // Median of exp(N(0,1)) is 1; its 0.8-quantile is exp(0.841621) = 2.3201.
    let median = settle(0.5, 0.01);
    assert!((median - 1.0).abs() < 0.1, "median estimate {median}");
    let q80 = settle(0.8, 50.0);
    eprintln!("settled clips: median {median:.4} (true 1), q0.8 {q80:.4} (true 2.3201)");
    assert!((q80 - 2.3201).abs() < 0.25, "0.8-quantile estimate {q80}");
}

#[test]
fn delta_noise_multiplier_follows_andrew_et_al() {
    let z = AdaptiveClip::delta_noise_multiplier(1.0, 5.0).unwrap();
    assert!((z - (1.0f64 - 0.01).powf(-0.5)).abs() < 1e-12);
    assert!(z > 1.0);
    assert!(matches!(
        AdaptiveClip::delta_noise_multiplier(1.0, 0.5),
        Err(DpError::InvalidParameter {
            name: "count_noise_std",
            ..
        })
    ));
}

#[test]
fn adaptive_clip_rejects_bad_settings_by_name() {
    let name = |r: Result<AdaptiveClip, DpError>| match r {
        Err(DpError::InvalidParameter { name, .. }) => name,
        other => panic!("unexpected {other:?}"),
    };
    assert_eq!(name(AdaptiveClip::new(0.0, 0.5, 0.2, 1.0)), "initial_clip");
    assert_eq!(
        name(AdaptiveClip::new(1.0, 1.0, 0.2, 1.0)),
        "target_quantile"
    );
    assert_eq!(
        name(AdaptiveClip::new(1.0, 0.5, -1.0, 1.0)),
        "learning_rate"
    );
    assert_eq!(
        name(AdaptiveClip::new(1.0, 0.5, 0.2, f64::NAN)),
        "count_noise_std"
    );
}

#[test]
fn a_noised_fraction_outside_0_1_moves_the_clip_no_further_than_a_whole_cohort_would() {
    // Two agents under strong privacy: count noise of std 340 read a
    // fraction of -170 and one round multiplied C by about 1e15.
    let mut ac = AdaptiveClip::new(0.1, 0.5, 0.2, 340.0).unwrap();
    let fraction = ac.update_noised(-340.0, 2.0).unwrap();
    assert_eq!(fraction, 0.0);
    assert!(
        (ac.clip() - 0.1 * (0.2f64 * 0.5).exp()).abs() < 1e-12,
        "{}",
        ac.clip()
    );
    let fraction = ac.update_noised(1e6, 2.0).unwrap();
    assert_eq!(fraction, 1.0);
    assert!((ac.clip() - 0.1).abs() < 1e-12, "{}", ac.clip());
}
