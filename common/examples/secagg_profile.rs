//! Rough per-stage timing of one in-memory round (diagnostics).
use fedcart_common::secagg::*;
use fedcart_common::update::Update;
use std::time::Instant;
fn main() {
    let n = 100;
    let d = 40;
    let c = SecAggConfig::complete(d, 0, n, 1.0);
    let ups: Vec<Update> = (0..n).map(|i| Update { values: vec![0.1 * i as f32 / n as f32; d], coord_weights: vec![], weight: 1.0 }).collect();
    let t = Instant::now();
    let r = run_in_memory(&c, &ups, &Dropouts::none(), 1).unwrap();
    println!("round {:?} survivors {}", t.elapsed(), r.output.survivors.len());
}
