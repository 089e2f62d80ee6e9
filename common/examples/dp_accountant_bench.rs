//! Release-mode timing of the privacy accountant (figures for BENCHMARKS.md).
//!
//! Run with `cargo run --release -p fedcart-common --example dp_accountant_bench`.
//! Each figure is the median over repeated runs of: a cold 10,000-step ε query
//! (fresh accountant, one RDP vector over the 156 default orders, composed
//! ×10,000, converted at δ); a warm per-round `step` + `epsilon` (the engine's
//! call pattern, with the RDP vector cached); and the noise-multiplier solver.

use std::hint::black_box;
use std::time::{Duration, Instant};

use fedcart_common::privacy::dp::accountant::{DEFAULT_SIGMA_TOLERANCE, epsilon_for};
use fedcart_common::privacy::dp::{Accountant, solve_noise_multiplier};

/// Median wall time of `reps` runs of `f`.
fn median<F: FnMut()>(reps: usize, mut f: F) -> Duration {
    let mut times: Vec<Duration> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect();
    times.sort();
    times[reps / 2]
}

fn main() {
    println!("cold 10,000-step epsilon query (fresh accountant, default orders):");
    for &(q, sigma, delta) in &[(0.01, 1.0, 1e-5), (0.1, 1.1, 1e-5), (1.0, 5.0, 1e-6)] {
        let eps = epsilon_for(q, sigma, 10_000, delta).unwrap();
        let t = median(51, || {
            black_box(epsilon_for(black_box(q), sigma, 10_000, delta).unwrap());
        });
        println!(
            "  q={q:<5} sigma={sigma:<4} delta={delta:e}: eps={:.4} (order {}) in {:.3} ms",
            eps.epsilon,
            eps.order,
            t.as_secs_f64() * 1e3
        );
    }

    let mut acc = Accountant::new();
    acc.step(0.01, 1.0).unwrap();
    let t = median(1001, || {
        acc.step(black_box(0.01), 1.0).unwrap();
        black_box(acc.epsilon(1e-5).unwrap());
    });
    println!(
        "warm per-round step + epsilon (cached RDP vector): {:.2} us",
        t.as_secs_f64() * 1e6
    );

    for &(target, q, steps) in &[(3.0, 0.01, 1000u64), (1.0, 0.01, 10_000)] {
        let s = solve_noise_multiplier(target, 1e-5, q, steps, DEFAULT_SIGMA_TOLERANCE).unwrap();
        let t = median(11, || {
            black_box(
                solve_noise_multiplier(target, 1e-5, q, steps, DEFAULT_SIGMA_TOLERANCE).unwrap(),
            );
        });
        println!(
            "solve sigma for eps<={target} q={q} T={steps}: sigma={:.4} in {:.1} ms",
            s.noise_multiplier,
            t.as_secs_f64() * 1e3
        );
    }
}
