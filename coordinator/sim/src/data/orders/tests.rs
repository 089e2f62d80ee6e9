//! Orders data in the simulator: CDNOW churn through a column mapping, the
//! MLP on Telco, a config file's `[orders]` table with the natural
//! partition, and the errors a bad mapping gives.

use std::path::PathBuf;

use crate::{Experiment, Settings, SimArgs, run_all};

fn repo(path: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path)
        .display()
        .to_string()
}

fn run(a: SimArgs) -> anyhow::Result<Vec<Experiment>> {
    run_all(&Settings::from_args(a)?)
}

/// CDNOW's mapping given as flags (not the bundled shortcut).
fn cdnow_args() -> SimArgs {
    let mut a = SimArgs {
        data: Some(
            format!("orders:{}", repo(super::DEFAULT_CDNOW))
                .parse()
                .unwrap(),
        ),
        task: Some("churn-lr".parse().unwrap()),
        merchants: Some(5),
        rounds: Some(3),
        ..Default::default()
    };
    a.orders.customer = Some("customer_id".into());
    a.orders.timestamp = Some("date".into());
    a.orders.timestamp_format = Some("yyyymmdd".parse().unwrap());
    a.orders.amount = Some("dollar_value".into());
    a.orders.quantity = Some("number_of_cds".into());
    a.orders.delimiter = Some("whitespace".parse().unwrap());
    a.orders.cutoff = Some("1997-09-30".into());
    a.orders.churn_window_days = Some(180);
    a
}

#[test]
fn churn_lr_on_the_cdnow_orders_export_reaches_auc_above_0_70() {
    let exps = run(cdnow_args()).unwrap();
    let e = &exps[0];
    let auc = e.final_metrics["auc"];
    assert!(auc > 0.70, "auc {auc}");
    // 8 RFM features + bias, every merchant reporting every round.
    assert_eq!(e.model_len, 9);
    assert!(e.rounds.iter().all(|r| r.reported == 5 && r.committed));
    assert!(e.name.starts_with("churn-lr on orders:"), "{}", e.name);
}

#[test]
fn churn_mlp_on_telco_reaches_auc_above_0_80() {
    let a = SimArgs {
        data: Some(
            format!("telco:{}", repo(crate::data::DEFAULT_TELCO))
                .parse()
                .unwrap(),
        ),
        task: Some("churn-mlp".parse().unwrap()),
        merchants: Some(4),
        rounds: Some(3),
        ..Default::default()
    };
    let e = &run(a).unwrap()[0];
    let auc = e.final_metrics["auc"];
    assert!(auc > 0.80, "auc {auc}");
    // 45 features → 16 hidden → 1.
    assert_eq!(e.model_len, 45 * 16 + 16 + 16 + 1);
    assert_eq!(e.task, "churn-mlp");
}

#[test]
fn an_unknown_column_is_named_with_the_file() {
    let mut a = cdnow_args();
    a.orders.customer = Some("client_no".into());
    let err = format!("{:#}", run(a).unwrap_err());
    assert!(
        err.contains("client_no") && err.contains("CDNOW_master.txt"),
        "{err}"
    );
    assert_eq!(
        err.matches("CDNOW_master.txt").count(),
        1,
        "named once: {err}"
    );
    // Without any mapping the flags to give are named.
    let mut a = cdnow_args();
    a.orders = Default::default();
    let err = Settings::from_args(a).unwrap_err().to_string();
    assert!(
        err.contains("--orders-mapping") && err.contains("--customer-col"),
        "{err}"
    );
}

#[test]
fn a_cutoff_before_every_order_is_refused_with_the_dates_and_the_fix() {
    // CDNOW runs from 1997-01-01 to 1998-06-30.
    let mut a = cdnow_args();
    a.orders.cutoff = Some("1996-12-01".into());
    let err = run(a).unwrap_err().to_string();
    assert!(
        err.contains(
            "CDNOW_master.txt: no order falls before the churn cutoff 1996-12-01 (--cutoff)"
        ) && err.contains("from 1997-01-01 to 1998-06-30 (546 days)")
            && err.contains("--churn-window-days shorter"),
        "{err}"
    );
    // The default cutoff: the day after the last order minus the window.
    let mut a = cdnow_args();
    a.orders.cutoff = None;
    a.orders.churn_window_days = Some(600);
    let err = run(a).unwrap_err().to_string();
    assert!(
        err.contains(
            "cutoff 1996-11-08 (the day after the last order minus --churn-window-days 600)"
        ),
        "{err}"
    );
}

#[test]
fn a_cutoff_after_every_order_is_refused_for_churn_with_the_latest_cutoff_that_works() {
    // CDNOW runs from 1997-01-01 to 1998-06-30.
    let mut a = cdnow_args();
    a.orders.cutoff = Some("1998-09-01".into());
    let err = run(a).unwrap_err().to_string();
    assert!(
        err.contains("CDNOW_master.txt: no order falls after the churn cutoff 1998-09-01")
            && err.contains("every customer would be labelled churned")
            && err.contains(
                "--cutoff of 1998-01-01 or earlier (the last order minus --churn-window-days 180)"
            ),
        "{err}"
    );
}

/// A churn window the export covers only in part is a warning of the
/// report (and `metrics.json`): it was a log line alone, which `-q` and
/// the report dropped, while its labels stood behind every figure.
#[test]
fn a_churn_window_the_export_covers_in_part_is_a_report_warning() {
    // CDNOW runs to 1998-06-30: a 180-day window after 1998-03-01 is 121
    // days covered.
    let mut a = cdnow_args();
    a.orders.cutoff = Some("1998-03-01".into());
    let exp = run(a).unwrap().remove(0);
    assert!(
        exp.report.iter().any(|l| l.starts_with("warning: ")
            && l.contains("the orders end 1998-06-30, 121 of the 180 days of the churn window")
            && l.contains("--cutoff of 1998-01-01 or earlier")),
        "{:?}",
        exp.report
    );
    // A covered window says nothing.
    let exp = run(cdnow_args()).unwrap().remove(0);
    assert!(
        !exp.report.iter().any(|l| l.contains("churn window")),
        "{:?}",
        exp.report
    );
}

#[test]
fn a_placeholder_date_that_labels_every_customer_churned_is_refused_naming_the_dates() {
    // CDNOW with one placeholder order in 9999: the default cutoff would
    // follow it, and no real customer orders in the window after it. The
    // line is refused as it is read, named by its line.
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("cdnow-placeholder.txt");
    let mut text = std::fs::read_to_string(repo(super::DEFAULT_CDNOW)).unwrap();
    text.push_str("99999 99991231 1 1.00\n");
    std::fs::write(&csv, &text).unwrap();
    let mut a = cdnow_args();
    a.data = Some(format!("orders:{}", csv.display()).parse().unwrap());
    a.orders.cutoff = None;
    let err = run(a).unwrap_err().to_string();
    let lines = text.lines().count();
    assert!(
        err.contains(&format!(
            "cdnow-placeholder.txt: line {lines}, column `date`: `99991231` is in the future \
             (read as 9999-12-31): a placeholder date or a mistyped year?"
        )),
        "{err}"
    );
}

#[test]
fn a_partial_mapping_file_is_completed_by_the_column_flags() {
    let dir = tempfile::tempdir().unwrap();
    let mapping = dir.path().join("partial.toml");
    std::fs::write(
        &mapping,
        "customer = \"customer_id\"\ntimestamp = \"date\"\ntimestamp_format = \"yyyymmdd\"\n\
         delimiter = \"whitespace\"\n",
    )
    .unwrap();
    let mut a = cdnow_args();
    a.orders.mapping = Some(mapping.clone());
    (
        a.orders.customer,
        a.orders.timestamp,
        a.orders.timestamp_format,
    ) = (None, None, None);
    a.orders.delimiter = None;
    a.rounds = Some(1);
    let e = &run(a.clone()).unwrap()[0];
    assert!(e.final_metrics.contains_key("auc"), "{:?}", e.final_metrics);
    a.orders.amount = None;
    let err = run(a).unwrap_err().to_string();
    assert!(
        err.contains("partial.toml` has no `amount` column: add it there, or give --amount-col"),
        "{err}"
    );
}

/// Churn on 20 customers with one to four orders each in `dir/few.csv`
/// (a `store` column of 15 stores when `stores`): nobody's held-out fifth
/// holds both classes. The arguments run it for two rounds.
fn few_customers(dir: &std::path::Path, stores: bool) -> SimArgs {
    let csv = dir.join("few.csv");
    let mut text = String::from("customer,timestamp,amount,store\n");
    for c in 0..20 {
        for k in 0..=(c % 4) {
            text += &format!(
                "c{c},2017-{:02}-{:02},{},s{}\n",
                1 + (c + 3 * k) % 12,
                1 + c,
                5 + k,
                c % 15
            );
        }
    }
    std::fs::write(&csv, text).unwrap();
    let mut a = SimArgs {
        data: Some(format!("orders:{}", csv.display()).parse().unwrap()),
        task: Some("churn-lr".parse().unwrap()),
        rounds: Some(2),
        ..Default::default()
    };
    a.orders.customer = Some("customer".into());
    a.orders.timestamp = Some("timestamp".into());
    a.orders.amount = Some("amount".into());
    a.orders.churn_window_days = Some(60);
    if stores {
        a.orders.merchant = Some("store".into());
    }
    a
}

#[test]
fn a_churn_model_with_nothing_to_test_on_says_so() {
    // 20 customers over 15 merchants: one or two each.
    let dir = tempfile::tempdir().unwrap();
    let a = SimArgs {
        merchants: Some(15),
        ..few_customers(dir.path(), false)
    };
    let e = &run(a).unwrap()[0];
    assert!(
        e.report.iter().any(|l| l.starts_with(
            "no merchant holds held-out customers of both classes, so no auc was measured"
        ) && l
            .ends_with("give fewer --merchants (15 now), or more customers per merchant")),
        "{:?}",
        e.report
    );
}

/// The same customers in the export's 15 stores (natural partition), with
/// the report's baselines: no figure reads `NaN` (one not measured is `–`),
/// and the note does not advise a merchant count the partition ignores.
#[test]
fn natural_stores_with_nothing_to_test_on_report_no_nan() {
    let dir = tempfile::tempdir().unwrap();
    let a = SimArgs {
        partition: Some("natural".into()),
        out: Some(dir.path().join("out")),
        ..few_customers(dir.path(), true)
    };
    let e = &run(a).unwrap()[0];
    assert!(
        e.report.iter().any(|l| l.starts_with("baselines (auc")),
        "{:?}",
        e.report
    );
    // No pooled baseline is measurable here: said, not an empty list.
    assert!(
        e.report
            .iter()
            .all(|l| !(l.starts_with("baselines (") && l.contains("): ;"))),
        "{:?}",
        e.report
    );
    assert!(
        e.report.iter().all(|l| !l.contains("NaN")),
        "{:?}",
        e.report
    );
    assert!(
        e.report.iter().any(
            |l| l.contains("the natural partition keeps the export's 15 stores")
                && !l.contains("give fewer --merchants")
        ),
        "{:?}",
        e.report
    );
}

#[test]
fn a_recommender_with_nothing_to_test_on_is_refused_before_training() {
    // Every customer bought once: leave-last-out holds nothing out.
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("once.csv");
    let mut text = String::from("customer,item,timestamp,amount\n");
    for c in 0..40 {
        text += &format!("c{c},i{},2024-01-{:02},1\n", c % 7, 1 + c % 28);
    }
    std::fs::write(&csv, text).unwrap();
    let mut a = SimArgs {
        data: Some(format!("orders:{}", csv.display()).parse().unwrap()),
        task: Some("mf-implicit".parse().unwrap()),
        merchants: Some(2),
        rounds: Some(2),
        ..Default::default()
    };
    a.orders.customer = Some("customer".into());
    a.orders.item = Some("item".into());
    a.orders.timestamp = Some("timestamp".into());
    a.orders.amount = Some("amount".into());
    // Refused before training (it trained every round and reported no
    // figure).
    let e = run(a).unwrap_err().to_string();
    assert!(
        e.contains("no merchant holds a held-out interaction, so nothing could be measured"),
        "{e}"
    );
}

#[test]
fn orders_settings_without_an_orders_export_are_refused() {
    // A column flag with the bundled demo data would be ignored silently.
    let mut a = SimArgs::default();
    a.orders.customer = Some("customer_id".into());
    let err = Settings::from_args(a).unwrap_err().to_string();
    assert_eq!(
        err,
        "--customer-col reads an orders export, but the data is not one: give --data \
         orders:PATH (or `data = \"orders:PATH\"` in the config file)"
    );
    // The same from a config file's [orders] table.
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("sim.toml");
    std::fs::write(
        &cfg,
        "data = \"telco\"\n[orders]\ncutoff = \"2024-01-01\"\n",
    )
    .unwrap();
    let a = SimArgs {
        config: Some(cfg.clone()),
        ..Default::default()
    };
    let err = Settings::from_args(a).unwrap_err().to_string();
    assert!(
        err.starts_with("`cutoff` in the config's [orders] table reads an orders export"),
        "{err}"
    );
    // With --data on the command line the file may be a shared base.
    let a = SimArgs {
        config: Some(cfg),
        data: Some("movielens".parse().unwrap()),
        ..Default::default()
    };
    assert!(Settings::from_args(a).is_ok());
    // --delimiter also reads customer tables.
    let mut a = SimArgs {
        data: Some("telco".parse().unwrap()),
        ..Default::default()
    };
    a.orders.delimiter = Some(",".parse().unwrap());
    assert!(Settings::from_args(a).is_ok());
}

/// A small multi-store export: store `s{k}` sells to its own customers, who
/// favour items by store; some customers stop buying in the last months.
fn write_stores_csv(path: &std::path::Path) {
    use std::fmt::Write as _;
    let mut text = String::from("order_date,store,customer,sku,qty,total\n");
    for store in 0..3u32 {
        for c in 0..40u32 {
            let churner = c % 3 == 0;
            let orders = 2 + (c % 5);
            for k in 0..orders {
                // Loyal customers keep buying through December; churners stop in August.
                let month = if churner {
                    1 + k % 7
                } else {
                    1 + (k * 5 + c) % 12
                };
                let day = 1 + (c + k) % 27;
                let item = (store * 7 + c + k) % 20;
                writeln!(
                    text,
                    "2023-{month:02}-{day:02},s{store},c{store}-{c},sku{item},{},{}.50",
                    1 + k % 2,
                    10 + c % 30
                )
                .unwrap();
            }
        }
    }
    std::fs::write(path, text).unwrap();
}

#[test]
fn the_config_orders_table_with_natural_partition_makes_one_merchant_per_store() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("orders.csv");
    write_stores_csv(&csv);
    let cfg = dir.path().join("sim.toml");
    std::fs::write(
        &cfg,
        format!(
            "data = \"orders:{}\"\ntask = \"mf-implicit\"\nrounds = 2\nepochs = 1\n\
             partition = \"natural\"\nfactors = 4\n\n[orders]\ncustomer = \"customer\"\n\
             item = \"sku\"\ntimestamp = \"order_date\"\namount = \"total\"\nquantity = \"qty\"\n\
             merchant = \"store\"\ncutoff = \"2023-10-01\"\nchurn_window_days = 60\n",
            csv.display()
        ),
    )
    .unwrap();
    let a = SimArgs {
        config: Some(cfg.clone()),
        ..Default::default()
    };
    let e = &run(a.clone()).unwrap()[0];
    // Three stores → three merchants, whatever --merchants says.
    assert_eq!(e.merchants, 3);
    assert!(e.rounds.iter().all(|r| r.reported == 3 && r.committed));
    assert!(
        e.final_metrics.contains_key("hr@10"),
        "{:?}",
        e.final_metrics
    );
    // Churn on the same table: each store derives its own RFM rows.
    let mut b = a.clone();
    b.task = Some("churn-lr".parse().unwrap());
    let e = &run(b).unwrap()[0];
    assert_eq!(e.merchants, 3);
    assert!(e.final_metrics.contains_key("auc"));
    // Explicit MF needs a rating column, natural a merchant column.
    let mut c = a.clone();
    c.task = Some("mf".parse().unwrap());
    let err = run(c).unwrap_err().to_string();
    assert!(err.contains("--rating-col"), "{err}");
    let mut d = a;
    d.task = Some("churn-lr".parse().unwrap());
    d.orders.merchant = None;
    std::fs::write(
        &cfg,
        std::fs::read_to_string(&cfg)
            .unwrap()
            .replace("merchant = \"store\"\n", ""),
    )
    .unwrap();
    let err = run(d).unwrap_err().to_string();
    assert!(err.contains("--merchant-col"), "{err}");
}

/// Rows skipped under `--on-bad-row skip` were counted on standard error
/// only: the report (summary, metrics.json, analysis.md, report.html) now
/// opens with the count by reason and the first example, naming the file.
#[test]
fn rows_skipped_while_reading_are_in_the_report() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cdnow-with-bad-rows.txt");
    let mut text = std::fs::read_to_string(repo(super::DEFAULT_CDNOW)).unwrap();
    let rows = text.lines().count() - 1;
    text += " 00003 1997O301  1   5.00\n 00004 19970302  1   -3.00\n";
    std::fs::write(&path, text).unwrap();
    let mut a = cdnow_args();
    a.data = Some(format!("orders:{}", path.display()).parse().unwrap());
    a.rounds = Some(1);
    // Refused by default, naming the line and the two ways on, as
    // `prepare` does.
    let e = format!("{:#}", run(a.clone()).unwrap_err());
    assert!(e.contains(&format!("line {}", rows + 2)), "{e}");
    assert!(
        e.ends_with(
            "(fix that line, or leave such lines out and count them with `--on-bad-row skip`)"
        ),
        "{e}"
    );
    a.orders.on_bad_row = Some(fedcart_common::data::orders::BadRowPolicy::Skip);
    let e = &run(a).unwrap()[0];
    let first = &e.report[0];
    assert!(
        first.starts_with(&format!(
            "{}: 2 of {} rows skipped (--on-bad-row skip): bad_timestamp 1, negative_amount 1; \
             the first: ",
            path.display(),
            rows + 2
        )),
        "{:?}",
        e.report
    );
    assert!(first.contains("1997O301"), "{first}");
}
