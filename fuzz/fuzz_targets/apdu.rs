//! A-XDR data and every response APDU parser on arbitrary bytes: errors, never panics; decoded
//! data re-encodes to bytes that decode to the same value.
#![no_main]
use dlms_bridge::dlms::apdu::{self, Data};
use dlms_bridge::dlms::clock;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((d, _)) = Data::decode(data) {
        let again = Data::decode_all(&d.to_bytes());
        assert!(again.is_ok(), "re-encoded data does not decode: {d:?}");
        let _ = apdu::parse_capture_objects(&d);
        let _ = apdu::parse_scaler_unit(&d);
    }
    let _ = apdu::parse_aare(data);
    let _ = apdu::parse_rlre(data);
    let _ = apdu::parse_get_response(data);
    let _ = apdu::parse_block_data_normal(data);
    let _ = apdu::parse_block_data_list(data);
    let _ = apdu::parse_set_response(data);
    let _ = apdu::parse_action_response(data);
    let _ = apdu::check_error_apdu(data);
    let _ = clock::decode(data);
});
