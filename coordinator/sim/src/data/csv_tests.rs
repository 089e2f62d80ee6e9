//! `--data csv[:PATH] --schema FILE`: any customer table through a schema
//! file, and the errors a bad schema or table gets (file, line, column).

use std::path::{Path, PathBuf};

use fedcart_common::data::tabular::Schema;

use crate::{Experiment, Settings, SimArgs, run_all};

fn telco() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../data/telco-churn/Telco-Customer-Churn.csv")
}

/// Writes `schema` as the TOML a merchant puts under `[data.schema]`.
fn schema_file(dir: &Path, schema: &Schema) -> PathBuf {
    let path = dir.join("schema.toml");
    std::fs::write(&path, toml::to_string(schema).unwrap()).unwrap();
    path
}

fn args(task: &str, data: String, schema: Option<PathBuf>) -> SimArgs {
    SimArgs {
        merchants: Some(3),
        rounds: Some(2),
        epochs: Some(1),
        task: Some(task.parse().unwrap()),
        data: Some(data.parse().unwrap()),
        schema,
        ..Default::default()
    }
}

fn run(a: SimArgs) -> anyhow::Result<Vec<Experiment>> {
    run_all(&Settings::from_args(a)?)
}

/// The error of a run, with its causes.
fn error(a: SimArgs) -> String {
    match run(a) {
        Ok(_) => panic!("the run should fail"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn a_schema_file_reproduces_the_built_in_telco_runs_with_or_without_an_id_column() {
    let dir = tempfile::tempdir().unwrap();
    for task in ["churn-lr", "churn-mlp"] {
        let builtin = run(args(task, format!("telco:{}", telco().display()), None)).unwrap();
        let mut schema = Schema::telco();
        let path = schema_file(dir.path(), &schema);
        let csv = run(args(task, format!("csv:{}", telco().display()), Some(path))).unwrap();
        assert_eq!(builtin[0].final_model, csv[0].final_model, "{task}");
        assert_eq!(builtin[0].final_metrics, csv[0].final_metrics, "{task}");
        // Without an id column rows are numbered; the model is the same.
        schema.id = None;
        let path = schema_file(dir.path(), &schema);
        let no_id = run(args(task, format!("csv:{}", telco().display()), Some(path))).unwrap();
        assert_eq!(builtin[0].final_model, no_id[0].final_model, "{task}");
    }
}

/// `--schema auto` drafts the schema from the table: the run is the one a
/// file holding that draft gives, and it learns Telco churn as well as the
/// hand-written schema (the same columns, vocabularies in sorted order).
#[test]
fn schema_auto_drafts_from_the_table_and_learns_as_the_hand_written_one() {
    let dir = tempfile::tempdir().unwrap();
    let data = format!("csv:{}", telco().display());
    let auto = run(args("churn-lr", data.clone(), Some("auto".into()))).unwrap();
    let file = std::fs::File::open(telco()).unwrap();
    let draft = Schema::draft(file, &telco(), b',', &Default::default()).unwrap();
    let drafted = run(args(
        "churn-lr",
        data.clone(),
        Some(schema_file(dir.path(), &draft.schema)),
    ))
    .unwrap();
    assert_eq!(auto[0].final_model, drafted[0].final_model);
    let builtin = run(args(
        "churn-lr",
        format!("telco:{}", telco().display()),
        None,
    ))
    .unwrap();
    let (a, b) = (
        auto[0].final_metrics["auc"],
        builtin[0].final_metrics["auc"],
    );
    assert!(
        a > 0.8 && (a - b).abs() < 0.01,
        "auto {a}, hand-written {b}"
    );
    // What the draft cannot tell is asked for with the client's flags.
    let unlabelled = dir.path().join("unlabelled.csv");
    std::fs::write(&unlabelled, "id,a,status\n1,2,gone\n2,3,kept\n").unwrap();
    let err = error(args(
        "churn-lr",
        format!("csv:{}", unlabelled.display()),
        Some("auto".into()),
    ));
    assert!(
        err.contains("cannot tell which column is the label")
            && err.contains("`fedcart-client schema --csv")
            && err.contains("then give --schema schema.toml"),
        "{err}"
    );
    // Without a table to draft from, the error says what to do instead.
    let mut a = args("churn-lr", "csv".into(), Some("auto".into()));
    let copy = dir.path().join("test.csv");
    std::fs::copy(telco(), &copy).unwrap();
    a.train = Some(telco());
    a.test = Some(copy);
    assert!(error(a).contains("--schema auto drafts the schema from `--data csv:PATH`"),);
}

/// `--schema auto` on an orders export named the agent's settings
/// (`data.orders_csv`, `prepare`); the simulator reads such a file itself,
/// with `--data orders:PATH`.
#[test]
fn schema_auto_on_an_orders_export_names_the_simulators_orders_data() {
    let dir = tempfile::tempdir().unwrap();
    let orders = dir.path().join("orders.csv");
    let mut text = "customer,item,timestamp,quantity,amount\n".to_string();
    for k in 0..200 {
        text.push_str(&format!(
            "c{},i{},2024-01-{:02}T10:00:00,1,{}.5\n",
            k % 20,
            k % 7,
            1 + k % 28,
            k % 9
        ));
    }
    std::fs::write(&orders, text).unwrap();
    let err = error(args(
        "churn-lr",
        format!("csv:{}", orders.display()),
        Some("auto".into()),
    ));
    assert!(
        err.contains("this looks like an orders export")
            && err.contains(&format!("give it as `--data orders:{}`", orders.display()))
            && !err.contains("data.orders_csv"),
        "{err}"
    );
}

/// `--data telco:` on another customer table named only Telco's missing
/// column: it names the way to read any table.
#[test]
fn telco_data_on_another_table_names_csv_with_a_drafted_schema() {
    let dir = tempfile::tempdir().unwrap();
    let bank = dir.path().join("bank.csv");
    std::fs::write(
        &bank,
        "CustomerId,Age,Balance,Exited\n1,40,10.5,0\n2,31,0,1\n",
    )
    .unwrap();
    let err = error(args("churn-lr", format!("telco:{}", bank.display()), None));
    assert!(
        err.contains(&format!(
            "give `--data csv:{} --schema auto`",
            bank.display()
        )) && err.contains("customerID"),
        "{err}"
    );
}

/// `--schema auto` on a table whose label cannot be told said "give it
/// with `--label COLUMN`", a flag the simulator does not have: it names
/// the client's command that takes it, and the schema file to give back.
#[test]
fn schema_auto_asks_for_what_the_table_cannot_tell_with_the_clients_command_only() {
    let dir = tempfile::tempdir().unwrap();
    for (text, option) in [
        (
            "id,a,status,flag\n1,2,gone,x\n2,3,kept,y\n",
            "--label COLUMN",
        ),
        ("id,a,churn\n1,2,gone\n2,3,kept\n", "--positive VALUE"),
    ] {
        let table = dir.path().join("t.csv");
        std::fs::write(&table, text).unwrap();
        let err = error(args(
            "churn-lr",
            format!("csv:{}", table.display()),
            Some("auto".into()),
        ));
        assert!(!err.contains("give it with"), "{err}");
        assert!(
            err.contains(&format!(
                "`fedcart-client schema --csv {} {option} --out schema.toml` drafts the schema \
                 with it, then give --schema schema.toml",
                table.display()
            )),
            "{err}"
        );
    }
}

/// A customer table `id,spend,churn` of `rows` (spend, churned) written as
/// `name.csv` into `dir`, with its schema file: the two paths.
fn spend_table(
    dir: &Path,
    name: &str,
    rows: impl IntoIterator<Item = (usize, bool)>,
) -> (PathBuf, PathBuf) {
    let table = dir.join(format!("{name}.csv"));
    let mut text = String::from("id,spend,churn\n");
    for (i, (spend, churned)) in rows.into_iter().enumerate() {
        text += &format!("{i},{spend},{}\n", if churned { "yes" } else { "no" });
    }
    std::fs::write(&table, text).unwrap();
    let schema = dir.join("schema.toml");
    std::fs::write(
        &schema,
        "id = \"id\"\nlabel = \"churn\"\npositive = [\"yes\"]\nnegative = [\"no\"]\n\
         numeric = [\"spend\"]\n",
    )
    .unwrap();
    (table, schema)
}

/// A table with one churner in all, over 3 merchants, was told to give
/// fewer --merchants or more customers per merchant: no split gives any
/// merchant a held-out churner, and the note says the table holds only one.
#[test]
fn a_table_with_too_few_churners_to_test_on_says_how_many_it_holds() {
    let dir = tempfile::tempdir().unwrap();
    let (table, schema) = spend_table(dir.path(), "one", (0..60).map(|i| (i % 7, i == 5)));
    let e = &run(args(
        "churn-lr",
        format!("csv:{}", table.display()),
        Some(schema),
    ))
    .unwrap()[0];
    let note = e
        .report
        .iter()
        .find(|l| l.starts_with("no merchant holds held-out customers of both classes"))
        .unwrap_or_else(|| panic!("{:?}", e.report));
    assert!(
        note.ends_with(
            "the table holds only 1 churner in total, and a merchant's held-out fifth takes one \
             only from 3 of them, however the table is split"
        ),
        "{note}"
    );
    assert!(!note.contains("--merchants"), "{note}");
}

/// A 20-row table showed an AUC of 1.0000 from 4 held-out rows with no word
/// that it meant little: a run on too few held-out customers says how few,
/// and a table large enough to test on does not get the note.
#[test]
fn a_figure_from_few_held_out_customers_is_called_rough() {
    let dir = tempfile::tempdir().unwrap();
    let note = |rows: usize| {
        let spend_of = |i: usize| {
            let churned = i.is_multiple_of(2);
            (i % 7 + if churned { 0 } else { 5 }, churned)
        };
        let (table, schema) = spend_table(dir.path(), &format!("t{rows}"), (0..rows).map(spend_of));
        let mut a = args("churn-lr", format!("csv:{}", table.display()), Some(schema));
        a.merchants = Some(1);
        let e = &run(a).unwrap()[0];
        assert!(
            e.rounds.iter().any(|r| r.eval.contains_key("auc")),
            "measured"
        );
        e.report
            .iter()
            .find(|l| l.contains("held-out customers"))
            .cloned()
    };
    let rough = note(40).expect("a note on 40 rows");
    assert_eq!(
        rough,
        "the auc is measured on 8 held-out customers, 4 of them churned: too few for the figure \
         to mean much (one customer ranked otherwise moves it by up to 0.25); give more customers"
    );
    assert_eq!(note(200), None);
}

/// The Telco table's header and data rows.
fn telco_rows() -> (String, Vec<String>) {
    let text = std::fs::read_to_string(telco()).unwrap();
    let mut lines = text.lines().map(String::from);
    let header = lines.next().unwrap();
    (header, lines.collect())
}

#[test]
fn csv_takes_explicit_train_and_test_tables() {
    let dir = tempfile::tempdir().unwrap();
    let (header, rows) = telco_rows();
    let (train, test) = (dir.path().join("train.csv"), dir.path().join("test.csv"));
    let write = |p: &Path, rows: &[String]| {
        std::fs::write(p, format!("{header}\n{}\n", rows.join("\n"))).unwrap();
    };
    write(&train, &rows[..5600]);
    write(&test, &rows[5600..]);
    let mut a = args(
        "churn-lr",
        "csv".into(),
        Some(schema_file(dir.path(), &Schema::telco())),
    );
    a.train = Some(train.clone());
    a.test = Some(test.clone());
    let exp = run(a.clone()).unwrap().remove(0);
    let auc = exp.final_metrics["auc"];
    assert!(auc > 0.8, "auc {auc}");
    // The report names the files read (it named the dataset's default).
    let data = format!("csv:{} (test {})", train.display(), test.display());
    assert_eq!(exp.data, data);
    assert_eq!(exp.name, format!("churn-lr on {data}"));
    assert_eq!(exp.partition, "iid");
    assert!(
        !exp.report.iter().any(|l| l.contains("--test")),
        "{:?}",
        exp.report
    );
    // A test file holding training rows is reported: the held-out figures
    // count rows the model trained on (a probe's AUC rose 0.852 -> 0.877
    // without a word).
    let overlap = dir.path().join("overlap.csv");
    write(&overlap, &rows[5000..6000]);
    let mut b = a.clone();
    b.test = Some(overlap);
    let exp = run(b).unwrap().remove(0);
    assert!(
        exp.report.iter().any(|l| l.starts_with(
            "warning: 600 of the 1000 --test rows are identical to --train rows (same `customerID`"
        )),
        "{:?}",
        exp.report
    );
    // The training file as the test file is refused, by any spelling.
    a.test = Some(dir.path().join(".").join("train.csv"));
    let err = error(a);
    assert!(
        err.contains("--train and --test name the same file")
            && err.contains("give a held-out file as --test"),
        "{err}"
    );
    // Without tables and without a path there is nothing to read.
    let err = error(args(
        "churn-lr",
        "csv".into(),
        Some(schema_file(dir.path(), &Schema::telco())),
    ));
    assert!(
        err.contains("--data csv without a PATH needs --train and --test"),
        "{err}"
    );
    // An orders export does not read them: it ran the bundled log while the
    // report named the two files.
    let mut a = args("churn-lr", "orders".into(), None);
    a.train = Some(train.clone());
    a.test = Some(test.clone());
    let err = error(a.clone());
    assert!(
        err.starts_with("--train and --test are not read with an orders export (orders:")
            && err.ends_with("give the whole export as --data orders:PATH and leave them out"),
        "{err}"
    );
    a.task = Some("segments".parse().unwrap());
    a.data = None;
    assert!(error(a).starts_with("--train and --test are not read with an orders export"));
    // Without --data they are read as ratings: a customer table there
    // says how to read it instead.
    let mut a = args("mf", "movielens".into(), None);
    (a.train, a.test) = (Some(train), Some(test));
    a.data = None;
    let err = error(a);
    assert!(
        err.contains("missing column `userId`")
            && err.contains("for a customer table give --data csv --schema FILE"),
        "{err}"
    );
}

/// A small customer table with its own schema: `tenure` numeric, `plan`
/// categorical, `left` the label.
fn small(dir: &Path, rows: &str) -> SimArgs {
    let schema = dir.join("schema.toml");
    std::fs::write(
        &schema,
        "label = \"left\"\npositive = [\"yes\"]\nnegative = [\"no\"]\nnumeric = [\"tenure\"]\n\
         [[categorical]]\nname = \"plan\"\nvocabulary = [\"basic\", \"pro\"]\n",
    )
    .unwrap();
    let csv = dir.join("customers.csv");
    std::fs::write(&csv, rows).unwrap();
    args("churn-lr", format!("csv:{}", csv.display()), Some(schema))
}

/// A test table holding a category the schema never saw says so in the
/// report: those rows were read as none of the column's values, unsaid.
#[test]
fn a_test_table_with_a_category_the_schema_lacks_is_reported() {
    use fedcart_common::data::tabular::UnknownCategory;
    let dir = tempfile::tempdir().unwrap();
    let (header, rows) = telco_rows();
    let (train, test) = (dir.path().join("train.csv"), dir.path().join("test.csv"));
    std::fs::write(&train, format!("{header}\n{}\n", rows[..5600].join("\n"))).unwrap();
    let renamed = rows[5600..].join("\n").replace(",DSL,", ",Satellite,");
    std::fs::write(&test, format!("{header}\n{renamed}\n")).unwrap();
    let satellites = renamed.matches(",Satellite,").count();
    assert!(satellites > 100);
    let schema = Schema {
        unknown_category: UnknownCategory::Zeros,
        ..Schema::telco()
    };
    let mut a = args(
        "churn-lr",
        "csv".into(),
        Some(schema_file(dir.path(), &schema)),
    );
    a.train = Some(train);
    a.test = Some(test);
    let exp = run(a).unwrap().remove(0);
    let want = format!("column `InternetService`: {satellites} of ");
    assert!(
        exp.report
            .iter()
            .any(|l| l.contains(&want) && l.contains("(`Satellite` ")),
        "{:?}",
        exp.report
    );
}

#[test]
fn bad_tables_name_the_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("customers.csv").display().to_string();
    // A missing column: the error lists the header's columns.
    let err = error(small(dir.path(), "tenure,plan_type,left\n3,basic,no\n"));
    assert!(
        err.contains(&format!(
            "{csv}: line 1: missing column `plan` (header has: tenure,plan_type,left)"
        )),
        "{err}"
    );
    assert_eq!(err.matches(&csv).count(), 1, "named once: {err}");
    // Header names are matched exactly.
    let err = error(small(dir.path(), "tenure,Plan,left\n3,basic,no\n"));
    assert!(err.contains("missing column `plan`"), "{err}");
    let err = error(small(
        dir.path(),
        "tenure,plan,left\n3,basic,no\nthree,pro,yes\n",
    ));
    assert!(
        err.contains(&format!(
            "{csv}: line 3, column `tenure`: `three` is not a number"
        )),
        "{err}"
    );
    let err = error(small(
        dir.path(),
        "tenure,plan,left\n3,basic,no\n4,pro,maybe\n",
    ));
    assert!(
        err.contains(&format!(
            "{csv}: line 3, column `left`: label `maybe` is neither positive"
        )),
        "{err}"
    );
    let err = error(small(dir.path(), "tenure,plan,left\n3,gold,no\n"));
    assert!(
        err.contains(&format!(
            "{csv}: line 2, column `plan`: `gold` is not in the vocabulary"
        )),
        "{err}"
    );
}

#[test]
fn bad_schema_files_and_flags_are_explained() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("schema.toml");
    let data = format!("csv:{}", telco().display());
    // A misspelt key: the TOML error names the file, line and column and
    // lists the keys a schema has.
    std::fs::write(&path, "label = \"Churn\"\npositve = [\"Yes\"]\n").unwrap();
    let err = error(args("churn-lr", data.clone(), Some(path.clone())));
    assert!(err.contains(&path.display().to_string()), "{err}");
    assert!(
        err.contains("line 2, column 1") && err.contains("unknown field `positve`"),
        "{err}"
    );
    // A schema that parses but cannot be used.
    let mut schema = Schema::telco();
    schema.negative.push("Yes".into());
    let err = error(args(
        "churn-lr",
        data.clone(),
        Some(schema_file(dir.path(), &schema)),
    ));
    assert!(
        err.contains("label value `Yes` is both positive and negative"),
        "{err}"
    );
    // csv needs a schema; other datasets refuse one.
    let err = error(args("churn-lr", data, None));
    assert!(
        err.contains("--data csv needs a schema: give --schema FILE (the `[data.schema]` table), or `--schema auto`"),
        "{err}"
    );
    let err = error(args(
        "churn-lr",
        format!("telco:{}", telco().display()),
        Some(schema_file(dir.path(), &Schema::telco())),
    ));
    assert!(err.contains("--schema applies to --data csv only"), "{err}");
}

#[test]
fn the_delimiter_flag_reads_semicolon_tables_and_tab_separated_ratings() {
    let dir = tempfile::tempdir().unwrap();
    let semicolons = dir.path().join("telco-semicolon.csv");
    // Telco has no quoted fields, so swapping the separator is exact.
    let text = std::fs::read_to_string(telco()).unwrap();
    std::fs::write(&semicolons, text.replace(',', ";")).unwrap();
    let comma = run(args(
        "churn-lr",
        format!("telco:{}", telco().display()),
        None,
    ))
    .unwrap();
    let mut a = args("churn-lr", format!("telco:{}", semicolons.display()), None);
    a.orders.delimiter = Some("semicolon".parse().unwrap());
    let semi = run(a).unwrap();
    assert_eq!(comma[0].final_model, semi[0].final_model);
    // Without the flag the header is one field: the error names the file.
    let err = error(args(
        "churn-lr",
        format!("telco:{}", semicolons.display()),
        None,
    ));
    assert!(err.contains("telco-semicolon.csv"), "{err}");

    let ratings =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../data/ml-latest-small/ratings.csv");
    let tabs = dir.path().join("ratings.tsv");
    let text = std::fs::read_to_string(&ratings).unwrap();
    std::fs::write(&tabs, text.replace(',', "\t")).unwrap();
    let mf = |path: &Path, delimiter: Option<&str>| {
        let mut a = args("mf", format!("movielens:{}", path.display()), None);
        a.rounds = Some(1);
        a.orders.delimiter = delimiter.map(|d| d.parse().unwrap());
        run(a)
    };
    let comma = mf(&ratings, None).unwrap();
    let tab = mf(&tabs, Some("tab")).unwrap();
    assert_eq!(comma[0].final_metrics, tab[0].final_metrics);

    // Whitespace runs are for orders exports only: the flag is named.
    let mut a = args("churn-lr", format!("telco:{}", telco().display()), None);
    a.orders.delimiter = Some("whitespace".parse().unwrap());
    let err = format!("{:#}", Settings::from_args(a).unwrap_err());
    assert!(err.contains("--delimiter"), "{err}");
}

/// A column that is the label in disguise gives a perfect validation AUC,
/// which the report now calls out (a probe's leak went unremarked at
/// 1.0000); the honest table gives no such warning.
#[test]
fn a_perfect_validation_auc_is_reported_as_a_likely_label_leak() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(telco()).unwrap();
    let mut lines = text.lines();
    let mut out = format!("{},Leak\n", lines.next().unwrap());
    for l in lines {
        let leak = if l.ends_with(",Yes") { 1 } else { 0 };
        out.push_str(&format!("{l},{leak}\n"));
    }
    let table = dir.path().join("leak.csv");
    std::fs::write(&table, out).unwrap();
    let mut schema = Schema::telco();
    schema.numeric.push("Leak".into());
    let mut a = args(
        "churn-lr",
        format!("csv:{}", table.display()),
        Some(schema_file(dir.path(), &schema)),
    );
    a.rounds = Some(4);
    let exp = run(a).unwrap().remove(0);
    assert!(
        exp.report
            .iter()
            .any(|l| l.starts_with("warning: val_auc 1.0000") && l.contains("encodes the label")),
        "{:?}",
        exp.report
    );
    let honest = run(args(
        "churn-lr",
        format!("csv:{}", telco().display()),
        Some(schema_file(dir.path(), &Schema::telco())),
    ))
    .unwrap()
    .remove(0);
    assert!(
        !honest
            .report
            .iter()
            .any(|l| l.contains("encodes the label")),
        "{:?}",
        honest.report
    );
}

/// A run whose best validation score is its last evaluated version says
/// that more rounds may serve a better model (a probe's MLP was served
/// under-trained, below the majority class, without a note).
#[test]
fn a_run_still_improving_at_its_last_round_says_so() {
    let mut a = args("mf", "movielens".into(), None);
    a.rounds = Some(4);
    let exp = run(a).unwrap().remove(0);
    let best = exp.best.as_ref().expect("selects by validation");
    assert_eq!(best.round, 4, "{:?}", exp.report);
    assert!(
        exp.report.iter().any(|l| l
            == "note: val_rmse was still improving at the last evaluated version (4): more \
                --rounds may serve a better model"),
        "{:?}",
        exp.report
    );
}

/// A model that flags no churner (1 % churners) is served with accuracy
/// 0.99, the share of customers who stay: the report says so.
#[test]
fn a_model_that_flags_no_churner_is_told_to_be_read_by_its_ranking() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(telco()).unwrap();
    let mut lines = text.lines();
    let mut out = format!("{}\n", lines.next().unwrap());
    let mut churners = 0;
    for l in lines {
        if l.ends_with(",Yes") {
            churners += 1;
            if churners > 50 {
                continue;
            }
        }
        out.push_str(l);
        out.push('\n');
    }
    let table = dir.path().join("rare.csv");
    std::fs::write(&table, out).unwrap();
    let exp = run(args(
        "churn-lr",
        format!("csv:{}", table.display()),
        Some(schema_file(dir.path(), &Schema::telco())),
    ))
    .unwrap()
    .remove(0);
    let served = &exp.best.as_ref().unwrap().served;
    assert_eq!(served["recall"], 0.0, "{served:?}");
    assert!(
        exp.report.iter().any(|l| l
            .starts_with("note: the served model flags no customer as churning")
            && l.contains("rank customers by score")),
        "{:?}",
        exp.report
    );
}
