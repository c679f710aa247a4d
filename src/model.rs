//! Shared domain types that cross module boundaries: what sources emit, what the store keeps and
//! what the uplink sends. No I/O and no clock here.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Milliseconds since the Unix epoch, as ThingsBoard wants them in `ts`.
pub type TimestampMs = i64;

/// Current wall-clock time in ms. The one place the model touches the clock, for callers.
pub fn now_ms() -> TimestampMs {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// What one queued record asks the uplink to do for one ThingsBoard (sub-)device.
///
/// Stored as a small integer in SQLite: never renumber a variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[repr(u8)]
pub enum RecordKind {
    /// One telemetry entry `{"ts":..,"values":{..}}` for `v1/gateway/telemetry`.
    Telemetry = 1,
    /// Client-side attributes `{"k":v,..}` for `v1/gateway/attributes`.
    Attributes = 2,
    /// `v1/gateway/connect` for the device (its `device_type` is the profile).
    Connect = 3,
    /// `v1/gateway/disconnect` for the device.
    Disconnect = 4,
    /// A reply to a server-side RPC: payload is `{"id":<int>,"data":{..}}`.
    RpcReply = 5,
    /// A shared/client attribute request: payload is `{"id":..,"client":bool,"keys":[..]}`.
    AttributeRequest = 6,
}

impl RecordKind {
    /// Decode the stored integer; `None` for a value this version does not know.
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Telemetry,
            2 => Self::Attributes,
            3 => Self::Connect,
            4 => Self::Disconnect,
            5 => Self::RpcReply,
            6 => Self::AttributeRequest,
            _ => return None,
        })
    }
}

/// One unit of work for the uplink, produced by the router and made durable by the store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// ThingsBoard device name (exact, case-sensitive; validated non-empty and <= 255 chars).
    pub device: String,
    /// ThingsBoard device profile name, sent as `type` in `v1/gateway/connect`.
    pub device_type: String,
    pub kind: RecordKind,
    /// Kind-specific JSON body (see [`RecordKind`]).
    pub payload: Value,
}

impl Record {
    /// A telemetry record: `{"ts": ts, "values": values}`.
    pub fn telemetry(
        device: impl Into<String>,
        device_type: impl Into<String>,
        ts: TimestampMs,
        values: Map<String, Value>,
    ) -> Self {
        Record {
            device: device.into(),
            device_type: device_type.into(),
            kind: RecordKind::Telemetry,
            // Built by hand: `json!` would serialise `values` into a deep copy of itself.
            payload: Value::Object(Map::from_iter([
                ("ts".to_owned(), Value::from(ts)),
                ("values".to_owned(), Value::Object(values)),
            ])),
        }
    }

    /// A client-attributes record.
    pub fn attributes(
        device: impl Into<String>,
        device_type: impl Into<String>,
        values: Map<String, Value>,
    ) -> Self {
        Record {
            device: device.into(),
            device_type: device_type.into(),
            kind: RecordKind::Attributes,
            payload: Value::Object(values),
        }
    }
}

/// A record as read back from the store: its row id is what the uplink acks.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredRecord {
    /// Monotonic row id: oldest first, and the ack key.
    pub id: i64,
    pub record: Record,
    /// `record.payload` as JSON text, when the store has it at hand (it always does): the
    /// uplink sends telemetry entries as this text instead of serialising them again.
    pub text: Option<String>,
}

/// Largest device name ThingsBoard accepts in practice (spec §8.5).
pub const MAX_DEVICE_NAME_LEN: usize = 255;

/// Why a device name must not reach ThingsBoard (a bad name creates a permanent garbage device).
pub fn check_device_name(name: &str) -> Result<(), &'static str> {
    if name.trim().is_empty() {
        return Err("device name is empty");
    }
    if name.len() > MAX_DEVICE_NAME_LEN {
        return Err("device name is longer than 255 bytes");
    }
    if name.contains("${") {
        return Err("device name contains an unresolved ${...} expression");
    }
    if name.chars().any(|c| c.is_control()) {
        return Err("device name contains control characters");
    }
    Ok(())
}

/// A shared-attribute update pushed by ThingsBoard for a sub-device (`v1/gateway/attributes`).
#[derive(Debug, Clone, PartialEq)]
pub struct AttributeUpdate {
    pub device: String,
    /// Changed keys and values; a `deleted` array is kept as-is.
    pub data: Map<String, Value>,
}

/// A server-side RPC for a sub-device (`v1/gateway/rpc`).
#[derive(Debug, Clone, PartialEq)]
pub struct RpcRequest {
    pub device: String,
    /// ThingsBoard's integer request id; the reply must carry it back.
    pub id: i64,
    pub method: String,
    pub params: Value,
}

/// Everything ThingsBoard pushes down that the router/downlink must act on.
#[derive(Debug, Clone, PartialEq)]
pub enum Downlink {
    /// Shared attributes changed for a sub-device.
    Attributes(AttributeUpdate),
    /// Server-side RPC to a sub-device.
    Rpc(RpcRequest),
    /// Answer to an attribute request we sent (`v1/gateway/attributes/response`).
    AttributeResponse {
        device: String,
        id: i64,
        values: Value,
    },
    /// ThingsBoard closed a sub-device session (`v1/gateway/disconnect`, MQTT 5 only).
    DeviceDisconnected { device: String, reason: Option<i64> },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_kind_round_trips_through_u8() {
        for k in [
            RecordKind::Telemetry,
            RecordKind::Attributes,
            RecordKind::Connect,
            RecordKind::Disconnect,
            RecordKind::RpcReply,
            RecordKind::AttributeRequest,
        ] {
            assert_eq!(RecordKind::from_u8(k as u8), Some(k));
        }
        assert_eq!(RecordKind::from_u8(0), None);
        assert_eq!(RecordKind::from_u8(99), None);
    }

    #[test]
    fn device_names_are_checked() {
        assert!(check_device_name("Meter 1").is_ok());
        assert!(check_device_name("").is_err());
        assert!(check_device_name("   ").is_err());
        assert!(check_device_name("${serial}").is_err());
        assert!(check_device_name(&"x".repeat(256)).is_err());
        assert!(check_device_name("a\nb").is_err());
    }
}
