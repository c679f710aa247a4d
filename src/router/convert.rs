//! Datapoint type conversions and `bytes`-converter payload slices, as tb-gateway's MQTT
//! connector applies them (spec §6.3). Pure functions of their inputs, table-tested; no I/O, no
//! clock, and no input can make them panic.

use std::str::FromStr;

use serde_json::{Number, Value};

/// Why a conversion setting could not be compiled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A `type` that tb-gateway does not know.
    #[error("unknown datapoint type `{0}` (known: string, double, float, integer, int, long, boolean, bool, raw)")]
    UnknownType(String),
    /// A bytes expression that is not `[start:end]`.
    #[error("`{0}` is not a byte slice like [0:4], [4:] or [:]")]
    BadSlice(String),
}

/// The `type` of an `attributes`/`timeseries` entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataType {
    /// Text; non-strings become their JSON text.
    String,
    /// 64-bit float; text that parses as a number is converted, anything else stays a string.
    Double,
    /// Python's `int(float(x))`: truncated toward zero; failure keeps the string.
    Integer,
    /// `true/false/yes/no/on/off/1/0/t/f/y/n`, numbers by non-zero; failure keeps the string.
    Boolean,
    /// The value exactly as selected.
    Raw,
}

impl FromStr for DataType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Ok(match s.trim().to_ascii_lowercase().as_str() {
            "string" | "str" => DataType::String,
            "double" | "float" => DataType::Double,
            "integer" | "int" | "long" => DataType::Integer,
            "boolean" | "bool" => DataType::Boolean,
            "raw" | "" => DataType::Raw,
            _ => return Err(Error::UnknownType(s.to_string())),
        })
    }
}

/// Convert one selected value to `ty`. Objects and arrays are passed through unchanged except
/// for `String`, which renders them as JSON text.
pub fn convert(v: &Value, ty: DataType) -> Value {
    match ty {
        DataType::Raw => v.clone(),
        DataType::String => match v {
            Value::String(_) => v.clone(),
            other => Value::String(other.to_string()),
        },
        DataType::Double => match as_f64(v) {
            Some(f) => Number::from_f64(f)
                .map(Value::Number)
                .unwrap_or_else(|| to_text(v)),
            None => to_text(v),
        },
        DataType::Integer => match v {
            Value::Number(n) if n.is_i64() || n.is_u64() => v.clone(),
            _ => match as_f64(v) {
                Some(f) if f.is_finite() && f.trunc().abs() < 9.2e18 => {
                    Value::Number(Number::from(f.trunc() as i64))
                }
                _ => to_text(v),
            },
        },
        DataType::Boolean => match v {
            Value::Bool(_) => v.clone(),
            Value::Number(n) => Value::Bool(n.as_f64().is_some_and(|f| f != 0.0)),
            Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
                "true" | "yes" | "on" | "1" | "t" | "y" => Value::Bool(true),
                "false" | "no" | "off" | "0" | "f" | "n" => Value::Bool(false),
                _ => v.clone(),
            },
            _ => v.clone(),
        },
    }
}

fn as_f64(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok().filter(|f| f.is_finite()),
        Value::Bool(b) => Some(if *b { 1.0 } else { 0.0 }),
        _ => None,
    }
}

fn to_text(v: &Value) -> Value {
    match v {
        Value::String(_) => v.clone(),
        other => Value::String(other.to_string()),
    }
}

/// A Python-style slice `[start:end]` over the raw payload of a `bytes` converter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSlice {
    start: Option<i64>,
    end: Option<i64>,
}

impl ByteSlice {
    /// Parse `[0:4]`, `[4:]`, `[:]`, `[-2:]`, `[3]` (one byte); `${[0:4]}` is accepted too.
    pub fn parse(text: &str) -> Result<Self, Error> {
        let bad = || Error::BadSlice(text.to_string());
        let t = text.trim();
        let t = t
            .strip_prefix("${")
            .and_then(|x| x.strip_suffix('}'))
            .unwrap_or(t)
            .trim();
        let inner = t
            .strip_prefix('[')
            .and_then(|x| x.strip_suffix(']'))
            .ok_or_else(bad)?;
        let num = |s: &str| -> Result<Option<i64>, Error> {
            let s = s.trim();
            if s.is_empty() {
                Ok(None)
            } else {
                s.parse::<i64>().map(Some).map_err(|_| bad())
            }
        };
        match inner.split_once(':') {
            Some((a, b)) => Ok(ByteSlice {
                start: num(a)?,
                end: num(b)?,
            }),
            None => {
                let i = num(inner)?.ok_or_else(bad)?;
                Ok(ByteSlice {
                    start: Some(i),
                    end: Some(if i == -1 { i64::MAX } else { i + 1 }),
                })
            }
        }
    }

    /// The selected bytes (empty when out of range, like Python).
    pub fn apply<'a>(&self, data: &'a [u8]) -> &'a [u8] {
        let len = data.len() as i64;
        let clamp = |i: i64| -> usize {
            let i = if i < 0 { len + i } else { i };
            i.clamp(0, len) as usize
        };
        let s = self.start.map(clamp).unwrap_or(0);
        let e = self.end.map(clamp).unwrap_or(data.len());
        if s >= e {
            &[]
        } else {
            &data[s..e]
        }
    }
}

/// Bytes as a value: lower-case hex in `hex_mode`, otherwise text (invalid UTF-8 replaced).
pub fn bytes_value(b: &[u8], hex_mode: bool) -> Value {
    if hex_mode {
        let mut s = String::with_capacity(b.len() * 2);
        for x in b {
            s.push(char::from_digit((x >> 4) as u32, 16).unwrap_or('0'));
            s.push(char::from_digit((x & 0xf) as u32, 16).unwrap_or('0'));
        }
        Value::String(s)
    } else {
        Value::String(String::from_utf8_lossy(b).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn type_names() {
        for (s, t) in [
            ("string", DataType::String),
            ("double", DataType::Double),
            ("float", DataType::Double),
            ("integer", DataType::Integer),
            ("int", DataType::Integer),
            ("long", DataType::Integer),
            ("boolean", DataType::Boolean),
            ("bool", DataType::Boolean),
            ("raw", DataType::Raw),
            ("Double", DataType::Double),
        ] {
            assert_eq!(s.parse::<DataType>(), Ok(t), "{s}");
        }
        assert!("decimal".parse::<DataType>().is_err());
    }

    #[test]
    fn conversions() {
        use DataType::*;
        let cases: &[(Value, DataType, Value)] = &[
            (json!(230.1), Double, json!(230.1)),
            (json!(230), Double, json!(230.0)),
            (json!("230.5"), Double, json!(230.5)),
            (json!(" 7 "), Double, json!(7.0)),
            (json!("abc"), Double, json!("abc")),
            (json!("NaN"), Double, json!("NaN")),
            (json!(true), Double, json!(1.0)),
            (json!({"a": 1}), Double, json!(r#"{"a":1}"#)),
            (json!(12.9), Integer, json!(12)),
            (json!(-12.9), Integer, json!(-12)),
            (json!("12.9"), Integer, json!(12)),
            (json!("0012"), Integer, json!(12)),
            (json!(42), Integer, json!(42)),
            (json!(1e300), Integer, json!("1e+300")),
            (json!("x"), Integer, json!("x")),
            (json!(5), String, json!("5")),
            (json!(true), String, json!("true")),
            (json!("s"), String, json!("s")),
            (json!("yes"), Boolean, json!(true)),
            (json!("OFF"), Boolean, json!(false)),
            (json!("1"), Boolean, json!(true)),
            (json!(0), Boolean, json!(false)),
            (json!(2.5), Boolean, json!(true)),
            (json!("maybe"), Boolean, json!("maybe")),
            (json!([1, 2]), Raw, json!([1, 2])),
        ];
        for (v, t, want) in cases {
            assert_eq!(convert(v, *t), *want, "{v} as {t:?}");
        }
    }

    #[test]
    fn byte_slices() {
        let data = b"ABCDEFGH";
        let cases: &[(&str, &[u8])] = &[
            ("[0:4]", b"ABCD"),
            ("[4:]", b"EFGH"),
            ("[:]", b"ABCDEFGH"),
            ("[:2]", b"AB"),
            ("[-2:]", b"GH"),
            ("[2]", b"C"),
            ("[-1]", b"H"),
            ("[6:100]", b"GH"),
            ("[5:2]", b""),
            ("${[0:1]}", b"A"),
        ];
        for (s, want) in cases {
            let sl = ByteSlice::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"));
            assert_eq!(sl.apply(data), *want, "{s}");
        }
        for bad in ["", "0:4", "[a:b]", "[", "[]"] {
            assert!(ByteSlice::parse(bad).is_err(), "{bad:?} should fail");
        }
    }

    #[test]
    fn bytes_as_values() {
        assert_eq!(bytes_value(&[0x0a, 0xff], true), json!("0aff"));
        assert_eq!(bytes_value(b"ok", false), json!("ok"));
        assert_eq!(bytes_value(&[0xff], false), json!("\u{fffd}"));
    }
}
