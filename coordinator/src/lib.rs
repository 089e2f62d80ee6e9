//! `fedcart-coordinator`: the platform operator's side of fedcart.
//!
//! - [`engine`]: the transport-agnostic round engine (selection, streaming
//!   aggregation, quorum, commit).
//! - [`store`]: the durable redb store of run, versions and history.
//! - [`service`]: the gRPC driver of the engine.
//! - [`simulate`]: the in-process simulator, the engine's second driver.
//! - [`privacy`]: the `privacy` budget-planning command.
//! - [`server`]: wiring config → store → engine → service, as one call.
#![forbid(unsafe_code)]

pub mod config;
pub mod engine;
pub mod privacy;
pub mod record;
pub mod server;
pub mod service;
pub mod simulate;
pub mod store;
