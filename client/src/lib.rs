//! `fedcart-client`: the merchant's agent.
//!
//! - [`agent`]: the gRPC session loop (join, tasks, model download, upload,
//!   reconnect with backoff).
//! - [`cli`]: the binary's logging flags and shutdown signals.
//! - [`secure`]: the agent's side of secure aggregation over gRPC.
//! - [`transfer`]: chunked model download and update upload, used by both.
//! - [`config`]: `merchant.toml` and environment overrides.
//! - [`data`]: loading the merchant's files into `LocalData`.
//! - [`fleet`]: many real agent sessions in one process (`fedcart-client
//!   fleet`), for load tests and studies at scale.
//! - [`tls`]: the merchant's mutual-TLS identity.
//! - [`policy`]: the merchant's privacy policy (`[privacy]`), checked on
//!   every task before anything leaves the agent; [`budget`]: its ε cap
//!   across runs, a ledger in the state directory.
//! - [`state`]: durable local state (global models, private user factors,
//!   metrics); [`recommend`]: offline top-K and churn scores from it;
//!   [`serve`]: the merchant's local JSON API on the same state, hot-swapping
//!   new versions.
//!   [`segments`] and [`rules`]: customer segments and "bought together"
//!   lists from the federation's k-means centres and frequent itemsets.
//! - [`prepare`] and [`schema`]: looking at a merchant's files before a run
//!   (features from an orders export; a drafted schema for a customer table).
//!
//! Each module returns its own error enum (`AgentError`, `ConfigError`,
//! `DataError`, `StateError`, …); only the binary turns them into `anyhow`.
//!
//! Training itself is `fedcart_common::train::run_task`, the same code the
//! simulator runs.
#![forbid(unsafe_code)]

// The serving fixture (`benches/serve_fixture.rs`) is shared by the load
// benchmark and `serve`'s tests, and names the crate from outside.
#[cfg(test)]
extern crate self as fedcart_client;

pub mod agent;
pub mod budget;
pub use fedcart_common::cli;
pub mod config;
pub mod data;
pub mod fleet;
pub mod output;
pub mod policy;
pub mod prepare;
pub mod recommend;
pub mod rules;
pub mod schema;
pub mod secure;
pub mod segments;
pub mod serve;
pub mod state;
pub mod tls;
pub mod transfer;
