//! dlms-bridge library.
#![forbid(unsafe_code)]
pub mod config;
pub mod model;
pub mod router;
pub mod shutdown;
pub mod sources;
pub mod systemd;
