//! MovieLens federations: a ratings file's users dealt into merchants with
//! their [`MfData`]. Re-exports the loaders of [`crate::data::movielens`], so
//! `model::mf::movielens` is the one import for MF experiments.

use crate::data::catalogue::Catalogue;
use crate::data::interactions::Interaction;
use crate::model::LocalData;
use crate::model::mf::MfData;

pub use crate::data::movielens::*;

/// A federation built from one ratings file: the shared catalogue, the
/// global train/test split (to hand to other libraries) and the merchants.
#[derive(Debug, Clone)]
pub struct Federated {
    /// Every item of the file, in canonical order.
    pub catalogue: Catalogue,
    /// All training interactions.
    pub train: Vec<Interaction>,
    /// All held-out interactions.
    pub test: Vec<Interaction>,
    /// One merchant per user group, named `m0`, `m1`, …
    pub merchants: Vec<LocalData>,
}

/// Explicit setting: a seeded random split holding out `test_fraction` of the
/// ratings, then users dealt into `merchants` disjoint customer bases.
pub fn explicit_federation(
    rows: &[Interaction],
    merchants: usize,
    test_fraction: f64,
    seed: u64,
) -> Federated {
    let (train, test) = random_split(rows, test_fraction, seed);
    build(rows, train, test, merchants, seed)
}

/// Implicit setting: ratings `>= threshold` become purchases, each user's
/// last purchase is held out, users dealt into `merchants` groups.
pub fn implicit_federation(
    rows: &[Interaction],
    merchants: usize,
    threshold: f32,
    seed: u64,
) -> Federated {
    let (train, test) = leave_last_out(&implicit(rows, threshold));
    build(rows, train, test, merchants, seed)
}

fn build(
    rows: &[Interaction],
    train: Vec<Interaction>,
    test: Vec<Interaction>,
    merchants: usize,
    seed: u64,
) -> Federated {
    let catalogue = Catalogue::from_interactions(rows);
    let merchants = partition_users(rows, merchants, seed)
        .iter()
        .enumerate()
        .map(|(m, users)| LocalData {
            merchant_id: format!("m{m}"),
            mf: Some(MfData::new(
                &rows_of(&train, users),
                &rows_of(&test, users),
                &catalogue,
            )),
            ..Default::default()
        })
        .collect();
    Federated {
        catalogue,
        train,
        test,
        merchants,
    }
}
