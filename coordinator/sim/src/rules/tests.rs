//! `--task rules` against mlxtend on the pooled grocery baskets, and under
//! secure aggregation equal to plaintext.

use std::path::PathBuf;

use super::*;
use crate::data::orders::OrdersArgs;
use crate::{SimArgs, run_all};

fn repo(path: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path)
        .display()
        .to_string()
}

/// The bundled grocery log, one merchant per store.
fn grocery(min: u64, secure: bool) -> SimArgs {
    SimArgs {
        task: Some(format!("rules:{min}").parse().unwrap()),
        data: Some(
            format!("orders:{}", repo("data/grocery/orders.csv"))
                .parse()
                .unwrap(),
        ),
        partition: Some("natural".into()),
        secagg: secure,
        orders: OrdersArgs::grocery_columns(),
        ..Default::default()
    }
}

fn mined(a: SimArgs) -> Mined {
    let s = Settings::from_args(a).unwrap();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    let (task, data) = s.experiments().remove(0);
    run(&s, task, &data, &pool).unwrap().1
}

/// Antecedent, consequent, support, confidence, lift.
type RefRule = (Vec<String>, Vec<String>, f64, f64, f64);

/// What `coordinator/sim/examples/itemsets_reference.py` wrote.
#[derive(serde::Deserialize)]
struct Reference {
    baskets: u64,
    min_count: u64,
    min_confidence: f64,
    itemsets: Vec<(Vec<String>, u64)>,
    rules: Vec<RefRule>,
}

fn names(m: &Mined, items: &[u32]) -> Vec<String> {
    let mut v: Vec<String> = items
        .iter()
        .map(|&i| m.catalogue.id(i).unwrap().to_string())
        .collect();
    v.sort();
    v
}

#[test]
fn grocery_itemsets_and_rules_equal_mlxtend_on_the_pooled_baskets() {
    // python3 coordinator/sim/examples/itemsets_reference.py \
    //     data/grocery/orders.csv 100 0.1 data/grocery/mlxtend-min100.json
    let text = std::fs::read_to_string(repo("data/grocery/mlxtend-min100.json")).unwrap();
    let r: Reference = serde_json::from_str(&text).unwrap();
    assert_eq!(r.min_confidence, MIN_CONFIDENCE);
    let m = mined(grocery(r.min_count, false));
    assert_eq!(m.sold.len(), 20, "one merchant per store");
    assert_eq!(m.baskets, r.baskets);
    let mut ours: Vec<(Vec<String>, u64)> = m
        .frequent
        .iter()
        .map(|f| (names(&m, &f.items), f.count))
        .collect();
    ours.sort_by(|a, b| (a.0.len(), &a.0).cmp(&(b.0.len(), &b.0)));
    assert_eq!(ours, r.itemsets);
    let mut rules: Vec<_> = m
        .rules
        .iter()
        .map(|x| (names(&m, &x.antecedent), names(&m, &x.consequent), x))
        .collect();
    rules.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
    assert_eq!(rules.len(), r.rules.len());
    for ((a, c, x), (ra, rc, s, conf, lift)) in rules.iter().zip(&r.rules) {
        assert_eq!((a, c), (ra, rc));
        assert!((x.support - s).abs() < 1e-12);
        assert!((x.confidence - conf).abs() < 1e-12);
        assert!((x.lift - lift).abs() < 1e-9);
    }
}

#[test]
fn secure_aggregation_finds_the_same_itemsets_as_plaintext() {
    let plain = mined(grocery(150, false));
    let secure = mined(grocery(150, true));
    assert!(plain.frequent.len() > 20);
    assert_eq!(plain.frequent, secure.frequent);
    assert_eq!(plain.baskets, secure.baskets);
    assert_eq!(plain.rules, secure.rules);
}

#[test]
fn the_report_lists_rules_and_levels() {
    let mut a = grocery(300, false);
    a.out = Some(tempfile::tempdir().unwrap().keep());
    let e = run_all(&Settings::from_args(a.clone()).unwrap())
        .unwrap()
        .remove(0);
    assert!(e.report[0].starts_with("rules:"));
    assert!(e.rounds.iter().all(|r| r.bytes_up > 0));
    let dir = a.out.unwrap();
    assert!(dir.join("rules.csv").exists() && dir.join("itemsets.csv").exists());
}

#[test]
fn a_run_without_rules_says_which_setting_to_lower() {
    let e = run_all(&Settings::from_args(grocery(100_000, false)).unwrap())
        .unwrap()
        .remove(0);
    assert!(
        e.report[1].starts_with("no item is in 100000 or more of the 22332 baskets")
            && e.report[1].contains("--min-support (1 % of the baskets is 223)"),
        "{:?}",
        e.report
    );
}

/// The hint names a support smaller than the one given: 1 % of the
/// baskets when that is smaller, else a quarter of it (it named 1 % of a
/// large log, six times the support that had found nothing).
#[test]
fn the_no_rules_hint_always_names_a_smaller_support() {
    let single = |i| Itemset {
        items: vec![i],
        count: 150,
    };
    let hint = no_rules_hint(&[single(0), single(1)], 66_385, 100);
    assert!(
        hint.contains("2 items reach 100 baskets") && hint.contains("(try 25)"),
        "{hint}"
    );
    let hint = no_rules_hint(&[], 66_385, 1000);
    assert!(hint.contains("(1 % of the baskets is 663)"), "{hint}");
}

#[test]
fn secure_rules_over_grpc_equal_the_in_process_plaintext_rules() {
    let mut a = grocery(100, false);
    a.partition = Some("iid".into());
    a.orders.merchant = None;
    a.merchants = Some(4);
    let plain = mined(a.clone());
    a.secagg = true;
    a.transport = Some("grpc".parse().unwrap());
    a.min_support = Some(100);
    let s = Settings::from_args(a).unwrap();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    let (task, data) = s.experiments().remove(0);
    let (exp, secure) = run(&s, task, &data, &pool).unwrap();
    assert!(plain.frequent.iter().any(|f| f.items.len() == 2));
    assert_eq!(secure.frequent, plain.frequent);
    assert_eq!(secure.baskets, plain.baskets);
    assert_eq!(secure.rules, plain.rules);
    // One row per level, every merchant in each, bytes both ways.
    assert!(exp.rounds.len() >= 2);
    assert!(
        exp.rounds
            .iter()
            .all(|r| r.committed && r.reported == 4 && r.bytes_up > 0 && r.bytes_down > 0)
    );
}

#[test]
fn k_and_min_support_flags_set_their_task_and_are_refused_with_another() {
    let mut a = grocery(100, false);
    a.min_support = Some(250);
    let s = Settings::from_args(a.clone()).unwrap();
    assert_eq!(s.experiments()[0].0, TaskChoice::Rules(250));
    a.k = Some(3);
    let err = Settings::from_args(a).unwrap_err().to_string();
    assert!(
        err.contains("--k") && err.contains("--task segments"),
        "{err}"
    );
    let seg = SimArgs {
        task: Some("segments".parse().unwrap()),
        k: Some(5),
        ..Default::default()
    };
    let s = Settings::from_args(seg).unwrap();
    assert_eq!(s.experiments()[0].0, TaskChoice::Segments(Some(5)));
}

/// Item ids with commas, quotes and spaces broke the CSVs' columns (the
/// fields were not quoted) and made an itemset read two ways.
#[test]
fn item_ids_with_separators_and_quotes_keep_the_csv_columns() {
    let dir = tempfile::tempdir().unwrap();
    let orders = dir.path().join("orders.csv");
    let mut text = String::from("customer,item,timestamp,quantity,amount,merchant\n");
    for (b, c) in (0..6).zip(["c1", "c2", "c3", "c4", "c5", "c6"]) {
        let m = if b % 2 == 0 { "s1" } else { "s2" };
        for item in ["\"a,b\"", "\"x\"\"y\"", "a b"] {
            text += &format!("{c},{item},2024-01-0{},1,1.0,{m}\n", b + 1);
        }
    }
    std::fs::write(&orders, text).unwrap();
    let mut a = grocery(3, false);
    a.data = Some(format!("orders:{}", orders.display()).parse().unwrap());
    let out = dir.path().join("out");
    a.out = Some(out.clone());
    run_all(&Settings::from_args(a).unwrap()).unwrap();
    for (file, width) in [
        ("itemsets.csv", 3),
        ("rules.csv", 5),
        ("bought_together.csv", 5),
    ] {
        let mut r = csv::Reader::from_path(out.join(file)).unwrap();
        let rows: Vec<csv::StringRecord> = r.records().map(Result::unwrap).collect();
        assert!(!rows.is_empty(), "{file}");
        assert!(
            rows.iter().all(|row| row.len() == width),
            "{file}: {rows:?}"
        );
    }
    let mut r = csv::Reader::from_path(out.join("itemsets.csv")).unwrap();
    let sets: Vec<String> = r.records().map(|row| row.unwrap()[0].to_string()).collect();
    assert!(
        sets.contains(&"\"a b\" a,b \"x\"\"y\"".to_string()),
        "{sets:?}"
    );
    // `item` is one id, as the export spells it (it was written as a list
    // of one, `"a b"` with its quotes, which matched no item id).
    let mut r = csv::Reader::from_path(out.join("bought_together.csv")).unwrap();
    let items: std::collections::BTreeSet<String> =
        r.records().map(|row| row.unwrap()[1].to_string()).collect();
    assert_eq!(
        items,
        ["a b", "a,b", "x\"y"]
            .map(String::from)
            .into_iter()
            .collect()
    );
}

/// One level a round, as in a real federation: `--rounds` caps the
/// itemset size in process too (it was ignored there).
#[test]
fn rounds_cap_the_itemset_size() {
    let all = mined(grocery(100, false));
    assert!(all.frequent.iter().any(|f| f.items.len() == 2));
    let mut a = grocery(100, false);
    a.rounds = Some(1);
    let singles = mined(a.clone());
    assert!(singles.frequent.iter().all(|f| f.items.len() == 1));
    // Its report says why there is no rule (it advised a smaller
    // --min-support, although pairs were never counted).
    let s = Settings::from_args(a).unwrap();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let (task, data) = s.experiments().remove(0);
    let report = run(&s, task, &data, &pool).unwrap().0.report.join("\n");
    assert!(
        report.contains("--rounds 1 counts single items only")
            && !report.contains("smaller --min-support"),
        "{report}"
    );
    assert_eq!(
        singles.frequent.len(),
        all.frequent.iter().filter(|f| f.items.len() == 1).count()
    );
}
