//! dlms-bridge library.
#![forbid(unsafe_code)]
pub mod app;
pub mod broker;
pub mod config;
pub mod downlink;
pub mod import;
pub mod model;
pub mod router;
pub mod shutdown;
pub mod sources;
pub mod store;
pub mod uplink;
