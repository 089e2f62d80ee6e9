//! Client library.

pub mod prepare;
