//! Load benchmark of `fedcart-client serve` (the merchant's JSON API): the
//! real axum server on loopback and a real HTTP client (hyper-util's pooled
//! client, keep-alive connections) in one process, `CONCURRENCY` requests in
//! flight, half recommendations (top-10 over MovieLens' 9,742 items, 8
//! factors, purchases excluded) and half churn scores (Telco, 7,043
//! customers). Half-way through, the agent's state gets version 2 of both
//! models: the run reports the versions seen and fails on any failed request.
//!
//! ```text
//! cargo bench -p fedcart-client --bench serve_load
//! SERVE_REQUESTS=100000 SERVE_CONCURRENCY=64 cargo bench -p fedcart-client --bench serve_load
//! ```
//!
//! Prints p50/p99/max latency per route and the overall throughput.

mod serve_fixture;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fedcart_client::serve::{LocalFiles, start};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is understood.
    let requests = env_usize("SERVE_REQUESTS", 40_000);
    let concurrency = env_usize("SERVE_CONCURRENCY", 32);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let f = Arc::new(serve_fixture::Fixture::new());
        let local = LocalFiles::load(&f.cfg).expect("local files");
        let server = start(
            "127.0.0.1:0".parse().unwrap(),
            f.state.clone(),
            local,
            Duration::from_millis(100),
        )
        .await
        .expect("server");
        let addr = server.addr;
        let http: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        let next = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(AtomicUsize::new(0));
        let swapped = Arc::new(tokio::sync::Notify::new());
        let started = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..concurrency {
            let (http, next, failed, f, swapped) = (
                http.clone(),
                next.clone(),
                failed.clone(),
                f.clone(),
                swapped.clone(),
            );
            tasks.push(tokio::spawn(async move {
                // (is recommendation, latency, version)
                let mut out: Vec<(bool, Duration, u64)> = Vec::new();
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= requests {
                        return out;
                    }
                    if n == requests / 2 {
                        swapped.notify_one();
                    }
                    let rec = !n.is_multiple_of(2);
                    let path = if rec {
                        let who = &f.shoppers[(n * 7919) % f.shoppers.len()];
                        format!("/v1/customers/{who}/recommendations?k=10")
                    } else {
                        let who = &f.customers[(n * 7919) % f.customers.len()];
                        format!("/v1/customers/{who}/churn")
                    };
                    let uri = format!("http://{addr}{path}").parse().unwrap();
                    let t = Instant::now();
                    let resp = http.get(uri).await;
                    let (ok, body) = match resp {
                        Ok(r) if r.status().is_success() => match r.into_body().collect().await {
                            Ok(b) => (true, b.to_bytes()),
                            Err(_) => (false, Bytes::new()),
                        },
                        _ => (false, Bytes::new()),
                    };
                    let dt = t.elapsed();
                    if !ok {
                        failed.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                    out.push((rec, dt, v["model_version"].as_u64().unwrap_or(0)));
                }
            }));
        }
        let publisher = {
            let f = f.clone();
            tokio::spawn(async move {
                swapped.notified().await;
                tokio::task::spawn_blocking(move || f.publish(2)).await.unwrap();
            })
        };
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.expect("client task"));
        }
        let elapsed = started.elapsed();
        publisher.await.unwrap();
        let failed = failed.load(Ordering::Relaxed);
        println!(
            "serve_load: {requests} requests, {concurrency} in flight, 2 worker threads; \
             {:.0} requests/s over {:.2} s; failed: {failed}",
            requests as f64 / elapsed.as_secs_f64(),
            elapsed.as_secs_f64()
        );
        for (rec, name) in [(true, "recommendations k=10"), (false, "churn")] {
            let mut lat: Vec<Duration> = all.iter().filter(|a| a.0 == rec).map(|a| a.1).collect();
            lat.sort();
            let versions: std::collections::BTreeMap<u64, usize> =
                all.iter().filter(|a| a.0 == rec).fold(Default::default(), |mut m, a| {
                    *m.entry(a.2).or_default() += 1;
                    m
                });
            println!(
                "  {name:<22} n={:<6} p50 {:>7.3} ms  p99 {:>7.3} ms  max {:>7.3} ms  versions {versions:?}",
                lat.len(),
                percentile(&lat, 0.50).as_secs_f64() * 1e3,
                percentile(&lat, 0.99).as_secs_f64() * 1e3,
                lat.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
            );
        }
        server.shutdown().await.unwrap();
        assert_eq!(failed, 0, "every request must succeed across the hot swap");
    });
}
