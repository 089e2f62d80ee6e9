//! End-to-end tests: a real coordinator and real agents over TCP loopback.
//! One test binary keeps link times down.

mod bad_input;
mod dashboard;
mod examples;
mod federation;
mod fuzz;
mod fuzz_session;
mod hardening;
mod lifecycle;
mod merchant_tools;
mod policy;
mod privacy;
mod restart;
mod secure;
mod security;
mod wire_privacy;
