//! Writes the committed seed corpus: real secure-aggregation frames from a
//! seeded in-process round (three agents, one with the survivor-list check),
//! real update payloads and the first rows of the bundled CSVs, each prefixed
//! with the selector bytes its target reads first. Run from `tests/fuzz`:
//!   cargo run --example seed_corpus
//! It overwrites `corpus/*/seed-*` and leaves inputs the fuzzer found alone.

use std::fs;
use std::path::Path;

use fedcart_common::federation::update::Update;
use fedcart_common::privacy::secagg::{
    AfterMasked, ClientSession, RoundInvite, SecAggConfig, ServerSession, ShareRelay,
    SurvivorCheck, encode, masked_to_bytes, round_seed, rounding_rng,
};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

fn put(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new("corpus").join(target);
    fs::create_dir_all(&dir).expect("corpus directory");
    fs::write(dir.join(format!("seed-{name}")), bytes).expect("seed written");
}

/// One round over three agents; every message goes to its target's corpus.
fn secure_round(verify: bool, tag: &str) {
    let n = 3;
    let mut config = SecAggConfig::complete(5, 0, n, 1.0);
    config.verify_survivors = verify;
    let rs = round_seed(7);
    let ids: Vec<u32> = (0..n as u32).collect();
    let mut server = ServerSession::new(config.clone(), rs, &ids).expect("valid round");
    let mut clients: Vec<ClientSession> = ids
        .iter()
        .map(|&id| {
            let mut rng = ChaCha20Rng::seed_from_u64(100 + u64::from(id));
            ClientSession::new(config.clone(), id, rs, &mut rng)
        })
        .collect();
    for c in &clients {
        let invite = RoundInvite {
            config: config.clone(),
            round_seed: rs,
            id: c.id(),
            participants: n,
        };
        put(
            "round_invite",
            &format!("{tag}-{}", c.id()),
            &invite.to_json(),
        );
    }
    for c in &mut clients {
        let keys = c.advertise().expect("advertise");
        put(
            "advertise_keys",
            &format!("{tag}-keys-{}", c.id()),
            &keys.to_bytes(),
        );
        server.on_advertise(keys).expect("keys accepted");
    }
    let roster = server.close_advertise().expect("roster");
    put(
        "advertise_keys",
        &format!("{tag}-roster"),
        &roster.to_bytes(),
    );
    for c in &mut clients {
        let upload = c.share_keys(&roster).expect("shares");
        put(
            "share_bundles",
            &format!("{tag}-upload-{}", c.id()),
            &upload.to_bytes(),
        );
        server.on_shares(upload).expect("shares accepted");
    }
    let relays: Vec<ShareRelay> = server.close_shares().expect("relays");
    for relay in &relays {
        put(
            "share_bundles",
            &format!("{tag}-relay-{}", relay.to),
            &relay.to_bytes(),
        );
        let c = &mut clients[relay.to as usize];
        let update = Update {
            values: (0..5).map(|i| 0.1 * i as f32 - 0.2).collect(),
            coord_weights: vec![],
            weight: 10.0 + f64::from(relay.to),
        };
        let encoded = encode(&config, &update, &mut rounding_rng(7, relay.to)).expect("encode");
        let masked = c.masked_encoded(relay, &encoded).expect("masked");
        let frame = masked_to_bytes(relay.to, &masked);
        // masked_input reads: modulus pick 0 (2^32), vector length 5 + 2.
        put(
            "masked_input",
            &format!("{tag}-{}", relay.to),
            &[[0u8, 5].as_slice(), &frame].concat(),
        );
        server.on_masked_bytes(&frame).expect("masked accepted");
    }
    let requests = match server.close_masked().expect("close masked") {
        AfterMasked::Unmask(r) => r,
        AfterMasked::CheckSurvivors(check) => {
            put("unmask", &format!("{tag}-check"), &check.to_bytes());
            for c in &mut clients {
                let sig = c
                    .sign_survivors(&SurvivorCheck::from_bytes(&check.to_bytes()).expect("check"))
                    .expect("sign");
                put(
                    "unmask",
                    &format!("{tag}-signature-{}", c.id()),
                    &sig.to_bytes(),
                );
                server
                    .on_survivor_signature(sig)
                    .expect("signature accepted");
            }
            server.close_survivor_check().expect("requests")
        }
    };
    for req in requests {
        put(
            "unmask",
            &format!("{tag}-request-{}", req.to),
            &req.to_bytes(),
        );
        let resp = clients[req.to as usize].unmask(&req).expect("unmask");
        put(
            "unmask",
            &format!("{tag}-response-{}", req.to),
            &resp.to_bytes(),
        );
        server.on_unmask(resp).expect("response accepted");
    }
    server.finish().expect("round completes");
}

fn main() {
    secure_round(false, "plain");
    secure_round(true, "verified");

    let update = Update {
        values: vec![0.5, -1.25, 3.0, f32::MIN_POSITIVE],
        coord_weights: vec![2.0],
        weight: 1.0,
    };
    // update_payload reads: 4 values, 1 coordinate weight, 8-byte chunks.
    put(
        "update_payload",
        "lr",
        &[[4u8, 1, 8].as_slice(), &update.payload_bytes()].concat(),
    );

    // rows_payload reads: 3 % 16 + 1 = 4 items, 1 % 5 + 1 = 2 factors.
    {
        use fedcart_common::federation::sparse::{self, RowPrecision};
        use fedcart_common::model::mf::{MfAggregation, layout, model_len};
        let l = layout(4, 2, MfAggregation::PerItem);
        let mut values = vec![0.0f32; model_len(4, 2)];
        values[0] = 0.25;
        values[1 + 1] = 1.5;
        values[1 + 4 + 2 * 3] = -0.75;
        let mf_update = Update {
            values,
            coord_weights: vec![0.0, 2.0, 0.0, 1.0],
            weight: 1.0,
        };
        let rows = sparse::encode_update(&mf_update, &l).expect("MF layout");
        put(
            "rows_payload",
            "update",
            &[[3u8, 1].as_slice(), &rows].concat(),
        );
        let model: Vec<f32> = (0..model_len(4, 2)).map(|i| i as f32 * 0.25).collect();
        let old = vec![0.0f32; model.len()];
        for (name, p) in [
            ("model-f32", RowPrecision::F32),
            ("model-int8", RowPrecision::Int8),
        ] {
            let bytes = sparse::encode_model(&model, Some(&old), &l, p).expect("MF layout");
            put(
                "rows_payload",
                name,
                &[[3u8, 1].as_slice(), &bytes].concat(),
            );
        }
    }

    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data");
    let head = |file: &str, lines: usize| -> String {
        let text = fs::read_to_string(data.join(file)).expect("bundled data");
        text.lines().take(lines).map(|l| format!("{l}\n")).collect()
    };
    put(
        "tabular_csv",
        "telco",
        head("telco-churn/Telco-Customer-Churn.csv", 12).as_bytes(),
    );
    let cdnow = head("cdnow/CDNOW_master.txt", 20);
    // orders_csv's first byte: bit 0 policy, bits 1-2 timestamp format,
    // bits 3+ the mapping (0 = CDNOW, 1 = full comma-separated).
    put(
        "orders_csv",
        "cdnow",
        &[b"\x00".as_slice(), cdnow.as_bytes()].concat(),
    );
    let mut full = String::from("customer,item,time,qty,amount,rating,store\n");
    for (i, line) in cdnow.lines().skip(1).enumerate() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let date = format!("{}-{}-{}", &f[1][..4], &f[1][4..6], &f[1][6..]);
        full.push_str(&format!(
            "{},sku{},{date},{},{},{},s{}\n",
            f[0],
            i % 4,
            f[2],
            f[3],
            i % 5,
            i % 2
        ));
    }
    put(
        "orders_csv",
        "full-iso",
        &[[1u8 << 3].as_slice(), full.as_bytes()].concat(),
    );
    put(
        "orders_csv",
        "full-iso-skip",
        &[[(1u8 << 3) | 1 | (2 << 1)].as_slice(), full.as_bytes()].concat(),
    );
    println!("seed corpus written under corpus/");
}
