//! Placeholder until the modules land (see app.rs).
fn main() {}
