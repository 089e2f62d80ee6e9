//! User–item interactions in the platform's vocabulary: what the orders
//! pipeline produces and what the recommenders consume.

use serde::{Deserialize, Serialize};

/// One interaction between a merchant's customer and a catalogue item.
///
/// Ids are kept as strings here; the recommenders map them to dense indices
/// (customers per merchant, items through the shared catalogue).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Interaction {
    /// The merchant's customer id.
    pub user: String,
    /// The platform catalogue item id.
    pub item: String,
    /// Explicit rating, or an implicit strength (quantity, 1.0 for a purchase).
    pub value: f32,
    /// Unix seconds.
    pub timestamp: i64,
}
