//! `fedcart-client prepare`: runs the merchant's orders export through the
//! orders pipeline and writes what was derived — features, interactions and
//! a summary — so the merchant can inspect it before joining any round.

use std::path::{Path, PathBuf};

use fedcart_common::data::orders::mapping::MappingOverrides;
use fedcart_common::data::orders::{
    self, AmountIs, BadRowPolicy, ChurnConfig, DecimalMark, Delimiter, OrdersMapping,
    TimestampFormat,
};
use serde::Serialize;

/// Arguments of `prepare`. Column flags override the mapping file's entries;
/// without a mapping file, `--customer-col`, `--timestamp-col` and
/// `--amount-col` are required.
#[derive(Debug, Clone, clap::Args)]
pub struct PrepareArgs {
    /// The orders export (CSV, TSV or whitespace-separated, with a header line).
    #[arg(long)]
    pub orders: PathBuf,
    /// A TOML column mapping (see `client/examples/cdnow-mapping.toml`).
    #[arg(long)]
    pub mapping: Option<PathBuf>,
    /// Customer id column.
    #[arg(long)]
    pub customer_col: Option<String>,
    /// Item id column (omit for exports without items: no interactions then).
    #[arg(long)]
    pub item_col: Option<String>,
    /// Order time column.
    #[arg(long)]
    pub timestamp_col: Option<String>,
    /// Order time format: auto, unix_seconds, unix_ms, iso8601, yyyymmdd, spreadsheet_days (serial
    /// days since 1899-12-30), or a strftime pattern such as `%d/%m/%Y %H:%M`.
    #[arg(long)]
    pub timestamp_format: Option<TimestampFormat>,
    /// Quantity column (omit: each row counts as one unit).
    #[arg(long)]
    pub quantity_col: Option<String>,
    /// Line value column.
    #[arg(long)]
    pub amount_col: Option<String>,
    /// What the amount column holds: line_total, or unit_price (multiplied by the quantity
    /// column) [default: line_total].
    #[arg(long)]
    pub amount_is: Option<AmountIs>,
    /// Explicit rating column.
    #[arg(long)]
    pub rating_col: Option<String>,
    /// Refused, with what to do instead: a merchant's agent reads one store's
    /// export, and `prepare` would merge the stores' customers. Kept so the
    /// flag of the simulator's `--partition natural` gets that answer.
    #[arg(long, hide = true)]
    pub merchant_col: Option<String>,
    /// Field separator: comma, tab, semicolon, pipe or whitespace.
    #[arg(long)]
    pub delimiter: Option<Delimiter>,
    /// Decimal mark of the quantity and amount columns: point or comma.
    #[arg(long)]
    pub decimal: Option<DecimalMark>,
    /// History ends at this date (ISO-8601, YYYYMMDD or unix seconds).
    #[arg(long)]
    pub cutoff: String,
    /// A customer churned if they bought nothing this many days after the cutoff.
    #[arg(long, default_value_t = 90, value_parser = clap::value_parser!(u32).range(1..))]
    pub churn_window_days: u32,
    /// Length in days of the "recent" part of the trend feature.
    #[arg(long, default_value_t = 90)]
    pub trend_window_days: u32,
    /// What to do with unreadable rows: fail (stop, naming the row), skip (leave them out and count
    /// them; refused when one reason that points to a setting, such as unreadable dates, leaves
    /// out more than a tenth of the rows) or skip-all (no such limit).
    #[arg(long, default_value = "fail")]
    pub on_bad_row: BadRowPolicy,
    /// Directory to write features.csv, interactions.csv and summary.json into.
    #[arg(long)]
    pub out: PathBuf,
}

/// Why `prepare` stopped. Data errors come from the orders pipeline and name
/// the file, line, column and value.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    /// The mapping file could not be read.
    #[error("reading mapping {}", path.display())]
    ReadMapping {
        /// The mapping file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The mapping file is not a valid column mapping.
    #[error("parsing mapping {}", path.display())]
    ParseMapping {
        /// The mapping file.
        path: PathBuf,
        /// The parser's error (line, column, key).
        #[source]
        source: toml::de::Error,
    },
    /// A column flag that is required without `--mapping` is missing
    /// (the mapping field, e.g. `customer` for `--customer-col`).
    #[error("without --mapping, --{0}-col is required")]
    MissingColumn(&'static str),
    /// The mapping file leaves out a required column and no flag gives it.
    #[error(
        "the mapping {} has no `{field}` column: add `{field} = \"…\"` to it or give \
         --{field}-col",
        path.display()
    )]
    MappingLacks {
        /// The mapping file.
        path: PathBuf,
        /// The mapping key (`customer`, `timestamp` or `amount`).
        field: &'static str,
    },
    /// A merchant (store) column was given (`--merchant-col`, or `merchant`
    /// in the mapping file): a merchant's export is one store's, and the
    /// pipeline would merge the same customer id of different stores.
    #[error(
        "{given} names a store column, which a merchant's agent does not read: it reads one \
         store's export, so the customers of every store in this one would be merged (the same \
         customer id at two stores read as one customer). Give each store's agent its own \
         export: keep the header and that store's rows, e.g. `awk -F, -v s=STORE 'NR == 1 || \
         $N == s' FILE > store.csv` with N the position of `{column}`, and leave the store \
         column out. A multi-store export is for the simulator: `fedcart-sim --data \
         orders:FILE --merchant-col {column} --partition natural` (one merchant per store)"
    )]
    MerchantColumn {
        /// Where it was given: the flag, or the mapping file's key.
        given: String,
        /// The store column.
        column: String,
    },
    /// `--cutoff` is not a date.
    #[error("--cutoff: {0}")]
    Cutoff(String),
    /// `--churn-window-days` is zero.
    #[error("--churn-window-days must be at least 1")]
    ChurnWindow,
    /// No order falls before the cutoff: no customer to learn from.
    #[error(
        "no order falls before --cutoff {cutoff}, so there is no customer to learn from; \
         the orders run from {first} to {last}: give a cutoff after {first}"
    )]
    NothingBeforeCutoff {
        /// The cutoff date.
        cutoff: String,
        /// The first order's date.
        first: String,
        /// The last order's date.
        last: String,
    },
    /// The export holds no order at all.
    #[error("the export holds no orders (a header and nothing else?)")]
    NoOrders,
    /// Reading, deriving or writing the orders data failed.
    #[error(transparent)]
    Orders(#[from] orders::OrdersError),
    /// A cell that does not read, under `--on-bad-row fail`: named with
    /// the two ways on (the error named the cell and nothing to do).
    #[error("{0} (fix that line, or leave such lines out and count them with `--on-bad-row skip`)")]
    BadRow(orders::OrdersError),
    /// The output directory could not be created.
    #[error("creating {}", path.display())]
    CreateOut {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The summary could not be encoded as JSON.
    #[error("encoding the summary")]
    EncodeSummary(#[source] serde_json::Error),
    /// The `[data]` snippet could not be encoded as TOML.
    #[error("encoding the [data] snippet")]
    EncodeSnippet(#[source] toml::ser::Error),
    /// The summary could not be written to standard output.
    #[error("writing to standard output")]
    Stdout(#[source] std::io::Error),
    /// `summary.json` (or the `[data]` snippet) could not be written.
    #[error("writing {}", path.display())]
    WriteSummary {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// What `summary.json` holds.
#[derive(Debug, Serialize)]
struct Summary<'a> {
    orders_file: &'a Path,
    mapping: &'a OrdersMapping,
    on_bad_row: BadRowPolicy,
    read: &'a orders::ReadReport,
    rows_skipped: u64,
    derived: &'a orders::derive::DeriveSummary,
}

/// The file `prepare` writes the `[data]` lines for `merchant.toml` into.
pub const SNIPPET: &str = "merchant-data.toml";

/// The schema of `features.csv`: the customer id, the RFM features and the
/// churn label as `prepare` writes them.
pub fn features_schema() -> fedcart_common::data::tabular::Schema {
    fedcart_common::data::tabular::Schema {
        id: Some("customer_id".into()),
        label: "churned".into(),
        positive: vec!["1".into()],
        negative: vec!["0".into()],
        numeric: orders::derive::FEATURE_NAMES
            .iter()
            .map(|s| s.to_string())
            .collect(),
        categorical: Vec::new(),
        blank_numeric: Default::default(),
        unknown_category: Default::default(),
        decimal: Default::default(),
    }
}

/// The `[data]` section that points an agent at what `prepare` wrote into
/// `out` (absolute paths, so it can be pasted into any `merchant.toml`).
fn data_snippet(out: &Path, interactions: bool) -> Result<String, PrepareError> {
    let abs = std::fs::canonicalize(out).map_err(|source| PrepareError::CreateOut {
        path: out.to_owned(),
        source,
    })?;
    let mut data = toml::Table::new();
    let path = |name: &str| toml::Value::String(abs.join(name).display().to_string());
    data.insert("churn_csv".into(), path("features.csv"));
    if interactions {
        data.insert("ratings_csv".into(), path("interactions.csv"));
    }
    let schema = toml::Value::try_from(features_schema()).map_err(PrepareError::EncodeSnippet)?;
    data.insert("schema".into(), schema);
    let mut doc = toml::Table::new();
    doc.insert("data".into(), toml::Value::Table(data));
    let body = toml::to_string(&doc).map_err(PrepareError::EncodeSnippet)?;
    // It said ratings_csv needed a catalogue (item ids are hashed without
    // one), and not what the agent does differently with these files.
    let ratings = if interactions {
        "# With ratings_csv the recommender is held out by a random split (`data.holdout`, 20 %), no\n\
         # validation slice, on the history before the cutoff; with the export itself\n\
         # (`data.orders_csv` and `[data.orders]`) each customer's latest purchase is the\n\
         # test, the basket before it the validation slice, over the whole history.\n"
    } else {
        ""
    };
    Ok(format!(
        "# `[data]` for merchant.toml, written by `fedcart-client prepare`, to train on the\n\
         # files it wrote (they are for inspection: an agent given the orders export derives\n\
         # the same, and `score` then describes customers as of today, not of the cutoff).\n\
         # The churn model of the run must have num_features = {}.\n{ratings}{body}",
        orders::derive::FEATURE_NAMES.len()
    ))
}

/// Builds the mapping from the file (if any) and the column flags.
pub fn resolve_mapping(args: &PrepareArgs) -> Result<OrdersMapping, PrepareError> {
    // The file is read as settings, so that it may leave out a column a
    // flag gives; the flags win where both name one.
    let file = match &args.mapping {
        Some(path) => {
            let text =
                std::fs::read_to_string(path).map_err(|source| PrepareError::ReadMapping {
                    path: path.clone(),
                    source,
                })?;
            toml::from_str::<MappingOverrides>(&text).map_err(|source| {
                PrepareError::ParseMapping {
                    path: path.clone(),
                    source,
                }
            })?
        }
        None => MappingOverrides::default(),
    };
    let flags = MappingOverrides {
        customer: args.customer_col.clone(),
        item: args.item_col.clone(),
        timestamp: args.timestamp_col.clone(),
        timestamp_format: args.timestamp_format.clone(),
        quantity: args.quantity_col.clone(),
        amount: args.amount_col.clone(),
        amount_is: args.amount_is,
        rating: args.rating_col.clone(),
        merchant: args.merchant_col.clone(),
        delimiter: args.delimiter,
        decimal: args.decimal,
    };
    // The mapping format is the simulator's too, where a store column
    // feeds `--partition natural`; an agent has no use for it.
    let store = match (&flags.merchant, &file.merchant, &args.mapping) {
        (Some(column), _, _) => Some((format!("--merchant-col `{column}`"), column)),
        (None, Some(column), Some(path)) => Some((
            format!(
                "`merchant = \"{column}\"` in the mapping {}",
                path.display()
            ),
            column,
        )),
        _ => None,
    };
    if let Some((given, column)) = store {
        return Err(PrepareError::MerchantColumn {
            given,
            column: column.clone(),
        });
    }
    flags.or(file).apply(None).map_err(|e| match &args.mapping {
        Some(path) => PrepareError::MappingLacks {
            path: path.clone(),
            field: e.field,
        },
        None => PrepareError::MissingColumn(e.field),
    })
}

/// [`run`]'s error as the command line shows it: an error about the orders
/// data already names the file (and line), so it is shown as it is; any
/// other (a flag, the mapping, the output directory) is prefixed with the
/// export being prepared.
pub fn cli_error(err: PrepareError, args: &PrepareArgs) -> anyhow::Error {
    match err {
        PrepareError::Orders(e) => anyhow::Error::new(e),
        e @ PrepareError::BadRow(_) => anyhow::Error::new(e),
        other => anyhow::Error::new(other).context(format!("preparing {}", args.orders.display())),
    }
}

/// Runs `prepare`: reads, derives, writes `features.csv`, `interactions.csv`
/// and `summary.json` into `args.out`, and prints a one-line digest.
pub fn run(args: &PrepareArgs) -> Result<(), PrepareError> {
    let map = resolve_mapping(args)?;
    let cutoff = TimestampFormat::parse_setting(args.cutoff.trim())
        .map_err(|m| PrepareError::Cutoff(m.to_string()))?;
    if args.churn_window_days == 0 {
        return Err(PrepareError::ChurnWindow);
    }
    let (orders, report) =
        orders::read_orders(&args.orders, &map, args.on_bad_row).map_err(|e| match e {
            // Unless the message names a flag that reads the cell already.
            orders::OrdersError::Cell { ref message, .. }
                if args.on_bad_row == BadRowPolicy::Fail
                    && !message.contains("`--")
                    && !message.contains("bad-row policy") =>
            {
                PrepareError::BadRow(e)
            }
            e => PrepareError::Orders(e),
        })?;
    let cfg = ChurnConfig {
        cutoff,
        churn_window_days: args.churn_window_days,
        trend_window_days: args.trend_window_days,
    };
    let Some((first, last)) = orders::time_span(&orders) else {
        return Err(PrepareError::NoOrders);
    };
    if first >= cfg.cutoff {
        let date = orders::derive::format_date;
        return Err(PrepareError::NothingBeforeCutoff {
            cutoff: date(cfg.cutoff),
            first: date(first),
            last: date(last),
        });
    }
    let prepared = orders::derive(&orders, &cfg)?;
    std::fs::create_dir_all(&args.out).map_err(|source| PrepareError::CreateOut {
        path: args.out.clone(),
        source,
    })?;
    prepared.write_features_csv(&args.out.join("features.csv"))?;
    prepared.write_interactions_csv(&args.out.join("interactions.csv"))?;
    let summary = Summary {
        orders_file: &args.orders,
        mapping: &map,
        on_bad_row: args.on_bad_row,
        read: &report,
        rows_skipped: report.rows_skipped(),
        derived: &prepared.summary,
    };
    let path = args.out.join("summary.json");
    let text = serde_json::to_string_pretty(&summary).map_err(PrepareError::EncodeSummary)?;
    std::fs::write(&path, text + "\n")
        .map_err(|source| PrepareError::WriteSummary { path, source })?;
    let snippet = data_snippet(&args.out, prepared.summary.interactions > 0)?;
    let snippet_path = args.out.join(SNIPPET);
    std::fs::write(&snippet_path, &snippet).map_err(|source| PrepareError::WriteSummary {
        path: snippet_path.clone(),
        source,
    })?;
    let s = &prepared.summary;
    fedcart_common::outln!(
        "{}: {} rows read, {} skipped; {} customers, churn rate {:.3} (cutoff {}, {} days); {} interactions; wrote {}",
        args.orders.display(),
        report.rows_read,
        report.rows_skipped(),
        s.customers,
        s.label_rate,
        s.cutoff,
        s.churn_window_days,
        s.interactions,
        args.out.display()
    ).map_err(PrepareError::Stdout)?;
    fedcart_common::outln!(
        "\nfor merchant.toml (also in {}):\n\n{snippet}",
        snippet_path.display()
    )
    .map_err(PrepareError::Stdout)?;
    if let Some(warning) = window_warning((first, last), cfg.cutoff, cfg.churn_window_days) {
        eprintln!("warning: {warning}");
    }
    for note in report.warnings() {
        eprintln!("warning: {}: {note}", args.orders.display());
    }
    Ok(())
}

/// What to tell a merchant whose export ends before the churn window does
/// (`None` when the window is covered): a customer who came back after the
/// export's last order looks churned. Names the dates and the latest cutoff
/// that observes every label, or says that the export is too short for the
/// window.
fn window_warning((first, last): (i64, i64), cutoff: i64, window_days: u32) -> Option<String> {
    use orders::derive::LabelCoverage;
    let date = orders::derive::format_date;
    let fix = match LabelCoverage::latest_cutoff(first, last, window_days) {
        Some(latest) => format!(
            "for labels the export observes, give --cutoff {} or earlier (its last order minus \
             --churn-window-days {window_days})",
            date(latest)
        ),
        None => format!(
            "the export spans {} days, fewer than the {window_days}-day churn window, so no cutoff \
             observes the labels: give a longer export or a shorter --churn-window-days",
            (last - first).div_euclid(86_400)
        ),
    };
    match LabelCoverage::of(last, cutoff, window_days) {
        LabelCoverage::Covered => None,
        LabelCoverage::Nothing => Some(format!(
            "no order falls after the cutoff {} (the export ends {}), so every customer is labelled \
             churned and the churn labels say nothing; the interactions are unaffected; {fix}",
            date(cutoff),
            date(last)
        )),
        LabelCoverage::Partial { days } => Some(format!(
            "the export ends {}, {days} of the {window_days} days of the churn window after the \
             cutoff {}: a customer who comes back later is labelled churned; {fix}",
            date(last),
            date(cutoff)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_churn_window_the_export_does_not_cover_is_explained_with_the_cutoff_that_fixes_it() {
        let day = 86_400;
        let jan_1 = 1_483_228_800; // 2017-01-01
        // Covered: the export runs to the end of the 90-day window.
        let year_before = jan_1 - 365 * day;
        assert_eq!(
            window_warning((year_before, jan_1 + 95 * day), jan_1, 90),
            None
        );
        // Partly covered: 30 of 90 days.
        let partly = window_warning((year_before, jan_1 + 30 * day), jan_1, 90).unwrap();
        assert!(
            partly.contains("the export ends 2017-01-31, 30 of the 90 days")
                && partly.contains("--cutoff 2016-11-02 or earlier"),
            "{partly}"
        );
        // Nothing after the cutoff: every label is "churned".
        let none = window_warning((year_before, jan_1 - 10 * day), jan_1, 90).unwrap();
        assert!(
            none.starts_with(
                "no order falls after the cutoff 2017-01-01 (the export ends 2016-12-22)"
            ) && none.contains("every customer is labelled churned")
                && none.contains("--cutoff 2016-09-23 or earlier"),
            "{none}"
        );
        // An export shorter than the window: no cutoff helps.
        let short = window_warning((jan_1, jan_1 + 20 * day), jan_1 + 5 * day, 90).unwrap();
        assert!(
            short.contains("the export spans 20 days, fewer than the 90-day churn window"),
            "{short}"
        );
    }

    fn args(dir: &Path, orders: PathBuf) -> PrepareArgs {
        PrepareArgs {
            orders,
            mapping: None,
            customer_col: Some("customer".into()),
            item_col: Some("sku".into()),
            timestamp_col: Some("placed_at".into()),
            timestamp_format: None,
            quantity_col: Some("qty".into()),
            amount_col: Some("total".into()),
            amount_is: None,
            rating_col: None,
            merchant_col: None,
            delimiter: None,
            decimal: None,
            cutoff: "2024-03-01".into(),
            churn_window_days: 30,
            trend_window_days: 90,
            on_bad_row: BadRowPolicy::Skip,
            out: dir.join("out"),
        }
    }

    #[test]
    fn prepare_writes_features_interactions_and_summary() {
        let dir = tempfile::tempdir().unwrap();
        let orders = dir.path().join("orders.csv");
        std::fs::write(
            &orders,
            "customer,sku,placed_at,qty,total\n\
             alice,A1,2024-01-10T10:00:00Z,2,20.00\n\
             alice,B2,2024-02-10,1,5.50\n\
             bob,A1,20240115,1,10\n\
             bob,A1,not-a-date,1,10\n\
             alice,C3,2024-03-05,1,7\n\
             carol,B2,2024-03-10,1,3\n",
        )
        .unwrap();
        let a = args(dir.path(), orders);
        run(&a).unwrap();
        let features = std::fs::read_to_string(a.out.join("features.csv")).unwrap();
        let lines: Vec<&str> = features.lines().collect();
        assert_eq!(
            lines[0],
            "customer_id,recency_days,frequency,monetary,tenure_days,mean_basket_value,mean_gap_days,trend,total_quantity,churned"
        );
        // alice bought again within 30 days of the cutoff; bob did not; carol
        // has no history before the cutoff and is not a row.
        assert_eq!(lines.len(), 3);
        assert!(
            lines[1].starts_with("alice,") && lines[1].ends_with(",0"),
            "{}",
            lines[1]
        );
        assert!(
            lines[2].starts_with("bob,46,1,10,46,10,46,") && lines[2].ends_with(",1"),
            "{}",
            lines[2]
        );
        let inter = std::fs::read_to_string(a.out.join("interactions.csv")).unwrap();
        assert_eq!(
            inter,
            "user,item,value,timestamp\nalice,A1,2,1704880800\nalice,B2,1,1707523200\nbob,A1,1,1705276800\n"
        );
        let summary: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(a.out.join("summary.json")).unwrap())
                .unwrap();
        assert_eq!(summary["read"]["rows_read"], 6);
        assert_eq!(summary["read"]["rows_ok"], 5);
        assert_eq!(summary["read"]["skipped"]["bad_timestamp"], 1);
        assert_eq!(summary["rows_skipped"], 1);
        assert_eq!(summary["derived"]["customers"], 2);
        assert_eq!(summary["derived"]["label_rate"], 0.5);
        assert_eq!(summary["derived"]["first_order"], "2024-01-10");
        assert_eq!(summary["derived"]["last_order"], "2024-03-10");
        assert_eq!(summary["derived"]["interactions"], 3);

        // The `[data]` snippet makes a merchant.toml that loads the features.
        let snippet = std::fs::read_to_string(a.out.join(SNIPPET)).unwrap();
        let merchant = dir.path().join("merchant.toml");
        std::fs::write(
            &merchant,
            format!("coordinator = \"http://127.0.0.1:1\"\nmerchant_id = \"m0\"\n{snippet}"),
        )
        .unwrap();
        let cfg = crate::config::AgentConfig::load_with_env(&merchant, |_| None).unwrap();
        let ds = crate::data::CustomerTable::from_config(&cfg)
            .unwrap()
            .load()
            .unwrap();
        assert_eq!(ds.ids, vec!["alice", "bob"]);
        assert_eq!(ds.y.to_vec(), vec![0.0, 1.0]);
        assert_eq!(
            cfg.data.ratings_csv,
            Some(
                std::fs::canonicalize(&a.out)
                    .unwrap()
                    .join("interactions.csv")
            )
        );
        let rows =
            fedcart_common::data::movielens::load_ratings(cfg.data.ratings_csv.as_ref().unwrap())
                .unwrap();
        assert_eq!(rows.len(), 3, "the interactions read as ratings");
    }

    /// A mapping file that names some columns, and flags for the rest
    /// ("later ones winning"): the file used to be refused whole for a
    /// missing key.
    #[test]
    fn a_partial_mapping_file_is_completed_by_the_column_flags() {
        let dir = tempfile::tempdir().unwrap();
        let mapping = dir.path().join("m.toml");
        std::fs::write(&mapping, "customer = \"cust\"\ntimestamp = \"day\"\n").unwrap();
        let mut a = args(dir.path(), dir.path().join("orders.csv"));
        a.mapping = Some(mapping.clone());
        (a.customer_col, a.item_col, a.timestamp_col, a.quantity_col) = (None, None, None, None);
        a.amount_col = Some("amt".into());
        let map = resolve_mapping(&a).unwrap();
        assert_eq!(
            (
                map.customer.as_str(),
                map.timestamp.as_str(),
                map.amount.as_str()
            ),
            ("cust", "day", "amt")
        );
        // A flag wins over the file.
        a.customer_col = Some("buyer".into());
        assert_eq!(resolve_mapping(&a).unwrap().customer, "buyer");
        a.amount_col = None;
        let e = resolve_mapping(&a).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "the mapping {} has no `amount` column: add `amount = \"…\"` to it or give \
                 --amount-col",
                mapping.display()
            )
        );
    }

    /// A store column was taken and ignored, so the same customer id at two
    /// stores was read as one customer (528 customers for 990 store and
    /// customer pairs): refused from the flag and from a mapping file.
    #[test]
    fn a_store_column_is_refused_with_how_to_split_the_export() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = args(dir.path(), dir.path().join("orders.csv"));
        a.merchant_col = Some("store".into());
        let e = resolve_mapping(&a).unwrap_err().to_string();
        assert!(
            e.starts_with("--merchant-col `store` names a store column")
                && e.contains("one store's export")
                && e.contains("with N the position of `store`")
                && e.contains("--merchant-col store --partition natural"),
            "{e}"
        );
        let mapping = dir.path().join("m.toml");
        std::fs::write(&mapping, "merchant = \"shop\"\n").unwrap();
        a.merchant_col = None;
        a.mapping = Some(mapping.clone());
        let e = resolve_mapping(&a).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!(
                "`merchant = \"shop\"` in the mapping {} names a store column",
                mapping.display()
            )),
            "{e}"
        );
    }

    #[test]
    fn prepare_fails_on_a_bad_row_naming_it_and_reads_toml_mappings() {
        let dir = tempfile::tempdir().unwrap();
        let orders = dir.path().join("orders.tsv");
        std::fs::write(&orders, "cust\tday\tamt\nx\t20240101\t3\ny\t2024011\t4\n").unwrap();
        let mapping = dir.path().join("m.toml");
        std::fs::write(
            &mapping,
            "customer = \"cust\"\ntimestamp = \"day\"\ntimestamp_format = \"yyyymmdd\"\namount = \"amt\"\ndelimiter = \"tab\"\n",
        )
        .unwrap();
        let mut a = args(dir.path(), orders.clone());
        a.mapping = Some(mapping);
        (
            a.customer_col,
            a.item_col,
            a.timestamp_col,
            a.quantity_col,
            a.amount_col,
        ) = (None, None, None, None, None);
        a.on_bad_row = BadRowPolicy::Fail;
        let err = run(&a).unwrap_err();
        let shown = format!(
            "{}: line 3, column `day`: `2024011` is not a YYYYMMDD date (fix that line, or \
             leave such lines out and count them with `--on-bad-row skip`)",
            orders.display()
        );
        assert_eq!(format!("{err:#}"), shown);
        // The command line names the file once.
        assert_eq!(format!("{:#}", cli_error(err, &a)), shown);
        assert!(!a.out.exists(), "nothing is written after a failure");
        // A message that already says how to go on is not told twice.
        std::fs::write(
            &orders,
            "cust\tday\tamt\nc1\t20240101\t5\nc2\t19700101\t3\n",
        )
        .unwrap();
        let err = format!("{:#}", run(&a).unwrap_err());
        assert!(
            err.ends_with(
                "is a placeholder date, not when the order was placed: correct the line, or \
                 the bad-row policy `skip` leaves such rows out and counts them"
            ),
            "{err}"
        );
        // An error that names no file is prefixed with the export's.
        a.churn_window_days = 0;
        assert_eq!(
            format!("{:#}", cli_error(run(&a).unwrap_err(), &a)),
            format!(
                "preparing {}: --churn-window-days must be at least 1",
                orders.display()
            )
        );
    }

    /// A cutoff before every order (or an export of only a header) leaves
    /// no customer: refused with the dates, nothing written.
    #[test]
    fn prepare_refuses_a_cutoff_before_every_order() {
        let dir = tempfile::tempdir().unwrap();
        let orders = dir.path().join("orders.csv");
        std::fs::write(
            &orders,
            "customer,sku,placed_at,qty,total\n\
             alice,A1,2024-04-10,2,20.00\n\
             bob,B2,2024-05-02,1,5.50\n",
        )
        .unwrap();
        let a = args(dir.path(), orders.clone());
        assert_eq!(
            format!("{:#}", cli_error(run(&a).unwrap_err(), &a)),
            format!(
                "preparing {}: no order falls before --cutoff 2024-03-01, so there is no \
                 customer to learn from; the orders run from 2024-04-10 to 2024-05-02: give a \
                 cutoff after 2024-04-10",
                orders.display()
            )
        );
        assert!(!a.out.exists(), "nothing is written");
        std::fs::write(&orders, "customer,sku,placed_at,qty,total\n").unwrap();
        assert!(matches!(run(&a), Err(PrepareError::NoOrders)));
    }

    /// A European spreadsheet export: `;` between fields, day-first dates,
    /// decimal commas and a currency sign. Without the flags the first
    /// amount is refused with the flag that reads it; with them the export
    /// prepares like an ISO one.
    #[test]
    fn prepare_reads_a_european_export_with_pattern_and_decimal_flags() {
        let dir = tempfile::tempdir().unwrap();
        let orders = dir.path().join("orders.csv");
        std::fs::write(
            &orders,
            "customer;sku;placed_at;qty;total\n\
             alice;A1;10/01/2024 10:00;2;20,00 €\n\
             alice;B2;10/02/2024 09:30;1;1.005,50 €\n\
             bob;A1;15/01/2024 00:00;1;10 €\n",
        )
        .unwrap();
        let mut a = args(dir.path(), orders.clone());
        a.delimiter = Some(Delimiter::Semicolon);
        a.timestamp_format = Some("%d/%m/%Y %H:%M".parse().unwrap());
        a.on_bad_row = BadRowPolicy::Fail;
        let err = run(&a).unwrap_err();
        assert_eq!(
            format!("{err:#}"),
            format!(
                "{}: line 2, column `total`: `20,00 €` is not a number with a decimal point \
                 (for a decimal comma: `--decimal comma`, or `decimal = \"comma\"` in the mapping: `[data.orders]` in merchant.toml)",
                orders.display()
            )
        );
        a.decimal = Some("comma".parse().unwrap());
        run(&a).unwrap();
        let features = std::fs::read_to_string(a.out.join("features.csv")).unwrap();
        let lines: Vec<&str> = features.lines().collect();
        // alice: 2 orders worth 20 + 1005.5 before the cutoff (2024-03-01).
        let alice: Vec<&str> = lines[1].split(',').collect();
        assert_eq!(
            alice[..4],
            ["alice", "19.604166", "2", "1025.5"],
            "{}",
            lines[1]
        );
        assert!(
            lines[2].starts_with("bob,46,1,10,46,10,46,"),
            "{}",
            lines[2]
        );
        let inter = std::fs::read_to_string(a.out.join("interactions.csv")).unwrap();
        assert_eq!(
            inter,
            "user,item,value,timestamp\nalice,A1,2,1704880800\nalice,B2,1,1707557400\nbob,A1,1,1705276800\n"
        );
    }

    #[test]
    fn the_bundled_cdnow_mapping_parses_to_the_library_mapping() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/cdnow-mapping.toml");
        let text = std::fs::read_to_string(path).unwrap();
        let map: OrdersMapping = toml::from_str(&text).unwrap();
        assert_eq!(map, OrdersMapping::cdnow());
    }
}
