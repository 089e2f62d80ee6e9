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
    /// Means of every feature, in the data's column order (the profile
    /// table shows [`shown_features`] of them).
    pub means: Vec<f64>,
    /// Share of the segment's customers labelled churned.
    pub churn_rate: f64,
}

/// What [`profile`] finds: each segment's profile, the pooled inertia,
/// each merchant's labels (training rows then held-out rows) and, per
/// feature, the share of its variance that lies between the segments.
#[derive(Debug, Clone)]
pub struct Profiles {
    /// Each segment's size, feature means and churn rate.
    pub segments: Vec<SegmentProfile>,
    /// Sum over every customer of the squared standardised distance to
    /// its segment's centre.
    pub inertia: f64,
    /// Each merchant's customers' segments.
    pub labels: Vec<Vec<usize>>,
    /// Per feature, the between-segment share of its variance (η², 0 for
    /// a feature that does not vary): 1 when the segments are exactly
    /// that feature's values, as when k-means splits by a one-hot column.
    pub separation: Vec<f64>,
}

/// Labels every merchant's customers with `centres` and profiles the
/// segments (sums of each merchant's local per-segment sums), the pooled
/// inertia and how much of each feature's variance the segments separate.
pub fn profile(
    merchants: &[LocalData],
    centres: &[f32],
    k: usize,
    d: usize,
) -> anyhow::Result<Profiles> {
    let scaler = standardizer(merchants, d)?;
    let mut p: Vec<SegmentProfile> = (0..k)
        .map(|segment| SegmentProfile {
            segment,
            means: vec![0.0; d],
            ..Default::default()
        })
        .collect();
    // Each feature's sum and sum of squares over every customer, for the
    // separation (the raw values; the share is the same standardised).
    let mut total = vec![(0.0f64, 0.0f64); d];
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
            for ((m, t), v) in s.means.iter_mut().zip(&mut total).zip(row.iter()) {
                let v = f64::from(*v);
                *m += v;
                t.0 += v;
                t.1 += v * v;
            }
            s.churn_rate += f64::from(*label);
            own.push(c);
        }
        labels.push(own);
    }
    let n: u64 = p.iter().map(|s| s.size).sum();
    let n_all = (n as f64).max(1.0);
    // η² = between-segment sum of squares / total sum of squares, both from
    // sums (f64: the features are bounded by the pipelines' ±1e15 checks).
    let separation = total
        .iter()
        .enumerate()
        .map(|(j, &(sum, squares))| {
            let mean = sum / n_all;
            let total_ss = squares - n_all * mean * mean;
            let between: f64 = p
                .iter()
                .filter(|s| s.size > 0)
                .map(|s| {
                    let m = s.means[j] / s.size as f64;
                    s.size as f64 * (m - mean) * (m - mean)
                })
                .sum();
            if total_ss > 1e-12 * squares.max(1.0) {
                (between / total_ss).clamp(0.0, 1.0)
            } else {
                0.0
            }
        })
        .collect();
    for s in &mut p {
        let n = (s.size as f64).max(1.0);
        for m in &mut s.means {
            *m /= n;
        }
        s.churn_rate /= n;
    }
    Ok(Profiles {
        segments: p,
        inertia,
        labels,
        separation,
    })
}

/// Features whose means a profile shows.
pub const PROFILED: usize = 3;

/// The orders pipeline's first three features, which its profile always
/// shows.
const RFM: [&str; 3] = ["recency_days", "frequency", "monetary"];

/// Up to `count` features that separate the segments most, most separating
/// first: in order of [`Profiles::separation`], skipping a feature whose
/// segment means move with one already taken (cosine of the size-weighted,
/// standardised deviations of the segment means above 0.95: the one-hot
/// columns that all mean "no internet service" on a telecom table say one
/// thing), then filling up with the skipped ones. Features that do not
/// vary are never taken.
pub fn most_separating(p: &Profiles, count: usize) -> Vec<usize> {
    let d = p.separation.len();
    let mut order: Vec<usize> = (0..d).filter(|&j| p.separation[j] > 0.0).collect();
    order.sort_by(|&a, &b| p.separation[b].total_cmp(&p.separation[a]).then(a.cmp(&b)));
    let n: f64 = p.segments.iter().map(|s| s.size as f64).sum();
    // Each feature's deviations of its segment means from its mean,
    // weighted by √size and scaled to unit length.
    let direction = |j: usize| -> Vec<f64> {
        let mean = p
            .segments
            .iter()
            .map(|s| s.size as f64 * s.means[j])
            .sum::<f64>()
            / n.max(1.0);
        let v: Vec<f64> = p
            .segments
            .iter()
            .map(|s| (s.size as f64).sqrt() * (s.means[j] - mean))
            .collect();
        let norm = v
            .iter()
            .map(|x| x * x)
            .sum::<f64>()
            .sqrt()
            .max(f64::MIN_POSITIVE);
        v.into_iter().map(|x| x / norm).collect()
    };
    let mut taken: Vec<(usize, Vec<f64>)> = Vec::new();
    let mut skipped = Vec::new();
    for j in order {
        if taken.len() == count {
            break;
        }
        let v = direction(j);
        let alike = taken
            .iter()
            .any(|(_, w)| v.iter().zip(w).map(|(a, b)| a * b).sum::<f64>().abs() > 0.95);
        if alike {
            skipped.push(j);
        } else {
            taken.push((j, v));
        }
    }
    let mut out: Vec<usize> = taken.into_iter().map(|(j, _)| j).collect();
    out.extend(skipped.into_iter().take(count.saturating_sub(out.len())));
    out
}

/// The features (column indices, in column order) whose means the profile
/// table shows: recency, frequency and monetary value on an orders export;
/// on a customer table the (up to) [`PROFILED`] features of
/// [`most_separating`], or the first columns when none varies. A table's
/// first three columns were shown whatever split the segments, which hid a
/// segmentation by a categorical column (found by a data probe).
pub fn shown_features(names: &[String], p: &Profiles) -> Vec<usize> {
    if names.len() >= PROFILED && names[..PROFILED] == RFM {
        return (0..PROFILED).collect();
    }
    let mut shown = most_separating(p, PROFILED);
    if shown.is_empty() {
        shown = (0..names.len().min(PROFILED)).collect();
    }
    shown.sort_unstable();
    shown
}

/// The headers of the profile's feature means for the features `shown`:
/// RFM's own words on an orders export, `mean <name>` on a customer table.
pub fn profile_headers(names: &[String], shown: &[usize]) -> Vec<String> {
    let rfm = names.len() >= PROFILED && names[..PROFILED] == RFM;
    shown
        .iter()
        .map(|&j| match names[j].as_str() {
            "recency_days" if rfm => "recency (days)".to_string(),
            n @ ("frequency" | "monetary") if rfm => n.to_string(),
            n => format!("mean {n}"),
        })
        .collect()
}

/// The line naming the features that separate the segments most, with the
/// share of each one's variance between segments: the profile table shows
/// only [`PROFILED`] means, and on an orders export always RFM's.
fn separation_line(names: &[String], p: &Profiles) -> Option<String> {
    let top: Vec<String> = most_separating(p, PROFILED)
        .into_iter()
        .map(|j| format!("`{}` {:.2}", names[j], p.separation[j]))
        .collect();
    (!top.is_empty()).then(|| {
        format!(
            "features that separate the segments most (share of each one's variance between \
             segments): {}; segments.csv (--out) holds every feature",
            top.join(", ")
        )
    })
}

/// The report lines of a segmentation; `names` are the features' names.
pub fn report(p: &Profiles, names: &[String]) -> Vec<String> {
    let (profiles, inertia) = (&p.segments, p.inertia);
    let shown = shown_features(names, p);
    let headers = profile_headers(names, &shown);
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
        let means: Vec<String> = shown
            .iter()
            .map(|&j| {
                let m = s.means[j];
                if names[j] == "recency_days" {
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
    out.extend(separation_line(names, p));
    out
}

#[cfg(test)]
mod tests;
