//! A merchant's orders export, read with each delimiter, timestamp format,
//! amount kind and bad-row policy (picked by the first input byte). Read or fail, never panic;
//! the orders read, written back as comma-separated unix-seconds CSV and read
//! again, are the same orders.
#![no_main]

use std::path::Path;

use fedcart_common::data::orders::{
    AmountIs, BadRowPolicy, DecimalMark, Delimiter, Order, OrdersMapping, TimestampFormat,
    read_orders_from,
};
use libfuzzer_sys::fuzz_target;

fn pattern(p: &str) -> TimestampFormat {
    p.parse().expect("a valid strftime pattern")
}

fn full_mapping(delimiter: Delimiter, timestamp_format: TimestampFormat) -> OrdersMapping {
    OrdersMapping {
        customer: "customer".into(),
        item: Some("item".into()),
        timestamp: "time".into(),
        timestamp_format,
        quantity: Some("qty".into()),
        amount: "amount".into(),
        amount_is: AmountIs::LineTotal,
        rating: Some("rating".into()),
        merchant: Some("store".into()),
        delimiter,
        decimal: Default::default(),
    }
}

/// The orders as a comma-separated export with every column and unix seconds.
fn write_back(orders: &[Order]) -> Vec<u8> {
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record([
        "customer", "item", "time", "qty", "amount", "rating", "store",
    ])
    .expect("in memory");
    for o in orders {
        w.write_record([
            o.customer.clone(),
            // A line without an item is kept with none (a gift card, a
            // custom line): written back blank, it reads back the same.
            o.item.clone().unwrap_or_default(),
            o.timestamp.to_string(),
            o.quantity.to_string(),
            o.amount.to_string(),
            o.rating.map_or_else(|| "0".into(), |r| r.to_string()),
            o.merchant.clone().unwrap_or_default(),
        ])
        .expect("in memory");
    }
    w.into_inner().expect("in memory")
}

fuzz_target!(|data: &[u8]| {
    let [pick, csv @ ..] = data else {
        return;
    };
    let policy = if pick & 1 == 0 {
        BadRowPolicy::Fail
    } else {
        BadRowPolicy::Skip
    };
    let format = [
        TimestampFormat::Auto,
        TimestampFormat::UnixSeconds,
        TimestampFormat::Iso8601,
        TimestampFormat::Yyyymmdd,
    ][usize::from((pick >> 1) & 3)]
    .clone();
    let layout = pick >> 3;
    // Layouts 6 and above add the formats a spreadsheet writes: a decimal
    // comma, a US date, a European date, serial days.
    let (format, decimal) = match layout / 6 {
        1 => (format, DecimalMark::Comma),
        2 => (pattern("%m/%d/%Y %H:%M"), DecimalMark::Point),
        3 => (pattern("%d.%m.%Y"), DecimalMark::Comma),
        4 => (TimestampFormat::SpreadsheetDays, DecimalMark::Point),
        _ => (format, DecimalMark::Point),
    };
    let mut mapping = match layout % 6 {
        0 => OrdersMapping::cdnow(),
        1 => full_mapping(Delimiter::Comma, format),
        2 => full_mapping(Delimiter::Tab, format),
        3 => full_mapping(Delimiter::Semicolon, format),
        4 => full_mapping(Delimiter::Pipe, format),
        _ => full_mapping(Delimiter::Whitespace, format),
    };
    if layout >= 6 {
        mapping.decimal = decimal;
    }
    // Layouts 30 and 31: the amount column holds a unit price (each line
    // read is then worth price × quantity, written back as a line total).
    if layout >= 30 {
        mapping.amount_is = AmountIs::UnitPrice;
    }
    let path = Path::new("fuzz.csv");
    let Ok((orders, report)) = read_orders_from(csv, path, &mapping, policy) else {
        return;
    };
    // Every row read is a purchase, a return or a skipped row; purchases
    // returned whole are left out of the orders.
    assert_eq!(
        report.rows_read,
        report.rows_ok + report.returns + report.returns_unmatched + report.rows_skipped()
    );
    assert_eq!(report.rows_ok - report.returned_whole, orders.len() as u64);
    if mapping.item.is_none() {
        return; // cdnow: no item or rating column to write back.
    }
    for o in &orders {
        assert!(o.quantity >= 0.0 && o.amount >= 0.0, "{o:?}");
    }
    let again = full_mapping(Delimiter::Comma, TimestampFormat::UnixSeconds);
    let (reread, _) = read_orders_from(&write_back(&orders)[..], path, &again, BadRowPolicy::Fail)
        .expect("orders written back read again");
    assert_eq!(reread, orders);
});
