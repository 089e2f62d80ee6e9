//! Loads the merchant's files into `LocalData`, splitting held-out rows off
//! locally with a seeded split (they never leave the agent either).

use std::path::{Path, PathBuf};

use fedcart_common::data::catalogue::Catalogue;
use fedcart_common::data::orders;
use fedcart_common::data::tabular::{self, Schema};
use fedcart_common::data::{movielens, split};
use fedcart_common::itemsets::{self, Basket};
use fedcart_common::model::mf::MfData;
use fedcart_common::train::{ChurnData, LocalData};

use crate::config::AgentConfig;

/// Why the merchant's data could not be loaded. The source names the file,
/// and the line and column when a row is at fault.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The churn CSV (`data.churn_csv`) could not be read.
    #[error("loading churn data {}", path.display())]
    Churn {
        /// The file.
        path: PathBuf,
        /// The reader's error.
        #[source]
        source: tabular::DataError,
    },
    /// `data.churn_csv` is not configured but a command needs it.
    #[error("`data.churn_csv` is not configured")]
    NoChurnCsv,
    /// `data.ratings_csv` is not configured but a command needs it.
    #[error("`data.ratings_csv` is not configured")]
    NoRatings,
    /// The item names file (`data.item_names`) could not be read.
    #[error("loading item names {}", path.display())]
    ItemNames {
        /// The file.
        path: PathBuf,
        /// The reader's error, with the line.
        #[source]
        source: csv::Error,
    },
    /// `data.ratings_csv` is set without `data.catalogue`.
    #[error("`data.ratings_csv` needs `data.catalogue`")]
    NoCatalogue,
    /// The ratings file (`data.ratings_csv`) could not be read.
    #[error("loading ratings {}", path.display())]
    Ratings {
        /// The file.
        path: PathBuf,
        /// The reader's error.
        #[source]
        source: tabular::DataError,
    },
    /// `data.orders_csv` is set without `data.catalogue`, `data.orders`
    /// or an `item` column in `data.orders`.
    #[error("`data.orders_csv` needs `data.catalogue` and `[data.orders]` with an `item` column")]
    NoBasketsMapping,
    /// The orders export (`data.orders_csv`) could not be read.
    #[error("loading orders {}", path.display())]
    Orders {
        /// The file.
        path: PathBuf,
        /// The reader's error (file, line, column, value).
        #[source]
        source: fedcart_common::data::orders::OrdersError,
    },
    /// The shared catalogue (`data.catalogue`) could not be read.
    #[error("loading catalogue {}", path.display())]
    Catalogue {
        /// The file.
        path: PathBuf,
        /// The reader's error.
        #[source]
        source: tabular::DataError,
    },
}

/// The merchant's customer table (`data.churn_csv`), its schema (Telco's
/// when none is configured) and its field separator: what `score`,
/// `segments` and `serve` read.
#[derive(Debug, Clone)]
pub struct CustomerTable {
    /// The file.
    pub path: PathBuf,
    /// Its columns.
    pub schema: Schema,
    /// Its field separator.
    pub delimiter: u8,
}

impl CustomerTable {
    /// The table named in the configuration.
    pub fn from_config(cfg: &AgentConfig) -> Result<Self, DataError> {
        Ok(Self {
            path: cfg.data.churn_csv.clone().ok_or(DataError::NoChurnCsv)?,
            schema: cfg.data.schema.clone().unwrap_or_else(Schema::telco),
            delimiter: cfg.data.delimiter_byte(),
        })
    }

    /// Reads every row.
    pub fn load(&self) -> Result<tabular::TabularDataset, DataError> {
        self.schema
            .load_csv_delimited(&self.path, self.delimiter)
            .map_err(|source| DataError::Churn {
                path: self.path.clone(),
                source,
            })
    }
}

/// Display names of catalogue items, from `data.item_names`: a file with a
/// header whose first column is the item id and second the name.
pub fn item_names(
    path: &Path,
    delimiter: u8,
) -> Result<std::collections::HashMap<String, String>, DataError> {
    let err = |source| DataError::ItemNames {
        path: path.to_owned(),
        source,
    };
    let mut rdr = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .has_headers(true)
        .flexible(true)
        .from_path(path)
        .map_err(err)?;
    let mut out = std::collections::HashMap::new();
    for record in rdr.records() {
        let record = record.map_err(err)?;
        if let (Some(id), Some(name)) = (record.get(0), record.get(1)) {
            out.insert(id.trim().to_owned(), name.trim().to_owned());
        }
    }
    Ok(out)
}

/// The item names of the configuration, or none when `data.item_names` is unset.
pub fn configured_item_names(
    cfg: &AgentConfig,
) -> Result<std::collections::HashMap<String, String>, DataError> {
    match &cfg.data.item_names {
        Some(p) => item_names(p, cfg.data.delimiter_byte()),
        None => Ok(Default::default()),
    }
}

/// Reads every dataset named in the configuration.
pub fn load(cfg: &AgentConfig) -> Result<LocalData, DataError> {
    let mut data = LocalData {
        merchant_id: cfg.merchant_id.clone(),
        ..Default::default()
    };
    if let Some(path) = &cfg.data.churn_csv {
        let schema = cfg.data.schema.clone().unwrap_or_else(Schema::telco);
        let ds = schema
            .load_csv_delimited(path, cfg.data.delimiter_byte())
            .map_err(|source| DataError::Churn {
                path: path.clone(),
                source,
            })?;
        let labels = ds.y.to_vec();
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
    if let Some(path) = &cfg.data.orders_csv {
        data.baskets = Some(load_baskets(path, cfg)?);
    }
    Ok(data)
}

/// The merchant's baskets (one per customer and timestamp) from its orders
/// export, items mapped through the shared catalogue. Lines of items the
/// catalogue does not know are left out and counted in a warning.
pub fn load_baskets(path: &Path, cfg: &AgentConfig) -> Result<Vec<Basket>, DataError> {
    let (Some(cat_path), Some(map)) = (&cfg.data.catalogue, &cfg.data.orders) else {
        return Err(DataError::NoBasketsMapping);
    };
    if map.item.is_none() {
        return Err(DataError::NoBasketsMapping);
    }
    let catalogue = catalogue(cat_path)?;
    let (orders, _) =
        orders::read_orders(path, map, orders::BadRowPolicy::Fail).map_err(|source| {
            DataError::Orders {
                path: path.to_owned(),
                source,
            }
        })?;
    let unknown = orders
        .iter()
        .filter(|o| {
            o.item
                .as_deref()
                .is_some_and(|i| catalogue.index(i).is_none())
        })
        .count();
    if unknown > 0 {
        tracing::warn!(
            file = %path.display(),
            catalogue = %cat_path.display(),
            lines = unknown,
            "order lines whose item is not in the catalogue are left out of the baskets"
        );
    }
    Ok(itemsets::baskets(&orders, &catalogue))
}

/// The merchant's ratings mapped through the shared catalogue, with a seeded
/// local hold-out.
pub fn load_mf(path: &Path, cfg: &AgentConfig) -> Result<MfData, DataError> {
    let cat_path = cfg.data.catalogue.as_ref().ok_or(DataError::NoCatalogue)?;
    let catalogue = catalogue(cat_path)?;
    let rows =
        movielens::load_ratings_delimited(path, cfg.data.delimiter_byte()).map_err(|source| {
            DataError::Ratings {
                path: path.to_owned(),
                source,
            }
        })?;
    let (train, test) = movielens::random_split(&rows, cfg.data.holdout, cfg.data.split_seed);
    Ok(MfData::new(&train, &test, &catalogue))
}

/// Reads the shared catalogue.
pub fn catalogue(path: &Path) -> Result<Catalogue, DataError> {
    Catalogue::load(path).map_err(|source| DataError::Catalogue {
        path: path.to_owned(),
        source,
    })
}
