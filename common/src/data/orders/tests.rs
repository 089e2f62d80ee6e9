//! Tests of the orders pipeline: bad rows, skip counts, derivation by hand,
//! and the bundled CDNOW log end to end.

use std::path::Path;

use super::derive::{FEATURE_NAMES, format_date};
use super::mapping::SECONDS_PER_DAY;
use super::*;

fn mapping() -> OrdersMapping {
    OrdersMapping {
        customer: "customer".into(),
        item: Some("item".into()),
        timestamp: "ts".into(),
        timestamp_format: TimestampFormat::Auto,
        quantity: Some("qty".into()),
        amount: "price".into(),
        amount_is: Default::default(),
        rating: None,
        merchant: None,
        delimiter: Delimiter::Comma,
        decimal: Default::default(),
    }
}

fn read(
    text: &str,
    map: &OrdersMapping,
    policy: BadRowPolicy,
) -> Result<(Vec<Order>, ReadReport), OrdersError> {
    read_orders_from(text.as_bytes(), Path::new("orders.csv"), map, policy)
}

fn fail_message(text: &str, map: &OrdersMapping) -> String {
    read(text, map, BadRowPolicy::Fail).unwrap_err().to_string()
}

const HEADER: &str = "customer,item,ts,qty,price\n";

#[test]
fn missing_column_names_file_line_and_column() {
    let mut map = mapping();
    map.amount = "amount".into();
    assert_eq!(
        fail_message(&format!("{HEADER}c1,i1,2024-01-01,1,9.5\n"), &map),
        "orders.csv: line 1: missing column `amount`, the mapping's `amount` (header has: \
         `customer`, `item`, `ts`, `qty`, `price`)"
    );
    // A name in another case is pointed at.
    map.amount = "Price".into();
    assert_eq!(
        fail_message(&format!("{HEADER}c1,i1,2024-01-01,1,9.5\n"), &map),
        "orders.csv: line 1: missing column `Price`, the mapping's `amount` (header has: \
         `customer`, `item`, `ts`, `qty`, `price`); did you mean `price`?"
    );
}

#[test]
fn unparsable_date_names_file_line_and_column() {
    let text = format!("{HEADER}c1,i1,2024-01-01,1,9.5\nc2,i2,2024-02-30,1,3\n");
    assert_eq!(
        fail_message(&text, &mapping()),
        "orders.csv: line 3, column `ts`: `2024-02-30` is not unix seconds, an ISO-8601 date or YYYYMMDD \
         (another layout needs a strftime timestamp format, e.g. `%m/%d/%Y %H:%M`)"
    );
}

/// A placeholder date in the future (`2099-01-01` on 1 % of lines) moved
/// the default churn cutoff to 2098 with no warning: every real customer
/// read as churned by recency. No order is placed after today: the line is
/// refused, or left out and counted under `skip`.
#[test]
fn an_order_dated_in_the_future_is_a_bad_row() {
    let text =
        format!("{HEADER}c1,i1,2024-01-01,1,9.5\nc2,i2,2099-01-01,1,3\nc3,i2,2024-01-03,1,3\n");
    assert_eq!(
        fail_message(&text, &mapping()),
        "orders.csv: line 3, column `ts`: `2099-01-01` is in the future (read as 2099-01-01): a \
         placeholder date or a mistyped year? correct the line, or the bad-row policy `skip` \
         leaves such rows out and counts them"
    );
    let (orders, report) = read(&text, &mapping(), BadRowPolicy::Skip).unwrap();
    assert_eq!(orders.len(), 2);
    assert_eq!(report.skipped[&BadRowReason::BadTimestamp], 1);
    // Today is not the future (nor tomorrow, in another time zone).
    let today = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let text = format!("{HEADER}c1,i1,{today},1,9.5\n");
    assert_eq!(
        read(&text, &mapping(), BadRowPolicy::Fail).unwrap().0.len(),
        1
    );
}

/// A decimal-comma export read with a decimal point under `skip` lost every
/// row, and the error then blamed the churn cutoff (the agent) or an empty
/// file (`prepare`). The error says every row was left out, and why the
/// first was.
#[test]
fn an_export_whose_every_row_is_skipped_says_why_the_first_was() {
    let text = format!("{HEADER}c1,i1,2024-01-01,1,\"0,5\"\nc2,i2,2024-01-02,1,\"1,5\"\n");
    let e = read(&text, &mapping(), BadRowPolicy::Skip)
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with(
            "orders.csv: every one of its 2 rows was left out as unusable (the bad-row policy \
             `skip`); the first: line 2, column `price`: `0,5` is not a number with a decimal point"
        ),
        "{e}"
    );
}

/// Unix seconds read as `unix_ms` put every order in January 1970 and
/// labelled every customer churned, with only a warning about the cutoff;
/// YYYYMMDD dates read as `unix_seconds` gave August 1970 and an error
/// about the cutoff. Refused, naming the format as the likely fault.
#[test]
fn an_export_read_into_unix_times_first_years_names_the_timestamp_format() {
    for (format, cells) in [
        ("unix_ms", ["1483228800", "1485907200"]),
        ("unix_seconds", ["19970101", "19970325"]),
    ] {
        let mut map = mapping();
        map.timestamp_format = format.parse().unwrap();
        let text = format!("{HEADER}c1,i1,{},1,9.5\nc2,i2,{},1,3\n", cells[0], cells[1]);
        let e = fail_message(&text, &map);
        assert!(
            e.starts_with("orders.csv: every order reads as dated between 1970-")
                && e.contains("the timestamp format reads the cells too small")
                && e.ends_with("to what the column holds, or to `auto`"),
            "{format}: {e}"
        );
    }
    // Read as what they are, they pass.
    let mut map = mapping();
    map.timestamp_format = "unix_seconds".parse().unwrap();
    let text = format!("{HEADER}c1,i1,1483228800,1,9.5\nc2,i2,1485907200,1,3\n");
    assert_eq!(read(&text, &map, BadRowPolicy::Fail).unwrap().0.len(), 2);
}

/// `1970-01-01` on 3 % of lines escaped the stray-date check (its span is
/// the middle 98 % of dates) and stretched those customers' tenure by
/// decades; the run then advised fewer merchants. The usual placeholder
/// dates are bad rows, named by line; a real time on such a day is not.
#[test]
fn placeholder_dates_are_bad_rows() {
    for (cell, read_as) in [
        ("1970-01-01", "1970-01-01"),
        ("1899-12-30", "1899-12-30"),
        ("1899-12-31", "1899-12-31"),
        ("1900-01-01", "1900-01-01"),
        ("0001-01-01", "0001-01-01"),
    ] {
        let text = format!("{HEADER}c1,i1,2024-01-01,1,9.5\nc2,i2,{cell},1,3\n");
        assert_eq!(
            fail_message(&text, &mapping()),
            format!(
                "orders.csv: line 3, column `ts`: `{cell}` (read as {read_as}) is a placeholder \
                 date, not when the order was placed: correct the line, or the bad-row policy \
                 `skip` leaves such rows out and counts them"
            )
        );
    }
    let text = format!("{HEADER}c1,i1,2024-01-01,1,9.5\nc2,i2,1970-01-01T10:15:00,1,3\n");
    assert_eq!(
        read(&text, &mapping(), BadRowPolicy::Fail).unwrap().0.len(),
        2
    );
    // A spreadsheet's time-only cell is day 0 plus the time: 6 of 300
    // lines passed both checks and gave customers 45,000 days of tenure.
    for cell in ["1899-12-30T14:05:00", "1899-12-31T23:59:59"] {
        let text = format!("{HEADER}c1,i1,2024-01-01,1,9.5\nc2,i2,{cell},1,3\n");
        let e = fail_message(&text, &mapping());
        assert!(
            e.starts_with("orders.csv: line 3, column `ts`: ")
                && e.contains("is a spreadsheet's day 0 with a time of day: a time-only cell"),
            "{e}"
        );
    }
}

/// A spreadsheet saves empty rows as delimiters only; they were refused as
/// orders with a blank customer id.
#[test]
fn rows_of_delimiters_only_are_blank_lines() {
    let text = format!("{HEADER}c1,i1,2024-01-01,1,9.5\n,,,,\n , , ,,\nc2,i2,2024-01-02,1,3\n");
    let (orders, report) = read(&text, &mapping(), BadRowPolicy::Fail).unwrap();
    assert_eq!((orders.len(), report.rows_read), (2, 2));
    // A row with some cells is still read and named.
    let e = fail_message(&format!("{HEADER},i1,2024-01-01,1,9.5\n"), &mapping());
    assert!(
        e.contains("line 2") && e.contains("blank customer id"),
        "{e}"
    );
}

/// One unclosed quote under the `skip` policy dropped every later line as
/// a single bad row (989 of 1,000 orders gone, "1 skipped"); it stops the
/// read naming its line. A quoted cell over two lines in a row of the
/// right width is still read.
#[test]
fn an_unclosed_quote_is_not_skipped_with_the_lines_it_swallows() {
    let mut text = String::from(HEADER);
    text.push_str("c1,i1,2024-01-01,1,9.5\n");
    text.push_str("c2,\"12 inch pizza,2024-01-02,1,3\n");
    for k in 0..20 {
        text.push_str(&format!("c{k},i{k},2024-01-03,1,2\n"));
    }
    let e = read(&text, &mapping(), BadRowPolicy::Skip)
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("orders.csv: line 3: ")
            && e.contains("an opening `\"` without its closing quote")
            && e.ends_with("it runs over 21 lines, which the bad-row policy `skip` would drop with it: correct the quote"),
        "{e}"
    );
    let text = format!("{HEADER}c1,\"two\nlines\",2024-01-01,1,9.5\nc2,i2,2024-01-02,1,3\n");
    let (orders, report) = read(&text, &mapping(), BadRowPolicy::Skip).unwrap();
    assert_eq!((orders.len(), report.skipped.len()), (2, 0));
    assert_eq!(orders[0].item.as_deref(), Some("two\nlines"));
}

/// The whitespace delimiter read its lines itself and kept a UTF-8 byte
/// order mark in the first column's name ("missing column `customer`"
/// beside a header listing `customer`); UTF-16 is named as on the other
/// paths.
#[test]
fn the_whitespace_delimiter_reads_past_a_byte_order_mark_and_names_utf16() {
    let mut ws = mapping();
    ws.delimiter = Delimiter::Whitespace;
    let text = "\u{feff} customer item ts qty price\n c1 i1 2024-01-01 1 9.5\n";
    let (orders, _) = read(text, &ws, BadRowPolicy::Fail).unwrap();
    assert_eq!(orders[0].customer, "c1");
    let utf16: Vec<u8> = [0xFF, 0xFE]
        .into_iter()
        .chain("customer item".encode_utf16().flat_map(u16::to_le_bytes))
        .collect();
    let e = read_orders_from(&utf16[..], Path::new("orders.csv"), &ws, BadRowPolicy::Fail)
        .unwrap_err()
        .to_string();
    assert!(e.contains("UTF-16") && e.contains("line 1"), "{e}");
}

/// A TSV read with the whitespace delimiter splits a cell holding a space;
/// a space-padded export read with commas splits into one field. Each
/// error names the delimiter to give.
#[test]
fn the_whitespace_delimiter_is_named_where_it_splits_or_would() {
    let mut ws = mapping();
    ws.delimiter = Delimiter::Whitespace;
    let tsv = "customer\titem\tts\tqty\tprice\nc1\tgreen tea\t2024-01-01\t1\t9.5\n";
    let e = fail_message(tsv, &ws);
    assert!(
        e.starts_with(
            "orders.csv: line 2: 6 fields, the header has 5 (with the delimiter whitespace"
        ) && e.ends_with("`--delimiter tab`, or `delimiter = \"tab\"` in the mapping)"),
        "{e}"
    );
    let padded = "customer  item  ts          qty  price\nc1        i1    2024-01-01  1    9.5\n";
    let e = fail_message(padded, &mapping());
    assert!(
        e.ends_with(
            "it splits with whitespace: `--delimiter whitespace`, or `delimiter = \"whitespace\"` \
             in the mapping: `[data.orders]` in merchant.toml"
        ),
        "{e}"
    );
}

/// Windows and Python's `csv` module end lines with CRLF; line numbers
/// must still be the ones an editor shows, after blank lines too, and a
/// quoted cell may span lines.
#[test]
fn line_numbers_are_the_editors_whatever_the_line_ends() {
    let rows = [
        "customer,item,ts,qty,price",
        "c1,i1,2024-01-01,1,\"9.5\"",
        "",
        "\"c2\ncontinued\",i2,2024-01-02,1,3",
        "c3,i2,2024-02-30,1,3",
        "c4,i2,2024-01-03,1,3",
        "",
        "",
        "c5,i2,2024-13-01,1,3",
        "c6,i2,2024-01-03,1,-3",
    ];
    for end in ["\n", "\r\n"] {
        let text = rows.join(end) + end;
        let (orders, report) = read(&text, &mapping(), BadRowPolicy::Skip).unwrap();
        assert_eq!(orders.len(), 3, "{end:?}");
        assert_eq!(orders[0].amount, 9.5);
        assert_eq!(orders[1].customer, "c2\ncontinued");
        let lines: Vec<&str> = report
            .examples
            .iter()
            .map(|e| e.split(", column").next().unwrap())
            .collect();
        assert_eq!(
            lines,
            [
                "orders.csv: line 6",
                "orders.csv: line 10",
                "orders.csv: line 11"
            ],
            "{end:?}"
        );
    }
}

/// Old Mac spreadsheets end lines with a lone CR.
#[test]
fn lone_carriage_returns_end_lines_too() {
    let text = "customer,item,ts,qty,price\rc1,i1,2024-01-01,1,9.5\rc2,i2,2024-02-30,1,3\r";
    assert!(
        fail_message(text, &mapping()).starts_with("orders.csv: line 3, column `ts`:"),
        "{}",
        fail_message(text, &mapping())
    );
    let good = "customer,item,ts,qty,price\rc1,i1,2024-01-01,1,9.5\r";
    let (orders, _) = read(good, &mapping(), BadRowPolicy::Fail).unwrap();
    assert_eq!(orders.len(), 1);
    assert_eq!(orders[0].amount, 9.5);
}

#[test]
fn a_header_that_did_not_split_names_the_delimiter_that_splits_it() {
    let text = "customer;item;ts;qty;price\nc1;i1;2024-01-01;1;9.5\n";
    assert_eq!(
        fail_message(text, &mapping()),
        "orders.csv: line 1: missing column `customer`, the mapping's `customer` (header has: \
         `customer;item;ts;qty;price`); \
         the header split into a single field with the delimiter comma, it splits with semicolon: \
         `--delimiter semicolon`, or `delimiter = \"semicolon\"` in the mapping: `[data.orders]` \
         in merchant.toml"
    );
}

/// A negative quantity is a return (UCI's cancellations): it comes off the
/// customer's purchases of the item, the latest first, by units and by its
/// value per unit; a purchase returned whole is left out, and so is a
/// return with nothing bought before it. A fully cancelled order of 80,995
/// units had made its customer the top spender. Neither is a bad row, under
/// either policy; a line of quantity 0 stays a purchase.
#[test]
fn returns_are_netted_against_the_purchases_they_return() {
    let text = format!(
        "{HEADER}\
         c1,i1,2024-01-01,3,30\n\
         c1,i1,2024-01-05,2,20\n\
         c1,i1,2024-01-06,-3,-30\n\
         c2,i2,2024-01-02,80995,168469.6\n\
         c2,i2,2024-01-02T00:12:00Z,-80995,168469.6\n\
         c2,i3,2024-01-03,1,5\n\
         c3,i1,2024-01-04,-2,-20\n\
         c3,i1,2024-01-05,1,10\n\
         c3,i4,2024-01-05,0,0\n"
    );
    for policy in [BadRowPolicy::Fail, BadRowPolicy::Skip] {
        let (orders, report) = read(&text, &mapping(), policy).unwrap();
        let left: Vec<(&str, &str, f32, f32)> = orders
            .iter()
            .map(|o| {
                let item = o.item.as_deref().unwrap_or("");
                (o.customer.as_str(), item, o.quantity, o.amount)
            })
            .collect();
        // c1's return of 3 takes the 2 of 01-05 whole and 1 of 01-01 (10 a
        // unit); c2's cancelled order is gone; c3's return predates its
        // purchase.
        assert_eq!(
            left,
            [
                ("c1", "i1", 2.0, 20.0),
                ("c2", "i3", 1.0, 5.0),
                ("c3", "i1", 1.0, 10.0),
                ("c3", "i4", 0.0, 0.0)
            ]
        );
        assert_eq!(report.rows_read, 9);
        assert_eq!(report.rows_ok, 6);
        assert!(report.skipped.is_empty());
        assert_eq!(
            (
                report.returns,
                report.returns_unmatched,
                report.returned_whole
            ),
            (2, 1, 2)
        );
        assert_eq!(
            report.returns_note().unwrap(),
            "2 return lines (a negative quantity) netted against the customer's earlier \
             purchases of the item (2 purchases returned whole left out); 1 return line with \
             no earlier purchase of the item by the customer in the export left out"
        );
    }
    // A unit price stays positive on a cancellation: the value per unit is
    // the same.
    let mut uci = mapping();
    uci.amount_is = AmountIs::UnitPrice;
    let text = format!("{HEADER}c1,i1,2024-01-01,4,2.5\nc1,i1,2024-01-02,-1,2.5\n");
    let (orders, report) = read(&text, &uci, BadRowPolicy::Fail).unwrap();
    assert_eq!((orders[0].quantity, orders[0].amount), (3.0, 7.5));
    assert_eq!(report.returns, 1);
    // A negative quantity in another form is still a bad row, named.
    let text = format!("{HEADER}c1,i1,2024-01-01,1,9.5\nc2,i1,1704067200,(2),3\n");
    assert_eq!(
        fail_message(&text, &mapping()),
        "orders.csv: line 3, column `qty`: `(2)` is negative, written in parentheses (a return \
         or a refund? the bad-row policy `skip` leaves such rows out and counts them)"
    );
}

/// Under `skip`, one reason that points to a setting leaving out more than
/// a tenth of the rows refuses the read, naming the first such row (with
/// the day-and-month hint that a skipped row's message never showed) and a
/// column blank on most of them; `skip-all` leaves them out. Day and month
/// swapped, `skip` had left out 45 % of an export and dated the rest wrong.
#[test]
fn skip_refuses_to_leave_out_a_tenth_of_the_rows_for_a_setting() {
    let mut map = mapping();
    map.timestamp_format = "%d/%m/%Y".parse().unwrap();
    let mut text = HEADER.to_string();
    for day in 1..=28 {
        text.push_str(&format!("c{day},i1,{day:02}/01/2024,1,2\n"));
        text.push_str(&format!("c{day},i2,01/{day:02}/2024,1,2\n"));
    }
    let e = read(&text, &map, BadRowPolicy::Skip)
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with(
            "orders.csv: 16 of its 56 rows would be left out as bad_timestamp (the bad-row \
             policy `skip`): so many point to a setting, not to a few bad lines; the first: \
             line 27, column `ts`: `01/13/2024` does not match the timestamp format \
             `%d/%m/%Y` (input is out of range); it reads with `%m/%d/%Y`: are days and months \
             the other way round?"
        ),
        "{e}"
    );
    assert!(
        e.ends_with("`--on-bad-row skip-all` (`on_bad_row = \"skip_all\"`)"),
        "{e}"
    );
    let (orders, report) = read(&text, &map, BadRowPolicy::SkipAll).unwrap();
    assert_eq!((orders.len(), report.rows_skipped()), (40, 16));
    // A blank customer (a guest order) is the line's own: never refused so.
    let mut guests = HEADER.to_string();
    for k in 0..30 {
        let who = if k % 2 == 0 {
            String::new()
        } else {
            format!("c{k}")
        };
        guests.push_str(&format!("{who},i1,2024-01-01,1,2\n"));
    }
    let (orders, report) = read(&guests, &mapping(), BadRowPolicy::Skip).unwrap();
    assert_eq!(
        (orders.len(), report.skipped[&BadRowReason::BlankCustomer]),
        (15, 15)
    );
    // A column blank on most of the refused lines is named.
    let mut text = "customer,item,ts,paid,qty,price\n".to_string();
    for k in 0..30 {
        let paid = if k % 3 == 0 { "2024-01-02" } else { "" };
        text.push_str(&format!("c{k},i{k},2024-01-01,{paid},1,2\n"));
    }
    let mut paid = mapping();
    paid.timestamp = "paid".into();
    let e = read(&text, &paid, BadRowPolicy::Skip)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(
            "; `paid` is blank on 20 of these lines: is it filled only on each order's first \
             line (as a Shopify export's `Paid at` is)? Map a column that every line fills."
        ),
        "{e}"
    );
}

/// A spreadsheet writes a whole-number id as `17850.0` on some lines and
/// `17850` on others: one customer, not two. Ids that differ only in case
/// are two customers, as written, and said.
#[test]
fn ids_written_with_a_decimal_zero_are_one_and_ids_differing_in_case_are_named() {
    assert_eq!(id_key(" 17850.0 "), "17850");
    assert_eq!(id_key("17850.00"), "17850");
    for kept in ["17850.5", "1.0.0", ".0", "85123A", "0.0a", "c1.0", "12."] {
        assert_eq!(id_key(kept), kept);
    }
    let text = format!(
        "{HEADER}\
         17850.0,22752.0,2024-01-01,1,2\n\
         17850,22752,2024-01-02,1,2\n\
         EMMA@GMX.DE,i1,2024-01-03,1,2\n\
         emma@gmx.de,i1,2024-01-04,1,2\n"
    );
    let (orders, report) = read(&text, &mapping(), BadRowPolicy::Fail).unwrap();
    let ids: Vec<(&str, Option<&str>)> = orders
        .iter()
        .map(|o| (o.customer.as_str(), o.item.as_deref()))
        .collect();
    assert_eq!(
        ids,
        [
            ("17850", Some("22752")),
            ("17850", Some("22752")),
            ("EMMA@GMX.DE", Some("i1")),
            ("emma@gmx.de", Some("i1"))
        ]
    );
    assert_eq!(
        report.warnings(),
        [
            "1 customer id differs from another only in case (`EMMA@GMX.DE` and `emma@gmx.de`, …): \
          they are read as different customers; if they are one, write them alike in the export"
        ]
    );
}

/// A column named for a price read as each line's total, on lines of more
/// than one unit, names the setting (UCI's `UnitPrice` gave a customer
/// 33.25 for 845.85 spent); given it, or on single units, nothing is said.
#[test]
fn a_price_column_read_as_line_totals_names_the_setting() {
    let text = format!("{HEADER}c1,i1,2024-01-01,12,2.5\nc2,i2,2024-01-02,1,3\n");
    let (_, report) = read(&text, &mapping(), BadRowPolicy::Fail).unwrap();
    let note = report.amount_note.as_deref().unwrap();
    assert!(
        note.starts_with("the amount column `price` is read as each line's total")
            && note.contains("`--amount-is unit_price`"),
        "{note}"
    );
    let mut unit = mapping();
    unit.amount_is = AmountIs::UnitPrice;
    assert_eq!(
        read(&text, &unit, BadRowPolicy::Fail)
            .unwrap()
            .1
            .amount_note,
        None
    );
    let single = format!("{HEADER}c1,i1,2024-01-01,1,2.5\n");
    assert_eq!(
        read(&single, &mapping(), BadRowPolicy::Fail)
            .unwrap()
            .1
            .amount_note,
        None
    );
}

/// A blank store cell is a bad row: it had become a store named "" of its
/// own (under a natural partition, a merchant).
#[test]
fn a_blank_merchant_is_a_bad_row() {
    let mut map = mapping();
    map.merchant = Some("store".into());
    let text =
        "customer,item,ts,qty,price,store\nc1,i1,2024-01-01,1,2,s1\nc2,i1,2024-01-01,1,2, \n";
    assert_eq!(
        fail_message(text, &map),
        "orders.csv: line 3, column `store`: blank merchant (store) id"
    );
    let (orders, report) = read(text, &map, BadRowPolicy::Skip).unwrap();
    assert_eq!(orders.len(), 1);
    assert_eq!(report.skipped[&BadRowReason::BlankMerchant], 1);
}

#[test]
fn wrong_delimiter_is_named_with_a_hint() {
    let text = "customer\titem\tts\tqty\tprice\nc1\ti1\t20240101\t1\t9.5\n";
    assert_eq!(
        fail_message(text, &mapping()),
        "orders.csv: line 1: missing column `customer`, the mapping's `customer` (header has: \
         `customer\titem\tts\tqty\tprice`); \
         the header split into a single field with the delimiter comma, it splits with tab: \
         `--delimiter tab`, or `delimiter = \"tab\"` in the mapping: `[data.orders]` in \
         merchant.toml"
    );
    let mut tab = mapping();
    tab.delimiter = Delimiter::Tab;
    assert_eq!(read(text, &tab, BadRowPolicy::Fail).unwrap().0.len(), 1);
}

#[test]
fn wrong_field_count_and_bad_amount_are_named() {
    let text = format!("{HEADER}c1,i1,2024-01-01,1\n");
    assert_eq!(
        fail_message(&text, &mapping()),
        "orders.csv: line 2: 4 fields, the header has 5"
    );
    let text = format!("{HEADER}c1,i1,2024-01-01,1,NaN\n");
    assert_eq!(
        fail_message(&text, &mapping()),
        "orders.csv: line 2, column `price`: `NaN` is not a finite number"
    );
}

#[test]
fn skip_policy_counts_every_reason_exactly() {
    let text = format!(
        "{HEADER}\
         c1,i1,2024-01-01,1,9.5\n\
         c1,i2,yesterday,1,3\n\
         c2,i1,2024-01-03,-1,3\n\
         ,i1,2024-01-03,1,3\n\
         c3,i1,2024-01-04,1\n\
         c3,i3,2024-13-01,2,4\n\
         \n\
         c3,,2024-01-05,2,4\n\
         c4,i1,2024-01-05,2,-4\n\
         c4,i2,2024-01-06,2,4\n\
         c5,i2,20240107,x,4\n"
    );
    let (orders, report) = read(&text, &mapping(), BadRowPolicy::Skip).unwrap();
    assert_eq!(report.rows_read, 10);
    assert_eq!(report.rows_ok, 3);
    assert_eq!(orders.len(), 3);
    let expect = BTreeMap::from([
        (BadRowReason::BadTimestamp, 2),
        (BadRowReason::BlankCustomer, 1),
        (BadRowReason::FieldCount, 1),
        (BadRowReason::NegativeAmount, 1),
        (BadRowReason::BadQuantity, 1),
    ]);
    assert_eq!(report.skipped, expect);
    assert_eq!(report.rows_skipped(), 6);
    // The return has nothing bought before it; the line without an item
    // is a purchase, not an interaction.
    assert_eq!(report.returns_unmatched, 1);
    assert_eq!(report.blank_items, 1);
    assert_eq!(orders[1].item, None);
    assert_eq!(report.examples.len(), 5);
    assert_eq!(
        report.examples[0],
        "orders.csv: line 3, column `ts`: `yesterday` is not unix seconds, an ISO-8601 date or YYYYMMDD \
         (another layout needs a strftime timestamp format, e.g. `%m/%d/%Y %H:%M`)"
    );
    // The blank line is not a row, so line numbers stay true to the file.
    assert!(report.examples.iter().all(|e| !e.contains("line 8")));
}

#[test]
fn mapping_round_trips_through_json_with_defaults() {
    let json = r#"{"customer":"c","timestamp":"t","amount":"a"}"#;
    let m: OrdersMapping = serde_json::from_str(json).unwrap();
    assert_eq!(m.delimiter, Delimiter::Comma);
    assert_eq!(m.timestamp_format, TimestampFormat::Auto);
    assert_eq!(m.item, None);
    let bad = r#"{"customer":"c","timestamp":"t","amount":"a","colour":"x"}"#;
    assert!(serde_json::from_str::<OrdersMapping>(bad).is_err());
}

#[test]
fn strftime_patterns_read_spreadsheet_dates_and_bad_ones_are_refused() {
    let us: TimestampFormat = "%m/%d/%Y %H:%M".parse().unwrap();
    assert_eq!(us.parse("01/31/2024 18:05"), Ok(1_706_724_300));
    // A date alone is midnight UTC, as with the built-in formats.
    let eu: TimestampFormat = "%d.%m.%Y".parse().unwrap();
    assert_eq!(eu.parse("31.01.2024"), Ok(1_706_659_200));
    // An offset in the value is honoured.
    let zoned: TimestampFormat = "%Y-%m-%d %H:%M %z".parse().unwrap();
    assert_eq!(zoned.parse("2024-01-31 19:05 +0100"), Ok(1_706_724_300));
    let month: TimestampFormat = "%d %b %Y".parse().unwrap();
    assert_eq!(month.parse("31 Jan 2024"), Ok(1_706_659_200));
    assert_eq!(
        us.parse("31/01/2024 18:05").unwrap_err(),
        "`31/01/2024 18:05` does not match the timestamp format `%m/%d/%Y %H:%M` \
         (input is out of range); it reads with `%d/%m/%Y %H:%M`: are days and months the other \
         way round? (then every date up to the 12th was read wrong too)"
    );
    // Neither way round: no such hint.
    let e = us.parse("31/13/2024 18:05").unwrap_err();
    assert!(e.ends_with("(input is out of range)"), "{e}");
    assert_eq!(
        "%Y-%".parse::<TimestampFormat>().unwrap_err(),
        "timestamp format `%Y-%` is not a valid strftime pattern (an unknown `%` directive?)"
    );
    assert!(
        "dd/mm/yyyy"
            .parse::<TimestampFormat>()
            .unwrap_err()
            .contains("a strftime pattern such as `%d/%m/%Y %H:%M`, not `dd/mm/yyyy`")
    );
}

/// chrono skips a `%Z` name, so `31/12/2017 20:00:00 PST` read as 20:00
/// UTC: the pattern is refused wherever it is given, `%z` still reads.
#[test]
fn a_time_zone_name_in_a_timestamp_format_is_refused_and_offsets_are_offered() {
    let e = "%d/%m/%Y %H:%M:%S %Z"
        .parse::<TimestampFormat>()
        .unwrap_err();
    assert!(
        e.starts_with("timestamp format `%d/%m/%Y %H:%M:%S %Z` has `%Z`, a time-zone name")
            && e.contains("every time taken as UTC")
            && e.contains("write `%z`"),
        "{e}"
    );
    // A mapping file reaches the same check through serde.
    let map = "customer = \"c\"\ntimestamp = \"t\"\namount = \"a\"\n\
               timestamp_format = \"%Y-%m-%d %H:%M %Z\"\n";
    let e = toml::from_str::<OrdersMapping>(map)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("timestamp_format") && e.contains("has `%Z`"),
        "{e}"
    );
    // A literal `%%Z` is no directive, and numeric offsets still read.
    assert!("%Y-%m-%d %%Z".parse::<TimestampFormat>().is_ok());
    let zoned: TimestampFormat = "%d/%m/%Y %H:%M:%S %z".parse().unwrap();
    assert_eq!(zoned.parse("31/12/2017 20:00:00 -0800"), Ok(1_514_779_200));
}

#[test]
fn decimal_marks_read_money_as_shops_write_it() {
    let point = DecimalMark::Point;
    let comma = DecimalMark::Comma;
    assert_eq!(point.parse("12.5"), Some(12.5));
    assert_eq!(point.parse("$1,234.50"), Some(1234.5));
    assert_eq!(point.parse("-$12.50"), Some(-12.5));
    assert_eq!(point.parse("$-12.50"), Some(-12.5));
    assert_eq!(point.parse("1 234 567"), Some(1_234_567.0));
    assert_eq!(point.parse("£ 3"), Some(3.0));
    assert_eq!(comma.parse("12,50 €"), Some(12.5));
    assert_eq!(comma.parse("1.234,50"), Some(1234.5));
    assert_eq!(comma.parse("1\u{a0}234,5"), Some(1234.5));
    assert_eq!(comma.parse("7"), Some(7.0));
    assert_eq!(point.parse("0.500"), Some(0.5));
    assert_eq!(comma.parse("0,500"), Some(0.5));
    // Not numbers: a group of the wrong size, a grouped number with a
    // leading zero (`0,500` is half a kilo with a decimal comma, never five
    // hundred), two marks, words, nothing.
    for bad in [
        "1,5", "1,2345.6", "0,500", "0,880", "-0,250", "012,345", "12.5.0", "--3", "$", "", "abc",
        "1.5€x",
    ] {
        assert_eq!(point.parse(bad), None, "{bad}");
    }
    for bad in ["1.5", "1,2,3", "12,", "0.500,5", ""] {
        assert_eq!(comma.parse(bad), None, "{bad}");
    }
    assert_eq!("comma".parse(), Ok(comma));
    assert!(
        "dot"
            .parse::<DecimalMark>()
            .unwrap_err()
            .contains("point or comma")
    );
}

#[test]
fn a_european_export_reads_with_its_mapping_and_errors_say_how() {
    let text = "customer;item;ts;qty;price\n\
                c1;i1;31.01.2024;1;12,50 €\n\
                c2;i2;01.02.2024;2;1.234,00 €\n";
    let mut map = mapping();
    map.delimiter = Delimiter::Semicolon;
    map.timestamp_format = "%d.%m.%Y".parse().unwrap();
    assert_eq!(
        fail_message(text, &map),
        "orders.csv: line 2, column `price`: `12,50 €` is not a number with a decimal point \
         (for a decimal comma: `--decimal comma`, or `decimal = \"comma\"` in the mapping: `[data.orders]` in merchant.toml)"
    );
    // Half a kilo is not read as five hundred: the grouped reading of
    // `0,500` is refused and the message points at the decimal comma.
    let weights = "customer;item;ts;qty;price\nc1;i1;31.01.2024;0,500;3\n";
    assert_eq!(
        fail_message(weights, &map),
        "orders.csv: line 2, column `qty`: `0,500` is not a number with a decimal point \
         (for a decimal comma: `--decimal comma`, or `decimal = \"comma\"` in the mapping: `[data.orders]` in merchant.toml)"
    );
    map.decimal = DecimalMark::Comma;
    let (orders, report) = read(text, &map, BadRowPolicy::Fail).unwrap();
    assert_eq!(report.rows_ok, 2);
    assert_eq!(
        orders.iter().map(|o| o.amount).collect::<Vec<_>>(),
        [12.5, 1234.0]
    );
    assert_eq!(orders[1].timestamp, 1_706_745_600);
    let empty = "customer;item;ts;qty;price\nc1;i1;31.01.2024;;3\n";
    assert_eq!(
        fail_message(empty, &map),
        "orders.csv: line 2, column `qty`: empty, not a number"
    );
    // The mapping with its pattern and mark survives a trip through TOML.
    let toml_text = toml::to_string(&map).unwrap();
    assert!(
        toml_text.contains("timestamp_format = \"%d.%m.%Y\""),
        "{toml_text}"
    );
    assert!(toml_text.contains("decimal = \"comma\""), "{toml_text}");
    assert_eq!(toml::from_str::<OrdersMapping>(&toml_text).unwrap(), map);
}

fn day(d: i64) -> i64 {
    d * SECONDS_PER_DAY
}

fn order(c: &str, item: &str, t: i64, qty: f32, amount: f32) -> Order {
    Order {
        customer: c.into(),
        item: Some(item.into()),
        timestamp: t,
        quantity: qty,
        amount,
        rating: None,
        merchant: None,
    }
}

#[test]
fn trend_takes_the_past_rate_over_at_least_one_trend_window() {
    // Cutoff at day 100, trend window 20 days (it opens at day 80). Customer
    // a's first basket falls one second before the window opens: its past
    // rate is one order per 20 days, not one per second (-2,592,000 before).
    let opens = day(80);
    let orders = vec![
        order("a", "x", opens - 1, 1.0, 10.0),
        order("a", "y", day(90), 1.0, 10.0),
        // b: a first order 2 days before the window: still at least 20 days.
        order("b", "x", opens - 2 * 86_400, 1.0, 10.0),
        order("b", "y", day(95), 1.0, 10.0),
        order("b", "z", day(96), 1.0, 10.0),
    ];
    let cfg = ChurnConfig {
        cutoff: day(100),
        churn_window_days: 30,
        trend_window_days: 20,
    };
    let p = derive(&orders, &cfg).unwrap();
    let trend = FEATURE_NAMES.iter().position(|&n| n == "trend").unwrap();
    assert_eq!(p.features.ids, vec!["a", "b"]);
    let got: Vec<f32> = p.features.x.column(trend).to_vec();
    // a: 1 recent in 20 days = 1.5 per 30 days, 1 past over 20 days = 1.5.
    assert!((got[0] - 0.0).abs() < 1e-5, "{got:?}");
    // b: 2 recent = 3.0 per 30 days, 1 past = 1.5.
    assert!((got[1] - 1.5).abs() < 1e-5, "{got:?}");
}

#[test]
fn derivation_matches_hand_computed_rfm_and_labels() {
    // Cutoff at day 100, churn window 30 days, trend window 20 days.
    let orders = vec![
        // a: baskets on days 10 (two lines), 50 and 90; buys again on day 110.
        order("a", "x", day(10), 1.0, 10.0),
        order("a", "y", day(10), 2.0, 20.0),
        order("a", "x", day(50), 1.0, 30.0),
        order("a", "z", day(90), 1.0, 40.0),
        order("a", "x", day(110), 1.0, 5.0),
        // b: one basket on day 40, nothing after; buys on day 140 (after the window).
        order("b", "y", day(40), 3.0, 15.0),
        order("b", "y", day(140), 1.0, 15.0),
        // c: only after the cutoff, so not a row.
        order("c", "x", day(105), 1.0, 1.0),
    ];
    let cfg = ChurnConfig {
        cutoff: day(100),
        churn_window_days: 30,
        trend_window_days: 20,
    };
    let p = derive(&orders, &cfg).unwrap();
    assert_eq!(p.features.ids, vec!["a", "b"]);
    assert_eq!(p.features.y.to_vec(), vec![0.0, 1.0]);
    // a: recency 10, 3 occasions, monetary 100, tenure 90, basket 100/3,
    // gap (90-10)/2 = 40, trend: 1 recent in 20 days = 1.5/30d, past 2 in
    // 70 days (day 10..80) = 30·2/70.
    let a = p.features.x.row(0).to_vec();
    let expect_a = [
        10.0,
        3.0,
        100.0,
        90.0,
        100.0 / 3.0,
        40.0,
        1.5 - 60.0 / 70.0,
        5.0,
    ];
    for (k, (got, want)) in a.iter().zip(expect_a).enumerate() {
        assert!(
            (got - want as f32).abs() < 1e-4,
            "{}: {got} vs {want}",
            FEATURE_NAMES[k]
        );
    }
    // b: one purchase, so the gap is its tenure; no recent purchases.
    let b = p.features.x.row(1).to_vec();
    let expect_b = [60.0, 1.0, 15.0, 60.0, 15.0, 60.0, -30.0 / 40.0, 3.0];
    for (k, (got, want)) in b.iter().zip(expect_b).enumerate() {
        assert!(
            (got - want as f32).abs() < 1e-4,
            "{}: {got} vs {want}",
            FEATURE_NAMES[k]
        );
    }
    // Interactions: one per (customer, item) before the cutoff, quantities
    // summed, each customer's in the order of their last purchase.
    let inter: Vec<(&str, &str, f32, i64)> = p
        .interactions
        .iter()
        .map(|i| (i.user.as_str(), i.item.as_str(), i.value, i.timestamp))
        .collect();
    assert_eq!(
        inter,
        vec![
            ("a", "y", 2.0, day(10)),
            ("a", "x", 2.0, day(50)),
            ("a", "z", 1.0, day(90)),
            ("b", "y", 3.0, day(40))
        ]
    );
    let s = &p.summary;
    assert_eq!((s.customers, s.churned, s.label_rate), (2, 1, 0.5));
    assert_eq!(
        (
            s.orders_before_cutoff,
            s.orders_in_window,
            s.orders_after_window
        ),
        (5, 2, 1)
    );
    assert_eq!(s.cutoff, "1970-04-11");
    assert!(s.window_covered);
}

#[test]
fn label_coverage_says_how_much_of_the_churn_window_an_export_observes() {
    use super::derive::LabelCoverage;
    // A 30-day window after day 100.
    let of = |last_day| LabelCoverage::of(day(last_day), day(100), 30);
    assert_eq!(of(129), LabelCoverage::Covered, "to the window's last day");
    assert_eq!(of(200), LabelCoverage::Covered);
    assert_eq!(of(128), LabelCoverage::Partial { days: 28 });
    assert_eq!(of(100), LabelCoverage::Partial { days: 0 });
    assert_eq!(of(99), LabelCoverage::Nothing, "no order after the cutoff");
    // The latest cutoff observing every label: the last order minus the
    // window, unless that falls before the first order.
    assert_eq!(
        LabelCoverage::latest_cutoff(day(10), day(100), 30),
        Some(day(70))
    );
    assert_eq!(LabelCoverage::latest_cutoff(day(80), day(100), 30), None);
}

#[test]
fn ratings_become_interaction_values_latest_first() {
    let mut o1 = order("a", "x", day(1), 1.0, 1.0);
    o1.rating = Some(2.0);
    let mut o2 = order("a", "x", day(3), 1.0, 1.0);
    o2.rating = Some(4.5);
    let p = derive(&[o2, o1], &ChurnConfig::new(day(10), 5)).unwrap();
    assert_eq!(p.interactions[0].value, 4.5);
    assert!(!p.summary.window_covered);
    assert!(derive(&[], &ChurnConfig::new(0, 0)).is_err());
}

#[test]
fn dates_format_back_to_the_calendar() {
    assert_eq!(format_date(0), "1970-01-01");
    assert_eq!(format_date(day(10_134)), "1997-09-30");
    assert_eq!(format_date(day(19_782) + 3600), "2024-02-29");
    assert_eq!(format_date(-1), "1969-12-31");
}

pub(crate) fn cdnow_path() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/cdnow/CDNOW_master.txt")
}

#[test]
fn cdnow_loads_through_the_mapping_and_derives_rfm_without_interactions() {
    let (orders, report) =
        read_orders(&cdnow_path(), &OrdersMapping::cdnow(), BadRowPolicy::Fail).unwrap();
    // The published CDNOW master file: 69,659 order lines from 23,570 customers.
    assert_eq!(report.rows_read, 69_659);
    assert_eq!(report.rows_ok, 69_659);
    let cutoff = TimestampFormat::Iso8601.parse("1997-09-30").unwrap();
    let p = derive(&orders, &ChurnConfig::new(cutoff, 180)).unwrap();
    assert_eq!(p.features.len(), 23_570);
    assert!(p.interactions.is_empty());
    assert_eq!(p.summary.first_order.as_deref(), Some("1997-01-01"));
    assert_eq!(p.summary.last_order.as_deref(), Some("1998-06-30"));
    assert!(p.summary.window_covered);
    assert!(p.features.x.iter().all(|v| v.is_finite()));
    let rate = p.summary.label_rate;
    assert!(rate > 0.5 && rate < 0.95, "label rate {rate}");
}

#[test]
fn cdnow_churn_lr_learns_and_federated_matches_centralised() {
    use crate::federation::strategy::FedAvg;
    use crate::model::lr::SgdParams;
    use crate::reference::{evaluate, federate};
    use crate::task::{ModelSpec, TaskKind, TaskSpec};
    use crate::train::LocalData;

    let (orders, _) =
        read_orders(&cdnow_path(), &OrdersMapping::cdnow(), BadRowPolicy::Fail).unwrap();
    let cutoff = TimestampFormat::Iso8601.parse("1997-09-30").unwrap();
    let p = derive(&orders, &ChurnConfig::new(cutoff, 180)).unwrap();
    let mut merchants = crate::model::churn::partition_churn(&p.features, 5, 0.2, 42);
    let mut pooled = vec![LocalData::pooled("all", &merchants)];
    let spec = TaskSpec {
        kind: TaskKind::Train,
        model: ModelSpec::churn_lr(FEATURE_NAMES.len()),
        sgd: SgdParams::default(),
        seed: 42,
        round: 0,
        standardizer: None,
        dp: None,
        best_version: None,
    };
    let c = federate(&spec, &mut pooled, 10, &mut FedAvg).unwrap();
    let f = federate(&spec, &mut merchants, 10, &mut FedAvg).unwrap();
    let central = c.rounds.last().unwrap()["auc"];
    let mut on_pooled = spec.clone();
    on_pooled.standardizer = f.standardizer.clone();
    let fed = evaluate(&on_pooled, &f.params, &mut pooled).unwrap()["auc"];
    // Recency alone ranks churners well above chance; the release benchmark
    // (examples/churn_bench.rs) records 0.752 with 20 rounds.
    assert!(central > 0.74, "centralised auc {central}");
    assert!(
        (fed - central).abs() < 0.005,
        "federated {fed} vs {central}"
    );
}

#[test]
fn leave_last_out_holds_out_the_item_on_the_last_order_line_not_the_largest_id() {
    // One basket at day 5 with "z" before "b" in the file: the held-out item
    // is "b", the later line (the README protocol of data/grocery-dev), not
    // "z", which sorts last.
    let orders = [
        order("a", "m", day(1), 1.0, 1.0),
        order("a", "z", day(5), 1.0, 1.0),
        order("a", "b", day(5), 1.0, 1.0),
    ];
    let p = derive(&orders, &ChurnConfig::new(day(10), 5)).unwrap();
    let (train, test) = crate::data::movielens::leave_last_out(&p.interactions);
    assert_eq!(test.len(), 1);
    assert_eq!(test[0].item, "b");
    let mut kept: Vec<&str> = train.iter().map(|r| r.item.as_str()).collect();
    kept.sort_unstable();
    assert_eq!(kept, ["m", "z"]);
}

#[test]
fn time_span_is_the_first_and_last_order_in_any_file_order() {
    assert_eq!(time_span(&[]), None);
    let orders = [
        order("a", "m", day(3), 1.0, 1.0),
        order("b", "z", day(9), 1.0, 1.0),
        order("a", "b", day(1), 1.0, 1.0),
    ];
    assert_eq!(time_span(&orders), Some((day(1), day(9))));
    assert_eq!(time_span(&orders[..1]), Some((day(3), day(3))));
}

/// One label for every customer is said, with the dates that explain it:
/// a placeholder order in 9999 drags the default cutoff with it.
#[test]
fn a_single_churn_label_is_named_with_the_exports_dates() {
    use super::derive::one_label_note;
    let day = |d: i64| d * SECONDS_PER_DAY;
    let span = (day(17_167), day(2_932_896));
    let note = one_label_note([1.0, 1.0, 1.0], span, day(2_932_806), 90).unwrap();
    assert!(
        note.starts_with("all 3 customers are labelled churned (none ordered in the 90 days after the cutoff 9999-10-02)")
            && note.contains("the orders run from 2017-01-01 to 9999-12-31")
            && note.contains("placeholder or mistyped date"),
        "{note}"
    );
    let none = one_label_note([0.0, 0.0], span, day(17_200), 30).unwrap();
    assert!(
        none.starts_with("none of the 2 customers is labelled churned"),
        "{none}"
    );
    assert_eq!(one_label_note([0.0, 1.0], span, day(17_200), 30), None);
    assert_eq!(one_label_note([], span, day(17_200), 30), None);
}

/// A Windows-1252 export (`José` as one byte) names the line and field and
/// how to convert it, not the csv crate's byte offsets; a UTF-16 file
/// (Excel's "Unicode text") is refused before its first line.
#[test]
fn text_that_is_not_utf8_names_its_line_and_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let latin1 = dir.path().join("latin1.csv");
    let mut bytes = b"customer,item,ts,qty,price\nc1,milk,2024-01-01,1,2\nJos".to_vec();
    bytes.extend([0xE9]);
    bytes.extend(b",bread,2024-01-02,1,2\n");
    std::fs::write(&latin1, &bytes).unwrap();
    let e = read_orders(&latin1, &mapping(), BadRowPolicy::Fail)
        .unwrap_err()
        .to_string();
    assert!(
        e.ends_with("latin1.csv: line 3: field 1 is not UTF-8 text: save the file as UTF-8 (Excel: \"CSV UTF-8\"); a Latin-1 or Windows-1252 export converts with `iconv -f WINDOWS-1252 -t UTF-8`"),
        "{e}"
    );
    let utf16 = dir.path().join("utf16.csv");
    let mut bytes = vec![0xFF, 0xFE];
    for u in "customer,item\n".encode_utf16() {
        bytes.extend(u.to_le_bytes());
    }
    std::fs::write(&utf16, &bytes).unwrap();
    let e = read_orders(&utf16, &mapping(), BadRowPolicy::Fail)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("utf16.csv: the file is UTF-16 text (Excel's \"Unicode text\"), not UTF-8"),
        "{e}"
    );
}

/// A number too large for the f32 it is read into, and a decimal point
/// under a decimal-comma mapping, say so rather than "not a finite number".
#[test]
fn a_huge_amount_and_the_other_decimal_mark_are_named() {
    let huge = fail_message(&format!("{HEADER}c1,milk,2024-01-01,1,1e308\n"), &mapping());
    assert!(
        huge.ends_with("`1e308` is too large (the largest is about 3.4e38)"),
        "{huge}"
    );
    let comma = OrdersMapping {
        decimal: DecimalMark::Comma,
        ..mapping()
    };
    // The fix is the other setting, not the one in use.
    for raw in ["340.00", "\"1,234.50\""] {
        let point = fail_message(&format!("{HEADER}c1,milk,2024-01-01,1,{raw}\n"), &comma);
        assert!(
            point.ends_with(&format!(
                "`{}` is not a number with a decimal comma: it has a decimal point, as if the \
                 file uses one (then give `--decimal point`, or `decimal = \"point\"` in the \
                 mapping: `[data.orders]` in merchant.toml)",
                raw.trim_matches('"')
            )),
            "{point}"
        );
    }
}

/// A placeholder or mistyped year among a year of orders is named with its
/// line and date (it would stretch its customer's tenure), and an export
/// whose dates are all plausible gets no note.
#[test]
fn lines_dated_far_outside_the_export_are_named() {
    let mut text = String::from("customer,item,ts,qty,price\n");
    for i in 0..300 {
        text.push_str(&format!(
            "c{},i{},2017-{:02}-15,1,2.5\n",
            i % 40,
            i % 7,
            i % 12 + 1
        ));
    }
    let (_, clean) = read(&text, &mapping(), BadRowPolicy::Fail).unwrap();
    assert_eq!(clean.stray_dates, None);
    text.push_str("c3,i1,1917-03-04,1,2.5\nc5,i2,1970-06-15,1,2.5\n");
    let (orders, report) = read(&text, &mapping(), BadRowPolicy::Fail).unwrap();
    assert_eq!(orders.len(), 302, "the lines are kept");
    let note = report.stray_dates.unwrap();
    assert!(
        note.starts_with("2 order lines are dated far outside the others, which run from 2017-01-15 to 2017-12-15")
            && note.contains("line 302 1917-03-04, line 303 1970-06-15"),
        "{note}"
    );
    // Unix seconds far apart in i64 are checked without overflow (a date
    // after today is refused on its own: the far end is in the past).
    let mut map = mapping();
    map.timestamp_format = TimestampFormat::UnixSeconds;
    let mut text = String::from("customer,item,ts,qty,price\n");
    for i in 0..200 {
        let t = if i % 2 == 0 { i64::MIN } else { 1_600_000_000 };
        text.push_str(&format!("c{i},i1,{t},1,2.5\n"));
    }
    text.push_str("c1,i1,1,1,2.5\n");
    let (orders, report) = read(&text, &map, BadRowPolicy::Fail).unwrap();
    assert_eq!(orders.len(), 201);
    // Two halves and a line between them: none lies outside the others.
    assert_eq!(report.stray_dates, None);
}

/// A semicolon export whose amounts group thousands with a dot (`1.890`)
/// read with the default decimal point, a thousandth of each price, without
/// a word: the report names the first such amount and the setting, and an
/// export with an amount only the point reads (`12.50`) gets no note.
#[test]
fn amounts_that_read_with_either_decimal_mark_are_named() {
    let mut map = mapping();
    map.delimiter = Delimiter::Semicolon;
    let mut text = String::from("customer;item;ts;qty;price\n");
    for (i, price) in ["25", "1.890", "2.450", "7"].iter().enumerate() {
        text.push_str(&format!("c{i};i{i};2017-03-0{};1;{price}\n", i + 1));
    }
    let (orders, report) = read(&text, &map, BadRowPolicy::Fail).unwrap();
    assert_eq!(orders[1].amount, 1.89, "read as asked");
    let note = report.decimal_note.clone().unwrap();
    assert_eq!(
        note,
        "amounts such as `1.890` (line 3) are read as 1.89 with a decimal point; if the dot \
         groups thousands (1890), as semicolon exports often write them, give `--decimal comma` \
         (or `decimal = \"comma\"` in the mapping: `[data.orders]` in merchant.toml)"
    );
    assert_eq!(report.warnings(), [note]);
    let settled = text.replace(";7\n", ";12.50\n");
    let (_, report) = read(&settled, &map, BadRowPolicy::Fail).unwrap();
    assert_eq!(report.decimal_note, None);
    map.decimal = DecimalMark::Comma;
    let (orders, report) = read(&text, &map, BadRowPolicy::Fail).unwrap();
    assert_eq!((orders[1].amount, report.decimal_note), (1890.0, None));
}

/// Cells a spreadsheet or an accounting export writes differently are
/// named for what they are: negatives in parentheses, with a trailing or a
/// Unicode minus; an amount with a currency code; a NUL shown escaped.
#[test]
fn other_ways_of_writing_numbers_are_named_for_what_they_are() {
    let head = "customer,item,ts,qty,price\n";
    for (cell, says) in [
        (
            "(1.49)",
            "`(1.49)` is negative, written in parentheses (a return or a refund?",
        ),
        (
            "1.49-",
            "`1.49-` is negative, written with a trailing minus",
        ),
        (
            "\u{2212}1.49",
            "is negative, written with a Unicode minus sign",
        ),
        ("EUR 11.15", "`EUR 11.15` carries the currency code `EUR`"),
        ("11.15 usd", "`11.15 usd` carries the currency code `usd`"),
        ("1\u{0}", "`1\\0` is not a finite number"),
    ] {
        let text = format!("{head}c1,i1,2017-01-01,1,\"{cell}\"\n");
        let m = fail_message(&text, &mapping());
        assert!(m.contains(says), "{cell}: {m}");
    }
    // Skipped under `skip` as the negatives they are.
    let text = format!("{head}c1,i1,2017-01-01,1,(1.49)\nc2,i1,2017-01-02,1,2\n");
    let (orders, report) = read(&text, &mapping(), BadRowPolicy::Skip).unwrap();
    assert_eq!(orders.len(), 1);
    assert_eq!(report.skipped[&BadRowReason::NegativeAmount], 1);
}

/// A spreadsheet's `sep=` first line is skipped when it declares the
/// separator in use and named with the flag when it does not; a header
/// with a mapped name twice and a quote left open are named.
#[test]
fn sep_lines_duplicate_columns_and_open_quotes_are_named() {
    let body = "customer;item;ts;qty;price\nc1;i1;2017-01-01;1;2\n";
    let mut semi = mapping();
    semi.delimiter = Delimiter::Semicolon;
    let (orders, _) = read(&format!("sep=;\n{body}"), &semi, BadRowPolicy::Fail).unwrap();
    assert_eq!(orders.len(), 1);
    assert_eq!(
        fail_message(&format!("sep=;\n{body}"), &mapping()),
        "orders.csv: line 1: a spreadsheet's `sep=` line declaring the separator `;`: give \
         `--delimiter semicolon` (or `delimiter = \"semicolon\"` in the mapping: `[data.orders]` in merchant.toml), or delete the line"
    );
    let twice = "customer,item,ts,qty,price,price\nc1,i1,2017-01-01,1,2,3\n";
    assert_eq!(
        fail_message(twice, &mapping()),
        "orders.csv: line 1: the header names the column `price` more than once: rename one of \
         them so the mapping names one column"
    );
    // Two exports joined end to end: the second header is named as such,
    // under either bad-row policy (it read as a bad date).
    let joined = format!("{body}{body}").replace(';', ",");
    for policy in [BadRowPolicy::Fail, BadRowPolicy::Skip] {
        let e = read(&joined, &mapping(), policy).unwrap_err().to_string();
        assert_eq!(
            e,
            "orders.csv: line 3: repeats the header line: two exports joined end to end? Delete \
             the repeated header lines (one file has one header, on its first line)"
        );
    }
    let open = "customer,item,ts,qty,price\nc1,\"i1,2017-01-01,1,2\nc2,i2,2017-01-02,1,2\n";
    let m = fail_message(open, &mapping());
    assert!(
        m.contains("an opening `\"` without its closing quote"),
        "{m}"
    );
}

/// Each cell is within f32's range, but a customer's sum was not checked:
/// five lines of 3.3e38 made an infinite monetary value that broke training
/// later with advice about the learning rate. Refused, naming the customer.
#[test]
fn a_customer_whose_sums_leave_f32_range_is_refused_by_name() {
    let mut orders: Vec<Order> = (0..5)
        .map(|k| order("big", "x", day(10 + k), 1.0, 3.3e38))
        .collect();
    orders.push(order("small", "x", day(20), 1.0, 5.0));
    let e = derive(&orders, &ChurnConfig::new(day(100), 30))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("customer `big`: monetary comes to 1.650e39, beyond ±1e15"),
        "{e}"
    );
    orders.truncate(1);
    orders[0].amount = 1e15;
    derive(&orders, &ChurnConfig::new(day(100), 30)).unwrap();
}

/// One amount of 1e30 is a finite f32, but its square is not: the merchant's
/// statistics step was refused as non-finite and its rows, scaled by the other
/// merchants' spread, wrecked the federated churn model (AUC 0.85 → 0.63 on
/// grocery) with no error. Refused when derived, naming customer and feature.
#[test]
fn a_feature_whose_square_overflows_the_statistics_is_refused_by_name() {
    let orders = vec![
        order("typo", "x", day(10), 1.0, 1e30),
        order("fine", "x", day(20), 1.0, 5.0),
    ];
    let e = derive(&orders, &ChurnConfig::new(day(100), 30))
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("customer `typo`: monetary comes to 1.000e30, beyond ±1e15"),
        "{e}"
    );
    assert!(
        e.ends_with("check that customer's quantity and amount cells"),
        "{e}"
    );
}

/// An export with a unit price beside the quantity (UCI Online Retail's
/// `UnitPrice` and `Quantity`) gives each line price × quantity; without a
/// quantity column the mapping is refused naming the keys, and a product
/// beyond f32 is a bad amount, not ∞.
#[test]
fn a_unit_price_column_is_multiplied_by_the_quantity() {
    let text = format!("{HEADER}c1,i1,2024-01-01,3,2.5\nc1,i2,2024-01-02,1,4\n");
    let total = read(&text, &mapping(), BadRowPolicy::Fail).unwrap().0;
    assert_eq!(
        total.iter().map(|o| o.amount).collect::<Vec<_>>(),
        [2.5, 4.0]
    );
    let unit = OrdersMapping {
        amount_is: AmountIs::UnitPrice,
        ..mapping()
    };
    let orders = read(&text, &unit, BadRowPolicy::Fail).unwrap().0;
    assert_eq!(
        orders.iter().map(|o| o.amount).collect::<Vec<_>>(),
        [7.5, 4.0]
    );
    assert_eq!(orders[0].quantity, 3.0);
    let without = OrdersMapping {
        quantity: None,
        ..unit.clone()
    };
    assert_eq!(
        fail_message(&text, &without),
        "orders.csv: the amount column `price` holds a unit price (`amount_is = \"unit_price\"`), \
         so the line's value needs the quantity column: name it (`quantity`, or `--quantity-col`)"
    );
    let huge = fail_message(&format!("{HEADER}c1,i1,2024-01-01,1e20,1e20\n"), &unit);
    assert_eq!(
        huge,
        "orders.csv: line 2, column `price`: unit price `1e20` × quantity `100000000000000000000` \
         is too large (the largest is about 3.4e38)"
    );
    // Skipped, not fatal, under the skip policy.
    let (kept, report) = read(
        &format!("{HEADER}c1,i1,2024-01-01,1e20,1e20\nc2,i1,2024-01-01,2,1\n"),
        &unit,
        BadRowPolicy::Skip,
    )
    .unwrap();
    assert_eq!((kept.len(), kept[0].amount), (1, 2.0));
    assert_eq!(report.skipped.get(&BadRowReason::BadAmount), Some(&1));
    // The key reads from a mapping file and round-trips; the default is
    // left out.
    let file: OrdersMapping = toml::from_str(
        "customer = \"customer\"\ntimestamp = \"ts\"\nquantity = \"qty\"\namount = \"price\"\n\
         amount_is = \"unit_price\"\n",
    )
    .unwrap();
    assert_eq!(file.amount_is, AmountIs::UnitPrice);
    assert!(
        toml::to_string(&file)
            .unwrap()
            .contains("amount_is = \"unit_price\"")
    );
    assert!(!toml::to_string(&mapping()).unwrap().contains("amount_is"));
    // A flag (`--amount-is`) over a mapping file, as prepare and the
    // simulator build theirs.
    let flag = crate::data::orders::mapping::MappingOverrides {
        amount_is: Some(AmountIs::UnitPrice),
        ..Default::default()
    };
    let none = crate::data::orders::mapping::MappingOverrides::default();
    assert_eq!(flag.apply(Some(mapping())).unwrap(), unit);
    assert_eq!(
        none.clone()
            .or(flag.clone())
            .apply(Some(mapping()))
            .unwrap(),
        unit
    );
    assert_eq!(none.apply(Some(mapping())).unwrap(), mapping());
    assert_eq!("unit_price".parse::<AmountIs>(), Ok(AmountIs::UnitPrice));
    assert!(
        "price"
            .parse::<AmountIs>()
            .unwrap_err()
            .contains("not `price`")
    );
}

/// A huge bad cell is quoted by its start and its length, not whole.
#[test]
fn a_huge_bad_cell_is_quoted_by_its_start() {
    let long = "9".repeat(100) + &"x".repeat(3_000_000);
    let e = fail_message(&format!("{HEADER}c1,i1,{long},1,1\n"), &mapping());
    assert!(e.len() < 2_000, "{} bytes", e.len());
    assert!(
        e.starts_with("orders.csv: line 2, column `ts`: ")
            && e.contains(&format!("{}… (3000100 bytes in all)", "9".repeat(80))),
        "{}",
        &e[..e.len().min(500)]
    );
    let e = fail_message(&format!("{HEADER}c1,i1,2024-01-01,1,{long}\n"), &mapping());
    assert!(
        e.len() < 2_000 && e.contains("(3000100 bytes in all)"),
        "{}",
        &e[..e.len().min(500)]
    );
    // A short cell is quoted whole, as before.
    let e = fail_message(&format!("{HEADER}c1,i1,2024-01-01,1,abc\n"), &mapping());
    assert!(e.contains("`abc`"), "{e}");
}
