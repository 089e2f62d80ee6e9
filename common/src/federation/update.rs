//! The update an agent sends: a flat, already-weighted vector plus weights.
//!
//! An agent sends `weight · (local − global)` for every coordinate, the example
//! count `weight`, and optionally a vector of per-coordinate weights (for matrix
//! factorisation, how many ratings it has for each item, with the item rows
//! pre-multiplied by those counts instead of by `weight`). Everything the
//! coordinator does with updates is then a plain sum followed by one division,
//! which is exactly what secure aggregation can compute on masked vectors.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// One agent's contribution to a round.
#[derive(Debug, Clone, PartialEq)]
pub struct Update {
    /// Weighted parameter deltas, one per federated parameter.
    pub values: Vec<f32>,
    /// Per-coordinate weights (empty when the layout is uniform).
    pub coord_weights: Vec<f32>,
    /// The example weight: how many examples the update was trained on.
    pub weight: f64,
}

/// How the coordinator turns a summed update back into a parameter step.
///
/// The model vector is a concatenation of segments. A uniform segment is
/// divided by the total example weight; a grouped segment is divided, group by
/// group, by the summed per-coordinate weight of that group, and groups nobody
/// touched keep their previous value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct WeightLayout {
    /// The segments, in order; their lengths add up to the model length.
    /// Empty means "one uniform segment covering everything".
    pub segments: Vec<Segment>,
    /// Length of the per-coordinate weight vector (0 for uniform layouts).
    pub num_coord_weights: usize,
}

/// One run of coordinates in a [`WeightLayout`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    /// Number of coordinates in the segment.
    pub len: usize,
    /// `None`: weighted by the example weight. `Some(g)`: consecutive runs of
    /// `g` coordinates share one per-coordinate weight, indexed from 0.
    pub group_len: Option<usize>,
}

/// Why an update (or a layout) was refused.
#[derive(Debug, Error, PartialEq)]
pub enum UpdateError {
    /// The value vector does not have the model's length.
    #[error("update has {got} values, the model has {expected}")]
    WrongLength {
        /// Length the model expects.
        expected: usize,
        /// Length received.
        got: usize,
    },
    /// The per-coordinate weight vector has the wrong length.
    #[error("update has {got} coordinate weights, the layout needs {expected}")]
    WrongWeightLength {
        /// Length the layout expects.
        expected: usize,
        /// Length received.
        got: usize,
    },
    /// A value is NaN or infinite.
    #[error("update value {index} is not finite ({value})")]
    NotFinite {
        /// Position of the first bad value.
        index: usize,
        /// The bad value.
        value: f32,
    },
    /// The example weight is negative, zero, NaN or infinite.
    #[error("update weight {0} must be finite and positive")]
    BadWeight(f64),
    /// A coordinate weight is negative or not finite.
    #[error("coordinate weight {index} is {value}; it must be finite and >= 0")]
    BadCoordWeight {
        /// Position of the first bad weight.
        index: usize,
        /// The bad weight.
        value: f32,
    },
    /// The payload byte length is not what the header declared.
    #[error("payload has {got} bytes, the header declared {expected}")]
    PayloadLength {
        /// Declared length.
        expected: usize,
        /// Received length.
        got: usize,
    },
    /// A layout does not add up to the model length.
    #[error("weight layout covers {covered} coordinates, the model has {model_len}")]
    BadLayout {
        /// Coordinates covered by the segments.
        covered: usize,
        /// Model length.
        model_len: usize,
    },
}

impl WeightLayout {
    /// A layout where every coordinate is weighted by the example weight.
    pub fn uniform() -> Self {
        Self::default()
    }

    /// True when the layout has rows: per-coordinate weights shared by the
    /// groups of its grouped segments (matrix factorisation's item rows), so
    /// updates and models can travel row-sparse (`federation::sparse`).
    pub fn has_rows(&self) -> bool {
        self.num_coord_weights > 0 && self.segments.iter().any(|s| s.group_len.is_some())
    }

    /// Checks that the segments cover exactly `model_len` coordinates and that
    /// every grouped segment has exactly `num_coord_weights` groups.
    pub fn validate(&self, model_len: usize) -> Result<(), UpdateError> {
        if self.segments.is_empty() {
            return if self.num_coord_weights == 0 {
                Ok(())
            } else {
                Err(UpdateError::BadLayout {
                    covered: 0,
                    model_len,
                })
            };
        }
        let covered: usize = self.segments.iter().map(|s| s.len).sum();
        let groups_ok = self.segments.iter().all(|s| match s.group_len {
            None => true,
            Some(g) => g > 0 && s.len == g * self.num_coord_weights,
        });
        if covered != model_len || !groups_ok {
            return Err(UpdateError::BadLayout { covered, model_len });
        }
        Ok(())
    }
}

impl Update {
    /// Validates lengths, finiteness and weights against the model's layout.
    /// NaN or Inf must never reach an aggregate: one bad value would poison
    /// every coordinate it is summed into.
    pub fn validate(&self, model_len: usize, layout: &WeightLayout) -> Result<(), UpdateError> {
        self.validate_shape(model_len, layout)?;
        if let Some(index) = first_non_finite(&self.values) {
            return Err(UpdateError::NotFinite {
                index,
                value: self.values[index],
            });
        }
        Ok(())
    }

    /// Every check of [`Update::validate`] except the finiteness of the
    /// values, for callers that check those while summing
    /// (`SumAccumulator::add_many`).
    pub fn validate_shape(
        &self,
        model_len: usize,
        layout: &WeightLayout,
    ) -> Result<(), UpdateError> {
        if self.values.len() != model_len {
            return Err(UpdateError::WrongLength {
                expected: model_len,
                got: self.values.len(),
            });
        }
        if self.coord_weights.len() != layout.num_coord_weights {
            return Err(UpdateError::WrongWeightLength {
                expected: layout.num_coord_weights,
                got: self.coord_weights.len(),
            });
        }
        if !(self.weight.is_finite() && self.weight > 0.0) {
            return Err(UpdateError::BadWeight(self.weight));
        }
        if let Some((index, &value)) = self
            .coord_weights
            .iter()
            .enumerate()
            .find(|(_, v)| !(v.is_finite() && **v >= 0.0))
        {
            return Err(UpdateError::BadCoordWeight { index, value });
        }
        Ok(())
    }

    /// Encodes values then coordinate weights as little-endian f32 bytes.
    pub fn payload_bytes(&self) -> Vec<u8> {
        let mut out = vec![0u8; 4 * (self.values.len() + self.coord_weights.len())];
        let (head, tail) = out.split_at_mut(4 * self.values.len());
        write_le(&self.values, head);
        write_le(&self.coord_weights, tail);
        out
    }

    /// Decodes a payload produced by [`Update::payload_bytes`].
    pub fn from_payload(
        bytes: &[u8],
        num_values: usize,
        num_coord_weights: usize,
        weight: f64,
    ) -> Result<Self, UpdateError> {
        let expected = 4 * (num_values + num_coord_weights);
        if bytes.len() != expected {
            return Err(UpdateError::PayloadLength {
                expected,
                got: bytes.len(),
            });
        }
        let all = f32s_from_le(bytes);
        let coord_weights = all[num_values..].to_vec();
        let mut values = all;
        values.truncate(num_values);
        Ok(Self {
            values,
            coord_weights,
            weight,
        })
    }
}

/// Position of the first NaN or ±Inf in `values`.
///
/// Scans blocks with a branch-free OR of "exponent bits all ones" (which the
/// compiler vectorises) and looks for the exact position only inside a block
/// that has one; a per-element `find` would stop vectorisation and cost about
/// as much as the whole aggregation.
pub fn first_non_finite(values: &[f32]) -> Option<usize> {
    const BLOCK: usize = 1024;
    const EXP: u32 = 0x7f80_0000;
    values.chunks(BLOCK).enumerate().find_map(|(b, block)| {
        let bad = block
            .iter()
            .fold(0u32, |acc, v| acc | u32::from(v.to_bits() & EXP == EXP));
        (bad != 0).then(|| b * BLOCK + block.iter().position(|v| !v.is_finite()).unwrap_or(0))
    })
}

/// Little-endian bytes of a slice of f32.
pub fn f32s_to_le(values: &[f32]) -> Vec<u8> {
    let mut out = vec![0u8; values.len() * 4];
    write_le(values, &mut out);
    out
}

/// SHA-256 of `values` as little-endian f32 bytes: a model version's digest
/// (`TaskAssignment.model_digest`), which an agent checks the model it
/// assembled against and signs in a secure round.
pub fn model_digest(values: &[f32]) -> [u8; 32] {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    if cfg!(target_endian = "little") {
        h.update(bytemuck::cast_slice::<f32, u8>(values));
    } else {
        let mut buf = [0u8; 4096];
        for chunk in values.chunks(1024) {
            let out = &mut buf[..chunk.len() * 4];
            write_le(chunk, out);
            h.update(&*out);
        }
    }
    h.finalize().into()
}

/// Writes `values` as little-endian bytes into `out` (of length 4 × len):
/// fixed-size stores the compiler turns into a plain copy on little-endian
/// targets, where a per-value `extend_from_slice` re-checks capacity each time.
fn write_le(values: &[f32], out: &mut [u8]) {
    for (dst, v) in out.chunks_exact_mut(4).zip(values) {
        dst.copy_from_slice(&v.to_le_bytes());
    }
}

/// f32 values from little-endian bytes; a trailing partial value is ignored,
/// so callers check the length first.
pub fn f32s_from_le(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_round_trips() {
        let u = Update {
            values: vec![1.0, -2.5, 3.25],
            coord_weights: vec![4.0],
            weight: 2.0,
        };
        let back = Update::from_payload(&u.payload_bytes(), 3, 1, 2.0).unwrap();
        assert_eq!(u, back);
    }

    #[test]
    fn validate_rejects_nan_and_bad_lengths() {
        let layout = WeightLayout::uniform();
        let u = Update {
            values: vec![1.0, f32::NAN],
            coord_weights: vec![],
            weight: 1.0,
        };
        assert!(matches!(
            u.validate(2, &layout),
            Err(UpdateError::NotFinite { index: 1, .. })
        ));
        let u = Update {
            values: vec![1.0],
            coord_weights: vec![],
            weight: 1.0,
        };
        assert!(matches!(
            u.validate(2, &layout),
            Err(UpdateError::WrongLength { .. })
        ));
        let u = Update {
            values: vec![1.0, 2.0],
            coord_weights: vec![],
            weight: 0.0,
        };
        assert!(matches!(
            u.validate(2, &layout),
            Err(UpdateError::BadWeight(_))
        ));
    }

    #[test]
    fn first_non_finite_finds_the_first_bad_value_in_any_block() {
        let mut v = vec![0.5f32; 5000];
        assert_eq!(first_non_finite(&v), None);
        v[4999] = f32::NEG_INFINITY;
        assert_eq!(first_non_finite(&v), Some(4999));
        v[1500] = f32::NAN;
        v[1501] = f32::INFINITY;
        assert_eq!(first_non_finite(&v), Some(1500));
        v[0] = f32::MAX;
        assert_eq!(first_non_finite(&v), Some(1500));
    }

    #[test]
    fn payload_length_mismatch_is_reported() {
        let err = Update::from_payload(&[0u8; 9], 2, 0, 1.0).unwrap_err();
        assert_eq!(
            err,
            UpdateError::PayloadLength {
                expected: 8,
                got: 9
            }
        );
    }

    #[test]
    fn grouped_layout_must_cover_model() {
        let layout = WeightLayout {
            segments: vec![
                Segment {
                    len: 1,
                    group_len: None,
                },
                Segment {
                    len: 3,
                    group_len: Some(1),
                },
                Segment {
                    len: 6,
                    group_len: Some(2),
                },
            ],
            num_coord_weights: 3,
        };
        assert!(layout.validate(10).is_ok());
        assert!(layout.validate(11).is_err());
    }
}
