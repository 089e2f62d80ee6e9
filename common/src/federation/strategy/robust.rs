//! Byzantine-robust aggregation over individual updates: coordinate-wise
//! median (Yin et al. 2018), trimmed mean, Krum and Multi-Krum (Blanchard et
//! al. 2017).
//!
//! Each works on every agent's own step (its update divided by its weights, as
//! the layout says), so the engine must keep the individual updates: these
//! strategies cannot be combined with secure aggregation. For grouped layouts
//! (MF item rows) a coordinate only takes into account the agents that touched
//! its group; coordinates nobody touched keep their value.

use super::Strategy;
use crate::federation::aggregate::SumAccumulator;
use crate::federation::update::{Update, WeightLayout};

/// Every update's own step and, per coordinate, whether the update touched it.
pub fn per_update_steps(updates: &[Update], layout: &WeightLayout) -> Vec<(Vec<f32>, Vec<bool>)> {
    updates
        .iter()
        .map(|u| {
            let mut acc = SumAccumulator::new(u.values.len(), u.coord_weights.len());
            let _ = acc.add(u);
            let step = acc.mean_delta(layout);
            let mut touched = vec![true; u.values.len()];
            let mut offset = 0;
            for seg in &layout.segments {
                if let Some(g) = seg.group_len {
                    let groups = touched[offset..offset + seg.len].chunks_mut(g.max(1));
                    for (t, &w) in groups.zip(&u.coord_weights) {
                        t.fill(w > 0.0);
                    }
                }
                offset += seg.len;
            }
            (step, touched)
        })
        .collect()
}

/// Applies a per-coordinate robust statistic of the touching agents' steps.
fn coordinatewise(
    global: &[f32],
    updates: &[Update],
    layout: &WeightLayout,
    stat: impl Fn(&mut [f32]) -> f32,
) -> Vec<f32> {
    let steps = per_update_steps(updates, layout);
    let mut column = Vec::with_capacity(steps.len());
    global
        .iter()
        .enumerate()
        .map(|(i, g)| {
            column.clear();
            column.extend(steps.iter().filter(|(_, t)| t[i]).map(|(s, _)| s[i]));
            if column.is_empty() {
                *g
            } else {
                g + stat(&mut column)
            }
        })
        .collect()
}

fn median(xs: &mut [f32]) -> f32 {
    xs.sort_by(f32::total_cmp);
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

/// Coordinate-wise median of the agents' steps (unweighted, as in Flower).
#[derive(Debug, Clone, Default)]
pub struct FedMedian;

impl Strategy for FedMedian {
    fn name(&self) -> String {
        "fedmedian".into()
    }

    fn needs_individual_updates(&self) -> bool {
        true
    }

    fn apply(&mut self, global: &[f32], mean_delta: &[f32]) -> Vec<f32> {
        // Reached only with a single pre-averaged step: its median is itself.
        global.iter().zip(mean_delta).map(|(g, d)| g + d).collect()
    }

    fn aggregate_individual(
        &mut self,
        global: &[f32],
        updates: &[Update],
        layout: &WeightLayout,
    ) -> Vec<f32> {
        coordinatewise(global, updates, layout, median)
    }
}

/// Coordinate-wise trimmed mean: drop the `⌊β·n⌋` smallest and largest steps
/// of each coordinate, average the rest (unweighted).
#[derive(Debug, Clone)]
pub struct FedTrimmedAvg {
    /// Fraction trimmed at each end, in [0, 0.5).
    pub beta: f64,
}

impl Strategy for FedTrimmedAvg {
    fn name(&self) -> String {
        format!("fedtrimmedavg:{}", self.beta)
    }

    fn needs_individual_updates(&self) -> bool {
        true
    }

    fn apply(&mut self, global: &[f32], mean_delta: &[f32]) -> Vec<f32> {
        global.iter().zip(mean_delta).map(|(g, d)| g + d).collect()
    }

    fn aggregate_individual(
        &mut self,
        global: &[f32],
        updates: &[Update],
        layout: &WeightLayout,
    ) -> Vec<f32> {
        let beta = self.beta;
        coordinatewise(global, updates, layout, |xs| {
            xs.sort_by(f32::total_cmp);
            let cut = (beta * xs.len() as f64).floor() as usize;
            let kept = &xs[cut..xs.len() - cut];
            let sum: f64 = kept.iter().map(|&x| f64::from(x)).sum();
            (sum / kept.len() as f64) as f32
        })
    }
}

/// Krum (`keep = 1`) and Multi-Krum (`keep = m`): score each step by the sum
/// of squared distances to its `n − f − 2` nearest others, keep the `m`
/// lowest-scoring updates and FedAvg them.
#[derive(Debug, Clone)]
pub struct Krum {
    /// Number of Byzantine agents tolerated, f.
    pub byzantine: usize,
    /// Number of updates averaged, m (1 = Krum).
    pub keep: usize,
}

impl Krum {
    /// Indices of the selected updates, best score first.
    pub fn select(&self, steps: &[Vec<f32>]) -> Vec<usize> {
        let n = steps.len();
        let neighbours = n.saturating_sub(self.byzantine + 2).max(1);
        let mut dist = vec![vec![0.0f64; n]; n];
        for i in 0..n {
            for j in i + 1..n {
                let d: f64 = steps[i]
                    .iter()
                    .zip(&steps[j])
                    .map(|(a, b)| f64::from(a - b).powi(2))
                    .sum();
                dist[i][j] = d;
                dist[j][i] = d;
            }
        }
        let mut scores: Vec<(f64, usize)> = (0..n)
            .map(|i| {
                let mut row: Vec<f64> = (0..n).filter(|&j| j != i).map(|j| dist[i][j]).collect();
                row.sort_by(f64::total_cmp);
                (row.iter().take(neighbours).sum(), i)
            })
            .collect();
        scores.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        scores
            .into_iter()
            .take(self.keep.min(n))
            .map(|(_, i)| i)
            .collect()
    }
}

impl Strategy for Krum {
    fn name(&self) -> String {
        if self.keep == 1 {
            format!("krum:{}", self.byzantine)
        } else {
            format!("multikrum:{}:{}", self.byzantine, self.keep)
        }
    }

    fn needs_individual_updates(&self) -> bool {
        true
    }

    fn min_updates(&self) -> usize {
        (2 * self.byzantine + 3).max(self.keep)
    }

    fn apply(&mut self, global: &[f32], mean_delta: &[f32]) -> Vec<f32> {
        global.iter().zip(mean_delta).map(|(g, d)| g + d).collect()
    }

    fn aggregate_individual(
        &mut self,
        global: &[f32],
        updates: &[Update],
        layout: &WeightLayout,
    ) -> Vec<f32> {
        if updates.is_empty() {
            return global.to_vec();
        }
        let steps: Vec<Vec<f32>> = per_update_steps(updates, layout)
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        let chosen = self.select(&steps);
        let mut acc = SumAccumulator::new(global.len(), updates[0].coord_weights.len());
        for i in chosen {
            let _ = acc.add(&updates[i]);
        }
        let delta = acc.mean_delta(layout);
        global.iter().zip(&delta).map(|(g, d)| g + d).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::federation::update::Segment;

    fn step(values: &[f32], weight: f64) -> Update {
        Update {
            values: values.iter().map(|v| v * weight as f32).collect(),
            coord_weights: vec![],
            weight,
        }
    }

    fn uniform() -> WeightLayout {
        WeightLayout::uniform()
    }

    #[test]
    fn median_ignores_one_huge_outlier() {
        let ups = [
            step(&[1.0, -1.0], 2.0),
            step(&[2.0, -2.0], 1.0),
            step(&[3.0, -3.0], 5.0),
            step(&[1000.0, 1000.0], 1.0),
        ];
        let out = FedMedian.aggregate_individual(&[10.0, 10.0], &ups, &uniform());
        assert_eq!(out, vec![12.5, 8.5]);
    }

    #[test]
    fn median_of_grouped_rows_uses_only_agents_that_touched_the_item() {
        // Two items of 1 value each, grouped by item; agent A touched item 0
        // only, agents B and C both items.
        let layout = WeightLayout {
            segments: vec![Segment {
                len: 2,
                group_len: Some(1),
            }],
            num_coord_weights: 2,
        };
        let u = |v0: f32, w0: f32, v1: f32, w1: f32| Update {
            values: vec![v0 * w0, v1 * w1],
            coord_weights: vec![w0, w1],
            weight: 1.0,
        };
        let ups = [
            u(5.0, 1.0, 0.0, 0.0),
            u(1.0, 2.0, 4.0, 1.0),
            u(3.0, 1.0, 6.0, 3.0),
        ];
        let out = FedMedian.aggregate_individual(&[0.0, 0.0], &ups, &layout);
        assert_eq!(out, vec![3.0, 5.0]);
    }

    #[test]
    fn trimmed_mean_drops_both_tails() {
        let ups: Vec<Update> = [-100.0, 1.0, 2.0, 3.0, 100.0]
            .iter()
            .map(|&v| step(&[v], 1.0))
            .collect();
        let mut s = FedTrimmedAvg { beta: 0.2 };
        assert_eq!(s.aggregate_individual(&[0.0], &ups, &uniform()), vec![2.0]);
        let mut none = FedTrimmedAvg { beta: 0.0 };
        assert_eq!(
            none.aggregate_individual(&[0.0], &ups, &uniform()),
            vec![1.2]
        );
    }

    #[test]
    fn krum_picks_the_central_honest_update_and_multikrum_averages_the_best() {
        // Honest steps around (1, 1); two attackers far away; f = 2.
        let ups = [
            step(&[1.0, 1.0], 1.0),
            step(&[1.1, 1.0], 1.0),
            step(&[0.9, 1.0], 1.0),
            step(&[1.0, 1.2], 1.0),
            step(&[1.0, 0.8], 1.0),
            step(&[-50.0, 50.0], 1.0),
            step(&[60.0, -60.0], 1.0),
        ];
        let mut krum = Krum {
            byzantine: 2,
            keep: 1,
        };
        // (1, 1) has the smallest sum of distances to its 3 nearest neighbours.
        assert_eq!(
            krum.aggregate_individual(&[0.0, 0.0], &ups, &uniform()),
            vec![1.0, 1.0]
        );
        let mut multi = Krum {
            byzantine: 2,
            keep: 5,
        };
        let out = multi.aggregate_individual(&[0.0, 0.0], &ups, &uniform());
        assert!(
            (out[0] - 1.0).abs() < 1e-6 && (out[1] - 1.0).abs() < 1e-6,
            "{out:?}"
        );
        let chosen = multi.select(
            &per_update_steps(&ups, &uniform())
                .into_iter()
                .map(|(s, _)| s)
                .collect::<Vec<_>>(),
        );
        assert!(!chosen.contains(&5) && !chosen.contains(&6), "{chosen:?}");
    }
}
