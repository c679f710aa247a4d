//! The DLMS/COSEM protocol, pure: bytes in, values out, no sockets, no runtime, no clock reads.
//! Reusable by the meter source ([`crate::sources::meters`]), the simulator ([`crate::sim`]),
//! the CLI and the fuzz targets.
//!
//! - [`hdlc`]: IEC 62056-46 frame format type 3, addresses, HCS/FCS, SNRM/UA parameters,
//!   segmentation planning.
//! - [`wrapper`]: IEC 62056-47 TCP wrapper framing (a `tokio_util` codec: framing only).
//! - [`apdu`]: A-XDR data and the xDLMS/ACSE APDUs we speak (AARQ/AARE, GET incl. selective
//!   access and block transfer, SET, ACTION, RLRQ/RLRE).
//! - [`obis`]: OBIS codes.
//! - [`clock`]: COSEM date-time ↔ Unix milliseconds.
//! - [`ciphering`]: security suite 0 (AES-GCM-128): ciphered APDUs and HLS-GMAC tags.

pub mod apdu;
pub mod ciphering;
pub mod clock;
pub mod hdlc;
pub mod obis;
pub mod wrapper;
