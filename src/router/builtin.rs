//! The rules that work with no mapping written (DESIGN.md "Defaults that matter"):
//!
//! | local topic | payload | becomes |
//! |---|---|---|
//! | `v1/devices/me/telemetry` | JSON with `deviceName` | telemetry of that device (the original system's shape) |
//! | `v1/devices/me/telemetry`, `.../attributes` | ThingsBoard device API, no `deviceName` | telemetry/attributes of the device named by the MQTT username, else the client id |
//! | `v1/gateway/{connect,disconnect,telemetry,attributes}` | ThingsBoard gateway API | validated, then forwarded through our single uplink |
//!
//! Pure: bytes in, records out; no I/O, no clock (the receive time comes with the message).

use serde_json::{Map, Value};

use crate::config::{DeviceNameSource, LocalConfig};
use crate::model::{check_device_name, Record, RecordKind, TimestampMs};
use crate::sources::LocalPublish;

/// Why a message on a handled topic could not be turned into records (counted and dropped).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MapError {
    #[error("payload is not valid JSON: {0}")]
    Json(String),
    #[error("payload has the wrong shape: {0}")]
    Shape(&'static str),
    #[error("bad device name `{name}`: {why}")]
    DeviceName { name: String, why: &'static str },
}

impl MapError {
    /// A short label for metrics (`dlms_bridge_mapping_errors_total{kind}`).
    pub fn kind(&self) -> &'static str {
        match self {
            MapError::Json(_) => "json",
            MapError::Shape(_) => "shape",
            MapError::DeviceName { .. } => "device_name",
        }
    }
}

pub const TOPIC_DEVICE_TELEMETRY: &str = "v1/devices/me/telemetry";
pub const TOPIC_DEVICE_ATTRIBUTES: &str = "v1/devices/me/attributes";
pub const TOPIC_GW_CONNECT: &str = "v1/gateway/connect";
pub const TOPIC_GW_DISCONNECT: &str = "v1/gateway/disconnect";
pub const TOPIC_GW_TELEMETRY: &str = "v1/gateway/telemetry";
pub const TOPIC_GW_ATTRIBUTES: &str = "v1/gateway/attributes";

/// Keys of the original system's payload that name the device rather than carry data.
const DEVICE_NAME_KEY: &str = "deviceName";
const DEVICE_TYPE_KEY: &str = "deviceType";

/// Apply the built-in rules. `None`: the topic is not one of ours.
pub fn map(msg: &LocalPublish, local: &LocalConfig) -> Option<Result<Vec<Record>, MapError>> {
    let kind = match msg.topic.as_str() {
        TOPIC_DEVICE_TELEMETRY => Topic::DeviceTelemetry,
        TOPIC_DEVICE_ATTRIBUTES => Topic::DeviceAttributes,
        TOPIC_GW_CONNECT if local.gateway_api => Topic::GwConnect,
        TOPIC_GW_DISCONNECT if local.gateway_api => Topic::GwDisconnect,
        TOPIC_GW_TELEMETRY if local.gateway_api => Topic::GwTelemetry,
        TOPIC_GW_ATTRIBUTES if local.gateway_api => Topic::GwAttributes,
        _ => return None,
    };
    Some(map_topic(kind, msg, local))
}

#[derive(Clone, Copy)]
enum Topic {
    DeviceTelemetry,
    DeviceAttributes,
    GwConnect,
    GwDisconnect,
    GwTelemetry,
    GwAttributes,
}

fn map_topic(
    kind: Topic,
    msg: &LocalPublish,
    local: &LocalConfig,
) -> Result<Vec<Record>, MapError> {
    let json: Value =
        serde_json::from_slice(&msg.payload).map_err(|e| MapError::Json(e.to_string()))?;
    let ts = msg.received_ms;
    let ty = local.device_type.as_str();
    match kind {
        Topic::DeviceTelemetry => device_api(json, msg, local, true),
        Topic::DeviceAttributes => device_api(json, msg, local, false),
        Topic::GwConnect => {
            let device = device_field(&json)?;
            let ty = match json.get("type") {
                Some(Value::String(t)) if !t.is_empty() => t.as_str(),
                _ => ty,
            };
            Ok(vec![Record {
                device,
                device_type: ty.to_string(),
                kind: RecordKind::Connect,
                payload: Value::Null,
            }])
        }
        Topic::GwDisconnect => Ok(vec![Record {
            device: device_field(&json)?,
            device_type: ty.to_string(),
            kind: RecordKind::Disconnect,
            payload: Value::Null,
        }]),
        Topic::GwTelemetry => {
            let Value::Object(devices) = json else {
                return Err(MapError::Shape(
                    "gateway telemetry must be an object {device: [entries]}",
                ));
            };
            let mut out = Vec::new();
            for (device, entries) in devices {
                checked(&device)?;
                let entries = match entries {
                    Value::Array(a) => a,
                    v @ Value::Object(_) => vec![v],
                    _ => return Err(MapError::Shape("gateway telemetry entries must be objects")),
                };
                for e in entries {
                    let (ets, values) = telemetry_entry(e, ts)?;
                    out.push(Record::telemetry(device.clone(), ty, ets, values));
                }
            }
            Ok(out)
        }
        Topic::GwAttributes => {
            let Value::Object(devices) = json else {
                return Err(MapError::Shape(
                    "gateway attributes must be an object {device: {..}}",
                ));
            };
            let mut out = Vec::new();
            for (device, attrs) in devices {
                checked(&device)?;
                let Value::Object(attrs) = attrs else {
                    return Err(MapError::Shape(
                        "gateway attributes per device must be an object",
                    ));
                };
                out.push(Record::attributes(device, ty, attrs));
            }
            Ok(out)
        }
    }
}

/// `v1/devices/me/*`: the original system's `deviceName` payload, or the device API proper.
fn device_api(
    json: Value,
    msg: &LocalPublish,
    local: &LocalConfig,
    telemetry: bool,
) -> Result<Vec<Record>, MapError> {
    let items = match json {
        Value::Array(a) => a,
        v @ Value::Object(_) => vec![v],
        _ => {
            return Err(MapError::Shape(
                "payload must be a JSON object or an array of objects",
            ))
        }
    };
    let fallback = || match local.device_name_source {
        DeviceNameSource::UsernameThenClientId => msg
            .username
            .clone()
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| msg.client_id.clone()),
        DeviceNameSource::ClientId => msg.client_id.clone(),
    };
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let Value::Object(mut obj) = item else {
            return Err(MapError::Shape("array items must be JSON objects"));
        };
        let device = match obj.remove(DEVICE_NAME_KEY) {
            Some(Value::String(n)) => n,
            Some(_) => return Err(MapError::Shape("deviceName must be a string")),
            None => fallback(),
        };
        checked(&device)?;
        let device_type = match obj.remove(DEVICE_TYPE_KEY) {
            Some(Value::String(t)) if !t.is_empty() => t,
            _ => local.device_type.clone(),
        };
        if telemetry {
            let (ts, values) = telemetry_entry(Value::Object(obj), msg.received_ms)?;
            out.push(Record::telemetry(device, device_type, ts, values));
        } else {
            out.push(Record::attributes(device, device_type, obj));
        }
    }
    Ok(out)
}

/// One telemetry entry: `{"ts":..,"values":{..}}`, or flat values with an optional `ts`.
fn telemetry_entry(
    v: Value,
    received: TimestampMs,
) -> Result<(TimestampMs, Map<String, Value>), MapError> {
    let Value::Object(mut obj) = v else {
        return Err(MapError::Shape("telemetry entry must be an object"));
    };
    let ts = match obj.get("ts") {
        None => received,
        Some(t) => t
            .as_i64()
            .or_else(|| t.as_f64().map(|f| f as i64))
            .ok_or(MapError::Shape("ts must be a number (ms since epoch)"))?,
    };
    if obj.contains_key("values") && obj.contains_key("ts") {
        return match obj.remove("values") {
            Some(Value::Object(values)) => Ok((ts, values)),
            _ => Err(MapError::Shape("values must be an object")),
        };
    }
    obj.remove("ts");
    Ok((ts, obj))
}

fn device_field(json: &Value) -> Result<String, MapError> {
    match json.get("device") {
        Some(Value::String(d)) => {
            checked(d)?;
            Ok(d.clone())
        }
        _ => Err(MapError::Shape("`device` must be a non-empty string")),
    }
}

fn checked(name: &str) -> Result<(), MapError> {
    check_device_name(name).map_err(|why| MapError::DeviceName {
        name: name.chars().take(64).collect(),
        why,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn msg(topic: &str, payload: &str, client: &str, user: Option<&str>) -> LocalPublish {
        LocalPublish {
            client_id: client.into(),
            username: user.map(Into::into),
            topic: topic.into(),
            payload: payload.as_bytes().to_vec().into(),
            received_ms: 1_000,
        }
    }

    fn run(topic: &str, payload: &str) -> Result<Vec<Record>, MapError> {
        map(
            &msg(topic, payload, "cid", Some("user")),
            &LocalConfig::default(),
        )
        .expect("handled")
    }

    #[test]
    fn original_system_shape_becomes_telemetry_of_named_device() {
        let r = run(
            TOPIC_DEVICE_TELEMETRY,
            r#"{"deviceName":"Meter 1","voltage_l1":230.1,"active_energy":12345}"#,
        )
        .unwrap();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].device, "Meter 1");
        assert_eq!(r[0].device_type, "DLMS Energy Meter");
        assert_eq!(r[0].kind, RecordKind::Telemetry);
        assert_eq!(
            r[0].payload,
            json!({"ts":1000,"values":{"voltage_l1":230.1,"active_energy":12345}})
        );
    }

    #[test]
    fn device_api_without_name_uses_username_then_client_id() {
        let r = run(TOPIC_DEVICE_TELEMETRY, r#"{"ts":5,"values":{"t":1}}"#).unwrap();
        assert_eq!(r[0].device, "user");
        assert_eq!(r[0].payload, json!({"ts":5,"values":{"t":1}}));
        let m = msg(TOPIC_DEVICE_ATTRIBUTES, r#"{"fw":"1.2"}"#, "cid", None);
        let r = map(&m, &LocalConfig::default()).unwrap().unwrap();
        assert_eq!(r[0].device, "cid");
        assert_eq!(r[0].kind, RecordKind::Attributes);
        let cfg = LocalConfig {
            device_name_source: DeviceNameSource::ClientId,
            ..LocalConfig::default()
        };
        let m = msg(TOPIC_DEVICE_TELEMETRY, r#"{"t":1}"#, "cid", Some("user"));
        assert_eq!(map(&m, &cfg).unwrap().unwrap()[0].device, "cid");
    }

    #[test]
    fn device_api_arrays_and_device_type() {
        let r = run(
            TOPIC_DEVICE_TELEMETRY,
            r#"[{"ts":1,"values":{"a":1}},{"ts":2,"values":{"a":2}},{"deviceName":"X","deviceType":"T","b":3}]"#,
        )
        .unwrap();
        assert_eq!(r.len(), 3);
        assert_eq!(r[2].device, "X");
        assert_eq!(r[2].device_type, "T");
    }

    #[test]
    fn gateway_api_is_forwarded() {
        let r = run(TOPIC_GW_CONNECT, r#"{"device":"D","type":"Pump"}"#).unwrap();
        assert_eq!(
            (r[0].kind, r[0].device_type.as_str()),
            (RecordKind::Connect, "Pump")
        );
        let r = run(TOPIC_GW_DISCONNECT, r#"{"device":"D"}"#).unwrap();
        assert_eq!(r[0].kind, RecordKind::Disconnect);
        let r = run(
            TOPIC_GW_TELEMETRY,
            r#"{"A":[{"ts":1,"values":{"x":1}},{"ts":2,"values":{"x":2}}],"B":{"y":3}}"#,
        )
        .unwrap();
        assert_eq!(r.len(), 3);
        assert_eq!(r[1].payload, json!({"ts":2,"values":{"x":2}}));
        assert_eq!(r[2].payload, json!({"ts":1000,"values":{"y":3}}));
        let r = run(TOPIC_GW_ATTRIBUTES, r#"{"A":{"k":"v"}}"#).unwrap();
        assert_eq!(r[0].payload, json!({"k":"v"}));
    }

    #[test]
    fn malformed_input_is_an_error_never_a_panic() {
        for (topic, payload) in [
            (TOPIC_DEVICE_TELEMETRY, "not json"),
            (TOPIC_DEVICE_TELEMETRY, "42"),
            (TOPIC_DEVICE_TELEMETRY, r#"{"deviceName":5}"#),
            (TOPIC_DEVICE_TELEMETRY, r#"{"deviceName":""}"#),
            (TOPIC_DEVICE_TELEMETRY, r#"{"deviceName":"${serial}"}"#),
            (TOPIC_DEVICE_TELEMETRY, r#"{"ts":"x","values":{}}"#),
            (TOPIC_DEVICE_TELEMETRY, r#"[1,2]"#),
            (TOPIC_GW_TELEMETRY, r#"[{"a":1}]"#),
            (TOPIC_GW_TELEMETRY, r#"{"A":[1]}"#),
            (TOPIC_GW_TELEMETRY, r#"{"":[{"a":1}]}"#),
            (TOPIC_GW_ATTRIBUTES, r#"{"A":[1]}"#),
            (TOPIC_GW_CONNECT, r#"{"type":"x"}"#),
            (TOPIC_GW_CONNECT, r#"{"device":""}"#),
            (TOPIC_GW_TELEMETRY, r#"{"A":[{"ts":1,"values":[1]}]}"#),
            (TOPIC_DEVICE_TELEMETRY, ""),
        ] {
            assert!(run(topic, payload).is_err(), "{topic} {payload}");
        }
    }

    #[test]
    fn other_topics_are_not_ours() {
        let m = msg("sensors/x", "{}", "c", None);
        assert!(map(&m, &LocalConfig::default()).is_none());
        let cfg = LocalConfig {
            gateway_api: false,
            ..LocalConfig::default()
        };
        let m = msg(TOPIC_GW_TELEMETRY, "{}", "c", None);
        assert!(map(&m, &cfg).is_none());
    }
}
