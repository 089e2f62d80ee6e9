//! How a merchant's orders export maps onto fedcart's order fields: column
//! names, delimiter, timestamp format and decimal mark (the cell parsers
//! themselves are `data::cells`).
//!
//! The mapping is plain serde data so a merchant can keep it in a TOML file
//! next to the export (see `client/examples/cdnow-mapping.toml`).

use serde::{Deserialize, Serialize};

pub use crate::data::cells::{DecimalMark, SECONDS_PER_DAY, TimestampFormat, days_from_civil};

/// The field separator of the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Delimiter {
    /// `,` with CSV quoting.
    #[default]
    #[serde(alias = ",")]
    Comma,
    /// A tab, with CSV quoting.
    #[serde(alias = "\t")]
    Tab,
    /// `;` with CSV quoting (common in European spreadsheet exports).
    #[serde(alias = ";")]
    Semicolon,
    /// `|` with CSV quoting.
    #[serde(alias = "|")]
    Pipe,
    /// Runs of spaces or tabs, no quoting (fixed-width style dumps such as CDNOW).
    Whitespace,
}

impl Delimiter {
    /// The separator byte for the CSV reader (`None` for whitespace runs).
    pub fn byte(self) -> Option<u8> {
        match self {
            Delimiter::Comma => Some(b','),
            Delimiter::Tab => Some(b'\t'),
            Delimiter::Semicolon => Some(b';'),
            Delimiter::Pipe => Some(b'|'),
            Delimiter::Whitespace => None,
        }
    }

    /// The word that selects it (`--delimiter`, `delimiter = "…"`).
    pub fn name(self) -> &'static str {
        match self {
            Delimiter::Comma => "comma",
            Delimiter::Tab => "tab",
            Delimiter::Semicolon => "semicolon",
            Delimiter::Pipe => "pipe",
            Delimiter::Whitespace => "whitespace",
        }
    }
}

impl std::str::FromStr for Delimiter {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "comma" | "," => Ok(Self::Comma),
            "tab" | "\t" => Ok(Self::Tab),
            "semicolon" | ";" => Ok(Self::Semicolon),
            "pipe" | "|" => Ok(Self::Pipe),
            "whitespace" => Ok(Self::Whitespace),
            other => Err(format!(
                "delimiter must be comma, tab, semicolon, pipe or whitespace, not `{other}`"
            )),
        }
    }
}

/// Which columns of the export hold which order field (names as in its
/// header), and how to read them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrdersMapping {
    /// Customer identifier column.
    pub customer: String,
    /// Catalogue item column; without it no interactions are derived, but
    /// RFM features and churn labels still are.
    #[serde(default)]
    pub item: Option<String>,
    /// Order time column.
    pub timestamp: String,
    /// How the order time is written.
    #[serde(default)]
    pub timestamp_format: TimestampFormat,
    /// Quantity column; without it every row counts as quantity 1.
    #[serde(default)]
    pub quantity: Option<String>,
    /// Order-line value column (the monetary part of RFM).
    pub amount: String,
    /// What the amount column holds: the line's total (the default) or the
    /// price of one unit, which the quantity column then multiplies.
    #[serde(default, skip_serializing_if = "AmountIs::is_line_total")]
    pub amount_is: AmountIs,
    /// Explicit rating column, used as the interaction value when present.
    #[serde(default)]
    pub rating: Option<String>,
    /// Merchant or store column, for exports that cover several stores.
    #[serde(default)]
    pub merchant: Option<String>,
    /// Field separator.
    #[serde(default)]
    pub delimiter: Delimiter,
    /// Decimal mark of the quantity, amount and rating columns.
    #[serde(default)]
    pub decimal: DecimalMark,
}

/// What an export's amount column holds (`amount_is`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum AmountIs {
    /// The order line's value: what the customer paid for the line.
    #[default]
    LineTotal,
    /// The price of one unit (e.g. an `UnitPrice` column beside a
    /// `Quantity` one): the line's value is price × quantity, so the mapping
    /// needs its `quantity` column.
    UnitPrice,
}

impl AmountIs {
    /// The default (serde leaves it out).
    pub fn is_line_total(&self) -> bool {
        *self == AmountIs::LineTotal
    }

    /// `line_total` or `unit_price`, as settings write it.
    pub fn name(self) -> &'static str {
        match self {
            AmountIs::LineTotal => "line_total",
            AmountIs::UnitPrice => "unit_price",
        }
    }
}

impl std::str::FromStr for AmountIs {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "line_total" => Ok(Self::LineTotal),
            "unit_price" => Ok(Self::UnitPrice),
            other => Err(format!(
                "the amount column holds `line_total` or `unit_price`, not `{other}`"
            )),
        }
    }
}

/// Column settings given one by one (command-line flags, a config table,
/// a mapping file read as settings: its keys are [`OrdersMapping`]'s), each
/// `None` when not given. Both `fedcart-client prepare` and the simulator
/// build their mapping through [`MappingOverrides::apply`], so the same
/// flags mean the same thing in both, and a mapping file may leave out
/// columns the flags give.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MappingOverrides {
    /// Customer identifier column.
    pub customer: Option<String>,
    /// Catalogue item column.
    pub item: Option<String>,
    /// Order time column.
    pub timestamp: Option<String>,
    /// How the order time is written.
    pub timestamp_format: Option<TimestampFormat>,
    /// Quantity column.
    pub quantity: Option<String>,
    /// Order-line value column.
    pub amount: Option<String>,
    /// What the amount column holds.
    pub amount_is: Option<AmountIs>,
    /// Explicit rating column.
    pub rating: Option<String>,
    /// Merchant or store column.
    pub merchant: Option<String>,
    /// Field separator.
    pub delimiter: Option<Delimiter>,
    /// Decimal mark of the number columns.
    pub decimal: Option<DecimalMark>,
}

/// A mapping built from overrides alone lacks a required column.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the `{field}` column is required")]
pub struct MissingColumn {
    /// The mapping key of the missing column (`customer`, `timestamp` or
    /// `amount`), for callers to name their own flag.
    pub field: &'static str,
}

impl MappingOverrides {
    /// Field by field, `self` where given, else `file`: flags over a
    /// mapping file.
    pub fn or(self, file: Self) -> Self {
        Self {
            customer: self.customer.or(file.customer),
            item: self.item.or(file.item),
            timestamp: self.timestamp.or(file.timestamp),
            timestamp_format: self.timestamp_format.or(file.timestamp_format),
            quantity: self.quantity.or(file.quantity),
            amount: self.amount.or(file.amount),
            amount_is: self.amount_is.or(file.amount_is),
            rating: self.rating.or(file.rating),
            merchant: self.merchant.or(file.merchant),
            delimiter: self.delimiter.or(file.delimiter),
            decimal: self.decimal.or(file.decimal),
        }
    }

    /// `base` (a mapping file, or a known export's mapping) with every given
    /// override applied. Without a base, the overrides form the mapping and
    /// must name the customer, timestamp and amount columns (checked in that
    /// order); the format is then `auto` and the delimiter a comma unless
    /// overridden.
    pub fn apply(&self, base: Option<OrdersMapping>) -> Result<OrdersMapping, MissingColumn> {
        let mut map = match base {
            Some(map) => map,
            None => {
                let required = |v: &Option<String>, field: &'static str| {
                    v.clone().ok_or(MissingColumn { field })
                };
                OrdersMapping {
                    customer: required(&self.customer, "customer")?,
                    item: None,
                    timestamp: required(&self.timestamp, "timestamp")?,
                    timestamp_format: TimestampFormat::Auto,
                    quantity: None,
                    amount: required(&self.amount, "amount")?,
                    amount_is: AmountIs::LineTotal,
                    rating: None,
                    merchant: None,
                    delimiter: Delimiter::Comma,
                    decimal: DecimalMark::Point,
                }
            }
        };
        for (v, field) in [
            (&self.customer, &mut map.customer),
            (&self.timestamp, &mut map.timestamp),
            (&self.amount, &mut map.amount),
        ] {
            if let Some(v) = v {
                field.clone_from(v);
            }
        }
        for (v, field) in [
            (&self.item, &mut map.item),
            (&self.quantity, &mut map.quantity),
            (&self.rating, &mut map.rating),
            (&self.merchant, &mut map.merchant),
        ] {
            if v.is_some() {
                field.clone_from(v);
            }
        }
        if let Some(f) = &self.timestamp_format {
            map.timestamp_format = f.clone();
        }
        if let Some(d) = self.delimiter {
            map.delimiter = d;
        }
        if let Some(d) = self.decimal {
            map.decimal = d;
        }
        if let Some(a) = self.amount_is {
            map.amount_is = a;
        }
        Ok(map)
    }
}

impl OrdersMapping {
    /// The mapping of the bundled CDNOW file `data/cdnow/CDNOW_master.txt`:
    /// whitespace-separated, `YYYYMMDD` dates, no item column.
    pub fn cdnow() -> Self {
        Self {
            customer: "customer_id".into(),
            item: None,
            timestamp: "date".into(),
            timestamp_format: TimestampFormat::Yyyymmdd,
            quantity: Some("number_of_cds".into()),
            amount: "dollar_value".into(),
            amount_is: AmountIs::LineTotal,
            rating: None,
            merchant: None,
            delimiter: Delimiter::Whitespace,
            decimal: DecimalMark::Point,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_days_match_known_dates() {
        assert_eq!(days_from_civil(1970, 1, 1), Some(0));
        assert_eq!(days_from_civil(2000, 3, 1), Some(11_017));
        assert_eq!(days_from_civil(1997, 9, 30), Some(10_134));
        assert_eq!(days_from_civil(1969, 12, 31), Some(-1));
        assert_eq!(days_from_civil(2024, 2, 29), Some(19_782));
        assert_eq!(days_from_civil(2023, 2, 29), None);
        assert_eq!(days_from_civil(1900, 2, 29), None);
        assert_eq!(days_from_civil(2023, 13, 1), None);
    }

    #[test]
    fn every_format_reads_the_same_instant() {
        let t = 10_134 * SECONDS_PER_DAY;
        let f = TimestampFormat::Auto;
        assert_eq!(f.parse("19970930"), Ok(t));
        assert_eq!(f.parse("1997-09-30"), Ok(t));
        assert_eq!(f.parse(&t.to_string()), Ok(t));
        assert_eq!(f.parse("1997-09-30T01:02:03Z"), Ok(t + 3723));
        assert_eq!(f.parse("1997-09-30 01:02:03.250"), Ok(t + 3723));
        // 03:02 at UTC+2 is 01:02 UTC.
        assert_eq!(f.parse("1997-09-30T03:02+02:00"), Ok(t + 3720));
        assert_eq!(f.parse("1997-09-29T23:00:00-0100"), Ok(t));
        assert_eq!(TimestampFormat::UnixSeconds.parse("-86400"), Ok(-86_400));
        // Shopify's `Created at`: the offset after a space; ` UTC` too.
        assert_eq!(f.parse("1997-09-29 20:02:03 -0500"), Ok(t + 3723));
        assert_eq!(f.parse("1997-09-30 01:02:03 UTC"), Ok(t + 3723));
        assert!(f.parse("1997-09-30 01:02:03 PST").is_err());
        // No real offset passes ±14 hours or 59 minutes.
        assert!(f.parse("1997-09-30T01:02:03+99:99").is_err());
        assert!(f.parse("1997-09-30T01:02:03+05:60").is_err());
        assert_eq!(f.parse("1997-09-30T15:02:03+14:00"), Ok(t + 3723));
        assert!(f.parse("1997-09-30 01:02:03 ").is_err());
    }

    /// Unix seconds with a fraction read (floored) in `unix_seconds` and
    /// `auto`; milliseconds given as `unix_seconds` are refused past the
    /// year 3000 with the format that reads them; an empty cell says so.
    #[test]
    fn unix_seconds_take_a_fraction_and_milliseconds_read_as_seconds_are_refused() {
        let secs = TimestampFormat::UnixSeconds;
        let auto = TimestampFormat::Auto;
        for f in [&secs, &auto] {
            assert_eq!(f.parse("1483285772.000"), Ok(1_483_285_772));
            assert_eq!(f.parse("1483285772.75"), Ok(1_483_285_772));
        }
        assert_eq!(secs.parse("-5.5"), Ok(-6));
        assert_eq!(secs.parse("-0.5"), Ok(-1));
        assert!(secs.parse("1483285772.").is_ok());
        assert!(secs.parse("1483285772.5x").is_err());
        let e = secs.parse("1483285772000").unwrap_err();
        assert!(
            e.contains("tens of thousands of years ahead") && e.contains("`unix_ms`"),
            "{e}"
        );
        // The latest date any other format reads (9999-12-31) still reads as
        // seconds, so a file written back in seconds reads again.
        let last = TimestampFormat::Iso8601
            .parse("9999-12-31T23:59:59")
            .unwrap();
        assert_eq!(secs.parse(&last.to_string()), Ok(last));
        assert!(secs.parse("-9223372036854775808.5").is_err(), "no overflow");
        assert!(
            "%Y-%m-%d"
                .parse::<TimestampFormat>()
                .unwrap()
                .parse("+12345-01-01")
                .unwrap_err()
                .contains("past 9999")
        );
        assert_eq!(
            TimestampFormat::UnixMillis.parse("1483285772000"),
            Ok(1_483_285_772)
        );
        for f in [secs, auto, TimestampFormat::Iso8601] {
            assert_eq!(f.parse(""), Err("empty, not a date".to_string()));
        }
    }

    /// A date column a spreadsheet saved as numbers: serial days since
    /// 1899-12-30. `auto` used to read `42736` as unix seconds, eleven
    /// hours into 1970; it now refuses it showing both readings and the
    /// format that settles it, and `spreadsheet_days` reads it.
    #[test]
    fn spreadsheet_serial_days_are_read_when_named_and_refused_by_auto() {
        let jan1 = days_from_civil(2017, 1, 1).unwrap() * SECONDS_PER_DAY;
        let f = TimestampFormat::SpreadsheetDays;
        assert_eq!(f.parse("42736"), Ok(jan1));
        assert_eq!(f.parse("42736.5"), Ok(jan1 + 12 * 3600));
        // 18:05:00 is 0.753472… of a day; to the nearest second.
        assert_eq!(f.parse("42736.7534722222"), Ok(jan1 + 18 * 3600 + 5 * 60));
        assert_eq!(f.parse("25569"), Ok(0));
        for bad in ["", "0", "-1", "4e4", "42736,5", "2958466", "1.2.3", ".5"] {
            assert!(f.parse(bad).is_err(), "{bad} parsed");
        }
        assert_eq!("spreadsheet_days".parse(), Ok(f.clone()));
        assert_eq!(String::from(f), "spreadsheet_days");

        let auto = TimestampFormat::Auto;
        let e = auto.parse("42736").unwrap_err();
        assert!(
            e.contains("`42736` as unix seconds is 1970-01-01 11:52:16 UTC")
                && e.contains("as a spreadsheet's serial day it is 2017-01-01 00:00:00 UTC")
                && e.contains("--timestamp-format spreadsheet_days")
                && e.contains("or `unix_seconds` if these really are seconds since 1970"),
            "{e}"
        );
        let e = auto.parse("42736.5").unwrap_err();
        assert!(
            e.contains("is not unix seconds")
                && e.contains("2017-01-01 12:00:00 UTC")
                && !e.contains("unix_seconds"),
            "{e}"
        );
        // Unix seconds of any year since 1973, dates and negative seconds
        // are read as before.
        assert_eq!(auto.parse("100000000"), Ok(100_000_000));
        assert_eq!(auto.parse("1704880800"), Ok(1_704_880_800));
        assert_eq!(auto.parse("-86400"), Ok(-86_400));
        assert_eq!(auto.parse("20170101"), Ok(jan1));
    }

    /// `01/01/17` with `%m/%d/%Y` used to be read as the year 17 AD.
    #[test]
    fn two_digit_years_under_a_four_digit_pattern_name_the_fix() {
        let f: TimestampFormat = "%m/%d/%Y".parse().unwrap();
        let e = f.parse("01/01/17").unwrap_err();
        assert!(
            e.contains("is in the year 17: for two-digit years write `%y` instead of `%Y`"),
            "{e}"
        );
        let y: TimestampFormat = "%m/%d/%y".parse().unwrap();
        assert_eq!(y.parse("01/01/17"), Ok(1_483_228_800));
        assert_eq!(f.parse("01/01/2017"), Ok(1_483_228_800));
    }

    /// Exports written by JavaScript count milliseconds: `auto` used to read
    /// `1483293522000` as seconds, in the year 48973. Twelve and thirteen
    /// digits are milliseconds (as seconds they would be past the year
    /// 5000); longer integers are refused naming the unit; `unix_ms` reads
    /// milliseconds of any length.
    #[test]
    fn unix_milliseconds_are_read_by_auto_and_by_name() {
        let auto = TimestampFormat::Auto;
        assert_eq!(auto.parse("1483293522000"), Ok(1_483_293_522));
        assert_eq!(auto.parse("1483293522999"), Ok(1_483_293_522));
        assert_eq!(auto.parse("100000000000"), Ok(100_000_000));
        // Eleven digits stay seconds (the year 2286 to 5138).
        assert_eq!(auto.parse("10000000000"), Ok(10_000_000_000));
        let e = auto.parse("1483293522000000").unwrap_err();
        assert!(e.contains("micro- or nanoseconds"), "{e}");
        let ms = TimestampFormat::UnixMillis;
        assert_eq!("unix_ms".parse(), Ok(ms.clone()));
        assert_eq!("unix_milliseconds".parse(), Ok(ms.clone()));
        assert_eq!(String::from(ms.clone()), "unix_ms");
        assert_eq!(ms.parse("1483293522000"), Ok(1_483_293_522));
        assert_eq!(ms.parse("-1500"), Ok(-2));
        assert_eq!(
            ms.parse("12.5"),
            Err("`12.5` is not unix milliseconds".into())
        );
    }

    #[test]
    fn a_date_setting_reads_as_auto_and_a_refusal_says_how_to_write_the_date() {
        let jan1 = 1_483_228_800;
        for ok in ["2017-01-01", "20170101", "1483228800"] {
            assert_eq!(TimestampFormat::parse_setting(ok), Ok(jan1), "{ok}");
        }
        // A cutoff takes no timestamp format: no flag to name, the day instead.
        let e = TimestampFormat::parse_setting("42736").unwrap_err();
        assert_eq!(
            e,
            "`42736` is not a date; as a spreadsheet's serial day it is 2017-01-01 00:00:00 UTC: \
             write that day as YYYY-MM-DD"
        );
        for bad in ["01/31/2017", "soon", ""] {
            let e = TimestampFormat::parse_setting(bad).unwrap_err();
            assert!(
                e.contains("is not a date: write it as YYYY-MM-DD") && !e.contains("format"),
                "{e}"
            );
        }
    }

    #[test]
    fn malformed_timestamps_say_what_was_expected() {
        let f = TimestampFormat::Auto;
        for bad in [
            "19971331",
            "1997-02-30",
            "97/09/30",
            "",
            "1997-09-30T25:00",
            "12a",
        ] {
            assert!(f.parse(bad).is_err(), "{bad} parsed");
        }
        assert_eq!(
            TimestampFormat::Yyyymmdd.parse("1997-09-30"),
            Err("`1997-09-30` is not a YYYYMMDD date".into())
        );
    }

    #[test]
    fn a_day_month_year_timestamp_is_refused_with_the_layouts_that_read_it() {
        let auto = TimestampFormat::Auto;
        let refusal = |raw: &str| auto.parse(raw).expect_err("refused");
        let lead = "is not unix seconds, an ISO-8601 date or YYYYMMDD: give its layout as a \
                    timestamp format (`--timestamp-format` on the command line, or \
                    `timestamp_format` in the mapping: `[data.orders]` in merchant.toml), ";
        // Either order reads `01/02/2017`: both are offered.
        assert_eq!(
            refusal("01/02/2017 11:53"),
            format!(
                "`01/02/2017 11:53` {lead}`%d/%m/%Y %H:%M` (day first) or \
                 `%m/%d/%Y %H:%M` (month first)"
            )
        );
        // A first number above 12 is a day, a second one a month's day.
        assert_eq!(
            refusal("31.01.2017"),
            format!("`31.01.2017` {lead}`%d.%m.%Y`")
        );
        assert_eq!(
            refusal("1/31/2017 08:05:09"),
            format!("`1/31/2017 08:05:09` {lead}`%m/%d/%Y %H:%M:%S`")
        );
        // Each offered layout reads the value it was offered for.
        for (raw, layout) in [
            ("31.01.2017", "%d.%m.%Y"),
            ("1/31/2017 08:05:09", "%m/%d/%Y %H:%M:%S"),
            ("01-02-2017T11:53", "%d-%m-%YT%H:%M"),
        ] {
            let read = TimestampFormat::Pattern(layout.into()).parse(raw);
            assert!(read.is_ok(), "{raw} with {layout}: {read:?}");
            assert!(refusal(raw).contains(layout), "{}", refusal(raw));
        }
        // No layout reads an impossible date, a two-digit year or other
        // shapes: the general advice stands.
        for raw in [
            "31/31/2017",
            "97/09/30",
            "12/1/99",
            "yesterday",
            "1/2/2017 noon",
        ] {
            let e = refusal(raw);
            assert!(e.contains("e.g. `%m/%d/%Y %H:%M`"), "{e}");
        }
    }
}
