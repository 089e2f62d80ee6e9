//! Reading an orders export through its [`OrdersMapping`] into validated
//! [`Order`]s, with the bad-row policy applied row by row.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use super::mapping::{AmountIs, DecimalMark, Delimiter, OrdersMapping, SECONDS_PER_DAY};
use super::{BadRowPolicy, BadRowReason, Order, OrdersError, ReadReport};

/// How many skip messages the report keeps as examples.
const MAX_EXAMPLES: usize = 5;

/// The largest share of an export's rows that [`BadRowPolicy::Skip`] leaves
/// out for one reason that points to a setting, at [`MIN_SYSTEMATIC`] rows
/// or more.
const MAX_SKIPPED_SHARE: f64 = 0.1;

/// Fewer rows than this left out for one reason never make
/// [`BadRowPolicy::Skip`] refuse a read (a small export's two bad dates).
const MIN_SYSTEMATIC: u64 = 10;

/// A customer or item id as the reader keeps it: a whole number that a
/// spreadsheet wrote with a decimal zero (`17850.0`, UCI Online Retail's
/// customer ids) is that number (`17850`), as the lines written without it
/// are; any other id as written, trimmed. The two had been two customers.
pub fn id_key(raw: &str) -> &str {
    let raw = raw.trim();
    match raw.split_once('.') {
        Some((whole, zeros))
            if !whole.is_empty()
                && whole.bytes().all(|b| b.is_ascii_digit())
                && !zeros.is_empty()
                && zeros.bytes().all(|b| b == b'0') =>
        {
            whole
        }
        _ => raw,
    }
}

/// What one data row of the export is.
enum Line {
    /// An order line.
    Order(Order),
    /// A return of units bought earlier (a negative quantity), its quantity
    /// and amount made positive: netted against those purchases.
    Return(Order),
}

/// Header positions of the mapped columns.
struct Columns {
    customer: usize,
    item: Option<usize>,
    timestamp: usize,
    quantity: Option<usize>,
    amount: usize,
    rating: Option<usize>,
    merchant: Option<usize>,
    width: usize,
}

impl Columns {
    fn find(
        map: &OrdersMapping,
        header: &[String],
        header_line: u64,
        file: &Path,
    ) -> Result<Self, OrdersError> {
        let find = |key: &'static str, name: &str| {
            // Two columns of one name: either could be meant.
            if header.iter().filter(|h| *h == name).count() > 1 {
                return Err(OrdersError::Row {
                    file: file.into(),
                    line: header_line,
                    message: format!(
                        "the header names the column `{name}` more than once: rename one of \
                         them so the mapping names one column"
                    ),
                });
            }
            header.iter().position(|h| h == name).ok_or_else(|| {
                // Another case or stray spaces: the header field meant.
                let near = header
                    .iter()
                    .find(|h| h.trim().eq_ignore_ascii_case(name.trim()));
                let hint = if header.len() == 1 {
                    delimiter_hint(map.delimiter, &header[0], name)
                } else if let Some(near) = near {
                    // Names match exactly, case and spaces included.
                    format!("; did you mean `{near}`?")
                } else {
                    String::new()
                };
                OrdersError::MissingColumn {
                    file: file.into(),
                    column: name.into(),
                    key,
                    header: header
                        .iter()
                        .map(|h| format!("`{h}`"))
                        .collect::<Vec<_>>()
                        .join(", "),
                    hint,
                }
            })
        };
        let opt = |key: &'static str, name: &Option<String>| {
            name.as_deref().map(|n| find(key, n)).transpose()
        };
        if map.amount_is == AmountIs::UnitPrice && map.quantity.is_none() {
            return Err(OrdersError::Mapping {
                file: file.into(),
                message: format!(
                    "the amount column `{}` holds a unit price (`amount_is = \"unit_price\"`), \
                     so the line's value needs the quantity column: name it (`quantity`, or \
                     `--quantity-col`)",
                    map.amount
                ),
            });
        }
        Ok(Self {
            customer: find("customer", &map.customer)?,
            item: opt("item", &map.item)?,
            timestamp: find("timestamp", &map.timestamp)?,
            quantity: opt("quantity", &map.quantity)?,
            amount: find("amount", &map.amount)?,
            rating: opt("rating", &map.rating)?,
            merchant: opt("merchant", &map.merchant)?,
            width: header.len(),
        })
    }
}

/// Reads the export at `path`; see [`read_orders_from`].
pub fn read_orders(
    path: &Path,
    map: &OrdersMapping,
    policy: BadRowPolicy,
) -> Result<(Vec<Order>, ReadReport), OrdersError> {
    let file = std::fs::File::open(path).map_err(|source| OrdersError::Io {
        file: path.into(),
        source,
    })?;
    read_orders_from(file, path, map, policy)
}

/// Reads an export from any reader (`path` only names it in errors). Returns
/// the orders in file order and the read/skip counts.
pub fn read_orders_from<R: Read>(
    reader: R,
    path: &Path,
    map: &OrdersMapping,
    policy: BadRowPolicy,
) -> Result<(Vec<Order>, ReadReport), OrdersError> {
    let mut rows = records(reader, path, map.delimiter)?;
    let Some(mut header) = rows.next().transpose()? else {
        return Err(OrdersError::Empty { file: path.into() });
    };
    if let Some(declared) = excel_separator_line(&header.1, map.delimiter) {
        // Excel's `sep=;` first line: skipped when it declares the
        // separator in use, else the fix is named.
        if declared != map.delimiter.byte().map(char::from) {
            let name = declared
                .and_then(|c| c.to_string().parse::<Delimiter>().ok())
                .map_or("the one it names", Delimiter::name);
            return Err(OrdersError::Row {
                file: path.into(),
                line: header.0,
                message: format!(
                    "a spreadsheet's `sep=` line declaring the separator `{}`: give \
                     `--delimiter {name}` (or `delimiter = \"{name}\"` in the mapping: `[data.orders]` in merchant.toml), or \
                     delete the line",
                    declared.map_or(String::new(), String::from)
                ),
            });
        }
        let Some(next) = rows.next().transpose()? else {
            return Err(OrdersError::Empty { file: path.into() });
        };
        header = next;
    }
    let header_line = header.0;
    let header: Vec<String> = header.1.iter().map(|h| h.trim().to_string()).collect();
    let cols = Columns::find(map, &header, header_line, path)?;
    let mut orders = Vec::new();
    let mut lines = Vec::new();
    let mut report = ReadReport::default();
    // No order is placed after today: a later date is a placeholder
    // (`2099-01-01`) or a mistyped year, which would move the default churn
    // cutoff past every real order. A day of slack for time zones.
    let latest = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(i64::MAX, |d| d.as_secs() as i64)
        .saturating_add(SECONDS_PER_DAY);
    // Amounts read with the decimal point (the default) in an export whose
    // delimiter is not a comma: the first that a decimal comma reads as
    // another number (`1.890`), and whether any is one the point alone
    // reads (`12.50`), which settles it.
    let check_decimal = map.decimal == DecimalMark::Point && map.delimiter != Delimiter::Comma;
    let mut ambiguous_amount: Option<(u64, String)> = None;
    let mut point_amount = false;
    let mut returns = Vec::new();
    // Per reason left out: the first row's error, its column, and how many
    // of its cells were blank.
    let mut first_of: std::collections::BTreeMap<BadRowReason, (String, Option<String>)> =
        Default::default();
    let mut blank_of: std::collections::BTreeMap<BadRowReason, u64> = Default::default();
    for row in rows {
        let (line, fields) = row?;
        // A row of delimiters only (`,,,,`, what a spreadsheet writes for
        // an empty row) is a blank line, not an order with a blank customer.
        if fields.iter().all(|f| f.trim().is_empty()) {
            continue;
        }
        // Two exports joined end to end (`cat a.csv b.csv`): the second
        // header read as an order with a bad date, and the error sent the
        // merchant to `timestamp_format` (found by an operator probe).
        if fields.len() == header.len()
            && fields
                .iter()
                .zip(&header)
                .all(|(f, h)| f.trim() == h.trim())
        {
            return Err(OrdersError::Row {
                file: path.into(),
                line,
                message: "repeats the header line: two exports joined end to end? Delete the \
                          repeated header lines (one file has one header, on its first line)"
                    .into(),
            });
        }
        if check_decimal
            && !point_amount
            && let Some(raw) = fields.get(cols.amount).map(|f| f.trim())
        {
            if DecimalMark::ambiguous(raw) {
                ambiguous_amount.get_or_insert_with(|| (line, raw.to_string()));
            } else if raw.contains('.') && DecimalMark::Comma.parse(raw).is_none() {
                point_amount = DecimalMark::Point.parse(raw).is_some();
            }
        }
        report.rows_read += 1;
        match parse_row(&cols, &header, map, &fields, line, path, latest) {
            Ok(Line::Order(order)) => {
                report.rows_ok += 1;
                orders.push(order);
                lines.push(line);
            }
            Ok(Line::Return(order)) => returns.push(order),
            // A row of the wrong width whose cells run over several lines
            // is an unclosed quote: skipping it would drop every line up to
            // the next quote (to the end of the file, for one `"12 inch`)
            // as a single bad row.
            Err(OrdersError::Row {
                file,
                line,
                message,
            }) if policy.skips() && fields.iter().any(|f| f.contains('\n')) => {
                let breaks: usize = fields.iter().map(|f| f.matches('\n').count()).sum();
                // An unclosed quote at the end of the file also holds its
                // last line's break.
                let ends_open = fields.last().is_some_and(|f| f.ends_with('\n'));
                let spanned = if ends_open { breaks } else { breaks + 1 };
                return Err(OrdersError::Row {
                    file,
                    line,
                    message: format!(
                        "{message}; it runs over {} lines, which the bad-row policy `skip` \
                         would drop with it: correct the quote",
                        spanned
                    ),
                });
            }
            Err(e) if policy.skips() => {
                let (reason, column) = match &e {
                    OrdersError::Cell { reason, column, .. } => (*reason, Some(column.clone())),
                    _ => (BadRowReason::FieldCount, None),
                };
                *report.skipped.entry(reason).or_default() += 1;
                if let Some(c) = column
                    .as_ref()
                    .and_then(|c| header.iter().position(|h| h == c))
                    && fields.get(c).is_some_and(|f| f.trim().is_empty())
                {
                    *blank_of.entry(reason).or_default() += 1;
                }
                first_of
                    .entry(reason)
                    .or_insert_with(|| (e.to_string(), column));
                if report.examples.len() < MAX_EXAMPLES {
                    report.examples.push(e.to_string());
                }
            }
            Err(e) => return Err(e),
        }
    }
    if policy == BadRowPolicy::Skip
        && let Some((reason, count)) = report
            .skipped
            .iter()
            .filter(|(r, _)| r.points_to_a_setting())
            .max_by_key(|(_, n)| **n)
            .map(|(r, n)| (*r, *n))
        && count >= MIN_SYSTEMATIC
        && count as f64 > MAX_SKIPPED_SHARE * report.rows_read as f64
    {
        let (first, column) = first_of.remove(&reason).unwrap_or_default();
        let prefix = format!("{}: ", path.display());
        let blank = blank_of.get(&reason).copied().unwrap_or(0);
        let hint = match column {
            Some(column) if 2 * blank >= count => format!(
                "; `{column}` is blank on {blank} of these lines: is it filled only on each \
                 order's first line (as a Shopify export's `Paid at` is)? Map a column that \
                 every line fills"
            ),
            _ => String::new(),
        };
        return Err(OrdersError::TooManySkipped {
            file: path.into(),
            count,
            rows: report.rows_read,
            reason: reason.as_str(),
            first: first.strip_prefix(&prefix).unwrap_or(&first).to_string(),
            hint,
        });
    }
    if orders.is_empty() && report.rows_read > 0 && report.rows_skipped() > 0 {
        let first = report.examples.first().cloned().unwrap_or_default();
        // The example starts with the file's name: not said twice.
        let prefix = format!("{}: ", path.display());
        return Err(OrdersError::AllSkipped {
            file: path.into(),
            rows: report.rows_read,
            first: first.strip_prefix(&prefix).unwrap_or(&first).to_string(),
        });
    }
    net_returns(&mut orders, &mut lines, returns, &mut report);
    // Every order in unix time's first two years: the cells were read too
    // small (seconds as `unix_ms`, YYYYMMDD dates as `unix_seconds`), which
    // labels every customer churned. Milliseconds read as seconds and dates
    // after today are refused cell by cell.
    const TWO_YEARS: i64 = 2 * 365 * SECONDS_PER_DAY;
    let span = orders.iter().map(|o| o.timestamp);
    if let (Some(first), Some(last)) = (span.clone().min(), span.max())
        && (0..TWO_YEARS).contains(&first)
        && last < TWO_YEARS
    {
        let date = super::derive::format_date;
        return Err(OrdersError::Mapping {
            file: path.into(),
            message: format!(
                "every order reads as dated between {} and {}, in unix time's first two years: \
                 the timestamp format reads the cells too small (seconds read as `unix_ms`, or \
                 YYYYMMDD dates as `unix_seconds`?): set `timestamp_format` in the mapping \
                 (`--timestamp-format`) to what the column holds, or to `auto`",
                date(first),
                date(last)
            ),
        });
    }
    report.stray_dates = stray_dates(&orders, &lines);
    report.case_note = ids_differing_in_case(&orders);
    // A column named for a price, read as each line's total: UCI's
    // `UnitPrice` beside `Quantity` gave a customer 33.25 for 845.85 spent.
    let amount_name = &header[cols.amount];
    if map.amount_is == AmountIs::LineTotal
        && cols.quantity.is_some()
        && amount_name.to_lowercase().contains("price")
        && orders.iter().any(|o| o.quantity > 1.0)
    {
        report.amount_note = Some(format!(
            "the amount column `{amount_name}` is read as each line's total; its name says a \
             price: if it holds the price of one unit, give `--amount-is unit_price` \
             (`amount_is = \"unit_price\"` in the mapping) and each line is worth price × quantity"
        ));
    }
    if cols.item.is_some() {
        report.blank_items = orders.iter().filter(|o| o.item.is_none()).count() as u64;
    }
    if let Some((line, raw)) = ambiguous_amount.filter(|_| !point_amount) {
        let read = |mark: DecimalMark| mark.parse(&raw).unwrap_or_default();
        report.decimal_note = Some(format!(
            "amounts such as `{raw}` (line {line}) are read as {} with a decimal point; if the \
             dot groups thousands ({}), as semicolon exports often write them, give `--decimal \
             comma` (or `decimal = \"comma\"` in the mapping: `[data.orders]` in merchant.toml)",
            read(DecimalMark::Point),
            read(DecimalMark::Comma)
        ));
    }
    Ok((orders, report))
}

/// Nets each return against the same customer's purchases of the same item
/// (at the same merchant) dated no later than it, the latest first: their
/// units come off, and their value by the return's value per unit (never
/// below 0). A purchase returned whole is removed; a return that finds no
/// such purchase (bought before the export starts) is left out. Counted in
/// `report`.
fn net_returns(
    orders: &mut Vec<Order>,
    lines: &mut Vec<u64>,
    mut returns: Vec<Order>,
    report: &mut ReadReport,
) {
    if returns.is_empty() {
        return;
    }
    let key = |o: &Order| -> (String, Option<String>, Option<String>) {
        (o.customer.clone(), o.item.clone(), o.merchant.clone())
    };
    let mut by_key: std::collections::HashMap<_, Vec<usize>> = Default::default();
    for (i, o) in orders.iter().enumerate() {
        by_key.entry(key(o)).or_default().push(i);
    }
    // In time order, so that an earlier return takes from the purchases
    // before it first.
    returns.sort_by_key(|r| r.timestamp);
    // Purchases returned whole (a line of quantity 0 in the export stays).
    let mut emptied = vec![false; orders.len()];
    for r in &returns {
        let Some(bought) = by_key.get(&key(r)) else {
            report.returns_unmatched += 1;
            continue;
        };
        let mut candidates: Vec<usize> = bought
            .iter()
            .copied()
            .filter(|&i| orders[i].timestamp <= r.timestamp && orders[i].quantity > 0.0)
            .collect();
        if candidates.is_empty() {
            report.returns_unmatched += 1;
            continue;
        }
        // Latest first; ties in file order, the later line first.
        candidates.sort_by_key(|&i| std::cmp::Reverse((orders[i].timestamp, i)));
        let per_unit = r.amount / r.quantity;
        let mut left = r.quantity;
        for i in candidates {
            if left <= 0.0 {
                break;
            }
            let o = &mut orders[i];
            let taken = left.min(o.quantity);
            o.quantity -= taken;
            o.amount = (o.amount - taken * per_unit).max(0.0);
            emptied[i] = o.quantity <= 0.0;
            left -= taken;
        }
        report.returns += 1;
    }
    let before = orders.len();
    let mut k = emptied.iter();
    orders.retain(|_| !k.next().copied().unwrap_or(false));
    let mut k = emptied.iter();
    lines.retain(|_| !k.next().copied().unwrap_or(false));
    report.returned_whole = (before - orders.len()) as u64;
}

/// Customer ids that differ from another only in case (`EMMA@GMX.DE`,
/// `emma@gmx.de`): read as different customers, one of them churned and
/// the other not, when they are one. Said, naming the first pair; not
/// merged, since ids may be case-sensitive.
fn ids_differing_in_case(orders: &[Order]) -> Option<String> {
    let mut by_folded: std::collections::HashMap<String, &str> = Default::default();
    let mut pairs = 0usize;
    let mut first: Option<(&str, &str)> = None;
    let mut seen: std::collections::HashSet<&str> = Default::default();
    for o in orders {
        if !seen.insert(o.customer.as_str()) {
            continue;
        }
        let folded = o.customer.to_lowercase();
        match by_folded.get(&folded) {
            Some(other) => {
                pairs += 1;
                first.get_or_insert((other, o.customer.as_str()));
            }
            None => {
                by_folded.insert(folded, o.customer.as_str());
            }
        }
    }
    let (a, b) = first?;
    Some(format!(
        "{pairs} customer id{} differ{} from another only in case (`{a}` and `{b}`, …): they are \
         read as different customers; if they are one, write them alike in the export",
        if pairs == 1 { "" } else { "s" },
        if pairs == 1 { "s" } else { "" },
    ))
}

/// Lines dated far outside the rest of the export. The middle 98 % of the
/// lines' dates set the export's span; a line more than twice that span
/// (and at least a year) before or after it is stray: a placeholder date
/// (`1900-01-01`, `1970-01-01`) or a mistyped year, which would stretch
/// its customer's tenure and gaps between orders. Exports of fewer than
/// 100 lines have no such middle and are not checked.
fn stray_dates(orders: &[Order], lines: &[u64]) -> Option<String> {
    const MIN_LINES: usize = 100;
    if orders.len() < MIN_LINES {
        return None;
    }
    let mut times: Vec<i64> = orders.iter().map(|o| o.timestamp).collect();
    times.sort_unstable();
    let (lo, hi) = (times[times.len() / 100], times[times.len() * 99 / 100]);
    // Saturating: unix seconds may sit anywhere in i64.
    let margin = hi
        .saturating_sub(lo)
        .saturating_mul(2)
        .max(365 * SECONDS_PER_DAY);
    let (from, to) = (lo.saturating_sub(margin), hi.saturating_add(margin));
    let stray: Vec<(u64, i64)> = orders
        .iter()
        .zip(lines)
        .filter(|(o, _)| o.timestamp < from || o.timestamp > to)
        .map(|(o, &line)| (line, o.timestamp))
        .collect();
    if stray.is_empty() {
        return None;
    }
    let date = super::derive::format_date;
    let shown: Vec<String> = stray
        .iter()
        .take(3)
        .map(|(line, t)| format!("line {line} {}", date(*t)))
        .collect();
    Some(format!(
        "{} order line{} dated far outside the others, which run from {} to {} (98 % of \
         lines): {}{}. A placeholder or mistyped date stretches its customer's tenure and gaps \
         between orders: correct those lines, or remove them from the export",
        stray.len(),
        if stray.len() == 1 { " is" } else { "s are" },
        date(lo),
        date(hi),
        shown.join(", "),
        if stray.len() > shown.len() {
            ", …"
        } else {
            ""
        }
    ))
}

/// The separator a spreadsheet's first line `sep=X` declares (`None`
/// inside for an empty declaration), or `None` when the header is not such
/// a line. Split by the mapping's separator `sep=;` is `["sep=", ""]` when
/// it declares that separator, one field `sep=;` otherwise.
fn excel_separator_line(fields: &[String], delimiter: Delimiter) -> Option<Option<char>> {
    match fields {
        [only] => only
            .trim()
            .strip_prefix("sep=")
            .map(|rest| rest.chars().next()),
        [first, second] if first.trim() == "sep=" && second.is_empty() => {
            Some(delimiter.byte().map(char::from))
        }
        _ => None,
    }
}

/// How a negative number is written when it is not `-12.50`: an
/// accountant's `(12.50)`, a trailing `12.50-`, or a Unicode minus
/// `−12.50`. `None` when `raw` is none of these with a number inside.
fn other_negative(raw: &str, decimal: DecimalMark) -> Option<&'static str> {
    let (inner, written) =
        if let Some(inner) = raw.strip_prefix('(').and_then(|r| r.strip_suffix(')')) {
            (inner, "in parentheses")
        } else if let Some(inner) = raw.strip_suffix('-') {
            (inner, "with a trailing minus")
        } else if let Some(inner) = raw.strip_prefix('\u{2212}') {
            (inner, "with a Unicode minus sign")
        } else {
            return None;
        };
    decimal
        .parse(inner)
        .is_some_and(|v| v.is_finite() && v > 0.0)
        .then_some(written)
}

/// The ISO-4217-like code (`EUR`, `usd`) before or after an amount that
/// otherwise reads as a number.
fn currency_code(raw: &str, decimal: DecimalMark) -> Option<&str> {
    let is_code = |w: &str| w.len() == 3 && w.chars().all(|c| c.is_ascii_alphabetic());
    let (code, rest) = match raw.split_once(' ') {
        Some((a, b)) if is_code(a) => (a, b),
        _ => match raw.rsplit_once(' ') {
            Some((a, b)) if is_code(b) => (b, a),
            _ => return None,
        },
    };
    decimal.parse(rest.trim()).map(|_| code)
}

/// What to say when the header did not split: which other delimiter would
/// have found the missing column, if one would.
fn delimiter_hint(used: Delimiter, header: &str, column: &str) -> String {
    let fits = [
        Delimiter::Comma,
        Delimiter::Tab,
        Delimiter::Semicolon,
        Delimiter::Pipe,
    ]
    .into_iter()
    .find(|d| {
        *d != used
            && d.byte()
                .is_some_and(|b| header.split(char::from(b)).any(|h| h.trim() == column))
    })
    // CDNOW's own layout: columns padded with spaces.
    .or_else(|| {
        (used != Delimiter::Whitespace && header.split_whitespace().any(|h| h == column))
            .then_some(Delimiter::Whitespace)
    });
    let used = used.name();
    match fits {
        Some(d) => {
            let name = d.name();
            format!(
                "; the header split into a single field with the delimiter {used}, it splits \
                 with {name}: `--delimiter {name}`, or `delimiter = \"{name}\"` in the mapping: \
                 `[data.orders]` in merchant.toml"
            )
        }
        None => format!("; the header split into a single field, is the delimiter ({used}) right?"),
    }
}

type Record = (u64, Vec<String>);

/// The non-blank lines of the export as `(1-based line, fields)`.
fn records<'a, R: Read + 'a>(
    reader: R,
    path: &'a Path,
    delimiter: Delimiter,
) -> Result<Box<dyn Iterator<Item = Result<Record, OrdersError>> + 'a>, OrdersError> {
    let row_err = move |line: u64, e: &dyn std::fmt::Display| OrdersError::Row {
        file: path.into(),
        line,
        message: e.to_string(),
    };
    match delimiter.byte() {
        Some(sep) => {
            let records =
                crate::data::csv_lines::line_records(reader, sep, path).map_err(|source| {
                    OrdersError::Io {
                        file: path.into(),
                        source,
                    }
                })?;
            Ok(Box::new(records.map(move |r| match r {
                Ok((line, r)) => Ok((line, r.iter().map(str::to_string).collect())),
                Err((line, e)) => Err(row_err(line, &crate::data::csv_lines::message(&e))),
            })))
        }
        None => {
            // As the csv crate's path does: a UTF-8 byte order mark is not
            // part of the first column's name (it read "missing column
            // `customer_id`" beside a header listing `customer_id`), and
            // UTF-16, compression and workbooks are named.
            let mut reader = BufReader::new(reader);
            let head = reader.fill_buf().map_err(|source| OrdersError::Io {
                file: path.into(),
                source,
            })?;
            if let Some(message) = crate::data::csv_lines::unreadable(head, path) {
                return Err(row_err(1, &message));
            }
            if head.starts_with(&[0xEF, 0xBB, 0xBF]) {
                reader.consume(3);
            }
            let lines = reader.lines().enumerate();
            Ok(Box::new(lines.filter_map(move |(i, l)| {
                let line = i as u64 + 1;
                match l {
                    Err(e) if e.kind() == std::io::ErrorKind::InvalidData => Some(Err(row_err(
                        line,
                        &format!("not UTF-8 text: {}", crate::data::csv_lines::NOT_UTF8),
                    ))),
                    Err(e) => Some(Err(row_err(line, &e))),
                    Ok(text) => {
                        let fields: Vec<String> =
                            text.split_whitespace().map(str::to_string).collect();
                        (!fields.is_empty()).then_some(Ok((line, fields)))
                    }
                }
            })))
        }
    }
}

/// The longest cell a message quotes whole; a longer one (a 3 MB
/// timestamp once made a 3 MB error) is quoted by its start and its length.
const MAX_QUOTED_CELL: usize = 80;

/// `message` with each quotation of `raw` cut to its first
/// [`MAX_QUOTED_CELL`] characters when `raw` is longer than that.
fn shorten_cell(message: String, raw: &str) -> String {
    if raw.chars().count() <= MAX_QUOTED_CELL {
        return message;
    }
    let start: String = raw.chars().take(MAX_QUOTED_CELL).collect();
    let short = format!("{start}… ({} bytes in all)", raw.len());
    // Escaped for display when it holds control characters (`number`).
    let escaped = raw.escape_debug().to_string();
    message.replace(raw, &short).replace(&escaped, &short)
}

/// Unix seconds of the usual placeholder dates, each at midnight UTC:
/// 1970-01-01 (unix 0), 1899-12-30 and 1899-12-31 (spreadsheet day 0),
/// 1900-01-01, 0001-01-01.
const PLACEHOLDER_DATES: [i64; 5] = [
    0,
    -2_209_161_600,
    -2_209_075_200,
    -2_208_988_800,
    -62_135_596_800,
];

/// 1899-12-30 00:00 UTC, a spreadsheet's day 0: a cell holding only a time
/// (`10:30`) is that day plus the time, and Lotus-compatible sheets show
/// the next day, 1899-12-31. Either day, at any time, is no order's date;
/// only their midnights were among [`PLACEHOLDER_DATES`], and such lines
/// pass the stray-date check once they are 1 % of the lines.
const SPREADSHEET_DAY_ZERO: i64 = -2_209_161_600;

fn parse_row(
    cols: &Columns,
    header: &[String],
    map: &OrdersMapping,
    fields: &[String],
    line: u64,
    path: &Path,
    latest: i64,
) -> Result<Line, OrdersError> {
    if fields.len() != cols.width {
        return Err(OrdersError::Row {
            file: path.into(),
            line,
            message: format!(
                "{} fields, the header has {}{}",
                fields.len(),
                cols.width,
                if fields.iter().any(|f| f.contains('\n')) {
                    " (a field runs over several lines: an opening `\"` without its closing \
                     quote, on this line or one above?)"
                } else if map.delimiter == Delimiter::Whitespace {
                    " (with the delimiter whitespace every run of spaces or tabs separates, \
                     so a cell holding a space splits in two: for a tab-separated file give \
                     `--delimiter tab`, or `delimiter = \"tab\"` in the mapping)"
                } else {
                    ""
                }
            ),
        });
    }
    let cell = |c: usize, reason: BadRowReason, message: String| OrdersError::Cell {
        file: path.into(),
        line,
        column: header[c].clone(),
        reason,
        message: shorten_cell(message, fields[c].trim()),
    };
    let get = |c: usize| fields[c].trim();
    // `signed`: a value below 0 is returned, not refused (a return's
    // quantity, and its amount).
    let number = |c: usize, bad: BadRowReason, negative: BadRowReason, signed: bool| {
        let raw = get(c);
        // Quoted in messages as the merchant would see it in an editor:
        // a NUL or another control character is shown escaped, not raw.
        let shown = if raw.chars().any(char::is_control) {
            raw.escape_debug().to_string()
        } else {
            raw.to_string()
        };
        let raw_for_msg = shown.as_str();
        if bad != BadRowReason::BadRating
            && let Some(written) = other_negative(raw, map.decimal)
        {
            return Err(cell(
                c,
                negative,
                format!(
                    "`{raw_for_msg}` is negative, written {written} (a return or a refund? the \
                     bad-row policy `skip` leaves such rows out and counts them)"
                ),
            ));
        }
        let v: f32 = map
            .decimal
            .parse(raw)
            .filter(|v: &f32| v.is_finite())
            .ok_or_else(|| {
                let raw = raw_for_msg;
                let message = if raw.is_empty() {
                    "empty, not a number".to_string()
                } else if map.decimal == DecimalMark::Point
                    && DecimalMark::Comma.parse(raw).is_some_and(f32::is_finite)
                {
                    format!("`{raw}` is not a number with a decimal point (for a decimal comma: `--decimal comma`, or `decimal = \"comma\"` in the mapping: `[data.orders]` in merchant.toml)")
                } else if map.decimal == DecimalMark::Comma
                    && DecimalMark::Point.parse(raw).is_some_and(f32::is_finite)
                {
                    // It named the setting already in use: the fix is the other one.
                    format!("`{raw}` is not a number with a decimal comma: it has a decimal point, as if the file uses one (then give `--decimal point`, or `decimal = \"point\"` in the mapping: `[data.orders]` in merchant.toml)")
                } else if raw.parse::<f64>().is_ok_and(|v| v.is_finite() && v.abs() > 1.0) {
                    format!("`{raw}` is too large (the largest is about 3.4e38)")
                } else if let Some(code) = currency_code(raw, map.decimal) {
                    format!(
                        "`{raw}` carries the currency code `{code}`: the column must hold the \
                         amount alone (a symbol such as $ or € is read, a code is not)"
                    )
                } else {
                    format!("`{raw}` is not a finite number")
                };
                cell(c, bad, message)
            })?;
        if v < 0.0 && bad != BadRowReason::BadRating && !signed {
            return Err(cell(
                c,
                negative,
                format!(
                    "`{raw}` is negative (a return or a refund? the bad-row policy `skip` \
                     leaves such rows out and counts them)"
                ),
            ));
        }
        Ok(v)
    };
    let customer = id_key(get(cols.customer));
    if customer.is_empty() {
        return Err(cell(
            cols.customer,
            BadRowReason::BlankCustomer,
            "blank customer id".into(),
        ));
    }
    // A blank item (a gift card, a custom line) is still a purchase: it
    // counts toward its customer's spend and orders, and is left out of the
    // interactions (`ReadReport::blank_items`). Skipped, it had been taken
    // off the customer's spend too.
    let item = match cols.item {
        Some(c) if get(c).is_empty() => None,
        Some(c) => Some(id_key(get(c)).to_string()),
        None => None,
    };
    // A blank store became a store named "" of its own, under a natural
    // partition a merchant of its own.
    let merchant = match cols.merchant {
        Some(c) if get(c).is_empty() => {
            return Err(cell(
                c,
                BadRowReason::BlankMerchant,
                "blank merchant (store) id".into(),
            ));
        }
        Some(c) => Some(get(c).to_string()),
        None => None,
    };
    let timestamp = map
        .timestamp_format
        .parse(get(cols.timestamp))
        .map_err(|m| cell(cols.timestamp, BadRowReason::BadTimestamp, m))?;
    // The dates a system writes for "unknown": exactly midnight of unix
    // time's start, of spreadsheets' day 0 and 1, of year 1. A few percent
    // of such lines escape the stray-date check (its span is the middle
    // 98 %) and stretch their customers' tenure by decades. A date after
    // today is a placeholder or a mistyped year too.
    let raw = get(cols.timestamp);
    // Formatted only for a refused line: this runs for every line.
    let read_as = || super::derive::format_date(timestamp);
    let refused = if PLACEHOLDER_DATES.contains(&timestamp) {
        Some(format!(
            "`{raw}` (read as {}) is a placeholder date, not when the order was placed:",
            read_as()
        ))
    } else if (SPREADSHEET_DAY_ZERO..SPREADSHEET_DAY_ZERO + 2 * 86_400).contains(&timestamp) {
        Some(format!(
            "`{raw}` (read as {}) is a spreadsheet's day 0 with a time of day: a time-only \
             cell, not when the order was placed:",
            read_as()
        ))
    } else if timestamp > latest {
        Some(format!(
            "`{raw}` is in the future (read as {}): a placeholder date or a mistyped year?",
            read_as()
        ))
    } else {
        None
    };
    if let Some(why) = refused {
        let message = format!(
            "{why} correct the line, or the bad-row policy `skip` leaves such rows out and \
             counts them"
        );
        return Err(cell(
            cols.timestamp,
            BadRowReason::BadTimestamp,
            shorten_cell(message, raw),
        ));
    }
    let quantity = match cols.quantity {
        Some(c) => number(
            c,
            BadRowReason::BadQuantity,
            BadRowReason::NegativeQuantity,
            true,
        )?,
        None => 1.0,
    };
    // A return (UCI's cancellations, `C536379`, carry `-2`): its amount may
    // be written negative too, or as the positive unit price.
    let returned = quantity < 0.0;
    let quantity = quantity.abs();
    let amount = number(
        cols.amount,
        BadRowReason::BadAmount,
        BadRowReason::NegativeAmount,
        returned,
    )?
    .abs();
    let amount = match map.amount_is {
        AmountIs::LineTotal => amount,
        // Both cells are finite; their product may not be.
        AmountIs::UnitPrice => Some(amount * quantity).filter(|v| v.is_finite()).ok_or_else(|| {
            cell(
                cols.amount,
                BadRowReason::BadAmount,
                format!(
                    "unit price `{}` × quantity `{quantity}` is too large (the largest is about \
                     3.4e38)",
                    get(cols.amount)
                ),
            )
        })?,
    };
    let rating = cols
        .rating
        .map(|c| number(c, BadRowReason::BadRating, BadRowReason::BadRating, false))
        .transpose()?;
    let order = Order {
        customer: customer.to_string(),
        item,
        timestamp,
        quantity,
        amount,
        rating,
        merchant,
    };
    Ok(if returned {
        Line::Return(order)
    } else {
        Line::Order(order)
    })
}
