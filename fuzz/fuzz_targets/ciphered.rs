//! Ciphered-APDU opener and HLS answer check on arbitrary bytes: errors, never panics.
#![no_main]
use dlms_bridge::dlms::ciphering::{self, Keys};
use libfuzzer_sys::fuzz_target;

const TITLE: [u8; 8] = *b"MMM\x00\x00\xBC\x61\x4E";

fuzz_target!(|data: &[u8]| {
    let keys = Keys {
        block_cipher: [0x0F; 16],
        authentication: [0xD0; 16],
    };
    let _ = ciphering::decrypt(&keys.block_cipher, &keys.authentication, &TITLE, data);
    let _ = ciphering::verify_hls(&keys, &TITLE, b"challenge", data);
});
