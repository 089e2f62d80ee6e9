//! Streaming aggregation: fold each update into a running weighted sum.
//!
//! The coordinator keeps one [`SumAccumulator`] per round, so its memory is
//! O(model size) however many agents report. Sums are kept in f64 so that the
//! order in which updates arrive does not visibly change the f32 result.

use crate::federation::update::{Update, UpdateError, WeightLayout};

/// Running sums of the updates of one round.
#[derive(Debug, Clone)]
pub struct SumAccumulator {
    values: Vec<f64>,
    coord_weights: Vec<f64>,
    weight: f64,
    count: usize,
}

impl SumAccumulator {
    /// An empty accumulator for a model of `model_len` values and
    /// `num_coord_weights` per-coordinate weights.
    pub fn new(model_len: usize, num_coord_weights: usize) -> Self {
        Self {
            values: vec![0.0; model_len],
            coord_weights: vec![0.0; num_coord_weights],
            weight: 0.0,
            count: 0,
        }
    }

    /// Adds one (already validated) update.
    pub fn add(&mut self, update: &Update) -> Result<(), UpdateError> {
        self.add_parts(&update.values, &update.coord_weights, update.weight)
    }

    /// Adds one update given as its parts.
    pub fn add_parts(
        &mut self,
        values: &[f32],
        coord_weights: &[f32],
        weight: f64,
    ) -> Result<(), UpdateError> {
        self.check_lengths(values, coord_weights)?;
        for (acc, v) in self.values.iter_mut().zip(values) {
            *acc += f64::from(*v);
        }
        for (acc, v) in self.coord_weights.iter_mut().zip(coord_weights) {
            *acc += f64::from(*v);
        }
        self.weight += weight;
        self.count += 1;
        Ok(())
    }

    /// Adds several updates, in slice order, using the current rayon pool,
    /// and checks their values for NaN/Inf in the same pass. An update with
    /// one is left out entirely; the indices of those left out are returned.
    /// The rest of each update (lengths, weights) must already be validated
    /// (`Update::validate_shape`).
    ///
    /// The coordinates are cut into fixed blocks and each block folds every
    /// update in slice order, so each coordinate sees exactly the additions
    /// of calling [`SumAccumulator::add`] once per kept update: the result is
    /// bit-identical to the sequential fold, whatever the thread count.
    /// Checking while folding reads each update from memory once instead of
    /// twice; when an update turns out bad (rare) the sums are restored
    /// from a copy and the good ones folded again.
    pub fn add_many(&mut self, updates: &[&Update]) -> Result<Vec<usize>, UpdateError> {
        use rayon::prelude::*;
        /// Coordinates per parallel block: 128 KiB of f64 sums, which stay
        /// in L2 while every update's slice streams through.
        const BLOCK: usize = 16 * 1024;
        const EXP: u32 = 0x7f80_0000;
        for u in updates {
            self.check_lengths(&u.values, &u.coord_weights)?;
        }
        if updates.is_empty() {
            return Ok(Vec::new());
        }
        let before = self.values.clone();
        let n = updates.len();
        let bad = self
            .values
            .par_chunks_mut(BLOCK)
            .enumerate()
            .map(|(b, block)| {
                let offset = b * BLOCK;
                let mut bad = vec![false; n];
                for (u, flag) in updates.iter().zip(bad.iter_mut()) {
                    let src = &u.values[offset..offset + block.len()];
                    let mut any = 0u32;
                    for (acc, v) in block.iter_mut().zip(src) {
                        *acc += f64::from(*v);
                        any |= u32::from(v.to_bits() & EXP == EXP);
                    }
                    *flag = any != 0;
                }
                bad
            })
            .reduce(
                || vec![false; n],
                |mut a, b| {
                    a.iter_mut().zip(b).for_each(|(x, y)| *x |= y);
                    a
                },
            );
        let skipped: Vec<usize> = (0..n).filter(|&i| bad[i]).collect();
        if !skipped.is_empty() {
            self.values = before;
            let good: Vec<&Update> = (0..n).filter(|&i| !bad[i]).map(|i| updates[i]).collect();
            let again = self.add_many(&good)?;
            debug_assert!(again.is_empty());
            return Ok(skipped);
        }
        self.coord_weights
            .par_chunks_mut(BLOCK)
            .enumerate()
            .for_each(|(b, block)| {
                for u in updates {
                    let src = &u.coord_weights[b * BLOCK..b * BLOCK + block.len()];
                    for (acc, v) in block.iter_mut().zip(src) {
                        *acc += f64::from(*v);
                    }
                }
            });
        for u in updates {
            self.weight += u.weight;
        }
        self.count += n;
        Ok(Vec::new())
    }

    fn check_lengths(&self, values: &[f32], coord_weights: &[f32]) -> Result<(), UpdateError> {
        if values.len() != self.values.len() {
            return Err(UpdateError::WrongLength {
                expected: self.values.len(),
                got: values.len(),
            });
        }
        if coord_weights.len() != self.coord_weights.len() {
            return Err(UpdateError::WrongWeightLength {
                expected: self.coord_weights.len(),
                got: coord_weights.len(),
            });
        }
        Ok(())
    }

    /// Builds an accumulator from sums computed elsewhere (for example the
    /// decoded output of secure aggregation).
    pub fn from_sums(values: Vec<f64>, coord_weights: Vec<f64>, weight: f64, count: usize) -> Self {
        Self {
            values,
            coord_weights,
            weight,
            count,
        }
    }

    /// Number of updates folded in.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Total example weight folded in.
    pub fn total_weight(&self) -> f64 {
        self.weight
    }

    /// The summed values (before division).
    pub fn sum_values(&self) -> &[f64] {
        &self.values
    }

    /// Number of per-coordinate weights summed alongside the values.
    pub fn num_coord_weights(&self) -> usize {
        self.coord_weights.len()
    }

    /// The mean step to apply to the global model: each coordinate's weighted
    /// sum divided by its weight. Coordinates of groups with zero weight get a
    /// step of exactly 0, so items nobody touched keep their previous value.
    pub fn mean_delta(&self, layout: &WeightLayout) -> Vec<f32> {
        let mut out = vec![0.0f32; self.values.len()];
        if self.count == 0 || self.weight <= 0.0 {
            return out;
        }
        if layout.segments.is_empty() {
            for (o, s) in out.iter_mut().zip(&self.values) {
                *o = (s / self.weight) as f32;
            }
            return out;
        }
        let mut offset = 0;
        for seg in &layout.segments {
            let range = offset..offset + seg.len;
            match seg.group_len {
                None => {
                    for i in range {
                        out[i] = (self.values[i] / self.weight) as f32;
                    }
                }
                Some(g) => {
                    // One weight per group of g consecutive coordinates.
                    let groups = out[range.clone()]
                        .chunks_mut(g.max(1))
                        .zip(self.values[range].chunks(g.max(1)))
                        .zip(&self.coord_weights);
                    for ((o, v), &w) in groups {
                        if w > 0.0 {
                            o.iter_mut().zip(v).for_each(|(o, s)| *o = (s / w) as f32);
                        }
                    }
                }
            }
            offset += seg.len;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::federation::update::Segment;

    #[test]
    fn uniform_mean_is_weighted_average() {
        let mut acc = SumAccumulator::new(2, 0);
        // Agent A: 1 example with delta (1, 2); agent B: 3 examples with delta (5, 6).
        acc.add(&Update {
            values: vec![1.0, 2.0],
            coord_weights: vec![],
            weight: 1.0,
        })
        .unwrap();
        acc.add(&Update {
            values: vec![15.0, 18.0],
            coord_weights: vec![],
            weight: 3.0,
        })
        .unwrap();
        assert_eq!(acc.mean_delta(&WeightLayout::uniform()), vec![4.0, 5.0]);
    }

    #[test]
    fn add_many_is_bit_identical_to_sequential_adds_on_any_pool() {
        use rand::{RngExt, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        // Longer than one block, not a multiple of it; values of mixed scale
        // so that a different summation order would change low bits.
        let len = 40_000;
        let updates: Vec<Update> = (0..7)
            .map(|k| Update {
                values: (0..len)
                    .map(|_| rng.random_range(-1.0f32..1.0) * 10f32.powi(k % 4 * 3))
                    .collect(),
                coord_weights: (0..3).map(|_| rng.random_range(0.0f32..5.0)).collect(),
                weight: f64::from(k + 1),
            })
            .collect();
        let mut seq = SumAccumulator::new(len, 3);
        for u in &updates {
            seq.add(u).unwrap();
        }
        let refs: Vec<&Update> = updates.iter().collect();
        for threads in [1, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let mut par = SumAccumulator::new(len, 3);
            pool.install(|| {
                assert!(par.add_many(&refs[..2]).unwrap().is_empty());
                assert!(par.add_many(&refs[2..]).unwrap().is_empty());
            });
            assert_eq!(par.count(), seq.count());
            assert_eq!(par.total_weight(), seq.total_weight());
            assert!(
                par.sum_values()
                    .iter()
                    .zip(seq.sum_values())
                    .all(|(a, b)| a.to_bits() == b.to_bits())
            );
            assert_eq!(par.coord_weights, seq.coord_weights);
        }
        // A NaN in the batch leaves that update out and only that one.
        let mut poisoned = updates[3].clone();
        poisoned.values[len - 1] = f32::NAN;
        let mut with_nan = refs.clone();
        with_nan[3] = &poisoned;
        let mut skip = SumAccumulator::new(len, 3);
        assert_eq!(skip.add_many(&with_nan).unwrap(), vec![3]);
        let mut expect = SumAccumulator::new(len, 3);
        for (i, u) in updates.iter().enumerate() {
            if i != 3 {
                expect.add(u).unwrap();
            }
        }
        assert_eq!(skip.count(), 6);
        assert_eq!(skip.total_weight(), expect.total_weight());
        assert_eq!(skip.values, expect.values);
        assert_eq!(skip.coord_weights, expect.coord_weights);
        let short = Update {
            values: vec![0.0; 3],
            coord_weights: vec![0.0; 3],
            weight: 1.0,
        };
        let mut acc = SumAccumulator::new(len, 3);
        assert!(acc.add_many(&[&updates[0], &short]).is_err());
        assert_eq!(acc.count(), 0, "a bad length in the batch adds nothing");
    }

    #[test]
    fn grouped_mean_divides_per_group_and_leaves_untouched_groups() {
        let layout = WeightLayout {
            segments: vec![
                Segment {
                    len: 1,
                    group_len: None,
                },
                Segment {
                    len: 4,
                    group_len: Some(2),
                },
            ],
            num_coord_weights: 2,
        };
        let mut acc = SumAccumulator::new(5, 2);
        // Only group 0 gets evidence: 2 ratings with deltas summing to (4, 6).
        acc.add(&Update {
            values: vec![1.0, 4.0, 6.0, 0.0, 0.0],
            coord_weights: vec![2.0, 0.0],
            weight: 2.0,
        })
        .unwrap();
        assert_eq!(acc.mean_delta(&layout), vec![0.5, 2.0, 3.0, 0.0, 0.0]);
    }
}
