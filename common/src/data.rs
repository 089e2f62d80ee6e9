//! Data loading: customer tables, orders exports, MovieLens, splits, partitions and standardisation.

pub mod catalogue;
pub mod cells;
pub mod csv_lines;
pub mod interactions;
pub mod movielens;
pub mod orders;
pub mod partition;
pub mod split;
pub mod standardize;
pub mod tabular;
