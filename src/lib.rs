//! dlms-bridge library.
#![forbid(unsafe_code)]
pub mod config;
pub mod import;
pub mod model;
pub mod router;
pub mod sources;
