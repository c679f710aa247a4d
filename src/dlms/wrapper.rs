//! IEC 62056-47 TCP wrapper framing (DLMS over TCP/UDP port 4059): an 8-byte header (version 1,
//! source wPort, destination wPort, APDU length) in front of every APDU, as a `tokio_util` codec.
//!
//! Pure: it must not do I/O or keep time; `link.rs` drives it over a stream.

use bytes::{Buf, BufMut, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

/// The only wrapper protocol version defined.
pub const VERSION: u16 = 1;

/// Size of the wrapper header in bytes.
pub const HEADER_LEN: usize = 8;

/// Largest APDU the 16-bit length field can carry.
pub const MAX_PAYLOAD: usize = u16::MAX as usize;

/// Errors of wrapper framing.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The header carries a version other than 1: the stream is not (or no longer) wrapper
    /// framed and cannot be resynchronised.
    #[error("unsupported wrapper version {0}")]
    Version(u16),
    /// The APDU is longer than the length field can express.
    #[error("apdu too long for the wrapper ({0} bytes)")]
    TooLong(usize),
    /// Reading or writing the underlying stream failed (needed by the codec traits).
    #[error("wrapper i/o error")]
    Io(#[from] std::io::Error),
}

/// One wrapper PDU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrapperFrame {
    /// Source wPort: the sender's SAP (client SAP, or the server's logical device).
    pub source: u16,
    /// Destination wPort: the receiver's SAP.
    pub destination: u16,
    /// The APDU.
    pub payload: Vec<u8>,
}

/// Codec for [`WrapperFrame`]s.
#[derive(Debug, Default, Clone, Copy)]
pub struct WrapperCodec;

impl Decoder for WrapperCodec {
    type Item = WrapperFrame;
    type Error = Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<WrapperFrame>, Error> {
        if src.len() < HEADER_LEN {
            return Ok(None);
        }
        let version = u16::from_be_bytes([src[0], src[1]]);
        if version != VERSION {
            return Err(Error::Version(version));
        }
        let len = usize::from(u16::from_be_bytes([src[6], src[7]]));
        if src.len() < HEADER_LEN + len {
            src.reserve(HEADER_LEN + len - src.len());
            return Ok(None);
        }
        let source = u16::from_be_bytes([src[2], src[3]]);
        let destination = u16::from_be_bytes([src[4], src[5]]);
        src.advance(HEADER_LEN);
        let payload = src.split_to(len).to_vec();
        Ok(Some(WrapperFrame {
            source,
            destination,
            payload,
        }))
    }
}

impl<'a> Encoder<&'a WrapperFrame> for WrapperCodec {
    type Error = Error;

    fn encode(&mut self, item: &'a WrapperFrame, dst: &mut BytesMut) -> Result<(), Error> {
        encode_parts(item.source, item.destination, &item.payload, dst)
    }
}

impl Encoder<WrapperFrame> for WrapperCodec {
    type Error = Error;

    fn encode(&mut self, item: WrapperFrame, dst: &mut BytesMut) -> Result<(), Error> {
        encode_parts(item.source, item.destination, &item.payload, dst)
    }
}

/// Appends one wrapper PDU built from its parts, without copying the APDU into a frame first.
pub fn encode_parts(
    source: u16,
    destination: u16,
    payload: &[u8],
    dst: &mut BytesMut,
) -> Result<(), Error> {
    let len = u16::try_from(payload.len()).map_err(|_| Error::TooLong(payload.len()))?;
    dst.reserve(HEADER_LEN + payload.len());
    dst.put_u16(VERSION);
    dst.put_u16(source);
    dst.put_u16(destination);
    dst.put_u16(len);
    dst.put_slice(payload);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_known_vector() {
        // AARQ-sized example: client 16 → logical device 1.
        let mut buf = BytesMut::new();
        WrapperCodec
            .encode(
                WrapperFrame {
                    source: 0x10,
                    destination: 0x01,
                    payload: vec![0x60, 0x1D, 0xA1],
                },
                &mut buf,
            )
            .expect("encodes");
        assert_eq!(
            &buf[..],
            &[0x00, 0x01, 0x00, 0x10, 0x00, 0x01, 0x00, 0x03, 0x60, 0x1D, 0xA1]
        );
    }

    #[test]
    fn decodes_split_and_back_to_back_frames() {
        let a = WrapperFrame {
            source: 1,
            destination: 16,
            payload: vec![0x61, 0x29, 0x7E],
        };
        let b = WrapperFrame {
            source: 1,
            destination: 16,
            payload: vec![],
        };
        let mut bytes = BytesMut::new();
        WrapperCodec.encode(&a, &mut bytes).expect("encodes");
        WrapperCodec.encode(&b, &mut bytes).expect("encodes");
        let all = bytes.to_vec();
        for cut in 0..all.len() {
            let mut buf = BytesMut::from(&all[..cut]);
            let mut got = Vec::new();
            while let Some(f) = WrapperCodec.decode(&mut buf).expect("valid") {
                got.push(f);
            }
            buf.extend_from_slice(&all[cut..]);
            while let Some(f) = WrapperCodec.decode(&mut buf).expect("valid") {
                got.push(f);
            }
            assert_eq!(got, vec![a.clone(), b.clone()], "cut {cut}");
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn wrong_version_is_an_error() {
        let mut buf = BytesMut::from(&[0x00, 0x02, 0, 1, 0, 16, 0, 0][..]);
        assert!(matches!(
            WrapperCodec.decode(&mut buf),
            Err(Error::Version(2))
        ));
    }

    #[test]
    fn oversized_payload_is_refused() {
        let mut buf = BytesMut::new();
        let r = encode_parts(16, 1, &vec![0; MAX_PAYLOAD + 1], &mut buf);
        assert!(matches!(r, Err(Error::TooLong(_))));
        assert!(buf.is_empty());
    }
}
