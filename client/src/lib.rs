//! `fedcart-client`: the merchant's agent.
//!
//! - [`agent`]: the gRPC session loop (join, tasks, model download, upload,
//!   reconnect with backoff).
//! - [`config`]: `merchant.toml` and environment overrides.
//! - [`data`]: loading the merchant's files into `LocalData`.
//!
//! Training itself is `fedcart_common::train::run_task`, the same code the
//! simulator runs.
#![forbid(unsafe_code)]

pub mod agent;
pub mod config;
pub mod data;
pub mod prepare;
