//! `--task segments`: the simulator's side of federated k-means
//! (`fedcart_common::model::kmeans`).
//!
//! Before the engine runs, [`with_init`] plays the initialisation exchange
//! in-process: the merchants' statistics are summed into the standardiser
//! (the same sums as the engine's statistics step), each merchant proposes
//! candidate centres from its own local k-means++ ([`kmeans::local_candidates`]),
//! and the coordinator's [`kmeans::centres_from_candidates`] turns them into the
//! k first centres, carried by the task's `ModelSpec::KMeans { init }`. The
//! Lloyd rounds are then ordinary training rounds of either transport. After
//! the run, [`profile`] labels every merchant's customers with the final
//! centres and reports each segment's size, mean recency, frequency and
//! monetary value and churn rate (the orders pipeline's labels).

use anyhow::Context;
use fedcart_common::data::standardize::Standardizer;
use fedcart_common::federation::aggregate::SumAccumulator;
use fedcart_common::model::kmeans;
use fedcart_common::task::ModelSpec;
use fedcart_common::train::LocalData;

/// Local candidates per merchant and segment: a merchant proposes
/// `CANDIDATES_PER_SEGMENT · k` local cluster means.
const CANDIDATES_PER_SEGMENT: usize = 3;
/// Seeds of the coordinator's clustering of the candidates (as
/// scikit-learn's `n_init = 10`).
const INIT_SEEDS: usize = 10;

/// The federation's standardiser from every merchant's summed feature sums.
pub fn standardizer(merchants: &[LocalData], d: usize) -> anyhow::Result<Standardizer> {
    let km = ModelSpec::KMeans {
        k: 1,
        num_features: d,
        init: Vec::new(),
    };
    let model = km.model();
    let ctx_sgd = fedcart_common::model::sgd::SgdParams::default();
    let ctx = fedcart_common::model::RoundContext {
        sgd: &ctx_sgd,
        seed: 0,
        round: 0,
        standardizer: None,
    };
    let mut acc = SumAccumulator::new(2 * d, 0);
    for m in merchants {
        let out = model.stats(&ctx, &mut m.clone())?;
        if let Some(u) = out.update {
            acc.add(&u)?;
        }
    }
    let moments = acc.mean_delta(&Default::default());
    Ok(Standardizer::from_moments(&moments))
}

/// The model with its first centres agreed from the merchants' candidates.
pub fn with_init(
    model: ModelSpec,
    merchants: &[LocalData],
    seed: u64,
) -> anyhow::Result<ModelSpec> {
    let ModelSpec::KMeans {
        k, num_features, ..
    } = model
    else {
        return Ok(model);
    };
    let scaler = standardizer(merchants, num_features)?;
    let mut candidates = Vec::new();
    let mut sizes = Vec::new();
    for m in merchants {
        let x = kmeans::standardised_rows(m, num_features, &scaler)
            .with_context(|| format!("merchant {}", m.merchant_id))?;
        let mut rng = fedcart_common::seed::rng(seed, &["kmeans-candidates", &m.merchant_id]);
        let (c, s) = kmeans::local_candidates(&x, CANDIDATES_PER_SEGMENT * k, &mut rng);
        candidates.extend(c);
        sizes.extend(s);
    }
    let mut rng = fedcart_common::seed::rng(seed, &["kmeans-init"]);
    let init =
        kmeans::centres_from_candidates(&candidates, &sizes, num_features, k, INIT_SEEDS, &mut rng);
    Ok(ModelSpec::KMeans {
        k,
        num_features,
        init,
    })
}

/// The k tried by `--task segments` without `:K`.
pub const K_CANDIDATES: std::ops::RangeInclusive<usize> = 2..=8;
/// Lloyd rounds run for each candidate k before its inertia is compared.
const CHOOSE_ROUNDS: usize = 10;

/// The federated choice of k: for each k of [`K_CANDIDATES`], the first
/// centres agreed from the merchants' candidates ([`with_init`]), then
/// [`CHOOSE_ROUNDS`] Lloyd rounds, each the sum of the merchants'
/// per-cluster sums and counts, then the inertia as the sum of each
/// merchant's local inertia; k is the elbow of that curve
/// ([`kmeans::elbow`]). Only sums leave a merchant, as in the rounds
/// proper; the simulator adds them in-process (plaintext) before the
/// experiment runs with the chosen k on either transport. Returns k and the
/// curve.
pub fn choose_k(
    merchants: &[LocalData],
    d: usize,
    seed: u64,
) -> anyhow::Result<(usize, Vec<(usize, f64)>)> {
    let scaler = standardizer(merchants, d)?;
    let xs = merchants
        .iter()
        .map(|m| {
            kmeans::standardised_rows(m, d, &scaler)
                .with_context(|| format!("merchant {}", m.merchant_id))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut curve = Vec::new();
    for k in K_CANDIDATES {
        let start = ModelSpec::KMeans {
            k,
            num_features: d,
            init: Vec::new(),
        };
        let ModelSpec::KMeans { init, .. } = with_init(start, merchants, seed)? else {
            unreachable!("with_init keeps the family");
        };
        let mut centres = init;
        for _ in 0..CHOOSE_ROUNDS {
            let mut sums = vec![0.0f64; k * d];
            let mut counts = vec![0u64; k];
            for x in &xs {
                let step = kmeans::lloyd_step(x, &centres, k);
                for (s, v) in sums.iter_mut().zip(&step.sums) {
                    *s += v;
                }
                for (c, v) in counts.iter_mut().zip(&step.counts) {
                    *c += v;
                }
            }
            for c in 0..k {
                if counts[c] > 0 {
                    for j in 0..d {
                        centres[c * d + j] = (sums[c * d + j] / counts[c] as f64) as f32;
                    }
                }
            }
        }
        let inertia: f64 = xs.iter().map(|x| kmeans::inertia(x, &centres, k)).sum();
        curve.push((k, inertia));
    }
    let (ks, inertias): (Vec<usize>, Vec<f64>) = curve.iter().copied().unzip();
    Ok((kmeans::elbow(&ks, &inertias), curve))
}

/// The report line of [`choose_k`]'s choice.
pub fn choice_report(k: usize, curve: &[(usize, f64)]) -> String {
    let points: Vec<String> = curve
        .iter()
        .map(|(k, i)| format!("k={k}: {i:.0}"))
        .collect();
    format!(
        "segments: k = {k}, the elbow of the federated inertia curve ({})",
        points.join(", ")
    )
}

/// One segment's profile.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SegmentProfile {
    /// Segment index.
    pub segment: usize,
    /// Customers across the federation.
    pub size: u64,
    /// Mean recency in days.
    pub recency_days: f64,
    /// Mean purchase frequency.
    pub frequency: f64,
    /// Mean monetary value.
    pub monetary: f64,
    /// Share of the segment's customers labelled churned.
    pub churn_rate: f64,
}

/// Labels every merchant's customers with `centres` and profiles the
/// segments (sums of each merchant's local per-segment sums) and the pooled
/// inertia; returns the profiles, the inertia and each merchant's labels.
pub fn profile(
    merchants: &[LocalData],
    centres: &[f32],
    k: usize,
    d: usize,
) -> anyhow::Result<(Vec<SegmentProfile>, f64, Vec<Vec<usize>>)> {
    let scaler = standardizer(merchants, d)?;
    let mut p: Vec<SegmentProfile> = (0..k)
        .map(|segment| SegmentProfile {
            segment,
            ..Default::default()
        })
        .collect();
    let mut inertia = 0.0;
    let mut labels = Vec::new();
    for m in merchants {
        let churn = m.churn.as_ref().context("segments need RFM features")?;
        let x = kmeans::standardised_rows(m, d, &scaler)?;
        let raw: Vec<_> = churn
            .train
            .x
            .rows()
            .into_iter()
            .chain(churn.valid.x.rows())
            .collect();
        let y: Vec<f32> = churn
            .train
            .y
            .iter()
            .chain(churn.valid.y.iter())
            .copied()
            .collect();
        let mut own = Vec::with_capacity(raw.len());
        for ((c, dist), (row, label)) in kmeans::assign(&x, centres, k)
            .into_iter()
            .zip(raw.iter().zip(&y))
        {
            inertia += dist;
            let s = &mut p[c];
            s.size += 1;
            s.recency_days += f64::from(row[0]);
            s.frequency += f64::from(row[1]);
            s.monetary += f64::from(row[2]);
            s.churn_rate += f64::from(*label);
            own.push(c);
        }
        labels.push(own);
    }
    for s in &mut p {
        let n = (s.size as f64).max(1.0);
        s.recency_days /= n;
        s.frequency /= n;
        s.monetary /= n;
        s.churn_rate /= n;
    }
    Ok((p, inertia, labels))
}

/// The report lines of a segmentation.
pub fn report(profiles: &[SegmentProfile], inertia: f64) -> Vec<String> {
    let mut out = vec![
        format!("segments: pooled inertia {inertia:.2}"),
        "| segment | customers | recency (days) | frequency | monetary | churn rate |".into(),
        "|---:|---:|---:|---:|---:|---:|".into(),
    ];
    for s in profiles {
        out.push(format!(
            "| {} | {} | {:.1} | {:.2} | {:.2} | {:.3} |",
            s.segment, s.size, s.recency_days, s.frequency, s.monetary, s.churn_rate
        ));
    }
    out
}

#[cfg(test)]
mod tests;
