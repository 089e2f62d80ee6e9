//! `--out` files that are written whole or not at all.
//!
//! `score`, `segments` and `rules` write a file a merchant's other tools
//! read (yesterday's churn scores, say). Writing it in place would leave it
//! empty or cut short whenever the command fails after opening it — an
//! unreadable customer table, a missing model, a full disk. [`Output`]
//! writes beside the final name and renames over it only once everything
//! was written, so a failed command leaves the previous file as it was.

use std::io::Write;
use std::path::{Path, PathBuf};

/// Where a command's rows go: standard output (`-`), or a file staged
/// beside its final name until [`Output::commit`].
pub struct Output {
    writer: Box<dyn Write>,
    /// `(staging file, final path)` for a file output; removed on drop
    /// unless committed.
    staged: Option<(PathBuf, PathBuf)>,
}

impl Output {
    /// Opens `path` (`-` is standard output). A file's rows go to a hidden
    /// staging file in the same directory (so the final rename never
    /// crosses file systems).
    pub fn create(path: &Path) -> std::io::Result<Self> {
        if path == Path::new("-") {
            return Ok(Self {
                writer: Box::new(std::io::stdout().lock()),
                staged: None,
            });
        }
        // Something other than a regular file (`/dev/null`, a FIFO another
        // tool reads) is written in place: renaming the staged file over it
        // replaced the device with a regular file (run as root, `--out
        // /dev/null` broke /dev/null for the whole machine).
        if std::fs::metadata(path).is_ok_and(|m| !m.is_file()) {
            return Ok(Self {
                writer: Box::new(std::io::BufWriter::new(std::fs::File::create(path)?)),
                staged: None,
            });
        }
        // A symbolic link keeps pointing where it did: the file it names is
        // staged beside and replaced, not the link.
        let target;
        let path = if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
            target = std::fs::canonicalize(path)?;
            target.as_path()
        } else {
            path
        };
        let name = path.file_name().ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file name")
        })?;
        // A file the merchant made read-only is not replaced (as root the
        // rename would go through), and a replaced file keeps its mode: the
        // staged one is created with the default, which turned a private
        // (0600) scores file world-readable.
        let previous = std::fs::metadata(path).ok();
        if let Some(m) = &previous
            && m.permissions().readonly()
        {
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!(
                    "{} is read-only: make it writable, or write elsewhere",
                    path.display()
                ),
            ));
        }
        let mut staging = std::ffi::OsString::from(".");
        staging.push(name);
        staging.push(format!(".{}.partial", std::process::id()));
        let tmp = path.with_file_name(staging);
        let file = std::fs::File::create(&tmp)?;
        if let Some(m) = previous {
            file.set_permissions(m.permissions())?;
        }
        Ok(Self {
            writer: Box::new(std::io::BufWriter::new(file)),
            staged: Some((tmp, path.to_owned())),
        })
    }

    /// Flushes the rows and, for a file, puts it in place of any previous
    /// one.
    pub fn commit(mut self) -> std::io::Result<()> {
        self.writer.flush()?;
        if let Some((tmp, path)) = self.staged.take() {
            // Closes the staging file before it is renamed.
            self.writer = Box::new(std::io::sink());
            if let Err(e) = std::fs::rename(&tmp, &path) {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        }
        Ok(())
    }
}

impl Write for Output {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.writer.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.writer.flush()
    }
}

impl Drop for Output {
    fn drop(&mut self) {
        if let Some((tmp, _)) = self.staged.take() {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

/// `text` as one cell of a tab-separated line: a tab, line break or
/// backslash in it is written `\t`, `\n`, `\r`, `\\` (the text format of
/// PostgreSQL's `COPY`), so an item id holding a line break no longer
/// splits one recommendation over two lines of `recommend`'s output.
pub fn tsv_cell(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.contains(['\t', '\n', '\r', '\\']) {
        return text.into();
    }
    let mut out = String::with_capacity(text.len() + 4);
    for c in text.chars() {
        match c {
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_only_file_is_refused_and_a_replaced_file_keeps_its_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("scores.csv");
        std::fs::write(&path, "yesterday\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o444)).unwrap();
        let e = Output::create(&path).err().expect("read-only refused");
        assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied);
        assert!(e.to_string().contains("scores.csv is read-only"), "{e}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "yesterday\n");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let mut out = Output::create(&path).unwrap();
        out.write_all(b"today\n").unwrap();
        out.commit().unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "today\n");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn a_failed_write_leaves_the_previous_file_and_no_staging_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("scores.csv");
        std::fs::write(&path, "yesterday\n").unwrap();
        {
            let mut out = Output::create(&path).unwrap();
            out.write_all(b"half of tod").unwrap();
            // Dropped without commit: the command failed.
        }
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "yesterday\n");
        let mut out = Output::create(&path).unwrap();
        out.write_all(b"today\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "yesterday\n");
        out.commit().unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "today\n");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["scores.csv"]);
    }

    /// `--out /dev/null` (a device) or a FIFO is written in place: the
    /// staged file was renamed over it, and as root `/dev/null` became a
    /// regular file. A FIFO stands in for the device here (no root needed);
    /// a symbolic link keeps its target's place.
    #[cfg(unix)]
    #[test]
    fn a_device_or_fifo_is_written_in_place_and_a_link_keeps_pointing() {
        use std::os::unix::fs::FileTypeExt;
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("pipe");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        let reader = {
            let fifo = fifo.clone();
            std::thread::spawn(move || std::fs::read_to_string(fifo).unwrap())
        };
        let mut out = Output::create(&fifo).unwrap();
        out.write_all(b"rows\n").unwrap();
        out.commit().unwrap();
        assert_eq!(reader.join().unwrap(), "rows\n");
        assert!(
            std::fs::symlink_metadata(&fifo)
                .unwrap()
                .file_type()
                .is_fifo()
        );
        // /dev/null itself, where it is writable: still a device after.
        if let Ok(mut out) = Output::create(Path::new("/dev/null")) {
            out.write_all(b"x").unwrap();
            out.commit().unwrap();
            assert!(
                std::fs::metadata("/dev/null")
                    .unwrap()
                    .file_type()
                    .is_char_device()
            );
        }
        let real = dir.path().join("scores.csv");
        std::fs::write(&real, "old\n").unwrap();
        let link = dir.path().join("latest.csv");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let mut out = Output::create(&link).unwrap();
        out.write_all(b"new\n").unwrap();
        out.commit().unwrap();
        assert!(
            std::fs::symlink_metadata(&link)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(std::fs::read_to_string(&real).unwrap(), "new\n");
    }

    #[test]
    fn a_directory_that_does_not_exist_is_an_error_at_creation() {
        let dir = tempfile::tempdir().unwrap();
        assert!(Output::create(&dir.path().join("none/scores.csv")).is_err());
    }

    #[test]
    fn tsv_cells_escape_tabs_line_breaks_and_backslashes() {
        assert_eq!(tsv_cell("plain id"), "plain id");
        assert_eq!(
            tsv_cell("Poster\n\"Wave\"\tA\\B\r"),
            "Poster\\n\"Wave\"\\tA\\\\B\\r"
        );
    }
}
