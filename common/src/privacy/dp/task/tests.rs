//! `run_task` under a DP task: the clip is enforced on what leaves the agent,
//! for churn (uniform layout) and MF (per-item layout), and the clip bit.

use std::path::Path;

use super::*;
use crate::data::tabular::Schema;
use crate::model::churn::partition_churn;
use crate::model::lr::SgdParams;
use crate::model::mf::MfHyper;
use crate::model::mf::movielens;
use crate::privacy::dp::clip::l2_norm;
use crate::reference::stats_step;
use crate::task::{ModelSpec, TaskKind, TaskSpec};
use crate::train::{LocalData, run_task};

fn churn_spec() -> (TaskSpec, Vec<LocalData>) {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/telco-churn/Telco-Customer-Churn.csv");
    let ds = Schema::telco().load_csv(&path).unwrap();
    let mut merchants = partition_churn(&ds, 6, 0.2, 42);
    let mut spec = TaskSpec {
        kind: TaskKind::Train,
        model: ModelSpec::churn_lr(Schema::telco().num_features()),
        sgd: SgdParams {
            learning_rate: 0.5,
            ..Default::default()
        },
        seed: 42,
        round: 1,
        standardizer: None,
        dp: None,
        best_version: None,
    };
    spec.standardizer = stats_step(&spec, &mut merchants).unwrap();
    (spec, merchants)
}

#[test]
fn churn_updates_leave_the_agent_clipped_to_c_with_weight_one() {
    let (mut spec, mut merchants) = churn_spec();
    let global = spec.model.initial_params(42);
    let plain: Vec<f64> = merchants
        .iter_mut()
        .map(|m| {
            let u = run_task(&spec, &global, m).unwrap().update.unwrap();
            let delta: Vec<f32> = u.values.iter().map(|v| v / u.weight as f32).collect();
            l2_norm(&delta)
        })
        .collect();
    // A clip between the smallest and largest norm: some merchants are
    // clipped, some are not, and none exceeds C afterwards.
    let mut sorted = plain.clone();
    sorted.sort_by(f64::total_cmp);
    let clip = 0.5 * (sorted[0] + sorted[sorted.len() - 1]);
    assert!(sorted[0] < clip && clip < sorted[sorted.len() - 1]);
    spec.dp = Some(DpTask {
        clip,
        clip_bit: true,
        distributed: None,
    });
    for (m, norm) in merchants.iter_mut().zip(&plain) {
        let out = run_task(&spec, &global, m).unwrap();
        let u = out.update.unwrap();
        assert_eq!(u.weight, 1.0);
        assert_eq!(u.values.len(), spec.update_len());
        assert_eq!(u.values.len(), spec.model.model_len() + 1);
        u.validate(spec.update_len(), &spec.update_layout())
            .unwrap();
        let (delta, bit) = u.values.split_at(spec.model.model_len());
        let sent = l2_norm(delta);
        assert!(sent <= clip, "norm {sent} exceeds the clip {clip}");
        if *norm > clip {
            assert_eq!(bit, [-0.5]);
            assert!(sent > clip * (1.0 - 1e-5), "clipped to {sent}");
        } else {
            assert_eq!(bit, [0.5]);
            assert!((sent - norm).abs() < 1e-4 * norm);
        }
        // Metrics are still those of local training.
        assert!(out.metrics.contains_key("train_loss"));
    }
}

#[test]
fn mf_per_item_updates_are_clipped_over_every_coordinate() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/ml-latest-small/ratings.csv");
    let rows: Vec<_> = movielens::load_ratings(&path)
        .unwrap()
        .into_iter()
        .filter(|r| r.user.len() <= 2)
        .collect();
    let fed = movielens::explicit_federation(&rows, 3, 0.2, 3);
    let mut spec = TaskSpec {
        kind: TaskKind::Train,
        model: ModelSpec::Mf {
            num_items: fed.catalogue.len(),
            factors: 8,
            hyper: MfHyper {
                epochs: 2,
                ..Default::default()
            },
        },
        sgd: Default::default(),
        seed: 7,
        round: 1,
        standardizer: None,
        dp: Some(DpTask {
            clip: 0.05,
            clip_bit: false,
            distributed: None,
        }),
        best_version: None,
    };
    let global = spec.model.initial_params(7);
    let layout = spec.update_layout();
    assert_eq!(layout, spec.model.layout());
    for m in &mut fed.merchants.clone() {
        let u = run_task(&spec, &global, m).unwrap().update.unwrap();
        u.validate(spec.update_len(), &layout).unwrap();
        assert!(l2_norm(&u.values) <= 0.05);
        assert!(u.coord_weights.iter().all(|&w| w == 1.0));
        assert_eq!(u.weight, 1.0);
    }
    // The adaptive bit extends a grouped layout by one uniform coordinate.
    spec.dp.as_mut().unwrap().clip_bit = true;
    let layout = spec.update_layout();
    layout.validate(spec.update_len()).unwrap();
    assert_eq!(
        layout.segments.len(),
        spec.model.layout().segments.len() + 1
    );
    let u = run_task(&spec, &global, &mut fed.merchants[0].clone())
        .unwrap()
        .update
        .unwrap();
    u.validate(spec.update_len(), &layout).unwrap();
}

#[test]
fn evaluation_tasks_are_untouched_by_dp() {
    let (mut spec, mut merchants) = churn_spec();
    let global = spec.model.initial_params(42);
    spec.kind = TaskKind::Evaluate;
    let plain = run_task(&spec, &global, &mut merchants[0]).unwrap();
    spec.dp = Some(DpTask {
        clip: 1e-6,
        clip_bit: true,
        distributed: None,
    });
    assert_eq!(run_task(&spec, &global, &mut merchants[0]).unwrap(), plain);
    // The histogram of an evaluation carries no DP bookkeeping.
    assert_eq!(spec.update_len(), spec.model.eval_len());
}
