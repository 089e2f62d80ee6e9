//! CSV records numbered by the lines an editor shows.
//!
//! Every reader of a merchant's file names the line of a bad cell, and the
//! csv crate's own numbering is wrong in two common cases: every record of
//! a CRLF file is one line short (BurntSushi/rust-csv#395; MovieLens and
//! anything saved on Windows end lines so), and the first record after
//! empty lines gets the first empty line's number (#208). [`line_records`]
//! reads records ending at `\n` (so the crate counts CRLF lines right),
//! drops the `\r` that leaves on each record and the records of blank CRLF
//! lines, and notes which lines are empty to move a number past them. A
//! file whose lines end in a lone `\r` (old Mac spreadsheets) has no `\n`
//! in its first block; it is read with the crate's CR terminator and its
//! records are numbered by count.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::rc::Rc;

/// A record and its 1-based line, or a record that could not be read and
/// its line.
pub type Numbered = Result<(u64, csv::StringRecord), (u64, csv::Error)>;

/// The records of a CSV file, the header first, blank lines left out; see
/// the module documentation.
pub struct LineRecords<R> {
    rdr: csv::Reader<BlankLines<BufReader<R>>>,
    blanks: Rc<RefCell<VecDeque<u64>>>,
    cr_only: bool,
}

/// What to do about text that is not UTF-8: the advice of [`message`].
pub const NOT_UTF8: &str = "save the file as UTF-8 (Excel: \"CSV UTF-8\"); a Latin-1 or \
     Windows-1252 export converts with `iconv -f WINDOWS-1252 -t UTF-8`";

/// A record's error as a merchant reads it: the csv crate's own text,
/// except for text that is not UTF-8, which names the field and the fix
/// instead of the crate's byte offsets.
pub fn message(e: &csv::Error) -> String {
    match e.kind() {
        csv::ErrorKind::Utf8 { err, .. } => {
            format!("field {} is not UTF-8 text: {NOT_UTF8}", err.field() + 1)
        }
        _ => e.to_string(),
    }
}

/// Why a file starting with `head` cannot be read: UTF-16 (Excel's
/// "Unicode text", which starts with its byte order mark), with the fix.
pub fn utf16_refusal(head: &[u8]) -> Option<String> {
    (head.starts_with(&[0xFF, 0xFE]) || head.starts_with(&[0xFE, 0xFF])).then(|| {
        format!("the file is UTF-16 text (Excel's \"Unicode text\"), not UTF-8: {NOT_UTF8}")
    })
}

/// Records of `reader` separated by `delimiter`. Records may differ in
/// length (callers compare with the header and say so with the line).
/// A UTF-16 file (Excel's "Unicode text") is refused with the fix.
pub fn line_records<R: Read>(reader: R, delimiter: u8) -> std::io::Result<LineRecords<R>> {
    let mut reader = BufReader::with_capacity(1 << 16, reader);
    let head = reader.fill_buf()?;
    if let Some(message) = utf16_refusal(head) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            message,
        ));
    }
    let cr_only = head.contains(&b'\r') && !head.contains(&b'\n');
    let blanks = Rc::new(RefCell::new(VecDeque::new()));
    let reader = BlankLines {
        inner: reader,
        line: 1,
        at_line_start: true,
        blanks: Rc::clone(&blanks),
    };
    let rdr = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .delimiter(delimiter)
        .terminator(if cr_only {
            csv::Terminator::CRLF
        } else {
            csv::Terminator::Any(b'\n')
        })
        .from_reader(reader);
    Ok(LineRecords {
        rdr,
        blanks,
        cr_only,
    })
}

impl<R> LineRecords<R> {
    /// The editor's line of a record the csv crate placed at `pos`.
    fn line(&self, pos: Option<&csv::Position>) -> u64 {
        if self.cr_only {
            return pos.map_or(0, |p| p.record() + 1);
        }
        let mut line = pos.map_or(0, csv::Position::line);
        let mut blanks = self.blanks.borrow_mut();
        while blanks.front().is_some_and(|&l| l < line) {
            blanks.pop_front();
        }
        while blanks.front() == Some(&line) {
            blanks.pop_front();
            line += 1;
        }
        line
    }
}

impl<R: Read> Iterator for LineRecords<R> {
    type Item = Numbered;

    fn next(&mut self) -> Option<Numbered> {
        loop {
            let mut record = csv::StringRecord::new();
            match self.rdr.read_record(&mut record) {
                Ok(true) => {}
                Ok(false) => return None,
                Err(e) => return Some(Err((self.line(e.position()), e))),
            }
            let n = record.len();
            // A blank CRLF line is a record of one `\r`: not a row.
            if n == 0 || n == 1 && record[0].trim().is_empty() {
                continue;
            }
            let line = self.line(record.position());
            if let Some(last) = record[n - 1].strip_suffix('\r') {
                let last = last.to_string();
                record.truncate(n - 1);
                record.push_field(&last);
            }
            return Some(Ok((line, record)));
        }
    }
}

/// A reader that notes the numbers of the empty lines (`\n` right after
/// `\n`, or first in the file) that pass through it. The csv reader reads
/// ahead by one buffer, so the queue holds at most the empty lines of one
/// buffer beyond the record being numbered.
struct BlankLines<R> {
    inner: R,
    /// The line of the next byte.
    line: u64,
    at_line_start: bool,
    blanks: Rc<RefCell<VecDeque<u64>>>,
}

impl<R: Read> Read for BlankLines<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        for &b in &buf[..n] {
            if b == b'\n' {
                if self.at_line_start {
                    self.blanks.borrow_mut().push_back(self.line);
                }
                self.line += 1;
                self.at_line_start = true;
            } else {
                self.at_line_start = false;
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &str) -> Vec<(u64, Vec<String>)> {
        line_records(text.as_bytes(), b',')
            .unwrap()
            .map(|r| {
                let (line, rec) = r.unwrap();
                (line, rec.iter().map(str::to_string).collect())
            })
            .collect()
    }

    fn fields(f: &[&str]) -> Vec<String> {
        f.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn lines_are_the_editors_with_any_line_end_and_blank_lines() {
        let rows = ["a,b", "1,2", "", "\"x\ny\",3", "4,5", "", "", "6,7"];
        let want = vec![
            (1, fields(&["a", "b"])),
            (2, fields(&["1", "2"])),
            (4, fields(&["x\ny", "3"])),
            (6, fields(&["4", "5"])),
            (9, fields(&["6", "7"])),
        ];
        for end in ["\n", "\r\n"] {
            assert_eq!(lines(&(rows.join(end) + end)), want, "{end:?}");
            // No line end after the last record.
            assert_eq!(lines(&rows.join(end)), want, "{end:?}");
        }
        // Lone CRs: numbered by count.
        let want = vec![
            (1, fields(&["a", "b"])),
            (2, fields(&["1", "2"])),
            (3, fields(&["3", "4"])),
        ];
        assert_eq!(lines("a,b\r1,2\r3,4\r"), want);
    }

    #[test]
    fn a_bad_record_carries_its_line() {
        let text = b"a,b\r\n1,2\r\n3,\xff\r\n";
        let mut it = line_records(&text[..], b',').unwrap();
        assert_eq!(it.next().unwrap().unwrap().0, 1);
        assert_eq!(it.next().unwrap().unwrap().0, 2);
        let (line, e) = it.next().unwrap().unwrap_err();
        assert_eq!(line, 3, "{e}");
    }
}
