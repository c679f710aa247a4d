//! ThingsBoard → devices: executes one RPC against a meter (through its actor's handle, so it
//! queues behind polls on the same association) or a local MQTT device (publish the request,
//! await the response topic), and always produces the reply body. Must not queue or send the
//! reply itself (the router does) nor open connections.

use serde_json::{json, Value};
use tracing::debug;

use crate::broker::BrokerHandle;
use crate::config::{ConfigError, RpcWrite};
use crate::dlms::apdu::{self, AttrRef, Data, MethodRef};
use crate::dlms::obis::ObisCode;
use crate::model::RpcRequest;
use crate::router::mapping::RpcRoute;
use crate::sources::meters::poller::data_to_json;
use crate::sources::meters::MeterHandle;

/// Reply body for a failed RPC, in the shape tb-gateway uses.
pub fn rpc_error(why: impl std::fmt::Display) -> Value {
    json!({ "success": false, "error": why.to_string() })
}

/// Run an RPC on a meter. Methods (params is a JSON object):
///
/// | method | params | reply |
/// |---|---|---|
/// | `get` | `obis`, `class_id` (3), `attribute` (2) | `{"success":true,"value":..}`; a register's value (class 3–5, attribute 2) is scaled, with `unit` and the unscaled `raw` |
/// | `set` | `obis`, `class_id` (1), `attribute` (2), `value`, `type`? | `{"success":true}` |
/// | `action` | `obis`, `class_id`, `method`, `value`?, `type`? | `{"success":true,"result":..}` |
/// | `poll_now` | — | `{"success":true,"values":{..}}` (also sent as telemetry) |
/// | `sync_clock` | — (needs `rpc_write = true` for the meter) | `{"success":true,"drift_s":..}` |
///
/// `type` names the DLMS type of `value` (`bool`, `i8`, `u8`, `i16`, `u16`, `i32`, `u32`, `i64`,
/// `u64`, `f32`, `f64`, `enum`, `string`, `octets` (hex)); without it a bool is a boolean, an
/// integer an i32 (u32 above i32), a float an f64 and a string a visible-string.
///
/// `set` and `action` change the meter (an `action` on the disconnect control cuts a customer's
/// power): they are refused unless the meter's `rpc_write` allows the OBIS code.
pub async fn meter_rpc(meter: &MeterHandle, req: &RpcRequest) -> Value {
    if matches!(req.method.as_str(), "set" | "action") {
        if let Err(why) = write_allowed(meter.rpc_write(), meter.name(), &req.params) {
            return rpc_error(why);
        }
    }
    let res = match req.method.as_str() {
        "get" => match attr_ref(&req.params, 3) {
            Ok(a) => scaled_get(meter, a).await,
            Err(e) => Err(e),
        },
        "set" => match (attr_ref(&req.params, 1), value_param(&req.params)) {
            (Ok(a), Ok(Some(v))) => meter
                .set(a, v)
                .await
                .map(|()| json!({ "success": true }))
                .map_err(|e| e.to_string()),
            (Ok(_), Ok(None)) => Err("`value` is required".to_string()),
            (Err(e), _) | (_, Err(e)) => Err(e),
        },
        "action" => match (method_ref(&req.params), value_param(&req.params)) {
            (Ok(m), Ok(v)) => meter
                .action(m, v)
                .await
                .map(|r| json!({ "success": true, "result": r.as_ref().map(data_to_json) }))
                .map_err(|e| e.to_string()),
            (Err(e), _) | (_, Err(e)) => Err(e),
        },
        "poll_now" => meter
            .poll_now()
            .await
            .map(|v| json!({ "success": true, "values": v }))
            .map_err(|e| e.to_string()),
        "sync_clock" => meter
            .sync_clock()
            .await
            .map(|drift| json!({ "success": true, "drift_s": drift }))
            .map_err(|e| e.to_string()),
        other => Err(format!(
            "unknown meter RPC method `{other}` (known: get, set, action, poll_now, sync_clock)"
        )),
    };
    res.unwrap_or_else(rpc_error)
}

/// Read an attribute; a register value comes back scaled by its scaler_unit, with its unit.
async fn scaled_get(meter: &MeterHandle, a: AttrRef) -> Result<Value, String> {
    let d = meter.get(a).await.map_err(|e| e.to_string())?;
    if !(matches!(a.class_id, 3..=5) && a.attribute == 2) {
        return Ok(json!({ "success": true, "value": data_to_json(&d) }));
    }
    let Some(raw) = d.as_f64() else {
        return Ok(json!({ "success": true, "value": data_to_json(&d) }));
    };
    let su = meter
        .get(AttrRef::new(a.class_id, a.obis, 3))
        .await
        .map_err(|e| e.to_string())?;
    let (scaler, unit) =
        apdu::parse_scaler_unit(&su).map_err(|e| format!("bad scaler_unit: {e}"))?;
    let value = raw * 10f64.powi(i32::from(scaler));
    // Decimal digits the scaler implies, so 2297 × 10^-1 reads 229.7, not 229.70000000000002.
    let digits = (-i32::from(scaler)).clamp(0, 15);
    let p = 10f64.powi(digits);
    let value = (value * p).round() / p;
    Ok(json!({
        "success": true,
        "value": value,
        "unit": apdu::unit_symbol(unit),
        "raw": data_to_json(&d),
    }))
}

/// Whether `rpc_write` lets ThingsBoard change `params.obis` on this meter; the error says why
/// not and how to allow it.
pub fn write_allowed(w: &RpcWrite, meter: &str, params: &Value) -> Result<(), String> {
    match w {
        RpcWrite::All(true) => Ok(()),
        RpcWrite::All(false) => Err(format!(
            "set/action are disabled for meter `{meter}`; enable them with rpc_write = true or a \
             list of allowed OBIS codes in its [[meters]] entry"
        )),
        RpcWrite::Obis(list) => {
            let obis = obis_param(params)?;
            if list
                .iter()
                .any(|o| o.parse::<ObisCode>().is_ok_and(|a| a == obis))
            {
                Ok(())
            } else {
                Err(format!(
                    "set/action on {obis} is not allowed for meter `{meter}` (rpc_write lists \
                     the OBIS codes that are)"
                ))
            }
        }
    }
}

/// The shared attribute `poll_interval` (seconds, a number or a numeric string) as a period;
/// `None` with the reason when it is unusable.
pub fn poll_interval(v: &Value) -> Result<std::time::Duration, String> {
    let secs = match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    }
    .ok_or_else(|| format!("poll_interval `{v}` is not a number of seconds"))?;
    if !(0.1..=86_400.0).contains(&secs) {
        return Err(format!("poll_interval {secs} s is outside 0.1 s ..= 1 day"));
    }
    Ok(std::time::Duration::from_secs_f64(secs))
}

/// Config check for a meter's `rpc_write` list.
pub fn validate_rpc_write(w: &RpcWrite, key: &str) -> Vec<ConfigError> {
    match w {
        RpcWrite::All(_) => Vec::new(),
        RpcWrite::Obis(list) => list
            .iter()
            .filter_map(|o| {
                o.parse::<ObisCode>()
                    .err()
                    .map(|e| ConfigError::new(key, format!("`{o}` is not an OBIS code: {e}")))
            })
            .collect(),
    }
}

fn obis_param(p: &Value) -> Result<ObisCode, String> {
    let s = p
        .get("obis")
        .and_then(Value::as_str)
        .ok_or("`obis` (e.g. \"1.0.32.7.0.255\") is required")?;
    s.parse::<ObisCode>()
        .map_err(|e| format!("bad obis `{s}`: {e}"))
}

fn int_param<T: TryFrom<i64>>(p: &Value, key: &str, default: Option<T>) -> Result<T, String> {
    match p.get(key) {
        None | Some(Value::Null) => default.ok_or(format!("`{key}` is required")),
        Some(v) => v
            .as_i64()
            .and_then(|i| T::try_from(i).ok())
            .ok_or(format!("`{key}` must be a small integer")),
    }
}

fn attr_ref(p: &Value, default_class: u16) -> Result<AttrRef, String> {
    Ok(AttrRef::new(
        int_param(p, "class_id", Some(default_class))?,
        obis_param(p)?,
        int_param(p, "attribute", Some(2i8))?,
    ))
}

fn method_ref(p: &Value) -> Result<MethodRef, String> {
    Ok(MethodRef {
        class_id: int_param(p, "class_id", None)?,
        obis: obis_param(p)?,
        method: int_param(p, "method", None)?,
    })
}

/// `value` (+ optional `type`) → DLMS data.
pub fn value_param(p: &Value) -> Result<Option<Data>, String> {
    let Some(v) = p.get("value") else {
        return Ok(None);
    };
    let ty = p.get("type").and_then(Value::as_str);
    json_to_data(v, ty).map(Some)
}

fn json_to_data(v: &Value, ty: Option<&str>) -> Result<Data, String> {
    let int = || v.as_i64().ok_or_else(|| format!("`{v}` is not an integer"));
    let bad = |t: &str| format!("`{v}` does not fit type {t}");
    Ok(match ty {
        None => match v {
            Value::Null => Data::Null,
            Value::Bool(b) => Data::Bool(*b),
            Value::Number(n) => match (n.as_i64(), n.as_u64()) {
                (Some(i), _) if i32::try_from(i).is_ok() => Data::I32(i as i32),
                (_, Some(u)) if u32::try_from(u).is_ok() => Data::U32(u as u32),
                (Some(i), _) => Data::I64(i),
                (_, Some(u)) => Data::U64(u),
                _ => Data::F64(n.as_f64().unwrap_or(0.0)),
            },
            Value::String(s) => Data::VisibleString(s.as_bytes().to_vec()),
            Value::Array(items) => Data::Array(
                items
                    .iter()
                    .map(|i| json_to_data(i, None))
                    .collect::<Result<_, _>>()?,
            ),
            Value::Object(_) => return Err("objects cannot be sent to a meter".into()),
        },
        Some("bool") => Data::Bool(v.as_bool().ok_or_else(|| bad("bool"))?),
        Some("i8") => Data::I8(i8::try_from(int()?).map_err(|_| bad("i8"))?),
        Some("u8") => Data::U8(u8::try_from(int()?).map_err(|_| bad("u8"))?),
        Some("i16") => Data::I16(i16::try_from(int()?).map_err(|_| bad("i16"))?),
        Some("u16") => Data::U16(u16::try_from(int()?).map_err(|_| bad("u16"))?),
        Some("i32") => Data::I32(i32::try_from(int()?).map_err(|_| bad("i32"))?),
        Some("u32") => Data::U32(u32::try_from(int()?).map_err(|_| bad("u32"))?),
        Some("i64") => Data::I64(int()?),
        Some("u64") => Data::U64(v.as_u64().ok_or_else(|| bad("u64"))?),
        Some("enum") => Data::Enum(u8::try_from(int()?).map_err(|_| bad("enum"))?),
        Some("f32") => Data::F32(v.as_f64().ok_or_else(|| bad("f32"))? as f32),
        Some("f64") => Data::F64(v.as_f64().ok_or_else(|| bad("f64"))?),
        Some("string") => {
            Data::VisibleString(v.as_str().ok_or_else(|| bad("string"))?.as_bytes().to_vec())
        }
        Some("octets") => Data::OctetString(hex(v.as_str().ok_or_else(|| bad("octets"))?)?),
        Some(t) => return Err(format!("unknown type `{t}`")),
    })
}

fn hex(s: &str) -> Result<Vec<u8>, String> {
    let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    if s.len() % 2 != 0 {
        return Err(format!("`{s}` is not hex"));
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).map_err(|_| format!("`{s}` is not hex")))
        .collect()
}

/// Publish the request locally; for two-way routes wait for the first message on the response
/// topic (subscribed before publishing, so a fast device cannot answer unseen).
pub async fn local_rpc(broker: &BrokerHandle, route: RpcRoute) -> Value {
    let mut sub = match &route.response_topic {
        Some(t) => match broker.subscribe(t).await {
            Ok(rx) => Some(rx),
            Err(e) => return rpc_error(format!("cannot subscribe to {t}: {e}")),
        },
        None => None,
    };
    if let Err(e) = broker
        .publish(
            &route.request.topic,
            route.request.payload.into(),
            route.request.retain,
        )
        .await
    {
        return rpc_error(format!("local publish failed: {e}"));
    }
    let Some(rx) = sub.as_mut() else {
        return json!({ "success": true });
    };
    match tokio::time::timeout(route.timeout, rx.recv()).await {
        Ok(Some((topic, payload))) => {
            debug!(%topic, "RPC response from local device.");
            parse_response(&payload)
        }
        Ok(None) => rpc_error("local broker subscription closed"),
        Err(_) => rpc_error(format!(
            "no response on {} within {:?}",
            route.response_topic.as_deref().unwrap_or(""),
            route.timeout
        )),
    }
}

/// tb-gateway forwards the raw text with single quotes made double; JSON when it parses, else
/// the text as a string.
pub fn parse_response(payload: &[u8]) -> Value {
    let text = String::from_utf8_lossy(payload);
    serde_json::from_str(&text)
        .or_else(|_| serde_json::from_str(&text.replace('\'', "\"")))
        .unwrap_or(Value::String(text.into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rpc_values_convert_to_dlms() {
        let p = json!({"value": true});
        assert_eq!(value_param(&p), Ok(Some(Data::Bool(true))));
        let p = json!({"value": 7, "type": "u8"});
        assert_eq!(value_param(&p), Ok(Some(Data::U8(7))));
        let p = json!({"value": 300, "type": "u8"});
        assert!(value_param(&p).is_err());
        let p = json!({"value": "0a0B", "type": "octets"});
        assert_eq!(value_param(&p), Ok(Some(Data::OctetString(vec![10, 11]))));
        let p = json!({"value": -5});
        assert_eq!(value_param(&p), Ok(Some(Data::I32(-5))));
        assert_eq!(value_param(&json!({})), Ok(None));
        assert!(value_param(&json!({"value": {"a": 1}})).is_err());
        assert!(value_param(&json!({"value": 1, "type": "weird"})).is_err());
    }

    #[test]
    fn attribute_refs_have_defaults_and_errors() {
        let a = attr_ref(&json!({"obis": "1.0.32.7.0.255"}), 3).unwrap();
        assert_eq!((a.class_id, a.attribute), (3, 2));
        assert!(attr_ref(&json!({}), 3).is_err());
        assert!(attr_ref(&json!({"obis": "nope"}), 3).is_err());
        assert!(attr_ref(&json!({"obis": "1.0.32.7.0.255", "attribute": 999}), 3).is_err());
        assert!(method_ref(&json!({"obis": "0.0.96.3.10.255", "method": 1})).is_err());
    }

    #[test]
    fn writes_need_rpc_write() {
        let p = json!({"obis": "0.0.96.3.10.255", "method": 1, "class_id": 70});
        let why = write_allowed(&RpcWrite::All(false), "M", &p).unwrap_err();
        assert!(why.contains("rpc_write"), "{why}");
        assert!(write_allowed(&RpcWrite::All(true), "M", &p).is_ok());
        let list = RpcWrite::Obis(vec!["0.0.1.0.0.255".into()]);
        assert!(write_allowed(&list, "M", &p).is_err());
        assert!(write_allowed(&list, "M", &json!({"obis": "0.0.1.0.0.255"})).is_ok());
        assert!(validate_rpc_write(&RpcWrite::Obis(vec!["nope".into()]), "k").len() == 1);
    }

    #[test]
    fn responses_parse_like_tb_gateway() {
        assert_eq!(parse_response(br#"{"ok":1}"#), json!({"ok":1}));
        assert_eq!(parse_response(b"{'ok': true}"), json!({"ok": true}));
        assert_eq!(parse_response(b"on"), json!("on"));
        assert_eq!(parse_response(b"42"), json!(42));
    }
}
