//! How a data set is dealt into simulated merchants: IID, label-skewed
//! (Dirichlet), size-skewed (Zipf) or by a natural merchant column.
//!
//! A partitioner deals *units* (rows for churn, customers for MF, so that
//! customers never overlap) into `n` merchants. Each unit has a label (the
//! churn class, or a customer's item-popularity bucket) for label skew and an
//! optional group (a store/merchant column) for the natural split. Every
//! merchant gets at least one unit; the result is deterministic for a seed.

use rand::seq::SliceRandom;
use rand_distr::{Distribution, Gamma};
use thiserror::Error;

/// A partitioning scheme, parsed from `iid`, `dirichlet:α`, `zipf:s`, `natural`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Partitioner {
    /// Uniformly at random, equal sizes (±1).
    Iid,
    /// Per label, merchant shares drawn from Dirichlet(α): small α gives each
    /// merchant few labels (Hsu et al. 2019).
    Dirichlet(f64),
    /// Merchant `k` (from 0) gets a share ∝ 1/(k+1)^s: few large, many small.
    Zipf(f64),
    /// One merchant per distinct value of a group column.
    Natural,
}

/// Why a partition could not be made.
#[derive(Debug, Error, PartialEq)]
pub enum PartitionError {
    /// The name did not parse.
    #[error("unknown partitioner `{0}` (known: iid, dirichlet:ALPHA, zipf:S, natural)")]
    Unknown(String),
    /// A parameter is out of range.
    #[error("partitioner `{0}`: {1}")]
    BadParameter(String, String),
    /// More merchants than units.
    #[error(
        "cannot deal {units} customers (users, for a recommender) among {merchants} merchants: \
         each merchant needs at least one; ask for at most {units} merchants"
    )]
    TooFewUnits {
        /// Units available.
        units: usize,
        /// Merchants asked for.
        merchants: usize,
    },
    /// `natural` needs a group column the data set lacks.
    #[error(
        "the `natural` partitioner needs a merchant/store column, which this data set lacks: \
         it keeps an orders export's stores (`--data orders:PATH --merchant-col COLUMN`); for \
         this data choose iid, dirichlet:ALPHA or zipf:S"
    )]
    NoGroups,
}

impl std::str::FromStr for Partitioner {
    type Err = PartitionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let param = |p: Option<&str>, what: &str| -> Result<f64, PartitionError> {
            p.and_then(|v| v.parse::<f64>().ok())
                .filter(|v| v.is_finite() && *v > 0.0)
                .ok_or_else(|| {
                    PartitionError::BadParameter(s.into(), format!("{what} must be a number > 0"))
                })
        };
        let (head, p) = match s.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        };
        match head {
            "iid" if p.is_none() => Ok(Self::Iid),
            "natural" if p.is_none() => Ok(Self::Natural),
            "dirichlet" => Ok(Self::Dirichlet(param(p, "α")?)),
            "zipf" => Ok(Self::Zipf(param(p, "s")?)),
            _ => Err(PartitionError::Unknown(s.into())),
        }
    }
}

/// As the flag writes it (`iid`, `dirichlet:0.3`, `zipf:1.2`, `natural`),
/// so a report names the partition as the command line gave it.
impl std::fmt::Display for Partitioner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Iid => f.write_str("iid"),
            Self::Dirichlet(a) => write!(f, "dirichlet:{a}"),
            Self::Zipf(s) => write!(f, "zipf:{s}"),
            Self::Natural => f.write_str("natural"),
        }
    }
}

impl Partitioner {
    /// Deals units `0..labels.len()` into `n` merchants; `groups` is the
    /// natural merchant column (one value per unit), if the data has one.
    pub fn deal(
        &self,
        labels: &[u32],
        groups: Option<&[String]>,
        n: usize,
        seed: u64,
    ) -> Result<Vec<Vec<usize>>, PartitionError> {
        let units = labels.len();
        if *self == Self::Natural {
            let groups = groups.ok_or(PartitionError::NoGroups)?;
            let names: std::collections::BTreeSet<&String> = groups.iter().collect();
            let names: Vec<&String> = names.into_iter().collect();
            let mut out = vec![Vec::new(); names.len()];
            for (u, g) in groups.iter().enumerate() {
                out[names.binary_search(&g).expect("collected above")].push(u);
            }
            return Ok(out);
        }
        if n == 0 || units < n {
            return Err(PartitionError::TooFewUnits {
                units,
                merchants: n,
            });
        }
        let mut rng = crate::seed::rng(seed, &["partition"]);
        let mut order: Vec<usize> = (0..units).collect();
        order.shuffle(&mut rng);
        let mut out = vec![Vec::new(); n];
        match *self {
            Self::Iid => {
                for (k, u) in order.into_iter().enumerate() {
                    out[k % n].push(u);
                }
            }
            Self::Zipf(s) => {
                let shares: Vec<f64> = (0..n).map(|k| 1.0 / ((k + 1) as f64).powf(s)).collect();
                let sizes = apportion(&shares, units);
                let mut it = order.into_iter();
                for (k, size) in sizes.into_iter().enumerate() {
                    out[k].extend(it.by_ref().take(size));
                }
            }
            Self::Dirichlet(alpha) => {
                let gamma = Gamma::new(alpha, 1.0).map_err(|e| {
                    PartitionError::BadParameter(format!("dirichlet:{alpha}"), e.to_string())
                })?;
                let max_label = labels.iter().copied().max().unwrap_or(0) as usize;
                let mut by_label = vec![Vec::new(); max_label + 1];
                for u in order {
                    by_label[labels[u] as usize].push(u);
                }
                for members in by_label {
                    let raw: Vec<f64> = (0..n).map(|_| gamma.sample(&mut rng)).collect();
                    // A tiny α makes every Gamma(α) draw underflow to (next
                    // to) zero, where adding the guard below made the shares
                    // equal: the most skewed split came out balanced. Those
                    // draws are redone in log space.
                    let draws: Vec<f64> = if raw.iter().all(|&g| g < 1e-9) {
                        log_space_shares(alpha, n, &mut rng)?
                    } else {
                        raw.into_iter().map(|g| g + 1e-12).collect()
                    };
                    let sizes = apportion(&draws, members.len());
                    let mut it = members.into_iter();
                    for (k, size) in sizes.into_iter().enumerate() {
                        out[k].extend(it.by_ref().take(size));
                    }
                }
                // Nobody may be empty: move one unit from the largest merchant.
                while let Some(empty) = out.iter().position(Vec::is_empty) {
                    let big = (0..n).max_by_key(|&k| out[k].len()).expect("n > 0");
                    let u = out[big].pop().expect("units >= n");
                    out[empty].push(u);
                }
            }
            Self::Natural => unreachable!("handled above"),
        }
        for part in &mut out {
            part.sort_unstable();
        }
        Ok(out)
    }
}

/// Dirichlet(α, …, α) shares of `n` parts for an α so small that Gamma(α)
/// draws underflow: `ln G = ln G' + ln(U) / α` with `G' ~ Gamma(α + 1)` and
/// `U` uniform (Marsaglia and Tsang's boost), normalised by the largest, so
/// the shares keep their ratios where `exp` of each log would be 0.
fn log_space_shares(
    alpha: f64,
    n: usize,
    rng: &mut impl rand::RngExt,
) -> Result<Vec<f64>, PartitionError> {
    let boosted = Gamma::new(alpha + 1.0, 1.0)
        .map_err(|e| PartitionError::BadParameter(format!("dirichlet:{alpha}"), e.to_string()))?;
    let logs: Vec<f64> = (0..n)
        .map(|_| {
            let u: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
            boosted.sample(rng).ln() + u.ln() / alpha
        })
        .collect();
    let top = logs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    Ok(logs.iter().map(|l| (l - top).exp()).collect())
}

/// Splits `total` into integer sizes proportional to `shares` (largest
/// remainder), giving every part at least one unit when `total >= parts`.
fn apportion(shares: &[f64], total: usize) -> Vec<usize> {
    let n = shares.len();
    let sum: f64 = shares.iter().sum();
    let floor_min = if total >= n { 1 } else { 0 };
    let spare = total - floor_min * n;
    let exact: Vec<f64> = shares.iter().map(|s| s / sum * spare as f64).collect();
    let mut sizes: Vec<usize> = exact.iter().map(|e| e.floor() as usize).collect();
    let mut left = spare - sizes.iter().sum::<usize>();
    let mut rema: Vec<(f64, usize)> = exact
        .iter()
        .enumerate()
        .map(|(k, e)| (e - e.floor(), k))
        .collect();
    rema.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    for (_, k) in rema {
        if left == 0 {
            break;
        }
        sizes[k] += 1;
        left -= 1;
    }
    sizes.iter().map(|s| s + floor_min).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_complete(parts: &[Vec<usize>], units: usize) {
        let mut all: Vec<usize> = parts.iter().flatten().copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..units).collect::<Vec<_>>());
        assert!(parts.iter().all(|p| !p.is_empty()));
    }

    #[test]
    fn names_parse_and_bad_ones_are_refused() {
        assert_eq!("iid".parse::<Partitioner>(), Ok(Partitioner::Iid));
        assert_eq!("dirichlet:0.5".parse(), Ok(Partitioner::Dirichlet(0.5)));
        assert_eq!("zipf:1.2".parse(), Ok(Partitioner::Zipf(1.2)));
        assert!("dirichlet".parse::<Partitioner>().is_err());
        assert!("zipf:-1".parse::<Partitioner>().is_err());
        assert!("shards".parse::<Partitioner>().is_err());
    }

    #[test]
    fn more_merchants_than_customers_is_refused_with_the_most_there_can_be() {
        let err = Partitioner::Iid
            .deal(&[0; 610], None, 700, 1)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("610 customers") && err.contains("at most 610 merchants"),
            "{err}"
        );
        assert!(Partitioner::Iid.deal(&[0; 610], None, 610, 1).is_ok());
    }

    #[test]
    fn iid_is_balanced_complete_and_seeded() {
        let labels = vec![0; 103];
        let p = Partitioner::Iid.deal(&labels, None, 10, 7).unwrap();
        check_complete(&p, 103);
        assert!(p.iter().all(|x| x.len() == 10 || x.len() == 11));
        assert_eq!(p, Partitioner::Iid.deal(&labels, None, 10, 7).unwrap());
        assert_ne!(p, Partitioner::Iid.deal(&labels, None, 10, 8).unwrap());
    }

    #[test]
    fn zipf_makes_a_few_large_and_many_small_merchants() {
        let labels = vec![0; 10_000];
        let p = Partitioner::Zipf(1.0).deal(&labels, None, 100, 1).unwrap();
        check_complete(&p, 10_000);
        // Harmonic shares: merchant 0 holds 1/H(100) ≈ 19 % of the data.
        assert!((1850..=1950).contains(&p[0].len()), "{}", p[0].len());
        assert!(p[0].len() > 40 * p[99].len());
    }

    #[test]
    fn small_alpha_dirichlet_concentrates_labels() {
        let labels: Vec<u32> = (0..4000).map(|u| (u % 4) as u32).collect();
        let purity = |alpha: f64| {
            let p = Partitioner::Dirichlet(alpha)
                .deal(&labels, None, 20, 3)
                .unwrap();
            check_complete(&p, 4000);
            let mut s = 0.0;
            for part in &p {
                let mut c = [0usize; 4];
                part.iter().for_each(|&u| c[labels[u] as usize] += 1);
                s += *c.iter().max().unwrap() as f64 / part.len() as f64;
            }
            s / p.len() as f64
        };
        let (skewed, mixed) = (purity(0.1), purity(100.0));
        assert!(skewed > 0.6 && mixed < 0.35, "{skewed} {mixed}");
    }

    #[test]
    fn a_tiny_alpha_is_the_most_skewed_split_not_a_balanced_one() {
        // Every Gamma(1e-4) draw underflows; the split used to come out
        // equal (200 units each).
        let labels: Vec<u32> = (0..4000).map(|u| (u % 4) as u32).collect();
        for alpha in [1e-4, 1e-9] {
            let p = Partitioner::Dirichlet(alpha)
                .deal(&labels, None, 20, 3)
                .unwrap();
            check_complete(&p, 4000);
            let mut sizes: Vec<usize> = p.iter().map(Vec::len).collect();
            sizes.sort_unstable();
            // Each label lands (all but the one unit every merchant keeps)
            // on one merchant.
            assert!(sizes[19] >= 950 && sizes[10] <= 8, "{alpha}: {sizes:?}");
        }
    }

    #[test]
    fn natural_uses_the_group_column_or_explains_its_absence() {
        let groups: Vec<String> = ["b", "a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let p = Partitioner::Natural
            .deal(&[0; 4], Some(&groups), 99, 0)
            .unwrap();
        assert_eq!(p, vec![vec![1], vec![0, 2], vec![3]]);
        assert_eq!(
            Partitioner::Natural.deal(&[0; 4], None, 2, 0),
            Err(PartitionError::NoGroups)
        );
    }
}
