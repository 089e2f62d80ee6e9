//! `fedcart-common`: everything the coordinator, the merchant agent and the
//! simulator share — models and their local training, aggregation maths,
//! data loading, and (in their own modules) secure aggregation and privacy.
//!
//! Without its features this crate never opens a socket and depends on
//! neither tokio nor tonic: the same code runs behind gRPC and inside the
//! in-process simulator. The `cli` feature holds the binaries' front-end
//! helpers, the `http` feature the HTTP/1 accept loop of the two JSON
//! listeners.
// Denied, not forbidden: `malloc` allows the one `mallopt` call.
#![deny(unsafe_code)]

#[cfg(feature = "cli")]
pub mod cli;
pub mod config_errors;
pub mod data;
pub mod federation;
#[cfg(feature = "http")]
pub mod http;
pub mod identity;
pub mod itemsets;
pub mod kind;
pub mod malloc;
pub mod metrics;
pub mod model;
pub mod privacy;
pub mod reference;
pub mod seed;
pub mod task;
pub mod train;
