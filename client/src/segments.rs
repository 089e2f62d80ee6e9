//! `fedcart-client segments`: labels the merchant's own customers with the
//! federation's k-means segments (`fedcart_common::model::kmeans`), offline
//! from the local state: the last global centres and the federation's
//! feature statistics the agent received with them. Nothing leaves the
//! machine.

use std::path::{Path, PathBuf};

use fedcart_common::data::tabular::{self, Schema};
use fedcart_common::model::kmeans;
use fedcart_common::task::ModelSpec;
use thiserror::Error;

use crate::state::{StateDir, StateError};

/// Why the customers could not be labelled.
#[derive(Debug, Error)]
pub enum SegmentsError {
    /// No k-means model in the local state.
    #[error("no segmentation yet: the agent has not taken part in a k-means round")]
    NoModel,
    /// The stored model came without the federation's feature statistics.
    #[error("the stored segmentation came without feature statistics")]
    NoFeatureStats,
    /// The stored model does not match the local features.
    #[error("the segmentation has {params} values, not k · {features}")]
    Shape {
        /// Stored centre values.
        params: usize,
        /// Local feature width.
        features: usize,
    },
    /// The features file could not be read.
    #[error("loading {}", path.display())]
    Load {
        /// The file.
        path: PathBuf,
        /// The reader's error (file, line, column).
        #[source]
        source: tabular::DataError,
    },
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
    csv: &Path,
    schema: &Schema,
    out: &Path,
) -> Result<usize, SegmentsError> {
    // k-means trains on the churn features but keeps its centres under its
    // own state key, beside the churn model (`ModelSpec::state_key`).
    let Some((meta, params)) = state.load_global("segments")? else {
        return Err(SegmentsError::NoModel);
    };
    let ModelSpec::KMeans { k, .. } = meta.spec.model else {
        return Err(SegmentsError::NoModel);
    };
    let scaler = meta
        .spec
        .standardizer
        .ok_or(SegmentsError::NoFeatureStats)?;
    let ds = schema.load_csv(csv).map_err(|source| SegmentsError::Load {
        path: csv.to_owned(),
        source,
    })?;
    if params.len() != k * ds.x.ncols() {
        return Err(SegmentsError::Shape {
            params: params.len(),
            features: ds.x.ncols(),
        });
    }
    let labels = kmeans::assign(&scaler.transform(&ds.x), &params, k);
    let write = |source| SegmentsError::Write {
        path: out.to_owned(),
        source,
    };
    let mut w = csv::Writer::from_path(out).map_err(write)?;
    w.write_record(["customer", "segment"]).map_err(write)?;
    for (id, (c, _)) in ds.ids.iter().zip(&labels) {
        w.write_record([id.as_str(), &c.to_string()])
            .map_err(write)?;
    }
    w.flush().map_err(|e| write(e.into()))?;
    Ok(ds.ids.len())
}
