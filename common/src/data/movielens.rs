//! MovieLens ratings (`userId,movieId,rating,timestamp`) as interactions, and
//! the standard recommender splits: a seeded random split of ratings for
//! explicit feedback, leave-last-out per user for implicit feedback, and a
//! partition of users into merchants with disjoint customers.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use crate::data::cells::TimestampFormat;
use crate::data::interactions::Interaction;
use crate::data::tabular::DataError;

/// Reads a MovieLens `ratings.csv`. Columns are found by header name, so
/// their order does not matter; every bad cell is reported with the file,
/// the 1-based line and the column. The names of `fedcart-client prepare`'s
/// `interactions.csv` (`user,item,value,timestamp`) are accepted as well.
pub fn load_ratings(path: &Path) -> Result<Vec<Interaction>, DataError> {
    load_ratings_delimited(path, b',')
}

/// [`load_ratings`] with another field separator (`\t`, `;`, `|`).
pub fn load_ratings_delimited(path: &Path, delimiter: u8) -> Result<Vec<Interaction>, DataError> {
    let file = std::fs::File::open(path).map_err(|source| DataError::Io {
        file: path.into(),
        source,
    })?;
    read_ratings_delimited(file, path, delimiter)
}

/// [`load_ratings`] from any reader; `path` only names the source in errors.
pub fn read_ratings<R: std::io::Read>(
    reader: R,
    path: &Path,
) -> Result<Vec<Interaction>, DataError> {
    read_ratings_delimited(reader, path, b',')
}

/// [`read_ratings`] with another field separator.
pub fn read_ratings_delimited<R: std::io::Read>(
    reader: R,
    path: &Path,
    delimiter: u8,
) -> Result<Vec<Interaction>, DataError> {
    let (header, records) = crate::data::tabular::table(reader, path, delimiter)?;
    // MovieLens' names, or those of `fedcart-client prepare`'s
    // `interactions.csv` (`user,item,value,timestamp`).
    let col = |name: &str, alias: &str| header.position(path, name, alias);
    let (cu, ci, cr, ct) = (
        col("userId", "user")?,
        col("movieId", "item")?,
        col("rating", "value")?,
        col("timestamp", "timestamp")?,
    );
    let mut out = Vec::new();
    for record in records {
        let (line, record) = record?;
        let cell = |c: usize, name: &str| {
            record
                .get(c)
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .ok_or_else(|| DataError::Cell {
                    file: path.into(),
                    line,
                    column: name.into(),
                    message: "missing value".into(),
                })
        };
        let bad = |name: &str, v: &str, what: &str| DataError::Cell {
            file: path.into(),
            line,
            column: name.into(),
            message: format!("`{v}` is not {what}"),
        };
        let user = cell(cu, "userId")?.to_string();
        let item = cell(ci, "movieId")?.to_string();
        let r = cell(cr, "rating")?;
        let value: f32 = r
            .parse()
            .ok()
            .filter(|v: &f32| {
                v.is_finite()
                    && f64::from(v.abs()) <= crate::data::standardize::MAX_FEATURE_MAGNITUDE
            })
            // 1e30 was read, and its square overflowed every RMSE to NaN.
            .ok_or_else(|| {
                // A decimal comma (`4,0`, a European export) was refused as
                // "not a finite number", which did not say why (found by a
                // data probe).
                if r.replacen(',', ".", 1).parse::<f32>().is_ok() {
                    bad(
                        "rating",
                        r,
                        "a number with a decimal point: ratings are read with a decimal point \
                         (4.5), and this looks like a decimal comma; write the ratings with \
                         points",
                    )
                } else {
                    bad("rating", r, "a finite number of magnitude at most 1e15")
                }
            })?;
        let t = cell(ct, "timestamp")?;
        // Unix seconds as MovieLens writes them, or a date as other exports
        // do. Here times only order each user's events, so a small integer
        // (an event number), which `auto` refuses in an orders export as a
        // likely spreadsheet serial day, is taken as seconds.
        let timestamp = TimestampFormat::Auto
            .parse(t)
            .or_else(|m| TimestampFormat::UnixSeconds.parse(t).map_err(|_| m))
            .map_err(|m| DataError::Cell {
                file: path.into(),
                line,
                column: "timestamp".into(),
                message: m,
            })?;
        out.push(Interaction {
            user,
            item,
            value,
            timestamp,
        });
    }
    if out.is_empty() {
        return Err(DataError::Empty { file: path.into() });
    }
    Ok(out)
}

/// Writes interactions as `user,item,rating,timestamp` (no quoting needed for
/// MovieLens ids), e.g. to hand the exact same split to another library.
pub fn write_csv(path: &Path, rows: &[Interaction]) -> Result<(), DataError> {
    let mut text = String::with_capacity(rows.len() * 24 + 32);
    text.push_str("user,item,rating,timestamp\n");
    for r in rows {
        text.push_str(&format!(
            "{},{},{},{}\n",
            r.user, r.item, r.value, r.timestamp
        ));
    }
    std::fs::write(path, text).map_err(|source| DataError::Io {
        file: path.into(),
        source,
    })
}

/// A seeded random split of all ratings: `(train, test)` with `fraction` of
/// the ratings held out, each part in the original order.
pub fn random_split(
    rows: &[Interaction],
    fraction: f64,
    seed: u64,
) -> (Vec<Interaction>, Vec<Interaction>) {
    let (tr, te) = crate::data::split::train_test(rows.len(), fraction, seed);
    let pick = |idx: Vec<usize>| idx.into_iter().map(|i| rows[i].clone()).collect();
    (pick(tr), pick(te))
}

/// Share of the training ratings kept aside for validation (explicit).
pub const VALIDATION_FRACTION: f64 = 0.1;

/// Carves the validation slice out of `train`: for implicit feedback each
/// user's latest remaining interaction (the same rule as the test split, so
/// validation mimics the test one step earlier and the test item is never
/// seen); for explicit feedback a seeded random [`VALIDATION_FRACTION`].
/// For ratings, where each row is its own event; orders use
/// [`validation_split_by_basket`]. Returns `(train, valid)`.
pub fn validation_split(
    train: &[Interaction],
    implicit: bool,
    seed: u64,
) -> (Vec<Interaction>, Vec<Interaction>) {
    if implicit {
        leave_last_out(train)
    } else {
        let seed = crate::seed::derive(seed, &["validation"]);
        random_split(train, VALIDATION_FRACTION, seed)
    }
}

/// [`validation_split`] for purchases from an orders log, where an order is
/// a basket of lines with one timestamp. For implicit feedback, each user's
/// last line of the basket *before the one the test item came from*
/// ([`leave_last_basket_out`]): the test item is the last line of the
/// user's latest basket, so the validation item is the last line of an
/// earlier one, the test rule one basket back. The line above the test item
/// in the same basket is a different kind of item: an export that sorts a
/// basket's lines (grocery-dev's sorts them by product id) makes the last
/// line special, and validation must hold that kind of line to choose what
/// the test rewards. Only `test`'s timestamps are read, never its items.
pub fn validation_split_by_basket(
    train: &[Interaction],
    test: &[Interaction],
    implicit: bool,
    seed: u64,
) -> (Vec<Interaction>, Vec<Interaction>) {
    if implicit {
        leave_last_basket_out(train, test)
    } else {
        validation_split(train, false, seed)
    }
}

/// Implicit feedback from ratings: keeps ratings `>= threshold` as purchases
/// of value 1.
pub fn implicit(rows: &[Interaction], threshold: f32) -> Vec<Interaction> {
    rows.iter()
        .filter(|r| r.value >= threshold)
        .map(|r| Interaction {
            value: 1.0,
            ..r.clone()
        })
        .collect()
}

/// Leave-last-out: each user's latest interaction (ties broken by the later
/// row) is held out; users with a single interaction keep it for training
/// and have nothing to be tested on. Returns `(train, test)`.
pub fn leave_last_out(rows: &[Interaction]) -> (Vec<Interaction>, Vec<Interaction>) {
    let mut last: BTreeMap<&str, usize> = BTreeMap::new();
    let mut count: BTreeMap<&str, usize> = BTreeMap::new();
    for (k, r) in rows.iter().enumerate() {
        *count.entry(&r.user).or_default() += 1;
        keep_latest(&mut last, rows, k);
    }
    let held: BTreeSet<usize> = last
        .iter()
        .filter(|(u, _)| count[*u] >= 2)
        .map(|(_, &k)| k)
        .collect();
    split_off(rows, &held)
}

/// Records row `k` as its user's latest in `latest` if no earlier-listed row
/// is later in time (ties go to the later row).
fn keep_latest<'a>(latest: &mut BTreeMap<&'a str, usize>, rows: &'a [Interaction], k: usize) {
    let e = latest.entry(rows[k].user.as_str()).or_insert(k);
    if rows[k].timestamp >= rows[*e].timestamp {
        *e = k;
    }
}

/// `(rows not in held, rows in held)`, each in the original order.
fn split_off(rows: &[Interaction], held: &BTreeSet<usize>) -> (Vec<Interaction>, Vec<Interaction>) {
    let mut kept = Vec::with_capacity(rows.len());
    let mut out = Vec::with_capacity(held.len());
    for (k, r) in rows.iter().enumerate() {
        if held.contains(&k) {
            out.push(r.clone());
        } else {
            kept.push(r.clone());
        }
    }
    (kept, out)
}

/// Leave-last-basket-out: for each user, the latest row (ties broken by the
/// later row) among those *strictly earlier* than the user's held-out row in
/// `test`, so the slice is the last line of an earlier basket, as the test
/// item is the last line of the latest one. A user without a test row or
/// without an earlier row falls back to [`leave_last_out`]'s rule; a user with
/// a single row keeps it. Returns `(train, valid)`.
pub fn leave_last_basket_out(
    rows: &[Interaction],
    test: &[Interaction],
) -> (Vec<Interaction>, Vec<Interaction>) {
    let before: BTreeMap<&str, i64> = test
        .iter()
        .map(|r| (r.user.as_str(), r.timestamp))
        .collect();
    let mut last: BTreeMap<&str, usize> = BTreeMap::new();
    let mut earlier: BTreeMap<&str, usize> = BTreeMap::new();
    let mut count: BTreeMap<&str, usize> = BTreeMap::new();
    for (k, r) in rows.iter().enumerate() {
        let u = r.user.as_str();
        *count.entry(u).or_default() += 1;
        keep_latest(&mut last, rows, k);
        if before.get(u).is_some_and(|&t| r.timestamp < t) {
            keep_latest(&mut earlier, rows, k);
        }
    }
    let held: BTreeSet<usize> = last
        .iter()
        .filter(|(u, _)| count[*u] >= 2)
        .map(|(u, &k)| earlier.get(u).copied().unwrap_or(k))
        .collect();
    split_off(rows, &held)
}

/// Deals the distinct users of `rows` into `merchants` groups after a seeded
/// shuffle; returns each merchant's user set. Customers never overlap.
pub fn partition_users(rows: &[Interaction], merchants: usize, seed: u64) -> Vec<BTreeSet<String>> {
    let users: Vec<&str> = rows
        .iter()
        .map(|r| r.user.as_str())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let idx: Vec<usize> = (0..users.len()).collect();
    crate::data::split::iid_partition(&idx, merchants, seed)
        .into_iter()
        .map(|part| part.into_iter().map(|i| users[i].to_string()).collect())
        .collect()
}

/// The rows whose user is in `users`.
pub fn rows_of(rows: &[Interaction], users: &BTreeSet<String>) -> Vec<Interaction> {
    rows.iter()
        .filter(|r| users.contains(&r.user))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(user: &str, item: &str, value: f32, timestamp: i64) -> Interaction {
        Interaction {
            user: user.into(),
            item: item.into(),
            value,
            timestamp,
        }
    }

    #[test]
    fn a_ratings_file_without_a_header_or_with_another_separator_says_so() {
        let read = |text: &str| {
            read_ratings(text.as_bytes(), Path::new("r.dat"))
                .unwrap_err()
                .to_string()
        };
        // MovieLens 1M's ratings.dat: `::`, no header.
        let one_m = read("1::1193::5::978300760\n1::661::3::978302109\n");
        assert!(
            one_m.contains("separated by `::`: convert it to commas")
                && one_m.ends_with(
                    "it looks like data, not a header: add a header line naming the columns"
                ),
            "{one_m}"
        );
        // MovieLens 100k's u.data: tabs, no header.
        let hundred_k = read("196\t242\t3\t881250949\n");
        assert!(
            hundred_k.contains("separated by tab: give the file's separator (`--delimiter`"),
            "{hundred_k}"
        );
        // Commas, no header.
        let no_header = read("1,2,4.0,10\n");
        assert!(
            no_header.ends_with("; the first line looks like data, not a header: add a header line naming the columns"),
            "{no_header}"
        );
        // A real header with other names: no guess.
        let other = read("user_id,item_id,score,ts\n1,2,4.0,10\n");
        assert!(
            other.ends_with("(header has: user_id,item_id,score,ts)"),
            "{other}"
        );
    }

    #[test]
    fn bad_cells_name_file_line_and_column() {
        let text = "userId,movieId,rating,timestamp\n1,2,4.0,10\n1,3,high,11\n";
        let err = read_ratings(text.as_bytes(), Path::new("r.csv")).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("r.csv") && msg.contains("line 3") && msg.contains("`rating`"),
            "{msg}"
        );
        // Dates other exports write read as timestamps; a bad one is named.
        let text = "user,item,value,timestamp\n1,2,4.0,2024-01-31\n1,3,5,20240201\n";
        let rows = read_ratings(text.as_bytes(), Path::new("r.csv")).unwrap();
        assert_eq!(
            rows.iter().map(|r| r.timestamp).collect::<Vec<_>>(),
            [1_706_659_200, 1_706_745_600]
        );
        let text = "user,item,value,timestamp\n1,2,4.0,31/01/2024\n";
        let msg = read_ratings(text.as_bytes(), Path::new("r.csv"))
            .unwrap_err()
            .to_string();
        assert!(
            msg.starts_with("r.csv: line 2, column `timestamp`: `31/01/2024` is not unix seconds"),
            "{msg}"
        );
        // MovieLens ships with CRLF line ends: the line is still the editor's.
        let text = "userId,movieId,rating,timestamp\r\n1,2,4.0,10\r\n\r\n1,3,high,11\r\n";
        let msg = read_ratings(text.as_bytes(), Path::new("r.csv"))
            .unwrap_err()
            .to_string();
        assert_eq!(
            msg,
            "r.csv: line 4, column `rating`: `high` is not a finite number of magnitude at most \
             1e15"
        );
        // A rating whose square overflows f32 (every RMSE read NaN).
        let text = "userId,movieId,rating,timestamp\n1,2,4.0,10\n1,3,1e30,11\n";
        let msg = read_ratings(text.as_bytes(), Path::new("r.csv"))
            .unwrap_err()
            .to_string();
        assert!(
            msg.starts_with("r.csv: line 3, column `rating`: `1e30`"),
            "{msg}"
        );
        // A decimal comma is named as such (it read "not a finite number").
        let text = "userId;movieId;rating;timestamp\n1;2;4,0;10\n";
        let msg = read_ratings_delimited(text.as_bytes(), Path::new("r.csv"), b';')
            .unwrap_err()
            .to_string();
        assert!(
            msg.starts_with(
                "r.csv: line 2, column `rating`: `4,0` is not a number with a decimal point"
            ) && msg.contains("looks like a decimal comma"),
            "{msg}"
        );
        let text = "userId,rating,timestamp\n1,4.0,10\n";
        let msg = read_ratings(text.as_bytes(), Path::new("r.csv"))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("movieId"), "{msg}");
    }

    #[test]
    fn bundled_ratings_load_completely() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/ml-latest-small/ratings.csv");
        let rows = load_ratings(&path).unwrap();
        assert_eq!(rows.len(), 100_836);
        assert_eq!(rows[0], row("1", "1", 4.0, 964_982_703));
    }

    #[test]
    fn leave_last_out_holds_out_each_users_latest() {
        let rows = vec![
            row("a", "1", 5.0, 3),
            row("a", "2", 5.0, 9),
            row("a", "3", 5.0, 5),
            row("b", "1", 5.0, 1),
        ];
        let (train, test) = leave_last_out(&rows);
        assert_eq!(test, vec![row("a", "2", 5.0, 9)]);
        assert_eq!(train.len(), 3);
    }

    #[test]
    fn user_partition_is_disjoint_and_complete() {
        let rows: Vec<_> = (0..50).map(|u| row(&u.to_string(), "1", 1.0, 0)).collect();
        let parts = partition_users(&rows, 4, 7);
        let total: usize = parts.iter().map(BTreeSet::len).sum();
        let union: BTreeSet<_> = parts.iter().flatten().collect();
        assert_eq!((total, union.len()), (50, 50));
        assert_eq!(parts, partition_users(&rows, 4, 7));
    }
}
