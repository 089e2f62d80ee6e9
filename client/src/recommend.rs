//! Offline recommendations and churn scores from the agent's local state:
//! the latest global model the agent received plus its private user factors.
//! Nothing here talks to the coordinator.

use std::path::{Path, PathBuf};

use fedcart_common::data::catalogue::Catalogue;
use fedcart_common::data::tabular::{self, Schema};
use fedcart_common::model::lr::LogisticRegression;
use fedcart_common::model::mf::{MfData, blend, item_offsets, local_popularity};

use crate::state::{StateDir, StateError};

/// Why no recommendation or score could be computed.
#[derive(Debug, thiserror::Error)]
pub enum RecommendError {
    /// No MF model is stored yet.
    #[error("no recommender model yet: the agent has not taken part in an MF round")]
    NoRecommender,
    /// The stored `mf` model's spec is not a matrix-factorisation spec.
    #[error("stored `mf` model has an unexpected spec")]
    UnexpectedSpec,
    /// The stored model and the local catalogue disagree on the item count.
    #[error("the model has {model} items but the catalogue {catalogue}")]
    CatalogueMismatch {
        /// Items in the model.
        model: usize,
        /// Items in the catalogue.
        catalogue: usize,
    },
    /// The private user factors were never saved.
    #[error("no private user factors stored")]
    NoUserFactors,
    /// The customer is not in the ratings file.
    #[error("unknown customer `{0}`")]
    UnknownCustomer(String),
    /// The customer has no factors of the model's width.
    #[error("customer `{customer}` has no trained factors (k = {factors})")]
    Untrained {
        /// The customer.
        customer: String,
        /// The model's factor count.
        factors: usize,
    },
    /// No churn model is stored yet.
    #[error("no churn model yet: the agent has not taken part in a churn round")]
    NoChurnModel,
    /// The stored churn model has no standardiser.
    #[error("the stored churn model came without feature statistics")]
    NoFeatureStats,
    /// The customers' CSV could not be read.
    #[error("loading {}", path.display())]
    Load {
        /// The file.
        path: PathBuf,
        /// The reader's error (file, line, column).
        #[source]
        source: tabular::DataError,
    },
    /// The stored churn model does not fit the CSV's features.
    #[error("model has {params} parameters, data {features} features")]
    Shape {
        /// Parameters of the stored model.
        params: usize,
        /// Features per row in the CSV.
        features: usize,
    },
    /// The scores could not be written.
    #[error("writing {}", path.display())]
    Write {
        /// The output file.
        path: PathBuf,
        /// The writer's error.
        #[source]
        source: csv::Error,
    },
    /// The local state could not be read.
    #[error(transparent)]
    State(#[from] StateError),
}

/// One recommended item.
#[derive(Debug, Clone, PartialEq)]
pub struct Recommendation {
    /// Catalogue item id.
    pub item: String,
    /// Predicted score (rating for explicit MF, preference for BPR).
    pub score: f32,
}

/// How a list of recommendations is built.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RecommendOptions {
    /// How many items.
    pub k: usize,
    /// Keep items the customer already bought (excluded by default).
    pub include_repeats: bool,
    /// Repeat-aware list: blend the customer's own frequent items into the
    /// model's ranking with this weight in `[0, 1]` (standardised scores,
    /// `(1 − w)·model + w·log(1 + times bought)`); implies repeats. `None`
    /// ranks by the model alone.
    pub repeat_weight: Option<f32>,
}

impl RecommendOptions {
    /// Top `k` unbought items by the model.
    pub fn top(k: usize) -> Self {
        Self {
            k,
            include_repeats: false,
            repeat_weight: None,
        }
    }
}

/// Top `k` items for `customer`, skipping items the customer already bought
/// or rated: [`recommend_with`] with [`RecommendOptions::top`].
pub fn recommend(
    state: &StateDir,
    mf: &MfData,
    catalogue: &Catalogue,
    customer: &str,
    k: usize,
) -> Result<Vec<Recommendation>, RecommendError> {
    recommend_with(state, mf, catalogue, customer, &RecommendOptions::top(k))
}

/// Recommendations for `customer` from the stored global model and the
/// private user factors. Explicit MF ranks by the predicted rating
/// `μ + b_i + b_u + p_u·q_i`; implicit MF by the standardised `b_i + p_u·q_i`
/// blended with the merchant's own item popularity at the weight its last
/// validation chose (`UserState::pop_blend`), exactly the ranking its
/// evaluation measured. With `repeat_weight` the customer's own purchase
/// counts are blended in too. Shared by `fedcart-client recommend` and any
/// other front end (HTTP serving).
pub fn recommend_with(
    state: &StateDir,
    mf: &MfData,
    catalogue: &Catalogue,
    customer: &str,
    opts: &RecommendOptions,
) -> Result<Vec<Recommendation>, RecommendError> {
    let Some((meta, global)) = state.load_global("mf")? else {
        return Err(RecommendError::NoRecommender);
    };
    let (num_items, factors, implicit) = match meta.spec.model.mf_shape() {
        Some(shape) => (shape.num_items, shape.k, shape.implicit),
        None => return Err(RecommendError::UnexpectedSpec),
    };
    if num_items != catalogue.len() {
        return Err(RecommendError::CatalogueMismatch {
            model: num_items,
            catalogue: catalogue.len(),
        });
    }
    let users = state.load_users()?.ok_or(RecommendError::NoUserFactors)?;
    let u = mf
        .users
        .iter()
        .position(|c| c == customer)
        .ok_or_else(|| RecommendError::UnknownCustomer(customer.to_owned()))?;
    if users.k != factors || (u + 1) * factors > users.factors.len() {
        return Err(RecommendError::Untrained {
            customer: customer.to_owned(),
            factors,
        });
    }
    let pu = &users.factors[u * factors..(u + 1) * factors];
    let bu = users.bias.get(u).copied().unwrap_or(0.0);
    let mut times = vec![0.0f32; num_items];
    for r in mf.train.iter().chain(&mf.valid).chain(&mf.test) {
        if r.user as usize == u && (r.item as usize) < num_items {
            times[r.item as usize] += 1.0;
        }
    }
    let mut scores: Vec<f32> = (0..num_items)
        .map(|i| {
            let (b, q) = item_offsets(num_items, factors, i);
            let dot: f32 = pu
                .iter()
                .zip(&global[q..q + factors])
                .map(|(a, b)| a * b)
                .sum();
            if implicit {
                global[b] + dot
            } else {
                global[0] + global[b] + bu + dot
            }
        })
        .collect();
    if implicit {
        let pop = local_popularity(mf, num_items);
        let model = standardised(&scores);
        blend(&model, &pop, users.pop_blend, &mut scores);
    }
    if let Some(w) = opts.repeat_weight {
        let model = standardised(&scores);
        let own: Vec<f32> = standardised(&times.iter().map(|t| t.ln_1p()).collect::<Vec<_>>());
        blend(&model, &own, w.clamp(0.0, 1.0), &mut scores);
    }
    let keep_repeats = opts.include_repeats || opts.repeat_weight.is_some();
    let mut scored: Vec<(u32, f32)> = scores
        .into_iter()
        .enumerate()
        .filter(|&(i, s)| s.is_finite() && (keep_repeats || times[i] == 0.0))
        .map(|(i, s)| (i as u32, s))
        .collect();
    scored.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    scored.truncate(opts.k);
    Ok(scored
        .into_iter()
        .map(|(i, score)| Recommendation {
            item: catalogue.id(i).expect("index within catalogue").to_owned(),
            score,
        })
        .collect())
}

/// `v` shifted and scaled to mean 0 and standard deviation 1.
fn standardised(v: &[f32]) -> Vec<f32> {
    let n = v.len().max(1) as f64;
    let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
    let var = v
        .iter()
        .map(|&x| (f64::from(x) - mean).powi(2))
        .sum::<f64>()
        / n;
    let sd = if var > 0.0 { var.sqrt() } else { 1.0 };
    v.iter()
        .map(|&x| ((f64::from(x) - mean) / sd) as f32)
        .collect()
}

/// Churn probability of every customer in `csv` from the latest global churn
/// model; writes `customer_id,churn_probability` to `out`. Returns the rows written.
pub fn score(
    state: &StateDir,
    csv: &Path,
    schema: &Schema,
    out: &Path,
) -> Result<usize, RecommendError> {
    let Some((meta, params)) = state.load_global("churn")? else {
        return Err(RecommendError::NoChurnModel);
    };
    let scaler = meta
        .spec
        .standardizer
        .ok_or(RecommendError::NoFeatureStats)?;
    let ds = schema
        .load_csv(csv)
        .map_err(|source| RecommendError::Load {
            path: csv.to_owned(),
            source,
        })?;
    if params.len() != ds.x.ncols() + 1 {
        return Err(RecommendError::Shape {
            params: params.len(),
            features: ds.x.ncols(),
        });
    }
    let p = LogisticRegression::from_params(&params).predict_proba(&scaler.transform(&ds.x));
    let write = |source| RecommendError::Write {
        path: out.to_owned(),
        source,
    };
    let mut w = csv::Writer::from_path(out).map_err(write)?;
    w.write_record(["customer_id", "churn_probability"])
        .map_err(write)?;
    for (id, p) in ds.ids.iter().zip(&p) {
        w.write_record([id.as_str(), &format!("{p:.6}")])
            .map_err(write)?;
    }
    w.flush().map_err(|e| write(e.into()))?;
    Ok(ds.ids.len())
}
