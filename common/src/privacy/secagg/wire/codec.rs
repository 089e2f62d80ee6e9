//! The byte-level reader and writer behind every message: little-endian
//! integers, fixed arrays and u32-length-prefixed byte strings, with every
//! read bounds-checked against the remaining input.

use crate::privacy::secagg::SecAggError;

/// Wire format version; bumped on any incompatible change (2: masked inputs
/// carry their modulus and pack ⌈bits/8⌉ bytes per coordinate; 3: a key
/// roster carries its id set as a bitmap and only the keys its recipient
/// uses).
pub(super) const VERSION: u8 = 3;

/// Little-endian writer.
pub(super) struct Writer(pub(super) Vec<u8>);

impl Writer {
    pub(super) fn new(tag: u8) -> Self {
        Writer(vec![tag, VERSION])
    }
    pub(super) fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub(super) fn raw(&mut self, b: &[u8]) {
        self.0.extend_from_slice(b);
    }
    pub(super) fn bytes(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.raw(b);
    }
    pub(super) fn ids(&mut self, ids: &[u32]) {
        self.u32(ids.len() as u32);
        ids.iter().for_each(|&i| self.u32(i));
    }
}

/// Bounds-checked little-endian reader.
pub(super) struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    pub(super) fn new(buf: &'a [u8], tag: u8, what: &'static str) -> Result<Self, SecAggError> {
        let mut r = Reader { buf, what };
        let t = r.take(1)?[0];
        let v = r.take(1)?[0];
        if t != tag {
            return Err(r.err(format!("message tag {t}, expected {tag}")));
        }
        if v != VERSION {
            return Err(r.err(format!("wire version {v}, expected {VERSION}")));
        }
        Ok(r)
    }
    pub(super) fn err(&self, detail: String) -> SecAggError {
        SecAggError::Malformed {
            what: self.what,
            detail,
        }
    }
    pub(super) fn take(&mut self, n: usize) -> Result<&'a [u8], SecAggError> {
        if self.buf.len() < n {
            return Err(self.err(format!(
                "truncated: needed {n} more bytes, {} left",
                self.buf.len()
            )));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    pub(super) fn u8(&mut self) -> Result<u8, SecAggError> {
        Ok(self.take(1)?[0])
    }
    pub(super) fn u32(&mut self) -> Result<u32, SecAggError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    pub(super) fn arr<const N: usize>(&mut self) -> Result<[u8; N], SecAggError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }
    pub(super) fn bytes(&mut self) -> Result<Vec<u8>, SecAggError> {
        let n = self.u32()? as usize;
        Ok(self.take(n)?.to_vec())
    }
    /// A count of items each at least `min_size` bytes long, refused if the
    /// remaining input cannot possibly hold them (no huge pre-allocation).
    pub(super) fn count(&mut self, min_size: usize) -> Result<usize, SecAggError> {
        let n = self.u32()? as usize;
        if n.saturating_mul(min_size) > self.buf.len() {
            return Err(self.err(format!(
                "declares {n} items, only {} bytes left",
                self.buf.len()
            )));
        }
        Ok(n)
    }
    pub(super) fn ids(&mut self) -> Result<Vec<u32>, SecAggError> {
        let n = self.count(4)?;
        (0..n).map(|_| self.u32()).collect()
    }
    pub(super) fn finish<T>(self, value: T) -> Result<T, SecAggError> {
        if !self.buf.is_empty() {
            return Err(self.err(format!("{} trailing bytes", self.buf.len())));
        }
        Ok(value)
    }
}
