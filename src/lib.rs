//! dlms-bridge library.
#![forbid(unsafe_code)]
pub mod config;
pub mod model;
pub mod sources;
pub mod uplink;
