//! HDLC frame decoder and SNRM/UA parameter parser on arbitrary bytes: errors, never panics;
//! whatever decodes re-encodes.
#![no_main]
use bytes::BytesMut;
use dlms_bridge::dlms::hdlc::{self, Parameters};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    for _ in 0..data.len() + 1 {
        match hdlc::decode_sized(&mut buf) {
            Ok(Some((frame, sizes))) => {
                let mut out = Vec::new();
                let _ = frame.encode(sizes, &mut out);
            }
            Ok(None) => break,
            Err(_) => {}
        }
    }
    let _ = Parameters::parse(data);
});
