//! The platform catalogue: raw item ids → dense item indices.
//!
//! Every merchant maps its item ids through the same catalogue, so that row
//! `i` of the federated item-factor matrix means the same product everywhere.
//! The catalogue is configuration: loaded from a file of ids (one per line) or
//! built from a ratings file. Items a merchant sells that the catalogue does
//! not know are counted and reported, never fatal.
//!
//! Without a catalogue file, merchants agree on the rows by hashing
//! ([`HashedItems`]): an item's row is a public hash of its id modulo the
//! run's item count, so no party ever publishes an item list. Both kinds
//! implement [`ItemIndex`], which is all the data loaders need.

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::data::interactions::Interaction;
use crate::data::tabular::DataError;

/// An ordered list of item ids; an item's dense index is its position.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(from = "Vec<String>", into = "Vec<String>")]
pub struct Catalogue {
    ids: Vec<String>,
    index: HashMap<String, u32>,
}

impl From<Vec<String>> for Catalogue {
    /// Builds a catalogue; a repeated id keeps its first position.
    fn from(ids: Vec<String>) -> Self {
        Self::from_ids(ids)
    }
}

impl From<Catalogue> for Vec<String> {
    fn from(c: Catalogue) -> Self {
        c.ids
    }
}

impl Catalogue {
    /// Builds a catalogue from ids in order; a repeated id keeps its first
    /// position (so indices stay stable when a list is appended to).
    pub fn from_ids<I, S>(ids: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut out = Catalogue::default();
        for id in ids {
            let id = id.into();
            if !out.index.contains_key(&id) {
                out.index.insert(id.clone(), out.ids.len() as u32);
                out.ids.push(id);
            }
        }
        out
    }

    /// Every distinct item of `interactions`, in a canonical order (numeric
    /// ids numerically, then the rest lexicographically), so that two parties
    /// building the catalogue from the same file agree on every index.
    pub fn from_interactions(interactions: &[Interaction]) -> Self {
        let mut ids: Vec<&str> = interactions.iter().map(|x| x.item.as_str()).collect();
        ids.sort_unstable_by(|a, b| canonical_key(a).cmp(&canonical_key(b)));
        ids.dedup();
        Self::from_ids(ids)
    }

    /// Reads a file of item ids, one per line. Blank lines and surrounding
    /// whitespace are ignored; a duplicate id is an error naming its line,
    /// since it would silently shift every later index.
    pub fn load(path: &Path) -> Result<Self, DataError> {
        let text = std::fs::read_to_string(path).map_err(|source| DataError::Io {
            file: path.into(),
            source,
        })?;
        // A byte order mark (Excel's "CSV UTF-8", Notepad) is not part of
        // the first id: `trim` keeps U+FEFF, and that item's lines were
        // dropped as "not in the catalogue".
        let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
        let mut out = Catalogue::default();
        for (n, line) in text.lines().enumerate() {
            let id = line.trim();
            if id.is_empty() {
                continue;
            }
            if let Some(first) = out.index.get(id) {
                return Err(DataError::Row {
                    file: path.into(),
                    line: n as u64 + 1,
                    message: format!("duplicate item id `{id}` (first listed as item {first})"),
                });
            }
            out.index.insert(id.to_string(), out.ids.len() as u32);
            out.ids.push(id.to_string());
        }
        Ok(out)
    }

    /// Writes the ids one per line (the format [`Catalogue::load`] reads).
    pub fn save(&self, path: &Path) -> Result<(), DataError> {
        let mut text = self.ids.join("\n");
        text.push('\n');
        std::fs::write(path, text).map_err(|source| DataError::Io {
            file: path.into(),
            source,
        })
    }

    /// Number of items.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether the catalogue is empty.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Dense index of a raw id, or None for an item the catalogue lacks.
    pub fn index(&self, id: &str) -> Option<u32> {
        self.index.get(id).copied()
    }

    /// Raw id at a dense index.
    pub fn id(&self, index: u32) -> Option<&str> {
        self.ids.get(index as usize).map(String::as_str)
    }
}

/// Raw item id → row of the federated item model: a shared [`Catalogue`]
/// or [`HashedItems`].
pub trait ItemIndex {
    /// The row of `id`, or None for an item this index does not know.
    fn index(&self, id: &str) -> Option<u32>;
    /// Number of rows.
    fn len(&self) -> usize;
    /// Whether there are no rows.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl ItemIndex for Catalogue {
    fn index(&self, id: &str) -> Option<u32> {
        Catalogue::index(self, id)
    }
    fn len(&self) -> usize {
        Catalogue::len(self)
    }
}

/// Item ids hashed into a fixed number of rows: row = the first 8 bytes of
/// SHA-256(`fedcart/item-row/v1` ‖ 0 ‖ id), big-endian, modulo `rows`.
///
/// Every merchant computes the same row for the same id without anyone
/// listing the items. The hash is public and unkeyed: whoever sees which
/// rows a merchant's update touches (the coordinator, for plaintext
/// row-sparse uploads) can test a guessed item id against them, exactly as
/// with a shared catalogue; under secure aggregation it sees only the masked
/// dense sum. Distinct items can share a row (a collision); with `n` items in
/// `rows` rows about `1 − e^(−n/rows)` of them do, and they share one factor
/// vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashedItems {
    rows: u32,
}

/// Why a hashed item space cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a hashed item space needs at least one row")]
pub struct NoRows;

impl HashedItems {
    /// Domain separation of the item hash, so it never coincides with
    /// another use of SHA-256 over the same ids.
    const DOMAIN: &'static [u8] = b"fedcart/item-row/v1\0";

    /// `rows` hashed rows (the run's `num_items`).
    pub fn new(rows: u32) -> Result<Self, NoRows> {
        if rows == 0 {
            return Err(NoRows);
        }
        Ok(Self { rows })
    }

    /// The row of `id`.
    pub fn row(&self, id: &str) -> u32 {
        use sha2::{Digest, Sha256};
        let digest = Sha256::new()
            .chain_update(Self::DOMAIN)
            .chain_update(id.as_bytes())
            .finalize();
        let mut head = [0u8; 8];
        head.copy_from_slice(&digest[..8]);
        (u64::from_be_bytes(head) % u64::from(self.rows)) as u32
    }

    /// Number of rows.
    pub fn rows(&self) -> u32 {
        self.rows
    }
}

impl ItemIndex for HashedItems {
    fn index(&self, id: &str) -> Option<u32> {
        Some(self.row(id))
    }
    fn len(&self) -> usize {
        self.rows as usize
    }
}

/// Sort key putting integer ids in numeric order before any other id.
fn canonical_key(id: &str) -> (u8, u64, &str) {
    match id.parse::<u64>() {
        Ok(n) => (0, n, id),
        Err(_) => (1, 0, id),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inter(item: &str) -> Interaction {
        Interaction {
            user: "u".into(),
            item: item.into(),
            value: 1.0,
            timestamp: 0,
        }
    }

    #[test]
    fn built_from_interactions_orders_numeric_ids_numerically() {
        let c = Catalogue::from_interactions(&[inter("10"), inter("9"), inter("b"), inter("9")]);
        assert_eq!(c.len(), 3);
        assert_eq!(c.index("9"), Some(0));
        assert_eq!(c.index("10"), Some(1));
        assert_eq!(c.index("b"), Some(2));
        assert_eq!(c.index("nope"), None);
    }

    #[test]
    fn file_round_trips_and_duplicates_name_their_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("items.txt");
        let c = Catalogue::from_ids(["a", "b", "c"]);
        c.save(&path).unwrap();
        assert_eq!(Catalogue::load(&path).unwrap(), c);
        std::fs::write(&path, "\u{feff}a\r\nb\r\n").unwrap();
        assert_eq!(Catalogue::load(&path).unwrap().index("a"), Some(0));
        std::fs::write(&path, "a\n\nb\na\n").unwrap();
        let err = Catalogue::load(&path).unwrap_err().to_string();
        assert!(err.contains("line 4") && err.contains("`a`"), "{err}");
    }

    #[test]
    fn hashed_rows_are_stable_spread_and_refuse_zero() {
        let h = HashedItems::new(1 << 16).unwrap();
        // Pinned: every merchant, build and platform must agree on a row.
        assert_eq!(h.row("1095275"), h.row("1095275"));
        let pinned: Vec<u32> = ["1095275", "9878513", "milk"]
            .iter()
            .map(|id| h.row(id))
            .collect();
        // Computed independently: Python's hashlib over the same bytes.
        assert_eq!(pinned, [56_696, 60_710, 1_306]);
        // 5,000 ids over 65,536 rows: collisions near 1 − e^(−n/rows).
        let ids: Vec<String> = (0..5_000).map(|i| format!("item-{i}")).collect();
        let distinct: std::collections::HashSet<u32> = ids.iter().map(|i| h.row(i)).collect();
        assert!(distinct.len() > 4_700, "{}", distinct.len());
        assert!(
            ids.iter()
                .all(|i| ItemIndex::index(&h, i).unwrap() < (1 << 16))
        );
        assert_eq!(HashedItems::new(0), Err(NoRows));
        assert_eq!(ItemIndex::len(&HashedItems::new(7).unwrap()), 7);
    }

    #[test]
    fn serde_form_is_the_id_list() {
        let c = Catalogue::from_ids(["x", "y"]);
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(json, r#"["x","y"]"#);
        let back: Catalogue = serde_json::from_str(&json).unwrap();
        assert_eq!(back.index("y"), Some(1));
    }
}
