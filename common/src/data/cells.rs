//! How a cell of a merchant's file reads as a time or a number: the
//! timestamp formats (built-in layouts and strftime patterns) and the
//! decimal marks of money columns. Below every reader (orders exports,
//! customer tables, ratings files), so they all read a cell alike.

use serde::{Deserialize, Serialize};

/// Seconds in a day; all durations in the features are in days.
pub const SECONDS_PER_DAY: i64 = 86_400;

/// How the timestamp column is written.
///
/// In a mapping file and on the command line it is one string: `auto`,
/// `unix_seconds`, `unix_ms`, `iso8601`, `yyyymmdd`, `spreadsheet_days`,
/// or a strftime pattern (anything
/// with a `%`), so `"%d/%m/%Y %H:%M"` reads `31/01/2024 18:05`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(try_from = "String", into = "String")]
pub enum TimestampFormat {
    /// Decide per value: 8 digits are `YYYYMMDD`, integers of 9 to 11
    /// digits unix seconds, of 12 or 13 digits unix milliseconds (as
    /// seconds they would be after the year 5000; as milliseconds they are
    /// 1973 to 2286: what JavaScript and many exports write), anything with
    /// a `-` ISO-8601. (An 8-digit unix time would be before March 1973, so
    /// the overlap does not arise in practice.)
    /// An integer of at most 7 digits is refused: as unix seconds it would
    /// be in the first months of 1970, and it is far more likely a
    /// spreadsheet's serial day; the error shows both readings and names
    /// the format that settles it.
    #[default]
    Auto,
    /// Integer seconds since 1970-01-01 UTC.
    UnixSeconds,
    /// Integer milliseconds since 1970-01-01 UTC (JavaScript's `Date.now()`).
    UnixMillis,
    /// `YYYY-MM-DD`, optionally followed by `T` or a space and
    /// `HH:MM[:SS[.fff]]` and `Z` or `±HH:MM` (`±HHMM`, `±HH`), also after a
    /// space as Shopify writes it (`2017-01-01 17:58:42 -0500`), or ` UTC`.
    Iso8601,
    /// `YYYYMMDD` (a calendar date, taken at midnight UTC).
    Yyyymmdd,
    /// A spreadsheet's serial day: days since 1899-12-30 (Excel's 1900
    /// date system, LibreOffice's default), the fraction the time of day,
    /// taken as UTC: `42736.5` is 2017-01-01 12:00. What a date column
    /// becomes when a spreadsheet saves it as a number.
    SpreadsheetDays,
    /// A strftime pattern in chrono's syntax (`%Y`, `%m`, `%d`, `%H`, `%M`,
    /// `%S`, `%b`, `%p`, `%z`, …). A time without `%z` is taken as UTC, a
    /// date without a time as midnight UTC, like the built-in formats.
    /// `%Z` (a time-zone name) is refused: chrono skips the name.
    Pattern(String),
}

impl std::str::FromStr for TimestampFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "unix_seconds" | "unix" => Ok(Self::UnixSeconds),
            "unix_ms" | "unix_milliseconds" => Ok(Self::UnixMillis),
            "iso8601" | "iso" => Ok(Self::Iso8601),
            "yyyymmdd" => Ok(Self::Yyyymmdd),
            "spreadsheet_days" | "excel_days" => Ok(Self::SpreadsheetDays),
            pattern if pattern.contains('%') => {
                use chrono::format::{Item, StrftimeItems};
                if StrftimeItems::new(pattern).any(|i| matches!(i, Item::Error)) {
                    return Err(format!(
                        "timestamp format `{pattern}` is not a valid strftime pattern \
                         (an unknown `%` directive?)"
                    ));
                }
                // chrono skips a time-zone name when it parses (`PST`,
                // `CET`, even `XYZ`), so every time would silently be read
                // as UTC: names are ambiguous (`CST` is US Central and
                // China Standard time) and no table of them is kept.
                if StrftimeItems::new(pattern)
                    .any(|i| matches!(i, Item::Fixed(chrono::format::Fixed::TimezoneName)))
                {
                    return Err(format!(
                        "timestamp format `{pattern}` has `%Z`, a time-zone name (PST, CET, …), \
                         which cannot be read: the name would be skipped and every time taken \
                         as UTC. For numeric offsets (`+0200`, `-08:00`) write `%z`; for \
                         names, convert the column to UTC or to offsets first (there is no \
                         time-zone setting), or leave `%Z` out to read the times as UTC"
                    ));
                }
                Ok(Self::Pattern(pattern.to_string()))
            }
            other => Err(format!(
                "timestamp format must be auto, unix_seconds, unix_ms, iso8601, yyyymmdd, \
                 spreadsheet_days or a strftime pattern such as `%d/%m/%Y %H:%M`, not `{other}`"
            )),
        }
    }
}

impl TryFrom<String> for TimestampFormat {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<TimestampFormat> for String {
    fn from(f: TimestampFormat) -> String {
        match f {
            TimestampFormat::Auto => "auto".into(),
            TimestampFormat::UnixSeconds => "unix_seconds".into(),
            TimestampFormat::UnixMillis => "unix_ms".into(),
            TimestampFormat::Iso8601 => "iso8601".into(),
            TimestampFormat::Yyyymmdd => "yyyymmdd".into(),
            TimestampFormat::SpreadsheetDays => "spreadsheet_days".into(),
            TimestampFormat::Pattern(p) => p,
        }
    }
}

/// How the quantity, amount and rating columns write a fraction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DecimalMark {
    /// `1234.50`, `1,234.50`, `$1,234.50`.
    #[default]
    #[serde(alias = ".")]
    Point,
    /// `1234,50`, `1.234,50`, `1 234,50 €` (many European exports, usually
    /// with `;` as the delimiter).
    #[serde(alias = ",")]
    Comma,
}

impl std::str::FromStr for DecimalMark {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "point" | "." => Ok(Self::Point),
            "comma" | "," => Ok(Self::Comma),
            other => Err(format!(
                "decimal mark must be point or comma, not `{other}`"
            )),
        }
    }
}

/// Currency symbols a money cell may carry before or after its number.
const CURRENCY_SYMBOLS: &[char] = &[
    '$', '€', '£', '¥', '₹', '₩', '₽', '₺', '₪', '₫', '฿', '₴', '₦', '₱', '¢', '₡', '₲', '₵', '₸',
];

impl DecimalMark {
    /// The default mark (serde leaves it out).
    pub fn is_point(&self) -> bool {
        *self == DecimalMark::Point
    }

    /// `point` or `comma`, as settings write it.
    pub fn name(self) -> &'static str {
        match self {
            DecimalMark::Point => "point",
            DecimalMark::Comma => "comma",
        }
    }

    /// Whether `raw` reads as two different numbers, one with each mark:
    /// `1.890` is 1.89 with a decimal point and 1890 with a decimal comma
    /// (its dot grouping thousands), `1,250` the other way round. A column
    /// of such cells does not say which mark its export uses.
    pub fn ambiguous(raw: &str) -> bool {
        // A cell without either mark reads alike (most cells: no parse).
        if !raw.contains(['.', ',']) {
            return false;
        }
        match (Self::Point.parse(raw), Self::Comma.parse(raw)) {
            (Some(a), Some(b)) => a.is_finite() && b.is_finite() && a != b,
            _ => false,
        }
    }

    /// The number a cell of the export holds, or `None` when it holds none.
    ///
    /// Beyond what Rust's float parser takes (`12.5`, `-3`, `1e3`), it
    /// reads the way spreadsheets and shops write money: one currency
    /// symbol before or after the number (`$12.50`, `-$12.50`, `12,50 €`),
    /// and digit groups of three separated by the other mark, a space or an
    /// apostrophe (`1,234.50`; with [`DecimalMark::Comma`] `1.234,50`). A
    /// group that is not three digits (`1,5` with a decimal point), or a
    /// grouped number that starts with a zero (`0,500`, which no shop writes
    /// for five hundred but a kilogram export does for half a kilo), is not
    /// a number: that cell is a mistake to report, not a value to guess.
    pub fn parse(self, raw: &str) -> Option<f32> {
        let s = raw.trim();
        if self == DecimalMark::Point
            && let Ok(v) = s.parse::<f32>()
        {
            return Some(v);
        }
        let (negative, s) = match s.strip_prefix('-') {
            Some(rest) => (true, rest.trim_start()),
            None => (false, s),
        };
        let s = s
            .trim_start_matches(CURRENCY_SYMBOLS)
            .trim_end_matches(CURRENCY_SYMBOLS)
            .trim();
        let (negative, s) = match s.strip_prefix('-') {
            Some(rest) if !negative => (true, rest),
            Some(_) => return None,
            None => (negative, s),
        };
        let (mark, group) = match self {
            DecimalMark::Point => ('.', ','),
            DecimalMark::Comma => (',', '.'),
        };
        let (int, frac) = match s.split_once(mark) {
            Some((i, f)) => (i, Some(f)),
            None => (s, None),
        };
        let is_group =
            |c: char| c == group || c == ' ' || c == '\u{a0}' || c == '\u{202f}' || c == '\'';
        let mut digits = String::with_capacity(s.len() + 1);
        for (i, g) in int.split(is_group).enumerate() {
            let ok = if i == 0 {
                if int.contains(is_group) {
                    (1..=3).contains(&g.len()) && !g.starts_with('0')
                } else {
                    !g.is_empty()
                }
            } else {
                g.len() == 3
            };
            if !ok || !g.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            digits.push_str(g);
        }
        if let Some(f) = frac {
            if f.is_empty() || !f.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            digits.push('.');
            digits.push_str(f);
        }
        let v: f32 = digits.parse().ok()?;
        Some(if negative { -v } else { v })
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's
/// `days_from_civil`), or `None` if the date does not exist.
pub fn days_from_civil(y: i64, m: u32, d: u32) -> Option<i64> {
    if !(1..=12).contains(&m) || d == 0 {
        return None;
    }
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let month_len = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if d > month_len[(m - 1) as usize] {
        return None;
    }
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (i64::from(m) + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    Some(era * 146_097 + doe - 719_468)
}

/// Parses `n` ASCII digits at the start of `s`.
fn digits(s: &str, n: usize) -> Option<u32> {
    let part = s.get(..n)?;
    if part.bytes().all(|b| b.is_ascii_digit()) {
        part.parse().ok()
    } else {
        None
    }
}

fn parse_yyyymmdd(s: &str) -> Option<i64> {
    if s.len() != 8 {
        return None;
    }
    let days = days_from_civil(
        i64::from(digits(s, 4)?),
        digits(&s[4..], 2)?,
        digits(&s[6..], 2)?,
    )?;
    Some(days * SECONDS_PER_DAY)
}

fn parse_unix(s: &str) -> Option<i64> {
    let body = s.strip_prefix('-').unwrap_or(s);
    if body.is_empty() || !body.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Unix seconds with a fraction (`1483285772.250`, as some exports and
/// pandas write them), floored to the second; whole seconds too.
fn parse_unix_fraction(s: &str) -> Option<i64> {
    let (whole, frac) = s.split_once('.').unwrap_or((s, ""));
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let secs = parse_unix(whole)?;
    // `-5.5` is 5.5 s before 1970: floored, that is −6.
    let fractional = frac.bytes().any(|b| b != b'0');
    if whole.starts_with('-') && fractional {
        secs.checked_sub(1)
    } else {
        Some(secs)
    }
}

/// 10¹² unix seconds, the year 33658: read as seconds, a 13-digit time is
/// milliseconds (every date since 2001 is 13 digits of them), never an
/// order. No other format reads a date that late (years stop at 9999).
const MS_AS_SECONDS: i64 = 1_000_000_000_000;

/// Unix milliseconds, floored to the second.
fn parse_unix_ms(s: &str) -> Option<i64> {
    parse_unix(s).map(|ms| ms.div_euclid(1000))
}

fn parse_iso(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if s.len() < 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let days = days_from_civil(
        i64::from(digits(s, 4)?),
        digits(&s[5..], 2)?,
        digits(&s[8..], 2)?,
    )?;
    let mut secs = days * SECONDS_PER_DAY;
    let rest = &s[10..];
    if rest.is_empty() {
        return Some(secs);
    }
    let rest = rest.strip_prefix('T').or_else(|| rest.strip_prefix(' '))?;
    let (h, mi) = (digits(rest, 2)?, digits(rest.get(3..)?, 2)?);
    if rest.as_bytes().get(2) != Some(&b':') || h > 23 || mi > 59 {
        return None;
    }
    let mut rest = &rest[5..];
    let mut sec = 0;
    if let Some(r) = rest.strip_prefix(':') {
        sec = digits(r, 2)?;
        if sec > 60 {
            return None;
        }
        rest = &r[2..];
        if let Some(frac) = rest.strip_prefix('.') {
            let n = frac.bytes().take_while(u8::is_ascii_digit).count();
            if n == 0 {
                return None;
            }
            rest = &frac[n..];
        }
    }
    secs += i64::from(h) * 3600 + i64::from(mi) * 60 + i64::from(sec);
    // Shopify and Rails write the offset after a space:
    // `2017-01-01 17:58:42 -0500`, and some exports ` UTC`.
    let rest = match rest.strip_prefix(' ') {
        Some("UTC") => "Z",
        Some(off) if off.starts_with(['+', '-']) => off,
        Some(_) => return None,
        None => rest,
    };
    match rest {
        "" | "Z" => Some(secs),
        _ => {
            let sign = match rest.as_bytes()[0] {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let off = &rest[1..];
            let (oh, om) = match off.len() {
                5 if off.as_bytes()[2] == b':' => (digits(off, 2)?, digits(&off[3..], 2)?),
                4 => (digits(off, 2)?, digits(&off[2..], 2)?),
                2 => (digits(off, 2)?, 0),
                _ => return None,
            };
            // Real offsets run from −12:00 to +14:00 (`+99:99` was read).
            if oh > 14 || om > 59 {
                return None;
            }
            // Local time minus its offset is UTC.
            Some(secs - sign * (i64::from(oh) * 3600 + i64::from(om) * 60))
        }
    }
}

/// Serial day of 1970-01-01 in the 1900 date system (epoch 1899-12-30).
const SERIAL_DAY_OF_1970: f64 = 25_569.0;

/// Last serial day the 1900 date system has (9999-12-31).
const LAST_SERIAL_DAY: f64 = 2_958_465.0;

/// Unix seconds of a spreadsheet serial day (`42736`, `42736.5`), to the
/// nearest second.
fn parse_serial_day(s: &str) -> Option<i64> {
    let (whole, frac) = s.split_once('.').unwrap_or((s, ""));
    if whole.is_empty() || !(whole.bytes().chain(frac.bytes())).all(|b| b.is_ascii_digit()) {
        return None;
    }
    let days: f64 = s.parse().ok()?;
    if !(1.0..LAST_SERIAL_DAY + 1.0).contains(&days) {
        return None;
    }
    Some(((days - SERIAL_DAY_OF_1970) * SECONDS_PER_DAY as f64).round() as i64)
}

/// UTC calendar time of unix seconds, for messages.
fn show_utc(secs: i64) -> String {
    chrono::DateTime::from_timestamp(secs, 0).map_or_else(
        || format!("{secs} s"),
        |t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
    )
}

/// Auto's refusal of a number that reads best as a serial day: a 1–7 digit
/// integer (unix seconds of early 1970) or a decimal in the serial range.
fn ambiguous_serial_day(raw: &str) -> Option<String> {
    let serial = parse_serial_day(raw)?;
    let (as_unix, or_unix) = match raw.contains('.') {
        true => ("is not unix seconds (which are whole)".to_string(), ""),
        false => (
            format!("as unix seconds is {}", show_utc(parse_unix(raw)?)),
            ", or `unix_seconds` if these really are seconds since 1970",
        ),
    };
    Some(format!(
        "`{raw}` {as_unix}; as a spreadsheet's serial day it is {}. Give the timestamp \
         format `spreadsheet_days` (`--timestamp-format spreadsheet_days` on the command line, \
         or `timestamp_format = \"spreadsheet_days\"` in the mapping: `[data.orders]` in \
         merchant.toml){or_unix}",
        show_utc(serial)
    ))
}

/// Unix seconds of `raw` read with the strftime pattern `p`.
fn parse_pattern(raw: &str, p: &str) -> Result<i64, String> {
    use chrono::format::{Parsed, StrftimeItems, parse};
    let mut parsed = Parsed::new();
    parse(&mut parsed, raw, StrftimeItems::new(p)).map_err(|e| {
        // Day and month the other way round, the usual mistake: a date
        // past the 12th fails, and the others are misread silently.
        let swapped = p
            .replace("%d", "\u{0}")
            .replace("%m", "%d")
            .replace('\u{0}', "%m");
        let other = (p.contains("%d") && p.contains("%m"))
            .then(|| {
                let mut again = Parsed::new();
                parse(&mut again, raw, StrftimeItems::new(&swapped)).ok()
            })
            .flatten()
            .map(|()| {
                format!(
                    "; it reads with `{swapped}`: are days and months the other way round? (then \
                     every date up to the 12th was read wrong too)"
                )
            })
            .unwrap_or_default();
        format!("`{raw}` does not match the timestamp format `{p}` ({e}){other}")
    })?;
    // `%Y` takes `17` as the year 17: an export that writes two-digit
    // years wants `%y` (1969–2068).
    if p.contains("%Y")
        && let Some(year) = parsed.year().filter(|y| (0..100).contains(y))
    {
        return Err(format!(
            "`{raw}` read with the timestamp format `{p}` is in the year {year}: for two-digit \
             years write `%y` instead of `%Y`"
        ));
    }
    // As every other format: years end at 9999 (chrono reads `+12345`).
    if let Some(year) = parsed.year().filter(|y| !(-9999..=9999).contains(y)) {
        return Err(format!(
            "`{raw}` read with the timestamp format `{p}` is in the year {year}, past 9999"
        ));
    }
    let secs = if parsed.offset().is_some() {
        parsed.to_datetime().map(|t| t.timestamp())
    } else {
        parsed
            .to_naive_datetime_with_offset(0)
            .map(|t| t.and_utc().timestamp())
            .or_else(|_| {
                parsed
                    .to_naive_date()
                    .map(|d| d.and_time(chrono::NaiveTime::MIN).and_utc().timestamp())
            })
    };
    secs.map_err(|e| format!("`{raw}` read with the timestamp format `{p}` is not a date ({e})"))
}

impl TimestampFormat {
    /// Unix seconds of a date typed as a setting (a churn cutoff), read as
    /// [`TimestampFormat::Auto`] reads a cell. A setting takes no timestamp
    /// format, so a refusal says how to write the date instead, and a
    /// number that reads as a spreadsheet's serial day gives that day.
    pub fn parse_setting(raw: &str) -> Result<i64, String> {
        // Once `Auto` has refused it, a number in the serial range is one
        // it refused as ambiguous (8 digits read as YYYYMMDD, longer ones
        // as unix seconds, both outside that range).
        TimestampFormat::Auto
            .parse(raw)
            .map_err(|_| match parse_serial_day(raw) {
                Some(secs) => format!(
                    "`{raw}` is not a date; as a spreadsheet's serial day it is {}: write that \
                     day as YYYY-MM-DD",
                    show_utc(secs)
                ),
                None => format!(
                    "`{raw}` is not a date: write it as YYYY-MM-DD (an ISO-8601 date-time, \
                     YYYYMMDD or unix seconds also read)"
                ),
            })
    }

    /// Unix seconds of `raw`, or a message saying what was expected.
    pub fn parse(&self, raw: &str) -> Result<i64, String> {
        if raw.is_empty() {
            return Err("empty, not a date".into());
        }
        let (parsed, expected) = match self {
            TimestampFormat::Pattern(p) => return parse_pattern(raw, p),
            TimestampFormat::UnixSeconds => match parse_unix_fraction(raw) {
                Some(secs) if secs >= MS_AS_SECONDS => {
                    return Err(format!(
                        "`{raw}` as unix seconds is {}, tens of thousands of years ahead: if \
                         the column counts milliseconds, give the timestamp format `unix_ms`",
                        show_utc(secs)
                    ));
                }
                parsed => (parsed, "unix seconds"),
            },
            TimestampFormat::UnixMillis => (parse_unix_ms(raw), "unix milliseconds"),
            TimestampFormat::Iso8601 => (parse_iso(raw), "an ISO-8601 date or date-time"),
            TimestampFormat::Yyyymmdd => (parse_yyyymmdd(raw), "a YYYYMMDD date"),
            TimestampFormat::SpreadsheetDays => (
                parse_serial_day(raw),
                "a spreadsheet serial day (days since 1899-12-30, from 1 to 2958465)",
            ),
            TimestampFormat::Auto => {
                let parsed = if raw.contains('-') && raw.len() >= 10 {
                    parse_iso(raw)
                } else if raw.len() == 8 {
                    parse_yyyymmdd(raw)
                } else if raw.len() <= 7 || raw.contains('.') {
                    if let Some(m) = ambiguous_serial_day(raw) {
                        return Err(m);
                    }
                    // Seconds with a fraction: nine or more whole digits
                    // (from 1973 on), beyond any serial day.
                    match raw.split_once('.') {
                        Some((whole, _)) if whole.trim_start_matches('-').len() >= 9 => {
                            parse_unix_fraction(raw)
                        }
                        _ => parse_unix(raw).filter(|_| raw.starts_with('-')),
                    }
                } else if matches!(raw.strip_prefix('-').unwrap_or(raw).len(), 12 | 13) {
                    parse_unix_ms(raw)
                } else if raw.len() > 13 && parse_unix(raw).is_some() {
                    return Err(format!(
                        "`{raw}` is not unix seconds or milliseconds (as seconds it is past the \
                         year 5000, as milliseconds past 2286): if it counts micro- or \
                         nanoseconds, convert the column to seconds or ISO-8601 dates"
                    ));
                } else {
                    parse_unix(raw)
                };
                if parsed.is_none()
                    && let Some(hint) = layout_hint(raw)
                {
                    return Err(format!(
                        "`{raw}` is not unix seconds, an ISO-8601 date or YYYYMMDD: \
                         give its layout as a timestamp format (`--timestamp-format` on the \
                         command line, or `timestamp_format` in the mapping: `[data.orders]` \
                         in merchant.toml), {hint}"
                    ));
                }
                (
                    parsed,
                    "unix seconds, an ISO-8601 date or YYYYMMDD (another layout needs \
                     a strftime timestamp format, e.g. `%m/%d/%Y %H:%M`)",
                )
            }
        };
        parsed.ok_or_else(|| format!("`{raw}` is not {expected}"))
    }
}

/// The strftime layouts a date such as `31/01/2017 11:53` or `1.2.2017`
/// (day, month and a four-digit year, either order of the first two,
/// then optionally hours and minutes, with seconds) reads with, as a
/// hint: `` `%d/%m/%Y %H:%M` `` when the first number cannot be a month,
/// the month-first layout when the second cannot, both otherwise. `None`
/// for any other shape, or when the layout would not read `raw` after all.
fn layout_hint(raw: &str) -> Option<String> {
    // The date, then the character before the clock (a space or `T`) and the clock.
    let (date, time) = match raw.find([' ', 'T']) {
        Some(i) => (&raw[..i], Some((&raw[i..=i], &raw[i + 1..]))),
        None => (raw, None),
    };
    let sep = ['/', '.', '-'].into_iter().find(|&c| date.contains(c))?;
    let parts: Vec<&str> = date.split(sep).collect();
    let number = |s: &str| -> Option<u32> {
        (!s.is_empty() && s.len() <= 4 && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    let [a, b, y] = parts[..] else {
        return None;
    };
    let (a, b) = (number(a)?, number(b)?);
    if y.len() != 4 || number(y).is_none() || a == 0 || b == 0 || a > 31 || b > 31 {
        return None;
    }
    let clock = match time {
        None => String::new(),
        Some((at, t)) => match t.split(':').count() {
            2 => format!("{at}%H:%M"),
            3 => format!("{at}%H:%M:%S"),
            _ => return None,
        },
    };
    let day_first = format!("%d{sep}%m{sep}%Y{clock}");
    let month_first = format!("%m{sep}%d{sep}%Y{clock}");
    let reads = |p: &str| parse_pattern(raw, p).is_ok();
    match (a > 12, b > 12) {
        (true, false) if reads(&day_first) => Some(format!("`{day_first}`")),
        (false, true) if reads(&month_first) => Some(format!("`{month_first}`")),
        (false, false) if reads(&day_first) && reads(&month_first) => Some(format!(
            "`{day_first}` (day first) or `{month_first}` (month first)"
        )),
        _ => None,
    }
}
