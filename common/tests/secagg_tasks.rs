//! The per-task secure-aggregation configuration (`SecAggConfig::for_task`):
//! graph and ring choices, and the federated statistics step of the churn
//! models on the bundled Telco data run through the real protocol, which must
//! agree with the plaintext statistics within the documented resolution.

use std::path::Path;

use fedcart_common::data::standardize::Standardizer;
use fedcart_common::data::tabular::Schema;
use fedcart_common::federation::aggregate::SumAccumulator;
use fedcart_common::federation::update::{Update, WeightLayout};
use fedcart_common::model::churn::partition_churn;
use fedcart_common::model::lr::SgdParams;
use fedcart_common::privacy::secagg::{
    Dropouts, MIN_STEPS_PER_CLIP, STATS_CLIP, SecAggConfig, run_in_memory,
};
use fedcart_common::task::{ModelSpec, TaskKind, TaskSpec};
use fedcart_common::train::run_task;

#[test]
fn for_task_picks_the_complete_graph_up_to_64_agents_and_secagg_plus_above() {
    let c = SecAggConfig::for_task(TaskKind::Train, 10, 0, 64, 1.0, None);
    assert_eq!((c.neighbours, c.threshold), (63, 33));
    let c = SecAggConfig::for_task(TaskKind::Train, 10, 0, 100, 1.0, None);
    assert_eq!(c.neighbours, 14); // 2·⌈log2 100⌉
    assert_eq!(c.threshold, 8);
    // An explicit degree overrides either choice, capped at n − 1.
    let c = SecAggConfig::for_task(TaskKind::Train, 10, 0, 20, 1.0, Some(6));
    assert_eq!((c.neighbours, c.threshold), (6, 4));
    let c = SecAggConfig::for_task(TaskKind::Stats, 10, 0, 5, 1.0, Some(50));
    assert_eq!((c.neighbours, c.threshold), (4, 3));
    for n in [2, 3, 64, 65, 1000] {
        for kind in [TaskKind::Train, TaskKind::Stats] {
            let c = SecAggConfig::for_task(kind, 1000, 10, n, 1.0, None);
            c.validate(n)
                .unwrap_or_else(|e| panic!("{kind:?} with {n} agents: {e}"));
        }
    }
}

#[test]
fn training_rounds_stay_in_32_bits_until_the_resolution_would_suffer() {
    let c = SecAggConfig::for_task(TaskKind::Train, 1000, 0, 100, 0.5, None);
    assert_eq!(c.modulus_bits, 32);
    assert_eq!(c.bytes_per_element(), 4);
    assert_eq!(c.scale, ((1u64 << 30) as f64 / 50.0).floor());
    // 20 000 agents would leave 2^30 / 20 000 ≈ 53 687 < 2^16 steps per clip.
    let n = 20_000;
    let c = SecAggConfig::for_task(TaskKind::Train, 1000, 0, n, 0.5, None);
    assert_eq!(c.modulus_bits, 64);
    assert!(c.scale * 0.5 >= MIN_STEPS_PER_CLIP);
    c.validate(n).unwrap();
}

#[test]
fn statistics_rounds_use_64_bits_and_the_statistics_clip_whatever_the_training_clip() {
    for n in [2usize, 5, 100, 1000, 300_000] {
        let c = SecAggConfig::for_task(TaskKind::Stats, 94, 0, n, 0.01, None);
        assert_eq!(c.modulus_bits, 64, "{n} agents");
        c.validate(n).unwrap();
        if n <= 1 << 18 {
            assert_eq!(c.clip, STATS_CLIP);
            assert_eq!(c.scale, ((1u64 << 18) as f64 / n as f64).floor());
        } else {
            assert_eq!(c.scale, 1.0);
            assert!(c.clip < STATS_CLIP);
        }
    }
}

fn telco_stats(merchants: usize) -> (Vec<Update>, usize) {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/telco-churn/Telco-Customer-Churn.csv");
    let schema = Schema::telco();
    let ds = schema.load_csv(&path).unwrap();
    let spec = TaskSpec {
        kind: TaskKind::Stats,
        model: ModelSpec::churn_lr(schema.num_features()),
        sgd: SgdParams::default(),
        seed: 42,
        round: 0,
        standardizer: None,
        dp: None,
        best_version: None,
    };
    let updates = partition_churn(&ds, merchants, 0.2, 42)
        .iter_mut()
        .map(|m| run_task(&spec, &[], m).unwrap().update.unwrap())
        .collect();
    (updates, spec.update_len())
}

/// The churn models' statistics step (Σx, Σx² per feature, weight = rows)
/// over 6 Telco merchants through the full protocol with one dropout: every
/// summed coordinate within the documented n/scale of the plaintext sum,
/// the row count exact, and the agreed standardiser equal to the plaintext
/// one to f32 precision.
#[test]
fn telco_statistics_through_secure_aggregation_equal_plaintext_within_resolution() {
    let (updates, len) = telco_stats(6);
    let n = updates.len();
    // The step that did not fit 32 bits: Σx² of TotalCharges per merchant.
    let largest = updates
        .iter()
        .flat_map(|u| &u.values)
        .fold(0f32, |m, v| m.max(v.abs()));
    assert!(largest > 1e10, "largest statistic {largest}");

    let config = SecAggConfig::for_task(TaskKind::Stats, len, 0, n, 1.0, None);
    let dropouts = Dropouts {
        unmask: vec![2], // sent its input, then went silent: still in the sum
        ..Dropouts::none()
    };
    let out = run_in_memory(&config, &updates, &dropouts, 7)
        .unwrap()
        .output;
    assert_eq!(out.survivors.len(), n);
    assert_eq!(out.sum.clipped, 0);

    let mut plain = SumAccumulator::new(len, 0);
    updates.iter().for_each(|u| plain.add(u).unwrap());
    let resolution = n as f64 / config.scale;
    // The documented bound: n/scale ≈ 3.8e-6 · n² (1.4e-4 for 6 agents).
    assert!(
        resolution <= 1.001 * (n * n) as f64 / f64::from(1u32 << 18),
        "resolution {resolution}"
    );
    for (j, (secure, plain)) in out.sum.values.iter().zip(plain.sum_values()).enumerate() {
        // Codes above 2^53 are rounded by f64 too: 1e-15 relative.
        let tol = resolution + 1e-15 * plain.abs();
        assert!(
            (secure - plain).abs() <= tol,
            "coordinate {j}: secure {secure}, plaintext {plain}, tolerance {tol}"
        );
    }
    assert_eq!(out.sum.weight, plain.total_weight());

    let layout = WeightLayout::uniform();
    let secure = Standardizer::from_moments(&out.sum.into_accumulator().mean_delta(&layout));
    let plain = Standardizer::from_moments(&plain.mean_delta(&layout));
    for j in 0..plain.mean.len() {
        let close = |a: f32, b: f32| (a - b).abs() <= 1e-6 * b.abs().max(1.0);
        assert!(
            close(secure.mean[j], plain.mean[j]) && close(secure.std[j], plain.std[j]),
            "feature {j}: secure ({}, {}) plaintext ({}, {})",
            secure.mean[j],
            secure.std[j],
            plain.mean[j],
            plain.std[j]
        );
    }
}

/// The same statistics cannot be carried by the 32-bit ring at any useful
/// resolution: the configuration is refused, naming `scale`.
#[test]
fn telco_statistics_do_not_fit_a_32_bit_ring() {
    let (updates, len) = telco_stats(6);
    let mut c = SecAggConfig::for_task(TaskKind::Stats, len, 0, updates.len(), 1.0, None);
    c.modulus_bits = 32;
    let err = c.validate(updates.len()).unwrap_err().to_string();
    assert!(err.contains("`scale`"), "{err}");
}
