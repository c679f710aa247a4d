//! dlms-bridge library.
#![forbid(unsafe_code)]
pub mod broker;
pub mod config;
pub mod model;
pub mod sources;
