//! HDLC frame format type 3 as used by DLMS/COSEM (IEC 62056-46): frame encoding and decoding,
//! addresses, control fields, HCS/FCS, the LLC header and SNRM/UA parameter negotiation.
//!
//! Pure: bytes in, frames out. It must not do I/O, keep time or know about tokio; the async link
//! drivers in `link.rs` own sequencing, windows and retries.
//!
//! On HDLC-over-TCP for DLMS the flag 0x7E is *not* escaped inside a frame: the length in the
//! format field delimits the frame, so a payload may contain 0x7E bytes. The decoder therefore
//! trusts the length (guarded by the HCS) and never scans for the closing flag.

use bytes::{Buf, BytesMut};

/// Opening and closing flag of every frame.
pub const FLAG: u8 = 0x7E;

/// LLC header on the first I-frame of a request APDU (client → server).
pub const LLC_REQUEST: [u8; 3] = [0xE6, 0xE6, 0x00];

/// LLC header on the first I-frame of a response APDU (server → client).
pub const LLC_RESPONSE: [u8; 3] = [0xE6, 0xE7, 0x00];

/// Default maximum information field length (bytes) when SNRM/UA carry no parameters.
pub const DEFAULT_MAX_INFO: u16 = 128;

/// Default window size (frames) when SNRM/UA carry no parameters.
pub const DEFAULT_WINDOW: u8 = 1;

/// Largest frame length the 11-bit length of the format field can express (flags excluded).
pub const MAX_FRAME_LEN: usize = 0x07FF;

/// Frame format type 3 marker in the upper nibble of the format field.
const FORMAT_TYPE_3: u8 = 0xA0;

/// Segmentation bit in the first format byte.
const SEGMENTATION_BIT: u8 = 0x08;

/// Poll/final bit of the control field.
const PF_BIT: u8 = 0x10;

/// Errors of HDLC encoding and decoding.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The header check sequence did not match.
    #[error("bad hdlc header check sequence")]
    BadHcs,
    /// The frame check sequence did not match.
    #[error("bad hdlc frame check sequence")]
    BadFcs,
    /// An address field had no end or an unsupported length.
    #[error("invalid hdlc address field ({0} bytes)")]
    BadAddress(usize),
    /// An address value does not fit the requested address size.
    #[error("hdlc address {value} does not fit in {size} bytes")]
    AddressRange {
        /// The value that did not fit.
        value: u16,
        /// The address size in bytes.
        size: u8,
    },
    /// The address size is not 1, 2 or 4.
    #[error("unsupported hdlc address size {0}")]
    AddressSize(u8),
    /// The control byte names no frame type we know.
    #[error("unknown hdlc control field 0x{0:02x}")]
    UnknownControl(u8),
    /// The frame would be longer than the format field can express.
    #[error("hdlc frame too long ({0} bytes)")]
    TooLong(usize),
    /// The frame length is too short to hold the header it declares.
    #[error("hdlc frame length {0} is too short")]
    TooShort(usize),
    /// The SNRM/UA information field is malformed.
    #[error("malformed hdlc parameter negotiation field")]
    BadParameters,
}

/// An HDLC address: an upper (logical device / client SAP) part and an optional lower (physical
/// device) part. Client addresses are one byte, server addresses 1, 2 or 4 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Address {
    /// Upper HDLC address: the client SAP, or the server's logical device.
    pub upper: u16,
    /// Lower HDLC address: the server's physical device, absent in 1-byte addresses.
    pub lower: Option<u16>,
}

impl Address {
    /// A one-byte address (client SAP, or a server addressed by its logical device only).
    pub fn single(upper: u16) -> Self {
        Self { upper, lower: None }
    }

    /// A server address with logical and physical parts.
    pub fn server(logical: u16, physical: u16) -> Self {
        Self {
            upper: logical,
            lower: Some(physical),
        }
    }

    /// Appends the address in `size` bytes (1, 2 or 4) with the extension bit on the last byte.
    pub fn encode(&self, size: u8, out: &mut Vec<u8>) -> Result<(), Error> {
        let lower = self.lower.unwrap_or(0);
        let (bits, parts): (u32, &[u16]) = match size {
            1 => (7, &[self.upper][..]),
            2 => (7, &[self.upper, lower][..]),
            4 => (14, &[self.upper, lower][..]),
            other => return Err(Error::AddressSize(other)),
        };
        if size == 1 && self.lower.is_some() {
            // A one-byte address carries no physical part; dropping it silently would address
            // a different device.
            return Err(Error::AddressSize(size));
        }
        let start = out.len();
        for &part in parts {
            if u32::from(part) >= (1 << bits) {
                out.truncate(start);
                return Err(Error::AddressRange { value: part, size });
            }
            if bits == 14 {
                out.push((((part >> 7) & 0x7F) as u8) << 1);
            }
            out.push(((part & 0x7F) as u8) << 1);
        }
        if let Some(last) = out.last_mut() {
            *last |= 1;
        }
        Ok(())
    }

    /// Decodes an address from raw bytes (extension bits included).
    fn decode(raw: &[u8]) -> Result<Self, Error> {
        let v = |b: u8| u16::from(b >> 1);
        match raw.len() {
            1 => Ok(Self::single(v(raw[0]))),
            2 => Ok(Self::server(v(raw[0]), v(raw[1]))),
            4 => Ok(Self::server(
                (v(raw[0]) << 7) | v(raw[1]),
                (v(raw[2]) << 7) | v(raw[3]),
            )),
            n => Err(Error::BadAddress(n)),
        }
    }

    /// Number of bytes this address occupies on the wire when written with the smallest size
    /// that can hold it.
    pub fn natural_size(&self) -> u8 {
        match self.lower {
            None => 1,
            Some(lower) if self.upper < 0x80 && lower < 0x80 => 2,
            Some(_) => 4,
        }
    }
}

/// The control field of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Information frame carrying (part of) an APDU.
    I {
        /// Send sequence number N(S), 0..=7.
        ns: u8,
        /// Receive sequence number N(R), 0..=7: the next frame expected from the peer.
        nr: u8,
        /// Poll (command) / final (response) bit.
        pf: bool,
    },
    /// Receive ready: acknowledges frames up to N(R) - 1 and asks for more.
    Rr {
        /// Receive sequence number N(R).
        nr: u8,
        /// Poll/final bit.
        pf: bool,
    },
    /// Receive not ready: the station is busy.
    Rnr {
        /// Receive sequence number N(R).
        nr: u8,
        /// Poll/final bit.
        pf: bool,
    },
    /// Set normal response mode: opens the link (client → server).
    Snrm,
    /// Unnumbered acknowledgement of SNRM or DISC.
    Ua,
    /// Disconnect: closes the link (client → server).
    Disc,
    /// Disconnected mode: the server is not connected or refuses.
    Dm,
    /// Frame reject: the peer received a frame it cannot accept.
    Frmr,
    /// Unnumbered information, outside the sequence numbering.
    Ui,
}

impl Control {
    /// The control byte; unnumbered frames always carry the poll/final bit.
    pub fn to_byte(self) -> u8 {
        let pf = |p: bool| if p { PF_BIT } else { 0 };
        match self {
            Control::I { ns, nr, pf: p } => ((nr & 7) << 5) | pf(p) | ((ns & 7) << 1),
            Control::Rr { nr, pf: p } => ((nr & 7) << 5) | pf(p) | 0x01,
            Control::Rnr { nr, pf: p } => ((nr & 7) << 5) | pf(p) | 0x05,
            Control::Snrm => 0x93,
            Control::Ua => 0x73,
            Control::Disc => 0x53,
            Control::Dm => 0x1F,
            Control::Frmr => 0x97,
            Control::Ui => 0x13,
        }
    }

    /// Parses a control byte. The poll/final bit of unnumbered frames is not kept.
    pub fn from_byte(b: u8) -> Result<Self, Error> {
        let pf = b & PF_BIT != 0;
        let nr = b >> 5;
        if b & 0x01 == 0 {
            return Ok(Control::I {
                ns: (b >> 1) & 7,
                nr,
                pf,
            });
        }
        match b & 0x0F {
            0x01 => return Ok(Control::Rr { nr, pf }),
            0x05 => return Ok(Control::Rnr { nr, pf }),
            _ => {}
        }
        match b & !PF_BIT {
            0x83 => Ok(Control::Snrm),
            0x63 => Ok(Control::Ua),
            0x43 => Ok(Control::Disc),
            0x0F => Ok(Control::Dm),
            0x87 => Ok(Control::Frmr),
            0x03 => Ok(Control::Ui),
            _ => Err(Error::UnknownControl(b)),
        }
    }

    /// Whether the poll/final bit is set (always true for unnumbered frames we send).
    pub fn poll_final(self) -> bool {
        match self {
            Control::I { pf, .. } | Control::Rr { pf, .. } | Control::Rnr { pf, .. } => pf,
            _ => true,
        }
    }
}

/// One HDLC frame, flags and check sequences stripped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Segmentation bit: more frames of the same APDU follow.
    pub segmented: bool,
    /// Destination address.
    pub dest: Address,
    /// Source address.
    pub src: Address,
    /// Control field.
    pub control: Control,
    /// Information field (may be empty).
    pub info: Vec<u8>,
}

/// Address sizes to use when encoding a frame: destination and source, 1/2/4 bytes each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddressSizes {
    /// Size of the destination address.
    pub dest: u8,
    /// Size of the source address.
    pub src: u8,
}

impl Frame {
    /// Appends the complete frame (both flags included) to `out`.
    pub fn encode(&self, sizes: AddressSizes, out: &mut Vec<u8>) -> Result<(), Error> {
        let start = out.len();
        out.push(FLAG);
        out.extend_from_slice(&[0, 0]); // format, patched below
        let result = self
            .dest
            .encode(sizes.dest, out)
            .and_then(|()| self.src.encode(sizes.src, out));
        if let Err(e) = result {
            out.truncate(start);
            return Err(e);
        }
        out.push(self.control.to_byte());
        let header_end = out.len();
        // length counts format .. FCS, flags excluded
        let mut len = header_end - start - 1 + 2;
        if !self.info.is_empty() {
            len += self.info.len() + 2;
        }
        if len > MAX_FRAME_LEN {
            out.truncate(start);
            return Err(Error::TooLong(len));
        }
        let seg = if self.segmented { SEGMENTATION_BIT } else { 0 };
        out[start + 1] = FORMAT_TYPE_3 | seg | ((len >> 8) as u8 & 0x07);
        out[start + 2] = (len & 0xFF) as u8;
        let hcs = crc16(&out[start + 1..header_end]);
        out.extend_from_slice(&hcs.to_le_bytes());
        if !self.info.is_empty() {
            out.extend_from_slice(&self.info);
            let fcs = crc16(&out[start + 1..]);
            out.extend_from_slice(&fcs.to_le_bytes());
        }
        out.push(FLAG);
        Ok(())
    }

    /// Bytes of frame overhead around an information field for the given address sizes.
    pub fn overhead(sizes: AddressSizes) -> usize {
        // flag + format(2) + addresses + control + HCS(2) + FCS(2) + flag
        2 + 2 + usize::from(sizes.dest) + usize::from(sizes.src) + 1 + 2 + 2
    }
}

/// Finds and decodes frames in a byte stream.
///
/// Call [`decode`] whenever bytes were appended to the buffer. Garbage between frames is skipped.
/// A frame with a bad HCS or FCS yields an error after its bytes have been removed from the
/// buffer, so the caller may log it and call again to continue with the next frame.
///
/// Returns `Ok(None)` when the buffer holds no complete frame yet.
pub fn decode(buf: &mut BytesMut) -> Result<Option<Frame>, Error> {
    Ok(decode_sized(buf)?.map(|(frame, _)| frame))
}

/// Like [`decode`], and also returns the sizes the addresses had on the wire, so a server can
/// answer in the address format the client used.
pub fn decode_sized(buf: &mut BytesMut) -> Result<Option<(Frame, AddressSizes)>, Error> {
    loop {
        // Drop everything before the first flag.
        match buf.iter().position(|&b| b == FLAG) {
            Some(0) => {}
            Some(n) => {
                tracing::debug!(bytes = n, "Skipped garbage before an HDLC flag.");
                buf.advance(n);
            }
            None => {
                if !buf.is_empty() {
                    tracing::debug!(bytes = buf.len(), "Skipped garbage without an HDLC flag.");
                }
                buf.clear();
                return Ok(None);
            }
        }
        // Collapse runs of flags (closing flag of one frame followed by the opening flag of the
        // next, or idle flags) down to the last one.
        while buf.len() >= 2 && buf[1] == FLAG {
            buf.advance(1);
        }
        if buf.len() < 3 {
            return Ok(None);
        }
        if buf[1] & 0xF0 != FORMAT_TYPE_3 {
            // Not a frame start: this flag was garbage (or a lost closing flag).
            buf.advance(1);
            continue;
        }
        let len = (usize::from(buf[1] & 0x07) << 8) | usize::from(buf[2]);
        let segmented = buf[1] & SEGMENTATION_BIT != 0;

        // Header: format(2), dest address, src address, control.
        let Some(dest_len) = address_len(&buf[3..]) else {
            if buf.len() >= 3 + 4 {
                buf.advance(1);
                continue;
            }
            return Ok(None);
        };
        let src_start = 3 + dest_len;
        let Some(src_len) = address_len(&buf[src_start.min(buf.len())..]) else {
            if buf.len() >= src_start + 4 {
                buf.advance(1);
                continue;
            }
            return Ok(None);
        };
        let control_at = src_start + src_len;
        let header_len = control_at - 1 + 1; // format .. control, relative to index 1
        if len < header_len + 2 {
            // Cannot hold even the check sequence: treat the flag as garbage.
            buf.advance(1);
            continue;
        }
        let has_info = len > header_len + 2;
        if has_info && len < header_len + 2 + 1 + 2 {
            buf.advance(1);
            continue;
        }
        // Verify the HCS as soon as it is available, so a corrupted length does not make us wait
        // for bytes that will never come.
        if has_info {
            let hcs_end = 1 + header_len + 2;
            if buf.len() < hcs_end {
                return Ok(None);
            }
            let hcs = u16::from_le_bytes([buf[hcs_end - 2], buf[hcs_end - 1]]);
            if crc16(&buf[1..1 + header_len]) != hcs {
                buf.advance(1);
                return Err(Error::BadHcs);
            }
        }
        let total = 1 + len + 1;
        if buf.len() < total {
            return Ok(None);
        }
        if buf[total - 1] != FLAG {
            // The length does not land on a flag: not a frame (or a corrupted one). Resync.
            buf.advance(1);
            if has_info {
                return Err(Error::BadFcs);
            }
            continue;
        }
        let fcs = u16::from_le_bytes([buf[total - 3], buf[total - 2]]);
        if crc16(&buf[1..total - 3]) != fcs {
            // Keep the closing flag: it may be the opening flag of the next frame.
            buf.advance(total - 1);
            return Err(Error::BadFcs);
        }
        let dest = Address::decode(&buf[3..3 + dest_len]);
        let src = Address::decode(&buf[src_start..src_start + src_len]);
        let control = Control::from_byte(buf[control_at]);
        let info = if has_info {
            buf[1 + header_len + 2..total - 3].to_vec()
        } else {
            Vec::new()
        };
        // Leave the closing flag in place as a possible shared opening flag.
        buf.advance(total - 1);
        let sizes = AddressSizes {
            dest: dest_len as u8,
            src: src_len as u8,
        };
        let frame = Frame {
            segmented,
            dest: dest?,
            src: src?,
            control: control?,
            info,
        };
        return Ok(Some((frame, sizes)));
    }
}

/// Length of an address field at the start of `bytes`: up to and including the first byte with
/// the extension bit set. `None` if not yet terminated within 4 bytes or of length 3.
fn address_len(bytes: &[u8]) -> Option<usize> {
    let n = bytes.iter().take(4).position(|b| b & 1 == 1)? + 1;
    (n != 3).then_some(n)
}

/// CRC-16/X.25 (poly 0x1021 reflected, init and xorout 0xFFFF) used for HCS and FCS; transmitted
/// least significant byte first.
pub fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0xFFFF;
    for &b in data {
        crc = (crc >> 8) ^ CRC_TABLE[usize::from((crc ^ u16::from(b)) & 0xFF)];
    }
    !crc
}

const CRC_TABLE: [u16; 256] = build_crc_table();

const fn build_crc_table() -> [u16; 256] {
    let mut table = [0u16; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u16;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x8408
            } else {
                crc >> 1
            };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
}

/// Link parameters carried in the SNRM and UA information fields, from the sender's point of
/// view: what it will transmit and what it can receive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parameters {
    /// Maximum information field length the sender transmits.
    pub max_info_tx: u16,
    /// Maximum information field length the sender can receive.
    pub max_info_rx: u16,
    /// Number of frames the sender transmits before waiting for an acknowledgement.
    pub window_tx: u8,
    /// Number of frames the sender can receive before acknowledging.
    pub window_rx: u8,
}

impl Default for Parameters {
    fn default() -> Self {
        Self {
            max_info_tx: DEFAULT_MAX_INFO,
            max_info_rx: DEFAULT_MAX_INFO,
            window_tx: DEFAULT_WINDOW,
            window_rx: DEFAULT_WINDOW,
        }
    }
}

/// Parameter identifiers of the negotiation field.
const PARAM_FORMAT_ID: u8 = 0x81;
const PARAM_GROUP_ID: u8 = 0x80;
const PARAM_MAX_INFO_TX: u8 = 0x05;
const PARAM_MAX_INFO_RX: u8 = 0x06;
const PARAM_WINDOW_TX: u8 = 0x07;
const PARAM_WINDOW_RX: u8 = 0x08;

impl Parameters {
    /// Encodes the negotiation information field (format 0x81, group 0x80).
    pub fn encode(&self) -> Vec<u8> {
        let mut group = Vec::with_capacity(20);
        for (id, value) in [
            (PARAM_MAX_INFO_TX, self.max_info_tx),
            (PARAM_MAX_INFO_RX, self.max_info_rx),
        ] {
            group.push(id);
            if value <= 0xFF {
                group.extend_from_slice(&[1, value as u8]);
            } else {
                group.push(2);
                group.extend_from_slice(&value.to_be_bytes());
            }
        }
        for (id, value) in [
            (PARAM_WINDOW_TX, self.window_tx),
            (PARAM_WINDOW_RX, self.window_rx),
        ] {
            group.extend_from_slice(&[id, 4, 0, 0, 0, value]);
        }
        let mut out = Vec::with_capacity(group.len() + 3);
        out.extend_from_slice(&[PARAM_FORMAT_ID, PARAM_GROUP_ID, group.len() as u8]);
        out.extend_from_slice(&group);
        out
    }

    /// Parses a negotiation information field; an empty field or a missing parameter means the
    /// default. Unknown parameters are skipped.
    pub fn parse(info: &[u8]) -> Result<Self, Error> {
        let mut params = Self::default();
        if info.is_empty() {
            return Ok(params);
        }
        let [PARAM_FORMAT_ID, PARAM_GROUP_ID, group_len, rest @ ..] = info else {
            return Err(Error::BadParameters);
        };
        let mut group = rest
            .get(..usize::from(*group_len))
            .ok_or(Error::BadParameters)?;
        while let [id, len, tail @ ..] = group {
            let len = usize::from(*len);
            let value = tail.get(..len).ok_or(Error::BadParameters)?;
            if len == 0 || len > 4 {
                return Err(Error::BadParameters);
            }
            let v = value.iter().fold(0u32, |acc, &b| (acc << 8) | u32::from(b));
            match *id {
                PARAM_MAX_INFO_TX => params.max_info_tx = clamp_u16(v),
                PARAM_MAX_INFO_RX => params.max_info_rx = clamp_u16(v),
                PARAM_WINDOW_TX => params.window_tx = clamp_window(v),
                PARAM_WINDOW_RX => params.window_rx = clamp_window(v),
                _ => {}
            }
            group = &tail[len..];
        }
        if !group.is_empty() {
            return Err(Error::BadParameters);
        }
        Ok(params)
    }

    /// What the side that sent `ours` may use after the peer answered with `theirs`: never more
    /// than either side offered.
    pub fn negotiate(ours: &Self, theirs: &Self) -> Self {
        Self {
            max_info_tx: ours.max_info_tx.min(theirs.max_info_rx),
            max_info_rx: ours.max_info_rx.min(theirs.max_info_tx),
            window_tx: ours.window_tx.min(theirs.window_rx),
            window_rx: ours.window_rx.min(theirs.window_tx),
        }
    }
}

fn clamp_u16(v: u32) -> u16 {
    u16::try_from(v).unwrap_or(u16::MAX).max(1)
}

fn clamp_window(v: u32) -> u8 {
    // HDLC modulo-8 numbering allows at most 7 outstanding frames.
    u8::try_from(v.clamp(1, 7)).expect("clamped to 1..=7")
}

/// One information-field segment of a long APDU, as the sender must frame it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment<'a> {
    pub info: &'a [u8],
    /// More segments follow (the format field's segmentation bit).
    pub more: bool,
    /// Poll/final bit: set on the last segment and on every `window`-th one.
    pub poll: bool,
}

/// Split `data` into segments of at most `max` bytes. With a window of N, every Nth segment
/// carries the poll bit, and the sender must wait for the peer's RR before sending more; with
/// window 1 that is every segment. The last segment always carries it.
pub fn segments(data: &[u8], max: usize, window: u8) -> impl Iterator<Item = Segment<'_>> {
    let max = max.max(1);
    let window = usize::from(window.max(1));
    let count = data.len().div_ceil(max);
    data.chunks(max).enumerate().map(move |(i, info)| {
        let last = i + 1 == count;
        Segment {
            info,
            more: !last,
            poll: last || (i + 1) % window == 0,
        }
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn segments_poll_every_window_and_on_the_last() {
        let data: Vec<u8> = (0..10).collect();
        let polls = |max, window| -> Vec<(usize, bool, bool)> {
            segments(&data, max, window)
                .map(|s| (s.info.len(), s.more, s.poll))
                .collect()
        };
        assert_eq!(
            polls(4, 1),
            vec![(4, true, true), (4, true, true), (2, false, true)]
        );
        assert_eq!(
            polls(3, 2),
            vec![
                (3, true, false),
                (3, true, true),
                (3, true, false),
                (1, false, true)
            ]
        );
        assert_eq!(polls(16, 7), vec![(10, false, true)]);
        assert_eq!(
            segments(&data, 0, 0).count(),
            10,
            "degenerate limits never loop forever"
        );
    }

    use super::*;

    fn sizes(dest: u8, src: u8) -> AddressSizes {
        AddressSizes { dest, src }
    }

    fn encode(frame: &Frame, s: AddressSizes) -> Vec<u8> {
        let mut out = Vec::new();
        frame.encode(s, &mut out).expect("encodes");
        out
    }

    fn decode_all(bytes: &[u8]) -> Vec<Result<Frame, Error>> {
        let mut buf = BytesMut::from(bytes);
        let mut out = Vec::new();
        loop {
            match decode(&mut buf) {
                Ok(Some(f)) => out.push(Ok(f)),
                Ok(None) => return out,
                Err(e) => out.push(Err(e)),
            }
        }
    }

    #[test]
    fn crc_check_value() {
        assert_eq!(crc16(b"123456789"), 0x906E);
    }

    #[test]
    fn snrm_vector_matches_known_capture() {
        // SNRM from client 16 to server 1/17 (2-byte address) with no information field:
        // a widely published capture "7E A0 08 02 23 21 93 xx xx 7E".
        let frame = Frame {
            segmented: false,
            dest: Address::server(1, 17),
            src: Address::single(16),
            control: Control::Snrm,
            info: vec![],
        };
        let bytes = encode(&frame, sizes(2, 1));
        assert_eq!(&bytes[..7], &[0x7E, 0xA0, 0x08, 0x02, 0x23, 0x21, 0x93]);
        let fcs = crc16(&bytes[1..7]);
        assert_eq!(&bytes[7..9], &fcs.to_le_bytes());
        assert_eq!(bytes[9], 0x7E);
        assert_eq!(decode_all(&bytes), vec![Ok(frame)]);
    }

    #[test]
    fn known_aarq_frame_decodes() {
        // A published client capture: I-frame (client 16 → server 1, 1-byte address) carrying
        // the LLC header and an AARQ.
        let bytes: Vec<u8> = {
            let frame = Frame {
                segmented: false,
                dest: Address::single(1),
                src: Address::single(16),
                control: Control::I {
                    ns: 0,
                    nr: 0,
                    pf: true,
                },
                info: vec![0xE6, 0xE6, 0x00, 0x60, 0x00],
            };
            encode(&frame, sizes(1, 1))
        };
        assert_eq!(&bytes[..5], &[0x7E, 0xA0, 0x0E, 0x03, 0x21]);
        assert_eq!(bytes[5], 0x10);
        let frames = decode_all(&bytes);
        assert_eq!(frames.len(), 1);
    }

    #[test]
    fn addresses_round_trip_in_all_sizes() {
        for (addr, size) in [
            (Address::single(1), 1),
            (Address::single(0x7F), 1),
            (Address::server(1, 17), 2),
            (Address::server(0x7F, 0x7F), 2),
            (Address::server(1, 17), 4),
            (Address::server(0x3FFF, 0x1234), 4),
        ] {
            let frame = Frame {
                segmented: true,
                dest: addr,
                src: Address::single(16),
                control: Control::I {
                    ns: 3,
                    nr: 5,
                    pf: false,
                },
                info: vec![1, 2, 3],
            };
            let bytes = encode(&frame, sizes(size, 1));
            assert_eq!(decode_all(&bytes), vec![Ok(frame)], "size {size}");
        }
    }

    #[test]
    fn four_byte_address_layout() {
        let mut out = Vec::new();
        Address::server(1, 0x3FFF)
            .encode(4, &mut out)
            .expect("fits");
        assert_eq!(out, vec![0x00, 0x02, 0xFE, 0xFF]);
    }

    #[test]
    fn address_out_of_range_is_an_error() {
        let mut out = Vec::new();
        assert_eq!(
            Address::server(0x80, 1).encode(2, &mut out),
            Err(Error::AddressRange {
                value: 0x80,
                size: 2
            })
        );
        assert!(out.is_empty());
        assert_eq!(
            Address::single(1).encode(3, &mut out),
            Err(Error::AddressSize(3))
        );
    }

    #[test]
    fn control_bytes_round_trip() {
        let all = [
            Control::I {
                ns: 7,
                nr: 6,
                pf: true,
            },
            Control::I {
                ns: 0,
                nr: 1,
                pf: false,
            },
            Control::Rr { nr: 3, pf: true },
            Control::Rnr { nr: 2, pf: false },
            Control::Snrm,
            Control::Ua,
            Control::Disc,
            Control::Dm,
            Control::Frmr,
            Control::Ui,
        ];
        for c in all {
            assert_eq!(Control::from_byte(c.to_byte()), Ok(c));
        }
        assert_eq!(Control::Rr { nr: 1, pf: true }.to_byte(), 0x31);
        assert_eq!(Control::from_byte(0x0B), Err(Error::UnknownControl(0x0B)));
    }

    #[test]
    fn flag_inside_payload_is_not_escaped() {
        let frame = Frame {
            segmented: false,
            dest: Address::single(16),
            src: Address::server(1, 17),
            control: Control::I {
                ns: 0,
                nr: 1,
                pf: true,
            },
            info: vec![0xE6, 0xE7, 0x00, 0x7E, 0x7E, 0x00, 0x7E],
        };
        let bytes = encode(&frame, sizes(1, 2));
        assert_eq!(decode_all(&bytes), vec![Ok(frame)]);
    }

    #[test]
    fn garbage_and_shared_flags_are_skipped() {
        let a = Frame {
            segmented: false,
            dest: Address::single(16),
            src: Address::single(1),
            control: Control::Ua,
            info: vec![],
        };
        let b = Frame {
            control: Control::I {
                ns: 1,
                nr: 2,
                pf: true,
            },
            info: vec![9; 40],
            ..a.clone()
        };
        let ea = encode(&a, sizes(1, 1));
        let eb = encode(&b, sizes(1, 1));
        let mut stream = vec![0x00, 0x7E, 0x12, 0x7E, 0x7E, 0xFF];
        stream.extend_from_slice(&ea);
        // shared flag: drop b's opening flag
        stream.extend_from_slice(&eb[1..]);
        stream.extend_from_slice(&[0x55, 0xAA]);
        stream.extend_from_slice(&eb);
        assert_eq!(decode_all(&stream), vec![Ok(a), Ok(b.clone()), Ok(b)]);
    }

    #[test]
    fn truncated_input_waits_for_more_at_every_cut() {
        let frame = Frame {
            segmented: true,
            dest: Address::server(0x1234, 0x0321),
            src: Address::single(16),
            control: Control::I {
                ns: 2,
                nr: 4,
                pf: true,
            },
            info: (0..=255u8).collect(),
        };
        let bytes = encode(&frame, sizes(4, 1));
        for cut in 0..bytes.len() - 1 {
            let mut buf = BytesMut::from(&bytes[..cut]);
            assert_eq!(decode(&mut buf), Ok(None), "cut {cut}");
            buf.extend_from_slice(&bytes[cut..]);
            assert_eq!(decode(&mut buf), Ok(Some(frame.clone())), "cut {cut}");
        }
    }

    #[test]
    fn corrupted_bytes_give_errors_then_recover() {
        let frame = Frame {
            segmented: false,
            dest: Address::single(16),
            src: Address::server(1, 17),
            control: Control::I {
                ns: 0,
                nr: 1,
                pf: true,
            },
            info: vec![0xE6, 0xE7, 0x00, 0xC4, 0x01, 0xC1, 0x00, 0x12, 0x00, 0xE6],
        };
        let good = encode(&frame, sizes(1, 2));
        for i in 1..good.len() - 1 {
            for flip in [0x01u8, 0x80, 0xFF] {
                let mut bad = good.clone();
                bad[i] ^= flip;
                let mut stream = bad.clone();
                stream.extend_from_slice(&good);
                let results = decode_all(&stream);
                // never panics, never yields the corrupted frame as good, and finds the good one
                assert_eq!(
                    results.last(),
                    Some(&Ok(frame.clone())),
                    "byte {i} ^ {flip:#x}: {results:?}"
                );
                let goods = results.iter().filter(|r| r.is_ok()).count();
                assert_eq!(goods, 1, "byte {i} ^ {flip:#x}: {results:?}");
            }
        }
    }

    #[test]
    fn bad_hcs_and_fcs_are_reported() {
        let frame = Frame {
            segmented: false,
            dest: Address::single(16),
            src: Address::single(1),
            control: Control::I {
                ns: 0,
                nr: 0,
                pf: true,
            },
            info: vec![1, 2, 3, 4],
        };
        let good = encode(&frame, sizes(1, 1));
        let mut bad_hcs = good.clone();
        bad_hcs[6] ^= 0xFF;
        assert_eq!(decode_all(&bad_hcs), vec![Err(Error::BadHcs)]);
        let mut bad_fcs = good.clone();
        let n = bad_fcs.len();
        bad_fcs[n - 2] ^= 0xFF;
        assert_eq!(decode_all(&bad_fcs), vec![Err(Error::BadFcs)]);
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // deterministic pseudo-random soup
        let mut x: u32 = 0x1234_5678;
        let mut soup = Vec::new();
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let b = (x & 0xFF) as u8;
            soup.push(if b % 7 == 0 { FLAG } else { b });
            if b % 11 == 0 {
                soup.push(0xA0);
            }
        }
        let _ = decode_all(&soup);
    }

    #[test]
    fn too_long_frame_is_refused() {
        let frame = Frame {
            segmented: false,
            dest: Address::single(1),
            src: Address::single(16),
            control: Control::Ui,
            info: vec![0; MAX_FRAME_LEN],
        };
        let mut out = vec![0xAB];
        assert!(matches!(
            frame.encode(sizes(1, 1), &mut out),
            Err(Error::TooLong(_))
        ));
        assert_eq!(out, vec![0xAB]);
    }

    #[test]
    fn parameters_round_trip_and_known_vector() {
        let p = Parameters {
            max_info_tx: 128,
            max_info_rx: 128,
            window_tx: 1,
            window_rx: 1,
        };
        assert_eq!(
            p.encode(),
            vec![
                0x81, 0x80, 0x12, 0x05, 0x01, 0x80, 0x06, 0x01, 0x80, 0x07, 0x04, 0x00, 0x00, 0x00,
                0x01, 0x08, 0x04, 0x00, 0x00, 0x00, 0x01
            ]
        );
        assert_eq!(Parameters::parse(&p.encode()), Ok(p));
        let big = Parameters {
            max_info_tx: 1024,
            max_info_rx: 300,
            window_tx: 7,
            window_rx: 3,
        };
        assert_eq!(Parameters::parse(&big.encode()), Ok(big));
        assert_eq!(Parameters::parse(&[]), Ok(Parameters::default()));
        // only max info tx present
        assert_eq!(
            Parameters::parse(&[0x81, 0x80, 0x03, 0x05, 0x01, 0x20]),
            Ok(Parameters {
                max_info_tx: 32,
                ..Parameters::default()
            })
        );
    }

    #[test]
    fn malformed_parameters_are_errors() {
        for bad in [
            &[0x81][..],
            &[0x81, 0x80, 0x05, 0x05, 0x01],
            &[0x81, 0x80, 0x03, 0x05, 0x02, 0x01],
            &[0x82, 0x80, 0x00],
            &[0x81, 0x80, 0x02, 0x05, 0x00],
        ] {
            assert_eq!(Parameters::parse(bad), Err(Error::BadParameters), "{bad:?}");
        }
    }

    #[test]
    fn negotiation_takes_the_smaller_side() {
        let client = Parameters {
            max_info_tx: 1024,
            max_info_rx: 1024,
            window_tx: 1,
            window_rx: 7,
        };
        let server = Parameters {
            max_info_tx: 32,
            max_info_rx: 64,
            window_tx: 3,
            window_rx: 1,
        };
        let n = Parameters::negotiate(&client, &server);
        assert_eq!(
            n,
            Parameters {
                max_info_tx: 64,
                max_info_rx: 32,
                window_tx: 1,
                window_rx: 3
            }
        );
    }
}
