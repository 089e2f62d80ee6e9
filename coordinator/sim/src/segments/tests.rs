//! `--task segments` on CDNOW against scikit-learn, and under secure
//! aggregation over gRPC against the plaintext run.

use crate::{Experiment, Settings, SimArgs, run_all};

/// scikit-learn's KMeans (k-means++, n_init = 10) inertia on the pooled,
/// standardised RFM features of the bundled CDNOW log, k = 4:
///
///     target/release/fedcart-sim --task segments:4 --data orders --merchants 10 \
///         --rounds 30 --seed 7 --out /tmp/seg
///     python3 coordinator/sim/examples/kmeans_reference.py /tmp/seg/segments.csv 4
const SKLEARN_INERTIA_K4: f64 = 102_138.731_5;

fn cdnow(k: usize, merchants: usize, rounds: u64) -> SimArgs {
    SimArgs {
        task: Some(format!("segments:{k}").parse().unwrap()),
        data: Some("orders".parse().unwrap()),
        merchants: Some(merchants),
        rounds: Some(rounds),
        seed: Some(7),
        ..Default::default()
    }
}

fn run(a: SimArgs) -> Experiment {
    run_all(&Settings::from_args(a).unwrap()).unwrap().remove(0)
}

/// The data paths are relative to the repository root.
fn at_root() {
    std::env::set_current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")).unwrap();
}

#[test]
fn cdnow_federated_inertia_is_within_two_percent_of_scikit_learn() {
    at_root();
    let e = run(cdnow(4, 10, 30));
    let ours = e.final_metrics["pooled_inertia"];
    assert!(
        ours <= 1.02 * SKLEARN_INERTIA_K4,
        "federated {ours} vs scikit-learn {SKLEARN_INERTIA_K4}"
    );
    // Lloyd never increases the inertia from one round to the next (each
    // Lloyd round reports the inertia at the centres it started from; the
    // first round proposes candidates and reports none).
    let curve: Vec<f64> = e
        .rounds
        .iter()
        .filter_map(|r| r.train.get("inertia").copied())
        .collect();
    assert!(curve.len() >= 5, "{curve:?}");
    assert!(curve.windows(2).all(|w| w[1] <= w[0] + 1e-6), "{curve:?}");
    // The heading, the table's header and rule, 4 rows and the separation
    // line.
    assert_eq!(table_and_after(&e.report), 3 + 4 + 1);
    // The data's notes come first: CDNOW's cutoff is the bundled source's.
    assert!(
        e.report[0].contains("before the cutoff 1997-09-30"),
        "{:?}",
        e.report
    );
}

/// The lines from the profile table's heading on (the data's notes come
/// before it).
fn table_and_after(report: &[String]) -> usize {
    let start = report
        .iter()
        .position(|l| l.starts_with("segments: pooled inertia"))
        .expect("a profile table");
    report.len() - start
}

/// The summary's `first` is the first Lloyd round's inertia, from
/// training: it showed the final inertia, read as k-means never moving
/// (found by a researcher probe).
#[test]
fn the_summarys_first_inertia_is_the_first_rounds() {
    at_root();
    let e = run(cdnow(3, 4, 8));
    let (k, _) = e.headline().expect("segments report their inertia");
    let first = e
        .rounds
        .iter()
        .find_map(|r| r.train.get(k))
        .copied()
        .unwrap();
    assert!(first > e.final_metrics[k], "{first} {:?}", e.final_metrics);
    let table = crate::output::summary_table(std::slice::from_ref(&e)).to_string();
    let row = table.lines().find(|l| l.contains("segments")).unwrap();
    // Per customer, named so: the report's pooled inertia is a sum.
    assert_eq!(k, "inertia");
    assert!(
        row.contains(&format!("inertia per customer {first:.4}")),
        "{table}"
    );
    assert!(
        row.contains(&format!("inertia per customer {:.4}", e.final_metrics[k])),
        "{table}"
    );
}

#[test]
fn secure_segments_over_grpc_equal_the_plaintext_segments() {
    at_root();
    let plain = run(cdnow(3, 4, 3));
    let mut a = cdnow(3, 4, 3);
    a.secagg = true;
    a.transport = Some("grpc".parse().unwrap());
    let secure = run(a);
    assert!(secure.rounds.iter().all(|r| r.reported == 4 && r.committed));
    let worst = plain
        .final_model
        .iter()
        .zip(&secure.final_model)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(worst < 1e-3, "largest centre difference {worst}");
    // The same segment sizes: every customer lands in the same segment.
    let sizes = |e: &Experiment| -> Vec<String> {
        e.report[3..]
            .iter()
            .filter(|l| l.starts_with("| "))
            .map(|l| l.split('|').nth(2).unwrap().trim().to_string())
            .collect()
    };
    assert_eq!(sizes(&plain), sizes(&secure));
}

#[test]
fn segments_without_k_choose_the_elbow_scikit_learn_finds_on_the_pooled_data() {
    at_root();
    let mut a = cdnow(3, 10, 2);
    a.task = Some("segments".parse().unwrap());
    let e = run(a);
    // scikit-learn's pooled inertia for k = 2..8 has its elbow (largest
    // second difference) at k = 3 (BENCHMARKS.md, "Segments and rules").
    let choice = e.report.last().unwrap();
    assert!(choice.starts_with("segments: k = 3,"), "{choice}");
    assert_eq!(e.final_model.len(), 3 * 8);
    // The report's profile table has one row per chosen segment.
    assert_eq!(table_and_after(&e.report), 3 + 3 + 1 + 1);
}

#[test]
fn the_whole_pipeline_over_grpc_under_secure_aggregation_chooses_the_in_process_k_and_segments() {
    at_root();
    let mut a = cdnow(3, 4, 12);
    a.task = Some("segments".parse().unwrap());
    let plain = run(a.clone());
    a.secagg = true;
    a.transport = Some("grpc".parse().unwrap());
    let secure = run(a);
    // Candidates, the choice (10 + 1 Lloyd rounds), then the chosen k's
    // Lloyd rounds: every one a secure round of all four merchants.
    assert!(secure.rounds.len() >= 12, "{}", secure.rounds.len());
    assert!(secure.rounds.iter().all(|r| r.reported == 4 && r.committed));
    assert_eq!(plain.report.last(), secure.report.last());
    assert_eq!(plain.final_model.len(), secure.final_model.len());
    let worst = plain
        .final_model
        .iter()
        .zip(&secure.final_model)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(worst < 1e-3, "largest centre difference {worst}");
    assert_eq!(plain.report[3..], secure.report[3..]);
}

/// A centre no customer is nearest was shown as a segment of zero means.
#[test]
fn an_empty_segment_shows_no_means_and_the_report_says_why() {
    let profile = |segment, size| super::SegmentProfile {
        segment,
        size,
        means: vec![3.0, 2.0, 10.0],
        churn_rate: 0.5,
    };
    let profiles = |segments| super::Profiles {
        segments,
        inertia: 1.0,
        labels: Vec::new(),
        separation: vec![0.5; 3],
    };
    let rfm: Vec<String> = fedcart_common::data::orders::derive::FEATURE_NAMES
        .map(String::from)
        .to_vec();
    let lines = super::report(&profiles(vec![profile(0, 40), profile(1, 0)]), &rfm);
    assert_eq!(
        lines[1],
        "| segment | customers | recency (days) | frequency | monetary | churn rate |"
    );
    // A customer table's features are named as they are, not as RFM.
    let table = ["spend", "tenure", "plan=basic"].map(String::from);
    let other = super::report(&profiles(vec![profile(0, 40)]), &table);
    assert_eq!(
        other[1],
        "| segment | customers | mean spend | mean tenure | mean plan=basic | churn rate |"
    );
    assert!(
        lines.contains(&"| 1 | 0 | – | – | – | – |".to_string()),
        "{lines:?}"
    );
    assert!(
        lines[lines.len() - 2].starts_with("(1 of the 2 segments hold no customer"),
        "{lines:?}"
    );
}

/// Segments of a customer table were profiled under RFM headers whatever
/// its columns were, and `segments.csv` numbered rows without the
/// customers' ids: the headers now name the table's features, and each row
/// carries its customer.
#[test]
fn segments_of_a_customer_table_are_named_by_its_features_and_customers() {
    at_root();
    let dir = tempfile::tempdir().unwrap();
    let e = run(SimArgs {
        task: Some("segments:3".parse().unwrap()),
        data: Some("telco".parse().unwrap()),
        merchants: Some(3),
        rounds: Some(5),
        seed: Some(7),
        out: Some(dir.path().to_path_buf()),
        ..Default::default()
    });
    let names = fedcart_common::data::tabular::Schema::telco().feature_names();
    // Telco's 11 blank TotalCharges are said first.
    assert!(
        e.report[0]
            .ends_with("blank numbers read as 0 (`blank_numeric = \"zero\"`): `TotalCharges` 11"),
        "{:?}",
        e.report
    );
    assert!(
        e.report[2].starts_with("| segment | customers | mean ")
            && e.report[2].ends_with(" | churn rate |"),
        "{:?}",
        e.report
    );
    let mut r = csv::Reader::from_path(dir.path().join("segments.csv")).unwrap();
    let header: Vec<&str> = r.headers().unwrap().iter().collect();
    assert_eq!(header[..4], ["merchant", "row", "customer", "segment"]);
    // Every feature under its name (they were `f0..f44`).
    assert_eq!(
        header[4..],
        names.iter().map(String::as_str).collect::<Vec<_>>()[..]
    );
    let first = r.records().next().unwrap().unwrap();
    assert!(first[2].contains('-'), "a Telco customerID: {first:?}");
}

/// Segments that split a customer table by a categorical column were shown
/// under its first three columns, where they all looked alike: the profile
/// now shows the features the segments separate most and says how much of
/// each one's variance lies between them (found by a data probe).
#[test]
fn a_tables_profile_shows_the_features_that_split_its_segments() {
    let dir = tempfile::tempdir().unwrap();
    let schema = dir.path().join("regions.toml");
    std::fs::write(
        &schema,
        "id = \"id\"\nlabel = \"churned\"\npositive = [\"1\"]\nnegative = [\"0\"]\n\
         numeric = [\"orders\", \"spend\", \"tenure\"]\n\
         [[categorical]]\nname = \"region\"\nvocabulary = [\"East\", \"West\", \"North\", \"South\"]\n",
    )
    .unwrap();
    // Three numeric columns of independent noise and a region column: the
    // four regions are the only structure, so k = 4 splits by them.
    let csv = dir.path().join("customers.csv");
    let mut rows = String::from("id,orders,spend,tenure,region,churned\n");
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(3);
    for i in 0..800 {
        use rand::RngExt;
        let region = ["East", "West", "North", "South"][i % 4];
        rows.push_str(&format!(
            "c{i},{},{:.2},{},{region},{}\n",
            rng.random_range(1..4),
            rng.random_range(20.0..80.0),
            rng.random_range(1..40),
            u8::from(i % 3 == 0)
        ));
    }
    std::fs::write(&csv, rows).unwrap();
    let e = run(SimArgs {
        task: Some("segments:4".parse().unwrap()),
        data: Some(format!("csv:{}", csv.display()).parse().unwrap()),
        schema: Some(schema),
        merchants: Some(2),
        rounds: Some(10),
        seed: Some(7),
        out: Some(dir.path().join("out")),
        ..Default::default()
    });
    let table = e
        .report
        .iter()
        .position(|l| l.starts_with("| segment |"))
        .expect("a profile table");
    let header = &e.report[table];
    assert_eq!(header.matches("mean region=").count(), 3, "{header}");
    let line = e
        .report
        .iter()
        .find(|l| l.starts_with("features that separate the segments most"))
        .expect("a separation line");
    assert_eq!(line.matches("`region=").count(), 3, "{line}");
    assert!(line.contains(" 1.00"), "{line}");
    assert!(
        !line.contains("`spend`") && !line.contains("`tenure`"),
        "{line}"
    );
}

/// Segments of an orders export describe every customer's whole history,
/// as the agent's `segments` does: the churn cutoff (the last order minus
/// 90 days) left out the last three months and the customers who first
/// bought in them, unsaid.
#[test]
fn segments_of_an_orders_export_count_customers_who_bought_only_lately() {
    use crate::data::orders::OrdersArgs;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("orders.csv");
    let mut lines = vec!["customer,timestamp,amount".to_string()];
    for c in 0..30 {
        for month in 1..=(1 + c % 6) {
            lines.push(format!("early{c},2017-{month:02}-1{},{}", c % 9, 10 + c));
        }
    }
    for c in 0..10 {
        lines.push(format!("late{c},2017-12-0{},{}", 1 + c % 9, 20 + c));
    }
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();
    let a = SimArgs {
        task: Some("segments:2".parse().unwrap()),
        data: Some(format!("orders:{}", file.display()).parse().unwrap()),
        orders: OrdersArgs {
            customer: Some("customer".into()),
            timestamp: Some("timestamp".into()),
            amount: Some("amount".into()),
            ..Default::default()
        },
        merchants: Some(2),
        rounds: Some(3),
        ..Default::default()
    };
    let e = run(a);
    let customers: u64 = e
        .report
        .iter()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| segment"))
        .map(|l| l.split('|').nth(2).unwrap().trim().parse::<u64>().unwrap())
        .sum();
    assert_eq!(customers, 40, "{:?}", e.report);
    // The churn rate is the share with no order in the export's last 90
    // days: the 30 early customers, not everyone (after the last order no
    // one buys, so every segment read 1.000).
    let lapsed: f64 = e
        .report
        .iter()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| segment"))
        .map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            cells[2].parse::<f64>().unwrap() * cells[6].parse::<f64>().unwrap()
        })
        .sum();
    assert!((lapsed - 30.0).abs() < 0.05, "{lapsed}: {:?}", e.report);
    assert!(
        e.report
            .iter()
            .any(|l| l.contains("no order in the export's last 90 days")),
        "{:?}",
        e.report
    );
}

/// A customer table of fewer than three features: the profile shows the
/// means it has (it read a third feature and panicked, losing the run).
#[test]
fn segments_of_a_table_of_two_features_profile_the_two() {
    at_root();
    let dir = tempfile::tempdir().unwrap();
    let schema = dir.path().join("two.toml");
    std::fs::write(
        &schema,
        "id = \"customerID\"\nlabel = \"Churn\"\npositive = [\"Yes\"]\nnegative = [\"No\"]\n\
         numeric = [\"tenure\", \"MonthlyCharges\"]\n",
    )
    .unwrap();
    let e = run(SimArgs {
        task: Some("segments:2".parse().unwrap()),
        data: Some(
            "csv:data/telco-churn/Telco-Customer-Churn.csv"
                .parse()
                .unwrap(),
        ),
        schema: Some(schema),
        merchants: Some(2),
        rounds: Some(5),
        seed: Some(7),
        out: Some(dir.path().join("out")),
        ..Default::default()
    });
    let table = 1 + e
        .report
        .iter()
        .position(|l| l.starts_with("segments: pooled inertia"))
        .expect("a profile table");
    assert_eq!(
        e.report[table],
        "| segment | customers | mean tenure | mean MonthlyCharges | churn rate |"
    );
    assert_eq!(e.report[table + 1], "|---:|---:|---:|---:|---:|");
    let rows: Vec<&String> = e.report[table + 2..]
        .iter()
        .take_while(|l| l.starts_with("| "))
        .collect();
    assert_eq!(rows.len(), 2, "{:?}", e.report);
    for r in rows {
        assert_eq!(r.matches(" | ").count(), 4, "{r}");
    }
    assert!(dir.path().join("out/segments.png").is_file());
}

/// A flat inertia curve is reported as such, with the likely cause and what
/// to do, instead of as an elbow.
#[test]
fn a_flat_curve_is_reported_with_its_likely_cause() {
    let curve: Vec<(usize, f64)> = [80137312.0, 80094272.0, 80022768.0, 79986872.0]
        .into_iter()
        .enumerate()
        .map(|(i, v)| (i + 2, v))
        .collect();
    let line = super::choice_report(2, &curve);
    assert!(
        line.starts_with("segments: k = 2: the federated inertia curve is flat")
            && line.contains("0.19 % gained")
            && line.contains("leave them out of the schema"),
        "{line}"
    );
    let bent = [(2, 141229.0), (3, 117331.0), (4, 102145.0)];
    let line = super::choice_report(3, &bent);
    assert!(
        line.contains("the elbow of the federated inertia curve") && !line.contains("left out"),
        "{line}"
    );
    // A fit worse than a smaller k's is named as left out of the choice.
    let risen: Vec<(usize, f64)> = [1325.0, 1113.0, 929.0, 808.0, 736.0, 640.0, 704.0]
        .into_iter()
        .enumerate()
        .map(|(i, v)| (i + 2, v))
        .collect();
    let line = super::choice_report(4, &risen);
    assert!(
        line.contains("k=8: 704)")
            && line.ends_with(
                "; left out of the choice: k = 8 (the fit came out no better than a smaller \
                 k's, a poor local optimum of k-means)"
            ),
        "{line}"
    );
}
