//! `--task segments`: the simulator's side of federated segmentation.
//!
//! The whole pipeline — the statistics step, the candidate initialisation,
//! the choice of k by the federated inertia elbow and the Lloyd rounds — is
//! `ModelSpec::Segments` (`fedcart_common::model::segments`), run as
//! ordinary rounds of the engine by either transport, so `--transport grpc`
//! (with or without `--secagg`) replays the in-process run. After the run,
//! [`decode_final`] reads the chosen centres from the final state and
//! [`profile`] labels every merchant's customers with them and reports each
//! segment's size, mean recency, frequency and monetary value and churn
//! rate (the orders pipeline's labels).

use anyhow::Context;
use fedcart_common::data::standardize::Standardizer;
use fedcart_common::federation::aggregate::SumAccumulator;
use fedcart_common::model::kmeans;
use fedcart_common::model::segments::Segmentation;
use fedcart_common::task::ModelSpec;
use fedcart_common::train::LocalData;

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
        best_version: None,
    };
    let mut acc = SumAccumulator::new(2 * d, 0);
    for m in merchants {
        let out = model.stats(&ctx, &mut m.clone())?;
        if let Some(u) = out.update {
            acc.add(&u)?;
        }
    }
    let moments = acc.mean_delta(&Default::default());
    Ok(Standardizer::from_moments(&moments).with_rows(acc.total_weight()))
}

/// The chosen k, the feature width, the chosen centres and the report line
/// of the choice (when several k were tried) from a segmentation run's
/// final state. Fails, naming the phase, when the run ended before k was
/// chosen.
pub fn decode_final(
    spec: &ModelSpec,
    state: &[f32],
) -> anyhow::Result<(usize, usize, Vec<f32>, Option<String>)> {
    let ModelSpec::Segments {
        num_features, ks, ..
    } = spec
    else {
        anyhow::bail!("not a segmentation run: {}", spec.name());
    };
    let st = Segmentation::decode(state, *num_features, ks)?;
    let (k, centres) = st.chosen_centres().with_context(|| {
        format!(
            "the segmentation ended at {:?}, before k was chosen",
            st.phase
        )
    })?;
    let choice = (ks.len() > 1).then(|| {
        let curve: Vec<(usize, f64)> = ks
            .iter()
            .zip(&st.curve)
            .map(|(&k, &i)| (k, f64::from(i)))
            .collect();
        choice_report(k, &curve)
    });
    Ok((k, *num_features, centres.to_vec(), choice))
}

/// The report line of the federated choice of k.
pub fn choice_report(k: usize, curve: &[(usize, f64)]) -> String {
    let points: Vec<String> = curve
        .iter()
        .map(|(k, i)| format!("k={k}: {i:.0}"))
        .collect();
    let ks: Vec<usize> = curve.iter().map(|&(k, _)| k).collect();
    let all: Vec<f64> = curve.iter().map(|&(_, i)| i).collect();
    let fits = kmeans::improving_fits(&ks, &all);
    let failed: Vec<String> = ks
        .iter()
        .filter(|k| !fits.iter().any(|(kept, _)| kept == *k))
        .map(|k| format!("k = {k}"))
        .collect();
    let failed = if failed.is_empty() {
        String::new()
    } else {
        format!(
            "; left out of the choice: {} (the fit came out no better than a smaller k's, a poor \
             local optimum of k-means)",
            failed.join(", ")
        )
    };
    let inertias: Vec<f64> = fits.iter().map(|&(_, i)| i).collect();
    if kmeans::is_flat(&inertias) && inertias.len() >= 3 {
        let gain = 100.0 * (inertias[0] - inertias[inertias.len() - 1]) / inertias[0];
        return format!(
            "segments: k = {k}: the federated inertia curve is flat ({}; {gain:.2} % gained \
             from the first k to the last), so the features show no segments and the smallest k \
             is kept. Categorical columns of many values often cause it (each rare value, \
             standardised, dominates the distance): leave them out of the schema{failed}",
            points.join(", ")
        );
    }
    format!(
        "segments: k = {k}, the elbow of the federated inertia curve ({}){failed}",
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
    /// Means of the first (up to) three features: recency in days,
    /// purchase frequency and monetary value on an orders export, the
    /// first three columns on a customer table (which may have fewer).
    pub means: Vec<f64>,
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
    let shown = d.min(PROFILED);
    let mut p: Vec<SegmentProfile> = (0..k)
        .map(|segment| SegmentProfile {
            segment,
            means: vec![0.0; shown],
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
            for (m, v) in s.means.iter_mut().zip(row.iter()) {
                *m += f64::from(*v);
            }
            s.churn_rate += f64::from(*label);
            own.push(c);
        }
        labels.push(own);
    }
    for s in &mut p {
        let n = (s.size as f64).max(1.0);
        for m in &mut s.means {
            *m /= n;
        }
        s.churn_rate /= n;
    }
    Ok((p, inertia, labels))
}

/// Features whose means a profile shows (the first ones).
pub const PROFILED: usize = 3;

/// The headers of the profile's feature means: recency, frequency and
/// monetary value on an orders export (its first three features), and the
/// first (up to) three features' own names on a customer table (they were
/// labelled RFM whatever the columns were, and a table of two features
/// panicked).
pub fn profile_headers(names: &[String]) -> Vec<String> {
    let rfm =
        names.len() >= PROFILED && names[..PROFILED] == ["recency_days", "frequency", "monetary"];
    if rfm {
        ["recency (days)", "frequency", "monetary"]
            .map(String::from)
            .to_vec()
    } else {
        names
            .iter()
            .take(PROFILED)
            .map(|n| format!("mean {n}"))
            .collect()
    }
}

/// The report lines of a segmentation; `names` are the features' names.
pub fn report(profiles: &[SegmentProfile], inertia: f64, names: &[String]) -> Vec<String> {
    let headers = profile_headers(names);
    let cells = |cell: &str| vec![cell; headers.len()].join(" | ");
    let mut out = vec![
        format!("segments: pooled inertia {inertia:.2}"),
        format!(
            "| segment | customers | {} | churn rate |",
            headers.join(" | ")
        ),
        format!(
            "|---:|---:|{}|---:|",
            "---:|".repeat(headers.len()).trim_end_matches('|')
        ),
    ];
    let small = kmeans::MIN_CANDIDATE_SIZE as u64;
    for s in profiles {
        if s.size == 0 {
            // No customer is nearest this centre: there are no means.
            out.push(format!("| {} | 0 | {} | – |", s.segment, cells("–")));
            continue;
        }
        if s.size < small {
            // The means of so few customers are (nearly) their own rows.
            out.push(format!(
                "| {} | {} | {} | – |",
                s.segment,
                s.size,
                cells("–")
            ));
            continue;
        }
        // Recency (days) to one decimal, the other means to two.
        let means: Vec<String> = s
            .means
            .iter()
            .enumerate()
            .map(|(j, m)| {
                if j == 0 {
                    format!("{m:.1}")
                } else {
                    format!("{m:.2}")
                }
            })
            .collect();
        out.push(format!(
            "| {} | {} | {} | {:.3} |",
            s.segment,
            s.size,
            means.join(" | "),
            s.churn_rate
        ));
    }
    if profiles.iter().any(|s| s.size > 0 && s.size < small) {
        out.push(format!(
            "(a segment of fewer than {small} customers shows no means: they would be those \
             customers' own figures)"
        ));
    }
    let empty = profiles.iter().filter(|s| s.size == 0).count();
    if empty > 0 {
        out.push(format!(
            "({empty} of the {} segments hold no customer: the data has fewer distinct customer \
             profiles than k; give a smaller --k)",
            profiles.len()
        ));
    }
    out
}

#[cfg(test)]
mod tests;
