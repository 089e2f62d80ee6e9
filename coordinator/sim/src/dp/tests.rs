//! The simulator with `--dp-*`: utility at a generous and a tiny ε, ε in
//! every output file, distributed noise under secure aggregation, and flag
//! errors.

use std::path::PathBuf;

use super::super::{Settings, SimArgs, data, output, run_all};

fn telco(dp: &[(&str, &str)]) -> SimArgs {
    let mut a = SimArgs {
        task: Some("churn-lr".parse().unwrap()),
        data: Some(
            format!(
                "telco:{}",
                PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                    .join("../..")
                    .join(data::DEFAULT_TELCO)
                    .display()
            )
            .parse()
            .unwrap(),
        ),
        merchants: Some(100),
        rounds: Some(10),
        ..Default::default()
    };
    for (k, v) in dp {
        match *k {
            "clip" => a.dp_clip = Some(v.to_string()),
            "eps" => a.target_epsilon = Some(v.parse().unwrap()),
            "noise" => a.dp_noise = Some(v.parse().unwrap()),
            "mode" => a.dp_mode = Some(v.parse().unwrap()),
            _ => unreachable!(),
        }
    }
    a
}

fn auc(a: SimArgs) -> (f64, Option<crate::experiment::PrivacySummary>) {
    let e = run_all(&Settings::from_args(a).unwrap()).unwrap().remove(0);
    (e.final_metrics["auc"], e.privacy)
}

#[test]
fn churn_with_dp_learns_at_a_generous_epsilon_and_degrades_at_a_tiny_one() {
    let (plain, none) = auc(telco(&[]));
    assert!(none.is_none());
    let (generous, p) = auc(telco(&[("clip", "1"), ("eps", "16")]));
    let p = p.unwrap();
    assert!(p.epsilon <= 16.0 && p.epsilon > 15.9, "{p:?}");
    // 100 merchants, all selected for 10 rounds: at ε = 16 the noise std on
    // the mean step is σC/100 ≈ 0.011 per coordinate.
    assert!(
        (plain - generous).abs() < 0.01,
        "non-DP auc {plain}, ε=16 auc {generous}"
    );
    let (tiny, p) = auc(telco(&[("clip", "1"), ("eps", "0.5")]));
    assert!(p.unwrap().epsilon <= 0.5);
    assert!(tiny < plain - 0.1, "non-DP auc {plain}, ε=0.5 auc {tiny}");
}

#[test]
fn epsilon_is_reported_in_metrics_json_csv_and_the_report() {
    let out = tempfile::tempdir().unwrap();
    let mut a = telco(&[("clip", "adaptive"), ("noise", "1.0")]);
    a.rounds = Some(3);
    a.merchants = Some(20);
    let s = Settings::from_args(a).unwrap();
    let exps = run_all(&s).unwrap();
    output::write_all(out.path(), &s, &exps).unwrap();
    let eps: Vec<f64> = exps[0].rounds.iter().map(|r| r.epsilon.unwrap()).collect();
    assert!(eps.windows(2).all(|w| w[1] > w[0]), "{eps:?}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("metrics.json")).unwrap())
            .unwrap();
    let e = &json["experiments"][0];
    // serde_json's default float parser may differ in the last bit.
    let close = |v: &serde_json::Value| (v.as_f64().unwrap() - eps[2]).abs() < 1e-12;
    assert!(close(&e["rounds"][2]["epsilon"]));
    assert!(close(&e["privacy"]["epsilon"]));
    assert_eq!(e["privacy"]["adaptive"].as_bool(), Some(true));
    // The adaptive clip moved from its initial 0.1.
    assert_ne!(e["rounds"][2]["dp_clip"].as_f64(), Some(0.1));
    let csv = std::fs::read_to_string(out.path().join("metrics.csv")).unwrap();
    let header: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
    let col = header.iter().position(|h| *h == "epsilon").unwrap();
    let last: f64 = csv
        .lines()
        .nth(3)
        .unwrap()
        .split(',')
        .nth(col)
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(last, eps[2]);
    let html = std::fs::read_to_string(out.path().join("report.html")).unwrap();
    assert!(
        html.contains("Differential privacy (Central noise"),
        "report line"
    );
    // The page says its noise is seeded: a simulated guarantee, not a
    // private release (metrics.json said so, the report did not).
    assert!(
        html.contains("noise source: seeded (reproducible simulation, not private).</p>"),
        "report line"
    );
    assert!(html.contains("<th>ε</th>"));
}

#[test]
fn distributed_mode_noises_inside_secure_aggregation_and_accounts_like_central() {
    let run = |mode: &str| {
        let a = SimArgs {
            task: Some("noop:200".parse().unwrap()),
            merchants: Some(6),
            rounds: Some(2),
            secagg: true,
            dp_clip: Some("0.5".into()),
            dp_noise: Some("1.0".parse().unwrap()),
            dp_mode: Some(mode.parse().unwrap()),
            ..Default::default()
        };
        run_all(&Settings::from_args(a).unwrap()).unwrap().remove(0)
    };
    let (central, distributed) = (run("central"), run("distributed"));
    for e in [&central, &distributed] {
        assert!(
            e.rounds
                .iter()
                .all(|r| r.committed && r.reported == 6 && r.clipped == 0)
        );
    }
    let eps = |e: &crate::Experiment| e.rounds.iter().map(|r| r.epsilon).collect::<Vec<_>>();
    assert_eq!(eps(&central), eps(&distributed));
    assert_eq!(
        distributed.privacy.as_ref().unwrap().mode,
        fedcart_coordinator::config::DpMode::Distributed
    );
    for e in [&central, &distributed] {
        assert!(e.rounds.iter().all(|r| r.dp_noise == Some(1.0)));
    }
}

/// Distributed noise with dropouts: a round's sum holds fewer noise shares,
/// and its ε is charged at σ·√(s/m). The rows said σ = 1 while their ε
/// could only be reproduced from the smaller noise; each row now carries
/// the noise it was accounted at.
#[test]
fn each_row_carries_the_noise_its_epsilon_was_charged_at() {
    let a = SimArgs {
        task: Some("noop:200".parse().unwrap()),
        merchants: Some(10),
        rounds: Some(3),
        secagg: true,
        dropout: Some(0.3),
        dp_clip: Some("0.5".into()),
        dp_noise: Some(1.0),
        dp_mode: Some("distributed".parse().unwrap()),
        ..Default::default()
    };
    let e = run_all(&Settings::from_args(a).unwrap()).unwrap().remove(0);
    let committed: Vec<_> = e.rounds.iter().filter(|r| r.epsilon.is_some()).collect();
    assert!(!committed.is_empty());
    let mut short = 0;
    for r in &committed {
        let z = r.dp_noise.unwrap();
        let planned = r.selected as f64;
        let want = (r.reported.min(r.selected) as f64 / planned).sqrt();
        assert!((z - want).abs() < 1e-12, "round {}: {z} vs {want}", r.round);
        short += usize::from(r.reported < r.selected);
    }
    assert!(short > 0, "no round lost an agent: {committed:?}");
}

#[test]
fn dp_flags_are_checked_and_named() {
    let err = |a: SimArgs| Settings::from_args(a).unwrap_err().to_string();
    let mut a = telco(&[("noise", "1")]);
    a.dp_clip = None;
    assert!(err(a).contains("--dp-clip"));
    assert!(err(telco(&[("clip", "1")])).contains("--target-epsilon"));
    assert!(err(telco(&[("clip", "wide"), ("noise", "1")])).contains("--dp-clip"));
    assert!(err(telco(&[("clip", "1"), ("noise", "-1")])).contains("--dp-noise"));
    assert!(
        err(telco(&[
            ("clip", "1"),
            ("noise", "1"),
            ("mode", "distributed")
        ]))
        .contains("--secagg")
    );
    // Distributed noise clips to --dp-clip inside the secure sum: a
    // --secagg-clip was ignored while the report listed it.
    let mut a = telco(&[("clip", "1"), ("noise", "1"), ("mode", "distributed")]);
    a.secagg = true;
    a.merchants = Some(10);
    Settings::from_args(a.clone()).unwrap();
    a.secagg_clip = Some(0.01);
    assert!(
        err(a).starts_with("--secagg-clip does not apply with --dp-mode distributed"),
        "refused"
    );
    // An unknown --dp-mode is refused by the flag parser itself (see
    // `tests::typed_flags_are_parsed_once_and_errors_name_the_flag`).
    assert!("local".parse::<crate::DpModeName>().is_err());
}
