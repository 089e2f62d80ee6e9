//! The segmentation pipeline's state, as a sans-IO machine: what the
//! coordinator holds between exchanges, its f32 encoding (the "global
//! model" of a `Segments` run) and the step from one version to the next
//! given the summed answers of the merchants.
//!
//! # Encoding
//!
//! Every integer is below 2^24, so exact in f32:
//!
//! | index | value |
//! |---|---|
//! | 0 | [`FORMAT`] |
//! | 1 | phase (0 candidates, 1 choose, 2 Lloyd, 3 done) |
//! | 2 | d, the feature width |
//! | 3 | number of candidate k |
//! | 4 | the chosen k (0 until chosen) |
//! | 5 | Lloyd updates applied so far |
//! | 6..10 | the run seed, four 16-bit pieces, low first |
//! | then | the candidate k, increasing |
//! | then | the inertia curve at the choice (one per k, 0 before) |
//! | then | the centres of every k, `k · d` each, in the order of the k |
//!
//! The length depends only on d and the k, so every version of a run has
//! the same length.

use crate::model::TrainError;
use crate::model::kmeans;

/// The Lloyd rounds of the chosen k stop when a round moves its centres by
/// at most this much in all (sum of squared moves, standardised space):
/// zero in the clear once no customer changes segment, and well above the
/// secure ring's quantisation of a centre (about 10⁻⁷ per value, as
/// 10⁻¹⁴ squared), well below one customer of a cluster of a thousand
/// changing segment (about 10⁻⁶ squared).
pub const CONVERGED_SHIFT: f64 = 1e-10;

/// Encoding format tag (the first value of every state).
pub const FORMAT: f32 = 1.0;
/// Header values before the candidate k.
pub const HEADER: usize = 10;
/// A merchant proposes this many local cluster means per segment of each
/// candidate k (`CANDIDATES_PER_SEGMENT · k` candidates).
pub const CANDIDATES_PER_SEGMENT: usize = 3;
/// Seeds of the coordinator's clustering of the candidates (as
/// scikit-learn's `n_init = 10`).
pub const INIT_SEEDS: usize = 10;

/// Where the pipeline is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Merchants propose weighted candidate centres (one slot each).
    #[default]
    Candidates,
    /// Lloyd rounds of every candidate k at once, then the elbow.
    Choose,
    /// Lloyd rounds of the chosen k.
    Lloyd,
    /// Finished: the chosen k's centres are the segmentation.
    Done,
}

impl Phase {
    fn code(self) -> f32 {
        match self {
            Phase::Candidates => 0.0,
            Phase::Choose => 1.0,
            Phase::Lloyd => 2.0,
            Phase::Done => 3.0,
        }
    }

    fn from_code(v: f32) -> Option<Self> {
        [Phase::Candidates, Phase::Choose, Phase::Lloyd, Phase::Done]
            .into_iter()
            .find(|p| p.code() == v)
    }
}

/// The coordinator's state between exchanges (see the module docs).
#[derive(Debug, Clone, PartialEq)]
pub struct Segmentation {
    /// Feature width.
    pub d: usize,
    /// The candidate k, increasing.
    pub ks: Vec<usize>,
    /// The run seed (the coordinator's clustering of the candidates is
    /// seeded by it).
    pub seed: u64,
    /// Where the pipeline is.
    pub phase: Phase,
    /// The chosen k, once chosen (0 before).
    pub chosen: usize,
    /// Lloyd updates applied so far (to every k in the choice, then to the
    /// chosen k).
    pub updates: usize,
    /// Federated inertia of each k at the choice (0 before).
    pub curve: Vec<f32>,
    /// Centres of each k (`k · d`, standardised space; zeros before the
    /// candidates are clustered).
    pub centres: Vec<Vec<f32>>,
}

fn bad(what: impl Into<String>) -> TrainError {
    TrainError::InvalidModel(format!("segmentation state: {}", what.into()))
}

fn whole(v: f64) -> bool {
    v.is_finite() && v >= 0.0 && v.fract() == 0.0
}

impl Segmentation {
    /// The first state: nothing proposed yet.
    pub fn new(d: usize, ks: &[usize], seed: u64) -> Self {
        Self {
            d,
            ks: ks.to_vec(),
            seed,
            phase: Phase::Candidates,
            chosen: 0,
            updates: 0,
            curve: vec![0.0; ks.len()],
            centres: ks.iter().map(|&k| vec![0.0; k * d]).collect(),
        }
    }

    /// Length of every encoded state with `d` features and these k.
    pub fn encoded_len(d: usize, ks: &[usize]) -> usize {
        HEADER + 2 * ks.len() + d * ks.iter().sum::<usize>()
    }

    /// The state as the f32 vector the engine stores and agents download.
    pub fn encode(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(Self::encoded_len(self.d, &self.ks));
        out.extend([
            FORMAT,
            self.phase.code(),
            self.d as f32,
            self.ks.len() as f32,
            self.chosen as f32,
            self.updates as f32,
        ]);
        out.extend((0..4).map(|i| ((self.seed >> (16 * i)) & 0xffff) as f32));
        out.extend(self.ks.iter().map(|&k| k as f32));
        out.extend(&self.curve);
        for c in &self.centres {
            out.extend(c);
        }
        out
    }

    /// The phase and chosen k of an encoded state, without decoding the rest.
    pub fn header(global: &[f32]) -> Result<(Phase, usize), TrainError> {
        if global.len() < HEADER || global[0] != FORMAT {
            return Err(bad("not a segmentation state"));
        }
        let phase = Phase::from_code(global[1]).ok_or_else(|| bad("unknown phase"))?;
        let chosen = global[4];
        if !whole(f64::from(chosen)) {
            return Err(bad(format!("chosen k {chosen} is not a whole number")));
        }
        Ok((phase, chosen as usize))
    }

    /// Decodes a state, checking it belongs to a run on `d` features with
    /// candidate k `ks`.
    pub fn decode(global: &[f32], d: usize, ks: &[usize]) -> Result<Self, TrainError> {
        let (phase, chosen) = Self::header(global)?;
        if global.len() != Self::encoded_len(d, ks) {
            return Err(bad(format!(
                "{} values, the run's d and k need {}",
                global.len(),
                Self::encoded_len(d, ks)
            )));
        }
        if global[2] as usize != d || global[3] as usize != ks.len() {
            return Err(bad("feature width or number of k differ from the run's"));
        }
        let updates = global[5];
        if !whole(f64::from(updates)) {
            return Err(bad("update count is not a whole number"));
        }
        let mut seed = 0u64;
        for (i, v) in global[6..HEADER].iter().enumerate() {
            if !whole(f64::from(*v)) || *v > 65_535.0 {
                return Err(bad("seed piece out of range"));
            }
            seed |= (*v as u64) << (16 * i);
        }
        let nk = ks.len();
        if global[HEADER..HEADER + nk]
            .iter()
            .zip(ks)
            .any(|(a, &b)| *a != b as f32)
        {
            return Err(bad("candidate k differ from the run's"));
        }
        if chosen != 0 && !ks.contains(&chosen) {
            return Err(bad(format!("chosen k {chosen} is not a candidate")));
        }
        if matches!(phase, Phase::Lloyd | Phase::Done) && chosen == 0 {
            return Err(bad("no k chosen past the choice"));
        }
        let curve = global[HEADER + nk..HEADER + 2 * nk].to_vec();
        let mut at = HEADER + 2 * nk;
        let mut centres = Vec::with_capacity(nk);
        for &k in ks {
            let c = global[at..at + k * d].to_vec();
            if c.iter().any(|v| !v.is_finite()) {
                return Err(bad(format!("a centre of k = {k} is not finite")));
            }
            centres.push(c);
            at += k * d;
        }
        Ok(Self {
            d,
            ks: ks.to_vec(),
            seed,
            phase,
            chosen,
            updates: updates as usize,
            curve,
            centres,
        })
    }

    /// The k whose Lloyd sums the current exchange asks for: every
    /// candidate k during the choice, the chosen one after, none otherwise.
    pub fn active(&self) -> Vec<usize> {
        active_ks(self.phase, self.chosen, &self.ks)
    }

    /// The chosen k and its centres, once chosen.
    pub fn chosen_centres(&self) -> Option<(usize, &[f32])> {
        let i = self.ks.iter().position(|&k| k == self.chosen)?;
        Some((self.chosen, &self.centres[i]))
    }

    /// The centres of `k`.
    pub fn centres_of(&self, k: usize) -> Option<&[f32]> {
        let i = self.ks.iter().position(|&c| c == k)?;
        Some(&self.centres[i])
    }

    /// The next state from the summed answers of one exchange (`sums`, in
    /// the layout of [`exchange_len`]) for a run that compares the k after
    /// `choose_rounds` Lloyd updates and stops the chosen k after
    /// `lloyd_rounds` updates (or once they no longer move the centres).
    pub fn on_sum(
        &mut self,
        sums: &[f64],
        slots: usize,
        choose_rounds: usize,
        lloyd_rounds: usize,
    ) -> Result<(), TrainError> {
        let want = exchange_len(self.phase, self.chosen, &self.ks, self.d, slots);
        if sums.len() != want {
            return Err(bad(format!(
                "{} summed values, the exchange has {want}",
                sums.len()
            )));
        }
        match self.phase {
            Phase::Candidates => self.cluster_candidates(sums, slots)?,
            Phase::Choose | Phase::Lloyd => self.lloyd(sums, choose_rounds)?,
            Phase::Done => return Err(bad("the segmentation is finished")),
        }
        if self.phase == Phase::Lloyd && self.updates >= lloyd_rounds {
            self.phase = Phase::Done;
        }
        Ok(())
    }

    fn cluster_candidates(&mut self, sums: &[f64], slots: usize) -> Result<(), TrainError> {
        let d = self.d;
        let slot = slot_len(&self.ks, d);
        for (i, &k) in self.ks.iter().enumerate() {
            let mut points = Vec::new();
            let mut sizes = Vec::new();
            let offset = slot_offset(&self.ks, d, k);
            let m = CANDIDATES_PER_SEGMENT * k;
            for s in 0..slots {
                let base = s * slot + offset;
                for c in 0..m {
                    let size = sums[base + m * d + c];
                    if !whole(size) {
                        return Err(bad(format!("candidate size {size} is not a count")));
                    }
                    if size == 0.0 {
                        continue;
                    }
                    let mean = &sums[base + c * d..base + (c + 1) * d];
                    if mean.iter().any(|v| !v.is_finite()) {
                        return Err(bad("a candidate centre is not finite"));
                    }
                    points.extend(mean.iter().map(|&v| v as f32));
                    sizes.push(size);
                }
            }
            if sizes.is_empty() {
                return Err(TrainError::InvalidModel(format!(
                    "no merchant proposed a candidate centre for k = {k}: a merchant \
                     proposes a local cluster only when it holds at least {} of its customers \
                     (fewer would reveal them); give a smaller k, or fewer merchants with more \
                     customers each (simulator: fewer --merchants)",
                    kmeans::MIN_CANDIDATE_SIZE
                )));
            }
            let mut rng = crate::seed::rng(self.seed, &["kmeans-init"]);
            self.centres[i] =
                kmeans::centres_from_candidates(&points, &sizes, d, k, INIT_SEEDS, &mut rng);
        }
        self.updates = 0;
        if self.ks.len() == 1 {
            self.chosen = self.ks[0];
            self.phase = Phase::Lloyd;
        } else {
            self.phase = Phase::Choose;
        }
        Ok(())
    }

    fn lloyd(&mut self, sums: &[f64], choose_rounds: usize) -> Result<(), TrainError> {
        let d = self.d;
        let mut at = 0;
        let mut inertias = Vec::new();
        let mut shift = 0.0f64;
        for k in self.active() {
            let i = self
                .ks
                .iter()
                .position(|&c| c == k)
                .expect("active k is a candidate");
            let (s, rest) = sums[at..].split_at(k * d);
            let counts = &rest[..k];
            let inertia = rest[k];
            at += k * d + k + 1;
            if let Some(c) = counts.iter().find(|c| !whole(**c)) {
                return Err(bad(format!("cluster count {c} is not a count")));
            }
            if !(inertia.is_finite() && inertia >= 0.0) {
                return Err(bad(format!("inertia {inertia} is not a sum of squares")));
            }
            let centres = &mut self.centres[i];
            for c in 0..k {
                // A centre moves to its cluster's mean only when that mean
                // is over at least MIN_CANDIDATE_SIZE customers; a smaller
                // cluster keeps its centre (itself such a mean), so no
                // published centre is one customer's row.
                if counts[c] >= kmeans::MIN_CANDIDATE_SIZE as f64 {
                    for j in 0..d {
                        let v = (s[c * d + j] / counts[c]) as f32;
                        if !v.is_finite() {
                            return Err(bad("a summed centre is not finite"));
                        }
                        shift += (f64::from(v) - f64::from(centres[c * d + j])).powi(2);
                        centres[c * d + j] = v;
                    }
                }
            }
            inertias.push(inertia);
        }
        let measured_at = self.updates;
        self.updates += 1;
        match self.phase {
            Phase::Choose if measured_at >= choose_rounds => {
                let curve: Vec<f64> = inertias;
                self.chosen = kmeans::elbow(&self.ks, &curve);
                self.curve = curve.iter().map(|&v| v as f32).collect();
                self.phase = Phase::Lloyd;
            }
            Phase::Lloyd if shift <= CONVERGED_SHIFT => self.phase = Phase::Done,
            _ => {}
        }
        Ok(())
    }
}

/// The k an exchange in `phase` asks Lloyd sums for.
pub fn active_ks(phase: Phase, chosen: usize, ks: &[usize]) -> Vec<usize> {
    match phase {
        Phase::Choose => ks.to_vec(),
        Phase::Lloyd => vec![chosen],
        Phase::Candidates | Phase::Done => Vec::new(),
    }
}

/// One merchant's slot in the candidate exchange: for each k,
/// `CANDIDATES_PER_SEGMENT · k` means of d values, then their sizes.
pub fn slot_len(ks: &[usize], d: usize) -> usize {
    ks.iter()
        .map(|&k| CANDIDATES_PER_SEGMENT * k * (d + 1))
        .sum()
}

/// Where k's candidates start within a slot.
pub fn slot_offset(ks: &[usize], d: usize, k: usize) -> usize {
    ks.iter()
        .take_while(|&&c| c != k)
        .map(|&c| CANDIDATES_PER_SEGMENT * c * (d + 1))
        .sum()
}

/// Length of one answer (and of the summed answers) of an exchange: the
/// candidate exchange has one slot per selected merchant; a Lloyd exchange
/// has, for each active k, the per-cluster sums (`k · d`), the counts (`k`)
/// and the inertia (1).
pub fn exchange_len(phase: Phase, chosen: usize, ks: &[usize], d: usize, slots: usize) -> usize {
    match phase {
        Phase::Candidates => slots * slot_len(ks, d),
        Phase::Choose | Phase::Lloyd => active_ks(phase, chosen, ks)
            .iter()
            .map(|&k| k * d + k + 1)
            .sum(),
        Phase::Done => 0,
    }
}
