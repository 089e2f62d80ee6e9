//! `fedcart-common`: everything the coordinator, the merchant agent and the
//! simulator share — models and their local training, aggregation maths,
//! data loading, and (in their own modules) secure aggregation and privacy.
//!
//! This crate never opens a socket and depends on neither tokio nor tonic:
//! the same code runs behind gRPC and inside the in-process simulator.
#![forbid(unsafe_code)]

pub mod aggregate;
pub mod catalogue;
pub mod churn;
pub mod dp;
pub mod fedbuff;
pub mod interactions;
pub mod lr;
pub mod metrics;
pub mod mf;
pub mod mlp;
pub mod movielens;
pub mod orders;
pub mod partition;
pub mod reference;
pub mod secagg;
pub mod seed;
pub mod split;
pub mod standardize;
pub mod strategy;
pub mod tabular;
pub mod task;
pub mod train;
pub mod update;
