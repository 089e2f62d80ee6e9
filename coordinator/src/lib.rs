//! `fedcart-coordinator`: the platform operator's side of fedcart.
//!
//! - [`engine`]: the transport-agnostic round engine (selection, streaming
//!   aggregation, quorum, commit).
//! - [`store`]: the durable redb store of run, versions and history;
//!   [`record`]: what it remembers of each round; [`task`]: the task plan.
//! - [`config`]: the validated configuration; [`ledger`]: the DP ledger.
//! - [`service`]: the gRPC driver of the engine.
//! - [`simulate`]: the in-process simulator, the engine's second driver.
//! - [`privacy`]: the `privacy` budget-planning command.
//! - [`server`]: wiring config → store → engine → service, as one call.
//! - [`tls`], [`identity`], [`certs`], [`limits`]: mutual TLS, merchant
//!   identities and the allow-list, the development CA, hardening limits.
//! - [`observe`]: Prometheus metrics, health and the web dashboard over HTTP;
//!   [`status`]: the `status` command.
#![forbid(unsafe_code)]

pub mod certs;
pub mod config;
pub mod engine;
pub mod identity;
pub mod ledger;
pub mod limits;
pub mod observe;
pub mod privacy;
pub mod record;
pub mod server;
pub mod service;
pub mod simulate;
pub mod status;
pub mod store;
pub mod task;
pub mod tls;
