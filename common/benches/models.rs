//! Local-training cost of the model families: one MF epoch on the full
//! MovieLens ml-latest-small (100,836 ratings) at k = 32 and 100, one BPR
//! epoch, and one logistic-regression epoch on 100k × 45 synthetic rows.
//!
//! `cargo bench -p fedcart-common --bench models`

use std::path::Path;

use criterion::{Criterion, criterion_group, criterion_main};
use fedcart_common::data::movielens;
use fedcart_common::model::lr::{LogisticRegression, SgdParams};
use fedcart_common::model::mf::{self, MfData, MfHyper};
use fedcart_common::task::{ModelSpec, TaskKind, TaskSpec};
use fedcart_common::train::{LocalData, run_task};
use ndarray::{Array1, Array2};
use rand::RngExt;

fn movielens_merchant(implicit: bool) -> (usize, LocalData) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/ml-latest-small/ratings.csv");
    let rows = movielens::load_ratings(&path).expect("bundled ratings");
    let rows = if implicit {
        movielens::implicit(&rows, 4.0)
    } else {
        rows
    };
    let catalogue = fedcart_common::data::catalogue::Catalogue::from_interactions(&rows);
    let data = LocalData {
        merchant_id: "bench".into(),
        mf: Some(MfData::new(&rows, &[], &catalogue)),
        ..Default::default()
    };
    (catalogue.len(), data)
}

fn mf_epochs(c: &mut Criterion) {
    for (implicit, k) in [(false, 32), (false, 100), (true, 32)] {
        let (n, mut data) = movielens_merchant(implicit);
        let hyper = MfHyper {
            epochs: 1,
            negatives: 1,
            ..Default::default()
        };
        let model = if implicit {
            ModelSpec::MfImplicit {
                num_items: n,
                factors: k,
                hyper,
            }
        } else {
            ModelSpec::Mf {
                num_items: n,
                factors: k,
                hyper,
            }
        };
        let spec = TaskSpec {
            kind: TaskKind::Train,
            model,
            sgd: Default::default(),
            seed: 1,
            round: 1,
            standardizer: None,
            dp: None,
            best_version: None,
        };
        let global = spec.model.initial_params(1);
        let ratings = data.mf.as_ref().map_or(0, |m| m.train.len());
        let name = if implicit { "bpr_epoch" } else { "mf_epoch" };
        c.bench_function(&format!("{name}/{ratings}_ratings/k{k}"), |b| {
            b.iter(|| run_task(&spec, &global, &mut data).expect("trains"))
        });
        // The bare SGD loop, without copying the model or building the update.
        if !implicit {
            let d = data.mf.clone().expect("mf data");
            let mut ub = d.state.bias.clone();
            let mut uf = d.state.factors.clone();
            let mut ib = global[1..1 + n].to_vec();
            let mut itf = global[1 + n..].to_vec();
            let order: Vec<u32> = (0..d.train.len() as u32).collect();
            let h = MfHyper::default();
            c.bench_function(&format!("mf_sgd_loop/{ratings}_ratings/k{k}"), |b| {
                b.iter(|| {
                    mf::explicit_epoch(
                        &h, k, &d.train, &order, 3.5, &mut ub, &mut uf, &mut ib, &mut itf,
                    )
                })
            });
        }
    }
}

fn lr_epoch(c: &mut Criterion) {
    let (rows, cols) = (100_000, 45);
    let mut rng = fedcart_common::seed::rng(3, &["bench-lr"]);
    let x = Array2::from_shape_fn((rows, cols), |_| rng.random_range(-1.0f32..1.0));
    let w: Vec<f32> = (0..cols).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    let y = Array1::from_shape_fn(rows, |r| {
        let z: f32 = (0..cols).map(|j| x[[r, j]] * w[j]).sum();
        if z > 0.0 { 1.0 } else { 0.0 }
    });
    let params = SgdParams {
        epochs: 1,
        batch_size: 32,
        ..Default::default()
    };
    c.bench_function("lr_epoch/100000x45/batch32", |b| {
        b.iter(|| {
            let mut m = LogisticRegression::zeros(cols);
            m.fit_with(&x, &y, &params, &mut fedcart_common::seed::rng(4, &[]))
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = mf_epochs, lr_epoch
}
criterion_main!(benches);
