//! Seeded splits and partitions of row indices, and writing row subsets of a
//! CSV file (how tests and demos hand each merchant its own file).

use std::path::Path;

use rand::seq::SliceRandom;

use crate::data::tabular::DataError;

/// Shuffles `0..n` with the seed and cuts off the last `fraction` as the
/// held-out part. Returns `(train, held_out)`, each sorted ascending.
pub fn train_test(n: usize, fraction: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut crate::seed::rng(seed, &["train-test"]));
    let n_test = ((n as f64) * fraction).round() as usize;
    let mut test = idx.split_off(n - n_test.min(n));
    idx.sort_unstable();
    test.sort_unstable();
    (idx, test)
}

/// Like [`train_test`], but keeps the positive rate equal in both parts.
pub fn stratified_train_test(labels: &[f32], fraction: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let mut train = Vec::new();
    let mut test = Vec::new();
    for (class, name) in [(true, "pos"), (false, "neg")] {
        let mut idx: Vec<usize> = (0..labels.len())
            .filter(|&i| (labels[i] > 0.5) == class)
            .collect();
        idx.shuffle(&mut crate::seed::rng(seed, &["stratified", name]));
        let n_test = ((idx.len() as f64) * fraction).round() as usize;
        test.extend(idx.split_off(idx.len() - n_test.min(idx.len())));
        train.extend(idx);
    }
    train.sort_unstable();
    test.sort_unstable();
    (train, test)
}

/// [`stratified_train_test`] for one merchant of a study: the seed is the
/// study's, derived with the merchant's id. With one seed for every merchant,
/// merchants of the same size and churn count held out the same positions of
/// their (index-ordered) rows, so a 1,000-merchant study's test set was a few
/// positions repeated rather than a random fifth, and its AUC swung with the
/// seed (0.686–0.784 on CDNOW against 0.756–0.780 at 10 merchants).
pub fn merchant_train_test(
    labels: &[f32],
    fraction: f64,
    seed: u64,
    merchant: &str,
) -> (Vec<usize>, Vec<usize>) {
    let seed = crate::seed::derive(seed, &["held-out", merchant]);
    stratified_train_test(labels, fraction, seed)
}

/// Deals `indices` into `parts` shards of near-equal size after a seeded shuffle.
pub fn iid_partition(indices: &[usize], parts: usize, seed: u64) -> Vec<Vec<usize>> {
    let mut idx = indices.to_vec();
    idx.shuffle(&mut crate::seed::rng(seed, &["iid-partition"]));
    let mut out = vec![Vec::new(); parts.max(1)];
    for (k, i) in idx.into_iter().enumerate() {
        out[k % parts.max(1)].push(i);
    }
    for shard in &mut out {
        shard.sort_unstable();
    }
    out
}

/// Copies the header and the data rows at `rows` (0-based record indices) of
/// the CSV file `src` into `out`, byte for byte as records.
pub fn write_csv_rows(src: &Path, rows: &[usize], out: &Path) -> Result<(), DataError> {
    let mut rdr = csv::ReaderBuilder::new()
        .has_headers(true)
        .from_path(src)
        .map_err(|e| DataError::Row {
            file: src.into(),
            line: 0,
            message: e.to_string(),
        })?;
    let mut wtr = csv::Writer::from_path(out).map_err(|e| DataError::Row {
        file: out.into(),
        line: 0,
        message: e.to_string(),
    })?;
    let werr = |e: csv::Error| DataError::Row {
        file: out.into(),
        line: 0,
        message: e.to_string(),
    };
    let header = rdr
        .byte_headers()
        .map_err(|e| DataError::Row {
            file: src.into(),
            line: 1,
            message: e.to_string(),
        })?
        .clone();
    wtr.write_byte_record(&header).map_err(werr)?;
    let mut wanted = rows.to_vec();
    wanted.sort_unstable();
    let mut next = wanted.iter().peekable();
    for (i, rec) in rdr.byte_records().enumerate() {
        let Some(&&want) = next.peek() else { break };
        let rec = rec.map_err(|e| DataError::Row {
            file: src.into(),
            line: e.position().map_or(0, |p| p.line()),
            message: e.to_string(),
        })?;
        if i == want {
            wtr.write_byte_record(&rec).map_err(werr)?;
            next.next();
        }
    }
    wtr.flush().map_err(|source| DataError::Io {
        file: out.into(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_are_disjoint_complete_and_seeded() {
        let (a, b) = train_test(100, 0.2, 1);
        assert_eq!(b.len(), 20);
        let mut all = [a.clone(), b.clone()].concat();
        all.sort_unstable();
        assert_eq!(all, (0..100).collect::<Vec<_>>());
        assert_eq!(train_test(100, 0.2, 1), (a, b));
        assert_ne!(train_test(100, 0.2, 2).1, train_test(100, 0.2, 1).1);
    }

    #[test]
    fn stratified_split_keeps_the_positive_rate() {
        let labels: Vec<f32> = (0..100)
            .map(|i| if i % 4 == 0 { 1.0 } else { 0.0 })
            .collect();
        let (_, test) = stratified_train_test(&labels, 0.2, 3);
        assert_eq!(test.iter().filter(|&&i| labels[i] > 0.5).count(), 5);
        assert_eq!(test.len(), 20);
    }

    #[test]
    fn merchants_with_the_same_labels_hold_out_different_rows() {
        let labels: Vec<f32> = (0..25)
            .map(|i| if i % 5 == 0 { 1.0 } else { 0.0 })
            .collect();
        let held = |m: &str| merchant_train_test(&labels, 0.2, 42, m).1;
        assert_eq!(held("m0000"), held("m0000"));
        let distinct: std::collections::BTreeSet<Vec<usize>> =
            (0..20).map(|k| held(&format!("m{k:04}"))).collect();
        assert!(distinct.len() >= 19, "{distinct:?}");
        for h in &distinct {
            assert_eq!(h.iter().filter(|&&i| labels[i] > 0.5).count(), 1);
            assert_eq!(h.len(), 5);
        }
    }

    #[test]
    fn iid_partition_covers_everything_once() {
        let parts = iid_partition(&(0..10).collect::<Vec<_>>(), 3, 9);
        assert_eq!(
            parts.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![4, 3, 3]
        );
        let mut all: Vec<usize> = parts.concat();
        all.sort_unstable();
        assert_eq!(all, (0..10).collect::<Vec<_>>());
    }
}
