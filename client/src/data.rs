//! Loads the merchant's files into `LocalData`, splitting held-out rows off
//! locally with a seeded split (they never leave the agent either).

use anyhow::Context;
use fedcart_common::split;
use fedcart_common::tabular::Schema;
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
    Ok(data)
}
