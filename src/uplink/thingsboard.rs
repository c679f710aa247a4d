//! The ThingsBoard gateway MQTT API as pure data: topic names, the payloads we publish (one device
//! per publish, split to fit the packet limit) and the parsing of what ThingsBoard pushes down.
//!
//! No sockets, no clock and no logging here; the session task in [`super`] does the I/O. Malformed
//! input from ThingsBoard is an [`Error`], never a panic.

use serde_json::{json, Map, Value};

use crate::model::{AttributeUpdate, Downlink, RpcRequest};

/// GW → TB: announce a sub-device with its profile (`{"device":..,"type":..}`).
pub const TOPIC_CONNECT: &str = "v1/gateway/connect";
/// GW → TB: deregister a sub-device; TB → GW (MQTT 5): TB closed a sub-device session.
pub const TOPIC_DISCONNECT: &str = "v1/gateway/disconnect";
/// GW → TB: time series, `{"dev":[entry,..]}`.
pub const TOPIC_TELEMETRY: &str = "v1/gateway/telemetry";
/// GW → TB: client attributes `{"dev":{..}}`; TB → GW: shared attribute updates.
pub const TOPIC_ATTRIBUTES: &str = "v1/gateway/attributes";
/// GW → TB: shared/client attribute request.
pub const TOPIC_ATTRIBUTES_REQUEST: &str = "v1/gateway/attributes/request";
/// TB → GW: answer to an attribute request.
pub const TOPIC_ATTRIBUTES_RESPONSE: &str = "v1/gateway/attributes/response";
/// TB → GW: server-side RPC to a sub-device; GW → TB: its reply.
pub const TOPIC_RPC: &str = "v1/gateway/rpc";
/// TB → GW: shared attribute updates of the gateway device itself.
pub const TOPIC_ME_ATTRIBUTES: &str = "v1/devices/me/attributes";
/// TB → GW: RPC to the gateway device itself (rename/delete notifications); filter form.
pub const TOPIC_ME_RPC_REQUEST_FILTER: &str = "v1/devices/me/rpc/request/+";
/// Prefix of [`TOPIC_ME_RPC_REQUEST_FILTER`] matches.
pub const TOPIC_ME_RPC_REQUEST_PREFIX: &str = "v1/devices/me/rpc/request/";

/// GW → TB: reply to an RPC addressed to the gateway device itself; the request id follows.
pub const TOPIC_ME_RPC_RESPONSE_PREFIX: &str = "v1/devices/me/rpc/response/";

/// Filters subscribed after every (re)connect; ThingsBoard keeps no session state (spec §1.2) and
/// grants only these exact filters (spec §1.3).
pub const SUBSCRIPTIONS: [&str; 5] = [
    TOPIC_RPC,
    TOPIC_ATTRIBUTES,
    TOPIC_ATTRIBUTES_RESPONSE,
    TOPIC_ME_RPC_REQUEST_FILTER,
    TOPIC_ME_ATTRIBUTES,
];

/// Bytes a QoS 1 PUBLISH adds around its payload, at worst: fixed header (1), remaining length
/// (up to 4), topic length (2), packet id (2) and an empty MQTT 5 property block (1).
pub fn publish_overhead(topic: &str) -> usize {
    1 + 4 + 2 + topic.len() + 2 + 1
}

/// Why a payload could not be built or parsed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The bytes are not JSON at all.
    #[error("invalid json on {topic}")]
    Json {
        topic: String,
        #[source]
        source: serde_json::Error,
    },
    /// JSON, but not the shape the gateway API defines.
    #[error("unexpected payload shape on {topic}: {what}")]
    Shape { topic: String, what: &'static str },
    /// A single record is larger than a packet may be; it can never be sent.
    #[error("record {id} needs a {size} byte packet, more than the {max} byte limit")]
    TooLarge { id: i64, size: usize, max: usize },
}

fn shape(topic: &str, what: &'static str) -> Error {
    Error::Shape {
        topic: topic.to_owned(),
        what,
    }
}

/// One publish ready for the wire, and the store rows it carries.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub topic: &'static str,
    pub payload: Vec<u8>,
    /// Row ids acked (deleted) when ThingsBoard PUBACKs this publish.
    pub ids: Vec<i64>,
}

/// `v1/gateway/connect` payload.
pub fn connect_payload(device: &str, device_type: &str) -> Vec<u8> {
    json!({ "device": device, "type": device_type })
        .to_string()
        .into_bytes()
}

/// `v1/gateway/disconnect` payload.
pub fn disconnect_payload(device: &str) -> Vec<u8> {
    json!({ "device": device }).to_string().into_bytes()
}

/// `v1/gateway/rpc` reply from a stored `RpcReply` payload `{"id":<int>,"data":..}`.
pub fn rpc_reply_payload(device: &str, stored: &Value) -> Result<Vec<u8>, Error> {
    let id = stored
        .get("id")
        .and_then(Value::as_i64)
        .ok_or_else(|| shape(TOPIC_RPC, "rpc reply without an integer id"))?;
    let data = stored.get("data").cloned().unwrap_or(Value::Null);
    Ok(json!({ "device": device, "id": id, "data": data })
        .to_string()
        .into_bytes())
}

/// `v1/gateway/attributes/request` from a stored `{"id":..,"client":bool,"keys":[..]}` payload,
/// in the form the server parses (spec §2.6): `client` boolean plus `key` or `keys`.
pub fn attribute_request_payload(device: &str, stored: &Value) -> Result<Vec<u8>, Error> {
    let t = TOPIC_ATTRIBUTES_REQUEST;
    let id = stored
        .get("id")
        .and_then(Value::as_i64)
        .ok_or_else(|| shape(t, "attribute request without an integer id"))?;
    let client = stored
        .get("client")
        .and_then(Value::as_bool)
        .ok_or_else(|| shape(t, "attribute request without a boolean client"))?;
    let mut out = json!({ "id": id, "device": device, "client": client });
    match (stored.get("keys"), stored.get("key")) {
        (Some(Value::Array(keys)), _) if keys.iter().all(Value::is_string) => {
            out["keys"] = Value::Array(keys.clone());
        }
        (None, Some(Value::String(key))) => out["key"] = Value::String(key.clone()),
        _ => {
            return Err(shape(
                t,
                "attribute request needs key (string) or keys (strings)",
            ))
        }
    }
    Ok(out.to_string().into_bytes())
}

/// Build `{"<device>":[entry,..]}` telemetry publishes from consecutive rows of one device, each
/// packet at most `max_packet_size` bytes. Rows whose entry is not a JSON object, or that alone
/// exceed the limit, come back in the second list: they can never be sent.
pub fn telemetry_batches(
    device: &str,
    rows: &[(i64, &Value)],
    max_packet_size: usize,
) -> (Vec<Batch>, Vec<(i64, Error)>) {
    let rows: Vec<(i64, &Value, Option<&str>)> =
        rows.iter().map(|&(id, entry)| (id, entry, None)).collect();
    telemetry_batches_of_texts(device, &rows, max_packet_size)
}

/// [`telemetry_batches`] with each entry's JSON text when the caller has it (the store keeps
/// it): that text goes into the publish as it is, the entry is not serialised again.
pub fn telemetry_batches_of_texts(
    device: &str,
    rows: &[(i64, &Value, Option<&str>)],
    max_packet_size: usize,
) -> (Vec<Batch>, Vec<(i64, Error)>) {
    let topic = TOPIC_TELEMETRY;
    let head = format!("{{{}:[", Value::String(device.to_owned()));
    // `{"dev":[` + entries joined by `,` + `]}`
    let fixed = publish_overhead(topic) + head.len() + 2;
    let mut out = Vec::new();
    let mut rejected = Vec::new();
    let mut body = String::new();
    let mut ids = Vec::new();

    let flush = |body: &mut String, ids: &mut Vec<i64>, out: &mut Vec<Batch>| {
        if ids.is_empty() {
            return;
        }
        let mut payload = Vec::with_capacity(head.len() + body.len() + 2);
        payload.extend_from_slice(head.as_bytes());
        payload.extend_from_slice(body.as_bytes());
        payload.extend_from_slice(b"]}");
        out.push(Batch {
            topic,
            payload,
            ids: std::mem::take(ids),
        });
        body.clear();
    };

    for (id, entry, text) in rows {
        if let Err(what) = check_entry(entry) {
            rejected.push((*id, shape(topic, what)));
            continue;
        }
        let owned;
        let text = match text {
            Some(t) => *t,
            None => {
                owned = entry.to_string();
                owned.as_str()
            }
        };
        if fixed + text.len() > max_packet_size {
            rejected.push((
                *id,
                Error::TooLarge {
                    id: *id,
                    size: fixed + text.len(),
                    max: max_packet_size,
                },
            ));
            continue;
        }
        let sep = usize::from(!ids.is_empty());
        if fixed + body.len() + sep + text.len() > max_packet_size {
            flush(&mut body, &mut ids, &mut out);
        }
        if !ids.is_empty() {
            body.push(',');
        }
        body.push_str(text);
        ids.push(*id);
    }
    flush(&mut body, &mut ids, &mut out);
    (out, rejected)
}

/// A telemetry entry ThingsBoard accepts (spec §2.4): an object, and `{"ts","values"}` needs an
/// integer `ts` (ms) and an object `values`. Anything else would be refused or close the session.
fn check_entry(entry: &Value) -> Result<(), &'static str> {
    let obj = entry
        .as_object()
        .ok_or("telemetry entry is not a JSON object")?;
    if let (Some(ts), Some(values)) = (obj.get("ts"), obj.get("values")) {
        if !ts.is_i64() {
            return Err("telemetry ts is not an integer (ms)");
        }
        if !values.is_object() {
            return Err("telemetry values is not a JSON object");
        }
    }
    Ok(())
}

/// Build `{"<device>":{..}}` attribute publishes, merging consecutive rows of one device (later
/// keys win), each packet at most `max_packet_size` bytes. Non-object rows and rows too large
/// alone come back rejected.
pub fn attribute_batches(
    device: &str,
    rows: &[(i64, &Value)],
    max_packet_size: usize,
) -> (Vec<Batch>, Vec<(i64, Error)>) {
    let topic = TOPIC_ATTRIBUTES;
    let encode = |m: &Map<String, Value>| {
        let mut outer = Map::new();
        outer.insert(device.to_owned(), Value::Object(m.clone()));
        Value::Object(outer).to_string().into_bytes()
    };
    let fits = |payload: &[u8]| publish_overhead(topic) + payload.len() <= max_packet_size;
    let mut out = Vec::new();
    let mut rejected = Vec::new();
    let mut merged = Map::new();
    let mut ids: Vec<i64> = Vec::new();

    for (id, value) in rows {
        let Some(obj) = value.as_object() else {
            rejected.push((*id, shape(topic, "attributes are not a JSON object")));
            continue;
        };
        let alone = encode(obj);
        if !fits(&alone) {
            rejected.push((
                *id,
                Error::TooLarge {
                    id: *id,
                    size: publish_overhead(topic) + alone.len(),
                    max: max_packet_size,
                },
            ));
            continue;
        }
        let mut candidate = merged.clone();
        candidate.extend(obj.iter().map(|(k, v)| (k.clone(), v.clone())));
        if !ids.is_empty() && !fits(&encode(&candidate)) {
            out.push(Batch {
                topic,
                payload: encode(&merged),
                ids: std::mem::take(&mut ids),
            });
            candidate = obj.clone();
        }
        merged = candidate;
        ids.push(*id);
    }
    if !ids.is_empty() {
        out.push(Batch {
            topic,
            payload: encode(&merged),
            ids,
        });
    }
    (out, rejected)
}

fn parse_json(topic: &str, payload: &[u8]) -> Result<Map<String, Value>, Error> {
    match serde_json::from_slice::<Value>(payload) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(shape(topic, "not a JSON object")),
        Err(source) => Err(Error::Json {
            topic: topic.to_owned(),
            source,
        }),
    }
}

fn device_of(topic: &str, m: &Map<String, Value>) -> Result<String, Error> {
    match m.get("device") {
        Some(Value::String(d)) if !d.is_empty() => Ok(d.clone()),
        _ => Err(shape(topic, "missing or empty device")),
    }
}

/// Parse a publish from ThingsBoard. `Ok(None)` for topics that carry nothing for the downlink
/// (the gateway device's own RPC and attributes, handled elsewhere or not yet supported).
pub fn parse_downlink(topic: &str, payload: &[u8]) -> Result<Option<Downlink>, Error> {
    match topic {
        TOPIC_RPC => {
            let m = parse_json(topic, payload)?;
            let device = device_of(topic, &m)?;
            let data = m
                .get("data")
                .and_then(Value::as_object)
                .ok_or_else(|| shape(topic, "rpc without a data object"))?;
            let id = data
                .get("id")
                .and_then(Value::as_i64)
                .ok_or_else(|| shape(topic, "rpc without an integer id"))?;
            let method = data
                .get("method")
                .and_then(Value::as_str)
                .ok_or_else(|| shape(topic, "rpc without a method"))?
                .to_owned();
            let params = data.get("params").cloned().unwrap_or(Value::Null);
            Ok(Some(Downlink::Rpc(RpcRequest {
                device,
                id,
                method,
                params,
            })))
        }
        TOPIC_ATTRIBUTES => {
            let m = parse_json(topic, payload)?;
            let device = device_of(topic, &m)?;
            let data = m
                .get("data")
                .and_then(Value::as_object)
                .ok_or_else(|| shape(topic, "attribute update without a data object"))?
                .clone();
            Ok(Some(Downlink::Attributes(AttributeUpdate { device, data })))
        }
        TOPIC_ATTRIBUTES_RESPONSE => {
            let m = parse_json(topic, payload)?;
            let device = device_of(topic, &m)?;
            let id = m
                .get("id")
                .and_then(Value::as_i64)
                .ok_or_else(|| shape(topic, "attribute response without an integer id"))?;
            // Several keys → `values` object; one key → bare `value`; nothing found → neither.
            let values = m
                .get("values")
                .or_else(|| m.get("value"))
                .cloned()
                .unwrap_or(Value::Null);
            Ok(Some(Downlink::AttributeResponse { device, id, values }))
        }
        TOPIC_DISCONNECT => {
            let m = parse_json(topic, payload)?;
            let device = device_of(topic, &m)?;
            let reason = m.get("reason").and_then(Value::as_i64);
            Ok(Some(Downlink::DeviceDisconnected { device, reason }))
        }
        TOPIC_ME_ATTRIBUTES => Ok(None),
        t if t.starts_with(TOPIC_ME_RPC_REQUEST_PREFIX) => Ok(None),
        _ => Err(shape(topic, "unexpected topic")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(ts: i64, v: f64) -> Value {
        json!({"ts": ts, "values": {"voltage_l1": v}})
    }

    /// The store's text of an entry goes into the publish as it is (not serialised again);
    /// entries without one are serialised; the packet limit counts the text.
    #[test]
    fn telemetry_entries_are_sent_as_their_stored_text() {
        let a = entry(1, 230.1);
        let b = entry(2, 231.0);
        let a_text = r#"{"ts":1,"values":{"voltage_l1":230.10}}"#;
        let rows = [(7, &a, Some(a_text)), (9, &b, None)];
        let (batches, rejected) = telemetry_batches_of_texts("Meter 1", &rows, 65_536);
        assert!(rejected.is_empty());
        assert_eq!(batches.len(), 1);
        assert_eq!(
            String::from_utf8(batches[0].payload.clone()).unwrap(),
            format!(r#"{{"Meter 1":[{a_text},{}]}}"#, b)
        );
        assert_eq!(batches[0].ids, [7, 9]);
        // One packet holds exactly the first entry's text: the second goes into another.
        let one = publish_overhead(TOPIC_TELEMETRY) + r#"{"Meter 1":[]}"#.len() + a_text.len();
        let (batches, _) = telemetry_batches_of_texts("Meter 1", &rows, one);
        assert_eq!(batches.len(), 2);
        assert_eq!(batches[0].ids, [7]);
    }

    #[test]
    fn telemetry_one_device_array_in_order() {
        let a = entry(1, 230.0);
        let b = entry(2, 231.5);
        let (batches, rejected) = telemetry_batches("Meter 1", &[(7, &a), (9, &b)], 65_536);
        assert!(rejected.is_empty());
        assert_eq!(batches.len(), 1);
        assert_eq!(batches[0].ids, vec![7, 9]);
        assert_eq!(batches[0].topic, TOPIC_TELEMETRY);
        let v: Value = serde_json::from_slice(&batches[0].payload).unwrap();
        assert_eq!(v, json!({"Meter 1": [a, b]}));
    }

    #[test]
    fn telemetry_splits_to_fit_packet_limit() {
        let entries: Vec<Value> = (0..200).map(|i| entry(i, i as f64 + 0.5)).collect();
        let rows: Vec<(i64, &Value)> = entries
            .iter()
            .enumerate()
            .map(|(i, e)| (i as i64, e))
            .collect();
        let max = 1024;
        let (batches, rejected) = telemetry_batches("dev \"quoted\"", &rows, max);
        assert!(rejected.is_empty());
        assert!(batches.len() > 1);
        let mut seen = Vec::new();
        for b in &batches {
            assert!(publish_overhead(b.topic) + b.payload.len() <= max);
            let v: Value = serde_json::from_slice(&b.payload).unwrap();
            let arr = v["dev \"quoted\""].as_array().unwrap();
            assert_eq!(arr.len(), b.ids.len());
            seen.extend(b.ids.iter().copied());
        }
        assert_eq!(seen, (0..200).collect::<Vec<i64>>());
    }

    #[test]
    fn telemetry_rejects_oversize_and_non_object_rows() {
        let big = json!({"ts": 1, "values": {"blob": "x".repeat(2000)}});
        let ok = entry(2, 1.0);
        let bad = json!([1, 2]);
        let bad_ts = json!({"ts": "yesterday", "values": {"a": 1}});
        let bad_values = json!({"ts": 5, "values": [1]});
        let rows = [
            (1, &big),
            (2, &ok),
            (3, &bad),
            (4, &bad_ts),
            (5, &bad_values),
        ];
        let (batches, rejected) = telemetry_batches("d", &rows, 1024);
        assert_eq!(batches.len(), 1);
        assert_eq!(batches[0].ids, vec![2]);
        let ids: Vec<i64> = rejected.iter().map(|(id, _)| *id).collect();
        assert_eq!(ids, vec![1, 3, 4, 5]);
        assert!(matches!(rejected[0].1, Error::TooLarge { .. }));
    }

    #[test]
    fn attributes_merge_and_split() {
        let a = json!({"fw": "1.0", "serial": "A"});
        let b = json!({"fw": "1.1"});
        let (batches, rejected) = attribute_batches("m", &[(1, &a), (2, &b)], 65_536);
        assert!(rejected.is_empty());
        assert_eq!(batches.len(), 1);
        assert_eq!(batches[0].ids, vec![1, 2]);
        let v: Value = serde_json::from_slice(&batches[0].payload).unwrap();
        assert_eq!(v, json!({"m": {"fw": "1.1", "serial": "A"}}));

        let x = json!({"k1": "y".repeat(60)});
        let y = json!({"k2": "z".repeat(60)});
        let (batches, _) = attribute_batches("m", &[(1, &x), (2, &y)], 120);
        assert_eq!(batches.len(), 2);
        let (_, rejected) = attribute_batches("m", &[(1, &json!(5))], 120);
        assert_eq!(rejected.len(), 1);
    }

    #[test]
    fn connect_disconnect_and_rpc_reply_payloads() {
        let v: Value = serde_json::from_slice(&connect_payload("M", "DLMS Energy Meter")).unwrap();
        assert_eq!(v, json!({"device": "M", "type": "DLMS Energy Meter"}));
        let v: Value = serde_json::from_slice(&disconnect_payload("M")).unwrap();
        assert_eq!(v, json!({"device": "M"}));
        let reply = rpc_reply_payload("M", &json!({"id": 42, "data": {"success": true}})).unwrap();
        let v: Value = serde_json::from_slice(&reply).unwrap();
        assert_eq!(
            v,
            json!({"device": "M", "id": 42, "data": {"success": true}})
        );
        assert!(rpc_reply_payload("M", &json!({"data": 1})).is_err());
    }

    #[test]
    fn attribute_request_uses_server_form() {
        let p = attribute_request_payload("M", &json!({"id": 7, "client": false, "keys": ["a"]}))
            .unwrap();
        let v: Value = serde_json::from_slice(&p).unwrap();
        assert_eq!(
            v,
            json!({"id": 7, "device": "M", "client": false, "keys": ["a"]})
        );
        let p =
            attribute_request_payload("M", &json!({"id": 8, "client": true, "key": "b"})).unwrap();
        let v: Value = serde_json::from_slice(&p).unwrap();
        assert_eq!(v["key"], "b");
        assert!(attribute_request_payload("M", &json!({"id": 7, "keys": []})).is_err());
        assert!(attribute_request_payload("M", &json!({"id": 7, "client": true})).is_err());
    }

    #[test]
    fn downlink_rpc_attributes_response_disconnect() {
        let rpc =
            br#"{"device":"Meter 1","data":{"id":42,"method":"setRelay","params":{"on":true}}}"#;
        assert_eq!(
            parse_downlink(TOPIC_RPC, rpc).unwrap(),
            Some(Downlink::Rpc(RpcRequest {
                device: "Meter 1".into(),
                id: 42,
                method: "setRelay".into(),
                params: json!({"on": true}),
            }))
        );
        let attr = br#"{"device":"M","data":{"tariff":"T2","deleted":["x"]}}"#;
        match parse_downlink(TOPIC_ATTRIBUTES, attr).unwrap() {
            Some(Downlink::Attributes(u)) => {
                assert_eq!(u.device, "M");
                assert_eq!(u.data["deleted"], json!(["x"]));
            }
            other => panic!("unexpected {other:?}"),
        }
        let resp = br#"{"id":8,"device":"M","values":{"fw":"1.2"}}"#;
        assert_eq!(
            parse_downlink(TOPIC_ATTRIBUTES_RESPONSE, resp).unwrap(),
            Some(Downlink::AttributeResponse {
                device: "M".into(),
                id: 8,
                values: json!({"fw": "1.2"})
            })
        );
        let none = br#"{"id":7,"device":"M"}"#;
        assert!(matches!(
            parse_downlink(TOPIC_ATTRIBUTES_RESPONSE, none).unwrap(),
            Some(Downlink::AttributeResponse {
                values: Value::Null,
                ..
            })
        ));
        let disc = br#"{"device":"M","reason":150}"#;
        assert_eq!(
            parse_downlink(TOPIC_DISCONNECT, disc).unwrap(),
            Some(Downlink::DeviceDisconnected {
                device: "M".into(),
                reason: Some(150)
            })
        );
        assert_eq!(
            parse_downlink("v1/devices/me/rpc/request/5", b"{}").unwrap(),
            None
        );
    }

    #[test]
    fn malformed_downlink_is_an_error_not_a_panic() {
        let cases: [(&str, &[u8]); 9] = [
            (TOPIC_RPC, b"not json"),
            (TOPIC_RPC, b"[]"),
            (TOPIC_RPC, br#"{"device":"M"}"#),
            (TOPIC_RPC, br#"{"device":"","data":{"id":1,"method":"m"}}"#),
            (
                TOPIC_RPC,
                br#"{"device":"M","data":{"id":"x","method":"m"}}"#,
            ),
            (TOPIC_ATTRIBUTES, br#"{"device":"M","data":[1]}"#),
            (TOPIC_ATTRIBUTES_RESPONSE, br#"{"device":"M"}"#),
            (TOPIC_DISCONNECT, b"\xff\xfe"),
            ("some/other/topic", b"{}"),
        ];
        for (topic, payload) in cases {
            assert!(parse_downlink(topic, payload).is_err(), "{topic}");
        }
    }
}
