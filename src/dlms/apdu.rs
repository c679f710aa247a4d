//! DLMS/COSEM application layer (IEC 62056-5-3, logical-name referencing): A-XDR `Data` and the
//! APDUs a client needs (AARQ/AARE, GET, SET, ACTION, RLRQ/RLRE, exception and service errors).
//!
//! Pure and synchronous: bytes in, values out. It knows nothing of links, sockets, clocks or
//! invoke-id bookkeeping (that is `client.rs`). Every decoder works on untrusted input: a truncated
//! or corrupted APDU is an [`Error`], never a panic, and nesting and allocation are bounded by the
//! input length.
//!
//! Why our own codec rather than dlms-cosem-rs 0.1.0: its session refuses the LLS AARE without
//! mechanism-name that Gurux and many field meters send, and its HDLC driver bursts multi-frame
//! requests with the poll bit only on the last frame. Using only its codec layers under our own
//! session would still tie us to a 0.1 crate we cannot patch or vendor, for what is a small,
//! fully specified surface (LN services a poller needs). This module is that surface, tested on
//! byte vectors and against the independent Gurux stack (`tests/dlms_interop.rs`).
//! HLS-GMAC: the AARQ with calling-AP-title and CtoS, and the AARE's fields split out
//! ([`parse_aare_parts`]); the ciphering itself is `ciphering.rs`, the pass 3/4 logic the session's.
//! Not covered: short-name referencing and block transfer of SET/ACTION requests.

use std::fmt;

use super::obis::ObisCode;

/// Deepest array/structure nesting we decode; real meters stay far below this.
pub const MAX_DATA_DEPTH: usize = 16;

/// Why an APDU could not be built or understood, or what the meter refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// The input ended inside `what`.
    #[error("apdu truncated while reading {0}")]
    Truncated(&'static str),
    /// A tag that is not valid at this position.
    #[error("unexpected tag 0x{tag:02x} for {what}")]
    UnexpectedTag { what: &'static str, tag: u8 },
    /// Structurally valid bytes with an impossible value.
    #[error("invalid apdu: {0}")]
    Invalid(String),
    /// The meter refused the association (AARE result other than accepted).
    #[error("association rejected ({result}): {diagnostic}")]
    AssociationRejected {
        result: AssociationResult,
        diagnostic: AcseDiagnostic,
    },
    /// The meter answered with an exception-response (it could not process the request).
    #[error("meter exception: state error {state_error}, service error {service_error}")]
    Exception { state_error: u8, service_error: u8 },
    /// The meter answered with a confirmed-service-error.
    #[error("meter service error in service {service}: class {class}, code {code}")]
    ServiceError { service: u8, class: u8, code: u8 },
}

type Result<T> = std::result::Result<T, Error>;

// ---------------------------------------------------------------------------------------------
// Byte reader
// ---------------------------------------------------------------------------------------------

/// Cursor over untrusted bytes; every read is bounds-checked.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    fn is_empty(&self) -> bool {
        self.remaining() == 0
    }
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8]> {
        if self.remaining() < n {
            return Err(Error::Truncated(what));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }
    fn u8(&mut self, what: &'static str) -> Result<u8> {
        Ok(self.array::<1>(what)?[0])
    }
    fn u16(&mut self, what: &'static str) -> Result<u16> {
        Ok(u16::from_be_bytes(self.array(what)?))
    }
    fn u32(&mut self, what: &'static str) -> Result<u32> {
        Ok(u32::from_be_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: &'static str) -> Result<u64> {
        Ok(u64::from_be_bytes(self.array(what)?))
    }
    /// A-XDR / BER length: one byte below 0x80, else 0x80|n followed by n bytes (n <= 4).
    fn len(&mut self, what: &'static str) -> Result<usize> {
        let first = self.u8(what)?;
        if first < 0x80 {
            return Ok(first as usize);
        }
        let n = (first & 0x7F) as usize;
        if n == 0 || n > 4 {
            return Err(Error::Invalid(format!("length of {n} bytes in {what}")));
        }
        let mut v: usize = 0;
        for b in self.take(n, what)? {
            v = (v << 8) | *b as usize;
        }
        Ok(v)
    }
    /// A length that must also fit in what is left (guards allocations).
    fn bounded_len(&mut self, what: &'static str) -> Result<usize> {
        let n = self.len(what)?;
        if n > self.remaining() {
            return Err(Error::Truncated(what));
        }
        Ok(n)
    }
    fn expect(&mut self, want: u8, what: &'static str) -> Result<()> {
        let tag = self.u8(what)?;
        if tag != want {
            return Err(Error::UnexpectedTag { what, tag });
        }
        Ok(())
    }
}

/// Append an A-XDR / BER length.
fn put_len(out: &mut Vec<u8>, n: usize) {
    if n < 0x80 {
        out.push(n as u8);
    } else if n <= 0xFF {
        out.extend_from_slice(&[0x81, n as u8]);
    } else if n <= 0xFFFF {
        out.push(0x82);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(0x84);
        out.extend_from_slice(&(n as u32).to_be_bytes());
    }
}

// ---------------------------------------------------------------------------------------------
// A-XDR Data
// ---------------------------------------------------------------------------------------------

/// A-XDR type tags (IEC 62056-6-2 `Data` CHOICE).
mod tag {
    pub const NULL: u8 = 0;
    pub const ARRAY: u8 = 1;
    pub const STRUCTURE: u8 = 2;
    pub const BOOLEAN: u8 = 3;
    pub const BIT_STRING: u8 = 4;
    pub const DOUBLE_LONG: u8 = 5;
    pub const DOUBLE_LONG_UNSIGNED: u8 = 6;
    pub const OCTET_STRING: u8 = 9;
    pub const VISIBLE_STRING: u8 = 10;
    pub const UTF8_STRING: u8 = 12;
    pub const BCD: u8 = 13;
    pub const INTEGER: u8 = 15;
    pub const LONG: u8 = 16;
    pub const UNSIGNED: u8 = 17;
    pub const LONG_UNSIGNED: u8 = 18;
    pub const COMPACT_ARRAY: u8 = 19;
    pub const LONG64: u8 = 20;
    pub const LONG64_UNSIGNED: u8 = 21;
    pub const ENUM: u8 = 22;
    pub const FLOAT32: u8 = 23;
    pub const FLOAT64: u8 = 24;
    pub const DATE_TIME: u8 = 25;
    pub const DATE: u8 = 26;
    pub const TIME: u8 = 27;
}

/// One COSEM attribute value or method parameter.
#[derive(Debug, Clone, PartialEq)]
pub enum Data {
    /// null-data.
    Null,
    /// array: elements of one type (also what a compact-array decodes to).
    Array(Vec<Data>),
    /// structure: a sequence of possibly different types.
    Structure(Vec<Data>),
    /// boolean.
    Bool(bool),
    /// bit-string: `bits` significant bits, most significant first in `bytes`.
    BitString { bits: usize, bytes: Vec<u8> },
    /// double-long.
    I32(i32),
    /// double-long-unsigned.
    U32(u32),
    /// octet-string (also clock values: a 12-byte date-time).
    OctetString(Vec<u8>),
    /// visible-string (ASCII; kept as bytes since meters send anything).
    VisibleString(Vec<u8>),
    /// utf8-string.
    Utf8String(String),
    /// bcd: one packed byte.
    Bcd(u8),
    /// integer.
    I8(i8),
    /// long.
    I16(i16),
    /// unsigned.
    U8(u8),
    /// long-unsigned.
    U16(u16),
    /// long64.
    I64(i64),
    /// long64-unsigned.
    U64(u64),
    /// enum.
    Enum(u8),
    /// float32.
    F32(f32),
    /// float64.
    F64(f64),
    /// date-time (12 bytes, IEC 62056-6-2 4.1.6.1).
    DateTime([u8; 12]),
    /// date (5 bytes).
    Date([u8; 5]),
    /// time (4 bytes).
    Time([u8; 4]),
}

impl Data {
    /// Decode one `Data` from the start of `buf`; returns it and the bytes consumed.
    pub fn decode(buf: &[u8]) -> Result<(Data, usize)> {
        let mut r = Reader::new(buf);
        let d = read_data(&mut r, 0)?;
        Ok((d, r.pos))
    }

    /// Decode exactly one `Data` filling `buf`.
    pub fn decode_all(buf: &[u8]) -> Result<Data> {
        let (d, used) = Data::decode(buf)?;
        if used != buf.len() {
            return Err(Error::Invalid(format!(
                "{} trailing bytes after data",
                buf.len() - used
            )));
        }
        Ok(d)
    }

    /// Append the A-XDR encoding of `self`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Data::Null => out.push(tag::NULL),
            Data::Array(v) | Data::Structure(v) => {
                out.push(if matches!(self, Data::Array(_)) {
                    tag::ARRAY
                } else {
                    tag::STRUCTURE
                });
                put_len(out, v.len());
                for d in v {
                    d.encode(out);
                }
            }
            Data::Bool(b) => out.extend_from_slice(&[tag::BOOLEAN, u8::from(*b)]),
            Data::BitString { bits, bytes } => {
                out.push(tag::BIT_STRING);
                put_len(out, *bits);
                let n = bits.div_ceil(8);
                out.extend(bytes.iter().copied().chain(std::iter::repeat(0)).take(n));
            }
            Data::I32(v) => put_tagged(out, tag::DOUBLE_LONG, &v.to_be_bytes()),
            Data::U32(v) => put_tagged(out, tag::DOUBLE_LONG_UNSIGNED, &v.to_be_bytes()),
            Data::OctetString(b) => put_string(out, tag::OCTET_STRING, b),
            Data::VisibleString(b) => put_string(out, tag::VISIBLE_STRING, b),
            Data::Utf8String(s) => put_string(out, tag::UTF8_STRING, s.as_bytes()),
            Data::Bcd(v) => out.extend_from_slice(&[tag::BCD, *v]),
            Data::I8(v) => put_tagged(out, tag::INTEGER, &v.to_be_bytes()),
            Data::I16(v) => put_tagged(out, tag::LONG, &v.to_be_bytes()),
            Data::U8(v) => out.extend_from_slice(&[tag::UNSIGNED, *v]),
            Data::U16(v) => put_tagged(out, tag::LONG_UNSIGNED, &v.to_be_bytes()),
            Data::I64(v) => put_tagged(out, tag::LONG64, &v.to_be_bytes()),
            Data::U64(v) => put_tagged(out, tag::LONG64_UNSIGNED, &v.to_be_bytes()),
            Data::Enum(v) => out.extend_from_slice(&[tag::ENUM, *v]),
            Data::F32(v) => put_tagged(out, tag::FLOAT32, &v.to_be_bytes()),
            Data::F64(v) => put_tagged(out, tag::FLOAT64, &v.to_be_bytes()),
            Data::DateTime(b) => put_tagged(out, tag::DATE_TIME, b),
            Data::Date(b) => put_tagged(out, tag::DATE, b),
            Data::Time(b) => put_tagged(out, tag::TIME, b),
        }
    }

    /// The encoding as a fresh vector.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.encode(&mut v);
        v
    }

    /// The numeric value, for the integer, enum, BCD and float types.
    pub fn as_f64(&self) -> Option<f64> {
        Some(match *self {
            Data::I8(v) => v as f64,
            Data::I16(v) => v as f64,
            Data::I32(v) => v as f64,
            Data::I64(v) => v as f64,
            Data::U8(v) | Data::Enum(v) => v as f64,
            Data::U16(v) => v as f64,
            Data::U32(v) => v as f64,
            Data::U64(v) => v as f64,
            Data::F32(v) => v as f64,
            Data::F64(v) => v,
            Data::Bcd(v) => ((v >> 4) * 10 + (v & 0x0F)) as f64,
            _ => return None,
        })
    }

    /// The integer value of a signed or unsigned integer type (used for scalers).
    pub fn as_i64(&self) -> Option<i64> {
        Some(match *self {
            Data::I8(v) => v as i64,
            Data::I16(v) => v as i64,
            Data::I32(v) => v as i64,
            Data::I64(v) => v,
            Data::U8(v) | Data::Enum(v) => v as i64,
            Data::U16(v) => v as i64,
            Data::U32(v) => v as i64,
            Data::U64(v) => i64::try_from(v).ok()?,
            _ => return None,
        })
    }
}

fn put_tagged(out: &mut Vec<u8>, t: u8, bytes: &[u8]) {
    out.push(t);
    out.extend_from_slice(bytes);
}

fn put_string(out: &mut Vec<u8>, t: u8, bytes: &[u8]) {
    out.push(t);
    put_len(out, bytes.len());
    out.extend_from_slice(bytes);
}

fn read_data(r: &mut Reader<'_>, depth: usize) -> Result<Data> {
    let t = r.u8("data tag")?;
    read_data_body(r, t, depth)
}

fn read_data_body(r: &mut Reader<'_>, t: u8, depth: usize) -> Result<Data> {
    if depth > MAX_DATA_DEPTH {
        return Err(Error::Invalid("data nested too deeply".into()));
    }
    Ok(match t {
        tag::NULL => Data::Null,
        tag::ARRAY | tag::STRUCTURE => {
            let n = r.len("element count")?;
            // Every element takes at least one byte: a count larger than the input is garbage.
            if n > r.remaining() {
                return Err(Error::Truncated("array elements"));
            }
            let mut v = Vec::with_capacity(n);
            for _ in 0..n {
                v.push(read_data(r, depth + 1)?);
            }
            if t == tag::ARRAY {
                Data::Array(v)
            } else {
                Data::Structure(v)
            }
        }
        tag::BOOLEAN => Data::Bool(r.u8("boolean")? != 0),
        tag::BIT_STRING => {
            let bits = r.len("bit-string length")?;
            let bytes = r.take(bits.div_ceil(8), "bit-string")?.to_vec();
            Data::BitString { bits, bytes }
        }
        tag::DOUBLE_LONG => Data::I32(i32::from_be_bytes(r.array("double-long")?)),
        tag::DOUBLE_LONG_UNSIGNED => Data::U32(r.u32("double-long-unsigned")?),
        tag::OCTET_STRING => {
            let n = r.bounded_len("octet-string")?;
            Data::OctetString(r.take(n, "octet-string")?.to_vec())
        }
        tag::VISIBLE_STRING => {
            let n = r.bounded_len("visible-string")?;
            Data::VisibleString(r.take(n, "visible-string")?.to_vec())
        }
        tag::UTF8_STRING => {
            let n = r.bounded_len("utf8-string")?;
            let b = r.take(n, "utf8-string")?;
            Data::Utf8String(
                String::from_utf8(b.to_vec())
                    .map_err(|_| Error::Invalid("utf8-string is not utf-8".into()))?,
            )
        }
        tag::BCD => Data::Bcd(r.u8("bcd")?),
        tag::INTEGER => Data::I8(r.u8("integer")? as i8),
        tag::LONG => Data::I16(i16::from_be_bytes(r.array("long")?)),
        tag::UNSIGNED => Data::U8(r.u8("unsigned")?),
        tag::LONG_UNSIGNED => Data::U16(r.u16("long-unsigned")?),
        tag::COMPACT_ARRAY => read_compact_array(r, depth)?,
        tag::LONG64 => Data::I64(i64::from_be_bytes(r.array("long64")?)),
        tag::LONG64_UNSIGNED => Data::U64(r.u64("long64-unsigned")?),
        tag::ENUM => Data::Enum(r.u8("enum")?),
        tag::FLOAT32 => Data::F32(f32::from_be_bytes(r.array("float32")?)),
        tag::FLOAT64 => Data::F64(f64::from_be_bytes(r.array("float64")?)),
        tag::DATE_TIME => Data::DateTime(r.array("date-time")?),
        tag::DATE => Data::Date(r.array("date")?),
        tag::TIME => Data::Time(r.array("time")?),
        other => {
            return Err(Error::UnexpectedTag {
                what: "data",
                tag: other,
            })
        }
    })
}

/// Type description of a compact-array (IEC 62056-6-2 `TypeDescription`).
enum TypeDesc {
    /// A simple type: the tag whose untagged body follows.
    Simple(u8),
    /// array of `n` elements of one type.
    Array(usize, Box<TypeDesc>),
    /// structure of the listed types.
    Structure(Vec<TypeDesc>),
}

fn read_type_desc(r: &mut Reader<'_>, depth: usize) -> Result<TypeDesc> {
    if depth > MAX_DATA_DEPTH {
        return Err(Error::Invalid("type description nested too deeply".into()));
    }
    Ok(match r.u8("type description")? {
        tag::ARRAY => {
            let n = r.u16("compact array count")? as usize;
            TypeDesc::Array(n, Box::new(read_type_desc(r, depth + 1)?))
        }
        tag::STRUCTURE => {
            let n = r.bounded_len("compact structure count")?;
            let mut v = Vec::with_capacity(n);
            for _ in 0..n {
                v.push(read_type_desc(r, depth + 1)?);
            }
            TypeDesc::Structure(v)
        }
        tag::COMPACT_ARRAY => {
            return Err(Error::Invalid("nested compact-array".into()));
        }
        t => TypeDesc::Simple(t),
    })
}

fn read_typed(r: &mut Reader<'_>, desc: &TypeDesc, depth: usize) -> Result<Data> {
    match desc {
        TypeDesc::Simple(t) => read_data_body(r, *t, depth),
        TypeDesc::Array(n, inner) => {
            if *n > r.remaining() {
                return Err(Error::Truncated("compact array elements"));
            }
            let mut v = Vec::with_capacity(*n);
            for _ in 0..*n {
                v.push(read_typed(r, inner, depth + 1)?);
            }
            Ok(Data::Array(v))
        }
        TypeDesc::Structure(items) => {
            let mut v = Vec::with_capacity(items.len());
            for d in items {
                v.push(read_typed(r, d, depth + 1)?);
            }
            Ok(Data::Structure(v))
        }
    }
}

/// compact-array: a type description, then the untagged contents of as many elements as fit.
fn read_compact_array(r: &mut Reader<'_>, depth: usize) -> Result<Data> {
    let desc = read_type_desc(r, depth + 1)?;
    let n = r.bounded_len("compact-array contents")?;
    let mut inner = Reader::new(r.take(n, "compact-array contents")?);
    let mut out = Vec::new();
    while !inner.is_empty() {
        let before = inner.pos;
        out.push(read_typed(&mut inner, &desc, depth + 1)?);
        if inner.pos == before {
            // A zero-width element type (null) would loop forever.
            return Err(Error::Invalid(
                "compact-array of zero-width elements".into(),
            ));
        }
    }
    Ok(Data::Array(out))
}

/// Shows numbers plainly, strings as text when printable, a 12-byte octet-string as a date-time.
impl fmt::Display for Data {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Data::Null => f.write_str("null"),
            Data::Bool(b) => write!(f, "{b}"),
            Data::Array(v) | Data::Structure(v) => {
                f.write_str(if matches!(self, Data::Array(_)) {
                    "["
                } else {
                    "{"
                })?;
                for (i, d) in v.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{d}")?;
                }
                f.write_str(if matches!(self, Data::Array(_)) {
                    "]"
                } else {
                    "}"
                })
            }
            Data::BitString { bytes, bits } => {
                for i in 0..*bits {
                    let bit = bytes
                        .get(i / 8)
                        .map(|b| (b >> (7 - i % 8)) & 1)
                        .unwrap_or(0);
                    write!(f, "{bit}")?;
                }
                Ok(())
            }
            Data::OctetString(b) if looks_like_date_time(b) => fmt_date_time(f, b),
            Data::OctetString(b) | Data::VisibleString(b)
                if !b.is_empty() && b.iter().all(|c| c.is_ascii_graphic() || *c == b' ') =>
            {
                f.write_str(&String::from_utf8_lossy(b))
            }
            Data::OctetString(b) | Data::VisibleString(b) => {
                for c in b {
                    write!(f, "{c:02X}")?;
                }
                Ok(())
            }
            Data::Utf8String(s) => f.write_str(s),
            Data::DateTime(b) => fmt_date_time(f, b),
            Data::Date(b) => write!(f, "{}", hex(b)),
            Data::Time(b) => write!(f, "{}", hex(b)),
            Data::F32(v) => write!(f, "{v}"),
            Data::F64(v) => write!(f, "{v}"),
            other => match other.as_i64() {
                Some(v) => write!(f, "{v}"),
                None => write!(f, "{other:?}"),
            },
        }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|c| format!("{c:02X}")).collect()
}

/// A 12-byte octet-string whose fields are in range for a COSEM date-time (clock attribute 2
/// is sent that way), so a 12-character name is not shown as a date.
fn looks_like_date_time(b: &[u8]) -> bool {
    let ok = |v: u8, max: u8| v <= max || v >= 0xFD;
    b.len() == 12
        && ok(b[2], 12)
        && b[2] != 0
        && ok(b[3], 31)
        && b[3] != 0
        && ok(b[4], 7)
        && (b[5] < 24 || b[5] == 0xFF)
        && (b[6] < 60 || b[6] == 0xFF)
        && (b[7] < 60 || b[7] == 0xFF)
}

/// `YYYY-MM-DD HH:MM:SS` from a COSEM date-time; `*` marks "not specified" fields.
fn fmt_date_time(f: &mut fmt::Formatter<'_>, b: &[u8]) -> fmt::Result {
    if b.len() != 12 {
        return f.write_str(&hex(b));
    }
    let year = u16::from_be_bytes([b[0], b[1]]);
    let field = |v: u8| {
        if v == 0xFF {
            "**".to_string()
        } else {
            format!("{v:02}")
        }
    };
    let y = if year == 0xFFFF {
        "****".to_string()
    } else {
        format!("{year:04}")
    };
    write!(
        f,
        "{y}-{}-{} {}:{}:{}",
        field(b[2]),
        field(b[3]),
        field(b[5]),
        field(b[6]),
        field(b[7])
    )
}

// ---------------------------------------------------------------------------------------------
// Enumerations carried in responses
// ---------------------------------------------------------------------------------------------

/// Result of reading or writing one attribute (`Data-Access-Result`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataAccessResult {
    /// success (0).
    Success,
    /// hardware-fault (1).
    HardwareFault,
    /// temporary-failure (2).
    TemporaryFailure,
    /// read-write-denied (3).
    ReadWriteDenied,
    /// object-undefined (4): no such object in the meter.
    ObjectUndefined,
    /// object-class-inconsistent (9): wrong class id for this object.
    ObjectClassInconsistent,
    /// object-unavailable (11).
    ObjectUnavailable,
    /// type-unmatched (12).
    TypeUnmatched,
    /// scope-of-access-violated (13).
    ScopeOfAccessViolated,
    /// data-block-unavailable (14).
    DataBlockUnavailable,
    /// long-get-aborted (15).
    LongGetAborted,
    /// no-long-get-in-progress (16).
    NoLongGetInProgress,
    /// long-set-aborted (17).
    LongSetAborted,
    /// no-long-set-in-progress (18).
    NoLongSetInProgress,
    /// data-block-number-invalid (19).
    DataBlockNumberInvalid,
    /// other-reason (250).
    OtherReason,
    /// A code this implementation does not name.
    Unknown(u8),
}

impl DataAccessResult {
    /// From the wire code.
    pub fn from_u8(v: u8) -> Self {
        use DataAccessResult::*;
        match v {
            0 => Success,
            1 => HardwareFault,
            2 => TemporaryFailure,
            3 => ReadWriteDenied,
            4 => ObjectUndefined,
            9 => ObjectClassInconsistent,
            11 => ObjectUnavailable,
            12 => TypeUnmatched,
            13 => ScopeOfAccessViolated,
            14 => DataBlockUnavailable,
            15 => LongGetAborted,
            16 => NoLongGetInProgress,
            17 => LongSetAborted,
            18 => NoLongSetInProgress,
            19 => DataBlockNumberInvalid,
            250 => OtherReason,
            v => Unknown(v),
        }
    }
}

impl fmt::Display for DataAccessResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use DataAccessResult::*;
        let s = match self {
            Success => "success",
            HardwareFault => "hardware fault",
            TemporaryFailure => "temporary failure",
            ReadWriteDenied => "read-write denied",
            ObjectUndefined => "object undefined",
            ObjectClassInconsistent => "object class inconsistent",
            ObjectUnavailable => "object unavailable",
            TypeUnmatched => "type unmatched",
            ScopeOfAccessViolated => "scope of access violated",
            DataBlockUnavailable => "data block unavailable",
            LongGetAborted => "long get aborted",
            NoLongGetInProgress => "no long get in progress",
            LongSetAborted => "long set aborted",
            NoLongSetInProgress => "no long set in progress",
            DataBlockNumberInvalid => "data block number invalid",
            OtherReason => "other reason",
            Unknown(v) => return write!(f, "data access result {v}"),
        };
        f.write_str(s)
    }
}

/// `association-result` of an AARE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AssociationResult {
    /// accepted (0).
    Accepted,
    /// rejected-permanent (1): retrying with the same parameters will not help.
    RejectedPermanent,
    /// rejected-transient (2): the meter may accept later.
    RejectedTransient,
    /// A value outside the standard.
    Unknown(u8),
}

impl fmt::Display for AssociationResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AssociationResult::Accepted => f.write_str("accepted"),
            AssociationResult::RejectedPermanent => f.write_str("permanent"),
            AssociationResult::RejectedTransient => f.write_str("transient"),
            AssociationResult::Unknown(v) => write!(f, "result {v}"),
        }
    }
}

/// `result-source-diagnostic` of an AARE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcseDiagnostic {
    /// acse-service-user with its code (1 no reason, 2 context not supported, 11..14 auth).
    User(u8),
    /// acse-service-provider with its code.
    Provider(u8),
    /// No diagnostic present.
    None,
}

impl fmt::Display for AcseDiagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AcseDiagnostic::User(v) => f.write_str(match v {
                0 => "no diagnostic",
                1 => "no reason given",
                2 => "application context name not supported",
                11 => "authentication mechanism name not recognised",
                12 => "authentication mechanism name required",
                13 => "authentication failure (wrong password?)",
                14 => "authentication required",
                _ => return write!(f, "acse-service-user diagnostic {v}"),
            }),
            AcseDiagnostic::Provider(v) => f.write_str(match v {
                0 => "no diagnostic",
                1 => "no reason given (provider)",
                2 => "no common acse version",
                _ => return write!(f, "acse-service-provider diagnostic {v}"),
            }),
            AcseDiagnostic::None => f.write_str("no diagnostic"),
        }
    }
}

impl AcseDiagnostic {
    /// True when the meter said the credentials are wrong or missing.
    pub fn is_authentication(&self) -> bool {
        matches!(self, AcseDiagnostic::User(11..=14))
    }
}

// ---------------------------------------------------------------------------------------------
// Association
// ---------------------------------------------------------------------------------------------

/// The conformance block (24 bits; bit 0 is the most significant bit of the first byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Conformance(pub u32);

impl Conformance {
    const fn bit(n: u32) -> u32 {
        1 << (23 - n)
    }
    /// general-block-transfer.
    pub const GENERAL_BLOCK_TRANSFER: u32 = Self::bit(2);
    /// priority-mgmt-supported.
    pub const PRIORITY_MGMT: u32 = Self::bit(9);
    /// attribute0-supported-with-get.
    pub const ATTRIBUTE0_WITH_GET: u32 = Self::bit(10);
    /// block-transfer-with-get-or-read.
    pub const BLOCK_TRANSFER_WITH_GET: u32 = Self::bit(11);
    /// block-transfer-with-set-or-write.
    pub const BLOCK_TRANSFER_WITH_SET: u32 = Self::bit(12);
    /// block-transfer-with-action.
    pub const BLOCK_TRANSFER_WITH_ACTION: u32 = Self::bit(13);
    /// multiple-references (GET/SET/ACTION with-list).
    pub const MULTIPLE_REFERENCES: u32 = Self::bit(14);
    /// get.
    pub const GET: u32 = Self::bit(19);
    /// set.
    pub const SET: u32 = Self::bit(20);
    /// selective-access.
    pub const SELECTIVE_ACCESS: u32 = Self::bit(21);
    /// event-notification.
    pub const EVENT_NOTIFICATION: u32 = Self::bit(22);
    /// action.
    pub const ACTION: u32 = Self::bit(23);

    /// What this client proposes: LN services it implements.
    pub const CLIENT_PROPOSED: Conformance = Conformance(
        Self::PRIORITY_MGMT
            | Self::ATTRIBUTE0_WITH_GET
            | Self::BLOCK_TRANSFER_WITH_GET
            | Self::BLOCK_TRANSFER_WITH_SET
            | Self::BLOCK_TRANSFER_WITH_ACTION
            | Self::MULTIPLE_REFERENCES
            | Self::GET
            | Self::SET
            | Self::SELECTIVE_ACCESS
            | Self::EVENT_NOTIFICATION
            | Self::ACTION,
    );

    /// True when every bit of `mask` is set.
    pub fn has(&self, mask: u32) -> bool {
        self.0 & mask == mask
    }
}

/// BER tags and fixed values of the ACSE APDUs.
mod acse {
    pub const AARQ: u8 = 0x60;
    pub const AARE: u8 = 0x61;
    pub const RLRQ: u8 = 0x62;
    pub const RLRE: u8 = 0x63;
    /// application-context-name: LN referencing, no ciphering (2.16.756.5.8.1.1).
    pub const CONTEXT_LN: [u8; 7] = [0x60, 0x85, 0x74, 0x05, 0x08, 0x01, 0x01];
    /// mechanism-name: low-level security (2.16.756.5.8.2.1).
    pub const MECHANISM_LLS: [u8; 7] = [0x60, 0x85, 0x74, 0x05, 0x08, 0x02, 0x01];
    /// application-context-name: LN referencing with ciphering (2.16.756.5.8.1.3).
    pub const CONTEXT_LN_CIPHERED: [u8; 7] = [0x60, 0x85, 0x74, 0x05, 0x08, 0x01, 0x03];
    /// mechanism-name: high-level security with GMAC (2.16.756.5.8.2.5).
    pub const MECHANISM_HLS_GMAC: [u8; 7] = [0x60, 0x85, 0x74, 0x05, 0x08, 0x02, 0x05];
}

/// xDLMS APDU tags.
mod xdlms {
    pub const INITIATE_REQUEST: u8 = 0x01;
    pub const INITIATE_RESPONSE: u8 = 0x08;
    pub const CONFIRMED_SERVICE_ERROR: u8 = 0x0E;
    pub const GET_REQUEST: u8 = 0xC0;
    pub const SET_REQUEST: u8 = 0xC1;
    pub const ACTION_REQUEST: u8 = 0xC3;
    pub const GET_RESPONSE: u8 = 0xC4;
    pub const SET_RESPONSE: u8 = 0xC5;
    pub const ACTION_RESPONSE: u8 = 0xC7;
    pub const EXCEPTION_RESPONSE: u8 = 0xD8;
    /// The DLMS version we speak.
    pub const DLMS_VERSION: u8 = 6;
    /// Tag of the conformance [APPLICATION 31] IMPLICIT BIT STRING.
    pub const CONFORMANCE_TAG: [u8; 2] = [0x5F, 0x1F];
}

/// Parameters of the AARQ we send.
#[derive(Debug, Clone, Default)]
pub struct AarqParams<'a> {
    /// LLS password; `None` = no authentication (lowest level security).
    pub password: Option<&'a [u8]>,
    /// Services we propose.
    pub conformance: Conformance,
    /// Largest APDU we accept from the meter.
    pub max_receive_pdu: u16,
}

/// Build an AARQ (LN referencing, no ciphering, optional LLS).
pub fn encode_aarq(p: &AarqParams<'_>) -> Vec<u8> {
    let mut body = Vec::with_capacity(64);
    body.extend_from_slice(&[0xA1, 0x09, 0x06, 0x07]);
    body.extend_from_slice(&acse::CONTEXT_LN);
    if let Some(pw) = p.password {
        // acse-requirements: authentication (bit 0 of a 1-bit bit string).
        body.extend_from_slice(&[0x8A, 0x02, 0x07, 0x80]);
        body.extend_from_slice(&[0x8B, 0x07]);
        body.extend_from_slice(&acse::MECHANISM_LLS);
        let mut inner = vec![0x80];
        put_len(&mut inner, pw.len());
        inner.extend_from_slice(pw);
        body.push(0xAC);
        put_len(&mut body, inner.len());
        body.extend_from_slice(&inner);
    }
    put_user_information(
        &mut body,
        &encode_initiate_request(p.conformance, p.max_receive_pdu),
    );
    let mut out = vec![acse::AARQ];
    put_len(&mut out, body.len());
    out.extend_from_slice(&body);
    out
}

/// The xDLMS InitiateRequest of an AARQ (no dedicated key, response allowed, no QoS), plain.
/// With ciphering it is sent as a glo-initiate-request (see `ciphering::encrypt_glo`).
pub fn encode_initiate_request(conformance: Conformance, max_receive_pdu: u16) -> Vec<u8> {
    encode_initiate_request_with(conformance, max_receive_pdu, None)
}

/// [`encode_initiate_request`] proposing a dedicated key for the association (only ever sent
/// ciphered: the key is in it).
pub fn encode_initiate_request_with(
    conformance: Conformance,
    max_receive_pdu: u16,
    dedicated_key: Option<&[u8; 16]>,
) -> Vec<u8> {
    let c = conformance.0.to_be_bytes();
    let mut initiate = vec![xdlms::INITIATE_REQUEST];
    match dedicated_key {
        Some(k) => {
            initiate.extend_from_slice(&[0x01, 0x10]);
            initiate.extend_from_slice(k);
        }
        None => initiate.push(0x00), // dedicated-key absent
    }
    initiate.extend_from_slice(&[
        0x00, // response-allowed: default (true)
        0x00, // proposed-quality-of-service absent
        xdlms::DLMS_VERSION,
        xdlms::CONFORMANCE_TAG[0],
        xdlms::CONFORMANCE_TAG[1],
        0x04,
        0x00, // unused bits
        c[1],
        c[2],
        c[3],
    ]);
    initiate.extend_from_slice(&max_receive_pdu.to_be_bytes());
    initiate
}

/// user-information [30]: an OCTET STRING holding the (possibly ciphered) initiate APDU.
fn put_user_information(body: &mut Vec<u8>, initiate: &[u8]) {
    let mut ui = vec![0x04];
    put_len(&mut ui, initiate.len());
    ui.extend_from_slice(initiate);
    body.push(0xBE);
    put_len(body, ui.len());
    body.extend_from_slice(&ui);
}

/// What an HLS-GMAC AARQ carries besides the fixed fields.
#[derive(Clone, Copy)]
pub struct HlsAarq<'a> {
    /// Our (the client's) system title: calling-AP-title.
    pub system_title: [u8; 8],
    /// Our challenge CtoS (8 to 64 bytes): calling-authentication-value.
    pub ctos: &'a [u8],
    /// The glo-initiate-request (ciphered [`encode_initiate_request`]).
    pub ciphered_initiate: &'a [u8],
}

/// Build an AARQ for HLS with GMAC (mechanism 5) in the ciphered LN context (security suite 0):
/// calling-AP-title, acse-requirements, mechanism-name, CtoS and the ciphered initiate-request.
pub fn encode_aarq_hls(p: &HlsAarq<'_>) -> Vec<u8> {
    let mut body = Vec::with_capacity(96 + p.ciphered_initiate.len());
    body.extend_from_slice(&[0xA1, 0x09, 0x06, 0x07]);
    body.extend_from_slice(&acse::CONTEXT_LN_CIPHERED);
    // calling-AP-title [6]: OCTET STRING system title.
    body.extend_from_slice(&[0xA6, 0x0A, 0x04, 0x08]);
    body.extend_from_slice(&p.system_title);
    body.extend_from_slice(&[0x8A, 0x02, 0x07, 0x80]);
    body.extend_from_slice(&[0x8B, 0x07]);
    body.extend_from_slice(&acse::MECHANISM_HLS_GMAC);
    let mut inner = vec![0x80];
    put_len(&mut inner, p.ctos.len());
    inner.extend_from_slice(p.ctos);
    body.push(0xAC);
    put_len(&mut body, inner.len());
    body.extend_from_slice(&inner);
    put_user_information(&mut body, p.ciphered_initiate);
    let mut out = vec![acse::AARQ];
    put_len(&mut out, body.len());
    out.extend_from_slice(&body);
    out
}

/// What an accepted AARE told us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Aare {
    /// Services the meter grants for this association.
    pub conformance: Conformance,
    /// Largest APDU the meter accepts from us.
    pub server_max_receive_pdu: u16,
    /// The meter's DLMS version.
    pub dlms_version: u8,
}

/// The fields of an AARE, before interpretation (an HLS client needs the ones [`parse_aare`]
/// skips, and must decipher the user-information itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AareParts {
    pub result: AssociationResult,
    pub diagnostic: AcseDiagnostic,
    /// Last arc of the application-context-name: 1 LN, 2 SN, 3 LN with ciphering, 4 SN with
    /// ciphering; 1 when the field is absent or oddly encoded.
    pub context: u8,
    /// responding-AP-title: the meter's system title (HLS-GMAC and ciphered contexts).
    pub responding_ap_title: Option<Vec<u8>>,
    /// responding-authentication-value: the meter's challenge StoC (HLS).
    pub responding_authentication: Option<Vec<u8>>,
    /// The user-information octet string: initiate-response, its glo- form, or an error APDU.
    pub user_information: Option<Vec<u8>>,
}

/// Split an AARE into its fields; decides nothing but the structure.
pub fn parse_aare_parts(buf: &[u8]) -> Result<AareParts> {
    check_error_apdu(buf)?;
    let mut r = Reader::new(buf);
    r.expect(acse::AARE, "aare")?;
    let n = r.bounded_len("aare length")?;
    let mut r = Reader::new(r.take(n, "aare")?);
    let mut result = None;
    let mut parts = AareParts {
        result: AssociationResult::Unknown(255),
        diagnostic: AcseDiagnostic::None,
        context: 1,
        responding_ap_title: None,
        responding_authentication: None,
        user_information: None,
    };
    while !r.is_empty() {
        let t = r.u8("aare field tag")?;
        let len = r.bounded_len("aare field length")?;
        let v = r.take(len, "aare field")?;
        match t {
            // 06 07 <oid>: the last byte says LN (1) / SN (2) / ciphered (3, 4). Odd encodings
            // are ignored.
            0xA1 if v.len() == 9 && v[..8] == [0x06, 0x07, 0x60, 0x85, 0x74, 0x05, 0x08, 0x01] => {
                parts.context = v[8];
            }
            0xA2 => {
                let mut f = Reader::new(v);
                f.expect(0x02, "association-result")?;
                let l = f.bounded_len("association-result")?;
                let b = f.take(l, "association-result")?;
                let code = *b.last().ok_or(Error::Truncated("association-result"))?;
                result = Some(match code {
                    0 => AssociationResult::Accepted,
                    1 => AssociationResult::RejectedPermanent,
                    2 => AssociationResult::RejectedTransient,
                    v => AssociationResult::Unknown(v),
                });
            }
            0xA3 => {
                let mut f = Reader::new(v);
                let which = f.u8("result-source-diagnostic")?;
                let _ = f.bounded_len("result-source-diagnostic")?;
                f.expect(0x02, "result-source-diagnostic")?;
                let l = f.bounded_len("result-source-diagnostic")?;
                let b = f.take(l, "result-source-diagnostic")?;
                let code = *b
                    .last()
                    .ok_or(Error::Truncated("result-source-diagnostic"))?;
                parts.diagnostic = match which {
                    0xA1 => AcseDiagnostic::User(code),
                    _ => AcseDiagnostic::Provider(code),
                };
            }
            // responding-AP-title [4]: OCTET STRING.
            0xA4 => {
                let mut f = Reader::new(v);
                f.expect(0x04, "responding-ap-title")?;
                let l = f.bounded_len("responding-ap-title")?;
                parts.responding_ap_title = Some(f.take(l, "responding-ap-title")?.to_vec());
            }
            // responding-authentication-value [10]: charstring [0].
            0xAA => {
                let mut f = Reader::new(v);
                f.expect(0x80, "responding-authentication-value")?;
                let l = f.bounded_len("responding-authentication-value")?;
                parts.responding_authentication =
                    Some(f.take(l, "responding-authentication-value")?.to_vec());
            }
            0xBE => {
                let mut f = Reader::new(v);
                f.expect(0x04, "user-information")?;
                let l = f.bounded_len("user-information")?;
                parts.user_information = Some(f.take(l, "user-information")?.to_vec());
            }
            // responder-acse-requirements, mechanism-name and anything else: not needed.
            _ => {}
        }
    }
    parts.result = result.ok_or(Error::Invalid("aare without association-result".into()))?;
    Ok(parts)
}

/// Parse an AARE. A rejection becomes [`Error::AssociationRejected`]. A missing mechanism-name
/// (common with LLS) is fine: only the result and the initiate-response matter to us.
pub fn parse_aare(buf: &[u8]) -> Result<Aare> {
    let parts = parse_aare_parts(buf)?;
    if parts.context != 1 {
        return Err(Error::Invalid(format!(
            "meter answered with application context {} (only LN without ciphering is supported here)",
            parts.context
        )));
    }
    if parts.result != AssociationResult::Accepted {
        return Err(Error::AssociationRejected {
            result: parts.result,
            diagnostic: parts.diagnostic,
        });
    }
    let ui = parts
        .user_information
        .ok_or(Error::Invalid("aare without initiate-response".into()))?;
    parse_initiate_response(&ui)
}

/// Parse a plain xDLMS InitiateResponse (or the error APDU a meter sends instead).
pub fn parse_initiate_response(ui: &[u8]) -> Result<Aare> {
    check_error_apdu(ui)?;
    let mut r = Reader::new(ui);
    r.expect(xdlms::INITIATE_RESPONSE, "initiate-response")?;
    if r.u8("negotiated-quality-of-service")? != 0 {
        r.u8("negotiated-quality-of-service")?;
    }
    let dlms_version = r.u8("dlms version")?;
    let ct = r.array::<2>("conformance tag")?;
    if ct != xdlms::CONFORMANCE_TAG {
        return Err(Error::UnexpectedTag {
            what: "conformance",
            tag: ct[0],
        });
    }
    let cl = r.len("conformance length")?;
    if cl != 4 {
        return Err(Error::Invalid(format!("conformance of {cl} bytes")));
    }
    let c = r.array::<4>("conformance")?;
    let conformance = Conformance(u32::from_be_bytes([0, c[1], c[2], c[3]]));
    let server_max_receive_pdu = r.u16("server-max-receive-pdu-size")?;
    // vaa-name (0x0007 for LN) follows; not needed.
    Ok(Aare {
        conformance,
        server_max_receive_pdu,
        dlms_version,
    })
}

/// RLRQ with reason "normal".
pub fn encode_rlrq() -> Vec<u8> {
    vec![acse::RLRQ, 0x03, 0x80, 0x01, 0x00]
}

/// Accept any RLRE (meters, Gurux included, send them with odd lengths); reject other APDUs.
pub fn parse_rlre(buf: &[u8]) -> Result<()> {
    check_error_apdu(buf)?;
    match buf.first() {
        Some(&acse::RLRE) => Ok(()),
        Some(&t) => Err(Error::UnexpectedTag {
            what: "rlre",
            tag: t,
        }),
        None => Err(Error::Truncated("rlre")),
    }
}

// ---------------------------------------------------------------------------------------------
// GET / SET / ACTION
// ---------------------------------------------------------------------------------------------

/// One attribute of one COSEM object (`Cosem-Attribute-Descriptor`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AttrRef {
    pub class_id: u16,
    pub obis: ObisCode,
    pub attribute: i8,
}

impl AttrRef {
    pub const fn new(class_id: u16, obis: ObisCode, attribute: i8) -> Self {
        AttrRef {
            class_id,
            obis,
            attribute,
        }
    }

    /// Encoded size in a GET/SET request: descriptor plus the absent access-selection.
    pub const ENCODED_LEN: usize = 2 + 6 + 1 + 1;

    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.class_id.to_be_bytes());
        out.extend_from_slice(self.obis.as_bytes());
        out.push(self.attribute as u8);
        out.push(0x00); // access-selection absent
    }
}

impl fmt::Display for AttrRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.class_id, self.obis, self.attribute)
    }
}

/// One method of one COSEM object (`Cosem-Method-Descriptor`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MethodRef {
    pub class_id: u16,
    pub obis: ObisCode,
    pub method: i8,
}

/// The value of one attribute, or why the meter could not give it.
pub type GetDataResult = std::result::Result<Data, DataAccessResult>;

/// GET-Request-Normal.
pub fn encode_get_normal(invoke: u8, attr: &AttrRef) -> Vec<u8> {
    let mut out = vec![xdlms::GET_REQUEST, 0x01, invoke];
    attr.encode(&mut out);
    out
}

/// GET-Request-Normal with selective access (`selector` and its parameters), e.g. a profile
/// buffer by range (1) or by entry (2).
pub fn encode_get_selective(invoke: u8, attr: &AttrRef, selector: u8, params: &Data) -> Vec<u8> {
    let mut out = vec![xdlms::GET_REQUEST, 0x01, invoke];
    attr.encode(&mut out);
    out.pop(); // replace the absent access-selection
    out.push(0x01);
    out.push(selector);
    params.encode(&mut out);
    out
}

/// Range descriptor (selector 1) of a Profile generic buffer: entries whose `restricting`
/// column (a clock: class 8, attribute 2) lies in `from..=to` (12-byte date-times); all columns.
pub fn range_descriptor(restricting: &CaptureObject, from: [u8; 12], to: [u8; 12]) -> Data {
    Data::Structure(vec![
        restricting.to_data(),
        Data::OctetString(from.to_vec()),
        Data::OctetString(to.to_vec()),
        Data::Array(Vec::new()),
    ])
}

/// Entry descriptor (selector 2): entries `from..=to` (1-based; `to` 0 = the last), all columns.
pub fn entry_descriptor(from: u32, to: u32) -> Data {
    Data::Structure(vec![
        Data::U32(from),
        Data::U32(to),
        Data::U16(1),
        Data::U16(0),
    ])
}

/// One column of a Profile generic buffer (an element of `capture_objects`, attribute 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CaptureObject {
    /// The captured attribute.
    pub attr: AttrRef,
    /// Element of an array/structure attribute; 0 = the whole attribute.
    pub data_index: u16,
}

impl CaptureObject {
    fn to_data(self) -> Data {
        Data::Structure(vec![
            Data::U16(self.attr.class_id),
            Data::OctetString(self.attr.obis.as_bytes().to_vec()),
            Data::I8(self.attr.attribute),
            Data::U16(self.data_index),
        ])
    }
}

/// `capture_objects` (attribute 3 of a Profile generic) as columns.
pub fn parse_capture_objects(d: &Data) -> Result<Vec<CaptureObject>> {
    let bad = || Error::Invalid("capture_objects is not an array of 4-element structures".into());
    let Data::Array(items) = d else {
        return Err(bad());
    };
    items
        .iter()
        .map(|it| {
            let Data::Structure(f) = it else {
                return Err(bad());
            };
            match f.as_slice() {
                [class, Data::OctetString(ln), attr, index] if ln.len() == 6 => {
                    let class = class
                        .as_i64()
                        .and_then(|v| u16::try_from(v).ok())
                        .ok_or_else(bad)?;
                    let attribute = attr
                        .as_i64()
                        .and_then(|v| i8::try_from(v).ok())
                        .ok_or_else(bad)?;
                    let data_index = index
                        .as_i64()
                        .and_then(|v| u16::try_from(v).ok())
                        .ok_or_else(bad)?;
                    let obis = ObisCode::new(ln[0], ln[1], ln[2], ln[3], ln[4], ln[5]);
                    Ok(CaptureObject {
                        attr: AttrRef::new(class, obis, attribute),
                        data_index,
                    })
                }
                _ => Err(bad()),
            }
        })
        .collect()
}

/// GET-Request-Next: ask for block `block` (the number of the last block received).
pub fn encode_get_next(invoke: u8, block: u32) -> Vec<u8> {
    let mut out = vec![xdlms::GET_REQUEST, 0x02, invoke];
    out.extend_from_slice(&block.to_be_bytes());
    out
}

/// GET-Request-With-List.
pub fn encode_get_with_list(invoke: u8, attrs: &[AttrRef]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + attrs.len() * AttrRef::ENCODED_LEN);
    out.extend_from_slice(&[xdlms::GET_REQUEST, 0x03, invoke]);
    put_len(&mut out, attrs.len());
    for a in attrs {
        a.encode(&mut out);
    }
    out
}

/// Encoded size of a GET-Request-With-List of `n` attributes.
pub fn get_with_list_len(n: usize) -> usize {
    let count_len = match n {
        0..=0x7F => 1,
        0x80..=0xFF => 2,
        _ => 3,
    };
    3 + count_len + n * AttrRef::ENCODED_LEN
}

/// A decoded GET-Response.
#[derive(Debug, Clone, PartialEq)]
pub enum GetResponse {
    /// get-response-normal: one result.
    Normal { invoke: u8, result: GetDataResult },
    /// get-response-with-datablock: one block of a long response.
    Block {
        invoke: u8,
        last: bool,
        block: u32,
        /// The raw bytes of this block, or why the meter aborted the transfer.
        raw: std::result::Result<Vec<u8>, DataAccessResult>,
    },
    /// get-response-with-list: one result per requested attribute.
    List {
        invoke: u8,
        results: Vec<GetDataResult>,
    },
}

fn read_get_data_result(r: &mut Reader<'_>) -> Result<GetDataResult> {
    match r.u8("get-data-result")? {
        0 => Ok(Ok(read_data(r, 0)?)),
        1 => Ok(Err(DataAccessResult::from_u8(r.u8("data-access-result")?))),
        t => Err(Error::UnexpectedTag {
            what: "get-data-result",
            tag: t,
        }),
    }
}

fn read_result_list(r: &mut Reader<'_>) -> Result<Vec<GetDataResult>> {
    let n = r.len("result count")?;
    if n > r.remaining() {
        return Err(Error::Truncated("result list"));
    }
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        v.push(read_get_data_result(r)?);
    }
    Ok(v)
}

/// Parse a GET-Response (or the exception / service error that replaced it).
pub fn parse_get_response(buf: &[u8]) -> Result<GetResponse> {
    check_error_apdu(buf)?;
    let mut r = Reader::new(buf);
    r.expect(xdlms::GET_RESPONSE, "get-response")?;
    let choice = r.u8("get-response choice")?;
    let invoke = r.u8("invoke-id")?;
    let resp = match choice {
        1 => GetResponse::Normal {
            invoke,
            result: read_get_data_result(&mut r)?,
        },
        2 => {
            let last = r.u8("last-block")? != 0;
            let block = r.u32("block-number")?;
            let raw = match r.u8("datablock result")? {
                0 => {
                    let n = r.bounded_len("raw-data")?;
                    Ok(r.take(n, "raw-data")?.to_vec())
                }
                1 => Err(DataAccessResult::from_u8(r.u8("data-access-result")?)),
                t => {
                    return Err(Error::UnexpectedTag {
                        what: "datablock result",
                        tag: t,
                    })
                }
            };
            GetResponse::Block {
                invoke,
                last,
                block,
                raw,
            }
        }
        3 => GetResponse::List {
            invoke,
            results: read_result_list(&mut r)?,
        },
        t => {
            return Err(Error::UnexpectedTag {
                what: "get-response choice",
                tag: t,
            })
        }
    };
    if !r.is_empty() {
        return Err(Error::Invalid(format!(
            "{} trailing bytes after get-response",
            r.remaining()
        )));
    }
    Ok(resp)
}

/// Decode the reassembled raw data of a block transfer that answered a GET-Request-Normal.
pub fn parse_block_data_normal(raw: &[u8]) -> Result<Data> {
    Data::decode_all(raw)
}

/// Decode the reassembled raw data of a block transfer that answered a GET-Request-With-List.
pub fn parse_block_data_list(raw: &[u8]) -> Result<Vec<GetDataResult>> {
    let mut r = Reader::new(raw);
    let v = read_result_list(&mut r)?;
    if !r.is_empty() {
        return Err(Error::Invalid("trailing bytes after result list".into()));
    }
    Ok(v)
}

/// SET-Request-Normal.
pub fn encode_set_normal(invoke: u8, attr: &AttrRef, value: &Data) -> Vec<u8> {
    let mut out = vec![xdlms::SET_REQUEST, 0x01, invoke];
    attr.encode(&mut out);
    value.encode(&mut out);
    out
}

/// Parse a SET-Response-Normal: the invoke byte and the result.
pub fn parse_set_response(buf: &[u8]) -> Result<(u8, DataAccessResult)> {
    check_error_apdu(buf)?;
    let mut r = Reader::new(buf);
    r.expect(xdlms::SET_RESPONSE, "set-response")?;
    r.expect(0x01, "set-response-normal")?;
    let invoke = r.u8("invoke-id")?;
    let res = DataAccessResult::from_u8(r.u8("data-access-result")?);
    Ok((invoke, res))
}

/// ACTION-Request-Normal with optional parameters.
pub fn encode_action_normal(invoke: u8, method: &MethodRef, params: Option<&Data>) -> Vec<u8> {
    let mut out = vec![xdlms::ACTION_REQUEST, 0x01, invoke];
    out.extend_from_slice(&method.class_id.to_be_bytes());
    out.extend_from_slice(method.obis.as_bytes());
    out.push(method.method as u8);
    match params {
        Some(d) => {
            out.push(0x01);
            d.encode(&mut out);
        }
        None => out.push(0x00),
    }
    out
}

/// What an ACTION-Response-Normal carried.
#[derive(Debug, Clone, PartialEq)]
pub struct ActionResponse {
    pub invoke: u8,
    /// action-result; the codes share the data-access-result table up to 19.
    pub result: DataAccessResult,
    /// Optional return parameters.
    pub returned: Option<GetDataResult>,
}

/// Parse an ACTION-Response-Normal.
pub fn parse_action_response(buf: &[u8]) -> Result<ActionResponse> {
    check_error_apdu(buf)?;
    let mut r = Reader::new(buf);
    r.expect(xdlms::ACTION_RESPONSE, "action-response")?;
    r.expect(0x01, "action-response-normal")?;
    let invoke = r.u8("invoke-id")?;
    let result = DataAccessResult::from_u8(r.u8("action-result")?);
    let returned = if r.is_empty() || r.u8("return-parameters")? == 0 {
        None
    } else {
        Some(read_get_data_result(&mut r)?)
    };
    Ok(ActionResponse {
        invoke,
        result,
        returned,
    })
}

/// Turn an exception-response or confirmed-service-error into its [`Error`]; Ok otherwise.
pub fn check_error_apdu(buf: &[u8]) -> Result<()> {
    let mut r = Reader::new(buf);
    match buf.first() {
        Some(&xdlms::EXCEPTION_RESPONSE) => {
            r.u8("exception-response")?;
            let state_error = r.u8("state-error")?;
            let service_error = r.u8("service-error").unwrap_or(0);
            Err(Error::Exception {
                state_error,
                service_error,
            })
        }
        Some(&xdlms::CONFIRMED_SERVICE_ERROR) => {
            r.u8("confirmed-service-error")?;
            let service = r.u8("service")?;
            let class = r.u8("service-error class")?;
            let code = r.u8("service-error code")?;
            Err(Error::ServiceError {
                service,
                class,
                code,
            })
        }
        Some(_) => Ok(()),
        None => Err(Error::Truncated("apdu")),
    }
}

/// The invoke-id field of a response (low 4 bits of the invoke-id-and-priority byte).
pub fn invoke_id(byte: u8) -> u8 {
    byte & 0x0F
}

// ---------------------------------------------------------------------------------------------
// Units
// ---------------------------------------------------------------------------------------------

/// Symbol of a DLMS physical unit (Blue Book "enumerated values for physical units");
/// `None` for "count" (255), "other" (254) and unknown codes.
pub fn unit_symbol(code: u8) -> Option<&'static str> {
    Some(match code {
        1 => "a",
        2 => "mo",
        3 => "wk",
        4 => "d",
        5 => "h",
        6 => "min",
        7 => "s",
        8 => "°",
        9 => "°C",
        10 => "currency",
        11 => "m",
        12 => "m/s",
        13 | 14 => "m³",
        15 | 16 => "m³/h",
        17 | 18 => "m³/d",
        19 => "l",
        20 => "kg",
        21 => "N",
        22 => "Nm",
        23 => "Pa",
        24 => "bar",
        25 => "J",
        26 => "J/h",
        27 => "W",
        28 => "VA",
        29 => "var",
        30 => "Wh",
        31 => "VAh",
        32 => "varh",
        33 => "A",
        34 => "C",
        35 => "V",
        36 => "V/m",
        37 => "F",
        38 => "Ω",
        39 => "Ωm²/m",
        40 => "Wb",
        41 => "T",
        42 => "A/m",
        43 => "H",
        44 => "Hz",
        45 => "1/(Wh)",
        46 => "1/(varh)",
        47 => "1/(VAh)",
        48 => "V²h",
        49 => "A²h",
        50 => "kg/s",
        51 => "S",
        52 => "K",
        53 => "1/(V²h)",
        54 => "1/(A²h)",
        55 => "1/m³",
        56 => "%",
        57 => "Ah",
        60 => "Wh/m³",
        61 => "J/m³",
        62 => "mol%",
        63 => "g/m³",
        64 => "Pa·s",
        65 => "J/kg",
        66 => "g/cm²",
        67 => "atm",
        70 => "dBm",
        71 => "dBµV",
        72 => "dB",
        _ => return None,
    })
}

/// Decode a register's scaler_unit (attribute 3): `structure { integer scaler, enum unit }`.
pub fn parse_scaler_unit(d: &Data) -> Result<(i8, u8)> {
    match d {
        Data::Structure(v) if v.len() == 2 => {
            let scaler = v[0]
                .as_i64()
                .and_then(|s| i8::try_from(s).ok())
                .ok_or_else(|| Error::Invalid(format!("scaler {:?}", v[0])))?;
            let unit = match v[1] {
                Data::Enum(u) | Data::U8(u) => u,
                ref other => return Err(Error::Invalid(format!("unit {other:?}"))),
            };
            Ok((scaler, unit))
        }
        other => Err(Error::Invalid(format!("scaler_unit {other:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VOLTAGE: ObisCode = ObisCode::new(1, 0, 32, 7, 0, 255);

    #[test]
    fn aarq_no_auth_matches_reference_bytes() {
        let aarq = encode_aarq(&AarqParams {
            password: None,
            conformance: Conformance(0x00_7E_1F),
            max_receive_pdu: 0xFFFF,
        });
        // Reference AARQ as sent by common clients (Green Book example, LN, no security).
        let want = [
            0x60, 0x1D, 0xA1, 0x09, 0x06, 0x07, 0x60, 0x85, 0x74, 0x05, 0x08, 0x01, 0x01, 0xBE,
            0x10, 0x04, 0x0E, 0x01, 0x00, 0x00, 0x00, 0x06, 0x5F, 0x1F, 0x04, 0x00, 0x00, 0x7E,
            0x1F, 0xFF, 0xFF,
        ];
        assert_eq!(aarq, want);
    }

    #[test]
    fn aarq_lls_carries_password() {
        let aarq = encode_aarq(&AarqParams {
            password: Some(b"12345678"),
            conformance: Conformance::CLIENT_PROPOSED,
            max_receive_pdu: 1024,
        });
        assert_eq!(aarq[0], 0x60);
        assert_eq!(aarq[1] as usize, aarq.len() - 2);
        let pos = aarq
            .windows(4)
            .position(|w| w == [0xAC, 0x0A, 0x80, 0x08])
            .expect("calling-authentication-value");
        assert_eq!(&aarq[pos + 4..pos + 12], b"12345678");
        assert!(aarq
            .windows(9)
            .any(|w| w[..2] == [0x8B, 0x07] && w[2..] == acse::MECHANISM_LLS));
    }

    fn aare_accepted(with_mechanism: bool) -> Vec<u8> {
        let mut body = vec![
            0xA1, 0x09, 0x06, 0x07, 0x60, 0x85, 0x74, 0x05, 0x08, 0x01, 0x01, 0xA2, 0x03, 0x02,
            0x01, 0x00, 0xA3, 0x05, 0xA1, 0x03, 0x02, 0x01, 0x00,
        ];
        if with_mechanism {
            body.extend_from_slice(&[0x88, 0x02, 0x07, 0x80, 0x89, 0x07]);
            body.extend_from_slice(&acse::MECHANISM_LLS);
        }
        body.extend_from_slice(&[
            0xBE, 0x10, 0x04, 0x0E, 0x08, 0x00, 0x06, 0x5F, 0x1F, 0x04, 0x00, 0x00, 0x1A, 0x1F,
            0x01, 0xF4, 0x00, 0x07,
        ]);
        let mut out = vec![0x61, body.len() as u8];
        out.extend_from_slice(&body);
        out
    }

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect()
    }

    /// Gurux's own client (GXDLMSSecureClient, gurux-dlms 1.0.203) sent this AARQ: HLS-GMAC,
    /// system title "ABCDEFGH", a 16-byte CtoS and its glo-initiate-request.
    const GURUX_HLS_AARQ: &str = "605da109060760857405080103a60a040841424344454647488a0207808b0760857405080205ac12801065acc4cefe164f931b021268f27cd717be230421211f3000000064ee64d83e86d28d6bd94ae16e164ce3b611af99257e4168080357";

    #[test]
    fn hls_aarq_is_laid_out_as_guruxs() {
        let gurux = unhex(GURUX_HLS_AARQ);
        let ctos = unhex("65acc4cefe164f931b021268f27cd717");
        let initiate = &gurux[gurux.len() - 33..];
        let ours = encode_aarq_hls(&HlsAarq {
            system_title: *b"ABCDEFGH",
            ctos: &ctos,
            ciphered_initiate: initiate,
        });
        assert_eq!(hex(&ours), hex(&gurux));
    }

    #[test]
    fn hls_aare_parts_and_initiate_response() {
        // The HLS AARE of tests/fixtures/gurux_hls_meter.py (accepted, authentication required).
        let aare = unhex("6169a109060760857405080103a203020100a305a10302010ea40a04084d4d4d0000bc614e88020780890760857405080205aa128010f6b27c683f325fc2932ac5601fcff413be230421281f30000000006048a9287105610c48b05c20b21e1f8281ced174ac196a025ee6");
        let p = parse_aare_parts(&aare).expect("parts");
        assert_eq!(p.result, AssociationResult::Accepted);
        assert_eq!(p.diagnostic, AcseDiagnostic::User(14));
        assert_eq!(p.context, 3);
        assert_eq!(p.responding_ap_title, Some(unhex("4d4d4d0000bc614e")));
        assert_eq!(
            p.responding_authentication,
            Some(unhex("f6b27c683f325fc2932ac5601fcff413"))
        );
        assert_eq!(p.user_information.as_deref().map(|u| u[0]), Some(0x28));
        // The plain reader refuses the ciphered context rather than misreading it.
        assert!(matches!(parse_aare(&aare), Err(Error::Invalid(_))));
        let plain = unhex("0800065f1f040000181d04000007");
        let a = parse_initiate_response(&plain).expect("initiate-response");
        assert_eq!(a.server_max_receive_pdu, 0x0400);
        assert_eq!(a.dlms_version, 6);
        for cut in 0..aare.len() {
            let _ = parse_aare_parts(&aare[..cut]);
        }
    }

    #[test]
    fn aare_accepted_with_and_without_mechanism_name() {
        for m in [true, false] {
            let a = parse_aare(&aare_accepted(m)).expect("accepted");
            assert_eq!(a.server_max_receive_pdu, 500);
            assert_eq!(a.dlms_version, 6);
            assert!(a.conformance.has(Conformance::GET));
            assert!(a.conformance.has(Conformance::MULTIPLE_REFERENCES));
            assert!(a.conformance.has(Conformance::BLOCK_TRANSFER_WITH_GET));
            assert!(!a.conformance.has(Conformance::PRIORITY_MGMT));
        }
    }

    #[test]
    fn aare_rejected_names_the_reason() {
        let aare = [
            0x61, 0x29, 0xA1, 0x09, 0x06, 0x07, 0x60, 0x85, 0x74, 0x05, 0x08, 0x01, 0x01, 0xA2,
            0x03, 0x02, 0x01, 0x01, 0xA3, 0x05, 0xA1, 0x03, 0x02, 0x01, 0x0D, 0xBE, 0x10, 0x04,
            0x0E, 0x08, 0x00, 0x06, 0x5F, 0x1F, 0x04, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x07,
        ];
        let err = parse_aare(&aare[..]).expect_err("rejected");
        match &err {
            Error::AssociationRejected { result, diagnostic } => {
                assert_eq!(*result, AssociationResult::RejectedPermanent);
                assert!(diagnostic.is_authentication());
            }
            other => panic!("{other:?}"),
        }
        assert!(err.to_string().contains("authentication failure"), "{err}");
    }

    #[test]
    fn data_round_trips() {
        let values = vec![
            Data::Null,
            Data::Bool(true),
            Data::BitString {
                bits: 10,
                bytes: vec![0xAB, 0xC0],
            },
            Data::I32(-5),
            Data::U32(123_456),
            Data::OctetString(b"MSE0000012345678".to_vec()),
            Data::VisibleString(b"abc".to_vec()),
            Data::Utf8String("žluť".into()),
            Data::Bcd(0x42),
            Data::I8(-2),
            Data::I16(-300),
            Data::U8(7),
            Data::U16(23_012),
            Data::I64(-1),
            Data::U64(u64::MAX),
            Data::Enum(35),
            Data::F32(1.5),
            Data::F64(-2.25),
            Data::DateTime([0x07, 0xEA, 11, 22, 7, 5, 6, 7, 0xFF, 0x80, 0x00, 0x00]),
            Data::Date([0x07, 0xEA, 11, 22, 7]),
            Data::Time([5, 6, 7, 0]),
            Data::OctetString(vec![0; 300]),
        ];
        let nested = Data::Array(vec![
            Data::Structure(values.clone()),
            Data::Structure(vec![Data::I8(-2), Data::Enum(35)]),
        ]);
        for v in values.iter().chain([&nested]) {
            let bytes = v.to_bytes();
            assert_eq!(
                &Data::decode_all(&bytes).expect("decode"),
                v,
                "{bytes:02x?}"
            );
        }
    }

    #[test]
    fn compact_array_decodes() {
        // compact-array of structure{long-unsigned, integer}, two elements.
        let bytes = [
            0x13, 0x02, 0x02, 0x12, 0x0F, 0x06, 0x00, 0x01, 0xFF, 0x00, 0x02, 0xFE,
        ];
        let d = Data::decode_all(&bytes).expect("compact array");
        assert_eq!(
            d,
            Data::Array(vec![
                Data::Structure(vec![Data::U16(1), Data::I8(-1)]),
                Data::Structure(vec![Data::U16(2), Data::I8(-2)]),
            ])
        );
        // Zero-width elements are refused instead of looping.
        assert!(Data::decode_all(&[0x13, 0x00, 0x01, 0x00]).is_err());
    }

    #[test]
    fn get_requests_encode() {
        let a = AttrRef::new(3, VOLTAGE, 2);
        assert_eq!(
            encode_get_normal(0xC1, &a),
            [0xC0, 0x01, 0xC1, 0x00, 0x03, 1, 0, 32, 7, 0, 255, 0x02, 0x00]
        );
        assert_eq!(
            encode_get_next(0xC1, 3),
            [0xC0, 0x02, 0xC1, 0x00, 0x00, 0x00, 0x03]
        );
        let l = encode_get_with_list(0xC2, &[a, AttrRef::new(3, VOLTAGE, 3)]);
        assert_eq!(l.len(), get_with_list_len(2));
        assert_eq!(&l[..4], &[0xC0, 0x03, 0xC2, 0x02]);
    }

    #[test]
    fn get_responses_decode() {
        let n = parse_get_response(&[0xC4, 0x01, 0xC1, 0x00, 0x12, 0x59, 0xE4]).expect("normal");
        assert_eq!(
            n,
            GetResponse::Normal {
                invoke: 0xC1,
                result: Ok(Data::U16(23012))
            }
        );
        let e = parse_get_response(&[0xC4, 0x01, 0xC1, 0x01, 0x04]).expect("dar");
        assert_eq!(
            e,
            GetResponse::Normal {
                invoke: 0xC1,
                result: Err(DataAccessResult::ObjectUndefined)
            }
        );
        let l = parse_get_response(&[
            0xC4, 0x03, 0xC1, 0x03, 0x00, 0x12, 0x59, 0xE4, 0x01, 0x04, 0x00, 0x02, 0x02, 0x0F,
            0xFE, 0x16, 0x23,
        ])
        .expect("list");
        assert_eq!(
            l,
            GetResponse::List {
                invoke: 0xC1,
                results: vec![
                    Ok(Data::U16(23012)),
                    Err(DataAccessResult::ObjectUndefined),
                    Ok(Data::Structure(vec![Data::I8(-2), Data::Enum(35)])),
                ]
            }
        );
        let b = parse_get_response(&[
            0xC4, 0x02, 0xC1, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00, 0x03, 0x01, 0x02, 0x03,
        ])
        .expect("block");
        assert_eq!(
            b,
            GetResponse::Block {
                invoke: 0xC1,
                last: false,
                block: 1,
                raw: Ok(vec![1, 2, 3])
            }
        );
        assert_eq!(
            parse_block_data_list(&[0x02, 0x00, 0x11, 0x05, 0x01, 0x03]).expect("list"),
            vec![Ok(Data::U8(5)), Err(DataAccessResult::ReadWriteDenied)]
        );
    }

    #[test]
    fn set_and_action() {
        let a = AttrRef::new(1, ObisCode::new(0, 0, 96, 1, 0, 255), 2);
        let s = encode_set_normal(0xC1, &a, &Data::U8(1));
        assert_eq!(&s[..3], &[0xC1, 0x01, 0xC1]);
        assert_eq!(&s[s.len() - 3..], &[0x00, 0x11, 0x01]);
        assert_eq!(
            parse_set_response(&[0xC5, 0x01, 0xC1, 0x00]).expect("set"),
            (0xC1, DataAccessResult::Success)
        );
        let m = MethodRef {
            class_id: 70,
            obis: ObisCode::new(0, 0, 96, 3, 10, 255),
            method: 1,
        };
        let act = encode_action_normal(0xC1, &m, Some(&Data::I8(0)));
        assert_eq!(act[..5], [0xC3, 0x01, 0xC1, 0x00, 0x46]);
        assert_eq!(act[act.len() - 3..], [0x01, 0x0F, 0x00]);
        let r = parse_action_response(&[0xC7, 0x01, 0xC1, 0x00, 0x01, 0x00, 0x11, 0x09])
            .expect("action");
        assert_eq!(r.result, DataAccessResult::Success);
        assert_eq!(r.returned, Some(Ok(Data::U8(9))));
        assert!(parse_action_response(&[0xC7, 0x01, 0xC1, 0x00])
            .expect("short")
            .returned
            .is_none());
    }

    #[test]
    fn error_apdus() {
        assert_eq!(
            parse_get_response(&[0xD8, 0x01, 0x03]),
            Err(Error::Exception {
                state_error: 1,
                service_error: 3
            })
        );
        assert_eq!(
            parse_set_response(&[0x0E, 0x06, 0x06, 0x02]),
            Err(Error::ServiceError {
                service: 6,
                class: 6,
                code: 2
            })
        );
        assert!(parse_rlre(&[0x63, 0x00]).is_ok());
        assert!(parse_rlre(&[0x61]).is_err());
        assert_eq!(encode_rlrq(), [0x62, 0x03, 0x80, 0x01, 0x00]);
    }

    #[test]
    fn display_of_values() {
        let clock = Data::OctetString(vec![0x07, 0xEA, 11, 22, 7, 5, 6, 7, 0xFF, 0x80, 0, 0]);
        assert_eq!(clock.to_string(), "2026-11-22 05:06:07");
        assert_eq!(
            Data::OctetString(b"MSE012345678".to_vec()).to_string(),
            "MSE012345678"
        );
        assert_eq!(Data::OctetString(vec![0, 1, 0xAB]).to_string(), "0001AB");
        assert_eq!(Data::I16(-3).to_string(), "-3");
        assert_eq!(
            Data::Structure(vec![Data::I8(-2), Data::Enum(35)]).to_string(),
            "{-2, 35}"
        );
    }

    #[test]
    fn scaler_unit_and_symbols() {
        let d = Data::Structure(vec![Data::I8(-2), Data::Enum(35)]);
        assert_eq!(parse_scaler_unit(&d), Ok((-2, 35)));
        assert!(parse_scaler_unit(&Data::U8(1)).is_err());
        assert_eq!(unit_symbol(35), Some("V"));
        assert_eq!(unit_symbol(33), Some("A"));
        assert_eq!(unit_symbol(44), Some("Hz"));
        assert_eq!(unit_symbol(27), Some("W"));
        assert_eq!(unit_symbol(30), Some("Wh"));
        assert_eq!(unit_symbol(29), Some("var"));
        assert_eq!(unit_symbol(28), Some("VA"));
        assert_eq!(unit_symbol(255), None);
    }

    /// Small deterministic generator so the fuzz loop needs no extra crate.
    fn xorshift(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    #[test]
    fn truncated_and_corrupted_input_never_panics() {
        let samples: Vec<Vec<u8>> = vec![
            aare_accepted(false),
            aare_accepted(true),
            vec![
                0xC4, 0x03, 0xC1, 0x03, 0x00, 0x12, 0x59, 0xE4, 0x01, 0x04, 0x00, 0x02, 0x02, 0x0F,
                0xFE, 0x16, 0x23,
            ],
            vec![
                0xC4, 0x02, 0xC1, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00, 0x03, 1, 2, 3,
            ],
            vec![0xC7, 0x01, 0xC1, 0x00, 0x01, 0x00, 0x11, 0x09],
            Data::Array(vec![Data::Structure(vec![
                Data::OctetString(vec![1; 20]),
                Data::U64(7),
            ])])
            .to_bytes(),
            vec![
                0x13, 0x02, 0x02, 0x12, 0x0F, 0x06, 0x00, 0x01, 0xFF, 0x00, 0x02, 0xFE,
            ],
        ];
        let decode_all = |b: &[u8]| {
            let _ = parse_aare(b);
            let _ = parse_get_response(b);
            let _ = parse_set_response(b);
            let _ = parse_action_response(b);
            let _ = parse_rlre(b);
            let _ = parse_block_data_list(b);
            let _ = Data::decode(b);
        };
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        for s in &samples {
            for cut in 0..s.len() {
                decode_all(&s[..cut]);
                if cut < s.len() {
                    // A strict prefix of a valid APDU must be an error, never a value.
                    assert!(parse_get_response(&s[..cut]).is_err() || s[0] != 0xC4);
                }
            }
            for _ in 0..2000 {
                let mut m = s.clone();
                let i = (xorshift(&mut seed) as usize) % m.len();
                m[i] = xorshift(&mut seed) as u8;
                let cut = (xorshift(&mut seed) as usize) % (m.len() + 1);
                decode_all(&m[..cut]);
            }
        }
        // Pure noise, including huge declared lengths and deep nesting.
        for _ in 0..20_000 {
            let n = (xorshift(&mut seed) % 64) as usize;
            let b: Vec<u8> = (0..n).map(|_| xorshift(&mut seed) as u8).collect();
            decode_all(&b);
        }
        decode_all(&[0x01; 200]);
        decode_all(&[0x01, 0x84, 0xFF, 0xFF, 0xFF, 0xFF]);
    }
}
