//! Offline recommendations and churn scores from the agent's local state:
//! the latest global model the agent received plus its private user factors.
//! Nothing here talks to the coordinator.

use std::collections::HashSet;
use std::path::Path;

use anyhow::{Context, bail};
use fedcart_common::data::catalogue::Catalogue;
use fedcart_common::data::tabular::Schema;
use fedcart_common::model::lr::LogisticRegression;
use fedcart_common::model::mf::{MfData, item_offsets};
use fedcart_common::task::ModelSpec;

use crate::state::StateDir;

/// One recommended item.
#[derive(Debug, Clone, PartialEq)]
pub struct Recommendation {
    /// Catalogue item id.
    pub item: String,
    /// Predicted score (rating for explicit MF, preference for BPR).
    pub score: f32,
}

/// Top `k` items for `customer`: μ + b_i + b_u + p_u·q_i over the catalogue,
/// skipping items the customer already bought or rated (in `mf`).
pub fn recommend(
    state: &StateDir,
    mf: &MfData,
    catalogue: &Catalogue,
    customer: &str,
    k: usize,
) -> anyhow::Result<Vec<Recommendation>> {
    let Some((meta, global)) = state.load_global("mf")? else {
        bail!("no recommender model yet: the agent has not taken part in an MF round");
    };
    let (num_items, factors) = match meta.spec.model {
        ModelSpec::Mf {
            num_items, factors, ..
        }
        | ModelSpec::MfImplicit {
            num_items, factors, ..
        } => (num_items, factors),
        _ => bail!("stored `mf` model has an unexpected spec"),
    };
    if num_items != catalogue.len() {
        bail!(
            "the model has {num_items} items but the catalogue {}",
            catalogue.len()
        );
    }
    let users = state
        .load_users()?
        .context("no private user factors stored")?;
    let u = mf
        .users
        .iter()
        .position(|c| c == customer)
        .with_context(|| format!("unknown customer `{customer}`"))?;
    if users.k != factors || (u + 1) * factors > users.factors.len() {
        bail!("customer `{customer}` has no trained factors (k = {factors})");
    }
    let pu = &users.factors[u * factors..(u + 1) * factors];
    let bu = users.bias[u];
    let bought: HashSet<u32> = mf
        .train
        .iter()
        .chain(&mf.test)
        .filter(|r| r.user as usize == u)
        .map(|r| r.item)
        .collect();
    let mut scored: Vec<(u32, f32)> = (0..num_items as u32)
        .filter(|i| !bought.contains(i))
        .map(|i| {
            let (b, q) = item_offsets(num_items, factors, i as usize);
            let dot: f32 = pu
                .iter()
                .zip(&global[q..q + factors])
                .map(|(a, b)| a * b)
                .sum();
            (i, global[0] + global[b] + bu + dot)
        })
        .filter(|(_, s)| s.is_finite())
        .collect();
    scored.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    scored.truncate(k);
    Ok(scored
        .into_iter()
        .map(|(i, score)| Recommendation {
            item: catalogue.id(i).expect("index within catalogue").to_owned(),
            score,
        })
        .collect())
}

/// Churn probability of every customer in `csv` from the latest global churn
/// model; writes `customer_id,churn_probability` to `out`. Returns the rows written.
pub fn score(state: &StateDir, csv: &Path, schema: &Schema, out: &Path) -> anyhow::Result<usize> {
    let Some((meta, params)) = state.load_global("churn")? else {
        bail!("no churn model yet: the agent has not taken part in a churn round");
    };
    let scaler = meta
        .spec
        .standardizer
        .context("the stored churn model came without feature statistics")?;
    let ds = schema
        .load_csv(csv)
        .with_context(|| format!("loading {}", csv.display()))?;
    if params.len() != ds.x.ncols() + 1 {
        bail!(
            "model has {} parameters, data {} features",
            params.len(),
            ds.x.ncols()
        );
    }
    let p = LogisticRegression::from_params(&params).predict_proba(&scaler.transform(&ds.x));
    let mut w =
        csv::Writer::from_path(out).with_context(|| format!("writing {}", out.display()))?;
    w.write_record(["customer_id", "churn_probability"])?;
    for (id, p) in ds.ids.iter().zip(&p) {
        w.write_record([id.as_str(), &format!("{p:.6}")])?;
    }
    w.flush()?;
    Ok(ds.ids.len())
}
