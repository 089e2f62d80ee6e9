//! `fedcart-client segments`: labels the merchant's own customers with the
//! federation's k-means segments (`fedcart_common::model::kmeans`), offline
//! from the local state: the last global centres and the federation's
//! feature statistics the agent received with them. Nothing leaves the
//! machine.

use std::path::{Path, PathBuf};

use fedcart_common::data::tabular::TabularDataset;
use fedcart_common::model::kmeans;
use fedcart_common::model::segments::Segmentation;
use fedcart_common::task::ModelSpec;
use thiserror::Error;

use crate::data::CustomerTable;
use crate::state::{StateDir, StateError};

/// Why the customers could not be labelled.
#[derive(Debug, Error)]
pub enum SegmentsError {
    /// No k-means model in the local state.
    #[error(
        "no segmentation yet: the agent has not taken part in a segments (k-means) round; run the \
         agent (`fedcart-client run`) while the coordinator runs a segments run"
    )]
    NoModel,
    /// The stored model came without the federation's feature statistics.
    #[error("the stored segmentation came without feature statistics")]
    NoFeatureStats,
    /// The stored segmentation state does not decode (another run's k or
    /// feature width, or a damaged file).
    #[error("the stored segmentation state does not decode: {0}")]
    BadState(fedcart_common::model::TrainError),
    /// The stored model does not match the local features.
    #[error("the segmentation has {params} values, not k · {features}")]
    Shape {
        /// Stored centre values.
        params: usize,
        /// Local feature width.
        features: usize,
    },
    /// The customer table could not be read (the error names the file,
    /// line and column).
    #[error(transparent)]
    Load(Box<crate::data::DataError>),
    /// The output could not be written.
    #[error("writing {}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The writer's error.
        #[source]
        source: csv::Error,
    },
    /// The local state could not be read.
    #[error(transparent)]
    State(#[from] StateError),
}

/// Writes `customer,segment` for every customer of `csv` to `out`; returns
/// the number of customers.
pub fn segments(
    state: &StateDir,
    table: &CustomerTable,
    out: &mut dyn std::io::Write,
    out_name: &Path,
) -> Result<usize, SegmentsError> {
    let ds = table.load().map_err(|e| SegmentsError::Load(Box::new(e)))?;
    let (_, labels) = assign(state, &ds)?;
    let write = |source| SegmentsError::Write {
        path: out_name.to_owned(),
        source,
    };
    let mut w = csv::Writer::from_writer(out);
    w.write_record(["customer", "segment"]).map_err(write)?;
    for (id, c) in ds.ids.iter().zip(&labels) {
        w.write_record([id.as_str(), &c.to_string()])
            .map_err(write)?;
    }
    w.flush().map_err(|e| write(e.into()))?;
    Ok(ds.ids.len())
}

/// The federation's segment of every row of `ds`, from the stored k-means
/// centres, with their version.
pub fn assign(
    state: &StateDir,
    ds: &TabularDataset,
) -> Result<(crate::recommend::ModelVersion, Vec<usize>), SegmentsError> {
    // k-means trains on the churn features but keeps its centres under its
    // own state key, beside the churn model (`ModelSpec::state_key`).
    let Some((meta, params)) = state.load_global("segments")? else {
        return Err(SegmentsError::NoModel);
    };
    // A segmentation pipeline's state holds the centres of every candidate
    // k; the chosen k's are the segments (none before the choice).
    let (k, params) = match &meta.spec.model {
        ModelSpec::KMeans { k, .. } => (*k, params),
        ModelSpec::Segments {
            num_features, ks, ..
        } => {
            let state = Segmentation::decode(&params, *num_features, ks)
                .map_err(SegmentsError::BadState)?;
            let (k, centres) = state.chosen_centres().ok_or(SegmentsError::NoModel)?;
            (k, centres.to_vec())
        }
        _ => return Err(SegmentsError::NoModel),
    };
    let tag = crate::recommend::ModelVersion::of(&meta);
    let scaler = meta
        .spec
        .standardizer
        .ok_or(SegmentsError::NoFeatureStats)?;
    if params.len() != k * ds.x.ncols() || scaler.mean.len() != ds.x.ncols() {
        return Err(SegmentsError::Shape {
            params: params.len(),
            features: ds.x.ncols(),
        });
    }
    let labels = kmeans::assign(&scaler.transform(&ds.x), &params, k);
    Ok((tag, labels.into_iter().map(|(c, _)| c).collect()))
}
