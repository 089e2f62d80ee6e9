//! Release-mode benchmark of secure aggregation at n = 100 agents and
//! d = 1 000 000 coordinates: client masking time, server unmask time at 0,
//! 10 and 30 % dropout (agents that shared keys but never sent their masked
//! input), and bytes per agent per round, for the complete graph (plain
//! SecAgg) and a SecAgg+ graph.
//!
//! Run: `cargo run --release -p fedcart-common --example secagg_bench`
//! (optional: `-- <n> <d> [<modulus bits>]`, default 100 1000000 32).

use std::time::{Duration, Instant};

use fedcart_common::federation::update::Update;
use fedcart_common::privacy::secagg::{
    AdvertiseKeys, AfterMasked, ClientSession, KeyRoster, SecAggConfig, ServerSession, ShareRelay,
    ShareUpload, UnmaskRequest, UnmaskResponse, encode, masked_to_bytes,
};
use rand::{RngExt, SeedableRng};
use rand_chacha::{ChaCha8Rng, ChaCha20Rng};

/// CPU seconds used by this process so far (user + system), from
/// /proc/self/stat: on a shared machine wall time includes time other
/// processes held the cores, CPU time does not.
fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return f64::NAN;
    };
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let tick = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    (tick(11) + tick(12)) / 100.0
}

struct Figures {
    finish_cpu: f64,
    mask_cpu: f64,
    encode: Duration,
    mask: Duration,
    add: Duration,
    unmask: Duration,
    finish: Duration,
    sent: f64,
    received: f64,
}

fn round(n: usize, d: usize, bits: u32, k: usize, drop_frac: f64) -> Figures {
    let mut c = SecAggConfig::complete(d, 0, n, 1.0);
    c.modulus_bits = bits;
    c.fit_scale(n);
    c.neighbours = k;
    // Majority threshold for the complete graph; for the sparse graph a
    // third of the k + 1 holders, so 30 % dropouts leave every agent enough
    // holders (with a majority of 15, some agent is left with fewer than 8).
    c.threshold = if k + 1 >= n {
        k.div_ceil(2) + 1
    } else {
        (k + 1).div_ceil(3)
    };
    c.max_weight = 1000.0;
    c.validate(n).expect("valid configuration");
    let ids: Vec<u32> = (0..n as u32).collect();
    let rs = [7u8; 32];
    let mut server = ServerSession::new(c.clone(), rs, &ids).unwrap();
    let mut sent = vec![0usize; n];
    let mut received = vec![0usize; n];
    let mut clients: Vec<ClientSession> = ids
        .iter()
        .map(|&i| {
            ClientSession::new(
                c.clone(),
                i,
                rs,
                &mut ChaCha20Rng::seed_from_u64(u64::from(i)),
            )
        })
        .collect();
    for cl in &mut clients {
        let b = cl.advertise().unwrap().to_bytes();
        sent[cl.id() as usize] += b.len();
        server
            .on_advertise(AdvertiseKeys::from_bytes(&b).unwrap())
            .unwrap();
    }
    let roster = server.close_advertise().unwrap().to_bytes();
    for cl in &mut clients {
        received[cl.id() as usize] += roster.len();
        let b = cl
            .share_keys(&KeyRoster::from_bytes(&roster).unwrap())
            .unwrap()
            .to_bytes();
        sent[cl.id() as usize] += b.len();
        server
            .on_shares(ShareUpload::from_bytes(&b).unwrap())
            .unwrap();
    }
    let relays = server.close_shares().unwrap();
    let dropped = (drop_frac * n as f64).round() as usize;
    let is_dropped = |i: usize| {
        dropped > 0 && i.is_multiple_of(n / dropped.max(1)) && i / (n / dropped.max(1)) < dropped
    };
    let (mut encode_t, mut mask_t, mut add_t, mut survivors) =
        (Duration::ZERO, Duration::ZERO, Duration::ZERO, 0);
    let mut mask_cpu = 0.0;
    for relay in &relays {
        let i = relay.to as usize;
        if is_dropped(i) {
            continue;
        }
        let relay_bytes = relay.to_bytes();
        received[i] += relay_bytes.len();
        let mut rng = ChaCha8Rng::seed_from_u64(i as u64);
        let update = Update {
            values: (0..d).map(|_| rng.random_range(-1.0f32..1.0)).collect(),
            coord_weights: vec![],
            weight: 10.0,
        };
        let t = Instant::now();
        let encoded = encode(&c, &update, &mut rng).unwrap();
        encode_t += t.elapsed();
        let c0 = cpu_seconds();
        let t = Instant::now();
        let masked = clients[i]
            .masked_encoded(&ShareRelay::from_bytes(&relay_bytes).unwrap(), &encoded)
            .unwrap();
        mask_t += t.elapsed();
        mask_cpu += cpu_seconds() - c0;
        let wire = masked_to_bytes(i as u32, &masked);
        sent[i] += wire.len();
        let t = Instant::now();
        server.on_masked_bytes(&wire).unwrap();
        add_t += t.elapsed();
        survivors += 1;
    }
    let t_unmask = Instant::now();
    let AfterMasked::Unmask(requests) = server.close_masked().unwrap() else {
        unreachable!()
    };
    for req in requests {
        let b = req.to_bytes();
        received[req.to as usize] += b.len();
        let resp = clients[req.to as usize]
            .unmask(&UnmaskRequest::from_bytes(&b).unwrap())
            .unwrap()
            .to_bytes();
        sent[req.to as usize] += resp.len();
        server
            .on_unmask(UnmaskResponse::from_bytes(&resp).unwrap())
            .unwrap();
    }
    let c0 = cpu_seconds();
    let t_finish = Instant::now();
    let out = server.finish().unwrap();
    let finish = t_finish.elapsed();
    let finish_cpu = cpu_seconds() - c0;
    let unmask = t_unmask.elapsed();
    assert_eq!(out.survivors.len(), survivors);
    assert!((out.sum.weight - 10.0 * survivors as f64).abs() < 1e-9);
    let alive: Vec<usize> = (0..n).filter(|&i| !is_dropped(i)).collect();
    let mean = |v: &[usize]| alive.iter().map(|&i| v[i] as f64).sum::<f64>() / alive.len() as f64;
    Figures {
        finish_cpu,
        mask_cpu: mask_cpu / survivors as f64,
        encode: encode_t / survivors as u32,
        mask: mask_t / survivors as u32,
        add: add_t / survivors as u32,
        unmask,
        finish,
        sent: mean(&sent),
        received: mean(&received),
    }
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let n = args.first().copied().unwrap_or(100);
    let d = args.get(1).copied().unwrap_or(1_000_000);
    let bits = args.get(2).map_or(32, |&b| b as u32);
    let log = usize::BITS - (n - 1).leading_zeros();
    let sparse_k = (2 * log as usize).min(n - 1);
    println!(
        "n = {n}, d = {d}, modulus 2^{bits}, rayon threads = {}",
        rayon::current_num_threads()
    );
    println!(
        "| graph | dropout | client encode ms | client mask ms (CPU ms) | server add ms/input | server unmask ms (total) | of which finish ms (CPU ms) | sent KiB/agent | received KiB/agent |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for (label, k) in [
        ("complete k=n-1", n - 1),
        ("SecAgg+ k=2*ceil(log2 n)", sparse_k),
    ] {
        for frac in [0.0, 0.1, 0.3] {
            let f = round(n, d, bits, k, frac);
            println!(
                "| {label} (k={k}) | {:.0} % | {:.1} | {:.1} ({:.0}) | {:.2} | {:.1} | {:.1} ({:.0}) | {:.1} | {:.1} |",
                frac * 100.0,
                f.encode.as_secs_f64() * 1e3,
                f.mask.as_secs_f64() * 1e3,
                f.mask_cpu * 1e3,
                f.add.as_secs_f64() * 1e3,
                f.unmask.as_secs_f64() * 1e3,
                f.finish.as_secs_f64() * 1e3,
                f.finish_cpu * 1e3,
                f.sent / 1024.0,
                f.received / 1024.0,
            );
        }
    }
}
