//! A merchant's tabular churn CSV read with the Telco schema: read or fail,
//! never panic; a dataset that reads has one label and one feature row per
//! id, labels in {0, 1} and finite features. A schema drafted from the same
//! bytes reads them (the draft saw every value), and its TOML reads back
//! to it.
#![no_main]

use std::path::Path;

use fedcart_common::data::tabular::{Schema, TabularDataset};
use libfuzzer_sys::fuzz_target;

fn check(ds: &TabularDataset, schema: &Schema) {
    assert_eq!(ds.y.len(), ds.len());
    assert_eq!(ds.x.nrows(), ds.len());
    assert_eq!(ds.x.ncols(), schema.num_features());
    assert!(ds.y.iter().all(|&y| y == 0.0 || y == 1.0));
    assert!(ds.x.iter().all(|v| v.is_finite()), "non-finite feature");
}

fuzz_target!(|data: &[u8]| {
    let path = Path::new("fuzz.csv");
    let schema = Schema::telco();
    if let Ok(ds) = schema.read_csv(data, path) {
        check(&ds, &schema);
    }
    if let Ok(draft) = Schema::draft(data, path, b',', &Default::default()) {
        draft.schema.check().expect("a draft is a valid schema");
        let ds = draft
            .schema
            .read_csv(data, path)
            .expect("the drafted schema reads the table it came from");
        assert_eq!(ds.len(), draft.rows);
        check(&ds, &draft.schema);
        let text = draft.to_toml(path, None);
        let back: Schema = toml::from_str(&text).expect("the draft's TOML parses");
        assert_eq!(back, draft.schema);
    }
});
