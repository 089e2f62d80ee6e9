//! Writing what the pipeline derived as plain CSV, so a merchant can open it
//! in a spreadsheet and check it before anything is trained.

use std::path::Path;

use super::OrdersError;
use super::derive::{FEATURE_NAMES, Prepared};

fn io_err(path: &Path) -> impl Fn(csv::Error) -> OrdersError + '_ {
    move |e| OrdersError::Io {
        file: path.into(),
        source: std::io::Error::other(e),
    }
}

impl Prepared {
    /// `customer_id, <FEATURE_NAMES…>, churned` — one row per customer.
    pub fn write_features_csv(&self, path: &Path) -> Result<(), OrdersError> {
        let err = io_err(path);
        let mut w = csv::Writer::from_path(path).map_err(&err)?;
        let mut header = vec!["customer_id"];
        header.extend(FEATURE_NAMES);
        header.push("churned");
        w.write_record(&header).map_err(&err)?;
        let f = &self.features;
        for (i, id) in f.ids.iter().enumerate() {
            let mut rec = vec![id.clone()];
            rec.extend(f.x.row(i).iter().map(|v| v.to_string()));
            rec.push((f.y[i] as u8).to_string());
            w.write_record(&rec).map_err(&err)?;
        }
        w.flush().map_err(|source| OrdersError::Io {
            file: path.into(),
            source,
        })
    }

    /// `user, item, value, timestamp` — one row per interaction (header only
    /// when the export has no item column).
    pub fn write_interactions_csv(&self, path: &Path) -> Result<(), OrdersError> {
        let err = io_err(path);
        let mut w = csv::Writer::from_path(path).map_err(&err)?;
        w.write_record(["user", "item", "value", "timestamp"])
            .map_err(&err)?;
        for i in &self.interactions {
            w.write_record([
                i.user.as_str(),
                i.item.as_str(),
                &i.value.to_string(),
                &i.timestamp.to_string(),
            ])
            .map_err(&err)?;
        }
        w.flush().map_err(|source| OrdersError::Io {
            file: path.into(),
            source,
        })
    }
}
