//! Schema-driven tabular data: CSV rows → a dense feature matrix and labels.
//!
//! A [`Schema`] names an id column, a label column, numeric columns and
//! categorical columns with a declared vocabulary (one-hot encoded in that
//! order). Every malformed value is reported with the file, the 1-based line
//! and the column name, never with a panic.

use std::path::{Path, PathBuf};

use ndarray::{Array1, Array2};

use crate::data::cells::DecimalMark;
use crate::data::csv_lines::line_records;

mod draft;
pub use draft::{Draft, DraftOptions};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// A categorical column and its vocabulary; the one-hot block follows the
/// vocabulary's order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Categorical {
    /// Column name in the CSV header.
    pub name: String,
    /// Allowed values, in one-hot order.
    pub vocabulary: Vec<String>,
}

/// What a blank numeric cell means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum BlankNumeric {
    /// A blank cell is an error.
    #[default]
    Error,
    /// A blank cell is read as 0 (Telco's `TotalCharges` is blank exactly
    /// when `tenure` is 0, so nothing has been charged yet).
    Zero,
}

/// What a categorical cell outside its column's vocabulary means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum UnknownCategory {
    /// The cell is an error naming the value and the vocabulary.
    #[default]
    Error,
    /// The column's one-hot block stays all zeros. For schemas shared by
    /// merchants whose tables hold values another's did not (a drafted
    /// schema sets it).
    Zeros,
}

/// The columns of a tabular dataset and how to encode them.
///
/// Its TOML form is what a merchant writes under `[data.schema]` and what
/// `fedcart-sim --schema FILE` reads; unknown keys are refused, and
/// [`Schema::check`] holds the rules a usable schema follows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schema {
    /// Column holding the row's identifier (e.g. customer id); without one,
    /// rows are identified by their 1-based row number.
    #[serde(default)]
    pub id: Option<String>,
    /// Column holding the binary label.
    pub label: String,
    /// Label values read as the positive class (1); every other declared value is 0.
    pub positive: Vec<String>,
    /// Label values read as the negative class (0).
    pub negative: Vec<String>,
    /// Numeric feature columns, in feature order (none when left out).
    #[serde(default)]
    pub numeric: Vec<String>,
    /// Categorical feature columns, one-hot encoded after the numeric ones
    /// (none when left out).
    #[serde(default)]
    pub categorical: Vec<Categorical>,
    /// Policy for blank numeric cells.
    #[serde(default)]
    pub blank_numeric: BlankNumeric,
    /// Policy for categorical values outside the vocabulary (and blank
    /// categorical cells).
    #[serde(default)]
    pub unknown_category: UnknownCategory,
    /// How numeric cells write a fraction: `point` (default: `1,234.50`)
    /// or `comma` (`1.234,50`, as European spreadsheets save them).
    #[serde(default, skip_serializing_if = "DecimalMark::is_point")]
    pub decimal: DecimalMark,
}

/// A loaded dataset: one row per example.
#[derive(Debug, Clone, PartialEq)]
pub struct TabularDataset {
    /// Row identifiers.
    pub ids: Vec<String>,
    /// Features, `rows × schema.num_features()`.
    pub x: Array2<f32>,
    /// Labels in {0, 1}.
    pub y: Array1<f32>,
}

/// Errors while reading tabular data.
#[derive(Debug, Error)]
pub enum DataError {
    /// The file could not be opened or read.
    #[error("{file}: {source}")]
    Io {
        /// The file.
        file: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A required column is missing from the header.
    #[error(
        "{file}: line 1: missing column `{}` (header has: {}){}",
        found.column,
        found.header,
        found.hint
    )]
    MissingColumn {
        /// The file.
        file: PathBuf,
        /// The column and the header (boxed: errors travel in `Result`s).
        found: Box<MissingColumn>,
    },
    /// A cell could not be parsed.
    #[error("{file}: line {line}, column `{column}`: {message}")]
    Cell {
        /// The file.
        file: PathBuf,
        /// 1-based line number.
        line: u64,
        /// Column name.
        column: String,
        /// What was wrong.
        message: String,
    },
    /// The CSV structure itself is broken (wrong field count, bad quoting).
    #[error("{file}: line {line}: {message}")]
    Row {
        /// The file.
        file: PathBuf,
        /// 1-based line number.
        line: u64,
        /// What was wrong.
        message: String,
    },
    /// A schema could not be drafted from the table.
    #[error("{file}: {message}")]
    Draft {
        /// The table.
        file: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// The table cannot settle one of the draft's choices; an option of
    /// `fedcart-client schema` gives it. Kept apart from [`DataError::Draft`]
    /// so that a program without that option (the simulator) can name the
    /// command that has it.
    #[error("{file}: cannot tell {what}: give it with `{option}` {detail}")]
    DraftNeeds {
        /// The table.
        file: PathBuf,
        /// What the table cannot settle (`which column is the label`).
        what: &'static str,
        /// The option that settles it, with its placeholder (`--label COLUMN`).
        option: &'static str,
        /// What the table offers, in parentheses, and any note after it.
        detail: String,
    },
    /// The file has a header but no rows.
    #[error("{file}: no data rows")]
    Empty {
        /// The file.
        file: PathBuf,
    },
}

/// `path`, buffered, or the error naming it.
fn open(path: &Path) -> Result<std::io::BufReader<std::fs::File>, DataError> {
    std::fs::File::open(path)
        .map(std::io::BufReader::new)
        .map_err(|source| DataError::Io {
            file: path.into(),
            source,
        })
}

/// Whether a table's label column must hold a label on every row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Labels {
    /// Training and evaluation: every row's label is positive or negative.
    Required,
    /// Scoring: labels are not needed (see [`Schema::load_features_delimited`]).
    IfKnown,
}

impl Schema {
    /// The schema of the IBM Telco customer churn CSV, as shipped.
    pub fn telco() -> Self {
        let yes_no = |name: &str| Categorical {
            name: name.into(),
            vocabulary: vec!["No".into(), "Yes".into()],
        };
        let yes_no_nos = |name: &str, none: &str| Categorical {
            name: name.into(),
            vocabulary: vec!["No".into(), "Yes".into(), none.into()],
        };
        Self {
            id: Some("customerID".into()),
            label: "Churn".into(),
            positive: vec!["Yes".into()],
            negative: vec!["No".into()],
            numeric: vec![
                "SeniorCitizen".into(),
                "tenure".into(),
                "MonthlyCharges".into(),
                "TotalCharges".into(),
            ],
            categorical: vec![
                Categorical {
                    name: "gender".into(),
                    vocabulary: vec!["Female".into(), "Male".into()],
                },
                yes_no("Partner"),
                yes_no("Dependents"),
                yes_no("PhoneService"),
                yes_no_nos("MultipleLines", "No phone service"),
                Categorical {
                    name: "InternetService".into(),
                    vocabulary: vec!["DSL".into(), "Fiber optic".into(), "No".into()],
                },
                yes_no_nos("OnlineSecurity", "No internet service"),
                yes_no_nos("OnlineBackup", "No internet service"),
                yes_no_nos("DeviceProtection", "No internet service"),
                yes_no_nos("TechSupport", "No internet service"),
                yes_no_nos("StreamingTV", "No internet service"),
                yes_no_nos("StreamingMovies", "No internet service"),
                Categorical {
                    name: "Contract".into(),
                    vocabulary: vec![
                        "Month-to-month".into(),
                        "One year".into(),
                        "Two year".into(),
                    ],
                },
                yes_no("PaperlessBilling"),
                Categorical {
                    name: "PaymentMethod".into(),
                    vocabulary: vec![
                        "Bank transfer (automatic)".into(),
                        "Credit card (automatic)".into(),
                        "Electronic check".into(),
                        "Mailed check".into(),
                    ],
                },
            ],
            blank_numeric: BlankNumeric::Zero,
            unknown_category: UnknownCategory::Error,
            decimal: Default::default(),
        }
    }

    /// The rules a schema must follow to be readable: no column used twice,
    /// at least one feature, a label value in at most one class and at least
    /// one in each, no empty or repeated vocabulary entry.
    pub fn check(&self) -> Result<(), String> {
        let mut seen = std::collections::BTreeSet::new();
        let columns = self
            .id
            .iter()
            .chain([&self.label])
            .chain(&self.numeric)
            .chain(self.categorical.iter().map(|c| &c.name));
        for c in columns {
            if !seen.insert(c.as_str()) {
                return Err(format!("column `{c}` is used twice in the schema"));
            }
        }
        if self.num_features() == 0 {
            return Err("the schema declares no `numeric` or `categorical` feature".into());
        }
        if self.positive.is_empty() || self.negative.is_empty() {
            return Err("`positive` and `negative` each need at least one label value".into());
        }
        if let Some(v) = self.positive.iter().find(|v| self.negative.contains(v)) {
            return Err(format!("label value `{v}` is both positive and negative"));
        }
        for c in &self.categorical {
            let distinct: std::collections::BTreeSet<_> = c.vocabulary.iter().collect();
            if c.vocabulary.is_empty() || distinct.len() != c.vocabulary.len() {
                return Err(format!(
                    "categorical `{}` needs a non-empty vocabulary without repeats",
                    c.name
                ));
            }
        }
        Ok(())
    }

    /// The encoded features' names, in feature order: each numeric column,
    /// then `column=value` for each vocabulary entry of each categorical one.
    pub fn feature_names(&self) -> Vec<String> {
        self.numeric
            .iter()
            .cloned()
            .chain(
                self.categorical
                    .iter()
                    .flat_map(|c| c.vocabulary.iter().map(move |v| format!("{}={v}", c.name))),
            )
            .collect()
    }

    /// Number of encoded features: numeric columns plus one-hot widths.
    pub fn num_features(&self) -> usize {
        self.numeric.len()
            + self
                .categorical
                .iter()
                .map(|c| c.vocabulary.len())
                .sum::<usize>()
    }

    /// Reads a comma-separated file with a header row.
    pub fn load_csv(&self, path: &Path) -> Result<TabularDataset, DataError> {
        self.load_csv_delimited(path, b',')
    }

    /// Reads a file with a header row whose fields are separated by
    /// `delimiter` (`,`, `\t`, `;` or `|`, with CSV quoting).
    pub fn load_csv_delimited(
        &self,
        path: &Path,
        delimiter: u8,
    ) -> Result<TabularDataset, DataError> {
        self.read_with(open(path)?, path, delimiter, Labels::Required)
    }

    /// Reads CSV from any reader; `path` is used only in error messages.
    pub fn read_csv<R: std::io::Read>(
        &self,
        reader: R,
        path: &Path,
    ) -> Result<TabularDataset, DataError> {
        self.read_delimited(reader, path, b',')
    }

    /// [`Schema::read_csv`] with another field separator.
    pub fn read_delimited<R: std::io::Read>(
        &self,
        reader: R,
        path: &Path,
        delimiter: u8,
    ) -> Result<TabularDataset, DataError> {
        self.read_with(reader, path, delimiter, Labels::Required)
    }

    /// [`Schema::load_csv_delimited`] for scoring: the label column may be
    /// missing, and a row whose label is blank or neither positive nor
    /// negative (a customer whose outcome is not known yet, the very
    /// customers a churn score is for) reads as label 0. The features are
    /// read and checked as for training.
    pub fn load_features_delimited(
        &self,
        path: &Path,
        delimiter: u8,
    ) -> Result<TabularDataset, DataError> {
        self.read_with(open(path)?, path, delimiter, Labels::IfKnown)
    }

    /// [`Schema::load_csv_delimited`], with a note per categorical column
    /// whose cells hold values outside its vocabulary (read as none of its
    /// values under `unknown_category = "zeros"`): a table with a category
    /// the schema never saw is otherwise read without a word.
    pub fn load_csv_noting(
        &self,
        path: &Path,
        delimiter: u8,
    ) -> Result<(TabularDataset, Vec<String>), DataError> {
        self.read_noting(open(path)?, path, delimiter, Labels::Required)
    }

    /// [`Schema::load_features_delimited`] with the notes of
    /// [`Schema::load_csv_noting`].
    pub fn load_features_noting(
        &self,
        path: &Path,
        delimiter: u8,
    ) -> Result<(TabularDataset, Vec<String>), DataError> {
        self.read_noting(open(path)?, path, delimiter, Labels::IfKnown)
    }

    fn read_with<R: std::io::Read>(
        &self,
        reader: R,
        path: &Path,
        delimiter: u8,
        label_use: Labels,
    ) -> Result<TabularDataset, DataError> {
        Ok(self.read_noting(reader, path, delimiter, label_use)?.0)
    }

    fn read_noting<R: std::io::Read>(
        &self,
        reader: R,
        path: &Path,
        delimiter: u8,
        label_use: Labels,
    ) -> Result<(TabularDataset, Vec<String>), DataError> {
        let (header, records) = table(reader, path, delimiter)?;
        let col = |name: &str| header.position(path, name, name);
        let id_col = self.id.as_deref().map(col).transpose()?;
        let label_col = match label_use {
            Labels::Required => Some(col(&self.label)?),
            // Scoring reads a table without labels; a label column given
            // twice is still refused.
            Labels::IfKnown => match col(&self.label) {
                Ok(c) => Some(c),
                Err(DataError::MissingColumn { .. }) => None,
                Err(e) => return Err(e),
            },
        };
        let numeric_cols = self
            .numeric
            .iter()
            .map(|n| col(n))
            .collect::<Result<Vec<_>, _>>()?;
        let cat_cols = self
            .categorical
            .iter()
            .map(|c| col(&c.name))
            .collect::<Result<Vec<_>, _>>()?;

        let width = self.num_features();
        let mut ids = Vec::new();
        let mut feats: Vec<f32> = Vec::new();
        let mut labels = Vec::new();
        // The line each customer id was first read on.
        let mut seen: std::collections::HashMap<String, u64> = Default::default();
        // Per categorical column: values outside its vocabulary, counted
        // (blanks and placeholders such as `NA` are missing values, not
        // categories, and a drafted schema says so already).
        let mut unseen: Vec<std::collections::BTreeMap<String, u64>> =
            vec![Default::default(); self.categorical.len()];
        // Scoring reads a label outside positive/negative as not known yet:
        // such labels counted, with one for the note, and the known ones.
        let (mut odd_labels, mut known_labels, mut odd_example) = (0u64, 0u64, String::new());
        // Per numeric column: blank cells, and (read with a decimal point in
        // a table not separated by commas) the first cell a decimal comma
        // reads as another number (`1.890`), unless a cell only the point
        // reads (`12.50`) settles it: see [`NumericCells::notes`].
        let mut cells = NumericCells::new(self.numeric.len());
        let check_mark = self.decimal == DecimalMark::Point && delimiter != b',';
        for record in records {
            let (line, record) = record?;
            let cell_err = |column: &str, message: String| DataError::Cell {
                file: path.into(),
                line,
                column: column.into(),
                message,
            };
            let start = feats.len();
            feats.resize(start + width, 0.0);
            let row = &mut feats[start..];
            for (k, (&c, name)) in numeric_cols.iter().zip(&self.numeric).enumerate() {
                let raw = record.get(c).unwrap_or("").trim();
                if raw.is_empty() {
                    cells.blanks[k] += 1;
                } else if check_mark {
                    cells.see(k, line, raw);
                }
                row[k] = if raw.is_empty() {
                    match self.blank_numeric {
                        BlankNumeric::Zero => 0.0,
                        BlankNumeric::Error => {
                            return Err(cell_err(name, "blank numeric value".into()));
                        }
                    }
                } else {
                    let v = self.decimal.parse(raw).ok_or_else(|| {
                        let other = match self.decimal {
                            DecimalMark::Point => DecimalMark::Comma,
                            DecimalMark::Comma => DecimalMark::Point,
                        };
                        let hint = match other.parse(raw) {
                            Some(v) if v.is_finite() => format!(
                                " with a decimal {} (this one has a decimal {}: `decimal = \"{}\"` \
                                 under [data.schema], `decimal` in a --schema file)",
                                self.decimal.name(),
                                other.name(),
                                other.name()
                            ),
                            // What the draft says of such a column, at
                            // the cell the reader stopped on.
                            _ if draft::is_placeholder(raw) => {
                                let blank = match self.blank_numeric {
                                    BlankNumeric::Zero => {
                                        "this schema's `blank_numeric = \"zero\"` \
                                                           reads blank cells as 0"
                                    }
                                    BlankNumeric::Error => {
                                        "with `blank_numeric = \"zero\"` in the \
                                                            schema blank cells read as 0"
                                    }
                                };
                                format!(
                                    ", a placeholder for a missing value: blank such cells \
                                     ({blank}) or fill in the numbers"
                                )
                            }
                            _ => String::new(),
                        };
                        cell_err(name, format!("`{raw}` is not a number{hint}"))
                    })?;
                    if !v.is_finite() {
                        // `1e308` parses as an f64 but not into the f32
                        // the models hold: say so rather than "not finite".
                        let why = if raw
                            .trim_start_matches(['+', '-'])
                            .parse::<f64>()
                            .is_ok_and(f64::is_finite)
                        {
                            "is beyond the range of the models' 32-bit numbers (±3.4e38)"
                        } else {
                            "is not finite"
                        };
                        return Err(cell_err(name, format!("`{raw}` {why}")));
                    }
                    if f64::from(v.abs()) > crate::data::standardize::MAX_FEATURE_MAGNITUDE {
                        return Err(cell_err(
                            name,
                            format!(
                                "`{raw}` is beyond ±1e15, the largest value the models \
                                 standardise (its square must stay within their 32-bit numbers)"
                            ),
                        ));
                    }
                    v
                };
            }
            let mut offset = self.numeric.len();
            for ((&c, cat), unseen) in cat_cols.iter().zip(&self.categorical).zip(&mut unseen) {
                let raw = record.get(c).unwrap_or("").trim();
                match cat.vocabulary.iter().position(|v| v == raw) {
                    Some(pos) => row[offset + pos] = 1.0,
                    None if self.unknown_category == UnknownCategory::Zeros => {
                        if !raw.is_empty() && !draft::is_placeholder(raw) {
                            *unseen.entry(raw.to_string()).or_default() += 1;
                        }
                    }
                    None => {
                        return Err(cell_err(
                            &cat.name,
                            format!(
                                "`{raw}` is not in the vocabulary {:?} (`unknown_category = \"zeros\"` \
                                 in the schema reads such values as none of them)",
                                cat.vocabulary
                            ),
                        ));
                    }
                }
                offset += cat.vocabulary.len();
            }
            let raw_label = label_col.and_then(|c| record.get(c)).unwrap_or("").trim();
            let known = self
                .positive
                .iter()
                .chain(&self.negative)
                .any(|p| p == raw_label);
            if known {
                known_labels += 1;
            } else if !raw_label.is_empty() {
                odd_labels += 1;
                if odd_example.is_empty() {
                    odd_example = raw_label.chars().take(40).collect();
                }
            }
            let y = if self.positive.iter().any(|p| p == raw_label) {
                1.0
            } else if self.negative.iter().any(|p| p == raw_label) || label_use == Labels::IfKnown {
                0.0
            } else {
                return Err(cell_err(
                    &self.label,
                    if raw_label.is_empty() {
                        // "label `` is neither …" read as a quoting slip.
                        format!(
                            "blank label: a row to train or evaluate on needs positive {:?} or \
                             negative {:?} (a customer whose outcome is not known yet is for \
                             `score`, which reads blank labels as not known)",
                            self.positive, self.negative
                        )
                    } else {
                        format!(
                            "label `{raw_label}` is neither positive {:?} nor negative {:?}",
                            self.positive, self.negative
                        )
                    },
                ));
            };
            labels.push(y);
            ids.push(match id_col {
                Some(c) => {
                    let id = record.get(c).unwrap_or("").trim();
                    if let Some(first) = seen.insert(id.to_string(), line) {
                        let column = self.id.as_deref().unwrap_or_default();
                        return Err(cell_err(
                            column,
                            format!(
                                "customer `{id}` is already on line {first}: each customer is \
                                 one row (a table with repeated rows would weigh those \
                                 customers twice, and scores would list them twice)"
                            ),
                        ));
                    }
                    id.to_string()
                }
                None => (ids.len() + 1).to_string(),
            });
        }
        if ids.is_empty() {
            return Err(DataError::Empty { file: path.into() });
        }
        let n = ids.len();
        let mut notes: Vec<String> = self
            .categorical
            .iter()
            .zip(unseen)
            .filter(|(_, values)| !values.is_empty())
            .map(|(cat, values)| unseen_note(path, &cat.name, &values, n))
            .collect();
        notes.extend(
            self.categorical
                .iter()
                .filter_map(|cat| id_like_note(path, cat, n)),
        );
        notes.extend(cells.notes(path, &self.numeric));
        // Every label there is, outside the schema's values: a schema of
        // another table (`Yes`/`No` read against `1`/`0`), all read as not
        // known, without a word.
        if label_use == Labels::IfKnown && odd_labels > 0 && known_labels == 0 {
            notes.push(format!(
                "{}: column `{}`: none of its {odd_labels} labels is positive {:?} or negative \
                 {:?} (e.g. `{odd_example}`), so all read as not known yet; if the table does \
                 hold outcomes, the schema's `positive`/`negative` are another table's",
                path.display(),
                self.label,
                self.positive,
                self.negative
            ));
        }
        let x = Array2::from_shape_vec((n, width), feats).expect("rows × width values were pushed");
        let ds = TabularDataset {
            ids,
            x,
            y: Array1::from(labels),
        };
        Ok((ds, notes))
    }
}

/// What the reader saw of the numeric columns' cells, for notes a merchant
/// should read: blank cells read as 0, and numbers whose decimal mark the
/// table does not settle.
struct NumericCells {
    blanks: Vec<u64>,
    ambiguous: Vec<Option<(u64, String)>>,
    settled: Vec<bool>,
}

impl NumericCells {
    fn new(columns: usize) -> Self {
        Self {
            blanks: vec![0; columns],
            ambiguous: vec![None; columns],
            settled: vec![false; columns],
        }
    }

    /// Notes the non-blank cell `raw` of column `k` on `line`, read with a
    /// decimal point.
    fn see(&mut self, k: usize, line: u64, raw: &str) {
        if self.settled[k] {
            return;
        }
        if DecimalMark::ambiguous(raw) {
            self.ambiguous[k].get_or_insert_with(|| (line, raw.to_string()));
        } else if raw.contains('.') {
            self.settled[k] = true;
        }
    }

    /// A note of the blank cells read as 0, per column (a customer table
    /// with 57 blank `tenure` cells loaded without a word), and one of the
    /// first column whose numbers read as others with a decimal comma (a
    /// semicolon export's `1.890` was read as 1.89 without a word).
    fn notes(&self, path: &Path, names: &[String]) -> Vec<String> {
        let mut notes = Vec::new();
        let blank: Vec<String> = names
            .iter()
            .zip(&self.blanks)
            .filter(|(_, n)| **n > 0)
            .map(|(name, n)| format!("`{name}` {n}"))
            .collect();
        if !blank.is_empty() {
            notes.push(format!(
                "{}: blank numbers read as 0 (`blank_numeric = \"zero\"`): {}",
                path.display(),
                blank.join(", ")
            ));
        }
        let unsettled = names.iter().zip(&self.ambiguous).zip(&self.settled);
        if let Some((name, (line, raw))) = unsettled
            .filter(|(_, settled)| !**settled)
            .find_map(|((name, a), _)| a.as_ref().map(|a| (name, a)))
        {
            let read = |mark: DecimalMark| mark.parse(raw).unwrap_or_default();
            notes.push(format!(
                "{}: line {line}, column `{name}`: `{raw}` is read as {} with a decimal point; if \
                 the dot groups thousands ({}), as semicolon exports write them, set `decimal = \
                 \"comma\"` under [data.schema] (`decimal` in a --schema file)",
                path.display(),
                read(DecimalMark::Point),
                read(DecimalMark::Comma)
            ));
        }
        notes
    }
}

/// The note for a categorical column whose vocabulary has more than 100
/// values and more than half as many as the table has rows: nearly one
/// value per customer, an identifier rather than a feature (a customer-id
/// column written into a schema cost 7,043 one-hot features, 10 s and
/// 0.9 GB for a model that learned nothing from it).
fn id_like_note(path: &Path, cat: &Categorical, rows: usize) -> Option<String> {
    let values = cat.vocabulary.len();
    (values > 100 && values * 2 > rows).then(|| {
        format!(
            "{}: categorical column `{}` lists {values} values for {rows} rows: nearly one per \
             customer, so it names customers rather than describing them, and each value is a \
             feature of the model (time and memory grow with them): leave it out of the schema",
            path.display(),
            cat.name
        )
    })
}

/// The note for a column's values outside its vocabulary: how many rows,
/// the most frequent values, and what they are read as.
fn unseen_note(
    path: &Path,
    column: &str,
    values: &std::collections::BTreeMap<String, u64>,
    rows: usize,
) -> String {
    let total: u64 = values.values().sum();
    let mut by_count: Vec<(&String, &u64)> = values.iter().collect();
    by_count.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    let mut shown: Vec<String> = by_count
        .iter()
        .take(3)
        .map(|(v, c)| format!("`{}` {c}", v.chars().take(40).collect::<String>()))
        .collect();
    if by_count.len() > 3 {
        shown.push(format!("{} more values", by_count.len() - 3));
    }
    format!(
        "{}: column `{column}`: {total} of {rows} rows hold values the schema's vocabulary \
         lacks ({}); they read as none of its values (`unknown_category = \"zeros\"`), so \
         the model sees those rows as if the column were blank: add the values to the \
         vocabulary and train again if they matter",
        path.display(),
        shown.join(", ")
    )
}

/// A data record of a table and its line, or why it could not be read.
pub(crate) type TableRow = Result<(u64, csv::StringRecord), DataError>;

/// The header line of a delimited table.
pub(crate) struct Header {
    /// The fields as split, untrimmed.
    pub fields: csv::StringRecord,
    /// The line the header is on.
    line: u64,
}

impl Header {
    /// The fields as split.
    pub fn iter(&self) -> csv::StringRecordIter<'_> {
        self.fields.iter()
    }

    /// The position of the column named `name` (or `alias`), stray spaces
    /// ignored. A name the header gives twice is refused, because either
    /// column could be meant (`id,spend,spend,churn` read whichever came
    /// first, silently); a column nobody asks for may repeat.
    pub fn position(&self, path: &Path, name: &str, alias: &str) -> Result<usize, DataError> {
        let mut found = self
            .iter()
            .enumerate()
            .filter(|(_, h)| h.trim() == name || h.trim() == alias)
            .map(|(k, _)| k);
        let first = found
            .next()
            .ok_or_else(|| DataError::missing_column(path, name, self.iter()))?;
        match found.next() {
            None => Ok(first),
            Some(second) => Err(self.twice(path, first, second)),
        }
    }

    /// The columns whose name another column has too, each with the first
    /// column of that name.
    pub fn repeats(&self) -> Vec<(usize, usize)> {
        let mut first: std::collections::HashMap<&str, usize> = Default::default();
        let mut repeats = Vec::new();
        for (k, name) in self.iter().enumerate() {
            let name = name.trim();
            if name.is_empty() {
                continue;
            }
            if let Some(&j) = first.get(name) {
                repeats.push((k, j));
            } else {
                first.insert(name, k);
            }
        }
        repeats
    }

    /// Columns `first` and `second` have one name.
    pub fn twice(&self, path: &Path, first: usize, second: usize) -> DataError {
        DataError::Row {
            file: path.into(),
            line: self.line,
            message: format!(
                "the header names the column `{}` twice (fields {} and {}): rename one",
                self.fields.get(first).unwrap_or_default().trim(),
                first + 1,
                second + 1
            ),
        }
    }
}

/// The details of [`DataError::MissingColumn`].
#[derive(Debug)]
pub struct MissingColumn {
    /// The missing column.
    pub column: String,
    /// The header as read, for comparison.
    pub header: String,
    /// Why the header may be wrong ([`header_hint`]), or empty.
    pub hint: String,
}

impl DataError {
    /// A required column is not in `header` (the fields as split).
    pub(crate) fn missing_column<'h>(
        file: &Path,
        column: &str,
        header: impl Iterator<Item = &'h str>,
    ) -> Self {
        let fields: Vec<&str> = header.collect();
        Self::MissingColumn {
            file: file.into(),
            found: Box::new(MissingColumn {
                column: column.into(),
                header: fields.join(","),
                hint: header_hint(&fields),
            }),
        }
    }
}

/// What a header that lacks a required column may really be: a first line
/// of data (a file without a header, as MovieLens 100k's `u.data` and 1M's
/// `ratings.dat` are), or a line that did not split on the separator.
pub(crate) fn header_hint(fields: &[&str]) -> String {
    let numeric = |f: &str| f.trim().parse::<f64>().is_ok();
    if fields.len() == 1
        && let Some(sep) = ["::", "\t", ";", "|", ","]
            .iter()
            .find(|s| fields[0].contains(**s))
    {
        let name = if *sep == "\t" {
            "tab".to_string()
        } else {
            format!("`{sep}`")
        };
        let fix = if *sep == "::" {
            "convert it to commas (e.g. `sed 's/::/,/g'`)".to_string()
        } else {
            "give the file's separator (`--delimiter`, or `delimiter` in the configuration)"
                .to_string()
        };
        let data = if fields[0].split(*sep).all(numeric) {
            ", and it looks like data, not a header: add a header line naming the columns"
        } else {
            ""
        };
        return format!(
            "; the line did not split: its fields are separated by {name}: {fix}{data}"
        );
    }
    if !fields.is_empty() && fields.iter().all(|f| numeric(f)) {
        return "; the first line looks like data, not a header: add a header line naming the \
                columns"
            .into();
    }
    String::new()
}

/// The header of a delimited table and its data records, each with its
/// line; a record of another width than the header's is an error. Errors
/// name `path`.
pub(crate) fn table<'a, R: std::io::Read + 'a>(
    reader: R,
    path: &'a Path,
    delimiter: u8,
) -> Result<(Header, impl Iterator<Item = TableRow> + 'a), DataError> {
    let mut records = line_records(reader, delimiter, path).map_err(|source| DataError::Io {
        file: path.into(),
        source,
    })?;
    let row_err = move |(line, e): (u64, csv::Error)| DataError::Row {
        file: path.into(),
        line,
        message: crate::data::csv_lines::message(&e),
    };
    let Some(header) = records.next() else {
        return Err(DataError::Empty { file: path.into() });
    };
    let (line, fields) = header.map_err(row_err)?;
    let width = fields.len();
    let rows = records.map(move |r| {
        let (line, record) = r.map_err(row_err)?;
        if record.len() != width {
            return Err(DataError::Row {
                file: path.into(),
                line,
                message: format!("{} fields, the header has {width}", record.len()),
            });
        }
        Ok((line, record))
    });
    Ok((Header { fields, line }, rows))
}

/// A numeric cell: what Rust's float parser takes, plus the money a shop
/// writes (`$1,234.50`, `1 234`; see [`DecimalMark::parse`]).
pub(crate) fn parse_number(raw: &str) -> Option<f32> {
    DecimalMark::Point.parse(raw)
}

impl TabularDataset {
    /// Number of rows.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// True when there are no rows.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The rows at `indices`, in that order.
    pub fn select(&self, indices: &[usize]) -> Self {
        Self {
            ids: indices.iter().map(|&i| self.ids[i].clone()).collect(),
            x: self.x.select(ndarray::Axis(0), indices),
            y: self.y.select(ndarray::Axis(0), indices),
        }
    }

    /// Concatenates datasets with the same width.
    pub fn concat(parts: &[&TabularDataset]) -> Self {
        let width = parts.first().map_or(0, |p| p.x.ncols());
        let ids = parts
            .iter()
            .flat_map(|p| p.ids.iter().cloned())
            .collect::<Vec<_>>();
        let mut x = Vec::with_capacity(ids.len() * width);
        let mut y = Vec::with_capacity(ids.len());
        for p in parts {
            x.extend(p.x.iter().copied());
            y.extend(p.y.iter().copied());
        }
        Self {
            x: Array2::from_shape_vec((ids.len(), width), x).expect("same widths"),
            y: Array1::from(y),
            ids,
        }
    }

    /// Fraction of positive labels.
    pub fn positive_rate(&self) -> f64 {
        if self.is_empty() {
            0.0
        } else {
            self.y.iter().filter(|&&v| v > 0.5).count() as f64 / self.len() as f64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A comma-separated table read with another delimiter (`--delimiter
    /// semicolon` on Telco's export) says which separator its header has.
    #[test]
    fn a_header_that_did_not_split_names_its_separator_commas_included() {
        for (header, sep) in [
            ("customerID,gender,tenure", "`,`"),
            ("a;b;c", "`;`"),
            ("a\tb", "tab"),
        ] {
            let hint = header_hint(&[header]);
            assert!(
                hint.contains(&format!("its fields are separated by {sep}"))
                    && hint.contains("--delimiter"),
                "{header}: {hint}"
            );
        }
    }

    /// Id `id`, label `y` (1 positive, 0 negative), the numeric columns
    /// `numeric`, strict policies.
    fn label_y(numeric: &[&str]) -> Schema {
        Schema {
            id: Some("id".into()),
            label: "y".into(),
            positive: vec!["1".into()],
            negative: vec!["0".into()],
            numeric: numeric.iter().map(|n| n.to_string()).collect(),
            categorical: vec![],
            blank_numeric: BlankNumeric::Error,
            unknown_category: UnknownCategory::Error,
            decimal: Default::default(),
        }
    }

    fn telco_path() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/telco-churn/Telco-Customer-Churn.csv")
    }

    /// Every reader of a merchant's file (customer table, ratings, orders
    /// export, whitespace-separated too) names a compressed file instead
    /// of calling its first field "not UTF-8 text".
    #[test]
    fn every_reader_names_a_compressed_file_and_how_to_decompress_it() {
        let dir = tempfile::tempdir().unwrap();
        let gz = dir.path().join("table.csv.gz");
        std::fs::write(&gz, [0x1F, 0x8B, 0x08, 0x00, 0x00, 0x00]).unwrap();
        let fix = "the file is gzip-compressed, not CSV text: decompress it first (`gzip -dk";
        let shown = [
            label_y(&["x"]).load_csv(&gz).unwrap_err().to_string(),
            crate::data::movielens::load_ratings(&gz)
                .unwrap_err()
                .to_string(),
        ];
        for e in shown {
            assert!(
                e.starts_with(&format!("{}: {fix}", gz.display())) && !e.contains("UTF-8"),
                "{e}"
            );
        }
        let mut map: crate::data::orders::OrdersMapping =
            toml::from_str("customer = \"c\"\ntimestamp = \"t\"\namount = \"a\"\n").unwrap();
        for delimiter in [
            crate::data::orders::Delimiter::Comma,
            crate::data::orders::Delimiter::Whitespace,
        ] {
            map.delimiter = delimiter;
            let e = crate::data::orders::read_orders(
                &gz,
                &map,
                crate::data::orders::BadRowPolicy::Fail,
            )
            .unwrap_err()
            .to_string();
            assert!(
                e.contains(fix) && !e.contains("UTF-8"),
                "{delimiter:?}: {e}"
            );
        }
    }

    #[test]
    fn a_header_naming_a_used_column_twice_is_refused_and_feature_lists_may_be_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dup.csv");
        std::fs::write(&path, "id,x,x,y\na,1,2,1\nb,2,3,0\n").unwrap();
        let e = label_y(&["x"]).load_csv(&path).unwrap_err().to_string();
        assert!(
            e.contains("line 1")
                && e.contains("the header names the column `x` twice (fields 2 and 3)"),
            "{e}"
        );
        // The label too, also where scoring reads labels only if known.
        std::fs::write(&path, "id,x,y,y\na,1,1,1\nb,2,0,0\n").unwrap();
        let e = label_y(&["x"]).load_features_delimited(&path, b',');
        assert!(
            e.unwrap_err()
                .to_string()
                .contains("the header names the column `y` twice (fields 3 and 4)")
        );
        // A repeated column the schema does not use is no matter (exports
        // carry such columns: two `notes`, two blank names).
        std::fs::write(&path, "id,notes,x,notes,,y,\na,p,1,q,,1,\nb,r,2,s,,0,\n").unwrap();
        let ds = label_y(&["x"]).load_csv(&path).unwrap();
        assert_eq!(ds.x.column(0).to_vec(), [1.0, 2.0]);
        assert_eq!(ds.y.to_vec(), [1.0, 0.0]);
        // A schema without categorical columns needs no `categorical = []`.
        let schema: Schema = toml::from_str(
            "label = \"y\"\npositive = [\"1\"]\nnegative = [\"0\"]\nnumeric = [\"x\"]\n",
        )
        .unwrap();
        assert!(schema.categorical.is_empty());
        schema.check().unwrap();
    }

    #[test]
    fn scoring_reads_customers_whose_outcome_is_not_known_yet() {
        let dir = tempfile::tempdir().unwrap();
        let schema = label_y(&["x"]);
        // Blank and not-yet-known labels, and then no label column at all.
        let with = dir.path().join("with.csv");
        std::fs::write(&with, "id,x,y\na,1,1\nb,2,\nc,3,pending\n").unwrap();
        let ds = schema.load_features_delimited(&with, b',').unwrap();
        assert_eq!(ds.ids, ["a", "b", "c"]);
        assert_eq!(ds.x.column(0).to_vec(), [1.0, 2.0, 3.0]);
        assert_eq!(ds.y.to_vec(), [1.0, 0.0, 0.0]);
        let without = dir.path().join("without.csv");
        std::fs::write(&without, "id,x\na,1\nb,2\n").unwrap();
        let ds = schema.load_features_delimited(&without, b',').unwrap();
        assert_eq!(ds.ids, ["a", "b"]);
        // Features are still checked; training still needs every label.
        std::fs::write(&without, "id,x\na,one\n").unwrap();
        let e = schema.load_features_delimited(&without, b',').unwrap_err();
        assert!(e.to_string().contains("line 2, column `x`"), "{e}");
        let e = schema.load_csv(&with).unwrap_err();
        assert!(e.to_string().contains("line 3, column `y`"), "{e}");
        // A customer twice.
        std::fs::write(&without, "id,x\na,1\nb,2\na,3\n").unwrap();
        let e = schema.load_features_delimited(&without, b',').unwrap_err();
        assert!(
            e.to_string()
                .contains("line 4, column `id`: customer `a` is already on line 2"),
            "{e}"
        );
        // Finite, but not as an f32.
        std::fs::write(&without, "id,x\na,1e308\nb,inf\n").unwrap();
        let e = schema.load_features_delimited(&without, b',').unwrap_err();
        assert!(
            e.to_string()
                .ends_with("`1e308` is beyond the range of the models' 32-bit numbers (±3.4e38)"),
            "{e}"
        );
        // An f32, but its square is not: the statistics step would be
        // refused and the merchant's scaled rows would wreck its training.
        std::fs::write(&without, "id,x\na,1e15\nb,-2e15\n").unwrap();
        let e = schema.load_features_delimited(&without, b',').unwrap_err();
        assert!(
            e.to_string().ends_with(
                "line 3, column `x`: `-2e15` is beyond ±1e15, the largest value the models \
                 standardise (its square must stay within their 32-bit numbers)"
            ),
            "{e}"
        );
    }

    #[test]
    fn telco_loads_as_shipped_including_blank_total_charges() {
        let ds = Schema::telco().load_csv(&telco_path()).unwrap();
        assert_eq!(ds.len(), 7043);
        assert_eq!(ds.x.ncols(), Schema::telco().num_features());
        // 1869 of 7043 customers churned in the published dataset.
        assert_eq!(ds.y.iter().filter(|&&v| v > 0.5).count(), 1869);
        // Every one-hot block has exactly one 1.
        let one_hot_sum: f32 = ds.x.row(0).iter().skip(4).sum();
        assert_eq!(one_hot_sum, Schema::telco().categorical.len() as f32);
    }

    /// `NA` in a number column said only "is not a number": it says what
    /// the schema draft says of such a column, and whether this schema
    /// already reads blank cells as 0.
    #[test]
    fn a_placeholder_in_a_number_column_says_to_blank_it() {
        let text = "id,x,y\na,1,0\nb,NA,1\n";
        let mut schema = label_y(&["x"]);
        let e = schema
            .read_csv(text.as_bytes(), Path::new("f.csv"))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "f.csv: line 3, column `x`: `NA` is not a number, a placeholder for a missing value: \
             blank such cells (with `blank_numeric = \"zero\"` in the schema blank cells read as \
             0) or fill in the numbers"
        );
        schema.blank_numeric = BlankNumeric::Zero;
        let e = schema
            .read_csv(text.replace("NA", "?").as_bytes(), Path::new("f.csv"))
            .unwrap_err();
        assert!(
            e.to_string().ends_with(
                "`?` is not a number, a placeholder for a missing value: blank such cells (this \
                 schema's `blank_numeric = \"zero\"` reads blank cells as 0) or fill in the numbers"
            ),
            "{e}"
        );
        // Other text is not called a placeholder.
        let e = schema
            .read_csv(text.replace("NA", "abc").as_bytes(), Path::new("f.csv"))
            .unwrap_err();
        assert!(e.to_string().ends_with("`abc` is not a number"), "{e}");
    }

    #[test]
    fn bad_cell_names_file_line_and_column() {
        let csv = "customerID,gender,SeniorCitizen,Partner,Dependents,tenure,PhoneService,MultipleLines,InternetService,OnlineSecurity,OnlineBackup,DeviceProtection,TechSupport,StreamingTV,StreamingMovies,Contract,PaperlessBilling,PaymentMethod,MonthlyCharges,TotalCharges,Churn\n\
            a,Female,0,Yes,No,1,No,No phone service,DSL,No,Yes,No,No,No,No,Month-to-month,Yes,Electronic check,29.85,29.85,No\n\
            b,Female,0,Yes,No,abc,No,No phone service,DSL,No,Yes,No,No,No,No,Month-to-month,Yes,Electronic check,29.85,29.85,No\n";
        let err = Schema::telco()
            .read_csv(csv.as_bytes(), Path::new("x.csv"))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "x.csv: line 3, column `tenure`: `abc` is not a number"
        );
    }

    /// A blank label read "label `` is neither positive … nor negative …".
    #[test]
    fn a_blank_label_is_called_blank() {
        let e = label_y(&["x"])
            .read_csv("id,x,y\na,1,0\nb,2, \n".as_bytes(), Path::new("f.csv"))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "f.csv: line 3, column `y`: blank label: a row to train or evaluate on needs positive \
             [\"1\"] or negative [\"0\"] (a customer whose outcome is not known yet is for \
             `score`, which reads blank labels as not known)"
        );
    }

    /// Values a categorical column's vocabulary lacks are counted in a note
    /// under `unknown_category = "zeros"` (they were read as none of its
    /// values without a word); blanks and placeholders are missing values.
    #[test]
    fn values_outside_a_vocabulary_are_counted_in_a_note() {
        let schema = Schema {
            categorical: vec![Categorical {
                name: "internet".into(),
                vocabulary: vec!["DSL".into(), "Fiber".into()],
            }],
            unknown_category: UnknownCategory::Zeros,
            ..label_y(&[])
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.csv");
        let rows =
            "id,internet,y\n1,DSL,0\n2,Satellite,1\n3,NA,0\n4,,0\n5,Satellite,0\n6,Cable,1\n";
        std::fs::write(&path, rows).unwrap();
        let (ds, notes) = schema.load_csv_noting(&path, b',').unwrap();
        assert_eq!(ds.len(), 6);
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(
            notes[0].contains("column `internet`: 3 of 6 rows hold values the schema's vocabulary lacks (`Satellite` 2, `Cable` 1)"),
            "{}",
            notes[0]
        );
        let (_, notes) = schema.load_features_noting(&path, b',').unwrap();
        assert_eq!(notes.len(), 1);
        // Inside the vocabulary, or blank: no note.
        std::fs::write(&path, "id,internet,y\n1,DSL,0\n2,,1\n").unwrap();
        assert!(schema.load_csv_noting(&path, b',').unwrap().1.is_empty());
    }

    /// A semicolon table whose totals group thousands with a dot (`1.890`)
    /// was read with the schema's decimal point as 1.89, and 57 blank
    /// `tenure` cells as 0, without a word: both are noted, naming the
    /// column and line; a column with a `12.50` settles the mark, and a
    /// comma-separated table is not a semicolon export.
    #[test]
    fn blank_numbers_and_thousands_that_read_as_decimals_are_noted() {
        let schema = Schema {
            numeric: vec!["tenure".into(), "total".into()],
            blank_numeric: BlankNumeric::Zero,
            ..label_y(&[])
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.csv");
        std::fs::write(&path, "id;tenure;total;y\n1;;25;0\n2;3;1.890;1\n3;;7;0\n").unwrap();
        let (ds, notes) = schema.load_csv_noting(&path, b';').unwrap();
        assert_eq!(ds.x[[1, 1]], 1.89, "read as the schema says");
        let shown = path.display();
        assert_eq!(
            notes,
            [
                format!(
                    "{shown}: blank numbers read as 0 (`blank_numeric = \"zero\"`): `tenure` 2"
                ),
                format!(
                    "{shown}: line 3, column `total`: `1.890` is read as 1.89 with a decimal \
                     point; if the dot groups thousands (1890), as semicolon exports write them, \
                     set `decimal = \"comma\"` under [data.schema] (`decimal` in a --schema file)"
                )
            ]
        );
        std::fs::write(&path, "id;tenure;total;y\n1;1;12.50;0\n2;3;1.890;1\n").unwrap();
        assert!(schema.load_csv_noting(&path, b';').unwrap().1.is_empty());
        std::fs::write(&path, "id,tenure,total,y\n1,1,25,0\n2,3,1.890,1\n").unwrap();
        assert!(schema.load_csv_noting(&path, b',').unwrap().1.is_empty());
    }

    /// Scoring a table whose labels are all outside the schema's values
    /// (`Yes`/`No` against `1`/`0`) read every one as not known yet without a
    /// word; blank labels or some known ones are as designed and get none.
    #[test]
    fn labels_all_outside_the_schema_are_noted_when_scoring() {
        let schema = label_y(&[]);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.csv");
        std::fs::write(&path, "id,y\n1,Yes\n2,No\n3,\n").unwrap();
        let (ds, notes) = schema.load_features_noting(&path, b',').unwrap();
        assert_eq!(ds.len(), 3);
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(
            notes[0].contains("column `y`: none of its 2 labels is positive [\"1\"] or negative [\"0\"] (e.g. `Yes`)"),
            "{}",
            notes[0]
        );
        for quiet in ["id,y\n1,\n2,\n", "id,y\n1,1\n2,Yes\n"] {
            std::fs::write(&path, quiet).unwrap();
            assert!(
                schema
                    .load_features_noting(&path, b',')
                    .unwrap()
                    .1
                    .is_empty(),
                "{quiet}"
            );
        }
    }

    /// A customer-id column written into a schema as categorical (7,043
    /// values for 7,043 rows) ran without a word and cost 0.9 GB.
    #[test]
    fn a_categorical_column_with_a_value_per_customer_is_noted() {
        let ids: Vec<String> = (0..200).map(|i| format!("c{i}")).collect();
        let schema = Schema {
            categorical: vec![Categorical {
                name: "customer_code".into(),
                vocabulary: ids.clone(),
            }],
            ..label_y(&[])
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.csv");
        let mut text = String::from("id,customer_code,y\n");
        for (i, c) in ids.iter().enumerate() {
            text.push_str(&format!("{i},{c},{}\n", i % 2));
        }
        std::fs::write(&path, text).unwrap();
        let (_, notes) = schema.load_csv_noting(&path, b',').unwrap();
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(
            notes[0].contains("column `customer_code` lists 200 values for 200 rows")
                && notes[0].contains("leave it out of the schema"),
            "{}",
            notes[0]
        );
        // 150 values over 400 rows: a real category, no note.
        let few = Schema {
            categorical: vec![Categorical {
                name: "customer_code".into(),
                vocabulary: ids[..150].to_vec(),
            }],
            ..label_y(&[])
        };
        let mut text = String::from("id,customer_code,y\n");
        for i in 0..400 {
            text.push_str(&format!("{i},{},{}\n", ids[i % 150], i % 2));
        }
        std::fs::write(&path, text).unwrap();
        assert!(few.load_csv_noting(&path, b',').unwrap().1.is_empty());
    }

    #[test]
    fn unknown_category_and_missing_column_are_named() {
        let schema = Schema {
            categorical: vec![Categorical {
                name: "c".into(),
                vocabulary: vec!["p".into(), "q".into()],
            }],
            ..label_y(&["a"])
        };
        let err = schema
            .read_csv("id,a,c,y\n1,2,z,0\n".as_bytes(), Path::new("f.csv"))
            .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("f.csv: line 2, column `c`: `z` is not in the vocabulary"),
            "{err}"
        );
        let err = schema
            .read_csv("id,a,y\n1,2,0\n".as_bytes(), Path::new("f.csv"))
            .unwrap_err();
        assert!(err.to_string().contains("missing column `c`"), "{err}");
        let err = schema
            .read_csv("id,a,c,y\n1,,p,0\n".as_bytes(), Path::new("f.csv"))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "f.csv: line 2, column `a`: blank numeric value"
        );
        let err = schema
            .read_csv("id,a,c,y\n1,2,p\n".as_bytes(), Path::new("f.csv"))
            .unwrap_err();
        assert_eq!(err.to_string(), "f.csv: line 2: 3 fields, the header has 4");
    }

    /// Numbers as a shop's export writes money read as numbers.
    #[test]
    fn numeric_cells_take_currency_signs_and_digit_groups() {
        let schema = Schema {
            id: None,
            ..label_y(&["spend"])
        };
        let text = "spend,y\n$29.85,0\n\"$1,889.50\",1\n-3,0\n";
        let ds = schema
            .read_csv(text.as_bytes(), Path::new("f.csv"))
            .unwrap();
        assert_eq!(ds.x.column(0).to_vec(), [29.85, 1889.5, -3.0]);
        let err = schema
            .read_csv("spend,y\n\"1,5\",0\n".as_bytes(), Path::new("f.csv"))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "f.csv: line 2, column `spend`: `1,5` is not a number with a decimal point (this one \
             has a decimal comma: `decimal = \"comma\"` under [data.schema], `decimal` in a \
             --schema file)"
        );
    }

    /// A table saved on Windows (CRLF) with a blank line: the line named is
    /// the one an editor shows, and the last column reads without its `\r`.
    #[test]
    fn crlf_tables_name_the_editors_line() {
        let schema = label_y(&["a"]);
        let text = "id,a,y\r\n1,2,0\r\n\r\n2,3,1\r\n";
        let ds = schema
            .read_csv(text.as_bytes(), Path::new("f.csv"))
            .unwrap();
        assert_eq!(ds.y.to_vec(), [0.0, 1.0]);
        let text = "id,a,y\r\n1,2,0\r\n\r\n2,x,1\r\n";
        let err = schema
            .read_csv(text.as_bytes(), Path::new("f.csv"))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "f.csv: line 4, column `a`: `x` is not a number"
        );
    }
}
