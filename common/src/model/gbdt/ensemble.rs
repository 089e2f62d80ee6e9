//! The gradient-boosted ensemble as a flat f32 vector: the global "model" of
//! the `churn-gbdt` family, with its stable serialisation, its checks and
//! scoring.
//!
//! # Format (version [`FORMAT_VERSION`])
//!
//! Every value is an `f32`; counts and indices are whole numbers below 2^24.
//!
//! ```text
//! header   MAGIC, FORMAT_VERSION, d, max_depth, trees_done, building (0|1),
//!          phase (0 = sketching, 1 = boosting), base_score, total_edges
//! edges    d counts c_0 … c_{d−1} (Σ c_f = total_edges), then the edges of
//!          feature 0, feature 1, … each strictly increasing
//! trees    (trees_done + building) trees of 2^(max_depth+1) − 1 nodes in
//!          heap order (children of i: 2i+1, 2i+2), each node
//!          [kind, feature, threshold, value]
//! ```
//!
//! A node's kind is 0 (unused), 1 (split: rows with `x[feature] <=
//! threshold` go left), 2 (leaf: `value` is added to the margin, already
//! multiplied by the learning rate) or 3 (open: a node of the tree under
//! construction whose histograms the current round collects). Features are
//! standardised with the run's statistics step before they are compared.
//! The completed trees never hold an open node; the tree under construction
//! (`building` = 1, the last one) is ignored when scoring.

use thiserror::Error;

/// First value of every encoded ensemble.
pub const MAGIC: f32 = 4_762_210.0;
/// Version of the layout above; a decoder refuses any other.
pub const FORMAT_VERSION: f32 = 1.0;
/// Values before the edges.
pub const HEADER: usize = 9;
/// Values per node.
pub const NODE_LEN: usize = 4;
/// Deepest tree the format accepts: 2^13 − 1 nodes per tree.
pub const MAX_DEPTH: usize = 12;
/// Integers up to this are exact in an `f32`.
const EXACT_F32: f32 = 16_777_216.0;

/// Why an encoded ensemble or a summed histogram was refused.
#[derive(Debug, Error, PartialEq)]
pub enum GbdtError {
    /// The vector is not an ensemble of this format.
    #[error("not a gbdt model: {0}")]
    Format(String),
    /// A value of the vector is NaN or infinite.
    #[error("gbdt model value {index} is not finite")]
    NotFinite {
        /// Position in the vector.
        index: usize,
    },
    /// The model was built for another feature width.
    #[error("gbdt model has {got} features, the task expects {expected}")]
    Features {
        /// Width the task expects.
        expected: usize,
        /// Width in the model.
        got: usize,
    },
    /// A summed vector does not have the length the state asks for.
    #[error("summed vector has {got} values, the state expects {expected}")]
    SumLength {
        /// Length the state expects.
        expected: usize,
        /// Length received.
        got: usize,
    },
    /// The federation's sums cannot be used (no rows, non-finite values).
    #[error("{0}")]
    Sum(String),
}

/// What a node of a tree is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Node {
    /// No node at this heap position.
    Unused,
    /// An inner node: `x[feature] <= threshold` goes left.
    Split {
        /// Feature index.
        feature: usize,
        /// Threshold on the standardised feature (a bin edge).
        threshold: f32,
    },
    /// A leaf: its value (learning rate included) is added to the margin.
    Leaf(f32),
    /// A node of the tree under construction awaiting its histograms.
    Open,
}

/// One tree in heap order: `2^(max_depth+1) − 1` nodes.
#[derive(Debug, Clone, PartialEq)]
pub struct Tree {
    /// Nodes; the children of `i` are `2i + 1` and `2i + 2`.
    pub nodes: Vec<Node>,
}

impl Tree {
    /// A tree whose root is open and every other node unused.
    pub fn open_root(max_depth: usize) -> Self {
        let mut nodes = vec![Node::Unused; nodes_per_tree(max_depth)];
        nodes[0] = Node::Open;
        Self { nodes }
    }

    /// Where a row ends: `Ok(value)` at a leaf, `Err(node)` at an open node.
    pub fn route(&self, x: &[f32]) -> Result<f32, usize> {
        let mut i = 0;
        loop {
            match self.nodes[i] {
                Node::Split { feature, threshold } => {
                    i = if x[feature] <= threshold {
                        2 * i + 1
                    } else {
                        2 * i + 2
                    };
                }
                Node::Leaf(v) => return Ok(v),
                // `decode` guarantees a split's children are used; an
                // unused node is never reached in a checked tree.
                Node::Open | Node::Unused => return Err(i),
            }
        }
    }

    /// Heap indices of the open nodes, ascending (the order of a round's
    /// histograms).
    pub fn open_nodes(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.nodes[i] == Node::Open)
            .collect()
    }

    /// Number of leaves.
    pub fn leaves(&self) -> usize {
        self.nodes
            .iter()
            .filter(|n| matches!(n, Node::Leaf(_)))
            .count()
    }
}

/// Nodes of a complete binary tree of depth `max_depth`.
pub fn nodes_per_tree(max_depth: usize) -> usize {
    (1usize << (max_depth + 1)) - 1
}

/// The whole state of a federated boosting run.
#[derive(Debug, Clone, PartialEq)]
pub struct Ensemble {
    /// Feature width.
    pub num_features: usize,
    /// Depth of every tree (root at depth 0).
    pub max_depth: usize,
    /// False until the quantile sketch fixed the bin edges and base score.
    pub sketched: bool,
    /// Log-odds of the federation's churn rate: the margin before any tree.
    pub base_score: f32,
    /// Bin edges per feature, strictly increasing: bin `b` of feature `f`
    /// holds `edges[f][b−1] < x <= edges[f][b]`.
    pub edges: Vec<Vec<f32>>,
    /// Completed trees.
    pub trees: Vec<Tree>,
    /// The tree under construction, if any.
    pub building: Option<Tree>,
}

impl Ensemble {
    /// The state before the sketch round.
    pub fn new(num_features: usize, max_depth: usize) -> Self {
        Self {
            num_features,
            max_depth,
            sketched: false,
            base_score: 0.0,
            edges: vec![Vec::new(); num_features],
            trees: Vec::new(),
            building: None,
        }
    }

    /// Why the model is the churn rate alone, when it has trees and none
    /// of them split; `None` otherwise. `train_rows` is the number of rows
    /// the trees were grown on (the federation's, validation slices left
    /// out): a split needs a hessian sum of `min_child_weight` on each side,
    /// about `2 · min_child_weight / (p · (1 − p))` rows at churn rate `p`,
    /// which a small or very unbalanced federation does not have with the
    /// default.
    /// The coordinator, which never sees a row count, passes `None`.
    pub fn unsplit_note(&self, p: &super::GbdtParams, train_rows: Option<usize>) -> Option<String> {
        if self.trees.is_empty() || self.trees.iter().any(|t| t.leaves() > 1) {
            return None;
        }
        let rate = f64::from(sigmoid(self.base_score));
        let per_row = rate * (1.0 - rate);
        let mcw = f64::from(p.min_child_weight);
        let head = format!(
            "churn-gbdt: none of the {} trees split, so the model predicts the churn rate \
             ({rate:.3}) for everyone",
            self.trees.len()
        );
        // One class only (the sketch clamps the rate to [1e-6, 1 - 1e-6]): no split
        // can gain and no min_child_weight helps; the labels are the cause.
        if per_row < 2e-6 {
            return Some(format!(
                "{head}: every training customer has the same label, so there is nothing to \
                 separate; check which label values count as churned (a customer table's \
                 `positive` and `negative`, or the orders' churn window and cutoff)"
            ));
        }
        let needed = (2.0 * mcw / per_row).ceil();
        Some(match train_rows {
            None => format!(
                "{head}. A split needs a hessian sum of min_child_weight ({mcw}) on each side, \
                 about {needed:.0} training rows across the merchants at this churn rate \
                 (p·(1−p) = {per_row:.3} per row): if they hold fewer, give a smaller \
                 `min_child_weight` in the run's gbdt settings; otherwise no feature separates \
                 churners from the others by enough to gain at l2 {}",
                p.l2
            ),
            Some(rows) if rows as f64 * per_row < 2.0 * mcw => format!(
                "{head}: a split needs a hessian sum of min_child_weight ({mcw}) on each side, \
                 about {needed:.0} training rows at this churn rate (p·(1−p) = {per_row:.3} per \
                 row), and the trees were grown on {rows}; give a min_child_weight below {:.2} \
                 (--min-child-weight, or `min_child_weight` in the run's gbdt settings)",
                rows as f64 * per_row / 2.0
            ),
            Some(_) => {
                format!(
                    "{head}: no feature separates churners from the others by enough to gain at \
                 min_child_weight {mcw} and l2 {}",
                    p.l2
                )
            }
        })
    }

    /// Number of bins of each feature (edges + 1).
    pub fn bins_per_feature(&self) -> Vec<usize> {
        self.edges.iter().map(|e| e.len() + 1).collect()
    }

    /// Total bins over all features: the length of one node's G (or H)
    /// histogram.
    pub fn total_bins(&self) -> usize {
        self.edges.iter().map(|e| e.len() + 1).sum()
    }

    /// The bin of `x` among `edges` (`edges[b−1] < x <= edges[b]`).
    pub fn bin_of(edges: &[f32], x: f32) -> usize {
        edges.partition_point(|&e| e < x)
    }

    /// The margin (log-odds) of one standardised row: base score plus the
    /// completed trees' leaves. The tree under construction is ignored.
    pub fn margin(&self, x: &[f32]) -> f32 {
        self.base_score
            + self
                .trees
                .iter()
                .map(|t| t.route(x).unwrap_or(0.0))
                .sum::<f32>()
    }

    /// Churn probabilities of standardised rows.
    pub fn predict_proba(&self, x: &ndarray::Array2<f32>) -> Vec<f32> {
        x.rows()
            .into_iter()
            .map(|r| {
                let row = r.to_vec();
                sigmoid(self.margin(&row))
            })
            .collect()
    }

    /// The flat vector (see the module docs).
    pub fn encode(&self) -> Vec<f32> {
        let total_edges: usize = self.edges.iter().map(Vec::len).sum();
        let mut out = vec![
            MAGIC,
            FORMAT_VERSION,
            self.num_features as f32,
            self.max_depth as f32,
            self.trees.len() as f32,
            if self.building.is_some() { 1.0 } else { 0.0 },
            if self.sketched { 1.0 } else { 0.0 },
            self.base_score,
            total_edges as f32,
        ];
        out.extend(self.edges.iter().map(|e| e.len() as f32));
        for e in &self.edges {
            out.extend_from_slice(e);
        }
        for t in self.trees.iter().chain(&self.building) {
            for n in &t.nodes {
                out.extend_from_slice(&match *n {
                    Node::Unused => [0.0, 0.0, 0.0, 0.0],
                    Node::Split { feature, threshold } => [1.0, feature as f32, threshold, 0.0],
                    Node::Leaf(v) => [2.0, 0.0, 0.0, v],
                    Node::Open => [3.0, 0.0, 0.0, 0.0],
                });
            }
        }
        out
    }

    /// Reads and checks an encoded ensemble: format, finiteness, feature
    /// indices, increasing edges and a well-formed tree structure. Anything
    /// else is refused with the reason, never scored.
    pub fn decode(v: &[f32]) -> Result<Self, GbdtError> {
        let bad = |m: String| Err(GbdtError::Format(m));
        if let Some(index) = v.iter().position(|x| !x.is_finite()) {
            return Err(GbdtError::NotFinite { index });
        }
        if v.len() < HEADER {
            return bad(format!("{} values, shorter than the header", v.len()));
        }
        if v[0] != MAGIC {
            return bad("wrong magic number".into());
        }
        if v[1] != FORMAT_VERSION {
            return bad(format!("format version {} (this build reads 1)", v[1]));
        }
        let count = |i: usize, what: &str| -> Result<usize, GbdtError> {
            let x = v[i];
            if x < 0.0 || x.fract() != 0.0 || x >= EXACT_F32 {
                return Err(GbdtError::Format(format!("{what} = {x} is not a count")));
            }
            Ok(x as usize)
        };
        let d = count(2, "feature count")?;
        let max_depth = count(3, "max depth")?;
        let trees_done = count(4, "tree count")?;
        let building = count(5, "building flag")?;
        let sketched = count(6, "phase")?;
        let total_edges = count(8, "edge count")?;
        if d == 0 || max_depth == 0 || max_depth > MAX_DEPTH || building > 1 || sketched > 1 {
            return bad(format!(
                "header out of range (features {d}, depth {max_depth} of 1..={MAX_DEPTH}, \
                 building {building}, phase {sketched})"
            ));
        }
        let per_tree = nodes_per_tree(max_depth) * NODE_LEN;
        let expected = HEADER
            .checked_add(d)
            .and_then(|n| n.checked_add(total_edges))
            .and_then(|n| n.checked_add((trees_done + building).checked_mul(per_tree)?));
        if expected != Some(v.len()) {
            return bad(format!(
                "{} values, the header announces {}",
                v.len(),
                expected.map_or("more than fit".to_string(), |e| e.to_string())
            ));
        }
        let mut pos = HEADER;
        let mut counts = Vec::with_capacity(d);
        for f in 0..d {
            counts.push(count(pos + f, "edges of a feature")?);
        }
        pos += d;
        if counts.iter().sum::<usize>() != total_edges {
            return bad("per-feature edge counts do not add up to the header's".into());
        }
        let mut edges = Vec::with_capacity(d);
        for (f, &c) in counts.iter().enumerate() {
            let e = v[pos..pos + c].to_vec();
            if e.windows(2).any(|w| w[0] >= w[1]) {
                return bad(format!("edges of feature {f} are not increasing"));
            }
            edges.push(e);
            pos += c;
        }
        if sketched == 0 && (total_edges > 0 || trees_done + building > 0) {
            return bad("trees or edges before the sketch round".into());
        }
        let mut trees = Vec::with_capacity(trees_done);
        for t in 0..trees_done + building {
            let tree = decode_tree(&v[pos..pos + per_tree], d, max_depth)
                .map_err(|m| GbdtError::Format(format!("tree {t}: {m}")))?;
            let open = tree.nodes.contains(&Node::Open);
            if t < trees_done && open {
                return bad(format!("completed tree {t} has an open node"));
            }
            trees.push(tree);
            pos += per_tree;
        }
        let building = (building == 1).then(|| trees.pop().expect("one more tree"));
        Ok(Self {
            num_features: d,
            max_depth,
            sketched: sketched == 1,
            base_score: v[7],
            edges,
            trees,
            building,
        })
    }
}

/// One tree's nodes, checked: kinds, features, and that exactly the
/// children of splits are used and nothing below the last level splits.
fn decode_tree(v: &[f32], d: usize, max_depth: usize) -> Result<Tree, String> {
    let n = v.len() / NODE_LEN;
    let first_leaf_level = nodes_per_tree(max_depth - 1);
    let mut nodes = Vec::with_capacity(n);
    for i in 0..n {
        let r = &v[i * NODE_LEN..(i + 1) * NODE_LEN];
        let node = match r[0] {
            0.0 => Node::Unused,
            1.0 => {
                let f = r[1];
                if f < 0.0 || f.fract() != 0.0 || f as usize >= d {
                    return Err(format!("node {i} splits on feature {f} of {d}"));
                }
                if i >= first_leaf_level {
                    return Err(format!("node {i} splits below the maximum depth"));
                }
                Node::Split {
                    feature: f as usize,
                    threshold: r[2],
                }
            }
            2.0 => Node::Leaf(r[3]),
            3.0 if i >= first_leaf_level => {
                return Err(format!("node {i} is open below the maximum depth"));
            }
            3.0 => Node::Open,
            k => return Err(format!("node {i} has unknown kind {k}")),
        };
        let used = node != Node::Unused;
        let should = if i == 0 {
            true
        } else {
            matches!(nodes[(i - 1) / 2], Node::Split { .. })
        };
        if used != should {
            return Err(format!(
                "node {i} is {} but its parent {}",
                if used { "used" } else { "unused" },
                if should { "splits" } else { "does not split" }
            ));
        }
        nodes.push(node);
    }
    Ok(Tree { nodes })
}

/// The logistic function.
pub fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + (-z).exp())
}
