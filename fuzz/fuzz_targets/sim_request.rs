//! The simulator's request handling (AARQ, GET/SET/ACTION with selective access, release) on
//! arbitrary APDUs, first unassociated and then after a valid association, on a meter that
//! serves a load profile: an answer, never a panic.
#![no_main]
use std::sync::Arc;

use dlms_bridge::dlms::apdu::{self, AarqParams, Conformance};
use dlms_bridge::sim::profile::LoadProfile;
use dlms_bridge::sim::{MeterState, Session, SimOptions};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let opts = Arc::new(SimOptions {
        profile: Some(LoadProfile {
            rows: 96,
            period_s: 900,
        }),
        ..SimOptions::default()
    });
    let meter = Arc::new(MeterState::new(&opts));
    let mut s = Session::new(meter, opts);
    let _ = s.handle(16, data);
    let aarq = apdu::encode_aarq(&AarqParams {
        password: None,
        conformance: Conformance::CLIENT_PROPOSED,
        max_receive_pdu: 1024,
    });
    let _ = s.handle(16, &aarq);
    let _ = s.handle(16, data);
});
