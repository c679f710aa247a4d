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

pub mod bridge_config;
pub mod broker_harness;
pub mod certs;
pub mod local_client;
pub mod meter_run;
pub mod meter_sim;
pub mod tb_emulator;

/// The independent Gurux meter of the team's shared folder: `$METER_SIM` if set, else
/// `shared/meter-sim/gurux_meter.py` beside this checkout (how CI lays it out), else
/// `/work/shared/...`. Panics naming every place looked at: an interop test never skips.
pub fn meter_sim_path() -> std::path::PathBuf {
    let mut tried = Vec::new();
    if let Some(p) = std::env::var_os("METER_SIM") {
        return p.into();
    }
    let beside =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/meter-sim/gurux_meter.py");
    for p in [
        beside,
        std::path::PathBuf::from("/work/shared/meter-sim/gurux_meter.py"),
    ] {
        if p.is_file() {
            return p;
        }
        tried.push(p.display().to_string());
    }
    panic!("the Gurux meter simulator is not at any of {tried:?}; set METER_SIM")
}
