//! A first [`Schema`] for a customer table nobody has described yet.
//!
//! Writing a schema by hand means listing every column and every value of
//! every categorical one. [`Schema::draft`] reads the table once and
//! proposes one: the id column, the label and which of its two values is
//! the positive class, numeric columns, categorical columns with their
//! vocabularies (sorted, so two drafts over the same values agree), and a
//! note for every column it left out and why. It is a draft: the merchant
//! (or the operator, for every merchant of a run) reads it and keeps it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Read;
use std::path::Path;

use super::{BlankNumeric, Categorical, DataError, Schema, UnknownCategory};
use crate::data::cells::DecimalMark;

/// Choices the draft cannot make from the data alone.
#[derive(Debug, Clone, Default)]
pub struct DraftOptions {
    /// The label column (default: a two-valued column named like a churn
    /// label: `churn`, `churned`, `exited`, `attrition`, `label`, `target`…).
    pub label: Option<String>,
    /// The label value of the positive class (default: the one of the two
    /// that reads as yes: `1`, `yes`, `true`, `churned`…).
    pub positive: Option<String>,
    /// Most distinct values a categorical column may have (default 50);
    /// text columns with more are left out.
    pub max_categories: Option<usize>,
}

/// A drafted schema and what the draft decided without being told.
#[derive(Debug, Clone, PartialEq)]
pub struct Draft {
    /// The schema; [`Schema::check`] holds for it.
    pub schema: Schema,
    /// Data rows read.
    pub rows: usize,
    /// One line per decision worth reviewing (a column left out, blank
    /// numbers read as 0, the label value taken as positive).
    pub notes: Vec<String>,
}

const DEFAULT_MAX_CATEGORIES: usize = 50;
/// Below this many rows a column of distinct integers may be a feature.
const ID_LIKE_MIN_ROWS: usize = 20;

/// What one pass over a column saw.
#[derive(Default)]
struct ColumnStats {
    blanks: usize,
    /// How the non-blank cells read as numbers with a decimal point (after
    /// the draft chose a decimal comma: with it).
    numbers: Numbers,
    /// The same with a decimal comma (`1.234,50`).
    comma: Numbers,
    /// Counts of each value while there are at most `cap` of them.
    values: BTreeMap<String, usize>,
    /// More distinct values than the cap.
    many: bool,
    /// Every value seen so far (for the all-distinct test).
    seen: HashSet<String>,
    repeats: bool,
    /// The first cell that reads as another number with each decimal mark
    /// (`1.890`), with its line.
    ambiguous: Option<(u64, String)>,
    /// Each of the first [`LEAK_ROWS`] rows' value as a code (0 blank, else
    /// its index in `coded` plus one), while the column holds at most `cap`
    /// values: what [`gives_the_label`] compares with the label.
    codes: Vec<u32>,
    coded: HashMap<String, u32>,
    /// More values than the cap: not coded.
    uncoded: bool,
    /// Cells that read as calendar dates ([`looks_like_date`]), and the
    /// first with its line.
    dates: usize,
    first_date: Option<(u64, String)>,
}

/// A calendar date as exports write one: three groups of digits joined by
/// `-`, `/` or `.` (one group of four digits, first or last; the others of
/// one or two), optionally followed by a time after a space or `T`. A
/// customer table reads numbers only, so such a column was left out as
/// "free text" without a word on how to use it (found by a data probe).
fn looks_like_date(v: &str) -> bool {
    let day = v.split([' ', 'T']).next().unwrap_or("");
    let Some(sep) = ['-', '/', '.'].into_iter().find(|&c| day.contains(c)) else {
        return false;
    };
    let parts: Vec<&str> = day.split(sep).collect();
    let digits = |p: &&str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
    if parts.len() != 3 || !parts.iter().all(digits) {
        return false;
    }
    let lens: Vec<usize> = parts.iter().map(|p| p.len()).collect();
    matches!(lens[..], [4, 1 | 2, 1 | 2] | [1 | 2, 1 | 2, 4])
}

/// A column of more than two values that are two once case and spaces are
/// ignored (`yes`, `Yes`, `YES`, `no`, …): its counts and codes are merged
/// into each class's most frequent spelling (ties: the first in order), and
/// every spelling of each class is returned under that spelling. `None`,
/// with `st` untouched, for any other column.
fn fold_case(st: &mut ColumnStats) -> Option<BTreeMap<String, Vec<String>>> {
    if st.many || st.values.len() <= 2 {
        return None;
    }
    let mut classes: BTreeMap<String, Vec<(String, usize)>> = BTreeMap::new();
    for (v, n) in &st.values {
        classes
            .entry(v.trim().to_lowercase())
            .or_default()
            .push((v.clone(), *n));
    }
    if classes.len() != 2 {
        return None;
    }
    let mut spellings = BTreeMap::new();
    let mut canonical_of: HashMap<String, String> = HashMap::new();
    let mut values = BTreeMap::new();
    for (_, mut group) in classes {
        group.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let canon = group[0].0.clone();
        values.insert(canon.clone(), group.iter().map(|(_, n)| n).sum());
        for (v, _) in &group {
            canonical_of.insert(v.clone(), canon.clone());
        }
        let mut all: Vec<String> = group.into_iter().map(|(v, _)| v).collect();
        all.sort();
        spellings.insert(canon, all);
    }
    if !st.uncoded {
        let mut coded: HashMap<String, u32> = HashMap::new();
        let mut remap: HashMap<u32, u32> = HashMap::new();
        let mut old: Vec<(&String, &u32)> = st.coded.iter().collect();
        old.sort_by_key(|(_, code)| **code);
        for (v, code) in old {
            let canon = canonical_of.get(v).unwrap_or(v).clone();
            let next = coded.len() as u32 + 1;
            remap.insert(*code, *coded.entry(canon).or_insert(next));
        }
        for c in &mut st.codes {
            *c = remap.get(c).copied().unwrap_or(*c);
        }
        st.coded = coded;
    }
    st.values = values;
    Some(spellings)
}

/// Rows of a table the label-copy test ([`gives_the_label`]) reads.
const LEAK_ROWS: usize = 100_000;

/// Why column `st` is left out as a copy of the label, if its value gives
/// the label on every coded row (`churned`, row by row) and the rows are
/// at least four per value: a second encoding of the label (`Churn Value`
/// beside `Churn Label`) or a column filled in once a customer left (a
/// churn reason, blank for those who stayed). Either scores perfectly on
/// the table and on no customer still to come.
fn gives_the_label(
    st: &ColumnStats,
    churned: &[bool],
    positive: &str,
    negative: &str,
) -> Option<String> {
    let values = st.coded.len() + usize::from(st.blanks > 0);
    if st.uncoded
        || st.codes.len() != churned.len()
        || churned.len() < (4 * values).max(ID_LIKE_MIN_ROWS)
    {
        return None;
    }
    let mut classes: HashMap<u32, [bool; 2]> = HashMap::new();
    for (&code, &y) in st.codes.iter().zip(churned) {
        classes.entry(code).or_default()[usize::from(y)] = true;
    }
    if classes.values().any(|c| c[0] && c[1]) {
        return None;
    }
    let mut names: Vec<&str> = vec![""; st.coded.len() + 1];
    for (v, &code) in &st.coded {
        names[code as usize] = v;
    }
    let shown = |class: usize| {
        let mut of: Vec<String> = classes
            .iter()
            .filter(|(_, c)| c[class])
            .map(|(&code, _)| match code {
                0 => "blank".to_string(),
                code => format!("`{}`", names[code as usize]),
            })
            .collect();
        of.sort();
        let more = of.len().saturating_sub(2);
        of.truncate(2);
        let mut text = of.join(", ");
        if more > 0 {
            text += &format!(" and {more} more");
        }
        text
    };
    Some(format!(
        "it gives the label on every row ({} only on `{positive}` rows, {} only on \
         `{negative}` rows): a copy of the label, or a column filled in once a customer left (a \
         reason, a date), which scores perfectly here and on no customer still to come; if it \
         is known before a customer leaves, list it under `numeric` or `categorical`",
        shown(1),
        shown(0)
    ))
}

/// How a column's non-blank cells read as numbers under one decimal mark.
struct Numbers {
    /// Every one reads as a finite number.
    numeric: bool,
    /// Every one is an integer.
    integral: bool,
    /// Those that read as no number, and the first of them with its line.
    not_numbers: usize,
    first_not_number: Option<(u64, String)>,
}

impl Default for Numbers {
    fn default() -> Self {
        Self {
            numeric: true,
            integral: true,
            not_numbers: 0,
            first_not_number: None,
        }
    }
}

impl Numbers {
    /// Notes cell `v` of `line`, read as `x` (`None`: not a number).
    fn see(&mut self, x: Option<f32>, line: u64, v: &str) {
        match x {
            Some(x) if x.is_finite() => self.integral &= x.fract() == 0.0,
            _ => {
                self.numeric = false;
                self.not_numbers += 1;
                if self.first_not_number.is_none() {
                    self.first_not_number = Some((line, v.to_string()));
                }
            }
        }
    }
}

/// Whether a cell is a placeholder for a missing value (`NA`, `N/A`, `?`,
/// `null`, `None`, `-`) rather than a value: exports write them where a
/// cell is empty, and a text column's draft listed them as categories.
pub(super) fn is_placeholder(v: &str) -> bool {
    ["?", "-", "--"].contains(&v)
        || ["na", "n/a", "#n/a", "null", "none", "nil", "nan", "missing"]
            .contains(&v.to_ascii_lowercase().as_str())
}

fn is_label_name(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    [
        "churn",
        "churned",
        "exited",
        "attrition",
        "attrition_flag",
        "label",
        "target",
        "y",
        "class",
        "left",
    ]
    .contains(&n.as_str())
        || n.contains("churn")
}

fn is_id_name(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    n == "id"
        || n.ends_with("_id")
        || n.ends_with(" id")
        || name.ends_with("Id")
        || name.ends_with("ID")
        || n.contains("customer")
}

/// A customer column whose values repeat and an order-time column, named
/// as exports name them: the marks of an orders export (one line per
/// order or order line), which the drafter was given instead of a table of
/// one row per customer.
fn orders_like<'a>(header: &'a [String], stats: &[ColumnStats]) -> Option<(&'a str, &'a str)> {
    let customer = header.iter().zip(stats).find(|(h, st)| {
        let n = h.to_ascii_lowercase();
        st.repeats
            && ["customer", "email", "user", "buyer", "client"]
                .iter()
                .any(|w| n.contains(w))
    })?;
    let time = header.iter().find(|h| {
        let n = h.to_ascii_lowercase();
        ["date", "time", "created", "placed", "ordered"]
            .iter()
            .any(|w| n.contains(w))
            || n.ends_with("_at")
            || n.ends_with(" at")
    })?;
    Some((customer.0.as_str(), time.as_str()))
}

fn reads_as_yes(v: &str) -> bool {
    let v = v.to_ascii_lowercase();
    [
        "1",
        "yes",
        "y",
        "true",
        "t",
        "churn",
        "churned",
        "left",
        "attrited customer",
        "attrited",
    ]
    .contains(&v.as_str())
}

/// Whether a label column's name says who stayed (`is_active`, `retained`,
/// `Subscribed`): its yes, true or 1 then means *not* churned. Names that
/// also say churn (`inactive`, `churned`) are not.
fn names_who_stayed(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    let churn_words = [
        "churn",
        "inactive",
        "not_active",
        "lapsed",
        "lost",
        "left",
        "cancel",
    ];
    !churn_words.iter().any(|w| n.contains(w))
        && [
            "active",
            "retain",
            "stayed",
            "stays",
            "renew",
            "subscribed",
            "loyal",
            "still",
            "current",
        ]
        .iter()
        .any(|w| n.contains(w))
}

/// Whether a label value is a plain yes or no (`1`, `true`, `Y`), whose
/// meaning is the column name's, rather than a word such as `churned`.
fn is_plain_yes_no(v: &str) -> bool {
    ["1", "0", "yes", "no", "y", "n", "true", "false", "t", "f"]
        .contains(&v.to_ascii_lowercase().as_str())
}

fn reads_as_no(v: &str) -> bool {
    let v = v.to_ascii_lowercase();
    [
        "0",
        "no",
        "n",
        "false",
        "f",
        "stayed",
        "retained",
        "existing customer",
        "existing",
    ]
    .contains(&v.as_str())
}

impl Schema {
    /// Drafts a schema from the table `reader` (`path` names it in
    /// errors), separated by `delimiter`. Errors name the file and say
    /// which option would settle what the data could not.
    pub fn draft<R: Read>(
        reader: R,
        path: &Path,
        delimiter: u8,
        opts: &DraftOptions,
    ) -> Result<Draft, DataError> {
        let cap = opts.max_categories.unwrap_or(DEFAULT_MAX_CATEGORIES);
        let err = |message: String| DataError::Draft {
            file: path.into(),
            message,
        };
        let (table_header, records) = super::table(reader, path, delimiter)?;
        let header: Vec<String> = table_header.iter().map(|h| h.trim().to_string()).collect();
        // Columns of one name: a schema naming it could mean either, so
        // the draft leaves them out (a label asked for by such a name is
        // refused, naming both).
        let repeats = table_header.repeats();
        let repeated: HashSet<usize> = repeats.iter().flat_map(|&(k, j)| [k, j]).collect();
        if let [only] = &header[..] {
            // Most often a table read with the wrong separator.
            let shown: String = only.chars().take(60).collect();
            return Err(err(format!(
                "the header line is one column, `{shown}{}`, and a customer table needs at least \
                 an id and a label column{}",
                if shown.len() < only.len() { "…" } else { "" },
                super::header_hint(&[only.as_str()])
            )));
        }
        let mut stats: Vec<ColumnStats> = header.iter().map(|_| ColumnStats::default()).collect();
        let mut rows = 0;
        for record in records {
            let (line, record) = record?;
            rows += 1;
            for (st, raw) in stats.iter_mut().zip(record.iter()) {
                let v = raw.trim();
                if v.is_empty() {
                    st.blanks += 1;
                    continue;
                }
                // As the reader parses numbers (`1e39` overflows an f32).
                st.numbers.see(super::parse_number(v), line, v);
                st.comma.see(DecimalMark::Comma.parse(v), line, v);
                if st.ambiguous.is_none() && DecimalMark::ambiguous(v) {
                    st.ambiguous = Some((line, v.to_string()));
                }
                if looks_like_date(v) {
                    st.dates += 1;
                    if st.first_date.is_none() {
                        st.first_date = Some((line, v.to_string()));
                    }
                }
                if !st.repeats && !st.seen.insert(v.to_string()) {
                    st.repeats = true;
                    st.seen = HashSet::new();
                }
                if !st.many {
                    *st.values.entry(v.to_string()).or_default() += 1;
                    if st.values.len() > cap {
                        st.many = true;
                        st.values.clear();
                    }
                }
            }
            if rows <= LEAK_ROWS {
                for (c, st) in stats.iter_mut().enumerate().filter(|(_, st)| !st.uncoded) {
                    let v = record.get(c).map_or("", str::trim);
                    let next = st.coded.len() as u32 + 1;
                    let code = match v {
                        "" => 0,
                        v => *st.coded.entry(v.to_string()).or_insert(next),
                    };
                    st.codes.push(code);
                    if st.coded.len() > cap {
                        st.uncoded = true;
                        st.codes = Vec::new();
                        st.coded = HashMap::new();
                    }
                }
            }
        }
        if rows == 0 {
            return Err(DataError::Empty { file: path.into() });
        }
        // A decimal comma when some column reads as numbers only with it
        // (`29,85`) and none only with a decimal point.
        let only = |a: fn(&ColumnStats) -> bool, b: fn(&ColumnStats) -> bool| {
            stats.iter().any(|st| st.blanks < rows && a(st) && !b(st))
        };
        // A column whose every cell reads with both marks, some as other
        // numbers (`1.890`, `1,250`), says nothing: a semicolon export takes
        // the decimal comma its spreadsheet wrote (`1.890` was read as 1.89,
        // a thousandth of the price, without a word), any other the point,
        // and the note names the cell either way.
        let ambiguous = stats.iter().zip(&header).find_map(|(st, h)| {
            let (line, v) = st.ambiguous.as_ref()?;
            (st.numbers.numeric && st.comma.numeric).then_some((h, *line, v))
        });
        let point_only = only(|s| s.numbers.numeric, |s| s.comma.numeric);
        let comma = (only(|s| s.comma.numeric, |s| s.numbers.numeric)
            || (delimiter == b';' && ambiguous.is_some()))
            && !point_only;
        let mut decimal_note = None;
        if let Some((h, line, v)) = ambiguous {
            let read = |mark: DecimalMark| mark.parse(v).unwrap_or_default();
            decimal_note = Some(if comma {
                format!(
                    "numbers use a decimal comma, as semicolon exports write them: `{v}` (column \
                     `{h}`, line {line}) reads as {}; if it means {}, set `decimal = \"point\"`",
                    read(DecimalMark::Comma),
                    read(DecimalMark::Point)
                )
            } else {
                format!(
                    "numbers use a decimal point: `{v}` (column `{h}`, line {line}) reads as {}; \
                     if it means {}, set `decimal = \"comma\"`",
                    read(DecimalMark::Point),
                    read(DecimalMark::Comma)
                )
            });
        }
        let decimal = if comma {
            for st in &mut stats {
                st.numbers = std::mem::take(&mut st.comma);
            }
            DecimalMark::Comma
        } else {
            DecimalMark::Point
        };
        // Two values, or two once case and spaces are ignored (`yes`, `Yes`,
        // `YES`): the draft gave up on such a label.
        let two_valued = |c: usize| {
            let st = &stats[c];
            !st.many
                && (st.values.len() == 2
                    || st
                        .values
                        .keys()
                        .map(|v| v.trim().to_lowercase())
                        .collect::<HashSet<_>>()
                        .len()
                        == 2)
        };
        let label = match &opts.label {
            Some(name) => {
                let c = table_header.position(path, name, name)?;
                if !two_valued(c) || stats[c].blanks > 0 {
                    return Err(err(format!(
                        "label column `{name}` must hold exactly two values and no blank cell \
                         (it holds {}{})",
                        if stats[c].many {
                            format!("more than {cap} values")
                        } else {
                            let values = &stats[c].values;
                            let shown: Vec<String> =
                                values.keys().take(8).map(|v| format!("`{v}`")).collect();
                            format!(
                                "{} value{}: {}{}",
                                values.len(),
                                if values.len() == 1 { "" } else { "s" },
                                shown.join(", "),
                                if values.len() > 8 { ", …" } else { "" }
                            )
                        },
                        if stats[c].blanks > 0 {
                            format!(" and {} blank cells", stats[c].blanks)
                        } else {
                            String::new()
                        }
                    )));
                }
                c
            }
            None => {
                let named: Vec<usize> = (0..header.len())
                    .filter(|&c| {
                        is_label_name(&header[c])
                            && two_valued(c)
                            && stats[c].blanks == 0
                            && !repeated.contains(&c)
                    })
                    .collect();
                match named[..] {
                    [c] => c,
                    _ => {
                        let candidates: Vec<&str> = (0..header.len())
                            .filter(|&c| two_valued(c) && stats[c].blanks == 0)
                            .map(|c| header[c].as_str())
                            .collect();
                        return Err(DataError::DraftNeeds {
                            file: path.into(),
                            what: "which column is the label",
                            option: "--label COLUMN",
                            detail: format!(
                                "(columns with exactly two values: {}){}",
                                if candidates.is_empty() {
                                    "none".to_string()
                                } else {
                                    candidates.join(", ")
                                },
                                orders_like(&header, &stats)
                                    .map(|(customer, time)| format!(
                                        "; this looks like an orders export, one line per order \
                                     (`{customer}` repeats, `{time}` is the order time), not a \
                                     customer table of one row per customer: an agent reads an \
                                     orders export as it is (`data.orders_csv` with its column \
                                     mapping `[data.orders]` in merchant.toml) and derives each \
                                     customer's features and churn label, which `fedcart-client \
                                     prepare --orders FILE` shows"
                                    ))
                                    .unwrap_or_default()
                            ),
                        });
                    }
                }
            }
        };
        let spellings = fold_case(&mut stats[label]);
        let label_values: Vec<&String> = stats[label].values.keys().collect();
        let mut stayed_label = false;
        // A value given in another spelling of its class is that class.
        let given = opts.positive.as_ref().map(|p| {
            spellings
                .as_ref()
                .and_then(|sp| {
                    sp.iter()
                        .find(|(_, all)| all.iter().any(|v| v.eq_ignore_ascii_case(p.trim())))
                        .map(|(canon, _)| canon.clone())
                })
                .unwrap_or_else(|| p.clone())
        });
        let positive = match &given {
            Some(p) => {
                if !label_values.contains(&p) {
                    return Err(err(format!(
                        "`{p}` is not a value of the label column `{}` (its values: `{}`, `{}`)",
                        header[label], label_values[0], label_values[1]
                    )));
                }
                p.clone()
            }
            None => {
                let mut yes: Vec<&&String> =
                    label_values.iter().filter(|v| reads_as_yes(v)).collect();
                let mut no: Vec<&&String> =
                    label_values.iter().filter(|v| reads_as_no(v)).collect();
                // `is_active = TRUE` is a customer who stayed: a plain yes
                // under such a name is the negative class.
                if names_who_stayed(&header[label])
                    && label_values.iter().all(|v| is_plain_yes_no(v))
                {
                    std::mem::swap(&mut yes, &mut no);
                    stayed_label = true;
                }
                match (&yes[..], &no[..]) {
                    ([y], _) => (**y).clone(),
                    ([], [n]) => label_values
                        .iter()
                        .find(|v| **v != **n)
                        .map(|v| (*v).clone())
                        .expect("two values"),
                    _ => {
                        return Err(DataError::DraftNeeds {
                            file: path.into(),
                            what: "which label value means churned",
                            option: "--positive VALUE",
                            detail: format!(
                                "(the label column `{}` holds `{}` and `{}`)",
                                header[label], label_values[0], label_values[1]
                            ),
                        });
                    }
                }
            }
        };
        let negative = label_values
            .iter()
            .find(|v| ***v != positive)
            .map(|v| (*v).clone())
            .expect("two values");
        let counts = &stats[label].values;
        let churned = counts.get(&positive).copied().unwrap_or(0);
        let labelled = churned + counts.get(&negative).copied().unwrap_or(0);
        let mut notes = vec![format!(
            "label `{}`: `{positive}` is churned (positive), `{negative}` is not{}: {churned} of \
             {labelled} rows ({:.1} %) are churned; if that is the share who stayed, give the other \
             value with `--positive`",
            header[label],
            if stayed_label {
                " (the column names who stayed)"
            } else {
                ""
            },
            100.0 * churned as f64 / labelled.max(1) as f64
        )];
        if let Some(note) = decimal_note {
            notes.push(note);
        } else if decimal == DecimalMark::Comma {
            notes.push(
                "numbers use a decimal comma (`1.234,50`): `decimal = \"comma\"`".to_string(),
            );
        }

        // The id: a column of distinct values named like one, else the first
        // column of distinct non-numeric values.
        let distinct =
            |c: usize| !stats[c].repeats && stats[c].blanks == 0 && !repeated.contains(&c);
        let id = (0..header.len())
            .filter(|&c| c != label && distinct(c))
            .find(|&c| is_id_name(&header[c]))
            .or_else(|| {
                (0..header.len()).find(|&c| c != label && distinct(c) && !stats[c].numbers.numeric)
            });
        if let Some(c) = id {
            notes.push(format!("id `{}`: every row has its own value", header[c]));
        }

        let mut numeric = Vec::new();
        let mut categorical = Vec::new();
        let mut blank_numbers = Vec::new();
        let positive_code = stats[label].coded.get(&positive).copied();
        let churned: Vec<bool> = stats[label]
            .codes
            .iter()
            .map(|&code| Some(code) == positive_code)
            .collect();
        for (c, name) in header.iter().enumerate() {
            if c == label || Some(c) == id {
                continue;
            }
            if repeated.contains(&c) {
                // One note per name, at its first column.
                let fields: Vec<String> = std::iter::once(c)
                    .chain(repeats.iter().filter(|&&(_, j)| j == c).map(|&(k, _)| k))
                    .map(|k| (k + 1).to_string())
                    .collect();
                if fields.len() > 1 {
                    notes.push(format!(
                        "left out `{name}`: the header names it {} times (fields {}); rename \
                         them to use them",
                        fields.len(),
                        fields.join(", ")
                    ));
                }
                continue;
            }
            let st = &stats[c];
            let non_blank = rows - st.blanks;
            if non_blank == 0 {
                notes.push(format!("left out `{name}`: every cell is blank"));
            } else if !st.many && st.values.len() == 1 && st.blanks == 0 {
                notes.push(format!("left out `{name}`: one value only"));
            } else if let Some(why) = gives_the_label(st, &churned, &positive, &negative) {
                notes.push(format!("left out `{name}`: {why}"));
            } else if st.numbers.numeric {
                if rows >= ID_LIKE_MIN_ROWS && distinct(c) && st.numbers.integral {
                    notes.push(format!(
                        "left out `{name}`: distinct integers on every row, a row number or \
                         an identifier rather than a feature"
                    ));
                    continue;
                }
                if st.blanks > 0 {
                    blank_numbers.push(format!("`{name}` ({})", st.blanks));
                }
                numeric.push(name.clone());
            } else if let Some((line, value)) = st
                .numbers
                .first_not_number
                .as_ref()
                .filter(|_| st.numbers.not_numbers * 10 <= non_blank)
            {
                // Mostly numbers: a placeholder (`NA`, `-`) or a typo, not text.
                notes.push(format!(
                    "left out `{name}`: numbers but for {} cells (`{value}` on line {line}): \
                     blank them (with `blank_numeric = \"zero\"` they read as 0) or fix them, \
                     then list `{name}` under `numeric`",
                    st.numbers.not_numbers
                ));
            } else if let Some((line, value)) = st
                .first_date
                .as_ref()
                .filter(|_| st.dates * 10 >= non_blank * 9)
            {
                notes.push(format!(
                    "left out `{name}`: dates (`{value}` on line {line}), which a customer \
                     table does not read: give the days since each date (or before your \
                     cutoff) as a number column and list it under `numeric`, or let the \
                     orders pipeline derive recency and tenure from an orders export \
                     (`data.orders_csv`)"
                ));
            } else if st.many {
                notes.push(format!(
                    "left out `{name}`: text with more than {cap} distinct values (free text, \
                     names or amounts the number reader does not take)"
                ));
            } else {
                // Placeholders stay out of the vocabulary: under the draft's
                // `unknown_category = "zeros"` they encode as none of its
                // values, as blank cells do.
                let (missing, vocabulary): (Vec<_>, Vec<_>) =
                    st.values.iter().partition(|(v, _)| is_placeholder(v));
                if vocabulary.is_empty() {
                    notes.push(format!(
                        "left out `{name}`: every cell is blank or a placeholder for a missing \
                         value ({})",
                        counted(&missing)
                    ));
                    continue;
                }
                categorical.push(Categorical {
                    name: name.clone(),
                    vocabulary: vocabulary.iter().map(|(v, _)| (*v).clone()).collect(),
                });
                if st.blanks > 0 {
                    notes.push(format!(
                        "`{name}`: {} blank cells encode as none of its values",
                        st.blanks
                    ));
                }
                if !missing.is_empty() {
                    let cells: usize = missing.iter().map(|(_, n)| **n).sum();
                    notes.push(format!(
                        "`{name}`: {cells} cells hold a placeholder for a missing value ({}): \
                         left out of the vocabulary, they encode as none of its values, like \
                         blank cells (`unknown_category = \"zeros\"`); if one is a real value, \
                         add it to `vocabulary`",
                        counted(&missing)
                    ));
                }
            }
        }
        let blank_numeric = if blank_numbers.is_empty() {
            BlankNumeric::Error
        } else {
            notes.push(format!(
                "blank numbers read as 0 (`blank_numeric = \"zero\"`): {}",
                blank_numbers.join(", ")
            ));
            BlankNumeric::Zero
        };
        let class = |v: String| match spellings.as_ref().and_then(|sp| sp.get(&v)) {
            Some(all) => all.clone(),
            None => vec![v],
        };
        if let Some(sp) = &spellings {
            let told: Vec<String> = sp
                .values()
                .map(|all| {
                    all.iter()
                        .map(|v| format!("`{v}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .collect();
            notes.push(format!(
                "label `{}` is written in several spellings, each class listed whole under \
                 `positive` and `negative`: {}",
                header[label],
                told.join("; ")
            ));
        }
        let schema = Schema {
            id: id.map(|c| header[c].clone()),
            label: header[label].clone(),
            positive: class(positive),
            negative: class(negative),
            numeric,
            categorical,
            blank_numeric,
            unknown_category: UnknownCategory::Zeros,
            decimal,
        };
        schema.check().map_err(err)?;
        Ok(Draft {
            schema,
            rows,
            notes,
        })
    }
}

/// Values and their counts as a note lists them: `` `?` 176, `NA` 176 ``.
fn counted(values: &[(&String, &usize)]) -> String {
    let shown: Vec<String> = values.iter().map(|(v, n)| format!("`{v}` {n}")).collect();
    shown.join(", ")
}

impl Draft {
    /// The draft as TOML, its notes as comments above it. With `section`
    /// (e.g. `data.schema`) the tables are nested under it, ready for a
    /// merchant's configuration; without, it is a `--schema` file.
    pub fn to_toml(&self, file: &Path, section: Option<&str>) -> String {
        // A comment ends at a line break and holds no control character;
        // a column name may hold either.
        let one_line = |s: &str| -> String {
            s.chars()
                .map(|c| {
                    if c.is_control() {
                        c.escape_debug().to_string()
                    } else {
                        c.to_string()
                    }
                })
                .collect()
        };
        let mut out = format!(
            "# Schema drafted from {} ({} rows). Review it: every merchant of a run\n\
             # must read its table with the same schema.\n",
            one_line(&file.display().to_string()),
            self.rows
        );
        for n in &self.notes {
            out.push_str(&format!("# - {}\n", one_line(n)));
        }
        if let Some(path) = section {
            out.push_str(&format!(
                "# Paste it after the keys of `[{}]`: a TOML table runs to the next header.\n",
                path.rsplit_once('.').map_or(path, |(parent, _)| parent)
            ));
        }
        let body = match section {
            None => toml::to_string(&self.schema),
            Some(path) => {
                let mut value = toml::Value::try_from(&self.schema).expect("a schema is TOML");
                for key in path.rsplit('.') {
                    let mut t = toml::map::Map::new();
                    t.insert(key.to_string(), value);
                    value = toml::Value::Table(t);
                }
                toml::to_string(&value)
            }
        };
        out.push_str(&body.expect("a schema serialises to TOML"));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draft(text: &str, opts: &DraftOptions) -> Result<Draft, DataError> {
        Schema::draft(text.as_bytes(), Path::new("t.csv"), b',', opts)
    }

    /// A label written `yes`, `Yes` and `YES` (and so for no) is two values
    /// once case is ignored: the draft lists every spelling of each class,
    /// which the reader accepts, where it gave up ("must hold exactly two
    /// values"); `--positive` in another spelling names its class.
    #[test]
    fn a_label_in_several_spellings_lists_each_class_whole() {
        let mut text = "id,tenure,churned\n".to_string();
        let spell = ["yes", "Yes", "YES", "no", "No", " NO"];
        for k in 0..60 {
            text.push_str(&format!("c{k},{},{}\n", k % 7, spell[k % 6]));
        }
        for opts in [
            DraftOptions::default(),
            DraftOptions {
                label: Some("churned".into()),
                positive: Some("YES".into()),
                ..Default::default()
            },
        ] {
            let d = draft(&text, &opts).unwrap();
            assert_eq!(d.schema.label, "churned");
            assert_eq!(d.schema.positive, ["YES", "Yes", "yes"]);
            assert_eq!(d.schema.negative, ["NO", "No", "no"]);
            assert!(
                d.notes
                    .iter()
                    .any(|n| n.contains("written in several spellings")),
                "{:?}",
                d.notes
            );
            // The table reads with it: half the rows churned.
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("t.csv");
            std::fs::write(&path, &text).unwrap();
            let t = d.schema.load_csv(&path).unwrap();
            assert_eq!(t.y.iter().filter(|&&y| y > 0.5).count(), 30);
        }
    }

    fn telco_path() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/telco-churn/Telco-Customer-Churn.csv")
    }

    /// On Telco the draft finds what the hand-written schema says, up to
    /// vocabulary order and `SeniorCitizen` (0/1, numeric either way).
    #[test]
    fn telco_drafts_to_the_hand_written_schema() {
        let file = std::fs::File::open(telco_path()).unwrap();
        let d = Schema::draft(file, &telco_path(), b',', &DraftOptions::default()).unwrap();
        let telco = Schema::telco();
        assert_eq!(d.rows, 7043);
        assert_eq!(d.schema.id, telco.id);
        assert_eq!(d.schema.label, "Churn");
        assert_eq!(
            (d.schema.positive.clone(), d.schema.negative.clone()),
            (telco.positive, telco.negative)
        );
        assert_eq!(d.schema.numeric, telco.numeric);
        assert_eq!(d.schema.blank_numeric, BlankNumeric::Zero);
        assert_eq!(d.schema.categorical.len(), telco.categorical.len());
        for (got, want) in d.schema.categorical.iter().zip(&telco.categorical) {
            assert_eq!(got.name, want.name);
            let mut w = want.vocabulary.clone();
            w.sort();
            assert_eq!(got.vocabulary, w, "{}", got.name);
        }
        // The drafted schema reads the table it came from, as the
        // hand-written one does.
        let ds = d.schema.load_csv(&telco_path()).unwrap();
        assert_eq!(ds.len(), 7043);
        assert_eq!(ds.y.iter().filter(|&&v| v > 0.5).count(), 1869);
        assert!(
            d.notes.iter().any(|n| n.contains("`TotalCharges` (11)")),
            "{:?}",
            d.notes
        );
    }

    /// A bank's churn table in another shape: a row number and a surname
    /// to leave out, an `Exited` label of 0/1, a blank-free numeric set.
    #[test]
    fn columns_of_one_name_are_left_out_of_the_draft_and_refused_as_its_label() {
        let mut text = String::from("id,age,notes,churn,notes,spend,notes\n");
        for r in 0..30 {
            text.push_str(&format!(
                "c{r},{},a{r},{},b,{}.5,c\n",
                20 + r % 7,
                ["yes", "no"][r % 2],
                r % 9
            ));
        }
        let d = draft(&text, &DraftOptions::default()).unwrap();
        assert_eq!(d.schema.label, "churn");
        assert_eq!(d.schema.numeric, ["age", "spend"]);
        assert!(d.schema.categorical.is_empty());
        assert!(
            d.notes.iter().any(|n| n
                == "left out `notes`: the header names it 3 times (fields 3, 5, 7); rename them \
                    to use them"),
            "{:?}",
            d.notes
        );
        // The draft reads back against the same table.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.csv");
        std::fs::write(&path, &text).unwrap();
        assert_eq!(d.schema.load_csv(&path).unwrap().ids.len(), 30);
        let e = draft(
            &text,
            &DraftOptions {
                label: Some("notes".into()),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("the header names the column `notes` twice (fields 3 and 5)"),
            "{e}"
        );
    }

    #[test]
    fn another_table_drafts_with_notes_for_what_it_left_out() {
        let mut text =
            String::from("RowNumber,CustomerId,Surname,Geography,Age,Balance,Exited,Bank\n");
        let places = ["France", "Spain", "Germany"];
        for r in 0..60 {
            text.push_str(&format!(
                "{},{},Name{},{},{},{}.5,{},Acme\n",
                r + 1,
                15_600_000 + r * 7,
                r,
                places[r % 3],
                20 + r % 40,
                1000 * (r % 9),
                u8::from(r % 4 == 0),
            ));
        }
        let d = draft(&text, &DraftOptions::default()).unwrap();
        assert_eq!(d.schema.id.as_deref(), Some("CustomerId"));
        assert_eq!(d.schema.label, "Exited");
        assert_eq!(
            (d.schema.positive[0].as_str(), d.schema.negative[0].as_str()),
            ("1", "0")
        );
        assert_eq!(d.schema.numeric, ["Age", "Balance"]);
        assert_eq!(d.schema.categorical.len(), 1);
        assert_eq!(
            d.schema.categorical[0].vocabulary,
            ["France", "Germany", "Spain"]
        );
        let left_out: Vec<&str> = d
            .notes
            .iter()
            .filter_map(|n| n.strip_prefix("left out `"))
            .map(|n| n.split('`').next().unwrap())
            .collect();
        assert_eq!(left_out, ["RowNumber", "Surname", "Bank"]);
        // The TOML reads back to the schema, standalone and nested.
        let toml_text = d.to_toml(Path::new("bank.csv"), None);
        assert!(
            toml_text.starts_with("# Schema drafted from bank.csv (60 rows)."),
            "{toml_text}"
        );
        assert_eq!(toml::from_str::<Schema>(&toml_text).unwrap(), d.schema);
        #[derive(serde::Deserialize)]
        struct Data {
            schema: Schema,
        }
        #[derive(serde::Deserialize)]
        struct Config {
            data: Data,
        }
        let nested = d.to_toml(Path::new("bank.csv"), Some("data.schema"));
        assert!(nested.contains("[data.schema]"), "{nested}");
        assert_eq!(
            toml::from_str::<Config>(&nested).unwrap().data.schema,
            d.schema
        );
    }

    /// A comma-separated table drafted with `--delimiter semicolon` is
    /// named as such, not reported as having no label column.
    #[test]
    fn a_table_read_with_the_wrong_separator_is_named_as_such() {
        let text = "id,gender,churn\n1,f,yes\n2,m,no\n";
        let e = Schema::draft(
            text.as_bytes(),
            Path::new("t.csv"),
            b';',
            &DraftOptions::default(),
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "t.csv: the header line is one column, `id,gender,churn`, and a customer table needs \
             at least an id and a label column; the line did not split: its fields are separated \
             by `,`: give the file's separator (`--delimiter`, or `delimiter` in the \
             configuration)"
        );
    }

    /// A label column named for who stayed (`is_active`, `retained`) reads
    /// its yes as not churned; one named for churn, or with churn words as
    /// values, keeps yes as churned. The note gives the churned share.
    #[test]
    fn a_label_that_names_who_stayed_takes_its_no_as_churned() {
        let table = |name: &str, yes: &str, no: &str| {
            let mut t = format!("id,spend,{name}\n");
            for r in 0..20 {
                t.push_str(&format!(
                    "{r},{}.5,{}\n",
                    r % 7,
                    if r % 4 == 0 { no } else { yes }
                ));
            }
            t
        };
        let polarity = |name: &str, yes: &str, no: &str| {
            let opts = DraftOptions {
                label: Some(name.into()),
                ..Default::default()
            };
            let d = draft(&table(name, yes, no), &opts).unwrap();
            (d.schema.positive[0].clone(), d.notes[0].clone())
        };
        for name in ["is_active", "retained", "Subscribed", "still_customer"] {
            for (yes, no) in [("TRUE", "FALSE"), ("1", "0"), ("Y", "N")] {
                let (positive, note) = polarity(name, yes, no);
                assert_eq!(positive, no, "{name}");
                assert!(
                    note.contains(
                        "(the column names who stayed): 5 of 20 rows (25.0 %) are churned"
                    ),
                    "{note}"
                );
            }
        }
        for name in ["churn", "inactive", "Exited", "label"] {
            let (positive, note) = polarity(name, "1", "0");
            assert_eq!(positive, "1", "{name}");
            assert!(
                note.ends_with(
                    "15 of 20 rows (75.0 %) are churned; if that is the share \
                                    who stayed, give the other value with `--positive`"
                ),
                "{note}"
            );
        }
        // Words that say churn keep their meaning whatever the column's name.
        assert_eq!(polarity("active", "stayed", "churned").0, "churned");
    }

    #[test]
    fn what_the_data_cannot_settle_is_asked_for_by_option() {
        let text = "id,a,status,flag\n1,2,gone,x\n2,3,kept,y\n3,4,gone,x\n";
        let e = draft(text, &DraftOptions::default()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "t.csv: cannot tell which column is the label: give it with `--label COLUMN` \
             (columns with exactly two values: status, flag)"
        );
        let opts = DraftOptions {
            label: Some("status".into()),
            ..Default::default()
        };
        let e = draft(text, &opts).unwrap_err();
        assert_eq!(
            e.to_string(),
            "t.csv: cannot tell which label value means churned: give it with `--positive VALUE` \
             (the label column `status` holds `gone` and `kept`)"
        );
        let opts = DraftOptions {
            positive: Some("gone".into()),
            ..opts
        };
        let d = draft(text, &opts).unwrap();
        assert_eq!(
            (d.schema.positive[0].as_str(), d.schema.negative[0].as_str()),
            ("gone", "kept")
        );
        let opts = DraftOptions {
            label: Some("a".into()),
            positive: None,
            ..Default::default()
        };
        assert_eq!(
            draft(text, &opts).unwrap_err().to_string(),
            "t.csv: label column `a` must hold exactly two values and no blank cell (it holds 3 \
             values: `2`, `3`, `4`)"
        );
    }

    /// An orders export given to the drafter said only that no column has
    /// two values: it says what the file looks like and where it goes.
    #[test]
    fn an_orders_export_is_named_as_such_with_the_orders_path() {
        let text = "Order ID,Customer ID,Order Date,Line Total\n\
                    1,900,01/01/2017 11:53,0.50\n2,900,02/01/2017 10:00,1.25\n\
                    3,901,03/01/2017 09:30,4.00\n4,902,03/01/2017 09:45,2.00\n";
        let e = draft(text, &DraftOptions::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(
                "t.csv: cannot tell which column is the label: give it with `--label COLUMN` \
                 (columns with exactly two values: none); this looks like an orders export, one \
                 line per order (`Customer ID` repeats, `Order Date` is the order time)"
            ) && e.contains("`data.orders_csv` with its column mapping `[data.orders]`")
                && e.contains("`fedcart-client prepare --orders FILE`"),
            "{e}"
        );
        // A customer table without a label is not called an export.
        let e = draft(
            "customer_id,signup_date,spend\n1,2017-01-01,3\n2,2017-02-01,4\n3,2017-02-01,5\n",
            &DraftOptions::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(!e.contains("orders export"), "{e}");
    }

    /// A column of dates was left out as "free text" (or, with few values,
    /// one-hot encoded as categories): it is left out naming the dates and
    /// how recency or tenure can come in instead (found by a data probe).
    #[test]
    fn a_date_column_is_left_out_as_dates_with_what_to_do() {
        let mut text = String::from("id,first purchase,signup,orders,churn\n");
        for i in 0..80 {
            text += &format!(
                "c{i},{:02}/{:02}/1997,2024-0{}-01,{},{}\n",
                1 + i % 28,
                1 + i % 12,
                1 + i % 3,
                i % 7,
                ["Yes", "No"][i % 2]
            );
        }
        let d = Schema::draft(
            text.as_bytes(),
            Path::new("t.csv"),
            b',',
            &DraftOptions::default(),
        )
        .unwrap();
        for (column, first) in [("first purchase", "01/01/1997"), ("signup", "2024-01-01")] {
            let note = d
                .notes
                .iter()
                .find(|n| n.starts_with(&format!("left out `{column}`")))
                .unwrap_or_else(|| panic!("{:?}", d.notes));
            assert!(
                note.contains(&format!("dates (`{first}` on line 2)"))
                    && note.contains("days since each date"),
                "{note}"
            );
        }
        assert_eq!(d.schema.numeric, ["orders"]);
        assert!(d.schema.categorical.is_empty(), "{:?}", d.schema);
        assert!(super::looks_like_date("1997-01-31 10:00"));
        assert!(!super::looks_like_date("12/03") && !super::looks_like_date("1.5.3"));
    }

    /// A European spreadsheet's table (`;`, `29,85`) drafts numeric columns
    /// with `decimal = "comma"`, and the schema then reads it; a mostly
    /// numeric column with a placeholder (`NA`) is named as such with its
    /// line, not as free text.
    #[test]
    fn decimal_commas_and_placeholders_in_numbers_are_drafted_by_name() {
        let mut text = String::from("id;spend;total;churn\n");
        for i in 0..30 {
            let total = if i == 7 {
                "NA".to_string()
            } else {
                format!("{},5", 100 + i)
            };
            text += &format!(
                "c{i};{},{:02};{total};{}\n",
                20 + i,
                i,
                ["Yes", "No"][i % 2]
            );
        }
        let d = Schema::draft(
            text.as_bytes(),
            Path::new("t.csv"),
            b';',
            &DraftOptions::default(),
        )
        .unwrap();
        assert_eq!(d.schema.decimal, DecimalMark::Comma);
        assert_eq!(d.schema.numeric, ["spend"]);
        assert!(
            d.notes.iter().any(|n| n.contains("decimal = \"comma\"")),
            "{:?}",
            d.notes
        );
        assert!(
            d.notes.iter().any(
                |n| n.starts_with("left out `total`: numbers but for 1 cells (`NA` on line 9)")
            ),
            "{:?}",
            d.notes
        );
        let ds = d
            .schema
            .read_delimited(text.as_bytes(), Path::new("t.csv"), b';')
            .unwrap();
        assert_eq!(ds.x[[1, 0]], 21.01);
        // The same table read as if its numbers had decimal points says which
        // setting to change.
        let point = Schema {
            decimal: DecimalMark::Point,
            ..d.schema
        };
        let e = point
            .read_delimited(text.as_bytes(), Path::new("t.csv"), b';')
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "t.csv: line 2, column `spend`: `20,00` is not a number with a decimal point (this \
             one has a decimal comma: `decimal = \"comma\"` under [data.schema], `decimal` in a \
             --schema file)"
        );
    }

    /// Prices that read with either decimal mark (`1.890`, and no `12,50`
    /// or `12.50` to settle it): a semicolon export drafts the decimal comma
    /// its spreadsheet wrote (it read `1.890` as 1.89, a thousandth of the
    /// price, without a word), a tab-separated one the point; the note names
    /// the cell and its other reading either way.
    #[test]
    fn numbers_that_read_with_either_decimal_mark_follow_the_delimiter_and_are_named() {
        let table = |sep: char| {
            let mut text = format!("id{sep}spend{sep}churn\n");
            for i in 0..30 {
                let spend = if i == 3 {
                    "1.890".to_string()
                } else {
                    (100 + i % 7).to_string()
                };
                text += &format!("c{i}{sep}{spend}{sep}{}\n", ["Yes", "No"][i % 2]);
            }
            text
        };
        let draft = |sep: char| {
            let text = table(sep);
            let d = Schema::draft(
                text.as_bytes(),
                Path::new("t.csv"),
                sep as u8,
                &DraftOptions::default(),
            )
            .unwrap();
            let ds = d
                .schema
                .read_delimited(text.as_bytes(), Path::new("t.csv"), sep as u8)
                .unwrap();
            (d, ds.x[[3, 0]])
        };
        let (d, spend) = draft(';');
        assert_eq!((d.schema.decimal, spend), (DecimalMark::Comma, 1890.0));
        assert!(
            d.notes.iter().any(|n| n.contains(
                "a decimal comma, as semicolon exports write them: `1.890` (column `spend`, \
                 line 5) reads as 1890; if it means 1.89, set `decimal = \"point\"`"
            )),
            "{:?}",
            d.notes
        );
        let (d, spend) = draft('\t');
        assert_eq!((d.schema.decimal, spend), (DecimalMark::Point, 1.89));
        assert!(
            d.notes.iter().any(|n| n.contains(
                "a decimal point: `1.890` (column `spend`, line 5) reads as 1.89; if it means \
                 1890, set `decimal = \"comma\"`"
            )),
            "{:?}",
            d.notes
        );
    }

    /// A table beside its label `churn` holding the label again as 0/1
    /// (`churn_value`, as IBM's Telco release has `Churn Value` beside
    /// `Churn Label`) and a churn reason blank for every customer who
    /// stayed: both went into the draft as features, and a model learnt the
    /// label from them (a perfect AUC on the table, none on customers still
    /// to come). They are left out, named, and a feature that only
    /// leans towards churn stays.
    #[test]
    fn columns_that_copy_the_label_are_left_out_and_named() {
        let mut text = String::from("id,spend,contract,churn_value,reason,churn\n");
        for i in 0..40 {
            let churned = i % 3 == 0;
            let reason = if churned {
                ["Price", "Competitor", "Moved"][i % 4 % 3]
            } else {
                ""
            };
            // Monthly contracts lean towards churn but do not give it.
            let contract = if churned || i % 4 == 1 {
                "Monthly"
            } else {
                "Yearly"
            };
            text += &format!(
                "c{i},{}.5,{contract},{},{reason},{}\n",
                10 + i % 7,
                u8::from(churned),
                if churned { "Yes" } else { "No" }
            );
        }
        let opts = DraftOptions {
            label: Some("churn".into()),
            ..Default::default()
        };
        let d = draft(&text, &opts).unwrap();
        assert_eq!(d.schema.numeric, ["spend"]);
        let categorical: Vec<&str> = d
            .schema
            .categorical
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(categorical, ["contract"]);
        let note = |name: &str| {
            d.notes
                .iter()
                .find(|n| n.starts_with(&format!("left out `{name}`: it gives the label")))
                .unwrap_or_else(|| panic!("{name}: {:?}", d.notes))
                .clone()
        };
        assert!(
            note("churn_value").starts_with(
                "left out `churn_value`: it gives the label on every row (`1` only on `Yes` \
                 rows, `0` only on `No` rows)"
            ),
            "{:?}",
            d.notes
        );
        assert!(
            note("reason").starts_with(
                "left out `reason`: it gives the label on every row (`Competitor`, `Moved` and \
                 1 more only on `Yes` rows, blank only on `No` rows)"
            ),
            "{:?}",
            d.notes
        );
    }

    /// `?` and `NA` in a text column were drafted as categories beside
    /// `Month-to-month`: they stay out of the vocabulary, the notes count
    /// them, and the schema reads them as none of its values, as blanks.
    #[test]
    fn placeholders_in_a_text_column_are_left_out_of_its_vocabulary_and_counted() {
        let mut text = String::from("id,contract,mood,churn\n");
        for (i, contract) in ["Monthly", "?", "Yearly", "NA", "", "?", "Monthly", "null"]
            .iter()
            .enumerate()
        {
            let mood = ["N/A", "-"][i % 2];
            text += &format!("c{i},{contract},{mood},{}\n", i % 2);
        }
        let d = draft(&text, &DraftOptions::default()).unwrap();
        assert_eq!(
            d.schema.categorical,
            [Categorical {
                name: "contract".into(),
                vocabulary: vec!["Monthly".into(), "Yearly".into()],
            }]
        );
        let has = |note: &str| d.notes.iter().any(|n| n == note);
        assert!(
            has(
                "`contract`: 4 cells hold a placeholder for a missing value (`?` 2, `NA` 1, \
                 `null` 1): left out of the vocabulary, they encode as none of its values, like \
                 blank cells (`unknown_category = \"zeros\"`); if one is a real value, add it \
                 to `vocabulary`"
            ) && has("`contract`: 1 blank cells encode as none of its values")
                && has(
                    "left out `mood`: every cell is blank or a placeholder for a missing \
                        value (`-` 4, `N/A` 4)"
                ),
            "{:?}",
            d.notes
        );
        let ds = d
            .schema
            .read_csv(text.as_bytes(), Path::new("t.csv"))
            .unwrap();
        assert_eq!(ds.x.row(0).to_vec(), [1.0, 0.0]);
        for placeholder_or_blank in [1, 3, 4, 7] {
            assert_eq!(ds.x.row(placeholder_or_blank).to_vec(), [0.0, 0.0]);
        }
    }

    /// Headers padded with spaces, and a column name holding a line break
    /// and a NUL (found by the `tabular_csv` fuzz target): the draft reads
    /// its table and its TOML, comments included, parses back.
    #[test]
    fn odd_headers_still_give_a_draft_that_reads_and_parses() {
        let text = "id , churn ,\"x\n\0y\",n\n1,0,k,3\n2,1,k,4\n";
        let d = draft(text, &DraftOptions::default()).unwrap();
        assert_eq!(d.schema.label, "churn");
        assert_eq!(d.schema.numeric, ["n"]);
        assert!(
            d.notes.iter().any(|n| n.contains("left out `x\n\0y`")),
            "{:?}",
            d.notes
        );
        let ds = d
            .schema
            .read_csv(text.as_bytes(), Path::new("t.csv"))
            .unwrap();
        assert_eq!(ds.len(), 2);
        let toml_text = d.to_toml(Path::new("t.csv"), None);
        assert_eq!(toml::from_str::<Schema>(&toml_text).unwrap(), d.schema);
    }

    /// A value another merchant's table lacks reads as none of the
    /// vocabulary under a drafted schema, instead of failing the table.
    #[test]
    fn drafted_schemas_read_unknown_categories_as_zeros() {
        let d = draft("id,c,churn\n1,p,0\n2,q,1\n", &DraftOptions::default()).unwrap();
        let ds = d
            .schema
            .read_csv(
                "id,c,churn\n1,r,0\n2,q,1\n".as_bytes(),
                Path::new("other.csv"),
            )
            .unwrap();
        assert_eq!(ds.x.row(0).to_vec(), [0.0, 0.0]);
        assert_eq!(ds.x.row(1).to_vec(), [0.0, 1.0]);
        let strict = Schema {
            unknown_category: UnknownCategory::Error,
            ..d.schema
        };
        let e = strict
            .read_csv("id,c,churn\n1,r,0\n".as_bytes(), Path::new("other.csv"))
            .unwrap_err();
        assert!(
            e.to_string().contains("`unknown_category = \"zeros\"`"),
            "{e}"
        );
    }
}
