use ndarray::array;

use super::ensemble::{Node, Tree};
use super::grow::{best_split, grow_level};
use super::*;
use crate::data::standardize::Standardizer;
use crate::model::sgd::SgdParams;

fn params() -> GbdtParams {
    GbdtParams {
        trees: 2,
        max_depth: 1,
        learning_rate: 0.5,
        min_child_weight: 0.5,
        l2: 0.0,
        ..GbdtParams::default()
    }
}

/// Feature 0 has three bins, feature 1 two; both see the same rows, so
/// both sum to G = 2, H = 4.
fn hand_histogram() -> (Vec<f64>, Vec<f64>, Vec<usize>) {
    let g = vec![-2.0, 1.0, 3.0, 1.0, 1.0];
    let h = vec![1.0, 1.0, 2.0, 2.0, 2.0];
    (g, h, vec![3, 2])
}

#[test]
fn split_finding_on_a_hand_worked_histogram() {
    let (g, h, bins) = hand_histogram();
    let ((tg, th), best) = best_split(&g, &h, &bins, &params());
    assert_eq!((tg, th), (2.0, 4.0));
    // Parent 2²/4 = 1. Feature 0 after bin 0: (−2)²/1 + 4²/3 − 1 = 25/3;
    // after bin 1: (−1)²/2 + 3²/2 − 1 = 4; feature 1: 1/2 + 1/2 − 1 = 0.
    let s = best.unwrap();
    assert_eq!((s.feature, s.bin), (0, 0));
    assert!((s.gain - 25.0 / 3.0).abs() < 1e-12);
    assert_eq!((s.left, s.right), ((-2.0, 1.0), (4.0, 3.0)));
    // A child hessian of 1 is below min_child_weight 1.5: bin 1 wins.
    let strict = GbdtParams {
        min_child_weight: 1.5,
        ..params()
    };
    let s = best_split(&g, &h, &bins, &strict).1.unwrap();
    assert_eq!((s.feature, s.bin), (0, 1));
    assert!((s.gain - 4.0).abs() < 1e-12);
    // L2 shrinks the gain: λ = 1 gives 4/2 + 16/4 − 4/5 = 5.2.
    let l2 = GbdtParams {
        l2: 1.0,
        ..params()
    };
    let s = best_split(&g, &h, &bins, &l2).1.unwrap();
    assert!((s.gain - 5.2).abs() < 1e-12);
    // No split of a histogram with a single occupied bin.
    assert!(
        best_split(&[2.0, 0.0], &[4.0, 0.0], &[2], &params())
            .1
            .is_none()
    );
}

fn sketched(edges: Vec<Vec<f32>>, depth: usize) -> Ensemble {
    let mut e = Ensemble::new(edges.len(), depth);
    e.edges = edges;
    e.sketched = true;
    e.building = Some(Tree::open_root(depth));
    e
}

#[test]
fn a_level_picks_the_split_makes_leaves_at_the_depth_limit_and_starts_the_next_tree() {
    let mut ens = sketched(vec![vec![-1.0, 0.5], vec![0.0]], 1);
    let (g, h, _) = hand_histogram();
    let sums: Vec<f64> = g.into_iter().chain(h).collect();
    assert_eq!(grow::level_len(&ens), sums.len());
    grow_level(&mut ens, &sums, &params()).unwrap();
    assert_eq!(ens.trees.len(), 1);
    let t = &ens.trees[0];
    assert_eq!(
        t.nodes[0],
        Node::Split {
            feature: 0,
            threshold: -1.0
        }
    );
    // Leaves −η·G/(H+λ): −0.5·(−2)/1 = 1 and −0.5·4/3.
    assert_eq!(t.nodes[1], Node::Leaf(1.0));
    assert_eq!(t.nodes[2], Node::Leaf((-0.5f64 * 4.0 / 3.0) as f32));
    // The second of two trees starts with an open root; then the run is done.
    assert_eq!(ens.building, Some(Tree::open_root(1)));
    let p = params();
    let model = ChurnGbdt {
        num_features: 2,
        params: &p,
        level_len: 0,
    };
    assert!(!model.complete(&ens.encode()));
    assert!(model.checkpoint(&ens.encode()));
    grow_level(&mut ens, &vec![0.0; sums.len()], &p).unwrap();
    assert!(model.complete(&ens.encode()));
    // A sum of the wrong length or with a NaN is refused, not grown.
    let mut fresh = sketched(vec![vec![0.0]], 1);
    assert!(grow_level(&mut fresh, &[1.0], &p).is_err());
    assert!(grow_level(&mut fresh, &[f64::NAN, 0.0, 1.0, 1.0], &p).is_err());
}

#[test]
fn trees_that_never_split_are_explained() {
    let p = GbdtParams::default();
    // A churn rate of 0.929 (p·(1−p) = 0.066): min_child_weight 20 on each
    // side needs about 607 rows.
    let mut e = sketched(vec![vec![0.5], vec![-1.0, 1.0]], 3);
    e.base_score = (0.929f32 / 0.071).ln();
    let mut stump = Tree::open_root(3);
    stump.nodes[0] = Node::Leaf(0.0);
    e.trees = vec![stump.clone(), stump];
    let note = e.unsplit_note(&p, Some(84)).expect("no tree split");
    assert!(
        note.contains("none of the 2 trees split")
            && note.contains("about 607 training rows")
            && note.contains("grown on 84")
            && note.contains("below 2.77")
            && note.contains("--min-child-weight"),
        "{note}"
    );
    // Enough rows: the features are the reason, not the rows.
    let note = e.unsplit_note(&p, Some(5000)).expect("no tree split");
    assert!(note.contains("no feature separates"), "{note}");
    // The coordinator knows no row count: both causes, the rows first.
    let note = e.unsplit_note(&p, None).expect("no tree split");
    assert!(
        note.contains("about 607 training rows across the merchants")
            && note.contains("`min_child_weight` in the run's gbdt settings")
            && !note.contains("--min-child-weight"),
        "{note}"
    );
    // One class only: the labels are the cause, not min_child_weight (it
    // advised "a min_child_weight below 0.00").
    let mut one = e.clone();
    one.base_score = -20.0;
    let note = one.unsplit_note(&p, Some(84)).expect("no tree split");
    assert!(
        note.contains("every training customer has the same label") && !note.contains("below"),
        "{note}"
    );
    // A model with a split, or with no tree yet, needs no note.
    assert_eq!(example().unsplit_note(&p, Some(84)), None);
    e.trees.clear();
    assert_eq!(e.unsplit_note(&p, Some(84)), None);
}

#[test]
fn max_leaves_keeps_the_splits_with_the_largest_gains() {
    let mut ens = sketched(vec![vec![0.0]], 2);
    // Root: split G = (−3, 3), H = (1, 1).
    let p = GbdtParams {
        max_depth: 2,
        max_leaves: 3,
        l2: 1.0,
        ..params()
    };
    grow_level(&mut ens, &[-3.0, 3.0, 1.0, 1.0], &p).unwrap();
    let open = ens.building.as_ref().unwrap().open_nodes();
    assert_eq!(open, vec![1, 2]);
    // Both children could split; node 2's gain is larger; only one fits.
    let sums = [-1.0, 1.0, 0.5, 0.5, -4.0, 4.0, 0.5, 0.5];
    grow_level(&mut ens, &sums, &p).unwrap();
    let t = &ens.trees[0];
    assert!(matches!(t.nodes[1], Node::Leaf(_)));
    assert!(matches!(t.nodes[2], Node::Split { .. }));
    assert_eq!(t.leaves(), 3);
}

fn example() -> Ensemble {
    let mut e = sketched(vec![vec![0.5], vec![-1.0, 1.0]], 1);
    e.base_score = -0.25;
    let mut t = Tree::open_root(1);
    t.nodes = vec![
        Node::Split {
            feature: 0,
            threshold: 0.5,
        },
        Node::Leaf(1.0),
        Node::Leaf(-1.0),
    ];
    e.trees.push(t);
    e.building = None;
    e
}

#[test]
fn the_encoding_round_trips_and_a_corrupt_or_nan_model_is_refused_with_the_reason() {
    let e = example();
    let v = e.encode();
    assert_eq!(Ensemble::decode(&v).unwrap(), e);
    let mut nan = v.clone();
    nan[20] = f32::NAN;
    assert_eq!(
        Ensemble::decode(&nan).unwrap_err(),
        GbdtError::NotFinite { index: 20 }
    );
    let err = |v: &[f32]| Ensemble::decode(v).unwrap_err().to_string();
    assert!(err(&v[..v.len() - 1]).contains("header announces"));
    let mut magic = v.clone();
    magic[0] = 1.0;
    assert!(err(&magic).contains("magic"));
    let mut version = v.clone();
    version[1] = 2.0;
    assert!(err(&version).contains("format version 2"));
    let tree = v.len() - 3 * ensemble::NODE_LEN;
    let mut feature = v.clone();
    feature[tree + 1] = 7.0;
    assert!(
        err(&feature).contains("feature 7 of 2"),
        "{}",
        err(&feature)
    );
    let mut open = v.clone();
    open[tree + ensemble::NODE_LEN] = 3.0;
    assert!(err(&open).contains("open"), "{}", err(&open));
    let mut orphan = v.clone();
    orphan[tree] = 2.0; // the root becomes a leaf: its children must go
    assert!(err(&orphan).contains("does not split"), "{}", err(&orphan));
    let mut edges = v.clone();
    edges[ensemble::HEADER + 2 + 2] = -2.0; // feature 1's edges: −1, −2
    assert!(err(&edges).contains("not increasing"), "{}", err(&edges));
}

#[test]
fn scoring_routes_rows_through_the_trees_and_ignores_a_tree_in_progress() {
    let mut e = example();
    let x = array![[0.0f32, 5.0], [0.5, 0.0], [2.0, 0.0]];
    let p = e.predict_proba(&x);
    let s = |z: f32| 1.0 / (1.0 + (-z).exp());
    assert_eq!(p, vec![s(0.75), s(0.75), s(-1.25)]);
    e.building = Some(Tree::open_root(1));
    assert_eq!(e.predict_proba(&x), p);
    // Through the standardiser, on raw rows: x' = (x − 1) / 2.
    let scaler = Standardizer {
        mean: vec![1.0, 0.0],
        std: vec![2.0, 1.0],
        rows: None,
    };
    let raw = array![[1.0f32, 0.0], [6.0, 0.0]];
    assert_eq!(
        predict(&e.encode(), &scaler, &raw).unwrap(),
        vec![s(0.75), s(-1.25)]
    );
    assert!(predict(&e.encode(), &scaler, &array![[1.0f32]]).is_err());
}

/// Labels from a threshold on feature 0 plus noise from feature 1.
fn merchant(id: &str, rows: usize, offset: usize) -> LocalData {
    let n = rows;
    let x = ndarray::Array2::from_shape_fn((n, 2), |(i, j)| {
        let k = (i + offset) as f32;
        if j == 0 {
            (k * 0.37).sin() * 3.0
        } else {
            (k * 1.3).cos()
        }
    });
    let y = ndarray::Array1::from_shape_fn(n, |i| {
        f32::from(u8::from(x[[i, 0]] + 0.3 * x[[i, 1]] > 0.5))
    });
    let ds = crate::data::tabular::TabularDataset {
        ids: (0..n).map(|i| format!("{id}{i}")).collect(),
        x,
        y,
    };
    LocalData {
        merchant_id: id.into(),
        churn: Some(ChurnData {
            train: ds.clone(),
            valid: ds,
        }),
        ..Default::default()
    }
}

/// Every round with plain sums: the statistics step, the sketch, the levels.
fn federate(p: &GbdtParams, merchants: &mut [LocalData]) -> (Vec<f32>, Standardizer, usize) {
    let sgd = SgdParams::default();
    let base = ChurnGbdt {
        num_features: 2,
        params: p,
        level_len: 0,
    };
    let mut moments = [0.0f64; 4];
    let mut n = 0.0;
    for m in merchants.iter_mut() {
        let ctx = RoundContext {
            sgd: &sgd,
            seed: 1,
            round: 0,
            standardizer: None,
            best_version: None,
        };
        let u = base.stats(&ctx, m).unwrap().update.unwrap();
        moments
            .iter_mut()
            .zip(&u.values)
            .for_each(|(s, v)| *s += f64::from(*v));
        n += u.weight;
    }
    let scaler =
        Standardizer::from_moments(&moments.iter().map(|v| (v / n) as f32).collect::<Vec<_>>());
    let mut global = base.initial_params(1);
    let mut rounds = 0;
    while !base.complete(&global) {
        let model = ChurnGbdt {
            level_len: level_len(&global).unwrap(),
            ..base
        };
        let ctx = RoundContext {
            sgd: &sgd,
            seed: 1,
            round: rounds,
            standardizer: Some(&scaler),
            best_version: None,
        };
        let mut sums = vec![0.0f64; model.level_len];
        let mut weight = 0.0;
        for m in merchants.iter_mut() {
            let u = model.fit(&ctx, &global, m).unwrap().update.unwrap();
            assert_eq!(model.first_bad_value("m0", &u), None);
            sums.iter_mut()
                .zip(&u.values)
                .for_each(|(s, v)| *s += f64::from(*v));
            weight += u.weight;
        }
        global = model.next_version(&global, &sums, weight).unwrap();
        rounds += 1;
    }
    (global, scaler, rounds as usize)
}

#[test]
fn federated_trees_equal_the_pooled_trees_and_cost_one_round_per_level() {
    let p = GbdtParams {
        trees: 3,
        max_depth: 3,
        min_child_weight: 0.1,
        l2: 1.0,
        valid_fraction: 0.0,
        ..GbdtParams::default()
    };
    let mut parts = vec![
        merchant("a", 60, 0),
        merchant("b", 90, 60),
        merchant("c", 50, 150),
    ];
    let (fed, _, rounds) = federate(&p, &mut parts);
    let mut pooled = [LocalData::pooled("all", &parts)];
    let (central, scaler, _) = federate(&p, &mut pooled);
    // One sketch round, then one per level of each tree.
    assert_eq!(rounds, 1 + 3 * 3);
    let (f, c) = (
        Ensemble::decode(&fed).unwrap(),
        Ensemble::decode(&central).unwrap(),
    );
    assert_eq!(f.edges, c.edges);
    assert_eq!(f.trees.len(), 3);
    for (tf, tc) in f.trees.iter().zip(&c.trees) {
        for (a, b) in tf.nodes.iter().zip(&tc.nodes) {
            match (a, b) {
                (Node::Leaf(x), Node::Leaf(y)) => assert!((x - y).abs() < 1e-5),
                _ => assert_eq!(a, b),
            }
        }
    }
    // The trees learn the rule: most rows are classified right.
    let ds = &pooled[0].churn.as_ref().unwrap().train;
    let probs = predict(&fed, &scaler, &ds.x).unwrap();
    let right = probs
        .iter()
        .zip(&ds.y)
        .filter(|(p, y)| (**p > 0.5) == (**y > 0.5))
        .count();
    assert!(
        right as f64 > 0.9 * ds.len() as f64,
        "{right} of {}",
        ds.len()
    );
    // And a replay is bit for bit.
    assert_eq!(federate(&p, &mut parts).0, fed);
}

#[test]
fn tasks_check_the_state_and_bad_updates_are_named() {
    let p = GbdtParams::default();
    let model = ChurnGbdt {
        num_features: 2,
        params: &p,
        level_len: 0,
    };
    assert_eq!(model.initial_params(0).len(), model.model_len());
    let sgd = SgdParams::default();
    let scaler = Standardizer {
        mean: vec![0.0; 2],
        std: vec![1.0; 2],
        rows: None,
    };
    let ctx = RoundContext {
        sgd: &sgd,
        seed: 1,
        round: 1,
        standardizer: Some(&scaler),
        best_version: None,
    };
    let mut m = merchant("a", 20, 0);
    let mut bad = model.initial_params(0);
    bad[3] = f32::INFINITY;
    let err = model.fit(&ctx, &bad, &mut m).unwrap_err();
    assert!(err.to_string().contains("not finite"), "{err}");
    // The sketch is longer than a stale task's update length.
    let err = model
        .fit(&ctx, &model.initial_params(0), &mut m)
        .unwrap_err();
    assert!(matches!(err, TrainError::ModelLength { .. }), "{err}");
    let u = Update {
        values: vec![1.0, -30.0],
        coord_weights: Vec::new(),
        weight: 20.0,
    };
    assert_eq!(model.first_bad_value("m0", &u), Some(1));
    let wide = ChurnGbdt {
        num_features: 3,
        ..model
    };
    assert!(wide.fit(&ctx, &model.initial_params(0), &mut m).is_err());
    let zero = GbdtParams {
        l2: 0.0,
        min_child_weight: 0.0,
        ..GbdtParams::default()
    };
    assert!(
        ChurnGbdt {
            params: &zero,
            ..model
        }
        .check()
        .is_err()
    );
}

/// The shrinkage is refused outside (0, 1]: 1e30 was taken, and the trees
/// diverged (log loss 11.8) without a word.
#[test]
fn a_shrinkage_outside_zero_to_one_is_refused() {
    for lr in [0.0, -0.1, 1.5, 1e30, f32::NAN, f32::INFINITY] {
        let p = GbdtParams {
            learning_rate: lr,
            ..params()
        };
        let e = p.check().unwrap_err();
        assert!(
            e.contains("gbdt.learning_rate") && e.contains("(0, 1]"),
            "{lr}: {e}"
        );
    }
    for lr in [1e-3, 0.1, 1.0] {
        let p = GbdtParams {
            learning_rate: lr,
            ..params()
        };
        p.check().unwrap();
    }
}
