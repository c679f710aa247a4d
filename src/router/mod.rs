//! Router placeholder (wired after merges).
pub mod builtin;
