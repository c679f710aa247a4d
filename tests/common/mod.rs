//! Shared fakes for the integration tests. Each test binary uses a different subset.
#![allow(dead_code)]

pub mod tb_emulator;
