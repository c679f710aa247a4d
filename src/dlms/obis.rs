//! OBIS codes (IEC 62056-6-1): the six-byte logical name of a COSEM object.
//!
//! Parses the dotted (`1.0.32.7.0.255`) and the IEC display (`1-0:32.7.0*255`) forms, prints the
//! dotted form, and (de)serialises as that string. Pure: no I/O, no knowledge of classes or units.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a string is not an OBIS code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Wrong number of groups or a group that is not 0..=255.
    #[error("`{0}` is not an OBIS code like 1.0.32.7.0.255")]
    Invalid(String),
}

/// A COSEM logical name, e.g. `1.0.32.7.0.255` (voltage L1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObisCode(pub [u8; 6]);

impl ObisCode {
    /// Build from the six groups A..F.
    pub const fn new(a: u8, b: u8, c: u8, d: u8, e: u8, f: u8) -> Self {
        ObisCode([a, b, c, d, e, f])
    }

    /// The six bytes as they go on the wire.
    pub fn as_bytes(&self) -> &[u8; 6] {
        &self.0
    }
}

impl FromStr for ObisCode {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let invalid = || Error::Invalid(s.to_string());
        let mut out = [0u8; 6];
        let mut n = 0;
        for part in s.trim().split(['.', '-', ':', '*']) {
            let slot = out.get_mut(n).ok_or_else(invalid)?;
            let p = part.trim();
            if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
                return Err(invalid());
            }
            *slot = p.parse::<u8>().map_err(|_| invalid())?;
            n += 1;
        }
        if n != 6 {
            return Err(invalid());
        }
        Ok(ObisCode(out))
    }
}

impl fmt::Display for ObisCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a}.{b}.{c}.{d}.{e}.{g}")
    }
}

impl Serialize for ObisCode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ObisCode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_forms() {
        let want = ObisCode::new(1, 0, 32, 7, 0, 255);
        assert_eq!("1.0.32.7.0.255".parse::<ObisCode>(), Ok(want));
        assert_eq!("1-0:32.7.0*255".parse::<ObisCode>(), Ok(want));
        assert_eq!(" 1.0.32.7.0.255 ".parse::<ObisCode>(), Ok(want));
    }

    #[test]
    fn rejects_garbage() {
        for s in [
            "",
            "1.0.32.7.0",
            "1.0.32.7.0.256",
            "1.0.32.7.0.255.1",
            "a.0.32.7.0.255",
            "1..32.7.0.255",
            "-1.0.32.7.0.255",
            "+1.0.32.7.0.255",
        ] {
            assert!(s.parse::<ObisCode>().is_err(), "{s:?} accepted");
        }
    }

    #[test]
    fn display_and_serde_round_trip() {
        let o = ObisCode::new(0, 0, 1, 0, 0, 255);
        assert_eq!(o.to_string(), "0.0.1.0.0.255");
        let json = serde_json::to_string(&o).expect("serialise");
        assert_eq!(json, "\"0.0.1.0.0.255\"");
        assert_eq!(serde_json::from_str::<ObisCode>(&json).expect("parse"), o);
        assert!(serde_json::from_str::<ObisCode>("\"1.2\"").is_err());
    }
}
