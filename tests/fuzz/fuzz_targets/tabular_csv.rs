//! A merchant's tabular churn CSV read with the Telco schema: read or fail,
//! never panic; a dataset that reads has one label and one feature row per
//! id, labels in {0, 1} and finite features.
#![no_main]

use std::path::Path;

use fedcart_common::data::tabular::Schema;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let schema = Schema::telco();
    if let Ok(ds) = schema.read_csv(data, Path::new("fuzz.csv")) {
        assert_eq!(ds.y.len(), ds.len());
        assert_eq!(ds.x.nrows(), ds.len());
        assert_eq!(ds.x.ncols(), schema.num_features());
        assert!(ds.y.iter().all(|&y| y == 0.0 || y == 1.0));
        assert!(ds.x.iter().all(|v| v.is_finite()), "non-finite feature");
    }
});
