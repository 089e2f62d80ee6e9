//! Generated protobuf and gRPC code for `fedcart.v1`.
//!
//! Nothing else lives here: the conversions between these wire types and the
//! domain types of `fedcart-common` are in one place per side (the
//! coordinator's `service::convert` and the client's `wire`).
#![allow(missing_docs)]
#![allow(clippy::all)]

/// The `fedcart.v1` package.
pub mod v1 {
    tonic::include_proto!("fedcart.v1");
}
