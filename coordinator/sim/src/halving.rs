//! Successive halving's arithmetic for `--search`, apart from what a trial
//! is: how a budget of training rounds is split into rungs, and which
//! candidates a rung keeps.
//!
//! With n candidates there are R = ⌈log2 n⌉ rungs. Rung r runs
//! n_r = ⌈n / 2^r⌉ candidates and gives each ⌊(B / R) / n_r⌋ rounds, so no
//! rung spends more than B / R of the budget B and a candidate's allotment
//! about doubles from rung to rung (successive halving: Karnin, Koren and
//! Somekh, ICML 2013; Jamieson and Talwalkar, AISTATS 2016). After each rung
//! the better half, rounded up, goes on; the last rung always runs two
//! (2^(R−1) < n ≤ 2^R), and the better of them is chosen.

/// One rung of the schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Rung {
    /// Candidates that run in this rung.
    pub candidates: usize,
    /// Training rounds each of them gets.
    pub rounds: u64,
}

/// Number of rungs for `candidates` configurations: ⌈log2 n⌉, at least one.
pub fn rungs(candidates: usize) -> usize {
    (candidates.next_power_of_two().trailing_zeros() as usize).max(1)
}

/// The smallest budget that gives every candidate of the first rung a round.
pub fn min_budget(candidates: usize) -> u64 {
    (rungs(candidates) * candidates) as u64
}

/// The rungs of a search of `budget` rounds over `candidates`
/// configurations, or `None` when there are fewer than two candidates or
/// the first rung's share of the budget cannot give each of them a round
/// (`budget < min_budget(candidates)`).
pub fn schedule(budget: u64, candidates: usize) -> Option<Vec<Rung>> {
    if candidates < 2 {
        return None;
    }
    let count = rungs(candidates);
    let share = budget / count as u64;
    let mut n = candidates;
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let rounds = share / n as u64;
        if rounds == 0 {
            return None;
        }
        out.push(Rung {
            candidates: n,
            rounds,
        });
        n = n.div_ceil(2);
    }
    Some(out)
}

/// The candidates a rung keeps: the better half of `scored` (rounded up),
/// best first. `scored` pairs a candidate's index with its score (`None`
/// for a trial that failed or measured nothing, which ranks last); equal
/// scores keep the lower index first, so the outcome depends on the scores
/// alone.
pub fn keep(scored: &[(usize, Option<f64>)], higher_is_better: bool) -> Vec<usize> {
    let mut order: Vec<(usize, Option<f64>)> = scored.to_vec();
    order.sort_by(|a, b| {
        let by_score = match (a.1, b.1) {
            (Some(x), Some(y)) if higher_is_better => y.total_cmp(&x),
            (Some(x), Some(y)) => x.total_cmp(&y),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) => std::cmp::Ordering::Equal,
        };
        by_score.then(a.0.cmp(&b.0))
    });
    order.truncate(scored.len().div_ceil(2));
    order.into_iter().map(|(k, _)| k).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_rung_spends_at_most_its_share_and_allotments_double() {
        let s = schedule(100, 8).unwrap();
        let got: Vec<(usize, u64)> = s.iter().map(|r| (r.candidates, r.rounds)).collect();
        assert_eq!(got, vec![(8, 4), (4, 8), (2, 16)]);
        let spent: u64 = s.iter().map(|r| r.candidates as u64 * r.rounds).sum();
        assert!(spent <= 100);
        // Five candidates: three rungs (5, 3, 2), the last one picks one.
        let got: Vec<usize> = schedule(30, 5)
            .unwrap()
            .iter()
            .map(|r| r.candidates)
            .collect();
        assert_eq!(got, vec![5, 3, 2]);
        for n in 2..40 {
            let last = schedule(1000, n).unwrap().last().unwrap().candidates;
            assert_eq!(last, 2, "{n} candidates");
        }
    }

    #[test]
    fn a_budget_below_one_round_per_first_rung_candidate_is_refused() {
        assert_eq!(min_budget(8), 24);
        assert!(schedule(23, 8).is_none());
        assert!(schedule(24, 8).is_some());
        assert!(schedule(100, 1).is_none());
    }

    #[test]
    fn the_better_half_is_kept_failures_last_and_ties_by_index() {
        let scored = [(0, Some(0.9)), (1, None), (2, Some(0.8)), (3, Some(0.8))];
        assert_eq!(keep(&scored, false), vec![2, 3]);
        assert_eq!(keep(&scored, true), vec![0, 2]);
        assert_eq!(
            keep(&[(0, None), (1, Some(1.0)), (2, None)], true),
            vec![1, 0]
        );
    }
}
