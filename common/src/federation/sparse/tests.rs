use super::*;
use crate::federation::update::Segment;

/// μ, 5 item biases, 5 item rows of 3 factors: the MF layout in small.
fn layout() -> WeightLayout {
    WeightLayout {
        segments: vec![
            Segment {
                len: 1,
                group_len: None,
            },
            Segment {
                len: 5,
                group_len: Some(1),
            },
            Segment {
                len: 15,
                group_len: Some(3),
            },
        ],
        num_coord_weights: 5,
    }
}

fn update_touching(rows: &[usize]) -> Update {
    let mut values = vec![0.0f32; 21];
    let mut coord_weights = vec![0.0f32; 5];
    values[0] = 0.25;
    for &r in rows {
        values[1 + r] = r as f32 + 0.5;
        for f in 0..3 {
            values[6 + 3 * r + f] = -(r as f32) - 0.125 * f as f32 - 1.0;
        }
        coord_weights[r] = 2.0 + r as f32;
    }
    Update {
        values,
        coord_weights,
        weight: 7.0,
    }
}

#[test]
fn an_update_round_trips_bit_for_bit_and_costs_only_its_rows() {
    let u = update_touching(&[1, 3]);
    let bytes = encode_update(&u, &layout()).unwrap();
    assert_eq!(bytes.len(), update_len(&layout(), 2));
    // nnz + 2 indices + μ + 2 × (bias + 3 factors) + 2 weights.
    assert_eq!(bytes.len(), 4 * (1 + 2 + 1 + 8 + 2));
    assert!(bytes.len() < 4 * (21 + 5));
    assert_eq!(decode_update(&bytes, 21, &layout(), 7.0).unwrap(), u);
}

#[test]
fn a_row_with_values_but_zero_weight_still_travels() {
    let mut u = update_touching(&[]);
    u.values[6 + 3 * 4 + 2] = 1.5;
    assert_eq!(touched_rows(&u, &layout()).unwrap(), vec![4]);
    let bytes = encode_update(&u, &layout()).unwrap();
    assert_eq!(decode_update(&bytes, 21, &layout(), 7.0).unwrap(), u);
}

#[test]
fn corrupt_update_payloads_are_refused_by_name() {
    let u = update_touching(&[0, 2]);
    let good = encode_update(&u, &layout()).unwrap();
    let dec = |b: &[u8]| decode_update(b, 21, &layout(), 1.0).unwrap_err();
    assert!(matches!(
        dec(&good[..good.len() - 1]),
        SparseError::Truncated { .. }
    ));
    let mut long = good.clone();
    long.push(0);
    assert_eq!(dec(&long), SparseError::TrailingBytes { extra: 1 });
    // Rows out of order.
    let mut swapped = good.clone();
    swapped[4..8].copy_from_slice(&2u32.to_le_bytes());
    swapped[8..12].copy_from_slice(&0u32.to_le_bytes());
    assert!(matches!(
        dec(&swapped),
        SparseError::BadRow { position: 1, .. }
    ));
    // A row past the catalogue.
    let mut past = good.clone();
    past[8..12].copy_from_slice(&5u32.to_le_bytes());
    assert!(matches!(dec(&past), SparseError::BadRow { index: 5, .. }));
    // More rows than the model has, before any allocation.
    let mut many = good.clone();
    many[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(dec(&many), SparseError::TooManyRows { .. }));
    // A negative or NaN row weight.
    for bad in [-1.0f32, f32::NAN] {
        let mut w = good.clone();
        let at = w.len() - 4;
        w[at..].copy_from_slice(&bad.to_le_bytes());
        assert!(matches!(dec(&w), SparseError::BadWeight { row: 2, .. }));
    }
    // A NaN smuggled into a factor.
    let mut nan = good.clone();
    let at = nan.len() - 4 * 2 - 4;
    nan[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    assert!(matches!(dec(&nan), SparseError::NotFinite { .. }));
    assert_eq!(
        encode_update(&u, &WeightLayout::uniform()).unwrap_err(),
        SparseError::NotRowStructured
    );
}

#[test]
fn a_download_carries_only_changed_rows_and_rebuilds_the_model() {
    let old: Vec<f32> = (0..21).map(|i| i as f32 * 0.1).collect();
    let mut new = old.clone();
    new[0] = 9.0; // μ always travels
    new[6 + 3 * 2 + 1] = -4.0; // a factor of row 2
    new[1 + 4] = 3.0; // the bias of row 4
    assert_eq!(
        changed_rows(&new, Some(&old), &layout()).unwrap(),
        vec![2, 4]
    );
    let bytes = encode_model(&new, Some(&old), &layout(), RowPrecision::F32).unwrap();
    assert_eq!(
        bytes.len(),
        model_len_bytes(&layout(), 2, RowPrecision::F32)
    );
    let mut cached = old.clone();
    apply_model(&bytes, &mut cached, &layout()).unwrap();
    assert_eq!(cached, new);
    // With no cached copy every row travels.
    let full = encode_model(&new, None, &layout(), RowPrecision::F32).unwrap();
    let mut fresh = vec![0.0; 21];
    apply_model(&full, &mut fresh, &layout()).unwrap();
    assert_eq!(fresh, new);
}

#[test]
fn reduced_precision_copies_equal_the_quantized_model_whatever_was_skipped() {
    let v1: Vec<f32> = (0..21).map(|i| (i as f32 * 0.37).sin()).collect();
    let mut v2 = v1.clone();
    v2[6 + 3] = 0.731;
    let mut v3 = v2.clone();
    v3[6 + 3 * 4 + 2] = -0.052;
    for p in [RowPrecision::F16, RowPrecision::Int8] {
        // Agent A follows every version, agent B jumps from v1 to v3.
        let mut a = vec![0.0; 21];
        apply_model(
            &encode_model(&v1, None, &layout(), p).unwrap(),
            &mut a,
            &layout(),
        )
        .unwrap();
        let mut b = a.clone();
        apply_model(
            &encode_model(&v2, Some(&v1), &layout(), p).unwrap(),
            &mut a,
            &layout(),
        )
        .unwrap();
        apply_model(
            &encode_model(&v3, Some(&v2), &layout(), p).unwrap(),
            &mut a,
            &layout(),
        )
        .unwrap();
        apply_model(
            &encode_model(&v3, Some(&v1), &layout(), p).unwrap(),
            &mut b,
            &layout(),
        )
        .unwrap();
        let q = quantized(&v3, &layout(), p);
        assert_eq!(a, q, "{p:?}");
        assert_eq!(b, q, "{p:?}");
        // μ and biases exact, factors close.
        assert_eq!(&q[..6], &v3[..6]);
        let tol = if p == RowPrecision::F16 { 1e-3 } else { 1e-2 };
        assert!(
            q.iter().zip(&v3).all(|(x, y)| (x - y).abs() <= tol),
            "{p:?}"
        );
    }
    // At k = 32 a factor row costs 128, 64 and 36 bytes.
    let row = |p: RowPrecision| p.row_bytes(32);
    assert_eq!(
        [
            row(RowPrecision::F32),
            row(RowPrecision::F16),
            row(RowPrecision::Int8)
        ],
        [128, 64, 36]
    );
}

#[test]
fn a_bad_download_leaves_the_cached_model_untouched() {
    let old = vec![0.5f32; 21];
    let mut new = old.clone();
    new[7] = 1.0;
    let mut bytes = encode_model(&new, Some(&old), &layout(), RowPrecision::F32).unwrap();
    let last = bytes.len() - 4;
    bytes[last..].copy_from_slice(&f32::INFINITY.to_le_bytes());
    let mut cached = old.clone();
    assert!(matches!(
        apply_model(&bytes, &mut cached, &layout()),
        Err(SparseError::NotFinite { .. })
    ));
    assert_eq!(cached, old);
    bytes[0] = 9;
    assert_eq!(
        apply_model(&bytes, &mut cached, &layout()).unwrap_err(),
        SparseError::BadPrecision(9)
    );
    let mut short = vec![0.0; 20];
    assert!(matches!(
        apply_model(&bytes, &mut short, &layout()),
        Err(SparseError::CachedLength { .. })
    ));
}

#[test]
fn f16_rows_clamp_instead_of_overflowing() {
    let mut m = vec![0.0f32; 21];
    m[6] = 1e6;
    let q = quantized(&m, &layout(), RowPrecision::F16);
    assert_eq!(q[6], 65504.0);
}
