//! IEC 62056-47 wrapper decoder on arbitrary bytes: errors, never panics.
#![no_main]
use bytes::BytesMut;
use dlms_bridge::dlms::wrapper::WrapperCodec;
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    let mut codec = WrapperCodec;
    while let Ok(Some(_)) = codec.decode(&mut buf) {}
});
