//! The SecAgg+ neighbour graph (Bell et al. 2020): a k-regular Harary graph
//! over a pseudo-random ring of the agents, derived from the public round
//! seed so that the server and every agent compute the same graph without
//! exchanging it.
//!
//! Agents are placed on a ring in an order given by a Fisher–Yates shuffle
//! driven by ChaCha20 keyed with SHA-256(label ‖ round seed). Each agent is
//! joined to the ⌊k/2⌋ agents on either side of it and, when k is odd, to the
//! agent diametrically opposite (which needs an even n: an odd n with an odd
//! k has no k-regular graph at all). With k ≥ n − 1 the graph is complete,
//! which is plain SecAgg (Bonawitz et al. 2017).

use std::collections::BTreeMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use sha2::{Digest, Sha256};

use super::SecAggError;
use super::crypto::LABEL;

/// Who is a neighbour of whom in one round.
#[derive(Debug, Clone)]
pub struct NeighbourGraph {
    /// Agent ids in ring order.
    ring: Vec<u32>,
    /// Position of each agent on the ring.
    position: BTreeMap<u32, usize>,
    /// Degree actually used (k capped at n − 1).
    k: usize,
}

impl NeighbourGraph {
    /// Builds the graph over `ids` (any order, no duplicates) with degree
    /// `k` (capped at n − 1) from the public `round_seed`.
    pub fn new(round_seed: &[u8; 32], ids: &[u32], k: usize) -> Result<Self, SecAggError> {
        let n = ids.len();
        let mut sorted = ids.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        if sorted.len() != n {
            return Err(SecAggError::Malformed {
                what: "agent list",
                detail: "an agent id appears twice".into(),
            });
        }
        let k = k.min(n.saturating_sub(1));
        if k < n.saturating_sub(1) && k % 2 == 1 && n % 2 == 1 {
            return Err(SecAggError::Config {
                parameter: "neighbours",
                message: format!(
                    "no {k}-regular graph exists on {n} agents (odd degree needs an even count); \
                     use an even `neighbours`"
                ),
            });
        }
        let mut h = Sha256::new();
        h.update(LABEL);
        h.update(b"/graph");
        h.update(round_seed);
        let mut rng = ChaCha20Rng::from_seed(h.finalize().into());
        for i in (1..n).rev() {
            // Multiply-shift maps a 64-bit draw onto 0..=i; the bias is at most
            // n / 2^64, far below anything observable.
            let j = ((u128::from(rng.next_u64()) * (i as u128 + 1)) >> 64) as usize;
            sorted.swap(i, j);
        }
        let position = sorted.iter().enumerate().map(|(p, &id)| (id, p)).collect();
        Ok(Self {
            ring: sorted,
            position,
            k,
        })
    }

    /// The degree of every agent.
    pub fn degree(&self) -> usize {
        self.k
    }

    /// The agent ids in ring order: under SecAgg+ each agent's neighbours
    /// are the agents nearest it here.
    pub fn ring(&self) -> &[u32] {
        &self.ring
    }

    /// Whether `id` is in the graph.
    pub fn contains(&self, id: u32) -> bool {
        self.position.contains_key(&id)
    }

    /// The neighbours of `id`, sorted by id (empty for an unknown id).
    pub fn neighbours(&self, id: u32) -> Vec<u32> {
        let Some(&p) = self.position.get(&id) else {
            return Vec::new();
        };
        let n = self.ring.len();
        let mut out: Vec<u32> = if self.k + 1 >= n {
            self.ring.iter().copied().filter(|&v| v != id).collect()
        } else {
            let half = self.k / 2;
            let mut v = Vec::with_capacity(self.k);
            for d in 1..=half {
                v.push(self.ring[(p + d) % n]);
                v.push(self.ring[(p + n - d) % n]);
            }
            if self.k % 2 == 1 {
                v.push(self.ring[(p + n / 2) % n]);
            }
            v
        };
        out.sort_unstable();
        out
    }

    /// The holders of `id`'s secret shares: its neighbours and itself, sorted
    /// by id. Holder `i` in this list receives the share with x = i + 1.
    pub fn holders(&self, id: u32) -> Vec<u32> {
        let mut h = self.neighbours(id);
        if self.contains(id) {
            let at = h.partition_point(|&v| v < id);
            h.insert(at, id);
        }
        h
    }

    /// Whether `a` and `b` are neighbours.
    pub fn adjacent(&self, a: u32, b: u32) -> bool {
        a != b && self.neighbours(a).binary_search(&b).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn graph_is_k_regular_symmetric_and_seed_determined() {
        let ids: Vec<u32> = (0..40).map(|i| i * 3 + 1).collect();
        for k in [2usize, 5, 8, 39] {
            let g = NeighbourGraph::new(&[9u8; 32], &ids, k).unwrap();
            for &a in &ids {
                let na = g.neighbours(a);
                assert_eq!(na.len(), k.min(39), "degree of {a} with k={k}");
                assert!(!na.contains(&a));
                for &b in &na {
                    assert!(g.neighbours(b).contains(&a), "{a}-{b} not symmetric");
                }
            }
            let again = NeighbourGraph::new(&[9u8; 32], &ids, k).unwrap();
            assert_eq!(g.ring, again.ring);
        }
        let other = NeighbourGraph::new(&[8u8; 32], &ids, 4).unwrap();
        let g = NeighbourGraph::new(&[9u8; 32], &ids, 4).unwrap();
        assert_ne!(g.ring, other.ring);
    }

    #[test]
    fn odd_degree_on_odd_count_is_refused_naming_neighbours() {
        let ids: Vec<u32> = (0..9).collect();
        let err = NeighbourGraph::new(&[0u8; 32], &ids, 3).unwrap_err();
        assert!(err.to_string().contains("neighbours"), "{err}");
        assert!(NeighbourGraph::new(&[0u8; 32], &ids, 8).is_ok());
    }

    #[test]
    fn holders_include_self_in_id_order() {
        let ids: Vec<u32> = (10..20).collect();
        let g = NeighbourGraph::new(&[1u8; 32], &ids, 4).unwrap();
        let h = g.holders(13);
        assert_eq!(h.len(), 5);
        assert!(h.windows(2).all(|w| w[0] < w[1]));
        assert!(h.contains(&13));
    }
}
