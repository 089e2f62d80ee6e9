//! `fedcart-coordinator`: the platform operator's side of fedcart.
//!
//! - [`engine`]: the transport-agnostic round engine (selection, streaming
//!   aggregation, quorum, commit).
//! - [`store`]: the durable redb store of run, versions and history;
//!   [`record`]: what it remembers of each round; [`task`]: the task plan.
//! - [`config`]: the validated configuration; [`ledger`]: the DP ledger.
//! - [`service`]: the gRPC driver of the engine.
//!
//! The simulator, the engine's second driver, is its own crate
//! (`fedcart-sim`, in `coordinator/sim/`), so that this one depends on
//! neither the merchant agent nor the simulator's plotting and progress bars.
//! - [`privacy`]: the `privacy` budget-planning command.
//! - [`secure_round`]: the secure-aggregation parameters of a round, for
//!   both drivers.
//! - [`server`]: wiring config → store → engine → service, as one call.
//! - [`tls`], [`identity`], [`certs`], [`limits`]: mutual TLS, merchant
//!   identities and the allow-list, the development CA, hardening limits.
//! - [`observe`]: Prometheus metrics, health and the web dashboard over HTTP;
//!   [`status`]: the `status` command; [`runs`]: the `runs` commands (the
//!   client of the `Admin` service, `service::admin`; the runs themselves
//!   are `service::hub`).
//! - [`cli`]: logging flags, shutdown signals and one-line errors for the
//!   binaries (this one and `fedcart-sim`).
#![forbid(unsafe_code)]

pub mod certs;
pub use fedcart_common::cli;
pub mod config;
pub mod engine;
pub mod http_auth;
pub mod identity;
pub mod ledger;
pub mod limits;
pub mod observe;
pub mod privacy;
pub mod record;
pub mod runs;
pub mod secure_round;
pub mod server;
pub mod service;
pub mod status;
pub mod store;
pub mod task;
pub mod tls;
