//! Privacy: secure aggregation (SecAgg/SecAgg+) and differential privacy.

pub mod dp;
pub mod secagg;
