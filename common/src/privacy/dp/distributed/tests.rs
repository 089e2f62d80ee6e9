//! Skellam sampler moments, the n-agent variance split, wrapping and bounds.

use super::*;
use crate::seed;

/// Sample mean and (unbiased) variance.
fn moments(xs: &[i64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let mean = xs.iter().map(|&x| x as f64).sum::<f64>() / n;
    let var = xs.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, var)
}

#[test]
fn skellam_sampler_has_zero_mean_and_the_requested_variance() {
    // Small (Knuth path), medium and large (rejection path) variances.
    for &variance in &[3.0, 10_000.0, 4.0e9] {
        let mut rng = seed::rng(11, &["skellam", &variance.to_string()]);
        let n = 100_000;
        let xs: Vec<i64> = (0..n)
            .map(|_| sample_skellam(variance, &mut rng).unwrap())
            .collect();
        let (mean, var) = moments(&xs);
        let se_mean = (variance / n as f64).sqrt();
        assert!(
            mean.abs() < 5.0 * se_mean,
            "variance {variance}: mean {mean}"
        );
        // The variance estimate's relative std is about sqrt(2/n) = 0.45%.
        assert!(
            (var / variance - 1.0).abs() < 0.025,
            "variance {variance}: got {var}"
        );
    }
    assert_eq!(sample_skellam(0.0, &mut seed::rng(1, &[])).unwrap(), 0);
    assert!(sample_skellam(-1.0, &mut seed::rng(1, &[])).is_err());
}

#[test]
fn summed_agent_noise_carries_the_target_variance() {
    // z = 1, C = 1, s = 100, one coordinate per test draw: Δ₂ = 101.
    let agents = 10;
    let dp = DistributedSkellam::new(1.0, 1.0, 100.0, 1, agents).unwrap();
    assert_eq!(dp.l2_sensitivity(), 101.0);
    assert!((dp.total_variance() - 101.0f64.powi(2)).abs() < 1e-9);
    let coords = 50_000;
    let mut sum = vec![0i64; coords];
    for agent in 0..agents {
        let mut mine = vec![0i64; coords];
        let mut rng = seed::rng(5, &["agent", &agent.to_string()]);
        dp.add_noise_i64(&mut mine, &mut rng).unwrap();
        let (_, v) = moments(&mine);
        assert!(
            (v / dp.per_agent_variance() - 1.0).abs() < 0.04,
            "agent {agent}: {v}"
        );
        for (s, m) in sum.iter_mut().zip(&mine) {
            *s += m;
        }
    }
    let (mean, var) = moments(&sum);
    assert!(mean.abs() < 5.0 * (dp.total_variance() / coords as f64).sqrt());
    assert!(
        (var / dp.total_variance() - 1.0).abs() < 0.03,
        "sum variance {var}"
    );
}

#[test]
fn i32_noise_wraps_like_the_masked_sum_and_matches_the_i64_draws() {
    let dp = DistributedSkellam::new(2.0, 1.0, 1000.0, 4, 1).unwrap();
    let mut wide = vec![0i64; 64];
    let mut narrow = vec![i32::MAX; 64];
    dp.add_noise_i64(&mut wide, &mut seed::rng(3, &["w"]))
        .unwrap();
    dp.add_noise_i32(&mut narrow, &mut seed::rng(3, &["w"]))
        .unwrap();
    for (w, n) in wide.iter().zip(&narrow) {
        assert_eq!(*n, i32::MAX.wrapping_add(*w as i32));
    }
    assert!(
        wide.iter().any(|&w| w > 0),
        "some draws must wrap past i32::MAX"
    );
    // Unsigned ring words get the same draws, reduced modulo 2³² / 2⁶⁴.
    let mut u32s = vec![0u32; 64];
    let mut u64s = vec![u64::MAX; 64];
    dp.add_noise_u32(&mut u32s, &mut seed::rng(3, &["w"]))
        .unwrap();
    dp.add_noise_u64(&mut u64s, &mut seed::rng(3, &["w"]))
        .unwrap();
    for ((w, a), b) in wide.iter().zip(&u32s).zip(&u64s) {
        assert_eq!(*a, *w as u32);
        assert_eq!(*b, u64::MAX.wrapping_add(*w as u64));
    }
}

#[test]
fn dropouts_below_the_plan_lower_the_effective_noise_multiplier() {
    let dp = DistributedSkellam::new(1.2, 0.5, 4096.0, 10_000, 80).unwrap();
    assert!((dp.effective_noise_multiplier(80) - 1.2).abs() < 1e-12);
    assert!(dp.effective_noise_multiplier(100) > 1.2);
    assert!((dp.effective_noise_multiplier(20) - 0.6).abs() < 1e-12);
    // Fewer survivors means a weaker (larger) RDP.
    assert!(dp.rdp(8, 20) > dp.rdp(8, 80));
}

#[test]
fn skellam_rdp_approaches_the_gaussian_for_large_variance() {
    let (d1, d2) = (100.0, 10.0);
    for &alpha in &[2u32, 8, 64] {
        let mut last_ratio = f64::INFINITY;
        for &mu in &[1e2, 1e4, 1e6] {
            let gauss = f64::from(alpha) * d2 * d2 / (2.0 * mu);
            let sk = skellam_rdp(alpha, mu, d1, d2);
            let ratio = sk / gauss;
            assert!(
                ratio > 1.0 && ratio < last_ratio,
                "α {alpha} μ {mu}: {ratio}"
            );
            last_ratio = ratio;
        }
        assert!(last_ratio < 1.01);
    }
}

#[test]
fn the_modulus_bound_covers_the_encoded_sum_and_noise() {
    let dp = DistributedSkellam::new(1.0, 1.0, 1000.0, 100, 10).unwrap();
    // 10 agents · (1000 + 1) + 6 · sqrt(μ) with sqrt(μ) = 1010.
    assert!((dp.max_abs_sum(10) - (10_010.0 + 6.0 * 1010.0)).abs() < 1e-6);
}

#[test]
fn bad_distributed_settings_are_refused_by_name() {
    let name = |r: Result<DistributedSkellam, DpError>| match r {
        Err(DpError::InvalidParameter { name, .. }) => name,
        other => panic!("unexpected {other:?}"),
    };
    assert_eq!(
        name(DistributedSkellam::new(0.0, 1.0, 1.0, 1, 1)),
        "noise_multiplier"
    );
    assert_eq!(name(DistributedSkellam::new(1.0, -1.0, 1.0, 1, 1)), "clip");
    assert_eq!(name(DistributedSkellam::new(1.0, 1.0, 0.0, 1, 1)), "scale");
    assert_eq!(name(DistributedSkellam::new(1.0, 1.0, 1.0, 0, 1)), "dim");
    assert_eq!(
        name(DistributedSkellam::new(1.0, 1.0, 1.0, 1, 0)),
        "min_survivors"
    );
    assert_eq!(
        name(DistributedSkellam::new(1.0, 1.0, 1e30, 1, 1)),
        "variance"
    );
}

/// What a curious coordinator could set to shrink each agent's noise
/// relative to its input — noise on fewer coordinates than the update,
/// another encoding than the round's, a clip below the one training
/// applied, parameters out of range — is refused by the agent's check; the
/// round as the ledger plans it passes.
#[test]
fn an_agent_refuses_noise_that_does_not_protect_its_round() {
    use crate::privacy::secagg::SecAggConfig;
    let dim = 50;
    let honest = DistributedNoise {
        skellam: DistributedSkellam::new(1.0, 0.5, 4096.0, dim, 4).unwrap(),
        bit_variance: 0.0,
        secagg_clip: 0.5,
        modulus_bits: 32,
    };
    let mut config = SecAggConfig::complete(dim, 0, 4, 0.5);
    honest.configure(&mut config);
    assert_eq!(honest.check_round(&config, 0.5, false), Ok(()));
    let refused = |noise: DistributedNoise, config: &SecAggConfig, dp_clip| {
        noise
            .check_round(config, dp_clip, false)
            .expect_err("refused")
    };
    let mut few_coordinates = honest;
    few_coordinates.skellam.dim = 1;
    let e = refused(few_coordinates, &config, 0.5);
    assert!(e.contains("covers 1 coordinates, the update has 50"), "{e}");
    let mut scaled = config.clone();
    scaled.scale *= 1000.0;
    let e = refused(honest, &scaled, 0.5);
    assert!(e.contains("the scale 4096"), "{e}");
    let mut clipped = config.clone();
    clipped.clip = 50.0;
    assert!(refused(honest, &clipped, 0.5).contains("the value clip 0.5"));
    let mut ring = config.clone();
    ring.modulus_bits = 64;
    assert!(refused(honest, &ring, 0.5).contains("the ring 2^32"));
    let e = refused(honest, &config, 5.0);
    assert!(
        e.contains("deltas clipped to 0.5, the round clips them to 5"),
        "{e}"
    );
    let mut zero = honest;
    zero.skellam.noise_multiplier = -1.0;
    assert!(refused(zero, &config, 0.5).contains("noise_multiplier"));
    let mut nan_bit = honest;
    nan_bit.bit_variance = f64::NAN;
    assert!(refused(nan_bit, &config, 0.5).contains("clip-bit noise variance"));
    // With adaptive clipping the clip bit is one more value, noised apart.
    let mut with_bit = SecAggConfig::complete(dim + 1, 0, 4, 0.5);
    let adaptive = DistributedNoise {
        bit_variance: 2.0,
        ..honest
    };
    adaptive.configure(&mut with_bit);
    assert_eq!(adaptive.check_round(&with_bit, 0.5, true), Ok(()));
}
