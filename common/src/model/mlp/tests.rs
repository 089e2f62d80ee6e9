//! MLP tests: layout, initialisation, gradients, XOR, determinism and early stopping.

use super::*;
use crate::metrics::auc;
use crate::seed::rng;

fn shape(d: usize, hidden: &[usize]) -> MlpShape {
    MlpShape {
        num_features: d,
        hidden: hidden.to_vec(),
    }
}

/// XOR of the signs of two coordinates, with jitter so the points are not
/// four exact duplicates; no linear model can beat AUC 0.5 on it.
fn xor_data(n: usize, seed: u64) -> (Array2<f32>, Array1<f32>) {
    let mut r = rng(seed, &["xor"]);
    let noise = Normal::new(0.0f32, 0.1).unwrap();
    let mut x = Array2::zeros((n, 2));
    let mut y = Array1::zeros(n);
    for i in 0..n {
        let (a, b) = ((i % 2) as f32, ((i / 2) % 2) as f32);
        x[[i, 0]] = 2.0 * a - 1.0 + noise.sample(&mut r);
        x[[i, 1]] = 2.0 * b - 1.0 + noise.sample(&mut r);
        y[i] = if (a > 0.5) != (b > 0.5) { 1.0 } else { 0.0 };
    }
    (x, y)
}

fn adam(epochs: usize, lr: f32) -> SgdParams {
    SgdParams {
        epochs,
        batch_size: 16,
        learning_rate: lr,
        l2: 0.0,
        ..Default::default()
    }
}

#[test]
fn layout_is_weights_then_bias_per_layer() {
    let s = shape(3, &[4, 2]);
    assert_eq!(s.widths(), vec![3, 4, 2, 1]);
    assert_eq!(s.layers(), vec![(3, 4, 0), (4, 2, 16), (2, 1, 26)]);
    assert_eq!(s.param_len(), 16 + 10 + 3);
    let err = Mlp::from_params(s.clone(), &[0.0; 5]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "MLP with layers [3, 4, 2, 1] needs 29 parameters, got 5"
    );
    assert!(Mlp::he_init(shape(3, &[0]), &mut rng(1, &[])).is_err());
}

#[test]
fn he_init_is_seeded_with_zero_biases_and_fan_in_scale() {
    let s = shape(200, &[100]);
    let a = Mlp::he_init(s.clone(), &mut rng(5, &["init"])).unwrap();
    let b = Mlp::he_init(s.clone(), &mut rng(5, &["init"])).unwrap();
    let c = Mlp::he_init(s, &mut rng(6, &["init"])).unwrap();
    assert_eq!(a, b);
    assert_ne!(a, c);
    let w = &a.params()[..200 * 100];
    let var = w.iter().map(|v| v * v).sum::<f32>() / w.len() as f32;
    assert!((var - 0.01).abs() < 0.001, "variance {var}");
    assert!(
        a.params()[200 * 100..200 * 100 + 100]
            .iter()
            .all(|&b| b == 0.0)
    );
}

#[test]
fn analytic_gradient_matches_finite_differences() {
    let (x, y) = xor_data(12, 3);
    let s = shape(2, &[5, 3]);
    let model = Mlp::he_init(s, &mut rng(2, &[])).unwrap();
    let cw = vec![1.0f32; y.len()];
    let p = SgdParams {
        l2: 0.0,
        ..Default::default()
    };
    let mut grad = vec![0.0; model.params.len()];
    model.gradient(x.view(), y.as_slice().unwrap(), &cw, &p, &[], &mut grad);
    let cwa = Array1::from(cw.clone());
    for (j, &analytic) in grad.iter().enumerate() {
        let h = 1e-2f32;
        let (mut up, mut down) = (model.clone(), model.clone());
        up.params[j] += h;
        down.params[j] -= h;
        let num = (up.loss(x.view(), y.view(), cwa.view())
            - down.loss(x.view(), y.view(), cwa.view()))
            / (2.0 * h);
        assert!(
            (num - analytic).abs() < 2e-3 + 0.05 * num.abs(),
            "param {j}: numeric {num}, analytic {analytic}"
        );
    }
}

#[test]
fn learns_xor_which_a_linear_model_cannot() {
    let (x, y) = xor_data(200, 1);
    let mut m = Mlp::he_init(shape(2, &[8]), &mut rng(1, &["init"])).unwrap();
    let report = m.fit_with(&x, &y, &adam(200, 0.02), None, &mut rng(1, &["fit"]));
    assert_eq!(report.epochs_run, 200);
    let (tx, ty) = xor_data(100, 2);
    let probs = m.predict_proba(&tx);
    assert_eq!(auc(ty.as_slice().unwrap(), &probs), 1.0);
    assert!(report.train_loss < 0.1, "loss {}", report.train_loss);
}

#[test]
fn training_is_deterministic_for_a_seed() {
    let (x, y) = xor_data(64, 4);
    let fit = |seed: u64| {
        let mut m = Mlp::he_init(shape(2, &[6, 4]), &mut rng(seed, &["init"])).unwrap();
        let early = EarlyStopping::default();
        m.fit_with(
            &x,
            &y,
            &adam(20, 0.01),
            Some(&early),
            &mut rng(seed, &["fit"]),
        );
        m
    };
    assert_eq!(fit(9), fit(9));
    assert_ne!(fit(9), fit(10));
}

#[test]
fn early_stopping_stops_when_validation_loss_rises_and_keeps_the_best_epoch() {
    // Labels are coin flips: a wide network memorises the training rows, so
    // the validation loss bottoms out early and then rises.
    let mut r = rng(7, &["noise"]);
    let normal = Normal::new(0.0f32, 1.0).unwrap();
    let n = 300;
    let x = Array2::from_shape_fn((n, 10), |_| normal.sample(&mut r));
    let y = Array1::from_shape_fn(n, |i| ((i * 7 + 3) % 5 < 2) as u8 as f32);
    let early = EarlyStopping {
        validation_fraction: 0.2,
        patience: 4,
    };
    let mut m = Mlp::he_init(shape(10, &[64, 64]), &mut rng(7, &["init"])).unwrap();
    let report = m.fit_with(
        &x,
        &y,
        &adam(500, 0.01),
        Some(&early),
        &mut rng(7, &["fit"]),
    );
    assert!(report.epochs_run < 500, "{report:?}");
    assert_eq!(report.epochs_run, report.best_epoch + early.patience);
    // The kept parameters are the best epoch's: re-running exactly that many
    // epochs without stopping reaches the same parameters.
    let mut again = Mlp::he_init(shape(10, &[64, 64]), &mut rng(7, &["init"])).unwrap();
    again.fit_with(
        &x,
        &y,
        &adam(report.best_epoch, 0.01),
        Some(&early),
        &mut rng(7, &["fit"]),
    );
    assert_eq!(again.params(), m.params());
}
