//! Federated frequent itemsets and association rules over merchants' baskets.
//!
//! A basket is one order: the lines of one customer at one timestamp in an
//! orders export, mapped into the platform catalogue ([`Catalogue`](crate::data::catalogue::Catalogue)), so item
//! `i` means the same product at every merchant. The protocol is level-wise
//! Apriori, written like `privacy::secagg` as a sans-IO state machine:
//!
//! - the coordinator's [`Apriori`] holds the candidates of the current level
//!   (level 1: every catalogue item; level k: joins of frequent (k−1)-itemsets
//!   sharing their first k−2 items, pruned unless every (k−1)-subset is
//!   frequent);
//! - each merchant answers with [`count_update`]: an [`Update`] whose values
//!   are its basket counts of every candidate and whose weight is its number
//!   of baskets — a plain sum, so it goes under secure aggregation like any
//!   statistics update;
//! - [`Apriori::on_sum`] takes the summed counts and total baskets, keeps the
//!   candidates whose federated count reaches the minimum support (a number
//!   of baskets across the federation) and generates the next level;
//!   it stops when a level has no candidate.
//!
//! The frequent itemsets are then exactly those of Apriori on the pooled
//! baskets, with the same supports: the counts are integers summed exactly
//! (f32 counts below 2^24, an f64 running sum, the 2^64 ring under secure
//! aggregation). [`rules`] derives association rules with support,
//! confidence and lift from them, and [`bought_together`] a merchant's lists.
//!
//! # What a count vector reveals
//!
//! Without secure aggregation the coordinator sees, per merchant and level,
//! how many of its baskets contain each candidate: its sales volume of every
//! catalogue item (level 1) and of every frequent pair and triple — the
//! merchant's assortment and its basket mix, though no basket or customer.
//! A count of 1 or 2 can still single out a rare purchase. Limits: the
//! federated minimum support means only itemsets frequent across the
//! federation are ever counted beyond level 1 and only they appear in the
//! rules; with secure aggregation only the federation's sums are seen; and
//! Gaussian or Skellam noise on the counts (the DP step of `privacy::dp`,
//! with sensitivity = the number of candidates one basket can contain) would
//! bound what even the sum reveals about one basket, at the cost of exact
//! supports near the threshold. Noise is not applied here: the acceptance
//! figure is exact equality with pooled Apriori.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::data::catalogue::ItemIndex;
use crate::data::orders::Order;
use crate::federation::update::Update;

/// One basket: sorted, distinct catalogue indices.
pub type Basket = Vec<u32>;

/// A merchant's baskets from its orders: one per (customer, timestamp), items
/// outside the catalogue dropped, empty baskets dropped. Deterministic order.
pub fn baskets(orders: &[Order], catalogue: &dyn ItemIndex) -> Vec<Basket> {
    let mut by_key: BTreeMap<(&str, i64), Vec<u32>> = BTreeMap::new();
    for o in orders {
        if let Some(i) = o.item.as_deref().and_then(|id| catalogue.index(id)) {
            by_key
                .entry((o.customer.as_str(), o.timestamp))
                .or_default()
                .push(i);
        }
    }
    by_key
        .into_values()
        .map(|mut b| {
            b.sort_unstable();
            b.dedup();
            b
        })
        .filter(|b| !b.is_empty())
        .collect()
}

/// A merchant's answer to one level: the number of its baskets containing each
/// candidate (in order), weight = its number of baskets.
pub fn count_update(baskets: &[Basket], candidates: &[Vec<u32>]) -> Update {
    let counts = count(baskets, candidates);
    Update {
        values: counts.iter().map(|&c| c as f32).collect(),
        coord_weights: Vec::new(),
        weight: baskets.len() as f64,
    }
}

/// Basket counts of each candidate (all of one size).
pub fn count(baskets: &[Basket], candidates: &[Vec<u32>]) -> Vec<u64> {
    let mut counts = vec![0u64; candidates.len()];
    let Some(size) = candidates.first().map(Vec::len) else {
        return counts;
    };
    if size == 1 {
        let index: HashMap<u32, usize> = candidates
            .iter()
            .enumerate()
            .map(|(i, c)| (c[0], i))
            .collect();
        for b in baskets {
            for item in b {
                if let Some(&i) = index.get(item) {
                    counts[i] += 1;
                }
            }
        }
        return counts;
    }
    let index: HashMap<&[u32], usize> = candidates
        .iter()
        .enumerate()
        .map(|(i, c)| (c.as_slice(), i))
        .collect();
    let items: HashSet<u32> = candidates.iter().flatten().copied().collect();
    let mut subset = Vec::with_capacity(size);
    for b in baskets {
        let kept: Vec<u32> = b.iter().copied().filter(|i| items.contains(i)).collect();
        if kept.len() < size {
            continue;
        }
        if binomial(kept.len(), size) <= candidates.len() as u128 {
            subsets(&kept, size, 0, &mut subset, &mut |s| {
                if let Some(&i) = index.get(s) {
                    counts[i] += 1;
                }
            });
        } else {
            let set: HashSet<u32> = kept.iter().copied().collect();
            for (i, c) in candidates.iter().enumerate() {
                if c.iter().all(|x| set.contains(x)) {
                    counts[i] += 1;
                }
            }
        }
    }
    counts
}

fn binomial(n: usize, k: usize) -> u128 {
    let k = k.min(n - k);
    (0..k).fold(1u128, |acc, i| {
        acc.saturating_mul((n - i) as u128) / (i as u128 + 1)
    })
}

fn subsets(items: &[u32], k: usize, from: usize, cur: &mut Vec<u32>, f: &mut impl FnMut(&[u32])) {
    if cur.len() == k {
        f(cur);
        return;
    }
    let need = k - cur.len();
    for i in from..=items.len() - need {
        cur.push(items[i]);
        subsets(items, k, i + 1, cur, f);
        cur.pop();
    }
}

/// A frequent itemset and its federated basket count.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Itemset {
    /// Sorted catalogue indices.
    pub items: Vec<u32>,
    /// Baskets containing all of them, across the federation.
    pub count: u64,
}

/// Why a level's sum was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ItemsetsError {
    /// The summed vector does not have one count per candidate.
    #[error("level {level}: {got} counts for {expected} candidates")]
    WrongLength {
        /// The level being counted.
        level: usize,
        /// Candidates of the level.
        expected: usize,
        /// Counts received.
        got: usize,
    },
    /// The next level would have more candidates than [`MAX_CANDIDATES`]:
    /// each merchant would count and upload all of them, and the
    /// coordinator hold them, so the analysis stops here instead.
    #[error("{}", too_many_candidates(*level, *min_count))]
    TooManyCandidates {
        /// The level that was not started.
        level: usize,
        /// The run's minimum support, in baskets.
        min_count: u64,
    },
    /// A summed count is negative, fractional or not finite.
    #[error("level {level}: count {index} is {value}, not a basket count")]
    BadCount {
        /// The level being counted.
        level: usize,
        /// Position of the candidate.
        index: usize,
        /// The value received.
        value: f64,
    },
}

/// Why a stored or downloaded itemsets state (see [`Apriori::encode`]) was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("itemsets state value {index}: {reason}")]
pub struct StateError {
    /// Position in the state vector.
    pub index: usize,
    /// What is wrong there.
    pub reason: String,
}

/// The refusal of a level with too many candidates. Below level 3 there is
/// no size to cap: single items give no rule, so the support is the only
/// way on.
fn too_many_candidates(level: usize, min_count: u64) -> String {
    let cap = if level > 2 {
        format!(" or cap the itemset size below {level}")
    } else {
        String::new()
    };
    format!(
        "level {level} would count more than {MAX_CANDIDATES} candidate itemsets (every merchant \
         counts and uploads one value per candidate): raise the minimum support (now {min_count} \
         baskets){cap}"
    )
}

/// f32 holds every integer below 2^24 exactly: item indices, lengths and the
/// two halves of a count in an encoded state stay below it.
pub const EXACT_F32: u64 = 1 << 24;

/// The most candidate itemsets one level may count (two f32 values each
/// in an update: 16 MB per merchant at the cap). Past it a low minimum
/// support on a real catalogue (every pair of 20,000 items, or every
/// subset of one 40-item basket) would take the coordinator's and the
/// merchants' memory; [`Apriori::on_sum`] refuses the level instead.
pub const MAX_CANDIDATES: usize = 2_000_000;

/// Format tag, the first value of an encoded state.
const STATE_FORMAT: f32 = 1.0;

/// Values before the itemsets in an encoded state: format, level, baskets
/// (high, low), frequent itemsets, candidates, candidate size.
pub const STATE_HEADER: usize = 7;

/// The coordinator's level-wise state.
#[derive(Debug, Clone, PartialEq)]
pub struct Apriori {
    min_count: u64,
    max_len: usize,
    level: usize,
    candidates: Vec<Vec<u32>>,
    frequent: Vec<Itemset>,
    baskets: u64,
}

impl Apriori {
    /// Starts at level 1 over a catalogue of `num_items` items; an itemset is
    /// frequent when at least `min_count` baskets of the federation contain it.
    /// `max_len` bounds the itemset size (0: unbounded).
    pub fn new(num_items: usize, min_count: u64, max_len: usize) -> Self {
        Self {
            min_count: min_count.max(1),
            max_len,
            level: 1,
            candidates: (0..num_items as u32).map(|i| vec![i]).collect(),
            frequent: Vec::new(),
            baskets: 0,
        }
    }

    /// The candidates merchants must count now (empty when finished).
    pub fn candidates(&self) -> &[Vec<u32>] {
        &self.candidates
    }

    /// The level being counted (1-based).
    pub fn level(&self) -> usize {
        self.level
    }

    /// Whether every level has been counted.
    pub fn finished(&self) -> bool {
        self.candidates.is_empty()
    }

    /// Baskets across the federation (known after level 1).
    pub fn total_baskets(&self) -> u64 {
        self.baskets
    }

    /// The frequent itemsets found so far, by level then items.
    pub fn frequent(&self) -> &[Itemset] {
        &self.frequent
    }

    /// Takes a level's summed counts (`sums`, one per candidate) and the summed
    /// basket weight; keeps the frequent candidates and moves to the next level.
    pub fn on_sum(&mut self, sums: &[f64], total_weight: f64) -> Result<(), ItemsetsError> {
        if sums.len() != self.candidates.len() {
            return Err(ItemsetsError::WrongLength {
                level: self.level,
                expected: self.candidates.len(),
                got: sums.len(),
            });
        }
        if self.level == 1 {
            self.baskets = total_weight.round().max(0.0) as u64;
        }
        let mut kept = Vec::new();
        for (index, (c, &s)) in self.candidates.iter().zip(sums).enumerate() {
            let count = s.round();
            if !s.is_finite() || s < -0.5 || (s - count).abs() > 0.25 {
                return Err(ItemsetsError::BadCount {
                    level: self.level,
                    index,
                    value: s,
                });
            }
            if count as u64 >= self.min_count {
                kept.push(Itemset {
                    items: c.clone(),
                    count: count as u64,
                });
            }
        }
        kept.sort();
        let next = if self.max_len != 0 && self.level >= self.max_len {
            Vec::new()
        } else {
            next_candidates_up_to(&kept, MAX_CANDIDATES).ok_or(
                ItemsetsError::TooManyCandidates {
                    level: self.level + 1,
                    min_count: self.min_count,
                },
            )?
        };
        self.candidates = next;
        self.frequent.extend(kept);
        self.level += 1;
        Ok(())
    }
}

impl Apriori {
    /// The state as a flat f32 vector: the "global model" of an itemsets run,
    /// which the coordinator commits as each level's version and agents
    /// download (chunked like any model) to count the next candidates.
    ///
    /// Layout: [`STATE_HEADER`] values (format 1, level, total baskets as
    /// high and low 24-bit halves, number of frequent itemsets, number of
    /// candidates, candidate size), then each frequent itemset as its
    /// length, its items and its count (two halves), then the candidates'
    /// items, flat. Every value is an integer below 2^24, so f32 holds it
    /// exactly; counts up to 2^48. Fails on an item index or a length beyond that.
    pub fn encode(&self) -> Result<Vec<f32>, StateError> {
        let mut out = Vec::with_capacity(
            STATE_HEADER
                + self
                    .frequent
                    .iter()
                    .map(|f| f.items.len() + 3)
                    .sum::<usize>()
                + self.candidates.iter().map(Vec::len).sum::<usize>(),
        );
        let small = |out: &mut Vec<f32>, v: u64| -> Result<(), StateError> {
            if v >= EXACT_F32 {
                return Err(StateError {
                    index: out.len(),
                    reason: format!("{v} does not fit below 2^24"),
                });
            }
            out.push(v as f32);
            Ok(())
        };
        let count = |out: &mut Vec<f32>, v: u64| -> Result<(), StateError> {
            small(out, v / EXACT_F32)?;
            small(out, v % EXACT_F32)
        };
        out.push(STATE_FORMAT);
        small(&mut out, self.level as u64)?;
        count(&mut out, self.baskets)?;
        small(&mut out, self.frequent.len() as u64)?;
        small(&mut out, self.candidates.len() as u64)?;
        small(&mut out, self.candidates.first().map_or(0, Vec::len) as u64)?;
        for f in &self.frequent {
            small(&mut out, f.items.len() as u64)?;
            for &i in &f.items {
                small(&mut out, u64::from(i))?;
            }
            count(&mut out, f.count)?;
        }
        for c in &self.candidates {
            for &i in c {
                small(&mut out, u64::from(i))?;
            }
        }
        Ok(out)
    }

    /// The level and the number of candidates of an encoded state, from its
    /// header alone (what the coordinator needs to size a level's task).
    pub fn header(state: &[f32]) -> Result<(usize, usize), StateError> {
        let mut r = Reader { state, at: 0 };
        r.header().map(|h| (h.level, h.candidates))
    }

    /// Decodes [`Apriori::encode`]'s vector, checking every value (a state
    /// comes from the store or the network): integers, items below
    /// `num_items`, itemsets sorted and of the sizes the header announces,
    /// nothing left over.
    pub fn decode(
        state: &[f32],
        num_items: usize,
        min_count: u64,
        max_len: usize,
    ) -> Result<Self, StateError> {
        let mut r = Reader { state, at: 0 };
        let h = r.header()?;
        let mut frequent = Vec::with_capacity(h.frequent.min(state.len()));
        for _ in 0..h.frequent {
            let len = r.small()? as usize;
            let items = r.items(len, num_items)?;
            let count = r.count()?;
            frequent.push(Itemset { items, count });
        }
        if h.candidates > 0 && h.size != h.level {
            return Err(r.bad(format!(
                "candidates of size {} at level {}",
                h.size, h.level
            )));
        }
        let mut candidates = Vec::with_capacity(h.candidates.min(state.len()));
        for _ in 0..h.candidates {
            candidates.push(r.items(h.size, num_items)?);
        }
        if r.at != state.len() {
            return Err(r.bad(format!("{} values left over", state.len() - r.at)));
        }
        Ok(Self {
            min_count: min_count.max(1),
            max_len,
            level: h.level,
            candidates,
            frequent,
            baskets: h.baskets,
        })
    }
}

/// The decoded header of a state.
struct Header {
    level: usize,
    baskets: u64,
    frequent: usize,
    candidates: usize,
    size: usize,
}

/// A checked cursor over an encoded state.
struct Reader<'a> {
    state: &'a [f32],
    at: usize,
}

impl Reader<'_> {
    fn bad(&self, reason: String) -> StateError {
        StateError {
            index: self.at,
            reason,
        }
    }

    fn small(&mut self) -> Result<u64, StateError> {
        let Some(&v) = self.state.get(self.at) else {
            return Err(self.bad("the state ends early".into()));
        };
        if !(v.is_finite() && v >= 0.0 && v.fract() == 0.0 && (v as u64) < EXACT_F32) {
            return Err(self.bad(format!("{v} is not an integer in [0, 2^24)")));
        }
        self.at += 1;
        Ok(v as u64)
    }

    fn count(&mut self) -> Result<u64, StateError> {
        Ok(self.small()? * EXACT_F32 + self.small()?)
    }

    fn items(&mut self, len: usize, num_items: usize) -> Result<Vec<u32>, StateError> {
        if len == 0 || self.at + len > self.state.len() {
            return Err(self.bad(format!("an itemset of {len} items does not fit")));
        }
        let mut items = Vec::with_capacity(len);
        for _ in 0..len {
            let i = self.small()?;
            if i as usize >= num_items {
                return Err(self.bad(format!("item {i} is outside the catalogue of {num_items}")));
            }
            if items.last().is_some_and(|&last| u64::from(last) >= i) {
                return Err(self.bad("itemset not sorted and distinct".into()));
            }
            items.push(i as u32);
        }
        Ok(items)
    }

    fn header(&mut self) -> Result<Header, StateError> {
        if self.state.first() != Some(&STATE_FORMAT) {
            return Err(self.bad("not an itemsets state (format 1)".into()));
        }
        self.at = 1;
        let level = self.small()? as usize;
        let baskets = self.count()?;
        let frequent = self.small()? as usize;
        let candidates = self.small()? as usize;
        let size = self.small()? as usize;
        if level == 0 {
            return Err(self.bad("level 0".into()));
        }
        Ok(Header {
            level,
            baskets,
            frequent,
            candidates,
            size,
        })
    }
}

/// Apriori's join and prune: (k+1)-candidates from sorted frequent k-itemsets.
pub fn next_candidates(frequent: &[Itemset]) -> Vec<Vec<u32>> {
    next_candidates_up_to(frequent, usize::MAX).expect("no bound")
}

/// [`next_candidates`], or `None` as soon as there are more than `cap`
/// (without building them all).
pub fn next_candidates_up_to(frequent: &[Itemset], cap: usize) -> Option<Vec<Vec<u32>>> {
    let known: HashSet<&[u32]> = frequent.iter().map(|f| f.items.as_slice()).collect();
    let mut out = Vec::new();
    for (a_i, a) in frequent.iter().enumerate() {
        let k = a.items.len();
        for b in &frequent[a_i + 1..] {
            if a.items[..k - 1] != b.items[..k - 1] {
                break;
            }
            let mut c = a.items.clone();
            c.push(b.items[k - 1]);
            let all_frequent = (0..c.len()).all(|drop| {
                let sub: Vec<u32> = c
                    .iter()
                    .enumerate()
                    .filter(|&(j, _)| j != drop)
                    .map(|(_, &x)| x)
                    .collect();
                known.contains(sub.as_slice())
            });
            if all_frequent {
                if out.len() == cap {
                    return None;
                }
                out.push(c);
            }
        }
    }
    Some(out)
}

/// An itemset's item ids as one text field, separated by spaces: an id
/// that itself holds a space, a tab or a double quote is written in double
/// quotes (its quotes doubled), so the list always reads back one way
/// (`a "b c" d` is three items). Lists of plain ids are unchanged.
pub fn item_list<'a>(ids: impl IntoIterator<Item = &'a str>) -> String {
    let mut out = String::new();
    for id in ids {
        if !out.is_empty() {
            out.push(' ');
        }
        if id.is_empty() || id.contains([' ', '\t', '"']) {
            out.push('"');
            out.push_str(&id.replace('"', "\"\""));
            out.push('"');
        } else {
            out.push_str(id);
        }
    }
    out
}

/// An association rule `antecedent → consequent`.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// Items on the left (sorted).
    pub antecedent: Vec<u32>,
    /// Items on the right (sorted).
    pub consequent: Vec<u32>,
    /// Share of baskets containing both sides.
    pub support: f64,
    /// `support(A ∪ C) / support(A)`.
    pub confidence: f64,
    /// `confidence / support(C)`.
    pub lift: f64,
}

/// Every rule `A → C` with `A ∪ C` frequent, `A`, `C` non-empty and disjoint,
/// and confidence at least `min_confidence` (as mlxtend's
/// `association_rules(metric="confidence")`), ordered by antecedent then
/// consequent.
pub fn rules(frequent: &[Itemset], total_baskets: u64, min_confidence: f64) -> Vec<Rule> {
    let counts: HashMap<&[u32], u64> = frequent
        .iter()
        .map(|f| (f.items.as_slice(), f.count))
        .collect();
    let n = total_baskets.max(1) as f64;
    let mut out = Vec::new();
    for f in frequent.iter().filter(|f| f.items.len() >= 2) {
        let k = f.items.len();
        // An itemset of 64 items would have 2^64 rules; the candidate cap
        // keeps levels far below that.
        if k >= 64 {
            continue;
        }
        for mask in 1..(1u64 << k) - 1 {
            let (a, c): (Vec<u32>, Vec<u32>) = {
                let mut a = Vec::new();
                let mut c = Vec::new();
                for (j, &x) in f.items.iter().enumerate() {
                    if mask & (1 << j) != 0 {
                        a.push(x);
                    } else {
                        c.push(x);
                    }
                }
                (a, c)
            };
            let (Some(&ca), Some(&cc)) = (counts.get(a.as_slice()), counts.get(c.as_slice()))
            else {
                continue;
            };
            let support = f.count as f64 / n;
            let confidence = f.count as f64 / ca as f64;
            if confidence >= min_confidence {
                out.push(Rule {
                    antecedent: a,
                    consequent: c,
                    support,
                    confidence,
                    lift: confidence / (cc as f64 / n),
                });
            }
        }
    }
    out.sort_by(|x, y| (&x.antecedent, &x.consequent).cmp(&(&y.antecedent, &y.consequent)));
    out
}

/// A merchant's "bought together" lists: for each item it sells (one of
/// `sold`), the single-item rules from it, best lift first.
pub fn bought_together<'r>(rules: &'r [Rule], sold: &HashSet<u32>) -> Vec<&'r Rule> {
    let mut out: Vec<&Rule> = rules
        .iter()
        .filter(|r| r.antecedent.len() == 1 && sold.contains(&r.antecedent[0]))
        .collect();
    out.sort_by(|a, b| {
        a.antecedent
            .cmp(&b.antecedent)
            .then(b.lift.total_cmp(&a.lift))
            .then(a.consequent.cmp(&b.consequent))
    });
    out
}

#[cfg(test)]
mod tests;
