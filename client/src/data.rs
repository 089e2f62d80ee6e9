//! Loads the merchant's files into `LocalData`, splitting held-out rows off
//! locally with a seeded split (they never leave the agent either).

use anyhow::Context;
use fedcart_common::data::catalogue::Catalogue;
use fedcart_common::data::tabular::Schema;
use fedcart_common::data::{movielens, split};
use fedcart_common::model::mf::MfData;
use fedcart_common::train::{ChurnData, LocalData};

use crate::config::AgentConfig;

/// Reads every dataset named in the configuration.
pub fn load(cfg: &AgentConfig) -> anyhow::Result<LocalData> {
    let mut data = LocalData {
        merchant_id: cfg.merchant_id.clone(),
        ..Default::default()
    };
    if let Some(path) = &cfg.data.churn_csv {
        let schema = cfg.data.schema.clone().unwrap_or_else(Schema::telco);
        let ds = schema
            .load_csv(path)
            .with_context(|| format!("loading churn data {}", path.display()))?;
        let labels = ds.y.as_slice().context("labels are contiguous")?.to_vec();
        let (train, valid) =
            split::stratified_train_test(&labels, cfg.data.holdout, cfg.data.split_seed);
        data.churn = Some(ChurnData {
            train: ds.select(&train),
            valid: ds.select(&valid),
        });
    }
    if let Some(path) = &cfg.data.ratings_csv {
        data.mf = Some(load_mf(path, cfg)?);
    }
    Ok(data)
}

/// The merchant's ratings mapped through the shared catalogue, with a seeded
/// local hold-out.
pub fn load_mf(path: &std::path::Path, cfg: &AgentConfig) -> anyhow::Result<MfData> {
    let cat_path = cfg
        .data
        .catalogue
        .as_ref()
        .context("`data.ratings_csv` needs `data.catalogue`")?;
    let catalogue = catalogue(cat_path)?;
    let rows = movielens::load_ratings(path)
        .with_context(|| format!("loading ratings {}", path.display()))?;
    let (train, test) = movielens::random_split(&rows, cfg.data.holdout, cfg.data.split_seed);
    Ok(MfData::new(&train, &test, &catalogue))
}

/// Reads the shared catalogue.
pub fn catalogue(path: &std::path::Path) -> anyhow::Result<Catalogue> {
    Catalogue::load(path).with_context(|| format!("loading catalogue {}", path.display()))
}
