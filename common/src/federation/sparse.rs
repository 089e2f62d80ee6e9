//! Row-sparse wire forms of updates and models, for catalogue-sized models.
//!
//! A grouped [`WeightLayout`] (matrix factorisation's per-item rows) splits the
//! model into *rows*: row `g` is group `g` of every grouped segment (item
//! `g`'s bias and its factor vector) and carries per-coordinate weight `g`. A
//! merchant's update is zero outside the rows it touched, and a model changes
//! between two versions only in the rows someone touched, so both travel as a
//! list of row indices plus those rows:
//!
//! - [`encode_update`] / [`decode_update`]: an agent's update (plaintext mode
//!   only: under secure aggregation the masked vector is dense by design,
//!   because the row list itself would reveal which items a merchant sells).
//!   Lossless: the decoded update is bit-identical, so aggregates are too.
//! - [`encode_model`] / [`apply_model`]: the global model as the rows that
//!   differ from the version an agent already holds (all rows when it holds
//!   none), optionally with the factor rows at 16 or 8 bits. With reduced
//!   precision the agent's copy is exactly [`quantized`] of the global model,
//!   whatever versions it skipped, because unchanged rows quantise the same.
//!
//! Uniform segments (μ) always travel whole, in f32. Every decoder checks
//! lengths, index order and finiteness and names what is wrong.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::update::{Update, WeightLayout, first_non_finite};

/// Why a row-sparse payload was refused.
#[derive(Debug, Error, PartialEq)]
pub enum SparseError {
    /// The layout has no grouped segment: there are no rows to list.
    #[error("the model's weight layout has no per-row segments; send it dense")]
    NotRowStructured,
    /// The payload ends before its declared contents.
    #[error("row-sparse payload is truncated: {needed} bytes needed, {got} received")]
    Truncated {
        /// Bytes the header implies.
        needed: usize,
        /// Bytes received.
        got: usize,
    },
    /// Bytes follow the declared contents.
    #[error("row-sparse payload has {extra} bytes after its declared contents")]
    TrailingBytes {
        /// How many.
        extra: usize,
    },
    /// A row index is out of range or not strictly increasing.
    #[error("row index {index} at position {position} is out of order or not below {rows}")]
    BadRow {
        /// Position in the row list.
        position: usize,
        /// The index found.
        index: u32,
        /// Rows in the model.
        rows: usize,
    },
    /// More rows are listed than the model has.
    #[error("row-sparse payload lists {listed} rows, the model has {rows}")]
    TooManyRows {
        /// Rows listed.
        listed: usize,
        /// Rows in the model.
        rows: usize,
    },
    /// A decoded value is NaN or infinite.
    #[error("row-sparse payload value {index} is not finite")]
    NotFinite {
        /// Position in the decoded dense vector.
        index: usize,
    },
    /// A row's coordinate weight is negative, NaN or infinite.
    #[error("row {row} has coordinate weight {value}; it must be finite and >= 0")]
    BadWeight {
        /// The row.
        row: u32,
        /// The weight.
        value: f32,
    },
    /// The precision tag is unknown.
    #[error("unknown row precision tag {0}")]
    BadPrecision(u8),
    /// The agent's cached model does not have the model's length.
    #[error("cached model has {got} values, the model has {expected}")]
    CachedLength {
        /// Model length.
        expected: usize,
        /// Cached length.
        got: usize,
    },
}

/// Precision of factor rows (grouped segments with more than one value per
/// row) in a model download. Biases and uniform segments stay f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RowPrecision {
    /// Exact f32.
    #[default]
    F32,
    /// IEEE half precision (11-bit significand).
    F16,
    /// Signed 8-bit with one f32 scale per row (`max |x| / 127`).
    Int8,
}

impl RowPrecision {
    fn tag(self) -> u8 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Int8 => 2,
        }
    }

    fn from_tag(tag: u8) -> Result<Self, SparseError> {
        match tag {
            0 => Ok(Self::F32),
            1 => Ok(Self::F16),
            2 => Ok(Self::Int8),
            t => Err(SparseError::BadPrecision(t)),
        }
    }

    /// Bytes of one factor row of `len` values.
    fn row_bytes(self, len: usize) -> usize {
        match self {
            Self::F32 => 4 * len,
            Self::F16 => 2 * len,
            Self::Int8 => 4 + len,
        }
    }
}

impl std::str::FromStr for RowPrecision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(Self::F32),
            "f16" => Ok(Self::F16),
            "int8" => Ok(Self::Int8),
            other => Err(format!("unknown precision `{other}`: use f32, f16 or int8")),
        }
    }
}

/// Where one segment's coordinates sit.
struct Seg {
    start: usize,
    len: usize,
    group_len: Option<usize>,
}

fn segments(layout: &WeightLayout) -> Result<(Vec<Seg>, usize), SparseError> {
    let mut out = Vec::with_capacity(layout.segments.len());
    let mut start = 0;
    for s in &layout.segments {
        out.push(Seg {
            start,
            len: s.len,
            group_len: s.group_len,
        });
        start += s.len;
    }
    if !layout.has_rows() {
        return Err(SparseError::NotRowStructured);
    }
    Ok((out, layout.num_coord_weights))
}

/// The rows of `values` (and `coord_weights`) that are not all zero, in
/// increasing order.
pub fn touched_rows(update: &Update, layout: &WeightLayout) -> Result<Vec<u32>, SparseError> {
    let (segs, rows) = segments(layout)?;
    let mut touched = vec![false; rows];
    for (t, w) in touched.iter_mut().zip(&update.coord_weights) {
        *t |= *w != 0.0;
    }
    for s in segs.iter() {
        if let Some(g) = s.group_len {
            for (r, row) in update.values[s.start..s.start + s.len]
                .chunks_exact(g)
                .enumerate()
            {
                touched[r] |= row.iter().any(|v| *v != 0.0);
            }
        }
    }
    Ok(touched
        .iter()
        .enumerate()
        .filter_map(|(r, t)| t.then_some(r as u32))
        .collect())
}

/// Bytes of [`encode_update`]'s output for an update touching `nnz` rows.
pub fn update_len(layout: &WeightLayout, nnz: usize) -> usize {
    let per_row: usize = layout.segments.iter().filter_map(|s| s.group_len).sum();
    let uniform: usize = layout
        .segments
        .iter()
        .filter(|s| s.group_len.is_none())
        .map(|s| s.len)
        .sum();
    4 * (1 + nnz + uniform + nnz * per_row + nnz)
}

/// An update as `[nnz | rows… | uniform values… | each grouped segment's
/// touched rows… | touched rows' weights…]`, little-endian u32 and f32.
/// The update must already match the layout (`Update::validate_shape`).
pub fn encode_update(update: &Update, layout: &WeightLayout) -> Result<Vec<u8>, SparseError> {
    let (segs, _) = segments(layout)?;
    let rows = touched_rows(update, layout)?;
    let mut out = Vec::with_capacity(update_len(layout, rows.len()));
    out.extend_from_slice(&(rows.len() as u32).to_le_bytes());
    for r in &rows {
        out.extend_from_slice(&r.to_le_bytes());
    }
    for s in segs.iter().filter(|s| s.group_len.is_none()) {
        put_f32s(&mut out, &update.values[s.start..s.start + s.len]);
    }
    for s in &segs {
        if let Some(g) = s.group_len {
            for &r in &rows {
                let at = s.start + r as usize * g;
                put_f32s(&mut out, &update.values[at..at + g]);
            }
        }
    }
    for &r in &rows {
        out.extend_from_slice(&update.coord_weights[r as usize].to_le_bytes());
    }
    Ok(out)
}

/// Decodes [`encode_update`]'s output into a dense update of `model_len`
/// values (zeros outside the listed rows), with example weight `weight`.
/// The caller still validates the result like any update.
pub fn decode_update(
    bytes: &[u8],
    model_len: usize,
    layout: &WeightLayout,
    weight: f64,
) -> Result<Update, SparseError> {
    let (segs, num_rows) = segments(layout)?;
    let mut r = Reader::new(bytes);
    let nnz = r.u32()? as usize;
    if nnz > num_rows {
        return Err(SparseError::TooManyRows {
            listed: nnz,
            rows: num_rows,
        });
    }
    r.need(update_len(layout, nnz) - 4)?;
    let rows = r.rows(nnz, num_rows)?;
    let mut values = vec![0.0f32; model_len];
    for s in segs.iter().filter(|s| s.group_len.is_none()) {
        r.f32s_into(&mut values[s.start..s.start + s.len])?;
    }
    for s in &segs {
        if let Some(g) = s.group_len {
            for &row in &rows {
                let at = s.start + row as usize * g;
                r.f32s_into(&mut values[at..at + g])?;
            }
        }
    }
    let mut coord_weights = vec![0.0f32; num_rows];
    for &row in &rows {
        let mut w = [0.0f32];
        r.f32s_into(&mut w)?;
        if !(w[0].is_finite() && w[0] >= 0.0) {
            return Err(SparseError::BadWeight { row, value: w[0] });
        }
        coord_weights[row as usize] = w[0];
    }
    r.finish()?;
    if let Some(index) = first_non_finite(&values) {
        return Err(SparseError::NotFinite { index });
    }
    Ok(Update {
        values,
        coord_weights,
        weight,
    })
}

/// The rows in which `new` differs from `old` (bitwise), or every row when
/// the agent holds no model.
pub fn changed_rows(
    new: &[f32],
    old: Option<&[f32]>,
    layout: &WeightLayout,
) -> Result<Vec<u32>, SparseError> {
    let (segs, rows) = segments(layout)?;
    let Some(old) = old else {
        return Ok((0..rows as u32).collect());
    };
    if old.len() != new.len() {
        return Err(SparseError::CachedLength {
            expected: new.len(),
            got: old.len(),
        });
    }
    let mut changed = vec![false; rows];
    for s in segs.iter() {
        if let Some(g) = s.group_len {
            let (a, b) = (
                &new[s.start..s.start + s.len],
                &old[s.start..s.start + s.len],
            );
            for (r, (x, y)) in a.chunks_exact(g).zip(b.chunks_exact(g)).enumerate() {
                changed[r] |= x.iter().zip(y).any(|(p, q)| p.to_bits() != q.to_bits());
            }
        }
    }
    Ok(changed
        .iter()
        .enumerate()
        .filter_map(|(r, c)| c.then_some(r as u32))
        .collect())
}

/// Bytes of [`encode_model`]'s output listing `nnz` rows.
pub fn model_len_bytes(layout: &WeightLayout, nnz: usize, precision: RowPrecision) -> usize {
    let uniform: usize = layout
        .segments
        .iter()
        .filter(|s| s.group_len.is_none())
        .map(|s| s.len)
        .sum();
    let per_row: usize = layout
        .segments
        .iter()
        .filter_map(|s| s.group_len)
        .map(|g| if g > 1 { precision.row_bytes(g) } else { 4 * g })
        .sum();
    1 + 4 + 4 * nnz + 4 * uniform + nnz * per_row
}

/// The global model `new` as the rows that differ from `old` (the version the
/// agent holds; `None`: every row): `[precision | nnz | rows… | uniform
/// values… | each grouped segment's listed rows…]`.
pub fn encode_model(
    new: &[f32],
    old: Option<&[f32]>,
    layout: &WeightLayout,
    precision: RowPrecision,
) -> Result<Vec<u8>, SparseError> {
    let (segs, _) = segments(layout)?;
    let rows = changed_rows(new, old, layout)?;
    let mut out = Vec::with_capacity(model_len_bytes(layout, rows.len(), precision));
    out.push(precision.tag());
    out.extend_from_slice(&(rows.len() as u32).to_le_bytes());
    for r in &rows {
        out.extend_from_slice(&r.to_le_bytes());
    }
    for s in segs.iter().filter(|s| s.group_len.is_none()) {
        put_f32s(&mut out, &new[s.start..s.start + s.len]);
    }
    for s in &segs {
        if let Some(g) = s.group_len {
            let p = if g > 1 { precision } else { RowPrecision::F32 };
            for &r in &rows {
                let at = s.start + r as usize * g;
                put_row(&mut out, &new[at..at + g], p);
            }
        }
    }
    Ok(out)
}

/// Applies [`encode_model`]'s output to the agent's copy `cached` (zeros
/// when it holds none), which then equals [`quantized`] of the global model.
pub fn apply_model(
    bytes: &[u8],
    cached: &mut [f32],
    layout: &WeightLayout,
) -> Result<(), SparseError> {
    let (segs, num_rows) = segments(layout)?;
    let model_len: usize = segs.iter().map(|s| s.len).sum();
    if cached.len() != model_len {
        return Err(SparseError::CachedLength {
            expected: model_len,
            got: cached.len(),
        });
    }
    let mut r = Reader::new(bytes);
    let precision = RowPrecision::from_tag(r.u8()?)?;
    let nnz = r.u32()? as usize;
    if nnz > num_rows {
        return Err(SparseError::TooManyRows {
            listed: nnz,
            rows: num_rows,
        });
    }
    r.need(model_len_bytes(layout, nnz, precision) - 5)?;
    let rows = r.rows(nnz, num_rows)?;
    // Decode into a scratch copy first, so a bad payload leaves the cache intact.
    let mut next = cached.to_vec();
    for s in segs.iter().filter(|s| s.group_len.is_none()) {
        r.f32s_into(&mut next[s.start..s.start + s.len])?;
    }
    for s in &segs {
        if let Some(g) = s.group_len {
            let p = if g > 1 { precision } else { RowPrecision::F32 };
            for &row in &rows {
                let at = s.start + row as usize * g;
                r.row_into(&mut next[at..at + g], p)?;
            }
        }
    }
    r.finish()?;
    if let Some(index) = first_non_finite(&next) {
        return Err(SparseError::NotFinite { index });
    }
    cached.copy_from_slice(&next);
    Ok(())
}

/// The model as an agent receives it at `precision`: factor rows rounded to
/// f16 or to 8 bits with a per-row scale; biases and uniform segments exact.
pub fn quantized(model: &[f32], layout: &WeightLayout, precision: RowPrecision) -> Vec<f32> {
    let mut out = model.to_vec();
    if precision == RowPrecision::F32 {
        return out;
    }
    let Ok((segs, _)) = segments(layout) else {
        return out;
    };
    for s in &segs {
        if let Some(g) = s.group_len.filter(|g| *g > 1) {
            for row in out[s.start..s.start + s.len].chunks_exact_mut(g) {
                let mut buf = Vec::with_capacity(precision.row_bytes(g));
                put_row(&mut buf, row, precision);
                let mut r = Reader::new(&buf);
                r.row_into(row, precision)
                    .expect("a row just encoded decodes");
            }
        }
    }
    out
}

fn put_f32s(out: &mut Vec<u8>, values: &[f32]) {
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

fn put_row(out: &mut Vec<u8>, row: &[f32], precision: RowPrecision) {
    match precision {
        RowPrecision::F32 => put_f32s(out, row),
        RowPrecision::F16 => {
            for v in row {
                // Clamped: a factor beyond f16's range must not become ±Inf.
                let v = v.clamp(-f32::from(half::f16::MAX), f32::from(half::f16::MAX));
                out.extend_from_slice(&half::f16::from_f32(v).to_le_bytes());
            }
        }
        RowPrecision::Int8 => {
            let max = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let scale = max / 127.0;
            out.extend_from_slice(&scale.to_le_bytes());
            for v in row {
                let q = if scale > 0.0 {
                    (v / scale).round().clamp(-127.0, 127.0) as i8
                } else {
                    0
                };
                out.push(q as u8);
            }
        }
    }
}

/// A bounds-checked little-endian cursor.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, at: 0 }
    }

    fn need(&self, n: usize) -> Result<(), SparseError> {
        let got = self.bytes.len() - self.at;
        if got < n {
            return Err(SparseError::Truncated {
                needed: self.at + n,
                got: self.bytes.len(),
            });
        }
        Ok(())
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], SparseError> {
        self.need(n)?;
        let s = &self.bytes[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, SparseError> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, SparseError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn rows(&mut self, nnz: usize, num_rows: usize) -> Result<Vec<u32>, SparseError> {
        let mut rows = Vec::with_capacity(nnz);
        for position in 0..nnz {
            let index = self.u32()?;
            let ordered = rows.last().is_none_or(|&p| index > p);
            if !ordered || index as usize >= num_rows {
                return Err(SparseError::BadRow {
                    position,
                    index,
                    rows: num_rows,
                });
            }
            rows.push(index);
        }
        Ok(rows)
    }

    fn f32s_into(&mut self, out: &mut [f32]) -> Result<(), SparseError> {
        let b = self.take(4 * out.len())?;
        for (v, c) in out.iter_mut().zip(b.chunks_exact(4)) {
            *v = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
        Ok(())
    }

    fn row_into(&mut self, out: &mut [f32], precision: RowPrecision) -> Result<(), SparseError> {
        match precision {
            RowPrecision::F32 => self.f32s_into(out),
            RowPrecision::F16 => {
                let b = self.take(2 * out.len())?;
                for (v, c) in out.iter_mut().zip(b.chunks_exact(2)) {
                    *v = half::f16::from_le_bytes([c[0], c[1]]).to_f32();
                }
                Ok(())
            }
            RowPrecision::Int8 => {
                let mut scale = [0.0f32];
                self.f32s_into(&mut scale)?;
                let b = self.take(out.len())?;
                for (v, q) in out.iter_mut().zip(b) {
                    *v = f32::from(*q as i8) * scale[0];
                }
                Ok(())
            }
        }
    }

    fn finish(&self) -> Result<(), SparseError> {
        match self.bytes.len() - self.at {
            0 => Ok(()),
            extra => Err(SparseError::TrailingBytes { extra }),
        }
    }
}

#[cfg(test)]
mod tests;
