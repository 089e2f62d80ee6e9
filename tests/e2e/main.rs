//! End-to-end tests: a real coordinator and real agents over TCP loopback.
//! One test binary keeps link times down.

mod bad_input;
mod dashboard;
mod examples;
mod federation;
mod fleet;
mod fuzz;
mod fuzz_session;
mod hardening;
mod kit;
mod lifecycle;
mod merchant_tools;
mod policy;
mod privacy;
mod restart;
mod rules;
mod runs;
mod secure;
mod secure_keys;
mod security;
mod segments;
mod trees;
mod wire_privacy;
