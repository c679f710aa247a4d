//! The ThingsBoard uplink (work in progress): gateway API payloads and PUBACK bookkeeping.

pub mod inflight;
pub mod thingsboard;
