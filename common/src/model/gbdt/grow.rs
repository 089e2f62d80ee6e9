//! Growing a tree one level per round: the agent's gradient and hessian
//! histograms of the open nodes, and the coordinator's split finding on
//! their sum.
//!
//! A round's update holds, for each open node of the tree under
//! construction (in heap order), the sum of the logistic loss's gradients
//! `g = p − y` over the merchant's rows in each bin of each feature, then the
//! same for the hessians `h = p(1 − p)`. Histograms are sums, so the
//! federation's histogram is the sum of the merchants' and the split found
//! on it is the split a single party holding every row would find with the
//! same bins. Gains and leaf values follow XGBoost: a leaf with gradient sum
//! `G` and hessian sum `H` gets `−η·G/(H + λ)` and a split gains
//! `G_L²/(H_L+λ) + G_R²/(H_R+λ) − G²/(H+λ)`; each child must keep a hessian
//! sum of at least `min_child_weight`.

use serde::{Deserialize, Serialize};

use super::ensemble::{Ensemble, GbdtError, MAX_DEPTH, Node, Tree, sigmoid};

/// The boosting hyper-parameters (see BENCHMARKS.md for how each default
/// was chosen on a validation slice of Telco's training rows).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GbdtParams {
    /// Trees to grow (the run is complete after the last one).
    pub trees: usize,
    /// Depth of each tree (root at depth 0): one round per level.
    pub max_depth: usize,
    /// Most leaves per tree (0: only the depth limits it, 2^max_depth).
    pub max_leaves: usize,
    /// Shrinkage η applied to every leaf value.
    pub learning_rate: f32,
    /// Least hessian sum a child may hold (XGBoost's `min_child_weight`).
    pub min_child_weight: f32,
    /// L2 penalty λ on leaf values.
    pub l2: f32,
    /// Most bins per feature (at most 255, as in scikit-learn).
    pub max_bins: usize,
    /// Share of each merchant's training rows kept aside (stratified, seeded
    /// by the run seed and the merchant id) for the validation AUC that model
    /// selection and early stopping look at; never used to grow trees.
    pub valid_fraction: f64,
}

impl Default for GbdtParams {
    fn default() -> Self {
        Self {
            trees: 300,
            max_depth: 3,
            max_leaves: 0,
            learning_rate: 0.1,
            min_child_weight: 20.0,
            l2: 10.0,
            max_bins: 255,
            valid_fraction: 0.1,
        }
    }
}

impl GbdtParams {
    /// Checks every value once, naming the field.
    pub fn check(&self) -> Result<(), String> {
        if self.trees == 0 {
            return Err("gbdt.trees must be at least 1".into());
        }
        if !(1..=MAX_DEPTH).contains(&self.max_depth) {
            return Err(format!(
                "gbdt.max_depth {} is not in 1..={MAX_DEPTH}",
                self.max_depth
            ));
        }
        if self.max_leaves == 1 {
            return Err("gbdt.max_leaves must be 0 (no limit) or at least 2".into());
        }
        // A shrinkage past 1 overshoots every Newton step: with 1e30 the
        // trees diverged (log loss 11.8) without a word.
        if !(self.learning_rate > 0.0 && self.learning_rate <= 1.0) {
            return Err(format!(
                "gbdt.learning_rate {} must be in (0, 1] (the shrinkage of each tree's step; \
                 default 0.1)",
                self.learning_rate
            ));
        }
        if !(self.min_child_weight.is_finite() && self.min_child_weight >= 0.0) {
            return Err(format!(
                "gbdt.min_child_weight {} must be finite and ≥ 0",
                self.min_child_weight
            ));
        }
        if !(self.l2.is_finite() && self.l2 >= 0.0) {
            return Err(format!("gbdt.l2 {} must be finite and ≥ 0", self.l2));
        }
        if self.l2 == 0.0 && self.min_child_weight == 0.0 {
            return Err("gbdt.l2 and gbdt.min_child_weight cannot both be 0 \
                        (an empty leaf would divide by zero)"
                .into());
        }
        if !(2..=255).contains(&self.max_bins) {
            return Err(format!("gbdt.max_bins {} is not in 2..=255", self.max_bins));
        }
        if !(0.0..0.5).contains(&self.valid_fraction) {
            return Err(format!(
                "gbdt.valid_fraction {} is not in [0, 0.5)",
                self.valid_fraction
            ));
        }
        Ok(())
    }
}

/// Length of a level's update: G and H histograms of every open node.
pub fn level_len(ens: &Ensemble) -> usize {
    let open = ens.building.as_ref().map_or(0, |t| t.open_nodes().len());
    open * 2 * ens.total_bins()
}

/// One merchant's histograms for the open nodes of the tree under
/// construction, from its standardised rows `x` and labels `y`.
pub fn histograms(ens: &Ensemble, x: &ndarray::Array2<f32>, y: &[f32]) -> Vec<f32> {
    let Some(tree) = &ens.building else {
        return Vec::new();
    };
    let open = tree.open_nodes();
    let total = ens.total_bins();
    let offsets: Vec<usize> = ens
        .bins_per_feature()
        .iter()
        .scan(0, |acc, &b| {
            let o = *acc;
            *acc += b;
            Some(o)
        })
        .collect();
    let mut slot = vec![usize::MAX; tree.nodes.len()];
    for (k, &i) in open.iter().enumerate() {
        slot[i] = k;
    }
    let mut acc = vec![0.0f64; open.len() * 2 * total];
    for (row, &label) in x.rows().into_iter().zip(y) {
        let r = row.to_vec();
        let Err(node) = tree.route(&r) else { continue };
        let base = slot[node] * 2 * total;
        let p = sigmoid(ens.margin(&r));
        let g = f64::from(p) - f64::from(label);
        let h = f64::from(p) * (1.0 - f64::from(p));
        for (f, &z) in r.iter().enumerate() {
            let b = offsets[f] + Ensemble::bin_of(&ens.edges[f], z);
            acc[base + b] += g;
            acc[base + total + b] += h;
        }
    }
    acc.into_iter().map(|v| v as f32).collect()
}

/// The best split of one node from its summed histograms.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Split {
    /// Loss reduction.
    pub gain: f64,
    /// Feature index.
    pub feature: usize,
    /// Last bin that goes left.
    pub bin: usize,
    /// Gradient and hessian sums of the left child.
    pub left: (f64, f64),
    /// Gradient and hessian sums of the right child.
    pub right: (f64, f64),
}

/// A leaf's value (learning rate included) from its sums.
pub fn leaf_value(g: f64, h: f64, p: &GbdtParams) -> f32 {
    let denom = h + f64::from(p.l2);
    if denom > 0.0 {
        (-f64::from(p.learning_rate) * g / denom) as f32
    } else {
        0.0
    }
}

fn score(g: f64, h: f64, l2: f64) -> f64 {
    if h + l2 > 0.0 { g * g / (h + l2) } else { 0.0 }
}

/// The node's gradient and hessian sums and its best split (`None` when no
/// split gains or keeps `min_child_weight` on both sides). `g` and `h` are
/// the node's histograms over all features' bins; `bins[f]` the bins of
/// feature `f`. Ties go to the lowest feature, then the lowest bin.
pub fn best_split(
    g: &[f64],
    h: &[f64],
    bins: &[usize],
    p: &GbdtParams,
) -> ((f64, f64), Option<Split>) {
    let total_g: f64 = g[..bins[0]].iter().sum();
    let total_h: f64 = h[..bins[0]].iter().sum();
    let l2 = f64::from(p.l2);
    let mcw = f64::from(p.min_child_weight);
    let parent = score(total_g, total_h, l2);
    let mut best: Option<Split> = None;
    let mut offset = 0;
    for (feature, &nb) in bins.iter().enumerate() {
        let (mut gl, mut hl) = (0.0, 0.0);
        for bin in 0..nb.saturating_sub(1) {
            gl += g[offset + bin];
            hl += h[offset + bin];
            let (gr, hr) = (total_g - gl, total_h - hl);
            if hl < mcw || hr < mcw || hl <= 0.0 || hr <= 0.0 {
                continue;
            }
            let gain = score(gl, hl, l2) + score(gr, hr, l2) - parent;
            if gain > 1e-9 && best.is_none_or(|b| gain > b.gain) {
                best = Some(Split {
                    gain,
                    feature,
                    bin,
                    left: (gl, hl),
                    right: (gr, hr),
                });
            }
        }
        offset += nb;
    }
    ((total_g, total_h), best)
}

/// The coordinator's step for one level: splits (or leaves) for every open
/// node from the federation's summed histograms `sums` (layout of
/// [`histograms`]). Children at the maximum depth become leaves at once, so
/// a tree of depth D takes D rounds. When no node is left open the tree is
/// complete and, unless `params.trees` are grown, the next one starts.
pub fn grow_level(ens: &mut Ensemble, sums: &[f64], p: &GbdtParams) -> Result<(), GbdtError> {
    let expected = level_len(ens);
    if sums.len() != expected {
        return Err(GbdtError::SumLength {
            expected,
            got: sums.len(),
        });
    }
    if let Some(i) = sums.iter().position(|v| !v.is_finite()) {
        return Err(GbdtError::Sum(format!("histogram value {i} is not finite")));
    }
    let bins = ens.bins_per_feature();
    let total = ens.total_bins();
    let max_depth = ens.max_depth;
    let edges = ens.edges.clone();
    let Some(tree) = ens.building.as_mut() else {
        return Err(GbdtError::Sum("no tree is under construction".into()));
    };
    let open = tree.open_nodes();
    let mut found = Vec::with_capacity(open.len());
    for (k, &i) in open.iter().enumerate() {
        let block = &sums[k * 2 * total..(k + 1) * 2 * total];
        let (g, h) = block.split_at(total);
        found.push((i, best_split(g, h, &bins, p)));
    }
    // The leaf budget: splits with the largest gains first.
    let mut order: Vec<usize> = (0..found.len())
        .filter(|&k| found[k].1.1.is_some())
        .collect();
    order.sort_by(|&a, &b| {
        let (ga, gb) = (found[a].1.1.unwrap().gain, found[b].1.1.unwrap().gain);
        gb.total_cmp(&ga).then(a.cmp(&b))
    });
    let mut terminals = tree.leaves() + open.len();
    let mut accepted = vec![false; found.len()];
    for k in order {
        if p.max_leaves == 0 || terminals < p.max_leaves {
            accepted[k] = true;
            terminals += 1;
        }
    }
    for (k, (i, ((g, h), split))) in found.into_iter().enumerate() {
        match split.filter(|_| accepted[k]) {
            Some(s) => {
                tree.nodes[i] = Node::Split {
                    feature: s.feature,
                    threshold: edges[s.feature][s.bin],
                };
                let child_depth = depth_of(i) + 1;
                for (c, (cg, ch)) in [(2 * i + 1, s.left), (2 * i + 2, s.right)] {
                    tree.nodes[c] = if child_depth >= max_depth {
                        Node::Leaf(leaf_value(cg, ch, p))
                    } else {
                        Node::Open
                    };
                }
            }
            None => tree.nodes[i] = Node::Leaf(leaf_value(g, h, p)),
        }
    }
    if tree.open_nodes().is_empty() {
        let done = ens.building.take().expect("a tree was under construction");
        ens.trees.push(done);
        if ens.trees.len() < p.trees {
            ens.building = Some(Tree::open_root(max_depth));
        }
    }
    Ok(())
}

/// Depth of heap index `i` (root 0).
fn depth_of(i: usize) -> usize {
    (usize::BITS - 1 - (i + 1).leading_zeros()) as usize
}
