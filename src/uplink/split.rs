//! Splitting one record that would not fit one ThingsBoard publish into several that do: a
//! telemetry entry's values are spread over entries with the same `ts` (so every key of a
//! timestamp still arrives, only in several publishes), attributes over several maps. Only a
//! single value that alone exceeds the limit is refused, and reported by device and key.
//!
//! Pure: records in, records out. The router applies it before a record becomes durable, so
//! every stored row fits a publish on its own and is acked by exactly one PUBACK.

use serde_json::{Map, Value};

use super::thingsboard::{publish_overhead, TOPIC_ATTRIBUTES, TOPIC_TELEMETRY};
use crate::model::{Record, RecordKind};

/// Bytes kept for the device name in `{"<device>":..}`: the longest name ThingsBoard accepts
/// (255 bytes), JSON-escaped at worst, so a later rename cannot push a part over the limit.
const DEVICE_NAME_RESERVE: usize = 2 * crate::model::MAX_DEVICE_NAME_LEN + 2;

/// A value refused because it alone needs a larger packet than allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Oversize {
    pub device: String,
    pub key: String,
    /// Bytes the publish would need with this value alone.
    pub needed: usize,
    pub max: usize,
}

/// Bytes a publish of `record` needs, with the device name at its reserved worst case.
fn fixed_cost(rec: &Record) -> Option<usize> {
    let name = json_string_len(&rec.device).max(DEVICE_NAME_RESERVE);
    match rec.kind {
        // `{"dev":[` entry `]}`, entry = `{"ts":N,"values":{` k:v,.. `}}`
        RecordKind::Telemetry => {
            let ts = match rec.payload.get("ts")? {
                Value::Number(n) => match n.as_i64() {
                    Some(i) => decimal_len(i),
                    None => n.to_string().len(),
                },
                other => other.to_string().len(),
            };
            Some(publish_overhead(TOPIC_TELEMETRY) + name + 4 + 6 + ts + 12 + 2)
        }
        // `{"dev":{` k:v,.. `}}`
        RecordKind::Attributes => Some(publish_overhead(TOPIC_ATTRIBUTES) + name + 4),
        _ => None,
    }
}

/// Length of `s` as a JSON string literal, quotes included, as serde_json writes it (`"` and
/// `\\` and the short control escapes take 2 bytes, other control characters 6), without
/// building it: this runs for every record the router stores.
fn json_string_len(s: &str) -> usize {
    2 + s
        .bytes()
        .map(|b| match b {
            b'"' | b'\\' | 0x08 | 0x0c | b'\n' | b'\r' | b'\t' => 2,
            0..=0x1f => 6,
            _ => 1,
        })
        .sum::<usize>()
}

/// Digits (and sign) of `i` in decimal.
fn decimal_len(i: i64) -> usize {
    let sign = usize::from(i < 0);
    sign + i
        .unsigned_abs()
        .checked_ilog10()
        .map_or(1, |d| d as usize + 1)
}

/// True when `rec`, whose payload serialises to `payload_len` bytes, fits one publish as it is:
/// [`split_record`] would return it unchanged. A cheap test on the text the router has anyway
/// (the payload's text is never shorter than the sum of its entries that `split_record`
/// measures one by one).
pub fn fits_as_is(rec: &Record, payload_len: usize, max_packet_size: usize) -> bool {
    fixed_cost(rec).is_none_or(|fixed| fixed + payload_len <= max_packet_size)
}

/// Split `rec` so that every part fits a publish of at most `max_packet_size` bytes. Records of
/// other kinds, and records that fit, come back unchanged.
pub fn split_record(rec: Record, max_packet_size: usize) -> (Vec<Record>, Vec<Oversize>) {
    let Some(fixed) = fixed_cost(&rec) else {
        return (vec![rec], Vec::new());
    };
    let values = match rec.kind {
        RecordKind::Telemetry => rec.payload.get("values").and_then(Value::as_object),
        _ => rec.payload.as_object(),
    };
    let Some(values) = values else {
        return (vec![rec], Vec::new());
    };
    let cost = |k: &String, v: &Value| {
        Value::String(k.clone()).to_string().len() + 1 + v.to_string().len() + 1
    };
    let total: usize = fixed + values.iter().map(|(k, v)| cost(k, v)).sum::<usize>();
    if total <= max_packet_size {
        return (vec![rec], Vec::new());
    }
    let mut parts: Vec<Map<String, Value>> = Vec::new();
    let mut oversize = Vec::new();
    let mut current = Map::new();
    let mut used = fixed;
    for (k, v) in values {
        let c = cost(k, v);
        if fixed + c > max_packet_size {
            oversize.push(Oversize {
                device: rec.device.clone(),
                key: k.clone(),
                needed: fixed + c,
                max: max_packet_size,
            });
            continue;
        }
        if used + c > max_packet_size && !current.is_empty() {
            parts.push(std::mem::take(&mut current));
            used = fixed;
        }
        current.insert(k.clone(), v.clone());
        used += c;
    }
    if !current.is_empty() {
        parts.push(current);
    }
    let out = parts
        .into_iter()
        .map(|values| match rec.kind {
            RecordKind::Telemetry => {
                let mut payload = rec.payload.clone();
                payload["values"] = Value::Object(values);
                Record {
                    payload,
                    ..rec.clone()
                }
            }
            _ => Record {
                payload: Value::Object(values),
                ..rec.clone()
            },
        })
        .collect();
    (out, oversize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::uplink::thingsboard::{attribute_batches, telemetry_batches};
    use serde_json::json;

    #[test]
    fn a_large_entry_is_split_by_key_under_the_limit_with_the_same_ts() {
        let mut values = Map::new();
        for i in 0..9_000 {
            values.insert(format!("key_{i:05}"), json!(i as f64 + 0.25));
        }
        let rec = Record::telemetry("Meter 1", "T", 1_700_000_000_000, values.clone());
        let max = 65_536;
        let (parts, oversize) = split_record(rec, max);
        assert!(oversize.is_empty());
        assert!(parts.len() > 1);
        let mut seen = Map::new();
        for (i, p) in parts.iter().enumerate() {
            assert_eq!(p.payload["ts"], json!(1_700_000_000_000i64));
            let (batches, rej) = telemetry_batches("Meter 1", &[(i as i64, &p.payload)], max);
            assert!(rej.is_empty());
            assert_eq!(batches.len(), 1);
            assert!(publish_overhead(TOPIC_TELEMETRY) + batches[0].payload.len() <= max);
            seen.extend(p.payload["values"].as_object().unwrap().clone());
        }
        assert_eq!(seen, values);
    }

    /// The router's shortcut: a record `fits_as_is` says fits is one `split_record` returns
    /// unchanged, at every limit around its size.
    #[test]
    fn lengths_match_what_serde_json_writes() {
        for s in [
            "",
            "meter-0007",
            "a\"b\\c",
            "tab\there\n\r",
            "\u{1}\u{1f}\u{7f}",
            "zählerß€",
        ] {
            assert_eq!(
                json_string_len(s),
                Value::from(s).to_string().len(),
                "{s:?}"
            );
        }
        for i in [
            0,
            7,
            9,
            10,
            99,
            100,
            -1,
            -10,
            1_700_000_000_000,
            i64::MAX,
            i64::MIN,
        ] {
            assert_eq!(decimal_len(i), i.to_string().len(), "{i}");
        }
    }

    #[test]
    fn fits_as_is_agrees_with_split_record() {
        let mut values = Map::new();
        for i in 0..40 {
            values.insert(format!("key_{i}"), json!(i as f64 + 0.5));
        }
        let records = [
            Record::telemetry("Meter 1", "T", 1_700_000_000_000, values.clone()),
            Record::attributes("Meter 1", "T", values),
        ];
        for rec in records {
            let len = serde_json::to_string(&rec.payload).unwrap().len();
            let mut fitted = 0;
            for max in (len..len + 1_200).step_by(7) {
                if fits_as_is(&rec, len, max) {
                    fitted += 1;
                    assert_eq!(
                        split_record(rec.clone(), max).0,
                        vec![rec.clone()],
                        "max {max}"
                    );
                }
            }
            assert!(fitted > 0, "some limit fits the record whole");
        }
    }

    #[test]
    fn only_a_value_too_large_alone_is_refused() {
        let mut values = Map::new();
        values.insert("small".into(), json!(1));
        values.insert("huge".into(), json!("x".repeat(70_000)));
        let rec = Record::telemetry("M", "T", 5, values);
        let (parts, oversize) = split_record(rec, 65_536);
        assert_eq!(parts.len(), 1);
        assert_eq!(parts[0].payload["values"], json!({"small": 1}));
        assert_eq!(oversize.len(), 1);
        assert_eq!(
            (oversize[0].device.as_str(), oversize[0].key.as_str()),
            ("M", "huge")
        );
    }

    #[test]
    fn attributes_split_too_and_small_records_pass_unchanged() {
        let mut values = Map::new();
        for i in 0..100 {
            values.insert(format!("a{i}"), json!("y".repeat(100)));
        }
        let rec = Record::attributes("D", "T", values.clone());
        let (parts, _) = split_record(rec.clone(), 2_048);
        assert!(parts.len() > 5);
        for (i, p) in parts.iter().enumerate() {
            let (b, rej) = attribute_batches("D", &[(i as i64, &p.payload)], 2_048);
            assert!(rej.is_empty() && b.len() == 1);
        }
        let (same, _) = split_record(rec.clone(), 65_536);
        assert_eq!(same, vec![rec]);
        let reply = Record {
            device: "D".into(),
            device_type: String::new(),
            kind: RecordKind::RpcReply,
            payload: json!({"id": 1, "data": "z".repeat(100)}),
        };
        assert_eq!(split_record(reply.clone(), 10).0, vec![reply]);
    }
}
