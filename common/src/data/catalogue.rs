//! The platform catalogue: raw item ids → dense item indices.
//!
//! Every merchant maps its item ids through the same catalogue, so that row
//! `i` of the federated item-factor matrix means the same product everywhere.
//! The catalogue is configuration: loaded from a file of ids (one per line) or
//! built from a ratings file. Items a merchant sells that the catalogue does
//! not know are counted and reported, never fatal.

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
        std::fs::write(&path, "a\n\nb\na\n").unwrap();
        let err = Catalogue::load(&path).unwrap_err().to_string();
        assert!(err.contains("line 4") && err.contains("`a`"), "{err}");
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
