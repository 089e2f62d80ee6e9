//! Coordinator library.

pub mod privacy;
