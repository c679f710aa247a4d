//! Shared fakes for the integration tests. Each test binary uses a different subset.
//!
//! `tb_emulator::TbEmulator` is a ThingsBoard MQTT transport for one gateway token:
//! ```ignore
//! let tb = TbEmulator::start("token").await;
//! let mut cfg = config;                      // your Config
//! cfg.thingsboard = tb.thingsboard_config(); // host/port/token + fast test timings
//! // ... run the bridge ...
//! let rec = tb.wait_for("readings", Duration::from_secs(20), |r| r.telemetry_ts("Meter 1").len() >= 3).await;
//! assert!(rec.connect_precedes_data());
//! ```
#![allow(dead_code)]

pub mod tb_emulator;
