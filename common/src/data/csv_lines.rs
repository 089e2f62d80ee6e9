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
use std::path::Path;
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

/// Why a file starting with `head` cannot be read as text, with the fix:
/// UTF-16 (Excel's "Unicode text", which starts with its byte order mark),
/// a compressed file or archive (gzip, zip, bzip2, xz, zstd), or a
/// spreadsheet workbook. Every reader of a merchant's file checks it
/// before reading records: otherwise a `.csv.gz` read as "field 1 is not
/// UTF-8 text" with advice to convert its encoding. `file` names the file in
/// the command that fixes it.
pub fn unreadable(head: &[u8], file: &Path) -> Option<String> {
    if head.starts_with(&[0xFF, 0xFE]) || head.starts_with(&[0xFE, 0xFF]) {
        return Some(format!(
            "the file is UTF-16 text (Excel's \"Unicode text\"), not UTF-8: {NOT_UTF8}"
        ));
    }
    let save_as_csv = "save the sheet as CSV (Excel: File > Save As > \"CSV UTF-8\") and give \
                       that file";
    if head.starts_with(&[0xD0, 0xCF, 0x11, 0xE0, 0xA1, 0xB1, 0x1A, 0xE1]) {
        return Some(format!(
            "the file is an Excel 97-2003 workbook (.xls), not CSV text: {save_as_csv}"
        ));
    }
    if head.starts_with(b"PK\x03\x04") {
        // The first member's name (local file header: its length at byte
        // 26, the name from byte 30) tells a workbook from an archive.
        let first = head.get(26..28).and_then(|n| {
            let len = usize::from(u16::from_le_bytes([n[0], n[1]]));
            std::str::from_utf8(head.get(30..30 + len)?).ok()
        });
        let workbook = |name: &str| {
            [
                "[Content_Types].xml",
                "_rels/",
                "docProps/",
                "xl/",
                "mimetype",
            ]
            .iter()
            .any(|p| name.starts_with(p))
        };
        return Some(match first {
            Some(name) if workbook(name) => format!(
                "the file is a spreadsheet workbook (.xlsx or .ods), not CSV text: {save_as_csv}"
            ),
            Some(name) if !name.is_empty() => format!(
                "the file is a zip archive, not CSV text: extract it first (`unzip {}`, which \
                 writes `{name}` first) and give the CSV it holds",
                shell_word(file)
            ),
            _ => format!(
                "the file is a zip archive, not CSV text: extract it first (`unzip {}`) and give \
                 the CSV it holds",
                shell_word(file)
            ),
        });
    }
    let (kind, tool, suffixes): (_, _, &[&str]) = if head.starts_with(&[0x1F, 0x8B]) {
        ("gzip", "gzip", &[".gz", ".gzip"])
    } else if head.len() >= 4 && head.starts_with(b"BZh") && head[3].is_ascii_digit() {
        ("bzip2", "bzip2", &[".bz2", ".bzip2"])
    } else if head.starts_with(&[0xFD, b'7', b'z', b'X', b'Z', 0x00]) {
        ("xz", "xz", &[".xz"])
    } else if head.starts_with(&[0x28, 0xB5, 0x2F, 0xFD]) {
        ("zstd", "zstd", &[".zst", ".zstd"])
    } else {
        return None;
    };
    // With its suffix, the tool's own `-dk` keeps the compressed file and
    // will not overwrite a file of the decompressed name (`orders.csv.gz`
    // → `orders.csv`); without one, it writes to a new name.
    let name = file
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let stem = suffixes.iter().find_map(|s| {
        let cut = name.len().checked_sub(s.len())?;
        (cut > 0 && name.is_char_boundary(cut) && name[cut..].eq_ignore_ascii_case(s))
            .then(|| name[..cut].to_string())
    });
    let command = match stem {
        Some(stem) => format!(
            "`{tool} -dk {}`, which writes `{}`",
            shell_word(file),
            shell_word(&file.with_file_name(stem))
        ),
        None => format!(
            "`{tool} -dc {} > {}`",
            shell_word(file),
            shell_word(&file.with_file_name("decompressed.csv"))
        ),
    };
    Some(format!(
        "the file is {kind}-compressed, not CSV text: decompress it first ({command}) and give \
         the decompressed file"
    ))
}

/// `path` as a shell word: as it is when it holds only characters no
/// shell treats specially, else in single quotes.
fn shell_word(path: &Path) -> String {
    let s = path.display().to_string();
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-/+,:@".contains(&b))
    {
        s
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// Records of `reader` separated by `delimiter`. Records may differ in
/// length (callers compare with the header and say so with the line).
/// A file that is not text ([`unreadable`]: UTF-16, compressed, a
/// workbook) is refused with the fix; `file` names it there.
pub fn line_records<R: Read>(
    reader: R,
    delimiter: u8,
    file: &Path,
) -> std::io::Result<LineRecords<R>> {
    let mut reader = BufReader::with_capacity(1 << 16, reader);
    let head = reader.fill_buf()?;
    if let Some(message) = unreadable(head, file) {
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
        line_records(text.as_bytes(), b',', Path::new("t.csv"))
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

    /// A `.csv.gz` was refused as "field 1 is not UTF-8 text" with advice to
    /// convert its encoding: compressed files, archives and workbooks are
    /// named by their first bytes, with the command that unpacks them.
    #[test]
    fn compressed_files_and_workbooks_are_named_with_the_command_that_opens_them() {
        let gz = [0x1F, 0x8B, 0x08, 0x00, 0x00];
        let e = match line_records(&gz[..], b',', Path::new("exports/base.csv.gz")) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("gzip read as records"),
        };
        assert_eq!(
            e,
            "the file is gzip-compressed, not CSV text: decompress it first (`gzip -dk \
             exports/base.csv.gz`, which writes `exports/base.csv`) and give the decompressed \
             file"
        );
        let refusal = |head: &[u8], file: &str| unreadable(head, Path::new(file)).unwrap();
        // No suffix to drop: the output is never the file itself.
        assert!(
            refusal(&gz, "my orders.csv")
                .contains("(`gzip -dc 'my orders.csv' > decompressed.csv`)")
        );
        for (head, file, command) in [
            (
                &b"BZh91AY&SY"[..],
                "o.csv.bz2",
                "`bzip2 -dk o.csv.bz2`, which writes `o.csv`",
            ),
            (
                &[0xFD, b'7', b'z', b'X', b'Z', 0][..],
                "o.csv.xz",
                "`xz -dk o.csv.xz`",
            ),
            (
                &[0x28, 0xB5, 0x2F, 0xFD, 0][..],
                "o.csv.ZST",
                "`zstd -dk o.csv.ZST`",
            ),
        ] {
            let e = refusal(head, file);
            assert!(
                e.contains("-compressed, not CSV text") && e.contains(command),
                "{e}"
            );
        }
        // A zip names its first member; a workbook (a zip too) says to save
        // the sheet as CSV.
        let zip = |member: &str| {
            let mut head = b"PK\x03\x04".to_vec();
            head.extend([0; 22]);
            head.extend((member.len() as u16).to_le_bytes());
            head.extend([0, 0]);
            head.extend(member.as_bytes());
            head
        };
        assert_eq!(
            refusal(&zip("base.csv"), "base.zip"),
            "the file is a zip archive, not CSV text: extract it first (`unzip base.zip`, which \
             writes `base.csv` first) and give the CSV it holds"
        );
        for member in ["[Content_Types].xml", "mimetype"] {
            let e = refusal(&zip(member), "orders.xlsx");
            assert!(
                e.contains("spreadsheet workbook") && e.contains("CSV UTF-8"),
                "{e}"
            );
        }
        let xls = [0xD0, 0xCF, 0x11, 0xE0, 0xA1, 0xB1, 0x1A, 0xE1];
        assert!(refusal(&xls, "o.xls").contains("Excel 97-2003 workbook"));
        // Text is not refused, whatever it starts with.
        for text in ["customer,item\n", "BZh,x\n", "PK,id\n", ""] {
            assert_eq!(
                unreadable(text.as_bytes(), Path::new("t.csv")),
                None,
                "{text}"
            );
        }
    }

    #[test]
    fn a_bad_record_carries_its_line() {
        let text = b"a,b\r\n1,2\r\n3,\xff\r\n";
        let mut it = line_records(&text[..], b',', Path::new("t.csv")).unwrap();
        assert_eq!(it.next().unwrap().unwrap().0, 1);
        assert_eq!(it.next().unwrap().unwrap().0, 2);
        let (line, e) = it.next().unwrap().unwrap_err();
        assert_eq!(line, 3, "{e}");
    }
}
