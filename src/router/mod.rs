//! Router: local MQTT messages and meter readings → ThingsBoard records; downlink dispatch.
pub mod builtin;
pub mod convert;
pub mod expr;
pub mod mapping;
